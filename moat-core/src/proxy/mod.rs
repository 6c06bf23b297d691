//! The credential-injecting forward proxy.
//!
//! One [`Proxy`] serves many clients (runs). Each client registers a
//! [`ClientSpec`] (credentials, policy, trace and audit sinks) and gets its
//! own random token; it authenticates every request with
//! `Proxy-Authorization: Basic base64("moat:<token>")`.
//!
//! Phases of a request, each in one function below:
//! 1. `handle_proxy_request`: authenticate (407), then CONNECT or an
//!    absolute-form `http://` request. Policy is checked here (403).
//! 2. `handle_tunnel`: after CONNECT, the first byte tells TLS (0x16,
//!    intercepted) from anything else (a raw tunnel: permissive only, or a
//!    strict allow entry naming the port).
//! 3. `intercept`: the TLS ClientHello's SNI must equal the CONNECT host;
//!    a leaf from the moat CA is presented; HTTP/1.1 or HTTP/2 by ALPN.
//! 4. `handle_intercepted`: each request's Host / `:authority` must equal the
//!    CONNECT host and port (421 otherwise, nothing injected); credentials
//!    for that host replace any client-sent header of the same name; the
//!    request goes upstream over verified TLS through a pooled client.
//! 5. The response streams back; a trace record is written when its body
//!    ends; credential injections and policy decisions go to the audit sink.
//!
//! Invariants: a credential is only sent over upstream TLS that verified, to
//! its own host and port, never over plain HTTP; redirects are never
//! followed; loopback, private, link-local and metadata destinations are
//! refused unless the operator mapped the host with `MOAT_RESOLVE`.

mod body;
pub mod ca;
pub mod dest;
pub mod phase;
mod server;
pub mod upstream;
mod workers;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::{Error, ErrorKind, Result};
use crate::policy::{HostPattern, Policy, PolicyMode};
use crate::secret::Secret;
use crate::trace::{AuditSink, TraceSink};

pub use phase::{Fault, HeaderCredentials, Phase};

pub use crate::net::Listen;
pub use ca::CertificateAuthority;
pub use upstream::ResolveMap;

/// A credential the proxy injects: a header for a host (or `*.` pattern) and
/// port.
#[derive(Debug, Clone)]
pub struct Credential {
    host: HostPattern,
    header: HeaderName,
    value: Secret<HeaderValue>,
    grant: String,
}

impl Credential {
    /// A credential for `host` (`api.github.com`, `*.example.com`, with an
    /// optional `:port`; without one, port 443), sent as header `header`.
    /// Errors never include the value.
    pub fn new(host: &str, header: &str, value: &str) -> Result<Credential> {
        let pattern = HostPattern::parse(host)
            .map_err(|e| Error::new(ErrorKind::InvalidArgument, format!("credential host: {e}")))?;
        let header = HeaderName::from_bytes(header.as_bytes()).map_err(|_| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!("credential for {host}: \"{header}\" is not a valid header name"),
            )
        })?;
        let mut value = HeaderValue::from_str(value).map_err(|_| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!("credential for {host}: the value is not a valid header value (control characters or non-ascii)"),
            )
        })?;
        value.set_sensitive(true);
        Ok(Credential {
            host: pattern,
            header,
            value: Secret::new(value),
            grant: "custom".to_string(),
        })
    }

    /// Names the grant this credential comes from (for trace and audit).
    pub fn with_grant(mut self, grant: impl Into<String>) -> Credential {
        self.grant = grant.into();
        self
    }

    /// The grant's name.
    pub fn grant(&self) -> &str {
        &self.grant
    }

    /// The header this credential sets.
    pub fn header(&self) -> &HeaderName {
        &self.header
    }

    /// Does this credential apply to `host:port`? Without a port in its
    /// pattern, only 443.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        let want = self.host.port().unwrap_or(443);
        port == want && self.host.matches(host, want)
    }
}

/// The variables that send a process's HTTP(S) through the proxy at `url`
/// (which carries the client's token) and make curl, OpenSSL, Python,
/// requests, Node and git trust the CA bundle at `ca_path`.
pub fn proxy_env(url: &str, ca_path: &str) -> Vec<(String, String)> {
    let no_proxy = "localhost,127.0.0.1,::1";
    let mut env = Vec::new();
    for key in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
        env.push((key.to_string(), url.to_string()));
    }
    for key in ["NO_PROXY", "no_proxy"] {
        env.push((key.to_string(), no_proxy.to_string()));
    }
    for key in [
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "NODE_EXTRA_CA_CERTS",
        "GIT_SSL_CAINFO",
        "CURL_CA_BUNDLE",
    ] {
        env.push((key.to_string(), ca_path.to_string()));
    }
    env
}

/// What a client (a run) registers with the proxy.
#[derive(Clone)]
pub struct ClientSpec {
    /// A name for traces and audit events (the run id).
    pub name: String,
    /// Credentials to inject for this client only.
    pub credentials: Vec<Credential>,
    /// Permissive or strict.
    pub policy: PolicyMode,
    /// The allow list for strict mode.
    pub allow: Vec<HostPattern>,
    /// Where trace records go.
    pub trace: Option<Arc<dyn TraceSink>>,
    /// Where audit events go.
    pub audit: Option<Arc<dyn AuditSink>>,
    /// Keep up to this many bytes of text request and response bodies in
    /// trace records; 0 (the default) keeps none.
    pub capture_bodies: usize,
    /// Extensions of this client's requests beyond its header credentials
    /// (the AWS credential endpoint, say); see [`phase`].
    pub phases: Vec<Arc<dyn Phase>>,
    /// Request rules per host (`network.rules`): decided per request, with
    /// git pushes judged by ref.
    pub rules: Vec<crate::policy::rules::HostRules>,
}

impl std::fmt::Debug for ClientSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSpec")
            .field("name", &self.name)
            .field("credentials", &self.credentials)
            .field("policy", &self.policy)
            .field("allow", &self.allow)
            .finish_non_exhaustive()
    }
}

impl ClientSpec {
    /// A permissive client with no credentials and no sinks.
    pub fn new(name: impl Into<String>) -> ClientSpec {
        ClientSpec {
            name: name.into(),
            credentials: Vec::new(),
            policy: PolicyMode::Permissive,
            allow: Vec::new(),
            trace: None,
            audit: None,
            capture_bodies: 0,
            phases: Vec::new(),
            rules: Vec::new(),
        }
    }
}

/// A registered client: its id and token.
#[derive(Debug, Clone)]
pub struct ClientHandle {
    id: u64,
    token: Secret<String>,
    name: String,
}

impl ClientHandle {
    /// The client's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The proxy URL with this client's token, for `HTTP_PROXY`. It grants
    /// the use of this client's credentials: give it only to that client.
    pub fn proxy_url(&self, addr: SocketAddr) -> Secret<String> {
        Secret::new(format!("http://moat:{}@{addr}", self.token.expose()))
    }
}

pub(crate) struct ClientCtx {
    id: u64,
    token: Vec<u8>,
    name: String,
    policy: Policy,
    audit: Option<Arc<dyn AuditSink>>,
    capture_bodies: usize,
    /// The client's phases: its header credentials first, then the rest.
    phases: Vec<Arc<dyn Phase>>,
    /// Where its finished requests go.
    recorder: server::Recorder,
    /// Its own upstream pools, once a phase of its chose an upstream.
    own_pools: std::sync::OnceLock<server::Pools>,
}

/// Limits on client connections, with their defaults.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request head (status line and headers); larger gets 431.
    /// Default 64 KiB.
    pub max_header_bytes: usize,
    /// Time to read a request head. Default 30 s.
    pub header_timeout: Duration,
    /// Time for a client's TLS handshake (and its first byte after CONNECT).
    /// Default 10 s.
    pub handshake_timeout: Duration,
    /// Time to connect to an upstream, TLS included. Default 15 s.
    pub connect_timeout: Duration,
    /// Time from sending a request upstream to its response head; longer
    /// gets 504 (and a trace record saying so). Default 600 s, for model
    /// APIs that answer slowly; `MOAT_RESPONSE_TIMEOUT` (seconds) sets it.
    pub response_timeout: Duration,
    /// Concurrent client connections; more are closed at once. Default 4096.
    pub max_connections: usize,
    /// Worker threads serving client connections, each with its own
    /// single-threaded runtime and upstream pools. Default: the cores this
    /// process may run on, at most 8.
    pub workers: usize,
    /// Bytes of request bodies held at once, by every client together, to
    /// judge them (a git push's ref updates, read whole before any of the
    /// push is sent); a push that would pass it is refused with a message
    /// to try again. Default 64 MiB.
    pub held_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_header_bytes: 64 * 1024,
            header_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(15),
            response_timeout: Duration::from_secs(600),
            max_connections: 4096,
            workers: workers::default_count(),
            held_body_bytes: 64 << 20,
        }
    }
}

/// Builds a [`Proxy`].
#[derive(Debug, Clone)]
pub struct ProxyBuilder {
    listen: SocketAddr,
    listen_at: Listen,
    home: Option<PathBuf>,
    extra_roots: Vec<CertificateDer<'static>>,
    resolve: ResolveMap,
    limits: Limits,
}

impl Default for ProxyBuilder {
    fn default() -> Self {
        ProxyBuilder::new()
    }
}

impl ProxyBuilder {
    /// Listens on `127.0.0.1:0` (never all interfaces by default), CA under
    /// `$MOAT_HOME`, system roots only, no overrides.
    pub fn new() -> ProxyBuilder {
        ProxyBuilder {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            listen_at: Listen::Now,
            home: None,
            extra_roots: Vec::new(),
            resolve: ResolveMap::new(),
            limits: Limits::default(),
        }
    }

    /// Like [`ProxyBuilder::new`], plus the operator settings from the
    /// environment: `MOAT_UPSTREAM_CA_FILE` (extra PEM roots),
    /// `MOAT_RESOLVE` (`host:port=addr:port,...`) and
    /// `MOAT_RESPONSE_TIMEOUT` (seconds to wait for a response head).
    pub fn from_env() -> Result<ProxyBuilder> {
        let mut b = ProxyBuilder::new();
        let (roots, resolve) = upstream::env_settings()?;
        b.extra_roots = roots;
        b.resolve = resolve;
        if let Some(text) = std::env::var_os("MOAT_RESPONSE_TIMEOUT").filter(|v| !v.is_empty()) {
            let text = text.to_string_lossy();
            let secs: u64 = text.trim().parse().ok().filter(|s| *s > 0).ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "MOAT_RESPONSE_TIMEOUT: \"{text}\" is not a number of seconds (1 or more)"
                    ),
                )
            })?;
            b.limits.response_timeout = Duration::from_secs(secs);
        }
        Ok(b)
    }

    /// The address to listen on.
    pub fn listen(mut self, addr: SocketAddr) -> ProxyBuilder {
        self.listen = addr;
        self.listen_at = Listen::Now;
        self
    }

    /// Listens on `addr`, which may appear on this host only later (a
    /// Podman network's gateway, up once its first container starts).
    pub fn listen_before_up(mut self, addr: SocketAddr) -> ProxyBuilder {
        self.listen = addr;
        self.listen_at = Listen::BeforeUp;
        self
    }

    /// The moat home (the CA lives in `<home>/proxy/ca`).
    pub fn home(mut self, home: impl Into<PathBuf>) -> ProxyBuilder {
        self.home = Some(home.into());
        self
    }

    /// Trusts the PEM certificates in `path` for upstream TLS, besides the
    /// system roots.
    pub fn upstream_ca_file(mut self, path: &Path) -> Result<ProxyBuilder> {
        self.extra_roots.extend(upstream::load_pem_roots(path)?);
        Ok(self)
    }

    /// Connects to `addr` whenever `host:port` is requested (like curl's
    /// `--resolve`). The address is exempt from destination checks: it is
    /// the operator's choice.
    pub fn resolve(mut self, host: &str, port: u16, addr: SocketAddr) -> ProxyBuilder {
        self.resolve.insert(
            (host.trim_end_matches('.').to_ascii_lowercase(), port),
            addr,
        );
        self
    }

    /// Adds overrides in `MOAT_RESOLVE` syntax.
    pub fn resolve_str(mut self, text: &str) -> Result<ProxyBuilder> {
        self.resolve.extend(upstream::parse_resolve(text)?);
        Ok(self)
    }

    /// Sets the connection limits.
    pub fn limits(mut self, limits: Limits) -> ProxyBuilder {
        self.limits = limits;
        self
    }

    /// Creates or loads the CA, binds the listener and starts serving. Must
    /// be called inside a tokio runtime.
    pub async fn start(self) -> Result<Proxy> {
        let home = crate::paths::home_or_default(self.home.as_deref())?;
        let ca = CertificateAuthority::load_or_create(&home.join("proxy").join("ca"))?;
        let listener = crate::net::listen(self.listen, self.listen_at).map_err(|e| {
            Error::new(
                ErrorKind::Io,
                format!("cannot listen on {}: {}", self.listen, e),
            )
        })?;
        let addr = listener.local_addr().map_err(|e| {
            Error::new(
                ErrorKind::Io,
                format!("cannot read the listen address: {e}"),
            )
        })?;
        let tls = upstream::client_tls(&self.extra_roots)?;
        let count = self.limits.workers;
        let shared = Arc::new(server::Shared::new(
            ca,
            tls,
            Arc::new(self.resolve),
            self.limits,
        ));
        let (workers, dispatch) = workers::Workers::start(&shared, count)?;
        let task = tokio::spawn(server::accept_loop(listener, shared.clone(), dispatch));
        tracing::info!(%addr, workers = count, "moat proxy listening");
        Ok(Proxy {
            shared,
            addr,
            accept_task: Some(task),
            workers: Some(workers),
        })
    }
}

/// A running proxy. Dropping it stops accepting and cuts its connections;
/// [`Proxy::shutdown`] also waits for them to end.
pub struct Proxy {
    shared: Arc<server::Shared>,
    addr: SocketAddr,
    accept_task: Option<tokio::task::JoinHandle<()>>,
    workers: Option<workers::Workers>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// A builder with defaults ([`ProxyBuilder::new`]).
    pub fn builder() -> ProxyBuilder {
        ProxyBuilder::new()
    }

    /// The operator's host:port → address overrides (`MOAT_RESOLVE`), for
    /// other ways out of a run (the SSH forwarders) to follow the same ones.
    pub(crate) fn overrides(&self) -> Arc<upstream::ResolveMap> {
        self.shared.overrides.clone()
    }

    /// The address the proxy listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CA certificate clients must trust.
    pub fn ca_cert_path(&self) -> &Path {
        self.shared.ca.cert_path()
    }

    /// The CA.
    pub fn ca(&self) -> &CertificateAuthority {
        &self.shared.ca
    }

    /// Registers a client and returns its handle (with a fresh 32-byte
    /// random token).
    pub fn register(&self, spec: ClientSpec) -> Result<ClientHandle> {
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(|e| {
            Error::new(
                ErrorKind::Internal,
                format!("no randomness for a token: {e}"),
            )
        })?;
        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        // The records go to the client's own phases (its header credentials
        // log nothing): with no sink and no such phase, none is built.
        let loggers: Arc<[Arc<dyn Phase>]> = spec.phases.clone().into();
        let mut phases: Vec<Arc<dyn Phase>> = vec![Arc::new(HeaderCredentials(spec.credentials))];
        phases.extend(spec.phases);
        let grant_hosts = phases.iter().flat_map(|p| p.hosts()).collect();
        let id = self.shared.next_id();
        let ctx = Arc::new(ClientCtx {
            id,
            token: token.as_bytes().to_vec(),
            name: spec.name.clone(),
            policy: Policy {
                mode: spec.policy,
                allow: spec.allow,
                grant_hosts,
                rules: spec.rules,
            },
            recorder: server::Recorder {
                trace: spec.trace,
                audit: spec.audit.clone(),
                phases: loggers,
            },
            audit: spec.audit,
            own_pools: std::sync::OnceLock::new(),
            capture_bodies: spec.capture_bodies,
            phases,
        });
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.shared
            .clients
            .write()
            .map_err(|_| Error::new(ErrorKind::Internal, "client table lock poisoned"))?
            .insert(key, ctx);
        Ok(ClientHandle {
            id,
            token: Secret::new(token),
            name: spec.name,
        })
    }

    /// Removes a client: its token stops working at once.
    pub fn unregister(&self, handle: &ClientHandle) {
        if let Ok(mut clients) = self.shared.clients.write() {
            clients.retain(|_, c| c.id != handle.id);
        }
    }

    /// The environment a child process needs to use this proxy as `handle`:
    /// proxy variables (with the token) and CA trust for common tools.
    pub fn client_env(&self, handle: &ClientHandle) -> Vec<(String, String)> {
        proxy_env(
            handle.proxy_url(self.addr).expose(),
            &self.ca_cert_path().to_string_lossy(),
        )
    }

    /// Stops accepting, cuts open connections and waits (up to 5 s) for
    /// their tasks to end.
    pub async fn shutdown(mut self) {
        self.shared.cancel.cancel();
        self.shared.tasks.close();
        if let Some(task) = self.accept_task.take() {
            let _ = task.await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.shared.tasks.wait()).await;
        // The accept loop has ended, so the workers are ending too.
        if let Some(workers) = self.workers.take() {
            workers.join().await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
        self.shared.tasks.close();
    }
}

impl server::Shared {
    /// Finds the client whose token is in `Proxy-Authorization`. The table
    /// is keyed by the token's SHA-256 and the token is then compared in
    /// constant time, so timing tells nothing about any token.
    pub(crate) fn authenticate(&self, header: Option<&HeaderValue>) -> Option<Arc<ClientCtx>> {
        use base64::Engine;
        let value = header?.to_str().ok()?;
        let (scheme, b64) = value.trim().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .ok()?;
        let (user, token) = decoded.split_at(decoded.iter().position(|b| *b == b':')?);
        let token = &token[1..];
        if user != b"moat" {
            return None;
        }
        let key: [u8; 32] = Sha256::digest(token).into();
        let clients = self.clients.read().ok()?;
        let ctx = clients.get(&key)?;
        if bool::from(ctx.token.as_slice().ct_eq(token)) {
            Some(ctx.clone())
        } else {
            None
        }
    }
}

pub(crate) type ClientTable = RwLock<HashMap<[u8; 32], Arc<ClientCtx>>>;
