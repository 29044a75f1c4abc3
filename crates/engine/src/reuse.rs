//! Block reuse: before a partial layer fetches a block, it looks for a block with the same hash
//! that another layer of its store already holds locally, and copies that one instead.
//!
//! Owns: `BlockIndex`, one store's index of local blocks by block hash (built in memory at the
//! first fetch from the hash tables of the store's complete and partial layers, then kept up to
//! date with the blocks and layers this process adds), reading a candidate block out of its
//! layer file and checking it against the hash wanted, dropping a candidate that turns out
//! wrong, and the counts of blocks reused ([`ReuseStats`]). Does not own: landing a reused block (exactly like a
//! fetched one, see `fetch`), where layer files live (see `store`), or keeping one index per
//! store (the engine context, see `context`). Nothing here is trusted: a candidate is only used
//! once its bytes hash to what the layer that wants it expects, so a lost or stale index costs
//! fetches, never correctness.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use mcow_format::{
    BLOCK_HASH_SIZE, BlockHash, BlockHashKind, Digest, HEADER_SIZE, INDEX_ENTRY_SIZE, LayerHeader, LayerKind,
    TRAILER_SIZE, Trailer, decode_block_hashes,
};

use crate::chunks::{ChunkedHashes, HashTable, IndexChunks};
use crate::layer::SealedLayer;
use crate::pool::{FilePool, FileSlot};

/// Blocks (and their bytes) that partial layers copied from other local layers instead of
/// fetching them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReuseStats {
    /// Blocks copied.
    pub blocks: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// An index entry packs the layer's number (the high bits) and the physical block (the low
/// `BLOCK_BITS`) in 8 bytes.
const BLOCK_BITS: u32 = 40;
const MAX_LAYERS: usize = 1 << (64 - BLOCK_BITS);

/// A layer file the index points into.
struct IndexedLayer {
    digest: Digest,
    /// Where it was found (a partial copy, or complete), and where a partial copy is once the
    /// store completes it (it is renamed there).
    path: PathBuf,
    complete: PathBuf,
    slot: FileSlot,
}

/// The indexed blocks of one block size and block hash kind (only such blocks can match).
struct Group {
    kind: BlockHashKind,
    block_size: u32,
    /// First 8 bytes of the block hash -> packed (layer, physical block). One place per key:
    /// the first one found is kept.
    places: HashMap<u64, u64>,
    /// The layers that have an entry here.
    layers: Vec<u32>,
}

#[derive(Default)]
struct State {
    built: bool,
    layers: Vec<Arc<IndexedLayer>>,
    ids: HashMap<Digest, u32>,
    groups: Vec<Group>,
}

impl State {
    /// The number of layer `digest` found at `path`, registering it if new (`None` when the
    /// index is full).
    fn layer_id(
        &mut self,
        digest: &Digest,
        path: &Path,
        complete: PathBuf,
        pool: &Arc<FilePool>,
    ) -> Option<u32> {
        if let Some(&id) = self.ids.get(digest) {
            return Some(id);
        }
        if self.layers.len() >= MAX_LAYERS {
            return None;
        }
        let id = self.layers.len() as u32;
        self.layers.push(Arc::new(IndexedLayer {
            digest: *digest,
            path: path.to_path_buf(),
            complete,
            slot: FileSlot::new(pool),
        }));
        self.ids.insert(*digest, id);
        Some(id)
    }

    fn group(&mut self, kind: BlockHashKind, block_size: u32) -> &mut Group {
        let i = match self.groups.iter().position(|g| g.kind == kind && g.block_size == block_size) {
            Some(i) => i,
            None => {
                self.groups.push(Group { kind, block_size, places: HashMap::new(), layers: Vec::new() });
                self.groups.len() - 1
            }
        };
        &mut self.groups[i]
    }

    /// Adds block `pblock` of layer `id`, hash `hash`, unless a place with that key is known.
    fn insert(group: &mut Group, id: u32, pblock: u64, hash: &BlockHash) {
        if pblock >= 1 << BLOCK_BITS {
            return;
        }
        group.places.entry(key(hash)).or_insert((u64::from(id) << BLOCK_BITS) | pblock);
        if group.layers.last() != Some(&id) && !group.layers.contains(&id) {
            group.layers.push(id);
        }
    }

    /// The place of a block with `hash` in a layer other than `not` (none if the one place known
    /// for its key is in `not` itself).
    fn find(
        &self,
        kind: BlockHashKind,
        block_size: u32,
        hash: &BlockHash,
        not: &Digest,
    ) -> Option<(u32, u64)> {
        let g = self.groups.iter().find(|g| g.kind == kind && g.block_size == block_size)?;
        let packed = *g.places.get(&key(hash))?;
        let (id, pblock) = ((packed >> BLOCK_BITS) as u32, packed & ((1 << BLOCK_BITS) - 1));
        (self.layers[id as usize].digest != *not).then_some((id, pblock))
    }
}

fn key(hash: &BlockHash) -> u64 {
    u64::from_le_bytes(hash.0[..8].try_into().expect("8 bytes"))
}

/// One store's local blocks by block hash, so that a partial layer of the store copies a block
/// another layer holds rather than fetch it. Built from the store's files at the first need
/// (`blobs/sha256/*`: every stored block; `partial/sha256/*`: the blocks whose data region is
/// not a hole, under the hash table chunks present and matching their digests), reading each
/// layer's header, trailer and hash table (32 bytes per stored block), never its data; blocks
/// landed and layers added to the store in this process are added as they come. About 16 bytes per indexed block (an 8-byte
/// hash prefix and an 8-byte place) plus the hash map's slack. Held in memory only: a new
/// process builds it again.
pub(crate) struct BlockIndex {
    root: PathBuf,
    pool: Arc<FilePool>,
    state: Mutex<State>,
    /// Held by the thread that builds the index (others wait for it rather than build too).
    building: Mutex<()>,
    reused_blocks: AtomicU64,
    reused_bytes: AtomicU64,
}

impl BlockIndex {
    /// An index of the store at `root` (nothing read until its first use), whose layer files
    /// are opened through `pool`.
    pub(crate) fn new(root: PathBuf, pool: Arc<FilePool>) -> BlockIndex {
        BlockIndex {
            root,
            pool,
            state: Mutex::new(State::default()),
            building: Mutex::new(()),
            reused_blocks: AtomicU64::new(0),
            reused_bytes: AtomicU64::new(0),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn complete_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs").join("sha256").join(digest.hex())
    }

    /// Builds the index from the store's files, once (local reads only; the state's lock is
    /// taken between files, not across their reads).
    pub(crate) fn ensure_built(&self) {
        if self.state().built {
            return;
        }
        let _building = self.building.lock().unwrap_or_else(|p| p.into_inner());
        if self.state().built {
            return;
        }
        let since = std::time::Instant::now();
        let (mut layers, mut blocks) = (0u64, 0u64);
        let mut seen = std::collections::HashSet::new();
        for (dir, partial) in [("blobs", false), ("partial", true)] {
            let dir = self.root.join(dir).join("sha256");
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                // Layer files only (not chunk lists or other sidecars, not temporaries).
                let Some(digest) = entry.file_name().to_str().and_then(|n| n.parse::<Digest>().ok()) else {
                    continue;
                };
                if !seen.insert(digest) {
                    continue; // complete and partial both: the complete one was indexed
                }
                let path = entry.path();
                let chunk_list = partial.then(|| dir.join(format!("{}.chunks", digest.hex())));
                let found = match local_hashes(&path, chunk_list.as_deref()) {
                    Ok(Some(f)) => f,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::debug!(path = %path.display(), error = %e, "block index: layer skipped");
                        continue;
                    }
                };
                let mut state = self.state();
                let Some(id) = state.layer_id(&digest, &path, self.complete_path(&digest), &self.pool) else {
                    tracing::warn!(store = %self.root.display(), "block index full: further layers not indexed");
                    break;
                };
                let group = state.group(found.kind, found.block_size);
                for (p, h) in &found.blocks {
                    State::insert(group, id, *p, h);
                }
                layers += 1;
                blocks += found.blocks.len() as u64;
            }
        }
        self.state().built = true;
        tracing::info!(
            store = %self.root.display(), layers, blocks, ms = since.elapsed().as_millis() as u64,
            "indexed the store's local blocks by hash, for reuse"
        );
    }

    /// Whether some layer of the store other than `layer` holds a block with the hash of
    /// `layer`'s stored block `pblock` (as far as the index knows; no I/O but the first build).
    pub(crate) fn has_candidate(&self, layer: &SealedLayer, pblock: u64) -> bool {
        let Some(hash) = layer.hashes.get(pblock) else { return false };
        self.ensure_built();
        self.state().find(layer.header.block_hash, layer.header.block_size, hash, &layer.digest).is_some()
    }

    /// Whether any layer of the store other than `layer` has blocks that could match
    /// `layer`'s (same block size and hash kind).
    pub(crate) fn may_hold_blocks_of(&self, layer: &SealedLayer) -> bool {
        self.ensure_built();
        let state = self.state();
        let (kind, bs) = (layer.header.block_hash, layer.header.block_size);
        state
            .groups
            .iter()
            .filter(|g| g.kind == kind && g.block_size == bs)
            .any(|g| g.layers.iter().any(|&id| state.layers[id as usize].digest != layer.digest))
    }

    /// Fills `block` with a copy of `layer`'s stored block `pblock` from another local layer
    /// of the store, if the index knows one and its bytes there hash to the hash `layer`
    /// expects; a place whose bytes do not is dropped from the index. Returns the layer copied
    /// from. (The caller lands the block like a fetched one, which checks it again.)
    pub(crate) fn copy(&self, layer: &SealedLayer, pblock: u64, block: &mut [u8]) -> Option<Digest> {
        let hash = layer.hashes.get(pblock)?;
        let (kind, bs) = (layer.header.block_hash, layer.header.block_size);
        self.ensure_built();
        let (id, from) = self.state().find(kind, bs, hash, &layer.digest)?;
        let source = self.state().layers[id as usize].clone();
        let good = read_block(&source, from, block) && kind.of(block) == *hash;
        if !good {
            tracing::warn!(
                layer = %layer.digest, pblock, from_layer = %source.digest, from_pblock = from,
                "local copy of a block does not match its hash: dropped from the block index, fetching it"
            );
            let mut state = self.state();
            let g = state.group(kind, bs);
            let packed = (u64::from(id) << BLOCK_BITS) | from;
            if g.places.get(&key(hash)) == Some(&packed) {
                g.places.remove(&key(hash));
            }
            return None;
        }
        tracing::debug!(layer = %layer.digest, pblock, from_layer = %source.digest, from_pblock = from, "reused a local block");
        Some(source.digest)
    }

    /// Counts a block of `bytes` bytes as reused (`sign` 1), or takes it back (-1: it did not
    /// land after all).
    pub(crate) fn count_reused(&self, bytes: u64, sign: i8) {
        if sign > 0 {
            self.reused_blocks.fetch_add(1, Ordering::Relaxed);
            self.reused_bytes.fetch_add(bytes, Ordering::Relaxed);
        } else {
            self.reused_blocks.fetch_sub(1, Ordering::Relaxed);
            self.reused_bytes.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    /// Adds the stored blocks `blocks` of `layer`, just landed (checked and written) in its
    /// file at `layer.path`, so that other layers may copy them.
    pub(crate) fn add_landed(&self, layer: &SealedLayer, blocks: std::ops::Range<u64>) {
        let mut state = self.state();
        let complete = self.complete_path(&layer.digest);
        let Some(id) = state.layer_id(&layer.digest, &layer.path, complete, &self.pool) else { return };
        let group = state.group(layer.header.block_hash, layer.header.block_size);
        for p in blocks {
            if let Some(h) = layer.hashes.get(p) {
                State::insert(group, id, p, h);
            }
        }
    }

    /// Adds the blocks of layer `digest`, now complete at `path` in the store (adopted, written,
    /// or a partial copy completed), if the index was built already (else the build finds it).
    pub(crate) fn add_complete(&self, digest: &Digest, path: &Path) {
        if !self.state().built {
            return;
        }
        let found = match local_hashes(path, None) {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "block index: new layer not indexed");
                return;
            }
        };
        let mut state = self.state();
        let Some(id) = state.layer_id(digest, path, path.to_path_buf(), &self.pool) else { return };
        let group = state.group(found.kind, found.block_size);
        for (p, h) in &found.blocks {
            State::insert(group, id, *p, h);
        }
    }

    pub(crate) fn stats(&self) -> ReuseStats {
        ReuseStats {
            blocks: self.reused_blocks.load(Ordering::Relaxed),
            bytes: self.reused_bytes.load(Ordering::Relaxed),
        }
    }
}

/// Reads stored block `pblock` of an indexed layer (from its complete path if the partial copy
/// it was found as has been completed since).
fn read_block(layer: &IndexedLayer, pblock: u64, block: &mut [u8]) -> bool {
    use std::os::unix::fs::FileExt;
    let Ok(f) = layer.slot.get(&layer.path).or_else(|_| layer.slot.get(&layer.complete)) else {
        return false;
    };
    let at = HEADER_SIZE as u64 + pblock * block.len() as u64;
    f.read_exact_at(block, at).is_ok()
}

/// The local blocks of one layer file, and how they are hashed.
struct Found {
    kind: BlockHashKind,
    block_size: u32,
    blocks: Vec<(u64, BlockHash)>,
}

/// The stored blocks the layer file at `path` holds and their hashes, from its header, trailer
/// and hash table: every block of a complete layer; for a partial copy (`chunk_list` is where
/// its chunk list would be), the blocks whose data is not a hole of the file, less those whose
/// hash lies in a hash table chunk that is not there or does not match its digest. `None` for a
/// file that is not a sealed layer.
fn local_hashes(path: &Path, chunk_list: Option<&Path>) -> std::io::Result<Option<Found>> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    if len < (HEADER_SIZE + TRAILER_SIZE) as u64 {
        return Ok(None);
    }
    let mut hb = vec![0u8; HEADER_SIZE];
    f.read_exact_at(&mut hb, 0)?;
    let Ok(header) = LayerHeader::decode(&hb) else { return Ok(None) };
    let mut tb = [0u8; TRAILER_SIZE];
    f.read_exact_at(&mut tb, len - TRAILER_SIZE as u64)?;
    let Ok(trailer) = Trailer::decode(&tb) else { return Ok(None) };
    if header.kind != LayerKind::Sealed || trailer.file_len(header.block_size) != len {
        return Ok(None);
    }
    let (bs, n) = (u64::from(header.block_size), trailer.block_count);
    let index_at = trailer.index_offset(header.block_size);
    let table_at = index_at + trailer.extent_count * INDEX_ENTRY_SIZE as u64;
    let present = match chunk_list {
        None => vec![(0, n)],
        Some(_) => data_runs(&f, bs, n),
    };
    let mut blocks = Vec::new();
    let list = match chunk_list.map(std::fs::read_to_string) {
        Some(Ok(text)) => Some(IndexChunks::parse_text(&text).map_err(std::io::Error::other)?),
        Some(Err(e)) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => None,
    };
    if let Some(list) = list {
        // Only the chunks that are there and match their digests.
        let region_len = trailer.index_len();
        list.check(region_len).map_err(std::io::Error::other)?;
        if list.extent_count != trailer.extent_count {
            return Err(std::io::Error::other("the chunk list does not fit the trailer"));
        }
        let table = ChunkedHashes::new(list, index_at, region_len);
        let mut bytes = Vec::new();
        for c in 0..table.list.digests.len() {
            let (at, clen) = table.file_range(c);
            bytes.resize(clen as usize, 0);
            f.read_exact_at(&mut bytes, at)?;
            table.install(c, &bytes);
        }
        let table = HashTable::Chunked(table);
        for (p0, p1) in present {
            blocks.extend((p0..p1).filter_map(|p| table.get(p).map(|h| (p, *h))));
        }
    } else {
        // The whole table, a run of blocks at a time.
        let mut bytes = Vec::new();
        for (p0, p1) in present {
            let mut p = p0;
            while p < p1 {
                let m = (p1 - p).min(1 << 15);
                bytes.resize((m as usize) * BLOCK_HASH_SIZE, 0);
                f.read_exact_at(&mut bytes, table_at + p * BLOCK_HASH_SIZE as u64)?;
                blocks.extend(
                    decode_block_hashes(&bytes).into_iter().enumerate().map(|(i, h)| (p + i as u64, h)),
                );
                p += m;
            }
        }
    }
    Ok(Some(Found { kind: header.block_hash, block_size: header.block_size, blocks }))
}

/// The runs `[first, end)` of the `n` stored blocks (of `bs` bytes) of a partial layer file
/// that lie wholly in data, not in holes (all of them where the filesystem cannot tell).
fn data_runs(f: &File, bs: u64, n: u64) -> Vec<(u64, u64)> {
    use rustix::fs::{SeekFrom, seek};
    let (start, end) = (HEADER_SIZE as u64, HEADER_SIZE as u64 + n * bs);
    let mut runs = Vec::new();
    let mut pos = start;
    while pos < end {
        let data = match seek(f, SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            Err(_) => return vec![(0, n)],
        };
        if data >= end {
            break;
        }
        let hole = seek(f, SeekFrom::Hole(data)).unwrap_or(end).min(end);
        let (p0, p1) = ((data - start).div_ceil(bs), (hole - start) / bs);
        if p0 < p1 {
            runs.push((p0, p1));
        }
        pos = hole;
    }
    runs
}
