//! Network policy: the mode, and the host patterns of an allow list.
//!
//! Pure: no I/O, no allocation beyond the pattern itself; fuzzable.
//!
//! # The matching rule
//!
//! A pattern is `HOST` or `HOST:PORT`. `HOST` is a dot-separated list of
//! labels; each label is either a literal DNS label (`a-z`, `0-9`, `-`, `_`,
//! 1–63 characters, not starting or ending with `-`) or `*`. Wildcards may
//! only stand at the left, one or more of them, and at least one literal label
//! must follow.
//!
//! - A literal label matches the same label, ignoring ASCII case.
//! - `*` matches exactly one label, never zero and never several. So
//!   `*.github.com` matches `api.github.com` but not `github.com` and not
//!   `a.b.github.com`; `*.*.amazonaws.com` matches `s3.us-east-1.amazonaws.com`.
//! - A trailing dot on the requested host (`api.github.com.`) is ignored.
//! - A pattern with a port matches only that port; a pattern without one
//!   matches ports 80 and 443.

pub mod rules;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The network policy of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyMode {
    /// All outbound HTTP and HTTPS is allowed (the default).
    #[default]
    Permissive,
    /// Only the allow list and the hosts of granted credentials are reachable.
    Strict,
}

impl PolicyMode {
    /// The names accepted in `network.policy`.
    pub const NAMES: &'static [&'static str] = &["permissive", "strict"];

    /// The lowercase name of the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyMode::Permissive => "permissive",
            PolicyMode::Strict => "strict",
        }
    }
}

impl FromStr for PolicyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "permissive" => Ok(PolicyMode::Permissive),
            "strict" => Ok(PolicyMode::Strict),
            _ => Err(format!(
                "unknown network policy \"{s}\" (expected \"permissive\" or \"strict\")"
            )),
        }
    }
}

impl fmt::Display for PolicyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Label {
    Any,
    Literal(String),
}

/// One entry of an allow list; see the module docs for the matching rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPattern {
    labels: Vec<Label>,
    port: Option<u16>,
}

impl HostPattern {
    /// Parses a pattern; the error says what is wrong, without a location.
    pub fn parse(text: &str) -> Result<HostPattern, String> {
        if text.is_empty() {
            return Err("empty host pattern".to_string());
        }
        if text.contains("://") {
            return Err(format!(
                "host pattern \"{text}\" must be a host name, not a URL (drop the scheme)"
            ));
        }
        if text.contains('/') {
            return Err(format!(
                "host pattern \"{text}\" must be a host name, without a path"
            ));
        }
        if text.starts_with('[') || text.matches(':').count() > 1 {
            return Err(format!(
                "host pattern \"{text}\": ip v6 addresses are not supported in allow lists"
            ));
        }
        let (host, port) = match text.rsplit_once(':') {
            Some((host, port)) => {
                let port = port
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| {
                        format!("host pattern \"{text}\": port \"{port}\" is not a number from 1 to 65535")
                    })?;
                (host, Some(port))
            }
            None => (text, None),
        };
        let host = host.strip_suffix('.').unwrap_or(host);
        if host.is_empty() {
            return Err(format!("host pattern \"{text}\" has no host"));
        }
        let mut labels = Vec::new();
        let mut seen_literal = false;
        for label in host.split('.') {
            if label == "*" {
                if seen_literal {
                    return Err(format!(
                        "host pattern \"{text}\": \"*\" may only stand at the left, as in \"*.example.com\""
                    ));
                }
                labels.push(Label::Any);
            } else if label.contains('*') {
                return Err(format!(
                    "host pattern \"{text}\": \"*\" must be a whole label, as in \"*.example.com\""
                ));
            } else {
                check_label(label).map_err(|why| format!("host pattern \"{text}\": {why}"))?;
                seen_literal = true;
                labels.push(Label::Literal(label.to_ascii_lowercase()));
            }
        }
        if !seen_literal {
            return Err(format!(
                "host pattern \"{text}\" matches every host; use policy: permissive instead"
            ));
        }
        Ok(HostPattern { labels, port })
    }

    /// Does this pattern allow `host` on `port`?
    pub fn matches(&self, host: &str, port: u16) -> bool {
        let port_ok = match self.port {
            Some(p) => p == port,
            None => port == 80 || port == 443,
        };
        if !port_ok {
            return false;
        }
        let host = host.strip_suffix('.').unwrap_or(host);
        let mut parts = host.split('.');
        let mut count = 0usize;
        for label in &self.labels {
            let Some(part) = parts.next() else {
                return false;
            };
            count += 1;
            let ok = match label {
                Label::Any => !part.is_empty(),
                Label::Literal(lit) => part.eq_ignore_ascii_case(lit),
            };
            if !ok {
                return false;
            }
        }
        count == self.labels.len() && parts.next().is_none()
    }

    /// The port this pattern names, if any.
    pub fn port(&self) -> Option<u16> {
        self.port
    }
}

/// A client's policy: the mode, the allow list, and the hosts of its
/// credentials (allowed automatically in strict mode).
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Permissive or strict.
    pub mode: PolicyMode,
    /// The allow list.
    pub allow: Vec<HostPattern>,
    /// Hosts of granted credentials, with the grant's name.
    pub grant_hosts: Vec<(HostPattern, String)>,
    /// Request rules per host (`network.rules`); their hosts are
    /// reachable in strict mode, each request then judged by them.
    pub rules: Vec<rules::HostRules>,
}

/// The outcome of a policy check, with the rule that decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the destination may be reached.
    pub allowed: bool,
    /// `permissive`, `allow:<pattern>`, `grant:<name>` or `strict`.
    pub rule: String,
}

impl Policy {
    /// May HTTP(S) traffic go to `host:port`?
    pub fn decide(&self, host: &str, port: u16) -> Decision {
        if self.mode == PolicyMode::Permissive {
            return Decision {
                allowed: true,
                rule: "permissive".into(),
            };
        }
        if let Some(p) = self.allow.iter().find(|p| p.matches(host, port)) {
            return Decision {
                allowed: true,
                rule: format!("allow:{p}"),
            };
        }
        if let Some((_, grant)) = self.grant_hosts.iter().find(|(p, _)| p.matches(host, port)) {
            return Decision {
                allowed: true,
                rule: format!("grant:{grant}"),
            };
        }
        if let Some(entry) = rules::entry_for(&self.rules, host, port) {
            return Decision {
                allowed: true,
                rule: format!("rules:{}", entry.host),
            };
        }
        Decision {
            allowed: false,
            rule: "strict".into(),
        }
    }

    /// May a raw (non-TLS) tunnel go to `host:port`? Permissive: yes.
    /// Strict: only when an allow-list entry names that exact port.
    pub fn decide_tunnel(&self, host: &str, port: u16) -> Decision {
        if self.mode == PolicyMode::Permissive {
            return Decision {
                allowed: true,
                rule: "permissive".into(),
            };
        }
        match self
            .allow
            .iter()
            .find(|p| p.port() == Some(port) && p.matches(host, port))
        {
            Some(p) => Decision {
                allowed: true,
                rule: format!("allow:{p}"),
            },
            None => Decision {
                allowed: false,
                rule: "strict".into(),
            },
        }
    }
}

/// The body of the 403 a blocked request gets (the seeds' words).
pub fn blocked_message(host: &str) -> String {
    format!(
        "Moat: request blocked by network policy.\nHost \"{host}\" is not in the allow list.\nAdd it to network.allow in agent.yaml or use policy: permissive.\n"
    )
}

fn check_label(label: &str) -> Result<(), String> {
    if label.is_empty() {
        return Err("empty label (two dots in a row?)".to_string());
    }
    if label.len() > 63 {
        return Err(format!("label \"{label}\" is longer than 63 characters"));
    }
    if let Some(c) = label
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(format!("character {c:?} is not allowed in a host name"));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(format!("label \"{label}\" starts or ends with \"-\""));
    }
    Ok(())
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, label) in self.labels.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            match label {
                Label::Any => f.write_str("*")?,
                Label::Literal(l) => f.write_str(l)?,
            }
        }
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

impl Serialize for HostPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Read back from its text, checked as when first parsed.
impl<'de> Deserialize<'de> for HostPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<HostPattern, D::Error> {
        let text = String::deserialize(d)?;
        HostPattern::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> HostPattern {
        HostPattern::parse(s).unwrap()
    }

    // The seeds' table: exact, one level, two levels.
    #[test]
    fn seeds_examples() {
        assert!(p("api.github.com").matches("api.github.com", 443));
        assert!(!p("api.github.com").matches("github.com", 443));
        assert!(!p("api.github.com").matches("x.api.github.com", 443));

        assert!(p("*.github.com").matches("api.github.com", 443));
        assert!(p("*.github.com").matches("uploads.github.com", 80));
        assert!(!p("*.github.com").matches("github.com", 443));
        assert!(!p("*.github.com").matches("a.b.github.com", 443));
        assert!(!p("*.github.com").matches("evilgithub.com", 443));
        assert!(!p("*.github.com").matches("github.com.evil.net", 443));

        assert!(p("*.*.amazonaws.com").matches("s3.us-east-1.amazonaws.com", 443));
        assert!(!p("*.*.amazonaws.com").matches("sts.amazonaws.com", 443));
    }

    #[test]
    fn ports() {
        assert!(p("api.openai.com").matches("api.openai.com", 80));
        assert!(!p("api.openai.com").matches("api.openai.com", 8443));
        assert!(p("internal.corp:8443").matches("internal.corp", 8443));
        assert!(!p("internal.corp:8443").matches("internal.corp", 443));
    }

    #[test]
    fn case_and_trailing_dot() {
        assert!(p("API.GitHub.com").matches("api.github.COM.", 443));
        assert_eq!(p("API.GitHub.com.").to_string(), "api.github.com");
    }

    #[test]
    fn empty_labels_never_match() {
        assert!(!p("*.github.com").matches(".github.com", 443));
    }

    #[test]
    fn malformed_patterns() {
        for bad in [
            "",
            "*",
            "*.*",
            "api.*.com",
            "a*.github.com",
            "https://api.github.com",
            "api.github.com/path",
            "api..github.com",
            "api.github.com:0",
            "api.github.com:99999",
            "api.github.com:x",
            "-bad.example.com",
            "sp ace.com",
            "[::1]:443",
            ":443",
        ] {
            assert!(
                HostPattern::parse(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn strict_policy_decisions() {
        let policy = Policy {
            mode: PolicyMode::Strict,
            allow: vec![p("*.github.com"), p("db.internal:5432")],
            grant_hosts: vec![(p("api.anthropic.com"), "anthropic".into())],
            rules: vec![rules::HostRules {
                host: p("git.test"),
                rules: Vec::new(),
            }],
        };
        // A host with rules is reachable; its requests are judged later.
        assert_eq!(policy.decide("git.test", 443).rule, "rules:git.test");
        assert_eq!(
            policy.decide("api.github.com", 443).rule,
            "allow:*.github.com"
        );
        assert_eq!(
            policy.decide("api.anthropic.com", 443).rule,
            "grant:anthropic"
        );
        assert!(!policy.decide("api.anthropic.com", 8443).allowed);
        assert!(!policy.decide("evil.com", 443).allowed);
        assert!(!policy.decide("github.com", 443).allowed);
        // Raw tunnels need an explicit port.
        assert!(!policy.decide_tunnel("api.github.com", 443).allowed);
        assert!(policy.decide_tunnel("db.internal", 5432).allowed);
        let permissive = Policy::default();
        assert!(permissive.decide("anything.example", 8080).allowed);
    }

    #[test]
    fn blocked_message_is_the_seeds() {
        assert_eq!(
            blocked_message("blocked.example.com"),
            "Moat: request blocked by network policy.\nHost \"blocked.example.com\" is not in the allow list.\nAdd it to network.allow in agent.yaml or use policy: permissive.\n"
        );
    }

    #[test]
    fn policy_names() {
        assert_eq!("strict".parse::<PolicyMode>(), Ok(PolicyMode::Strict));
        assert!("Strict".parse::<PolicyMode>().is_err());
    }
}
