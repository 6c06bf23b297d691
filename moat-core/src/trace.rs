//! What the proxy records: a trace record per request (for `network.jsonl`)
//! and audit events (for the audit log). Both go to per-client sinks.
//!
//! No secret value is ever put in a record: header values that carry
//! credentials are replaced by `[redacted]` before a record is built.

use std::sync::Mutex;

use serde::Serialize;

/// One request through the proxy.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
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

/// Receives trace records.
pub trait TraceSink: Send + Sync {
    /// Records one request.
    fn record(&self, record: &TraceRecord);
}

/// A security-relevant decision of the proxy, for the audit log.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
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

/// Records a finished request: the trace record, and the audit event.
pub(crate) fn emit(
    trace: Option<&std::sync::Arc<dyn TraceSink>>,
    audit: Option<&std::sync::Arc<dyn AuditSink>>,
    record: &TraceRecord,
) {
    if let Some(trace) = trace {
        trace.record(record);
    }
    if let Some(audit) = audit {
        audit.event(&AuditEvent::request(record));
    }
}

/// Receives audit events.
pub trait AuditSink: Send + Sync {
    /// Records one event.
    fn event(&self, event: &AuditEvent);

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
    fn event(&self, event: &AuditEvent) {
        for s in &self.0 {
            s.event(event);
        }
    }

    fn healthy(&self) -> Result<(), String> {
        self.0.iter().try_for_each(|s| s.healthy())
    }
}

impl AuditSink for crate::audit::AuditWriter {
    fn event(&self, event: &AuditEvent) {
        let mut value = serde_json::to_value(event).unwrap_or_default();
        let kind = value
            .get("type")
            .and_then(|t| t.as_str())
            .unwrap_or("event")
            .to_string();
        if let Some(map) = value.as_object_mut() {
            map.remove("type");
        }
        self.append_nowait(&kind, value);
    }

    fn healthy(&self) -> Result<(), String> {
        crate::audit::AuditWriter::healthy(self)
    }
}

/// The most records a [`MemorySink`] keeps; older ones are dropped first.
pub const MEMORY_SINK_LIMIT: usize = 100_000;

/// A sink that keeps trace records and audit events in memory, bounded.
#[derive(Debug, Default)]
pub struct MemorySink {
    records: Mutex<Vec<TraceRecord>>,
    events: Mutex<Vec<AuditEvent>>,
}

impl MemorySink {
    /// The trace records so far.
    pub fn records(&self) -> Vec<TraceRecord> {
        self.records.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// The audit events so far.
    pub fn events(&self) -> Vec<AuditEvent> {
        self.events.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

fn push_bounded<T>(list: &Mutex<Vec<T>>, item: T) {
    if let Ok(mut list) = list.lock() {
        if list.len() >= MEMORY_SINK_LIMIT {
            list.remove(0);
        }
        list.push(item);
    }
}

impl TraceSink for MemorySink {
    fn record(&self, record: &TraceRecord) {
        push_bounded(&self.records, record.clone());
    }
}

impl AuditSink for MemorySink {
    fn event(&self, event: &AuditEvent) {
        push_bounded(&self.events, event.clone());
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
        }
    }
}

/// The current time in RFC 3339.
pub(crate) fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
