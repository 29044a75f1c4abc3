//! Partial layers pulled from compressed blobs: their blocks are fetched as the blob's zstd
//! frames (by the blob's digest, through the frame table in the layer's `.frames` file),
//! decoded one block each, checked against their hashes and cached like any fetched block;
//! bad frames fail their reads and leave nothing behind, bad frame tables refuse the open.
//!
//! Each test builds a real sealed layer (a disk written and merged), makes its compressed blob
//! with `FrameEncoder` the way push does (header, one frame per stored block, frame table,
//! tail), serves that blob from a counting test source that knows nothing of the layer's own
//! digest, and makes the partial layer as a lazy pull does (`add_partial` or
//! `add_partial_chunked`, then the `.frames` file beside it).

mod common;

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use mcow_engine::chunks::IndexChunks;
use mcow_engine::compressed::FramedSource;
use mcow_engine::store::LayerStore;
use mcow_engine::{BlockSource, CreateOptions, Digest, Disk, Error, FetchPolicy, OpenOptions, ops};
use mcow_format::{
    BlobLayout, ExtentKind, FrameEncoder, FrameTable, FramesFile, HEADER_SIZE, INDEX_ENTRY_SIZE,
    TRAILER_SIZE, Trailer, decode_index,
};

use common::Rng;

/// Fetches exactly the blocks read.
const EXACT: FetchPolicy = FetchPolicy { window: 1, readahead: 0 };

/// Serves blobs by digest (only those added: never a layer by its own digest), counting
/// requests and bytes and logging every range asked for. All ranges of a call are one request,
/// as a multi-range GET; optionally handed over last range first (a server may order its parts
/// as it likes). A range past the end of a blob gets what there is and no error: a hostile or
/// broken server.
#[derive(Default)]
struct BlobSource {
    blobs: Mutex<HashMap<Digest, Arc<Vec<u8>>>>,
    requests: AtomicU64,
    served: AtomicU64,
    log: Mutex<Vec<(u64, u64)>>,
    reverse: AtomicBool,
}

impl BlobSource {
    fn with(blob: &[u8], digest: Digest) -> Arc<BlobSource> {
        let s = BlobSource::default();
        s.blobs.lock().unwrap().insert(digest, Arc::new(blob.to_vec()));
        Arc::new(s)
    }
    fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
    fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl BlockSource for BlobSource {
    fn read_range(
        &self,
        layer: &Digest,
        offset: u64,
        len: u64,
        sink: &mut dyn FnMut(&[u8]) -> bool,
    ) -> std::io::Result<()> {
        self.read_ranges(layer, &[(offset, len)], &mut |_, piece: &[u8]| sink(piece))
    }

    fn read_ranges(
        &self,
        blob: &Digest,
        ranges: &[(u64, u64)],
        sink: &mut dyn FnMut(usize, &[u8]) -> bool,
    ) -> std::io::Result<()> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let bytes = self.blobs.lock().unwrap().get(blob).cloned().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, format!("no blob {blob} here"))
        })?;
        self.log.lock().unwrap().extend_from_slice(ranges);
        let mut order: Vec<usize> = (0..ranges.len()).collect();
        if self.reverse.load(Ordering::Relaxed) {
            order.reverse();
        }
        for i in order {
            let (o, l) = ranges[i];
            let end = (o + l).min(bytes.len() as u64) as usize;
            let start = (o as usize).min(end);
            // Uneven pieces, so that frames split across pieces are exercised.
            for piece in bytes[start..end].chunks(7001) {
                self.served.fetch_add(piece.len() as u64, Ordering::Relaxed);
                if !sink(i, piece) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// A real sealed layer and the disk bytes it holds.
struct Layer {
    digest: Digest,
    bytes: Vec<u8>,
    bs: u64,
    virtual_size: u64,
    trailer: Trailer,
    /// The disk's bytes (one layer: the layer's content).
    disk: Vec<u8>,
    /// Virtual block of each physical block.
    vblock: Vec<u64>,
}

impl Layer {
    fn index_offset(&self) -> usize {
        self.trailer.index_offset(self.bs as u32) as usize
    }
    fn stored(&self) -> u64 {
        self.trailer.block_count
    }
    fn block(&self, p: u64) -> &[u8] {
        let at = HEADER_SIZE + (p * self.bs) as usize;
        &self.bytes[at..at + self.bs as usize]
    }
    /// The disk offset of physical block `p`.
    fn voffset(&self, p: u64) -> u64 {
        self.vblock[p as usize] * self.bs
    }
}

/// Block `v` of the test disks, by `v % 16`: text-like (0-7, 14-15: compressible), random
/// (8-9: incompressible, stored as themselves), zeros (10-11: never stored), nearly zero
/// (12-13).
fn content(v: u64, bs: usize) -> Option<Vec<u8>> {
    match v % 16 {
        0..=7 | 14 | 15 => {
            let text = format!("block {v} of a layer that travels compressed; mcow frames it. ");
            Some(text.bytes().cycle().take(bs).collect())
        }
        8 | 9 => Some(Rng::new(v).bytes(bs)),
        10 | 11 => None,
        _ => {
            let mut b = vec![0u8; bs];
            b[v as usize % bs] = v as u8 | 1;
            Some(b)
        }
    }
}

/// A one-layer disk of `blocks` blocks of `bs` bytes ([`content`]) in `dir`, merged into a sealed
/// layer; returns that layer.
fn build_layer(dir: &Path, bs: u64, blocks: u64) -> Layer {
    let disk = dir.join("disk");
    let size = bs * blocks;
    Disk::create(
        &disk,
        &CreateOptions {
            virtual_size: size,
            block_size: bs as u32,
            store: dir.join("layers"),
            layers: vec![],
        },
    )
    .unwrap();
    let mut all = vec![0u8; size as usize];
    for v in 0..blocks {
        if let Some(b) = content(v, bs as usize) {
            all[(v * bs) as usize..((v + 1) * bs) as usize].copy_from_slice(&b);
        }
    }
    let d = Disk::open(&disk, OpenOptions::default()).unwrap();
    d.write(0, &all).unwrap();
    d.flush().unwrap();
    drop(d);
    let digest = ops::merge(&disk, 0, &mut |_, _| {}).unwrap();
    let bytes = std::fs::read(dir.join("layers/blobs/sha256").join(digest.hex())).unwrap();
    let trailer = Trailer::decode(&bytes[bytes.len() - TRAILER_SIZE..]).unwrap();
    let at = trailer.index_offset(bs as u32) as usize;
    let extents = decode_index(&bytes[at..at + trailer.extent_count as usize * INDEX_ENTRY_SIZE]).unwrap();
    let mut vblock = vec![u64::MAX; trailer.block_count as usize];
    for e in extents.iter().filter(|e| e.kind == ExtentKind::Data) {
        for k in 0..e.count {
            vblock[(e.pblock + k) as usize] = e.vblock + k;
        }
    }
    assert!(vblock.iter().all(|&v| v != u64::MAX));
    Layer { digest, bytes, bs, virtual_size: size, trailer, disk: all, vblock }
}

/// The frames of the layer's stored blocks, as push makes them.
fn compress(layer: &Layer) -> Vec<Vec<u8>> {
    let mut enc = FrameEncoder::new(mcow_format::DEFAULT_LEVEL, layer.bs as u32).unwrap();
    (0..layer.stored()).map(|p| enc.encode(layer.block(p)).to_vec()).collect()
}

/// The compressed blob of `layer` with these frames (header, frames, table, tail) and the
/// `.frames` record of it.
fn assemble(layer: &Layer, frames: &[Vec<u8>]) -> (Vec<u8>, FramesFile) {
    let table = FrameTable::from_lengths(frames.iter().map(|f| f.len() as u64));
    let mut blob = layer.bytes[..HEADER_SIZE].to_vec();
    for f in frames {
        blob.extend_from_slice(f);
    }
    blob.extend_from_slice(&table.encode());
    blob.extend_from_slice(&layer.bytes[layer.index_offset()..]);
    let frames = FramesFile { blob: Digest::of(&blob), blob_len: blob.len() as u64, table };
    (blob, frames)
}

/// A disk `root/disk` on a partial copy of `layer` in the store `root/layers` (header and tail,
/// as a lazy pull writes it), with `frames` (the bytes of a `.frames` file) beside it.
fn lazy_disk(root: &Path, layer: &Layer, frames: &[u8]) -> PathBuf {
    let store = LayerStore::new(root.join("layers"));
    let at = layer.index_offset();
    store
        .add_partial(
            &layer.digest,
            layer.bytes.len() as u64,
            &layer.bytes[..HEADER_SIZE],
            &layer.bytes[at..],
            &layer.trailer.index_digest,
            None,
        )
        .unwrap();
    std::fs::write(store.frames_path(&layer.digest), frames).unwrap();
    disk_on(root, "disk", layer)
}

/// A new disk `root/name` on `layer` in the store `root/layers`.
fn disk_on(root: &Path, name: &str, layer: &Layer) -> PathBuf {
    let dir = root.join(name);
    let opts = CreateOptions {
        virtual_size: layer.virtual_size,
        block_size: layer.bs as u32,
        store: root.join("layers"),
        layers: vec![layer.digest],
    };
    Disk::create(&dir, &opts).unwrap();
    dir
}

/// Whether stored block `p` has any byte in the partial file of `layer` in `root/layers` (it
/// starts as a hole; a block is written only once it matched its hash).
fn cached(root: &Path, layer: &Layer, p: u64) -> bool {
    let path = LayerStore::new(root.join("layers")).partial_path(&layer.digest);
    let mut b = vec![0u8; layer.bs as usize];
    std::fs::File::open(path).unwrap().read_exact_at(&mut b, HEADER_SIZE as u64 + p * layer.bs).unwrap();
    b.iter().any(|&x| x != 0)
}

/// Tried: a lazily pulled compressed layer (compressible text, incompressible noise, nearly
/// empty and zero blocks) read through a disk: offline `check` first, a read of part of one
/// block, the whole disk in 256 KiB reads, a restart, a second disk on the same layer in the
/// same engine, then the background download. Must hold: `check` works offline and fetches
/// nothing; the part-block read costs one request of exactly its block's frame; the whole disk
/// reads as the layer's content, costs a handful of requests, and the source served exactly the
/// frames' bytes (each once), well under the uncompressed data; nothing is fetched after a
/// restart nor by the second disk, which shares the first one's open layer; after the
/// download the layer is complete, hashes to its digest and moves into the store's blobs.
#[test]
fn lazy_reads_of_a_compressed_layer_fetch_its_frames_once_and_complete_it() {
    let tmp = tempfile::tempdir().unwrap();
    let layer = build_layer(&tmp.path().join("a"), 16384, 64);
    let (bs, n) = (layer.bs, layer.stored());
    let frames = compress(&layer);
    assert!(frames.iter().any(|f| f.len() as u64 == bs), "some blocks should not shrink");
    let (blob, ff) = assemble(&layer, &frames);
    let frame_bytes = ff.table.span(0, n).1;
    assert!(frame_bytes < n * bs / 3, "{frame_bytes} bytes of frames for {} of blocks", n * bs);
    let src = BlobSource::with(&blob, ff.blob);
    let root = tmp.path().join("b");
    let dir = lazy_disk(&root, &layer, &ff.encode());

    let report = ops::check(&dir, false, &mut |_, _| {}).unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.partial.len(), 1);
    assert_eq!((report.partial[0].blocks_local, report.partial[0].blocks_total), (0, n));

    let d =
        Disk::open_with_source(&dir, OpenOptions::default(), src.clone(), FetchPolicy::default()).unwrap();
    let p = 3;
    let mut part = vec![0u8; 1000];
    d.read(layer.voffset(p) + 500, &mut part).unwrap();
    let at = (layer.voffset(p) + 500) as usize;
    assert_eq!(part, layer.disk[at..at + 1000]);
    assert_eq!((src.requests(), src.served()), (1, ff.table.span(p, 1).1));
    let mut all = vec![0u8; layer.disk.len()];
    for (i, piece) in all.chunks_mut(256 << 10).enumerate() {
        d.read(i as u64 * (256 << 10), piece).unwrap();
    }
    assert!(all == layer.disk, "the lazy disk differs at {:?}", common::first_diff(&all, &layer.disk));
    assert_eq!(src.served(), frame_bytes, "each frame served once, nothing else");
    // At most one request per run of stored blocks each read covers: 2 per 256 KiB (the zero
    // blocks cut them), 1 more where block `p` was local already; not one per block.
    assert!(
        src.requests() <= 1 + 4 * 2 + 1,
        "{} requests for a sequential read of {n} blocks",
        src.requests()
    );
    drop(d);

    let engine = mcow_engine::Engine::default();
    let second = disk_on(&root, "disk2", &layer);
    let a = Disk::open_with_source_in(&engine, &dir, OpenOptions::default(), src.clone(), EXACT).unwrap();
    let b = Disk::open_with_source_in(&engine, &second, OpenOptions::default(), src.clone(), EXACT).unwrap();
    let (sa, sb) = (a.stack(), b.stack());
    let (la, lb) = (&sa.layers()[0], &sb.layers()[0]);
    assert!(Arc::ptr_eq(la.partial().unwrap(), lb.partial().unwrap()), "the disks do not share the layer");
    assert!(common::read_all(&a) == layer.disk && common::read_all(&b) == layer.disk);
    assert_eq!(src.served(), frame_bytes, "a restart or a second disk fetched again");

    la.fetch_all(&AtomicBool::new(false)).unwrap();
    assert_eq!(src.served(), frame_bytes);
    drop((a, b));
    let store = LayerStore::new(root.join("layers"));
    assert!(store.complete_partial(&layer.digest).unwrap(), "the layer is not complete");
    assert_eq!(std::fs::read(store.layer_path(&layer.digest)).unwrap(), layer.bytes);
    assert_eq!(Digest::of(&std::fs::read(store.layer_path(&layer.digest)).unwrap()), layer.digest);
}

/// Tried: `FramedSource` alone, asked for layer ranges of every kind (header, header into data,
/// parts of blocks, data into tail, the trailer, the whole layer, an empty range), one at a
/// time and all in one `read_ranges`, with a source that hands ranges over in order and one that
/// hands them over last first; a sink that stops after its first piece; a range past the end;
/// another layer's digest. Must hold: every range's bytes are exactly the layer's; all ranges
/// together are one request to the inner source, for blob ranges only (the header's, frames',
/// tail's); stopping stops without error; the bad requests are errors and fetch nothing.
#[test]
fn a_framed_source_maps_any_layer_range_to_blob_ranges_in_one_request() {
    let tmp = tempfile::tempdir().unwrap();
    let layer = build_layer(tmp.path(), 16384, 32);
    let (blob, ff) = assemble(&layer, &compress(&layer));
    let len = layer.bytes.len() as u64;
    let tail = layer.index_offset() as u64;
    let layout = BlobLayout::new(layer.bs as u32, len, len - tail, ff.blob_len).unwrap();
    let inner = BlobSource::with(&blob, ff.blob);
    let src = FramedSource::new(inner.clone(), layer.digest, ff.clone(), layout).unwrap();
    assert_eq!(src.blob(), &ff.blob);
    let bs = layer.bs;
    let ranges = [
        (0, 100),
        (4000, 200),
        (4096 + 3 * bs + 5, 2 * bs),
        (4096 + 7 * bs, bs),
        (tail - 10, 40),
        (len - 128, 128),
        (0, len),
        (4096 + bs, 0),
    ];
    for reverse in [false, true] {
        inner.reverse.store(reverse, Ordering::Relaxed);
        for &(o, l) in &ranges {
            let mut got = Vec::new();
            src.read_range(&layer.digest, o, l, &mut |p: &[u8]| {
                got.extend_from_slice(p);
                true
            })
            .unwrap();
            assert!(got == layer.bytes[o as usize..(o + l) as usize], "range {o}+{l} (reverse: {reverse})");
        }
        let before = inner.requests();
        let mut got = vec![Vec::new(); ranges.len()];
        src.read_ranges(&layer.digest, &ranges, &mut |i, p: &[u8]| {
            got[i].extend_from_slice(p);
            true
        })
        .unwrap();
        assert_eq!(inner.requests(), before + 1, "several ranges, one request");
        for (i, &(o, l)) in ranges.iter().enumerate() {
            assert!(got[i] == layer.bytes[o as usize..(o + l) as usize], "range {i} of several");
        }
    }
    let blob_tail = ff.blob_len - (len - tail);
    for &(o, l) in inner.log.lock().unwrap().iter() {
        let in_header = o + l <= 4096;
        let in_frames = o >= 4096 && o + l <= ff.table.frames_end();
        let in_tail = o >= blob_tail && o + l <= ff.blob_len;
        assert!(in_header || in_frames || in_tail, "asked for blob range {o}+{l}");
    }
    let mut pieces = 0;
    src.read_range(&layer.digest, 0, len, &mut |_| {
        pieces += 1;
        false
    })
    .unwrap();
    assert_eq!(pieces, 1, "the sink asked to stop");
    let before = inner.requests();
    let past = src.read_range(&layer.digest, len - 10, 11, &mut |_| true).unwrap_err();
    assert_eq!(past.kind(), std::io::ErrorKind::InvalidInput, "{past}");
    let other = src.read_range(&Digest::of(b"another layer"), 0, 10, &mut |_| true).unwrap_err();
    assert_eq!(other.kind(), std::io::ErrorKind::InvalidInput, "{other}");
    assert_eq!(inner.requests(), before);
}

/// Tried: four hostile blobs, each with one bad frame (block `p`, text that compresses) and a
/// consistent frame table: a frame whose first byte (zstd's magic) is flipped, one with a byte
/// flipped in its middle, a blob cut off halfway through the frame (the server sends fewer
/// bytes and no error), a frame that decompresses to twice a block (a small zstd "bomb"), and
/// a frame that decodes to half a block. Must hold, for each: reading block `p` is an error
/// (naming the block, and the compressed blob where the frame is what fails), twice; block
/// `p` is never written to the partial file; the blocks before it (and after it, where the
/// blob has them) still read right; the open disk keeps working.
#[test]
fn bad_frames_fail_their_reads_cache_nothing_and_leave_the_rest_readable() {
    let tmp = tempfile::tempdir().unwrap();
    let layer = build_layer(&tmp.path().join("a"), 16384, 32);
    let bs = layer.bs as usize;
    let good = compress(&layer);
    let p = 4u64;
    assert!(good[p as usize].len() < bs / 4 && layer.stored() > p + 2);
    let text: Vec<u8> = layer.block(p)[..bs / 2].to_vec();
    let bomb = FrameEncoder::new(3, 2 * bs as u32).unwrap().encode(&vec![0u8; 2 * bs]).to_vec();
    let half = FrameEncoder::new(3, bs as u32).unwrap().encode(&text).to_vec();
    assert!(bomb.len() < 100 && half.len() < bs / 4);
    let decodes_short = format!("decodes to {} bytes", bs / 2);
    let cases: [Case; 5] = [
        ("magic", Some(flip(&good[p as usize], 0)), false, &["compressed blob", "does not decode"]),
        ("middle", Some(flip(&good[p as usize], good[p as usize].len() / 2)), false, &[]),
        ("truncated", None, true, &["compressed blob", "did not arrive"]),
        ("bomb", Some(bomb), false, &["compressed blob", "does not decode"]),
        ("short", Some(half), false, &["compressed blob", &decodes_short]),
    ];
    for (name, frame, cut, says) in cases {
        let mut frames = good.clone();
        if let Some(f) = frame {
            frames[p as usize] = f;
        }
        let (mut blob, ff) = assemble(&layer, &frames);
        if cut {
            let (at, len) = ff.table.span(p, 1);
            blob.truncate((at + len / 2) as usize);
        }
        let src = BlobSource::with(&blob, ff.blob);
        let root = tmp.path().join(name);
        let dir = lazy_disk(&root, &layer, &ff.encode());
        let d = Disk::open_with_source(&dir, OpenOptions::default(), src.clone(), EXACT).unwrap();
        let mut buf = vec![0u8; bs];
        for _ in 0..2 {
            let e = d.read(layer.voffset(p), &mut buf).unwrap_err().to_string();
            for s in says {
                assert!(e.contains(s), "{name}: {e:?} does not say {s:?}");
            }
            assert!(e.contains(&format!("block {p}")), "{name}: {e:?} does not name the block");
            assert!(!cached(&root, &layer, p), "{name}: the bad block was cached");
        }
        let readable: &[u64] = if cut { &[p - 1, 0] } else { &[p - 1, p + 1, layer.stored() - 1, 0] };
        for &q in readable {
            d.read(layer.voffset(q), &mut buf).unwrap();
            assert!(buf == layer.block(q), "{name}: block {q} reads wrong");
            assert!(cached(&root, &layer, q), "{name}: block {q} was not cached");
        }
        assert!(!cached(&root, &layer, p), "{name}: the bad block was cached");
        d.write(layer.voffset(p), &vec![7u8; bs]).unwrap();
        d.read(layer.voffset(p), &mut buf).unwrap();
        assert_eq!(buf, vec![7u8; bs], "{name}: the disk stopped working");
    }
}

/// A hostile blob: its name, what frame `p` is replaced by, whether the blob is cut inside
/// frame `p`, and what the read's error must say.
type Case<'a> = (&'a str, Option<Vec<u8>>, bool, &'a [&'a str]);

fn flip(b: &[u8], at: usize) -> Vec<u8> {
    let mut b = b.to_vec();
    b[at] ^= 0x10;
    b
}

/// Tried: `.frames` files that are wrong in each way the format names: a frame of length 0, a
/// frame of 2^32 bytes (blob length made to fit), a table that points past the blob (a blob
/// length 1000 bytes short), a wrong table digest, a table of one block fewer, a truncated
/// file, a bad magic. Must hold, for each: opening the disk fails with `Error::FramesFile`
/// naming the `.frames` file, nothing is fetched, and offline `check` reports the error too.
#[test]
fn bad_frame_tables_refuse_the_open_and_fetch_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let layer = build_layer(&tmp.path().join("a"), 16384, 32);
    let frames = compress(&layer);
    let (blob, ff) = assemble(&layer, &frames);
    let tail_len = (layer.bytes.len() - layer.index_offset()) as u64;
    let with_lengths = |lens: Vec<u64>| {
        let table = FrameTable::from_lengths(lens);
        let blob_len = table.frames_end() + FrameTable::encoded_len(table.block_count()) + tail_len;
        FramesFile { blob: ff.blob, blob_len, table }.encode()
    };
    let lens: Vec<u64> = frames.iter().map(|f| f.len() as u64).collect();
    let mut zero = lens.clone();
    zero[3] = 0;
    let mut huge = lens.clone();
    huge[3] = 1 << 32;
    let short_blob = FramesFile { blob_len: ff.blob_len - 1000, ..ff.clone() }.encode();
    let mut digest = ff.encode();
    digest[60] ^= 1;
    let fewer = with_lengths(lens[1..].to_vec());
    let mut cut = ff.encode();
    cut.truncate(cut.len() - 8);
    let mut magic = ff.encode();
    magic[0] ^= 1;
    let cases = [
        ("zero", with_lengths(zero), "a frame is 1 to 16384 bytes"),
        ("huge", with_lengths(huge), "a frame is 1 to 16384 bytes"),
        ("outside", short_blob, "its table at"),
        ("digest", digest, "recorded"),
        ("fewer", fewer, "a frame table of"),
        ("cut", cut, "a frame table of"),
        ("magic", magic, "bad magic"),
    ];
    for (name, bytes, says) in cases {
        let src = BlobSource::with(&blob, ff.blob);
        let root = tmp.path().join(name);
        let dir = lazy_disk(&root, &layer, &bytes);
        let path = LayerStore::new(root.join("layers")).frames_path(&layer.digest);
        let e =
            match Disk::open_with_source(&dir, OpenOptions::default(), src.clone(), FetchPolicy::default()) {
                Ok(_) => panic!("{name}: a bad .frames file opened"),
                Err(e) => e,
            };
        let same = |p: &Path| p.canonicalize().unwrap() == path.canonicalize().unwrap();
        assert!(matches!(&e, Error::FramesFile { path: p, .. } if same(p)), "{name}: {e:?}");
        let text = e.to_string();
        let file = path.file_name().unwrap().to_str().unwrap();
        assert!(text.contains(file) && text.contains(says), "{name}: {text}");
        let report = ops::check(&dir, false, &mut |_, _| {}).unwrap();
        assert!(report.errors.iter().any(|e| e.contains(".frames")), "{name}: {:?}", report.errors);
        assert_eq!(src.requests(), 0, "{name}: fetched with a bad frame table");
    }
}

/// Tried: a compressed layer pulled with index chunks (4 KiB blocks, so that its hash table
/// spans several chunks): the partial file holds the header, the extent index's chunks and the
/// trailer, and the `.frames` file; then the last stored block is read, then the whole disk,
/// then the rest is downloaded. Must hold: the hash chunk of that block is fetched from the
/// blob's tail (the layer offset shifted by the blob's table and frames), in the same
/// request as the block's frame or the background one, never by the layer's digest (the
/// source would refuse); every read is right; at the end the layer is complete and hashes to
/// its digest.
#[test]
fn a_compressed_layer_pulled_with_index_chunks_fetches_them_from_the_blob_tail() {
    let tmp = tempfile::tempdir().unwrap();
    let layer = build_layer(&tmp.path().join("a"), 4096, 768);
    let (blob, ff) = assemble(&layer, &compress(&layer));
    let len = layer.bytes.len();
    let (at, t) = (layer.index_offset(), &layer.trailer);
    let region = &layer.bytes[at..len - TRAILER_SIZE];
    let chunks = IndexChunks::of(region, t.extent_count);
    assert!(chunks.digests.len() >= 2 && chunks.extent_chunks().len() < chunks.digests.len());
    let pieces: Vec<(usize, Vec<u8>)> = chunks
        .extent_chunks()
        .map(|c| {
            let (o, l) = chunks.range(c, region.len() as u64);
            (c, region[o as usize..(o + l) as usize].to_vec())
        })
        .collect();
    let root = tmp.path().join("b");
    let store = LayerStore::new(root.join("layers"));
    store
        .add_partial_chunked(
            &layer.digest,
            len as u64,
            &layer.bytes[..HEADER_SIZE],
            &layer.bytes[len - TRAILER_SIZE..],
            &chunks,
            &pieces,
            &t.index_digest,
            None,
        )
        .unwrap();
    std::fs::write(store.frames_path(&layer.digest), ff.encode()).unwrap();
    let dir = disk_on(&root, "disk", &layer);
    let src = BlobSource::with(&blob, ff.blob);
    let d = Disk::open_with_source(&dir, OpenOptions::default(), src.clone(), EXACT).unwrap();
    let last = layer.stored() - 1;
    let c = ((chunks.extents_len() + 32 * last) / chunks.size) as usize;
    assert!(!chunks.extent_chunks().contains(&c));
    let mut buf = vec![0u8; layer.bs as usize];
    d.read(layer.voffset(last), &mut buf).unwrap();
    assert!(buf == layer.block(last));
    let (o, l) = chunks.range(c, region.len() as u64);
    let blob_tail = ff.blob_len - (len - at) as u64;
    assert!(
        src.log.lock().unwrap().contains(&(blob_tail + o, l)),
        "chunk {c} was not asked for at the blob's tail: {:?}",
        src.log.lock().unwrap()
    );
    assert!(common::read_all(&d) == layer.disk);
    d.stack().layers()[0].fetch_all(&AtomicBool::new(false)).unwrap();
    drop(d);
    assert!(store.complete_partial(&layer.digest).unwrap(), "the layer is not complete");
    assert_eq!(Digest::of(&std::fs::read(store.layer_path(&layer.digest)).unwrap()), layer.digest);
}
