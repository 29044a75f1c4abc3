//! The engine's one error type: a kind that callers can match, with the file, block or range it
//! concerns. Wrapped errors are chained as `source` (for callers that walk the chain or match
//! the inner kind), and each message also includes its cause, so that a log line or a `check`
//! report printing one error alone loses nothing; the CLI's printer skips a cause its message
//! already ends with. The CLI adds its own context with `anyhow`; the NBD adapter maps kinds to
//! errno.

use std::io;
use std::path::PathBuf;

use mcow_format::{Digest, FormatError};

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong in the engine, with the file, block or range it concerns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O call failed.
    #[error("{op} {}: {err}", path.display())]
    Io {
        /// The operation (`"read"`, `"rename"`...).
        op: &'static str,
        /// The file or directory it was done on.
        path: PathBuf,
        /// The system's error.
        #[source]
        err: io::Error,
    },
    /// A file's bytes break the format (truncated, bad magic, bad checksum, bad version...).
    #[error("{}: {err}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// The rule its bytes break.
        #[source]
        err: FormatError,
    },
    /// A stored block does not match its hash: the layer is corrupt.
    #[error("{}: block {pblock} fails its checksum (the layer is corrupt)", path.display())]
    BlockChecksum {
        /// The layer file.
        path: PathBuf,
        /// The block's physical number in the layer.
        pblock: u64,
    },
    /// A partial layer's index chunk list (beside its file) is missing, unreadable or does not
    /// fit the layer.
    #[error(
        "{}: the index chunk list of this partial layer is unusable: {why} (remove the partial copy and pull again)",
        path.display()
    )]
    ChunkList {
        /// The partial layer.
        path: PathBuf,
        /// What is wrong with the list.
        why: String,
    },
    /// A partial layer's frame table (its `.frames` file, beside it: the layer was pulled from a
    /// compressed blob) is unreadable or does not fit the layer: its blocks cannot be fetched.
    #[error(
        "{}: the frame table of this partial layer is unusable: {why} (remove the partial copy and pull again)",
        path.display()
    )]
    FramesFile {
        /// The partial layer.
        path: PathBuf,
        /// What is wrong with the table.
        why: String,
    },
    /// A chunk of a partial layer's block hash table could not be fetched, or did not match its
    /// digest: the blocks whose hashes it holds cannot be checked, so they are not read.
    #[error("{}: hash table chunk {chunk} is not available: {why}", path.display())]
    HashChunk {
        /// The partial layer.
        path: PathBuf,
        /// The chunk's number in the layer's index.
        chunk: usize,
        /// Why it is not available (the fetch's error, or the digest mismatch).
        why: String,
    },
    /// A compressed blob of a layer cannot be used: its lengths or frame table are not the ones
    /// its image names or break the rules of docs/FORMAT.md ("Compressed layer blobs"), or the
    /// layer rebuilt from it is not the named one.
    #[error("compressed blob of layer {layer}: {why}")]
    CompressedBlob {
        /// The layer the blob encodes.
        layer: Digest,
        /// What is wrong with the blob.
        why: String,
    },
    /// A frame of a compressed blob does not decode to its block.
    #[error("compressed blob of layer {layer}: the frame of block {pblock} is refused: {why}")]
    CompressedFrame {
        /// The layer the blob encodes.
        layer: Digest,
        /// The block's physical number in the layer.
        pblock: u64,
        /// What is wrong with the frame.
        why: String,
    },
    /// A layer's content does not hash to the digest it is named by.
    #[error("{}: content hashes to {actual}, but the layer is named {expected}", path.display())]
    LayerDigest {
        /// The layer file.
        path: PathBuf,
        /// The digest it is named by.
        expected: Digest,
        /// The digest of its content.
        actual: Digest,
    },
    /// A layer was made on another stack than the one it is placed on.
    #[error("{}: layer was made on stack {recorded}, but is placed on stack {actual}", path.display())]
    WrongParent {
        /// The layer (or top) file.
        path: PathBuf,
        /// The chain digest it records as its parent.
        recorded: Digest,
        /// The chain digest of the stack it is placed on.
        actual: Digest,
    },
    /// Block size or virtual size of a layer differs from its disk's.
    #[error("{}: {what} is {found}, the disk's is {expected}", path.display())]
    Mismatch {
        /// The layer (or top) file.
        path: PathBuf,
        /// Which size differs.
        what: &'static str,
        /// The layer's value.
        found: u64,
        /// The disk's value.
        expected: u64,
    },
    /// A batch in the middle of a top's journal is damaged: a whole batch follows it, so what
    /// follows is committed data, not the debris of a crash. Nothing may cut it away.
    #[error(
        "{}: journal is corrupt: the batch at byte {offset} (after {good_batches} good batches) is \
         damaged, but a whole batch follows at byte {next_whole}; a writable open would cut off \
         committed writes, so it is refused (a read-only open shows the disk as of the last good \
         batch)",
        path.display()
    )]
    JournalCorrupt {
        /// The journal.
        path: PathBuf,
        /// Where the damaged batch starts.
        offset: u64,
        /// The whole batches before it.
        good_batches: u64,
        /// Where the next whole batch starts.
        next_whole: u64,
    },
    /// A sealed layer the stack needs is not in the store (not even as a partial copy).
    #[error("layer {digest} is not in the store {}", store.display())]
    LayerMissing {
        /// The layer.
        digest: Digest,
        /// The store's directory.
        store: PathBuf,
    },
    /// A layer is in the store only as a partial copy, and the disk was opened without a
    /// source to fetch its missing blocks from.
    #[error(
        "layer {digest} is only partly in the store {} and no source to fetch the rest from was given",
        store.display()
    )]
    LayerPartial {
        /// The layer.
        digest: Digest,
        /// The store's directory.
        store: PathBuf,
    },
    /// A layer file of the other kind where one kind was expected (a top for a sealed layer, or
    /// the reverse).
    #[error("{}: not a {expected} (it is a {found})", path.display())]
    WrongKind {
        /// The layer file.
        path: PathBuf,
        /// The kind wanted.
        expected: &'static str,
        /// The kind the file is.
        found: &'static str,
    },
    /// A top's journal was made for another top (its instance or block size differ).
    #[error("{}: journal belongs to another top layer", path.display())]
    ForeignJournal {
        /// The journal.
        path: PathBuf,
    },
    /// A disk directory already holds a disk.
    #[error("{} already holds a disk", dir.display())]
    DiskExists {
        /// The disk directory.
        dir: PathBuf,
    },
    /// A disk's manifest names no writable top.
    #[error("{}: the manifest names no writable top", dir.display())]
    NoTop {
        /// The disk directory.
        dir: PathBuf,
    },
    /// Another process has the top layer open.
    #[error("{}: in use by another process (the file is locked)", path.display())]
    Locked {
        /// The locked file.
        path: PathBuf,
    },
    /// A request reaches past the end of the disk.
    #[error("range {offset}+{len} is past the end of the disk ({size} bytes)")]
    OutOfRange {
        /// Where the request starts, in bytes.
        offset: u64,
        /// Its length.
        len: u64,
        /// The disk's size.
        size: u64,
    },
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
            Error::LayerMissing { .. } | Error::LayerPartial { .. } | Error::NoTop { .. } => {
                io::ErrorKind::NotFound
            }
            Error::DiskExists { .. } => io::ErrorKind::AlreadyExists,
            _ => io::ErrorKind::InvalidData,
        }
    }

    /// True where the error means on-disk corruption (as opposed to I/O or usage errors).
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            Error::Format { .. }
                | Error::BlockChecksum { .. }
                | Error::ChunkList { .. }
                | Error::FramesFile { .. }
                | Error::LayerDigest { .. }
                | Error::WrongParent { .. }
                | Error::Mismatch { .. }
                | Error::JournalCorrupt { .. }
                | Error::WrongKind { .. }
                | Error::ForeignJournal { .. }
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
