//! The OAuth refresh broker against a local stand-in of Anthropic's API and
//! token endpoint (HTTPS with a test CA, on loopback), through a real proxy
//! and curl: a token that expires during a session, a token the API
//! refuses, two runs sharing one refresh, a refresh that fails, and Claude
//! Code's own refresh answered on the host.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use moat_core::credential::oauth::OauthBroker;
use moat_core::policy::PolicyMode;
use moat_core::proxy::{ClientHandle, ClientSpec, Proxy, ProxyBuilder};
use moat_core::secret::Secret;
use moat_core::trace::{AuditEvent, MemorySink};
use rcgen::{CertificateParams, DnType, IsCa, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

/// The stand-in's state: the one valid access and refresh token.
#[derive(Debug, Default)]
struct Auth {
    access: String,
    refresh: String,
    generation: u32,
    refreshes: u32,
    fail: bool,
    expires_in: i64,
    /// Every Authorization header /v1/messages saw.
    seen: Vec<String>,
    /// Refresh tokens the token endpoint saw.
    refresh_seen: Vec<String>,
}

type Shared = Arc<Mutex<Auth>>;

async fn serve(req: Request<Incoming>, auth: Shared) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let header = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let beta = req
        .headers()
        .get("anthropic-beta")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let reply = |status: u16, body: String| {
        Ok(Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap())
    };
    let mut a = auth.lock().unwrap();
    match path.as_str() {
        "/v1/messages" => {
            a.seen.push(header.clone());
            if header == format!("Bearer {}", a.access) && beta.contains("oauth-2025-04-20") {
                reply(
                    200,
                    r#"{"type":"message","content":[{"type":"text","text":"hi"}]}"#.into(),
                )
            } else {
                reply(
                    401,
                    r#"{"type":"error","error":{"type":"authentication_error","message":"invalid token"}}"#.into(),
                )
            }
        }
        "/v1/oauth/token" => {
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let given = json["refresh_token"].as_str().unwrap_or("").to_string();
            a.refresh_seen.push(given.clone());
            if a.fail || given != a.refresh || json["grant_type"] != "refresh_token" {
                return reply(400, r#"{"error":"invalid_grant"}"#.into());
            }
            a.refreshes += 1;
            a.generation += 1;
            a.access = format!("REAL-access-{}", a.generation);
            a.refresh = format!("REAL-refresh-{}", a.generation);
            let out = serde_json::json!({
                "access_token": a.access,
                "refresh_token": a.refresh,
                "expires_in": a.expires_in,
                "token_type": "Bearer",
            });
            reply(200, out.to_string())
        }
        _ => reply(404, "{}".into()),
    }
}

struct Stand {
    addr: SocketAddr,
    ca: PathBuf,
    roots: Vec<CertificateDer<'static>>,
    auth: Shared,
    dir: tempfile::TempDir,
}

async fn stand_in() -> Stand {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "stand-in ca");
    ca_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ca_cert.pem()).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let leaf = CertificateParams::new(vec![
        "api.anthropic.com".to_string(),
        "platform.claude.com".to_string(),
    ])
    .unwrap()
    .signed_by(&leaf_key, &issuer)
    .unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        PrivateKeyDer::from_pem_slice(leaf_key.serialize_pem().as_bytes()).unwrap(),
    )
    .unwrap();
    let tls = Arc::new(tls);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let auth: Shared = Arc::new(Mutex::new(Auth {
        access: "REAL-access-0".into(),
        refresh: "REAL-refresh-0".into(),
        expires_in: 3600,
        ..Auth::default()
    }));
    let served = auth.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (tls, auth) = (tls.clone(), served.clone());
            tokio::spawn(async move {
                let Ok(stream) = tokio_rustls::TlsAcceptor::from(tls).accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| serve(req, auth.clone()));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Stand {
        addr,
        roots: vec![ca_cert.der().clone()],
        ca,
        auth,
        dir,
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Writes a Claude Code credentials file holding `access`/`refresh`,
/// expiring in `secs`.
fn login_file(dir: &Path, access: &str, refresh: &str, secs: i64) -> PathBuf {
    let path = dir.join(".credentials.json");
    let json = serde_json::json!({
        "claudeAiOauth": {
            "accessToken": access,
            "refreshToken": refresh,
            "expiresAt": now_ms() + secs * 1000,
            "scopes": ["user:inference", "user:profile"],
            "subscriptionType": "max",
        },
        "kept": true,
    });
    std::fs::write(&path, json.to_string()).unwrap();
    path
}

struct Run {
    client: ClientHandle,
    sink: Arc<MemorySink>,
}

async fn proxy(stand: &Stand) -> Proxy {
    ProxyBuilder::new()
        .home(stand.dir.path().join("proxy-home"))
        .resolve("api.anthropic.com", 443, stand.addr)
        .resolve("platform.claude.com", 443, stand.addr)
        .upstream_ca_file(&stand.ca)
        .unwrap()
        .start()
        .await
        .unwrap()
}

fn broker(stand: &Stand, name: &str, file: &Path, access: &str, secs: i64) -> OauthBroker {
    let mut resolve = std::collections::HashMap::new();
    resolve.insert(("platform.claude.com".to_string(), 443), stand.addr);
    OauthBroker::new(
        &stand.dir.path().join("home"),
        "anthropic",
        name,
        file.to_path_buf(),
        Secret::new(access.to_string()),
        Some(now_ms() + secs * 1000),
    )
    .margin(Duration::from_secs(2))
    .endpoint(stand.roots.clone(), resolve)
}

fn register(proxy: &Proxy, name: &str, broker: OauthBroker) -> Run {
    let sink = Arc::new(MemorySink::default());
    let client = proxy
        .register(ClientSpec {
            name: name.into(),
            credentials: Vec::new(),
            policy: PolicyMode::Strict,
            allow: Vec::new(),
            trace: Some(sink.clone()),
            audit: Some(sink.clone()),
            capture_bodies: 0,
            phases: vec![Arc::new(broker)],
            rules: Vec::new(),
        })
        .unwrap();
    Run { client, sink }
}

/// curl through the proxy as Claude Code would call: the placeholder token.
async fn call(proxy: &Proxy, run: &Run, url: &str) -> (u16, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "--proxy"])
        .arg(run.client.proxy_url(proxy.local_addr()).expose())
        .arg("--cacert")
        .arg(proxy.ca_cert_path())
        .args(["-w", "\n%{http_code}", "-X", "POST", "-d", "{}"])
        .args(["-H", "authorization: Bearer sk-ant-oat01-moat-placeholder"])
        .arg(url)
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .output()
        .await
        .expect("curl must be installed to run these tests");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    let code = code.trim().parse().unwrap_or(0);
    if code == 0 {
        // curl itself failed: say why.
        return (0, String::from_utf8_lossy(&out.stderr).into_owned());
    }
    (code, body.to_string())
}

const MESSAGES: &str = "https://api.anthropic.com/v1/messages";

fn no_token_in(run: &Run) {
    let all = format!("{:?}{:?}", run.sink.records(), run.sink.events());
    assert!(
        !all.contains("REAL-"),
        "a token is in the trace or audit: {all}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_expiring_during_a_session_is_refreshed_on_the_host_and_written_back() {
    let stand = stand_in().await;
    let file = login_file(stand.dir.path(), "REAL-access-0", "REAL-refresh-0", 20);
    let proxy = proxy(&stand).await;
    // The token expires 20 s after the broker is made and is due for a
    // refresh in its last 12 s: the first call has 8 s before that.
    let oauth = broker(&stand, "run_a", &file, "REAL-access-0", 20).margin(Duration::from_secs(12));
    let due = tokio::time::Instant::now() + Duration::from_secs(20 - 12);
    let run = register(&proxy, "run_a", oauth);
    let (code, body) = call(&proxy, &run, MESSAGES).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(stand.auth.lock().unwrap().refreshes, 0, "not due yet");
    // Within the 12 s margin of its expiry: the next request refreshes first.
    tokio::time::sleep_until(due + Duration::from_millis(500)).await;
    let (code, body) = call(&proxy, &run, MESSAGES).await;
    assert_eq!(code, 200, "{body}");
    {
        let a = stand.auth.lock().unwrap();
        assert_eq!(a.refreshes, 1);
        assert_eq!(a.refresh_seen, vec!["REAL-refresh-0"]);
        assert_eq!(a.seen.last().unwrap(), "Bearer REAL-access-1");
        assert!(
            a.seen.iter().all(|s| !s.contains("placeholder")),
            "the placeholder never reaches the API: {:?}",
            a.seen
        );
    }
    // The host's own claude keeps working: the rotated tokens are in its file.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(json["claudeAiOauth"]["accessToken"], "REAL-access-1");
    assert_eq!(json["claudeAiOauth"]["refreshToken"], "REAL-refresh-1");
    assert!(json["claudeAiOauth"]["expiresAt"].as_i64().unwrap() > now_ms() + 3_000_000);
    assert_eq!(json["claudeAiOauth"]["subscriptionType"], "max");
    assert_eq!(json["kept"], true);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644, "the file keeps its mode");
    }
    let events = run.sink.events();
    assert!(
        events.iter().any(|e| matches!(e,
            AuditEvent::CredentialRefreshed { how, reason, grant, expires: Some(_), .. }
                if how == "refreshed" && reason == "expiring" && grant == "anthropic")),
        "{events:?}"
    );
    no_token_in(&run);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_the_api_refuses_is_refreshed_once() {
    let stand = stand_in().await;
    let file = login_file(stand.dir.path(), "REAL-access-0", "REAL-refresh-0", 3600);
    let proxy = proxy(&stand).await;
    let run = register(
        &proxy,
        "run_r",
        broker(&stand, "run_r", &file, "REAL-access-0", 3600),
    );
    // The server revokes the token long before its expiry.
    stand.auth.lock().unwrap().access = "REAL-access-revoked".into();
    let (code, _) = call(&proxy, &run, MESSAGES).await;
    assert_eq!(code, 401, "the refusal reaches the client");
    // The server is told to accept again only after a refresh.
    stand.auth.lock().unwrap().access = "unset".into();
    let (code, body) = call(&proxy, &run, MESSAGES).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(stand.auth.lock().unwrap().refreshes, 1);
    assert!(run.sink.events().iter().any(|e| matches!(e,
        AuditEvent::CredentialRefreshed { reason, .. } if reason == "refused")));
    no_token_in(&run);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_runs_share_one_refresh() {
    let stand = stand_in().await;
    let file = login_file(stand.dir.path(), "REAL-access-0", "REAL-refresh-0", 1);
    let proxy_a = proxy(&stand).await;
    let proxy_b = proxy(&stand).await;
    let a = register(
        &proxy_a,
        "run_a",
        broker(&stand, "run_a", &file, "REAL-access-0", 1),
    );
    let b = register(
        &proxy_b,
        "run_b",
        broker(&stand, "run_b", &file, "REAL-access-0", 1),
    );
    let (ra, rb) = tokio::join!(call(&proxy_a, &a, MESSAGES), call(&proxy_b, &b, MESSAGES));
    assert_eq!((ra.0, rb.0), (200, 200), "{ra:?} {rb:?}");
    let auth = stand.auth.lock().unwrap();
    assert_eq!(
        auth.refreshes, 1,
        "one refresh for both: {:?}",
        auth.refresh_seen
    );
    let hows: Vec<String> = a
        .sink
        .events()
        .into_iter()
        .chain(b.sink.events())
        .filter_map(|e| match e {
            AuditEvent::CredentialRefreshed { how, .. } => Some(how),
            _ => None,
        })
        .collect();
    let mut sorted = hows.clone();
    sorted.sort();
    assert_eq!(sorted, vec!["adopted", "refreshed"], "{hows:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_refresh_says_why_and_leaves_the_host_file() {
    let stand = stand_in().await;
    let file = login_file(stand.dir.path(), "REAL-access-0", "REAL-refresh-0", -10);
    let before = std::fs::read(&file).unwrap();
    stand.auth.lock().unwrap().fail = true;
    let proxy = proxy(&stand).await;
    let run = register(
        &proxy,
        "run_f",
        broker(&stand, "run_f", &file, "REAL-access-0", -10),
    );
    let (code, body) = call(&proxy, &run, MESSAGES).await;
    assert_eq!(code, 401, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let message = json["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("moat: refreshing the Claude Code login")
            && message.contains("invalid_grant")
            && message.contains("moat grant anthropic"),
        "{message}"
    );
    assert_eq!(
        std::fs::read(&file).unwrap(),
        before,
        "the host file is untouched"
    );
    let names: Vec<_> = std::fs::read_dir(stand.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("moat-"))
        .collect();
    assert!(names.is_empty(), "no temporary file: {names:?}");
    assert!(
        stand.auth.lock().unwrap().seen.is_empty(),
        "nothing went to the API with an expired token"
    );
    assert!(run.sink.events().iter().any(|e| matches!(e,
        AuditEvent::CredentialRefreshFailed { error, .. } if error.contains("invalid_grant"))));
    no_token_in(&run);
}

#[tokio::test(flavor = "multi_thread")]
async fn claude_codes_own_refresh_is_answered_on_the_host_with_placeholders() {
    let stand = stand_in().await;
    let file = login_file(stand.dir.path(), "REAL-access-0", "REAL-refresh-0", 3600);
    let proxy = proxy(&stand).await;
    let run = register(
        &proxy,
        "run_t",
        broker(&stand, "run_t", &file, "REAL-access-0", 3600),
    );
    let (code, body) = call(&proxy, &run, "https://platform.claude.com/v1/oauth/token").await;
    assert_eq!(code, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["access_token"], "sk-ant-oat01-moat-placeholder");
    assert_eq!(json["refresh_token"], "sk-ant-ort01-moat-placeholder");
    assert!(json["expires_in"].as_i64().unwrap() > 3000);
    let auth = stand.auth.lock().unwrap();
    assert!(
        auth.refresh_seen.is_empty(),
        "the container's request never left the proxy"
    );
    drop(auth);
    no_token_in(&run);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refresh_that_cannot_be_written_back_is_used_and_said() {
    let stand = stand_in().await;
    let file = login_file(stand.dir.path(), "REAL-access-0", "REAL-refresh-0", 1);
    // The broker writes a temporary file beside the login, named after its
    // process: a directory in its place makes the write fail (even as root).
    std::fs::create_dir(
        stand
            .dir
            .path()
            .join(format!("..credentials.json.moat-{}", std::process::id())),
    )
    .unwrap();
    let before = std::fs::read(&file).unwrap();
    let proxy = proxy(&stand).await;
    let run = register(
        &proxy,
        "run_w",
        broker(&stand, "run_w", &file, "REAL-access-0", 1),
    );
    let (code, body) = call(&proxy, &run, MESSAGES).await;
    assert_eq!(code, 200, "the rotated token is used: {body}");
    assert_eq!(std::fs::read(&file).unwrap(), before);
    assert!(
        run.sink.events().iter().any(|e| matches!(e,
            AuditEvent::CredentialRefreshed { how, .. }
                if how.starts_with("refreshed, but not written back")
                    && how.contains("log in with `claude`"))),
        "{:?}",
        run.sink.events()
    );
    no_token_in(&run);
}
