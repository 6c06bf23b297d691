//! SSH grants: which key of the user's SSH agent may sign for which host.
//!
//! `moat grant ssh --host H [--key FINGERPRINT]` asks the agent at
//! `SSH_AUTH_SOCK` for its keys (the agent protocol's
//! `SSH2_AGENTC_REQUEST_IDENTITIES`), picks the first or the named one, and
//! records `{host, fingerprint, comment}` in `$MOAT_HOME/ssh-grants.json`
//! (0600). No private key and no secret is stored: signing stays with the
//! agent. The host's public keys, from the user's `known_hosts`, are
//! recorded too: during a run the filtering agent ([`crate::ssh_agent`])
//! signs only for a server that proves it holds one of them.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::paths;

/// A key the agent holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentKey {
    /// `SHA256:...` as `ssh-add -l` prints it.
    pub fingerprint: String,
    /// The key's comment (often user@host).
    pub comment: String,
    /// The key type (`ssh-ed25519`, ...).
    pub key_type: String,
}

/// One SSH grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshGrant {
    /// The host the key may sign for.
    pub host: String,
    /// The key.
    pub key: AgentKey,
    /// When it was granted (RFC 3339).
    pub created: String,
    /// The host's public keys known when it was granted (OpenSSH format,
    /// `ssh-ed25519 AAAA...`), from the user's `known_hosts`.
    #[serde(default)]
    pub host_keys: Vec<String>,
}

const REQUEST_IDENTITIES: u8 = 11;

/// Parses an `SSH2_AGENT_IDENTITIES_ANSWER` body (after the length).
fn parse_identities(msg: &[u8]) -> Option<Vec<AgentKey>> {
    crate::ssh_agent::parse_identities(msg)?
        .into_iter()
        .map(|(blob, comment)| {
            Some(AgentKey {
                fingerprint: crate::ssh_agent::fingerprint(blob),
                comment: String::from_utf8_lossy(comment).into_owned(),
                key_type: crate::ssh_agent::key_type(blob)?,
            })
        })
        .collect()
}

/// The keys of the agent at `socket`.
pub fn agent_keys(socket: &Path) -> Result<Vec<AgentKey>> {
    let fail = |why: String| {
        Error::new(
            ErrorKind::Io,
            format!("ssh agent at {}: {why}", socket.display()),
        )
    };
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| fail(format!("cannot connect ({e}); is ssh-agent running?")))?;
    let timeout = Some(std::time::Duration::from_secs(5));
    let _ = stream.set_read_timeout(timeout);
    let _ = stream.set_write_timeout(timeout);
    stream
        .write_all(&[0, 0, 0, 1, REQUEST_IDENTITIES])
        .map_err(|e| fail(format!("cannot write: {e}")))?;
    let mut len = [0u8; 4];
    stream
        .read_exact(&mut len)
        .map_err(|e| fail(format!("cannot read: {e}")))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > 256 * 1024 {
        return Err(fail(format!("answer of {len} bytes is too large")));
    }
    let mut msg = vec![0u8; len];
    stream
        .read_exact(&mut msg)
        .map_err(|e| fail(format!("cannot read: {e}")))?;
    parse_identities(&msg).ok_or_else(|| fail("the answer is not a list of keys".into()))
}

fn grants_path(home: &Path) -> std::path::PathBuf {
    home.join("ssh-grants.json")
}

/// The SSH grants stored under `home`.
pub fn list(home: &Path) -> Result<Vec<SshGrant>> {
    let path = grants_path(home);
    match std::fs::read(&path) {
        Ok(data) => serde_json::from_slice(&data).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "{}: not a list of ssh grants ({e}); remove it and grant again",
                    path.display()
                ),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::io(&path, "read", e)),
    }
}

fn write(home: &Path, grants: &[SshGrant]) -> Result<()> {
    paths::private_dir(home)?;
    let data = serde_json::to_vec_pretty(grants)
        .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?;
    paths::write_private(&grants_path(home), &data, 0o600)
}

/// The user's agent socket: `SSH_AUTH_SOCK`, when set and not empty.
pub fn agent_socket() -> Option<std::path::PathBuf> {
    std::env::var_os("SSH_AUTH_SOCK")
        .filter(|s| !s.is_empty())
        .map(std::path::PathBuf::from)
}

/// Grants `host` the agent key named by `fingerprint` (with or without the
/// `SHA256:` prefix), or the agent's first key. Replaces an earlier grant for
/// the host.
pub fn grant(
    home: &Path,
    socket: Option<&Path>,
    host: &str,
    fingerprint: Option<&str>,
) -> Result<SshGrant> {
    let pattern = crate::policy::HostPattern::parse(host)
        .map_err(|e| Error::new(ErrorKind::InvalidArgument, format!("--host: {e}")))?;
    if host.contains('*') || pattern.port().is_some() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "--host: name one host, without wildcards or a port",
        ));
    }
    let socket = socket.ok_or_else(|| {
        Error::new(
            ErrorKind::InvalidArgument,
            "no ssh agent: SSH_AUTH_SOCK is not set; start one with `eval $(ssh-agent)` and add a key with `ssh-add`",
        )
    })?;
    let keys = agent_keys(socket)?;
    if keys.is_empty() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "the ssh agent holds no keys; add one with `ssh-add ~/.ssh/id_ed25519`",
        ));
    }
    let key = match fingerprint {
        None => keys[0].clone(),
        Some(fp) => {
            let want = if fp.starts_with("SHA256:") {
                fp.to_string()
            } else {
                format!("SHA256:{fp}")
            };
            keys.iter()
                .find(|k| k.fingerprint == want)
                .cloned()
                .ok_or_else(|| {
                    let have: Vec<String> = keys
                        .iter()
                        .map(|k| format!("{} ({})", k.fingerprint, k.comment))
                        .collect();
                    Error::new(
                        ErrorKind::InvalidArgument,
                        format!(
                            "--key {fp}: the ssh agent holds no such key; it holds {}",
                            have.join(", ")
                        ),
                    )
                })?
        }
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let entry = SshGrant {
        host_keys: known_host_keys(&host, &known_hosts_files()).keys,
        host: host.clone(),
        key,
        created: crate::trace::now_rfc3339(),
    };
    let dir = home.join("credentials");
    paths::private_dir(&dir)?;
    let _lock = super::store::lock(&dir)?;
    let mut grants = list(home)?;
    grants.retain(|g| g.host != host);
    grants.push(entry.clone());
    write(home, &grants)?;
    Ok(entry)
}

/// What to tell the user when a grant found no host key for its host.
pub fn missing_host_key_warning(host: &str) -> String {
    format!(
        "no host key for {host} is in ~/.ssh/known_hosts, so runs cannot tell {host} from another \
         server and will not start with this grant; connect once with `ssh {host}`, check the \
         fingerprint, and grant again"
    )
}

/// The `known_hosts` files moat reads, as OpenSSH does by default: the
/// user's (`$HOME/.ssh/known_hosts`, `known_hosts2`) and the system's.
pub fn known_hosts_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        let ssh = PathBuf::from(home).join(".ssh");
        files.push(ssh.join("known_hosts"));
        files.push(ssh.join("known_hosts2"));
    }
    files.push(PathBuf::from("/etc/ssh/ssh_known_hosts"));
    files.push(PathBuf::from("/etc/ssh/ssh_known_hosts2"));
    files
}

/// The keys `known_hosts` files hold for one host.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KnownHostKeys {
    /// The host's keys (OpenSSH format, without comments), revoked ones left
    /// out.
    pub keys: Vec<String>,
    /// Keys marked `@revoked` (for any host): never to be trusted, even when
    /// recorded at grant time.
    pub revoked: Vec<String>,
    /// `@revoked` lines that did not parse (`file:line`): a revocation moat
    /// cannot read makes runs refuse to start rather than ignore it.
    pub unreadable_revocations: Vec<String>,
}

/// The keys `files` hold for `host` at port 22: lines naming it plainly, in
/// a `*`/`?` pattern (unless a `!` pattern excludes it), as `[host]:22` or
/// hashed (`|1|salt|hash`). `@cert-authority` lines are ignored (host
/// certificates are not supported); `@revoked` keys are collected apart.
/// Fields may be separated by any run of blanks, as OpenSSH allows.
/// Unreadable files and lines are skipped, except `@revoked` lines, which
/// are listed in `unreadable_revocations`.
pub fn known_host_keys(host: &str, files: &[PathBuf]) -> KnownHostKeys {
    use ssh_key::known_hosts::{Entry, HostPatterns, Marker};
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let mut out = KnownHostKeys::default();
    for file in files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for (number, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("");
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.is_empty() {
                continue;
            }
            let entry = match fields.join(" ").parse::<Entry>() {
                Ok(e) => e,
                Err(_) => {
                    if fields[0] == "@revoked" {
                        out.unreadable_revocations.push(format!(
                            "{}:{}",
                            file.display(),
                            number + 1
                        ));
                    }
                    continue;
                }
            };
            let key = entry.public_key().key_data();
            let Ok(line) = ssh_key::PublicKey::from(key.clone()).to_openssh() else {
                continue;
            };
            if entry.marker() == Some(&Marker::Revoked) {
                out.revoked.push(line);
                continue;
            }
            if entry.marker().is_some() {
                continue;
            }
            let matches = match entry.host_patterns() {
                HostPatterns::Patterns(patterns) => patterns_match(patterns, &host),
                HostPatterns::HashedName { salt, hash } => {
                    hashed_name(salt, &host) == *hash
                        || hashed_name(salt, &format!("[{host}]:22")) == *hash
                }
            };
            if matches && !out.keys.contains(&line) {
                out.keys.push(line);
            }
        }
    }
    let revoked = out.revoked.clone();
    out.keys.retain(|k| !revoked.contains(k));
    out
}

fn hashed_name(salt: &[u8], name: &str) -> [u8; 20] {
    use hmac::Mac;
    let Ok(mut mac) = hmac::Hmac::<sha1::Sha1>::new_from_slice(salt) else {
        return [0; 20];
    };
    mac.update(name.as_bytes());
    mac.finalize().into_bytes().into()
}

/// OpenSSH's `match_hostname`: some pattern matches and no negated one does.
fn patterns_match(patterns: &[String], host: &str) -> bool {
    let mut matched = false;
    for pattern in patterns {
        let pattern = pattern.to_ascii_lowercase();
        let (negated, pattern) = match pattern.strip_prefix('!') {
            Some(p) => (true, p.to_string()),
            None => (false, pattern),
        };
        let hit = glob(pattern.as_bytes(), host.as_bytes())
            || glob(pattern.as_bytes(), format!("[{host}]:22").as_bytes());
        if hit && negated {
            return false;
        }
        matched |= hit;
    }
    matched
}

/// `*` and `?` wildcards, as OpenSSH's `match_pattern`.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|i| glob(rest, &text[i..])),
        Some((b'?', rest)) => !text.is_empty() && glob(rest, &text[1..]),
        Some((c, rest)) => text.first() == Some(c) && glob(rest, &text[1..]),
    }
}

/// Removes the grant for `host`; `Ok(false)` when there was none.
pub fn revoke(home: &Path, host: &str) -> Result<bool> {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let dir = home.join("credentials");
    paths::private_dir(&dir)?;
    let _lock = super::store::lock(&dir)?;
    let mut grants = list(home)?;
    let before = grants.len();
    grants.retain(|g| g.host != host);
    if grants.len() == before {
        return Ok(false);
    }
    write(home, &grants)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_answer_parses_and_fingerprints() {
        // An ed25519 public key blob: string "ssh-ed25519", string 32 bytes.
        let mut blob = Vec::new();
        blob.extend_from_slice(&11u32.to_be_bytes());
        blob.extend_from_slice(b"ssh-ed25519");
        blob.extend_from_slice(&32u32.to_be_bytes());
        blob.extend_from_slice(&[7u8; 32]);
        let mut msg = vec![12];
        msg.extend_from_slice(&1u32.to_be_bytes());
        msg.extend_from_slice(&(blob.len() as u32).to_be_bytes());
        msg.extend_from_slice(&blob);
        msg.extend_from_slice(&9u32.to_be_bytes());
        msg.extend_from_slice(b"me@laptop");
        let keys = parse_identities(&msg).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].key_type, "ssh-ed25519");
        assert_eq!(keys[0].comment, "me@laptop");
        assert!(keys[0].fingerprint.starts_with("SHA256:"));
        // Truncated answers are refused, not a panic.
        for cut in 0..msg.len() {
            let _ = parse_identities(&msg[..cut]);
        }
        assert!(parse_identities(&msg[..msg.len() - 3]).is_none());
    }
}
