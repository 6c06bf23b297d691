//! The phases of a request that a client can extend, around the proxy's own
//! (find the client by its token, decide the policy, check that the CONNECT
//! host, the TLS server name and the request's host agree, resolve and dial
//! the upstream). Each phase has a default that does nothing, so an
//! extension names only what it does (pingora's shape), in the order a
//! request meets them:
//!
//! - [`Phase::authenticate`]: the client's token named it; a phase may still
//!   refuse the request (by the peer address of its connection, say; asked
//!   for each request).
//! - [`Phase::connect`]: a tunnel the policy allowed is about to open; a
//!   phase may refuse it (its client gets a 403 with the answer's body,
//!   inside TLS as for any refusal; the answer's audit event is written).
//! - [`Phase::respond`]: answer a request instead of any upstream: one to
//!   the proxy's own host (`http://moat.internal/...`), or one inside an
//!   intercepted tunnel. The AWS credential endpoint is one
//!   ([`crate::credential::aws::AwsEndpoint`]); Claude Code's token
//!   endpoint, answered on the host, another
//!   ([`crate::credential::oauth::OauthBroker`]).
//! - [`Phase::inject`]: change a request about to go upstream over verified
//!   TLS, or refuse it. Credentials in headers are one
//!   ([`HeaderCredentials`]); an OAuth login refreshed on the host another.
//! - [`Phase::upstream`]: choose where a request for a host goes (an
//!   address to dial instead of resolving the name). The name is still what
//!   the upstream's TLS certificate must prove, so a credential reaches only
//!   a server that proves its host. A client whose phase chooses gets its
//!   own connection pools for those requests: a connection to a chosen
//!   address never serves another client.
//! - [`Phase::observe`]: see the status of an upstream's answer (a 401
//!   tells the OAuth broker its token was refused).
//! - [`Phase::fail`]: a request failed or was refused, and who is at fault
//!   ([`Fault`]); a phase may say more to the client. Asked before the
//!   request's record is final, for the answers with a text body: the
//!   proxy's failures and policy refusals (a tunnel's, a request rule's, a
//!   host that does not match), and phases' own refusals. Not for a
//!   malformed request, a git push refused in git's own words, or a raw
//!   tunnel.
//! - [`Phase::log`]: every request's record, once, when it is final (just
//!   before the client's trace and audit sinks take it).

use std::fmt;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Method, StatusCode};

use super::Credential;
use crate::policy::HostPattern;
pub use crate::trace::Fault;
use crate::trace::{AuditEvent, TraceRecord};

/// The proxy's own host: requests for it are answered by [`Phase::respond`]
/// and never leave the proxy.
pub const INTERNAL_HOST: &str = "moat.internal";

/// What a phase sees of a request.
#[derive(Debug)]
pub struct RequestHead<'a> {
    /// The client's name (the run id).
    pub client: &'a str,
    /// The method.
    pub method: &'a Method,
    /// The host asked for ([`INTERNAL_HOST`], or a tunnel's host).
    pub host: &'a str,
    /// The port asked for.
    pub port: u16,
    /// The path (and query).
    pub path: &'a str,
}

/// A phase's own answer to a request.
#[derive(Debug)]
pub struct Answer {
    /// The status.
    pub status: StatusCode,
    /// `content-type`.
    pub content_type: &'static str,
    /// The body.
    pub body: Bytes,
    /// An event for the client's audit log (never a secret value).
    pub audit: Option<AuditEvent>,
    /// Why it was refused, for the trace, if it was.
    pub denied: Option<String>,
    /// What failed, for the trace, if something did.
    pub error: Option<String>,
}

impl Answer {
    /// A `text/plain` answer.
    pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Answer {
        Answer {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            audit: None,
            denied: None,
            error: None,
        }
    }
}

/// A credential put into a request (its header's name, never its value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injection {
    /// The grant it came from.
    pub grant: String,
    /// The header that carries it.
    pub header: HeaderName,
}

/// What [`Phase::inject`] did: the credentials it put in, and events for
/// the client's audit log (never a secret value).
#[derive(Debug, Default)]
pub struct Injected {
    /// The credentials put in.
    pub injections: Vec<Injection>,
    /// Events to record.
    pub audit: Vec<AuditEvent>,
}

impl From<Vec<Injection>> for Injected {
    fn from(injections: Vec<Injection>) -> Injected {
        Injected {
            injections,
            audit: Vec::new(),
        }
    }
}

/// A request that failed or was refused, for [`Phase::fail`].
#[derive(Debug)]
pub struct Failure<'a> {
    /// The client's name (the run id).
    pub client: &'a str,
    /// The method (`CONNECT` for a tunnel).
    pub method: &'a str,
    /// The host asked for.
    pub host: &'a str,
    /// The port asked for.
    pub port: u16,
    /// The status the client gets.
    pub status: StatusCode,
    /// Who failed.
    pub fault: Fault,
    /// What the client is told (the proxy's words).
    pub message: &'a str,
}

/// A client's extension of the proxy; every method has a default.
#[async_trait::async_trait]
pub trait Phase: Send + Sync + fmt::Debug {
    /// The client's token named it, on a connection from `peer`: `Err`
    /// refuses the request (and no other phase sees it). Asked for every
    /// request (a keep-alive connection's too).
    #[allow(clippy::result_large_err)] // an answer, as `inject`'s; rare
    fn authenticate(&self, _peer: std::net::SocketAddr) -> Result<(), Answer> {
        Ok(())
    }

    /// A tunnel to `host:port` that the policy allowed is about to open:
    /// `Err` refuses it: its client gets a 403 with the answer's body (in
    /// TLS when the tunnel is intercepted), the answer's `denied` goes in
    /// the record and its audit event in the audit log.
    #[allow(clippy::result_large_err)] // an answer, as `inject`'s; rare
    fn connect(&self, _host: &str, _port: u16) -> Result<(), Answer> {
        Ok(())
    }

    /// Answers a request, or `None` to leave it to the next phase. Asked for
    /// requests to [`INTERNAL_HOST`] (plain HTTP; when no phase answers, a
    /// 404) and for requests inside an intercepted tunnel, before any
    /// credential is injected (when none answers, the request goes
    /// upstream). A phase must check `host` and `port`.
    async fn respond(&self, _request: &RequestHead<'_>) -> Option<Answer> {
        None
    }

    /// Will [`Phase::inject`] put anything into a request for `host:port`?
    /// (Asked first, so that no credential goes out that the audit log
    /// could not record.)
    fn injects_for(&self, _host: &str, _port: u16) -> bool {
        false
    }

    /// Changes a request about to go to `host:port` over verified TLS; what
    /// it injected. An `Err` answers the client instead, and nothing is
    /// sent (a credential that cannot be had).
    async fn inject(
        &self,
        _host: &str,
        _port: u16,
        _headers: &mut HeaderMap,
    ) -> Result<Injected, Answer> {
        Ok(Injected::default())
    }

    /// Sees the status of an upstream's answer to a request for
    /// `host:port` (before its body).
    fn observe(&self, _host: &str, _port: u16, _status: StatusCode) {}

    /// Chooses the address a request for `host:port` is sent to, instead of
    /// the proxy resolving the name (and checking the address: a chosen
    /// one is the embedding program's, as `MOAT_RESOLVE`'s are the
    /// operator's); `None` leaves it to the proxy. Asked with the host as
    /// the proxy judged it (lower case, no final dot) for every request
    /// (HTTPS, plain HTTP, WebSocket) the policy allowed, and again when a
    /// connection is dialled; must be quick, and should answer the same for
    /// a host while its connections live (an idle one is kept up to 60 s
    /// and reused).
    fn upstream(&self, _host: &str, _port: u16) -> Option<std::net::SocketAddr> {
        None
    }

    /// A request failed or was refused: a line to add to what its client
    /// reads, or `None`. (Its record says the same as ever; see
    /// [`Phase::log`].)
    fn fail(&self, _failure: &Failure<'_>) -> Option<String> {
        None
    }

    /// A request's record, final: once per request the proxy accepted,
    /// just before the client's trace and audit sinks take it. Must not
    /// block.
    fn log(&self, _record: &TraceRecord) {}

    /// The hosts this phase's credentials are for: strict mode lets them
    /// through (with the grant's name as the rule).
    fn hosts(&self) -> Vec<(HostPattern, String)> {
        Vec::new()
    }
}

/// Credentials sent in headers: for each whose host matches, any header of
/// that name the client sent (a placeholder) is removed and the credential
/// set once. This is the one place a credential's value is read.
#[derive(Debug, Clone, Default)]
pub struct HeaderCredentials(pub Vec<Credential>);

#[async_trait::async_trait]
impl Phase for HeaderCredentials {
    fn injects_for(&self, host: &str, port: u16) -> bool {
        self.0.iter().any(|c| c.matches(host, port))
    }

    async fn inject(
        &self,
        host: &str,
        port: u16,
        headers: &mut HeaderMap,
    ) -> Result<Injected, Answer> {
        let mut done = Vec::new();
        for cred in self.0.iter().filter(|c| c.matches(host, port)) {
            headers.remove(cred.header());
            headers.insert(cred.header().clone(), cred.value.expose().clone());
            done.push(Injection {
                grant: cred.grant().to_string(),
                header: cred.header().clone(),
            });
        }
        Ok(done.into())
    }

    fn hosts(&self) -> Vec<(HostPattern, String)> {
        self.0
            .iter()
            .map(|c| (c.host.clone(), c.grant.clone()))
            .collect()
    }
}
