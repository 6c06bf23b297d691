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
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

mod run;

create_exception!(
    _moat,
    MoatError,
    PyException,
    "Base class of every moat error."
);
create_exception!(
    _moat,
    ConfigError,
    MoatError,
    "An invalid configuration file; `path`, `line` and `column` locate the first problem, `errors` lists all."
);
create_exception!(
    _moat,
    MoatIOError,
    MoatError,
    "Reading or writing a file failed."
);
create_exception!(
    _moat,
    InvalidArgumentError,
    MoatError,
    "An argument passed to moat is invalid."
);
create_exception!(_moat, InternalError, MoatError, "A bug in moat.");
create_exception!(
    _moat,
    ContainerRuntimeError,
    MoatError,
    "The container engine is unreachable or refused, or a run could not be set up."
);

/// Converts a moat-core error into its Python exception, with location
/// attributes (`path`, `line`, `column`, `errors`) on every kind.
pub(crate) fn to_py_err(py: Python<'_>, err: &Error) -> PyErr {
    let message = err.to_string();
    let exc = match err.kind() {
        ErrorKind::Config => ConfigError::new_err(message),
        ErrorKind::Io => MoatIOError::new_err(message),
        ErrorKind::InvalidArgument => InvalidArgumentError::new_err(message),
        ErrorKind::Internal => InternalError::new_err(message),
        ErrorKind::Runtime => ContainerRuntimeError::new_err(message),
    };
    let value = exc.value(py);
    let loc = err.location();
    let errors: Vec<String> = err.diagnostics().iter().map(ToString::to_string).collect();
    let attrs = [
        value.setattr("message", err.message()),
        value.setattr("path", loc.map(|l| l.path.to_string_lossy().into_owned())),
        value.setattr("line", loc.map(|l| l.line)),
        value.setattr("column", loc.map(|l| l.column)),
        value.setattr("errors", errors),
    ];
    match attrs.into_iter().find_map(Result::err) {
        Some(e) => e,
        None => exc,
    }
}

/// The `network` section of a configuration.
#[pyclass(module = "moat", frozen, get_all)]
#[derive(Clone)]
struct Network {
    /// `"permissive"` or `"strict"`.
    policy: String,
    /// Allow-list host patterns.
    allow: Vec<String>,
}

#[pymethods]
impl Network {
    fn __repr__(&self) -> String {
        format!("Network(policy={:?}, allow={:?})", self.policy, self.allow)
    }
}

/// A bind mount.
#[pyclass(module = "moat", frozen, get_all)]
#[derive(Clone)]
struct Mount {
    /// Absolute host path.
    source: String,
    /// Absolute container path.
    target: String,
    /// Mounted read-only.
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

/// A validated configuration with defaults filled in and the image resolved.
#[pyclass(module = "moat", frozen)]
struct Config {
    inner: CoreConfig,
}

#[pymethods]
impl Config {
    #[getter]
    fn workspace(&self) -> String {
        self.inner.workspace.to_string_lossy().into_owned()
    }
    #[getter]
    fn config_file(&self) -> Option<String> {
        self.inner
            .config_file
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned())
    }
    #[getter]
    fn name(&self) -> Option<String> {
        self.inner.name.clone()
    }
    #[getter]
    fn version(&self) -> Option<String> {
        self.inner.version.clone()
    }
    #[getter]
    fn image(&self) -> String {
        self.inner.resolved_image().0
    }
    #[getter]
    fn dependencies(&self) -> Vec<String> {
        self.inner
            .dependencies
            .iter()
            .map(ToString::to_string)
            .collect()
    }
    #[getter]
    fn grants(&self) -> Vec<String> {
        self.inner.grants.iter().map(ToString::to_string).collect()
    }
    #[getter]
    fn env(&self) -> BTreeMap<String, String> {
        self.inner.env.clone()
    }
    /// Secret references (never values), by variable name.
    #[getter]
    fn secrets(&self) -> BTreeMap<String, String> {
        self.inner
            .secrets
            .iter()
            .map(|(k, v)| (k.clone(), v.reference.clone()))
            .collect()
    }
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
    #[getter]
    fn ports(&self) -> BTreeMap<String, u16> {
        self.inner.ports.clone()
    }
    #[getter]
    fn command(&self) -> Option<Vec<String>> {
        self.inner.command.clone()
    }
    #[getter]
    fn interactive(&self) -> bool {
        self.inner.interactive
    }
    /// Resolves `secrets:` on this host (op read, aws ssm get-parameter) and
    /// returns {name: value}. Raises ConfigError naming the variable and
    /// backend (never a value) when a lookup fails or its CLI is missing.
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
    /// The resolved configuration as JSON, as `moat config --json` prints it.
    fn to_json(&self, py: Python<'_>) -> PyResult<String> {
        serde_json::to_string(&self.inner.resolved()).map_err(|e| {
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
            self.inner.resolved_image().0,
            self.inner.workspace
        )
    }
}

/// A credential the proxy injects: `header: value` on requests to `host`
/// (`api.github.com`, `*.example.com`, optionally `:port`; default 443).
/// The value never appears in repr, traces or errors.
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
    #[getter]
    fn host(&self) -> String {
        self.host.clone()
    }
    #[getter]
    fn header(&self) -> String {
        self.inner.header().as_str().to_string()
    }
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
/// through moat. Use as a context manager, or call close().
#[pyclass(module = "moat")]
struct Proxy {
    inner: BlockingProxy,
}

#[pymethods]
impl Proxy {
    #[new]
    #[pyo3(signature = (credentials=Vec::new(), policy=None, allow=Vec::new(), listen=None, upstream_ca=None, resolve=None, home=None, name=None, capture_bodies=0, grants=Vec::new(), audit_dir=None))]
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
    ) -> PyResult<Self> {
        let options = ProxyOptions {
            listen,
            home,
            upstream_ca,
            resolve: resolve.unwrap_or_default().into_iter().collect(),
            credentials: credentials.iter().map(|c| c.inner.clone()).collect(),
            policy,
            allow,
            name,
            capture_bodies,
            grants,
            audit_dir,
        };
        let inner = py
            .detach(|| BlockingProxy::start(options))
            .map_err(|e| to_py_err(py, &e))?;
        Ok(Proxy { inner })
    }
    /// The proxy URL including this client's token.
    #[getter]
    fn url(&self) -> String {
        self.inner.url().to_string()
    }
    /// The listen address, host:port.
    #[getter]
    fn address(&self) -> String {
        self.inner.address().to_string()
    }
    /// The moat CA certificate to trust.
    #[getter]
    fn ca_cert_path(&self) -> String {
        self.inner.ca_cert_path().to_string_lossy().into_owned()
    }
    /// Whether the proxy still serves.
    #[getter]
    fn closed(&self) -> bool {
        !self.inner.is_open()
    }
    /// The environment variables a child process needs.
    fn env(&self) -> BTreeMap<String, String> {
        self.inner.env().iter().cloned().collect()
    }
    /// Trace records (a list of dicts), one per request.
    fn trace(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        json_to_py(py, &self.inner.trace())
    }
    /// Audit events (a list of dicts): policy decisions and injections.
    fn audit_events(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        json_to_py(py, &self.inner.audit_events())
    }
    /// Stops the proxy. Safe to call twice.
    fn close(&mut self, py: Python<'_>) -> PyResult<()> {
        let inner = &mut self.inner;
        py.detach(|| inner.close()).map_err(|e| to_py_err(py, &e))
    }
    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }
    fn __exit__(
        &mut self,
        py: Python<'_>,
        _exc_type: Option<Py<PyAny>>,
        _exc: Option<Py<PyAny>>,
        _tb: Option<Py<PyAny>>,
    ) -> PyResult<bool> {
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
    match home {
        Some(h) => Ok(h),
        None => moat_core::paths::moat_home().map_err(|e| to_py_err(py, &e)),
    }
}

/// Stores a credential for `provider` (never prompts): `token`, else the
/// provider's environment variable (GITHUB_TOKEN, ANTHROPIC_API_KEY, ...).
/// GitHub tokens are checked against api.github.com unless `validate=False`.
/// Returns the stored grant without its token.
/// For `ssh`, pass `host` (and optionally the agent key's `key`
/// fingerprint): the key of the agent at SSH_AUTH_SOCK is recorded for it,
/// with the host's keys from ~/.ssh/known_hosts (a UserWarning when there
/// are none: runs need one to tell the host from another server).
/// For `aws`, pass `role` (and optionally `region`, `session_duration` in
/// seconds, `external_id`): the role configuration is stored.
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

/// Removes the stored credential of `provider`; returns whether there was one.
#[pyfunction]
#[pyo3(signature = (provider, home=None))]
fn revoke(py: Python<'_>, provider: String, home: Option<PathBuf>) -> PyResult<bool> {
    let home = home_or_default(py, home)?;
    py.detach(|| credential::revoke(&home, &provider))
        .map_err(|e| to_py_err(py, &e))
}

/// The stored grants (provider, source, created, expires, hosts, ...),
/// never the tokens.
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

/// A tamper-evident audit log (a directory with audit.jsonl and
/// checkpoints.jsonl).
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
    /// Verifies the chain, the tree and the checkpoint signatures; returns
    /// the report, or raises ConfigError naming the first bad entry.
    #[pyo3(signature = (key=None))]
    fn verify(&self, py: Python<'_>, key: Option<String>) -> PyResult<Py<PyAny>> {
        let home = home_or_default(py, self.home.clone())?;
        let dir = self.dir.clone();
        let r = py
            .detach(|| moat_core::audit::verify(&dir, &home, key.as_deref()))
            .map_err(|e| to_py_err(py, &e))?;
        report_or_error(py, &format!("audit log {}", self.dir.display()), r)
    }
    /// Writes a self-contained proof bundle to `path`.
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

/// Verifies an exported proof bundle offline; with `key`, it must be signed
/// by that verifier key. Returns the report or raises ConfigError.
#[pyfunction]
#[pyo3(signature = (path, key=None))]
fn verify_bundle(py: Python<'_>, path: PathBuf, key: Option<String>) -> PyResult<Py<PyAny>> {
    let r = py
        .detach(|| moat_core::audit::verify_bundle(&path, key.as_deref()))
        .map_err(|e| to_py_err(py, &e))?;
    json_to_py(py, &r)
}

/// Loads and validates the configuration of a workspace (a directory, or the
/// path of its agent.yaml / moat.yaml). Raises ConfigError for an invalid file.
#[pyfunction]
fn load_config(py: Python<'_>, path: PathBuf) -> PyResult<Config> {
    let result = py.detach(|| config::load(&path));
    match result {
        Ok(inner) => Ok(Config { inner }),
        Err(e) => Err(to_py_err(py, &e)),
    }
}

#[pymodule]
fn _moat(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", moat_core::VERSION)?;
    m.add("MoatError", py.get_type::<MoatError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("MoatIOError", py.get_type::<MoatIOError>())?;
    m.add(
        "InvalidArgumentError",
        py.get_type::<InvalidArgumentError>(),
    )?;
    m.add("InternalError", py.get_type::<InternalError>())?;
    m.add(
        "ContainerRuntimeError",
        py.get_type::<ContainerRuntimeError>(),
    )?;
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
    m.add_function(wrap_pyfunction!(run::runs, m)?)?;
    m.add_function(wrap_pyfunction!(run::clean, m)?)?;
    m.add_function(wrap_pyfunction!(run::_supervise, m)?)?;
    m.add_function(wrap_pyfunction!(run::_router, m)?)?;
    Ok(())
}
