//! `moat policy check` and `moat policy suggest`: a run's network trace
//! against a policy. `check` replays each request against the workspace's
//! current policy and lists what would now be decided otherwise; `suggest`
//! proposes a strict policy (hosts, and method/path rules where the run's
//! requests were few) that would have allowed what the run did.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Serialize;

use crate::config::Network;
use crate::error::Result;
use crate::policy::rules::{self, Verdict};
use crate::policy::{HostPattern, Policy, PolicyMode};
use crate::run::{find, status::trace};

/// A request whose decision would change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// The method.
    pub method: String,
    /// The URL.
    pub url: String,
    /// `allowed` or `denied`, as the run's proxy decided.
    pub then: String,
    /// `allowed` or `denied`, as the current policy would.
    pub now: String,
    /// What would decide now (a rule, `strict`, `allow:<host>`, ...).
    pub rule: String,
}

/// What `check` found.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// The run.
    pub run: String,
    /// Requests replayed (CONNECTs and proxy-internal requests aside).
    pub requests: usize,
    /// Those whose decision would change, in the run's order.
    pub changes: Vec<Change>,
}

/// A trace record's parts that matter here.
struct Seen {
    method: String,
    url: String,
    host: String,
    port: u16,
    path: String,
    denied: bool,
}

fn requests(records: &[serde_json::Value]) -> Vec<Seen> {
    records
        .iter()
        .filter_map(|r| {
            let method = r.get("method")?.as_str()?.to_string();
            if method == "CONNECT" {
                return None;
            }
            let url = r.get("url")?.as_str()?.to_string();
            let host = r.get("host")?.as_str()?.to_string();
            if host == crate::proxy::phase::INTERNAL_HOST {
                return None;
            }
            let port = u16::try_from(r.get("port")?.as_u64()?).ok()?;
            let path = url
                .split_once("://")
                .map(|(_, rest)| rest)
                .and_then(|rest| rest.find('/').map(|i| rest[i..].to_string()))
                .unwrap_or_else(|| "/".into());
            let denied = r
                .get("denied")
                .and_then(|d| d.as_str())
                .is_some_and(|d| d == "network policy" || d.starts_with("rule:"));
            Some(Seen {
                method,
                url,
                host,
                port,
                path,
                denied,
            })
        })
        .collect()
}

/// Would `policy` allow this request, and by what? A push on a host with
/// git rules is judged by its refs, which the trace does not hold: it is
/// reported as the run decided.
fn judge(policy: &Policy, s: &Seen) -> (bool, String) {
    let host = policy.decide(&s.host, s.port);
    if !host.allowed {
        return (false, host.rule);
    }
    let Some(entry) = rules::entry_for(&policy.rules, &s.host, s.port) else {
        return (true, host.rule);
    };
    match entry.judge(&s.method, &s.path) {
        Verdict::Allow(r) => (true, r),
        Verdict::Deny(r) => (false, r),
        Verdict::Ambiguous(_) => (false, "ambiguous path".into()),
        Verdict::NoMatch if entry.has_git_rules() && rules::is_git_push(&s.method, &s.path) => {
            (!s.denied, "git refs (as judged during the run)".into())
        }
        Verdict::NoMatch if policy.mode == PolicyMode::Permissive => (true, "permissive".into()),
        Verdict::NoMatch => (false, "strict".into()),
    }
}

/// Replays the trace of `run` (id, prefix or name; `None`: the latest)
/// against its workspace's current policy (its `agent.yaml` now, and the
/// hosts of the run's grants).
pub fn check(home: &Path, run: Option<&str>) -> Result<CheckReport> {
    let meta = find(home, run)?;
    let config = crate::config::load(&meta.workspace)?;
    let policy = policy_of(home, &config.network, &meta.grants);
    let records = trace(home, &meta.id)?;
    let seen = requests(&records);
    let changes = seen
        .iter()
        .filter_map(|s| {
            let (allowed, rule) = judge(&policy, s);
            (allowed == s.denied).then(|| Change {
                method: s.method.clone(),
                url: s.url.clone(),
                then: verdict(!s.denied),
                now: verdict(allowed),
                rule,
            })
        })
        .collect();
    Ok(CheckReport {
        run: meta.id,
        requests: seen.len(),
        changes,
    })
}

fn verdict(allowed: bool) -> String {
    if allowed { "allowed" } else { "denied" }.to_string()
}

/// The policy a run of `network` with `grants` gets.
fn policy_of(home: &Path, network: &Network, grants: &[String]) -> Policy {
    let mut grant_hosts = Vec::new();
    for g in grants {
        let provider = g.split(':').next().unwrap_or(g);
        if let Ok(spec) = crate::credential::lookup(home, provider) {
            for h in spec.hosts() {
                if let Ok(p) = HostPattern::parse(&h) {
                    grant_hosts.push((p, g.clone()));
                }
            }
        }
    }
    Policy {
        mode: network.policy,
        allow: network.allow.clone(),
        grant_hosts,
        rules: network.rules.clone(),
    }
}

/// The most paths per host listed one by one in a suggestion; beyond it,
/// rules are widened to the first segment.
const NARROW: usize = 8;

/// Proposes a strict `network:` section, as YAML to paste into agent.yaml,
/// under which the requests of `run` would have been allowed: for each
/// host, its requests' method and path when they were few, else each
/// method under each first path segment. (A `*` in a path the run used
/// reads as a wildcard in the rule: rules have no escape.)
pub fn suggest(home: &Path, run: Option<&str>) -> Result<String> {
    let meta = find(home, run)?;
    let records = trace(home, &meta.id)?;
    Ok(suggest_from(&requests(&records), &meta.id))
}

fn suggest_from(seen: &[Seen], run: &str) -> String {
    let mut hosts: BTreeMap<String, BTreeSet<(String, String)>> = BTreeMap::new();
    for s in seen {
        let host = if s.port == 443 || (s.port == 80 && s.url.starts_with("http://")) {
            s.host.clone()
        } else {
            format!("{}:{}", s.host, s.port)
        };
        let path = match rules::normalize_path(&s.path) {
            Ok(p) => format!("/{}", p.join("/")),
            Err(_) => continue,
        };
        hosts
            .entry(host)
            .or_default()
            .insert((s.method.to_ascii_uppercase(), path));
    }
    let mut out = format!(
        "# moat policy suggest: a strict policy under which run {run} would have\n\
         # made all its {} requests. Review it: it allows what the agent did,\n\
         # not what it should do.\nnetwork:\n  policy: strict\n  rules:\n",
        seen.len()
    );
    if hosts.is_empty() {
        out.push_str("    []\n");
    }
    for (host, requests) in &hosts {
        out.push_str(&format!("    - {}:\n", yaml_str(host)));
        let lines: BTreeSet<String> = if requests.len() <= NARROW {
            requests
                .iter()
                .map(|(m, p)| format!("allow {m} {p}"))
                .collect()
        } else {
            requests
                .iter()
                .map(|(m, p)| {
                    let first = p.trim_start_matches('/').split('/').next().unwrap_or("");
                    if first.is_empty() {
                        format!("allow {m} /")
                    } else {
                        format!("allow {m} /{first}/**")
                    }
                })
                .collect()
        };
        for line in lines {
            out.push_str(&format!("        - {}\n", yaml_str(&line)));
        }
    }
    out
}

/// A YAML scalar: quoted when plain text would not read back as itself.
fn yaml_str(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, ' ' | '/' | '.' | '-' | '_' | '*' | ':')
        })
        && !s.starts_with(['*', '-', ' ', ':'])
        && !s.ends_with([' ', ':'])
        && !s.contains(": ");
    if plain {
        s.to_string()
    } else {
        serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(method: &str, url: &str, denied: bool) -> Seen {
        let (host, port, path) = {
            let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let (h, p) = authority
                .split_once(':')
                .map(|(h, p)| (h.to_string(), p.parse().unwrap_or(443)))
                .unwrap_or((
                    authority.to_string(),
                    if url.starts_with("http://") { 80 } else { 443 },
                ));
            (
                h,
                p,
                if path.is_empty() {
                    "/".to_string()
                } else {
                    path.to_string()
                },
            )
        };
        Seen {
            method: method.into(),
            url: url.into(),
            host,
            port,
            path,
            denied,
        }
    }

    #[test]
    fn a_suggestion_is_valid_config_that_allows_what_the_run_did() {
        let mut all = vec![
            seen("GET", "https://api.github.com/repos/o/r?x=1", false),
            seen("POST", "https://api.github.com/repos/o/r/issues", false),
            seen("GET", "https://pypi.org/simple/requests/", true),
        ];
        for i in 0..20 {
            all.push(seen(
                "GET",
                &format!("https://files.test:8443/pkg/{i}"),
                false,
            ));
        }
        let yaml = suggest_from(&all, "run_x");
        let config = crate::config::parse_str(&yaml, Path::new("agent.yaml"), Path::new("/ws"))
            .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        assert_eq!(config.network.policy, PolicyMode::Strict);
        let policy = Policy {
            mode: PolicyMode::Strict,
            rules: config.network.rules.clone(),
            ..Policy::default()
        };
        for s in &all {
            assert!(
                judge(&policy, s).0,
                "{} {} not allowed by\n{yaml}",
                s.method,
                s.url
            );
        }
        assert!(yaml.contains("allow GET /repos/o/r\n"), "{yaml}");
        assert!(yaml.contains("allow GET /pkg/**"), "{yaml}");
        assert!(yaml.contains("files.test:8443"), "{yaml}");
        // Narrow: another path on api.github.com is not allowed.
        assert!(
            !judge(
                &policy,
                &seen("DELETE", "https://api.github.com/repos/o/r", false)
            )
            .0
        );
    }

    #[test]
    fn a_replay_reports_what_would_change() {
        let records: Vec<serde_json::Value> = vec![
            serde_json::json!({"method": "CONNECT", "url": "api.github.com:443", "host": "api.github.com", "port": 443}),
            serde_json::json!({"method": "GET", "url": "https://api.github.com/repos/o/r/admin", "host": "api.github.com", "port": 443}),
            serde_json::json!({"method": "GET", "url": "https://pypi.org/x", "host": "pypi.org", "port": 443, "denied": "network policy"}),
        ];
        let seen = requests(&records);
        assert_eq!(seen.len(), 2);
        let policy = Policy {
            mode: PolicyMode::Strict,
            allow: vec![HostPattern::parse("pypi.org").unwrap_or_else(|e| panic!("{e}"))],
            rules: rules::parse_entries(&[(
                "api.github.com".into(),
                vec!["deny * /repos/*/*/admin".into(), "allow GET /**".into()],
            )])
            .unwrap_or_else(|e| panic!("{e}")),
            ..Policy::default()
        };
        let verdicts: Vec<(bool, String)> = seen.iter().map(|s| judge(&policy, s)).collect();
        assert_eq!(verdicts[0], (false, "deny * /repos/*/*/admin".into()));
        assert_eq!(verdicts[1], (true, "allow:pypi.org".into()));
    }
}
