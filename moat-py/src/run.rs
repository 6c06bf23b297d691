//! `moat.run(...)`, `moat.Run`, `moat.runs()`, `moat.clean()`: runs in
//! containers, over `moat_core::run`. Blocking calls release the GIL.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Duration;

use moat_core::run::{self as core_run, logs, Launcher, RunMeta, RunRequest};
use moat_core::{Error, ErrorKind};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::{home_or_default, json_to_py, to_py_err, AuditLog};

/// `python -m moat._supervise`: the supervisor of a run started from Python
/// is this interpreter running moat's own entry point.
fn launcher(py: Python<'_>) -> PyResult<Launcher> {
    let exe: PathBuf = py.import("sys")?.getattr("executable")?.extract()?;
    Ok(Launcher::new(vec![
        exe.into(),
        "-m".into(),
        "moat._supervise".into(),
    ]))
}

fn bad(py: Python<'_>, message: String) -> PyErr {
    to_py_err(py, &Error::new(ErrorKind::InvalidArgument, message))
}

/// `network=` is `"strict"`, `"permissive"`, or a dict with `policy` and
/// `allow`.
fn network_arg(
    py: Python<'_>,
    network: Option<&Bound<'_, PyAny>>,
) -> PyResult<(Option<String>, Vec<String>)> {
    let Some(network) = network else {
        return Ok((None, Vec::new()));
    };
    if network.is_none() {
        return Ok((None, Vec::new()));
    }
    if let Ok(policy) = network.extract::<String>() {
        return Ok((Some(policy), Vec::new()));
    }
    let Ok(dict) = network.cast::<PyDict>() else {
        return Err(bad(
            py,
            "network: give \"strict\", \"permissive\" or {\"policy\": ..., \"allow\": [...]}"
                .into(),
        ));
    };
    let mut policy = None;
    let mut allow = Vec::new();
    for (k, v) in dict.iter() {
        let key: String = k.extract()?;
        match key.as_str() {
            "policy" => policy = Some(v.extract::<String>()?),
            "allow" => allow = v.extract::<Vec<String>>()?,
            other => {
                return Err(bad(
                    py,
                    format!("network: unknown key \"{other}\" (expected policy, allow)"),
                ))
            }
        }
    }
    Ok((policy, allow))
}

/// A run: one container execution and its artifacts. Start one with
/// `moat.Run.start(...)` or `moat.run(...)`; open an existing one with
/// `moat.Run(ref)` (id, id prefix or name; default the most recent).
#[pyclass(module = "moat")]
pub(crate) struct Run {
    home: PathBuf,
    meta: RunMeta,
}

impl Run {
    fn refresh(&mut self, py: Python<'_>) -> PyResult<()> {
        let home = self.home.clone();
        let id = self.meta.id.clone();
        let meta = py
            .detach(|| {
                Ok::<_, Error>(core_run::refresh(
                    &home,
                    core_run::load_meta(&core_run::run_dir(&home, &id))?,
                ))
            })
            .map_err(|e| to_py_err(py, &e))?;
        self.meta = meta;
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn start_run(
    py: Python<'_>,
    workspace: PathBuf,
    command: Option<Vec<String>>,
    grants: Vec<String>,
    image: Option<String>,
    env: std::collections::BTreeMap<String, String>,
    name: Option<String>,
    network: Option<&Bound<'_, PyAny>>,
    home: Option<PathBuf>,
) -> PyResult<Run> {
    let home = home_or_default(py, home)?;
    let (policy, allow) = network_arg(py, network)?;
    let request = RunRequest {
        workspace,
        command,
        grants,
        image,
        env: env.into_iter().collect(),
        name,
        policy,
        allow,
    };
    let launcher = launcher(py)?;
    let meta = py
        .detach(|| {
            let spec = request.spec()?;
            core_run::start(&home, &spec, &launcher, &mut |_| {})
        })
        .map_err(|e| to_py_err(py, &e))?;
    Ok(Run { home, meta })
}

#[pymethods]
impl Run {
    #[new]
    #[pyo3(signature = (reference=None, home=None))]
    fn open(py: Python<'_>, reference: Option<String>, home: Option<PathBuf>) -> PyResult<Run> {
        let home = home_or_default(py, home)?;
        let meta = py
            .detach(|| core_run::find(&home, reference.as_deref()))
            .map_err(|e| to_py_err(py, &e))?;
        Ok(Run { home, meta })
    }

    /// Starts a run and returns once its container has started. `network`
    /// is "strict", "permissive" or {"policy": ..., "allow": [...]}.
    #[staticmethod]
    #[pyo3(signature = (workspace=PathBuf::from("."), command=None, grants=Vec::new(), image=None, env=std::collections::BTreeMap::new(), name=None, network=None, home=None))]
    #[allow(clippy::too_many_arguments)]
    fn start(
        py: Python<'_>,
        workspace: PathBuf,
        command: Option<Vec<String>>,
        grants: Vec<String>,
        image: Option<String>,
        env: std::collections::BTreeMap<String, String>,
        name: Option<String>,
        network: Option<&Bound<'_, PyAny>>,
        home: Option<PathBuf>,
    ) -> PyResult<Run> {
        start_run(
            py, workspace, command, grants, image, env, name, network, home,
        )
    }

    /// `run_` + 12 hex digits.
    #[getter]
    fn run_id(&self) -> String {
        self.meta.id.clone()
    }

    /// The run's name.
    #[getter]
    fn name(&self) -> String {
        self.meta.name.clone()
    }

    /// "starting", "running", "stopped" or "failed" (read afresh).
    #[getter]
    fn state(&mut self, py: Python<'_>) -> PyResult<String> {
        self.refresh(py)?;
        Ok(self.meta.state.to_string())
    }

    /// The command's exit code, once it has exited.
    #[getter]
    fn exit_code(&mut self, py: Python<'_>) -> PyResult<Option<i64>> {
        self.refresh(py)?;
        Ok(self.meta.exit_code)
    }

    /// Why the run failed, if it did.
    #[getter]
    fn error(&mut self, py: Python<'_>) -> PyResult<Option<String>> {
        self.refresh(py)?;
        Ok(self.meta.error.clone())
    }

    /// Endpoint name → URL through the routing proxy (runs with `ports:`).
    #[getter]
    fn urls(&self) -> std::collections::BTreeMap<String, String> {
        self.meta.urls.clone()
    }

    /// The run's directory of artifacts.
    #[getter]
    fn dir(&self) -> String {
        core_run::run_dir(&self.home, &self.meta.id)
            .to_string_lossy()
            .into_owned()
    }

    /// Everything known about the run (run.json) as a dict.
    fn info(&mut self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.refresh(py)?;
        json_to_py(py, &self.meta)
    }

    /// Standard output so far, as text.
    #[getter]
    fn output(&self, py: Python<'_>) -> PyResult<String> {
        let (out, _) = self.streams(py)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Standard error so far, as text.
    #[getter]
    fn stderr(&self, py: Python<'_>) -> PyResult<String> {
        let (_, err) = self.streams(py)?;
        Ok(String::from_utf8_lossy(&err).into_owned())
    }

    /// Waits for the run to end; its exit code. With `timeout` (seconds),
    /// returns None if it is still running then.
    #[pyo3(signature = (timeout=None))]
    fn wait(&mut self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<i64>> {
        let home = self.home.clone();
        let id = self.meta.id.clone();
        let deadline = seconds(py, timeout)?.map(|t| std::time::Instant::now() + t);
        loop {
            // Short waits without the GIL, so Ctrl+C gets through between.
            let slice = match deadline {
                Some(d) => d
                    .saturating_duration_since(std::time::Instant::now())
                    .min(Duration::from_millis(100)),
                None => Duration::from_millis(100),
            };
            let meta = py
                .detach(|| core_run::wait(&home, &id, Some(slice)))
                .map_err(|e| to_py_err(py, &e))?;
            self.meta = meta;
            if self.meta.state.is_terminal()
                || deadline.is_some_and(|d| std::time::Instant::now() >= d)
            {
                return Ok(self.meta.exit_code);
            }
            py.check_signals()?;
        }
    }

    /// Stops the run (SIGTERM, SIGKILL after `grace` seconds); its exit code.
    #[pyo3(signature = (grace=10))]
    fn stop(&mut self, py: Python<'_>, grace: u32) -> PyResult<Option<i64>> {
        let home = self.home.clone();
        let id = self.meta.id.clone();
        let meta = py
            .detach(|| core_run::stop(&home, &id, grace))
            .map_err(|e| to_py_err(py, &e))?;
        self.meta = meta;
        Ok(self.meta.exit_code)
    }

    /// Removes the run and its artifacts (stopping it first).
    fn destroy(&mut self, py: Python<'_>) -> PyResult<()> {
        let home = self.home.clone();
        let id = self.meta.id.clone();
        py.detach(|| core_run::destroy(&home, &id))
            .map_err(|e| to_py_err(py, &e))
    }

    /// Output chunks as (stream, bytes) with stream "stdout", "stderr" or
    /// "moat". With `follow=True`, an iterator that yields chunks as they
    /// arrive until the run ends.
    #[pyo3(signature = (follow=false))]
    fn logs(&self, py: Python<'_>, follow: bool) -> PyResult<Py<PyAny>> {
        let path = core_run::run_dir(&self.home, &self.meta.id).join("logs.jsonl");
        if follow {
            let stream = LogStream {
                watch: core_run::Watch::new(&self.home, &self.meta.id),
                follower: logs::Follower::new(&path, 0),
                pending: VecDeque::new(),
                finished: false,
            };
            return Ok(Py::new(py, stream)?.into_any());
        }
        let chunks = py
            .detach(|| logs::read_all(&path))
            .map_err(|e| to_py_err(py, &e))?;
        let list: Vec<(String, Py<PyAny>)> = chunks
            .into_iter()
            .map(|c| {
                (
                    stream_name(c.stream),
                    PyBytes::new(py, &c.data).into_any().unbind(),
                )
            })
            .collect();
        Ok(list.into_pyobject(py)?.into_any().unbind())
    }

    /// The network trace: one dict per request through the run's proxy.
    fn trace(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let home = self.home.clone();
        let id = self.meta.id.clone();
        let records = py
            .detach(|| core_run::trace(&home, &id))
            .map_err(|e| to_py_err(py, &e))?;
        json_to_py(py, &records)
    }

    /// The run's audit log (`.verify()`, `.export(path)`).
    fn audit(&self) -> AuditLog {
        AuditLog::new(
            core_run::run_dir(&self.home, &self.meta.id),
            Some(self.home.clone()),
        )
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// Leaving a `with` block stops the run if it still runs.
    fn __exit__(
        &mut self,
        py: Python<'_>,
        _exc_type: Option<Py<PyAny>>,
        _exc: Option<Py<PyAny>>,
        _tb: Option<Py<PyAny>>,
    ) -> PyResult<bool> {
        self.refresh(py)?;
        if !self.meta.state.is_terminal() {
            self.stop(py, 10)?;
        }
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!(
            "Run(run_id={:?}, name={:?}, state={:?})",
            self.meta.id,
            self.meta.name,
            self.meta.state.as_str()
        )
    }
}

impl Run {
    fn streams(&self, py: Python<'_>) -> PyResult<(Vec<u8>, Vec<u8>)> {
        let home = self.home.clone();
        let id = self.meta.id.clone();
        py.detach(|| core_run::output(&home, &id))
            .map_err(|e| to_py_err(py, &e))
    }
}

/// A timeout in seconds from Python: finite and not negative.
fn seconds(py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<Duration>> {
    match timeout {
        None => Ok(None),
        Some(t) => Duration::try_from_secs_f64(t).map(Some).map_err(|_| {
            bad(
                py,
                format!("timeout: {t} is not a number of seconds (a finite number, 0 or more)"),
            )
        }),
    }
}

fn stream_name(s: logs::Stream) -> String {
    match s {
        logs::Stream::Stdout => "stdout",
        logs::Stream::Stderr => "stderr",
        logs::Stream::Moat => "moat",
    }
    .to_string()
}

/// An iterator over a run's output as it arrives.
#[pyclass(module = "moat")]
pub(crate) struct LogStream {
    watch: core_run::Watch,
    follower: logs::Follower,
    pending: VecDeque<logs::Chunk>,
    finished: bool,
}

#[pymethods]
impl LogStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<Option<(String, Py<PyAny>)>> {
        loop {
            if let Some(c) = self.pending.pop_front() {
                return Ok(Some((
                    stream_name(c.stream),
                    PyBytes::new(py, &c.data).into_any().unbind(),
                )));
            }
            if self.finished {
                return Ok(None);
            }
            let follower = &mut self.follower;
            let watch = &mut self.watch;
            let (chunks, over) = py
                .detach(|| {
                    // At most ~100 ms without the GIL, so Ctrl+C gets through.
                    let started = std::time::Instant::now();
                    let mut delay = Duration::from_millis(2);
                    loop {
                        let over = watch.is_over();
                        let chunks = follower.poll()?;
                        if !chunks.is_empty()
                            || over
                            || started.elapsed() > Duration::from_millis(100)
                        {
                            return Ok::<_, Error>((chunks, over));
                        }
                        std::thread::sleep(delay);
                        delay = (delay * 2).min(Duration::from_millis(20));
                    }
                })
                .map_err(|e| to_py_err(py, &e))?;
            self.pending.extend(chunks);
            if over && self.pending.is_empty() {
                // One last read: output written just before the end.
                let rest = py
                    .detach(|| self.follower.poll())
                    .map_err(|e| to_py_err(py, &e))?;
                self.pending.extend(rest);
                self.finished = true;
            }
            // Let Ctrl+C through between waits.
            py.check_signals()?;
        }
    }
}

/// Runs a command in a container and, unless `detach`, waits for it; returns
/// the `Run` (with `run_id`, `exit_code`, `output`, `stderr`, `trace()`).
/// With `timeout` (seconds), a run still going then is stopped.
#[pyfunction]
#[pyo3(signature = (workspace=PathBuf::from("."), command=None, grants=Vec::new(), image=None, env=std::collections::BTreeMap::new(), name=None, network=None, detach=false, timeout=None, home=None))]
#[allow(clippy::too_many_arguments)]
#[pyo3(name = "run")]
pub(crate) fn run_fn(
    py: Python<'_>,
    workspace: PathBuf,
    command: Option<Vec<String>>,
    grants: Vec<String>,
    image: Option<String>,
    env: std::collections::BTreeMap<String, String>,
    name: Option<String>,
    network: Option<&Bound<'_, PyAny>>,
    detach: bool,
    timeout: Option<f64>,
    home: Option<PathBuf>,
) -> PyResult<Run> {
    seconds(py, timeout)?;
    let mut r = start_run(
        py, workspace, command, grants, image, env, name, network, home,
    )?;
    if !detach {
        r.wait(py, timeout)?;
        if !r.meta.state.is_terminal() {
            r.stop(py, 10)?;
        }
    }
    Ok(r)
}

/// Every run (newest first), as dicts.
#[pyfunction]
#[pyo3(signature = (home=None))]
pub(crate) fn runs(py: Python<'_>, home: Option<PathBuf>) -> PyResult<Py<PyAny>> {
    let home = home_or_default(py, home)?;
    let list = py
        .detach(|| core_run::list(&home))
        .map_err(|e| to_py_err(py, &e))?;
    json_to_py(py, &list)
}

/// Removes stopped runs and anything moat left behind; what was removed.
#[pyfunction]
#[pyo3(signature = (home=None))]
pub(crate) fn clean(py: Python<'_>, home: Option<PathBuf>) -> PyResult<Py<PyAny>> {
    let home = home_or_default(py, home)?;
    let cleaned = py
        .detach(|| core_run::clean(&home))
        .map_err(|e| to_py_err(py, &e))?;
    json_to_py(py, &cleaned)
}

/// The routing proxy's entry point (`python -m moat._router`); serves until
/// SIGTERM and returns the exit status.
#[pyfunction]
pub(crate) fn _router(py: Python<'_>, port: u16, manual: bool) -> PyResult<i32> {
    let home = home_or_default(py, None)?;
    py.detach(|| moat_core::routing::daemon::serve(&home, port, manual))
        .map_err(|e| to_py_err(py, &e))?;
    Ok(0)
}

/// The supervisor's entry point (`python -m moat._supervise`); returns its
/// exit status.
#[pyfunction]
pub(crate) fn _supervise(py: Python<'_>) -> i32 {
    py.detach(core_run::supervise)
}
