//! Index chunks: a sealed layer's index region (extent index followed by block hash table) cut
//! into consecutive chunks with a SHA-256 each, so that a partial layer can hold and check its
//! hash table piece by piece (docs/FORMAT.md, "Config" and "Partial layers").
//!
//! Owns: the chunk list ([`IndexChunks`]: chunk size, extent count, digests), how push sizes the
//! chunks, the text form of the chunk list a partial layer keeps beside its file, and
//! `HashTable`, a layer's block hashes either whole or per chunk, each chunk usable only once
//! its bytes matched their digest. Does not own: fetching chunks (see `fetch`) or where the
//! chunk list file lives (see `store`).

use std::sync::{Mutex, OnceLock};

use mcow_format::{BLOCK_HASH_SIZE, BlockHash, Digest, INDEX_ENTRY_SIZE, decode_block_hashes};

/// The smallest chunk size push uses (and readers accept).
pub const MIN_CHUNK_SIZE: u64 = 16 << 10;
/// The largest chunk size readers accept (push never needs more: 256 chunks of 1 GiB would be a
/// layer of 2^33 stored blocks).
pub const MAX_CHUNK_SIZE: u64 = 1 << 30;
/// Push picks the smallest power-of-two chunk size (at least [`MIN_CHUNK_SIZE`]) that cuts the
/// index region into at most this many chunks.
pub const MAX_CHUNKS: u64 = 256;

/// First line of a chunk list file.
const FILE_MAGIC: &str = "mcow-index-chunks 1";

/// A layer's index region cut into chunks of `size` bytes (the last one shorter), and the
/// SHA-256 of each. `extent_count` says how much of the region is the extent index, so that a
/// lazy pull knows which chunks it needs before it has the trailer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexChunks {
    /// The length of each chunk but the last, in bytes.
    pub size: u64,
    /// The entries of the layer's extent index (the region's first part).
    pub extent_count: u64,
    /// The SHA-256 of each chunk, in order.
    pub digests: Vec<Digest>,
}

impl IndexChunks {
    /// The chunk size push uses for an index region of `region_len` bytes.
    pub fn size_for(region_len: u64) -> u64 {
        let mut size = MIN_CHUNK_SIZE;
        while region_len.div_ceil(size) > MAX_CHUNKS && size < MAX_CHUNK_SIZE {
            size *= 2;
        }
        size
    }

    /// The chunk list of index region `region` (extent index, then hash table) of a layer with
    /// `extent_count` extents, cut at [`IndexChunks::size_for`].
    pub fn of(region: &[u8], extent_count: u64) -> IndexChunks {
        let size = IndexChunks::size_for(region.len() as u64);
        let digests = region.chunks(size as usize).map(Digest::of).collect();
        IndexChunks { size, extent_count, digests }
    }

    /// Checks the list against the length of the region it describes: a chunk size in range, one
    /// digest per chunk, and an extent index that fits.
    pub fn check(&self, region_len: u64) -> Result<(), String> {
        if !self.size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.size) {
            return Err(format!(
                "chunk size {} is not a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}",
                self.size
            ));
        }
        let want = region_len.div_ceil(self.size);
        if self.digests.len() as u64 != want {
            return Err(format!(
                "{} chunk digests for an index of {region_len} bytes in chunks of {} (needs {want})",
                self.digests.len(),
                self.size
            ));
        }
        let extents = self.extent_count.checked_mul(INDEX_ENTRY_SIZE as u64);
        if extents.is_none_or(|e| e > region_len || !(region_len - e).is_multiple_of(BLOCK_HASH_SIZE as u64))
        {
            return Err(format!("{} extents do not fit an index of {region_len} bytes", self.extent_count));
        }
        Ok(())
    }

    /// Bytes of the extent index (at the start of the region).
    pub fn extents_len(&self) -> u64 {
        self.extent_count * INDEX_ENTRY_SIZE as u64
    }

    /// Where chunk `c` lies in a region of `region_len` bytes: (offset in the region, length).
    pub fn range(&self, c: usize, region_len: u64) -> (u64, u64) {
        let start = c as u64 * self.size;
        (start, self.size.min(region_len - start))
    }

    /// The chunks that hold some of the extent index: `0..n`.
    pub fn extent_chunks(&self) -> std::ops::Range<usize> {
        0..self.extents_len().div_ceil(self.size) as usize
    }

    /// The text form kept beside a partial layer: a first line naming the form, `chunk-size N`,
    /// `extent-count N`, then one digest a line.
    pub fn to_text(&self) -> String {
        let mut s = format!("{FILE_MAGIC}\nchunk-size {}\nextent-count {}\n", self.size, self.extent_count);
        for d in &self.digests {
            s.push_str(&d.to_string());
            s.push('\n');
        }
        s
    }

    /// Parses [`IndexChunks::to_text`]'s form (the caller then checks it with
    /// [`IndexChunks::check`]).
    pub fn parse_text(text: &str) -> Result<IndexChunks, String> {
        let mut lines = text.lines();
        if lines.next() != Some(FILE_MAGIC) {
            return Err(format!("does not start with {FILE_MAGIC:?}"));
        }
        let mut number = |key: &str| -> Result<u64, String> {
            lines
                .next()
                .and_then(|l| l.strip_prefix(key))
                .and_then(|v| v.strip_prefix(' '))
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("no {key} line"))
        };
        let size = number("chunk-size")?;
        let extent_count = number("extent-count")?;
        let digests =
            lines.map(|l| l.parse::<Digest>().map_err(|e| e.to_string())).collect::<Result<Vec<_>, _>>()?;
        Ok(IndexChunks { size, extent_count, digests })
    }
}

/// A layer's block hashes: the whole table (complete layers, and partial layers pulled without a
/// chunk list), or per chunk, where a chunk's hashes exist only once its bytes matched the
/// chunk's digest. A block whose hash is not there cannot be checked, so it is never verified.
pub(crate) enum HashTable {
    Whole(Vec<BlockHash>),
    Chunked(ChunkedHashes),
}

impl HashTable {
    /// The hash of stored block `p`, if it is known.
    pub(crate) fn get(&self, p: u64) -> Option<&BlockHash> {
        match self {
            HashTable::Whole(h) => h.get(p as usize),
            HashTable::Chunked(c) => c.get(p),
        }
    }

    /// The chunked table, if this one is.
    pub(crate) fn chunked(&self) -> Option<&ChunkedHashes> {
        match self {
            HashTable::Whole(_) => None,
            HashTable::Chunked(c) => Some(c),
        }
    }
}

/// A hash table kept per chunk (see [`HashTable`]).
pub(crate) struct ChunkedHashes {
    pub(crate) list: IndexChunks,
    /// Offset of the index region in the layer file, and its length.
    pub(crate) region_offset: u64,
    pub(crate) region_len: u64,
    /// Each chunk's block hashes, once its bytes matched its digest.
    loaded: Vec<OnceLock<Vec<BlockHash>>>,
    /// Held while a chunk is being loaded, so that readers of one chunk wait for one fetch.
    pub(crate) loading: Vec<Mutex<()>>,
}

impl ChunkedHashes {
    /// An empty table for `list` (checked against `region_len`), its region at `region_offset`.
    pub(crate) fn new(list: IndexChunks, region_offset: u64, region_len: u64) -> ChunkedHashes {
        let n = list.digests.len();
        ChunkedHashes {
            list,
            region_offset,
            region_len,
            loaded: (0..n).map(|_| OnceLock::new()).collect(),
            loading: (0..n).map(|_| Mutex::new(())).collect(),
        }
    }

    /// The chunk that holds the hash of stored block `p`.
    pub(crate) fn chunk_of(&self, p: u64) -> usize {
        ((self.list.extents_len() + p * BLOCK_HASH_SIZE as u64) / self.list.size) as usize
    }

    /// The first stored block whose hash chunk `c` holds (for `c` past the last chunk: past the
    /// last block).
    pub(crate) fn first_block(&self, c: usize) -> u64 {
        let start = (c as u64 * self.list.size).max(self.list.extents_len());
        (start - self.list.extents_len()) / BLOCK_HASH_SIZE as u64
    }

    fn get(&self, p: u64) -> Option<&BlockHash> {
        let c = self.chunk_of(p);
        self.loaded.get(c)?.get()?.get((p - self.first_block(c)) as usize)
    }

    pub(crate) fn is_loaded(&self, c: usize) -> bool {
        self.loaded[c].get().is_some()
    }

    /// Whether every chunk is loaded.
    pub(crate) fn all_loaded(&self) -> bool {
        self.loaded.iter().all(|l| l.get().is_some())
    }

    /// The chunks not loaded yet.
    pub(crate) fn missing(&self) -> Vec<usize> {
        (0..self.loaded.len()).filter(|&c| !self.is_loaded(c)).collect()
    }

    /// Where chunk `c` lies in the layer file: (offset, length).
    pub(crate) fn file_range(&self, c: usize) -> (u64, u64) {
        let (start, len) = self.list.range(c, self.region_len);
        (self.region_offset + start, len)
    }

    /// Whether `bytes` are chunk `c`'s (they hash to its digest).
    pub(crate) fn matches(&self, c: usize, bytes: &[u8]) -> bool {
        bytes.len() as u64 == self.file_range(c).1 && Digest::of(bytes) == self.list.digests[c]
    }

    /// Takes chunk `c`'s bytes, which must match its digest; returns whether they did (and the
    /// chunk's hashes are now usable).
    pub(crate) fn install(&self, c: usize, bytes: &[u8]) -> bool {
        if !self.matches(c, bytes) {
            return false;
        }
        let _ = self.loaded[c].set(self.hashes_in(c, bytes));
        true
    }

    /// The block hashes held by `bytes`, chunk `c`'s bytes (which the caller has checked), from
    /// block [`ChunkedHashes::first_block`] on.
    pub(crate) fn hashes_in(&self, c: usize, bytes: &[u8]) -> Vec<BlockHash> {
        let start = c as u64 * self.list.size;
        let skip = self.list.extents_len().saturating_sub(start).min(bytes.len() as u64) as usize;
        decode_block_hashes(&bytes[skip..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tried: regions of several lengths and extent counts. Must hold: push's chunk size keeps a
    /// layer at most 256 chunks and at least 16 KiB each; the text form parses back; a loaded
    /// chunk gives exactly the hashes at their block numbers, and a chunk whose bytes are off
    /// gives none.
    #[test]
    fn chunks_size_parse_and_give_the_right_hashes() {
        assert_eq!(IndexChunks::size_for(0), MIN_CHUNK_SIZE);
        assert_eq!(IndexChunks::size_for(256 * MIN_CHUNK_SIZE), MIN_CHUNK_SIZE);
        assert_eq!(IndexChunks::size_for(256 * MIN_CHUNK_SIZE + 1), 2 * MIN_CHUNK_SIZE);
        assert!((1u64 << 35).div_ceil(IndexChunks::size_for(1 << 35)) <= MAX_CHUNKS);

        let (extents, blocks) = (700u64, 2000u64);
        let mut region = vec![0xeeu8; (extents * 32) as usize];
        for p in 0..blocks {
            region.extend_from_slice(&[(p % 251) as u8; 32]);
        }
        let list = IndexChunks::of(&region, extents);
        assert_eq!(list.size, MIN_CHUNK_SIZE);
        list.check(region.len() as u64).unwrap();
        assert!(list.check(region.len() as u64 + 32 * 1024).is_err());
        assert_eq!(IndexChunks::parse_text(&list.to_text()).unwrap(), list);
        assert!(IndexChunks::parse_text("mcow-index-chunks 1\nchunk-size x\n").is_err());

        let t = ChunkedHashes::new(list.clone(), 4096, region.len() as u64);
        assert!((0..blocks).all(|p| t.get(p).is_none()), "nothing is known before a chunk loads");
        for c in 0..list.digests.len() {
            let (at, len) = t.file_range(c);
            let mut bytes = region[(at - 4096) as usize..(at - 4096 + len) as usize].to_vec();
            bytes[0] ^= 1;
            assert!(!t.install(c, &bytes), "a changed chunk is refused");
            bytes[0] ^= 1;
            assert!(t.install(c, &bytes));
        }
        assert!(t.all_loaded());
        for p in 0..blocks {
            assert_eq!(t.get(p).unwrap().0, [(p % 251) as u8; 32], "block {p}");
        }
        assert!(t.get(blocks).is_none());
    }
}
