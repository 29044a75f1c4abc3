//! One atomic bitmap for the engine's per-block flags (verified, visible, seen by a trace).
//!
//! Owns: a fixed number of bits that threads set and test without a lock, bounds-checked, with
//! the memory ordering chosen here once: [`AtomicBitmap::set`] is a Release read-modify-write
//! and [`AtomicBitmap::get`] an Acquire load, so a thread that sees a bit set also sees every
//! write the setting thread made before it set the bit (say, a fetched block's bytes written to
//! its file). Bits are never cleared.
//!
//! Storage is sparse: the bits live in leaves of up to 2^20 bits (128 KiB), each allocated the
//! first time one of its bits is set, so a bitmap over a huge and mostly untouched range (one
//! bit per virtual block of a 256 TiB disk) costs one slot per leaf until it is used. A bitmap
//! of fewer bits than a leaf allocates only the words it needs.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

const LEAF_SHIFT: u32 = 20;
const LEAF_BITS: u64 = 1 << LEAF_SHIFT;

/// A set of `len` bits, all clear at first, that any thread may set and test.
#[derive(Debug, Default)]
pub struct AtomicBitmap {
    len: u64,
    leaves: Box<[OnceLock<Box<[AtomicU64]>>]>,
}

impl AtomicBitmap {
    /// A bitmap of `len` clear bits. Allocates one slot per 2^20 bits, no bits yet.
    pub fn new(len: u64) -> AtomicBitmap {
        let leaves = (0..len.div_ceil(LEAF_BITS)).map(|_| OnceLock::new()).collect();
        AtomicBitmap { len, leaves }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True if the bitmap has no bits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn slot(&self, bit: u64) -> (usize, usize, u64) {
        assert!(bit < self.len, "bit {bit} is outside a bitmap of {} bits", self.len);
        let within = bit & (LEAF_BITS - 1);
        ((bit >> LEAF_SHIFT) as usize, (within / 64) as usize, 1 << (within % 64))
    }

    /// Whether `bit` is set (Acquire). Panics if `bit` is out of range.
    pub fn get(&self, bit: u64) -> bool {
        let (leaf, word, mask) = self.slot(bit);
        self.leaves[leaf].get().is_some_and(|l| l[word].load(Ordering::Acquire) & mask != 0)
    }

    /// Sets `bit` (Release) and returns whether it was set before. Panics if `bit` is out of
    /// range.
    pub fn set(&self, bit: u64) -> bool {
        let (leaf, word, mask) = self.slot(bit);
        let words = self.leaves[leaf].get_or_init(|| {
            let bits = (self.len - ((leaf as u64) << LEAF_SHIFT)).min(LEAF_BITS);
            (0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect()
        });
        words[word].fetch_or(mask, Ordering::Release) & mask != 0
    }

    /// Clears `bit` (sequentially consistent, so that it is ordered with the eviction counter
    /// `cache` bumps around it) and returns whether it was set. Panics if `bit` is out of range.
    pub fn clear(&self, bit: u64) -> bool {
        let (leaf, word, mask) = self.slot(bit);
        self.leaves[leaf].get().is_some_and(|l| l[word].fetch_and(!mask, Ordering::SeqCst) & mask != 0)
    }

    /// Sets every bit of `start..end`.
    pub fn set_range(&self, start: u64, end: u64) {
        (start..end).for_each(|b| {
            self.set(b);
        });
    }

    /// Whether every bit of `start..end` is set (true for an empty range).
    pub fn all_set(&self, start: u64, end: u64) -> bool {
        (start..end).all(|b| self.get(b))
    }

    /// Bytes of bits allocated so far (not counting the leaf slots).
    pub fn memory(&self) -> usize {
        self.leaves.iter().filter_map(|l| l.get()).map(|w| w.len() * 8).sum::<usize>()
            + self.leaves.len() * std::mem::size_of::<OnceLock<Box<[AtomicU64]>>>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_set_stay_set_and_others_stay_clear() {
        let b = AtomicBitmap::new(200);
        assert!(!b.get(0) && !b.get(199));
        assert!(!b.set(63));
        assert!(b.set(63), "set reports a bit already set");
        b.set_range(64, 130);
        assert!(b.get(63) && b.get(64) && b.get(129));
        assert!(!b.get(62) && !b.get(130));
        assert!(b.all_set(63, 130) && !b.all_set(62, 130) && b.all_set(5, 5));
        assert!(b.clear(64) && !b.get(64) && !b.clear(64) && b.get(65));
        assert!(!AtomicBitmap::new(10).clear(3), "clearing in an unallocated leaf");
    }

    #[test]
    #[should_panic(expected = "outside a bitmap of 200 bits")]
    fn a_bit_past_the_end_panics() {
        AtomicBitmap::new(200).get(200);
    }

    #[test]
    fn a_huge_bitmap_allocates_only_what_is_set() {
        // One bit per 64 KiB block of an 8 PiB disk: 2^37 bits, 16 GiB if dense.
        let b = AtomicBitmap::new(1 << 37);
        let empty = b.memory();
        assert!(empty < 8 << 20, "{empty} bytes for an untouched bitmap");
        b.set((1 << 37) - 1);
        b.set(5);
        assert!(b.get((1 << 37) - 1) && b.get(5) && !b.get(6) && !b.get(1 << 36));
        assert_eq!(b.memory() - empty, 2 * (LEAF_BITS as usize / 8), "two leaves");
    }

    #[test]
    fn a_small_bitmap_allocates_only_its_words() {
        let b = AtomicBitmap::new(100);
        b.set(99);
        assert_eq!(b.memory(), 2 * 8 + std::mem::size_of::<OnceLock<Box<[AtomicU64]>>>());
        let edge = AtomicBitmap::new(LEAF_BITS + 1);
        edge.set(LEAF_BITS);
        assert!(edge.get(LEAF_BITS) && !edge.get(LEAF_BITS - 1));
    }

    #[test]
    fn threads_setting_bits_lose_none() {
        let b = AtomicBitmap::new(4 * 4096);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let b = &b;
                s.spawn(move || (0..4096).for_each(|i| _ = b.set(i * 4 + t)));
            }
        });
        assert!(b.all_set(0, 4 * 4096));
    }
}
