//! What follows runs after their start, on a fake host (engines, firewall
//! and routes in memory): a run whose supervisor died is cleaned up by
//! whoever looks, `stop` asks the engine and waits for the supervisor's
//! cleanup, `clean` removes what this home's runs left and nothing else,
//! `status` reports each engine. Milliseconds, no Docker; the same paths
//! against real engines are the run tests (`tests/python/test_faults.py`,
//! `test_runs_cli.py`, `test_system_cmds.py`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::fakes::{host, FakeFirewall, FakeRoutes};
use super::lifecycle::{clean_on, list_on, stop_on};
use super::services::Host;
use super::status::status_on;
use super::system::containers_on;
use super::{load_meta, run_dir, save_meta, CleanOptions, RunMeta, RunState};
use crate::runtime::fake::FakeRuntime;
use crate::runtime::{ContainerSpec, Engine, Runtime, HOME_LABEL, RUN_LABEL};

struct World {
    _tmp: tempfile::TempDir,
    home: PathBuf,
    docker: Arc<FakeRuntime>,
    podman: Arc<FakeRuntime>,
    firewall: Arc<FakeFirewall>,
    routes: Arc<FakeRoutes>,
    host: Host,
}

fn world() -> World {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let docker = Arc::new(FakeRuntime::default());
    let podman = Arc::new(FakeRuntime::default());
    let firewall = Arc::new(FakeFirewall::default());
    let routes = Arc::new(FakeRoutes::default());
    let host = host(
        vec![
            (Engine::Docker, docker.clone()),
            (Engine::Podman, podman.clone()),
        ],
        firewall.clone(),
        routes.clone(),
    );
    World {
        _tmp: tmp,
        home,
        docker,
        podman,
        firewall,
        routes,
        host,
    }
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// This process, as a supervisor that is alive.
fn alive() -> Option<(u32, u64)> {
    let pid = std::process::id();
    Some((pid, crate::process::process_start_time(pid).unwrap()))
}

/// A supervisor that is gone (this pid, started at another time).
fn dead() -> Option<(u32, u64)> {
    Some((std::process::id(), 1))
}

impl World {
    /// Makes on `engine` what a run holds while it runs, labelled for
    /// `home`: its network and container (plus, with `stray`, a second
    /// container its run.json does not name, as a supervisor killed between
    /// creating it and recording it leaves), its firewall rules and routes.
    /// Without `state`, no run.json (its directory is gone).
    fn run(
        &self,
        engine: &FakeRuntime,
        home: &Path,
        id: &str,
        state: Option<(RunState, Option<(u32, u64)>)>,
        stray: bool,
    ) -> RunMeta {
        let labels = BTreeMap::from([
            (RUN_LABEL.to_string(), id.to_string()),
            (HOME_LABEL.to_string(), home.to_string_lossy().into_owned()),
        ]);
        let network = format!("moat-{id}");
        let (container, _) = block_on(async {
            engine
                .create_network(&network, "br-x", false, &labels)
                .await
                .unwrap();
            let spec = |name: &str| ContainerSpec {
                name: name.to_string(),
                image: "img".into(),
                network: network.clone(),
                labels: labels.clone(),
                ..ContainerSpec::default()
            };
            let c = engine
                .create_container(&spec(&format!("moat-{id}")))
                .await
                .unwrap();
            engine.start(&c).await.unwrap();
            let s = if stray {
                Some(
                    engine
                        .create_container(&spec(&format!("moat-{id}-2")))
                        .await
                        .unwrap(),
                )
            } else {
                None
            };
            (c, s)
        });
        self.firewall
            .rules
            .lock()
            .unwrap()
            .insert(format!("strict {id}"));
        self.routes
            .routes
            .lock()
            .unwrap()
            .insert(format!("name-{id}"), BTreeMap::new());
        let mut meta = RunMeta {
            container: Some(container),
            network: Some(network),
            ..RunMeta::sample(id, &format!("name-{id}"), RunState::Running)
        };
        if let Some((state, supervisor)) = state {
            meta.state = state;
            meta.supervisor = supervisor;
            meta.cleaned = false;
            let dir = run_dir(home, id);
            crate::paths::private_dir(&dir).unwrap();
            save_meta(&dir, &meta).unwrap();
        }
        meta
    }

    fn containers_of(&self, engine: &FakeRuntime, id: &str) -> usize {
        engine
            .containers()
            .iter()
            .filter(|c| c.labels.get(RUN_LABEL).is_some_and(|r| r == id))
            .count()
    }

    /// `moat clean -f --keep-images` (or its dry run) on this world.
    fn clean(&self, dry_run: bool) -> super::lifecycle::Cleaned {
        clean_on(
            &self.host,
            &self.home,
            CleanOptions {
                dry_run,
                keep_images: true,
            },
        )
        .unwrap()
    }

    fn has_rules(&self, id: &str) -> bool {
        self.firewall
            .rules
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.ends_with(id))
    }

    fn routed(&self, id: &str) -> bool {
        self.routes
            .routes
            .lock()
            .unwrap()
            .contains_key(&format!("name-{id}"))
    }
}

#[test]
fn a_run_whose_supervisor_died_is_failed_and_cleaned_up_by_whoever_looks() {
    let w = world();
    let id = "run_00000000dead";
    w.run(
        &w.docker,
        &w.home,
        id,
        Some((RunState::Running, dead())),
        true,
    );
    assert_eq!(w.containers_of(&w.docker, id), 2);
    // `moat list` looks: the run is failed, and nothing of it is left on
    // the engine (the container its run.json never named included), in
    // the firewall or the routes.
    let runs = list_on(&w.host, &w.home).unwrap();
    let run = runs.iter().find(|r| r.id == id).unwrap();
    assert_eq!(run.state, RunState::Failed);
    assert!(run.cleaned, "{:?}", run.error);
    let error = run.error.clone().unwrap();
    assert!(error.contains("exited unexpectedly"), "{error}");
    assert_eq!(w.containers_of(&w.docker, id), 0);
    assert!(w.docker.networks().is_empty());
    assert!(!w.has_rules(id) && !w.routed(id));
    // It is recorded: the next look changes nothing.
    assert_eq!(
        load_meta(&run_dir(&w.home, id)).unwrap().state,
        RunState::Failed
    );
    // The rules were removed once (that they stay while a container does is
    // the next test).
    let fw = w.firewall.calls.lock().unwrap().clone();
    assert_eq!(fw, [format!("remove {id}")]);
}

#[test]
fn a_container_that_will_not_go_keeps_its_rules_and_the_run_says_why() {
    let w = world();
    let id = "run_00000000b0b0";
    w.run(
        &w.docker,
        &w.home,
        id,
        Some((RunState::Running, dead())),
        false,
    );
    w.docker.fail("remove", "device or resource busy");
    let run = list_on(&w.host, &w.home).unwrap().remove(0);
    assert_eq!(run.state, RunState::Failed);
    assert!(!run.cleaned);
    let error = run.error.unwrap();
    assert!(
        error.contains("cleaning up failed") && error.contains("busy"),
        "{error}"
    );
    // A container that may still run keeps the rules that confine it.
    assert!(w.has_rules(id));
}

#[test]
fn stop_asks_the_engine_and_waits_for_the_supervisors_cleanup() {
    let w = world();
    let id = "run_000000005709";
    let meta = w.run(
        &w.docker,
        &w.home,
        id,
        Some((RunState::Running, alive())),
        false,
    );
    // The supervisor (this test) sees its container exit and cleans up.
    let (docker, dir, container) = (
        w.docker.clone(),
        run_dir(&w.home, id),
        meta.container.clone().unwrap(),
    );
    let supervisor = std::thread::spawn(move || {
        for _ in 0..500 {
            if docker
                .containers()
                .iter()
                .any(|c| !c.running && c.exit_code == Some(143))
            {
                let mut m = load_meta(&dir).unwrap();
                m.state = RunState::Stopped;
                m.exit_code = Some(143);
                m.cleaned = true;
                save_meta(&dir, &m).unwrap();
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    });
    let stopped = stop_on(&w.host, &w.home, &meta, 3).unwrap();
    assert!(
        supervisor.join().unwrap(),
        "the engine was asked to stop the container"
    );
    assert!(w.docker.calls().contains(&format!("stop {container}")));
    assert_eq!(
        (stopped.state, stopped.exit_code),
        (RunState::Stopped, Some(143))
    );
    assert!(stopped.cleaned);
    // A run removed meanwhile (by `destroy`) is reported stopped, not an
    // error.
    std::fs::remove_dir_all(run_dir(&w.home, id)).unwrap();
    let again = stop_on(&w.host, &w.home, &meta, 3).unwrap();
    assert_eq!(again.state, RunState::Stopped);
}

#[test]
fn stop_of_a_run_whose_supervisor_is_gone_cleans_up_itself() {
    let w = world();
    let id = "run_00000000900e";
    let meta = w.run(
        &w.podman,
        &w.home,
        id,
        Some((RunState::Running, dead())),
        false,
    );
    let meta = RunMeta {
        engine: Engine::Podman,
        ..meta
    };
    save_meta(&run_dir(&w.home, id), &meta).unwrap();
    let stopped = stop_on(&w.host, &w.home, &meta, 3).unwrap();
    assert!(
        stopped.state.is_terminal() && stopped.cleaned,
        "{stopped:?}"
    );
    // On the run's own engine.
    assert_eq!(w.containers_of(&w.podman, id), 0);
    assert!(w.podman.networks().is_empty());
    assert!(!w.has_rules(id));
}

#[test]
fn clean_removes_what_this_homes_runs_left_and_nothing_else() {
    let w = world();
    let other_home = w.home.parent().unwrap().join("other-home");
    // A finished run, cleaned up: its directory goes.
    let done = "run_00000000d0e0";
    let dir = run_dir(&w.home, done);
    crate::paths::private_dir(&dir).unwrap();
    let finished = RunMeta {
        cleaned: true,
        ..RunMeta::sample(done, "finished", RunState::Stopped)
    };
    save_meta(&dir, &finished).unwrap();
    // A run still running (its supervisor alive): it keeps everything.
    let live = "run_000000001ee0";
    w.run(
        &w.docker,
        &w.home,
        live,
        Some((RunState::Running, alive())),
        false,
    );
    // What a run whose directory is gone left, on Podman: it goes.
    let gone = "run_0000000060e0";
    w.run(&w.podman, &w.home, gone, None, false);
    // Another home's run on the same engine: never touched.
    let theirs = "run_00000000a1e0";
    w.run(&w.docker, &other_home, theirs, None, false);
    // A firewall chain whose run has no network on any engine and no
    // bridge (a home deleted with a run in it): it goes.
    w.firewall
        .rules
        .lock()
        .unwrap()
        .insert("strict run_00000000c0a1".into());

    // A dry run says what would go and removes nothing.
    let snapshot = |w: &World| {
        (
            w.docker.containers().len(),
            w.podman.containers().len(),
            w.docker.networks(),
            w.podman.networks(),
            w.firewall.rules.lock().unwrap().clone(),
            w.routes.routes.lock().unwrap().clone(),
        )
    };
    let before = snapshot(&w);
    let would = w.clean(true);
    assert_eq!(snapshot(&w), before);
    assert!(w.firewall.calls.lock().unwrap().is_empty());
    assert!(run_dir(&w.home, done).exists());
    let cleaned = w.clean(false);
    assert_eq!(would.runs, cleaned.runs);
    assert_eq!(would.containers, cleaned.containers);
    assert_eq!(would.networks, cleaned.networks);
    assert_eq!(would.firewall, cleaned.firewall);
    assert_eq!(cleaned.runs, [done]);
    assert!(!run_dir(&w.home, done).exists());
    assert_eq!(cleaned.networks, [format!("moat-{gone}")]);
    assert_eq!(cleaned.containers.len(), 1);
    assert_eq!(w.containers_of(&w.podman, gone), 0);
    assert!(!w.has_rules(gone));
    assert_eq!(cleaned.firewall, ["run_00000000c0a1"]);
    // The live run and the other home's keep theirs.
    assert_eq!(w.containers_of(&w.docker, live), 1);
    assert!(w.has_rules(live) && w.routed(live));
    assert_eq!(w.containers_of(&w.docker, theirs), 1);
    assert!(w.docker.networks().contains(&format!("moat-{theirs}")));
    // The system listing of this home's containers sees the live run's.
    let listed = containers_on(&w.host, &w.home, false).unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].run, live);
}

#[test]
fn clean_leaves_the_chain_of_a_run_that_starts_while_it_looks() {
    // A run starting while `clean` looks: its network is made just after
    // the networks were listed, and its chain right after that. Its chain
    // guards a run being set up (on Podman, the bridge comes only with the
    // container): it stays.
    let w = world();
    let starting = "run_00000000d00d";
    let firewall = w.firewall.clone();
    w.podman
        .on_network_list(crate::runtime::RUN_LABEL, move || {
            firewall
                .rules
                .lock()
                .unwrap()
                .insert(format!("strict {starting}"));
        });
    let cleaned = w.clean(false);
    assert!(cleaned.firewall.is_empty(), "{:?}", cleaned.firewall);
    assert!(w.has_rules(starting));
    // Once the run is gone for good (no network, no bridge), the next
    // clean removes it.
    let cleaned = w.clean(false);
    assert_eq!(cleaned.firewall, [starting]);
    assert!(!w.has_rules(starting));
}

#[test]
fn status_reports_each_engine_present_and_the_firewall() {
    let w = world();
    w.podman.fail("ping", "connection refused");
    let status = status_on(&w.host, &w.home).unwrap();
    let check = |name: &str| {
        status
            .health
            .iter()
            .find(|c| c.name == name)
            .unwrap()
            .clone()
    };
    assert!(check("docker").ok, "{:?}", status.health);
    let podman = check("podman");
    assert!(
        !podman.ok && podman.detail.contains("connection refused"),
        "{podman:?}"
    );
    assert!(check("strict mode").ok);
    assert_eq!(status.running, 0);
}
