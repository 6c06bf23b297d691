//! `moat.run(...)`, `moat.Run`, `moat.runs()`, `moat.clean()`: runs in
//! containers, over `moat_core::run`. Blocking calls release the GIL.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use moat_core::config::Overrides;
use moat_core::run::{self as core_run, logs, Launcher, RunMeta, RunPlan};
use moat_core::{Error, ErrorKind};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyType};

use crate::{home_or_default, json_to_py, to_py_err, AuditLog, ERRORS_MODULE};

/// Seconds between SIGTERM and SIGKILL when moat stops a run itself (a
/// `with` block's end, a timeout, an interrupted wait).
const STOP_GRACE: u32 = 10;

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

/// A run: one container execution and its artifacts (logs, network trace,
/// audit log).
///
/// ``Run(reference=None, home=None)`` opens an existing run; start one with
/// `Run.start` (returns once its container has started) or `moat.run`
/// (waits for it). A `with` block stops the run at its end if it still
/// runs. A Run may be used from several threads at once; it pickles as a
/// reference to the run (its id and home).
///
/// Args:
///     reference: The run's id, an id prefix (5 characters or more) or its
///         name; None: the most recent run.
///     home: The moat home; default ``$MOAT_HOME``, else ``~/.moat``.
///
/// Raises:
///     InvalidArgumentError: No run matches `reference` (or there are no
///         runs).
///     MoatIOError: The runs cannot be read.
#[pyclass(module = "moat", frozen)]
pub(crate) struct Run {
    home: PathBuf,
    /// The id, which never changes.
    id: String,
    /// What is known of the run, read afresh by most getters. Locked only to
    /// read or replace it, never while waiting.
    meta: Mutex<RunMeta>,
}

impl Run {
    fn new(home: PathBuf, meta: RunMeta) -> Run {
        Run {
            home,
            id: meta.id.clone(),
            meta: Mutex::new(meta),
        }
    }

    fn meta(&self) -> RunMeta {
        self.meta
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_meta(&self, meta: RunMeta) {
        *self.meta.lock().unwrap_or_else(PoisonError::into_inner) = meta;
    }

    /// Reads run.json afresh (and notices a supervisor that died).
    fn refresh(&self, py: Python<'_>) -> PyResult<RunMeta> {
        let home = &self.home;
        let id = &self.id;
        let meta = py
            .detach(|| {
                Ok::<_, Error>(core_run::refresh(
                    home,
                    core_run::load_meta(&core_run::run_dir(home, id))?,
                ))
            })
            .map_err(|e| to_py_err(py, &e))?;
        self.set_meta(meta.clone());
        Ok(meta)
    }

    fn streams(&self, py: Python<'_>) -> PyResult<(Vec<u8>, Vec<u8>)> {
        let home = &self.home;
        let id = &self.id;
        py.detach(|| core_run::output(home, id))
            .map_err(|e| to_py_err(py, &e))
    }
}

/// What `moat.run` and `Run.start` take, as `moat run`'s flags.
struct StartArgs<'a, 'py> {
    workspace: PathBuf,
    command: Option<Vec<String>>,
    grants: Vec<String>,
    image: Option<String>,
    env: Option<BTreeMap<String, String>>,
    name: Option<String>,
    network: Option<&'a Bound<'py, PyAny>>,
    runtime: Option<String>,
    home: Option<PathBuf>,
    /// The Claude Code preset, for `moat.claude`.
    claude: Option<moat_core::agent::AgentOptions>,
}

fn start_run(py: Python<'_>, args: StartArgs<'_, '_>) -> PyResult<Run> {
    let home = home_or_default(py, args.home)?;
    let (policy, allow) = network_arg(py, args.network)?;
    let workspace = args.workspace;
    let overrides = Overrides {
        command: args.command,
        grants: args.grants,
        image: args.image,
        env: args
            .env
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect(),
        name: args.name,
        policy,
        allow,
        runtime: args.runtime,
        ..Overrides::default()
    };
    let launcher = launcher(py)?;
    let meta = py
        .detach(|| {
            let plan = match &args.claude {
                Some(options) => RunPlan::claude(&workspace, &overrides, options)?,
                None => RunPlan::new(&workspace, &overrides)?,
            };
            core_run::start(&home, &plan, &launcher, &mut |_| {})
        })
        .map_err(|e| to_py_err(py, &e))?;
    Ok(Run::new(home, meta))
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
        Ok(Run::new(home, meta))
    }

    /// Starts a run and returns once its container has started (it is not
    /// waited for: use `wait`, `logs(follow=True)`, or a `with` block,
    /// which stops it at its end).
    ///
    /// The workspace's agent.yaml (or moat.yaml) is read and the arguments
    /// given here override it, as `moat run`'s flags do.
    ///
    /// Args:
    ///     workspace: The workspace directory (mounted at /workspace), or
    ///         the path of its agent.yaml / moat.yaml.
    ///     command: The command and its arguments; default the
    ///         configuration's ``command``, else the image's.
    ///     grants: Grants to bind, added to the configuration's
    ///         (``"github"``, ``"anthropic"``, ``"aws"``, ``"ssh:HOST"``, ...).
    ///     image: The image; default the configuration's.
    ///     env: Environment variables, added to the configuration's.
    ///     name: The run's name; default the configuration's ``name``, else
    ///         one made up.
    ///     network: ``"strict"``, ``"permissive"``, or ``{"policy": ...,
    ///         "allow": [host patterns]}``; default the configuration's.
    ///     home: The moat home; default ``$MOAT_HOME``, else ``~/.moat``.
    ///     runtime: ``"docker"`` or ``"podman"``; default the
    ///         configuration's ``runtime:``, else ``$MOAT_RUNTIME``, else
    ///         the engine present.
    ///
    /// Returns:
    ///     Run: The running run.
    ///
    /// Raises:
    ///     ConfigError: The configuration is invalid, or a grant is not
    ///         stored.
    ///     InvalidArgumentError: An argument is invalid (the message names it).
    ///     MoatIOError: A file could not be read or written.
    ///     ContainerRuntimeError: The engine is unreachable or refused, or
    ///         the run could not be set up.
    #[staticmethod]
    #[pyo3(
        signature = (workspace=PathBuf::from("."), command=None, grants=Vec::new(), image=None, env=None, name=None, network=None, home=None, runtime=None),
        text_signature = "(workspace='.', command=None, grants=(), image=None, env=None, name=None, network=None, home=None, runtime=None)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn start(
        py: Python<'_>,
        workspace: PathBuf,
        command: Option<Vec<String>>,
        grants: Vec<String>,
        image: Option<String>,
        env: Option<BTreeMap<String, String>>,
        name: Option<String>,
        network: Option<&Bound<'_, PyAny>>,
        home: Option<PathBuf>,
        runtime: Option<String>,
    ) -> PyResult<Run> {
        start_run(
            py,
            StartArgs {
                workspace,
                command,
                grants,
                image,
                env,
                name,
                network,
                runtime,
                home,
                claude: None,
            },
        )
    }

    /// The run's id: ``run_`` and 12 hex digits.
    #[getter]
    fn run_id(&self) -> String {
        self.id.clone()
    }

    /// The run's name.
    #[getter]
    fn name(&self) -> String {
        self.meta().name
    }

    /// ``"starting"``, ``"running"``, ``"stopped"`` or ``"failed"``, read
    /// afresh.
    #[getter]
    fn state(&self, py: Python<'_>) -> PyResult<String> {
        Ok(self.refresh(py)?.state.to_string())
    }

    /// The command's exit code once it has exited (143 or 137 when it was
    /// stopped, 125 when moat could not run it), else None; read afresh.
    #[getter]
    fn exit_code(&self, py: Python<'_>) -> PyResult<Option<i64>> {
        Ok(self.refresh(py)?.exit_code)
    }

    /// Why the run failed, if it did; read afresh.
    #[getter]
    fn error(&self, py: Python<'_>) -> PyResult<Option<String>> {
        Ok(self.refresh(py)?.error)
    }

    /// Endpoint name → URL through the routing proxy (runs with ``ports:``).
    #[getter]
    fn urls(&self) -> BTreeMap<String, String> {
        self.meta().urls
    }

    /// The directory of the run's files (run.json, logs.jsonl, the trace
    /// and the audit log).
    #[getter]
    fn dir(&self) -> String {
        core_run::run_dir(&self.home, &self.id)
            .to_string_lossy()
            .into_owned()
    }

    /// Everything known about the run (its run.json), read afresh.
    ///
    /// Returns:
    ///     dict: ``id``, ``name``, ``state``, ``workspace``, ``image``,
    ///     ``command``, ``grants``, ``env`` (names only), ``exit_code``, ...
    ///
    /// Raises:
    ///     MoatIOError: run.json cannot be read.
    fn info(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let meta = self.refresh(py)?;
        json_to_py(py, &meta)
    }

    /// The command's standard output so far, as text (invalid UTF-8
    /// replaced).
    #[getter]
    fn output(&self, py: Python<'_>) -> PyResult<String> {
        let (out, _) = self.streams(py)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// The command's standard error so far, as text (invalid UTF-8
    /// replaced).
    #[getter]
    fn stderr(&self, py: Python<'_>) -> PyResult<String> {
        let (_, err) = self.streams(py)?;
        Ok(String::from_utf8_lossy(&err).into_owned())
    }

    /// Waits for the run to end, without holding the GIL (Ctrl+C gets
    /// through within 100 ms; the run goes on).
    ///
    /// Args:
    ///     timeout: Seconds to wait at most; None waits as long as it takes.
    ///
    /// Returns:
    ///     int | None: The exit code, or None if the run still runs after
    ///     `timeout`.
    ///
    /// Raises:
    ///     InvalidArgumentError: `timeout` is negative or not finite.
    ///     MoatIOError: run.json cannot be read.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<i64>> {
        let home = &self.home;
        let id = &self.id;
        // A deadline past what the clock can say (timeout=1e19) is none.
        let deadline = seconds(py, timeout)?.and_then(|t| std::time::Instant::now().checked_add(t));
        loop {
            // Short waits without the GIL, so Ctrl+C gets through between.
            let slice = match deadline {
                Some(d) => d
                    .saturating_duration_since(std::time::Instant::now())
                    .min(Duration::from_millis(100)),
                None => Duration::from_millis(100),
            };
            let meta = py
                .detach(|| core_run::wait(home, id, Some(slice)))
                .map_err(|e| to_py_err(py, &e))?;
            let (over, code) = (meta.state.is_terminal(), meta.exit_code);
            self.set_meta(meta);
            if over || deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return Ok(code);
            }
            py.check_signals()?;
        }
    }

    /// Stops the run: SIGTERM to its command, SIGKILL after `grace`
    /// seconds; returns once the run has stopped and moat has cleaned up
    /// after it. A run already over is left as it is.
    ///
    /// Args:
    ///     grace: Seconds between SIGTERM and SIGKILL.
    ///
    /// Returns:
    ///     int | None: The exit code (143 or 137 for a stopped command).
    ///
    /// Raises:
    ///     ContainerRuntimeError: The engine refused to stop the container.
    ///     MoatIOError: run.json cannot be read.
    #[pyo3(signature = (grace=10))]
    fn stop(&self, py: Python<'_>, grace: u32) -> PyResult<Option<i64>> {
        let home = &self.home;
        let known = self.meta();
        let meta = py
            .detach(|| core_run::stop(home, &known, grace))
            .map_err(|e| to_py_err(py, &e))?;
        let code = meta.exit_code;
        self.set_meta(meta);
        Ok(code)
    }

    /// Removes the run and all its files (stopping it first).
    ///
    /// Raises:
    ///     ContainerRuntimeError: The run did not stop and clean up within
    ///         30 s.
    ///     MoatIOError: Its files could not be removed.
    fn destroy(&self, py: Python<'_>) -> PyResult<()> {
        let home = &self.home;
        let id = &self.id;
        py.detach(|| core_run::destroy(home, id))
            .map_err(|e| to_py_err(py, &e))
    }

    /// The run's output, in order, as ``(stream, data)`` chunks: `stream`
    /// is ``"stdout"``, ``"stderr"`` or ``"moat"`` (moat's own notes),
    /// `data` is bytes.
    ///
    /// Args:
    ///     follow: Return a `LogStream` that yields chunks as they arrive
    ///         until the run ends, instead of a list of those so far.
    ///
    /// Returns:
    ///     list[tuple[str, bytes]] | LogStream: The chunks so far, or (with
    ///     `follow`) an iterator over all of them.
    ///
    /// Raises:
    ///     MoatIOError: logs.jsonl cannot be read.
    #[pyo3(signature = (follow=false))]
    fn logs(&self, py: Python<'_>, follow: bool) -> PyResult<Py<PyAny>> {
        let path = core_run::run_dir(&self.home, &self.id).join("logs.jsonl");
        if follow {
            let stream = LogStream {
                watch: core_run::Watch::new(&self.home, &self.id),
                follower: logs::Follower::new(&path, 0),
                pending: VecDeque::new(),
                finished: false,
            };
            return Ok(Py::new(py, stream)?.into_any());
        }
        let chunks = py
            .detach(|| logs::read_all(&path))
            .map_err(|e| to_py_err(py, &e))?;
        let list: Vec<(String, Py<PyAny>)> =
            chunks.into_iter().map(|c| chunk_to_py(py, c)).collect();
        Ok(list.into_pyobject(py)?.into_any().unbind())
    }

    /// The network trace: one dict per request through the run's proxy
    /// (``method``, ``url``, ``status``, ``decision``, ...; credential
    /// values redacted).
    ///
    /// Raises:
    ///     MoatIOError: The trace cannot be read.
    fn trace(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let home = &self.home;
        let id = &self.id;
        let records = py
            .detach(|| core_run::trace(home, id))
            .map_err(|e| to_py_err(py, &e))?;
        json_to_py(py, &records)
    }

    /// The run's tamper-evident audit log.
    ///
    /// Returns:
    ///     AuditLog: Its ``verify()`` and ``export(path)``.
    fn audit(&self) -> AuditLog {
        AuditLog::new(
            core_run::run_dir(&self.home, &self.id),
            Some(self.home.clone()),
        )
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// Leaving a `with` block stops the run if it still runs; exceptions
    /// propagate.
    fn __exit__(
        &self,
        py: Python<'_>,
        exc_type: Option<Py<PyAny>>,
        exc: Option<Py<PyAny>>,
        tb: Option<Py<PyAny>>,
    ) -> PyResult<bool> {
        let _ = (exc_type, exc, tb);
        if !self.refresh(py)?.state.is_terminal() {
            self.stop(py, STOP_GRACE)?;
        }
        Ok(false)
    }

    /// Pickles as ``Run(run_id, home)``: unpickling opens the run again.
    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyType>, (String, PathBuf))> {
        let this = slf.get();
        Ok((slf.get_type(), (this.id.clone(), this.home.clone())))
    }

    fn __repr__(&self) -> String {
        let meta = self.meta();
        format!(
            "Run(run_id={:?}, name={:?}, state={:?})",
            meta.id,
            meta.name,
            meta.state.as_str()
        )
    }
}

/// A timeout in seconds from Python: finite and not negative.
fn seconds(py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<Duration>> {
    match timeout {
        None => Ok(None),
        // Longer than a Duration holds (1e300) is as good as forever.
        Some(t) if t.is_finite() && t >= 0.0 => Ok(Some(
            Duration::try_from_secs_f64(t).unwrap_or(Duration::MAX),
        )),
        Some(t) => Err(bad(
            py,
            format!("timeout: {t} is not a number of seconds (a finite number, 0 or more)"),
        )),
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

/// An iterator over a run's output as it arrives: ``(stream, data)``
/// chunks (see `Run.logs`) until the run ends. Waiting releases the GIL,
/// and Ctrl+C gets through within 100 ms. Made by ``Run.logs(follow=True)``.
#[pyclass(module = "moat")]
pub(crate) struct LogStream {
    watch: core_run::Watch,
    follower: logs::Follower,
    pending: VecDeque<logs::Chunk>,
    finished: bool,
}

impl LogStream {
    /// Waits at most `slice` (without the GIL) for more output; marks the
    /// stream finished once the run is over and everything is read.
    fn step(&mut self, py: Python<'_>, slice: Duration) -> PyResult<()> {
        let follower = &mut self.follower;
        let watch = &mut self.watch;
        let (chunks, over) = py
            .detach(|| follower.wait(&mut || watch.is_over(), slice))
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
        Ok(())
    }
}

/// A chunk of output for Python: `(stream, bytes)`.
type PyChunk = (String, Py<PyAny>);

fn chunk_to_py(py: Python<'_>, c: logs::Chunk) -> PyChunk {
    (
        stream_name(c.stream),
        PyBytes::new(py, &c.data).into_any().unbind(),
    )
}

#[pymethods]
impl LogStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<Option<(String, Py<PyAny>)>> {
        loop {
            if let Some(c) = self.pending.pop_front() {
                return Ok(Some(chunk_to_py(py, c)));
            }
            if self.finished {
                return Ok(None);
            }
            // At most ~100 ms without the GIL, so Ctrl+C gets through.
            self.step(py, Duration::from_millis(100))?;
            py.check_signals()?;
        }
    }

    /// Waits at most `timeout` seconds for output (for ``moat.aio``, which
    /// calls it from a worker thread so that no thread waits long).
    ///
    /// Args:
    ///     timeout: Seconds to wait at most for a first chunk.
    ///
    /// Returns:
    ///     tuple[bool, list[tuple[str, bytes]]]: Whether the stream has
    ///     ended (no chunk will follow those returned), and the chunks.
    ///
    /// Raises:
    ///     InvalidArgumentError: `timeout` is negative or not finite.
    ///     MoatIOError: logs.jsonl cannot be read.
    fn _poll(&mut self, py: Python<'_>, timeout: f64) -> PyResult<(bool, Vec<PyChunk>)> {
        let wait = seconds(py, Some(timeout))?.unwrap_or_default();
        let now = std::time::Instant::now();
        // Past what the clock can say: a day is as long as anyone polls.
        let deadline = now
            .checked_add(wait)
            .unwrap_or(now + Duration::from_secs(86_400));
        let mut last = false;
        loop {
            if !self.pending.is_empty() || self.finished {
                let chunks = self.pending.drain(..).map(|c| chunk_to_py(py, c)).collect();
                return Ok((self.finished, chunks));
            }
            if last {
                return Ok((false, Vec::new()));
            }
            // At least one look, even with no time left.
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            last = left <= Duration::from_millis(100);
            self.step(py, left.min(Duration::from_millis(100)))?;
        }
    }
}

/// Runs a command in a container and waits for it to end (the GIL is
/// released meanwhile), like `subprocess.run`.
///
/// The workspace's agent.yaml (or moat.yaml) is read and the arguments
/// given here override it, as `moat run`'s flags do. A run this call waits
/// for is never left running behind it: on a timeout it is stopped and
/// `RunTimeout` raised; on Ctrl+C (or any other error while waiting) it is
/// stopped and the exception re-raised. With ``detach=True`` the run is
/// the caller's to wait for or stop.
///
/// Args:
///     workspace: The workspace directory (mounted at /workspace), or the
///         path of its agent.yaml / moat.yaml.
///     command: The command and its arguments; default the
///         configuration's ``command``, else the image's.
///     grants: Grants to bind, added to the configuration's (``"github"``,
///         ``"anthropic"``, ``"aws"``, ``"ssh:HOST"``, ...).
///     image: The image; default the configuration's.
///     env: Environment variables, added to the configuration's.
///     name: The run's name; default the configuration's ``name``, else
///         one made up.
///     network: ``"strict"``, ``"permissive"``, or ``{"policy": ...,
///         "allow": [host patterns]}``; default the configuration's.
///     detach: Return once the container has started, without waiting.
///     timeout: Seconds to wait at most; None waits as long as it takes.
///     home: The moat home; default ``$MOAT_HOME``, else ``~/.moat``.
///     runtime: ``"docker"`` or ``"podman"``; default the configuration's
///         ``runtime:``, else ``$MOAT_RUNTIME``, else the engine present.
///
/// Returns:
///     Run: The run, ended unless `detach` (``exit_code``, ``output``,
///     ``stderr``, ``trace()``, ``audit()``).
///
/// Raises:
///     RunTimeout: The run was still going after `timeout` seconds; it
///         has been stopped (``err.run`` is it).
///     KeyboardInterrupt: Ctrl+C while waiting; the run has been stopped.
///     ConfigError: The configuration is invalid, or a grant is not stored.
///     InvalidArgumentError: An argument is invalid (the message names it).
///     MoatIOError: A file could not be read or written.
///     ContainerRuntimeError: The engine is unreachable or refused, or the
///         run could not be set up.
#[pyfunction]
#[pyo3(
    name = "run",
    signature = (workspace=PathBuf::from("."), command=None, grants=Vec::new(), image=None, env=None, name=None, network=None, detach=false, timeout=None, home=None, runtime=None),
    text_signature = "(workspace='.', command=None, grants=(), image=None, env=None, name=None, network=None, detach=False, timeout=None, home=None, runtime=None)"
)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_fn(
    py: Python<'_>,
    workspace: PathBuf,
    command: Option<Vec<String>>,
    grants: Vec<String>,
    image: Option<String>,
    env: Option<BTreeMap<String, String>>,
    name: Option<String>,
    network: Option<&Bound<'_, PyAny>>,
    detach: bool,
    timeout: Option<f64>,
    home: Option<PathBuf>,
    runtime: Option<String>,
) -> PyResult<Py<Run>> {
    seconds(py, timeout)?;
    let r = start_run(
        py,
        StartArgs {
            workspace,
            command,
            grants,
            image,
            env,
            name,
            network,
            runtime,
            home,
            claude: None,
        },
    )?;
    finish(py, r, detach, timeout)
}

/// Runs Claude Code in a sealed run: the workspace at /workspace, the
/// ``anthropic`` grant (and `grants`) injected by the run's proxy (an API
/// key or a Claude Code login; only placeholders inside), the image made
/// from `image` (or the default) with the pinned, hash-checked Claude Code.
///
/// With `prompt`, runs ``claude -p PROMPT`` (plus `args`) and waits for it
/// as `moat.run` does (same timeout and Ctrl+C handling) unless `detach`.
/// Without `prompt` the session is interactive, so ``detach=True`` is
/// needed (attach to it with ``moat attach``).
///
/// Args:
///     workspace: The workspace directory, or its agent.yaml / moat.yaml.
///     prompt: The prompt for ``claude -p``; None: an interactive session.
///     args: More arguments for ``claude``.
///     grants: More grants to bind, besides ``anthropic``.
///     image: The base image; default the configuration's, else moat's.
///     env: Environment variables, added to the configuration's.
///     name: The run's name.
///     network: ``"strict"``, ``"permissive"``, or ``{"policy": ...,
///         "allow": [...]}``; Claude Code's hosts are allowed in strict mode.
///     detach: Return once the container has started, without waiting.
///     timeout: Seconds to wait at most; None waits as long as it takes.
///     home: The moat home; default ``$MOAT_HOME``, else ``~/.moat``.
///     runtime: ``"docker"`` or ``"podman"``; default as for `moat.run`.
///     version: The Claude Code version; default the one moat pins.
///         Another version needs its ``claude-agent-sdk`` wheel on disk,
///         named by ``MOAT_CLAUDE_WHEEL`` (see docs/claude.md).
///
/// Returns:
///     Run: The run, ended unless `detach`.
///
/// Raises:
///     RunTimeout: The run was still going after `timeout` seconds; it has
///         been stopped.
///     KeyboardInterrupt: Ctrl+C while waiting; the run has been stopped.
///     ConfigError: The configuration is invalid, or no anthropic grant is
///         stored.
///     InvalidArgumentError: An argument is invalid, no `prompt` without
///         `detach`, or a `version` that is not pinned.
///     MoatIOError: A file could not be read or written.
///     ContainerRuntimeError: The engine is unreachable or refused, or the
///         run could not be set up.
#[pyfunction]
#[pyo3(
    signature = (workspace=PathBuf::from("."), prompt=None, args=Vec::new(), grants=Vec::new(), image=None, env=None, name=None, network=None, detach=false, timeout=None, home=None, runtime=None, version=None),
    text_signature = "(workspace='.', prompt=None, args=(), grants=(), image=None, env=None, name=None, network=None, detach=False, timeout=None, home=None, runtime=None, version=None)"
)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn claude(
    py: Python<'_>,
    workspace: PathBuf,
    prompt: Option<String>,
    args: Vec<String>,
    grants: Vec<String>,
    image: Option<String>,
    env: Option<BTreeMap<String, String>>,
    name: Option<String>,
    network: Option<&Bound<'_, PyAny>>,
    detach: bool,
    timeout: Option<f64>,
    home: Option<PathBuf>,
    runtime: Option<String>,
    version: Option<String>,
) -> PyResult<Py<Run>> {
    seconds(py, timeout)?;
    if prompt.is_none() && !detach {
        return Err(bad(
            py,
            "prompt: an interactive Claude Code session needs a terminal; give prompt=..., or detach=True and `moat attach` to it (or use `moat claude`)".into(),
        ));
    }
    let r = start_run(
        py,
        StartArgs {
            workspace,
            command: None,
            grants,
            image,
            env,
            name,
            network,
            runtime,
            home,
            claude: Some(moat_core::agent::AgentOptions {
                prompt,
                version,
                args,
            }),
        },
    )?;
    finish(py, r, detach, timeout)
}

/// Replays a run's requests against its workspace's current network
/// policy, to see what a policy change would decide otherwise.
///
/// Args:
///     run: The run's id, id prefix or name; None: the most recent run.
///     home: The moat home; default ``$MOAT_HOME``, else ``~/.moat``.
///
/// Returns:
///     dict: ``run``, ``requests`` (how many) and ``changes``, each with
///     ``method``, ``url``, ``then``, ``now`` and ``rule``.
///
/// Raises:
///     InvalidArgumentError: No run matches `run`.
///     ConfigError: The workspace's configuration is invalid.
///     MoatIOError: The run's trace cannot be read.
#[pyfunction]
#[pyo3(signature = (run=None, home=None))]
pub(crate) fn policy_check(
    py: Python<'_>,
    run: Option<String>,
    home: Option<PathBuf>,
) -> PyResult<Py<PyAny>> {
    let home = home_or_default(py, home)?;
    let report = py
        .detach(|| moat_core::run::replay::check(&home, run.as_deref()))
        .map_err(|e| to_py_err(py, &e))?;
    json_to_py(py, &report)
}

/// A strict network policy that allows what a run did.
///
/// Args:
///     run: The run's id, id prefix or name; None: the most recent run.
///     home: The moat home; default ``$MOAT_HOME``, else ``~/.moat``.
///
/// Returns:
///     str: The ``network:`` section for agent.yaml, as YAML.
///
/// Raises:
///     InvalidArgumentError: No run matches `run`.
///     MoatIOError: The run's trace cannot be read.
#[pyfunction]
#[pyo3(signature = (run=None, home=None))]
pub(crate) fn policy_suggest(
    py: Python<'_>,
    run: Option<String>,
    home: Option<PathBuf>,
) -> PyResult<String> {
    let home = home_or_default(py, home)?;
    py.detach(|| moat_core::run::replay::suggest(&home, run.as_deref()))
        .map_err(|e| to_py_err(py, &e))
}

/// Writes a run's network trace to a file as HAR 1.2.
///
/// Args:
///     run: The run's id, id prefix or name; None: the most recent run.
///     path: The file to write.
///     home: The moat home; default ``$MOAT_HOME``, else ``~/.moat``.
///
/// Returns:
///     int: How many requests were written.
///
/// Raises:
///     InvalidArgumentError: No run matches `run`.
///     MoatIOError: The trace cannot be read or `path` written.
#[pyfunction]
#[pyo3(signature = (run, path, home=None))]
pub(crate) fn trace_har(
    py: Python<'_>,
    run: Option<String>,
    path: PathBuf,
    home: Option<PathBuf>,
) -> PyResult<usize> {
    let home = home_or_default(py, home)?;
    py.detach(|| moat_core::run::trace_view::write_har(&home, run.as_deref(), &path))
        .map_err(|e| to_py_err(py, &e))
}

/// Waits for a run started by `moat.run` or `moat.claude` unless `detach`.
/// A run still going after `timeout` is stopped and `RunTimeout` raised; a
/// wait that fails (Ctrl+C's KeyboardInterrupt among others) stops the run
/// before the error goes on.
fn finish(py: Python<'_>, r: Run, detach: bool, timeout: Option<f64>) -> PyResult<Py<Run>> {
    let r = Py::new(py, r)?;
    if detach {
        return Ok(r);
    }
    let run = r.get();
    if let Err(e) = run.wait(py, timeout) {
        if let Err(stop) = run.stop(py, STOP_GRACE) {
            warn_not_stopped(py, &run.id, &stop);
        }
        return Err(e);
    }
    if run.meta().state.is_terminal() {
        return Ok(r);
    }
    run.stop(py, STOP_GRACE)?;
    let timeout = timeout.unwrap_or_default();
    Err(run_timeout(py, &r, timeout).unwrap_or_else(|e| e))
}

/// `moat.RunTimeout` for run `r`, stopped after `timeout` seconds.
fn run_timeout(py: Python<'_>, r: &Py<Run>, timeout: f64) -> PyResult<PyErr> {
    let run = r.get();
    let text = match run.meta().exit_code {
        Some(code) => format!(
            "run {} was still running after {timeout} s; stopped (exit code {code})",
            run.id
        ),
        None => format!(
            "run {} was still running after {timeout} s; stopped",
            run.id
        ),
    };
    let kwargs = PyDict::new(py);
    kwargs.set_item("run", r.clone_ref(py))?;
    kwargs.set_item("timeout", timeout)?;
    let exc = py
        .import(ERRORS_MODULE)?
        .getattr("RunTimeout")?
        .call((text,), Some(&kwargs))?;
    Ok(PyErr::from_value(exc))
}

/// A run that could not be stopped after its wait failed: a warning, since
/// the wait's own error is the one raised.
fn warn_not_stopped(py: Python<'_>, id: &str, stop: &PyErr) {
    let text = format!("run {id} could not be stopped: {stop}");
    if let Ok(message) = std::ffi::CString::new(text) {
        let _ = PyErr::warn(
            py,
            &py.get_type::<pyo3::exceptions::PyRuntimeWarning>(),
            &message,
            1,
        );
    }
}

/// Every run of a moat home, newest first.
///
/// Args:
///     home: The moat home; default ``$MOAT_HOME``, else ``~/.moat``.
///
/// Returns:
///     list[dict]: Each run's run.json (``id``, ``name``, ``state``,
///     ``exit_code``, ...), read afresh.
///
/// Raises:
///     MoatIOError: The runs cannot be read.
#[pyfunction]
#[pyo3(signature = (home=None))]
pub(crate) fn runs(py: Python<'_>, home: Option<PathBuf>) -> PyResult<Py<PyAny>> {
    let home = home_or_default(py, home)?;
    let list = py
        .detach(|| core_run::list(&home))
        .map_err(|e| to_py_err(py, &e))?;
    json_to_py(py, &list)
}

/// Removes stopped runs and whatever moat left behind: their files,
/// containers and networks no live run owns, stale firewall chains, and the
/// images this home's runs made that nothing uses any more.
///
/// Args:
///     home: The moat home; default ``$MOAT_HOME``, else ``~/.moat``.
///     dry_run: Remove nothing; return what would be removed.
///     keep_images: Leave the images moat built, used or not.
///
/// Returns:
///     dict: What was removed (or would be): ``runs``, ``containers``,
///     ``networks``, ``firewall``, ``images`` (lists of names).
///
/// Raises:
///     MoatIOError: A run's files could not be removed.
///     ContainerRuntimeError: The engine refused a removal.
#[pyfunction]
#[pyo3(signature = (home=None, *, dry_run=false, keep_images=false))]
pub(crate) fn clean(
    py: Python<'_>,
    home: Option<PathBuf>,
    dry_run: bool,
    keep_images: bool,
) -> PyResult<Py<PyAny>> {
    let home = home_or_default(py, home)?;
    let options = core_run::CleanOptions {
        dry_run,
        keep_images,
    };
    let cleaned = py
        .detach(|| core_run::clean_with(&home, options))
        .map_err(|e| to_py_err(py, &e))?;
    json_to_py(py, &cleaned)
}

/// Copies a run that is over to where :func:`destroy` and :func:`clean`
/// leave it, as ``moat promote`` does: its files, a proof bundle of its
/// audit log (``audit-bundle.json``) and ``promoted.json`` (each file's size
/// and SHA-256).
///
/// Args:
///     run: The run's id, id prefix or name; default the most recent.
///     to: A new or empty directory; default ``$MOAT_HOME/promoted/<run-id>/``.
///     home: The moat home; default ``$MOAT_HOME``, else ``~/.moat``.
///
/// Returns:
///     dict: What was copied: ``dir``, ``run``, ``name``, ``files``, ...
///
/// Raises:
///     InvalidArgumentError: No such run, the run is not over, or ``to`` is
///         not empty or lies in the runs directory.
///     MoatIOError: A file could not be copied.
#[pyfunction]
#[pyo3(signature = (run=None, to=None, home=None))]
pub(crate) fn promote(
    py: Python<'_>,
    run: Option<String>,
    to: Option<PathBuf>,
    home: Option<PathBuf>,
) -> PyResult<Py<PyAny>> {
    let home = home_or_default(py, home)?;
    let promoted = py
        .detach(|| {
            let meta = core_run::find(&home, run.as_deref())?;
            core_run::promote::promote(&home, &meta.id, to.as_deref())
        })
        .map_err(|e| to_py_err(py, &e))?;
    json_to_py(py, &promoted)
}

/// The images moat built, as ``moat system images --json`` lists them.
///
/// Args:
///     all_homes: Every moat home's, not only this one's.
///     home: The moat home; default ``$MOAT_HOME``, else ``~/.moat``.
///
/// Returns:
///     list[dict]: Each image: ``tag``, ``id``, ``engine``, ``home``,
///     ``runs`` and ``containers`` that use it, ...
///
/// Raises:
///     ContainerRuntimeError: An engine could not be asked.
#[pyfunction]
#[pyo3(signature = (all_homes=false, home=None))]
pub(crate) fn system_images(
    py: Python<'_>,
    all_homes: bool,
    home: Option<PathBuf>,
) -> PyResult<Py<PyAny>> {
    let home = home_or_default(py, home)?;
    let images = py
        .detach(|| core_run::system::images(&home, all_homes))
        .map_err(|e| to_py_err(py, &e))?;
    json_to_py(py, &images)
}

/// The containers moat made, as ``moat system containers --json`` lists
/// them.
///
/// Args:
///     all_homes: Every moat home's, not only this one's.
///     home: The moat home; default ``$MOAT_HOME``, else ``~/.moat``.
///
/// Returns:
///     list[dict]: Each container: ``id``, ``name``, ``run``, ``state``,
///     ``image``, ``created``, ``engine``, ``home``.
///
/// Raises:
///     ContainerRuntimeError: An engine could not be asked.
#[pyfunction]
#[pyo3(signature = (all_homes=false, home=None))]
pub(crate) fn system_containers(
    py: Python<'_>,
    all_homes: bool,
    home: Option<PathBuf>,
) -> PyResult<Py<PyAny>> {
    let home = home_or_default(py, home)?;
    let containers = py
        .detach(|| core_run::system::containers(&home, all_homes))
        .map_err(|e| to_py_err(py, &e))?;
    json_to_py(py, &containers)
}

/// The dependencies ``dependencies:`` may name (``moat deps list``), or
/// one of them (``moat deps info``).
///
/// Args:
///     name: ``None`` for all, else ``name`` or ``name@version``.
///
/// Returns:
///     list[dict] | dict: Each dependency: ``name``, ``kind`` (``runtime``
///     or ``tool``), ``versions``, ``image`` or ``packages``, ...
///
/// Raises:
///     InvalidArgumentError: ``name`` is not a known dependency (the message
///         names the known ones).
#[pyfunction]
#[pyo3(signature = (name=None))]
pub(crate) fn deps(py: Python<'_>, name: Option<String>) -> PyResult<Py<PyAny>> {
    match name {
        None => {
            let all = moat_core::deps::list().map_err(|e| to_py_err(py, &e))?;
            json_to_py(py, &all)
        }
        Some(n) => {
            let d = moat_core::deps::info(&n).map_err(|e| to_py_err(py, &e))?;
            json_to_py(py, &d)
        }
    }
}

/// The routing proxy's entry point (``python -m moat._router``); serves
/// until SIGTERM and returns the exit status. Not for callers.
#[pyfunction]
pub(crate) fn _router(py: Python<'_>, port: u16, manual: bool) -> PyResult<i32> {
    let home = home_or_default(py, None)?;
    py.detach(|| moat_core::routing::daemon::serve(&home, port, manual))
        .map_err(|e| to_py_err(py, &e))?;
    Ok(0)
}

/// The supervisor's entry point (``python -m moat._supervise``); returns
/// its exit status. Not for callers.
#[pyfunction]
pub(crate) fn _supervise(py: Python<'_>) -> i32 {
    // What the supervisor (or the run's guard) reports goes to its standard
    // error: the run's supervisor.log.
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .try_init();
    py.detach(core_run::supervise)
}
