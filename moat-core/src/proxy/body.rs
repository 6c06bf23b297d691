//! Body and I/O helpers of the proxy: a streaming body that counts its bytes
//! and reports when it ends, and a stream with bytes put back in front.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::trace::Fault;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type ProxyBody = BoxBody<Bytes, BoxError>;

pub(crate) fn full(text: impl Into<Bytes>) -> ProxyBody {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

pub(crate) fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// The first bytes of a body, kept for the trace (at most `limit`).
#[derive(Clone)]
pub(crate) struct Capture {
    buf: Arc<Mutex<Vec<u8>>>,
    limit: usize,
}

impl Capture {
    pub(crate) fn new(limit: usize) -> Capture {
        Capture {
            buf: Arc::default(),
            limit,
        }
    }

    fn push(&self, data: &[u8]) {
        if let Ok(mut buf) = self.buf.lock() {
            let room = self.limit.saturating_sub(buf.len());
            buf.extend_from_slice(&data[..data.len().min(room)]);
        }
    }

    /// The captured text (invalid UTF-8 replaced).
    pub(crate) fn text(&self) -> Option<String> {
        self.buf
            .lock()
            .ok()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    }
}

/// Called once when a body ends: with `None` when it reached its end, with
/// why it stopped short otherwise.
pub(crate) type OnEnd = Box<dyn FnOnce(Option<(Fault, String)>) + Send + Sync>;

/// Streams `inner` frame by frame (nothing is buffered), adding the bytes of
/// data frames to `counter`, and calls `on_end` once when the body ends, fails
/// or is dropped before its end.
pub(crate) struct Counted {
    inner: ProxyBody,
    counter: Arc<AtomicU64>,
    on_end: Option<OnEnd>,
    capture: Option<Capture>,
}

impl Counted {
    pub(crate) fn new(inner: ProxyBody, counter: Arc<AtomicU64>, on_end: Option<OnEnd>) -> Counted {
        Counted {
            inner,
            counter,
            on_end,
            capture: None,
        }
    }

    /// Also keeps the first bytes of the body in `capture`.
    pub(crate) fn capturing(mut self, capture: Option<Capture>) -> Counted {
        self.capture = capture;
        self
    }

    fn finish(&mut self, short: Option<(Fault, String)>) {
        if let Some(f) = self.on_end.take() {
            f(short);
        }
    }
}

impl Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        match &poll {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.counter.fetch_add(data.len() as u64, Ordering::Relaxed);
                    if let Some(capture) = &self.capture {
                        capture.push(data);
                    }
                }
                // A body whose length is known may not be polled again.
                if self.inner.is_end_stream() {
                    self.finish(None);
                }
            }
            Poll::Ready(None) => self.finish(None),
            Poll::Ready(Some(Err(e))) => {
                let why = format!("the body stopped short: {e}");
                self.finish(Some((Fault::Upstream, why)));
            }
            Poll::Pending => {}
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        // Dropped before its end: its reader (the client) went away.
        let short = (!self.inner.is_end_stream()).then(|| {
            let why = "the body stopped short: the connection closed before its end";
            (Fault::Client, why.to_string())
        });
        self.finish(short);
    }
}

/// A stream that first yields `prefix`, then reads from `inner`.
pub(crate) struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub(crate) fn new(prefix: Bytes, inner: S) -> Prefixed<S> {
        Prefixed { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
