//! The audit log on real files: the tamper matrix, crashes, one writer,
//! bundles.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
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

/// A writer closed a moment ago can still look locked: a thread that spawns
/// a child lends it the lock's descriptor until the child's exec closes it.
/// `open` waits that out instead of calling it a second writer (this failed
/// CI once, while `kill_dash_9_leaves_a_log_that_verifies` was spawning).
#[test]
fn a_lock_held_for_a_moment_is_waited_out() {
    let t = tempfile::tempdir().unwrap();
    let (dir, home) = (t.path().join("run"), t.path().join("home"));
    write(&dir, &home, 3);
    // Stand in for the child: another descriptor of the lock file, held
    // for 300 ms.
    let held = std::fs::File::open(dir.join("audit.lock")).unwrap();
    held.lock().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let releaser = std::thread::spawn(move || {
        tx.send(()).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        drop(held);
    });
    rx.recv().unwrap();
    write(&dir, &home, 2);
    releaser.join().unwrap();
    let r = audit::verify(&dir, &home, None).unwrap();
    assert!(r.ok && r.entries == 5, "{r:?}");
}

/// What `crash_child` prints once its first entry is on disk.
const CRASH_READY: &str = "moat-audit-crash-child-ready";

/// Not a test on its own: the child of `kill_dash_9_leaves_a_log_that_verifies`.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var("MOAT_AUDIT_CRASH_DIR") else {
        return;
    };
    let home = std::env::var("MOAT_AUDIT_CRASH_HOME").unwrap();
    let w = AuditWriter::open(Path::new(&dir), Path::new(&home), "crash").unwrap();
    let mut i = 0u64;
    // One entry on disk, then say so (on a line of its own: the test
    // harness prints around it); the parent kills this process after that,
    // while it appends as fast as it can.
    w.append("request", json!({"i": i, "pad": "x".repeat(200)}))
        .unwrap();
    i += 1;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "\n{CRASH_READY}").unwrap();
        out.flush().unwrap();
    }
    let end = std::time::Instant::now() + Duration::from_secs(20);
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
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // Once the child has an entry on disk, let it append a while, then
        // kill it in the middle of its appends (the pipe stays open until
        // the child is dead).
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = out
            .by_ref()
            .map_while(Result::ok)
            .any(|line| line.trim() == CRASH_READY);
        assert!(
            ready,
            "round {round}: the child ended before its first entry"
        );
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
    write(&dir, &home, 7); // reopened at 10, final at 17: consistency 10 -> 10 -> 17
    let bundle = t.path().join("proof.json");
    let r = audit::export_bundle(&dir, &home, &bundle).unwrap();
    let ok = audit::verify_bundle(&bundle, None).unwrap();
    assert_eq!((ok.entries, ok.checkpoints.len()), (17, 3));
    assert!(ok.closed);
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
    // A file that is no bundle, JSON or not, is an invalid argument.
    for text in ["not json", r#"{"format": "something else"}"#] {
        std::fs::write(&bad, text).unwrap();
        let e = audit::verify_bundle(&bad, None).unwrap_err();
        assert_eq!(e.kind(), moat_core::ErrorKind::InvalidArgument, "{e}");
        assert!(e.to_string().contains("not a bundle"), "{e}");
    }
    // A malformed expected key is an invalid argument, as for `verify`.
    let e = audit::verify_bundle(&bundle, Some("moat+nothex+%%%")).unwrap_err();
    assert_eq!(e.kind(), moat_core::ErrorKind::InvalidArgument, "{e}");
    assert!(e.to_string().contains("is not a moat verifier key"), "{e}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let p0 = v["inclusion"][3]["proof"][0].as_str().unwrap().to_string();
    let e = mutate(&p0, &"0".repeat(64));
    assert!(
        e.contains("does not verify") || e.contains("only grow"),
        "{e}"
    );
    // A proof hash of 64 bytes that are not 64 hex digits (a character of
    // two bytes at an odd place) does not verify: it does not panic.
    let crafted = format!("a\u{e9}{}", "0".repeat(61));
    assert_eq!(crafted.len(), 64);
    let e = mutate(&p0, &crafted);
    assert!(
        e.contains("does not verify") || e.contains("only grow") || e.contains("not"),
        "{e}"
    );
}

#[test]
fn a_checkpoint_line_cut_inside_a_character_loses_nothing_and_is_not_continued() {
    // A full disk (or a crash) cut the last checkpoint's line inside a
    // character of more than one byte.
    let t = tempfile::tempdir().unwrap();
    let (dir, home) = (t.path().join("run"), t.path().join("home"));
    write(&dir, &home, 10);
    let signed = audit::verify(&dir, &home, None).unwrap().checkpoints.len();
    assert!(signed > 0);
    let cps = dir.join("checkpoints.jsonl");
    let whole = std::fs::read(&cps).unwrap();
    let last = checkpoint_lines(&dir).last().unwrap().clone();
    let mut torn = last.as_bytes()[..last.len() / 2].to_vec();
    torn.extend_from_slice(&[0xe2, 0x80]); // the first two bytes of `—`
    std::fs::write(&cps, [whole.as_slice(), &torn].concat()).unwrap();
    // The checkpoints before it still count; the cut line is ignored.
    let r = audit::verify(&dir, &home, None).unwrap();
    assert!(r.ok, "{:?}", r.problems);
    assert_eq!(r.checkpoints.len(), signed);
    assert!(
        r.torn_tail
            .as_deref()
            .unwrap()
            .contains("checkpoints.jsonl"),
        "{:?}",
        r.torn_tail
    );
    // A writer continuing the log cuts the torn line off first: its own
    // checkpoints are not glued to it.
    write(&dir, &home, 3);
    let r = audit::verify(&dir, &home, None).unwrap();
    assert!(r.ok && r.entries == 13, "{:?}", r.problems);
    assert!(r.torn_tail.is_none(), "{:?}", r.torn_tail);
    assert!(std::fs::read(&cps).unwrap().ends_with(b"\n"));
}

#[cfg(unix)]
#[test]
fn checkpoints_that_cannot_be_read_are_a_problem_not_an_absence() {
    let t = tempfile::tempdir().unwrap();
    let (dir, home) = (t.path().join("run"), t.path().join("home"));
    write(&dir, &home, 4);
    let cps = dir.join("checkpoints.jsonl");
    std::fs::remove_file(&cps).unwrap();
    std::fs::create_dir(&cps).unwrap(); // reading it fails: a directory
    let r = audit::verify(&dir, &home, None).unwrap();
    assert!(!r.ok, "an unreadable checkpoints.jsonl verified");
    assert!(
        r.problems
            .iter()
            .any(|p| p.contains("checkpoints.jsonl: cannot read")),
        "{:?}",
        r.problems
    );
}

/// An entry chained after `lines` as a writer would make it: only a key can
/// tell it from a real one.
fn forged_after(lines: &[String], data: serde_json::Value) -> String {
    use sha2::{Digest, Sha256};
    let prev: String = Sha256::digest(lines.last().unwrap().as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let entry = json!({
        "seq": lines.len(), "time": "2026-11-29T00:00:00Z", "type": "request",
        "prev": prev, "data": data,
    });
    moat_core::audit::jcs::canonical(&entry).unwrap()
}

#[test]
fn an_entry_forged_after_the_final_checkpoint_is_detected() {
    let t = tempfile::tempdir().unwrap();
    let (dir, home) = (t.path().join("run"), t.path().join("home"));
    write(&dir, &home, 10);
    let r = audit::verify(&dir, &home, None).unwrap();
    assert!(r.ok && r.closed && r.unsigned == 0, "{r:?}");
    assert!(r.checkpoints.last().unwrap().is_final);

    let mut l = lines(&dir);
    l.push(forged_after(&l, json!({"host": "evil.example", "i": 10})));
    set_lines(&dir, &l);
    let p = first_problem(&dir, &home);
    assert!(p.contains("added after the close"), "{p}");

    // Dropping the final checkpoint does not help: moat's witness copy of
    // it, outside the run's directory, still says the log was closed.
    let cps = std::fs::read_to_string(dir.join("checkpoints.jsonl")).unwrap();
    let kept: Vec<&str> = cps.lines().collect();
    let rest: String = kept[..kept.len() - 1]
        .iter()
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(dir.join("checkpoints.jsonl"), rest).unwrap();
    let p = first_problem(&dir, &home);
    assert!(p.contains("added after the close"), "{p}");
}

#[test]
fn a_log_opened_again_after_its_close_verifies_while_open_and_closed() {
    let t = tempfile::tempdir().unwrap();
    let (dir, home) = (t.path().join("run"), t.path().join("home"));
    write(&dir, &home, 3);
    let w = AuditWriter::open(&dir, &home, "run_test").unwrap();
    for i in 0..4 {
        w.append("request", json!({"i": i})).unwrap();
    }
    // Open: the four new entries are chained but not yet signed.
    let r = audit::verify(&dir, &home, None).unwrap();
    assert!(r.ok, "{:?}", r.problems);
    assert_eq!((r.entries, r.unsigned, r.closed), (7, 4, false));
    w.close().unwrap();
    let r = audit::verify(&dir, &home, None).unwrap();
    assert!(r.ok && r.closed && r.unsigned == 0, "{r:?}");
}

#[test]
fn a_cut_log_with_no_checkpoint_says_nothing_is_signed() {
    let t = tempfile::tempdir().unwrap();
    let (dir, home) = (t.path().join("run"), t.path().join("home"));
    write(&dir, &home, 20);
    let vkey = audit::vkey_of(&audit::signing_key(&home).unwrap().verifying_key());
    // Cut in half, checkpoints gone, copied elsewhere (no witness there).
    let elsewhere = t.path().join("copy");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let l = lines(&dir);
    set_lines(&elsewhere, &l[..10]);
    let r = audit::verify(&elsewhere, &home, Some(&vkey)).unwrap();
    assert!(r.checkpoints.is_empty());
    assert_eq!((r.entries, r.unsigned, r.closed), (10, 10, false));
    // The CLI must then say that nothing is signed (moat-cli/tests/cli.rs).
}

/// The checkpoints' lines, and a setter.
fn checkpoint_lines(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("checkpoints.jsonl"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn a_copied_checkpoint_cannot_open_a_closed_log_again() {
    let t = tempfile::tempdir().unwrap();
    let (dir, home) = (t.path().join("run"), t.path().join("home"));
    write(&dir, &home, 4);
    write(&dir, &home, 3); // final@4, reopened@4, final@7
    let cps = checkpoint_lines(&dir);
    assert_eq!(cps.len(), 3);
    let r = audit::verify(&dir, &home, None).unwrap();
    assert!(r.ok && r.closed, "{:?}", r.problems);
    assert!(r.checkpoints[1].reopened && !r.checkpoints[1].is_final);
    // Forge an entry after the close, and append a copy of an older
    // checkpoint (the reopened one, or any) so that the log looks open.
    let mut l = lines(&dir);
    l.push(forged_after(&l, json!({"host": "evil.example"})));
    set_lines(&dir, &l);
    for copied in [&cps[1], &cps[0], &cps[2]] {
        let mut with = cps.clone();
        with.push(copied.clone());
        std::fs::write(dir.join("checkpoints.jsonl"), with.join("\n") + "\n").unwrap();
        // Verified elsewhere, with no witness to help: the order gives it away.
        let vkey = audit::vkey_of(&audit::signing_key(&home).unwrap().verifying_key());
        let other_home = t.path().join("elsewhere");
        let r = audit::verify(&dir, &other_home, Some(&vkey)).unwrap();
        assert!(!r.ok, "accepted a copied checkpoint: {r:?}");
        assert!(
            r.problems.iter().any(|p| p.contains("goes back")
                || p.contains("does not reopen")
                || p.contains("added after the close")),
            "{:?}",
            r.problems
        );
    }
}

#[test]
fn a_crash_while_reopening_is_not_taken_for_a_forgery() {
    let t = tempfile::tempdir().unwrap();
    let (dir, home) = (t.path().join("run"), t.path().join("home"));
    write(&dir, &home, 4);
    // The witness says "closed at 4"; keep it while the log is reopened and
    // written, as if the writer died before updating the witness.
    let witness_dir = home.join("audit").join("witness");
    let witness: Vec<(std::path::PathBuf, Vec<u8>)> = std::fs::read_dir(&witness_dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    let w = AuditWriter::open(&dir, &home, "run_test").unwrap();
    w.append("request", json!({"i": 4})).unwrap();
    for (p, b) in &witness {
        std::fs::write(p, b).unwrap();
    }
    let r = audit::verify(&dir, &home, None).unwrap();
    assert!(r.ok, "{:?}", r.problems);
    assert_eq!((r.entries, r.unsigned), (5, 1));
    drop(w);
}

/// A log that reaches its size limit is handled as a full disk: the entry
/// that would pass it fails, the writer turns unhealthy (the proxy then
/// stops injecting credentials), later entries are counted, not written,
/// and the closed log says how many, verifies and is final.
#[test]
fn a_log_at_its_size_limit_fails_closed_and_says_what_it_did_not_keep() {
    let t = tempfile::tempdir().unwrap();
    let (dir, home) = (t.path().join("run"), t.path().join("home"));
    let w = AuditWriter::open_with_limit(&dir, &home, "run_test", 4000).unwrap();
    let mut kept = 0;
    let mut refused = 0;
    for i in 0..100 {
        match w.append(
            "request",
            json!({"i": i, "url": "https://blocked.test/xxxxxxxxxxxxxxxx"}),
        ) {
            Ok(_) => kept += 1,
            Err(e) => {
                assert!(
                    e.to_string().contains("reached its limit of 4000 bytes"),
                    "{e}"
                );
                refused += 1;
            }
        }
    }
    assert!(kept > 0 && refused > 0, "{kept} kept, {refused} refused");
    assert!(w.healthy().unwrap_err().contains("reached its limit"));
    w.close().unwrap();
    let size = std::fs::metadata(dir.join("audit.jsonl")).unwrap().len();
    let r = audit::verify(&dir, &home, None).unwrap();
    assert!(r.ok && r.closed, "{:?}", r.problems);
    let last: serde_json::Value = serde_json::from_str(lines(&dir).last().unwrap()).unwrap();
    assert_eq!(last["type"], "entries_lost");
    assert_eq!(last["data"]["entries"], refused);
    // Past the limit by the closing note only.
    assert!(size < 4000 + 1000, "{size}");
}

/// A closed log opened and closed again with nothing appended stays as it
/// was (a proxy started and stopped on one audit directory added two
/// checkpoints each time, and every start verified them all); the first
/// entry after a close still comes after a `reopened` checkpoint.
#[test]
fn reopening_a_closed_log_adds_nothing_until_an_entry_follows() {
    let t = tempfile::tempdir().unwrap();
    let (dir, home) = (t.path().join("run"), t.path().join("home"));
    write(&dir, &home, 3);
    let checkpoints = || std::fs::read_to_string(dir.join("checkpoints.jsonl")).unwrap();
    let before = checkpoints();
    for _ in 0..5 {
        AuditWriter::open(&dir, &home, "run_test")
            .unwrap()
            .close()
            .unwrap();
    }
    assert_eq!(checkpoints(), before);
    let r = audit::verify(&dir, &home, None).unwrap();
    assert!(r.ok && r.closed && r.entries == 3, "{:?}", r.problems);
    write(&dir, &home, 1);
    let after = checkpoints();
    let added: Vec<&str> = after[before.len()..].lines().collect();
    assert_eq!(added.len(), 2, "{added:?}");
    assert!(
        added[0].contains("reopened") && added[1].contains("final"),
        "{added:?}"
    );
    let r = audit::verify(&dir, &home, None).unwrap();
    assert!(r.ok && r.closed && r.entries == 4, "{:?}", r.problems);
}
