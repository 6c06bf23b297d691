//! A run's SSH grants: the filtering agent and a forwarder per granted host.

use std::sync::Arc;

use super::Supervision;
use crate::error::{Error, ErrorKind, Result};
use crate::trace::TraceSink;

/// Starts the run's filtering SSH agent (its socket in `<run>/ssh/`) and a
/// forwarder per granted host on `gateway`; returns each host's grant and
/// forwarder port. The agent's notes (why it refused to sign) go to `notes`,
/// and from there to the run's output.
pub(super) async fn start(
    run: &mut Supervision,
    grants: Vec<crate::ssh_agent::HostGrant>,
    gateway: std::net::IpAddr,
    overrides: Arc<crate::proxy::upstream::ResolveMap>,
    trace: Arc<dyn TraceSink>,
    notes: tokio::sync::mpsc::Sender<String>,
) -> Result<Vec<(crate::ssh_agent::HostGrant, u16)>> {
    use crate::ssh_agent::{FilterAgent, Forward};
    let names: Vec<String> = grants.iter().map(|g| format!("ssh:{}", g.host)).collect();
    let upstream = run.services.ssh_agent.clone().ok_or_else(|| {
        Error::new(
            ErrorKind::Config,
            format!(
                "{} need the user's SSH agent, but SSH_AUTH_SOCK is not set; start one with `eval $(ssh-agent)` and add the key with `ssh-add`",
                names.join(", ")
            ),
        )
    })?;
    let audit: Arc<dyn crate::trace::AuditSink> = run.audit.clone();
    let agent = Arc::new(
        FilterAgent::new(&run.id, grants.clone(), &upstream, Some(audit.clone())).with_notes(
            move |note: &str| {
                // Bounded: a flood of refusals drops notes (each is also
                // audited), it never queues without limit.
                let _ = notes.try_send(note.to_string());
            },
        ),
    );
    let check = agent.clone();
    tokio::task::spawn_blocking(move || check.check_upstream())
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, format!("ssh agent check: {e}")))??;
    let listener = crate::ssh_agent::bind_socket(&run.dir.join("ssh"))?;
    let cancel = tokio_util::sync::CancellationToken::new();
    run.built.ssh_cancel = Some(cancel.clone());
    tokio::spawn(agent.serve(listener, cancel.clone()));
    let mut hosts = Vec::new();
    let listen_at = run.listen_at()?;
    for g in grants {
        let addr = std::net::SocketAddr::new(gateway, 0);
        let listener = crate::net::listen(addr, listen_at).map_err(|e| {
            Error::new(
                ErrorKind::Io,
                format!("ssh forwarder for {} on {gateway}: {e}", g.host),
            )
        })?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::new(ErrorKind::Io, format!("ssh forwarder: {e}")))?
            .port();
        let to = Forward {
            client: run.id.clone(),
            host: g.host.clone(),
            overrides: overrides.clone(),
            trace: Some(trace.clone()),
            audit: Some(audit.clone()),
        };
        tokio::spawn(crate::ssh_agent::forward(listener, to, cancel.clone()));
        hosts.push((g, port));
    }
    Ok(hosts)
}
