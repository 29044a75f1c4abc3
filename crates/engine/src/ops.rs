//! Whole-disk operations: seal, commit, flatten (one merge mechanism, [`merge`]; [`seal`] is
//! its common case), import (of one image or of a chain of images), export, check.
//!
//! Owns: turning ranges of a disk into new sealed layers, reading raw images in and writing
//! them out, and the full consistency check. Does not own: the read/write path (see `disk`) or
//! any external tool (converting other image formats is the CLI's job, through `qemu-img`).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use mcow_format::{Digest, ExtentKind, HEADER_SIZE, Sha256Stream, chain_digest};

use crate::disk::{CreateOptions, Disk, OpenOptions, RunKind};
use crate::error::{Error, Result};
use crate::extent_map::{ExtentMap, Loc, TOP};
use crate::fetch::FetchPolicy;
use crate::layer::LayerWriter;
use crate::stack::Stack;
use crate::store::LayerStore;

use crate::build::write_layer;
pub use crate::build::{Progress, is_zero};

/// Seals the disk at `dir`: its writable top becomes a new sealed layer on top of its stack,
/// and the disk gets a fresh, empty top. Returns the new layer's digest. The disk must not be
/// open (the seal takes the top's lock); other disks may be created on the new layer
/// ([`CreateOptions::layers`]). This is [`merge`] of no sealed layers, so it costs the size of
/// the top, whatever the depth of the stack.
pub fn seal(dir: &Path, progress: Progress) -> Result<Digest> {
    merge(dir, 0, progress)
}

/// Merges the writable top and the `n` topmost sealed layers of the disk at `dir` into one new
/// sealed layer, which replaces them; the disk gets a fresh, empty top. `n = 0` is [`seal`],
/// `n = depth` is `flatten`. Returns the new layer's digest.
///
/// Only the top and the `n` merged layers are opened: sealing on a stack of any depth costs
/// the size of the top, not a walk of the stack (the top's recorded parent is checked against
/// the chain digest of the manifest's layers instead).
pub fn merge(dir: &Path, n: usize, progress: Progress) -> Result<Digest> {
    merge_with_source(dir, n, None, progress)
}

/// [`merge`] on a disk whose merged layers may be partial copies: their missing blocks are
/// fetched from `source` as the policy says.
pub fn merge_with_source(
    dir: &Path,
    n: usize,
    source: Option<(std::sync::Arc<dyn crate::fetch::BlockSource>, crate::fetch::FetchPolicy)>,
    progress: Progress,
) -> Result<Digest> {
    let mut manifest = crate::disk::read_manifest(dir)?;
    if !manifest.frozen.is_empty() {
        // Tops a snapshot froze are sealed first, in order, as a server would have.
        let disk = match &source {
            Some((source, policy)) => {
                Disk::open_with_source(dir, OpenOptions::default(), source.clone(), *policy)?
            }
            None => Disk::open(dir, OpenOptions::default())?,
        };
        while disk.seal_frozen(&mut |_, _| {})?.is_some() {}
        drop(disk);
        manifest = crate::disk::read_manifest(dir)?;
    }
    let mut store = LayerStore::new(crate::disk::resolve_store(dir, &manifest));
    if let Some((source, policy)) = source {
        store = store.with_source(source, policy);
    }
    let top_name = manifest.top.clone().ok_or_else(|| Error::NoTop { dir: dir.to_path_buf() })?;
    let top = crate::disk::open_top(&dir.join(top_name), OpenOptions::default())?;
    // The top's parent: the chain digest of the layers, unless a snapshot's frozen top was
    // sealed under it since (FORMAT.md, "Parents of unsealed tops").
    let chain = manifest.top_base.unwrap_or_else(|| chain_digest(&manifest.layers));
    if top.header.parent != chain {
        return Err(Error::WrongParent {
            path: top.path().to_path_buf(),
            recorded: top.header.parent,
            actual: chain,
        });
    }
    top.flush()?;
    let depth = manifest.layers.len();
    if n > depth {
        return Err(Error::Invalid(format!("cannot merge {n} layers: the stack has {depth}")));
    }
    let base = depth - n;
    let parent = chain_digest(&manifest.layers[..base]);
    let mut merged = Vec::with_capacity(n);
    let mut map = ExtentMap::new();
    let mut layer_chain = parent;
    for (k, digest) in manifest.layers[base..].iter().enumerate() {
        let (layer, index) = store.open_layer(digest, true)?;
        if layer.header.parent != layer_chain {
            return Err(Error::WrongParent {
                path: layer.path.clone(),
                recorded: layer.header.parent,
                actual: layer_chain,
            });
        }
        layer_chain = crate::stack::next_chain(&layer_chain, digest);
        for e in index {
            map.insert(e.vblock, e.end(), Loc { layer: k as u32, kind: e.kind, pblock: e.pblock });
        }
        merged.push(layer);
    }
    for e in top.extents() {
        map.insert(e.start, e.end, e.loc);
    }
    let read = |vblock: u64, loc: Loc, buf: &mut [u8]| -> Result<()> {
        if loc.layer == TOP {
            if top.read_data(vblock, 0, buf)? {
                return Ok(());
            }
            return Err(Error::Invalid("the top changed during a merge".into()));
        }
        merged[loc.layer as usize].read(loc.pblock, 0, buf)
    };
    let digest = write_layer(&store, &manifest, &map, parent, base == 0, &read, progress)?;
    let mut new_layers = manifest.layers[..base].to_vec();
    new_layers.push(digest);
    drop(merged);
    crate::disk::replace_stack(dir, &manifest, top, new_layers)?;
    Ok(digest)
}

/// Where an import's new disk goes and what it sits on.
#[derive(Debug, Clone)]
pub struct ImportOptions<'a> {
    /// The new disk's directory.
    pub dir: &'a Path,
    /// Layer store for the new layer (ignored with a parent: the parent's store is used).
    pub store: PathBuf,
    /// The new disk's block size (ignored with a parent: the parent's is used).
    pub block_size: u32,
    /// Store only the blocks that differ from this disk's sealed layers.
    pub parent: Option<&'a Path>,
}

impl<'a> ImportOptions<'a> {
    /// A new disk at `dir`, its layer in `store`, with the default block size and no parent.
    pub fn new(dir: &'a Path, store: impl Into<PathBuf>) -> ImportOptions<'a> {
        ImportOptions { dir, store: store.into(), block_size: crate::disk::DEFAULT_BLOCK_SIZE, parent: None }
    }
}

/// Imports a raw image file as a new sealed layer and creates a disk at `opts.dir` on it.
/// All-zero blocks are never stored; with a parent, blocks equal to the parent's are skipped
/// and blocks the parent has but the image zeroes become zero markers. Returns the layer digest.
pub fn import_raw(src: &Path, opts: &ImportOptions, progress: Progress) -> Result<Digest> {
    let file = File::open(src).map_err(Error::io("open", src))?;
    let src_len = file.metadata().map_err(Error::io("stat", src))?.len();
    let (stack, store, size, bs) = match opts.parent {
        Some(p) => {
            let parent = Disk::open(p, OpenOptions { read_only: true, verify: true, force_share: true })?;
            if parent.size() != src_len.next_multiple_of(512) {
                return Err(Error::Invalid(format!(
                    "{} is {src_len} bytes but the parent disk is {} bytes",
                    src.display(),
                    parent.size()
                )));
            }
            (parent.stack().clone(), parent.store().clone(), parent.size(), parent.block_size())
        }
        None => {
            let size = src_len.next_multiple_of(512);
            let store = LayerStore::new(&opts.store);
            (std::sync::Arc::new(Stack::empty(size.max(512), opts.block_size)), store, size, opts.block_size)
        }
    };
    mcow_format::check_virtual_size(size).map_err(Error::format(src))?;
    let bsz = u64::from(bs);
    let mut pending = store.begin_layer()?;
    let tmp = pending.path().to_path_buf();
    let werr = |e: std::io::Error| Error::io("write", &tmp)(e);
    let mut w = LayerWriter::new(pending.take_writer(), bs, size, stack.chain()).map_err(werr)?;
    let mut block = vec![0u8; bs as usize];
    let mut below = vec![0u8; bs as usize];
    let blocks = size.div_ceil(bsz);
    let mut vb = 0u64;
    while vb < blocks {
        let pos = vb * bsz;
        // Skip straight over holes of a sparse source where the parent has nothing either.
        if let Some(data_at) = next_data(&file, pos, src_len)
            && data_at / bsz > vb
        {
            let hole_end = (data_at / bsz).min(blocks);
            let mut b = vb;
            while b < hole_end {
                let (loc, end) = stack.lookup(b, hole_end);
                if loc.is_some_and(|l| l.kind == ExtentKind::Data) {
                    w.push_marker(b, end - b, ExtentKind::Zero).map_err(werr)?;
                }
                b = end;
            }
            vb = hole_end;
            progress(vb * bsz, size);
            continue;
        }
        let n = (src_len.saturating_sub(pos)).min(bsz) as usize;
        block[n..].fill(0);
        file.read_exact_at(&mut block[..n], pos).map_err(Error::io("read", src))?;
        stack.read_block(vb, 0, &mut below)?;
        if block != below {
            if is_zero(&block) {
                w.push_marker(vb, 1, ExtentKind::Zero).map_err(werr)?;
            } else {
                w.push_block(vb, &block).map_err(werr)?;
            }
        }
        vb += 1;
        if vb.is_multiple_of(64) || vb == blocks {
            progress((vb * bsz).min(size), size);
        }
    }
    let (out, digest, _) = w.finish().map_err(werr)?;
    pending.commit(&store, out, &digest)?;
    let mut layers: Vec<Digest> = stack.layers().iter().map(|l| l.digest).collect();
    layers.push(digest);
    Disk::create(
        opts.dir,
        &CreateOptions { virtual_size: size, block_size: bs, store: store.root().to_path_buf(), layers },
    )?;
    Ok(digest)
}

/// A byte range that an image of a chain holds itself: data it stores (`zero: false`), or
/// zeros it records (`zero: true`), which hide what the images below hold there. Ranges an
/// image does not hold fall through to the image below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldRange {
    /// Where the range starts, in bytes.
    pub offset: u64,
    /// Its length in bytes.
    pub length: u64,
    /// Zeros recorded, rather than data stored.
    pub zero: bool,
}

impl HeldRange {
    fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// Imports a chain of images (for instance a qcow2 backing chain), bottom first, as a stack of
/// sealed layers, one per image, each storing only what its image holds: [`ChainImport::push`]
/// once per image, then [`ChainImport::finish`] creates the disk on them. Dropped unfinished,
/// it removes the layers it added to the store (not those the store already had).
pub struct ChainImport {
    store: LayerStore,
    virtual_size: u64,
    block_size: u32,
    layers: Vec<Digest>,
    stack: std::sync::Arc<Stack>,
    /// Layers this import put into the store (they were not there before).
    added: Vec<Digest>,
}

impl ChainImport {
    /// A chain import of images of `virtual_size` bytes into `store`, at `block_size`.
    pub fn new(store: impl Into<PathBuf>, virtual_size: u64, block_size: u32) -> Result<ChainImport> {
        let store: PathBuf = store.into();
        mcow_format::check_virtual_size(virtual_size).map_err(Error::format(&store))?;
        mcow_format::check_block_size(block_size).map_err(Error::format(&store))?;
        Ok(ChainImport {
            stack: std::sync::Arc::new(Stack::empty(virtual_size, block_size)),
            store: LayerStore::new(store),
            virtual_size,
            block_size,
            layers: Vec::new(),
            added: Vec::new(),
        })
    }

    /// Adds the next image up as a new sealed layer on the ones pushed so far. `own` is a raw
    /// file of what the image alone reads as (its data at its offsets; shorter files read as
    /// zeros past their end); `held` lists, in order and without overlaps, the ranges the
    /// image holds. A block the image holds only in part is stored whole, the rest of it read
    /// from the layers below. Blocks that read as zeros become zero markers (on the bottom
    /// layer they hide nothing and are left out); blocks the image does not hold are not in
    /// the layer. Returns the layer's digest.
    pub fn push(&mut self, own: &Path, held: &[HeldRange], progress: Progress) -> Result<Digest> {
        let size = self.virtual_size;
        let mut prev_end = 0u64;
        for r in held {
            if r.offset < prev_end || r.end() > size {
                return Err(Error::Invalid(format!(
                    "the held ranges of {} are out of order or past the end ({}+{})",
                    own.display(),
                    r.offset,
                    r.length
                )));
            }
            prev_end = r.end();
        }
        let file = File::open(own).map_err(Error::io("open", own))?;
        let own_len = file.metadata().map_err(Error::io("stat", own))?.len();
        let read_own = |buf: &mut [u8], pos: u64| -> Result<()> {
            let n = own_len.saturating_sub(pos).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], pos).map_err(Error::io("read", own))?;
            buf[n..].fill(0);
            Ok(())
        };
        let bs = u64::from(self.block_size);
        let blocks = size.div_ceil(bs);
        let empty_base = self.layers.is_empty();
        let mut pending = self.store.begin_layer()?;
        let tmp = pending.path().to_path_buf();
        let werr = |e: std::io::Error| Error::io("write", &tmp)(e);
        let mut w = LayerWriter::new(pending.take_writer(), self.block_size, size, self.stack.chain())
            .map_err(werr)?;
        let mut block = vec![0u8; bs as usize];
        let held: Vec<HeldRange> = held.iter().copied().filter(|r| r.length > 0).collect();
        let (mut i, mut b) = (0usize, 0u64);
        while i < held.len() {
            let r = held[i];
            b = b.max(r.offset / bs);
            let start = b * bs;
            let end = (start + bs).min(size);
            // A zero range over whole blocks: one marker.
            if r.zero && r.offset <= start && r.end() >= end {
                let last = if r.end() >= size { blocks } else { r.end() / bs };
                if !empty_base {
                    w.push_marker(b, last - b, ExtentKind::Zero).map_err(werr)?;
                }
                b = last;
                if r.end() <= b * bs {
                    i += 1;
                }
                progress((b * bs).min(size), size);
                continue;
            }
            // The ranges of this image in block b: what they cover is theirs, the rest is
            // what the layers below hold.
            let covered: u64 = held[i..]
                .iter()
                .take_while(|h| h.offset < end)
                .map(|h| h.end().min(end) - h.offset.max(start))
                .sum();
            if covered < end - start {
                self.stack.read_block(b, 0, &mut block)?;
            } else {
                block.fill(0);
            }
            for h in held[i..].iter().take_while(|h| h.offset < end) {
                let (from, to) = (h.offset.max(start), h.end().min(end));
                let part = &mut block[(from - start) as usize..(to - start) as usize];
                if h.zero {
                    part.fill(0);
                } else {
                    read_own(part, from)?;
                }
            }
            if is_zero(&block) {
                if !empty_base {
                    w.push_marker(b, 1, ExtentKind::Zero).map_err(werr)?;
                }
            } else {
                w.push_block(b, &block).map_err(werr)?;
            }
            while i < held.len() && held[i].end() <= end {
                i += 1;
            }
            b += 1;
            if b.is_multiple_of(64) {
                progress(end, size);
            }
        }
        progress(size, size);
        let (out, digest, _) = w.finish().map_err(werr)?;
        let had = self.store.layer_path(&digest).exists();
        pending.commit(&self.store, out, &digest)?;
        if !had {
            self.added.push(digest);
        }
        self.layers.push(digest);
        self.stack = std::sync::Arc::new(Stack::open(
            &self.store,
            &self.layers,
            self.virtual_size,
            self.block_size,
            true,
        )?);
        Ok(digest)
    }

    /// Creates the disk at `dir` on the layers pushed (with an empty writable top). Returns
    /// the layers' digests, bottom first.
    pub fn finish(mut self, dir: &Path) -> Result<Vec<Digest>> {
        if self.layers.is_empty() {
            return Err(Error::Invalid("a chain import needs at least one image".into()));
        }
        Disk::create(
            dir,
            &CreateOptions {
                virtual_size: self.virtual_size,
                block_size: self.block_size,
                store: self.store.root().to_path_buf(),
                layers: self.layers.clone(),
            },
        )?;
        self.added.clear();
        Ok(std::mem::take(&mut self.layers))
    }
}

impl Drop for ChainImport {
    fn drop(&mut self) {
        for d in &self.added {
            let path = self.store.layer_path(d);
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not remove a layer of an unfinished import");
            }
        }
    }
}

/// The next offset at or after `pos` holding data in a sparse file (`len` if none), or `None`
/// where the filesystem cannot say.
fn next_data(file: &File, pos: u64, len: u64) -> Option<u64> {
    if pos >= len {
        return Some(len.next_multiple_of(512).max(pos));
    }
    match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(pos)) {
        Ok(off) => Some(off),
        Err(rustix::io::Errno::NXIO) => Some(u64::MAX),
        Err(_) => None,
    }
}

/// Writes the whole disk to a raw image file, leaving zero ranges as holes.
pub fn export_raw(disk: &Disk, out: &Path, progress: Progress) -> Result<()> {
    let f = File::create(out).map_err(Error::io("create", out))?;
    f.set_len(disk.size()).map_err(Error::io("resize", out))?;
    let chunk = 4 << 20;
    let mut buf = vec![0u8; chunk];
    for run in disk.block_status(0, disk.size())? {
        if run.kind != RunKind::Data {
            continue;
        }
        let mut pos = run.offset;
        while pos < run.offset + run.length {
            let n = ((run.offset + run.length - pos) as usize).min(chunk);
            disk.read(pos, &mut buf[..n])?;
            if !is_zero(&buf[..n]) {
                f.write_all_at(&buf[..n], pos).map_err(Error::io("write", out))?;
            }
            pos += n as u64;
            progress(pos, disk.size());
        }
    }
    f.sync_all().map_err(Error::io("sync", out))
}

/// One layer of a disk: a sealed layer (index from the bottom) or the writable top.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerId {
    /// The sealed layer with this index, from the bottom.
    Sealed(usize),
    /// The writable top.
    Top,
}

/// What one layer of a disk holds itself (not what shows through it from below): its runs in
/// order, in blocks, each data, zero or discarded; [`LayerContent::read`] reads its data. For
/// exporting a disk layer by layer.
pub struct LayerContent<'a> {
    disk: &'a Disk,
    layer: LayerId,
    /// The layer's runs, in order.
    pub runs: Vec<crate::extent_map::Extent>,
}

impl LayerContent<'_> {
    /// Reads the whole virtual block `vblock` of the data run `run` (one of [`Self::runs`]).
    /// A partial layer fetches what it lacks.
    pub fn read(&self, run: &crate::extent_map::Extent, vblock: u64, buf: &mut [u8]) -> Result<()> {
        debug_assert!(run.loc.kind == ExtentKind::Data && (run.start..run.end).contains(&vblock));
        match self.layer {
            LayerId::Sealed(i) => self.disk.layer(i).read(run.loc.advance(vblock - run.start).pblock, 0, buf),
            LayerId::Top => match self.disk.top().read_data(vblock, 0, buf)? {
                true => Ok(()),
                false => Err(Error::Invalid("the top changed while it was read".into())),
            },
        }
    }
}

/// The content of one layer of `disk`.
pub fn layer_content(disk: &Disk, layer: LayerId) -> Result<LayerContent<'_>> {
    let runs = match layer {
        LayerId::Sealed(i) => {
            let idx = u32::try_from(i).map_err(|_| Error::Invalid("too many layers".into()))?;
            let index = disk.layer(i).read_index()?;
            index
                .iter()
                .map(|e| crate::extent_map::Extent {
                    start: e.vblock,
                    end: e.end(),
                    loc: Loc { layer: idx, kind: e.kind, pblock: e.pblock },
                })
                .collect()
        }
        LayerId::Top => {
            // A force-share reader first catches up with the writer's flushed batches.
            disk.top().refresh()?;
            disk.top().extents()
        }
    };
    Ok(LayerContent { disk, layer, runs })
}

/// What `check` found. Errors mean corruption; debris is harmless leftovers of a crash.
#[derive(Debug, Default)]
pub struct CheckReport {
    /// Corruption found, one message each.
    pub errors: Vec<String>,
    /// Leftovers of a crash found (harmless), one message each.
    pub debris: Vec<String>,
    /// Sealed layers of the stack checked (complete or partial).
    pub layers_checked: usize,
    /// Blocks checked against their hashes.
    pub blocks_checked: u64,
    /// Layers found only as partial (lazily fetched) copies, bottom first.
    pub partial: Vec<PartialLayerCheck>,
}

/// A partial layer as `check` found it: its structure was checked, and each of its local
/// blocks; blocks not yet fetched are not errors.
#[derive(Debug, Clone)]
pub struct PartialLayerCheck {
    /// The layer.
    pub digest: Digest,
    /// Stored blocks present locally and matching their hashes.
    pub blocks_local: u64,
    /// All stored blocks of the layer.
    pub blocks_total: u64,
}

/// Checks a disk directory in full: the manifest, every sealed layer's digest, structure,
/// parent chain and every block hash, and the top's header and journal. Fails only if the
/// check itself cannot run (no readable manifest).
///
/// A layer present only as a partial copy (a lazily pulled disk) has its structure checked
/// and each local block checked against its hash; blocks not fetched yet are counted in
/// [`CheckReport::partial`], not reported as errors, and its whole-file digest cannot be
/// checked. Nothing is fetched.
pub fn check(dir: &Path, force_share: bool, progress: Progress) -> Result<CheckReport> {
    let manifest = crate::disk::read_manifest(dir)?;
    let offline: std::sync::Arc<dyn crate::fetch::BlockSource> = std::sync::Arc::new(crate::fetch::Offline);
    let store = LayerStore::new(crate::disk::resolve_store(dir, &manifest))
        .with_source(offline.clone(), FetchPolicy::default());
    let mut report = CheckReport::default();
    let total: u64 = manifest
        .layers
        .iter()
        .map(|d| {
            std::fs::metadata(store.layer_path(d))
                .or_else(|_| std::fs::metadata(store.partial_path(d)))
                .map(|m| m.len())
                .unwrap_or(0)
        })
        .sum();
    let mut done = 0u64;
    let mut chain = Digest::ZERO;
    for digest in &manifest.layers {
        match check_layer(&store, digest, &manifest, chain, &mut report, &mut |n| {
            done += n;
            progress(done, total)
        }) {
            Ok(()) => {}
            Err(e) => report.errors.push(e.to_string()),
        }
        chain = crate::stack::next_chain(&chain, digest);
        report.layers_checked += 1;
    }
    for t in store.stale_temporaries(false)? {
        report.debris.push(format!(
            "{}: {} bytes of a file that a process died writing (the next write to the store removes it)",
            t.path.display(),
            t.bytes
        ));
    }
    if report.errors.is_empty() {
        let opts = OpenOptions { read_only: true, verify: true, force_share };
        match Disk::open_with_source(dir, opts, offline, FetchPolicy::default()) {
            Ok(disk) => {
                // The open's lock keeps seals and commits out while this looks.
                for p in crate::disk::leftovers(dir, &manifest) {
                    report.debris.push(format!(
                        "{}: left by an interrupted seal or commit (the next writable open removes it)",
                        p.display()
                    ));
                }
                if let Some(e) = disk.journal_corruption() {
                    report.errors.push(e.to_string());
                }
                let d = disk.debris();
                if d.journal_tail_bytes > 0 {
                    report.debris.push(format!(
                        "journal has {} bytes after its last whole batch",
                        d.journal_tail_bytes
                    ));
                }
                if d.unused_blocks > 0 {
                    report.debris.push(format!("top data file has {} unused blocks", d.unused_blocks));
                }
                // Beside a running writer (force-share) it may be a compaction under way.
                let temp = crate::top::journal_temp_path(disk.top().path());
                if !force_share && temp.exists() {
                    report.debris.push(format!(
                        "{}: a journal an interrupted compaction was writing (the next writable open removes it)",
                        temp.display()
                    ));
                }
            }
            Err(e @ Error::Locked { .. }) => return Err(e),
            Err(e) => report.errors.push(e.to_string()),
        }
    }
    Ok(report)
}

fn check_layer(
    store: &LayerStore,
    digest: &Digest,
    manifest: &mcow_format::DiskManifest,
    chain: Digest,
    report: &mut CheckReport,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let (layer, _) = store.open_layer(digest, true)?;
    let path = layer.path.clone();
    if layer.header.parent != chain {
        return Err(Error::WrongParent { path, recorded: layer.header.parent, actual: chain });
    }
    if layer.header.block_size != manifest.block_size || layer.header.virtual_size != manifest.virtual_size {
        return Err(Error::Mismatch {
            path,
            what: "virtual size",
            found: layer.header.virtual_size,
            expected: manifest.virtual_size,
        });
    }
    if layer.is_partial() {
        return check_partial_layer(&layer, report, progress);
    }
    // One sequential pass: hash the whole file and check each block on the way.
    let mut f =
        std::io::BufReader::with_capacity(1 << 20, File::open(&path).map_err(Error::io("open", &path))?);
    let mut hasher = Sha256Stream::new();
    let mut head = vec![0u8; HEADER_SIZE];
    f.read_exact(&mut head).map_err(Error::io("read", &path))?;
    hasher.update(&head);
    let mut block = vec![0u8; layer.header.block_size as usize];
    let mut bad_blocks = 0u64;
    for pb in 0..layer.trailer.block_count {
        f.read_exact(&mut block).map_err(Error::io("read", &path))?;
        hasher.update(&block);
        if let Err(e) = layer.check_block(pb, &block) {
            if bad_blocks < 8 {
                report.errors.push(e.to_string());
            }
            bad_blocks += 1;
        }
        report.blocks_checked += 1;
        progress(block.len() as u64);
    }
    let mut rest = Vec::new();
    f.read_to_end(&mut rest).map_err(Error::io("read", &path))?;
    hasher.update(&rest);
    if bad_blocks > 8 {
        report.errors.push(format!(
            "{}: {} more blocks fail their checksums",
            path.display(),
            bad_blocks - 8
        ));
    }
    let actual = hasher.finish();
    if actual != *digest {
        return Err(Error::LayerDigest { path, expected: *digest, actual });
    }
    Ok(())
}

/// Checks the local blocks of a partial layer (its structure was checked when it was opened).
/// A block that fails its hash is missing if it reads as zeros (never fetched: the file is
/// sparse), else debris: bytes of a fetch interrupted mid-write, which are fetched again when
/// read (fetched blocks are written only after they match their hashes).
fn check_partial_layer(
    layer: &crate::layer::SealedLayer,
    report: &mut CheckReport,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let path = &layer.path;
    let f = File::open(path).map_err(Error::io("open", path))?;
    let bs = layer.block_size();
    let mut block = vec![0u8; bs as usize];
    let (mut local, mut torn) = (0u64, 0u64);
    for pb in 0..layer.trailer.block_count {
        f.read_exact_at(&mut block, HEADER_SIZE as u64 + pb * bs).map_err(Error::io("read", path))?;
        if layer.block_matches(pb, &block) {
            local += 1;
        } else if layer.hash_known(pb) && !is_zero(&block) {
            // (A block whose hash chunk is not local cannot be told: counted as not local.)
            torn += 1;
        }
        report.blocks_checked += 1;
        progress(bs);
    }
    if torn > 0 {
        report.debris.push(format!(
            "{}: {torn} blocks of this partial layer hold bytes that fail their hashes (a fetch \
             interrupted by a crash); they are fetched again when read",
            path.display()
        ));
    }
    report.partial.push(PartialLayerCheck {
        digest: layer.digest,
        blocks_local: local,
        blocks_total: layer.trailer.block_count,
    });
    Ok(())
}

/// Summary of a disk, for `info`.
#[derive(Debug, Clone)]
pub struct DiskInfo {
    /// The disk's size in bytes.
    pub virtual_size: u64,
    /// Its block size in bytes.
    pub block_size: u32,
    /// The chain digest of its sealed layers.
    pub chain: Digest,
    /// Its sealed layers, bottom first.
    pub layers: Vec<LayerInfo>,
    /// Blocks stored in the writable top.
    pub top_stored_blocks: u64,
    /// The top's data file: apparent size.
    pub top_file_bytes: u64,
    /// The space the top's data file takes (`st_blocks` x 512; less where freed blocks were
    /// punched out).
    pub top_allocated_bytes: u64,
    /// The top's journal's size.
    pub top_journal_bytes: u64,
    /// Runs in the stack's flattened map.
    pub map_extents: usize,
}

/// One sealed layer, for `info`.
#[derive(Debug, Clone)]
pub struct LayerInfo {
    /// The layer.
    pub digest: Digest,
    /// Its file's length.
    pub file_bytes: u64,
    /// The blocks it stores.
    pub stored_blocks: u64,
    /// The entries of its extent index.
    pub extents: u64,
    /// True for a partial (lazily fetched) copy.
    pub partial: bool,
    /// Bytes of stored blocks present locally (all of them unless partial; see
    /// [`SealedLayer::local_bytes`](crate::layer::SealedLayer::local_bytes)).
    pub local_bytes: u64,
}

/// Collects the summary of an open disk.
pub fn info(disk: &Disk) -> DiskInfo {
    let (data, journal) = disk.top().file_sizes();
    let (allocated, _) = disk.top().allocated_sizes();
    DiskInfo {
        virtual_size: disk.size(),
        block_size: disk.block_size(),
        chain: disk.stack().chain(),
        layers: disk
            .stack()
            .layers()
            .iter()
            .map(|l| LayerInfo {
                digest: l.digest,
                file_bytes: l.file_len(),
                stored_blocks: l.trailer.block_count,
                extents: l.trailer.extent_count,
                partial: l.is_partial(),
                local_bytes: l.local_bytes().unwrap_or_else(|e| {
                    tracing::warn!(layer = %l.digest, error = %e, "cannot tell how much of the layer is local");
                    0
                }),
            })
            .collect(),
        top_stored_blocks: disk.top().stored_blocks(),
        top_file_bytes: data,
        top_allocated_bytes: allocated,
        top_journal_bytes: journal,
        map_extents: disk.stack().extent_count(),
    }
}
