//! Docker, through bollard. The only module that knows the engine's API.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::models::{
    ContainerCreateBody, HostConfig, Ipam, NetworkCreateRequest, NetworkingConfig,
};
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptions, CreateImageOptions,
    DownloadFromContainerOptions, ListContainersOptions, ListNetworksOptions,
    RemoveContainerOptions, StopContainerOptions, WaitContainerOptions,
};
use futures_util::StreamExt;

use super::{
    ContainerSpec, ContainerState, EngineInfo, NetworkInfo, Output, OutputStream, PullProgress,
    Runtime, RUN_LABEL,
};
use crate::error::{Error, ErrorKind, Result};

/// How long a request that should answer at once may take.
const QUICK: Duration = Duration::from_secs(30);

/// A connection to a Docker engine.
#[derive(Clone)]
pub struct Docker {
    client: bollard::Docker,
    host: String,
}

impl std::fmt::Debug for Docker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Docker").field("host", &self.host).finish()
    }
}

fn engine_host() -> String {
    std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".to_string())
}

fn unreachable(host: &str, detail: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Runtime,
        format!(
            "cannot reach the Docker engine at {host}: {detail}. Start Docker \
             (`sudo systemctl start docker`, or run `dockerd`), or point DOCKER_HOST at a running engine"
        ),
    )
}

fn failed(what: &str, e: bollard::errors::Error) -> Error {
    Error::new(
        ErrorKind::Runtime,
        format!("docker: {what}: {}", describe(&e)),
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
    what: &str,
    fut: impl std::future::Future<Output = std::result::Result<T, bollard::errors::Error>>,
) -> Result<T> {
    match tokio::time::timeout(QUICK, fut).await {
        Ok(r) => r.map_err(|e| failed(what, e)),
        Err(_) => Err(no_answer(what, QUICK)),
    }
}

fn no_answer(what: &str, limit: Duration) -> Error {
    Error::new(
        ErrorKind::Runtime,
        format!("docker: {what}: no answer within {} s", limit.as_secs()),
    )
}

/// Like [`quick`] within `limit`, but an answer with a status in `fine`
/// (404 for an object that is not there, and what else a call allows) is
/// `None`, not an error.
async fn quick_or_none<T>(
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
        Ok(Err(e)) => Err(failed(what, e)),
        Err(_) => Err(no_answer(what, limit)),
    }
}

impl Docker {
    /// Connects to the engine named by `DOCKER_HOST` (default: the local
    /// socket) and agrees on an API version. Fails with a message saying what
    /// to start when no engine answers.
    pub async fn connect() -> Result<Docker> {
        let host = engine_host();
        let client = bollard::Docker::connect_with_defaults()
            .map_err(|e| unreachable(&host, describe(&e)))?
            // Waits and log streams last as long as the container; requests
            // that should be quick carry their own timeout (`quick`).
            .with_timeout(Duration::from_secs(u32::MAX as u64));
        let client =
            match tokio::time::timeout(Duration::from_secs(10), client.negotiate_version()).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(unreachable(&host, describe(&e))),
                Err(_) => return Err(unreachable(&host, "no answer within 10 s")),
            };
        Ok(Docker { client, host })
    }
}

impl Runtime for Docker {
    async fn ping(&self) -> Result<EngineInfo> {
        let version = tokio::time::timeout(Duration::from_secs(10), self.client.version())
            .await
            .map_err(|_| unreachable(&self.host, "no answer within 10 s"))?
            .map_err(|e| unreachable(&self.host, describe(&e)))?;
        Ok(EngineInfo {
            version: version.version.unwrap_or_default(),
            host: self.host.clone(),
        })
    }

    async fn image_id(&self, image: &str) -> Result<Option<String>> {
        let found = quick_or_none(
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
        progress: &(dyn Fn(&PullProgress) + Send + Sync),
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
        let request = NetworkCreateRequest {
            name: name.to_string(),
            driver: Some("bridge".into()),
            internal: Some(internal),
            enable_ipv6: Some(false),
            options: Some(HashMap::from([
                (
                    "com.docker.network.bridge.name".to_string(),
                    bridge.to_string(),
                ),
                // Containers on a run's network reach nothing of another
                // container on it but what the run owns; there is one.
                (
                    "com.docker.network.bridge.enable_icc".to_string(),
                    "true".to_string(),
                ),
            ])),
            ipam: Some(Ipam {
                driver: Some("default".into()),
                ..Default::default()
            }),
            labels: Some(labels.clone().into_iter().collect()),
            ..Default::default()
        };
        let created = quick("creating a network", self.client.create_network(request)).await?;
        let inspect = quick(
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
        })
    }

    async fn remove_network(&self, name: &str) -> Result<()> {
        quick_or_none(
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
            filters: Some(HashMap::from([(
                "label".to_string(),
                vec![label.to_string()],
            )])),
        };
        let list = quick("listing networks", self.client.list_networks(Some(options))).await?;
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
            cap_drop: Some(vec!["ALL".into()]),
            init: Some(true),
            dns: (!spec.dns.is_empty()).then(|| spec.dns.clone()),
            tmpfs: (!spec.tmpfs.is_empty()).then(|| spec.tmpfs.iter().cloned().collect()),
            sysctls: Some(HashMap::from([(
                "net.ipv6.conf.all.disable_ipv6".to_string(),
                "1".to_string(),
            )])),
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
        let mut stream = self.client.download_from_container(id, Some(options));
        let mut tar_bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(c) => tar_bytes.extend_from_slice(&c),
                Err(e) if is_not_found(&e) => return Ok(None),
                Err(e) => return Err(failed(&format!("reading {path}"), e)),
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
                std::io::Read::read_to_end(&mut entry, &mut out).map_err(|e| {
                    Error::new(ErrorKind::Runtime, format!("docker: reading {path}: {e}"))
                })?;
                return Ok(Some(out));
            }
        }
        Ok(None)
    }

    async fn attach_output(&self, id: &str) -> Result<OutputStream> {
        let options = AttachContainerOptions {
            stream: true,
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        let attached = quick(
            "attaching to the container",
            self.client.attach_container(id, Some(options)),
        )
        .await?;
        Ok(output_stream(attached.output, false))
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
            "attaching to the container",
            self.client.attach_container(id, Some(options)),
        )
        .await?;
        Ok((output_stream(attached.output, true), attached.input))
    }

    async fn resize_tty(&self, id: &str, rows: u16, cols: u16) -> Result<()> {
        let options = bollard::query_parameters::ResizeContainerTTYOptions {
            h: i32::from(rows),
            w: i32::from(cols),
        };
        quick(
            "resizing the TTY",
            self.client.resize_container_tty(id, options),
        )
        .await
    }

    async fn start(&self, id: &str) -> Result<()> {
        quick(
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
            Some(Err(e)) => Err(failed("waiting for the container", e)),
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
        quick_or_none("stopping the container", limit, &[404, 304], fut)
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
        quick_or_none("removing the container", QUICK, &[404, 409], fut)
            .await
            .map(|_| ())
    }

    async fn container_ip(&self, id: &str, network: &str) -> Result<Option<std::net::IpAddr>> {
        let c = quick(
            "inspecting the container",
            self.client.inspect_container(
                id,
                None::<bollard::query_parameters::InspectContainerOptions>,
            ),
        )
        .await?;
        Ok(c.network_settings
            .and_then(|n| n.networks)
            .and_then(|mut n| n.remove(network))
            .and_then(|e| e.ip_address)
            .and_then(|ip| ip.parse().ok()))
    }

    async fn state(&self, id: &str) -> Result<Option<ContainerState>> {
        let inspect = self.client.inspect_container(
            id,
            None::<bollard::query_parameters::InspectContainerOptions>,
        );
        let found = quick_or_none("inspecting the container", QUICK, &[404], inspect).await?;
        Ok(found.map(|c| {
            let state = c.state.unwrap_or_default();
            let running = state.running.unwrap_or(false);
            ContainerState {
                running,
                exit_code: if running { None } else { state.exit_code },
            }
        }))
    }

    async fn containers_with_label(&self, label: &str) -> Result<Vec<(String, String)>> {
        let options = ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([(
                "label".to_string(),
                vec![label.to_string()],
            )])),
            ..Default::default()
        };
        let list = quick(
            "listing containers",
            self.client.list_containers(Some(options)),
        )
        .await?;
        Ok(list
            .into_iter()
            .map(|c| (c.id.unwrap_or_default(), run_label(c.labels.as_ref())))
            .collect())
    }
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
) -> OutputStream {
    Box::pin(output.filter_map(move |item| async move {
        match item {
            Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                Some(Ok(Output::Stdout(message)))
            }
            Ok(LogOutput::StdErr { message }) if tty => Some(Ok(Output::Stdout(message))),
            Ok(LogOutput::StdErr { message }) => Some(Ok(Output::Stderr(message))),
            Ok(LogOutput::StdIn { .. }) => None,
            Err(e) => Some(Err(failed("reading container output", e))),
        }
    }))
}

/// `repo[:tag]` (a digest stays with the repo); the tag defaults to `latest`.
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
