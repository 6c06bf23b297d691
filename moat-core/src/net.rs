//! Network helpers shared by the proxy and the router: telling TLS from
//! plain HTTP by a connection's first byte, counting a stream's bytes, and
//! relaying an upgraded HTTP connection (a WebSocket) in both directions.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use std::net::SocketAddr;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// When a listening address may not be on this host yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Listen {
    /// It must be: binding fails otherwise (a mistyped address is an error).
    #[default]
    Now,
    /// It appears later: a Podman network's bridge gets its gateway address
    /// when its first container starts. The socket is bound before
    /// (`IP_FREEBIND`) and accepts once the address is up.
    BeforeUp,
}

/// A TCP listener on `addr`.
pub(crate) fn listen(
    addr: SocketAddr,
    listen_at: Listen,
) -> std::io::Result<tokio::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if listen_at == Listen::BeforeUp {
        if addr.is_ipv4() {
            socket.set_freebind_v4(true)?;
        } else {
            socket.set_freebind_v6(true)?;
        }
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    tokio::net::TcpListener::from_std(socket.into())
}

/// Does a connection that starts with `first` start a TLS handshake (a
/// handshake record, content type 22)?
pub(crate) fn starts_tls(first: u8) -> bool {
    first == 0x16
}

/// A stream that counts the bytes read from it and written to it, so byte
/// counts survive a relay that ends in an error.
pub(crate) struct Metered<S> {
    inner: S,
    read: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl<S> Metered<S> {
    /// Counts the bytes read into `read`, those written into `written`.
    pub(crate) fn new(inner: S, read: Arc<AtomicU64>, written: Arc<AtomicU64>) -> Metered<S> {
        Metered {
            inner,
            read,
            written,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &poll {
            self.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        poll
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The bytes an upgraded connection relayed so far, each way; readable
/// while the relay runs (and after it was cut).
#[derive(Debug, Default, Clone)]
pub(crate) struct Relayed {
    /// From the client to the upstream.
    pub up: Arc<AtomicU64>,
    /// From the upstream to the client.
    pub down: Arc<AtomicU64>,
}

impl Relayed {
    /// The counts now: (up, down).
    pub(crate) fn now(&self) -> (u64, u64) {
        (
            self.up.load(Ordering::Relaxed),
            self.down.load(Ordering::Relaxed),
        )
    }
}

/// Relays a client's upgraded connection and its upstream's until either
/// side closes (cleanly or not), counting into `counts`. Returns at once
/// when either upgrade does not happen.
pub(crate) async fn relay_upgraded(client: OnUpgrade, upstream: OnUpgrade, counts: &Relayed) {
    let (Ok(client), Ok(upstream)) = tokio::join!(client, upstream) else {
        return;
    };
    let mut client = Metered::new(TokioIo::new(client), counts.up.clone(), counts.down.clone());
    let mut upstream = TokioIo::new(upstream);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}
