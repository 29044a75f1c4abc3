//! A whole sealed layer file, opened the way a disk opens its layers (`LayerStore::open_layer`,
//! which reads and checks header, trailer, file length, index digest and index rules), and added
//! the way a lazy pull adds a partial layer from a remote's header and tail bytes
//! (`LayerStore::add_partial`). Opening needs a file, so the bytes are written to one in a
//! scratch store (see `mcow_fuzz::scratch_dir`).
//!
//! The first byte's bit 0 picks raw bytes (the rest of the input is the file) or a structured
//! layer: a small valid layer built by the engine's `LayerWriter` from the input, then mutated
//! (bytes flipped, integers planted, cut short or extended); bit 1 then leaves the checksums
//! as the mutations left them, otherwise the header CRC, index digest and trailer CRC are
//! recomputed so that the mutated fields reach the checks behind them.
//!
//! A layer that opens must read every block its index maps, each either good or a clean block
//! checksum error, and re-read the same index; a small base layer must also open as a one-layer
//! stack (`Stack::open`, the flattened map) and read every virtual block through it.
#![no_main]

use libfuzzer_sys::arbitrary::Unstructured;
use mcow_engine::Error;
use mcow_engine::stack::Stack;
use mcow_engine::store::LayerStore;
use mcow_format::{Digest, ExtentKind, HEADER_SIZE, TRAILER_SIZE, Trailer};
use mcow_fuzz::{build_layer, mutate, reseal_layer, scratch_dir};

fn layer_bytes(data: &[u8]) -> Option<Vec<u8>> {
    let (&mode, rest) = data.split_first()?;
    if mode & 1 == 0 {
        return Some(rest.to_vec());
    }
    let mut u = Unstructured::new(rest);
    let mut b = build_layer(&mut u).ok()?;
    mutate(&mut u, &mut b).ok()?;
    if mode & 2 == 0 {
        reseal_layer(&mut b);
    }
    Some(b)
}

fn open(bytes: &[u8]) {
    let store = LayerStore::new(scratch_dir().join("store"));
    let digest = Digest::of(bytes);
    let path = store.layer_path(&digest);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, bytes).unwrap();
    if let Ok((layer, index)) = store.open_layer(&digest, true) {
        let bs = layer.block_size();
        assert_eq!(layer.file_len(), bytes.len() as u64);
        assert!(index.iter().all(|e| e.end() <= layer.header.block_count()));
        let mut block = vec![0u8; bs as usize];
        for e in index.iter().filter(|e| e.kind == ExtentKind::Data) {
            for p in e.pblock..e.pblock + e.count {
                match layer.read(p, 0, &mut block) {
                    Ok(()) => assert!(layer.block_matches(p, &block)),
                    Err(Error::BlockChecksum { pblock, .. }) => assert_eq!(pblock, p),
                    Err(e) => panic!("reading block {p} of an open layer: {e}"),
                }
            }
        }
        assert_eq!(layer.read_index().expect("the index reads again"), index);
        let (parent, blocks, header) =
            (layer.header.parent, layer.header.block_count(), layer.header.clone());
        drop(layer);
        if parent.is_zero() && blocks <= 4096 {
            // A base layer opens as a one-layer stack too, and reads through its map.
            let stack = Stack::open(&store, &[digest], header.virtual_size, header.block_size, true)
                .expect("a layer that opens opens as a stack");
            for v in 0..blocks {
                match stack.read_block(v, 0, &mut block) {
                    Ok(()) | Err(Error::BlockChecksum { .. }) => {}
                    Err(e) => panic!("reading virtual block {v} of a one-layer stack: {e}"),
                }
            }
        }
    }
    std::fs::remove_file(&path).unwrap();
}

/// The lazy pull's path: the header, and the tail the trailer says there is.
fn add_partial(bytes: &[u8]) {
    let len = bytes.len();
    if len < HEADER_SIZE + TRAILER_SIZE {
        return;
    }
    let Ok(t) = Trailer::decode(&bytes[len - TRAILER_SIZE..]) else { return };
    let tail_len = t.index_len() + TRAILER_SIZE as u64;
    if tail_len > (len - HEADER_SIZE) as u64 {
        return;
    }
    let store = LayerStore::new(scratch_dir().join("partial-store"));
    let digest = Digest::of(bytes);
    let tail = &bytes[len - tail_len as usize..];
    if let Ok(path) =
        store.add_partial(&digest, len as u64, &bytes[..HEADER_SIZE], tail, &t.index_digest, None)
    {
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len as u64);
        std::fs::remove_file(&path).unwrap();
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some(bytes) = layer_bytes(data) else { return };
    open(&bytes);
    add_partial(&bytes);
});
