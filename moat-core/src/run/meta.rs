//! A run's description on disk (`run.json`, [`RunMeta`]), its id and name,
//! and where its files are. `run.json` changes only under the run's lock.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::paths::FileLock;
use crate::policy::PolicyMode;
use crate::runtime::Engine;

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
    pub policy: PolicyMode,
    /// Endpoints: name → container port.
    pub ports: BTreeMap<String, u16>,
    /// The container engine the run is on.
    #[serde(default = "docker")]
    pub engine: Engine,
    /// The agent preset (`claude`), for runs of a known agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<crate::agent::Agent>,
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
    /// What went wrong, if anything: why the run failed, or, for a run that
    /// stopped, what of its output or cleanup could not be done (a full
    /// disk, say). The exit code is kept either way.
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

pub(super) fn docker() -> Engine {
    Engine::Docker
}

impl RunMeta {
    /// A run as it is created from its plan: starting, on `engine`, named
    /// as the plan says or else after its id, nothing of it on the host yet.
    pub(crate) fn starting(id: &str, plan: &super::RunPlan, engine: Engine) -> RunMeta {
        RunMeta {
            id: id.to_string(),
            name: plan.name.clone().unwrap_or_else(|| generated_name(id)),
            state: RunState::Starting,
            workspace: plan.workspace.clone(),
            image: plan.image.clone(),
            command: plan.command.clone(),
            grants: plan.grants.iter().map(ToString::to_string).collect(),
            env: plan.env.keys().cloned().collect(),
            secrets: plan.secrets.keys().cloned().collect(),
            policy: plan.network.policy,
            ports: plan.ports.clone(),
            engine,
            agent: plan.agent.as_ref().map(|a| a.agent),
            urls: BTreeMap::new(),
            interactive: plan.interactive,
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
        }
    }
}

#[cfg(test)]
impl RunMeta {
    /// A run for tests: `id`, `name` and `state`, stopped by nobody, on
    /// Docker, permissive, image `img`, everything else empty.
    pub(crate) fn sample(id: &str, name: &str, state: RunState) -> RunMeta {
        let plan = super::RunPlan::from_config(crate::config::Config::defaults(Path::new("/ws")))
            .expect("the default plan");
        RunMeta {
            name: name.into(),
            state,
            image: "img".into(),
            command: None,
            created_at: "2026-01-01T00:00:00Z".into(),
            ..RunMeta::starting(id, &plan, Engine::Docker)
        }
    }
}

/// The runs directory: `$MOAT_HOME/runs`.
pub fn runs_dir(home: &Path) -> PathBuf {
    home.join("runs")
}

fn meta_path(dir: &Path) -> PathBuf {
    dir.join("run.json")
}

/// The room a run sets aside when it is created (see `paths::reserve`).
pub(super) const RESERVE: &str = ".reserve";

/// Gives back a run's reserved room, once the run is over.
pub(crate) fn release_reserve(dir: &Path) {
    if let Err(e) = std::fs::remove_file(dir.join(RESERVE)) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a run's reserve");
        }
    }
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

pub(crate) fn save_meta(dir: &Path, meta: &RunMeta) -> Result<()> {
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

pub(crate) fn now() -> String {
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

pub(super) fn new_run_id() -> Result<String> {
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

pub(super) fn generated_name(id: &str) -> String {
    let n = u64::from_str_radix(id.trim_start_matches("run_"), 16).unwrap_or(0);
    let a = ADJECTIVES[(n % ADJECTIVES.len() as u64) as usize];
    let b = NOUNS[((n / 97) % NOUNS.len() as u64) as usize];
    format!("{a}-{b}")
}

/// The directory of a run.
pub fn run_dir(home: &Path, id: &str) -> PathBuf {
    runs_dir(home).join(id)
}

/// Applies `change` to `run.json`; when it cannot be written (a full disk),
/// to the metadata in hand, with why in its `error`: whoever asked still
/// learns that the run is over, and does not wait for it forever.
pub(super) fn record_or_keep(dir: &Path, meta: RunMeta, change: impl Fn(&mut RunMeta)) -> RunMeta {
    match update_meta(dir, &change) {
        Ok(updated) => updated,
        Err(e) => {
            let mut meta = meta;
            change(&mut meta);
            let note = format!("run.json could not be updated: {e}");
            meta.error = Some(match meta.error.take() {
                Some(before) => format!("{before}; {note}"),
                None => note,
            });
            meta
        }
    }
}

pub(super) fn age_secs(rfc3339: &str) -> i64 {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .map(|t| (time::OffsetDateTime::now_utc() - t).whole_seconds())
        .unwrap_or(i64::MAX)
}

/// Checks a run name: 1 to 63 characters, lowercase letters, digits and
/// hyphens, starting with a letter or digit (it becomes a hostname label).
pub fn check_name(name: &str) -> Result<()> {
    crate::config::check_name(name, "run name")
        .map_err(|e| Error::new(ErrorKind::InvalidArgument, e))
}

/// A run's `run.json`, or `None` when the run has been removed (`destroy`
/// and `clean` remove a run only once it is over and cleaned up).
pub(super) fn read_meta(dir: &Path) -> Result<Option<RunMeta>> {
    match load_meta(dir) {
        Ok(meta) => Ok(Some(meta)),
        Err(_) if !meta_path(dir).exists() => Ok(None),
        Err(e) => Err(e),
    }
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
}
