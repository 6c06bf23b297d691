//! Docker, through bollard: the only module that knows the engine's API.
//! Podman is reached the same way, through its Docker-compatible API socket
//! (`podman system service`); where the two differ, `engine` says which.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;

use bollard::container::LogOutput;
use bollard::models::{
    ContainerConfig, ContainerCreateBody, HostConfig, Ipam, NetworkCreateRequest, NetworkingConfig,
};
use bollard::query_parameters::{
    AttachContainerOptions, CommitContainerOptions, CreateContainerOptions, CreateImageOptions,
    DownloadFromContainerOptions, ListContainersOptions, ListImagesOptions, ListNetworksOptions,
    RemoveContainerOptions, RemoveImageOptions, StopContainerOptions, UploadToContainerOptions,
    WaitContainerOptions,
};
use futures_util::StreamExt;

use super::{
    ContainerInfo, ContainerSpec, ContainerState, Engine, EngineInfo, ImageInfo, NetworkInfo,
    Output, OutputStream, PullProgress, Runtime, HOME_LABEL, RUN_LABEL,
};
use crate::error::{Error, ErrorKind, Result};

/// How long a request that should answer at once may take.
const QUICK: Duration = Duration::from_secs(30);

/// A connection to a Docker engine (or Podman's Docker-compatible API).
#[derive(Clone)]
pub struct Docker {
    client: bollard::Docker,
    host: String,
    engine: Engine,
    /// Podman's API socket, for the answers bollard cannot read from it
    /// (see [`Docker::podman_get`]).
    podman: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Docker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Docker").field("host", &self.host).finish()
    }
}

fn engine_host() -> String {
    std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".to_string())
}

/// Podman's API socket: `CONTAINER_HOST` when it names one (there or not:
/// it was chosen), else the system service's (as root) or the user's;
/// `None` when none is there.
pub fn podman_socket() -> Option<std::path::PathBuf> {
    use std::path::PathBuf;
    if let Some(path) = std::env::var("CONTAINER_HOST")
        .ok()
        .and_then(|h| h.strip_prefix("unix://").map(PathBuf::from))
    {
        return Some(path);
    }
    let mut candidates = Vec::new();
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        candidates.push(PathBuf::from("/run/podman/podman.sock"));
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        candidates.push(PathBuf::from(dir).join("podman").join("podman.sock"));
    }
    candidates.into_iter().find(|p| p.exists())
}

fn unreachable(engine: Engine, host: &str, detail: impl std::fmt::Display) -> Error {
    let start = match engine {
        Engine::Docker => {
            "Start Docker (`sudo systemctl start docker`, or run `dockerd`), or point DOCKER_HOST at a running engine"
        }
        Engine::Podman => {
            "Start Podman's API service (`systemctl --user start podman.socket`, or as root `podman system service --time=0 &`), or point CONTAINER_HOST at its socket"
        }
    };
    Error::new(
        ErrorKind::Runtime,
        format!(
            "cannot reach the {} engine at {host}: {detail}. {start}",
            engine.title()
        ),
    )
}

fn failed(engine: Engine, what: &str, e: bollard::errors::Error) -> Error {
    Error::new(
        ErrorKind::Runtime,
        format!("{engine}: {what}: {}", describe(&e)),
    )
}

fn describe(e: &bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerResponseServerError {
            status_code,
            message,
        } => {
            format!("{message} (HTTP {status_code})")
        }
        other => other.to_string(),
    }
}

fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

async fn quick<T>(
    engine: Engine,
    what: &str,
    fut: impl std::future::Future<Output = std::result::Result<T, bollard::errors::Error>>,
) -> Result<T> {
    match tokio::time::timeout(QUICK, fut).await {
        Ok(r) => r.map_err(|e| failed(engine, what, e)),
        Err(_) => Err(no_answer(engine, what, QUICK)),
    }
}

fn no_answer(engine: Engine, what: &str, limit: Duration) -> Error {
    Error::new(
        ErrorKind::Runtime,
        format!("{engine}: {what}: no answer within {} s", limit.as_secs()),
    )
}

/// Like [`quick`] within `limit`, but an answer with a status in `fine`
/// (404 for an object that is not there, and what else a call allows) is
/// `None`, not an error.
async fn quick_or_none<T>(
    engine: Engine,
    what: &str,
    limit: Duration,
    fine: &[u16],
    fut: impl std::future::Future<Output = std::result::Result<T, bollard::errors::Error>>,
) -> Result<Option<T>> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(Some(v)),
        Ok(Err(bollard::errors::Error::DockerResponseServerError { status_code, .. }))
            if fine.contains(&status_code) =>
        {
            Ok(None)
        }
        Ok(Err(e)) => Err(failed(engine, what, e)),
        Err(_) => Err(no_answer(engine, what, limit)),
    }
}

impl Docker {
    /// Connects to the Docker engine named by `DOCKER_HOST` (default: the
    /// local socket).
    pub async fn connect() -> Result<Docker> {
        Docker::connect_to(Engine::Docker).await
    }

    /// Connects to `engine` and agrees on an API version: Docker at
    /// `DOCKER_HOST` (default: the local socket), Podman at its API socket
    /// ([`podman_socket`]). Fails with a message saying what to start when
    /// no engine answers.
    pub async fn connect_to(engine: Engine) -> Result<Docker> {
        let mut podman = None;
        let (host, client) = match engine {
            Engine::Docker => (engine_host(), bollard::Docker::connect_with_defaults()),
            Engine::Podman => {
                let Some(socket) = podman_socket() else {
                    return Err(unreachable(
                        engine,
                        "its API socket",
                        "no socket at /run/podman/podman.sock, $XDG_RUNTIME_DIR/podman/podman.sock or CONTAINER_HOST",
                    ));
                };
                let path = socket.to_string_lossy().into_owned();
                podman = Some(socket);
                (
                    format!("unix://{path}"),
                    bollard::Docker::connect_with_unix(&path, 120, bollard::API_DEFAULT_VERSION),
                )
            }
        };
        let client = client
            .map_err(|e| unreachable(engine, &host, describe(&e)))?
            // Waits and log streams last as long as the container; requests
            // that should be quick carry their own timeout (`quick`).
            .with_timeout(Duration::from_secs(u32::MAX as u64));
        let client =
            match tokio::time::timeout(Duration::from_secs(10), client.negotiate_version()).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(unreachable(engine, &host, describe(&e))),
                Err(_) => return Err(unreachable(engine, &host, "no answer within 10 s")),
            };
        Ok(Docker {
            client,
            host,
            engine,
            podman,
        })
    }

    /// A container's inspection as the engine's JSON (Docker's and
    /// Podman's agree on the fields moat reads), `None` when there is no
    /// such container.
    async fn inspect_container(&self, id: &str) -> Result<Option<serde_json::Value>> {
        if let Some(socket) = &self.podman {
            let path = format!("/containers/{}/json", urlencode(id));
            return self
                .podman_get(socket, "inspecting the container", &path)
                .await;
        }
        let inspect = self.client.inspect_container(
            id,
            None::<bollard::query_parameters::InspectContainerOptions>,
        );
        let found = quick_or_none(
            self.engine,
            "inspecting the container",
            QUICK,
            &[404],
            inspect,
        )
        .await?;
        found
            .map(|c| {
                serde_json::to_value(c).map_err(|e| {
                    Error::new(
                        ErrorKind::Internal,
                        format!("{}: reading the container's inspection: {e}", self.engine),
                    )
                })
            })
            .transpose()
    }

    /// `GET path` on Podman's API, as JSON; `None` for a 404. Podman
    /// reports container states Docker's API has no name for (`stopped`),
    /// which bollard's typed answers refuse, so inspecting and listing
    /// containers read the JSON themselves there.
    async fn podman_get(
        &self,
        socket: &std::path::Path,
        what: &str,
        path: &str,
    ) -> Result<Option<serde_json::Value>> {
        use http_body_util::BodyExt;
        let fail = |detail: String| {
            Error::new(
                ErrorKind::Runtime,
                format!("{}: {what}: {detail}", self.engine),
            )
        };
        let exchange = async {
            let stream = tokio::net::UnixStream::connect(socket)
                .await
                .map_err(|e| fail(format!("cannot connect to {}: {e}", socket.display())))?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .map_err(|e| fail(e.to_string()))?;
            tokio::spawn(conn);
            let request = http::Request::get(format!("/v1.41{path}"))
                .header(http::header::HOST, "podman")
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .map_err(|e| fail(e.to_string()))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| fail(e.to_string()))?;
            let status = response.status();
            let body = http_body_util::Limited::new(response.into_body(), 64 << 20)
                .collect()
                .await
                .map_err(|e| fail(e.to_string()))?
                .to_bytes();
            if status == http::StatusCode::NOT_FOUND {
                return Ok(None);
            }
            if !status.is_success() {
                return Err(fail(format!(
                    "{} (HTTP {})",
                    String::from_utf8_lossy(&body).trim(),
                    status.as_u16()
                )));
            }
            serde_json::from_slice(&body)
                .map(Some)
                .map_err(|e| fail(format!("not JSON: {e}")))
        };
        match tokio::time::timeout(QUICK, exchange).await {
            Ok(result) => result,
            Err(_) => Err(no_answer(self.engine, what, QUICK)),
        }
    }
}

/// A container's state from the engine's JSON (`State.Running`,
/// `State.ExitCode`).
fn state_of(inspect: &serde_json::Value) -> ContainerState {
    let running = inspect["State"]["Running"].as_bool().unwrap_or(false);
    ContainerState {
        running,
        exit_code: if running {
            None
        } else {
            inspect["State"]["ExitCode"].as_i64()
        },
    }
}

/// A tmpfs's mount options, owned by the container's user (`uid:gid`):
/// Docker takes the owner as `uid=,gid=`; Podman refuses those and takes
/// `U` (chown to the container's user) instead.
fn tmpfs_options(engine: Engine, tmpfs: &crate::runtime::Tmpfs, user: &str) -> String {
    let mode = format!("mode={:04o}", tmpfs.mode);
    match (engine, user.split_once(':')) {
        (Engine::Podman, _) => format!("rw,exec,{mode},U"),
        (Engine::Docker, Some((uid, gid))) => format!("rw,exec,uid={uid},gid={gid},{mode}"),
        (Engine::Docker, None) => format!("rw,exec,uid={user},{mode}"),
    }
}

#[async_trait::async_trait]
impl Runtime for Docker {
    fn engine(&self) -> Engine {
        self.engine
    }

    async fn ping(&self) -> Result<EngineInfo> {
        let info = tokio::time::timeout(Duration::from_secs(10), self.client.info())
            .await
            .map_err(|_| unreachable(self.engine, &self.host, "no answer within 10 s"))?
            .map_err(|e| unreachable(self.engine, &self.host, describe(&e)))?;
        Ok(EngineInfo {
            version: info.server_version.unwrap_or_default(),
            host: self.host.clone(),
            rootless: info
                .security_options
                .unwrap_or_default()
                .iter()
                .any(|o| o.split(',').any(|kv| kv == "name=rootless")),
        })
    }

    async fn image_id(&self, image: &str) -> Result<Option<String>> {
        let found = quick_or_none(
            self.engine,
            &format!("inspecting image {image}"),
            QUICK,
            &[404],
            self.client.inspect_image(image),
        )
        .await?;
        Ok(found.map(|i| i.id.unwrap_or_default()))
    }

    async fn pull_image(
        &self,
        image: &str,
        progress: &(dyn for<'p> Fn(&'p PullProgress) + Send + Sync),
    ) -> Result<()> {
        let (repo, tag) = split_tag(image);
        let options = CreateImageOptions {
            from_image: Some(repo.to_string()),
            tag: Some(tag.to_string()),
            ..Default::default()
        };
        let mut stream = self.client.create_image(Some(options), None, None);
        let mut layers: BTreeMap<String, (u64, u64, bool)> = BTreeMap::new();
        let mut state = PullProgress::default();
        while let Some(item) = stream.next().await {
            let info = item.map_err(|e| {
                Error::new(
                    ErrorKind::Runtime,
                    format!("cannot pull image {image}: {}", describe(&e)),
                )
            })?;
            if let Some(err) = info.error {
                return Err(Error::new(
                    ErrorKind::Runtime,
                    format!("cannot pull image {image}: {err}"),
                ));
            }
            let status = info.status.unwrap_or_default();
            if let Some(id) = info.id.filter(|id| id.len() == 12) {
                let entry = layers.entry(id).or_default();
                if let Some(d) = info.progress_detail {
                    if status.starts_with("Downloading") {
                        entry.0 = d.current.unwrap_or(0).max(0) as u64;
                        entry.1 = d.total.unwrap_or(0).max(0) as u64;
                    }
                }
                if status.starts_with("Pull complete") || status.starts_with("Already exists") {
                    entry.2 = true;
                    entry.0 = entry.1;
                }
            }
            state.layers = layers.len();
            state.layers_done = layers.values().filter(|l| l.2).count();
            state.bytes = layers.values().map(|l| l.0).sum();
            state.total = layers.values().map(|l| l.1).sum();
            state.status = status;
            progress(&state);
        }
        Ok(())
    }

    async fn create_network(
        &self,
        name: &str,
        bridge: &str,
        internal: bool,
        labels: &BTreeMap<String, String>,
    ) -> Result<NetworkInfo> {
        let mut options = HashMap::from([(
            "com.docker.network.bridge.name".to_string(),
            bridge.to_string(),
        )]);
        let podman = self.engine == Engine::Podman;
        if !podman {
            // Containers on a run's network reach nothing of another
            // container on it but what the run owns; there is one.
            options.insert(
                "com.docker.network.bridge.enable_icc".to_string(),
                "true".to_string(),
            );
        }
        let request = NetworkCreateRequest {
            name: name.to_string(),
            driver: Some("bridge".into()),
            // A Podman network that is internal has no gateway on the host
            // (so no proxy for the run): strict mode is then the host
            // firewall's alone, which it is on Docker too (see
            // `run::firewall`).
            internal: Some(internal && !podman),
            enable_ipv6: Some(false),
            options: Some(options),
            ipam: Some(Ipam {
                driver: Some("default".into()),
                ..Default::default()
            }),
            labels: Some(labels.clone().into_iter().collect()),
            ..Default::default()
        };
        let created = quick(
            self.engine,
            "creating a network",
            self.client.create_network(request),
        )
        .await?;
        let inspect = quick(
            self.engine,
            "inspecting a network",
            self.client.inspect_network(
                &created.id,
                None::<bollard::query_parameters::InspectNetworkOptions>,
            ),
        )
        .await?;
        let config = inspect
            .ipam
            .and_then(|i| i.config)
            .and_then(|c| c.into_iter().next())
            .unwrap_or_default();
        let gateway = config
            .gateway
            .as_deref()
            .and_then(|g| g.parse().ok())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Runtime,
                    format!("docker: network {name} has no IPv4 gateway"),
                )
            })?;
        Ok(NetworkInfo {
            id: created.id,
            name: name.to_string(),
            gateway,
            subnet: config.subnet.unwrap_or_default(),
            bridge: bridge.to_string(),
            up: !podman,
            internal: internal && !podman,
        })
    }

    async fn remove_network(&self, name: &str) -> Result<()> {
        quick_or_none(
            self.engine,
            &format!("removing network {name}"),
            QUICK,
            &[404],
            self.client.remove_network(name),
        )
        .await
        .map(|_| ())
    }

    async fn networks_with_label(&self, label: &str) -> Result<Vec<(String, String)>> {
        let options = ListNetworksOptions {
            filters: Some(label_filter(label)),
        };
        let list = quick(
            self.engine,
            "listing networks",
            self.client.list_networks(Some(options)),
        )
        .await?;
        Ok(list
            .into_iter()
            .map(|n| (n.name.unwrap_or_default(), run_label(n.labels.as_ref())))
            .collect())
    }

    async fn create_container(&self, spec: &ContainerSpec) -> Result<String> {
        let binds = spec
            .binds
            .iter()
            .map(|b| {
                format!(
                    "{}:{}:{}",
                    b.source,
                    b.target,
                    if b.read_only { "ro" } else { "rw" }
                )
            })
            .collect();
        let host = HostConfig {
            binds: Some(binds),
            network_mode: Some(spec.network.clone()),
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            cap_drop: (!spec.build).then(|| vec!["ALL".into()]),
            init: Some(true),
            dns: (!spec.dns.is_empty()).then(|| spec.dns.clone()),
            extra_hosts: (!spec.hosts.is_empty()).then(|| {
                spec.hosts
                    .iter()
                    .map(|(name, ip)| format!("{name}:{ip}"))
                    .collect()
            }),
            tmpfs: (!spec.tmpfs.is_empty()).then(|| {
                spec.tmpfs
                    .iter()
                    .map(|t| (t.path.clone(), tmpfs_options(self.engine, t, &spec.user)))
                    .collect()
            }),
            sysctls: Some(HashMap::from([
                (
                    "net.ipv6.conf.all.disable_ipv6".to_string(),
                    "1".to_string(),
                ),
                // `ping` without privileges, as Docker allows by default and
                // Podman does not: the same container on either engine.
                (
                    "net.ipv4.ping_group_range".to_string(),
                    "0 2147483647".to_string(),
                ),
            ])),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: spec.command.clone(),
            env: Some(spec.env.clone()),
            user: Some(spec.user.clone()),
            working_dir: Some(spec.workdir.clone()),
            labels: Some(spec.labels.clone().into_iter().collect()),
            hostname: Some(spec.hostname.clone()),
            tty: Some(spec.tty),
            open_stdin: Some(spec.tty),
            attach_stdin: Some(spec.tty),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            host_config: Some(host),
            networking_config: Some(NetworkingConfig::default()),
            ..Default::default()
        };
        let options = CreateContainerOptions {
            name: (!spec.name.is_empty()).then(|| spec.name.clone()),
            ..Default::default()
        };
        let created = quick(
            self.engine,
            "creating the container",
            self.client.create_container(Some(options), body),
        )
        .await?;
        Ok(created.id)
    }

    async fn read_file(&self, id: &str, path: &str) -> Result<Option<Vec<u8>>> {
        let options = DownloadFromContainerOptions {
            path: path.to_string(),
        };
        let too_large = || {
            Error::new(
                ErrorKind::Runtime,
                format!(
                    "{}: the image's {path} is larger than {} MiB, which moat does not read (it reads the file to give the run's user an entry): is the image the one you meant?",
                    self.engine,
                    super::READ_FILE_LIMIT >> 20
                ),
            )
        };
        let mut stream = self.client.download_from_container(id, Some(options));
        let mut tar_bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(c) => {
                    // The file and its archive's headers (a few KiB).
                    if (tar_bytes.len() + c.len()) as u64 > super::READ_FILE_LIMIT + (64 << 10) {
                        return Err(too_large());
                    }
                    tar_bytes.extend_from_slice(&c);
                }
                Err(e) if is_not_found(&e) => return Ok(None),
                Err(e) => return Err(failed(self.engine, &format!("reading {path}"), e)),
            }
        }
        let mut archive = tar::Archive::new(tar_bytes.as_slice());
        let entries = archive
            .entries()
            .map_err(|e| Error::new(ErrorKind::Runtime, format!("docker: reading {path}: {e}")))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| {
                Error::new(ErrorKind::Runtime, format!("docker: reading {path}: {e}"))
            })?;
            if entry.header().entry_type().is_file() {
                let mut out = Vec::new();
                std::io::Read::read_to_end(
                    &mut std::io::Read::take(&mut entry, super::READ_FILE_LIMIT + 1),
                    &mut out,
                )
                .map_err(|e| {
                    Error::new(ErrorKind::Runtime, format!("docker: reading {path}: {e}"))
                })?;
                if out.len() as u64 > super::READ_FILE_LIMIT {
                    return Err(too_large());
                }
                return Ok(Some(out));
            }
        }
        Ok(None)
    }

    async fn put_file(&self, id: &str, target: &str, source: &Path, mode: u32) -> Result<()> {
        let what = format!("copying {} into the container", source.display());
        let file = tokio::fs::File::open(source)
            .await
            .map_err(|e| Error::io(source, "open", e))?;
        let size = file
            .metadata()
            .await
            .map_err(|e| Error::io(source, "read", e))?
            .len();
        let mut header = tar::Header::new_gnu();
        header
            .set_path(target.trim_start_matches('/'))
            .map_err(|e| Error::new(ErrorKind::InvalidArgument, format!("{target}: {e}")))?;
        header.set_size(size);
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        let pad = (512 - (size % 512) as usize) % 512;
        let head = futures_util::stream::once(async move {
            Ok::<_, std::io::Error>(Bytes::copy_from_slice(header.as_bytes()))
        });
        let body = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20);
        let tail = futures_util::stream::once(async move {
            Ok::<_, std::io::Error>(Bytes::from(vec![0u8; pad + 1024]))
        });
        let stream = head.chain(body).chain(tail);
        let options = UploadToContainerOptions {
            path: "/".to_string(),
            ..Default::default()
        };
        let fut =
            self.client
                .upload_to_container(id, Some(options), bollard::body_try_stream(stream));
        match tokio::time::timeout(Duration::from_secs(600), fut).await {
            Ok(r) => r.map_err(|e| failed(self.engine, &what, e)),
            Err(_) => Err(no_answer(self.engine, &what, Duration::from_secs(600))),
        }?;
        Ok(())
    }

    async fn get_archive(&self, id: &str, path: &str) -> Result<Option<super::ArchiveStream>> {
        let options = DownloadFromContainerOptions {
            path: path.to_string(),
        };
        let mut stream = self.client.download_from_container(id, Some(options));
        let what = format!("reading {path}");
        // The engine answers at once: 404 for a path that is not there.
        let first = match tokio::time::timeout(QUICK, stream.next()).await {
            Err(_) => return Err(no_answer(self.engine, &what, QUICK)),
            Ok(None) => None,
            Ok(Some(Err(e))) if is_not_found(&e) => return Ok(None),
            Ok(Some(Err(e))) => return Err(failed(self.engine, &what, e)),
            Ok(Some(Ok(chunk))) => Some(chunk),
        };
        let engine = self.engine;
        let rest = stream.map(move |c| c.map_err(|e| failed(engine, &what, e)));
        Ok(Some(Box::pin(
            futures_util::stream::iter(first.map(Ok)).chain(rest),
        )))
    }

    async fn put_archive(&self, id: &str, dir: &str, archive: super::ArchiveStream) -> Result<()> {
        let what = format!("copying into {dir} in the container");
        let body = archive.map(|r| r.map_err(|e| std::io::Error::other(e.to_string())));
        let options = UploadToContainerOptions {
            path: dir.to_string(),
            ..Default::default()
        };
        let fut =
            self.client
                .upload_to_container(id, Some(options), bollard::body_try_stream(body));
        let limit = Duration::from_secs(1800);
        match tokio::time::timeout(limit, fut).await {
            Ok(r) => r.map_err(|e| failed(self.engine, &what, e)),
            Err(_) => Err(no_answer(self.engine, &what, limit)),
        }
    }

    async fn commit(
        &self,
        id: &str,
        tag: &str,
        cmd: &[String],
        labels: &BTreeMap<String, String>,
    ) -> Result<String> {
        let (repo, version) = tag.rsplit_once(':').unwrap_or((tag, "latest"));
        // As Dockerfile instructions (`changes`), which Docker and Podman
        // both apply (Podman ignores a config body). The container's own
        // run labels would be kept by both: they are emptied, so that no
        // container of this image is taken for a run's.
        let quote = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
        let mut changes: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("LABEL {}={}", quote(k), quote(v)))
            .collect();
        // One label a line, empty as `key=`: Podman's parser reads
        // neither several pairs nor `""` as Docker's does.
        changes.push(format!("LABEL {RUN_LABEL}="));
        changes.push(format!("LABEL {HOME_LABEL}="));
        changes.push(format!(
            "CMD {}",
            serde_json::to_string(cmd).unwrap_or_else(|_| "[]".into())
        ));
        let options = CommitContainerOptions {
            container: Some(id.to_string()),
            repo: Some(repo.to_string()),
            tag: Some(version.to_string()),
            pause: false,
            changes: Some(changes.join("\n")),
            ..Default::default()
        };
        let config = ContainerConfig::default();
        let what = format!("committing the image {tag}");
        let fut = self.client.commit_container(options, config);
        let made = match tokio::time::timeout(Duration::from_secs(600), fut).await {
            Ok(r) => r.map_err(|e| failed(self.engine, &what, e)),
            Err(_) => Err(no_answer(self.engine, &what, Duration::from_secs(600))),
        }?;
        Ok(made.id)
    }

    async fn attach_output(&self, id: &str) -> Result<OutputStream> {
        let options = AttachContainerOptions {
            stream: true,
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        let attached = quick(
            self.engine,
            "attaching to the container",
            self.client.attach_container(id, Some(options)),
        )
        .await?;
        Ok(output_stream(attached.output, false, self.engine))
    }

    async fn attach_tty(&self, id: &str) -> Result<(OutputStream, super::InputSink)> {
        let options = AttachContainerOptions {
            stream: true,
            logs: true,
            stdin: true,
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        let attached = quick(
            self.engine,
            "attaching to the container",
            self.client.attach_container(id, Some(options)),
        )
        .await?;
        Ok((
            output_stream(attached.output, true, self.engine),
            attached.input,
        ))
    }

    async fn resize_tty(&self, id: &str, rows: u16, cols: u16) -> Result<()> {
        let options = bollard::query_parameters::ResizeContainerTTYOptions {
            h: i32::from(rows),
            w: i32::from(cols),
        };
        quick(
            self.engine,
            "resizing the TTY",
            self.client.resize_container_tty(id, options),
        )
        .await
    }

    async fn start(&self, id: &str) -> Result<()> {
        quick(
            self.engine,
            "starting the container",
            self.client
                .start_container(id, None::<bollard::query_parameters::StartContainerOptions>),
        )
        .await
    }

    async fn wait(&self, id: &str) -> Result<i64> {
        let options = WaitContainerOptions {
            condition: "not-running".to_string(),
        };
        let mut stream = self.client.wait_container(id, Some(options));
        match stream.next().await {
            Some(Ok(r)) => Ok(r.status_code),
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => Ok(code),
            Some(Err(e)) => Err(failed(self.engine, "waiting for the container", e)),
            None => Err(Error::new(
                ErrorKind::Runtime,
                "docker: waiting for the container: the engine closed the stream",
            )),
        }
    }

    async fn stop(&self, id: &str, grace_secs: u32) -> Result<()> {
        let options = StopContainerOptions {
            t: Some(grace_secs as i32),
            ..Default::default()
        };
        let fut = self.client.stop_container(id, Some(options));
        // 404: no such container; 304: already stopped.
        let limit = QUICK + Duration::from_secs(u64::from(grace_secs));
        quick_or_none(
            self.engine,
            "stopping the container",
            limit,
            &[404, 304],
            fut,
        )
        .await
        .map(|_| ())
    }

    async fn remove(&self, id: &str) -> Result<()> {
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        // 404: no such container; 409: its removal is already under way.
        let fut = self.client.remove_container(id, Some(options));
        quick_or_none(
            self.engine,
            "removing the container",
            QUICK,
            &[404, 409],
            fut,
        )
        .await
        .map(|_| ())
    }

    async fn container_pid(&self, id: &str) -> Result<Option<u32>> {
        Ok(self.inspect_container(id).await?.and_then(|c| {
            c["State"]["Pid"]
                .as_u64()
                .and_then(|p| u32::try_from(p).ok())
                .filter(|p| *p > 0)
        }))
    }

    async fn container_ip(&self, id: &str, network: &str) -> Result<Option<std::net::IpAddr>> {
        Ok(self.inspect_container(id).await?.and_then(|c| {
            c["NetworkSettings"]["Networks"][network]["IPAddress"]
                .as_str()
                .and_then(|ip| ip.parse().ok())
        }))
    }

    async fn state(&self, id: &str) -> Result<Option<ContainerState>> {
        Ok(self.inspect_container(id).await?.as_ref().map(state_of))
    }

    async fn containers_with_label(&self, label: &str) -> Result<Vec<(String, String)>> {
        if let Some(socket) = &self.podman {
            let filters = serde_json::json!({ "label": [label] }).to_string();
            let path = format!("/containers/json?all=true&filters={}", urlencode(&filters));
            let list = self
                .podman_get(socket, "listing containers", &path)
                .await?
                .unwrap_or_default();
            return Ok(list
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    (
                        c["Id"].as_str().unwrap_or_default().to_string(),
                        c["Labels"][RUN_LABEL]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    )
                })
                .collect());
        }
        let options = ListContainersOptions {
            all: true,
            filters: Some(label_filter(label)),
            ..Default::default()
        };
        let list = quick(
            self.engine,
            "listing containers",
            self.client.list_containers(Some(options)),
        )
        .await?;
        Ok(list
            .into_iter()
            .map(|c| (c.id.unwrap_or_default(), run_label(c.labels.as_ref())))
            .collect())
    }

    async fn list_containers(&self, label: Option<&str>) -> Result<Vec<ContainerInfo>> {
        if let Some(socket) = &self.podman {
            let mut path = "/containers/json?all=true".to_string();
            if let Some(label) = label {
                let filters = serde_json::json!({ "label": [label] }).to_string();
                path.push_str(&format!("&filters={}", urlencode(&filters)));
            }
            let list = self
                .podman_get(socket, "listing containers", &path)
                .await?
                .unwrap_or_default();
            return Ok(list
                .as_array()
                .into_iter()
                .flatten()
                .map(container_of_json)
                .collect());
        }
        let options = ListContainersOptions {
            all: true,
            filters: label.map(label_filter),
            ..Default::default()
        };
        let list = quick(
            self.engine,
            "listing containers",
            self.client.list_containers(Some(options)),
        )
        .await?;
        Ok(list
            .into_iter()
            .map(|c| ContainerInfo {
                id: c.id.unwrap_or_default(),
                name: c
                    .names
                    .and_then(|n| n.into_iter().next())
                    .map(|n| n.trim_start_matches('/').to_string())
                    .unwrap_or_default(),
                image: c.image.unwrap_or_default(),
                image_id: c.image_id.unwrap_or_default(),
                state: c.state.map(|s| s.to_string()).unwrap_or_default(),
                created: c.created.unwrap_or(0),
                labels: c.labels.unwrap_or_default().into_iter().collect(),
            })
            .collect())
    }

    async fn images_with_label(&self, label: &str) -> Result<Vec<ImageInfo>> {
        let filters = serde_json::json!({ "label": [label] }).to_string();
        if let Some(socket) = &self.podman {
            let path = format!("/images/json?filters={}", urlencode(&filters));
            let list = self
                .podman_get(socket, "listing images", &path)
                .await?
                .unwrap_or_default();
            return Ok(list
                .as_array()
                .into_iter()
                .flatten()
                .map(image_of_json)
                .collect());
        }
        let options = ListImagesOptions {
            filters: Some(label_filter(label)),
            ..Default::default()
        };
        let list = quick(
            self.engine,
            "listing images",
            self.client.list_images(Some(options)),
        )
        .await?;
        Ok(list
            .into_iter()
            .map(|i| ImageInfo {
                id: i.id,
                tags: i
                    .repo_tags
                    .into_iter()
                    .filter(|t| t != "<none>:<none>")
                    .collect(),
                labels: i.labels.into_iter().collect(),
                created: i.created,
                size: u64::try_from(i.size).unwrap_or(0),
            })
            .collect())
    }

    async fn remove_image(&self, image: &str) -> Result<bool> {
        let options = RemoveImageOptions {
            force: false,
            noprune: false,
        };
        let what = format!("removing image {image}");
        let fut = self.client.remove_image(image, Some(options), None);
        match tokio::time::timeout(QUICK, fut).await {
            Ok(Ok(_)) => Ok(true),
            Ok(Err(e)) if is_not_found(&e) => Ok(true),
            // A container (running or not) uses it.
            Ok(Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409, ..
            })) => Ok(false),
            Ok(Err(e)) => Err(failed(self.engine, &what, e)),
            Err(_) => Err(no_answer(self.engine, &what, QUICK)),
        }
    }
}

/// Labels from the engine's JSON (`null` when there are none).
fn labels_of_json(labels: &serde_json::Value) -> BTreeMap<String, String> {
    labels
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect()
}

/// A container from a container list's JSON (Docker's API, as Podman
/// answers it).
fn container_of_json(c: &serde_json::Value) -> ContainerInfo {
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    ContainerInfo {
        id: text(&c["Id"]),
        name: c["Names"][0]
            .as_str()
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string(),
        image: text(&c["Image"]),
        image_id: text(&c["ImageID"]),
        state: text(&c["State"]),
        created: c["Created"].as_i64().unwrap_or(0),
        labels: labels_of_json(&c["Labels"]),
    }
}

/// An image from an image list's JSON.
fn image_of_json(i: &serde_json::Value) -> ImageInfo {
    ImageInfo {
        id: i["Id"].as_str().unwrap_or_default().to_string(),
        tags: i["RepoTags"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_str())
            .filter(|t| *t != "<none>:<none>")
            .map(str::to_string)
            .collect(),
        labels: labels_of_json(&i["Labels"]),
        created: i["Created"].as_i64().unwrap_or(0),
        size: i["Size"].as_u64().unwrap_or(0),
    }
}

/// `text` for a URL's path or query: everything but unreserved characters
/// percent-encoded.
fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The run an object's labels name (empty when none).
fn run_label(labels: Option<&HashMap<String, String>>) -> String {
    labels
        .and_then(|l| l.get(RUN_LABEL))
        .cloned()
        .unwrap_or_default()
}

/// A container's output as moat's stream; with a TTY (`tty`) everything is
/// one stream, shown as stdout.
fn output_stream(
    output: std::pin::Pin<
        Box<
            dyn futures_util::Stream<Item = std::result::Result<LogOutput, bollard::errors::Error>>
                + Send,
        >,
    >,
    tty: bool,
    engine: Engine,
) -> OutputStream {
    Box::pin(output.filter_map(move |item| async move {
        match item {
            Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                Some(Ok(Output::Stdout(message)))
            }
            Ok(LogOutput::StdErr { message }) if tty => Some(Ok(Output::Stdout(message))),
            Ok(LogOutput::StdErr { message }) => Some(Ok(Output::Stderr(message))),
            Ok(LogOutput::StdIn { .. }) => None,
            Err(e) => Some(Err(failed(engine, "reading container output", e))),
        }
    }))
}

/// `repo[:tag]` (a digest stays with the repo); the tag defaults to `latest`.
/// The engine's list filter for objects carrying `label` (`key` or
/// `key=value`).
fn label_filter(label: &str) -> HashMap<String, Vec<String>> {
    HashMap::from([("label".to_string(), vec![label.to_string()])])
}

fn split_tag(image: &str) -> (&str, &str) {
    if image.contains('@') {
        return (image, "");
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.rfind(':') {
        Some(i) => {
            let at = image.len() - last.len() + i;
            (&image[..at], &image[at + 1..])
        }
        None => (image, "latest"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn podman_states_docker_has_no_name_for_are_read() {
        // Podman says "stopped"; the state still reads.
        let inspect = serde_json::json!({
            "State": {"Status": "stopped", "Running": false, "ExitCode": 3}
        });
        assert_eq!(
            state_of(&inspect),
            ContainerState {
                running: false,
                exit_code: Some(3)
            }
        );
        let running =
            serde_json::json!({"State": {"Status": "running", "Running": true, "ExitCode": 0}});
        assert_eq!(
            state_of(&running),
            ContainerState {
                running: true,
                exit_code: None
            }
        );
        assert_eq!(
            urlencode(r#"{"label":["dev.moat.run=x"]}"#),
            "%7B%22label%22%3A%5B%22dev.moat.run%3Dx%22%5D%7D"
        );
    }

    #[test]
    fn image_tags_split_like_docker() {
        assert_eq!(split_tag("ubuntu:22.04"), ("ubuntu", "22.04"));
        assert_eq!(split_tag("ubuntu"), ("ubuntu", "latest"));
        assert_eq!(
            split_tag("127.0.0.1:5000/x/y"),
            ("127.0.0.1:5000/x/y", "latest")
        );
        assert_eq!(
            split_tag("127.0.0.1:5000/x/y:2"),
            ("127.0.0.1:5000/x/y", "2")
        );
        assert_eq!(split_tag("a@sha256:00"), ("a@sha256:00", ""));
    }
}
