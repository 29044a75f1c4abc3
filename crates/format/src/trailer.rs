//! The trailer: the last 128 bytes of a sealed layer, locating and authenticating its index.
//!
//! Owns: the trailer layout and the rule tying the file length to the counts it records.
//! Does not own: the index bytes themselves (see `index`).

use crate::{BLOCK_HASH_SIZE, Digest, FormatError, HEADER_SIZE, INDEX_ENTRY_SIZE, le_u32, le_u64};

/// Size of the trailer at the end of a sealed layer.
pub const TRAILER_SIZE: usize = 128;
const MAGIC: &[u8; 8] = b"MCOWTRLR";
const CRC_AT: usize = 124;
/// Largest extent or block count accepted, so sizes computed from them cannot overflow.
const MAX_COUNT: u64 = 1 << 40;

/// The decoded trailer of a sealed layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trailer {
    /// Number of stored data blocks (and of entries in the block hash table).
    pub block_count: u64,
    /// Number of entries in the extent index.
    pub extent_count: u64,
    /// SHA-256 over the index bytes followed by the block hash table bytes.
    pub index_digest: Digest,
}

impl Trailer {
    pub fn encode(&self) -> [u8; TRAILER_SIZE] {
        let mut b = [0u8; TRAILER_SIZE];
        b[0..8].copy_from_slice(MAGIC);
        b[8..16].copy_from_slice(&self.block_count.to_le_bytes());
        b[16..24].copy_from_slice(&self.extent_count.to_le_bytes());
        b[24..56].copy_from_slice(&self.index_digest.0);
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Trailer, FormatError> {
        if b.len() != TRAILER_SIZE {
            return Err(FormatError::Truncated { what: "layer trailer", got: b.len(), need: TRAILER_SIZE });
        }
        if &b[0..8] != MAGIC {
            return Err(FormatError::BadMagic { what: "layer trailer" });
        }
        if le_u32(b, CRC_AT) != crc32c::crc32c(&b[..CRC_AT]) {
            return Err(FormatError::BadChecksum { what: "layer trailer" });
        }
        if b[56..CRC_AT].iter().any(|&x| x != 0) {
            return Err(FormatError::invalid("trailer", "reserved bytes are not zero"));
        }
        let t = Trailer {
            block_count: le_u64(b, 8),
            extent_count: le_u64(b, 16),
            index_digest: Digest(b[24..56].try_into().expect("32 bytes")),
        };
        if t.block_count > MAX_COUNT || t.extent_count > MAX_COUNT {
            return Err(FormatError::invalid("trailer", "block or extent count is implausibly large"));
        }
        Ok(t)
    }

    /// Offset of the extent index: right after the data blocks.
    pub fn index_offset(&self, block_size: u32) -> u64 {
        HEADER_SIZE as u64 + self.block_count * u64::from(block_size)
    }

    /// Bytes of index plus block hash table.
    pub fn index_len(&self) -> u64 {
        self.extent_count * INDEX_ENTRY_SIZE as u64 + self.block_count * BLOCK_HASH_SIZE as u64
    }

    /// The exact file length a sealed layer with this trailer must have.
    pub fn file_len(&self, block_size: u32) -> u64 {
        self.index_offset(block_size) + self.index_len() + TRAILER_SIZE as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Trailer {
        Trailer { block_count: 3, extent_count: 2, index_digest: Digest::of(b"index") }
    }

    #[test]
    fn round_trips_and_sizes() {
        let t = sample();
        assert_eq!(Trailer::decode(&t.encode()).unwrap(), t);
        assert_eq!(t.file_len(4096), 4096 + 3 * 4096 + 2 * 32 + 3 * 32 + 128);
    }

    #[test]
    fn rejects_damage() {
        let b = sample().encode();
        assert!(matches!(Trailer::decode(&b[..127]), Err(FormatError::Truncated { .. })));
        let mut m = b;
        m[1] = 0;
        assert!(matches!(Trailer::decode(&m), Err(FormatError::BadMagic { .. })));
        let mut c = b;
        c[30] ^= 0x40;
        assert!(matches!(Trailer::decode(&c), Err(FormatError::BadChecksum { .. })));
        let huge = Trailer { block_count: u64::MAX, ..sample() };
        assert!(Trailer::decode(&huge.encode()).is_err());
    }
}
