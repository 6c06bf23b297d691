//! Runs: an agent in a container, wired to its own proxy, with its artifacts
//! under `$MOAT_HOME/runs/<run-id>/`.
//!
//! A run is owned by a **supervisor**: a small process of its own (started by
//! [`start`], detached from the caller's terminal and process group) that
//! resolves the grants and secrets, creates the network, the firewall rules
//! and the container, serves the run's proxy, records the logs, the network
//! trace and the audit log, and cleans up when the container exits. The
//! caller (the CLI, Python, C) only starts it, reads what it writes, and asks
//! the engine to stop the container. So a run outlives the terminal that
//! started it, and one run's failure touches no other run.
//!
//! Files of a run (none holds a secret value):
//! - `run.json`: [`RunMeta`], rewritten atomically on every change of state;
//! - `logs.jsonl`: output, one JSON object per chunk (see [`logs`]);
//! - `network.jsonl`: the proxy's trace records;
//! - `audit.jsonl`, `checkpoints.jsonl`: the audit log (`docs/audit-format.md`);
//! - `supervisor.log`: what the supervisor reports about itself.

pub mod attach;
mod firewall;
pub mod logs;
mod supervisor;

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::policy::PolicyMode;
use crate::runtime::{Docker, Runtime};

pub use supervisor::supervise;

/// Everything a run needs, resolved from configuration and overrides. It
/// carries no secret value: grants and secrets are names and references,
/// resolved by the supervisor on the host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunSpec {
    /// The run's name; generated when `None`.
    pub name: Option<String>,
    /// The workspace on the host, mounted at `/workspace`.
    pub workspace: PathBuf,
    /// The image.
    pub image: String,
    /// The command; the image's default when `None`.
    pub command: Option<Vec<String>>,
    /// Environment variables.
    pub env: BTreeMap<String, String>,
    /// Secrets to resolve into variables: name → `op://...` or `ssm://...`.
    pub secrets: BTreeMap<String, String>,
    /// Grant names (`github`, `anthropic:oauth`, `aws`).
    pub grants: Vec<String>,
    /// `permissive` or `strict`.
    pub policy: String,
    /// Strict-mode allow list.
    pub allow: Vec<String>,
    /// Extra mounts: `(host path, container path, read_only)`.
    pub mounts: Vec<(PathBuf, String, bool)>,
    /// Endpoints: name → container port (recorded; routing is not built).
    pub ports: BTreeMap<String, u16>,
    /// Interactive (TTY) run.
    pub interactive: bool,
}

impl RunSpec {
    /// The spec of a validated configuration.
    pub fn from_config(config: &Config) -> RunSpec {
        let resolved = config.resolved();
        RunSpec {
            name: config.name.clone(),
            workspace: config.workspace.clone(),
            image: resolved.image,
            command: config.command.clone(),
            env: config.env.clone(),
            secrets: config
                .secrets
                .iter()
                .map(|(k, v)| (k.clone(), v.reference.clone()))
                .collect(),
            grants: config.grants.iter().map(|g| g.to_string()).collect(),
            policy: config.network.policy.to_string(),
            allow: config.network.allow.iter().map(|a| a.to_string()).collect(),
            mounts: config
                .mounts
                .iter()
                .map(|m| (m.source.clone(), m.target.clone(), m.read_only))
                .collect(),
            ports: config.ports.clone(),
            interactive: config.interactive,
        }
    }

    fn policy_mode(&self) -> Result<PolicyMode> {
        self.policy
            .parse()
            .map_err(|e| Error::new(ErrorKind::InvalidArgument, format!("network policy: {e}")))
    }
}

/// What a library caller asks for: a workspace (whose `agent.yaml`, if any,
/// is read) and overrides of it, as plain strings validated here.
#[derive(Debug, Clone, Default)]
pub struct RunRequest {
    /// The workspace.
    pub workspace: PathBuf,
    /// The command (overrides `command:`).
    pub command: Option<Vec<String>>,
    /// Grants to add.
    pub grants: Vec<String>,
    /// The image (overrides `image:` and `dependencies:`).
    pub image: Option<String>,
    /// Environment variables to add or override.
    pub env: Vec<(String, String)>,
    /// The run's name.
    pub name: Option<String>,
    /// `permissive` or `strict` (overrides `network.policy`).
    pub policy: Option<String>,
    /// Hosts to add to the allow list.
    pub allow: Vec<String>,
}

impl RunRequest {
    /// Loads the workspace's configuration, applies the overrides and
    /// validates the result.
    pub fn spec(&self) -> Result<RunSpec> {
        let config = crate::config::load(&self.workspace)?.merge(&crate::config::Overrides {
            name: self.name.clone(),
            image: self.image.clone(),
            grants: self.grants.clone(),
            env: self.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            command: self.command.clone(),
            interactive: None,
        })?;
        let mut spec = RunSpec::from_config(&config);
        if let Some(policy) = &self.policy {
            let mode: PolicyMode = policy.parse().map_err(|e| {
                Error::new(ErrorKind::InvalidArgument, format!("network policy: {e}"))
            })?;
            spec.policy = mode.to_string();
        }
        for (i, a) in self.allow.iter().enumerate() {
            crate::policy::HostPattern::parse(a)
                .map_err(|e| Error::new(ErrorKind::InvalidArgument, format!("allow[{i}]: {e}")))?;
            spec.allow.push(a.clone());
        }
        Ok(spec)
    }
}

/// Where a run is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// The supervisor is setting it up.
    Starting,
    /// The container runs.
    Running,
    /// The container exited (see the exit code) or was stopped.
    Stopped,
    /// The run could not start, or its supervisor died.
    Failed,
}

impl RunState {
    /// `starting`, `running`, `stopped`, `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Starting => "starting",
            RunState::Running => "running",
            RunState::Stopped => "stopped",
            RunState::Failed => "failed",
        }
    }

    /// Is the run over?
    pub fn is_terminal(self) -> bool {
        matches!(self, RunState::Stopped | RunState::Failed)
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `run.json`: what is known about a run. No secret value.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunMeta {
    /// `run_` + 12 hex digits.
    pub id: String,
    /// The run's name.
    pub name: String,
    /// State.
    pub state: RunState,
    /// The workspace.
    pub workspace: PathBuf,
    /// The image.
    pub image: String,
    /// The command, when one was given.
    pub command: Option<Vec<String>>,
    /// Grant names bound.
    pub grants: Vec<String>,
    /// Names of the environment variables set (values are not kept).
    pub env: Vec<String>,
    /// Names of the secrets resolved.
    pub secrets: Vec<String>,
    /// `permissive` or `strict`.
    pub policy: String,
    /// Endpoints: name → container port.
    pub ports: BTreeMap<String, u16>,
    /// Endpoints: name → URL through the routing proxy.
    #[serde(default)]
    pub urls: BTreeMap<String, String>,
    /// Interactive (TTY) run.
    pub interactive: bool,
    /// The container's id, once created.
    pub container: Option<String>,
    /// The run's network.
    pub network: Option<String>,
    /// The proxy's address on that network.
    pub proxy: Option<String>,
    /// `uid:gid` the agent runs as.
    pub user: Option<String>,
    /// The supervisor's pid and its start time (clock ticks since boot), to
    /// tell it from a later process with the same pid.
    pub supervisor: Option<(u32, u64)>,
    /// When the run was created (RFC 3339).
    pub created_at: String,
    /// When the container started.
    pub started_at: Option<String>,
    /// When the run ended.
    pub stopped_at: Option<String>,
    /// The command's exit code.
    pub exit_code: Option<i64>,
    /// Why the run failed, if it did.
    pub error: Option<String>,
    /// Milliseconds spent in each phase (`image`, `network`, `proxy`,
    /// `firewall`, `files`, `create`, `attach`, `start`, `cleanup`).
    #[serde(default)]
    pub phases: BTreeMap<String, f64>,
    /// Whether what the run held on the host (container, firewall rules,
    /// network) has been removed; set after the run ends.
    #[serde(default)]
    pub cleaned: bool,
}

/// The runs directory: `$MOAT_HOME/runs`.
pub fn runs_dir(home: &Path) -> PathBuf {
    home.join("runs")
}

fn meta_path(dir: &Path) -> PathBuf {
    dir.join("run.json")
}

/// Reads a run's `run.json`.
pub fn load_meta(dir: &Path) -> Result<RunMeta> {
    let path = meta_path(dir);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, "read", e))?;
    serde_json::from_str(&text).map_err(|e| {
        Error::new(
            ErrorKind::Io,
            format!("{}: not a run description: {e}", path.display()),
        )
    })
}

fn save_meta(dir: &Path, meta: &RunMeta) -> Result<()> {
    let json = serde_json::to_vec_pretty(meta)
        .map_err(|e| Error::new(ErrorKind::Internal, format!("encoding run.json: {e}")))?;
    crate::paths::write_private(&meta_path(dir), &json, 0o600)
}

/// Applies `change` to a run's metadata under the run's lock, so the
/// supervisor and a command never overwrite each other's change.
pub(crate) fn update_meta(dir: &Path, change: impl FnOnce(&mut RunMeta)) -> Result<RunMeta> {
    let _lock = FileLock::acquire(&dir.join("run.lock"))?;
    let mut meta = load_meta(dir)?;
    change(&mut meta);
    save_meta(dir, &meta)?;
    Ok(meta)
}

/// An exclusive `flock` held until dropped.
pub(crate) struct FileLock {
    _file: std::fs::File,
}

impl FileLock {
    pub(crate) fn acquire(path: &Path) -> Result<FileLock> {
        use std::os::unix::io::AsRawFd;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(path, "open", e))?;
        // SAFETY: flock on a descriptor we own; blocks until granted.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(Error::io(path, "lock", std::io::Error::last_os_error()));
        }
        Ok(FileLock { _file: file })
    }
}

fn now() -> String {
    crate::trace::now_rfc3339()
}

/// Is `text` a run id: `run_` and 12 lowercase hex digits?
pub fn is_run_id(text: &str) -> bool {
    text.len() == 16
        && text.starts_with("run_")
        && text[4..]
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
}

/// Refuses a workspace or mount that would hand the container moat's own
/// files (the CA key, the credential store, other runs' artifacts) or the
/// container engine's socket.
fn check_mounts(home: &Path, spec: &RunSpec) -> Result<()> {
    let home = std::fs::canonicalize(home).unwrap_or_else(|_| home.to_path_buf());
    let mut sources = vec![("workspace".to_string(), spec.workspace.clone())];
    for (source, target, _) in &spec.mounts {
        sources.push((format!("mount {}", target), source.clone()));
    }
    // The user's SSH keys and agent socket never enter a container: ssh:
    // grants reach them through the run's filtering agent only.
    let ssh_dir = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".ssh"));
    let ssh_dir = ssh_dir.map(|d| std::fs::canonicalize(&d).unwrap_or(d));
    let agent =
        crate::credential::ssh::agent_socket().map(|a| std::fs::canonicalize(&a).unwrap_or(a));
    for (what, source) in sources {
        let real = std::fs::canonicalize(&source).unwrap_or(source.clone());
        if let Some(dir) = &ssh_dir {
            if dir.starts_with(&real) || real.starts_with(dir) {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "{what} {} would give the container your SSH keys ({}); SSH reaches the agent only through `ssh:` grants",
                        real.display(),
                        dir.display()
                    ),
                ));
            }
        }
        if let Some(agent) = &agent {
            if agent.starts_with(&real) {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "{what} {} would give the container your SSH agent's socket ({}); SSH reaches the agent only through `ssh:` grants",
                        real.display(),
                        agent.display()
                    ),
                ));
            }
        }
        if home.starts_with(&real) || real.starts_with(&home) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "{what} {} would give the container moat's own files ({} holds the CA key and the credential store); choose a directory that neither holds nor lies inside it",
                    real.display(),
                    home.display()
                ),
            ));
        }
        let name = real
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let engine_socket = (name.ends_with(".sock") && name.contains("docker"))
            || real == Path::new("/var/run/docker.sock")
            || real == Path::new("/run/docker.sock");
        if engine_socket {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("{what} {} is the container engine's socket, which would give the agent the host; it is never mounted", real.display()),
            ));
        }
    }
    Ok(())
}

fn new_run_id() -> Result<String> {
    let mut raw = [0u8; 6];
    getrandom::fill(&mut raw).map_err(|e| {
        Error::new(
            ErrorKind::Internal,
            format!("no randomness for a run id: {e}"),
        )
    })?;
    Ok(format!(
        "run_{}",
        raw.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

const ADJECTIVES: &[&str] = &[
    "amber", "brisk", "calm", "deft", "eager", "fair", "glad", "hardy", "keen", "lucid", "mellow",
    "nimble", "proud", "quiet", "rapid", "steady", "tidy", "vivid", "witty", "zesty",
];
const NOUNS: &[&str] = &[
    "otter", "heron", "falcon", "badger", "lynx", "marten", "osprey", "puffin", "raven", "stoat",
    "tern", "vole", "wren", "ibex", "koala", "lemur", "newt", "panda", "quail", "yak",
];

fn generated_name(id: &str) -> String {
    let n = u64::from_str_radix(id.trim_start_matches("run_"), 16).unwrap_or(0);
    let a = ADJECTIVES[(n % ADJECTIVES.len() as u64) as usize];
    let b = NOUNS[((n / 97) % NOUNS.len() as u64) as usize];
    format!("{a}-{b}")
}

/// Every run under `home`, newest first, with its state brought up to date
/// (see [`refresh`]).
pub fn list(home: &Path) -> Result<Vec<RunMeta>> {
    let dir = runs_dir(home);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(&dir, "read", e)),
    };
    let mut runs = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_run_id(&name) {
            continue;
        }
        // A run.json that names another run is not trusted.
        if let Some(meta) = load_meta(&entry.path()).ok().filter(|m| m.id == name) {
            runs.push(refresh(home, meta));
        }
    }
    runs.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
    Ok(runs)
}

/// Finds a run by id, unique id prefix, or name (the most recent run of that
/// name); with `None`, the most recent run.
pub fn find(home: &Path, reference: Option<&str>) -> Result<RunMeta> {
    let runs = list(home)?;
    let Some(reference) = reference else {
        return runs.into_iter().next().ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidArgument,
                "there are no runs yet; start one with `moat run`",
            )
        });
    };
    if let Some(run) = runs.iter().find(|r| r.id == reference) {
        return Ok(run.clone());
    }
    if let Some(run) = runs.iter().find(|r| r.name == reference) {
        return Ok(run.clone());
    }
    let prefixed: Vec<&RunMeta> = runs
        .iter()
        .filter(|r| reference.len() >= 5 && r.id.starts_with(reference))
        .collect();
    match prefixed.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("no run matches \"{reference}\" (by id, id prefix or name); see `moat list`"),
        )),
        many => Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "\"{reference}\" matches {} runs ({}); give more of the id",
                many.len(),
                many.iter()
                    .map(|r| r.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// The directory of a run.
pub fn run_dir(home: &Path, id: &str) -> PathBuf {
    runs_dir(home).join(id)
}

/// Is the process `pid`, started at `start` ticks, still alive?
fn process_alive(pid: u32, start: u64) -> bool {
    process_start_time(pid) == Some(start)
}

/// A process's start time in clock ticks since boot (`/proc/<pid>/stat`,
/// field 22); `None` when it does not exist (or is a zombie).
pub(crate) fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Brings a run's state up to date: a run that says it is starting or
/// running but whose supervisor is gone is marked failed, and what it left
/// (container, network, firewall rules) is removed, since a container whose
/// proxy is gone must not go on. Errors while cleaning are recorded in the
/// run's `error`.
pub fn refresh(home: &Path, meta: RunMeta) -> RunMeta {
    if meta.state.is_terminal() && meta.cleaned {
        return meta;
    }
    let alive = match meta.supervisor {
        Some((pid, start)) => process_alive(pid, start),
        // Between creation and the supervisor recording itself: give it a
        // moment rather than declare it dead.
        None => age_secs(&meta.created_at) < 30,
    };
    if alive {
        return meta;
    }
    if meta.state.is_terminal() {
        // The supervisor died after the run ended but before cleaning up.
        let cleanup = cleanup_blocking(home, &meta);
        return update_meta(&run_dir(home, &meta.id), |m| match &cleanup {
            Ok(()) => m.cleaned = true,
            Err(e) => m.error = Some(format!("cleaning up failed: {e}")),
        })
        .unwrap_or(meta);
    }
    let dir = run_dir(home, &meta.id);
    let cleanup = cleanup_blocking(home, &meta);
    let cleaned = cleanup.is_ok();
    let message = match (&meta.supervisor, cleanup) {
        (Some((pid, _)), Ok(())) => format!(
            "the run's supervisor (pid {pid}) exited unexpectedly; the container was stopped"
        ),
        (Some((pid, _)), Err(e)) => {
            format!("the run's supervisor (pid {pid}) exited unexpectedly; cleaning up failed: {e}")
        }
        (None, _) => "the run's supervisor never started".to_string(),
    };
    update_meta(&dir, |m| {
        if !m.state.is_terminal() {
            m.state = RunState::Failed;
            m.error = Some(message.clone());
            m.stopped_at = Some(now());
        }
        m.cleaned = cleaned;
    })
    .unwrap_or(meta)
}

fn age_secs(rfc3339: &str) -> i64 {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .map(|t| (time::OffsetDateTime::now_utc() - t).whole_seconds())
        .unwrap_or(i64::MAX)
}

fn cleanup_blocking(home: &Path, meta: &RunMeta) -> Result<()> {
    let meta = meta.clone();
    let home = home.to_path_buf();
    run_async(async move { cleanup(&home, &meta).await })
}

/// Removes a run's routes, and stops a router that was started for runs
/// (not by hand) once nothing is left to route.
pub(crate) fn release_routes(home: &Path, name: &str, id: &str) -> Result<()> {
    crate::routing::table::unregister(home, name, id)?;
    crate::routing::daemon::stop_if_idle(home)
}

/// Removes what a run holds on the host: container, firewall rules, network.
pub(crate) async fn cleanup(home: &Path, meta: &RunMeta) -> Result<()> {
    let docker = Docker::connect().await?;
    let mut first_err = None;
    if let Some(c) = &meta.container {
        docker.remove(c).await?;
        // The rules stay while the container may still run.
        if docker.state(c).await?.is_some() {
            return Err(Error::new(
                ErrorKind::Runtime,
                format!("container {c} is still there; its firewall rules are kept"),
            ));
        }
    }
    if let Err(e) = firewall::remove(&meta.id) {
        first_err.get_or_insert(e);
    }
    if let Some(n) = &meta.network {
        if let Err(e) = docker.remove_network(n).await {
            first_err.get_or_insert(e);
        }
    }
    if let Err(e) = release_routes(home, &meta.name, &meta.id) {
        first_err.get_or_insert(e);
    }
    first_err.map_or(Ok(()), Err)
}

/// Runs a future to completion from sync code, whether or not a runtime is
/// already running on this thread.
fn run_async<T: Send + 'static>(
    fut: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    if tokio::runtime::Handle::try_current().is_ok() {
        // Inside a runtime (an async caller): run on a helper thread.
        return std::thread::spawn(move || crate::blocking::block_on_fresh(fut))
            .join()
            .map_err(|_| Error::new(ErrorKind::Internal, "a helper thread panicked"))?;
    }
    crate::blocking::block_on(fut)?
}

/// Runs a future to completion from sync code on a runtime of its own, so
/// that it may borrow from the caller (unlike [`run_async`]).
fn run_async_local<T>(fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "a blocking moat call was made from inside an async runtime",
        ));
    }
    crate::blocking::block_on_fresh(fut)
}

/// Makes `cmd` start in a session of its own, so that closing the
/// starter's terminal or a Ctrl+C aimed at the starter does not reach it
/// (the supervisor, the router).
pub(crate) fn detach(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe, as pre_exec requires.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
}

/// How the supervisor process is started.
#[derive(Debug, Clone, Default)]
pub struct Launcher {
    /// The program and arguments that run [`supervise`] (the CLI uses
    /// `moat _supervise`, Python `python -m moat._supervise`). When empty:
    /// `$MOAT_SUPERVISOR`, else a `moat` beside the current executable, else
    /// `moat` on `PATH`, each with `_supervise`.
    pub command: Vec<std::ffi::OsString>,
}

impl Launcher {
    /// A launcher running `program args...`.
    pub fn new(command: Vec<std::ffi::OsString>) -> Launcher {
        Launcher { command }
    }

    fn resolve(&self) -> Result<Vec<std::ffi::OsString>> {
        if !self.command.is_empty() {
            return Ok(self.command.clone());
        }
        if let Some(path) = std::env::var_os("MOAT_SUPERVISOR").filter(|p| !p.is_empty()) {
            return Ok(vec![path, "_supervise".into()]);
        }
        if let Some(beside) = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|p| p.join("moat")))
            .filter(|p| p.is_file())
        {
            return Ok(vec![beside.into(), "_supervise".into()]);
        }
        let on_path = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("moat"))
                .find(|p| p.is_file())
        });
        match on_path {
            Some(p) => Ok(vec![p.into(), "_supervise".into()]),
            None => Err(Error::new(
                ErrorKind::Runtime,
                "cannot find the `moat` program that supervises runs: install it on PATH or set MOAT_SUPERVISOR to its path",
            )),
        }
    }
}

/// What the supervisor tells its starter, one JSON object per line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub(crate) enum Event {
    Progress { message: String },
    Ready,
    Error { kind: String, message: String },
}

/// What the starter hands the supervisor on its standard input.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Handoff {
    pub home: PathBuf,
    pub id: String,
    pub spec: RunSpec,
    /// The command that started the supervisor, from which the router's is
    /// made (`moat _supervise` → `moat _router`).
    #[serde(default)]
    pub launcher: Vec<String>,
}

/// The router's command, from the supervisor's: the last word
/// `_supervise` (or module `moat._supervise`) becomes `_router`.
pub(crate) fn router_command(launcher: &[String]) -> Vec<std::ffi::OsString> {
    let mut command: Vec<std::ffi::OsString> = launcher.iter().map(Into::into).collect();
    if let Some(last) = launcher.last() {
        if let Some(prefix) = last.strip_suffix("_supervise") {
            if let Some(slot) = command.last_mut() {
                *slot = format!("{prefix}_router").into();
            }
        }
    }
    command
}

fn kind_of(name: &str) -> ErrorKind {
    match name {
        "config" => ErrorKind::Config,
        "io" => ErrorKind::Io,
        "invalid_argument" => ErrorKind::InvalidArgument,
        "internal" => ErrorKind::Internal,
        _ => ErrorKind::Runtime,
    }
}

/// Checks a run name: 1 to 63 characters, lowercase letters, digits and
/// hyphens, starting with a letter or digit (it becomes a hostname label).
pub fn check_name(name: &str) -> Result<()> {
    crate::config::check_name(name, "run name")
        .map_err(|e| Error::new(ErrorKind::InvalidArgument, e))
}

/// Creates a run and starts its supervisor, which sets it up; returns once
/// the container has started (or setup failed, with the reason). `progress`
/// receives setup messages (image pulls).
pub fn start(
    home: &Path,
    spec: &RunSpec,
    launcher: &Launcher,
    progress: &mut dyn FnMut(&str),
) -> Result<RunMeta> {
    spec.policy_mode()?;
    if let Some(name) = &spec.name {
        check_name(name)?;
    }
    let workspace = std::fs::canonicalize(&spec.workspace)
        .map_err(|e| Error::io(&spec.workspace, "open workspace", e))?;
    if !workspace.is_dir() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("workspace {} is not a directory", workspace.display()),
        ));
    }
    let mut spec = spec.clone();
    spec.workspace = workspace;
    check_mounts(home, &spec)?;
    let command = launcher.resolve()?;
    let runs = runs_dir(home);
    crate::paths::private_dir(&runs)?;
    let meta = {
        let _lock = FileLock::acquire(&runs.join(".lock"))?;
        let id = new_run_id()?;
        let name = spec.name.clone().unwrap_or_else(|| generated_name(&id));
        if let Some(other) = list(home)?
            .into_iter()
            .find(|r| r.name == name && !r.state.is_terminal())
        {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("Name already in use: \"{name}\" is the name of running run {}; choose another with --name or stop that run", other.id),
            ));
        }
        let meta = RunMeta {
            id: id.clone(),
            name,
            state: RunState::Starting,
            workspace: spec.workspace.clone(),
            image: spec.image.clone(),
            command: spec.command.clone(),
            grants: spec.grants.clone(),
            env: spec.env.keys().cloned().collect(),
            secrets: spec.secrets.keys().cloned().collect(),
            policy: spec.policy.clone(),
            ports: spec.ports.clone(),
            urls: BTreeMap::new(),
            interactive: spec.interactive,
            container: None,
            network: None,
            proxy: None,
            user: None,
            supervisor: None,
            created_at: now(),
            started_at: None,
            stopped_at: None,
            exit_code: None,
            error: None,
            phases: BTreeMap::new(),
            cleaned: false,
        };
        let dir = run_dir(home, &id);
        crate::paths::private_dir(&dir)?;
        save_meta(&dir, &meta)?;
        meta
    };
    let dir = run_dir(home, &meta.id);
    let log_path = dir.join("supervisor.log");
    let log = std::fs::File::create(&log_path).map_err(|e| Error::io(&log_path, "create", e))?;
    let mut cmd = std::process::Command::new(&command[0]);
    cmd.args(&command[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log)
        .env("MOAT_HOME", home);
    detach(&mut cmd);
    let mut child = cmd.spawn().map_err(|e| {
        let message = format!(
            "cannot start the run's supervisor ({}): {e}",
            command[0].to_string_lossy()
        );
        let _ = update_meta(&dir, |m| {
            m.state = RunState::Failed;
            m.error = Some(message.clone());
        });
        Error::new(ErrorKind::Runtime, message)
    })?;
    let handoff = Handoff {
        home: home.to_path_buf(),
        id: meta.id.clone(),
        spec,
        launcher: command
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect(),
    };
    let written = child.stdin.take().map(|mut stdin| {
        serde_json::to_writer(&mut stdin, &handoff)
            .map_err(std::io::Error::other)
            .and_then(|()| stdin.write_all(b"\n"))
    });
    if let Some(Err(e)) = written {
        return Err(Error::new(
            ErrorKind::Runtime,
            format!("cannot hand the run to its supervisor: {e}"),
        ));
    }
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| Error::new(ErrorKind::Internal, "the supervisor has no output pipe"))?;
    // Reap the supervisor when it exits, so it never lingers as a zombie
    // of a long-lived caller (a Python harness).
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    for line in std::io::BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        match serde_json::from_str::<Event>(&line) {
            Ok(Event::Progress { message }) => progress(&message),
            Ok(Event::Ready) => return load_meta(&dir),
            Ok(Event::Error { kind, message }) => return Err(Error::new(kind_of(&kind), message)),
            Err(_) => {}
        }
    }
    let meta = refresh(home, load_meta(&dir)?);
    Err(Error::new(
        ErrorKind::Runtime,
        format!(
            "the run's supervisor exited before the run started{}; see {}",
            meta.error.map(|e| format!(" ({e})")).unwrap_or_default(),
            log_path.display()
        ),
    ))
}

/// Whether a run is over, for loops that follow it: reads `run.json` each
/// time and checks that the supervisor is alive about once a second (a run
/// whose supervisor died is over too, see [`refresh`]).
#[derive(Debug)]
pub struct Watch {
    home: PathBuf,
    id: String,
    last_refresh: std::time::Instant,
}

impl Watch {
    /// Watches run `id` under `home`.
    pub fn new(home: &Path, id: &str) -> Watch {
        Watch {
            home: home.to_path_buf(),
            id: id.to_string(),
            last_refresh: std::time::Instant::now(),
        }
    }

    /// Is the run over? A run that cannot be read any more is over.
    pub fn is_over(&mut self) -> bool {
        let Ok(meta) = load_meta(&run_dir(&self.home, &self.id)) else {
            return true;
        };
        if meta.state.is_terminal() {
            return true;
        }
        if self.last_refresh.elapsed() >= Duration::from_secs(1) {
            self.last_refresh = std::time::Instant::now();
            return refresh(&self.home, meta).state.is_terminal();
        }
        false
    }
}

/// Waits until a run is over; its final metadata. With a timeout, returns
/// the current metadata when it runs out.
pub fn wait(home: &Path, id: &str, timeout: Option<Duration>) -> Result<RunMeta> {
    wait_until(home, id, timeout, |m| m.state.is_terminal())
}

/// Waits until a run is over and what it held on the host is removed.
pub fn wait_cleaned(home: &Path, id: &str, timeout: Option<Duration>) -> Result<RunMeta> {
    wait_until(home, id, timeout, |m| m.state.is_terminal() && m.cleaned)
}

fn wait_until(
    home: &Path,
    id: &str,
    timeout: Option<Duration>,
    over: impl Fn(&RunMeta) -> bool,
) -> Result<RunMeta> {
    let dir = run_dir(home, id);
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    let mut delay = Duration::from_millis(2);
    loop {
        let meta = refresh(home, load_meta(&dir)?);
        if over(&meta) {
            return Ok(meta);
        }
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            return Ok(meta);
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(20));
    }
}

/// Stops a run: the container gets SIGTERM and, after `grace_secs`, SIGKILL;
/// the supervisor then records the exit and cleans up. When the supervisor
/// is gone, this cleans up itself. Returns the final metadata.
pub fn stop(home: &Path, id: &str, grace_secs: u32) -> Result<RunMeta> {
    let meta = refresh(home, load_meta(&run_dir(home, id))?);
    if meta.state.is_terminal() {
        return wait_cleaned(home, id, Some(Duration::from_secs(30)));
    }
    if meta.state == RunState::Starting {
        // Still setting up: ask the supervisor to give up (it removes what
        // it created; a container not started yet would ignore a stop).
        if let Some((pid, start)) = meta.supervisor {
            if process_alive(pid, start) {
                // SAFETY: sending a signal to a process we checked is ours.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
        }
    } else if let Some(container) = meta.container.clone() {
        run_async(async move {
            let docker = Docker::connect().await?;
            docker.stop(&container, grace_secs).await
        })?;
    }
    wait_cleaned(home, id, Some(Duration::from_secs(30)))
}

/// Removes a run and its artifacts; a running run is stopped first.
pub fn destroy(home: &Path, id: &str) -> Result<()> {
    let meta = stop(home, id, 10)?;
    if !meta.state.is_terminal() || !meta.cleaned {
        return Err(Error::new(
            ErrorKind::Runtime,
            format!("run {id} did not stop and clean up within 30 s; not removed"),
        ));
    }
    let dir = run_dir(home, id);
    std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, "remove", e))
}

/// What [`clean`] removed.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Cleaned {
    /// Runs whose artifacts were removed.
    pub runs: Vec<String>,
    /// Containers removed that no live run owned.
    pub containers: Vec<String>,
    /// Networks removed that no live run owned.
    pub networks: Vec<String>,
}

/// The stopped and failed runs that [`clean`] would remove.
pub fn cleanable(home: &Path) -> Result<Vec<RunMeta>> {
    Ok(list(home)?
        .into_iter()
        .filter(|r| r.state.is_terminal() && r.cleaned)
        .collect())
}

/// Removes stopped and failed runs, and any container, network or firewall
/// chain this home's runs left behind (a run whose supervisor died before
/// cleaning up). Runs of other moat homes on the same engine are never
/// touched: moat labels what it creates with its home.
pub fn clean(home: &Path) -> Result<Cleaned> {
    let mut out = Cleaned::default();
    // Runs that just ended are cleaned up by their supervisors in a moment.
    for run in list(home)? {
        if run.state.is_terminal() && !run.cleaned {
            wait_cleaned(home, &run.id, Some(Duration::from_secs(30)))?;
        }
    }
    for run in cleanable(home)? {
        // Should a chain have outlived the run, it goes with it.
        firewall::remove(&run.id)?;
        let dir = run_dir(home, &run.id);
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, "remove", e))?;
        out.runs.push(run.id);
    }
    // Runs still running, or ended but still being cleaned up by their
    // supervisor, keep what they hold.
    let live: Vec<String> = list(home)?
        .into_iter()
        .filter(|r| !(r.state.is_terminal() && r.cleaned))
        .map(|r| r.id)
        .collect();
    let mine = format!("{}={}", crate::runtime::HOME_LABEL, home.to_string_lossy());
    // A run may have started since `live` was read: just before touching
    // an object, its run must still be over (or have no directory at all).
    let home_dir = home.to_path_buf();
    let leftover = move |run: &str| -> bool {
        if live.iter().any(|l| l == run) {
            return false;
        }
        match load_meta(&run_dir(&home_dir, run)) {
            Ok(m) => m.state.is_terminal() && m.cleaned,
            Err(_) => !run_dir(&home_dir, run).exists(),
        }
    };
    let (containers, networks) = run_async(async move {
        let docker = Docker::connect().await?;
        let mut containers = Vec::new();
        for (id, run) in docker.containers_with_label(&mine).await? {
            if is_run_id(&run) && leftover(&run) {
                docker.remove(&id).await?;
                containers.push(id);
            }
        }
        let mut networks = Vec::new();
        for (name, run) in docker.networks_with_label(&mine).await? {
            if is_run_id(&run) && leftover(&run) {
                // The network goes first: it cannot while a container is
                // on it, and then its rules must stay.
                docker.remove_network(&name).await?;
                firewall::remove(&run)?;
                networks.push(name);
            }
        }
        Ok((containers, networks))
    })?;
    out.containers = containers;
    out.networks = networks;
    Ok(out)
}

/// A run's whole output so far: (stdout, stderr) bytes.
pub fn output(home: &Path, id: &str) -> Result<(Vec<u8>, Vec<u8>)> {
    let mut out = (Vec::new(), Vec::new());
    for chunk in logs::read_all(&run_dir(home, id).join("logs.jsonl"))? {
        match chunk.stream {
            logs::Stream::Stdout => out.0.extend(chunk.data),
            logs::Stream::Stderr | logs::Stream::Moat => out.1.extend(chunk.data),
        }
    }
    Ok(out)
}

/// The network trace of a run, from `network.jsonl`.
pub fn trace(home: &Path, id: &str) -> Result<Vec<serde_json::Value>> {
    let path = run_dir(home, id).join("network.jsonl");
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(&path, "read", e)),
    };
    // Complete lines only: the last may still be being written.
    Ok(bytes
        .split_inclusive(|b| *b == b'\n')
        .filter(|l| l.ends_with(b"\n"))
        .filter_map(|l| serde_json::from_slice(l).ok())
        .collect())
}

/// Seconds since the Unix epoch of an RFC 3339 time.
pub fn parse_time(rfc3339: &str) -> Result<i64> {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|e| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!("bad time \"{rfc3339}\": {e}"),
            )
        })
}

/// An image and how many runs used it.
#[derive(Debug, Clone, Serialize)]
pub struct ImageUse {
    /// The image.
    pub image: String,
    /// Runs that used it.
    pub runs: usize,
    /// Present in the engine (`None` when the engine cannot be asked).
    pub present: Option<bool>,
}

/// One health check.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it is fine.
    pub ok: bool,
    /// What was found.
    pub detail: String,
}

/// `moat status`: runs, images, disk use, health.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Runs starting or running.
    pub running: usize,
    /// Runs stopped.
    pub stopped: usize,
    /// Runs failed.
    pub failed: usize,
    /// Bytes under the runs directory.
    pub disk_bytes: u64,
    /// The runs directory.
    pub runs_dir: PathBuf,
    /// Images used by runs.
    pub images: Vec<ImageUse>,
    /// Health checks.
    pub health: Vec<Check>,
}

fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Gathers [`Status`].
pub fn status(home: &Path) -> Result<Status> {
    let runs = list(home)?;
    let mut images: BTreeMap<String, usize> = BTreeMap::new();
    for r in &runs {
        *images.entry(r.image.clone()).or_default() += 1;
    }
    let names: Vec<String> = images.keys().cloned().collect();
    let engine = run_async(async move {
        let docker = Docker::connect().await?;
        let info = docker.ping().await?;
        let mut present = Vec::new();
        for image in &names {
            present.push(docker.has_image(image).await.ok());
        }
        Ok((info, present))
    });
    let mut health = Vec::new();
    let present = match engine {
        Ok((info, present)) => {
            health.push(Check {
                name: "docker".into(),
                ok: true,
                detail: format!("engine {} at {}", info.version, info.host),
            });
            present
        }
        Err(e) => {
            health.push(Check {
                name: "docker".into(),
                ok: false,
                detail: e.to_string(),
            });
            Vec::new()
        }
    };
    health.push(match firewall::check() {
        Ok(()) => Check {
            name: "strict mode".into(),
            ok: true,
            detail: "host firewall rules can be installed".into(),
        },
        Err(e) => Check {
            name: "strict mode".into(),
            ok: false,
            detail: e.to_string(),
        },
    });
    let ca = home.join("proxy").join("ca").join("ca.crt");
    health.push(Check {
        name: "proxy CA".into(),
        ok: true,
        detail: if ca.exists() {
            format!("{}", ca.display())
        } else {
            "not created yet (made by the first run or proxy)".into()
        },
    });
    Ok(Status {
        running: runs.iter().filter(|r| !r.state.is_terminal()).count(),
        stopped: runs.iter().filter(|r| r.state == RunState::Stopped).count(),
        failed: runs.iter().filter(|r| r.state == RunState::Failed).count(),
        disk_bytes: dir_size(&runs_dir(home)),
        runs_dir: runs_dir(home),
        images: images
            .into_iter()
            .enumerate()
            .map(|(i, (image, runs))| ImageUse {
                image,
                runs,
                present: present.get(i).copied().flatten(),
            })
            .collect(),
        health,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_are_run_and_12_hex() {
        let id = new_run_id().unwrap();
        assert_eq!(id.len(), 16);
        assert!(id.starts_with("run_"));
        assert!(id[4..].chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(id, new_run_id().unwrap());
    }

    #[test]
    fn generated_names_are_valid_run_names() {
        for _ in 0..50 {
            let name = generated_name(&new_run_id().unwrap());
            check_name(&name).unwrap();
        }
    }

    #[test]
    fn own_process_is_alive_and_a_wrong_start_time_is_not() {
        let pid = std::process::id();
        let start = process_start_time(pid).unwrap();
        assert!(process_alive(pid, start));
        assert!(!process_alive(pid, start + 1));
        assert!(!process_alive(u32::MAX - 1, start));
    }

    #[test]
    fn bad_names_are_refused_before_anything_is_created() {
        let home = tempfile::tempdir().unwrap();
        let mut spec = RunSpec::from_config(&Config::defaults(home.path()));
        spec.name = Some("Bad Name!".into());
        let err = start(
            home.path(),
            &spec,
            &Launcher::new(vec!["/bin/false".into()]),
            &mut |_| {},
        )
        .unwrap_err();
        assert!(err.to_string().contains("run name"), "{err}");
        assert!(!runs_dir(home.path()).exists());
    }

    #[test]
    fn finding_runs_by_id_prefix_and_name() {
        let home = tempfile::tempdir().unwrap();
        let mut ids = Vec::new();
        for (i, name) in ["alpha", "beta"].iter().enumerate() {
            let id = format!("run_00000000000{i}");
            let dir = run_dir(home.path(), &id);
            std::fs::create_dir_all(&dir).unwrap();
            let meta = RunMeta {
                id: id.clone(),
                name: name.to_string(),
                state: RunState::Stopped,
                workspace: home.path().into(),
                image: "img".into(),
                command: None,
                grants: vec![],
                env: vec![],
                secrets: vec![],
                policy: "permissive".into(),
                ports: BTreeMap::new(),
                urls: BTreeMap::new(),
                interactive: false,
                container: None,
                network: None,
                proxy: None,
                user: None,
                supervisor: None,
                created_at: format!("2026-01-0{}T00:00:00Z", i + 1),
                started_at: None,
                stopped_at: None,
                exit_code: Some(0),
                error: None,
                phases: BTreeMap::new(),
                cleaned: true,
            };
            save_meta(&dir, &meta).unwrap();
            ids.push(id);
        }
        assert_eq!(find(home.path(), None).unwrap().name, "beta");
        assert_eq!(find(home.path(), Some("alpha")).unwrap().id, ids[0]);
        assert_eq!(find(home.path(), Some(&ids[1])).unwrap().name, "beta");
        let ambiguous = find(home.path(), Some("run_0000")).unwrap_err();
        assert!(
            ambiguous.to_string().contains("matches 2 runs"),
            "{ambiguous}"
        );
        assert_eq!(
            find(home.path(), Some("run_000000000001")).unwrap().name,
            "beta"
        );
        let missing = find(home.path(), Some("gamma")).unwrap_err();
        assert!(
            missing.to_string().contains("no run matches \"gamma\""),
            "{missing}"
        );
        // A run.json that claims another id (or a path) is not listed: its
        // id would steer clean and destroy elsewhere.
        let forged = run_dir(home.path(), "run_00000000000f");
        std::fs::create_dir_all(&forged).unwrap();
        let mut meta = find(home.path(), Some("alpha")).unwrap();
        meta.id = "../../..".into();
        save_meta(&forged, &meta).unwrap();
        assert_eq!(list(home.path()).unwrap().len(), 2);
        assert!(!is_run_id("../../.."));
        assert!(!is_run_id("run_00000000000G"));
        assert!(is_run_id("run_00000000000f"));
    }
}
