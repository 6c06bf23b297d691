//! The supervisor's logic on fakes: the order of its steps, what a failure
//! at each step leaves behind (nothing), and the states a run goes through.
//! Milliseconds, no Docker; the real engine and firewall are tested by the
//! run tests (`tests/python/test_runs_*.py`, `moat-cli/tests/run_api.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::steps::STEPS;
use super::{Step, Supervision};
use crate::config::{Config, GrantRef};
use crate::error::{Error, ErrorKind};
use crate::policy::PolicyMode;
use crate::run::fakes::{FakeFirewall, FakeRoutes};
use crate::run::services::Services;
use crate::run::{load_meta, run_dir, save_meta, RunMeta, RunPlan, RunState};
use crate::runtime::fake::FakeRuntime;
use crate::runtime::{Engine, Runtime};

const IMAGE: &str = "fake:latest";

struct World {
    _tmp: tempfile::TempDir,
    home: std::path::PathBuf,
    runtime: Arc<FakeRuntime>,
    firewall: Arc<FakeFirewall>,
    routes: Arc<FakeRoutes>,
    progress: Arc<Mutex<Vec<String>>>,
}

impl World {
    fn new(runtime: FakeRuntime, firewall: FakeFirewall, routes: FakeRoutes) -> World {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        World {
            home,
            _tmp: tmp,
            runtime: Arc::new(runtime),
            firewall: Arc::new(firewall),
            routes: Arc::new(routes),
            progress: Arc::default(),
        }
    }

    fn plan(&self, strict: bool, ports: bool) -> RunPlan {
        let ws = self.home.parent().unwrap().join("ws");
        std::fs::create_dir_all(&ws).unwrap();
        let mut plan = RunPlan::from_config(Config::defaults(&ws)).unwrap();
        plan.image = IMAGE.into();
        plan.command = Some(vec!["true".into()]);
        plan.engine = Some(Engine::Docker);
        if strict {
            plan.network.policy = PolicyMode::Strict;
        }
        if ports {
            plan.ports.insert("web".into(), 3000);
        }
        plan
    }

    /// A run about to be set up: its run.json, its audit log.
    fn supervision(&self, plan: RunPlan) -> Supervision {
        let id = "run_0123456789ab";
        let dir = run_dir(&self.home, id);
        crate::paths::private_dir(&dir).unwrap();
        let meta = RunMeta {
            workspace: plan.workspace.clone(),
            image: plan.image.clone(),
            command: plan.command.clone(),
            policy: plan.network.policy,
            ports: plan.ports.clone(),
            created_at: crate::run::now(),
            ..RunMeta::sample(id, "fake-run", RunState::Starting)
        };
        save_meta(&dir, &meta).unwrap();
        let audit = Arc::new(crate::audit::AuditWriter::open(&dir, &self.home, id).unwrap());
        let runtime: Arc<dyn Runtime> = self.runtime.clone();
        let progress = self.progress.clone();
        Supervision::new(
            self.home.clone(),
            &meta,
            plan,
            vec!["moat".into(), "_supervise".into()],
            audit,
            Services {
                runtime,
                firewall: self.firewall.clone(),
                routes: self.routes.clone(),
                // No user's agent here (a run with an ssh: grant fails at
                // its step).
                ssh_agent: Some(self.home.join("no-ssh-agent.sock")),
            },
            Arc::new(move |m: &str| progress.lock().unwrap().push(m.to_string())),
        )
    }

    fn meta(&self) -> RunMeta {
        load_meta(&run_dir(&self.home, "run_0123456789ab")).unwrap()
    }

    /// Nothing of the run is left on the engine, the firewall or the router.
    fn assert_nothing_left(&self, after: &str) {
        assert_eq!(self.runtime.networks(), Vec::<String>::new(), "{after}");
        assert!(self.runtime.containers().is_empty(), "{after}");
        assert!(self.firewall.rules.lock().unwrap().is_empty(), "{after}");
        assert!(self.routes.routes.lock().unwrap().is_empty(), "{after}");
        let dir = run_dir(&self.home, "run_0123456789ab");
        assert!(
            !dir.join("container").exists(),
            "{after}: mounted files left"
        );
    }

    fn audit_types(&self) -> Vec<String> {
        std::fs::read_to_string(run_dir(&self.home, "run_0123456789ab").join("audit.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["type"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    }
}

fn runtime_with_image() -> FakeRuntime {
    let r = FakeRuntime::default();
    r.add_image(IMAGE, "sha256:fake");
    r
}

#[tokio::test]
async fn the_steps_run_in_order_and_cleanup_undoes_them_in_reverse() {
    let w = World::new(
        runtime_with_image(),
        FakeFirewall::default(),
        FakeRoutes::default(),
    );
    let mut run = w.supervision(w.plan(true, true));
    run.start(std::future::pending()).await.unwrap();
    assert_eq!(run.done, STEPS.to_vec());
    // Running: the container started, strict rules and the guard are in,
    // the endpoint is routed, and run.json says so.
    let meta = w.meta();
    assert_eq!(meta.state, RunState::Running);
    assert!(meta.container.is_some() && meta.network.is_some() && meta.proxy.is_some());
    assert_eq!(
        meta.urls.get("web").map(String::as_str),
        Some("https://web.fake-run.localhost:8080")
    );
    for step in STEPS {
        assert!(
            meta.phases.contains_key(step.name()),
            "{step:?}: {:?}",
            meta.phases
        );
    }
    assert_eq!(
        w.firewall.rules.lock().unwrap().len(),
        2,
        "strict rules and the guard"
    );
    assert!(w.routes.routes.lock().unwrap().contains_key("fake-run"));
    // The run held its place in the table before it asked for a router: a
    // run ending meanwhile would not stop the router it is about to use.
    assert_eq!(
        *w.routes.held_at_ensure.lock().unwrap(),
        vec![vec!["fake-run".to_string()]]
    );
    let calls = w.runtime.calls();
    let pos = |prefix: &str| {
        calls
            .iter()
            .position(|c| c.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in {calls:?}"))
    };
    assert!(pos("ping") < pos("create_network"));
    assert!(pos("create_network") < pos("create_container moat-run_"));
    assert!(
        pos("attach_output") < pos("start"),
        "output is followed before the start"
    );
    // The command exits 7: the run stops with its code, then everything is
    // undone, the container first and the firewall after it.
    let container = meta.container.clone().unwrap();
    w.runtime.exit(&container, 7);
    run.finish(Ok(7)).await.unwrap();
    let meta = w.meta();
    assert_eq!((meta.state, meta.exit_code), (RunState::Stopped, Some(7)));
    assert!(meta.cleaned, "{:?}", meta.error);
    w.assert_nothing_left("after the run");
    let fw_calls = w.firewall.calls.lock().unwrap().clone();
    assert_eq!(
        fw_calls.last().map(String::as_str),
        Some("remove run_0123456789ab")
    );
    let calls = w.runtime.calls();
    let last = |prefix: &str| calls.iter().rposition(|c| c.starts_with(prefix)).unwrap();
    assert!(last(&format!("remove {container}")) < last("remove_network"));
    let types = w.audit_types();
    for t in [
        "run_created",
        "grants_bound",
        "container_created",
        "run_started",
        "run_stopped",
    ] {
        assert!(types.contains(&t.to_string()), "{t} in {types:?}");
    }
}

/// How to make setup fail at one step: the engine, firewall and router,
/// and the grant the run asks for.
fn failing_at(step: Step) -> (FakeRuntime, FakeFirewall, FakeRoutes, Option<&'static str>) {
    let (mut fw, mut routes) = (FakeFirewall::default(), FakeRoutes::default());
    let runtime = runtime_with_image();
    let mut grant = None;
    let runtime = match step {
        // An aws grant with no role stored.
        Step::Credentials => {
            grant = Some("aws");
            runtime
        }
        Step::Image => {
            let r = FakeRuntime::default();
            r.fail("pull_image", "no registry reachable");
            r
        }
        Step::Network => {
            runtime.fail("create_network", "address pools exhausted");
            runtime
        }
        // A gateway the proxy cannot listen on.
        Step::Proxy => {
            let r = FakeRuntime::new(IpAddr::from([203, 0, 113, 7]));
            r.add_image(IMAGE, "sha256:fake");
            r
        }
        // An ssh: grant, and no user's agent to sign with (the grant's
        // success is tested with real agents, tests/python/test_ssh_runs.py).
        Step::Ssh => {
            grant = Some("ssh:git.example.com");
            runtime
        }
        Step::Firewall => {
            fw.fail_install = true;
            runtime
        }
        Step::Router => {
            routes.fail_ensure = true;
            runtime
        }
        Step::Files => {
            runtime.fail("read_file", "no such container");
            runtime
        }
        Step::Container => {
            runtime.fail("start", "OCI runtime create failed");
            runtime
        }
    };
    (runtime, fw, routes, grant)
}

/// Stores an SSH grant for `host` in `home`, as `moat grant ssh` would
/// (without asking an agent for its keys).
fn store_ssh_grant(home: &Path, host: &str) {
    let grants = serde_json::json!([{
        "host": host,
        "key": {"fingerprint": "SHA256:fake", "comment": "test", "key_type": "ssh-ed25519"},
        "created": "2026-01-01T00:00:00Z",
        "host_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"],
    }]);
    std::fs::write(home.join("ssh-grants.json"), grants.to_string()).unwrap();
}

#[tokio::test]
async fn a_failure_at_any_step_leaves_nothing_behind() {
    for step in STEPS {
        let (runtime, fw, routes, grant) = failing_at(step);
        let w = World::new(runtime, fw, routes);
        let mut plan = w.plan(true, true);
        if let Some(grant) = grant {
            if let Some(host) = grant.strip_prefix("ssh:") {
                store_ssh_grant(&w.home, host);
            }
            plan.grants = vec![GrantRef::parse(grant).unwrap()];
        }
        let mut run = w.supervision(plan);
        let err = run
            .start(std::future::pending())
            .await
            .expect_err(&format!("{step:?} should fail"));
        if step == Step::Ssh {
            assert!(err.to_string().contains("no-ssh-agent.sock"), "{err}");
        }
        assert!(run.done.is_empty(), "{step:?}: undone all");
        w.assert_nothing_left(&format!("a failure at {step:?} ({err})"));
        let meta = w.meta();
        assert_eq!(meta.state, RunState::Failed, "{step:?}");
        assert!(meta.cleaned, "{step:?}: {:?}", meta.error);
        assert_eq!(meta.error.as_deref(), Some(err.to_string().as_str()));
        let types = w.audit_types();
        assert_eq!(
            types.first().map(String::as_str),
            Some("run_created"),
            "{step:?}"
        );
        assert_eq!(
            types.last().map(String::as_str),
            Some("run_failed"),
            "{step:?}"
        );
        // The audit log is closed and verifies.
        let report =
            crate::audit::verify(&run_dir(&w.home, "run_0123456789ab"), &w.home, None).unwrap();
        assert!(
            report.ok && report.closed,
            "{step:?}: {:?}",
            report.problems
        );
        // It failed where it was made to: no step after it began.
        let at = STEPS.iter().position(|s| *s == step).unwrap();
        let phases = w.meta().phases;
        for earlier in &STEPS[..at] {
            assert!(
                phases.contains_key(earlier.name()),
                "{step:?}: {earlier:?} did not run ({err})"
            );
        }
        for later in &STEPS[at..] {
            assert!(
                !phases.contains_key(later.name()),
                "{step:?}: {later:?} ran"
            );
        }
    }
}

/// An engine's refusal may quote the container's environment (runc quotes
/// a variable it cannot set, value and all): the run's error, in run.json,
/// the audit log and what the caller gets, holds no secret value.
#[tokio::test]
async fn an_engine_error_quoting_a_secret_is_recorded_without_it() {
    let (runtime, fw, routes, _) = failing_at(Step::Container);
    runtime.fail(
        "start",
        "OCI runtime create failed: env: \"DB_PASSWORD=TOPSECRET-value\\x01xyzw\" and \"API=TOPSECRET-value\\u{1}xyzw\"",
    );
    let w = World::new(runtime, fw, routes);
    let mut run = w.supervision(w.plan(false, false));
    run.built.secret_env.push(crate::secret::Secret::new(
        "DB_PASSWORD=TOPSECRET-value\u{1}xyzw".to_string(),
    ));
    let err = run.start(std::future::pending()).await.unwrap_err();
    assert!(
        err.to_string().contains("OCI runtime create failed"),
        "{err}"
    );
    let audit =
        std::fs::read_to_string(run_dir(&w.home, "run_0123456789ab").join("audit.jsonl")).unwrap();
    let meta =
        std::fs::read_to_string(run_dir(&w.home, "run_0123456789ab").join("run.json")).unwrap();
    for (what, text) in [
        ("error", err.to_string()),
        ("audit", audit),
        ("run.json", meta),
    ] {
        assert!(
            !text.contains("TOPSECRET") && !text.contains("xyzw"),
            "{what}: {text}"
        );
    }
    assert!(w.meta().error.unwrap().contains("DB_PASSWORD=****"));
}

#[tokio::test]
async fn a_container_that_stays_keeps_its_rules_and_network() {
    let w = World::new(
        runtime_with_image(),
        FakeFirewall::default(),
        FakeRoutes::default(),
    );
    let mut run = w.supervision(w.plan(true, false));
    run.start(std::future::pending()).await.unwrap();
    let container = w.meta().container.unwrap();
    w.runtime.fail("remove", "device or resource busy");
    w.runtime.exit(&container, 0);
    run.finish(Ok(0)).await.unwrap();
    let meta = w.meta();
    // The exit code is kept; cleanup is not done, and says why.
    assert_eq!((meta.state, meta.exit_code), (RunState::Stopped, Some(0)));
    assert!(!meta.cleaned);
    assert!(
        meta.error
            .as_deref()
            .unwrap()
            .contains("cleaning up failed"),
        "{:?}",
        meta.error
    );
    // The container may still run: its confinement stays.
    assert_eq!(w.firewall.rules.lock().unwrap().len(), 2);
    assert_eq!(w.runtime.networks().len(), 1);
}

#[tokio::test]
async fn a_missing_image_is_pulled_with_progress() {
    let w = World::new(
        FakeRuntime::default(),
        FakeFirewall::default(),
        FakeRoutes::default(),
    );
    let mut run = w.supervision(w.plan(false, false));
    run.start(std::future::pending()).await.unwrap();
    let progress = w.progress.lock().unwrap().clone();
    assert!(
        progress.iter().any(|p| p == "Pulling image fake:latest"),
        "{progress:?}"
    );
    // The last word of a pull says it is done (the progress line could
    // stop short of 100%), after its progress.
    let pulling = progress
        .iter()
        .position(|p| p == "Pulling image fake:latest");
    let pulled = progress
        .iter()
        .position(|p| p == "Pulled image fake:latest");
    assert!(pulled.is_some() && pulled > pulling, "{progress:?}");
    assert!(w
        .runtime
        .calls()
        .iter()
        .any(|c| c == "pull_image fake:latest"));
    // Permissive: the guard only, no strict rules.
    assert_eq!(
        w.firewall
            .rules
            .lock()
            .unwrap()
            .iter()
            .cloned()
            .collect::<Vec<_>>(),
        vec!["guard run_0123456789ab".to_string()]
    );
}

#[tokio::test]
async fn a_rootless_engine_is_refused_before_anything_is_made() {
    let runtime = runtime_with_image();
    runtime.set_rootless();
    let w = World::new(runtime, FakeFirewall::default(), FakeRoutes::default());
    let mut run = w.supervision(w.plan(false, false));
    let err = run.start(std::future::pending()).await.unwrap_err();
    assert!(err.to_string().contains("rootless"), "{err}");
    assert!(err.to_string().contains("docs/runtimes.md"), "{err}");
    assert!(!w.runtime.calls().iter().any(|c| c.starts_with("create_")));
    w.assert_nothing_left("a rootless engine");
    assert_eq!(w.meta().state, RunState::Failed);
}

#[tokio::test]
async fn listeners_bind_before_a_late_gateway_and_a_gateway_that_never_comes_fails_the_run() {
    // A gateway that is no address of this host, on an engine whose
    // gateways come up with the container (Podman's): the proxy binds
    // anyway (IP_FREEBIND). The gateway never comes up here, so after the
    // container starts the run fails, saying so, and leaves nothing.
    let runtime = FakeRuntime::new(IpAddr::from([203, 0, 113, 7]));
    runtime.add_image(IMAGE, "sha256:fake");
    runtime.set_late_gateway();
    let w = World::new(runtime, FakeFirewall::default(), FakeRoutes::default());
    let mut run = w.supervision(w.plan(true, false));
    run.gateway_wait = std::time::Duration::from_millis(300);
    let err = run.start(std::future::pending()).await.unwrap_err();
    assert!(
        err.to_string().contains("did not come up on this host"),
        "{err}"
    );
    // It got as far as starting the container: the proxy was listening.
    assert!(w.runtime.calls().iter().any(|c| c.starts_with("start ")));
    w.assert_nothing_left("a gateway that never came up");
    assert_eq!(w.meta().state, RunState::Failed);
}

#[tokio::test]
async fn an_image_that_cannot_be_pulled_is_named_with_what_chose_it_and_how_to_choose_another() {
    for (source, says) in [
        (crate::config::ImageSource::Default, "moat's default image"),
        (crate::config::ImageSource::Dependencies, "dependencies:"),
        (crate::config::ImageSource::Image, "--image or image:"),
    ] {
        let runtime = FakeRuntime::default();
        runtime.fail("pull_image", "connection refused");
        let w = World::new(runtime, FakeFirewall::default(), FakeRoutes::default());
        let mut plan = w.plan(false, false);
        plan.image_source = source;
        let mut run = w.supervision(plan);
        let err = run
            .start(std::future::pending())
            .await
            .expect_err("a missing image fails the run");
        let text = err.to_string();
        for part in [
            IMAGE,
            says,
            "connection refused",
            "--image",
            "dependencies:",
        ] {
            assert!(text.contains(part), "{part:?} not in {text}");
        }
        // Nothing was made for the run.
        assert!(w.runtime.networks().is_empty() && w.runtime.containers().is_empty());
    }
}

#[test]
fn the_agents_state_files_are_read_without_following_a_link() {
    use crate::paths::read_no_follow;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("host-credentials.json");
    std::fs::write(&secret, br#"{"refreshToken":"host-secret"}"#).unwrap();
    let link = dir.path().join(".claude.json");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    // A link the agent left: not followed, nothing of its target read.
    assert_eq!(read_no_follow(&link).unwrap(), Some(None));
    std::fs::remove_file(&link).unwrap();
    assert_eq!(read_no_follow(&link).unwrap(), None);
    std::fs::write(&link, b"{}").unwrap();
    assert_eq!(read_no_follow(&link).unwrap(), Some(Some(b"{}".to_vec())));
    // A directory or a fifo is not a file either.
    std::fs::remove_file(&link).unwrap();
    std::fs::create_dir(&link).unwrap();
    assert_eq!(read_no_follow(&link).unwrap(), Some(None));
}

#[tokio::test]
async fn a_held_start_starts_the_container_only_once_the_gate_opens() {
    let w = World::new(
        runtime_with_image(),
        FakeFirewall::default(),
        FakeRoutes::default(),
    );
    let mut run = w.supervision(w.plan(false, false));
    let (open, opened) = tokio::sync::oneshot::channel::<()>();
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let (runtime, seen_at_gate) = (w.runtime.clone(), seen.clone());
    run.gate = Some(Box::pin(async move {
        // At the gate: created, its output followed, not started.
        *seen_at_gate.lock().unwrap() = runtime.calls();
        opened
            .await
            .map_err(|_| Error::new(ErrorKind::Runtime, "gate dropped"))
    }));
    let starting =
        tokio::spawn(async move { run.start(std::future::pending()).await.map(|()| run) });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let at_gate = seen.lock().unwrap().clone();
    assert!(
        at_gate.iter().any(|c| c.starts_with("create_container")),
        "{at_gate:?}"
    );
    assert!(
        at_gate.iter().any(|c| c.starts_with("attach_output")),
        "{at_gate:?}"
    );
    assert!(
        !at_gate.iter().any(|c| c.starts_with("start ")),
        "{at_gate:?}"
    );
    assert!(!w.runtime.calls().iter().any(|c| c.starts_with("start ")));
    assert_eq!(w.meta().state, RunState::Starting);
    assert!(
        w.meta().container.is_some(),
        "the attacher finds the container"
    );
    open.send(()).unwrap();
    let mut run = starting.await.unwrap().unwrap();
    assert!(w.runtime.calls().iter().any(|c| c.starts_with("start ")));
    assert_eq!(w.meta().state, RunState::Running);
    assert!(w.meta().phases.contains_key("attach_wait"));
    let container = w.meta().container.unwrap();
    w.runtime.exit(&container, 0);
    run.finish(Ok(0)).await.unwrap();
    w.assert_nothing_left("after the run");
}

#[tokio::test]
async fn a_held_start_whose_starter_goes_away_fails_and_leaves_nothing() {
    let w = World::new(
        runtime_with_image(),
        FakeFirewall::default(),
        FakeRoutes::default(),
    );
    let mut run = w.supervision(w.plan(true, true));
    run.gate = Some(Box::pin(async {
        Err(Error::new(
            ErrorKind::Runtime,
            "the program that started this interactive run went away before attaching to it",
        ))
    }));
    let e = run.start(std::future::pending()).await.unwrap_err();
    assert!(e.to_string().contains("went away before attaching"), "{e}");
    assert!(!w.runtime.calls().iter().any(|c| c.starts_with("start ")));
    let meta = w.meta();
    assert_eq!(meta.state, RunState::Failed);
    assert!(
        meta.error
            .as_deref()
            .is_some_and(|e| e.contains("went away")),
        "{meta:?}"
    );
    w.assert_nothing_left("after a starter that went away");
}

/// A run of a known agent is driven by its preset alone: the image is the
/// preset's (made from the base image on the engine, its tag recorded in
/// run.json), its state directory is made and mounted, its environment and
/// command are the run's, and cleanup still leaves nothing.
#[tokio::test]
async fn an_agent_run_takes_its_image_state_and_environment_from_the_preset() {
    use crate::agent::{claude, preset, Agent, AgentOptions};
    let w = World::new(
        runtime_with_image(),
        FakeFirewall::default(),
        FakeRoutes::default(),
    );
    let ws = w.home.parent().unwrap().join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    let options = AgentOptions {
        prompt: Some("hello".into()),
        ..AgentOptions::default()
    };
    let mut plan = RunPlan::agent(
        Agent::Claude,
        &ws,
        &crate::config::Overrides::default(),
        &options,
    )
    .unwrap();
    plan.image = IMAGE.into();
    plan.engine = Some(Engine::Docker);
    // No stored grant in this home: the preset's grant is bound by the run
    // tests (tests/python/test_claude.py); here the preset's own steps.
    plan.grants.clear();
    let version = plan.agent.as_ref().unwrap().version.clone();
    // The pinned build, already in the cache (its download and checks are
    // claude.rs's tests).
    let (_, _, sha) = claude::PINNED
        .wheels
        .iter()
        .find(|(arch, _, _)| *arch == std::env::consts::ARCH)
        .unwrap();
    let cache = w
        .home
        .join("cache/claude")
        .join(format!("{version}-{}", std::env::consts::ARCH));
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::write(cache.join("claude"), b"#!/bin/sh\n").unwrap();
    std::fs::write(
        cache.join("source.json"),
        serde_json::json!({"version": version, "wheel_sha256": sha, "pinned": true}).to_string(),
    )
    .unwrap();
    let mut run = w.supervision(plan);
    run.start(std::future::pending()).await.unwrap();
    // The image: made from the base image, and the run's.
    let meta = w.meta();
    assert!(meta.image.starts_with("moat-claude:"), "{}", meta.image);
    let calls = w.runtime.calls();
    assert!(
        calls
            .iter()
            .any(|c| c.starts_with("put_file ") && c.ends_with(" /usr/local/bin/claude")),
        "{calls:?}"
    );
    assert!(calls
        .iter()
        .any(|c| c.starts_with("commit ") && c.ends_with(&meta.image)));
    let agent = w
        .runtime
        .containers()
        .into_iter()
        .find(|c| c.name.starts_with("moat-run_"))
        .unwrap();
    assert_eq!(agent.image, meta.image);
    // Its state: a directory of the home's, per workspace, mounted where
    // the preset says, with the config that keeps it from asking.
    let state = claude::state_dir(&w.home, &ws);
    let bind = agent
        .binds
        .iter()
        .find(|b| b.target == claude::CONFIG_DIR)
        .unwrap_or_else(|| panic!("{:?}", agent.binds));
    assert_eq!(bind.source, state.to_string_lossy());
    assert!(!bind.read_only);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join(".claude.json")).unwrap()).unwrap();
    assert_eq!(config["hasCompletedOnboarding"], true, "{config}");
    // Its environment and command.
    for (key, value) in preset(Agent::Claude).env() {
        assert!(
            agent.env.contains(&format!("{key}={value}")),
            "{key}: {:?}",
            agent.env
        );
    }
    assert_eq!(
        meta.command.as_deref(),
        Some(&["claude", "-p", "hello"].map(String::from)[..])
    );
    let container = meta.container.clone().unwrap();
    w.runtime.exit(&container, 0);
    run.finish(Ok(0)).await.unwrap();
    w.assert_nothing_left("after the agent's run");
    // The state stays for the next run of the workspace.
    assert!(state.join(".claude.json").is_file());
}

/// An agent's requests cannot grow the run's trace without bound: past its
/// limit, records are counted, not kept, and the run's end says so.
#[test]
fn the_network_trace_stops_at_its_limit_and_counts_what_it_did_not_keep() {
    use crate::trace::TraceSink;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("network.jsonl");
    let trace = super::JsonlTrace::open(&path, 1000).unwrap();
    for i in 0..50 {
        trace.record(crate::trace::TraceRecord {
            url: format!("https://blocked.test/{}", "x".repeat(i * 10)),
            ..crate::trace::TraceRecord::default()
        });
    }
    let size = std::fs::metadata(&path).unwrap().len();
    assert!(size > 0 && size <= 1000, "{size}");
    let kept = std::fs::read_to_string(&path).unwrap().lines().count();
    let lost = trace.lost().unwrap();
    assert_eq!(
        lost,
        format!(
            "{} network trace records were not kept: network.jsonl reached its limit of 1000 bytes",
            50 - kept
        )
    );
}
