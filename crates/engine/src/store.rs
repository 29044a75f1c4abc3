//! The layer store: a directory of sealed layers named by digest, `blobs/sha256/<hex>`, the same
//! shape as an OCI image layout's blob directory.
//!
//! Owns: layer file paths, atomically adding a new layer (write to a locked temporary in `tmp/`,
//! fsync, rename, fsync the directory; see `temp`), partial copies (and the chunk lists of those
//! pulled with index chunks, the frame tables of those pulled from compressed blobs) and their
//! completion, opening a layer as
//! complete or partial ([`OpenLayer`]) and sharing the layers open in the store's engine. Does not own: the content of layers (see `layer`),
//! the pool of open layer files (see `pool`).

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use mcow_format::{BlobLayout, Digest, FramesFile};

use crate::background::Background;
use crate::chunks::IndexChunks;
use crate::compressed::FramedSource;
use crate::context::{Engine, WeakLayer};
use crate::error::{Error, Result};
use crate::fetch::{BlockSource, FetchPolicy, PartialLayer};
use crate::layer::{LayerIndex, ReadTally, SealedLayer};
use crate::pool::FileSlot;
use crate::temp::{StaleTemp, TempFile, stale_temporaries};

/// A directory of sealed layers.
#[derive(Clone)]
pub struct LayerStore {
    root: PathBuf,
    engine: Engine,
    source: Option<(Arc<dyn BlockSource>, FetchPolicy)>,
    /// The store's `gc.lock`, held shared from the first new file in the store (see
    /// [`LayerStore::temp_file`]) until every clone of this value is dropped, or
    /// [`LayerStore::release_lease`]: `mcow gc` waits for it, so that a layer added and not yet
    /// named in a manifest is never collected (see `gc`).
    lease: Arc<Mutex<Option<File>>>,
}

impl LayerStore {
    /// The store at `root`, in an engine of its own (see [`LayerStore::in_engine`]).
    pub fn new(root: impl Into<PathBuf>) -> LayerStore {
        LayerStore::in_engine(&Engine::default(), root)
    }

    /// The store at `root`, opening its layers in `engine`: with its file pool, sharing the
    /// layers open there, fetching in the background on its threads.
    pub fn in_engine(engine: &Engine, root: impl Into<PathBuf>) -> LayerStore {
        LayerStore { root: root.into(), engine: engine.clone(), source: None, lease: Arc::default() }
    }

    /// The engine the store opens its layers in.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the complete layer with this digest is (or would be) stored.
    pub fn layer_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs").join("sha256").join(digest.hex())
    }

    /// Where a partial (lazily fetched) copy of the layer is kept: a file of the layer's full
    /// length whose header, index, hash table and trailer are present and checked (pulled with
    /// index chunks: header, extent index and trailer, the hash table's chunks arriving like
    /// blocks; see [`LayerStore::chunk_list_path`]), and whose data blocks arrive as they are
    /// read.
    pub fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("partial").join("sha256").join(digest.hex())
    }

    /// Where a partial copy pulled with index chunks keeps its chunk list (see
    /// [`IndexChunks::to_text`]): beside the partial file, as `<hex>.chunks`.
    pub fn chunk_list_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("partial").join("sha256").join(format!("{}.chunks", digest.hex()))
    }

    /// Where a partial copy pulled from a compressed blob keeps its frame table (which blob its
    /// blocks come from and where each block's frame lies in it, see
    /// [`mcow_format::FramesFile`]): beside the partial file, as `<hex>.frames`.
    pub fn frames_path(&self, digest: &Digest) -> PathBuf {
        let mut p = self.partial_path(digest).into_os_string();
        p.push(".frames");
        PathBuf::from(p)
    }

    /// Checks that `frames` can be the frame table of the partial copy of layer `digest` (`len`
    /// bytes, a `tail_len`-byte tail, `block_count` blocks of `block_size`): as many frames as
    /// blocks, and a table that fits the blob's length (see [`BlobLayout::check_table`]).
    fn check_frames(
        digest: &Digest,
        frames: &FramesFile,
        block_size: u32,
        len: u64,
        tail_len: u64,
        block_count: u64,
    ) -> Result<()> {
        let bad = |why: String| Error::CompressedBlob { layer: *digest, why };
        if frames.table.block_count() != block_count {
            return Err(bad(format!(
                "its frame table has {} frames, the layer {block_count} blocks",
                frames.table.block_count()
            )));
        }
        BlobLayout::new(block_size, len, tail_len, frames.blob_len)
            .and_then(|layout| layout.check_table(&frames.table))
            .map_err(|e| bad(e.to_string()))
    }

    /// Writes a sidecar of a partial copy (its chunk list or frame table) at `path` atomically:
    /// a temporary in `tmp/`, fsync, rename, fsync the directory, so that it is durable before
    /// the partial file's name is.
    fn write_sidecar(&self, path: &Path, bytes: &[u8], prefix: &str) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let mut temp = self.temp_file(prefix)?;
        let tmp_path = temp.path().to_path_buf();
        temp.file()
            .write_all_at(bytes, 0)
            .and_then(|_| temp.file().sync_all())
            .map_err(Error::io("write", &tmp_path))?;
        fs::rename(&tmp_path, path).map_err(Error::io("rename", &tmp_path))?;
        temp.persisted();
        sync_dir(path.parent().expect("a sidecar has a parent"))
    }

    /// Writes the frame table of a partial copy about to be added (or, without one, removes a
    /// frame table left beside an earlier partial copy of the same layer, which would name
    /// another blob).
    fn put_frames(&self, digest: &Digest, frames: Option<&FramesFile>) -> Result<()> {
        let path = self.frames_path(digest);
        match frames {
            Some(f) => self.write_sidecar(&path, &f.encode(), "frames"),
            None => remove_if_present(&path),
        }
    }

    /// The chunk list of the partial copy of `digest`, if it has one.
    fn read_chunk_list(&self, digest: &Digest) -> Result<Option<IndexChunks>> {
        let path = self.chunk_list_path(digest);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read", &path)(e)),
        };
        let list = IndexChunks::parse_text(&text).map_err(|why| Error::ChunkList {
            path: self.partial_path(digest),
            why: format!("{}: {why}", path.display()),
        })?;
        Ok(Some(list))
    }

    /// True if the complete layer is in the store.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.layer_path(digest).is_file()
    }

    /// Layers found only as partial copies are opened with this source of missing blocks,
    /// fetched as `policy` says.
    pub fn with_source(mut self, source: Arc<dyn BlockSource>, policy: FetchPolicy) -> LayerStore {
        self.source = Some((source, policy));
        self
    }

    /// Opens and checks the sealed layer `digest` (see `SealedLayer::open`): the complete
    /// layer if the store has it, else its partial copy with the store's source. A partial layer
    /// opened this way fetches its read-ahead itself (no background threads).
    pub fn open_layer(&self, digest: &Digest, verify: bool) -> Result<(OpenLayer, LayerIndex)> {
        self.open_layer_with(digest, verify, None)
    }

    fn open_layer_with(
        &self,
        digest: &Digest,
        verify: bool,
        background: Option<Arc<Background>>,
    ) -> Result<(OpenLayer, LayerIndex)> {
        // Listed as in use by this process before it is opened, so that `mcow gc` never removes
        // it from under us (see `gc`).
        self.engine
            .store_users(&self.root)
            .register(digest, || self.open_layer_unlisted(digest, verify, background))
    }

    fn open_layer_unlisted(
        &self,
        digest: &Digest,
        verify: bool,
        background: Option<Arc<Background>>,
    ) -> Result<(OpenLayer, LayerIndex)> {
        let path = self.layer_path(digest);
        if path.exists() {
            let (layer, index) =
                SealedLayer::open(&path, *digest, FileSlot::new(self.engine.pool()), verify, None)?;
            return Ok((OpenLayer::Complete(Arc::new(layer)), index));
        }
        let partial = self.partial_path(digest);
        match &self.source {
            Some((source, policy)) if partial.exists() => {
                let chunks = self.read_chunk_list(digest)?;
                let chunked = chunks.is_some();
                let opened =
                    SealedLayer::open(&partial, *digest, FileSlot::new(self.engine.pool()), true, chunks);
                let (layer, index) = match opened {
                    // Without its chunk list, a partial copy whose hash table is not whole
                    // cannot be checked.
                    Err(Error::Format {
                        err: mcow_format::FormatError::IndexDigestMismatch { .. }, ..
                    }) if !chunked => {
                        return Err(Error::ChunkList {
                            path: partial,
                            why: format!(
                                "its index does not hash to its digest and it has no chunk list ({} is missing)",
                                self.chunk_list_path(digest).display()
                            ),
                        });
                    }
                    r => r?,
                };
                // Pulled from a compressed blob: its blocks come from the blob's frames.
                let source = match crate::compressed::load_frames(&self.frames_path(digest), &layer)? {
                    Some((frames, layout)) => {
                        let framed =
                            FramedSource::new(source.clone(), *digest, frames, layout).map_err(|e| {
                                Error::FramesFile { path: self.frames_path(digest), why: e.to_string() }
                            })?;
                        Arc::new(framed) as Arc<dyn BlockSource>
                    }
                    None => source.clone(),
                };
                let layer =
                    PartialLayer::new(layer, source, *policy, background).with_in_use_lock(&self.root)?;
                // Blocks other layers of this store hold are copied rather than fetched.
                let layer = Arc::new(layer.with_reuse(self.engine.block_index(&self.root)));
                if let Some(cache) = self.engine.fetched_cache(&self.root) {
                    layer.attach_cache(cache);
                }
                layer.load_hashes_in_background();
                Ok((OpenLayer::Partial(layer), index))
            }
            _ if partial.exists() => Err(Error::LayerPartial { digest: *digest, store: self.root.clone() }),
            _ => Err(Error::LayerMissing { digest: *digest, store: self.root.clone() }),
        }
    }

    /// Like [`LayerStore::open_layer`], but a layer the store's engine already has open (through
    /// any store, with the same verification and the same block source) is shared rather than
    /// opened again: disks on the same layers then share one verified bitmap and one fetch state,
    /// so a block is checked once and a missing block is fetched once, whichever disk reads it.
    /// A partial layer opened this way reads ahead on the engine's background threads.
    pub fn open_layer_shared(&self, digest: &Digest, verify: bool) -> Result<(OpenLayer, LayerIndex)> {
        let complete = self.layer_path(digest);
        let (path, source) = if complete.exists() {
            (complete, 0)
        } else {
            let source = self.source.as_ref().map_or(0, |(s, _)| Arc::as_ptr(s) as *const () as usize);
            (self.partial_path(digest), source)
        };
        // Canonical, so that `a/disk1/../layers` and `a/disk2/../layers` (relative stores of two
        // disks made with `create --from`) name the same open layer.
        let path = std::fs::canonicalize(&path).or_else(|_| std::path::absolute(&path)).unwrap_or(path);
        let key = (path, verify, source);
        let cached = self.engine.open_layers().get(&key).and_then(OpenLayer::upgrade);
        if let Some(layer) = cached {
            let index = layer.read_index()?;
            return Ok((layer, index));
        }
        let (layer, index) = self.open_layer_with(digest, verify, Some(self.engine.background().clone()))?;
        let mut map = self.engine.open_layers();
        map.retain(|_, w| w.is_alive());
        map.insert(key, layer.downgrade());
        Ok((layer, index))
    }

    /// Adds a partial copy of layer `digest`, `len` bytes long, from its header (the first 4096
    /// bytes) and its tail (everything from the extent index to the end). Both are checked: the
    /// header decodes as a sealed layer's, the trailer's counts give exactly `len`, the index
    /// hashes to the trailer's index digest, which must equal `index_digest` (from a pinned
    /// manifest). Data blocks are then fetched on demand (see [`LayerStore::with_source`]).
    /// With `frames` (a layer pulled from a compressed blob) the blob's frame table, checked
    /// against the layer, is written beside the partial file ([`LayerStore::frames_path`])
    /// before the partial file is renamed into place.
    pub fn add_partial(
        &self,
        digest: &Digest,
        len: u64,
        header: &[u8],
        tail: &[u8],
        index_digest: &Digest,
        frames: Option<&FramesFile>,
    ) -> Result<PathBuf> {
        use mcow_format::{HEADER_SIZE, LayerHeader, TRAILER_SIZE, Trailer};
        let dest = self.partial_path(digest);
        let bad = |why: String| Error::Invalid(format!("layer {digest}: {why}"));
        let h = LayerHeader::decode(header).map_err(|e| bad(format!("header: {e}")))?;
        if tail.len() < TRAILER_SIZE {
            return Err(bad("tail is shorter than a trailer".into()));
        }
        let t =
            Trailer::decode(&tail[tail.len() - TRAILER_SIZE..]).map_err(|e| bad(format!("trailer: {e}")))?;
        if t.file_len(h.block_size) != len || t.index_len() + TRAILER_SIZE as u64 != tail.len() as u64 {
            return Err(bad(format!(
                "trailer implies {} bytes, the blob has {len}",
                t.file_len(h.block_size)
            )));
        }
        let actual = Digest::of(&tail[..tail.len() - TRAILER_SIZE]);
        if actual != t.index_digest || actual != *index_digest {
            return Err(bad(format!("index digest is {actual}, expected {index_digest}")));
        }
        if let Some(frames) = frames {
            Self::check_frames(digest, frames, h.block_size, len, tail.len() as u64, t.block_count)?;
        }
        let mut temp = self.temp_file("partial")?;
        let (tmp_path, f) = (temp.path().to_path_buf(), temp.file());
        use std::os::unix::fs::FileExt;
        f.set_len(len)
            .and_then(|_| f.write_all_at(&header[..HEADER_SIZE], 0))
            .and_then(|_| f.write_all_at(tail, len - tail.len() as u64))
            .and_then(|_| f.sync_all())
            .map_err(Error::io("write", &tmp_path))?;
        let dir = dest.parent().expect("partial path has a parent");
        fs::create_dir_all(dir).map_err(Error::io("create directory", dir))?;
        // The frame table first: a partial file of a compressed blob is never without it.
        self.put_frames(digest, frames)?;
        fs::rename(&tmp_path, &dest).map_err(Error::io("rename", &tmp_path))?;
        temp.persisted();
        sync_dir(dir)?;
        // The structure must open (index rules, lengths) before anyone relies on it.
        if let Err(e) = SealedLayer::open(&dest, *digest, FileSlot::new(self.engine.pool()), true, None) {
            let _ = fs::remove_file(&dest);
            let _ = fs::remove_file(self.frames_path(digest));
            return Err(e);
        }
        Ok(dest)
    }

    /// Adds a partial copy of layer `digest`, `len` bytes long, pulled with index chunks: its
    /// header (4096 bytes), its trailer (128 bytes), and some chunks of its index region
    /// (`(chunk, bytes)`), which must include every chunk of the extent index. Checked: the
    /// header decodes, the trailer's counts give exactly `len` and agree with `chunks`, its index
    /// digest equals `index_digest`, and each chunk matches its digest in `chunks`. The chunk
    /// list is written beside the partial file (atomically, before the partial file is renamed
    /// into place), so that a later open can check the chunks present and load the others;
    /// so is the frame table, with `frames`, as in [`LayerStore::add_partial`].
    #[allow(clippy::too_many_arguments)]
    pub fn add_partial_chunked(
        &self,
        digest: &Digest,
        len: u64,
        header: &[u8],
        trailer: &[u8],
        chunks: &IndexChunks,
        pieces: &[(usize, Vec<u8>)],
        index_digest: &Digest,
        frames: Option<&FramesFile>,
    ) -> Result<PathBuf> {
        use mcow_format::{HEADER_SIZE, LayerHeader, TRAILER_SIZE, Trailer};
        let dest = self.partial_path(digest);
        let bad = |why: String| Error::Invalid(format!("layer {digest}: {why}"));
        let h = LayerHeader::decode(header).map_err(|e| bad(format!("header: {e}")))?;
        let t = Trailer::decode(trailer).map_err(|e| bad(format!("trailer: {e}")))?;
        if t.file_len(h.block_size) != len || trailer.len() != TRAILER_SIZE {
            return Err(bad(format!(
                "trailer implies {} bytes, the blob has {len}",
                t.file_len(h.block_size)
            )));
        }
        if t.index_digest != *index_digest {
            return Err(bad(format!("index digest is {}, expected {index_digest}", t.index_digest)));
        }
        let region_len = t.index_len();
        chunks.check(region_len).map_err(|why| bad(format!("index chunks: {why}")))?;
        if chunks.extent_count != t.extent_count {
            return Err(bad(format!(
                "index chunks say {} extents, the trailer {}",
                chunks.extent_count, t.extent_count
            )));
        }
        let index_offset = t.index_offset(h.block_size);
        for (c, bytes) in pieces {
            let ok = *c < chunks.digests.len()
                && bytes.len() as u64 == chunks.range(*c, region_len).1
                && Digest::of(bytes) == chunks.digests[*c];
            if !ok {
                return Err(bad(format!("index chunk {c} does not match its digest")));
            }
        }
        if let Some(c) = chunks.extent_chunks().find(|c| !pieces.iter().any(|p| p.0 == *c)) {
            return Err(bad(format!("index chunk {c} (extents) is missing")));
        }
        if let Some(frames) = frames {
            let tail_len = region_len + TRAILER_SIZE as u64;
            Self::check_frames(digest, frames, h.block_size, len, tail_len, t.block_count)?;
        }
        let dir = dest.parent().expect("partial path has a parent");
        fs::create_dir_all(dir).map_err(Error::io("create directory", dir))?;
        // The chunk list and frame table first: a partial file is never without them.
        let sidecar = self.chunk_list_path(digest);
        self.write_sidecar(&sidecar, chunks.to_text().as_bytes(), "chunks")?;
        self.put_frames(digest, frames)?;
        use std::os::unix::fs::FileExt;
        let mut temp = self.temp_file("partial")?;
        let (tmp_path, f) = (temp.path().to_path_buf(), temp.file());
        let written = f
            .set_len(len)
            .and_then(|_| f.write_all_at(&header[..HEADER_SIZE], 0))
            .and_then(|_| {
                pieces.iter().try_for_each(|(c, bytes)| {
                    f.write_all_at(bytes, index_offset + chunks.range(*c, region_len).0)
                })
            })
            .and_then(|_| f.write_all_at(trailer, len - TRAILER_SIZE as u64))
            .and_then(|_| f.sync_all());
        written.map_err(Error::io("write", &tmp_path))?;
        fs::rename(&tmp_path, &dest).map_err(Error::io("rename", &tmp_path))?;
        temp.persisted();
        sync_dir(dir)?;
        // The structure must open (index rules, lengths) before anyone relies on it.
        let file = FileSlot::new(self.engine.pool());
        if let Err(e) = SealedLayer::open(&dest, *digest, file, true, Some(chunks.clone())) {
            let _ = fs::remove_file(&dest);
            let _ = fs::remove_file(&sidecar);
            let _ = fs::remove_file(self.frames_path(digest));
            return Err(e);
        }
        Ok(dest)
    }

    /// If the partial copy of `digest` now hashes to its digest (every block and index chunk
    /// fetched), moves it to the complete layers (and removes its chunk list and frame table);
    /// returns whether it did.
    ///
    /// With a cache limit (see [`crate::EngineConfig::cache_limit`]) partial copies stay
    /// partial (false): their blocks may be dropped at any time, so they are never complete
    /// layers.
    pub fn complete_partial(&self, digest: &Digest) -> Result<bool> {
        if self.engine.config().cache_limit.is_some() {
            return Ok(false);
        }
        let partial = self.partial_path(digest);
        if hash_file(&partial)? != *digest {
            return Ok(false);
        }
        self.move_in(&partial, digest)?;
        for sidecar in [self.chunk_list_path(digest), self.frames_path(digest)] {
            if let Err(e) = remove_if_present(&sidecar) {
                tracing::warn!(path = %sidecar.display(), error = %e, "could not remove a partial copy's sidecar")
            }
        }
        Ok(true)
    }

    /// Moves a downloaded layer file at `tmp` (inside this store's `tmp/` directory) into the
    /// store as layer `digest`, after checking that its bytes hash to that digest.
    pub fn adopt(&self, tmp: &Path, digest: &Digest) -> Result<PathBuf> {
        let actual = hash_file(tmp)?;
        if actual != *digest {
            let _ = fs::remove_file(tmp);
            return Err(Error::LayerDigest { path: tmp.to_path_buf(), expected: *digest, actual });
        }
        File::open(tmp).and_then(|f| f.sync_all()).map_err(Error::io("sync", tmp))?;
        self.move_in(tmp, digest)
    }

    /// Renames a checked file of this store's filesystem to its content-addressed name.
    pub(crate) fn move_in(&self, from: &Path, digest: &Digest) -> Result<PathBuf> {
        let dest = self.layer_path(digest);
        let dir = dest.parent().expect("blob path has a parent");
        fs::create_dir_all(dir).map_err(Error::io("create directory", dir))?;
        fs::rename(from, &dest).map_err(Error::io("rename", from))?;
        sync_dir(dir)?;
        self.engine.layer_added(&self.root, digest, &dest);
        Ok(dest)
    }

    /// The store's directory for files being written.
    pub fn tmp_path(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// A new temporary in the store's `tmp/` directory (created if missing), locked by this
    /// process while it lives. Every write to the store starts here, so it first removes the
    /// temporaries that dead processes left behind (see [`crate::temp`]).
    ///
    /// The first one also takes the store's lease (see the `lease` field), kept until this
    /// value and its clones are dropped or [`LayerStore::release_lease`] is called: a process
    /// that adds layers names them in a manifest before it lets go of its store.
    pub fn temp_file(&self, prefix: &str) -> Result<TempFile> {
        self.take_lease()?;
        let tmp = self.tmp_path();
        fs::create_dir_all(&tmp).map_err(Error::io("create directory", &tmp))?;
        stale_temporaries(&tmp, true)?;
        TempFile::create(&tmp, prefix)
    }

    /// Takes the store's lease if this value does not hold it yet (waiting while `mcow gc`
    /// runs on the store).
    fn take_lease(&self) -> Result<()> {
        let mut lease = self.lease.lock().unwrap_or_else(|p| p.into_inner());
        if lease.is_none() {
            let path = self.root.join(crate::users::GC_LOCK);
            let f = crate::users::open_gc_lock(&self.root).map_err(Error::io("open", &path))?;
            f.lock_shared().map_err(Error::io("lock", &path))?;
            *lease = Some(f);
        }
        Ok(())
    }

    /// Lets go of the store's lease (see [`LayerStore::temp_file`]): for a long-lived store
    /// value, once the layers it added are named in a manifest, so that `mcow gc` may run.
    pub fn release_lease(&self) {
        self.lease.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// The temporaries in the store's `tmp/` directory that no live process holds (left by a
    /// process that died while writing them); with `remove`, removes them.
    pub fn stale_temporaries(&self, remove: bool) -> Result<Vec<StaleTemp>> {
        stale_temporaries(&self.tmp_path(), remove)
    }

    /// Starts a new layer file in the store's `tmp/` directory.
    pub fn begin_layer(&self) -> Result<PendingLayer> {
        let temp = self.temp_file("layer")?;
        let file = temp.file().try_clone().map_err(Error::io("open", temp.path()))?;
        Ok(PendingLayer { temp, writer: Some(BufWriter::with_capacity(1 << 20, file)) })
    }
}

/// An open sealed layer, as the store found it: complete (immutable, checked as read) or
/// partial (its missing blocks fetched on demand). Derefs to the sealed layer's structure.
#[derive(Clone)]
pub enum OpenLayer {
    /// A complete layer of `blobs/sha256/`.
    Complete(Arc<SealedLayer>),
    /// A partial copy of `partial/sha256/`.
    Partial(Arc<PartialLayer>),
}

impl std::ops::Deref for OpenLayer {
    type Target = SealedLayer;

    fn deref(&self) -> &SealedLayer {
        match self {
            OpenLayer::Complete(l) => l,
            OpenLayer::Partial(p) => p.sealed(),
        }
    }
}

impl OpenLayer {
    /// True for a layer whose blocks may be fetched from a source.
    pub fn is_partial(&self) -> bool {
        matches!(self, OpenLayer::Partial(_))
    }

    /// The partial layer, if it is one.
    pub fn partial(&self) -> Option<&Arc<PartialLayer>> {
        match self {
            OpenLayer::Partial(p) => Some(p),
            OpenLayer::Complete(_) => None,
        }
    }

    /// Reads `buf.len()` bytes `offset` bytes into physical block `pblock` (see
    /// [`SealedLayer::read`]); a partial layer fetches what is not local.
    pub fn read(&self, pblock: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            OpenLayer::Complete(l) => l.read(pblock, offset, buf),
            OpenLayer::Partial(p) => p.read(pblock, offset, buf),
        }
    }

    /// [`OpenLayer::read`], counting the blocks of a partial layer in `tally`.
    pub(crate) fn read_counted(
        &self,
        pblock: u64,
        offset: u64,
        buf: &mut [u8],
        tally: Option<&ReadTally>,
    ) -> Result<()> {
        match self {
            OpenLayer::Complete(l) => l.read(pblock, offset, buf),
            OpenLayer::Partial(p) => p.read_counted(pblock, offset, buf, tally),
        }
    }

    /// Makes the blocks of a range local and checked without copying them out (counting the
    /// blocks of a partial layer in `tally`).
    pub(crate) fn make_ready(
        &self,
        pblock: u64,
        offset: u64,
        len: u64,
        tally: Option<&ReadTally>,
    ) -> Result<()> {
        match self {
            OpenLayer::Complete(l) => l.make_ready(pblock, offset, len),
            OpenLayer::Partial(p) => p.make_ready(pblock, offset, len, tally),
        }
    }

    /// Bytes of the data region present locally (all of them for a complete layer).
    pub fn local_bytes(&self) -> Result<u64> {
        match self {
            OpenLayer::Complete(l) => l.local_bytes(),
            OpenLayer::Partial(p) => p.local_bytes(),
        }
    }

    /// Fetches the missing blocks of `runs` (see `PartialLayer::fetch_runs`); nothing for a
    /// complete layer.
    pub fn fetch_runs(&self, runs: &[(u64, u64)]) -> Result<()> {
        match self {
            OpenLayer::Complete(_) => Ok(()),
            OpenLayer::Partial(p) => p.fetch_runs(runs),
        }
    }

    /// Makes every stored block local and checked, in order, until done or `stop` is set (see
    /// `PartialLayer::fetch_all`; a complete layer checks the blocks not yet checked).
    pub fn fetch_all(&self, stop: &std::sync::atomic::AtomicBool) -> Result<()> {
        match self {
            OpenLayer::Partial(p) => p.fetch_all(stop),
            OpenLayer::Complete(l) => {
                let bs = l.block_size();
                for pb in 0..l.trailer.block_count {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        return Ok(());
                    }
                    if !l.is_verified(pb) {
                        l.make_ready(pb, 0, bs)?;
                    }
                }
                Ok(())
            }
        }
    }

    fn upgrade(w: &WeakLayer) -> Option<OpenLayer> {
        match w {
            WeakLayer::Complete(w) => w.upgrade().map(OpenLayer::Complete),
            WeakLayer::Partial(w) => w.upgrade().map(OpenLayer::Partial),
        }
    }

    fn downgrade(&self) -> WeakLayer {
        match self {
            OpenLayer::Complete(l) => WeakLayer::Complete(Arc::downgrade(l)),
            OpenLayer::Partial(p) => WeakLayer::Partial(Arc::downgrade(p)),
        }
    }
}

/// A layer being written; dropped without `commit`, its temporary file is removed.
pub struct PendingLayer {
    temp: TempFile,
    writer: Option<BufWriter<File>>,
}

impl PendingLayer {
    /// The temporary file the layer is written to.
    pub fn path(&self) -> &Path {
        self.temp.path()
    }

    /// The buffered writer to hand to a `LayerWriter`.
    pub fn take_writer(&mut self) -> BufWriter<File> {
        self.writer.take().expect("writer taken once")
    }

    /// Makes the written file durable and moves it to its content-addressed name. If the store
    /// already holds that layer, the new copy is simply dropped.
    pub fn commit(mut self, store: &LayerStore, writer: BufWriter<File>, digest: &Digest) -> Result<PathBuf> {
        let path = self.temp.path().to_path_buf();
        let file = writer.into_inner().map_err(|e| Error::io("write", &path)(e.into_error()))?;
        file.sync_all().map_err(Error::io("sync", &path))?;
        drop(file);
        let dest = store.layer_path(digest);
        let dir = dest.parent().expect("blob path has a parent");
        fs::create_dir_all(dir).map_err(Error::io("create directory", dir))?;
        if !dest.exists() {
            fs::rename(&path, &dest).map_err(Error::io("rename", &path))?;
            self.temp.persisted();
            sync_dir(dir)?;
            store.engine.layer_added(&store.root, digest, &dest);
        }
        Ok(dest)
    }
}

/// Removes a file; one that is not there is fine.
fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io("remove", path)(e)),
        _ => Ok(()),
    }
}

/// SHA-256 of a whole file, read in 1 MiB steps.
pub fn hash_file(path: &Path) -> Result<Digest> {
    use std::io::Read;
    let mut f = File::open(path).map_err(Error::io("open", path))?;
    let mut hasher = mcow_format::Sha256Stream::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(Error::io("read", path))?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.update(&buf[..n]);
    }
}

/// Makes a directory's entries (a rename or a new file) durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(Error::io("sync directory", dir))
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(Error::io("create", &tmp))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(Error::io("write", &tmp))?;
    fs::rename(&tmp, path).map_err(Error::io("rename", &tmp))?;
    sync_dir(path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))
}
