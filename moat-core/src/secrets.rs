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
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
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
    let value = out.strip_suffix('\n').unwrap_or(&out);
    let value = value.strip_suffix('\r').unwrap_or(value);
    if value.is_empty() {
        return Err(fail(format!("{} is empty", r.reference)));
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
