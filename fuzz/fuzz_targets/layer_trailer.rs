//! The sealed-layer trailer decoder (`Trailer::decode`) and the sizes computed from it at every
//! open (`index_offset`, `index_len`, `file_len`), for every block size a header may give. The
//! first byte's bit 0 recomputes the CRC, bit 1 pads a short input to a whole trailer. A trailer
//! that decodes encodes back to its bytes, and no size computed from it may overflow (the fuzz
//! build checks overflow).
#![no_main]

use mcow_format::{MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, TRAILER_SIZE, Trailer};
use mcow_fuzz::{TRAILER_CRC_AT, fix_crc};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut b = rest.to_vec();
    if mode & 2 != 0 && b.len() < TRAILER_SIZE {
        b.resize(TRAILER_SIZE, 0);
    }
    if mode & 1 != 0 {
        fix_crc(&mut b, TRAILER_CRC_AT);
    }
    if let Ok(t) = Trailer::decode(&b) {
        assert_eq!(&t.encode()[..], &b[..], "a decoded trailer encodes to other bytes");
        let mut bs = MIN_BLOCK_SIZE;
        while bs <= MAX_BLOCK_SIZE {
            assert!(t.index_offset(bs) < t.file_len(bs));
            assert!(t.index_len() < t.file_len(bs));
            bs *= 2;
        }
    }
});
