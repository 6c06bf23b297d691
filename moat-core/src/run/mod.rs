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

mod agent_plan;
pub mod attach;
#[cfg(test)]
mod fakes;
mod firewall;
mod lifecycle;
#[cfg(test)]
mod lifecycle_tests;
pub mod logs;
mod meta;
mod mounts;
mod plan;
pub mod promote;
pub mod replay;
mod services;
mod start;
mod status;
mod supervisor;
pub mod system;
pub mod trace_view;

pub use lifecycle::{
    clean, clean_with, cleanable, destroy, find, list, refresh, stop, wait, wait_cleaned,
    CleanOptions, Cleaned, Watch,
};
pub use meta::{
    check_name, is_run_id, load_meta, parse_time, run_dir, runs_dir, RunMeta, RunState,
};
pub use plan::{Pinned, RunPlan};
pub use start::{start, start_held, Held, Launcher};
pub use status::{output, status, trace, Check, ImageUse, Status};
pub use supervisor::supervise;

pub(crate) use lifecycle::{cleanup_blocking, release_routes};
#[cfg(test)]
pub(crate) use meta::save_meta;
pub(crate) use meta::{now, release_reserve, update_meta};
pub(crate) use start::{router_command, Event, Handoff, ATTACHED};
