//! I/O failures of the writable top: a full disk (`fail_writes_after(n)`, for every n over a
//! workload) and failed syncs (`fail_next_sync`, at every flush), on the data file and on the
//! journal. At each failure the test asserts:
//! - the failing call returns the device's error (ENOSPC or EIO), and the live top still reads
//!   exactly as the model says (everything before the failed step is there; each block the
//!   failed step touches reads as before or as written, see `Model::apply`);
//! - crash images taken at that moment open and satisfy the crash rule (`common/simtop.rs`);
//! - after `heal()` a flush succeeds, and a crash right after it (every unsynced write lost)
//!   reopens to exactly the model;
//! - the rest of the workload then runs normally and survives a final flush and crash;
//! - process kill images (every write kept) taken at the failure and before each sync of the
//!   first flush after it (which retries a failed round's batch) read exactly as the live top:
//!   no acknowledged write is lost across a failed flush and its retry.

mod common;

use common::Rng;
use common::simtop::{Image, Model, SimTop, Step, check_image, drop_unsynced, random_op, read_blocks};
use mcow_engine::sim::SimStorage;

const SIZE: u64 = 64 << 10;
const OPS: usize = 70;

fn workload(seed: u64) -> Vec<Option<Vec<Step>>> {
    let mut rng = Rng::new(seed);
    let mut ops: Vec<_> = (0..OPS).map(|_| random_op(&mut rng, SIZE)).collect();
    ops.push(None);
    ops
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// `fail_writes_after(n)` on the data file (`true`) or the journal.
    WritesAfter { data: bool, n: u64 },
    /// `fail_next_sync` on the data file (`true`) or the journal, armed before the `k`th flush.
    SyncAtFlush { data: bool, k: usize },
}

/// Checks crash images against the crash rule, and process kill images against `live` exactly.
fn check_images(images: Vec<Image>, model: &Model, live: &[Vec<u8>]) {
    for img in images {
        let got = check_image(&img, model);
        if img.kill {
            assert!(got == live, "{}: a process kill lost an acknowledged write", img.label);
        }
    }
}

/// Runs the workload with one fault; returns whether the fault fired.
fn run(ops: &[Option<Vec<Step>>], fault: Fault, flush_right_after_heal: bool) -> bool {
    let st = SimTop::create(SIZE, 7, 1);
    st.hook.enabled.store(false, std::sync::atomic::Ordering::Relaxed);
    let (data, journal): (SimStorage, SimStorage) = (st.hook.data.clone(), st.hook.journal.clone());
    let dev = |d: bool| if d { &data } else { &journal };
    if let Fault::WritesAfter { data: d, n } = fault {
        dev(d).fail_writes_after(n);
    }
    let top = &st.top;
    let mut model = Model::new(top.header.block_count());
    let mut fired = false;
    let mut flushes = 0usize;
    // Take images inside the next flush (the first after the failure).
    let mut watch_next_flush = false;
    let enable = |on: bool| st.hook.enabled.store(on, std::sync::atomic::Ordering::Relaxed);
    for (i, op) in ops.iter().enumerate() {
        let result = match op {
            Some(steps) => steps.iter().try_for_each(|s| model.apply(top, s)),
            None => {
                let armed = matches!(fault, Fault::SyncAtFlush { k, .. } if k == flushes);
                if let Fault::SyncAtFlush { data: d, .. } = fault
                    && armed
                {
                    dev(d).fail_next_sync();
                }
                flushes += 1;
                enable(watch_next_flush);
                let r = top.flush();
                enable(false);
                if std::mem::take(&mut watch_next_flush) {
                    let live = model.cur.clone();
                    check_images(st.hook.take(), &model, &live);
                }
                if let Fault::SyncAtFlush { data: d, .. } = fault {
                    // The data file is synced only when it was written since the last flush,
                    // the journal only when there is a batch to write.
                    let expect_failure = armed && if d { model.data_dirty } else { model.map_dirty };
                    assert_eq!(r.is_err(), expect_failure, "{fault:?} op {i}: {r:?}");
                    if armed && r.is_ok() {
                        dev(d).heal(); // nothing to sync: disarm, this run tests nothing
                    }
                }
                if r.is_ok() {
                    model.flushed();
                }
                r
            }
        };
        let Err(e) = result else { continue };
        assert!(!fired, "{fault:?}: a second failure at op {i} after healing: {e}");
        fired = true;
        let errno = std::io::Error::from(e).raw_os_error();
        let want = if matches!(fault, Fault::WritesAfter { .. }) { 28 } else { 5 };
        assert_eq!(errno, Some(want), "{fault:?} op {i}: the device's error is passed on");
        let label = format!("{fault:?} failed at op {i}");
        // Everything before the failed step reads back; its own blocks as the model recorded.
        assert!(read_blocks(top, model.blocks()).unwrap() == model.cur, "{label}: live content");
        // A crash now is consistent.
        enable(true);
        st.hook.capture(&label);
        enable(false);
        let live = model.cur.clone();
        check_images(st.hook.take(), &model, &live);
        data.heal();
        journal.heal();
        if flush_right_after_heal {
            enable(true);
            top.flush().unwrap_or_else(|e| panic!("{label}: flush after heal failed: {e}"));
            enable(false);
            check_images(st.hook.take(), &model, &live);
            model.flushed();
            assert!(read_blocks(top, model.blocks()).unwrap() == model.cur, "{label}: after healed flush");
            let t = drop_unsynced(&data, &journal, &label).open(false).unwrap();
            assert!(
                read_blocks(&t, model.blocks()).unwrap() == model.cur,
                "{label}: crash after healed flush"
            );
        } else {
            watch_next_flush = true;
        }
    }
    // The last op is a flush, but if that one failed there was no other: flush once more.
    if model.hist.iter().any(|h| h.len() > 1) {
        assert!(fired, "{fault:?}: the workload ends with a flush");
        top.flush().unwrap();
        model.flushed();
    }
    // Everything must survive a crash now.
    assert!(model.hist.iter().all(|h| h.len() == 1), "{fault:?}: the workload ends flushed");
    let t = drop_unsynced(&data, &journal, "end").open(false).unwrap();
    assert!(read_blocks(&t, model.blocks()).unwrap() == model.cur, "{fault:?}: final crash");
    fired
}

#[test]
fn full_data_file_at_every_write_fails_cleanly_and_recovers() {
    for seed in [1, 4, 5] {
        let ops = workload(seed);
        let mut n = 0;
        while run(&ops, Fault::WritesAfter { data: true, n }, n % 2 == 0) {
            n += 1;
        }
        eprintln!("workload {seed}: data file filled up at each of {n} writes");
        assert!(n >= 40, "the workload made only {n} data writes");
    }
}

#[test]
fn full_journal_at_every_batch_fails_cleanly_and_recovers() {
    for seed in [2, 6, 7] {
        let ops = workload(seed);
        let mut n = 0;
        while run(&ops, Fault::WritesAfter { data: false, n }, n % 2 == 0) {
            n += 1;
        }
        eprintln!("workload {seed}: journal filled up at each of {n} batches");
        assert!(n >= 5, "the workload wrote only {n} journal batches");
    }
}

#[test]
fn failed_sync_at_every_flush_fails_cleanly_and_recovers() {
    for seed in [3, 8] {
        let ops = workload(seed);
        let flushes = ops.iter().filter(|o| o.is_none()).count();
        assert!(flushes >= 5);
        let mut fired = 0;
        for k in 0..flushes {
            for data in [true, false] {
                for heal_flush in [true, false] {
                    fired += usize::from(run(&ops, Fault::SyncAtFlush { data, k }, heal_flush));
                }
            }
        }
        eprintln!("workload {seed}: {fired} failed syncs over {flushes} flushes");
        assert!(fired > 2 * flushes, "data syncs always fail when armed, journal ones when a batch is due");
    }
}
