//! What a run may not mount: moat's own home, the container engine's
//! socket (wherever it listens), and the kernel's file systems.

use std::path::{Path, PathBuf};

use super::RunPlan;
use crate::error::{Error, ErrorKind, Result};

/// Refuses a workspace or mount that would hand the container moat's own
/// files (the CA key, the credential store, other runs' artifacts) or the
/// container engine's socket.
/// Where tools keep the user's credentials, under the home directory:
/// never mounted, nor a directory that holds one (besides `.ssh`, checked
/// on its own).
const CREDENTIAL_STORES: &[&str] = &[
    ".claude",
    ".claude.json",
    ".aws",
    ".config/gh",
    ".config/gcloud",
    ".docker",
    ".kube",
    ".netrc",
    ".git-credentials",
    ".npmrc",
    ".pypirc",
];

pub(super) fn check_mounts(home: &Path, plan: &RunPlan) -> Result<()> {
    let home = std::fs::canonicalize(home).unwrap_or_else(|_| home.to_path_buf());
    let mut sources = vec![("workspace".to_string(), plan.workspace.clone())];
    for m in &plan.mounts {
        sources.push((format!("mount {}", m.target), m.source.clone()));
    }
    // The user's SSH keys and agent socket never enter a container: ssh:
    // grants reach them through the run's filtering agent only. Nor do the
    // other stores of the user's credentials: grants reach those through
    // the proxy.
    let user_home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from);
    let ssh_dir = user_home.as_ref().map(|h| h.join(".ssh"));
    let ssh_dir = ssh_dir.map(|d| std::fs::canonicalize(&d).unwrap_or(d));
    let stores: Vec<PathBuf> = user_home
        .iter()
        .flat_map(|h| CREDENTIAL_STORES.iter().map(move |s| h.join(s)))
        .map(|d| std::fs::canonicalize(&d).unwrap_or(d))
        .collect();
    let agent =
        crate::credential::ssh::agent_socket().map(|a| std::fs::canonicalize(&a).unwrap_or(a));
    let engines = engine_sockets();
    let workspace = resolved(&plan.workspace).0;
    for (what, source) in sources {
        // As written, too: a path there may not resolve (/proc/1/root).
        kernel_fs(&what, &source)?;
        // Where it really is, as far as it exists: its protected places
        // are refused by name even before it exists.
        let (real, missing) = resolved(&source);
        if let Some(dir) = &ssh_dir {
            if dir.starts_with(&real) || real.starts_with(dir) {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "{what} {} would give the container your SSH keys ({}); SSH reaches the agent only through `ssh:` grants",
                        real.display(),
                        dir.display()
                    ),
                ));
            }
        }
        if let Some(store) = stores
            .iter()
            .find(|s| s.starts_with(&real) || real.starts_with(s))
        {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "{what} {} would give the container credentials of yours ({}); the agent gets credentials only through grants, injected by the proxy",
                    real.display(),
                    store.display()
                ),
            ));
        }
        if let Some(agent) = &agent {
            if agent.starts_with(&real) {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "{what} {} would give the container your SSH agent's socket ({}); SSH reaches the agent only through `ssh:` grants",
                        real.display(),
                        agent.display()
                    ),
                ));
            }
        }
        if home.starts_with(&real) || real.starts_with(&home) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "{what} {} would give the container moat's own files ({} holds the CA key and the credential store); choose a directory that neither holds nor lies inside it",
                    real.display(),
                    home.display()
                ),
            ));
        }
        let name = real
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if is_engine_socket_name(&name) {
            return Err(engine_socket_refused(&what, &real, &[&real]));
        }
        // The kernel's own file systems reach every process's files and
        // sockets (/proc/<pid>/root): never a source.
        kernel_fs(&what, &real)?;
        // A directory that holds an engine's socket (`/run`, `/var`) hands
        // it over as well.
        let held: Vec<&PathBuf> = engines.iter().filter(|s| s.starts_with(&real)).collect();
        if !held.is_empty() {
            return Err(engine_socket_refused(&what, &real, &held));
        }
        // The workspace is the user's choice (a CI's may live in /var);
        // a mount is agent.yaml's, which the repository wrote. A source in
        // the workspace hands over nothing more than the workspace does.
        let from_config = what != "workspace" && !real.starts_with(&workspace);
        if let Some(place) = from_config
            .then(|| host_place(&real, user_home.as_deref()))
            .flatten()
        {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "{what} {} would give the container {place}; moat never mounts the host's system directories, nor your home directory or its dot-files (a repository's agent.yaml could name them): copy what the agent needs into the workspace, or mount a directory of your own",
                    real.display(),
                ),
            ));
        }
        // A source must exist: an engine asked to mount a missing one
        // creates it, following any link on its way (`./link/.ssh` with
        // `link -> ~`), where no check here would have looked.
        if let Some(e) = missing {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "{what}: its source {} cannot be resolved ({}); create it first: moat does not let the container engine create a missing source, since a link on its way could lead anywhere",
                    source.display(),
                    crate::error::io_reason(&e)
                ),
            ));
        }
    }
    Ok(())
}

/// The host's own directories: its passwords and configuration (/etc),
/// programs, boot files, root's home, services' data and sockets. No
/// source may be one of them or lie inside one.
const SYSTEM_DIRS: &[(&str, &str)] = &[
    ("/etc", "the host's configuration and password files"),
    ("/boot", "the host's boot files"),
    ("/usr", "the host's programs"),
    ("/bin", "the host's programs"),
    ("/sbin", "the host's programs"),
    ("/lib", "the host's libraries"),
    ("/lib32", "the host's libraries"),
    ("/lib64", "the host's libraries"),
    ("/libx32", "the host's libraries"),
    (
        "/var",
        "the host's services' data (the engine's, cron's, mail)",
    ),
    ("/run", "the host's running services and their sockets"),
];

/// What of the host `real` (a resolved source) would hand over, if it is
/// a place no mount may take: `/`, a system directory or anything in one
/// (but `/var/tmp`), `/home` itself, the user's home directory itself or
/// anything under one of its dot-entries (`~/.bashrc`, `~/.config`: shells
/// and tools run what they find there).
fn host_place(real: &Path, user_home: Option<&Path>) -> Option<String> {
    if real == Path::new("/") {
        return Some("the host's whole file system".into());
    }
    if real == Path::new("/home") {
        return Some("every user's home directory".into());
    }
    if !real.starts_with("/var/tmp") {
        if let Some((dir, what)) = SYSTEM_DIRS.iter().find(|(d, _)| real.starts_with(d)) {
            return Some(format!("{what} ({dir})"));
        }
    }
    let home = user_home.map(|h| std::fs::canonicalize(h).unwrap_or_else(|_| h.to_path_buf()));
    // Root's home, unless it is the user's (then as any user's, below).
    if real.starts_with("/root") && home.as_deref() != Some(Path::new("/root")) {
        return Some("root's home directory (/root)".into());
    }
    let home = home?;
    if home == Path::new("/") {
        return None;
    }
    if real == home {
        return Some(format!("your home directory ({})", home.display()));
    }
    let first = real.strip_prefix(&home).ok()?.components().next()?;
    first
        .as_os_str()
        .to_string_lossy()
        .starts_with('.')
        .then(|| {
            format!(
                "your {} (a dot-file of your home, which shells and tools read and run)",
                home.join(first).display()
            )
        })
}

/// `path` with links resolved, and why it could not be resolved whole: the
/// longest part of it that exists, resolved, with the rest as written.
fn resolved(path: &Path) -> (PathBuf, Option<std::io::Error>) {
    let err = match std::fs::canonicalize(path) {
        Ok(real) => return (real, None),
        Err(e) => e,
    };
    let mut rest = Vec::new();
    let mut head = path.to_path_buf();
    while let Some(name) = head.file_name().map(|n| n.to_os_string()) {
        rest.push(name);
        if !head.pop() {
            break;
        }
        if let Ok(mut real) = std::fs::canonicalize(&head) {
            real.extend(rest.iter().rev());
            return (real, Some(err));
        }
    }
    (path.to_path_buf(), Some(err))
}

/// Refuses a path in the kernel's file systems (/proc, /sys, /dev).
fn kernel_fs(what: &str, path: &Path) -> Result<()> {
    if ["/proc", "/sys", "/dev"]
        .iter()
        .any(|p| path.starts_with(p))
    {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "{what} {} is part of the host's kernel file systems (/proc, /sys, /dev), which reach every process and socket of the host; it is never mounted",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Does this file name look like a container engine's socket?
fn is_engine_socket_name(name: &str) -> bool {
    name.ends_with(".sock")
        && ["docker", "podman", "containerd", "crio", "buildkit"]
            .iter()
            .any(|e| name.contains(e))
}

fn engine_socket_refused(what: &str, source: &Path, sockets: &[&PathBuf]) -> Error {
    let named: Vec<String> = sockets
        .iter()
        .take(4)
        .map(|s| s.display().to_string())
        .collect();
    let what_it_is = if sockets.len() == 1 && sockets[0].as_path() == source {
        "is a container engine's socket".to_string()
    } else {
        format!("holds a container engine's socket ({})", named.join(", "))
    };
    Error::new(
        ErrorKind::InvalidArgument,
        format!(
            "{what} {} {what_it_is}: it would give the agent the host, so it is never mounted; mount a directory that does not hold it",
            source.display()
        ),
    )
}

/// The sockets of container engines on this host (Docker, Podman,
/// containerd, CRI-O; system-wide and the user's own; `DOCKER_HOST` and
/// `CONTAINER_HOST` when they name a socket), those that exist, with links
/// resolved.
fn engine_sockets() -> Vec<PathBuf> {
    let mut candidates: Vec<PathBuf> = [
        "/var/run/docker.sock",
        "/run/docker.sock",
        "/run/podman/podman.sock",
        "/run/containerd/containerd.sock",
        "/run/crio/crio.sock",
        "/run/buildkit/buildkitd.sock",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let mut runtime_dirs = vec![PathBuf::from(format!("/run/user/{uid}"))];
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        runtime_dirs.push(PathBuf::from(dir));
    }
    for dir in runtime_dirs {
        candidates.push(dir.join("docker.sock"));
        candidates.push(dir.join("podman").join("podman.sock"));
    }
    // Every socket listening on this host that looks like an engine's
    // (Docker Desktop, colima, rootless daemons, containerd under Docker).
    if let Ok(table) = std::fs::read_to_string("/proc/net/unix") {
        for line in table.lines().skip(1) {
            let Some(path) = line.split_whitespace().nth(7) else {
                continue;
            };
            let name = path.rsplit('/').next().unwrap_or("");
            if path.starts_with('/') && is_engine_socket_name(name) {
                candidates.push(PathBuf::from(path));
            }
        }
    }
    for var in ["DOCKER_HOST", "CONTAINER_HOST"] {
        if let Some(path) = std::env::var(var)
            .ok()
            .and_then(|v| v.strip_prefix("unix://").map(PathBuf::from))
        {
            candidates.push(path);
        }
    }
    let mut found: Vec<PathBuf> = candidates
        .into_iter()
        .filter_map(|p| std::fs::canonicalize(&p).ok())
        .collect();
    found.sort();
    found.dedup();
    // The engines' own sockets first, in messages.
    found.sort_by_key(|p| {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        !matches!(name.as_deref(), Some("docker.sock" | "podman.sock"))
    });
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(source: impl AsRef<Path>, target: &str) -> crate::config::Mount {
        crate::config::Mount {
            source: source.as_ref().to_path_buf(),
            target: target.to_string(),
            read_only: true,
        }
    }

    #[test]
    fn the_hosts_system_directories_and_home_dot_files_are_never_a_mounts_source() {
        let home = tempfile::tempdir().unwrap();
        let ws = tempfile::tempdir().unwrap();
        let mut spec = RunPlan::from_config(crate::config::Config::defaults(ws.path())).unwrap();
        for source in [
            "/etc",
            "/etc/ssl",
            "/usr",
            "/usr/share",
            "/boot",
            "/var/lib",
            "/var/spool",
            "/home",
            "/lib",
            "/bin",
        ] {
            if !Path::new(source).exists() {
                continue;
            }
            spec.mounts = vec![mount(source, "/x")];
            let err = check_mounts(home.path(), &spec).unwrap_err();
            assert!(
                err.to_string()
                    .contains("never mounts the host's system directories"),
                "{source}: {err}"
            );
        }
        // The user's home itself and its dot-files; not a directory of theirs.
        let user = tempfile::tempdir().unwrap();
        let u = user.path().canonicalize().unwrap();
        for dir in [".config/x", ".local", "data"] {
            std::fs::create_dir_all(u.join(dir)).unwrap();
        }
        std::fs::write(u.join(".bashrc"), "").unwrap();
        for (source, refused) in [
            (u.clone(), true),
            (u.join(".bashrc"), true),
            (u.join(".config/x"), true),
            (u.join(".local"), true),
            (u.join("data"), false),
        ] {
            assert_eq!(
                host_place(&source, Some(&u)).is_some(),
                refused,
                "{}",
                source.display()
            );
        }
        // A directory of the user's own, /tmp, /var/tmp and /srv-like places go.
        for fine in ["/tmp", "/var/tmp", "/srv", "/opt", "/mnt"] {
            assert_eq!(host_place(Path::new(fine), Some(&u)), None, "{fine}");
        }
        // Root's home is a home like any when it is the user's.
        assert!(host_place(Path::new("/root/project"), Some(&u)).is_some());
        assert_eq!(
            host_place(Path::new("/root/project"), Some(Path::new("/root"))),
            None
        );
        assert!(host_place(Path::new("/root/.bashrc"), Some(Path::new("/root"))).is_some());
        // A workspace in /var (a CI's) is the user's choice, and so is a
        // mount inside it.
        let var_ws = Path::new("/var/tmp").join(format!("moat-ws-{}", std::process::id()));
        std::fs::create_dir_all(var_ws.join("data")).unwrap();
        let mut spec = RunPlan::from_config(crate::config::Config::defaults(&var_ws)).unwrap();
        spec.mounts = vec![mount(var_ws.join("data"), "/data")];
        let checked = check_mounts(home.path(), &spec);
        std::fs::remove_dir_all(&var_ws).unwrap();
        checked.unwrap();
    }

    #[test]
    fn mounts_that_hold_an_engine_socket_are_refused() {
        let docker = Path::new("/var/run/docker.sock");
        assert!(
            docker.exists(),
            "this test needs a Docker engine's socket at {}",
            docker.display()
        );
        let home = tempfile::tempdir().unwrap();
        let ws = tempfile::tempdir().unwrap();
        let mut spec = RunPlan::from_config(crate::config::Config::defaults(ws.path())).unwrap();
        // /var/run is a link to /run: both spellings, and the socket itself.
        // (/var holds only the link, which a container resolves in its own
        // file system.)
        for source in ["/run", "/var/run", "/var/run/", "/run/docker.sock"] {
            spec.mounts = vec![mount(source, "/hostrun")];
            let err = check_mounts(home.path(), &spec).unwrap_err();
            assert!(
                err.to_string().contains("container engine's socket"),
                "{source}: {err}"
            );
        }
        // The kernel's file systems reach every socket (/proc/<pid>/root).
        for source in ["/proc", "/proc/1/root", "/sys", "/dev"] {
            spec.mounts = vec![mount(source, "/k")];
            let err = check_mounts(home.path(), &spec).unwrap_err();
            assert!(
                err.to_string().contains("kernel file systems"),
                "{source}: {err}"
            );
        }
        // Any engine socket listening on this host, wherever it is (Docker
        // Desktop's ~/.docker/run, colima, a rootless daemon's).
        let desktop = tempfile::tempdir().unwrap();
        let run = desktop.path().join(".docker").join("run");
        std::fs::create_dir_all(&run).unwrap();
        let _listener = std::os::unix::net::UnixListener::bind(run.join("docker.sock")).unwrap();
        spec.mounts = vec![mount(desktop.path().join(".docker"), "/d")];
        let err = check_mounts(home.path(), &spec).unwrap_err();
        assert!(err.to_string().contains("docker.sock"), "{err}");
        // A directory beside the socket is fine.
        let beside = tempfile::tempdir().unwrap();
        spec.mounts = vec![mount(beside.path(), "/data")];
        check_mounts(home.path(), &spec).unwrap();
        // A workspace that holds the socket too.
        let mut spec =
            RunPlan::from_config(crate::config::Config::defaults(Path::new("/run"))).unwrap();
        spec.workspace = PathBuf::from("/run");
        assert!(check_mounts(home.path(), &spec).is_err());
    }

    #[test]
    fn a_source_that_does_not_exist_is_refused_not_checked_as_written() {
        // `./link/.ssh` with `link -> ~` and no `.ssh` there yet: as
        // written it holds nothing protected; the engine would create it
        // through the link.
        let home = tempfile::tempdir().unwrap();
        let ws = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), ws.path().join("link")).unwrap();
        let mut spec = RunPlan::from_config(crate::config::Config::defaults(ws.path())).unwrap();
        for source in [
            ws.path().join("link").join("made"),
            ws.path().join("missing"),
            ws.path().join("missing").join("..").join("link"),
        ] {
            spec.mounts = vec![mount(&source, "/x")];
            let err = check_mounts(home.path(), &spec).unwrap_err();
            assert!(
                err.to_string().contains("cannot be resolved")
                    && err.to_string().contains("create it first"),
                "{}: {err}",
                source.display()
            );
        }
        // Once it exists, it is checked where it really is.
        std::fs::create_dir(outside.path().join("made")).unwrap();
        spec.mounts = vec![mount(ws.path().join("link").join("made"), "/x")];
        check_mounts(home.path(), &spec).unwrap();
    }
}
