//! The writable top's write path under concurrency: writes that span blocks, share partly
//! written blocks with other writes, and copy up from below without holding up the others.

mod common;

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use common::{Rng, assert_check_clean, create_disk, first_diff, open_rw, pattern, read_all};
use mcow_engine::{Disk, ops};

const BS: u32 = 4096;
const BSU: usize = BS as usize;

/// A disk of `blocks` blocks on one sealed layer of pattern data (so every partly written
/// block is a copy-up of something that is not zero), and that content.
fn disk_on_base(root: &std::path::Path, blocks: u64) -> (std::path::PathBuf, Vec<u8>) {
    let dir = create_disk(root, "d", blocks * u64::from(BS), BS);
    let base = pattern(7, (blocks * u64::from(BS)) as usize);
    let d = open_rw(&dir);
    d.write(0, &base).unwrap();
    d.flush().unwrap();
    drop(d);
    ops::merge(&dir, 0, &mut |_, _| {}).unwrap();
    (dir, base)
}

/// Tried: 4 threads write disjoint byte ranges (1 byte to 5 blocks long, unaligned) that cut
/// blocks between them, so several writes copy up and fill the same new block at once, in
/// random order. Must hold: every write lands (the disk reads as the base with all of them
/// laid over it, also after a reopen), `check` is clean, and the top stores exactly the blocks
/// written, its data file no longer than that: no block allocated twice or leaked.
#[test]
fn concurrent_writes_sharing_blocks_all_land() {
    let root = tempfile::tempdir().unwrap();
    let blocks = 256u64;
    let (dir, mut model) = disk_on_base(root.path(), blocks);
    // Cut the first 200 blocks into ranges, and deal them out to threads.
    let mut rng = Rng::new(11);
    let mut ranges = Vec::new();
    let mut at = 0u64;
    let end = 200 * u64::from(BS);
    while at < end {
        let len = match rng.below(4) {
            0 => rng.range(1, 64),
            1 => rng.range(1, u64::from(BS)),
            _ => rng.range(u64::from(BS), 5 * u64::from(BS)),
        }
        .min(end - at);
        ranges.push((at, len));
        at += len;
    }
    let disk = Arc::new(open_rw(&dir));
    let threads = 4;
    let mut handles = Vec::new();
    for t in 0..threads {
        let mut mine: Vec<(u64, u64)> = ranges.iter().copied().skip(t).step_by(threads).collect();
        let mut rng = Rng::new(100 + t as u64);
        for i in (1..mine.len()).rev() {
            mine.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let disk = disk.clone();
        handles.push(std::thread::spawn(move || {
            for (off, len) in mine {
                disk.write(off, &pattern(off, len as usize)).unwrap();
            }
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
    for &(off, len) in &ranges {
        model[off as usize..(off + len) as usize].copy_from_slice(&pattern(off, len as usize));
    }
    let got = read_all(&disk);
    assert!(got == model, "content differs at byte {:?}", first_diff(&got, &model));
    assert_eq!(disk.top().stored_blocks(), 200, "the top stores each written block once");
    let (data_len, _) = disk.top().file_sizes();
    let header = mcow_format::HEADER_SIZE as u64;
    assert_eq!(data_len, header + 200 * u64::from(BS), "no block was allocated and left unused");
    disk.flush().unwrap();
    drop(disk);
    let again = open_rw(&dir);
    let got = read_all(&again);
    assert!(got == model, "after a reopen, content differs at byte {:?}", first_diff(&got, &model));
    drop(again);
    assert_check_clean(&dir);
}

/// Tried: a write to part of a new block whose copy-up (the read of what lies below) is held
/// up, as a fetch from a slow origin would be; meanwhile a write of another block, and a second
/// write to another part of the same block. Must hold: the other block's write completes while
/// the copy-up is still held up (the allocator is not locked across it); the second write to
/// the same block waits for the first (it must not copy up on its own and lose the first's
/// bytes), and once released both writes read back, over what lies below.
#[test]
fn a_slow_copy_up_holds_up_only_its_own_block() {
    let root = tempfile::tempdir().unwrap();
    let (dir, base) = disk_on_base(root.path(), 16);
    let disk = Arc::new(open_rw(&dir));
    let below_of = |d: &Disk| {
        let stack = d.stack().clone();
        move |vb: u64, buf: &mut [u8]| stack.read_block(vb, 0, buf)
    };
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let slow = {
        let disk = disk.clone();
        std::thread::spawn(move || {
            let below = below_of(&disk);
            let slow_below = move |vb: u64, buf: &mut [u8]| {
                entered_tx.send(()).unwrap();
                release_rx.recv().unwrap();
                below(vb, buf)
            };
            disk.top().write(3, 100, &[0xA1; 10], &slow_below).unwrap();
        })
    };
    entered_rx.recv_timeout(Duration::from_secs(10)).expect("the copy-up started");
    // Another block, whole and partly written: neither waits for the held-up copy-up.
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let other = {
        let disk = disk.clone();
        std::thread::spawn(move || {
            let below = below_of(&disk);
            disk.top().write(5, 0, &[0xB2; BSU], &below).unwrap();
            disk.top().write(7, 10, &[0xB3; 20], &below).unwrap();
            done_tx.send(()).unwrap();
        })
    };
    done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("writes to other blocks completed during the copy-up");
    // The same block: must wait.
    let (same_tx, same_rx) = mpsc::channel::<()>();
    let same = {
        let disk = disk.clone();
        std::thread::spawn(move || {
            let below = below_of(&disk);
            disk.top().write(3, 200, &[0xC4; 10], &below).unwrap();
            same_tx.send(()).unwrap();
        })
    };
    assert!(
        same_rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "a second write to a block being filled must wait for the first"
    );
    release_tx.send(()).unwrap();
    slow.join().unwrap();
    same_rx.recv_timeout(Duration::from_secs(10)).expect("the second write completed after the first");
    same.join().unwrap();
    other.join().unwrap();
    let mut want = base.clone();
    let b = |vb: usize, at: usize| vb * BSU + at;
    want[b(3, 100)..b(3, 110)].fill(0xA1);
    want[b(3, 200)..b(3, 210)].fill(0xC4);
    want[b(5, 0)..b(6, 0)].fill(0xB2);
    want[b(7, 10)..b(7, 30)].fill(0xB3);
    let got = read_all(&disk);
    assert!(got == want, "content differs at byte {:?}", first_diff(&got, &want));
    assert_eq!(disk.top().stored_blocks(), 3);
    disk.flush().unwrap();
    drop(disk);
    assert_check_clean(&dir);
}

/// Tried: one write spanning many new blocks with unaligned ends (a copy-up at each end), then
/// the same range rewritten in place, then a discard of its middle and a write over the hole.
/// Must hold: each reads back exactly; the blocks of the first write lie consecutively in the
/// data file (it allocates one run), and the discard's blocks are reused by the later write.
#[test]
fn a_long_write_allocates_one_run_and_rewrites_in_place() {
    let root = tempfile::tempdir().unwrap();
    let (dir, mut model) = disk_on_base(root.path(), 64);
    let disk = open_rw(&dir);
    let (off, len) = (3 * BSU + 123, 20 * BSU + 77);
    let first = pattern(1, len);
    disk.write(off as u64, &first).unwrap();
    model[off..off + len].copy_from_slice(&first);
    let extents = disk.top().extents();
    assert_eq!(extents.len(), 1, "one run of consecutive physical blocks: {extents:?}");
    assert_eq!((extents[0].start, extents[0].end), (3, 24));
    let second = pattern(2, len);
    disk.write(off as u64, &second).unwrap();
    model[off..off + len].copy_from_slice(&second);
    assert_eq!(disk.top().extents(), extents, "a rewrite goes in place");
    assert!(read_all(&disk) == model);
    disk.discard(8 * BS as u64, 8 * BS as u64).unwrap();
    model[8 * BSU..16 * BSU].fill(0);
    disk.flush().unwrap(); // the freed blocks become reusable once their batch is durable
    let third = pattern(3, 8 * BSU);
    disk.write(40 * BS as u64, &third).unwrap();
    model[40 * BSU..48 * BSU].copy_from_slice(&third);
    let got = read_all(&disk);
    assert!(got == model, "content differs at byte {:?}", first_diff(&got, &model));
    let (data_len, _) = disk.top().file_sizes();
    assert_eq!(
        data_len,
        mcow_format::HEADER_SIZE as u64 + 21 * u64::from(BS),
        "the write over new blocks reused the discarded ones"
    );
    disk.flush().unwrap();
    drop(disk);
    assert_check_clean(&dir);
}
