//! Moving disk images: push (sealed layers, as their files or compressed blobs, config,
//! manifest), pull (whole layers, checked; a compressed blob rebuilt into its layer), lazy pull
//! (only each layer's header and index, or with index chunks only its extent index, and from a
//! compressed blob its frame table, checked against the pinned manifest),
//! `RemoteSource`, which fetches data blocks of partial layers on demand for the engine, and
//! `Sources`, the registry (held by the caller) that gives the disks of one origin one source.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use mcow_engine::chunks::{IndexChunks, MIN_CHUNK_SIZE};
use mcow_engine::store::LayerStore;
use mcow_engine::{BlockSource, CreateOptions, Disk, FetchPolicy, OpenOptions};
use mcow_format::{
    BlobLayout, Digest, FrameTable, FramesFile, HEADER_FIELDS_LEN, HEADER_SIZE, TRAILER_SIZE, Trailer,
};
use serde::{Deserialize, Serialize};

use crate::error::{RemoteError, Result};
use crate::image::{
    CONFIG_MEDIA_TYPE, Descriptor, DiskConfig, INDEX_DIGEST_ANNOTATION, IndexChunksRecord, LayerRecord,
    Manifest, TRACE_MEDIA_TYPE, Trace,
};
use crate::locations::{BlobLocations, Repository};
use crate::open_remote;
use crate::reference::{InsecureRegistries, Reference};
use crate::remote::Remote;

/// What a push did.
#[derive(Debug, Clone)]
pub struct PushReport {
    pub manifest_digest: Digest,
    pub layers: usize,
    /// Layers uploaded (the others were already there, or mounted).
    pub uploaded: usize,
    /// Layers mounted from another repository of the same registry (cross-repository mounts:
    /// linked by the registry, not uploaded).
    pub mounted: usize,
    /// Bytes of the blobs uploaded (compressed, for a compressed push).
    pub bytes_uploaded: u64,
    /// Bytes of the image's layers, as they are in a store.
    pub layer_bytes: u64,
    /// Bytes of the image's layer blobs at the remote: `layer_bytes` unless compressed.
    pub blob_bytes: u64,
    /// The zstd level the layers were compressed at, if they were.
    pub compressed: Option<i32>,
}

/// How to push (see [`push_with`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct PushOptions<'a> {
    /// A trace of first reads (a [`Trace`] file, as `mcow trace` writes) to push with the
    /// image, for lazy serving to prefetch in that order.
    pub trace: Option<&'a Path>,
    /// Upload each layer as a compressed blob at this zstd level (`mcow_format::LEVELS`;
    /// `mcow_format::DEFAULT_LEVEL` is the usual choice) instead of as its file. Readers
    /// before compressed blobs cannot pull such an image.
    pub compress: Option<i32>,
}

/// Pushes the sealed layers of the disk at `dir` (not its writable top) as an image.
/// `progress(done, total)` counts layer bytes.
pub fn push(dir: &Path, reference: &Reference, progress: &mut dyn FnMut(u64, u64)) -> Result<PushReport> {
    push_with(dir, reference, &PushOptions::default(), progress)
}

/// [`push`], with a trace of first reads (see [`PushOptions::trace`]).
pub fn push_with_trace(
    dir: &Path,
    reference: &Reference,
    trace: Option<&Path>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<PushReport> {
    push_with(dir, reference, &PushOptions { trace, compress: None }, progress)
}

/// [`push`] as `opts` says: with a trace, compressed. A compressed layer is encoded into a
/// temporary of the disk's store (`LayerStore::compress_layer`), and uploaded unless the remote
/// has that blob already (the encoding is deterministic, so pushing the same layer at the same
/// level again finds it).
///
/// To a registry, a blob the target repository lacks is first asked for as a cross-repository
/// mount from the other repositories of that registry known to hold it: those the store's
/// [`BlobLocations`] name (every push and pull through a registry records the repository's
/// blobs there), and the repository a lazily pulled disk came from (its `remote.json`). A blob
/// mounted is not uploaded; one the registry does not mount is uploaded as usual.
pub fn push_with(
    dir: &Path,
    reference: &Reference,
    opts: &PushOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<PushReport> {
    if let Some(level) = opts.compress
        && !mcow_format::LEVELS.contains(&level)
    {
        return Err(RemoteError::Invalid(format!(
            "compression level {level} is not in {}..={}",
            mcow_format::LEVELS.start(),
            mcow_format::LEVELS.end()
        )));
    }
    let remote = open_remote(reference)?;
    let disk = Disk::open(dir, OpenOptions { read_only: true, verify: false, force_share: true })?;
    let store = disk.store().clone();
    if let Some(layer) = disk.stack().layers().iter().find(|l| !store.contains(&l.digest)) {
        return Err(RemoteError::Invalid(format!(
            "layer {} is only partly local: pull it in full before pushing",
            layer.digest
        )));
    }
    let total: u64 = disk.stack().layers().iter().map(|l| l.file_len()).sum();
    let mut mounts = Mounts::new(reference, &store, dir);
    let mut records = Vec::new();
    let mut descs = Vec::new();
    let (mut done, mut uploaded, mut bytes_uploaded, mut blob_bytes) = (0u64, 0usize, 0u64, 0u64);
    let mut mounted = 0usize;
    for layer in disk.stack().layers() {
        let mut header = vec![0u8; HEADER_SIZE];
        std::fs::File::open(&layer.path)
            .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut header, 0))
            .map_err(RemoteError::io("read", &layer.path))?;
        let size = layer.file_len();
        // Index chunks for a layer whose index is longer than one chunk (a shorter one is
        // fetched whole at once anyway, and without them the config stays readable by readers
        // that predate them).
        let index_len = layer.trailer.index_len();
        let index_chunks = if index_len > MIN_CHUNK_SIZE {
            let mut region = vec![0u8; index_len as usize];
            std::fs::File::open(&layer.path)
                .and_then(|f| {
                    let at = layer.trailer.index_offset(layer.header.block_size);
                    std::os::unix::fs::FileExt::read_exact_at(&f, &mut region, at)
                })
                .map_err(RemoteError::io("read", &layer.path))?;
            let chunks = IndexChunks::of(&region, layer.trailer.extent_count);
            Some(IndexChunksRecord::from_chunks(&chunks))
        } else {
            None
        };
        // The blob to upload: the layer file, or its compressed blob (a temporary of the
        // store, removed once uploaded).
        let blob = opts.compress.map(|level| store.compress_layer(&layer.digest, level)).transpose()?;
        let (blob_path, blob_digest, blob_size) = match &blob {
            None => (layer.path.clone(), layer.digest, size),
            Some(b) => (b.file.path().to_path_buf(), b.digest, b.len),
        };
        let record = LayerRecord {
            digest: blob_digest,
            size: blob_size,
            header_digest: Digest::of(&header),
            index_digest: layer.trailer.index_digest,
            tail_len: Some(index_len + TRAILER_SIZE as u64),
            index_chunks,
            diff_id: blob.as_ref().map(|_| layer.digest),
            diff_size: blob.as_ref().map(|_| size),
            frame_table_digest: blob.as_ref().map(|b| b.frame_table_digest),
        };
        descs.push(Descriptor {
            media_type: record.media_type().into(),
            digest: blob_digest,
            size: blob_size,
            annotations: [(INDEX_DIGEST_ANNOTATION.to_string(), layer.trailer.index_digest.to_string())]
                .into(),
        });
        if remote.has_blob(&blob_digest)? {
            tracing::info!(layer = %layer.digest, blob = %blob_digest, "already in {}", remote.describe());
        } else {
            // Progress in layer bytes: a compressed blob's bytes count for their share.
            let base = done;
            let scale = |n: u64| (u128::from(n) * u128::from(size) / u128::from(blob_size.max(1))) as u64;
            let from = mounts.candidates(&blob_digest);
            match remote.mount_or_put_blob(&blob_digest, &blob_path, &from, &mut |n| {
                progress(base + scale(n), total)
            })? {
                Some(_) => mounted += 1,
                None => {
                    uploaded += 1;
                    bytes_uploaded += blob_size;
                }
            }
        }
        mounts.record(&blob_digest);
        records.push(record);
        blob_bytes += blob_size;
        done += size;
        progress(done, total);
    }
    let m = disk.manifest();
    let trace = match opts.trace {
        None => None,
        Some(path) => {
            let bytes = std::fs::read(path).map_err(RemoteError::io("read", path))?;
            let t = Trace::parse(&bytes)?;
            if t.block_size != m.block_size {
                return Err(RemoteError::Invalid(format!(
                    "{}: trace of {}-byte blocks, the disk has {}-byte blocks",
                    path.display(),
                    t.block_size,
                    m.block_size
                )));
            }
            let digest = Digest::of(&bytes);
            if !remote.has_blob(&digest)? {
                remote.mount_or_put_blob_bytes(&digest, &bytes, &mounts.candidates(&digest))?;
            }
            mounts.record(&digest);
            Some(Descriptor {
                media_type: TRACE_MEDIA_TYPE.into(),
                digest,
                size: bytes.len() as u64,
                annotations: Default::default(),
            })
        }
    };
    // The trace goes in both: the manifest's `layers` entry is what OCI tools (copies, registry
    // garbage collection) follow; the config's names it for mcow and binds it to the config.
    let config = DiskConfig {
        virtual_size: m.virtual_size,
        block_size: m.block_size,
        layers: records,
        trace: trace.clone(),
    }
    .to_bytes();
    let config_digest = Digest::of(&config);
    if !remote.has_blob(&config_digest)? {
        remote.mount_or_put_blob_bytes(&config_digest, &config, &mounts.candidates(&config_digest))?;
    }
    mounts.record(&config_digest);
    let config_desc = Descriptor {
        media_type: CONFIG_MEDIA_TYPE.into(),
        digest: config_digest,
        size: config.len() as u64,
        annotations: Default::default(),
    };
    let manifest = Manifest::new(config_desc, descs, trace).to_bytes();
    remote.put_manifest(&reference.tag, &manifest)?;
    Ok(PushReport {
        manifest_digest: Digest::of(&manifest),
        layers: m.layers.len(),
        uploaded,
        mounted,
        bytes_uploaded,
        layer_bytes: total,
        blob_bytes,
        compressed: opts.compress,
    })
}

/// Repositories tried per blob for a cross-repository mount (each refusal costs a round trip).
const MOUNT_TRIES: usize = 3;

/// A push's cross-repository mounts: where its blobs may be mounted from, and the record of
/// where they are now (see [`push_with`]). Nothing for a remote that is not a registry.
struct Mounts {
    /// The repository pushed to, and the store's record of blob locations.
    target: Option<(Repository, BlobLocations)>,
    /// The repository a lazily pulled disk came from.
    origin: Option<Repository>,
}

impl Mounts {
    fn new(reference: &Reference, store: &LayerStore, dir: &Path) -> Mounts {
        let Some(target) = Repository::of(reference) else {
            return Mounts { target: None, origin: None };
        };
        let origin = std::fs::read(dir.join(ORIGIN_FILE))
            .ok()
            .and_then(|t| serde_json::from_slice::<LazyOrigin>(&t).ok())
            .and_then(|o| Reference::parse(&o.reference).ok())
            .and_then(|r| Repository::of(&r));
        Mounts { target: Some((target, BlobLocations::load(store))), origin }
    }

    /// The repositories to ask for a mount of `digest` from, the most likely first.
    fn candidates(&self, digest: &Digest) -> Vec<String> {
        let Some((target, locations)) = &self.target else {
            return Vec::new();
        };
        let mut from = locations.repositories(digest, target);
        if let Some(o) = &self.origin
            && o.host == target.host
            && o.name != target.name
            && !from.contains(&o.name)
        {
            from.push(o.name.clone());
        }
        from.truncate(MOUNT_TRIES);
        from
    }

    /// The target repository holds `digest` now: recorded at once (a later failure of the push
    /// does not undo the upload).
    fn record(&mut self, digest: &Digest) {
        if let Some((target, locations)) = &mut self.target {
            locations.add(digest, target);
            locations.save_or_warn();
        }
    }
}

/// A fetched manifest and config, checked: the manifest against the reference's pinned digest
/// (if any), the config against the manifest.
pub struct Image {
    pub manifest_digest: Digest,
    pub manifest: Manifest,
    pub config: DiskConfig,
}

impl Image {
    /// The image's trace blob, if it has one: the config's (checked by [`DiskConfig::parse`] to
    /// be the manifest's, when the manifest lists one; images pushed before traces were listed
    /// in the manifest have it in the config only).
    pub fn trace(&self) -> Option<&Descriptor> {
        self.config.trace.as_ref()
    }
}

/// Fetches and checks an image's manifest and config.
pub fn fetch_image(remote: &dyn Remote, reference: &Reference) -> Result<Image> {
    let bytes = remote.get_manifest(&reference.tag, reference.digest.as_ref())?;
    let manifest_digest = Digest::of(&bytes);
    if let Some(pinned) = reference.digest
        && pinned != manifest_digest
    {
        return Err(RemoteError::DigestMismatch {
            what: format!("manifest of {reference}"),
            expected: pinned,
            actual: manifest_digest,
        });
    }
    let manifest = Manifest::parse(&bytes)?;
    let config_bytes = remote.get_blob(&manifest.config.digest)?;
    let actual = Digest::of(&config_bytes);
    if actual != manifest.config.digest {
        return Err(RemoteError::DigestMismatch {
            what: "image config".into(),
            expected: manifest.config.digest,
            actual,
        });
    }
    let config = DiskConfig::parse(&config_bytes, &manifest)?;
    Ok(Image { manifest_digest, manifest, config })
}

/// Where a lazily pulled disk fetches its missing blocks from: `remote.json` in its directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LazyOrigin {
    pub reference: String,
    pub manifest_digest: Digest,
}

/// File name of the lazy origin in a disk directory.
pub const ORIGIN_FILE: &str = "remote.json";
/// File name of the image's trace (if it has one) in a pulled disk's directory.
pub const TRACE_FILE: &str = "trace.json";

/// What a pull did.
#[derive(Debug, Clone)]
pub struct PullReport {
    pub manifest_digest: Digest,
    pub layers: usize,
    /// Bytes fetched from the remote (whole layers, or headers and indexes when lazy).
    pub bytes_fetched: u64,
    /// Layers that were already in the local store.
    pub layers_local: usize,
    /// The image names a trace whose blob the remote does not have: the disk was made without
    /// it (no prefetch). Front ends should warn.
    pub missing_trace: Option<Digest>,
}

/// Pulls the image at `reference` into a new disk at `dir` whose layers go to `store_dir`.
/// In full, every layer is downloaded and checked against its digest; lazily, only each
/// layer's header and index are fetched (checked against the config's digests) and data blocks
/// come later, on demand (see [`Sources::open_lazy_disk`]).
pub fn pull(
    reference: &Reference,
    dir: &Path,
    store_dir: &Path,
    lazy: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<PullReport> {
    let remote = open_remote(reference)?;
    let image = fetch_image(remote.as_ref(), reference)?;
    pull_image(remote.as_ref(), reference, &image, dir, store_dir, lazy, progress)
}

/// [`pull`] of an image whose manifest and config were already fetched (and checked) with
/// [`fetch_image`].
pub fn pull_image(
    remote: &dyn Remote,
    reference: &Reference,
    image: &Image,
    dir: &Path,
    store_dir: &Path,
    lazy: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<PullReport> {
    let get_trace = || match image.trace() {
        Some(t) => fetch_trace(remote, t),
        None => Ok(None),
    };
    let store = LayerStore::new(store_dir);
    let total: u64 = image.config.layers.iter().map(|r| r.size).sum();
    let (mut done, mut fetched, mut local) = (0u64, 0u64, 0usize);
    let missing = |r: &&LayerRecord| {
        let digest = r.layer_digest();
        !store.contains(&digest) && !store.partial_path(&digest).exists()
    };
    let block_size = image.config.block_size;
    let panicked = || RemoteError::Invalid("a fetch thread panicked".into());
    let trace = if lazy {
        // Every layer's header and index, and the trace, at once: a lazy start costs one round
        // of requests. A bad trace still fails the pull before the disk is made (the partial
        // layers fetched beside it stay in the store, checked, as cache).
        let todo: Vec<&LayerRecord> = image.config.layers.iter().filter(missing).collect();
        local = image.config.layers.len() - todo.len();
        let (trace, results) = std::thread::scope(|scope| {
            let trace = scope.spawn(get_trace);
            let handles: Vec<_> = todo
                .iter()
                .map(|r| scope.spawn(|| add_partial_layer(remote, &store, r, block_size)))
                .collect();
            let results: Vec<Result<u64>> =
                handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(panicked()))).collect();
            (trace.join().unwrap_or_else(|_| Err(panicked())), results)
        });
        let trace = trace?;
        for r in results {
            fetched += r?;
        }
        progress(total, total);
        trace
    } else {
        // The trace first: a bad one fails the pull before any layer is downloaded.
        get_trace()?
    };
    let missing_trace = image.trace().filter(|_| trace.is_none()).map(|t| t.digest);
    for r in image.config.layers.iter().filter(|_| !lazy) {
        if store.contains(&r.layer_digest()) {
            local += 1;
        } else {
            // Locked while it is written, removed if this fails, and found stale by the next
            // write to the store if this process dies.
            let mut tmp = store.temp_file(&format!("pull-{}", r.digest.short()))?;
            let base = done;
            remote.get_blob_to(&r.digest, tmp.path(), &mut |n| progress(base + n, total))?;
            match r.compressed() {
                None => {
                    store.adopt(tmp.path(), &r.digest)?;
                    tmp.persisted();
                }
                Some(c) => {
                    // The blob must be the pushed one; the layer rebuilt from it must be the
                    // layer. The blob itself is not kept (dropped with `tmp`).
                    let actual = mcow_engine::store::hash_file(tmp.path())?;
                    if actual != r.digest {
                        return Err(RemoteError::DigestMismatch {
                            what: format!("compressed blob of layer {}", c.diff_id),
                            expected: r.digest,
                            actual,
                        });
                    }
                    store.adopt_compressed(
                        tmp.path(),
                        &c.diff_id,
                        c.diff_size,
                        block_size,
                        c.tail_len,
                        &c.frame_table_digest,
                    )?;
                }
            }
            fetched += r.size;
        }
        done += r.size;
        progress(done, total);
    }
    let layers: Vec<Digest> = image.config.layers.iter().map(LayerRecord::layer_digest).collect();
    Disk::create(
        dir,
        &CreateOptions {
            virtual_size: image.config.virtual_size,
            block_size: image.config.block_size,
            store: store_dir.to_path_buf(),
            layers: layers.clone(),
        },
    )?;
    if let Some(bytes) = &trace {
        let path = dir.join(TRACE_FILE);
        std::fs::write(&path, bytes).map_err(RemoteError::io("write", &path))?;
        fetched += bytes.len() as u64;
    }
    if let Some(repository) = Repository::of(reference) {
        // Where the image's blobs are, for pushes of these layers to other repositories.
        let mut locations = BlobLocations::load(&store);
        let blobs = image.config.layers.iter().map(|r| r.digest);
        for d in blobs.chain([image.manifest.config.digest]).chain(image.trace().map(|t| t.digest)) {
            locations.add(&d, &repository);
        }
        locations.save_or_warn();
    }
    if lazy {
        let origin = LazyOrigin { reference: reference.to_string(), manifest_digest: image.manifest_digest };
        let path = dir.join(ORIGIN_FILE);
        std::fs::write(&path, serde_json::to_vec_pretty(&origin).expect("origin serializes"))
            .map_err(RemoteError::io("write", &path))?;
    }
    Ok(PullReport {
        manifest_digest: image.manifest_digest,
        layers: layers.len(),
        bytes_fetched: fetched,
        layers_local: local,
        missing_trace,
    })
}

/// Fetches and checks the trace blob `t`; `None` if the remote does not have it. The trace only
/// orders a prefetch, so without it the disk is still whole: a missing blob is for the caller
/// to report, not an error. One that is there must be the pushed one and parse.
fn fetch_trace(remote: &dyn Remote, t: &Descriptor) -> Result<Option<Vec<u8>>> {
    let bytes = match remote.get_blob(&t.digest) {
        Err(RemoteError::NotFound { .. }) => return Ok(None),
        r => r?,
    };
    let actual = Digest::of(&bytes);
    if actual != t.digest {
        return Err(RemoteError::DigestMismatch { what: "trace".into(), expected: t.digest, actual });
    }
    Trace::parse(&bytes)?;
    Ok(Some(bytes))
}

/// The header rebuilt from its fields (`fields`, the first bytes of a header), checked against
/// the config's header digest.
fn rebuilt_header(r: &LayerRecord, mut fields: Vec<u8>) -> Result<Vec<u8>> {
    if fields.len() != HEADER_FIELDS_LEN {
        return Err(RemoteError::Invalid(format!("layer {}: a range came back short", r.layer_digest())));
    }
    fields.resize(HEADER_SIZE, 0);
    let actual = Digest::of(&fields);
    if actual != r.header_digest {
        return Err(RemoteError::DigestMismatch {
            what: format!("header of layer {}", r.layer_digest()),
            expected: r.header_digest,
            actual,
        });
    }
    Ok(fields)
}

/// Fetches ranges of a layer, given as offsets in the layer (`ranges`: the header's fields
/// first, then ranges of the tail, ascending), in one request, each checked to be whole. From a
/// compressed blob (see FORMAT.md, "Compressed layer blobs") the header's range is the blob's
/// first bytes, the tail's ranges lie at the blob's end, and the frame table, just before the
/// tail, comes in the same request (as part of the first tail range when that range starts the
/// tail): it is checked against the config (digest, rules, lengths) and returned as the
/// partial copy's frames file. Returns the parts in the order of `ranges` and the bytes fetched.
fn fetch_layer_ranges(
    remote: &dyn Remote,
    r: &LayerRecord,
    block_size: u32,
    ranges: &[(u64, u64)],
) -> Result<(Vec<Vec<u8>>, Option<FramesFile>, u64)> {
    let bad = |why: String| RemoteError::Invalid(format!("layer {}: {why}", r.layer_digest()));
    let Some(c) = r.compressed() else {
        let parts = fetch_ranges(remote, &r.digest, ranges)
            .map_err(|e| e.unwrap_or_else(|| bad("a range came back short".into())))?;
        return Ok((parts, None, ranges.iter().map(|r| r.1).sum()));
    };
    let layout =
        BlobLayout::new(block_size, c.diff_size, c.tail_len, r.size).map_err(|e| bad(e.to_string()))?;
    let table_len = FrameTable::encoded_len(layout.block_count);
    let to_blob = |at: u64| at - layout.layer_tail_offset() + layout.blob_tail_offset();
    let mut blob_ranges: Vec<(u64, u64)> = ranges
        .iter()
        .enumerate()
        .map(|(i, &(at, len))| (if i == 0 { at } else { to_blob(at) }, len))
        .collect();
    // The table as its own range, or joined to the first tail range when that starts the tail.
    let joined = ranges.get(1).is_some_and(|&(at, _)| at == layout.layer_tail_offset());
    if joined {
        blob_ranges[1] = (layout.table_offset(), table_len + blob_ranges[1].1);
    } else {
        blob_ranges.insert(1, (layout.table_offset(), table_len));
    }
    let mut parts = fetch_ranges(remote, &r.digest, &blob_ranges)
        .map_err(|e| e.unwrap_or_else(|| bad("a range came back short".into())))?;
    let fetched = blob_ranges.iter().map(|r| r.1).sum();
    let table = if joined {
        let rest = parts[1].split_off(table_len as usize);
        std::mem::replace(&mut parts[1], rest)
    } else {
        parts.remove(1)
    };
    let actual = Digest::of(&table);
    if actual != c.frame_table_digest {
        return Err(RemoteError::DigestMismatch {
            what: format!("frame table of layer {}", c.diff_id),
            expected: c.frame_table_digest,
            actual,
        });
    }
    let table = FrameTable::decode(&table, layout.block_count, block_size)
        .and_then(|t| layout.check_table(&t).map(|()| t))
        .map_err(|e| bad(format!("compressed blob {}: {e}", r.digest)))?;
    Ok((parts, Some(FramesFile { blob: r.digest, blob_len: r.size, table }), fetched))
}

/// Fetches `ranges` of blob `digest` in one request. `Err(None)`: a range came back short.
fn fetch_ranges(
    remote: &dyn Remote,
    digest: &Digest,
    ranges: &[(u64, u64)],
) -> std::result::Result<Vec<Vec<u8>>, Option<RemoteError>> {
    let mut parts = vec![Vec::new(); ranges.len()];
    remote
        .stream_ranges(digest, ranges, &mut |i, piece| {
            parts[i].extend_from_slice(piece);
            true
        })
        .map_err(Some)?;
    if parts.iter().zip(ranges).any(|(p, r)| p.len() as u64 != r.1) {
        return Err(None);
    }
    Ok(parts)
}

/// Fetches a layer's header fields, trailer and index (and, from a compressed blob, its frame
/// table), checks them, and adds a partial copy to the store, named by the layer's digest and of
/// the layer's length. Returns the bytes fetched.
fn add_partial_layer(
    remote: &dyn Remote,
    store: &LayerStore,
    r: &LayerRecord,
    block_size: u32,
) -> Result<u64> {
    let (digest, len) = (r.layer_digest(), r.layer_size());
    let min = (HEADER_SIZE + TRAILER_SIZE) as u64;
    if len < min {
        return Err(RemoteError::Invalid(format!("layer {digest} is {len} bytes, too small")));
    }
    if let (Some(chunks), Some(tail_len)) = (&r.index_chunks, r.tail_len) {
        return add_partial_chunked(remote, store, r, &chunks.to_chunks(), tail_len, block_size);
    }
    // The header and the tail at once when the config says how long the tail is; otherwise the
    // trailer first, to learn it (a compressed blob's record always has it).
    let tail_len = match r.tail_len {
        Some(n) => n,
        None => {
            let t = remote.get_range(&r.digest, r.size - TRAILER_SIZE as u64, TRAILER_SIZE as u64)?;
            let trailer =
                Trailer::decode(&t).map_err(|e| RemoteError::Invalid(format!("layer {digest}: {e}")))?;
            trailer.index_len() + TRAILER_SIZE as u64
        }
    };
    if tail_len > len - HEADER_SIZE as u64 || tail_len < TRAILER_SIZE as u64 {
        return Err(RemoteError::Invalid(format!("layer {digest}: its index does not fit the blob")));
    }
    // The header's fields and the tail in one request (two ranges). The header's other bytes
    // are zero in any valid header, and its digest below proves the rebuilt one is the original.
    let ranges = [(0, HEADER_FIELDS_LEN as u64), (len - tail_len, tail_len)];
    let (parts, frames, fetched) = fetch_layer_ranges(remote, r, block_size, &ranges)?;
    let [header, tail]: [Vec<u8>; 2] = parts.try_into().expect("two ranges");
    let header = rebuilt_header(r, header)?;
    let fetched = fetched + if r.tail_len.is_none() { TRAILER_SIZE as u64 } else { 0 };
    store.add_partial(&digest, len, &header, &tail, &r.index_digest, frames.as_ref())?;
    Ok(fetched)
}

/// [`add_partial_layer`] for a layer whose config record has index chunks: one request with
/// the header's fields, the chunks that hold the extent index, and the trailer (the hash
/// table's other chunks are fetched later, as reads need them). The store checks the trailer
/// and every chunk against the config (see `LayerStore::add_partial_chunked`).
fn add_partial_chunked(
    remote: &dyn Remote,
    store: &LayerStore,
    r: &LayerRecord,
    chunks: &IndexChunks,
    tail_len: u64,
    block_size: u32,
) -> Result<u64> {
    let (digest, len) = (r.layer_digest(), r.layer_size());
    let bad = |why: &str| RemoteError::Invalid(format!("layer {digest}: {why}"));
    if tail_len > len - HEADER_SIZE as u64 || tail_len < TRAILER_SIZE as u64 {
        return Err(bad("its index does not fit the blob"));
    }
    let region_len = tail_len - TRAILER_SIZE as u64;
    let index_offset = len - tail_len;
    let ext = chunks.extent_chunks();
    let ext_len = (ext.end as u64 * chunks.size).min(region_len);
    // The extent chunks and the trailer as one range when they meet.
    let mut ranges = vec![(0, HEADER_FIELDS_LEN as u64)];
    if ext_len == region_len {
        ranges.push((index_offset, tail_len));
    } else {
        if ext_len > 0 {
            ranges.push((index_offset, ext_len));
        }
        ranges.push((len - TRAILER_SIZE as u64, TRAILER_SIZE as u64));
    }
    let (parts, frames, fetched) = fetch_layer_ranges(remote, r, block_size, &ranges)?;
    let mut parts = parts.into_iter();
    let header = rebuilt_header(r, parts.next().expect("the header's range"))?;
    let mut index = parts.flatten().collect::<Vec<u8>>();
    let trailer = index.split_off(index.len() - TRAILER_SIZE);
    let t = Trailer::decode(&trailer).map_err(|e| bad(&format!("trailer: {e}")))?;
    if t.index_len() + TRAILER_SIZE as u64 != tail_len {
        return Err(bad("its trailer disagrees with the image config's tail length"));
    }
    let pieces: Vec<(usize, Vec<u8>)> = ext
        .map(|c| {
            let (at, len) = chunks.range(c, region_len);
            (c, index[at as usize..(at + len) as usize].to_vec())
        })
        .collect();
    store.add_partial_chunked(
        &digest,
        len,
        &header,
        &trailer,
        chunks,
        &pieces,
        &r.index_digest,
        frames.as_ref(),
    )?;
    Ok(fetched)
}

/// Fetches blocks of partial layers from a remote, counting what it fetched.
pub struct RemoteSource {
    remote: Arc<dyn Remote>,
    fetched: AtomicU64,
    requests: AtomicU64,
    /// Fetches that failed (after the remote's retries).
    errors: AtomicU64,
}

impl RemoteSource {
    pub fn new(remote: Arc<dyn Remote>) -> RemoteSource {
        RemoteSource {
            remote,
            fetched: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }
    }

    /// Retries the remote made so far (for every operation on it, not only fetches).
    pub fn retries(&self) -> u64 {
        self.remote.retries()
    }

    /// Fetches that failed so far, after the remote's own retries (their readers got an I/O
    /// error).
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Bytes and range requests fetched so far.
    pub fn stats(&self) -> (u64, u64) {
        (self.fetched.load(Ordering::Relaxed), self.requests.load(Ordering::Relaxed))
    }

    /// Cancels the remote (see `Remote::cancel`): fetches in flight fail at once, with an
    /// I/O error, and so do later ones. For the end of a process.
    pub fn cancel(&self) {
        self.remote.cancel();
    }
}

impl BlockSource for RemoteSource {
    fn read_range(
        &self,
        layer: &Digest,
        offset: u64,
        len: u64,
        sink: &mut dyn FnMut(&[u8]) -> bool,
    ) -> std::io::Result<()> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%layer, offset, len, "fetching");
        let r = self.remote.stream_range(layer, offset, len, &mut |piece: &[u8]| {
            self.fetched.fetch_add(piece.len() as u64, Ordering::Relaxed);
            sink(piece)
        });
        if r.is_err() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        r?;
        Ok(())
    }

    fn read_ranges(
        &self,
        layer: &Digest,
        ranges: &[(u64, u64)],
        sink: &mut dyn FnMut(usize, &[u8]) -> bool,
    ) -> std::io::Result<()> {
        tracing::debug!(%layer, ranges = ranges.len(), "fetching ranges");
        let requests = self.remote.stream_ranges(layer, ranges, &mut |i, piece: &[u8]| {
            self.fetched.fetch_add(piece.len() as u64, Ordering::Relaxed);
            sink(i, piece)
        });
        // Counted even when it failed partway: the requests were made.
        self.requests.fetch_add(requests.as_ref().map_or(1, |n| *n), Ordering::Relaxed);
        if requests.is_err() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        requests?;
        Ok(())
    }
}

/// The remote sources of lazily pulled disks, one per origin (the reference in the disk's
/// `remote.json`), so that disks pulled from the same image (several VMs on one base) share
/// their open layers and fetch each block once. A front end makes one for its process (or for
/// whatever should share) and opens every lazy disk through it ([`Sources::open_lazy_disk`]);
/// disks opened through different `Sources` share nothing.
#[derive(Default)]
pub struct Sources {
    by_origin: Mutex<HashMap<String, Arc<RemoteSource>>>,
    /// How origins' `oci://` references are parsed (which registries speak plain HTTP).
    insecure: InsecureRegistries,
}

impl Sources {
    pub fn new() -> Sources {
        Sources::default()
    }

    /// Sources whose `oci://` origins on the hosts `insecure` lists are reached over plain HTTP.
    pub fn with_insecure(insecure: InsecureRegistries) -> Sources {
        Sources { insecure, ..Sources::default() }
    }

    /// The source of origin `reference`, opened on first use.
    pub fn get(&self, reference: &str) -> Result<Arc<RemoteSource>> {
        let mut sources = self.by_origin.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = sources.get(reference) {
            return Ok(s.clone());
        }
        let source =
            Arc::new(RemoteSource::new(open_remote(&Reference::parse_with(reference, &self.insecure)?)?));
        sources.insert(reference.to_string(), source.clone());
        Ok(source)
    }

    /// Makes `remote`, already open on origin `reference` (as a lazy disk's `remote.json` names
    /// it), the source of that origin, unless there is one: the disks pulled through it then
    /// fetch over the connections the pull opened (a new one costs a round trip or two).
    pub fn adopt(&self, reference: &str, remote: Arc<dyn Remote>) {
        let mut sources = self.by_origin.lock().unwrap_or_else(|p| p.into_inner());
        sources.entry(reference.to_string()).or_insert_with(|| Arc::new(RemoteSource::new(remote)));
    }

    /// Opens a disk in `engine`; if it was pulled lazily (it has a `remote.json`), missing
    /// blocks are fetched from its origin as `policy` says, through this registry's source for
    /// that origin. Returns what it fetched, for statistics.
    pub fn open_lazy_disk(
        &self,
        engine: &mcow_engine::Engine,
        dir: &Path,
        opts: OpenOptions,
        policy: FetchPolicy,
    ) -> Result<(Disk, Option<FetchStats>)> {
        let origin_path: PathBuf = dir.join(ORIGIN_FILE);
        if !origin_path.exists() {
            return Ok((Disk::open_in(engine, dir, opts)?, None));
        }
        let text = std::fs::read(&origin_path).map_err(RemoteError::io("read", &origin_path))?;
        let origin: LazyOrigin = serde_json::from_slice(&text)
            .map_err(|e| RemoteError::Invalid(format!("{}: {e}", origin_path.display())))?;
        let source = self.get(&origin.reference)?;
        let start = source.stats();
        let disk = Disk::open_with_source_in(engine, dir, opts, source.clone(), policy)?;
        Ok((disk, Some(FetchStats { source, start })))
    }
}

/// What a disk opened with [`Sources::open_lazy_disk`] has fetched since it was opened. (Disks
/// from the same origin opened through one [`Sources`] share one source, so that each block is fetched once; this counts from the
/// moment this disk was opened.)
#[derive(Clone)]
pub struct FetchStats {
    source: Arc<RemoteSource>,
    start: (u64, u64),
}

impl FetchStats {
    /// Bytes and range requests fetched from the origin since the disk was opened.
    pub fn stats(&self) -> (u64, u64) {
        let (b, r) = self.source.stats();
        (b - self.start.0, r - self.start.1)
    }

    /// Retries of requests to the disk's origin since the process opened it (shared with the
    /// other disks of its origin).
    pub fn retries(&self) -> u64 {
        self.source.retries()
    }

    /// Fetches of the disk's origin that failed (after retries) since the process opened it
    /// (shared with the other disks of its origin).
    pub fn errors(&self) -> u64 {
        self.source.errors()
    }

    /// Cancels the fetches of the disk's source (shared with the other disks of its origin
    /// opened through the same [`Sources`]; see [`RemoteSource::cancel`]).
    pub fn cancel(&self) {
        self.source.cancel();
    }
}
