//! Request rules (`network.rules`): what a run may do on a host, by method
//! and path, and for git, by ref. Pure: no I/O, no panics on any input.
//!
//! An entry is a host (`"api.github.com"`: reachable, like `network.allow`)
//! or a host with rules (`{api.github.com: ["allow GET /repos/**", ...]}`).
//! A rule is `allow|deny METHOD PATH`, `allow|deny git-push REFGLOB` or
//! `allow|deny git-delete REFGLOB`. The first entry whose host matches
//! decides; in it, the first rule that matches. No match falls back to the
//! policy (strict denies, permissive allows). The full grammar and the path
//! normalisation are in docs/policy.md; [`normalize_path`] is the code.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::HostPattern;

/// The most segments a path or pattern may have.
const MAX_SEGMENTS: usize = 256;

/// A host entry of `network.rules`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRules {
    /// The host pattern.
    pub host: HostPattern,
    /// Its rules, in order; empty for a plain host entry.
    pub rules: Vec<Rule>,
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Allow or deny.
    pub allow: bool,
    /// What it matches.
    pub kind: RuleKind,
    /// The rule as written (normalised spacing), for messages and logs.
    pub text: String,
}

/// What a rule matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleKind {
    /// A method (`None`: any) and a path pattern.
    Http {
        /// Uppercased; `None` for `*`.
        method: Option<String>,
        /// The path pattern's segments (normalised like paths).
        path: Vec<String>,
    },
    /// Creating or updating refs matching the pattern (`git-push`).
    GitPush(Vec<String>),
    /// Deleting refs matching the pattern (`git-delete`).
    GitDelete(Vec<String>),
}

impl Rule {
    /// Parses `allow|deny METHOD PATH`, `allow|deny git-push REFGLOB` or
    /// `allow|deny git-delete REFGLOB`.
    pub fn parse(text: &str) -> Result<Rule, String> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let [verdict, what, pattern] = words[..] else {
            return Err(format!(
                "rule \"{text}\": expected three words, like \"allow GET /repos/**\", \"deny git-push refs/heads/main\""
            ));
        };
        let allow = match verdict {
            "allow" => true,
            "deny" => false,
            other => {
                return Err(format!(
                    "rule \"{text}\": \"{other}\" is neither allow nor deny"
                ))
            }
        };
        let kind = match what {
            "git-push" | "git-delete" => {
                let refs = ref_pattern(pattern).map_err(|e| format!("rule \"{text}\": {e}"))?;
                let refs = if allow { refs } else { fold(refs) };
                if what == "git-push" {
                    RuleKind::GitPush(refs)
                } else {
                    RuleKind::GitDelete(refs)
                }
            }
            method => {
                let method = if method == "*" {
                    None
                } else if method.bytes().all(|b| b.is_ascii_alphabetic()) && method.len() <= 20 {
                    Some(method.to_ascii_uppercase())
                } else {
                    return Err(format!(
                        "rule \"{text}\": \"{method}\" is not an HTTP method, *, git-push or git-delete"
                    ));
                };
                if !pattern.starts_with('/') {
                    return Err(format!(
                        "rule \"{text}\": the path must start with / (like /repos/**)"
                    ));
                }
                let path = normalize_path(pattern).map_err(|e| format!("rule \"{text}\": {e}"))?;
                let path = if allow { path } else { fold(path) };
                RuleKind::Http { method, path }
            }
        };
        let shown = match &kind {
            RuleKind::Http { method, .. } => method.clone().unwrap_or_else(|| "*".into()),
            _ => what.to_string(),
        };
        Ok(Rule {
            allow,
            kind,
            text: format!("{verdict} {shown} {pattern}"),
        })
    }

    fn matches_request(&self, method: &str, path: &[String]) -> bool {
        match &self.kind {
            RuleKind::Http { method: m, path: p } => {
                // A GET rule covers HEAD too: servers answer HEAD with their
                // GET handler, so `deny GET` must not be left by HEAD.
                m.as_deref().is_none_or(|m| {
                    m.eq_ignore_ascii_case(method)
                        || (m.eq_ignore_ascii_case("GET") && method.eq_ignore_ascii_case("HEAD"))
                }) && glob(p, path)
            }
            _ => false,
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A ref pattern's segments: `refs/heads/agent/**`.
/// Segments with ASCII letters lowercased: `deny` rules match without case
/// (a server may treat names without case, as GitHub's API does, so a deny
/// must catch every spelling); `allow` rules match the case as written (so
/// an allow lets through only the path it names).
fn fold(segments: Vec<String>) -> Vec<String> {
    segments
        .into_iter()
        .map(|s| s.to_ascii_lowercase())
        .collect()
}

fn ref_pattern(pattern: &str) -> Result<Vec<String>, String> {
    if pattern == "**" {
        return Ok(vec!["**".into()]);
    }
    let segments: Vec<String> = pattern.split('/').map(str::to_string).collect();
    if segments.iter().any(|s| s.is_empty()) || segments.len() > MAX_SEGMENTS {
        return Err(format!(
            "\"{pattern}\" is not a ref pattern (like refs/heads/agent/** or **)"
        ));
    }
    Ok(segments)
}

/// Why a path cannot be judged.
pub const AMBIGUOUS: &str =
    "the path holds an encoded / or \\, a backslash, a NUL, a bad %-escape or one encoded twice (%25XX), which servers read differently; it is refused on hosts with rules";

/// Why a path with dot segments cannot be judged.
pub const DOT_SEGMENTS: &str =
    "the path holds a . or .. segment (perhaps %-encoded or with ;parameters), which servers resolve differently or not at all; it is refused on hosts with rules";

/// Normalises a request path for matching: the query and fragment dropped;
/// refused when it holds `%2F`, `%5C`, `\`, `%00` or a bad `%` escape;
/// split on `/` with empty segments dropped (`//` and a trailing `/` do not
/// count); in each segment, `;parameters` dropped and `%XX` decoded, case
/// kept (rules decide how case counts: `fold`); a segment that still holds
/// a `%XX` escape once decoded (`%252e`: a server that decodes twice reads
/// `.`) refused; a `.` or `..` segment, however spelled, refused
/// ([`DOT_SEGMENTS`]).
pub fn normalize_path(raw: &str) -> Result<Vec<String>, &'static str> {
    let path = raw.split(['?', '#']).next().unwrap_or("");
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f")
        || lower.contains("%5c")
        || lower.contains("%00")
        || path.contains('\\')
    {
        return Err(AMBIGUOUS);
    }
    let mut out: Vec<String> = Vec::new();
    for segment in path.split('/') {
        let segment = segment.split(';').next().unwrap_or("");
        if segment.is_empty() {
            continue;
        }
        let decoded = percent_decode(segment).ok_or(AMBIGUOUS)?;
        // Encoded twice: the proxy judges `%2e`, a server that decodes
        // once more routes on `.` (or `admin` for `%2561dmin`).
        if holds_escape(&decoded) {
            return Err(AMBIGUOUS);
        }
        // Not resolved but refused: one server resolves `..` before merging
        // slashes and another after, Tomcat reads `..;` as `..`, a router
        // matching the raw path not at all; the proxy cannot know which
        // path the server ends up at.
        if matches!(decoded.split(';').next(), Some("." | "..")) {
            return Err(DOT_SEGMENTS);
        }
        out.push(decoded);
        if out.len() > MAX_SEGMENTS {
            return Err("the path has too many segments");
        }
    }
    Ok(out)
}

/// Does `s` hold a `%XX` escape (`%` and two hex digits)?
fn holds_escape(s: &str) -> bool {
    s.as_bytes()
        .windows(3)
        .any(|w| w[0] == b'%' && w[1].is_ascii_hexdigit() && w[2].is_ascii_hexdigit())
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Does `pattern` match `path` (both as segments)? `**` matches zero or
/// more segments; `*` inside a segment matches any characters of it (so
/// `*` alone, one whole segment).
fn glob(pattern: &[String], path: &[String]) -> bool {
    // The literal segments before the first wildcard must be the path's
    // own: most rules of a long list fail here, at no cost.
    for (p, s) in pattern.iter().zip(path) {
        if p.contains('*') {
            break;
        }
        if p != s {
            return false;
        }
    }
    if !pattern.iter().any(|p| p == "**") {
        // No `**`: one segment each.
        return pattern.len() == path.len()
            && pattern.iter().zip(path).all(|(p, s)| segment_matches(p, s));
    }
    // Every literal segment must be somewhere in the path.
    if !pattern
        .iter()
        .filter(|p| !p.contains('*'))
        .all(|p| path.contains(p))
    {
        return false;
    }
    // Dynamic programming over (pattern, path) positions: no backtracking
    // blow-up, whatever the pattern; on the stack (paths have at most
    // MAX_SEGMENTS segments).
    let m = path.len();
    if m > MAX_SEGMENTS {
        return false;
    }
    let mut a = [false; MAX_SEGMENTS + 1];
    let mut b = [false; MAX_SEGMENTS + 1];
    let (mut reach, mut next) = (&mut a[..=m], &mut b[..=m]);
    reach[0] = true;
    for p in pattern {
        if p == "**" {
            let mut any = false;
            for j in 0..=m {
                any |= reach[j];
                next[j] = any;
            }
        } else {
            next[0] = false;
            for j in 0..m {
                next[j + 1] = reach[j] && segment_matches(p, &path[j]);
            }
        }
        std::mem::swap(&mut reach, &mut next);
    }
    reach[m]
}

/// `*` in a segment pattern matches any run of characters.
fn segment_matches(pattern: &str, text: &str) -> bool {
    if !pattern.contains('*') {
        return pattern == text;
    }
    let parts: Vec<&str> = pattern.split('*').collect();
    let mut rest = text;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(part) else {
                return false;
            };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.len() >= part.len() && rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
    }
    rest.is_empty()
}

/// How a host's rules judged a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A rule allowed it.
    Allow(String),
    /// A rule denied it.
    Deny(String),
    /// No method/path rule matched: the policy decides.
    NoMatch,
    /// The path cannot be judged (refused).
    Ambiguous(&'static str),
}

/// One ref update of a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefUpdate {
    /// The old object id (all zeros: the ref is created).
    pub old: String,
    /// The new object id (all zeros: the ref is deleted).
    pub new: String,
    /// The ref (`refs/heads/main`).
    pub name: String,
}

impl RefUpdate {
    /// Is it a deletion?
    pub fn is_delete(&self) -> bool {
        !self.new.is_empty() && self.new.bytes().all(|b| b == b'0')
    }
}

impl HostRules {
    /// Judges a request by the method/path rules.
    pub fn judge(&self, method: &str, raw_path: &str) -> Verdict {
        if !self
            .rules
            .iter()
            .any(|r| matches!(r.kind, RuleKind::Http { .. }))
        {
            return Verdict::NoMatch;
        }
        let path = match normalize_path(raw_path) {
            Ok(p) => p,
            Err(why) => return Verdict::Ambiguous(why),
        };
        let folded = fold(path.clone());
        match self
            .rules
            .iter()
            .find(|r| r.matches_request(method, if r.allow { &path } else { &folded }))
        {
            Some(r) if r.allow => Verdict::Allow(r.text.clone()),
            Some(r) => Verdict::Deny(r.text.clone()),
            None => Verdict::NoMatch,
        }
    }

    /// Does this host have git rules?
    pub fn has_git_rules(&self) -> bool {
        self.rules
            .iter()
            .any(|r| matches!(r.kind, RuleKind::GitPush(_) | RuleKind::GitDelete(_)))
    }

    /// Judges one ref update: the first `git-delete` rule matching a
    /// deletion, the first `git-push` rule matching a creation or update;
    /// denied when none does. The rule that decided, if one did.
    pub fn judge_ref(&self, update: &RefUpdate) -> (bool, Option<String>) {
        let name: Vec<String> = update.name.split('/').map(str::to_string).collect();
        let folded = fold(name.clone());
        let delete = update.is_delete();
        let rule = self.rules.iter().find(|r| {
            let name = if r.allow { &name } else { &folded };
            match &r.kind {
                RuleKind::GitPush(p) => !delete && glob(p, name),
                RuleKind::GitDelete(p) => delete && glob(p, name),
                RuleKind::Http { .. } => false,
            }
        });
        match rule {
            Some(r) => (r.allow, Some(r.text.clone())),
            None => (false, None),
        }
    }
}

/// Parses entries given as `(host, rules)` (C, Python): an error names the
/// entry (`[i]: ...`).
pub fn parse_entries(entries: &[(String, Vec<String>)]) -> Result<Vec<HostRules>, String> {
    let mut out: Vec<HostRules> = Vec::new();
    for (i, (host, rules)) in entries.iter().enumerate() {
        let host = HostPattern::parse(host).map_err(|e| format!("[{i}]: {e}"))?;
        // Only the first entry of a host is read: a second would be rules
        // given and never applied.
        if let Some(first) = out.iter().position(|e| e.host == host) {
            return Err(format!(
                "[{i}]: {host} is listed twice (first as [{first}]); put all its rules in one entry"
            ));
        }
        let rules = rules
            .iter()
            .map(|r| Rule::parse(r))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("[{i}]: {e}"))?;
        out.push(HostRules { host, rules });
    }
    Ok(out)
}

/// The first entry whose host matches `host:port`.
pub fn entry_for<'a>(rules: &'a [HostRules], host: &str, port: u16) -> Option<&'a HostRules> {
    rules.iter().find(|e| e.host.matches(host, port))
}

/// The headers with which clients ask a server to take a request for
/// another method (Google's APIs, Rails, many frameworks' middlewares).
pub const METHOD_OVERRIDES: &[&str] = &[
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// The methods a server may take a request for besides its own, upper-cased:
/// every name in the method-override headers' `values` (a value is split at
/// commas and white space: Express's middleware takes the first of
/// `DELETE, GET`, another framework may take the last) and in a `_method`
/// query parameter of `path_and_query` (Express's and Laravel's override;
/// a form body's `_method` is not read).
pub fn overriding_methods<'a>(
    values: impl IntoIterator<Item = &'a [u8]>,
    path_and_query: &str,
) -> Vec<String> {
    let mut named: Vec<String> = Vec::new();
    let mut add = |text: &str| {
        for name in text.split(|c: char| c == ',' || c.is_whitespace()) {
            if !name.is_empty() {
                named.push(name.to_ascii_uppercase());
            }
        }
    };
    for value in values {
        add(&String::from_utf8_lossy(value));
    }
    let query = path_and_query
        .split_once('?')
        .map_or("", |(_, q)| q.split('#').next().unwrap_or(""));
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(&key.replace('+', " ")).unwrap_or_else(|| key.to_string());
        if key.trim().eq_ignore_ascii_case("_method") {
            // Undecodable: as written, so that it is judged rather than lost.
            let value = value.replace('+', " ");
            add(&percent_decode(&value).unwrap_or(value));
        }
    }
    named
}

/// The request is a git push (`POST .../git-receive-pack`), however the
/// path is spelled: its last segment as normalised (`git-receive-p%61ck`,
/// a trailing `/`, `;x`, any case); a path that cannot be normalised is one
/// when it names `git-receive-pack` anywhere, so that no spelling a server
/// might read as a push escapes the ref rules.
pub fn is_git_push(method: &str, raw_path: &str) -> bool {
    if !method.eq_ignore_ascii_case("POST") {
        return false;
    }
    match normalize_path(raw_path) {
        Ok(segments) => segments
            .last()
            .is_some_and(|s| s.eq_ignore_ascii_case("git-receive-pack")),
        Err(_) => {
            let lower = raw_path.to_ascii_lowercase();
            lower.contains("git-receive-pack")
                || percent_decode(&lower).is_some_and(|d| d.contains("git-receive-pack"))
        }
    }
}

/// A push's ref updates and the capabilities its client asked for.
pub type Push = (Vec<RefUpdate>, Vec<String>);

/// Reads the ref updates of a `git-receive-pack` request from the start of
/// its body: pkt-lines up to the first flush. `Ok(None)` when more bytes
/// are needed; an error when it is not a receive-pack request. The
/// capabilities the client asked for come with them.
pub fn parse_push(body: &[u8]) -> Result<Option<Push>, String> {
    PushReader::default().read(body)
}

/// [`parse_push`] as the body arrives: each call reads only the pkt-lines
/// completed since the last, so a push sent a byte at a time costs time in
/// proportion to its length.
#[derive(Debug, Default)]
pub struct PushReader {
    at: usize,
    updates: Vec<RefUpdate>,
    caps: Vec<String>,
}

impl PushReader {
    /// Reads on in `body` (everything received so far, of which the last
    /// call saw a prefix): the push once its flush is there.
    pub fn read(&mut self, body: &[u8]) -> Result<Option<Push>, String> {
        loop {
            let at = self.at;
            let Some(len) = body.get(at..at + 4) else {
                return Ok(None);
            };
            let len = std::str::from_utf8(len)
                .ok()
                .and_then(|l| usize::from_str_radix(l, 16).ok())
                .ok_or("not git's pkt-line format")?;
            if len == 0 {
                return Ok(Some((
                    std::mem::take(&mut self.updates),
                    std::mem::take(&mut self.caps),
                )));
            }
            if len < 4 {
                return Err("a pkt-line shorter than its header".into());
            }
            let Some(line) = body.get(at + 4..at + len) else {
                return Ok(None);
            };
            self.at = at + len;
            let line = std::str::from_utf8(line).map_err(|_| "a ref update that is not text")?;
            let line = line.trim_end_matches('\n');
            let (command, capabilities) = match line.split_once('\0') {
                Some((c, k)) => (c, Some(k)),
                None => (line, None),
            };
            if let Some(k) = capabilities {
                self.caps = k
                    .split(' ')
                    .filter(|c| !c.is_empty())
                    .map(str::to_string)
                    .collect();
            }
            if command.starts_with("shallow ") || command.starts_with("push-cert") {
                return Err("shallow pushes and signed pushes are not read by moat".into());
            }
            let mut words = command.split(' ');
            let (Some(old), Some(new), Some(name), None) =
                (words.next(), words.next(), words.next(), words.next())
            else {
                return Err(format!("\"{command}\" is not a ref update"));
            };
            let hex = |s: &str| {
                (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
            };
            if !hex(old) || !hex(new) || !name.starts_with("refs/") {
                return Err(format!("\"{command}\" is not a ref update"));
            }
            self.updates.push(RefUpdate {
                old: old.into(),
                new: new.into(),
                name: name.into(),
            });
            if self.updates.len() > 10_000 {
                return Err("more than 10000 ref updates".into());
            }
        }
    }
}

/// git's answer refusing a whole push: report-status with `ng` for every
/// ref and its reason (wrapped in side-band 1 when the client asked for
/// it), so `git push` prints `! [remote rejected] <ref> (<reason>)`.
pub fn push_refusal(updates: &[(RefUpdate, String)], caps: &[String]) -> Vec<u8> {
    let pkt = |s: &str| format!("{:04x}{s}", s.len() + 4).into_bytes();
    let mut report = pkt("unpack ok\n");
    for (u, why) in updates {
        let why: String = why.chars().filter(|c| *c != '\n').collect();
        report.extend(pkt(&format!("ng {} {why}\n", u.name)));
    }
    report.extend(b"0000");
    if !caps
        .iter()
        .any(|c| c == "side-band-64k" || c == "side-band")
    {
        return report;
    }
    let mut out = Vec::new();
    for chunk in report.chunks(65000) {
        out.extend(format!("{:04x}", chunk.len() + 5).into_bytes());
        out.push(1);
        out.extend(chunk);
    }
    out.extend(b"0000");
    out
}

impl Serialize for HostRules {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("HostRules", 2)?;
        st.serialize_field("host", &self.host.to_string())?;
        let rules: Vec<&str> = self.rules.iter().map(|r| r.text.as_str()).collect();
        st.serialize_field("rules", &rules)?;
        st.end()
    }
}

impl<'de> Deserialize<'de> for HostRules {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<HostRules, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            host: String,
            rules: Vec<String>,
        }
        let raw = Raw::deserialize(d)?;
        let host = HostPattern::parse(&raw.host).map_err(serde::de::Error::custom)?;
        let rules = raw
            .rules
            .iter()
            .map(|r| Rule::parse(r))
            .collect::<Result<Vec<_>, _>>()
            .map_err(serde::de::Error::custom)?;
        Ok(HostRules { host, rules })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(host: &str, rules: &[&str]) -> HostRules {
        HostRules {
            host: HostPattern::parse(host).unwrap_or_else(|e| panic!("{e}")),
            rules: rules
                .iter()
                .map(|r| Rule::parse(r).unwrap_or_else(|e| panic!("{e}")))
                .collect(),
        }
    }

    #[test]
    fn paths_are_normalised_one_way() {
        let n = |p: &str| normalize_path(p).map(|s| format!("/{}", s.join("/")));
        // Dot segments, however spelled, are refused, not resolved.
        for dots in [
            "/repos/../admin",
            "/repos/%2e%2e/admin",
            "/repos/%2E%2E/admin",
            "/repos/.%2E/admin",
            "/a/./b",
            "/../../a",
            "/a/admin/..;/info",
            "/a/admin//../info",
            "/a/.;x/b",
            "/a/..",
        ] {
            assert_eq!(n(dots), Err(DOT_SEGMENTS), "{dots}");
        }
        assert_eq!(n("//a///b/"), Ok("/a/b".into()));
        assert_eq!(n("/a/.../b/.x/x."), Ok("/a/.../b/.x/x.".into()));
        assert_eq!(n("/Admin;jsessionid=1/x;y"), Ok("/Admin/x".into()));
        assert_eq!(n("/a%41?x=/admin#f"), Ok("/aA".into()));
        // A `%` left by decoding is refused only where it starts an escape.
        assert_eq!(n("/off/100%25/x%25zz"), Ok("/off/100%/x%zz".into()));
        for bad in [
            "/a%2fb",
            "/a%2Fb",
            "/a%5cb",
            "/a\\b",
            "/a%00",
            "/a%zz",
            "/a%4",
            "/%ff%fe",
            "/x/%252e%252e/admin",
            "/%2561dmin",
            "/a%252fb",
            "/a%25%32%65",
        ] {
            assert_eq!(n(bad), Err(AMBIGUOUS), "{bad}");
        }
    }

    #[test]
    fn rules_match_first_and_fall_through() {
        let e = entry(
            "api.github.com",
            &[
                "deny * /repos/*/*/admin/**",
                "allow GET /repos/**",
                "allow post /repos/*/*/issues",
                "deny * /**",
            ],
        );
        assert_eq!(
            e.judge("GET", "/repos/o/r"),
            Verdict::Allow("allow GET /repos/**".into())
        );
        assert_eq!(
            e.judge("GET", "/repos/o/r/admin"),
            Verdict::Deny("deny * /repos/*/*/admin/**".into())
        );
        assert_eq!(
            e.judge("GET", "/repos/o/r/x/../admin/y"),
            Verdict::Ambiguous(DOT_SEGMENTS)
        );
        // Deny rules match without case; allow rules as written, so an
        // allow never lets through a spelling it does not name.
        assert_eq!(
            e.judge("GET", "/REPOS/o/r"),
            Verdict::Deny("deny * /**".into())
        );
        // HEAD is judged by the GET rules.
        assert_eq!(
            e.judge("HEAD", "/repos/o/r"),
            Verdict::Allow("allow GET /repos/**".into())
        );
        assert_eq!(
            e.judge("GET", "/REPOS/o/r/%61dmin"),
            Verdict::Deny("deny * /repos/*/*/admin/**".into())
        );
        assert_eq!(
            e.judge("POST", "/repos/o/r/issues/"),
            Verdict::Allow("allow POST /repos/*/*/issues".into())
        );
        assert_eq!(
            e.judge("DELETE", "/repos/o/r/issues"),
            Verdict::Deny("deny * /**".into())
        );
        assert_eq!(e.judge("GET", "/a%2fb"), Verdict::Ambiguous(AMBIGUOUS));
        let open = entry("x.test", &["allow GET /a/*.git/**"]);
        assert_eq!(
            open.judge("GET", "/a/r.git/info/refs"),
            Verdict::Allow("allow GET /a/*.git/**".into())
        );
        assert_eq!(open.judge("GET", "/a/r.gitx/info"), Verdict::NoMatch);
        assert_eq!(open.judge("PUT", "/a/r.git"), Verdict::NoMatch);
    }

    #[test]
    fn overriding_methods_are_every_name_a_server_may_take() {
        let v = |values: &[&str], path: &str| {
            overriding_methods(values.iter().map(|v| v.as_bytes()), path)
        };
        assert_eq!(v(&["DELETE, GET"], "/x"), ["DELETE", "GET"]);
        assert_eq!(
            v(&["delete,x", " put\tpatch "], "/x"),
            ["DELETE", "X", "PUT", "PATCH"]
        );
        assert_eq!(v(&[], "/x?a=1&_method=DELETE"), ["DELETE"]);
        assert_eq!(v(&[], "/x?%5Fmethod=de%4Cete#frag"), ["DELETE"]);
        assert_eq!(v(&[], "/x?_METHOD=put+patch"), ["PUT", "PATCH"]);
        assert_eq!(v(&[], "/x?_method=%zz"), ["%ZZ"]);
        assert!(v(&[""], "/x?method=DELETE&a").is_empty());
    }

    #[test]
    fn a_host_given_twice_is_refused_not_half_read() {
        let entries = [
            (
                "api.example.com".to_string(),
                vec!["allow GET /a".to_string()],
            ),
            ("other.test".to_string(), Vec::new()),
            (
                "API.example.com".to_string(),
                vec!["deny * /**".to_string()],
            ),
        ];
        let err = parse_entries(&entries).unwrap_err();
        assert!(
            err.contains("[2]: api.example.com is listed twice (first as [0])"),
            "{err}"
        );
    }

    #[test]
    fn bad_rules_are_named() {
        for (text, want) in [
            ("allow", "three words"),
            ("permit GET /", "neither allow nor deny"),
            ("allow GET repos", "must start with /"),
            ("allow G3T /", "not an HTTP method"),
            ("deny git-push refs//x", "not a ref pattern"),
            ("allow GET /a%2fb", "encoded"),
        ] {
            let err = Rule::parse(text).map(|_| ()).unwrap_err();
            assert!(err.contains(want) && err.contains(text), "{text}: {err}");
        }
    }

    #[test]
    fn ref_updates_are_judged_by_their_kind() {
        let e = entry(
            "git.test",
            &[
                "deny git-push refs/heads/main",
                "allow git-push refs/heads/agent/**",
                "allow git-delete refs/heads/agent/tmp/*",
            ],
        );
        let z = "0".repeat(40);
        let a = "a".repeat(40);
        let up = |old: &str, new: &str, name: &str| RefUpdate {
            old: old.into(),
            new: new.into(),
            name: name.into(),
        };
        assert!(e.judge_ref(&up(&a, &a, "refs/heads/agent/x")).0);
        assert!(e.judge_ref(&up(&z, &a, "refs/heads/agent/x/y")).0);
        assert_eq!(
            e.judge_ref(&up(&a, &a, "refs/heads/main")),
            (false, Some("deny git-push refs/heads/main".into()))
        );
        assert_eq!(e.judge_ref(&up(&a, &a, "refs/tags/v1")), (false, None));
        // Deleting is not pushing: only git-delete rules count.
        assert_eq!(
            e.judge_ref(&up(&a, &z, "refs/heads/agent/x")),
            (false, None)
        );
        assert!(e.judge_ref(&up(&a, &z, "refs/heads/agent/tmp/1")).0);
    }

    #[test]
    fn pushes_are_read_from_their_pkt_lines() {
        let z = "0".repeat(40);
        let a = "a".repeat(40);
        let pkt = |s: &str| format!("{:04x}{s}", s.len() + 4);
        let body = format!(
            "{}{}0000PACK...",
            pkt(&format!(
                "{a} {a} refs/heads/main\0report-status side-band-64k agent=git/2\n"
            )),
            pkt(&format!("{a} {z} refs/heads/old\n"))
        );
        let (updates, caps) = parse_push(body.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("complete"));
        assert_eq!(updates.len(), 2);
        assert!(updates[1].is_delete());
        assert!(caps.contains(&"side-band-64k".to_string()));
        assert_eq!(parse_push(&body.as_bytes()[..30]), Ok(None));
        assert!(parse_push(b"zzzz").is_err());
        assert!(parse_push(b"0008abcd").is_err());
        let refusal = push_refusal(&[(updates[0].clone(), "moat: no".into())], &caps);
        let text = String::from_utf8_lossy(&refusal);
        assert!(
            text.contains("unpack ok") && text.contains("ng refs/heads/main moat: no"),
            "{text}"
        );
        assert!(text.ends_with("0000"));

        // Read a byte at a time, the push is the same, and each call reads
        // on from where the last stopped.
        let mut reader = PushReader::default();
        let bytes = body.as_bytes();
        let mut got = None;
        for end in 1..=bytes.len() {
            if let Some(push) = reader.read(&bytes[..end]).unwrap_or_else(|e| panic!("{e}")) {
                got = Some((end, push));
                break;
            }
        }
        let (end, (again, caps_again)) = got.unwrap_or_else(|| panic!("never complete"));
        assert_eq!(&bytes[end - 4..end], b"0000", "complete at its flush");
        assert_eq!(again, updates);
        assert_eq!(caps_again, caps);
    }

    #[test]
    fn a_push_is_known_however_its_path_is_spelled() {
        for path in [
            "/o/r.git/git-receive-pack",
            "/o/r.git/git-receive-pack?x=1",
            "/o/r.git/git-receive-p%61ck",
            "/o/r.git/git-receive-pack/",
            "/o/r.git/GIT-RECEIVE-PACK",
            "/o/r.git/git-receive-pack;x",
            "//o/r.git//git-receive-pack",
            "/o/r.git/git-receive-pack/.",
            "/o/r.git/git-receive-pack/x/..",
            "/o/r.git/git-receive-pack%2f",
        ] {
            assert!(is_git_push("POST", path), "{path}");
            assert!(is_git_push("post", path), "{path}");
            assert!(!is_git_push("GET", path), "{path}");
        }
        for path in [
            "/o/r.git/info/refs",
            "/o/r.git/git-upload-pack",
            "/git-receive-pack-x",
        ] {
            assert!(!is_git_push("POST", path), "{path}");
        }
    }

    #[test]
    fn globs_cost_no_more_than_their_size() {
        let pattern: Vec<String> = (0..100)
            .map(|_| "**".to_string())
            .chain(["x".into()])
            .collect();
        let path: Vec<String> = (0..200).map(|i| i.to_string()).collect();
        assert!(!glob(&pattern, &path));
    }
}
