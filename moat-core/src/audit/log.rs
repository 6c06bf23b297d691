//! Writing, verifying and exporting audit logs.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use base64::Engine;
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::jcs::canonical;
use super::merkle::{self, Hash};
use crate::error::{Error, ErrorKind, Result};
use crate::paths;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
const KEY_NAME: &str = "moat";
/// The most entries one commit (one fsync) takes.
const MAX_BATCH: usize = 4096;
/// A checkpoint is signed at least this often while entries arrive.
const CHECKPOINT_EVERY: u64 = 1000;
/// The most entries waiting for the writer; more make their senders wait
/// (the proxy slows to the disk's pace rather than queue without bound).
const MAX_QUEUED: usize = 16_384;
/// The most bytes of entries waiting for the writer (about: the size of
/// their JSON); an entry's path can be 64 KiB, so the count alone would let
/// a full queue hold a gigabyte. One entry bigger than this still goes, alone.
const MAX_QUEUED_BYTES: usize = 32 << 20;

/// The bytes of entries queued for the writer, and whether it is gone.
/// Senders wait while the queue holds [`MAX_QUEUED_BYTES`] (as they wait
/// while it holds [`MAX_QUEUED`] entries); the writer gives back what it
/// took off the queue.
#[derive(Debug)]
struct Budget {
    limit: usize,
    state: Mutex<(usize, bool)>,
    freed: std::sync::Condvar,
}

impl Budget {
    fn new(limit: usize) -> Budget {
        Budget {
            limit,
            state: Mutex::new((0, false)),
            freed: std::sync::Condvar::new(),
        }
    }

    /// Waits until `n` more bytes fit (or nothing is queued, or the writer
    /// is gone), then counts them.
    fn take(&self, n: usize) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        while !st.1 && st.0 > 0 && st.0.saturating_add(n) > self.limit {
            st = match self
                .freed
                .wait_timeout(st, std::time::Duration::from_millis(100))
            {
                Ok((st, _)) => st,
                Err(_) => return,
            };
        }
        st.0 = st.0.saturating_add(n);
    }

    /// `n` bytes left the queue.
    fn give(&self, n: usize) {
        if let Ok(mut st) = self.state.lock() {
            st.0 = st.0.saturating_sub(n);
        }
        self.freed.notify_all();
    }

    /// The writer is gone: nobody waits any more.
    fn close(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.1 = true;
        }
        self.freed.notify_all();
    }
}

/// About the size of `v` as JSON, without writing it.
fn approx_size(v: &Value) -> usize {
    match v {
        Value::String(s) => s.len() + 2,
        Value::Array(a) => a.iter().map(approx_size).sum::<usize>() + 2,
        Value::Object(o) => {
            o.iter()
                .map(|(k, v)| k.len() + 4 + approx_size(v))
                .sum::<usize>()
                + 2
        }
        _ => 8,
    }
}

fn hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(b.len() * 2);
    for x in b {
        out.push(char::from(DIGITS[usize::from(x >> 4)]));
        out.push(char::from(DIGITS[usize::from(x & 0xf)]));
    }
    out
}

fn bad(kind: ErrorKind, m: String) -> Error {
    Error::new(kind, m)
}

/// The audit signing key of a moat home, created on first use (0600).
pub fn signing_key(home: &Path) -> Result<SigningKey> {
    let dir = home.join("audit");
    paths::private_dir(&dir)?;
    let path = dir.join("signing.key");
    match std::fs::read(&path) {
        Ok(bytes) => {
            let seed: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
                bad(
                    ErrorKind::Config,
                    format!(
                        "{}: not an audit signing key (expected 32 bytes)",
                        path.display()
                    ),
                )
            })?;
            Ok(SigningKey::from_bytes(&seed))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A link to a volume not mounted is not a key to replace.
            paths::nothing_at(&path, "the audit signing key")?;
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed)
                .map_err(|e| bad(ErrorKind::Internal, format!("no randomness: {e}")))?;
            paths::write_private(&path, &seed, 0o600)?;
            Ok(SigningKey::from_bytes(&seed))
        }
        Err(e) => Err(Error::io(&path, "read", e)),
    }
}

fn key_hash(name: &str, key: &VerifyingKey) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([1u8]);
    h.update(key.as_bytes());
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
}

/// The C2SP verifier key string: `moat+<key hash>+<base64(0x01 || key)>`.
pub fn vkey_of(key: &VerifyingKey) -> String {
    let mut raw = vec![1u8];
    raw.extend_from_slice(key.as_bytes());
    format!(
        "{KEY_NAME}+{}+{}",
        hex(&key_hash(KEY_NAME, key)),
        B64.encode(raw)
    )
}

fn parse_vkey(vkey: &str) -> Result<VerifyingKey> {
    let fail = || {
        bad(
            ErrorKind::InvalidArgument,
            format!("\"{vkey}\" is not a moat verifier key (moat+<hash>+<base64>)"),
        )
    };
    let mut parts = vkey.trim().splitn(3, '+');
    let (Some(_name), Some(_hash), Some(b64)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(fail());
    };
    let raw = B64.decode(b64).map_err(|_| fail())?;
    if raw.len() != 33 || raw[0] != 1 {
        return Err(fail());
    }
    let bytes: [u8; 32] = raw[1..].try_into().map_err(|_| fail())?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| fail())
}

/// A signed checkpoint, parsed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Checkpoint {
    /// The log's origin line (`moat/<run>`).
    pub origin: String,
    /// Tree size.
    pub size: u64,
    /// Tree head (hex).
    pub root: String,
    /// When it was signed.
    pub time: String,
    /// Signed when the log was closed: no entry may follow it (unless the
    /// log was opened again, which signs a checkpoint that is not final).
    #[serde(rename = "final")]
    pub is_final: bool,
    /// Signed when a closed log was opened again: it follows a final
    /// checkpoint of the same size, and entries may follow it.
    pub reopened: bool,
    /// The whole signed note.
    pub note: String,
}

fn sign_checkpoint(
    key: &SigningKey,
    origin: &str,
    size: u64,
    root: &Hash,
    time: &str,
    why: Signing,
) -> String {
    let mut body = format!("{origin}\n{size}\n{}\ntime {time}\n", B64.encode(root));
    match why {
        Signing::Final => body.push_str("final\n"),
        Signing::Reopened => body.push_str("reopened\n"),
        Signing::Periodic => {}
    }
    let sig = key.sign(body.as_bytes());
    let mut blob = key_hash(KEY_NAME, &key.verifying_key()).to_vec();
    blob.extend_from_slice(&sig.to_bytes());
    format!("{body}\n\u{2014} {KEY_NAME} {}\n", B64.encode(blob))
}

/// Parses a signed note and checks its signature with `key`.
fn open_checkpoint(note: &str, key: &VerifyingKey) -> std::result::Result<Checkpoint, String> {
    let (body, sigs) = note
        .split_once("\n\n")
        .ok_or("not a signed note (no blank line)")?;
    let body = format!("{body}\n");
    let want = key_hash(KEY_NAME, key);
    let mut verified = false;
    for line in sigs.lines() {
        let Some(rest) = line.strip_prefix("\u{2014} ") else {
            continue;
        };
        let Some((name, b64)) = rest.split_once(' ') else {
            continue;
        };
        let Ok(blob) = B64.decode(b64) else { continue };
        if name != KEY_NAME || blob.len() != 68 || blob[..4] != want {
            continue;
        }
        let Ok(sig) = ed25519_dalek::Signature::from_slice(&blob[4..]) else {
            continue;
        };
        if key.verify(body.as_bytes(), &sig).is_ok() {
            verified = true;
        }
    }
    if !verified {
        return Err("no valid signature by the expected key".into());
    }
    let mut lines = body.lines();
    let origin = lines.next().ok_or("no origin")?.to_string();
    let size = lines
        .next()
        .and_then(|l| l.parse().ok())
        .ok_or("bad size line")?;
    let root = lines
        .next()
        .and_then(|l| B64.decode(l).ok())
        .filter(|r| r.len() == 32)
        .ok_or("bad root line")?;
    let extensions: Vec<&str> = lines.collect();
    let time = extensions
        .iter()
        .find_map(|l| l.strip_prefix("time "))
        .unwrap_or("")
        .to_string();
    Ok(Checkpoint {
        origin,
        size,
        root: hex(&root),
        time,
        is_final: extensions.contains(&"final"),
        reopened: extensions.contains(&"reopened"),
        note: note.to_string(),
    })
}

/// Where moat keeps the latest checkpoint of the log in `dir`: keyed by the
/// log's directory, so neither another log nor an older copy of this one can
/// stand in for it.
fn witness_path(home: &Path, dir: &Path) -> PathBuf {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    home.join("audit").join("witness").join(format!(
        "{}.note",
        hex(&Sha256::digest(dir.to_string_lossy().as_bytes())[..16])
    ))
}

enum Msg {
    Entry(
        Value,
        Option<mpsc::Sender<std::result::Result<u64, String>>>,
        /// Its bytes in the [`Budget`].
        usize,
    ),
    Close(mpsc::Sender<std::result::Result<(), String>>),
}

impl Msg {
    /// Its bytes in the [`Budget`].
    fn size(&self) -> usize {
        match self {
            Msg::Entry(_, _, size) => *size,
            Msg::Close(_) => 0,
        }
    }
}

/// The one writer of a log. Appends are committed in groups (one fsync per
/// 10 ms window); a checkpoint is signed every 1000 entries and on close.
/// If the log cannot be written, [`AuditWriter::healthy`] turns false and
/// stays false: the proxy then stops injecting credentials.
pub struct AuditWriter {
    tx: mpsc::SyncSender<Msg>,
    budget: Arc<Budget>,
    failed: Arc<Mutex<Option<String>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for AuditWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditWriter").finish_non_exhaustive()
    }
}

struct State {
    dir: PathBuf,
    home: PathBuf,
    origin: String,
    key: SigningKey,
    file: File,
    checkpoints: File,
    /// The tree's right edge: the writer needs only the head.
    tree: merkle::Frontier,
    prev: Hash,
    last_checkpoint: u64,
    /// Bytes of `audit.jsonl` on disk and part of the log.
    committed: u64,
    /// The most bytes `audit.jsonl` grows to ([`AUDIT_LIMIT`]).
    limit: u64,
    /// A closed log was opened again and nothing appended yet: its
    /// `reopened` checkpoint is signed before the first new entry, and a
    /// close with none leaves the log as it was (a proxy started and
    /// stopped on one audit directory, over and over, would add two
    /// checkpoints a time, each verified at every later start).
    reopen_pending: bool,
    _lock: File,
}

/// The most bytes one audit log grows to. Past it the log is treated as a
/// full disk would be: the entries that follow are counted, not written,
/// the proxy stops injecting credentials, and the final note and checkpoint
/// say so. (An agent's refused requests, each audited, would otherwise fill
/// the host's disk.)
pub const AUDIT_LIMIT: u64 = 1 << 30;

/// Why a checkpoint is signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signing {
    /// Entries came since the last one (skipped when none did).
    Periodic,
    /// A closed log was opened again: entries may follow its final one.
    Reopened,
    /// The log is closed: no entry may follow.
    Final,
}

/// Cuts `file` back to the end of its last complete line: what a crash or
/// a full disk left half written is not continued.
fn cut_torn_line(file: &File, path: &Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let len = file
        .metadata()
        .map_err(|e| Error::io(path, "read", e))?
        .len();
    if len == 0 {
        return Ok(());
    }
    // A checkpoint's line is a few hundred bytes: the last complete one
    // ends within the last few KiB, or the file holds no complete line.
    let tail = len.min(64 * 1024);
    let mut buf = vec![0u8; tail as usize];
    // `file` appends, and cannot be read.
    let mut reader = File::open(path).map_err(|e| Error::io(path, "open", e))?;
    reader
        .seek(SeekFrom::Start(len - tail))
        .and_then(|_| reader.read_exact(&mut buf))
        .map_err(|e| Error::io(path, "read", e))?;
    if buf.last() == Some(&b'\n') {
        return Ok(());
    }
    let keep = match buf.iter().rposition(|b| *b == b'\n') {
        Some(i) => len - tail + i as u64 + 1,
        None if tail == len => 0,
        None => return Ok(()),
    };
    file.set_len(keep)
        .map_err(|e| Error::io(path, "truncate", e))
}

impl State {
    /// Signs a checkpoint of the whole log.
    fn checkpoint(&mut self, why: Signing) -> std::result::Result<(), String> {
        let size = self.tree.len();
        if why == Signing::Periodic && size == self.last_checkpoint && size > 0 {
            return Ok(());
        }
        let root = self.tree.root();
        let note = sign_checkpoint(
            &self.key,
            &self.origin,
            size,
            &root,
            &crate::trace::now_rfc3339(),
            why,
        );
        let line = format!("{}\n", serde_json::json!({ "note": note }));
        let before = self.checkpoints.metadata().map(|m| m.len());
        let written = self
            .checkpoints
            .write_all(line.as_bytes())
            .and_then(|()| self.checkpoints.sync_data());
        if let Err(e) = written {
            // A part written (a full disk stops at a block's edge) is cut
            // off again: the next checkpoint must not be glued to it.
            if let Ok(len) = before {
                let _ = self.checkpoints.set_len(len);
            }
            return Err(format!(
                "cannot write {}: {e}",
                self.dir.join("checkpoints.jsonl").display()
            ));
        }
        let witness = witness_path(&self.home, &self.dir);
        if let Some(parent) = witness.parent() {
            paths::private_dir(parent).map_err(|e| e.to_string())?;
        }
        paths::write_private(&witness, note.as_bytes(), 0o600).map_err(|e| e.to_string())?;
        self.last_checkpoint = size;
        Ok(())
    }
}

/// How long `open` waits for the writer's lock before it says another writer
/// holds it. A process that forks (any thread spawning a child) lends the
/// child its descriptors until the child's exec closes them, and an `flock`
/// belongs to the descriptor, so a writer closed a moment ago can look held
/// for that moment; a real second writer holds it for its whole life.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Takes the exclusive lock of a log's one writer, waiting out `LOCK_WAIT`.
fn take_writer_lock(lock: &File, lock_path: &Path, dir: &Path) -> Result<()> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match lock.try_lock() {
            Ok(()) => return Ok(()),
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(lock_path, "lock", e)),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(bad(
                    ErrorKind::InvalidArgument,
                    format!(
                        "{}: the audit log already has a writer (one writer per log)",
                        dir.display()
                    ),
                ))
            }
        }
    }
}

impl AuditWriter {
    /// Opens (or continues) the log in `dir` with origin `moat/<name>`. Fails
    /// when another writer holds the log (after waiting up to 2 s for it).
    pub fn open(dir: &Path, home: &Path, name: &str) -> Result<AuditWriter> {
        Self::open_with_limit(dir, home, name, AUDIT_LIMIT)
    }

    /// [`AuditWriter::open`], with `audit.jsonl` bounded at `limit` bytes.
    pub fn open_with_limit(dir: &Path, home: &Path, name: &str, limit: u64) -> Result<AuditWriter> {
        paths::private_dir(dir)?;
        let lock_path = dir.join("audit.lock");
        let lock = paths::open_private(&lock_path, paths::Open::Keep)?;
        take_writer_lock(&lock, &lock_path, dir)?;
        let key = signing_key(home)?;
        // Continue an existing log from its last complete entry.
        let report = require_ok(
            verify_with(dir, home, &key.verifying_key())?,
            dir,
            "cannot continue a log that does not verify",
        )?;
        let log_path = dir.join("audit.jsonl");
        if let Some(valid) = report.valid_bytes {
            // Drop a torn tail before appending.
            let f = OpenOptions::new()
                .write(true)
                .open(&log_path)
                .map_err(|e| Error::io(&log_path, "open", e))?;
            f.set_len(valid)
                .map_err(|e| Error::io(&log_path, "truncate", e))?;
        }
        let open = |p: &Path| paths::open_private(p, paths::Open::Append);
        let file = open(&log_path)?;
        let checkpoints = open(&dir.join("checkpoints.jsonl"))?;
        cut_torn_line(&checkpoints, &dir.join("checkpoints.jsonl"))?;
        let committed = file
            .metadata()
            .map_err(|e| Error::io(&log_path, "read", e))?
            .len();
        let mut state = State {
            file,
            committed,
            limit,
            reopen_pending: false,
            checkpoints,
            dir: dir.to_path_buf(),
            home: home.to_path_buf(),
            origin: format!("moat/{name}"),
            key,
            tree: merkle::Frontier::from(&report.tree),
            prev: report.last_hash,
            last_checkpoint: report.checkpoints.last().map_or(0, |c| c.size),
            _lock: lock,
        };
        // Opened again after it was closed: before any entry follows, a
        // checkpoint that is not final says so, so the entries that follow
        // are not taken for ones forged after the close.
        state.reopen_pending = report.checkpoints.last().is_some_and(|c| c.is_final);
        let (tx, rx) = mpsc::sync_channel(MAX_QUEUED);
        let failed: Arc<Mutex<Option<String>>> = Arc::default();
        let thread_failed = failed.clone();
        let budget = Arc::new(Budget::new(MAX_QUEUED_BYTES));
        let thread_budget = budget.clone();
        let thread = std::thread::Builder::new()
            .name("moat-audit".into())
            .spawn(move || writer_loop(state, rx, thread_failed, &thread_budget))
            .map_err(|e| {
                bad(
                    ErrorKind::Internal,
                    format!("cannot start the audit writer: {e}"),
                )
            })?;
        Ok(AuditWriter {
            tx,
            budget,
            failed,
            thread: Mutex::new(Some(thread)),
        })
    }

    fn send(&self, msg: Msg) -> Result<()> {
        let size = msg.size();
        self.budget.take(size);
        self.tx.send(msg).map_err(|_| {
            self.budget.give(size);
            bad(ErrorKind::Io, "the audit writer has stopped".into())
        })
    }

    /// An entry for the queue, its size counted.
    fn entry(
        kind: &str,
        data: Value,
        ack: Option<mpsc::Sender<std::result::Result<u64, String>>>,
    ) -> Msg {
        let size = kind.len() + approx_size(&data) + 200;
        Msg::Entry(serde_json::json!({"type": kind, "data": data}), ack, size)
    }

    /// Appends an entry and waits until it is on disk; returns its sequence
    /// number.
    pub fn append(&self, kind: &str, data: Value) -> Result<u64> {
        let (ack, done) = mpsc::channel();
        self.send(Self::entry(kind, data, Some(ack)))?;
        done.recv()
            .map_err(|_| bad(ErrorKind::Io, "the audit writer has stopped".into()))?
            .map_err(|e| bad(ErrorKind::Io, e))
    }

    /// Appends an event and waits until it is on disk; its sequence number.
    pub fn record(&self, event: &crate::trace::AuditEvent) -> Result<u64> {
        let (kind, data) = event.entry();
        self.append(&kind, data)
    }

    /// Appends an entry without waiting (it is committed within 10 ms).
    pub fn append_nowait(&self, kind: &str, data: Value) {
        let _ = self.send(Self::entry(kind, data, None));
    }

    /// False once the log could not be written; then why.
    pub fn healthy(&self) -> std::result::Result<(), String> {
        match self.failed.lock().map(|f| f.clone()) {
            Ok(None) => Ok(()),
            Ok(Some(why)) => Err(why),
            Err(_) => Err("audit writer lock poisoned".into()),
        }
    }

    /// Commits what is pending, signs a final checkpoint and stops.
    pub fn close(&self) -> Result<()> {
        let (ack, done) = mpsc::channel();
        if self.send(Msg::Close(ack)).is_ok() {
            let result = done.recv().unwrap_or(Ok(()));
            if let Ok(mut t) = self.thread.lock() {
                if let Some(t) = t.take() {
                    let _ = t.join();
                }
            }
            return result.map_err(|e| bad(ErrorKind::Io, e));
        }
        Ok(())
    }
}

impl Drop for AuditWriter {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// The lines of `entries`, chained after `prev` from sequence number
/// `seq`: (line, its hash, its leaf hash, its ack and sequence number).
type Staged = (
    String,
    Hash,
    Hash,
    Option<mpsc::Sender<std::result::Result<u64, String>>>,
    u64,
);

/// The proxy's audit events go to the log (without waiting for the disk).
impl crate::trace::AuditSink for AuditWriter {
    fn event(&self, event: crate::trace::AuditEvent) {
        let (kind, data) = event.entry();
        self.append_nowait(&kind, data);
    }

    fn healthy(&self) -> std::result::Result<(), String> {
        AuditWriter::healthy(self)
    }
}

impl State {
    /// Chains and serializes `batch` without changing the log's state.
    fn stage(&self, batch: Vec<Msg>) -> Vec<Staged> {
        let mut prev = self.prev;
        let mut seq = self.tree.len();
        let mut out = Vec::new();
        for msg in batch {
            let Msg::Entry(v, ack, _) = msg else { continue };
            let entry = serde_json::json!({
                "seq": seq,
                "time": crate::trace::now_rfc3339(),
                "type": v["type"],
                "prev": hex(&prev),
                "data": v["data"],
            });
            let Some(line) = canonical(&entry) else {
                if let Some(a) = ack {
                    let _ = a.send(Err("audit data must not hold fractional numbers".into()));
                }
                continue;
            };
            prev = Sha256::digest(line.as_bytes()).into();
            let leaf = merkle::leaf_hash(line.as_bytes());
            out.push((line, prev, leaf, ack, seq));
            seq += 1;
        }
        out
    }

    /// Writes staged lines and, once they are on disk, makes them the log's.
    /// A failed write leaves no part of them behind (the file is cut back to
    /// its committed length) and the state as it was.
    fn commit(&mut self, staged: &[Staged]) -> std::result::Result<(), String> {
        if self.reopen_pending && !staged.is_empty() {
            self.checkpoint(Signing::Reopened)?;
            self.reopen_pending = false;
        }
        let mut buf = String::new();
        for (line, ..) in staged {
            buf.push_str(line);
            buf.push('\n');
        }
        if self.committed + buf.len() as u64 > self.limit {
            return Err(format!(
                "the audit log {} reached its limit of {} bytes",
                self.dir.join("audit.jsonl").display(),
                self.limit
            ));
        }
        self.commit_bytes(&buf, staged)
    }

    /// Writes `buf` (the staged lines) whatever the limit: the note that
    /// closes a log which reached it must still be written.
    fn commit_bytes(&mut self, buf: &str, staged: &[Staged]) -> std::result::Result<(), String> {
        let written = self
            .file
            .write_all(buf.as_bytes())
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            let _ = self.file.set_len(self.committed);
            return Err(format!(
                "cannot write the audit log {}: {e}",
                self.dir.join("audit.jsonl").display()
            ));
        }
        self.committed += buf.len() as u64;
        for (_, hash, leaf, ..) in staged {
            self.prev = *hash;
            self.tree.push(*leaf);
        }
        Ok(())
    }
}

fn writer_loop(
    mut st: State,
    rx: mpsc::Receiver<Msg>,
    failed: Arc<Mutex<Option<String>>>,
    budget: &Budget,
) {
    /// Nobody waits for a writer that is gone, however it went (a panic
    /// unwinds through here too).
    struct Gone<'a>(&'a Budget);
    impl Drop for Gone<'_> {
        fn drop(&mut self) {
            self.0.close();
        }
    }
    let _gone = Gone(budget);
    let fail = |why: String| {
        if let Ok(mut f) = failed.lock() {
            f.get_or_insert(why.clone());
        }
        why
    };
    // Entries that could not be written, and why the first could not.
    let mut lost: u64 = 0;
    while let Ok(first) = rx.recv() {
        // Group commit: take what is queued now (entries pile up while the
        // previous fsync runs), never waiting for more, up to a batch limit,
        // so every entry is on disk within one fsync of arriving.
        let mut batch = vec![first];
        let mut closing = None;
        while closing.is_none() && batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Msg::Close(ack)) => closing = Some(ack),
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        if let Some(Msg::Close(ack)) = batch.first() {
            closing = Some(ack.clone());
            batch.clear();
        }
        // The batch's bytes stay counted until it is written: what waits
        // and what is being written stay within the budget together.
        let taken: usize = batch.iter().map(Msg::size).sum();
        let staged = st.stage(batch);
        let broken = failed.lock().map(|f| f.clone()).unwrap_or(None);
        let result = match &broken {
            // Once the log could not be written, the proxy fails closed
            // (`healthy`); entries meanwhile are counted, not written.
            Some(why) => Err(why.clone()),
            None if staged.is_empty() => Ok(()),
            None => st.commit(&staged).map_err(&fail),
        };
        if result.is_err() {
            lost += staged.len() as u64;
        }
        if result.is_ok() && st.tree.len() >= st.last_checkpoint + CHECKPOINT_EVERY {
            if let Err(e) = st.checkpoint(Signing::Periodic) {
                fail(e);
            }
        }
        for (_, _, _, ack, seq) in staged {
            if let Some(a) = ack {
                let _ = a.send(result.clone().map(|()| seq));
            }
        }
        budget.give(taken);
        if let Some(ack) = closing {
            let _ = ack.send(close_log(&mut st, lost, &failed));
            return;
        }
    }
}

/// Closes the log: when entries were lost (a full disk), first an entry
/// saying how many and why (there may be room again: a run gives back its
/// reserve before closing), then the final checkpoint over what is on disk.
fn close_log(
    st: &mut State,
    lost: u64,
    failed: &Mutex<Option<String>>,
) -> std::result::Result<(), String> {
    let why = failed.lock().ok().and_then(|f| f.clone());
    if st.reopen_pending && lost == 0 && why.is_none() {
        // Reopened and closed with nothing new: its final checkpoint stands.
        return Ok(());
    }
    if st.reopen_pending {
        st.checkpoint(Signing::Reopened)?;
        st.reopen_pending = false;
    }
    if lost > 0 || why.is_some() {
        let note = serde_json::json!({
            "type": "entries_lost",
            "data": {
                "entries": lost,
                "error": why.clone().unwrap_or_default(),
            },
        });
        let staged = st.stage(vec![Msg::Entry(note, None, 0)]);
        let buf = staged.iter().fold(String::new(), |mut b, (line, ..)| {
            b.push_str(line);
            b.push('\n');
            b
        });
        st.commit_bytes(&buf, &staged).map_err(|e| {
            format!(
                "{lost} audit entries could not be written ({}), nor a note of it: {e}",
                why.as_deref().unwrap_or("")
            )
        })?;
    }
    st.checkpoint(Signing::Final)
}

impl Report {
    fn empty(vkey: String) -> Report {
        Report {
            ok: true,
            entries: 0,
            types: Vec::new(),
            first_time: None,
            last_time: None,
            checkpoints: Vec::new(),
            vkey,
            root: String::new(),
            torn_tail: None,
            unsigned: 0,
            closed: false,
            problems: Vec::new(),
            tree: merkle::Tree::new(),
            last_hash: [0u8; 32],
            valid_bytes: None,
            lines: Vec::new(),
        }
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Everything checked out (a torn tail alone does not fail it).
    pub ok: bool,
    /// Complete entries.
    pub entries: u64,
    /// Entry types and counts, in first-seen order.
    pub types: Vec<(String, u64)>,
    /// Time of the first and last entry.
    pub first_time: Option<String>,
    /// Time of the last entry.
    pub last_time: Option<String>,
    /// Verified checkpoints.
    pub checkpoints: Vec<Checkpoint>,
    /// The verifier key used.
    pub vkey: String,
    /// The tree head over all entries (hex).
    pub root: String,
    /// A torn last line (a crash while writing), reported, not hidden.
    pub torn_tail: Option<String>,
    /// Entries past the last signed checkpoint: the chain links them, but no
    /// signature covers them, so a cut or rewrite there would not show. All
    /// of them when there is no checkpoint at all.
    pub unsigned: u64,
    /// The last checkpoint is final and covers every entry: the log was
    /// closed by its writer.
    pub closed: bool,
    /// Every problem, the first bad entry first.
    pub problems: Vec<String>,
    #[serde(skip)]
    tree: merkle::Tree,
    #[serde(skip)]
    last_hash: Hash,
    #[serde(skip)]
    valid_bytes: Option<u64>,
    #[serde(skip)]
    lines: Vec<String>,
}

/// The report, or a `Config` error listing its problems.
fn require_ok(report: Report, dir: &Path, what: &str) -> Result<Report> {
    if report.ok {
        return Ok(report);
    }
    Err(bad(
        ErrorKind::Config,
        format!("{}: {what}: {}", dir.display(), report.problems.join("; ")),
    ))
}

/// Verifies the log in `dir`: every entry canonical and chained, the tree,
/// every checkpoint's signature and root, the witness copy of the latest
/// checkpoint. `vkey` overrides the key of `home`.
pub fn verify(dir: &Path, home: &Path, vkey: Option<&str>) -> Result<Report> {
    let log_path = dir.join("audit.jsonl");
    if !log_path.exists() {
        return Err(bad(
            ErrorKind::Io,
            format!(
                "{}: no audit log here (audit.jsonl is missing)",
                dir.display()
            ),
        ));
    }
    let key = match vkey {
        Some(v) => parse_vkey(v)?,
        None => {
            // Verifying never creates a key: without one, nothing here signed.
            if !home.join("audit").join("signing.key").exists() {
                return Err(bad(
                    ErrorKind::Config,
                    format!(
                        "no audit signing key in {}: this host signed no logs; verify with the verifier key you trust (`--key`; the key argument in Python and C)",
                        home.join("audit").display()
                    ),
                ));
            }
            signing_key(home)?.verifying_key()
        }
    };
    verify_with(dir, home, &key)
}

/// [`verify`] with a known key, for a log that may not exist yet (a writer
/// continuing or starting it).
fn verify_with(dir: &Path, home: &Path, key: &VerifyingKey) -> Result<Report> {
    let key = *key;
    let log_path = dir.join("audit.jsonl");
    let data = match std::fs::read(&log_path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::io(&log_path, "read", e)),
    };
    let mut r = Report::empty(vkey_of(&key));
    // Split into complete lines; a last line without its newline is torn.
    let mut lines_at: Vec<&[u8]> = Vec::new();
    let mut offset = 0usize;
    while offset < data.len() {
        match data[offset..].iter().position(|b| *b == b'\n') {
            Some(nl) => {
                lines_at.push(&data[offset..offset + nl]);
                offset += nl + 1;
            }
            None => {
                r.torn_tail = Some(format!(
                    "the last {} bytes (after entry {}) are an incomplete entry, left by a crash while writing; they are ignored",
                    data.len() - offset,
                    lines_at.len()
                ));
                r.valid_bytes = Some(offset as u64);
                break;
            }
        }
    }
    // Parse, check the form and hash every line on every core; then walk the
    // chain in order.
    let line_count = lines_at.len() as u64;
    for (seq, item) in parse_all(&lines_at).into_iter().enumerate() {
        let seq = seq as u64;
        match item.and_then(|p| chain_check(p, seq, &r.last_hash)) {
            Ok(p) => {
                if r.first_time.is_none() {
                    r.first_time = Some(p.time.clone());
                }
                r.last_time = Some(p.time);
                match r.types.iter_mut().find(|(t, _)| *t == p.kind) {
                    Some((_, n)) => *n += 1,
                    None => r.types.push((p.kind, 1)),
                }
                r.last_hash = p.hash;
                r.tree.push(p.leaf);
                r.lines.push(p.line);
                r.entries += 1;
            }
            Err(why) => {
                r.ok = false;
                r.problems
                    .push(format!("entry {seq} (line {}): {why}", seq + 1));
                break;
            }
        }
    }
    let bad_entry = !r.problems.is_empty();
    r.root = hex(&r.tree.root(r.tree.len()));
    // Checkpoints.
    let cp_path = dir.join("checkpoints.jsonl");
    // Bytes, not text: a line cut in the middle of a character must not
    // make the whole file unreadable (and so, its checkpoints absent).
    let cps = match std::fs::read(&cp_path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => {
            r.ok = false;
            r.problems.push(format!(
                "{}: cannot read: {}",
                cp_path.display(),
                crate::error::io_reason(&e)
            ));
            String::new()
        }
    };
    for (i, line) in cps.lines().enumerate() {
        let note = serde_json::from_str::<Value>(line)
            .ok()
            .and_then(|v| v["note"].as_str().map(str::to_string));
        let Some(note) = note else {
            if i + 1 == cps.lines().count() && !cps.ends_with('\n') {
                let note = "checkpoints.jsonl ends in an incomplete line, left by a crash while writing; it is ignored";
                r.torn_tail = Some(match r.torn_tail.take() {
                    Some(t) => format!("{t}; {note}"),
                    None => note.to_string(),
                });
                continue;
            }
            r.ok = false;
            r.problems
                .push(format!("checkpoint {} is not a note", i + 1));
            continue;
        };
        match open_checkpoint(&note, &key) {
            Ok(cp) => {
                if bad_entry {
                    // The entries are already known to be bad; checkpoints
                    // past the first bad entry cannot be checked.
                } else if cp.size > line_count {
                    r.ok = false;
                    r.problems.push(format!(
                        "the log is cut: checkpoint {} signs {} entries but the log has {}",
                        i + 1,
                        cp.size,
                        line_count
                    ));
                } else if hex(&r.tree.root(cp.size as usize)) != cp.root {
                    r.ok = false;
                    r.problems.push(format!(
                        "checkpoint {} (size {}) does not match the entries: an entry before {} was changed, inserted, deleted or reordered",
                        i + 1,
                        cp.size,
                        cp.size
                    ));
                }
                r.checkpoints.push(cp);
            }
            Err(why) => {
                r.ok = false;
                r.problems.push(format!("checkpoint {}: {why}", i + 1));
            }
        }
    }
    // The witness: the latest checkpoint moat signed for the log in this
    // directory, kept outside it.
    let witness = match std::fs::read(witness_path(home, dir)) {
        Ok(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            r.ok = false;
            r.problems.push(format!(
                "{}: cannot read moat's record of this log's last checkpoint: {}",
                witness_path(home, dir).display(),
                crate::error::io_reason(&e)
            ));
            None
        }
    };
    if let Some(note) = witness {
        if let Ok(w) = open_checkpoint(&note, &key) {
            let ok = w.size <= r.entries && hex(&r.tree.root(w.size as usize)) == w.root;
            if !ok && !bad_entry {
                r.ok = false;
                r.problems.push(format!(
                    "this log is older than, or differs from, the one moat signed last here (size {} at {}): a log was swapped in or cut",
                    w.size, w.time
                ));
            } else if w.is_final
                && r.entries > w.size
                && !bad_entry
                && !r
                    .checkpoints
                    .iter()
                    .any(|c| c.reopened && c.size == w.size && later(&c.time, &w.time))
            {
                r.ok = false;
                r.problems.push(format!(
                    "{} entries follow the final checkpoint moat signed here when the log was closed (size {} at {}): they were added after the close",
                    r.entries - w.size,
                    w.size,
                    w.time
                ));
            }
        }
    }
    if !bad_entry {
        r.problems.extend(order_problems(&r.checkpoints));
        r.ok &= r.problems.is_empty();
    }
    let signed = r.checkpoints.iter().map(|c| c.size).max().unwrap_or(0);
    r.unsigned = r.entries.saturating_sub(signed);
    if let Some(last) = r.checkpoints.last() {
        if last.is_final && r.entries > last.size && !bad_entry {
            r.ok = false;
            r.problems.push(format!(
                "{} entries follow the final checkpoint (size {} at {}), which closed the log: they were added after the close",
                r.entries - last.size,
                last.size,
                last.time
            ));
        }
        r.closed = last.is_final && r.entries == last.size;
    }
    Ok(r)
}

/// Is RFC 3339 time `a` later than `b`? (Parsed: the texts need not have
/// as many digits.)
fn later(a: &str, b: &str) -> bool {
    use time::format_description::well_known::Rfc3339;
    match (
        time::OffsetDateTime::parse(a, &Rfc3339),
        time::OffsetDateTime::parse(b, &Rfc3339),
    ) {
        (Ok(a), Ok(b)) => a > b,
        _ => false,
    }
}

/// What is wrong with the order of a log's checkpoints: one origin; sizes
/// and times never going back; after a final checkpoint, only one that
/// reopened the log at the same size; nothing repeated.
fn order_problems(cps: &[Checkpoint]) -> Vec<String> {
    let mut problems = Vec::new();
    if cps.first().is_some_and(|c| c.reopened) {
        problems.push("checkpoint 1 reopens a log that was not closed".to_string());
    }
    for (i, pair) in cps.windows(2).enumerate() {
        let (a, b) = (&pair[0], &pair[1]);
        let n = i + 2;
        if b.origin != a.origin {
            problems.push(format!(
                "checkpoint {n} is of another log ({}, not {})",
                b.origin, a.origin
            ));
        }
        if b.size < a.size || later(&a.time, &b.time) || a.note == b.note {
            problems.push(format!(
                "checkpoint {n} (size {} at {}) goes back from the one before it (size {} at {}): checkpoints were copied or reordered",
                b.size, b.time, a.size, a.time
            ));
        }
        if a.is_final && !(b.reopened && b.size == a.size) {
            problems.push(format!(
                "checkpoint {n} follows the final checkpoint {} but does not reopen the log at its size",
                n - 1
            ));
        }
        if b.reopened && !a.is_final {
            problems.push(format!("checkpoint {n} reopens a log that was not closed"));
        }
    }
    problems
}

/// A line, parsed and hashed (independently of the others).
struct Parsed {
    line: String,
    seq: Option<u64>,
    prev: String,
    kind: String,
    time: String,
    hash: Hash,
    leaf: Hash,
}

fn parse_line(bytes: &[u8]) -> std::result::Result<Parsed, String> {
    let line = std::str::from_utf8(bytes).map_err(|_| "not utf-8".to_string())?;
    // The fast path: a line already canonical is checked in one pass; any
    // other goes the slow way, which says what is wrong with it.
    if let Some(top) = super::jcs::check_canonical(line) {
        return Ok(Parsed {
            line: line.to_string(),
            seq: top.seq,
            prev: top.prev.unwrap_or_default(),
            kind: top.kind.ok_or("no type")?,
            time: top.time.ok_or("no time")?,
            hash: Sha256::digest(bytes).into(),
            leaf: merkle::leaf_hash(bytes),
        });
    }
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not json ({e})"))?;
    if canonical(&v).as_deref() != Some(line) {
        return Err("not in canonical form (a changed byte?)".into());
    }
    Ok(Parsed {
        line: line.to_string(),
        seq: v["seq"].as_u64(),
        prev: v["prev"].as_str().unwrap_or("").to_string(),
        kind: v["type"].as_str().ok_or("no type")?.to_string(),
        time: v["time"].as_str().ok_or("no time")?.to_string(),
        hash: Sha256::digest(bytes).into(),
        leaf: merkle::leaf_hash(bytes),
    })
}

/// Parses every line, using every core.
fn parse_all(lines: &[&[u8]]) -> Vec<std::result::Result<Parsed, String>> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    if workers < 2 || lines.len() < 4096 {
        return lines.iter().map(|l| parse_line(l)).collect();
    }
    let chunk = lines.len().div_ceil(workers);
    std::thread::scope(|scope| {
        let handles: Vec<_> = lines
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(|l| parse_line(l)).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

fn chain_check(p: Parsed, seq: u64, prev: &Hash) -> std::result::Result<Parsed, String> {
    if p.seq != Some(seq) {
        return Err(format!(
            "sequence number {} where {seq} belongs (inserted, deleted or reordered)",
            p.seq.map_or("missing".to_string(), |s| s.to_string())
        ));
    }
    if p.prev != hex(prev) {
        return Err(match seq {
            0 => "its prev hash is not the first entry's (zeros): entries before it were deleted".into(),
            _ => format!(
                "its prev hash does not match entry {}: entry {} was changed, or entries were inserted, deleted or reordered here",
                seq - 1,
                seq - 1
            ),
        });
    }
    Ok(p)
}

fn check_line(
    bytes: &[u8],
    seq: u64,
    prev: &Hash,
) -> std::result::Result<(String, String, String), String> {
    let p = chain_check(parse_line(bytes)?, seq, prev)?;
    Ok((p.line, p.kind, p.time))
}

fn unhex(s: &str) -> Option<Hash> {
    // Bytes, not string slices: a multibyte character in a crafted proof
    // must read as not hex, not split a character.
    let s = s.as_bytes();
    if s.len() != 64 || !s.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let v: Option<Vec<u8>> = s
        .chunks(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
        })
        .collect();
    v?.try_into().ok()
}

/// Writes a self-contained proof bundle of the log in `dir`: entries,
/// checkpoints, the verifier key, an inclusion proof of every entry in the
/// last checkpoint and consistency proofs between consecutive checkpoints.
pub fn export_bundle(dir: &Path, home: &Path, out: &Path) -> Result<Report> {
    let r = require_ok(verify(dir, home, None)?, dir, "the log does not verify")?;
    let last = r.checkpoints.last().ok_or_else(|| {
        bad(
            ErrorKind::Config,
            format!("{}: the log has no signed checkpoint yet", dir.display()),
        )
    })?;
    let n = last.size as usize;
    let inclusion: Vec<Value> = (0..n)
        .map(|i| serde_json::json!({"index": i, "proof": r.tree.inclusion_proof(i, n).iter().map(|h| hex(h)).collect::<Vec<_>>()}))
        .collect();
    let consistency: Vec<Value> = r
        .checkpoints
        .windows(2)
        .map(|w| {
            serde_json::json!({"from": w[0].size, "to": w[1].size,
                "proof": r.tree.consistency_proof(w[0].size as usize, w[1].size as usize).iter().map(|h| hex(h)).collect::<Vec<_>>()})
        })
        .collect();
    let bundle = serde_json::json!({
        "format": "moat-audit-bundle/1",
        "vkey": r.vkey,
        "entries": r.lines[..n],
        "checkpoints": r.checkpoints.iter().map(|c| c.note.clone()).collect::<Vec<_>>(),
        "inclusion": inclusion,
        "consistency": consistency,
    });
    let text = serde_json::to_string_pretty(&bundle)
        .map_err(|e| bad(ErrorKind::Internal, e.to_string()))?;
    std::fs::write(out, text + "\n").map_err(|e| Error::io(out, "write", e))?;
    Ok(r)
}

/// Verifies a bundle offline. With `vkey`, its key must be that one.
pub fn verify_bundle(path: &Path, vkey: Option<&str>) -> Result<Report> {
    // A malformed expected key is the caller's mistake, whatever the bundle
    // holds (as for `verify`).
    if let Some(want) = vkey {
        parse_vkey(want)?;
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, "read", e))?;
    let b: Value = serde_json::from_str(&text).map_err(|e| {
        bad(
            ErrorKind::InvalidArgument,
            format!("{}: not a bundle ({e})", path.display()),
        )
    })?;
    let fail = |m: String| bad(ErrorKind::Config, format!("{}: {m}", path.display()));
    if b["format"] != "moat-audit-bundle/1" {
        // JSON, but no bundle: as for a file that is not JSON.
        return Err(bad(
            ErrorKind::InvalidArgument,
            format!(
                "{}: not a bundle (no \"format\": \"moat-audit-bundle/1\")",
                path.display()
            ),
        ));
    }
    let own = b["vkey"].as_str().ok_or_else(|| fail("no vkey".into()))?;
    if let Some(want) = vkey {
        if want.trim() != own {
            return Err(fail(format!(
                "the bundle's key {own} is not the expected key {}",
                want.trim()
            )));
        }
    }
    let key = parse_vkey(own)?;
    let lines: Vec<String> = b["entries"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let mut r = Report::empty(own.to_string());
    for (seq, line) in lines.iter().enumerate() {
        match check_line(line.as_bytes(), seq as u64, &r.last_hash) {
            Ok((line, kind, time)) => {
                r.first_time.get_or_insert(time.clone());
                r.last_time = Some(time);
                match r.types.iter_mut().find(|(t, _)| *t == kind) {
                    Some((_, n)) => *n += 1,
                    None => r.types.push((kind, 1)),
                }
                r.last_hash = Sha256::digest(line.as_bytes()).into();
                r.tree.push(merkle::leaf_hash(line.as_bytes()));
                r.entries += 1;
            }
            Err(why) => return Err(fail(format!("entry {seq}: {why}"))),
        }
    }
    for (i, note) in b["checkpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let cp = open_checkpoint(note.as_str().unwrap_or(""), &key)
            .map_err(|e| fail(format!("checkpoint {}: {e}", i + 1)))?;
        r.checkpoints.push(cp);
    }
    if let Some(problem) = order_problems(&r.checkpoints).into_iter().next() {
        return Err(fail(problem));
    }
    let last = r
        .checkpoints
        .last()
        .ok_or_else(|| fail("no checkpoint".into()))?
        .clone();
    if last.size != r.entries {
        return Err(fail(format!(
            "the last checkpoint signs {} entries but the bundle has {}",
            last.size, r.entries
        )));
    }
    let root = unhex(&last.root).ok_or_else(|| fail("bad root".into()))?;
    if r.tree.root(r.tree.len()) != root {
        return Err(fail("the entries do not hash to the signed root".into()));
    }
    for p in b["inclusion"].as_array().into_iter().flatten() {
        let i = p["index"].as_u64().unwrap_or(u64::MAX);
        let proof: Vec<Hash> = p["proof"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| h.as_str().and_then(unhex))
            .collect();
        let leaf = r
            .tree
            .leaf(i as usize)
            .ok_or_else(|| fail(format!("inclusion proof for missing entry {i}")))?;
        if !merkle::verify_inclusion(i, last.size, leaf, &proof, &root) {
            return Err(fail(format!(
                "the inclusion proof of entry {i} does not verify"
            )));
        }
    }
    for p in b["consistency"].as_array().into_iter().flatten() {
        let (from, to) = (
            p["from"].as_u64().unwrap_or(0),
            p["to"].as_u64().unwrap_or(0),
        );
        let find = |s: u64| {
            r.checkpoints
                .iter()
                .find(|c| c.size == s)
                .and_then(|c| unhex(&c.root))
        };
        let (Some(r1), Some(r2)) = (find(from), find(to)) else {
            return Err(fail(format!(
                "consistency proof {from}->{to} names no checkpoint"
            )));
        };
        let proof: Vec<Hash> = p["proof"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| h.as_str().and_then(unhex))
            .collect();
        if !merkle::verify_consistency(from, to, &proof, &r1, &r2) {
            return Err(fail(format!(
                "the log did not only grow between sizes {from} and {to}"
            )));
        }
    }
    r.closed = last.is_final;
    r.root = last.root;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn the_queue_is_bounded_by_bytes_and_a_big_entry_still_goes_alone() {
        let budget = Arc::new(Budget::new(1000));
        // Alone, an entry bigger than the budget goes.
        budget.take(5000);
        budget.give(5000);
        budget.take(600);
        // 600 + 600 > 1000: the second sender waits until the writer took
        // the first off the queue.
        let waiter = {
            let budget = budget.clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                budget.take(600);
                t.elapsed()
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !waiter.is_finished(),
            "the sender waits while the queue is full"
        );
        budget.give(600);
        let waited = waiter.join().unwrap();
        assert!(waited >= Duration::from_millis(250), "{waited:?}");
        // A writer that is gone makes nobody wait.
        let blocked = {
            let budget = budget.clone();
            std::thread::spawn(move || budget.take(900))
        };
        std::thread::sleep(Duration::from_millis(100));
        budget.close();
        blocked.join().unwrap();
    }

    #[test]
    fn an_entrys_size_is_about_its_json() {
        let v = serde_json::json!({"path": "/".repeat(65536), "method": "GET", "n": [1, 2]});
        let exact = v.to_string().len();
        let approx = approx_size(&v);
        assert!(
            approx >= exact && approx < exact + 100,
            "{approx} vs {exact}"
        );
    }
}
