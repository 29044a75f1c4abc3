//! Lazy pulls of layers whose config has index chunks (docs/FORMAT.md, "Config", "Verification",
//! "Partial layers"): a lazy start fetches the header, the extent index's chunks and the trailer
//! only; the hash table's chunks come as reads need them (checked against the config's digests),
//! and the layer still completes to its digest. Against docker-registry, nginx and `file://`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use common::*;
use mcow_engine::chunks::MIN_CHUNK_SIZE;
use mcow_engine::store::{LayerStore, OpenLayer};
use mcow_engine::{CreateOptions, Digest, Disk, FetchPolicy, OpenOptions};
use mcow_format::{HEADER_FIELDS_LEN, TRAILER_SIZE};
use mcow_remote::Reference;
use mcow_remote::transfer::{self, RemoteSource};

/// 4 KiB blocks keep a layer of many stored blocks small.
const CBS: u64 = 4096;
const CSIZE: u64 = 32 << 20;
/// Blocks the base stores (from virtual block 0): a hash table of 96,000 bytes, 6 chunks.
const BASE_BLOCKS: u64 = 3000;
/// Single-block extents of the second layer (every other block after the base's): an extent
/// index of 19,200 bytes, two chunks, the second shared with the start of the hash table.
const TOP_EXTENTS: u64 = 600;

fn ro() -> OpenOptions {
    OpenOptions { read_only: true, verify: true, force_share: true }
}

/// A 2-layer disk of 4 KiB blocks at `dir/disk` (layers in `dir/layers`), and its bytes.
fn build_chunky_disk(dir: &Path) -> (PathBuf, Vec<u8>) {
    let disk = dir.join("disk");
    let _g = fork_lock();
    let opts = CreateOptions {
        virtual_size: CSIZE,
        block_size: CBS as u32,
        store: dir.join("layers"),
        layers: vec![],
    };
    Disk::create(&disk, &opts).unwrap();
    let d = Disk::open(&disk, OpenOptions::default()).unwrap();
    d.write(0, &pattern(1, (BASE_BLOCKS * CBS) as usize)).unwrap();
    d.flush().unwrap();
    drop(d);
    mcow_engine::ops::merge(&disk, 0, &mut |_, _| {}).unwrap();
    let d = Disk::open(&disk, OpenOptions::default()).unwrap();
    for i in 0..TOP_EXTENTS {
        d.write((BASE_BLOCKS + 2 * i) * CBS, &pattern(1000 + i, CBS as usize)).unwrap();
    }
    d.flush().unwrap();
    drop(d);
    mcow_engine::ops::merge(&disk, 0, &mut |_, _| {}).unwrap();
    let d = Disk::open(&disk, OpenOptions::default()).unwrap();
    let mut bytes = vec![0u8; CSIZE as usize];
    d.read(0, &mut bytes).unwrap();
    (disk, bytes)
}

/// (digest, file length, index offset, index region length, extent count) of each layer.
fn layer_shapes(disk: &Path) -> Vec<(Digest, u64, u64, u64, u64)> {
    let d = Disk::open(disk, ro()).unwrap();
    d.stack()
        .layers()
        .iter()
        .map(|l| {
            let t = &l.trailer;
            (l.digest, l.file_len(), t.index_offset(CBS as u32), t.index_len(), t.extent_count)
        })
        .collect()
}

/// What a lazy start of these layers must fetch: per layer the header's fields, the chunks that
/// hold the extent index, and the trailer.
fn start_bytes(shapes: &[(Digest, u64, u64, u64, u64)]) -> u64 {
    shapes
        .iter()
        .map(|&(_, _, _, region, extents)| {
            let ext = ((extents * 32).div_ceil(MIN_CHUNK_SIZE) * MIN_CHUNK_SIZE).min(region);
            HEADER_FIELDS_LEN as u64 + ext + TRAILER_SIZE as u64
        })
        .sum()
}

/// The base layer alone, opened partial with `src` and no background threads (so nothing is
/// fetched but what its reads need).
fn open_base(layers: &Path, base: &Digest, src: Arc<RemoteSource>) -> OpenLayer {
    let store = LayerStore::new(layers).with_source(src, EXACT);
    let (layer, _) = store.open_layer(base, true).unwrap();
    assert!(layer.is_partial());
    layer
}

/// Bytes `[at, at + len)` of a file.
fn file_bytes(path: &Path, at: u64, len: u64) -> Vec<u8> {
    std::fs::read(path).unwrap()[at as usize..(at + len) as usize].to_vec()
}

/// Tried: an image of two layers with several hash table chunks each, pushed to docker-registry
/// and pulled lazily; a block read on a layer opened without background threads; then the disk
/// read whole through a lazy open and downloaded (`fetch_rest`). Must hold: push wrote index
/// chunks (6 and 3); the lazy start fetched exactly the header fields, extent chunks and
/// trailers (far less than the tails); the partial file has the rest of its hash table as a
/// hole and its chunk list beside it; the first read of a block fetches its chunk (16 KiB) and
/// the block in one request (a multipart answer), the next read in that chunk the block only; every byte read equals the local
/// disk's; both layers then complete to their digests, and their chunk lists are gone.
#[test]
fn chunked_lazy_start_fetches_only_the_extents_then_completes() {
    let t = tempfile::tempdir().unwrap();
    let reg = RegistryServer::start(&t.path().join("reg"), None);
    let (disk, bytes) = build_chunky_disk(&t.path().join("a"));
    let r = Reference::parse(&format!("oci://{}/mcow/chunky:v1", reg.host())).unwrap();
    transfer::push(&disk, &r, &mut |_, _| {}).unwrap();
    let shapes = layer_shapes(&disk);

    let remote = mcow_remote::open_remote(&r).unwrap();
    let image = transfer::fetch_image(remote.as_ref(), &r).unwrap();
    let counts: Vec<usize> =
        image.config.layers.iter().map(|l| l.index_chunks.as_ref().unwrap().digests.len()).collect();
    assert_eq!(counts, [6, 3]);

    let rep = transfer::pull(&r, &t.path().join("b/disk"), &t.path().join("b/layers"), true, &mut |_, _| {})
        .unwrap();
    let tails: u64 = shapes.iter().map(|s| s.3 + TRAILER_SIZE as u64).sum();
    assert_eq!(rep.bytes_fetched, start_bytes(&shapes), "tails are {tails} bytes");
    assert!(rep.bytes_fetched * 2 < tails, "{} of {tails}", rep.bytes_fetched);

    let layers = t.path().join("b/layers");
    let store = LayerStore::new(&layers);
    let (base, _, base_index, _, _) = shapes[0];
    assert!(store.chunk_list_path(&base).is_file());
    let partial = store.partial_path(&base);
    // Chunk 3 of the base (hashes of blocks 1535..2047) is not there yet.
    assert!(file_bytes(&partial, base_index + 3 * MIN_CHUNK_SIZE, MIN_CHUNK_SIZE).iter().all(|&b| b == 0));
    {
        let src = Arc::new(RemoteSource::new(remote.clone()));
        let layer = open_base(&layers, &base, src.clone());
        let mut buf = vec![0u8; CBS as usize];
        layer.read(2000, 0, &mut buf).unwrap();
        assert!(buf == bytes[(2000 * CBS) as usize..][..CBS as usize]);
        assert_eq!(src.stats(), (MIN_CHUNK_SIZE + CBS, 1), "the chunk and the block, in one request");
        layer.read(2001, 0, &mut buf).unwrap();
        assert!(buf == bytes[(2001 * CBS) as usize..][..CBS as usize]);
        assert_eq!(src.stats(), (MIN_CHUNK_SIZE + 2 * CBS, 2), "the block only");
    }

    let (d, _) = transfer::Sources::new()
        .open_lazy_disk(
            &mcow_engine::Engine::default(),
            &t.path().join("b/disk"),
            ro(),
            FetchPolicy::default(),
        )
        .unwrap();
    let mut all = vec![0u8; CSIZE as usize];
    d.read(0, &mut all).unwrap();
    assert!(all == bytes, "the lazy disk reads what the local one does");
    let done = d.fetch_rest(&AtomicBool::new(false));
    assert_eq!((done.completed, done.failed), (2, 0));
    for s in &shapes {
        assert!(store.contains(&s.0) && !store.partial_path(&s.0).exists());
        assert!(!store.chunk_list_path(&s.0).exists(), "the chunk list goes with the partial file");
    }
    drop(d);
    let d = Disk::open(&t.path().join("b/disk"), ro()).unwrap();
    d.read(0, &mut all).unwrap();
    assert!(all == bytes);
}

/// Tried: the two-layer image of many hash table chunks pushed compressed to docker-registry,
/// pulled lazily, read whole through a lazy open and downloaded (`fetch_rest`). Must hold: the
/// config records both index chunks and the compressed blob; the lazy start fetches exactly
/// the header fields, frame table, extent chunks and trailer of each layer (the table in the
/// same range as the extent chunks); the partial copies keep their chunk lists and frame tables;
/// every byte reads right; both layers complete to their digests, and their chunk lists and
/// frame tables are gone.
#[test]
fn chunked_lazy_start_from_compressed_blobs_then_completes() {
    let t = tempfile::tempdir().unwrap();
    let reg = RegistryServer::start(&t.path().join("reg"), None);
    let (disk, bytes) = build_chunky_disk(&t.path().join("a"));
    let r = Reference::parse(&format!("oci://{}/mcow/chunkz:v1", reg.host())).unwrap();
    let opts = transfer::PushOptions { trace: None, compress: Some(mcow_format::DEFAULT_LEVEL) };
    transfer::push_with(&disk, &r, &opts, &mut |_, _| {}).unwrap();
    let shapes = layer_shapes(&disk);
    let remote = mcow_remote::open_remote(&r).unwrap();
    let image = transfer::fetch_image(remote.as_ref(), &r).unwrap();
    let mut tables = 0;
    for (rec, s) in image.config.layers.iter().zip(&shapes) {
        assert!(rec.index_chunks.is_some(), "{rec:?}");
        assert_eq!(rec.compressed().map(|c| c.diff_id), Some(s.0));
        let blocks = (s.2 - mcow_format::HEADER_SIZE as u64) / CBS;
        tables += mcow_format::FrameTable::encoded_len(blocks);
    }

    let rep = transfer::pull(&r, &t.path().join("b/disk"), &t.path().join("b/layers"), true, &mut |_, _| {})
        .unwrap();
    assert_eq!(rep.bytes_fetched, start_bytes(&shapes) + tables);
    let store = LayerStore::new(t.path().join("b/layers"));
    for s in &shapes {
        assert!(store.chunk_list_path(&s.0).is_file() && store.frames_path(&s.0).is_file());
        assert_eq!(std::fs::metadata(store.partial_path(&s.0)).unwrap().len(), s.1);
    }
    let (d, _) = transfer::Sources::new()
        .open_lazy_disk(
            &mcow_engine::Engine::default(),
            &t.path().join("b/disk"),
            ro(),
            FetchPolicy::default(),
        )
        .unwrap();
    let mut all = vec![0u8; CSIZE as usize];
    d.read(0, &mut all).unwrap();
    assert!(all == bytes, "the lazy disk reads what the local one does");
    let done = d.fetch_rest(&AtomicBool::new(false));
    assert_eq!((done.completed, done.failed), (2, 0));
    for s in &shapes {
        assert!(store.contains(&s.0) && !store.partial_path(&s.0).exists());
        assert!(!store.chunk_list_path(&s.0).exists() && !store.frames_path(&s.0).exists());
    }
}

/// Tried: an image in a `file://` layout served by nginx, pulled lazily; then a byte flipped in
/// the served copy of the base layer inside its hash table chunk 4, and a disk opened (its
/// background chunk fetch fails on that chunk); then the byte restored; then (a new pull) a
/// byte flipped in data block 2400, read on a layer opened without background threads; then
/// a byte flipped in
/// the second layer's extent index and a new lazy pull. Must hold: reads before the tamper equal
/// the local disk; with it, a read of a block under chunk 4 fails with an I/O error of kind
/// InvalidData (EIO over NBD) and caches neither the chunk nor the block, while blocks under
/// other chunks read right; once restored the same read succeeds; a bad data block fetched in
/// one request with its good chunk fails its read and is not kept (the chunk is), and reads
/// right once restored; the pull with a tampered
/// extents chunk fails, leaving neither a disk nor that layer's partial file or chunk list.
#[test]
fn tampered_chunks_fail_their_reads_or_the_pull() {
    let t = tempfile::tempdir().unwrap();
    let (disk, bytes) = build_chunky_disk(&t.path().join("a"));
    let www = t.path().join("www");
    let layout = www.join("images");
    let file_ref = Reference::parse(&format!("file://{}:v1", layout.display())).unwrap();
    transfer::push(&disk, &file_ref, &mut |_, _| {}).unwrap();
    let ngx = Nginx::start(&t.path().join("ngx"), &www);
    let r = Reference::parse(&format!("http://127.0.0.1:{}/images:v1", ngx.port)).unwrap();
    let shapes = layer_shapes(&disk);
    let blob = |d: &Digest| layout.join("blobs/sha256").join(d.hex());

    let pull = |name: &str| {
        transfer::pull(
            &r,
            &t.path().join(name).join("disk"),
            &t.path().join(name).join("layers"),
            true,
            &mut |_, _| {},
        )
    };
    pull("b").unwrap();
    let (base, _, base_index, _, _) = shapes[0];
    let at = (base_index + 4 * MIN_CHUNK_SIZE + 100) as usize;
    let original = std::fs::read(blob(&base)).unwrap();
    let mut bad = original.clone();
    bad[at] ^= 0x40;
    std::fs::write(blob(&base), &bad).unwrap();

    let (d, _) = transfer::Sources::new()
        .open_lazy_disk(&mcow_engine::Engine::default(), &t.path().join("b/disk"), ro(), EXACT)
        .unwrap();
    let mut buf = vec![0u8; CBS as usize];
    let e = d.read(2100 * CBS, &mut buf).unwrap_err();
    assert!(matches!(e, mcow_engine::Error::HashChunk { chunk: 4, .. }), "{e:?}");
    assert!(e.to_string().contains("does not match"), "{e}");
    assert_eq!(std::io::Error::from(e).kind(), std::io::ErrorKind::InvalidData);
    let partial = LayerStore::new(t.path().join("b/layers")).partial_path(&base);
    assert!(file_bytes(&partial, base_index + 4 * MIN_CHUNK_SIZE, MIN_CHUNK_SIZE).iter().all(|&b| b == 0));
    assert!(file_bytes(&partial, 4096 + 2100 * CBS, CBS).iter().all(|&b| b == 0), "nothing cached");
    for vb in [1u64, 1501, 2600, 2999] {
        d.read(vb * CBS, &mut buf).unwrap();
        assert!(buf == bytes[(vb * CBS) as usize..][..CBS as usize], "block {vb}");
    }
    std::fs::write(blob(&base), &original).unwrap();
    d.read(2100 * CBS, &mut buf).unwrap();
    assert!(buf == bytes[(2100 * CBS) as usize..][..CBS as usize]);
    drop(d);

    // A bad block in the request that also brings its (good) chunk: the chunk is kept, the
    // block is not, and its read fails.
    pull("d").unwrap();
    let block_at = (4096 + 2400 * CBS + 77) as usize;
    let mut bad = original.clone();
    bad[block_at] ^= 0x01;
    std::fs::write(blob(&base), &bad).unwrap();
    let src = Arc::new(RemoteSource::new(mcow_remote::open_remote(&r).unwrap()));
    let layer = open_base(&t.path().join("d/layers"), &base, src.clone());
    let e = layer.read(2400, 0, &mut buf).unwrap_err();
    assert!(matches!(e, mcow_engine::Error::BlockChecksum { pblock: 2400, .. }), "{e:?}");
    // Chunk and block in one request, then the block alone again (the usual fetch, which fails).
    assert_eq!(src.stats(), (MIN_CHUNK_SIZE + 2 * CBS, 2));
    let partial = LayerStore::new(t.path().join("d/layers")).partial_path(&base);
    let chunk4 = base_index + 4 * MIN_CHUNK_SIZE;
    assert!(
        file_bytes(&partial, chunk4, MIN_CHUNK_SIZE)
            == original[chunk4 as usize..][..MIN_CHUNK_SIZE as usize]
    );
    assert!(
        file_bytes(&partial, 4096 + 2400 * CBS, CBS).iter().all(|&b| b == 0),
        "the bad block is not kept"
    );
    std::fs::write(blob(&base), &original).unwrap();
    layer.read(2400, 0, &mut buf).unwrap();
    assert!(buf == bytes[(2400 * CBS) as usize..][..CBS as usize]);
    drop(layer);

    // The extent index: the pull itself fails.
    let (top, _, top_index, _, _) = shapes[1];
    let original = std::fs::read(blob(&top)).unwrap();
    let mut bad = original.clone();
    bad[(top_index + 40) as usize] ^= 1;
    std::fs::write(blob(&top), &bad).unwrap();
    let e = pull("c").unwrap_err();
    assert!(e.to_string().contains("does not match its digest"), "{e}");
    let store = LayerStore::new(t.path().join("c/layers"));
    assert!(!t.path().join("c/disk/disk.json").exists());
    assert!(!store.partial_path(&top).exists() && !store.chunk_list_path(&top).exists());
    std::fs::write(blob(&top), &original).unwrap();
    pull("c").unwrap();
}

/// Tried: a lazily pulled layer (`file://`) with one hash table chunk fetched by a read, opened
/// again; then that chunk's bytes in the partial file damaged (a torn write), and the layer
/// opened again; then its chunk list overwritten with garbage, then removed. Must hold: the
/// reopened layer finds the fetched chunk and block in its file (a read in the same chunk
/// fetches only its block, the first block nothing); the damaged chunk is fetched again and the
/// block under it is not; the garbage list and the missing one each fail the open with a
/// `ChunkList` error that names the problem; with the list back, it opens and reads.
#[test]
fn a_partial_layer_reopens_with_its_chunks_and_refuses_a_bad_chunk_list() {
    let t = tempfile::tempdir().unwrap();
    let (disk, bytes) = build_chunky_disk(&t.path().join("a"));
    let r = Reference::parse(&format!("file://{}:v1", t.path().join("images").display())).unwrap();
    transfer::push(&disk, &r, &mut |_, _| {}).unwrap();
    transfer::pull(&r, &t.path().join("b/disk"), &t.path().join("b/layers"), true, &mut |_, _| {}).unwrap();
    let (base, _, base_index, _, _) = layer_shapes(&disk)[0];
    let layers = t.path().join("b/layers");
    let remote = mcow_remote::open_remote(&r).unwrap();
    let block = |p: u64| bytes[(p * CBS) as usize..][..CBS as usize].to_vec();
    let mut buf = vec![0u8; CBS as usize];
    {
        let src = Arc::new(RemoteSource::new(remote.clone()));
        open_base(&layers, &base, src.clone()).read(2100, 0, &mut buf).unwrap();
        // (A file:// source reads two ranges as two requests.)
        assert_eq!(src.stats(), (MIN_CHUNK_SIZE + CBS, 2));
    }
    {
        let src = Arc::new(RemoteSource::new(remote.clone()));
        let layer = open_base(&layers, &base, src.clone());
        layer.read(2100, 0, &mut buf).unwrap();
        assert!(buf == block(2100));
        assert_eq!(src.stats(), (0, 0), "block and chunk were kept");
        layer.read(2101, 0, &mut buf).unwrap();
        assert!(buf == block(2101));
        assert_eq!(src.stats(), (CBS, 1), "the chunk is local: the block only");
    }
    {
        // A chunk torn by a crash (its bytes in the file are off) is fetched again; the blocks
        // under it that are local stay.
        use std::os::unix::fs::FileExt;
        let partial = LayerStore::new(&layers).partial_path(&base);
        let f = std::fs::OpenOptions::new().write(true).open(&partial).unwrap();
        f.write_all_at(b"torn", base_index + 4 * MIN_CHUNK_SIZE + 10).unwrap();
        let src = Arc::new(RemoteSource::new(remote.clone()));
        let layer = open_base(&layers, &base, src.clone());
        layer.read(2100, 0, &mut buf).unwrap();
        assert!(buf == block(2100));
        assert_eq!(src.stats(), (MIN_CHUNK_SIZE, 1), "the chunk again, not the block");
    }
    let store = LayerStore::new(&layers).with_source(Arc::new(RemoteSource::new(remote.clone())), EXACT);
    let list = store.chunk_list_path(&base);
    let text = std::fs::read(&list).unwrap();
    std::fs::write(&list, b"not a chunk list\n").unwrap();
    let e = store.open_layer(&base, true).err().expect("a garbage chunk list is refused");
    assert!(matches!(e, mcow_engine::Error::ChunkList { .. }), "{e:?}");
    assert!(e.to_string().contains("mcow-index-chunks"), "{e}");
    std::fs::remove_file(&list).unwrap();
    let e = store.open_layer(&base, true).err().expect("a missing chunk list is refused");
    assert!(matches!(e, mcow_engine::Error::ChunkList { .. }), "{e:?}");
    assert!(e.to_string().contains("no chunk list"), "{e}");
    std::fs::write(&list, &text).unwrap();
    let (layer, _) = store.open_layer(&base, true).unwrap();
    layer.read(2999, 0, &mut buf).unwrap();
    assert!(buf == block(2999));
}

/// Tried: four threads reading four blocks under one hash table chunk at the same moment, on a
/// freshly pulled layer opened without background threads. Must hold: each gets its block, and
/// the chunk was fetched once (the others waited for that fetch): the chunk's bytes plus four
/// blocks, in five requests (a `file://` source counts each range of the first read's request,
/// chunk and block, as one).
#[test]
fn readers_of_one_chunk_wait_for_one_fetch() {
    let t = tempfile::tempdir().unwrap();
    let (disk, bytes) = build_chunky_disk(&t.path().join("a"));
    let r = Reference::parse(&format!("file://{}:v1", t.path().join("images").display())).unwrap();
    transfer::push(&disk, &r, &mut |_, _| {}).unwrap();
    transfer::pull(&r, &t.path().join("b/disk"), &t.path().join("b/layers"), true, &mut |_, _| {}).unwrap();
    let base = layer_shapes(&disk)[0].0;
    let src = Arc::new(RemoteSource::new(mcow_remote::open_remote(&r).unwrap()));
    let layer = open_base(&t.path().join("b/layers"), &base, src.clone());
    let barrier = std::sync::Barrier::new(4);
    std::thread::scope(|s| {
        for i in 0..4u64 {
            let (layer, barrier, bytes) = (&layer, &barrier, &bytes);
            s.spawn(move || {
                let p = 2100 + 7 * i;
                let mut buf = vec![0u8; CBS as usize];
                barrier.wait();
                layer.read(p, 0, &mut buf).unwrap();
                assert!(buf == bytes[(p * CBS) as usize..][..CBS as usize], "block {p}");
            });
        }
    });
    assert_eq!(src.stats(), (MIN_CHUNK_SIZE + 4 * CBS, 5));
}

/// Tried: the 3-layer test disk of 64 KiB blocks (every index under one chunk) pushed and pulled
/// lazily. Must hold: push writes no index chunks for it (its config is the older form, which
/// readers before index chunks accept), and the lazy pull fetches the whole tails as before.
#[test]
fn small_layers_keep_the_older_config_form() {
    let t = tempfile::tempdir().unwrap();
    let (disk, bytes) = build_disk(&t.path().join("a"));
    let r = Reference::parse(&format!("file://{}:v1", t.path().join("images").display())).unwrap();
    transfer::push(&disk, &r, &mut |_, _| {}).unwrap();
    let remote = mcow_remote::open_remote(&r).unwrap();
    let image = transfer::fetch_image(remote.as_ref(), &r).unwrap();
    assert!(image.config.layers.iter().all(|l| l.index_chunks.is_none() && l.tail_len.is_some()));
    let rep = transfer::pull(&r, &t.path().join("b/disk"), &t.path().join("b/layers"), true, &mut |_, _| {})
        .unwrap();
    let d = Disk::open(&disk, ro()).unwrap();
    let tails: u64 = d.stack().layers().iter().map(|l| l.trailer.index_len() + TRAILER_SIZE as u64).sum();
    assert_eq!(rep.bytes_fetched, 3 * HEADER_FIELDS_LEN as u64 + tails);
    let (lazy, _) = transfer::Sources::new()
        .open_lazy_disk(&mcow_engine::Engine::default(), &t.path().join("b/disk"), ro(), EXACT)
        .unwrap();
    assert!(read_all(&lazy) == bytes);
}
