//! The tamper-evident audit log. The format is specified in
//! `docs/audit-format.md`; this module writes and verifies it.
//!
//! - `<dir>/audit.jsonl`: one entry per line, canonical JSON (RFC 8785):
//!   `{"data":{..},"prev":"<hex>","seq":N,"time":"<RFC 3339>","type":"<t>"}`,
//!   `prev` being SHA-256 of the previous line (64 zeros for the first).
//! - An RFC 6962 tree over the lines: leaf `SHA-256(0x00 || line)`.
//! - `<dir>/checkpoints.jsonl`: `{"note": "<signed note>"}` per line: a
//!   C2SP checkpoint (origin, size, base64 root, `time <RFC 3339>`) signed
//!   with Ed25519 by the key in `$MOAT_HOME/audit/signing.key` (0600).
//! - `$MOAT_HOME/audit/witness/<origin hash>.note`: the latest checkpoint
//!   of each log, kept outside the log's directory so that an older log
//!   swapped in is caught.

pub mod jcs;
mod log;
pub mod merkle;

pub use log::{
    export_bundle, signing_key, verify, verify_bundle, vkey_of, AuditWriter, Checkpoint, Report,
};
