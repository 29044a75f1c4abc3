//! The pending logs of a writable top: the mapping changes not yet in a journal batch.
//!
//! Owns: the byte layout of a pending log's header and of one record (see "Pending logs" in
//! docs/FORMAT.md). A record is self-checking (length, the log's tag, CRC32C); a data record
//! carries the CRC32C of each 4 KiB piece of the blocks it maps (all of them, or the pieces an
//! in-place write touched), so a reader can tell whether that data reached the disk. Does not own: which log applies after which journal, or replaying records (the
//! engine's top layer does that).

use crate::index::decode_index_entry;
use crate::{ExtentKind, FormatError, INDEX_ENTRY_SIZE, IndexEntry, encode_index_entry, le_u32, le_u64};

/// Size of a pending log's header.
pub const PENDING_HEADER_SIZE: usize = 64;
const MAGIC: &[u8; 8] = b"MCOWPEND";
/// The pending log's format version.
pub const PENDING_VERSION: u32 = 1;
const RECORD_MAGIC: &[u8; 4] = b"PREC";
const RECORD_HEAD: usize = 12 + INDEX_ENTRY_SIZE + 4;
/// The unit a data record's CRCs cover: 4 KiB of a block (blocks are multiples of it).
pub const PENDING_PIECE: usize = 4096;
/// `alt` when the log has no second sequence number.
pub const NO_ALT: u64 = u64::MAX;
/// Most blocks one data record may map (a bigger change is split over records).
pub const MAX_RECORD_BLOCKS: u64 = 1 << 16;

/// A pending log's header: which journal state its records follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingHeader {
    pub instance: [u8; 16],
    /// The journal sequence number after which the records apply, and that batch's CRC field.
    pub base: u64,
    pub base_crc: u32,
    /// A second sequence number ([`NO_ALT`] for none) the records also apply after, and its
    /// batch's CRC field.
    pub alt: u64,
    pub alt_crc: u32,
    /// The tag of the log this one followed (0 if none).
    pub prev: u32,
    /// Names this start of the log; every record repeats it.
    pub tag: u32,
}

impl PendingHeader {
    pub fn encode(&self) -> [u8; PENDING_HEADER_SIZE] {
        let mut b = [0u8; PENDING_HEADER_SIZE];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&PENDING_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.tag.to_le_bytes());
        b[16..32].copy_from_slice(&self.instance);
        b[32..40].copy_from_slice(&self.base.to_le_bytes());
        b[40..44].copy_from_slice(&self.base_crc.to_le_bytes());
        b[44..48].copy_from_slice(&self.alt_crc.to_le_bytes());
        b[48..56].copy_from_slice(&self.alt.to_le_bytes());
        b[56..60].copy_from_slice(&self.prev.to_le_bytes());
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<PendingHeader, FormatError> {
        if b.len() < PENDING_HEADER_SIZE {
            return Err(FormatError::Truncated {
                what: "pending log header",
                got: b.len(),
                need: PENDING_HEADER_SIZE,
            });
        }
        if &b[0..8] != MAGIC {
            return Err(FormatError::BadMagic { what: "pending log header" });
        }
        if le_u32(b, 60) != crc32c::crc32c(&b[..60]) {
            return Err(FormatError::BadChecksum { what: "pending log header" });
        }
        let version = le_u32(b, 8);
        if version != PENDING_VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        Ok(PendingHeader {
            instance: b[16..32].try_into().expect("16 bytes"),
            base: le_u64(b, 32),
            base_crc: le_u32(b, 40),
            alt_crc: le_u32(b, 44),
            alt: le_u64(b, 48),
            prev: le_u32(b, 56),
            tag: le_u32(b, 12),
        })
    }

    /// A tag for a log started with these fields: CRC32C of the instance, base, base CRC and
    /// prev.
    pub fn new_tag(&self) -> u32 {
        let b = self.encode();
        crc32c::crc32c_append(crc32c::crc32c(&b[16..44]), &b[56..60])
    }
}

/// One mapping change of a pending log; `crcs` holds, for a data change, the CRC32C of each
/// 4 KiB piece of the run's physical blocks from piece `first` on (counted from the start of
/// the run), as written; empty (and `first` 0) for a marker. `in_place`: the record of an
/// in-place write to blocks already mapped, written before its data (else: of a write that
/// mapped the blocks, written after its data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRecord {
    pub entry: IndexEntry,
    pub first: u32,
    pub in_place: bool,
    pub crcs: Vec<u32>,
}

/// Bit 31 of a record's `first` field: an in-place record.
const IN_PLACE: u32 = 1 << 31;

/// Encodes a record of a log with `tag`.
pub fn encode_record(tag: u32, r: &PendingRecord) -> Vec<u8> {
    let mut b = Vec::with_capacity(RECORD_HEAD + 4 * r.crcs.len() + 4);
    encode_record_into(tag, &r.entry, r.first, r.in_place, &r.crcs, &mut b);
    b
}

/// Appends to `out` the encoding of a record of a log with `tag` (the fields of a
/// [`PendingRecord`], the CRCs borrowed): what [`encode_record`] returns, without allocating
/// where `out` has room.
pub fn encode_record_into(
    tag: u32,
    entry: &IndexEntry,
    first: u32,
    in_place: bool,
    crcs: &[u32],
    out: &mut Vec<u8>,
) {
    let len = RECORD_HEAD + 4 * crcs.len() + 4;
    let at = out.len();
    out.reserve(len);
    out.extend_from_slice(RECORD_MAGIC);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&encode_index_entry(entry));
    out.extend_from_slice(&(first | if in_place { IN_PLACE } else { 0 }).to_le_bytes());
    for c in crcs {
        out.extend_from_slice(&c.to_le_bytes());
    }
    let crc = crc32c::crc32c(&out[at..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Decodes the record at the start of `b` of a log with `tag`; returns it and its length, or
/// `None` where the log ends (short, bad magic, length, tag, checksum or entry: a torn write or
/// the end of what was written).
pub fn decode_record(tag: u32, b: &[u8]) -> Option<(PendingRecord, usize)> {
    if b.len() < RECORD_HEAD + 4 || &b[0..4] != RECORD_MAGIC || le_u32(b, 8) != tag {
        return None;
    }
    let len = le_u32(b, 4) as usize;
    if len < RECORD_HEAD + 4 || len > b.len() || !(len - RECORD_HEAD - 4).is_multiple_of(4) {
        return None;
    }
    if le_u32(b, len - 4) != crc32c::crc32c(&b[..len - 4]) {
        return None;
    }
    let entry = decode_index_entry(&b[12..12 + INDEX_ENTRY_SIZE]).ok()?;
    let field = le_u32(b, 12 + INDEX_ENTRY_SIZE);
    let (first, in_place) = (field & !IN_PLACE, field & IN_PLACE != 0);
    let n = (len - RECORD_HEAD - 4) / 4;
    // Data: at least one CRC (how many pieces a block has is the reader's to check);
    // markers: none.
    let ok = if entry.kind == ExtentKind::Data { n >= 1 } else { n == 0 && field == 0 };
    if !ok {
        return None;
    }
    let crcs = (0..n).map(|i| le_u32(b, RECORD_HEAD + 4 * i)).collect();
    Some((PendingRecord { entry, first, in_place, crcs }, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_records_round_trip_and_damage_ends_the_log() {
        let h = PendingHeader {
            instance: [7; 16],
            base: 9,
            base_crc: 5,
            alt: NO_ALT,
            alt_crc: 0,
            prev: 3,
            tag: 8,
        };
        assert_eq!(PendingHeader::decode(&h.encode()).unwrap(), h);
        let mut bad = h.encode();
        bad[33] ^= 1;
        assert!(PendingHeader::decode(&bad).is_err(), "a flipped bit fails the header CRC");
        let r = PendingRecord {
            entry: IndexEntry { vblock: 4, count: 2, kind: ExtentKind::Data, pblock: 11 },
            first: 3,
            in_place: true,
            crcs: vec![1, 2],
        };
        let bytes = encode_record(h.tag, &r);
        assert_eq!(decode_record(h.tag, &bytes), Some((r.clone(), bytes.len())));
        assert_eq!(decode_record(h.tag ^ 1, &bytes), None, "another log's tag");
        assert_eq!(decode_record(h.tag, &bytes[..bytes.len() - 1]), None, "torn");
        let mut flipped = bytes.clone();
        flipped[20] ^= 4;
        assert_eq!(decode_record(h.tag, &flipped), None, "damaged");
        let m = PendingRecord {
            entry: IndexEntry { vblock: 0, count: 3, kind: ExtentKind::Zero, pblock: 0 },
            first: 0,
            in_place: false,
            crcs: vec![],
        };
        let mb = encode_record(h.tag, &m);
        assert_eq!(decode_record(h.tag, &mb), Some((m, 52)));
        let no_crcs = PendingRecord { entry: r.entry, first: 0, in_place: false, crcs: vec![] };
        assert_eq!(decode_record(h.tag, &encode_record(h.tag, &no_crcs)), None, "data without CRCs");
        // Appended after other bytes, a record encodes the same (its CRC covers it alone).
        let mut out = b"earlier".to_vec();
        encode_record_into(h.tag, &r.entry, r.first, r.in_place, &r.crcs, &mut out);
        assert_eq!(&out[7..], &bytes[..]);
    }
}
