//! Compressed layer blobs: a sealed layer as it travels over the network, each stored block a
//! zstd frame of its own, and the frame table that makes any run of blocks one byte range.
//!
//! Owns: the blob layout (header, frames, frame table, the layer's tail), the frame table's
//! encoding and the rules a table must meet, compressing one block into a frame and decoding one
//! frame into at most one block, and the `.frames` file a partial layer keeps beside it. Does not
//! own: reading or writing files or fetching ranges (the engine and mcow-remote do), or which
//! level a push compresses at (its caller chooses; [`DEFAULT_LEVEL`] is the default).
//!
//! A blob is the layer with its data region replaced:
//!
//! ```text
//! 0                 the layer's header (4096 bytes, unchanged)
//! 4096              frames: one per stored block, physical block order
//! table_offset      frame table: block_count + 1 little-endian u64 blob offsets
//! table_offset + 8 * (block_count + 1)
//!                   the layer's tail, unchanged (extent index, block hash table, trailer)
//! ```
//!
//! Entry `p` of the table is where frame `p` starts, entry `block_count` is `table_offset`, so
//! frame `p` is `offset[p] .. offset[p + 1]`. A frame exactly `block_size` long is the block
//! itself (it did not shrink); a shorter one is one zstd frame that decodes to exactly
//! `block_size` bytes.

use crate::{Digest, FormatError, HEADER_SIZE, le_u64};

/// Bytes per frame table entry.
pub const FRAME_ENTRY_SIZE: usize = 8;

/// The zstd level a push uses unless told otherwise. Level 3 is zstd's own default: on the
/// images we measure it compresses within a few percent of level 9 at several times its speed
/// (docs/BENCHMARKS.md, "Compression"); decoding speed hardly depends on the level.
pub const DEFAULT_LEVEL: i32 = 3;

/// The levels a caller may choose (zstd's normal range; negative "fast" levels are not offered).
pub const LEVELS: std::ops::RangeInclusive<i32> = 1..=19;

/// A compressed blob's frame table: where each stored block's frame lies in the blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameTable {
    /// `block_count + 1` offsets, ascending; the last is the table's own offset.
    offsets: Vec<u64>,
}

impl FrameTable {
    /// The table of frames of these lengths, laid out from the end of the header.
    pub fn from_lengths(lengths: impl IntoIterator<Item = u64>) -> FrameTable {
        let mut offsets = vec![HEADER_SIZE as u64];
        let mut at = HEADER_SIZE as u64;
        for len in lengths {
            at += len;
            offsets.push(at);
        }
        FrameTable { offsets }
    }

    /// Bytes of the encoded table of a layer of `block_count` stored blocks (saturating: a
    /// count no table can have gives `u64::MAX`, which no length meets, rather than overflow).
    pub fn encoded_len(block_count: u64) -> u64 {
        block_count.saturating_add(1).saturating_mul(FRAME_ENTRY_SIZE as u64)
    }

    pub fn encode(&self) -> Vec<u8> {
        self.offsets.iter().flat_map(|o| o.to_le_bytes()).collect()
    }

    /// Decodes and checks the table of a layer of `block_count` blocks of `block_size` bytes:
    /// exactly `block_count + 1` entries, the first at the end of the header, every frame
    /// between 1 and `block_size` bytes long. (That the last entry is where the table lies in
    /// its blob is for the caller to check against the blob's length: see [`BlobLayout`].)
    pub fn decode(bytes: &[u8], block_count: u64, block_size: u32) -> Result<FrameTable, FormatError> {
        let need = usize::try_from(Self::encoded_len(block_count))
            .map_err(|_| FormatError::invalid("frame table", "too many blocks"))?;
        if bytes.len() != need {
            return Err(FormatError::Truncated { what: "frame table", got: bytes.len(), need });
        }
        let offsets: Vec<u64> =
            (0..bytes.len()).step_by(FRAME_ENTRY_SIZE).map(|at| le_u64(bytes, at)).collect();
        if offsets[0] != HEADER_SIZE as u64 {
            return Err(FormatError::invalid(
                "frame table",
                format!("first frame at {}, not {HEADER_SIZE}", offsets[0]),
            ));
        }
        for (p, w) in offsets.windows(2).enumerate() {
            let len = w[1].checked_sub(w[0]);
            if !matches!(len, Some(1..)) || len > Some(u64::from(block_size)) {
                return Err(FormatError::invalid(
                    "frame table",
                    format!("frame {p} spans {}..{}: a frame is 1 to {block_size} bytes", w[0], w[1]),
                ));
            }
        }
        Ok(FrameTable { offsets })
    }

    pub fn block_count(&self) -> u64 {
        self.offsets.len() as u64 - 1
    }

    /// Where the frames end: the table's own offset in its blob.
    pub fn frames_end(&self) -> u64 {
        *self.offsets.last().expect("at least one entry")
    }

    /// Offset and length of the frames of physical blocks `first .. first + count` (one byte
    /// range of the blob). Panics if the run is not within the table.
    pub fn span(&self, first: u64, count: u64) -> (u64, u64) {
        let (a, b) = (self.offsets[first as usize], self.offsets[(first + count) as usize]);
        (a, b - a)
    }
}

/// Where the parts of a compressed blob lie, from lengths an image config gives (the layer's
/// length and tail length, the blob's length) and the block size; and which blob bytes hold a
/// range of the layer's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobLayout {
    pub block_size: u32,
    /// Stored blocks of the layer.
    pub block_count: u64,
    /// Bytes of the layer (uncompressed).
    pub layer_len: u64,
    /// Bytes of the layer's tail (extent index, hash table, trailer), the same in both.
    pub tail_len: u64,
    /// Bytes of the blob.
    pub blob_len: u64,
}

impl BlobLayout {
    /// The layout, if the lengths are consistent: the layer's data region a whole number of
    /// blocks, and room in the blob for a header, at least one byte per frame, the table and
    /// the tail.
    pub fn new(
        block_size: u32,
        layer_len: u64,
        tail_len: u64,
        blob_len: u64,
    ) -> Result<BlobLayout, FormatError> {
        let bad = |why: String| FormatError::invalid("compressed blob", why);
        let data = layer_len
            .checked_sub(HEADER_SIZE as u64)
            .and_then(|n| n.checked_sub(tail_len))
            .ok_or_else(|| bad(format!("layer of {layer_len} bytes cannot hold a {tail_len}-byte tail")))?;
        if block_size == 0 || data % u64::from(block_size) != 0 {
            return Err(bad(format!("data region of {data} bytes is not whole blocks of {block_size}")));
        }
        let block_count = data / u64::from(block_size);
        let min = (HEADER_SIZE as u64)
            .checked_add(block_count)
            .and_then(|n| n.checked_add(FrameTable::encoded_len(block_count)))
            .and_then(|n| n.checked_add(tail_len));
        if min.is_none_or(|m| blob_len < m) {
            return Err(bad(format!(
                "blob of {blob_len} bytes is too short for {block_count} frames and a tail"
            )));
        }
        Ok(BlobLayout { block_size, block_count, layer_len, tail_len, blob_len })
    }

    /// Offset of the frame table in the blob.
    pub fn table_offset(&self) -> u64 {
        self.blob_len - self.tail_len - FrameTable::encoded_len(self.block_count)
    }

    /// Where the layer's tail starts in the layer (its index offset).
    pub fn layer_tail_offset(&self) -> u64 {
        self.layer_len - self.tail_len
    }

    /// Where the layer's tail starts in the blob.
    pub fn blob_tail_offset(&self) -> u64 {
        self.blob_len - self.tail_len
    }

    /// Checks a decoded table against this layout: as many frames as blocks, ending where the
    /// table lies.
    pub fn check_table(&self, table: &FrameTable) -> Result<(), FormatError> {
        if table.block_count() != self.block_count || table.frames_end() != self.table_offset() {
            return Err(FormatError::invalid(
                "frame table",
                format!(
                    "{} frames ending at {}, the blob has {} blocks and its table at {}",
                    table.block_count(),
                    table.frames_end(),
                    self.block_count,
                    self.table_offset()
                ),
            ));
        }
        Ok(())
    }
}

/// Compresses blocks into frames (one zstd context, reused).
pub struct FrameEncoder {
    cctx: zstd::bulk::Compressor<'static>,
    out: Vec<u8>,
}

impl FrameEncoder {
    /// An encoder at zstd level `level` (see [`LEVELS`]) for blocks of `block_size` bytes.
    pub fn new(level: i32, block_size: u32) -> Result<FrameEncoder, FormatError> {
        if !LEVELS.contains(&level) {
            return Err(FormatError::invalid("compression level", format!("{level} is not in 1..=19")));
        }
        let cctx = zstd::bulk::Compressor::new(level)
            .map_err(|e| FormatError::invalid("compression level", e.to_string()))?;
        Ok(FrameEncoder { cctx, out: Vec::with_capacity(block_size as usize) })
    }

    /// The frame of `block` (a whole stored block): a zstd frame if it is shorter than the
    /// block, else the block itself.
    pub fn encode<'a>(&'a mut self, block: &'a [u8]) -> &'a [u8] {
        self.out.clear();
        self.out.reserve(block.len());
        // The buffer holds one block: a frame that would not fit did not shrink, and zstd says
        // so with an error rather than writing past it.
        match self.cctx.compress_to_buffer(block, &mut self.out) {
            Ok(n) if n < block.len() => &self.out[..n],
            _ => block,
        }
    }
}

/// Decodes frames into blocks (one zstd context, reused).
pub struct FrameDecoder {
    dctx: zstd::bulk::Decompressor<'static>,
}

impl FrameDecoder {
    pub fn new() -> Result<FrameDecoder, FormatError> {
        let dctx =
            zstd::bulk::Decompressor::new().map_err(|e| FormatError::invalid("frame", e.to_string()))?;
        Ok(FrameDecoder { dctx })
    }

    /// Decodes `frame` into `block` (exactly one block long). A frame of the block's length is
    /// the block; a shorter one must decode to exactly the block's length. Decoding writes into
    /// `block` only: a frame that would expand beyond it fails without allocating anything.
    pub fn decode(&mut self, frame: &[u8], block: &mut [u8]) -> Result<(), FormatError> {
        let bad = |why: String| FormatError::invalid("frame", why);
        if frame.len() == block.len() {
            block.copy_from_slice(frame);
            return Ok(());
        }
        if frame.is_empty() || frame.len() > block.len() {
            return Err(bad(format!("{} bytes for a block of {}", frame.len(), block.len())));
        }
        match self.dctx.decompress_to_buffer(frame, block) {
            Ok(n) if n == block.len() => Ok(()),
            Ok(n) => Err(bad(format!("decodes to {n} bytes, not the block's {}", block.len()))),
            Err(e) => Err(bad(format!("does not decode: {e}"))),
        }
    }
}

const FRAMES_MAGIC: &[u8; 8] = b"MCOWFRMS";
const FRAMES_VERSION: u32 = 1;
/// Bytes of a `.frames` file before its table.
pub const FRAMES_FILE_HEADER: usize = 96;

/// What a partial layer pulled from a compressed blob keeps beside it (`<hex>.frames`): which
/// blob its blocks come from, and that blob's frame table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FramesFile {
    /// The compressed blob's digest (its name at the origin).
    pub blob: Digest,
    pub blob_len: u64,
    pub table: FrameTable,
}

impl FramesFile {
    /// The file: magic, version, the blob's digest and length, the table's SHA-256 and block
    /// count, then the table.
    pub fn encode(&self) -> Vec<u8> {
        let table = self.table.encode();
        let mut b = Vec::with_capacity(FRAMES_FILE_HEADER + table.len());
        b.extend_from_slice(FRAMES_MAGIC);
        b.extend_from_slice(&FRAMES_VERSION.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&self.blob.0);
        b.extend_from_slice(&self.blob_len.to_le_bytes());
        b.extend_from_slice(&Digest::of(&table).0);
        b.extend_from_slice(&self.table.block_count().to_le_bytes());
        b.extend_from_slice(&table);
        b
    }

    /// Decodes a `.frames` file of a layer of `block_size` blocks; its table must hash to the
    /// digest it records and meet [`FrameTable::decode`]'s rules.
    pub fn decode(b: &[u8], block_size: u32) -> Result<FramesFile, FormatError> {
        if b.len() < FRAMES_FILE_HEADER {
            return Err(FormatError::Truncated {
                what: "frames file",
                got: b.len(),
                need: FRAMES_FILE_HEADER,
            });
        }
        if &b[..8] != FRAMES_MAGIC {
            return Err(FormatError::BadMagic { what: "frames file" });
        }
        let version = crate::le_u32(b, 8);
        if version != FRAMES_VERSION {
            return Err(FormatError::invalid(
                "frames file",
                format!("version {version}, this build reads 1"),
            ));
        }
        let blob = Digest(b[16..48].try_into().expect("32 bytes"));
        let blob_len = le_u64(b, 48);
        let table_digest = Digest(b[56..88].try_into().expect("32 bytes"));
        let block_count = le_u64(b, 88);
        let table_bytes = &b[FRAMES_FILE_HEADER..];
        let actual = Digest::of(table_bytes);
        if actual != table_digest {
            return Err(FormatError::invalid(
                "frames file",
                format!("table hashes to {actual}, recorded {table_digest}"),
            ));
        }
        let table = FrameTable::decode(table_bytes, block_count, block_size)?;
        Ok(FramesFile { blob, blob_len, table })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: u32 = 4096;

    #[test]
    fn frames_round_trip_and_stay_within_a_block() {
        let mut enc = FrameEncoder::new(DEFAULT_LEVEL, BS).unwrap();
        let mut dec = FrameDecoder::new().unwrap();
        let text: Vec<u8> = (0..BS).map(|i| b"mcow layers "[i as usize % 12]).collect();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..BS)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        for block in [&text, &noise] {
            let frame = enc.encode(block).to_vec();
            assert!(frame.len() <= BS as usize);
            let mut out = vec![0u8; BS as usize];
            dec.decode(&frame, &mut out).unwrap();
            assert_eq!(&out, block);
        }
        // Text shrinks; noise does not and is stored as itself.
        assert!(enc.encode(&text).len() < 200);
        assert_eq!(enc.encode(&noise), &noise[..]);
    }

    #[test]
    fn hostile_frames_are_refused_without_growing() {
        let mut dec = FrameDecoder::new().unwrap();
        let mut out = vec![0u8; BS as usize];
        // A frame of twice the block's zeros: a small input that expands beyond the block.
        let bomb = zstd::bulk::compress(&vec![0u8; 2 * BS as usize], 3).unwrap();
        assert!(bomb.len() < 100);
        assert!(dec.decode(&bomb, &mut out).is_err());
        // One that decodes short, an empty one, one longer than a block, garbage.
        let short = zstd::bulk::compress(&[7u8; 100], 3).unwrap();
        assert!(dec.decode(&short, &mut out).is_err());
        assert!(dec.decode(&[], &mut out).is_err());
        assert!(dec.decode(&vec![1u8; BS as usize + 1], &mut out).is_err());
        assert!(dec.decode(&[0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3], &mut out).is_err());
    }

    #[test]
    fn tables_are_checked() {
        let t = FrameTable::from_lengths([10, BS as u64, 1]);
        let bytes = t.encode();
        assert_eq!(FrameTable::decode(&bytes, 3, BS).unwrap(), t);
        assert_eq!(t.span(1, 2), (4106, BS as u64 + 1));
        assert!(FrameTable::decode(&bytes, 2, BS).is_err());
        for (entry, value) in [(0, 0u64), (1, 4096), (2, 4105), (3, 4096 + 10 + 4097 + 1 + (1 << 32))] {
            let mut b = bytes.clone();
            b[entry * 8..entry * 8 + 8].copy_from_slice(&value.to_le_bytes());
            assert!(FrameTable::decode(&b, 3, BS).is_err(), "entry {entry} = {value}");
        }
        let layout = BlobLayout::new(BS, 4096 + 3 * BS as u64 + 200, 200, t.frames_end() + 32 + 200).unwrap();
        layout.check_table(&t).unwrap();
        let off = BlobLayout::new(BS, 4096 + 3 * BS as u64 + 200, 200, t.frames_end() + 33 + 200).unwrap();
        assert!(off.check_table(&t).is_err());
        assert!(BlobLayout::new(BS, 4096 + 3 * BS as u64 + 201, 200, 1 << 20).is_err());
        assert!(BlobLayout::new(BS, 4096 + 3 * BS as u64 + 200, 200, 4096 + 3 + 32 + 199).is_err());
    }

    #[test]
    fn frames_file_round_trips_and_detects_tampering() {
        let f =
            FramesFile { blob: Digest::of(b"blob"), blob_len: 9999, table: FrameTable::from_lengths([5, 6]) };
        let b = f.encode();
        assert_eq!(FramesFile::decode(&b, BS).unwrap(), f);
        let mut t = b.clone();
        *t.last_mut().unwrap() ^= 1;
        assert!(FramesFile::decode(&t, BS).is_err());
        assert!(FramesFile::decode(&b[..b.len() - 1], BS).is_err());
    }
}
