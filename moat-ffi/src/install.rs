//! Where an installed libmoat finds its `moat` program: `../bin/moat` from
//! the directory of the file it was loaded from (`scripts/install-lib.sh`
//! installs both under one prefix), so the installed layout works without
//! `MOAT_SUPERVISOR` or `PATH`. See docs/c-and-go.md.

use std::ffi::{c_void, CStr, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The `moat` programs of libmoat's own install prefix, for
/// `Launcher::fallbacks`: `<dir>/../bin/moat` for the directory the library
/// was loaded from and, when that is a symbolic link, for its target's.
/// Empty when the library's file cannot be told (then `PATH` is searched).
pub(crate) fn supervisors() -> Vec<PathBuf> {
    let Some(file) = loaded_from() else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for lib in [Some(file.clone()), std::fs::canonicalize(&file).ok()]
        .into_iter()
        .flatten()
    {
        if let Some(dir) = lib.parent() {
            let moat = dir.join("../bin/moat");
            if !found.contains(&moat) {
                found.push(moat);
            }
        }
    }
    found
}

/// The file this code was loaded from (libmoat.so; the program itself when
/// libmoat.a was linked in), as the dynamic loader reports it.
fn loaded_from() -> Option<PathBuf> {
    let mut info = libc::Dl_info {
        dli_fname: std::ptr::null(),
        dli_fbase: std::ptr::null_mut(),
        dli_sname: std::ptr::null(),
        dli_saddr: std::ptr::null_mut(),
    };
    let anchor = supervisors as fn() -> Vec<PathBuf> as *const c_void;
    // SAFETY: `anchor` is an address in this object and `info` is a valid
    // Dl_info to fill; dladdr only reads the loader's own tables.
    if unsafe { libc::dladdr(anchor, &mut info) } == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: non-null, a NUL-terminated string owned by the loader that
    // lives as long as the object is loaded (it is copied at once).
    let name = unsafe { CStr::from_ptr(info.dli_fname) };
    let path = Path::new(OsStr::from_bytes(name.to_bytes()));
    // The program's own name may come back as it was typed (argv[0]): only
    // a path with a directory says where anything is.
    if path.parent().is_none_or(|p| p.as_os_str().is_empty()) {
        return None;
    }
    std::path::absolute(path).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_bin_moat_beside_the_library_directory() {
        // The test binary has this code linked in: the loader names it.
        let found = supervisors();
        let exe = std::env::current_exe().unwrap();
        let want = exe.parent().unwrap().join("../bin/moat");
        assert!(found.contains(&want), "{found:?} lacks {want:?}");
        assert!(found.iter().all(|p| p.ends_with("bin/moat")));
    }
}
