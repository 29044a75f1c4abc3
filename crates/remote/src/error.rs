//! The remote crate's error type.

use std::path::PathBuf;

use mcow_format::Digest;

pub type Result<T, E = RemoteError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    #[error("invalid reference {reference:?}: {reason}")]
    Reference { reference: String, reason: String },
    #[error("{what} not found at {location}")]
    NotFound { what: String, location: String },
    /// There is no OCI image layout at `location` (`file://`, `http://`, `s3://`) to read an
    /// image from; `reason` says what is there instead (a directory that does not exist).
    #[error("no OCI image layout at {location}: {reason}")]
    NoLayout { location: String, reason: String },
    /// An answer we did not want; `retry_after` is the server's `Retry-After` (in seconds) when
    /// it sent one.
    #[error("{method} {url}: HTTP {status}{}", if body.is_empty() { String::new() } else { format!(": {body}") })]
    Http {
        method: &'static str,
        url: String,
        status: u16,
        body: String,
        retry_after: Option<std::time::Duration>,
    },
    #[error("{method} {url}: {reason}")]
    Transport { method: &'static str, url: String, reason: String },
    #[error("{what}: expected {expected}, got {actual}")]
    DigestMismatch { what: String, expected: Digest, actual: Digest },
    #[error("{0}")]
    Invalid(String),
    /// The client was cancelled (the process is stopping): the operation named was given up.
    #[error("{0}: cancelled")]
    Cancelled(String),
    #[error("{} is read-only", .0)]
    ReadOnly(String),
    /// A range that runs past the end of the object (`object` says what kind it is: "file",
    /// "object"), at `location`. Not transient: asking again gets the same answer.
    #[error("{location}: bytes {offset}..{end} asked for, but the {object} has {size}")]
    OutOfRange { location: String, object: &'static str, offset: u64, end: u64, size: u64 },
    #[error("{op} {}: {err}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error(transparent)]
    Engine(#[from] mcow_engine::Error),
}

impl RemoteError {
    /// Whether trying again may succeed (network trouble, server errors, short bodies).
    pub fn is_transient(&self) -> bool {
        match self {
            RemoteError::Transport { .. } => true,
            RemoteError::Http { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            _ => false,
        }
    }

    /// How long the server asked us to wait before trying again (`Retry-After`), if it did.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            RemoteError::Http { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> RemoteError {
        let path = path.into();
        move |err| RemoteError::Io { op, path, err }
    }
}

impl From<RemoteError> for std::io::Error {
    fn from(e: RemoteError) -> std::io::Error {
        let kind = match &e {
            RemoteError::NotFound { .. } | RemoteError::NoLayout { .. } => std::io::ErrorKind::NotFound,
            RemoteError::Io { err, .. } => err.kind(),
            RemoteError::Transport { .. } => std::io::ErrorKind::TimedOut,
            RemoteError::Cancelled(_) => std::io::ErrorKind::ConnectionAborted,
            _ => std::io::ErrorKind::Other,
        };
        std::io::Error::new(kind, e)
    }
}
