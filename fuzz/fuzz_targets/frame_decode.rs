//! Compressed layer blobs (docs/FORMAT.md, "Compressed layer blobs"): the `.frames` file a
//! partial layer keeps (`FramesFile::decode`), the frame table (`FrameTable::decode`), the blob
//! layout computed from a config's lengths (`BlobLayout::new`, `check_table`) and one frame
//! decoded into one block (`FrameDecoder::decode`). Byte 0 is a mode, byte 1 picks the block
//! size (4 KiB to 2 MiB), bytes 2..34 are four u64 (block count, layer length, tail length, blob
//! length), the rest the input. Mode bit 0 fixes the `.frames` file's table digest and bit 1
//! its block count (so that the table's own rules are reached), bit 2 puts zstd's magic in
//! front of the frame. Must hold: nothing panics or overflows (the fuzz build checks
//! overflow); a decoded file or table encodes back to its bytes and gives every frame 1 to
//! block-size bytes; decoding writes into one block's buffer and allocates nothing of the
//! input's choosing (libFuzzer's -malloc_limit_mb catches what does).
#![no_main]

use mcow_format::{
    BlobLayout, Digest, FRAMES_FILE_HEADER, FrameDecoder, FrameTable, FramesFile, MAX_BLOCK_SIZE,
    MIN_BLOCK_SIZE,
};

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() < 34 {
        return;
    }
    let (mode, shift) = (data[0], u32::from(data[1] % 10));
    let bs = (MIN_BLOCK_SIZE << shift).min(MAX_BLOCK_SIZE);
    let (count, layer_len, tail_len, blob_len) =
        (u64_at(data, 2), u64_at(data, 10), u64_at(data, 18), u64_at(data, 26));
    let rest = &data[34..];

    // The `.frames` file.
    let mut file = rest.to_vec();
    if file.len() >= FRAMES_FILE_HEADER {
        if mode & 2 != 0 {
            let n = ((file.len() - FRAMES_FILE_HEADER) / 8) as u64;
            file[88..96].copy_from_slice(&n.saturating_sub(1).to_le_bytes());
        }
        if mode & 1 != 0 {
            let d = Digest::of(&file[FRAMES_FILE_HEADER..]);
            file[56..88].copy_from_slice(&d.0);
        }
    }
    if let Ok(f) = FramesFile::decode(&file, bs) {
        assert_eq!(f.encode(), file, "a decoded .frames file encodes to other bytes");
        check_table(&f.table, bs);
        if let Ok(layout) = BlobLayout::new(bs, layer_len, tail_len, f.blob_len) {
            check_layout(&layout, Some(&f.table));
        }
    }

    // The table alone, for any block count (a config gives it).
    if let Ok(t) = FrameTable::decode(rest, count, bs) {
        assert_eq!(t.encode(), rest, "a decoded table encodes to other bytes");
        assert_eq!(t.block_count(), count);
        check_table(&t, bs);
    }
    if let Ok(layout) = BlobLayout::new(bs, layer_len, tail_len, blob_len) {
        check_layout(&layout, None);
    }

    // One frame into one block.
    let mut frame = Vec::with_capacity(rest.len() + 4);
    if mode & 4 != 0 {
        frame.extend_from_slice(&[0x28, 0xb5, 0x2f, 0xfd]);
    }
    frame.extend_from_slice(rest);
    let mut block = vec![0u8; bs as usize];
    let mut decoder = FrameDecoder::new().expect("a zstd context");
    if decoder.decode(&frame, &mut block).is_ok() {
        assert!(!frame.is_empty() && frame.len() <= bs as usize);
        if frame.len() == bs as usize {
            assert_eq!(block, frame, "a frame of a whole block is the block");
        }
    }
    assert_eq!(block.len(), bs as usize);
});

/// A table that decoded: frames of 1 to `bs` bytes, one after the other from the header's end.
fn check_table(t: &FrameTable, bs: u32) {
    let n = t.block_count();
    let mut at = 4096;
    for p in 0..n.min(1 << 16) {
        let (o, l) = t.span(p, 1);
        assert!(o == at && (1..=u64::from(bs)).contains(&l), "frame {p} at {o}, {l} bytes");
        at += l;
    }
    if n <= 1 << 16 {
        assert_eq!(t.span(0, n), (4096, t.frames_end() - 4096));
    }
}

/// A layout that was accepted: its parts lie in order inside the blob and the layer.
fn check_layout(l: &BlobLayout, table: Option<&FrameTable>) {
    assert!(4096 + l.block_count <= l.table_offset());
    assert!(l.table_offset() + FrameTable::encoded_len(l.block_count) + l.tail_len == l.blob_len);
    assert!(l.layer_tail_offset() + l.tail_len == l.layer_len);
    assert!(l.blob_tail_offset() + l.tail_len == l.blob_len);
    assert_eq!(l.layer_len - 4096 - l.tail_len, l.block_count * u64::from(l.block_size));
    if let Some(t) = table
        && l.check_table(t).is_ok()
    {
        assert_eq!(t.frames_end(), l.table_offset());
    }
}
