//! A run's network trace for people and for tools: the seeds' line per
//! request (`[10:23:44.512] GET https://api.github.com/user 200 (89ms)`, in
//! local time), the details `moat trace -v` adds, and HAR 1.2
//! (<http://www.softwareishard.com/blog/har-12-spec/>), which browsers'
//! devtools and mitmproxy open.
//!
//! Everything here is read from `network.jsonl`, whose header values that
//! carry credentials are already `[redacted]` by the proxy. The headers that
//! always carry them are redacted here once more, so that no view of a trace
//! (an older file, one edited by hand) can show one.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{json, Map, Value};
use time::{OffsetDateTime, UtcOffset};

use crate::error::Result;
use crate::run::{find, status::trace, RunMeta};
use crate::trace::{TraceRecord, REDACTED, SECRET_HEADERS};

/// The time zone times are shown in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zone {
    /// The host's local time zone (`TZ`, else the system's), at each
    /// instant (daylight saving time included).
    Local,
    /// A fixed offset from UTC, in seconds east.
    Offset(i32),
}

/// A header's value as it may be shown.
fn shown<'a>(name: &str, value: &'a str) -> &'a str {
    if SECRET_HEADERS.iter().any(|h| h.eq_ignore_ascii_case(name)) {
        REDACTED
    } else {
        value
    }
}

/// A run's trace records, in the order the requests started. Lines that are
/// not trace records are skipped.
pub fn load(home: &Path, id: &str) -> Result<Vec<TraceRecord>> {
    let mut records: Vec<TraceRecord> = trace(home, id)?
        .into_iter()
        .filter_map(|mut v| {
            // A null (a duration that was not a number) is a field left out.
            if let Value::Object(fields) = &mut v {
                fields.retain(|_, x| !x.is_null());
            }
            serde_json::from_value(v)
                .map_err(|e| {
                    tracing::warn!(
                        run = id,
                        "network.jsonl: skipped a line that is not a trace record: {e}"
                    );
                })
                .ok()
        })
        .collect();
    // Records are written as requests end; a stable sort keeps that order
    // for those that started at the same instant (or whose time is unknown).
    records.sort_by_key(started);
    Ok(records)
}

fn started(record: &TraceRecord) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(&record.time, &time::format_description::well_known::Rfc3339).ok()
}

/// The offset of the host's local time zone from UTC at `unix` seconds.
fn local_offset(unix: i64) -> Option<UtcOffset> {
    // `time_t` has 32 bits on some targets.
    #[allow(clippy::useless_conversion)]
    let t = libc::time_t::try_from(unix).ok()?;
    // SAFETY: `tm` is plain data, valid when zeroed; `localtime_r` writes
    // only to it and returns NULL on failure. It reads TZ (and the zone
    // files) under libc's own lock; moat never changes TZ while it runs.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::localtime_r(&t, &mut tm) };
    if r.is_null() {
        return None;
    }
    UtcOffset::from_whole_seconds(i32::try_from(tm.tm_gmtoff).ok()?).ok()
}

/// `time` (RFC 3339) as `HH:MM:SS.mmm` in `zone`; the text as it is when
/// it is not RFC 3339.
pub fn clock(time: &str, zone: Zone) -> String {
    let Ok(at) = OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339) else {
        return if time.is_empty() {
            "-".into()
        } else {
            time.into()
        };
    };
    let offset = match zone {
        Zone::Local => local_offset(at.unix_timestamp()),
        Zone::Offset(s) => UtcOffset::from_whole_seconds(s).ok(),
    }
    .unwrap_or(UtcOffset::UTC);
    let at = at.checked_to_offset(offset).unwrap_or(at);
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        at.hour(),
        at.minute(),
        at.second(),
        at.millisecond()
    )
}

/// Milliseconds that can be shown and put in JSON (never negative, NaN or
/// infinite).
fn millis(ms: f64) -> f64 {
    if ms.is_finite() && ms > 0.0 {
        ms
    } else {
        0.0
    }
}

/// One request as the seeds show it:
/// `[10:23:44.512] GET https://api.github.com/user 200 (89ms)`; `-` when no
/// status was sent; then `DENIED (why)`, `FAILED (whose fault: what)`,
/// `[rule: ...]` (unless the refusal names it) and `[grant: ...]` when the
/// record has them.
pub fn line(record: &TraceRecord, zone: Zone) -> String {
    printable(&line_raw(record, zone))
}

/// Text the agent chose (paths, header values, bodies), made safe for a
/// terminal: control characters (C0, DEL, C1 such as CSI) and bidirectional
/// overrides are shown escaped (`\u{1b}`), so a request cannot forge or hide
/// lines, nor send escape sequences to the user's terminal.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let bidi = matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}');
        if (c.is_control() && c != '\t') || bidi {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

fn line_raw(record: &TraceRecord, zone: Zone) -> String {
    let status = record
        .status
        .map_or_else(|| "-".to_string(), |s| s.to_string());
    let mut out = format!(
        "[{}] {} {} {} ({:.0}ms)",
        clock(&record.time, zone),
        record.method,
        record.url,
        status,
        millis(record.duration_ms)
    );
    if let Some(why) = &record.denied {
        let _ = write!(out, " DENIED ({why})");
    }
    if let Some(what) = &record.error {
        match record.fault {
            Some(fault) => {
                let _ = write!(out, " FAILED ({fault}: {what})");
            }
            None => {
                let _ = write!(out, " FAILED ({what})");
            }
        }
    }
    // A refusal by a rule names it already.
    let named = |rule: &str| record.denied.as_ref().is_some_and(|d| d.contains(rule));
    if let Some(rule) = record.rule.as_ref().filter(|r| !named(r)) {
        let _ = write!(out, " [rule: {rule}]");
    }
    if let Some(grant) = &record.grant {
        let _ = write!(out, " [grant: {grant}]");
    }
    out
}

/// What `moat trace -v` adds under a request's line: the request headers
/// (`> name: value`), the bytes sent, a captured request body (`> | ...`),
/// then the same for the response (`<`). Each line is indented and ends
/// with a newline.
pub fn details(record: &TraceRecord) -> String {
    let mut out = String::new();
    let sides = [
        (
            '>',
            "sent",
            &record.request_headers,
            record.request_bytes,
            &record.request_body,
        ),
        (
            '<',
            "received",
            &record.response_headers,
            record.response_bytes,
            &record.response_body,
        ),
    ];
    for (mark, verb, headers, bytes, body) in sides {
        for (name, value) in headers {
            let _ = writeln!(
                out,
                "    {mark} {}: {}",
                printable(name),
                printable(shown(name, value))
            );
        }
        let _ = writeln!(out, "    {mark} {verb} {bytes} bytes");
        if let Some(body) = body {
            for l in body.lines() {
                let _ = writeln!(out, "    {mark} | {}", printable(l));
            }
        }
    }
    out
}

// ------------------------------------------------------------------- HAR

/// `startedDateTime`: ISO 8601 in UTC with milliseconds.
fn iso_ms(time: &str) -> String {
    match OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339) {
        Ok(at) => {
            let at = at.to_offset(UtcOffset::UTC);
            format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
                at.year(),
                u8::from(at.month()),
                at.day(),
                at.hour(),
                at.minute(),
                at.second(),
                at.millisecond()
            )
        }
        // Not one of the proxy's records: the Unix epoch, so that the entry
        // still parses.
        Err(_) => "1970-01-01T00:00:00.000Z".into(),
    }
}

/// The request's URL, absolute: the proxy records a CONNECT's target as
/// `host:port` (the request's own form), which HAR readers cannot parse.
fn absolute_url(record: &TraceRecord) -> String {
    let url = &record.url;
    if url.contains("://") {
        return url.clone();
    }
    let scheme = match record.port {
        443 => "https",
        80 => "http",
        _ => "tcp",
    };
    if url.starts_with('/') {
        let host = if record.host.contains(':') {
            format!("[{}]", record.host)
        } else {
            record.host.clone()
        };
        return format!("{scheme}://{host}:{}{url}", record.port);
    }
    format!("{scheme}://{url}")
}

/// `%XX` and `+` decoded (a query string's form encoding); invalid escapes
/// are kept as they are.
fn form_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                if let Some(b) = hex {
                    out.push(b);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The URL's query as HAR's `queryString`.
fn query_string(url: &str) -> Vec<Value> {
    let Some((_, rest)) = url.split_once('?') else {
        return Vec::new();
    };
    let query = rest.split('#').next().unwrap_or("");
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (name, value) = p.split_once('=').unwrap_or((p, ""));
            json!({"name": form_decode(name), "value": form_decode(value)})
        })
        .collect()
}

fn headers(list: &[(String, String)]) -> Vec<Value> {
    list.iter()
        .map(|(name, value)| json!({"name": name, "value": shown(name, value)}))
        .collect()
}

fn header<'a>(list: &'a [(String, String)], name: &str) -> Option<&'a str> {
    list.iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// One HAR entry for a record.
pub fn har_entry(record: &TraceRecord) -> Value {
    let ms = millis(record.duration_ms);
    let url = absolute_url(record);
    let mut request = json!({
        "method": record.method,
        "url": url,
        // The trace does not record the HTTP version.
        "httpVersion": "",
        "cookies": [],
        "headers": headers(&record.request_headers),
        "queryString": query_string(&url),
        "headersSize": -1,
        "bodySize": record.request_bytes,
    });
    if let (Some(text), Some(map)) = (&record.request_body, request.as_object_mut()) {
        let mime = header(&record.request_headers, "content-type").unwrap_or("");
        map.insert("postData".into(), json!({"mimeType": mime, "text": text}));
    }
    // No status: nothing was answered (a refusal before any response, a
    // failure, a raw tunnel). Browsers write status 0 for such requests.
    let refusal = record.denied.as_ref().or(record.error.as_ref());
    let status_text = match record.status {
        Some(s) => http::StatusCode::from_u16(s)
            .ok()
            .and_then(|c| c.canonical_reason())
            .unwrap_or("")
            .to_string(),
        None => refusal.cloned().unwrap_or_default(),
    };
    let mut content = json!({
        "size": record.response_bytes,
        "mimeType": header(&record.response_headers, "content-type").unwrap_or(""),
    });
    if let (Some(text), Some(map)) = (&record.response_body, content.as_object_mut()) {
        map.insert("text".into(), json!(text));
    }
    let mut response = json!({
        "status": record.status.unwrap_or(0),
        "statusText": status_text,
        "httpVersion": "",
        "cookies": [],
        "headers": headers(&record.response_headers),
        "content": content,
        "redirectURL": header(&record.response_headers, "location").unwrap_or(""),
        "headersSize": -1,
        "bodySize": record.response_bytes,
    });
    if let (None, Some(why), Some(map)) = (record.status, refusal, response.as_object_mut()) {
        // Chromium's own field for a request that got no response.
        map.insert("_error".into(), json!(why));
    }
    let mut entry = Map::new();
    entry.insert("startedDateTime".into(), json!(iso_ms(&record.time)));
    entry.insert("time".into(), json!(ms));
    entry.insert("request".into(), request);
    entry.insert("response".into(), response);
    entry.insert("cache".into(), json!({}));
    entry.insert(
        "timings".into(),
        json!({"blocked": -1, "dns": -1, "connect": -1, "ssl": -1,
               "send": 0, "wait": ms, "receive": 0}),
    );
    let extras = [
        (
            "_client",
            Some(record.client.clone()).filter(|c| !c.is_empty()),
        ),
        ("_grant", record.grant.clone()),
        ("_denied", record.denied.clone()),
        ("_error", record.error.clone()),
        ("_fault", record.fault.map(|f| f.to_string())),
        ("_rule", record.rule.clone()),
    ];
    for (key, value) in extras {
        if let Some(v) = value {
            entry.insert(key.into(), json!(v));
        }
    }
    Value::Object(entry)
}

/// A HAR 1.2 log of `records` (in their order), with `comment` (what they
/// are) when given.
pub fn har(records: &[TraceRecord], comment: Option<&str>) -> Value {
    let mut log = json!({
        "version": "1.2",
        "creator": {"name": "moat", "version": crate::VERSION},
        "pages": [],
        "entries": records.iter().map(har_entry).collect::<Vec<_>>(),
    });
    if let (Some(c), Some(map)) = (comment, log.as_object_mut()) {
        map.insert("comment".into(), json!(c));
    }
    json!({ "log": log })
}

/// A run's trace as a HAR 1.2 document.
pub fn run_har(home: &Path, meta: &RunMeta) -> Result<Value> {
    let records = load(home, &meta.id)?;
    let comment = format!("moat run {} ({})", meta.name, meta.id);
    Ok(har(&records, Some(&comment)))
}

/// Writes the trace of `run` (id, id prefix or name; `None`: the most
/// recent run) to `out` as HAR 1.2, atomically and readable by its owner
/// only; the number of entries written.
pub fn write_har(home: &Path, run: Option<&str>, out: &Path) -> Result<usize> {
    let meta = find(home, run)?;
    let doc = run_har(home, &meta)?;
    let entries = doc["log"]["entries"].as_array().map_or(0, Vec::len);
    let mut text = serde_json::to_string_pretty(&doc).map_err(|e| {
        crate::Error::new(
            crate::ErrorKind::Internal,
            format!("cannot write the HAR of {}: {e}", meta.id),
        )
    })?;
    text.push('\n');
    crate::paths::write_private(out, text.as_bytes(), 0o600)?;
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::Fault;

    fn allowed() -> TraceRecord {
        TraceRecord {
            time: "2024-01-15T10:23:44.512345678Z".into(),
            client: "run_0123456789ab".into(),
            method: "GET".into(),
            url: "https://api.github.com/user?q=a+b%20c&flag&x=%zz".into(),
            host: "api.github.com".into(),
            port: 443,
            status: Some(200),
            duration_ms: 89.4,
            request_bytes: 0,
            response_bytes: 21,
            grant: Some("github".into()),
            request_headers: vec![
                ("user-agent".into(), "curl/8.0".into()),
                ("authorization".into(), "[redacted]".into()),
            ],
            response_headers: vec![(
                "content-type".into(),
                "application/json; charset=utf-8".into(),
            )],
            ..TraceRecord::default()
        }
    }

    fn denied() -> TraceRecord {
        TraceRecord {
            time: "2024-01-15T10:23:45Z".into(),
            method: "CONNECT".into(),
            url: "evil.test:443".into(),
            host: "evil.test".into(),
            port: 443,
            status: None,
            duration_ms: 0.2,
            denied: Some("network policy".into()),
            fault: Some(Fault::Policy),
            rule: Some("deny * /**".into()),
            ..TraceRecord::default()
        }
    }

    fn failed() -> TraceRecord {
        TraceRecord {
            time: "2024-07-01T23:59:59.999+00:00".into(),
            method: "POST".into(),
            url: "https://down.test/api".into(),
            host: "down.test".into(),
            port: 443,
            status: Some(502),
            duration_ms: f64::NAN,
            request_bytes: 5,
            error: Some("upstream unreachable: connection refused".into()),
            fault: Some(Fault::Upstream),
            request_headers: vec![
                ("content-type".into(), "text/plain".into()),
                // A record from elsewhere that kept a credential.
                ("x-api-key".into(), "sk-live-SECRET".into()),
            ],
            request_body: Some("hello\nworld".into()),
            response_body: Some("Moat: upstream unreachable".into()),
            ..TraceRecord::default()
        }
    }

    const IST: i32 = 5 * 3600 + 1800;

    #[test]
    fn lines_are_the_seeds_in_the_given_zone() {
        assert_eq!(
            line(&allowed(), Zone::Offset(0)),
            "[10:23:44.512] GET https://api.github.com/user?q=a+b%20c&flag&x=%zz 200 (89ms) [grant: github]"
        );
        assert_eq!(
            line(&allowed(), Zone::Offset(IST)),
            "[15:53:44.512] GET https://api.github.com/user?q=a+b%20c&flag&x=%zz 200 (89ms) [grant: github]"
        );
        assert_eq!(
            line(&denied(), Zone::Offset(-5 * 3600)),
            "[05:23:45.000] CONNECT evil.test:443 - (0ms) DENIED (network policy) [rule: deny * /**]"
        );
        let mut by_rule = allowed();
        by_rule.status = Some(403);
        by_rule.grant = None;
        by_rule.url = "https://api.github.com/admin".into();
        by_rule.denied = Some("rule: deny * /admin/**".into());
        by_rule.rule = Some("deny * /admin/**".into());
        assert_eq!(
            line(&by_rule, Zone::Offset(0)),
            "[10:23:44.512] GET https://api.github.com/admin 403 (89ms) DENIED (rule: deny * /admin/**)"
        );
        // Across midnight, with a duration that is not a number.
        assert_eq!(
            line(&failed(), Zone::Offset(3600)),
            "[00:59:59.999] POST https://down.test/api 502 (0ms) FAILED (upstream: upstream unreachable: connection refused)"
        );
        let mut unknown = failed();
        unknown.time = "yesterday".into();
        unknown.fault = None;
        assert!(line(&unknown, Zone::Local).starts_with("[yesterday] POST"));
        assert!(line(&unknown, Zone::Local)
            .ends_with(" FAILED (upstream unreachable: connection refused)"));
    }

    /// `Zone::Local` follows TZ at each instant (daylight saving included):
    /// checked in a child process of this test binary with TZ set, as TZ
    /// cannot be changed safely in a process whose threads read it.
    #[test]
    fn local_time_follows_tz() {
        if std::env::var_os("MOAT_TEST_TZ_CHILD").is_some() {
            // POSIX TZ strings need no zone files: UTC-5 in winter, UTC-4
            // from the second Sunday of March to the first of November.
            assert_eq!(
                clock("2024-01-15T10:23:44.512Z", Zone::Local),
                "05:23:44.512"
            );
            assert_eq!(
                clock("2024-07-15T10:23:44.512Z", Zone::Local),
                "06:23:44.512"
            );
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "run::trace_view::tests::local_time_follows_tz",
                "--test-threads=1",
            ])
            .env("MOAT_TEST_TZ_CHILD", "1")
            .env("TZ", "EST5EDT,M3.2.0,M11.1.0")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "the child test failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn details_show_headers_sizes_and_bodies_never_credentials() {
        assert_eq!(
            details(&allowed()),
            "    > user-agent: curl/8.0\n    > authorization: [redacted]\n    > sent 0 bytes\n    \
             < content-type: application/json; charset=utf-8\n    < received 21 bytes\n"
        );
        let d = details(&failed());
        assert!(!d.contains("sk-live-SECRET"), "{d}");
        assert!(d.contains("    > x-api-key: [redacted]\n"), "{d}");
        assert!(
            d.contains("    > sent 5 bytes\n    > | hello\n    > | world\n"),
            "{d}"
        );
        assert!(
            d.contains("    < received 0 bytes\n    < | Moat: upstream unreachable\n"),
            "{d}"
        );
    }

    /// Every field HAR 1.2 requires, with its type.
    fn assert_har_entry(e: &Value) {
        let num = |v: &Value| v.is_number();
        let nonneg = |v: &Value| v.as_f64().is_some_and(|n| n >= 0.0);
        assert!(e["startedDateTime"].is_string());
        assert!(nonneg(&e["time"]));
        for part in ["request", "response"] {
            let p = &e[part];
            assert!(p["httpVersion"].is_string() && p["cookies"].is_array());
            assert!(num(&p["headersSize"]) && num(&p["bodySize"]));
            for h in p["headers"].as_array().unwrap() {
                assert!(h["name"].is_string() && h["value"].is_string(), "{h}");
            }
        }
        let req = &e["request"];
        assert!(req["method"].is_string() && req["url"].is_string());
        assert!(req["queryString"].is_array());
        let resp = &e["response"];
        assert!(resp["status"].is_u64() && resp["statusText"].is_string());
        assert!(resp["redirectURL"].is_string());
        assert!(num(&resp["content"]["size"]) && resp["content"]["mimeType"].is_string());
        assert!(e["cache"].is_object());
        let t = &e["timings"];
        for k in ["send", "wait", "receive"] {
            assert!(nonneg(&t[k]), "timings.{k}: {t}");
        }
        let sum: f64 = ["send", "wait", "receive"]
            .iter()
            .map(|k| t[*k].as_f64().unwrap())
            .sum();
        assert_eq!(sum, e["time"].as_f64().unwrap());
    }

    #[test]
    fn har_of_an_allowed_request() {
        let doc = har(&[allowed()], Some("moat run demo (run_0123456789ab)"));
        let log = &doc["log"];
        assert_eq!(log["version"], "1.2");
        assert_eq!(
            log["creator"],
            json!({"name": "moat", "version": crate::VERSION})
        );
        assert_eq!(log["comment"], "moat run demo (run_0123456789ab)");
        let e = &log["entries"][0];
        assert_har_entry(e);
        assert_eq!(e["startedDateTime"], "2024-01-15T10:23:44.512Z");
        assert_eq!(e["time"], 89.4);
        assert_eq!(e["request"]["method"], "GET");
        assert_eq!(
            e["request"]["queryString"],
            json!([{"name": "q", "value": "a b c"}, {"name": "flag", "value": ""},
                   {"name": "x", "value": "%zz"}])
        );
        assert_eq!(
            e["request"]["headers"][1],
            json!({"name": "authorization", "value": "[redacted]"})
        );
        assert_eq!(e["request"]["bodySize"], 0);
        assert!(e["request"].get("postData").is_none());
        assert_eq!(e["response"]["status"], 200);
        assert_eq!(e["response"]["statusText"], "OK");
        assert_eq!(
            e["response"]["content"],
            json!({"size": 21, "mimeType": "application/json; charset=utf-8"})
        );
        assert_eq!(e["response"]["bodySize"], 21);
        assert!(e["response"].get("_error").is_none());
        assert_eq!(e["_grant"], "github");
        assert_eq!(e["_client"], "run_0123456789ab");
        for k in ["_denied", "_error", "_fault", "_rule"] {
            assert!(e.get(k).is_none(), "{k}");
        }
    }

    #[test]
    fn har_of_a_refused_request_is_a_valid_entry_with_status_0() {
        let e = har_entry(&denied());
        assert_har_entry(&e);
        assert_eq!(e["request"]["url"], "https://evil.test:443");
        assert_eq!(e["response"]["status"], 0);
        assert_eq!(e["response"]["statusText"], "network policy");
        assert_eq!(e["response"]["_error"], "network policy");
        assert_eq!(e["_denied"], "network policy");
        assert_eq!(e["_fault"], "policy");
        assert_eq!(e["_rule"], "deny * /**");
        assert!(e.get("_client").is_none() && e.get("_grant").is_none());
        let mut raw = denied();
        raw.url = "db.test:5432".into();
        raw.port = 5432;
        assert_eq!(har_entry(&raw)["request"]["url"], "tcp://db.test:5432");
    }

    #[test]
    fn har_of_a_failed_request() {
        let e = har_entry(&failed());
        assert_har_entry(&e);
        assert_eq!(e["startedDateTime"], "2024-07-01T23:59:59.999Z");
        assert_eq!(e["time"], 0.0);
        assert_eq!(e["response"]["status"], 502);
        assert_eq!(e["response"]["statusText"], "Bad Gateway");
        assert!(e["response"].get("_error").is_none());
        assert_eq!(e["_error"], "upstream unreachable: connection refused");
        assert_eq!(e["_fault"], "upstream");
        assert_eq!(
            e["request"]["postData"],
            json!({"mimeType": "text/plain", "text": "hello\nworld"})
        );
        assert_eq!(e["request"]["bodySize"], 5);
        assert_eq!(
            e["response"]["content"]["text"],
            "Moat: upstream unreachable"
        );
        assert_eq!(e["response"]["content"]["mimeType"], "");
        let text = e.to_string();
        assert!(!text.contains("sk-live-SECRET"), "{text}");
        // An answer with no status and an error: the error is its text.
        let mut cut = failed();
        cut.status = None;
        let e = har_entry(&cut);
        assert_eq!(e["response"]["status"], 0);
        assert_eq!(
            e["response"]["statusText"],
            "upstream unreachable: connection refused"
        );
    }

    #[test]
    fn loading_sorts_by_start_and_writing_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path();
        let id = "run_0123456789ab";
        let run = crate::run::run_dir(home, id);
        std::fs::create_dir_all(&run).unwrap();
        let mut lines = String::new();
        for r in [failed(), allowed(), denied()] {
            lines.push_str(&serde_json::to_string(&r).unwrap());
            lines.push('\n');
        }
        lines.push_str("[1, 2]\n");
        std::fs::write(run.join("network.jsonl"), lines).unwrap();
        let records = load(home, id).unwrap();
        let methods: Vec<_> = records.iter().map(|r| r.method.as_str()).collect();
        assert_eq!(methods, ["GET", "CONNECT", "POST"]);

        let meta: RunMeta = serde_json::from_value(json!({
            "id": id, "name": "demo", "state": "stopped", "workspace": "/w", "image": "i",
            "grants": [], "env": [], "secrets": [], "policy": "permissive", "ports": {},
            "interactive": false, "created_at": "2024-01-15T10:00:00Z", "cleaned": true
        }))
        .unwrap();
        crate::run::save_meta(&run, &meta).unwrap();
        let out = home.join("trace.har");
        assert_eq!(write_har(home, Some("demo"), &out).unwrap(), 3);
        let doc: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(doc["log"]["comment"], "moat run demo (run_0123456789ab)");
        let urls: Vec<_> = doc["log"]["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["request"]["url"].as_str().unwrap())
            .collect();
        assert_eq!(urls[1], "https://evil.test:443");
        let mode = std::fs::metadata(&out).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn what_the_agent_chose_cannot_drive_the_terminal() {
        let record = TraceRecord {
            time: "2026-01-01T00:00:00Z".into(),
            method: "GET".into(),
            url: "https://a.test/x\u{1b}[2K\r[10:00:00.000] GET https://ok 200 (1ms)\u{9b}31m\u{202e}".into(),
            status: Some(200),
            request_headers: vec![("x-evil".into(), "a\u{1b}]0;title\u{7}b".into())],
            request_body: Some("line\u{1b}[1A".into()),
            ..TraceRecord::default()
        };
        let shown = format!("{}\n{}", line(&record, Zone::Offset(0)), details(&record));
        assert!(
            !shown
                .chars()
                .any(|c| (c.is_control() && c != '\n') || c == '\u{202e}'),
            "{shown:?}"
        );
        assert!(
            shown.contains("\\u{1b}[2K\\u{d}") && shown.contains("\\u{9b}31m\\u{202e}"),
            "{shown}"
        );
        assert_eq!(shown.lines().count(), 1 + 4, "{shown}");
    }
}
