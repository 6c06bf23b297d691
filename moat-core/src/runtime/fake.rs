//! An engine in memory, for testing what drives a [`Runtime`] (the order of
//! a run's steps, what a failure at each leaves behind) in milliseconds and
//! without Docker. It keeps images, networks and containers as a real engine
//! would, records every call, and fails a chosen call on request. Container
//! features themselves are tested against real engines, never only here.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;

use super::{
    ContainerInfo, ContainerSpec, ContainerState, Engine, EngineInfo, ImageInfo, InputSink,
    NetworkInfo, OutputStream, PullProgress, Runtime, RUN_LABEL,
};
use crate::error::{Error, ErrorKind, Result};

/// A container of the fake engine.
#[derive(Debug, Clone)]
pub struct FakeContainer {
    /// Its name.
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its image, as named when it was created.
    pub image: String,
    /// The network it is on.
    pub network: String,
    /// Its environment (`KEY=value`).
    pub env: Vec<String>,
    /// What is mounted into it.
    pub binds: Vec<super::Bind>,
    /// Running now.
    pub running: bool,
    /// Its exit code, once it exited.
    pub exit_code: Option<i64>,
    /// A build container ([`ContainerSpec::build`]): it runs its command at
    /// once, exiting as [`FakeRuntime::set_build_result`] says.
    pub build: bool,
}

#[derive(Debug, Default)]
struct State {
    images: BTreeMap<String, String>,
    /// Labels of images, by image id.
    image_labels: BTreeMap<String, BTreeMap<String, String>>,
    networks: BTreeMap<String, (NetworkInfo, BTreeMap<String, String>)>,
    containers: BTreeMap<String, FakeContainer>,
    calls: Vec<String>,
    /// Calls that fail, by operation name, with their message.
    failing: BTreeMap<String, String>,
    next: u64,
    /// Says it is rootless.
    rootless: bool,
    /// Its networks' gateways come up only with a container (Podman's).
    late_gateway: bool,
    /// `(image, path)`s that [`Runtime::get_archive`] finds missing.
    missing_paths: Vec<(String, String)>,
    /// How build containers exit, and what they print.
    build_exit: i64,
    build_output: String,
}

/// The fake engine.
#[derive(Debug)]
pub struct FakeRuntime {
    state: Mutex<State>,
    gateway: IpAddr,
    exits: tokio::sync::watch::Sender<u64>,
    listed: Mutex<OnList>,
}

/// What happens once while the networks of a label are being listed: a
/// run starting just then, say.
#[derive(Default)]
struct OnList(Option<(String, Box<dyn FnOnce() + Send>)>);

impl std::fmt::Debug for OnList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "OnList(set)"
        } else {
            "OnList"
        })
    }
}

impl Default for FakeRuntime {
    fn default() -> Self {
        FakeRuntime::new(IpAddr::from([127, 0, 0, 1]))
    }
}

impl FakeRuntime {
    /// An engine whose networks have `gateway` as the host's address.
    pub fn new(gateway: IpAddr) -> FakeRuntime {
        FakeRuntime {
            state: Mutex::default(),
            gateway,
            exits: tokio::sync::watch::channel(0).0,
            listed: Mutex::default(),
        }
    }

    /// Runs `then` once, right after the next listing of the networks
    /// labelled `label` was taken (what the caller gets does not show it).
    pub fn on_network_list(&self, label: &str, then: impl FnOnce() + Send + 'static) {
        if let Ok(mut l) = self.listed.lock() {
            l.0 = Some((label.to_string(), Box::new(then)));
        }
    }

    /// Makes `image` present, with id `id`.
    pub fn add_image(&self, image: &str, id: &str) {
        self.with(|s| {
            s.images.insert(image.to_string(), id.to_string());
        });
    }

    /// Makes `image` present, with id `id` and `labels`.
    pub fn add_labelled_image(&self, image: &str, id: &str, labels: &BTreeMap<String, String>) {
        self.with(|s| {
            s.images.insert(image.to_string(), id.to_string());
            s.image_labels.insert(id.to_string(), labels.clone());
        });
    }

    /// The images present: `(tag, id)`.
    pub fn images(&self) -> Vec<(String, String)> {
        self.with(|s| s.images.clone().into_iter().collect())
    }

    /// Makes every later call of `operation` (`create_network`, `start`,
    /// ...) fail with `message`.
    pub fn fail(&self, operation: &str, message: &str) {
        self.with(|s| {
            s.failing.insert(operation.to_string(), message.to_string());
        });
    }

    /// Says it runs rootless, as a rootless Docker or Podman does.
    pub fn set_rootless(&self) {
        self.with(|s| s.rootless = true);
    }

    /// Makes its networks' gateways come up only with their first
    /// container, as Podman's do (here: never, the gateway being whatever
    /// address the fake was given).
    pub fn set_late_gateway(&self) {
        self.with(|s| s.late_gateway = true);
    }

    /// Makes `path` missing in containers of `image` (every other path is
    /// there, its archive a few bytes).
    pub fn remove_path(&self, image: &str, path: &str) {
        self.with(|s| s.missing_paths.push((image.to_string(), path.to_string())));
    }

    /// Makes build containers exit with `code` as soon as they start,
    /// having printed `output` (default: 0, nothing).
    pub fn set_build_result(&self, code: i64, output: &str) {
        self.with(|s| {
            s.build_exit = code;
            s.build_output = output.to_string();
        });
    }

    /// Every call so far: `operation name-or-id`.
    pub fn calls(&self) -> Vec<String> {
        self.with(|s| s.calls.clone())
    }

    /// The networks that exist.
    pub fn networks(&self) -> Vec<String> {
        self.with(|s| s.networks.keys().cloned().collect())
    }

    /// The containers that exist.
    pub fn containers(&self) -> Vec<FakeContainer> {
        self.with(|s| s.containers.values().cloned().collect())
    }

    /// Makes a running container exit with `code`.
    pub fn exit(&self, id: &str, code: i64) {
        self.with(|s| {
            if let Some(c) = s.containers.get_mut(id) {
                c.running = false;
                c.exit_code = Some(code);
            }
        });
        self.exits.send_modify(|n| *n += 1);
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        match self.state.lock() {
            Ok(mut s) => f(&mut s),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// Records a call; its error when it is set to fail.
    fn call(&self, op: &str, what: &str) -> Result<()> {
        self.with(|s| {
            s.calls.push(format!("{op} {what}"));
            match s.failing.get(op) {
                Some(message) => Err(Error::new(ErrorKind::Runtime, format!("fake: {message}"))),
                None => Ok(()),
            }
        })
    }
}

/// Fake engines: each engine named is a [`FakeRuntime`].
#[derive(Debug, Default)]
pub struct FakeEngines(pub Vec<(Engine, std::sync::Arc<FakeRuntime>)>);

#[async_trait::async_trait]
impl super::Engines for FakeEngines {
    fn present(&self) -> Vec<Engine> {
        self.0.iter().map(|(e, _)| *e).collect()
    }
    async fn connect(&self, engine: Engine) -> Result<std::sync::Arc<dyn Runtime>> {
        match self.0.iter().find(|(e, _)| *e == engine) {
            Some((_, r)) => Ok(r.clone()),
            None => Err(Error::new(
                ErrorKind::Runtime,
                format!("fake: no {engine} engine here"),
            )),
        }
    }
}

fn labelled(labels: &BTreeMap<String, String>, filter: &str) -> bool {
    match filter.split_once('=') {
        Some((k, v)) => labels.get(k).is_some_and(|have| have == v),
        None => labels.contains_key(filter),
    }
}

#[async_trait::async_trait]
impl Runtime for FakeRuntime {
    fn engine(&self) -> Engine {
        Engine::Docker
    }

    async fn ping(&self) -> Result<EngineInfo> {
        self.call("ping", "")?;
        Ok(EngineInfo {
            version: "fake".into(),
            host: "memory".into(),
            rootless: self.with(|s| s.rootless),
        })
    }

    async fn image_id(&self, image: &str) -> Result<Option<String>> {
        self.call("image_id", image)?;
        Ok(self.with(|s| s.images.get(image).cloned()))
    }

    async fn pull_image(
        &self,
        image: &str,
        progress: &(dyn for<'p> Fn(&'p PullProgress) + Send + Sync),
    ) -> Result<()> {
        self.call("pull_image", image)?;
        progress(&PullProgress::default());
        self.add_image(image, &format!("sha256:pulled{}", image.len()));
        Ok(())
    }

    async fn create_network(
        &self,
        name: &str,
        bridge: &str,
        internal: bool,
        labels: &BTreeMap<String, String>,
    ) -> Result<NetworkInfo> {
        self.call("create_network", name)?;
        let info = NetworkInfo {
            id: format!("net-{name}"),
            name: name.to_string(),
            gateway: self.gateway,
            subnet: format!("{}/32", self.gateway),
            bridge: bridge.to_string(),
            up: !self.with(|s| s.late_gateway),
            internal,
        };
        self.with(|s| {
            s.networks
                .insert(name.to_string(), (info.clone(), labels.clone()));
        });
        Ok(info)
    }

    async fn remove_network(&self, name: &str) -> Result<()> {
        self.call("remove_network", name)?;
        self.with(|s| {
            if s.containers.values().any(|c| c.network == name) {
                return Err(Error::new(
                    ErrorKind::Runtime,
                    format!("fake: network {name} has containers"),
                ));
            }
            s.networks.remove(name);
            Ok(())
        })
    }

    async fn networks_with_label(&self, label: &str) -> Result<Vec<(String, String)>> {
        self.call("networks_with_label", label)?;
        let listed = self.with(|s| {
            s.networks
                .iter()
                .filter(|(_, (_, l))| labelled(l, label))
                .map(|(n, (_, l))| (n.clone(), l.get(RUN_LABEL).cloned().unwrap_or_default()))
                .collect()
        });
        let then = self.listed.lock().ok().and_then(|mut l| match &l.0 {
            Some((of, _)) if of == label => l.0.take().map(|(_, then)| then),
            _ => None,
        });
        if let Some(then) = then {
            then();
        }
        Ok(listed)
    }

    async fn create_container(&self, spec: &ContainerSpec) -> Result<String> {
        self.call("create_container", &spec.name)?;
        Ok(self.with(|s| {
            s.next += 1;
            let id = format!("c{:011}", s.next);
            s.containers.insert(
                id.clone(),
                FakeContainer {
                    name: spec.name.clone(),
                    labels: spec.labels.clone(),
                    image: spec.image.clone(),
                    network: spec.network.clone(),
                    env: spec.env.clone(),
                    binds: spec.binds.clone(),
                    running: false,
                    exit_code: None,
                    build: spec.build,
                },
            );
            id
        }))
    }

    async fn read_file(&self, id: &str, path: &str) -> Result<Option<Vec<u8>>> {
        self.call("read_file", &format!("{id} {path}"))?;
        Ok(match path {
            "/etc/passwd" => Some(b"root:x:0:0:root:/root:/bin/sh\n".to_vec()),
            "/etc/group" => Some(b"root:x:0:\n".to_vec()),
            _ => None,
        })
    }

    async fn put_file(
        &self,
        id: &str,
        target: &str,
        source: &std::path::Path,
        _mode: u32,
    ) -> Result<()> {
        self.call("put_file", &format!("{id} {target}"))?;
        std::fs::metadata(source).map_err(|e| Error::io(source, "read", e))?;
        Ok(())
    }

    async fn get_archive(&self, id: &str, path: &str) -> Result<Option<super::ArchiveStream>> {
        self.call("get_archive", &format!("{id} {path}"))?;
        let image = self.with(|s| s.containers.get(id).map(|c| c.image.clone()));
        let Some(image) = image else {
            return Err(Error::new(
                ErrorKind::Runtime,
                format!("fake: no container {id}"),
            ));
        };
        let missing = self.with(|s| {
            s.missing_paths
                .iter()
                .any(|(i, p)| *i == image && p == path)
        });
        if missing {
            return Ok(None);
        }
        let bytes = bytes::Bytes::from(format!("{image}:{path}"));
        Ok(Some(Box::pin(futures_util::stream::iter([Ok(bytes)]))))
    }

    async fn put_archive(&self, id: &str, dir: &str, archive: super::ArchiveStream) -> Result<()> {
        use futures_util::StreamExt;
        self.call("put_archive", &format!("{id} {dir}"))?;
        let mut archive = archive;
        while let Some(chunk) = archive.next().await {
            chunk?;
        }
        Ok(())
    }

    async fn commit(
        &self,
        id: &str,
        tag: &str,
        _cmd: &[String],
        labels: &BTreeMap<String, String>,
    ) -> Result<String> {
        self.call("commit", &format!("{id} {tag}"))?;
        Ok(self.with(|s| {
            s.next += 1;
            let image = format!("sha256:fake{:08}", s.next);
            s.images.insert(tag.to_string(), image.clone());
            s.image_labels.insert(image.clone(), labels.clone());
            image
        }))
    }

    async fn attach_output(&self, id: &str) -> Result<OutputStream> {
        self.call("attach_output", id)?;
        let output = self.with(|s| {
            s.containers
                .get(id)
                .filter(|c| c.build)
                .map(|_| s.build_output.clone())
        });
        Ok(match output.filter(|o| !o.is_empty()) {
            Some(o) => Box::pin(futures_util::stream::iter([Ok(super::Output::Stdout(
                bytes::Bytes::from(o),
            ))])),
            None => Box::pin(futures_util::stream::empty()),
        })
    }

    async fn attach_tty(&self, id: &str) -> Result<(OutputStream, InputSink)> {
        self.call("attach_tty", id)?;
        Ok((
            Box::pin(futures_util::stream::empty()),
            Box::pin(tokio::io::sink()),
        ))
    }

    async fn resize_tty(&self, id: &str, _rows: u16, _cols: u16) -> Result<()> {
        self.call("resize_tty", id)
    }

    async fn start(&self, id: &str) -> Result<()> {
        self.call("start", id)?;
        let exited = self.with(|s| {
            let code = s.build_exit;
            match s.containers.get_mut(id) {
                Some(c) if c.build => {
                    c.exit_code = Some(code);
                    true
                }
                Some(c) => {
                    c.running = true;
                    false
                }
                None => false,
            }
        });
        if exited {
            self.exits.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    async fn wait(&self, id: &str) -> Result<i64> {
        self.call("wait", id)?;
        let mut exits = self.exits.subscribe();
        loop {
            let done = self.with(|s| s.containers.get(id).and_then(|c| c.exit_code));
            if let Some(code) = done {
                return Ok(code);
            }
            if exits.changed().await.is_err() {
                return Err(Error::new(ErrorKind::Runtime, "fake: the engine went away"));
            }
        }
    }

    async fn stop(&self, id: &str, _grace_secs: u32) -> Result<()> {
        self.call("stop", id)?;
        self.exit(id, 143);
        Ok(())
    }

    async fn remove(&self, id: &str) -> Result<()> {
        self.call("remove", id)?;
        self.with(|s| s.containers.remove(id));
        self.exits.send_modify(|n| *n += 1);
        Ok(())
    }

    async fn container_ip(&self, id: &str, _network: &str) -> Result<Option<IpAddr>> {
        self.call("container_ip", id)?;
        Ok(self
            .with(|s| s.containers.get(id).map(|c| c.running))
            .unwrap_or(false)
            .then_some(self.gateway))
    }

    async fn state(&self, id: &str) -> Result<Option<ContainerState>> {
        self.call("state", id)?;
        Ok(self.with(|s| {
            s.containers.get(id).map(|c| ContainerState {
                running: c.running,
                exit_code: c.exit_code,
            })
        }))
    }

    async fn containers_with_label(&self, label: &str) -> Result<Vec<(String, String)>> {
        self.call("containers_with_label", label)?;
        Ok(self.with(|s| {
            s.containers
                .iter()
                .filter(|(_, c)| labelled(&c.labels, label))
                .map(|(id, c)| {
                    (
                        id.clone(),
                        c.labels.get(RUN_LABEL).cloned().unwrap_or_default(),
                    )
                })
                .collect()
        }))
    }

    async fn list_containers(&self, label: Option<&str>) -> Result<Vec<ContainerInfo>> {
        self.call("list_containers", label.unwrap_or(""))?;
        Ok(self.with(|s| {
            s.containers
                .iter()
                .filter(|(_, c)| label.is_none_or(|l| labelled(&c.labels, l)))
                .map(|(id, c)| ContainerInfo {
                    id: id.clone(),
                    name: c.name.clone(),
                    image: c.image.clone(),
                    image_id: s.images.get(&c.image).cloned().unwrap_or_default(),
                    state: if c.running {
                        "running"
                    } else if c.exit_code.is_some() {
                        "exited"
                    } else {
                        "created"
                    }
                    .to_string(),
                    created: 0,
                    labels: c.labels.clone(),
                })
                .collect()
        }))
    }

    async fn images_with_label(&self, label: &str) -> Result<Vec<ImageInfo>> {
        self.call("images_with_label", label)?;
        Ok(self.with(|s| {
            let mut found: BTreeMap<String, ImageInfo> = BTreeMap::new();
            for (tag, id) in &s.images {
                let labels = s.image_labels.get(id).cloned().unwrap_or_default();
                if labelled(&labels, label) {
                    let entry = found.entry(id.clone()).or_insert_with(|| ImageInfo {
                        id: id.clone(),
                        labels,
                        ..ImageInfo::default()
                    });
                    entry.tags.push(tag.clone());
                }
            }
            found.into_values().collect()
        }))
    }

    async fn remove_image(&self, image: &str) -> Result<bool> {
        self.call("remove_image", image)?;
        Ok(self.with(|s| {
            let id = s
                .images
                .get(image)
                .cloned()
                .unwrap_or_else(|| image.to_string());
            let used = s
                .containers
                .values()
                .any(|c| s.images.get(&c.image) == Some(&id) || c.image == id);
            if used {
                return false;
            }
            if s.images.remove(image).is_none() {
                s.images.retain(|_, i| *i != id);
            }
            if !s.images.values().any(|i| *i == id) {
                s.image_labels.remove(&id);
            }
            true
        }))
    }
}
