//! An mcow disk image as an OCI artifact: an image manifest whose config describes the disk and
//! whose layers are the sealed layer files, bottom first, then the image's trace blob (if any),
//! so that every blob the image needs is reachable from the manifest. A layer travels as its
//! file or as a compressed blob (its record then names the layer by `diff_id`). Media types and
//! fields are specified in docs/FORMAT.md ("Disk images in registries").

use std::collections::BTreeMap;

use mcow_engine::chunks::IndexChunks;
use mcow_format::{BlobLayout, Digest, TRAILER_SIZE, check_virtual_size};
use serde::{Deserialize, Serialize};

use crate::error::{RemoteError, Result};

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const ARTIFACT_TYPE: &str = "application/vnd.mcow.disk.v1";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.mcow.disk.config.v1+json";
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.mcow.layer.v1";
/// Media type of a layer pushed as a compressed blob (see [`LayerRecord::diff_id`]).
pub const COMPRESSED_LAYER_MEDIA_TYPE: &str = "application/vnd.mcow.layer.v1+zstd";
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
    /// The OCI `layers` list: the disk's layers (bottom first), then the trace's descriptor if
    /// the image has one. Read them with [`Manifest::disk_layers`] and [`Manifest::trace`].
    pub layers: Vec<Descriptor>,
}

/// What the config blob records about each layer: enough to check a partial copy before any
/// data block is fetched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerRecord {
    /// The blob's digest and size: the layer file's, or for a layer pushed compressed, its
    /// compressed blob's (the layer's own are then `diff_id` and `diff_size`).
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
    /// The layer's index region (extent index, then block hash table) cut into chunks with a
    /// digest each, so that a lazy pull fetches the extent index's chunks only and the hash
    /// table later, chunk by chunk, each checked (see [`IndexChunksRecord`]). Needs `tail_len`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_chunks: Option<IndexChunksRecord>,
    /// For a layer pushed as a compressed blob (all three of these or none, and only with
    /// `tail_len`): the layer's own digest, its name in a store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_id: Option<Digest>,
    /// The layer's own length (the blob's is `size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_size: Option<u64>,
    /// SHA-256 of the compressed blob's frame table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame_table_digest: Option<Digest>,
}

/// What a [`LayerRecord`] of a compressed blob says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compressed {
    pub diff_id: Digest,
    pub diff_size: u64,
    pub frame_table_digest: Digest,
    pub tail_len: u64,
}

impl LayerRecord {
    /// The layer's digest, its name in a store and in a disk's stack: `diff_id` for a
    /// compressed blob, else the blob's digest.
    pub fn layer_digest(&self) -> Digest {
        self.diff_id.unwrap_or(self.digest)
    }

    /// The layer's length: `diff_size` for a compressed blob, else the blob's size.
    pub fn layer_size(&self) -> u64 {
        self.diff_size.unwrap_or(self.size)
    }

    /// The compressed blob's fields, if the record is of one (and complete: see
    /// [`DiskConfig::parse`], which refuses a record with only some of them).
    pub fn compressed(&self) -> Option<Compressed> {
        match (self.diff_id, self.diff_size, self.frame_table_digest, self.tail_len) {
            (Some(diff_id), Some(diff_size), Some(frame_table_digest), Some(tail_len)) => {
                Some(Compressed { diff_id, diff_size, frame_table_digest, tail_len })
            }
            _ => None,
        }
    }

    /// The media type of the manifest descriptor of this record's blob.
    pub fn media_type(&self) -> &'static str {
        if self.diff_id.is_some() { COMPRESSED_LAYER_MEDIA_TYPE } else { LAYER_MEDIA_TYPE }
    }

    /// Checks the compressed blob's fields: all three or none, only with `tail_len`, and
    /// lengths that fit a blob of `size` bytes (see [`BlobLayout::new`]).
    fn check_compressed(&self, block_size: u32) -> std::result::Result<(), String> {
        let present = [self.diff_id.is_some(), self.diff_size.is_some(), self.frame_table_digest.is_some()];
        if present == [false; 3] {
            return Ok(());
        }
        if present != [true; 3] {
            return Err("has some of diff_id, diff_size and frame_table_digest but not all three".into());
        }
        let Some(c) = self.compressed() else {
            return Err("is of a compressed blob but has no tail length".into());
        };
        BlobLayout::new(block_size, c.diff_size, c.tail_len, self.size).map(|_| ()).map_err(|e| {
            format!(
                "diff_size {} and tail_len {} do not fit a blob of {} bytes: {e}",
                c.diff_size, c.tail_len, self.size
            )
        })
    }
}

/// The `index_chunks` of a [`LayerRecord`]: chunks of `size` bytes (the last one shorter) of
/// the layer's index region, the SHA-256 of each, and the layer's extent count (which says
/// which chunks hold the extent index, before the trailer is fetched).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexChunksRecord {
    pub size: u64,
    pub extent_count: u64,
    pub digests: Vec<Digest>,
}

impl IndexChunksRecord {
    pub fn from_chunks(c: &IndexChunks) -> IndexChunksRecord {
        IndexChunksRecord { size: c.size, extent_count: c.extent_count, digests: c.digests.clone() }
    }

    pub fn to_chunks(&self) -> IndexChunks {
        IndexChunks { size: self.size, extent_count: self.extent_count, digests: self.digests.clone() }
    }
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
    /// The manifest of an image of the disk layers `layers` (bottom first) and, if given, a
    /// trace (listed after the layers).
    pub fn new(config: Descriptor, layers: Vec<Descriptor>, trace: Option<Descriptor>) -> Manifest {
        Manifest {
            schema_version: 2,
            media_type: MANIFEST_MEDIA_TYPE.to_string(),
            artifact_type: ARTIFACT_TYPE.to_string(),
            config,
            layers: layers.into_iter().chain(trace).collect(),
        }
    }

    /// The disk's layers, bottom first: the `layers` entries without the trace.
    pub fn disk_layers(&self) -> &[Descriptor] {
        match self.layers.split_last() {
            Some((last, rest)) if last.media_type == TRACE_MEDIA_TYPE => rest,
            _ => &self.layers,
        }
    }

    /// The trace's descriptor, if the manifest lists one (the last `layers` entry).
    pub fn trace(&self) -> Option<&Descriptor> {
        self.layers.last().filter(|d| d.media_type == TRACE_MEDIA_TYPE)
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
        // Disk layers, then at most one trace, last.
        let is_layer =
            |l: &Descriptor| l.media_type == LAYER_MEDIA_TYPE || l.media_type == COMPRESSED_LAYER_MEDIA_TYPE;
        if !m.disk_layers().iter().all(is_layer) {
            let what = if m.disk_layers().iter().any(|l| l.media_type == TRACE_MEDIA_TYPE) {
                "the image lists a trace that is not its last layer entry".to_string()
            } else {
                "a layer of the image is not an mcow layer".to_string()
            };
            return Err(RemoteError::Invalid(what));
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
        let layers = manifest.disk_layers();
        let agree = c.layers.len() == layers.len()
            && c.layers.iter().zip(layers).all(|(r, d)| r.digest == d.digest && r.size == d.size);
        if !agree {
            return Err(RemoteError::Invalid("the image config and manifest list different layers".into()));
        }
        mcow_format::check_block_size(c.block_size).map_err(|e| RemoteError::Invalid(e.to_string()))?;
        for (r, d) in c.layers.iter().zip(layers) {
            let bad = |why: &str| {
                RemoteError::Invalid(format!("the image config's record of layer {}: {why}", r.digest))
            };
            r.check_compressed(c.block_size).map_err(|why| bad(&why))?;
            if r.media_type() != d.media_type {
                return Err(bad(&format!(
                    "it is {} a compressed blob, but the manifest's media type is {:?}",
                    if r.diff_id.is_some() { "of" } else { "not of" },
                    d.media_type
                )));
            }
        }
        if let Some(t) = &c.trace
            && t.media_type != TRACE_MEDIA_TYPE
        {
            return Err(RemoteError::Invalid(format!(
                "the image config's trace has media type {:?}",
                t.media_type
            )));
        }
        // A trace in the manifest must be the config's; a config-only trace is an image pushed
        // before traces were listed in the manifest (still accepted).
        if let Some(m) = manifest.trace() {
            let same = c.trace.as_ref().is_some_and(|t| t.digest == m.digest && t.size == m.size);
            if !same {
                return Err(RemoteError::Invalid(
                    "the image config and manifest name different traces".into(),
                ));
            }
        }
        for r in &c.layers {
            let Some(chunks) = &r.index_chunks else { continue };
            let region = r.tail_len.and_then(|t| t.checked_sub(TRAILER_SIZE as u64));
            let Some(region) = region else {
                return Err(RemoteError::Invalid(format!(
                    "the image config's layer {} has index chunks but no (or too short a) tail length",
                    r.digest
                )));
            };
            chunks.to_chunks().check(region).map_err(|why| {
                RemoteError::Invalid(format!("the image config's index chunks of layer {}: {why}", r.digest))
            })?;
        }
        mcow_format::check_virtual_size(c.virtual_size).map_err(|e| RemoteError::Invalid(e.to_string()))?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(media_type: &str, seed: &[u8]) -> Descriptor {
        Descriptor {
            media_type: media_type.into(),
            digest: Digest::of(seed),
            size: seed.len() as u64,
            annotations: Default::default(),
        }
    }

    fn record(d: &Descriptor) -> LayerRecord {
        LayerRecord {
            digest: d.digest,
            size: d.size,
            header_digest: Digest::of(b"h"),
            index_digest: Digest::of(b"i"),
            tail_len: None,
            index_chunks: None,
            diff_id: None,
            diff_size: None,
            frame_table_digest: None,
        }
    }

    fn config_bytes(layers: &[Descriptor], trace: Option<&Descriptor>) -> Vec<u8> {
        DiskConfig {
            virtual_size: 1 << 20,
            block_size: 65536,
            layers: layers.iter().map(record).collect(),
            trace: trace.cloned(),
        }
        .to_bytes()
    }

    fn manifest(layers: Vec<Descriptor>) -> Vec<u8> {
        let mut m = Manifest::new(desc(CONFIG_MEDIA_TYPE, b"c"), vec![], None);
        m.layers = layers;
        m.to_bytes()
    }

    /// A manifest with a trace lists it last, after the disk layers: readers see the layers
    /// without it and the trace apart, and the config must name the same trace.
    #[test]
    fn the_trace_is_the_last_layers_entry_and_the_configs() {
        let (l0, l1, t) =
            (desc(LAYER_MEDIA_TYPE, b"l0"), desc(LAYER_MEDIA_TYPE, b"l1"), desc(TRACE_MEDIA_TYPE, b"t"));
        let m = Manifest::new(desc(CONFIG_MEDIA_TYPE, b"c"), vec![l0.clone(), l1.clone()], Some(t.clone()));
        let m = Manifest::parse(&m.to_bytes()).unwrap();
        assert_eq!(m.layers.len(), 3);
        assert_eq!(m.disk_layers(), &[l0.clone(), l1.clone()]);
        assert_eq!(m.trace(), Some(&t));
        let c = DiskConfig::parse(&config_bytes(&[l0.clone(), l1.clone()], Some(&t)), &m).unwrap();
        assert_eq!(c.trace, Some(t.clone()));

        // The config must name the manifest's trace: not another one, not none.
        let other = desc(TRACE_MEDIA_TYPE, b"other");
        let e = DiskConfig::parse(&config_bytes(&[l0.clone(), l1.clone()], Some(&other)), &m).unwrap_err();
        assert!(e.to_string().contains("different traces"), "{e}");
        let e = DiskConfig::parse(&config_bytes(&[l0.clone(), l1.clone()], None), &m).unwrap_err();
        assert!(e.to_string().contains("different traces"), "{e}");

        // Without a trace the layers are all disk layers.
        let plain = Manifest::parse(&manifest(vec![l0.clone()])).unwrap();
        assert_eq!((plain.disk_layers().len(), plain.trace()), (1, None));
    }

    /// An image pushed before traces were listed in the manifest names its trace in the config
    /// only: still accepted, with that trace.
    #[test]
    fn a_trace_named_by_the_config_only_is_accepted() {
        let (l0, t) = (desc(LAYER_MEDIA_TYPE, b"l0"), desc(TRACE_MEDIA_TYPE, b"t"));
        let m = Manifest::parse(&manifest(vec![l0.clone()])).unwrap();
        let c = DiskConfig::parse(&config_bytes(&[l0], Some(&t)), &m).unwrap();
        assert_eq!(c.trace, Some(t));
    }

    /// A trace anywhere but last, two traces, a layer of a foreign media type, or a config
    /// trace of another media type: each refused with a message that says which.
    #[test]
    fn misplaced_or_foreign_entries_are_refused() {
        let (l0, t) = (desc(LAYER_MEDIA_TYPE, b"l0"), desc(TRACE_MEDIA_TYPE, b"t"));
        for (layers, says) in [
            (vec![t.clone(), l0.clone()], "not its last layer entry"),
            (vec![l0.clone(), t.clone(), t.clone()], "not its last layer entry"),
            (vec![l0.clone(), desc("application/vnd.oci.image.layer.v1.tar", b"x")], "not an mcow layer"),
        ] {
            let e = Manifest::parse(&manifest(layers.clone())).unwrap_err();
            assert!(e.to_string().contains(says), "{layers:?}: {e}");
        }
        let m = Manifest::parse(&manifest(vec![l0.clone()])).unwrap();
        let odd = desc("application/json", b"t");
        let e = DiskConfig::parse(&config_bytes(&[l0], Some(&odd)), &m).unwrap_err();
        assert!(e.to_string().contains("media type"), "{e}");
    }

    /// Tried: configs whose layer records carry index chunks: a right one, one without a tail
    /// length, one with a digest too few, one with a chunk size that is not a power of two, one
    /// with more extents than the index holds, and one with an unknown field in the chunks.
    /// Must hold: the right one parses back equal; each other is refused with a message that
    /// says why.
    #[test]
    fn index_chunks_must_fit_the_layers_tail() {
        let l0 = desc(LAYER_MEDIA_TYPE, b"l0");
        let m = Manifest::parse(&manifest(vec![l0.clone()])).unwrap();
        let region = 3 * 16384 + 1024; // 4 chunks of 16 KiB (10 extents, 1558 hashes)
        let good = IndexChunksRecord {
            size: 16384,
            extent_count: 10,
            digests: (0..4u8).map(|i| Digest::of(&[i])).collect(),
        };
        let with = |tail: Option<u64>, chunks: IndexChunksRecord| {
            let mut r = record(&l0);
            r.tail_len = tail;
            r.index_chunks = Some(chunks);
            DiskConfig { virtual_size: 1 << 20, block_size: 65536, layers: vec![r], trace: None }.to_bytes()
        };
        let tail = Some(region + TRAILER_SIZE as u64);
        let c = DiskConfig::parse(&with(tail, good.clone()), &m).unwrap();
        assert_eq!(c.layers[0].index_chunks.as_ref(), Some(&good));
        let short = IndexChunksRecord { digests: good.digests[..3].to_vec(), ..good.clone() };
        let odd = IndexChunksRecord { size: 20000, ..good.clone() };
        let crowded = IndexChunksRecord { extent_count: region / 32 + 1, ..good.clone() };
        for (bytes, says) in [
            (with(None, good.clone()), "no (or too short a) tail length"),
            (with(tail, short), "3 chunk digests"),
            (with(tail, odd), "not a power of two"),
            (with(tail, crowded), "extents do not fit"),
        ] {
            let e = DiskConfig::parse(&bytes, &m).unwrap_err();
            assert!(e.to_string().contains(says), "{e}");
        }
        let text = String::from_utf8(with(tail, good)).unwrap().replace("\"size\"", "\"extra\":1,\"size\"");
        let e = DiskConfig::parse(text.as_bytes(), &m).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }

    /// Tried: configs with a record of a compressed blob: a right one (and its manifest entry
    /// of the `+zstd` media type), one with `diff_id` but no `frame_table_digest`, one without a
    /// tail length, one whose `diff_size` leaves a data region that is not whole blocks, one whose
    /// blob is too short for its frames, and both media type mismatches (a compressed record
    /// under a plain layer entry, a plain record under a `+zstd` entry). Must hold: the right one
    /// parses, names the layer by `diff_id` with the layer's length; each other is refused with a
    /// message that says what disagrees.
    #[test]
    fn compressed_records_must_be_whole_and_agree_with_the_manifest() {
        let tail = 128 + 32 + 2 * 32; // one extent, two blocks
        let diff_size = 4096 + 2 * 65536 + tail;
        let blob = Descriptor { size: 4096 + 2 * 30 + 24 + tail, ..desc(COMPRESSED_LAYER_MEDIA_TYPE, b"z") };
        let plain = desc(LAYER_MEDIA_TYPE, b"p");
        let good = LayerRecord {
            tail_len: Some(tail),
            diff_id: Some(Digest::of(b"layer")),
            diff_size: Some(diff_size),
            frame_table_digest: Some(Digest::of(b"table")),
            ..record(&blob)
        };
        let parse = |d: &Descriptor, r: LayerRecord| {
            let m = Manifest::parse(&manifest(vec![d.clone()])).unwrap();
            let c = DiskConfig { virtual_size: 1 << 20, block_size: 65536, layers: vec![r], trace: None };
            DiskConfig::parse(&c.to_bytes(), &m)
        };
        let c = parse(&blob, good.clone()).unwrap();
        let r = &c.layers[0];
        assert_eq!((r.layer_digest(), r.layer_size()), (Digest::of(b"layer"), diff_size));
        assert_eq!(r.compressed().map(|c| c.frame_table_digest), Some(Digest::of(b"table")));
        let p = parse(&plain, record(&plain)).unwrap();
        assert_eq!((p.layers[0].layer_digest(), p.layers[0].compressed()), (plain.digest, None));

        let blob_as_plain = Descriptor { media_type: LAYER_MEDIA_TYPE.into(), ..blob.clone() };
        for (d, r, says) in [
            (&blob, LayerRecord { frame_table_digest: None, ..good.clone() }, "not all three"),
            (&blob, LayerRecord { tail_len: None, ..good.clone() }, "no tail length"),
            (&blob, LayerRecord { diff_size: Some(diff_size + 1), ..good.clone() }, "not whole blocks"),
            (
                &Descriptor { size: 4096 + 24 + tail, ..blob.clone() },
                LayerRecord { size: 4096 + 24 + tail, ..good.clone() },
                "too short",
            ),
            (&blob_as_plain, good.clone(), "media type"),
            (&blob, LayerRecord { tail_len: Some(tail), ..record(&blob) }, "media type"),
        ] {
            let e = parse(d, r.clone()).unwrap_err();
            assert!(e.to_string().contains(says), "{r:?}: {e}");
        }
    }

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
