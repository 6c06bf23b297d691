//! AWS grants: an IAM role that runs assume through STS.
//!
//! `moat grant aws --role=ARN [--region] [--session-duration] [--external-id]`
//! stores role configuration only (`$MOAT_HOME/aws-grant.json`, 0600). When
//! a proxy client has the `aws` grant, the proxy assumes the role with the
//! host's AWS credentials (a SigV4-signed `AssumeRole`, [`assume_role`]) and
//! serves the short-lived session credentials, in `credential_process`
//! format, at `http://moat.internal/aws/credentials` to that client only
//! (its proxy token is the authentication). They are refreshed five minutes
//! before they expire. Long-lived keys never leave the host.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use hmac::{Hmac, Mac};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, ErrorKind, Result};
use crate::paths;
use crate::secret::Secret;

/// The host a run's `credential_process` helper asks (through the proxy).
pub const CREDENTIALS_HOST: &str = crate::proxy::phase::INTERNAL_HOST;
/// The path it asks.
pub const CREDENTIALS_PATH: &str = "/aws/credentials";

/// The stored role configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AwsRole {
    /// `arn:aws:iam::123456789012:role/AgentRole`.
    pub role_arn: String,
    /// STS region (default `us-east-1`).
    pub region: String,
    /// Session length in seconds (900 to 43200; default 900).
    pub session_duration: u32,
    /// The role's external id, if its trust policy requires one.
    pub external_id: Option<String>,
    /// When it was granted.
    pub created: String,
}

fn bad(message: String) -> Error {
    Error::new(ErrorKind::InvalidArgument, message)
}

/// Parses `15m`, `1h`, `3600s` or `3600` into seconds.
pub fn parse_duration(text: &str) -> Result<u32> {
    let t = text.trim();
    let (num, mult) = if let Some(n) = t.strip_suffix('h') {
        (n, 3600)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1)
    } else {
        (t, 1)
    };
    let secs = num
        .parse::<u32>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| {
            bad(format!(
                "session duration: \"{text}\" is not a duration like 15m or 1h"
            ))
        })?;
    if !(900..=43200).contains(&secs) {
        return Err(bad(format!(
            "session duration: {secs} s is outside what STS allows (15m to 12h)"
        )));
    }
    Ok(secs)
}

/// Validates and stores the role configuration.
pub fn grant(
    home: &Path,
    role_arn: &str,
    region: Option<&str>,
    session_duration: Option<u32>,
    external_id: Option<&str>,
) -> Result<AwsRole> {
    let parts: Vec<&str> = role_arn.split(':').collect();
    let ok = parts.len() == 6
        && parts[0] == "arn"
        && parts[1].starts_with("aws")
        && parts[2] == "iam"
        && parts[4].len() == 12
        && parts[4].bytes().all(|b| b.is_ascii_digit())
        && parts[5]
            .strip_prefix("role/")
            .is_some_and(|n| !n.is_empty());
    if !ok {
        return Err(bad(format!(
            "role: \"{role_arn}\" is not an IAM role ARN like arn:aws:iam::123456789012:role/AgentRole"
        )));
    }
    let region = region.unwrap_or("us-east-1");
    if region.is_empty()
        || !region
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(bad(format!("region: \"{region}\" is not an AWS region")));
    }
    let session_duration = session_duration.unwrap_or(900);
    if !(900..=43200).contains(&session_duration) {
        return Err(bad(format!(
            "session duration: {session_duration} s is outside what STS allows (15m to 12h)"
        )));
    }
    let role = AwsRole {
        role_arn: role_arn.to_string(),
        region: region.to_string(),
        session_duration,
        external_id: external_id.map(str::to_string),
        created: crate::trace::now_rfc3339(),
    };
    paths::private_dir(home)?;
    let data = serde_json::to_vec_pretty(&role)
        .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?;
    paths::write_private(&home.join("aws-grant.json"), &data, 0o600)?;
    Ok(role)
}

/// The stored role, if any.
pub fn load(home: &Path) -> Result<Option<AwsRole>> {
    let path = home.join("aws-grant.json");
    match std::fs::read(&path) {
        Ok(d) => serde_json::from_slice(&d).map(Some).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "{}: not an aws grant ({e}); run `moat grant aws --role=ARN` again",
                    path.display()
                ),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(&path, "read", e)),
    }
}

/// Removes the stored role; `Ok(false)` when there was none.
pub fn revoke(home: &Path) -> Result<bool> {
    let path = home.join("aws-grant.json");
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(&path, "remove", e)),
    }
}

/// AWS credentials: the host's long-lived ones, or a session's.
#[derive(Debug, Clone)]
pub struct AwsCredentials {
    /// Access key id (not secret).
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: Secret<String>,
    /// Session token, for temporary credentials.
    pub session_token: Option<Secret<String>>,
    /// When they expire (RFC 3339), for temporary credentials.
    pub expiration: Option<String>,
}

/// The host's AWS credentials: `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`
/// (/ `AWS_SESSION_TOKEN`), else the `AWS_PROFILE` (or `default`) profile of
/// `~/.aws/credentials` (`AWS_SHARED_CREDENTIALS_FILE` relocates it).
pub fn host_credentials() -> Result<AwsCredentials> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if let (Some(id), Some(secret)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
        return Ok(AwsCredentials {
            access_key_id: id,
            secret_access_key: Secret::new(secret),
            session_token: env("AWS_SESSION_TOKEN").map(Secret::new),
            expiration: None,
        });
    }
    let file = env("AWS_SHARED_CREDENTIALS_FILE")
        .map(std::path::PathBuf::from)
        .or_else(|| env("HOME").map(|h| Path::new(&h).join(".aws").join("credentials")));
    let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
    let missing = || {
        Error::new(
            ErrorKind::Config,
            format!("no AWS credentials on this host: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or add a [{profile}] profile to ~/.aws/credentials"),
        )
    };
    let Some(file) = file else {
        return Err(missing());
    };
    let Ok(text) = std::fs::read_to_string(&file) else {
        return Err(missing());
    };
    let mut in_profile = false;
    let (mut id, mut secret, mut token) = (None, None, None);
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_profile = name.trim() == profile;
            continue;
        }
        if !in_profile {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim().to_string();
            match k.trim() {
                "aws_access_key_id" => id = Some(v),
                "aws_secret_access_key" => secret = Some(v),
                "aws_session_token" => token = Some(v),
                _ => {}
            }
        }
    }
    match (id, secret) {
        (Some(id), Some(secret)) => Ok(AwsCredentials {
            access_key_id: id,
            secret_access_key: Secret::new(secret),
            session_token: token.map(Secret::new),
            expiration: None,
        }),
        _ => Err(missing()),
    }
}

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length; this cannot fail.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return Vec::new(),
    };
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A request to sign with AWS Signature Version 4.
#[derive(Debug)]
pub struct SignRequest<'a> {
    /// HTTP method.
    pub method: &'a str,
    /// Host header value.
    pub host: &'a str,
    /// Canonical URI path (already encoded).
    pub path: &'a str,
    /// Canonical query string (already sorted and encoded).
    pub query: &'a str,
    /// Extra headers to sign (lowercase names), besides host and x-amz-date.
    pub headers: &'a [(&'a str, &'a str)],
    /// The body.
    pub body: &'a [u8],
    /// `YYYYMMDDTHHMMSSZ`.
    pub amz_date: &'a str,
    /// Region.
    pub region: &'a str,
    /// Service (`sts`).
    pub service: &'a str,
}

/// The `Authorization` header value of SigV4 for `req` signed with `creds`.
/// (`x-amz-security-token`, when the credentials have a session token, must
/// be among `req.headers`.)
pub fn sigv4_authorization(req: &SignRequest<'_>, creds: &AwsCredentials) -> String {
    let mut headers: Vec<(String, String)> = vec![
        ("host".into(), req.host.to_string()),
        ("x-amz-date".into(), req.amz_date.to_string()),
    ];
    headers.extend(
        req.headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string())),
    );
    headers.sort();
    let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let signed: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
    let signed = signed.join(";");
    let canonical = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        req.method,
        req.path,
        req.query,
        canonical_headers,
        signed,
        hex(&Sha256::digest(req.body))
    );
    let date = &req.amz_date[..8.min(req.amz_date.len())];
    let scope = format!("{date}/{}/{}/aws4_request", req.region, req.service);
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{}\n{scope}\n{}",
        req.amz_date,
        hex(&Sha256::digest(canonical.as_bytes()))
    );
    let k_date = hmac(
        format!("AWS4{}", creds.secret_access_key.expose()).as_bytes(),
        date.as_bytes(),
    );
    let k_region = hmac(&k_date, req.region.as_bytes());
    let k_service = hmac(&k_region, req.service.as_bytes());
    let k_signing = hmac(&k_service, b"aws4_request");
    let signature = hex(&hmac(&k_signing, to_sign.as_bytes()));
    format!(
        "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed}, Signature={signature}",
        creds.access_key_id
    )
}

fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn xml_field<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&close)? + start;
    Some(&xml[start..end])
}

/// Assumes `role` with `host` credentials through STS; returns the session.
pub async fn assume_role(
    role: &AwsRole,
    host: &AwsCredentials,
    session_name: &str,
) -> Result<AwsCredentials> {
    let sts_host = format!("sts.{}.amazonaws.com", role.region);
    let mut form = vec![
        ("Action", "AssumeRole".to_string()),
        ("DurationSeconds", role.session_duration.to_string()),
        ("RoleArn", role.role_arn.clone()),
        ("RoleSessionName", session_name.to_string()),
        ("Version", "2011-06-15".to_string()),
    ];
    if let Some(ext) = &role.external_id {
        form.push(("ExternalId", ext.clone()));
    }
    form.sort();
    let body: String = form
        .iter()
        .map(|(k, v)| format!("{k}={}", form_encode(v)))
        .collect::<Vec<_>>()
        .join("&");
    let amz_date = time::OffsetDateTime::now_utc()
        .format(time::macros::format_description!(
            "[year][month][day]T[hour][minute][second]Z"
        ))
        .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?;
    let content_type = "application/x-www-form-urlencoded; charset=utf-8";
    let token = host.session_token.as_ref().map(|t| t.expose().clone());
    let mut signed_headers = vec![("content-type", content_type)];
    if let Some(t) = &token {
        signed_headers.push(("x-amz-security-token", t.as_str()));
    }
    let authorization = sigv4_authorization(
        &SignRequest {
            method: "POST",
            host: &sts_host,
            path: "/",
            query: "",
            headers: &signed_headers,
            body: body.as_bytes(),
            amz_date: &amz_date,
            region: &role.region,
            service: "sts",
        },
        host,
    );
    let mut req = http::Request::post(format!("https://{sts_host}/"))
        .header("content-type", content_type)
        .header("x-amz-date", &amz_date)
        .header("authorization", authorization);
    if let Some(t) = &token {
        req = req.header("x-amz-security-token", t.as_str());
    }
    let req = req
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?;
    let failed = |why: String| {
        Error::new(
            ErrorKind::Io,
            format!("sts AssumeRole of {} failed: {why}", role.role_arn),
        )
    };
    let client = crate::proxy::upstream::own_client(Duration::from_secs(15))?;
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .map_err(|_| failed("timed out".into()))?
        .map_err(|e| failed(e.to_string()))?;
    let status = resp.status();
    let text = resp
        .into_body()
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .map_err(|e| failed(e.to_string()))?;
    if !status.is_success() {
        let msg = xml_field(&text, "Message").unwrap_or("no message");
        return Err(failed(format!("{status}: {msg}")));
    }
    let field = |tag: &str| {
        xml_field(&text, tag)
            .map(str::to_string)
            .ok_or_else(|| failed(format!("the answer has no {tag}")))
    };
    Ok(AwsCredentials {
        access_key_id: field("AccessKeyId")?,
        secret_access_key: Secret::new(field("SecretAccessKey")?),
        session_token: Some(Secret::new(field("SessionToken")?)),
        expiration: Some(field("Expiration")?),
    })
}

/// A role assumed on demand and kept until five minutes before it expires.
pub struct RoleSession {
    role: AwsRole,
    host: AwsCredentials,
    session_name: String,
    cached: tokio::sync::Mutex<Option<AwsCredentials>>,
    fetches: Mutex<u64>,
}

impl std::fmt::Debug for RoleSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoleSession")
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

fn expires_soon(expiration: Option<&str>) -> bool {
    let Some(e) = expiration else { return true };
    match time::OffsetDateTime::parse(e, &time::format_description::well_known::Rfc3339) {
        Ok(at) => at - time::OffsetDateTime::now_utc() < time::Duration::minutes(5),
        Err(_) => true,
    }
}

impl RoleSession {
    /// A session for `role`, assumed with `host` credentials when first asked.
    pub fn new(role: AwsRole, host: AwsCredentials, session_name: &str) -> RoleSession {
        RoleSession {
            role,
            host,
            session_name: session_name
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || "=,.@-_".contains(*c))
                .take(64)
                .collect(),
            cached: tokio::sync::Mutex::new(None),
            fetches: Mutex::new(0),
        }
    }

    /// Current session credentials, assuming the role again when they are
    /// missing or expire within five minutes.
    pub async fn credentials(&self) -> Result<AwsCredentials> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref() {
            if !expires_soon(c.expiration.as_deref()) {
                return Ok(c.clone());
            }
        }
        let fresh = assume_role(&self.role, &self.host, &self.session_name).await?;
        if let Ok(mut n) = self.fetches.lock() {
            *n += 1;
        }
        *cached = Some(fresh.clone());
        Ok(fresh)
    }

    /// The role's ARN.
    pub fn role_arn(&self) -> &str {
        &self.role.role_arn
    }

    /// How many times the role was assumed.
    pub fn fetch_count(&self) -> u64 {
        self.fetches.lock().map(|n| *n).unwrap_or(0)
    }

    /// The credentials as `credential_process` prints them.
    pub fn process_json(creds: &AwsCredentials) -> String {
        serde_json::json!({
            "Version": 1,
            "AccessKeyId": creds.access_key_id,
            "SecretAccessKey": creds.secret_access_key.expose(),
            "SessionToken": creds.session_token.as_ref().map(|t| t.expose().clone()),
            "Expiration": creds.expiration,
        })
        .to_string()
    }
}

/// The proxy phase that serves `http://moat.internal/aws/credentials` to a
/// client with an AWS grant: its role's session credentials in
/// `credential_process` format, each issue audited (the key id and expiry,
/// never the secret).
#[derive(Debug)]
pub struct AwsEndpoint(pub std::sync::Arc<RoleSession>);

#[async_trait::async_trait]
impl crate::proxy::Phase for AwsEndpoint {
    async fn respond(
        &self,
        request: &crate::proxy::phase::RequestHead<'_>,
    ) -> Option<crate::proxy::phase::Answer> {
        use crate::proxy::phase::Answer;
        use http::{Method, StatusCode};
        let path = request.path.split('?').next().unwrap_or("");
        if request.host != CREDENTIALS_HOST || path != CREDENTIALS_PATH {
            return None;
        }
        if request.method != Method::GET {
            let mut answer = Answer::text(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("Moat: {CREDENTIALS_PATH} answers GET only\n"),
            );
            answer.denied = Some(format!("{} {CREDENTIALS_PATH}", request.method));
            return Some(answer);
        }
        Some(match self.0.credentials().await {
            Ok(creds) => Answer {
                status: StatusCode::OK,
                content_type: "application/json",
                body: RoleSession::process_json(&creds).into(),
                audit: Some(crate::trace::AuditEvent::AwsCredentialsIssued {
                    client: request.client.to_string(),
                    role_arn: self.0.role_arn().to_string(),
                    access_key_id: creds.access_key_id.clone(),
                    expiration: creds.expiration.clone(),
                }),
                denied: None,
                error: None,
            },
            Err(e) => {
                let mut answer = Answer::text(StatusCode::BAD_GATEWAY, format!("Moat: {e}\n"));
                answer.error = Some(e.to_string());
                answer
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `get-vanilla` case of AWS's SigV4 test suite.
    #[test]
    fn sigv4_known_answer() {
        let creds = AwsCredentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: Secret::new("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into()),
            session_token: None,
            expiration: None,
        };
        let auth = sigv4_authorization(
            &SignRequest {
                method: "GET",
                host: "example.amazonaws.com",
                path: "/",
                query: "",
                headers: &[],
                body: b"",
                amz_date: "20150830T123600Z",
                region: "us-east-1",
                service: "service",
            },
            &creds,
        );
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
    }

    #[test]
    fn durations_and_arns() {
        assert_eq!(parse_duration("15m").unwrap(), 900);
        assert_eq!(parse_duration("1h").unwrap(), 3600);
        assert_eq!(parse_duration("3600").unwrap(), 3600);
        assert!(parse_duration("5m").is_err());
        assert!(parse_duration("13h").is_err());
        assert!(parse_duration("soon").is_err());
        let home = tempfile::tempdir().unwrap();
        for bad in [
            "arn:aws:iam::123:role/x",
            "arn:aws:s3:::bucket",
            "role/x",
            "arn:aws:iam::123456789012:user/x",
        ] {
            assert!(grant(home.path(), bad, None, None, None).is_err(), "{bad}");
        }
        let r = grant(
            home.path(),
            "arn:aws:iam::123456789012:role/AgentRole",
            Some("us-west-2"),
            Some(3600),
            None,
        )
        .unwrap();
        assert_eq!(load(home.path()).unwrap(), Some(r));
        assert!(revoke(home.path()).unwrap());
    }
}
