//! Connections to upstream servers: resolution with operator overrides,
//! destination checks on the address actually dialled, and TLS verified
//! against the system roots plus operator-supplied roots.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::dest;
use crate::error::{Error, ErrorKind, Result};

/// `host:port` → address overrides, like curl's `--resolve`.
pub type ResolveMap = HashMap<(String, u16), SocketAddr>;

/// Parses `MOAT_RESOLVE`: `host:port=addr:port,...` (IPv6 in brackets).
pub fn parse_resolve(text: &str) -> Result<ResolveMap> {
    let mut map = ResolveMap::new();
    if text.trim().is_empty() {
        return Ok(map);
    }
    for (i, item) in text.split(',').map(str::trim).enumerate() {
        if item.is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("MOAT_RESOLVE \"{text}\": entry {} is empty (a stray comma?); expected host:port=addr:port, comma-separated", i + 1),
            ));
        }
        let bad = |why: &str| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!("MOAT_RESOLVE entry \"{item}\": {why} (expected host:port=addr:port)"),
            )
        };
        let (from, to) = item.split_once('=').ok_or_else(|| bad("missing \"=\""))?;
        let (host, port) = from
            .rsplit_once(':')
            .ok_or_else(|| bad("missing the port"))?;
        let port: u16 = port.parse().map_err(|_| bad("bad port"))?;
        if host.is_empty() {
            return Err(bad("empty host"));
        }
        let addr: SocketAddr = to.parse().map_err(|_| bad("bad address"))?;
        map.insert(
            (host.trim_end_matches('.').to_ascii_lowercase(), port),
            addr,
        );
    }
    Ok(map)
}

/// The operator settings from the environment: extra roots from
/// `MOAT_UPSTREAM_CA_FILE` and overrides from `MOAT_RESOLVE`.
pub fn env_settings() -> Result<(Vec<CertificateDer<'static>>, ResolveMap)> {
    let roots = match std::env::var_os("MOAT_UPSTREAM_CA_FILE").filter(|v| !v.is_empty()) {
        Some(path) => load_pem_roots(Path::new(&path))?,
        None => Vec::new(),
    };
    let resolve = match std::env::var("MOAT_RESOLVE") {
        Ok(text) => parse_resolve(&text)?,
        Err(_) => ResolveMap::new(),
    };
    Ok((roots, resolve))
}

/// An HTTPS client for moat's own calls (token validation, STS), with the
/// same trust, overrides and destination checks as the proxy.
pub(crate) fn own_client(
    timeout: Duration,
) -> Result<hyper_util::client::legacy::Client<Connector, http_body_util::Full<bytes::Bytes>>> {
    let (roots, resolve) = env_settings()?;
    own_client_with(&roots, resolve, timeout)
}

/// [`own_client`] with the given extra roots and overrides.
pub(crate) fn own_client_with(
    roots: &[CertificateDer<'static>],
    resolve: ResolveMap,
    timeout: Duration,
) -> Result<hyper_util::client::legacy::Client<Connector, http_body_util::Full<bytes::Bytes>>> {
    let tls = client_tls(roots)?;
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(
            Connector {
                overrides: Arc::new(resolve),
                tls: Some(tls),
                timeout,
                choose: None,
            },
        ),
    )
}

/// Reads PEM certificates from `path` as extra trusted roots.
pub fn load_pem_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let data = std::fs::read(path).map_err(|e| Error::io(path, "read", e))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&data)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!("{}: not a pem certificate file: {e}", path.display()),
            )
        })?;
    if certs.is_empty() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("{}: no certificates in the file", path.display()),
        ));
    }
    Ok(certs)
}

/// Builds the upstream TLS configuration: system roots plus `extra`.
pub(crate) fn client_tls(extra: &[CertificateDer<'static>]) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A malformed system certificate is skipped, as browsers do.
        let _ = roots.add(cert);
    }
    for cert in extra {
        roots.add(cert.clone()).map_err(|e| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!("an extra upstream ca certificate is invalid: {e}"),
            )
        })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::new(ErrorKind::Internal, format!("tls setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Why an upstream connection failed; tells the proxy which status to send.
#[derive(Debug)]
pub enum ConnectError {
    /// The destination is not allowed (403).
    Refused {
        /// Host as requested.
        host: String,
        /// The address that was refused.
        addr: std::net::IpAddr,
        /// Why.
        reason: &'static str,
    },
    /// Name resolution failed (502).
    Resolve(String, std::io::Error),
    /// TCP connect failed (502).
    Connect(SocketAddr, std::io::Error),
    /// The TLS handshake or certificate verification failed (502).
    Tls(String, std::io::Error),
    /// Connecting took too long (504).
    Timeout(String),
    /// The request had no usable host.
    BadUri,
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Refused { host, addr, reason } => write!(
                f,
                "destination \"{host}\" ({addr}) is {reason}; moat does not connect there on an agent's behalf"
            ),
            ConnectError::Resolve(host, e) => write!(f, "cannot resolve \"{host}\": {e}"),
            ConnectError::Connect(addr, e) => write!(f, "cannot connect to {addr}: {e}"),
            ConnectError::Tls(host, e) => {
                write!(f, "tls with \"{host}\" failed: {e}")
            }
            ConnectError::Timeout(host) => write!(f, "connecting to \"{host}\" timed out"),
            ConnectError::BadUri => f.write_str("the request has no host"),
        }
    }
}

impl std::error::Error for ConnectError {}

/// Resolves `host:port` to the one address to dial, checking it.
pub(crate) async fn resolve(
    host: &str,
    port: u16,
    overrides: &ResolveMap,
) -> std::result::Result<SocketAddr, ConnectError> {
    let key = (host.trim_end_matches('.').to_ascii_lowercase(), port);
    if let Some(addr) = overrides.get(&key) {
        return Ok(*addr);
    }
    if let Some(ip) = dest::parse_ip(host) {
        if let Some(reason) = dest::forbidden_reason(ip) {
            return Err(ConnectError::Refused {
                host: host.to_string(),
                addr: ip,
                reason,
            });
        }
        return Ok(SocketAddr::new(ip, port));
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| ConnectError::Resolve(host.to_string(), e))?
        .collect();
    let mut refused = None;
    for addr in &addrs {
        match dest::forbidden_reason(addr.ip()) {
            None => return Ok(*addr),
            Some(reason) => refused = refused.or(Some((addr.ip(), reason))),
        }
    }
    match refused {
        Some((addr, reason)) => Err(ConnectError::Refused {
            host: host.to_string(),
            addr,
            reason,
        }),
        None => Err(ConnectError::Resolve(
            host.to_string(),
            std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses"),
        )),
    }
}

/// Dials a checked address with a timeout.
pub(crate) async fn dial(
    host: &str,
    port: u16,
    overrides: &ResolveMap,
    timeout: Duration,
) -> std::result::Result<TcpStream, ConnectError> {
    let addr = resolve(host, port, overrides).await?;
    dial_addr(host, addr, timeout).await
}

/// The address one of `phases` chooses for `host:port`
/// ([`super::Phase::upstream`]), if any: the first that chooses.
pub(crate) fn chosen(
    phases: &[Arc<dyn super::Phase>],
    host: &str,
    port: u16,
) -> Option<SocketAddr> {
    phases.iter().find_map(|p| p.upstream(host, port))
}

/// Dials `addr` for `host` with a timeout. (An address a client's phase
/// chose is dialled as it is, like one the operator mapped with
/// `MOAT_RESOLVE`: the embedding program's choice; TLS still proves `host`.)
pub(crate) async fn dial_addr(
    host: &str,
    addr: SocketAddr,
    timeout: Duration,
) -> std::result::Result<TcpStream, ConnectError> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ConnectError::Timeout(host.to_string()))?
        .map_err(|e| ConnectError::Connect(addr, e))?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// TLS to an upstream over `tcp`, verified against `config`'s roots, with
/// `host` as the server name.
pub(crate) async fn handshake(
    host: &str,
    tcp: TcpStream,
    config: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> std::result::Result<TlsStream<TcpStream>, ConnectError> {
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| ConnectError::Tls(host.to_string(), std::io::Error::other(e.to_string())))?;
    tokio::time::timeout(timeout, TlsConnector::from(config).connect(name, tcp))
        .await
        .map_err(|_| ConnectError::Timeout(host.to_string()))?
        .map_err(|e| ConnectError::Tls(host.to_string(), e))
}

/// The connector of the proxy's pooled HTTP clients.
#[derive(Clone)]
pub(crate) struct Connector {
    pub overrides: Arc<ResolveMap>,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub timeout: Duration,
    /// A client's phases, which may choose where to dial (its own pools).
    pub choose: Option<Arc<[Arc<dyn super::Phase>]>>,
}

impl tower_service::Service<Uri> for Connector {
    type Response = UpstreamIo;
    type Error = ConnectError;
    type Future =
        Pin<Box<dyn Future<Output = std::result::Result<UpstreamIo, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::result::Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri.host().ok_or(ConnectError::BadUri)?;
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host)
                .to_string();
            let default_port = if this.tls.is_some() { 443 } else { 80 };
            let port = uri.port_u16().unwrap_or(default_port);
            // Asked with the name as the proxy judged it (a client may
            // write `OTHER.test` or `other.test.`).
            let judged = host.trim_end_matches('.').to_ascii_lowercase();
            let chosen = this
                .choose
                .as_deref()
                .and_then(|p| chosen(p, &judged, port));
            let tcp = match chosen {
                Some(addr) => dial_addr(&host, addr, this.timeout).await?,
                None => dial(&host, port, &this.overrides, this.timeout).await?,
            };
            match &this.tls {
                None => Ok(UpstreamIo {
                    inner: TokioIo::new(Stream::Plain(tcp)),
                    h2: false,
                }),
                Some(config) => {
                    let tls = handshake(&host, tcp, config.clone(), this.timeout).await?;
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    Ok(UpstreamIo {
                        inner: TokioIo::new(Stream::Tls(Box::new(tls))),
                        h2,
                    })
                }
            }
        })
    }
}

/// A plain or TLS connection to an upstream.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connection type the pooled client uses.
pub(crate) struct UpstreamIo {
    inner: TokioIo<Stream>,
    h2: bool,
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        let c = Connected::new();
        if self.h2 {
            c.negotiated_h2()
        } else {
            c
        }
    }
}

impl Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl Write for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_overrides_parse() {
        let map = parse_resolve("api.github.com:443=127.0.0.1:8443, [::1]:80=[::1]:8080").unwrap();
        assert_eq!(
            map[&("api.github.com".to_string(), 443)],
            "127.0.0.1:8443".parse().unwrap()
        );
        assert_eq!(
            map[&("[::1]".to_string(), 80)],
            "[::1]:8080".parse().unwrap()
        );
        for bad in [
            "api.github.com=127.0.0.1:1",
            "a:x=127.0.0.1:1",
            "a:1=nope",
            ":1=127.0.0.1:1",
        ] {
            let err = parse_resolve(bad).unwrap_err();
            assert!(err.to_string().contains("MOAT_RESOLVE entry"), "{err}");
        }
        // An empty entry is a mistake said out loud, as `--grant a,,` is.
        for bad in ["a:1=127.0.0.1:1,,", ",a:1=127.0.0.1:1", ","] {
            let err = parse_resolve(bad).unwrap_err();
            assert!(
                err.to_string().contains("is empty (a stray comma?)"),
                "{err}"
            );
        }
        assert!(parse_resolve("").unwrap().is_empty());
        assert!(parse_resolve("  ").unwrap().is_empty());
    }

    #[tokio::test]
    async fn literal_destinations_are_checked_without_connecting() {
        let none = ResolveMap::new();
        for host in [
            "127.0.0.1",
            "2130706433",
            "169.254.169.254",
            "[::ffff:127.0.0.1]",
            "0x7f.1",
        ] {
            let err = resolve(host, 443, &none).await.unwrap_err();
            assert!(matches!(err, ConnectError::Refused { .. }), "{host}: {err}");
        }
        let mut map = ResolveMap::new();
        map.insert(
            ("api.github.com".into(), 443),
            "127.0.0.1:8443".parse().unwrap(),
        );
        assert_eq!(
            resolve("API.github.com.", 443, &map).await.unwrap(),
            "127.0.0.1:8443".parse().unwrap()
        );
    }
}
