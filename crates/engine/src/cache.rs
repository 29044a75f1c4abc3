//! The bounded cache: a limit on the fetched data that the partial layers of one store hold,
//! kept by dropping the least recently used fetched blocks.
//!
//! Owns: [`FetchedCache`], one per store and engine (the engine context keeps them, like the
//! block index of `reuse`), which counts the fetched blocks of the partial layers opened in
//! that store (the blocks their files held when they were opened, and every block landed
//! since), picks the blocks to drop, and drops them; the per-block [`CacheMarks`] each such
//! layer carries for it; and [`CacheStats`]. Does not own: how a block is dropped from a layer
//! (what [`Evictable`] asks of it, which `fetch`'s partial layer does: a hole punched, its
//! verified bit cleared, readers of it sent to fetch it again), nor complete layers and
//! writable tops, whose blocks are never dropped.
//!
//! The order is a clock (second chance) over blocks, an approximate LRU: blocks enter a ring
//! as they land, with their referenced bit set; a read sets the bit again; the hand takes
//! blocks from the front of the ring, and a block whose bit is set gets the bit cleared and goes
//! to the back instead of being dropped. So a block is dropped only if nothing read it since
//! the hand last passed it (a block fetched by read-ahead and never read goes on its second
//! pass); blocks found in the file when it was opened enter first, unreferenced.
//!
//! A block is dropped only from a layer no other process has open: before it punches, the
//! cache converts its layer's read lock on [`crate::lock::IN_USE`] to a write lock, which fails
//! while another process holds that lock (see `lock`). A layer another process uses keeps its
//! blocks (a warning says so once): the limit then holds for this process's layers only.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::bitmap::AtomicBitmap;
use crate::error::Result;

/// The cache's marks on the blocks of one layer it counts, kept in the layer (one bit each).
pub(crate) struct CacheMarks {
    /// Blocks the cache counts (fetched, or in the file when the layer was opened).
    tracked: AtomicBitmap,
    /// Blocks read since the clock's hand last passed them.
    referenced: AtomicBitmap,
    /// Blocks counted and about to be written: never dropped meanwhile.
    pending: AtomicBitmap,
}

impl CacheMarks {
    /// Marks for a layer of `blocks` stored blocks, all clear.
    pub(crate) fn new(blocks: u64) -> CacheMarks {
        CacheMarks {
            tracked: AtomicBitmap::new(blocks),
            referenced: AtomicBitmap::new(blocks),
            pending: AtomicBitmap::new(blocks),
        }
    }

    /// Records that block `p` was read (a second chance from the hand).
    pub(crate) fn touch(&self, p: u64) {
        if !self.referenced.get(p) {
            self.referenced.set(p);
        }
    }

    /// Block `p` is about to be written (`true`) or was (`false`).
    pub(crate) fn set_pending(&self, p: u64, pending: bool) {
        if pending {
            self.pending.set(p);
        } else {
            self.pending.clear(p);
        }
    }
}

/// What the cache needs of a layer whose fetched blocks it counts and may drop.
pub(crate) trait Evictable: Send + Sync {
    /// The layer's marks.
    fn marks(&self) -> &CacheMarks;
    /// The layer's block size in bytes.
    fn block_bytes(&self) -> u64;
    /// The stored blocks its local file holds data for now.
    fn held_blocks(&self) -> Vec<u64>;
    /// Takes the layer for dropping blocks (no other process may have it open); true if it
    /// could.
    fn take_exclusive(&self) -> bool;
    /// Gives back what [`Evictable::take_exclusive`] took.
    fn give_back_exclusive(&self);
    /// Drops stored block `p` (it is fetched again if read).
    fn drop_block(&self, p: u64) -> Result<()>;
    /// The layer's name, for messages.
    fn name(&self) -> String;
}

/// What a store's bounded cache holds and has dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// The limit, in bytes of fetched blocks.
    pub limit: u64,
    /// Bytes of fetched blocks the open partial layers hold now.
    pub bytes: u64,
    /// Blocks dropped (holes punched) so far.
    pub dropped_blocks: u64,
    /// The bytes of those blocks.
    pub dropped_bytes: u64,
}

/// The bounded cache of one store (see the module doc).
pub(crate) struct FetchedCache {
    limit: u64,
    clock: Mutex<Clock>,
    dropped_blocks: AtomicU64,
    dropped_bytes: AtomicU64,
    warned_shared: AtomicBool,
}

/// The ring of counted blocks, as (layer slot, stored block), and the layers they are in.
#[derive(Default)]
struct Clock {
    layers: Vec<Slot>,
    ring: VecDeque<(u32, u64)>,
    bytes: u64,
}

/// A layer counted by the cache. Its blocks' bytes leave the count when it is closed (its
/// blocks are counted again if it is opened again: see [`FetchedCache::register`]).
struct Slot {
    layer: Weak<dyn Evictable>,
    block_size: u64,
}

impl FetchedCache {
    pub(crate) fn new(limit: u64) -> FetchedCache {
        FetchedCache {
            limit,
            clock: Mutex::default(),
            dropped_blocks: AtomicU64::new(0),
            dropped_bytes: AtomicU64::new(0),
            warned_shared: AtomicBool::new(false),
        }
    }

    fn clock(&self) -> std::sync::MutexGuard<'_, Clock> {
        self.clock.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn limit(&self) -> u64 {
        self.limit
    }

    pub(crate) fn stats(&self) -> CacheStats {
        let bytes = self.clock().bytes;
        CacheStats {
            limit: self.limit,
            bytes,
            dropped_blocks: self.dropped_blocks.load(Ordering::Relaxed),
            dropped_bytes: self.dropped_bytes.load(Ordering::Relaxed),
        }
    }

    /// Starts counting `layer` (just opened): its slot, and the blocks its file holds already
    /// (fetched before, by this process or another), at the front of the ring, so that they go
    /// before anything fetched from now on. Then drops what is over the limit.
    pub(crate) fn register(&self, layer: &Arc<dyn Evictable>) -> u32 {
        let held = layer.held_blocks();
        let bs = layer.block_bytes();
        let slot = {
            let mut clock = self.clock();
            let slot = u32::try_from(clock.layers.len()).unwrap_or(u32::MAX);
            clock.layers.push(Slot { layer: Arc::downgrade(layer), block_size: bs });
            for p in held.into_iter().rev() {
                if !layer.marks().tracked.set(p) {
                    clock.ring.push_front((slot, p));
                    clock.bytes += bs;
                }
            }
            slot
        };
        self.evict();
        slot
    }

    /// Blocks `blocks` of the layer in `slot` are landing (fetched and checked, about to be
    /// written): counts the ones not counted yet, then drops what is over the limit, so that
    /// the room is made before they are written.
    pub(crate) fn landed(&self, slot: u32, layer: &dyn Evictable, blocks: std::ops::Range<u64>) {
        let (marks, bs) = (layer.marks(), layer.block_bytes());
        {
            let mut clock = self.clock();
            for p in blocks {
                // A block enters as if just read: read-ahead not read yet gets one pass of the
                // hand before it can go.
                marks.referenced.set(p);
                if !marks.tracked.set(p) {
                    clock.ring.push_back((slot, p));
                    clock.bytes += bs;
                }
            }
            if clock.bytes <= self.limit {
                return;
            }
        }
        self.evict();
    }

    /// Moves the hand until the counted bytes are within the limit, or every block was looked
    /// at twice (all recently read, or in layers another process uses).
    fn evict(&self) {
        let mut clock = self.clock();
        let mut budget = clock.ring.len() * 2 + 1;
        // The layers this pass took exclusive (their in-use lock converted to a write lock);
        // given back at the end.
        let mut exclusive: Vec<(Arc<dyn Evictable>, bool)> = Vec::new();
        while clock.bytes > self.limit && budget > 0 {
            budget -= 1;
            let Some((slot, p)) = clock.ring.pop_front() else { break };
            let s = &clock.layers[slot as usize];
            let bs = s.block_size;
            let Some(layer) = s.layer.upgrade() else {
                // Closed: its blocks stay in its file and leave the count (see `Slot`).
                clock.bytes -= bs;
                continue;
            };
            let marks = layer.marks();
            if !marks.tracked.get(p) {
                continue; // (dropped through another entry)
            }
            if marks.referenced.clear(p) || marks.pending.get(p) {
                clock.ring.push_back((slot, p)); // read since the hand last passed: a second chance
                continue;
            }
            let mine = match exclusive
                .iter()
                .find(|(l, _)| std::ptr::addr_eq(Arc::as_ptr(l), Arc::as_ptr(&layer)))
            {
                Some((_, mine)) => *mine,
                None => {
                    let mine = layer.take_exclusive();
                    if !mine && !self.warned_shared.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            layer = %layer.name(),
                            "another process uses this partial layer: its blocks are not dropped to keep the cache limit"
                        );
                    }
                    exclusive.push((layer.clone(), mine));
                    mine
                }
            };
            if !mine {
                clock.ring.push_back((slot, p));
                continue;
            }
            match layer.drop_block(p) {
                Ok(()) => {
                    layer.marks().tracked.clear(p);
                    clock.bytes -= bs;
                    self.dropped_blocks.fetch_add(1, Ordering::Relaxed);
                    self.dropped_bytes.fetch_add(bs, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::warn!(layer = %layer.name(), pblock = p, error = %e, "could not drop a cached block");
                    clock.ring.push_back((slot, p));
                }
            }
        }
        drop(clock);
        for (layer, mine) in exclusive {
            if mine {
                layer.give_back_exclusive();
            }
        }
    }
}

/// The bytes of the data region of `path` that are allocated, block by block: the blocks
/// (numbered from 0, each `block_size` bytes from `data_start`) that hold data, of `count`.
/// Filesystems without `SEEK_DATA` report every block.
pub(crate) fn allocated_blocks(f: &std::fs::File, data_start: u64, block_size: u64, count: u64) -> Vec<u64> {
    use rustix::fs::{SeekFrom, seek};
    let end = data_start + block_size * count;
    let mut out = Vec::new();
    let mut pos = data_start;
    while pos < end {
        let data = match seek(f, SeekFrom::Data(pos)) {
            Ok(o) => o,
            Err(rustix::io::Errno::NXIO) => break,
            Err(_) => return (0..count).collect(),
        };
        if data >= end {
            break;
        }
        let hole = seek(f, SeekFrom::Hole(data)).unwrap_or(end).min(end);
        let (first, last) = ((data - data_start) / block_size, (hole - data_start).div_ceil(block_size));
        let from = out.last().map_or(first, |&l: &u64| first.max(l + 1));
        out.extend(from..last);
        pos = hole.max(data + 1);
    }
    out
}
