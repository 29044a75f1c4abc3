//! Block reuse: a partial layer copies the blocks that another layer of its store already holds
//! (same block hash) instead of fetching them, checks them like fetched blocks, and fetches only
//! the rest; a local copy that went bad is not used.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::source::StoreSource;
use mcow_engine::store::LayerStore;
use mcow_engine::{CreateOptions, Digest, Disk, Engine, FetchPolicy, OpenOptions, ReuseStats};
use mcow_format::{HEADER_SIZE, TRAILER_SIZE, Trailer};

const BS: u64 = 65536;
/// Stored blocks of each layer.
const N: u64 = 64;
/// The blocks the new layer changes: one alone, a run of three, one alone (three runs).
const CHANGED: [u64; 5] = [5, 20, 21, 22, 50];
/// One fetch for a whole-disk read (the read covers every block; no read-ahead).
const WIDE: FetchPolicy = FetchPolicy { window: N, readahead: 0 };

/// Bytes of block `b` of version `v` (distinct for every block and version, never zero), `bs`
/// of them.
fn block_bytes(bs: u64, b: u64, v: u64) -> Vec<u8> {
    let mut x = (b + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (v + 1).wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    (0..bs)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x as u8) | 1
        })
        .collect()
}

/// The disk's bytes: the old layer's, or the new one's (CHANGED blocks differ).
fn content(new: bool) -> Vec<u8> {
    content_of(BS, N, &CHANGED, new)
}

/// The bytes of a disk of `n` blocks of `bs` bytes: old, or new (blocks `changed` differ).
fn content_of(bs: u64, n: u64, changed: &[u64], new: bool) -> Vec<u8> {
    (0..n).flat_map(|b| block_bytes(bs, b, u64::from(new && changed.contains(&b)))).collect()
}

/// A one-layer disk with `bytes` in `dir/NAME`, its layer in the origin store `dir/origin`.
/// Returns the layer's digest.
fn sealed_layer(dir: &Path, name: &str, bs: u64, bytes: &[u8]) -> Digest {
    let disk = dir.join(name);
    let (virtual_size, block_size) = (bytes.len() as u64, bs as u32);
    let opts = CreateOptions { virtual_size, block_size, store: dir.join("origin"), layers: vec![] };
    Disk::create(&disk, &opts).unwrap();
    let d = Disk::open(&disk, OpenOptions::default()).unwrap();
    d.write(0, bytes).unwrap();
    d.flush().unwrap();
    drop(d);
    mcow_engine::ops::merge(&disk, 0, &mut |_, _| {}).unwrap()
}

/// Adds a partial copy (header and tail) of origin layer `digest` to `store`.
fn add_partial(store: &LayerStore, origin: &Path, digest: &Digest) {
    let bytes = std::fs::read(origin.join("blobs/sha256").join(digest.hex())).unwrap();
    let t = Trailer::decode(&bytes[bytes.len() - TRAILER_SIZE..]).unwrap();
    let block_size = mcow_format::LayerHeader::decode(&bytes[..HEADER_SIZE]).unwrap().block_size;
    let tail_at = t.index_offset(block_size) as usize;
    let len = bytes.len() as u64;
    store.add_partial(digest, len, &bytes[..HEADER_SIZE], &bytes[tail_at..], &t.index_digest, None).unwrap();
}

/// A disk at `dir/NAME` on layer `digest` of the store `dir/local`.
fn disk_on(dir: &Path, name: &str, digest: &Digest) -> PathBuf {
    disk_of(dir, name, digest, BS, N)
}

/// [`disk_on`] for a disk of `n` blocks of `bs` bytes.
fn disk_of(dir: &Path, name: &str, digest: &Digest, bs: u64, n: u64) -> PathBuf {
    let path = dir.join(name);
    let opts = CreateOptions {
        virtual_size: n * bs,
        block_size: bs as u32,
        store: dir.join("local"),
        layers: vec![*digest],
    };
    Disk::create(&path, &opts).unwrap();
    path
}

struct Setup {
    dir: tempfile::TempDir,
    old: Digest,
    new: Digest,
    origin: Arc<StoreSource>,
}

/// The old and new layers in the origin; the local store `dir/local` holds the new one as a
/// partial copy, and the old one complete if `old_complete`, else as a partial copy.
fn setup(old_complete: bool) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let old = sealed_layer(dir.path(), "old-src", BS, &content(false));
    let new = sealed_layer(dir.path(), "new-src", BS, &content(true));
    assert_ne!(old, new);
    let origin_dir = dir.path().join("origin");
    let store = LayerStore::new(dir.path().join("local"));
    if old_complete {
        let blobs = dir.path().join("local/blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::copy(origin_dir.join("blobs/sha256").join(old.hex()), blobs.join(old.hex())).unwrap();
    } else {
        add_partial(&store, &origin_dir, &old);
    }
    add_partial(&store, &origin_dir, &new);
    let data_end = u64::MAX;
    let origin = Arc::new(StoreSource::new(origin_dir).counting_below(data_end));
    Setup { dir, old, new, origin }
}

fn open(engine: &Engine, disk: &Path, origin: &Arc<StoreSource>, policy: FetchPolicy) -> Disk {
    Disk::open_with_source_in(engine, disk, OpenOptions::default(), origin.clone(), policy).unwrap()
}

fn read_all(d: &Disk) -> Vec<u8> {
    let mut all = vec![0u8; (N * BS) as usize];
    d.read(0, &mut all).unwrap();
    all
}

/// Tried: the old layer complete in the store, the new one (5 of its 64 blocks changed, in three
/// runs) partial; the new disk read whole in one read, then again after a restart.
/// Must hold: the read gives the new bytes and fetches exactly the 5 changed blocks, in 3
/// requests (one per run of changed blocks), the engine counts the other 59 as reused; after
/// a restart nothing is fetched or reused (all local).
#[test]
fn a_new_layer_fetches_only_its_changed_blocks() {
    let s = setup(true);
    let disk = disk_on(s.dir.path(), "new", &s.new);
    let engine = Engine::default();
    let d = open(&engine, &disk, &s.origin, WIDE);
    assert!(read_all(&d) == content(true), "the new disk reads wrong");
    let k = CHANGED.len() as u64;
    assert_eq!(s.origin.counts(), (3, k * BS), "(requests, bytes) fetched");
    assert_eq!(engine.reuse_stats(), ReuseStats { blocks: N - k, bytes: (N - k) * BS });
    drop(d);
    let engine = Engine::default();
    let d = open(&engine, &disk, &s.origin, FetchPolicy::default());
    assert!(read_all(&d) == content(true));
    assert_eq!(s.origin.counts(), (3, k * BS), "a restart fetched");
    assert_eq!(engine.reuse_stats(), ReuseStats::default(), "a restart reused");
}

/// Tried: the same, with one byte of the old layer's block 10 flipped before the disk opens
/// (the index is built from the old layer's hash table, which still names the old bytes), and
/// one of block 30 flipped after the index was built (a first read of block 0), read in small
/// pieces with the default policy (read-ahead windows).
/// Must hold: both bad copies are not used: blocks 10 and 30 are fetched too (7 blocks in all)
/// and everything reads right; 57 blocks are reused.
#[test]
fn a_local_copy_that_went_bad_is_fetched_instead() {
    let s = setup(true);
    let old_file = s.dir.path().join("local/blobs/sha256").join(s.old.hex());
    let flip = |block: u64| {
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&old_file).unwrap();
        let at = HEADER_SIZE as u64 + block * BS + 123;
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x20], at).unwrap();
    };
    flip(10);
    let disk = disk_on(s.dir.path(), "new", &s.new);
    let engine = Engine::default();
    let d = open(&engine, &disk, &s.origin, FetchPolicy::default());
    let expected = content(true);
    let mut piece = vec![0u8; 4096];
    d.read(0, &mut piece).unwrap();
    assert!(piece[..] == expected[..4096]);
    assert_eq!(engine.reuse_stats().blocks, 1, "block 0 was not reused");
    flip(30);
    let mut all = vec![0u8; expected.len()];
    for (i, chunk) in all.chunks_mut(48 << 10).enumerate() {
        d.read(i as u64 * (48 << 10), chunk).unwrap();
    }
    assert!(all == expected, "the new disk reads wrong");
    let fetched = CHANGED.len() as u64 + 2;
    assert_eq!(s.origin.counts().1, fetched * BS, "bytes fetched");
    assert_eq!(engine.reuse_stats(), ReuseStats { blocks: N - fetched, bytes: (N - fetched) * BS });
}

/// Tried: both layers partial in the store. One process (engine) reads the first half of the
/// old disk; a second reads the whole new disk, then (same engine) the whole old disk.
/// Must hold: the new disk reuses the 28 unchanged blocks of the first half that the old
/// partial file holds (found in its data, not its holes) and fetches the other 36; the old disk
/// then fetches only its block 50 (the one block of the second half the new layer changed):
/// the new layer's blocks landed in this process are found too. Both read right.
#[test]
fn blocks_of_partial_layers_are_found_in_their_data_and_as_they_land() {
    let s = setup(false);
    let old_disk = disk_on(s.dir.path(), "old", &s.old);
    let new_disk = disk_on(s.dir.path(), "new", &s.new);
    let old_bytes = content(false);
    {
        let engine = Engine::default();
        let d = open(&engine, &old_disk, &s.origin, WIDE);
        let mut half = vec![0u8; (N / 2 * BS) as usize];
        d.read(0, &mut half).unwrap();
        assert!(half[..] == old_bytes[..half.len()]);
        assert_eq!(s.origin.counts().1, N / 2 * BS);
        assert_eq!(engine.reuse_stats().blocks, 0, "nothing to reuse yet");
    }
    let engine = Engine::default();
    let before = s.origin.counts().1;
    let d = open(&engine, &new_disk, &s.origin, WIDE);
    assert!(read_all(&d) == content(true), "the new disk reads wrong");
    let reused = (0..N / 2).filter(|b| !CHANGED.contains(b)).count() as u64;
    assert_eq!(reused, 28);
    assert_eq!(s.origin.counts().1 - before, (N - reused) * BS, "new disk: bytes fetched");
    assert_eq!(engine.reuse_stats().blocks, reused);
    let before = s.origin.counts().1;
    let d = open(&engine, &old_disk, &s.origin, WIDE);
    assert!(read_all(&d) == old_bytes, "the old disk reads wrong");
    assert_eq!(s.origin.counts().1 - before, BS, "old disk: only block 50 is fetched");
    assert_eq!(engine.reuse_stats().blocks, reused + N / 2 - 1);
}

/// Tried: the old layer complete in the store, the new one partial; a prefetch of every block
/// of the new disk (`Disk::prefetch_runs`, what a boot trace runs), then a whole read.
/// Must hold: the prefetch fetches exactly the 5 changed blocks, as one range per run of them
/// (3), and reuses the other 59; the read then fetches nothing and gives the new bytes.
#[test]
fn a_prefetch_fetches_only_the_changed_blocks() {
    let s = setup(true);
    let disk = disk_on(s.dir.path(), "new", &s.new);
    let engine = Engine::default();
    let d = open(&engine, &disk, &s.origin, FetchPolicy::default());
    d.prefetch_runs(&[(0, N)]).unwrap();
    let k = CHANGED.len() as u64;
    assert_eq!(s.origin.counts(), (3, k * BS), "(ranges, bytes) fetched by the prefetch");
    assert_eq!(engine.reuse_stats(), ReuseStats { blocks: N - k, bytes: (N - k) * BS });
    assert!(read_all(&d) == content(true), "the new disk reads wrong");
    assert_eq!(s.origin.counts(), (3, k * BS), "the read after the prefetch fetched");
}

/// Tried: layers of 2,048 blocks of 4 KiB, whose hash tables span 5 index chunks of 16 KiB. The
/// old layer is a partial copy pulled with index chunks whose data is all in its file but whose
/// hash table chunk 2 is not (a hole); the new one (3 blocks changed) a partial copy with the
/// extent index's chunk only. The new disk is read whole.
/// Must hold: it reads right; the blocks whose old hashes are in chunk 2 are fetched (the index
/// skips a chunk that is not there: its hashes are unknown), and of the others only the changed
/// ones; the first read of each hash chunk asks for the chunk alone (its blocks are looked for
/// locally first).
#[test]
fn chunked_layers_reuse_the_blocks_whose_hashes_are_there() {
    use mcow_engine::chunks::IndexChunks;
    const BS4: u64 = 4096;
    const N4: u64 = 2048;
    let changed = [7, 1000, 1001];
    let dir = tempfile::tempdir().unwrap();
    let (old_bytes, new_bytes) = (content_of(BS4, N4, &changed, false), content_of(BS4, N4, &changed, true));
    let old = sealed_layer(dir.path(), "old-src", BS4, &old_bytes);
    let new = sealed_layer(dir.path(), "new-src", BS4, &new_bytes);
    let origin_dir = dir.path().join("origin");
    let store = LayerStore::new(dir.path().join("local"));
    // Adds `digest` pulled with index chunks, with the chunks `have`; returns its chunk list.
    let add = |digest: &Digest, have: &dyn Fn(usize) -> bool| {
        let bytes = std::fs::read(origin_dir.join("blobs/sha256").join(digest.hex())).unwrap();
        let t = Trailer::decode(&bytes[bytes.len() - TRAILER_SIZE..]).unwrap();
        let at = t.index_offset(BS4 as u32) as usize;
        let region = &bytes[at..bytes.len() - TRAILER_SIZE];
        let chunks = IndexChunks::of(region, t.extent_count);
        let pieces: Vec<(usize, Vec<u8>)> = (0..chunks.digests.len())
            .filter(|&c| have(c) || chunks.extent_chunks().contains(&c))
            .map(|c| {
                let (off, len) = chunks.range(c, region.len() as u64);
                (c, region[off as usize..(off + len) as usize].to_vec())
            })
            .collect();
        let trailer = &bytes[bytes.len() - TRAILER_SIZE..];
        let len = bytes.len() as u64;
        store
            .add_partial_chunked(
                digest,
                len,
                &bytes[..HEADER_SIZE],
                trailer,
                &chunks,
                &pieces,
                &t.index_digest,
                None,
            )
            .unwrap();
        (chunks, bytes)
    };
    let (chunks, old_file) = add(&old, &|c| c != 2);
    assert_eq!(chunks.digests.len(), 5, "the hash table spans 5 chunks");
    // The old layer's data, all local (as if fetched before), its chunk 2 still missing.
    let data = HEADER_SIZE..HEADER_SIZE + (N4 * BS4) as usize;
    let f = std::fs::OpenOptions::new().write(true).open(store.partial_path(&old)).unwrap();
    f.write_all_at(&old_file[data.clone()], HEADER_SIZE as u64).unwrap();
    drop(f);
    add(&new, &|_| false);
    // The blocks whose hashes chunk 2 holds.
    let in_chunk = |p: u64| (chunks.extents_len() + p * 32) / chunks.size;
    let unknown: Vec<u64> = (0..N4).filter(|&p| in_chunk(p) == 2).collect();
    assert!(!unknown.is_empty() && unknown.iter().all(|p| !changed.contains(p)));
    let data_end = data.end as u64;
    let origin = Arc::new(StoreSource::new(origin_dir.clone()).counting_below(data_end));
    let disk = disk_of(dir.path(), "new", &new, BS4, N4);
    let engine = Engine::default();
    let d = open(&engine, &disk, &origin, FetchPolicy { window: 64, readahead: 1 << 20 });
    let mut all = vec![0u8; new_bytes.len()];
    for (i, piece) in all.chunks_mut(256 << 10).enumerate() {
        d.read(i as u64 * (256 << 10), piece).unwrap();
    }
    assert!(all == new_bytes, "the new disk reads wrong");
    let fetched = (changed.len() + unknown.len()) as u64;
    assert_eq!(origin.counts().1, fetched * BS4, "data bytes fetched");
    assert_eq!(engine.reuse_stats().blocks, N4 - fetched);
}

/// Tried: only the new layer (partial) in the store; its disk reads block 0 (which builds the
/// store's block index, with nothing to reuse), then the old layer is adopted into the store
/// (`LayerStore::adopt`, as a full pull does), then the disk reads the rest.
/// Must hold: block 0 is fetched; after the adoption only the 4 other changed blocks are
/// fetched and the 59 others are copied from the adopted layer; the disk reads right.
#[test]
fn a_layer_added_after_the_index_was_built_is_found() {
    let s = setup(true);
    let local = s.dir.path().join("local");
    let old_file = local.join("blobs/sha256").join(s.old.hex());
    let kept = s.dir.path().join("old.layer");
    std::fs::rename(&old_file, &kept).unwrap();
    let disk = disk_on(s.dir.path(), "new", &s.new);
    let engine = Engine::default();
    let d = open(&engine, &disk, &s.origin, WIDE);
    let expected = content(true);
    let mut first = vec![0u8; BS as usize];
    d.read(0, &mut first).unwrap();
    assert!(first[..] == expected[..BS as usize]);
    assert_eq!(s.origin.counts().1, BS);
    let store = d.store().clone();
    let tmp = store.tmp_path().join("adopted");
    std::fs::create_dir_all(store.tmp_path()).unwrap();
    std::fs::copy(&kept, &tmp).unwrap();
    store.adopt(&tmp, &s.old).unwrap();
    assert!(read_all(&d) == expected, "the new disk reads wrong");
    let k = CHANGED.len() as u64;
    assert_eq!(s.origin.counts().1, (1 + k) * BS, "bytes fetched");
    assert_eq!(engine.reuse_stats().blocks, N - 1 - k);
}
