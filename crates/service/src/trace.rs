//! Recording a boot trace: the order in which a disk's blocks are first read through its
//! export (for `mcow trace`, pushed with the image so that a lazy serve prefetches them).

use std::sync::Mutex;

use mcow_engine::Disk;

/// Records which blocks are read first, in order: one bit per block says whether it was seen.
pub struct TraceRecorder {
    block_size: u32,
    seen: mcow_engine::AtomicBitmap,
    order: Mutex<Vec<u64>>,
}

impl TraceRecorder {
    /// A recorder for `disk` that has seen nothing yet.
    pub fn new(disk: &Disk) -> TraceRecorder {
        let blocks = disk.size().div_ceil(u64::from(disk.block_size()));
        TraceRecorder {
            block_size: disk.block_size(),
            seen: mcow_engine::AtomicBitmap::new(blocks),
            order: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn note(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let bs = u64::from(self.block_size);
        for b in offset / bs..=((offset + len - 1) / bs).min(self.seen.len().saturating_sub(1)) {
            if !self.seen.set(b) {
                self.order.lock().unwrap_or_else(|p| p.into_inner()).push(b);
            }
        }
    }

    /// The trace so far.
    pub fn trace(&self) -> mcow_remote::image::Trace {
        let blocks = self.order.lock().unwrap_or_else(|p| p.into_inner()).clone();
        mcow_remote::image::Trace { block_size: self.block_size, blocks }
    }
}
