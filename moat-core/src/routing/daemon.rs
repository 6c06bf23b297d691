//! The one router process of a moat home: started by hand (`moat proxy
//! start`) or by the first run with `ports:`, found through
//! `$MOAT_HOME/proxy/router.json` (pid, process start time, port, and
//! whether it was started by hand), stopped by `moat proxy stop` or when
//! the last run with routes ends (unless started by hand).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Router;
use crate::error::{Error, ErrorKind, Result};

/// The default port, as in the seeds; `MOAT_PROXY_PORT` changes it.
pub const DEFAULT_PORT: u16 = 8080;

/// The port to use: `MOAT_PROXY_PORT`, else 8080.
pub fn default_port() -> Result<u16> {
    match std::env::var("MOAT_PROXY_PORT") {
        Ok(v) if !v.is_empty() => v.parse().map_err(|_| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!("MOAT_PROXY_PORT: \"{v}\" is not a port number"),
            )
        }),
        _ => Ok(DEFAULT_PORT),
    }
}

/// What `router.json` holds about the running router.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterState {
    /// Its pid.
    pub pid: u32,
    /// Its start time (clock ticks since boot), to tell it from a reused pid.
    pub start: u64,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    /// Started by hand (`moat proxy start`): it stays when runs end.
    pub manual: bool,
}

fn state_path(home: &Path) -> PathBuf {
    home.join("proxy").join("router.json")
}

/// The running router, if any (a stale state file is ignored).
pub fn status(home: &Path) -> Option<RouterState> {
    let bytes = std::fs::read(state_path(home)).ok()?;
    let state: RouterState = serde_json::from_slice(&bytes).ok()?;
    (crate::process::process_start_time(state.pid) == Some(state.start)).then_some(state)
}

fn write_state(home: &Path, state: &RouterState) -> Result<()> {
    let dir = home.join("proxy");
    crate::paths::private_dir(&dir)?;
    let json = serde_json::to_vec_pretty(state)
        .map_err(|e| Error::new(ErrorKind::Internal, format!("encoding router.json: {e}")))?;
    crate::paths::write_private(&state_path(home), &json, 0o600)
}

/// Makes sure a router runs, starting one with `command` (the program and
/// arguments that run [`serve`], e.g. `moat _router`) on `port` when none
/// does. A router started by hand (`manual`) is marked so. Returns its state.
pub fn ensure(
    home: &Path,
    command: &[std::ffi::OsString],
    port: u16,
    manual: bool,
) -> Result<RouterState> {
    let dir = home.join("proxy");
    crate::paths::private_dir(&dir)?;
    let _lock = crate::paths::FileLock::acquire(&dir.join("router.lock"))?;
    if let Some(mut state) = status(home) {
        if manual && !state.manual {
            state.manual = true;
            write_state(home, &state)?;
        }
        return Ok(state);
    }
    let (program, args) = command
        .split_first()
        .ok_or_else(|| Error::new(ErrorKind::Internal, "no command to start the router with"))?;
    let log_path = dir.join("router.log");
    let log = crate::paths::open_private(&log_path, crate::paths::Open::Truncate)?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .arg("--port")
        .arg(port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .env("MOAT_HOME", home);
    if manual {
        cmd.arg("--manual");
    }
    crate::process::detach(&mut cmd);
    let mut child = cmd.spawn().map_err(|e| {
        Error::new(
            ErrorKind::Runtime,
            format!(
                "cannot start the routing proxy ({}): {e}",
                program.to_string_lossy()
            ),
        )
    })?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(state) = status(home).filter(|s| s.pid == child.id()) {
            std::thread::spawn(move || {
                let _ = child.wait();
            });
            return Ok(state);
        }
        if let Ok(Some(exit)) = child.try_wait() {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(Error::new(
                ErrorKind::Runtime,
                format!(
                    "the routing proxy did not start ({exit}): {}",
                    log.trim().lines().last().unwrap_or("see the log")
                ),
            ));
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            return Err(Error::new(
                ErrorKind::Runtime,
                format!(
                    "the routing proxy did not start within 10 s; see {}",
                    log_path.display()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Stops the running router; `false` when none ran.
pub fn stop(home: &Path) -> Result<bool> {
    let Some(state) = status(home) else {
        let _ = std::fs::remove_file(state_path(home));
        return Ok(false);
    };
    // SAFETY: signalling a process we checked is the router.
    unsafe { libc::kill(state.pid as i32, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while crate::process::process_start_time(state.pid) == Some(state.start) {
        if std::time::Instant::now() > deadline {
            return Err(Error::new(
                ErrorKind::Runtime,
                format!(
                    "the routing proxy (pid {}) did not stop within 10 s",
                    state.pid
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_file(state_path(home));
    Ok(true)
}

/// Stops the router if it was not started by hand and no agent has routes.
/// It looks under the lock [`ensure`] takes, and a starting run holds its
/// place in the table before it calls [`ensure`]: a run starting meanwhile
/// either keeps the router running or starts a new one, never gets the
/// port of one being stopped.
pub fn stop_if_idle(home: &Path) -> Result<()> {
    let dir = home.join("proxy");
    if !dir.exists() {
        return Ok(());
    }
    let _lock = crate::paths::FileLock::acquire(&dir.join("router.lock"))?;
    if status(home).is_some_and(|s| !s.manual) && super::table::load(home)?.agents.is_empty() {
        stop(home)?;
    }
    Ok(())
}

/// The router process (`moat _router --port N [--manual]`): serves until
/// SIGTERM or SIGINT. Returns the exit status.
pub fn serve(home: &Path, port: u16, manual: bool) -> Result<()> {
    crate::rt::block_on(async {
        let router = Router::start(home, SocketAddr::from(([127, 0, 0, 1], port))).await?;
        let pid = std::process::id();
        write_state(
            home,
            &RouterState {
                pid,
                start: crate::process::process_start_time(pid).unwrap_or(0),
                port: router.local_addr().port(),
                manual,
            },
        )?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| Error::new(ErrorKind::Internal, format!("signal handler: {e}")))?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .map_err(|e| Error::new(ErrorKind::Internal, format!("signal handler: {e}")))?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        router.shutdown().await;
        Ok(())
    })?
}
