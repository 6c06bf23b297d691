//! How the load generator reaches a server: directly (TCP, maybe TLS) or
//! through an HTTP proxy (absolute-form for `http://`, CONNECT then TLS for
//! `https://`). Every address it dials must be on loopback: host names are
//! mapped with `--resolve`, never looked up.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http::{HeaderValue, Method, Request};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Errors of the bench tool.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Results of the bench tool.
pub type Result<T> = std::result::Result<T, BoxError>;
/// A request body.
pub type Body = BoxBody<Bytes, Infallible>;
/// A keep-alive HTTP/1.1 client connection.
pub type Sender = SendRequest<Body>;

/// A stream the client talks HTTP over.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// Refuses anything that is not a loopback address.
pub fn loopback(addr: SocketAddr) -> Result<SocketAddr> {
    if addr.ip().is_loopback() {
        Ok(addr)
    } else {
        Err(
            format!("{addr} is not a loopback address; the benchmark only talks to 127.0.0.0/8")
                .into(),
        )
    }
}

/// Parses `host:port=addr:port` (the address must be loopback).
pub fn parse_resolve(entry: &str) -> Result<((String, u16), SocketAddr)> {
    let (from, to) = entry
        .split_once('=')
        .ok_or_else(|| format!("--resolve {entry}: expected host:port=addr:port"))?;
    let (host, port) = from
        .rsplit_once(':')
        .ok_or_else(|| format!("--resolve {entry}: missing the port"))?;
    let port: u16 = port.parse()?;
    let addr = loopback(to.parse()?)?;
    Ok(((host.to_ascii_lowercase(), port), addr))
}

/// A proxy to go through: its loopback address and the Proxy-Authorization
/// header from the URL's user info, if any.
#[derive(Debug, Clone)]
pub struct ProxyUrl {
    /// Where the proxy listens.
    pub addr: SocketAddr,
    /// `Basic base64(user:password)`.
    pub auth: Option<HeaderValue>,
}

impl ProxyUrl {
    /// Parses `http://[user:password@]127.0.0.1:port`.
    pub fn parse(url: &str) -> Result<ProxyUrl> {
        let rest = url
            .strip_prefix("http://")
            .ok_or("the proxy URL must start with http://")?;
        let rest = rest.trim_end_matches('/');
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let addr = loopback(hostport.parse()?)?;
        let auth = match userinfo {
            Some(u) => {
                let b64 = base64::engine::general_purpose::STANDARD.encode(u);
                Some(HeaderValue::from_str(&format!("Basic {b64}"))?)
            }
            None => None,
        };
        Ok(ProxyUrl { addr, auth })
    }
}

/// Client TLS trusting only the certificates in `ca`, HTTP/1.1 by ALPN.
/// Session resumption is off unless `resume`: every new connection is a
/// full handshake.
pub fn client_tls(ca: &Path, resume: bool) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    if !resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(Arc::new(config))
}

/// How to reach one origin (`scheme://host:port`).
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The origin's host name.
    pub host: String,
    /// The origin's port.
    pub port: u16,
    /// TLS to the origin (directly or inside a CONNECT tunnel); `None` for
    /// plain HTTP.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Direct: the address the host name maps to.
    pub direct: Option<SocketAddr>,
    /// Through this proxy.
    pub proxy: Option<ProxyUrl>,
}

/// A parsed `http(s)://host:port/path` URL.
#[derive(Debug, Clone)]
pub struct Url {
    /// Is it https?
    pub https: bool,
    /// Host name.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Path and query.
    pub path: String,
}

impl Url {
    /// Parses an absolute `http://` or `https://` URL.
    pub fn parse(text: &str) -> Result<Url> {
        let uri: http::Uri = text.parse()?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("{text}: only http:// and https:// URLs").into()),
        };
        let host = uri
            .host()
            .ok_or_else(|| format!("{text}: no host"))?
            .to_ascii_lowercase();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let path = uri
            .path_and_query()
            .map_or("/".to_string(), |p| p.as_str().to_string());
        Ok(Url {
            https,
            host,
            port,
            path,
        })
    }
}

impl Endpoint {
    /// An endpoint for `url`: through `proxy` if given, else directly to
    /// the address `resolve` maps the host to (a loopback IP literal needs
    /// no mapping). `ca` is what the client trusts for TLS: the origin's CA
    /// directly, the proxy's CA through an intercepting proxy.
    pub fn new(
        url: &Url,
        proxy: Option<ProxyUrl>,
        resolve: &HashMap<(String, u16), SocketAddr>,
        ca: Option<&Path>,
        resume: bool,
    ) -> Result<Endpoint> {
        let tls = if url.https {
            let ca = ca.ok_or("an https URL needs --ca (the certificate to trust)")?;
            Some(client_tls(ca, resume)?)
        } else {
            None
        };
        let direct = if proxy.is_some() {
            None
        } else if let Some(addr) = resolve.get(&(url.host.clone(), url.port)) {
            Some(*addr)
        } else if let Ok(ip) = url.host.parse::<std::net::IpAddr>() {
            Some(loopback(SocketAddr::new(ip, url.port))?)
        } else {
            return Err(format!(
                "{}:{} is not mapped: give --resolve {}:{}=127.0.0.1:PORT (no DNS lookups)",
                url.host, url.port, url.host, url.port
            )
            .into());
        };
        Ok(Endpoint {
            host: url.host.clone(),
            port: url.port,
            tls,
            direct,
            proxy,
        })
    }

    /// A copy for another host name (same port, proxy and TLS settings).
    pub fn with_host(&self, host: &str) -> Endpoint {
        let mut e = self.clone();
        e.host = host.to_string();
        e
    }

    fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// TCP to the server or the proxy; CONNECT through the proxy for TLS;
    /// then the TLS handshake. Returns a stream ready for HTTP.
    pub async fn open_stream(&self) -> Result<Box<dyn Io>> {
        let tcp = match (&self.proxy, self.direct) {
            (Some(p), _) => TcpStream::connect(p.addr).await?,
            (None, Some(addr)) => TcpStream::connect(addr).await?,
            (None, None) => return Err("endpoint has no address".into()),
        };
        tcp.set_nodelay(true)?;
        let Some(tls) = &self.tls else {
            return Ok(Box::new(tcp));
        };
        let tcp = match &self.proxy {
            Some(p) => connect_tunnel(tcp, p, &self.authority()).await?,
            None => tcp,
        };
        let name = ServerName::try_from(self.host.clone())?;
        let stream = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await?;
        Ok(Box::new(stream))
    }

    /// [`Endpoint::open_stream`] and an HTTP/1.1 client on it.
    pub async fn open(&self) -> Result<Sender> {
        let io = self.open_stream().await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// A request for `path` on this origin, in the form the route needs
    /// (absolute-form with Proxy-Authorization for plain HTTP through a
    /// proxy; origin-form otherwise).
    pub fn request(
        &self,
        method: &Method,
        path: &str,
        body: Option<(Body, u64)>,
        close: bool,
    ) -> Result<Request<Body>> {
        let plain_via_proxy = self.tls.is_none() && self.proxy.is_some();
        let uri = if plain_via_proxy {
            format!("http://{}{}", self.authority(), path)
        } else {
            path.to_string()
        };
        let mut b = Request::builder()
            .method(method.clone())
            .uri(uri)
            .header(http::header::HOST, self.authority())
            .header(http::header::USER_AGENT, "moat-bench");
        if plain_via_proxy {
            if let Some(auth) = self.proxy.as_ref().and_then(|p| p.auth.clone()) {
                b = b.header(http::header::PROXY_AUTHORIZATION, auth);
            }
        }
        if close {
            b = b.header(http::header::CONNECTION, "close");
        }
        let body = match body {
            Some((body, len)) => {
                b = b.header(http::header::CONTENT_LENGTH, len);
                body
            }
            None => Empty::new().boxed(),
        };
        Ok(b.body(body)?)
    }
}

/// Sends CONNECT on `tcp` and reads the proxy's answer; errors unless 200.
pub async fn connect_tunnel(
    mut tcp: TcpStream,
    proxy: &ProxyUrl,
    authority: &str,
) -> Result<TcpStream> {
    let mut req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some(auth) = &proxy.auth {
        req.push_str("Proxy-Authorization: ");
        req.push_str(auth.to_str()?);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    tcp.write_all(req.as_bytes()).await?;
    // The proxy sends nothing after its answer until the client speaks, so
    // reading whole chunks cannot swallow tunnel bytes.
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            return Err("the proxy closed the connection during CONNECT".into());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > 16 * 1024 {
            return Err("CONNECT answer too long".into());
        }
    }
    let line = String::from_utf8_lossy(&head);
    let status = line.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        let first = line.lines().next().unwrap_or("").to_string();
        return Err(format!("CONNECT {authority}: {first}").into());
    }
    Ok(tcp)
}
