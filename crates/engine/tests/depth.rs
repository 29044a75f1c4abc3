//! A 4,096-deep stack.
//!
//! Layer i (bottom first) stores block i; every seventh layer also puts a zero marker over the
//! block just below it (hiding layer i-1's block). The layers are written directly with
//! `LayerWriter` into the store, parents chained with `stack::next_chain`, and a disk is created
//! on the digest list. The test asserts:
//! - the disk opens with all 4,096 layers, `resolve` names the right layer for sampled blocks,
//!   and reads return that layer's data (or zeros where a marker hides it);
//! - writes to the top, a flush and a seal on top of the deep stack work and read back;
//! - in a child process whose open-file limit is 1,024 (soft and hard), the disk opens and every
//!   block, hence every visible layer's block, reads back right: the layer file pool stays
//!   within the limit. A second disk on the same stack opened beside the first (two exports of
//!   one base, say) reads right too: the pool's budget is per process, not per open disk
//!   (regression: each `LayerStore` had its own pool, each allowed the whole limit, and the
//!   second open failed with "Too many open files").

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::{Rng, pattern};
use mcow_engine::layer::LayerWriter;
use mcow_engine::stack::next_chain;
use mcow_engine::store::LayerStore;
use mcow_engine::{CreateOptions, Digest, Disk, OpenOptions, ops};
use mcow_format::ExtentKind;

const DEPTH: u64 = 4096;
const BS: u32 = 4096;
const SIZE: u64 = DEPTH * BS as u64;
const ENV: &str = "MCOW_DEPTH_CHILD_DISK";

fn hides_block_below(layer: u64) -> bool {
    layer % 7 == 3
}

/// What block `b` reads as on the sealed stack.
fn expected(b: u64) -> Vec<u8> {
    if b + 1 < DEPTH && hides_block_below(b + 1) { vec![0; BS as usize] } else { pattern(b, BS as usize) }
}

/// The layer `resolve` must name for block `b`.
fn owner(b: u64) -> u64 {
    if b + 1 < DEPTH && hides_block_below(b + 1) { b + 1 } else { b }
}

fn build_stack(root: &Path) -> Vec<Digest> {
    let store = LayerStore::new(root.join("layers"));
    fs::create_dir_all(root.join("layers/blobs/sha256")).unwrap();
    let mut chain = Digest::ZERO;
    let mut digests = Vec::with_capacity(DEPTH as usize);
    for i in 0..DEPTH {
        let mut w = LayerWriter::new(Vec::new(), BS, SIZE, chain).unwrap();
        if i > 0 && hides_block_below(i) {
            w.push_marker(i - 1, 1, ExtentKind::Zero).unwrap();
        }
        w.push_block(i, &pattern(i, BS as usize)).unwrap();
        let (bytes, digest, len) = w.finish().unwrap();
        assert_eq!(len, bytes.len() as u64);
        fs::write(store.layer_path(&digest), bytes).unwrap();
        chain = next_chain(&chain, &digest);
        digests.push(digest);
    }
    assert_eq!(chain, mcow_format::chain_digest(&digests));
    digests
}

fn read_block(d: &Disk, b: u64) -> Vec<u8> {
    let mut buf = vec![0u8; BS as usize];
    d.read(b * u64::from(BS), &mut buf).unwrap();
    buf
}

/// Child mode: with a 1,024 open-file limit, open the disk and read every block.
#[test]
fn depth_child_reader() {
    let Ok(dir) = std::env::var(ENV) else { return };
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    assert_eq!((lim.current, lim.maximum), (Some(1024), Some(1024)), "the parent set the limit");
    let t = Instant::now();
    // One engine for both disks below, as a process serving several disks has.
    let engine = mcow_engine::Engine::default();
    let d = Disk::open_in(&engine, Path::new(&dir), OpenOptions { read_only: true, ..Default::default() })
        .unwrap();
    assert_eq!(d.stack().depth(), DEPTH as usize);
    let opened = t.elapsed();
    for b in 0..DEPTH {
        assert!(read_block(&d, b) == expected_with_top(b), "block {b}");
    }
    // And again in reverse, so files closed by the pool are reopened.
    for b in (0..DEPTH).rev().step_by(3) {
        assert!(read_block(&d, b) == expected_with_top(b), "block {b} (second pass)");
    }
    // A second disk open at the same time in the same engine (say, two exports of one base)
    // shares the limit.
    let d2 = Disk::open_in(&engine, Path::new(&dir), OpenOptions { read_only: true, ..Default::default() })
        .unwrap_or_else(|e| panic!("a second open of the deep disk beside the first: {e}"));
    for b in (0..DEPTH).step_by(2) {
        assert!(read_block(&d2, b) == expected_with_top(b), "block {b} (second disk)");
        assert!(read_block(&d, b + 1) == expected_with_top(b + 1), "block {} (first disk)", b + 1);
    }
    println!("CHILD-READ-ALL {DEPTH} opened in {opened:?}");
}

fn top_block() -> Vec<u8> {
    pattern(0x707, BS as usize)
}

/// What block `b` reads as once the parent has written to the top: block 5 whole, 20 bytes
/// of block 9.
fn expected_with_top(b: u64) -> Vec<u8> {
    match b {
        5 => top_block(),
        9 => {
            let mut v = expected(9);
            v[10..30].fill(0xee);
            v
        }
        _ => expected(b),
    }
}

#[test]
fn stack_of_4096_layers_reads_right_and_opens_within_1024_files() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let t = Instant::now();
    let digests = build_stack(root);
    eprintln!("wrote {DEPTH} layers in {:?}", t.elapsed());
    let dir: PathBuf = root.join("deep");
    let t = Instant::now();
    Disk::create(
        &dir,
        &CreateOptions { virtual_size: SIZE, block_size: BS, store: root.join("layers"), layers: digests },
    )
    .unwrap();
    eprintln!("created the disk in {:?}", t.elapsed());

    let t = Instant::now();
    let d = Disk::open(&dir, OpenOptions::default()).unwrap();
    eprintln!("opened {DEPTH} layers in {:?}", t.elapsed());
    assert_eq!(d.stack().depth(), DEPTH as usize);
    let mut rng = Rng::new(4096);
    let mut samples: Vec<u64> = (0..300).map(|_| rng.below(DEPTH)).collect();
    samples.extend([0, 1, 2, 3, DEPTH - 2, DEPTH - 1]);
    for &b in &samples {
        let (loc, _) = d.resolve(b, b + 1);
        let loc = loc.unwrap_or_else(|| panic!("block {b} unmapped"));
        assert_eq!(u64::from(loc.layer), owner(b), "block {b} resolves to the wrong layer");
        assert!(read_block(&d, b) == expected(b), "block {b}");
    }
    // A multi-block read crossing many layers at once.
    let mut buf = vec![0u8; 64 * BS as usize];
    d.read(1000 * u64::from(BS), &mut buf).unwrap();
    for (k, chunk) in buf.chunks(BS as usize).enumerate() {
        assert!(chunk == expected(1000 + k as u64).as_slice(), "block {} in a long read", 1000 + k);
    }
    // Writes go to the top, over the deep stack.
    d.write(5 * u64::from(BS), &top_block()).unwrap();
    d.write(9 * u64::from(BS) + 10, &[0xee; 20]).unwrap(); // copy-up from layer 9
    d.flush().unwrap();
    let want9 = expected_with_top(9);
    assert!(read_block(&d, 9) == want9);
    drop(d);

    // The child: 1,024 open files at most, reads every block.
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -n 1024 && exec "$0" --exact depth_child_reader --nocapture --test-threads=1"#)
        .arg(&exe)
        .env(ENV, &dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("CHILD-READ-ALL 4096"),
        "child failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{}", stdout.lines().find(|l| l.contains("CHILD-READ-ALL")).unwrap_or(""));

    // Seal the top onto the deep stack: 4,097 layers.
    let t = Instant::now();
    ops::merge(&dir, 0, &mut |_, _| {}).unwrap();
    eprintln!("sealed onto {DEPTH} layers in {:?}", t.elapsed());
    let d = Disk::open(&dir, OpenOptions::default()).unwrap();
    assert_eq!(d.stack().depth(), DEPTH as usize + 1);
    assert_eq!(u64::from(d.resolve(9, 10).0.unwrap().layer), DEPTH);
    assert!(
        read_block(&d, 9) == want9 && read_block(&d, 5) == top_block() && read_block(&d, 6) == expected(6)
    );
}
