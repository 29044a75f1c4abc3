//! The disk manifest: a small JSON file naming a disk's sealed layers and its writable top.
//!
//! Owns: the manifest's fields and their validation. Does not own: where the manifest lives,
//! nor opening the layers it names.

use serde::{Deserialize, Serialize};

use crate::{Digest, FormatError, header};

/// Value of the `format` field.
pub const MANIFEST_FORMAT: &str = "mcow-disk";
/// Value of the `version` field this build writes and reads.
pub const MANIFEST_VERSION: u32 = 1;

/// A disk: an ordered stack of sealed layers (bottom first) plus one writable top.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskManifest {
    pub format: String,
    pub version: u32,
    pub virtual_size: u64,
    pub block_size: u32,
    /// Directory holding sealed layers as `blobs/sha256/<hex>`; relative paths are relative to
    /// the directory holding the manifest.
    pub store: String,
    /// Sealed layers, bottom to top.
    pub layers: Vec<Digest>,
    /// File name of the writable top inside the disk directory (its journal is `<top>.journal`);
    /// `None` for a read-only stack with no top.
    pub top: Option<String>,
    /// Tops frozen by snapshots and not sealed yet, oldest first: they lie between `layers` and
    /// `top` (FORMAT.md, "Snapshots of a running disk"). Written only when not empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frozen: Vec<String>,
    /// The parent the lowest unsealed top records, where it is not the chain digest of
    /// `layers` (a frozen top below it was sealed since). Written only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_base: Option<Digest>,
}

/// What a top above frozen top `F` counts `F` as in its parent: `sha256("mcow-frozen-top" ||
/// instance(F))`. Its parent is then `sha256(parent(F) || placeholder(F))`.
pub fn frozen_placeholder(instance: &[u8; 16]) -> Digest {
    let mut buf = Vec::with_capacity(31);
    buf.extend_from_slice(b"mcow-frozen-top");
    buf.extend_from_slice(instance);
    Digest::of(&buf)
}

impl DiskManifest {
    pub fn new(
        virtual_size: u64,
        block_size: u32,
        store: String,
        layers: Vec<Digest>,
        top: Option<String>,
    ) -> Self {
        DiskManifest {
            format: MANIFEST_FORMAT.to_string(),
            version: MANIFEST_VERSION,
            virtual_size,
            block_size,
            store,
            layers,
            top,
            frozen: Vec::new(),
            top_base: None,
        }
    }

    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("manifest serializes");
        s.push('\n');
        s
    }

    pub fn from_json(text: &[u8]) -> Result<DiskManifest, FormatError> {
        let m: DiskManifest =
            serde_json::from_slice(text).map_err(|e| FormatError::Manifest(e.to_string()))?;
        if m.format != MANIFEST_FORMAT {
            return Err(FormatError::Manifest(format!(
                "format is {:?}, expected {MANIFEST_FORMAT:?}",
                m.format
            )));
        }
        if m.version != MANIFEST_VERSION {
            return Err(FormatError::UnsupportedVersion(m.version));
        }
        header::check_block_size(m.block_size)?;
        header::check_virtual_size(m.virtual_size)?;
        for top in m.top.iter().chain(&m.frozen) {
            if top.is_empty() || top.contains('/') || top.starts_with('.') {
                return Err(FormatError::Manifest(format!("top {top:?} must be a plain file name")));
            }
        }
        if !m.frozen.is_empty() && m.top.is_none() {
            return Err(FormatError::Manifest("frozen tops without a top".into()));
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let m = DiskManifest::new(
            1 << 30,
            65536,
            "../layers".into(),
            vec![Digest::of(b"x")],
            Some("top-1.mcow".into()),
        );
        assert_eq!(DiskManifest::from_json(m.to_json().as_bytes()).unwrap(), m);
        // The snapshot fields are left out unless used, so older readers still read the rest.
        assert!(!m.to_json().contains("frozen") && !m.to_json().contains("top_base"));
        let mut s = m.clone();
        s.frozen = vec!["top-1.mcow".into()];
        s.top_base = Some(Digest::of(b"b"));
        assert_eq!(DiskManifest::from_json(s.to_json().as_bytes()).unwrap(), s);
    }

    #[test]
    fn rejects_bad_fields() {
        let good = DiskManifest::new(1 << 20, 65536, "s".into(), vec![], Some("t".into()));
        let mut bad = good.clone();
        bad.version = 9;
        assert!(DiskManifest::from_json(bad.to_json().as_bytes()).is_err());
        let mut bad = good.clone();
        bad.top = Some("../escape".into());
        assert!(DiskManifest::from_json(bad.to_json().as_bytes()).is_err());
        let mut bad = good.clone();
        bad.block_size = 1000;
        assert!(DiskManifest::from_json(bad.to_json().as_bytes()).is_err());
        let mut bad = good.clone();
        bad.frozen = vec!["../t".into()];
        assert!(DiskManifest::from_json(bad.to_json().as_bytes()).is_err());
        assert!(DiskManifest::from_json(b"{").is_err());
        assert!(DiskManifest::from_json(br#"{"format":"mcow-disk"}"#).is_err());
    }
}
