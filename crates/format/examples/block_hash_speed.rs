//! How fast each block hash function hashes 64 KiB blocks on this machine: 43 MiB of
//! pseudo-random bytes, hashed block by block with SHA-256 (layer format 1) and BLAKE3
//! (format 2), both in the same run, three rounds. Prints GB/s and the ratio.
//! Run: `cargo run --release -p mcow-format --example block_hash_speed`.

use std::time::Instant;

use mcow_format::BlockHashKind;

fn main() {
    let data: Vec<u8> = (0..43u64 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let rate = |kind: BlockHashKind| {
        let t = Instant::now();
        let mut x = 0u8;
        for block in data.chunks(65536) {
            x ^= kind.of(block).0[0];
        }
        std::hint::black_box(x);
        data.len() as f64 / t.elapsed().as_secs_f64() / 1e9
    };
    for round in 1..=3 {
        let (sha, blake) = (rate(BlockHashKind::Sha256), rate(BlockHashKind::Blake3));
        println!("round {round}: SHA-256 {sha:.2} GB/s, BLAKE3 {blake:.2} GB/s, ratio {:.2}", blake / sha);
    }
}
