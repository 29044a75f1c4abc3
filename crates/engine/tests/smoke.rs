//! End-to-end checks of the disk API on real files: create, write, seal, commit, flatten,
//! import, export, check.

use mcow_engine::{CreateOptions, Disk, OpenOptions, RunKind, ops};

fn create(dir: &std::path::Path, size: u64, bs: u32) -> std::path::PathBuf {
    let disk = dir.join("d");
    Disk::create(
        &disk,
        &CreateOptions { virtual_size: size, block_size: bs, store: dir.join("layers"), layers: vec![] },
    )
    .unwrap();
    disk
}

fn read(d: &Disk, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    d.read(off, &mut b).unwrap();
    b
}

#[test]
fn write_seal_commit_flatten_keeps_content() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = create(tmp.path(), 1 << 20, 4096);
    let mut model = vec![0u8; 1 << 20];
    let put = |d: &Disk, model: &mut Vec<u8>, off: usize, data: &[u8]| {
        d.write(off as u64, data).unwrap();
        model[off..off + data.len()].copy_from_slice(data);
    };
    {
        let d = Disk::open(&dir, OpenOptions::default()).unwrap();
        assert_eq!(read(&d, 0, 8192), vec![0; 8192]);
        put(&d, &mut model, 100, &[1u8; 5000]);
        put(&d, &mut model, 65536, &[2u8; 4096]);
        d.flush().unwrap();
    }
    ops::merge(&dir, 0, &mut |_, _| {}).unwrap(); // seal
    {
        let d = Disk::open(&dir, OpenOptions::default()).unwrap();
        assert_eq!(d.stack().depth(), 1);
        assert_eq!(read(&d, 0, 1 << 20), model);
        put(&d, &mut model, 4000, &[3u8; 300]); // sub-block copy-up over a sealed block
        d.write_zeroes(65536, 4096, false).unwrap();
        model[65536..65536 + 4096].fill(0);
        assert_eq!(read(&d, 0, 1 << 20), model);
        d.flush().unwrap();
    }
    ops::merge(&dir, 0, &mut |_, _| {}).unwrap();
    {
        let d = Disk::open(&dir, OpenOptions::default()).unwrap();
        assert_eq!(d.stack().depth(), 2);
        assert_eq!(read(&d, 0, 1 << 20), model);
        let runs = d.block_status(0, 1 << 20).unwrap();
        assert!(runs.iter().any(|r| r.kind == RunKind::Zero && r.offset == 65536), "{runs:?}");
    }
    ops::merge(&dir, 2, &mut |_, _| {}).unwrap(); // flatten
    let d = Disk::open(&dir, OpenOptions::default()).unwrap();
    assert_eq!(d.stack().depth(), 1);
    assert_eq!(read(&d, 0, 1 << 20), model);
    drop(d);
    let report = ops::check(&dir, false, &mut |_, _| {}).unwrap();
    assert!(report.errors.is_empty() && report.debris.is_empty(), "{report:?}");
}

#[test]
fn import_with_parent_stores_only_differences_and_exports_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let base_raw = tmp.path().join("base.raw");
    let mut img = vec![0u8; 4 << 20];
    for (i, b) in img.iter_mut().enumerate().take(2 << 20) {
        *b = (i % 251) as u8;
    }
    std::fs::write(&base_raw, &img).unwrap();
    let store = tmp.path().join("layers");
    let opts = |dir, parent| ops::ImportOptions { dir, store: store.clone(), block_size: 65536, parent };
    let base = tmp.path().join("base");
    ops::import_raw(&base_raw, &opts(&base, None), &mut |_, _| {}).unwrap();
    // Change one block and zero another.
    img[3 * 65536..3 * 65536 + 10].copy_from_slice(&[9; 10]);
    img[5 * 65536..6 * 65536].fill(0);
    let v2_raw = tmp.path().join("v2.raw");
    std::fs::write(&v2_raw, &img).unwrap();
    let v2 = tmp.path().join("v2");
    ops::import_raw(&v2_raw, &opts(&v2, Some(&base)), &mut |_, _| {}).unwrap();
    let d = Disk::open(&v2, OpenOptions::default()).unwrap();
    assert_eq!(d.stack().depth(), 2);
    let stack = d.stack();
    let top_layer = &stack.layers()[1];
    assert_eq!(top_layer.trailer.block_count, 1, "only the changed block is stored");
    let out = tmp.path().join("out.raw");
    ops::export_raw(&d, &out, &mut |_, _| {}).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), img);
}

/// The segment walk that every read path uses. Tried: a disk of two sealed layers (data in
/// each, a zero run sealed in the upper one) and a top (data, a zero run, a discard) walked over
/// unaligned ranges. Must hold: the segments tile each range exactly, in order; each names the
/// place that holds its bytes (checked against a per-block expectation); a segment starts in
/// the block its offset is in; and a range past the end is refused.
#[test]
fn segments_tile_a_range_and_name_what_holds_each_piece() {
    use mcow_engine::{Holder, TOP};
    let tmp = tempfile::tempdir().unwrap();
    let dir = create(tmp.path(), 64 * 4096, 4096);
    let bs = 4096u64;
    let d = Disk::open(&dir, OpenOptions::default()).unwrap();
    d.write(0, &[1u8; 8 * 4096]).unwrap(); // blocks 0..8 in layer 0
    d.flush().unwrap();
    drop(d);
    ops::merge(&dir, 0, &mut |_, _| {}).unwrap();
    let d = Disk::open(&dir, OpenOptions::default()).unwrap();
    d.write(4 * bs, &[2u8; 4 * 4096]).unwrap(); // blocks 4..8 in layer 1
    d.write_zeroes(20 * bs, 2 * bs, false).unwrap(); // blocks 20..22 zero in layer 1
    d.flush().unwrap();
    drop(d);
    ops::merge(&dir, 0, &mut |_, _| {}).unwrap();
    let d = Disk::open(&dir, OpenOptions::default()).unwrap();
    d.write(6 * bs, &[3u8; 4096]).unwrap(); // block 6 in the top
    d.write_zeroes(10 * bs, bs, false).unwrap(); // block 10 zero in the top
    d.discard(2 * bs, bs).unwrap(); // block 2 discarded in the top
    // What each block should say, as (kind letter, layer).
    let expect = |b: u64| -> (char, Option<u32>) {
        match b {
            2 => ('h', Some(TOP)),
            6 => ('t', Some(TOP)),
            10 => ('z', Some(TOP)),
            4..=7 => ('d', Some(1)),
            0..=7 => ('d', Some(0)),
            20 | 21 => ('z', Some(1)),
            _ => ('h', None),
        }
    };
    for (off, len) in
        [(0u64, 64 * bs), (100, 11 * bs + 7), (5 * bs + 1, 1), (63 * bs, bs), (7 * bs - 3, 20 * bs)]
    {
        let mut pos = off;
        for s in d.segments(off, len).unwrap() {
            assert_eq!(s.offset, pos, "segments of {off}+{len} are contiguous");
            assert!(s.len > 0);
            assert_eq!((s.vblock, s.within), (s.offset / bs, s.offset % bs));
            for b in s.vblock..s.vblock + s.blocks(bs) {
                let got = match s.holder {
                    Holder::Top => ('t', Some(TOP)),
                    Holder::Layer(l) => ('d', Some(l.layer)),
                    Holder::Zero { layer } => ('z', Some(layer)),
                    Holder::Hole { layer } => ('h', layer),
                };
                assert_eq!(got, expect(b), "block {b} in segment {s:?}");
            }
            pos += s.len;
        }
        assert_eq!(pos, off + len, "segments of {off}+{len} cover it");
    }
    assert!(d.segments(63 * bs, bs + 1).is_err(), "a range past the end is refused");
    assert_eq!(d.segments(64 * bs, 0).unwrap().count(), 0);
}

/// Callers can match the common failures by kind, not by message. Tried: creating a disk where
/// one is, opening a disk whose layer is gone from the store, and opening a sealed layer file
/// as a top. Must hold: `DiskExists`, `LayerMissing` (with the digest) and `WrongKind`.
#[test]
fn common_failures_have_typed_errors() {
    use mcow_engine::Error;
    let tmp = tempfile::tempdir().unwrap();
    let dir = create(tmp.path(), 1 << 20, 4096);
    let again = Disk::create(
        &dir,
        &CreateOptions {
            virtual_size: 1 << 20,
            block_size: 4096,
            store: tmp.path().join("layers"),
            layers: vec![],
        },
    );
    assert!(matches!(again, Err(Error::DiskExists { .. })), "{again:?}");
    let d = Disk::open(&dir, OpenOptions::default()).unwrap();
    d.write(0, &[1u8; 4096]).unwrap();
    drop(d);
    let digest = ops::merge(&dir, 0, &mut |_, _| {}).unwrap();
    let layer = tmp.path().join("layers/blobs/sha256").join(digest.hex());
    let top = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "mcow"))
        .unwrap();
    std::fs::copy(&layer, &top).unwrap();
    let e = Disk::open(&dir, OpenOptions::default()).err().unwrap();
    assert!(matches!(e, Error::WrongKind { expected: "writable top", .. }), "{e}");
    std::fs::remove_file(&layer).unwrap();
    let e = Disk::open(&dir, OpenOptions::default()).err().unwrap();
    assert!(matches!(e, Error::LayerMissing { digest: d, .. } if d == digest), "{e}");
}

/// Wrapped errors keep their cause as `source` (and in the message). Tried: opening a disk
/// whose manifest is not JSON, and one whose directory is missing. Must hold: the format error
/// and the I/O error are the `source` of the engine's error, and the message names them too.
#[test]
fn wrapped_errors_chain_their_cause() {
    use std::error::Error as _;
    let tmp = tempfile::tempdir().unwrap();
    let e = Disk::open(&tmp.path().join("none"), OpenOptions::default()).err().unwrap();
    let io = e.source().and_then(|s| s.downcast_ref::<std::io::Error>()).expect("an io::Error source");
    assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
    assert!(e.to_string().contains(&io.to_string()), "{e}");
    let dir = create(tmp.path(), 1 << 20, 4096);
    std::fs::write(dir.join("disk.json"), b"not json").unwrap();
    let e = Disk::open(&dir, OpenOptions::default()).err().unwrap();
    let f =
        e.source().and_then(|s| s.downcast_ref::<mcow_format::FormatError>()).expect("a FormatError source");
    assert!(e.to_string().contains(&f.to_string()), "{e}");
}

/// A chain import from two "images" (raw files of what each holds alone, plus the ranges it
/// holds). Tried: a bottom image with data and a zero range, an upper one holding parts of
/// blocks (data over part of one, zeros over half of another), a whole zero block and a new
/// block; then an import dropped unfinished, and held ranges out of order. Must hold: the disk
/// reads as the upper image over the lower; the bottom layer stores its data and no zero
/// markers; the upper layer stores each partly held block whole (the rest read from below), a
/// zero marker for the zero block and nothing where it holds nothing; an unfinished import
/// leaves no layer in the store; out-of-order ranges are refused.
#[test]
fn chain_import_stacks_what_each_image_holds() {
    use mcow_engine::ops::{ChainImport, HeldRange};
    let tmp = tempfile::tempdir().unwrap();
    let bs = 4096u64;
    let size = 16 * bs;
    let held = |offset: u64, length: u64, zero: bool| HeldRange { offset, length, zero };
    let mut model = vec![0u8; size as usize];
    // Bottom: 1s over blocks 0..4; zeros recorded over blocks 8..10 (hiding nothing).
    let mut low = vec![0u8; size as usize];
    low[..4 * bs as usize].fill(1);
    model[..4 * bs as usize].fill(1);
    let low_path = tmp.path().join("low.raw");
    std::fs::write(&low_path, &low).unwrap();
    // Upper: zeros over the first half of block 1, 2s over bytes 100..200 of block 2, zeros
    // over block 3, 3s over block 12 (a file shorter than the disk: the rest reads as zeros).
    let mut up = vec![0u8; 13 * bs as usize];
    up[(2 * bs + 100) as usize..(2 * bs + 200) as usize].fill(2);
    up[12 * bs as usize..].fill(3);
    let up_path = tmp.path().join("up.raw");
    std::fs::write(&up_path, &up).unwrap();
    model[bs as usize..(bs + 2048) as usize].fill(0);
    model[(2 * bs + 100) as usize..(2 * bs + 200) as usize].fill(2);
    model[3 * bs as usize..4 * bs as usize].fill(0);
    model[12 * bs as usize..13 * bs as usize].fill(3);

    let store = tmp.path().join("layers");
    let mut import = ChainImport::new(&store, size, bs as u32).unwrap();
    import.push(&low_path, &[held(0, 4 * bs, false), held(8 * bs, 2 * bs, true)], &mut |_, _| {}).unwrap();
    let upper = [
        held(bs, 2048, true),
        held(2 * bs + 100, 100, false),
        held(3 * bs, bs, true),
        held(12 * bs, bs, false),
    ];
    import.push(&up_path, &upper, &mut |_, _| {}).unwrap();
    let dir = tmp.path().join("d");
    let layers = import.finish(&dir).unwrap();
    assert_eq!(layers.len(), 2);
    let d = Disk::open(&dir, OpenOptions::default()).unwrap();
    assert_eq!(read(&d, 0, size as usize), model);
    let low_index = d.layer(0).read_index().unwrap();
    assert_eq!(low_index.len(), 1, "bottom: one data run, no zero marker: {low_index:?}");
    assert_eq!((low_index[0].vblock, low_index[0].count), (0, 4));
    let up_index: Vec<_> =
        d.layer(1).read_index().unwrap().iter().map(|e| (e.vblock, e.count, e.kind)).collect();
    use mcow_format::ExtentKind::{Data, Zero};
    assert_eq!(up_index, vec![(1, 2, Data), (3, 1, Zero), (12, 1, Data)]);
    drop(d);

    // Unfinished: the layer it added goes again.
    let other = tmp.path().join("other");
    let mut import = ChainImport::new(&other, size, bs as u32).unwrap();
    let digest = import.push(&up_path, &upper, &mut |_, _| {}).unwrap();
    let blob = mcow_engine::store::LayerStore::new(&other).layer_path(&digest);
    assert!(blob.exists());
    drop(import);
    assert!(!blob.exists(), "an unfinished chain import leaves no layer");

    let mut import = ChainImport::new(&other, size, bs as u32).unwrap();
    let bad = [held(2 * bs, bs, false), held(bs, bs, false)];
    assert!(import.push(&up_path, &bad, &mut |_, _| {}).is_err());
}
