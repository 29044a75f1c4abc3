//! [`MemExport`]: an in-memory, sparse [`Export`] for tests, fuzzing and examples.
//!
//! It owns nothing but a map of fixed-size chunks; unwritten chunks are holes that read
//! as zeroes. It also counts flushes and can inject I/O errors over a byte range, so
//! tests can observe the server's behaviour. It is not meant to be fast or durable.

use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::export::{Export, Parts};
use crate::proto::{BASE_ALLOCATION, BlockSizes, NBD_STATE_HOLE, NBD_STATE_ZERO, StatusExtent};

/// Chunk granularity of [`MemExport`]: allocation is tracked per 64 KiB.
pub const MEM_CHUNK: u64 = 64 * 1024;

/// Value reported by [`MemExport`]'s extra context for allocated chunks (holes report 0).
pub const MEM_EXTRA_ALLOCATED: u32 = 1;

/// An in-memory sparse disk.
///
/// `base:allocation` reports unwritten chunks as `HOLE|ZERO` and written ones as data.
/// An optional extra context (see [`MemExport::with_extra_context`]) reports
/// [`MEM_EXTRA_ALLOCATED`] for written chunks and 0 for holes.
#[derive(Debug)]
pub struct MemExport {
    size: u64,
    read_only: bool,
    block_sizes: BlockSizes,
    extra_context: Option<String>,
    fast_zero: bool,
    fail_range: Option<Range<u64>>,
    flush_delay: std::time::Duration,
    chunks: Mutex<BTreeMap<u64, Box<[u8]>>>,
    flushes: AtomicU64,
}

impl MemExport {
    /// An all-zero, writable disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            read_only: false,
            block_sizes: BlockSizes::default(),
            extra_context: None,
            fast_zero: true,
            fail_range: None,
            flush_delay: std::time::Duration::ZERO,
            chunks: Mutex::new(BTreeMap::new()),
            flushes: AtomicU64::new(0),
        }
    }

    /// A disk holding `data` (its length is the size).
    pub fn from_bytes(data: &[u8]) -> Self {
        let me = Self::new(data.len() as u64);
        // Cannot fail: the range is inside the disk and no failure range is set.
        let _ = me.store(0, data);
        me
    }

    /// Marks the disk read-only.
    pub fn read_only(mut self, ro: bool) -> Self {
        self.read_only = ro;
        self
    }

    /// Sets the advertised block sizes.
    pub fn with_block_sizes(mut self, b: BlockSizes) -> Self {
        self.block_sizes = b;
        self
    }

    /// Offers one extra metadata context named `name`.
    pub fn with_extra_context(mut self, name: impl Into<String>) -> Self {
        self.extra_context = Some(name.into());
        self
    }

    /// Declares whether zeroing is fast (default true).
    pub fn with_fast_zero(mut self, fast: bool) -> Self {
        self.fast_zero = fast;
        self
    }

    /// Every read or write touching `range` fails with an I/O error.
    pub fn with_failing_range(mut self, range: Range<u64>) -> Self {
        self.fail_range = Some(range);
        self
    }

    /// How many times `flush` was called.
    /// Makes every flush take `delay` (a slow sync), for tests of what a server does meanwhile.
    pub fn with_flush_delay(mut self, delay: std::time::Duration) -> Self {
        self.flush_delay = delay;
        self
    }

    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    /// Bytes held in allocated chunks.
    pub fn allocated_bytes(&self) -> u64 {
        self.lock().len() as u64 * MEM_CHUNK
    }

    /// A copy of the whole disk.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; usize::try_from(self.size).unwrap_or(0)];
        let _ = self.load(0, &mut v);
        v
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Box<[u8]>>> {
        self.chunks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range past the end of the disk"))?;
        if let Some(r) = &self.fail_range
            && offset < r.end
            && r.start < end
        {
            return Err(io::Error::other("injected I/O error"));
        }
        Ok(())
    }

    fn load(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        let chunks = self.lock();
        let mut pos = 0usize;
        while pos < buf.len() {
            let abs = offset + pos as u64;
            let (idx, within) = (abs / MEM_CHUNK, (abs % MEM_CHUNK) as usize);
            let n = (MEM_CHUNK as usize - within).min(buf.len() - pos);
            let dst = &mut buf[pos..pos + n];
            match chunks.get(&idx) {
                Some(c) => dst.copy_from_slice(&c[within..within + n]),
                None => dst.fill(0),
            }
            pos += n;
        }
        Ok(())
    }

    fn store(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check(offset, data.len() as u64)?;
        let mut chunks = self.lock();
        let mut pos = 0usize;
        while pos < data.len() {
            let abs = offset + pos as u64;
            let (idx, within) = (abs / MEM_CHUNK, (abs % MEM_CHUNK) as usize);
            let n = (MEM_CHUNK as usize - within).min(data.len() - pos);
            let c = chunks.entry(idx).or_insert_with(|| vec![0u8; MEM_CHUNK as usize].into_boxed_slice());
            c[within..within + n].copy_from_slice(&data[pos..pos + n]);
            pos += n;
        }
        Ok(())
    }

    /// Zeroes a range; whole chunks are dropped (become holes) when `punch` is set.
    fn zero(&self, offset: u64, len: u64, punch: bool) -> io::Result<()> {
        self.check(offset, len)?;
        let mut chunks = self.lock();
        let end = offset + len;
        let mut abs = offset;
        while abs < end {
            let (idx, within) = (abs / MEM_CHUNK, abs % MEM_CHUNK);
            let n = (MEM_CHUNK - within).min(end - abs);
            if punch && n == MEM_CHUNK {
                chunks.remove(&idx);
            } else if let Some(c) = chunks.get_mut(&idx) {
                c[within as usize..(within + n) as usize].fill(0);
            } else if !punch {
                // NO_HOLE: the range must end up allocated.
                chunks.insert(idx, vec![0u8; MEM_CHUNK as usize].into_boxed_slice());
            }
            abs += n;
        }
        Ok(())
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn block_sizes(&self) -> BlockSizes {
        self.block_sizes
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.load(offset, buf)
    }

    /// Reads of whole chunks are handed over as the chunks themselves (zeros for a hole), so
    /// that the server's copy-free path is exercised too; other reads go through `read`.
    fn read_borrowed(&self, offset: u64, len: usize, send: &mut Parts<'_>) -> Option<io::Result<()>> {
        static HOLE: [u8; MEM_CHUNK as usize] = [0; MEM_CHUNK as usize];
        if !offset.is_multiple_of(MEM_CHUNK) || !(len as u64).is_multiple_of(MEM_CHUNK) {
            return None;
        }
        if let Err(e) = self.check(offset, len as u64) {
            return Some(Err(e));
        }
        let chunks = self.lock();
        let first = offset / MEM_CHUNK;
        let parts: Vec<&[u8]> = (first..first + len as u64 / MEM_CHUNK)
            .map(|i| chunks.get(&i).map_or(&HOLE[..], |c| &c[..]))
            .collect();
        send(&parts);
        Some(Ok(()))
    }

    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> io::Result<()> {
        self.store(offset, data)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, _fua: bool) -> io::Result<()> {
        self.zero(offset, len, may_trim)
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
        self.zero(offset, len, true)
    }

    fn flush(&self) -> io::Result<()> {
        std::thread::sleep(self.flush_delay);
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn fast_zero(&self) -> bool {
        self.fast_zero
    }

    fn extra_meta_contexts(&self) -> Vec<String> {
        self.extra_context.iter().cloned().collect()
    }

    fn block_status(&self, context: &str, offset: u64, len: u64) -> io::Result<Vec<StatusExtent>> {
        self.check(offset, len)?;
        let (hole, data) = if context == BASE_ALLOCATION {
            (NBD_STATE_HOLE | NBD_STATE_ZERO, 0)
        } else if self.extra_context.as_deref() == Some(context) {
            (0, MEM_EXTRA_ALLOCATED)
        } else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "unknown metadata context"));
        };
        let chunks = self.lock();
        let end = offset.saturating_add(len);
        let mut out: Vec<StatusExtent> = Vec::new();
        let mut abs = offset;
        while abs < end {
            let idx = abs / MEM_CHUNK;
            let n = (MEM_CHUNK - abs % MEM_CHUNK).min(end - abs);
            let flags = if chunks.contains_key(&idx) { data } else { hole };
            match out.last_mut() {
                Some(last) if last.flags == flags => last.length += n,
                _ => out.push(StatusExtent { length: n, flags }),
            }
            abs += n;
        }
        Ok(out)
    }
}
