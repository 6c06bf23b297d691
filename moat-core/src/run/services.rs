//! What a run's supervisor needs of the host besides the container engine:
//! its firewall and the routing proxy. Each is a trait with the real thing
//! behind it, so that the supervisor's logic (the order of its steps, what a
//! failure at each step leaves behind) can be tested with fakes in
//! milliseconds (`supervisor::tests`). The real things are tested for real
//! elsewhere (the run tests against Docker and iptables).

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use crate::error::Result;
use crate::runtime::Runtime;

/// The host firewall: strict mode's rules and the proxy's guard.
pub(crate) trait Firewall: Send + Sync {
    /// Can rules be installed here?
    fn check(&self) -> Result<()>;
    /// Strict mode: from `bridge`, only TCP to `gateway` on `ports`.
    fn install(&self, run: &str, bridge: &str, gateway: IpAddr, ports: &[u16]) -> Result<()>;
    /// The guard of the run's listeners: only its bridge and the host.
    fn guard(&self, run: &str, bridge: &str, gateway: IpAddr, ports: &[u16]) -> Result<()>;
    /// Removes whatever rules the run has; none is fine.
    fn remove(&self, run: &str) -> Result<()>;
    /// The runs (any moat home's) that have rules here.
    fn runs_with_rules(&self) -> Vec<String> {
        Vec::new()
    }
    /// Does the run's network bridge exist on this host?
    fn bridge_exists(&self, _run: &str) -> bool {
        false
    }
}

/// The routing proxy: a router process per moat home, and the route table.
pub(crate) trait Routes: Send + Sync {
    /// Makes sure a router serves `home` (started with `command` if none
    /// does); its port.
    fn ensure(&self, home: &Path, command: &[std::ffi::OsString]) -> Result<u16>;
    /// Routes `name`'s endpoints (name → `ip:port`).
    fn register(
        &self,
        home: &Path,
        name: &str,
        run: &str,
        endpoints: std::collections::BTreeMap<String, String>,
    ) -> Result<()>;
    /// Removes the run's routes (and a router started for runs, when idle).
    fn release(&self, home: &Path, name: &str, run: &str) -> Result<()>;
}

/// Everything a supervisor works with.
#[derive(Clone)]
pub(crate) struct Services {
    pub runtime: Arc<dyn Runtime>,
    pub firewall: Arc<dyn Firewall>,
    pub routes: Arc<dyn Routes>,
    /// The user's SSH agent (`SSH_AUTH_SOCK`), which a run's filtering
    /// agent asks to sign for its `ssh:` grants.
    pub ssh_agent: Option<std::path::PathBuf>,
}

impl Services {
    /// The real ones: the engine `runtime`, the host's netfilter, the
    /// routing daemon.
    pub(crate) fn real(runtime: Arc<dyn Runtime>) -> Services {
        Services {
            runtime,
            firewall: Arc::new(Netfilter),
            routes: Arc::new(RouterDaemon),
            ssh_agent: crate::credential::ssh::agent_socket(),
        }
    }
}

/// The host's netfilter, through iptables (`super::firewall`).
pub(crate) struct Netfilter;

impl Firewall for Netfilter {
    fn check(&self) -> Result<()> {
        super::firewall::check()
    }
    fn install(&self, run: &str, bridge: &str, gateway: IpAddr, ports: &[u16]) -> Result<()> {
        super::firewall::install(run, bridge, gateway, ports)
    }
    fn guard(&self, run: &str, bridge: &str, gateway: IpAddr, ports: &[u16]) -> Result<()> {
        super::firewall::guard(run, bridge, gateway, ports)
    }
    fn remove(&self, run: &str) -> Result<()> {
        super::firewall::remove(run)
    }
    fn runs_with_rules(&self) -> Vec<String> {
        super::firewall::runs_with_chains()
    }
    fn bridge_exists(&self, run: &str) -> bool {
        super::firewall::bridge_exists(run)
    }
}

/// What follows a run after its start needs of the host (stopping it,
/// cleaning up after it, `moat clean`, `moat status`): its engines, its
/// firewall, the router. The real ones in use; fakes in tests
/// (`lifecycle::tests`).
#[derive(Clone)]
pub(crate) struct Host {
    pub engines: Arc<dyn crate::runtime::Engines>,
    pub firewall: Arc<dyn Firewall>,
    pub routes: Arc<dyn Routes>,
}

impl Host {
    /// This host's engines, netfilter and routing daemon.
    pub(crate) fn real() -> Host {
        Host {
            engines: Arc::new(crate::runtime::HostEngines),
            firewall: Arc::new(Netfilter),
            routes: Arc::new(RouterDaemon),
        }
    }
}

/// The routing daemon and route table (`crate::routing`).
pub(crate) struct RouterDaemon;

impl Routes for RouterDaemon {
    fn ensure(&self, home: &Path, command: &[std::ffi::OsString]) -> Result<u16> {
        let port = match crate::routing::daemon::status(home) {
            Some(s) => s.port,
            None => crate::routing::daemon::default_port()?,
        };
        Ok(crate::routing::daemon::ensure(home, command, port, false)?.port)
    }
    fn register(
        &self,
        home: &Path,
        name: &str,
        run: &str,
        endpoints: std::collections::BTreeMap<String, String>,
    ) -> Result<()> {
        crate::routing::table::register(home, name, run, endpoints)
    }
    fn release(&self, home: &Path, name: &str, run: &str) -> Result<()> {
        super::release_routes(home, name, run)
    }
}
