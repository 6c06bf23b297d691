//! The configuration model: `agent.yaml` (or `moat.yaml`) in a workspace.
//!
//! [`parse_str`] is pure: it turns text into a validated [`Config`], and every
//! problem it finds names the file, line and column. [`load`] finds and reads
//! the file. [`Config::merge`] applies command-line overrides (CLI over file
//! over defaults), so every consumer (CLI, C, Python) merges the same way.

mod yaml;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Diagnostic, Error, ErrorKind, Location, Result};
use crate::policy::{HostPattern, PolicyMode};
use yaml::{Node, Pos, ScalarKind, Value};

/// The file names a workspace's configuration may have, in lookup order.
pub const CONFIG_FILE_NAMES: [&str; 2] = ["agent.yaml", "moat.yaml"];

/// The image used when neither `image` nor `dependencies` choose one.
pub const DEFAULT_IMAGE: &str = "ubuntu:22.04";

/// The largest configuration file moat reads.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Grant providers moat knows, for validation and "did you mean".
pub const BUILTIN_PROVIDERS: &[&str] = &["github", "anthropic", "openai", "aws", "ssh"];

const TOP_LEVEL_FIELDS: &[&str] = &[
    "runtime",
    "name",
    "version",
    "dependencies",
    "image",
    "grants",
    "env",
    "secrets",
    "network",
    "mounts",
    "ports",
    "command",
    "interactive",
    "claude",
];

const NETWORK_FIELDS: &[&str] = &["policy", "allow", "rules"];

/// Environment variables that moat sets in every container itself.
const RESERVED_ENV: &[&str] = &[
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
];

/// A validated workspace configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The workspace directory (absolute when produced by [`load`]).
    pub workspace: PathBuf,
    /// The configuration file, if the workspace has one.
    pub config_file: Option<PathBuf>,
    /// The agent's name: a DNS label, part of its host names.
    pub name: Option<String>,
    /// A free-form version string.
    pub version: Option<String>,
    /// Runtime dependencies, which choose the image.
    pub dependencies: Vec<Dependency>,
    /// An image to use as is; overrides `dependencies`.
    pub image: Option<String>,
    /// Credentials to bind to the run, in file order, without duplicates.
    pub grants: Vec<GrantRef>,
    /// Plain environment variables.
    pub env: BTreeMap<String, String>,
    /// Environment variables resolved from secret backends at run time.
    pub secrets: BTreeMap<String, SecretRef>,
    /// The network policy.
    pub network: Network,
    /// Extra bind mounts.
    pub mounts: Vec<Mount>,
    /// Endpoint name → container port.
    pub ports: BTreeMap<String, u16>,
    /// The default command; `None` uses the image's.
    pub command: Option<Vec<String>>,
    /// Run with a TTY and stdin.
    pub interactive: bool,
    /// The container engine (`runtime:`); `None` chooses the one present.
    pub runtime: Option<crate::runtime::Engine>,
    /// `claude.version`: the Claude Code version `moat claude` uses in this
    /// workspace (`--claude-version` overrides it); `None`: the pinned one.
    pub claude_version: Option<String>,
}

/// A dependency such as `node@20` or `git` (see [`crate::deps`]).
pub use crate::deps::Dependency;

/// A grant named in a configuration: a provider and an optional scope
/// (`github:repo`, `ssh:github.com`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GrantRef {
    /// The provider (`github`, `ssh`, ...).
    pub provider: String,
    /// The scope or host after the colon.
    pub scope: Option<String>,
}

impl GrantRef {
    /// Parses and validates `provider[:scope]`, a built-in provider.
    pub fn parse(text: &str) -> std::result::Result<GrantRef, String> {
        GrantRef::parse_with(text, false)
    }

    /// Like [`GrantRef::parse`], also taking a name that may be a custom
    /// provider's (checked when the grant is bound, against the stored
    /// providers): what a proxy is given.
    pub fn parse_any(text: &str) -> std::result::Result<GrantRef, String> {
        GrantRef::parse_with(text, true)
    }

    fn parse_with(text: &str, custom: bool) -> std::result::Result<GrantRef, String> {
        let text = text.trim();
        let (provider, scope) = match text.split_once(':') {
            Some((p, s)) => (p, Some(s)),
            None => (text, None),
        };
        if provider.is_empty() {
            return Err("empty grant name".to_string());
        }
        if custom && !BUILTIN_PROVIDERS.contains(&provider) {
            let valid = provider
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
            return match (valid, scope) {
                (true, None) => Ok(GrantRef {
                    provider: provider.to_string(),
                    scope: None,
                }),
                (true, Some(_)) => Err(format!("grant \"{text}\": custom grants take no scope")),
                (false, _) => Err(format!("\"{provider}\" is not a grant name")),
            };
        }
        if !BUILTIN_PROVIDERS.contains(&provider) {
            return Err(format!(
                "unknown grant provider \"{provider}\"{}",
                did_you_mean(provider, BUILTIN_PROVIDERS)
            ));
        }
        match (provider, scope) {
            ("ssh", None) => Err("ssh grants name a host, as in \"ssh:github.com\"".to_string()),
            ("ssh", Some(host)) => {
                let pattern =
                    HostPattern::parse(host).map_err(|e| format!("grant \"{text}\": {e}"))?;
                if host.contains('*') || pattern.port().is_some() {
                    return Err(format!(
                        "grant \"{text}\": ssh grants name one host, without wildcards or a port"
                    ));
                }
                Ok(GrantRef {
                    provider: "ssh".into(),
                    scope: Some(host.to_ascii_lowercase()),
                })
            }
            ("github", Some(scope)) => {
                if scope.is_empty()
                    || !scope.chars().all(|c| {
                        c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | ':')
                    })
                {
                    return Err(format!(
                        "grant \"{text}\": scope \"{scope}\" is not a github scope (such as repo or read:org)"
                    ));
                }
                Ok(GrantRef {
                    provider: "github".into(),
                    scope: Some(scope.to_string()),
                })
            }
            (p, Some(_)) => Err(format!("grant \"{text}\": {p} grants take no scope")),
            (p, None) => Ok(GrantRef {
                provider: p.to_string(),
                scope: None,
            }),
        }
    }
}

impl fmt::Display for GrantRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.scope {
            Some(s) => write!(f, "{}:{s}", self.provider),
            None => f.write_str(&self.provider),
        }
    }
}

impl Serialize for GrantRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Read back from its text, checked as when first parsed.
impl<'de> Deserialize<'de> for GrantRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<GrantRef, D::Error> {
        let text = String::deserialize(d)?;
        GrantRef::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Where a secret comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretBackend {
    /// 1Password, through `op read`.
    OnePassword,
    /// AWS Systems Manager Parameter Store, through `aws ssm get-parameter`.
    AwsSsm,
}

/// A reference to a secret (`op://vault/item/field`, `ssm:///path`); never the
/// value itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SecretRef {
    /// The backend that resolves it.
    pub backend: SecretBackend,
    /// The reference as written.
    pub reference: String,
}

impl SecretRef {
    /// Parses and validates a secret reference.
    pub fn parse(text: &str) -> std::result::Result<SecretRef, String> {
        const HINT: &str = "use op://vault/item/field, ssm:///path or ssm://region/path";
        if let Some(rest) = text.strip_prefix("op://") {
            let parts: Vec<&str> = rest.split('/').collect();
            if !(3..=4).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
                return Err(format!(
                    "1password reference \"{text}\" must look like op://vault/item/field"
                ));
            }
            return Ok(SecretRef {
                backend: SecretBackend::OnePassword,
                reference: text.to_string(),
            });
        }
        if let Some(rest) = text.strip_prefix("ssm://") {
            let (region, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, ""),
            };
            if !region.is_empty()
                && !region
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            {
                return Err(format!(
                    "ssm reference \"{text}\": \"{region}\" is not an aws region"
                ));
            }
            if path.len() < 2 || path.contains("//") {
                return Err(format!(
                    "ssm reference \"{text}\" must look like ssm:///path or ssm://region/path"
                ));
            }
            return Ok(SecretRef {
                backend: SecretBackend::AwsSsm,
                reference: text.to_string(),
            });
        }
        match text.split_once("://") {
            Some((scheme, _)) => Err(format!(
                "unsupported secret backend \"{scheme}://\" ({HINT})"
            )),
            None => Err(format!(
                "a secret must be a reference to a secret store, not a value ({HINT}); plain values belong in env"
            )),
        }
    }
}

impl Serialize for SecretRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.reference)
    }
}

/// Read back from its text, checked as when first parsed.
impl<'de> Deserialize<'de> for SecretRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<SecretRef, D::Error> {
        let text = String::deserialize(d)?;
        SecretRef::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// The `network` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// `permissive` (default) or `strict`.
    pub policy: PolicyMode,
    /// Hosts reachable in strict mode, besides the hosts of grants.
    pub allow: Vec<HostPattern>,
    /// Request rules per host (`network.rules`; docs/policy.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<crate::policy::rules::HostRules>,
}

/// A bind mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// The host path; relative paths are resolved against the workspace.
    pub source: PathBuf,
    /// The absolute path in the container.
    pub target: String,
    /// Mounted read-only.
    #[serde(
        serialize_with = "serialize_mode",
        deserialize_with = "deserialize_mode",
        rename = "mode"
    )]
    pub read_only: bool,
}

fn serialize_mode<S: serde::Serializer>(ro: &bool, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(if *ro { "ro" } else { "rw" })
}

/// Reads what [`serialize_mode`] writes (a run plan goes to the supervisor
/// as JSON and must come back the same).
fn deserialize_mode<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    match <String as Deserialize>::deserialize(d)?.as_str() {
        "ro" => Ok(true),
        "rw" => Ok(false),
        other => Err(serde::de::Error::custom(format!(
            "mount mode \"{other}\" is neither ro nor rw"
        ))),
    }
}

impl Mount {
    /// Parses `src:dst[:ro|rw]`, resolving a relative `src` against `workspace`.
    pub fn parse(text: &str, workspace: &Path) -> std::result::Result<Mount, String> {
        let parts: Vec<&str> = text.split(':').collect();
        let (src, dst, mode) = match parts.as_slice() {
            [src, dst] => (*src, *dst, "rw"),
            [src, dst, mode] => (*src, *dst, *mode),
            _ => {
                return Err(format!(
                    "mount \"{text}\" must look like source:target or source:target:ro"
                ))
            }
        };
        let read_only = match mode {
            "ro" => true,
            "rw" => false,
            other => {
                return Err(format!(
                    "mount \"{text}\": mode \"{other}\" must be ro or rw"
                ))
            }
        };
        if src.is_empty() {
            return Err(format!("mount \"{text}\" has an empty source"));
        }
        if src.starts_with('~') {
            return Err(format!(
                "mount \"{text}\": \"~\" is not expanded; use an absolute path or one relative to the workspace"
            ));
        }
        if !dst.starts_with('/') {
            return Err(format!(
                "mount \"{text}\": target \"{dst}\" must be an absolute path in the container"
            ));
        }
        if Path::new(dst)
            .components()
            .any(|c| matches!(c, Component::ParentDir))
        {
            return Err(format!(
                "mount \"{text}\": target \"{dst}\" must not contain \"..\""
            ));
        }
        // As the engine reads it: `/./workspace/` is `/workspace`.
        let target = normalize(Path::new(dst)).to_string_lossy().into_owned();
        let target = target.trim_end_matches('/');
        if let Some(own) = MOAT_TARGETS
            .iter()
            .find(|own| target == **own || Path::new(target).starts_with(own))
        {
            return Err(format!(
                "mount \"{text}\": target \"{dst}\" is where moat puts the run's own {own}; choose another"
            ));
        }
        if target.is_empty() || target == "/workspace" {
            return Err(format!(
                "mount \"{text}\": target \"{dst}\" would hide {} ",
                if target.is_empty() {
                    "the container's root"
                } else {
                    "the workspace"
                }
            )
            .trim_end()
            .to_string());
        }
        let source = normalize(&workspace.join(src));
        // A relative source is the workspace's: `..` may not take it out
        // (a directory outside is written by its absolute path, visibly).
        if !src.starts_with('/') && !source.starts_with(normalize(workspace)) {
            return Err(format!(
                "mount \"{text}\": source \"{src}\" climbs out of the workspace; a relative source must stay in it (write a directory outside by its absolute path)"
            ));
        }
        Ok(Mount {
            source,
            target: target.to_string(),
            read_only,
        })
    }
}

/// Where moat puts a run's own files in its container (the CA bundle, the
/// user's entries, SSH and AWS configuration): no mount may take them.
const MOAT_TARGETS: [&str; 5] = [
    "/etc/moat",
    "/run/moat",
    "/etc/passwd",
    "/etc/group",
    "/etc/ssh/ssh_config.d/moat.conf",
];

/// Lexically removes `.` and `..` components (no file system access).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Where the resolved image came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageSource {
    /// `image:` in the file or `--image`.
    #[default]
    Image,
    /// Mapped from `dependencies`.
    Dependencies,
    /// Nothing chose one: [`DEFAULT_IMAGE`].
    Default,
}

/// The configuration with defaults filled in and the image resolved: what
/// `moat config` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Resolved<'a> {
    /// See [`Config::workspace`].
    pub workspace: &'a Path,
    /// See [`Config::config_file`].
    pub config_file: Option<&'a Path>,
    /// See [`Config::name`].
    pub name: Option<&'a str>,
    /// See [`Config::version`].
    pub version: Option<&'a str>,
    /// The image the run will use.
    pub image: String,
    /// What chose the image.
    pub image_source: ImageSource,
    /// Dependencies as written (`node@20`).
    pub dependencies: Vec<String>,
    /// See [`Config::grants`].
    pub grants: &'a [GrantRef],
    /// See [`Config::env`].
    pub env: &'a BTreeMap<String, String>,
    /// Secret references (never values).
    pub secrets: &'a BTreeMap<String, SecretRef>,
    /// See [`Config::network`].
    pub network: &'a Network,
    /// See [`Config::mounts`].
    pub mounts: &'a [Mount],
    /// See [`Config::ports`].
    pub ports: &'a BTreeMap<String, u16>,
    /// See [`Config::command`].
    pub command: Option<&'a [String]>,
    /// See [`Config::interactive`].
    pub interactive: bool,
    /// See [`Config::runtime`] (`null`: the engine present is chosen).
    pub runtime: Option<crate::runtime::Engine>,
    /// See [`Config::claude_version`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claude_version: Option<&'a str>,
}

/// How override problems name the setting they are about: as the `moat`
/// command's flags (`--name`, `-e KEY`) or, for the libraries, as the
/// configuration's own fields (`name`, `env.KEY`), which is how Python's
/// keywords and C's option keys are named too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Spelling {
    /// `name`, `image`, `grants`, `env.KEY`, `network.policy`,
    /// `network.allow`, `runtime`.
    #[default]
    Fields,
    /// `--name`, `--image`, `--grant`, `-e KEY`, `--policy`, `--allow`,
    /// `--runtime`.
    Flags,
}

/// The single-valued settings an override replaces.
#[derive(Clone, Copy)]
enum Setting {
    Name,
    Image,
    Policy,
    Runtime,
}

impl Spelling {
    /// The name of `setting` in this spelling.
    fn of(self, setting: Setting) -> &'static str {
        match (self, setting) {
            (Spelling::Flags, Setting::Name) => "--name",
            (Spelling::Flags, Setting::Image) => "--image",
            (Spelling::Flags, Setting::Policy) => "--policy",
            (Spelling::Flags, Setting::Runtime) => "--runtime",
            (Spelling::Fields, Setting::Name) => "name",
            (Spelling::Fields, Setting::Image) => "image",
            (Spelling::Fields, Setting::Policy) => "network.policy",
            (Spelling::Fields, Setting::Runtime) => "runtime",
        }
    }
}

/// Overrides of a workspace's configuration (the command line's flags, or
/// a library call's arguments), applied by [`Config::merge`].
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// How problems name the settings (the CLI: [`Spelling::Flags`]).
    pub spelling: Spelling,
    /// `--name`: replaces the file's name.
    pub name: Option<String>,
    /// `--image`: replaces the file's image and dependencies.
    pub image: Option<String>,
    /// `--grant`, repeatable, each possibly a comma list: added to the file's.
    pub grants: Vec<String>,
    /// `-e KEY=VALUE`, repeatable: added to (and overriding) the file's env.
    pub env: Vec<String>,
    /// `-- cmd...`: replaces the file's command when not empty.
    pub command: Option<Vec<String>>,
    /// `-i`: replaces the file's `interactive`.
    pub interactive: Option<bool>,
    /// `--policy` (`permissive` or `strict`): replaces `network.policy`.
    pub policy: Option<String>,
    /// Host patterns added to `network.allow`.
    pub allow: Vec<String>,
    /// `--runtime` (`docker` or `podman`): replaces `runtime:`.
    pub runtime: Option<String>,
}

impl Config {
    /// The configuration of a workspace that has no configuration file.
    pub fn defaults(workspace: impl Into<PathBuf>) -> Config {
        Config {
            workspace: workspace.into(),
            config_file: None,
            name: None,
            version: None,
            dependencies: Vec::new(),
            image: None,
            grants: Vec::new(),
            env: BTreeMap::new(),
            secrets: BTreeMap::new(),
            network: Network::default(),
            mounts: Vec::new(),
            ports: BTreeMap::new(),
            command: None,
            interactive: false,
            runtime: None,
            claude_version: None,
        }
    }

    /// The image a run will use, and what chose it. Fails only when
    /// `dependencies` choose it and `MOAT_DEPS_REGISTRY` cannot be read.
    pub fn resolved_image(&self) -> Result<(String, ImageSource)> {
        if let Some(image) = &self.image {
            return Ok((image.clone(), ImageSource::Image));
        }
        Ok(match self.image_recipe()? {
            Some(recipe) => (recipe.image, ImageSource::Dependencies),
            None => (DEFAULT_IMAGE.to_string(), ImageSource::Default),
        })
    }

    /// How `dependencies` make the run's image (its runtime's image, or
    /// one moat builds: [`crate::deps`]), with `MOAT_DEPS_REGISTRY` read
    /// now (an error when it is not UTF-8); `None` when `image` is set or
    /// there are no dependencies.
    pub fn image_recipe(&self) -> Result<Option<crate::deps::Recipe>> {
        if self.image.is_some() || self.dependencies.is_empty() {
            return Ok(None);
        }
        Ok(crate::deps::plan(
            &self.dependencies,
            &crate::deps::registry_from_env()?,
            DEFAULT_IMAGE,
        ))
    }

    /// A serializable view with defaults filled in and the image resolved.
    pub fn resolved(&self) -> Result<Resolved<'_>> {
        let (image, image_source) = self.resolved_image()?;
        Ok(Resolved {
            workspace: &self.workspace,
            config_file: self.config_file.as_deref(),
            name: self.name.as_deref(),
            version: self.version.as_deref(),
            image,
            image_source,
            dependencies: self.dependencies.iter().map(ToString::to_string).collect(),
            grants: &self.grants,
            env: &self.env,
            secrets: &self.secrets,
            network: &self.network,
            mounts: &self.mounts,
            ports: &self.ports,
            command: self.command.as_deref(),
            interactive: self.interactive,
            runtime: self.runtime,
            claude_version: self.claude_version.as_deref(),
        })
    }

    /// Applies overrides: overrides over file over defaults. Grants and
    /// `env` add to the file's lists. Every problem is reported, each naming
    /// its setting in the overrides' [`Spelling`]; `env` values are never
    /// echoed.
    pub fn merge(mut self, overrides: &Overrides) -> Result<Config> {
        let mut problems = Vec::new();
        let mut problem = |message: String| {
            problems.push(Diagnostic {
                location: None,
                message,
            })
        };
        let flags = overrides.spelling == Spelling::Flags;
        let say = |setting: Setting| overrides.spelling.of(setting);
        if let Some(name) = &overrides.name {
            match check_name(name, "agent name") {
                Ok(()) => self.name = Some(name.clone()),
                Err(e) => problem(format!("{}: {e}", say(Setting::Name))),
            }
        }
        if let Some(image) = &overrides.image {
            match check_image(image) {
                Ok(()) => self.image = Some(image.clone()),
                Err(e) => problem(format!("{}: {e}", say(Setting::Image))),
            }
        }
        for list in &overrides.grants {
            for item in list.split(',').map(str::trim) {
                if item.is_empty() {
                    problem(if flags {
                        format!("--grant {list}: empty grant name (a stray comma?); name each grant, like --grant github,anthropic")
                    } else {
                        format!("grants \"{list}\": empty grant name (a stray comma?); name each grant, like \"github\"")
                    });
                    continue;
                }
                match GrantRef::parse(item) {
                    Ok(grant) => {
                        if !self.grants.contains(&grant) {
                            self.grants.push(grant);
                        }
                    }
                    Err(e) => problem(if flags {
                        format!("--grant {item}: {e}")
                    } else {
                        format!("grants \"{item}\": {e}")
                    }),
                }
            }
        }
        // `-e KEY` on the command line, `env.KEY` for the libraries.
        let env_key = |key: &str| {
            if flags {
                format!("-e {key}")
            } else {
                format!("env.{key}")
            }
        };
        for pair in &overrides.env {
            let Some((key, value)) = pair.split_once('=') else {
                problem(format!("{}: expected KEY=VALUE", env_key(pair)));
                continue;
            };
            if let Err(e) = check_env_key(key) {
                problem(format!("{}: {e}", env_key(key)));
            } else if self.secrets.contains_key(key) {
                problem(format!(
                    "{}: \"{key}\" is also a secret in the configuration; keep one",
                    env_key(key)
                ));
            } else {
                self.env.insert(key.to_string(), value.to_string());
            }
        }
        if let Some(command) = &overrides.command {
            if !command.is_empty() {
                self.command = Some(command.clone());
            }
        }
        if let Some(interactive) = overrides.interactive {
            self.interactive = interactive;
        }
        if let Some(policy) = &overrides.policy {
            match policy.parse() {
                Ok(mode) => self.network.policy = mode,
                Err(e) => problem(format!("{}: {e}", say(Setting::Policy))),
            }
        }
        for (i, pattern) in overrides.allow.iter().enumerate() {
            match HostPattern::parse(pattern) {
                Ok(p) => {
                    if !self.network.allow.contains(&p) {
                        self.network.allow.push(p);
                    }
                }
                Err(e) => problem(if flags {
                    format!("--allow {pattern} (allow[{i}]): {e}")
                } else {
                    format!("network.allow[{i}] \"{pattern}\": {e}")
                }),
            }
        }
        if let Some(runtime) = &overrides.runtime {
            match runtime.parse() {
                Ok(engine) => self.runtime = Some(engine),
                Err(e) => problem(format!("{}: {e}", say(Setting::Runtime))),
            }
        }
        if problems.is_empty() {
            Ok(self)
        } else {
            Err(Error::from_diagnostics(
                ErrorKind::InvalidArgument,
                problems,
            ))
        }
    }
}

/// Finds the configuration file of `workspace`: `agent.yaml` or `moat.yaml`,
/// never both. `Ok(None)` when there is neither. `workspace` may also be the
/// path of the file itself.
pub fn find_config_file(workspace: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
    let meta =
        std::fs::metadata(workspace).map_err(|e| Error::io(workspace, "open workspace", e))?;
    if meta.is_file() {
        let is_config = workspace
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".yaml") || n.ends_with(".yml"));
        if !is_config {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "{}: not a workspace directory or a yaml configuration file",
                    workspace.display()
                ),
            ));
        }
        let dir = match workspace.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        return Ok((dir, Some(workspace.to_path_buf())));
    }
    // In the current directory, name the file as the user would: agent.yaml.
    // A name that is there at all counts, whatever it is (a dangling or
    // looping link, a FIFO, a file we may not read): load then says why it
    // cannot be read, never takes it for "no configuration".
    let here = workspace == Path::new(".") || workspace.as_os_str().is_empty();
    let mut found: Vec<PathBuf> = Vec::new();
    for n in CONFIG_FILE_NAMES {
        let p = if here {
            PathBuf::from(n)
        } else {
            workspace.join(n)
        };
        match std::fs::symlink_metadata(&p) {
            Ok(_) => found.push(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&p, "read", e)),
        }
    }
    match found.as_slice() {
        [] => Ok((workspace.to_path_buf(), None)),
        [one] => Ok((workspace.to_path_buf(), Some(one.clone()))),
        _ => Err(Error::new(
            ErrorKind::Config,
            format!(
                "{}: both agent.yaml and moat.yaml exist; keep one of them",
                workspace.display()
            ),
        )),
    }
}

/// Loads and validates the configuration of `workspace` (a directory, or the
/// path of its configuration file). A workspace without a file gets
/// [`Config::defaults`]. The workspace path in the result is absolute.
pub fn load(workspace: &Path) -> Result<Config> {
    let (dir, file) = find_config_file(workspace)?;
    let abs_dir = std::fs::canonicalize(&dir).map_err(|e| Error::io(&dir, "open workspace", e))?;
    let Some(file) = file else {
        return Ok(Config::defaults(abs_dir));
    };
    let bytes = read_config_file(&file, &abs_dir)?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = valid.iter().filter(|b| **b == b'\n').count() + 1;
        let column = valid.iter().rev().take_while(|b| **b != b'\n').count() + 1;
        Error::config_at(
            Location {
                path: file.clone(),
                line: u32::try_from(line).unwrap_or(u32::MAX),
                column: u32::try_from(column).unwrap_or(u32::MAX),
            },
            "file is not valid utf-8",
        )
    })?;
    let mut config = parse_str(&text, &file, &abs_dir)?;
    config.config_file = Some(
        abs_dir.join(
            file.file_name()
                .map_or_else(|| PathBuf::from("agent.yaml"), PathBuf::from),
        ),
    );
    Ok(config)
}

/// Reads a configuration file that must be there: a regular file (after
/// links) of at most [`MAX_CONFIG_BYTES`]. Opened without blocking, so a
/// FIFO in its place is refused rather than waited on.
/// Reads a configuration file again the way [`load`] did (for showing the
/// lines of its errors): a regular file of its own directory, bounded,
/// never blocking, never through a link out of that directory.
pub fn read_config_source(file: &Path) -> Result<String> {
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir = std::fs::canonicalize(dir).map_err(|e| Error::io(dir, "open", e))?;
    let bytes = read_config_file(file, &dir)?;
    String::from_utf8(bytes)
        .map_err(|_| Error::new(ErrorKind::Config, format!("{}: not utf-8", file.display())))
}

/// Reads a workspace's configuration file: a regular file of the workspace
/// (`workspace`, canonical), at most [`MAX_CONFIG_BYTES`]. A link that
/// leads out of the workspace is refused before anything is opened: a
/// cloned repository's `agent.yaml -> /proc/self/environ` or `-> ~/.aws/
/// credentials` would otherwise be read, and echoed in error messages. So
/// is anything but a regular file (a device acts when opened).
fn read_config_file(file: &Path, workspace: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let not_a_file = || {
        Error::new(
            ErrorKind::Config,
            format!(
                "{}: cannot read: not a regular file; a configuration must be a file",
                file.display()
            ),
        )
    };
    let real = std::fs::canonicalize(file).map_err(|e| Error::io(file, "read", e))?;
    if !real.starts_with(workspace) {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "{}: is a link to {}, outside the workspace; a configuration must be a file of the workspace (a link a repository holds could read any file of yours)",
                file.display(),
                real.display()
            ),
        ));
    }
    if !std::fs::metadata(&real)
        .map_err(|e| Error::io(file, "read", e))?
        .is_file()
    {
        return Err(not_a_file());
    }
    // The checked path, not followed again should its last part have been
    // swapped for a link since; never blocking on what replaced it.
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(&real)
        .map_err(|e| Error::io(file, "read", e))?;
    let meta = f.metadata().map_err(|e| Error::io(file, "read", e))?;
    if !meta.is_file() {
        return Err(not_a_file());
    }
    // What was opened, not what the path led to when checked: a directory
    // of it swapped for a link in between (another run's agent can write
    // the workspace) would have opened any file of the host.
    let opened = crate::paths::opened_path(&f).map_err(|e| Error::io(file, "read", e))?;
    if !opened.starts_with(workspace) {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "{}: changed while being opened, to {}, outside the workspace; not read",
                file.display(),
                opened.display()
            ),
        ));
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "{}: file is {} bytes; a configuration may be at most {MAX_CONFIG_BYTES}",
                file.display(),
                meta.len()
            ),
        ));
    }
    let mut bytes = Vec::new();
    f.by_ref()
        .take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(file, "read", e))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "{}: file grew past {MAX_CONFIG_BYTES} bytes while being read",
                file.display()
            ),
        ));
    }
    Ok(bytes)
}

/// Parses and validates configuration text. `path` is only used in error
/// locations; relative mount sources are resolved against `workspace`. Pure:
/// no file system access.
pub fn parse_str(text: &str, path: &Path, workspace: &Path) -> Result<Config> {
    let mut v = Validator {
        path,
        text,
        problems: Vec::new(),
    };
    let root = match yaml::parse(text) {
        Ok(root) => root,
        Err(e) => {
            return Err(Error::config_at(v.location(e.pos), e.message));
        }
    };
    let mut config = Config::defaults(workspace);
    config.config_file = Some(path.to_path_buf());
    if let Some(root) = root {
        v.read_root(&root, &mut config);
    }
    if v.problems.is_empty() {
        Ok(config)
    } else {
        v.problems
            .sort_by_key(|d| d.location.as_ref().map(|l| (l.line, l.column)));
        Err(Error::from_diagnostics(ErrorKind::Config, v.problems))
    }
}

struct Validator<'p> {
    path: &'p Path,
    text: &'p str,
    problems: Vec<Diagnostic>,
}

impl Validator<'_> {
    /// Where `pos` is, never past the end of the text (an empty value at the
    /// end of a file is reported at the end of its last line).
    fn location(&self, pos: Pos) -> Location {
        let pos = yaml::clamp_to_text(self.text, pos);
        Location {
            path: self.path.to_path_buf(),
            line: pos.line,
            column: pos.column,
        }
    }

    fn problem(&mut self, pos: Pos, message: impl Into<String>) {
        let location = Some(self.location(pos));
        self.problems.push(Diagnostic {
            location,
            message: message.into(),
        });
    }

    fn type_error(&mut self, node: &Node, field: &str, expected: &str) {
        let found = node.describe();
        self.problem(
            node.pos,
            format!("{field}: expected {expected}, found {found}"),
        );
    }

    /// A string value. Other scalars are refused unless `any_scalar`, in which
    /// case numbers and booleans are taken as written.
    fn string<'n>(&mut self, node: &'n Node, field: &str, any_scalar: bool) -> Option<&'n str> {
        match &node.value {
            Value::Scalar {
                text,
                kind: ScalarKind::Str,
            } => Some(text),
            Value::Scalar {
                text,
                kind: ScalarKind::Int | ScalarKind::Float | ScalarKind::Bool,
            } if any_scalar => Some(text),
            _ => {
                self.type_error(node, field, "a string");
                None
            }
        }
    }

    fn map<'n>(&mut self, node: &'n Node, field: &str) -> Option<&'n [(Node, Node)]> {
        match &node.value {
            Value::Map(entries) => Some(entries),
            Value::Scalar {
                kind: ScalarKind::Null,
                ..
            } => Some(&[]),
            _ => {
                self.type_error(node, field, "a mapping");
                None
            }
        }
    }

    fn seq<'n>(&mut self, node: &'n Node, field: &str) -> Option<&'n [Node]> {
        match &node.value {
            Value::Seq(items) => Some(items),
            Value::Scalar {
                kind: ScalarKind::Null,
                ..
            } => Some(&[]),
            _ => {
                self.type_error(node, field, "a list");
                None
            }
        }
    }

    /// `claude: {version: "2.1.332"}`.
    fn read_claude(&mut self, node: &Node, c: &mut Config) {
        let Value::Map(entries) = &node.value else {
            self.type_error(node, "claude", "a mapping (version: ...)");
            return;
        };
        for (key, value) in entries {
            match key_str(key) {
                "version" => {
                    if let Some(v) = self.string(value, "claude.version", true) {
                        let plausible = !v.is_empty()
                            && v.chars().all(|ch| {
                                ch.is_ascii_alphanumeric() || matches!(ch, '.' | '-' | '+')
                            });
                        if plausible {
                            c.claude_version = Some(v.to_string());
                        } else {
                            self.problem(
                                value.pos,
                                format!("claude.version: \"{v}\" is not a version (like 2.1.332)"),
                            );
                        }
                    }
                }
                other => {
                    let hint = did_you_mean(other, &["version"]);
                    self.problem(key.pos, format!("unknown field \"claude.{other}\"{hint}"));
                }
            }
        }
    }

    fn read_root(&mut self, root: &Node, c: &mut Config) {
        let Value::Map(entries) = &root.value else {
            let found = root.describe();
            self.problem(
                root.pos,
                format!("expected a mapping of fields (name, grants, ...), found {found}"),
            );
            return;
        };
        let mut secrets_node = None;
        for (key, value) in entries {
            let name = key_str(key);
            match name {
                "name" => {
                    if let Some(s) = self.string(value, "name", false) {
                        match check_name(s, "agent name") {
                            Ok(()) => c.name = Some(s.to_string()),
                            Err(e) => self.problem(value.pos, e),
                        }
                    }
                }
                "version" => {
                    if let Some(s) = self.string(value, "version", true) {
                        c.version = Some(s.to_string());
                    }
                }
                "dependencies" => self.read_dependencies(value, c),
                "image" => {
                    if let Some(s) = self.string(value, "image", false) {
                        match check_image(s) {
                            Ok(()) => c.image = Some(s.to_string()),
                            Err(e) => self.problem(value.pos, format!("image: {e}")),
                        }
                    }
                }
                "grants" => self.read_grants(value, c),
                "env" => self.read_env(value, c),
                "secrets" => {
                    secrets_node = Some(value);
                    self.read_secrets(value, c);
                }
                "network" => self.read_network(value, c),
                "mounts" => self.read_mounts(value, c),
                "ports" => self.read_ports(value, c),
                "command" => self.read_command(value, c),
                "runtime" => match &value.value {
                    Value::Scalar { text, .. } => match text.parse() {
                        Ok(engine) => c.runtime = Some(engine),
                        Err(e) => self.problem(value.pos, format!("runtime: {e}")),
                    },
                    _ => self.type_error(value, "runtime", "docker or podman"),
                },
                "interactive" => match &value.value {
                    Value::Scalar {
                        text,
                        kind: ScalarKind::Bool,
                    } => c.interactive = text.eq_ignore_ascii_case("true"),
                    _ => self.type_error(value, "interactive", "true or false"),
                },
                "claude" => self.read_claude(value, c),
                other => {
                    let hint = did_you_mean(other, TOP_LEVEL_FIELDS);
                    self.problem(key.pos, format!("unknown field \"{other}\"{hint}"));
                }
            }
        }
        // A key in both env and secrets: point at the secret.
        if let Some(secrets) = secrets_node {
            if let Value::Map(entries) = &secrets.value {
                for (key, _) in entries {
                    let k = key_str(key);
                    if c.env.contains_key(k) {
                        self.problem(
                            key.pos,
                            format!("\"{k}\" is in both env and secrets; keep one"),
                        );
                    }
                }
            }
        }
    }

    fn read_dependencies(&mut self, node: &Node, c: &mut Config) {
        let Some(items) = self.seq(node, "dependencies") else {
            return;
        };
        for item in items {
            let Some(text) = self.string(item, "dependencies", false) else {
                continue;
            };
            let dep = match crate::deps::parse(text) {
                Ok((_, dep)) => dep,
                Err(e) => {
                    self.problem(item.pos, e);
                    continue;
                }
            };
            if c.dependencies.iter().any(|d| d.name == dep.name) {
                let name = &dep.name;
                self.problem(item.pos, format!("dependency \"{name}\" is listed twice"));
                continue;
            }
            c.dependencies.push(dep);
        }
    }

    fn read_grants(&mut self, node: &Node, c: &mut Config) {
        let Some(items) = self.seq(node, "grants") else {
            return;
        };
        for item in items {
            let Some(text) = self.string(item, "grants", false) else {
                continue;
            };
            match GrantRef::parse(text) {
                Ok(grant) => {
                    if !c.grants.contains(&grant) {
                        c.grants.push(grant);
                    }
                }
                Err(e) => self.problem(item.pos, e),
            }
        }
    }

    fn read_env(&mut self, node: &Node, c: &mut Config) {
        let Some(entries) = self.map(node, "env") else {
            return;
        };
        for (key, value) in entries {
            let k = key_str(key);
            if let Err(e) = check_env_key(k) {
                self.problem(key.pos, format!("env: {e}"));
                continue;
            }
            if let Value::Scalar {
                kind: ScalarKind::Null,
                ..
            } = value.value
            {
                self.problem(
                    key.pos,
                    format!("env.{k}: no value; write {k}: \"\" for an empty string"),
                );
                continue;
            }
            if let Some(s) = self.string(value, &format!("env.{k}"), true) {
                c.env.insert(k.to_string(), s.to_string());
            }
        }
    }

    fn read_secrets(&mut self, node: &Node, c: &mut Config) {
        let Some(entries) = self.map(node, "secrets") else {
            return;
        };
        for (key, value) in entries {
            let k = key_str(key);
            if let Err(e) = check_env_key(k) {
                self.problem(key.pos, format!("secrets: {e}"));
                continue;
            }
            let Some(s) = self.string(value, &format!("secrets.{k}"), false) else {
                continue;
            };
            match SecretRef::parse(s) {
                Ok(r) => {
                    c.secrets.insert(k.to_string(), r);
                }
                Err(e) => self.problem(value.pos, format!("secrets.{k}: {e}")),
            }
        }
    }

    fn read_network(&mut self, node: &Node, c: &mut Config) {
        let Some(entries) = self.map(node, "network") else {
            return;
        };
        for (key, value) in entries {
            match key_str(key) {
                "policy" => {
                    if let Some(s) = self.string(value, "network.policy", false) {
                        match s.parse::<PolicyMode>() {
                            Ok(mode) => c.network.policy = mode,
                            Err(e) => {
                                let hint = did_you_mean(s, PolicyMode::NAMES);
                                let msg = if hint.is_empty() {
                                    e
                                } else {
                                    format!("unknown network policy \"{s}\"{hint}")
                                };
                                self.problem(value.pos, format!("network.policy: {msg}"));
                            }
                        }
                    }
                }
                "allow" => {
                    let Some(items) = self.seq(value, "network.allow") else {
                        continue;
                    };
                    let mut seen: std::collections::HashSet<HostPattern> =
                        c.network.allow.iter().cloned().collect();
                    for item in items {
                        let Some(s) = self.string(item, "network.allow", false) else {
                            continue;
                        };
                        match HostPattern::parse(s) {
                            Ok(p) => {
                                if seen.insert(p.clone()) {
                                    c.network.allow.push(p);
                                }
                            }
                            Err(e) => self.problem(item.pos, format!("network.allow: {e}")),
                        }
                    }
                }
                "rules" => self.read_rules(value, c),
                other => {
                    let full: Vec<String> = NETWORK_FIELDS
                        .iter()
                        .map(|f| format!("network.{f}"))
                        .collect();
                    let full: Vec<&str> = full.iter().map(String::as_str).collect();
                    let hint = did_you_mean(&format!("network.{other}"), &full);
                    self.problem(key.pos, format!("unknown field \"network.{other}\"{hint}"));
                }
            }
        }
    }

    /// `network.rules`: each entry a host, or `{host: [rule, ...]}`.
    fn read_rules(&mut self, node: &Node, c: &mut Config) {
        use crate::policy::rules::{HostRules, Rule};
        let Some(items) = self.seq(node, "network.rules") else {
            return;
        };
        let mut seen: Vec<(HostPattern, u32)> = Vec::new();
        for item in items {
            let (host_node, rule_nodes): (&Node, &[Node]) = match &item.value {
                Value::Scalar { .. } => (item, &[]),
                Value::Map(entries) if entries.len() == 1 => {
                    let (host, rules) = &entries[0];
                    let Some(list) = self.seq(rules, "network.rules") else {
                        continue;
                    };
                    (host, list)
                }
                _ => {
                    self.problem(
                        item.pos,
                        "network.rules: each entry is a host, or a host with its rules ({host: [\"allow GET /path\", ...]})",
                    );
                    continue;
                }
            };
            let Some(host_text) = self.string(host_node, "network.rules", false) else {
                continue;
            };
            let host = match HostPattern::parse(host_text) {
                Ok(h) => h,
                Err(e) => {
                    self.problem(host_node.pos, format!("network.rules: {e}"));
                    continue;
                }
            };
            // The first entry for a host is the one read: a second would be
            // rules written and never applied.
            if let Some(first) = seen.iter().find(|(h, _)| *h == host) {
                self.problem(
                    host_node.pos,
                    format!(
                        "network.rules: {host_text} is listed twice (first at line {}); only one entry is read, so put all its rules in that one",
                        first.1
                    ),
                );
                continue;
            }
            seen.push((host.clone(), host_node.pos.line));
            let mut rules = Vec::new();
            for r in rule_nodes {
                let Some(text) = self.string(r, "network.rules", false) else {
                    continue;
                };
                match Rule::parse(text) {
                    Ok(rule) => rules.push(rule),
                    Err(e) => self.problem(r.pos, format!("network.rules: {e}")),
                }
            }
            c.network.rules.push(HostRules { host, rules });
        }
    }

    fn read_mounts(&mut self, node: &Node, c: &mut Config) {
        let Some(items) = self.seq(node, "mounts") else {
            return;
        };
        let mut targets = HashSet::new();
        for item in items {
            let Some(s) = self.string(item, "mounts", false) else {
                continue;
            };
            match Mount::parse(s, &c.workspace) {
                Ok(m) => {
                    if !targets.insert(m.target.clone()) {
                        self.problem(
                            item.pos,
                            format!("mount \"{s}\": target \"{}\" is already mounted", m.target),
                        );
                        continue;
                    }
                    c.mounts.push(m);
                }
                Err(e) => self.problem(item.pos, e),
            }
        }
    }

    fn read_ports(&mut self, node: &Node, c: &mut Config) {
        let Some(entries) = self.map(node, "ports") else {
            return;
        };
        for (key, value) in entries {
            let endpoint = key_str(key);
            if let Err(e) = check_name(endpoint, "endpoint name") {
                self.problem(key.pos, format!("ports: {e}"));
                continue;
            }
            let port = match &value.value {
                Value::Scalar {
                    text,
                    kind: ScalarKind::Int,
                } => parse_int(text),
                _ => {
                    self.type_error(value, &format!("ports.{endpoint}"), "a port number");
                    continue;
                }
            };
            match port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0) {
                Some(p) => {
                    c.ports.insert(endpoint.to_string(), p);
                }
                None => {
                    let text = match &value.value {
                        Value::Scalar { text, .. } => text.as_str(),
                        _ => "",
                    };
                    self.problem(
                        value.pos,
                        format!("ports.{endpoint}: port {text} is out of range (1-65535)"),
                    );
                }
            }
        }
    }

    fn read_command(&mut self, node: &Node, c: &mut Config) {
        match &node.value {
            Value::Seq(items) => {
                if items.is_empty() {
                    self.problem(node.pos, "command: empty list; remove the field to use the image's command");
                    return;
                }
                let mut argv = Vec::new();
                for item in items {
                    match self.string(item, "command", true) {
                        Some(s) => argv.push(s.to_string()),
                        None => return,
                    }
                }
                c.command = Some(argv);
            }
            Value::Scalar {
                kind: ScalarKind::Str,
                ..
            } => self.problem(
                node.pos,
                "command: expected a list such as [\"npm\", \"start\"]; for a shell line use [\"sh\", \"-c\", \"...\"]",
            ),
            _ => self.type_error(node, "command", "a list of strings"),
        }
    }
}

fn key_str(node: &Node) -> &str {
    match &node.value {
        Value::Scalar { text, .. } => text,
        _ => "",
    }
}

fn parse_int(text: &str) -> Option<i64> {
    if let Some(hex) = text.strip_prefix("0x") {
        return i64::from_str_radix(hex, 16).ok();
    }
    if let Some(oct) = text.strip_prefix("0o") {
        return i64::from_str_radix(oct, 8).ok();
    }
    text.parse().ok()
}

/// The seeds' naming rule for agents and endpoints: a DNS label of lowercase
/// letters, digits and hyphens, not starting or ending with a hyphen.
pub fn check_name(name: &str, what: &str) -> std::result::Result<(), String> {
    let why = if name.is_empty() {
        Some("is empty")
    } else if name.len() > 63 {
        Some("is longer than 63 characters")
    } else if name.contains('_') {
        Some("contains \"_\", which host names cannot have; use \"-\"")
    } else if name.chars().any(|c| c.is_ascii_uppercase()) {
        Some("must be lowercase")
    } else if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        Some("may only contain lowercase letters, digits and hyphens")
    } else if name.starts_with('-') || name.ends_with('-') {
        Some("must not start or end with a hyphen")
    } else {
        None
    };
    match why {
        Some(why) => Err(format!("invalid {what} \"{name}\": {why}")),
        None => Ok(()),
    }
}

fn check_env_key(key: &str) -> std::result::Result<(), String> {
    let mut chars = key.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!(
            "\"{key}\" is not a valid environment variable name (letters, digits and _, not starting with a digit)"
        ));
    }
    if RESERVED_ENV.contains(&key) || key.starts_with("MOAT_") {
        return Err(format!("\"{key}\" is set by moat and cannot be overridden"));
    }
    Ok(())
}

fn check_image(image: &str) -> std::result::Result<(), String> {
    if image.is_empty() {
        return Err("empty image name".to_string());
    }
    if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "\"{image}\" is not an image reference (it contains whitespace)"
        ));
    }
    Ok(())
}

/// ` (did you mean "x"?)` for the closest candidate, or an empty string.
#[doc(hidden)]
pub fn did_you_mean(input: &str, candidates: &[&str]) -> String {
    let best = candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(input, c), *c))
        .filter(|(d, c)| *d <= 2 && *d < c.len().max(input.len()))
        .min_by_key(|(d, _)| *d);
    match best {
        Some((_, c)) => format!(" (did you mean \"{c}\"?)"),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests;
