//! The host in memory for tests: firewall rules and routes kept in maps
//! (the engine's fake is `runtime::fake`).

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::services::{Firewall, Host, Routes};
use crate::error::{Error, ErrorKind, Result};
use crate::runtime::fake::{FakeEngines, FakeRuntime};
use crate::runtime::Engine;

/// Host firewall rules, in memory.
#[derive(Default)]
pub(crate) struct FakeFirewall {
    pub rules: Mutex<BTreeSet<String>>,
    pub calls: Mutex<Vec<String>>,
    pub fail_install: bool,
}

impl Firewall for FakeFirewall {
    fn check(&self) -> Result<()> {
        Ok(())
    }
    fn install(&self, run: &str, _: &str, _: IpAddr, _: &[u16]) -> Result<()> {
        self.calls.lock().unwrap().push(format!("install {run}"));
        if self.fail_install {
            return Err(Error::new(ErrorKind::Runtime, "fake: iptables says no"));
        }
        self.rules.lock().unwrap().insert(format!("strict {run}"));
        Ok(())
    }
    fn guard(&self, run: &str, _: &str, _: IpAddr, _: &[u16]) -> Result<()> {
        self.calls.lock().unwrap().push(format!("guard {run}"));
        self.rules.lock().unwrap().insert(format!("guard {run}"));
        Ok(())
    }
    fn remove(&self, run: &str) -> Result<()> {
        self.calls.lock().unwrap().push(format!("remove {run}"));
        self.rules
            .lock()
            .unwrap()
            .retain(|r| r.split_once(' ').is_none_or(|(_, of)| of != run));
        Ok(())
    }
    fn runs_with_rules(&self) -> Vec<String> {
        let rules = self.rules.lock().unwrap();
        let runs: BTreeSet<String> = rules
            .iter()
            .filter_map(|r| r.split_once(' ').map(|(_, run)| run.to_string()))
            .collect();
        runs.into_iter().collect()
    }
}

/// The routing proxy, in memory.
#[derive(Default)]
pub(crate) struct FakeRoutes {
    pub routes: Mutex<BTreeMap<String, BTreeMap<String, String>>>,
    pub fail_ensure: bool,
    /// The agents in the table each time a router was asked for.
    pub held_at_ensure: Mutex<Vec<Vec<String>>>,
}

impl Routes for FakeRoutes {
    fn ensure(&self, _: &Path, _: &[std::ffi::OsString]) -> Result<u16> {
        let held = self.routes.lock().unwrap().keys().cloned().collect();
        self.held_at_ensure.lock().unwrap().push(held);
        if self.fail_ensure {
            return Err(Error::new(ErrorKind::Runtime, "fake: port 8080 is taken"));
        }
        Ok(8080)
    }
    fn register(
        &self,
        _: &Path,
        name: &str,
        _: &str,
        endpoints: BTreeMap<String, String>,
    ) -> Result<()> {
        self.routes
            .lock()
            .unwrap()
            .insert(name.to_string(), endpoints);
        Ok(())
    }
    fn release(&self, _: &Path, name: &str, _: &str) -> Result<()> {
        self.routes.lock().unwrap().remove(name);
        Ok(())
    }
}

/// A host of fakes: these engines, and a firewall and routes in memory.
pub(crate) fn host(
    engines: Vec<(Engine, Arc<FakeRuntime>)>,
    firewall: Arc<FakeFirewall>,
    routes: Arc<FakeRoutes>,
) -> Host {
    Host {
        engines: Arc::new(FakeEngines(engines)),
        firewall,
        routes,
    }
}
