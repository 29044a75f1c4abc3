//! An OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/<hex>`) over any object
//! store: a local directory, a web server, an S3 bucket. Tags are the index's
//! `org.opencontainers.image.ref.name` annotations. A layout written to a directory can be
//! served as it is by a web server and read back through `http://`.

use std::path::Path;

use mcow_format::Digest;
use serde::{Deserialize, Serialize};

use crate::error::{RemoteError, Result};
use crate::image::{Descriptor, MANIFEST_MEDIA_TYPE};
use crate::range::{MultiSink, RangeRead, Sink};
use crate::remote::Remote;

/// Keyed object storage, the little a layout needs; byte ranges of objects (by key) through
/// [`RangeRead`].
pub trait ObjectStore: RangeRead<str> {
    fn describe(&self) -> String;
    fn exists(&self, key: &str) -> Result<bool>;
    /// Small objects; `Ok(None)` if missing.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    fn get_to(&self, key: &str, dest: &Path, progress: &mut dyn FnMut(u64)) -> Result<()>;
    fn put_bytes(&self, key: &str, bytes: &[u8]) -> Result<()>;
    fn put_file(&self, key: &str, path: &Path, progress: &mut dyn FnMut(u64)) -> Result<()>;
    /// Why this store holds no layout, for the error when its `index.json` is missing (a local
    /// directory says when it does not exist).
    fn why_no_layout(&self) -> String {
        "it has no index.json (no image was pushed there)".into()
    }
    /// See `Remote::cancel`.
    fn cancel(&self) {}
    /// See `Remote::retries`.
    fn retries(&self) -> u64 {
        0
    }
}

const REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ImageIndex {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

/// A layout on an object store.
pub struct Layout<S> {
    store: S,
}

impl<S: ObjectStore> Layout<S> {
    pub fn new(store: S) -> Layout<S> {
        Layout { store }
    }

    fn blob_key(d: &Digest) -> String {
        format!("blobs/sha256/{}", d.hex())
    }

    /// The index, or `None` if there is no `index.json`.
    fn read_index(&self) -> Result<Option<ImageIndex>> {
        match self.store.get("index.json")? {
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| RemoteError::Invalid(format!("{}: bad index.json: {e}", self.store.describe()))),
            None => Ok(None),
        }
    }

    /// The error for reading from a store without a layout.
    fn no_layout(&self) -> RemoteError {
        RemoteError::NoLayout { location: self.store.describe(), reason: self.store.why_no_layout() }
    }

    /// The index; an empty one if there is no `index.json` yet (for writing).
    fn index(&self) -> Result<ImageIndex> {
        match self.read_index()? {
            Some(index) => Ok(index),
            None => Ok(ImageIndex {
                schema_version: 2,
                media_type: Some("application/vnd.oci.image.index.v1+json".into()),
                manifests: vec![],
            }),
        }
    }
}

impl<S: ObjectStore> RangeRead<Digest> for Layout<S> {
    fn stream_range(&self, digest: &Digest, offset: u64, len: u64, sink: &mut Sink<'_>) -> Result<()> {
        self.store.stream_range(&Self::blob_key(digest), offset, len, sink)
    }

    fn stream_ranges(&self, digest: &Digest, ranges: &[(u64, u64)], sink: &mut MultiSink<'_>) -> Result<u64> {
        self.store.stream_ranges(&Self::blob_key(digest), ranges, sink)
    }
}

impl<S: ObjectStore> Remote for Layout<S> {
    fn describe(&self) -> String {
        self.store.describe()
    }

    fn has_blob(&self, digest: &Digest) -> Result<bool> {
        self.store.exists(&Self::blob_key(digest))
    }

    fn put_blob(&self, digest: &Digest, path: &Path, progress: &mut dyn FnMut(u64)) -> Result<()> {
        self.store.put_file(&Self::blob_key(digest), path, progress)
    }

    fn put_blob_bytes(&self, digest: &Digest, bytes: &[u8]) -> Result<()> {
        self.store.put_bytes(&Self::blob_key(digest), bytes)
    }

    fn get_blob(&self, digest: &Digest) -> Result<Vec<u8>> {
        self.store.get(&Self::blob_key(digest))?.ok_or_else(|| RemoteError::NotFound {
            what: format!("blob {digest}"),
            location: self.store.describe(),
        })
    }

    fn get_blob_to(&self, digest: &Digest, dest: &Path, progress: &mut dyn FnMut(u64)) -> Result<()> {
        self.store.get_to(&Self::blob_key(digest), dest, progress)
    }

    fn put_manifest(&self, tag: &str, bytes: &[u8]) -> Result<()> {
        let digest = Digest::of(bytes);
        self.store.put_bytes(&Self::blob_key(&digest), bytes)?;
        if !self.store.exists("oci-layout")? {
            self.store.put_bytes("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        let mut index = self.index()?;
        index.manifests.retain(|m| m.annotations.get(REF_NAME).map(String::as_str) != Some(tag));
        index.manifests.push(Descriptor {
            media_type: MANIFEST_MEDIA_TYPE.into(),
            digest,
            size: bytes.len() as u64,
            annotations: [(REF_NAME.to_string(), tag.to_string())].into(),
        });
        self.store.put_bytes("index.json", &serde_json::to_vec_pretty(&index).expect("index serializes"))
    }

    fn get_manifest(&self, tag: &str, digest: Option<&Digest>) -> Result<Vec<u8>> {
        let d = match digest {
            Some(d) => {
                return match self.get_blob(d) {
                    Err(RemoteError::NotFound { .. }) if !self.store.exists("index.json")? => {
                        Err(self.no_layout())
                    }
                    r => r,
                };
            }
            None => {
                let index = self.read_index()?.ok_or_else(|| self.no_layout())?;
                let tag_of = |m: &Descriptor| m.annotations.get(REF_NAME).cloned();
                match index.manifests.iter().rev().find(|m| tag_of(m).as_deref() == Some(tag)) {
                    Some(m) => m.digest,
                    None => {
                        let mut tags: Vec<String> = index.manifests.iter().filter_map(tag_of).collect();
                        tags.sort();
                        tags.dedup();
                        let there = if tags.is_empty() {
                            " (it has no tags)".to_string()
                        } else {
                            format!(" (its tags: {})", tags.join(", "))
                        };
                        return Err(RemoteError::NotFound {
                            what: format!("tag {tag}"),
                            location: format!("{}{there}", self.store.describe()),
                        });
                    }
                }
            }
        };
        self.get_blob(&d)
    }

    fn cancel(&self) {
        self.store.cancel()
    }

    fn retries(&self) -> u64 {
        self.store.retries()
    }
}
