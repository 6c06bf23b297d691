//! The Claude Code preset: its pinned build, its image, its files.
//!
//! **The build.** Claude Code's Linux build is a single executable. moat
//! takes it from the `claude-agent-sdk` wheel on the Python package index,
//! which bundles it (`claude_agent_sdk/_bundled/claude`): one pinned
//! version, each wheel's SHA-256 checked before anything in it is used. It
//! is kept in `$MOAT_HOME/cache/claude/<version>-<arch>/`. A machine that
//! cannot reach the index, or a build other than the pinned one, is pointed
//! at a wheel on disk with `MOAT_CLAUDE_WHEEL` (the pinned version's wheel
//! must still match its hash; another version's is used as the user chose,
//! and said so).
//!
//! **The image** is the base image with the executable at
//! `/usr/local/bin/claude`, made by the engine (a container of the base
//! image, the file copied in, committed): no Dockerfile and no network. Its
//! tag, `moat-claude:<hash>`, is a hash of the base image's id, the wheel's
//! hash and the version, so the next run with the same inputs uses it at
//! once.
//!
//! **The files.** Claude Code keeps its state in `CLAUDE_CONFIG_DIR`
//! (`/home/.claude-moat` in the container): a directory per workspace under
//! `$MOAT_HOME/claude/`, so that `--continue` and `--resume` work across
//! runs of one workspace. moat writes into it, at each start, what keeps
//! Claude Code from asking anything a sealed run cannot answer (onboarding,
//! trusting `/workspace`, approving the placeholder key) and, with an OAuth
//! login, a placeholder `.credentials.json`. Nothing there is a secret: the
//! container never has a real key or token to write.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use sha2::{Digest, Sha256};

use super::{Agent, Preset, StateContext, StateMount};
use crate::credential::oauth::{PLACEHOLDER_ACCESS, PLACEHOLDER_REFRESH};
use crate::error::{Error, ErrorKind, Result};
use crate::paths::{give, read_no_follow, write_owned};
use crate::runtime::{ContainerSpec, Runtime};

/// The Claude Code preset ([`super::preset`]).
#[derive(Debug, Clone, Copy)]
pub struct Claude;

#[async_trait::async_trait]
impl Preset for Claude {
    fn agent(&self) -> Agent {
        Agent::Claude
    }

    fn grants(&self) -> &'static [&'static str] {
        &["anthropic"]
    }

    fn hosts(&self) -> &'static [&'static str] {
        HOSTS
    }

    fn env(&self) -> &'static [(&'static str, &'static str)] {
        ENV
    }

    fn command(&self, prompt: Option<&str>, args: &[String]) -> Vec<String> {
        let mut command = vec!["claude".to_string()];
        if let Some(prompt) = prompt {
            command.push("-p".into());
            command.push(prompt.to_string());
        }
        command.extend(args.iter().cloned());
        command
    }

    fn version(&self, asked: Option<&str>) -> Result<String> {
        match asked {
            Some(v) => check_version(v),
            None => Ok(PINNED.version.to_string()),
        }
    }

    fn configured_version(&self, config: &crate::config::Config) -> Option<String> {
        config.claude_version.clone()
    }

    /// With an OAuth login Claude Code reads its placeholder login from its
    /// credentials file (which lets it ask for a refresh, answered on the
    /// host), not from the variable.
    fn hidden_env(&self) -> &'static [&'static str] {
        &["CLAUDE_CODE_OAUTH_TOKEN"]
    }

    async fn image(
        &self,
        home: &Path,
        runtime: &dyn Runtime,
        base: &str,
        base_id: &str,
        version: &str,
        labels: &BTreeMap<String, String>,
        progress: &(dyn for<'m> Fn(&'m str) + Send + Sync),
    ) -> Result<(String, String)> {
        let binary = binary(home, version, progress).await?;
        image(runtime, base, base_id, &binary, labels, progress).await
    }

    /// The workspace's state directory (see the module's "The files").
    fn state(&self, cx: &StateContext<'_>) -> Result<Option<StateMount>> {
        let dir = state_dir(cx.home, cx.workspace);
        crate::paths::private_dir(&dir)?;
        give(&dir, cx.uid, cx.gid)?;
        let placeholder = |key: &str| {
            cx.binding
                .env
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        let config = dir.join(".claude.json");
        // The agent may have left anything here: a symbolic link (to a
        // credential file of the host's, say) is never followed; it, or
        // anything but a regular file, is moved aside like a file that is
        // not JSON, and not overwritten unseen.
        let existing = read_no_follow(&config)?;
        let is_json = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).is_ok();
        if let Some(bytes) = &existing {
            if !bytes.as_deref().is_some_and(is_json) {
                let aside = dir.join(".claude.json.unreadable");
                std::fs::rename(&config, &aside)
                    .map_err(|e| Error::io(&config, "move aside", e))?;
                (cx.warn)(&format!(
                    "warning: {} was not a JSON file; it is kept as {} and a new one is written",
                    config.display(),
                    aside.display()
                ));
            }
        }
        let existing = existing.flatten().filter(|b| is_json(b));
        let api_key = placeholder("ANTHROPIC_API_KEY");
        write_owned(
            &config,
            &settle_config(existing.as_deref(), api_key.as_deref()),
            cx.uid,
            cx.gid,
        )?;
        let credentials = dir.join(".credentials.json");
        if placeholder("CLAUDE_CODE_OAUTH_TOKEN").is_some() {
            write_owned(
                &credentials,
                &placeholder_credentials(cx.binding.subscription.as_deref()),
                cx.uid,
                cx.gid,
            )?;
        } else {
            match std::fs::remove_file(&credentials) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(&credentials, "remove", e)),
            }
        }
        Ok(Some(StateMount {
            source: dir,
            target: CONFIG_DIR.into(),
        }))
    }
}

/// A pinned Claude Code build: the wheel that bundles it, per architecture.
#[derive(Debug, Clone, Copy)]
pub struct Pin {
    /// Claude Code's version.
    pub version: &'static str,
    /// The `claude-agent-sdk` release that bundles it.
    pub sdk: &'static str,
    /// `(architecture, wheel URL, wheel SHA-256)`.
    pub wheels: &'static [(&'static str, &'static str, &'static str)],
}

/// The build moat uses unless told otherwise. A newer one is a deliberate
/// change here (with its hashes from the index).
pub const PINNED: Pin = Pin {
    version: "2.1.332",
    sdk: "0.2.189",
    wheels: &[
        (
            "x86_64",
            "https://files.pythonhosted.org/packages/34/80/6c8478d1947276686aafac14ad86baa0cfc12b361c11fba4d03f2d046976/claude_agent_sdk-0.2.189-py3-none-manylinux_2_17_x86_64.whl",
            "b26a6a30a4e2cb025a6f5c95e1ce4469b38fcc51015c392f627bea7c948d67ad",
        ),
        (
            "aarch64",
            "https://files.pythonhosted.org/packages/94/d4/860af1e681d1521941072f37c44d1d0547ecd8629c586ec4db36f60f4ab2/claude_agent_sdk-0.2.189-py3-none-manylinux_2_17_aarch64.whl",
            "7e89e56f968a2f2b09e1a86cb66a937f004fc33948faad66425df847b07c5769",
        ),
    ],
};

/// Hosts Claude Code needs, let through in strict mode (the API's own host
/// comes with the `anthropic` grant). The token endpoints are answered by
/// the proxy for an OAuth login and never reached.
pub const HOSTS: &[&str] = &[
    "api.anthropic.com",
    "platform.claude.com",
    "console.anthropic.com",
];

/// Where Claude Code keeps its state in the container.
pub const CONFIG_DIR: &str = "/home/.claude-moat";

/// Claude Code's environment in a run: its state where moat keeps it, no
/// self-update (the image is the version), no telemetry, error reports or
/// plugin downloads: with these it reaches only api.anthropic.com (and
/// platform.claude.com to refresh a login, which the proxy answers).
pub const ENV: &[(&str, &str)] = &[
    ("CLAUDE_CONFIG_DIR", CONFIG_DIR),
    ("DISABLE_AUTOUPDATER", "1"),
    ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
    ("DISABLE_TELEMETRY", "1"),
    ("DISABLE_ERROR_REPORTING", "1"),
    // Else it fetches the official plugin marketplace (downloads.claude.ai,
    // then a git clone from github.com) at every interactive start.
    ("CLAUDE_CODE_DISABLE_OFFICIAL_MARKETPLACE_AUTOINSTALL", "1"),
];

/// The variable that points moat at a wheel on disk.
pub const WHEEL_ENV: &str = "MOAT_CLAUDE_WHEEL";

const BINARY_IN_WHEEL: &str = "claude_agent_sdk/_bundled/claude";
const VERSION_IN_WHEEL: &str = "claude_agent_sdk/_bundled/claude.version";

/// Checks a version asked for (`--claude-version`): the pinned one, or any
/// when a wheel on disk is given (its bundled version must match).
pub fn check_version(version: &str) -> Result<String> {
    check(version, wheel_from_env().is_some())
}

fn check(version: &str, have_wheel: bool) -> Result<String> {
    let version = version.trim();
    let plausible = !version.is_empty()
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+'));
    if !plausible {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "Claude Code version \"{version}\" (--claude-version or claude.version): not a version (like {})",
                PINNED.version
            ),
        ));
    }
    if version == PINNED.version || have_wheel {
        return Ok(version.to_string());
    }
    Err(Error::new(
        ErrorKind::InvalidArgument,
        format!(
            "Claude Code {version} is not pinned in this moat (it pins {}, with its hash). To use another build, download the claude-agent-sdk wheel that bundles it and set {WHEEL_ENV}=/path/to/the.whl",
            PINNED.version
        ),
    ))
}

fn wheel_from_env() -> Option<PathBuf> {
    std::env::var_os(WHEEL_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// A Claude Code executable on the host, ready to go into an image.
#[derive(Debug, Clone)]
pub struct Binary {
    /// The executable.
    pub path: PathBuf,
    /// Its version.
    pub version: String,
    /// The SHA-256 of the wheel it came from.
    pub wheel_sha256: String,
    /// Whether that wheel is the one pinned in moat.
    pub pinned: bool,
}

/// What the cache keeps beside an executable.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Source {
    version: String,
    wheel_sha256: String,
    pinned: bool,
}

/// The architecture's name in wheel tags.
fn arch() -> &'static str {
    std::env::consts::ARCH
}

fn pinned_wheel(version: &str) -> Option<(&'static str, &'static str)> {
    if version != PINNED.version {
        return None;
    }
    PINNED
        .wheels
        .iter()
        .find(|(a, _, _)| *a == arch())
        .map(|(_, url, sha)| (*url, *sha))
}

/// The executable for `version`: from the cache, or from the wheel (on
/// disk with `MOAT_CLAUDE_WHEEL`, else downloaded), checked first.
pub async fn binary(
    home: &Path,
    version: &str,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<Binary> {
    binary_from(home, version, wheel_from_env(), progress).await
}

/// [`binary`], with the wheel on disk (`MOAT_CLAUDE_WHEEL`) given.
async fn binary_from(
    home: &Path,
    version: &str,
    local: Option<PathBuf>,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<Binary> {
    let dir = home
        .join("cache")
        .join("claude")
        .join(format!("{version}-{}", arch()));
    let pin = pinned_wheel(version);
    let cached = read_source(&dir);
    // The wheel a build must come from, when known before reading it.
    let want_sha = match (&local, pin) {
        (Some(path), _) => {
            let path = path.clone();
            Some(
                tokio::task::spawn_blocking(move || sha256_file(&path))
                    .await
                    .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))??,
            )
        }
        (None, Some((_, sha))) => Some(sha.to_string()),
        (None, None) => None,
    };
    if let (Some(src), Some(want)) = (&cached, &want_sha) {
        if &src.wheel_sha256 == want && dir.join("claude").is_file() {
            return Ok(Binary {
                path: dir.join("claude"),
                version: version.to_string(),
                wheel_sha256: src.wheel_sha256.clone(),
                pinned: src.pinned,
            });
        }
    }
    crate::paths::private_dir(&dir)?;
    let (wheel, sha, downloaded) = match (&local, pin) {
        (Some(path), _) => {
            let sha = want_sha.clone().unwrap_or_default();
            if let Some((_, pinned_sha)) = pin {
                if sha != pinned_sha {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "{WHEEL_ENV}={}: its SHA-256 is {sha}, not that of the wheel pinned for Claude Code {version} on {} ({pinned_sha}); nothing from it was used",
                            path.display(),
                            arch()
                        ),
                    ));
                }
            } else {
                progress(&format!(
                    "Claude Code {version} is not pinned in moat: using the wheel you chose ({}, SHA-256 {sha})",
                    path.display()
                ));
            }
            (path.clone(), sha, false)
        }
        (None, Some((url, sha))) => {
            let partial = dir.join("wheel.partial");
            let client = crate::proxy::upstream::own_client(Duration::from_secs(30))?;
            download(&client, url, &partial, sha, version, progress).await?;
            (partial, sha.to_string(), true)
        }
        (None, None) => {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                "no Claude Code {version} build for {}: moat pins one for x86_64 and aarch64 Linux",
                arch()
            ),
            ))
        }
    };
    progress(&format!("Unpacking Claude Code {version}"));
    let (out_dir, wheel_path, want_version) = (dir.clone(), wheel.clone(), version.to_string());
    let extracted =
        tokio::task::spawn_blocking(move || extract(&wheel_path, &out_dir, &want_version))
            .await
            .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?;
    if downloaded {
        let _ = std::fs::remove_file(&wheel);
    }
    extracted?;
    let source = Source {
        version: version.to_string(),
        wheel_sha256: sha.clone(),
        pinned: pin.is_some(),
    };
    let json =
        serde_json::to_vec(&source).map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?;
    crate::paths::write_private(&dir.join("source.json"), &json, 0o600)?;
    Ok(Binary {
        path: dir.join("claude"),
        version: version.to_string(),
        wheel_sha256: sha,
        pinned: pin.is_some(),
    })
}

fn read_source(dir: &Path) -> Option<Source> {
    let text = std::fs::read(dir.join("source.json")).ok()?;
    serde_json::from_slice(&text).ok()
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, "open", e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| Error::io(path, "read", e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

type OwnClient = hyper_util::client::legacy::Client<
    crate::proxy::upstream::Connector,
    http_body_util::Full<bytes::Bytes>,
>;

/// Downloads `url` to `to`, showing progress, and checks its SHA-256; a
/// file that does not match is removed and named.
async fn download(
    client: &OwnClient,
    url: &str,
    to: &Path,
    sha: &str,
    version: &str,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<()> {
    use std::io::Write;
    let failed = |why: String| {
        Error::new(
            ErrorKind::Io,
            format!(
                "downloading Claude Code {version} from {url}: {why}. On a machine that cannot reach it, download the wheel elsewhere and set {WHEEL_ENV}=/path/to/the.whl"
            ),
        )
    };
    let req = http::Request::get(url)
        .header("user-agent", concat!("moat/", env!("CARGO_PKG_VERSION")))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?;
    let resp = tokio::time::timeout(Duration::from_secs(60), client.request(req))
        .await
        .map_err(|_| failed("no answer within 60 s".into()))?
        .map_err(|e| failed(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(failed(format!("the server answered {}", resp.status())));
    }
    let total = resp
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut file = crate::paths::open_private(to, crate::paths::Open::Truncate)?;
    let mut body = resp.into_body();
    let mut hasher = Sha256::new();
    let mut got = 0u64;
    let mut shown = Instant::now() - Duration::from_secs(1);
    let result = async {
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(60), body.frame())
                .await
                .map_err(|_| failed("nothing arrived for 60 s".into()))?;
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|e| failed(e.to_string()))?;
            if let Some(data) = frame.data_ref() {
                hasher.update(data);
                file.write_all(data).map_err(|e| Error::io(to, "write", e))?;
                got += data.len() as u64;
                if shown.elapsed() >= Duration::from_millis(500) {
                    shown = Instant::now();
                    progress(&match total {
                        Some(t) => format!(
                            "Downloading Claude Code {version}: {:.1}/{:.1} MB",
                            got as f64 / 1e6,
                            t as f64 / 1e6
                        ),
                        None => format!("Downloading Claude Code {version}: {:.1} MB", got as f64 / 1e6),
                    });
                }
            }
        }
        file.sync_all().map_err(|e| Error::io(to, "write", e))?;
        let actual = hex(&hasher.finalize());
        if actual != sha {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "the Claude Code {version} wheel from {url} has SHA-256 {actual}, not the pinned {sha}; it was not used"
                ),
            ));
        }
        progress(&format!(
            "Downloaded Claude Code {version}: {:.1} MB, SHA-256 checked",
            got as f64 / 1e6
        ));
        Ok(())
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(to);
    }
    result
}

/// Takes the executable out of the wheel into `dir/claude` (through a
/// temporary file), after checking the version it bundles.
fn extract(wheel: &Path, dir: &Path, version: &str) -> Result<()> {
    let bad = |why: String| {
        Error::new(
            ErrorKind::Config,
            format!(
                "{}: not a claude-agent-sdk wheel with Claude Code in it: {why}",
                wheel.display()
            ),
        )
    };
    let file = std::fs::File::open(wheel).map_err(|e| Error::io(wheel, "open", e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| bad(e.to_string()))?;
    let mut bundled = String::new();
    zip.by_name(VERSION_IN_WHEEL)
        .map_err(|e| bad(format!("{VERSION_IN_WHEEL}: {e}")))?
        .read_to_string(&mut bundled)
        .map_err(|e| bad(format!("{VERSION_IN_WHEEL}: {e}")))?;
    // `2.1.332 (Claude Code)`, as `claude --version` prints it.
    let bundled = bundled.split_whitespace().next().unwrap_or("");
    if bundled != version {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "{}: it bundles Claude Code {bundled}, not {version}",
                wheel.display()
            ),
        ));
    }
    let partial = dir.join("claude.partial");
    let target = dir.join("claude");
    let result = (|| {
        let mut entry = zip
            .by_name(BINARY_IN_WHEEL)
            .map_err(|e| bad(format!("{BINARY_IN_WHEEL}: {e}")))?;
        let mut out = crate::paths::open_private(&partial, crate::paths::Open::Truncate)?;
        std::io::copy(&mut entry, &mut out).map_err(|e| Error::io(&partial, "write", e))?;
        out.sync_all()
            .map_err(|e| Error::io(&partial, "write", e))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(&partial, "set permissions of", e))?;
        std::fs::rename(&partial, &target).map_err(|e| Error::io(&target, "write", e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// The tag of the image of `base` (whose id is `base_id`) with `binary`.
pub fn image_tag(base_id: &str, binary: &Binary) -> String {
    let mut h = Sha256::new();
    h.update(format!(
        "moat-claude-image 3\n{base_id}\n{}\n{}\n",
        binary.wheel_sha256, binary.version
    ));
    format!("moat-claude:{}", &hex(&h.finalize())[..16])
}

/// The image of `base` with Claude Code: reused when its tag is present,
/// else made by the engine. Its tag and id. `labels` mark the container it
/// is made in (a run's, so that its cleanup finds it).
pub async fn image(
    runtime: &dyn Runtime,
    base: &str,
    base_id: &str,
    binary: &Binary,
    labels: &BTreeMap<String, String>,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<(String, String)> {
    let tag = image_tag(base_id, binary);
    if let Some(id) = runtime.image_id(&tag).await? {
        return Ok((tag, id));
    }
    progress(&format!(
        "Building image {tag}: {base} with Claude Code {}",
        binary.version
    ));
    let spec = ContainerSpec {
        name: String::new(),
        image: base.to_string(),
        command: Some(vec!["true".into()]),
        user: "0:0".into(),
        workdir: "/".into(),
        network: "none".into(),
        labels: labels.clone(),
        ..ContainerSpec::default()
    };
    let failed = |step: &str, e: Error| {
        Error::new(
            e.kind(),
            format!("building the Claude Code image {tag} on {base}: {step}: {e}"),
        )
    };
    let container = runtime
        .create_container(&spec)
        .await
        .map_err(|e| failed("creating a container of the base image", e))?;
    let made = async {
        runtime
            .put_file(&container, "/usr/local/bin/claude", &binary.path, 0o755)
            .await
            .map_err(|e| failed("copying claude in", e))?;
        let image_labels = BTreeMap::from([
            ("dev.moat.agent".to_string(), "claude".to_string()),
            (
                "dev.moat.claude.version".to_string(),
                binary.version.clone(),
            ),
            (
                "dev.moat.claude.wheel-sha256".to_string(),
                binary.wheel_sha256.clone(),
            ),
            ("dev.moat.base".to_string(), base.to_string()),
            // Built by moat, for the home whose run made it (see
            // `moat clean`).
            (
                crate::runtime::BUILT_LABEL.to_string(),
                labels
                    .get(crate::runtime::HOME_LABEL)
                    .cloned()
                    .unwrap_or_default(),
            ),
        ]);
        runtime
            .commit(&container, &tag, &["claude".to_string()], &image_labels)
            .await
            .map_err(|e| failed("committing", e))
    }
    .await;
    let removed = runtime.remove(&container).await;
    let id = made?;
    removed?;
    progress(&format!("Built image {tag}"));
    Ok((tag, id))
}

/// The directory under the moat home that keeps Claude Code's state for a
/// workspace: its name, then a hash of its full path.
pub fn state_dir(home: &Path, workspace: &Path) -> PathBuf {
    let name: String = workspace
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "root".into())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    let hash = hex(&Sha256::digest(workspace.to_string_lossy().as_bytes()));
    home.join("claude").join(format!("{name}-{}", &hash[..12]))
}

/// The last 20 characters of a key, as Claude Code records an approved one.
fn key_suffix(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    chars[chars.len().saturating_sub(20)..].iter().collect()
}

/// Merges what a sealed run needs into Claude Code's `.claude.json`
/// (keeping all else it holds): onboarding done, `/workspace` trusted, the
/// placeholder API key (if any) approved, no update checks.
pub fn settle_config(existing: Option<&[u8]>, api_key_placeholder: Option<&str>) -> Vec<u8> {
    let mut json: serde_json::Value = existing
        .and_then(|b| serde_json::from_slice(b).ok())
        .filter(|v: &serde_json::Value| v.is_object())
        .unwrap_or_else(|| serde_json::json!({}));
    let obj = json.as_object_mut();
    if let Some(obj) = obj {
        obj.insert("hasCompletedOnboarding".into(), true.into());
        obj.entry("theme").or_insert_with(|| "dark".into());
        obj.insert("autoUpdates".into(), false.into());
        obj.entry("numStartups").or_insert_with(|| 1.into());
        let projects = obj
            .entry("projects")
            .or_insert_with(|| serde_json::json!({}));
        if !projects.is_object() {
            *projects = serde_json::json!({});
        }
        if let Some(projects) = projects.as_object_mut() {
            let ws = projects
                .entry("/workspace")
                .or_insert_with(|| serde_json::json!({}));
            if !ws.is_object() {
                *ws = serde_json::json!({});
            }
            if let Some(ws) = ws.as_object_mut() {
                ws.insert("hasTrustDialogAccepted".into(), true.into());
                ws.insert("hasCompletedProjectOnboarding".into(), true.into());
            }
        }
        if let Some(key) = api_key_placeholder {
            let responses = obj
                .entry("customApiKeyResponses")
                .or_insert_with(|| serde_json::json!({"approved": [], "rejected": []}));
            if !responses.is_object() {
                *responses = serde_json::json!({"approved": [], "rejected": []});
            }
            if let Some(r) = responses.as_object_mut() {
                let suffix = key_suffix(key);
                let approved = r.entry("approved").or_insert_with(|| serde_json::json!([]));
                if !approved.is_array() {
                    *approved = serde_json::json!([]);
                }
                if let Some(a) = approved.as_array_mut() {
                    if !a.iter().any(|v| v.as_str() == Some(suffix.as_str())) {
                        a.push(suffix.clone().into());
                    }
                }
                if let Some(rej) = r.get_mut("rejected").and_then(|v| v.as_array_mut()) {
                    rej.retain(|v| v.as_str() != Some(suffix.as_str()));
                }
            }
        }
    }
    let mut out = serde_json::to_vec_pretty(&json).unwrap_or_else(|_| b"{}".to_vec());
    out.push(b'\n');
    out
}

/// The placeholder `.credentials.json` of an OAuth login: no real token,
/// an expiry far ahead (the host refreshes the real one).
pub fn placeholder_credentials(subscription: Option<&str>) -> Vec<u8> {
    let far = time::OffsetDateTime::now_utc().unix_timestamp() * 1000 + 365 * 24 * 3600 * 1000;
    let json = serde_json::json!({
        "claudeAiOauth": {
            "accessToken": PLACEHOLDER_ACCESS,
            "refreshToken": PLACEHOLDER_REFRESH,
            "expiresAt": far,
            "scopes": ["user:inference", "user:profile", "user:sessions:claude_code"],
            "subscriptionType": subscription.unwrap_or("pro"),
        }
    });
    let mut out = serde_json::to_vec_pretty(&json).unwrap_or_default();
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_keeps_claudes_state_and_adds_what_a_sealed_run_needs() {
        let before = br#"{"numStartups": 7, "projects": {"/workspace": {"history": [1]}, "/x": {}}, "customApiKeyResponses": {"approved": [], "rejected": ["moat-placeholder-key"]}}"#;
        let key = "sk-ant-api03-moat-placeholder-key";
        let out = settle_config(Some(before), Some(key));
        let json: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
        assert_eq!(json["numStartups"], 7);
        assert_eq!(json["hasCompletedOnboarding"], true);
        assert_eq!(json["projects"]["/workspace"]["history"][0], 1);
        assert_eq!(
            json["projects"]["/workspace"]["hasTrustDialogAccepted"],
            true
        );
        assert!(json["projects"]["/x"].is_object());
        let suffix = key_suffix(key);
        assert_eq!(suffix.len(), 20);
        assert_eq!(
            json["customApiKeyResponses"]["approved"][0],
            suffix.as_str()
        );
        assert_eq!(
            json["customApiKeyResponses"]["rejected"],
            serde_json::json!([])
        );
        // Garbage is replaced, never an error: moat owns this file's keys.
        let out = settle_config(Some(b"not json"), None);
        let json: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
        assert_eq!(json["hasCompletedOnboarding"], true);
        assert!(json.get("customApiKeyResponses").is_none());
    }

    #[test]
    fn the_image_tag_changes_with_every_input() {
        let b = |sha: &str, v: &str| Binary {
            path: PathBuf::new(),
            version: v.into(),
            wheel_sha256: sha.into(),
            pinned: true,
        };
        let t = image_tag("sha256:base", &b("aa", "1"));
        assert!(
            t.starts_with("moat-claude:") && t.len() == "moat-claude:".len() + 16,
            "{t}"
        );
        assert_eq!(t, image_tag("sha256:base", &b("aa", "1")));
        assert_ne!(t, image_tag("sha256:other", &b("aa", "1")));
        assert_ne!(t, image_tag("sha256:base", &b("bb", "1")));
        assert_ne!(t, image_tag("sha256:base", &b("aa", "2")));
    }

    fn fake_binary(dir: &Path) -> Binary {
        let path = dir.join("claude");
        std::fs::write(&path, b"#!/bin/sh\n").unwrap_or_else(|e| panic!("{e}"));
        Binary {
            path,
            version: "1.2.3".into(),
            wheel_sha256: "ab".repeat(32),
            pinned: true,
        }
    }

    #[tokio::test]
    async fn the_image_is_made_once_and_reused() {
        use crate::runtime::fake::FakeRuntime;
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let fake = FakeRuntime::new([10, 0, 0, 1].into());
        fake.add_image("base:1", "sha256:base1");
        let binary = fake_binary(dir.path());
        let seen = std::sync::Mutex::new(Vec::new());
        let progress = |m: &str| {
            seen.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(m.to_string())
        };
        let run_labels = BTreeMap::from([(
            crate::runtime::HOME_LABEL.to_string(),
            "/some/home".to_string(),
        )]);
        let (tag, id) = image(
            &fake,
            "base:1",
            "sha256:base1",
            &binary,
            &run_labels,
            &progress,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(tag, image_tag("sha256:base1", &binary));
        assert!(!id.is_empty());
        // Labelled as built by moat, for the home whose run made it.
        let built = fake
            .images_with_label(&format!("{}=/some/home", crate::runtime::BUILT_LABEL))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(built.len(), 1, "{built:?}");
        assert_eq!(built[0].tags, vec![tag.clone()]);
        let calls = fake.calls();
        let made: Vec<&String> = calls
            .iter()
            .filter(|c| c.starts_with("put_file") || c.starts_with("commit"))
            .collect();
        assert_eq!(made.len(), 2, "{calls:?}");
        assert!(
            fake.containers().is_empty(),
            "the build container is removed"
        );
        let shown = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert!(
            shown[0].starts_with("Building image moat-claude:"),
            "{shown:?}"
        );
        // Again: the tag is there, nothing is made.
        let before = fake.calls().len();
        let (again, _) = image(
            &fake,
            "base:1",
            "sha256:base1",
            &binary,
            &BTreeMap::new(),
            &progress,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again, tag);
        let after = fake.calls();
        assert!(
            after[before..].iter().all(|c| c.starts_with("image_id")),
            "{:?}",
            &after[before..]
        );
    }

    #[tokio::test]
    async fn a_failed_build_says_which_step_and_leaves_no_container() {
        use crate::runtime::fake::FakeRuntime;
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        for (step, said) in [
            ("create_container", "creating a container of the base image"),
            ("put_file", "copying claude in"),
            ("commit", "committing"),
        ] {
            let fake = FakeRuntime::new([10, 0, 0, 1].into());
            fake.fail(step, "no space left on device");
            let err = image(
                &fake,
                "base:1",
                "sha256:base1",
                &fake_binary(dir.path()),
                &BTreeMap::new(),
                &|_| {},
            )
            .await
            .map(|_| ())
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("building the Claude Code image moat-claude:")
                    && err.contains("on base:1")
                    && err.contains(said)
                    && err.contains("no space left on device"),
                "{step}: {err}"
            );
            assert!(fake.containers().is_empty(), "{step}: a container was left");
        }
    }

    /// A wheel holding `bundled` as its version and a small executable.
    fn wheel(dir: &Path, bundled: &str, with_binary: bool) -> PathBuf {
        use std::io::Write;
        let path = dir.join(format!("w-{bundled}-{with_binary}.whl"));
        let file = std::fs::File::create(&path).unwrap_or_else(|e| panic!("{e}"));
        let mut zip = zip::ZipWriter::new(file);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        zip.start_file(VERSION_IN_WHEEL, opts)
            .unwrap_or_else(|e| panic!("{e}"));
        zip.write_all(format!("{bundled} (Claude Code)\n").as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        if with_binary {
            zip.start_file(BINARY_IN_WHEEL, opts)
                .unwrap_or_else(|e| panic!("{e}"));
            zip.write_all(b"#!/bin/sh\necho claude\n")
                .unwrap_or_else(|e| panic!("{e}"));
        }
        zip.finish().unwrap_or_else(|e| panic!("{e}"));
        path
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    out.extend(walk(&p));
                } else {
                    out.push(p);
                }
            }
        }
        out
    }

    #[tokio::test]
    async fn a_wheel_on_disk_is_unpacked_once_checked_and_said_to_be_unpinned() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let home = dir.path().join("home");
        let seen = std::sync::Mutex::new(Vec::new());
        let progress = |m: &str| {
            seen.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(m.to_string())
        };
        let shown = || seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let w = wheel(dir.path(), "9.9.9", true);
        let b = binary_from(&home, "9.9.9", Some(w.clone()), &progress)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!b.pinned);
        assert_eq!(b.wheel_sha256, sha256_file(&w).unwrap_or_default());
        assert_eq!(
            std::fs::read(&b.path).unwrap_or_default(),
            b"#!/bin/sh\necho claude\n"
        );
        assert!(
            shown().iter().any(|m| m.contains("not pinned")),
            "{:?}",
            shown()
        );
        assert!(
            shown().iter().any(|m| m.starts_with("Unpacking")),
            "{:?}",
            shown()
        );
        // Again: from the cache, nothing unpacked.
        seen.lock().unwrap_or_else(|e| e.into_inner()).clear();
        binary_from(&home, "9.9.9", Some(w), &progress)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            !shown().iter().any(|m| m.starts_with("Unpacking")),
            "{:?}",
            shown()
        );
        // A wheel bundling another version, or no executable: named.
        let other = wheel(dir.path(), "9.9.9", true);
        let err = binary_from(&home, "9.9.8", Some(other), &progress)
            .await
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bundles Claude Code 9.9.9, not 9.9.8"),
            "{err}"
        );
        let empty = wheel(dir.path(), "9.9.7", false);
        let err = binary_from(&home, "9.9.7", Some(empty), &progress)
            .await
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains(BINARY_IN_WHEEL), "{err}");
        let leftovers: Vec<_> = walk(&home)
            .into_iter()
            .filter(|p| p.to_string_lossy().ends_with(".partial"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[tokio::test]
    async fn the_pinned_version_takes_only_the_pinned_wheel() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let home = dir.path().join("home");
        let w = wheel(dir.path(), PINNED.version, true);
        let err = binary_from(&home, PINNED.version, Some(w), &|_| {})
            .await
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains("not that of the wheel pinned"), "{err}");
        assert!(walk(&home).iter().all(|p| !p.ends_with("claude")));
    }

    /// Serves `body` (or a 404 for other paths) over HTTPS on loopback, as
    /// files.pythonhosted.org; a client trusting its CA and resolving the
    /// name to it.
    async fn wheel_server(body: &'static [u8]) -> OwnClient {
        use rustls_pki_types::pem::PemObject;
        let ca_key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let mut ca = rcgen::CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap_or_else(|e| panic!("{e}"));
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let leaf = rcgen::CertificateParams::new(vec!["files.pythonhosted.org".to_string()])
            .unwrap_or_else(|e| panic!("{e}"))
            .signed_by(&key, &issuer)
            .unwrap_or_else(|e| panic!("{e}"));
        let tls = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| panic!("{e}"))
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())
                .unwrap_or_else(|e| panic!("{e}")),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| async move {
                            let found = req.uri().path() == "/w.whl";
                            let mut resp = http::Response::new(http_body_util::Full::new(
                                bytes::Bytes::from_static(if found { body } else { b"" }),
                            ));
                            if !found {
                                *resp.status_mut() = http::StatusCode::NOT_FOUND;
                            }
                            Ok::<_, std::convert::Infallible>(resp)
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        let mut resolve = crate::proxy::upstream::ResolveMap::new();
        resolve.insert(("files.pythonhosted.org".to_string(), 443), addr);
        crate::proxy::upstream::own_client_with(
            &[ca_cert.der().clone()],
            resolve,
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[tokio::test]
    async fn a_download_is_checked_against_its_pin() {
        const BODY: &[u8] = b"a wheel's bytes";
        let sha = hex(&Sha256::digest(BODY));
        let client = wheel_server(BODY).await;
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let to = dir.path().join("wheel.partial");
        let url = "https://files.pythonhosted.org/w.whl";
        let seen = std::sync::Mutex::new(Vec::new());
        let progress = |m: &str| {
            seen.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(m.to_string())
        };
        download(&client, url, &to, &sha, "1.0", &progress)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(std::fs::read(&to).unwrap_or_default(), BODY);
        let shown = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert!(
            shown.iter().any(|m| m.contains("SHA-256 checked")),
            "{shown:?}"
        );
        // The wrong bytes: refused, and nothing is left.
        std::fs::remove_file(&to).unwrap_or_else(|e| panic!("{e}"));
        let err = download(&client, url, &to, &"0".repeat(64), "1.0", &progress)
            .await
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("has SHA-256 {sha}")) && err.contains("not used"),
            "{err}"
        );
        assert!(!to.exists());
        // Not there: the status, and how to do without the index.
        let err = download(
            &client,
            "https://files.pythonhosted.org/none.whl",
            &to,
            &sha,
            "1.0",
            &progress,
        )
        .await
        .map(|_| ())
        .unwrap_err()
        .to_string();
        assert!(err.contains("404") && err.contains(WHEEL_ENV), "{err}");
        assert!(!to.exists());
    }

    #[test]
    fn state_dirs_are_per_workspace() {
        let home = Path::new("/h");
        let a = state_dir(home, Path::new("/src/app"));
        let b = state_dir(home, Path::new("/other/app"));
        assert_ne!(a, b);
        assert!(
            a.starts_with("/h/claude") && a.to_string_lossy().contains("/app-"),
            "{a:?}"
        );
        assert_eq!(a, state_dir(home, Path::new("/src/app")));
    }

    #[test]
    fn versions_other_than_the_pinned_one_need_a_wheel() {
        assert_eq!(
            check(PINNED.version, false).unwrap_or_default(),
            PINNED.version
        );
        let err = check("9.9.9", false).map(|_| ()).unwrap_err().to_string();
        assert!(
            err.contains("not pinned") && err.contains(WHEEL_ENV),
            "{err}"
        );
        assert_eq!(check("9.9.9", true).unwrap_or_default(), "9.9.9");
        let err = check("1; rm", true).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("not a version"), "{err}");
    }
}
