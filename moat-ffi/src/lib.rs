//! The C ABI of moat (`libmoat`, header `include/moat.h`).
//!
//! Conventions, after rustls-ffi:
//! - Opaque handles (`moat_config`, `moat_error`), created and freed by moat.
//! - Every function checks its pointers for NULL and returns a stable
//!   [`moat_status`]; outputs are written only on success.
//! - Fallible functions take an optional `moat_error **out_error`; on failure
//!   it receives an error object carrying the message and, for configuration
//!   errors, the file, line and column. Free it with `moat_error_free`.
//! - Every export runs inside a panic boundary (`guard` for those that
//!   return a status, `shield` for getters and `_free`s, which give NULL, 0
//!   or nothing): a panic never unwinds into C nor aborts the host process.
//!   A test checks that no export is left outside.
//! - Required output pointers are checked by one helper (`out_ptr`);
//!   optional ones (`out_done`, `out_exit_code`, ...) may be NULL. Flags are
//!   `bool`, counts `size_t`, exit codes `int64_t`.
//! - An error holds every problem with its parts (`moat_error_count`,
//!   `moat_error_item_message` without the location prefix, `_path`,
//!   `_line`, `_column`), and `moat_error_message` all of them for a person.
//! - SIGPIPE: the first fallible call ignores it when it is at its default
//!   (a closed connection must not end the host program); a handler the
//!   program installed is kept.
//! - Strings returned as `const char *` belong to their handle and live as
//!   long as it; strings returned through `char **` are freed with
//!   `moat_string_free`.
//!
//! No logic lives here: every decision is moat-core's.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::ptr;

use moat_core::blocking::{BlockingProxy, ProxyOptions};
use moat_core::config::Config;
use moat_core::proxy::Credential;
use moat_core::{Error, ErrorKind};

mod install;
mod run;
pub use run::*;

/// Major version of moat; matches `Cargo.toml`.
pub const MOAT_VERSION_MAJOR: u32 = 0;
/// Minor version of moat; matches `Cargo.toml`.
pub const MOAT_VERSION_MINOR: u32 = 1;
/// Patch version of moat; matches `Cargo.toml`.
pub const MOAT_VERSION_PATCH: u32 = 0;

/// The result of every fallible moat function. Values are stable.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum moat_status {
    /// Success.
    MOAT_OK = 0,
    /// A configuration file or override is invalid.
    MOAT_ERR_CONFIG = 1,
    /// Reading or writing a file failed.
    MOAT_ERR_IO = 2,
    /// An argument is invalid (including a required pointer that is NULL).
    MOAT_ERR_INVALID_ARGUMENT = 3,
    /// A bug in moat.
    MOAT_ERR_INTERNAL = 4,
    /// A panic inside moat was caught at the C boundary (a bug in moat).
    MOAT_ERR_PANIC = 5,
    /// The container engine is unreachable or refused, or a run could not be
    /// set up or managed.
    MOAT_ERR_RUNTIME = 6,
}

fn status_of(kind: ErrorKind) -> moat_status {
    match kind {
        ErrorKind::Config => moat_status::MOAT_ERR_CONFIG,
        ErrorKind::Io => moat_status::MOAT_ERR_IO,
        ErrorKind::InvalidArgument => moat_status::MOAT_ERR_INVALID_ARGUMENT,
        ErrorKind::Internal => moat_status::MOAT_ERR_INTERNAL,
        ErrorKind::Runtime => moat_status::MOAT_ERR_RUNTIME,
    }
}

/// A validated configuration. Free with `moat_config_free`.
#[derive(Debug)]
pub struct moat_config {
    inner: Config,
    name: Option<CString>,
    image: CString,
}

/// An error: status, message and optional location, and each of its
/// problems with its parts (a configuration has one per mistake). Free
/// with `moat_error_free`.
#[derive(Debug)]
pub struct moat_error {
    status: moat_status,
    message: CString,
    path: Option<CString>,
    line: u32,
    column: u32,
    items: Vec<ErrorItem>,
}

/// One problem: its message without a location prefix, and its location.
#[derive(Debug)]
struct ErrorItem {
    message: CString,
    path: Option<CString>,
    line: u32,
    column: u32,
}

fn cstring(s: &str) -> CString {
    CString::new(s.replace('\0', "\u{FFFD}")).unwrap_or_default()
}

impl moat_error {
    fn from_error(err: &Error) -> moat_error {
        let loc = err.location();
        moat_error {
            status: status_of(err.kind()),
            message: cstring(&if err.diagnostics().is_empty() {
                err.to_string()
            } else {
                err.diagnostics()
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            }),
            path: loc.map(|l| cstring(&l.path.to_string_lossy())),
            line: loc.map_or(0, |l| l.line),
            column: loc.map_or(0, |l| l.column),
            items: err
                .diagnostics()
                .iter()
                .map(|d| ErrorItem {
                    message: cstring(&d.message),
                    path: d
                        .location
                        .as_ref()
                        .map(|l| cstring(&l.path.to_string_lossy())),
                    line: d.location.as_ref().map_or(0, |l| l.line),
                    column: d.location.as_ref().map_or(0, |l| l.column),
                })
                .collect(),
        }
    }

    fn plain(status: moat_status, message: &str) -> moat_error {
        moat_error {
            status,
            message: cstring(message),
            path: None,
            line: 0,
            column: 0,
            items: vec![ErrorItem {
                message: cstring(message),
                path: None,
                line: 0,
                column: 0,
            }],
        }
    }
}

/// Stores `err` in `*out_error` when the caller asked for it; returns its status.
///
/// # Safety
/// `out_error` is NULL or valid for a write.
unsafe fn fail(out_error: *mut *mut moat_error, err: moat_error) -> moat_status {
    let status = err.status;
    if !out_error.is_null() {
        // SAFETY: checked non-null; the caller promises it is writable.
        unsafe { *out_error = Box::into_raw(Box::new(err)) };
    }
    status
}

/// Runs `f` inside the panic boundary.
///
/// # Safety
/// `out_error` is NULL or valid for a write.
unsafe fn guard(
    out_error: *mut *mut moat_error,
    what: &str,
    f: impl FnOnce() -> Result<(), moat_error>,
) -> moat_status {
    ignore_sigpipe();
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => moat_status::MOAT_OK,
        // SAFETY: forwarded from the caller.
        Ok(Err(err)) => unsafe { fail(out_error, err) },
        Err(_) => {
            let err = moat_error::plain(
                moat_status::MOAT_ERR_PANIC,
                &format!("internal error: moat panicked in {what}; please report this bug"),
            );
            // SAFETY: forwarded from the caller.
            unsafe { fail(out_error, err) }
        }
    }
}

/// libmoat's threads write to sockets whose peers may have gone; in a C or
/// Go program SIGPIPE is at its default, which would end the host process
/// for what is only a closed connection (Rust programs and Python ignore
/// it). Once, before the first fallible call does any work: ignored when
/// it is at the default; a handler the program set is left alone.
fn ignore_sigpipe() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: sigaction with a NULL new action only reads the current
        // one into a zeroed struct; signal() sets SIG_IGN, a valid action.
        unsafe {
            let mut current: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGPIPE, ptr::null(), &mut current) == 0
                && current.sa_sigaction == libc::SIG_DFL
            {
                libc::signal(libc::SIGPIPE, libc::SIG_IGN);
            }
        }
    });
}

/// Runs `f`, an export that cannot report an error (a getter, a `_free`),
/// inside the panic boundary: a panic gives `fallback` (NULL, 0,
/// `MOAT_ERR_PANIC`, nothing), never an unwind into C.
fn shield<R>(what: &str, fallback: R, f: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(value) => value,
        Err(_) => {
            // The host process keeps going; say once where moat broke.
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                format!("moat: internal error: a panic in {what} was stopped at the C boundary; please report this bug\n").as_bytes(),
            );
            fallback
        }
    }
}

/// An output pointer the caller must give: the place to write, or the
/// error naming it.
///
/// # Safety
/// `ptr` is NULL or valid for a write of `T`.
unsafe fn out_ptr<'a, T>(ptr: *mut T, name: &str) -> Result<&'a mut T, moat_error> {
    // SAFETY: NULL or valid for a write, by the caller's promise.
    unsafe { ptr.as_mut() }.ok_or_else(|| null_arg(name))
}

/// Reads a required C string argument.
///
/// # Safety
/// `ptr` is NULL or a NUL-terminated string.
unsafe fn arg_str<'a>(ptr: *const c_char, name: &str) -> Result<&'a str, moat_error> {
    if ptr.is_null() {
        return Err(moat_error::plain(
            moat_status::MOAT_ERR_INVALID_ARGUMENT,
            &format!("{name} is NULL"),
        ));
    }
    // SAFETY: non-null and NUL-terminated by the caller's promise.
    unsafe { CStr::from_ptr(ptr) }.to_str().map_err(|_| {
        moat_error::plain(
            moat_status::MOAT_ERR_INVALID_ARGUMENT,
            &format!("{name} is not valid utf-8"),
        )
    })
}

fn null_arg(name: &str) -> moat_error {
    moat_error::plain(
        moat_status::MOAT_ERR_INVALID_ARGUMENT,
        &format!("{name} is NULL"),
    )
}

/// The version of moat as a static string, such as `"0.1.0"`.
#[no_mangle]
pub extern "C" fn moat_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// Loads and validates the configuration of `workspace` (a directory, or the
/// path of its `agent.yaml` / `moat.yaml`). On success writes a new handle to
/// `*out_config`; on failure writes an error to `*out_error` if it is not
/// NULL. The image is resolved now: with `dependencies:`, a
/// `MOAT_DEPS_REGISTRY` that is not UTF-8 fails with
/// `MOAT_ERR_INVALID_ARGUMENT`.
///
/// # Safety
/// `workspace` is a NUL-terminated string; `out_config` is valid for a write;
/// `out_error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_config_load(
    workspace: *const c_char,
    out_config: *mut *mut moat_config,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_config_load", || {
            let workspace = arg_str(workspace, "workspace")?;
            let out_config = out_ptr(out_config, "out_config")?;
            let config = moat_core::blocking::load_config(&PathBuf::from(workspace))
                .map_err(|e| moat_error::from_error(&e))?;
            let (image, _) = config
                .resolved_image()
                .map_err(|e| moat_error::from_error(&e))?;
            let handle = moat_config {
                name: config.name.as_deref().map(cstring),
                image: cstring(&image),
                inner: config,
            };
            *out_config = Box::into_raw(Box::new(handle));
            Ok(())
        })
    }
}

/// The agent's name, or NULL when the configuration names none.
///
/// # Safety
/// `config` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn moat_config_name(config: *const moat_config) -> *const c_char {
    shield("moat_config_name", ptr::null(), || {
        // SAFETY: NULL or a live handle, by the caller's promise.
        match unsafe { config.as_ref() }.and_then(|c| c.name.as_ref()) {
            Some(name) => name.as_ptr(),
            None => ptr::null(),
        }
    })
}

/// The resolved image (`image:`, else from `dependencies`, else
/// `ubuntu:22.04`); NULL only when `config` is NULL.
///
/// # Safety
/// `config` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn moat_config_image(config: *const moat_config) -> *const c_char {
    shield("moat_config_image", ptr::null(), || {
        // SAFETY: NULL or a live handle, by the caller's promise.
        match unsafe { config.as_ref() } {
            Some(c) => c.image.as_ptr(),
            None => ptr::null(),
        }
    })
}

/// The resolved configuration as JSON (the output of `moat config --json`).
/// On success writes a new string to `*out_json`; free it with
/// `moat_string_free`.
///
/// # Safety
/// `config` is NULL or a live handle; `out_json` is valid for a write;
/// `out_error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_config_to_json(
    config: *const moat_config,
    out_json: *mut *mut c_char,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_config_to_json", || {
            let config = config.as_ref().ok_or_else(|| null_arg("config"))?;
            let out_json = out_ptr(out_json, "out_json")?;
            let resolved = config
                .inner
                .resolved()
                .map_err(|e| moat_error::from_error(&e))?;
            let json = serde_json::to_string(&resolved).map_err(|e| {
                moat_error::plain(
                    moat_status::MOAT_ERR_INTERNAL,
                    &format!("cannot encode json: {e}"),
                )
            })?;
            *out_json = cstring(&json).into_raw();
            Ok(())
        })
    }
}

/// Resolves the configuration's `secrets:` on this host (`op read`, `aws ssm
/// get-parameter`) and writes `{"NAME": "value", ...}` to `*out_json`; free
/// it with `moat_string_free` (it holds secret values: clear it after use).
/// A failed lookup is `MOAT_ERR_CONFIG`, naming the variable and backend.
///
/// # Safety
/// `config` is NULL or a live handle; `out_json` is valid for a write;
/// `out_error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_config_resolve_secrets_json(
    config: *const moat_config,
    out_json: *mut *mut c_char,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_config_resolve_secrets_json", || {
            let config = config.as_ref().ok_or_else(|| null_arg("config"))?;
            let out_json = out_ptr(out_json, "out_json")?;
            let resolved = moat_core::secrets::resolve(&config.inner.secrets)
                .map_err(|e| moat_error::from_error(&e))?;
            let map: std::collections::BTreeMap<&str, &str> = resolved
                .iter()
                .map(|(k, v)| (k.as_str(), v.expose().as_str()))
                .collect();
            *out_json = to_json(&map)?.into_raw();
            Ok(())
        })
    }
}

/// Frees a configuration handle. NULL is ignored.
///
/// # Safety
/// `config` is NULL or a handle from `moat_config_load`, not yet freed.
#[no_mangle]
pub unsafe extern "C" fn moat_config_free(config: *mut moat_config) {
    shield("moat_config_free", (), || {
        if !config.is_null() {
            // SAFETY: created by Box::into_raw in moat_config_load, freed once.
            drop(unsafe { Box::from_raw(config) });
        }
    })
}

/// Frees a string returned through a `char **` output. NULL is ignored.
///
/// # Safety
/// `s` is NULL or a string from moat, not yet freed.
#[no_mangle]
pub unsafe extern "C" fn moat_string_free(s: *mut c_char) {
    shield("moat_string_free", (), || {
        if !s.is_null() {
            // SAFETY: created by CString::into_raw, freed once.
            drop(unsafe { CString::from_raw(s) });
        }
    })
}

/// The status this error stands for.
///
/// # Safety
/// `err` is NULL or a live error.
#[no_mangle]
pub unsafe extern "C" fn moat_error_status(err: *const moat_error) -> moat_status {
    shield("moat_error_status", moat_status::MOAT_ERR_PANIC, || {
        // SAFETY: NULL or live, by the caller's promise.
        match unsafe { err.as_ref() } {
            Some(e) => e.status,
            None => moat_status::MOAT_ERR_INVALID_ARGUMENT,
        }
    })
}

/// The full message, for a person: every problem, one per line, each
/// prefixed with `path:line:column: ` when it has a location. A program that
/// shows locations itself reads the parts instead (`moat_error_count`,
/// `moat_error_item_message`, `_path`, `_line`, `_column`). Never NULL for a
/// non-NULL error.
///
/// # Safety
/// `err` is NULL or a live error.
#[no_mangle]
pub unsafe extern "C" fn moat_error_message(err: *const moat_error) -> *const c_char {
    shield("moat_error_message", ptr::null(), || {
        // SAFETY: NULL or live, by the caller's promise.
        match unsafe { err.as_ref() } {
            Some(e) => e.message.as_ptr(),
            None => ptr::null(),
        }
    })
}

/// The file the error is in, or NULL when it has no location.
///
/// # Safety
/// `err` is NULL or a live error.
#[no_mangle]
pub unsafe extern "C" fn moat_error_path(err: *const moat_error) -> *const c_char {
    shield("moat_error_path", ptr::null(), || {
        // SAFETY: NULL or live, by the caller's promise.
        match unsafe { err.as_ref() }.and_then(|e| e.path.as_ref()) {
            Some(p) => p.as_ptr(),
            None => ptr::null(),
        }
    })
}

/// The 1-based line of the error, or 0 when it has no location.
///
/// # Safety
/// `err` is NULL or a live error.
#[no_mangle]
pub unsafe extern "C" fn moat_error_line(err: *const moat_error) -> u32 {
    shield("moat_error_line", 0, || {
        // SAFETY: NULL or live, by the caller's promise.
        unsafe { err.as_ref() }.map_or(0, |e| e.line)
    })
}

/// The 1-based column of the error, or 0 when it has no location.
///
/// # Safety
/// `err` is NULL or a live error.
#[no_mangle]
pub unsafe extern "C" fn moat_error_column(err: *const moat_error) -> u32 {
    shield("moat_error_column", 0, || {
        // SAFETY: NULL or live, by the caller's promise.
        unsafe { err.as_ref() }.map_or(0, |e| e.column)
    })
}

/// How many problems the error holds (at least 1; a configuration with
/// several mistakes has one each). 0 for NULL.
///
/// # Safety
/// `err` is NULL or a live error.
#[no_mangle]
pub unsafe extern "C" fn moat_error_count(err: *const moat_error) -> usize {
    shield("moat_error_count", 0, || {
        // SAFETY: NULL or live, by the caller's promise.
        unsafe { err.as_ref() }.map_or(0, |e| e.items.len())
    })
}

/// Problem `index` of `err`.
///
/// # Safety
/// `err` is NULL or a live error, which outlives the returned reference.
unsafe fn error_item<'a>(err: *const moat_error, index: usize) -> Option<&'a ErrorItem> {
    // SAFETY: NULL or live, by the caller's promise.
    unsafe { err.as_ref() }.and_then(|e| e.items.get(index))
}

/// The message of problem `index` (0-based, below `moat_error_count`),
/// without the `path:line:column: ` prefix that `moat_error_message` has;
/// NULL when out of range. It lives as long as the error.
///
/// # Safety
/// `err` is NULL or a live error.
#[no_mangle]
pub unsafe extern "C" fn moat_error_item_message(
    err: *const moat_error,
    index: usize,
) -> *const c_char {
    shield("moat_error_item_message", ptr::null(), || {
        unsafe { error_item(err, index) }.map_or(ptr::null(), |i| i.message.as_ptr())
    })
}

/// The file of problem `index`, or NULL when it has no location (or is out
/// of range).
///
/// # Safety
/// `err` is NULL or a live error.
#[no_mangle]
pub unsafe extern "C" fn moat_error_item_path(
    err: *const moat_error,
    index: usize,
) -> *const c_char {
    shield("moat_error_item_path", ptr::null(), || {
        unsafe { error_item(err, index) }
            .and_then(|i| i.path.as_ref())
            .map_or(ptr::null(), |p| p.as_ptr())
    })
}

/// The 1-based line of problem `index`, or 0 when it has no location.
///
/// # Safety
/// `err` is NULL or a live error.
#[no_mangle]
pub unsafe extern "C" fn moat_error_item_line(err: *const moat_error, index: usize) -> u32 {
    shield("moat_error_item_line", 0, || {
        unsafe { error_item(err, index) }.map_or(0, |i| i.line)
    })
}

/// The 1-based column of problem `index`, or 0 when it has no location.
///
/// # Safety
/// `err` is NULL or a live error.
#[no_mangle]
pub unsafe extern "C" fn moat_error_item_column(err: *const moat_error, index: usize) -> u32 {
    shield("moat_error_item_column", 0, || {
        unsafe { error_item(err, index) }.map_or(0, |i| i.column)
    })
}

/// Frees an error. NULL is ignored.
///
/// # Safety
/// `err` is NULL or an error from moat, not yet freed.
#[no_mangle]
pub unsafe extern "C" fn moat_error_free(err: *mut moat_error) {
    shield("moat_error_free", (), || {
        if !err.is_null() {
            // SAFETY: created by Box::into_raw in `fail`, freed once.
            drop(unsafe { Box::from_raw(err) });
        }
    })
}

/// Options for `moat_proxy_start`. Create with `moat_proxy_options_new`,
/// free with `moat_proxy_options_free`.
#[derive(Debug, Default)]
pub struct moat_proxy_options {
    inner: ProxyOptions,
}

/// A running proxy with one client. Free with `moat_proxy_free` (which also
/// stops it).
#[derive(Debug)]
pub struct moat_proxy {
    inner: BlockingProxy,
    url: CString,
    address: CString,
    ca_cert_path: CString,
}

/// Reads an optional C string argument (NULL is `None`).
///
/// # Safety
/// `ptr` is NULL or a NUL-terminated string.
unsafe fn opt_str<'a>(ptr: *const c_char, name: &str) -> Result<Option<&'a str>, moat_error> {
    if ptr.is_null() {
        Ok(None)
    } else {
        // SAFETY: forwarded from the caller.
        unsafe { arg_str(ptr, name) }.map(Some)
    }
}

/// # Safety
/// `options` is NULL or a live handle.
unsafe fn options_mut<'a>(
    options: *mut moat_proxy_options,
) -> Result<&'a mut moat_proxy_options, moat_error> {
    // SAFETY: NULL or live, by the caller's promise.
    unsafe { options.as_mut() }.ok_or_else(|| null_arg("options"))
}

/// New proxy options with the defaults: listen on 127.0.0.1 (a free port),
/// permissive policy, no credentials, the CA under `$MOAT_HOME`.
#[no_mangle]
pub extern "C" fn moat_proxy_options_new() -> *mut moat_proxy_options {
    shield("moat_proxy_options_new", ptr::null_mut(), || {
        Box::into_raw(Box::default())
    })
}

/// Frees proxy options. NULL is ignored.
///
/// # Safety
/// `options` is NULL or a handle from `moat_proxy_options_new`, not yet freed.
#[no_mangle]
pub unsafe extern "C" fn moat_proxy_options_free(options: *mut moat_proxy_options) {
    shield("moat_proxy_options_free", (), || {
        if !options.is_null() {
            // SAFETY: created by Box::into_raw, freed once.
            drop(unsafe { Box::from_raw(options) });
        }
    })
}

/// Sets the listen address (`host:port`), the moat home directory, the extra
/// upstream CA file, the policy (`"permissive"` or `"strict"`) or the client
/// name, how many bytes of text bodies traces keep (`"capture_bodies"`, a
/// decimal number; default 0), or a directory for the client's
/// tamper-evident audit log (`"audit_dir"`), or how many trace records and
/// audit events are kept in memory (`"trace_limit"`, a count, default
/// 100000; `"trace_bytes"`, default 33554432; the oldest go first): `key` is
/// one of `"listen"`, `"home"`, `"upstream_ca"`, `"policy"`, `"name"`,
/// `"capture_bodies"`, `"audit_dir"`, `"trace_limit"`, `"trace_bytes"`.
/// Numbers are checked now, other values by `moat_proxy_start`.
///
/// # Safety
/// `options` is a live handle; `key` and `value` are NUL-terminated strings;
/// `out_error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_proxy_options_set(
    options: *mut moat_proxy_options,
    key: *const c_char,
    value: *const c_char,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_proxy_options_set", || {
            let options = &mut options_mut(options)?.inner;
            let key = arg_str(key, "key")?;
            let value = arg_str(value, "value")?.to_string();
            match key {
                "listen" => options.listen = Some(value),
                "home" => options.home = Some(PathBuf::from(value)),
                "upstream_ca" => options.upstream_ca = Some(PathBuf::from(value)),
                "policy" => options.policy = Some(value),
                "name" => options.name = Some(value),
                "audit_dir" => options.audit_dir = Some(PathBuf::from(value)),
                "capture_bodies" => options.capture_bodies = number(key, &value)?,
                "trace_limit" => options.trace_limits.max_records = number(key, &value)?,
                "trace_bytes" => options.trace_limits.max_bytes = number(key, &value)?,
                other => {
                    return Err(moat_error::plain(
                        moat_status::MOAT_ERR_INVALID_ARGUMENT,
                        &format!(
                            "unknown proxy option \"{other}\" (expected listen, home, upstream_ca, policy, name, capture_bodies, audit_dir, trace_limit or trace_bytes)"
                        ),
                    ))
                }
            }
            Ok(())
        })
    }
}

/// A non-negative decimal number given for option `key`.
fn number(key: &str, value: &str) -> Result<usize, moat_error> {
    value.parse().map_err(|_| {
        moat_error::plain(
            moat_status::MOAT_ERR_INVALID_ARGUMENT,
            &format!("{key}: \"{value}\" is not a number"),
        )
    })
}

/// Adds a host pattern to the strict-mode allow list.
///
/// # Safety
/// `options` is a live handle; `pattern` is a NUL-terminated string;
/// `out_error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_proxy_options_add_allow(
    options: *mut moat_proxy_options,
    pattern: *const c_char,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_proxy_options_add_allow", || {
            let options = &mut options_mut(options)?.inner;
            options.allow.push(arg_str(pattern, "pattern")?.to_string());
            Ok(())
        })
    }
}

/// Adds a request rule (`network.rules`, docs/policy.md) for the host
/// pattern `host`: `rule` like `"allow GET /repos/**"` or `"deny git-push
/// refs/heads/main"`, added to `host`'s entry when the last entry is for
/// `host`, else to a new entry; NULL adds a plain host entry (reachable in
/// strict mode). A bad host or rule is an error at once.
///
/// # Safety
/// `options` is a live handle; `host` is a NUL-terminated string; `rule`
/// is NULL or one; `out_error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_proxy_options_add_rule(
    options: *mut moat_proxy_options,
    host: *const c_char,
    rule: *const c_char,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_proxy_options_add_rule", || {
            let options = &mut options_mut(options)?.inner;
            let host = arg_str(host, "host")?.to_string();
            let rule = opt_str(rule, "rule")?.map(str::to_string);
            let bad = |m: String| moat_error::plain(moat_status::MOAT_ERR_INVALID_ARGUMENT, &m);
            moat_core::policy::HostPattern::parse(&host)
                .map_err(|e| bad(format!("rule host: {e}")))?;
            if let Some(r) = &rule {
                moat_core::policy::rules::Rule::parse(r).map_err(bad)?;
            }
            match options.rules.last_mut() {
                Some((last, rules)) if *last == host && rule.is_some() => {
                    rules.extend(rule);
                }
                _ => options.rules.push((host, rule.into_iter().collect())),
            }
            Ok(())
        })
    }
}

/// Connects to `address` (`addr:port`) whenever `host_port` (`host:port`) is
/// requested, like curl's `--resolve`.
///
/// # Safety
/// `options` is a live handle; `host_port` and `address` are NUL-terminated
/// strings; `out_error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_proxy_options_add_resolve(
    options: *mut moat_proxy_options,
    host_port: *const c_char,
    address: *const c_char,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_proxy_options_add_resolve", || {
            let options = &mut options_mut(options)?.inner;
            let from = arg_str(host_port, "host_port")?.to_string();
            let to = arg_str(address, "address")?.to_string();
            options.resolve.push((from, to));
            Ok(())
        })
    }
}

/// Adds a stored grant (`github`, `anthropic`, a custom provider) whose
/// credentials the proxy injects; it is read from the credential store when
/// the proxy starts.
///
/// # Safety
/// `options` is a live handle; `grant` is a NUL-terminated string;
/// `out_error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_proxy_options_add_grant(
    options: *mut moat_proxy_options,
    grant: *const c_char,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_proxy_options_add_grant", || {
            let options = &mut options_mut(options)?.inner;
            options.grants.push(arg_str(grant, "grant")?.to_string());
            Ok(())
        })
    }
}

/// Adds a credential: `header: value` on requests to `host` (a host or
/// `*.` pattern, optionally `:port`; default 443). `grant` may be NULL. The
/// value is checked now and never appears in errors.
///
/// # Safety
/// `options` is a live handle; `host`, `header` and `value` are
/// NUL-terminated strings; `grant` is NULL or one; `out_error` is NULL or
/// valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_proxy_options_add_credential(
    options: *mut moat_proxy_options,
    host: *const c_char,
    header: *const c_char,
    value: *const c_char,
    grant: *const c_char,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_proxy_options_add_credential", || {
            let options = &mut options_mut(options)?.inner;
            let host = arg_str(host, "host")?;
            let header = arg_str(header, "header")?;
            let value = arg_str(value, "value")?;
            let grant = opt_str(grant, "grant")?;
            let mut cred =
                Credential::new(host, header, value).map_err(|e| moat_error::from_error(&e))?;
            if let Some(g) = grant {
                cred = cred.with_grant(g);
            }
            options.credentials.push(cred);
            Ok(())
        })
    }
}

/// Starts a proxy with `options` (which stay owned by the caller) and
/// registers one client. On success writes a new handle to `*out_proxy`.
///
/// # Safety
/// `options` is a live handle; `out_proxy` is valid for a write; `out_error`
/// is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_proxy_start(
    options: *const moat_proxy_options,
    out_proxy: *mut *mut moat_proxy,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_proxy_start", || {
            let options = options.as_ref().ok_or_else(|| null_arg("options"))?;
            let out_proxy = out_ptr(out_proxy, "out_proxy")?;
            let inner = BlockingProxy::start(options.inner.clone())
                .map_err(|e| moat_error::from_error(&e))?;
            let handle = moat_proxy {
                url: cstring(inner.url()),
                address: cstring(inner.address()),
                ca_cert_path: cstring(&inner.ca_cert_path().to_string_lossy()),
                inner,
            };
            *out_proxy = Box::into_raw(Box::new(handle));
            Ok(())
        })
    }
}

/// The proxy URL with the client's token (`http://moat:TOKEN@addr`).
///
/// # Safety
/// `proxy` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn moat_proxy_url(proxy: *const moat_proxy) -> *const c_char {
    shield("moat_proxy_url", ptr::null(), || {
        // SAFETY: NULL or live, by the caller's promise.
        unsafe { proxy.as_ref() }.map_or(ptr::null(), |p| p.url.as_ptr())
    })
}

/// The listen address, `host:port`.
///
/// # Safety
/// `proxy` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn moat_proxy_address(proxy: *const moat_proxy) -> *const c_char {
    shield("moat_proxy_address", ptr::null(), || {
        // SAFETY: NULL or live, by the caller's promise.
        unsafe { proxy.as_ref() }.map_or(ptr::null(), |p| p.address.as_ptr())
    })
}

/// The moat CA certificate clients must trust.
///
/// # Safety
/// `proxy` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn moat_proxy_ca_cert_path(proxy: *const moat_proxy) -> *const c_char {
    shield("moat_proxy_ca_cert_path", ptr::null(), || {
        // SAFETY: NULL or live, by the caller's promise.
        unsafe { proxy.as_ref() }.map_or(ptr::null(), |p| p.ca_cert_path.as_ptr())
    })
}

/// Which document `moat_proxy_json` returns.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum moat_proxy_doc {
    /// The environment a child process needs: a JSON object of strings.
    MOAT_PROXY_ENV = 0,
    /// The trace records so far: a JSON array of objects.
    MOAT_PROXY_TRACE = 1,
    /// The audit events so far: a JSON array of objects.
    MOAT_PROXY_AUDIT = 2,
    /// Counters: `{"dropped_records": N, "dropped_events": N}`, how many
    /// trace records and audit events were dropped from memory to stay
    /// within `trace_limit` and `trace_bytes`.
    MOAT_PROXY_STATS = 3,
}

/// Writes a JSON document about the proxy to `*out_json` (free it with
/// `moat_string_free`). `doc` is a `moat_proxy_doc` value, taken as an int
/// so that any other value is an error, not undefined behaviour. Trace and
/// audit stay readable after `moat_proxy_close`.
///
/// # Safety
/// `proxy` is NULL or a live handle; `out_json` is valid for a write;
/// `out_error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_proxy_json(
    proxy: *const moat_proxy,
    doc: std::ffi::c_int,
    out_json: *mut *mut c_char,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_proxy_json", || {
            let proxy = proxy.as_ref().ok_or_else(|| null_arg("proxy"))?;
            let out_json = out_ptr(out_json, "out_json")?;
            let doc = match doc {
                0 => moat_proxy_doc::MOAT_PROXY_ENV,
                1 => moat_proxy_doc::MOAT_PROXY_TRACE,
                2 => moat_proxy_doc::MOAT_PROXY_AUDIT,
                3 => moat_proxy_doc::MOAT_PROXY_STATS,
                other => {
                    return Err(moat_error::plain(
                        moat_status::MOAT_ERR_INVALID_ARGUMENT,
                        &format!("doc {other} is not a moat_proxy_doc"),
                    ))
                }
            };
            let json = match doc {
                moat_proxy_doc::MOAT_PROXY_ENV => {
                    let map: std::collections::BTreeMap<_, _> =
                        proxy.inner.env().iter().cloned().collect();
                    serde_json::to_string(&map)
                }
                moat_proxy_doc::MOAT_PROXY_TRACE => Ok(proxy.inner.trace_json()),
                moat_proxy_doc::MOAT_PROXY_AUDIT => Ok(proxy.inner.audit_json()),
                moat_proxy_doc::MOAT_PROXY_STATS => {
                    let (records, events) = proxy.inner.dropped();
                    serde_json::to_string(&serde_json::json!({
                        "dropped_records": records,
                        "dropped_events": events,
                    }))
                }
            }
            .map_err(|e| {
                moat_error::plain(
                    moat_status::MOAT_ERR_INTERNAL,
                    &format!("cannot encode json: {e}"),
                )
            })?;
            *out_json = cstring(&json).into_raw();
            Ok(())
        })
    }
}

/// Stops the proxy and waits for its connections to end. Closing twice is
/// fine; the handle stays valid until `moat_proxy_free`.
///
/// # Safety
/// `proxy` is NULL or a live handle; `out_error` is NULL or valid for a
/// write.
#[no_mangle]
pub unsafe extern "C" fn moat_proxy_close(
    proxy: *mut moat_proxy,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_proxy_close", || {
            let proxy = proxy.as_mut().ok_or_else(|| null_arg("proxy"))?;
            proxy.inner.close().map_err(|e| moat_error::from_error(&e))
        })
    }
}

/// Stops (if needed) and frees a proxy. NULL is ignored.
///
/// # Safety
/// `proxy` is NULL or a handle from `moat_proxy_start`, not yet freed.
#[no_mangle]
pub unsafe extern "C" fn moat_proxy_free(proxy: *mut moat_proxy) {
    shield("moat_proxy_free", (), || {
        if !proxy.is_null() {
            // SAFETY: created by Box::into_raw, freed once. Dropping closes it.
            drop(unsafe { Box::from_raw(proxy) });
        }
    })
}

fn home_or_default(home: Option<&str>) -> Result<PathBuf, moat_error> {
    moat_core::paths::home_or_default(home.map(std::path::Path::new))
        .map_err(|e| moat_error::from_error(&e))
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<CString, moat_error> {
    serde_json::to_string(value)
        .map(|s| cstring(&s))
        .map_err(|e| {
            moat_error::plain(
                moat_status::MOAT_ERR_INTERNAL,
                &format!("cannot encode json: {e}"),
            )
        })
}

/// Stores a credential for `provider` without prompting: `token`, or when it
/// is NULL the provider's environment variable (GITHUB_TOKEN, ...). GitHub
/// tokens are checked against api.github.com when `validate` is true. `home`
/// may be NULL (`$MOAT_HOME` or `~/.moat`); `MOAT_RESOLVE` and
/// `MOAT_UPSTREAM_CA_FILE` apply to the check as to the proxy. On success,
/// when `out_json` is not NULL, writes what was stored (never the token) as
/// JSON: `{"grant": {...}, "path", "key_file", "key_reason"}`, the grant
/// (as `moat_grants_json` lists it), the file that holds the encrypted
/// credential, and the key file with why it is used (both null when the
/// key is in the system keyring); free it with
/// `moat_string_free`.
///
/// # Safety
/// `provider` is a NUL-terminated string; `token` and `home` are NULL or
/// such strings; `out_json` and `out_error` are NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_grant(
    provider: *const c_char,
    token: *const c_char,
    validate: bool,
    home: *const c_char,
    out_json: *mut *mut c_char,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_grant", || {
            let provider = arg_str(provider, "provider")?;
            let home = home_or_default(opt_str(home, "home")?)?;
            let input = match opt_str(token, "token")? {
                Some(t) => moat_core::credential::TokenInput::Given(
                    moat_core::secret::Secret::new(t.to_string()),
                    "api".into(),
                ),
                None => moat_core::credential::TokenInput::Environment,
            };
            let outcome = moat_core::credential::grant(&home, provider, input, validate)
                .map_err(|e| moat_error::from_error(&e))?;
            if !out_json.is_null() {
                *out_json = to_json(&outcome)?.into_raw();
            }
            Ok(())
        })
    }
}

/// Grants `host` a key of the SSH agent at `SSH_AUTH_SOCK`: the one whose
/// fingerprint is `key` (`SHA256:...`), or when NULL the agent's first. No
/// secret is stored. The host's keys are read from `known_hosts` and
/// recorded (`host_keys` in the JSON; when it is empty, runs with this grant
/// will not start until a host key is known). On success, when `out_json`
/// is not NULL, writes the grant as JSON. Runs use the grant as `ssh:<host>`
/// (`moat_run_options_add(o, "grant", "ssh:<host>")`).
///
/// # Safety
/// `host` is a NUL-terminated string; `key` and `home` are NULL or such
/// strings; `out_json` and `out_error` are NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_grant_ssh(
    host: *const c_char,
    key: *const c_char,
    home: *const c_char,
    out_json: *mut *mut c_char,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_grant_ssh", || {
            let host = arg_str(host, "host")?;
            let key = opt_str(key, "key")?;
            let home = home_or_default(opt_str(home, "home")?)?;
            let socket = moat_core::credential::ssh::agent_socket();
            let grant = moat_core::credential::ssh::grant(&home, socket.as_deref(), host, key)
                .map_err(|e| moat_error::from_error(&e))?;
            if !out_json.is_null() {
                *out_json = to_json(&grant)?.into_raw();
            }
            Ok(())
        })
    }
}

/// Stores an AWS role for runs to assume: `role_arn`, `region` (NULL:
/// us-east-1), `session_seconds` (0: 900), `external_id` (may be NULL). No
/// secret is stored; the host's AWS credentials are used at run time.
///
/// # Safety
/// `role_arn` is a NUL-terminated string; `region`, `external_id` and `home`
/// are NULL or such strings; `out_json` and `out_error` are NULL or valid
/// for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_grant_aws(
    role_arn: *const c_char,
    region: *const c_char,
    session_seconds: u32,
    external_id: *const c_char,
    home: *const c_char,
    out_json: *mut *mut c_char,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_grant_aws", || {
            let role = arg_str(role_arn, "role_arn")?;
            let region = opt_str(region, "region")?;
            let external_id = opt_str(external_id, "external_id")?;
            let home = home_or_default(opt_str(home, "home")?)?;
            let seconds = (session_seconds != 0).then_some(session_seconds);
            let grant =
                moat_core::credential::aws::grant(&home, role, region, seconds, external_id)
                    .map_err(|e| moat_error::from_error(&e))?;
            if !out_json.is_null() {
                *out_json = to_json(&grant)?.into_raw();
            }
            Ok(())
        })
    }
}

/// Removes the stored credential of `provider` (or `ssh:<host>`). `*out_removed` (when not
/// NULL) tells whether there was one.
///
/// # Safety
/// `provider` is a NUL-terminated string; `home` is NULL or one;
/// `out_removed` and `out_error` are NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_revoke(
    provider: *const c_char,
    home: *const c_char,
    out_removed: *mut bool,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_revoke", || {
            let provider = arg_str(provider, "provider")?;
            let home = home_or_default(opt_str(home, "home")?)?;
            let removed = moat_core::credential::revoke(&home, provider)
                .map_err(|e| moat_error::from_error(&e))?;
            if !out_removed.is_null() {
                *out_removed = removed;
            }
            Ok(())
        })
    }
}

/// The stored grants as a JSON array (provider, source, created, expires,
/// hosts, ...; never the tokens). Free it with `moat_string_free`.
///
/// # Safety
/// `home` is NULL or a NUL-terminated string; `out_json` is valid for a
/// write; `out_error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_grants_json(
    home: *const c_char,
    out_json: *mut *mut c_char,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_grants_json", || {
            let out_json = out_ptr(out_json, "out_json")?;
            let home = home_or_default(opt_str(home, "home")?)?;
            let list =
                moat_core::credential::list(&home).map_err(|e| moat_error::from_error(&e))?;
            *out_json = to_json(&list)?.into_raw();
            Ok(())
        })
    }
}

fn report_json(what: &str, r: moat_core::audit::Report) -> Result<CString, moat_error> {
    if !r.ok {
        let first = r.problems.first().cloned().unwrap_or_default();
        return Err(moat_error::plain(
            moat_status::MOAT_ERR_CONFIG,
            &format!("{what}: {first}"),
        ));
    }
    to_json(&r)
}

/// Verifies the audit log in `dir` (chain, tree, checkpoint signatures,
/// witness). `home` and `vkey` may be NULL (this host's key). On success
/// writes the report as JSON to `*out_json` (when not NULL); a log that does
/// not verify is `MOAT_ERR_CONFIG` naming the first bad entry.
///
/// # Safety
/// `dir` is a NUL-terminated string; `home` and `vkey` are NULL or such
/// strings; `out_json` and `out_error` are NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_audit_verify(
    dir: *const c_char,
    home: *const c_char,
    vkey: *const c_char,
    out_json: *mut *mut c_char,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_audit_verify", || {
            let dir = PathBuf::from(arg_str(dir, "dir")?);
            let home = home_or_default(opt_str(home, "home")?)?;
            let r = moat_core::audit::verify(&dir, &home, opt_str(vkey, "vkey")?)
                .map_err(|e| moat_error::from_error(&e))?;
            let json = report_json(&format!("audit log {}", dir.display()), r)?;
            if !out_json.is_null() {
                *out_json = json.into_raw();
            }
            Ok(())
        })
    }
}

/// Writes a proof bundle of the audit log in `dir` to `out_path`.
///
/// # Safety
/// `dir` and `out_path` are NUL-terminated strings; `home` is NULL or one;
/// `out_error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_audit_export(
    dir: *const c_char,
    home: *const c_char,
    out_path: *const c_char,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_audit_export", || {
            let dir = PathBuf::from(arg_str(dir, "dir")?);
            let out = PathBuf::from(arg_str(out_path, "out_path")?);
            let home = home_or_default(opt_str(home, "home")?)?;
            moat_core::audit::export_bundle(&dir, &home, &out)
                .map(|_| ())
                .map_err(|e| moat_error::from_error(&e))
        })
    }
}

/// Verifies a proof bundle offline; with `vkey` (may be NULL) it must be
/// signed by that key. On success writes the report to `*out_json` (when
/// not NULL).
///
/// # Safety
/// `path` is a NUL-terminated string; `vkey` is NULL or one; `out_json` and
/// `out_error` are NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_verify_bundle(
    path: *const c_char,
    vkey: *const c_char,
    out_json: *mut *mut c_char,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_verify_bundle", || {
            let path = PathBuf::from(arg_str(path, "path")?);
            let r = moat_core::audit::verify_bundle(&path, opt_str(vkey, "vkey")?)
                .map_err(|e| moat_error::from_error(&e))?;
            let json = to_json(&r)?;
            if !out_json.is_null() {
                *out_json = json.into_raw();
            }
            Ok(())
        })
    }
}

/// Replays a run's requests (`run`: id, id prefix or name; NULL: the most
/// recent) against its workspace's current policy: JSON with `run`,
/// `requests` and `changes` (each `method`, `url`, `then`, `now`, `rule`),
/// the requests that would now be decided otherwise. Free it with
/// `moat_string_free`.
///
/// # Safety
/// `run` and `home` are NULL or NUL-terminated strings; `out_json` is valid
/// for a write; `out_error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_policy_check_json(
    run: *const c_char,
    home: *const c_char,
    out_json: *mut *mut c_char,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_policy_check_json", || {
            let out_json = out_ptr(out_json, "out_json")?;
            let run = opt_str(run, "run")?;
            let home = home_or_default(opt_str(home, "home")?)?;
            let report = moat_core::run::replay::check(&home, run)
                .map_err(|e| moat_error::from_error(&e))?;
            *out_json = to_json(&report)?.into_raw();
            Ok(())
        })
    }
}

/// A strict network policy, as YAML for agent.yaml, that allows what a run
/// (`run`: id, id prefix or name; NULL: the most recent) did. Free it with
/// `moat_string_free`.
///
/// # Safety
/// `run` and `home` are NULL or NUL-terminated strings; `out_yaml` is valid
/// for a write; `out_error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_policy_suggest(
    run: *const c_char,
    home: *const c_char,
    out_yaml: *mut *mut c_char,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_policy_suggest", || {
            let out_yaml = out_ptr(out_yaml, "out_yaml")?;
            let run = opt_str(run, "run")?;
            let home = home_or_default(opt_str(home, "home")?)?;
            let yaml = moat_core::run::replay::suggest(&home, run)
                .map_err(|e| moat_error::from_error(&e))?;
            *out_yaml = cstring(&yaml).into_raw();
            Ok(())
        })
    }
}

/// Writes a run's network trace (`run`: id, id prefix or name; NULL: the
/// most recent) to `path` as HAR 1.2, readable by its owner only. On
/// success writes the number of requests to `*out_entries` (when not NULL).
///
/// # Safety
/// `path` is a NUL-terminated string; `run` and `home` are NULL or
/// NUL-terminated strings; `out_entries` and `out_error` are NULL or valid
/// for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_trace_har(
    run: *const c_char,
    path: *const c_char,
    home: *const c_char,
    out_entries: *mut usize,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_trace_har", || {
            let path = PathBuf::from(arg_str(path, "path")?);
            let run = opt_str(run, "run")?;
            let home = home_or_default(opt_str(home, "home")?)?;
            let n = moat_core::run::trace_view::write_har(&home, run, &path)
                .map_err(|e| moat_error::from_error(&e))?;
            if !out_entries.is_null() {
                *out_entries = n;
            }
            Ok(())
        })
    }
}

/// Removes this home's stopped runs, the images moat built that nothing
/// uses (unless `keep_images`) and what runs left behind, as `moat clean -f`
/// does; with `dry_run`, removes nothing. Writes what was (or would be)
/// removed to `*out_json` (`{"runs": [...], "images": [...], "containers":
/// [...], "networks": [...], "firewall": [...]}`); free it with
/// `moat_string_free`.
///
/// # Safety
/// `home` is NULL or a NUL-terminated string; `out_json` is valid for a
/// write; `out_error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_clean_json(
    home: *const c_char,
    dry_run: bool,
    keep_images: bool,
    out_json: *mut *mut c_char,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_clean_json", || {
            let out_json = out_ptr(out_json, "out_json")?;
            let home = home_or_default(opt_str(home, "home")?)?;
            let options = moat_core::run::CleanOptions {
                dry_run,
                keep_images,
            };
            let cleaned = moat_core::run::clean_with(&home, options)
                .map_err(|e| moat_error::from_error(&e))?;
            *out_json = to_json(&cleaned)?.into_raw();
            Ok(())
        })
    }
}

/// Copies a run that is over (`run`: id, id prefix or name; NULL: the most
/// recent) to `to` (a new or empty directory; NULL:
/// `$MOAT_HOME/promoted/<run-id>/`), where `destroy` and `clean` leave it,
/// as `moat promote` does. Writes what was copied to `*out_json`; free it
/// with `moat_string_free`.
///
/// # Safety
/// `run`, `to` and `home` are NULL or NUL-terminated strings; `out_json` is
/// valid for a write; `out_error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_promote_json(
    run: *const c_char,
    to: *const c_char,
    home: *const c_char,
    out_json: *mut *mut c_char,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_promote_json", || {
            let out_json = out_ptr(out_json, "out_json")?;
            let run = opt_str(run, "run")?;
            let to = opt_str(to, "to")?.map(PathBuf::from);
            let home = home_or_default(opt_str(home, "home")?)?;
            let meta = moat_core::run::find(&home, run).map_err(|e| moat_error::from_error(&e))?;
            let promoted = moat_core::run::promote::promote(&home, &meta.id, to.as_deref())
                .map_err(|e| moat_error::from_error(&e))?;
            *out_json = to_json(&promoted)?.into_raw();
            Ok(())
        })
    }
}

/// What moat owns on the engines, as `moat system images|containers
/// --json` prints it: `what` is `"images"` or `"containers"`; this home's
/// unless `all_homes`. Free the JSON with `moat_string_free`.
///
/// # Safety
/// `what` is a NUL-terminated string; `home` is NULL or one; `out_json` is
/// valid for a write; `out_error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_system_json(
    what: *const c_char,
    all_homes: bool,
    home: *const c_char,
    out_json: *mut *mut c_char,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_system_json", || {
            let out_json = out_ptr(out_json, "out_json")?;
            let what = arg_str(what, "what")?;
            let home = home_or_default(opt_str(home, "home")?)?;
            let core = |e: Error| moat_error::from_error(&e);
            let json = match what {
                "images" => {
                    to_json(&moat_core::run::system::images(&home, all_homes).map_err(core)?)?
                }
                "containers" => {
                    to_json(&moat_core::run::system::containers(&home, all_homes).map_err(core)?)?
                }
                other => {
                    return Err(moat_error::plain(
                        moat_status::MOAT_ERR_INVALID_ARGUMENT,
                        &format!("what: \"{other}\" is neither \"images\" nor \"containers\""),
                    ))
                }
            };
            *out_json = json.into_raw();
            Ok(())
        })
    }
}

/// The dependencies `dependencies:` may name, as `moat deps list --json`
/// prints them (`name` NULL), or one (`name` or `name@version`) as `moat
/// deps info --json` does. Free the JSON with `moat_string_free`.
///
/// # Safety
/// `name` is NULL or a NUL-terminated string; `out_json` is valid for a
/// write; `out_error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moat_deps_json(
    name: *const c_char,
    out_json: *mut *mut c_char,
    out_error: *mut *mut moat_error,
) -> moat_status {
    // SAFETY: the caller's promises are forwarded.
    unsafe {
        guard(out_error, "moat_deps_json", || {
            let out_json = out_ptr(out_json, "out_json")?;
            let json = match opt_str(name, "name")? {
                None => to_json(&moat_core::deps::list().map_err(|e| moat_error::from_error(&e))?)?,
                Some(n) => {
                    to_json(&moat_core::deps::info(n).map_err(|e| moat_error::from_error(&e))?)?
                }
            };
            *out_json = json.into_raw();
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_constants_match_cargo() {
        assert_eq!(
            MOAT_VERSION_MAJOR.to_string(),
            env!("CARGO_PKG_VERSION_MAJOR")
        );
        assert_eq!(
            MOAT_VERSION_MINOR.to_string(),
            env!("CARGO_PKG_VERSION_MINOR")
        );
        assert_eq!(
            MOAT_VERSION_PATCH.to_string(),
            env!("CARGO_PKG_VERSION_PATCH")
        );
        let v = unsafe { CStr::from_ptr(moat_version()) };
        assert_eq!(v.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn panics_become_status_codes() {
        let mut err: *mut moat_error = ptr::null_mut();
        let status = unsafe {
            guard(&mut err, "test", || -> Result<(), moat_error> {
                panic!("boom");
            })
        };
        assert_eq!(status, moat_status::MOAT_ERR_PANIC);
        assert!(!err.is_null());
        let msg = unsafe { CStr::from_ptr(moat_error_message(err)) };
        assert!(msg.to_str().unwrap().contains("panicked in test"));
        unsafe { moat_error_free(err) };
    }

    #[test]
    fn a_panic_in_an_export_without_an_error_out_gives_its_fallback() {
        let p: *const c_char = shield("test getter", ptr::null(), || panic!("boom"));
        assert!(p.is_null());
        assert_eq!(shield("test count", 0usize, || panic!("boom")), 0);
        shield("test free", (), || panic!("boom"));
        // And a value when nothing panics.
        assert_eq!(shield("test", 0u32, || 7), 7);
    }

    #[test]
    fn every_export_is_behind_the_panic_boundary() {
        // Each `#[no_mangle]` function's body runs inside `guard` or
        // `shield` (moat_version returns a static and cannot panic).
        for (file, text) in [
            ("lib.rs", include_str!("lib.rs")),
            ("run.rs", include_str!("run.rs")),
        ] {
            for chunk in text.split("#[no_mangle]\npub ").skip(1) {
                let name = chunk
                    .split("fn ")
                    .nth(1)
                    .and_then(|r| r.split('(').next())
                    .unwrap_or("?");
                let body = chunk.split("\n}\n").next().unwrap_or("");
                assert!(
                    name == "moat_version" || body.contains("guard(") || body.contains("shield("),
                    "{file}: {name} has no panic boundary"
                );
            }
        }
    }

    #[test]
    fn null_arguments_are_refused() {
        let mut err: *mut moat_error = ptr::null_mut();
        let mut cfg: *mut moat_config = ptr::null_mut();
        let status = unsafe { moat_config_load(ptr::null(), &mut cfg, &mut err) };
        assert_eq!(status, moat_status::MOAT_ERR_INVALID_ARGUMENT);
        assert!(cfg.is_null());
        unsafe { moat_error_free(err) };
        // A NULL out_error is allowed.
        let status = unsafe { moat_config_load(c"/".as_ptr(), ptr::null_mut(), ptr::null_mut()) };
        assert_eq!(status, moat_status::MOAT_ERR_INVALID_ARGUMENT);
    }
}
