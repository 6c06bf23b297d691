//! The container runtime: everything moat asks of Docker, behind one trait so
//! that the engine is named in one module ([`docker`]) only.
//!
//! The run machinery ([`crate::run`]) speaks in these types; it never sees a
//! bollard type.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::pin::Pin;

use crate::error::{Error, ErrorKind, Result};

pub mod docker;
pub mod fake;

pub use docker::Docker;

/// Label put on every container and network moat creates, with the run id.
pub const RUN_LABEL: &str = "dev.moat.run";

/// Label with the moat home a run belongs to, so that `moat clean` in one
/// home never touches another home's runs on a shared engine.
pub const HOME_LABEL: &str = "dev.moat.home";

/// Label on every image moat builds (an agent's image, a dependencies
/// image), with the moat home that built it as its value: `moat clean` in
/// that home removes the image once no run of the home names it and no
/// container uses it, and `moat system images` lists it. (Containers of the
/// image inherit the label; it says nothing about them.)
pub const BUILT_LABEL: &str = "dev.moat.built";

/// A container engine moat can run agents on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Docker (or anything speaking its API at `DOCKER_HOST`).
    Docker,
    /// Podman, through its Docker-compatible API socket.
    Podman,
}

impl Engine {
    /// `docker` or `podman`.
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Docker => "docker",
            Engine::Podman => "podman",
        }
    }

    /// `Docker` or `Podman`, for messages.
    pub fn title(self) -> &'static str {
        match self {
            Engine::Docker => "Docker",
            Engine::Podman => "Podman",
        }
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Engine {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Engine, String> {
        match s {
            "docker" => Ok(Engine::Docker),
            "podman" => Ok(Engine::Podman),
            other => Err(format!(
                "\"{other}\" is not a container engine moat runs on (docker or podman)"
            )),
        }
    }
}

/// The engine a run goes on: `engine` when one was chosen (`--runtime`,
/// `runtime:`), else `MOAT_RUNTIME` (the user's default), else the one
/// present: Docker when `DOCKER_HOST` is set or its socket is there, else
/// Podman when its API socket is, else Docker (whose connection error then
/// says what is missing).
pub fn choose(engine: Option<Engine>) -> Result<Engine> {
    let env = std::env::var_os("MOAT_RUNTIME")
        .filter(|v| !v.is_empty())
        .map(|v| v.to_string_lossy().into_owned());
    choose_from(engine, env.as_deref(), &present())
}

/// [`choose`], from what was asked (`--runtime` or `runtime:`, then
/// `MOAT_RUNTIME`) and the engines present: Podman when it is the only
/// one, else Docker.
fn choose_from(engine: Option<Engine>, env: Option<&str>, present: &[Engine]) -> Result<Engine> {
    if let Some(engine) = engine {
        return Ok(engine);
    }
    if let Some(name) = env {
        return name.parse().map_err(|e: String| {
            Error::new(ErrorKind::InvalidArgument, format!("MOAT_RUNTIME: {e}"))
        });
    }
    if present == [Engine::Podman] {
        return Ok(Engine::Podman);
    }
    Ok(Engine::Docker)
}

/// The engines whose API sockets are on this host (each may still fail to
/// answer).
pub fn present() -> Vec<Engine> {
    let mut engines = Vec::new();
    if std::env::var_os("DOCKER_HOST").is_some_and(|h| !h.is_empty())
        || std::path::Path::new("/var/run/docker.sock").exists()
    {
        engines.push(Engine::Docker);
    }
    if docker::podman_socket().is_some_and(|p| p.exists()) {
        engines.push(Engine::Podman);
    }
    engines
}

/// What the engine says about itself.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    /// The engine's version (`20.10.24`).
    pub version: String,
    /// Where it was reached (`unix:///var/run/docker.sock`).
    pub host: String,
    /// Whether it runs rootless (its networks in a user namespace of its
    /// own, with no bridge on the host).
    pub rootless: bool,
}

/// Progress of an image pull.
#[derive(Debug, Clone, Default)]
pub struct PullProgress {
    /// Layers seen so far.
    pub layers: usize,
    /// Layers complete.
    pub layers_done: usize,
    /// Bytes downloaded, over the layers that report it.
    pub bytes: u64,
    /// Total bytes of those layers.
    pub total: u64,
    /// The engine's last status line.
    pub status: String,
}

/// A network created for a run.
#[derive(Debug, Clone)]
pub struct NetworkInfo {
    /// The engine's id.
    pub id: String,
    /// Its name (`moat-<run-id>`).
    pub name: String,
    /// The host's address on it: where the run's proxy listens.
    pub gateway: IpAddr,
    /// The subnet, `a.b.c.d/n`.
    pub subnet: String,
    /// The host-side bridge interface.
    pub bridge: String,
    /// Whether the gateway address is on the host already. A Podman
    /// network's bridge (and its address) appears when its first container
    /// starts; listeners bind before ([`crate::proxy::Listen::BeforeUp`]).
    pub up: bool,
    /// Whether the engine gives it no route out (Docker's `internal`).
    pub internal: bool,
}

/// A bind mount.
#[derive(Debug, Clone)]
pub struct Bind {
    /// Host path.
    pub source: String,
    /// Container path.
    pub target: String,
    /// Mounted read-only.
    pub read_only: bool,
}

/// Everything needed to create a run's container.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    /// The container's name.
    pub name: String,
    /// The image.
    pub image: String,
    /// The command, or the image's default when `None`.
    pub command: Option<Vec<String>>,
    /// `KEY=value` entries.
    pub env: Vec<String>,
    /// `uid:gid`.
    pub user: String,
    /// The working directory.
    pub workdir: String,
    /// Bind mounts.
    pub binds: Vec<Bind>,
    /// The network to join.
    pub network: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Allocate a TTY and keep stdin open.
    pub tty: bool,
    /// The hostname.
    pub hostname: String,
    /// DNS servers for the engine's resolver to forward to (default: the
    /// host's).
    pub dns: Vec<String>,
    /// tmpfs mounts (read-write, executable).
    pub tmpfs: Vec<Tmpfs>,
    /// Extra `/etc/hosts` entries: name → address.
    pub hosts: Vec<(String, IpAddr)>,
    /// A container of an image moat builds, never a run's: it keeps the
    /// engine's default capabilities, which installing Debian packages
    /// needs (dpkg sets owners, apt drops to its own user).
    pub build: bool,
}

/// A tmpfs mount owned by the container's user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tmpfs {
    /// Where, in the container.
    pub path: String,
    /// Its permissions (`0o755`).
    pub mode: u32,
}

/// The state of a container as the engine reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerState {
    /// Running now.
    pub running: bool,
    /// Exit code when it has exited.
    pub exit_code: Option<i64>,
}

/// Output of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Standard output (or the TTY).
    Stdout(bytes::Bytes),
    /// Standard error.
    Stderr(bytes::Bytes),
}

/// An image as the engine lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageInfo {
    /// The engine's id (`sha256:...`).
    pub id: String,
    /// Its tags (`moat-claude:0123...`; Podman's carry `localhost/`).
    pub tags: Vec<String>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// When it was made, in seconds since the Unix epoch.
    pub created: i64,
    /// Its size in bytes.
    pub size: u64,
}

/// A container as the engine lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerInfo {
    /// The engine's id.
    pub id: String,
    /// Its name (without Docker's leading `/`).
    pub name: String,
    /// The image it was created from, as named then.
    pub image: String,
    /// That image's id.
    pub image_id: String,
    /// The engine's word for its state (`created`, `running`, `exited`, ...).
    pub state: String,
    /// When it was created, in seconds since the Unix epoch.
    pub created: i64,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
}

/// Whether two image ids are the same image, with or without `sha256:`.
pub fn same_image_id(a: &str, b: &str) -> bool {
    let bare = |id: &str| id.strip_prefix("sha256:").unwrap_or(id).to_string();
    !a.is_empty() && bare(a) == bare(b)
}

/// A stream of container output.
pub type OutputStream = Pin<Box<dyn futures_util::Stream<Item = Result<Output>> + Send>>;

/// A tar archive streamed out of or into a container.
pub type ArchiveStream = Pin<Box<dyn futures_util::Stream<Item = Result<bytes::Bytes>> + Send>>;

/// Where input for a container's TTY goes.
pub type InputSink = Pin<Box<dyn tokio::io::AsyncWrite + Send>>;

/// The most of a container's file [`Runtime::read_file`] reads (a user
/// database is kilobytes; an image could hold gigabytes that compress to
/// nothing in its registry).
pub const READ_FILE_LIMIT: u64 = 4 << 20;

/// What moat asks of a container engine. Object safe: a run holds an
/// `Arc<dyn Runtime>`, chosen in one place ([`connect`]), so tests can hand
/// in a fake ([`fake::FakeRuntime`]).
#[async_trait::async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// The engine this is.
    fn engine(&self) -> Engine;
    /// Checks that the engine answers.
    async fn ping(&self) -> Result<EngineInfo>;
    /// The image's id when it is present locally.
    async fn image_id(&self, image: &str) -> Result<Option<String>>;
    /// Is the image present locally?
    async fn has_image(&self, image: &str) -> Result<bool> {
        Ok(self.image_id(image).await?.is_some())
    }
    /// Pulls an image, reporting progress.
    async fn pull_image(
        &self,
        image: &str,
        progress: &(dyn for<'p> Fn(&'p PullProgress) + Send + Sync),
    ) -> Result<()>;
    /// Creates a bridge network; `internal` ones have no route out.
    async fn create_network(
        &self,
        name: &str,
        bridge: &str,
        internal: bool,
        labels: &BTreeMap<String, String>,
    ) -> Result<NetworkInfo>;
    /// Removes a network; a missing one is not an error.
    async fn remove_network(&self, name: &str) -> Result<()>;
    /// `(name, run id)` of the networks carrying a label.
    async fn networks_with_label(&self, label: &str) -> Result<Vec<(String, String)>>;
    /// Creates a container (not started); returns its id.
    async fn create_container(&self, spec: &ContainerSpec) -> Result<String>;
    /// Reads a file from a container (created or running); `None` when it
    /// does not exist. A file larger than [`READ_FILE_LIMIT`] is an error
    /// (the image chose its size; it is never read whole).
    async fn read_file(&self, id: &str, path: &str) -> Result<Option<Vec<u8>>>;
    /// Copies the host file `source` into a created container at `target`
    /// (an absolute path; missing directories are made), owned by root
    /// with `mode`. Streams it: the file may be large.
    async fn put_file(&self, id: &str, target: &str, source: &Path, mode: u32) -> Result<()>;
    /// Reads `path` (a file, or a directory with all under it) out of a
    /// container (created or running) as a tar archive whose entries are
    /// named from the path's last component (`/usr/local/go` gives
    /// `go/...`), streamed; `None` when there is no such path.
    async fn get_archive(&self, id: &str, path: &str) -> Result<Option<ArchiveStream>>;
    /// Unpacks a tar archive into a created container under the directory
    /// `dir`, keeping the owners, modes and links in it. Streams it.
    async fn put_archive(&self, id: &str, dir: &str, archive: ArchiveStream) -> Result<()>;
    /// Commits a container's file system as the image `tag` (`repo:tag`),
    /// with `cmd` as its default command and `labels` (the container's run
    /// labels emptied); the image's id. The rest of the container's
    /// configuration (its environment, user, working directory) is the
    /// image's.
    async fn commit(
        &self,
        id: &str,
        tag: &str,
        cmd: &[String],
        labels: &BTreeMap<String, String>,
    ) -> Result<String>;
    /// Attaches to a container's output (before it starts, to miss nothing).
    async fn attach_output(&self, id: &str) -> Result<OutputStream>;
    /// Attaches to a running container's TTY: its output from the start
    /// (replayed) and on, and its input.
    async fn attach_tty(&self, id: &str) -> Result<(OutputStream, InputSink)>;
    /// Sets the size of a container's TTY.
    async fn resize_tty(&self, id: &str, rows: u16, cols: u16) -> Result<()>;
    /// Starts a container.
    async fn start(&self, id: &str) -> Result<()>;
    /// Waits for a container to exit; its exit code.
    async fn wait(&self, id: &str) -> Result<i64>;
    /// Stops a container: SIGTERM, then SIGKILL after `grace_secs`.
    async fn stop(&self, id: &str, grace_secs: u32) -> Result<()>;
    /// Removes a container (forcibly); a missing one is not an error.
    async fn remove(&self, id: &str) -> Result<()>;
    /// A container's address on a network; `None` when it has none.
    async fn container_ip(&self, id: &str, network: &str) -> Result<Option<IpAddr>>;
    /// The host pid of a running container's first process; `None` when it
    /// runs none (or the engine does not say).
    async fn container_pid(&self, _id: &str) -> Result<Option<u32>> {
        Ok(None)
    }
    /// The state of a container; `None` when it does not exist.
    async fn state(&self, id: &str) -> Result<Option<ContainerState>>;
    /// `(id, run id)` of the containers carrying a label.
    async fn containers_with_label(&self, label: &str) -> Result<Vec<(String, String)>>;
    /// Every container (running or not), or those carrying `label`
    /// (`key` or `key=value`).
    async fn list_containers(&self, label: Option<&str>) -> Result<Vec<ContainerInfo>>;
    /// The images carrying `label` (`key` or `key=value`).
    async fn images_with_label(&self, label: &str) -> Result<Vec<ImageInfo>>;
    /// Removes an image (a tag of it, when `image` is a tag), never
    /// forcibly; a missing one is not an error. `false` when the engine
    /// refuses because a container uses it.
    async fn remove_image(&self, image: &str) -> Result<bool>;
}

/// The engines of a host and how to reach each: what everything that
/// follows runs after their start (stop, cleanup, clean, status, the system
/// listings) asks, so that it runs on fake engines in tests.
#[async_trait::async_trait]
pub trait Engines: Send + Sync {
    /// The engines whose API sockets are here (see [`present`]).
    fn present(&self) -> Vec<Engine>;
    /// A connection to `engine` (see [`connect`]).
    async fn connect(&self, engine: Engine) -> Result<std::sync::Arc<dyn Runtime>>;
}

/// This host's engines.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostEngines;

#[async_trait::async_trait]
impl Engines for HostEngines {
    fn present(&self) -> Vec<Engine> {
        present()
    }
    async fn connect(&self, engine: Engine) -> Result<std::sync::Arc<dyn Runtime>> {
        connect(engine).await
    }
}

/// Connects to `engine`: the one place that turns an engine's name into a
/// runtime.
pub async fn connect(engine: Engine) -> Result<std::sync::Arc<dyn Runtime>> {
    Ok(std::sync::Arc::new(
        docker::Docker::connect_to(engine).await?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_is_the_one_asked_for_else_the_only_one_present() {
        use Engine::{Docker, Podman};
        // Asked for (flag or config) wins over everything.
        assert_eq!(
            choose_from(Some(Podman), Some("docker"), &[Docker]).unwrap(),
            Podman
        );
        // Then MOAT_RUNTIME.
        assert_eq!(
            choose_from(None, Some("podman"), &[Docker]).unwrap(),
            Podman
        );
        let bad = choose_from(None, Some("lxc"), &[Docker])
            .unwrap_err()
            .to_string();
        assert!(bad.contains("MOAT_RUNTIME"), "{bad}");
        // Only Podman here: Podman.
        assert_eq!(choose_from(None, None, &[Podman]).unwrap(), Podman);
        // Both, or neither: Docker, the default.
        assert_eq!(choose_from(None, None, &[Docker, Podman]).unwrap(), Docker);
        assert_eq!(choose_from(None, None, &[]).unwrap(), Docker);
    }
}
