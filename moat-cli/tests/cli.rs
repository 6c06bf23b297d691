//! The `moat` binary, run as a user would run it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

fn moat(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run moat")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn workspace(yaml: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("agent.yaml"), yaml).unwrap();
    dir
}

#[test]
fn version_matches_cargo() {
    let out = moat(&["--version"], Path::new("."));
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).trim(),
        format!("moat {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn help_speaks_as_the_seeds_do() {
    let out = moat(&["--help"], Path::new("."));
    assert!(out.status.success());
    let help = text(&out.stdout);
    assert!(
        help.contains("Run AI agents locally with one command"),
        "{help}"
    );
    assert!(help.contains("config"), "{help}");
}

#[test]
fn config_prints_resolved_yaml() {
    let ws = workspace("name: demo\ndependencies: [python@3.11]\n");
    let out = moat(&["config"], ws.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let yaml: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).unwrap();
    assert_eq!(yaml["name"].as_str(), Some("demo"));
    assert_eq!(yaml["image"].as_str(), Some("python:3.11-bookworm"));
    assert_eq!(yaml["image_source"].as_str(), Some("dependencies"));
    assert_eq!(yaml["network"]["policy"].as_str(), Some("permissive"));
    assert_eq!(yaml["interactive"].as_bool(), Some(false));
}

#[test]
fn config_json_for_scripts() {
    let ws = workspace("ports:\n  web: 3000\n");
    let path = ws.path().to_str().unwrap();
    let out = moat(&["config", path, "--json"], Path::new("/"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["ports"]["web"], 3000);
    assert_eq!(json["image"], "ubuntu:22.04");
    assert_eq!(json["image_source"], "default");
}

#[test]
fn config_without_file_shows_defaults_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = moat(&["config", "--json"], dir.path());
    assert!(out.status.success());
    assert!(text(&out.stderr).contains("no agent.yaml or moat.yaml"));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["config_file"], serde_json::Value::Null);
}

#[test]
fn invalid_config_fails_with_located_errors_on_stderr() {
    let ws = workspace("name: demo\ngrnats:\n  - github\nports:\n  web: 70000\n");
    let out = moat(&["config"], ws.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = text(&out.stderr);
    assert!(
        err.contains("error: agent.yaml:2:1: unknown field \"grnats\" (did you mean \"grants\"?)"),
        "{err}"
    );
    assert!(
        err.contains("error: agent.yaml:5:8: ports.web: port 70000 is out of range (1-65535)"),
        "{err}"
    );
    assert!(err.contains(" 5 |   web: 70000\n   |        ^"), "{err}");
}

#[test]
fn both_files_is_an_error() {
    let ws = workspace("name: a\n");
    std::fs::write(ws.path().join("moat.yaml"), "name: b\n").unwrap();
    let out = moat(&["config"], ws.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("both agent.yaml and moat.yaml exist"));
}

#[test]
fn flags_merge_over_the_file() {
    let ws = workspace("name: file-name\ngrants: [github]\nenv:\n  A: file\n");
    let out = moat(
        &[
            "config",
            "--json",
            "--name",
            "cli-name",
            "--grant",
            "anthropic,ssh:github.com",
            "-e",
            "A=cli",
            "-i",
        ],
        ws.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["name"], "cli-name");
    assert_eq!(
        json["grants"],
        serde_json::json!(["github", "anthropic", "ssh:github.com"])
    );
    assert_eq!(json["env"]["A"], "cli");
    assert_eq!(json["interactive"], true);
}

#[test]
fn bad_flags_name_the_flag_and_hide_values() {
    let ws = workspace("secrets:\n  TOKEN: op://v/i/f\n");
    let out = moat(
        &["config", "--grant", "githb", "-e", "TOKEN=hunter2-secret"],
        ws.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("--grant githb: unknown grant provider \"githb\" (did you mean \"github\"?)"),
        "{err}"
    );
    assert!(err.contains("-e TOKEN:"), "{err}");
    assert!(!err.contains("hunter2-secret"), "{err}");
}

#[test]
fn missing_workspace_is_a_clear_error() {
    let out = moat(&["config", "/nonexistent/ws"], Path::new("/"));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr).trim(),
        "error: /nonexistent/ws: cannot open workspace: no such file or directory"
    );
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let out = moat(&["config", "--frobnicate"], Path::new("."));
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn repository_examples_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    for name in ["full", "minimal"] {
        let out = moat(
            &["config", root.join(name).to_str().unwrap()],
            Path::new("/"),
        );
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
    }
}

#[test]
fn a_closed_stdout_is_not_a_panic() {
    use std::process::Stdio;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/full");
    let mut child = Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(["config", root.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away at once
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.status.success(), "{err}");
}

#[test]
fn audit_says_what_a_verification_can_vouch_for() {
    use moat_core::audit::AuditWriter;
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    let log = t.path().join("log");
    let w = AuditWriter::open(&log, &home, "client").unwrap();
    for i in 0..6 {
        w.append("request", serde_json::json!({ "i": i })).unwrap();
    }
    w.close().unwrap();
    let run = |dir: &Path| {
        Command::new(env!("CARGO_BIN_EXE_moat"))
            .args(["audit", dir.to_str().unwrap()])
            .env("MOAT_HOME", &home)
            .output()
            .unwrap()
    };
    let out = run(&log);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("closed by its writer"),
        "{}",
        text(&out.stderr)
    );
    // Cut in half and its checkpoints gone, elsewhere (no witness): the
    // chain holds, and the command says that nothing is signed.
    let cut = t.path().join("cut");
    std::fs::create_dir_all(&cut).unwrap();
    let lines: Vec<String> = std::fs::read_to_string(log.join("audit.jsonl"))
        .unwrap()
        .lines()
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(cut.join("audit.jsonl"), lines[..3].concat()).unwrap();
    let out = run(&cut);
    let err = text(&out.stderr);
    assert!(err.contains("nothing in this log is signed"), "{err}");
    assert!(!err.contains("Verified"), "{err}");
}

#[test]
fn verify_bundle_says_whether_the_log_was_closed() {
    use moat_core::audit::AuditWriter;
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    let log = t.path().join("log");
    let verify = |bundle: &Path| {
        Command::new(env!("CARGO_BIN_EXE_moat"))
            .args(["verify-bundle", bundle.to_str().unwrap()])
            .env("MOAT_HOME", &home)
            .output()
            .unwrap()
    };
    // A bundle made while the log is open, past a periodic checkpoint:
    // every entry in it is signed, but later ones may exist.
    let w = AuditWriter::open(&log, &home, "client").unwrap();
    for i in 0..1000 {
        w.append("request", serde_json::json!({ "i": i })).unwrap();
    }
    let open = t.path().join("open.json");
    moat_core::audit::export_bundle(&log, &home, &open).unwrap();
    let out = verify(&open);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("not a final one"), "{err}");
    assert!(!err.contains("closed by its writer"), "{err}");
    w.close().unwrap();
    let closed = t.path().join("closed.json");
    moat_core::audit::export_bundle(&log, &home, &closed).unwrap();
    let out = verify(&closed);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("closed by its writer"), "{err}");
}

#[test]
fn a_bad_engine_is_named_with_where_it_came_from() {
    let ws = workspace("command: [\"true\"]\n");
    let home = tempfile::tempdir().unwrap();
    let run = |args: &[&str], env: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_moat"));
        cmd.args(args)
            .current_dir(ws.path())
            .env("MOAT_HOME", home.path())
            .env_remove("MOAT_RUNTIME");
        if let Some(value) = env {
            cmd.env("MOAT_RUNTIME", value);
        }
        cmd.output().unwrap()
    };
    let out = run(&["run", "--runtime", "lxc", "--image", "x"], None);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains(
            "--runtime: \"lxc\" is not a container engine moat runs on (docker or podman)"
        ),
        "{}",
        text(&out.stderr)
    );
    let out = run(&["run", "--image", "x"], Some("lxc"));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("MOAT_RUNTIME: \"lxc\" is not a container engine"),
        "{}",
        text(&out.stderr)
    );
    // runtime: in agent.yaml is checked where it is written.
    let bad = workspace("runtime: lxc\n");
    let out = moat(&["config"], bad.path());
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("agent.yaml:1:10"),
        "{}",
        text(&out.stderr)
    );
    // Nothing was created for runs that could not start.
    assert!(
        !home.path().join("runs").exists()
            || std::fs::read_dir(home.path().join("runs")).unwrap().count() == 0
    );
}

#[test]
fn a_deps_registry_that_is_not_utf8_is_refused_where_it_matters() {
    use std::os::unix::ffi::OsStrExt;
    let bad = std::ffi::OsStr::from_bytes(b"mirror\xff/library");
    let ws = workspace("dependencies: [node@20]\n");
    let with_bad = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_moat"))
            .args(args)
            .current_dir(ws.path())
            .env("MOAT_DEPS_REGISTRY", bad)
            .output()
            .expect("run moat")
    };
    for args in [
        &["deps", "list"][..],
        &["deps", "info", "node"],
        &["config"],
    ] {
        let out = with_bad(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?}: {}",
            text(&out.stderr)
        );
        let err = text(&out.stderr);
        assert!(
            err.contains("MOAT_DEPS_REGISTRY is not UTF-8"),
            "{args:?}: {err}"
        );
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    // A run is refused before anything starts: moat's own failure, 125.
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(["run", "--", "true"])
        .current_dir(ws.path())
        .env("MOAT_HOME", home.path())
        .env("MOAT_DEPS_REGISTRY", bad)
        .output()
        .expect("run moat");
    assert_eq!(out.status.code(), Some(125), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("MOAT_DEPS_REGISTRY is not UTF-8"),
        "{}",
        text(&out.stderr)
    );
    // A workspace without dependencies does not need the variable.
    let plain = workspace("name: plain\n");
    let out = Command::new(env!("CARGO_BIN_EXE_moat"))
        .arg("config")
        .current_dir(plain.path())
        .env("MOAT_DEPS_REGISTRY", bad)
        .output()
        .expect("run moat");
    assert!(out.status.success(), "{}", text(&out.stderr));
}
