//! Credentials on the host: the encrypted store ([`store`]), the provider
//! table ([`providers`]), and the operations behind `moat grant`, `moat
//! revoke` and `moat grant list`. Nothing here prompts or prints: the CLI
//! asks the user; this module finds, validates, stores and lists tokens.

pub mod aws;
pub mod oauth;
pub mod providers;
pub mod ssh;
pub mod store;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::BodyExt;
use serde::Serialize;

pub use providers::{lookup, Provider, TokenSource};
pub use store::{CredentialStore, KeySource, StoredGrant};

use crate::config::GrantRef;
use crate::error::{Error, ErrorKind, Result};
use crate::proxy::Credential;
use crate::secret::Secret;

/// A stored grant as `moat grant list` shows it: never the token.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GrantInfo {
    /// The provider.
    pub provider: String,
    /// Where the token came from.
    pub source: String,
    /// When it was stored.
    pub created: String,
    /// When it expires, if known.
    pub expires: Option<String>,
    /// The token kind, if the provider has several.
    pub kind: Option<String>,
    /// Hosts it is injected on.
    pub hosts: Vec<String>,
    /// Non-secret facts (the GitHub login, ...).
    pub metadata: BTreeMap<String, String>,
    /// Why it cannot be used, if it cannot (cannot be decrypted, expired).
    pub problem: Option<String>,
}

/// The first token found in the provider's environment variables, with its
/// source (`env:GITHUB_TOKEN`). Empty variables are skipped.
pub fn token_from_env(provider: &Provider) -> Option<(Secret<String>, String)> {
    provider.env.iter().find_map(|var| {
        std::env::var(var)
            .ok()
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .map(|v| (Secret::new(v), format!("env:{var}")))
    })
}

/// The token of the `gh` CLI (`gh auth token`), if `gh` is installed and
/// logged in.
pub fn gh_auth_token() -> Option<Secret<String>> {
    let out = std::process::Command::new("gh")
        .args(["auth", "token"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let token = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !token.is_empty()).then(|| Secret::new(token))
}

/// Checks a GitHub token against `GET https://api.github.com/user` and
/// returns the login. Honours `MOAT_UPSTREAM_CA_FILE` and `MOAT_RESOLVE`.
pub async fn github_login(token: &Secret<String>) -> Result<String> {
    let client = crate::proxy::upstream::own_client(Duration::from_secs(15))?;
    let mut auth =
        http::HeaderValue::from_str(&format!("Bearer {}", token.expose())).map_err(|_| {
            Error::new(
                ErrorKind::InvalidArgument,
                "the token has characters a header cannot carry",
            )
        })?;
    auth.set_sensitive(true);
    let req = http::Request::get("https://api.github.com/user")
        .header("authorization", auth)
        .header("user-agent", concat!("moat/", env!("CARGO_PKG_VERSION")))
        .header("accept", "application/vnd.github+json")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?;
    let failed = |why: String| {
        Error::new(
            ErrorKind::Io,
            format!("cannot validate the token with api.github.com: {why}"),
        )
    };
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .map_err(|_| failed("timed out".into()))?
        .map_err(|e| failed(e.to_string()))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| failed(e.to_string()))?
        .to_bytes();
    if status == http::StatusCode::UNAUTHORIZED {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "GitHub rejected the token (401 Bad credentials); check it, or store it unchecked (`moat grant --no-validate`; validate=False in Python, false in C)",
        ));
    }
    if !status.is_success() {
        return Err(failed(format!("GitHub answered {status}")));
    }
    let json: serde_json::Value =
        serde_json::from_slice(&body).map_err(|_| failed("the answer is not json".into()))?;
    json.get("login")
        .and_then(|l| l.as_str())
        .map(str::to_string)
        .ok_or_else(|| failed("the answer has no login".into()))
}

/// What [`save`] needs besides the token.
#[derive(Debug, Clone, Default)]
pub struct GrantMeta {
    /// Where the token came from.
    pub source: String,
    /// The token kind (`api_key`, `oauth`), for providers that have several.
    pub kind: Option<String>,
    /// When it expires (RFC 3339).
    pub expires: Option<String>,
    /// Non-secret facts to keep.
    pub metadata: BTreeMap<String, String>,
}

/// Stores a token for `provider` under `home`. Returns the file and where
/// the key came from.
pub fn save(
    home: &Path,
    provider: &str,
    token: Secret<String>,
    meta: GrantMeta,
) -> Result<(PathBuf, KeySource)> {
    let spec = lookup(home, provider)?;
    if !spec.stores_secret {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "{provider} grants store configuration, not a token: use `moat grant {provider} {}`",
                if provider == "ssh" { "--host <host>" } else { "--role <arn>" }
            ),
        ));
    }
    if token.expose().trim().is_empty() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("the {provider} token is empty"),
        ));
    }
    if token.expose().chars().any(|c| c.is_control()) {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("the {provider} token contains control characters (a stray newline?)"),
        ));
    }
    let store = CredentialStore::open(home)?;
    let grant = StoredGrant {
        provider: provider.to_string(),
        token,
        source: meta.source,
        created: crate::trace::now_rfc3339(),
        expires: meta.expires,
        kind: meta.kind,
        metadata: meta.metadata,
    };
    let path = store.save(&grant)?;
    Ok((path, store.key_source().clone()))
}

/// Removes a stored grant (`github`, or a scoped name such as `github:repo`,
/// which removes the provider's grant). `Ok(false)` when there was none.
pub fn revoke(home: &Path, grant: &str) -> Result<bool> {
    if let Some(host) = grant.strip_prefix("ssh:") {
        return ssh::revoke(home, host);
    }
    if grant == "aws" {
        return aws::revoke(home);
    }
    if grant == "ssh" {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "name the host: moat revoke ssh:<host>",
        ));
    }
    let provider = grant.split(':').next().unwrap_or(grant);
    CredentialStore::open(home)?.remove(provider)
}

fn expired(expires: Option<&str>) -> bool {
    let Some(expires) = expires else { return false };
    let Ok(at) =
        time::OffsetDateTime::parse(expires, &time::format_description::well_known::Rfc3339)
    else {
        return false;
    };
    at <= time::OffsetDateTime::now_utc()
}

/// Every stored grant, without tokens. A grant that cannot be decrypted or
/// has expired is listed with its problem.
pub fn list(home: &Path) -> Result<Vec<GrantInfo>> {
    let store = CredentialStore::open(home)?;
    let mut out = Vec::new();
    for provider in store.providers()? {
        let hosts = lookup(home, &provider)
            .map(|p| p.hosts())
            .unwrap_or_default();
        match store.load(&provider) {
            Ok(Some(g)) => out.push(GrantInfo {
                problem: expired(g.expires.as_deref())
                    .then(|| format!("expired; run `moat grant {provider}` again")),
                provider: g.provider,
                source: g.source,
                created: g.created,
                expires: g.expires,
                kind: g.kind,
                hosts,
                metadata: g.metadata,
            }),
            Ok(None) => {}
            Err(e) => out.push(GrantInfo {
                provider: provider.clone(),
                source: String::new(),
                created: String::new(),
                expires: None,
                kind: None,
                hosts,
                metadata: BTreeMap::new(),
                problem: Some(e.message().to_string()),
            }),
        }
    }
    if let Some(role) = aws::load(home)? {
        out.push(GrantInfo {
            provider: "aws".into(),
            source: format!("role {}", role.role_arn),
            created: role.created,
            expires: None,
            kind: Some("role".into()),
            hosts: vec![format!("sts.{}.amazonaws.com", role.region)],
            metadata: BTreeMap::from([
                ("role_arn".to_string(), role.role_arn),
                ("region".to_string(), role.region),
                (
                    "session_duration".to_string(),
                    role.session_duration.to_string(),
                ),
            ]),
            problem: None,
        });
    }
    for g in ssh::list(home)? {
        out.push(GrantInfo {
            provider: format!("ssh:{}", g.host),
            source: format!("agent key {} ({})", g.key.fingerprint, g.key.comment),
            created: g.created,
            expires: None,
            kind: Some(g.key.key_type),
            hosts: vec![g.host],
            metadata: BTreeMap::from([
                ("fingerprint".to_string(), g.key.fingerprint),
                (
                    "host_keys_recorded".to_string(),
                    g.host_keys.len().to_string(),
                ),
            ]),
            problem: None,
        });
    }
    Ok(out)
}

/// The proxy credentials for grant names (`github`, `github:repo`,
/// `anthropic`, a custom provider). Fails, naming the grant, when one is not
/// stored, cannot be decrypted, has expired, or is not an HTTP credential.
pub fn credentials_for(home: &Path, grants: &[String]) -> Result<Vec<Credential>> {
    let mut out = Vec::new();
    let mut store = None;
    for name in grants {
        out.extend(load_http_grant(home, name, &mut store)?.0);
    }
    Ok(out)
}

/// Grants bound to one client (a run, or a harness's proxy): what the proxy
/// injects, what the container sees instead, and where each grant reaches.
#[derive(Debug, Default)]
pub struct Binding {
    /// Credentials for the proxy to inject.
    pub credentials: Vec<Credential>,
    /// Placeholder variables for the container (never a real value).
    pub env: Vec<(String, String)>,
    /// For each grant, the hosts it reaches (for the audit log).
    pub hosts: Vec<(String, Vec<String>)>,
    /// The AWS role session, when `aws` is granted.
    pub aws: Option<std::sync::Arc<aws::RoleSession>>,
    /// The AWS role's region, when `aws` is granted.
    pub aws_region: Option<String>,
    /// The hosts of `ssh:` grants, for the run's filtering SSH agent.
    pub ssh: Vec<crate::ssh::HostGrant>,
    /// The broker of an OAuth login (an `anthropic` grant imported from
    /// Claude Code), which refreshes it on the host.
    pub oauth: Option<std::sync::Arc<oauth::OauthBroker>>,
    /// The Claude subscription of that login (`max`, `pro`), if known.
    pub subscription: Option<String>,
}

impl Binding {
    /// The proxy phases these grants add beyond header credentials (the
    /// AWS credential endpoint), taken out of the binding.
    pub fn take_phases(&mut self) -> Vec<std::sync::Arc<dyn crate::proxy::Phase>> {
        let mut phases: Vec<std::sync::Arc<dyn crate::proxy::Phase>> = Vec::new();
        if let Some(session) = self.aws.take() {
            phases.push(std::sync::Arc::new(aws::AwsEndpoint(session)));
        }
        if let Some(broker) = self.oauth.take() {
            phases.push(broker);
        }
        phases
    }
}

/// Binds grant names (`github`, `anthropic`, `aws`, custom providers) for a
/// client called `session`: loads and decrypts every credential, failing
/// with the grant's name when one is missing, expired or unusable.
pub fn bind(home: &Path, grants: &[GrantRef], session: &str) -> Result<Binding> {
    let mut binding = Binding::default();
    let mut store = None;
    for grant in grants {
        let name = &grant.to_string();
        if let ("ssh", Some(host)) = (grant.provider.as_str(), grant.scope.as_deref()) {
            let grant = ssh_host(home, host)?;
            binding.hosts.push((name.clone(), vec![grant.host.clone()]));
            binding.ssh.push(grant);
            continue;
        }
        if grant.provider == "aws" {
            let role = aws::load(home)?.ok_or_else(|| {
                Error::new(
                    ErrorKind::Config,
                    "grant \"aws\": no role is stored; run `moat grant aws --role=ARN`",
                )
            })?;
            let host = aws::host_credentials()?;
            binding
                .hosts
                .push((name.clone(), vec!["*.amazonaws.com".into()]));
            binding.aws_region = Some(role.region.clone());
            binding.aws = Some(std::sync::Arc::new(aws::RoleSession::new(
                role, host, session,
            )));
            continue;
        }
        if let Some((broker, placeholders, subscription)) =
            oauth_grant(home, name, session, &mut store)?
        {
            binding.subscription = subscription;
            binding.hosts.push((
                name.clone(),
                crate::proxy::Phase::hosts(broker.as_ref())
                    .iter()
                    .map(|(h, _)| h.to_string())
                    .collect(),
            ));
            binding.env.extend(placeholders);
            binding.oauth = Some(broker);
            continue;
        }
        let (creds, placeholders, hosts) = load_http_grant(home, name, &mut store)?;
        binding.credentials.extend(creds);
        for (k, v) in placeholders {
            if !binding.env.iter().any(|(e, _)| *e == k) {
                binding.env.push((k, v));
            }
        }
        binding.hosts.push((name.clone(), hosts));
    }
    Ok(binding)
}

/// The stored grant for `ssh:<host>`, with the host's keys: those
/// `known_hosts` holds now (removing a key there, as after a host key
/// change, takes effect); only when it holds none, those recorded when it
/// was granted. Keys marked `@revoked` never count.
fn ssh_host(home: &Path, host: &str) -> Result<crate::ssh::HostGrant> {
    ssh_host_in(home, host, &ssh::known_hosts_files())
}

fn ssh_host_in(home: &Path, host: &str, known_hosts: &[PathBuf]) -> Result<crate::ssh::HostGrant> {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let grant = ssh::list(home)?
        .into_iter()
        .find(|g| g.host == host)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                format!("grant \"ssh:{host}\": no ssh key is granted for {host}; run `moat grant ssh --host {host}`"),
            )
        })?;
    let known = ssh::known_host_keys(&host, known_hosts);
    if let Some(file) = known.unreadable_files.first() {
        return Err(Error::new(
            ErrorKind::Config,
            format!("grant \"ssh:{host}\": the known_hosts file {file}, so moat cannot tell which host keys it lists or revokes; make it readable or remove it"),
        ));
    }
    if let Some(at) = known.unreadable_revocations.first() {
        return Err(Error::new(
            ErrorKind::Config,
            format!("grant \"ssh:{host}\": {at}: an @revoked line moat cannot read, so it cannot be sure which host keys are revoked; fix or remove the line"),
        ));
    }
    let mut keys = if known.keys.is_empty() {
        grant.host_keys.clone()
    } else {
        known.keys
    };
    keys.retain(|k| !known.revoked.contains(k));
    crate::ssh::HostGrant::new(&host, &grant.key.fingerprint, &keys)
}

/// An OAuth grant's broker, the container's placeholders, and the
/// subscription.
type OauthGrant = (
    std::sync::Arc<oauth::OauthBroker>,
    Vec<(String, String)>,
    Option<String>,
);

/// An `anthropic` grant imported from Claude Code's OAuth login: its broker
/// (which refreshes it on the host) and the container's placeholders.
/// `None` for any other grant.
fn oauth_grant(
    home: &Path,
    name: &str,
    session: &str,
    store: &mut Option<CredentialStore>,
) -> Result<Option<OauthGrant>> {
    if name != "anthropic" {
        return Ok(None);
    }
    if store.is_none() {
        *store = Some(CredentialStore::open(home)?);
    }
    let Some(store) = store.as_ref() else {
        return Err(Error::new(ErrorKind::Internal, "credential store not open"));
    };
    let Some(grant) = store.load("anthropic")? else {
        return Ok(None);
    };
    if grant.kind.as_deref() != Some("oauth") {
        return Ok(None);
    }
    let file = match grant.metadata.get("credentials_file") {
        Some(f) => PathBuf::from(f),
        None => oauth::default_credentials_file().ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                "grant \"anthropic\": cannot tell where Claude Code keeps its login (HOME is not set); run `moat grant anthropic` again",
            )
        })?,
    };
    let expires_ms = grant.expires.as_deref().and_then(|e| {
        time::OffsetDateTime::parse(e, &time::format_description::well_known::Rfc3339)
            .ok()
            .map(|t| t.unix_timestamp() * 1000)
    });
    let subscription = grant.metadata.get("subscription").cloned();
    let broker = oauth::OauthBroker::new(home, name, session, file, grant.token, expires_ms)
        .margin(oauth::margin_from_env()?);
    let spec = lookup(home, "anthropic")?;
    Ok(Some((
        std::sync::Arc::new(broker),
        spec.placeholders(Some("oauth")),
        subscription,
    )))
}

type HttpGrant = (Vec<Credential>, Vec<(String, String)>, Vec<String>);

fn load_http_grant(
    home: &Path,
    name: &str,
    store: &mut Option<CredentialStore>,
) -> Result<HttpGrant> {
    {
        let provider = name.split(':').next().unwrap_or(name);
        let spec = lookup(home, provider)?;
        if provider == "ssh" {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("grant \"{name}\": ssh grants are for runs (`moat run --grant {name}`), whose filtering SSH agent uses them; a proxy alone has no SSH agent"),
            ));
        }
        if !spec.stores_secret {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("grant \"{name}\": {provider} grants are not proxy credentials; their support is not built yet"),
            ));
        }
        if store.is_none() {
            *store = Some(CredentialStore::open(home)?);
        }
        let Some(store) = store.as_ref() else {
            return Err(Error::new(ErrorKind::Internal, "credential store not open"));
        };
        let grant = store.load(provider)?.ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                format!("grant \"{name}\": no {provider} credential is stored; run `moat grant {provider}`"),
            )
        })?;
        if expired(grant.expires.as_deref()) {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "grant \"{name}\": the stored {provider} credential expired at {}; run `moat grant {provider}` again",
                    grant.expires.as_deref().unwrap_or("?")
                ),
            ));
        }
        let creds = spec.credentials(&grant)?;
        let placeholders = spec.placeholders(grant.kind.as_deref());
        Ok((creds, placeholders, spec.hosts()))
    }
}

#[cfg(test)]
mod tests;

/// Claude Code's OAuth credentials, as found in `~/.claude/.credentials.json`.
#[derive(Debug, Clone)]
pub struct ClaudeOauth {
    /// The access token.
    pub access_token: Secret<String>,
    /// The subscription (`claude_pro`, `claude_max`), if known.
    pub subscription: Option<String>,
    /// When the access token expires (RFC 3339), if known.
    pub expires: Option<String>,
    /// The file it was read from: runs refresh the login with it.
    pub file: PathBuf,
    /// Whether the file holds a refresh token.
    pub refreshable: bool,
}

/// Reads Claude Code's OAuth credentials from `<user_home>/.claude/.credentials.json`.
/// `Ok(None)` when the file does not exist.
pub fn claude_code_credentials(user_home: &Path) -> Result<Option<ClaudeOauth>> {
    claude_code_credentials_at(&user_home.join(".claude").join(".credentials.json"))
}

/// Reads Claude Code's OAuth credentials from `path`. `Ok(None)` when the
/// file does not exist.
pub fn claude_code_credentials_at(path: &Path) -> Result<Option<ClaudeOauth>> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        _ => {}
    }
    let login = oauth::read_login(path)?;
    let expires = login
        .expires_ms
        .and_then(|ms| time::OffsetDateTime::from_unix_timestamp(ms / 1000).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        });
    Ok(Some(ClaudeOauth {
        file: path.to_path_buf(),
        refreshable: login.refresh.is_some(),
        access_token: Secret::new(login.access),
        subscription: login.subscription,
        expires,
    }))
}

/// What [`grant`] did.
#[derive(Debug, Clone, Serialize)]
pub struct GrantOutcome {
    /// The stored grant, without the token.
    pub grant: GrantInfo,
    /// The file it is in.
    pub path: PathBuf,
    /// The key file, when the key is not in the system keyring.
    pub key_file: Option<PathBuf>,
    /// Why the key file is used (the keyring's error, or the setting).
    pub key_reason: Option<String>,
}

/// Where a token for [`grant`] comes from.
#[derive(Debug, Clone)]
pub enum TokenInput {
    /// A token given by the caller, with its source (`argument`, `prompt`, `gh`).
    Given(Secret<String>, String),
    /// The provider's environment variables.
    Environment,
    /// Claude Code's OAuth credentials (anthropic only).
    ClaudeCode(ClaudeOauth),
}

/// Stores a grant without prompting: the token comes from `input`; GitHub
/// tokens are checked against the API unless `validate` is false. A missing
/// token is an error naming the variables to set.
pub fn grant(
    home: &Path,
    provider: &str,
    input: TokenInput,
    validate: bool,
) -> Result<GrantOutcome> {
    let spec = lookup(home, provider)?;
    if !spec.stores_secret {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            match provider {
                "aws" => "aws grants name a role: moat grant aws --role=ARN".to_string(),
                _ => format!("{provider} grants name a host: moat grant {provider} --host <host>"),
            },
        ));
    }
    let (token, mut meta) = match input {
        TokenInput::Given(token, source) => (
            token,
            GrantMeta {
                source,
                ..GrantMeta::default()
            },
        ),
        TokenInput::Environment => {
            let (token, source) = token_from_env(&spec).ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "no {provider} token: set {} (or run `moat grant {provider}` in a terminal)",
                        spec.env.join(" or ")
                    ),
                )
            })?;
            (
                token,
                GrantMeta {
                    source,
                    ..GrantMeta::default()
                },
            )
        }
        TokenInput::ClaudeCode(oauth) => {
            if expired(oauth.expires.as_deref()) && !oauth.refreshable {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "the Claude Code credentials expired at {} and hold no refresh token; log in with `claude` again",
                        oauth.expires.as_deref().unwrap_or("?")
                    ),
                ));
            }
            let mut metadata = BTreeMap::new();
            // Runs refresh the login with this file and write the new
            // tokens back to it; the refresh token is never copied.
            metadata.insert(
                "credentials_file".into(),
                oauth.file.to_string_lossy().into_owned(),
            );
            if let Some(s) = &oauth.subscription {
                metadata.insert("subscription".into(), s.clone());
            }
            (
                oauth.access_token,
                GrantMeta {
                    source: "claude-code".into(),
                    kind: Some("oauth".into()),
                    expires: oauth.expires,
                    metadata,
                },
            )
        }
    };
    if provider == "anthropic" && meta.kind.is_none() {
        meta.kind = Some("api_key".into());
    }
    if provider == "github" && validate {
        let login = crate::rt::block_on(github_login(&token))??;
        meta.metadata.insert("login".into(), login);
    }
    let (path, key) = save(home, provider, token, meta)?;
    let info = list(home)?
        .into_iter()
        .find(|g| g.provider == provider)
        .ok_or_else(|| Error::new(ErrorKind::Internal, "the stored grant is not listed"))?;
    Ok(GrantOutcome {
        grant: info,
        path,
        key_file: match &key {
            KeySource::Keyring => None,
            KeySource::File { path, .. } => Some(path.clone()),
        },
        key_reason: match key {
            KeySource::Keyring => None,
            KeySource::File { reason, .. } => Some(reason),
        },
    })
}
