//! The Python module `moat` (native part `moat._moat`), a thin layer over
//! moat-core: arguments become owned Rust values, the GIL is released for
//! blocking work, and every [`ErrorKind`] maps to its own exception.

use std::collections::BTreeMap;
use std::path::PathBuf;

use moat_core::blocking::{BlockingProxy, ProxyOptions};
use moat_core::config::{self, Config as CoreConfig};
use moat_core::credential;
use moat_core::proxy::Credential as CoreCredential;
use moat_core::secret::Secret;
use moat_core::{Error, ErrorKind};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

mod run;

/// The Python module that defines moat's exceptions (see `_errors.py`):
/// defined in Python, so they pickle with their attributes and subclass
/// the built-in exceptions they are kinds of.
pub(crate) const ERRORS_MODULE: &str = "moat._errors";

/// Converts a moat-core error into its Python exception (`moat.ConfigError`
/// and its siblings), with every diagnostic as a `moat.Diagnostic`.
pub(crate) fn to_py_err(py: Python<'_>, err: &Error) -> PyErr {
    let class = match err.kind() {
        ErrorKind::Config => "ConfigError",
        ErrorKind::Io => "MoatIOError",
        ErrorKind::InvalidArgument => "InvalidArgumentError",
        ErrorKind::Internal => "InternalError",
        ErrorKind::Runtime => "ContainerRuntimeError",
    };
    match new_error(py, class, err) {
        Ok(exc) => exc,
        // moat._errors could not be imported (a broken install): that error.
        Err(e) => e,
    }
}

fn new_error(py: Python<'_>, class: &str, err: &Error) -> PyResult<PyErr> {
    let module = py.import(ERRORS_MODULE)?;
    let kwargs = PyDict::new(py);
    kwargs.set_item("errors", diagnostics(py, err)?)?;
    let exc = module
        .getattr(class)?
        .call((err.to_string(),), Some(&kwargs))?;
    Ok(PyErr::from_value(exc))
}

/// An error's diagnostics as a list of `moat.Diagnostic(path, line, column,
/// message)`.
fn diagnostics<'py>(py: Python<'py>, err: &Error) -> PyResult<Bound<'py, PyList>> {
    let class = py.import(ERRORS_MODULE)?.getattr("Diagnostic")?;
    let list = PyList::empty(py);
    for d in err.diagnostics() {
        let loc = d.location.as_ref();
        list.append(class.call1((
            loc.map(|l| l.path.to_string_lossy().into_owned()),
            loc.map(|l| l.line),
            loc.map(|l| l.column),
            d.message.as_str(),
        ))?)?;
    }
    Ok(list)
}

/// The ``network`` section of a configuration (read-only).
///
/// Attributes:
///     policy: ``"permissive"`` or ``"strict"``.
///     allow: The allow-list's host patterns (``"*.github.com"``, ...).
#[pyclass(module = "moat", frozen, get_all)]
#[derive(Clone)]
struct Network {
    /// ``"permissive"`` or ``"strict"``.
    policy: String,
    /// The allow-list's host patterns.
    allow: Vec<String>,
}

#[pymethods]
impl Network {
    fn __repr__(&self) -> String {
        format!("Network(policy={:?}, allow={:?})", self.policy, self.allow)
    }
}

/// A bind mount of a configuration (read-only).
///
/// Attributes:
///     source: The absolute host path.
///     target: The absolute container path.
///     read_only: Whether it is mounted read-only.
#[pyclass(module = "moat", frozen, get_all)]
#[derive(Clone)]
struct Mount {
    /// The absolute host path.
    source: String,
    /// The absolute container path.
    target: String,
    /// Whether it is mounted read-only.
    read_only: bool,
}

#[pymethods]
impl Mount {
    fn __repr__(&self) -> String {
        format!(
            "Mount(source={:?}, target={:?}, read_only={})",
            self.source,
            self.target,
            if self.read_only { "True" } else { "False" }
        )
    }
}

/// A validated configuration (agent.yaml or moat.yaml) with defaults filled
/// in and the image resolved. Made by `load_config`; read-only.
#[pyclass(module = "moat", frozen)]
struct Config {
    inner: CoreConfig,
}

#[pymethods]
impl Config {
    /// The workspace directory.
    #[getter]
    fn workspace(&self) -> String {
        self.inner.workspace.to_string_lossy().into_owned()
    }
    /// The configuration file read, or None when the workspace has none.
    #[getter]
    fn config_file(&self) -> Option<String> {
        self.inner
            .config_file
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned())
    }
    /// ``name:``, or None.
    #[getter]
    fn name(&self) -> Option<String> {
        self.inner.name.clone()
    }
    /// ``version:``, or None.
    #[getter]
    fn version(&self) -> Option<String> {
        self.inner.version.clone()
    }
    /// The image runs use: ``image:``, else the one ``dependencies:``
    /// imply, else the default.
    ///
    /// Raises:
    ///     InvalidArgumentError: ``dependencies:`` choose the image and
    ///         ``MOAT_DEPS_REGISTRY`` is not UTF-8.
    #[getter]
    fn image(&self, py: Python<'_>) -> PyResult<String> {
        self.inner
            .resolved_image()
            .map(|(image, _)| image)
            .map_err(|e| to_py_err(py, &e))
    }
    /// ``dependencies:`` (``"node@20"``, ``"git"``, ...).
    #[getter]
    fn dependencies(&self) -> Vec<String> {
        self.inner
            .dependencies
            .iter()
            .map(ToString::to_string)
            .collect()
    }
    /// ``grants:`` (``"github"``, ``"ssh:github.com"``, ...).
    #[getter]
    fn grants(&self) -> Vec<String> {
        self.inner.grants.iter().map(ToString::to_string).collect()
    }
    /// ``env:``, by variable name.
    #[getter]
    fn env(&self) -> BTreeMap<String, String> {
        self.inner.env.clone()
    }
    /// ``secrets:``: references (``op://...``, ``ssm://...``), never
    /// values, by variable name.
    #[getter]
    fn secrets(&self) -> BTreeMap<String, String> {
        self.inner
            .secrets
            .iter()
            .map(|(k, v)| (k.clone(), v.reference.clone()))
            .collect()
    }
    /// ``network:``: its policy and allow-list.
    #[getter]
    fn network(&self) -> Network {
        Network {
            policy: self.inner.network.policy.as_str().to_string(),
            allow: self
                .inner
                .network
                .allow
                .iter()
                .map(ToString::to_string)
                .collect(),
        }
    }
    /// ``mounts:``.
    #[getter]
    fn mounts(&self) -> Vec<Mount> {
        self.inner
            .mounts
            .iter()
            .map(|m| Mount {
                source: m.source.to_string_lossy().into_owned(),
                target: m.target.clone(),
                read_only: m.read_only,
            })
            .collect()
    }
    /// ``ports:``: endpoint name → container port.
    #[getter]
    fn ports(&self) -> BTreeMap<String, u16> {
        self.inner.ports.clone()
    }
    /// ``command:``, or None (the image's).
    #[getter]
    fn command(&self) -> Option<Vec<String>> {
        self.inner.command.clone()
    }
    /// ``interactive:``.
    #[getter]
    fn interactive(&self) -> bool {
        self.inner.interactive
    }
    /// Resolves ``secrets:`` on this host (``op read``, ``aws ssm
    /// get-parameter``).
    ///
    /// Returns:
    ///     dict[str, str]: Each secret's value, by variable name.
    ///
    /// Raises:
    ///     ConfigError: A lookup failed or its command is missing (the
    ///         message names the variable and the backend, never a value).
    fn resolve_secrets(&self, py: Python<'_>) -> PyResult<BTreeMap<String, String>> {
        let secrets = self.inner.secrets.clone();
        let resolved = py
            .detach(|| moat_core::secrets::resolve(&secrets))
            .map_err(|e| to_py_err(py, &e))?;
        Ok(resolved
            .into_iter()
            .map(|(k, v)| (k, v.expose().clone()))
            .collect())
    }
    /// The resolved configuration as JSON, as ``moat config --json`` prints
    /// it.
    ///
    /// Returns:
    ///     str: A JSON object.
    fn to_json(&self, py: Python<'_>) -> PyResult<String> {
        let resolved = self.inner.resolved().map_err(|e| to_py_err(py, &e))?;
        serde_json::to_string(&resolved).map_err(|e| {
            to_py_err(
                py,
                &Error::new(ErrorKind::Internal, format!("cannot encode json: {e}")),
            )
        })
    }
    fn __repr__(&self) -> String {
        format!(
            "Config(name={:?}, image={:?}, workspace={:?})",
            self.inner.name,
            // A repr does not raise: an image that cannot be worked out
            // shows why.
            self.inner
                .resolved_image()
                .map_or_else(|e| format!("<{e}>"), |(image, _)| image),
            self.inner.workspace
        )
    }
}

/// A credential the proxy injects: the header ``header: value`` on
/// requests to `host`. The value never appears in repr, traces or errors.
///
/// Args:
///     host: The host it is for: ``api.github.com``, ``*.example.com``,
///         optionally with ``:port`` (default 443).
///     header: The header's name (``Authorization``, ``x-api-key``, ...).
///     value: The header's value (``"Bearer " + token``).
///     grant: The grant name the trace and audit log record for it;
///         default ``custom``.
///
/// Raises:
///     InvalidArgumentError: `host`, `header` or `value` is invalid.
#[pyclass(module = "moat", frozen)]
struct Credential {
    inner: CoreCredential,
    host: String,
}

#[pymethods]
impl Credential {
    #[new]
    #[pyo3(signature = (host, header, value, grant=None))]
    fn new(
        py: Python<'_>,
        host: String,
        header: String,
        value: String,
        grant: Option<String>,
    ) -> PyResult<Self> {
        let inner = CoreCredential::new(&host, &header, &value).map_err(|e| to_py_err(py, &e))?;
        let inner = match grant {
            Some(g) => inner.with_grant(g),
            None => inner,
        };
        Ok(Credential { inner, host })
    }
    /// The host (pattern) it is for.
    #[getter]
    fn host(&self) -> String {
        self.host.clone()
    }
    /// The header's name, lowercase.
    #[getter]
    fn header(&self) -> String {
        self.inner.header().as_str().to_string()
    }
    /// The grant name recorded for it.
    #[getter]
    fn grant(&self) -> String {
        self.inner.grant().to_string()
    }
    fn __repr__(&self) -> String {
        format!(
            "Credential(host={:?}, header={:?}, grant={:?}, value=****)",
            self.host,
            self.inner.header().as_str(),
            self.inner.grant()
        )
    }
}

pub(crate) fn json_to_py<T: serde::Serialize>(py: Python<'_>, value: &T) -> PyResult<Py<PyAny>> {
    let text = serde_json::to_string(value).map_err(|e| {
        to_py_err(
            py,
            &Error::new(ErrorKind::Internal, format!("cannot encode json: {e}")),
        )
    })?;
    Ok(py.import("json")?.call_method1("loads", (text,))?.unbind())
}

/// A credential-injecting proxy with one client, for running any subprocess
/// through moat (no container). It starts when made; use it as a context
/// manager, or call `close`. See docs/proxy.md.
///
/// Args:
///     credentials: `Credential` objects to inject.
///     policy: ``"permissive"`` (default) or ``"strict"`` (only `allow`'s
///         hosts and the credentials' hosts are reachable).
///     allow: Host patterns strict mode allows.
///     listen: The address to listen on; default ``127.0.0.1:0`` (a free
///         port).
///     upstream_ca: A PEM file of extra CA certificates to trust upstream.
///     resolve: Host → address overrides (``{"api.github.com":
///         "127.0.0.1:8443"}``), as ``MOAT_RESOLVE``.
///     home: The moat home (its CA and stored grants); default
///         ``$MOAT_HOME``, else ``~/.moat``.
///     name: The client's name in traces; default ``"client"``.
///     capture_bodies: Bytes of text bodies to keep in trace records (0:
///         none).
///     grants: Stored grants to inject (``"github"``, ``"aws"``, ...), as
///         runs do.
///     audit_dir: A directory for a tamper-evident audit log of the
///         proxy's decisions; None: none (events stay in memory).
///     trace_limit: At most this many trace records (and audit events) in
///         memory; the oldest are dropped (see `dropped`).
///     trace_bytes: At most this many bytes of them in memory.
///     rules: Request rules, as ``network.rules`` in agent.yaml: a list of
///         hosts (``"pypi.org"``) and ``{host: ["allow GET /repos/**",
///         ...]}`` dicts.
///
/// Raises:
///     InvalidArgumentError: An argument is invalid (the message names it).
///     ConfigError: A grant in `grants` is not stored.
///     MoatIOError: `upstream_ca`, the CA or `audit_dir` cannot be read or
///         written, or `listen` cannot be bound.
// frozen: one proxy may be shared by threads (one closing it while
// another reads its trace); its state is behind locks of its own.
#[pyclass(module = "moat", frozen)]
struct Proxy {
    inner: BlockingProxy,
}

/// `rules=`: a list whose items are a host (`"pypi.org"`) or a dict of one
/// host to its rules (`{"api.github.com": ["allow GET /repos/**"]}`), as
/// `network.rules` in agent.yaml.
fn rules_arg(
    py: Python<'_>,
    rules: Option<&Bound<'_, PyAny>>,
) -> PyResult<Vec<(String, Vec<String>)>> {
    let bad = |m: String| to_py_err(py, &Error::new(ErrorKind::InvalidArgument, m));
    let Some(rules) = rules.filter(|r| !r.is_none()) else {
        return Ok(Vec::new());
    };
    let items: Vec<Bound<'_, PyAny>> = rules
        .extract()
        .map_err(|_| bad("rules: give a list of hosts or {host: [rules]} dicts".into()))?;
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        if let Ok(host) = item.extract::<String>() {
            out.push((host, Vec::new()));
            continue;
        }
        let dict = item
            .cast::<pyo3::types::PyDict>()
            .map_err(|_| bad(format!("rules[{i}]: a host, or {{host: [rules]}}")))?;
        if dict.len() != 1 {
            return Err(bad(format!("rules[{i}]: one host per entry")));
        }
        for (k, v) in dict.iter() {
            let host: String = k
                .extract()
                .map_err(|_| bad(format!("rules[{i}]: the host must be a string")))?;
            let list: Vec<String> = v
                .extract()
                .map_err(|_| bad(format!("rules[{i}]: the rules must be a list of strings")))?;
            out.push((host, list));
        }
    }
    Ok(out)
}

#[pymethods]
impl Proxy {
    #[new]
    #[pyo3(
        signature = (credentials=Vec::new(), policy=None, allow=Vec::new(), listen=None, upstream_ca=None, resolve=None, home=None, name=None, capture_bodies=0, grants=Vec::new(), audit_dir=None, trace_limit=None, trace_bytes=None, rules=None),
        text_signature = "(credentials=(), policy=None, allow=(), listen=None, upstream_ca=None, resolve=None, home=None, name=None, capture_bodies=0, grants=(), audit_dir=None, trace_limit=None, trace_bytes=None, rules=None)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        credentials: Vec<PyRef<'_, Credential>>,
        policy: Option<String>,
        allow: Vec<String>,
        listen: Option<String>,
        upstream_ca: Option<PathBuf>,
        resolve: Option<BTreeMap<String, String>>,
        home: Option<PathBuf>,
        name: Option<String>,
        capture_bodies: usize,
        grants: Vec<String>,
        audit_dir: Option<PathBuf>,
        trace_limit: Option<usize>,
        trace_bytes: Option<usize>,
        rules: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let rules = rules_arg(py, rules)?;
        let defaults = moat_core::trace::MemoryLimits::default();
        let options = ProxyOptions {
            listen,
            home,
            upstream_ca,
            resolve: resolve.unwrap_or_default().into_iter().collect(),
            credentials: credentials.iter().map(|c| c.inner.clone()).collect(),
            policy,
            allow,
            rules,
            name,
            capture_bodies,
            grants,
            audit_dir,
            trace_limits: moat_core::trace::MemoryLimits {
                max_records: trace_limit.unwrap_or(defaults.max_records),
                max_bytes: trace_bytes.unwrap_or(defaults.max_bytes),
            },
        };
        let inner = py
            .detach(|| BlockingProxy::start(options))
            .map_err(|e| to_py_err(py, &e))?;
        Ok(Proxy { inner })
    }
    /// The proxy's URL with this client's token
    /// (``http://moat:TOKEN@127.0.0.1:PORT``).
    #[getter]
    fn url(&self) -> String {
        self.inner.url().to_string()
    }
    /// The listen address, ``host:port``.
    #[getter]
    fn address(&self) -> String {
        self.inner.address().to_string()
    }
    /// The path of the moat CA certificate (PEM) a client must trust.
    #[getter]
    fn ca_cert_path(&self) -> String {
        self.inner.ca_cert_path().to_string_lossy().into_owned()
    }
    /// Whether the proxy has been closed.
    #[getter]
    fn closed(&self) -> bool {
        !self.inner.is_open()
    }
    /// The environment variables a child process needs to use the proxy
    /// (``HTTPS_PROXY``, ``HTTP_PROXY``, the CA bundle variables, ...).
    ///
    /// Returns:
    ///     dict[str, str]: Variables to add to the child's environment.
    fn env(&self) -> BTreeMap<String, String> {
        self.inner.env().iter().cloned().collect()
    }
    /// The trace: one dict per request (``method``, ``url``, ``status``,
    /// ``decision``, ...; credential values redacted), oldest first.
    ///
    /// Returns:
    ///     list[dict]: The records kept in memory.
    fn trace(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let text = self.inner.trace_json();
        Ok(py.import("json")?.call_method1("loads", (text,))?.unbind())
    }
    /// The audit events: the policy's decisions and the credentials
    /// injected, oldest first.
    ///
    /// Returns:
    ///     list[dict]: The events kept in memory.
    fn audit_events(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let text = self.inner.audit_json();
        Ok(py.import("json")?.call_method1("loads", (text,))?.unbind())
    }
    /// How many trace records and audit events were dropped from memory to
    /// stay within `trace_limit` and `trace_bytes`: ``(records, events)``.
    #[getter]
    fn dropped(&self) -> (u64, u64) {
        self.inner.dropped()
    }
    /// Stops the proxy (open connections are cut). Safe to call twice.
    ///
    /// Raises:
    ///     MoatIOError: The audit log could not be finished.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let inner = &self.inner;
        py.detach(|| inner.close()).map_err(|e| to_py_err(py, &e))
    }
    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }
    /// Leaving a `with` block closes the proxy; exceptions propagate.
    fn __exit__(
        &self,
        py: Python<'_>,
        exc_type: Option<Py<PyAny>>,
        exc: Option<Py<PyAny>>,
        tb: Option<Py<PyAny>>,
    ) -> PyResult<bool> {
        let _ = (exc_type, exc, tb);
        self.close(py)?;
        Ok(false)
    }
    fn __repr__(&self) -> String {
        format!(
            "Proxy(address={:?}, closed={})",
            self.inner.address(),
            if self.inner.is_open() {
                "False"
            } else {
                "True"
            }
        )
    }
}

pub(crate) fn home_or_default(py: Python<'_>, home: Option<PathBuf>) -> PyResult<PathBuf> {
    moat_core::paths::home_or_default(home.as_deref()).map_err(|e| to_py_err(py, &e))
}

/// Stores a credential for `provider` in the moat home's encrypted store.
/// Never prompts.
///
/// For a token provider (``github``, ``anthropic``, ``openai``, a custom
/// provider), the token is `token`, else the provider's environment
/// variable (``GITHUB_TOKEN``, ``ANTHROPIC_API_KEY``, ...). For ``ssh``,
/// the key of the agent at ``SSH_AUTH_SOCK`` is recorded for `host`, with
/// the host's keys from ~/.ssh/known_hosts (a UserWarning when there are
/// none: runs need one to tell the host from another server). For
/// ``aws``, the role configuration is stored.
///
/// Args:
///     provider: ``"github"``, ``"anthropic"``, ``"openai"``, ``"ssh"``,
///         ``"aws"`` or a custom provider's name.
///     token: The token; default the provider's environment variable.
///     validate: Check a GitHub token against api.github.com first.
///     home: The moat home; default ``$MOAT_HOME``, else ``~/.moat``.
///     host: For ``ssh``: the host the key is for.
///     key: For ``ssh``: the agent key's fingerprint; default the agent's
///         first key.
///     role: For ``aws``: the role's ARN.
///     region: For ``aws``: the STS region; default ``us-east-1``.
///     session_duration: For ``aws``: session length in seconds (900 to
///         43200); default 900.
///     external_id: For ``aws``: the role's external id.
///
/// Returns:
///     dict: The stored grant (``provider``, ``source``, ``hosts``, ...),
///     never its token.
///
/// Raises:
///     InvalidArgumentError: An unknown provider, a missing token, `host`
///         or `role`, or a token GitHub refused.
///     MoatIOError: The store cannot be written.
#[pyfunction]
#[pyo3(signature = (provider, token=None, validate=true, home=None, host=None, key=None, role=None, region=None, session_duration=None, external_id=None))]
#[allow(clippy::too_many_arguments)]
fn grant(
    py: Python<'_>,
    provider: String,
    token: Option<String>,
    validate: bool,
    home: Option<PathBuf>,
    host: Option<String>,
    key: Option<String>,
    role: Option<String>,
    region: Option<String>,
    session_duration: Option<u32>,
    external_id: Option<String>,
) -> PyResult<Py<PyAny>> {
    let home = home_or_default(py, home)?;
    if provider == "aws" {
        let Some(role) = role else {
            return Err(to_py_err(
                py,
                &Error::new(
                    ErrorKind::InvalidArgument,
                    "aws grants need role=\"arn:aws:iam::...:role/...\"",
                ),
            ));
        };
        let grant = credential::aws::grant(
            &home,
            &role,
            region.as_deref(),
            session_duration,
            external_id.as_deref(),
        )
        .map_err(|e| to_py_err(py, &e))?;
        return json_to_py(py, &grant);
    }
    if provider == "ssh" {
        let Some(host) = host else {
            return Err(to_py_err(
                py,
                &Error::new(
                    ErrorKind::InvalidArgument,
                    "ssh grants need host=\"<host>\"",
                ),
            ));
        };
        let socket = credential::ssh::agent_socket();
        let grant = py
            .detach(|| credential::ssh::grant(&home, socket.as_deref(), &host, key.as_deref()))
            .map_err(|e| to_py_err(py, &e))?;
        if grant.host_keys.is_empty() {
            let message =
                std::ffi::CString::new(credential::ssh::missing_host_key_warning(&grant.host))
                    .map_err(|e| to_py_err(py, &Error::new(ErrorKind::Internal, e.to_string())))?;
            PyErr::warn(
                py,
                &py.get_type::<pyo3::exceptions::PyUserWarning>(),
                &message,
                1,
            )?;
        }
        return json_to_py(py, &grant);
    }
    let input = match token {
        Some(t) => credential::TokenInput::Given(Secret::new(t), "api".into()),
        None => credential::TokenInput::Environment,
    };
    let outcome = py
        .detach(|| credential::grant(&home, &provider, input, validate))
        .map_err(|e| to_py_err(py, &e))?;
    json_to_py(py, &outcome)
}

/// Removes the stored credential of a provider.
///
/// Args:
///     provider: The provider (``"github"``, ``"ssh:HOST"``, ``"aws"``, ...).
///     home: The moat home; default ``$MOAT_HOME``, else ``~/.moat``.
///
/// Returns:
///     bool: Whether there was one.
///
/// Raises:
///     MoatIOError: The store cannot be written.
#[pyfunction]
#[pyo3(signature = (provider, home=None))]
fn revoke(py: Python<'_>, provider: String, home: Option<PathBuf>) -> PyResult<bool> {
    let home = home_or_default(py, home)?;
    py.detach(|| credential::revoke(&home, &provider))
        .map_err(|e| to_py_err(py, &e))
}

/// The stored grants, never their tokens.
///
/// Args:
///     home: The moat home; default ``$MOAT_HOME``, else ``~/.moat``.
///
/// Returns:
///     list[dict]: Each grant's ``provider``, ``source``, ``created``,
///     ``expires``, ``hosts``, ...
///
/// Raises:
///     MoatIOError: The store cannot be read.
#[pyfunction]
#[pyo3(signature = (home=None))]
fn grants(py: Python<'_>, home: Option<PathBuf>) -> PyResult<Py<PyAny>> {
    let home = home_or_default(py, home)?;
    let list = py
        .detach(|| credential::list(&home))
        .map_err(|e| to_py_err(py, &e))?;
    json_to_py(py, &list)
}

fn report_or_error(py: Python<'_>, what: &str, r: moat_core::audit::Report) -> PyResult<Py<PyAny>> {
    if !r.ok {
        let diags = r
            .problems
            .iter()
            .map(|p| moat_core::Diagnostic {
                location: None,
                message: format!("{what}: {p}"),
            })
            .collect();
        return Err(to_py_err(
            py,
            &Error::from_diagnostics(ErrorKind::Config, diags),
        ));
    }
    json_to_py(py, &r)
}

/// A tamper-evident audit log: a directory with audit.jsonl and
/// checkpoints.jsonl (a run's directory, or a proxy's ``audit_dir``).
/// Nothing is read until `verify` or `export`.
///
/// Args:
///     path: The directory.
///     home: The moat home whose signing key signed the checkpoints;
///         default ``$MOAT_HOME``, else ``~/.moat``.
#[pyclass(module = "moat", frozen)]
pub(crate) struct AuditLog {
    dir: PathBuf,
    home: Option<PathBuf>,
}

#[pymethods]
impl AuditLog {
    #[new]
    #[pyo3(signature = (path, home=None))]
    pub(crate) fn new(path: PathBuf, home: Option<PathBuf>) -> Self {
        AuditLog { dir: path, home }
    }
    /// Verifies the hash chain, the Merkle tree and the checkpoints'
    /// signatures.
    ///
    /// Args:
    ///     key: A verifier key the checkpoints must be signed by; default
    ///         the home's own.
    ///
    /// Returns:
    ///     dict: The report (``ok``, ``entries``, ``types``, ``checkpoints``,
    ///     ``root``, ...).
    ///
    /// Raises:
    ///     ConfigError: The log does not verify; ``errors`` has one
    ///         `Diagnostic` per problem, the first bad entry first.
    ///     MoatIOError: The log cannot be read.
    #[pyo3(signature = (key=None))]
    fn verify(&self, py: Python<'_>, key: Option<String>) -> PyResult<Py<PyAny>> {
        let home = home_or_default(py, self.home.clone())?;
        let dir = self.dir.clone();
        let r = py
            .detach(|| moat_core::audit::verify(&dir, &home, key.as_deref()))
            .map_err(|e| to_py_err(py, &e))?;
        report_or_error(py, &format!("audit log {}", self.dir.display()), r)
    }
    /// Writes a self-contained proof bundle (verifiable offline with
    /// `verify_bundle`).
    ///
    /// Args:
    ///     path: The file to write.
    ///
    /// Returns:
    ///     dict: The log's verification report, as `verify` returns it.
    ///
    /// Raises:
    ///     ConfigError: The log does not verify.
    ///     MoatIOError: The log cannot be read or `path` written.
    fn export(&self, py: Python<'_>, path: PathBuf) -> PyResult<Py<PyAny>> {
        let home = home_or_default(py, self.home.clone())?;
        let dir = self.dir.clone();
        let r = py
            .detach(|| moat_core::audit::export_bundle(&dir, &home, &path))
            .map_err(|e| to_py_err(py, &e))?;
        json_to_py(py, &r)
    }
    fn __repr__(&self) -> String {
        format!("AuditLog({:?})", self.dir)
    }
}

/// Verifies an exported proof bundle offline.
///
/// Args:
///     path: The bundle (written by ``AuditLog.export``).
///     key: A verifier key it must be signed by; None: the key the bundle
///         names.
///
/// Returns:
///     dict: The report (``ok``, ``entries``, ``types``, ``root``, ...).
///
/// Raises:
///     ConfigError: The bundle does not verify, or is not signed by `key`.
///     InvalidArgumentError: The file is not a bundle.
///     MoatIOError: It cannot be read.
#[pyfunction]
#[pyo3(signature = (path, key=None))]
fn verify_bundle(py: Python<'_>, path: PathBuf, key: Option<String>) -> PyResult<Py<PyAny>> {
    let r = py
        .detach(|| moat_core::audit::verify_bundle(&path, key.as_deref()))
        .map_err(|e| to_py_err(py, &e))?;
    json_to_py(py, &r)
}

/// Loads and validates a workspace's configuration, collecting every
/// problem at once.
///
/// Args:
///     path: The workspace directory (its agent.yaml or moat.yaml is read;
///         neither is fine: the defaults), or the file itself.
///
/// Returns:
///     Config: The validated configuration.
///
/// Raises:
///     ConfigError: The file is invalid; ``path``, ``line`` and ``column``
///         locate the first problem, ``errors`` lists every one as a
///         `Diagnostic`.
///     MoatIOError: The workspace or the file cannot be read.
#[pyfunction]
fn load_config(py: Python<'_>, path: PathBuf) -> PyResult<Config> {
    let result = py.detach(|| config::load(&path));
    match result {
        Ok(inner) => Ok(Config { inner }),
        Err(e) => Err(to_py_err(py, &e)),
    }
}

/// The native part of the ``moat`` package; import ``moat`` instead.
#[pymodule]
fn _moat(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", moat_core::VERSION)?;
    m.add_class::<Config>()?;
    m.add_class::<Network>()?;
    m.add_class::<Mount>()?;
    m.add_class::<Credential>()?;
    m.add_class::<Proxy>()?;
    m.add_function(wrap_pyfunction!(load_config, m)?)?;
    m.add_function(wrap_pyfunction!(grant, m)?)?;
    m.add_class::<AuditLog>()?;
    m.add_function(wrap_pyfunction!(verify_bundle, m)?)?;
    m.add_function(wrap_pyfunction!(revoke, m)?)?;
    m.add_function(wrap_pyfunction!(grants, m)?)?;
    m.add_class::<run::Run>()?;
    m.add_class::<run::LogStream>()?;
    m.add_function(wrap_pyfunction!(run::run_fn, m)?)?;
    m.add_function(wrap_pyfunction!(run::claude, m)?)?;
    m.add_function(wrap_pyfunction!(run::policy_check, m)?)?;
    m.add_function(wrap_pyfunction!(run::policy_suggest, m)?)?;
    m.add_function(wrap_pyfunction!(run::trace_har, m)?)?;
    m.add_function(wrap_pyfunction!(run::runs, m)?)?;
    m.add_function(wrap_pyfunction!(run::clean, m)?)?;
    m.add_function(wrap_pyfunction!(run::promote, m)?)?;
    m.add_function(wrap_pyfunction!(run::system_images, m)?)?;
    m.add_function(wrap_pyfunction!(run::system_containers, m)?)?;
    m.add_function(wrap_pyfunction!(run::deps, m)?)?;
    m.add_function(wrap_pyfunction!(run::_supervise, m)?)?;
    m.add_function(wrap_pyfunction!(run::_router, m)?)?;
    Ok(())
}
