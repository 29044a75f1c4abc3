//! An mcow disk image as an OCI artifact: an image manifest whose config describes the disk and
//! whose layers are the sealed layer files, bottom first. Media types and fields are specified
//! in docs/FORMAT.md ("Disk images in registries").

use std::collections::BTreeMap;

use mcow_format::{Digest, check_virtual_size};
use serde::{Deserialize, Serialize};

use crate::error::{RemoteError, Result};

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const ARTIFACT_TYPE: &str = "application/vnd.mcow.disk.v1";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.mcow.disk.config.v1+json";
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.mcow.layer.v1";
/// Media type of a trace blob (see [`Trace`]).
pub const TRACE_MEDIA_TYPE: &str = "application/vnd.mcow.trace.v1+json";
/// Annotation on each layer descriptor: the digest of the layer's index (see FORMAT.md).
pub const INDEX_DIGEST_ANNOTATION: &str = "dev.mcow.layer.index-digest";

/// An OCI content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The OCI image manifest of a disk image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    pub media_type: String,
    pub artifact_type: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// What the config blob records about each layer: enough to check a partial copy before any
/// data block is fetched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerRecord {
    pub digest: Digest,
    pub size: u64,
    /// SHA-256 of the layer's first 4096 bytes (its header).
    pub header_digest: Digest,
    /// The layer trailer's index digest (over the extent index and block hash table).
    pub index_digest: Digest,
    /// Bytes from the start of the extent index to the end of the layer (index, block hash
    /// table, trailer), so a lazy pull fetches the header and this tail in parallel. Checked
    /// like everything else: the tail must hash to `index_digest` and end in a trailer that
    /// agrees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail_len: Option<u64>,
}

/// The config blob of a disk image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub virtual_size: u64,
    pub block_size: u32,
    /// Bottom first, the same order as the manifest's layers.
    pub layers: Vec<LayerRecord>,
    /// The blob of a [`Trace`] recorded for this image, if one was pushed with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<Descriptor>,
}

/// The order in which a run (for example a VM boot) first read the disk's blocks: lazy
/// serving fetches them in this order in the background.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trace {
    pub block_size: u32,
    /// Virtual block numbers, each once, in first-read order.
    pub blocks: Vec<u64>,
}

impl Trace {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("trace serializes")
    }

    /// Parses a trace and checks that some disk could have it: a valid block size, and blocks
    /// within the largest virtual size, so that runs of them (`block + count`) cannot overflow.
    pub fn parse(bytes: &[u8]) -> Result<Trace> {
        let bad = |e: &dyn std::fmt::Display| RemoteError::Invalid(format!("bad trace: {e}"));
        let t: Trace = serde_json::from_slice(bytes).map_err(|e| bad(&e))?;
        mcow_format::check_block_size(t.block_size).map_err(|e| bad(&e))?;
        let bs = u64::from(t.block_size);
        let fits = |b: u64| {
            b.checked_add(1)
                .and_then(|n| n.checked_mul(bs))
                .is_some_and(|end| check_virtual_size(end).is_ok())
        };
        if let Some(b) = t.blocks.iter().find(|&&b| !fits(b)) {
            return Err(bad(&format!("block {b} lies past the largest virtual size")));
        }
        Ok(t)
    }
}

impl Manifest {
    pub fn new(config: Descriptor, layers: Vec<Descriptor>) -> Manifest {
        Manifest {
            schema_version: 2,
            media_type: MANIFEST_MEDIA_TYPE.to_string(),
            artifact_type: ARTIFACT_TYPE.to_string(),
            config,
            layers,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("manifest serializes")
    }

    /// Parses and checks that this is an mcow disk image manifest.
    pub fn parse(bytes: &[u8]) -> Result<Manifest> {
        let m: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| RemoteError::Invalid(format!("not an image manifest: {e}")))?;
        if m.schema_version != 2
            || m.artifact_type != ARTIFACT_TYPE
            || m.config.media_type != CONFIG_MEDIA_TYPE
        {
            return Err(RemoteError::Invalid(format!(
                "not an mcow disk image (artifactType {:?}, config {:?})",
                m.artifact_type, m.config.media_type
            )));
        }
        if m.layers.iter().any(|l| l.media_type != LAYER_MEDIA_TYPE) {
            return Err(RemoteError::Invalid("a layer of the image is not an mcow layer".into()));
        }
        Ok(m)
    }
}

impl DiskConfig {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("config serializes")
    }

    /// Parses a config and checks it agrees with the manifest's layer list.
    pub fn parse(bytes: &[u8], manifest: &Manifest) -> Result<DiskConfig> {
        let c: DiskConfig = serde_json::from_slice(bytes)
            .map_err(|e| RemoteError::Invalid(format!("bad disk image config: {e}")))?;
        let agree = c.layers.len() == manifest.layers.len()
            && c.layers.iter().zip(&manifest.layers).all(|(r, d)| r.digest == d.digest && r.size == d.size);
        if !agree {
            return Err(RemoteError::Invalid("the image config and manifest list different layers".into()));
        }
        mcow_format::check_block_size(c.block_size).map_err(|e| RemoteError::Invalid(e.to_string()))?;
        mcow_format::check_virtual_size(c.virtual_size).map_err(|e| RemoteError::Invalid(e.to_string()))?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tried: traces whose block numbers end past u64 when the serve's prefetch groups them
    /// into runs (`start + count`, the shape the trace fuzz target checks), or whose block size
    /// no disk has. Must hold: each is a clean `Invalid` error, and a trace of a real disk's
    /// blocks still parses.
    #[test]
    fn refuses_traces_no_disk_could_have() {
        let good = br#"{"block_size":65536,"blocks":[0,1,2,17,137438953471]}"#;
        assert_eq!(Trace::parse(good).unwrap().blocks.len(), 5);
        for bad in [
            r#"{"block_size":65536,"blocks":[18446744073709551615,0]}"#,
            r#"{"block_size":65536,"blocks":[137438953472]}"#,
            r#"{"block_size":4096,"blocks":[3,18446744073709551614]}"#,
            r#"{"block_size":0,"blocks":[]}"#,
            r#"{"block_size":1000,"blocks":[1]}"#,
        ] {
            assert!(matches!(Trace::parse(bad.as_bytes()), Err(RemoteError::Invalid(_))), "{bad}");
        }
    }
}
