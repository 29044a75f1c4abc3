//! Background fetching for lazy disks: the blocks of the image's trace first, then, if asked,
//! every remaining block of the partial layers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use mcow_engine::Disk;

/// Fetches in the background what a lazy disk will likely need: first the blocks of its
/// image's trace, in order; then, with `all`, every remaining block of its partial layers,
/// after which those layers are complete and move into the store. Stops early when `stop` is
/// set. Errors are logged (the blocks are fetched again on demand).
pub fn background_fetch(disk: Arc<Disk>, trace: Option<Vec<u64>>, all: bool, stop: Arc<AtomicBool>) {
    // The trace's blocks as runs of consecutive blocks, in the trace's order, asked for in
    // batches: each batch costs one request per layer where the origin allows several ranges
    // in one (registries, plain HTTP), so the first blocks come soon and requests stay few.
    const BATCH: usize = 64;
    let trace = trace.unwrap_or_default();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &vb in &trace {
        match runs.last_mut() {
            Some((start, n)) if *start + *n == vb => *n += 1,
            _ => runs.push((vb, 1)),
        }
    }
    let mut prefetched = 0u64;
    for batch in runs.chunks(BATCH) {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        match disk.prefetch_runs(batch) {
            Ok(()) => prefetched += batch.iter().map(|r| r.1).sum::<u64>(),
            Err(e) => tracing::warn!(runs = batch.len(), error = %e, "prefetch failed"),
        }
    }
    tracing::info!(disk = %disk.dir().display(), blocks = prefetched, "prefetched the trace");
    if !all {
        return;
    }
    let done = disk.fetch_rest(&stop);
    tracing::info!(disk = %disk.dir().display(), ?done, "background download ended");
}
