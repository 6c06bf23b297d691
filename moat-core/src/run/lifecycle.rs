//! What callers do with runs once started: list and find them, follow them
//! to their end, stop, destroy and clean them, and bring a run whose
//! supervisor died up to date (cleaning up what it left).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::meta::{
    age_secs, is_run_id, load_meta, now, read_meta, record_or_keep, release_reserve, run_dir,
    runs_dir,
};
use super::services::Host;
use super::{RunMeta, RunState};
use crate::error::{Error, ErrorKind, Result};
use crate::process::process_alive;
use crate::rt::run_async;

/// How long `stop`, `destroy` and `clean` wait for a run's supervisor to
/// clean up once the container was asked to stop: stopping (the grace
/// period included), removing the container, its rules and its network can
/// take tens of seconds on a loaded machine or under Podman.
const CLEANUP_WAIT: Duration = Duration::from_secs(60);

/// Every run under `home`, newest first, with its state brought up to date
/// (see [`refresh`]).
pub fn list(home: &Path) -> Result<Vec<RunMeta>> {
    list_on(&Host::real(), home)
}

/// [`list`], on `host`.
pub(crate) fn list_on(host: &Host, home: &Path) -> Result<Vec<RunMeta>> {
    let dir = runs_dir(home);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(&dir, "read", e)),
    };
    let mut runs = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_run_id(&name) {
            continue;
        }
        // A run.json that names another run is not trusted.
        if let Some(meta) = load_meta(&entry.path()).ok().filter(|m| m.id == name) {
            runs.push(refresh_on(host, home, meta));
        }
    }
    runs.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
    Ok(runs)
}

/// Finds a run by id, unique id prefix, or name (the most recent run of that
/// name); with `None`, the most recent run.
pub fn find(home: &Path, reference: Option<&str>) -> Result<RunMeta> {
    let runs = list(home)?;
    let Some(reference) = reference else {
        return runs.into_iter().next().ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidArgument,
                "there are no runs yet; start one with `moat run`",
            )
        });
    };
    if let Some(run) = runs.iter().find(|r| r.id == reference) {
        return Ok(run.clone());
    }
    if let Some(run) = runs.iter().find(|r| r.name == reference) {
        return Ok(run.clone());
    }
    let prefixed: Vec<&RunMeta> = runs
        .iter()
        .filter(|r| reference.len() >= 5 && r.id.starts_with(reference))
        .collect();
    match prefixed.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("no run matches \"{reference}\" (by id, id prefix or name); see `moat list`"),
        )),
        many => Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "\"{reference}\" matches {} runs ({}); give more of the id",
                many.len(),
                many.iter()
                    .map(|r| r.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// Brings a run's state up to date: a run that says it is starting or
/// running but whose supervisor is gone is marked failed, and what it left
/// (container, network, firewall rules) is removed, since a container whose
/// proxy is gone must not go on. Errors while cleaning are recorded in the
/// run's `error`.
pub fn refresh(home: &Path, meta: RunMeta) -> RunMeta {
    refresh_on(&Host::real(), home, meta)
}

/// [`refresh`], on `host`.
pub(crate) fn refresh_on(host: &Host, home: &Path, meta: RunMeta) -> RunMeta {
    if meta.state.is_terminal() && meta.cleaned {
        return meta;
    }
    let alive = match meta.supervisor {
        Some((pid, start)) => process_alive(pid, start),
        // Between creation and the supervisor recording itself: give it a
        // moment rather than declare it dead.
        None => age_secs(&meta.created_at) < 30,
    };
    if alive {
        return meta;
    }
    let dir = run_dir(home, &meta.id);
    release_reserve(&dir);
    if meta.state.is_terminal() {
        // The supervisor died after the run ended but before cleaning up.
        let cleanup = cleanup_blocking_on(host, home, &meta);
        return record_or_keep(&dir, meta, |m| match &cleanup {
            Ok(()) => m.cleaned = true,
            Err(e) => {
                // Why the run ended stays first.
                let note = format!("cleaning up failed: {e}");
                m.error = Some(match m.error.take() {
                    Some(before) if !before.contains(&note) => format!("{before}; {note}"),
                    Some(before) => before,
                    None => note,
                });
            }
        });
    }
    let cleanup = cleanup_blocking_on(host, home, &meta);
    let cleaned = cleanup.is_ok();
    let message = match (&meta.supervisor, cleanup) {
        (Some((pid, _)), Ok(())) => format!(
            "the run's supervisor (pid {pid}) exited unexpectedly; the container was stopped"
        ),
        (Some((pid, _)), Err(e)) => {
            format!("the run's supervisor (pid {pid}) exited unexpectedly; cleaning up failed: {e}")
        }
        (None, _) => "the run's supervisor never started".to_string(),
    };
    record_or_keep(&dir, meta, |m| {
        if !m.state.is_terminal() {
            m.state = RunState::Failed;
            m.error = Some(message.clone());
            m.stopped_at = Some(now());
        }
        m.cleaned = cleaned;
    })
}

/// [`cleanup`] from synchronous code. Idempotent: whatever carries the
/// run's label goes, and nothing left is not an error.
pub(crate) fn cleanup_blocking(home: &Path, meta: &RunMeta) -> Result<()> {
    cleanup_blocking_on(&Host::real(), home, meta)
}

/// [`cleanup_blocking`], on `host`.
fn cleanup_blocking_on(host: &Host, home: &Path, meta: &RunMeta) -> Result<()> {
    let (host, meta, home) = (host.clone(), meta.clone(), home.to_path_buf());
    run_async(async move { cleanup(&host, &home, &meta).await })
}

/// Removes a run's routes, and stops a router that was started for runs
/// (not by hand) once nothing is left to route.
pub(crate) fn release_routes(home: &Path, name: &str, id: &str) -> Result<()> {
    crate::routing::table::unregister(home, name, id)?;
    crate::routing::daemon::stop_if_idle(home)
}

/// Removes what a run holds on the host: container, firewall rules, network.
/// Besides those `run.json` names, whatever carries the run's label (a
/// supervisor killed between creating an object and recording it).
async fn cleanup(host: &Host, home: &Path, meta: &RunMeta) -> Result<()> {
    let docker = host.engines.connect(meta.engine).await?;
    let mut first_err = None;
    let label = format!("{}={}", crate::runtime::RUN_LABEL, meta.id);
    let mut containers: Vec<String> = meta.container.iter().cloned().collect();
    for (id, run) in docker.containers_with_label(&label).await? {
        if run == meta.id && !containers.contains(&id) {
            containers.push(id);
        }
    }
    for c in &containers {
        docker.remove(c).await?;
        // The rules stay while the container may still run. (Another
        // process removing it at the same time: its removal may take a
        // moment to show.)
        let mut gone = false;
        for _ in 0..50 {
            if docker.state(c).await?.is_none() {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !gone {
            return Err(Error::new(
                ErrorKind::Runtime,
                format!("container {c} is still there; its firewall rules are kept"),
            ));
        }
    }
    if let Err(e) = host.firewall.remove(&meta.id) {
        first_err.get_or_insert(e);
    }
    let mut networks: Vec<String> = meta.network.iter().cloned().collect();
    for (name, run) in docker.networks_with_label(&label).await? {
        if run == meta.id && !networks.contains(&name) {
            networks.push(name);
        }
    }
    for n in &networks {
        if let Err(e) = docker.remove_network(n).await {
            first_err.get_or_insert(e);
        }
    }
    if let Err(e) = host.routes.release(home, &meta.name, &meta.id) {
        first_err.get_or_insert(e);
    }
    first_err.map_or(Ok(()), Err)
}

/// Whether a run is over, for loops that follow it: reads `run.json` each
/// time and checks that the supervisor is alive about once a second (a run
/// whose supervisor died is over too, see [`refresh`]).
#[derive(Debug)]
pub struct Watch {
    home: PathBuf,
    id: String,
    last_refresh: std::time::Instant,
}

impl Watch {
    /// Watches run `id` under `home`.
    pub fn new(home: &Path, id: &str) -> Watch {
        Watch {
            home: home.to_path_buf(),
            id: id.to_string(),
            last_refresh: std::time::Instant::now(),
        }
    }

    /// Is the run over? A run that cannot be read any more is over.
    pub fn is_over(&mut self) -> bool {
        let Ok(meta) = load_meta(&run_dir(&self.home, &self.id)) else {
            return true;
        };
        if meta.state.is_terminal() {
            return true;
        }
        if self.last_refresh.elapsed() >= Duration::from_secs(1) {
            self.last_refresh = std::time::Instant::now();
            return refresh(&self.home, meta).state.is_terminal();
        }
        false
    }
}

/// Waits until a run is over; its final metadata. With a timeout, returns
/// the current metadata when it runs out.
pub fn wait(home: &Path, id: &str, timeout: Option<Duration>) -> Result<RunMeta> {
    wait_until(home, id, timeout, |m| m.state.is_terminal())
}

/// Waits until a run is over and what it held on the host is removed.
pub fn wait_cleaned(home: &Path, id: &str, timeout: Option<Duration>) -> Result<RunMeta> {
    wait_until(home, id, timeout, cleaned_up)
}

fn cleaned_up(meta: &RunMeta) -> bool {
    meta.state.is_terminal() && meta.cleaned
}

/// What is known of a run removed while someone waited for it: it was over
/// and cleaned up (or it would not have been removed).
fn removed(mut last: RunMeta) -> RunMeta {
    if !last.state.is_terminal() {
        last.state = RunState::Stopped;
        last.stopped_at.get_or_insert_with(now);
    }
    last.cleaned = true;
    last
}

fn wait_until(
    home: &Path,
    id: &str,
    timeout: Option<Duration>,
    over: impl Fn(&RunMeta) -> bool,
) -> Result<RunMeta> {
    wait_from(&Host::real(), home, id, timeout, over, None)
}

/// [`wait_until`], knowing `last` of the run already (so a run removed
/// before the first look is still reported as stopped).
fn wait_from(
    host: &Host,
    home: &Path,
    id: &str,
    timeout: Option<Duration>,
    over: impl Fn(&RunMeta) -> bool,
    last: Option<RunMeta>,
) -> Result<RunMeta> {
    let dir = run_dir(home, id);
    // A deadline past what the clock can say is none (wait as long as it takes).
    let deadline = timeout.and_then(|t| std::time::Instant::now().checked_add(t));
    let mut delay = Duration::from_millis(2);
    let mut last = last;
    loop {
        let Some(read) = read_meta(&dir)? else {
            return match last {
                Some(last) => Ok(removed(last)),
                None => Err(no_such_run(id)),
            };
        };
        let meta = refresh_on(host, home, read);
        last = Some(meta.clone());
        if over(&meta) {
            return Ok(meta);
        }
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            return Ok(meta);
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(20));
    }
}

fn no_such_run(id: &str) -> Error {
    Error::new(
        ErrorKind::InvalidArgument,
        format!("there is no run {id} (it may have been removed); see `moat list`"),
    )
}

/// Stops a run: the container gets SIGTERM and, after `grace_secs`, SIGKILL;
/// the supervisor then records the exit and cleans up. When the supervisor
/// is gone, this cleans up itself. Returns the final metadata. `run` is
/// what the caller last knew of it: a run removed meanwhile (by `destroy`,
/// which stops it first) is reported stopped from that.
pub fn stop(home: &Path, run: &RunMeta, grace_secs: u32) -> Result<RunMeta> {
    stop_on(&Host::real(), home, run, grace_secs)
}

/// [`stop`], on `host`.
pub(crate) fn stop_on(host: &Host, home: &Path, run: &RunMeta, grace_secs: u32) -> Result<RunMeta> {
    let id = run.id.as_str();
    let Some(meta) = read_meta(&run_dir(home, id))? else {
        return Ok(removed(run.clone()));
    };
    let meta = refresh_on(host, home, meta);
    if meta.state.is_terminal() {
        return wait_from(host, home, id, Some(CLEANUP_WAIT), cleaned_up, Some(meta));
    }
    if meta.state == RunState::Starting {
        // Still setting up: ask the supervisor to give up (it removes what
        // it created; a container not started yet would ignore a stop).
        if let Some((pid, start)) = meta.supervisor {
            if process_alive(pid, start) {
                // SAFETY: sending a signal to a process we checked is ours.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
        }
    } else if let Some(container) = meta.container.clone() {
        let (engine, engines) = (meta.engine, host.engines.clone());
        run_async(async move {
            let runtime = engines.connect(engine).await?;
            runtime.stop(&container, grace_secs).await
        })?;
    }
    wait_from(host, home, id, Some(CLEANUP_WAIT), cleaned_up, Some(meta))
}

/// Removes a run and its artifacts; a running run is stopped first. A run
/// removed meanwhile (another `destroy`, `clean`) is fine: it is gone.
pub fn destroy(home: &Path, id: &str) -> Result<()> {
    let dir = run_dir(home, id);
    let Some(known) = read_meta(&dir)? else {
        return Ok(());
    };
    let meta = stop(home, &known, 10)?;
    if !meta.state.is_terminal() || !meta.cleaned {
        return Err(Error::new(
            ErrorKind::Runtime,
            format!(
                "run {id} did not stop and clean up within {} s; not removed",
                CLEANUP_WAIT.as_secs()
            ),
        ));
    }
    remove_run_dir(&dir)
}

/// Removes a run's directory; one already gone is fine.
fn remove_run_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(dir, "remove", e)),
    }
}

/// What [`clean`] removed.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Cleaned {
    /// Runs whose artifacts were removed.
    pub runs: Vec<String>,
    /// Containers removed that no live run owned.
    pub containers: Vec<String>,
    /// Networks removed that no live run owned.
    pub networks: Vec<String>,
    /// Runs whose firewall chains were left on the host with their network
    /// gone (any moat home's: a home deleted with runs in it), removed.
    pub firewall: Vec<String>,
    /// Images this home's runs made (`runtime::BUILT_LABEL`) that no run
    /// left and no container uses, removed: their tags (else their ids).
    pub images: Vec<String>,
}

/// What [`clean_with`] does.
#[derive(Debug, Clone, Copy, Default)]
pub struct CleanOptions {
    /// Only find what would be removed; remove nothing.
    pub dry_run: bool,
    /// Leave the images moat built, used or not (they are reused at once
    /// by the next run that needs them).
    pub keep_images: bool,
}

/// The stopped and failed runs that [`clean`] removes: those that just
/// ended and whose supervisor is still cleaning up too (`clean` waits for
/// it), so that what a dry run or a question lists is what goes.
pub fn cleanable(home: &Path) -> Result<Vec<RunMeta>> {
    cleanable_on(&Host::real(), home)
}

fn cleanable_on(host: &Host, home: &Path) -> Result<Vec<RunMeta>> {
    Ok(list_on(host, home)?
        .into_iter()
        .filter(|r| r.state.is_terminal())
        .collect())
}

/// Removes stopped and failed runs, unused images this home's runs made,
/// and any container, network or firewall chain this home's runs left
/// behind (see [`clean_with`]).
pub fn clean(home: &Path) -> Result<Cleaned> {
    clean_with(home, CleanOptions::default())
}

/// Removes stopped and failed runs, the images this home's runs made that
/// no remaining run names and no container uses, and any container, network
/// or firewall chain this home's runs left behind (a run whose supervisor
/// died before cleaning up). Runs of other moat homes on the same engine are
/// never touched: moat labels what it creates with its home. With
/// `dry_run`, removes nothing and says what would go, found the same way.
pub fn clean_with(home: &Path, options: CleanOptions) -> Result<Cleaned> {
    clean_on(&Host::real(), home, options)
}

/// [`clean_with`], on `host`.
pub(crate) fn clean_on(host: &Host, home: &Path, options: CleanOptions) -> Result<Cleaned> {
    let dry_run = options.dry_run;
    let mut out = Cleaned::default();
    // Runs that just ended are cleaned up by their supervisors in a moment.
    if !dry_run {
        for run in list_on(host, home)? {
            if run.state.is_terminal() && !run.cleaned {
                wait_from(host, home, &run.id, Some(CLEANUP_WAIT), cleaned_up, None)?;
            }
        }
    }
    for run in cleanable_on(host, home)? {
        if !dry_run {
            if !run.cleaned {
                // Its supervisor did not finish within CLEANUP_WAIT: it stays.
                continue;
            }
            // Should a chain have outlived the run, it goes with it.
            host.firewall.remove(&run.id)?;
            remove_run_dir(&run_dir(home, &run.id))?;
        }
        out.runs.push(run.id);
    }
    // The runs that stay name the images they use.
    let staying: Vec<RunMeta> = list_on(host, home)?
        .into_iter()
        .filter(|r| !out.runs.contains(&r.id))
        .collect();
    // Runs still running, or ended but still being cleaned up by their
    // supervisor, keep what they hold.
    let live: Vec<String> = staying
        .iter()
        .filter(|r| !(r.state.is_terminal() && r.cleaned))
        .map(|r| r.id.clone())
        .collect();
    let mine = format!("{}={}", crate::runtime::HOME_LABEL, home.to_string_lossy());
    // A run may have started since `live` was read: just before touching
    // an object, its run must still be over (or have no directory at all).
    let home_dir = home.to_path_buf();
    let image_home = home.to_path_buf();
    let leftover = move |run: &str| -> bool {
        if live.iter().any(|l| l == run) {
            return false;
        }
        match load_meta(&run_dir(&home_dir, run)) {
            Ok(m) => m.state.is_terminal() && m.cleaned,
            Err(_) => !run_dir(&home_dir, run).exists(),
        }
    };
    let host = host.clone();
    let (containers, networks, firewall, images) = run_async(async move {
        let mut containers = Vec::new();
        let mut networks = Vec::new();
        let mut images = Vec::new();
        // Every engine this home's runs may have used.
        for engine in host.engines.present() {
            let runtime = host.engines.connect(engine).await?;
            for (id, run) in runtime.containers_with_label(&mine).await? {
                if is_run_id(&run) && leftover(&run) {
                    if !dry_run {
                        runtime.remove(&id).await?;
                    }
                    containers.push(id);
                }
            }
            for (name, run) in runtime.networks_with_label(&mine).await? {
                if is_run_id(&run) && leftover(&run) {
                    // The network goes first: it cannot while a container is
                    // on it, and then its rules must stay.
                    if !dry_run {
                        runtime.remove_network(&name).await?;
                        host.firewall.remove(&run)?;
                    }
                    networks.push(name);
                }
            }
            // Last: a leftover container no longer holds its image.
            if !options.keep_images {
                images.extend(
                    super::system::clean_images(
                        runtime.as_ref(),
                        &image_home,
                        &staying,
                        &containers,
                        dry_run,
                    )
                    .await?,
                );
            }
        }
        // A chain whose run has neither a network on any engine nor a
        // bridge on this host guards nothing: whatever home or engine it
        // came from (a home deleted with runs in it), it goes. (A Podman
        // network's bridge appears only with its container, after the
        // chain: the network is what says the run is still being set up.)
        // The chains are listed before the networks: a run makes its
        // network before its chain, so a chain listed here has its network
        // in the list below, while a run starting meanwhile, whose network
        // the list below may miss, has no chain in this one.
        let chained = host.firewall.runs_with_rules();
        let mut networked = Vec::new();
        for engine in host.engines.present() {
            let runtime = host.engines.connect(engine).await?;
            for (_, run) in runtime
                .networks_with_label(crate::runtime::RUN_LABEL)
                .await?
            {
                networked.push(run);
            }
        }
        let mut firewall = Vec::new();
        for run in chained {
            if !host.firewall.bridge_exists(&run) && !networked.contains(&run) {
                if !dry_run {
                    host.firewall.remove(&run)?;
                }
                firewall.push(run);
            }
        }
        Ok((containers, networks, firewall, images))
    })?;
    out.containers = containers;
    out.networks = networks;
    out.firewall = firewall;
    out.images = images;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::meta::save_meta;
    use super::*;

    #[test]
    fn finding_runs_by_id_prefix_and_name() {
        let home = tempfile::tempdir().unwrap();
        let mut ids = Vec::new();
        for (i, name) in ["alpha", "beta"].iter().enumerate() {
            let id = format!("run_00000000000{i}");
            let dir = run_dir(home.path(), &id);
            std::fs::create_dir_all(&dir).unwrap();
            let meta = RunMeta {
                workspace: home.path().into(),
                created_at: format!("2026-01-0{}T00:00:00Z", i + 1),
                exit_code: Some(0),
                cleaned: true,
                ..RunMeta::sample(&id, name, RunState::Stopped)
            };
            save_meta(&dir, &meta).unwrap();
            ids.push(id);
        }
        assert_eq!(find(home.path(), None).unwrap().name, "beta");
        assert_eq!(find(home.path(), Some("alpha")).unwrap().id, ids[0]);
        assert_eq!(find(home.path(), Some(&ids[1])).unwrap().name, "beta");
        let ambiguous = find(home.path(), Some("run_0000")).unwrap_err();
        assert!(
            ambiguous.to_string().contains("matches 2 runs"),
            "{ambiguous}"
        );
        assert_eq!(
            find(home.path(), Some("run_000000000001")).unwrap().name,
            "beta"
        );
        let missing = find(home.path(), Some("gamma")).unwrap_err();
        assert!(
            missing.to_string().contains("no run matches \"gamma\""),
            "{missing}"
        );
        // A run.json that claims another id (or a path) is not listed: its
        // id would steer clean and destroy elsewhere.
        let forged = run_dir(home.path(), "run_00000000000f");
        std::fs::create_dir_all(&forged).unwrap();
        let mut meta = find(home.path(), Some("alpha")).unwrap();
        meta.id = "../../..".into();
        save_meta(&forged, &meta).unwrap();
        assert_eq!(list(home.path()).unwrap().len(), 2);
        assert!(!is_run_id("../../.."));
        assert!(!is_run_id("run_00000000000G"));
        assert!(is_run_id("run_00000000000f"));
    }

    #[test]
    fn a_run_that_just_ended_is_cleanable_while_its_supervisor_cleans_up() {
        // `moat run` returns once the exit code is recorded; the supervisor
        // then removes the container and sets `cleaned`. What `moat clean`
        // asks about (and `--dry-run` lists) must count that run, as
        // `clean -f` (which waits for the supervisor) removes it.
        let home = tempfile::tempdir().unwrap();
        let id = "run_00000000000a";
        let dir = run_dir(home.path(), id);
        std::fs::create_dir_all(&dir).unwrap();
        let me = std::process::id();
        let meta = RunMeta {
            workspace: home.path().into(),
            // A live supervisor, still cleaning up.
            supervisor: Some((me, crate::process::process_start_time(me).unwrap())),
            created_at: now(),
            stopped_at: Some(now()),
            exit_code: Some(0),
            ..RunMeta::sample(id, "ended", RunState::Stopped)
        };
        save_meta(&dir, &meta).unwrap();
        let ids: Vec<String> = cleanable(home.path())
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, vec![id.to_string()]);
        // Running runs are not.
        let mut running = meta.clone();
        running.state = RunState::Running;
        save_meta(&dir, &running).unwrap();
        assert!(cleanable(home.path()).unwrap().is_empty());
    }
}
