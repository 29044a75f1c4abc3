//! The `Remote` trait: content-addressed blobs plus tagged manifests, as every backend offers
//! them, and `open_remote`, which picks the backend for a reference.

use std::path::Path;
use std::sync::Arc;

use mcow_format::Digest;

use crate::error::Result;
use crate::http_client::{MultiSink, Sink, collect_range, stream_ranges_one_by_one};
use crate::reference::{Location, Reference};

/// Blob and manifest storage. Implementations retry transient failures themselves (see
/// `retry`) and report an error only after their bounded retries.
pub trait Remote: Send + Sync {
    /// A short name for messages and logs.
    fn describe(&self) -> String;
    fn has_blob(&self, digest: &Digest) -> Result<bool>;
    /// Uploads the local file `path` as blob `digest` (the caller has hashed it). `progress` gets
    /// bytes sent so far.
    fn put_blob(&self, digest: &Digest, path: &Path, progress: &mut dyn FnMut(u64)) -> Result<()>;
    /// Uploads a small blob from memory.
    fn put_blob_bytes(&self, digest: &Digest, bytes: &[u8]) -> Result<()>;
    /// Streams exactly `len` bytes at `offset` of blob `digest` to `sink`, in order, as they
    /// arrive (a short answer is an error; after a transient failure midway the rest is asked
    /// for again). Stops early, without error, when `sink` returns false.
    fn stream_blob_range(&self, digest: &Digest, offset: u64, len: u64, sink: &mut Sink<'_>) -> Result<()>;
    /// Streams several ranges (offset, length) of blob `digest` to `sink` (the range's index
    /// and consecutive pieces of it). Backends that can ask for them in one request do (OCI
    /// registries, plain HTTP); others ask one range at a time. Stops early when `sink`
    /// returns false. Returns the number of requests made.
    fn stream_blob_ranges(
        &self,
        digest: &Digest,
        ranges: &[(u64, u64)],
        sink: &mut MultiSink<'_>,
    ) -> Result<u64> {
        stream_ranges_one_by_one(ranges, sink, |o, l, s| self.stream_blob_range(digest, o, l, s))
    }
    /// Exactly `len` bytes at `offset` of blob `digest`, in memory.
    fn get_blob_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Vec<u8>> {
        collect_range(len, |sink| self.stream_blob_range(digest, offset, len, sink))
    }
    /// A whole small blob (manifests' configs, traces).
    fn get_blob(&self, digest: &Digest) -> Result<Vec<u8>>;
    /// Downloads blob `digest` into `dest` (the caller verifies it). `progress` gets bytes so far.
    fn get_blob_to(&self, digest: &Digest, dest: &Path, progress: &mut dyn FnMut(u64)) -> Result<()>;
    /// Stores a manifest under `tag`.
    fn put_manifest(&self, tag: &str, bytes: &[u8]) -> Result<()>;
    /// The manifest bytes for `tag`, or for `digest` when given.
    fn get_manifest(&self, tag: &str, digest: Option<&Digest>) -> Result<Vec<u8>>;
    /// Ends this backend's work for good, for the end of a process: operations in flight stop
    /// at once (their waits and blocked reads are interrupted) and fail with
    /// `RemoteError::Cancelled`, as do later ones. Backends without network do nothing.
    fn cancel(&self) {}
}

/// Opens the backend a reference names.
pub fn open_remote(reference: &Reference) -> Result<Arc<dyn Remote>> {
    match &reference.location {
        Location::File(dir) => Ok(Arc::new(crate::layout::Layout::new(crate::file::DirStore::new(dir)))),
        Location::S3 { bucket, prefix } => {
            Ok(Arc::new(crate::layout::Layout::new(crate::s3::S3Store::from_env(bucket, prefix)?)))
        }
        Location::Registry { base, repository } => {
            Ok(Arc::new(crate::registry::Registry::new(base, repository)))
        }
        Location::Http(base) => Ok(Arc::new(crate::layout::Layout::new(crate::http::HttpStore::new(base)))),
    }
}
