//! `moat promote`: a run's artifacts copied out of its directory, to
//! `$MOAT_HOME/promoted/<run-id>/` or a directory the caller names, where
//! `destroy` and `clean` (which remove `$MOAT_HOME/runs/<run-id>/`) do not
//! reach them.
//!
//! What is copied: every file of the run's directory (`run.json`,
//! `logs.jsonl`, `network.jsonl`, `audit.jsonl`, `checkpoints.jsonl`,
//! `supervisor.log`, and whatever else a run records there), but for its
//! lock, its reserve and the files that were mounted into the container
//! (`container/`: the CA bundle, `passwd`, helpers; inputs, not records).
//! Then a proof bundle of the audit log (`audit-bundle.json`, as `moat
//! audit --export` writes it), which `moat verify-bundle` checks offline,
//! and `promoted.json`: what was copied, with each file's size and SHA-256.
//!
//! Workspace changes: moat keeps no record of them. The workspace is
//! mounted read-write and the agent changes it in place; there is no
//! snapshot before or after and no copy in the run's directory, so the
//! changes are in the workspace itself (under its version control, if it
//! has one) and nothing of them is copied. `promoted.json` names the
//! workspace and says so.
//!
//! The copy is made in a temporary directory beside the destination and
//! renamed into place, so a failed promotion leaves nothing behind; every
//! file is 0600 and the directory 0700, as in the run's directory.

use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::meta::{load_meta, now, run_dir, runs_dir};
use crate::error::{Error, ErrorKind, Result};

/// What `promoted.json` says of the workspace's changes.
pub const WORKSPACE_CHANGES: &str = "not recorded: moat mounts the workspace read-write and keeps no copy or record of what the agent changed in it; the changes are in the workspace itself";

/// A file of a promoted run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PromotedFile {
    /// Its name in the promoted directory.
    pub name: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// Its SHA-256, in hex.
    pub sha256: String,
}

/// What [`promote`] did; also written as `promoted.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Promoted {
    /// `moat-promoted/1`.
    pub format: String,
    /// The run's id.
    pub run: String,
    /// The run's name.
    pub name: String,
    /// Where the artifacts are now.
    pub dir: PathBuf,
    /// When they were copied (RFC 3339).
    pub promoted_at: String,
    /// The run's workspace.
    pub workspace: PathBuf,
    /// What moat knows of the workspace's changes ([`WORKSPACE_CHANGES`]).
    pub workspace_changes: String,
    /// The files copied, the bundle among them.
    pub files: Vec<PromotedFile>,
    /// The proof bundle's file name, when one was made.
    pub bundle: Option<String>,
    /// Why there is no proof bundle (no audit log, no signed checkpoint
    /// yet, or a log that does not verify: its files are copied all the
    /// same, to be looked into).
    pub bundle_problem: Option<String>,
}

/// The proof bundle's name in a promoted directory.
pub const BUNDLE: &str = "audit-bundle.json";
/// The manifest's name in a promoted directory.
pub const MANIFEST: &str = "promoted.json";

/// Where [`promote`] puts run `id`'s artifacts by default:
/// `$MOAT_HOME/promoted/<run-id>/`.
pub fn default_dir(home: &Path, id: &str) -> PathBuf {
    home.join("promoted").join(id)
}

/// Copies the artifacts of run `id` (over: stopped or failed) to `to`, or
/// to [`default_dir`]. The destination must not exist, or be an empty
/// directory, and must not be inside `$MOAT_HOME/runs/`.
pub fn promote(home: &Path, id: &str, to: Option<&Path>) -> Result<Promoted> {
    let source = run_dir(home, id);
    let meta = load_meta(&source)?;
    if !meta.state.is_terminal() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "run {} ({}) is {}; promote it once it is over (`moat stop {}`)",
                meta.name, meta.id, meta.state, meta.id
            ),
        ));
    }
    let dest = match to {
        Some(to) => absolute(to)?,
        None => default_dir(home, id),
    };
    let runs = absolute(&runs_dir(home))?;
    if inside(&dest, &runs) {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "{}: inside {}, where `moat destroy` and `moat clean` remove runs; promote elsewhere",
                dest.display(),
                runs.display()
            ),
        ));
    }
    check_free(&dest, to.is_none(), id)?;
    let parent = dest.parent().unwrap_or(Path::new("/"));
    // Made private when moat makes it; a directory of the caller's is
    // left as it is.
    if to.is_none() || !parent.is_dir() {
        crate::paths::private_dir(parent)?;
    }
    // A staging directory made new (never one that is there already: in a
    // directory others may write, such as /tmp, it could be theirs, with
    // links in it), private, with a name nobody can guess ahead.
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let staging = parent.join(format!(
        ".{}.promoting.{}.{nonce:x}",
        dest.file_name()
            .map_or_else(|| id.into(), |n| n.to_string_lossy().into_owned()),
        std::process::id()
    ));
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(|e| Error::io(&staging, "create", e))?;
    }
    let made = fill(home, &source, &staging, &dest, &meta).and_then(|promoted| {
        // An empty directory given as the destination is replaced.
        if dest.is_dir() {
            std::fs::remove_dir(&dest).map_err(|e| Error::io(&dest, "replace", e))?;
        }
        std::fs::rename(&staging, &dest).map_err(|e| Error::io(&dest, "create", e))?;
        Ok(promoted)
    });
    if made.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    made
}

/// Copies the run's files and its proof bundle into `staging` and writes
/// the manifest; what was done.
fn fill(
    home: &Path,
    source: &Path,
    staging: &Path,
    dest: &Path,
    meta: &super::RunMeta,
) -> Result<Promoted> {
    crate::paths::private_dir(staging)?;
    // An entry that cannot be read fails the promotion: a copy that lacks
    // a file without saying so would not be the run's record.
    let mut names: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(source).map_err(|e| Error::io(source, "read", e))? {
        let entry = entry.map_err(|e| Error::io(source, "read", e))?;
        let kind = entry
            .file_type()
            .map_err(|e| Error::io(&entry.path(), "read", e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // Not records: the lock, the reserve, temporary files.
        if kind.is_file()
            && !name.starts_with('.')
            && name != "run.lock"
            && name != BUNDLE
            && name != MANIFEST
        {
            names.push(name);
        }
    }
    names.sort();
    let mut files = Vec::new();
    for name in &names {
        files.push(copy_private(&source.join(name), &staging.join(name), name)?);
    }
    let (bundle, bundle_problem) = if !source.join("audit.jsonl").is_file() {
        (None, Some("the run has no audit log".to_string()))
    } else {
        let out = staging.join(BUNDLE);
        // Created private first: the export writes into it.
        crate::paths::write_private(&out, b"", 0o600)?;
        match crate::audit::export_bundle(source, home, &out) {
            Ok(_) => {
                files.push(hash_file(&out, BUNDLE)?);
                (Some(BUNDLE.to_string()), None)
            }
            Err(e) => {
                let _ = std::fs::remove_file(&out);
                (None, Some(e.to_string()))
            }
        }
    };
    let promoted = Promoted {
        format: "moat-promoted/1".into(),
        run: meta.id.clone(),
        name: meta.name.clone(),
        dir: dest.to_path_buf(),
        promoted_at: now(),
        workspace: meta.workspace.clone(),
        workspace_changes: WORKSPACE_CHANGES.into(),
        files,
        bundle,
        bundle_problem,
    };
    let json = serde_json::to_vec_pretty(&promoted)
        .map_err(|e| Error::new(ErrorKind::Internal, format!("encoding {MANIFEST}: {e}")))?;
    crate::paths::write_private(&staging.join(MANIFEST), &json, 0o600)?;
    Ok(promoted)
}

/// Refuses a destination that holds anything (`default`: the run's own
/// place, so it was promoted before).
fn check_free(dest: &Path, default: bool, id: &str) -> Result<()> {
    let entries = match std::fs::read_dir(dest) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("{}: exists and is not a directory", dest.display()),
            ))
        }
        Err(e) => return Err(Error::io(dest, "read", e)),
    };
    if entries.count() == 0 {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::InvalidArgument,
        if default {
            format!(
                "run {id} was promoted already, to {}; remove it first, or give --to",
                dest.display()
            )
        } else {
            format!(
                "{}: not empty; promote to a new or empty directory",
                dest.display()
            )
        },
    ))
}

/// Copies `from` to a new private file `to`; its size and hash.
fn copy_private(from: &Path, to: &Path, name: &str) -> Result<PromotedFile> {
    use std::io::{Read, Write};
    let mut input = std::fs::File::open(from).map_err(|e| Error::io(from, "read", e))?;
    let mut output = crate::paths::open_private(to, crate::paths::Open::Truncate)?;
    let mut hash = Sha256::new();
    let mut bytes = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io(from, "read", e)),
        };
        output
            .write_all(&buf[..n])
            .map_err(|e| Error::io(to, "write", e))?;
        hash.update(&buf[..n]);
        bytes += n as u64;
    }
    output.sync_all().map_err(|e| Error::io(to, "write", e))?;
    Ok(PromotedFile {
        name: name.to_string(),
        bytes,
        sha256: hex(&hash.finalize()),
    })
}

fn hash_file(path: &Path, name: &str) -> Result<PromotedFile> {
    let data = std::fs::read(path).map_err(|e| Error::io(path, "read", e))?;
    Ok(PromotedFile {
        name: name.to_string(),
        bytes: data.len() as u64,
        sha256: hex(&Sha256::digest(&data)),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `path` made absolute, `..` and `.` resolved as written (the path may
/// not exist yet).
fn absolute(path: &Path) -> Result<PathBuf> {
    let path = std::path::absolute(path).map_err(|e| Error::io(path, "resolve", e))?;
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    Ok(out)
}

/// Is `path` `dir` or inside it, as written or once symbolic links in
/// what exists of both are resolved?
fn inside(path: &Path, dir: &Path) -> bool {
    if path.starts_with(dir) {
        return true;
    }
    let real = |p: &Path| -> Option<PathBuf> {
        // The longest part that exists, resolved, with the rest after it.
        let mut rest = Vec::new();
        let mut cur = p.to_path_buf();
        loop {
            if let Ok(c) = cur.canonicalize() {
                let mut c = c;
                for r in rest.iter().rev() {
                    c.push(r);
                }
                return Some(c);
            }
            rest.push(cur.file_name()?.to_os_string());
            cur = cur.parent()?.to_path_buf();
        }
    };
    match (real(path), real(dir)) {
        (Some(p), Some(d)) => p.starts_with(d),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_inside_the_runs_directory_are_recognised() {
        let tmp = tempfile::tempdir().unwrap();
        let runs = tmp.path().join("home/runs");
        std::fs::create_dir_all(&runs).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&runs, &link).unwrap();
        assert!(inside(&runs.join("run_0123456789ab/x"), &runs));
        assert!(inside(&link.join("new/dir"), &runs));
        assert!(!inside(&tmp.path().join("home/promoted/x"), &runs));
        assert_eq!(
            absolute(Path::new("/a/b/../c/./d")).unwrap(),
            PathBuf::from("/a/c/d")
        );
    }
}
