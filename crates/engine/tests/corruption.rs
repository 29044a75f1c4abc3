//! Corruption is detected, never served as data.
//!
//! A three-layer sealed stack (with blocks hidden by higher layers, zero and discard markers)
//! gets single-byte flips everywhere in its layer files: every byte of every header's checked
//! part, samples of header padding, samples of every stored data block, and every byte of the
//! index, block hash table and trailer. For each flip: either `Disk::open` fails with a
//! corruption error naming the file, or reading the whole disk fails with one, or (only if the
//! flipped block is hidden by a higher layer and so never read) it reads exactly the model; and
//! `ops::check` always reports an error naming the file.
//!
//! Then whole-file problems, each with a clear error: a truncated layer, layers in the wrong
//! order, a layer from another stack, a layer of another virtual size, a wrong-version header, a
//! manifest naming a missing layer, a top whose journal belongs to another top, a damaged top
//! header, and journal batches (with good checksums) whose entries overflow or point past the
//! data file.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::{Rng, create_disk, open_rw, pattern, read_all};
use mcow_engine::sim::SimStorage;
use mcow_engine::storage::Storage;
use mcow_engine::top::TopLayer;
use mcow_engine::{Digest, Disk, Error, OpenOptions, ops};
use mcow_format::{
    ExtentKind, HEADER_SIZE, IndexEntry, JOURNAL_HEADER_SIZE, JournalBatch, TRAILER_SIZE, Trailer,
    encode_batch,
};

const SIZE: u64 = 64 << 10;
const BS: u64 = 4096;

/// A disk with three sealed layers and a top, and its content.
struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    dir: PathBuf,
    model: Vec<u8>,
    layers: Vec<Digest>,
}

fn put(d: &Disk, model: &mut [u8], off: u64, data: &[u8]) {
    d.write(off, data).unwrap();
    model[off as usize..off as usize + data.len()].copy_from_slice(data);
}

fn zero(d: &Disk, model: &mut [u8], off: u64, len: u64, may_trim: bool) {
    d.write_zeroes(off, len, may_trim).unwrap();
    model[off as usize..(off + len) as usize].fill(0);
}

fn seal(dir: &Path, d: Disk) {
    d.flush().unwrap();
    drop(d);
    ops::merge(dir, 0, &mut |_, _| {}).unwrap();
}

fn fixture(tag: u64) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let dir = create_disk(&root, "d", SIZE, BS as u32);
    let mut m = vec![0u8; SIZE as usize];
    let d = open_rw(&dir);
    put(&d, &mut m, 0, &pattern(tag, 6 * BS as usize)); // layer 0: blocks 0..6
    seal(&dir, d);
    let d = open_rw(&dir);
    put(&d, &mut m, 2 * BS, &pattern(tag + 1, 2 * BS as usize)); // hides layer 0's 2, 3
    zero(&d, &mut m, 5 * BS, BS, false); // zero marker over layer 0's 5
    put(&d, &mut m, 8 * BS, &pattern(tag + 2, 3 * BS as usize));
    seal(&dir, d);
    let d = open_rw(&dir);
    zero(&d, &mut m, 0, BS, true); // discard hides layer 0's 0
    put(&d, &mut m, 12 * BS, &pattern(tag + 3, BS as usize));
    put(&d, &mut m, 8 * BS + 100, &pattern(tag + 4, 50)); // copy-up over layer 1's 8
    seal(&dir, d);
    let d = open_rw(&dir);
    put(&d, &mut m, 14 * BS + 7, &pattern(tag + 5, 300)); // and something in the top
    d.flush().unwrap();
    assert!(read_all(&d) == m);
    let layers = d.manifest().layers.clone();
    assert_eq!(layers.len(), 3);
    drop(d);
    Fixture { _tmp: tmp, root, dir, model: m, layers }
}

impl Fixture {
    fn layer_path(&self, i: usize) -> PathBuf {
        self.root.join("layers/blobs/sha256").join(self.layers[i].hex())
    }
    fn set_layers(&self, layers: &[Digest]) {
        let mut m = mcow_engine::disk::read_manifest(&self.dir).unwrap();
        m.layers = layers.to_vec();
        fs::write(self.dir.join("disk.json"), m.to_json()).unwrap();
    }
}

fn xor_byte(path: &Path, off: u64, mask: u8) {
    let f = fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, off).unwrap();
    b[0] ^= mask;
    f.write_all_at(&b, off).unwrap();
}

/// Asserts that opening fails with an error whose message contains every one of `needles`.
fn open_fails(dir: &Path, needles: &[&str]) -> Error {
    let e = match Disk::open(dir, OpenOptions::default()) {
        Ok(_) => panic!("open succeeded, expected an error mentioning {needles:?}"),
        Err(e) => e,
    };
    let msg = e.to_string();
    for n in needles {
        assert!(msg.contains(n), "error {msg:?} does not mention {n:?}");
    }
    e
}

/// Asserts that `ops::check` reports an error containing `needle`.
fn check_reports(dir: &Path, needle: &str) {
    let r = ops::check(dir, false, &mut |_, _| {}).unwrap();
    assert!(r.errors.iter().any(|e| e.contains(needle)), "check missed {needle:?}: {r:?}");
}

#[test]
fn every_flipped_byte_in_a_sealed_layer_is_detected() {
    let fx = fixture(10);
    let mut rng = Rng::new(5);
    let (mut at_open, mut at_read, mut hidden) = (0, 0, 0);
    for (i, digest) in fx.layers.clone().iter().enumerate() {
        let path = fx.layer_path(i);
        let len = fs::metadata(&path).unwrap().len();
        let mut tb = vec![0u8; TRAILER_SIZE];
        fs::File::open(&path).unwrap().read_exact_at(&mut tb, len - TRAILER_SIZE as u64).unwrap();
        let trailer = Trailer::decode(&tb).unwrap();
        let index_at = trailer.index_offset(BS as u32);
        // Every checked header byte, samples of the padding, samples of each data block, and all
        // of index, hash table and trailer.
        let mut offsets: Vec<u64> = (0..100).collect();
        offsets.extend((0..24).map(|_| rng.range(100, HEADER_SIZE as u64 - 1)));
        for pb in 0..trailer.block_count {
            offsets.extend((0..6).map(|_| HEADER_SIZE as u64 + pb * BS + rng.below(BS)));
        }
        offsets.extend(index_at..len);
        for off in offsets {
            let mask = rng.range(1, 255) as u8;
            xor_byte(&path, off, mask);
            let err = match Disk::open(&fx.dir, OpenOptions::default()) {
                Err(e) => {
                    at_open += 1;
                    Some(e)
                }
                Ok(d) => {
                    let mut buf = vec![0u8; SIZE as usize];
                    match d.read(0, &mut buf) {
                        Err(e) => {
                            at_read += 1;
                            Some(e)
                        }
                        Ok(()) => {
                            assert!(buf == fx.model, "layer {i} byte {off}: a flip changed the data read");
                            // Only a block no read reaches may go unnoticed until `check`.
                            assert!(
                                off >= HEADER_SIZE as u64 && off < index_at,
                                "layer {i} byte {off} unnoticed"
                            );
                            let pb = (off - HEADER_SIZE as u64) / BS;
                            let visible = (0..SIZE / BS).any(|vb| {
                                matches!(d.resolve(vb, vb + 1).0, Some(l) if l.layer == i as u32
                                    && l.kind == ExtentKind::Data && l.pblock == pb)
                            });
                            assert!(!visible, "layer {i} byte {off}: flip in visible block {pb} unnoticed");
                            hidden += 1;
                            None
                        }
                    }
                }
            };
            if let Some(e) = err {
                assert!(e.is_corruption(), "layer {i} byte {off}: {e} is not a corruption error");
                assert!(
                    e.to_string().contains(&digest.hex()),
                    "layer {i} byte {off}: {e} does not name the file"
                );
            }
            check_reports(&fx.dir, &digest.hex());
            xor_byte(&path, off, mask);
        }
    }
    eprintln!("flips caught at open: {at_open}, at read: {at_read}, in hidden blocks (check only): {hidden}");
    assert!(at_open > 500 && at_read > 20 && hidden > 5);
    // Restored, everything is clean again.
    assert!(read_all(&open_rw(&fx.dir)) == fx.model);
    common::assert_check_clean(&fx.dir);
}

#[test]
fn truncated_layer_is_refused() {
    let fx = fixture(20);
    let path = fx.layer_path(1);
    let full = fs::read(&path).unwrap();
    for keep in [full.len() - 1, full.len() - TRAILER_SIZE, HEADER_SIZE + 10, 100, 0] {
        fs::write(&path, &full[..keep]).unwrap();
        let e = open_fails(&fx.dir, &[&fx.layers[1].hex()]);
        assert!(e.is_corruption(), "{e}");
        check_reports(&fx.dir, &fx.layers[1].hex());
    }
    fs::write(&path, &full).unwrap();
    assert!(read_all(&open_rw(&fx.dir)) == fx.model);
}

#[test]
fn layers_in_the_wrong_order_or_from_another_stack_are_refused() {
    let fx = fixture(30);
    let l = fx.layers.clone();
    fx.set_layers(&[l[0], l[2], l[1]]);
    let e = open_fails(&fx.dir, &[&l[2].hex(), "layer was made on stack"]);
    assert!(matches!(e, Error::WrongParent { .. }), "{e:?}");
    check_reports(&fx.dir, "layer was made on stack");

    // A layer of another stack, made in the same store.
    let other = create_disk(&fx.root, "other", SIZE, BS as u32);
    let d = open_rw(&other);
    d.write(0, &pattern(99, 5000)).unwrap();
    seal(&other, d);
    let d = open_rw(&other);
    d.write(3 * BS, &pattern(98, 5000)).unwrap();
    seal(&other, d);
    let ol = mcow_engine::disk::read_manifest(&other).unwrap().layers;
    fx.set_layers(&[l[0], ol[1], l[2]]);
    let e = open_fails(&fx.dir, &[&ol[1].hex(), "layer was made on stack"]);
    assert!(matches!(e, Error::WrongParent { .. }), "{e:?}");
    check_reports(&fx.dir, &ol[1].hex());

    // The top was made on the three layers; a manifest that drops one is refused too.
    fx.set_layers(&[l[0], l[1]]);
    let e = open_fails(&fx.dir, &["top-4.mcow"]);
    assert!(matches!(e, Error::WrongParent { .. }), "{e:?}");

    fx.set_layers(&l);
    assert!(read_all(&open_rw(&fx.dir)) == fx.model);
}

#[test]
fn layer_of_another_size_is_refused() {
    let fx = fixture(40);
    let other = create_disk(&fx.root, "big", 2 * SIZE, BS as u32);
    let d = open_rw(&other);
    d.write(0, &[7; 100]).unwrap();
    seal(&other, d);
    let big = mcow_engine::disk::read_manifest(&other).unwrap().layers[0];
    fx.set_layers(&[big]);
    let e = open_fails(&fx.dir, &[&big.hex(), "virtual size"]);
    assert!(matches!(e, Error::Mismatch { .. }), "{e:?}");
    check_reports(&fx.dir, &big.hex());
}

#[test]
fn wrong_version_header_is_refused() {
    let fx = fixture(50);
    let path = fx.layer_path(0);
    xor_byte(&path, 8, 2 ^ 3); // version 2 -> 3
    let e = open_fails(&fx.dir, &[&fx.layers[0].hex(), "unsupported format version 3"]);
    assert!(e.is_corruption());
    check_reports(&fx.dir, "unsupported format version 3");
}

#[test]
fn manifest_naming_a_missing_layer_is_refused() {
    let fx = fixture(60);
    let missing = Digest::of(b"no such layer");
    let mut l = fx.layers.clone();
    l.insert(1, missing);
    fx.set_layers(&l);
    open_fails(&fx.dir, &[&missing.to_string(), "not in the store"]);
    check_reports(&fx.dir, "not in the store");
    fs::remove_file(fx.layer_path(2)).unwrap();
    fx.set_layers(&fx.layers);
    open_fails(&fx.dir, &[&fx.layers[2].to_string(), "not in the store"]);
}

#[test]
fn journal_of_another_top_is_refused() {
    let fx = fixture(70);
    let other = fixture(71);
    let top = |f: &Fixture| {
        let m = mcow_engine::disk::read_manifest(&f.dir).unwrap();
        f.dir.join(m.top.unwrap())
    };
    let journal = |p: &Path| PathBuf::from(format!("{}.journal", p.display()));
    fs::copy(journal(&top(&other)), journal(&top(&fx))).unwrap();
    open_fails(&fx.dir, &["journal", "belongs to another top layer"]);
    check_reports(&fx.dir, "belongs to another top layer");
    // A damaged top header is refused as well, naming the top.
    let fx2 = fixture(72);
    let t = top(&fx2);
    xor_byte(&t, 50, 0x10);
    let e = open_fails(&fx2.dir, &[&t.display().to_string(), "checksum mismatch in layer header"]);
    assert!(e.is_corruption());
}

/// A top on simulated storage with one crafted batch (good checksum) appended to its journal.
fn top_with_crafted_batch(entries: Vec<IndexEntry>) -> mcow_engine::Result<TopLayer> {
    let (data, journal) = (SimStorage::new(), SimStorage::new());
    let path = Path::new("/sim/top-1.mcow");
    let top =
        TopLayer::create(Box::new(data.clone()), Box::new(journal.clone()), path, 4096, SIZE, Digest::ZERO)
            .unwrap();
    let below = |_: u64, b: &mut [u8]| {
        b.fill(0);
        Ok(())
    };
    top.write(0, 0, &[1; 4096], &below).unwrap();
    top.flush().unwrap();
    drop(top);
    let at = journal.len().unwrap();
    assert!(at > JOURNAL_HEADER_SIZE as u64);
    journal.write_at(&encode_batch(&JournalBatch { sequence: 2, entries }), at).unwrap();
    journal.sync().unwrap();
    TopLayer::open(Box::new(data), Box::new(journal), path, false)
}

#[test]
fn journal_entries_outside_the_layer_are_corruption_not_a_panic() {
    let bad = |vblock, count, kind, pblock| vec![IndexEntry { vblock, count, kind, pblock }];
    for (entries, needle) in [
        (bad(u64::MAX - 1, 4, ExtentKind::Zero, 0), "outside the layer"), // vblock + count overflows
        (bad(10, 100, ExtentKind::Discarded, 0), "outside the layer"),    // past the virtual size
        (bad(3, 2, ExtentKind::Data, u64::MAX - 1), "outside the layer"), // pblock + count overflows
        (bad(3, 2, ExtentKind::Data, 5), "past the"),                     // past the data file
    ] {
        let e = match top_with_crafted_batch(entries.clone()) {
            Ok(_) => panic!("{entries:?} was accepted"),
            Err(e) => e,
        };
        assert!(e.is_corruption(), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("top-1.mcow.journal") && msg.contains(needle), "{entries:?}: {msg}");
    }
    // A well-formed batch is accepted: the harness itself is sound.
    let t = top_with_crafted_batch(bad(3, 2, ExtentKind::Zero, 0)).unwrap();
    assert!(matches!(t.lookup(4), Ok(e) if e.loc.kind == ExtentKind::Zero));
}
