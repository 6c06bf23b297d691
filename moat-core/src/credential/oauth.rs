//! Claude Code's OAuth login (a Pro or Max subscription), kept fresh on the
//! host. Its access tokens expire after hours; the refresh token that makes
//! new ones stays on the host, in Claude Code's own credentials file, and
//! never enters a container.
//!
//! [`OauthBroker`] is the proxy phase of an `anthropic` grant imported from
//! Claude Code:
//! - it puts the current access token on requests to `api.anthropic.com`
//!   (the container holds a placeholder);
//! - when a request comes within the margin of the token's expiry (5
//!   minutes by default, `MOAT_OAUTH_REFRESH_MARGIN` seconds), or after the
//!   API refused the token once (401), it refreshes first: under a file lock
//!   in the moat home, so that concurrent runs share one refresh; it takes
//!   up a fresher login already in the host's credentials file (another run,
//!   or the host's own `claude`, refreshed it), or else asks the token
//!   endpoint and writes the rotated tokens back to that file atomically, so
//!   the host's `claude` keeps working;
//! - it answers Claude Code's own refresh requests (to the token endpoint)
//!   in the container with placeholders, after refreshing on the host;
//! - each refresh, and each failure, is an audit event (never a token). When
//!   a refresh fails and the token has expired, API requests are answered
//!   with a 401 that says what failed and what to do; the host file is left
//!   as it was.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::BodyExt;
use rustls_pki_types::CertificateDer;

use crate::error::{Error, ErrorKind, Result};
use crate::policy::HostPattern;
use crate::proxy::phase::{Answer, Injected, Injection, Phase, RequestHead};
use crate::proxy::upstream::ResolveMap;
use crate::secret::Secret;
use crate::trace::AuditEvent;

/// Claude Code's token endpoint.
pub const TOKEN_URL: &str = "https://platform.claude.com/v1/oauth/token";
/// The hosts where Claude Code has asked for tokens (now and before).
pub const TOKEN_HOSTS: &[&str] = &["platform.claude.com", "console.anthropic.com"];
/// The token endpoint's path.
pub const TOKEN_PATH: &str = "/v1/oauth/token";
/// Claude Code's OAuth client id.
pub const CLIENT_ID: &str = "9d1c250a-e61b-44d9-88ed-5944d1962f5e";
/// The API host the access token is for.
pub const API_HOST: &str = "api.anthropic.com";
/// The `anthropic-beta` value the API wants with an OAuth token.
pub const OAUTH_BETA: &str = "oauth-2025-04-20";
/// The access token a container holds in place of the real one.
pub const PLACEHOLDER_ACCESS: &str = "sk-ant-oat01-moat-placeholder";
/// The refresh token a container holds in place of the real one.
pub const PLACEHOLDER_REFRESH: &str = "sk-ant-ort01-moat-placeholder";
/// How long before its expiry a token is refreshed, by default.
pub const DEFAULT_MARGIN: Duration = Duration::from_secs(300);
/// The scopes asked for when the credentials file names none.
const DEFAULT_SCOPES: &str = "user:profile user:inference user:sessions:claude_code";

/// Where Claude Code keeps its login on a host: `~/.claude/.credentials.json`
/// (or under `CLAUDE_CONFIG_DIR`).
pub fn default_credentials_file() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("CLAUDE_CONFIG_DIR").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(dir).join(".credentials.json"));
    }
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(|h| PathBuf::from(h).join(".claude").join(".credentials.json"))
}

/// The refresh margin: `MOAT_OAUTH_REFRESH_MARGIN` (seconds) or 5 minutes.
pub fn margin_from_env() -> Result<Duration> {
    match std::env::var("MOAT_OAUTH_REFRESH_MARGIN") {
        Ok(v) if !v.is_empty() => v
            .trim()
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| {
                Error::new(
                    ErrorKind::InvalidArgument,
                    format!("MOAT_OAUTH_REFRESH_MARGIN=\"{v}\": not a number of seconds"),
                )
            }),
        _ => Ok(DEFAULT_MARGIN),
    }
}

#[derive(Debug)]
struct Tokens {
    access: Secret<String>,
    /// Milliseconds since the epoch, if known.
    expires_ms: Option<i64>,
    /// The API refused the current token (401) and no refresh has run since.
    refused: bool,
    /// When the last refresh (or attempt) ended.
    last_attempt: Option<Instant>,
}

/// The proxy phase of an OAuth `anthropic` grant; see the module docs.
#[derive(Debug)]
pub struct OauthBroker {
    grant: String,
    client: String,
    lock_file: PathBuf,
    file: PathBuf,
    token_url: String,
    margin: Duration,
    /// Extra roots and overrides for the token endpoint (tests, operators);
    /// the environment's (`MOAT_UPSTREAM_CA_FILE`, `MOAT_RESOLVE`) when `None`.
    endpoint: Option<(Vec<CertificateDer<'static>>, ResolveMap)>,
    tokens: Mutex<Tokens>,
    flight: tokio::sync::Mutex<()>,
}

impl OauthBroker {
    /// A broker for `grant`, starting from `access` (expiring at
    /// `expires_ms`), refreshing with the login in `file`. Its lock lives
    /// in `home`.
    pub fn new(
        home: &Path,
        grant: &str,
        client: &str,
        file: PathBuf,
        access: Secret<String>,
        expires_ms: Option<i64>,
    ) -> OauthBroker {
        OauthBroker {
            grant: grant.to_string(),
            client: client.to_string(),
            lock_file: home.join("credentials").join(".oauth-refresh.lock"),
            file,
            token_url: TOKEN_URL.to_string(),
            margin: DEFAULT_MARGIN,
            endpoint: None,
            tokens: Mutex::new(Tokens {
                access,
                expires_ms,
                refused: false,
                last_attempt: None,
            }),
            flight: tokio::sync::Mutex::new(()),
        }
    }

    /// Refreshes this long before expiry.
    pub fn margin(mut self, margin: Duration) -> OauthBroker {
        self.margin = margin;
        self
    }

    /// Reaches the token endpoint with these extra roots and overrides.
    pub fn endpoint(
        mut self,
        roots: Vec<CertificateDer<'static>>,
        resolve: ResolveMap,
    ) -> OauthBroker {
        self.endpoint = Some((roots, resolve));
        self
    }

    /// The credentials file it refreshes with.
    pub fn file(&self) -> &Path {
        &self.file
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Tokens> {
        // A poisoned lock still holds valid tokens.
        self.tokens.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why the current token must be refreshed before use, if it must.
    fn due(&self) -> Option<&'static str> {
        let t = self.state();
        if t.refused {
            return Some("refused");
        }
        let expires = t.expires_ms?;
        (expires - now_ms() <= self.margin.as_millis() as i64).then_some("expiring")
    }

    /// Refreshes (once for concurrent callers in this process and, through
    /// the file lock, across processes) when due. The audit events, and an
    /// error when the token is no longer usable.
    pub async fn ensure_fresh(&self) -> (Vec<AuditEvent>, std::result::Result<(), String>) {
        if self.due().is_none() {
            return (Vec::new(), Ok(()));
        }
        let _flight = self.flight.lock().await;
        // Another caller may have refreshed while this one waited.
        let Some(reason) = self.due() else {
            return (Vec::new(), Ok(()));
        };
        let result = self.refresh().await;
        let mut t = self.state();
        t.last_attempt = Some(Instant::now());
        match result {
            Ok((access, expires_ms, how)) => {
                t.access = access;
                t.expires_ms = expires_ms;
                t.refused = false;
                let event = AuditEvent::CredentialRefreshed {
                    client: self.client.clone(),
                    grant: self.grant.clone(),
                    how,
                    reason: reason.to_string(),
                    expires: expires_ms.and_then(rfc3339_ms),
                };
                (vec![event], Ok(()))
            }
            Err(e) => {
                let error = e.to_string();
                let event = AuditEvent::CredentialRefreshFailed {
                    client: self.client.clone(),
                    grant: self.grant.clone(),
                    error: error.clone(),
                };
                // A token that has not expired is still used; a refused
                // one is not retried until the next request.
                let usable = !t.refused && t.expires_ms.is_none_or(|e| e > now_ms());
                t.refused = false;
                (vec![event], if usable { Ok(()) } else { Err(error) })
            }
        }
    }

    /// Under the file lock: takes up a fresher login from the credentials
    /// file, or refreshes with its refresh token and writes the new tokens
    /// back. The new access token, its expiry and how it was had.
    async fn refresh(&self) -> Result<(Secret<String>, Option<i64>, String)> {
        let lock_file = self.lock_file.clone();
        let lock = tokio::task::spawn_blocking(move || {
            if let Some(dir) = lock_file.parent() {
                crate::paths::private_dir(dir)?;
            }
            crate::paths::FileLock::acquire(&lock_file)
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, format!("lock task: {e}")))??;
        let stored = read_login(&self.file)?;
        let current = self.state().access.expose().clone();
        let margin = self.margin.as_millis() as i64;
        if stored.access != current && stored.expires_ms.is_some_and(|e| e - now_ms() > margin) {
            drop(lock);
            return Ok((
                Secret::new(stored.access),
                stored.expires_ms,
                "adopted".into(),
            ));
        }
        let refresh = stored.refresh.ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "{}: the Claude Code login has no refresh token; log in with `claude` on the host, then run `moat grant anthropic` again",
                    self.file.display()
                ),
            )
        })?;
        let fresh = self.ask(&refresh, &stored.scopes).await?;
        // The endpoint has rotated the tokens: whatever happens to the file,
        // the new ones are used (they are the only valid ones now), and a
        // failed write is said in the audit event, never dropped.
        let how = match write_login(&self.file, &fresh) {
            Ok(()) => "refreshed".to_string(),
            Err(e) => format!(
                "refreshed, but not written back ({e}); log in with `claude` on the host again"
            ),
        };
        drop(lock);
        Ok((Secret::new(fresh.access), fresh.expires_ms, how))
    }

    /// POSTs the refresh to the token endpoint.
    async fn ask(&self, refresh: &str, scopes: &str) -> Result<Login> {
        let client = match &self.endpoint {
            Some((roots, resolve)) => crate::proxy::upstream::own_client_with(
                roots,
                resolve.clone(),
                Duration::from_secs(15),
            )?,
            None => crate::proxy::upstream::own_client(Duration::from_secs(15))?,
        };
        let body = serde_json::json!({
            "grant_type": "refresh_token",
            "refresh_token": refresh,
            "client_id": CLIENT_ID,
            "scope": scopes,
        });
        let req = http::Request::post(&self.token_url)
            .header("content-type", "application/json")
            .header("user-agent", concat!("moat/", env!("CARGO_PKG_VERSION")))
            .body(http_body_util::Full::new(Bytes::from(body.to_string())))
            .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?;
        let failed = |why: String| {
            Error::new(
                ErrorKind::Io,
                format!(
                    "refreshing the Claude Code login at {}: {why}",
                    self.token_url
                ),
            )
        };
        let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
            .await
            .map_err(|_| failed("no answer within 20 s".into()))?
            .map_err(|e| failed(e.to_string()))?;
        let status = resp.status();
        let body = tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect())
            .await
            .map_err(|_| failed("the answer did not finish within 20 s".into()))?
            .map_err(|e| failed(e.to_string()))?
            .to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        if !status.is_success() {
            let what = json
                .get("error")
                .and_then(|e| {
                    e.as_str()
                        .map(str::to_string)
                        .or_else(|| Some(e.to_string()))
                })
                .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect());
            return Err(failed(format!(
                "the endpoint answered {status} ({what}); log in with `claude` on the host, then run `moat grant anthropic` again"
            )));
        }
        let access = json
            .get("access_token")
            .and_then(|v| v.as_str())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| failed("the answer has no access_token".into()))?;
        let expires_ms = json
            .get("expires_in")
            .and_then(|v| v.as_i64())
            .map(|s| now_ms() + s * 1000);
        Ok(Login {
            access: access.to_string(),
            refresh: json
                .get("refresh_token")
                .and_then(|v| v.as_str())
                .filter(|v| !v.is_empty())
                .map(str::to_string)
                .or_else(|| Some(refresh.to_string())),
            expires_ms,
            scopes: scopes.to_string(),
            subscription: None,
        })
    }

    /// The placeholder answer to Claude Code's own refresh in the container.
    fn placeholder_tokens(&self) -> Answer {
        let expires_in = self
            .state()
            .expires_ms
            .map_or(3600, |e| ((e - now_ms()) / 1000).max(60));
        let body = serde_json::json!({
            "access_token": PLACEHOLDER_ACCESS,
            "refresh_token": PLACEHOLDER_REFRESH,
            "expires_in": expires_in,
            "token_type": "Bearer",
            "scope": DEFAULT_SCOPES,
        });
        Answer {
            status: StatusCode::OK,
            content_type: "application/json",
            body: body.to_string().into(),
            audit: None,
            denied: None,
            error: None,
        }
    }
}

#[async_trait::async_trait]
impl Phase for OauthBroker {
    async fn respond(&self, request: &RequestHead<'_>) -> Option<Answer> {
        let path = request.path.split('?').next().unwrap_or("");
        if request.port != 443 || !TOKEN_HOSTS.contains(&request.host) || path != TOKEN_PATH {
            return None;
        }
        if request.method != Method::POST {
            return Some(Answer::text(
                StatusCode::METHOD_NOT_ALLOWED,
                "Moat: the token endpoint answers POST\n",
            ));
        }
        // Claude Code thinks its token expired: refresh on the host (if it
        // is due) and give it placeholders again.
        let (events, result) = self.ensure_fresh().await;
        let mut answer = match result {
            Ok(()) => self.placeholder_tokens(),
            Err(e) => {
                let mut a = api_error(&e);
                a.status = StatusCode::BAD_REQUEST;
                a.error = Some(e);
                a
            }
        };
        answer.audit = events.into_iter().next();
        Some(answer)
    }

    fn injects_for(&self, host: &str, port: u16) -> bool {
        port == 443 && host == API_HOST
    }

    async fn inject(
        &self,
        host: &str,
        port: u16,
        headers: &mut HeaderMap,
    ) -> std::result::Result<Injected, Answer> {
        if !self.injects_for(host, port) {
            return Ok(Injected::default());
        }
        let (audit, result) = self.ensure_fresh().await;
        if let Err(e) = result {
            let mut answer = api_error(&e);
            answer.error = Some(e);
            answer.audit = audit.into_iter().next();
            return Err(answer);
        }
        let value = format!("Bearer {}", self.state().access.expose());
        let mut value = HeaderValue::from_str(&value).map_err(|_| {
            let mut a = api_error("the stored Claude Code token has characters a header cannot carry; run `moat grant anthropic` again");
            a.error = Some("bad token".into());
            a
        })?;
        value.set_sensitive(true);
        headers.remove(http::header::AUTHORIZATION);
        headers.remove("x-api-key");
        headers.insert(http::header::AUTHORIZATION, value);
        let beta: Vec<String> = headers
            .get_all("anthropic-beta")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect();
        if !beta.iter().any(|b| b == OAUTH_BETA) {
            let mut all = beta;
            all.push(OAUTH_BETA.to_string());
            if let Ok(v) = HeaderValue::from_str(&all.join(",")) {
                headers.insert("anthropic-beta", v);
            }
        }
        Ok(Injected {
            injections: vec![Injection {
                grant: self.grant.clone(),
                header: http::header::AUTHORIZATION,
            }],
            audit,
        })
    }

    fn observe(&self, host: &str, port: u16, status: StatusCode) {
        if status != StatusCode::UNAUTHORIZED || !self.injects_for(host, port) {
            return;
        }
        // Once: not again right after a refresh (the new token was refused
        // too, and refreshing again would not help).
        let mut t = self.state();
        if t.last_attempt
            .is_none_or(|at| at.elapsed() > Duration::from_secs(30))
        {
            t.refused = true;
        }
    }

    fn hosts(&self) -> Vec<(HostPattern, String)> {
        std::iter::once(API_HOST)
            .chain(TOKEN_HOSTS.iter().copied())
            .filter_map(|h| HostPattern::parse(h).ok())
            .map(|h| (h, self.grant.clone()))
            .collect()
    }
}

/// An answer in the API's own error shape, which Claude Code shows.
fn api_error(message: &str) -> Answer {
    let body = serde_json::json!({
        "type": "error",
        "error": {
            "type": "authentication_error",
            "message": format!("moat: {message}"),
        },
    });
    Answer {
        status: StatusCode::UNAUTHORIZED,
        content_type: "application/json",
        body: body.to_string().into(),
        audit: None,
        denied: None,
        error: None,
    }
}

/// A login read from, or written to, Claude Code's credentials file.
#[derive(Debug)]
pub(crate) struct Login {
    pub(crate) access: String,
    pub(crate) refresh: Option<String>,
    pub(crate) expires_ms: Option<i64>,
    pub(crate) scopes: String,
    pub(crate) subscription: Option<String>,
}

/// Reads Claude Code's login from its credentials file.
pub(crate) fn read_login(path: &Path) -> Result<Login> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, "read", e))?;
    let bad = || {
        Error::new(
            ErrorKind::Config,
            format!(
                "{}: not Claude Code credentials (no claudeAiOauth.accessToken)",
                path.display()
            ),
        )
    };
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|_| bad())?;
    let oauth = json.get("claudeAiOauth").ok_or_else(bad)?;
    let access = oauth
        .get("accessToken")
        .and_then(|v| v.as_str())
        .filter(|v| !v.is_empty())
        .ok_or_else(bad)?;
    let scopes = oauth
        .get("scopes")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_SCOPES.to_string());
    Ok(Login {
        access: access.to_string(),
        refresh: oauth
            .get("refreshToken")
            .and_then(|v| v.as_str())
            .filter(|v| !v.is_empty())
            .map(str::to_string),
        expires_ms: oauth.get("expiresAt").and_then(|v| v.as_i64()),
        scopes,
        subscription: oauth
            .get("subscriptionType")
            .and_then(|s| s.as_str())
            .map(str::to_string),
    })
}

/// Writes the new tokens into the credentials file, keeping everything
/// else in it: a new file beside it, synced, renamed over it (same mode).
fn write_login(path: &Path, login: &Login) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, "read", e))?;
    let mut json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        Error::new(
            ErrorKind::Config,
            format!("{}: not json: {e}", path.display()),
        )
    })?;
    let oauth = json
        .get_mut("claudeAiOauth")
        .and_then(|o| o.as_object_mut())
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                format!("{}: no claudeAiOauth", path.display()),
            )
        })?;
    oauth.insert("accessToken".into(), login.access.clone().into());
    if let Some(r) = &login.refresh {
        oauth.insert("refreshToken".into(), r.clone().into());
    }
    if let Some(e) = login.expires_ms {
        oauth.insert("expiresAt".into(), e.into());
    }
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, "read", e))?;
    let tmp = path.with_file_name(format!(
        ".{}.moat-{}",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(json.to_string().as_bytes())?;
        f.sync_all()?;
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&tmp, Some(meta.uid()), Some(meta.gid()))?;
        }
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(meta.mode() & 0o777))?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, "write the refreshed login to", e));
    }
    Ok(())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn rfc3339_ms(ms: i64) -> Option<String> {
    time::OffsetDateTime::from_unix_timestamp(ms / 1000)
        .ok()?
        .format(&time::format_description::well_known::Rfc3339)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_login_is_written_back_keeping_everything_else() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join(".credentials.json");
        std::fs::write(
            &path,
            r#"{"claudeAiOauth":{"accessToken":"a1","refreshToken":"r1","expiresAt":5,"scopes":["user:inference"],"subscriptionType":"max"},"other":{"k":1}}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let login = read_login(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (
                login.access.as_str(),
                login.refresh.as_deref(),
                login.scopes.as_str()
            ),
            ("a1", Some("r1"), "user:inference")
        );
        write_login(
            &path,
            &Login {
                access: "a2".into(),
                refresh: Some("r2".into()),
                expires_ms: Some(99),
                scopes: String::new(),
                subscription: None,
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_default())
                .unwrap_or_default();
        assert_eq!(json["claudeAiOauth"]["accessToken"], "a2");
        assert_eq!(json["claudeAiOauth"]["refreshToken"], "r2");
        assert_eq!(json["claudeAiOauth"]["expiresAt"], 99);
        assert_eq!(json["claudeAiOauth"]["subscriptionType"], "max");
        assert_eq!(json["other"]["k"], 1);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert_eq!(names.len(), 1, "no temporary file is left: {names:?}");
    }

    #[test]
    fn a_file_that_is_not_a_login_is_named() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("c.json");
        std::fs::write(&path, "{}").unwrap_or_else(|e| panic!("{e}"));
        let err = read_login(&path).map(|_| ()).unwrap_err().to_string();
        assert!(
            err.contains("c.json") && err.contains("claudeAiOauth"),
            "{err}"
        );
    }
}
