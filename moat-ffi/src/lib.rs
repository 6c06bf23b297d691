//! The C ABI of moat (`libmoat`, header `include/moat.h`).
//!
//! Conventions, after rustls-ffi:
//! - Opaque handles (`moat_config`, `moat_error`), created and freed by moat.
//! - Every function checks its pointers for NULL and returns a stable
//!   [`moat_status`]; outputs are written only on success.
//! - Fallible functions take an optional `moat_error **out_error`; on failure
//!   it receives an error object carrying the message and, for configuration
//!   errors, the file, line and column. Free it with `moat_error_free`.
//! - Every export runs inside a panic boundary: a panic becomes
//!   `MOAT_ERR_PANIC`, never an abort of the host process.
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

/// An error: status, message and optional location. Free with
/// `moat_error_free`.
#[derive(Debug)]
pub struct moat_error {
    status: moat_status,
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
            message: cstring(&err.to_string()),
            path: loc.map(|l| cstring(&l.path.to_string_lossy())),
            line: loc.map_or(0, |l| l.line),
            column: loc.map_or(0, |l| l.column),
        }
    }

    fn plain(status: moat_status, message: &str) -> moat_error {
        moat_error {
            status,
            message: cstring(message),
            path: None,
            line: 0,
            column: 0,
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
/// NULL.
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
            if out_config.is_null() {
                return Err(null_arg("out_config"));
            }
            let config = moat_core::blocking::load_config(&PathBuf::from(workspace))
                .map_err(|e| moat_error::from_error(&e))?;
            let handle = moat_config {
                name: config.name.as_deref().map(cstring),
                image: cstring(&config.resolved_image().0),
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
    // SAFETY: NULL or a live handle, by the caller's promise.
    match unsafe { config.as_ref() }.and_then(|c| c.name.as_ref()) {
        Some(name) => name.as_ptr(),
        None => ptr::null(),
    }
}

/// The resolved image (`image:`, else from `dependencies`, else
/// `ubuntu:22.04`); NULL only when `config` is NULL.
///
/// # Safety
/// `config` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn moat_config_image(config: *const moat_config) -> *const c_char {
    // SAFETY: NULL or a live handle, by the caller's promise.
    match unsafe { config.as_ref() } {
        Some(c) => c.image.as_ptr(),
        None => ptr::null(),
    }
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
            if out_json.is_null() {
                return Err(null_arg("out_json"));
            }
            let json = serde_json::to_string(&config.inner.resolved()).map_err(|e| {
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
            if out_json.is_null() {
                return Err(null_arg("out_json"));
            }
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
    if !config.is_null() {
        // SAFETY: created by Box::into_raw in moat_config_load, freed once.
        drop(unsafe { Box::from_raw(config) });
    }
}

/// Frees a string returned through a `char **` output. NULL is ignored.
///
/// # Safety
/// `s` is NULL or a string from moat, not yet freed.
#[no_mangle]
pub unsafe extern "C" fn moat_string_free(s: *mut c_char) {
    if !s.is_null() {
        // SAFETY: created by CString::into_raw, freed once.
        drop(unsafe { CString::from_raw(s) });
    }
}

/// The status this error stands for.
///
/// # Safety
/// `err` is NULL or a live error.
#[no_mangle]
pub unsafe extern "C" fn moat_error_status(err: *const moat_error) -> moat_status {
    // SAFETY: NULL or live, by the caller's promise.
    match unsafe { err.as_ref() } {
        Some(e) => e.status,
        None => moat_status::MOAT_ERR_INVALID_ARGUMENT,
    }
}

/// The full message, prefixed with `path:line:column: ` when located.
/// Never NULL for a non-NULL error.
///
/// # Safety
/// `err` is NULL or a live error.
#[no_mangle]
pub unsafe extern "C" fn moat_error_message(err: *const moat_error) -> *const c_char {
    // SAFETY: NULL or live, by the caller's promise.
    match unsafe { err.as_ref() } {
        Some(e) => e.message.as_ptr(),
        None => ptr::null(),
    }
}

/// The file the error is in, or NULL when it has no location.
///
/// # Safety
/// `err` is NULL or a live error.
#[no_mangle]
pub unsafe extern "C" fn moat_error_path(err: *const moat_error) -> *const c_char {
    // SAFETY: NULL or live, by the caller's promise.
    match unsafe { err.as_ref() }.and_then(|e| e.path.as_ref()) {
        Some(p) => p.as_ptr(),
        None => ptr::null(),
    }
}

/// The 1-based line of the error, or 0 when it has no location.
///
/// # Safety
/// `err` is NULL or a live error.
#[no_mangle]
pub unsafe extern "C" fn moat_error_line(err: *const moat_error) -> u32 {
    // SAFETY: NULL or live, by the caller's promise.
    unsafe { err.as_ref() }.map_or(0, |e| e.line)
}

/// The 1-based column of the error, or 0 when it has no location.
///
/// # Safety
/// `err` is NULL or a live error.
#[no_mangle]
pub unsafe extern "C" fn moat_error_column(err: *const moat_error) -> u32 {
    // SAFETY: NULL or live, by the caller's promise.
    unsafe { err.as_ref() }.map_or(0, |e| e.column)
}

/// Frees an error. NULL is ignored.
///
/// # Safety
/// `err` is NULL or an error from moat, not yet freed.
#[no_mangle]
pub unsafe extern "C" fn moat_error_free(err: *mut moat_error) {
    if !err.is_null() {
        // SAFETY: created by Box::into_raw in `fail`, freed once.
        drop(unsafe { Box::from_raw(err) });
    }
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
    Box::into_raw(Box::default())
}

/// Frees proxy options. NULL is ignored.
///
/// # Safety
/// `options` is NULL or a handle from `moat_proxy_options_new`, not yet freed.
#[no_mangle]
pub unsafe extern "C" fn moat_proxy_options_free(options: *mut moat_proxy_options) {
    if !options.is_null() {
        // SAFETY: created by Box::into_raw, freed once.
        drop(unsafe { Box::from_raw(options) });
    }
}

/// Sets the listen address (`host:port`), the moat home directory, the extra
/// upstream CA file, the policy (`"permissive"` or `"strict"`) or the client
/// name, how many bytes of text bodies traces keep (`"capture_bodies"`, a
/// decimal number; default 0), or a directory for the client's
/// tamper-evident audit log (`"audit_dir"`): `key` is one of `"listen"`,
/// `"home"`, `"upstream_ca"`, `"policy"`, `"name"`, `"capture_bodies"`,
/// `"audit_dir"`. Values other
/// than `capture_bodies` are checked by `moat_proxy_start`.
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
                "capture_bodies" => {
                    options.capture_bodies = value.parse().map_err(|_| {
                        moat_error::plain(
                            moat_status::MOAT_ERR_INVALID_ARGUMENT,
                            &format!("capture_bodies: \"{value}\" is not a number of bytes"),
                        )
                    })?
                }
                other => {
                    return Err(moat_error::plain(
                        moat_status::MOAT_ERR_INVALID_ARGUMENT,
                        &format!(
                            "unknown proxy option \"{other}\" (expected listen, home, upstream_ca, policy, name, capture_bodies or audit_dir)"
                        ),
                    ))
                }
            }
            Ok(())
        })
    }
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
            if out_proxy.is_null() {
                return Err(null_arg("out_proxy"));
            }
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
    // SAFETY: NULL or live, by the caller's promise.
    unsafe { proxy.as_ref() }.map_or(ptr::null(), |p| p.url.as_ptr())
}

/// The listen address, `host:port`.
///
/// # Safety
/// `proxy` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn moat_proxy_address(proxy: *const moat_proxy) -> *const c_char {
    // SAFETY: NULL or live, by the caller's promise.
    unsafe { proxy.as_ref() }.map_or(ptr::null(), |p| p.address.as_ptr())
}

/// The moat CA certificate clients must trust.
///
/// # Safety
/// `proxy` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn moat_proxy_ca_cert_path(proxy: *const moat_proxy) -> *const c_char {
    // SAFETY: NULL or live, by the caller's promise.
    unsafe { proxy.as_ref() }.map_or(ptr::null(), |p| p.ca_cert_path.as_ptr())
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
            if out_json.is_null() {
                return Err(null_arg("out_json"));
            }
            let doc = match doc {
                0 => moat_proxy_doc::MOAT_PROXY_ENV,
                1 => moat_proxy_doc::MOAT_PROXY_TRACE,
                2 => moat_proxy_doc::MOAT_PROXY_AUDIT,
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
                moat_proxy_doc::MOAT_PROXY_TRACE => serde_json::to_string(&proxy.inner.trace()),
                moat_proxy_doc::MOAT_PROXY_AUDIT => {
                    serde_json::to_string(&proxy.inner.audit_events())
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
    if !proxy.is_null() {
        // SAFETY: created by Box::into_raw, freed once. Dropping closes it.
        drop(unsafe { Box::from_raw(proxy) });
    }
}

fn home_or_default(home: Option<&str>) -> Result<PathBuf, moat_error> {
    match home {
        Some(h) => Ok(PathBuf::from(h)),
        None => moat_core::paths::moat_home().map_err(|e| moat_error::from_error(&e)),
    }
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
/// may be NULL (`$MOAT_HOME` or `~/.moat`). On success, when `out_json` is not
/// NULL, writes the stored grant (never the token) as JSON; free it with
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
            if out_json.is_null() {
                return Err(null_arg("out_json"));
            }
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
