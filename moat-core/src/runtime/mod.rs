//! The container runtime: everything moat asks of Docker, behind one trait so
//! that the engine is named in one module ([`docker`]) only.
//!
//! The run machinery ([`crate::run`]) speaks in these types; it never sees a
//! bollard type.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;

use crate::error::Result;

pub mod docker;

pub use docker::Docker;

/// Label put on every container and network moat creates, with the run id.
pub const RUN_LABEL: &str = "dev.moat.run";

/// Label with the moat home a run belongs to, so that `moat clean` in one
/// home never touches another home's runs on a shared engine.
pub const HOME_LABEL: &str = "dev.moat.home";

/// What the engine says about itself.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    /// The engine's version (`20.10.24`).
    pub version: String,
    /// Where it was reached (`unix:///var/run/docker.sock`).
    pub host: String,
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
    /// tmpfs mounts: container path → mount options.
    pub tmpfs: Vec<(String, String)>,
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

/// A stream of container output.
pub type OutputStream = Pin<Box<dyn futures_util::Stream<Item = Result<Output>> + Send>>;

/// Where input for a container's TTY goes.
pub type InputSink = Pin<Box<dyn tokio::io::AsyncWrite + Send>>;

/// What moat asks of a container engine.
pub trait Runtime: Send + Sync + 'static {
    /// Checks that the engine answers.
    fn ping(&self) -> impl Future<Output = Result<EngineInfo>> + Send;
    /// The image's id when it is present locally.
    fn image_id(&self, image: &str) -> impl Future<Output = Result<Option<String>>> + Send;
    /// Is the image present locally?
    fn has_image(&self, image: &str) -> impl Future<Output = Result<bool>> + Send {
        async move { Ok(self.image_id(image).await?.is_some()) }
    }
    /// Pulls an image, reporting progress.
    fn pull_image(
        &self,
        image: &str,
        progress: &(dyn Fn(&PullProgress) + Send + Sync),
    ) -> impl Future<Output = Result<()>> + Send;
    /// Creates a bridge network; `internal` ones have no route out.
    fn create_network(
        &self,
        name: &str,
        bridge: &str,
        internal: bool,
        labels: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<NetworkInfo>> + Send;
    /// Removes a network; a missing one is not an error.
    fn remove_network(&self, name: &str) -> impl Future<Output = Result<()>> + Send;
    /// Names of the networks carrying a label.
    fn networks_with_label(
        &self,
        label: &str,
    ) -> impl Future<Output = Result<Vec<(String, String)>>> + Send;
    /// Creates a container (not started); returns its id.
    fn create_container(&self, spec: &ContainerSpec)
        -> impl Future<Output = Result<String>> + Send;
    /// Reads a file from a container (created or running); `None` when it
    /// does not exist.
    fn read_file(
        &self,
        id: &str,
        path: &str,
    ) -> impl Future<Output = Result<Option<Vec<u8>>>> + Send;
    /// Attaches to a container's output (before it starts, to miss nothing).
    fn attach_output(&self, id: &str) -> impl Future<Output = Result<OutputStream>> + Send;
    /// Attaches to a running container's TTY: its output from the start
    /// (replayed) and on, and its input.
    fn attach_tty(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<(OutputStream, InputSink)>> + Send;
    /// Sets the size of a container's TTY.
    fn resize_tty(&self, id: &str, rows: u16, cols: u16)
        -> impl Future<Output = Result<()>> + Send;
    /// Starts a container.
    fn start(&self, id: &str) -> impl Future<Output = Result<()>> + Send;
    /// Waits for a container to exit; its exit code.
    fn wait(&self, id: &str) -> impl Future<Output = Result<i64>> + Send;
    /// Stops a container: SIGTERM, then SIGKILL after `grace_secs`.
    fn stop(&self, id: &str, grace_secs: u32) -> impl Future<Output = Result<()>> + Send;
    /// Removes a container (forcibly); a missing one is not an error.
    fn remove(&self, id: &str) -> impl Future<Output = Result<()>> + Send;
    /// A container's address on a network; `None` when it has none.
    fn container_ip(
        &self,
        id: &str,
        network: &str,
    ) -> impl Future<Output = Result<Option<IpAddr>>> + Send;
    /// The state of a container; `None` when it does not exist.
    fn state(&self, id: &str) -> impl Future<Output = Result<Option<ContainerState>>> + Send;
    /// `(id, run id)` of the containers carrying a label.
    fn containers_with_label(
        &self,
        label: &str,
    ) -> impl Future<Output = Result<Vec<(String, String)>>> + Send;
}
