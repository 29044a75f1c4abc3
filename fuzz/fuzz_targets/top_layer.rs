//! A writable top's open (`TopLayer::open`: header checks, then the journal replayed batch by
//! batch into the top's map and the block allocator rebuilt from it), on simulated storage
//! (`mcow_engine::sim`), so no file is involved.
//!
//! The input is structured: a header for a small top (sometimes a sealed one, sometimes with
//! another block size or identity than its journal's), a few data blocks, then journal batches,
//! each either raw bytes or entries chosen by the input encoded with a valid checksum (so the
//! entries reach the replay's checks). A top that opens must map only blocks inside its virtual
//! size and data only inside its data file, read every mapped data block, and, opened writable
//! (which trims a torn journal tail and unused blocks), open again to the same map with nothing
//! left to trim.
#![no_main]

use std::path::Path;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use mcow_engine::sim::SimStorage;
use mcow_engine::storage::Storage;
use mcow_engine::top::TopLayer;
use mcow_format::{
    BlockHashKind, Digest, ExtentKind, HEADER_SIZE, IndexEntry, JournalBatch, JournalHeader, LayerHeader,
    LayerKind, encode_batch,
};

fn entry(u: &mut Unstructured<'_>, blocks: u64) -> Result<IndexEntry> {
    let kind = match u.int_in_range(0..=3u8)? {
        0 | 1 => ExtentKind::Data,
        2 => ExtentKind::Zero,
        _ => ExtentKind::Discarded,
    };
    let small = u.arbitrary::<bool>()?;
    let num = |u: &mut Unstructured<'_>, max: u64| -> Result<u64> {
        if small { u.int_in_range(0..=max) } else { u.arbitrary() }
    };
    let vblock = num(u, blocks)?;
    let count = num(u, 8)?;
    let pblock = if kind == ExtentKind::Data { num(u, 12)? } else { 0 };
    Ok(IndexEntry { vblock, count, kind, pblock })
}

fn build(u: &mut Unstructured<'_>) -> Result<(SimStorage, SimStorage)> {
    let block_size: u32 = if u.ratio(7, 8)? { 4096 } else { 8192 };
    let blocks: u64 = u.int_in_range(1..=32)?;
    let instance: [u8; 16] = if u.ratio(7, 8)? { [7; 16] } else { u.arbitrary()? };
    let header = LayerHeader {
        kind: if u.ratio(15, 16)? { LayerKind::Writable } else { LayerKind::Sealed },
        block_size,
        virtual_size: blocks * u64::from(block_size),
        parent: Digest::ZERO,
        instance,
        compat_features: 0,
        block_hash: BlockHashKind::Blake3,
    };
    let data = SimStorage::new();
    data.write_at(&header.encode(), 0).unwrap();
    let stored: u64 = u.int_in_range(0..=12)?;
    for p in 0..stored {
        data.write_at(
            &vec![p as u8 + 1; block_size as usize],
            HEADER_SIZE as u64 + p * u64::from(block_size),
        )
        .unwrap();
    }
    if u.ratio(1, 8)? {
        data.write_at(&[1, 2, 3], HEADER_SIZE as u64 + stored * u64::from(block_size)).unwrap(); // a torn block
    }
    let journal = SimStorage::new();
    let jbs = if u.ratio(15, 16)? { block_size } else { u.arbitrary()? };
    let jh = JournalHeader { instance: [7; 16], block_size: jbs };
    journal.write_at(&jh.encode(), 0).unwrap();
    let mut at = jh.encode().len() as u64;
    let mut sequence = 0u64;
    while !u.is_empty() && sequence < 8 {
        let bytes = if u.ratio(1, 4)? {
            let n = u.int_in_range(0..=64)?;
            u.bytes(n)?.to_vec()
        } else {
            sequence = if u.ratio(7, 8)? { sequence + 1 } else { u.arbitrary()? };
            let n = u.int_in_range(0..=6)?;
            let entries = (0..n).map(|_| entry(u, blocks)).collect::<Result<Vec<_>>>()?;
            encode_batch(&JournalBatch { sequence, entries })
        };
        journal.write_at(&bytes, at).unwrap();
        at += bytes.len() as u64;
    }
    Ok((data, journal))
}

fn check(top: &TopLayer, data: &SimStorage) {
    let blocks = top.header.block_count();
    let bs = u64::from(top.header.block_size);
    let data_blocks = (data.len().unwrap() - HEADER_SIZE as u64) / bs;
    let mut buf = vec![0u8; bs as usize];
    for e in top.extents() {
        assert!(e.start < e.end && e.end <= blocks, "{e:?} outside {blocks} blocks");
        if e.loc.kind == ExtentKind::Data {
            assert!(e.loc.pblock + (e.end - e.start) <= data_blocks, "{e:?} past {data_blocks} data blocks");
            for v in e.start..e.end {
                assert!(top.read_data(v, 0, &mut buf).expect("a mapped block reads"));
            }
        }
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok((storage, journal)) = build(&mut Unstructured::new(data)) else { return };
    let path = Path::new("fuzz-top.mcow");
    let Ok(top) = TopLayer::open(Box::new(storage.clone()), Box::new(journal.clone()), path, true) else {
        return;
    };
    check(&top, &storage);
    let extents = top.extents();
    drop(top);
    let top = TopLayer::open(Box::new(storage.clone()), Box::new(journal.clone()), path, false)
        .expect("a top that opens read-only opens writable");
    assert_eq!(top.extents(), extents, "a writable open changed the map");
    check(&top, &storage);
    drop(top);
    let top = TopLayer::open(Box::new(storage.clone()), Box::new(journal.clone()), path, true)
        .expect("a trimmed top opens again");
    assert_eq!(top.extents(), extents, "trimming changed the map");
    let debris = top.debris();
    assert_eq!(
        (debris.journal_tail_bytes, debris.unused_blocks),
        (0, 0),
        "debris left after a writable open"
    );
});
