//! The engine's one error type: a kind that callers can match, with the file, block or range it
//! concerns. Each message includes its cause, so causes are not also chained as `source`. The
//! CLI adds its own context with `anyhow`; the NBD adapter maps kinds to errno.

use std::io;
use std::path::PathBuf;

use mcow_format::{Digest, FormatError};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O call failed.
    #[error("{op} {}: {err}", path.display())]
    Io { op: &'static str, path: PathBuf, err: io::Error },
    /// A file's bytes break the format (truncated, bad magic, bad checksum, bad version...).
    #[error("{}: {err}", path.display())]
    Format { path: PathBuf, err: FormatError },
    /// A stored block does not match its hash: the layer is corrupt.
    #[error("{}: block {pblock} fails its checksum (the layer is corrupt)", path.display())]
    BlockChecksum { path: PathBuf, pblock: u64 },
    /// A layer's content does not hash to the digest it is named by.
    #[error("{}: content hashes to {actual}, but the layer is named {expected}", path.display())]
    LayerDigest { path: PathBuf, expected: Digest, actual: Digest },
    /// A layer was made on another stack than the one it is placed on.
    #[error("{}: layer was made on stack {recorded}, but is placed on stack {actual}", path.display())]
    WrongParent { path: PathBuf, recorded: Digest, actual: Digest },
    /// Block size or virtual size of a layer differs from its disk's.
    #[error("{}: {what} is {found}, the disk's is {expected}", path.display())]
    Mismatch { path: PathBuf, what: &'static str, found: u64, expected: u64 },
    /// A batch in the middle of a top's journal is damaged: a whole batch follows it, so what
    /// follows is committed data, not the debris of a crash. Nothing may cut it away.
    #[error(
        "{}: journal is corrupt: the batch at byte {offset} (after {good_batches} good batches) is \
         damaged, but a whole batch follows at byte {next_whole}; a writable open would cut off \
         committed writes, so it is refused (a read-only open shows the disk as of the last good \
         batch)",
        path.display()
    )]
    JournalCorrupt { path: PathBuf, offset: u64, good_batches: u64, next_whole: u64 },
    /// Another process has the top layer open.
    #[error("{}: in use by another process (the file is locked)", path.display())]
    Locked { path: PathBuf },
    /// A request reaches past the end of the disk.
    #[error("range {offset}+{len} is past the end of the disk ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// A write to a disk opened read-only.
    #[error("the disk is open read-only")]
    ReadOnly,
    /// Anything else the caller asked for that cannot be done, with the reason.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |err| Error::Io { op, path, err }
    }

    pub(crate) fn format(path: impl Into<PathBuf>) -> impl FnOnce(FormatError) -> Error {
        let path = path.into();
        move |err| Error::Format { path, err }
    }

    /// The errno-like class of this error, for front ends that speak errno (NBD).
    pub fn io_kind(&self) -> io::ErrorKind {
        match self {
            Error::Io { err, .. } => err.kind(),
            Error::OutOfRange { .. } | Error::Invalid(_) => io::ErrorKind::InvalidInput,
            Error::ReadOnly => io::ErrorKind::PermissionDenied,
            Error::Locked { .. } => io::ErrorKind::WouldBlock,
            _ => io::ErrorKind::InvalidData,
        }
    }

    /// True where the error means on-disk corruption (as opposed to I/O or usage errors).
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            Error::Format { .. }
                | Error::BlockChecksum { .. }
                | Error::LayerDigest { .. }
                | Error::WrongParent { .. }
                | Error::Mismatch { .. }
                | Error::JournalCorrupt { .. }
        )
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        match e {
            Error::Io { err, .. } if err.raw_os_error().is_some() => err,
            other => io::Error::new(other.io_kind(), other),
        }
    }
}
