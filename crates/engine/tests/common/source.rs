//! A `BlockSource` for the tests of partial layers: byte ranges of the complete layer files of a
//! store directory (the origin), counted (requests, ranges, bytes), optionally corrupted, and
//! optionally handed over block by block through a hook that can stall, break or corrupt them.
#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use mcow_engine::{BlockSource, Digest};

/// Called before piece `i` of a range (numbered from 0 within the range) is handed over, with
/// its bytes; returns false to end the transfer there with an error.
pub type Hook = dyn Fn(u64, &mut [u8]) -> bool + Send + Sync;

/// Serves `<store>/blobs/sha256/<digest>` files by byte range.
pub struct StoreSource {
    store: PathBuf,
    /// The size of the pieces handed to the sink.
    piece: usize,
    /// Only ranges that start before this offset are counted in `ranges`, `fetched` and
    /// `handed` (a test sets it to the end of the data region: the others are index chunks).
    data_end: u64,
    hook: Option<Box<Hook>>,
    /// While set, one bit in the middle of every range served is flipped.
    pub corrupt: AtomicBool,
    /// Requests: each `read_range`, and each `read_ranges` for all its ranges (as a multi-range
    /// GET would be).
    pub requests: AtomicU64,
    /// Counted ranges served.
    pub ranges: AtomicU64,
    /// Bytes of the counted ranges, counted when a range is read (handed over or not).
    pub fetched: AtomicU64,
    /// Bytes of the counted ranges handed to the sink (past the hook), counted piece by piece.
    pub handed: AtomicU64,
}

impl StoreSource {
    /// Serves the layer files of the store `store`, in uneven pieces (40 000 bytes, so that
    /// blocks split across pieces are exercised), counting every range; no hook, no corruption.
    pub fn new(store: impl Into<PathBuf>) -> StoreSource {
        StoreSource {
            store: store.into(),
            piece: 40_000,
            data_end: u64::MAX,
            hook: None,
            corrupt: false.into(),
            requests: 0.into(),
            ranges: 0.into(),
            fetched: 0.into(),
            handed: 0.into(),
        }
    }

    /// Counts only the ranges that start before `data_end`.
    pub fn counting_below(mut self, data_end: u64) -> StoreSource {
        self.data_end = data_end;
        self
    }

    /// Starts with `corrupt` set to `on`.
    pub fn corrupting(self, on: bool) -> StoreSource {
        self.corrupt.store(on, Ordering::Relaxed);
        self
    }

    /// Hands over `block` bytes at a time, each through `hook` (see [`Hook`]).
    pub fn hooked(
        mut self,
        block: usize,
        hook: impl Fn(u64, &mut [u8]) -> bool + Send + Sync + 'static,
    ) -> StoreSource {
        self.piece = block;
        self.hook = Some(Box::new(hook));
        self
    }

    /// (ranges, bytes) counted when read.
    pub fn counts(&self) -> (u64, u64) {
        (self.ranges.load(Ordering::Relaxed), self.fetched.load(Ordering::Relaxed))
    }

    /// Hands over `len` bytes at `offset` of `layer` piece by piece (through the hook if there
    /// is one); false if the sink stopped.
    fn send(
        &self,
        layer: &Digest,
        offset: u64,
        len: u64,
        sink: &mut dyn FnMut(&[u8]) -> bool,
    ) -> std::io::Result<bool> {
        let f = std::fs::File::open(self.store.join("blobs/sha256").join(layer.hex()))?;
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, offset)?;
        if self.corrupt.load(Ordering::Relaxed) {
            buf[len as usize / 2] ^= 0x40;
        }
        let counted = offset < self.data_end;
        if counted {
            self.ranges.fetch_add(1, Ordering::Relaxed);
            self.fetched.fetch_add(len, Ordering::Relaxed);
        }
        for (i, piece) in buf.chunks_mut(self.piece).enumerate() {
            if let Some(hook) = &self.hook
                && !hook(i as u64, piece)
            {
                return Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "transfer broken"));
            }
            if counted {
                self.handed.fetch_add(piece.len() as u64, Ordering::Relaxed);
            }
            if !sink(piece) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

impl BlockSource for StoreSource {
    fn read_range(
        &self,
        layer: &Digest,
        offset: u64,
        len: u64,
        sink: &mut dyn FnMut(&[u8]) -> bool,
    ) -> std::io::Result<()> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.send(layer, offset, len, sink).map(|_| ())
    }

    fn read_ranges(
        &self,
        layer: &Digest,
        ranges: &[(u64, u64)],
        sink: &mut dyn FnMut(usize, &[u8]) -> bool,
    ) -> std::io::Result<()> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        for (r, &(offset, len)) in ranges.iter().enumerate() {
            if !self.send(layer, offset, len, &mut |piece: &[u8]| sink(r, piece))? {
                break;
            }
        }
        Ok(())
    }
}
