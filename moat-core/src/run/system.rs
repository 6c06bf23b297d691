//! What moat owns on the container engines: the images it built and the
//! containers of runs (`moat system images`, `moat system containers`), and
//! which of those images no run uses any more (what `moat clean` removes).
//!
//! An image moat built carries [`BUILT_LABEL`] with the home whose run made
//! it. It is **used** while a run of that home names it (`run.json`'s
//! `image`) or any container on its engine, running or not, was made from
//! it; an image the engine shares between homes (the same content hash) is
//! the building home's to remove.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::services::Host;
use super::{is_run_id, RunMeta, RunState};
use crate::error::Result;
use crate::rt::run_async;
use crate::runtime::{
    same_image_id, ContainerInfo, Engine, ImageInfo, Runtime, BUILT_LABEL, HOME_LABEL, RUN_LABEL,
};

/// An image moat built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MoatImage {
    /// The engine that holds it.
    pub engine: Engine,
    /// The engine's id (`sha256:...`).
    pub id: String,
    /// Its tags (`moat-claude:0123...`).
    pub tags: Vec<String>,
    /// When it was made (RFC 3339).
    pub created: String,
    /// Its size in bytes.
    pub size: u64,
    /// The moat home whose run built it.
    pub home: String,
    /// The runs of this home that name it.
    pub runs: Vec<String>,
    /// The containers on its engine made from it (any, not only moat's).
    pub containers: Vec<String>,
}

impl MoatImage {
    /// Whether a run or a container uses it.
    pub fn used(&self) -> bool {
        !self.runs.is_empty() || !self.containers.is_empty()
    }

    /// What to call it: its first tag, else its id.
    pub fn display_name(&self) -> String {
        self.tags
            .first()
            .cloned()
            .unwrap_or_else(|| self.id.clone())
    }
}

/// A container of a moat run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MoatContainer {
    /// The engine that holds it.
    pub engine: Engine,
    /// The engine's id.
    pub id: String,
    /// Its name (`moat-<run-id>`).
    pub name: String,
    /// The run it belongs to.
    pub run: String,
    /// The moat home of that run.
    pub home: String,
    /// The engine's word for its state (`created`, `running`, `exited`).
    pub state: String,
    /// The image it was made from, as named then.
    pub image: String,
    /// When it was created (RFC 3339).
    pub created: String,
}

/// The images moat built for `home` (for every home with `all_homes`), on
/// every engine present, with the runs of `home` and the containers that
/// use each.
pub fn images(home: &Path, all_homes: bool) -> Result<Vec<MoatImage>> {
    images_on(&Host::real(), home, all_homes)
}

/// [`images`], on `host`.
pub(crate) fn images_on(host: &Host, home: &Path, all_homes: bool) -> Result<Vec<MoatImage>> {
    let runs = super::lifecycle::list_on(host, home)?;
    let (home, engines) = (home.to_path_buf(), host.engines.clone());
    run_async(async move {
        let mut out = Vec::new();
        for engine in engines.present() {
            let runtime = engines.connect(engine).await?;
            out.extend(built_images(runtime.as_ref(), &home, all_homes, &runs).await?);
        }
        Ok(out)
    })
}

/// The containers of runs of `home` (of every home with `all_homes`), on
/// every engine present, running or not.
pub fn containers(home: &Path, all_homes: bool) -> Result<Vec<MoatContainer>> {
    containers_on(&Host::real(), home, all_homes)
}

/// [`containers`], on `host`.
pub(crate) fn containers_on(
    host: &Host,
    home: &Path,
    all_homes: bool,
) -> Result<Vec<MoatContainer>> {
    let engines = host.engines.clone();
    let label = if all_homes {
        RUN_LABEL.to_string()
    } else {
        format!("{HOME_LABEL}={}", home.to_string_lossy())
    };
    run_async(async move {
        let mut out = Vec::new();
        for engine in engines.present() {
            let runtime = engines.connect(engine).await?;
            for c in runtime.list_containers(Some(&label)).await? {
                if let Some(c) = moat_container(engine, c) {
                    out.push(c);
                }
            }
        }
        out.sort_by(|a, b| b.created.cmp(&a.created).then(a.id.cmp(&b.id)));
        Ok(out)
    })
}

/// A run's container as listed, or `None` for one that is not a run's (a
/// container of an image moat built inherits its emptied run label).
fn moat_container(engine: Engine, c: ContainerInfo) -> Option<MoatContainer> {
    let run = c.labels.get(RUN_LABEL).filter(|r| is_run_id(r))?.clone();
    Some(MoatContainer {
        engine,
        run,
        home: c.labels.get(HOME_LABEL).cloned().unwrap_or_default(),
        id: c.id,
        name: c.name,
        state: c.state,
        image: c.image,
        created: rfc3339(c.created),
    })
}

/// The images on `runtime` that moat built for `home` (for any home with
/// `all_homes`), with what uses each: `runs` (their `image`) and the
/// engine's containers.
pub(crate) async fn built_images(
    runtime: &dyn Runtime,
    home: &Path,
    all_homes: bool,
    runs: &[RunMeta],
) -> Result<Vec<MoatImage>> {
    let label = if all_homes {
        BUILT_LABEL.to_string()
    } else {
        format!("{BUILT_LABEL}={}", home.to_string_lossy())
    };
    let images = runtime.images_with_label(&label).await?;
    if images.is_empty() {
        return Ok(Vec::new());
    }
    let containers = runtime.list_containers(None).await?;
    // What each run's image is on this engine now.
    let mut resolved: BTreeMap<String, Option<String>> = BTreeMap::new();
    for run in runs.iter().filter(|r| r.engine == runtime.engine()) {
        if !resolved.contains_key(&run.image) {
            let id = runtime.image_id(&run.image).await?;
            resolved.insert(run.image.clone(), id);
        }
    }
    Ok(images
        .into_iter()
        .map(|image| describe(runtime.engine(), image, runs, &resolved, &containers))
        .collect())
}

/// An image with the runs (of `runs`, their images resolved to ids in
/// `resolved`) and the containers that use it.
fn describe(
    engine: Engine,
    image: ImageInfo,
    runs: &[RunMeta],
    resolved: &BTreeMap<String, Option<String>>,
    containers: &[ContainerInfo],
) -> MoatImage {
    let named = |run: &RunMeta| {
        let by_id = resolved
            .get(&run.image)
            .and_then(|id| id.as_deref())
            .is_some_and(|id| same_image_id(id, &image.id));
        by_id
            || image
                .tags
                .iter()
                .any(|t| t == &run.image || t.strip_prefix("localhost/") == Some(&run.image))
    };
    MoatImage {
        engine,
        runs: runs
            .iter()
            .filter(|r| r.engine == engine && named(r))
            .map(|r| r.id.clone())
            .collect(),
        containers: containers
            .iter()
            .filter(|c| same_image_id(&c.image_id, &image.id))
            .map(|c| c.id.clone())
            .collect(),
        home: image.labels.get(BUILT_LABEL).cloned().unwrap_or_default(),
        created: rfc3339(image.created),
        size: image.size,
        tags: image.tags,
        id: image.id,
    }
}

/// The images moat built for `home` on `runtime` that neither `runs` (the
/// runs of `home` that stay) nor any container but those `going` uses;
/// removed unless `dry_run`. None while a run of `home` is starting: it may be about to
/// use one (its `image` names the base image until its own is made). An
/// image the engine refuses to remove because a container came to use it
/// meanwhile is kept and not reported. Their names.
pub(crate) async fn clean_images(
    runtime: &dyn Runtime,
    home: &Path,
    runs: &[RunMeta],
    going: &[String],
    dry_run: bool,
) -> Result<Vec<String>> {
    if runs.iter().any(|r| r.state == RunState::Starting) {
        return Ok(Vec::new());
    }
    let mut removed = Vec::new();
    for image in built_images(runtime, home, false, runs).await? {
        if !image.runs.is_empty() || image.containers.iter().any(|c| !going.contains(c)) {
            continue;
        }
        // Only what carries a name of moat's: an image of the user's built
        // FROM one of moat's inherits its label, and is not moat's to remove.
        if !image.tags.iter().any(|t| is_moat_tag(t)) {
            continue;
        }
        if !dry_run && !remove_image(runtime, &image).await? {
            continue;
        }
        removed.push(image.display_name());
    }
    Ok(removed)
}

/// The repositories of the images moat builds (`moat-claude:<hash>`,
/// `moat-deps:<hash>`; Podman lists them under `localhost/`).
pub const MOAT_REPOSITORIES: &[&str] = &["moat-claude", "moat-deps"];

/// Is `tag` one of moat's own names?
pub fn is_moat_tag(tag: &str) -> bool {
    let name = tag.strip_prefix("localhost/").unwrap_or(tag);
    name.split_once(':')
        .is_some_and(|(repo, _)| MOAT_REPOSITORIES.contains(&repo))
}

/// Removes moat's own names of an image: the engine removes the image with
/// its last name, and keeps it while the user's own tag names it. `false`
/// when a container uses it.
async fn remove_image(runtime: &dyn Runtime, image: &MoatImage) -> Result<bool> {
    for tag in image.tags.iter().filter(|t| is_moat_tag(t)) {
        if !runtime.remove_image(tag).await? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Seconds since the Unix epoch as RFC 3339 (empty when out of range).
fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::fake::FakeRuntime;
    use crate::runtime::ContainerSpec;

    fn run(id: &str, image: &str, state: RunState) -> RunMeta {
        RunMeta {
            image: image.into(),
            ..RunMeta::sample(id, id, state)
        }
    }

    fn built(home: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(BUILT_LABEL.to_string(), home.to_string())])
    }

    #[tokio::test]
    async fn only_this_homes_images_that_nothing_uses_go() {
        let fake = FakeRuntime::default();
        let home = Path::new("/h/one");
        fake.add_labelled_image("moat-claude:unused", "sha256:a1", &built("/h/one"));
        fake.add_labelled_image("moat-claude:named", "sha256:b2", &built("/h/one"));
        fake.add_labelled_image("moat-claude:contained", "sha256:c3", &built("/h/one"));
        fake.add_labelled_image("moat-claude:other-home", "sha256:d4", &built("/h/two"));
        fake.add_image("ubuntu:22.04", "sha256:e5");
        // A container of anyone's (not moat's) keeps its image.
        let container = fake
            .create_container(&ContainerSpec {
                image: "moat-claude:contained".into(),
                ..ContainerSpec::default()
            })
            .await
            .unwrap();
        let runs = vec![run(
            "run_000000000001",
            "moat-claude:named",
            RunState::Running,
        )];

        let listed = built_images(&fake, home, false, &runs).await.unwrap();
        let by_tag = |t: &str| {
            listed
                .iter()
                .find(|i| i.tags == vec![t.to_string()])
                .unwrap()
        };
        assert_eq!(listed.len(), 3, "{listed:?}");
        assert_eq!(by_tag("moat-claude:named").runs, vec!["run_000000000001"]);
        assert_eq!(by_tag("moat-claude:contained").containers.len(), 1);
        assert!(!by_tag("moat-claude:unused").used());
        assert_eq!(by_tag("moat-claude:unused").home, "/h/one");
        assert_eq!(
            built_images(&fake, home, true, &runs).await.unwrap().len(),
            4
        );

        // ...unless it is a leftover that goes too.
        let with_leftover = clean_images(&fake, home, &runs, &[container], true)
            .await
            .unwrap();
        assert_eq!(
            with_leftover,
            vec!["moat-claude:unused", "moat-claude:contained"]
        );
        // A dry run says what would go and removes nothing.
        let would = clean_images(&fake, home, &runs, &[], true).await.unwrap();
        assert_eq!(would, vec!["moat-claude:unused"]);
        assert_eq!(fake.images().len(), 5);
        let gone = clean_images(&fake, home, &runs, &[], false).await.unwrap();
        assert_eq!(gone, would);
        let left: Vec<String> = fake.images().into_iter().map(|(t, _)| t).collect();
        assert_eq!(
            left,
            vec![
                "moat-claude:contained",
                "moat-claude:named",
                "moat-claude:other-home",
                "ubuntu:22.04"
            ]
        );

        // A user's image built FROM one of moat's inherits its label, but
        // carries no name of moat's: it is not moat's to remove.
        fake.add_labelled_image("my-app:1", "sha256:f6", &built("/h/one"));
        assert_eq!(
            clean_images(&fake, home, &runs, &[], true).await.unwrap(),
            Vec::<String>::new()
        );
        assert!(is_moat_tag("localhost/moat-deps:abc") && is_moat_tag("moat-claude:1"));
        assert!(!is_moat_tag("my-moat-claude:1") && !is_moat_tag("moat-claude"));

        // While a run of the home is starting, no image goes.
        let starting = vec![run("run_000000000002", "ubuntu:22.04", RunState::Starting)];
        assert!(clean_images(&fake, home, &starting, &[], false)
            .await
            .unwrap()
            .is_empty());
        // Once the run naming it is gone, its image goes.
        let gone = clean_images(&fake, home, &[], &[], false).await.unwrap();
        assert_eq!(gone, vec!["moat-claude:named"]);
    }

    #[test]
    fn containers_without_a_run_are_not_runs_containers() {
        let mut c = ContainerInfo {
            id: "c1".into(),
            labels: BTreeMap::from([(RUN_LABEL.to_string(), String::new())]),
            created: 0,
            ..ContainerInfo::default()
        };
        assert_eq!(moat_container(Engine::Docker, c.clone()), None);
        c.labels
            .insert(RUN_LABEL.to_string(), "run_0123456789ab".into());
        c.labels.insert(HOME_LABEL.to_string(), "/h".into());
        let m = moat_container(Engine::Podman, c).unwrap();
        assert_eq!(
            (m.run.as_str(), m.home.as_str(), m.created.as_str()),
            ("run_0123456789ab", "/h", "1970-01-01T00:00:00Z")
        );
    }
}
