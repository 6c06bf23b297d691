//! The one public error type of moat.
//!
//! [`Error`] is opaque: callers branch on [`Error::kind`] (a fieldless
//! [`ErrorKind`]) and read [`Error::location`] for errors that point into a
//! file. The C and Python bindings map every kind explicitly, so adding a kind
//! fails to compile until each binding has a status code and an exception for
//! it.
//!
//! Messages are lowercase, carry no trailing period, and name the path, key or
//! host at fault. They never contain a secret value.

use std::fmt;
use std::path::{Path, PathBuf};

/// What kind of failure an [`Error`] is.
/// Not `#[non_exhaustive]` on purpose: the bindings match every kind, so a
/// new kind does not compile until C and Python map it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A configuration file or a configuration override is invalid.
    Config,
    /// Reading or writing a file failed.
    Io,
    /// An argument given through an API or the command line is invalid.
    InvalidArgument,
    /// A bug in moat: a panic was caught or an internal invariant failed.
    Internal,
    /// The container engine is unreachable or refused what moat asked, or a
    /// run could not be set up or managed on this host.
    Runtime,
}

impl ErrorKind {
    /// A short, stable, lowercase name for the kind (`"config"`, `"io"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Config => "config",
            ErrorKind::Io => "io",
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::Internal => "internal",
            ErrorKind::Runtime => "runtime",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A place in a file: the path as the user gave it, and a 1-based line and
/// column.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Location {
    /// The file, as given by the user (not canonicalised).
    pub path: PathBuf,
    /// 1-based line number.
    pub line: u32,
    /// 1-based column number.
    pub column: u32,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.path.display(), self.line, self.column)
    }
}

/// One problem found in a file, with its location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Where the problem is, when it is in a file.
    pub location: Option<Location>,
    /// What is wrong, lowercase, without the location prefix.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Some(loc) => write!(f, "{loc}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// The error type of every fallible moat operation.
pub struct Error {
    kind: ErrorKind,
    diagnostics: Vec<Diagnostic>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    /// A new error of `kind` with `message` and no location.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            diagnostics: vec![Diagnostic {
                location: None,
                message: message.into(),
            }],
            source: None,
        }
    }

    /// A configuration error at `location`.
    pub fn config_at(location: Location, message: impl Into<String>) -> Self {
        Error::from_diagnostics(
            ErrorKind::Config,
            vec![Diagnostic {
                location: Some(location),
                message: message.into(),
            }],
        )
    }

    /// An error holding several problems; the first one is the headline.
    ///
    /// An empty list becomes an internal error rather than a panic.
    pub fn from_diagnostics(kind: ErrorKind, diagnostics: Vec<Diagnostic>) -> Self {
        if diagnostics.is_empty() {
            return Error::new(ErrorKind::Internal, "error raised with no diagnostics");
        }
        Error {
            kind,
            diagnostics,
            source: None,
        }
    }

    /// An I/O error about `path`.
    pub fn io(path: &Path, action: &str, err: std::io::Error) -> Self {
        let message = format!("{}: cannot {action}: {}", path.display(), io_reason(&err));
        Error {
            kind: ErrorKind::Io,
            diagnostics: vec![Diagnostic {
                location: None,
                message,
            }],
            source: Some(Box::new(err)),
        }
    }

    /// What kind of error this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The headline message, without the location prefix.
    pub fn message(&self) -> &str {
        self.first().map_or("", |d| d.message.as_str())
    }

    /// Where the (first) problem is, when it is in a file.
    pub fn location(&self) -> Option<&Location> {
        self.first().and_then(|d| d.location.as_ref())
    }

    /// Every problem found, in file order. Configuration validation reports
    /// all the problems it can find at once; other errors have one.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        &self.diagnostics
    }

    /// Is this a configuration error?
    pub fn is_config(&self) -> bool {
        self.kind == ErrorKind::Config
    }

    /// Is this an I/O error?
    pub fn is_io(&self) -> bool {
        self.kind == ErrorKind::Io
    }

    /// Is this an invalid-argument error?
    pub fn is_invalid_argument(&self) -> bool {
        self.kind == ErrorKind::InvalidArgument
    }

    /// Is this an internal error (a bug in moat)?
    pub fn is_internal(&self) -> bool {
        self.kind == ErrorKind::Internal
    }

    /// Is this a container runtime error (engine unreachable, run setup)?
    pub fn is_runtime(&self) -> bool {
        self.kind == ErrorKind::Runtime
    }

    fn first(&self) -> Option<&Diagnostic> {
        self.diagnostics.first()
    }
}

/// The reason of an I/O error in the house style: lowercase, no `(os error N)`.
pub(crate) fn io_reason(err: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    match err.kind() {
        K::NotFound => "no such file or directory".into(),
        K::PermissionDenied => "permission denied".into(),
        K::IsADirectory => "is a directory".into(),
        K::InvalidData => "not valid utf-8".into(),
        _ => {
            let text = err.to_string();
            let text = match text.find(" (os error") {
                Some(i) => text[..i].to_string(),
                None => text,
            };
            let mut chars = text.chars();
            match chars.next() {
                Some(c) => c.to_lowercase().chain(chars).collect(),
                None => "unknown error".into(),
            }
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("diagnostics", &self.diagnostics)
            .finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.first() {
            Some(d) => d.fmt(f),
            None => f.write_str("unknown error"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// `Result` with moat's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_prefixes_location() {
        let err = Error::config_at(
            Location {
                path: "agent.yaml".into(),
                line: 4,
                column: 3,
            },
            "unknown field \"grnats\"",
        );
        assert_eq!(err.to_string(), "agent.yaml:4:3: unknown field \"grnats\"");
        assert!(err.is_config());
        assert_eq!(err.location().map(|l| l.line), Some(4));
    }

    #[test]
    fn io_error_names_path_and_reason() {
        let err = Error::io(
            Path::new("/nope/agent.yaml"),
            "read",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        assert_eq!(
            err.to_string(),
            "/nope/agent.yaml: cannot read: no such file or directory"
        );
        assert!(err.is_io());
    }

    #[test]
    fn empty_diagnostics_is_internal_not_panic() {
        let err = Error::from_diagnostics(ErrorKind::Config, vec![]);
        assert!(err.is_internal());
    }
}
