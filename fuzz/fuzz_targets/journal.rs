//! The journal decoders (`JournalHeader::decode`, `decode_batch`), walked the way a writable
//! top's open replays them: a header, then batches until one fails to decode. The first byte's
//! bit 0 recomputes the header CRC, bit 1 the CRC of every batch whose magic and count fit (so
//! mutated entries reach the entry checks rather than ending the journal at a bad checksum).
//! A decoded batch encodes back to its bytes, and the walk always moves forward.
#![no_main]

use mcow_format::{JOURNAL_HEADER_SIZE, JournalHeader, batch_encoded_len, decode_batch, encode_batch};
use mcow_fuzz::{JOURNAL_HEADER_CRC_AT, fix_crc};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut b = rest.to_vec();
    if mode & 1 != 0 {
        fix_crc(&mut b, JOURNAL_HEADER_CRC_AT);
    }
    if let Ok(h) = JournalHeader::decode(&b) {
        let again = JournalHeader::decode(&h.encode()).expect("an encoded header decodes");
        assert_eq!(again, h);
    }
    let mut pos = JOURNAL_HEADER_SIZE.min(b.len());
    loop {
        if mode & 2 != 0 && b.len() >= pos + 16 && &b[pos..pos + 4] == b"JBAT" {
            let n = u32::from_le_bytes(b[pos + 4..pos + 8].try_into().unwrap()) as usize;
            let len = batch_encoded_len(n.min(1 << 21));
            if b.len() >= pos + len {
                fix_crc(&mut b[pos..], len - 4);
            }
        }
        match decode_batch(&b[pos..]) {
            Ok(Some((batch, n))) => {
                assert!(n > 0 && pos + n <= b.len());
                assert_eq!(encode_batch(&batch), &b[pos..pos + n], "a decoded batch encodes to other bytes");
                pos += n;
            }
            Ok(None) | Err(_) => break,
        }
    }
});
