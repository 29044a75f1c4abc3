//! Where mcow layers live when they are not local, and how they move.
//!
//! Modules:
//! - `range`: the one range-reading abstraction (`RangeRead`, its sinks and defaults) that
//!   `Remote` and `layout::ObjectStore` extend;
//! - `reference`: parsing `file://`, `http(s)://`, `oci://` and `s3://` references;
//! - `image`: the OCI image manifest and config that describe an mcow disk image, with our
//!   media types (specified in docs/FORMAT.md, "Disk images in registries");
//! - `remote`: the `Remote` trait (blobs and manifests); `open_remote`, here in the crate root,
//!   picks the backend a reference names;
//! - `layout` (+ `file`): an OCI image layout over any object store, on a local directory;
//! - `http`: the layout served read-only by any web server;
//! - `http_client`: the HTTP plumbing the `http`, `registry` and `s3` backends share, in
//!   `client` (agent, configuration, error mapping), `ranges` (range requests), `multipart`
//!   (multi-range answers, the `multipart/byteranges` parser) and `auth` (`WWW-Authenticate`,
//!   `Basic`/`Bearer`);
//! - `registry`: the OCI distribution API (registries such as Debian's docker-registry);
//! - `s3`: S3-compatible object storage (SigV4-signed requests) as a layout's object store;
//! - `retry`: how long remote operations may take: retries with jittered backoff for transient
//!   failures under one time budget, the pace response bodies must keep, and the cancel that
//!   ends a client's work at the end of a process;
//! - `locations`: which registry repositories hold each blob, remembered per layer store, so
//!   that pushes mount blobs across repositories instead of uploading them;
//! - `transfer`: push, pull, lazy pull, `RemoteSource`, the engine's `BlockSource` that
//!   fetches blocks of partial layers from a remote, and `Sources`, the caller's registry of
//!   one source per origin (no process-global state).
//!
//! It does not own the layer format, block verification or caching (the engine checks every
//! fetched block against its hash and keeps the good ones), nor any front end.

mod error;
pub mod file;
pub mod http;
pub mod http_client;
pub mod image;
pub mod layout;
pub mod locations;
pub mod range;
pub mod reference;
pub mod registry;
pub mod remote;
pub mod retry;
pub mod s3;
pub mod transfer;

pub use error::{RemoteError, Result};
pub use range::RangeRead;
pub use reference::{InsecureRegistries, Reference};
pub use remote::Remote;
pub use transfer::{LazyOrigin, RemoteSource, Sources, pull, push};

/// Opens the backend a reference names.
pub fn open_remote(reference: &Reference) -> Result<std::sync::Arc<dyn Remote>> {
    use reference::Location;
    use std::sync::Arc;
    match &reference.location {
        Location::File(dir) => Ok(Arc::new(layout::Layout::new(file::DirStore::new(dir)))),
        Location::S3 { bucket, prefix } => {
            Ok(Arc::new(layout::Layout::new(s3::S3Store::from_env(bucket, prefix)?)))
        }
        Location::Registry { base, repository } => Ok(Arc::new(registry::Registry::new(base, repository))),
        Location::Http(base) => Ok(Arc::new(layout::Layout::new(http::HttpStore::new(base)))),
    }
}
