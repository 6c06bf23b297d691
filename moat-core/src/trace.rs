//! What the proxy records: a trace record per request (for `network.jsonl`)
//! and audit events (for the audit log). Both go to per-client sinks.
//!
//! No secret value is ever put in a record: header values that carry
//! credentials are replaced by `[redacted]` before a record is built.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Header names (lower case) whose values are credentials: never recorded
/// by the proxy, and redacted again by every view of a trace.
pub const SECRET_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "api-key",
];

/// What a redacted header value reads as.
pub const REDACTED: &str = "[redacted]";

/// One request through the proxy.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct TraceRecord {
    /// When the request arrived (RFC 3339, UTC).
    pub time: String,
    /// The client (run) that sent it.
    pub client: String,
    /// HTTP method (`CONNECT` for a refused tunnel).
    pub method: String,
    /// The full URL (`https://host/path?query`).
    pub url: String,
    /// Destination host.
    pub host: String,
    /// Destination port.
    pub port: u16,
    /// Status sent to the client, if a response was sent.
    pub status: Option<u16>,
    /// Time from request to the end of the response body, in milliseconds.
    pub duration_ms: f64,
    /// Request body bytes forwarded.
    pub request_bytes: u64,
    /// Response body bytes returned.
    pub response_bytes: u64,
    /// The grant whose credential was injected, if any.
    pub grant: Option<String>,
    /// Why the request was refused, if it was.
    pub denied: Option<String>,
    /// What failed, if something did (upstream unreachable, tls).
    pub error: Option<String>,
    /// Who caused the failure or refusal, if there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    /// The request rule (`network.rules`) that decided, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Request headers as sent upstream, credential values redacted.
    pub request_headers: Vec<(String, String)>,
    /// Response headers, credential values redacted.
    pub response_headers: Vec<(String, String)>,
    /// The start of a text request body, when body capture is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_body: Option<String>,
    /// The start of a text response body, when body capture is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_body: Option<String>,
}

/// Who caused a request to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fault {
    /// The client: a malformed request, a host that does not match, a
    /// client that went away.
    Client,
    /// The network policy (or the destination check) refused it.
    Policy,
    /// The upstream: could not be reached, failed TLS, did not answer, cut
    /// its answer short.
    Upstream,
    /// The proxy itself: its audit log cannot be written, a certificate
    /// cannot be minted.
    Internal,
}

impl Fault {
    /// The fault behind an answer the proxy gives itself.
    pub(crate) fn of(status: http::StatusCode, denied: bool) -> Fault {
        if denied || status == http::StatusCode::FORBIDDEN {
            return Fault::Policy;
        }
        match status.as_u16() {
            502 | 504 => Fault::Upstream,
            500 | 503 => Fault::Internal,
            _ => Fault::Client,
        }
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Fault::Client => "client",
            Fault::Policy => "policy",
            Fault::Upstream => "upstream",
            Fault::Internal => "internal",
        })
    }
}

/// Receives trace records (owned: a sink that keeps them needs no copy).
pub trait TraceSink: Send + Sync {
    /// Records one request.
    fn record(&self, record: TraceRecord);
}

/// A security-relevant decision of the proxy, for the audit log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AuditEvent {
    /// A policy decision on a destination.
    PolicyDecision {
        /// The client (run).
        client: String,
        /// Destination host.
        host: String,
        /// Destination port.
        port: u16,
        /// Allowed or refused.
        allowed: bool,
        /// The rule that decided (`permissive`, `allow:*.github.com`,
        /// `grant:github`, `strict`, `identity`, `destination`).
        rule: String,
    },
    /// A credential was injected into a request.
    CredentialInjected {
        /// The client (run).
        client: String,
        /// Destination host.
        host: String,
        /// Destination port.
        port: u16,
        /// The grant whose credential was used.
        grant: String,
        /// The header that carried it (never its value).
        header: String,
        /// Request method.
        method: String,
        /// Request path.
        path: String,
    },
    /// A request through the proxy, when its response ended (or it was
    /// refused or failed).
    Request {
        /// The client (run).
        client: String,
        /// Method (`CONNECT` for tunnels).
        method: String,
        /// Destination host.
        host: String,
        /// Destination port.
        port: u16,
        /// Path and query (empty for tunnels).
        path: String,
        /// Status sent to the client, if any.
        status: Option<u16>,
        /// Microseconds from request to the end of the response.
        duration_us: u64,
        /// The grant whose credential was injected, if any.
        grant: Option<String>,
        /// Why it was refused, if it was.
        denied: Option<String>,
        /// What failed, if something did.
        error: Option<String>,
        /// Who caused the failure or refusal, if there was one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fault: Option<Fault>,
    },
    /// Short-lived AWS credentials were handed to a client.
    AwsCredentialsIssued {
        /// The client (run).
        client: String,
        /// The role assumed.
        role_arn: String,
        /// The session's access key id (not secret).
        access_key_id: String,
        /// When the credentials expire.
        expiration: Option<String>,
    },
    /// An OAuth login was refreshed on the host (or a fresher one, written
    /// by another process, was taken up): never a token.
    CredentialRefreshed {
        /// The client (run) whose request needed it.
        client: String,
        /// The grant.
        grant: String,
        /// `refreshed` (this process asked the token endpoint) or `adopted`
        /// (the host's credentials file already held a fresher login).
        how: String,
        /// Why: `expiring` (within the margin of its expiry) or `refused`
        /// (the API answered 401).
        reason: String,
        /// When the new access token expires (RFC 3339), if known.
        expires: Option<String>,
    },
    /// Refreshing an OAuth login failed; the host's credentials file was
    /// left as it was.
    CredentialRefreshFailed {
        /// The client (run).
        client: String,
        /// The grant.
        grant: String,
        /// What failed.
        error: String,
    },
    /// A run was created: what it will run, never a secret.
    RunCreated {
        /// The run.
        run: String,
        /// Its name.
        name: String,
        /// The image.
        image: String,
        /// The workspace on the host.
        workspace: std::path::PathBuf,
        /// The command, when one was given.
        command: Option<Vec<String>>,
        /// The network policy.
        policy: crate::policy::PolicyMode,
        /// The allow list.
        allow: Vec<crate::policy::HostPattern>,
    },
    /// The run's grants were bound: their names and hosts.
    GrantsBound {
        /// The run.
        run: String,
        /// Each grant and the hosts it reaches.
        grants: Vec<GrantHosts>,
    },
    /// The run's secrets were resolved: names and backends, never values.
    SecretsResolved {
        /// The run.
        run: String,
        /// Each secret's variable and backend.
        secrets: Vec<SecretSource>,
    },
    /// The run's container was created with these settings.
    ContainerCreated {
        /// The run.
        run: String,
        /// The container's id.
        container: String,
        /// The image.
        image: String,
        /// `uid:gid` the agent runs as.
        user: String,
        /// `no-new-privileges` is set.
        no_new_privileges: bool,
        /// Capabilities dropped (`ALL`).
        cap_drop: Vec<String>,
        /// The run's network.
        network: String,
        /// The network has no route out.
        internal_network: bool,
        /// Strict mode's host firewall rules are installed.
        firewall: bool,
        /// The guard of the proxy's port is installed.
        proxy_guard: bool,
        /// The proxy's address.
        proxy: String,
        /// What is mounted.
        mounts: Vec<MountRecord>,
    },
    /// The run's container started.
    RunStarted {
        /// The run.
        run: String,
        /// The container's id.
        container: String,
    },
    /// The run could not be set up.
    RunFailed {
        /// The run.
        run: String,
        /// Why.
        error: String,
    },
    /// The run's command ended (or the run failed while it ran).
    RunStopped {
        /// The run.
        run: String,
        /// The command's exit code, when it has one.
        exit_code: Option<i64>,
        /// What went wrong, if anything.
        error: Option<String>,
    },
    /// A decision of a run's filtering SSH agent.
    SshAgent {
        /// The client (run).
        client: String,
        /// `list`, `sign`, `bind`, or the refused request (`add_identity`,
        /// `remove_identity`, `lock`, ...).
        op: String,
        /// The granted host it concerns, when known.
        host: Option<String>,
        /// The agent key's fingerprint (for `bind`, the server's host key).
        fingerprint: Option<String>,
        /// Allowed or refused.
        allowed: bool,
        /// Why it was refused, or a note.
        reason: Option<String>,
    },
}

/// A grant and the hosts it reaches, in [`AuditEvent::GrantsBound`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GrantHosts {
    /// The grant (`github`, `ssh:github.com`).
    pub grant: String,
    /// Its hosts.
    pub hosts: Vec<String>,
}

/// A secret's variable and backend, in [`AuditEvent::SecretsResolved`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SecretSource {
    /// The variable.
    pub name: String,
    /// The backend (`1password`, `aws-ssm`).
    pub backend: String,
}

/// A mount, in [`AuditEvent::ContainerCreated`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountRecord {
    /// Host path.
    pub source: String,
    /// Container path.
    pub target: String,
    /// Read-only.
    pub read_only: bool,
}

/// Records a finished request: the trace record, and the audit event.
pub(crate) fn emit(
    trace: Option<&std::sync::Arc<dyn TraceSink>>,
    audit: Option<&std::sync::Arc<dyn AuditSink>>,
    record: TraceRecord,
) {
    if let Some(audit) = audit {
        audit.event(AuditEvent::request(&record));
    }
    if let Some(trace) = trace {
        trace.record(record);
    }
}

/// Receives audit events (owned: a sink that keeps them needs no copy).
pub trait AuditSink: Send + Sync {
    /// Records one event.
    fn event(&self, event: AuditEvent);

    /// Whether events can still be recorded. When this is an error, the
    /// proxy stops injecting credentials for the client (it fails closed)
    /// and says why.
    fn healthy(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Sends every event to several sinks; healthy only when all are.
pub struct Tee(pub Vec<std::sync::Arc<dyn AuditSink>>);

impl std::fmt::Debug for Tee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tee({} sinks)", self.0.len())
    }
}

impl AuditSink for Tee {
    fn event(&self, event: AuditEvent) {
        if let Some((last, rest)) = self.0.split_last() {
            for s in rest {
                s.event(event.clone());
            }
            last.event(event);
        }
    }

    fn healthy(&self) -> Result<(), String> {
        self.0.iter().try_for_each(|s| s.healthy())
    }
}

impl AuditEvent {
    /// The entry's type and data, as the audit log writes them.
    pub(crate) fn entry(&self) -> (String, serde_json::Value) {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        let kind = value
            .get("type")
            .and_then(|t| t.as_str())
            .unwrap_or("event")
            .to_string();
        if let Some(map) = value.as_object_mut() {
            map.remove("type");
        }
        (kind, value)
    }
}

/// How much a [`MemorySink`] keeps. The trace records and the audit events
/// are bounded each, by count and by (approximate) bytes, whichever is
/// reached first; the oldest go first, in O(1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryLimits {
    /// The most records (and, apart, the most events) kept. Default 100,000.
    pub max_records: usize,
    /// The most bytes of records (and, apart, of events) kept, as measured
    /// by their text's length. Default 32 MiB.
    pub max_bytes: usize,
}

impl Default for MemoryLimits {
    fn default() -> MemoryLimits {
        MemoryLimits {
            max_records: 100_000,
            max_bytes: 32 * 1024 * 1024,
        }
    }
}

/// A bounded queue of JSON texts: the newest, at most `max_records` of them
/// and at most `max_bytes` of memory. Each is one allocation, so keeping and
/// dropping them costs the same on the millionth request as on the first.
#[derive(Debug, Default)]
struct Ring {
    items: VecDeque<Box<str>>,
    bytes: usize,
    dropped: u64,
}

/// The memory a kept text holds: its bytes, its pointer and length, and
/// the allocator's own bookkeeping.
fn text_weight(text: &str) -> usize {
    text.len() + std::mem::size_of::<Box<str>>() + 16
}

impl Ring {
    /// Keeps `item`, dropping the oldest to stay within `limits`; returns
    /// what was dropped (for the caller to free outside its lock).
    fn push(&mut self, item: Box<str>, limits: &MemoryLimits) -> Vec<Box<str>> {
        let weight = text_weight(&item);
        let mut evicted = Vec::new();
        if limits.max_records == 0 || weight > limits.max_bytes {
            self.dropped += 1;
            evicted.push(item);
            return evicted;
        }
        while self.items.len() >= limits.max_records || self.bytes + weight > limits.max_bytes {
            match self.items.pop_front() {
                Some(old) => {
                    self.bytes -= text_weight(&old);
                    self.dropped += 1;
                    evicted.push(old);
                }
                None => break,
            }
        }
        self.bytes += weight;
        self.items.push_back(item);
        evicted
    }

    /// The kept texts as one JSON array.
    fn json_array(&self) -> String {
        let mut out = String::with_capacity(self.bytes + 2);
        out.push('[');
        for (i, item) in self.items.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(item);
        }
        out.push(']');
        out
    }
}

/// A sink that keeps trace records and audit events in memory, bounded by
/// [`MemoryLimits`]; what it dropped is counted ([`MemorySink::dropped`]).
/// It keeps each as its JSON text: one allocation, and less memory than
/// the structure.
#[derive(Debug, Default)]
pub struct MemorySink {
    limits: MemoryLimits,
    records: Mutex<Ring>,
    events: Mutex<Ring>,
}

impl MemorySink {
    /// A sink with these limits.
    pub fn new(limits: MemoryLimits) -> MemorySink {
        MemorySink {
            limits,
            ..MemorySink::default()
        }
    }

    /// The limits it keeps to.
    pub fn limits(&self) -> MemoryLimits {
        self.limits
    }

    /// The trace records kept, oldest first.
    pub fn records(&self) -> Vec<TraceRecord> {
        parse_all(&self.records)
    }

    /// The audit events kept, oldest first.
    pub fn events(&self) -> Vec<AuditEvent> {
        parse_all(&self.events)
    }

    /// The trace records kept, oldest first, as a JSON array.
    pub fn records_json(&self) -> String {
        self.records
            .lock()
            .map(|r| r.json_array())
            .unwrap_or_else(|_| "[]".to_string())
    }

    /// The audit events kept, oldest first, as a JSON array.
    pub fn events_json(&self) -> String {
        self.events
            .lock()
            .map(|r| r.json_array())
            .unwrap_or_else(|_| "[]".to_string())
    }

    /// How many records and events were dropped to stay within the limits.
    pub fn dropped(&self) -> (u64, u64) {
        let records = self.records.lock().map(|r| r.dropped).unwrap_or(0);
        let events = self.events.lock().map(|r| r.dropped).unwrap_or(0);
        (records, events)
    }

    fn keep(&self, ring: &Mutex<Ring>, item: &impl Serialize) {
        let Some(text) = compact_json(item) else {
            return;
        };
        let evicted = match ring.lock() {
            Ok(mut ring) => ring.push(text, &self.limits),
            Err(_) => Vec::new(),
        };
        // What is dropped to make room is freed after the lock is let go.
        drop(evicted);
    }
}

/// `item` as JSON in an allocation of exactly its size: written into a
/// buffer each thread reuses, then copied once (a string grown and shrunk
/// in place would leave the allocator a hole each time).
fn compact_json(item: &impl Serialize) -> Option<Box<str>> {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUF.with(|buf| {
        let mut buf = buf.try_borrow_mut().ok()?;
        buf.clear();
        serde_json::to_writer(&mut *buf, item).ok()?;
        let text = std::str::from_utf8(&buf).ok()?;
        Some(Box::from(text))
    })
}

fn parse_all<T: serde::de::DeserializeOwned>(ring: &Mutex<Ring>) -> Vec<T> {
    let Ok(ring) = ring.lock() else {
        return Vec::new();
    };
    ring.items
        .iter()
        .filter_map(|text| serde_json::from_str(text).ok())
        .collect()
}

impl TraceSink for MemorySink {
    fn record(&self, record: TraceRecord) {
        self.keep(&self.records, &record);
    }
}

impl AuditSink for MemorySink {
    fn event(&self, event: AuditEvent) {
        self.keep(&self.events, &event);
    }
}

impl AuditEvent {
    /// The audit view of a finished request (never headers or bodies).
    pub fn request(record: &TraceRecord) -> AuditEvent {
        let path = record
            .url
            .split_once("://")
            .and_then(|(_, rest)| rest.find('/').map(|i| rest[i..].to_string()))
            .unwrap_or_default();
        AuditEvent::Request {
            client: record.client.clone(),
            method: record.method.clone(),
            host: record.host.clone(),
            port: record.port,
            path,
            status: record.status,
            duration_us: (record.duration_ms * 1000.0) as u64,
            grant: record.grant.clone(),
            denied: record.denied.clone(),
            error: record.error.clone(),
            fault: record.fault,
        }
    }
}

/// The current time in RFC 3339.
pub(crate) fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: usize, header_bytes: usize) -> TraceRecord {
        TraceRecord {
            url: format!("https://h/{i}"),
            request_headers: vec![("x-pad".into(), "p".repeat(header_bytes))],
            ..TraceRecord::default()
        }
    }

    #[test]
    fn memory_sink_keeps_the_newest_within_its_count() {
        let sink = MemorySink::new(MemoryLimits {
            max_records: 1000,
            max_bytes: usize::MAX,
        });
        for i in 0..25_000 {
            sink.record(record(i, 0));
        }
        let kept = sink.records();
        assert_eq!(kept.len(), 1000);
        assert_eq!(kept[0].url, "https://h/24000");
        assert_eq!(kept[999].url, "https://h/24999");
        assert_eq!(sink.dropped().0, 24_000);
    }

    #[test]
    fn memory_sink_is_bounded_by_bytes_too() {
        let limits = MemoryLimits {
            max_records: 1_000_000,
            max_bytes: 1024 * 1024,
        };
        let sink = MemorySink::new(limits);
        for i in 0..10_000 {
            sink.record(record(i, 4096));
        }
        let kept = sink.records();
        let bytes: usize = kept
            .iter()
            .map(|r| text_weight(&serde_json::to_string(r).unwrap()))
            .sum();
        assert!(bytes <= limits.max_bytes, "{bytes} bytes kept");
        assert!(kept.len() > 200 && kept.len() < 260, "{} kept", kept.len());
        assert_eq!(sink.dropped().0, 10_000 - kept.len() as u64);
        // The JSON form holds the same records.
        let json: Vec<TraceRecord> = serde_json::from_str(&sink.records_json()).unwrap();
        assert_eq!(json, kept);
        assert_eq!(kept.last().map(|r| r.url.as_str()), Some("https://h/9999"));
        // One record larger than the whole budget is dropped, not kept alone.
        sink.record(record(10_000, 2 * 1024 * 1024));
        assert_eq!(
            sink.records().last().map(|r| r.url.as_str()),
            Some("https://h/9999")
        );
    }

    #[test]
    fn memory_sink_bounds_audit_events_apart() {
        let sink = MemorySink::new(MemoryLimits {
            max_records: 10,
            max_bytes: usize::MAX,
        });
        for i in 0..100u16 {
            sink.event(AuditEvent::PolicyDecision {
                client: "c".into(),
                host: "h".into(),
                port: i,
                allowed: true,
                rule: "permissive".into(),
            });
        }
        let events = sink.events();
        assert_eq!(events.len(), 10);
        assert!(matches!(
            events[0],
            AuditEvent::PolicyDecision { port: 90, .. }
        ));
        assert_eq!(sink.dropped(), (0, 90));
    }
}
