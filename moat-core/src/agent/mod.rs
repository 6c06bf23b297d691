//! Agent presets: what running a known agent takes, as data on a run's
//! plan, so that a second agent is a new preset and not new plumbing. A
//! preset says which grants it implies, which hosts strict mode lets
//! through for it, its command, its environment, how its image is made
//! from the base image, and which files it keeps per workspace.
//!
//! [`claude`] is the first: Claude Code.

pub mod claude;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::credential::Binding;
use crate::error::Result;
use crate::runtime::Runtime;

/// A known agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Agent {
    /// Claude Code.
    Claude,
}

impl Agent {
    /// Its name (`claude`).
    pub fn as_str(self) -> &'static str {
        match self {
            Agent::Claude => "claude",
        }
    }
}

impl std::str::FromStr for Agent {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Agent, String> {
        ALL.iter()
            .copied()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = ALL.iter().map(|a| a.as_str()).collect();
                format!(
                    "\"{s}\" is not an agent moat knows (expected {})",
                    known.join(", ")
                )
            })
    }
}

/// Every agent moat has a preset for.
pub const ALL: &[Agent] = &[Agent::Claude];

impl std::fmt::Display for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The agent of a run, on its plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentPlan {
    /// Which agent.
    pub agent: Agent,
    /// Its version (Claude Code's, as `claude --version` prints it).
    pub version: String,
}

/// What a caller chooses when running a known agent (`moat claude`).
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// `-p`: answer this prompt and exit; interactive when `None`.
    pub prompt: Option<String>,
    /// The agent's version (`--claude-version`); the workspace's
    /// (`claude.version`), else the one pinned in moat, when `None`.
    pub version: Option<String>,
    /// More arguments for `claude` (after `--`).
    pub args: Vec<String>,
}

/// The options of `moat claude`, by their earlier name.
#[deprecated(note = "renamed AgentOptions: the options of any agent's run")]
pub type ClaudeOptions = AgentOptions;

/// What a preset's per-workspace state is made ready with, on the host,
/// before the container starts.
pub struct StateContext<'a> {
    /// The moat home (the state lives under it).
    pub home: &'a Path,
    /// The run's workspace.
    pub workspace: &'a Path,
    /// The run's grants, bound: their placeholder variables, the OAuth
    /// login's subscription.
    pub binding: &'a Binding,
    /// The agent's user and group: what it writes must be theirs.
    pub uid: u32,
    /// The agent's group.
    pub gid: u32,
    /// Where a warning for the user goes (the run's progress).
    pub warn: &'a (dyn Fn(&str) + Send + Sync),
}

impl std::fmt::Debug for StateContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateContext")
            .field("home", &self.home)
            .field("workspace", &self.workspace)
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .finish_non_exhaustive()
    }
}

/// A directory of the host that the agent's container gets, read-write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateMount {
    /// On the host.
    pub source: PathBuf,
    /// In the container.
    pub target: String,
}

/// What running a known agent takes. The plan ([`crate::run::RunPlan`]'s
/// `agent`) and the supervisor ask a preset and nothing else, so a second
/// agent is a second implementation of this trait and an [`Agent`] variant.
#[async_trait::async_trait]
pub trait Preset: Send + Sync {
    /// Which agent.
    fn agent(&self) -> Agent;

    /// The grants it implies (added when the user did not grant them).
    fn grants(&self) -> &'static [&'static str];

    /// The hosts strict mode lets through for it, beyond its grants'.
    fn hosts(&self) -> &'static [&'static str];

    /// Its environment (the user's own values win).
    fn env(&self) -> &'static [(&'static str, &'static str)];

    /// Its command: interactive without `prompt`, else answering it and
    /// exiting; `args` after the preset's own.
    fn command(&self, prompt: Option<&str>, args: &[String]) -> Vec<String>;

    /// The version a run uses: `asked` (a flag, else the workspace's
    /// configuration), checked, else the one pinned in moat.
    fn version(&self, asked: Option<&str>) -> Result<String>;

    /// The version the workspace's configuration asks for, if any.
    fn configured_version(&self, config: &crate::config::Config) -> Option<String>;

    /// Variables of the run's grants it must not get (it reads their
    /// placeholders from its state files instead).
    fn hidden_env(&self) -> &'static [&'static str] {
        &[]
    }

    /// Its image, made from the base image `base` (whose id is `base_id`)
    /// on `runtime` or reused: its tag and id. `labels` mark what is made
    /// on the engine meanwhile (the run's, so its cleanup finds them).
    #[allow(clippy::too_many_arguments)]
    async fn image(
        &self,
        home: &Path,
        runtime: &dyn Runtime,
        base: &str,
        base_id: &str,
        version: &str,
        labels: &BTreeMap<String, String>,
        progress: &(dyn for<'m> Fn(&'m str) + Send + Sync),
    ) -> Result<(String, String)>;

    /// Makes its per-workspace state ready on the host (never a secret in
    /// it) and says where it is mounted; `None` when it keeps none.
    fn state(&self, _cx: &StateContext<'_>) -> Result<Option<StateMount>> {
        Ok(None)
    }
}

/// The preset of `agent`.
pub fn preset(agent: Agent) -> &'static dyn Preset {
    match agent {
        Agent::Claude => &claude::Claude,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_agent_has_a_preset_and_is_named_by_its_name() {
        for agent in ALL {
            assert_eq!(agent.as_str().parse::<Agent>(), Ok(*agent));
            assert_eq!(preset(*agent).agent(), *agent);
            assert!(!preset(*agent).grants().is_empty(), "{agent}");
        }
        let err = "codex".parse::<Agent>().unwrap_err();
        assert!(err.contains("\"codex\"") && err.contains("claude"), "{err}");
    }
}
