//! Hostname routing: `https://<endpoint>.<agent>.localhost:<port>` to that
//! agent's container port, for every agent on the machine, on one port.
//!
//! The [`Router`] serves HTTP and HTTPS on the same listener (a TLS client
//! hello starts with byte `0x16`), presents certificates from the moat CA for
//! `*.localhost` names only, and forwards to the address in the shared route
//! table ([`table`]), which it re-reads whenever the file changes. Only
//! `*.localhost` Host names are served (a DNS-rebinding page gets nothing);
//! an unknown name gets a page listing the agents, never another agent's
//! content. WebSocket upgrades and streaming responses pass through.

pub mod daemon;
pub mod table;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{Error, ErrorKind, Result};
use crate::proxy::CertificateAuthority;
use table::Routes;

type Body = http_body_util::combinators::BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut resp = Response::new(
        http_body_util::Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// Where a request goes, from its Host name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Not a `*.localhost` name: refused.
    Foreign,
    /// `localhost`: the list of agents.
    Index,
    /// `<agent>.localhost`: the agent's endpoints.
    Agent(String),
    /// `<endpoint>.<agent>.localhost`.
    Endpoint(String, String),
    /// Deeper names: unknown.
    Unknown,
}

/// Reads a Host value (`web.a.localhost:8080`) as a [`Target`].
pub fn target(host: &str) -> Target {
    let name = host
        .rsplit_once(':')
        .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
        .map_or(host, |(name, _)| name)
        .trim_end_matches('.')
        .to_ascii_lowercase();
    if name == "localhost" {
        return Target::Index;
    }
    let Some(rest) = name.strip_suffix(".localhost") else {
        return Target::Foreign;
    };
    let labels: Vec<&str> = rest.split('.').collect();
    match labels.as_slice() {
        [agent] if !agent.is_empty() => Target::Agent(agent.to_string()),
        [endpoint, agent] if !endpoint.is_empty() && !agent.is_empty() => {
            Target::Endpoint(endpoint.to_string(), agent.to_string())
        }
        _ => Target::Unknown,
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

struct Shared {
    home: PathBuf,
    ca: CertificateAuthority,
    port: u16,
    routes: Mutex<(Option<SystemTime>, Arc<Routes>)>,
    /// A router for one run's container: only this agent's endpoints, per
    /// request, and never a listing ([`Router::serve_own`]).
    only: Option<Own>,
}

/// The one agent, and its endpoints, a run's own router serves.
#[derive(Debug, Clone)]
struct Own {
    agent: String,
    endpoints: Vec<String>,
    /// Connections open at once, at most.
    slots: Arc<tokio::sync::Semaphore>,
}

/// Connections a run's own router holds open at once.
const OWN_CONNECTIONS: usize = 64;

impl Shared {
    /// The table, re-read when its file changed.
    fn routes(&self) -> Arc<Routes> {
        let modified = std::fs::metadata(table::path(&self.home))
            .and_then(|m| m.modified())
            .ok();
        let Ok(mut cached) = self.routes.lock() else {
            return Arc::default();
        };
        if cached.0 != modified || modified.is_none() {
            if let Ok(routes) = table::load(&self.home) {
                *cached = (modified, Arc::new(routes));
            }
        }
        Arc::clone(&cached.1)
    }

    fn listing(&self, scheme: &str, routes: &Routes, heading: &str) -> String {
        let mut html = format!(
            "<!doctype html><title>moat</title><h1>{}</h1>",
            escape(heading)
        );
        if routes.agents.is_empty() {
            html.push_str("<p>No agent with endpoints is running.</p>");
        }
        for (agent, r) in &routes.agents {
            html.push_str(&format!("<h2>{}</h2><ul>", escape(agent)));
            for endpoint in r.endpoints.keys() {
                let url = format!(
                    "{scheme}://{}.{}.localhost:{}",
                    escape(endpoint),
                    escape(agent),
                    self.port
                );
                html.push_str(&format!("<li><a href=\"{url}\">{url}</a></li>"));
            }
            html.push_str("</ul>");
        }
        html
    }
}

/// The routing proxy.
pub struct Router {
    addr: SocketAddr,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router").field("addr", &self.addr).finish()
    }
}

impl Router {
    /// Listens on `listen` and serves the routes of `home`'s table.
    pub async fn start(home: &Path, listen: SocketAddr) -> Result<Router> {
        let ca = CertificateAuthority::load_or_create(&home.join("proxy").join("ca"))?;
        let listener = TcpListener::bind(listen).await.map_err(|e| {
            Error::new(
                ErrorKind::Io,
                format!(
                    "cannot listen on {listen}: {e} (is another router or server on that port? Choose another port with MOAT_PROXY_PORT=PORT, or `moat proxy start --port PORT`)"
                ),
            )
        })?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::new(ErrorKind::Io, format!("listener address: {e}")))?;
        let shared = Arc::new(Shared {
            home: home.to_path_buf(),
            ca,
            port: addr.port(),
            routes: Mutex::new((None, Arc::default())),
            only: None,
        });
        Ok(Router::spawn(listener, addr, shared))
    }

    /// Serves, on `listener`, `agent`'s own `endpoints` and nothing else:
    /// the router a run's container reaches its own URLs through (see
    /// `run::supervisor::loopback`). Every request's Host must name one of
    /// them (else 403, and never a listing of other agents); at most
    /// `OWN_CONNECTIONS` connections at once.
    pub fn serve_own(
        home: &Path,
        listener: TcpListener,
        agent: &str,
        endpoints: Vec<String>,
    ) -> Result<Router> {
        let ca = CertificateAuthority::load_or_create(&home.join("proxy").join("ca"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::new(ErrorKind::Io, format!("listener address: {e}")))?;
        let shared = Arc::new(Shared {
            home: home.to_path_buf(),
            ca,
            port: addr.port(),
            routes: Mutex::new((None, Arc::default())),
            only: Some(Own {
                agent: agent.to_ascii_lowercase(),
                endpoints,
                slots: Arc::new(tokio::sync::Semaphore::new(OWN_CONNECTIONS)),
            }),
        });
        Ok(Router::spawn(listener, addr, shared))
    }

    fn spawn(listener: TcpListener, addr: SocketAddr, shared: Arc<Shared>) -> Router {
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (c, t) = (cancel.clone(), tasks.clone());
        tasks.spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = c.cancelled() => break,
                    a = listener.accept() => a,
                };
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of descriptors, say: wait a little rather
                        // than spin on the error.
                        tracing::debug!(error = %e, "router accept");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // A run's own router holds a bounded number of connections:
                // one more waits for a slot (closed at once when none frees
                // within a while).
                let slot = match &shared.only {
                    Some(own) => match tokio::time::timeout(
                        std::time::Duration::from_secs(5),
                        own.slots.clone().acquire_owned(),
                    )
                    .await
                    {
                        Ok(Ok(slot)) => Some(slot),
                        _ => continue,
                    },
                    None => None,
                };
                let shared = shared.clone();
                let held = Held {
                    slot: slot.map(Arc::new),
                    cancel: c.clone(),
                    tasks: t.clone(),
                };
                t.spawn(async move {
                    let cancel = held.cancel.clone();
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = serve(shared, stream, held) => {}
                    }
                });
            }
        });
        Router {
            addr,
            cancel,
            tasks,
        }
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and cuts open connections, without waiting for them.
    pub fn stop(&self) {
        self.cancel.cancel();
    }

    /// Stops accepting and cuts open connections.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.tasks.wait()).await;
    }
}

/// What a client connection holds, and what outlives it holds too: its
/// slot (a run's own router), and the router's cancel and tasks, so that an
/// upgraded connection's relay counts against the bound, is tracked and
/// ends with the router.
#[derive(Clone)]
struct Held {
    slot: Option<Arc<tokio::sync::OwnedSemaphorePermit>>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

/// Serves one connection: TLS when it starts with a handshake record.
async fn serve(shared: Arc<Shared>, stream: TcpStream, held: Held) {
    let mut first = [0u8; 1];
    let Ok(Ok(n)) =
        tokio::time::timeout(std::time::Duration::from_secs(10), stream.peek(&mut first)).await
    else {
        return;
    };
    if n == 1 && crate::net::starts_tls(first[0]) {
        let config = match tls_config(&shared) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "router tls configuration");
                return;
            }
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let Ok(Ok(tls)) =
            tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(stream)).await
        else {
            return;
        };
        serve_http(shared, TokioIo::new(tls), "https", held).await;
    } else {
        serve_http(shared, TokioIo::new(stream), "http", held).await;
    }
}

/// Certificates for `*.localhost` names, minted from the moat CA.
#[derive(Debug)]
struct LocalhostCerts(Arc<Shared>);

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("port", &self.port).finish()
    }
}

impl rustls::server::ResolvesServerCert for LocalhostCerts {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let name = hello
            .server_name()
            .unwrap_or("localhost")
            .to_ascii_lowercase();
        if name != "localhost" && !name.ends_with(".localhost") {
            return None;
        }
        self.0.ca.leaf(&name).ok()
    }
}

fn tls_config(shared: &Arc<Shared>) -> Result<Arc<rustls::ServerConfig>> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::new(ErrorKind::Internal, format!("tls: {e}")))?
    .with_no_client_auth()
    .with_cert_resolver(Arc::new(LocalhostCerts(shared.clone())));
    // HTTP/1.1 only: WebSocket upgrades stay simple.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

async fn serve_http<I>(shared: Arc<Shared>, io: TokioIo<I>, scheme: &'static str, held: Held)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // The connection to the endpoint is kept for the next request of this
    // client connection (HTTP/1.1 serves one request at a time).
    let upstream: Upstream = Arc::default();
    let service = service_fn(move |req| {
        let shared = shared.clone();
        let upstream = upstream.clone();
        let held = held.clone();
        async move {
            Ok::<_, std::convert::Infallible>(route(shared, upstream, req, scheme, held).await)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(30))
        .serve_connection(io, service)
        .with_upgrades()
        .await;
}

/// A kept connection to an endpoint: its address and its sender.
type Upstream =
    Arc<tokio::sync::Mutex<Option<(String, hyper::client::conn::http1::SendRequest<Incoming>)>>>;

async fn route(
    shared: Arc<Shared>,
    upstream: Upstream,
    req: Request<Incoming>,
    scheme: &str,
    held: Held,
) -> Response<Body> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or("")
        .to_string();
    let routes = shared.routes();
    let html = "text/html; charset=utf-8";
    if let Some(own) = &shared.only {
        // Judged per request: a kept-alive connection may name another
        // host in its next request.
        return match target(&host) {
            Target::Endpoint(endpoint, agent)
                if agent == own.agent && own.endpoints.iter().any(|e| e.eq_ignore_ascii_case(&endpoint)) =>
            {
                match routes.agents.get(&agent).and_then(|r| r.endpoints.get(&endpoint)) {
                    Some(addr) => forward(addr, &upstream, req, scheme, held).await,
                    None => bad_gateway(format!(
                        "moat: {endpoint}.{agent}.localhost is not routed yet (its container has no address)\n"
                    )),
                }
            }
            _ => text(
                StatusCode::FORBIDDEN,
                "text/plain; charset=utf-8",
                format!(
                    "moat: from inside this run, 127.0.0.1 at the routing port reaches only this run's own endpoints ({}), not \"{host}\"\n",
                    own.endpoints
                        .iter()
                        .map(|e| format!("{e}.{}.localhost", own.agent))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
        };
    }
    match target(&host) {
        Target::Foreign => text(
            StatusCode::MISDIRECTED_REQUEST,
            "text/plain; charset=utf-8",
            format!(
                "moat routes only *.localhost names; \"{host}\" is not one (open https://<endpoint>.<agent>.localhost:{})\n",
                shared.port
            ),
        ),
        Target::Index | Target::Unknown => text(
            if matches!(target(&host), Target::Index) {
                StatusCode::OK
            } else {
                StatusCode::NOT_FOUND
            },
            html,
            shared.listing(scheme, &routes, "Agents running with moat"),
        ),
        Target::Agent(agent) => match routes.agents.get(&agent) {
            Some(r) => {
                let only = Routes {
                    agents: [(agent.clone(), r.clone())].into_iter().collect(),
                };
                text(StatusCode::OK, html, shared.listing(scheme, &only, &format!("Endpoints of {agent}")))
            }
            None => text(
                StatusCode::NOT_FOUND,
                html,
                shared.listing(scheme, &routes, &format!("No agent named \"{agent}\" is running")),
            ),
        },
        Target::Endpoint(endpoint, agent) => {
            match routes.agents.get(&agent).and_then(|r| r.endpoints.get(&endpoint)) {
                Some(addr) => forward(addr, &upstream, req, scheme, held).await,
                None => text(
                    StatusCode::NOT_FOUND,
                    html,
                    shared.listing(
                        scheme,
                        &routes,
                        &format!("No endpoint \"{endpoint}\" of an agent \"{agent}\" is running"),
                    ),
                ),
            }
        }
    }
}

fn bad_gateway(message: String) -> Response<Body> {
    text(
        StatusCode::BAD_GATEWAY,
        "text/plain; charset=utf-8",
        message,
    )
}

/// Forwards a request to `addr`, over the kept connection when it goes
/// there and is ready, else a new one; a WebSocket upgrade (any `101
/// Switching Protocols`) gets a connection of its own and passes through.
async fn forward(
    addr: &str,
    upstream: &Upstream,
    mut req: Request<Incoming>,
    scheme: &str,
    held: Held,
) -> Response<Body> {
    let upgrade = req.headers().contains_key(header::UPGRADE);
    let mut kept = upstream.lock().await;
    let reusable = !upgrade
        && match kept.as_mut() {
            Some((a, sender)) if a == addr => sender.ready().await.is_ok(),
            _ => false,
        };
    let mut sender = match (reusable, kept.take()) {
        (true, Some((_, sender))) => sender,
        _ => match connect(addr).await {
            Ok(s) => s,
            Err(resp) => return resp,
        },
    };
    let client_upgrade = hyper::upgrade::on(&mut req);
    let client_host = req.headers().get(header::HOST).cloned();
    if let Some(h) = client_host {
        req.headers_mut().insert("x-forwarded-host", h);
    }
    if let Ok(v) = HeaderValue::from_str(scheme) {
        req.headers_mut().insert("x-forwarded-proto", v);
    }
    // Origin-form on the way upstream.
    if let Some(pq) = req.uri().path_and_query().cloned() {
        if let Ok(uri) = pq.as_str().parse() {
            *req.uri_mut() = uri;
        }
    }
    let sent = sender.send_request(req).await;
    if !upgrade {
        *kept = Some((addr.to_string(), sender));
    }
    drop(kept);
    let mut resp = match sent {
        Ok(r) => r,
        Err(e) => {
            return bad_gateway(format!(
                "moat: the agent's endpoint at {addr} failed: {e}\n"
            ))
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        // The relay holds the client connection's slot until it ends, and
        // ends with the router.
        let Held {
            slot,
            cancel,
            tasks,
        } = held;
        tasks.spawn(async move {
            let counts = crate::net::Relayed::default();
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = crate::net::relay_upgraded(client_upgrade, upstream_upgrade, &counts) => {}
            }
            drop(slot);
        });
    }
    resp.map(|b| {
        b.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
            .boxed()
    })
}

/// A new HTTP/1.1 connection to an endpoint.
async fn connect(
    addr: &str,
) -> std::result::Result<hyper::client::conn::http1::SendRequest<Incoming>, Response<Body>> {
    let stream = match tokio::time::timeout(
        std::time::Duration::from_secs(10),
        TcpStream::connect(addr),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Err(bad_gateway(format!(
                "moat: the agent's endpoint at {addr} does not answer ({e}); is its server listening on 0.0.0.0?\n"
            )))
        }
        Err(_) => {
            return Err(bad_gateway(format!(
                "moat: the agent's endpoint at {addr} does not answer\n"
            )))
        }
    };
    let _ = stream.set_nodelay(true);
    let Ok((sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    else {
        return Err(bad_gateway(format!("moat: cannot speak HTTP to {addr}\n")));
    };
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_read_as_targets() {
        assert_eq!(
            target("web.a.localhost:8080"),
            Target::Endpoint("web".into(), "a".into())
        );
        assert_eq!(
            target("WEB.A.LOCALHOST."),
            Target::Endpoint("web".into(), "a".into())
        );
        assert_eq!(target("a.localhost"), Target::Agent("a".into()));
        assert_eq!(target("localhost:8080"), Target::Index);
        assert_eq!(target("x.web.a.localhost"), Target::Unknown);
        assert_eq!(target("evil.example.com"), Target::Foreign);
        assert_eq!(target("web.a.localhost.evil.com"), Target::Foreign);
        assert_eq!(target("127.0.0.1:8080"), Target::Foreign);
        assert_eq!(target(""), Target::Foreign);
        assert_eq!(target(".localhost"), Target::Unknown);
    }
}
