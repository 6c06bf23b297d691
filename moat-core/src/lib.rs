//! moat runs AI agents in isolated containers with credentials injected at the
//! network layer, so the agent never holds a token.
//!
//! This crate holds every decision and every side effect; the C ABI
//! (`moat-ffi`), the Python module (`moat-py`) and the `moat` command
//! (`moat-cli`) only translate. See `ARCHITECTURE.md` for the map.
//!
//! Built so far: the configuration model ([`config`]), network policy host
//! patterns ([`policy`]), the error type ([`Error`]) and the blocking facade
//! ([`blocking`]).

#![deny(missing_docs)]

pub mod audit;
pub mod blocking;
pub mod config;
pub mod credential;
mod error;
pub mod paths;
pub mod policy;
pub mod proxy;
pub mod routing;
pub mod run;
pub mod runtime;
pub mod secret;
pub mod secrets;
pub mod ssh_agent;
pub mod trace;

pub use error::{Diagnostic, Error, ErrorKind, Location, Result};

/// The version of moat, from `Cargo.toml`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
