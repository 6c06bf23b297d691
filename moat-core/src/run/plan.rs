//! A run's plan: everything a run needs, typed, built by one function
//! ([`RunPlan::new`]) from a workspace's configuration and the caller's
//! overrides. The CLI, Python and C all plan runs this way, and the plan is
//! handed to the supervisor as it is: nothing is turned into text and parsed
//! again on the way.
//!
//! A plan holds no secret value: grants and secrets are names and
//! references, resolved by the supervisor on the host.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{self, Config, GrantRef, Mount, Network, Overrides, SecretRef};
use crate::error::{Error, ErrorKind, Result};
use crate::runtime::Engine;

/// Everything a run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunPlan {
    /// The run's name; generated when `None`.
    pub name: Option<String>,
    /// The workspace on the host, mounted at `/workspace`.
    pub workspace: PathBuf,
    /// The image.
    pub image: String,
    /// What chose the image (said when it cannot be had).
    #[serde(default)]
    pub image_source: config::ImageSource,
    /// How `dependencies:` make `image`, when they chose it: the
    /// supervisor pulls or builds it ([`crate::deps::ensure`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deps: Option<crate::deps::Recipe>,
    /// The command; the image's default when `None`.
    pub command: Option<Vec<String>>,
    /// Environment variables.
    pub env: BTreeMap<String, String>,
    /// Secrets to resolve into variables, by variable name.
    pub secrets: BTreeMap<String, SecretRef>,
    /// Grants to bind.
    pub grants: Vec<GrantRef>,
    /// The network policy and allow list.
    pub network: Network,
    /// Extra mounts.
    pub mounts: Vec<Mount>,
    /// Endpoints: name → container port.
    pub ports: BTreeMap<String, u16>,
    /// Interactive (TTY) run.
    pub interactive: bool,
    /// The container engine; `None` chooses the one present when the run
    /// starts ([`crate::runtime::choose`]).
    pub engine: Option<Engine>,
    /// The agent preset, when the run is of a known agent
    /// ([`RunPlan::claude`]): its image is made from `image` at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<crate::agent::AgentPlan>,
    /// The host directories the run mounts, as they were when the run's
    /// mounts were checked (filled by `run::start`): the supervisor mounts
    /// them only if each is still the same directory (`Pinned::verify`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pinned: Vec<Pinned>,
}

/// A checked mount source: its canonical path and the identity (device,
/// inode) of what was there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pinned {
    /// The canonical path.
    pub path: PathBuf,
    /// The device of what was there.
    pub dev: u64,
    /// Its inode.
    pub ino: u64,
}

impl Pinned {
    /// Pins `path` (canonical) as it is now.
    pub(crate) fn now(path: &Path) -> Result<Pinned> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(path).map_err(|e| Error::io(path, "read", e))?;
        Ok(Pinned {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// Fails unless `path` still names, without any link on the way, what
    /// it named when pinned. Someone who can write the directory above a
    /// workspace could otherwise swap it for a link (to the moat home, to
    /// `/etc`) between the check and the mount, and a root run would mount
    /// that, as its owner.
    pub(crate) fn verify(&self) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let changed = |why: &str| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "{} changed since the run's mounts were checked ({why}); nothing was mounted",
                    self.path.display()
                ),
            )
        };
        let now = std::fs::symlink_metadata(&self.path).map_err(|e| changed(&e.to_string()))?;
        if now.file_type().is_symlink() {
            return Err(changed("it is a link now"));
        }
        if (now.dev(), now.ino()) != (self.dev, self.ino) {
            return Err(changed("it is another file now"));
        }
        match std::fs::canonicalize(&self.path) {
            Ok(real) if real == self.path => Ok(()),
            Ok(real) => Err(changed(&format!("it leads to {} now", real.display()))),
            Err(e) => Err(changed(&e.to_string())),
        }
    }
}

impl RunPlan {
    /// Plans a run: loads the workspace's configuration (its `agent.yaml`,
    /// if any), applies the overrides and validates the result. Errors name
    /// the file, line and column, or the override.
    pub fn new(workspace: &Path, overrides: &Overrides) -> Result<RunPlan> {
        let config = config::load(workspace)?.merge(overrides)?;
        RunPlan::from_config(config)
    }

    /// The plan of a validated configuration. Fails only when the image
    /// comes from `dependencies` and `MOAT_DEPS_REGISTRY` cannot be read.
    pub fn from_config(config: Config) -> Result<RunPlan> {
        let (image, image_source) = config.resolved_image()?;
        let deps = config.image_recipe()?;
        Ok(RunPlan {
            name: config.name,
            workspace: config.workspace,
            image,
            image_source,
            deps,
            command: config.command,
            env: config.env,
            secrets: config.secrets,
            grants: config.grants,
            network: config.network,
            mounts: config.mounts,
            ports: config.ports,
            interactive: config.interactive,
            engine: config.runtime,
            agent: None,
            pinned: Vec::new(),
        })
    }
}
