//! The proxy's connection handling; see the phases in `proxy/mod.rs`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::body::{empty, full, BoxError, Capture, Counted, OnEnd, Prefixed, ProxyBody};
use super::phase::{Answer, Fault, RequestHead, INTERNAL_HOST};
use super::upstream::{self, ConnectError, Connector, ResolveMap};
use super::workers::{Dispatch, Permit};
use super::{CertificateAuthority, ClientCtx, ClientTable, Limits};
use crate::net::{relay_upgraded, starts_tls, Metered, Relayed};
use crate::policy::blocked_message;
use crate::trace::{emit, now_rfc3339, AuditEvent, TraceRecord};

pub(crate) struct Shared {
    pub ca: CertificateAuthority,
    pub clients: ClientTable,
    pub cancel: CancellationToken,
    pub tasks: TaskTracker,
    /// The pooled upstream clients of every client whose phases choose no
    /// upstream of their own: one set per worker, so that a worker's
    /// requests go over connections its own runtime drives.
    pools: Vec<Pools>,
    /// Upstream TLS (HTTP/2 and HTTP/1.1).
    tls: Arc<rustls::ClientConfig>,
    /// Upstream TLS offering only HTTP/1.1, for WebSocket upgrades.
    tls_h1: Arc<rustls::ClientConfig>,
    /// Client TLS sessions, shared by every intercepted connection so that
    /// clients can resume (TLS 1.2 ids and TLS 1.3 tickets).
    session_cache: Arc<dyn rustls::server::StoresServerSessions>,
    ticketer: Option<Arc<dyn rustls::server::ProducesTickets>>,
    pub(crate) overrides: Arc<ResolveMap>,
    limits: Limits,
    connections: Arc<Semaphore>,
    /// Bytes of request bodies the proxy holds to judge them (a git push's
    /// ref updates), across every client: one permit a byte.
    held: Arc<Semaphore>,
    ids: AtomicU64,
}

impl Shared {
    pub(crate) fn new(
        ca: CertificateAuthority,
        tls: Arc<rustls::ClientConfig>,
        overrides: Arc<ResolveMap>,
        limits: Limits,
    ) -> Shared {
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
            pools: (0..limits.workers.max(1))
                .map(|_| Pools::new(&tls, &overrides, &limits, None))
                .collect(),
            tls,
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            held: Arc::new(Semaphore::new(
                limits.held_body_bytes.min(Semaphore::MAX_PERMITS),
            )),
            overrides,
            limits,
            ids: AtomicU64::new(1),
        }
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    /// The pools a request of `ctx` for `host:port` goes through: the
    /// shared ones, or, when one of the client's phases chooses where it
    /// goes ([`super::Phase::upstream`]), the client's own (made at its
    /// first such request), so that a connection to a chosen address never
    /// serves another client, nor this client's requests that go where the
    /// proxy resolves.
    fn pools<'a>(&'a self, ctx: &'a ClientCtx, host: &str, port: u16) -> &'a Pools {
        if upstream::chosen(&ctx.phases, host, port).is_none() {
            let worker = super::workers::current().unwrap_or(0);
            return &self.pools[worker % self.pools.len()];
        }
        ctx.own_pools.get_or_init(|| {
            Pools::new(
                &self.tls,
                &self.overrides,
                &self.limits,
                Some(ctx.phases.clone().into()),
            )
        })
    }
}

/// Pooled upstream clients, HTTPS and plain HTTP.
pub(crate) struct Pools {
    https: Client<Connector, ProxyBody>,
    http: Client<Connector, ProxyBody>,
}

impl Pools {
    /// Pools that dial as `overrides` say, or, with `choose`, where those
    /// phases choose first.
    fn new(
        tls: &Arc<rustls::ClientConfig>,
        overrides: &Arc<ResolveMap>,
        limits: &Limits,
        choose: Option<Arc<[Arc<dyn super::Phase>]>>,
    ) -> Pools {
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
                    choose: choose.clone(),
                })
        };
        Pools {
            https: client(Some(tls.clone())),
            http: client(None),
        }
    }
}

/// Accepts client connections and hands each to a worker.
pub(crate) async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, workers: Dispatch) {
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
        workers.send(tcp, peer, permit).await;
    }
}

/// What a client connection allowed last over plain HTTP: (client id,
/// host, port, rule). A keep-alive connection's requests to one host are
/// audited as one policy decision, as a tunnel's are (each request is still
/// judged, and recorded as a request of its own).
type LastAllowed = Arc<std::sync::Mutex<Option<(u64, String, u16, String)>>>;

pub(crate) async fn serve_client(
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    shared: Arc<Shared>,
    permit: Permit,
) {
    let cancel = shared.cancel.clone();
    let svc_shared = shared.clone();
    let last: LastAllowed = Arc::default();
    let service = service_fn(move |req| {
        handle_proxy_request(svc_shared.clone(), permit.clone(), last.clone(), peer, req)
    });
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

/// Checks a destination named in a CONNECT: an IP address, or a DNS name
/// of at most 253 bytes in labels of 1 to 63 letters, digits, `-` and `_`.
/// (Anything else could not be reached, and a certificate for it would only
/// cost memory.)
fn check_host_name(host: &str) -> Result<(), &'static str> {
    if super::dest::parse_ip(host).is_some() || host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    if host.len() > 253 {
        return Err("a host name is at most 253 characters");
    }
    for label in host.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each label of a host name has 1 to 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("a host name has letters, digits, '-' and '_' only");
        }
    }
    Ok(())
}

/// At most `max` characters of `text`, for messages.
fn truncated(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_string(),
    }
}

/// `host:port` as written in a URL: IPv6 addresses in brackets, the
/// default port left out.
fn url_authority(host: &str, port: u16, default: u16) -> String {
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    if port == default {
        host
    } else {
        format!("{host}:{port}")
    }
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

/// Where a client's finished requests go: each of its phases
/// ([`super::Phase::log`]), then its trace and audit sinks.
#[derive(Clone)]
pub(crate) struct Recorder {
    pub(crate) trace: Option<Arc<dyn crate::trace::TraceSink>>,
    pub(crate) audit: Option<Arc<dyn crate::trace::AuditSink>>,
    pub(crate) phases: Arc<[Arc<dyn super::Phase>]>,
}

impl Recorder {
    /// Does anything take records? (When not, none is built.)
    fn wanted(&self) -> bool {
        self.trace.is_some() || self.audit.is_some() || !self.phases.is_empty()
    }

    /// Records a request's final record.
    fn emit(&self, record: TraceRecord) {
        for phase in self.phases.iter() {
            phase.log(&record);
        }
        emit(self.trace.as_ref(), self.audit.as_ref(), record);
    }
}

/// One request's record keeping. Every request the proxy accepted leaves a
/// trace record and an audit `request` event: if nothing recorded it by the
/// time it is dropped (the client went away before the response, or the
/// proxy shut down), the drop records that.
struct Outcome<'a> {
    ctx: &'a ClientCtx,
    method: String,
    url: String,
    host: String,
    port: u16,
    started: Instant,
    time: String,
    /// Recorded, or handed to something that records it (a response body).
    done: AtomicBool,
    /// Credentials in a request being sent: audited once it went out, or,
    /// should the request be dropped while being sent, all the same.
    sending: std::sync::Mutex<Option<Sending>>,
    /// The request rule that decided, for the trace.
    rule: std::sync::Mutex<Option<String>>,
}

/// A request with credentials on its way upstream.
struct Sending {
    method: String,
    path: String,
    injected: Vec<Injected>,
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
            done: AtomicBool::new(false),
            sending: std::sync::Mutex::new(None),
            rule: std::sync::Mutex::new(None),
        }
    }

    /// The request is about to go upstream with these credentials.
    fn sending(&self, method: &str, path: &str, injected: Vec<Injected>) {
        if injected.is_empty() {
            return;
        }
        if let Ok(mut s) = self.sending.lock() {
            *s = Some(Sending {
                method: method.to_string(),
                path: path.to_string(),
                injected,
            });
        }
    }

    /// The request went out (`true`), or was never sent (its connection
    /// could not be made): its credentials are audited in the first case.
    fn settle(&self, went_out: bool) {
        let pending = self.sending.lock().ok().and_then(|mut s| s.take());
        if let (true, Some(p)) = (went_out, pending) {
            audit_injected(self, &p.method, &p.path, &p.injected);
        }
    }

    /// Records the request with the proxy's own answer (`status`, or none
    /// sent), and, if it was refused or failed, why and whose fault that was.
    fn record(
        &self,
        status: Option<u16>,
        fault: Option<Fault>,
        denied: Option<String>,
        error: Option<String>,
    ) {
        self.handed_off();
        self.ctx.recorder.emit(TraceRecord {
            denied,
            error,
            fault,
            ..self.trace_record(status)
        });
    }

    /// Something else records this request from now on.
    fn handed_off(&self) {
        self.done.store(true, Ordering::Relaxed);
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
            rule: self.rule.lock().ok().and_then(|r| r.clone()),
            ..TraceRecord::default()
        }
    }

    /// A request rule decided: audited now, and kept for the trace.
    fn ruled(&self, allowed: bool, rule: &str) {
        self.decision(allowed, &format!("rule:{rule}"));
        if let Ok(mut r) = self.rule.lock() {
            *r = Some(rule.to_string());
        }
    }

    /// Records a request that was refused (`denied`: by the destination
    /// check) or failed, and builds the answer the client gets.
    fn fail(&self, status: StatusCode, msg: String, denied: bool) -> Response<ProxyBody> {
        if denied {
            self.decision(false, "destination");
        }
        let fault = Fault::of(status, denied);
        let told = self.told(status, fault, format!("Moat: {msg}\n"));
        self.record(
            Some(status.as_u16()),
            Some(fault),
            denied.then(|| msg.clone()),
            (!denied).then(|| msg.clone()),
        );
        text_response(status, told)
    }

    /// What the client of a failed or refused request reads: `message`,
    /// and what the client's phases add ([`super::Phase::fail`]).
    fn told(&self, status: StatusCode, fault: Fault, message: String) -> String {
        let mut told = message;
        for phase in &self.ctx.phases {
            let failure = super::phase::Failure {
                client: &self.ctx.name,
                method: &self.method,
                host: &self.host,
                port: self.port,
                status,
                fault,
                message: &told,
            };
            if let Some(more) = phase.fail(&failure) {
                if !told.ends_with('\n') {
                    told.push('\n');
                }
                told.push_str(more.trim_end());
                told.push('\n');
            }
        }
        told
    }

    fn decision(&self, allowed: bool, rule: &str) {
        if let Some(audit) = &self.ctx.audit {
            audit.event(AuditEvent::PolicyDecision {
                client: self.ctx.name.clone(),
                host: self.host.clone(),
                port: self.port,
                allowed,
                rule: rule.to_string(),
            });
        }
    }
}

impl Drop for Outcome<'_> {
    fn drop(&mut self) {
        // Dropped while being sent (its client went away): the credential
        // may have gone out, so its use is audited.
        let pending = self.sending.lock().ok().and_then(|mut s| s.take());
        let grant = pending
            .as_ref()
            .and_then(|p| p.injected.last().map(|i| i.grant.clone()));
        if let Some(p) = &pending {
            audit_injected(self, &p.method, &p.path, &p.injected);
        }
        if !self.done.load(Ordering::Relaxed) {
            self.handed_off();
            self.ctx.recorder.emit(TraceRecord {
                grant,
                error: Some(ABANDONED.to_string()),
                fault: Some(Fault::Client),
                ..self.trace_record(None)
            });
        }
    }
}

/// The error of a request that got no response: the client closed its
/// connection first (or the proxy shut down).
pub(crate) const ABANDONED: &str =
    "no response was sent: the client closed the connection first (or the proxy shut down)";

/// The size of a request head as sent: request line and header lines.
fn head_size<B>(req: &Request<B>) -> usize {
    /// Counts what is written (the URI's length without building it).
    struct Count(usize);
    impl std::fmt::Write for Count {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0 += s.len();
            Ok(())
        }
    }
    let mut uri = Count(0);
    let _ = std::fmt::Write::write_fmt(&mut uri, format_args!("{}", req.uri()));
    let line = req.method().as_str().len() + uri.0 + 12;
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
    permit: Permit,
    last: LastAllowed,
    peer: std::net::SocketAddr,
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
    if let Some(refused) = authenticate(&ctx, peer, &req) {
        return Ok(refused);
    }
    if req.method() == Method::CONNECT {
        return Ok(handle_connect(shared, ctx, permit, req));
    }
    if req.uri().scheme_str() == Some("http") && req.uri().host() == Some(INTERNAL_HOST) {
        return Ok(internal(&ctx, &req).await);
    }
    if req.uri().scheme_str() == Some("http") && req.uri().authority().is_some() {
        return Ok(forward_plain(shared, ctx, &last, req).await);
    }
    Ok(text_response(
        StatusCode::BAD_REQUEST,
        "Moat: this is a forward proxy; send absolute http:// URLs or CONNECT\n",
    ))
}

/// The client's phases may refuse a request its token let in
/// ([`super::Phase::authenticate`]): the first refusal answers it,
/// recorded.
fn authenticate(
    ctx: &ClientCtx,
    peer: std::net::SocketAddr,
    req: &Request<Incoming>,
) -> Option<Response<ProxyBody>> {
    for phase in &ctx.phases {
        if let Err(answer) = phase.authenticate(peer) {
            let connect = req.method() == Method::CONNECT;
            let host = req.uri().host().unwrap_or_default();
            let port = req
                .uri()
                .port_u16()
                .unwrap_or(if connect { 443 } else { 80 });
            let out = Outcome::new(
                ctx,
                req.method().to_string(),
                if connect {
                    url_authority(host, port, 0)
                } else {
                    req.uri().to_string()
                },
                host,
                port,
            );
            out.decision(false, "authenticate");
            return Some(answered(&out, answer));
        }
    }
    None
}

/// A request for the proxy's own host: the client's phases answer it
/// ([`Phase::respond`]), or it gets 404. It never leaves the proxy.
async fn internal(ctx: &ClientCtx, req: &Request<Incoming>) -> Response<ProxyBody> {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let out = Outcome::new(
        ctx,
        req.method().to_string(),
        req.uri().to_string(),
        INTERNAL_HOST,
        80,
    );
    let head = RequestHead {
        client: &ctx.name,
        method: req.method(),
        host: INTERNAL_HOST,
        port: 80,
        path,
    };
    for phase in &ctx.phases {
        if let Some(answer) = phase.respond(&head).await {
            return answered(&out, answer);
        }
    }
    out.record(
        Some(404),
        Some(Fault::Client),
        Some(format!("no moat endpoint at {path} for this client")),
        None,
    );
    text_response(
        StatusCode::NOT_FOUND,
        format!(
            "Moat: nothing answers http://{INTERNAL_HOST}{path} for this run \
             (/aws/credentials answers runs with an aws grant: moat grant aws --role=ARN, then --grant aws)\n"
        ),
    )
}

/// The methods a request names for a server to take it as, besides its
/// own (method-override headers, a `_method` query parameter).
fn overrides_of(headers: &HeaderMap, path: &str) -> Vec<String> {
    use crate::policy::rules::{overriding_methods, METHOD_OVERRIDES};
    let values = METHOD_OVERRIDES
        .iter()
        .flat_map(|name| headers.get_all(*name))
        .map(|v| v.as_bytes());
    overriding_methods(values, path)
}

/// The request rules of `host:port`, if it has any, on a request: `None`
/// when it may go on (a rule allowed it, or none matched in permissive
/// mode, or it is a git push the ref rules will judge); else the refusal,
/// recorded and audited with the rule that decided.
#[allow(clippy::too_many_arguments)]
fn judge_rules(
    ctx: &ClientCtx,
    out: &Outcome<'_>,
    host: &str,
    port: u16,
    method: &Method,
    headers: &HeaderMap,
    path: &str,
    shown: &str,
) -> Option<Response<ProxyBody>> {
    use crate::policy::rules::{self, Verdict};
    let entry = rules::entry_for(&ctx.policy.rules, host, port)?;
    let push = entry.has_git_rules() && rules::is_git_push(method.as_str(), path);
    // A method override (X-HTTP-Method-Override and its kin, `_method`)
    // makes many servers run another method's handler: the request goes
    // only if the rules allow it under each method it names too.
    let mut verdict = entry.judge(method.as_str(), path);
    for other in overrides_of(headers, path) {
        if matches!(verdict, Verdict::Allow(_) | Verdict::NoMatch) {
            match entry.judge(&other, path) {
                Verdict::Allow(_) => {}
                Verdict::NoMatch if matches!(verdict, Verdict::NoMatch) => {}
                Verdict::NoMatch => verdict = Verdict::NoMatch,
                refused => verdict = refused,
            }
        }
    }
    let (rule, why, fix) = match verdict {
        Verdict::Allow(rule) => {
            out.ruled(true, &rule);
            return None;
        }
        Verdict::NoMatch if push => return None,
        Verdict::NoMatch if ctx.policy.mode == crate::policy::PolicyMode::Permissive => {
            // No rule decided: the policy did, and the trace says so as
            // the audit log does.
            out.decision(true, "permissive");
            if let Ok(mut r) = out.rule.lock() {
                *r = Some("permissive".to_string());
            }
            return None;
        }
        Verdict::Deny(rule) => (
            rule.clone(),
            format!("The rule \"{rule}\" for {} denies it.", entry.host),
            "Change network.rules in agent.yaml to allow it.".to_string(),
        ),
        Verdict::NoMatch => (
            "strict".to_string(),
            format!(
                "No rule for {} allows it, and strict mode denies what no rule allows.",
                entry.host
            ),
            format!(
                "Add a rule to network.rules in agent.yaml, like \"allow {} {}\".",
                method,
                path.split('?').next().unwrap_or("/")
            ),
        ),
        Verdict::Ambiguous(why) => (
            "ambiguous path".to_string(),
            format!("It cannot be judged: {why}."),
            "Send the path without encoded separators.".to_string(),
        ),
    };
    out.ruled(false, &rule);
    let told = out.told(
        StatusCode::FORBIDDEN,
        Fault::Policy,
        format!("Moat: request blocked by network policy.\n{method} {shown}: {why}\n{fix}\n"),
    );
    out.record(
        Some(403),
        Some(Fault::Policy),
        Some(format!("rule: {rule}")),
        None,
    );
    Some(text_response(StatusCode::FORBIDDEN, told))
}

/// A phase's own answer, recorded (and its audit event written) like any
/// other response.
fn answered(out: &Outcome<'_>, answer: Answer) -> Response<ProxyBody> {
    if let (Some(audit), Some(event)) = (&out.ctx.audit, answer.audit) {
        audit.event(event);
    }
    let fault = (answer.denied.is_some() || answer.error.is_some())
        .then(|| Fault::of(answer.status, answer.denied.is_some()));
    // A refusal or failure: the phases may add to what the client reads.
    let body = match fault {
        Some(fault) => Bytes::from(out.told(
            answer.status,
            fault,
            String::from_utf8_lossy(&answer.body).into_owned(),
        )),
        None => answer.body,
    };
    out.record(
        Some(answer.status.as_u16()),
        fault,
        answer.denied,
        answer.error,
    );
    let mut resp = Response::new(full(body));
    *resp.status_mut() = answer.status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(answer.content_type),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Why a tunnel's destination is refused, and what its client is told.
#[derive(Debug, Clone)]
struct Refusal {
    /// The answer's body: the seeds' message and the fix.
    message: String,
    /// The trace record's `denied`.
    denied: String,
}

fn handle_connect(
    shared: Arc<Shared>,
    ctx: Arc<ClientCtx>,
    permit: Permit,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let authority = req.uri().authority().map(|a| a.as_str().to_string());
    let Some((host, port)) = authority.as_deref().and_then(split_authority) else {
        return text_response(StatusCode::BAD_REQUEST, "Moat: CONNECT needs host:port\n");
    };
    if let Err(why) = check_host_name(&host) {
        return text_response(
            StatusCode::BAD_REQUEST,
            format!("Moat: CONNECT to \"{}\": {why}\n", truncated(&host, 80)),
        );
    }
    let port = port.unwrap_or(443);
    let out = Outcome::new(
        &ctx,
        "CONNECT".into(),
        url_authority(&host, port, 0),
        &host,
        port,
    );
    let decision = ctx.policy.decide(&host, port);
    let tunnel = ctx.policy.decide_tunnel(&host, port);
    let mut refusal = None;
    if !decision.allowed && !tunnel.allowed {
        out.decision(false, &decision.rule);
        refusal = Some(Refusal {
            message: blocked_message(&host),
            denied: "network policy".into(),
        });
    } else if !shared.overrides.contains_key(&(host.clone(), port)) {
        // An IP literal is checked now; names are checked when dialled.
        if let Some(ip) = super::dest::parse_ip(&host) {
            if let Some(reason) = super::dest::forbidden_reason(ip) {
                let msg = ConnectError::Refused {
                    host: host.clone(),
                    addr: ip,
                    reason,
                }
                .to_string();
                out.decision(false, "destination");
                refusal = Some(Refusal {
                    message: format!("Moat: {msg}\n"),
                    denied: msg,
                });
            }
        }
    }
    if refusal.is_none() {
        // The client's phases may refuse a tunnel the policy allowed.
        for phase in &ctx.phases {
            if let Err(answer) = phase.connect(&host, port) {
                out.decision(false, "connect");
                if let (Some(audit), Some(event)) = (&ctx.audit, answer.audit) {
                    audit.event(event);
                }
                refusal = Some(Refusal {
                    message: String::from_utf8_lossy(&answer.body).into_owned(),
                    denied: answer
                        .denied
                        .unwrap_or_else(|| "refused when the tunnel opened".into()),
                });
                break;
            }
        }
    }
    if refusal.is_none() {
        // Audited once per tunnel, with the rule that let it through; a
        // later refusal inside the tunnel (identity, destination) is
        // audited too.
        let rule = if decision.allowed {
            &decision.rule
        } else {
            &tunnel.rule
        };
        out.decision(true, rule);
    }
    // The requests inside the tunnel are recorded one by one (a refused
    // tunnel's too: its client is answered inside TLS, where it reads why).
    out.handed_off();
    drop(out);
    let task_shared = shared.clone();
    let cancel = shared.cancel.clone();
    shared.tasks.spawn(async move {
        // The tunnel counts against the connection limit while it lasts.
        let _permit = permit;
        let work = async {
            match hyper::upgrade::on(req).await {
                Ok(upgraded) => {
                    handle_tunnel(task_shared, ctx, host, port, upgraded, refusal).await
                }
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
    refusal: Option<Refusal>,
) {
    // The tunnel itself is recorded only where said below (its requests
    // are recorded one by one): a tunnel cut by the proxy's shutdown leaves
    // no made-up record.
    let out = Outcome::new(
        &ctx,
        "CONNECT".into(),
        url_authority(&host, port, 0),
        &host,
        port,
    );
    out.handed_off();
    let mut io = TokioIo::new(upgraded);
    let mut first = [0u8; 1];
    let n = match tokio::time::timeout(shared.limits.handshake_timeout, io.read(&mut first)).await {
        Ok(Ok(n)) => n,
        _ => 0,
    };
    if n == 0 {
        // Nothing was asked through the tunnel.
        if let Some(r) = &refusal {
            out.record(None, Some(Fault::Policy), Some(r.denied.clone()), None);
        }
        return;
    }
    let io = Prefixed::new(Bytes::copy_from_slice(&first[..n]), io);
    let tls = starts_tls(first[0]);
    let refusal = match refusal {
        Some(r) => Some(r),
        // Rules judge HTTP requests; a tunnel that is not TLS (which moat
        // intercepts) could carry requests they never see.
        None if !tls
            && crate::policy::rules::entry_for(&ctx.policy.rules, &host, port).is_some() =>
        {
            out.decision(false, "rules: raw tunnel");
            Some(Refusal {
                message: format!(
                    "Moat: request blocked by network policy.\n{host} has request rules, which moat applies to HTTPS it intercepts and to plain HTTP sent to the proxy, not to a raw tunnel.\nSend HTTP to the proxy as http://{host}/... instead of through CONNECT.\n"
                ),
                denied: "rules: raw tunnel".into(),
            })
        }
        None if tls && !ctx.policy.decide(&host, port).allowed => {
            // A raw tunnel's allow entry does not let TLS through.
            out.decision(false, "strict");
            Some(Refusal {
                message: blocked_message(&host),
                denied: "network policy".into(),
            })
        }
        None => None,
    };
    if tls {
        let answered = intercept(shared, ctx.clone(), host, port, io, refusal.clone()).await;
        if let Some(r) = refusal {
            // A refused client that never got an answer (its TLS did not
            // complete, or it asked nothing) leaves one record.
            if answered == 0 {
                out.record(
                    None,
                    Some(Fault::Policy),
                    Some(r.denied),
                    Some("no answer was given inside TLS (the client did not trust the moat CA, or sent no request)".into()),
                );
            }
        }
        return;
    }
    if let Some(r) = refusal {
        // Plain HTTP through a refused tunnel reads the message too.
        if first[0].is_ascii_alphabetic() {
            let mut io = io;
            let body = r.message.as_bytes();
            let head = format!(
                "HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = tokio::time::timeout(shared.limits.handshake_timeout, async {
                io.write_all(head.as_bytes()).await?;
                io.write_all(body).await?;
                io.shutdown().await
            })
            .await;
        }
        out.record(None, Some(Fault::Policy), Some(r.denied), None);
        return;
    }
    // Not TLS: a raw tunnel (ssh over CONNECT, say). No credentials, ever.
    let decision = ctx.policy.decide_tunnel(&host, port);
    if !decision.allowed {
        out.decision(false, &decision.rule);
        out.record(
            None,
            Some(Fault::Policy),
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
            let counts = Relayed::default();
            let mut io = Metered::new(io, counts.up.clone(), counts.down.clone());
            let mut relay = RelayRecord {
                out: &out,
                counts,
                ended: false,
            };
            let _ = tokio::io::copy_bidirectional(&mut io, &mut tcp).await;
            relay.ended = true;
        }
        Err(e) => {
            let denied = matches!(e, ConnectError::Refused { .. });
            if denied {
                out.decision(false, "destination");
            }
            let msg = e.to_string();
            let fault = if denied {
                Fault::Policy
            } else {
                Fault::Upstream
            };
            out.record(
                None,
                Some(fault),
                denied.then(|| msg.clone()),
                (!denied).then_some(msg),
            );
        }
    }
}

/// The record of a raw tunnel's relay, written when it is dropped: at the
/// relay's end, or, cut by the proxy's shutdown, with what was relayed so
/// far and saying so.
struct RelayRecord<'a> {
    out: &'a Outcome<'a>,
    counts: Relayed,
    ended: bool,
}

impl Drop for RelayRecord<'_> {
    fn drop(&mut self) {
        let out = self.out;
        let (up, down) = self.counts.now();
        out.ctx.recorder.emit(TraceRecord {
            request_bytes: up,
            response_bytes: down,
            error: (!self.ended).then(|| "the tunnel was cut: the proxy shut down".to_string()),
            fault: (!self.ended).then_some(Fault::Internal),
            ..out.trace_record(None)
        });
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

/// Completes the client's TLS with a leaf of the moat CA for `host` and
/// serves the requests inside: forwarded, or, with a refusal, each answered
/// 403 with its message (nothing goes upstream). Returns how many requests
/// were refused this way.
async fn intercept<S>(
    shared: Arc<Shared>,
    ctx: Arc<ClientCtx>,
    host: String,
    port: u16,
    io: S,
    refusal: Option<Refusal>,
) -> u64
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let limit = shared.limits.handshake_timeout;
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
    let Ok(Ok(start)) = tokio::time::timeout(limit, acceptor).await else {
        return 0;
    };
    let sni = start.client_hello().server_name().map(str::to_string);
    if let Some(sni) = &sni {
        if !same_host(sni, &host) {
            let out = Outcome::new(
                &ctx,
                "CONNECT".into(),
                url_authority(&host, port, 0),
                &host,
                port,
            );
            out.decision(false, "identity");
            out.record(
                None,
                Some(Fault::Client),
                Some(format!(
                    "tls server name \"{sni}\" differs from the CONNECT host \"{host}\""
                )),
                None,
            );
            // Recorded: the caller must not record the tunnel again.
            return 1;
        }
    }
    let leaf = match shared.ca.leaf(&host) {
        Ok(leaf) => leaf,
        Err(e) => {
            tracing::warn!(%host, error = %e, "cannot mint a leaf certificate");
            return 0;
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let Ok(builder) =
        rustls::ServerConfig::builder_with_provider(provider).with_safe_default_protocol_versions()
    else {
        return 0;
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
        return 0;
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.limits.header_timeout)
        .max_buf_size(shared.limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        // A peer that stopped answering is let go.
        .keep_alive_interval(Some(std::time::Duration::from_secs(30)))
        .keep_alive_timeout(std::time::Duration::from_secs(20))
        .max_header_list_size(u32::try_from(shared.limits.max_header_bytes).unwrap_or(u32::MAX));
    let answered = Arc::new(AtomicU64::new(0));
    let served = match refusal {
        None => {
            let svc_shared = shared.clone();
            let service = service_fn(move |req| {
                handle_intercepted(svc_shared.clone(), ctx.clone(), host.clone(), port, req)
            });
            builder
                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                .await
        }
        Some(refusal) => {
            let count = answered.clone();
            let service = service_fn(move |req: Request<Incoming>| {
                count.fetch_add(1, Ordering::Relaxed);
                let (ctx, host, refusal) = (ctx.clone(), host.clone(), refusal.clone());
                async move {
                    let out = Outcome::new(
                        &ctx,
                        req.method().to_string(),
                        intercepted_url(&host, port, &req),
                        &host,
                        port,
                    );
                    let told = out.told(StatusCode::FORBIDDEN, Fault::Policy, refusal.message);
                    out.record(
                        Some(403),
                        Some(Fault::Policy),
                        Some(refusal.denied.clone()),
                        None,
                    );
                    // Read what the client sends (bounded), so that it reads
                    // the answer rather than a reset.
                    drain(req.into_body(), 1 << 20, std::time::Duration::from_secs(5)).await;
                    Ok::<_, Infallible>(text_response(StatusCode::FORBIDDEN, told))
                }
            });
            builder
                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                .await
        }
    };
    if let Err(e) = served {
        tracing::debug!(error = %e, "intercepted connection ended with an error");
    }
    answered.load(Ordering::Relaxed)
}

/// The URL of a request inside a tunnel to `host:port`, for the trace.
/// A target that is not a path (`*`, an authority) is left out: the error
/// of its record names it.
fn intercepted_url<B>(host: &str, port: u16, req: &Request<B>) -> String {
    let path = req
        .uri()
        .path_and_query()
        .map_or("", |p| p.as_str())
        .to_string();
    let path = if path.starts_with('/') {
        path.as_str()
    } else {
        ""
    };
    format!("https://{}{path}", url_authority(host, port, 443))
}

/// Hop-by-hop headers, never forwarded.
/// The hop-by-hop headers, as names (removing by name needs no parsing).
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
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
    for name in &HOP_BY_HOP {
        headers.remove(name);
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

/// A request's headers for its record, redacted; none when nothing takes
/// the client's records.
fn recorded_headers(
    ctx: &ClientCtx,
    headers: &HeaderMap,
    also: &[HeaderName],
) -> Vec<(String, String)> {
    if ctx.recorder.wanted() {
        redacted(headers, also)
    } else {
        Vec::new()
    }
}

fn redacted(headers: &HeaderMap, also: &[HeaderName]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(name, value)| {
            let secret = value.is_sensitive()
                || crate::trace::SECRET_HEADERS.contains(&name.as_str())
                || also.contains(name);
            let shown = if secret {
                crate::trace::REDACTED.to_string()
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

/// A credential put into a request, audited once the request was sent.
struct Injected {
    grant: String,
    header: String,
}

/// Audits the credentials injected into a request that was sent upstream.
fn audit_injected(out: &Outcome<'_>, method: &str, path: &str, injected: &[Injected]) {
    let Some(audit) = &out.ctx.audit else { return };
    for i in injected {
        audit.event(AuditEvent::CredentialInjected {
            client: out.ctx.name.clone(),
            host: out.host.clone(),
            port: out.port,
            grant: i.grant.clone(),
            header: i.header.clone(),
            method: method.to_string(),
            path: path.to_string(),
        });
    }
}

/// Waits for `response`, at most the response timeout after the request
/// body last made progress (`sent` counts its bytes), so a long upload is
/// not cut while it moves. `None` when the head did not come in time.
async fn head_within<T>(
    shared: &Shared,
    sent: &AtomicU64,
    response: impl std::future::Future<Output = T>,
) -> Option<T> {
    let limit = shared.limits.response_timeout;
    let mut response = std::pin::pin!(response);
    let mut seen = sent.load(Ordering::Relaxed);
    loop {
        match tokio::time::timeout(limit, response.as_mut()).await {
            Ok(result) => return Some(result),
            Err(_) => {
                let now = sent.load(Ordering::Relaxed);
                if now == seen {
                    return None;
                }
                seen = now;
            }
        }
    }
}

fn response_timeout(shared: &Shared, out: &Outcome<'_>) -> Response<ProxyBody> {
    out.fail(
        StatusCode::GATEWAY_TIMEOUT,
        format!(
            "the upstream sent no response within {} s",
            shared.limits.response_timeout.as_secs()
        ),
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
    let authority = url_authority(&host, port, 443);
    let out = Outcome::new(
        &ctx,
        req.method().to_string(),
        intercepted_url(&host, port, &req),
        &host,
        port,
    );

    // Only requests for a resource: not `OPTIONS *`, not a CONNECT inside
    // the tunnel (its target is not a path of this host).
    if req.method() == Method::CONNECT || !path.starts_with('/') {
        let msg = format!(
            "request target \"{}\" with method {} is not supported inside a tunnel (only a path, like /index.html)",
            req.uri(),
            req.method()
        );
        out.record(Some(400), Some(Fault::Client), Some(msg.clone()), None);
        return Ok(text_response(
            StatusCode::BAD_REQUEST,
            format!("Moat: {msg}; nothing was sent\n"),
        ));
    }

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
        out.record(
            Some(400),
            Some(Fault::Client),
            Some("no host in the request".into()),
            None,
        );
        return Ok(text_response(
            StatusCode::BAD_REQUEST,
            "Moat: the request names no host\n",
        ));
    }
    if let Some(refused) = misdirected(&out, &named, &host, port, 443, "the tunnel's host") {
        return Ok(refused);
    }
    let uri: Uri = match format!("https://{authority}{path}").parse() {
        Ok(uri) => uri,
        Err(_) => {
            out.record(
                Some(400),
                Some(Fault::Client),
                Some("bad request target".into()),
                None,
            );
            return Ok(text_response(
                StatusCode::BAD_REQUEST,
                "Moat: bad request target\n",
            ));
        }
    };

    // Request rules, on what the client asked for (before any phase).
    if let Some(refused) = judge_rules(
        &ctx,
        &out,
        &host,
        port,
        req.method(),
        req.headers(),
        &path,
        &out.url,
    ) {
        return Ok(refused);
    }
    let push_rules = crate::policy::rules::entry_for(&ctx.policy.rules, &host, port)
        .filter(|e| {
            e.has_git_rules() && crate::policy::rules::is_git_push(req.method().as_str(), &path)
        })
        .cloned();

    // A phase may answer on the host (Claude Code's token endpoint): the
    // request never leaves the proxy.
    let head = RequestHead {
        client: &ctx.name,
        method: req.method(),
        host: &host,
        port,
        path: &path,
    };
    for phase in &ctx.phases {
        if let Some(answer) = phase.respond(&head).await {
            // Read what the client sends first (a small body: a token
            // request), so that no client sees its request cut short.
            drain(req.into_body(), 1 << 20, std::time::Duration::from_secs(10)).await;
            return Ok(answered(&out, answer));
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
    let mut injected = Vec::new();
    let wants_credential = ctx.phases.iter().any(|p| p.injects_for(&host, port));
    if wants_credential
        && (is_echo(parts.method.as_str())
            || overrides_of(&parts.headers, &path)
                .iter()
                .any(|m| is_echo(m)))
    {
        // A server answers TRACE with the request as it arrived: the
        // credential would come back to the client in the body.
        let msg = format!(
            "TRACE and TRACK are not sent to {host} with a credential (as the method or an override): the server's echo of the request would show it"
        );
        out.decision(false, "echo");
        let told = out.told(
            StatusCode::METHOD_NOT_ALLOWED,
            Fault::Policy,
            format!("Moat: {msg}; nothing was sent\n"),
        );
        out.record(Some(405), Some(Fault::Policy), Some(msg), None);
        return Ok(text_response(StatusCode::METHOD_NOT_ALLOWED, told));
    }
    if wants_credential {
        // Fail closed: no credential is used that the audit log cannot record.
        if let Some(Err(why)) = ctx.audit.as_ref().map(|a| a.healthy()) {
            out.record(
                Some(503),
                Some(Fault::Internal),
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
    // The phases that inject (credentials in headers): each value replaces
    // any client-sent header of that name (placeholders), once.
    for phase in &ctx.phases {
        let done = match phase.inject(&host, port, &mut parts.headers).await {
            Ok(done) => done,
            Err(answer) => return Ok(answered(&out, answer)),
        };
        if let Some(audit) = &ctx.audit {
            for event in done.audit {
                audit.event(event);
            }
        }
        for injection in done.injections {
            grant = Some(injection.grant.clone());
            injected_headers.push(injection.header.clone());
            injected.push(Injected {
                grant: injection.grant,
                header: injection.header.as_str().to_string(),
            });
        }
    }
    let method = parts.method.to_string();
    let uri_path = uri.path().to_string();
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    let request_headers = recorded_headers(&ctx, &parts.headers, &injected_headers);
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
        out.sending(&method, &uri_path, injected);
        return Ok(
            forward_upgrade(&shared, &out, req, client_upgrade, grant, request_headers).await,
        );
    }
    let sent = Arc::new(AtomicU64::new(0));
    let req_capture = capture_for(&ctx, &parts.headers);
    let body: ProxyBody = match push_rules {
        Some(entry) => match judge_push(&shared, &entry, &out, &parts.headers, body).await {
            Ok(body) => body,
            Err(refusal) => return Ok(refusal),
        },
        None => body.map_err(Into::into).boxed(),
    };
    let body = Counted::new(body, sent.clone(), None)
        .capturing(req_capture.clone())
        .boxed();
    let upstream_req = Request::from_parts(parts, body);

    out.sending(&method, &uri_path, injected);
    let pools = shared.pools(&ctx, &host, port);
    let result = head_within(&shared, &sent, pools.https.request(upstream_req))
        .await
        .transpose();
    // A credential left the proxy unless the connection was never made.
    out.settle(match &result {
        Ok(_) => true,
        Err(e) => !e.is_connect(),
    });
    if let Ok(Some(resp)) = &result {
        for phase in &ctx.phases {
            phase.observe(&host, port, resp.status());
        }
    }
    match result {
        Ok(Some(resp)) => Ok(stream_back(
            &out,
            resp,
            grant,
            request_headers,
            sent,
            req_capture,
        )),
        Ok(None) => Ok(response_timeout(&shared, &out)),
        Err(e) => {
            let (status, msg, denied) = upstream_error_response(&e);
            Ok(out.fail(status, msg, denied))
        }
    }
}

/// Methods whose answer is the request itself: TRACE (RFC 9110 §9.3.8: a
/// client must not send credentials with it) and IIS's TRACK.
fn is_echo(method: &str) -> bool {
    method.eq_ignore_ascii_case("TRACE") || method.eq_ignore_ascii_case("TRACK")
}

/// The most of a push's start read to find its ref updates.
const PUSH_COMMANDS_LIMIT: usize = 1 << 20;

/// Why a push is refused when [`Limits::held_body_bytes`] are taken: a
/// push's ref updates wait in memory until they are whole, and without a
/// shared bound many slow pushes would hold the proxy's memory.
const BUSY: &str = "the proxy is reading too many pushes at once; try again in a moment";

/// Reads a body the proxy answers without sending it on, and drops it, so
/// that the client reads the answer rather than a reset: at most `limit`
/// bytes and for at most `within`; nothing is kept.
async fn drain(mut body: Incoming, limit: u64, within: std::time::Duration) {
    let read = async {
        let mut seen = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len() as u64);
            if seen >= limit {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(within, read).await;
}

/// Judges a git push by its ref updates (read from the start of its body):
/// the body to send on when every update is allowed; else git's own
/// refusal of the whole push (nothing of it is sent), recorded and audited
/// with the rules that decided.
async fn judge_push(
    shared: &Shared,
    entry: &crate::policy::rules::HostRules,
    out: &Outcome<'_>,
    headers: &HeaderMap,
    body: Incoming,
) -> Result<ProxyBody, Response<ProxyBody>> {
    use crate::policy::rules::{push_refusal, PushReader};
    let refuse = |out: &Outcome<'_>, why: String| {
        out.ruled(false, "git");
        out.record(
            Some(403),
            Some(Fault::Policy),
            Some(format!("rule: {why}")),
            None,
        );
        text_response(
            StatusCode::FORBIDDEN,
            format!("Moat: push blocked by network policy: {why}\n"),
        )
    };
    if headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
    {
        return Err(refuse(
            out,
            "a compressed push cannot be read for its refs".into(),
        ));
    }
    let mut body = body;
    let mut head = Vec::new();
    // The bytes `head` holds, counted against the proxy's shared bound.
    let mut held = shared.held.clone().try_acquire_many_owned(0).ok();
    let mut reader = PushReader::default();
    let within = shared.limits.header_timeout;
    let read = async {
        loop {
            match reader.read(&head) {
                Ok(Some(p)) => return Ok(p),
                Ok(None) if head.len() < PUSH_COMMANDS_LIMIT => {}
                Ok(None) => return Err("the push's ref updates are too long".to_string()),
                Err(e) => return Err(format!("the push cannot be read: {e}")),
            }
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        head.extend_from_slice(data);
                        // What `head` takes (its capacity), not only its length.
                        let counted = held.as_ref().map_or(0, |h| h.num_permits());
                        let more = head.capacity().saturating_sub(counted);
                        let got = u32::try_from(more)
                            .ok()
                            .and_then(|n| shared.held.clone().try_acquire_many_owned(n).ok());
                        match (held.as_mut(), got) {
                            (Some(h), Some(g)) => h.merge(g),
                            _ => return Err(BUSY.to_string()),
                        }
                    }
                }
                Some(Err(e)) => return Err(format!("the push stopped short: {e}")),
                None => return Err("the push ended before its ref updates".to_string()),
            }
        }
    };
    let parsed = match tokio::time::timeout(within, read).await {
        Ok(Ok(p)) => p,
        Ok(Err(why)) => {
            // What was held goes now; the rest is read (and dropped, within
            // bounds) so that git reads the refusal rather than a reset.
            drop(held);
            drop(head);
            drain(body, 1 << 20, std::time::Duration::from_secs(5)).await;
            return Err(refuse(out, why));
        }
        Err(_) => {
            return Err(refuse(
                out,
                format!(
                    "the push's ref updates did not arrive within {} s",
                    within.as_secs()
                ),
            ))
        }
    };
    let (updates, caps) = parsed;
    let mut verdicts = Vec::new();
    let mut denied = Vec::new();
    for u in &updates {
        let (allowed, rule) = entry.judge_ref(u);
        let rule = rule.unwrap_or_else(|| {
            format!(
                "no git-{} rule for {} matches it",
                if u.is_delete() { "delete" } else { "push" },
                entry.host
            )
        });
        if !allowed {
            denied.push(format!("{} ({rule})", u.name));
        }
        verdicts.push((u.clone(), allowed, rule));
    }
    if denied.is_empty() {
        let rules: Vec<&str> = verdicts.iter().map(|(_, _, r)| r.as_str()).collect();
        out.ruled(true, &rules.join("; "));
        let rest = body.map_err(Into::into);
        let first = futures_util::stream::once(async move {
            // The bound counts the bytes until they are handed on.
            drop(held);
            Ok::<_, BoxError>(hyper::body::Frame::data(Bytes::from(head)))
        });
        let stream = futures_util::StreamExt::chain(first, http_body_util::BodyStream::new(rest));
        return Ok(http_body_util::StreamBody::new(stream).boxed());
    }
    let why = format!("denied: {}", denied.join(", "));
    out.ruled(false, &why);
    drop(held);
    drop(head);
    // Read the rest of the push (and drop it) so that git hears the answer.
    drain(body, u64::MAX, std::time::Duration::from_secs(60)).await;
    let lines: Vec<_> = verdicts
        .into_iter()
        .map(|(u, allowed, rule)| {
            let reason = if allowed {
                "moat: the push is refused whole (another ref is denied)".to_string()
            } else {
                format!("moat: {rule}")
            };
            (u, reason)
        })
        .collect();
    out.record(
        Some(200),
        Some(Fault::Policy),
        Some(format!("rule: {why}")),
        None,
    );
    let mut resp = Response::new(full(Bytes::from(push_refusal(&lines, &caps))));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-git-receive-pack-result"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Err(resp)
}

/// The protocol of an HTTP/1.1 WebSocket upgrade request, if it is one: a
/// GET (RFC 6455). Upgrade headers on any other request are dropped as
/// hop-by-hop and it is forwarded as it is, judged like any other (a git
/// push with them is still read for its refs).
fn websocket_upgrade<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != http::Version::HTTP_11 || req.method() != Method::GET {
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
    let fail = |status: StatusCode, msg: String, denied: bool| {
        // Nothing was sent: no connection, or no TLS.
        out.settle(false);
        out.fail(status, msg, denied)
    };
    let timeout = shared.limits.connect_timeout;
    let chosen = upstream::chosen(&out.ctx.phases, &out.host, out.port);
    let dialled = match chosen {
        Some(addr) => upstream::dial_addr(&out.host, addr, timeout).await,
        None => upstream::dial(&out.host, out.port, &shared.overrides, timeout).await,
    };
    let tcp = match dialled {
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
    let sent = tokio::time::timeout(
        shared.limits.response_timeout,
        sender.send_request(Request::from_parts(parts, body)),
    )
    .await;
    out.settle(true);
    let mut resp = match sent {
        Ok(Ok(resp)) => resp,
        Err(_) => {
            conn_task.abort();
            return response_timeout(shared, out);
        }
        Ok(Err(e)) => {
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
    out.handed_off();
    if status != StatusCode::SWITCHING_PROTOCOLS {
        // Refused by the upstream: pass its answer on as an ordinary response.
        out.ctx.recorder.emit(record);
        let (parts, body) = resp.into_parts();
        return Response::from_parts(parts, body.map_err(Into::into).boxed());
    }
    let upstream_upgrade = hyper::upgrade::on(&mut resp);
    let recorder = out.ctx.recorder.clone();
    let started = out.started;
    let cancel = shared.cancel.clone();
    shared.tasks.spawn(async move {
        let counts = Relayed::default();
        let cut = tokio::select! {
            () = relay_upgraded(client_upgrade, upstream_upgrade, &counts) => false,
            () = cancel.cancelled() => true,
        };
        let (up, down) = counts.now();
        let mut record = record;
        if cut {
            record.error = Some("the connection was cut: the proxy shut down".into());
            record.fault = Some(Fault::Internal);
        }
        record.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
        record.request_bytes = up;
        record.response_bytes = down;
        recorder.emit(record);
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
    let recorder = out.ctx.recorder.clone();
    out.handed_off();
    let on_end: Option<OnEnd> = recorder.wanted().then(|| {
        let record = TraceRecord {
            grant,
            request_headers,
            response_headers: redacted(&parts.headers, &[]),
            ..out.trace_record(Some(parts.status.as_u16()))
        };
        let started = out.started;
        let received = received.clone();
        let f: OnEnd = Box::new(move |short: Option<(Fault, String)>| {
            let mut record = record;
            (record.fault, record.error) = short.unzip();
            record.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
            record.request_bytes = sent.load(Ordering::Relaxed);
            record.response_bytes = received.load(Ordering::Relaxed);
            record.request_body = req_capture.and_then(|c| c.text());
            record.response_body = capture_for_record.and_then(|c| c.text());
            recorder.emit(record);
        });
        f
    });
    let body = Counted::new(body.map_err(Into::into).boxed(), received, on_end)
        .capturing(resp_capture)
        .boxed();
    Response::from_parts(parts, body)
}

/// `421` when any of `names` (Host headers, an `:authority`) is not
/// `host:port` (`default_port` when a name has none), recorded; `what`
/// says what they must match in the message.
fn misdirected(
    out: &Outcome<'_>,
    names: &[String],
    host: &str,
    port: u16,
    default_port: u16,
    what: &str,
) -> Option<Response<ProxyBody>> {
    let name = names.iter().find(|name| {
        !split_authority(name)
            .is_some_and(|(h, p)| same_host(&h, host) && p.unwrap_or(default_port) == port)
    })?;
    let msg = format!(
        "request host \"{name}\" does not match {what} \"{}\"",
        url_authority(host, port, default_port)
    );
    out.decision(false, "identity");
    let told = out.told(
        StatusCode::MISDIRECTED_REQUEST,
        Fault::Client,
        format!("Moat: {msg}; nothing was sent\n"),
    );
    out.record(Some(421), Some(Fault::Client), Some(msg.clone()), None);
    Some(text_response(StatusCode::MISDIRECTED_REQUEST, told))
}

/// An absolute-form `http://` request: forwarded without any credential
/// (credentials never travel over plain HTTP).
async fn forward_plain(
    shared: Arc<Shared>,
    ctx: Arc<ClientCtx>,
    last: &LastAllowed,
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
    // Refusals are audited every time; an allowance once per connection
    // and destination (and again whenever the allowing rule changes).
    let repeated = decision.allowed
        && last.lock().is_ok_and(|mut last| {
            let same = last.as_ref().is_some_and(|(id, h, p, rule)| {
                (*id, h.as_str(), *p, rule.as_str()) == (ctx.id, &*host, port, &*decision.rule)
            });
            if !same {
                *last = Some((ctx.id, host.clone(), port, decision.rule.clone()));
            }
            same
        });
    if !repeated {
        out.decision(decision.allowed, &decision.rule);
    }
    if !decision.allowed {
        out.record(
            Some(403),
            Some(Fault::Policy),
            Some("network policy".into()),
            None,
        );
        return text_response(StatusCode::FORBIDDEN, blocked_message(&host));
    }
    // The Host header must name what was judged, as inside a tunnel: a
    // server behind a shared address (virtual hosts, a CDN) would answer
    // for the host the header names.
    let named: Vec<String> = req
        .headers()
        .get_all(header::HOST)
        .iter()
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        .collect();
    if let Some(refused) = misdirected(&out, &named, &host, port, 80, "the request target's host") {
        return refused;
    }
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    if let Some(refused) = judge_rules(
        &ctx,
        &out,
        &host,
        port,
        req.method(),
        req.headers(),
        &path,
        &out.url,
    ) {
        return refused;
    }
    if crate::policy::rules::entry_for(&ctx.policy.rules, &host, port).is_some_and(|e| {
        e.has_git_rules() && crate::policy::rules::is_git_push(req.method().as_str(), &path)
    }) {
        out.ruled(false, "git over plain http");
        out.record(
            Some(403),
            Some(Fault::Policy),
            Some("rule: git push over plain http".into()),
            None,
        );
        return text_response(
            StatusCode::FORBIDDEN,
            "Moat: push blocked by network policy: pushes to a host with git rules must use https\n",
        );
    }
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.version = http::Version::HTTP_11;
    let request_headers = recorded_headers(&ctx, &parts.headers, &[]);
    let sent = Arc::new(AtomicU64::new(0));
    let req_capture = capture_for(&ctx, &parts.headers);
    let body = Counted::new(body.map_err(Into::into).boxed(), sent.clone(), None)
        .capturing(req_capture.clone())
        .boxed();
    let response = shared
        .pools(&ctx, &host, port)
        .http
        .request(Request::from_parts(parts, body));
    match head_within(&shared, &sent, response).await.transpose() {
        Ok(Some(resp)) => stream_back(&out, resp, None, request_headers, sent, req_capture),
        Ok(None) => response_timeout(&shared, &out),
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
