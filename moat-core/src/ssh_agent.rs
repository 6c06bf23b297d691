//! The filtering SSH agent of a run, and its SSH forwarders.
//!
//! A run with `ssh:<host>` grants gets an agent socket of its own, served by
//! the run's supervisor on the host and mounted into the container. Each
//! connection to it gets a connection to the user's agent (`SSH_AUTH_SOCK`
//! on the host), and each request is decided here first:
//!
//! - **list**: only the keys granted for some host of the run are shown;
//! - **sign**: only with a granted key, only on a connection the client has
//!   bound to a server with OpenSSH's `session-bind@openssh.com` extension,
//!   only when that server proved (by its signature over the session
//!   identifier) that it holds a host key known for a host the key is
//!   granted for, and only for the data of a login to that very session;
//! - adding, removing and locking keys, and every other request, are
//!   refused.
//!
//! The private keys stay in the user's agent: this agent relays signing
//! requests it allowed and their answers, nothing else. Every decision goes
//! to the run's audit log.
//!
//! The forwarders give each granted host an address on the run's network
//! (the gateway, a port per host): the container's SSH configuration points
//! the host's name there, and the supervisor dials `host:22` on the host.
//! In strict mode they are the one path out that is not HTTP.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::Verifier;
use ssh_key::public::KeyData;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, ErrorKind, Result};
use crate::proxy::upstream::ResolveMap;
pub use crate::ssh::{fingerprint, HostGrant};
use crate::ssh::{
    parse_identities, put_string, Reader, EXTENSION, FAILURE, IDENTITIES_ANSWER,
    REQUEST_IDENTITIES, SIGN_REQUEST, SIGN_RESPONSE, SUCCESS, USERAUTH_REQUEST,
};
use crate::trace::{AuditEvent, AuditSink, TraceRecord, TraceSink};

/// The largest message either side may send (OpenSSH's agent uses 256 KiB).
const MAX_MESSAGE: usize = 256 * 1024;
/// How long the user's agent may take to answer (it may ask the user to
/// confirm a signature).
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections served at once; more are closed as they arrive. Each holds
/// one connection to the user's agent, which must stay usable for the user.
pub const MAX_CONNECTIONS: usize = 32;
/// A connection that sends nothing for this long is closed (OpenSSH's
/// client closes its agent connection once it has logged in).
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Refused requests on one connection before it is closed (each is an
/// audit entry).
const MAX_REFUSALS: usize = 16;
/// Requests on one connection before it is closed (each is an audit entry;
/// an OpenSSH login makes a handful).
const MAX_REQUESTS: usize = 256;
/// Connections a forwarder carries at once.
pub const MAX_FORWARDED: usize = 64;

/// What a connection was bound to by `session-bind@openssh.com`.
#[derive(Debug, Clone)]
struct Bound {
    host_key: Vec<u8>,
    host_key_fingerprint: String,
    session_id: Vec<u8>,
    /// The granted hosts the host key belongs to (none for a stranger).
    hosts: Vec<String>,
    forwarding: bool,
}

/// The state of one client connection.
#[derive(Debug, Default)]
struct Session {
    bound: Option<Bound>,
    /// Set when the connection did something that rules out signing on it
    /// (a second, different binding).
    tainted: Option<String>,
    /// Requests refused so far.
    refused: usize,
}

/// One decision, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Decision {
    op: String,
    host: Option<String>,
    fingerprint: Option<String>,
    allowed: bool,
    reason: Option<String>,
}

impl Decision {
    fn sign(host: Option<String>, fp: &str, allowed: bool, reason: Option<String>) -> Decision {
        Decision {
            op: "sign".into(),
            host,
            fingerprint: Some(fp.to_string()),
            allowed,
            reason,
        }
    }

    fn refused(op: impl Into<String>, reason: impl Into<String>) -> Decision {
        Decision {
            op: op.into(),
            host: None,
            fingerprint: None,
            allowed: false,
            reason: Some(reason.into()),
        }
    }
}

/// Receives a note for the run's output.
type Notes = Box<dyn Fn(&str) + Send + Sync>;

/// The filtering agent of one run.
pub struct FilterAgent {
    client: String,
    grants: Vec<HostGrant>,
    upstream: PathBuf,
    audit: Option<Arc<dyn AuditSink>>,
    notes: Option<Notes>,
    /// The refusal reasons already told (each is told once).
    told: std::sync::Mutex<Vec<String>>,
}

impl std::fmt::Debug for FilterAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilterAgent")
            .field("client", &self.client)
            .field("grants", &self.grants)
            .field("upstream", &self.upstream)
            .finish()
    }
}

impl FilterAgent {
    /// An agent for `client` (the run) over the user's agent at `upstream`.
    pub fn new(
        client: &str,
        grants: Vec<HostGrant>,
        upstream: &Path,
        audit: Option<Arc<dyn AuditSink>>,
    ) -> FilterAgent {
        FilterAgent {
            client: client.to_string(),
            grants,
            upstream: upstream.to_path_buf(),
            audit,
            notes: None,
            told: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Tells `notes` why a signature was refused, once per reason (the
    /// client itself only says "Permission denied").
    pub fn with_notes(mut self, notes: impl Fn(&str) + Send + Sync + 'static) -> FilterAgent {
        self.notes = Some(Box::new(notes));
        self
    }

    fn tell(&self, reason: &str) {
        let Some(notes) = &self.notes else { return };
        let Ok(mut told) = self.told.lock() else {
            return;
        };
        if told.len() >= 8 || told.iter().any(|r| r == reason) {
            return;
        }
        told.push(reason.to_string());
        notes(&format!(
            "moat: the run's SSH agent refused to sign: {reason} (see `moat audit`)\n"
        ));
    }

    /// Checks that the user's agent answers and holds every granted key;
    /// the error names what is missing.
    pub fn check_upstream(&self) -> Result<()> {
        let keys = crate::ssh::agent_keys(&self.upstream)?;
        for g in &self.grants {
            if !keys.iter().any(|k| k.fingerprint == g.fingerprint) {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "grant \"ssh:{}\": the ssh agent at {} no longer holds key {}; add it with `ssh-add` or run `moat grant ssh --host {}` again",
                        g.host,
                        self.upstream.display(),
                        g.fingerprint,
                        g.host
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Serves clients on `listener` until `cancel`, at most
    /// [`MAX_CONNECTIONS`] at once.
    pub async fn serve(self: Arc<Self>, listener: UnixListener, cancel: CancellationToken) {
        accept_limited(listener, MAX_CONNECTIONS, cancel, move |stream| {
            let agent = self.clone();
            async move { agent.connection(stream).await }
        })
        .await;
    }

    async fn connection(&self, mut stream: UnixStream) {
        let mut session = Session::default();
        let mut upstream = None;
        let mut requests = 0usize;
        loop {
            let msg = match tokio::time::timeout(IDLE_TIMEOUT, read_message(&mut stream)).await {
                Ok(Ok(Some(msg))) => msg,
                // The client closed it, or went quiet.
                Ok(Ok(None)) | Err(_) => return,
                Ok(Err(e)) => {
                    self.record(Decision::refused(
                        "close",
                        format!("a malformed message: {e}"),
                    ));
                    return;
                }
            };
            requests += 1;
            if requests > MAX_REQUESTS {
                self.record(Decision::refused(
                    "close",
                    format!("more than {MAX_REQUESTS} requests on one connection"),
                ));
                return;
            }
            let reply = self.handle(&mut session, &mut upstream, &msg).await;
            if reply == [FAILURE] {
                session.refused += 1;
            }
            if write_message(&mut stream, &reply).await.is_err() {
                return;
            }
            if session.refused >= MAX_REFUSALS {
                self.record(Decision::refused(
                    "close",
                    format!("{MAX_REFUSALS} requests refused on one connection"),
                ));
                return;
            }
        }
    }

    /// Why the audit log cannot be written, if it cannot.
    fn audit_broken(&self) -> Option<String> {
        self.audit.as_ref().and_then(|a| a.healthy().err())
    }

    fn record(&self, d: Decision) {
        if let Some(audit) = &self.audit {
            audit.event(AuditEvent::SshAgent {
                client: self.client.clone(),
                op: d.op,
                host: d.host,
                fingerprint: d.fingerprint,
                allowed: d.allowed,
                reason: d.reason,
            });
        }
    }

    /// Answers one request.
    async fn handle(
        &self,
        session: &mut Session,
        upstream: &mut Option<UnixStream>,
        msg: &[u8],
    ) -> Vec<u8> {
        match msg.first().copied() {
            Some(REQUEST_IDENTITIES) => self.list(upstream).await,
            Some(SIGN_REQUEST) => self.sign(session, upstream, msg).await,
            Some(EXTENSION) => self.extension(session, upstream, msg).await,
            other => {
                let op = match other {
                    Some(17) => "add_identity".to_string(),
                    Some(25) => "add_id_constrained".to_string(),
                    Some(18) => "remove_identity".to_string(),
                    Some(19) => "remove_all_identities".to_string(),
                    Some(20) | Some(26) => "add_smartcard_key".to_string(),
                    Some(21) => "remove_smartcard_key".to_string(),
                    Some(22) => "lock".to_string(),
                    Some(23) => "unlock".to_string(),
                    Some(t) => format!("request {t}"),
                    None => "empty request".to_string(),
                };
                self.record(Decision::refused(
                    op,
                    "this agent only lists and signs with granted keys",
                ));
                vec![FAILURE]
            }
        }
    }

    fn granted(&self, fingerprint: &str) -> bool {
        self.grants.iter().any(|g| g.fingerprint == fingerprint)
    }

    async fn list(&self, upstream: &mut Option<UnixStream>) -> Vec<u8> {
        let answer = match self.ask(upstream, &[REQUEST_IDENTITIES]).await {
            Ok(a) => a,
            Err(e) => {
                self.record(Decision::refused("list", e));
                return vec![FAILURE];
            }
        };
        let Some(keys) = parse_identities(&answer) else {
            self.record(Decision::refused(
                "list",
                "the user's agent answered with something other than a key list",
            ));
            return vec![FAILURE];
        };
        let mut shown = Vec::new();
        let mut withheld = 0usize;
        for (blob, comment) in keys {
            if self.granted(&fingerprint(blob)) {
                shown.push((blob, comment));
            } else {
                withheld += 1;
            }
        }
        let mut out = vec![IDENTITIES_ANSWER];
        out.extend_from_slice(&(shown.len() as u32).to_be_bytes());
        for (blob, comment) in &shown {
            put_string(&mut out, blob);
            put_string(&mut out, comment);
        }
        let listed: Vec<String> = shown.iter().map(|(b, _)| fingerprint(b)).collect();
        self.record(Decision {
            op: "list".into(),
            host: None,
            fingerprint: (!listed.is_empty()).then(|| listed.join(",")),
            allowed: true,
            reason: Some(format!("{} shown, {withheld} withheld", listed.len())),
        });
        out
    }

    /// Why a sign request is refused, or the host it signs for.
    fn decide_sign(
        &self,
        session: &Session,
        key_blob: &[u8],
        data: &[u8],
    ) -> std::result::Result<String, String> {
        let fp = fingerprint(key_blob);
        let hosts: Vec<&str> = self
            .grants
            .iter()
            .filter(|g| g.fingerprint == fp)
            .map(|g| g.host.as_str())
            .collect();
        if hosts.is_empty() {
            return Err("the key is not granted to this run".into());
        }
        if let Some(why) = &session.tainted {
            return Err(why.clone());
        }
        let Some(bound) = &session.bound else {
            return Err("the client did not bind the connection to a server \
                 (session-bind@openssh.com, OpenSSH 8.9 or later), so the host cannot be known"
                .into());
        };
        if bound.forwarding {
            return Err("signing through a forwarded agent is not allowed".into());
        }
        let Some(host) = bound.hosts.iter().find(|h| hosts.contains(&h.as_str())) else {
            return Err(format!(
                "the server's host key {} is not a known key of a host this key is granted for ({})",
                bound.host_key_fingerprint,
                hosts.join(", ")
            ));
        };
        check_userauth(data, key_blob, bound)?;
        Ok(host.clone())
    }

    async fn sign(
        &self,
        session: &mut Session,
        upstream: &mut Option<UnixStream>,
        msg: &[u8],
    ) -> Vec<u8> {
        let mut r = Reader::new(&msg[1..]);
        let (Some(key_blob), Some(data), Some(_flags), true) =
            (r.string(), r.string(), r.u32(), r.done())
        else {
            self.record(Decision::refused("sign", "malformed sign request"));
            return vec![FAILURE];
        };
        let fp = fingerprint(key_blob);
        let bound_host = session
            .bound
            .as_ref()
            .and_then(|b| b.hosts.first().cloned());
        match self.decide_sign(session, key_blob, data) {
            Err(reason) => {
                self.tell(&reason);
                self.record(Decision::sign(bound_host, &fp, false, Some(reason)));
                vec![FAILURE]
            }
            Ok(host) => match self.audit_broken() {
                // Fail closed, as the proxy does: no signature the audit
                // log cannot record.
                Some(why) => {
                    let reason =
                        format!("the audit log cannot be written ({why}); nothing is signed");
                    self.tell(&reason);
                    self.record(Decision::sign(Some(host), &fp, false, Some(reason)));
                    vec![FAILURE]
                }
                None => self.sign_upstream(upstream, msg, host, &fp).await,
            },
        }
    }

    /// Asks the user's agent to sign an allowed login; audited either way.
    async fn sign_upstream(
        &self,
        upstream: &mut Option<UnixStream>,
        msg: &[u8],
        host: String,
        fp: &str,
    ) -> Vec<u8> {
        match self.ask(upstream, msg).await {
            Ok(answer) if answer.first() == Some(&SIGN_RESPONSE) => {
                self.record(Decision::sign(Some(host), fp, true, None));
                answer
            }
            Ok(_) | Err(_) => {
                let reason = "the user's agent did not sign".to_string();
                self.record(Decision::sign(Some(host), fp, true, Some(reason)));
                vec![FAILURE]
            }
        }
    }

    async fn extension(
        &self,
        session: &mut Session,
        upstream: &mut Option<UnixStream>,
        msg: &[u8],
    ) -> Vec<u8> {
        let mut r = Reader::new(&msg[1..]);
        let name = r.string().unwrap_or_default();
        if name != b"session-bind@openssh.com" {
            self.record(Decision::refused(
                format!("extension {}", printable(name, 64)),
                "unsupported extension",
            ));
            return vec![FAILURE];
        }
        let decision = self.bind(session, &mut r);
        let ok = decision.allowed;
        self.record(decision);
        if !ok {
            return vec![FAILURE];
        }
        // The user's agent learns the binding too, so its own destination
        // constraints (`ssh-add -h`) apply. Older agents refuse it; that
        // changes nothing here.
        let _ = self.ask(upstream, msg).await;
        vec![SUCCESS]
    }

    fn bind(&self, session: &mut Session, r: &mut Reader<'_>) -> Decision {
        let refuse = |reason: String| Decision::refused("bind", reason);
        let (Some(host_key), Some(session_id), Some(signature), Some(forwarding)) =
            (r.string(), r.string(), r.string(), r.u8())
        else {
            return refuse("malformed session-bind".into());
        };
        // A session identifier is an exchange hash: SHA-1, -256, -384 or
        // -512.
        if !r.done() || ![20, 32, 48, 64].contains(&session_id.len()) {
            return refuse("malformed session-bind".into());
        }
        let host_key_fingerprint = fingerprint(host_key);
        let key = match verify_binding(host_key, session_id, signature) {
            Ok(k) => k,
            Err(e) => {
                let mut d = refuse(format!("the server's signature does not verify: {e}"));
                d.fingerprint = Some(host_key_fingerprint);
                return d;
            }
        };
        let hosts: Vec<String> = self
            .grants
            .iter()
            .filter(|g| g.host_keys.contains(&key))
            .map(|g| g.host.clone())
            .collect();
        let bound = Bound {
            host_key: host_key.to_vec(),
            host_key_fingerprint: host_key_fingerprint.clone(),
            session_id: session_id.to_vec(),
            hosts: hosts.clone(),
            forwarding: forwarding != 0,
        };
        if let Some(old) = &mut session.bound {
            if old.session_id != bound.session_id || old.host_key != bound.host_key {
                session.tainted =
                    Some("the connection was bound to a second session (agent forwarding)".into());
                let mut d = refuse("a connection binds to one session only".into());
                d.fingerprint = Some(host_key_fingerprint);
                return d;
            }
            // The same binding again: it cannot undo forwarding.
            old.forwarding |= bound.forwarding;
        } else {
            session.bound = Some(bound);
        }
        Decision {
            op: "bind".into(),
            host: hosts.first().cloned(),
            fingerprint: Some(host_key_fingerprint),
            allowed: true,
            reason: if hosts.is_empty() {
                Some("the host key belongs to no granted host: signing will be refused".into())
            } else if forwarding != 0 {
                Some("forwarded: signing will be refused".into())
            } else {
                None
            },
        }
    }

    /// Sends one request to the user's agent and returns its answer.
    async fn ask(
        &self,
        upstream: &mut Option<UnixStream>,
        msg: &[u8],
    ) -> std::result::Result<Vec<u8>, String> {
        if upstream.is_none() {
            let s =
                tokio::time::timeout(Duration::from_secs(5), UnixStream::connect(&self.upstream))
                    .await
                    .map_err(|_| "the user's ssh agent did not answer".to_string())?
                    .map_err(|e| format!("cannot reach the user's ssh agent: {e}"))?;
            *upstream = Some(s);
        }
        let Some(stream) = upstream.as_mut() else {
            return Err("no connection to the user's ssh agent".into());
        };
        let exchange = async {
            write_message(stream, msg).await?;
            read_message(stream).await
        };
        let answer = match tokio::time::timeout(UPSTREAM_TIMEOUT, exchange).await {
            Ok(Ok(Some(a))) => Ok(a),
            Ok(Ok(None)) => Err("the user's ssh agent closed the connection".to_string()),
            Ok(Err(e)) => Err(format!("the user's ssh agent: {e}")),
            Err(_) => Err("the user's ssh agent did not answer in time".to_string()),
        };
        if answer.is_err() {
            *upstream = None;
        }
        answer
    }
}

/// Verifies the server's signature over the session identifier with the
/// host key it presented; returns the key.
fn verify_binding(
    host_key: &[u8],
    session_id: &[u8],
    signature: &[u8],
) -> std::result::Result<KeyData, String> {
    let key = ssh_key::PublicKey::from_bytes(host_key)
        .map_err(|e| format!("host key: {e}"))?
        .key_data()
        .clone();
    let signature =
        ssh_key::Signature::try_from(signature).map_err(|e| format!("signature: {e}"))?;
    key.verify(session_id, &signature)
        .map_err(|_| format!("bad {} signature", signature.algorithm()))?;
    Ok(key)
}

/// Checks that `data` is a publickey login (RFC 4252 §7, or OpenSSH's
/// host-bound variant) to the bound session, with the key being asked to
/// sign.
fn check_userauth(data: &[u8], key_blob: &[u8], bound: &Bound) -> std::result::Result<(), String> {
    let not_login = || "the data to sign is not a login to the bound session".to_string();
    let mut r = Reader::new(data);
    if r.string() != Some(bound.session_id.as_slice()) {
        return Err(not_login());
    }
    if r.u8() != Some(USERAUTH_REQUEST) {
        return Err(not_login());
    }
    let user = r.string().ok_or_else(not_login)?;
    if user.len() > 256 || user.contains(&0) {
        return Err(not_login());
    }
    if r.string() != Some(b"ssh-connection".as_slice()) {
        return Err(not_login());
    }
    let hostbound = match r.string() {
        Some(b"publickey") => false,
        Some(b"publickey-hostbound-v00@openssh.com") => true,
        _ => return Err(not_login()),
    };
    if r.u8() != Some(1) {
        return Err(not_login());
    }
    let algorithm = r.string().ok_or_else(not_login)?;
    if r.string() != Some(key_blob) {
        return Err(not_login());
    }
    let key_type = Reader::new(key_blob).string().ok_or_else(not_login)?;
    if !algorithm_fits(algorithm, key_type) {
        return Err(not_login());
    }
    if hostbound && r.string() != Some(bound.host_key.as_slice()) {
        return Err(not_login());
    }
    if !r.done() {
        return Err(not_login());
    }
    Ok(())
}

/// Whether a login's signature algorithm suits the key's type: itself, or
/// SHA-2 RSA signatures for RSA keys and certificates.
fn algorithm_fits(algorithm: &[u8], key_type: &[u8]) -> bool {
    match key_type {
        b"ssh-rsa" => matches!(algorithm, b"ssh-rsa" | b"rsa-sha2-256" | b"rsa-sha2-512"),
        b"ssh-rsa-cert-v01@openssh.com" => matches!(
            algorithm,
            b"ssh-rsa-cert-v01@openssh.com"
                | b"rsa-sha2-256-cert-v01@openssh.com"
                | b"rsa-sha2-512-cert-v01@openssh.com"
        ),
        other => algorithm == other,
    }
}

/// Attacker-supplied text for the audit log: at most `max` characters,
/// control characters escaped.
fn printable(bytes: &[u8], max: usize) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .flat_map(char::escape_default)
        .take(max)
        .collect()
}

/// Reads one length-prefixed message; `None` at a clean end.
async fn read_message<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_MESSAGE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("message of {len} bytes"),
        ));
    }
    // Grown as bytes arrive: a length alone reserves nothing.
    let mut msg = Vec::with_capacity(len.min(16 * 1024));
    let read = stream.take(len as u64).read_to_end(&mut msg).await?;
    if read != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "message cut short",
        ));
    }
    Ok(Some(msg))
}

async fn write_message<S: tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    msg: &[u8],
) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(msg.len() + 4);
    put_string(&mut out, msg);
    stream.write_all(&out).await?;
    stream.flush().await
}

/// Binds the agent's socket `agent.sock` in `dir` (created, 0755), open to
/// the container's user (0666; `dir` lies in the run's private directory).
/// Long paths are bound through `/proc/self/fd`, since a socket address
/// holds at most 107 bytes.
pub fn bind_socket(dir: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "create", e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| Error::io(dir, "set permissions of", e))?;
    let path = dir.join("agent.sock");
    let _ = std::fs::remove_file(&path);
    let handle = std::fs::File::open(dir).map_err(|e| Error::io(dir, "open", e))?;
    let short = {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}/agent.sock", handle.as_raw_fd()))
    };
    let target = if path.as_os_str().len() < 100 {
        &path
    } else {
        &short
    };
    let listener = UnixListener::bind(target).map_err(|e| Error::io(&path, "listen on", e))?;
    drop(handle);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| Error::io(&path, "set permissions of", e))?;
    Ok(listener)
}

/// Where a forwarder sends its connections, and what it records.
#[derive(Clone)]
pub struct Forward {
    /// The client (run).
    pub client: String,
    /// The granted host; connections go to `host:22`.
    pub host: String,
    /// Operator overrides (`MOAT_RESOLVE`).
    pub overrides: Arc<ResolveMap>,
    /// The network trace.
    pub trace: Option<Arc<dyn TraceSink>>,
    /// The audit log.
    pub audit: Option<Arc<dyn AuditSink>>,
}

impl std::fmt::Debug for Forward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forward")
            .field("client", &self.client)
            .field("host", &self.host)
            .finish()
    }
}

/// The SSH port.
pub const SSH_PORT: u16 = 22;

/// Forwards each connection on `listener` to `host:22` until `cancel`,
/// recording each in the trace and the audit log (method `SSH`).
pub async fn forward(listener: TcpListener, to: Forward, cancel: CancellationToken) {
    let to = Arc::new(to);
    accept_limited(listener, MAX_FORWARDED, cancel, move |inbound| {
        let to = to.clone();
        async move { forward_one(inbound, &to).await }
    })
    .await;
}

/// A listener whose connections [`accept_limited`] serves.
trait Acceptor {
    type Stream: Send + 'static;
    fn accept_one(&self)
        -> impl std::future::Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Acceptor for UnixListener {
    type Stream = UnixStream;
    async fn accept_one(&self) -> std::io::Result<UnixStream> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Acceptor for TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_one(&self) -> std::io::Result<tokio::net::TcpStream> {
        self.accept().await.map(|(s, _)| s)
    }
}

/// Accepts connections until `cancel`, serving at most `max` at once with
/// `serve` (one more is closed as it arrives); each stops at `cancel` too.
async fn accept_limited<L, F, Fut>(listener: L, max: usize, cancel: CancellationToken, serve: F)
where
    L: Acceptor,
    F: Fn(L::Stream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(max));
    loop {
        let stream = tokio::select! {
            r = listener.accept_one() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = cancel.cancelled() => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let work = serve(stream);
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = work => {}
                () = cancel.cancelled() => {}
            }
            drop(slot);
        });
    }
}

/// A forwarded connection's record, written when the connection ends
/// however it ends (closed, reset, or cut by the run's stop): with the
/// bytes that passed either way, counted as they passed.
struct Forwarded {
    record: TraceRecord,
    started: Instant,
    up: Arc<std::sync::atomic::AtomicU64>,
    down: Arc<std::sync::atomic::AtomicU64>,
    trace: Option<Arc<dyn TraceSink>>,
    audit: Option<Arc<dyn AuditSink>>,
}

impl Drop for Forwarded {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        let mut record = std::mem::take(&mut self.record);
        record.request_bytes = self.up.load(Ordering::Relaxed);
        record.response_bytes = self.down.load(Ordering::Relaxed);
        record.duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        crate::trace::emit(self.trace.as_ref(), self.audit.as_ref(), record);
    }
}

async fn forward_one(inbound: tokio::net::TcpStream, to: &Forward) {
    let mut done = Forwarded {
        record: TraceRecord {
            time: crate::trace::now_rfc3339(),
            client: to.client.clone(),
            method: "SSH".into(),
            url: format!("ssh://{}:{SSH_PORT}", to.host),
            host: to.host.clone(),
            port: SSH_PORT,
            grant: Some(format!("ssh:{}", to.host)),
            ..TraceRecord::default()
        },
        started: Instant::now(),
        up: Arc::default(),
        down: Arc::default(),
        trace: to.trace.clone(),
        audit: to.audit.clone(),
    };
    match crate::proxy::upstream::dial(&to.host, SSH_PORT, &to.overrides, Duration::from_secs(10))
        .await
    {
        Ok(mut outbound) => {
            let _ = outbound.set_nodelay(true);
            let _ = inbound.set_nodelay(true);
            // Read from the client: up; written to it: down.
            let mut inbound = crate::net::Metered::new(inbound, done.up.clone(), done.down.clone());
            if let Err(e) = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await {
                done.record.error = Some(e.to_string());
            }
        }
        Err(e) => done.record.error = Some(e.to_string()),
    }
}

#[cfg(test)]
mod tests;
