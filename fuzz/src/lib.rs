//! Helpers shared by the fuzz targets under `fuzz_targets/`: fixing up checksums and digests so
//! that mutated fields get past them to the validation behind, building small valid layers with
//! the engine's own writer for the fuzzer to mutate, and a scratch directory for the targets
//! that must go through files. Owns no format or engine logic; it only prepares hostile input.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use mcow_engine::layer::LayerWriter;
use mcow_format::{
    BLOCK_HASH_SIZE, Digest, ExtentKind, HEADER_SIZE, INDEX_ENTRY_SIZE, TRAILER_SIZE, check_block_size,
};

/// Where the header's CRC32C sits (after the 96 bytes it covers).
pub const HEADER_CRC_AT: usize = 96;
/// Where the trailer's CRC32C sits (after the 124 bytes it covers).
pub const TRAILER_CRC_AT: usize = 124;
/// Where the journal header's CRC32C sits (after the 60 bytes it covers).
pub const JOURNAL_HEADER_CRC_AT: usize = 60;

/// Rewrites the little-endian CRC32C at `crc_at` to cover `b[..crc_at]` (if `b` is long enough).
pub fn fix_crc(b: &mut [u8], crc_at: usize) {
    if b.len() >= crc_at + 4 {
        let crc = crc32c::crc32c(&b[..crc_at]);
        b[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
    }
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Makes a (possibly mutated) sealed layer file self-consistent again where a checksum or
/// digest would hide a mutation: the header CRC, and, if the trailer's counts fit the file, the
/// index digest and the trailer CRC. Lengths and counts are left as they are.
pub fn reseal_layer(b: &mut [u8]) {
    fix_crc(b, HEADER_CRC_AT);
    if b.len() < HEADER_SIZE + TRAILER_SIZE {
        return;
    }
    let t = b.len() - TRAILER_SIZE;
    let (blocks, extents) = (le_u64(b, t + 8), le_u64(b, t + 16));
    let index_len = extents
        .checked_mul(INDEX_ENTRY_SIZE as u64)
        .zip(blocks.checked_mul(BLOCK_HASH_SIZE as u64))
        .and_then(|(a, b)| a.checked_add(b));
    if let Some(n) = index_len.filter(|&n| n <= (t - HEADER_SIZE) as u64) {
        let digest = Digest::of(&b[t - n as usize..t]);
        b[t + 24..t + 56].copy_from_slice(&digest.0);
    }
    fix_crc(&mut b[t..], TRAILER_CRC_AT);
}

/// A small valid sealed layer, written by the engine's [`LayerWriter`]: block size 4 or 8 KiB,
/// up to 48 virtual blocks (the last one maybe partial), runs of data, zero and discarded blocks
/// and gaps chosen by `u`, block contents derived from `u` too.
pub fn build_layer(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    let block_size: u32 = if u.arbitrary::<bool>()? { 4096 } else { 8192 };
    debug_assert!(check_block_size(block_size).is_ok());
    let blocks: u64 = u.int_in_range(1..=48)?;
    let short = u64::from(u.int_in_range(0..=(block_size / 512 - 1))?) * 512;
    let virtual_size = blocks * u64::from(block_size) - short;
    let parent = if u.arbitrary::<bool>()? { Digest::ZERO } else { Digest(u.arbitrary()?) };
    let mut w = LayerWriter::new(Vec::new(), block_size, virtual_size, parent).expect("writes to a Vec");
    let mut vblock = 0u64;
    while vblock < blocks && !u.is_empty() {
        vblock += u64::from(u.int_in_range(0..=3u8)?); // a gap: nothing in this layer
        let count = u64::from(u.int_in_range(1..=6u8)?).min(blocks.saturating_sub(vblock));
        if count == 0 {
            break;
        }
        match u.int_in_range(0..=2u8)? {
            0 => {
                for b in vblock..vblock + count {
                    let fill: u8 = u.arbitrary()?;
                    let mut block = vec![fill; block_size as usize];
                    block[..8].copy_from_slice(&b.to_le_bytes());
                    w.push_block(b, &block).expect("in order");
                }
            }
            1 => w.push_marker(vblock, count, ExtentKind::Zero).expect("in order"),
            _ => w.push_marker(vblock, count, ExtentKind::Discarded).expect("in order"),
        }
        vblock += count;
    }
    let (bytes, _, len) = w.finish().expect("writes to a Vec");
    debug_assert_eq!(bytes.len() as u64, len);
    Ok(bytes)
}

/// Applies up to four mutations chosen by `u` to `b`: flip a byte, overwrite 8 bytes with a
/// chosen little-endian integer (counts, sizes, block numbers), cut the file short or extend it.
/// Offsets favour the structures (header, tail) over the data blocks.
pub fn mutate(u: &mut Unstructured<'_>, b: &mut Vec<u8>) -> Result<()> {
    for _ in 0..u.int_in_range(0..=4u8)? {
        if b.is_empty() {
            return Ok(());
        }
        let len = b.len();
        let at = match u.int_in_range(0..=2u8)? {
            0 => u.int_in_range(0..=(HEADER_SIZE.min(len) - 1))?,
            1 => len - 1 - u.int_in_range(0..=(len - 1).min(1024))?,
            _ => u.int_in_range(0..=len - 1)?,
        };
        match u.int_in_range(0..=3u8)? {
            0 => b[at] ^= u.int_in_range(1..=255u8)?,
            1 => {
                let v: u64 = match u.int_in_range(0..=2u8)? {
                    0 => u.int_in_range(0..=64)?,
                    1 => u64::MAX - u.int_in_range(0..=64)?,
                    _ => u.arbitrary()?,
                };
                let end = (at + 8).min(len);
                b[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
            }
            2 => b.truncate(at),
            _ => b.extend(std::iter::repeat_n(0u8, u.int_in_range(1..=64)?)),
        }
    }
    Ok(())
}

/// A directory of this process's own, under `$TMPDIR`, for files the targets write, created on
/// first use. `scripts/fuzz.sh` points `TMPDIR` at a directory it removes afterwards (on tmpfs
/// where there is one); the targets remove their files after each input.
pub fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mcow-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the scratch directory");
        dir
    })
}
