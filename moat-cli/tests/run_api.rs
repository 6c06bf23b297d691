//! The Rust surface of runs (`moat_core::run`) against the real Docker
//! engine and the local test image, with this crate's `moat` binary as the
//! supervisor.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use moat_core::config::Overrides;
use moat_core::run::{self, Launcher, RunPlan, RunState};

fn image() -> String {
    std::env::var("MOAT_TEST_IMAGE").unwrap_or_else(|_| "moat-test:bookworm".into())
}

fn launcher() -> Launcher {
    Launcher::new(vec![env!("CARGO_BIN_EXE_moat").into(), "_supervise".into()])
}

fn plan(workspace: &Path, command: &[&str]) -> moat_core::Result<RunPlan> {
    RunPlan::new(
        workspace,
        &Overrides {
            image: Some(image()),
            command: Some(command.iter().map(|s| s.to_string()).collect()),
            ..Overrides::default()
        },
    )
}

fn container_exists(id: &str) -> bool {
    // The engine's own command line (`podman` takes the same arguments).
    let engine = std::env::var("MOAT_RUNTIME")
        .ok()
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| "docker".into());
    let out = std::process::Command::new(engine)
        .args(["ps", "-aq", "--filter", &format!("label=dev.moat.run={id}")])
        .output()
        .unwrap();
    !String::from_utf8_lossy(&out.stdout).trim().is_empty()
}

#[test]
fn a_run_streams_output_and_ends_with_the_commands_exit_code() {
    let home = tempfile::tempdir().unwrap();
    let ws = tempfile::tempdir().unwrap();
    let spec = plan(ws.path(), &["sh", "-c", "echo hi; echo oops >&2; exit 9"]).unwrap();
    let mut progress = Vec::new();
    let meta = run::start(home.path(), &spec, &launcher(), &mut |m| {
        progress.push(m.to_string())
    })
    .unwrap();
    assert_eq!(meta.state, RunState::Running);
    assert!(meta.phases.contains_key("create"), "{:?}", meta.phases);
    let end = run::wait_cleaned(home.path(), &meta.id, Some(Duration::from_secs(60))).unwrap();
    assert_eq!(end.state, RunState::Stopped);
    assert_eq!(end.exit_code, Some(9));
    let (out, err) = run::output(home.path(), &meta.id).unwrap();
    assert_eq!(out, b"hi\n");
    assert_eq!(err, b"oops\n");
    assert!(
        !container_exists(&meta.id),
        "the container outlived its run"
    );
    let report =
        moat_core::audit::verify(&run::run_dir(home.path(), &meta.id), home.path(), None).unwrap();
    assert!(report.ok, "{:?}", report.problems);
    let kinds: Vec<&str> = report.types.iter().map(|(t, _)| t.as_str()).collect();
    for kind in [
        "run_created",
        "grants_bound",
        "container_created",
        "run_started",
        "run_stopped",
    ] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }
}

#[test]
fn a_run_whose_supervisor_dies_is_failed_and_its_container_removed() {
    let home = tempfile::tempdir().unwrap();
    let ws = tempfile::tempdir().unwrap();
    let spec = plan(ws.path(), &["sleep", "300"]).unwrap();
    let meta = run::start(home.path(), &spec, &launcher(), &mut |_| {}).unwrap();
    assert!(container_exists(&meta.id));
    let (pid, _) = meta.supervisor.unwrap();
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    // The next look at the run finds the truth and cleans up.
    let mut state = RunState::Running;
    for _ in 0..100 {
        state = run::find(home.path(), Some(&meta.id)).unwrap().state;
        if state.is_terminal() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(state, RunState::Failed);
    let found = run::find(home.path(), Some(&meta.name)).unwrap();
    let error = found.error.unwrap();
    assert!(error.contains("exited unexpectedly"), "{error}");
    assert!(
        !container_exists(&meta.id),
        "the container outlived its supervisor"
    );
}

#[test]
fn no_engine_is_a_runtime_error_that_says_what_to_start() {
    let home = tempfile::tempdir().unwrap();
    let ws = tempfile::tempdir().unwrap();
    let spec = plan(ws.path(), &["true"]).unwrap();
    // The supervisor is a child: only its environment needs the bad engine.
    let launcher = Launcher::new(vec![
        "env".into(),
        "DOCKER_HOST=unix:///nonexistent/docker.sock".into(),
        "CONTAINER_HOST=unix:///nonexistent/podman.sock".into(),
        env!("CARGO_BIN_EXE_moat").into(),
        "_supervise".into(),
    ]);
    let err = run::start(home.path(), &spec, &launcher, &mut |_| {}).unwrap_err();
    assert!(err.is_runtime(), "{err}");
    let start = match std::env::var("MOAT_RUNTIME").as_deref() {
        Ok("podman") => "Start Podman",
        _ => "Start Docker",
    };
    assert!(err.to_string().contains(start), "{err}");
    let runs = run::list(home.path()).unwrap();
    assert_eq!(runs[0].state, RunState::Failed);
}

#[test]
fn a_held_start_runs_nothing_until_released_and_fails_cleanly_when_dropped() {
    let home = tempfile::tempdir().unwrap();
    let ws = tempfile::tempdir().unwrap();
    let spec = plan(
        ws.path(),
        &["sh", "-c", "echo started; touch /workspace/ran"],
    )
    .unwrap();

    // Released: the container starts then, and its first output is there.
    let held = run::start_held(home.path(), &spec, &launcher(), &mut |_| {}).unwrap();
    let id = held.meta().id.clone();
    assert_eq!(held.meta().state, RunState::Starting);
    assert!(held.meta().container.is_some(), "created before the hold");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !ws.path().join("ran").exists(),
        "the command ran before the release"
    );
    let meta = held.release(&mut |_| {}).unwrap();
    assert_eq!(meta.id, id);
    let end = run::wait_cleaned(home.path(), &id, Some(Duration::from_secs(60))).unwrap();
    assert_eq!((end.state, end.exit_code), (RunState::Stopped, Some(0)));
    assert!(ws.path().join("ran").exists());
    assert_eq!(run::output(home.path(), &id).unwrap().0, b"started\n");
    std::fs::remove_file(ws.path().join("ran")).unwrap();

    // Dropped (the starter went away): the run fails, cleaned up, and the
    // command never runs.
    let held = run::start_held(home.path(), &spec, &launcher(), &mut |_| {}).unwrap();
    let id = held.meta().id.clone();
    drop(held);
    let end = run::wait_cleaned(home.path(), &id, Some(Duration::from_secs(60))).unwrap();
    assert_eq!(end.state, RunState::Failed);
    assert!(
        end.error
            .as_deref()
            .is_some_and(|e| e.contains("went away before attaching")),
        "{:?}",
        end.error
    );
    assert!(
        !ws.path().join("ran").exists(),
        "the command ran without a release"
    );
    assert!(!container_exists(&id), "the container outlived its run");
}
