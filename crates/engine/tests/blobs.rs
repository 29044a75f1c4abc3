//! Compressed layer blobs in the layer store: `compress_layer` (a local layer as the blob a push
//! uploads), `adopt_compressed` (a layer rebuilt from a downloaded blob), and the `.frames`
//! sidecar that `add_partial*` writes for a layer pulled lazily from a compressed blob.

use std::path::{Path, PathBuf};

use mcow_engine::store::LayerStore;
use mcow_engine::{CreateOptions, Digest, Disk, Error, OpenOptions};
use mcow_format::{
    BlobLayout, DEFAULT_LEVEL, FrameTable, FramesFile, HEADER_SIZE, LayerHeader, TRAILER_SIZE, Trailer,
};

const BS: u64 = 65536;

/// Noise that zstd cannot shrink.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A disk of two sealed layers in `dir` whose blocks are text-like (compressible) and noise
/// (stored as they are); the first layer has 40 blocks, so that the two compressing threads
/// take several batches each. Returns the disk's layers (digest, path), bottom first.
fn build(dir: &Path) -> Vec<(Digest, PathBuf)> {
    let disk = dir.join("disk");
    Disk::create(
        &disk,
        &CreateOptions {
            virtual_size: 8 << 20,
            block_size: BS as u32,
            store: dir.join("layers"),
            layers: vec![],
        },
    )
    .unwrap();
    for layer in 0..2u64 {
        let d = Disk::open(&disk, OpenOptions::default()).unwrap();
        let blocks = if layer == 0 { 40 } else { 6 };
        for k in 0..blocks {
            let data = if k % 3 == 2 {
                noise(layer * 100 + k, BS as usize)
            } else {
                let line = format!("layer {layer} block {k}: mcow keeps layers compressed on the wire\n");
                line.bytes().cycle().take(BS as usize).collect()
            };
            d.write((k * 2 + layer) * BS, &data).unwrap();
        }
        d.flush().unwrap();
        drop(d);
        mcow_engine::ops::merge(&disk, 0, &mut |_, _| {}).unwrap();
    }
    let d = Disk::open(&disk, OpenOptions { read_only: true, verify: true, force_share: true }).unwrap();
    d.stack().layers().iter().map(|l| (l.digest, l.path.clone())).collect()
}

/// What the image config would say about a layer: (layer length, block size, tail length).
fn describe(layer: &[u8]) -> (u64, u32, u64) {
    let h = LayerHeader::decode(&layer[..HEADER_SIZE]).unwrap();
    let t = Trailer::decode(&layer[layer.len() - TRAILER_SIZE..]).unwrap();
    (layer.len() as u64, h.block_size, t.index_len() + TRAILER_SIZE as u64)
}

/// The store's `tmp/` directory holds nothing (no temporary was left).
fn tmp_is_empty(store: &LayerStore) -> bool {
    std::fs::read_dir(store.tmp_path()).map_or(true, |mut d| d.next().is_none())
}

/// Tried: each layer of a two-layer disk compressed twice (the first across many batches),
/// then the blob rebuilt into a fresh store. Must hold: both compressions give the same bytes
/// and digests (determinism, so a second push finds the blob); the blob is the layout of
/// FORMAT.md (header and tail unchanged, a table whose digest is the one returned) and
/// smaller than the layer; the rebuilt layer is byte-identical, named by its digest, and no
/// temporary is left in either store.
#[test]
fn compress_then_adopt_gives_the_same_layer_and_the_same_blob_twice() {
    let t = tempfile::tempdir().unwrap();
    let layers = build(t.path());
    let src = LayerStore::new(t.path().join("layers"));
    let dst = LayerStore::new(t.path().join("fresh"));
    for (digest, path) in &layers {
        let layer = std::fs::read(path).unwrap();
        let a = src.compress_layer(digest, DEFAULT_LEVEL).unwrap();
        let b = src.compress_layer(digest, DEFAULT_LEVEL).unwrap();
        let (blob_a, blob_b) = (std::fs::read(a.file.path()).unwrap(), std::fs::read(b.file.path()).unwrap());
        assert!(blob_a == blob_b, "two compressions of {digest} differ");
        assert_eq!((a.digest, a.len, a.frame_table_digest), (b.digest, b.len, b.frame_table_digest));
        assert_eq!((Digest::of(&blob_a), blob_a.len() as u64), (a.digest, a.len));
        assert!(a.len < layer.len() as u64 * 3 / 4, "{} of {} bytes", a.len, layer.len());

        let (layer_len, block_size, tail_len) = describe(&layer);
        let layout = BlobLayout::new(block_size, layer_len, tail_len, a.len).unwrap();
        let table_at = layout.table_offset() as usize;
        let table_bytes = &blob_a[table_at..layout.blob_tail_offset() as usize];
        assert_eq!(Digest::of(table_bytes), a.frame_table_digest);
        let table = FrameTable::decode(table_bytes, layout.block_count, block_size).unwrap();
        layout.check_table(&table).unwrap();
        assert_eq!(blob_a[..HEADER_SIZE], layer[..HEADER_SIZE]);
        assert_eq!(blob_a[blob_a.len() - tail_len as usize..], layer[layer.len() - tail_len as usize..]);

        let got = dst
            .adopt_compressed(a.file.path(), digest, layer_len, block_size, tail_len, &a.frame_table_digest)
            .unwrap();
        assert_eq!(got, dst.layer_path(digest));
        assert!(std::fs::read(&got).unwrap() == layer, "rebuilt layer {digest} differs");
    }
    assert!(tmp_is_empty(&dst), "a temporary was left in the pulling store");
    // The blobs were temporaries of the source store: gone once dropped.
    assert!(tmp_is_empty(&src), "a blob outlived its CompressedBlob");
}

/// Tried: blobs that a hostile remote could serve for a layer: one whose frame table is not
/// the one the config names (another table digest), one with a byte of a compressed frame
/// flipped, one with a byte of a stored (uncompressed) frame flipped, a truncated one, and a
/// config with another tail length. Must hold: each is refused with a typed error that says what
/// failed (the frame table, the block whose frame did not decode, the rebuilt layer's digest,
/// the lengths), and the store holds no layer and no temporary afterwards.
#[test]
fn hostile_blobs_leave_nothing_in_the_store() {
    let t = tempfile::tempdir().unwrap();
    let layers = build(t.path());
    let src = LayerStore::new(t.path().join("layers"));
    let (digest, path) = &layers[0];
    let layer = std::fs::read(path).unwrap();
    let (layer_len, block_size, tail_len) = describe(&layer);
    let blob = src.compress_layer(digest, DEFAULT_LEVEL).unwrap();
    let bytes = std::fs::read(blob.file.path()).unwrap();
    let layout = BlobLayout::new(block_size, layer_len, tail_len, blob.len).unwrap();
    let table = FrameTable::decode(
        &bytes[layout.table_offset() as usize..layout.blob_tail_offset() as usize],
        layout.block_count,
        block_size,
    )
    .unwrap();
    // Physical blocks alternate text, text, noise in write order; find one frame of each kind.
    let compressed = (0..layout.block_count).find(|&p| table.span(p, 1).1 < BS).unwrap();
    let stored = (0..layout.block_count).find(|&p| table.span(p, 1).1 == BS).unwrap();
    let flip = |p: u64| {
        let mut b = bytes.clone();
        let (at, len) = table.span(p, 1);
        b[(at + len / 2) as usize] ^= 0x5a;
        b
    };
    let dst = LayerStore::new(t.path().join("fresh"));
    let file = t.path().join("hostile.blob");
    let try_adopt = |b: &[u8], tail: u64, table_digest: &Digest| {
        std::fs::write(&file, b).unwrap();
        dst.adopt_compressed(&file, digest, layer_len, block_size, tail, table_digest).unwrap_err()
    };
    let ftd = blob.frame_table_digest;
    let cases: Vec<(Error, &str)> = vec![
        (try_adopt(&bytes, tail_len, &Digest::of(b"another table")), "frame table hashes to"),
        (try_adopt(&flip(compressed), tail_len, &ftd), ""),
        (try_adopt(&flip(stored), tail_len, &ftd), "rebuilt from it hashes to"),
        (try_adopt(&bytes[..bytes.len() - 1], tail_len, &ftd), "compressed blob"),
        (try_adopt(&bytes, tail_len + 32, &ftd), "compressed blob"),
    ];
    for (i, (e, says)) in cases.iter().enumerate() {
        let msg = e.to_string();
        assert!(msg.contains(&digest.to_string()), "case {i}: {msg}");
        assert!(msg.contains(says), "case {i}: {msg}");
        assert!(!dst.contains(digest), "case {i}: a layer was adopted");
        assert!(tmp_is_empty(&dst), "case {i}: a temporary was left");
    }
    // A flipped compressed frame either fails to decode (named by its block) or decodes to other
    // bytes that the layer digest catches.
    match &cases[1].0 {
        Error::CompressedFrame { pblock, .. } => assert_eq!(*pblock, compressed),
        Error::CompressedBlob { why, .. } => assert!(why.contains("rebuilt"), "{why}"),
        e => panic!("unexpected error {e}"),
    }
    assert!(matches!(cases[0].0, Error::CompressedBlob { .. }));
}

/// Tried: a partial copy added with a frame table, one with a table of the wrong block count,
/// one with a blob length that does not fit the table, a partial copy without a table over a
/// stale `.frames`, and completing a partial copy. Must hold: the good table is written beside
/// the partial file and reads back equal; the bad ones are refused with nothing left (no partial
/// file, no `.frames`); a copy without a table removes a stale one; completion removes it.
#[test]
fn partial_copies_keep_their_frame_table_until_complete() {
    let t = tempfile::tempdir().unwrap();
    let layers = build(t.path());
    let src = LayerStore::new(t.path().join("layers"));
    let (digest, path) = &layers[1];
    let layer = std::fs::read(path).unwrap();
    let (layer_len, block_size, tail_len) = describe(&layer);
    let blob = src.compress_layer(digest, DEFAULT_LEVEL).unwrap();
    let bytes = std::fs::read(blob.file.path()).unwrap();
    let layout = BlobLayout::new(block_size, layer_len, tail_len, blob.len).unwrap();
    let table = FrameTable::decode(
        &bytes[layout.table_offset() as usize..layout.blob_tail_offset() as usize],
        layout.block_count,
        block_size,
    )
    .unwrap();
    let header = &layer[..HEADER_SIZE];
    let tail = &layer[layer.len() - tail_len as usize..];
    let index_digest = Trailer::decode(&layer[layer.len() - TRAILER_SIZE..]).unwrap().index_digest;
    let store = LayerStore::new(t.path().join("lazy"));
    let add = |f: Option<&FramesFile>| store.add_partial(digest, layer_len, header, tail, &index_digest, f);

    let few = FramesFile {
        blob: blob.digest,
        blob_len: blob.len,
        table: FrameTable::from_lengths((1..layout.block_count).map(|_| 100)),
    };
    let e = add(Some(&few)).unwrap_err();
    assert!(e.to_string().contains("frames"), "{e}");
    let off = FramesFile { blob: blob.digest, blob_len: blob.len + 1, table: table.clone() };
    let e = add(Some(&off)).unwrap_err();
    assert!(e.to_string().contains("frame table"), "{e}");
    assert!(!store.partial_path(digest).exists() && !store.frames_path(digest).exists());

    let good = FramesFile { blob: blob.digest, blob_len: blob.len, table };
    add(Some(&good)).unwrap();
    let kept = std::fs::read(store.frames_path(digest)).unwrap();
    assert_eq!(FramesFile::decode(&kept, block_size).unwrap(), good);

    // Pulled again from an uncompressed image: the old table must not stay beside it.
    std::fs::remove_file(store.partial_path(digest)).unwrap();
    add(None).unwrap();
    assert!(!store.frames_path(digest).exists(), "a stale frame table was kept");

    add(Some(&good)).unwrap();
    std::fs::write(store.partial_path(digest), &layer).unwrap(); // every block "fetched"
    assert!(store.complete_partial(digest).unwrap());
    assert!(store.contains(digest));
    assert!(!store.frames_path(digest).exists(), "the frame table outlived the partial copy");
}
