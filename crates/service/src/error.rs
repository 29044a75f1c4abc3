//! The errors of this crate: one enum, each variant saying what was being done.

use std::io;

/// What went wrong while setting up or running a service.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Neither a TCP address nor a Unix socket was given.
    #[error("nothing to listen on: give a TCP address or a Unix socket")]
    NothingToListenOn,
    /// A listening socket could not be bound.
    #[error("listening on {addr}: {source}")]
    Bind {
        /// The address or path.
        addr: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The NBD server refused (a bad or duplicate name) or its listener failed.
    #[error("NBD server: {0}")]
    Server(#[from] mcow_nbd::ServerError),
    /// No export has that name.
    #[error("no export named {0:?}")]
    UnknownExport(String),
    /// An export already has that name.
    #[error("export name {0:?} is already used")]
    DuplicateExport(String),
    /// The disk is already served, and a second writable export of it is refused (a
    /// disk's writable top has one writer).
    #[error(
        "disk {} is already served as export {export:?}{}: a second export of it can only be read-only \
         (remove {export:?} first to serve it writable under another name)",
        dir.display(),
        if *read_only { " (read-only)" } else { "" }
    )]
    DiskInUse {
        /// The disk directory.
        dir: std::path::PathBuf,
        /// An export serving it.
        export: String,
        /// Whether that export's disk was opened read-only.
        read_only: bool,
    },
    /// An export of a disk already served asked for other fetch options than it was opened
    /// with.
    #[error(
        "disk {} is already served as export {export:?}, fetching with window {} blocks, read-ahead {} \
         bytes, prefetch {}, all {}: a second export of it fetches the same way (give no fetch \
         options, or these)",
        dir.display(), settings.window, settings.readahead, settings.prefetch, settings.all
    )]
    FetchOptionsDiffer {
        /// The disk directory.
        dir: std::path::PathBuf,
        /// An export serving it.
        export: String,
        /// How it fetches.
        settings: crate::fetch_options::FetchSettings,
    },
    /// A request's options are out of range or do not go together.
    #[error("bad options: {0}")]
    InvalidOptions(String),
    /// Opening a disk failed.
    #[error("opening disk {}{hint}: {source}", dir.display())]
    Open {
        /// The disk directory.
        dir: std::path::PathBuf,
        /// What to do about it, if anything helps (starts with a space).
        hint: &'static str,
        /// The cause.
        #[source]
        source: Box<mcow_remote::RemoteError>,
    },
    /// Reaching an image failed (a bad reference, the origin down, a missing tag).
    #[error("{what}: {source}")]
    Remote {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: Box<mcow_remote::RemoteError>,
    },
    /// Flushing a disk failed.
    #[error("flushing export {name:?}: {source}")]
    Flush {
        /// The export.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A snapshot of an export failed, or was refused (a read-only export).
    #[error("snapshot of export {name:?}: {source}")]
    Snapshot {
        /// The export.
        name: String,
        /// The cause.
        #[source]
        source: mcow_engine::Error,
    },
    /// A thread of the service panicked.
    #[error("{0} thread panicked")]
    Panicked(&'static str),
}
