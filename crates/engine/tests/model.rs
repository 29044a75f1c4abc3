//! The disk API against a flat in-memory model: random sequences of writes (any offset and
//! length), zeroing, discards, flushes, seals, commits, flattens and reopens, on small disks with
//! 4 KiB blocks (including a virtual size that is not a multiple of the block size). After every
//! step the whole disk is read and compared with a `Vec<u8>`, every run `block_status` reports
//! as zero or hole must read as zeros, and at the end `ops::check` must be clean.

mod common;

use std::path::{Path, PathBuf};

use common::{Rng, assert_check_clean, create_disk, first_diff, open_rw, pattern, read_all};
use mcow_engine::{Disk, OpenOptions, RunKind, ops};
use proptest::prelude::*;

const BS: u32 = 4096;
/// Virtual sizes under test: 64 KiB, 100 KiB + 512 (last block partial) and 256 KiB.
const SIZES: [u64; 3] = [64 << 10, (100 << 10) + 512, 256 << 10];

#[derive(Debug, Clone)]
enum Op {
    /// Write `len` bytes of pattern `seed` at `off` (both reduced to fit the disk).
    Write {
        off: u64,
        len: u64,
        shape: Shape,
        seed: u64,
    },
    Zeroes {
        off: u64,
        len: u64,
        shape: Shape,
        may_trim: bool,
    },
    Discard {
        off: u64,
        len: u64,
        shape: Shape,
    },
    Flush,
    /// `ops::merge(dir, 0)`.
    Seal,
    /// `ops::merge(dir, n)`, n clamped to 1..=depth (a seal when the stack is empty).
    Commit {
        n: usize,
    },
    /// `ops::merge(dir, depth)`.
    Flatten,
    /// Flush, close, and open again; `peek_read_only` also opens read-only in between.
    Reopen {
        peek_read_only: bool,
    },
}

/// How an offset/length pair is shaped, to hit sub-block, block-aligned and multi-block cases.
#[derive(Debug, Clone, Copy)]
enum Shape {
    /// Any byte offset, 1..=64 bytes.
    Tiny,
    /// Any byte offset, up to one block.
    SubBlock,
    /// Any byte offset, up to three blocks.
    Multi,
    /// Block-aligned offset and length (1..=4 blocks).
    Aligned,
    /// Offset anywhere, running to the end of the disk.
    ToEnd,
}

fn shape() -> impl Strategy<Value = Shape> {
    prop_oneof![
        Just(Shape::Tiny),
        Just(Shape::SubBlock),
        Just(Shape::Multi),
        Just(Shape::Aligned),
        Just(Shape::ToEnd)
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (any::<u64>(), any::<u64>(), shape(), any::<u64>())
            .prop_map(|(off, len, shape, seed)| Op::Write { off, len, shape, seed }),
        2 => (any::<u64>(), any::<u64>(), shape(), any::<bool>())
            .prop_map(|(off, len, shape, may_trim)| Op::Zeroes { off, len, shape, may_trim }),
        2 => (any::<u64>(), any::<u64>(), shape()).prop_map(|(off, len, shape)| Op::Discard { off, len, shape }),
        2 => Just(Op::Flush),
        5 => Just(Op::Seal),
        1 => (1usize..=8).prop_map(|n| Op::Commit { n }),
        1 => (9usize..=64).prop_map(|n| Op::Commit { n }),
        1 => Just(Op::Flatten),
        1 => any::<bool>().prop_map(|peek_read_only| Op::Reopen { peek_read_only }),
    ]
}

/// Turns raw numbers into a range that fits a disk of `size` bytes.
fn range(off: u64, len: u64, shape: Shape, size: u64) -> (u64, u64) {
    let bs = u64::from(BS);
    let blocks = size.div_ceil(bs);
    match shape {
        Shape::Tiny => {
            let off = off % size;
            (off, (1 + len % 64).min(size - off))
        }
        Shape::SubBlock => {
            let off = off % size;
            (off, (1 + len % bs).min(size - off))
        }
        Shape::Multi => {
            let off = off % size;
            (off, (1 + len % (3 * bs)).min(size - off))
        }
        Shape::Aligned => {
            let off = (off % blocks) * bs;
            (off, ((1 + len % 4) * bs).min(size - off))
        }
        Shape::ToEnd => {
            let off = off % size;
            (off, size - off)
        }
    }
}

/// A disk under test and its model.
struct Harness {
    dir: PathBuf,
    disk: Option<Disk>,
    model: Vec<u8>,
    /// Deepest stack reached.
    max_depth: usize,
}

impl Harness {
    fn new(root: &Path, size: u64) -> Harness {
        let dir = create_disk(root, "d", size, BS);
        let disk = Some(open_rw(&dir));
        Harness { dir, disk, model: vec![0; size as usize], max_depth: 0 }
    }

    fn disk(&self) -> &Disk {
        self.disk.as_ref().expect("disk is open")
    }

    fn depth(&self) -> usize {
        self.disk().stack().depth()
    }

    fn merge(&mut self, n: usize) {
        let before = self.depth();
        // `ops::merge` opens the disk itself. Dropping a `Disk` does not flush (a drop is like a
        // crash for unflushed writes), so flush first, as a front end closing cleanly would.
        self.disk().flush().unwrap();
        self.disk = None;
        ops::merge(&self.dir, n, &mut |_, _| {}).unwrap();
        self.disk = Some(open_rw(&self.dir));
        assert_eq!(self.depth(), before - n + 1, "merge of {n} on a stack of {before}");
        assert_eq!(self.disk().top().stored_blocks(), 0, "a merge leaves an empty top");
        self.max_depth = self.max_depth.max(self.depth());
    }

    fn apply(&mut self, op: &Op) {
        let size = self.model.len() as u64;
        match *op {
            Op::Write { off, len, shape, seed } => {
                let (off, len) = range(off, len, shape, size);
                let data = pattern(seed, len as usize);
                self.disk().write(off, &data).unwrap();
                self.model[off as usize..(off + len) as usize].copy_from_slice(&data);
                let mut back = vec![0u8; len as usize];
                self.disk().read(off, &mut back).unwrap();
                assert!(back == data, "write at {off}+{len} does not read back");
            }
            Op::Zeroes { off, len, shape, may_trim } => {
                let (off, len) = range(off, len, shape, size);
                self.disk().write_zeroes(off, len, may_trim).unwrap();
                self.model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Discard { off, len, shape } => {
                let (off, len) = range(off, len, shape, size);
                self.disk().discard(off, len).unwrap();
                self.model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Flush => self.disk().flush().unwrap(),
            Op::Seal => self.merge(0),
            Op::Commit { n } => {
                let n = n.min(self.depth());
                self.merge(n)
            }
            Op::Flatten => self.merge(self.depth()),
            Op::Reopen { peek_read_only } => {
                self.disk().flush().unwrap();
                self.disk = None;
                if peek_read_only {
                    let ro =
                        Disk::open(&self.dir, OpenOptions { read_only: true, ..Default::default() }).unwrap();
                    assert!(read_all(&ro) == self.model, "read-only reopen differs from the model");
                    assert!(matches!(ro.write(0, &[1]), Err(mcow_engine::Error::ReadOnly)));
                }
                self.disk = Some(open_rw(&self.dir));
                let d = self.disk().debris();
                assert_eq!(d.journal_tail_bytes, 0, "a clean close leaves no journal tail");
            }
        }
    }

    /// Whole-disk read and block-status agree with the model.
    fn verify(&self, step: usize, op: &Op) {
        let got = read_all(self.disk());
        if let Some(at) = first_diff(&got, &self.model) {
            panic!(
                "step {step} ({op:?}): byte {at} (block {}) reads {} but the model has {}",
                at / BS as usize,
                got[at],
                self.model[at]
            );
        }
        let runs = self.disk().block_status(0, self.model.len() as u64).unwrap();
        let mut pos = 0;
        for r in &runs {
            assert_eq!(r.offset, pos, "runs are contiguous");
            pos += r.length;
            if r.kind != RunKind::Data {
                let s = &self.model[r.offset as usize..(r.offset + r.length) as usize];
                assert!(
                    s.iter().all(|&b| b == 0),
                    "step {step}: {r:?} is not data but the model is not zero"
                );
            }
        }
        assert_eq!(pos, self.model.len() as u64, "runs cover the disk");
    }

    fn finish(mut self) {
        self.disk().flush().unwrap();
        self.disk = None;
        let d = open_rw(&self.dir);
        assert!(read_all(&d) == self.model, "final reopen differs from the model");
        drop(d);
        assert_check_clean(&self.dir);
    }
}

fn run(size_idx: usize, ops: &[Op]) -> usize {
    let tmp = tempfile::tempdir().unwrap();
    let mut h = Harness::new(tmp.path(), SIZES[size_idx]);
    for (i, op) in ops.iter().enumerate() {
        h.apply(op);
        h.verify(i, op);
    }
    let depth = h.max_depth;
    h.finish();
    depth
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_ops_match_a_flat_model(size_idx in 0usize..SIZES.len(), ops in prop::collection::vec(op(), 1..120)) {
        run(size_idx, &ops);
    }
}

/// Builds a 64-layer stack by sealing 64 times with random writes, zeroes and discards in
/// between, then commits and flattens it, checking every byte at every step.
#[test]
fn sixty_four_seals_then_commit_and_flatten_match_the_model() {
    for (size_idx, seed) in [(1usize, 7u64), (2, 8)] {
        let mut rng = Rng::new(seed);
        let mut ops = Vec::new();
        for _ in 0..64 {
            for _ in 0..rng.range(1, 4) {
                let (off, len) = (rng.next_u64(), rng.next_u64());
                let shape = [Shape::Tiny, Shape::SubBlock, Shape::Multi, Shape::Aligned, Shape::ToEnd]
                    [rng.below(5) as usize];
                ops.push(match rng.below(6) {
                    0 => Op::Zeroes { off, len, shape, may_trim: rng.chance(2) },
                    1 => Op::Discard { off, len, shape },
                    _ => Op::Write { off, len, shape, seed: rng.next_u64() },
                });
            }
            ops.push(Op::Seal);
        }
        ops.push(Op::Write { off: 0, len: 5000, shape: Shape::Multi, seed: 1 });
        ops.push(Op::Commit { n: 10 });
        ops.push(Op::Reopen { peek_read_only: true });
        ops.push(Op::Commit { n: 1 });
        ops.push(Op::Flatten);
        let depth = run(size_idx, &ops);
        assert!(depth >= 64, "reached depth {depth}");
    }
}
