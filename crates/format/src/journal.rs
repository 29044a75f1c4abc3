//! The journal of a writable top layer: a header, then batches of mapping changes.
//!
//! Owns: the byte layout of the journal header and of one batch, batch validation, and telling a
//! torn tail from a damaged middle. A batch is written at each flush and is all-or-nothing: the
//! replay stops at the first batch that is not whole (short, bad magic, bad checksum, wrong
//! sequence). What follows is a torn tail (debris of an unfinished flush) unless a whole batch
//! appears anywhere in it ([`find_whole_batch`]): then a batch in the middle was damaged, and
//! the journal is corrupt. Does not own: replaying batches into a map or deciding when to write
//! them (the engine's top layer does that).

use crate::index::decode_index_entry;
use crate::{FormatError, INDEX_ENTRY_SIZE, IndexEntry, encode_index_entry, le_u32, le_u64};

/// Size of the journal header.
pub const JOURNAL_HEADER_SIZE: usize = 64;
const MAGIC: &[u8; 8] = b"MCOWJRNL";
/// The journal's own format version: unchanged since layer format version 1.
pub const JOURNAL_VERSION: u32 = 1;
const BATCH_MAGIC: &[u8; 4] = b"JBAT";
const BATCH_HEAD: usize = 16;
/// Most entries one batch may hold, so a corrupt count cannot ask for a huge allocation.
const MAX_BATCH_ENTRIES: usize = 1 << 20;

/// The journal header binds the journal to one writable top (same `instance`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalHeader {
    pub instance: [u8; 16],
    pub block_size: u32,
}

impl JournalHeader {
    pub fn encode(&self) -> [u8; JOURNAL_HEADER_SIZE] {
        let mut b = [0u8; JOURNAL_HEADER_SIZE];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&JOURNAL_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.block_size.to_le_bytes());
        b[16..32].copy_from_slice(&self.instance);
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<JournalHeader, FormatError> {
        if b.len() < JOURNAL_HEADER_SIZE {
            return Err(FormatError::Truncated {
                what: "journal header",
                got: b.len(),
                need: JOURNAL_HEADER_SIZE,
            });
        }
        if &b[0..8] != MAGIC {
            return Err(FormatError::BadMagic { what: "journal header" });
        }
        if le_u32(b, 60) != crc32c::crc32c(&b[..60]) {
            return Err(FormatError::BadChecksum { what: "journal header" });
        }
        let version = le_u32(b, 8);
        if version != JOURNAL_VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        Ok(JournalHeader { block_size: le_u32(b, 12), instance: b[16..32].try_into().expect("16 bytes") })
    }
}

/// One batch of mapping changes, applied in order on replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalBatch {
    /// 1 for the first batch, then consecutive.
    pub sequence: u64,
    pub entries: Vec<IndexEntry>,
}

/// Encoded length of a batch of `n` entries.
pub fn batch_encoded_len(n: usize) -> usize {
    BATCH_HEAD + n * INDEX_ENTRY_SIZE + 4
}

/// Encodes a batch: magic, entry count, sequence, entries, then a CRC32C of all of that.
pub fn encode_batch(batch: &JournalBatch) -> Vec<u8> {
    let mut b = Vec::with_capacity(batch_encoded_len(batch.entries.len()));
    b.extend_from_slice(BATCH_MAGIC);
    b.extend_from_slice(&(batch.entries.len() as u32).to_le_bytes());
    b.extend_from_slice(&batch.sequence.to_le_bytes());
    for e in &batch.entries {
        b.extend_from_slice(&encode_index_entry(e));
    }
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes the batch at the start of `b`. Returns the batch and its encoded length, or `None`
/// where the journal ends (too short, no batch magic, bad checksum): a torn tail is not an
/// error. An entry that is malformed inside a batch with a good checksum is an error.
pub fn decode_batch(b: &[u8]) -> Result<Option<(JournalBatch, usize)>, FormatError> {
    if b.len() < BATCH_HEAD || &b[0..4] != BATCH_MAGIC {
        return Ok(None);
    }
    let n = le_u32(b, 4) as usize;
    if n > MAX_BATCH_ENTRIES {
        return Ok(None);
    }
    let len = batch_encoded_len(n);
    if b.len() < len {
        return Ok(None);
    }
    if le_u32(b, len - 4) != crc32c::crc32c(&b[..len - 4]) {
        return Ok(None);
    }
    let entries = b[BATCH_HEAD..len - 4]
        .chunks_exact(INDEX_ENTRY_SIZE)
        .map(decode_index_entry)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some((JournalBatch { sequence: le_u64(b, 8), entries }, len)))
}

/// Where a whole batch (batch magic, an entry count in bounds, a matching checksum) starts in
/// `tail`, searched at every byte offset, with its sequence number.
///
/// The replay of a journal stops at the first position that holds no whole batch of the next
/// sequence. If the bytes from there on hold no whole batch either, they are a torn tail: a
/// flush writes one batch at the end and syncs it before the next is written, so a crash can
/// leave at most one incomplete batch, never a whole one after it. A whole batch in the tail
/// means a batch before it was damaged after it was committed (or the batch itself is out of
/// sequence): corruption, which recovery must not cut away.
pub fn find_whole_batch(tail: &[u8]) -> Option<(usize, u64)> {
    let mut from = 0;
    while let Some(i) = tail[from..].windows(BATCH_MAGIC.len()).position(|w| w == BATCH_MAGIC) {
        let at = from + i;
        match decode_batch(&tail[at..]) {
            Ok(Some((batch, _))) => return Some((at, batch.sequence)),
            // A good checksum over a malformed entry: whole, and corrupt.
            Err(_) => return Some((at, le_u64(tail, at + 8))),
            Ok(None) => from = at + 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ExtentKind;

    fn batch() -> JournalBatch {
        JournalBatch {
            sequence: 4,
            entries: vec![
                IndexEntry { vblock: 1, count: 1, kind: ExtentKind::Data, pblock: 0 },
                IndexEntry { vblock: 9, count: 100, kind: ExtentKind::Discarded, pblock: 0 },
            ],
        }
    }

    #[test]
    fn header_round_trips_and_rejects_damage() {
        let h = JournalHeader { instance: [7; 16], block_size: 65536 };
        let b = h.encode();
        assert_eq!(JournalHeader::decode(&b).unwrap(), h);
        let mut bad = b;
        bad[20] ^= 1;
        assert!(JournalHeader::decode(&bad).is_err());
        assert!(JournalHeader::decode(&b[..10]).is_err());
    }

    #[test]
    fn batch_round_trips() {
        let enc = encode_batch(&batch());
        assert_eq!(enc.len(), batch_encoded_len(2));
        let (dec, len) = decode_batch(&enc).unwrap().unwrap();
        assert_eq!((dec, len), (batch(), enc.len()));
    }

    #[test]
    fn every_torn_prefix_ends_the_journal() {
        let enc = encode_batch(&batch());
        for cut in 0..enc.len() {
            assert_eq!(decode_batch(&enc[..cut]).unwrap(), None, "cut at {cut}");
        }
    }

    #[test]
    fn a_torn_batch_holds_no_whole_batch() {
        let enc = encode_batch(&batch());
        for cut in 0..enc.len() {
            assert_eq!(find_whole_batch(&enc[..cut]), None, "cut at {cut}");
        }
        assert_eq!(find_whole_batch(&[]), None);
        assert_eq!(find_whole_batch(b"JBA"), None);
    }

    #[test]
    fn a_whole_batch_is_found_behind_a_damaged_one() {
        let first = encode_batch(&JournalBatch { sequence: 3, ..batch() });
        let second = encode_batch(&batch());
        for i in 0..first.len() * 8 {
            let mut b = first.clone();
            b[i / 8] ^= 1 << (i % 8);
            b.extend_from_slice(&second);
            let found = find_whole_batch(&b);
            // A flip that leaves the first batch whole cannot happen (the CRC catches it), so
            // the one found is always the second.
            assert_eq!(found, Some((first.len(), 4)), "bit {i}");
        }
    }

    #[test]
    fn any_flipped_bit_ends_the_journal() {
        let enc = encode_batch(&batch());
        for i in 0..enc.len() * 8 {
            let mut b = enc.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(!matches!(decode_batch(&b), Ok(Some(_))), "bit {i} went unnoticed");
        }
    }
}
