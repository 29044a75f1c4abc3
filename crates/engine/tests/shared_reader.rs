//! A force-share (`-U`) reader beside a writer of the same disk: what it reads may be stale, but
//! never another block's data, although the writer keeps reusing the physical blocks it frees.
//!
//! Both handles live in this process: the reader's `force_share` open skips the lock the writer
//! holds, and reads the files through its own descriptors, as another process would.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::{Rng, create_disk, open_rw};
use mcow_engine::storage::{FileStorage, Storage};
use mcow_engine::top::TopLayer;
use mcow_engine::{Disk, OpenOptions};
use mcow_format::ExtentKind;

const SHARED: OpenOptions = OpenOptions { read_only: true, verify: true, force_share: true };
const REC: usize = 16;

/// Bytes whose every 16-byte record names `vblock` (and the write `tag`): a block read back
/// tells whose data it is.
fn records(vblock: u64, tag: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    for _ in 0..len / REC {
        v.extend_from_slice(&vblock.to_le_bytes());
        v.extend_from_slice(&tag.to_le_bytes());
    }
    v
}

/// Fails if a record of block `vblock` (as read in `block`) is neither zero nor `vblock`'s.
fn assert_own_records(vblock: u64, block: &[u8], what: &str) {
    for (i, r) in block.chunks_exact(REC).enumerate() {
        let owner = u64::from_le_bytes(r[..8].try_into().unwrap());
        assert!(
            r.iter().all(|&b| b == 0) || owner == vblock,
            "{what}: block {vblock} record {i} holds block {owner}'s data (tag {})",
            u64::from_le_bytes(r[8..].try_into().unwrap())
        );
    }
}

fn read(d: &Disk, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    d.read(offset, &mut b).unwrap();
    b
}

/// The case. Tried: a writer writes 64 KiB at 8M and flushes; a force-share reader
/// opens; the writer discards 8M, flushes, writes new data at 12M (which reuses the physical
/// block 8M had) and flushes. Must hold: the reader reads 8M as the old data or zeros, never
/// the 12M data; and, as both flushes completed before its reads, it sees zeros at 8M and the
/// new data at 12M.
#[test]
fn discard_then_reuse_never_shows_the_new_block_at_the_old_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = create_disk(tmp.path(), "d", 16 << 20, 64 << 10);
    let (at8, at12) = (8u64 << 20, 12u64 << 20);
    let old = records(at8 / 65536, 1, 64 << 10);
    let new = records(at12 / 65536, 2, 64 << 10);
    let w = open_rw(&dir);
    w.write(at8, &old).unwrap();
    w.flush().unwrap();
    let r = Disk::open(&dir, SHARED).unwrap();
    assert_eq!(read(&r, at8, old.len()), old, "the reader sees what was flushed before it opened");
    w.discard(at8, 64 << 10).unwrap();
    w.flush().unwrap();
    w.write(at12, &new).unwrap();
    w.flush().unwrap();
    assert_eq!(w.top().file_sizes().0, 4096 + 65536, "the writer reused 8M's physical block for 12M");
    let got = read(&r, at8, old.len());
    assert_ne!(got, new, "the reader returned the 12M data at 8M");
    assert!(got.iter().all(|&b| b == 0), "8M was discarded by a completed flush: zeros");
    assert_eq!(read(&r, at12, new.len()), new, "12M was written by a completed flush");
}

/// Appends bytes to a top's journal as a crashed flush would leave them: the start of a batch.
fn append_torn_batch(dir: &Path, rng: &mut Rng) {
    let mut f = std::fs::OpenOptions::new().append(true).open(dir.join("top-1.mcow.journal")).unwrap();
    let mut torn = b"JBAT".to_vec();
    torn.extend_from_slice(&1u32.to_le_bytes()); // one entry: 52 bytes, of which 24 are written
    torn.extend_from_slice(&rng.bytes(16));
    f.write_all(&torn).unwrap();
}

/// Tried: random writer operations (whole- and part-block writes, zeroes, discards, flushes,
/// and now and then a close and reopen of the writer, sometimes after leaving a torn batch at
/// the journal's end, which that reopen cuts away) on a 32-block disk, with the force-share
/// reader reading the whole disk after each. Must hold: each block it returns is one of the
/// values that block has held (zeros, before any write, included), never another block's
/// data; and after a flush it returns exactly what the writer does.
#[test]
fn random_ops_reader_sees_only_each_blocks_own_values() {
    const BS: usize = 4096;
    const BLOCKS: u64 = 32;
    let tmp = tempfile::tempdir().unwrap();
    let dir = create_disk(tmp.path(), "d", BLOCKS * BS as u64, BS as u32);
    let mut rng = Rng::new(11);
    let mut w = Some(open_rw(&dir));
    let r = Disk::open(&dir, SHARED).unwrap();
    let mut model = vec![vec![0u8; BS]; BLOCKS as usize];
    let mut held: Vec<HashSet<Vec<u8>>> = model.iter().map(|b| HashSet::from([b.clone()])).collect();
    for step in 0..600u64 {
        let wd = w.as_ref().unwrap();
        let first = rng.below(BLOCKS);
        let count = rng.range(1, 3.min(BLOCKS - first));
        let span = |b: u64| (b * BS as u64, (count * BS as u64));
        let op = rng.below(10);
        match op {
            0..=3 => {
                // Whole blocks, each with its own records.
                let (off, _) = span(first);
                let data: Vec<u8> = (first..first + count).flat_map(|b| records(b, step + 1, BS)).collect();
                wd.write(off, &data).unwrap();
                for b in first..first + count {
                    model[b as usize] = records(b, step + 1, BS);
                }
            }
            4..=5 => {
                // Part of one block (record-aligned).
                let start = rng.below((BS / REC) as u64) as usize * REC;
                let len = rng.range(1, ((BS - start) / REC) as u64) as usize * REC;
                wd.write(first * BS as u64 + start as u64, &records(first, step + 1, len)).unwrap();
                model[first as usize][start..start + len].copy_from_slice(&records(first, step + 1, len));
            }
            6 => {
                let (off, len) = span(first);
                wd.discard(off, len).unwrap();
            }
            7 => {
                let (off, len) = span(first);
                wd.write_zeroes(off, len, false).unwrap();
            }
            _ => wd.flush().unwrap(),
        }
        if matches!(op, 6 | 7) {
            for b in first..first + count {
                model[b as usize] = vec![0u8; BS];
            }
        }
        for (b, content) in model.iter().enumerate() {
            held[b].insert(content.clone());
        }
        if rng.chance(40) {
            drop(w.take()); // flushes on close
            if rng.chance(2) {
                append_torn_batch(&dir, &mut rng);
                // The reader sees the torn batch as a tail; the reopen below cuts it.
                let got = read(&r, 0, BLOCKS as usize * BS);
                assert!(got == model.concat(), "step {step}: a torn batch changes nothing");
            }
            w = Some(open_rw(&dir));
        }
        let got = read(&r, 0, BLOCKS as usize * BS);
        for (b, block) in got.chunks_exact(BS).enumerate() {
            assert_own_records(b as u64, block, &format!("step {step}"));
            assert!(held[b].contains(block), "step {step}: block {b} reads as a value it never held");
        }
        if op >= 8 {
            let want: Vec<u8> = model.concat();
            assert!(got == want, "step {step}: after a flush the reader must see the flushed disk");
        }
    }
}

/// Tried: a writer thread doing random writes, discards and flushes as fast as it can for about
/// a second (so blocks are freed and reused while reads are in flight), and a force-share
/// reader thread reading the whole disk meanwhile. Must hold: every record the reader gets is
/// zero or belongs to the block it was read at (the check after each read catches a block
/// reused under it); and the reader did read while the writer reused blocks.
#[test]
fn concurrent_writer_never_leaks_another_blocks_data() {
    concurrent_writer(false);
}

/// The same with a writer that compacts its journal after almost every flush: the reader keeps
/// following it through the renames (replaying each new journal) and still never shows another
/// block's data.
#[test]
fn concurrent_writer_compacting_its_journal_never_leaks_another_blocks_data() {
    concurrent_writer(true);
}

fn concurrent_writer(compact: bool) {
    const BS: usize = 4096;
    const BLOCKS: u64 = 16;
    let tmp = tempfile::tempdir().unwrap();
    let dir = create_disk(tmp.path(), "d", BLOCKS * BS as u64, BS as u32);
    let w = open_rw(&dir);
    // Every block in the top first, so the reader's map points at physical blocks to reuse.
    for b in 0..BLOCKS {
        w.write(b * BS as u64, &records(b, 0, BS)).unwrap();
    }
    w.flush().unwrap();
    if compact {
        w.top().set_compaction(0, 1);
    }
    let r = Disk::open(&dir, SHARED).unwrap();
    let stop = AtomicBool::new(false);
    let (reads, flushes) = (AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut rng = Rng::new(5);
            let t0 = std::time::Instant::now();
            let mut tag = 1u64;
            while t0.elapsed() < std::time::Duration::from_millis(1000) {
                let b = rng.below(BLOCKS);
                match rng.below(4) {
                    0 | 1 => w.write(b * BS as u64, &records(b, tag, BS)).unwrap(),
                    2 => w.discard(b * BS as u64, BS as u64).unwrap(),
                    _ => {
                        w.flush().unwrap();
                        flushes.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tag += 1;
            }
            stop.store(true, Ordering::Relaxed);
        });
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let got = read(&r, 0, BLOCKS as usize * BS);
                for (b, block) in got.chunks_exact(BS).enumerate() {
                    assert_own_records(b as u64, block, "concurrent read");
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
        });
    });
    let (reads, flushes) = (reads.into_inner(), flushes.into_inner());
    assert!(
        reads > 20 && flushes > 20,
        "too little happened to test anything: {reads} reads, {flushes} flushes"
    );
    if compact {
        assert!(w.top().compactions() > 20, "only {} compactions", w.top().compactions());
    }
    // The writer's final state, flushed, is what the reader then shows.
    w.flush().unwrap();
    assert_eq!(read(&r, 0, BLOCKS as usize * BS), read(&w, 0, BLOCKS as usize * BS));
}

type Hook = std::sync::Arc<std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>>;

/// A data file whose next read, once `hook` is armed, first runs it (once): a writer's work,
/// landed between the reader's catching up on the journal and its read of the data.
struct HookedData {
    inner: FileStorage,
    hook: Hook,
}

impl Storage for HookedData {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let hook = self.hook.lock().unwrap().take();
        if let Some(h) = hook {
            h();
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.inner.sync()
    }
}

/// Tried: the race the check after a read exists for, made certain. A force-share reader's map
/// has block 0 at physical block 0; just as it reads that block (after catching up on the
/// journal), the writer discards block 0, flushes, and writes block 1, which reuses physical
/// block 0. Must hold: that read is refused (`read_data` returns false: resolve again), although
/// the bytes it read are block 1's; the next read catches up and finds block 0 discarded.
#[test]
fn block_reused_during_a_read_is_caught_by_the_check_after_it() {
    const BS: usize = 4096;
    let tmp = tempfile::tempdir().unwrap();
    let dir = create_disk(tmp.path(), "d", 8 * BS as u64, BS as u32);
    let path = dir.join("top-1.mcow");
    let file = |p: &Path, write: bool| std::fs::OpenOptions::new().read(true).write(write).open(p).unwrap();
    let jpath = dir.join("top-1.mcow.journal");
    let writer = std::sync::Arc::new(
        TopLayer::open(
            Box::new(FileStorage(file(&path, true))),
            Box::new(FileStorage(file(&jpath, true))),
            &path,
            false,
        )
        .unwrap(),
    );
    let zeros = |_: u64, b: &mut [u8]| -> mcow_engine::Result<()> {
        b.fill(0);
        Ok(())
    };
    writer.write(0, 0, &records(0, 1, BS), &zeros).unwrap();
    writer.flush().unwrap();

    let w = writer.clone();
    let hook: Box<dyn FnOnce() + Send> = Box::new(move || {
        w.set_marker(0, 1, ExtentKind::Discarded).unwrap();
        w.flush().unwrap();
        let zeros = |_: u64, b: &mut [u8]| -> mcow_engine::Result<()> {
            b.fill(0);
            Ok(())
        };
        w.write(1, 0, &records(1, 2, BS), &zeros).unwrap();
        assert!(matches!(w.lookup(1), Ok(e) if e.loc.pblock == 0), "block 1 must reuse physical block 0");
    });
    let armed = Hook::default();
    let data = HookedData { inner: FileStorage(file(&path, false)), hook: armed.clone() };
    let reader =
        TopLayer::open_shared(Box::new(data), Box::new(FileStorage(file(&jpath, false))), &path).unwrap();
    assert!(matches!(reader.lookup(0), Ok(e) if e.loc.kind == ExtentKind::Data && e.loc.pblock == 0));
    *armed.lock().unwrap() = Some(hook);

    let mut buf = vec![0u8; BS];
    let ok = reader.read_data(0, 0, &mut buf).unwrap();
    assert_eq!(buf, records(1, 2, BS), "the hook did land block 1's data under the read");
    assert!(!ok, "a read whose block was reused under it must be refused, not returned");
    assert!(!reader.read_data(0, 0, &mut buf).unwrap(), "block 0 is no longer data in the top");
    assert!(
        matches!(reader.lookup(0), Ok(e) if e.loc.kind == ExtentKind::Discarded),
        "the reader caught up: block 0 is discarded"
    );
}

/// Tried: the journal of a force-share reader's disk replaced in place (another top's journal
/// copied over it: another instance, and longer). Must hold: the reader's next read fails with
/// an error that says the journal was replaced, instead of applying another top's batches.
#[test]
fn replaced_journal_is_an_error_not_a_mix() {
    let tmp = tempfile::tempdir().unwrap();
    let d = create_disk(tmp.path(), "d", 1 << 20, 4096);
    let e = create_disk(tmp.path(), "e", 1 << 20, 4096);
    let we = open_rw(&e);
    we.write(0, &records(0, 1, 4096)).unwrap();
    we.flush().unwrap();
    let r = Disk::open(&d, SHARED).unwrap();
    std::fs::copy(e.join("top-1.mcow.journal"), d.join("top-1.mcow.journal")).unwrap();
    let err = r.read(0, &mut [0u8; 4096]).unwrap_err().to_string();
    assert!(err.contains("top-1.mcow.journal") && err.contains("replaced"), "{err}");
}
