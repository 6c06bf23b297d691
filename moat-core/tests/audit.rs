//! The audit log on real files: the tamper matrix, crashes, one writer,
//! bundles.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use moat_core::audit::{self, AuditWriter};
use serde_json::json;

fn write(dir: &Path, home: &Path, n: u64) {
    let w = AuditWriter::open(dir, home, "run_test").unwrap();
    for i in 0..n {
        w.append("request", json!({"i": i, "host": "api.github.com"}))
            .unwrap();
    }
    w.close().unwrap();
}

fn lines(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("audit.jsonl"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn set_lines(dir: &Path, lines: &[String]) {
    std::fs::write(dir.join("audit.jsonl"), lines.join("\n") + "\n").unwrap();
}

fn first_problem(dir: &Path, home: &Path) -> String {
    let r = audit::verify(dir, home, None).unwrap();
    assert!(!r.ok, "tampering went unnoticed");
    r.problems[0].clone()
}

#[test]
fn a_clean_log_verifies() {
    let t = tempfile::tempdir().unwrap();
    let (dir, home) = (t.path().join("run"), t.path().join("home"));
    write(&dir, &home, 100);
    let r = audit::verify(&dir, &home, None).unwrap();
    assert!(r.ok, "{:?}", r.problems);
    assert_eq!(r.entries, 100);
    assert_eq!(r.checkpoints.last().unwrap().size, 100);
    assert_eq!(r.checkpoints.last().unwrap().origin, "moat/run_test");
    assert!(r.vkey.starts_with("moat+"));
    // Continuing a log keeps it one chain.
    write(&dir, &home, 5);
    let r = audit::verify(&dir, &home, None).unwrap();
    assert!(r.ok && r.entries == 105, "{:?}", r.problems);
}

#[test]
fn the_tamper_matrix_is_detected_and_located() {
    let t = tempfile::tempdir().unwrap();
    let (dir, home) = (t.path().join("run"), t.path().join("home"));
    write(&dir, &home, 20);
    let good = lines(&dir);

    // A changed byte in any entry.
    for k in [0usize, 7, 19] {
        let mut l = good.clone();
        l[k] = l[k].replace("api.github.com", "api.github.con");
        set_lines(&dir, &l);
        let p = first_problem(&dir, &home);
        if k == 19 {
            // The last entry has no successor: its signed checkpoint catches it.
            assert!(
                p.contains("checkpoint 1 (size 20) does not match"),
                "{k}: {p}"
            );
        } else {
            assert!(p.contains(&format!("entry {k} was changed")), "{k}: {p}");
        }
    }
    // Changed but re-canonicalized and re-chained from there on would still
    // break the signed checkpoint; a plain changed byte breaks the chain.
    let mut l = good.clone();
    l[3] = l[3].replacen("\"i\":3", "\"i\":4", 1);
    set_lines(&dir, &l);
    let p = first_problem(&dir, &home);
    assert!(
        p.contains("entry 3 was changed"),
        "the next entry's prev hash catches it: {p}"
    );

    // Inserted.
    let mut l = good.clone();
    l.insert(5, good[5].clone());
    set_lines(&dir, &l);
    assert!(first_problem(&dir, &home).starts_with("entry 6 "));
    // Deleted.
    let mut l = good.clone();
    l.remove(5);
    set_lines(&dir, &l);
    assert!(first_problem(&dir, &home).starts_with("entry 5 "));
    // Reordered.
    let mut l = good.clone();
    l.swap(8, 9);
    set_lines(&dir, &l);
    assert!(first_problem(&dir, &home).starts_with("entry 8 "));
    // A cut tail, caught by the signed checkpoint.
    set_lines(&dir, &good[..15]);
    let p = first_problem(&dir, &home);
    assert!(
        p.contains("the log is cut: checkpoint 1 signs 20 entries but the log has 15"),
        "{p}"
    );
    set_lines(&dir, &good);
    assert!(audit::verify(&dir, &home, None).unwrap().ok);
}

#[test]
fn an_older_valid_log_swapped_in_is_detected() {
    let t = tempfile::tempdir().unwrap();
    let (dir, home) = (t.path().join("run"), t.path().join("home"));
    write(&dir, &home, 10);
    let old = t.path().join("old");
    std::fs::create_dir_all(&old).unwrap();
    for f in ["audit.jsonl", "checkpoints.jsonl"] {
        std::fs::copy(dir.join(f), old.join(f)).unwrap();
    }
    write(&dir, &home, 10);
    for f in ["audit.jsonl", "checkpoints.jsonl"] {
        std::fs::copy(old.join(f), dir.join(f)).unwrap();
    }
    let p = first_problem(&dir, &home);
    assert!(p.contains("a log was swapped in"), "{p}");
}

#[test]
fn another_key_does_not_verify_the_checkpoints() {
    let t = tempfile::tempdir().unwrap();
    let (dir, home) = (t.path().join("run"), t.path().join("home"));
    write(&dir, &home, 3);
    // A home that signed nothing: refused, and verifying creates no key.
    let empty = t.path().join("empty-home");
    let err = audit::verify(&dir, &empty, None).unwrap_err();
    assert!(err.to_string().contains("no audit signing key"), "{err}");
    assert!(!empty.exists());
    // Another host's key: the checkpoints' signatures do not verify.
    let other = t.path().join("other-home");
    let other_vkey = audit::vkey_of(&audit::signing_key(&other).unwrap().verifying_key());
    let r = audit::verify(&dir, &home, Some(&other_vkey)).unwrap();
    assert!(!r.ok);
    assert!(
        r.problems[0].contains("no valid signature by the expected key"),
        "{:?}",
        r.problems
    );
    // A missing log is an error, not an empty log.
    let err = audit::verify(&t.path().join("nowhere"), &home, None).unwrap_err();
    assert!(err.to_string().contains("no audit log here"), "{err}");
}

#[test]
fn a_torn_tail_is_reported_not_hidden_and_the_writer_continues() {
    let t = tempfile::tempdir().unwrap();
    let (dir, home) = (t.path().join("run"), t.path().join("home"));
    write(&dir, &home, 5);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("audit.jsonl"))
        .unwrap();
    use std::io::Write;
    f.write_all(b"{\"data\":{\"i\":5").unwrap();
    drop(f);
    let r = audit::verify(&dir, &home, None).unwrap();
    assert!(r.ok, "{:?}", r.problems);
    assert_eq!(r.entries, 5);
    assert!(
        r.torn_tail.as_deref().unwrap().contains("incomplete entry"),
        "{:?}",
        r.torn_tail
    );
    write(&dir, &home, 2);
    let r = audit::verify(&dir, &home, None).unwrap();
    assert!(r.ok && r.entries == 7 && r.torn_tail.is_none(), "{r:?}");
}

#[test]
fn one_writer_per_log() {
    let t = tempfile::tempdir().unwrap();
    let (dir, home) = (t.path().join("run"), t.path().join("home"));
    let _w = AuditWriter::open(&dir, &home, "run_test").unwrap();
    let err = AuditWriter::open(&dir, &home, "run_test").unwrap_err();
    assert!(err.to_string().contains("already has a writer"), "{err}");
}

/// Not a test on its own: the child of `kill_dash_9_leaves_a_log_that_verifies`.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var("MOAT_AUDIT_CRASH_DIR") else {
        return;
    };
    let home = std::env::var("MOAT_AUDIT_CRASH_HOME").unwrap();
    let w = AuditWriter::open(Path::new(&dir), Path::new(&home), "crash").unwrap();
    let end = std::time::Instant::now() + Duration::from_secs(20);
    let mut i = 0u64;
    while std::time::Instant::now() < end {
        w.append_nowait("request", json!({"i": i, "pad": "x".repeat(200)}));
        i += 1;
        if i.is_multiple_of(500) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[test]
fn kill_dash_9_leaves_a_log_that_verifies() {
    let t = tempfile::tempdir().unwrap();
    let (dir, home) = (t.path().join("run"), t.path().join("home"));
    for round in 0..3 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env("MOAT_AUDIT_CRASH_DIR", &dir)
            .env("MOAT_AUDIT_CRASH_HOME", &home)
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(400 + 150 * round));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let r = audit::verify(&dir, &home, None).unwrap();
        assert!(r.ok, "round {round}: {:?}", r.problems);
        assert!(r.entries > 0, "round {round}: nothing was written");
    }
}

#[test]
fn bundles_verify_offline_and_tampering_fails() {
    let t = tempfile::tempdir().unwrap();
    let (dir, home) = (t.path().join("run"), t.path().join("home"));
    write(&dir, &home, 10);
    write(&dir, &home, 7); // a second checkpoint: consistency 10 -> 17
    let bundle = t.path().join("proof.json");
    let r = audit::export_bundle(&dir, &home, &bundle).unwrap();
    let ok = audit::verify_bundle(&bundle, None).unwrap();
    assert_eq!((ok.entries, ok.checkpoints.len()), (17, 2));
    audit::verify_bundle(&bundle, Some(&r.vkey)).unwrap();

    let text = std::fs::read_to_string(&bundle).unwrap();
    let mutate = |from: &str, to: &str| {
        let bad = t.path().join("bad.json");
        std::fs::write(&bad, text.replacen(from, to, 1)).unwrap();
        audit::verify_bundle(&bad, None)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    assert!(mutate("api.github.com", "evil.example.com").contains("entry 0"));
    // A replaced key: its signatures do not verify.
    let other = audit::vkey_of(
        &audit::signing_key(&t.path().join("other"))
            .unwrap()
            .verifying_key(),
    );
    let e = mutate(&r.vkey, &other);
    assert!(e.contains("no valid signature"), "{e}");
    // With the expected key given, any other key is refused outright.
    let bad = t.path().join("bad.json");
    std::fs::write(&bad, text.replacen(&r.vkey, &other, 1)).unwrap();
    let e = audit::verify_bundle(&bad, Some(&r.vkey))
        .unwrap_err()
        .to_string();
    assert!(e.contains("is not the expected key"), "{e}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let p0 = v["inclusion"][3]["proof"][0].as_str().unwrap().to_string();
    let e = mutate(&p0, &"0".repeat(64));
    assert!(
        e.contains("does not verify") || e.contains("only grow"),
        "{e}"
    );
}
