//! Partial layers: blocks fetched on demand from a `BlockSource`, checked against their hashes,
//! cached in the local file, never fetched twice, and never cached when wrong.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::source::StoreSource;
use mcow_engine::store::LayerStore;
use mcow_engine::{CreateOptions, Digest, Disk, FetchPolicy, OpenOptions};

/// Fetches exactly the blocks read.
const EXACT: FetchPolicy = FetchPolicy { window: 1, readahead: 0 };
use mcow_format::{HEADER_SIZE, TRAILER_SIZE, Trailer};

/// A 3-layer disk with data in every layer, built in `dir/a`; returns the disk and its bytes.
fn build_complete(dir: &Path) -> (PathBuf, Vec<u8>) {
    let disk = dir.join("a/disk");
    let size = 4u64 << 20;
    Disk::create(
        &disk,
        &CreateOptions { virtual_size: size, block_size: 65536, store: dir.join("a/layers"), layers: vec![] },
    )
    .unwrap();
    for layer in 0..3u8 {
        let d = Disk::open(&disk, OpenOptions::default()).unwrap();
        for k in 0..10u64 {
            let off = (k * 5 + u64::from(layer)) * 65536 + 1000;
            d.write(off, &vec![layer * 40 + k as u8 + 1; 70000]).unwrap();
        }
        d.flush().unwrap();
        drop(d);
        mcow_engine::ops::merge(&disk, 0, &mut |_, _| {}).unwrap();
    }
    let d = Disk::open(&disk, OpenOptions::default()).unwrap();
    let mut all = vec![0u8; size as usize];
    d.read(0, &mut all).unwrap();
    (disk, all)
}

/// A disk in `dir/b` on partial copies (header and tail only) of the complete disk's layers.
fn build_partial(dir: &Path, complete: &Path) -> PathBuf {
    let src = Disk::open(complete, OpenOptions { read_only: true, verify: true, force_share: true }).unwrap();
    let store = LayerStore::new(dir.join("b/layers"));
    for l in src.stack().layers() {
        let bytes = std::fs::read(&l.path).unwrap();
        let len = bytes.len() as u64;
        let t = Trailer::decode(&bytes[bytes.len() - TRAILER_SIZE..]).unwrap();
        let tail_at = t.index_offset(l.header.block_size) as usize;
        store
            .add_partial(&l.digest, len, &bytes[..HEADER_SIZE], &bytes[tail_at..], &t.index_digest, None)
            .unwrap();
    }
    disk_like(&src.manifest(), &dir.join("b/disk"), &dir.join("b/layers"))
}

/// A second disk, `dir/b/disk2`, on the same (partial) layers as `first`, in the same store.
fn second_disk(dir: &Path, first: &Path) -> PathBuf {
    let m = mcow_engine::disk::read_manifest(first).unwrap();
    disk_like(&m, &dir.join("b/disk2"), &dir.join("b/layers"))
}

/// A new disk at `path` with the size, block size and layers of manifest `m`, its layers in
/// the store `store`.
fn disk_like(m: &mcow_format::DiskManifest, path: &Path, store: &Path) -> PathBuf {
    let opts = CreateOptions {
        virtual_size: m.virtual_size,
        block_size: m.block_size,
        store: store.to_path_buf(),
        layers: m.layers.clone(),
    };
    Disk::create(path, &opts).unwrap();
    path.to_path_buf()
}

#[test]
fn lazy_reads_fetch_each_block_once_and_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let (complete, expected) = build_complete(tmp.path());
    let partial = build_partial(tmp.path(), &complete);
    let src = Arc::new(StoreSource::new(tmp.path().join("a/layers")));
    let stored: u64 = {
        let d =
            Disk::open(&complete, OpenOptions { read_only: true, verify: true, force_share: true }).unwrap();
        d.stack().layers().iter().map(|l| l.trailer.block_count * 65536).sum()
    };
    {
        let d = Disk::open_with_source(&partial, OpenOptions::default(), src.clone(), FetchPolicy::default())
            .unwrap();
        // A small scattered read fetches its own block, not a window, not the layer.
        let mut b = vec![0u8; 4096];
        d.read(1000, &mut b).unwrap();
        assert_eq!(b, expected[1000..5096]);
        assert_eq!(src.fetched.load(Ordering::Relaxed), 65536);
        let mut all = vec![0u8; expected.len()];
        d.read(0, &mut all).unwrap();
        assert!(all == expected, "lazy disk differs from the original");
    }
    let first = src.fetched.load(Ordering::Relaxed);
    assert!(first <= stored, "fetched {first} bytes for {stored} stored");
    // Restart: everything is local now.
    let d = Disk::open_with_source(&partial, OpenOptions::default(), src.clone(), FetchPolicy::default())
        .unwrap();
    let mut all = vec![0u8; expected.len()];
    d.read(0, &mut all).unwrap();
    assert!(all == expected);
    assert_eq!(src.fetched.load(Ordering::Relaxed), first, "a restart fetched again");
    // Reads never fetch the blocks upper layers hide; a background download (`fetch_all`, as
    // `serve --fetch-all` runs it) fetches just those. Then every partial copy is complete and
    // moves into the store's blobs.
    let stop = AtomicBool::new(false);
    for l in d.stack().layers() {
        l.fetch_all(&stop).unwrap();
    }
    let hidden = src.fetched.load(Ordering::Relaxed) - first;
    assert_eq!(first + hidden, stored, "read {first}, then the hidden {hidden}, of {stored} stored");
    let store = LayerStore::new(tmp.path().join("b/layers"));
    for l in d.stack().layers() {
        assert!(store.complete_partial(&l.digest).unwrap(), "layer {} not complete", l.digest);
        assert!(store.contains(&l.digest));
    }
}

/// `Disk::fetch_rest` (what `serve --fetch-all` runs). Tried: a partial disk asked first with
/// `stop` already set, then without. Must hold: stopped, it fetches nothing and completes
/// nothing; then it fetches exactly the stored bytes once, completes every layer (each is then
/// in the store's complete layers), and the disk reads the original bytes.
#[test]
fn fetch_rest_downloads_every_partial_layer_and_completes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (complete, expected) = build_complete(tmp.path());
    let partial = build_partial(tmp.path(), &complete);
    let src = Arc::new(StoreSource::new(tmp.path().join("a/layers")));
    let d = Disk::open_with_source(&partial, OpenOptions::default(), src.clone(), FetchPolicy::default())
        .unwrap();
    let stored: u64 = d.stack().layers().iter().map(|l| l.trailer.block_count * 65536).sum();
    let stopped = d.fetch_rest(&AtomicBool::new(true));
    assert_eq!(stopped, mcow_engine::FetchRest { completed: 0, failed: 0, stopped: true });
    assert_eq!(src.fetched.load(Ordering::Relaxed), 0, "a stopped download fetched");
    let done = d.fetch_rest(&AtomicBool::new(false));
    let depth = d.stack().depth();
    assert_eq!(done, mcow_engine::FetchRest { completed: depth, failed: 0, stopped: false });
    assert_eq!(src.fetched.load(Ordering::Relaxed), stored, "each stored byte fetched once");
    for l in d.stack().layers() {
        assert!(d.store().contains(&l.digest), "layer {} not complete", l.digest);
    }
    let mut all = vec![0u8; expected.len()];
    d.read(0, &mut all).unwrap();
    assert!(all == expected);
}

/// `Disk::read_mapped` (the NBD server's copy-free reads) on lazily fetched layers. Tried: four
/// threads reading the whole disk through it in 256 KiB pieces, then a tampered source, then a
/// write into the writable top. Must hold: the pieces are the disk's bytes and no block is
/// fetched twice; with a tampered source it fails and does not call `send`; a range holding
/// top data is declined (false, `send` not called) and `Disk::read` gives it right.
#[test]
fn mapped_reads_fetch_check_and_fall_back_like_copying_reads() {
    const PIECE: u64 = 256 << 10;
    let tmp = tempfile::tempdir().unwrap();
    let (complete, expected) = build_complete(tmp.path());
    let partial = build_partial(tmp.path(), &complete);
    let src = Arc::new(StoreSource::new(tmp.path().join("a/layers")).corrupting(true));
    let mapped = |d: &Disk, offset: u64, len: usize| {
        let mut got = None;
        let ok = d.read_mapped(offset, len, &mut |parts: &[&[u8]]| got = Some(parts.concat()));
        (ok, got)
    };
    let d = Arc::new(
        Disk::open_with_source(&partial, OpenOptions::default(), src.clone(), FetchPolicy::default())
            .unwrap(),
    );
    let (ok, got) = mapped(&d, 65536, 65536);
    assert!(ok.unwrap_err().to_string().contains("checksum"));
    assert!(got.is_none(), "send was called for a failed read");
    src.corrupt.store(false, Ordering::Relaxed);
    src.fetched.store(0, Ordering::Relaxed);

    let next = Arc::new(AtomicU64::new(0));
    let size = expected.len() as u64;
    let expected = Arc::new(expected);
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (d, next, expected) = (d.clone(), next.clone(), expected.clone());
            std::thread::spawn(move || {
                loop {
                    let at = next.fetch_add(PIECE, Ordering::SeqCst);
                    if at >= size {
                        return;
                    }
                    let mut got = None;
                    let ok =
                        d.read_mapped(at, PIECE as usize, &mut |parts: &[&[u8]]| got = Some(parts.concat()));
                    assert!(ok.unwrap(), "a lazy sealed range was declined at {at}");
                    assert!(got.unwrap()[..] == expected[at as usize..][..PIECE as usize], "bytes at {at}");
                }
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    let stored: u64 = d.stack().layers().iter().map(|l| l.trailer.block_count * 65536).sum();
    let fetched = src.fetched.load(Ordering::Relaxed);
    assert!(fetched > 0 && fetched <= stored, "fetched {fetched} of {stored} stored");

    // Top data: declined, and the copying read has it.
    d.write(70000, &[0xee; 100]).unwrap();
    let (ok, got) = mapped(&d, 65536, 65536);
    assert!(!ok.unwrap() && got.is_none());
    let mut b = vec![0u8; 65536];
    d.read(65536, &mut b).unwrap();
    let mut want = expected[65536..131072].to_vec();
    want[70000 - 65536..][..100].fill(0xee);
    assert_eq!(b, want);
    // Elsewhere still mapped, and nothing was fetched again.
    let (ok, got) = mapped(&d, 3 << 20, 65536);
    assert!(ok.unwrap());
    assert!(got.unwrap()[..] == expected[3 << 20..][..65536]);
    assert_eq!(src.fetched.load(Ordering::Relaxed), fetched);
}

#[test]
fn tampered_fetches_are_errors_and_never_cached() {
    let tmp = tempfile::tempdir().unwrap();
    let (complete, expected) = build_complete(tmp.path());
    let partial = build_partial(tmp.path(), &complete);
    let src = Arc::new(StoreSource::new(tmp.path().join("a/layers")).corrupting(true));
    {
        let d = Disk::open_with_source(&partial, OpenOptions::default(), src.clone(), EXACT).unwrap();
        let mut b = vec![0u8; 65536];
        let err = d.read(0, &mut b).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
    }
    // With an honest source the same disk reads right: nothing bad was kept.
    src.corrupt.store(false, Ordering::Relaxed);
    let d = Disk::open_with_source(&partial, OpenOptions::default(), src.clone(), EXACT).unwrap();
    let mut all = vec![0u8; expected.len()];
    d.read(0, &mut all).unwrap();
    assert!(all == expected);
}

#[test]
fn a_partial_layer_without_a_source_is_a_clear_error_and_bad_tails_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (complete, _) = build_complete(tmp.path());
    let partial = build_partial(tmp.path(), &complete);
    let err = Disk::open(&partial, OpenOptions::default()).err().expect("must fail");
    assert!(err.to_string().contains("partly"), "{err}");
    // A tail whose index does not match the pinned digest is refused.
    let src =
        Disk::open(&complete, OpenOptions { read_only: true, verify: true, force_share: true }).unwrap();
    let stack = src.stack();
    let l = &stack.layers()[0];
    let bytes = std::fs::read(&l.path).unwrap();
    let t = Trailer::decode(&bytes[bytes.len() - TRAILER_SIZE..]).unwrap();
    let tail_at = t.index_offset(l.header.block_size) as usize;
    let store = LayerStore::new(tmp.path().join("c"));
    let wrong = Digest::of(b"not the index");
    let err = store
        .add_partial(&l.digest, bytes.len() as u64, &bytes[..HEADER_SIZE], &bytes[tail_at..], &wrong, None)
        .unwrap_err();
    assert!(err.to_string().contains("index digest"), "{err}");
    let mut tampered = bytes[tail_at..].to_vec();
    tampered[0] ^= 1;
    assert!(
        store
            .add_partial(
                &l.digest,
                bytes.len() as u64,
                &bytes[..HEADER_SIZE],
                &tampered,
                &t.index_digest,
                None
            )
            .is_err()
    );
    assert!(!store.partial_path(&l.digest).exists(), "nothing is left behind");
}

#[test]
fn disks_on_the_same_partial_layers_fetch_each_block_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (complete, expected) = build_complete(tmp.path());
    let first = build_partial(tmp.path(), &complete);
    // A second disk (another VM) on the same partial layers, in the same store, opened in the
    // same engine (as `serve` opens its exports).
    let second = second_disk(tmp.path(), &first);
    let src = Arc::new(StoreSource::new(tmp.path().join("a/layers")));
    let engine = mcow_engine::Engine::default();
    let a = Disk::open_with_source_in(&engine, &first, OpenOptions::default(), src.clone(), EXACT).unwrap();
    let b = Disk::open_with_source_in(&engine, &second, OpenOptions::default(), src.clone(), EXACT).unwrap();
    let mut all = vec![0u8; expected.len()];
    a.read(0, &mut all).unwrap();
    assert!(all == expected);
    let once = src.fetched.load(Ordering::Relaxed);
    b.read(0, &mut all).unwrap();
    assert!(all == expected);
    assert_eq!(src.fetched.load(Ordering::Relaxed), once, "the second disk fetched blocks again");
}

#[test]
fn a_partial_layer_is_fetched_and_checked_even_with_verification_off() {
    let tmp = tempfile::tempdir().unwrap();
    let (complete, expected) = build_complete(tmp.path());
    let partial = build_partial(tmp.path(), &complete);
    let src = Arc::new(StoreSource::new(tmp.path().join("a/layers")));
    let opts = OpenOptions { read_only: true, verify: false, force_share: false };
    let d = Disk::open_with_source(&partial, opts, src.clone(), FetchPolicy::default()).unwrap();
    let mut all = vec![0u8; expected.len()];
    d.read(0, &mut all).unwrap();
    assert!(all == expected, "unfetched blocks must not read as zeros");
    assert!(src.fetched.load(Ordering::Relaxed) > 0);
}

/// A one-layer disk in `dir/a` whose `blocks` blocks all hold data (a different pattern each);
/// returns the disk and its bytes.
fn build_long(dir: &Path, blocks: u64) -> (PathBuf, Vec<u8>) {
    let disk = dir.join("a/disk");
    let bs = 65536u64;
    Disk::create(
        &disk,
        &CreateOptions {
            virtual_size: blocks * bs,
            block_size: bs as u32,
            store: dir.join("a/layers"),
            layers: vec![],
        },
    )
    .unwrap();
    let all: Vec<u8> = (0..blocks * bs).map(|i| (i / 4096 * 7 + i % 251) as u8).collect();
    let d = Disk::open(&disk, OpenOptions::default()).unwrap();
    d.write(0, &all).unwrap();
    d.flush().unwrap();
    drop(d);
    mcow_engine::ops::merge(&disk, 0, &mut |_, _| {}).unwrap();
    (disk, all)
}

/// [`build_long`] of `blocks` blocks in a new temporary directory, and a disk on partial copies
/// of its layer ([`build_partial`]); returns the directory, the partial disk and its bytes.
fn long_partial(blocks: u64) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    let tmp = tempfile::tempdir().unwrap();
    let (complete, expected) = build_long(tmp.path(), blocks);
    let partial = build_partial(tmp.path(), &complete);
    (tmp, partial, expected)
}

#[test]
fn long_sequential_reads_ramp_up_to_few_large_fetches_and_short_runs_do_not() {
    const BS: u64 = 65536;
    let blocks = 256; // 16 MiB in one layer
    for (policy, max_requests) in
        [(FetchPolicy::default(), 30), (FetchPolicy { window: 4, readahead: 0 }, 65)]
    {
        let (tmp, partial, expected) = long_partial(blocks);
        let src = Arc::new(StoreSource::new(tmp.path().join("a/layers")).hooked(65536, |_, _| true));
        let d = Disk::open_with_source(&partial, OpenOptions::default(), src.clone(), policy).unwrap();
        let mut buf = vec![0u8; BS as usize];
        // A short run (1 MiB, under the 4 MiB ramp): its first read fetches its own block, the
        // reads that continue it what fixed windows of 4 would (1, 3, 4, 4, 4 blocks).
        for b in 0..16 {
            d.read(b * BS, &mut buf).unwrap();
            assert!(buf[..] == expected[(b * BS) as usize..][..BS as usize]);
        }
        assert_eq!(src.handed.load(Ordering::Relaxed), 16 * BS, "{policy:?}");
        assert_eq!(src.requests.load(Ordering::Relaxed), 5, "{policy:?}");
        // The rest, read on sequentially: with read-ahead, larger and larger fetches.
        let mut rest = vec![0u8; ((blocks - 16) * BS) as usize];
        for (i, chunk) in rest.chunks_mut(128 << 10).enumerate() {
            d.read(16 * BS + i as u64 * (128 << 10), chunk).unwrap();
        }
        assert!(rest[..] == expected[(16 * BS) as usize..]);
        let requests = src.requests.load(Ordering::Relaxed);
        assert_eq!(src.handed.load(Ordering::Relaxed), blocks * BS, "each block fetched once ({policy:?})");
        if policy.readahead == 0 {
            assert_eq!(requests, max_requests, "the first block alone, then fixed windows of 4");
        } else {
            assert!(requests <= max_requests, "{requests} requests for {blocks} sequential blocks");
        }
    }
}

#[test]
fn a_reader_waits_for_its_block_to_land_not_for_the_whole_fetch() {
    use std::sync::Mutex;
    use std::sync::mpsc::{channel, sync_channel};
    use std::time::Duration;
    let (tmp, partial, expected) = long_partial(16);
    // The fetch of blocks 0..8 hands over blocks 0 and 1, tells the test, then waits before
    // block 2 and again before block 3.
    let (started_tx, started_rx) = sync_channel::<()>(1);
    let (gate_tx, gate_rx) = channel::<()>();
    let gate_rx = Mutex::new(gate_rx);
    let calls = AtomicU64::new(0);
    let src = Arc::new(StoreSource::new(tmp.path().join("a/layers")).hooked(65536, move |i, _| {
        // Only the first fetch (its blocks are numbered 0.. and come in order) is held.
        let first_fetch = calls.fetch_add(1, Ordering::Relaxed) < 8;
        if first_fetch && i == 2 {
            started_tx.send(()).unwrap();
        }
        if first_fetch && (i == 2 || i == 3) {
            gate_rx.lock().unwrap().recv().unwrap();
        }
        true
    }));
    let policy = FetchPolicy { window: 8, readahead: 0 };
    let d = Arc::new(Disk::open_with_source(&partial, OpenOptions::default(), src.clone(), policy).unwrap());
    let bs = 65536usize;
    // One read of blocks 0..8: one fetch of those 8 blocks.
    let first = {
        let d = d.clone();
        std::thread::spawn(move || {
            let mut b = vec![0u8; 8 * bs];
            d.read(0, &mut b).unwrap();
            b
        })
    };
    started_rx.recv_timeout(Duration::from_secs(10)).expect("the fetch started");
    // Block 2 is in flight: a reader of it waits for it to land, then goes on while the fetch
    // (held before block 3) is still running.
    let (done_tx, done_rx) = channel();
    let second = {
        let d = d.clone();
        std::thread::spawn(move || {
            let mut b = vec![0u8; bs];
            d.read(2 * bs as u64, &mut b).unwrap();
            done_tx.send(()).unwrap();
            b
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(done_rx.try_recv().is_err(), "block 2 cannot be read before it lands");
    gate_tx.send(()).unwrap(); // block 2 lands
    done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the reader of block 2 went on before the fetch ended");
    assert_eq!(src.requests.load(Ordering::Relaxed), 1, "the waiting reader fetched nothing itself");
    gate_tx.send(()).unwrap(); // the rest
    assert!(first.join().unwrap()[..] == expected[..8 * bs]);
    assert!(second.join().unwrap()[..] == expected[2 * bs..3 * bs]);
    let mut all = vec![0u8; expected.len()];
    d.read(0, &mut all).unwrap();
    assert!(all == expected);
    assert_eq!(src.requests.load(Ordering::Relaxed), 2, "blocks 8..16 in one more fetch");
}

#[test]
fn readers_waiting_for_a_fetch_that_fails_get_its_error_instead_of_fetching_again() {
    // Tried: a fetch of blocks 0..8 that hands over blocks 0 and 1, then holds; two readers
    // (of block 5, and of blocks 3..5 in one read) wait for it; then the transfer breaks.
    // Must hold: both waiting readers fail with the fetch's error and fetch nothing themselves;
    // the reader that started the fetch, whose first block landed, fetches the rest (one more
    // request in all); later reads succeed.
    use std::sync::Mutex;
    use std::sync::mpsc::{channel, sync_channel};
    use std::time::Duration;
    let (tmp, partial, expected) = long_partial(16);
    let (started_tx, started_rx) = sync_channel::<()>(1);
    let (gate_tx, gate_rx) = channel::<bool>();
    let gate_rx = Mutex::new(gate_rx);
    let calls = AtomicU64::new(0);
    let src = Arc::new(StoreSource::new(tmp.path().join("a/layers")).hooked(65536, move |i, _| {
        let first_fetch = calls.fetch_add(1, Ordering::Relaxed) < 3;
        if first_fetch && i == 2 {
            started_tx.send(()).unwrap();
            return gate_rx.lock().unwrap().recv().unwrap();
        }
        true
    }));
    let policy = FetchPolicy { window: 8, readahead: 0 };
    let d = Arc::new(Disk::open_with_source(&partial, OpenOptions::default(), src.clone(), policy).unwrap());
    let bs = 65536u64;
    let read = |off: u64, len: u64| {
        let d = d.clone();
        std::thread::spawn(move || d.read(off, &mut vec![0u8; len as usize]).map_err(|e| e.to_string()))
    };
    // (The starter reads all 8 blocks; its bytes are checked by the whole read at the end.)
    let starter = read(0, 8 * bs);
    started_rx.recv_timeout(Duration::from_secs(10)).expect("the fetch started");
    let waiters = [read(5 * bs, bs), read(3 * bs, 2 * bs)];
    std::thread::sleep(Duration::from_millis(200)); // both are waiting now
    gate_tx.send(false).unwrap(); // the transfer breaks before block 2
    for w in waiters {
        let e = w.join().unwrap().unwrap_err();
        assert!(e.contains("transfer broken"), "{e}");
    }
    // The starter had its first block: it goes on, fetching the rest (2..8) itself.
    assert_eq!(starter.join().unwrap(), Ok(()));
    assert_eq!(src.requests.load(Ordering::Relaxed), 2, "a waiting reader fetched again");
    let mut all = vec![0u8; expected.len()];
    d.read(0, &mut all).unwrap();
    assert!(all == expected);
}

#[test]
fn a_fetch_that_breaks_or_turns_bad_midway_keeps_only_the_good_blocks_before() {
    use std::sync::atomic::AtomicU8;
    let (tmp, partial, expected) = long_partial(24);
    // Mode 1: the transfer breaks before the 4th block; mode 2: the 3rd block of a fetch
    // arrives corrupted; mode 3: every block does; mode 0: honest.
    let mode = Arc::new(AtomicU8::new(1));
    let m = mode.clone();
    let src = Arc::new(StoreSource::new(tmp.path().join("a/layers")).hooked(65536, move |i, block| {
        match m.load(Ordering::Relaxed) {
            1 => i < 3,
            2 | 3 => {
                if i == 2 || m.load(Ordering::Relaxed) == 3 {
                    block[100] ^= 1;
                }
                true
            }
            _ => true,
        }
    }));
    let policy = FetchPolicy { window: 8, readahead: 0 };
    let bs = 65536usize;
    let d = Disk::open_with_source(&partial, OpenOptions::default(), src.clone(), policy).unwrap();
    let count =
        |s: &StoreSource| (s.handed.load(Ordering::Relaxed) / bs as u64, s.requests.load(Ordering::Relaxed));
    // One read of blocks 0..8 while every transfer breaks after 3 blocks: the read succeeds,
    // and the blocks that landed before each break are kept: [0,8) gives 0-2, [3,8) 3-5,
    // [6,8) 6-7. Each block fetched once.
    let mut b = vec![0u8; 8 * bs];
    d.read(0, &mut b).unwrap();
    assert!(b[..] == expected[..8 * bs]);
    assert_eq!(count(&src), (8, 3), "(blocks fetched, requests)");
    // Blocks 8..16 while the 3rd block of every transfer is corrupted: each bad block ends its
    // transfer and is not kept; the read still succeeds from the good copies fetched next.
    mode.store(2, Ordering::Relaxed);
    d.read(8 * bs as u64, &mut b).unwrap();
    assert!(b[..] == expected[8 * bs..16 * bs]);
    assert_eq!(count(&src), (8 + 11, 3 + 4), "8,9,(10) 10,11,(12) 12,13,(14) 14,15");
    // With every block corrupted, a read fails with a checksum error.
    mode.store(3, Ordering::Relaxed);
    let err = d.read(20 * bs as u64, &mut b[..bs]).unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
    // Honest again, a new open: blocks 0..16 are read from the cache, which checks each
    // against its hash (a bad one would be fetched again), and only 16..24 are fetched.
    mode.store(0, Ordering::Relaxed);
    drop(d);
    let before = count(&src).0;
    let d = Disk::open_with_source(&partial, OpenOptions::default(), src.clone(), policy).unwrap();
    let mut all = vec![0u8; expected.len()];
    d.read(0, &mut all).unwrap();
    assert!(all == expected);
    assert_eq!(count(&src).0 - before, 8, "only blocks 16..24 were fetched again");
}

#[test]
fn a_deep_queue_of_sequential_reads_fetches_each_block_once_in_growing_requests() {
    const BS: u64 = 65536;
    let blocks = 256u64;
    let (tmp, partial, expected) = long_partial(blocks);
    let src = Arc::new(StoreSource::new(tmp.path().join("a/layers")).hooked(65536, |_, _| true));
    let d = Arc::new(
        Disk::open_with_source(&partial, OpenOptions::default(), src.clone(), FetchPolicy::default())
            .unwrap(),
    );
    // Eight readers take the blocks in turn, as a client with eight requests in flight would.
    let next = Arc::new(AtomicU64::new(0));
    let expected = Arc::new(expected);
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let (d, next, expected) = (d.clone(), next.clone(), expected.clone());
            std::thread::spawn(move || {
                let mut b = vec![0u8; BS as usize];
                loop {
                    let v = next.fetch_add(1, Ordering::SeqCst);
                    if v >= blocks {
                        return;
                    }
                    d.read(v * BS, &mut b).unwrap();
                    assert!(b[..] == expected[(v * BS) as usize..][..BS as usize], "block {v}");
                }
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    assert_eq!(src.handed.load(Ordering::Relaxed), blocks * BS, "each block fetched once");
    let requests = src.requests.load(Ordering::Relaxed);
    // Fixed windows of 4 blocks would take 64 requests.
    assert!(requests < 64, "{requests} requests");
}

/// Child side of the test below (runs only when the parent sets `MCOW_LAZY_CHILD`): reads the
/// whole disk `MCOW_LAZY_CHILD` through a slow source on the complete layers of
/// `MCOW_LAZY_ORIGIN`, forwards or backwards (`MCOW_LAZY_ORDER`), checks it against the
/// disk `MCOW_LAZY_EXPECTED`, and prints how many bytes it fetched.
#[test]
fn child_reads_a_lazy_disk_slowly() {
    let Ok(disk) = std::env::var("MCOW_LAZY_CHILD") else { return };
    let origin = PathBuf::from(std::env::var("MCOW_LAZY_ORIGIN").unwrap());
    let backwards = std::env::var("MCOW_LAZY_ORDER").as_deref() == Ok("backwards");
    let expected_disk = PathBuf::from(std::env::var("MCOW_LAZY_EXPECTED").unwrap());
    let src = Arc::new(StoreSource::new(origin.join("a/layers")).hooked(65536, |_, _| {
        std::thread::sleep(std::time::Duration::from_millis(3));
        true
    }));
    let d =
        Disk::open_with_source(Path::new(&disk), OpenOptions::default(), src.clone(), FetchPolicy::default())
            .unwrap();
    let e =
        Disk::open(&expected_disk, OpenOptions { read_only: true, verify: true, force_share: true }).unwrap();
    let bs = 65536u64;
    let blocks = d.size() / bs;
    let (mut got, mut want) = (vec![0u8; bs as usize], vec![0u8; bs as usize]);
    for i in 0..blocks {
        let b = if backwards { blocks - 1 - i } else { i };
        d.read(b * bs, &mut got).unwrap();
        e.read(b * bs, &mut want).unwrap();
        assert!(got == want, "block {b} differs");
    }
    println!("fetched={}", src.handed.load(Ordering::Relaxed));
}

#[test]
fn two_processes_on_one_cache_fetch_each_block_once() {
    const BS: u64 = 65536;
    let blocks = 64; // 4 MiB, about 0.2 s to fetch through the slow source
    let tmp = tempfile::tempdir().unwrap();
    let (complete, _) = build_long(tmp.path(), blocks);
    let first = build_partial(tmp.path(), &complete);
    let second = second_disk(tmp.path(), &first);
    // Two processes (this test binary again), one per disk, reading at the same time from
    // opposite ends: they meet in the middle and must not fetch a block twice.
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = [(&first, "forwards"), (&second, "backwards")]
        .into_iter()
        .map(|(disk, order)| {
            std::process::Command::new(&exe)
                .args(["child_reads_a_lazy_disk_slowly", "--exact", "--nocapture", "--test-threads=1"])
                .env("MCOW_LAZY_CHILD", disk)
                .env("MCOW_LAZY_ORIGIN", tmp.path())
                .env("MCOW_LAZY_ORDER", order)
                .env("MCOW_LAZY_EXPECTED", &complete)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut total = 0;
    for c in children {
        let out = c.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "child failed:\n{text}");
        let n: u64 = text
            .lines()
            .find_map(|l| l.split("fetched=").nth(1))
            .unwrap_or_else(|| panic!("no count from the child:\n{text}"))
            .parse()
            .unwrap();
        assert!(n > 0, "each child fetched something (they ran at the same time)");
        total += n;
    }
    assert_eq!(total, blocks * BS, "the two processes fetched {total} bytes for {} stored", blocks * BS);
}

#[test]
fn a_reader_does_not_wait_for_the_read_ahead_its_read_started() {
    use std::sync::Mutex;
    use std::sync::mpsc::channel;
    use std::time::Duration;
    let (tmp, partial, expected) = long_partial(16);
    // Hand-overs are numbered across requests: the first read's block is 0, the second read's
    // fetch (blocks 1..8, read-ahead) hands over block 1 as 1, then waits before block 2.
    let (gate_tx, gate_rx) = channel::<()>();
    let gate_rx = Mutex::new(gate_rx);
    let calls = AtomicU64::new(0);
    let src = Arc::new(StoreSource::new(tmp.path().join("a/layers")).hooked(65536, move |_, _| {
        if calls.fetch_add(1, Ordering::SeqCst) == 2 {
            gate_rx.lock().unwrap().recv().unwrap();
        }
        true
    }));
    let policy = FetchPolicy { window: 8, readahead: 0 };
    let d = Arc::new(Disk::open_with_source(&partial, OpenOptions::default(), src.clone(), policy).unwrap());
    let bs = 65536usize;
    let mut b = vec![0u8; bs];
    d.read(0, &mut b).unwrap(); // a scattered read: its own block
    assert_eq!(src.requests.load(Ordering::SeqCst), 1);
    // Block 1 continues it: one fetch of blocks 1..8, which stalls after block 1. The read
    // returns anyway.
    let (done_tx, done_rx) = channel();
    let reader = {
        let d = d.clone();
        std::thread::spawn(move || {
            let mut b = vec![0u8; bs];
            d.read(bs as u64, &mut b).unwrap();
            done_tx.send(()).unwrap();
            b
        })
    };
    done_rx.recv_timeout(Duration::from_secs(10)).expect("the read waited for its read-ahead");
    assert!(reader.join().unwrap()[..] == expected[bs..2 * bs]);
    assert_eq!(src.requests.load(Ordering::SeqCst), 2);
    gate_tx.send(()).unwrap(); // the read-ahead goes on
    let mut all = vec![0u8; 8 * bs];
    d.read(0, &mut all).unwrap();
    assert!(all[..] == expected[..8 * bs]);
    assert_eq!(src.requests.load(Ordering::SeqCst), 2, "blocks 2..8 came with the read-ahead");
}

#[test]
fn a_read_ahead_that_fails_before_the_readers_block_gives_the_reader_the_error() {
    let (tmp, partial, expected) = long_partial(16);
    let broken = Arc::new(AtomicBool::new(false));
    let b2 = broken.clone();
    let src = Arc::new(
        StoreSource::new(tmp.path().join("a/layers")).hooked(65536, move |_, _| !b2.load(Ordering::SeqCst)),
    );
    let policy = FetchPolicy { window: 8, readahead: 0 };
    let d = Disk::open_with_source(&partial, OpenOptions::default(), src.clone(), policy).unwrap();
    let bs = 65536usize;
    let mut b = vec![0u8; bs];
    d.read(0, &mut b).unwrap();
    // Block 1 starts a read-ahead fetch (blocks 1..8) on another thread; it breaks at once.
    broken.store(true, Ordering::SeqCst);
    let err = d.read(bs as u64, &mut b).unwrap_err();
    assert!(err.to_string().contains("transfer broken"), "{err}");
    assert_eq!(src.requests.load(Ordering::SeqCst), 2, "the error came from the one fetch, not a second try");
    // The source is back: the same read succeeds.
    broken.store(false, Ordering::SeqCst);
    d.read(bs as u64, &mut b).unwrap();
    assert!(b[..] == expected[bs..2 * bs]);
}

#[test]
fn prefetching_runs_fetches_just_their_missing_blocks_in_one_request() {
    let (tmp, partial, expected) = long_partial(16);
    let src = Arc::new(StoreSource::new(tmp.path().join("a/layers")).hooked(65536, |_, _| true));
    let d = Disk::open_with_source(&partial, OpenOptions::default(), src.clone(), FetchPolicy::default())
        .unwrap();
    let bs = 65536usize;
    let mut b = vec![0u8; bs];
    d.read(5 * bs as u64, &mut b).unwrap(); // block 5 is local now
    let count = || (src.handed.load(Ordering::SeqCst) / bs as u64, src.requests.load(Ordering::SeqCst));
    assert_eq!(count(), (1, 1));
    // Runs 0-1, 4-6 and 10: blocks 0, 1, 4, 6 and 10 are missing; one request for all.
    d.prefetch_runs(&[(0, 2), (4, 3), (10, 1)]).unwrap();
    assert_eq!(count(), (6, 2), "(blocks fetched, requests)");
    for v in [0u64, 1, 4, 5, 6, 10] {
        d.read(v * bs as u64, &mut b).unwrap();
        assert!(b[..] == expected[v as usize * bs..][..bs], "block {v}");
    }
    assert_eq!(count(), (6, 2), "the prefetched blocks are local");
    d.prefetch_runs(&[(0, 2), (10, 1)]).unwrap();
    assert_eq!(count(), (6, 2), "nothing to fetch twice");
    d.read(2 * bs as u64, &mut b).unwrap();
    assert_eq!(count().1, 3, "block 2 was not prefetched");
}

// One read that spans pieces of several partial layers (blocks 0..5 of the 3-layer disk
// alternate between its layers): the pieces are fetched at once, not one after another, so the
// read costs one round trip to the origin instead of one per piece. The source holds every
// request for 100 ms and records how many were in flight together: at least 3 (one per layer),
// and the bytes read are the disk's.
#[test]
fn a_read_across_several_partial_layers_fetches_its_pieces_at_once() {
    let t = tempfile::tempdir().unwrap();
    let (complete, all) = build_complete(t.path());
    let partial = build_partial(t.path(), &complete);
    let (now, max) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (n, m) = (now.clone(), max.clone());
    let src = Arc::new(StoreSource::new(t.path().join("a/layers")).hooked(65536, move |i, _| {
        if i == 0 {
            let k = n.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(k, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(100));
            n.fetch_sub(1, Ordering::SeqCst);
        }
        true
    }));
    let d = Disk::open_with_source(&partial, OpenOptions::default(), src.clone(), EXACT).unwrap();
    let layers: std::collections::HashSet<u32> = d
        .segments(0, 5 * 65536)
        .unwrap()
        .filter_map(|s| match s.holder {
            mcow_engine::disk::Holder::Layer(l) => Some(l.layer),
            _ => None,
        })
        .collect();
    assert_eq!(layers.len(), 3, "the range must span all three layers for this test to mean anything");
    // Both read paths: copying reads, and mapped reads (the NBD server's) on a second range.
    let mut buf = vec![0u8; 5 * 65536];
    d.read(0, &mut buf).unwrap();
    assert_eq!(buf, all[..buf.len()]);
    assert!(max.load(Ordering::SeqCst) >= 3, "pieces fetched one after another: max {max:?} in flight");
    max.store(0, Ordering::SeqCst);
    let (from, len) = (20 * 65536, 5 * 65536);
    let mut got = Vec::new();
    assert!(d.read_mapped(from as u64, len, &mut |parts| got = parts.concat()).unwrap());
    assert_eq!(got, all[from..from + len]);
    assert!(max.load(Ordering::SeqCst) >= 3, "mapped read: max {max:?} in flight");
}
