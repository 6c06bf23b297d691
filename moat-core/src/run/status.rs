//! What runs left behind and hold: their output and trace, and `moat
//! status` (runs, disk, images, health checks).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::meta::{run_dir, runs_dir};
use super::services::Host;
use super::{logs, RunMeta, RunState};
use crate::error::{Error, Result};
use crate::rt::run_async;
use crate::runtime::Engine;

/// A run's whole output so far: (stdout, stderr) bytes.
pub fn output(home: &Path, id: &str) -> Result<(Vec<u8>, Vec<u8>)> {
    let mut out = (Vec::new(), Vec::new());
    for chunk in logs::read_all(&run_dir(home, id).join("logs.jsonl"))? {
        match chunk.stream {
            logs::Stream::Stdout => out.0.extend(chunk.data),
            logs::Stream::Stderr | logs::Stream::Moat => out.1.extend(chunk.data),
        }
    }
    Ok(out)
}

/// The network trace of a run, from `network.jsonl`.
pub fn trace(home: &Path, id: &str) -> Result<Vec<serde_json::Value>> {
    let path = run_dir(home, id).join("network.jsonl");
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(&path, "read", e)),
    };
    // Complete lines only: the last may still be being written.
    Ok(bytes
        .split_inclusive(|b| *b == b'\n')
        .filter(|l| l.ends_with(b"\n"))
        .filter_map(|l| serde_json::from_slice(l).ok())
        .collect())
}

/// An image and how many runs used it.
#[derive(Debug, Clone, Serialize)]
pub struct ImageUse {
    /// The image.
    pub image: String,
    /// Runs that used it.
    pub runs: usize,
    /// Present in the engine (`None` when the engine cannot be asked).
    pub present: Option<bool>,
}

/// One health check.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it is fine.
    pub ok: bool,
    /// What was found.
    pub detail: String,
}

/// `moat status`: runs, images, disk use, health.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Runs starting or running.
    pub running: usize,
    /// Runs stopped.
    pub stopped: usize,
    /// Runs failed.
    pub failed: usize,
    /// Bytes under the runs directory.
    pub disk_bytes: u64,
    /// The runs directory.
    pub runs_dir: PathBuf,
    /// Images used by runs.
    pub images: Vec<ImageUse>,
    /// Health checks.
    pub health: Vec<Check>,
}

fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Each engine on this host, and each a live run is on; with none,
/// Docker, missing, as the default. (An engine the host does not have is
/// no problem while another is there and nothing uses it: a Podman-only
/// host is healthy.)
fn engines_to_check(mut engines: Vec<Engine>, runs: &[RunMeta]) -> Vec<Engine> {
    for r in runs.iter().filter(|r| !r.state.is_terminal()) {
        if !engines.contains(&r.engine) {
            engines.push(r.engine);
        }
    }
    if engines.is_empty() {
        engines.push(Engine::Docker);
    }
    engines
}

/// Gathers [`Status`].
pub fn status(home: &Path) -> Result<Status> {
    status_on(&Host::real(), home)
}

/// [`status`], on `host`.
pub(crate) fn status_on(host: &Host, home: &Path) -> Result<Status> {
    let runs = super::lifecycle::list_on(host, home)?;
    let mut images: BTreeMap<String, usize> = BTreeMap::new();
    for r in &runs {
        *images.entry(r.image.clone()).or_default() += 1;
    }
    let names: Vec<String> = images.keys().cloned().collect();
    let mut health = Vec::new();
    let mut present: Vec<Option<bool>> = vec![None; names.len()];
    for engine in engines_to_check(host.engines.present(), &runs) {
        let (names, engines) = (names.clone(), host.engines.clone());
        let answer = run_async(async move {
            let runtime = engines.connect(engine).await?;
            let info = runtime.ping().await?;
            let mut found = Vec::new();
            for image in &names {
                found.push(runtime.has_image(image).await.ok());
            }
            Ok((info, found))
        });
        match answer {
            Ok((info, found)) => {
                health.push(Check {
                    name: engine.to_string(),
                    ok: true,
                    detail: format!("engine {} at {}", info.version, info.host),
                });
                for (slot, f) in present.iter_mut().zip(found) {
                    if f == Some(true) || slot.is_none() {
                        *slot = f;
                    }
                }
            }
            Err(e) => health.push(Check {
                name: engine.to_string(),
                ok: false,
                detail: e.to_string(),
            }),
        }
    }
    health.push(match host.firewall.check() {
        Ok(()) => Check {
            name: "strict mode".into(),
            ok: true,
            detail: "host firewall rules can be installed".into(),
        },
        Err(e) => Check {
            name: "strict mode".into(),
            ok: false,
            detail: e.to_string(),
        },
    });
    let ca = home.join("proxy").join("ca").join("ca.crt");
    health.push(Check {
        name: "proxy CA".into(),
        ok: true,
        detail: if ca.exists() {
            format!("{}", ca.display())
        } else {
            "not created yet (made by the first run or proxy)".into()
        },
    });
    Ok(Status {
        running: runs.iter().filter(|r| !r.state.is_terminal()).count(),
        stopped: runs.iter().filter(|r| r.state == RunState::Stopped).count(),
        failed: runs.iter().filter(|r| r.state == RunState::Failed).count(),
        disk_bytes: dir_size(&runs_dir(home)),
        runs_dir: runs_dir(home),
        images: images
            .into_iter()
            .enumerate()
            .map(|(i, (image, runs))| ImageUse {
                image,
                runs,
                present: present.get(i).copied().flatten(),
            })
            .collect(),
        health,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engines_checked_are_those_present_or_in_use() {
        use Engine::{Docker, Podman};
        // A Podman-only host: Docker is not a problem.
        assert_eq!(engines_to_check(vec![Podman], &[]), vec![Podman]);
        // Nothing at all: Docker, the default, is reported missing.
        assert_eq!(engines_to_check(vec![], &[]), vec![Docker]);
        // A live run on an engine that is gone is checked.
        let live = RunMeta::sample("run_000000000001", "a", RunState::Running);
        assert_eq!(
            engines_to_check(vec![Podman], &[live]),
            vec![Podman, Docker]
        );
        let ended = RunMeta::sample("run_000000000002", "b", RunState::Stopped);
        assert_eq!(engines_to_check(vec![Podman], &[ended]), vec![Podman]);
    }
}
