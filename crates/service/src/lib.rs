//! `mcow-service`: serving mcow disks over NBD, as a library that programs other than the
//! `mcow` binary can embed.
//!
//! - [`export`]: an engine [`Disk`](mcow_engine::Disk) as an NBD export ([`DiskExport`]), with
//!   the `mcow:allocation-depth` metadata context ([`DEPTH_CONTEXT`]).
//! - [`trace`]: recording the order of first reads ([`TraceRecorder`]) for boot traces.
//! - [`prefetch`]: background fetching of a lazy disk's trace and, optionally, of the rest.
//! - [`listen`]: binding TCP and Unix listeners and serving a [`mcow_nbd::Server`] on them.
//! - [`image`]: what a `[NAME=]DISK|REF` names, and images pulled lazily into a cache.
//! - [`service`]: a host service ([`Service`]): one NBD server whose exports (engine disks,
//!   shared between exports of one directory) are added and removed while it serves.
//! - [`control`]: the service's control API, HTTP with JSON on a Unix socket ([`Control`]).
//! - [`metrics`]: the service's metrics in Prometheus text format (`GET /metrics`).
//!
//! The crate installs no signal handler and holds no process-global state: the embedding
//! program stops a server with its [`ShutdownHandle`](mcow_nbd::ShutdownHandle).
//!
//! ```no_run
//! use std::sync::Arc;
//! use mcow_engine::{Disk, Engine, OpenOptions};
//! use mcow_service::{DiskExport, ListenOn, Listening};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let opts = OpenOptions { read_only: false, verify: true, force_share: false };
//! let disk = Arc::new(Disk::open_in(&Engine::default(), "vm".as_ref(), opts)?);
//! let server = Arc::new(mcow_nbd::Server::new());
//! server.add_export("vm", "my disk", Arc::new(DiskExport::new(disk)))?;
//! let on = ListenOn { socket: Some("/tmp/vm.sock".into()), ..ListenOn::default() };
//! let listening = Listening::start(&server, &on)?;
//! // Elsewhere (a signal handler thread, say): stop it, then wait.
//! server.shutdown_handle().stop();
//! listening.join()?;
//! # Ok(())
//! # }
//! ```

pub mod control;
pub mod error;
pub mod export;
pub mod fetch_options;
pub mod image;
pub mod listen;
pub mod metrics;
pub mod prefetch;
pub mod service;
pub mod trace;

pub use control::Control;
pub use error::ServiceError;
pub use export::{DEPTH_CONTEXT, DiskExport};
pub use fetch_options::{FetchOptions, FetchSettings};
pub use listen::{Inherited, ListenOn, Listening};
pub use prefetch::background_fetch;
pub use service::{
    AddExport, Added, ExportInfo, SavedExport, Service, ServiceConfig, SnapshotInfo, load_state,
};
pub use trace::TraceRecorder;
