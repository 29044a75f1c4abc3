//! `mcow-nbd`: an NBD (Network Block Device) server library.
//!
//! Two modules, one per concern:
//! - [`proto`] is the wire codec: constants, option and request decoding, reply
//!   encoding, over byte slices, with no I/O.
//! - [`server`] is the transport: TCP and Unix listeners, admission limits, a thread per
//!   connection (up to a few while it has requests in flight), orderly shutdown.
//!
//! What is served is anything implementing [`Export`]; this crate knows nothing of the
//! mcow engine. [`MemExport`] is an in-memory export for tests, fuzzing and examples.
//! [`fuzz`] holds the entry points the cargo-fuzz targets call.
//!
//! ```no_run
//! use std::sync::Arc;
//! use mcow_nbd::{MemExport, Server};
//!
//! let server = Server::new();
//! server.add_export("disk", "a 1 GiB scratch disk", Arc::new(MemExport::new(1 << 30)))?;
//! let stop = server.shutdown_handle();
//! // Elsewhere (a signal handler thread, say): stop.stop();
//! # stop.stop();
//! server.serve_tcp("127.0.0.1:10809")?;
//! # Ok::<(), mcow_nbd::ServerError>(())
//! ```
//!
//! The protocol is the one described in `doc/proto.md` of the NetworkBlockDevice/nbd
//! project: fixed newstyle negotiation, structured replies, metadata contexts
//! (`base:allocation` plus export-defined ones), and the `WRITE_ZEROES`, `FAST_ZERO`,
//! `CACHE` and `BLOCK_STATUS` commands. TLS and extended headers are not offered.

pub mod export;
pub mod fuzz;
pub mod mem;
pub mod proto;
pub mod server;

pub use export::{Export, Parts};
pub use mem::MemExport;
pub use proto::{BlockSizes, StatusExtent};
pub use server::{
    ExportStatus, LATENCY_BUCKETS, RemovedExport, Server, ServerConfig, ServerError, ShutdownHandle,
};
