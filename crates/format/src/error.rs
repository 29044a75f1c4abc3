//! The one error type of the format crate: what is wrong with a structure's bytes.

use crate::Digest;

/// Why a structure was refused. Messages are lower case and name the field at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FormatError {
    #[error("bad magic in {what}: not an mcow {what}")]
    BadMagic { what: &'static str },
    #[error("{what} is {got} bytes, need {need}")]
    Truncated { what: &'static str, got: usize, need: usize },
    #[error("checksum mismatch in {what}")]
    BadChecksum { what: &'static str },
    #[error("unsupported format version {0} (this build reads version 1)")]
    UnsupportedVersion(u32),
    #[error("unknown incompatible feature bits {0:#x}")]
    UnknownFeatures(u64),
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("index digest mismatch: trailer records {expected}, index hashes to {actual}")]
    IndexDigestMismatch { expected: Digest, actual: Digest },
    #[error("invalid manifest: {0}")]
    Manifest(String),
}

impl FormatError {
    /// A file whose length does not match what its trailer records.
    pub fn invalid_len(got: u64, expected: u64) -> Self {
        FormatError::Invalid {
            field: "file length",
            reason: format!("{got} bytes, the trailer implies {expected}"),
        }
    }

    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        FormatError::Invalid { field, reason: reason.into() }
    }
}
