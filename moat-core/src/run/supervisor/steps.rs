//! A run's setup as steps, each with its undo. Setup runs [`STEPS`] in
//! order; cleanup undoes the completed ones in reverse, so a failure at any
//! step, or the run's end, leaves nothing behind. The order is data, and
//! `tests` checks it, and what each failure leaves, on fakes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::files::{
    agent_user, container_files, image_users, ssh_files, write_agent_file, AWS_CONFIG_PATH,
    AWS_HELPER, AWS_HELPER_PATH, CA_BUNDLE_PATH, SSH_AGENT_DIR, SSH_CONFIG_PATH,
    SSH_KNOWN_HOSTS_PATH,
};
use super::{JsonlTrace, Supervision};
use crate::error::{Error, ErrorKind, Result};
use crate::policy::PolicyMode;
use crate::proxy::{ClientSpec, Listen, ProxyBuilder};
use crate::run::logs::{LogWriter, Stream, DEFAULT_LIMIT};
use crate::run::{firewall, now, update_meta, RunState};
use crate::runtime::{Bind, ContainerSpec, Output, PullProgress, HOME_LABEL, RUN_LABEL};
use crate::trace::{AuditEvent, GrantHosts, MountRecord, SecretSource, TraceSink};

/// One step of a run's setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Grants bound and secrets resolved, on the host.
    Credentials,
    /// The image, pulled when missing.
    Image,
    /// The run's own network (internal in strict mode).
    Network,
    /// The proxy on the network's gateway, with the run registered.
    Proxy,
    /// The filtering SSH agent and a forwarder per granted host.
    Ssh,
    /// Strict mode's host firewall rules and the listeners' guard.
    Firewall,
    /// The routing proxy, for runs with `ports:`.
    Router,
    /// The files the container mounts, and its environment.
    Files,
    /// The container: created, its output followed, started, routed.
    Container,
}

/// Setup, in order.
pub(crate) const STEPS: [Step; 9] = [
    Step::Credentials,
    Step::Image,
    Step::Network,
    Step::Proxy,
    Step::Ssh,
    Step::Firewall,
    Step::Router,
    Step::Files,
    Step::Container,
];

impl Step {
    /// Its name in `run.json`'s phases.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Step::Credentials => "credentials",
            Step::Image => "image",
            Step::Network => "network",
            Step::Proxy => "proxy",
            Step::Ssh => "ssh",
            Step::Firewall => "firewall",
            Step::Router => "router",
            Step::Files => "files",
            Step::Container => "container",
        }
    }

    /// Its undo may only run once the container is gone (rules that confine
    /// it, the network it is on).
    fn needs_container_gone(self) -> bool {
        matches!(self, Step::Firewall | Step::Network)
    }
}

impl Supervision {
    fn strict(&self) -> bool {
        self.plan.network.policy == PolicyMode::Strict
    }

    /// Runs the steps in order; stops at the first failure, leaving the
    /// steps begun for [`Supervision::tear_down`]. A step that failed half
    /// way is undone too: every undo takes away what its step made, and no
    /// more (a container created but not started, say).
    pub(crate) async fn set_up(&mut self) -> Result<()> {
        if self.strict() {
            // Before anything is made: a run that cannot be confined is not
            // started.
            self.services.firewall.check()?;
        }
        for step in STEPS {
            let t = Instant::now();
            self.done.push(step);
            self.run_step(step).await?;
            self.phase(step.name(), t);
        }
        let phases = self.phases.clone();
        let urls = self.built.urls.clone();
        update_meta(&self.dir, |m| {
            m.state = RunState::Running;
            m.started_at = Some(now());
            m.phases = phases;
            m.urls = urls;
        })?;
        self.record(AuditEvent::RunStarted {
            run: self.id.clone(),
            container: self.built.container.clone().unwrap_or_default(),
        });
        Ok(())
    }

    /// Undoes the completed steps in reverse. The container's rules and
    /// network stay while it may still be there. The first error, if any.
    pub(crate) async fn tear_down(&mut self) -> Option<String> {
        let mut first: Option<String> = None;
        let mut container_gone = true;
        while let Some(step) = self.done.pop() {
            if step.needs_container_gone() && !container_gone {
                // Kept: a later `refresh` removes them with the container.
                continue;
            }
            if let Err(e) = self.undo_step(step).await {
                if step == Step::Container {
                    container_gone = false;
                }
                first.get_or_insert(format!("{}: {e}", step.name()));
            }
        }
        first
    }

    async fn run_step(&mut self, step: Step) -> Result<()> {
        match step {
            Step::Credentials => self.credentials(),
            Step::Image => self.image().await,
            Step::Network => self.network().await,
            Step::Proxy => self.proxy().await,
            Step::Ssh => self.ssh().await,
            Step::Firewall => self.firewall(),
            Step::Router => self.router().await,
            Step::Files => self.files().await,
            Step::Container => self.container().await,
        }
    }

    async fn undo_step(&mut self, step: Step) -> Result<()> {
        match step {
            Step::Credentials | Step::Image => Ok(()),
            Step::Network => match self.built.network.take() {
                Some(n) => self.services.runtime.remove_network(&n.name).await,
                None => Ok(()),
            },
            Step::Proxy => {
                if let Some(proxy) = self.built.proxy.take() {
                    proxy.shutdown().await;
                }
                Ok(())
            }
            Step::Ssh => {
                if let Some(cancel) = self.built.ssh_cancel.take() {
                    cancel.cancel();
                    let socket = self.dir.join("ssh").join("agent.sock");
                    if let Err(e) = std::fs::remove_file(&socket) {
                        if e.kind() != std::io::ErrorKind::NotFound {
                            return Err(Error::io(&socket, "remove", e));
                        }
                    }
                }
                Ok(())
            }
            Step::Firewall => {
                if let Some((_, _, router)) = self.built.loopback.take() {
                    router.stop();
                }
                self.services.firewall.remove(&self.id)
            }
            Step::Router => {
                if self.plan.ports.is_empty() {
                    return Ok(());
                }
                let (routes, home, name, id) = (
                    self.services.routes.clone(),
                    self.home.clone(),
                    self.name.clone(),
                    self.id.clone(),
                );
                tokio::task::spawn_blocking(move || routes.release(&home, &name, &id))
                    .await
                    .map_err(|e| Error::new(ErrorKind::Internal, format!("router task: {e}")))?
            }
            Step::Files => {
                let dir = self.dir.join("container");
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(Error::io(&dir, "remove", e)),
                }
            }
            Step::Container => {
                let Some(c) = self.built.container.clone() else {
                    return Ok(());
                };
                let runtime = &self.services.runtime;
                runtime.remove(&c).await?;
                if runtime.state(&c).await?.is_some() {
                    return Err(Error::new(
                        ErrorKind::Runtime,
                        format!(
                            "container {c} is still there; its firewall rules and network are kept"
                        ),
                    ));
                }
                self.built.container = None;
                Ok(())
            }
        }
    }

    /// Grants and secrets, on the host.
    fn credentials(&mut self) -> Result<()> {
        let binding = crate::credential::bind(&self.home, &self.plan.grants, &self.id)?;
        self.record(AuditEvent::GrantsBound {
            run: self.id.clone(),
            grants: binding
                .hosts
                .iter()
                .map(|(g, h)| GrantHosts {
                    grant: g.clone(),
                    hosts: h.clone(),
                })
                .collect(),
        });
        let mut sources = Vec::new();
        for (name, r) in &self.plan.secrets {
            let value = crate::secrets::resolve_one(name, r)?;
            sources.push(SecretSource {
                name: name.clone(),
                backend: r.backend.name().to_string(),
            });
            self.built
                .secret_env
                .push(crate::secret::Secret::new(format!(
                    "{name}={}",
                    value.expose()
                )));
        }
        if !sources.is_empty() {
            self.record(AuditEvent::SecretsResolved {
                run: self.id.clone(),
                secrets: sources,
            });
        }
        self.built.binding = Some(binding);
        Ok(())
    }

    /// The image: its id, pulled first when missing (with progress).
    async fn image(&mut self) -> Result<()> {
        let runtime = self.services.runtime.clone();
        let engine = runtime.ping().await?;
        if engine.rootless {
            let name = runtime.engine().title();
            return Err(Error::new(
                ErrorKind::Runtime,
                format!(
                    "moat does not run on a rootless {name} engine yet ({}): its networks live in a user namespace with no bridge on this host, so the run's proxy, strict mode's firewall and routing could not reach the container. Use the engine's rootful service (see docs/runtimes.md)",
                    engine.host
                ),
            ));
        }
        if let Some(recipe) = self.plan.deps.clone() {
            // The dependencies' image: found, pulled, or built.
            let progress = self.progress.clone();
            let report = move |m: &str| progress(m);
            crate::deps::ensure(runtime.as_ref(), &recipe, &self.labels(), &report).await?;
        }
        let image = self.plan.image.clone();
        let mut id = runtime.image_id(&image).await?;
        if id.is_none() {
            (self.progress)(&format!("Pulling image {image}"));
            let last = Mutex::new(Instant::now() - Duration::from_secs(1));
            let progress = self.progress.clone();
            let shown = image.clone();
            let report = move |p: &PullProgress| {
                let Ok(mut last) = last.lock() else { return };
                if last.elapsed() < Duration::from_millis(200) {
                    return;
                }
                *last = Instant::now();
                progress(&format!(
                    "Pulling image {shown}: {}/{} layers, {:.1}/{:.1} MB",
                    p.layers_done,
                    p.layers,
                    p.bytes as f64 / 1e6,
                    p.total as f64 / 1e6
                ));
            };
            runtime
                .pull_image(&image, &report)
                .await
                .map_err(|e| unavailable_image(&image, self.plan.image_source, e))?;
            id = runtime.image_id(&image).await?;
            (self.progress)(&format!("Pulled image {image}"));
        }
        let mut id = id.unwrap_or_default();
        if let Some(agent) = self.plan.agent.clone() {
            // The agent's image: the base image with the agent in it,
            // made once per base image and build.
            let progress = self.progress.clone();
            let report = move |m: &str| progress(m);
            let (tag, made) = crate::agent::preset(agent.agent)
                .image(
                    &self.home,
                    runtime.as_ref(),
                    &image,
                    &id,
                    &agent.version,
                    &self.labels(),
                    &report,
                )
                .await?;
            update_meta(&self.dir, |m| m.image = tag.clone())?;
            self.plan.image = tag;
            id = made;
        }
        self.built.image_id = id;
        Ok(())
    }

    /// The run's own network; internal (no route out) when strict.
    async fn network(&mut self) -> Result<()> {
        let labels = self.labels();
        let name = format!("moat-{}", self.id);
        let network = self
            .services
            .runtime
            .create_network(&name, &firewall::bridge(&self.id), self.strict(), &labels)
            .await?;
        self.built.network = Some(network.clone());
        update_meta(&self.dir, |m| m.network = Some(network.name.clone()))?;
        Ok(())
    }

    /// The proxy, on the host's address on the run's network only, with
    /// the run registered under its own token.
    async fn proxy(&mut self) -> Result<()> {
        let gateway = self.gateway()?;
        let builder = ProxyBuilder::from_env()?.home(&self.home);
        let builder = match self.listen_at()? {
            Listen::Now => builder.listen(SocketAddr::new(gateway, 0)),
            Listen::BeforeUp => builder.listen_before_up(SocketAddr::new(gateway, 0)),
        };
        let proxy = builder.start().await?;
        let jsonl = Arc::new(JsonlTrace::open(
            &self.dir.join("network.jsonl"),
            super::TRACE_LIMIT,
        )?);
        self.built.trace = Some(jsonl.clone());
        let binding = self
            .built
            .binding
            .as_mut()
            .ok_or_else(|| missing("binding"))?;
        let client = proxy.register(ClientSpec {
            name: self.id.clone(),
            credentials: std::mem::take(&mut binding.credentials),
            policy: self.plan.network.policy,
            allow: self.plan.network.allow.clone(),
            trace: Some(jsonl),
            audit: Some(self.audit.clone()),
            capture_bodies: 0,
            phases: binding.take_phases(),
            rules: self.plan.network.rules.clone(),
        })?;
        self.built.proxy_addr = Some(proxy.local_addr());
        self.built.proxy_url = Some(client.proxy_url(proxy.local_addr()));
        self.built.ca_pem = proxy.ca().cert_pem().to_string();
        self.built.overrides = Some(proxy.overrides());
        self.built.proxy = Some(proxy);
        Ok(())
    }

    /// SSH grants: the filtering agent, and a forwarder per granted host on
    /// the proxy's address.
    async fn ssh(&mut self) -> Result<()> {
        let grants = match self.built.binding.as_mut() {
            Some(b) => std::mem::take(&mut b.ssh),
            None => Vec::new(),
        };
        if grants.is_empty() {
            return Ok(());
        }
        let gateway = self.gateway()?;
        let overrides = self
            .built
            .overrides
            .clone()
            .ok_or_else(|| missing("proxy"))?;
        let trace: Arc<dyn TraceSink> = self.built.trace.clone().ok_or_else(|| missing("trace"))?;
        let notes = self.built.notes.0.clone();
        self.built.ssh_hosts =
            super::ssh::start(self, grants, gateway, overrides, trace, notes).await?;
        Ok(())
    }

    /// Strict mode's rules, and the guard of the run's listeners wherever
    /// the host firewall can be changed (in strict mode it must be).
    fn firewall(&mut self) -> Result<()> {
        let network = self
            .built
            .network
            .clone()
            .ok_or_else(|| missing("network"))?;
        let proxy = self.built.proxy_addr.ok_or_else(|| missing("proxy"))?;
        let mut ports = vec![proxy.port()];
        ports.extend(self.built.ssh_hosts.iter().map(|(_, port)| *port));
        if !self.plan.ports.is_empty() {
            // The endpoints by their URLs from inside the container: a
            // router of the run's own beside the proxy (see `loopback`).
            let listener =
                crate::net::listen(SocketAddr::new(network.gateway, 0), self.listen_at()?)
                    .map_err(|e| {
                        Error::new(
                            ErrorKind::Io,
                            format!(
                                "cannot listen on {} for the run's endpoints: {e}",
                                network.gateway
                            ),
                        )
                    })?;
            let router = crate::routing::Router::serve_own(
                &self.home,
                listener,
                &self.name,
                self.plan.ports.keys().cloned().collect(),
            )?;
            let addr = router.local_addr();
            ports.push(addr.port());
            self.built.loopback = Some((addr, 0, router));
        }
        let fw = self.services.firewall.clone();
        if self.strict() {
            fw.install(&self.id, &network.bridge, network.gateway, &ports)?;
        }
        if self.strict() || fw.check().is_ok() {
            fw.guard(&self.id, &network.bridge, network.gateway, &ports)?;
            self.built.guarded = true;
        }
        Ok(())
    }

    /// Hostname routing: the router (started now if none runs) gives each
    /// endpoint its URL, which the agent sees as `MOAT_URL_<ENDPOINT>`.
    async fn router(&mut self) -> Result<()> {
        if self.plan.ports.is_empty() {
            return Ok(());
        }
        let command = crate::run::router_command(&self.launcher);
        let (routes, home, name, id) = (
            self.services.routes.clone(),
            self.home.clone(),
            self.name.clone(),
            self.id.clone(),
        );
        // The run holds its place in the route table (no endpoints yet)
        // before it makes sure a router runs: a run ending meanwhile sees
        // a table that is not empty and leaves the router running.
        let port = tokio::task::spawn_blocking(move || {
            routes.register(&home, &name, &id, Default::default())?;
            routes.ensure(&home, &command).inspect_err(|_| {
                let _ = routes.release(&home, &name, &id);
            })
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, format!("router task: {e}")))??;
        if let Some((_, router_port, _)) = &mut self.built.loopback {
            *router_port = port;
        }
        for endpoint in self.plan.ports.keys() {
            self.built.urls.insert(
                endpoint.clone(),
                format!("https://{endpoint}.{}.localhost:{port}", self.name),
            );
        }
        Ok(())
    }

    /// The container's environment and the files it mounts.
    async fn files(&mut self) -> Result<()> {
        // What is mounted, and whose it is, is what was checked.
        self.plan.pinned.iter().try_for_each(|p| p.verify())?;
        self.built.config_files = super::files::config_snapshot(&self.plan.workspace);
        let (uid, gid) = agent_user(&self.plan.workspace)?;
        if uid == 0 {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&self.plan.workspace)
                .map_err(|e| Error::io(&self.plan.workspace, "read", e))?
                .permissions()
                .mode();
            self.built.root_agent = Some((std::time::SystemTime::now(), mode & 0o7777));
        }
        self.built.user = (uid, gid);
        let binding = self
            .built
            .binding
            .as_ref()
            .ok_or_else(|| missing("binding"))?;
        let url = self
            .built
            .proxy_url
            .as_ref()
            .ok_or_else(|| missing("proxy"))?;
        let mut env: Vec<String> = self
            .plan
            .env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        env.extend(self.built.secret_env.iter().map(|s| s.expose().clone()));
        // Variables the agent's preset reads from its files instead.
        let hidden = self
            .plan
            .agent
            .as_ref()
            .map_or(&[][..], |a| crate::agent::preset(a.agent).hidden_env());
        env.extend(
            binding
                .env
                .iter()
                .filter(|(k, _)| !hidden.contains(&k.as_str()))
                .map(|(k, v)| format!("{k}={v}")),
        );
        env.extend(
            crate::proxy::proxy_env(url.expose(), CA_BUNDLE_PATH)
                .into_iter()
                .map(|(k, v)| format!("{k}={v}")),
        );
        if !self.built.ssh_hosts.is_empty() {
            env.push(format!("SSH_AUTH_SOCK={SSH_AGENT_DIR}/agent.sock"));
        }
        if binding.aws_region.is_some() {
            env.push(format!("AWS_CONFIG_FILE={AWS_CONFIG_PATH}"));
            env.push("AWS_SDK_LOAD_CONFIG=1".into());
        }
        for (endpoint, url) in &self.built.urls {
            let key: String = endpoint
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_uppercase()
                    } else {
                        '_'
                    }
                })
                .collect();
            env.push(format!("MOAT_URL_{key}={url}"));
        }
        if !self.built.urls.is_empty() {
            let names: Vec<&str> = self.built.urls.keys().map(String::as_str).collect();
            env.push(format!("MOAT_ENDPOINTS={}", names.join(",")));
        }
        env.push(format!("MOAT_RUN_ID={}", self.id));
        env.push(format!("MOAT_RUN_NAME={}", self.name));
        // git must fail rather than prompt for a password nobody can type.
        env.push("GIT_TERMINAL_PROMPT=0".into());

        let mut binds = vec![Bind {
            source: self.plan.workspace.to_string_lossy().into_owned(),
            target: "/workspace".into(),
            read_only: false,
        }];
        let users = image_users(
            self.services.runtime.as_ref(),
            &self.home,
            &self.id,
            &self.plan.image,
            &self.built.image_id,
        )
        .await?;
        let (mut files, tmpfs) = container_files(&users, uid, gid, &self.built.ca_pem);
        if let Some(region) = &binding.aws_region {
            // AWS SDKs and the CLI get the run's role credentials from the
            // proxy through `credential_process`; the host's keys stay on
            // the host.
            files.push((
                AWS_HELPER_PATH.to_string(),
                AWS_HELPER.as_bytes().to_vec(),
                0o755,
            ));
            files.push((
                AWS_CONFIG_PATH.to_string(),
                format!("[default]\ncredential_process = {AWS_HELPER_PATH}\nregion = {region}\n")
                    .into_bytes(),
                0o644,
            ));
        }
        if !self.built.ssh_hosts.is_empty() {
            let gateway = self.gateway()?;
            let (config, known_hosts) = ssh_files(&self.built.ssh_hosts, gateway);
            files.push((SSH_CONFIG_PATH.to_string(), config.into_bytes(), 0o644));
            files.push((
                SSH_KNOWN_HOSTS_PATH.to_string(),
                known_hosts.into_bytes(),
                0o644,
            ));
            binds.push(Bind {
                source: self.dir.join("ssh").to_string_lossy().into_owned(),
                target: SSH_AGENT_DIR.into(),
                read_only: true,
            });
        }
        let files_dir = self.dir.join("container");
        crate::paths::private_dir(&files_dir)?;
        for (target, content, mode) in &files {
            let name = target.rsplit('/').next().unwrap_or("file");
            let path = files_dir.join(name);
            write_agent_file(&path, content, *mode & 0o111 != 0, uid, gid)?;
            binds.push(Bind {
                source: path.to_string_lossy().into_owned(),
                target: target.clone(),
                read_only: true,
            });
        }
        if let Some(agent) = &self.plan.agent {
            let progress = self.progress.clone();
            let warn = move |m: &str| progress(m);
            let state = crate::agent::preset(agent.agent).state(&crate::agent::StateContext {
                home: &self.home,
                workspace: &self.plan.workspace,
                binding,
                uid,
                gid,
                warn: &warn,
            })?;
            if let Some(state) = state {
                binds.push(Bind {
                    source: state.source.to_string_lossy().into_owned(),
                    target: state.target,
                    read_only: false,
                });
            }
        }
        for m in &self.plan.mounts {
            binds.push(Bind {
                source: m.source.to_string_lossy().into_owned(),
                target: m.target.clone(),
                read_only: m.read_only,
            });
        }
        self.built.env = crate::secret::Secret::new(env);
        self.built.binds = binds;
        self.built.tmpfs = tmpfs;
        Ok(())
    }

    /// The container: created, its output followed from before it starts
    /// (so nothing is missed), started, and routed.
    async fn container(&mut self) -> Result<()> {
        let network = self
            .built
            .network
            .clone()
            .ok_or_else(|| missing("network"))?;
        let proxy = self.built.proxy_addr.ok_or_else(|| missing("proxy"))?;
        let (uid, gid) = self.built.user;
        let strict = self.strict();
        let mut labels = self.labels();
        labels.insert("dev.moat.name".to_string(), self.name.clone());
        // Again at the last moment: the engine follows the paths it is given
        // when it creates the container.
        self.plan.pinned.iter().try_for_each(|p| p.verify())?;
        let spec = ContainerSpec {
            name: format!("moat-{}", self.id),
            image: self.plan.image.clone(),
            command: self.plan.command.clone(),
            env: self.built.env.expose().clone(),
            user: format!("{uid}:{gid}"),
            workdir: "/workspace".into(),
            binds: self.built.binds.clone(),
            network: network.name.clone(),
            labels,
            tty: self.plan.interactive,
            hostname: self.name.clone(),
            // Strict: the engine's resolver forwards to the proxy's address,
            // where the firewall drops it; names are resolved by the proxy.
            dns: if strict {
                vec![network.gateway.to_string()]
            } else {
                Vec::new()
            },
            tmpfs: self.built.tmpfs.clone(),
            // The endpoints' names are loopback (`*.localhost`), for the
            // resolvers that do not know it themselves (glibc's): see
            // `route_loopback`.
            hosts: self
                .built
                .urls
                .keys()
                .map(|e| {
                    (
                        format!("{e}.{}.localhost", self.name),
                        std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
                    )
                })
                .collect(),
            build: false,
        };
        let runtime = self.services.runtime.clone();
        let t = Instant::now();
        let container = runtime.create_container(&spec).await?;
        self.built.container = Some(container.clone());
        update_meta(&self.dir, |m| {
            m.container = Some(container.clone());
            m.proxy = Some(proxy.to_string());
            m.user = Some(format!("{uid}:{gid}"));
        })?;
        self.phase("create", t);

        let t = Instant::now();
        let mut output = runtime.attach_output(&container).await?;
        self.phase("attach", t);
        let mut writer = LogWriter::open(&self.dir.join("logs.jsonl"), DEFAULT_LIMIT)?;
        let mut notes_rx = self.built.notes.1.take().ok_or_else(|| missing("notes"))?;
        self.built.log_task = Some(tokio::spawn(async move {
            loop {
                let result = tokio::select! {
                    item = output.next() => match item {
                        None => break,
                        Some(Ok(Output::Stdout(b))) => writer.write(Stream::Stdout, &b),
                        Some(Ok(Output::Stderr(b))) => writer.write(Stream::Stderr, &b),
                        Some(Err(e)) => writer.write(Stream::Moat, format!("moat: {e}\n").as_bytes()),
                    },
                    Some(note) = notes_rx.recv() => writer.write(Stream::Moat, note.as_bytes()),
                };
                // Said once: after a failed write the writer counts what it
                // cannot keep, and the run's end notes it.
                if let Err(e) = result {
                    tracing::warn!(error = %e, "the run's output cannot be written");
                }
            }
            writer
        }));
        self.record(AuditEvent::ContainerCreated {
            run: self.id.clone(),
            container: container.clone(),
            image: self.plan.image.clone(),
            user: format!("{uid}:{gid}"),
            no_new_privileges: true,
            cap_drop: vec!["ALL".into()],
            network: network.name.clone(),
            internal_network: network.internal,
            firewall: strict,
            proxy_guard: self.built.guarded,
            proxy: proxy.to_string(),
            mounts: spec
                .binds
                .iter()
                .map(|b| MountRecord {
                    source: b.source.clone(),
                    target: b.target.clone(),
                    read_only: b.read_only,
                })
                .collect(),
        });
        if let Some(gate) = self.gate.take() {
            let t = Instant::now();
            gate.await?;
            self.phase("attach_wait", t);
        }
        let t = Instant::now();
        runtime.start(&container).await?;
        if !network.up {
            gateway_up(network.gateway, self.gateway_wait).await?;
        }
        self.phase("start", t);
        // A command that already exited has no address: nothing to route.
        if !self.plan.ports.is_empty() {
            if let Some(ip) = runtime.container_ip(&container, &network.name).await? {
                let endpoints: BTreeMap<String, String> = self
                    .plan
                    .ports
                    .iter()
                    .map(|(name, port)| (name.clone(), SocketAddr::new(ip, *port).to_string()))
                    .collect();
                self.services
                    .routes
                    .register(&self.home, &self.name, &self.id, endpoints)?;
            }
            self.route_loopback(&container).await;
        }
        Ok(())
    }

    /// The labels of everything the run makes on the engine.
    fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (RUN_LABEL.to_string(), self.id.clone()),
            (
                HOME_LABEL.to_string(),
                self.home.to_string_lossy().into_owned(),
            ),
        ])
    }

    /// Whether the run's listeners bind before the gateway is up.
    pub(super) fn listen_at(&self) -> Result<Listen> {
        let network = self
            .built
            .network
            .as_ref()
            .ok_or_else(|| missing("network"))?;
        Ok(if network.up {
            Listen::Now
        } else {
            Listen::BeforeUp
        })
    }

    /// Sends the container's connections to its own loopback at the
    /// router's port to the endpoints' forwarder, so `MOAT_URL_*` work from
    /// inside. Not fatal: the run goes on without, and its output says why.
    async fn route_loopback(&mut self, container: &str) {
        let Some((forwarder, port, _)) = &self.built.loopback else {
            return;
        };
        let (forwarder, port) = (*forwarder, *port);
        let taken = self.plan.ports.values().any(|p| *p == port);
        let result = if taken {
            Err(Error::new(
                ErrorKind::Config,
                format!("an endpoint of this run listens on port {port} in the container, the routing proxy's port, so 127.0.0.1:{port} stays the container's own (choose another with MOAT_PROXY_PORT)"),
            ))
        } else {
            match self.services.runtime.container_pid(container).await {
                Ok(Some(pid)) => tokio::task::spawn_blocking(move || {
                    super::loopback::install(pid, port, forwarder)
                })
                .await
                .unwrap_or_else(|e| {
                    Err(Error::new(
                        ErrorKind::Internal,
                        format!("loopback task: {e}"),
                    ))
                }),
                Ok(None) => Err(Error::new(
                    ErrorKind::Runtime,
                    "the container has no process (it may have exited already)",
                )),
                Err(e) => Err(e),
            }
        };
        if let Err(e) = result {
            let note =
                format!("moat: MOAT_URL_* cannot be reached from inside this container: {e}\n");
            tracing::warn!("{}", note.trim_end());
            let _ = self.built.notes.0.try_send(note);
        }
    }

    fn gateway(&self) -> Result<std::net::IpAddr> {
        self.built
            .network
            .as_ref()
            .map(|n| n.gateway)
            .ok_or_else(|| missing("network"))
    }
}

/// Waits (up to `wait`) for `gateway` to be an address of this host: a
/// Podman network's bridge is set up as its first container starts.
async fn gateway_up(gateway: std::net::IpAddr, wait: Duration) -> Result<()> {
    let started = Instant::now();
    loop {
        if std::net::TcpListener::bind((gateway, 0)).is_ok() {
            return Ok(());
        }
        if started.elapsed() >= wait {
            return Err(Error::new(
                ErrorKind::Runtime,
                format!(
                    "the run network's gateway {gateway} did not come up on this host within {} s after the container started, so the run's proxy cannot be reached",
                    wait.as_secs()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A step ran before the one it needs: a bug, said plainly.
fn missing(what: &str) -> Error {
    Error::new(
        ErrorKind::Internal,
        format!("setup step out of order: no {what} yet"),
    )
}

/// A pull that failed, said so that the user knows which image was wanted,
/// what chose it, and how to choose another.
fn unavailable_image(image: &str, source: crate::config::ImageSource, e: Error) -> Error {
    use crate::config::ImageSource;
    let why = match source {
        ImageSource::Image => "chosen by --image or image: in agent.yaml".to_string(),
        ImageSource::Dependencies => "chosen by dependencies: in agent.yaml".to_string(),
        ImageSource::Default => {
            "moat's default image, used because agent.yaml sets neither image: nor dependencies:"
                .to_string()
        }
    };
    Error::new(
        e.kind(),
        format!(
            "cannot get image {image} ({why}): {e}. Is the engine online, and is the name right? Choose another image with --image, image: or dependencies: in agent.yaml, or pull it first (`docker pull {image}`)"
        ),
    )
}
