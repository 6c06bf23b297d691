//! Starting a run: creating it on disk and handing it to its supervisor
//! process, whose progress is read until the container starts.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::{Deserialize, Serialize};

use super::meta::{
    check_name, load_meta, new_run_id, run_dir, runs_dir, save_meta, update_meta, RESERVE,
};
use super::mounts::check_mounts;
use super::{list, refresh, RunMeta, RunPlan, RunState};
use crate::error::{Error, ErrorKind, Result};
use crate::paths::FileLock;
use crate::process::detach;

/// A full disk said plainly, naming the moat home; other errors as they are.
fn disk_full_explained(home: &Path, e: Error) -> Error {
    if crate::paths::is_disk_full(&e) {
        Error::new(
            ErrorKind::Io,
            format!(
                "the disk holding the moat home ({}) is full, so the run was not started: {e}; free some space (`moat clean` removes finished runs)",
                home.display()
            ),
        )
    } else {
        e
    }
}

/// How the supervisor process is started.
#[derive(Debug, Clone, Default)]
pub struct Launcher {
    /// The program and arguments that run [`supervise`](super::supervise) (the CLI uses
    /// `moat _supervise`, Python `python -m moat._supervise`). When empty:
    /// `$MOAT_SUPERVISOR`, else a `moat` beside the current executable, else
    /// the first of `fallbacks` that is a file, else `moat` on `PATH`, each
    /// with `_supervise`.
    pub command: Vec<std::ffi::OsString>,
    /// Further `moat` programs to try when `command` is empty (see above).
    /// libmoat puts the one of its own install prefix here
    /// (`<libdir>/../bin/moat`).
    pub fallbacks: Vec<PathBuf>,
}

impl Launcher {
    /// A launcher running `program args...`.
    pub fn new(command: Vec<std::ffi::OsString>) -> Launcher {
        Launcher {
            command,
            fallbacks: Vec::new(),
        }
    }

    fn resolve(&self) -> Result<Vec<std::ffi::OsString>> {
        if !self.command.is_empty() {
            return Ok(self.command.clone());
        }
        if let Some(path) = std::env::var_os("MOAT_SUPERVISOR").filter(|p| !p.is_empty()) {
            return Ok(vec![path, "_supervise".into()]);
        }
        if let Some(beside) = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|p| p.join("moat")))
            .filter(|p| p.is_file())
        {
            return Ok(vec![beside.into(), "_supervise".into()]);
        }
        if let Some(fallback) = self.fallbacks.iter().find(|p| trusted_program(p)) {
            return Ok(vec![fallback.into(), "_supervise".into()]);
        }
        let on_path = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("moat"))
                .find(|p| p.is_file())
        });
        match on_path {
            Some(p) => Ok(vec![p.into(), "_supervise".into()]),
            None => Err(Error::new(
                ErrorKind::Runtime,
                "cannot find the `moat` program that supervises runs: install it on PATH or set MOAT_SUPERVISOR to its path",
            )),
        }
    }
}

/// What the supervisor tells its starter, one JSON object per line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub(crate) enum Event {
    Progress {
        message: String,
    },
    /// The container exists, its output is recorded, and the supervisor
    /// waits for the starter to attach before starting it (a held start:
    /// [`start_held`]).
    Created,
    Ready,
    Error {
        kind: String,
        message: String,
    },
}

/// What the starter of a held run writes to the supervisor once it has
/// attached to the container.
pub(crate) const ATTACHED: &str = "attached";

/// What the starter hands the supervisor on its standard input.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Handoff {
    pub home: PathBuf,
    pub id: String,
    /// The plan, its engine chosen.
    pub plan: RunPlan,
    /// The command that started the supervisor, from which the router's is
    /// made (`moat _supervise` → `moat _router`).
    #[serde(default)]
    pub launcher: Vec<String>,
    /// Not the supervisor but its guard (see `supervisor::guard`).
    #[serde(default)]
    pub guard: bool,
    /// Wait, once the container is created, until the starter says it has
    /// attached ([`ATTACHED`] on standard input) before starting it.
    #[serde(default)]
    pub hold: bool,
}

/// The router's command, from the supervisor's: the last word
/// `_supervise` (or module `moat._supervise`) becomes `_router`.
pub(crate) fn router_command(launcher: &[String]) -> Vec<std::ffi::OsString> {
    let mut command: Vec<std::ffi::OsString> = launcher.iter().map(Into::into).collect();
    if let Some(last) = launcher.last() {
        if let Some(prefix) = last.strip_suffix("_supervise") {
            if let Some(slot) = command.last_mut() {
                *slot = format!("{prefix}_router").into();
            }
        }
    }
    command
}

fn kind_of(name: &str) -> ErrorKind {
    match name {
        "config" => ErrorKind::Config,
        "io" => ErrorKind::Io,
        "invalid_argument" => ErrorKind::InvalidArgument,
        "internal" => ErrorKind::Internal,
        _ => ErrorKind::Runtime,
    }
}

/// Creates a run and starts its supervisor, which sets it up; returns once
/// the container has started (or setup failed, with the reason). `progress`
/// receives setup messages (image pulls).
pub fn start(
    home: &Path,
    plan: &RunPlan,
    launcher: &Launcher,
    progress: &mut dyn FnMut(&str),
) -> Result<RunMeta> {
    match launch(home, plan, launcher, progress, false)? {
        Launched::Ready(meta) => Ok(meta),
        Launched::Held(held) => held.release(progress),
    }
}

/// Like [`start`], but returns once the container is created and before it
/// starts, for a caller that attaches to it first (`moat run -i`): nothing
/// the command prints at once is lost between its start and the attach,
/// as with `docker run -it`. The run starts when [`Held::release`] is
/// called; should the caller go away first, the run fails and is cleaned up.
pub fn start_held(
    home: &Path,
    plan: &RunPlan,
    launcher: &Launcher,
    progress: &mut dyn FnMut(&str),
) -> Result<Held> {
    match launch(home, plan, launcher, progress, true)? {
        Launched::Held(held) => Ok(held),
        Launched::Ready(meta) => Err(Error::new(
            ErrorKind::Internal,
            format!(
                "run {}: the supervisor started the container without waiting",
                meta.id
            ),
        )),
    }
}

/// A run whose container is created but not started (see [`start_held`]).
#[derive(Debug)]
pub struct Held {
    meta: RunMeta,
    dir: PathBuf,
    home: PathBuf,
    log_path: PathBuf,
    stdin: std::process::ChildStdin,
    events: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl Held {
    /// The run as it is now: `starting`, with its container.
    pub fn meta(&self) -> &RunMeta {
        &self.meta
    }

    /// Starts the container and waits until the run is up, as [`start`]
    /// does (progress included).
    pub fn release(mut self, progress: &mut dyn FnMut(&str)) -> Result<RunMeta> {
        self.stdin
            .write_all(format!("{ATTACHED}\n").as_bytes())
            .and_then(|()| self.stdin.flush())
            .map_err(|e| {
                Error::new(
                    ErrorKind::Runtime,
                    format!("cannot tell the run's supervisor to start the container: {e}"),
                )
            })?;
        match follow_events(
            &mut self.events,
            &self.home,
            &self.dir,
            &self.log_path,
            progress,
        )? {
            Followed::Ready => load_meta(&self.dir),
            Followed::Created => Err(Error::new(
                ErrorKind::Internal,
                "the run's supervisor said twice that the container was created",
            )),
        }
    }
}

enum Launched {
    Ready(RunMeta),
    Held(Held),
}

enum Followed {
    Created,
    Ready,
}

/// Reads the supervisor's events until the container is created (held) or
/// the run is up; an error event, or the supervisor's end, is an error.
fn follow_events(
    events: &mut std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    home: &Path,
    dir: &Path,
    log_path: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Followed> {
    for line in events.by_ref() {
        let Ok(line) = line else { break };
        match serde_json::from_str::<Event>(&line) {
            Ok(Event::Progress { message }) => progress(&message),
            Ok(Event::Created) => return Ok(Followed::Created),
            Ok(Event::Ready) => return Ok(Followed::Ready),
            Ok(Event::Error { kind, message }) => return Err(Error::new(kind_of(&kind), message)),
            Err(_) => {}
        }
    }
    let meta = refresh(home, load_meta(dir)?);
    Err(Error::new(
        ErrorKind::Runtime,
        format!(
            "the run's supervisor exited before the run started{}; see {}",
            meta.error.map(|e| format!(" ({e})")).unwrap_or_default(),
            log_path.display()
        ),
    ))
}

fn launch(
    home: &Path,
    plan: &RunPlan,
    launcher: &Launcher,
    progress: &mut dyn FnMut(&str),
    hold: bool,
) -> Result<Launched> {
    if let Some(name) = &plan.name {
        check_name(name)?;
    }
    let workspace = std::fs::canonicalize(&plan.workspace)
        .map_err(|e| Error::io(&plan.workspace, "open workspace", e))?;
    if !workspace.is_dir() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("workspace {} is not a directory", workspace.display()),
        ));
    }
    let mut plan = plan.clone();
    plan.workspace = workspace;
    let engine = crate::runtime::choose(plan.engine)?;
    plan.engine = Some(engine);
    check_mounts(home, &plan)?;
    // Mount sources by their canonical paths, pinned as checked: the
    // supervisor mounts only what was checked (`Pinned::verify`).
    for m in &mut plan.mounts {
        // `check_mounts` refused a source that does not exist; one that is
        // gone now was removed since, and is refused, not mounted unpinned.
        let real = std::fs::canonicalize(&m.source).map_err(|e| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "mount {}: its source {} cannot be resolved now ({}); it was there a moment ago",
                    m.target,
                    m.source.display(),
                    crate::error::io_reason(&e)
                ),
            )
        })?;
        // A source written in the workspace (`./data`) stays in it: a
        // link the repository holds (`data -> ~/.config`) or `..`
        // cannot take it elsewhere while agent.yaml reads as harmless.
        // A directory outside is mounted only by its absolute path.
        if m.source.starts_with(&plan.workspace) && !real.starts_with(&plan.workspace) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "mount {}: its source {} leads out of the workspace, to {} (through .. or a link); a source in the workspace must stay in it: write a directory outside by its absolute path",
                    m.target,
                    m.source.display(),
                    real.display()
                ),
            ));
        }
        m.source = real;
    }
    plan.pinned = std::iter::once(plan.workspace.clone())
        .chain(plan.mounts.iter().map(|m| m.source.clone()))
        .map(|p| super::plan::Pinned::now(&p))
        .collect::<Result<_>>()?;
    let command = launcher.resolve()?;
    let runs = runs_dir(home);
    crate::paths::private_dir(&runs)?;
    let meta = {
        let _lock = FileLock::acquire(&runs.join(".lock"))?;
        let id = new_run_id()?;
        let meta = RunMeta::starting(&id, &plan, engine);
        let name = &meta.name;
        if let Some(other) = list(home)?
            .into_iter()
            .find(|r| &r.name == name && !r.state.is_terminal())
        {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("Name already in use: \"{name}\" is the name of running run {}; choose another with --name or stop that run", other.id),
            ));
        }
        let dir = run_dir(home, &id);
        let created = crate::paths::private_dir(&dir)
            .and_then(|()| save_meta(&dir, &meta))
            .and_then(|()| crate::paths::reserve(&dir.join(RESERVE)));
        if let Err(e) = created {
            // Nothing of a run that could not be created is left behind.
            let _ = std::fs::remove_dir_all(&dir);
            return Err(disk_full_explained(home, e));
        }
        meta
    };
    let dir = run_dir(home, &meta.id);
    let log_path = dir.join("supervisor.log");
    let log = crate::paths::open_private(&log_path, crate::paths::Open::Truncate).map_err(|e| {
        let _ = std::fs::remove_dir_all(&dir);
        disk_full_explained(home, e)
    })?;
    let mut cmd = std::process::Command::new(&command[0]);
    cmd.args(&command[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log)
        .env("MOAT_HOME", home);
    detach(&mut cmd);
    let mut child = cmd.spawn().map_err(|e| {
        let message = format!(
            "cannot start the run's supervisor ({}): {e}",
            command[0].to_string_lossy()
        );
        let _ = update_meta(&dir, |m| {
            m.state = RunState::Failed;
            m.error = Some(message.clone());
        });
        Error::new(ErrorKind::Runtime, message)
    })?;
    let handoff = Handoff {
        home: home.to_path_buf(),
        id: meta.id.clone(),
        plan,
        launcher: command
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect(),
        guard: false,
        hold,
    };
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| Error::new(ErrorKind::Internal, "the supervisor has no input pipe"))?;
    serde_json::to_writer(&mut stdin, &handoff)
        .map_err(std::io::Error::other)
        .and_then(|()| stdin.write_all(b"\n"))
        .and_then(|()| stdin.flush())
        .map_err(|e| {
            Error::new(
                ErrorKind::Runtime,
                format!("cannot hand the run to its supervisor: {e}"),
            )
        })?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| Error::new(ErrorKind::Internal, "the supervisor has no output pipe"))?;
    // Reap the supervisor when it exits, so it never lingers as a zombie
    // of a long-lived caller (a Python harness).
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    let mut events = std::io::BufReader::new(stdout).lines();
    match follow_events(&mut events, home, &dir, &log_path, progress)? {
        Followed::Ready => {
            // Not held: the supervisor's input ends here.
            drop(stdin);
            Ok(Launched::Ready(load_meta(&dir)?))
        }
        Followed::Created => Ok(Launched::Held(Held {
            meta: load_meta(&dir)?,
            dir,
            home: home.to_path_buf(),
            log_path,
            stdin,
            events,
        })),
    }
}

/// A fallback `moat` program is run only when it, and the directory it is
/// in, belong to root or to this user and nobody else may write them: a
/// library linked into a program under `/tmp/x/` must not run whatever
/// another user put in `/tmp/bin/moat`.
fn trusted_program(path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    let safe = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| (m.uid() == 0 || m.uid() == me) && m.mode() & 0o022 == 0)
    };
    path.is_file() && safe(path) && path.parent().is_some_and(safe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_anything_is_created() {
        let home = tempfile::tempdir().unwrap();
        let mut spec = RunPlan::from_config(crate::config::Config::defaults(home.path())).unwrap();
        spec.name = Some("Bad Name!".into());
        let err = start(
            home.path(),
            &spec,
            &Launcher::new(vec!["/bin/false".into()]),
            &mut |_| {},
        )
        .unwrap_err();
        assert!(err.to_string().contains("run name"), "{err}");
        assert!(!runs_dir(home.path()).exists());
    }
}
