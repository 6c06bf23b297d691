//! The blocking facade: one tokio runtime owned by the library, for callers
//! that are not async (C and Python).
//!
//! The runtime is created on first use and lives for the rest of the process.
//! Calling a blocking function from inside an async context is a caller bug;
//! it returns an [`ErrorKind::InvalidArgument`](crate::error::ErrorKind::InvalidArgument) error instead of the panic
//! tokio would raise.

use std::path::Path;

use crate::config::{self, Config};
use crate::error::Result;

pub use crate::rt::{block_on, runtime};

/// Loads a workspace's configuration ([`config::load`]).
pub fn load_config(workspace: &Path) -> Result<Config> {
    config::load(workspace)
}

pub use proxy_facade::{BlockingProxy, ProxyOptions};

mod proxy_facade {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use super::block_on;
    use crate::error::{Error, ErrorKind, Result};
    use crate::policy::{HostPattern, PolicyMode};
    use crate::proxy::{ClientHandle, ClientSpec, Credential, Proxy, ProxyBuilder};
    use crate::trace::{AuditEvent, MemoryLimits, MemorySink, TraceRecord};

    /// Options of a [`BlockingProxy`], as C and Python give them: plain
    /// strings, validated here with errors that name the option.
    #[derive(Debug, Clone, Default)]
    pub struct ProxyOptions {
        /// `host:port` to listen on; default `127.0.0.1:0`.
        pub listen: Option<String>,
        /// The moat home (CA location); default `$MOAT_HOME` or `~/.moat`.
        pub home: Option<PathBuf>,
        /// Extra PEM roots for upstream TLS (adds to `MOAT_UPSTREAM_CA_FILE`).
        pub upstream_ca: Option<PathBuf>,
        /// `("host:port", "addr:port")` overrides (adds to `MOAT_RESOLVE`).
        pub resolve: Vec<(String, String)>,
        /// Credentials to inject.
        pub credentials: Vec<Credential>,
        /// Stored grants to inject (`github`, `anthropic`, a custom
        /// provider), read from the credential store of `home`.
        pub grants: Vec<String>,
        /// `"permissive"` (default) or `"strict"`.
        pub policy: Option<String>,
        /// Allow-list host patterns for strict mode.
        pub allow: Vec<String>,
        /// Request rules (`network.rules`): `(host, rules)`, each rule like
        /// `"allow GET /repos/**"` or `"deny git-push refs/heads/main"`.
        pub rules: Vec<(String, Vec<String>)>,
        /// The client's name in traces; default `"client"`.
        pub name: Option<String>,
        /// Bytes of text bodies kept in trace records; 0 (default) keeps none.
        pub capture_bodies: usize,
        /// Write the client's audit events to a tamper-evident log in this
        /// directory (its one writer); closed with a signed checkpoint.
        pub audit_dir: Option<PathBuf>,
        /// How many trace records and audit events are kept in memory (the
        /// oldest go first); see [`MemoryLimits`] for the defaults.
        pub trace_limits: MemoryLimits,
    }

    /// A proxy with one registered client, run on the facade's runtime: what
    /// a harness needs to run any subprocess through moat.
    pub struct BlockingProxy {
        /// Taken by the first `close`: every method takes `&self`, so that
        /// a caller may share one proxy between threads (one closing it
        /// while another reads its trace).
        proxy: std::sync::Mutex<Option<Proxy>>,
        audit_log: std::sync::Mutex<Option<Arc<crate::audit::AuditWriter>>>,
        client: ClientHandle,
        sink: Arc<MemorySink>,
        url: String,
        address: String,
        ca_cert_path: PathBuf,
        env: Vec<(String, String)>,
    }

    impl std::fmt::Debug for BlockingProxy {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("BlockingProxy")
                .field("address", &self.address)
                .field("open", &self.is_open())
                .finish_non_exhaustive()
        }
    }

    fn bad(message: String) -> Error {
        Error::new(ErrorKind::InvalidArgument, message)
    }

    impl BlockingProxy {
        /// Validates `options`, starts the proxy and registers the client.
        /// Operator settings from the environment (`MOAT_UPSTREAM_CA_FILE`,
        /// `MOAT_RESOLVE`) apply too.
        pub fn start(options: ProxyOptions) -> Result<BlockingProxy> {
            let mut builder = ProxyBuilder::from_env()?;
            if let Some(listen) = &options.listen {
                let addr = listen.parse().map_err(|_| {
                    bad(format!(
                        "listen: \"{listen}\" is not an address like 127.0.0.1:0"
                    ))
                })?;
                builder = builder.listen(addr);
            }
            if let Some(home) = &options.home {
                builder = builder.home(home);
            }
            if let Some(ca) = &options.upstream_ca {
                builder = builder.upstream_ca_file(ca)?;
            }
            for (from, to) in &options.resolve {
                builder = builder
                    .resolve_str(&format!("{from}={to}"))
                    .map_err(|e| bad(format!("resolve: {}", e.message())))?;
            }
            let policy = match options.policy.as_deref() {
                None => PolicyMode::Permissive,
                Some(p) => p.parse().map_err(|e| bad(format!("policy: {e}")))?,
            };
            let allow = options
                .allow
                .iter()
                .enumerate()
                .map(|(i, a)| HostPattern::parse(a).map_err(|e| bad(format!("allow[{i}]: {e}"))))
                .collect::<Result<Vec<_>>>()?;
            let rules = crate::policy::rules::parse_entries(&options.rules)
                .map_err(|e| bad(format!("rules{e}")))?;
            let mut credentials = options.credentials;
            let mut phases = Vec::new();
            if !options.grants.is_empty() {
                let home = crate::paths::home_or_default(options.home.as_deref())?;
                let session = options.name.clone().unwrap_or_else(|| "moat".to_string());
                let grants = options
                    .grants
                    .iter()
                    .enumerate()
                    .map(|(i, g)| {
                        crate::config::GrantRef::parse_any(g)
                            .map_err(|e| bad(format!("grants[{i}]: {e}")))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let mut binding = crate::credential::bind(&home, &grants, &session)?;
                phases = binding.take_phases();
                credentials.extend(binding.credentials);
            }
            let home_dir = crate::paths::home_or_default(options.home.as_deref())?;
            let name = options.name.clone().unwrap_or_else(|| "client".to_string());
            let audit_log = match &options.audit_dir {
                Some(dir) => Some(Arc::new(crate::audit::AuditWriter::open(
                    dir, &home_dir, &name,
                )?)),
                None => None,
            };
            let proxy = block_on(builder.start())??;
            let sink = Arc::new(MemorySink::new(options.trace_limits));
            let audit: Arc<dyn crate::trace::AuditSink> = match &audit_log {
                Some(log) => Arc::new(crate::trace::Tee(vec![sink.clone(), log.clone()])),
                None => sink.clone(),
            };
            let client = proxy.register(ClientSpec {
                name: options.name.unwrap_or_else(|| "client".to_string()),
                credentials,
                policy,
                allow,
                trace: Some(sink.clone()),
                audit: Some(audit),
                capture_bodies: options.capture_bodies,
                phases,
                rules,
            })?;
            Ok(BlockingProxy {
                url: client.proxy_url(proxy.local_addr()).expose().clone(),
                address: proxy.local_addr().to_string(),
                ca_cert_path: proxy.ca_cert_path().to_path_buf(),
                env: proxy.client_env(&client),
                proxy: std::sync::Mutex::new(Some(proxy)),
                audit_log: std::sync::Mutex::new(audit_log),
                client,
                sink,
            })
        }

        /// The proxy URL with the client's token (`http://moat:TOKEN@addr`).
        pub fn url(&self) -> &str {
            &self.url
        }

        /// The listen address, `host:port`.
        pub fn address(&self) -> &str {
            &self.address
        }

        /// The moat CA certificate clients must trust.
        pub fn ca_cert_path(&self) -> &Path {
            &self.ca_cert_path
        }

        /// The variables a child process needs (proxy and CA trust).
        pub fn env(&self) -> &[(String, String)] {
            &self.env
        }

        /// The client's name.
        pub fn name(&self) -> &str {
            self.client.name()
        }

        /// Trace records so far (also after [`BlockingProxy::close`]).
        pub fn trace(&self) -> Vec<TraceRecord> {
            self.sink.records()
        }

        /// Audit events so far (also after [`BlockingProxy::close`]).
        pub fn audit_events(&self) -> Vec<AuditEvent> {
            self.sink.events()
        }

        /// Trace records so far, as a JSON array (what C and Python hand
        /// on, without building each record first).
        pub fn trace_json(&self) -> String {
            self.sink.records_json()
        }

        /// Audit events so far, as a JSON array.
        pub fn audit_json(&self) -> String {
            self.sink.events_json()
        }

        /// How many trace records and audit events were dropped from memory
        /// to stay within [`ProxyOptions::trace_limits`] (the audit log on
        /// disk, with `audit_dir`, keeps every event).
        pub fn dropped(&self) -> (u64, u64) {
            self.sink.dropped()
        }

        /// Is the proxy still serving?
        pub fn is_open(&self) -> bool {
            self.proxy
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .is_some()
        }

        /// Stops the proxy and waits for its connections to end. Closing
        /// twice is fine.
        pub fn close(&self) -> Result<()> {
            // Taken out under the lock, shut down outside it: a concurrent
            // close returns at once, a reader never waits for the shutdown.
            // A lock poisoned by a panic elsewhere still holds the proxy:
            // it is taken and shut down, never left serving unseen.
            let proxy = self
                .proxy
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            if let Some(proxy) = proxy {
                block_on(proxy.shutdown())?;
            }
            let log = self
                .audit_log
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            if let Some(log) = log {
                log.close()?;
            }
            Ok(())
        }
    }

    impl Drop for BlockingProxy {
        fn drop(&mut self) {
            let _ = self.close();
        }
    }
}
