//! The extent index and block hash table decoders (`decode_index`, `validate_index`,
//! `decode_block_hashes`), as a sealed layer's open uses them. The first 16 bytes give the
//! layer's virtual and stored block counts (folded to small values half the time, so that valid
//! indexes are common), the rest is the index table. An index that passes validation must keep
//! the promises the engine's map relies on: sorted, disjoint, non-empty extents inside the
//! virtual size, data inside the stored blocks; and it encodes back to its bytes.
#![no_main]

use mcow_format::{
    BLOCK_HASH_SIZE, ExtentKind, INDEX_ENTRY_SIZE, decode_block_hashes, decode_index, encode_index_entry,
    validate_index,
};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((counts, table)) = data.split_first_chunk::<16>() else { return };
    let mut virtual_blocks = u64::from_le_bytes(counts[..8].try_into().unwrap());
    let mut stored_blocks = u64::from_le_bytes(counts[8..].try_into().unwrap());
    if virtual_blocks & 1 == 0 {
        (virtual_blocks, stored_blocks) = (virtual_blocks % 4096, stored_blocks % 4096);
    }
    let hashes = decode_block_hashes(table);
    assert_eq!(hashes.len(), table.len() / BLOCK_HASH_SIZE);
    let Ok(entries) = decode_index(table) else { return };
    assert_eq!(entries.len() * INDEX_ENTRY_SIZE, table.len());
    let encoded: Vec<u8> = entries.iter().flat_map(encode_index_entry).collect();
    assert_eq!(encoded, table, "a decoded index encodes to other bytes");
    if validate_index(&entries, virtual_blocks, stored_blocks).is_err() {
        return;
    }
    let mut prev_end = 0;
    for e in &entries {
        assert!(e.count > 0 && e.vblock >= prev_end, "empty, unsorted or overlapping: {e:?}");
        prev_end = e.end();
        assert!(prev_end <= virtual_blocks, "past the virtual size: {e:?}");
        if e.kind == ExtentKind::Data {
            assert!(e.pblock + e.count <= stored_blocks, "past the stored blocks: {e:?}");
        } else {
            assert_eq!(e.pblock, 0);
        }
    }
});
