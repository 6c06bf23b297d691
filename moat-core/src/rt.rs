//! Running async code from sync callers (C, Python, the CLI): the
//! process-wide tokio runtime, and the helpers that never panic and never
//! abort the host process when used from the wrong place.

use std::future::Future;
use std::sync::OnceLock;

use crate::error::{Error, ErrorKind, Result};

/// The runtime, and the process that made it.
type Made = std::result::Result<(u32, tokio::runtime::Runtime), String>;

static RUNTIME: OnceLock<Made> = OnceLock::new();

/// The process-wide runtime of the blocking calls. In a child forked after
/// it was made, an error: the child has the runtime's memory but none of
/// its threads, so anything run on it would wait forever.
pub fn runtime() -> Result<&'static tokio::runtime::Runtime> {
    let rt = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("moat-worker")
            .enable_all()
            .build()
            .map(|rt| (std::process::id(), rt))
            .map_err(|e| format!("cannot start the moat runtime: {e}"))
    });
    match rt {
        Ok((pid, rt)) if *pid == std::process::id() => Ok(rt),
        Ok((pid, _)) => Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "moat was started in process {pid} and this is a child forked from it, which has none of its threads: use moat in a child only after exec (multiprocessing's \"spawn\" or \"forkserver\"), or start it only in the child"
            ),
        )),
        Err(e) => Err(Error::new(ErrorKind::Internal, e.clone())),
    }
}

/// Runs `fut` to completion on the process-wide runtime, blocking this
/// thread. From inside an async runtime it is an error (a caller's bug), not
/// tokio's panic.
pub fn block_on<F: Future>(fut: F) -> Result<F::Output> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "a blocking moat call was made from inside an async runtime; use the async api there",
        ));
    }
    Ok(runtime()?.block_on(fut))
}

/// Runs `fut` on a new single-threaded runtime on this thread, so that it
/// may borrow from the caller; an error when no runtime can be made.
pub(crate) fn block_on_fresh<F: Future>(fut: F) -> Result<F::Output> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map(|rt| rt.block_on(fut))
        .map_err(|e| {
            Error::new(
                ErrorKind::Internal,
                format!("cannot start a runtime for a blocking call: {e}"),
            )
        })
}

/// Runs a future to completion from sync code, whether or not a runtime is
/// already running on this thread (from inside one, on a helper thread).
pub(crate) fn run_async<T: Send + 'static>(
    fut: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return std::thread::spawn(move || block_on_fresh(fut))
            .join()
            .map_err(|_| Error::new(ErrorKind::Internal, "a helper thread panicked"))??;
    }
    block_on(fut)?
}

/// Runs a future to completion from sync code on a runtime of its own, so
/// that it may borrow from the caller (unlike [`run_async`]). From inside a
/// runtime it is an error.
pub(crate) fn run_async_local<T>(fut: impl Future<Output = Result<T>>) -> Result<T> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "a blocking moat call was made from inside an async runtime",
        ));
    }
    block_on_fresh(fut)?
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
        let err = rt
            .block_on(async { run_async_local(async { Ok(1) }) })
            .unwrap_err();
        assert!(err.is_invalid_argument(), "{err}");
    }

    #[test]
    fn run_async_works_from_inside_a_runtime_too() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let v = rt.block_on(async { run_async(async { Ok(7) }) }).unwrap();
        assert_eq!(v, 7);
    }
}
