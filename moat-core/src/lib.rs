//! moat runs AI agents in isolated containers with credentials injected at the
//! network layer, so the agent never holds a token.
//!
//! This crate holds every decision and every side effect; the C ABI
//! (`moat-ffi`), the Python module (`moat-py`) and the `moat` command
//! (`moat-cli`) only translate. See `ARCHITECTURE.md` for the map.
//!
//! The modules, from the bottom up: [`error`](Error), [`paths`], `process`
//! and `rt` (helpers); [`config`], [`policy`] (pure); [`secret`],
//! [`credential`], [`secrets`]; [`audit`], [`trace`]; [`proxy`];
//! [`runtime`] (container engines); [`ssh_agent`]; [`routing`]; [`run`];
//! and [`blocking`], the facade for callers that are not async.

#![deny(missing_docs)]

pub mod agent;
pub mod audit;
pub mod blocking;
pub mod config;
pub mod credential;
pub mod deps;
mod error;
mod net;
pub mod paths;
pub mod policy;
pub mod process;
pub mod proxy;
pub mod routing;
mod rt;
pub mod run;
pub mod runtime;
pub mod secret;
pub mod secrets;
pub mod ssh;
pub mod ssh_agent;
pub mod trace;

pub use error::{Diagnostic, Error, ErrorKind, Location, Result};

/// The version of moat, from `Cargo.toml`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
