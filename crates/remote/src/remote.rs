//! The `Remote` trait: content-addressed blobs plus tagged manifests, as every backend offers
//! them. Byte ranges of blobs are read through its supertrait `RangeRead<Digest>` (see `range`);
//! which backend a reference names is `open_remote`'s (in the crate root).

use std::path::Path;

use mcow_format::Digest;

use crate::error::Result;
use crate::range::RangeRead;

/// Blob and manifest storage; byte ranges of blobs (by digest) through [`RangeRead`].
/// Implementations retry transient failures themselves (see `retry`) and report an error only
/// after their bounded retries.
pub trait Remote: RangeRead<Digest> {
    /// A short name for messages and logs.
    fn describe(&self) -> String;
    fn has_blob(&self, digest: &Digest) -> Result<bool>;
    /// Uploads the local file `path` as blob `digest` (the caller has hashed it). `progress` gets
    /// bytes sent so far.
    fn put_blob(&self, digest: &Digest, path: &Path, progress: &mut dyn FnMut(u64)) -> Result<()>;
    /// Uploads a small blob from memory.
    fn put_blob_bytes(&self, digest: &Digest, bytes: &[u8]) -> Result<()>;
    /// [`Remote::put_blob`], but first asks for the blob to be mounted from one of `from`,
    /// other repositories of the same registry said to hold it (a cross-repository mount:
    /// nothing is uploaded). Returns the repository it was mounted from, or `None` if it was
    /// uploaded. Backends without repositories upload.
    fn mount_or_put_blob(
        &self,
        digest: &Digest,
        path: &Path,
        from: &[String],
        progress: &mut dyn FnMut(u64),
    ) -> Result<Option<String>> {
        let _ = from;
        self.put_blob(digest, path, progress).map(|()| None)
    }
    /// [`Remote::mount_or_put_blob`] of a small blob from memory.
    fn mount_or_put_blob_bytes(
        &self,
        digest: &Digest,
        bytes: &[u8],
        from: &[String],
    ) -> Result<Option<String>> {
        let _ = from;
        self.put_blob_bytes(digest, bytes).map(|()| None)
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

    /// Retries this backend made so far (attempts of requests after their first, after
    /// transient failures). Backends without network retry nothing.
    fn retries(&self) -> u64 {
        0
    }
}
