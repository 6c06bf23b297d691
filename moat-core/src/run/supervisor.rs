//! The supervisor: the process that owns one run from setup to cleanup.
//! See the module docs of [`crate::run`] for why it is a process of its own.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;

use super::logs::{LogWriter, Stream, DEFAULT_LIMIT};
use super::{firewall, now, run_dir, update_meta, Event, Handoff, RunMeta, RunSpec, RunState};
use crate::audit::AuditWriter;
use crate::error::{Error, ErrorKind, Result};
use crate::policy::{HostPattern, PolicyMode};
use crate::proxy::{ClientSpec, Proxy, ProxyBuilder};
use crate::runtime::{
    Bind, ContainerSpec, Docker, Output, PullProgress, Runtime, HOME_LABEL, RUN_LABEL,
};
use crate::trace::{TraceRecord, TraceSink};

/// Where the moat CA bundle is put inside a container.
pub const CA_BUNDLE_PATH: &str = "/etc/moat/ca-bundle.pem";

/// The AWS `credential_process` helper inside a container.
const AWS_HELPER_PATH: &str = "/etc/moat/aws-credentials";
/// The AWS config file inside a container (`AWS_CONFIG_FILE`).
const AWS_CONFIG_PATH: &str = "/etc/moat/aws-config";
/// Where the run's filtering SSH agent socket appears inside a container.
const SSH_AGENT_DIR: &str = "/run/moat/ssh";
/// The SSH client configuration for granted hosts, inside a container
/// (Debian's and Ubuntu's `/etc/ssh/ssh_config` include this directory).
const SSH_CONFIG_PATH: &str = "/etc/ssh/ssh_config.d/moat.conf";
/// The granted hosts' keys, inside a container.
const SSH_KNOWN_HOSTS_PATH: &str = "/etc/moat/ssh_known_hosts";
/// Fetches the run's role credentials from its proxy, with whatever HTTP
/// client the image has; the proxy variables carry the run's token.
const AWS_HELPER: &str = r#"#!/bin/sh
# moat: this run's AWS role credentials, from the run's proxy (credential_process).
url=http://moat.internal/aws/credentials
if command -v curl >/dev/null 2>&1; then exec curl -sSf "$url"; fi
if command -v wget >/dev/null 2>&1; then exec wget -qO- "$url"; fi
for py in python3 python; do
  if command -v "$py" >/dev/null 2>&1; then
    exec "$py" -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())' "$url"
  fi
done
echo "moat: this image has no curl, wget or python to fetch AWS credentials from $url" >&2
exit 1
"#;

/// Runs the supervisor: reads the run's handoff from standard input, reports
/// progress and readiness on standard output, and runs the run to its end.
/// Returns the process exit status (0 when the run was set up and
/// supervised, 1 when setup failed).
pub fn supervise() -> i32 {
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line).is_err() {
        eprintln_safe("moat supervisor: no handoff on standard input");
        return 2;
    }
    let handoff: Handoff = match serde_json::from_str(&line) {
        Ok(h) => h,
        Err(e) => {
            eprintln_safe(&format!("moat supervisor: bad handoff: {e}"));
            return 2;
        }
    };
    match crate::blocking::block_on(supervise_async(handoff)) {
        Ok(Ok(code)) => code,
        Ok(Err(e)) | Err(e) => {
            eprintln_safe(&format!("moat supervisor: {e}"));
            2
        }
    }
}

fn eprintln_safe(message: &str) {
    let _ = writeln!(std::io::stderr(), "{message}");
}

fn emit(event: &Event) {
    if let Ok(mut line) = serde_json::to_vec(event) {
        line.push(b'\n');
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&line).and_then(|()| out.flush());
    }
}

/// `network.jsonl`: one trace record per line.
struct JsonlTrace {
    file: Mutex<std::fs::File>,
}

impl TraceSink for JsonlTrace {
    fn record(&self, record: &TraceRecord) {
        if let (Ok(mut line), Ok(mut file)) = (serde_json::to_vec(record), self.file.lock()) {
            line.push(b'\n');
            let _ = file.write_all(&line);
        }
    }
}

/// What setup created, for cleanup on failure and at the end.
#[derive(Default)]
struct Held {
    network: Option<String>,
    container: Option<String>,
    firewall: bool,
    proxy: Option<Proxy>,
    /// Stops the SSH agent and forwarders.
    ssh: Option<tokio_util::sync::CancellationToken>,
    routes: bool,
}

struct Ctx {
    home: PathBuf,
    id: String,
    dir: PathBuf,
    spec: RunSpec,
    name: String,
    launcher: Vec<String>,
    audit: Arc<AuditWriter>,
    phases: BTreeMap<String, f64>,
}

impl Ctx {
    fn audit(&self, kind: &str, data: serde_json::Value) {
        if let Err(e) = self.audit.append(kind, data) {
            eprintln_safe(&format!("moat supervisor: audit log: {e}"));
        }
    }

    fn phase(&mut self, name: &str, since: Instant) {
        self.phases
            .insert(name.to_string(), since.elapsed().as_secs_f64() * 1000.0);
    }
}

async fn supervise_async(handoff: Handoff) -> Result<i32> {
    let dir = run_dir(&handoff.home, &handoff.id);
    let pid = std::process::id();
    let start = super::process_start_time(pid).unwrap_or(0);
    let meta = update_meta(&dir, |m| m.supervisor = Some((pid, start)))?;
    let audit = match AuditWriter::open(&dir, &handoff.home, &handoff.id) {
        Ok(a) => Arc::new(a),
        Err(e) => {
            fail(&dir, &e);
            emit(&error_event(&e));
            return Ok(1);
        }
    };
    let mut ctx = Ctx {
        home: handoff.home,
        id: handoff.id,
        dir,
        spec: handoff.spec,
        name: meta.name.clone(),
        launcher: handoff.launcher,
        audit,
        phases: BTreeMap::new(),
    };
    ctx.audit(
        "run_created",
        json!({
            "run": ctx.id, "name": meta.name, "image": ctx.spec.image,
            "workspace": ctx.spec.workspace, "command": ctx.spec.command,
            "policy": ctx.spec.policy, "allow": ctx.spec.allow,
        }),
    );
    let mut held = Held::default();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::new(ErrorKind::Internal, format!("signal handler: {e}")))?;
    let setup = tokio::select! {
        r = setup(&mut ctx, &meta, &mut held) => r,
        _ = term.recv() => Err(Error::new(ErrorKind::Runtime, "the run was stopped while it was being set up")),
    };
    let (docker, log_task) = match setup {
        Ok(v) => v,
        Err(e) => {
            ctx.audit(
                "run_failed",
                json!({ "run": ctx.id, "error": e.to_string() }),
            );
            let cleanup_error = release(&ctx, &mut held).await;
            let _ = ctx.audit.close();
            fail(&ctx.dir, &e);
            let _ = update_meta(&ctx.dir, |m| m.cleaned = cleanup_error.is_none());
            emit(&error_event(&e));
            return Ok(1);
        }
    };
    emit(&Event::Ready);
    // From here on the starter may be gone: nothing more goes to stdout.

    let wait_container = docker.clone();
    let id_for_wait = held.container.clone().unwrap_or_default();
    let mut waiting = tokio::spawn(async move { wait_container.wait(&id_for_wait).await });
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
    let exit = loop {
        tokio::select! {
            r = &mut waiting => break r.map_err(|e| Error::new(ErrorKind::Internal, format!("wait task: {e}"))).and_then(|r| r),
            _ = term.recv() => {
                if let Some(c) = &held.container {
                    let _ = docker.stop(c, 10).await;
                }
            }
            _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => {}
            _ = async { match int.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => {}
        }
    };
    // Output still in flight ends with the container's streams.
    let _ = tokio::time::timeout(Duration::from_secs(5), log_task).await;
    let (state, exit_code, error) = match exit {
        Ok(code) => (RunState::Stopped, Some(code), None),
        Err(e) => (RunState::Failed, None, Some(e.to_string())),
    };
    ctx.audit(
        "run_stopped",
        json!({ "run": ctx.id, "exit_code": exit_code, "error": error }),
    );
    if let Some(proxy) = held.proxy.take() {
        proxy.shutdown().await;
    }
    if let Some(ssh) = held.ssh.take() {
        ssh.cancel();
    }
    if let Err(e) = ctx.audit.close() {
        eprintln_safe(&format!("moat supervisor: closing the audit log: {e}"));
    }
    // The exit code is known and every artifact final: callers may go on
    // while the container, rules and network are removed (`cleaned` says
    // when that is done; `stop`, `destroy` and `clean` wait for it).
    let recorded = update_meta(&ctx.dir, |m| {
        m.state = state;
        m.exit_code = exit_code;
        m.stopped_at = Some(now());
        m.error = error.clone();
    });
    // Cleanup happens even when run.json cannot be written (a full disk).
    let t = Instant::now();
    let cleanup_error = release(&ctx, &mut held).await;
    ctx.phase("cleanup", t);
    let phases = ctx.phases.clone();
    // When cleanup failed, `cleaned` stays false: the next command that
    // looks at the run (after this process exits) tries again.
    update_meta(&ctx.dir, |m| {
        m.cleaned = cleanup_error.is_none();
        m.phases = phases.clone();
        if m.error.is_none() {
            m.error = cleanup_error
                .clone()
                .map(|e| format!("cleaning up failed: {e}"));
        }
    })?;
    recorded?;
    Ok(0)
}

fn error_event(e: &Error) -> Event {
    Event::Error {
        kind: e.kind().as_str().to_string(),
        message: e.to_string(),
    }
}

fn fail(dir: &Path, e: &Error) {
    let message = e.to_string();
    let _ = update_meta(dir, |m| {
        m.state = RunState::Failed;
        m.error = Some(message.clone());
        m.stopped_at = Some(now());
    });
}

/// Removes what setup created. Returns the first error, as text. The
/// firewall rules go only once the container is known to be gone: a
/// container that may still run keeps them.
async fn release(ctx: &Ctx, held: &mut Held) -> Option<String> {
    let mut first: Option<String> = None;
    if let Some(proxy) = held.proxy.take() {
        proxy.shutdown().await;
    }
    if let Some(ssh) = held.ssh.take() {
        ssh.cancel();
        let _ = std::fs::remove_file(ctx.dir.join("ssh").join("agent.sock"));
    }
    if held.routes {
        let (home, name, id) = (ctx.home.clone(), ctx.name.clone(), ctx.id.clone());
        let released =
            tokio::task::spawn_blocking(move || super::release_routes(&home, &name, &id)).await;
        match released {
            Ok(Ok(())) => held.routes = false,
            Ok(Err(e)) => {
                first.get_or_insert(e.to_string());
            }
            Err(e) => {
                first.get_or_insert(e.to_string());
            }
        }
    }
    let mut container_gone = held.container.is_none();
    if held.container.is_some() || held.network.is_some() {
        match Docker::connect().await {
            Ok(docker) => {
                if let Some(c) = held.container.clone() {
                    let removed = match docker.remove(&c).await {
                        Ok(()) => docker.state(&c).await.map(|s| s.is_none()),
                        Err(e) => Err(e),
                    };
                    match removed {
                        Ok(true) => {
                            held.container = None;
                            container_gone = true;
                        }
                        Ok(false) => {
                            first.get_or_insert(format!("container {c} is still there"));
                        }
                        Err(e) => {
                            first.get_or_insert(e.to_string());
                        }
                    }
                }
                if container_gone {
                    if let Some(n) = held.network.take() {
                        if let Err(e) = docker.remove_network(&n).await {
                            first.get_or_insert(e.to_string());
                        }
                    }
                }
            }
            Err(e) => {
                first.get_or_insert(e.to_string());
            }
        }
    }
    if held.firewall && container_gone {
        match firewall::remove(&ctx.id) {
            Ok(()) => held.firewall = false,
            Err(e) => {
                first.get_or_insert(e.to_string());
            }
        }
    }
    first
}

type Started = (Docker, tokio::task::JoinHandle<()>);

async fn setup(ctx: &mut Ctx, meta: &RunMeta, held: &mut Held) -> Result<Started> {
    let spec = ctx.spec.clone();
    let policy: PolicyMode = spec.policy_mode()?;
    let strict = policy == PolicyMode::Strict;
    if strict {
        firewall::check()?;
    }
    let allow = spec
        .allow
        .iter()
        .map(|a| {
            HostPattern::parse(a)
                .map_err(|e| Error::new(ErrorKind::Config, format!("network.allow: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;

    // Grants and secrets, on the host.
    let mut binding = crate::credential::bind(&ctx.home, &spec.grants, &ctx.id)?;
    let ssh_grants = std::mem::take(&mut binding.ssh);
    ctx.audit(
        "grants_bound",
        json!({ "run": ctx.id, "grants": binding.hosts.iter().map(|(g, h)| json!({"grant": g, "hosts": h})).collect::<Vec<_>>() }),
    );
    let mut secret_env = Vec::new();
    let mut secret_audit = Vec::new();
    for (name, reference) in &spec.secrets {
        let r = crate::config::SecretRef::parse(reference)
            .map_err(|e| Error::new(ErrorKind::Config, format!("secret {name}: {e}")))?;
        let value = crate::secrets::resolve_one(name, &r)?;
        secret_audit.push(json!({ "name": name, "backend": r.backend.name() }));
        secret_env.push(format!("{name}={}", value.expose()));
    }
    if !secret_audit.is_empty() {
        ctx.audit(
            "secrets_resolved",
            json!({ "run": ctx.id, "secrets": secret_audit }),
        );
    }

    // The engine and the image.
    let t = Instant::now();
    let docker = Docker::connect().await?;
    docker.ping().await?;
    let mut image_id = docker.image_id(&spec.image).await?;
    if image_id.is_none() {
        emit(&Event::Progress {
            message: format!("Pulling image {}", spec.image),
        });
        let last = Mutex::new(Instant::now() - Duration::from_secs(1));
        let image = spec.image.clone();
        let report = move |p: &PullProgress| {
            let Ok(mut last) = last.lock() else { return };
            if last.elapsed() < Duration::from_millis(200) {
                return;
            }
            *last = Instant::now();
            emit(&Event::Progress {
                message: format!(
                    "Pulling image {image}: {}/{} layers, {:.1}/{:.1} MB",
                    p.layers_done,
                    p.layers,
                    p.bytes as f64 / 1e6,
                    p.total as f64 / 1e6
                ),
            });
        };
        docker.pull_image(&spec.image, &report).await?;
        image_id = docker.image_id(&spec.image).await?;
    }
    let image_id = image_id.unwrap_or_default();
    ctx.phase("image", t);

    // The network: the run's own; internal (no route out) when strict.
    let t = Instant::now();
    let hex = ctx.id.trim_start_matches("run_").to_string();
    let home_label = ctx.home.to_string_lossy().into_owned();
    let labels = BTreeMap::from([
        (RUN_LABEL.to_string(), ctx.id.clone()),
        (HOME_LABEL.to_string(), home_label.clone()),
    ]);
    let network_name = format!("moat-{}", ctx.id);
    let network = docker
        .create_network(&network_name, &format!("mt-{hex}"), strict, &labels)
        .await?;
    held.network = Some(network.name.clone());
    update_meta(&ctx.dir, |m| m.network = Some(network.name.clone()))?;
    ctx.phase("network", t);

    // The proxy, on the host's address on that network only.
    let t = Instant::now();
    let proxy = ProxyBuilder::from_env()?
        .home(&ctx.home)
        .listen(SocketAddr::new(network.gateway, 0))
        .start()
        .await?;
    let trace_path = ctx.dir.join("network.jsonl");
    let trace_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&trace_path)
        .map_err(|e| Error::io(&trace_path, "open", e))?;
    let trace: Arc<dyn TraceSink> = Arc::new(JsonlTrace {
        file: Mutex::new(trace_file),
    });
    let client = proxy.register(ClientSpec {
        name: ctx.id.clone(),
        credentials: binding.credentials,
        policy,
        allow,
        trace: Some(trace.clone()),
        audit: Some(ctx.audit.clone()),
        capture_bodies: 0,
        aws: binding.aws,
    })?;
    let proxy_addr = proxy.local_addr();
    let proxy_url = client.proxy_url(proxy_addr);
    let ca_pem = proxy.ca().cert_pem().to_string();
    let overrides = proxy.overrides();
    held.proxy = Some(proxy);
    ctx.phase("proxy", t);

    // SSH grants: the filtering agent, and a forwarder per granted host on
    // the same address as the proxy. The agent's notes (why it refused to
    // sign) go to the run's output.
    let (notes, mut notes_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let ssh_hosts = if ssh_grants.is_empty() {
        Vec::new()
    } else {
        let t = Instant::now();
        let hosts = start_ssh(
            ctx,
            held,
            ssh_grants,
            network.gateway,
            overrides,
            trace,
            notes,
        )
        .await?;
        ctx.phase("ssh", t);
        hosts
    };
    let mut ports = vec![proxy_addr.port()];
    ports.extend(ssh_hosts.iter().map(|(_, port)| *port));

    let t = Instant::now();
    if strict {
        firewall::install(&ctx.id, &network.bridge, network.gateway, &ports)?;
        held.firewall = true;
    }
    // Where the host firewall can be changed, only this run's network and
    // the host reach the proxy (in strict mode this must hold).
    let guarded = if strict || firewall::check().is_ok() {
        firewall::guard(&ctx.id, &network.bridge, network.gateway, &ports)?;
        held.firewall = true;
        true
    } else {
        false
    };
    ctx.phase("firewall", t);

    // Hostname routing: the router (started now if none runs) gives each
    // endpoint its URL, which the agent sees as MOAT_URL_<ENDPOINT>.
    let mut urls = BTreeMap::new();
    if !spec.ports.is_empty() {
        let t = Instant::now();
        let port = match crate::routing::daemon::status(&ctx.home) {
            Some(s) => s.port,
            None => crate::routing::daemon::default_port()?,
        };
        let command = super::router_command(&ctx.launcher);
        let home = ctx.home.clone();
        let state = tokio::task::spawn_blocking(move || {
            crate::routing::daemon::ensure(&home, &command, port, false)
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, format!("router task: {e}")))??;
        for endpoint in spec.ports.keys() {
            urls.insert(
                endpoint.clone(),
                format!("https://{endpoint}.{}.localhost:{}", ctx.name, state.port),
            );
        }
        held.routes = true;
        ctx.phase("router", t);
    }

    // The container.
    let t = Instant::now();
    let (uid, gid, warning) = agent_user(&spec.workspace);
    if let Some(w) = warning {
        emit(&Event::Progress { message: w });
    }
    let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    env.extend(secret_env);
    env.extend(binding.env.iter().map(|(k, v)| format!("{k}={v}")));
    env.extend(
        crate::proxy::proxy_env(proxy_url.expose(), CA_BUNDLE_PATH)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}")),
    );
    if !ssh_hosts.is_empty() {
        env.push(format!("SSH_AUTH_SOCK={SSH_AGENT_DIR}/agent.sock"));
    }
    if binding.aws_region.is_some() {
        env.push(format!("AWS_CONFIG_FILE={AWS_CONFIG_PATH}"));
        env.push("AWS_SDK_LOAD_CONFIG=1".into());
    }
    for (endpoint, url) in &urls {
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
    if !urls.is_empty() {
        let names: Vec<&str> = urls.keys().map(String::as_str).collect();
        env.push(format!("MOAT_ENDPOINTS={}", names.join(",")));
    }
    env.push(format!("MOAT_RUN_ID={}", ctx.id));
    env.push(format!("MOAT_RUN_NAME={}", meta.name));
    // git must fail rather than prompt for a password nobody can type.
    env.push("GIT_TERMINAL_PROMPT=0".into());
    let mut binds = vec![Bind {
        source: spec.workspace.to_string_lossy().into_owned(),
        target: "/workspace".into(),
        read_only: false,
    }];
    // The agent's user entry and the CA bundle are files of the run,
    // mounted read-only: no write into the image, no step as root.
    let t_files = Instant::now();
    let users = image_users(&docker, &ctx.home, &spec.image, &image_id).await?;
    let (mut files, tmpfs) = container_files(&users, uid, gid, &ca_pem);
    if let Some(region) = &binding.aws_region {
        // AWS SDKs and the CLI get the run's role credentials from the
        // proxy through `credential_process`; the host's keys stay on the
        // host.
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
    if !ssh_hosts.is_empty() {
        let (config, known_hosts) = ssh_files(&ssh_hosts, network.gateway);
        files.push((SSH_CONFIG_PATH.to_string(), config.into_bytes(), 0o644));
        files.push((
            SSH_KNOWN_HOSTS_PATH.to_string(),
            known_hosts.into_bytes(),
            0o644,
        ));
        binds.push(Bind {
            source: ctx.dir.join("ssh").to_string_lossy().into_owned(),
            target: SSH_AGENT_DIR.into(),
            read_only: true,
        });
    }
    let files_dir = ctx.dir.join("container");
    crate::paths::private_dir(&files_dir)?;
    for (target, content, mode) in &files {
        let name = target.rsplit('/').next().unwrap_or("file");
        let path = files_dir.join(name);
        std::fs::write(&path, content).map_err(|e| Error::io(&path, "write", e))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))
                .map_err(|e| Error::io(&path, "set permissions of", e))?;
        }
        binds.push(Bind {
            source: path.to_string_lossy().into_owned(),
            target: target.clone(),
            read_only: true,
        });
    }
    ctx.phase("files", t_files);
    for (source, target, read_only) in &spec.mounts {
        binds.push(Bind {
            source: source.to_string_lossy().into_owned(),
            target: target.clone(),
            read_only: *read_only,
        });
    }
    let container_spec = ContainerSpec {
        name: format!("moat-{}", ctx.id),
        image: spec.image.clone(),
        command: spec.command.clone(),
        env,
        user: format!("{uid}:{gid}"),
        workdir: "/workspace".into(),
        binds,
        network: network.name.clone(),
        labels: BTreeMap::from([
            (RUN_LABEL.to_string(), ctx.id.clone()),
            (HOME_LABEL.to_string(), home_label),
            ("dev.moat.name".to_string(), meta.name.clone()),
        ]),
        tty: spec.interactive,
        hostname: meta.name.clone(),
        // Strict: the engine's resolver forwards to the proxy's address,
        // where the firewall drops it; names are resolved by the proxy.
        dns: if strict {
            vec![network.gateway.to_string()]
        } else {
            Vec::new()
        },
        tmpfs,
    };
    let container = docker.create_container(&container_spec).await?;
    held.container = Some(container.clone());
    update_meta(&ctx.dir, |m| {
        m.container = Some(container.clone());
        m.proxy = Some(proxy_addr.to_string());
        m.user = Some(format!("{uid}:{gid}"));
    })?;
    ctx.phase("create", t);

    // Output, from before the start so nothing is missed.
    let t = Instant::now();
    let mut output = docker.attach_output(&container).await?;
    ctx.phase("attach", t);
    let logs_path = ctx.dir.join("logs.jsonl");
    let mut writer = LogWriter::open(&logs_path, DEFAULT_LIMIT)?;
    let log_task = tokio::spawn(async move {
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
            if let Err(e) = result {
                eprintln_safe(&format!("moat supervisor: logs: {e}"));
            }
        }
    });
    ctx.audit(
        "container_created",
        json!({
            "run": ctx.id, "container": container, "image": spec.image,
            "user": format!("{uid}:{gid}"), "no_new_privileges": true,
            "cap_drop": ["ALL"], "network": network.name, "internal_network": strict,
            "firewall": strict, "proxy_guard": guarded, "proxy": proxy_addr.to_string(),
            "mounts": container_spec.binds.iter().map(|b| json!({"source": b.source, "target": b.target, "read_only": b.read_only})).collect::<Vec<_>>(),
        }),
    );
    let t = Instant::now();
    docker.start(&container).await?;
    ctx.phase("start", t);
    // A command that already exited has no address: nothing to route.
    let ip = if spec.ports.is_empty() {
        None
    } else {
        docker.container_ip(&container, &network.name).await?
    };
    if let Some(ip) = ip {
        let endpoints = spec
            .ports
            .iter()
            .map(|(name, port)| {
                (
                    name.clone(),
                    std::net::SocketAddr::new(ip, *port).to_string(),
                )
            })
            .collect();
        crate::routing::table::register(&ctx.home, &ctx.name, &ctx.id, endpoints)?;
    }
    let phases = ctx.phases.clone();
    update_meta(&ctx.dir, |m| {
        m.state = RunState::Running;
        m.started_at = Some(now());
        m.phases = phases;
        m.urls = urls.clone();
    })?;
    ctx.audit(
        "run_started",
        json!({ "run": ctx.id, "container": container }),
    );
    Ok((docker, log_task))
}

/// Starts the run's filtering SSH agent (its socket in `<run>/ssh/`) and a
/// forwarder per granted host on `gateway`; returns each host's grant and
/// forwarder port.
async fn start_ssh(
    ctx: &Ctx,
    held: &mut Held,
    grants: Vec<crate::ssh_agent::HostGrant>,
    gateway: std::net::IpAddr,
    overrides: Arc<crate::proxy::upstream::ResolveMap>,
    trace: Arc<dyn TraceSink>,
    notes: tokio::sync::mpsc::UnboundedSender<String>,
) -> Result<Vec<(crate::ssh_agent::HostGrant, u16)>> {
    use crate::ssh_agent::{FilterAgent, Forward};
    let names: Vec<String> = grants.iter().map(|g| format!("ssh:{}", g.host)).collect();
    let upstream = crate::credential::ssh::agent_socket().ok_or_else(|| {
        Error::new(
            ErrorKind::Config,
            format!(
                "{} need the user's SSH agent, but SSH_AUTH_SOCK is not set; start one with `eval $(ssh-agent)` and add the key with `ssh-add`",
                names.join(", ")
            ),
        )
    })?;
    let audit: Arc<dyn crate::trace::AuditSink> = ctx.audit.clone();
    let agent = Arc::new(
        FilterAgent::new(&ctx.id, grants.clone(), &upstream, Some(audit.clone())).with_notes(
            move |note: &str| {
                let _ = notes.send(note.to_string());
            },
        ),
    );
    let check = agent.clone();
    tokio::task::spawn_blocking(move || check.check_upstream())
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, format!("ssh agent check: {e}")))??;
    let listener = crate::ssh_agent::bind_socket(&ctx.dir.join("ssh"))?;
    let cancel = tokio_util::sync::CancellationToken::new();
    held.ssh = Some(cancel.clone());
    tokio::spawn(agent.serve(listener, cancel.clone()));
    let mut hosts = Vec::new();
    for g in grants {
        let listener = tokio::net::TcpListener::bind((gateway, 0))
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Io,
                    format!("ssh forwarder for {} on {gateway}: {e}", g.host),
                )
            })?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::new(ErrorKind::Io, format!("ssh forwarder: {e}")))?
            .port();
        let to = Forward {
            client: ctx.id.clone(),
            host: g.host.clone(),
            overrides: overrides.clone(),
            trace: Some(trace.clone()),
            audit: Some(audit.clone()),
        };
        tokio::spawn(crate::ssh_agent::forward(listener, to, cancel.clone()));
        hosts.push((g, port));
    }
    Ok(hosts)
}

/// The container's SSH client configuration (each granted host's name sent
/// to its forwarder, its keys from the run's known hosts) and known hosts.
fn ssh_files(
    hosts: &[(crate::ssh_agent::HostGrant, u16)],
    gateway: std::net::IpAddr,
) -> (String, String) {
    let mut config = String::from(
        "# moat: this run's SSH grants. Each granted host is reached through the run's\n\
         # forwarder; the run's agent signs only for these hosts.\n",
    );
    let mut known = String::new();
    for (g, port) in hosts {
        config.push_str(&format!(
            "Host {host}\n    HostName {gateway}\n    Port {port}\n    HostKeyAlias {host}\n    \
             GlobalKnownHostsFile {SSH_KNOWN_HOSTS_PATH}\n    StrictHostKeyChecking yes\n    \
             CheckHostIP no\n    UpdateHostKeys no\n",
            host = g.host
        ));
        for line in &g.host_key_lines {
            known.push_str(&format!("{} {line}\n", g.host));
        }
    }
    (config, known)
}

/// The user the agent runs as: the host user, so files it writes in the
/// workspace are theirs. When moat itself runs as root, the workspace's
/// owner; when that is root too, uid 1000 (never root), with a warning.
fn agent_user(workspace: &Path) -> (u32, u32, Option<String>) {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid/getegid cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if uid != 0 {
        return (uid, gid, None);
    }
    match std::fs::metadata(workspace) {
        Ok(m) if m.uid() != 0 => (m.uid(), m.gid(), None),
        _ => (
            1000,
            1000,
            Some(format!(
                "warning: moat runs as root and {} is owned by root; the agent runs as uid 1000 (never root) and cannot write there unless you chown it",
                workspace.display()
            )),
        ),
    }
}

/// An image's `/etc/passwd` and `/etc/group`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct ImageUsers {
    passwd: String,
    group: String,
}

/// Reads an image's user database, once per image id (images are
/// immutable): from a container created for it and removed at once. Cached
/// under `$MOAT_HOME/cache/images/`.
async fn image_users(
    docker: &Docker,
    home: &Path,
    image: &str,
    image_id: &str,
) -> Result<ImageUsers> {
    let key: String = image_id
        .trim_start_matches("sha256:")
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    let cache = home
        .join("cache")
        .join("images")
        .join(format!("{key}.json"));
    if !key.is_empty() {
        if let Ok(text) = std::fs::read_to_string(&cache) {
            if let Ok(users) = serde_json::from_str(&text) {
                return Ok(users);
            }
        }
    }
    let probe = ContainerSpec {
        name: String::new(),
        image: image.to_string(),
        command: Some(vec!["true".into()]),
        user: "0:0".into(),
        workdir: "/".into(),
        network: "none".into(),
        labels: BTreeMap::from([(RUN_LABEL.to_string(), "probe".to_string())]),
        ..ContainerSpec::default()
    };
    let id = docker.create_container(&probe).await?;
    let read = async {
        let passwd = docker
            .read_file(&id, "/etc/passwd")
            .await?
            .unwrap_or_default();
        let group = docker
            .read_file(&id, "/etc/group")
            .await?
            .unwrap_or_default();
        Ok::<_, Error>(ImageUsers {
            passwd: String::from_utf8_lossy(&passwd).into_owned(),
            group: String::from_utf8_lossy(&group).into_owned(),
        })
    }
    .await;
    let _ = docker.remove(&id).await;
    let users = read?;
    if !key.is_empty() {
        if let Some(dir) = cache.parent() {
            crate::paths::private_dir(dir)?;
        }
        if let Ok(json) = serde_json::to_vec(&users) {
            crate::paths::write_private(&cache, &json, 0o600)?;
        }
    }
    Ok(users)
}

/// A file mounted into the container: its path there, content and mode.
type FileMount = (String, Vec<u8>, u32);

/// The files mounted into the container: a passwd and group with an entry
/// for the agent's uid and gid (when the image has none), and the CA bundle
/// (the moat CA and the host's roots). Also the tmpfs home directory of an
/// agent user the image does not know.
fn container_files(
    users: &ImageUsers,
    uid: u32,
    gid: u32,
    ca_pem: &str,
) -> (Vec<FileMount>, Vec<(String, String)>) {
    let mut files = Vec::new();
    let mut tmpfs = Vec::new();
    let has_uid = users
        .passwd
        .lines()
        .any(|l| l.split(':').nth(2) == Some(uid.to_string().as_str()));
    if !has_uid {
        let mut text = users.passwd.clone();
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!(
            "moat:x:{uid}:{gid}:moat agent:/home/moat:/bin/sh\n"
        ));
        files.push(("/etc/passwd".to_string(), text.into_bytes(), 0o644));
        tmpfs.push((
            "/home/moat".to_string(),
            format!("rw,exec,uid={uid},gid={gid},mode=0755"),
        ));
    }
    let has_gid = users
        .group
        .lines()
        .any(|l| l.split(':').nth(2) == Some(gid.to_string().as_str()));
    if !has_gid {
        let mut text = users.group.clone();
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!("moat:x:{gid}:\n"));
        files.push(("/etc/group".to_string(), text.into_bytes(), 0o644));
    }
    let mut bundle = ca_pem.to_string();
    if !bundle.ends_with('\n') {
        bundle.push('\n');
    }
    bundle.push_str(&host_roots_pem());
    files.push((CA_BUNDLE_PATH.to_string(), bundle.into_bytes(), 0o644));
    (files, tmpfs)
}

/// The host's trusted roots as PEM, so direct TLS (permissive mode) keeps
/// working with the bundle in place of the image's own.
fn host_roots_pem() -> String {
    use base64::Engine as _;
    let certs = rustls_native_certs::load_native_certs();
    let mut out = String::new();
    for cert in certs.certs {
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(chunk));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}
