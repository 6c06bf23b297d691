//! The supervisor: the process that owns one run from setup to cleanup.
//! See the module docs of [`crate::run`] for why it is a process of its own.
//!
//! Setup is a list of steps, each with its undo ([`steps`]); cleanup undoes
//! the completed ones in reverse. Between them the supervisor serves the
//! run: its proxy, its SSH agent, its output, until the container exits.
//! It reports through `tracing` (its standard error is `supervisor.log`);
//! the program that runs it chooses where that goes.

mod files;
mod loopback;
mod ssh;
mod steps;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::logs::LogWriter;
use super::services::Services;
use super::{now, run_dir, update_meta, Event, Handoff, RunMeta, RunPlan, RunState};
use crate::audit::AuditWriter;
use crate::error::{Error, ErrorKind, Result};
use crate::proxy::Proxy;
use crate::runtime::{Bind, NetworkInfo};
use crate::secret::Secret;
use crate::trace::{AuditEvent, TraceRecord, TraceSink};

pub(crate) use steps::Step;

/// Runs the supervisor: reads the run's handoff from standard input, reports
/// progress and readiness on standard output, and runs the run to its end.
/// Returns the process exit status (0 when the run was set up and
/// supervised, 1 when setup failed).
pub fn supervise() -> i32 {
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line).is_err() {
        tracing::error!("no handoff on standard input");
        return 2;
    }
    let handoff: Handoff = match serde_json::from_str(&line) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, "bad handoff");
            return 2;
        }
    };
    if handoff.guard {
        return guard(&handoff);
    }
    raise_descriptor_limit();
    match crate::rt::block_on(supervise_async(handoff)) {
        Ok(Ok(code)) => code,
        Ok(Err(e)) | Err(e) => {
            tracing::error!(error = %e, "the supervisor failed");
            2
        }
    }
}

/// Raises this process's soft limit on open descriptors to its hard limit:
/// the run's proxy holds up to 4,096 client connections (each with its
/// upstream), its forwarders and router more, and the usual soft limit of
/// 1,024 would run out first, cutting all of them off at once.
fn raise_descriptor_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::debug!("the descriptor limit cannot be raised");
            }
        }
    }
}

/// The guard of a run: a process of its own, in a session of its own,
/// started by the supervisor before setup. Its standard input is a pipe
/// from the supervisor, which it never writes: the end of that input means
/// the supervisor is gone. If the run was not cleaned up by then (the
/// supervisor was killed, SIGKILL included, or died), the guard marks it
/// failed and removes its container, firewall rules, network and routes
/// at once (`refresh`), so nothing of a run outlives its proxy for long.
fn guard(handoff: &Handoff) -> i32 {
    use std::io::Read;
    let mut sink = [0u8; 64];
    // Blocks until the supervisor exits, however it exits (a signal that
    // interrupts the read is not the end).
    loop {
        match std::io::stdin().lock().read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let dir = run_dir(&handoff.home, &handoff.id);
    // The pipe ends a moment before the process is gone from /proc.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut retry = Retry::new();
    loop {
        let Ok(meta) = super::load_meta(&dir) else {
            // Gone: removed by `moat destroy`, which cleaned up first, or
            // with the whole moat home (`rm -rf`), which did not. Either
            // way, what carries the run's label and the run's firewall
            // chains go; the run's id and engine are all that takes.
            orphaned(handoff);
            return 0;
        };
        if meta.state.is_terminal() && meta.cleaned {
            return 0;
        }
        let supervisor_alive = meta
            .supervisor
            .is_some_and(|(pid, start)| crate::process::process_alive(pid, start));
        if !supervisor_alive || Instant::now() >= deadline {
            let after = super::refresh(&handoff.home, meta);
            if after.cleaned {
                sweep_late_objects(handoff, &after);
                return 0;
            }
            if retry.expired() {
                tracing::error!(
                    run = %handoff.id,
                    error = after.error.as_deref().unwrap_or("its supervisor is still alive"),
                    "the run was not cleaned up"
                );
                return 1;
            }
        }
        retry.pause();
    }
}

/// How the guard tries again when cleaning up fails for a while (the engine
/// restarting, a lock): growing pauses of at most a second, for a minute.
/// The usual path and the path of a run whose `run.json` is gone share it.
struct Retry {
    pause: Duration,
    give_up: Instant,
}

impl Retry {
    fn new() -> Retry {
        Retry {
            pause: Duration::from_millis(50),
            give_up: Instant::now() + Duration::from_secs(60),
        }
    }

    /// Is the minute over?
    fn expired(&self) -> bool {
        Instant::now() >= self.give_up
    }

    /// Waits before the next try.
    fn pause(&mut self) {
        std::thread::sleep(self.pause);
        self.pause = (self.pause * 2).min(Duration::from_secs(1));
    }
}

/// Cleans up after a run whose `run.json` is gone, from what the guard was
/// handed: everything labelled with the run's id, and its firewall chains.
fn orphaned(handoff: &Handoff) {
    let engine = match crate::runtime::choose(handoff.plan.engine) {
        Ok(engine) => engine,
        Err(e) => {
            tracing::error!(run = %handoff.id, error = %e, "no engine to clean up on");
            return;
        }
    };
    let meta = RunMeta::starting(&handoff.id, &handoff.plan, engine);
    let mut retry = Retry::new();
    loop {
        match super::cleanup_blocking(&handoff.home, &meta) {
            Ok(()) => break,
            Err(e) if retry.expired() => {
                tracing::error!(run = %handoff.id, error = %e, "cleaning up after a run whose run.json is gone");
                return;
            }
            Err(_) => retry.pause(),
        }
    }
    sweep_late_objects(handoff, &meta);
}

/// A supervisor killed in the middle of a request to the engine (creating
/// the container, connecting it to its network) leaves that request to
/// finish on the engine's side after the guard has cleaned up: the object
/// then appears with the run's label when nobody is left to remove it.
/// The guard looks again a little later and removes what appeared.
fn sweep_late_objects(handoff: &Handoff, meta: &RunMeta) {
    for pause in [
        Duration::from_secs(1),
        Duration::from_secs(2),
        Duration::from_secs(4),
    ] {
        std::thread::sleep(pause);
        if let Err(e) = super::cleanup_blocking(&handoff.home, meta) {
            tracing::error!(run = %handoff.id, error = %e, "sweeping the run's objects again failed");
        }
    }
}

/// Starts the run's guard with the supervisor's own command; the returned
/// pipe must stay open for as long as this process lives.
fn start_guard(handoff: &Handoff) -> Result<std::process::ChildStdin> {
    let (program, args) = handoff.launcher.split_first().ok_or_else(|| {
        Error::new(
            ErrorKind::Internal,
            "no supervisor command to start the run's guard with",
        )
    })?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .env("MOAT_HOME", &handoff.home);
    crate::process::detach(&mut cmd);
    let mut child = cmd.spawn().map_err(|e| {
        Error::new(
            ErrorKind::Runtime,
            format!("cannot start the run's guard ({program}): {e}"),
        )
    })?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| Error::new(ErrorKind::Internal, "the guard has no input pipe"))?;
    let mut line = serde_json::to_vec(&Handoff {
        home: handoff.home.clone(),
        id: handoff.id.clone(),
        plan: handoff.plan.clone(),
        launcher: handoff.launcher.clone(),
        guard: true,
        hold: false,
    })
    .map_err(|e| {
        Error::new(
            ErrorKind::Internal,
            format!("encoding the guard's handoff: {e}"),
        )
    })?;
    line.push(b'\n');
    stdin
        .write_all(&line)
        .and_then(|()| stdin.flush())
        .map_err(|e| {
            Error::new(
                ErrorKind::Runtime,
                format!("cannot hand the run to its guard: {e}"),
            )
        })?;
    // Not waited for: it outlives this process, and whoever adopts it then
    // reaps it.
    drop(child);
    Ok(stdin)
}

/// Writes a line to the starter (progress, ready, or why setup failed).
fn emit(event: &Event) {
    if let Ok(mut line) = serde_json::to_vec(event) {
        line.push(b'\n');
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&line).and_then(|()| out.flush());
    }
}

/// What setup has made so far: for the steps after it, and for cleanup.
pub(crate) struct Built {
    binding: Option<crate::credential::Binding>,
    /// `NAME=value` of each resolved secret.
    secret_env: Vec<Secret<String>>,
    image_id: String,
    network: Option<NetworkInfo>,
    proxy: Option<Proxy>,
    proxy_addr: Option<SocketAddr>,
    proxy_url: Option<Secret<String>>,
    ca_pem: String,
    overrides: Option<Arc<crate::proxy::upstream::ResolveMap>>,
    trace: Option<Arc<JsonlTrace>>,
    /// The SSH agent's notes, for the run's output; bounded.
    notes: (
        tokio::sync::mpsc::Sender<String>,
        Option<tokio::sync::mpsc::Receiver<String>>,
    ),
    ssh_cancel: Option<tokio_util::sync::CancellationToken>,
    /// The run's own router for its container's loopback ([`loopback`]):
    /// its address, the routing proxy's port (0 until known), the router.
    loopback: Option<(SocketAddr, u16, crate::routing::Router)>,
    /// When the agent runs as root (a root-owned workspace): when its files
    /// step ran and the workspace's mode then, for the scrub at its end
    /// ([`files::scrub_workspace`]).
    root_agent: Option<(std::time::SystemTime, u32)>,
    /// The workspace's configuration files as the run began
    /// ([`files::config_snapshot`]): compared at its end.
    config_files: Vec<(&'static str, files::Snapshot)>,
    ssh_hosts: Vec<(crate::ssh_agent::HostGrant, u16)>,
    guarded: bool,
    urls: BTreeMap<String, String>,
    user: (u32, u32),
    /// The container's environment (it holds secret values).
    env: Secret<Vec<String>>,
    binds: Vec<Bind>,
    tmpfs: Vec<crate::runtime::Tmpfs>,
    container: Option<String>,
    log_task: Option<tokio::task::JoinHandle<LogWriter>>,
}

impl Built {
    fn new() -> Built {
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        Built {
            binding: None,
            secret_env: Vec::new(),
            image_id: String::new(),
            network: None,
            proxy: None,
            proxy_addr: None,
            proxy_url: None,
            ca_pem: String::new(),
            overrides: None,
            trace: None,
            notes: (tx, Some(rx)),
            ssh_cancel: None,
            loopback: None,
            root_agent: None,
            config_files: Vec::new(),
            ssh_hosts: Vec::new(),
            guarded: false,
            urls: BTreeMap::new(),
            user: (0, 0),
            env: Secret::new(Vec::new()),
            binds: Vec::new(),
            tmpfs: Vec::new(),
            container: None,
            log_task: None,
        }
    }
}

/// One run under supervision.
pub(crate) struct Supervision {
    home: PathBuf,
    id: String,
    dir: PathBuf,
    plan: RunPlan,
    name: String,
    launcher: Vec<String>,
    audit: Arc<AuditWriter>,
    services: Services,
    phases: BTreeMap<String, f64>,
    /// Where progress goes (the starter, through standard output).
    progress: Arc<dyn Fn(&str) + Send + Sync>,
    /// The steps done, in order.
    done: Vec<Step>,
    built: Built,
    /// How long a gateway that comes up with the container (Podman's) may
    /// take to, after the container started.
    gateway_wait: std::time::Duration,
    /// Awaited between creating the container (its output recorded) and
    /// starting it, when the starter attaches first ([`Gate`]).
    gate: Option<Gate>,
}

/// What a held start waits for before the container starts: the starter's
/// word that it has attached (see `run::start_held`). An error fails the
/// run, undoing what was set up.
pub(crate) type Gate = std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>;

/// How long a held start waits for its starter to attach.
const ATTACH_WAIT: Duration = Duration::from_secs(120);

/// The gate of a held start: tells the starter the container is created,
/// then waits for [`super::ATTACHED`] on standard input (after the
/// handoff's line). The input's end first means the starter went away.
fn attach_gate() -> Gate {
    Box::pin(async {
        emit(&Event::Created);
        let read = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line).map(|_| line)
        });
        let line = match tokio::time::timeout(ATTACH_WAIT, read).await {
            Ok(Ok(Ok(line))) => line,
            Ok(Ok(Err(e))) => {
                return Err(Error::new(
                    ErrorKind::Runtime,
                    format!("reading the starter's word to start: {e}"),
                ))
            }
            Ok(Err(e)) => return Err(Error::new(ErrorKind::Internal, format!("input task: {e}"))),
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Runtime,
                    format!(
                        "the program that started this interactive run did not attach to it within {} s",
                        ATTACH_WAIT.as_secs()
                    ),
                ))
            }
        };
        if line.trim_end() == super::ATTACHED {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::Runtime,
                "the program that started this interactive run went away before attaching to it",
            ))
        }
    })
}

impl Supervision {
    /// A run to supervise: `meta` is its `run.json`, `audit` its log.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        home: PathBuf,
        meta: &RunMeta,
        plan: RunPlan,
        launcher: Vec<String>,
        audit: Arc<AuditWriter>,
        services: Services,
        progress: Arc<dyn Fn(&str) + Send + Sync>,
    ) -> Supervision {
        Supervision {
            gateway_wait: std::time::Duration::from_secs(10),
            gate: None,
            dir: run_dir(&home, &meta.id),
            home,
            id: meta.id.clone(),
            plan,
            name: meta.name.clone(),
            launcher,
            audit,
            services,
            phases: BTreeMap::new(),
            progress,
            done: Vec::new(),
            built: Built::new(),
        }
    }

    /// Writes an event to the run's audit log and waits for it to be on
    /// disk; a failure is logged (the proxy then fails closed on its own).
    fn record(&self, event: AuditEvent) {
        if let Err(e) = self.audit.record(&event) {
            tracing::error!(error = %e, "the audit log cannot be written");
        }
    }

    fn phase(&mut self, name: &str, since: Instant) {
        self.phases
            .insert(name.to_string(), since.elapsed().as_secs_f64() * 1000.0);
    }
}

async fn supervise_async(handoff: Handoff) -> Result<i32> {
    let dir = run_dir(&handoff.home, &handoff.id);
    let pid = std::process::id();
    let start = crate::process::process_start_time(pid).unwrap_or(0);
    let meta = update_meta(&dir, |m| m.supervisor = Some((pid, start)))?;
    // Held until this process exits: its end tells the guard we are gone.
    let _guard = match start_guard(&handoff) {
        Ok(pipe) => pipe,
        Err(e) => {
            fail(&dir, &e);
            emit(&error_event(&e));
            return Ok(1);
        }
    };
    let audit = match AuditWriter::open(&dir, &handoff.home, &handoff.id) {
        Ok(a) => Arc::new(a),
        Err(e) => {
            fail(&dir, &e);
            emit(&error_event(&e));
            return Ok(1);
        }
    };
    let engine = crate::runtime::choose(handoff.plan.engine)?;
    let runtime = match crate::runtime::connect(engine).await {
        Ok(r) => r,
        Err(e) => {
            fail(&dir, &e);
            let _ = audit.close();
            let _ = update_meta(&dir, |m| m.cleaned = true);
            emit(&error_event(&e));
            return Ok(1);
        }
    };
    let progress: Arc<dyn Fn(&str) + Send + Sync> = Arc::new(|message: &str| {
        emit(&Event::Progress {
            message: message.to_string(),
        })
    });
    let mut run = Supervision::new(
        handoff.home,
        &meta,
        handoff.plan,
        handoff.launcher,
        audit,
        Services::real(runtime),
        progress,
    );
    if handoff.hold {
        run.gate = Some(attach_gate());
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::new(ErrorKind::Internal, format!("signal handler: {e}")))?;
    let stopped = async {
        term.recv().await;
    };
    if let Err(e) = run.start(stopped).await {
        emit(&error_event(&e));
        return Ok(1);
    }
    emit(&Event::Ready);
    // From here on the starter may be gone: nothing more goes to stdout.
    let exit = run.serve(&mut term).await;
    run.finish(exit).await?;
    Ok(0)
}

impl Supervision {
    /// Records the run's creation and sets it up; on a failure (or when
    /// `stopped` ends first: SIGTERM during setup), undoes what was done and
    /// records why.
    pub(crate) async fn start(
        &mut self,
        stopped: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        self.record(AuditEvent::RunCreated {
            run: self.id.clone(),
            name: self.name.clone(),
            image: self.plan.image.clone(),
            workspace: self.plan.workspace.clone(),
            command: self.plan.command.clone(),
            policy: self.plan.network.policy,
            allow: self.plan.network.allow.clone(),
        });
        let setup = tokio::select! {
            r = self.set_up() => r,
            () = stopped => Err(Error::new(ErrorKind::Runtime, "the run was stopped while it was being set up")),
        };
        let Err(e) = setup else { return Ok(()) };
        let e = self.redacted(e);
        self.abandon(&e).await;
        Err(e)
    }

    /// `e`, or the same error with every secret value of the run replaced
    /// by `****`: an engine's refusal may quote the container's environment
    /// (runc quotes a variable it cannot set), and the error goes to
    /// run.json, the audit log and the terminal.
    fn redacted(&self, e: Error) -> Error {
        let text = e.to_string();
        let mut clean = text.clone();
        for var in &self.built.secret_env {
            let value = var.expose().split_once('=').map_or("", |(_, v)| v);
            // The value whole, and each of its parts between characters an
            // engine prints escaped (each its own way: `\x00`, `\u{0}`).
            let parts = value.split(|c: char| c.is_control() || c == '"' || c == '\\');
            for part in std::iter::once(value).chain(parts) {
                if part.len() >= 4 {
                    clean = clean.replace(part, "****");
                }
            }
        }
        if clean == text {
            return e;
        }
        Error::new(e.kind(), clean)
    }

    /// Undoes what setup did and records why the run failed.
    pub(crate) async fn abandon(&mut self, e: &Error) {
        self.record(AuditEvent::RunFailed {
            run: self.id.clone(),
            error: e.to_string(),
        });
        let cleanup_error = self.tear_down().await;
        if let Err(e) = self.audit.close() {
            tracing::error!(error = %e, "closing the audit log");
        }
        fail(&self.dir, e);
        let phases = self.phases.clone();
        if let Err(e) = update_meta(&self.dir, |m| {
            m.cleaned = cleanup_error.is_none();
            m.phases = phases;
        }) {
            tracing::error!(error = %e, "run.json cannot be written");
        }
        if let Some(why) = cleanup_error {
            tracing::error!(error = %why, "cleaning up after a failed setup");
        }
    }

    /// Serves the run until its container exits: SIGTERM stops the
    /// container (then it exits), SIGHUP and SIGINT are not for us. The
    /// command's exit code.
    async fn serve(&mut self, term: &mut tokio::signal::unix::Signal) -> Result<i64> {
        let runtime = self.services.runtime.clone();
        let container = self.built.container.clone().unwrap_or_default();
        let wait_runtime = runtime.clone();
        let wait_id = container.clone();
        let mut waiting = tokio::spawn(async move { wait_runtime.wait(&wait_id).await });
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut int =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
        loop {
            tokio::select! {
                r = &mut waiting => return r.map_err(|e| Error::new(ErrorKind::Internal, format!("wait task: {e}"))).and_then(|r| r),
                _ = term.recv() => {
                    if let Err(e) = runtime.stop(&container, 10).await {
                        tracing::warn!(error = %e, "stopping the container");
                    }
                }
                _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => {}
                _ = async { match int.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => {}
            }
        }
    }

    /// After the container exited: the run's last words (what output was
    /// lost, `run_stopped`, the audit log's final checkpoint, the exit code
    /// in `run.json`), then cleanup.
    pub(crate) async fn finish(&mut self, exit: Result<i64>) -> Result<()> {
        // Output still in flight ends with the container's streams.
        let writer = match self.built.log_task.take() {
            Some(task) => tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .ok()
                .and_then(|w| w.ok()),
            None => None,
        };
        // The run is over: the room set aside for its last words is given
        // back, so that they can be written on a full disk too.
        super::release_reserve(&self.dir);
        // What of the run's output and trace could not be written is said
        // once, in its output (which `moat run` and `moat logs` show) and
        // run.json.
        let mut writer = writer;
        let lost: Vec<String> = [
            writer.as_ref().and_then(|w| {
                w.lost()
                    .map(|(why, bytes)| format!("{bytes} bytes of output were not kept: {why}"))
            }),
            self.built.trace.as_ref().and_then(|t| t.lost()),
        ]
        .into_iter()
        .flatten()
        .collect();
        let lost = (!lost.is_empty()).then(|| lost.join("; "));
        // A root agent may have left set-user-ID files of root's in the
        // workspace, or opened it to others: undone, and said.
        if let Some((since, mode)) = self.built.root_agent {
            let workspace = self.plan.workspace.clone();
            let scrubbed = tokio::task::spawn_blocking(move || {
                files::scrub_workspace(&workspace, since, mode)
            })
            .await
            .unwrap_or_else(|e| vec![format!("the workspace check did not finish: {e}")]);
            for note in scrubbed {
                tracing::warn!("{note}");
                if let Some(w) = writer.as_mut() {
                    if let Err(e) = w.note(&note) {
                        tracing::warn!(error = %e, "the run's output cannot be written");
                    }
                }
            }
        }
        // The agent could rewrite the file the next run is planned from (its
        // policy, grants, mounts): said, for the user to read it first.
        for note in files::config_changes(&self.plan.workspace, &self.built.config_files) {
            tracing::warn!("{note}");
            if let Some(w) = writer.as_mut() {
                if let Err(e) = w.note(&note) {
                    tracing::warn!(error = %e, "the run's output cannot be written");
                }
            }
        }
        if let (Some(text), Some(w)) = (&lost, writer.as_mut()) {
            if let Err(e) = w.note(text) {
                tracing::warn!(error = %e, "the run's output cannot be written");
            }
        }
        let (state, exit_code, error) = match exit {
            Ok(code) => (RunState::Stopped, Some(code), lost),
            Err(e) => (RunState::Failed, None, Some(e.to_string())),
        };
        self.record(AuditEvent::RunStopped {
            run: self.id.clone(),
            exit_code,
            error: error.clone(),
        });
        // No more requests: the proxy and the SSH agent stop before the log
        // is closed.
        if let Some(proxy) = self.built.proxy.take() {
            proxy.shutdown().await;
        }
        if let Some(ssh) = &self.built.ssh_cancel {
            ssh.cancel();
        }
        if let Some((_, _, router)) = &self.built.loopback {
            router.stop();
        }
        if let Err(e) = self.audit.close() {
            tracing::error!(error = %e, "closing the audit log");
        }
        // The exit code is known and every artifact final: callers may go
        // on while the container, rules and network are removed (`cleaned`
        // says when that is done; `stop`, `destroy` and `clean` wait for it).
        let recorded = update_meta(&self.dir, |m| {
            m.state = state;
            m.exit_code = exit_code;
            m.stopped_at = Some(now());
            m.error = error.clone();
        });
        // Cleanup happens even when run.json cannot be written (a full disk).
        let t = Instant::now();
        let cleanup_error = self.tear_down().await;
        self.phase("cleanup", t);
        let phases = self.phases.clone();
        // When cleanup failed, `cleaned` stays false: the next command that
        // looks at the run (after this process exits) tries again.
        update_meta(&self.dir, |m| {
            m.cleaned = cleanup_error.is_none();
            m.phases = phases.clone();
            if m.error.is_none() {
                m.error = cleanup_error
                    .clone()
                    .map(|e| format!("cleaning up failed: {e}"));
            }
        })?;
        recorded.map(|_| ())
    }
}

fn error_event(e: &Error) -> Event {
    Event::Error {
        kind: e.kind().as_str().to_string(),
        message: e.to_string(),
    }
}

fn fail(dir: &Path, e: &Error) {
    let message = e.to_string();
    if let Err(e) = update_meta(dir, |m| {
        m.state = RunState::Failed;
        m.error = Some(message.clone());
        m.stopped_at = Some(now());
    }) {
        tracing::error!(error = %e, "run.json cannot be written");
    }
}

/// `network.jsonl`: one trace record per line. A record that cannot be
/// written (a full disk) leaves no torn line; it and later ones are counted
/// and the run's end says how many were lost.
pub(crate) struct JsonlTrace {
    file: Mutex<TraceFile>,
}

struct TraceFile {
    file: std::fs::File,
    written: u64,
    limit: u64,
    lost: Option<(String, u64)>,
}

/// The most bytes a run's `network.jsonl` grows to: an agent sending
/// requests with 60 KB URLs as fast as its proxy takes them would fill the
/// host's disk (the moat home's and other runs') at gigabytes an hour.
pub(crate) const TRACE_LIMIT: u64 = 256 << 20;

impl JsonlTrace {
    pub(crate) fn open(path: &Path, limit: u64) -> Result<JsonlTrace> {
        let file = crate::paths::open_private(path, crate::paths::Open::Append)?;
        let written = file
            .metadata()
            .map_err(|e| Error::io(path, "read", e))?
            .len();
        Ok(JsonlTrace {
            file: Mutex::new(TraceFile {
                file,
                written,
                limit,
                lost: None,
            }),
        })
    }

    /// How many records were lost and why, if any were.
    fn lost(&self) -> Option<String> {
        let file = self.file.lock().ok()?;
        let (why, n) = file.lost.as_ref()?;
        Some(format!("{n} network trace records were not kept: {why}"))
    }
}

impl TraceSink for JsonlTrace {
    fn record(&self, record: TraceRecord) {
        let (Ok(mut line), Ok(mut f)) = (serde_json::to_vec(&record), self.file.lock()) else {
            return;
        };
        if let Some((_, n)) = &mut f.lost {
            *n += 1;
            return;
        }
        line.push(b'\n');
        if f.written + line.len() as u64 > f.limit {
            let limit = f.limit;
            tracing::warn!(limit, "network.jsonl reached its limit");
            let size = if limit >= 1 << 20 {
                format!("{} MiB", limit >> 20)
            } else {
                format!("{limit} bytes")
            };
            f.lost = Some((format!("network.jsonl reached its limit of {size}"), 1));
            return;
        }
        match f.file.write_all(&line) {
            Ok(()) => f.written += line.len() as u64,
            Err(e) => {
                let written = f.written;
                let _ = f.file.set_len(written);
                tracing::warn!(error = %e, "network.jsonl cannot be written");
                f.lost = Some((format!("cannot write network.jsonl: {e}"), 1));
            }
        }
    }
}
