//! How well sealed layers compress into frames (one zstd frame per block), level by level: the
//! measurement behind `DEFAULT_LEVEL` (docs/BENCHMARKS.md, "Compression").
//!
//! `cargo run --release -p mcow-format --example frame_levels -- LEVELS LAYER...` where LEVELS
//! is a comma list (e.g. `1,3,6,9,19`) and each LAYER a sealed layer file. For each level it
//! prints the data bytes, the frame bytes, their ratio, the share of blocks stored as they are,
//! and the encode and decode speed of one core (MB/s of uncompressed data).

use std::time::Instant;

use mcow_format::{FrameDecoder, FrameEncoder, HEADER_SIZE, LayerHeader, TRAILER_SIZE, Trailer};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (levels, layers) = args.split_first().expect("usage: frame_levels LEVELS LAYER...");
    let levels: Vec<i32> = levels.split(',').map(|l| l.parse().expect("a level")).collect();
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    let mut block_size = 0;
    for path in layers {
        let file = std::fs::read(path).expect("read the layer");
        let header = LayerHeader::decode(&file[..HEADER_SIZE]).expect("a layer header");
        let trailer = Trailer::decode(&file[file.len() - TRAILER_SIZE..]).expect("a trailer");
        block_size = header.block_size as usize;
        let data = &file[HEADER_SIZE..HEADER_SIZE + trailer.block_count as usize * block_size];
        blocks.extend(data.chunks_exact(block_size).map(<[u8]>::to_vec));
    }
    let data_len = (blocks.len() * block_size) as f64;
    println!("level\tdata_bytes\tframe_bytes\tratio\tstored_share\tencode_MBps\tdecode_MBps");
    for level in levels {
        let mut enc = FrameEncoder::new(level, block_size as u32).expect("a level");
        let t = Instant::now();
        let frames: Vec<Vec<u8>> = blocks.iter().map(|b| enc.encode(b).to_vec()).collect();
        let encode = t.elapsed().as_secs_f64();
        let mut dec = FrameDecoder::new().expect("a decoder");
        let mut out = vec![0u8; block_size];
        let t = Instant::now();
        for (f, b) in frames.iter().zip(&blocks) {
            dec.decode(f, &mut out).expect("decodes");
            assert!(&out == b);
        }
        let decode = t.elapsed().as_secs_f64();
        let framed: usize = frames.iter().map(Vec::len).sum();
        let stored = frames.iter().filter(|f| f.len() == block_size).count();
        println!(
            "{level}\t{}\t{framed}\t{:.3}\t{:.3}\t{:.0}\t{:.0}",
            data_len as u64,
            framed as f64 / data_len,
            stored as f64 / blocks.len() as f64,
            data_len / encode / 1e6,
            data_len / decode / 1e6
        );
    }
}
