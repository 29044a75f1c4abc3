//! Memory follows data, not virtual size (regression: an empty 256 TiB disk took 545 MB to
//! open, and an 8 PiB one, which `create` accepts, aborted on a 16 GiB allocation).
//!
//! Each test opens huge, nearly empty disks in this process and measures the growth of its
//! resident set (VmRSS) across the open: the per-block flags and the per-block table must cost
//! memory only where blocks are mapped. Kept in a test binary of its own so that no other test
//! allocates in the same process meanwhile.

mod common;

use common::*;
use mcow_engine::{Disk, OpenOptions, ops};

const TIB: u64 = 1 << 40;

/// The tests of this file measure one process's resident set: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb * 1024
}

/// Opens `dir` (writable), returning the disk and how much the resident set grew.
fn open_measured(dir: &std::path::Path) -> (Disk, u64) {
    let before = rss_bytes();
    let disk = Disk::open(dir, OpenOptions::default()).unwrap();
    (disk, rss_bytes().saturating_sub(before))
}

/// Tried: an empty 256 TiB disk of 64 KiB blocks (2^32 blocks), opened, its last block read,
/// written and flushed, then sealed under a new top and opened again. Must hold: each open
/// grows the resident set by less than 8 MiB, and the last block reads back.
#[test]
fn a_huge_empty_disk_opens_in_a_few_megabytes() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let t = tempfile::tempdir().unwrap();
    let dir = create_disk(t.path(), "d", 256 * TIB, 65536);
    let (disk, grew) = open_measured(&dir);
    eprintln!("empty 256 TiB disk: open grew the process by {grew} bytes");
    assert!(grew < 8 << 20, "opening an empty 256 TiB disk took {grew} bytes");
    let last = disk.size() - 65536;
    let mut buf = vec![1u8; 65536];
    disk.read(last, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    disk.write(last, &pattern(5, 65536)).unwrap();
    disk.flush().unwrap();
    drop(disk);
    ops::merge(&dir, 0, &mut |_, _| {}).unwrap();
    let (disk, grew) = open_measured(&dir);
    assert!(grew < 8 << 20, "opening a 256 TiB disk with one sealed block took {grew} bytes");
    disk.read(last, &mut buf).unwrap();
    assert!(buf == pattern(5, 65536), "the sealed last block reads back");
    assert_eq!(disk.stack().layers().len(), 1);
}

/// Tried: the largest disk `create` accepts (2^53 bytes), with 64 KiB blocks and with 4 KiB
/// blocks (2^41 blocks, the most any geometry has). Must hold: it opens (no abort), its last
/// block can be written and read, and the open stays within 64 MiB.
#[test]
fn the_largest_disk_create_accepts_opens() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let t = tempfile::tempdir().unwrap();
    for bs in [65536u32, 4096] {
        let dir = create_disk(t.path(), &format!("d{bs}"), 1 << 53, bs);
        let (disk, grew) = open_measured(&dir);
        eprintln!("8 PiB disk of {bs}-byte blocks: open grew the process by {grew} bytes");
        assert!(grew < 64 << 20, "opening an empty 8 PiB disk of {bs}-byte blocks took {grew} bytes");
        let last = disk.size() - u64::from(bs);
        disk.write(last, &pattern(9, bs as usize)).unwrap();
        let mut buf = vec![0u8; bs as usize];
        disk.read(last, &mut buf).unwrap();
        assert!(buf == pattern(9, bs as usize));
        disk.flush().unwrap();
    }
}
