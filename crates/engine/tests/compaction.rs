//! Journal compaction and punched-out space in the writable top (issue 14).
//!
//! What is tried: random writes, zeroes, discards, flushes and reopens on a top whose journal
//! is compacted after almost every flush (tiny thresholds), against a flat model, with a
//! force-share reader following the writer through the renames; crashes at every step of a
//! compaction on simulated devices and a simulated directory (before and after the rename is
//! durable); a leftover temporary journal; discards that must shrink the data file's allocated
//! size, and punched blocks that are reused later. What must hold: every read matches the
//! model (the reader: as of the last flush), every crash image opens writable and reads as the
//! last flush, `check` is clean, and st_blocks drops after a discard.

mod common;

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use common::{Rng, assert_check_clean, create_disk, first_diff, open_rw, pattern, read_all};
use mcow_engine::sim::{CrashMode, SimStorage};
use mcow_engine::storage::Storage;
use mcow_engine::top::{JournalFiles, TopLayer, journal_path, journal_temp_path};
use mcow_engine::{Digest, Disk, OpenOptions};
use mcow_format::ExtentKind;

const BS: u32 = 4096;

fn top_path(dir: &Path) -> PathBuf {
    dir.join("top-1.mcow")
}

/// A random op on a disk of `blocks` blocks, applied to the disk and the model.
fn random_op(rng: &mut Rng, disk: &Disk, model: &mut [u8], blocks: u64) {
    let bs = u64::from(BS);
    // Mostly whole blocks (so zero and discard runs free blocks), sometimes unaligned.
    let (off, len) = if rng.chance(4) {
        let off = rng.below(blocks * bs - 1);
        (off, rng.range(1, (blocks * bs - off).min(3 * bs)))
    } else {
        let b = rng.below(blocks);
        (b * bs, rng.range(1, (blocks - b).min(4)) * bs)
    };
    let range = off as usize..(off + len) as usize;
    match rng.below(3) {
        0 => {
            let data = pattern(rng.next_u64(), len as usize);
            disk.write(off, &data).unwrap();
            model[range].copy_from_slice(&data);
        }
        1 => {
            disk.write_zeroes(off, len, rng.chance(2)).unwrap();
            model[range].fill(0);
        }
        _ => {
            disk.discard(off, len).unwrap();
            model[range].fill(0);
        }
    }
}

fn assert_reads(disk: &Disk, model: &[u8], what: &str) {
    let got = read_all(disk);
    if let Some(at) = first_diff(&got, model) {
        panic!(
            "{what}: byte {at} (block {}) reads {} but the model has {}",
            at / BS as usize,
            got[at],
            model[at]
        );
    }
}

#[test]
fn random_ops_through_many_compactions_and_reopens_match_a_flat_model() {
    let tmp = tempfile::tempdir().unwrap();
    let blocks = 64u64;
    let dir = create_disk(tmp.path(), "d", blocks * u64::from(BS), BS);
    let mut model = vec![0u8; (blocks * u64::from(BS)) as usize];
    let mut rng = Rng::new(14);
    let open = |dir: &Path| {
        let d = open_rw(dir);
        // Compact whenever the journal is more than twice a snapshot.
        d.top().set_compaction(0, 2);
        d
    };
    let shared = || {
        Disk::open(&dir, OpenOptions { read_only: true, force_share: true, ..Default::default() }).unwrap()
    };
    let mut disk = open(&dir);
    let mut reader = shared();
    let (mut compactions, mut max_journal) = (0, 0);
    for step in 0..1500 {
        random_op(&mut rng, &disk, &mut model, blocks);
        if rng.chance(4) {
            disk.flush().unwrap();
            let jlen = std::fs::metadata(journal_path(&top_path(&dir))).unwrap().len();
            max_journal = max_journal.max(jlen);
            // Beside the writer, after its flush: the reader shows exactly that flush.
            if rng.chance(8) {
                assert_reads(&reader, &model, &format!("force-share reader at step {step}"));
            }
        }
        if rng.chance(150) {
            disk.flush().unwrap();
            compactions += disk.top().compactions();
            drop(disk);
            disk = open(&dir);
            assert_eq!(disk.debris().journal_tail_bytes, 0, "step {step}: a clean close leaves no tail");
            assert_reads(&disk, &model, &format!("reopen at step {step}"));
            if rng.chance(2) {
                reader = shared();
            }
        }
    }
    disk.flush().unwrap();
    compactions += disk.top().compactions();
    assert_reads(&reader, &model, "force-share reader at the end");
    drop((disk, reader));
    assert!(compactions > 25, "only {compactions} compactions");
    // A 64-block map takes at most 64 entries: 64 + 64 * 32 + 20 bytes; with ratio 2 the
    // journal stays within about twice that plus one round's batch.
    assert!(max_journal < 3 * (64 + 64 * 32 + 20) + 4 * 32 * 8, "journal reached {max_journal} bytes");
    let d = open_rw(&dir);
    assert_reads(&d, &model, "final reopen");
    drop(d);
    assert!(!journal_temp_path(&top_path(&dir)).exists(), "no temporary journal is left");
    assert_check_clean(&dir);
}

#[test]
fn a_leftover_temporary_journal_is_removed_by_a_writable_open_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = create_disk(tmp.path(), "d", 16 * u64::from(BS), BS);
    let temp = journal_temp_path(&top_path(&dir));
    std::fs::write(&temp, b"half a journal").unwrap();
    let ro = Disk::open(&dir, OpenOptions { read_only: true, ..Default::default() }).unwrap();
    drop(ro);
    assert!(temp.exists(), "a read-only open changes nothing");
    let report = mcow_engine::ops::check(&dir, false, &mut |_, _| {}).unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(report.debris.iter().any(|d| d.contains("top-1.mcow.journal.tmp")), "{:?}", report.debris);
    let d = open_rw(&dir);
    assert!(!temp.exists(), "a writable open removes the debris");
    drop(d);
    assert_check_clean(&dir);
}

#[test]
fn discarded_blocks_are_punched_out_and_reused_correctly() {
    let tmp = tempfile::tempdir().unwrap();
    let blocks = 256u64;
    let bs = u64::from(BS);
    let dir = create_disk(tmp.path(), "d", blocks * bs, BS);
    let data_file = top_path(&dir);
    let allocated = || std::fs::metadata(&data_file).unwrap().blocks() * 512;
    let d = open_rw(&dir);
    let mut model = vec![0u8; (blocks * bs) as usize];
    let data = pattern(1, model.len());
    d.write(0, &data).unwrap();
    model.copy_from_slice(&data);
    d.flush().unwrap();
    let full = allocated();
    assert!(full >= blocks * bs, "{full} bytes allocated after writing {blocks} blocks");
    // Discard the first three quarters, zero (with trim) the rest but 16 blocks.
    d.discard(0, 192 * bs).unwrap();
    d.write_zeroes(192 * bs, 48 * bs, true).unwrap();
    model[..(240 * bs) as usize].fill(0);
    d.flush().unwrap();
    let after = allocated();
    assert!(after <= full - 240 * bs, "allocated {full} -> {after} bytes after freeing 240 blocks");
    assert_eq!(std::fs::metadata(&data_file).unwrap().len(), 4096 + blocks * bs, "apparent size kept");
    let info = mcow_engine::ops::info(&d);
    assert_eq!(info.top_allocated_bytes, after);
    assert_eq!(info.top_file_bytes, 4096 + blocks * bs);
    assert_reads(&d, &model, "after the discard");
    // Reuse the punched blocks: new data lands in them and reads back, before and after reopen.
    let again = pattern(2, (100 * bs) as usize);
    d.write(10 * bs, &again).unwrap();
    model[(10 * bs) as usize..(110 * bs) as usize].copy_from_slice(&again);
    d.flush().unwrap();
    assert!(allocated() >= after + 100 * bs, "reused blocks take space again");
    assert_eq!(std::fs::metadata(&data_file).unwrap().len(), 4096 + blocks * bs, "freed blocks were reused");
    assert_reads(&d, &model, "after reuse");
    drop(d);
    let d = open_rw(&dir);
    assert_reads(&d, &model, "after reopen");
    drop(d);
    assert_check_clean(&dir);
}

/// A simulated directory holding a top's journal and its temporary, with what of the names is
/// durable kept apart from what is current; crash images are taken at each step of a
/// compaction and before every sync of the journal or data devices.
struct SimDir {
    data: SimStorage,
    names: Mutex<Names>,
    images: Mutex<Vec<(SimStorage, SimStorage, String)>>,
    /// Set from the creation of a temporary journal to the end of the directory sync: the
    /// steps of a compaction, which a round takes after its batch is durable.
    switching: Mutex<bool>,
    /// Makes the next directory sync fail.
    fail_dir_sync: Mutex<bool>,
}

#[derive(Clone)]
struct Names {
    journal: SimStorage,
    temp: Option<SimStorage>,
    durable_journal: SimStorage,
}

/// A device handed to the top that lets the directory take images before it syncs.
struct Dev {
    dev: SimStorage,
    dir: Arc<SimDir>,
    name: &'static str,
}

impl Storage for Dev {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.dev.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.dev.write_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        self.dev.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.dev.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.dev.punch_hole(offset, len)
    }
    fn sync(&self) -> io::Result<()> {
        self.dir.capture(&format!("before {} sync", self.name));
        self.dev.sync()
    }
    fn file_id(&self) -> io::Result<u64> {
        self.dev.file_id()
    }
}

impl SimDir {
    /// A directory holding `data` and `journal` (durable as they are), no images taken yet.
    fn new(data: &SimStorage, journal: &SimStorage) -> Arc<SimDir> {
        Arc::new(SimDir {
            data: data.clone(),
            names: Mutex::new(Names {
                journal: journal.clone(),
                temp: None,
                durable_journal: journal.clone(),
            }),
            images: Mutex::new(Vec::new()),
            switching: Mutex::new(false),
            fail_dir_sync: Mutex::new(false),
        })
    }

    /// Images of what a crash now could leave: each device's unsynced writes all lost or all
    /// kept, under the durable journal name and (if a rename is not yet durable) the current one.
    fn capture(&self, moment: &str) {
        let moment =
            if *self.switching.lock().unwrap() { format!("[switch] {moment}") } else { moment.to_string() };
        let names = self.names.lock().unwrap().clone();
        let mut journals = vec![(names.durable_journal.clone(), "durable name")];
        if names.journal.file_id().unwrap() != names.durable_journal.file_id().unwrap() {
            journals.push((names.journal.clone(), "renamed, not yet durable"));
        }
        let modes = |dev: &SimStorage| {
            let n = dev.pending_writes();
            let mut m = vec![(CrashMode::DropUnsynced, "drop")];
            if n > 0 {
                m.push((CrashMode::TearAt { n: n - 1, cut: usize::MAX }, "keep"));
            }
            m
        };
        let mut images = self.images.lock().unwrap();
        for (dm, dl) in modes(&self.data) {
            for (j, jname) in &journals {
                for (jm, jl) in modes(j) {
                    images.push((
                        self.data.crashed(dm),
                        j.crashed(jm),
                        format!("{moment}: data {dl}, journal ({jname}) {jl}"),
                    ));
                }
            }
        }
    }
}

struct Files(Arc<SimDir>);

impl JournalFiles for Files {
    fn create_temp(&self) -> io::Result<Box<dyn Storage>> {
        let dev = SimStorage::new();
        *self.0.switching.lock().unwrap() = true;
        self.0.names.lock().unwrap().temp = Some(dev.clone());
        Ok(Box::new(Dev { dev, dir: self.0.clone(), name: "temporary journal" }))
    }
    fn rename_temp(&self) -> io::Result<()> {
        self.0.capture("before rename");
        let mut n = self.0.names.lock().unwrap();
        n.journal = n.temp.take().expect("a temporary journal");
        Ok(())
    }
    fn sync_dir(&self) -> io::Result<()> {
        if std::mem::take(&mut *self.0.fail_dir_sync.lock().unwrap()) {
            return Err(io::Error::from_raw_os_error(5));
        }
        self.0.capture("before directory sync");
        let mut n = self.0.names.lock().unwrap();
        n.durable_journal = n.journal.clone();
        drop(n);
        self.0.capture("after directory sync");
        *self.0.switching.lock().unwrap() = false;
        Ok(())
    }
    fn remove_temp(&self) -> io::Result<()> {
        self.0.names.lock().unwrap().temp = None;
        *self.0.switching.lock().unwrap() = false;
        Ok(())
    }
    fn current_id(&self) -> io::Result<u64> {
        self.0.names.lock().unwrap().journal.file_id()
    }
    fn open_current(&self) -> io::Result<Box<dyn Storage>> {
        Ok(Box::new(self.0.names.lock().unwrap().journal.clone()))
    }
}

const SIM_PATH: &str = "/sim/top-1.mcow";

fn below(_: u64, buf: &mut [u8]) -> mcow_engine::Result<()> {
    buf.fill(0xBB);
    Ok(())
}

/// What a block reads as through the top alone (a block the top does not map reads as 0xBB).
fn read_top(top: &TopLayer, blocks: u64) -> Vec<Vec<u8>> {
    (0..blocks)
        .map(|vb| match top.lookup(vb) {
            Ok(e) if e.loc.kind == ExtentKind::Data => {
                let mut buf = vec![0u8; BS as usize];
                assert!(top.read_data(vb, 0, &mut buf).unwrap());
                buf
            }
            Ok(_) => vec![0; BS as usize],
            Err(_) => vec![0xBB; BS as usize],
        })
        .collect()
}

/// The crash-image loop of the tests below: `open` names each image (for messages) and opens
/// its top, which must succeed; `check` gets the image, its name and what each of the top's
/// `blocks` blocks reads. Returns how many images were checked.
fn check_crash_images<I>(
    images: Vec<I>,
    blocks: u64,
    open: impl Fn(&I) -> (String, mcow_engine::Result<TopLayer>),
    mut check: impl FnMut(&I, &str, &[Vec<u8>]),
) -> usize {
    for image in &images {
        let (label, img) = open(image);
        let img = img.unwrap_or_else(|e| panic!("{label}: the image does not open: {e}"));
        check(image, &label, &read_top(&img, blocks));
    }
    images.len()
}

/// A new top of `blocks` blocks on simulated storage, its data and journal handed over through
/// [`Dev`]s of `SimDir` (which takes images at their syncs), journal files through [`Files`].
fn sim_top(blocks: u64) -> (Arc<SimDir>, TopLayer) {
    let (data, journal) = (SimStorage::new(), SimStorage::new());
    let dir = SimDir::new(&data, &journal);
    let dev = |dev: &SimStorage, name| -> Box<dyn Storage> {
        Box::new(Dev { dev: dev.clone(), dir: dir.clone(), name })
    };
    let top = TopLayer::create(
        dev(&data, "data"),
        dev(&journal, "journal"),
        Path::new(SIM_PATH),
        BS,
        blocks * u64::from(BS),
        Digest::ZERO,
    )
    .unwrap()
    .attach_journal_files(Box::new(Files(dir.clone())))
    .unwrap();
    (dir, top)
}

#[test]
fn a_crash_at_any_step_of_a_compaction_finds_the_old_journal_or_the_new_one() {
    let blocks = 32u64;
    let (dir, top) = sim_top(blocks);
    let (data, path) = (dir.data.clone(), Path::new(SIM_PATH));
    top.set_compaction(0, 2);
    dir.images.lock().unwrap().clear();
    let mut rng = Rng::new(7);
    let mut flushed = read_top(&top, blocks);
    let (mut checked, mut at_switch) = (0, 0);
    for round in 0..200 {
        // A few whole-block writes (new or in place), zeroes and discards, then a flush. Every
        // value a block takes since the last flush is one a crash image may show.
        let mut history: Vec<Vec<Vec<u8>>> = flushed.iter().map(|b| vec![b.clone()]).collect();
        for _ in 0..rng.range(1, 6) {
            let b = rng.below(blocks);
            let n = rng.range(1, (blocks - b).min(3));
            match rng.below(3) {
                0 => {
                    for vb in b..b + n {
                        top.write(vb, 0, &pattern(rng.next_u64(), BS as usize), &below).unwrap();
                    }
                }
                1 => top.set_marker(b, b + n, ExtentKind::Zero).unwrap(),
                _ => top.set_marker(b, b + n, ExtentKind::Discarded).unwrap(),
            }
            for (h, now) in history.iter_mut().zip(read_top(&top, blocks)) {
                h.push(now);
            }
        }
        let want = read_top(&top, blocks);
        let before = top.compactions();
        top.flush().unwrap();
        let compacted = top.compactions() > before;
        let images = std::mem::take(&mut *dir.images.lock().unwrap());
        let open = |(d, j, label): &(SimStorage, SimStorage, String)| {
            let img = TopLayer::open(Box::new(d.clone()), Box::new(j.clone()), path, false);
            (format!("round {round}, {label}"), img)
        };
        checked += check_crash_images(images, blocks, open, |(_, _, moment), label, got| {
            let switch = moment.starts_with("[switch]");
            // At a switch step the round's batch is durable: the image is the new flush.
            // Before that, with whole-block writes and no tears: each block reads as a value
            // it has had since the last flush.
            for vb in 0..blocks as usize {
                let ok = if switch { got[vb] == want[vb] } else { history[vb].contains(&got[vb]) };
                assert!(ok, "{label}: block {vb} reads neither flush");
            }
            if switch {
                at_switch += 1;
                assert!(compacted, "{label}: a switch step in a round that did not compact");
            }
        });
        flushed = want;
        assert_eq!(read_top(&top, blocks), flushed);
    }
    assert!(top.compactions() > 20, "only {} compactions", top.compactions());
    assert!(at_switch > 100, "only {at_switch} images at a switch step");
    assert!(checked > 300, "only {checked} crash images");
    eprintln!("{checked} crash images, {at_switch} at a switch step, {} compactions", top.compactions());
    // The live top reopens from what is current.
    let names = dir.names.lock().unwrap().clone();
    drop(top);
    let img = TopLayer::open(Box::new(data.clone()), Box::new(names.journal.clone()), path, true).unwrap();
    assert_eq!(read_top(&img, blocks), flushed);
}

/// A punch that a crash cut off: blocks freed by a durable discard whose space was never given
/// back (simulated by writing them again behind the engine's back) are punched by the next
/// writable open, and the disk reads the same.
#[test]
fn a_writable_open_punches_free_blocks_a_crash_left_allocated() {
    let tmp = tempfile::tempdir().unwrap();
    let bs = u64::from(BS);
    let dir = create_disk(tmp.path(), "d", 64 * bs, BS);
    let data_file = top_path(&dir);
    let allocated = || std::fs::metadata(&data_file).unwrap().blocks() * 512;
    let d = open_rw(&dir);
    d.write(0, &pattern(3, (64 * bs) as usize)).unwrap();
    d.discard(0, 48 * bs).unwrap();
    d.flush().unwrap();
    let model = read_all(&d);
    drop(d);
    // Fill the punched blocks 0..48 again, as if their punch had not reached the disk.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&data_file).unwrap();
        f.write_all_at(&vec![0x77; (48 * bs) as usize], 4096).unwrap();
        f.sync_all().unwrap();
    }
    let before = allocated();
    assert!(before >= 64 * bs, "{before}");
    let d = open_rw(&dir);
    assert!(allocated() <= before - 48 * bs, "allocated {before} -> {} after the open", allocated());
    assert_reads(&d, &model, "after the open");
    drop(d);
    assert_check_clean(&dir);
}

/// A compaction whose directory sync fails: the flush still succeeds (its batch is durable in
/// the old journal and the new one), and the next round syncs the directory before it appends
/// to the new journal, so a crash after that round, with only what is durable, shows it.
#[test]
fn a_failed_directory_sync_is_retried_before_the_next_batch() {
    let blocks = 8u64;
    let (dir, top) = sim_top(blocks);
    let (data, path) = (dir.data.clone(), Path::new(SIM_PATH));
    top.set_compaction(0, 1);
    let mut tag = 0;
    while top.compactions() == 0 {
        tag += 1;
        *dir.fail_dir_sync.lock().unwrap() = true;
        top.write(tag % blocks, 0, &pattern(tag, BS as usize), &below).unwrap();
        top.flush().expect("a flush whose compaction fails to sync the directory still succeeds");
        assert!(tag < 100, "no compaction");
    }
    *dir.fail_dir_sync.lock().unwrap() = false;
    let names = dir.names.lock().unwrap().clone();
    assert_ne!(
        names.journal.file_id().unwrap(),
        names.durable_journal.file_id().unwrap(),
        "rename not durable yet"
    );
    top.set_compaction(u64::MAX, 1);
    top.write(0, 0, &pattern(1000, BS as usize), &below).unwrap();
    top.flush().unwrap();
    let want = read_top(&top, blocks);
    let names = dir.names.lock().unwrap().clone();
    assert_eq!(
        names.journal.file_id().unwrap(),
        names.durable_journal.file_id().unwrap(),
        "the rename is durable"
    );
    let img = TopLayer::open(
        Box::new(data.crashed(CrashMode::DropUnsynced)),
        Box::new(names.durable_journal.crashed(CrashMode::DropUnsynced)),
        path,
        false,
    )
    .unwrap();
    assert_eq!(read_top(&img, blocks), want, "the last flush survives a crash");
}

/// A process kill image: every write of every device kept, the journal under its current name.
type Killed = (String, SimStorage, SimStorage, [SimStorage; 2]);

/// Journal operations that take process kill images just before a compaction starts (the log
/// header not yet updated), just before its rename (the header updated) and just after it, and
/// that can stop the compaction at its start so that a test writes meanwhile.
struct KillFiles {
    inner: Files,
    dir: Arc<SimDir>,
    logs: [SimStorage; 2],
    kills: Arc<Mutex<Vec<Killed>>>,
    /// Told when a compaction starts; it goes on once the test answers.
    events: Mutex<std::sync::mpsc::Sender<&'static str>>,
    go: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl KillFiles {
    fn kill(&self, moment: &str) {
        let journal = self.dir.names.lock().unwrap().journal.clone();
        self.kills.lock().unwrap().push((
            moment.to_string(),
            self.dir.data.crashed(CrashMode::KeepAll),
            journal.crashed(CrashMode::KeepAll),
            [self.logs[0].crashed(CrashMode::KeepAll), self.logs[1].crashed(CrashMode::KeepAll)],
        ));
    }
}

impl JournalFiles for KillFiles {
    fn create_temp(&self) -> io::Result<Box<dyn Storage>> {
        self.events.lock().unwrap().send("compacting").unwrap();
        self.go.lock().unwrap().recv().unwrap();
        self.kill("compaction starts");
        self.inner.create_temp()
    }
    fn rename_temp(&self) -> io::Result<()> {
        self.kill("before rename");
        self.inner.rename_temp()?;
        self.kill("after rename");
        Ok(())
    }
    fn sync_dir(&self) -> io::Result<()> {
        self.inner.sync_dir()
    }
    fn remove_temp(&self) -> io::Result<()> {
        self.inner.remove_temp()
    }
    fn current_id(&self) -> io::Result<u64> {
        self.inner.current_id()
    }
    fn open_current(&self) -> io::Result<Box<dyn Storage>> {
        self.inner.open_current()
    }
}

/// Issue 15: a process kill around a compaction loses no acknowledged write. Tried: 120 rounds
/// of random whole-block writes, zeroes and discards, then a flush that compacts (tiny
/// thresholds) while more steps run during its compaction (the flush stopped at the compaction's
/// start), then more steps after it, unflushed. Process kill images (every write of every
/// device kept) are taken at the compaction's start (the pending log still names only the old
/// journal), just before the rename (the log names the new journal too) and just after it, and
/// at the end of each round. Must hold: each image opens writable and reads exactly as the top
/// did then (every acknowledged step there, flushed or not).
#[test]
fn a_process_kill_around_a_compaction_loses_no_acknowledged_write() {
    let blocks = 32u64;
    let (data, journal) = (SimStorage::new(), SimStorage::new());
    let logs = [SimStorage::new(), SimStorage::new()];
    let dir = SimDir::new(&data, &journal);
    let (events_tx, events) = std::sync::mpsc::channel();
    let (go, go_rx) = std::sync::mpsc::channel();
    let kills = Arc::new(Mutex::new(Vec::new()));
    let files = KillFiles {
        inner: Files(dir.clone()),
        dir: dir.clone(),
        logs: logs.clone(),
        kills: kills.clone(),
        events: Mutex::new(events_tx.clone()),
        go: Mutex::new(go_rx),
    };
    let path = Path::new(SIM_PATH);
    let top = TopLayer::create_logged(
        Box::new(Dev { dev: data.clone(), dir: dir.clone(), name: "data" }),
        Box::new(Dev { dev: journal.clone(), dir: dir.clone(), name: "journal" }),
        Some(logs.clone().map(|l| Box::new(l) as Box<dyn Storage>)),
        path,
        BS,
        blocks * u64::from(BS),
        Digest::ZERO,
    )
    .unwrap()
    .attach_journal_files(Box::new(files))
    .unwrap();
    top.set_compaction(0, 1);
    let mut rng = Rng::new(15);
    let steps = |rng: &mut Rng, most: u64| {
        for _ in 0..rng.range(1, most) {
            let b = rng.below(blocks);
            let n = rng.range(1, (blocks - b).min(3));
            match rng.below(4) {
                0 | 1 => {
                    for vb in b..b + n {
                        top.write(vb, 0, &pattern(rng.next_u64(), BS as usize), &below).unwrap();
                    }
                }
                2 => top.set_marker(b, b + n, ExtentKind::Zero).unwrap(),
                _ => top.set_marker(b, b + n, ExtentKind::Discarded).unwrap(),
            }
        }
    };
    let (mut checked, mut at_rename) = (0, 0);
    let mut check = |want: &[Vec<u8>], round: usize| {
        let open = |(moment, d, j, [l0, l1]): &Killed| {
            let logs: [Box<dyn Storage>; 2] = [Box::new(l0.clone()), Box::new(l1.clone())];
            let img = TopLayer::open_logged(Box::new(d.clone()), Box::new(j.clone()), logs, path, false);
            (format!("round {round}, kill {moment}"), img)
        };
        let kills = std::mem::take(&mut *kills.lock().unwrap());
        checked += check_crash_images(kills, blocks, open, |(moment, ..), label, got| {
            if let Some(vb) = (0..blocks as usize).find(|&vb| got[vb] != want[vb]) {
                panic!("{label}: block {vb} lost an acknowledged write");
            }
            at_rename += usize::from(moment.contains("rename"));
        });
    };
    for round in 0..120 {
        steps(&mut rng, 6);
        std::thread::scope(|s| {
            let events_tx = events_tx.clone();
            let top = &top;
            let flush = s.spawn(move || {
                let r = top.flush();
                events_tx.send("flushed").unwrap();
                r
            });
            if events.recv().unwrap() == "compacting" {
                // Acknowledged during the compaction: only the current pending log has these.
                steps(&mut rng, 4);
                go.send(()).unwrap();
                assert_eq!(events.recv().unwrap(), "flushed");
            }
            flush.join().unwrap().unwrap();
        });
        check(&read_top(&top, blocks), round);
        steps(&mut rng, 4);
        let want = read_top(&top, blocks);
        let journal = dir.names.lock().unwrap().journal.clone();
        kills.lock().unwrap().push((
            "at the end of the round".into(),
            data.crashed(CrashMode::KeepAll),
            journal.crashed(CrashMode::KeepAll),
            [logs[0].crashed(CrashMode::KeepAll), logs[1].crashed(CrashMode::KeepAll)],
        ));
        check(&want, round);
    }
    eprintln!("{checked} process kill images, {at_rename} at a rename, {} compactions", top.compactions());
    assert!(top.compactions() > 30, "only {} compactions", top.compactions());
    assert!(at_rename >= 2 * 30, "only {at_rename} images at a rename");
}
