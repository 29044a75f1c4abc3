//! The extent index of a layer.
//!
//! Owns: the 32-byte index entry (one extent a layer owns: a run of virtual blocks stored as a
//! run of physical blocks, or marked zero or discarded) and the rules a valid index follows
//! (the block hash table that follows the index is `block_hash`'s). Does not own: how extents of many layers are combined (the engine's
//! stack does that).

use crate::{FormatError, le_u32, le_u64};

/// Bytes per index entry.
pub const INDEX_ENTRY_SIZE: usize = 32;

/// What a layer says about a run of virtual blocks it owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExtentKind {
    /// Stored in this layer, at consecutive physical blocks.
    Data = 1,
    /// Reads as zeros; allocated (hides lower layers, reported as zero data).
    Zero = 2,
    /// Discarded: reads as zeros and hides lower layers, reported as a hole.
    Discarded = 3,
}

/// One extent of a layer's index. Units are blocks of the layer's block size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IndexEntry {
    /// First virtual block.
    pub vblock: u64,
    /// Number of blocks; never zero.
    pub count: u64,
    pub kind: ExtentKind,
    /// First physical block in the layer's data region (meaningful for `Data` only, else 0).
    pub pblock: u64,
}

impl IndexEntry {
    /// One past the last virtual block.
    pub fn end(&self) -> u64 {
        self.vblock + self.count
    }
}

/// Encodes one entry into its 32 bytes.
pub fn encode_index_entry(e: &IndexEntry) -> [u8; INDEX_ENTRY_SIZE] {
    let mut b = [0u8; INDEX_ENTRY_SIZE];
    b[0..8].copy_from_slice(&e.vblock.to_le_bytes());
    b[8..16].copy_from_slice(&e.count.to_le_bytes());
    b[16..20].copy_from_slice(&(e.kind as u32).to_le_bytes());
    b[24..32].copy_from_slice(&e.pblock.to_le_bytes());
    b
}

/// Decodes one 32-byte entry (shape only: ranges are checked by [`validate_index`]).
pub(crate) fn decode_index_entry(b: &[u8]) -> Result<IndexEntry, FormatError> {
    let kind = match le_u32(b, 16) {
        1 => ExtentKind::Data,
        2 => ExtentKind::Zero,
        3 => ExtentKind::Discarded,
        k => return Err(FormatError::invalid("extent kind", format!("{k}"))),
    };
    if le_u32(b, 20) != 0 {
        return Err(FormatError::invalid("index entry", "reserved field is not zero"));
    }
    let e = IndexEntry { vblock: le_u64(b, 0), count: le_u64(b, 8), kind, pblock: le_u64(b, 24) };
    if e.count == 0 {
        return Err(FormatError::invalid("index entry", format!("empty extent at block {}", e.vblock)));
    }
    if kind != ExtentKind::Data && e.pblock != 0 {
        return Err(FormatError::invalid("index entry", "physical block set on a non-data extent"));
    }
    Ok(e)
}

/// Decodes a whole index table. The caller has checked that `b.len()` is `count * 32`.
pub fn decode_index(b: &[u8]) -> Result<Vec<IndexEntry>, FormatError> {
    if !b.len().is_multiple_of(INDEX_ENTRY_SIZE) {
        return Err(FormatError::invalid("index", format!("length {} is not a multiple of 32", b.len())));
    }
    b.chunks_exact(INDEX_ENTRY_SIZE).map(decode_index_entry).collect()
}

/// Checks that entries are sorted, do not overlap, lie within `virtual_blocks`, and that data
/// extents lie within `stored_blocks` physical blocks.
pub fn validate_index(
    entries: &[IndexEntry],
    virtual_blocks: u64,
    stored_blocks: u64,
) -> Result<(), FormatError> {
    let mut prev_end = 0u64;
    for (i, e) in entries.iter().enumerate() {
        let end =
            e.vblock.checked_add(e.count).filter(|&end| end <= virtual_blocks).ok_or_else(|| {
                FormatError::invalid("index", format!("extent {i} ends past the virtual size"))
            })?;
        if i > 0 && e.vblock < prev_end {
            return Err(FormatError::invalid("index", format!("extent {i} is unsorted or overlaps")));
        }
        if e.kind == ExtentKind::Data {
            let pend = e.pblock.checked_add(e.count);
            if pend.is_none_or(|p| p > stored_blocks) {
                return Err(FormatError::invalid(
                    "index",
                    format!("extent {i} points past the {stored_blocks} stored blocks"),
                ));
            }
        }
        prev_end = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(vblock: u64, count: u64, pblock: u64) -> IndexEntry {
        IndexEntry { vblock, count, kind: ExtentKind::Data, pblock }
    }

    #[test]
    fn entry_round_trips() {
        let e = data(7, 3, 11);
        assert_eq!(decode_index_entry(&encode_index_entry(&e)).unwrap(), e);
        let z = IndexEntry { vblock: 1, count: 1, kind: ExtentKind::Discarded, pblock: 0 };
        assert_eq!(decode_index(&encode_index_entry(&z)).unwrap(), vec![z]);
    }

    #[test]
    fn rejects_unknown_kind_empty_extent_and_stray_pblock() {
        let mut b = encode_index_entry(&data(0, 1, 0));
        b[16] = 9;
        assert!(decode_index(&b).is_err());
        assert!(decode_index(&encode_index_entry(&data(0, 0, 0))).is_err());
        let z = IndexEntry { vblock: 0, count: 1, kind: ExtentKind::Zero, pblock: 5 };
        assert!(decode_index(&encode_index_entry(&z)).is_err());
        assert!(decode_index(&[0u8; 31]).is_err());
    }

    #[test]
    fn validation_rules() {
        assert!(validate_index(&[data(0, 2, 0), data(2, 2, 2)], 4, 4).is_ok());
        assert!(validate_index(&[data(2, 2, 0), data(0, 2, 2)], 4, 4).is_err(), "unsorted");
        assert!(validate_index(&[data(0, 3, 0), data(2, 2, 3)], 8, 8).is_err(), "overlap");
        assert!(validate_index(&[data(3, 2, 0)], 4, 4).is_err(), "past virtual size");
        assert!(validate_index(&[data(0, 2, 3)], 4, 4).is_err(), "past stored blocks");
        assert!(validate_index(&[data(u64::MAX, 2, 0)], u64::MAX, 4).is_err(), "overflow");
    }
}
