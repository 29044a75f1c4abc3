//! The mcow on-disk format, as plain types with encode and decode functions.
//!
//! This crate owns the byte layout of every structure mcow writes: the layer header, the extent
//! index, the per-block hash table, the sealed-layer trailer, the writable top's journal records,
//! the JSON disk manifest, and compressed layer blobs (frames, frame table). It performs no I/O and knows nothing of files, stacks or caching:
//! callers hand it byte slices. `docs/FORMAT.md` is the specification; this crate is its
//! reference implementation. All integers are little-endian.
//!
//! Every decoder treats its input as hostile: counts are capped, arithmetic is checked, and each
//! rejection has its own [`FormatError`] variant.

mod block_hash;
mod digest;
mod error;
mod frames;
mod header;
mod index;
mod journal;
mod manifest;
mod pending;
mod trailer;

pub use block_hash::{BLOCK_HASH_SIZE, BlockHash, BlockHashKind, decode_block_hashes};
pub use digest::{Digest, DigestParseError, Sha256Stream, chain_digest};
pub use error::FormatError;
pub use frames::{
    BlobLayout, DEFAULT_LEVEL, FRAME_ENTRY_SIZE, FRAMES_FILE_HEADER, FrameDecoder, FrameEncoder, FrameTable,
    FramesFile, LEVELS,
};
pub use header::{
    HEADER_FIELDS_LEN, HEADER_SIZE, KNOWN_INCOMPAT_FEATURES, LayerHeader, LayerKind, MAX_BLOCK_SIZE,
    MIN_BLOCK_SIZE, check_block_size, check_virtual_size,
};
pub use index::{ExtentKind, INDEX_ENTRY_SIZE, IndexEntry, decode_index, encode_index_entry, validate_index};
pub use journal::{
    JOURNAL_HEADER_SIZE, JOURNAL_VERSION, JournalBatch, JournalHeader, batch_encoded_len, decode_batch,
    encode_batch, find_whole_batch,
};
pub use manifest::{DiskManifest, MANIFEST_FORMAT, MANIFEST_VERSION, frozen_placeholder};
pub use pending::{
    MAX_RECORD_BLOCKS, NO_ALT, PENDING_HEADER_SIZE, PENDING_PIECE, PENDING_VERSION, PendingHeader,
    PendingRecord, decode_record, encode_record, encode_record_into,
};
pub use trailer::{TRAILER_SIZE, Trailer};

/// The layer format version this crate writes. It also reads version 1, whose only difference
/// is the block hash function (see [`BlockHashKind`]).
pub const FORMAT_VERSION: u32 = 2;

/// Reads a little-endian u32 at `at` from a slice the caller has already length-checked.
pub(crate) fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Reads a little-endian u64 at `at` from a slice the caller has already length-checked.
pub(crate) fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
