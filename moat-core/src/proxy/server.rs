//! The proxy's connection handling; see the phases in `proxy/mod.rs`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::body::{empty, full, BoxError, Capture, Counted, Metered, Prefixed, ProxyBody};
use super::upstream::{self, ConnectError, Connector, ResolveMap};
use super::{CertificateAuthority, ClientCtx, ClientTable, Limits};
use crate::policy::blocked_message;
use crate::trace::{emit, now_rfc3339, AuditEvent, TraceRecord};

pub(crate) struct Shared {
    pub ca: CertificateAuthority,
    pub clients: ClientTable,
    pub cancel: CancellationToken,
    pub tasks: TaskTracker,
    https: Client<Connector, ProxyBody>,
    http: Client<Connector, ProxyBody>,
    /// Upstream TLS offering only HTTP/1.1, for WebSocket upgrades.
    tls_h1: Arc<rustls::ClientConfig>,
    /// Client TLS sessions, shared by every intercepted connection so that
    /// clients can resume (TLS 1.2 ids and TLS 1.3 tickets).
    session_cache: Arc<dyn rustls::server::StoresServerSessions>,
    ticketer: Option<Arc<dyn rustls::server::ProducesTickets>>,
    pub(crate) overrides: Arc<ResolveMap>,
    limits: Limits,
    connections: Arc<Semaphore>,
    ids: AtomicU64,
}

impl Shared {
    pub(crate) fn new(
        ca: CertificateAuthority,
        tls: Arc<rustls::ClientConfig>,
        overrides: Arc<ResolveMap>,
        limits: Limits,
    ) -> Shared {
        let client = |tls: Option<Arc<rustls::ClientConfig>>| {
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(std::time::Duration::from_secs(60))
                // After a burst, keep a few warm connections per upstream,
                // not one per request of the burst.
                .pool_max_idle_per_host(32)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .build(Connector {
                    overrides: overrides.clone(),
                    tls,
                    timeout: limits.connect_timeout,
                })
        };
        let mut h1 = (*tls).clone();
        h1.alpn_protocols = vec![b"http/1.1".to_vec()];
        Shared {
            tls_h1: Arc::new(h1),
            session_cache: rustls::server::ServerSessionMemoryCache::new(4096),
            ticketer: rustls::crypto::ring::Ticketer::new().ok(),
            ca,
            clients: ClientTable::default(),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            https: client(Some(tls)),
            http: client(None),
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            overrides,
            limits,
            ids: AtomicU64::new(1),
        }
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }
}

pub(crate) async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            () = shared.cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection limit reached; closing");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let conn_shared = shared.clone();
        shared.tasks.spawn(async move {
            let _permit = permit;
            serve_client(tcp, conn_shared).await;
        });
    }
}

async fn serve_client(tcp: tokio::net::TcpStream, shared: Arc<Shared>) {
    let cancel = shared.cancel.clone();
    let svc_shared = shared.clone();
    let service = service_fn(move |req| handle_proxy_request(svc_shared.clone(), req));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.limits.header_timeout)
        .max_buf_size(shared.limits.max_header_bytes.max(8192))
        .serve_connection(TokioIo::new(tcp), service)
        .with_upgrades();
    tokio::select! {
        result = conn => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
        }
        () = cancel.cancelled() => {}
    }
}

/// Hands a finished request to the client's trace sink and, as a `request`
/// event, to its audit sink.
fn text_response(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Splits `host[:port]` (IPv6 in brackets), lowercasing and dropping a
/// trailing dot.
pub(crate) fn split_authority(text: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let end = rest.find(']')?;
        let host = &rest[..end];
        let after = &rest[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        (host.to_string(), port)
    } else {
        match text.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p.parse().ok()?)),
            None => (text.to_string(), None),
        }
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty()
        || host
            .chars()
            .any(|c| c.is_whitespace() || c == '/' || c == '@')
    {
        return None;
    }
    Some((host, port))
}

struct Outcome<'a> {
    ctx: &'a ClientCtx,
    method: String,
    url: String,
    host: String,
    port: u16,
    started: Instant,
    time: String,
}

impl<'a> Outcome<'a> {
    /// The outcome of a request starting now.
    fn new(ctx: &'a ClientCtx, method: String, url: String, host: &str, port: u16) -> Outcome<'a> {
        Outcome {
            ctx,
            method,
            url,
            host: host.to_string(),
            port,
            started: Instant::now(),
            time: now_rfc3339(),
        }
    }

    fn record(&self, status: Option<u16>, denied: Option<String>, error: Option<String>) {
        emit(
            self.ctx.trace.as_ref(),
            self.ctx.audit.as_ref(),
            &TraceRecord {
                denied,
                error,
                ..self.trace_record(status)
            },
        );
    }

    /// A trace record of this request with nothing measured yet.
    fn trace_record(&self, status: Option<u16>) -> TraceRecord {
        TraceRecord {
            time: self.time.clone(),
            client: self.ctx.name.clone(),
            method: self.method.clone(),
            url: self.url.clone(),
            host: self.host.clone(),
            port: self.port,
            status,
            duration_ms: self.started.elapsed().as_secs_f64() * 1000.0,
            ..TraceRecord::default()
        }
    }

    /// Records a request that was refused (`denied`: by the destination
    /// check) or failed, and builds the answer the client gets.
    fn fail(&self, status: StatusCode, msg: String, denied: bool) -> Response<ProxyBody> {
        if denied {
            self.decision(false, "destination");
        }
        self.record(
            Some(status.as_u16()),
            denied.then(|| msg.clone()),
            (!denied).then(|| msg.clone()),
        );
        text_response(status, format!("Moat: {msg}\n"))
    }

    fn decision(&self, allowed: bool, rule: &str) {
        if let Some(audit) = &self.ctx.audit {
            audit.event(&AuditEvent::PolicyDecision {
                client: self.ctx.name.clone(),
                host: self.host.clone(),
                port: self.port,
                allowed,
                rule: rule.to_string(),
            });
        }
    }
}

/// The size of a request head as sent: request line and header lines.
fn head_size<B>(req: &Request<B>) -> usize {
    let line = req.method().as_str().len() + req.uri().to_string().len() + 12;
    line + req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
}

fn too_large() -> Response<ProxyBody> {
    text_response(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "Moat: request headers too large\n",
    )
}

async fn handle_proxy_request(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    if head_size(&req) > shared.limits.max_header_bytes {
        return Ok(too_large());
    }
    let Some(ctx) = shared.authenticate(req.headers().get(header::PROXY_AUTHORIZATION)) else {
        let mut resp = text_response(
            StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            "Moat: proxy authentication required (use the proxy URL moat gave this run)\n",
        );
        resp.headers_mut().insert(
            header::PROXY_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"moat\""),
        );
        return Ok(resp);
    };
    if req.method() == Method::CONNECT {
        return Ok(handle_connect(shared, ctx, req));
    }
    if req.uri().scheme_str() == Some("http")
        && req.uri().host() == Some(crate::credential::aws::CREDENTIALS_HOST)
    {
        return Ok(aws_credentials(&ctx, &req).await);
    }
    if req.uri().scheme_str() == Some("http") && req.uri().authority().is_some() {
        return Ok(forward_plain(shared, ctx, req).await);
    }
    Ok(text_response(
        StatusCode::BAD_REQUEST,
        "Moat: this is a forward proxy; send absolute http:// URLs or CONNECT\n",
    ))
}

/// Serves `http://moat.internal/aws/credentials` to a client with an AWS
/// grant: its role's session credentials in `credential_process` format.
async fn aws_credentials(ctx: &ClientCtx, req: &Request<Incoming>) -> Response<ProxyBody> {
    use crate::credential::aws::{RoleSession, CREDENTIALS_PATH};
    let out = Outcome::new(
        ctx,
        req.method().to_string(),
        req.uri().to_string(),
        crate::credential::aws::CREDENTIALS_HOST,
        80,
    );
    if req.uri().path() != CREDENTIALS_PATH || req.method() != Method::GET {
        out.record(Some(404), Some("unknown moat endpoint".into()), None);
        return text_response(StatusCode::NOT_FOUND, "Moat: no such moat endpoint\n");
    }
    let Some(session) = &ctx.aws else {
        out.record(Some(404), Some("this client has no aws grant".into()), None);
        return text_response(
            StatusCode::NOT_FOUND,
            "Moat: this run has no aws grant; run with --grant aws after `moat grant aws --role=ARN`\n",
        );
    };
    match session.credentials().await {
        Ok(creds) => {
            if let Some(audit) = &ctx.audit {
                audit.event(&AuditEvent::AwsCredentialsIssued {
                    client: ctx.name.clone(),
                    role_arn: session_role(session),
                    access_key_id: creds.access_key_id.clone(),
                    expiration: creds.expiration.clone(),
                });
            }
            out.record(Some(200), None, None);
            let mut resp = Response::new(full(RoleSession::process_json(&creds)));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp
        }
        Err(e) => {
            let msg = e.to_string();
            out.record(Some(502), None, Some(msg.clone()));
            text_response(StatusCode::BAD_GATEWAY, format!("Moat: {msg}\n"))
        }
    }
}

fn session_role(session: &crate::credential::aws::RoleSession) -> String {
    session.role_arn().to_string()
}

fn handle_connect(
    shared: Arc<Shared>,
    ctx: Arc<ClientCtx>,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let authority = req.uri().authority().map(|a| a.as_str().to_string());
    let Some((host, port)) = authority.as_deref().and_then(split_authority) else {
        return text_response(StatusCode::BAD_REQUEST, "Moat: CONNECT needs host:port\n");
    };
    let port = port.unwrap_or(443);
    let out = Outcome::new(
        &ctx,
        "CONNECT".into(),
        format!("{host}:{port}"),
        &host,
        port,
    );
    let decision = ctx.policy.decide(&host, port);
    let tunnel = ctx.policy.decide_tunnel(&host, port);
    if !decision.allowed && !tunnel.allowed {
        out.decision(false, &decision.rule);
        out.record(Some(403), Some("network policy".into()), None);
        return text_response(StatusCode::FORBIDDEN, blocked_message(&host));
    }
    // An IP literal is checked now; names are checked when dialled.
    if !shared.overrides.contains_key(&(host.clone(), port)) {
        if let Some(ip) = super::dest::parse_ip(&host) {
            if let Some(reason) = super::dest::forbidden_reason(ip) {
                let msg = ConnectError::Refused {
                    host: host.clone(),
                    addr: ip,
                    reason,
                }
                .to_string();
                out.decision(false, "destination");
                out.record(Some(403), Some(msg.clone()), None);
                return text_response(StatusCode::FORBIDDEN, format!("Moat: {msg}\n"));
            }
        }
    }
    // Audited once per tunnel, with the rule that let it through; a later
    // refusal inside the tunnel (identity, destination) is audited too.
    let rule = if decision.allowed {
        &decision.rule
    } else {
        &tunnel.rule
    };
    out.decision(true, rule);
    let task_shared = shared.clone();
    let cancel = shared.cancel.clone();
    shared.tasks.spawn(async move {
        let work = async {
            match hyper::upgrade::on(req).await {
                Ok(upgraded) => handle_tunnel(task_shared, ctx, host, port, upgraded).await,
                Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
            }
        };
        tokio::select! {
            () = work => {}
            () = cancel.cancelled() => {}
        }
    });
    Response::new(empty())
}

async fn handle_tunnel(
    shared: Arc<Shared>,
    ctx: Arc<ClientCtx>,
    host: String,
    port: u16,
    upgraded: hyper::upgrade::Upgraded,
) {
    let mut io = TokioIo::new(upgraded);
    let mut first = [0u8; 1];
    let n = match tokio::time::timeout(shared.limits.handshake_timeout, io.read(&mut first)).await {
        Ok(Ok(n)) => n,
        _ => return,
    };
    if n == 0 {
        return;
    }
    let io = Prefixed::new(Bytes::copy_from_slice(&first[..n]), io);
    let out = Outcome::new(
        &ctx,
        "CONNECT".into(),
        format!("{host}:{port}"),
        &host,
        port,
    );
    if first[0] == 0x16 {
        if !ctx.policy.decide(&host, port).allowed {
            out.decision(false, "strict");
            out.record(None, Some("network policy".into()), None);
            return;
        }
        intercept(shared, ctx.clone(), host, port, io).await;
        return;
    }
    // Not TLS: a raw tunnel (ssh over CONNECT, say). No credentials, ever.
    let decision = ctx.policy.decide_tunnel(&host, port);
    if !decision.allowed {
        out.decision(false, &decision.rule);
        out.record(
            None,
            Some("raw tunnels in strict mode need an allow entry with this port".into()),
            None,
        );
        return;
    }
    match upstream::dial(
        &host,
        port,
        &shared.overrides,
        shared.limits.connect_timeout,
    )
    .await
    {
        Ok(mut tcp) => {
            let mut io = Metered::new(io);
            let _ = tokio::io::copy_bidirectional(&mut io, &mut tcp).await;
            let up = io.read_count().load(Ordering::Relaxed);
            let down = io.written_count().load(Ordering::Relaxed);
            emit(
                ctx.trace.as_ref(),
                ctx.audit.as_ref(),
                &TraceRecord {
                    request_bytes: up,
                    response_bytes: down,
                    ..out.trace_record(None)
                },
            );
        }
        Err(e) => {
            let denied = matches!(e, ConnectError::Refused { .. });
            if denied {
                out.decision(false, "destination");
            }
            let msg = e.to_string();
            out.record(None, denied.then(|| msg.clone()), (!denied).then_some(msg));
        }
    }
}

/// Serves a leaf certificate chosen before the handshake.
#[derive(Debug)]
struct FixedCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for FixedCert {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

fn same_host(a: &str, b: &str) -> bool {
    let norm = |s: &str| {
        s.trim_end_matches('.')
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase()
    };
    norm(a) == norm(b)
}

async fn intercept<S>(shared: Arc<Shared>, ctx: Arc<ClientCtx>, host: String, port: u16, io: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let limit = shared.limits.handshake_timeout;
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
    let Ok(Ok(start)) = tokio::time::timeout(limit, acceptor).await else {
        return;
    };
    let sni = start.client_hello().server_name().map(str::to_string);
    if let Some(sni) = &sni {
        if !same_host(sni, &host) {
            let out = Outcome::new(
                &ctx,
                "CONNECT".into(),
                format!("{host}:{port}"),
                &host,
                port,
            );
            out.decision(false, "identity");
            out.record(
                None,
                Some(format!(
                    "tls server name \"{sni}\" differs from the CONNECT host \"{host}\""
                )),
                None,
            );
            return;
        }
    }
    let leaf = match shared.ca.leaf(&host) {
        Ok(leaf) => leaf,
        Err(e) => {
            tracing::warn!(%host, error = %e, "cannot mint a leaf certificate");
            return;
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let Ok(builder) =
        rustls::ServerConfig::builder_with_provider(provider).with_safe_default_protocol_versions()
    else {
        return;
    };
    let mut config = builder
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(FixedCert(leaf)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Resumption is checked against the server name by rustls, and the name
    // was checked against the CONNECT host above.
    config.session_storage = shared.session_cache.clone();
    if let Some(ticketer) = &shared.ticketer {
        config.ticketer = ticketer.clone();
    }
    let Ok(Ok(tls)) = tokio::time::timeout(limit, start.into_stream(Arc::new(config))).await else {
        return;
    };
    let svc_shared = shared.clone();
    let service = service_fn(move |req| {
        handle_intercepted(svc_shared.clone(), ctx.clone(), host.clone(), port, req)
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.limits.header_timeout)
        .max_buf_size(shared.limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(shared.limits.max_header_bytes).unwrap_or(u32::MAX));
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(tls), service)
        .await
    {
        tracing::debug!(error = %e, "intercepted connection ended with an error");
    }
}

/// Hop-by-hop headers, never forwarded.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

/// A capture for a body with these headers, when the client asked for body
/// capture and the body is text.
fn capture_for(ctx: &ClientCtx, headers: &HeaderMap) -> Option<Capture> {
    if ctx.capture_bodies == 0 {
        return None;
    }
    let kind = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let text = kind.starts_with("text/")
        || [
            "json",
            "xml",
            "x-www-form-urlencoded",
            "javascript",
            "graphql",
        ]
        .iter()
        .any(|t| kind.contains(t));
    text.then(|| Capture::new(ctx.capture_bodies))
}

/// Header names whose values are never recorded.
const REDACTED: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "api-key",
];

fn redacted(headers: &HeaderMap, also: &[HeaderName]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(name, value)| {
            let secret =
                value.is_sensitive() || REDACTED.contains(&name.as_str()) || also.contains(name);
            let shown = if secret {
                "[redacted]".to_string()
            } else {
                String::from_utf8_lossy(value.as_bytes()).into_owned()
            };
            (name.as_str().to_string(), shown)
        })
        .collect()
}

fn upstream_error_response(err: &hyper_util::client::legacy::Error) -> (StatusCode, String, bool) {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(ce) = e.downcast_ref::<ConnectError>() {
            return match ce {
                ConnectError::Refused { .. } => (StatusCode::FORBIDDEN, ce.to_string(), true),
                ConnectError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, ce.to_string(), false),
                _ => (StatusCode::BAD_GATEWAY, ce.to_string(), false),
            };
        }
        source = e.source();
    }
    (
        StatusCode::BAD_GATEWAY,
        format!("upstream request failed: {err}"),
        false,
    )
}

async fn handle_intercepted(
    shared: Arc<Shared>,
    ctx: Arc<ClientCtx>,
    host: String,
    port: u16,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    if head_size(&req) > shared.limits.max_header_bytes {
        return Ok(too_large());
    }
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let authority = if port == 443 {
        host.clone()
    } else {
        format!("{host}:{port}")
    };
    let out = Outcome::new(
        &ctx,
        req.method().to_string(),
        format!("https://{authority}{path}"),
        &host,
        port,
    );

    // Identity: the URI authority (HTTP/2, absolute-form) and the Host header
    // must both name the CONNECT host and port.
    let mut named = Vec::new();
    if let Some(a) = req.uri().authority() {
        named.push(a.as_str().to_string());
    }
    for h in req.headers().get_all(header::HOST) {
        named.push(String::from_utf8_lossy(h.as_bytes()).into_owned());
    }
    if named.is_empty() {
        out.record(Some(400), Some("no host in the request".into()), None);
        return Ok(text_response(
            StatusCode::BAD_REQUEST,
            "Moat: the request names no host\n",
        ));
    }
    for name in &named {
        let ok = split_authority(name)
            .is_some_and(|(h, p)| same_host(&h, &host) && p.unwrap_or(443) == port);
        if !ok {
            let msg =
                format!("request host \"{name}\" does not match the tunnel's host \"{authority}\"");
            out.decision(false, "identity");
            out.record(Some(421), Some(msg.clone()), None);
            return Ok(text_response(
                StatusCode::MISDIRECTED_REQUEST,
                format!("Moat: {msg}; nothing was sent\n"),
            ));
        }
    }

    let upgrade = websocket_upgrade(&req);
    let mut req = req;
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::HOST);
    let mut grant = None;
    let mut injected_headers = Vec::new();
    let wants_credential = ctx.credentials.iter().any(|c| c.matches(&host, port));
    if wants_credential {
        // Fail closed: no credential is used that the audit log cannot record.
        if let Some(Err(why)) = ctx.audit.as_ref().map(|a| a.healthy()) {
            out.record(
                Some(503),
                Some(format!("audit log unavailable: {why}")),
                None,
            );
            return Ok(text_response(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "Moat: the audit log cannot be written ({why}); credentials are not injected\n"
                ),
            ));
        }
    }
    for cred in ctx.credentials.iter().filter(|c| c.matches(&host, port)) {
        // The one injection site: the value replaces any client-sent header
        // of that name (placeholders) and is never duplicated.
        parts.headers.remove(cred.header());
        parts
            .headers
            .insert(cred.header().clone(), cred.value.expose().clone());
        injected_headers.push(cred.header().clone());
        grant = Some(cred.grant().to_string());
        if let Some(audit) = &ctx.audit {
            audit.event(&AuditEvent::CredentialInjected {
                client: ctx.name.clone(),
                host: host.clone(),
                port,
                grant: cred.grant().to_string(),
                header: cred.header().as_str().to_string(),
                method: parts.method.to_string(),
                path: parts.uri.path().to_string(),
            });
        }
    }
    let uri: Uri = match format!("https://{authority}{path}").parse() {
        Ok(uri) => uri,
        Err(_) => {
            out.record(Some(400), Some("bad request target".into()), None);
            return Ok(text_response(
                StatusCode::BAD_REQUEST,
                "Moat: bad request target\n",
            ));
        }
    };
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    let request_headers = redacted(&parts.headers, &injected_headers);
    if let (Some(protocol), Some(client_upgrade)) = (upgrade, client_upgrade) {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, protocol);
        parts.headers.insert(
            header::HOST,
            HeaderValue::from_str(&authority).unwrap_or(HeaderValue::from_static("invalid")),
        );
        let path_only: Uri = path.parse().unwrap_or_else(|_| Uri::from_static("/"));
        parts.uri = path_only;
        let req = Request::from_parts(parts, body);
        return Ok(
            forward_upgrade(&shared, &out, req, client_upgrade, grant, request_headers).await,
        );
    }
    let sent = Arc::new(AtomicU64::new(0));
    let req_capture = capture_for(&ctx, &parts.headers);
    let body = Counted::new(body.map_err(Into::into).boxed(), sent.clone(), None)
        .capturing(req_capture.clone())
        .boxed();
    let upstream_req = Request::from_parts(parts, body);

    match shared.https.request(upstream_req).await {
        Ok(resp) => Ok(stream_back(
            &out,
            resp,
            grant,
            request_headers,
            sent,
            req_capture,
        )),
        Err(e) => {
            let (status, msg, denied) = upstream_error_response(&e);
            Ok(out.fail(status, msg, denied))
        }
    }
}

/// The protocol of an HTTP/1.1 WebSocket upgrade request, if it is one.
fn websocket_upgrade<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != http::Version::HTTP_11 {
        return None;
    }
    let connection_upgrade = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let protocol = req.headers().get(header::UPGRADE)?;
    let websocket = protocol
        .to_str()
        .is_ok_and(|p| p.trim().eq_ignore_ascii_case("websocket"));
    (connection_upgrade && websocket).then(|| protocol.clone())
}

/// Forwards a WebSocket upgrade over its own HTTP/1.1 connection (verified
/// TLS, credential already injected), then relays bytes both ways.
async fn forward_upgrade(
    shared: &Arc<Shared>,
    out: &Outcome<'_>,
    req: Request<Incoming>,
    client_upgrade: hyper::upgrade::OnUpgrade,
    grant: Option<String>,
    request_headers: Vec<(String, String)>,
) -> Response<ProxyBody> {
    let fail = |status: StatusCode, msg: String, denied: bool| out.fail(status, msg, denied);
    let timeout = shared.limits.connect_timeout;
    let tcp = match upstream::dial(&out.host, out.port, &shared.overrides, timeout).await {
        Ok(tcp) => tcp,
        Err(e) => {
            let denied = matches!(e, ConnectError::Refused { .. });
            let status = if denied {
                StatusCode::FORBIDDEN
            } else {
                StatusCode::BAD_GATEWAY
            };
            return fail(status, e.to_string(), denied);
        }
    };
    let tls = match upstream::handshake(&out.host, tcp, shared.tls_h1.clone(), timeout).await {
        Ok(tls) => tls,
        Err(e) => return fail(StatusCode::BAD_GATEWAY, e.to_string(), false),
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(tls)).await {
        Ok(pair) => pair,
        Err(e) => {
            return fail(
                StatusCode::BAD_GATEWAY,
                format!("upstream http: {e}"),
                false,
            )
        }
    };
    let conn_task = shared.tasks.spawn(conn.with_upgrades());
    let (parts, body) = req.into_parts();
    let body = body.map_err(BoxError::from).boxed();
    let mut resp = match sender.send_request(Request::from_parts(parts, body)).await {
        Ok(resp) => resp,
        Err(e) => {
            conn_task.abort();
            return fail(
                StatusCode::BAD_GATEWAY,
                format!("upstream request failed: {e}"),
                false,
            );
        }
    };
    let status = resp.status();
    let response_headers = redacted(resp.headers(), &[]);
    let record = TraceRecord {
        grant,
        request_headers,
        response_headers,
        ..out.trace_record(Some(status.as_u16()))
    };
    if status != StatusCode::SWITCHING_PROTOCOLS {
        // Refused by the upstream: pass its answer on as an ordinary response.
        emit(out.ctx.trace.as_ref(), out.ctx.audit.as_ref(), &record);
        let (parts, body) = resp.into_parts();
        return Response::from_parts(parts, body.map_err(Into::into).boxed());
    }
    let upstream_upgrade = hyper::upgrade::on(&mut resp);
    let trace = out.ctx.trace.clone();
    let audit = out.ctx.audit.clone();
    let started = out.started;
    let cancel = shared.cancel.clone();
    shared.tasks.spawn(async move {
        let relay = async {
            let (Ok(client), Ok(server)) = tokio::join!(client_upgrade, upstream_upgrade) else {
                return (0, 0);
            };
            let mut client = Metered::new(TokioIo::new(client));
            let (up, down) = (client.read_count(), client.written_count());
            let mut server = TokioIo::new(server);
            // Ends when either side closes, cleanly or not.
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            (up.load(Ordering::Relaxed), down.load(Ordering::Relaxed))
        };
        let (up, down) = tokio::select! {
            bytes = relay => bytes,
            () = cancel.cancelled() => (0, 0),
        };
        let mut record = record;
        record.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
        record.request_bytes = up;
        record.response_bytes = down;
        emit(trace.as_ref(), audit.as_ref(), &record);
    });
    let (parts, _) = resp.into_parts();
    Response::from_parts(parts, empty())
}

fn stream_back(
    out: &Outcome<'_>,
    resp: Response<Incoming>,
    grant: Option<String>,
    request_headers: Vec<(String, String)>,
    sent: Arc<AtomicU64>,
    req_capture: Option<Capture>,
) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let received = Arc::new(AtomicU64::new(0));
    let resp_capture = capture_for(out.ctx, &parts.headers);
    let capture_for_record = resp_capture.clone();
    let (trace, audit) = (out.ctx.trace.clone(), out.ctx.audit.clone());
    let wanted = trace.is_some() || audit.is_some();
    let on_end: Option<Box<dyn FnOnce() + Send + Sync>> = wanted.then(|| {
        let record = TraceRecord {
            grant,
            request_headers,
            response_headers: redacted(&parts.headers, &[]),
            ..out.trace_record(Some(parts.status.as_u16()))
        };
        let started = out.started;
        let received = received.clone();
        let f: Box<dyn FnOnce() + Send + Sync> = Box::new(move || {
            let mut record = record;
            record.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
            record.request_bytes = sent.load(Ordering::Relaxed);
            record.response_bytes = received.load(Ordering::Relaxed);
            record.request_body = req_capture.and_then(|c| c.text());
            record.response_body = capture_for_record.and_then(|c| c.text());
            emit(trace.as_ref(), audit.as_ref(), &record);
        });
        f
    });
    let body = Counted::new(body.map_err(Into::into).boxed(), received, on_end)
        .capturing(resp_capture)
        .boxed();
    Response::from_parts(parts, body)
}

/// An absolute-form `http://` request: forwarded without any credential
/// (credentials never travel over plain HTTP).
async fn forward_plain(
    shared: Arc<Shared>,
    ctx: Arc<ClientCtx>,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .unwrap_or_default();
    let Some((host, port)) = split_authority(&authority) else {
        return text_response(StatusCode::BAD_REQUEST, "Moat: bad request target\n");
    };
    let port = port.unwrap_or(80);
    let out = Outcome::new(
        &ctx,
        req.method().to_string(),
        req.uri().to_string(),
        &host,
        port,
    );
    let decision = ctx.policy.decide(&host, port);
    out.decision(decision.allowed, &decision.rule);
    if !decision.allowed {
        out.record(Some(403), Some("network policy".into()), None);
        return text_response(StatusCode::FORBIDDEN, blocked_message(&host));
    }
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.version = http::Version::HTTP_11;
    let request_headers = redacted(&parts.headers, &[]);
    let sent = Arc::new(AtomicU64::new(0));
    let req_capture = capture_for(&ctx, &parts.headers);
    let body = Counted::new(body.map_err(Into::into).boxed(), sent.clone(), None)
        .capturing(req_capture.clone())
        .boxed();
    match shared.http.request(Request::from_parts(parts, body)).await {
        Ok(resp) => stream_back(&out, resp, None, request_headers, sent, req_capture),
        Err(e) => {
            let (status, msg, denied) = upstream_error_response(&e);
            out.fail(status, msg, denied)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities() {
        assert_eq!(
            split_authority("API.GitHub.com:443"),
            Some(("api.github.com".into(), Some(443)))
        );
        assert_eq!(
            split_authority("api.github.com."),
            Some(("api.github.com".into(), None))
        );
        assert_eq!(
            split_authority("[::1]:8443"),
            Some(("::1".into(), Some(8443)))
        );
        assert_eq!(split_authority("a:b"), None);
        assert_eq!(split_authority("user@evil.com"), None);
        assert_eq!(split_authority(""), None);
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("close, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("accept"));
    }
}
