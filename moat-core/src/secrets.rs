//! Resolving `secrets:` of agent.yaml on the host, just before a run starts.
//!
//! `op://vault/item/field` runs `op read <ref>`; `ssm:///path` and
//! `ssm://region/path` run `aws ssm get-parameter --with-decryption`. A
//! missing CLI names the CLI and how to install it; a failed lookup names the
//! variable and the backend, never a value. Values come back as [`Secret`]s.
//! (Secrets become environment variables in the container, which is weaker
//! than a grant: see the security model.)

use std::collections::BTreeMap;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::{SecretBackend, SecretRef};
use crate::error::{Error, ErrorKind, Result};
use crate::secret::Secret;

/// How long one lookup may take (a CLI may wait for an unlock).
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(60);

/// The largest value a lookup may return (an environment variable's).
const MAX_VALUE: usize = 1024 * 1024;

/// Reads `pipe` to its end (at most one byte past [`MAX_VALUE`]) on a
/// thread of its own; the bytes arrive on the returned channel.
fn drain(
    pipe: Option<impl Read + Send + 'static>,
) -> std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let read = match pipe {
            Some(p) => {
                let mut limited = p.take(MAX_VALUE as u64 + 1);
                let read = limited.read_to_end(&mut bytes);
                // Past the limit, the rest is read and dropped, so that
                // the writer is not left waiting.
                let _ = std::io::copy(&mut limited.into_inner(), &mut std::io::sink());
                read
            }
            None => Ok(0),
        };
        let _ = tx.send(read.map(|_| bytes));
    });
    rx
}

impl SecretBackend {
    /// A short name for messages and audit entries (`1password`, `aws-ssm`).
    pub fn name(self) -> &'static str {
        match self {
            SecretBackend::OnePassword => "1password",
            SecretBackend::AwsSsm => "aws-ssm",
        }
    }
}

fn command_for(r: &SecretRef) -> (Command, &'static str, &'static str) {
    match r.backend {
        SecretBackend::OnePassword => {
            let mut c = Command::new("op");
            c.args(["read", "--no-newline", &r.reference]);
            (
                c,
                "op",
                "the 1Password CLI; see https://developer.1password.com/docs/cli/get-started/",
            )
        }
        SecretBackend::AwsSsm => {
            let rest = r.reference.trim_start_matches("ssm://");
            let (region, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => ("", rest),
            };
            let mut c = Command::new("aws");
            c.args(["ssm", "get-parameter", "--name", path, "--with-decryption"])
                .args(["--query", "Parameter.Value", "--output", "text"]);
            if !region.is_empty() {
                c.args(["--region", region]);
            }
            (c, "aws", "the AWS CLI; see https://aws.amazon.com/cli/")
        }
    }
}

/// Resolves one secret.
pub fn resolve_one(name: &str, r: &SecretRef) -> Result<Secret<String>> {
    let (mut cmd, program, install) = command_for(r);
    let backend = r.backend.name();
    let fail = |why: String| {
        Error::new(
            ErrorKind::Config,
            format!("secret {name} ({backend}): {why}"),
        )
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                fail(format!("`{program}` is not installed; install {install}"))
            } else {
                fail(format!("cannot run `{program}`: {e}"))
            }
        })?;
    // Both pipes are read while the CLI runs: one that writes more than a
    // pipe holds (a document from `op read`) would otherwise wait for a
    // reader forever.
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > LOOKUP_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!(
                    "`{program}` did not answer within {} s",
                    LOOKUP_TIMEOUT.as_secs()
                )));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(fail(format!("cannot wait for `{program}`: {e}"))),
        }
    };
    // What it started may hold its output open after it exited (a helper
    // daemon): the output is what came within a few seconds of the exit.
    let collect = |rx: std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>, what: &str| match rx
        .recv_timeout(Duration::from_secs(5))
    {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => Err(fail(format!("cannot read `{program}`'s {what}: {e}"))),
        Err(_) => Err(fail(format!(
            "`{program}` exited, but a process it started still holds its {what} open"
        ))),
    };
    let out = collect(out, "output")?;
    let err = String::from_utf8_lossy(&collect(err, "error output")?).into_owned();
    if !status.success() {
        let first = err
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message");
        return Err(fail(format!(
            "lookup of {} failed: {}",
            r.reference,
            first.trim()
        )));
    }
    if out.len() > MAX_VALUE {
        return Err(fail(format!(
            "{} is larger than {} MiB",
            r.reference,
            MAX_VALUE / (1024 * 1024)
        )));
    }
    let Ok(out) = String::from_utf8(out) else {
        return Err(fail(format!("{} is not UTF-8 text", r.reference)));
    };
    let value = out.strip_suffix('\n').unwrap_or(&out);
    let value = value.strip_suffix('\r').unwrap_or(value);
    if value.is_empty() {
        return Err(fail(format!("{} is empty", r.reference)));
    }
    // No environment can hold a NUL, and the engine's refusal would quote
    // the whole variable, value and all, into the run's error.
    if value.contains('\0') {
        return Err(fail(format!(
            "{} holds a NUL byte, which an environment variable cannot",
            r.reference
        )));
    }
    Ok(Secret::new(value.to_string()))
}

/// Resolves every secret of a configuration, in name order; stops at the
/// first failure (the run must not start).
pub fn resolve(secrets: &BTreeMap<String, SecretRef>) -> Result<Vec<(String, Secret<String>)>> {
    secrets
        .iter()
        .map(|(name, r)| resolve_one(name, r).map(|v| (name.clone(), v)))
        .collect()
}
