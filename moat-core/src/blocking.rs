//! The blocking facade: one tokio runtime owned by the library, for callers
//! that are not async (C and Python).
//!
//! The runtime is created on first use and lives for the rest of the process.
//! Calling a blocking function from inside an async context is a caller bug;
//! it returns an [`ErrorKind::InvalidArgument`] error instead of the panic
//! tokio would raise.

use std::future::Future;
use std::path::Path;
use std::sync::OnceLock;

use crate::config::{self, Config};
use crate::error::{Error, ErrorKind, Result};

static RUNTIME: OnceLock<std::result::Result<tokio::runtime::Runtime, String>> = OnceLock::new();

/// The process-wide runtime used by the blocking facade.
pub fn runtime() -> Result<&'static tokio::runtime::Runtime> {
    let rt = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("moat-worker")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the moat runtime: {e}"))
    });
    rt.as_ref()
        .map_err(|e| Error::new(ErrorKind::Internal, e.clone()))
}

/// Runs `fut` to completion on the facade's runtime, blocking this thread.
pub fn block_on<F: Future>(fut: F) -> Result<F::Output> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "a blocking moat call was made from inside an async runtime; use the async api there",
        ));
    }
    Ok(runtime()?.block_on(fut))
}

/// Loads a workspace's configuration ([`config::load`]).
pub fn load_config(workspace: &Path) -> Result<Config> {
    config::load(workspace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_on_runs_futures() {
        let value = block_on(async {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            41 + 1
        })
        .unwrap();
        assert_eq!(value, 42);
    }

    #[test]
    fn block_on_inside_runtime_is_an_error_not_a_panic() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let err = rt.block_on(async { block_on(async { 1 }) }).unwrap_err();
        assert!(err.is_invalid_argument(), "{err}");
    }
}
