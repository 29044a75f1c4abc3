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
    /// A thread of the service panicked.
    #[error("{0} thread panicked")]
    Panicked(&'static str),
}
