//! SSH basics shared by SSH grants ([`crate::credential::ssh`]) and the
//! run's filtering agent ([`crate::ssh_agent`]): the agent protocol's wire
//! format and messages, a client for the user's agent, public keys and
//! their fingerprints, `known_hosts`, and what a grant for a host holds. It
//! depends on neither of them.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use ssh_key::public::KeyData;

use crate::error::{Error, ErrorKind, Result};

// The agent protocol's message numbers (draft-miller-ssh-agent).
pub(crate) const FAILURE: u8 = 5;
pub(crate) const SUCCESS: u8 = 6;
pub(crate) const REQUEST_IDENTITIES: u8 = 11;
pub(crate) const IDENTITIES_ANSWER: u8 = 12;
pub(crate) const SIGN_REQUEST: u8 = 13;
pub(crate) const SIGN_RESPONSE: u8 = 14;
pub(crate) const EXTENSION: u8 = 27;
pub(crate) const USERAUTH_REQUEST: u8 = 50;

/// One granted host: the agent key that may sign for it and the host keys
/// that identify it.
#[derive(Debug, Clone)]
pub struct HostGrant {
    /// The host (`github.com`).
    pub host: String,
    /// The agent key's fingerprint (`SHA256:...`).
    pub fingerprint: String,
    /// The host's public keys.
    pub host_keys: Vec<KeyData>,
    /// The same keys in OpenSSH format, for the container's known hosts.
    pub host_key_lines: Vec<String>,
}

impl HostGrant {
    /// A grant from OpenSSH-format host key lines (`ssh-ed25519 AAAA...`).
    /// Fails, naming the host, when there are none or one does not parse.
    pub fn new(host: &str, fingerprint: &str, host_keys: &[String]) -> Result<HostGrant> {
        let mut keys = Vec::new();
        let mut lines = Vec::new();
        for line in host_keys {
            let key = ssh_key::PublicKey::from_openssh(line).map_err(|e| {
                Error::new(
                    ErrorKind::Config,
                    format!("grant \"ssh:{host}\": host key \"{line}\" does not parse: {e}"),
                )
            })?;
            if !keys.contains(key.key_data()) {
                keys.push(key.key_data().clone());
                lines.push(line.clone());
            }
        }
        if keys.is_empty() {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "grant \"ssh:{host}\": no host key is known for {host}, so no server can prove it is {host}; \
                     add its key to ~/.ssh/known_hosts (connect once with `ssh {host}` and check the fingerprint) \
                     and grant again"
                ),
            ));
        }
        Ok(HostGrant {
            host: host.to_string(),
            fingerprint: fingerprint.to_string(),
            host_keys: keys,
            host_key_lines: lines,
        })
    }
}

/// `SHA256:...` of a public key blob, as `ssh-add -l` prints it.
pub fn fingerprint(blob: &[u8]) -> String {
    use base64::Engine;
    format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(Sha256::digest(blob))
    )
}

/// Reads SSH wire types.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Some(head)
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
    }

    pub(crate) fn string(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    pub(crate) fn done(&self) -> bool {
        self.buf.is_empty()
    }
}

pub(crate) fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

/// The type named in a public key blob (`ssh-ed25519`, ...).
pub(crate) fn key_type(blob: &[u8]) -> Option<String> {
    Some(String::from_utf8_lossy(Reader::new(blob).string()?).into_owned())
}

/// The `(blob, comment)` pairs of an identities answer.
pub(crate) fn parse_identities(msg: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    let mut r = Reader::new(msg);
    if r.u8()? != IDENTITIES_ANSWER {
        return None;
    }
    let n = r.u32()?;
    let mut keys = Vec::new();
    for _ in 0..n.min(4096) {
        keys.push((r.string()?, r.string()?));
    }
    Some(keys)
}

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

/// Parses an `SSH2_AGENT_IDENTITIES_ANSWER` body (after the length).
fn agent_identities(msg: &[u8]) -> Option<Vec<AgentKey>> {
    parse_identities(msg)?
        .into_iter()
        .map(|(blob, comment)| {
            Some(AgentKey {
                fingerprint: fingerprint(blob),
                comment: String::from_utf8_lossy(comment).into_owned(),
                key_type: key_type(blob)?,
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
    agent_identities(&msg).ok_or_else(|| fail("the answer is not a list of keys".into()))
}

/// The user's agent socket: `SSH_AUTH_SOCK`, when set and not empty.
pub fn agent_socket() -> Option<std::path::PathBuf> {
    std::env::var_os("SSH_AUTH_SOCK")
        .filter(|s| !s.is_empty())
        .map(std::path::PathBuf::from)
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
    /// Files that exist but cannot be read (`file: reason`): no permission,
    /// not a regular file (a FIFO would block the reader). Whatever they
    /// revoke is unknown, so runs refuse to start on them too.
    pub unreadable_files: Vec<String>,
}

/// The keys `files` hold for `host` at port 22: lines naming it plainly, in
/// a `*`/`?` pattern (unless a `!` pattern excludes it), as `[host]:22` or
/// hashed (`|1|salt|hash`). `@cert-authority` lines are ignored (host
/// certificates are not supported); `@revoked` keys are collected apart.
/// Fields may be separated by any run of blanks, as OpenSSH allows.
/// A file that is absent is skipped; one that exists but cannot be read is
/// listed in `unreadable_files`. Lines that do not parse are skipped,
/// except `@revoked` lines, which are listed in `unreadable_revocations`.
/// Bytes that are not UTF-8 (OpenSSH allows them, in comments say) do not
/// make the rest of a file unreadable.
pub fn known_host_keys(host: &str, files: &[PathBuf]) -> KnownHostKeys {
    use ssh_key::known_hosts::{Entry, HostPatterns, Marker};
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let mut out = KnownHostKeys::default();
    for file in files {
        let read = match std::fs::metadata(file) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => Err(crate::error::io_reason(&e)),
            // Opening a FIFO would wait for a writer forever.
            Ok(m) if !m.is_file() => Err("not a regular file".to_string()),
            Ok(_) => std::fs::read(file).map_err(|e| crate::error::io_reason(&e)),
        };
        let text = match read {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(why) => {
                out.unreadable_files
                    .push(format!("{}: {why}", file.display()));
                continue;
            }
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
        let keys = agent_identities(&msg).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].key_type, "ssh-ed25519");
        assert_eq!(keys[0].comment, "me@laptop");
        assert!(keys[0].fingerprint.starts_with("SHA256:"));
        // Truncated answers are refused, not a panic.
        for cut in 0..msg.len() {
            let _ = agent_identities(&msg[..cut]);
        }
        assert!(agent_identities(&msg[..msg.len() - 3]).is_none());
    }
}
