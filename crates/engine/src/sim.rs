//! A simulated storage device for crash and fault tests.
//!
//! Owns: an in-memory `Storage` that keeps apart what is durable (synced) from what is only
//! written, so a test can "crash" it at any point and reopen what a real disk could hold
//! afterwards, and can make writes or syncs fail on cue (a full disk). Used by the engine's own
//! tests and by anyone testing on top of the engine; not used in production paths.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::storage::Storage;

#[derive(Default)]
struct State {
    /// What survives a crash.
    durable: Vec<u8>,
    /// What reads see now.
    current: Vec<u8>,
    /// Writes since the last sync, in order (offset, bytes); `None` offset marks a set_len.
    pending: Vec<(u64, Vec<u8>, Option<u64>)>,
    /// Fail every write and set_len after this many more (a full disk).
    writes_left: Option<u64>,
    /// Fail the next sync.
    fail_sync: bool,
}

/// How a crash treats the writes that were not yet synced.
#[derive(Debug, Clone, Copy)]
pub enum CrashMode {
    /// Every unsynced write is lost.
    DropUnsynced,
    /// Every write survives, synced or not: what a process kill leaves (the page cache is
    /// the host's and outlives the process).
    KeepAll,
    /// Unsynced writes survive in order up to the `n`th, which is torn after `cut` bytes.
    TearAt {
        /// The unsynced write torn (0 = the first).
        n: usize,
        /// Bytes of it that survive.
        cut: usize,
    },
}

/// A handle to one simulated file; clones share it.
#[derive(Clone, Default)]
pub struct SimStorage(Arc<Mutex<State>>);

impl SimStorage {
    /// An empty simulated file.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of writes since the last sync.
    pub fn pending_writes(&self) -> usize {
        self.lock().pending.len()
    }

    /// Lengths of the unsynced writes, in order (a `set_len` counts as 0 bytes).
    pub fn pending_lens(&self) -> Vec<usize> {
        self.lock().pending.iter().map(|(_, b, _)| b.len()).collect()
    }

    /// A new device holding what a crash now would leave.
    pub fn crashed(&self, mode: CrashMode) -> SimStorage {
        let s = self.lock();
        let mut img = s.durable.clone();
        if let CrashMode::KeepAll = mode {
            img = s.current.clone();
        }
        if let CrashMode::TearAt { n, cut } = mode {
            for (i, (off, bytes, set_len)) in s.pending.iter().enumerate().take(n + 1) {
                if let Some(len) = set_len {
                    img.resize(*len as usize, 0);
                    continue;
                }
                let keep = if i == n { cut.min(bytes.len()) } else { bytes.len() };
                write_into(&mut img, *off, &bytes[..keep]);
            }
        }
        SimStorage(Arc::new(Mutex::new(State { durable: img.clone(), current: img, ..State::default() })))
    }

    /// Makes writes fail with "no space left" after `n` more succeed.
    pub fn fail_writes_after(&self, n: u64) {
        self.lock().writes_left = Some(n);
    }

    /// Makes the next sync fail.
    pub fn fail_next_sync(&self) {
        self.lock().fail_sync = true;
    }

    /// Lets writes succeed again.
    pub fn heal(&self) {
        let mut s = self.lock();
        s.writes_left = None;
        s.fail_sync = false;
    }

    /// A copy of the current (not necessarily durable) bytes.
    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().current.clone()
    }

    /// Flips one bit of both the current and durable images (simulated media corruption).
    pub fn flip_bit(&self, offset: u64, bit: u8) {
        let mut s = self.lock();
        if let Some(b) = s.current.get_mut(offset as usize) {
            *b ^= 1 << bit;
        }
        if let Some(b) = s.durable.get_mut(offset as usize) {
            *b ^= 1 << bit;
        }
    }

    fn charge_write(s: &mut State) -> io::Result<()> {
        match s.writes_left {
            Some(0) => Err(io::Error::from_raw_os_error(28)), // ENOSPC
            Some(ref mut n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }
}

fn write_into(img: &mut Vec<u8>, off: u64, bytes: &[u8]) {
    let end = off as usize + bytes.len();
    if img.len() < end {
        img.resize(end, 0);
    }
    img[off as usize..end].copy_from_slice(bytes);
}

impl Storage for SimStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let s = self.lock();
        let start = offset as usize;
        let end = start.checked_add(buf.len()).filter(|&e| e <= s.current.len());
        match end {
            Some(end) => {
                buf.copy_from_slice(&s.current[start..end]);
                Ok(())
            }
            None => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end")),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.lock();
        Self::charge_write(&mut s)?;
        write_into(&mut s.current, offset, buf);
        s.pending.push((offset, buf.to_vec(), None));
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().current.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.lock();
        Self::charge_write(&mut s)?;
        s.current.resize(len as usize, 0);
        s.pending.push((0, Vec::new(), Some(len)));
        Ok(())
    }

    /// Writes zeros over the range (a crash may keep or lose them, like any unsynced write).
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.saturating_add(len).min(self.lock().current.len() as u64);
        if end > offset {
            self.write_at(&vec![0u8; (end - offset) as usize], offset)?;
        }
        Ok(())
    }

    /// The handle's shared state, which clones share.
    fn file_id(&self) -> io::Result<u64> {
        Ok(Arc::as_ptr(&self.0) as usize as u64)
    }

    fn sync(&self) -> io::Result<()> {
        let mut s = self.lock();
        if std::mem::take(&mut s.fail_sync) {
            return Err(io::Error::from_raw_os_error(5)); // EIO
        }
        s.durable = s.current.clone();
        s.pending.clear();
        Ok(())
    }
}
