//! A disk: a stack of sealed layers plus its writable top, described by `disk.json` in the
//! disk's directory. This is what front ends (CLI, NBD) read and write.
//!
//! Owns: creating and opening disk directories (manifest, top files, locks), and the byte-level
//! read, write, zero, discard, flush and block-status paths. Every path that reads a range
//! walks it as [`Segments`]: pieces that one place holds (the top, a sealed layer, zeros, a
//! hole), each resolved with one lookup in the top and one in the stack's flattened map. Does not own: the on-disk layouts
//! (`mcow-format`), whole-disk operations such as seal or import (see `ops`).

use std::fs::{self, File, OpenOptions as FsOpen};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use mcow_format::{Digest, DiskManifest, ExtentKind, chain_digest, frozen_placeholder};

use crate::context::Engine;
use crate::error::{Error, Result};
use crate::extent_map::{Loc, TOP};
use crate::fetch::{BlockSource, FetchPolicy};
use crate::layer::{CacheReads, ReadTally};
use crate::mapped::MappedStorage;
use crate::stack::{Stack, next_chain};
use crate::storage::{FileStorage, Storage};
use crate::store::{LayerStore, OpenLayer, write_atomic};
use crate::top::{
    Debris, JournalFiles, PendingLogs, TopLayer, journal_path, journal_temp_path, pending_log_path,
};

/// Name of the manifest inside a disk directory.
pub const MANIFEST_FILE: &str = "disk.json";

/// How to open a disk.
#[derive(Debug, Clone, Copy)]
pub struct OpenOptions {
    /// Refuse writes; take a shared lock instead of an exclusive one.
    pub read_only: bool,
    /// Check each sealed block against its hash the first time it is read.
    pub verify: bool,
    /// Open read-only even while a writer holds the disk (like `qemu-img -U`).
    pub force_share: bool,
}

impl Default for OpenOptions {
    /// Read-write, every sealed block verified at its first read, exclusive.
    fn default() -> Self {
        OpenOptions { read_only: false, verify: true, force_share: false }
    }
}

/// What a run of the disk is, for block status and `map`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    /// Reads as stored data.
    Data,
    /// Reads as zeros, allocated in some layer.
    Zero,
    /// Reads as zeros, not allocated (never written, or discarded).
    Hole,
}

/// A run of bytes and where it comes from. `layer` is `Some(i)` for the `i`th sealed layer from
/// the bottom, `Some(TOP)` for the writable top, `None` where no layer holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Where the run starts on the disk, in bytes.
    pub offset: u64,
    /// Its length in bytes.
    pub length: u64,
    /// What it reads as.
    pub kind: RunKind,
    /// The layer that says so (see above).
    pub layer: Option<u32>,
}

/// One piece of a disk range that one place holds, as [`Disk::segments`] yields them: the unit
/// that reads, mapped reads, prefetch and block status all work on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Where the piece starts on the disk, in bytes.
    pub offset: u64,
    /// Its length in bytes.
    pub len: u64,
    /// The virtual block the piece starts in.
    pub vblock: u64,
    /// How many bytes into that block it starts.
    pub within: u64,
    /// What holds it.
    pub holder: Holder,
}

/// What holds a [`Segment`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// Data in the writable top.
    Top,
    /// Data in a sealed layer: `loc.layer` (from the bottom), the piece's first block at
    /// physical block `loc.pblock`.
    Layer(Loc),
    /// Zeros recorded in `layer` (a sealed layer's index, or [`TOP`]).
    Zero {
        /// The layer that records them.
        layer: u32,
    },
    /// Zeros that nothing stores: discarded in `layer`, or never written (`None`).
    Hole {
        /// The layer that discarded them, if any.
        layer: Option<u32>,
    },
}

impl Segment {
    /// The virtual blocks the piece touches, from its first.
    pub fn blocks(&self, block_size: u64) -> u64 {
        (self.offset + self.len).div_ceil(block_size) - self.vblock
    }
}

/// The segments of a disk range, in order (see [`Disk::segments`]).
pub struct Segments<'a> {
    disk: &'a Disk,
    view: Arc<View>,
    pos: u64,
    end: u64,
}

impl Segments<'_> {
    /// Goes back to the start of `seg`, to resolve it again (the top changed under a read).
    pub fn again(&mut self, seg: &Segment) {
        self.pos = seg.offset;
    }
}

impl Iterator for Segments<'_> {
    type Item = Segment;

    fn next(&mut self) -> Option<Segment> {
        if self.pos >= self.end {
            return None;
        }
        let bs = self.disk.bs;
        let (vblock, within) = (self.pos / bs, self.pos % bs);
        let (loc, run_end) = self.view.resolve(vblock, self.end.div_ceil(bs));
        let len = (run_end * bs).min(self.end) - self.pos;
        let holder = match loc {
            None => Holder::Hole { layer: None },
            Some(l) => match l.kind {
                ExtentKind::Data if l.layer == TOP => Holder::Top,
                ExtentKind::Data => Holder::Layer(l),
                ExtentKind::Zero => Holder::Zero { layer: l.layer },
                ExtentKind::Discarded => Holder::Hole { layer: Some(l.layer) },
            },
        };
        let seg = Segment { offset: self.pos, len, vblock, within, holder };
        self.pos += len;
        Some(seg)
    }
}

/// What [`Disk::fetch_rest`] did (each failure is also logged).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchRest {
    /// Partial layers fetched whole and moved to the complete layers.
    pub completed: usize,
    /// Partial layers whose download or completion failed (they stay partial).
    pub failed: usize,
    /// Whether `stop` ended it early.
    pub stopped: bool,
}

/// An open disk.
pub struct Disk {
    dir: PathBuf,
    store: LayerStore,
    /// What the disk is made of now; replaced whole by a snapshot and when a frozen top has
    /// been sealed. Every operation works on the view it loaded when it began.
    view: RwLock<Arc<View>>,
    size: u64,
    bs: u64,
    opts: OpenOptions,
    /// Held by a snapshot and by the sealing of a frozen top: one change of the view at a time.
    changing: Mutex<()>,
    /// How reads found the blocks of partial layers (see [`Disk::cache_reads`]).
    reads: ReadTally,
}

/// A disk's parts at one moment: its manifest, the stack of sealed layers, the tops that
/// snapshots froze and that are not sealed yet, and the writable top. Reads consult the top,
/// then the frozen tops newest first, then the stack.
pub struct View {
    /// The manifest as last written.
    pub manifest: DiskManifest,
    /// The sealed layers.
    pub stack: Arc<Stack>,
    /// Frozen tops, oldest first (as in the manifest).
    pub frozen: Vec<Arc<TopLayer>>,
    /// The writable top.
    pub top: Arc<TopLayer>,
}

impl View {
    /// The top and the frozen tops, in the order reads consult them.
    fn tops(&self) -> impl Iterator<Item = &Arc<TopLayer>> {
        std::iter::once(&self.top).chain(self.frozen.iter().rev())
    }

    /// Where block `vblock` lives and where that run ends (looking no further than `limit`):
    /// the top's map first, then each frozen top's (none but while a snapshot is sealed), then
    /// the stack's per-block table. Two lookups, whatever the depth.
    fn resolve(&self, vblock: u64, limit: u64) -> (Option<Loc>, u64) {
        let mut limit = limit;
        for top in self.tops() {
            match top.lookup(vblock) {
                Ok(e) => return (Some(e.loc), e.end.min(limit)),
                Err(next) => limit = next.unwrap_or(limit).min(limit),
            }
        }
        self.stack.lookup(vblock, limit)
    }

    /// Reads from the top (or frozen top) that holds `vblock` as data. False if none does any
    /// more (the caller resolves again).
    fn read_top(&self, vblock: u64, within: u64, out: &mut [u8]) -> Result<bool> {
        for top in self.tops() {
            match top.lookup(vblock) {
                Ok(e) if e.loc.kind == ExtentKind::Data => return top.read_data(vblock, within, out),
                Ok(_) => return Ok(false),
                Err(_) => {}
            }
        }
        Ok(false)
    }

    /// What block `vblock` reads as under the writable top (for a copy-up).
    fn read_below_top(&self, vblock: u64, buf: &mut [u8]) -> Result<()> {
        'again: loop {
            for top in self.frozen.iter().rev() {
                match top.lookup(vblock) {
                    Ok(e) if e.loc.kind == ExtentKind::Data => {
                        if top.read_data(vblock, 0, buf)? {
                            return Ok(());
                        }
                        continue 'again; // a write still in flight to it moved the block
                    }
                    Ok(_) => {
                        buf.fill(0);
                        return Ok(());
                    }
                    Err(_) => {}
                }
            }
            return self.stack.read_block(vblock, 0, buf);
        }
    }

    /// The parent a top above all of this view's tops records (FORMAT.md, "Parents of
    /// unsealed tops").
    fn parent_above_top(&self) -> Digest {
        next_chain(&self.top.header.parent, &frozen_placeholder(&self.top.header.instance))
    }
}

/// What [`Disk::snapshot`] did.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The frozen top (a file name in the disk directory), to be sealed by
    /// [`Disk::seal_frozen`].
    pub frozen: String,
    /// The new writable top.
    pub top: String,
    /// How long the call took (creating the new top and writing the manifest); writes go on
    /// meanwhile, to the old top, until the switch.
    pub took: Duration,
    /// How long the switch to the new top held the view locked (writes that began then waited
    /// that long at most).
    pub switch: Duration,
}

/// Parameters of a new disk.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// The disk's size in bytes (a multiple of 512).
    pub virtual_size: u64,
    /// The block size: a power of two from 4 KiB to 2 MiB ([`DEFAULT_BLOCK_SIZE`] is usual).
    pub block_size: u32,
    /// The layer store (created if missing).
    pub store: PathBuf,
    /// Sealed layers to start from, bottom first.
    pub layers: Vec<Digest>,
}

/// The default block size: 64 KiB.
pub const DEFAULT_BLOCK_SIZE: u32 = 64 * 1024;

impl CreateOptions {
    /// A disk of `virtual_size` bytes with its layers in `store`: [`DEFAULT_BLOCK_SIZE`]
    /// blocks, no sealed layers (set `layers` to start from some).
    pub fn new(virtual_size: u64, store: impl Into<PathBuf>) -> CreateOptions {
        CreateOptions {
            virtual_size,
            block_size: DEFAULT_BLOCK_SIZE,
            store: store.into(),
            layers: Vec::new(),
        }
    }
}

impl Disk {
    /// Creates a new disk directory with an empty top on `layers`. Cost is independent of the
    /// stack's depth: the layers are checked when the disk is opened.
    pub fn create(dir: &Path, opts: &CreateOptions) -> Result<()> {
        mcow_format::check_block_size(opts.block_size).map_err(Error::format(dir))?;
        mcow_format::check_virtual_size(opts.virtual_size).map_err(Error::format(dir))?;
        if dir.join(MANIFEST_FILE).exists() {
            return Err(Error::DiskExists { dir: dir.to_path_buf() });
        }
        fs::create_dir_all(dir).map_err(Error::io("create directory", dir))?;
        fs::create_dir_all(&opts.store).map_err(Error::io("create directory", &opts.store))?;
        let store = relative_path(&opts.store, dir)?;
        let top = "top-1.mcow".to_string();
        create_top(dir, &top, opts.block_size, opts.virtual_size, chain_digest(&opts.layers))?;
        let manifest =
            DiskManifest::new(opts.virtual_size, opts.block_size, store, opts.layers.clone(), Some(top));
        write_atomic(&dir.join(MANIFEST_FILE), manifest.to_json().as_bytes())
    }

    /// Opens a disk directory, in an engine of its own (see [`Disk::open_in`]).
    pub fn open(dir: &Path, opts: OpenOptions) -> Result<Disk> {
        Disk::open_in(&Engine::default(), dir, opts)
    }

    /// Opens a disk directory in `engine`: disks opened in one engine share its file pool, the
    /// layers they have in common and its background fetch threads.
    pub fn open_in(engine: &Engine, dir: &Path, opts: OpenOptions) -> Result<Disk> {
        let manifest = read_manifest(dir)?;
        let store = LayerStore::in_engine(engine, resolve_store(dir, &manifest));
        Self::open_store(dir, opts, manifest, store)
    }

    /// Opens a disk whose layers may be partial, fetching missing blocks from `source` as
    /// `policy` says, in an engine of its own (see [`Disk::open_with_source_in`]).
    pub fn open_with_source(
        dir: &Path,
        opts: OpenOptions,
        source: Arc<dyn BlockSource>,
        policy: FetchPolicy,
    ) -> Result<Disk> {
        Disk::open_with_source_in(&Engine::default(), dir, opts, source, policy)
    }

    /// [`Disk::open_with_source`] in `engine` (see [`Disk::open_in`]).
    pub fn open_with_source_in(
        engine: &Engine,
        dir: &Path,
        opts: OpenOptions,
        source: Arc<dyn BlockSource>,
        policy: FetchPolicy,
    ) -> Result<Disk> {
        let manifest = read_manifest(dir)?;
        let store = LayerStore::in_engine(engine, resolve_store(dir, &manifest)).with_source(source, policy);
        Self::open_store(dir, opts, manifest, store)
    }

    fn open_store(dir: &Path, opts: OpenOptions, manifest: DiskManifest, store: LayerStore) -> Result<Disk> {
        let stack =
            Stack::open(&store, &manifest.layers, manifest.virtual_size, manifest.block_size, opts.verify)?;
        let top_name = manifest.top.clone().ok_or_else(|| Error::NoTop { dir: dir.to_path_buf() })?;
        // The frozen tops, oldest first, then the top; each checked against the parent the tops
        // below it give it.
        let mut expected = manifest.top_base.unwrap_or_else(|| stack.chain());
        let mut frozen = Vec::with_capacity(manifest.frozen.len());
        for name in manifest.frozen.iter().chain(std::iter::once(&top_name)) {
            let top = open_top(&dir.join(name), opts)?;
            if top.header.parent != expected {
                return Err(Error::WrongParent {
                    path: top.path().to_path_buf(),
                    recorded: top.header.parent,
                    actual: expected,
                });
            }
            if top.header.block_size != manifest.block_size
                || top.header.virtual_size != manifest.virtual_size
            {
                return Err(Error::Mismatch {
                    path: top.path().to_path_buf(),
                    what: "block or virtual size",
                    found: top.header.virtual_size,
                    expected: manifest.virtual_size,
                });
            }
            expected = next_chain(&top.header.parent, &frozen_placeholder(&top.header.instance));
            frozen.push(Arc::new(top));
        }
        let top = frozen.pop().expect("the top was opened");
        if !opts.read_only {
            // The top is locked: no seal, commit or snapshot is under way here; what they left
            // is debris.
            for p in leftovers(dir, &manifest) {
                if fs::remove_file(&p).is_ok() {
                    tracing::info!(path = %p.display(), "removed a file left by an interrupted seal, commit or snapshot");
                }
            }
        }
        Ok(Disk {
            dir: dir.to_path_buf(),
            size: manifest.virtual_size,
            bs: u64::from(manifest.block_size),
            view: RwLock::new(Arc::new(View { manifest, stack: Arc::new(stack), frozen, top })),
            store,
            opts,
            changing: Mutex::new(()),
            reads: ReadTally::default(),
        })
    }

    /// The disk's parts as they are now (see [`View`]).
    pub fn view(&self) -> Arc<View> {
        self.view.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The disk's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The manifest (`disk.json`) as last written.
    pub fn manifest(&self) -> DiskManifest {
        self.view().manifest.clone()
    }
    /// The layer store the disk's sealed layers are in.
    pub fn store(&self) -> &LayerStore {
        &self.store
    }
    /// The engine the disk was opened in.
    pub fn engine(&self) -> &Engine {
        self.store.engine()
    }
    /// The sealed layers and their flattened map.
    pub fn stack(&self) -> Arc<Stack> {
        self.view().stack.clone()
    }
    /// The writable top.
    pub fn top(&self) -> Arc<TopLayer> {
        self.view().top.clone()
    }
    /// The sealed layer `i` (from the bottom) of the stack as it is now.
    pub fn layer(&self, i: usize) -> OpenLayer {
        self.stack().layers()[i].clone()
    }
    /// How many tops snapshots froze that are not sealed yet.
    pub fn frozen_tops(&self) -> usize {
        self.view().frozen.len()
    }
    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// The disk's block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.bs as u32
    }
    /// True if the disk was opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.opts.read_only
    }

    /// What the top's open found beyond its last flush (see [`Debris`]).
    pub fn debris(&self) -> Debris {
        self.view().top.debris()
    }

    /// Corruption of the top's journal that a read-only open found (see
    /// [`TopLayer::corruption`]); a writable open fails instead.
    pub fn journal_corruption(&self) -> Option<Error> {
        self.view().tops().find_map(|t| t.corruption())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(Error::OutOfRange { offset, len, size: self.size });
        }
        Ok(())
    }

    /// Where block `vblock` lives and where that run ends (looking no further than `limit`):
    /// the top's map first, then the stack's per-block table. Two lookups, whatever the depth
    /// (and one more for each frozen top while a snapshot is sealed).
    pub fn resolve(&self, vblock: u64, limit: u64) -> (Option<Loc>, u64) {
        self.view().resolve(vblock, limit)
    }

    /// The pieces of `[offset, offset+len)` and what holds each, in order: the top's map first,
    /// then the stack's per-block table (two lookups per piece, whatever the depth). Fails if
    /// the range reaches past the end of the disk.
    pub fn segments(&self, offset: u64, len: u64) -> Result<Segments<'_>> {
        self.check_range(offset, len)?;
        let view = self.view();
        // A force-share open first applies what a writer beside it has flushed since.
        for top in view.tops() {
            top.refresh()?;
        }
        Ok(Segments { disk: self, view, pos: offset, end: offset + len })
    }

    /// Before the first piece of a read that partial layers must fetch: fetches that piece and
    /// every later one of `[from, end)` that needs fetching at once, each on a thread of its
    /// own, so that a read spanning several layers (or several runs of one) costs one round
    /// trip to the origin rather than one per piece. Errors are left to the read, which makes
    /// each piece ready again in order and reports what still fails. Returns the offsets of the
    /// pieces it made ready: their blocks are counted (hits and misses) already.
    fn fetch_pieces_at_once(&self, from: u64, end: u64) -> Vec<u64> {
        let Ok(segments) = self.segments(from, end - from) else { return Vec::new() };
        let stack = segments.view.stack.clone();
        let todo: Vec<(Segment, Loc)> = segments
            .filter_map(|s| match s.holder {
                Holder::Layer(l) if stack.may_fetch(s.vblock, l, s.within, s.len) => Some((s, l)),
                _ => None,
            })
            .collect();
        if todo.len() < 2 {
            return Vec::new();
        }
        let ready = |(s, l): &(Segment, Loc)| {
            let _ = stack.ready_run(s.vblock, *l, s.within, s.len, Some(&self.reads));
        };
        std::thread::scope(|scope| {
            for piece in &todo[1..] {
                scope.spawn(move || ready(piece));
            }
            ready(&todo[0]);
        });
        todo.iter().map(|(s, _)| s.offset).collect()
    }

    /// How the reads of this disk since it was opened found the blocks of its partial layers:
    /// local (hits) or fetched (misses). Copy-ups for writes are not counted.
    pub fn cache_reads(&self) -> CacheReads {
        self.reads.get()
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset + buf.len() as u64;
        let mut segments = self.segments(offset, buf.len() as u64)?;
        let view = segments.view.clone();
        let mut fetched_at_once = false;
        let mut counted: Vec<u64> = Vec::new();
        while let Some(s) = segments.next() {
            let out = &mut buf[(s.offset - offset) as usize..][..s.len as usize];
            match s.holder {
                Holder::Top => {
                    if !view.read_top(s.vblock, s.within, out)? {
                        segments.again(&s); // the top changed under us: resolve again
                    }
                }
                Holder::Layer(l) => {
                    if !fetched_at_once && view.stack.may_fetch(s.vblock, l, s.within, s.len) {
                        fetched_at_once = true;
                        counted = self.fetch_pieces_at_once(s.offset, end);
                    }
                    let tally = (!counted.contains(&s.offset)).then_some(&self.reads);
                    view.stack.read_run(s.vblock, l, s.within, out, tally)?
                }
                Holder::Zero { .. } | Holder::Hole { .. } => out.fill(0),
            }
        }
        Ok(())
    }

    /// Hands the `len` bytes at `offset` to `send` as slices of the layers' maps (and of a
    /// static block of zeros), without copying them, once they are all local and checked.
    /// Returns false, without calling `send` (or fetching or counting anything), where that
    /// cannot be done (data in the writable top, a layer that is not mapped); [`Disk::read`]
    /// then does.
    pub fn read_mapped(&self, offset: u64, len: usize, send: &mut dyn FnMut(&[&[u8]])) -> Result<bool> {
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        let segments = self.segments(offset, len as u64)?;
        let view = segments.view.clone();
        let segments: Vec<Segment> = segments.collect();
        if segments.iter().any(|s| match s.holder {
            Holder::Top => true,
            Holder::Layer(l) => !view.stack.is_mapped(l),
            Holder::Zero { .. } | Holder::Hole { .. } => false,
        }) {
            return Ok(false);
        }
        let mut parts: Vec<&[u8]> = Vec::new();
        let mut fetched_at_once = false;
        let mut counted: Vec<u64> = Vec::new();
        for s in segments {
            match s.holder {
                Holder::Top => return Ok(false),
                Holder::Layer(l) => {
                    if !fetched_at_once && view.stack.may_fetch(s.vblock, l, s.within, s.len) {
                        fetched_at_once = true;
                        counted = self.fetch_pieces_at_once(s.offset, offset + len as u64);
                    }
                    let tally = (!counted.contains(&s.offset)).then_some(&self.reads);
                    match view.stack.mapped_run(s.vblock, l, s.within, s.len as usize, tally)? {
                        Some(slice) => parts.push(slice),
                        None => return Ok(false),
                    }
                }
                Holder::Zero { .. } | Holder::Hole { .. } => {
                    let mut left = s.len as usize;
                    while left > 0 {
                        let k = left.min(ZEROS.len());
                        parts.push(&ZEROS[..k]);
                        left -= k;
                    }
                }
            }
        }
        send(&parts);
        Ok(true)
    }

    /// Writes `data` at `offset`. The first write to a block copies it up into the top.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        if self.opts.read_only {
            return Err(Error::ReadOnly);
        }
        self.check_range(offset, data.len() as u64)?;
        let view = self.view();
        let below = |vblock: u64, buf: &mut [u8]| view.read_below_top(vblock, buf);
        view.top.write(offset / self.bs, (offset % self.bs) as usize, data, &below)
    }

    /// Makes `[offset, offset+len)` read as zeros. Whole blocks become markers (no data is
    /// stored): `Discarded` (a hole) if `may_trim`, else `Zero`; partial blocks at the edges
    /// are written with zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<()> {
        if self.opts.read_only {
            return Err(Error::ReadOnly);
        }
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        // A block counts as whole if the range covers it up to the end of the disk.
        let first_whole = offset.div_ceil(self.bs);
        let last_whole = if end == self.size { self.size.div_ceil(self.bs) } else { end / self.bs };
        if first_whole >= last_whole {
            return self.write_zero_bytes(offset, len);
        }
        let head_end = first_whole * self.bs;
        let tail_start = (last_whole * self.bs).min(self.size);
        self.write_zero_bytes(offset, head_end - offset)?;
        let kind = if may_trim { ExtentKind::Discarded } else { ExtentKind::Zero };
        self.view().top.set_marker(first_whole, last_whole, kind)?;
        self.write_zero_bytes(tail_start, end.max(tail_start) - tail_start)
    }

    fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<()> {
        if len > 0 {
            self.write(offset, &vec![0u8; len as usize])?;
        }
        Ok(())
    }

    /// Discards a range: it then reads as zeros and is reported as a hole.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true)
    }

    /// Makes the virtual blocks of `runs` (first block, count) local where partial sealed
    /// layers hold them, fetching and checking exactly those blocks without reading them out:
    /// each partial layer's missing blocks in one request where the source allows (see
    /// `SealedLayer::fetch_runs`). Blocks in the top, zero or already checked cost nothing.
    /// Best effort: what fails is fetched when it is read.
    pub fn prefetch_runs(&self, runs: &[(u64, u64)]) -> Result<()> {
        let blocks = self.size.div_ceil(self.bs);
        let stack = self.stack();
        let mut per_layer: Vec<Vec<(u64, u64)>> = vec![Vec::new(); stack.layers().len()];
        for &(vblock, count) in runs {
            let at = |b: u64| (b.min(blocks) * self.bs).min(self.size);
            let (start, end) = (at(vblock), at(vblock.saturating_add(count)));
            for s in self.segments(start, end - start)? {
                if let Holder::Layer(l) = s.holder {
                    per_layer[l.layer as usize].push((l.pblock, s.blocks(self.bs)));
                }
            }
        }
        for (layer, runs) in stack.layers().iter().zip(&per_layer) {
            if !runs.is_empty() && layer.is_partial() {
                layer.fetch_runs(runs)?;
            }
        }
        Ok(())
    }

    /// Downloads the rest of this disk: every block its partial layers lack (hidden ones too),
    /// layer by layer from the bottom, and moves each layer that is then whole into the store's
    /// complete layers. A layer whose download fails is logged and left partial (its reads still
    /// fetch what they need); the others go on. Returns between layers (or between fetches)
    /// once `stop` is set.
    pub fn fetch_rest(&self, stop: &std::sync::atomic::AtomicBool) -> FetchRest {
        use std::sync::atomic::Ordering;
        let mut done = FetchRest::default();
        let stack = self.stack();
        for layer in stack.layers().iter().filter(|l| l.is_partial()) {
            if let Err(e) = layer.fetch_all(stop) {
                tracing::warn!(layer = %layer.digest, error = %e, "background download failed");
                done.failed += 1;
                continue;
            }
            if stop.load(Ordering::Relaxed) {
                done.stopped = true;
                return done;
            }
            match self.store.complete_partial(&layer.digest) {
                Ok(true) => {
                    tracing::info!(layer = %layer.digest, "layer is complete");
                    done.completed += 1;
                }
                Ok(false) => {
                    tracing::warn!(layer = %layer.digest, "layer fetched but does not hash to its digest");
                    done.failed += 1;
                }
                Err(e) => {
                    tracing::warn!(layer = %layer.digest, error = %e, "completing the layer failed");
                    done.failed += 1;
                }
            }
        }
        done
    }

    /// Freezes the writable top and starts a new, empty one above it, without copying anything
    /// (FORMAT.md, "Snapshots of a running disk"): the new top is created and the manifest
    /// written while writes go on to the old top, then the disk switches to the new top at
    /// once. Writes completed before the switch are in the frozen top, which
    /// [`Disk::seal_frozen`] then seals into a layer; reads see the same disk throughout.
    pub fn snapshot(&self) -> Result<Snapshot> {
        if self.opts.read_only {
            return Err(Error::ReadOnly);
        }
        let started = Instant::now();
        let _changing = lock(&self.changing);
        let view = self.view();
        let old = view.manifest.top.clone().ok_or_else(|| Error::NoTop { dir: self.dir.clone() })?;
        let new = next_top_name(&old);
        let path = self.dir.join(&new);
        // On failure nothing of the new top may stay behind, unless the new manifest names it
        // (the rename went through and only the directory sync failed).
        let undo = |e: Error| {
            if read_manifest(&self.dir).ok().and_then(|m| m.top).as_deref() != Some(new.as_str()) {
                remove_top_files(&path);
                let _ = fs::remove_file(self.dir.join(MANIFEST_FILE).with_extension("tmp"));
            }
            e
        };
        create_top(&self.dir, &new, view.manifest.block_size, self.size, view.parent_above_top())
            .map_err(undo)?;
        let top = open_top(&path, self.opts).map_err(undo)?;
        let mut manifest = view.manifest.clone();
        manifest.frozen.push(old.clone());
        manifest.top = Some(new.clone());
        write_atomic(&self.dir.join(MANIFEST_FILE), manifest.to_json().as_bytes()).map_err(undo)?;
        let mut frozen = view.frozen.clone();
        frozen.push(view.top.clone());
        let next = Arc::new(View { manifest, stack: view.stack.clone(), frozen, top: Arc::new(top) });
        let switch_started = Instant::now();
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = next;
        let switch = switch_started.elapsed();
        tracing::info!(disk = %self.dir.display(), frozen = %old, top = %new, ?switch, "snapshot: top frozen");
        Ok(Snapshot { frozen: old, top: new, took: started.elapsed(), switch })
    }

    /// Seals the oldest frozen top into a layer on top of the stack, exactly as `seal` would
    /// seal it, and returns the layer's digest (None if no top is frozen): waits for writes
    /// still running on it to end, flushes it, writes the layer, opens the longer stack, writes
    /// the manifest (step 3 in FORMAT.md, "Snapshots of a running disk"), switches the disk to
    /// it and removes the frozen top's files. Reads and writes go on meanwhile.
    pub fn seal_frozen(&self, progress: crate::build::Progress) -> Result<Option<Digest>> {
        if self.opts.read_only {
            return Err(Error::ReadOnly);
        }
        let _changing = lock(&self.changing);
        let view = self.view();
        let Some(frozen) = view.frozen.first().cloned() else { return Ok(None) };
        let name = view.manifest.frozen[0].clone();
        // It is held by the view and here; any other holder is an older view that an operation
        // began with, and a write among them may still land in it. They end soon (a copy-up
        // waits at most for a fetch).
        while Arc::strong_count(&frozen) > 2 {
            std::thread::sleep(Duration::from_millis(1));
        }
        frozen.flush()?;
        let layers = view.manifest.layers.clone();
        let mut map = crate::extent_map::ExtentMap::new();
        for e in frozen.extents() {
            map.insert(e.start, e.end, e.loc);
        }
        let read = |vblock: u64, _: Loc, buf: &mut [u8]| -> Result<()> {
            if frozen.read_data(vblock, 0, buf)? {
                return Ok(());
            }
            Err(Error::Invalid("a frozen top changed while it was sealed".into()))
        };
        let parent = chain_digest(&layers);
        let digest = crate::build::write_layer(
            &self.store,
            &view.manifest,
            &map,
            parent,
            layers.is_empty(),
            &read,
            progress,
        )?;
        let mut manifest = view.manifest.clone();
        manifest.layers.push(digest);
        manifest.frozen.remove(0);
        manifest.top_base =
            Some(next_chain(&frozen.header.parent, &frozen_placeholder(&frozen.header.instance)));
        let stack = Stack::open(
            &self.store,
            &manifest.layers,
            manifest.virtual_size,
            manifest.block_size,
            self.opts.verify,
        )?;
        write_atomic(&self.dir.join(MANIFEST_FILE), manifest.to_json().as_bytes())?;
        // The new layer is named in the manifest: `mcow gc` may run again.
        self.store.release_lease();
        let next = Arc::new(View {
            manifest,
            stack: Arc::new(stack),
            frozen: view.frozen[1..].to_vec(),
            top: view.top.clone(),
        });
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = next;
        drop(view);
        remove_top_files(&self.dir.join(&name));
        tracing::info!(disk = %self.dir.display(), frozen = %name, layer = %digest, "snapshot: frozen top sealed");
        Ok(Some(digest))
    }

    /// Makes every completed write durable (in the top, and in frozen tops not sealed yet:
    /// writes may have completed there just before a snapshot).
    pub fn flush(&self) -> Result<()> {
        let view = self.view();
        for top in &view.frozen {
            top.flush()?;
        }
        view.top.flush()
    }

    /// The runs covering `[offset, offset+len)`, neighbours from the same layer and of the same
    /// kind merged.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Run>> {
        let mut runs: Vec<Run> = Vec::new();
        for s in self.segments(offset, len)? {
            let (kind, layer) = match s.holder {
                Holder::Top => (RunKind::Data, Some(TOP)),
                Holder::Layer(l) => (RunKind::Data, Some(l.layer)),
                Holder::Zero { layer } => (RunKind::Zero, Some(layer)),
                Holder::Hole { layer } => (RunKind::Hole, layer),
            };
            match runs.last_mut() {
                Some(r) if r.kind == kind && r.layer == layer => r.length += s.len,
                _ => runs.push(Run { offset: s.offset, length: s.len, kind, layer }),
            }
        }
        Ok(runs)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Closing a writable disk flushes it, as closing an image in QEMU does; errors are logged.
impl Drop for Disk {
    fn drop(&mut self) {
        if !self.opts.read_only
            && let Err(e) = self.flush()
        {
            tracing::error!(disk = %self.dir.display(), error = %e, "flush on close failed");
        }
    }
}

/// Replaces a disk's stack and top after a merge: writes the new empty top, then the manifest
/// (the commit point), then removes the old top's files. `old_top` is held, locked, until the
/// new manifest is durable.
pub(crate) fn replace_stack(
    dir: &Path,
    manifest: &DiskManifest,
    old_top: TopLayer,
    layers: Vec<Digest>,
) -> Result<()> {
    let old = manifest.top.clone().ok_or_else(|| Error::NoTop { dir: dir.to_path_buf() })?;
    let new_top = next_top_name(&old);
    // On failure (a full disk, say) nothing of the new top may stay behind, unless the new
    // manifest made it (the rename went through and only the directory sync failed).
    let undo = |e: Error| {
        if read_manifest(dir).ok().and_then(|m| m.top).as_deref() != Some(new_top.as_str()) {
            remove_top_files(&dir.join(&new_top));
            let _ = fs::remove_file(dir.join(MANIFEST_FILE).with_extension("tmp"));
        }
        e
    };
    create_top(dir, &new_top, manifest.block_size, manifest.virtual_size, chain_digest(&layers))
        .map_err(undo)?;
    let mut manifest = manifest.clone();
    manifest.layers = layers;
    manifest.top = Some(new_top.clone());
    // The new top is on the new layers: no snapshot's placeholder is left in its parent.
    manifest.top_base = None;
    debug_assert!(manifest.frozen.is_empty(), "frozen tops are sealed before a merge");
    write_atomic(&dir.join(MANIFEST_FILE), manifest.to_json().as_bytes()).map_err(undo)?;
    drop(old_top);
    remove_top_files(&dir.join(&old));
    Ok(())
}

fn remove_top_files(path: &Path) {
    let _ = fs::remove_file(journal_temp_path(path));
    let _ = fs::remove_file(journal_path(path));
    for i in 0..2 {
        let _ = fs::remove_file(pending_log_path(path, i));
    }
    let _ = fs::remove_file(path);
}

/// Files in a disk directory that an interrupted seal, commit or flatten can leave: the
/// manifest's temporary, and tops (with their journals) that the manifest does not name. Only
/// meaningful while the manifest's top is locked (a writable open), when no such operation can
/// be running on the disk.
pub fn leftovers(dir: &Path, manifest: &DiskManifest) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    let named: Vec<&str> = manifest.top.iter().chain(&manifest.frozen).map(String::as_str).collect();
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            let top = [".journal", ".pending.0", ".pending.1"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(&name);
            name == "disk.tmp" || (top.starts_with("top-") && top.ends_with(".mcow") && !named.contains(&top))
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

/// Reads and checks a disk directory's manifest.
pub fn read_manifest(dir: &Path) -> Result<DiskManifest> {
    let path = dir.join(MANIFEST_FILE);
    let text = fs::read(&path).map_err(Error::io("read", &path))?;
    DiskManifest::from_json(&text).map_err(Error::format(&path))
}

/// The store directory a manifest names, relative to the disk directory.
pub fn resolve_store(dir: &Path, m: &DiskManifest) -> PathBuf {
    let p = Path::new(&m.store);
    if p.is_absolute() { p.to_path_buf() } else { dir.join(p) }
}

fn next_top_name(old: &str) -> String {
    let n =
        old.strip_prefix("top-").and_then(|s| s.strip_suffix(".mcow")).and_then(|s| s.parse::<u64>().ok());
    format!("top-{}.mcow", n.unwrap_or(0) + 1)
}

fn create_top(dir: &Path, name: &str, block_size: u32, virtual_size: u64, parent: Digest) -> Result<()> {
    let path = dir.join(name);
    let jpath = journal_path(&path);
    let data = FsOpen::new().read(true).write(true).create(true).truncate(true).open(&path);
    let data = data.map_err(Error::io("create", &path))?;
    let journal = FsOpen::new().read(true).write(true).create(true).truncate(true).open(&jpath);
    let journal = journal.map_err(Error::io("create", &jpath))?;
    TopLayer::create_logged(
        Box::new(FileStorage(data)),
        Box::new(FileStorage(journal)),
        Some(pending_logs(&path, false)?.expect("a writer opens its logs")),
        &path,
        block_size,
        virtual_size,
        parent,
    )?;
    crate::store::sync_dir(dir)
}

pub(crate) fn open_top(path: &Path, opts: OpenOptions) -> Result<TopLayer> {
    let jpath = journal_path(path);
    let open =
        |p: &Path| FsOpen::new().read(true).write(!opts.read_only).open(p).map_err(Error::io("open", p));
    let data: File = open(path)?;
    let locked = if opts.read_only { data.try_lock_shared() } else { data.try_lock() };
    match locked {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) if opts.read_only && opts.force_share => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(Error::Locked { path: path.to_path_buf() }),
        Err(std::fs::TryLockError::Error(e)) => return Err(Error::io("lock", path)(e)),
    }
    let journal = open(&jpath)?;
    let storage = |f: File| -> Box<dyn Storage> { Box::new(FileStorage(f)) };
    let files = Box::new(HostJournalFiles { top: path.to_path_buf() });
    if opts.read_only && opts.force_share {
        // A writer may be running beside us: follow its journal (see `top`'s module doc).
        return TopLayer::open_shared(storage(data), storage(journal), path)?.attach_journal_files(files);
    }
    match pending_logs(path, opts.read_only)? {
        Some(logs) => TopLayer::open_logged(storage(data), storage(journal), logs, path, opts.read_only),
        None => TopLayer::open(storage(data), storage(journal), path, opts.read_only),
    }?
    .attach_journal_files(files)
}

/// Opens a top's pending logs: a writer creates them if missing (a top from before them); a
/// read-only open uses them only if both are there.
fn pending_logs(path: &Path, read_only: bool) -> Result<Option<PendingLogs>> {
    let open = |i: usize| {
        let p = pending_log_path(path, i);
        match FsOpen::new().read(true).write(!read_only).create(!read_only).truncate(false).open(&p) {
            // A writer's logs get a record per mapping change: stores into a mapping of the
            // file, not a pwrite each (see `mapped`). No other process writes or truncates
            // them meanwhile: only a top's writer opens them for writing, holding the top's
            // lock (or creating a top that no manifest names yet).
            Ok(f) if !read_only => MappedStorage::or_file(f).map(Some).map_err(Error::io("open", &p)),
            Ok(f) => Ok(Some(Box::new(FileStorage(f)) as Box<dyn Storage>)),
            Err(e) if read_only && e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("open", &p)(e)),
        }
    };
    Ok(match (open(0)?, open(1)?) {
        (Some(a), Some(b)) => Some([a, b]),
        _ => None,
    })
}

/// A top's journal files on the host filesystem (see [`JournalFiles`]).
struct HostJournalFiles {
    top: PathBuf,
}

impl JournalFiles for HostJournalFiles {
    fn create_temp(&self) -> std::io::Result<Box<dyn Storage>> {
        let f = FsOpen::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(journal_temp_path(&self.top))?;
        Ok(Box::new(FileStorage(f)))
    }
    fn rename_temp(&self) -> std::io::Result<()> {
        fs::rename(journal_temp_path(&self.top), journal_path(&self.top))
    }
    fn sync_dir(&self) -> std::io::Result<()> {
        File::open(self.top.parent().unwrap_or(Path::new(".")))?.sync_all()
    }
    fn remove_temp(&self) -> std::io::Result<()> {
        match fs::remove_file(journal_temp_path(&self.top)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }
    fn current_id(&self) -> std::io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(fs::metadata(journal_path(&self.top))?.ino())
    }
    fn open_current(&self) -> std::io::Result<Box<dyn Storage>> {
        Ok(Box::new(FileStorage(File::open(journal_path(&self.top))?)))
    }
}

/// `path` made absolute and cleaned of `.` and `..` components, without touching the
/// filesystem (so it works for paths that do not exist yet).
pub fn absolute_clean(path: &Path) -> std::io::Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in std::path::absolute(path)?.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    Ok(out)
}

/// `target` expressed relative to `from` (both made absolute first), for the manifest's store.
fn relative_path(target: &Path, from: &Path) -> Result<String> {
    let abs = |p: &Path| absolute_clean(p).map_err(Error::io("resolve", p));
    let (t, f) = (abs(target)?, abs(from)?);
    let tc: Vec<_> = t.components().collect();
    let fc: Vec<_> = f.components().collect();
    let common = tc.iter().zip(&fc).take_while(|(a, b)| a == b).count();
    let mut rel = PathBuf::new();
    for _ in common..fc.len() {
        rel.push("..");
    }
    for c in &tc[common..] {
        rel.push(c);
    }
    let s = rel.to_string_lossy().into_owned();
    Ok(if s.is_empty() { ".".into() } else { s })
}
