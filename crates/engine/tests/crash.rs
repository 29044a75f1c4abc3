//! Crash consistency of the writable top on simulated storage.
//!
//! A random workload of writes (any offset and length), zeroes, discards and flushes runs on a
//! `TopLayer` over two `SimStorage` devices. Crash images of both devices are taken after every
//! other operation and just before every sync inside a flush (data sync, then journal sync), in
//! many combinations: each device independently loses all its unsynced writes, keeps them all,
//! or keeps a prefix with the last one torn. For each image the test asserts (see
//! `common/simtop.rs` for the exact rule):
//! - the top opens, read-only and writable, and both read the same;
//! - every block untouched since the last successful flush reads exactly as flushed, and every
//!   touched block reads as a value it held since then (or a torn in-place write between two
//!   consecutive values);
//! - for a third of the images: a second open after the writable one (which trims debris) sees no
//!   journal tail and no data blocks past the highest mapped one; crashing right after the
//!   recovery changes nothing; and new writes, zeroes and a flush on the recovered top survive a
//!   further crash exactly (the allocator rebuilt at open does not hand out a block in use).
//!
//! The top has its pending logs, and every capture also takes a **process kill** image (every
//! write of every device kept, nothing torn: what the page cache holds when only the process
//! dies). It must reopen, read-only and writable, to exactly the content at that moment, every
//! acknowledged write there, flushed or not; and after the writable open a power loss (only
//! what is durable kept) still shows all of it (the open made it durable). The power-loss
//! images keep, drop or tear the logs' writes (which are never synced) and must still satisfy
//! the crash rule.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::Rng;
use common::simtop::{
    BS, Gate, Image, Model, SimTop, Step, assert_no_debris_after_trim, random_op, read_blocks, write_steps,
    zero_steps,
};
use mcow_engine::sim::{CrashMode, SimStorage};
use mcow_engine::storage::Storage;
use mcow_format::ExtentKind;

/// 100 KiB + 512: 26 blocks, the last one partial.
const SIZE: u64 = (100 << 10) + 512;
const SEEDS: u64 = 10;
const OPS: usize = 200;

#[derive(Default)]
struct Stats {
    crash_points: usize,
    deep_checks: usize,
    torn_journal_points: usize,
    kill_points: usize,
    /// Images whose open applied pending log records: process kills, and power losses (with
    /// data blocks skipped because their data was not there).
    kill_recovered: usize,
    power_recovered: usize,
    power_skipped: usize,
}

/// Checks a crash image; a process kill image must read exactly as one of `live` (the content
/// when it was taken, if the test cannot tell which of those moments that was).
fn verify_image(
    img: &Image,
    model: &Model,
    live: &[&[Vec<u8>]],
    deep: bool,
    rng: &mut Rng,
    stats: &mut Stats,
) {
    stats.crash_points += 1;
    let label = &img.label;
    let n = model.blocks();
    let ro = img.open(true).unwrap_or_else(|e| panic!("{label}: read-only open failed: {e}"));
    let got = read_blocks(&ro, n).unwrap_or_else(|e| panic!("{label}: read failed: {e}"));
    if let Err(why) = model.check_crash(&got) {
        panic!("{label}: {why}");
    }
    let r = ro.recovered();
    if img.kill {
        stats.kill_points += 1;
        stats.kill_recovered += usize::from(r.blocks > 0);
        if !live.iter().any(|l| **l == got[..]) {
            let b = (0..n as usize).find(|&b| got[b] != live[0][b]).expect("differs");
            panic!("{label}: block {b} lost an acknowledged write");
        }
        drop(ro);
        let rw = img.open(false).unwrap_or_else(|e| panic!("{label}: writable open failed: {e}"));
        assert!(read_blocks(&rw, n).unwrap() == got, "{label}: writable open reads differently");
        drop(rw);
        let lost = img.crashed(CrashMode::DropUnsynced);
        let t = lost.open(false).unwrap_or_else(|e| panic!("{label}: open after the kill's recovery: {e}"));
        assert!(
            read_blocks(&t, n).unwrap() == got,
            "{label}: the writable open did not make the recovery durable"
        );
        return;
    }
    stats.power_recovered += usize::from(r.blocks > 0);
    stats.power_skipped += usize::from(r.skipped_blocks > 0);
    if ro.debris().journal_tail_bytes > 0 {
        stats.torn_journal_points += 1;
    }
    drop(ro);
    let rw = img.open(false).unwrap_or_else(|e| panic!("{label}: writable open failed: {e}"));
    assert!(read_blocks(&rw, n).unwrap() == got, "{label}: writable open reads differently");
    if !deep {
        return;
    }
    stats.deep_checks += 1;
    drop(rw);
    // Crashing right after the recovery (its truncations unsynced) changes nothing.
    for mode in [CrashMode::DropUnsynced, CrashMode::KeepAll] {
        let again = img.crashed(mode);
        let t = again.open(true).unwrap_or_else(|e| panic!("{label}: open after recovery crash: {e}"));
        assert!(read_blocks(&t, n).unwrap() == got, "{label}: a crash after recovery changed the content");
    }
    // A second open sees no debris beyond free blocks.
    let rw = img.open(false).unwrap();
    assert_no_debris_after_trim(&rw, img.data.snapshot().len() as u64);
    assert!(read_blocks(&rw, n).unwrap() == got, "{label}: second open reads differently");
    // Keep using the recovered top: new writes and markers, a flush, a crash, all must be there.
    let mut m = Model::at(got.clone());
    for _ in 0..4 {
        if let Some(steps) = random_op(rng, SIZE) {
            for s in &steps {
                m.apply(&rw, s).unwrap_or_else(|e| panic!("{label}: write after recovery failed: {e}"));
            }
        }
    }
    let vb = rng.below(n);
    for s in write_steps(vb * BS as u64, &common::pattern(rng.next_u64(), BS)) {
        m.apply(&rw, &s).unwrap();
    }
    rw.flush().unwrap_or_else(|e| panic!("{label}: flush after recovery failed: {e}"));
    assert!(read_blocks(&rw, n).unwrap() == m.cur, "{label}: content after recovery and new writes");
    drop(rw);
    let after = img.crashed(CrashMode::DropUnsynced);
    let t = after.open(false).unwrap();
    assert!(read_blocks(&t, n).unwrap() == m.cur, "{label}: flushed writes after recovery were lost");
}

#[test]
fn crash_at_every_point_recovers_every_flushed_write() {
    let mut stats = Stats::default();
    let mut img_rng = Rng::new(99);
    for seed in 0..SEEDS {
        let mut rng = Rng::new(seed);
        let st = SimTop::create(SIZE, seed, 3);
        let mut model = Model::new(st.top.header.block_count());
        let mut k = 0usize;
        let mut check = |images: Vec<Image>, model: &Model, stats: &mut Stats| {
            for img in images {
                k += 1;
                verify_image(&img, model, &[&model.cur], k.is_multiple_of(3), &mut img_rng, stats);
            }
        };
        st.hook.capture("after create");
        check(st.hook.take(), &model, &mut stats);
        for i in 0..OPS {
            match random_op(&mut rng, SIZE) {
                Some(steps) => {
                    for s in &steps {
                        model.apply(&st.top, s).unwrap();
                    }
                }
                None => {
                    st.top.flush().unwrap();
                    // Images taken inside the flush, before it returned: judged by the old baseline.
                    check(st.hook.take(), &model, &mut stats);
                    model.flushed();
                }
            }
            assert!(
                read_blocks(&st.top, model.blocks()).unwrap() == model.cur,
                "seed {seed} op {i}: live read"
            );
            if i % 2 == 0 {
                st.hook.capture(&format!("seed {seed} after op {i}"));
                check(st.hook.take(), &model, &mut stats);
            }
        }
        st.top.flush().unwrap();
        check(st.hook.take(), &model, &mut stats);
        model.flushed();
        st.hook.capture("end");
        check(st.hook.take(), &model, &mut stats);
    }
    eprintln!(
        "crash points: {} (process kills: {}), with recovery+continue checks: {}, with a torn journal tail: {}",
        stats.crash_points, stats.kill_points, stats.deep_checks, stats.torn_journal_points
    );
    assert!(stats.crash_points >= 1000, "only {} crash points", stats.crash_points);
    assert!(stats.kill_points >= 1000, "only {} process kill points", stats.kill_points);
    eprintln!(
        "images that applied log records: {} kills, {} power losses ({} skipped blocks whose data was not there)",
        stats.kill_recovered, stats.power_recovered, stats.power_skipped
    );
    assert!(stats.kill_recovered >= 500, "only {} kill images applied log records", stats.kill_recovered);
    assert!(
        stats.power_recovered >= 500,
        "only {} power-loss images applied log records",
        stats.power_recovered
    );
    assert!(stats.power_skipped >= 100, "only {} power-loss images skipped a block", stats.power_skipped);
    assert!(
        stats.torn_journal_points >= 50,
        "only {} images had a torn journal tail",
        stats.torn_journal_points
    );
}

/// Group commit and writes during a flush's syncs. Tried: 10 seeds x 15 rounds; each round does
/// a few random steps, always at least one write and one marker (so a flush has both syncs),
/// then flush A stops inside its data sync or its journal sync (chosen at random); while it is
/// stopped, more random steps run (copy-ups, in-place writes, zeroes, discards) and flushes B
/// and C are called, then A goes on. Crash images are taken before every sync, as in the test
/// above. Must hold: the steps run while A is inside a sync (no allocator lock is held there);
/// B and C do not return while A's round is stopped (a flush called during a round waits for
/// the next); exactly one of B and C runs the next round and the other returns with it (its
/// syncs are shared); A's images keep everything flushed before A; the images of the round
/// after A keep everything A was called after (A's batch maps only data made durable by it),
/// while the steps during A may or may not be there; after B and C every step reads back from
/// a crash image; and the same recovery checks as above on a third of the images.
#[test]
fn writes_and_flushes_during_a_flush_share_the_next_round_and_stay_consistent() {
    const ROUNDS: usize = 15;
    let mut stats = Stats::default();
    let mut img_rng = Rng::new(98);
    let mut k = 0usize;
    let mut verify = |images: Vec<Image>, model: &Model, live: &[&[Vec<u8>]], stats: &mut Stats| {
        for img in images {
            k += 1;
            verify_image(&img, model, live, k.is_multiple_of(3), &mut img_rng, stats);
        }
    };
    for seed in 0..SEEDS {
        let mut rng = Rng::new(1000 + seed);
        let st = SimTop::create(SIZE, seed, 3);
        let n = st.top.header.block_count();
        let mut model = Model::new(n);
        let top = &st.top;
        for round in 0..ROUNDS {
            let label = format!("seed {seed} round {round}");
            let steps = |model: &mut Model, rng: &mut Rng| {
                for _ in 0..rng.range(1, 5) {
                    for s in random_op(rng, SIZE).unwrap_or_default() {
                        model.apply(top, &s).unwrap();
                    }
                }
                let vb = rng.below(n);
                for s in
                    write_steps(vb * BS as u64 + rng.below(BS as u64), &common::pattern(rng.next_u64(), 100))
                {
                    model.apply(top, &s).unwrap();
                }
            };
            steps(&mut model, &mut rng);
            let vb = rng.below(n);
            model.apply(top, &Step::Marker { start: vb, end: vb + 1, kind: ExtentKind::Zero }).unwrap();
            let skip = rng.below(2) as usize; // stop A in its data sync (0) or its journal sync (1)
            let (paused_tx, paused) = mpsc::channel();
            let (go, go_rx) = mpsc::channel();
            *st.hook.gate.lock().unwrap() = Some(Gate { skip, paused: paused_tx, go: go_rx });
            let mark = model.mark();
            std::thread::scope(|s| {
                let a = std::thread::Builder::new()
                    .name("flush-a".into())
                    .spawn_scoped(s, || top.flush())
                    .unwrap();
                let dev =
                    paused.recv_timeout(Duration::from_secs(20)).expect("flush A did not reach its sync");
                assert_eq!(dev, if skip == 0 { "data" } else { "journal" }, "{label}");
                // Were a lock held across the sync, these steps would block for good: fail instead.
                let watchdog = watchdog(&label);
                steps(&mut model, &mut rng);
                drop(watchdog);
                let spawn = |name: &str| {
                    std::thread::Builder::new().name(name.into()).spawn_scoped(s, || top.flush()).unwrap()
                };
                let (b, c) = (spawn("flush-b"), spawn("flush-c"));
                std::thread::sleep(Duration::from_millis(20));
                assert!(
                    !b.is_finished() && !c.is_finished(),
                    "{label}: a flush returned while the round before it was stopped"
                );
                go.send(()).unwrap();
                a.join().unwrap().unwrap_or_else(|e| panic!("{label}: flush A: {e}"));
                b.join().unwrap().unwrap_or_else(|e| panic!("{label}: flush B: {e}"));
                c.join().unwrap().unwrap_or_else(|e| panic!("{label}: flush C: {e}"));
            });
            let (of_a, next): (Vec<Image>, Vec<Image>) =
                st.hook.take().into_iter().partition(|i| i.label.contains("thread flush-a"));
            assert!(!of_a.is_empty(), "{label}: A took crash images");
            let leaders =
                ["flush-b", "flush-c"].iter().filter(|t| next.iter().any(|i| i.label.contains(*t))).count();
            assert_eq!(leaders, 1, "{label}: B and C share one round");
            // A's images were taken before the steps during A (the content at A's call), or,
            // for its journal sync after a stop in its data sync, after them (the content now).
            let at_a: Vec<Vec<u8>> = model.hist.iter().zip(&mark).map(|(h, &m)| h[m - 1].clone()).collect();
            let cur = model.cur.clone();
            verify(of_a, &model, &[&at_a, &cur], &mut stats);
            model.flushed_since(&mark);
            verify(next, &model, &[&cur], &mut stats);
            model.flushed();
            st.hook.capture(&format!("{label}: after B and C"));
            verify(st.hook.take(), &model, &[&cur], &mut stats);
        }
    }
    eprintln!(
        "concurrent flushes: crash points: {} (process kills: {}), with recovery+continue checks: {}, with a torn journal tail: {}",
        stats.crash_points, stats.kill_points, stats.deep_checks, stats.torn_journal_points
    );
    assert!(stats.crash_points >= 1000, "only {} crash points", stats.crash_points);
    assert!(stats.kill_points >= 100, "only {} process kill points", stats.kill_points);
}

/// Regression: discarding the highest stored blocks, flushing and reopening writable truncates
/// the data file after the highest block still mapped, while an older journal entry still names
/// the discarded blocks. The next open refused the journal as "outside the layer", so the disk
/// could no longer be opened at all.
#[test]
fn discarding_the_highest_blocks_then_reopening_twice_still_opens() {
    let st = SimTop::create(SIZE, 1, 0);
    st.hook.enabled.store(false, std::sync::atomic::Ordering::Relaxed);
    let mut model = Model::new(st.top.header.block_count());
    for s in write_steps(0, &common::pattern(1, 4 * BS)) {
        model.apply(&st.top, &s).unwrap();
    }
    st.top.flush().unwrap();
    for s in zero_steps(2 * BS as u64, 2 * BS as u64, SIZE, true) {
        model.apply(&st.top, &s).unwrap();
    }
    assert!(matches!(st.top.lookup(3), Ok(e) if e.loc.kind == ExtentKind::Discarded));
    st.top.flush().unwrap();
    model.flushed();
    let img = Image {
        data: st.hook.data.clone(),
        journal: st.hook.journal.clone(),
        logs: None,
        kill: false,
        label: String::new(),
    };
    drop(st);
    for round in 0..3 {
        let t = img.open(false).unwrap_or_else(|e| panic!("open {round} failed: {e}"));
        assert!(read_blocks(&t, model.blocks()).unwrap() == model.cur, "open {round}");
        // The second and later opens find nothing left to trim.
        if round > 0 {
            assert_no_debris_after_trim(&t, img.data.snapshot().len() as u64);
        }
    }
    // And it keeps working: reuse the freed blocks, flush, reopen.
    let t = img.open(false).unwrap();
    for s in write_steps(5 * BS as u64 + 100, &common::pattern(2, 3 * BS)) {
        model.apply(&t, &s).unwrap();
    }
    t.flush().unwrap();
    drop(t);
    let t = img.open(false).unwrap();
    assert!(read_blocks(&t, model.blocks()).unwrap() == model.cur);
}

/// A top's two devices after [`five_batches`], the disk's blocks after each flush (index 0:
/// before any), and where each batch starts and ends in the journal.
struct Batches {
    data: SimStorage,
    journal: SimStorage,
    states: Vec<Vec<Vec<u8>>>,
    bounds: Vec<(u64, u64)>,
}

/// Five flushes, each writing blocks no earlier batch mapped (and the fourth also zeroing
/// blocks of the layer below), so the disk after `k` good batches is the model after flush `k`.
fn five_batches() -> Batches {
    let st = SimTop::create(SIZE, 7, 0);
    st.hook.enabled.store(false, std::sync::atomic::Ordering::Relaxed);
    let mut model = Model::new(st.top.header.block_count());
    let mut states = vec![model.cur.clone()];
    let mut bounds = Vec::new();
    for k in 0..5u64 {
        let start = st.top.file_sizes().1;
        // Blocks 4k..4k+2 whole, block 4k+3 in part (a copy-up).
        for s in write_steps(4 * k * BS as u64, &common::pattern(100 + k, 3 * BS + 700)) {
            model.apply(&st.top, &s).unwrap();
        }
        if k == 3 {
            for s in zero_steps(22 * BS as u64, 2 * BS as u64, SIZE, true) {
                model.apply(&st.top, &s).unwrap();
            }
        }
        st.top.flush().unwrap();
        model.flushed();
        states.push(model.cur.clone());
        bounds.push((start, st.top.file_sizes().1));
    }
    let (data, journal) = (st.hook.data.clone(), st.hook.journal.clone());
    drop(st);
    Batches { data, journal, states, bounds }
}

/// Regression (issue: one flipped bit in a middle journal batch silently discarded the later,
/// committed batches: `check` called it debris and a writable open cut the journal and the data
/// file). Tried: one bit flipped at the first, second, middle and last bytes, and in the count,
/// sequence and checksum fields, of each of five batches. Must hold: damage to any batch but the
/// last is corruption: a read-only open shows the disk as of the batches before it and reports
/// [`mcow_engine::Error::JournalCorrupt`], a writable open fails with it, and neither changes a
/// byte of either file; damage to the last batch is a torn tail (debris), which a writable open
/// trims, keeping every batch before it.
#[test]
fn a_damaged_middle_batch_is_corruption_and_nothing_is_cut() {
    let Batches { data, journal, states, bounds } = five_batches();
    let n = states[0].len() as u64;
    for (i, &(start, end)) in bounds.iter().enumerate() {
        let len = end - start;
        for at in [0, 5, 9, len / 2, len - 4, len - 1] {
            let label = format!("batch {} of 5, byte {at} of {len} flipped", i + 1);
            let img = Image {
                data: data.crashed(CrashMode::DropUnsynced),
                journal: journal.crashed(CrashMode::DropUnsynced),
                logs: None,
                kill: false,
                label: label.clone(),
            };
            img.journal.flip_bit(start + at, (at % 8) as u8);
            let (data_before, journal_before) = (img.data.snapshot(), img.journal.snapshot());
            let ro = img.open(true).unwrap_or_else(|e| panic!("{label}: read-only open failed: {e}"));
            assert!(read_blocks(&ro, n).unwrap() == states[i], "{label}: read-only content");
            let last = i == bounds.len() - 1;
            if last {
                assert!(ro.corruption().is_none(), "{label}: a damaged last batch is a torn tail");
                assert_eq!(ro.debris().journal_tail_bytes, len, "{label}");
            } else {
                let e = ro.corruption().unwrap_or_else(|| panic!("{label}: damage not reported"));
                assert!(
                    matches!(e, mcow_engine::Error::JournalCorrupt { offset, good_batches, next_whole, .. }
                        if offset == start && good_batches == i as u64 && next_whole == end),
                    "{label}: {e}"
                );
                assert_eq!(ro.debris(), Default::default(), "{label}: committed batches are not debris");
            }
            drop(ro);
            match img.open(false) {
                Ok(rw) if last => {
                    assert!(read_blocks(&rw, n).unwrap() == states[i], "{label}: writable content");
                    assert_eq!(img.journal.snapshot().len() as u64, start, "{label}: torn tail trimmed");
                }
                Ok(_) => panic!("{label}: a writable open accepted a damaged journal"),
                Err(e) if !last => {
                    assert!(matches!(e, mcow_engine::Error::JournalCorrupt { .. }), "{label}: {e}");
                    assert!(e.is_corruption(), "{label}");
                    assert!(img.data.snapshot() == data_before, "{label}: the data file changed");
                    assert!(img.journal.snapshot() == journal_before, "{label}: the journal changed");
                }
                Err(e) => panic!("{label}: writable open failed: {e}"),
            }
        }
    }
}

/// The other side of the rule: a journal cut at any batch boundary is whole (no debris, the
/// disk as of that batch), and cut anywhere inside a batch is a torn tail (debris, the disk as
/// of the batch before), never corruption.
#[test]
fn a_journal_cut_at_or_inside_any_batch_is_clean_or_debris() {
    let Batches { data, journal, states, bounds } = five_batches();
    let n = states[0].len() as u64;
    let full = journal.snapshot();
    for (i, &(start, end)) in bounds.iter().enumerate() {
        for cut in [start, start + 1, start + 16, (start + end) / 2, end - 1] {
            let label = format!("journal cut at byte {cut} (batch {} is {start}..{end})", i + 1);
            let j = SimStorage::new();
            j.write_at(&full[..cut as usize], 0).unwrap();
            j.sync().unwrap();
            let img = Image {
                data: data.crashed(CrashMode::DropUnsynced),
                journal: j,
                logs: None,
                kill: false,
                label: label.clone(),
            };
            let ro = img.open(true).unwrap_or_else(|e| panic!("{label}: read-only open failed: {e}"));
            assert!(ro.corruption().is_none(), "{label}: reported as corruption");
            assert_eq!(ro.debris().journal_tail_bytes, cut - start, "{label}");
            assert!(read_blocks(&ro, n).unwrap() == states[i], "{label}: content");
            drop(ro);
            let rw = img.open(false).unwrap_or_else(|e| panic!("{label}: writable open failed: {e}"));
            assert!(read_blocks(&rw, n).unwrap() == states[i], "{label}: writable content");
        }
    }
}

/// Aborts the test process (a failure, not a hang) unless dropped within 60 s.
fn watchdog(what: &str) -> mpsc::Sender<()> {
    let (tx, rx) = mpsc::channel::<()>();
    let what = what.to_string();
    std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(Duration::from_secs(60)) {
            eprintln!("{what}: writes during a flush's sync blocked for 60 s");
            std::process::abort();
        }
    });
    tx
}

/// A device whose syncs take a while and are counted.
struct SlowSync {
    dev: SimStorage,
    syncs: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Storage for SlowSync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.dev.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.dev.write_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.dev.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.dev.set_len(len)
    }
    fn sync(&self) -> std::io::Result<()> {
        std::thread::sleep(Duration::from_millis(20));
        self.syncs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.dev.sync()
    }
}

/// Group commit under load. Tried: 8 threads, each 20 times zeroing its own block, writing it
/// whole with a new value (a marker and a copy-up: both files need a sync) and flushing, on
/// devices whose syncs take 3 ms. Must hold: fewer syncs in all than flushes (before group
/// commit every flush synced the data file at least); after a crash losing every unsynced
/// write, each block reads as its thread's last flushed value.
#[test]
fn concurrent_flushes_share_syncs() {
    const THREADS: u64 = 8;
    const ITERS: u64 = 20;
    let syncs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (data, journal) = (SimStorage::new(), SimStorage::new());
    let top = mcow_engine::top::TopLayer::create(
        Box::new(SlowSync { dev: data.clone(), syncs: syncs.clone() }),
        Box::new(SlowSync { dev: journal.clone(), syncs: syncs.clone() }),
        std::path::Path::new(common::simtop::TOP_PATH),
        BS as u32,
        SIZE,
        mcow_engine::Digest::ZERO,
    )
    .unwrap();
    let before = syncs.load(std::sync::atomic::Ordering::SeqCst);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let top = &top;
            s.spawn(move || {
                for i in 0..ITERS {
                    top.set_marker(t, t + 1, ExtentKind::Zero).unwrap();
                    top.write(t, 0, &common::pattern(t * 1000 + i, BS), &common::simtop::below).unwrap();
                    top.flush().unwrap();
                }
            });
        }
    });
    let used = syncs.load(std::sync::atomic::Ordering::SeqCst) - before;
    let flushes = (THREADS * ITERS) as usize;
    eprintln!("{flushes} flushes took {used} syncs");
    assert!(used < flushes, "{flushes} flushes took {used} syncs");
    drop(top);
    let img = common::simtop::drop_unsynced(&data, &journal, "after the threads");
    let t = img.open(false).unwrap();
    for b in 0..THREADS {
        assert!(
            common::simtop::read_block(&t, b).unwrap() == common::pattern(b * 1000 + ITERS - 1, BS),
            "block {b} lost its last flushed value"
        );
    }
}
