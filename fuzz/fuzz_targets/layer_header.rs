//! The layer header decoder (`LayerHeader::decode`, as every layer open and lazy pull calls it).
//! The first byte picks how the rest is used: bit 0 recomputes the CRC (so mutated fields reach
//! the checks behind it), bit 1 pads the rest with zeros to a whole header (so a short input can
//! be a header). A header that decodes must encode back to exactly its bytes: every field is
//! determined and the rest is zero.
#![no_main]

use mcow_format::{HEADER_SIZE, LayerHeader};
use mcow_fuzz::{HEADER_CRC_AT, fix_crc};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut b = rest.to_vec();
    if mode & 2 != 0 && b.len() < HEADER_SIZE {
        b.resize(HEADER_SIZE, 0);
    }
    if mode & 1 != 0 {
        fix_crc(&mut b, HEADER_CRC_AT);
    }
    if let Ok(h) = LayerHeader::decode(&b) {
        assert_eq!(&h.encode()[..], &b[..HEADER_SIZE], "a decoded header encodes to other bytes");
        assert!(h.block_count() >= 1);
        assert!(h.block_count().checked_mul(u64::from(h.block_size)).is_some());
    }
});
