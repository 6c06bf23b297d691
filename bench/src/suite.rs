//! `moat-bench suite`: every measurement in one run, written as Markdown.
//!
//! nginx (plain HTTP and HTTPS, started by `scripts/bench.sh`) is the
//! origin. This command starts the upload sink, the moat proxy (as
//! `moat-bench proxy`, a separate process) and mitmdump, drives the load
//! from this process, and reads the proxies' CPU time and memory from /proc.
//! Every host name is `*.bench.test`, mapped to 127.0.0.1 on the same port
//! (moat: `--resolve`; mitmproxy: `bench/mitm_resolve.py`).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::load::{self, LoadResult, LoadSpec};
use crate::net::{Endpoint, ProxyUrl, Result, Url};
use crate::procfs;

/// Arguments of `moat-bench suite` (a later option overrides an earlier).
#[derive(Debug, clap::Args)]
#[command(args_override_self = true)]
pub struct SuiteArgs {
    /// Working directory (moat home, mitmproxy confdir, logs).
    #[arg(long)]
    pub work: PathBuf,
    /// The test CA that signed the origin certificates (PEM).
    #[arg(long)]
    pub upstream_ca: PathBuf,
    /// Certificate for `*.bench.test` (PEM), for the upload sink.
    #[arg(long)]
    pub cert: PathBuf,
    /// Its key (PEM).
    #[arg(long)]
    pub key: PathBuf,
    /// nginx plain HTTP.
    #[arg(long, default_value = "127.0.0.1:18080")]
    pub nginx_http: SocketAddr,
    /// nginx HTTPS.
    #[arg(long, default_value = "127.0.0.1:18443")]
    pub nginx_https: SocketAddr,
    /// nginx as a reverse proxy to its own plain HTTP server (keep-alive
    /// upstream connections): a reference for what a proxy costs here.
    #[arg(long)]
    pub nginx_reverse: Option<SocketAddr>,
    /// The upload sink (started here).
    #[arg(long, default_value = "127.0.0.1:18444")]
    pub sink: SocketAddr,
    /// The nginx master's pid (its CPU and its workers' count as the
    /// benchmark's own, not as background load).
    #[arg(long)]
    pub nginx_pid: Option<u32>,
    /// Before each measurement, wait (up to this many seconds over the whole
    /// run) while other processes keep the machine busy.
    #[arg(long, default_value_t = 180.0)]
    pub quiet_wait: f64,
    /// mitmdump's listen address.
    #[arg(long, default_value = "127.0.0.1:18101")]
    pub mitm_listen: SocketAddr,
    /// The mitmdump executable.
    #[arg(long)]
    pub mitmdump: PathBuf,
    /// The mitmproxy addon mapping `*.bench.test` to 127.0.0.1.
    #[arg(long)]
    pub mitm_addon: PathBuf,
    /// Measured seconds per load point.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Warm-up seconds before each load point.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// New host names for the leaf-minting test.
    #[arg(long, default_value_t = 1000)]
    pub hosts: usize,
    /// Idle intercepted connections for the memory test.
    #[arg(long, default_value_t = 1000)]
    pub idle_conns: usize,
    /// MiB moved each way in the streaming test (nginx serves /big of
    /// this size).
    #[arg(long, default_value_t = 1024)]
    pub stream_mib: u64,
    /// Where to write the Markdown report.
    #[arg(long)]
    pub out: PathBuf,
    /// The command line to record in the report.
    #[arg(long, default_value = "scripts/bench.sh")]
    pub command: String,
    /// The date to record.
    #[arg(long, default_value = "")]
    pub date: String,
    /// `name: value` lines about the machine and versions, for the report.
    #[arg(long)]
    pub info: Vec<String>,
}

const PLAIN: &str = "plain.bench.test";
const TLS: &str = "tls.bench.test";
const SINK: &str = "sink.bench.test";
const ONCE: &str = "once.bench.test";
const CREDENTIAL: &str = "authorization=Bearer bench-not-a-secret";

/// A moat proxy child process.
struct MoatProc {
    child: Child,
    pid: u32,
    url: String,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    ca: PathBuf,
}

impl MoatProc {
    async fn start(a: &SuiteArgs) -> Result<MoatProc> {
        let exe = std::env::current_exe()?;
        let home = a.work.join("moat-home");
        let https_port = a.nginx_https.port();
        let mut cmd = Command::new(exe);
        cmd.arg("proxy")
            .args(["--listen", "127.0.0.1:0", "--home"])
            .arg(&home)
            .arg("--upstream-ca")
            .arg(&a.upstream_ca)
            .args(["--numbered", &a.hosts.to_string()]);
        for (host, port) in [
            (PLAIN, a.nginx_http.port()),
            (TLS, https_port),
            (ONCE, https_port),
            (SINK, a.sink.port()),
            ("h{n}.bench.test", https_port),
        ] {
            cmd.arg("--resolve")
                .arg(format!("{host}:{port}=127.0.0.1:{port}"));
        }
        cmd.arg("--credential")
            .arg(format!("*.bench.test:{https_port}={CREDENTIAL}"));
        cmd.arg("--credential")
            .arg(format!("*.bench.test:{}={CREDENTIAL}", a.sink.port()));
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let pid = child.id().ok_or("moat proxy exited at once")?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
        let url = tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
            .await
            .map_err(|_| "moat proxy did not print its URL in 30 s")??
            .ok_or("moat proxy exited before printing its URL")?;
        Ok(MoatProc {
            child,
            pid,
            url,
            stdin,
            stdout,
            ca: home.join("proxy").join("ca").join("ca.crt"),
        })
    }

    async fn stats(&mut self) -> Result<serde_json::Value> {
        self.stdin.write_all(b"stats\n").await?;
        self.stdin.flush().await?;
        let line = tokio::time::timeout(Duration::from_secs(10), self.stdout.next_line())
            .await
            .map_err(|_| "no stats from the moat proxy")??
            .ok_or("moat proxy closed its stdout")?;
        Ok(serde_json::from_str(&line)?)
    }

    async fn mint_count(&mut self) -> Result<u64> {
        self.stats()
            .await?
            .get("mint_count")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| "no mint_count in the stats".into())
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// A mitmdump child process.
struct MitmProc {
    child: Child,
    pid: u32,
    url: String,
    ca: PathBuf,
}

impl MitmProc {
    async fn start(a: &SuiteArgs) -> Result<MitmProc> {
        let confdir = a.work.join("mitmproxy");
        std::fs::create_dir_all(&confdir)?;
        let log = std::fs::File::create(a.work.join("mitmdump.log"))?;
        let mut cmd = Command::new(&a.mitmdump);
        cmd.arg("-q")
            .args(["--listen-host", &a.mitm_listen.ip().to_string()])
            .args(["--listen-port", &a.mitm_listen.port().to_string()])
            .arg("--set")
            .arg(format!("confdir={}", confdir.display()))
            .arg("--set")
            .arg(format!(
                "ssl_verify_upstream_trusted_ca={}",
                a.upstream_ca.display()
            ))
            .arg("-s")
            .arg(&a.mitm_addon)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let pid = child.id().ok_or("mitmdump exited at once")?;
        let ca = confdir.join("mitmproxy-ca-cert.pem");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "mitmdump exited ({status}); see {}",
                    a.work.join("mitmdump.log").display()
                )
                .into());
            }
            if ca.exists() && tokio::net::TcpStream::connect(a.mitm_listen).await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                return Err("mitmdump did not start listening in 60 s".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(MitmProc {
            child,
            pid,
            url: format!("http://{}", a.mitm_listen),
            ca,
        })
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Which way a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Direct,
    Moat,
    Mitm,
    /// nginx as a reverse proxy (plain HTTP only).
    Nginx,
}

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Moat => "moat",
            Route::Mitm => "mitmproxy",
            Route::Nginx => "nginx reverse proxy",
        }
    }
}

/// One goal and how it came out.
struct Goal {
    what: String,
    goal: String,
    measured: String,
    met: bool,
    /// Other processes used more than 0.3 cores during a measurement it
    /// rests on.
    noisy: bool,
}

/// Other CPU above this during a measurement makes it suspect.
const BUSY: f64 = 0.3;

fn busy(other: f64) -> bool {
    other.is_finite() && other > BUSY
}

struct Ctx<'a> {
    a: &'a SuiteArgs,
    moat: Option<MoatProc>,
    mitm: Option<MitmProc>,
    md: String,
    goals: Vec<Goal>,
    /// Lines comparing moat with a peer, under the goals.
    peers: Vec<String>,
    tick: f64,
    sink_pid: Option<u32>,
    quiet_left: std::cell::Cell<f64>,
    waited: std::cell::Cell<f64>,
    busy_points: std::cell::Cell<u32>,
    retries: std::cell::Cell<u32>,
}

/// CPU time at the start of a window: the machine's, the benchmark's own
/// processes', the proxy's and this process's.
struct CpuWindow {
    t0: Instant,
    sys: Option<(u64, u64)>,
    known: u64,
    proxy: Option<u64>,
    client: Option<u64>,
}

/// Cores used over a window.
struct CpuUse {
    proxy: Option<f64>,
    client: f64,
    /// Everything not part of the benchmark (other builds on the machine).
    other: f64,
}

/// A load point's figures with the CPU the proxy and the client used.
struct Point {
    r: LoadResult,
    proxy_cores: Option<f64>,
    client_cores: f64,
    other_cores: f64,
}

fn f2(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}")
    } else {
        "n/a".into()
    }
}

fn f0(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.0}")
    } else {
        "n/a".into()
    }
}

fn yes(met: bool) -> &'static str {
    if met {
        "**met**"
    } else {
        "**missed**"
    }
}

fn stderr_line(msg: &str) {
    eprintln!("[bench] {msg}");
}

impl Ctx<'_> {
    fn origin(&self, host: &str, https: bool, path: &str) -> Url {
        let port = if https {
            self.a.nginx_https.port()
        } else {
            self.a.nginx_http.port()
        };
        Url {
            https,
            host: host.into(),
            port,
            path: path.into(),
        }
    }

    fn resolve_map(&self) -> std::collections::HashMap<(String, u16), SocketAddr> {
        let mut m = std::collections::HashMap::new();
        m.insert(
            (PLAIN.to_string(), self.a.nginx_http.port()),
            self.a.nginx_http,
        );
        m.insert(
            (TLS.to_string(), self.a.nginx_https.port()),
            self.a.nginx_https,
        );
        m.insert((SINK.to_string(), self.a.sink.port()), self.a.sink);
        m
    }

    fn endpoint(&self, route: Route, url: &Url, resume: bool) -> Result<Endpoint> {
        let (proxy, ca) = match route {
            Route::Direct => (None, self.a.upstream_ca.clone()),
            Route::Moat => {
                let m = self.moat.as_ref().ok_or("moat is not running")?;
                (Some(ProxyUrl::parse(&m.url)?), m.ca.clone())
            }
            Route::Mitm => {
                let m = self.mitm.as_ref().ok_or("mitmproxy is not running")?;
                (Some(ProxyUrl::parse(&m.url)?), m.ca.clone())
            }
            Route::Nginx => {
                // The same URL, its host resolved to nginx's proxying port.
                let reverse = self.a.nginx_reverse.ok_or("no --nginx-reverse")?;
                let mut map = self.resolve_map();
                map.insert((PLAIN.to_string(), self.a.nginx_http.port()), reverse);
                return Endpoint::new(url, None, &map, Some(&self.a.upstream_ca), resume);
            }
        };
        Endpoint::new(url, proxy, &self.resolve_map(), Some(&ca), resume)
    }

    fn proxy_pid(&self, route: Route) -> Option<u32> {
        match route {
            Route::Direct => None,
            Route::Moat => self.moat.as_ref().map(|m| m.pid),
            Route::Mitm => self.mitm.as_ref().map(|m| m.pid),
            // Its CPU is counted with the server's (the same workers).
            Route::Nginx => None,
        }
    }

    fn spec(&self, concurrency: usize, new_conn: bool, path: &str) -> LoadSpec {
        LoadSpec {
            concurrency,
            warmup: Duration::from_secs_f64(self.a.warmup),
            duration: Duration::from_secs_f64(self.a.duration),
            max_requests: 5_000_000,
            new_conn,
            method: Method::GET,
            path: path.into(),
            body_bytes: 0,
            timeout: Duration::from_secs(10),
        }
    }

    fn known_pids(&self) -> Vec<u32> {
        let mut pids = vec![std::process::id()];
        pids.extend(self.moat.as_ref().map(|m| m.pid));
        pids.extend(self.mitm.as_ref().map(|m| m.pid));
        pids.extend(self.sink_pid);
        if let Some(n) = self.a.nginx_pid {
            pids.push(n);
            pids.extend(procfs::children(n));
        }
        pids
    }

    fn cpu_start(&self, proxy: Option<u32>) -> CpuWindow {
        CpuWindow {
            t0: Instant::now(),
            sys: procfs::system_ticks(),
            known: self
                .known_pids()
                .into_iter()
                .filter_map(procfs::cpu_ticks)
                .sum(),
            proxy: proxy.and_then(procfs::cpu_ticks),
            client: procfs::cpu_ticks(std::process::id()),
        }
    }

    fn cpu_end(&self, w: CpuWindow, proxy: Option<u32>) -> CpuUse {
        let wall = w.t0.elapsed().as_secs_f64().max(1e-6);
        let cores = |ticks: u64| ticks as f64 / self.tick / wall;
        let delta = |before: Option<u64>, after: Option<u64>| match (before, after) {
            (Some(b), Some(a)) => Some(cores(a.saturating_sub(b))),
            _ => None,
        };
        let known: u64 = self
            .known_pids()
            .into_iter()
            .filter_map(procfs::cpu_ticks)
            .sum();
        let other = match (w.sys, procfs::system_ticks()) {
            (Some((b0, _)), Some((b1, _))) => {
                let busy = b1.saturating_sub(b0) as f64;
                let ours = known.saturating_sub(w.known) as f64;
                ((busy - ours) / self.tick / wall).max(0.0)
            }
            _ => f64::NAN,
        };
        CpuUse {
            proxy: delta(w.proxy, proxy.and_then(procfs::cpu_ticks)),
            client: delta(w.client, procfs::cpu_ticks(std::process::id())).unwrap_or(f64::NAN),
            other,
        }
    }

    /// Waits while other processes (builds) keep the machine busy, within
    /// the run's waiting budget.
    async fn wait_quiet(&self) {
        loop {
            let w = self.cpu_start(None);
            tokio::time::sleep(Duration::from_millis(500)).await;
            let other = self.cpu_end(w, None).other;
            let busy = busy(other);
            if !busy || self.quiet_left.get() <= 0.0 {
                if busy {
                    self.busy_points.set(self.busy_points.get() + 1);
                }
                return;
            }
            self.quiet_left.set(self.quiet_left.get() - 0.5);
            self.waited.set(self.waited.get() + 0.5);
        }
    }

    /// One load point; measured again (at most twice more, within the
    /// waiting budget) when other processes were busy during it.
    async fn point(&self, route: Route, ep: Endpoint, spec: LoadSpec) -> Point {
        let pid = self.proxy_pid(route);
        let mut attempt = 0;
        let (r, cpu) = loop {
            attempt += 1;
            self.wait_quiet().await;
            let w = self.cpu_start(pid);
            let r = load::run(ep.clone(), spec.clone()).await;
            let cpu = self.cpu_end(w, pid);
            if busy(cpu.other) && attempt < 3 && self.quiet_left.get() > 0.0 {
                stderr_line(&format!(
                    "  other processes used {} cores during the measurement; measuring again",
                    f2(cpu.other)
                ));
                self.retries.set(self.retries.get() + 1);
                continue;
            }
            break (r, cpu);
        };
        if r.errors > 0 {
            stderr_line(&format!(
                "  {}: {} errors, first: {}",
                route.name(),
                r.errors,
                r.first_error.as_deref().unwrap_or("?")
            ));
        }
        Point {
            r,
            proxy_cores: cpu.proxy,
            client_cores: cpu.client,
            other_cores: cpu.other,
        }
    }

    fn goal(
        &mut self,
        what: impl Into<String>,
        goal: impl Into<String>,
        measured: String,
        met: bool,
        noisy: bool,
    ) {
        self.goals.push(Goal {
            what: what.into(),
            goal: goal.into(),
            measured,
            met,
            noisy,
        });
    }

    fn routes(&self) -> Vec<Route> {
        let mut r = vec![Route::Direct, Route::Moat];
        if self.mitm.is_some() {
            r.push(Route::Mitm);
        }
        r
    }

    fn table_head(&mut self) {
        self.md.push_str(
            "| route | conc. | req/s | p50 ms | p99 ms | errors | proxy CPU (cores) | client CPU (cores) | other CPU (cores) | req/s vs direct |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
    }

    fn table_row(&mut self, route: Route, conc: usize, p: &Point, direct_rps: f64) {
        let _ = writeln!(
            self.md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            route.name(),
            conc,
            f0(p.r.rps),
            f2(p.r.p50_ms),
            f2(p.r.p99_ms),
            p.r.errors,
            p.proxy_cores.map_or("-".into(), f2),
            f2(p.client_cores),
            f2(p.other_cores),
            if route == Route::Direct {
                "1.00".into()
            } else {
                f2(p.r.rps / direct_rps)
            }
        );
    }

    /// Checks that moat injects the credential on the HTTPS route (nginx
    /// echoes the header at /headers), so the figures include injection.
    async fn check_injection(&mut self) {
        let url = self.origin(TLS, true, "/headers");
        let result = async {
            let ep = self.endpoint(Route::Moat, &url, false)?;
            let mut s = ep.open().await?;
            s.ready().await?;
            let resp = s
                .send_request(ep.request(&Method::GET, "/headers", None, false)?)
                .await?;
            let body = http_body_util::BodyExt::collect(resp.into_body())
                .await?
                .to_bytes();
            Ok::<_, crate::net::BoxError>(String::from_utf8_lossy(&body).into_owned())
        }
        .await;
        let want = CREDENTIAL.split_once('=').map_or("", |(_, v)| v);
        let line = match result {
            Ok(body) if body.contains(want) => {
                "Credential injection checked: nginx saw moat's injected `authorization` header on the intercepted HTTPS route.".to_string()
            }
            Ok(body) => format!(
                "WARNING: moat did not inject the credential (nginx saw: {:?}).",
                body.trim()
            ),
            Err(e) => format!("WARNING: the injection check failed: {e}"),
        };
        stderr_line(&line);
        let _ = writeln!(self.md, "\n{line}");
    }

    /// Plain HTTP at concurrency 1, 16, 64.
    async fn plain_http(&mut self) -> Result<()> {
        self.md
            .push_str("\n## Plain HTTP (keep-alive, 1 KiB response)\n\n");
        let _ = writeln!(
            self.md,
            "GET `http://{PLAIN}:{}/small`; through a proxy as an absolute-form request.\n",
            self.a.nginx_http.port()
        );
        if self.a.nginx_reverse.is_some() {
            self.md.push_str(
                "nginx reverse proxy: the same nginx proxying to its own plain HTTP server over keep-alive connections, a reference for what a proxy costs on this machine (its CPU is in the server's, so not shown).\n\n",
            );
        }
        self.table_head();
        let mut routes = self.routes();
        if self.a.nginx_reverse.is_some() {
            routes.push(Route::Nginx);
        }
        for conc in [1usize, 16, 64] {
            let mut direct = f64::NAN;
            let mut direct_other = f64::NAN;
            let mut moat = f64::NAN;
            for route in routes.iter().copied() {
                stderr_line(&format!("plain http c{conc} {}", route.name()));
                let url = self.origin(PLAIN, false, "/small");
                let ep = self.endpoint(route, &url, false)?;
                let p = self
                    .point(route, ep, self.spec(conc, false, "/small"))
                    .await;
                if route == Route::Direct {
                    direct = p.r.rps;
                    direct_other = p.other_cores;
                }
                self.table_row(route, conc, &p, direct);
                if route == Route::Moat {
                    moat = p.r.rps;
                    let ratio = p.r.rps / direct;
                    self.goal(
                        format!("plain HTTP c{conc}: moat req/s / direct"),
                        ">= 0.6",
                        f2(ratio),
                        ratio >= 0.6,
                        busy(direct_other) || busy(p.other_cores),
                    );
                }
                if route == Route::Nginx {
                    self.peers.push(format!(
                        "plain HTTP c{conc}: nginx reverse proxy {} of direct, moat {} (moat ÷ nginx {})",
                        f2(p.r.rps / direct),
                        f2(moat / direct),
                        f2(moat / p.r.rps)
                    ));
                }
            }
        }
        Ok(())
    }

    /// HTTPS, intercepted, keep-alive, concurrency 16.
    async fn https_keepalive(&mut self) -> Result<()> {
        let conc = 16;
        self.md
            .push_str("\n## HTTPS intercepted, keep-alive, concurrency 16 (1 KiB response)\n\n");
        let _ = writeln!(
            self.md,
            "GET `https://{TLS}:{}/small` over HTTP/1.1; through a proxy: CONNECT, TLS to the proxy's leaf, the proxy re-encrypts to nginx. moat injects a credential header on every request.\n",
            self.a.nginx_https.port()
        );
        self.table_head();
        let mut direct: Option<(LoadResult, f64)> = None;
        let mut moat: Option<(LoadResult, f64)> = None;
        let mut mitm: Option<(LoadResult, f64)> = None;
        for route in self.routes() {
            stderr_line(&format!("https keep-alive c{conc} {}", route.name()));
            let url = self.origin(TLS, true, "/small");
            let ep = self.endpoint(route, &url, false)?;
            let p = self
                .point(route, ep, self.spec(conc, false, "/small"))
                .await;
            let d_rps = direct.as_ref().map_or(p.r.rps, |d| d.0.rps);
            self.table_row(route, conc, &p, d_rps);
            let kept = Some((p.r, p.other_cores));
            match route {
                Route::Direct => direct = kept,
                Route::Moat => moat = kept,
                Route::Mitm => mitm = kept,
                Route::Nginx => {}
            }
        }
        if let (Some((d, d_o)), Some((m, m_o))) = (&direct, &moat) {
            let ratio = m.rps / d.rps;
            let added = m.p99_ms - d.p99_ms;
            let noisy = busy(*d_o) || busy(*m_o);
            self.goal(
                "HTTPS c16: moat req/s / direct TLS",
                ">= 0.5",
                f2(ratio),
                ratio >= 0.5,
                noisy,
            );
            self.goal(
                "HTTPS c16: added p99 (moat − direct)",
                "<= 2 ms",
                format!("{} ms", f2(added)),
                added <= 2.0,
                noisy,
            );
        }
        if let (Some((m, m_o)), Some((x, x_o))) = (&moat, &mitm) {
            let ratio = m.rps / x.rps;
            self.goal(
                "HTTPS c16: moat req/s / mitmproxy req/s",
                ">= 20",
                f2(ratio),
                ratio >= 20.0,
                busy(*m_o) || busy(*x_o),
            );
        }
        Ok(())
    }

    /// A new TLS connection for every request, concurrency 1.
    async fn new_connections(&mut self) -> Result<()> {
        self.md
            .push_str("\n## A new TLS connection per request (concurrency 1)\n\n");
        self.md.push_str(
            "Each request: TCP connect (+ CONNECT through a proxy), a full TLS handshake (client session resumption off), GET /small, close. The time is the whole of it.\n\n",
        );
        self.table_head();
        let mut direct: Option<(LoadResult, f64)> = None;
        for route in self.routes() {
            stderr_line(&format!("new TLS connection per request {}", route.name()));
            let url = self.origin(TLS, true, "/small");
            let ep = self.endpoint(route, &url, false)?;
            let p = self.point(route, ep, self.spec(1, true, "/small")).await;
            let d_rps = direct.as_ref().map_or(p.r.rps, |d| d.0.rps);
            self.table_row(route, 1, &p, d_rps);
            match route {
                Route::Direct => direct = Some((p.r, p.other_cores)),
                Route::Moat => {
                    if let Some((d, d_o)) = &direct {
                        let added = p.r.p50_ms - d.p50_ms;
                        let noisy = busy(*d_o) || busy(p.other_cores);
                        self.goal(
                            "new TLS connection per request: added p50 (moat − direct)",
                            "<= 1 ms",
                            format!("{} ms", f2(added)),
                            added <= 1.0,
                            noisy,
                        );
                    }
                }
                Route::Mitm | Route::Nginx => {}
            }
        }
        // The same with client session resumption allowed: does a proxy let
        // a client resume?
        self.md.push_str("\nThe same with the client allowed to resume TLS sessions (rustls client cache; a server that supports resumption skips the certificate and signature):\n\n");
        self.table_head();
        let mut direct_rps = f64::NAN;
        for route in [Route::Direct, Route::Moat] {
            stderr_line(&format!(
                "new TLS connection per request, resumption allowed, {}",
                route.name()
            ));
            let url = self.origin(TLS, true, "/small");
            let ep = self.endpoint(route, &url, true)?;
            let resumed = count_resumptions(&ep).await;
            let p = self.point(route, ep, self.spec(1, true, "/small")).await;
            if route == Route::Direct {
                direct_rps = p.r.rps;
            }
            self.table_row(route, 1, &p, direct_rps);
            let _ = writeln!(
                self.md,
                "| {} resumed sessions | | {resumed} of 20 handshakes after a first one | | | | | | | |",
                route.name()
            );
        }
        Ok(())
    }

    /// Leaf minting: the first connection to each of N new host names.
    async fn leaf_minting(&mut self) -> Result<()> {
        let n = self.a.hosts;
        self.md
            .push_str("\n## Leaf minting: first connection to new host names (moat)\n\n");
        let _ = writeln!(
            self.md,
            "For i in 0..{n}: time TCP connect + CONNECT + TLS handshake to `h{{i:04}}.bench.test` (never seen: moat mints a P-256 leaf), then the same to `{TLS}` (warm: cached leaf). No request is sent, so nothing goes upstream. Mint time ≈ new − warm.\n"
        );
        let url = self.origin(TLS, true, "/");
        let warm_ep = self.endpoint(Route::Moat, &url, false)?;
        let moat = self.moat.as_mut().ok_or("moat is not running")?;
        let before = moat.mint_count().await?;
        let timeout = Duration::from_secs(10);
        let mut new_us = Vec::with_capacity(n);
        let mut warm_us = Vec::with_capacity(n);
        let mut diff_us: Vec<i64> = Vec::with_capacity(n);
        let mut failures = 0u64;
        stderr_line(&format!("leaf minting: {n} new host names"));
        self.wait_quiet().await;
        let moat_pid = self.proxy_pid(Route::Moat);
        let cpu_w = self.cpu_start(moat_pid);
        let t0 = Instant::now();
        for i in 0..n {
            let ep = warm_ep.with_host(&format!("h{i:04}.bench.test"));
            let new = load::handshake_time(&ep, timeout).await;
            let warm = load::handshake_time(&warm_ep, timeout).await;
            match (new, warm) {
                (Ok(a), Ok(b)) => {
                    new_us.push(a.as_micros() as u64);
                    warm_us.push(b.as_micros() as u64);
                    diff_us.push(a.as_micros() as i64 - b.as_micros() as i64);
                }
                _ => failures += 1,
            }
            if t0.elapsed() > Duration::from_secs(120) {
                stderr_line("leaf minting: stopped after 120 s");
                break;
            }
        }
        let cpu = self.cpu_end(cpu_w, moat_pid);
        let moat = self.moat.as_mut().ok_or("moat is not running")?;
        let after = moat.mint_count().await?;
        new_us.sort_unstable();
        warm_us.sort_unstable();
        diff_us.sort_unstable();
        let pct_i = |v: &[i64], q: f64| -> f64 {
            if v.is_empty() {
                return f64::NAN;
            }
            let rank = (q * v.len() as f64).ceil() as usize;
            v[rank.clamp(1, v.len()) - 1] as f64 / 1000.0
        };
        self.md.push_str("| connect + handshake | samples | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|\n");
        for (name, v) in [
            ("new host (mint)", &new_us),
            ("warm host (cached)", &warm_us),
        ] {
            let _ = writeln!(
                self.md,
                "| {name} | {} | {} | {} | {} |",
                v.len(),
                f2(load::percentile_ms(v, 0.5)),
                f2(load::percentile_ms(v, 0.99)),
                f2(v.last().map_or(f64::NAN, |x| *x as f64 / 1000.0))
            );
        }
        let _ = writeln!(
            self.md,
            "| paired difference new − warm | {} | {} | {} | {} |",
            diff_us.len(),
            f2(pct_i(&diff_us, 0.5)),
            f2(pct_i(&diff_us, 0.99)),
            f2(diff_us.last().map_or(f64::NAN, |x| *x as f64 / 1000.0))
        );
        let minted = after - before;
        let _ = writeln!(
            self.md,
            "\nFailures: {failures}. Leaves minted during the run (moat's `mint_count`): {minted} for {} new names. During the loop: moat CPU {} cores, client {} cores, other processes {} cores.\n",
            new_us.len() + failures as usize,
            cpu.proxy.map_or("-".into(), f2),
            f2(cpu.client),
            f2(cpu.other)
        );
        let mint_p99 = load::percentile_ms(&new_us, 0.99) - load::percentile_ms(&warm_us, 0.99);
        self.goal(
            format!("leaf minting, {n} new hosts: p99(new) − p99(warm)"),
            "<= 1 ms",
            format!("{} ms", f2(mint_p99)),
            mint_p99 <= 1.0,
            busy(cpu.other),
        );

        // 100 concurrent CONNECTs to one new host: one mint.
        stderr_line("leaf minting: 100 concurrent CONNECTs to one new host");
        let once = warm_ep.with_host(ONCE);
        let before = self.moat.as_mut().ok_or("moat")?.mint_count().await?;
        let ok = Arc::new(AtomicU64::new(0));
        let go = Arc::new(tokio::sync::Barrier::new(100));
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let ep = once.clone();
                let ok = ok.clone();
                let go = go.clone();
                tokio::spawn(async move {
                    go.wait().await;
                    if load::handshake_time(&ep, timeout).await.is_ok() {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
        let after = self.moat.as_mut().ok_or("moat")?.mint_count().await?;
        let ok = ok.load(Ordering::Relaxed);
        let _ = writeln!(
            self.md,
            "100 concurrent CONNECT + TLS handshakes to `{ONCE}` (new): {ok} succeeded, leaves minted: {}.\n",
            after - before
        );
        self.goal(
            "100 concurrent CONNECTs to one new host: mints",
            "exactly 1 (all 100 handshakes succeed)",
            format!("{} mint(s), {ok}/100 ok", after - before),
            after - before == 1 && ok == 100,
            false,
        );
        Ok(())
    }

    /// Memory per idle intercepted keep-alive connection, on fresh proxies.
    async fn idle_memory(&mut self) -> Result<()> {
        let n = self.a.idle_conns;
        self.md
            .push_str("\n## Memory per idle intercepted connection\n\n");
        let _ = writeln!(
            self.md,
            "On a freshly started proxy: one warm-up request, then VmRSS of the proxy process (from /proc) before and after opening {n} CONNECT + TLS keep-alive connections to `{TLS}`, each having made one GET /small (opened one after another, so moat's upstream pool stays at about one connection; mitmproxy opens one upstream connection per client connection). Then all are closed.\n"
        );
        self.md.push_str("| proxy | connections | RSS before KiB | RSS with connections KiB | per connection KiB | RSS 2 s after closing KiB | RSS with a second round open / closed KiB |\n|---|---:|---:|---:|---:|---:|---|\n");
        let mut routes = vec![Route::Moat];
        if self.mitm.is_some() {
            routes.push(Route::Mitm);
        }
        for route in routes {
            // Fresh process for each measurement.
            match route {
                Route::Moat => {
                    if let Some(m) = self.moat.take() {
                        m.stop().await;
                    }
                    self.moat = Some(MoatProc::start(self.a).await?);
                }
                Route::Mitm => {
                    if let Some(m) = self.mitm.take() {
                        m.stop().await;
                    }
                    self.mitm = Some(MitmProc::start(self.a).await?);
                }
                Route::Direct | Route::Nginx => {}
            }
            stderr_line(&format!(
                "idle memory: {n} connections through {}",
                route.name()
            ));
            let pid = self.proxy_pid(route).ok_or("no pid")?;
            let url = self.origin(TLS, true, "/small");
            let ep = self.endpoint(route, &url, false)?;
            {
                let mut s = ep.open().await?;
                for _ in 0..10 {
                    load::exchange(&ep, &mut s, &Method::GET, "/small", 0, false).await?;
                }
            }
            self.wait_quiet().await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let rss0 = procfs::rss_kib(pid).ok_or("no VmRSS")?;
            let (conns, failures) = open_idle(&ep, n).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let rss1 = procfs::rss_kib(pid).ok_or("no VmRSS")?;
            let open = conns.len();
            drop(conns);
            tokio::time::sleep(Duration::from_secs(2)).await;
            let rss2 = procfs::rss_kib(pid).ok_or("no VmRSS")?;
            // A second round: does closed connections' memory get reused?
            let (again, _) = open_idle(&ep, n).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let rss3 = procfs::rss_kib(pid).ok_or("no VmRSS")?;
            drop(again);
            tokio::time::sleep(Duration::from_secs(2)).await;
            let rss4 = procfs::rss_kib(pid).ok_or("no VmRSS")?;
            let per = (rss1 as f64 - rss0 as f64) / open.max(1) as f64;
            let _ = writeln!(
                self.md,
                "| {} | {open} (failed: {failures}) | {rss0} | {rss1} | {} | {rss2} | {rss3} / {rss4} |",
                route.name(),
                f2(per)
            );
            if route == Route::Moat {
                self.goal(
                    format!("memory per idle intercepted connection ({open} open)"),
                    "<= 100 KiB",
                    format!("{} KiB", f2(per)),
                    per <= 100.0 && failures == 0,
                    false,
                );
            }
        }
        Ok(())
    }

    /// Streaming a large body each way, direct and through moat: a
    /// warm-up transfer, then RUNS transfers per route, alternating.
    async fn streaming(&mut self) -> Result<()> {
        const RUNS: usize = 3;
        let mib = self.a.stream_mib;
        let bytes = mib * 1024 * 1024;
        if let Some(m) = self.moat.take() {
            m.stop().await;
        }
        self.moat = Some(MoatProc::start(self.a).await?);
        self.md
            .push_str("\n## Streaming (HTTPS, one connection, moat vs direct)\n\n");
        let _ = writeln!(
            self.md,
            "Download: GET `https://{TLS}:{}/big` ({mib} MiB file from nginx). Upload: POST of {mib} MiB of zeros to `https://{SINK}:{}/upload` (the bench's own sink, a separate process, reads the whole body before it answers). Each transfer on its own keep-alive connection opened before the clock starts. One unmeasured warm-up transfer each way, then {RUNS} runs per route, alternating direct and moat; the table gives the median run. moat: a freshly started process; its VmRSS is sampled every 50 ms over all its runs.\n",
            self.a.nginx_https.port(),
            self.a.sink.port()
        );
        self.md.push_str("| direction | route | MiB per run | median s | median MiB/s | all runs MiB/s | vs direct | proxy CPU (cores) | other CPU per run (cores) | proxy RSS start / max / end KiB |\n|---|---|---:|---:|---:|---|---:|---:|---|---|\n");
        let timeout = Duration::from_secs(180);
        for (dir, upload) in [("download", 0u64), ("upload", bytes)] {
            let url = if upload > 0 {
                Url {
                    https: true,
                    host: SINK.into(),
                    port: self.a.sink.port(),
                    path: "/upload".into(),
                }
            } else {
                self.origin(TLS, true, "/big")
            };
            let direct_ep = self.endpoint(Route::Direct, &url, false)?;
            let moat_ep = self.endpoint(Route::Moat, &url, false)?;
            let pid = self.proxy_pid(Route::Moat).ok_or("moat is not running")?;
            let rss_before_warmup = procfs::rss_kib(pid).unwrap_or(0);
            stderr_line(&format!("streaming {mib} MiB {dir}: warm-up"));
            let _ = load::transfer(&direct_ep, &url.path, upload, timeout).await;
            let _ = load::transfer(&moat_ep, &url.path, upload, timeout).await;
            let mut rates: [Vec<(f64, f64)>; 2] = [Vec::new(), Vec::new()];
            let mut errors: Vec<String> = Vec::new();
            let mut moved_all = true;
            let mut proxy_ticks = 0u64;
            let mut other: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
            let mut proxy_wall = 0.0f64;
            let sampler = RssSampler::start(pid);
            for run in 0..RUNS {
                for (i, (route, ep)) in [(Route::Direct, &direct_ep), (Route::Moat, &moat_ep)]
                    .into_iter()
                    .enumerate()
                {
                    stderr_line(&format!(
                        "streaming {mib} MiB {dir} {} run {}",
                        route.name(),
                        run + 1
                    ));
                    self.wait_quiet().await;
                    let p0 = procfs::cpu_ticks(pid);
                    let cpu_w = self.cpu_start(None);
                    let t0 = Instant::now();
                    let result = load::transfer(ep, &url.path, upload, timeout).await;
                    other[i].push(self.cpu_end(cpu_w, None).other);
                    if route == Route::Moat {
                        proxy_wall += t0.elapsed().as_secs_f64();
                        if let (Some(a), Some(b)) = (p0, procfs::cpu_ticks(pid)) {
                            proxy_ticks += b.saturating_sub(a);
                        }
                    }
                    match result {
                        Ok((moved, secs)) => {
                            moved_all &= moved == bytes;
                            rates[i].push((moved as f64 / 1048576.0 / secs, secs));
                        }
                        Err(e) => {
                            stderr_line(&format!("  failed: {e}"));
                            errors.push(format!("{} run {}: {e}", route.name(), run + 1));
                            moved_all = false;
                        }
                    }
                }
            }
            let rss = sampler.stop().await;
            let median = |v: &mut Vec<(f64, f64)>| -> (f64, f64) {
                v.sort_by(|a, b| a.0.total_cmp(&b.0));
                v.get(v.len() / 2).copied().unwrap_or((f64::NAN, f64::NAN))
            };
            let all = |v: &Vec<(f64, f64)>| -> String {
                v.iter().map(|r| f0(r.0)).collect::<Vec<_>>().join(", ")
            };
            let listed = [all(&rates[0]), all(&rates[1])];
            let others = |v: &Vec<f64>| -> String {
                v.iter().map(|x| f2(*x)).collect::<Vec<_>>().join(", ")
            };
            let other_listed = [others(&other[0]), others(&other[1])];
            let [mut d, mut m] = rates;
            let (d_rate, d_secs) = median(&mut d);
            let (m_rate, m_secs) = median(&mut m);
            let ratio = m_rate / d_rate;
            let _ = writeln!(
                self.md,
                "| {dir} | direct | {mib} | {} | {} | {} | 1.00 | - | {} | - |",
                f2(d_secs),
                f0(d_rate),
                listed[0],
                other_listed[0]
            );
            let _ = writeln!(
                self.md,
                "| {dir} | moat | {mib} | {} | {} | {} | {} | {} | {} | {} / {} / {} |",
                f2(m_secs),
                f0(m_rate),
                listed[1],
                f2(ratio),
                f2(proxy_ticks as f64 / self.tick / proxy_wall.max(1e-9)),
                other_listed[1],
                rss.start,
                rss.max,
                rss.end
            );
            let _ = writeln!(
                self.md,
                "| {dir} | moat RSS before its warm-up transfer | | | | | | | | {rss_before_warmup} KiB |"
            );
            for e in &errors {
                let _ = writeln!(self.md, "\nFailed: {e}\n");
            }
            self.goal(
                format!("streaming {mib} MiB {dir}: moat / direct throughput (median of {RUNS})"),
                ">= 0.7",
                f2(ratio),
                ratio >= 0.7 && moved_all,
                other.iter().flatten().any(|o| busy(*o)),
            );
            let growth = rss.max.saturating_sub(rss.start);
            self.goal(
                format!(
                    "streaming {mib} MiB {dir}: proxy RSS growth over {RUNS} runs (max − start)"
                ),
                "flat: <= 16 MiB",
                format!("{growth} KiB"),
                growth <= 16 * 1024,
                false,
            );
        }
        Ok(())
    }
}

/// Opens `n` intercepted keep-alive connections one after another, each
/// making one GET /small; returns them and the number that failed.
async fn open_idle(ep: &Endpoint, n: usize) -> (Vec<crate::net::Sender>, usize) {
    let mut conns = Vec::with_capacity(n);
    let mut failures = 0;
    let t0 = Instant::now();
    for _ in 0..n {
        let r = tokio::time::timeout(Duration::from_secs(10), async {
            let mut s = ep.open().await?;
            load::exchange(ep, &mut s, &Method::GET, "/small", 0, false).await?;
            Ok::<_, crate::net::BoxError>(s)
        })
        .await;
        match r {
            Ok(Ok(s)) => conns.push(s),
            _ => failures += 1,
        }
        if t0.elapsed() > Duration::from_secs(120) {
            break;
        }
    }
    (conns, failures)
}

/// Opens 21 connections one after another; counts how many of the last 20
/// resumed a TLS session.
async fn count_resumptions(ep: &Endpoint) -> u64 {
    let mut resumed = 0;
    for i in 0..21 {
        if let Ok(Some(kind)) = handshake_kind(ep).await {
            if i > 0 && kind == rustls::HandshakeKind::Resumed {
                resumed += 1;
            }
        }
    }
    resumed
}

async fn handshake_kind(ep: &Endpoint) -> Result<Option<rustls::HandshakeKind>> {
    // Same path as Endpoint::open_stream, keeping the rustls connection to
    // ask how the handshake went. A request is made so that TLS 1.3
    // tickets (sent after the handshake) reach the client.
    let tls = ep.tls.clone().ok_or("not TLS")?;
    let tcp = match (&ep.proxy, ep.direct) {
        (Some(p), _) => {
            let tcp = tokio::net::TcpStream::connect(p.addr).await?;
            crate::net::connect_tunnel(tcp, p, &format!("{}:{}", ep.host, ep.port)).await?
        }
        (None, Some(a)) => tokio::net::TcpStream::connect(a).await?,
        _ => return Err("no address".into()),
    };
    let name = rustls_pki_types::ServerName::try_from(ep.host.clone())?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await?;
    let kind = stream.get_ref().1.handshake_kind();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    load::exchange(ep, &mut sender, &Method::GET, "/small", 0, false).await?;
    drop(sender);
    let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    Ok(kind)
}

struct RssStats {
    start: u64,
    max: u64,
    end: u64,
}

struct RssSampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<RssStats>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let start = procfs::rss_kib(pid).unwrap_or(0);
            let mut max = start;
            let mut last = start;
            // Bounded: at most 10 minutes of samples.
            for _ in 0..12_000 {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                last = procfs::rss_kib(pid).unwrap_or(last);
                max = max.max(last);
            }
            RssStats {
                start,
                max,
                end: last,
            }
        });
        RssSampler { stop, task }
    }

    async fn stop(self) -> RssStats {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or(RssStats {
            start: 0,
            max: 0,
            end: 0,
        })
    }
}

fn check_origin(addr: SocketAddr, what: &str) -> Result<()> {
    crate::net::loopback(addr)?;
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| {
        format!("{what} at {addr} is not reachable: {e} (scripts/bench.sh starts it)")
    })?;
    Ok(())
}

/// Runs `moat-bench suite`.
pub async fn main(a: SuiteArgs) -> Result<()> {
    check_origin(a.nginx_http, "nginx (http)")?;
    check_origin(a.nginx_https, "nginx (https)")?;
    crate::net::loopback(a.sink)?;
    crate::net::loopback(a.mitm_listen)?;
    std::fs::create_dir_all(&a.work)?;
    let started = Instant::now();

    // The upload sink, in its own process.
    let mut sink = Command::new(std::env::current_exe()?)
        .arg("sink")
        .args(["--listen", &a.sink.to_string(), "--cert"])
        .arg(&a.cert)
        .arg("--key")
        .arg(&a.key)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    wait_listening(a.sink, Duration::from_secs(10)).await?;

    let moat = MoatProc::start(&a).await?;
    stderr_line(&format!("moat proxy pid {}", moat.pid));
    let mitm = MitmProc::start(&a).await?;
    stderr_line(&format!("mitmdump pid {}", mitm.pid));
    let mut ctx = Ctx {
        a: &a,
        moat: Some(moat),
        mitm: Some(mitm),
        md: String::new(),
        goals: Vec::new(),
        peers: Vec::new(),
        tick: procfs::ticks_per_second(),
        sink_pid: sink.id(),
        quiet_left: std::cell::Cell::new(a.quiet_wait),
        waited: std::cell::Cell::new(0.0),
        busy_points: std::cell::Cell::new(0),
        retries: std::cell::Cell::new(0),
    };

    ctx.check_injection().await;
    ctx.plain_http().await?;
    ctx.https_keepalive().await?;
    ctx.new_connections().await?;
    ctx.leaf_minting().await?;
    ctx.idle_memory().await?;
    if let Some(m) = ctx.mitm.take() {
        m.stop().await;
    }
    ctx.streaming().await?;
    if let Some(m) = ctx.moat.take() {
        m.stop().await;
    }
    let _ = sink.kill().await;

    let report = render(&a, &ctx, started.elapsed());
    if let Some(dir) = a.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&a.out, &report)?;
    println!("{report}");
    stderr_line(&format!("wrote {}", a.out.display()));
    Ok(())
}

async fn wait_listening(addr: SocketAddr, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            return Err(format!("nothing listening on {addr}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn render(a: &SuiteArgs, ctx: &Ctx<'_>, took: Duration) -> String {
    let mut md = String::new();
    md.push_str("# moat proxy benchmark results\n\n");
    md.push_str(
        "Generated by `moat-bench suite`; do not edit by hand (see `bench/README.md`).\n\n",
    );
    let _ = writeln!(
        md,
        "- Date: {}",
        if a.date.is_empty() {
            "unknown"
        } else {
            &a.date
        }
    );
    let _ = writeln!(md, "- Command: `{}`", a.command);
    for line in &a.info {
        let _ = writeln!(md, "- {line}");
    }
    let _ = writeln!(
        md,
        "- Settings: {} s measured after {} s warm-up per load point; {} new host names; {} idle connections; {} MiB streamed each way",
        a.duration, a.warmup, a.hosts, a.idle_conns, a.stream_mib
    );
    let _ = writeln!(md, "- Suite wall time: {:.0} s", took.as_secs_f64());
    let _ = writeln!(
        md,
        "- Background load: other processes on this machine (e.g. concurrent builds) are measured as \"other CPU\" (/proc/stat busy time minus the benchmark's own processes: client, proxy, nginx, sink). Before each measurement the suite waits while other CPU exceeds 0.3 cores (budget {:.0} s); it waited {:.0} s in all; {} load point(s) were measured again because other CPU exceeded 0.3 cores during them, and {} measurement(s) started with the machine still busy after the budget ran out.",
        a.quiet_wait,
        ctx.waited.get(),
        ctx.retries.get(),
        ctx.busy_points.get()
    );
    md.push_str("- Client (this load generator, tokio, 2 worker threads), proxy and nginx all share the same 2 cores: every figure here includes that contention.\n");
    md.push_str("\n## Goals\n\n| what | goal | measured | result |\n|---|---|---|---|\n");
    for g in &ctx.goals {
        let note = if g.noisy {
            " (other processes busy during the measurement: not comparable)"
        } else {
            ""
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {}{note} |",
            g.what,
            g.goal,
            g.measured,
            yes(g.met)
        );
    }
    let met = ctx.goals.iter().filter(|g| g.met).count();
    let _ = writeln!(md, "\n{met} of {} goals met.\n", ctx.goals.len());
    if !ctx.peers.is_empty() {
        md.push_str("Against a peer in the same run:\n\n");
        for line in &ctx.peers {
            let _ = writeln!(md, "- {line}");
        }
        md.push('\n');
    }
    md.push_str(&ctx.md);
    md
}
