//! The layer header: the first 4096 bytes of every layer file, sealed or writable.
//!
//! Owns: the header's byte layout and its validation. Does not own: what follows the header
//! (data blocks, index, trailer), nor opening files.

use crate::{BlockHashKind, Digest, FORMAT_VERSION, FormatError, le_u32, le_u64};

/// Size of the header region; data blocks start right after it.
pub const HEADER_SIZE: usize = 4096;
/// Smallest block size a layer may use.
pub const MIN_BLOCK_SIZE: u32 = 4096;
/// Largest block size a layer may use.
pub const MAX_BLOCK_SIZE: u32 = 2 * 1024 * 1024;
/// Incompatible feature bits this build understands (none yet). A reader refuses any other.
pub const KNOWN_INCOMPAT_FEATURES: u64 = 0;
/// Largest virtual size accepted: 2^53 bytes (8 PiB), so block numbers fit comfortably.
const MAX_VIRTUAL_SIZE: u64 = 1 << 53;

const MAGIC: &[u8; 8] = b"MCOWLAYR";
/// Bytes covered by the header checksum; the CRC32C itself sits right after them.
const CRC_AT: usize = 96;
/// Bytes at the start of a header that hold its fields and their CRC. The other bytes up to
/// [`HEADER_SIZE`] are zero in every valid header, so whoever knows a header's digest can
/// rebuild it from these alone (a lazy pull fetches only them).
pub const HEADER_FIELDS_LEN: usize = CRC_AT + 4;

/// Whether a layer file is an immutable sealed layer or a writable top.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    Sealed = 1,
    Writable = 2,
}

/// The decoded header of a layer file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerHeader {
    pub kind: LayerKind,
    pub block_size: u32,
    pub virtual_size: u64,
    /// Chain digest of the stack this layer sits on ([`Digest::ZERO`] for a base layer).
    pub parent: Digest,
    /// Random identity of a writable top, repeated in its journal; zero in sealed layers.
    pub instance: [u8; 16],
    /// Compatible feature bits: unknown ones are ignored by readers.
    pub compat_features: u64,
    /// The function of the layer's block hashes, given by its format version (1: SHA-256,
    /// 2: BLAKE3). New layers use [`BlockHashKind::Blake3`].
    pub block_hash: BlockHashKind,
}

impl LayerHeader {
    /// Number of blocks needed to cover the virtual size (the last one may be partial).
    pub fn block_count(&self) -> u64 {
        self.virtual_size.div_ceil(u64::from(self.block_size))
    }

    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(MAGIC);
        let version = match self.block_hash {
            BlockHashKind::Sha256 => 1u32,
            BlockHashKind::Blake3 => FORMAT_VERSION,
        };
        b[8..12].copy_from_slice(&version.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_SIZE as u32).to_le_bytes());
        b[16..24].copy_from_slice(&0u64.to_le_bytes()); // incompatible features
        b[24..32].copy_from_slice(&self.compat_features.to_le_bytes());
        b[32..36].copy_from_slice(&(self.kind as u32).to_le_bytes());
        b[36..40].copy_from_slice(&self.block_size.to_le_bytes());
        b[40..48].copy_from_slice(&self.virtual_size.to_le_bytes());
        b[48..80].copy_from_slice(&self.parent.0);
        b[80..96].copy_from_slice(&self.instance);
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and validates a header. `b` must hold at least [`HEADER_SIZE`] bytes.
    pub fn decode(b: &[u8]) -> Result<LayerHeader, FormatError> {
        if b.len() < HEADER_SIZE {
            return Err(FormatError::Truncated { what: "layer header", got: b.len(), need: HEADER_SIZE });
        }
        if &b[0..8] != MAGIC {
            return Err(FormatError::BadMagic { what: "layer header" });
        }
        let block_hash = match le_u32(b, 8) {
            1 => BlockHashKind::Sha256,
            FORMAT_VERSION => BlockHashKind::Blake3,
            version => return Err(FormatError::UnsupportedVersion(version)),
        };
        if le_u32(b, CRC_AT) != crc32c::crc32c(&b[..CRC_AT]) {
            return Err(FormatError::BadChecksum { what: "layer header" });
        }
        if le_u32(b, 12) as usize != HEADER_SIZE {
            return Err(FormatError::invalid("header size", format!("{} (must be 4096)", le_u32(b, 12))));
        }
        let incompat = le_u64(b, 16);
        if incompat & !KNOWN_INCOMPAT_FEATURES != 0 {
            return Err(FormatError::UnknownFeatures(incompat & !KNOWN_INCOMPAT_FEATURES));
        }
        let kind = match le_u32(b, 32) {
            1 => LayerKind::Sealed,
            2 => LayerKind::Writable,
            k => return Err(FormatError::invalid("layer kind", format!("{k}"))),
        };
        let block_size = le_u32(b, 36);
        check_block_size(block_size)?;
        let virtual_size = le_u64(b, 40);
        check_virtual_size(virtual_size)?;
        if b[CRC_AT + 4..HEADER_SIZE].iter().any(|&x| x != 0) {
            return Err(FormatError::invalid("header padding", "reserved bytes are not zero"));
        }
        Ok(LayerHeader {
            kind,
            block_size,
            virtual_size,
            parent: Digest(b[48..80].try_into().expect("32 bytes")),
            instance: b[80..96].try_into().expect("16 bytes"),
            compat_features: le_u64(b, 24),
            block_hash,
        })
    }
}

/// Checks that a block size is a power of two from 4 KiB to 2 MiB.
pub fn check_block_size(block_size: u32) -> Result<(), FormatError> {
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(FormatError::invalid(
            "block size",
            format!("{block_size} (must be a power of two from 4096 to 2097152)"),
        ));
    }
    Ok(())
}

/// Checks that a virtual size is a non-zero multiple of 512 no larger than 8 PiB.
pub fn check_virtual_size(size: u64) -> Result<(), FormatError> {
    if size == 0 || !size.is_multiple_of(512) || size > MAX_VIRTUAL_SIZE {
        return Err(FormatError::invalid(
            "virtual size",
            format!("{size} (must be a non-zero multiple of 512, at most 8 PiB)"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LayerHeader {
        LayerHeader {
            kind: LayerKind::Sealed,
            block_size: 65536,
            virtual_size: 1 << 30,
            parent: Digest::of(b"parent"),
            instance: [0; 16],
            compat_features: 0,
            block_hash: BlockHashKind::Blake3,
        }
    }

    #[test]
    fn round_trips() {
        let h = sample();
        assert_eq!(LayerHeader::decode(&h.encode()).unwrap(), h);
        assert_eq!(le_u32(&h.encode(), 8), 2);
        // Version 1 (SHA-256 block hashes) still reads, as version 1.
        let v1 = LayerHeader { block_hash: BlockHashKind::Sha256, ..sample() };
        assert_eq!(le_u32(&v1.encode(), 8), 1);
        assert_eq!(LayerHeader::decode(&v1.encode()).unwrap(), v1);
    }

    #[test]
    fn rejects_truncated() {
        let b = sample().encode();
        assert!(matches!(LayerHeader::decode(&b[..100]), Err(FormatError::Truncated { .. })));
    }

    #[test]
    fn rejects_bad_magic() {
        let mut b = sample().encode();
        b[0] = b'X';
        assert_eq!(LayerHeader::decode(&b), Err(FormatError::BadMagic { what: "layer header" }));
    }

    #[test]
    fn rejects_other_version() {
        let mut b = sample().encode();
        b[8] = 3;
        assert_eq!(LayerHeader::decode(&b), Err(FormatError::UnsupportedVersion(3)));
    }

    #[test]
    fn rejects_flipped_byte() {
        let mut b = sample().encode();
        b[45] ^= 1;
        assert_eq!(LayerHeader::decode(&b), Err(FormatError::BadChecksum { what: "layer header" }));
    }

    fn recrc(b: &mut [u8; HEADER_SIZE]) {
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn rejects_unknown_incompatible_feature() {
        let mut b = sample().encode();
        b[16] = 1;
        recrc(&mut b);
        assert_eq!(LayerHeader::decode(&b), Err(FormatError::UnknownFeatures(1)));
    }

    #[test]
    fn ignores_unknown_compatible_feature() {
        let mut h = sample();
        h.compat_features = 1 << 40;
        assert_eq!(LayerHeader::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn rejects_bad_block_sizes() {
        for bs in [0u32, 512, 4097, 3 * 4096, 4 << 20] {
            let mut h = sample();
            h.block_size = bs;
            assert!(LayerHeader::decode(&h.encode()).is_err(), "{bs}");
        }
    }

    #[test]
    fn rejects_bad_virtual_sizes() {
        for vs in [0u64, 511, 1 << 60] {
            let mut h = sample();
            h.virtual_size = vs;
            assert!(LayerHeader::decode(&h.encode()).is_err(), "{vs}");
        }
    }

    #[test]
    fn rejects_unknown_kind_and_dirty_padding() {
        let mut b = sample().encode();
        b[32] = 9;
        recrc(&mut b);
        assert!(LayerHeader::decode(&b).is_err());
        let mut b = sample().encode();
        b[4000] = 1;
        assert!(LayerHeader::decode(&b).is_err());
    }
}
