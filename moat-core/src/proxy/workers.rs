//! The proxy's worker threads.
//!
//! Each worker is a thread running a single-threaded tokio runtime. The
//! accept loop hands each client connection to the worker serving the
//! fewest, and that worker serves it to its end: its requests, the tunnel
//! it may become, and the upstream connections it takes from the worker's
//! own pools ([`current`] says which worker a task is on). A request and
//! its upstream connection then stay on one thread.
//!
//! Why: on one multi-threaded runtime, every request woke the pooled
//! upstream connection's task and was woken back by it, and the two were
//! often on different threads. Measured with `moat-bench` (plain HTTP,
//! keep-alive, concurrency 16), that cost about a third of the proxy's CPU
//! per request. nginx's worker processes and pingora's no-steal runtime
//! have the same shape.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::server::{serve_client, Shared};
use crate::error::{Error, ErrorKind, Result};

thread_local! {
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The worker the calling thread is, if it is one.
pub(crate) fn current() -> Option<usize> {
    INDEX.with(Cell::get)
}

/// How many workers a proxy has unless told: the cores this process may
/// run on (its CPU affinity), at most 8. One agent's traffic rarely needs
/// more, and an idle worker costs a parked thread.
pub(crate) fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

/// A client connection's place under the connection limit and in its
/// worker's count: held by the connection and by a tunnel it became, until
/// both end.
pub(crate) struct Slot {
    _permit: OwnedSemaphorePermit,
    load: Arc<AtomicUsize>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.load.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(crate) type Permit = Arc<Slot>;

/// A connection on its way to a worker.
struct Accepted {
    tcp: std::net::TcpStream,
    peer: SocketAddr,
    slot: Permit,
}

/// One worker, as the accept loop sees it.
struct Queue {
    send: mpsc::Sender<Accepted>,
    /// Connections (and tunnels) it serves now.
    load: Arc<AtomicUsize>,
}

/// Where the accept loop sends connections. Dropping it stops the workers
/// once their connections have ended (or 5 s after the proxy was told to
/// stop).
pub(crate) struct Dispatch {
    queues: Vec<Queue>,
}

impl Dispatch {
    /// Hands `tcp` to the worker serving the fewest connections.
    pub(crate) async fn send(
        &self,
        tcp: tokio::net::TcpStream,
        peer: SocketAddr,
        permit: OwnedSemaphorePermit,
    ) {
        let Some(queue) = self
            .queues
            .iter()
            .min_by_key(|q| q.load.load(Ordering::Relaxed))
        else {
            return;
        };
        // Out of the accept loop's reactor, into the worker's.
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => {
                tracing::debug!(error = %e, %peer, "cannot hand the connection over");
                return;
            }
        };
        queue.load.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot {
            _permit: permit,
            load: queue.load.clone(),
        });
        // Bounded: a worker that falls behind holds the accept loop back.
        let _ = queue.send.send(Accepted { tcp, peer, slot }).await;
    }
}

/// The worker threads, for waiting on them when the proxy stops.
pub(crate) struct Workers {
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    /// Starts `count` workers (at least one) for `shared`.
    pub(crate) fn start(shared: &Arc<Shared>, count: usize) -> Result<(Workers, Dispatch)> {
        let mut threads = Vec::new();
        let mut queues = Vec::new();
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| {
                    Error::new(
                        ErrorKind::Io,
                        format!("cannot start the proxy's worker {index}: {e}"),
                    )
                })?;
            let (send, receive) = mpsc::channel(256);
            let shared = shared.clone();
            let thread = std::thread::Builder::new()
                .name(format!("moat-proxy-{index}"))
                .spawn(move || {
                    INDEX.with(|i| i.set(Some(index)));
                    runtime.block_on(serve(shared, receive));
                    // A blocking task still running (none should be) is
                    // left to end on its own.
                    runtime.shutdown_timeout(Duration::from_secs(1));
                })
                .map_err(|e| {
                    Error::new(
                        ErrorKind::Io,
                        format!("cannot start the proxy's worker {index}: {e}"),
                    )
                })?;
            threads.push(thread);
            queues.push(Queue {
                send,
                load: Arc::new(AtomicUsize::new(0)),
            });
        }
        Ok((Workers { threads }, Dispatch { queues }))
    }

    /// Waits for every worker to end (after [`Dispatch`] was dropped).
    pub(crate) async fn join(self) {
        for thread in self.threads {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// A worker's life: serve what comes until the accept loop ends, then let
/// the connections it serves end (they are told to by the proxy's cancel).
async fn serve(shared: Arc<Shared>, mut queue: mpsc::Receiver<Accepted>) {
    while let Some(Accepted { tcp, peer, slot }) = queue.recv().await {
        match tokio::net::TcpStream::from_std(tcp) {
            Ok(tcp) => {
                shared
                    .tasks
                    .spawn(serve_client(tcp, peer, shared.clone(), slot));
            }
            Err(e) => tracing::debug!(error = %e, %peer, "cannot serve the connection"),
        }
    }
    // The tracker is shared by every worker, so this waits for the others'
    // connections too, which is harmless: they end on the same cancel.
    let _ = tokio::time::timeout(Duration::from_secs(5), shared.tasks.wait()).await;
}
