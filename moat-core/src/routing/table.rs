//! The route table shared by every moat process on the machine:
//! `$MOAT_HOME/proxy/routes.json`, changed only under
//! `$MOAT_HOME/proxy/routes.lock` and written atomically, so runs register
//! and leave while the router reads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};

/// One agent's routes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRoutes {
    /// The run that registered them.
    pub run: String,
    /// Endpoint name → `address:port` the host reaches the container at.
    pub endpoints: BTreeMap<String, String>,
}

/// Every agent's routes, by agent name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routes {
    /// Agent name → its routes.
    pub agents: BTreeMap<String, AgentRoutes>,
}

/// The route table's file.
pub fn path(home: &Path) -> PathBuf {
    home.join("proxy").join("routes.json")
}

/// Reads the table (empty when there is none).
pub fn load(home: &Path) -> Result<Routes> {
    let p = path(home);
    match std::fs::read(&p) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            Error::new(
                ErrorKind::Io,
                format!("{}: not a route table: {e}", p.display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Routes::default()),
        Err(e) => Err(Error::io(&p, "read", e)),
    }
}

fn change(home: &Path, f: impl FnOnce(&mut Routes)) -> Result<()> {
    let dir = home.join("proxy");
    crate::paths::private_dir(&dir)?;
    let _lock = crate::paths::FileLock::acquire(&dir.join("routes.lock"))?;
    let mut routes = load(home)?;
    f(&mut routes);
    let json = serde_json::to_vec_pretty(&routes)
        .map_err(|e| Error::new(ErrorKind::Internal, format!("encoding routes: {e}")))?;
    crate::paths::write_private(&path(home), &json, 0o600)
}

/// Registers `agent`'s endpoints for `run`, replacing what it had.
pub fn register(
    home: &Path,
    agent: &str,
    run: &str,
    endpoints: BTreeMap<String, String>,
) -> Result<()> {
    change(home, |r| {
        r.agents.insert(
            agent.to_string(),
            AgentRoutes {
                run: run.to_string(),
                endpoints,
            },
        );
    })
}

/// Removes `agent`'s routes if `run` registered them (a later run of the
/// same name keeps its own).
pub fn unregister(home: &Path, agent: &str, run: &str) -> Result<()> {
    if !path(home).exists() {
        return Ok(());
    }
    change(home, |r| {
        if r.agents.get(agent).is_some_and(|a| a.run == run) {
            r.agents.remove(agent);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_replace_and_unregister_only_ones_own() {
        let home = tempfile::tempdir().unwrap();
        assert_eq!(load(home.path()).unwrap(), Routes::default());
        let web = BTreeMap::from([("web".to_string(), "172.18.0.2:3000".to_string())]);
        register(home.path(), "a", "run_000000000001", web.clone()).unwrap();
        register(home.path(), "b", "run_000000000002", web.clone()).unwrap();
        // Another run's exit does not remove a's routes.
        unregister(home.path(), "a", "run_000000000009").unwrap();
        assert_eq!(load(home.path()).unwrap().agents.len(), 2);
        unregister(home.path(), "a", "run_000000000001").unwrap();
        let routes = load(home.path()).unwrap();
        assert_eq!(routes.agents.keys().collect::<Vec<_>>(), vec!["b"]);
        assert_eq!(routes.agents["b"].endpoints, web);
    }
}
