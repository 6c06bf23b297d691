//! The load generator: closed-loop workers over HTTP/1.1, keep-alive or a
//! new connection per request, bounded by a duration and a request count.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use serde::Serialize;

use crate::net::{self, Body, Endpoint, ProxyUrl, Result, Sender, Url};

/// What one load point does.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Concurrent workers (one connection each).
    pub concurrency: usize,
    /// Unmeasured time first (same load).
    pub warmup: Duration,
    /// Measured time.
    pub duration: Duration,
    /// Hard cap on requests (warm-up included).
    pub max_requests: u64,
    /// A new connection (TCP, CONNECT, TLS) for every request.
    pub new_conn: bool,
    /// Request method.
    pub method: Method,
    /// Request path.
    pub path: String,
    /// Request body size (zeros), 0 for none.
    pub body_bytes: u64,
    /// Per-request time limit.
    pub timeout: Duration,
}

/// The figures of one load point.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadResult {
    /// Completed requests in the measured window.
    pub requests: u64,
    /// Failed requests (connection errors, timeouts, non-2xx) in the window.
    pub errors: u64,
    /// The first error seen, if any.
    pub first_error: Option<String>,
    /// Measured seconds.
    pub duration_s: f64,
    /// Requests per second.
    pub rps: f64,
    /// Median latency.
    pub p50_ms: f64,
    /// 90th percentile latency.
    pub p90_ms: f64,
    /// 99th percentile latency.
    pub p99_ms: f64,
    /// Mean latency.
    pub mean_ms: f64,
    /// Worst latency.
    pub max_ms: f64,
    /// Response body bytes received in the window.
    pub bytes: u64,
}

/// A request body of `remaining` zero bytes, sent in 64 KiB frames.
#[derive(Debug)]
pub struct Zeros {
    remaining: u64,
    chunk: Bytes,
}

impl Zeros {
    /// `len` zero bytes.
    pub fn new(len: u64) -> Zeros {
        Zeros {
            remaining: len,
            chunk: Bytes::from(vec![0u8; 64 * 1024]),
        }
    }
}

impl HttpBody for Zeros {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(self.chunk.len() as u64);
        self.remaining -= n;
        let data = self.chunk.slice(..n as usize);
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

fn body_for(len: u64) -> Option<(Body, u64)> {
    (len > 0).then(|| (Zeros::new(len).boxed(), len))
}

/// Sends one request on `sender` and reads the whole response; returns the
/// body size. Non-2xx is an error.
pub async fn exchange(
    ep: &Endpoint,
    sender: &mut Sender,
    method: &Method,
    path: &str,
    body_bytes: u64,
    close: bool,
) -> Result<u64> {
    sender.ready().await?;
    let req = ep.request(method, path, body_for(body_bytes), close)?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            n += data.len() as u64;
        }
    }
    if !status.is_success() {
        return Err(format!("status {status}").into());
    }
    Ok(n)
}

/// Percentile `q` (0..1) of sorted microsecond samples, in ms.
pub fn percentile_ms(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

#[derive(Default)]
struct WorkerOut {
    lat_us: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
    bytes: u64,
}

async fn worker(
    ep: Arc<Endpoint>,
    spec: Arc<LoadSpec>,
    measure_from: Instant,
    end: Instant,
    budget: Arc<AtomicU64>,
) -> WorkerOut {
    let mut out = WorkerOut::default();
    let mut kept: Option<Sender> = None;
    loop {
        if Instant::now() >= end || budget.fetch_add(1, Ordering::Relaxed) >= spec.max_requests {
            break;
        }
        // Keep-alive: (re)connect outside the timed part.
        if !spec.new_conn {
            let usable = match kept.as_mut() {
                Some(s) => s.ready().await.is_ok(),
                None => false,
            };
            if !usable {
                kept = None;
                match tokio::time::timeout(spec.timeout, ep.open()).await {
                    Ok(Ok(s)) => kept = Some(s),
                    Ok(Err(e)) => {
                        note_error(&mut out, measure_from, e.to_string());
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    Err(_) => {
                        note_error(&mut out, measure_from, "connect timed out".into());
                        continue;
                    }
                }
            }
        }
        let t0 = Instant::now();
        let attempt = async {
            let mut sender = match kept.take() {
                Some(s) => s,
                None => ep.open().await?,
            };
            let n = exchange(
                &ep,
                &mut sender,
                &spec.method,
                &spec.path,
                spec.body_bytes,
                spec.new_conn,
            )
            .await?;
            Ok::<_, net::BoxError>((sender, n))
        };
        let result = tokio::time::timeout(spec.timeout, attempt).await;
        let micros = t0.elapsed().as_micros() as u64;
        match result {
            Ok(Ok((sender, n))) => {
                if !spec.new_conn {
                    kept = Some(sender);
                }
                if t0 >= measure_from {
                    out.lat_us.push(micros);
                    out.bytes += n;
                }
            }
            Ok(Err(e)) => {
                if t0 >= measure_from {
                    note_error(&mut out, measure_from, e.to_string());
                }
            }
            Err(_) => {
                if t0 >= measure_from {
                    note_error(&mut out, measure_from, "request timed out".into());
                }
            }
        }
    }
    out
}

fn note_error(out: &mut WorkerOut, measure_from: Instant, msg: String) {
    if Instant::now() < measure_from {
        return;
    }
    out.errors += 1;
    if out.first_error.is_none() {
        out.first_error = Some(msg);
    }
}

/// Runs one load point against `ep`.
pub async fn run(ep: Endpoint, spec: LoadSpec) -> LoadResult {
    let ep = Arc::new(ep);
    let spec = Arc::new(spec);
    let start = Instant::now();
    let measure_from = start + spec.warmup;
    let end = measure_from + spec.duration;
    let budget = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..spec.concurrency.max(1))
        .map(|_| {
            tokio::spawn(worker(
                ep.clone(),
                spec.clone(),
                measure_from,
                end,
                budget.clone(),
            ))
        })
        .collect();
    let mut all = WorkerOut::default();
    for t in tasks {
        match t.await {
            Ok(w) => {
                all.lat_us.extend(w.lat_us);
                all.errors += w.errors;
                all.bytes += w.bytes;
                if all.first_error.is_none() {
                    all.first_error = w.first_error;
                }
            }
            Err(e) => {
                all.errors += 1;
                all.first_error.get_or_insert(format!("worker failed: {e}"));
            }
        }
    }
    // The window ends when the last request started in it completes.
    let measured = Instant::now().saturating_duration_since(measure_from);
    summarize(all.lat_us, all.errors, all.first_error, all.bytes, measured)
}

fn summarize(
    mut lat_us: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
    bytes: u64,
    measured: Duration,
) -> LoadResult {
    lat_us.sort_unstable();
    let n = lat_us.len() as u64;
    let secs = measured.as_secs_f64().max(1e-9);
    let mean_ms = if n == 0 {
        f64::NAN
    } else {
        lat_us.iter().sum::<u64>() as f64 / n as f64 / 1000.0
    };
    LoadResult {
        requests: n,
        errors,
        first_error,
        duration_s: secs,
        rps: n as f64 / secs,
        p50_ms: percentile_ms(&lat_us, 0.50),
        p90_ms: percentile_ms(&lat_us, 0.90),
        p99_ms: percentile_ms(&lat_us, 0.99),
        mean_ms,
        max_ms: lat_us.last().map_or(f64::NAN, |v| *v as f64 / 1000.0),
        bytes,
    }
}

/// Times TCP connect (+ CONNECT) + TLS handshake to `ep`, then closes.
pub async fn handshake_time(ep: &Endpoint, timeout: Duration) -> Result<Duration> {
    let t0 = Instant::now();
    let stream = tokio::time::timeout(timeout, ep.open_stream())
        .await
        .map_err(|_| "handshake timed out")??;
    let dt = t0.elapsed();
    drop(stream);
    Ok(dt)
}

/// One large transfer on a fresh keep-alive connection (set up outside the
/// timing): a GET of `path` (download) or a POST of `upload` zero bytes.
/// Returns (bytes moved, seconds).
pub async fn transfer(
    ep: &Endpoint,
    path: &str,
    upload: u64,
    timeout: Duration,
) -> Result<(u64, f64)> {
    let mut sender = ep.open().await?;
    sender.ready().await?;
    let method = if upload > 0 {
        Method::POST
    } else {
        Method::GET
    };
    let t0 = Instant::now();
    let got = tokio::time::timeout(
        timeout,
        exchange(ep, &mut sender, &method, path, upload, false),
    )
    .await
    .map_err(|_| "transfer timed out")??;
    let secs = t0.elapsed().as_secs_f64();
    Ok((if upload > 0 { upload } else { got }, secs))
}

/// `moat-bench load`: one load point, JSON on stdout.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// `direct` (to the server) or `proxy` (through --proxy).
    #[arg(long, value_parser = ["direct", "proxy"])]
    pub mode: String,
    /// The URL to request (http:// or https://).
    #[arg(long)]
    pub url: String,
    /// The proxy URL (http://[user:token@]127.0.0.1:PORT), for mode proxy.
    #[arg(long)]
    pub proxy: Option<String>,
    /// The CA to trust for TLS: the server's (direct) or the proxy's
    /// (intercepted).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// host:port=127.0.0.1:port, for mode direct (no DNS lookups).
    #[arg(long)]
    pub resolve: Vec<String>,
    /// Concurrent connections.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Unmeasured warm-up seconds before.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Cap on requests (warm-up included).
    #[arg(long, default_value_t = 5_000_000)]
    pub requests: u64,
    /// A new connection for every request (default: keep-alive).
    #[arg(long)]
    pub new_conn: bool,
    /// Let the client resume TLS sessions (off: every handshake is full).
    #[arg(long)]
    pub resume: bool,
    /// Request body bytes (POST of zeros); 0 sends GET.
    #[arg(long, default_value_t = 0)]
    pub body_bytes: u64,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
}

/// Builds the endpoint `args` describe.
pub fn endpoint_from(
    url: &Url,
    mode: &str,
    proxy: Option<&str>,
    ca: Option<&std::path::Path>,
    resolve: &[String],
    resume: bool,
) -> Result<Endpoint> {
    let mut map = HashMap::new();
    for r in resolve {
        let (k, v) = net::parse_resolve(r)?;
        map.insert(k, v);
    }
    let proxy = match mode {
        "proxy" => Some(ProxyUrl::parse(proxy.ok_or("mode proxy needs --proxy")?)?),
        _ => None,
    };
    Endpoint::new(url, proxy, &map, ca, resume)
}

/// Runs `moat-bench load`.
pub async fn main(args: LoadArgs) -> Result<()> {
    let url = Url::parse(&args.url)?;
    let ep = endpoint_from(
        &url,
        &args.mode,
        args.proxy.as_deref(),
        args.ca.as_deref(),
        &args.resolve,
        args.resume,
    )?;
    let spec = LoadSpec {
        concurrency: args.concurrency,
        warmup: Duration::from_secs_f64(args.warmup),
        duration: Duration::from_secs_f64(args.duration.min(600.0)),
        max_requests: args.requests,
        new_conn: args.new_conn,
        method: if args.body_bytes > 0 {
            Method::POST
        } else {
            Method::GET
        },
        path: url.path.clone(),
        body_bytes: args.body_bytes,
        timeout: Duration::from_secs_f64(args.timeout),
    };
    let result = run(ep, spec).await;
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}
