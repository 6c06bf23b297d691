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

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::paths;
pub use crate::ssh::{
    agent_keys, agent_socket, known_host_keys, known_hosts_files, AgentKey, KnownHostKeys,
};

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
        .map_err(|e| Error::new(ErrorKind::InvalidArgument, format!("host: {e}")))?;
    if host.contains('*') || pattern.port().is_some() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "host: name one host, without wildcards or a port",
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
                            "key {fp}: the ssh agent holds no such key; it holds {}",
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
