//! A real `kill -9` of a process writing to a disk on real files.
//!
//! The parent makes a disk (a sealed base layer plus a top) and re-runs this test binary as a
//! child in "writer" mode (`kill9_child_writer`, selected by an environment variable): the child
//! opens the disk, and for iteration 0, 1, 2, ... applies that iteration's writes and zeroes
//! (derived from the iteration number, so the parent can recompute them), flushes, and prints
//! `FLUSHED <i>`. The parent kills it with SIGKILL at a random moment, reads the last `FLUSHED`
//! line N, reopens the disk and asserts:
//! - every 512-byte sector reads as it did after iteration N, or (only where iteration N+1, which
//!   may have been under way, touched it) as it did after one of iteration N+1's steps;
//! - a second open finds no debris, and `ops::check` is clean.
//!
//! Repeated for ten rounds with different kill moments.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Rng, assert_check_clean, create_disk, open_rw, pattern, read_all};
use mcow_engine::{Disk, ops};

const ENV: &str = "MCOW_KILL9_CHILD_DISK";
const SIZE: u64 = 512 << 10;
const BS: u32 = 4096;
const SECTOR: usize = 512;

#[derive(Debug)]
enum Step {
    Write { off: u64, data: Vec<u8> },
    Zeroes { off: u64, len: u64, may_trim: bool },
}

/// The steps of iteration `i`: one to three writes or zeroes, mostly within the first 64
/// blocks so that blocks get rewritten in place.
fn iteration(i: u64) -> Vec<Step> {
    let mut rng = Rng::new(0x4b11 + i);
    let span = if rng.chance(4) { SIZE } else { 64 * u64::from(BS) };
    (0..rng.range(1, 3))
        .map(|j| {
            let off = rng.below(span);
            let len = rng.range(1, 3 * u64::from(BS)).min(SIZE - off);
            if rng.chance(6) {
                Step::Zeroes { off, len, may_trim: rng.chance(2) }
            } else {
                Step::Write { off, data: pattern(i * 16 + j, len as usize) }
            }
        })
        .collect()
}

fn apply_to_model(model: &mut [u8], step: &Step) {
    match step {
        Step::Write { off, data } => model[*off as usize..*off as usize + data.len()].copy_from_slice(data),
        Step::Zeroes { off, len, .. } => model[*off as usize..(*off + *len) as usize].fill(0),
    }
}

/// The child: write, flush, report, forever (until killed). A no-op in a normal test run.
#[test]
fn kill9_child_writer() {
    let Ok(dir) = std::env::var(ENV) else { return };
    let d = open_rw(Path::new(&dir));
    for i in 0.. {
        for step in iteration(i) {
            match step {
                Step::Write { off, data } => d.write(off, &data).unwrap(),
                Step::Zeroes { off, len, may_trim } => d.write_zeroes(off, len, may_trim).unwrap(),
            }
        }
        d.flush().unwrap();
        println!("FLUSHED {i}");
    }
}

fn base_content() -> Vec<u8> {
    let mut m = pattern(0xba5e, SIZE as usize);
    m[100_000..140_000].fill(0); // some of the base is a hole
    m
}

#[test]
fn kill_9_during_writes_keeps_every_flushed_iteration() {
    let exe = std::env::current_exe().unwrap();
    let mut rng = Rng::new(0x9999 ^ u64::from(std::process::id()));
    let mut total_checked = 0u64;
    let mut partial_rounds = 0;
    for round in 0..10 {
        let tmp = tempfile::tempdir().unwrap();
        let dir = create_disk(tmp.path(), "d", SIZE, BS);
        {
            let d = open_rw(&dir);
            d.write(0, &base_content()).unwrap();
            d.flush().unwrap();
        }
        ops::merge(&dir, 0, &mut |_, _| {}).unwrap();

        let mut child = Command::new(&exe)
            .args(["--exact", "kill9_child_writer", "--nocapture", "--test-threads=1"])
            .env(ENV, &dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // libtest may print "test kill9_child_writer ... " on the same line as the first report.
        let parse = |l: &str| l.split("FLUSHED ").nth(1).and_then(|n| n.trim().parse::<u64>().ok());
        let target = rng.range(3, 150);
        let mut last: Option<u64> = None;
        while last.is_none_or(|n| n < target) {
            let line = lines.next().expect("the child stopped before being killed").unwrap();
            if let Some(n) = parse(&line) {
                assert_eq!(n, last.map_or(0, |l| l + 1), "iterations are reported in order");
                last = Some(n);
            }
        }
        std::thread::sleep(Duration::from_micros(rng.below(5000)));
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(status.signal(), Some(9), "round {round}: the child died of SIGKILL: {status:?}");
        }
        for line in lines {
            // A last line cut short by the kill is ignored: it was not reported.
            if let Some(n) = parse(&line.unwrap()) {
                assert_eq!(Some(n), last.map(|l| l + 1));
                last = Some(n);
            }
        }
        let n = last.unwrap();

        // The model after iteration n, and every state iteration n+1 passed through.
        let mut model = base_content();
        for i in 0..=n {
            iteration(i).iter().for_each(|s| apply_to_model(&mut model, s));
        }
        let mut later = vec![model.clone()];
        for s in iteration(n + 1) {
            let mut m = later.last().unwrap().clone();
            apply_to_model(&mut m, &s);
            later.push(m);
        }

        let d = open_rw(&dir);
        let got = read_all(&d);
        for (s, sector) in got.chunks(SECTOR).enumerate() {
            let r = s * SECTOR..(s * SECTOR + SECTOR).min(got.len());
            if sector != &model[r.clone()] {
                assert!(
                    later.iter().any(|m| sector == &m[r.clone()]),
                    "round {round}: sector {s} (block {}) holds neither iteration {n}'s data nor any \
                     state of iteration {}",
                    s * SECTOR / BS as usize,
                    n + 1
                );
            }
        }
        total_checked += n + 1;
        if got != model {
            partial_rounds += 1; // the kill landed inside iteration n+1 and some of it shows
        }
        drop(d);
        let d = Disk::open(&dir, Default::default()).unwrap();
        assert_eq!(d.debris(), Default::default(), "round {round}: the writable reopen trimmed all debris");
        assert!(read_all(&d) == got, "round {round}: second reopen reads differently");
        drop(d);
        assert_check_clean(&dir);
        eprintln!("round {round}: killed after {target}+ iterations, {} flushed", n + 1);
    }
    eprintln!(
        "{total_checked} flushed iterations checked; {partial_rounds} rounds showed part of an unflushed one"
    );
    assert!(total_checked >= 10 * 4);
}
