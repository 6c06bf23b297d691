//! Agent presets: what running a known agent takes, as data on a run's
//! plan, so that a second agent is a new preset and not new plumbing. A
//! preset says which grants it implies, which hosts strict mode lets
//! through for it, its command, its environment, how its image is made
//! from the base image, and which files it keeps per workspace.
//!
//! [`claude`] is the first: Claude Code.

pub mod claude;

use serde::{Deserialize, Serialize};

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

/// What a caller chooses when running Claude Code.
#[derive(Debug, Clone, Default)]
pub struct ClaudeOptions {
    /// `-p`: answer this prompt and exit; interactive when `None`.
    pub prompt: Option<String>,
    /// Claude Code's version (`--claude-version`); the workspace's
    /// `claude.version`, else the one pinned in moat, when `None`.
    pub version: Option<String>,
    /// More arguments for `claude` (after `--`).
    pub args: Vec<String>,
}
