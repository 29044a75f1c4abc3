//! The `multipart/byteranges` parser (`mcow_remote::http_client::multipart::read_byteranges`) on
//! arbitrary bodies, read in arbitrary small pieces, for arbitrary requested ranges. Must hold:
//! no panic, no range gets more bytes than it asked for, and `done` counts exactly the bytes
//! each range was handed.
#![no_main]

use std::io::{BufReader, Read};

/// A reader that hands out at most `step` bytes per read, as a slow network would.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.step.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // Byte 0: how many ranges (1..=4) and how the body is read; then 2 bytes per range (its
    // offset in 16-byte steps, its length); the rest is the body.
    let Some((&head, rest)) = data.split_first() else { return };
    let n = usize::from(head % 4) + 1;
    if rest.len() < 2 * n {
        return;
    }
    let (spec, body) = rest.split_at(2 * n);
    let ranges: Vec<(u64, u64)> =
        spec.chunks(2).map(|c| (u64::from(c[0]) * 16, u64::from(c[1] % 64) + 1)).collect();
    let step = usize::from(head >> 2) % 7 + 1;
    let mut reader = BufReader::with_capacity(usize::from(head >> 5) * 3 + 1, Trickle { data: body, step });
    let mut done = vec![0u64; n];
    let mut got = vec![0u64; n];
    let _ = mcow_remote::http_client::multipart::read_byteranges(
        "GET",
        "http://fuzz/",
        &mut reader,
        "XyZ",
        &ranges,
        &mut done,
        &mut |i, piece| {
            got[i] += piece.len() as u64;
            true
        },
    );
    for i in 0..n {
        assert_eq!(got[i], done[i], "range {i}: handed {} bytes, counted {}", got[i], done[i]);
        assert!(done[i] <= ranges[i].1, "range {i} got {} bytes of {}", done[i], ranges[i].1);
    }
});
