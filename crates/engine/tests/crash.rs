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

mod common;

use common::Rng;
use common::simtop::{
    BS, Image, Model, SimTop, assert_no_debris_after_trim, random_op, read_blocks, write_steps, zero_steps,
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
}

fn verify_image(img: &Image, model: &Model, deep: bool, rng: &mut Rng, stats: &mut Stats) {
    stats.crash_points += 1;
    let label = &img.label;
    let n = model.blocks();
    let ro = img.open(true).unwrap_or_else(|e| panic!("{label}: read-only open failed: {e}"));
    let got = read_blocks(&ro, n).unwrap_or_else(|e| panic!("{label}: read failed: {e}"));
    if let Err(why) = model.check_crash(&got) {
        panic!("{label}: {why}");
    }
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
    for mode in [CrashMode::DropUnsynced, CrashMode::TearAt { n: usize::MAX - 1, cut: usize::MAX }] {
        let again =
            Image { data: img.data.crashed(mode), journal: img.journal.crashed(mode), label: String::new() };
        let t = again.open(true).unwrap_or_else(|e| panic!("{label}: open after recovery crash: {e}"));
        assert!(read_blocks(&t, n).unwrap() == got, "{label}: a crash after recovery changed the content");
    }
    // A second open sees no debris beyond free blocks.
    let rw = img.open(false).unwrap();
    assert_no_debris_after_trim(&rw, img.data.snapshot().len() as u64);
    assert!(read_blocks(&rw, n).unwrap() == got, "{label}: second open reads differently");
    // Keep using the recovered top: new writes and markers, a flush, a crash, all must be there.
    let mut m = Model {
        cur: got.clone(),
        flushed: got.clone(),
        hist: got.iter().map(|b| vec![b.clone()]).collect(),
        map_dirty: false,
    };
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
    let after = Image {
        data: img.data.crashed(CrashMode::DropUnsynced),
        journal: img.journal.crashed(CrashMode::DropUnsynced),
        label: String::new(),
    };
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
                verify_image(&img, model, k.is_multiple_of(3), &mut img_rng, stats);
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
        "crash points: {}, with recovery+continue checks: {}, with a torn journal tail: {}",
        stats.crash_points, stats.deep_checks, stats.torn_journal_points
    );
    assert!(stats.crash_points >= 1000, "only {} crash points", stats.crash_points);
    assert!(
        stats.torn_journal_points >= 50,
        "only {} images had a torn journal tail",
        stats.torn_journal_points
    );
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
    let img = Image { data: st.hook.data.clone(), journal: st.hook.journal.clone(), label: String::new() };
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
            let img = Image { data: data.crashed(CrashMode::DropUnsynced), journal: j, label: label.clone() };
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
