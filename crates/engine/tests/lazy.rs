//! Partial layers: blocks fetched on demand from a `BlockSource`, checked against their hashes,
//! cached in the local file, never fetched twice, and never cached when wrong.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use mcow_engine::store::LayerStore;
use mcow_engine::{BlockSource, CreateOptions, Digest, Disk, OpenOptions};
use mcow_format::{HEADER_SIZE, TRAILER_SIZE, Trailer};

/// Serves byte ranges of complete layer files from another store, counting bytes; can corrupt.
struct DirSource {
    store: PathBuf,
    fetched: AtomicU64,
    corrupt: AtomicBool,
}

impl BlockSource for DirSource {
    fn read_range(&self, layer: &Digest, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        let f = std::fs::File::open(self.store.join("blobs/sha256").join(layer.hex()))?;
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, offset)?;
        if self.corrupt.load(Ordering::Relaxed) {
            buf[len as usize / 2] ^= 0x40;
        }
        self.fetched.fetch_add(len, Ordering::Relaxed);
        Ok(buf)
    }
}

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
        store.add_partial(&l.digest, len, &bytes[..HEADER_SIZE], &bytes[tail_at..], &t.index_digest).unwrap();
    }
    let m = src.manifest();
    let disk = dir.join("b/disk");
    Disk::create(
        &disk,
        &CreateOptions {
            virtual_size: m.virtual_size,
            block_size: m.block_size,
            store: dir.join("b/layers"),
            layers: m.layers.clone(),
        },
    )
    .unwrap();
    disk
}

#[test]
fn lazy_reads_fetch_each_block_once_and_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let (complete, expected) = build_complete(tmp.path());
    let partial = build_partial(tmp.path(), &complete);
    let src =
        Arc::new(DirSource { store: tmp.path().join("a/layers"), fetched: 0.into(), corrupt: false.into() });
    let stored: u64 = {
        let d =
            Disk::open(&complete, OpenOptions { read_only: true, verify: true, force_share: true }).unwrap();
        d.stack().layers().iter().map(|l| l.trailer.block_count * 65536).sum()
    };
    {
        let d = Disk::open_with_source(&partial, OpenOptions::default(), src.clone(), 4).unwrap();
        // A small read fetches at most one window (4 blocks), not the layer.
        let mut b = vec![0u8; 4096];
        d.read(1000, &mut b).unwrap();
        assert_eq!(b, expected[1000..5096]);
        assert!(src.fetched.load(Ordering::Relaxed) <= 4 * 65536);
        let mut all = vec![0u8; expected.len()];
        d.read(0, &mut all).unwrap();
        assert!(all == expected, "lazy disk differs from the original");
    }
    let first = src.fetched.load(Ordering::Relaxed);
    assert!(first <= stored, "fetched {first} bytes for {stored} stored");
    // Restart: everything is local now.
    let d = Disk::open_with_source(&partial, OpenOptions::default(), src.clone(), 4).unwrap();
    let mut all = vec![0u8; expected.len()];
    d.read(0, &mut all).unwrap();
    assert!(all == expected);
    assert_eq!(src.fetched.load(Ordering::Relaxed), first, "a restart fetched again");
    // Every partial copy is now complete and moves into the store's blobs.
    let store = LayerStore::new(tmp.path().join("b/layers"));
    for l in d.stack().layers() {
        assert!(store.complete_partial(&l.digest).unwrap(), "layer {} not complete", l.digest);
        assert!(store.contains(&l.digest));
    }
}

#[test]
fn tampered_fetches_are_errors_and_never_cached() {
    let tmp = tempfile::tempdir().unwrap();
    let (complete, expected) = build_complete(tmp.path());
    let partial = build_partial(tmp.path(), &complete);
    let src =
        Arc::new(DirSource { store: tmp.path().join("a/layers"), fetched: 0.into(), corrupt: true.into() });
    {
        let d = Disk::open_with_source(&partial, OpenOptions::default(), src.clone(), 1).unwrap();
        let mut b = vec![0u8; 65536];
        let err = d.read(0, &mut b).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
    }
    // With an honest source the same disk reads right: nothing bad was kept.
    src.corrupt.store(false, Ordering::Relaxed);
    let d = Disk::open_with_source(&partial, OpenOptions::default(), src.clone(), 1).unwrap();
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
    let l = &src.stack().layers()[0];
    let bytes = std::fs::read(&l.path).unwrap();
    let t = Trailer::decode(&bytes[bytes.len() - TRAILER_SIZE..]).unwrap();
    let tail_at = t.index_offset(l.header.block_size) as usize;
    let store = LayerStore::new(tmp.path().join("c"));
    let wrong = Digest::of(b"not the index");
    let err = store
        .add_partial(&l.digest, bytes.len() as u64, &bytes[..HEADER_SIZE], &bytes[tail_at..], &wrong)
        .unwrap_err();
    assert!(err.to_string().contains("index digest"), "{err}");
    let mut tampered = bytes[tail_at..].to_vec();
    tampered[0] ^= 1;
    assert!(
        store
            .add_partial(&l.digest, bytes.len() as u64, &bytes[..HEADER_SIZE], &tampered, &t.index_digest)
            .is_err()
    );
    assert!(!store.partial_path(&l.digest).exists(), "nothing is left behind");
}

#[test]
fn disks_on_the_same_partial_layers_fetch_each_block_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (complete, expected) = build_complete(tmp.path());
    let first = build_partial(tmp.path(), &complete);
    // A second disk (another VM) on the same partial layers, in the same store.
    let m = mcow_engine::disk::read_manifest(&first).unwrap();
    let second = tmp.path().join("b/disk2");
    Disk::create(
        &second,
        &CreateOptions {
            virtual_size: m.virtual_size,
            block_size: m.block_size,
            store: tmp.path().join("b/layers"),
            layers: m.layers.clone(),
        },
    )
    .unwrap();
    let src =
        Arc::new(DirSource { store: tmp.path().join("a/layers"), fetched: 0.into(), corrupt: false.into() });
    let a = Disk::open_with_source(&first, OpenOptions::default(), src.clone(), 1).unwrap();
    let b = Disk::open_with_source(&second, OpenOptions::default(), src.clone(), 1).unwrap();
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
    let src =
        Arc::new(DirSource { store: tmp.path().join("a/layers"), fetched: 0.into(), corrupt: false.into() });
    let opts = OpenOptions { read_only: true, verify: false, force_share: false };
    let d = Disk::open_with_source(&partial, opts, src.clone(), 4).unwrap();
    let mut all = vec![0u8; expected.len()];
    d.read(0, &mut all).unwrap();
    assert!(all == expected, "unfetched blocks must not read as zeros");
    assert!(src.fetched.load(Ordering::Relaxed) > 0);
}
