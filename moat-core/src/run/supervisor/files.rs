//! The files a run's container gets: its user's entries, the CA bundle,
//! AWS and SSH configuration. All are files of the run, mounted read-only:
//! nothing is written into the image and no step runs as root.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::runtime::{ContainerSpec, Runtime, Tmpfs, HOME_LABEL, RUN_LABEL};

/// Where the moat CA bundle is put inside a container.
pub const CA_BUNDLE_PATH: &str = "/etc/moat/ca-bundle.pem";

/// The AWS `credential_process` helper inside a container.
pub(super) const AWS_HELPER_PATH: &str = "/etc/moat/aws-credentials";
/// The AWS config file inside a container (`AWS_CONFIG_FILE`).
pub(super) const AWS_CONFIG_PATH: &str = "/etc/moat/aws-config";
/// Where the run's filtering SSH agent socket appears inside a container.
pub(super) const SSH_AGENT_DIR: &str = "/run/moat/ssh";
/// The SSH client configuration for granted hosts, inside a container
/// (Debian's and Ubuntu's `/etc/ssh/ssh_config` include this directory).
pub(super) const SSH_CONFIG_PATH: &str = "/etc/ssh/ssh_config.d/moat.conf";
/// The granted hosts' keys, inside a container.
pub(super) const SSH_KNOWN_HOSTS_PATH: &str = "/etc/moat/ssh_known_hosts";
/// Fetches the run's role credentials from its proxy, with whatever HTTP
/// client the image has; the proxy variables carry the run's token.
pub(super) const AWS_HELPER: &str = r#"#!/bin/sh
# moat: this run's AWS role credentials, from the run's proxy (credential_process).
url=http://moat.internal/aws/credentials
if command -v curl >/dev/null 2>&1; then exec curl -sSf "$url"; fi
if command -v wget >/dev/null 2>&1; then exec wget -qO- "$url"; fi
for py in python3 python; do
  if command -v "$py" >/dev/null 2>&1; then
    exec "$py" -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())' "$url"
  fi
done
echo "moat: this image has no curl, wget or python to fetch AWS credentials from $url" >&2
exit 1
"#;

/// The user the agent runs as: the host user, so it reads and writes the
/// workspace with that user's rights and files it writes are theirs. When
/// moat itself runs as root, the workspace's owner, whoever that is: root
/// included, for a root user's `mktemp -d` (0700) would otherwise be
/// unreadable to the agent. Root in the container holds no capability and
/// cannot gain one (every container drops all and sets no-new-privileges),
/// so it has the rights of the owner of what it touches and nothing more;
/// the firewall and the mounts are outside its reach. ARCHITECTURE.md
/// ("The agent's user") says why this and not a fixed uid.
pub(super) fn agent_user(workspace: &Path) -> Result<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid/getegid cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if uid != 0 {
        return Ok((uid, gid));
    }
    let m =
        std::fs::metadata(workspace).map_err(|e| Error::io(workspace, "read the owner of", e))?;
    Ok((m.uid(), m.gid()))
}

/// What a configuration file of the workspace held: its bytes (at most
/// 1 MiB), or what stood there instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Snapshot {
    /// No such file.
    Absent,
    /// A regular file with these bytes.
    File(Vec<u8>),
    /// Something else (a link, a directory, a file too large or unreadable).
    Other(String),
}

/// The names a workspace's configuration may have (`config::load`).
const CONFIG_NAMES: [&str; 2] = ["agent.yaml", "moat.yaml"];

/// The most of a configuration file a snapshot holds.
const SNAPSHOT_LIMIT: u64 = 1 << 20;

/// Opened once, never through a link and never blocking (the name may have
/// been swapped for a FIFO, a device or a link since any look at it), and
/// read no further than [`SNAPSHOT_LIMIT`].
fn snapshot(path: &Path) -> Snapshot {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Snapshot::Absent,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Snapshot::Other("a symbolic link".into())
        }
        Err(e) => return Snapshot::Other(e.to_string()),
    };
    match file.metadata() {
        Err(e) => return Snapshot::Other(e.to_string()),
        Ok(m) if !m.is_file() => return Snapshot::Other(format!("{:?}", m.file_type())),
        Ok(m) if m.len() > SNAPSHOT_LIMIT => return Snapshot::Other(format!("{} bytes", m.len())),
        Ok(_) => {}
    }
    let mut bytes = Vec::new();
    match file
        .by_ref()
        .take(SNAPSHOT_LIMIT + 1)
        .read_to_end(&mut bytes)
    {
        Ok(_) if bytes.len() as u64 > SNAPSHOT_LIMIT => {
            Snapshot::Other(format!("more than {SNAPSHOT_LIMIT} bytes"))
        }
        Ok(_) => Snapshot::File(bytes),
        Err(e) => Snapshot::Other(e.to_string()),
    }
}

/// The workspace's configuration files as they are now.
pub(super) fn config_snapshot(workspace: &Path) -> Vec<(&'static str, Snapshot)> {
    CONFIG_NAMES
        .iter()
        .map(|name| (*name, snapshot(&workspace.join(name))))
        .collect()
}

/// A note for each configuration file that is not what it was at `before`
/// (none when nothing was taken).
pub(super) fn config_changes(workspace: &Path, before: &[(&'static str, Snapshot)]) -> Vec<String> {
    before
        .iter()
        .filter(|(name, was)| snapshot(&workspace.join(name)) != *was)
        .map(|(name, was)| {
            let what = if *was == Snapshot::Absent { "created" } else { "changed" };
            format!(
                "{name} was {what} in the workspace during this run; the next run of this workspace takes its policy, grants and mounts from it: read it first"
            )
        })
        .collect()
}

/// The most entries [`scrub_workspace`] looks at.
const SCRUB_LIMIT: usize = 1_000_000;

/// After a run whose agent was root: clears the set-user-ID and
/// set-group-ID bits of every file in `workspace` changed since `since`
/// (root in the container may set them on its own files, and a set-user-ID
/// file of root's is a way to root for any user who can reach it), and
/// gives the workspace back its mode `mode` if the agent changed it. One
/// file system only, symbolic links never followed. What it did or could
/// not do, one note each, for the run's output.
pub(super) fn scrub_workspace(
    workspace: &Path,
    since: std::time::SystemTime,
    mode: u32,
) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut notes = Vec::new();
    let since = since
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let changed = |m: &std::fs::Metadata| {
        let ns = i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec());
        ns >= i128::try_from(since).unwrap_or(i128::MAX)
    };
    let Ok(root) = std::fs::symlink_metadata(workspace) else {
        return notes;
    };
    if root.mode() & 0o7777 != mode {
        match chmod_checked(workspace, &root, mode) {
            Ok(()) => notes.push(format!(
                "the agent changed the workspace's mode to {:o}; it is {:o} again",
                root.mode() & 0o7777,
                mode
            )),
            Err(e) => notes.push(format!(
                "the agent changed the workspace's mode to {:o} and it cannot be set back to {:o}: {e}",
                root.mode() & 0o7777,
                mode
            )),
        }
    }
    let mut cleared = Vec::new();
    let mut stack = vec![workspace.to_path_buf()];
    let mut seen = 0usize;
    let mut unread = Vec::new();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            unread.push(dir.display().to_string());
            continue;
        };
        for entry in entries {
            let Ok(entry) = entry else {
                unread.push(dir.display().to_string());
                continue;
            };
            seen += 1;
            if seen > SCRUB_LIMIT {
                notes.push(format!(
                    "the workspace has more than {SCRUB_LIMIT} entries; set-user-ID files past them were not looked for"
                ));
                stack.clear();
                break;
            }
            let path = entry.path();
            let Ok(m) = std::fs::symlink_metadata(&path) else {
                unread.push(path.display().to_string());
                continue;
            };
            if m.dev() != root.dev() {
                continue;
            }
            if m.is_dir() {
                stack.push(path);
            } else if m.is_file() && m.mode() & 0o6000 != 0 && changed(&m) {
                match chmod_checked(&path, &m, m.mode() & 0o1777) {
                    Ok(()) => cleared.push(path.display().to_string()),
                    Err(e) => notes.push(format!(
                        "{} is set-user-ID or set-group-ID and cannot be cleared: {e}",
                        path.display()
                    )),
                }
            }
        }
    }
    if !cleared.is_empty() {
        notes.push(format!(
            "the agent (root in its container) made set-user-ID or set-group-ID files; their bits are cleared: {}",
            listed(&cleared)
        ));
    }
    if !unread.is_empty() {
        unread.dedup();
        notes.push(format!(
            "these could not be read to look for set-user-ID files the agent made: {}",
            listed(&unread)
        ));
    }
    notes
}

/// The first names of `names` (chosen by the agent: escaped), and how many
/// more there are.
fn listed(names: &[String]) -> String {
    const SHOWN: usize = 20;
    let mut text = names
        .iter()
        .take(SHOWN)
        .map(|n| crate::run::trace_view::printable(n))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        text.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    text
}

/// Sets the mode of `path` to `mode` if it is still what `seen` describes
/// (same device and inode), through a descriptor opened without following
/// a link: a name swapped for a link since it was looked at (to
/// /etc/shadow, say) is not followed.
fn chmod_checked(path: &Path, seen: &std::fs::Metadata, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let now = file.metadata()?;
    if (now.dev(), now.ino()) != (seen.dev(), seen.ino()) {
        return Err(std::io::Error::other(
            "it was replaced while being looked at",
        ));
    }
    file.set_permissions(std::fs::Permissions::from_mode(mode))
}

/// Writes a file the container mounts read-only: its owner is the agent's
/// user, who alone may read (and, for a program, run) it; nobody on the host
/// but that user and root can.
pub(super) fn write_agent_file(
    path: &Path,
    content: &[u8],
    program: bool,
    uid: u32,
    gid: u32,
) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let mut file = crate::paths::open_private(path, crate::paths::Open::Truncate)?;
    file.write_all(content)
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io(path, "write", e))?;
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(|e| Error::io(path, "give the agent's user", e))?;
    }
    let mode = if program { 0o500 } else { 0o400 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io(path, "set permissions of", e))
}

/// An image's `/etc/passwd` and `/etc/group`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(super) struct ImageUsers {
    passwd: String,
    group: String,
}

/// Reads an image's user database, once per image id (images are
/// immutable): from a container created for it and removed at once. Cached
/// under `$MOAT_HOME/cache/images/`.
pub(super) async fn image_users(
    docker: &dyn Runtime,
    home: &Path,
    run_id: &str,
    image: &str,
    image_id: &str,
) -> Result<ImageUsers> {
    let key: String = image_id
        .trim_start_matches("sha256:")
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    let cache = home
        .join("cache")
        .join("images")
        .join(format!("{key}.json"));
    if !key.is_empty() {
        if let Ok(text) = std::fs::read_to_string(&cache) {
            if let Ok(users) = serde_json::from_str(&text) {
                return Ok(users);
            }
        }
    }
    let probe = ContainerSpec {
        name: String::new(),
        image: image.to_string(),
        command: Some(vec!["true".into()]),
        user: "0:0".into(),
        workdir: "/".into(),
        network: "none".into(),
        // The run's labels: should this process die before removing it,
        // the run's cleanup (by label) removes it.
        labels: BTreeMap::from([
            (RUN_LABEL.to_string(), run_id.to_string()),
            (HOME_LABEL.to_string(), home.to_string_lossy().into_owned()),
        ]),
        ..ContainerSpec::default()
    };
    let id = docker.create_container(&probe).await?;
    let read = async {
        let passwd = docker
            .read_file(&id, "/etc/passwd")
            .await?
            .unwrap_or_default();
        let group = docker
            .read_file(&id, "/etc/group")
            .await?
            .unwrap_or_default();
        Ok::<_, Error>(ImageUsers {
            passwd: String::from_utf8_lossy(&passwd).into_owned(),
            group: String::from_utf8_lossy(&group).into_owned(),
        })
    }
    .await;
    let _ = docker.remove(&id).await;
    let users = read?;
    if !key.is_empty() {
        if let Some(dir) = cache.parent() {
            crate::paths::private_dir(dir)?;
        }
        if let Ok(json) = serde_json::to_vec(&users) {
            crate::paths::write_private(&cache, &json, 0o600)?;
        }
    }
    Ok(users)
}

/// A file mounted into the container: its path there, content and mode.
pub(super) type FileMount = (String, Vec<u8>, u32);

/// The files mounted into the container: a passwd and group with an entry
/// for the agent's uid and gid (when the image has none), and the CA bundle
/// (the moat CA and the host's roots). Also the tmpfs home directory of an
/// agent user the image does not know (owned by the agent's uid and gid,
/// which the container runs as).
pub(super) fn container_files(
    users: &ImageUsers,
    uid: u32,
    gid: u32,
    ca_pem: &str,
) -> (Vec<FileMount>, Vec<Tmpfs>) {
    let mut files = Vec::new();
    let mut tmpfs = Vec::new();
    let has_uid = users
        .passwd
        .lines()
        .any(|l| l.split(':').nth(2) == Some(uid.to_string().as_str()));
    if !has_uid {
        let mut text = users.passwd.clone();
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!(
            "moat:x:{uid}:{gid}:moat agent:/home/moat:/bin/sh\n"
        ));
        files.push(("/etc/passwd".to_string(), text.into_bytes(), 0o644));
        tmpfs.push(Tmpfs {
            path: "/home/moat".to_string(),
            mode: 0o755,
        });
    }
    let has_gid = users
        .group
        .lines()
        .any(|l| l.split(':').nth(2) == Some(gid.to_string().as_str()));
    if !has_gid {
        let mut text = users.group.clone();
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!("moat:x:{gid}:\n"));
        files.push(("/etc/group".to_string(), text.into_bytes(), 0o644));
    }
    let mut bundle = ca_pem.to_string();
    if !bundle.ends_with('\n') {
        bundle.push('\n');
    }
    bundle.push_str(&host_roots_pem());
    files.push((CA_BUNDLE_PATH.to_string(), bundle.into_bytes(), 0o644));
    (files, tmpfs)
}

/// The host's trusted roots as PEM, so direct TLS (permissive mode) keeps
/// working with the bundle in place of the image's own.
pub(super) fn host_roots_pem() -> String {
    use base64::Engine as _;
    let certs = rustls_native_certs::load_native_certs();
    let mut out = String::new();
    for cert in certs.certs {
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(chunk));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

/// The container's SSH client configuration (each granted host's name sent
/// to its forwarder, its keys from the run's known hosts) and known hosts.
pub(super) fn ssh_files(
    hosts: &[(crate::ssh_agent::HostGrant, u16)],
    gateway: std::net::IpAddr,
) -> (String, String) {
    let mut config = String::from(
        "# moat: this run's SSH grants. Each granted host is reached through the run's\n\
         # forwarder; the run's agent signs only for these hosts.\n",
    );
    let mut known = String::new();
    for (g, port) in hosts {
        config.push_str(&format!(
            "Host {host}\n    HostName {gateway}\n    Port {port}\n    HostKeyAlias {host}\n    \
             GlobalKnownHostsFile {SSH_KNOWN_HOSTS_PATH}\n    StrictHostKeyChecking yes\n    \
             CheckHostIP no\n    UpdateHostKeys no\n",
            host = g.host
        ));
        for line in &g.host_key_lines {
            known.push_str(&format!("{} {line}\n", g.host));
        }
    }
    (config, known)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A name swapped for a link (to a file of someone else's) between the
    /// look and the chmod: the link's target keeps its mode.
    #[test]
    fn chmod_checked_follows_no_link_and_no_replacement() {
        let t = tempfile::tempdir().unwrap();
        let (victim, name) = (t.path().join("victim"), t.path().join("suid"));
        std::fs::write(&victim, "x").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&name, "x").unwrap();
        std::fs::set_permissions(&name, std::fs::Permissions::from_mode(0o4755)).unwrap();
        let seen = std::fs::symlink_metadata(&name).unwrap();
        // Unchanged: cleared.
        chmod_checked(&name, &seen, 0o755).unwrap();
        assert_eq!(
            std::fs::metadata(&name).unwrap().permissions().mode() & 0o7777,
            0o755
        );
        // Swapped for a link: refused, the target untouched. (The first
        // file is kept, so that its inode is not reused below.)
        std::fs::rename(&name, t.path().join("first")).unwrap();
        std::os::unix::fs::symlink(&victim, &name).unwrap();
        assert!(chmod_checked(&name, &seen, 0o777).is_err());
        // Swapped for another file: refused.
        std::fs::remove_file(&name).unwrap();
        std::fs::write(&name, "y").unwrap();
        assert!(chmod_checked(&name, &seen, 0o777).is_err());
        assert_eq!(
            std::fs::metadata(&victim).unwrap().permissions().mode() & 0o7777,
            0o600
        );
    }

    #[test]
    fn long_lists_of_agent_chosen_names_are_cut_and_escaped() {
        let names: Vec<String> = (0..25).map(|i| format!("f{i}\u{1b}]52")).collect();
        let text = listed(&names);
        assert!(text.ends_with(" and 5 more"), "{text}");
        assert!(!text.contains('\u{1b}'), "{text}");
    }
}
