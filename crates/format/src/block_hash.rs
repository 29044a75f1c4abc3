//! Block hashes: the 32-byte checksum of one stored block, as a sealed layer's block hash table
//! records it, and which function makes it in each layer format version.
//!
//! Owns: the hash value type and the choice of function (SHA-256 in version 1 layers, BLAKE3 in
//! version 2). Does not own: content digests, which name layers, configs and manifests and stay
//! SHA-256 as OCI requires (see `digest`), or when blocks are checked (the engine decides).

use std::fmt;

/// Bytes of one block hash in the hash table.
pub const BLOCK_HASH_SIZE: usize = 32;

/// The function a layer's block hashes are made with; the layer's format version says which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockHashKind {
    /// SHA-256, in version 1 layers (read, no longer written).
    Sha256,
    /// BLAKE3 with its default 32-byte output, in version 2 layers. Every block fetched or read
    /// for the first time is hashed, and BLAKE3 hashes 64 KiB blocks about 3.5 times as fast as
    /// SHA-256 with SHA-NI on our machines (`examples/block_hash_speed.rs`, docs/BENCHMARKS.md).
    Blake3,
}

impl BlockHashKind {
    /// The hash of `block` (a whole stored block).
    pub fn of(self, block: &[u8]) -> BlockHash {
        match self {
            BlockHashKind::Sha256 => BlockHash(crate::Digest::of(block).0),
            BlockHashKind::Blake3 => BlockHash(*blake3::hash(block).as_bytes()),
        }
    }
}

/// The hash of one stored block.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct BlockHash(pub [u8; BLOCK_HASH_SIZE]);

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// Splits a hash table into per-block hashes. The caller has checked the length.
pub fn decode_block_hashes(b: &[u8]) -> Vec<BlockHash> {
    b.chunks_exact(BLOCK_HASH_SIZE).map(|c| BlockHash(c.try_into().expect("32 bytes"))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // SHA-256 and BLAKE3 of "abc", from their specifications' test vectors.
        assert_eq!(
            format!("{:?}", BlockHashKind::Sha256.of(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            format!("{:?}", BlockHashKind::Blake3.of(b"abc")),
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
    }
}
