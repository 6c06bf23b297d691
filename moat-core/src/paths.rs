//! Where moat keeps its files: `$MOAT_HOME`, else `~/.moat`.

use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};

/// The moat home directory: `$MOAT_HOME` when set and not empty, else
/// `$HOME/.moat`.
pub fn moat_home() -> Result<PathBuf> {
    if let Some(home) = std::env::var_os("MOAT_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(home));
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".moat")),
        None => Err(Error::new(
            ErrorKind::InvalidArgument,
            "cannot find the moat home directory: set MOAT_HOME or HOME",
        )),
    }
}

/// The moat home a caller gave, else the default ([`moat_home`]): an empty
/// path is none given (as an empty `MOAT_HOME` is), and a relative one is
/// made absolute now, so that the files under it (the CA bundle a child
/// process is pointed at) mean the same from any directory.
pub fn home_or_default(home: Option<&Path>) -> Result<PathBuf> {
    let home = match home.filter(|h| !h.as_os_str().is_empty()) {
        Some(h) => h.to_path_buf(),
        None => moat_home()?,
    };
    if home.is_absolute() {
        return Ok(home);
    }
    std::env::current_dir()
        .map(|cwd| cwd.join(&home))
        .map_err(|e| Error::io(&home, "make absolute (the current directory is unknown)", e))
}

/// Creates `dir` (and its missing parents, all 0700) and makes it private
/// (0700).
pub(crate) fn private_dir(dir: &Path) -> Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .map_err(|e| Error::io(dir, "create directory", e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(dir, "set permissions of", e))?;
    }
    Ok(())
}

/// Space set aside in a run's directory when it is created and given back
/// when the run ends, so that a full disk cannot keep the run's last words
/// (its exit code, the audit log's final checkpoint, a note about lost
/// output) from being written.
pub(crate) const RESERVE_BYTES: usize = 256 * 1024;

/// Sets aside [`RESERVE_BYTES`] in `path` (blocks really written, not a
/// sparse file).
pub(crate) fn reserve(path: &Path) -> Result<()> {
    use std::io::Write;
    let mut file = open_private(path, Open::Truncate)?;
    // Not zeros: a file system that compresses (ZFS, btrfs) would keep none.
    let mut noise = vec![0u8; RESERVE_BYTES];
    getrandom::fill(&mut noise).map_err(|e| {
        Error::new(
            ErrorKind::Internal,
            format!("no randomness to fill {}: {e}", path.display()),
        )
    })?;
    let written = file
        .write_all(&noise)
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io(path, "write", e));
    if written.is_err() {
        let _ = std::fs::remove_file(path);
    }
    written
}

/// Is this error a full disk (or quota)?
pub fn is_disk_full(err: &Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
                return true;
            }
        }
        source = e.source();
    }
    false
}

/// How [`open_private`] opens a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Open {
    /// Created if missing; written at its end.
    Append,
    /// Created if missing, emptied if not.
    Truncate,
    /// Created if missing, left as it is (a lock file).
    Keep,
}

/// Opens `path` for writing, creating it readable and writable by its owner
/// only (0600): nothing moat writes under its home is for other users.
pub(crate) fn open_private(path: &Path, how: Open) -> Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true);
    match how {
        Open::Append => opts.append(true),
        Open::Truncate => opts.truncate(true),
        Open::Keep => opts.truncate(false),
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path).map_err(|e| Error::io(path, "open", e))
}

/// Is there nothing at `path`, not even a link? A link whose target cannot
/// be reached (a volume not mounted) is an error, not an absence: `what`
/// (a key, say) must not be replaced by a new one on a bad day.
pub(crate) fn nothing_at(path: &Path, what: &str) -> Result<bool> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(Error::io(path, "read", e)),
        Ok(m) if m.file_type().is_symlink() => match std::fs::metadata(path) {
            Ok(_) => Ok(false),
            Err(e) => {
                let target = std::fs::read_link(path)
                    .map_or_else(|_| "?".to_string(), |t| t.display().to_string());
                Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "{}: {what} is a link to {target}, which cannot be reached ({}); moat will not replace it with a new one: mount or fix what it points to",
                        path.display(),
                        crate::error::io_reason(&e)
                    ),
                ))
            }
        },
        Ok(_) => Ok(false),
    }
}

/// Writes `data` to `path` atomically (temporary file, fsync, rename) with
/// mode `mode`. The file never exists with looser permissions.
pub(crate) fn write_private(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile_in(dir, path, mode)?;
    let written = tmp
        .1
        .write_all(data)
        .and_then(|()| tmp.1.sync_all())
        .map_err(|e| Error::io(path, "write", e))
        .and_then(|()| std::fs::rename(&tmp.0, path).map_err(|e| Error::io(path, "write", e)));
    if written.is_err() {
        // A full disk, say: the old file stays as it was, and no temporary
        // file is left beside it.
        let _ = std::fs::remove_file(&tmp.0);
    }
    written
}

fn tempfile_in(dir: &Path, path: &Path, mode: u32) -> Result<(PathBuf, std::fs::File)> {
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    for attempt in 0..16u32 {
        let tmp = dir.join(format!(".{name}.{}.{attempt}.tmp", std::process::id()));
        match opts.open(&tmp) {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io(&tmp, "create", e)),
        }
    }
    Err(Error::new(
        ErrorKind::Io,
        format!("{}: cannot create a temporary file", dir.display()),
    ))
}

/// An exclusive `flock` held until dropped.
pub(crate) struct FileLock {
    _file: std::fs::File,
}

impl FileLock {
    pub(crate) fn acquire(path: &Path) -> Result<FileLock> {
        use std::os::unix::io::AsRawFd;
        let file = open_private(path, Open::Keep)?;
        // SAFETY: flock on a descriptor we own; blocks until granted.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(Error::io(path, "lock", std::io::Error::last_os_error()));
        }
        Ok(FileLock { _file: file })
    }
}

/// Makes `path` the agent's (when moat runs as root; otherwise it is the
/// host user's already, who is the agent).
pub(crate) fn give(path: &std::path::Path, uid: u32, gid: u32) -> Result<()> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        // Never through a symbolic link the agent may have put in place.
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
            .map_err(|e| Error::io(path, "give the agent's user", e))?;
    }
    Ok(())
}

/// Where an open file is now (the kernel's name for it, through
/// `/proc/self/fd`): what a check of a path opened a moment ago must look
/// at, since any directory of the path may have been swapped for a link in
/// between.
pub(crate) fn opened_path(file: &std::fs::File) -> std::io::Result<PathBuf> {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// A file's content, without following a symbolic link: `None` when there
/// is none, `Some(None)` when something other than a regular file is there.
pub(crate) fn read_no_follow(path: &std::path::Path) -> Result<Option<Option<Vec<u8>>>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, "read", e)),
        Ok(m) if !m.file_type().is_file() => return Ok(Some(None)),
        Ok(_) => {}
    }
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        // Replaced by a link since: not followed.
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(Some(None)),
        Err(e) => return Err(Error::io(path, "read", e)),
    };
    let meta = file.metadata().map_err(|e| Error::io(path, "read", e))?;
    if !meta.is_file() {
        return Ok(Some(None));
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, "read", e))?;
    Ok(Some(Some(bytes)))
}

/// Writes a file the agent may change: 0600, the agent's.
pub(crate) fn write_owned(
    path: &std::path::Path,
    content: &[u8],
    uid: u32,
    gid: u32,
) -> Result<()> {
    write_private(path, content, 0o600)?;
    give(path, uid, gid)
}
