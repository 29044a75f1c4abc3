//! Helpers shared by the engine's integration tests: a tiny deterministic PRNG, disk creation and
//! whole-disk reads (and, in submodules, a simulated top and a block source on a store).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use mcow_engine::{CreateOptions, Disk, OpenOptions, ops};

pub mod simtop;
pub mod source;

/// SplitMix64: small, deterministic, good enough to drive workloads.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    pub fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// A recognisable, never-all-zero pattern for (`tag`, byte index): tests can tell which write
/// a byte came from.
pub fn pattern(tag: u64, len: usize) -> Vec<u8> {
    let mut r = Rng::new(tag.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x5151);
    let mut v = r.bytes(len);
    if let Some(b) = v.first_mut() {
        *b |= 1;
    }
    v
}

/// Creates an empty disk `<root>/<name>` using the store `<root>/layers`.
pub fn create_disk(root: &Path, name: &str, size: u64, bs: u32) -> PathBuf {
    let dir = root.join(name);
    Disk::create(
        &dir,
        &CreateOptions { virtual_size: size, block_size: bs, store: root.join("layers"), layers: vec![] },
    )
    .unwrap();
    dir
}

pub fn open_rw(dir: &Path) -> Disk {
    Disk::open(dir, OpenOptions::default()).unwrap()
}

pub fn read_all(d: &Disk) -> Vec<u8> {
    let mut b = vec![0u8; d.size() as usize];
    d.read(0, &mut b).unwrap();
    b
}

pub fn no_progress() -> impl FnMut(u64, u64) {
    |_, _| {}
}

/// `ops::check` must find no errors and no debris (a clean close or a writable reopen leaves
/// none).
pub fn assert_check_clean(dir: &Path) {
    let report = ops::check(dir, false, &mut |_, _| {}).unwrap();
    assert!(report.errors.is_empty() && report.debris.is_empty(), "check is not clean: {report:?}");
}

/// The first index where two buffers differ, for readable assertion messages.
pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y).or((a.len() != b.len()).then_some(a.len().min(b.len())))
}
