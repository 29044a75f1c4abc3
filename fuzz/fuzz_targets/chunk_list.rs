//! The chunk list a partial layer pulled with index chunks keeps beside its file
//! (`IndexChunks::parse_text`, docs/FORMAT.md "Partial layers"), and its check against an index
//! region's length (`IndexChunks::check`, also what a config's `index_chunks` goes through).
//! The first 8 bytes are the region length, the rest the text. A list that parses prints back
//! to text that parses to it; one that passes the check gives chunk ranges inside the region
//! and extent chunks among its chunks (the fuzz build checks overflow).
#![no_main]

use mcow_engine::chunks::IndexChunks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (len, text) = data.split_at(8);
    let region = u64::from_le_bytes(len.try_into().expect("8 bytes")) % (1 << 45);
    let Ok(text) = std::str::from_utf8(text) else { return };
    let Ok(list) = IndexChunks::parse_text(text) else { return };
    assert_eq!(IndexChunks::parse_text(&list.to_text()).as_ref(), Ok(&list), "text form round trip");
    if list.check(region).is_ok() {
        let n = list.digests.len();
        assert!(list.extent_chunks().end <= n);
        for c in [0, n / 2, n.saturating_sub(1)] {
            if c < n {
                let (at, l) = list.range(c, region);
                assert!(l > 0 && at + l <= region);
            }
        }
    }
});
