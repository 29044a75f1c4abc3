//! Partial layers: fetching the blocks a lazily pulled layer does not hold yet.
//!
//! Owns: [`PartialLayer`] (a sealed layer's structure plus its fetch state), the `BlockSource` a partial layer fetches from (and `Offline`, which fetches nothing),
//! each partial layer's fetch state (ranges in flight, readers waiting for them, failures), the
//! checking and caching of fetched blocks as they arrive, loading the hash table chunks of a
//! layer pulled with index chunks before its blocks are checked (see `chunks`), and which
//! ranges it locks so that processes can share a cache, and where a fetch copies blocks another
//! local layer holds instead of fetching them (the index of those is `reuse`'s). Does not own: how much one fetch asks for (the read-ahead
//! policy, see `readahead`; `FetchPolicy` is re-exported here), the locks themselves (see
//! `lock`), the layer file and reading complete layers (see `layer`), where partial files live
//! and when they become complete (see `store`), or where bytes come from (`BlockSource`
//! implementations live in mcow-remote).

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use mcow_format::{Digest, HEADER_SIZE};

use crate::background::Background;
use crate::bitmap::AtomicBitmap;
use crate::cache::{CacheMarks, Evictable, FetchedCache};
use crate::error::{Error, Result};
use crate::layer::{Blocks, ReadTally, SealedLayer, make_ready_blocks, read_blocks, read_exact_at};
use crate::lock::{LockError, LockType, RangeLock};
pub use crate::readahead::FetchPolicy;
use crate::readahead::{Streams, Windows};
use crate::reuse::BlockIndex;

/// Where the blocks of a sealed layer can be fetched from when its local file does not hold
/// them yet (a registry, an HTTP server, object storage). The engine asks for byte ranges of the
/// layer file, checks every block against its hash before it keeps or serves it, and writes the
/// good blocks into the local file, which thereby becomes a cache.
pub trait BlockSource: Send + Sync {
    /// Streams exactly `len` bytes at `offset` of the sealed layer `layer` (offsets as in the
    /// layer file) to `sink`, in order and in pieces of any size, as they arrive, so that the
    /// first blocks can be checked and served before the last ones are in. Stops early, without
    /// error, when `sink` returns false. Ending before `len` bytes otherwise is an error.
    fn read_range(
        &self,
        layer: &Digest,
        offset: u64,
        len: u64,
        sink: &mut dyn FnMut(&[u8]) -> bool,
    ) -> std::io::Result<()>;

    /// Streams several ranges (offset, length) of layer `layer` to `sink`, which gets the
    /// range's index and consecutive pieces of it (each range's bytes in order). A source that
    /// can ask for them in one request should; this one asks range by range. Stops early when
    /// `sink` returns false; a range that ends short is an error.
    fn read_ranges(
        &self,
        layer: &Digest,
        ranges: &[(u64, u64)],
        sink: &mut dyn FnMut(usize, &[u8]) -> bool,
    ) -> std::io::Result<()> {
        for (i, &(offset, len)) in ranges.iter().enumerate() {
            let mut stopped = false;
            self.read_range(layer, offset, len, &mut |piece: &[u8]| {
                stopped = !sink(i, piece);
                !stopped
            })?;
            if stopped {
                break;
            }
        }
        Ok(())
    }
}

/// A [`BlockSource`] that fetches nothing: opening a partial layer with it gives access to its
/// structure (header, index, which blocks are local) without any network, for tools that
/// inspect a disk (`info`, `map`, `check`). A read of a block that is not local fails.
pub struct Offline;

impl BlockSource for Offline {
    fn read_range(
        &self,
        layer: &Digest,
        offset: u64,
        len: u64,
        _sink: &mut dyn FnMut(&[u8]) -> bool,
    ) -> std::io::Result<()> {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotConnected,
            format!(
                "{len} bytes at {offset} of layer {layer} are not local and this disk was opened offline"
            ),
        ))
    }
}

/// How a partial layer fetches: the source, the policy, what is being fetched right now and
/// the recent sequential streams (see [`FetchState`]), and a writable handle on the local file.
pub(crate) struct Fetcher {
    source: Arc<dyn BlockSource>,
    /// The read-ahead windows, in blocks.
    windows: Windows,
    state: Mutex<FetchState>,
    writer: OnceLock<File>,
    /// The engine's background fetch threads, once the layer is shared (see
    /// `LayerStore::open_layer_shared`): a fetch that reads ahead runs on one of them, holding
    /// the layer's `Arc`, so that the reader who started it goes on as soon as its own blocks
    /// are in. Without them, read-ahead is fetched by the reader.
    background: Option<Arc<Background>>,
    /// Set once this layer warned that its file has no byte-range locks.
    warned_unlocked: AtomicBool,
    /// The block index of the layer's store: blocks another local layer holds are copied from
    /// there instead of fetched (see `reuse`). None: everything missing is fetched.
    reuse: Option<Arc<BlockIndex>>,
}

impl Fetcher {
    /// Warns, once per layer, that fetches go unlocked on this filesystem.
    fn warn_unlocked(&self, e: &std::io::Error) {
        if !self.warned_unlocked.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %e, "no byte-range locks here; fetching unlocked");
        }
    }

    /// Waits, with the state lock given and returned, until block `p` is no longer in flight
    /// (landed, or given up); at once if it is not. If the fetch that held it failed, also
    /// returns that fetch's error: its readers fail with it rather than each trying again.
    fn wait_landed<'a>(
        &'a self,
        mut state: std::sync::MutexGuard<'a, FetchState>,
        p: u64,
    ) -> (std::sync::MutexGuard<'a, FetchState>, Option<String>) {
        let Some(mut claim) = state.holder(p) else {
            return (state, None);
        };
        let me = std::thread::current();
        state.waiting.push(Waiter { block: p, claim, thread: me.clone() });
        let failure = loop {
            if let Some(e) = state.take_failure(claim) {
                break Some(e);
            }
            match state.holder(p) {
                None => break None,
                // Held by another fetch now (the one we waited for ended without failing).
                Some(c) if c != claim => {
                    claim = c;
                    if let Some(w) = state.waiting.iter_mut().find(|w| w.thread.id() == me.id()) {
                        w.claim = c;
                    }
                }
                Some(_) => {}
            }
            drop(state);
            std::thread::park();
            state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        };
        if let Some(i) = state.waiting.iter().position(|w| w.block == p && w.thread.id() == me.id()) {
            state.waiting.swap_remove(i);
        }
        (state, failure)
    }
}

/// How long after the open the background load of a layer's hash table waits at most for the
/// first fetched blocks to land (see `PartialLayer::load_hashes_in_background`).
const HASHES_AFTER: std::time::Duration = std::time::Duration::from_millis(500);

/// A reader waiting for a block to land: the block, the claim it waits for, the thread to wake.
struct Waiter {
    block: u64,
    claim: u64,
    thread: std::thread::Thread,
}

/// A fetch that failed before all its blocks landed: its error, for the readers that waited
/// for one of them (`pending` of them have yet to take it).
struct Failure {
    claim: u64,
    error: String,
    pending: usize,
}

/// Why a block is wanted (see `SealedLayer::ensure_block`); each holds the end of the blocks
/// wanted along with it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Want {
    /// A read that covers the blocks up to this end.
    Read(u64),
    /// Exactly the missing blocks up to this end, shown by a disk or not (the background
    /// download of `fetch_all`).
    Exact(u64),
}

/// The ranges of blocks being fetched (readers of a block in flight wait for it to land;
/// fetches of different ranges run concurrently) and the recent streams of fetches: a stream
/// is a run of blocks fetched in ascending order.
#[derive(Default)]
struct FetchState {
    /// (claim id, next block to land, end): a fetch lands its blocks in order, so the blocks
    /// still in flight are always the tail of its range.
    in_flight: Vec<(u64, u64, u64)>,
    next_claim: u64,
    /// Readers waiting for a block to land.
    waiting: Vec<Waiter>,
    /// The recent streams of reads, for the read-ahead policy.
    streams: Streams,
    /// Fetches that failed, until each of their waiting readers has taken the error.
    failures: Vec<Failure>,
    /// Whether a fetched block has landed since the open: the background load of the hash
    /// table waits for the first (see `load_hashes_in_background`).
    landed_any: bool,
}

impl FetchState {
    fn is_in_flight(&self, p: u64) -> bool {
        self.holder(p).is_some()
    }

    /// The claim that has block `p` in flight, if any.
    fn holder(&self, p: u64) -> Option<u64> {
        self.in_flight.iter().find(|&&(_, start, end)| (start..end).contains(&p)).map(|r| r.0)
    }

    /// Takes the error of the failed fetch `claim` for one of its readers.
    fn take_failure(&mut self, claim: u64) -> Option<String> {
        let i = self.failures.iter().position(|f| f.claim == claim)?;
        let f = &mut self.failures[i];
        f.pending -= 1;
        let error = f.error.clone();
        if f.pending == 0 {
            self.failures.swap_remove(i);
        }
        Some(error)
    }

    /// Wakes the readers waiting for a block in `blocks` (all readers if `None`).
    fn wake(&self, blocks: Option<std::ops::Range<u64>>) {
        for w in &self.waiting {
            if blocks.as_ref().is_none_or(|b| b.contains(&w.block)) {
                w.thread.unpark();
            }
        }
    }
}

/// A fetch's claim on its range of blocks: `landed` moves its start past each block that was
/// checked and written (waking the readers waiting for it); dropping it (at the end of the
/// fetch, also on errors) gives up the blocks that did not land, so their readers fetch them
/// again.
struct Claim<'a> {
    fetch: &'a Fetcher,
    id: u64,
    /// For a fetch of a deep-queue stream: the block whose landing starts the stream's next
    /// fetch, so that the transfer does not pause between fetches.
    pipeline: Option<u64>,
    /// For a fetch run on a thread of its own for a reader: that reader's thread and block
    /// (it takes the fetch's error even if it was not waiting yet when the fetch failed).
    starter: Option<(std::thread::ThreadId, u64)>,
    /// Set once the claim has failed (see [`Claim::fail`]).
    failed: std::cell::Cell<bool>,
}

impl<'a> Claim<'a> {
    fn new(fetch: &'a Fetcher, id: u64, pipeline: Option<u64>) -> Claim<'a> {
        Claim { fetch, id, pipeline, starter: None, failed: std::cell::Cell::new(false) }
    }

    /// The fetch failed with `error`: gives up the blocks that did not land and hands the error
    /// to the readers waiting for them (and to the starter, if its block did not land), waking
    /// them. Once per claim; a claim dropped without failing just gives its blocks up.
    fn fail(&self, error: &str) {
        if self.failed.replace(true) {
            return;
        }
        let mut state = self.fetch.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(i) = state.in_flight.iter().position(|r| r.0 == self.id) else { return };
        let (_, start, end) = state.in_flight.swap_remove(i);
        let starter = self.starter.filter(|&(_, b)| (start..end).contains(&b));
        let waiting = state
            .waiting
            .iter()
            .filter(|w| w.claim == self.id && starter.is_none_or(|(t, _)| w.thread.id() != t))
            .count();
        let pending = waiting + usize::from(starter.is_some());
        if pending > 0 {
            state.failures.push(Failure { claim: self.id, error: error.to_string(), pending });
        }
        state.wake(None);
    }

    /// Shrinks the claim to `[start, end)` (the rest turned out to be local already), waking
    /// the readers waiting for the blocks given up.
    fn narrow(&self, start: u64, end: u64) {
        let mut state = self.fetch.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = state.in_flight.iter_mut().find(|r| r.0 == self.id) {
            (r.1, r.2) = (start, end);
        }
        state.wake(None);
    }

    /// Blocks `blocks` (the next ones of the claim) were checked and written.
    fn landed(&self, blocks: std::ops::Range<u64>) {
        let mut state = self.fetch.state.lock().unwrap_or_else(|e| e.into_inner());
        state.landed_any = true;
        if let Some(i) = state.in_flight.iter().position(|r| r.0 == self.id) {
            state.in_flight[i].1 = blocks.end;
            if state.in_flight[i].1 >= state.in_flight[i].2 {
                state.in_flight.swap_remove(i); // all landed: nothing of it is in flight
            }
        }
        state.wake(Some(blocks));
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut state = self.fetch.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = state.in_flight.iter().position(|r| r.0 == self.id) {
            state.in_flight.swap_remove(i);
        }
        state.wake(None);
    }
}

/// Checks, caches and lands the blocks of one claimed range as its bytes arrive, in pieces of
/// any size: whole blocks in a piece are checked where they lie, a block split across pieces
/// is gathered first. The first block that fails its hash (or cannot be written) ends it.
struct Lander<'a, 'b> {
    layer: &'a Arc<PartialLayer>,
    fetch: &'a Fetcher,
    claim: &'a Claim<'a>,
    writer: &'a File,
    /// The next block to land, and the end of the range.
    next: u64,
    end: u64,
    split: Vec<u8>,
    failure: Option<Error>,
    /// A block to copy out as it lands (the reader's), and where.
    target: Option<(u64, &'b mut [u8])>,
}

impl<'a, 'b> Lander<'a, 'b> {
    fn new(
        layer: &'a Arc<PartialLayer>,
        fetch: &'a Fetcher,
        claim: &'a Claim<'a>,
        first: u64,
        count: u64,
    ) -> Result<Self> {
        let writer = layer.writer(fetch)?;
        Ok(Lander {
            layer,
            fetch,
            claim,
            writer,
            next: first,
            end: first + count,
            split: Vec::new(),
            failure: None,
            target: None,
        })
    }

    /// Takes the next piece of the range; false ends the transfer.
    fn feed(&mut self, mut piece: &[u8]) -> bool {
        let bs = self.layer.block_size() as usize;
        while !piece.is_empty() {
            if self.split.is_empty() && piece.len() >= bs {
                let (whole, rest) = piece.split_at(piece.len() / bs * bs);
                piece = rest;
                if !self.land(whole) {
                    return false;
                }
                continue;
            }
            let n = (bs - self.split.len()).min(piece.len());
            self.split.extend_from_slice(&piece[..n]);
            piece = &piece[n..];
            if self.split.len() == bs {
                let block = std::mem::take(&mut self.split);
                let ok = self.land(&block);
                self.split = block;
                self.split.clear();
                if !ok {
                    return false;
                }
            }
        }
        true
    }

    /// Checks, caches and lands the next whole blocks (`run` holds one or more): the blocks up
    /// to the first bad one are written in one call and land together (one wake-up for their
    /// readers).
    fn land(&mut self, run: &[u8]) -> bool {
        let (layer, first) = (self.layer, self.next);
        let bs = layer.block_size() as usize;
        let given = (run.len() / bs) as u64;
        let count = given.min(self.end - first);
        let mut good = 0;
        while good < count {
            let p = first + good;
            let i = (good as usize) * bs;
            if !layer.block_matches(p, &run[i..i + bs]) {
                tracing::error!(layer = %layer.digest, pblock = p, "fetched block fails its checksum: not cached");
                self.failure = Some(Error::BlockChecksum { path: layer.path.clone(), pblock: p });
                break;
            }
            good += 1;
        }
        if good > 0 {
            use std::os::unix::fs::FileExt;
            let at = HEADER_SIZE as u64 + first * layer.block_size();
            // Counted by the bounded cache first, which makes room for them (so that the file
            // never holds more than the limit, however many fetches land at once); then the
            // write and the marks together, so that no block is dropped between them (see
            // `PartialLayer::landing`).
            let landed = first..first + good;
            layer.reserve(landed.clone());
            let landing = layer.landing();
            if let Err(e) = self.writer.write_all_at(&run[..good as usize * bs], at) {
                drop(landing);
                layer.reserved_done(landed);
                self.failure = Some(Error::io("write", &layer.path)(e));
                return false;
            }
            for p in landed.clone() {
                layer.mark_verified(p);
            }
            drop(landing);
            layer.reserved_done(landed.clone());
            if let Some(index) = &self.fetch.reuse {
                index.add_landed(layer, landed.clone());
            }
            if let Some((t, block)) = &mut self.target
                && landed.contains(t)
            {
                let i = (*t - first) as usize * bs;
                block.copy_from_slice(&run[i..i + bs]);
            }
            self.claim.landed(landed.clone());
            if self.claim.pipeline.is_some_and(|p| landed.contains(&p)) {
                layer.fetch_next(self.fetch, self.end);
            }
            self.next += good;
        }
        // false: a bad block, or bytes past the end of the range
        good == given
    }
}

/// Locks `[start, start + len)` of a partial layer file (through its writer) while its blocks
/// are fetched, so that two processes serving from one cache do not fetch the same blocks at
/// the same time (the second waits, then finds them local). Threads of one process share the
/// writer handle and so never block each other (they coordinate through [`FetchState`]). Also
/// says whether it had to wait. `None`: a filesystem without byte-range locks, where fetches
/// go unlocked (processes may then fetch a block twice, never keep a wrong one).
fn lock_range<'a>(
    fetch: &Fetcher,
    file: &'a File,
    start: u64,
    len: u64,
) -> std::io::Result<(Option<RangeLock<'a>>, bool)> {
    match RangeLock::try_lock(file, LockType::Write, start, len) {
        Ok(l) => return Ok((Some(l), false)),
        Err(LockError::Held) => {}
        Err(LockError::Unsupported(e)) => {
            fetch.warn_unlocked(&e);
            return Ok((None, false));
        }
        Err(e) => return Err(e.into()),
    }
    Ok((Some(RangeLock::lock_wait(file, LockType::Write, start, len)?), true))
}

/// Like [`lock_range`] without waiting: `None` if another process holds part of the range (it
/// is theirs to fetch); `Some(None)` on a filesystem without such locks.
fn try_lock_range<'a>(
    fetch: &Fetcher,
    file: &'a File,
    start: u64,
    len: u64,
) -> Option<Option<RangeLock<'a>>> {
    match RangeLock::try_lock(file, LockType::Write, start, len) {
        Ok(l) => Some(Some(l)),
        Err(LockError::Unsupported(e)) => {
            fetch.warn_unlocked(&e);
            Some(None)
        }
        Err(_) => None,
    }
}

/// Blocks dropped from a partial layer are counted in [`DROP_GROUPS`] counters, block `p` in
/// counter [`drop_group`]`(p)`: runs of [`DROP_GROUP_BLOCKS`] blocks, round robin. (A read of
/// a block retries when its counter moved: a few counters, cheap to keep, and few needless
/// retries.)
const DROP_GROUPS: usize = 64;
const DROP_GROUP_BLOCKS: usize = 16;

fn drop_group(p: u64) -> usize {
    (p / DROP_GROUP_BLOCKS as u64) as usize % DROP_GROUPS
}

/// A partial (lazily fetched) layer: a sealed layer's structure and local file, whose missing
/// blocks are fetched from a source, plus its fetch state and which of its blocks open disks
/// show. Blocks already in the local file are found by their hashes, so nothing is fetched
/// twice, across restarts too.
pub struct PartialLayer {
    layer: SealedLayer,
    fetch: Fetcher,
    /// Blocks that an open disk shows (not hidden by upper layers): the only ones reads may
    /// fetch along with the block read. Set by `Stack::open`.
    visible: AtomicBitmap,
    /// A read-write handle on the file that holds a read lock on [`crate::lock::IN_USE`] for
    /// as long as the layer is open (so that other processes, `mcow gc` and their bounded
    /// caches, see that it is in use), and through which the bounded cache punches the blocks
    /// it drops. `None` where the file has no byte-range locks or is read-only.
    in_use: Option<File>,
    /// The bounded cache of the layer's store and this layer's slot in it, if the engine has a
    /// cache limit (see `cache`). Only then are blocks ever dropped.
    cache: OnceLock<(Arc<FetchedCache>, u32)>,
    /// The bounded cache's marks on the layer's blocks (see `cache`).
    marks: CacheMarks,
    /// Counters bumped twice around every dropped block (odd while one is being dropped), one
    /// per group of blocks (see [`drop_group`]): a read that saw the counter of one of its
    /// blocks change reads again, since a block it read may have been a hole by then (see
    /// [`PartialLayer::read`]).
    drops: [AtomicU64; DROP_GROUPS],
    /// Held shared while local bytes are written or checked and marked verified, exclusively
    /// while a block is dropped, so that a block is never marked verified over a hole.
    dropping: RwLock<()>,
}

/// The structure, file and verified blocks of the layer (a partial layer reads as a sealed one
/// once its blocks are local).
impl std::ops::Deref for PartialLayer {
    type Target = SealedLayer;

    fn deref(&self) -> &SealedLayer {
        &self.layer
    }
}

impl Blocks for Arc<PartialLayer> {
    fn layer(&self) -> &SealedLayer {
        &self.layer
    }

    fn wait_for_run(&self, first: u64, last: u64) -> Result<()> {
        PartialLayer::wait_for_run(self, first, last)
    }

    fn ensure_block(&self, f: &File, pblock: u64, block: &mut [u8], end: u64) -> Result<bool> {
        PartialLayer::ensure_block(self, f, pblock, block, Want::Read(end))
    }
}

impl Evictable for PartialLayer {
    fn marks(&self) -> &CacheMarks {
        &self.marks
    }

    fn block_bytes(&self) -> u64 {
        self.layer.block_size()
    }

    fn held_blocks(&self) -> Vec<u64> {
        self.allocated_blocks()
    }

    fn take_exclusive(&self) -> bool {
        PartialLayer::take_exclusive(self)
    }

    fn give_back_exclusive(&self) {
        PartialLayer::give_back_exclusive(self)
    }

    fn drop_block(&self, p: u64) -> Result<()> {
        PartialLayer::drop_block(self, p)
    }

    fn name(&self) -> String {
        self.digest.to_string()
    }
}

impl PartialLayer {
    /// Makes `layer` (opened from a partial file, with verification) a partial layer whose
    /// missing blocks are fetched from `source` as `policy` says. With `background`, read-ahead
    /// runs on its threads (see [`Fetcher`]); without, readers fetch it themselves.
    pub(crate) fn new(
        mut layer: SealedLayer,
        source: Arc<dyn BlockSource>,
        policy: FetchPolicy,
        background: Option<Arc<Background>>,
    ) -> PartialLayer {
        layer.verify = true; // a partial layer's local bytes are only trusted once checked
        let fetch = Fetcher {
            source,
            windows: Windows::new(policy, layer.block_size()),
            state: Mutex::new(FetchState::default()),
            writer: OnceLock::new(),
            background,
            warned_unlocked: AtomicBool::new(false),
            reuse: None,
        };
        let blocks = layer.trailer.block_count;
        PartialLayer {
            layer,
            fetch,
            visible: AtomicBitmap::new(blocks),
            in_use: None,
            cache: OnceLock::new(),
            marks: CacheMarks::new(blocks),
            drops: std::array::from_fn(|_| AtomicU64::new(0)),
            dropping: RwLock::new(()),
        }
    }

    /// Takes the layer's in-use lock (a read lock on [`crate::lock::IN_USE`] of its file),
    /// waiting while another process holds it exclusively (dropping blocks, or `mcow gc`
    /// removing the file), then checks that the file is still the one at its path (gc may have
    /// removed it meanwhile: then [`Error::LayerMissing`]). Without byte-range locks
    /// (or on a read-only file) the layer is opened without it, with a warning.
    pub(crate) fn with_in_use_lock(mut self, store: &std::path::Path) -> Result<PartialLayer> {
        use std::os::unix::fs::MetadataExt;
        let path = self.layer.path.clone();
        let file = match std::fs::OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "partial layer opened without its in-use lock");
                return Ok(self);
            }
        };
        match crate::lock::hold(&file, LockType::Read, crate::lock::IN_USE.0, crate::lock::IN_USE.1, true) {
            Ok(()) => {}
            Err(LockError::Unsupported(e)) => {
                tracing::warn!(path = %path.display(), error = %e, "no byte-range locks: partial layer opened without its in-use lock");
                return Ok(self);
            }
            Err(e) => return Err(Error::io("lock", &path)(e.into())),
        }
        let same = match (std::fs::metadata(&path), file.metadata()) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        if !same {
            return Err(Error::LayerMissing { digest: self.layer.digest, store: store.to_path_buf() });
        }
        self.in_use = Some(file);
        Ok(self)
    }

    /// Makes the layer's blocks count against `cache` (its store's bounded cache): from now
    /// on, blocks may be dropped from it (see `cache`).
    pub(crate) fn attach_cache(self: &Arc<Self>, cache: Arc<FetchedCache>) {
        if self.in_use.is_none() {
            tracing::warn!(layer = %self.digest, "partial layer without its in-use lock: the cache limit does not apply to it");
            return;
        }
        let slot = cache.register(&(self.clone() as Arc<dyn Evictable>));
        let _ = self.cache.set((cache, slot));
    }

    /// Whether blocks may be dropped from this layer (its store has a bounded cache): then no
    /// reader may read its blocks but through [`PartialLayer::read`] (no map, no bitmap of
    /// checked blocks kept elsewhere).
    pub fn drops_blocks(&self) -> bool {
        self.cache.get().is_some()
    }

    /// Whether stored blocks `first..=last` are all verified (local and checked) right now.
    pub(crate) fn all_verified(&self, first: u64, last: u64) -> bool {
        self.verified.all_set(first, last + 1)
    }

    /// The stored blocks the local file holds data for (see `cache::allocated_blocks`).
    pub(crate) fn allocated_blocks(&self) -> Vec<u64> {
        let Some(f) = &self.in_use else { return Vec::new() };
        crate::cache::allocated_blocks(f, HEADER_SIZE as u64, self.block_size(), self.trailer.block_count)
    }

    /// Held while local bytes of blocks are written or checked and marked verified (see
    /// `dropping`).
    fn landing(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.dropping.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads stored block `p` from the local file into `block` and, if it matches its hash,
    /// marks it verified (under [`PartialLayer::landing`]); returns whether it matched.
    fn check_local(&self, f: &File, p: u64, block: &mut [u8]) -> Result<bool> {
        let _landing = self.landing();
        read_exact_at(f, block, HEADER_SIZE as u64 + p * self.block_size(), &self.path)?;
        if self.block_matches(p, block) {
            self.mark_verified(p);
            return Ok(true);
        }
        Ok(false)
    }

    /// Blocks `blocks` are about to be written: the bounded cache counts them (dropping others
    /// to make room) and leaves them alone until [`PartialLayer::reserved_done`].
    fn reserve(&self, blocks: std::ops::Range<u64>) {
        if let Some((cache, slot)) = self.cache.get() {
            for p in blocks.clone() {
                self.marks.set_pending(p, true);
            }
            cache.landed(*slot, self, blocks);
        }
    }

    /// Blocks `blocks` were written and marked (or failed to be): they may be dropped now.
    fn reserved_done(&self, blocks: std::ops::Range<u64>) {
        if self.cache.get().is_some() {
            for p in blocks {
                self.marks.set_pending(p, false);
            }
        }
    }

    /// Records that blocks `first..=last` were read (the clock's referenced bits).
    fn touch(&self, first: u64, last: u64) {
        for p in first..=last.min(self.trailer.block_count.saturating_sub(1)) {
            self.marks.touch(p);
        }
    }

    /// Converts the in-use lock to a write lock if no other process holds it; true if it did.
    pub(crate) fn take_exclusive(&self) -> bool {
        let (at, len) = crate::lock::IN_USE;
        self.in_use.as_ref().is_some_and(|f| crate::lock::hold(f, LockType::Write, at, len, false).is_ok())
    }

    /// Converts the in-use lock back to a read lock.
    pub(crate) fn give_back_exclusive(&self) {
        let (at, len) = crate::lock::IN_USE;
        if let Some(f) = &self.in_use
            && let Err(e) = crate::lock::hold(f, LockType::Read, at, len, true)
        {
            tracing::warn!(layer = %self.digest, error = %e, "could not give back the exclusive in-use lock");
        }
    }

    /// Drops stored block `p` from the local file: punches its hole (the file's allocation is
    /// what says a block may be local: a later read finds the hole and fetches it) and clears
    /// its verified bit, with no block being landed or checked meanwhile, and `drops` odd
    /// throughout, so that reads of it in progress read again. The caller holds the exclusive
    /// in-use lock (no other process has the layer open).
    pub(crate) fn drop_block(&self, p: u64) -> Result<()> {
        use rustix::fs::{FallocateFlags, fallocate};
        let Some(f) = &self.in_use else {
            return Err(Error::Invalid(format!("{}: no handle to drop blocks through", self.path.display())));
        };
        let bs = self.block_size();
        let _dropping = self.dropping.write().unwrap_or_else(|p| p.into_inner());
        let counter = &self.drops[drop_group(p)];
        counter.fetch_add(1, Ordering::SeqCst);
        let punched = fallocate(
            f,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            HEADER_SIZE as u64 + p * bs,
            bs,
        );
        if punched.is_ok() {
            self.layer.verified.clear(p);
        }
        counter.fetch_add(1, Ordering::SeqCst);
        punched.map_err(|e| Error::io("punch", &self.path)(e.into()))
    }

    /// Makes the layer copy the blocks that other local layers of its store hold (same hash)
    /// from there rather than fetch them, finding them through `index` (see `reuse`).
    pub(crate) fn with_reuse(mut self, index: Arc<BlockIndex>) -> PartialLayer {
        self.fetch.reuse = Some(index);
        self
    }

    /// The sealed layer's structure and file.
    pub fn sealed(&self) -> &SealedLayer {
        &self.layer
    }

    /// Reads like [`SealedLayer::read`], fetching the blocks that are not local yet. With a
    /// bounded cache, a read during which a block of this layer was dropped reads again (a
    /// block it found verified may have been a hole by the time it read it; read again, it is
    /// no longer verified and is fetched), and the blocks read count as recently used.
    pub fn read(self: &Arc<Self>, pblock: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_counted(pblock, offset, buf, None)
    }

    /// [`PartialLayer::read`], counting each block read in `tally` (hit or miss).
    pub(crate) fn read_counted(
        self: &Arc<Self>,
        pblock: u64,
        offset: u64,
        buf: &mut [u8],
        tally: Option<&ReadTally>,
    ) -> Result<()> {
        if !self.drops_blocks() {
            return read_blocks(self, pblock, offset, buf, tally);
        }
        // Block by block, each read again until no block of its group (see `drop_group`) was
        // dropped while it was read; the blocks missing fetched first all at once where the
        // read is well within the limit (else some could be dropped before they are copied).
        let bs = self.block_size();
        let limit = self.cache.get().map_or(0, |(c, _)| c.limit());
        // The blocks are counted where they are made ready, else where they are first read
        // (a read again after a drop is not counted again).
        let ready_first = (buf.len() as u64) <= limit / 2;
        if ready_first {
            make_ready_blocks(self, pblock, offset, buf.len() as u64, tally)?;
        }
        let mut done = 0usize;
        while done < buf.len() {
            let at = pblock * bs + offset + done as u64; // within the data region
            let n = ((bs - at % bs) as usize).min(buf.len() - done);
            let piece = &mut buf[done..done + n];
            let p = at / bs;
            let counter = &self.drops[drop_group(p)];
            let mut count = tally.filter(|_| !ready_first);
            loop {
                let before = counter.load(Ordering::SeqCst);
                if before.is_multiple_of(2) {
                    read_blocks(self, p, at % bs, piece, count.take())?;
                    if counter.load(Ordering::SeqCst) == before {
                        break;
                    }
                }
                std::thread::yield_now();
            }
            self.touch(p, p);
            done += n;
        }
        Ok(())
    }

    /// Makes the blocks under `len` bytes from `offset` into physical block `pblock` local and
    /// checked, without copying them out: afterwards they may be read through the map. Blocks
    /// another reader fetched are not read back.
    pub(crate) fn make_ready(
        self: &Arc<Self>,
        pblock: u64,
        offset: u64,
        len: u64,
        tally: Option<&ReadTally>,
    ) -> Result<()> {
        make_ready_blocks(self, pblock, offset, len, tally)
    }

    /// Bytes of the data region present in the local file: its allocated ranges, found with
    /// `SEEK_DATA`/`SEEK_HOLE`. A partial file starts sparse and fetched blocks are written only
    /// once they match their hashes, so allocation is what is local (a block torn by a crash
    /// mid-write counts too, and is fetched again when read). Filesystems without `SEEK_DATA`
    /// fall back to checking every block's hash.
    pub fn local_bytes(&self) -> Result<u64> {
        self.layer.allocated_bytes()
    }

    /// Before a read of blocks `first..=last` that fetches in flight hold (or that are local):
    /// waits until the last of them has landed, so that the reader wakes once instead of once
    /// per block (a fetch lands its blocks in order). Returns at once otherwise; the read then
    /// goes block by block as usual. Fails if the fetch that held the last block failed.
    pub(crate) fn wait_for_run(&self, first: u64, last: u64) -> Result<()> {
        let fetch = &self.fetch;
        let state = fetch.state.lock().unwrap_or_else(|p| p.into_inner());
        if !state.is_in_flight(last) || !(first..last).all(|p| self.is_verified(p) || state.is_in_flight(p)) {
            return Ok(());
        }
        match fetch.wait_landed(state, last) {
            (_, Some(e)) => Err(Error::io("fetch", &self.path)(std::io::Error::other(e))),
            (_, None) => Ok(()),
        }
    }

    /// Checks stored block `pblock` in the local file; if it is wrong (or missing) and the layer
    /// is partial, fetches it (and maybe neighbouring missing blocks, see below) in one
    /// request, checks each against its hash, and writes the good ones into the local file. An
    /// error leaves the local file holding only checked blocks.
    ///
    /// What is fetched adapts to the access pattern (see [`FetchPolicy`] and
    /// `FetchState::window_for`): a read that does not continue a recent run of fetches (a
    /// scattered read) fetches just the missing blocks it covers; one that does (a sequential
    /// read) fetches aligned windows, growing once the run is long. Readers of a block that
    /// is being fetched wait for it to land (not for the whole fetch), and fail with the
    /// fetch's error if it fails first; fetches of different ranges of the layer run
    /// concurrently.
    ///
    /// `want` says why the block is wanted: a read (covering blocks up to the given end), or a
    /// download of the blocks up to the given end, which fetches the missing ones and no
    /// others, whatever the streams (it is no read, so it neither starts nor grows a stream).
    pub(crate) fn ensure_block(
        self: &Arc<Self>,
        f: &File,
        pblock: u64,
        block: &mut [u8],
        want: Want,
    ) -> Result<bool> {
        let bs = self.block_size();
        let at = |p: u64| HEADER_SIZE as u64 + p * bs;
        let fetch = &self.fetch;
        // The hashes of this block and of the rest of the read (or of its first window): this
        // block's must be there, the others are best effort. A fetch stops at the first block
        // whose hash is not known (see `missing_run`), so read-ahead past the chunks loaded
        // waits for the next read, or for the background load of the rest of the hash table
        // that follows the open (`load_hashes_in_background`).
        let reach = match want {
            Want::Exact(end) => end,
            Want::Read(end) => end.max(pblock + fetch.windows.first),
        };
        if let Some(t) = self.hashes.chunked()
            && !t.is_loaded(t.chunk_of(pblock))
        {
            let (Want::Read(own) | Want::Exact(own)) = want;
            self.load_chunk_with_blocks(f, t, pblock, own.max(pblock + 1))?;
        }
        self.load_hashes(pblock, reach.max(pblock + 1))?;
        let mut state = fetch.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut started: Option<u64> = None; // a fetch this reader started on another thread
        let mut waited = false; // for a fetch of pblock (then it was not local: a miss)
        loop {
            // Wait for the fetch that has pblock in flight, if any; fail with it if it failed.
            waited |= state.is_in_flight(pblock);
            let failure;
            (state, failure) = fetch.wait_landed(state, pblock);
            if let Some(e) = failure {
                return Err(Error::io("fetch", &self.path)(std::io::Error::other(e)));
            }
            if self.is_verified(pblock) {
                drop(state);
                // Fetched, checked and written by another reader or thread.
                read_exact_at(f, block, at(pblock), &self.path)?;
                return Ok(!waited);
            }
            if let Some(id) = started.take()
                && let Some(e) = state.take_failure(id)
            {
                return Err(Error::io("fetch", &self.path)(std::io::Error::other(e)));
            }
            let (window, gap) = match want {
                Want::Exact(end) => (end.saturating_sub(pblock).max(1), None),
                Want::Read(end) => {
                    let own = end.saturating_sub(pblock).max(1);
                    // Not the fetches whose blocks left to land are all verified: they have
                    // landed but for the bookkeeping (a fetch marks its blocks verified before
                    // it records them landed), so a lone sequential reader that has read
                    // them is not past a fetch in flight (a deep queue).
                    let live: Vec<(u64, u64, u64)> = state
                        .in_flight
                        .iter()
                        .filter(|&&(_, next, end)| !(next..end).all(|q| self.is_verified(q)))
                        .copied()
                        .collect();
                    state.streams.window_for(&fetch.windows, pblock, own, &live)
                }
            };
            drop(state);
            // A block in a hole of the sparse local file was never fetched: skip reading and
            // hashing it. Otherwise it may be local already (fetched before a restart).
            if self.hole_end(f, pblock) == pblock && self.check_local(f, pblock, block)? {
                return Ok(!waited);
            }
            let visible_only = matches!(want, Want::Read(_));
            let candidates = self.missing_run(f, pblock, window, visible_only)?;
            // Claim [pblock, pblock + count), the blocks of the run that nobody fetched or
            // claimed meanwhile, unless another reader claimed pblock itself.
            state = fetch.state.lock().unwrap_or_else(|p| p.into_inner());
            if state.is_in_flight(pblock) {
                continue;
            }
            let mut count = 1;
            while count < candidates {
                let p = pblock + count;
                if self.is_verified(p) || state.is_in_flight(p) {
                    break;
                }
                count += 1;
            }
            // A deep-queue reader's blocks between the fetch in flight and pblock: other reads
            // will ask for them any moment; take those that are still missing into this fetch.
            let mut first = pblock;
            if let Some(from) = gap {
                let hole_from = self.hole_start(f, pblock).max(from);
                while first > hole_from
                    && self.is_visible(first - 1)
                    && self.hash_known(first - 1)
                    && !self.is_verified(first - 1)
                    && !state.is_in_flight(first - 1)
                {
                    first -= 1;
                }
            }
            let id = state.next_claim;
            state.next_claim += 1;
            state.in_flight.push((id, first, pblock + count));
            if let Want::Read(_) = want {
                state.streams.record(first, pblock + count - first, window);
            }
            drop(state);
            let end = pblock + count;
            let pipeline = gap.map(|_| first + (end - first) / 4);
            // A fetch that reads ahead of what this read needs runs on its own thread: this
            // reader waits only for its own blocks (the loop above), not for the read-ahead.
            let need = match want {
                Want::Read(e) => e.max(pblock + 1),
                Want::Exact(_) => end,
            };
            if end > need
                && let Some(background) = &fetch.background
            {
                let (layer, me) = (self.clone(), std::thread::current().id());
                let spawned = background.spawn(move || {
                    let fetch = &layer.fetch;
                    let mut claim = Claim::new(fetch, id, pipeline);
                    claim.starter = Some((me, pblock));
                    let mut scratch = vec![0u8; layer.block_size() as usize];
                    let done = layer.file.get(&layer.path).and_then(|f| {
                        layer.fetch_claimed(
                            &f,
                            fetch,
                            &claim,
                            first,
                            end - first,
                            pblock,
                            &mut scratch,
                            visible_only,
                        )
                    });
                    if let Err(e) = done {
                        claim.fail(&e.to_string());
                    }
                });
                if spawned {
                    started = Some(id);
                    state = fetch.state.lock().unwrap_or_else(|p| p.into_inner());
                    continue;
                }
                // No thread to be had: fetch right here. The claim is still ours.
            }
            let claim = Claim::new(fetch, id, pipeline);
            self.fetch_claimed(f, fetch, &claim, first, end - first, pblock, block, visible_only)?;
            return Ok(false);
        }
    }

    /// Starts the next fetch of a deep-queue stream at `from` on a thread of its own, as a read
    /// of block `from` would (so with the stream's window, and only if `from` is missing).
    fn fetch_next(self: &Arc<Self>, fetch: &Fetcher, from: u64) {
        if from >= self.trailer.block_count || self.is_verified(from) || !self.is_visible(from) {
            return;
        }
        let Some(background) = fetch.background.as_ref().filter(|b| !b.is_stopping()) else { return };
        let layer = self.clone();
        background.spawn(move || {
            let mut scratch = vec![0u8; layer.block_size() as usize];
            if let Ok(f) = layer.file.get(&layer.path) {
                let _ = layer.ensure_block(&f, from, &mut scratch, Want::Read(from + 1));
            }
        });
    }

    /// Fetches the claimed blocks `[first, first + count)` for block `target`, holding a lock
    /// on their range of the file against other processes on the same cache. If another process
    /// fetched part of it meanwhile (we waited for its lock, or the range is no longer all
    /// holes), looks again and fetches only what is still missing from `target` on.
    #[allow(clippy::too_many_arguments)]
    fn fetch_claimed(
        self: &Arc<Self>,
        f: &File,
        fetch: &Fetcher,
        claim: &Claim<'_>,
        first: u64,
        count: u64,
        target: u64,
        block: &mut [u8],
        visible_only: bool,
    ) -> Result<()> {
        let bs = self.block_size();
        let at = |p: u64| HEADER_SIZE as u64 + p * bs;
        let end = first + count;
        let writer = self.writer(fetch)?;
        let (lock, waited) =
            lock_range(fetch, writer, at(first), count * bs).map_err(Error::io("lock", &self.path))?;
        if waited || self.hole_end(f, first) < end {
            if self.hole_end(f, target) == target && self.check_local(f, target, block)? {
                return Ok(());
            }
            let run = self.missing_run(f, target, end - target, visible_only)?;
            claim.narrow(target, target + run);
            let done = self.fetch_into(fetch, claim, target, run, target, block);
            drop(lock);
            return done;
        }
        let done = self.fetch_into(fetch, claim, first, count, target, block);
        drop(lock);
        done
    }

    /// How many blocks from `pblock` on (which is missing) are missing from the local file, up
    /// to `want`: the run ends at a block that is verified or that holds its right bytes, at a
    /// block whose hash is not loaded (it could not be checked), and,
    /// with `visible_only`, at a block no open disk shows (no read will ask for it). Holes
    /// of the sparse file are found with one `SEEK_DATA` per hole, not per block.
    fn missing_run(&self, f: &File, pblock: u64, want: u64, visible_only: bool) -> Result<u64> {
        let bs = self.block_size();
        let end = (pblock + want).min(self.trailer.block_count);
        let mut hole_end = 0; // blocks before this are known holes
        let mut probe = Vec::new();
        let mut p = pblock + 1;
        while p < end {
            if self.is_verified(p) || !self.hash_known(p) || (visible_only && !self.is_visible(p)) {
                break;
            }
            if p >= hole_end {
                hole_end = self.hole_end(f, p);
            }
            if p >= hole_end {
                // Holds data: a block fetched before (by this process or an earlier one), or one
                // being written right now. Only a block matching its hash ends the run.
                probe.resize(bs as usize, 0);
                if self.check_local(f, p, &mut probe)? {
                    break;
                }
            }
            p += 1;
        }
        Ok(p - pblock)
    }

    /// The handle fetched blocks are written through (opened on first use).
    fn writer<'f>(&self, fetch: &'f Fetcher) -> Result<&'f File> {
        if let Some(w) = fetch.writer.get() {
            return Ok(w);
        }
        let w = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .map_err(Error::io("open", &self.path))?;
        Ok(fetch.writer.get_or_init(|| w))
    }

    /// The first block of the hole of the local file that block `pblock` lies in (`pblock`
    /// itself when it is not in a hole, or when the filesystem cannot tell). Steps back in
    /// doubling strides with `SEEK_DATA` (there is no backward seek).
    fn hole_start(&self, f: &File, pblock: u64) -> u64 {
        if self.hole_end(f, pblock) == pblock {
            return pblock;
        }
        let (mut lo, mut step) = (pblock, 1);
        while lo > 0 {
            let probe = lo.saturating_sub(step);
            if self.hole_end(f, probe) <= pblock {
                break; // data between probe and pblock: the hole starts after probe
            }
            lo = probe;
            step *= 2;
        }
        lo
    }

    /// The first block at or after `pblock` that is not wholly in a hole of the local file (the
    /// block count if none). `pblock` itself when the filesystem cannot tell.
    pub(crate) fn hole_end(&self, f: &File, pblock: u64) -> u64 {
        use rustix::fs::{SeekFrom, seek};
        let bs = self.block_size();
        let start = HEADER_SIZE as u64 + pblock * bs;
        match seek(f, SeekFrom::Data(start)) {
            Ok(data) => pblock + (data - start) / bs,
            Err(rustix::io::Errno::NXIO) => self.trailer.block_count,
            Err(_) => pblock,
        }
    }

    /// Fetches blocks `[first, first + count)` (claimed by `claim`) in one streamed request;
    /// checks each block against its hash as it arrives, writes the good ones into the local
    /// file and marks them landed, so readers waiting for a block go on before the rest of the
    /// range is in. A block that fails its hash ends the fetch (it and the blocks after it are
    /// not cached). Fills `block` with block `target`; fails only if `target` did not land.
    fn fetch_into(
        self: &Arc<Self>,
        fetch: &Fetcher,
        claim: &Claim<'_>,
        first: u64,
        count: u64,
        target: u64,
        block: &mut [u8],
    ) -> Result<()> {
        let bs = self.block_size();
        let offset = HEADER_SIZE as u64 + first * bs;
        let mut lander = Lander::new(self, fetch, claim, first, count)?;
        lander.target = Some((target, block));
        let result = match &fetch.reuse {
            Some(index) => self.fetch_reusing(index, fetch, &mut lander),
            None => fetch
                .source
                .read_range(&self.digest, offset, count * bs, &mut |piece: &[u8]| lander.feed(piece)),
        };
        let (next, failure) = (lander.next, lander.failure.take());
        let landed = next - first;
        if let Err(e) = &result {
            tracing::error!(layer = %self.digest, offset, len = count * bs, landed, error = %e, "fetching blocks failed");
        }
        // The readers waiting for blocks that did not land fail with this fetch.
        match (&failure, &result) {
            (Some(e), _) => claim.fail(&e.to_string()),
            (None, Err(e)) => claim.fail(&e.to_string()),
            (None, Ok(())) => {}
        }
        if next > target {
            return Ok(());
        }
        if let Some(e) = failure {
            return Err(e);
        }
        Err(Error::io("fetch", &self.path)(result.err().unwrap_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the source ended before the block read")
        })))
    }

    /// Lands the blocks of `lander`'s range in order, as [`PartialLayer::fetch_into`] would, but
    /// copies each block that another local layer of the store holds from there (see
    /// `BlockIndex::copy`; it lands like a fetched block, checked the same way) and fetches only
    /// the runs between such blocks, one request per run. Stops at the first block that does
    /// not land; an error is the failed request's.
    fn fetch_reusing(
        &self,
        index: &BlockIndex,
        fetch: &Fetcher,
        lander: &mut Lander<'_, '_>,
    ) -> std::io::Result<()> {
        let bs = self.block_size();
        let mut local = vec![0u8; bs as usize];
        while lander.next < lander.end && lander.failure.is_none() {
            let p = lander.next;
            if index.copy(self, p, &mut local).is_some() {
                if !self.land_reused(index, lander, &local) {
                    break;
                }
                continue;
            }
            let mut q = p + 1;
            while q < lander.end && !index.has_candidate(self, q) {
                q += 1;
            }
            let offset = HEADER_SIZE as u64 + p * bs;
            fetch
                .source
                .read_range(&self.digest, offset, (q - p) * bs, &mut |piece: &[u8]| lander.feed(piece))?;
            if lander.next < q {
                break;
            }
        }
        Ok(())
    }

    /// Copies the first blocks of `lander`'s range that other local layers of the store hold
    /// (see [`PartialLayer::fetch_reusing`]), landing them; the rest is left to fetch.
    fn reuse_prefix(&self, index: &BlockIndex, lander: &mut Lander<'_, '_>) {
        let bs = self.block_size();
        let mut local = vec![0u8; bs as usize];
        while lander.next < lander.end && lander.failure.is_none() {
            if index.copy(self, lander.next, &mut local).is_none() || !self.land_reused(index, lander, &local)
            {
                break;
            }
        }
    }

    /// Lands `block`, a checked copy of `lander`'s next block from another local layer, like a
    /// fetched block, counting it as reused (before it lands, so that a reader it wakes sees
    /// the count); false if it did not land.
    fn land_reused(&self, index: &BlockIndex, lander: &mut Lander<'_, '_>, block: &[u8]) -> bool {
        let p = lander.next;
        index.count_reused(block.len() as u64, 1);
        if lander.feed(block) && lander.next > p {
            return true;
        }
        index.count_reused(block.len() as u64, -1);
        false
    }

    /// Makes the stored blocks of `runs` (first block, count) local and checked, fetching what
    /// a partial layer lacks of them in one request for all (where the source can), and
    /// nothing else: for prefetching blocks known to be needed, such as a boot trace's. Blocks
    /// being fetched by someone else (this process or another) are left to that fetch. Best
    /// effort: what fails is fetched again when it is read.
    pub fn fetch_runs(self: &Arc<Self>, runs: &[(u64, u64)]) -> Result<()> {
        let fetch = &self.fetch;
        let f = self.file.get(&self.path)?;
        let bs = self.block_size();
        let at = |p: u64| HEADER_SIZE as u64 + p * bs;
        let mut probe = vec![0u8; bs as usize];
        // The hashes of the runs' blocks first, all missing chunks in one request; a block whose
        // hash could not be had is left for its read to try again.
        if let Some(t) = self.hashes.chunked() {
            let mut want: Vec<usize> = runs
                .iter()
                .filter(|&&(p, n)| n > 0 && p < self.trailer.block_count)
                .flat_map(|&(p, n)| t.chunk_of(p)..=t.chunk_of((p + n).min(self.trailer.block_count) - 1))
                .filter(|&c| !t.is_loaded(c))
                .collect();
            want.sort_unstable();
            want.dedup();
            for (c, why) in self.load_chunks(t, &want, false) {
                tracing::warn!(layer = %self.digest, chunk = c, error = %why, "prefetch: hash chunk not loaded");
            }
        }
        // The missing sub-runs (a block already local, from before a restart, is kept).
        let mut missing: Vec<(u64, u64)> = Vec::new();
        for &(p, n) in runs {
            let end = (p + n).min(self.trailer.block_count);
            let mut q = p;
            while q < end {
                if self.is_verified(q) || !self.hash_known(q) {
                    q += 1;
                    continue;
                }
                if self.hole_end(&f, q) == q && self.check_local(&f, q, &mut probe)? {
                    q += 1;
                    continue;
                }
                let len = self.missing_run(&f, q, end - q, false)?;
                missing.push((q, len));
                q += len;
            }
        }
        // Claim them, less what is in flight; with block reuse, a claim starts a new run before a
        // block another local layer holds (after one it does not), so that what each claim can
        // reuse is its first blocks (see `reuse_prefix`). (The index is built before the state
        // is locked: building reads files.)
        let reuse = fetch.reuse.as_deref().filter(|index| {
            index.ensure_built();
            index.may_hold_blocks_of(self)
        });
        let starts_reuse =
            |e: u64| reuse.is_some_and(|i| i.has_candidate(self, e) && !i.has_candidate(self, e - 1));
        let mut claims: Vec<(Claim<'_>, u64, u64)> = Vec::new();
        {
            let mut state = fetch.state.lock().unwrap_or_else(|p| p.into_inner());
            for (p, n) in missing {
                let mut q = p;
                while q < p + n {
                    if state.is_in_flight(q) || self.is_verified(q) {
                        q += 1;
                        continue;
                    }
                    let mut e = q + 1;
                    while e < p + n && !state.is_in_flight(e) && !self.is_verified(e) && !starts_reuse(e) {
                        e += 1;
                    }
                    let id = state.next_claim;
                    state.next_claim += 1;
                    state.in_flight.push((id, q, e));
                    claims.push((Claim::new(fetch, id, None), q, e - q));
                    q = e;
                }
            }
        }
        // And lock them against other processes; a range one of them holds is theirs to fetch.
        let writer = self.writer(fetch)?;
        let mut locks = Vec::new();
        claims.retain(|(_, first, count)| match try_lock_range(fetch, writer, at(*first), count * bs) {
            Some(l) => {
                locks.push(l);
                true
            }
            None => false,
        });
        if claims.is_empty() {
            return Ok(());
        }
        let mut landers = Vec::with_capacity(claims.len());
        for (claim, first, count) in &claims {
            landers.push(Lander::new(self, fetch, claim, *first, *count)?);
        }
        if let Some(index) = reuse {
            for l in &mut landers {
                self.reuse_prefix(index, l);
            }
        }
        // What is left of each claim, in one request.
        let live: Vec<usize> = (0..landers.len()).filter(|&i| landers[i].next < landers[i].end).collect();
        let ranges: Vec<(u64, u64)> =
            live.iter().map(|&i| (at(landers[i].next), (landers[i].end - landers[i].next) * bs)).collect();
        if ranges.is_empty() {
            return Ok(());
        }
        // A range that goes wrong (a bad block) ends alone; the others go on.
        let result = fetch.source.read_ranges(&self.digest, &ranges, &mut |i, piece: &[u8]| {
            let l = &mut landers[live[i]];
            if l.failure.is_none() && l.next < l.end {
                l.feed(piece);
            }
            true
        });
        if let Err(e) = &result {
            tracing::warn!(layer = %self.digest, runs = ranges.len(), error = %e, "prefetching blocks failed");
            for (claim, _, _) in &claims {
                claim.fail(&e.to_string());
            }
        }
        drop(landers);
        drop(locks);
        Ok(())
    }

    /// Makes every stored block local and checked (fetching what a partial layer lacks), in
    /// order, until done or `stop` is set. Afterwards a partial layer's file is complete (see
    /// `LayerStore::complete_partial`).
    pub fn fetch_all(self: &Arc<Self>, stop: &std::sync::atomic::AtomicBool) -> Result<()> {
        let f = self.file.get(&self.path)?;
        let mut block = vec![0u8; self.block_size() as usize];
        // The hash chunks still missing, in one request (a chunk that fails fails the blocks
        // under it below, when their hashes are loaded again).
        if let Some(t) = self.hashes.chunked() {
            for (c, why) in self.load_chunks(t, &t.missing(), false) {
                tracing::warn!(layer = %self.digest, chunk = c, error = %why, "hash chunk not loaded");
            }
        }
        // Hidden blocks too, so exact ranges rather than reads; as large as read-ahead allows.
        let chunk = self.fetch.windows.max.max(self.fetch.windows.first);
        for pb in 0..self.trailer.block_count {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            if !self.is_verified(pb) {
                let end = (pb + chunk).min(self.trailer.block_count);
                self.ensure_block(&f, pb, &mut block, Want::Exact(end))?;
            }
        }
        Ok(())
    }

    /// Makes the hashes of stored blocks `[first, end)` known where it can, fetching the hash
    /// table chunks that hold them and are not loaded (one request for all; see
    /// [`PartialLayer::load_chunks`]). Fails if the hash of `first` is still not known (its
    /// chunk could not be fetched or did not match its digest); the others are best effort.
    /// Nothing to do for a layer with its whole hash table.
    pub(crate) fn load_hashes(&self, first: u64, end: u64) -> Result<()> {
        let Some(t) = self.hashes.chunked() else { return Ok(()) };
        let end = end.min(self.trailer.block_count);
        if first >= end {
            return Ok(());
        }
        let (c0, c1) = (t.chunk_of(first), t.chunk_of(end - 1));
        let want: Vec<usize> = (c0..=c1).filter(|&c| !t.is_loaded(c)).collect();
        let failed = if want.is_empty() { Vec::new() } else { self.load_chunks(t, &want, false) };
        if t.is_loaded(c0) {
            return Ok(());
        }
        let why = failed
            .into_iter()
            .find(|f| f.0 == c0)
            .map_or_else(|| "it was not loaded".to_string(), |(_, why)| why);
        tracing::error!(layer = %self.digest, chunk = c0, error = %why, "hash table chunk not available");
        Err(Error::HashChunk { path: self.path.clone(), chunk: c0, why })
    }

    /// For a read of `pblock` (and the blocks up to `end`) whose hash chunk is not loaded: the
    /// chunk and the read's first blocks in one request, so that such a first read costs one
    /// round trip, not two. The chunk is checked against its digest as it arrives (a bad one
    /// ends the request and fails the read, nothing kept); the blocks are checked against their
    /// hashes in it once they are in, and the good ones are written and marked verified before
    /// the chunk is written and loaded (so no other reader of this process fetches them
    /// meanwhile: readers of the chunk wait for its lock). Only the read's own blocks from
    /// `pblock` on that are in a hole of the local file and whose hashes the chunk holds, at
    /// most the largest window, are asked for (no read-ahead: that waits for the chunks); a
    /// block that does not arrive or does not match is left to the read's usual fetch.
    fn load_chunk_with_blocks(
        &self,
        f: &File,
        t: &crate::chunks::ChunkedHashes,
        pblock: u64,
        end: u64,
    ) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let c = t.chunk_of(pblock);
        let _guard = t.loading[c].lock().unwrap_or_else(|p| p.into_inner());
        if t.is_loaded(c) {
            return Ok(());
        }
        let (chunk_at, chunk_len) = t.file_range(c);
        let mut chunk = vec![0u8; chunk_len as usize];
        if read_exact_at(f, &mut chunk, chunk_at, &self.path).is_ok() && t.install(c, &chunk) {
            return Ok(()); // another process (or this one, before a restart) fetched it
        }
        let bs = self.block_size();
        let limit = end
            .min(pblock + self.fetch.windows.max.max(1))
            .min(t.first_block(c + 1))
            .min(self.trailer.block_count);
        // (None when another local layer might hold them: they are looked for once the chunk,
        // and so their hashes, are in; see `reuse`.)
        let reusable = self.fetch.reuse.as_ref().is_some_and(|index| index.may_hold_blocks_of(self));
        let count = if reusable { 0 } else { self.hole_end(f, pblock).min(limit).saturating_sub(pblock) };
        let mut ranges = vec![(chunk_at, chunk_len)];
        if count > 0 {
            ranges.push((HEADER_SIZE as u64 + pblock * bs, count * bs));
        }
        chunk.clear();
        let mut blocks = Vec::with_capacity((count * bs) as usize);
        let mut bad_chunk = false;
        let result = self.fetch.source.read_ranges(&self.digest, &ranges, &mut |i, piece: &[u8]| {
            let (buf, want) = if i == 0 { (&mut chunk, chunk_len) } else { (&mut blocks, count * bs) };
            let n = piece.len().min((want as usize).saturating_sub(buf.len()));
            buf.extend_from_slice(&piece[..n]);
            if i == 0 && chunk.len() as u64 == chunk_len && !t.matches(c, &chunk) {
                bad_chunk = true;
                return false; // no use for the blocks
            }
            true
        });
        let fail = |why: String| {
            tracing::error!(layer = %self.digest, chunk = c, error = %why, "hash table chunk not available");
            Err(Error::HashChunk { path: self.path.clone(), chunk: c, why })
        };
        if bad_chunk {
            return fail("the fetched chunk does not match its digest".into());
        }
        if chunk.len() as u64 != chunk_len {
            return fail(match result {
                Err(e) => e.to_string(),
                Ok(()) => "the source ended before the chunk".into(),
            });
        }
        // The chunk is good: land the blocks that match, then the chunk.
        let hashes = t.hashes_in(c, &chunk);
        let first = t.first_block(c);
        let writer = self.writer(&self.fetch)?;
        for (k, block) in blocks.chunks_exact(bs as usize).enumerate() {
            let p = pblock + k as u64;
            let good =
                hashes.get((p - first) as usize).is_some_and(|h| self.header.block_hash.of(block) == *h);
            if !good {
                tracing::error!(layer = %self.digest, pblock = p, "fetched block fails its checksum: not cached");
                break;
            }
            if !self.is_verified(p) {
                self.reserve(p..p + 1);
                let landing = self.landing();
                let written = writer.write_all_at(block, HEADER_SIZE as u64 + p * bs);
                if written.is_ok() {
                    self.mark_verified(p);
                }
                drop(landing);
                self.reserved_done(p..p + 1);
                written.map_err(Error::io("write", &self.path))?;
            }
        }
        writer.write_all_at(&chunk, chunk_at).map_err(Error::io("write", &self.path))?;
        t.install(c, &chunk);
        Ok(())
    }

    /// Loads the hash table chunks `chunks` (ascending, none loaded yet, as far as the caller
    /// saw): each from the local file if its bytes there match its digest (another process, or
    /// this one before a restart, fetched it), else fetched from the source, all of those in one
    /// request. A fetched chunk is checked against its digest, written into the local file, and
    /// only then usable; one that does not match is neither. Readers of one chunk wait for one
    /// load (the chunk's lock, taken in ascending order, each released as soon as its chunk is
    /// in). With `background`, chunks a reader is loading are left to it, and no lock is held:
    /// a reader that needs a chunk the background request has not delivered yet fetches it
    /// itself rather than wait for the request to get there (the first copy to land is kept;
    /// both are the same checked bytes). Returns the chunks that failed, and why.
    pub(crate) fn load_chunks(
        &self,
        t: &crate::chunks::ChunkedHashes,
        chunks: &[usize],
        background: bool,
    ) -> Vec<(usize, String)> {
        let mut failed = Vec::new();
        let mut held = Vec::with_capacity(chunks.len());
        for &c in chunks {
            let guard = if background {
                // Not held: a reader must never wait for the background request to reach its
                // chunk (it fetches the chunk itself; the first copy to land is kept).
                match t.loading[c].try_lock() {
                    Ok(_) | Err(std::sync::TryLockError::Poisoned(_)) => None,
                    Err(std::sync::TryLockError::WouldBlock) => continue, // a reader has it
                }
            } else {
                Some(t.loading[c].lock().unwrap_or_else(|p| p.into_inner()))
            };
            if !t.is_loaded(c) {
                held.push((c, guard));
            }
        }
        if held.is_empty() {
            return failed;
        }
        // Present locally already?
        if let Ok(f) = self.file.get(&self.path) {
            let mut bytes = Vec::new();
            held.retain(|&(c, _)| {
                let (at, len) = t.file_range(c);
                bytes.resize(len as usize, 0);
                !(read_exact_at(&f, &mut bytes, at, &self.path).is_ok() && t.install(c, &bytes))
            });
        }
        if held.is_empty() {
            return failed;
        }
        let writer = match self.writer(&self.fetch) {
            Ok(w) => w,
            Err(e) => return held.iter().map(|&(c, _)| (c, e.to_string())).collect(),
        };
        let ranges: Vec<(u64, u64)> = held.iter().map(|&(c, _)| t.file_range(c)).collect();
        let mut bufs: Vec<Vec<u8>> = vec![Vec::new(); held.len()];
        let (chunk_ids, mut guards): (Vec<usize>, Vec<_>) = held.into_iter().unzip();
        let mut done = vec![false; chunk_ids.len()];
        let result = self.fetch.source.read_ranges(&self.digest, &ranges, &mut |i, piece: &[u8]| {
            let want = ranges[i].1 as usize;
            if done[i] || bufs[i].len() + piece.len() > want {
                return true; // bytes past the range: the range fails below
            }
            bufs[i].extend_from_slice(piece);
            if bufs[i].len() == want {
                done[i] = true;
                let c = chunk_ids[i];
                use std::os::unix::fs::FileExt;
                if t.is_loaded(c) {
                    // A reader fetched it meanwhile (background only): nothing to do.
                } else if !t.matches(c, &bufs[i]) {
                    tracing::error!(layer = %self.digest, chunk = c, "fetched hash table chunk fails its digest: not cached");
                    failed.push((c, "the fetched chunk does not match its digest".to_string()));
                } else if let Err(e) = writer.write_all_at(&bufs[i], ranges[i].0) {
                    failed.push((c, format!("writing it: {e}")));
                } else {
                    t.install(c, &bufs[i]);
                }
                bufs[i] = Vec::new();
                guards[i] = None; // its readers go on
            }
            true
        });
        let why = match result {
            Err(e) => e.to_string(),
            Ok(()) => "the source ended before the chunk".to_string(),
        };
        for (i, &c) in chunk_ids.iter().enumerate() {
            if !done[i] {
                failed.push((c, why.clone()));
            }
        }
        failed
    }

    /// Loads the hash table chunks not loaded yet on one of the engine's background threads, in
    /// one request (see [`PartialLayer::load_chunks`]), so that only the first reads of a lazily
    /// pulled layer wait for a chunk. The request starts once the layer's first fetched blocks
    /// have landed (or [`HASHES_AFTER`] after the open, if nothing is read): on a slow link it
    /// would otherwise share the link with the first read, which carries its own chunk. Nothing
    /// when the layer has them all or has no background threads. A failure is only logged: a
    /// read that needs the chunk loads it again.
    pub(crate) fn load_hashes_in_background(self: &Arc<Self>) {
        let Some(t) = self.hashes.chunked() else { return };
        if t.all_loaded() {
            return;
        }
        let Some(background) = self.fetch.background.as_ref().filter(|b| !b.is_stopping()) else { return };
        let layer = self.clone();
        background.spawn(move || {
            let Some(t) = layer.hashes.chunked() else { return };
            let since = std::time::Instant::now();
            while since.elapsed() < HASHES_AFTER {
                let landed = layer.fetch.state.lock().unwrap_or_else(|p| p.into_inner()).landed_any;
                if landed || layer.fetch.background.as_ref().is_some_and(|b| b.is_stopping()) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            for (c, why) in layer.load_chunks(t, &t.missing(), true) {
                tracing::debug!(layer = %layer.digest, chunk = c, error = %why, "background: hash chunk not loaded");
            }
        });
    }

    /// Records that an open disk shows stored blocks `[pblock, pblock + count)`.
    pub(crate) fn mark_visible(&self, pblock: u64, count: u64) {
        self.visible.set_range(pblock, (pblock + count).min(self.trailer.block_count));
    }

    fn is_visible(&self, pblock: u64) -> bool {
        self.visible.get(pblock)
    }
}
