//! Snapshots of a disk in use (FORMAT.md, "Snapshots of a running disk"): the top is frozen and
//! a new one started at once, the frozen top is sealed later while the disk is read and
//! written, and every state in between opens again after a close or a crash.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{assert_check_clean, create_disk, first_diff, open_rw, pattern, read_all};
use mcow_engine::{Disk, OpenOptions, ops};

const BS: u32 = 4096;
const BSU: usize = BS as usize;
const BLOCKS: u64 = 128;

/// A disk on one sealed layer of pattern data, and that content.
fn disk_on_base(root: &std::path::Path, name: &str) -> (std::path::PathBuf, Vec<u8>) {
    let dir = create_disk(root, name, BLOCKS * u64::from(BS), BS);
    let base = pattern(7, (BLOCKS * u64::from(BS)) as usize);
    let d = open_rw(&dir);
    d.write(0, &base).unwrap();
    drop(d);
    ops::seal(&dir, &mut |_, _| {}).unwrap();
    (dir, base)
}

fn write(d: &Disk, model: &mut [u8], off: usize, data: &[u8]) {
    d.write(off as u64, data).unwrap();
    model[off..off + data.len()].copy_from_slice(data);
}

fn assert_reads(d: &Disk, model: &[u8], what: &str) {
    let got = read_all(d);
    assert!(got == model, "{what}: content differs at byte {:?}", first_diff(&got, model));
}

/// Tried: writes, a snapshot, more writes (partly over blocks the frozen top holds, so they
/// copy up from it; a discard over a frozen block), then the frozen top sealed while the disk
/// is open. Must hold: the disk reads the same before and after each step; the sealed layer
/// holds exactly the blocks written before the snapshot and is byte for byte the layer `seal`
/// makes of the same history offline; the top keeps only what came after; after a reopen the
/// disk reads the same, `check` is clean, and a later seal works on top of it.
#[test]
fn a_snapshot_freezes_the_top_and_its_seal_is_the_layer_seal_would_make() {
    let root = tempfile::tempdir().unwrap();
    let (dir, mut model) = disk_on_base(root.path(), "live");
    let (offline, _) = disk_on_base(root.path(), "offline");
    let before: Vec<(usize, Vec<u8>)> = vec![(0, pattern(1, 3 * BSU)), (10 * BSU + 5, pattern(2, 700))];
    let d = open_rw(&dir);
    let o = open_rw(&offline);
    let mut offline_model = model.clone();
    for (off, data) in &before {
        write(&d, &mut model, *off, data);
        write(&o, &mut offline_model, *off, data);
    }
    drop(o);
    let depth = d.stack().depth();
    let snap = d.snapshot().unwrap();
    assert_eq!((d.frozen_tops(), d.stack().depth()), (1, depth));
    assert_reads(&d, &model, "right after the snapshot");
    assert_eq!(d.top().stored_blocks(), 0, "the new top starts empty");
    // After the snapshot: into a frozen block (copy-up from the frozen top), new blocks, and
    // a discard of a block the frozen top holds.
    write(&d, &mut model, 10 * BSU + 1000, &pattern(3, 100));
    write(&d, &mut model, 50 * BSU, &pattern(4, 2 * BSU));
    d.discard(u64::from(BS), u64::from(BS)).unwrap();
    model[BSU..2 * BSU].fill(0);
    assert_reads(&d, &model, "writes over the frozen top");
    let digest = d.seal_frozen(&mut |_, _| {}).unwrap().expect("a frozen top to seal");
    assert_eq!(d.seal_frozen(&mut |_, _| {}).unwrap(), None, "nothing left to seal");
    assert_eq!((d.frozen_tops(), d.stack().depth()), (0, depth + 1));
    assert_eq!(d.manifest().layers.last(), Some(&digest));
    assert!(!dir.join(&snap.frozen).exists(), "the frozen top's files are removed");
    assert_reads(&d, &model, "after the frozen top was sealed");
    assert_eq!(d.top().stored_blocks(), 3, "the top keeps what came after the snapshot");
    let offline_digest = ops::seal(&offline, &mut |_, _| {}).unwrap();
    assert_eq!(digest, offline_digest, "the same layer as an offline seal of the same writes");
    drop(d);
    let d = open_rw(&dir);
    assert_reads(&d, &model, "after a reopen");
    assert!(d.manifest().top_base.is_some(), "the top's parent names the frozen top");
    drop(d);
    assert_check_clean(&dir);
    ops::seal(&dir, &mut |_, _| {}).unwrap();
    let d = open_rw(&dir);
    assert!(d.manifest().top_base.is_none(), "a seal writes a top on the real chain");
    assert_eq!(d.stack().depth(), depth + 2);
    assert_reads(&d, &model, "after sealing the top too");
    drop(d);
    assert_check_clean(&dir);
}

/// Tried: two snapshots in a row, writes after each, then the disk closed (as a crash after the
/// last flush would leave it) before anything was sealed; then a read-only open, a writable
/// open, and `seal`. Must hold: every open reads the same content with both tops frozen; a
/// snapshot of a read-only disk is refused; `seal` first seals the frozen tops, oldest first,
/// then the top (three new layers), and `check` is clean.
#[test]
fn frozen_tops_survive_a_close_and_seal_first() {
    let root = tempfile::tempdir().unwrap();
    let (dir, mut model) = disk_on_base(root.path(), "d");
    let d = open_rw(&dir);
    let depth = d.stack().depth();
    write(&d, &mut model, 3 * BSU, &pattern(1, BSU));
    d.snapshot().unwrap();
    write(&d, &mut model, 3 * BSU + 10, &pattern(2, 10));
    write(&d, &mut model, 9 * BSU, &pattern(3, 2 * BSU));
    d.snapshot().unwrap();
    write(&d, &mut model, 9 * BSU + 100, &pattern(4, 3 * BSU));
    assert_eq!(d.frozen_tops(), 2);
    d.flush().unwrap();
    drop(d);
    let ro = Disk::open(&dir, OpenOptions { read_only: true, ..OpenOptions::default() }).unwrap();
    assert_eq!(ro.frozen_tops(), 2);
    assert_reads(&ro, &model, "read-only open with two frozen tops");
    assert!(matches!(ro.snapshot(), Err(mcow_engine::Error::ReadOnly)));
    drop(ro);
    let d = open_rw(&dir);
    assert_reads(&d, &model, "writable reopen with two frozen tops");
    drop(d);
    ops::seal(&dir, &mut |_, _| {}).unwrap();
    let d = open_rw(&dir);
    assert_eq!((d.frozen_tops(), d.stack().depth()), (0, depth + 3));
    assert_reads(&d, &model, "after seal");
    drop(d);
    assert_check_clean(&dir);
}

/// Tried: four threads writing their own regions without pause (each write checked by a read
/// back), while the main thread takes eight snapshots and seals each frozen top as the writes
/// go on. Must hold: no write fails or reads back wrong; at the end, and after a reopen, the
/// disk holds exactly every write; `check` is clean.
#[test]
fn snapshots_and_seals_while_writes_go_on_lose_nothing() {
    let root = tempfile::tempdir().unwrap();
    let (dir, base) = disk_on_base(root.path(), "d");
    let disk = Arc::new(open_rw(&dir));
    let stop = Arc::new(AtomicBool::new(false));
    let region = (BLOCKS as usize / 4) * BSU;
    let mut writers = Vec::new();
    for t in 0..4usize {
        let (disk, stop) = (disk.clone(), stop.clone());
        writers.push(std::thread::spawn(move || {
            let mut rng = common::Rng::new(t as u64);
            let mut last: Vec<(usize, Vec<u8>)> = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) || i < 50 {
                let len = rng.range(1, 3 * BSU as u64) as usize;
                let off = t * region + rng.below((region - len) as u64) as usize;
                let data = pattern(t as u64 * 1_000_000 + i, len);
                disk.write(off as u64, &data).unwrap();
                let mut back = vec![0u8; len];
                disk.read(off as u64, &mut back).unwrap();
                assert!(back == data, "thread {t} write {i} does not read back");
                last.push((off, data));
                i += 1;
            }
            last
        }));
    }
    for _ in 0..8 {
        std::thread::sleep(std::time::Duration::from_millis(20));
        disk.snapshot().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(10));
        disk.seal_frozen(&mut |_, _| {}).unwrap().expect("a frozen top");
    }
    stop.store(true, Ordering::Relaxed);
    let mut model = base;
    for w in writers {
        for (off, data) in w.join().unwrap() {
            model[off..off + data.len()].copy_from_slice(&data);
        }
    }
    assert_reads(&disk, &model, "after eight snapshots under writes");
    assert_eq!(disk.frozen_tops(), 0);
    disk.flush().unwrap();
    drop(disk);
    let d = open_rw(&dir);
    assert_reads(&d, &model, "after a reopen");
    drop(d);
    assert_check_clean(&dir);
}
