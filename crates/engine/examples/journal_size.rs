//! How big a writable top's journal gets under a long random workload, with compaction at its
//! default thresholds, against what it would be without (issue 14; a measurement, not a test).
//!
//! Runs random 4 KiB writes, write-zeroes and discards (a third each) on a 1 GiB top with 4 KiB
//! blocks and a flush every 32 ops, in memory: the data file keeps only its length (journal
//! size does not depend on the bytes), the journal is a real byte buffer, and the journal
//! files (temporary journal, rename) are simulated, so the numbers are the engine's own logic.
//! Without compaction the journal would be its header plus every batch written: each batch is
//! 20 bytes plus 32 per entry; the example counts the bytes every flush appended.
//!
//! `cargo run --release -p mcow-engine --example journal_size [OPS]` (default 10,000,000).

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use mcow_engine::Digest;
use mcow_engine::storage::Storage;
use mcow_engine::top::{JournalFiles, TopLayer};
use mcow_format::ExtentKind;

/// A data file that keeps only its length and its header (blocks read as zeros).
#[derive(Default)]
struct Lengthless(AtomicU64, Mutex<Vec<u8>>);

impl Storage for Lengthless {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        buf.fill(0);
        let h = self.1.lock().unwrap();
        if let Some(src) = h.get(offset as usize..) {
            let n = src.len().min(buf.len());
            buf[..n].copy_from_slice(&src[..n]);
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if offset < mcow_format::HEADER_SIZE as u64 {
            let mut h = self.1.lock().unwrap();
            let end = offset as usize + buf.len();
            if h.len() < end {
                h.resize(end, 0);
            }
            h[offset as usize..end].copy_from_slice(buf);
        }
        self.0.fetch_max(offset + buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.load(Ordering::Relaxed))
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.store(len, Ordering::Relaxed);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

/// A journal in memory; counts the bytes appended after its first write (a compacted
/// journal's snapshot, or a new top's header, is its first write).
#[derive(Default)]
struct Mem {
    bytes: Mutex<Vec<u8>>,
    writes: AtomicU64,
    /// Shared by every journal of the run.
    appended: Arc<AtomicU64>,
}

/// A handle to a journal in memory; clones share it.
#[derive(Clone, Default)]
struct Journal(Arc<Mem>);

impl std::ops::Deref for Journal {
    type Target = Mem;
    fn deref(&self) -> &Mem {
        &self.0
    }
}

impl Storage for Journal {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let b = self.bytes.lock().unwrap();
        let s = b.get(offset as usize..offset as usize + buf.len()).ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(s);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut b = self.bytes.lock().unwrap();
        let end = offset as usize + buf.len();
        if b.len() < end {
            b.resize(end, 0);
        }
        b[offset as usize..end].copy_from_slice(buf);
        if self.writes.fetch_add(1, Ordering::Relaxed) > 0 {
            self.appended.fetch_add(buf.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes.lock().unwrap().len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.bytes.lock().unwrap().resize(len as usize, 0);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Default)]
struct Files {
    temp: Mutex<Option<Journal>>,
    journal: Mutex<Journal>,
}

/// The simulated directory, shared with `main`.
struct Dir(Arc<Files>);

impl JournalFiles for Dir {
    fn create_temp(&self) -> io::Result<Box<dyn Storage>> {
        let appended = self.0.journal.lock().unwrap().appended.clone();
        let m = Journal(Arc::new(Mem { appended, ..Mem::default() }));
        *self.0.temp.lock().unwrap() = Some(m.clone());
        Ok(Box::new(m))
    }
    fn rename_temp(&self) -> io::Result<()> {
        *self.0.journal.lock().unwrap() = self.0.temp.lock().unwrap().take().expect("a temporary journal");
        Ok(())
    }
    fn sync_dir(&self) -> io::Result<()> {
        Ok(())
    }
    fn remove_temp(&self) -> io::Result<()> {
        *self.0.temp.lock().unwrap() = None;
        Ok(())
    }
    fn current_id(&self) -> io::Result<u64> {
        Ok(Arc::as_ptr(&self.0.journal.lock().unwrap().0) as usize as u64)
    }
    fn open_current(&self) -> io::Result<Box<dyn Storage>> {
        Ok(Box::new(self.0.journal.lock().unwrap().clone()))
    }
}

fn main() {
    let ops: u64 = std::env::args().nth(1).map(|s| s.parse().expect("a number of ops")).unwrap_or(10_000_000);
    const BS: u32 = 4096;
    const SIZE: u64 = 1 << 30;
    let blocks = SIZE / u64::from(BS);
    let files = Arc::new(Files::default());
    let journal = files.journal.lock().unwrap().clone();
    let top = TopLayer::create(
        Box::new(Lengthless::default()),
        Box::new(journal),
        Path::new("/mem/top-1.mcow"),
        BS,
        SIZE,
        Digest::ZERO,
    )
    .expect("create")
    .attach_journal_files(Box::new(Dir(files.clone())))
    .expect("attach");
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let data = vec![0xA5u8; BS as usize];
    let below = |_: u64, buf: &mut [u8]| -> mcow_engine::Result<()> {
        buf.fill(0);
        Ok(())
    };
    let (mut max_journal, mut flushes) = (0u64, 0u64);
    let started = std::time::Instant::now();
    for i in 1..=ops {
        let r = next();
        let vb = (r >> 2) % blocks;
        match r % 3 {
            0 => top.write(vb, 0, &data, &below).expect("write"),
            1 => top.set_marker(vb, vb + 1, ExtentKind::Zero).expect("zero"),
            _ => top.set_marker(vb, vb + 1, ExtentKind::Discarded).expect("discard"),
        }
        if i % 32 == 0 {
            top.flush().expect("flush");
            flushes += 1;
            max_journal = max_journal.max(top.file_sizes().1);
        }
    }
    top.flush().expect("flush");
    let (_, journal) = top.file_sizes();
    let extents = top.extents().len() as u64;
    let uncompacted = 64 + files.journal.lock().unwrap().appended.load(Ordering::Relaxed);
    println!("ops: {ops}, flushes: {flushes}, 4 KiB blocks: {blocks}, took {:?}", started.elapsed());
    println!("map extents at the end: {extents} (compact journal: {} bytes)", 64 + extents * 32);
    println!("journal at the end: {journal} bytes; largest after a flush: {max_journal} bytes");
    println!("compactions: {}", top.compactions());
    println!("without compaction: {uncompacted} bytes (header + every batch appended)");
}
