//! The bounded cache (`EngineConfig::cache_limit`, `mcow serve --cache-limit`): fetched blocks
//! of partial layers past the limit are dropped (holes punched), least recently used first, and
//! fetched again when read; complete layers and writable tops are never touched.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use common::source::StoreSource;
use mcow_engine::store::LayerStore;
use mcow_engine::{CreateOptions, Digest, Disk, Engine, EngineConfig, FetchPolicy, OpenOptions};
use mcow_format::{HEADER_SIZE, TRAILER_SIZE, Trailer};

const BS: u64 = 65536;
/// Blocks per layer: the disk is two layers of 128 blocks (8 MiB each).
const HALF: u64 = 128;

/// What every byte of the disk holds.
fn expected() -> Vec<u8> {
    (0..2 * HALF * BS).map(|i| (i / 4096 * 13 + i % 251) as u8).collect()
}

/// In `dir/a`: a disk of two layers, the bottom one holding the first half of [`expected`],
/// the top one the second half. In `dir/b`: a disk on the same layers, whose store holds the
/// bottom layer complete and the top one partial (header and tail only). Returns the `b` disk
/// and the digests (bottom, top).
fn build(dir: &Path) -> (PathBuf, Digest, Digest) {
    let disk = dir.join("a/disk");
    let all = expected();
    let opts = CreateOptions {
        virtual_size: 2 * HALF * BS,
        block_size: BS as u32,
        store: dir.join("a/layers"),
        layers: vec![],
    };
    Disk::create(&disk, &opts).unwrap();
    for half in 0..2u64 {
        let d = Disk::open(&disk, OpenOptions::default()).unwrap();
        let at = (half * HALF * BS) as usize;
        d.write(at as u64, &all[at..at + (HALF * BS) as usize]).unwrap();
        d.flush().unwrap();
        drop(d);
        mcow_engine::ops::merge(&disk, 0, &mut |_, _| {}).unwrap();
    }
    let src = Disk::open(&disk, OpenOptions { read_only: true, verify: true, force_share: true }).unwrap();
    let stack = src.stack();
    let layers = stack.layers();
    let (bottom, top) = (layers[0].digest, layers[1].digest);
    let store = LayerStore::new(dir.join("b/layers"));
    let dest = store.layer_path(&bottom);
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::copy(&layers[0].path, &dest).unwrap();
    let bytes = std::fs::read(&layers[1].path).unwrap();
    let t = Trailer::decode(&bytes[bytes.len() - TRAILER_SIZE..]).unwrap();
    let tail_at = t.index_offset(BS as u32) as usize;
    store
        .add_partial(
            &top,
            bytes.len() as u64,
            &bytes[..HEADER_SIZE],
            &bytes[tail_at..],
            &t.index_digest,
            None,
        )
        .unwrap();
    let m = src.manifest();
    let opts = CreateOptions {
        virtual_size: m.virtual_size,
        block_size: m.block_size,
        store: dir.join("b/layers"),
        layers: m.layers.clone(),
    };
    Disk::create(&dir.join("b/disk"), &opts).unwrap();
    (dir.join("b/disk"), bottom, top)
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn engine(limit: u64) -> Engine {
    Engine::new(EngineConfig { cache_limit: Some(limit), ..EngineConfig::default() })
}

// Tried: a 1 MiB limit, a disk whose lower half is a complete layer and whose upper half (8
// MiB, 8x the limit) is a partial layer, read front to back in 64 KiB reads (the upper half is
// 4x the limit twice over), with 4-block fetch windows; a write to the writable top; the first
// 2 MiB of the partial half read again; a restart with half the limit.
// Must hold: every read returns the source's bytes; after every read the cache counts at most
// the limit plus one fetch window and the partial file's allocation grew by no more than that;
// the blocks read again (dropped long ago) are fetched again (the source counts them) and read
// right; the complete layer's file is unchanged (same digest, fully allocated) and the top
// keeps what was written; reopened with half the limit, the cache drops down to it at once.
#[test]
fn reading_past_the_limit_drops_the_oldest_fetched_blocks_and_fetches_them_again() {
    const LIMIT: u64 = 1 << 20;
    let window = 4 * BS;
    let tmp = tempfile::tempdir().unwrap();
    let (disk, bottom, top) = build(tmp.path());
    let store = LayerStore::new(tmp.path().join("b/layers"));
    let (complete, partial) = (store.layer_path(&bottom), store.partial_path(&top));
    let complete_alloc = allocated(&complete);
    let base = allocated(&partial);
    let all = expected();
    let src = Arc::new(StoreSource::new(tmp.path().join("a/layers")));
    let policy = FetchPolicy { window: 4, readahead: 0 };
    let e = engine(LIMIT);
    {
        let d = Disk::open_with_source_in(&e, &disk, OpenOptions::default(), src.clone(), policy).unwrap();
        d.write(5 * BS + 100, b"kept in the top").unwrap();
        let mut buf = vec![0u8; BS as usize];
        for b in 0..2 * HALF {
            d.read(b * BS, &mut buf).unwrap();
            let at = (b * BS) as usize;
            if b != 5 {
                assert!(buf == all[at..at + BS as usize], "block {b} reads wrong");
            }
            let stats = e.cache_stats().unwrap();
            assert!(stats.bytes <= LIMIT + window, "after block {b}: the cache counts {} bytes", stats.bytes);
            let grown = allocated(&partial) - base;
            assert!(grown <= LIMIT + window, "after block {b}: the partial file grew by {grown} bytes");
        }
        let fetched = src.fetched.load(Ordering::Relaxed);
        assert_eq!(fetched, HALF * BS, "the partial half is fetched once");
        let stats = e.cache_stats().unwrap();
        assert!(stats.dropped_bytes >= HALF * BS - LIMIT - window, "{stats:?}");
        // The first 2 MiB of the partial half were dropped: read again, they are fetched again.
        let before = d.cache_reads();
        for b in HALF..HALF + 32 {
            d.read(b * BS, &mut buf).unwrap();
            let at = (b * BS) as usize;
            assert!(buf == all[at..at + BS as usize], "block {b} reads wrong after it was dropped");
        }
        // (The re-read is a new run of reads: its last window may reach past the 32 blocks.)
        let again = src.fetched.load(Ordering::Relaxed) - fetched;
        assert!((32 * BS..=32 * BS + window).contains(&again), "dropped blocks fetched again: {again} bytes");
        // Each block read once, counted once; at least one miss per fetch window.
        let after = d.cache_reads();
        let (hits, misses) = (after.hits - before.hits, after.misses - before.misses);
        assert_eq!(hits + misses, 32, "{before:?} -> {after:?}");
        assert!(misses >= 32 / 4, "{before:?} -> {after:?}");
        assert!(e.cache_stats().unwrap().bytes <= LIMIT + window);
        let mut t = vec![0u8; 15];
        d.read(5 * BS + 100, &mut t).unwrap();
        assert_eq!(&t, b"kept in the top");
        let mut whole = vec![0u8; all.len()];
        d.read(0, &mut whole).unwrap();
        assert_eq!(whole[..5 * BS as usize], all[..5 * BS as usize]);
        assert_eq!(whole[6 * BS as usize..], all[6 * BS as usize..]);
    }
    assert_eq!(mcow_engine::store::hash_file(&complete).unwrap(), bottom, "the complete layer changed");
    assert_eq!(allocated(&complete), complete_alloc, "the complete layer lost blocks");
    drop(e);
    // Restart with half the limit: the blocks in the file count, and the excess goes at once.
    let e = engine(LIMIT / 2);
    let d = Disk::open_with_source_in(&e, &disk, OpenOptions::default(), src.clone(), policy).unwrap();
    assert!(e.cache_stats().unwrap().bytes <= LIMIT / 2);
    assert!(allocated(&partial) - base <= LIMIT / 2, "grew by {}", allocated(&partial) - base);
    let mut whole = vec![0u8; all.len()];
    d.read(0, &mut whole).unwrap();
    assert_eq!(whole[HALF as usize * BS as usize..], all[HALF as usize * BS as usize..]);
}

// Tried: 4 threads reading random blocks of the partial half (16 KiB at random offsets inside
// a block, and whole blocks) through one disk with a limit of 8 blocks and exact fetches, so
// that blocks are dropped while other threads read them.
// Must hold: every read returns the source's bytes (a reader that found a block present never
// returns a punched hole), and the cache stays within the limit plus the blocks of the reads
// in flight.
#[test]
fn concurrent_readers_of_dropped_blocks_read_right() {
    const LIMIT: u64 = 8 * BS;
    let tmp = tempfile::tempdir().unwrap();
    let (disk, _, _) = build(tmp.path());
    let all = expected();
    let src = Arc::new(StoreSource::new(tmp.path().join("a/layers")));
    let e = engine(LIMIT);
    let policy = FetchPolicy { window: 1, readahead: 0 };
    let d = Disk::open_with_source_in(&e, &disk, OpenOptions::default(), src.clone(), policy).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (d, all) = (&d, &all);
            s.spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                for i in 0..600 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // A few hot blocks and the rest of the partial half.
                    let b = HALF + if i % 3 == 0 { x % 4 } else { x % HALF };
                    let (off, len) = if i % 2 == 0 { ((x >> 20) % (BS - 16384), 16384) } else { (0, BS) };
                    let at = b * BS + off;
                    let mut buf = vec![0u8; len as usize];
                    d.read(at, &mut buf).unwrap();
                    assert!(
                        buf == all[at as usize..(at + len) as usize],
                        "thread {t} read {i}: block {b} wrong"
                    );
                }
            });
        }
    });
    let stats = e.cache_stats().unwrap();
    assert!(stats.bytes <= LIMIT + 4 * BS, "{stats:?}");
    assert!(stats.dropped_blocks > 100, "blocks were dropped: {stats:?}");
}

// Tried: the cache-hit counts (`Disk::cache_reads`) of a disk whose lower half is a complete
// layer and upper half a partial one, fetched with one-block windows and no read-ahead: reads
// of the complete half; eight blocks of the partial half read one at a time, then again; a
// 16 KiB read inside a block; a read across three pieces (partial layer, writable top, partial
// layer: the pieces are fetched at once); zero-copy reads (`read_mapped`) of local blocks and
// of a range with data in the top; then the disk reopened on the same store.
// Must hold: the complete half and the top count nothing; a first read of a block is one
// miss, a later read one hit; a read counts each block once (the pieces fetched at once are
// not counted again when read); a mapped read that falls back counts nothing; after the
// reopen, blocks fetched before count as hits and nothing is fetched.
#[test]
fn reads_count_cache_hits_and_misses_per_block() {
    let tmp = tempfile::tempdir().unwrap();
    let (disk, _, _) = build(tmp.path());
    let all = expected();
    let src = Arc::new(StoreSource::new(tmp.path().join("a/layers")));
    let policy = FetchPolicy { window: 1, readahead: 0 };
    let open = || Disk::open_with_source(&disk, OpenOptions::default(), src.clone(), policy).unwrap();
    let d = open();
    let reads = |d: &Disk| {
        let r = d.cache_reads();
        (r.hits, r.misses)
    };
    let mut buf = vec![0u8; BS as usize];
    for b in 0..8 {
        d.read(b * BS, &mut buf).unwrap();
    }
    assert_eq!(reads(&d), (0, 0), "reads of a complete layer are not counted");
    for b in HALF..HALF + 8 {
        d.read(b * BS, &mut buf).unwrap();
        assert!(buf == all[(b * BS) as usize..][..BS as usize], "block {b}");
    }
    assert_eq!(reads(&d), (0, 8), "first reads: one miss a block");
    for b in HALF..HALF + 8 {
        d.read(b * BS, &mut buf).unwrap();
    }
    assert_eq!(reads(&d), (8, 8), "second reads: one hit a block");
    let mut small = vec![0u8; 16384];
    d.read((HALF + 9) * BS + 4096, &mut small).unwrap();
    assert_eq!(reads(&d), (8, 9), "a read inside a block counts that block once");
    // Blocks HALF+10..HALF+15, with HALF+12 in the top: three pieces, four partial blocks.
    d.write((HALF + 12) * BS, &vec![7u8; BS as usize]).unwrap();
    let mut span = vec![0u8; 5 * BS as usize];
    d.read((HALF + 10) * BS, &mut span).unwrap();
    assert!(span[..2 * BS as usize] == all[((HALF + 10) * BS) as usize..][..2 * BS as usize]);
    assert!(span[2 * BS as usize..3 * BS as usize].iter().all(|&x| x == 7));
    assert!(span[3 * BS as usize..] == all[((HALF + 13) * BS) as usize..][..2 * BS as usize]);
    assert_eq!(reads(&d), (8, 13), "the pieces fetched at once count once");
    d.read((HALF + 10) * BS, &mut span).unwrap();
    assert_eq!(reads(&d), (12, 13));
    let mut sent = 0;
    assert!(
        d.read_mapped(HALF * BS, 4 * BS as usize, &mut |parts| sent = parts.iter().map(|p| p.len()).sum())
            .unwrap()
    );
    assert_eq!((sent, reads(&d)), (4 * BS as usize, (16, 13)), "a mapped read counts too");
    assert!(!d.read_mapped((HALF + 11) * BS, 3 * BS as usize, &mut |_| panic!("sent")).unwrap());
    assert_eq!(reads(&d), (16, 13), "a mapped read that falls back counts nothing");
    d.flush().unwrap();
    drop(d);
    let fetched = src.fetched.load(Ordering::Relaxed);
    let d = open();
    for b in HALF..HALF + 8 {
        d.read(b * BS, &mut buf).unwrap();
        assert!(buf == all[(b * BS) as usize..][..BS as usize], "block {b} after the reopen");
    }
    assert_eq!(reads(&d), (8, 0), "blocks fetched before the reopen are hits");
    assert_eq!(src.fetched.load(Ordering::Relaxed), fetched, "nothing fetched again");
}
