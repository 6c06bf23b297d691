//! The provider table: which hosts a provider's token goes to, in which
//! header and format, where the token is read from, and what placeholder a
//! container sees. Built-in providers are here; custom ones are YAML files in
//! `$MOAT_HOME/providers/`.

use std::path::Path;

use base64::Engine;
use serde::Deserialize;

use super::store::StoredGrant;
use crate::error::{Error, ErrorKind, Result};
use crate::proxy::Credential;

/// How a token becomes a header value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueFormat {
    /// The token as is.
    Raw,
    /// `<prefix><token>`.
    Prefix(String),
    /// `Basic base64("<user>:<token>")` (git over HTTPS).
    Basic(String),
}

impl ValueFormat {
    fn render(&self, token: &str) -> String {
        match self {
            ValueFormat::Raw => token.to_string(),
            ValueFormat::Prefix(p) => format!("{p}{token}"),
            ValueFormat::Basic(user) => format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{token}"))
            ),
        }
    }
}

/// One header a provider's token is injected as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injection {
    /// Host or `*.` pattern (port 443 unless given).
    pub host: String,
    /// Header name.
    pub header: String,
    /// How the token is written.
    pub format: ValueFormat,
}

/// A provider: a row of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    /// The name (`github`).
    pub name: String,
    /// How people write it (`GitHub`).
    pub title: String,
    /// Where `moat grant` looks for a token, in order.
    pub sources: Vec<TokenSource>,
    /// Environment variables a token is read from at grant time, in order.
    pub env: Vec<String>,
    /// Headers to inject, per token kind (`None` = any kind).
    pub injections: Vec<(Option<&'static str>, Injection)>,
    /// Fixed extra headers for a token kind (not secret).
    pub extra_headers: Vec<(&'static str, &'static str, &'static str)>,
    /// Variables the container sees instead of the token, per token kind.
    pub placeholders: Vec<(Option<&'static str>, String, String)>,
    /// Whether moat stores a secret for it (ssh and aws store configuration).
    pub stores_secret: bool,
    /// Where it came from: `builtin` or the YAML file.
    pub origin: String,
}

/// Where `moat grant <provider>` finds a token, tried in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// The provider's environment variables ([`Provider::env`]).
    Environment,
    /// The `gh` CLI's login (`gh auth token`), confirmed by the user.
    GhCli,
    /// Claude Code's OAuth login (`~/.claude/.credentials.json`), confirmed
    /// by the user.
    ClaudeCode,
    /// Asked for on the terminal (never echoed), with this label.
    Prompt(String),
}

fn inj(host: &str, header: &str, format: ValueFormat) -> Injection {
    Injection {
        host: host.into(),
        header: header.into(),
        format,
    }
}

/// A GitHub-token-shaped placeholder (format-valid, never a real token).
pub const GITHUB_PLACEHOLDER: &str = "ghp_moatPLACEHOLDERxxxxxxxxxxxxxxxxxxxxxx";

/// The built-in providers.
pub fn builtin(name: &str) -> Option<Provider> {
    let p = |name: &str, title: &str, env: &[&str]| Provider {
        name: name.into(),
        title: title.into(),
        sources: vec![
            TokenSource::Environment,
            TokenSource::Prompt(format!("{title} token")),
        ],
        env: env.iter().map(|s| s.to_string()).collect(),
        injections: Vec::new(),
        extra_headers: Vec::new(),
        placeholders: Vec::new(),
        stores_secret: true,
        origin: "builtin".into(),
    };
    match name {
        "github" => Some(Provider {
            injections: vec![
                (
                    None,
                    inj(
                        "api.github.com",
                        "authorization",
                        ValueFormat::Prefix("Bearer ".into()),
                    ),
                ),
                (
                    None,
                    inj(
                        "github.com",
                        "authorization",
                        ValueFormat::Basic("x-access-token".into()),
                    ),
                ),
            ],
            placeholders: vec![
                (None, "GH_TOKEN".into(), GITHUB_PLACEHOLDER.into()),
                (None, "GITHUB_TOKEN".into(), GITHUB_PLACEHOLDER.into()),
            ],
            sources: vec![
                TokenSource::Environment,
                TokenSource::GhCli,
                TokenSource::Prompt("GitHub personal access token".into()),
            ],
            ..p("github", "GitHub", &["GITHUB_TOKEN", "GH_TOKEN"])
        }),
        "anthropic" => Some(Provider {
            injections: vec![
                (
                    Some("api_key"),
                    inj("api.anthropic.com", "x-api-key", ValueFormat::Raw),
                ),
                (
                    Some("oauth"),
                    inj(
                        "api.anthropic.com",
                        "authorization",
                        ValueFormat::Prefix("Bearer ".into()),
                    ),
                ),
            ],
            extra_headers: vec![("oauth", "anthropic-beta", "oauth-2025-04-20")],
            placeholders: vec![
                (
                    Some("api_key"),
                    "ANTHROPIC_API_KEY".into(),
                    "sk-ant-api03-moat-placeholder".into(),
                ),
                (
                    Some("oauth"),
                    "CLAUDE_CODE_OAUTH_TOKEN".into(),
                    "sk-ant-oat01-moat-placeholder".into(),
                ),
            ],
            sources: vec![
                TokenSource::Environment,
                TokenSource::ClaudeCode,
                TokenSource::Prompt("Anthropic API key".into()),
            ],
            ..p("anthropic", "Anthropic", &["ANTHROPIC_API_KEY"])
        }),
        "openai" => Some(Provider {
            injections: vec![(
                None,
                inj(
                    "api.openai.com",
                    "authorization",
                    ValueFormat::Prefix("Bearer ".into()),
                ),
            )],
            placeholders: vec![(None, "OPENAI_API_KEY".into(), "sk-moat-placeholder".into())],
            sources: vec![
                TokenSource::Environment,
                TokenSource::Prompt("OpenAI API key".into()),
            ],
            ..p("openai", "OpenAI", &["OPENAI_API_KEY"])
        }),
        "aws" => Some(Provider {
            stores_secret: false,
            sources: Vec::new(),
            ..p(name, "AWS", &[])
        }),
        "ssh" => Some(Provider {
            stores_secret: false,
            sources: Vec::new(),
            ..p(name, "SSH", &[])
        }),
        _ => None,
    }
}

/// The names of the built-in providers.
pub const BUILTIN: &[&str] = &["github", "anthropic", "openai", "aws", "ssh"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CustomFile {
    name: Option<String>,
    hosts: Vec<String>,
    header: String,
    #[serde(default)]
    prefix: String,
    env: String,
    placeholder: Option<String>,
}

/// Loads a custom provider from `$MOAT_HOME/providers/<name>.yaml`.
pub fn custom(home: &Path, name: &str) -> Result<Option<Provider>> {
    let path = home.join("providers").join(format!("{name}.yaml"));
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&path, "read", e)),
    };
    let bad = |msg: String| Error::new(ErrorKind::Config, format!("{}: {msg}", path.display()));
    let file: CustomFile = serde_yaml::from_str(&text).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!("{}:{}: ", l.line(), l.column()))
            .unwrap_or_default();
        bad(format!("{at}{e}"))
    })?;
    if let Some(n) = &file.name {
        if n != name {
            return Err(bad(format!(
                "name \"{n}\" differs from the file name \"{name}\""
            )));
        }
    }
    if file.hosts.is_empty() {
        return Err(bad("hosts: list at least one host".into()));
    }
    for host in &file.hosts {
        crate::policy::HostPattern::parse(host).map_err(|e| bad(format!("hosts: {e}")))?;
    }
    http::HeaderName::from_bytes(file.header.as_bytes())
        .map_err(|_| bad(format!("header: \"{}\" is not a header name", file.header)))?;
    let format = if file.prefix.is_empty() {
        ValueFormat::Raw
    } else {
        ValueFormat::Prefix(file.prefix.clone())
    };
    Ok(Some(Provider {
        name: name.into(),
        title: name.into(),
        sources: vec![
            TokenSource::Environment,
            TokenSource::Prompt(format!("{name} token")),
        ],
        env: vec![file.env.clone()],
        injections: file
            .hosts
            .iter()
            .map(|h| (None, inj(h, &file.header, format.clone())))
            .collect(),
        extra_headers: Vec::new(),
        placeholders: file
            .placeholder
            .map(|p| vec![(None, file.env.clone(), p)])
            .unwrap_or_default(),
        stores_secret: true,
        origin: path.display().to_string(),
    }))
}

/// A built-in or custom provider; a clear error (with "did you mean") when
/// there is none.
pub fn lookup(home: &Path, name: &str) -> Result<Provider> {
    if let Some(p) = builtin(name) {
        return Ok(p);
    }
    super::store::check_provider_name(name)?;
    if let Some(p) = custom(home, name)? {
        return Ok(p);
    }
    Err(Error::new(
        ErrorKind::InvalidArgument,
        format!(
            "unknown provider \"{name}\"{}; built in: {}; custom providers are YAML files in {}",
            crate::config::did_you_mean(name, BUILTIN),
            BUILTIN.join(", "),
            home.join("providers").display()
        ),
    ))
}

fn kind_matches(want: Option<&str>, kind: Option<&str>) -> bool {
    want.is_none() || want == kind
}

impl Provider {
    /// The proxy credentials for a stored grant of this provider.
    pub fn credentials(&self, grant: &StoredGrant) -> Result<Vec<Credential>> {
        let kind = grant.kind.as_deref();
        let mut out = Vec::new();
        for (want, i) in &self.injections {
            if !kind_matches(*want, kind) {
                continue;
            }
            let value = i.format.render(grant.token.expose());
            out.push(Credential::new(&i.host, &i.header, &value)?.with_grant(self.name.clone()));
        }
        for (want, header, value) in &self.extra_headers {
            if Some(*want) != kind {
                continue;
            }
            for (_, i) in self
                .injections
                .iter()
                .filter(|(w, _)| kind_matches(*w, kind))
            {
                out.push(Credential::new(&i.host, header, value)?.with_grant(self.name.clone()));
            }
        }
        Ok(out)
    }

    /// The hosts this provider's grants reach (allowed in strict mode).
    pub fn hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = self
            .injections
            .iter()
            .map(|(_, i)| i.host.clone())
            .collect();
        hosts.dedup();
        hosts
    }

    /// The placeholder variables a container sees for a grant of this kind.
    pub fn placeholders(&self, kind: Option<&str>) -> Vec<(String, String)> {
        self.placeholders
            .iter()
            .filter(|(w, _, _)| kind_matches(*w, kind))
            .map(|(_, k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_sources_follow_the_seeds_order() {
        let sources = |name: &str| builtin(name).unwrap().sources;
        assert_eq!(
            sources("github"),
            vec![
                TokenSource::Environment,
                TokenSource::GhCli,
                TokenSource::Prompt("GitHub personal access token".into()),
            ]
        );
        assert_eq!(
            sources("anthropic"),
            vec![
                TokenSource::Environment,
                TokenSource::ClaudeCode,
                TokenSource::Prompt("Anthropic API key".into()),
            ]
        );
        assert_eq!(sources("openai")[0], TokenSource::Environment);
        // aws and ssh store configuration, not a token.
        assert!(sources("aws").is_empty() && sources("ssh").is_empty());
        let titles: Vec<String> = BUILTIN.iter().map(|n| builtin(n).unwrap().title).collect();
        assert_eq!(titles, ["GitHub", "Anthropic", "OpenAI", "AWS", "SSH"]);
    }

    #[test]
    fn a_custom_provider_is_titled_by_its_name_and_asks_env_then_terminal() {
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(home.path().join("providers")).unwrap();
        std::fs::write(
            home.path().join("providers/acme.yaml"),
            "hosts: [api.acme.test]\nheader: x-api-key\nenv: ACME_KEY\n",
        )
        .unwrap();
        let p = lookup(home.path(), "acme").unwrap();
        assert_eq!(p.title, "acme");
        assert_eq!(
            p.sources,
            vec![
                TokenSource::Environment,
                TokenSource::Prompt("acme token".into())
            ]
        );
    }
}
