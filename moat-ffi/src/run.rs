//! Runs from C: `moat_run_options_*`, `moat_run_start`, `moat_run_follow`
//! (a log callback), `moat_run_wait`, `moat_run_stop`, `moat_run_json`,
//! `moat_run_destroy`, `moat_run_free`.

use std::ffi::{c_char, c_int, c_void, CString};
use std::path::PathBuf;
use std::ptr;
use std::time::Duration;

use moat_core::config::Overrides;
use moat_core::run::{self, logs, Launcher, RunMeta, RunPlan};

use crate::{
    arg_str, cstring, guard, home_or_default, moat_error, moat_status, null_arg, out_ptr, shield,
    to_json,
};

/// Options for `moat_run_start`. Create with `moat_run_options_new`, free
/// with `moat_run_options_free`.
#[derive(Debug, Default)]
pub struct moat_run_options {
    workspace: PathBuf,
    overrides: Overrides,
    home: Option<PathBuf>,
    supervisor: Option<PathBuf>,
    /// `"agent"`: a known agent's preset (`claude`), and its options.
    agent: Option<(moat_core::agent::Agent, moat_core::agent::AgentOptions)>,
}

/// A run: one container execution and its artifacts. Free with
/// `moat_run_free` (which does not stop it).
#[derive(Debug)]
pub struct moat_run {
    home: PathBuf,
    meta: RunMeta,
    id: CString,
    name: CString,
    dir: CString,
}

/// Documents `moat_run_json` can return.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum moat_run_doc {
    /// What is known about the run (`run.json`): state, exit code, ...
    MOAT_RUN_INFO = 0,
    /// The network trace: one object per request.
    MOAT_RUN_TRACE = 1,
}

/// Called with each chunk of a run's output: `stream` is `"stdout"`,
/// `"stderr"` or `"moat"`; `data` holds `len` bytes (not NUL-terminated).
/// Return 0 to go on, anything else to stop following.
pub type moat_log_callback = Option<
    unsafe extern "C" fn(
        user: *mut c_void,
        stream: *const c_char,
        data: *const u8,
        len: usize,
    ) -> c_int,
>;

/// New run options for the workspace `workspace` (NULL: the current
/// directory). Its agent.yaml, if any, is read when the run starts. Returns
/// NULL when `workspace` is not valid UTF-8.
///
/// # Safety
/// `workspace` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn moat_run_options_new(workspace: *const c_char) -> *mut moat_run_options {
    shield("moat_run_options_new", ptr::null_mut(), || {
        // SAFETY: forwarded from the caller.
        let workspace = match unsafe { crate::opt_str(workspace, "workspace") } {
            Ok(w) => w.unwrap_or("."),
            Err(_) => return std::ptr::null_mut(),
        };
        let options = moat_run_options {
            workspace: PathBuf::from(workspace),
            ..moat_run_options::default()
        };
        Box::into_raw(Box::new(options))
    })
}

/// Frees run options. NULL is ignored.
///
/// # Safety
/// `options` is NULL or a handle from `moat_run_options_new`, not yet freed.
#[no_mangle]
pub unsafe extern "C" fn moat_run_options_free(options: *mut moat_run_options) {
    shield("moat_run_options_free", (), || {
        if !options.is_null() {
            // SAFETY: created by Box::into_raw, freed once.
            drop(unsafe { Box::from_raw(options) });
        }
    })
}

/// Sets one option: `"image"`, `"name"`, `"policy"` (`permissive` or
/// `strict`), `"runtime"` (`docker` or `podman`), `"home"` (the moat home),
/// `"supervisor"` (the path of the `moat` program that supervises runs;
/// default `$MOAT_SUPERVISOR`, else `moat` beside the program, else
/// `../bin/moat` from the directory libmoat was loaded from, else on
/// `PATH`), or `"agent"` (`claude`: the Claude Code preset, as `moat
/// claude`; then `"prompt"` runs `claude -p PROMPT`, without it the run is
/// interactive, `"claude_version"` picks Claude Code's version, and `"arg"`
/// words are claude's arguments).
///
/// # Safety
/// `options` is a live handle; `key` and `value` are NUL-terminated strings;
/// `out_error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_run_options_set(
    options: *mut moat_run_options,
    key: *const c_char,
    value: *const c_char,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_run_options_set", || {
            let options = options.as_mut().ok_or_else(|| null_arg("options"))?;
            let key = arg_str(key, "key")?;
            let value = arg_str(value, "value")?.to_string();
            match key {
                "image" => options.overrides.image = Some(value),
                "name" => options.overrides.name = Some(value),
                "policy" => options.overrides.policy = Some(value),
                "runtime" => options.overrides.runtime = Some(value),
                "home" => options.home = Some(PathBuf::from(value)),
                "supervisor" => options.supervisor = Some(PathBuf::from(value)),
                "agent" => {
                    let agent: moat_core::agent::Agent = value.parse().map_err(|e: String| {
                        moat_error::plain(moat_status::MOAT_ERR_INVALID_ARGUMENT, &format!("agent: {e}"))
                    })?;
                    // Words already given as "arg" become the agent's.
                    let args = options.overrides.command.take().unwrap_or_default();
                    let (chosen, agent_options) =
                        options.agent.get_or_insert_with(|| (agent, Default::default()));
                    *chosen = agent;
                    agent_options.args.extend(args);
                }
                "prompt" | "claude_version" => {
                    let Some((_, claude)) = options.agent.as_mut() else {
                        return Err(moat_error::plain(
                            moat_status::MOAT_ERR_INVALID_ARGUMENT,
                            &format!("run option \"{key}\" is for an agent: set \"agent\" to \"claude\" first"),
                        ));
                    };
                    if key == "prompt" {
                        claude.prompt = Some(value);
                    } else {
                        claude.version = Some(value);
                    }
                }
                other => {
                    return Err(moat_error::plain(
                        moat_status::MOAT_ERR_INVALID_ARGUMENT,
                        &format!("unknown run option \"{other}\" (expected image, name, policy, runtime, home, supervisor, agent, prompt, claude_version)"),
                    ))
                }
            }
            Ok(())
        })
    }
}

/// Adds to a list option: `"grant"` (a grant name), `"allow"` (a strict-mode
/// host pattern), `"env"` (`KEY=VALUE`) or `"arg"` (the next word of the
/// command; the first `arg` replaces agent.yaml's command).
///
/// # Safety
/// `options` is a live handle; `key` and `value` are NUL-terminated strings;
/// `out_error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_run_options_add(
    options: *mut moat_run_options,
    key: *const c_char,
    value: *const c_char,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_run_options_add", || {
            let options = options.as_mut().ok_or_else(|| null_arg("options"))?;
            let key = arg_str(key, "key")?;
            let value = arg_str(value, "value")?.to_string();
            let r = &mut options.overrides;
            match key {
                "grant" => r.grants.push(value),
                "allow" => r.allow.push(value),
                "arg" => match options.agent.as_mut() {
                    Some((_, agent)) => agent.args.push(value),
                    None => r.command.get_or_insert_with(Vec::new).push(value),
                },
                "env" => {
                    if !value.contains('=') {
                        return Err(moat_error::plain(
                            moat_status::MOAT_ERR_INVALID_ARGUMENT,
                            &format!("env \"{value}\" must look like KEY=VALUE"),
                        ));
                    }
                    r.env.push(value);
                }
                other => {
                    return Err(moat_error::plain(
                        moat_status::MOAT_ERR_INVALID_ARGUMENT,
                        &format!(
                            "unknown run list option \"{other}\" (expected grant, allow, env, arg)"
                        ),
                    ))
                }
            }
            Ok(())
        })
    }
}

fn handle(home: PathBuf, meta: RunMeta) -> moat_run {
    moat_run {
        id: cstring(&meta.id),
        name: cstring(&meta.name),
        dir: cstring(&run::run_dir(&home, &meta.id).to_string_lossy()),
        home,
        meta,
    }
}

/// Starts a run; returns once its container has started (or setup failed,
/// with the reason: a missing grant, an engine that does not answer, an
/// image that cannot be pulled, strict mode that cannot be enforced).
///
/// # Safety
/// `options` is a live handle; `out_run` is valid for a write; `out_error`
/// is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_run_start(
    options: *const moat_run_options,
    out_run: *mut *mut moat_run,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_run_start", || {
            let options = options.as_ref().ok_or_else(|| null_arg("options"))?;
            let out_run = out_ptr(out_run, "out_run")?;
            let home = home_or_default(options.home.as_ref().and_then(|h| h.to_str()))?;
            let launcher = match &options.supervisor {
                Some(p) => Launcher::new(vec![p.clone().into(), "_supervise".into()]),
                None => Launcher {
                    fallbacks: crate::install::supervisors(),
                    ..Launcher::default()
                },
            };
            let meta = match &options.agent {
                Some((agent, agent_options)) => RunPlan::agent(
                    *agent,
                    &options.workspace,
                    &options.overrides,
                    agent_options,
                ),
                None => RunPlan::new(&options.workspace, &options.overrides),
            }
            .and_then(|plan| run::start(&home, &plan, &launcher, &mut |_| {}))
            .map_err(|e| moat_error::from_error(&e))?;
            *out_run = Box::into_raw(Box::new(handle(home, meta)));
            Ok(())
        })
    }
}

/// Opens an existing run by id, id prefix or name (NULL: the most recent).
///
/// # Safety
/// `reference` and `home` are NULL or NUL-terminated strings; `out_run` is
/// valid for a write; `out_error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_run_open(
    reference: *const c_char,
    home: *const c_char,
    out_run: *mut *mut moat_run,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_run_open", || {
            let out_run = out_ptr(out_run, "out_run")?;
            let home = home_or_default(crate::opt_str(home, "home")?)?;
            let meta = run::find(&home, crate::opt_str(reference, "reference")?)
                .map_err(|e| moat_error::from_error(&e))?;
            *out_run = Box::into_raw(Box::new(handle(home, meta)));
            Ok(())
        })
    }
}

/// The run's id (`run_` + 12 hex digits). NULL for a NULL handle.
///
/// # Safety
/// `run` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn moat_run_id(run: *const moat_run) -> *const c_char {
    shield("moat_run_id", ptr::null(), || {
        // SAFETY: NULL or live.
        unsafe { run.as_ref() }.map_or(std::ptr::null(), |r| r.id.as_ptr())
    })
}

/// The run's name. NULL for a NULL handle.
///
/// # Safety
/// `run` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn moat_run_name(run: *const moat_run) -> *const c_char {
    shield("moat_run_name", ptr::null(), || {
        // SAFETY: NULL or live.
        unsafe { run.as_ref() }.map_or(std::ptr::null(), |r| r.name.as_ptr())
    })
}

/// The run's directory of artifacts (its audit log is there too: pass it to
/// `moat_audit_verify`). NULL for a NULL handle.
///
/// # Safety
/// `run` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn moat_run_dir(run: *const moat_run) -> *const c_char {
    shield("moat_run_dir", ptr::null(), || {
        // SAFETY: NULL or live.
        unsafe { run.as_ref() }.map_or(std::ptr::null(), |r| r.dir.as_ptr())
    })
}

/// Gives each chunk of the run's output, from the start, to `callback`
/// until the run ends (or the callback returns non-zero).
///
/// # Safety
/// `run` is a live handle; `callback` is a valid function; `user` is passed
/// through; `out_error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_run_follow(
    run: *const moat_run,
    callback: moat_log_callback,
    user: *mut c_void,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_run_follow", || {
            let run = run.as_ref().ok_or_else(|| null_arg("run"))?;
            let callback = callback.ok_or_else(|| null_arg("callback"))?;
            let dir = run::run_dir(&run.home, &run.meta.id);
            let mut watch = run::Watch::new(&run.home, &run.meta.id);
            let mut done = || watch.is_over();
            let stdout = c"stdout";
            let stderr = c"stderr";
            let note = c"moat";
            let mut each = |chunk: logs::Chunk| {
                let stream = match chunk.stream {
                    logs::Stream::Stdout => stdout,
                    logs::Stream::Stderr => stderr,
                    logs::Stream::Moat => note,
                };
                // SAFETY: the caller promised a valid callback.
                callback(user, stream.as_ptr(), chunk.data.as_ptr(), chunk.data.len()) == 0
            };
            logs::follow(&dir.join("logs.jsonl"), 0, &mut done, &mut each)
                .map(|_| ())
                .map_err(|e| moat_error::from_error(&e))
        })
    }
}

/// Waits for the run to end, at most `timeout_ms` milliseconds (negative:
/// no limit). `*out_done` (when not NULL) is true when it ended, false on
/// timeout;
/// `*out_exit_code` (when not NULL) is its exit code, or -1 when none.
///
/// # Safety
/// `run` is a live handle; the outputs are NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_run_wait(
    run: *mut moat_run,
    timeout_ms: i64,
    out_done: *mut bool,
    out_exit_code: *mut i64,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_run_wait", || {
            let run = run.as_mut().ok_or_else(|| null_arg("run"))?;
            let timeout = u64::try_from(timeout_ms).ok().map(Duration::from_millis);
            let meta = run::wait(&run.home, &run.meta.id, timeout)
                .map_err(|e| moat_error::from_error(&e))?;
            if !out_done.is_null() {
                *out_done = meta.state.is_terminal();
            }
            if !out_exit_code.is_null() {
                *out_exit_code = meta.exit_code.unwrap_or(-1);
            }
            run.meta = meta;
            Ok(())
        })
    }
}

/// Stops the run: SIGTERM, then SIGKILL after `grace_secs`; waits for it
/// to end.
///
/// # Safety
/// `run` is a live handle; `out_error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_run_stop(
    run: *mut moat_run,
    grace_secs: u32,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_run_stop", || {
            let run = run.as_mut().ok_or_else(|| null_arg("run"))?;
            run.meta = run::stop(&run.home, &run.meta, grace_secs)
                .map_err(|e| moat_error::from_error(&e))?;
            Ok(())
        })
    }
}

/// Writes a document about the run as JSON to `*out_json` (free it with
/// `moat_string_free`). `doc` is a `moat_run_doc` value, taken as an int so
/// that any other value is an error, not undefined behaviour.
///
/// # Safety
/// `run` is a live handle; `out_json` is valid for a write; `out_error` is
/// NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_run_json(
    run: *mut moat_run,
    doc: c_int,
    out_json: *mut *mut c_char,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_run_json", || {
            let run = run.as_mut().ok_or_else(|| null_arg("run"))?;
            let out_json = out_ptr(out_json, "out_json")?;
            let doc = match doc {
                0 => moat_run_doc::MOAT_RUN_INFO,
                1 => moat_run_doc::MOAT_RUN_TRACE,
                other => {
                    return Err(moat_error::plain(
                        moat_status::MOAT_ERR_INVALID_ARGUMENT,
                        &format!("doc {other} is not a moat_run_doc"),
                    ))
                }
            };
            let json = match doc {
                moat_run_doc::MOAT_RUN_INFO => {
                    let meta = run::load_meta(&run::run_dir(&run.home, &run.meta.id))
                        .map(|m| run::refresh(&run.home, m))
                        .map_err(|e| moat_error::from_error(&e))?;
                    run.meta = meta;
                    to_json(&run.meta)?
                }
                moat_run_doc::MOAT_RUN_TRACE => to_json(
                    &run::trace(&run.home, &run.meta.id).map_err(|e| moat_error::from_error(&e))?,
                )?,
            };
            *out_json = json.into_raw();
            Ok(())
        })
    }
}

/// Removes the run and its artifacts (stopping it first). The handle stays
/// to be freed.
///
/// # Safety
/// `run` is a live handle; `out_error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_run_destroy(
    run: *mut moat_run,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_run_destroy", || {
            let run = run.as_mut().ok_or_else(|| null_arg("run"))?;
            run::destroy(&run.home, &run.meta.id).map_err(|e| moat_error::from_error(&e))
        })
    }
}

/// Frees a run handle (the run itself goes on). NULL is ignored.
///
/// # Safety
/// `run` is NULL or a handle from `moat_run_start`/`moat_run_open`, not yet
/// freed.
#[no_mangle]
pub unsafe extern "C" fn moat_run_free(run: *mut moat_run) {
    shield("moat_run_free", (), || {
        if !run.is_null() {
            // SAFETY: created by Box::into_raw, freed once.
            drop(unsafe { Box::from_raw(run) });
        }
    })
}
