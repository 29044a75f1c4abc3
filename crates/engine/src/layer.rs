//! Sealed layers: reading one (header, trailer, index, verified blocks) and writing one.
//!
//! Owns: opening a sealed layer file and checking its structure, reading its blocks with
//! per-block hash verification (the read path is generic over `Blocks`, how unverified blocks
//! are made good, so that a partial layer reuses it), and the streaming writer that produces a
//! new sealed layer in canonical form; and [`ReadTally`], the count a disk keeps of how its
//! reads found the blocks of partial layers (local or fetched). Does not own: partial layers and fetching the blocks they
//! lack (see `fetch`, whose `PartialLayer` wraps a `SealedLayer`),
//! combining layers (see `stack`), naming files (see `store`), keeping files open (see `pool`).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use mcow_format::{
    BLOCK_HASH_SIZE, BlockHash, BlockHashKind, Digest, ExtentKind, HEADER_SIZE, INDEX_ENTRY_SIZE, IndexEntry,
    LayerHeader, LayerKind, Sha256Stream, TRAILER_SIZE, Trailer, decode_block_hashes, decode_index,
    encode_index_entry, validate_index,
};

use crate::bitmap::AtomicBitmap;
use crate::chunks::{ChunkedHashes, HashTable, IndexChunks};
use crate::error::{Error, Result};
use crate::pool::FileSlot;

/// How a disk's reads found the blocks of its partial (lazily fetched) layers: the cache-hit
/// counts. A read counts once each block it touches: a **hit** if the block was local (fetched
/// before, by any reader, read-ahead or an earlier process), a **miss** if the read had to
/// fetch it or wait for a fetch under way. Reads of complete layers and of the writable top
/// are not counted.
#[derive(Debug, Default)]
pub struct ReadTally {
    hits: std::sync::atomic::AtomicU64,
    misses: std::sync::atomic::AtomicU64,
}

/// A snapshot of a [`ReadTally`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheReads {
    /// Block reads of partial layers that found the block local.
    pub hits: u64,
    /// Block reads of partial layers that fetched the block or waited for its fetch.
    pub misses: u64,
}

impl ReadTally {
    /// Counts `n` block reads that found their blocks local.
    pub(crate) fn hit(&self, n: u64) {
        self.hits.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts one block read, local (`true`) or not.
    pub(crate) fn count(&self, local: bool) {
        let c = if local { &self.hits } else { &self.misses };
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The counts so far.
    pub fn get(&self) -> CacheReads {
        use std::sync::atomic::Ordering::Relaxed;
        CacheReads { hits: self.hits.load(Relaxed), misses: self.misses.load(Relaxed) }
    }
}

/// An open sealed layer. Its blocks are verified against their hashes the first time they are
/// read (a bit per block remembers it), so later reads of the same block go straight to the file.
pub struct SealedLayer {
    /// The layer's name: the SHA-256 of its bytes.
    pub digest: Digest,
    /// Its file.
    pub path: PathBuf,
    /// Its header.
    pub header: LayerHeader,
    /// Its trailer (where the index is, and its digest).
    pub trailer: Trailer,
    /// The block hashes: whole, or per chunk as they are loaded (a partial layer pulled with
    /// index chunks, see `chunks`).
    pub(crate) hashes: HashTable,
    /// Blocks checked against their hashes (for a partial layer: also written locally first).
    pub(crate) verified: AtomicBitmap,
    pub(crate) verify: bool,
    pub(crate) file: FileSlot,
}

/// What `SealedLayer::open` reads besides the layer itself: its extents, used once to build the
/// stack's map and then dropped.
pub type LayerIndex = Vec<IndexEntry>;

impl SealedLayer {
    /// Opens and checks a sealed layer: header, trailer, file length, index digest and index
    /// rules. Costs a few reads and time proportional to the layer's extents and blocks. With
    /// `chunks` (a partial layer pulled with index chunks), the index region is checked chunk by
    /// chunk instead: the extent index's chunks must match, the hash table's chunks that match
    /// are loaded, the others wait to be fetched.
    pub(crate) fn open(
        path: &Path,
        digest: Digest,
        file: FileSlot,
        verify: bool,
        chunks: Option<IndexChunks>,
    ) -> Result<(SealedLayer, LayerIndex)> {
        let f = file.get(path)?;
        let (header, trailer, index, hashes) = read_structure(&f, path, chunks)?;
        let blocks = trailer.block_count;
        let layer = SealedLayer {
            digest,
            path: path.to_path_buf(),
            header,
            trailer,
            hashes,
            verified: AtomicBitmap::new(blocks),
            verify,
            file,
        };
        Ok((layer, index))
    }

    /// The layer's block size in bytes.
    pub fn block_size(&self) -> u64 {
        u64::from(self.header.block_size)
    }

    /// Bytes of the data region (stored blocks) present in the local file: for a complete layer,
    /// all of them. (For a partial layer, `PartialLayer::local_bytes`: the allocated ranges of its data region, found with
    /// `SEEK_DATA`/`SEEK_HOLE`: a partial file starts sparse and fetched blocks are written only
    /// once they match their hashes, so allocation is what is local (a block torn by a crash
    /// mid-write counts too, and is fetched again when read). Filesystems without `SEEK_DATA`
    /// fall back to checking every block's hash.)
    pub fn local_bytes(&self) -> Result<u64> {
        Ok(self.trailer.block_count * self.block_size())
    }

    /// The allocated bytes of the data region of the local file (see
    /// [`SealedLayer::local_bytes`] and `PartialLayer::local_bytes`).
    pub(crate) fn allocated_bytes(&self) -> Result<u64> {
        let data_len = self.trailer.block_count * self.block_size();
        if data_len == 0 {
            return Ok(data_len);
        }
        let f = File::open(&self.path).map_err(Error::io("open", &self.path))?;
        let (start, end) = (HEADER_SIZE as u64, HEADER_SIZE as u64 + data_len);
        let (mut pos, mut total) = (start, 0u64);
        use rustix::fs::{SeekFrom, seek};
        while pos < end {
            let data = match seek(&f, SeekFrom::Data(pos)) {
                Ok(o) => o,
                Err(rustix::io::Errno::NXIO) => break,
                Err(_) => return self.local_bytes_by_hash(&f),
            };
            if data >= end {
                break;
            }
            let hole = seek(&f, SeekFrom::Hole(data)).unwrap_or(end).min(end);
            total += hole - data;
            pos = hole;
        }
        Ok(total.min(data_len))
    }

    /// [`SealedLayer::local_bytes`] the slow way: the blocks of the local file that match their
    /// hashes.
    fn local_bytes_by_hash(&self, f: &File) -> Result<u64> {
        let bs = self.block_size();
        let mut block = vec![0u8; bs as usize];
        let mut total = 0;
        for p in 0..self.trailer.block_count {
            read_exact_at(f, &mut block, HEADER_SIZE as u64 + p * bs, &self.path)?;
            if self.block_matches(p, &block) {
                total += bs;
            }
        }
        Ok(total)
    }

    /// Whether `block` (a whole stored block) matches the hash recorded for block `pblock`,
    /// without recording anything.
    /// A block whose hash is not loaded yet (a partial layer's hash chunk not fetched) matches
    /// nothing.
    pub fn block_matches(&self, pblock: u64, block: &[u8]) -> bool {
        self.hashes.get(pblock).is_some_and(|h| self.header.block_hash.of(block) == *h)
    }

    /// Whether the hash of stored block `pblock` is known: always, except in a partial layer
    /// whose hash table chunk that holds it is not loaded yet.
    pub fn hash_known(&self, pblock: u64) -> bool {
        self.hashes.get(pblock).is_some()
    }

    /// Size of the layer file in bytes.
    pub fn file_len(&self) -> u64 {
        self.trailer.file_len(self.header.block_size)
    }

    /// Re-reads this layer's extent index (for operations that merge layers).
    pub fn read_index(&self) -> Result<LayerIndex> {
        let f = self.file.get(&self.path)?;
        let chunks = self.hashes.chunked().map(|c| c.list.clone());
        Ok(read_structure(&f, &self.path, chunks)?.2)
    }

    /// Whether `pblock` was checked (and, in a partial layer, written). A thread that sees the
    /// bit also sees the block's bytes that the marking thread wrote to the file before marking
    /// it (the bitmap's Acquire/Release).
    pub(crate) fn is_verified(&self, pblock: u64) -> bool {
        self.verified.get(pblock)
    }

    /// Records that `pblock` is checked; call only after its bytes are in the file.
    pub(crate) fn mark_verified(&self, pblock: u64) {
        self.verified.set(pblock);
    }

    /// Reads `buf.len()` bytes starting `offset` bytes into physical block `pblock`; the range
    /// may span consecutive physical blocks. Unverified blocks are read whole and checked first.
    pub fn read(&self, pblock: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        read_blocks(self, pblock, offset, buf, None)
    }

    /// Checks the blocks under `len` bytes from `offset` into physical block `pblock`, like
    /// [`SealedLayer::read`] but without copying them out: afterwards they may be read through
    /// the map.
    pub(crate) fn make_ready(&self, pblock: u64, offset: u64, len: u64) -> Result<()> {
        make_ready_blocks(self, pblock, offset, len, None)
    }

    /// Reads without checking hashes: for blocks already verified (or with verification off).
    pub(crate) fn read_trusted(&self, pblock: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        let f = self.file.get(&self.path)?;
        read_exact_at(&f, buf, HEADER_SIZE as u64 + pblock * self.block_size() + offset, &self.path)
    }

    /// Maps the layer's data region read-only (physical block `p` at `p * block_size`).
    /// `None` for a layer without data or where mapping fails (then reads use `pread`).
    pub(crate) fn map_data(&self) -> Option<memmap2::Mmap> {
        let len = usize::try_from(self.trailer.block_count.checked_mul(self.block_size())?).ok()?;
        if len == 0 {
            return None;
        }
        let f = self.file.get(&self.path).ok()?;
        // SAFETY: the bytes read through the map do not change while they are read: mcow
        // never rewrites, truncates or replaces a sealed layer file in place (new layers get
        // new names); in a partial layer, a block is written (when fetched and checked; two
        // fetches that race write the same checked bytes, so its content never changes once
        // it is right) before it is marked verified (a Release store after the write returned), and the map
        // is read only for blocks seen verified (an Acquire load), so the write happens before
        // the read on every thread. Its
        // length was checked against the trailer at open, so the whole range exists. Another
        // process truncating the file while it is mapped would make reads fault (SIGBUS);
        // docs/FORMAT.md says sealed layers must not be modified.
        let map = unsafe { memmap2::MmapOptions::new().offset(HEADER_SIZE as u64).len(len).map(&*f) };
        map.ok()
    }

    /// Whether reads check block hashes.
    pub fn verifies(&self) -> bool {
        self.verify
    }

    /// Checks one whole block against its recorded hash and remembers the result.
    pub fn check_block(&self, pblock: u64, block: &[u8]) -> Result<()> {
        if !self.block_matches(pblock, block) {
            tracing::error!(layer = %self.path.display(), pblock, "block fails its checksum");
            return Err(Error::BlockChecksum { path: self.path.clone(), pblock });
        }
        self.mark_verified(pblock);
        Ok(())
    }
}

/// How the slow path of a read makes a layer's unverified blocks good: a complete layer checks
/// its local bytes ([`SealedLayer`]), a partial one also fetches what is missing (see `fetch`).
pub(crate) trait Blocks {
    /// The layer's structure and file.
    fn layer(&self) -> &SealedLayer;
    /// Before a read of blocks `first..=last`: waits for fetches that hold them, if any.
    fn wait_for_run(&self, first: u64, last: u64) -> Result<()>;
    /// Fills `block` with stored block `pblock`, checked and recorded as verified, for a read
    /// that covers the blocks up to `end`. Returns whether it was local (not fetched, nor
    /// waited for while another reader fetched it).
    fn ensure_block(&self, f: &File, pblock: u64, block: &mut [u8], end: u64) -> Result<bool>;
}

impl Blocks for SealedLayer {
    fn layer(&self) -> &SealedLayer {
        self
    }

    fn wait_for_run(&self, _first: u64, _last: u64) -> Result<()> {
        Ok(())
    }

    fn ensure_block(&self, f: &File, pblock: u64, block: &mut [u8], _end: u64) -> Result<bool> {
        read_exact_at(f, block, HEADER_SIZE as u64 + pblock * self.block_size(), &self.path)?;
        self.check_block(pblock, block)?;
        Ok(true)
    }
}

/// Reads `buf.len()` bytes starting `offset` bytes into physical block `pblock`; the range
/// may span consecutive physical blocks. Unverified blocks are read whole and checked first.
/// With `tally`, each block read is counted there.
pub(crate) fn read_blocks(
    b: &impl Blocks,
    pblock: u64,
    offset: u64,
    buf: &mut [u8],
    tally: Option<&ReadTally>,
) -> Result<()> {
    let layer = b.layer();
    if buf.is_empty() {
        return Ok(());
    }
    let bs = layer.block_size();
    let first = pblock + offset / bs;
    let last = pblock + (offset + buf.len() as u64 - 1) / bs;
    if last >= layer.trailer.block_count {
        return Err(Error::Invalid(format!(
            "{}: read of block {last} past the stored blocks",
            layer.path.display()
        )));
    }
    if !layer.verify || (first..=last).all(|b| layer.is_verified(b)) {
        if let Some(t) = tally {
            t.hit(last - first + 1);
        }
        return layer.read_trusted(pblock, offset, buf);
    }
    // Slow path, once per block: check whole blocks, copy out the asked-for part.
    let was = local_at_start(layer, first, last, tally);
    if last > first {
        b.wait_for_run(first, last)?;
    }
    let mut block = vec![0u8; bs as usize];
    let f = layer.file.get(&layer.path)?;
    let mut done = 0usize;
    let mut at = pblock * bs + offset; // offset within the data region
    while done < buf.len() {
        let (pb, within) = (at / bs, (at % bs) as usize);
        let n = (bs as usize - within).min(buf.len() - done);
        let local = if layer.is_verified(pb) {
            read_exact_at(&f, &mut buf[done..done + n], HEADER_SIZE as u64 + at, &layer.path)?;
            was.get((pb - first) as usize).copied().unwrap_or(true)
        } else {
            let local = b.ensure_block(&f, pb, &mut block, last + 1)?;
            buf[done..done + n].copy_from_slice(&block[within..within + n]);
            local
        };
        if let Some(t) = tally {
            t.count(local);
        }
        done += n;
        at += n as u64;
    }
    Ok(())
}

/// Makes the blocks under `len` bytes from `offset` into physical block `pblock` local and
/// checked, like [`read_blocks`] but without copying them out: afterwards they may be
/// read through the map. Blocks another reader fetched are not read back. With `tally`, each
/// block is counted there as [`read_blocks`] would.
pub(crate) fn make_ready_blocks(
    b: &impl Blocks,
    pblock: u64,
    offset: u64,
    len: u64,
    tally: Option<&ReadTally>,
) -> Result<()> {
    let layer = b.layer();
    if len == 0 {
        return Ok(());
    }
    let bs = layer.block_size();
    let first = pblock + offset / bs;
    let last = pblock + (offset + len - 1) / bs;
    if last >= layer.trailer.block_count {
        return Err(Error::Invalid(format!(
            "{}: read of block {last} past the stored blocks",
            layer.path.display()
        )));
    }
    let was = local_at_start(layer, first, last, tally);
    if last > first {
        b.wait_for_run(first, last)?;
    }
    let mut block = Vec::new();
    for p in first..=last {
        let local = if layer.is_verified(p) {
            was.get((p - first) as usize).copied().unwrap_or(true)
        } else {
            block.resize(bs as usize, 0);
            let f = layer.file.get(&layer.path)?;
            b.ensure_block(&f, p, &mut block, last + 1)?
        };
        if let Some(t) = tally {
            t.count(local);
        }
    }
    Ok(())
}

/// For counting a read of blocks `first..=last` in `tally` (none: nothing to count): which
/// were verified when the read began. A block verified later in the read was fetched for it
/// (by the fetch of an earlier block of the read, which took it along) or by another reader
/// it waited for: a miss, though the read finds it verified.
fn local_at_start(layer: &SealedLayer, first: u64, last: u64, tally: Option<&ReadTally>) -> Vec<bool> {
    match tally {
        Some(_) => (first..=last).map(|p| layer.is_verified(p)).collect(),
        None => Vec::new(),
    }
}

pub(crate) fn read_exact_at(f: &File, buf: &mut [u8], pos: u64, path: &Path) -> Result<()> {
    use std::os::unix::fs::FileExt;
    f.read_exact_at(buf, pos).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::Format {
                path: path.to_path_buf(),
                err: mcow_format::FormatError::Truncated { what: "layer data", got: 0, need: buf.len() },
            }
        } else {
            Error::io("read", path)(e)
        }
    })
}

/// Reads and checks the header, trailer, index and hash table of a sealed layer file (with
/// `chunks`, chunk by chunk: see [`SealedLayer::open`]).
fn read_structure(
    f: &File,
    path: &Path,
    chunks: Option<IndexChunks>,
) -> Result<(LayerHeader, Trailer, LayerIndex, HashTable)> {
    let len = f.metadata().map_err(Error::io("stat", path))?.len();
    let min = (HEADER_SIZE + TRAILER_SIZE) as u64;
    if len < min {
        return Err(Error::format(path)(mcow_format::FormatError::Truncated {
            what: "sealed layer",
            got: len as usize,
            need: min as usize,
        }));
    }
    let mut hb = vec![0u8; HEADER_SIZE];
    read_exact_at(f, &mut hb, 0, path)?;
    let header = LayerHeader::decode(&hb).map_err(Error::format(path))?;
    if header.kind != LayerKind::Sealed {
        return Err(Error::WrongKind {
            path: path.to_path_buf(),
            expected: "sealed layer",
            found: "writable top",
        });
    }
    let mut tb = [0u8; TRAILER_SIZE];
    read_exact_at(f, &mut tb, len - TRAILER_SIZE as u64, path)?;
    let trailer = Trailer::decode(&tb).map_err(Error::format(path))?;
    let expect = trailer.file_len(header.block_size);
    if expect != len {
        return Err(Error::format(path)(mcow_format::FormatError::invalid_len(len, expect)));
    }
    let mut ib = vec![0u8; trailer.index_len() as usize];
    let index_offset = trailer.index_offset(header.block_size);
    read_exact_at(f, &mut ib, index_offset, path)?;
    let split = trailer.extent_count as usize * INDEX_ENTRY_SIZE;
    if let Some(list) = chunks {
        let bad = |why: String| Error::ChunkList { path: path.to_path_buf(), why };
        list.check(ib.len() as u64).map_err(bad)?;
        if list.extent_count != trailer.extent_count {
            return Err(bad(format!(
                "it says {} extents, the trailer {}",
                list.extent_count, trailer.extent_count
            )));
        }
        let table = ChunkedHashes::new(list, index_offset, ib.len() as u64);
        for c in 0..table.list.digests.len() {
            let (at, len) = table.list.range(c, ib.len() as u64);
            let bytes = &ib[at as usize..(at + len) as usize];
            if !table.install(c, bytes) && table.list.extent_chunks().contains(&c) {
                return Err(bad(format!("chunk {c} of the extent index does not match its digest")));
            }
        }
        // Once whole, the region must also be what the trailer names.
        if table.all_loaded() && Digest::of(&ib) != trailer.index_digest {
            return Err(bad("the chunks match but the index does not hash to the trailer's digest".into()));
        }
        let index = decode_index(&ib[..split]).map_err(Error::format(path))?;
        validate_index(&index, header.block_count(), trailer.block_count).map_err(Error::format(path))?;
        return Ok((header, trailer, index, HashTable::Chunked(table)));
    }
    let actual = Digest::of(&ib);
    if actual != trailer.index_digest {
        return Err(Error::format(path)(mcow_format::FormatError::IndexDigestMismatch {
            expected: trailer.index_digest,
            actual,
        }));
    }
    let index = decode_index(&ib[..split]).map_err(Error::format(path))?;
    validate_index(&index, header.block_count(), trailer.block_count).map_err(Error::format(path))?;
    let hashes = decode_block_hashes(&ib[split..]);
    debug_assert_eq!(hashes.len() * BLOCK_HASH_SIZE, ib.len() - split);
    Ok((header, trailer, index, HashTable::Whole(hashes)))
}

/// Writes a new sealed layer front to back through any `Write`, hashing as it goes. Extents
/// must be pushed in ascending virtual order; neighbouring runs are merged.
pub struct LayerWriter<W: Write> {
    out: W,
    hasher: Sha256Stream,
    header: LayerHeader,
    entries: Vec<IndexEntry>,
    hashes: Vec<BlockHash>,
    next_vblock: u64,
    written: u64,
}

impl<W: Write> LayerWriter<W> {
    /// Starts a sealed layer of a disk of `virtual_size` bytes in `block_size` blocks, made on
    /// the stack whose chain digest is `parent`, writing its header to `out`.
    pub fn new(mut out: W, block_size: u32, virtual_size: u64, parent: Digest) -> std::io::Result<Self> {
        let header = LayerHeader {
            kind: LayerKind::Sealed,
            block_size,
            virtual_size,
            parent,
            instance: [0; 16],
            compat_features: 0,
            block_hash: BlockHashKind::Blake3,
        };
        let hb = header.encode();
        out.write_all(&hb)?;
        let mut hasher = Sha256Stream::new();
        hasher.update(&hb);
        Ok(LayerWriter {
            out,
            hasher,
            header,
            entries: Vec::new(),
            hashes: Vec::new(),
            next_vblock: 0,
            written: HEADER_SIZE as u64,
        })
    }

    fn check_order(&mut self, vblock: u64, count: u64) -> std::io::Result<()> {
        if vblock < self.next_vblock || vblock + count > self.header.block_count() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "extent out of order or range",
            ));
        }
        self.next_vblock = vblock + count;
        Ok(())
    }

    fn push_entry(&mut self, e: IndexEntry) {
        if let Some(last) = self.entries.last_mut()
            && last.kind == e.kind
            && last.end() == e.vblock
            && (e.kind != ExtentKind::Data || last.pblock + last.count == e.pblock)
        {
            last.count += e.count;
            return;
        }
        self.entries.push(e);
    }

    /// Stores one whole block (exactly the block size) for virtual block `vblock`.
    pub fn push_block(&mut self, vblock: u64, block: &[u8]) -> std::io::Result<()> {
        assert_eq!(block.len(), self.header.block_size as usize, "push_block takes whole blocks");
        self.check_order(vblock, 1)?;
        self.out.write_all(block)?;
        self.hasher.update(block);
        let pblock = self.hashes.len() as u64;
        self.hashes.push(self.header.block_hash.of(block));
        self.written += block.len() as u64;
        self.push_entry(IndexEntry { vblock, count: 1, kind: ExtentKind::Data, pblock });
        Ok(())
    }

    /// Records a zero or discarded run (no data stored).
    pub fn push_marker(&mut self, vblock: u64, count: u64, kind: ExtentKind) -> std::io::Result<()> {
        assert_ne!(kind, ExtentKind::Data);
        self.check_order(vblock, count)?;
        self.push_entry(IndexEntry { vblock, count, kind, pblock: 0 });
        Ok(())
    }

    /// Number of data blocks stored so far.
    pub fn stored_blocks(&self) -> u64 {
        self.hashes.len() as u64
    }

    /// Writes index, hash table and trailer; returns the writer, the layer digest and its length.
    pub fn finish(mut self) -> std::io::Result<(W, Digest, u64)> {
        let mut tail = Vec::with_capacity(
            self.entries.len() * INDEX_ENTRY_SIZE + self.hashes.len() * BLOCK_HASH_SIZE + 128,
        );
        for e in &self.entries {
            tail.extend_from_slice(&encode_index_entry(e));
        }
        for h in &self.hashes {
            tail.extend_from_slice(&h.0);
        }
        let trailer = Trailer {
            block_count: self.hashes.len() as u64,
            extent_count: self.entries.len() as u64,
            index_digest: Digest::of(&tail),
        };
        tail.extend_from_slice(&trailer.encode());
        self.out.write_all(&tail)?;
        self.hasher.update(&tail);
        self.written += tail.len() as u64;
        self.out.flush()?;
        Ok((self.out, self.hasher.finish(), self.written))
    }
}
