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

/// Creates `dir` (and its parents) and makes it private (0700).
pub(crate) fn private_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "create directory", e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(dir, "set permissions of", e))?;
    }
    Ok(())
}

/// Writes `data` to `path` atomically (temporary file, fsync, rename) with
/// mode `mode`. The file never exists with looser permissions.
pub(crate) fn write_private(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile_in(dir, path, mode)?;
    tmp.1
        .write_all(data)
        .and_then(|()| tmp.1.sync_all())
        .map_err(|e| Error::io(&tmp.0, "write", e))?;
    std::fs::rename(&tmp.0, path).map_err(|e| Error::io(path, "write", e))?;
    Ok(())
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
