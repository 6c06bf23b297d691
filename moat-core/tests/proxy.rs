//! The proxy against real local upstreams (HTTPS with a test CA, plain HTTP,
//! raw TCP) and real clients (curl, a raw TLS client). All traffic stays on
//! loopback: upstream host names reach local servers through the proxy's
//! resolve overrides.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use moat_core::policy::{HostPattern, PolicyMode};
use moat_core::proxy::{ClientHandle, ClientSpec, Credential, Limits, Proxy, ProxyBuilder};
use moat_core::trace::{AuditEvent, Fault, MemorySink};
use rcgen::{CertificateParams, DnType, IsCa, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TOKEN: &str = "ghp_REALsecretTOKENvalue0123456789";

/// How long the upstream's `/sse` stream idles between its two events: long
/// enough that a buffered first event, or a stream cut by the proxy's
/// timeouts, shows even on a slow, loaded machine.
const SSE_GAP: Duration = Duration::from_secs(5);

/// A request the upstream saw.
#[derive(Debug, Clone)]
struct Seen {
    host: String,
    path: String,
    authorization: Vec<String>,
    version: String,
    body: Vec<u8>,
}

type Log = Arc<Mutex<Vec<Seen>>>;

struct Upstream {
    addr: SocketAddr,
    log: Log,
}

struct Env {
    dir: tempfile::TempDir,
    upstream_ca: PathBuf,
    tls: Arc<rustls::ServerConfig>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A test CA (not moat's) and a server config for the upstream names.
fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "upstream test ca");
    ca_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let upstream_ca = dir.path().join("upstream-ca.pem");
    std::fs::write(&upstream_ca, ca_cert.pem()).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let leaf = CertificateParams::new(vec![
        "api.github.com".to_string(),
        "github.com".to_string(),
        "other.test".to_string(),
    ])
    .unwrap()
    .signed_by(&leaf_key, &issuer)
    .unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            PrivateKeyDer::from_pem_slice(leaf_key.serialize_pem().as_bytes()).unwrap(),
        )
        .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Env {
        dir,
        upstream_ca,
        tls: Arc::new(tls),
    }
}

async fn route(
    req: Request<Incoming>,
    log: Log,
) -> Result<Response<http_body_util::combinators::BoxBody<Bytes, Infallible>>, Infallible> {
    let host = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            req.headers()
                .get("host")
                .map(|h| h.to_str().unwrap().to_string())
        })
        .unwrap_or_default();
    let authorization: Vec<String> = req
        .headers()
        .get_all("authorization")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    let path = req.uri().path().to_string();
    let version = format!("{:?}", req.version());
    let full = |s: String| Full::new(Bytes::from(s)).boxed();
    let mut seen = Seen {
        host: host.clone(),
        path: path.clone(),
        authorization: authorization.clone(),
        version,
        body: Vec::new(),
    };
    if path == "/ws" {
        log.lock().unwrap().push(seen);
        return Ok(websocket_echo(req));
    }
    // Like most servers, read the request body before answering.
    seen.body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    log.lock().unwrap().push(seen);
    match path.as_str() {
        // An upstream that never answers.
        "/hang" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(Response::new(full(String::new())))
        }
        // A body that stops short: 1000 bytes promised, 7 sent.
        "/cut" => {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
            tokio::spawn(async move {
                let _ = tx.send(Ok(Frame::data(Bytes::from("partial")))).await;
            });
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
            Ok(Response::builder()
                .header("content-length", "1000")
                .body(StreamBody::new(stream).boxed())
                .unwrap())
        }
        "/redirect" => Ok(Response::builder()
            .status(302)
            .header("location", "https://other.test/after-redirect")
            .body(full(String::new()))
            .unwrap()),
        // Two events, SSE_GAP apart.
        "/sse" => {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
            tokio::spawn(async move {
                let _ = tx.send(Ok(Frame::data(Bytes::from("data: one\n\n")))).await;
                tokio::time::sleep(SSE_GAP).await;
                let _ = tx.send(Ok(Frame::data(Bytes::from("data: two\n\n")))).await;
            });
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
            Ok(Response::builder()
                .header("content-type", "text/event-stream")
                .body(StreamBody::new(stream).boxed())
                .unwrap())
        }
        _ => {
            let body = serde_json::json!({
                "host": host,
                "path": path,
                "authorization": authorization,
            });
            Ok(Response::new(full(body.to_string())))
        }
    }
}

/// Accepts a WebSocket upgrade and echoes every message.
fn websocket_echo(
    mut req: Request<Incoming>,
) -> Response<http_body_util::combinators::BoxBody<Bytes, Infallible>> {
    use futures_util::{SinkExt, StreamExt};
    let key = req.headers().get("sec-websocket-key").cloned().unwrap();
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(io) = upgrade.await else { return };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(io),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_text() || msg.is_binary() {
                let _ = ws.send(msg).await;
            }
        }
    });
    Response::builder()
        .status(101)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", accept)
        .body(Full::new(Bytes::new()).boxed())
        .unwrap()
}

/// Starts an HTTPS upstream (HTTP/1.1 and HTTP/2) on loopback.
async fn https_upstream(tls: Arc<rustls::ServerConfig>) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Log = Arc::default();
    let accept_log = log.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
            let log = accept_log.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| route(req, log.clone()));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    Upstream { addr, log }
}

/// Starts a plain HTTP upstream on loopback.
async fn http_upstream() -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Log = Arc::default();
    let accept_log = log.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let log = accept_log.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| route(req, log.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Upstream { addr, log }
}

/// A raw TCP echo server (stands in for ssh and other non-HTTP protocols).
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

struct Setup {
    env: Env,
    upstream: Upstream,
    plain: Upstream,
    proxy: Proxy,
    client: ClientHandle,
    sink: Arc<MemorySink>,
}

impl Setup {
    fn url(&self) -> String {
        self.client
            .proxy_url(self.proxy.local_addr())
            .expose()
            .clone()
    }
    fn ca(&self) -> &Path {
        self.proxy.ca_cert_path()
    }
    /// What the HTTPS upstream saw.
    fn seen(&self) -> Vec<Seen> {
        self.upstream.log.lock().unwrap().clone()
    }
    /// What the plain HTTP upstream saw.
    fn seen_plain(&self) -> Vec<Seen> {
        self.plain.log.lock().unwrap().clone()
    }
}

fn github_credential() -> Credential {
    Credential::new(
        "api.github.com",
        "authorization",
        &format!("Bearer {TOKEN}"),
    )
    .unwrap()
    .with_grant("github")
}

async fn setup_with(
    trust_upstream: bool,
    policy: PolicyMode,
    allow: &[&str],
    limits: Limits,
) -> Setup {
    let env = env();
    let upstream = https_upstream(env.tls.clone()).await;
    let plain = http_upstream().await;
    // Every name a test uses maps to a local server: no test may cause a
    // DNS lookup or any traffic off this machine.
    let mut builder = ProxyBuilder::new()
        .home(env.dir.path().join("home"))
        .limits(limits)
        .resolve("api.github.com", 443, upstream.addr)
        .resolve("github.com", 443, upstream.addr)
        .resolve("other.test", 443, upstream.addr)
        .resolve("other.test", 80, plain.addr)
        // Refused in strict mode; mapped here so that a leak would reach a
        // local server (and show in `seen`), never the network.
        .resolve("blocked.example.com", 443, upstream.addr)
        .resolve("blocked.example.com", 80, plain.addr);
    if trust_upstream {
        builder = builder.upstream_ca_file(&env.upstream_ca).unwrap();
    }
    let proxy = builder.start().await.unwrap();
    let sink = Arc::new(MemorySink::default());
    let client = proxy
        .register(ClientSpec {
            name: "run_test".into(),
            credentials: vec![github_credential()],
            policy,
            allow: allow
                .iter()
                .map(|a| HostPattern::parse(a).unwrap())
                .collect(),
            trace: Some(sink.clone()),
            audit: Some(sink.clone()),
            capture_bodies: 0,
            phases: Vec::new(),
            rules: Vec::new(),
        })
        .unwrap();
    Setup {
        env,
        upstream,
        plain,
        proxy,
        client,
        sink,
    }
}

async fn setup() -> Setup {
    setup_with(true, PolicyMode::Permissive, &[], Limits::default()).await
}

/// The `Proxy-Authorization` value of a proxy URL's token.
fn proxy_authorization(url: &str) -> String {
    use base64::Engine;
    let token = url
        .trim_start_matches("http://moat:")
        .split('@')
        .next()
        .unwrap();
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("moat:{token}"))
    )
}

/// Runs curl through the proxy; returns (http code, body, stderr).
async fn curl(proxy_url: &str, ca: &Path, args: &[&str]) -> (u16, String, String) {
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "20", "--proxy", proxy_url, "--cacert"])
        .arg(ca)
        .args(["-w", "\n%{http_code} %{http_version}"])
        .args(args)
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy");
    let out = cmd
        .output()
        .await
        .expect("curl must be installed to run these tests");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    let code = tail.split(' ').next().unwrap_or("0").parse().unwrap_or(0);
    (
        code,
        body.to_string(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Opens a CONNECT tunnel by hand; returns the stream and the response head.
async fn connect(proxy: SocketAddr, url: &str, target: &str) -> (TcpStream, String) {
    use base64::Engine;
    let token = url
        .trim_start_matches("http://moat:")
        .split('@')
        .next()
        .unwrap()
        .to_string();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("moat:{token}"));
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    let req = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {auth}\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if tcp.read(&mut byte).await.unwrap() == 0 {
            break;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    (tcp, head)
}

/// TLS over a tunnel, trusting the moat CA, with the given SNI and ALPN.
async fn tls_over(
    tcp: TcpStream,
    ca: &Path,
    sni: &str,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await
}

/// An HTTP/1.1 client on a hand-made tunnel, so tests can set any Host.
async fn h1_over_tunnel(
    s: &Setup,
    target: &str,
    sni: &str,
) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let (tcp, head) = connect(s.proxy.local_addr(), &s.url(), target).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let tls = tls_over(tcp, s.ca(), sni, &[b"http/1.1"]).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// Waits until a keep-alive connection can take the next request.
async fn ready(send: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>) {
    send.ready().await.expect("connection closed");
}

fn get(uri: &str, host: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .uri(uri)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

async fn body_text(resp: Response<Incoming>) -> String {
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn no_secret_anywhere(sink: &MemorySink) {
    let records = serde_json::to_string(&sink.records()).unwrap();
    let events = serde_json::to_string(&sink.events()).unwrap();
    assert!(!records.contains(TOKEN), "token in trace: {records}");
    assert!(!events.contains(TOKEN), "token in audit: {events}");
}

// ---------------------------------------------------------------- injection

#[tokio::test(flavor = "multi_thread")]
async fn curl_gets_the_credential_injected_replacing_a_placeholder() {
    let s = setup().await;
    let (code, body, err) = curl(
        &s.url(),
        s.ca(),
        &[
            "-H",
            "Authorization: Bearer ghp_placeholder",
            "https://api.github.com/user",
        ],
    )
    .await;
    assert_eq!(code, 200, "{err}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        json["authorization"],
        serde_json::json!([format!("Bearer {TOKEN}")])
    );
    let seen = s.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].authorization, vec![format!("Bearer {TOKEN}")]);
    let records = s.sink.records();
    let rec = records
        .iter()
        .find(|r| r.url == "https://api.github.com/user")
        .unwrap();
    assert_eq!(rec.grant.as_deref(), Some("github"));
    assert_eq!(rec.status, Some(200));
    assert!(rec
        .request_headers
        .iter()
        .any(|(k, v)| k == "authorization" && v == "[redacted]"));
    assert!(s.sink.events().iter().any(|e| matches!(e,
        AuditEvent::CredentialInjected { grant, host, .. } if grant == "github" && host == "api.github.com")));
    no_secret_anywhere(&s.sink);
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_client_headers_are_replaced_by_one() {
    let s = setup().await;
    let mut send = h1_over_tunnel(&s, "api.github.com:443", "api.github.com").await;
    let mut req = get("/dup", "api.github.com");
    req.headers_mut()
        .append("authorization", "Bearer one".parse().unwrap());
    req.headers_mut()
        .append("authorization", "Bearer two".parse().unwrap());
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(s.seen()[0].authorization, vec![format!("Bearer {TOKEN}")]);
}

#[tokio::test(flavor = "multi_thread")]
async fn hosts_without_a_credential_get_none() {
    let s = setup().await;
    let (code, body, err) = curl(&s.url(), s.ca(), &["https://other.test/x"]).await;
    assert_eq!(code, 200, "{err}");
    assert!(!body.contains(TOKEN));
    assert!(s.seen()[0].authorization.is_empty());
}

// ------------------------------------------------------------ authentication

#[tokio::test(flavor = "multi_thread")]
async fn missing_or_wrong_token_gets_407() {
    let s = setup().await;
    let addr = s.proxy.local_addr();
    let (code, _, _) = curl(&format!("http://{addr}"), s.ca(), &["http://other.test/"]).await;
    assert_eq!(code, 407);
    let wrong = format!("http://moat:{}@{addr}", "0".repeat(64));
    let (code, _, _) = curl(&wrong, s.ca(), &["http://other.test/"]).await;
    assert_eq!(code, 407);
    let (_, head) = connect(addr, &wrong, "api.github.com:443").await;
    assert!(head.starts_with("HTTP/1.1 407"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("proxy-authenticate: basic realm=\"moat\""),
        "{head}"
    );
    assert!(s.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn one_clients_token_cannot_use_anothers_credentials() {
    let s = setup().await;
    let other = s.proxy.register(ClientSpec::new("run_other")).unwrap();
    let url = other.proxy_url(s.proxy.local_addr()).expose().clone();
    let (code, body, err) = curl(&url, s.ca(), &["https://api.github.com/user"]).await;
    assert_eq!(code, 200, "{err}");
    assert!(!body.contains(TOKEN));
    assert!(s.seen()[0].authorization.is_empty());
    // Unregistered tokens stop working at once.
    s.proxy.unregister(&other);
    let (code, _, _) = curl(&url, s.ca(), &["https://api.github.com/user"]).await;
    assert_ne!(code, 200);
}

// ---------------------------------------------------------- identity binding

#[tokio::test(flavor = "multi_thread")]
async fn sni_differing_from_connect_is_refused() {
    let s = setup().await;
    let (tcp, head) = connect(s.proxy.local_addr(), &s.url(), "api.github.com:443").await;
    assert!(head.starts_with("HTTP/1.1 200"));
    let result = tls_over(tcp, s.ca(), "other.test", &[b"http/1.1"]).await;
    assert!(result.is_err(), "the handshake must fail");
    // curl's --connect-to makes the same attack: CONNECT one host, SNI another.
    let (code, _, _) = curl(
        &s.url(),
        s.ca(),
        &[
            "--connect-to",
            "other.test:443:api.github.com:443",
            "https://other.test/",
        ],
    )
    .await;
    assert_ne!(code, 200);
    assert!(s.seen().is_empty(), "{:?}", s.seen());
    assert!(s.sink.records().iter().any(|r| r
        .denied
        .as_deref()
        .is_some_and(|d| d.contains("tls server name"))
        && r.fault == Some(Fault::Client)));
}

#[tokio::test(flavor = "multi_thread")]
async fn host_differing_from_connect_is_refused_on_first_and_later_requests() {
    let s = setup().await;
    // First request.
    let (code, body, _) = curl(
        &s.url(),
        s.ca(),
        &["-H", "Host: other.test", "https://api.github.com/first"],
    )
    .await;
    assert_eq!(code, 421, "{body}");
    assert!(s.seen().is_empty());
    // A later request on a keep-alive connection.
    let mut send = h1_over_tunnel(&s, "api.github.com:443", "api.github.com").await;
    let ok = send
        .send_request(get("/one", "api.github.com"))
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    body_text(ok).await;
    ready(&mut send).await;
    let bad = send.send_request(get("/two", "other.test")).await.unwrap();
    assert_eq!(bad.status(), 421);
    assert_eq!(record_for(&s, "/two").await.fault, Some(Fault::Client));
    assert_eq!(record_for(&s, "/one").await.fault, None);
    let seen = s.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].path, "/one");
}

#[tokio::test(flavor = "multi_thread")]
async fn absolute_form_to_another_host_inside_a_tunnel_is_refused() {
    let s = setup().await;
    let mut send = h1_over_tunnel(&s, "api.github.com:443", "api.github.com").await;
    let resp = send
        .send_request(get("https://other.test/steal", "api.github.com"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 421);
    body_text(resp).await;
    ready(&mut send).await;
    let port = send
        .send_request(get("/p", "api.github.com:8443"))
        .await
        .unwrap();
    assert_eq!(port.status(), 421, "a different port is a different host");
    assert!(s.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn redirects_are_not_followed_and_a_followed_one_gets_no_credential() {
    let s = setup().await;
    let (code, _, _) = curl(&s.url(), s.ca(), &["https://api.github.com/redirect"]).await;
    assert_eq!(code, 302, "the proxy returns the redirect as is");
    assert_eq!(s.seen().len(), 1);
    let (code, body, err) =
        curl(&s.url(), s.ca(), &["-L", "https://api.github.com/redirect"]).await;
    assert_eq!(code, 200, "{err}");
    assert!(body.contains("after-redirect"));
    let seen = s.seen();
    let followed = seen.iter().find(|r| r.path == "/after-redirect").unwrap();
    assert!(followed.host.starts_with("other.test"));
    assert!(followed.authorization.is_empty(), "{followed:?}");
}

// ------------------------------------------------------------------ upstream

#[tokio::test(flavor = "multi_thread")]
async fn an_untrusted_upstream_certificate_gets_502_and_no_credential() {
    let s = setup_with(false, PolicyMode::Permissive, &[], Limits::default()).await;
    let (code, body, _) = curl(&s.url(), s.ca(), &["https://api.github.com/user"]).await;
    assert_eq!(code, 502);
    assert!(
        body.contains("tls with \"api.github.com\" failed"),
        "{body}"
    );
    assert!(
        s.seen().is_empty(),
        "nothing may reach an unverified upstream"
    );
    no_secret_anywhere(&s.sink);
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_end_to_end() {
    let s = setup().await;
    let (tcp, _) = connect(s.proxy.local_addr(), &s.url(), "api.github.com:443").await;
    let tls = tls_over(tcp, s.ca(), "api.github.com", &[b"h2"])
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .uri("https://api.github.com/h2")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), hyper::Version::HTTP_2);
    let seen = s.seen();
    assert_eq!(seen[0].authorization, vec![format!("Bearer {TOKEN}")]);
    assert_eq!(
        seen[0].version, "HTTP/2.0",
        "the upstream leg negotiated h2 too"
    );
    // An :authority naming another host is refused like a Host header.
    let req = Request::builder()
        .uri("https://other.test/h2")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send.send_request(req).await.unwrap().status(), 421);
}

#[tokio::test(flavor = "multi_thread")]
async fn websockets_pass_through_with_the_credential_on_the_upgrade() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let s = setup().await;
    let (tcp, head) = connect(s.proxy.local_addr(), &s.url(), "api.github.com:443").await;
    assert!(head.starts_with("HTTP/1.1 200"));
    let tls = tls_over(tcp, s.ca(), "api.github.com", &[b"http/1.1"])
        .await
        .unwrap();
    let handshake = tokio_tungstenite::client_async("wss://api.github.com/ws", tls).await;
    let (mut ws, resp) = match handshake {
        Ok(pair) => pair,
        Err(e) => panic!(
            "handshake: {e}; trace: {:?}; seen: {:?}",
            s.sink.records(),
            s.seen()
        ),
    };
    assert_eq!(resp.status(), 101);
    for text in ["hello", "again"] {
        ws.send(Message::text(text)).await.unwrap();
        let echo = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echo.into_text().unwrap().as_str(), text);
    }
    ws.close(None).await.unwrap();
    let seen = s.seen();
    assert_eq!(seen[0].path, "/ws");
    assert_eq!(seen[0].authorization, vec![format!("Bearer {TOKEN}")]);
    // The trace record is written when the socket closes (within 10 s).
    for _ in 0..500 {
        if s.sink.records().iter().any(|r| r.status == Some(101)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let records = s.sink.records();
    let rec = records
        .iter()
        .find(|r| r.status == Some(101))
        .expect("a 101 record");
    assert_eq!(rec.grant.as_deref(), Some("github"));
    assert!(rec.request_bytes > 0 && rec.response_bytes > 0, "{rec:?}");
    no_secret_anywhere(&s.sink);
}

#[tokio::test(flavor = "multi_thread")]
async fn text_bodies_are_captured_up_to_the_bound_only_when_asked() {
    let s = setup().await;
    let (code, _, _) = curl(
        &s.url(),
        s.ca(),
        &[
            "-H",
            "content-type: application/json",
            "-d",
            "{\"q\":1}",
            "https://other.test/off",
        ],
    )
    .await;
    assert_eq!(code, 200);
    let rec = s
        .sink
        .records()
        .into_iter()
        .find(|r| r.url.ends_with("/off"))
        .unwrap();
    assert_eq!(
        (rec.request_body, rec.response_body),
        (None, None),
        "off by default"
    );

    let sink = Arc::new(MemorySink::default());
    let client = s
        .proxy
        .register(ClientSpec {
            trace: Some(sink.clone()),
            capture_bodies: 8,
            ..ClientSpec::new("run_capture")
        })
        .unwrap();
    let url = client.proxy_url(s.proxy.local_addr()).expose().clone();
    let (code, body, err) = curl(
        &url,
        s.ca(),
        &[
            "-H",
            "content-type: application/json",
            "-d",
            "{\"question\":42}",
            "https://other.test/on",
        ],
    )
    .await;
    assert_eq!(code, 200, "{err} {body}");
    let (code, _, _) = curl(
        &url,
        s.ca(),
        &[
            "-H",
            "content-type: application/octet-stream",
            "--data-binary",
            "BINARYDATA",
            "https://other.test/bin",
        ],
    )
    .await;
    assert_eq!(code, 200);
    let records = sink.records();
    let on = records.iter().find(|r| r.url.ends_with("/on")).unwrap();
    assert_eq!(
        on.request_body.as_deref(),
        Some("{\"questi"),
        "bounded to 8 bytes"
    );
    assert_eq!(on.request_bytes, 15, "the whole body was still forwarded");
    assert!(
        on.response_body.is_none(),
        "the upstream's reply has no content type"
    );
    let bin = records.iter().find(|r| r.url.ends_with("/bin")).unwrap();
    assert!(
        bin.request_body.is_none(),
        "binary bodies are never captured"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn request_bodies_reach_the_upstream_on_new_and_pooled_connections() {
    let s = setup().await;
    for i in 0..3 {
        let data = format!("{{\"n\":{i}}}");
        let (code, body, err) = curl(
            &s.url(),
            s.ca(),
            &[
                "-H",
                "content-type: application/json",
                "-d",
                &data,
                &format!("https://other.test/p{i}"),
            ],
        )
        .await;
        assert_eq!(code, 200, "#{i}: {err} {body}");
    }
    let seen = s.seen();
    for i in 0..3 {
        let r = seen.iter().find(|r| r.path == format!("/p{i}")).unwrap();
        assert_eq!(r.body, format!("{{\"n\":{i}}}").into_bytes());
    }
    let records = s.sink.records();
    assert!(records
        .iter()
        .filter(|r| r.method == "POST")
        .all(|r| r.request_bytes == 7));
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_http2() {
    let s = setup().await;
    let (code, _, err) = curl(
        &s.url(),
        s.ca(),
        &["--http2", "https://api.github.com/curl-h2"],
    )
    .await;
    assert_eq!(code, 200, "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn server_sent_events_arrive_event_by_event() {
    let s = setup().await;
    let mut send = h1_over_tunnel(&s, "api.github.com:443", "api.github.com").await;
    let started = Instant::now();
    let resp = send
        .send_request(get("/sse", "api.github.com"))
        .await
        .unwrap();
    let mut body = resp.into_body();
    let first = loop {
        let frame = body.frame().await.unwrap().unwrap();
        if let Ok(data) = frame.into_data() {
            break data;
        }
    };
    let first_at = started.elapsed();
    assert_eq!(&first[..], b"data: one\n\n");
    // The upstream sends the second event SSE_GAP (5 s) after the first:
    // a first event held back until then would come later than this.
    assert!(
        first_at < Duration::from_secs(4),
        "first event took {first_at:?}: buffered?"
    );
    let second = loop {
        let frame = body.frame().await.unwrap().unwrap();
        if let Ok(data) = frame.into_data() {
            break data;
        }
    };
    let second_at = started.elapsed();
    assert_eq!(&second[..], b"data: two\n\n");
    // Not delivered together: the first came well before the second.
    assert!(
        second_at - first_at >= Duration::from_secs(1),
        "first event at {first_at:?}, second at {second_at:?}: buffered?"
    );
}

// ------------------------------------------------------------- destinations

#[tokio::test(flavor = "multi_thread")]
async fn loopback_private_and_metadata_destinations_are_refused_in_every_spelling() {
    let s = setup().await;
    let port = s.upstream.addr.port();
    for host in [
        "127.0.0.1".to_string(),
        "2130706433".to_string(),
        "0x7f.1".to_string(),
        "0177.0.0.1".to_string(),
        "127.0.0.1.".to_string(),
        "[::1]".to_string(),
        "[::ffff:127.0.0.1]".to_string(),
        "169.254.169.254".to_string(),
        "[fd00:ec2::254]".to_string(),
        "10.0.0.1".to_string(),
        "localhost".to_string(),
    ] {
        let target = format!("{host}:{port}");
        // The CONNECT is answered (the refusal is told inside TLS, where the
        // client reads it); names are refused when dialled, literals at once.
        let (_, head) = connect(s.proxy.local_addr(), &s.url(), &target).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{host}: {head}");
        if host == "localhost" {
            continue;
        }
        let (code, body, _) = curl(&s.url(), s.ca(), &[&format!("http://{target}/")]).await;
        assert_eq!(code, 403, "{host}: {body}");
        if [
            "127.0.0.1",
            "[::1]",
            "169.254.169.254",
            "10.0.0.1",
            "[fd00:ec2::254]",
        ]
        .contains(&host.as_str())
        {
            let (code, body, err) = curl(&s.url(), s.ca(), &[&format!("https://{target}/")]).await;
            assert_eq!(code, 403, "{host}: {body} {err}");
            assert!(body.starts_with("Moat: destination"), "{host}: {body}");
        }
    }
    // IPv6 literals are written in brackets in the trace.
    let urls: Vec<String> = s.sink.records().into_iter().map(|r| r.url).collect();
    assert!(
        urls.iter().any(|u| u == &format!("https://[::1]:{port}/")),
        "{urls:?}"
    );
    // A name that resolves to loopback is refused at dial time.
    let (code, body, _) = curl(&s.url(), s.ca(), &[&format!("http://localhost:{port}/")]).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("loopback"), "{body}");
    assert!(s.seen().is_empty(), "{:?}", s.seen());
}

// ------------------------------------------------------------------- policy

#[tokio::test(flavor = "multi_thread")]
async fn strict_mode_blocks_with_the_seeds_message_and_allows_grants_and_the_list() {
    let s = setup_with(true, PolicyMode::Strict, &["other.test"], Limits::default()).await;
    let (code, _, err) = curl(&s.url(), s.ca(), &["https://api.github.com/granted"]).await;
    assert_eq!(code, 200, "grant hosts are allowed: {err}");
    let (code, _, err) = curl(&s.url(), s.ca(), &["https://other.test/listed"]).await;
    assert_eq!(code, 200, "{err}");
    let seeds = "Moat: request blocked by network policy.\nHost \"blocked.example.com\" is not in the allow list.\nAdd it to network.allow in agent.yaml or use policy: permissive.\n";
    let (code, body, _) = curl(&s.url(), s.ca(), &["http://blocked.example.com/"]).await;
    assert_eq!(code, 403);
    assert_eq!(body, seeds);
    // HTTPS clients read the same message: the proxy completes TLS with its
    // own leaf and answers inside, instead of refusing the CONNECT (which
    // curl would only show as "CONNECT tunnel failed, response 403").
    for args in [
        vec!["https://blocked.example.com/x?y=1"],
        vec!["--http2", "https://blocked.example.com/h2"],
        vec![
            "-X",
            "POST",
            "-d",
            "data",
            "https://blocked.example.com/post",
        ],
    ] {
        let (code, body, err) = curl(&s.url(), s.ca(), &args).await;
        assert_eq!(code, 403, "{args:?}: {err}");
        assert_eq!(body, seeds, "{args:?}");
    }
    // A client that does not trust the moat CA sees a TLS error, and the
    // refusal is still recorded once.
    let other_ca = s.env.dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, "").unwrap();
    let (code, _, _) = curl(
        &s.url(),
        &other_ca,
        &["https://blocked.example.com/untrusted"],
    )
    .await;
    assert_eq!(code, 0);
    let untrusted = record_where(&s.sink, |r| {
        r.method == "CONNECT" && r.host == "blocked.example.com"
    })
    .await;
    assert!(
        untrusted
            .error
            .as_deref()
            .is_some_and(|e| e.contains("did not trust")),
        "{untrusted:?}"
    );
    let records = s.sink.records();
    let blocked: Vec<_> = records
        .iter()
        .filter(|r| r.host == "blocked.example.com")
        .collect();
    assert!(
        blocked
            .iter()
            .any(|r| r.url == "https://blocked.example.com/x?y=1" && r.status == Some(403)),
        "{blocked:?}"
    );
    assert!(
        blocked
            .iter()
            .any(|r| r.method == "POST" && r.denied.as_deref() == Some("network policy")),
        "{blocked:?}"
    );
    assert!(blocked.iter().all(|r| r.denied.is_some()), "{blocked:?}");
    assert!(
        blocked.iter().all(|r| r.fault == Some(Fault::Policy)),
        "{blocked:?}"
    );
    assert!(
        records
            .iter()
            .filter(|r| r.host != "blocked.example.com")
            .all(|r| r.fault.is_none()),
        "{records:?}"
    );
    let leaked: Vec<Seen> = s
        .seen()
        .into_iter()
        .chain(s.seen_plain())
        .filter(|r| r.host.contains("blocked"))
        .collect();
    assert!(leaked.is_empty(), "nothing reached an upstream: {leaked:?}");
    let events = s.sink.events();
    assert!(events.iter().any(|e| matches!(e,
        AuditEvent::PolicyDecision { allowed: false, host, .. } if host == "blocked.example.com")));
    // Allowed tunnels are audited with the rule that allowed them.
    assert!(
        events.iter().any(|e| matches!(e,
        AuditEvent::PolicyDecision { allowed: true, host, rule, .. }
            if host == "api.github.com" && rule == "grant:github")),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| matches!(e,
        AuditEvent::PolicyDecision { allowed: true, host, rule, .. }
            if host == "other.test" && rule == "allow:other.test")),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_tunnels_in_permissive_mode_and_only_listed_ports_in_strict() {
    let echo = echo_server().await;
    for (policy, allow, expect_echo) in [
        (PolicyMode::Permissive, vec![], true),
        (PolicyMode::Strict, vec!["ssh.test"], false),
        (PolicyMode::Strict, vec!["ssh.test:22"], true),
    ] {
        let env = env();
        let proxy = ProxyBuilder::new()
            .home(env.dir.path().join("home"))
            .resolve("ssh.test", 22, echo)
            .start()
            .await
            .unwrap();
        let client = proxy
            .register(ClientSpec {
                policy,
                allow: allow
                    .iter()
                    .map(|a| HostPattern::parse(a).unwrap())
                    .collect(),
                ..ClientSpec::new("run_raw")
            })
            .unwrap();
        let url = client.proxy_url(proxy.local_addr()).expose().clone();
        let (mut tcp, head) = connect(proxy.local_addr(), &url, "ssh.test:22").await;
        if head.starts_with("HTTP/1.1 403") {
            assert!(!expect_echo, "{policy:?} {allow:?}: {head}");
            continue;
        }
        tcp.write_all(b"SSH-2.0-test\r\n").await.unwrap();
        let mut buf = [0u8; 14];
        let got = tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut buf)).await;
        assert_eq!(
            matches!(got, Ok(Ok(_))) && &buf == b"SSH-2.0-test\r\n",
            expect_echo,
            "{policy:?} {allow:?}"
        );
    }
}

// ------------------------------------------------------------------- limits

/// Content-Length with Transfer-Encoding: hyper lets Transfer-Encoding win,
/// drops Content-Length and closes the connection after the response (RFC
/// 9112 section 6.3), so the bytes after the chunked body are never read as a
/// second request, neither by the proxy nor by any upstream.
#[tokio::test(flavor = "multi_thread")]
async fn content_length_with_transfer_encoding_cannot_smuggle_a_request() {
    use base64::Engine;
    let s = setup().await;
    let token = s
        .url()
        .trim_start_matches("http://moat:")
        .split('@')
        .next()
        .unwrap()
        .to_string();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("moat:{token}"));
    let smuggle = |target: &str, host: &str, auth: &str| {
        format!(
            "POST {target} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n"
        )
    };
    // To the proxy itself, absolute-form.
    let mut tcp = TcpStream::connect(s.proxy.local_addr()).await.unwrap();
    let proxy_auth = format!("Proxy-Authorization: Basic {auth}\r\n");
    tcp.write_all(smuggle("http://other.test/first", "other.test", &proxy_auth).as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out)).await;
    assert!(
        closed.is_ok(),
        "the connection must be closed after the response"
    );
    let text = String::from_utf8_lossy(&out);
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
    // Inside an intercepted tunnel.
    let (tcp, head) = connect(s.proxy.local_addr(), &s.url(), "api.github.com:443").await;
    assert!(head.starts_with("HTTP/1.1 200"));
    let mut tls = tls_over(tcp, s.ca(), "api.github.com", &[b"http/1.1"])
        .await
        .unwrap();
    tls.write_all(smuggle("/first", "api.github.com", "").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
    let paths: Vec<String> = s
        .seen()
        .into_iter()
        .chain(s.seen_plain())
        .map(|r| r.path)
        .collect();
    assert!(paths.iter().any(|p| p == "/first"), "{paths:?}");
    assert!(!paths.iter().any(|p| p == "/smuggled"), "{paths:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn huge_headers_get_431() {
    let s = setup().await;
    let big = "x".repeat(100 * 1024);
    let (code, _, _) = curl(
        &s.url(),
        s.ca(),
        &["-H", &format!("X-Big: {big}"), "http://other.test/"],
    )
    .await;
    assert_eq!(code, 431);
    let (code, _, _) = curl(
        &s.url(),
        s.ca(),
        &[
            "--http1.1",
            "-H",
            &format!("X-Big: {big}"),
            "https://api.github.com/",
        ],
    )
    .await;
    assert_eq!(code, 431, "inside a tunnel too");
    // HTTP/2 refuses an oversized header list at the protocol level.
    let (code, _, _) = curl(
        &s.url(),
        s.ca(),
        &[
            "--http2",
            "-H",
            &format!("X-Big: {big}"),
            "https://api.github.com/",
        ],
    )
    .await;
    assert_ne!(code, 200);
    assert!(s.seen_plain().is_empty() && s.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_client_does_not_hold_a_connection_forever() {
    let limits = Limits {
        header_timeout: Duration::from_millis(500),
        handshake_timeout: Duration::from_millis(500),
        ..Limits::default()
    };
    let s = setup_with(true, PolicyMode::Permissive, &[], limits).await;
    // Half a request head, then silence.
    let mut tcp = TcpStream::connect(s.proxy.local_addr()).await.unwrap();
    tcp.write_all(b"GET http://other.test/ HTTP/1.1\r\nHost: oth")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(
        closed.is_ok(),
        "the proxy kept a slow client's connection open"
    );
    // A tunnel whose client never starts TLS is closed too.
    let (mut tcp, head) = connect(s.proxy.local_addr(), &s.url(), "api.github.com:443").await;
    assert!(head.starts_with("HTTP/1.1 200"));
    let closed = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "a silent tunnel was kept open");
}

/// Plain HTTP on one keep-alive connection: every request is judged and
/// recorded, an allowance is audited once per destination (as a tunnel's
/// is), and every refusal is audited.
#[tokio::test(flavor = "multi_thread")]
async fn plain_http_allowances_are_audited_once_per_connection_and_destination() {
    let s = setup_with(true, PolicyMode::Strict, &["other.test"], Limits::default()).await;
    let auth = proxy_authorization(&s.url());
    let tcp = TcpStream::connect(s.proxy.local_addr()).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let targets = [
        ("http://other.test/a", "other.test", 200),
        ("http://other.test/b", "other.test", 200),
        ("http://blocked.example.com/x", "blocked.example.com", 403),
        ("http://other.test/c", "other.test", 200),
        ("http://blocked.example.com/y", "blocked.example.com", 403),
        ("http://other.test/d", "other.test", 200),
    ];
    for (target, host, want) in targets {
        ready(&mut send).await;
        let mut req = get(target, host);
        req.headers_mut()
            .insert("proxy-authorization", auth.parse().unwrap());
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status().as_u16(), want, "{target}");
        body_text(resp).await;
    }
    let events = s.sink.events();
    let decisions = |allowed: bool, name: &str| {
        events
            .iter()
            .filter(|e| {
                matches!(e, AuditEvent::PolicyDecision { allowed: a, host, .. }
                if *a == allowed && host == name)
            })
            .count()
    };
    // Four requests to other.test, with refusals between them: one
    // allowance; each refusal on its own.
    assert_eq!(decisions(false, "blocked.example.com"), 2, "{events:?}");
    assert_eq!(decisions(true, "other.test"), 1, "{events:?}");
    let requests = s
        .sink
        .records()
        .into_iter()
        .filter(|r| r.host == "other.test")
        .count();
    assert_eq!(requests, 4, "every request is recorded");
    assert_eq!(s.seen_plain().len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_http_never_carries_a_credential() {
    let env = env();
    let plain = http_upstream().await;
    let proxy = ProxyBuilder::new()
        .home(env.dir.path().join("home"))
        .resolve("api.github.com", 80, plain.addr)
        .resolve("api.github.com", 8080, plain.addr)
        .start()
        .await
        .unwrap();
    let creds = vec![
        github_credential(),
        Credential::new(
            "api.github.com:8080",
            "authorization",
            &format!("Bearer {TOKEN}"),
        )
        .unwrap(),
    ];
    let client = proxy
        .register(ClientSpec {
            credentials: creds,
            ..ClientSpec::new("run_plain")
        })
        .unwrap();
    let url = client.proxy_url(proxy.local_addr()).expose().clone();
    for target in [
        "http://api.github.com/user",
        "http://api.github.com:8080/user",
    ] {
        let (code, body, err) = curl(&url, proxy.ca_cert_path(), &[target]).await;
        assert_eq!(code, 200, "{err}");
        assert!(!body.contains(TOKEN), "{target}: {body}");
    }
    assert!(plain
        .log
        .lock()
        .unwrap()
        .iter()
        .all(|r| r.authorization.is_empty()));
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_first_connections_to_a_host_mint_one_certificate() {
    let s = setup().await;
    let before = s.proxy.ca().mint_count();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let url = s.url();
        let ca = s.ca().to_path_buf();
        let addr = s.proxy.local_addr();
        tasks.push(tokio::spawn(async move {
            let (tcp, _) = connect(addr, &url, "other.test:443").await;
            tls_over(tcp, &ca, "other.test", &[b"http/1.1"])
                .await
                .is_ok()
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap());
    }
    assert_eq!(s.proxy.ca().mint_count() - before, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_resume_tls_sessions_with_the_proxy() {
    let s = setup().await;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(s.ca()).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    // One client config (and so one session cache) for both connections.
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let (tcp, _) = connect(s.proxy.local_addr(), &s.url(), "api.github.com:443").await;
        let mut tls = tokio_rustls::TlsConnector::from(config.clone())
            .connect(ServerName::try_from("api.github.com").unwrap(), tcp)
            .await
            .unwrap();
        // Read the session ticket that follows the handshake in TLS 1.3.
        tls.write_all(b"GET /r HTTP/1.1\r\nHost: api.github.com\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
        kinds.push(tls.get_ref().1.handshake_kind());
    }
    assert_eq!(kinds[1], Some(rustls::HandshakeKind::Resumed), "{kinds:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_stops_serving() {
    let s = setup().await;
    let addr = s.proxy.local_addr();
    s.proxy.shutdown().await;
    let refused = TcpStream::connect(addr).await;
    assert!(refused.is_err(), "still listening after shutdown");
    drop(s.env);
}

/// Invariant 3: the proxy never listens on all interfaces by default.
#[tokio::test(flavor = "multi_thread")]
async fn the_default_listen_address_is_loopback() {
    let home = tempfile::tempdir().unwrap();
    let proxy = ProxyBuilder::new().home(home.path()).start().await.unwrap();
    assert!(
        proxy.local_addr().ip().is_loopback(),
        "{}",
        proxy.local_addr()
    );
    assert_ne!(proxy.local_addr().port(), 0);
}

#[test]
fn curl_is_installed() {
    let out = Command::new("curl").arg("--version").output();
    assert!(
        out.is_ok(),
        "curl is required by the proxy tests: apt-get install curl"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_connection_cap_closes_extra_connections_at_once() {
    let limits = Limits {
        max_connections: 2,
        ..Limits::default()
    };
    let s = setup_with(true, PolicyMode::Permissive, &[], limits).await;
    let _a = TcpStream::connect(s.proxy.local_addr()).await.unwrap();
    let _b = TcpStream::connect(s.proxy.local_addr()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut c = TcpStream::connect(s.proxy.local_addr()).await.unwrap();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the third connection must be closed: {read:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn timeouts_never_cut_an_established_stream() {
    let limits = Limits {
        header_timeout: Duration::from_secs(1),
        handshake_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let s = setup_with(true, PolicyMode::Permissive, &[], limits).await;
    let mut send = h1_over_tunnel(&s, "api.github.com:443", "api.github.com").await;
    // The SSE stream idles SSE_GAP (5 s) between events, five times the
    // timeouts.
    let resp = send
        .send_request(get("/sse", "api.github.com"))
        .await
        .unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"data: one\n\ndata: two\n\n");
}

// ------------------------------------------------------- every request leaves a record

/// Waits (up to 15 s) for a trace record whose URL ends with `path`.
async fn record_for(s: &Setup, path: &str) -> moat_core::trace::TraceRecord {
    record_where(&s.sink, |r| r.url.ends_with(path)).await
}

/// Waits (up to 15 s) for a trace record that `want` accepts. A client can
/// exit before the proxy has finished with its connection (a TLS handshake
/// the client abandoned is recorded when the proxy sees it fail), so a test
/// that reads the trace right after the client returns must wait for it.
async fn record_where(
    sink: &MemorySink,
    want: impl Fn(&moat_core::trace::TraceRecord) -> bool,
) -> moat_core::trace::TraceRecord {
    for _ in 0..300 {
        if let Some(r) = sink.records().into_iter().find(|r| want(r)) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no such trace record: {:?}", sink.records());
}

fn audited_request(s: &Setup, path: &str) -> Option<AuditEvent> {
    s.sink
        .events()
        .into_iter()
        .find(|e| matches!(e, AuditEvent::Request { path: p, .. } if p == path))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_its_client_gives_up_on_is_recorded() {
    let s = setup().await;
    // HTTPS, inside a tunnel: the client waits until the upstream has the
    // request (so the credential has gone out), then closes.
    let mut send = h1_over_tunnel(&s, "api.github.com:443", "api.github.com").await;
    let req = Request::get("/hang")
        .header("host", "api.github.com")
        .body(Full::new(Bytes::new()))
        .unwrap();
    {
        let mut answer = Box::pin(send.send_request(req));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !s.seen().iter().any(|r| r.path == "/hang") {
            assert!(Instant::now() < deadline, "the upstream never got /hang");
            tokio::select! {
                r = &mut answer => panic!("/hang was answered: {r:?}"),
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    }
    drop(send);
    let r = record_for(&s, "/hang").await;
    assert_eq!(r.status, None);
    assert_eq!(r.fault, Some(Fault::Client), "{r:?}");
    assert!(
        r.error.as_deref().unwrap().contains("client closed"),
        "{r:?}"
    );
    assert!(
        audited_request(&s, "/hang").is_some(),
        "{:?}",
        s.sink.events()
    );
    // The credential went out before the client gave up: its use is in the
    // audit log and the record names the grant.
    assert_eq!(r.grant.as_deref(), Some("github"), "{r:?}");
    assert!(
        s.sink
            .events()
            .iter()
            .any(|e| matches!(e, AuditEvent::CredentialInjected { path, .. } if path == "/hang")),
        "{:?}",
        s.sink.events()
    );
    // Plain HTTP too, through curl giving up after three seconds.
    let (code, _, _) = curl(
        &s.url(),
        s.ca(),
        &["--max-time", "3", "http://other.test/hang"],
    )
    .await;
    assert_eq!(code, 0);
    let r = record_for(&s, "other.test/hang").await;
    assert!(
        r.error.as_deref().unwrap().contains("client closed"),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_wait_for_a_response_head_is_bounded() {
    let limits = Limits {
        response_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let s = setup_with(true, PolicyMode::Permissive, &[], limits).await;
    let started = Instant::now();
    let (code, body, _) = curl(&s.url(), s.ca(), &["https://api.github.com/hang"]).await;
    assert_eq!(code, 504, "{body}");
    assert!(body.contains("no response within 1 s"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let r = record_for(&s, "/hang").await;
    assert_eq!(r.status, Some(504));
    assert!(r.error.is_some());
    assert_eq!(r.fault, Some(Fault::Upstream));
    // The credential went out with the request: its injection is audited.
    assert!(s
        .sink
        .events()
        .iter()
        .any(|e| matches!(e, AuditEvent::CredentialInjected { path, .. } if path == "/hang")));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_that_stops_short_is_marked() {
    let s = setup().await;
    let (_, body, err) = curl(&s.url(), s.ca(), &["https://api.github.com/cut"]).await;
    assert!(err.contains("curl"), "curl should fail: {body} {err}");
    let r = record_for(&s, "/cut").await;
    assert_eq!(r.status, Some(200));
    assert!(
        r.error.as_deref().unwrap_or("").contains("stopped short"),
        "{r:?}"
    );
    assert_eq!(r.fault, Some(Fault::Upstream), "{r:?}");
    // The audit log says whose fault it was too.
    assert!(
        matches!(
            audited_request(&s, "/cut"),
            Some(AuditEvent::Request {
                fault: Some(Fault::Upstream),
                ..
            })
        ),
        "{:?}",
        s.sink.events()
    );
    // A complete body is not marked.
    let (code, _, _) = curl(&s.url(), s.ca(), &["https://api.github.com/whole"]).await;
    assert_eq!(code, 200);
    assert_eq!(record_for(&s, "/whole").await.error, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn odd_request_targets_in_a_tunnel_are_refused_before_any_injection() {
    let s = setup().await;
    for (line, what) in [
        ("OPTIONS * HTTP/1.1", "OPTIONS *"),
        ("CONNECT api.github.com:443 HTTP/1.1", "CONNECT"),
    ] {
        let (tcp, head) = connect(s.proxy.local_addr(), &s.url(), "api.github.com:443").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let mut tls = tls_over(tcp, s.ca(), "api.github.com", &[b"http/1.1"])
            .await
            .unwrap();
        tls.write_all(format!("{line}\r\nHost: api.github.com\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut answer = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut answer))
            .await
            .unwrap()
            .unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
        assert!(answer.starts_with("HTTP/1.1 400"), "{what}: {answer}");
        assert!(
            answer.contains("not supported inside a tunnel"),
            "{what}: {answer}"
        );
    }
    assert!(s.seen().is_empty(), "{:?}", s.seen());
    assert!(
        !s.sink
            .events()
            .iter()
            .any(|e| matches!(e, AuditEvent::CredentialInjected { .. })),
        "{:?}",
        s.sink.events()
    );
    assert!(s
        .sink
        .records()
        .iter()
        .all(|r| !r.url.contains("https://api.github.com*")));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_injection_is_audited_only_for_a_request_that_went_out() {
    let env = env();
    // api.github.com maps to a closed port: nothing is ever sent.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let proxy = ProxyBuilder::new()
        .home(env.dir.path().join("home"))
        .resolve("api.github.com", 443, addr)
        .start()
        .await
        .unwrap();
    let sink = Arc::new(MemorySink::default());
    let mut spec = ClientSpec::new("run_test");
    spec.credentials = vec![github_credential()];
    spec.trace = Some(sink.clone());
    spec.audit = Some(sink.clone());
    let client = proxy.register(spec).unwrap();
    let url = client.proxy_url(proxy.local_addr()).expose().clone();
    let (code, _, _) = curl(&url, proxy.ca_cert_path(), &["https://api.github.com/user"]).await;
    assert_eq!(code, 502);
    assert!(
        !sink
            .events()
            .iter()
            .any(|e| matches!(e, AuditEvent::CredentialInjected { .. })),
        "{:?}",
        sink.events()
    );
    assert_eq!(sink.records().len(), 1, "{:?}", sink.records());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_upload_is_not_cut_by_the_response_timeout() {
    let limits = Limits {
        response_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let s = setup_with(true, PolicyMode::Permissive, &[], limits).await;
    let file = s.env.dir.path().join("upload.bin");
    std::fs::write(&file, vec![b'u'; 12 * 1024]).unwrap();
    // About four seconds of upload, four times the timeout, moving all along.
    let (code, body, err) = curl(
        &s.url(),
        s.ca(),
        &[
            "--limit-rate",
            "3k",
            "--data-binary",
            &format!("@{}", file.display()),
            "https://api.github.com/upload",
        ],
    )
    .await;
    assert_eq!(code, 200, "{body} {err}");
    let seen = s.seen();
    let up = seen.iter().find(|r| r.path == "/upload").unwrap();
    assert_eq!(up.body.len(), 12 * 1024);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_websocket_upgrade_waits_at_most_the_response_timeout() {
    let limits = Limits {
        response_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let s = setup_with(true, PolicyMode::Permissive, &[], limits).await;
    let started = Instant::now();
    let (code, body, _) = curl(
        &s.url(),
        s.ca(),
        &[
            "--http1.1",
            "-H",
            "Connection: Upgrade",
            "-H",
            "Upgrade: websocket",
            "-H",
            "Sec-WebSocket-Version: 13",
            "-H",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "https://api.github.com/hang",
        ],
    )
    .await;
    assert_eq!(code, 504, "{body}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread")]
async fn absurd_host_names_are_refused_at_the_connect() {
    let s = setup().await;
    for host in [
        "a".repeat(300),
        format!("{}.test", "b".repeat(70)),
        "a..b".into(),
        "x_y%00".into(),
    ] {
        let (_, head) = connect(s.proxy.local_addr(), &s.url(), &format!("{host}:443")).await;
        assert!(head.starts_with("HTTP/1.1 400"), "{host}: {head}");
    }
    assert_eq!(s.proxy.ca().mint_count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn tunnels_count_against_the_connection_limit() {
    let limits = Limits {
        max_connections: 2,
        ..Limits::default()
    };
    let s = setup_with(true, PolicyMode::Permissive, &[], limits).await;
    let _a = h1_over_tunnel(&s, "api.github.com:443", "api.github.com").await;
    let _b = h1_over_tunnel(&s, "api.github.com:443", "api.github.com").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut c = TcpStream::connect(s.proxy.local_addr()).await.unwrap();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "two open tunnels fill a limit of two: {read:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_records_a_cut_relay_and_no_made_up_requests() {
    let echo = echo_server().await;
    let env = env();
    let proxy = ProxyBuilder::new()
        .home(env.dir.path().join("home"))
        .resolve("ssh.test", 22, echo)
        .start()
        .await
        .unwrap();
    let sink = Arc::new(MemorySink::default());
    let mut spec = ClientSpec::new("run_raw");
    spec.policy = PolicyMode::Strict;
    spec.allow = vec![HostPattern::parse("ssh.test:22").unwrap()];
    spec.trace = Some(sink.clone());
    spec.audit = Some(sink.clone());
    let client = proxy.register(spec).unwrap();
    let url = client.proxy_url(proxy.local_addr()).expose().clone();
    // A raw tunnel that relayed 14 bytes each way, still open.
    let (mut raw, head) = connect(proxy.local_addr(), &url, "ssh.test:22").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    raw.write_all(b"SSH-2.0-test\r\n").await.unwrap();
    let mut buf = [0u8; 14];
    raw.read_exact(&mut buf).await.unwrap();
    // A refused tunnel answered inside TLS, kept open.
    let (tcp, head) = connect(proxy.local_addr(), &url, "refused.test:443").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let tls = tls_over(tcp, proxy.ca_cert_path(), "refused.test", &[b"http/1.1"])
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = send.send_request(get("/x", "refused.test")).await.unwrap();
    assert_eq!(resp.status(), 403);
    // A tunnel that has not said anything yet.
    let (_idle, head) = connect(proxy.local_addr(), &url, "ssh.test:22").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    proxy.shutdown().await;
    let records = sink.records();
    let raw_records: Vec<_> = records.iter().filter(|r| r.host == "ssh.test").collect();
    assert_eq!(raw_records.len(), 1, "{records:?}");
    assert_eq!(
        (raw_records[0].request_bytes, raw_records[0].response_bytes),
        (14, 14)
    );
    assert!(raw_records[0]
        .error
        .as_deref()
        .unwrap()
        .contains("shut down"));
    let refused: Vec<_> = records
        .iter()
        .filter(|r| r.host == "refused.test")
        .collect();
    assert_eq!(
        refused.len(),
        1,
        "one record for the one request: {refused:?}"
    );
    assert_eq!(refused[0].status, Some(403));
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_http_through_a_refused_tunnel_reads_the_message() {
    let s = setup_with(true, PolicyMode::Strict, &["other.test"], Limits::default()).await;
    let (code, body, err) = curl(
        &s.url(),
        s.ca(),
        &["--proxytunnel", "http://blocked.example.com/tunnelled"],
    )
    .await;
    assert_eq!(code, 403, "{err}");
    assert!(
        body.starts_with("Moat: request blocked by network policy."),
        "{body}"
    );
}

// ------------------------------------------------------- phases: extending a client

/// A phase that answers `/hello` on the proxy's own host, and one that puts
/// an API key on requests to `other.test`.
#[derive(Debug)]
struct Hello;

#[async_trait::async_trait]
impl moat_core::proxy::Phase for Hello {
    async fn respond(
        &self,
        request: &moat_core::proxy::phase::RequestHead<'_>,
    ) -> Option<moat_core::proxy::phase::Answer> {
        (request.host == moat_core::proxy::phase::INTERNAL_HOST && request.path == "/hello").then(
            || {
                moat_core::proxy::phase::Answer::text(
                    hyper::StatusCode::OK,
                    format!("hello {}\n", request.client),
                )
            },
        )
    }
}

#[derive(Debug)]
struct ApiKey;

#[async_trait::async_trait]
impl moat_core::proxy::Phase for ApiKey {
    fn injects_for(&self, host: &str, _port: u16) -> bool {
        host == "other.test"
    }
    async fn inject(
        &self,
        host: &str,
        _port: u16,
        headers: &mut hyper::HeaderMap,
    ) -> Result<moat_core::proxy::phase::Injected, moat_core::proxy::phase::Answer> {
        if host != "other.test" {
            return Ok(Default::default());
        }
        headers.insert("authorization", "Key phase-secret".parse().unwrap());
        Ok(vec![moat_core::proxy::phase::Injection {
            grant: "apikey".into(),
            header: hyper::header::AUTHORIZATION,
        }]
        .into())
    }
    fn hosts(&self) -> Vec<(HostPattern, String)> {
        vec![(HostPattern::parse("other.test").unwrap(), "apikey".into())]
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clients_phases_answer_its_internal_requests_and_inject_its_credentials() {
    let s = setup().await;
    let sink = Arc::new(MemorySink::default());
    // Strict, with nothing listed: only the phases' hosts get through.
    let client = s
        .proxy
        .register(ClientSpec {
            name: "phased".into(),
            credentials: Vec::new(),
            policy: PolicyMode::Strict,
            allow: Vec::new(),
            trace: Some(sink.clone()),
            audit: Some(sink.clone()),
            capture_bodies: 0,
            phases: vec![Arc::new(Hello), Arc::new(ApiKey)],
            rules: Vec::new(),
        })
        .unwrap();
    let url = client.proxy_url(s.proxy.local_addr()).expose().clone();
    let (code, body, _) = curl(&url, s.ca(), &["http://moat.internal/hello"]).await;
    assert_eq!((code, body.as_str()), (200, "hello phased\n"));
    let (code, body, _) = curl(&url, s.ca(), &["http://moat.internal/other"]).await;
    assert_eq!(code, 404, "{body}");
    assert!(
        body.contains("nothing answers http://moat.internal/other"),
        "{body}"
    );
    // The injecting phase's host is let through strict mode, with the key.
    let (code, body, err) = curl(&url, s.ca(), &["https://other.test/keyed"]).await;
    assert_eq!(code, 200, "{body} {err}");
    let seen = s.seen();
    let keyed = seen.iter().find(|r| r.path == "/keyed").unwrap();
    assert_eq!(keyed.authorization, vec!["Key phase-secret".to_string()]);
    // Not elsewhere: api.github.com is not one of this client's hosts.
    let (code, _, _) = curl(&url, s.ca(), &["https://api.github.com/unkeyed"]).await;
    assert_eq!(code, 403);
    assert!(!seen.iter().any(|r| r.path == "/unkeyed"));
    // Recorded and audited like any credential; the value appears nowhere.
    let records = sink.records();
    let r = records.iter().find(|r| r.url.ends_with("/keyed")).unwrap();
    assert_eq!(r.grant.as_deref(), Some("apikey"));
    assert!(sink.events().iter().any(|e| matches!(e,
        AuditEvent::CredentialInjected { grant, path, .. } if grant == "apikey" && path == "/keyed")));
    assert!(sink.events().iter().any(|e| matches!(e,
        AuditEvent::PolicyDecision { allowed: true, rule, .. } if rule == "grant:apikey")));
    let everything = format!("{:?}{:?}", sink.records(), sink.events());
    assert!(!everything.contains("phase-secret"), "{everything}");
    let r = records.iter().find(|r| r.url.ends_with("/other")).unwrap();
    assert_eq!(r.fault, Some(Fault::Client));
}

/// A client's phase that uses every hook the proxy offers around its own
/// work: it refuses connections once told to, refuses tunnels to one host,
/// adds a line to what refused clients read, and keeps every final record.
#[derive(Debug, Default)]
struct Watcher {
    refuse_peers: std::sync::atomic::AtomicBool,
    peers: Mutex<Vec<SocketAddr>>,
    failures: Mutex<Vec<(String, u16, Fault)>>,
    logged: Mutex<Vec<moat_core::trace::TraceRecord>>,
    /// `fail HOST` and `log URL`, in the order they came.
    order: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl moat_core::proxy::Phase for Watcher {
    fn authenticate(&self, peer: SocketAddr) -> Result<(), moat_core::proxy::phase::Answer> {
        self.peers.lock().unwrap().push(peer);
        if self.refuse_peers.load(std::sync::atomic::Ordering::SeqCst) {
            let mut answer = moat_core::proxy::phase::Answer::text(
                http::StatusCode::FORBIDDEN,
                "Moat: not from this address\n",
            );
            answer.denied = Some("peer refused".into());
            return Err(answer);
        }
        Ok(())
    }

    fn connect(&self, host: &str, _port: u16) -> Result<(), moat_core::proxy::phase::Answer> {
        if host == "other.test" {
            let mut answer = moat_core::proxy::phase::Answer::text(
                http::StatusCode::FORBIDDEN,
                "Moat: other.test is closed to this client\n",
            );
            answer.denied = Some("closed by the watcher".into());
            answer.audit = Some(AuditEvent::PolicyDecision {
                client: "run_watched".into(),
                host: host.into(),
                port: 443,
                allowed: false,
                rule: "watcher".into(),
            });
            return Err(answer);
        }
        Ok(())
    }

    fn fail(&self, failure: &moat_core::proxy::phase::Failure<'_>) -> Option<String> {
        self.order
            .lock()
            .unwrap()
            .push(format!("fail {}", failure.host));
        self.failures.lock().unwrap().push((
            failure.host.to_string(),
            failure.status.as_u16(),
            failure.fault,
        ));
        Some("hint: ask the operator".into())
    }

    fn log(&self, record: &moat_core::trace::TraceRecord) {
        self.order
            .lock()
            .unwrap()
            .push(format!("log {}", record.url));
        self.logged.lock().unwrap().push(record.clone());
    }
}

#[tokio::test]
async fn a_clients_phases_authenticate_connect_fail_and_log_around_the_proxys_own() {
    let s = setup_with(true, PolicyMode::Strict, &["other.test"], Limits::default()).await;
    let watcher = Arc::new(Watcher::default());
    let sink = Arc::new(MemorySink::default());
    let client = s
        .proxy
        .register(ClientSpec {
            name: "run_watched".into(),
            credentials: vec![github_credential()],
            policy: PolicyMode::Strict,
            allow: vec![HostPattern::parse("other.test").unwrap()],
            trace: Some(sink.clone()),
            audit: Some(sink.clone()),
            capture_bodies: 0,
            phases: vec![watcher.clone()],
            rules: Vec::new(),
        })
        .unwrap();
    let url = client.proxy_url(s.proxy.local_addr()).expose().clone();
    // Allowed, and the credential went in: the phases changed nothing.
    let (code, _, err) = curl(&url, s.ca(), &["https://api.github.com/watched"]).await;
    assert_eq!(code, 200, "{err}");
    assert!(s
        .seen()
        .iter()
        .any(|r| r.path == "/watched" && r.authorization == [format!("Bearer {TOKEN}")]));
    assert!(watcher.peers.lock().unwrap()[0].ip().is_loopback());
    // The policy allows other.test; the phase's connect refuses it, and the
    // client reads the phase's words and its fail line, inside TLS.
    let (code, body, err) = curl(&url, s.ca(), &["https://other.test/closed"]).await;
    assert_eq!(code, 403, "{err}");
    assert_eq!(
        body,
        "Moat: other.test is closed to this client\nhint: ask the operator\n"
    );
    assert!(!s.seen().iter().any(|r| r.path == "/closed"), "never sent");
    // The proxy's own refusal (strict mode) gets the fail line too.
    let (code, body, _) = curl(&url, s.ca(), &["https://blocked.example.com/b"]).await;
    assert_eq!(code, 403);
    assert!(
        body.starts_with("Moat: request blocked by network policy."),
        "{body}"
    );
    assert!(body.ends_with("hint: ask the operator\n"), "{body}");
    let failures = watcher.failures.lock().unwrap().clone();
    assert!(
        failures.contains(&("other.test".into(), 403, Fault::Policy)),
        "{failures:?}"
    );
    assert!(
        failures.contains(&("blocked.example.com".into(), 403, Fault::Policy)),
        "{failures:?}"
    );
    // Authentication: the token names the client; its phase refuses the
    // connection's peer, and nothing is sent.
    watcher
        .refuse_peers
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (code, body, _) = curl(&url, s.ca(), &["https://api.github.com/refused-peer"]).await;
    assert_eq!(
        (code, body.as_str()),
        (0, ""),
        "the CONNECT itself is refused"
    );
    let (code, body, _) = curl(&url, s.ca(), &["http://other.test/plain-refused"]).await;
    assert_eq!(
        (code, body.as_str()),
        (403, "Moat: not from this address\nhint: ask the operator\n")
    );
    assert!(!s.seen().iter().any(|r| r.path == "/refused-peer"));
    assert!(!s.seen_plain().iter().any(|r| r.path == "/plain-refused"));
    let audited = sink.events();
    assert!(
        audited.iter().any(|e| matches!(e, AuditEvent::PolicyDecision { allowed: false, rule, .. } if rule == "authenticate")),
        "{audited:?}"
    );
    assert!(
        audited.iter().any(|e| matches!(e, AuditEvent::PolicyDecision { allowed: false, rule, host, .. } if rule == "connect" && host == "other.test")),
        "{audited:?}"
    );
    // The phase's own audit event of its refusal is written.
    assert!(
        audited
            .iter()
            .any(|e| matches!(e, AuditEvent::PolicyDecision { rule, .. } if rule == "watcher")),
        "{audited:?}"
    );
    // A refused request's client is told before its record is final.
    let order = watcher.order.lock().unwrap().clone();
    let at = |what: &str| order.iter().position(|o| o.starts_with(what));
    assert!(
        at("fail other.test") < at("log https://other.test/closed")
            && at("fail other.test").is_some(),
        "{order:?}"
    );
    // Log: every record the client's trace has, the phase saw first, once.
    let urls = |records: Vec<moat_core::trace::TraceRecord>| -> Vec<String> {
        let mut u: Vec<String> = records
            .into_iter()
            .map(|r| format!("{} {:?}", r.url, r.status))
            .collect();
        u.sort();
        u
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while sink.records().len() < 5 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let traced = urls(sink.records());
    assert_eq!(traced.len(), 5, "{traced:?}");
    assert_eq!(urls(watcher.logged.lock().unwrap().clone()), traced);
}

/// Sends a client's requests for chosen hosts to chosen addresses.
#[derive(Debug)]
struct Mirror(Vec<((String, u16), SocketAddr)>);

impl moat_core::proxy::Phase for Mirror {
    fn upstream(&self, host: &str, port: u16) -> Option<SocketAddr> {
        self.0
            .iter()
            .find(|((h, p), _)| h == host && *p == port)
            .map(|(_, addr)| *addr)
    }
}

#[tokio::test]
async fn a_clients_phase_chooses_its_upstream_and_no_other_client_shares_it() {
    let s = setup().await;
    // A second HTTPS upstream (with the same certificate, so it proves
    // api.github.com too) and a second plain one.
    let mirror = https_upstream(s.env.tls.clone()).await;
    let mirror_plain = http_upstream().await;
    let sink = Arc::new(MemorySink::default());
    let mirrored = s
        .proxy
        .register(ClientSpec {
            name: "run_mirrored".into(),
            credentials: vec![github_credential()],
            policy: PolicyMode::Permissive,
            allow: Vec::new(),
            trace: Some(sink.clone()),
            audit: Some(sink.clone()),
            capture_bodies: 0,
            phases: vec![Arc::new(Mirror(vec![
                (("api.github.com".into(), 443), mirror.addr),
                (("other.test".into(), 80), mirror_plain.addr),
            ]))],
            rules: Vec::new(),
        })
        .unwrap();
    let mirrored_url = mirrored.proxy_url(s.proxy.local_addr()).expose().clone();
    // Interleaved, so that a pooled connection of one would show in the
    // other's upstream.
    for i in 0..3 {
        let (code, _, err) = curl(
            &mirrored_url,
            s.ca(),
            &[&format!("https://api.github.com/m{i}")],
        )
        .await;
        assert_eq!(code, 200, "{err}");
        let (code, _, err) =
            curl(&s.url(), s.ca(), &[&format!("https://api.github.com/d{i}")]).await;
        assert_eq!(code, 200, "{err}");
        let (code, _, err) = curl(
            &mirrored_url,
            s.ca(),
            &[&format!("http://other.test/pm{i}")],
        )
        .await;
        assert_eq!(code, 200, "{err}");
        let (code, _, err) = curl(&s.url(), s.ca(), &[&format!("http://other.test/pd{i}")]).await;
        assert_eq!(code, 200, "{err}");
    }
    let paths = |seen: Vec<Seen>| -> Vec<String> { seen.into_iter().map(|r| r.path).collect() };
    let on_mirror = paths(mirror.log.lock().unwrap().clone());
    let direct = paths(s.seen());
    assert_eq!(on_mirror, ["/m0", "/m1", "/m2"]);
    assert!(direct.iter().all(|p| p.starts_with("/d")), "{direct:?}");
    assert_eq!(direct.len(), 3);
    assert_eq!(
        paths(mirror_plain.log.lock().unwrap().clone()),
        ["/pm0", "/pm1", "/pm2"]
    );
    assert_eq!(paths(s.seen_plain()), ["/pd0", "/pd1", "/pd2"]);
    // Another spelling of the host is the same host: it goes where the
    // phase chose, never where the proxy would resolve it.
    for url in ["http://OTHER.test/pm-upper", "http://other.test./pm-dot"] {
        let (code, _, err) = curl(&mirrored_url, s.ca(), &[url]).await;
        assert_eq!(code, 200, "{url}: {err}");
    }
    let on_mirror_plain = paths(mirror_plain.log.lock().unwrap().clone());
    assert!(
        on_mirror_plain.contains(&"/pm-upper".to_string())
            && on_mirror_plain.contains(&"/pm-dot".to_string()),
        "{on_mirror_plain:?}"
    );
    assert_eq!(paths(s.seen_plain()), ["/pd0", "/pd1", "/pd2"]);
    // The credential went to the chosen upstream, which proved the host.
    assert!(mirror
        .log
        .lock()
        .unwrap()
        .iter()
        .all(|r| r.authorization == [format!("Bearer {TOKEN}")]));
    // A chosen address that does not prove the host gets nothing: the
    // plain upstream speaks no TLS.
    let bad = s
        .proxy
        .register(ClientSpec {
            phases: vec![Arc::new(Mirror(vec![(
                ("api.github.com".into(), 443),
                mirror_plain.addr,
            )]))],
            credentials: vec![github_credential()],
            ..ClientSpec::new("run_bad_mirror")
        })
        .unwrap();
    let bad_url = bad.proxy_url(s.proxy.local_addr()).expose().clone();
    let (code, _, _) = curl(&bad_url, s.ca(), &["https://api.github.com/nope"]).await;
    assert_eq!(code, 502);
    assert!(!paths(mirror_plain.log.lock().unwrap().clone()).contains(&"/nope".to_string()));
}

// ------------------------------------------------------------- workers

/// Notes the thread each request was recorded on.
#[derive(Debug, Default)]
struct Threads(Mutex<Vec<(String, String)>>);

#[async_trait::async_trait]
impl moat_core::proxy::Phase for Threads {
    fn log(&self, record: &moat_core::trace::TraceRecord) {
        let thread = std::thread::current().name().unwrap_or("").to_string();
        self.0.lock().unwrap().push((record.url.clone(), thread));
    }
}

#[tokio::test]
async fn connections_are_spread_over_the_workers_and_each_stays_on_its_own() {
    let limits = Limits {
        workers: 2,
        ..Limits::default()
    };
    let s = setup_with(true, PolicyMode::Permissive, &[], limits).await;
    let threads = Arc::new(Threads::default());
    let client = s
        .proxy
        .register(ClientSpec {
            name: "run_threads".into(),
            credentials: vec![github_credential()],
            policy: PolicyMode::Permissive,
            allow: Vec::new(),
            trace: None,
            audit: None,
            capture_bodies: 0,
            phases: vec![threads.clone()],
            rules: Vec::new(),
        })
        .unwrap();
    let url = client.proxy_url(s.proxy.local_addr()).expose().clone();
    let auth = proxy_authorization(&url);
    // Four connections open at once, three requests on each, interleaved.
    let mut senders = Vec::new();
    for _ in 0..4 {
        let tcp = TcpStream::connect(s.proxy.local_addr()).await.unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        senders.push(send);
    }
    for round in 0..3 {
        for (c, send) in senders.iter_mut().enumerate() {
            ready(send).await;
            let mut req = get(&format!("http://other.test/c{c}/r{round}"), "other.test");
            req.headers_mut()
                .insert("proxy-authorization", auth.parse().unwrap());
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            body_text(resp).await;
        }
    }
    // And a tunnel's requests, through curl.
    let (code, _, err) = curl(&url, s.ca(), &["https://api.github.com/tunnelled"]).await;
    assert_eq!(code, 200, "{err}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while threads.0.lock().unwrap().len() < 13 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = threads.0.lock().unwrap().clone();
    assert_eq!(seen.len(), 13, "{seen:?}");
    for (url, thread) in &seen {
        assert!(
            thread == "moat-proxy-0" || thread == "moat-proxy-1",
            "{url} was served on {thread:?}, not on a worker"
        );
    }
    // Each connection stayed on one worker, and the four were shared out
    // two and two (each went to the worker serving fewer).
    let mut per_worker = std::collections::BTreeMap::<&str, usize>::new();
    for c in 0..4 {
        let on: std::collections::BTreeSet<&str> = seen
            .iter()
            .filter(|(url, _)| url.contains(&format!("/c{c}/")))
            .map(|(_, thread)| thread.as_str())
            .collect();
        assert_eq!(
            on.len(),
            1,
            "connection {c} moved between workers: {seen:?}"
        );
        *per_worker
            .entry(on.into_iter().next().unwrap())
            .or_default() += 1;
    }
    assert_eq!(
        per_worker.values().copied().collect::<Vec<_>>(),
        [2, 2],
        "{seen:?}"
    );
}

// ------------------------------------------------------- held push bodies

/// A client of `s`'s proxy whose rules judge pushes to github.com by ref.
fn push_ruled_client(s: &Setup) -> ClientHandle {
    let rules = moat_core::policy::rules::parse_entries(&[(
        "github.com".to_string(),
        vec!["allow git-push refs/heads/agent/**".to_string()],
    )])
    .unwrap();
    s.proxy
        .register(ClientSpec {
            name: "push_test".into(),
            credentials: Vec::new(),
            policy: PolicyMode::Permissive,
            allow: Vec::new(),
            trace: Some(s.sink.clone()),
            audit: Some(s.sink.clone()),
            capture_bodies: 0,
            phases: Vec::new(),
            rules,
        })
        .unwrap()
}

/// Starts a push to github.com through `client`'s tunnel: its head and
/// `updates` bytes of ref-update pkt-lines, with no flush, so that the
/// proxy waits for the rest. Returns the open TLS stream.
async fn stalled_push(
    s: &Setup,
    client: &ClientHandle,
    updates: usize,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let url = client.proxy_url(s.proxy.local_addr()).expose().clone();
    let (tcp, head) = connect(s.proxy.local_addr(), &url, "github.com:443").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut tls = tls_over(tcp, s.ca(), "github.com", &[b"http/1.1"])
        .await
        .unwrap();
    let mut body = Vec::new();
    while body.len() < updates {
        let line = format!(
            "{} {} refs/heads/agent/{}\n",
            "0".repeat(40),
            "1".repeat(40),
            "a".repeat(60_000)
        );
        body.extend_from_slice(format!("{:04x}", line.len() + 4).as_bytes());
        body.extend_from_slice(line.as_bytes());
    }
    let head = format!(
        "POST /o/r.git/git-receive-pack HTTP/1.1\r\nHost: github.com\r\n\
         Content-Type: application/x-git-receive-pack-request\r\n\
         Content-Length: {}\r\n\r\n",
        body.len() + 1000
    );
    // The proxy may answer (and close) before all of it is written.
    let _ = tls.write_all(head.as_bytes()).await;
    let _ = tls.write_all(&body).await;
    let _ = tls.flush().await;
    tls
}

/// Reads what the proxy answers on `tls` (until it closes or `within`).
async fn answer(tls: &mut tokio_rustls::client::TlsStream<TcpStream>, within: Duration) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(within, async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    if got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    String::from_utf8_lossy(&got).into_owned()
}

/// A push whose ref updates stop coming is refused after the head timeout,
/// not held (with up to 1 MiB of them) for as long as its client likes.
#[tokio::test(flavor = "multi_thread")]
async fn a_push_whose_ref_updates_stall_is_refused_in_time() {
    let limits = Limits {
        header_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let s = setup_with(true, PolicyMode::Permissive, &[], limits).await;
    let client = push_ruled_client(&s);
    let started = Instant::now();
    let mut tls = stalled_push(&s, &client, 100_000).await;
    let told = answer(&mut tls, Duration::from_secs(10)).await;
    assert!(
        told.starts_with("HTTP/1.1 403") && told.contains("did not arrive within 1 s"),
        "{told}"
    );
    assert!(started.elapsed() < Duration::from_secs(8));
    assert!(s.seen().is_empty(), "the stalled push reached the server");
}

/// The bytes of every client's pushes being read are bounded together: a
/// push past `held_body_bytes` is refused at once, and the bound is free
/// again once the push that held it is gone.
#[tokio::test(flavor = "multi_thread")]
async fn pushes_being_read_share_one_bound_on_the_bytes_they_hold() {
    let limits = Limits {
        held_body_bytes: 1 << 20,
        ..Limits::default()
    };
    let s = setup_with(true, PolicyMode::Permissive, &[], limits).await;
    let client = push_ruled_client(&s);
    let first = stalled_push(&s, &client, 600_000).await;
    // The proxy has read the first push's bytes once it holds them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut second = stalled_push(&s, &client, 600_000).await;
    let told = answer(&mut second, Duration::from_secs(10)).await;
    assert!(
        told.starts_with("HTTP/1.1 403") && told.contains("too many pushes at once"),
        "{told}"
    );
    drop(first);
    drop(second);
    // Freed: the same push is read again (and then waits for its flush).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut third = stalled_push(&s, &client, 600_000).await;
        let told = answer(&mut third, Duration::from_millis(1500)).await;
        if told.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the bound was not freed: {told}");
    }
    assert!(s.seen().is_empty());
}
