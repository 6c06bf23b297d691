//! A recipe made on an engine: the images pulled, a container of the base
//! image, each further runtime copied in from a container of its image,
//! a script that installs the tools and checks that every dependency runs,
//! and the container committed as the recipe's tag. Every error names the
//! dependency at fault.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::{Recipe, RuntimeCopy, REGISTRY_ENV};
use crate::error::{Error, ErrorKind, Result};
use crate::runtime::{
    ArchiveStream, ContainerSpec, Output, PullProgress, Runtime, BUILT_LABEL, HOME_LABEL,
};

/// How long the build script may take (apt-get over a slow mirror).
const SCRIPT_LIMIT: Duration = Duration::from_secs(30 * 60);

/// Lines of the script's output an error quotes (the last ones).
const TAIL_LINES: usize = 12;

/// The label on a built image with its dependencies.
pub(crate) const DEPS_LABEL: &str = "dev.moat.deps";

/// An error of `dependencies:`, naming `who` (a dependency, or several).
fn named(who: &str, message: impl std::fmt::Display) -> Error {
    if who.is_empty() {
        Error::new(ErrorKind::Runtime, format!("dependencies: {message}"))
    } else {
        Error::new(
            ErrorKind::Runtime,
            format!("dependencies: {who}: {message}"),
        )
    }
}

/// The image of `recipe`, with its id: found at once when the engine has
/// it; else the runtime's image pulled (one runtime alone), or the image
/// built. `labels` mark the containers it is made in (a run's, so that its
/// cleanup finds them); `progress` hears each step.
pub async fn ensure(
    runtime: &dyn Runtime,
    recipe: &Recipe,
    labels: &BTreeMap<String, String>,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<String> {
    if let Some(id) = runtime.image_id(&recipe.image).await? {
        return Ok(id);
    }
    let tools: Vec<&str> = recipe.tools.iter().map(|t| t.dependency.as_str()).collect();
    let base_who = match &recipe.base.dependency {
        Some(d) => d.clone(),
        None => tools.join(", "),
    };
    if !recipe.is_built() {
        return pull(runtime, &recipe.base.image, &base_who, progress).await;
    }
    let started = Instant::now();
    progress(&format!(
        "Building image {} for dependencies {}",
        recipe.image,
        recipe.dependencies.join(", ")
    ));
    pull(runtime, &recipe.base.image, &base_who, progress).await?;
    for copy in &recipe.copies {
        pull(runtime, &copy.image, &copy.dependency, progress).await?;
    }
    let script = Script::of(recipe);
    let spec = ContainerSpec {
        name: String::new(),
        image: recipe.base.image.clone(),
        command: Some(vec!["/bin/sh".into(), "-c".into(), script.text.clone()]),
        env: recipe.env.clone(),
        user: "0:0".into(),
        workdir: "/".into(),
        // apt-get reaches the mirror through the engine's default network;
        // without tools the build has no network at all.
        network: if recipe.tools.is_empty() {
            "none"
        } else {
            "bridge"
        }
        .into(),
        labels: labels.clone(),
        build: true,
        ..ContainerSpec::default()
    };
    let container = runtime.create_container(&spec).await.map_err(|e| {
        named(
            &base_who,
            format!("creating a container of {}: {e}", recipe.base.image),
        )
    })?;
    let made = async {
        for copy in &recipe.copies {
            copy_runtime(runtime, copy, &container, labels, progress).await?;
        }
        run_script(runtime, &container, &script, progress).await?;
        let image_labels = BTreeMap::from([
            (DEPS_LABEL.to_string(), recipe.dependencies.join(" ")),
            ("dev.moat.base".to_string(), recipe.base.image.clone()),
            // Built by moat, for the home whose run made it (`moat clean`).
            (
                BUILT_LABEL.to_string(),
                labels.get(HOME_LABEL).cloned().unwrap_or_default(),
            ),
        ]);
        runtime
            .commit(&container, &recipe.image, &recipe.cmd, &image_labels)
            .await
            .map_err(|e| named("", format!("committing the image {}: {e}", recipe.image)))
    }
    .await;
    let removed = runtime.remove(&container).await;
    let id = made?;
    removed?;
    progress(&format!(
        "Built image {} in {:.0} s",
        recipe.image,
        started.elapsed().as_secs_f64()
    ));
    Ok(id)
}

/// `image`'s id, pulled first when missing (with progress); an error names
/// `who` and says what to check.
async fn pull(
    runtime: &dyn Runtime,
    image: &str,
    who: &str,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<String> {
    if let Some(id) = runtime.image_id(image).await? {
        return Ok(id);
    }
    progress(&format!("Pulling image {image} for {who}"));
    let last = Mutex::new(Instant::now() - Duration::from_secs(1));
    let report = |p: &PullProgress| {
        let Ok(mut last) = last.lock() else { return };
        if last.elapsed() < Duration::from_millis(500) {
            return;
        }
        *last = Instant::now();
        progress(&format!(
            "Pulling image {image}: {}/{} layers, {:.1}/{:.1} MB",
            p.layers_done,
            p.layers,
            p.bytes as f64 / 1e6,
            p.total as f64 / 1e6
        ));
    };
    let cannot = |e: String| {
        let (name, version) = match who.split_once('@') {
            Some((n, v)) => (n, Some(v)),
            None => (who, None),
        };
        let hint = match (super::find(name), version) {
            (Some(k), Some(v)) if k.kind == super::Kind::Runtime => format!(
                "is {v} a version of {name} with an official Debian {} image (moat deps info {name})? ",
                super::DEBIAN
            ),
            _ => String::new(),
        };
        // Planning the image read the variable already; here it only
        // words the message.
        let from = match super::registry_from_env() {
            Ok(registry) if !registry.is_empty() => format!("{registry} ({REGISTRY_ENV})"),
            _ => format!("its registry (Docker Hub unless {REGISTRY_ENV} names a mirror)"),
        };
        named(
            who,
            format!("cannot pull {image}: {e}; {hint}The engine must reach {from}"),
        )
    };
    runtime
        .pull_image(image, &report)
        .await
        .map_err(|e| cannot(e.to_string()))?;
    match runtime.image_id(image).await? {
        Some(id) => {
            progress(&format!("Pulled image {image}"));
            Ok(id)
        }
        None => Err(cannot("the engine does not have it after the pull".into())),
    }
}

/// Copies a runtime's directories from a container of its image into
/// `container`, showing how much was copied.
async fn copy_runtime(
    runtime: &dyn Runtime,
    copy: &RuntimeCopy,
    container: &str,
    labels: &BTreeMap<String, String>,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<()> {
    let who = copy.dependency.as_str();
    progress(&format!("Copying {who} from {}", copy.image));
    let spec = ContainerSpec {
        name: String::new(),
        image: copy.image.clone(),
        command: Some(vec!["true".into()]),
        user: "0:0".into(),
        workdir: "/".into(),
        network: "none".into(),
        labels: labels.clone(),
        ..ContainerSpec::default()
    };
    let source = runtime
        .create_container(&spec)
        .await
        .map_err(|e| named(who, format!("creating a container of {}: {e}", copy.image)))?;
    let copied = async {
        let counter = Arc::new(AtomicU64::new(0));
        let paths = copy
            .paths
            .iter()
            .map(|p| (p, true))
            .chain(copy.paths_if_present.iter().map(|p| (p, false)));
        for (path, required) in paths {
            let archive = runtime
                .get_archive(&source, path)
                .await
                .map_err(|e| named(who, format!("reading {path} in {}: {e}", copy.image)))?;
            let Some(archive) = archive else {
                if required {
                    let name = who.split('@').next().unwrap_or(who);
                    return Err(named(
                        who,
                        format!(
                            "{} has no {path}, where the official image keeps {name} (moat deps info {name})",
                            copy.image
                        ),
                    ));
                }
                continue;
            };
            let dir = match path.rsplit_once('/') {
                Some(("", _)) | None => "/",
                Some((parent, _)) => parent,
            };
            // The download's own error, when it is what broke the copy.
            let broken: Arc<Mutex<Option<String>>> = Arc::default();
            let (count, seen) = (counter.clone(), broken.clone());
            let counted: ArchiveStream = Box::pin(archive.map(move |item| {
                match &item {
                    Ok(bytes) => {
                        count.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if let Ok(mut slot) = seen.lock() {
                            slot.get_or_insert_with(|| e.to_string());
                        }
                    }
                }
                item
            }));
            let put = runtime.put_archive(container, dir, counted);
            tokio::pin!(put);
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let result = loop {
                tokio::select! {
                    r = &mut put => break r,
                    _ = tick.tick() => progress(&format!(
                        "Copying {who} from {}: {path}, {} so far",
                        copy.image,
                        size(counter.load(Ordering::Relaxed))
                    )),
                }
            };
            if let Err(e) = result {
                let cause = broken
                    .lock()
                    .ok()
                    .and_then(|s| s.clone())
                    .unwrap_or_else(|| e.to_string());
                return Err(named(
                    who,
                    format!("copying {path} from {}: {cause}", copy.image),
                ));
            }
        }
        Ok(counter.load(Ordering::Relaxed))
    }
    .await;
    let removed = runtime.remove(&source).await;
    let bytes = copied?;
    removed?;
    progress(&format!(
        "Copied {who} from {} ({})",
        copy.image,
        size(bytes)
    ));
    Ok(())
}

/// `bytes` for people: `12 kB`, `48.3 MB`.
fn size(bytes: u64) -> String {
    if bytes < 1_000_000 {
        format!("{} kB", bytes.div_ceil(1000))
    } else {
        format!("{:.1} MB", bytes as f64 / 1e6)
    }
}

/// A step of the build script: who is at fault when it fails, what it
/// does, and what to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Step {
    pub(crate) who: String,
    pub(crate) what: String,
    pub(crate) hint: String,
}

/// The build script (for `/bin/sh -c`) and its steps: before each, it
/// prints `::moat-step N`; lines `::moat MESSAGE` are progress.
#[derive(Debug, Clone, Default)]
pub(crate) struct Script {
    pub(crate) text: String,
    pub(crate) steps: Vec<Step>,
}

/// `text` quoted for the shell.
fn sq(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

impl Script {
    fn line(&mut self, line: &str) {
        self.text.push_str(line);
        self.text.push('\n');
    }

    fn add(&mut self, who: &str, what: &str, hint: &str) -> usize {
        self.steps.push(Step {
            who: who.to_string(),
            what: what.to_string(),
            hint: hint.to_string(),
        });
        self.steps.len() - 1
    }

    fn mark(&mut self, step: usize) {
        self.line(&format!("echo '::moat-step {step}'"));
    }

    fn say(&mut self, message: &str) {
        self.line(&format!("echo {}", sq(&format!("::moat {message}"))));
    }

    /// The script of `recipe`: the copied runtimes' libraries registered,
    /// the tools the base lacks installed, then every check.
    pub(crate) fn of(recipe: &Recipe) -> Script {
        let mut s = Script::default();
        s.line("set -e");
        s.line("export DEBIAN_FRONTEND=noninteractive");
        let base = recipe.base.image.as_str();
        if !recipe.copies.is_empty() {
            let who: Vec<&str> = recipe
                .copies
                .iter()
                .map(|c| c.dependency.as_str())
                .collect();
            let step = s.add(&who.join(", "), "ldconfig", "");
            s.mark(step);
            s.line("ldconfig");
        }
        if !recipe.tools.is_empty() {
            let who: Vec<&str> = recipe.tools.iter().map(|t| t.dependency.as_str()).collect();
            let update = s.add(
                &who.join(", "),
                "apt-get update",
                &format!(
                    "tools are installed from {base}'s Debian packages, and the build container reaches the mirror through the engine's default network: check that the engine's containers can reach it, or set image: to an image that has the tools"
                ),
            );
            s.line("apt_updated=0");
            for tool in &recipe.tools {
                let packages = tool.packages.join(" ");
                let install = s.add(
                    &tool.dependency,
                    &format!("apt-get install {packages}"),
                    &format!("is {packages} a package of {base}'s distribution?"),
                );
                s.line(&format!("if ! ( {} ) >/dev/null 2>&1; then", tool.check));
                s.line("  if [ \"$apt_updated\" = 0 ]; then");
                s.mark(update);
                s.say("Updating the package lists (apt-get update)");
                s.line("    apt-get update");
                s.line("    apt_updated=1");
                s.line("  fi");
                s.mark(install);
                s.say(&format!(
                    "Installing {} (apt-get install {packages})",
                    tool.dependency
                ));
                s.line(&format!(
                    "  apt-get install -y --no-install-recommends {packages}"
                ));
                s.line("fi");
            }
            s.line(
                "if [ \"$apt_updated\" = 1 ]; then apt-get clean; rm -rf /var/lib/apt/lists/*; fi",
            );
        }
        for check in &recipe.checks {
            let name = check.dependency.split('@').next().unwrap_or("");
            let copied = recipe
                .copies
                .iter()
                .find(|c| c.dependency == check.dependency);
            let hint = if let Some(copy) = copied {
                format!(
                    "{name} was copied from {} but does not run on {base}, which may lack a library it needs: list {name} first in dependencies: to build on its own image (both must be official Debian {} images: moat deps info {name})",
                    copy.image,
                    super::DEBIAN
                )
            } else if recipe
                .tools
                .iter()
                .any(|t| t.dependency == check.dependency)
            {
                format!("{name} is not usable on {base} after apt-get install")
            } else {
                format!("{base} has no working {name} (moat deps info {name})")
            };
            let step = s.add(&check.dependency, &format!("`{}`", check.command), &hint);
            s.mark(step);
            s.line(&format!(
                "out=$( ( {} ) 2>&1 ) || {{ printf '%s\\n' \"$out\"; exit 1; }}",
                check.command
            ));
            s.line(&format!(
                "echo {}\"$(printf '%s\\n' \"$out\" | head -n 1)\"",
                sq(&format!("::moat {}: ", check.dependency))
            ));
        }
        s
    }
}

/// What the build script printed: its step now, the last lines, progress.
#[derive(Debug, Default)]
pub(crate) struct Watch {
    partial: [Vec<u8>; 2],
    pub(crate) step: Option<usize>,
    pub(crate) tail: VecDeque<String>,
}

impl Watch {
    /// Output of stream `n` (0 standard output, 1 standard error).
    pub(crate) fn feed(&mut self, n: usize, bytes: &[u8], progress: &(dyn Fn(&str) + Send + Sync)) {
        self.partial[n].extend_from_slice(bytes);
        while let Some(at) = self.partial[n].iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial[n].drain(..=at).collect();
            self.line(&line[..line.len() - 1], progress);
        }
        if self.partial[n].len() > 64 * 1024 {
            let line = std::mem::take(&mut self.partial[n]);
            self.line(&line, progress);
        }
    }

    /// The last lines, unfinished.
    pub(crate) fn finish(&mut self, progress: &(dyn Fn(&str) + Send + Sync)) {
        for n in 0..2 {
            let line = std::mem::take(&mut self.partial[n]);
            if !line.is_empty() {
                self.line(&line, progress);
            }
        }
    }

    fn line(&mut self, line: &[u8], progress: &(dyn Fn(&str) + Send + Sync)) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches('\r');
        if let Some(n) = text.strip_prefix("::moat-step ") {
            self.step = n.trim().parse().ok();
            return;
        }
        if let Some(message) = text.strip_prefix("::moat ") {
            progress(message);
            return;
        }
        tracing::debug!(line = %text, "dependencies image build");
        if text.trim().is_empty() {
            return;
        }
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(text.chars().take(240).collect());
    }
}

/// Runs the build script in `container` (its command) to its end; an
/// error names the step that failed and quotes the last lines it printed.
async fn run_script(
    runtime: &dyn Runtime,
    container: &str,
    script: &Script,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<()> {
    let mut output = runtime
        .attach_output(container)
        .await
        .map_err(|e| named("", format!("attaching to the build container: {e}")))?;
    runtime
        .start(container)
        .await
        .map_err(|e| named("", format!("starting the build container: {e}")))?;
    let mut watch = Watch::default();
    let read = async {
        while let Some(item) = output.next().await {
            match item {
                Ok(Output::Stdout(b)) => watch.feed(0, &b, progress),
                Ok(Output::Stderr(b)) => watch.feed(1, &b, progress),
                Err(e) => {
                    tracing::warn!(error = %e, "the build container's output broke off");
                    break;
                }
            }
        }
    };
    let timed_out = tokio::time::timeout(SCRIPT_LIMIT, read).await.is_err();
    watch.finish(progress);
    let step = watch.step.and_then(|n| script.steps.get(n));
    let (who, what) = match step {
        Some(s) => (s.who.as_str(), s.what.as_str()),
        None => ("", "the build script"),
    };
    if timed_out {
        let _ = runtime.stop(container, 1).await;
        return Err(named(
            who,
            format!(
                "{what} took longer than {} minutes; it was stopped",
                SCRIPT_LIMIT.as_secs() / 60
            ),
        ));
    }
    let code = runtime
        .wait(container)
        .await
        .map_err(|e| named(who, format!("waiting for {what}: {e}")))?;
    if code == 0 {
        return Ok(());
    }
    let said: Vec<&str> = watch.tail.iter().map(String::as_str).collect();
    let said = if said.is_empty() {
        "it printed nothing".to_string()
    } else {
        said.join(" | ")
    };
    let hint = step
        .map(|s| s.hint.as_str())
        .filter(|h| !h.is_empty())
        .map(|h| format!("; {h}"))
        .unwrap_or_default();
    Err(named(
        who,
        format!("{what} failed in the build container (exit {code}): {said}{hint}"),
    ))
}
