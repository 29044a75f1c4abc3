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
//!
//! A second child (`kill9_child_acked_writer`) flushes only every 16th iteration and prints
//! `ACKED <i> <j>` after each step returns (acknowledged, mostly not flushed). After the kill
//! the parent asserts that every acknowledged step is there (the pending logs carry the
//! unflushed mapping changes across a process kill): every sector reads as after the last
//! acknowledged step or, where the next step (perhaps under way) touched it, as after that
//! step; and again after a second open, with no debris and a clean `check`.
//!
//! Three more cover the storage the pending logs are written through (`mcow_engine::mapped`:
//! stores into a shared mapping, preallocated in chunks): a child storing records through it
//! is killed, and every stored record is in the file; and, on a small tmpfs mounted for a
//! child alone (`unshare -m`: needs root, as these machines and CI have), a full filesystem
//! fails the write that needs more space with ENOSPC, never a SIGBUS, and keeps everything
//! before it: for the storage alone, and for a disk whose logs fill up (after a kill, the
//! reopen has every acknowledged write).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use common::{Rng, assert_check_clean, create_disk, open_rw, pattern, read_all};
use mcow_engine::mapped::MappedStorage;
use mcow_engine::storage::Storage;
use mcow_engine::{Disk, ops};

const ENV: &str = "MCOW_KILL9_CHILD_DISK";
/// Held by each test that spawns children for its whole run: a child forked by one test holds,
/// until its exec, a copy of every file the other test has open, locks included, so a reopen
/// there could find its own disk locked.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
const ENV_ACKED: &str = "MCOW_KILL9_ACKED_CHILD_DISK";
/// The acknowledging child flushes after every this many iterations.
const ACKED_FLUSH_EVERY: u64 = 16;
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

/// Applies `step` to the disk.
fn apply(d: &Disk, step: Step) {
    match step {
        Step::Write { off, data } => d.write(off, &data).unwrap(),
        Step::Zeroes { off, len, may_trim } => d.write_zeroes(off, len, may_trim).unwrap(),
    }
}

/// The child side of every test here: runs `work` on the disk named by the environment variable
/// `env`, opened writable. A no-op in a normal test run (`env` unset).
fn child(env: &str, work: impl FnOnce(Disk)) {
    let Ok(dir) = std::env::var(env) else { return };
    work(open_rw(Path::new(&dir)));
}

/// The child: write, flush, report, forever (until killed). A no-op in a normal test run.
#[test]
fn kill9_child_writer() {
    child(ENV, |d| {
        for i in 0.. {
            for step in iteration(i) {
                apply(&d, step);
            }
            d.flush().unwrap();
            println!("FLUSHED {i}");
        }
    });
}

/// The acknowledging child: each step, then `ACKED <i> <j>`; a flush only now and then.
#[test]
fn kill9_child_acked_writer() {
    child(ENV_ACKED, |d| {
        for i in 0.. {
            for (j, step) in iteration(i).into_iter().enumerate() {
                apply(&d, step);
                println!("ACKED {i} {j}");
            }
            if i % ACKED_FLUSH_EVERY == ACKED_FLUSH_EVERY - 1 {
                d.flush().unwrap();
            }
        }
    });
}

/// The parent side of every test here: one test at a time, ten rounds, each on a fresh disk (a
/// sealed base layer of [`base_content`] under an empty top) handed to `round` with its number
/// and the test's random source (seeded with `seed` and the process id); `round` runs a child
/// on it ([`run_until_killed`]) and checks what the child left.
fn kill9_rounds(seed: u64, mut round: impl FnMut(u32, &Path, &mut Rng)) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut rng = Rng::new(seed ^ u64::from(std::process::id()));
    for r in 0..10 {
        let tmp = tempfile::tempdir().unwrap();
        let dir = disk_on_base(tmp.path());
        round(r, &dir, &mut rng);
    }
}

/// A fresh disk `d` in `parent`: a sealed base layer of [`base_content`] under an empty top.
fn disk_on_base(parent: &Path) -> PathBuf {
    let dir = create_disk(parent, "d", SIZE, BS);
    {
        let d = open_rw(&dir);
        d.write(0, &base_content()).unwrap();
        d.flush().unwrap();
    }
    ops::merge(&dir, 0, &mut |_, _| {}).unwrap();
    dir
}

/// Re-runs this test binary as the child test `child_test` on the disk `dir` (its path in the
/// environment variable `env`) and hands each line of its output that `parse` reads as a report
/// to `report` (with `killed` false) until `report` answers that it has enough; then, after
/// `pause`, kills the child with SIGKILL, waits for it and hands on (with `killed` true) the
/// reports it printed before it died. Returns how it ended.
fn run_until_killed<T>(
    child_test: &str,
    env: &str,
    dir: &Path,
    parse: impl Fn(&str) -> Option<T>,
    pause: Duration,
    mut report: impl FnMut(T, bool) -> bool,
) -> ExitStatus {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(&exe)
        .args(["--exact", child_test, "--nocapture", "--test-threads=1"])
        .env(env, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = lines.next().expect("the child stopped before being killed").unwrap();
        if let Some(r) = parse(&line)
            && report(r, false)
        {
            break;
        }
    }
    if !pause.is_zero() {
        std::thread::sleep(pause);
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    for line in lines {
        // A last line cut short by the kill is ignored: it was not reported.
        if let Some(r) = parse(&line.unwrap()) {
            report(r, true);
        }
    }
    status
}

fn assert_died_of_sigkill(round: u32, status: ExitStatus) {
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "round {round}: the child died of SIGKILL: {status:?}");
}

#[test]
fn kill_9_loses_no_acknowledged_write() {
    let mut unflushed_steps = 0u64;
    let mut recovered_rounds = 0;
    kill9_rounds(0x7777, |round, dir, rng| {
        let parse = |l: &str| {
            let mut f = l.split("ACKED ").nth(1)?.split_whitespace().map(|x| x.parse::<u64>().ok());
            Some((f.next()??, f.next()?? as usize))
        };
        let target = rng.range(3, 150);
        let pause = Duration::from_micros(rng.below(5000));
        let mut last: Option<(u64, usize)> = None;
        let status = run_until_killed("kill9_child_acked_writer", ENV_ACKED, dir, parse, pause, |a, _| {
            last = Some(a);
            a.0 >= target
        });
        assert_died_of_sigkill(round, status);
        let (n, k) = last.unwrap();
        // The model after step k of iteration n, and after the step that followed it.
        let mut model = base_content();
        let mut next = None;
        for i in 0..=n + 1 {
            for (j, s) in iteration(i).iter().enumerate() {
                if (i, j) <= (n, k) {
                    apply_to_model(&mut model, s);
                } else if next.is_none() {
                    let mut m = model.clone();
                    apply_to_model(&mut m, s);
                    next = Some(m);
                }
            }
        }
        let next = next.expect("a step follows");
        unflushed_steps += n % ACKED_FLUSH_EVERY;
        for open in ["first", "second"] {
            let d = Disk::open(dir, Default::default()).unwrap();
            if open == "second" {
                assert_eq!(
                    d.debris(),
                    Default::default(),
                    "round {round}: the first reopen trimmed all debris"
                );
                assert_eq!(
                    d.top().recovered().records,
                    0,
                    "round {round}: the first reopen made them durable"
                );
            } else if d.top().recovered().blocks > 0 {
                recovered_rounds += 1;
            }
            let got = read_all(&d);
            for (s, sector) in got.chunks(SECTOR).enumerate() {
                let r = s * SECTOR..(s * SECTOR + SECTOR).min(got.len());
                assert!(
                    sector == &model[r.clone()] || sector == &next[r.clone()],
                    "round {round}, {open} reopen: sector {s} (block {}) lost an acknowledged write (last acknowledged: iteration {n} step {k})",
                    s * SECTOR / BS as usize,
                );
            }
        }
        assert_check_clean(dir);
        eprintln!("round {round}: killed after iteration {n} step {k} was acknowledged");
    });
    // Most kills land with several iterations acknowledged but not flushed.
    assert!(unflushed_steps >= 20, "only {unflushed_steps} unflushed iterations were checked");
    assert!(recovered_rounds >= 3, "only {recovered_rounds} reopens applied pending log records");
}

fn base_content() -> Vec<u8> {
    let mut m = pattern(0xba5e, SIZE as usize);
    m[100_000..140_000].fill(0); // some of the base is a hole
    m
}

#[test]
fn kill_9_during_writes_keeps_every_flushed_iteration() {
    let mut total_checked = 0u64;
    let mut partial_rounds = 0;
    kill9_rounds(0x9999, |round, dir, rng| {
        // libtest may print "test kill9_child_writer ... " on the same line as the first report.
        let parse = |l: &str| l.split("FLUSHED ").nth(1).and_then(|n| n.trim().parse::<u64>().ok());
        let target = rng.range(3, 150);
        let pause = Duration::from_micros(rng.below(5000));
        let mut last: Option<u64> = None;
        let status = run_until_killed("kill9_child_writer", ENV, dir, parse, pause, |n, killed| {
            if killed {
                assert_eq!(Some(n), last.map(|l| l + 1));
            } else {
                assert_eq!(n, last.map_or(0, |l| l + 1), "iterations are reported in order");
            }
            last = Some(n);
            n >= target
        });
        assert_died_of_sigkill(round, status);
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

        let d = open_rw(dir);
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
        let d = Disk::open(dir, Default::default()).unwrap();
        assert_eq!(d.debris(), Default::default(), "round {round}: the writable reopen trimmed all debris");
        assert!(read_all(&d) == got, "round {round}: second reopen reads differently");
        drop(d);
        assert_check_clean(dir);
        eprintln!("round {round}: killed after {target}+ iterations, {} flushed", n + 1);
    });
    eprintln!(
        "{total_checked} flushed iterations checked; {partial_rounds} rounds showed part of an unflushed one"
    );
    assert!(total_checked >= 10 * 4);
}

const ENV_CONCURRENT: &str = "MCOW_KILL9_CONCURRENT_CHILD_DISK";
/// Threads of the concurrent child, and the blocks they all write.
const THREADS: u64 = 4;
const SHARED_BLOCKS: u64 = 8;

/// Write `i` of thread `t` of the concurrent child: 1 byte to 8 KiB at any offset of the
/// first `SHARED_BLOCKS` blocks (so writes of different threads overlap, also within 4 KiB).
fn concurrent_write(t: u64, i: u64) -> (u64, Vec<u8>) {
    let mut rng = Rng::new(0xc0c0 + t * 1_000_003 + i);
    let span = SHARED_BLOCKS * u64::from(BS);
    let len = rng.range(1, 8192);
    let off = rng.below(span - len);
    (off, pattern(0x1000 + t * 1_000_003 + i, len as usize))
}

/// The concurrent child: `THREADS` threads writing without pause, each write followed by
/// `ACKED <t> <i>`; no flush after the first.
#[test]
fn kill9_child_concurrent_writer() {
    child(ENV_CONCURRENT, |d| {
        let d = std::sync::Arc::new(d);
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let d = d.clone();
                std::thread::spawn(move || {
                    for i in 0.. {
                        let (off, data) = concurrent_write(t, i);
                        d.write(off, &data).unwrap();
                        println!("ACKED {t} {i}");
                    }
                })
            })
            .collect();
        for t in threads {
            let _ = t.join();
        }
    });
}

/// Tried: four threads of a child process writing overlapping ranges (down to the byte, within
/// and across 4 KiB pieces) of the same 8 blocks, none of them flushed, killed with SIGKILL
/// after a few hundred acknowledged writes; ten rounds. Must hold: every sector an acknowledged
/// write covered reads as data some write put there, never as the sealed base below (a block
/// dropped at recovery because its pending log records did not match its data: records of
/// concurrent in-place writes to one block must come in the order of their data); `check` is
/// clean.
#[test]
fn kill_9_under_concurrent_overlapping_writes_keeps_them() {
    kill9_rounds(0x5151, |round, dir, rng| {
        let parse = |l: &str| {
            let mut f = l.split("ACKED ").nth(1)?.split_whitespace().map(|x| x.parse::<u64>().ok());
            Some((f.next()??, f.next()??))
        };
        let target = rng.range(100, 600);
        let mut acked: Vec<(u64, u64)> = Vec::new();
        run_until_killed(
            "kill9_child_concurrent_writer",
            ENV_CONCURRENT,
            dir,
            parse,
            Duration::ZERO,
            |a, _| {
                acked.push(a);
                acked.len() as u64 >= target
            },
        );
        let base = base_content();
        let mut covered = vec![false; (SHARED_BLOCKS * u64::from(BS)) as usize / SECTOR];
        for &(t, i) in &acked {
            let (off, data) = concurrent_write(t, i);
            covered[off as usize / SECTOR..(off as usize + data.len()).div_ceil(SECTOR)].fill(true);
        }
        let d = Disk::open(dir, Default::default()).unwrap();
        let got = read_all(&d);
        for (s, &c) in covered.iter().enumerate() {
            let r = s * SECTOR..(s + 1) * SECTOR;
            if c && base[r.clone()].iter().any(|&b| b != 0) {
                assert!(
                    got[r.clone()] != base[r],
                    "round {round}: sector {s} (block {}) reads as the base after {} acknowledged writes (recovered {:?})",
                    s * SECTOR / BS as usize,
                    acked.len(),
                    d.top().recovered()
                );
            }
        }
        drop(d);
        assert_check_clean(dir);
    });
}

// The pending logs' storage (`mcow_engine::mapped`): stores into a shared mapping, never synced.

const ENV_MAPPED: &str = "MCOW_KILL9_MAPPED_CHILD_FILE";

/// Record `i` of the mapped-storage child: sizes vary, so records straddle pages and the
/// storage's allocation chunks.
fn mapped_record(i: u64) -> Vec<u8> {
    pattern(0x6d61 + i, 200 + (i % 7) as usize * 300)
}

/// The mapped-storage child: stores record after record, back to back, through a
/// `MappedStorage`, printing `STORED <i>` after each store returns; never syncs.
#[test]
fn kill9_child_mapped_writer() {
    let Ok(path) = std::env::var(ENV_MAPPED) else { return };
    let f =
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    let s = MappedStorage::new(f).unwrap();
    let mut off = 0;
    for i in 0.. {
        let r = mapped_record(i);
        s.write_at(&r, off).unwrap();
        off += r.len() as u64;
        println!("STORED {i}");
    }
}

/// Tried: a child stores records through a `MappedStorage` (no sync, no pwrite) and is killed
/// with SIGKILL at a random moment, after 50 to 3000 records (up to about 3 MB, so past several
/// of the storage's allocation chunks and remappings). Must hold: reading the file afterwards
/// (another process, plain reads) finds every record whose store returned, byte for byte, and
/// after them only the next record (perhaps cut short by the kill) and zeros (the preallocated
/// rest of the file): what a pending log's replay relies on.
#[test]
fn kill_9_keeps_what_a_mapped_storage_stored() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let exe = std::env::current_exe().unwrap();
    let mut rng = Rng::new(0x6d6d ^ u64::from(std::process::id()));
    for round in 0..4 {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("log");
        let mut child = Command::new(&exe)
            .args(["--exact", "kill9_child_mapped_writer", "--nocapture", "--test-threads=1"])
            .env(ENV_MAPPED, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let parse = |l: &str| l.split("STORED ").nth(1)?.trim().parse::<u64>().ok();
        let target = rng.range(50, 3000);
        let mut last = None;
        while last.is_none_or(|i| i < target) {
            let line = lines.next().expect("the child stopped before being killed").unwrap();
            last = parse(&line).or(last);
        }
        std::thread::sleep(Duration::from_micros(rng.below(2000)));
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(status.signal(), Some(9), "round {round}: the child died of SIGKILL: {status:?}");
        }
        for line in lines {
            last = parse(&line.unwrap()).or(last);
        }
        let last = last.unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let mut off = 0;
        for i in 0..=last {
            let r = mapped_record(i);
            assert!(off + r.len() <= bytes.len(), "round {round}: the file ends inside record {i} of {last}");
            assert!(
                bytes[off..off + r.len()] == r[..],
                "round {round}: record {i} of {last} reads otherwise"
            );
            off += r.len();
        }
        let next = mapped_record(last + 1);
        for (k, &b) in bytes[off..].iter().enumerate() {
            assert!(
                b == 0 || next.get(k) == Some(&b),
                "round {round}: byte {k} after record {last} is neither the next record's nor zero"
            );
        }
    }
}

const ENV_FULL: &str = "MCOW_KILL9_FULL_TMPFS";
const ENV_FULL_WRITER: &str = "MCOW_KILL9_FULL_WRITER_DISK";
/// Size of the tmpfs the full-filesystem tests run on (mounted in a mount namespace of their own).
const FULL_TMPFS_SIZE: &str = "512k";

/// Runs this test binary's `test` under `unshare -m` with a fresh tmpfs of
/// [`FULL_TMPFS_SIZE`] mounted on a new temporary directory (visible to that process alone), its
/// path in `ENV_FULL`; `env` is passed on. Fails (with the child's output) if the child did.
fn run_on_small_tmpfs(test: &str, env: &[(&str, &Path)]) {
    let exe = std::env::current_exe().unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(format!("mount -t tmpfs -o size={FULL_TMPFS_SIZE} mcow-test \"$0\" && exec \"$@\""))
        .arg(mnt.path())
        .arg(&exe)
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(ENV_FULL, mnt.path());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out =
        cmd.output().expect("unshare (util-linux) runs: these tests need it, and root, to mount a tmpfs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{test} under unshare failed ({}): {text}", out.status);
    assert!(text.contains(&format!("{test} ... ok")), "{test} ran under unshare: {text}");
}

/// The child on a full tmpfs: see `a_mapped_storage_on_a_full_filesystem_fails_a_write_and_keeps_the_rest`.
#[test]
fn kill9_child_mapped_full() {
    let Ok(dir) = std::env::var(ENV_FULL) else { return };
    let dir = Path::new(&dir);
    let open = |name: &str| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join(name))
            .unwrap()
    };
    // tmpfs is one of the filesystems that get a mapped storage: its length after one small
    // write is a whole allocation chunk, not the bytes written.
    let s = MappedStorage::or_file(open("log")).unwrap();
    s.write_at(b"first", 0).unwrap();
    assert_eq!(s.len().unwrap(), 64 << 10, "tmpfs gets a mapped storage, preallocated");
    // Records from offset 64 on, after a "header" that is rewritten below.
    let mut off = 64u64;
    let mut stored = 0u64;
    let err = loop {
        let r = mapped_record(stored);
        match s.write_at(&r, off) {
            Ok(()) => {
                off += r.len() as u64;
                stored += 1;
            }
            Err(e) => break e,
        }
        assert!(off < 4 << 20, "a {FULL_TMPFS_SIZE} tmpfs filled up before 4 MiB were stored");
    };
    assert_eq!(err.raw_os_error(), Some(28), "the failed write says ENOSPC: {err}");
    assert!(stored > 10, "records were stored before the filesystem was full ({stored})");
    let len = s.len().unwrap();
    // What was stored before is intact, through the storage and through another handle; and a
    // write inside what is already allocated (a pending log's header rewrite) still works.
    s.write_at(b"again", 0).unwrap();
    let file = std::fs::read(dir.join("log")).unwrap();
    assert_eq!(file.len() as u64, len, "the failed write left the length as it was");
    assert_eq!(&file[..5], b"again");
    let mut at = 64usize;
    for i in 0..stored {
        let r = mapped_record(i);
        let mut back = vec![0u8; r.len()];
        s.read_at(&mut back, at as u64).unwrap();
        assert!(back == r && file[at..at + r.len()] == r[..], "record {i} of {stored} reads otherwise");
        at += r.len();
    }
    assert!(file[at..].iter().all(|&b| b == 0), "nothing of the failed write was stored");
}

/// Tried: a `MappedStorage` on a 512 KiB tmpfs (mounted for the child alone, under `unshare`;
/// needs root) stores records until the filesystem is full. Must hold: the write that needs
/// more space fails with ENOSPC (from the preallocation: the process is not killed by a SIGBUS
/// on a store), every record stored before reads back byte for byte, nothing of the failed one
/// is there, the file's length is unchanged, and a later write inside the allocated part works.
#[test]
fn a_mapped_storage_on_a_full_filesystem_fails_a_write_and_keeps_the_rest() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    run_on_small_tmpfs("kill9_child_mapped_full", &[]);
}

/// Write `i` of the full-log writer: within one block (so that a failed write wrote nothing),
/// anywhere on the disk.
fn full_write(i: u64) -> (u64, Vec<u8>) {
    let mut rng = Rng::new(0x46554c4c + i);
    let block = rng.below(SIZE / u64::from(BS));
    let within = rng.below(u64::from(BS));
    let len = rng.range(1, u64::from(BS) - within);
    (block * u64::from(BS) + within, pattern(0x4655 + i, len as usize))
}

/// The grandchild on a full tmpfs: opens the disk whose pending logs lead to the tmpfs, writes
/// `full_write(0)`, `(1)`... printing `ACKED <i>` after each and `FAILED <error>` at the first
/// that fails, then waits to be killed.
#[test]
fn kill9_child_full_log_writer() {
    let Ok(dir) = std::env::var(ENV_FULL_WRITER) else { return };
    let d = open_rw(Path::new(&dir));
    for i in 0.. {
        let (off, data) = full_write(i);
        match d.write(off, &data) {
            Ok(()) => println!("ACKED {i}"),
            Err(e) => {
                println!("FAILED {i} {e}");
                break;
            }
        }
    }
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The child on a full tmpfs: moves the disk's pending logs there, behind symlinks, fills the
/// tmpfs but for a little, runs the writer, kills it after its failed write and checks.
#[test]
fn kill9_child_full_log() {
    let (Ok(tmpfs), Ok(dir)) = (std::env::var(ENV_FULL), std::env::var(ENV_FULL_WRITER)) else { return };
    let (tmpfs, dir) = (Path::new(&tmpfs), Path::new(&dir));
    let manifest = mcow_engine::disk::read_manifest(dir).unwrap();
    let top = manifest.top.expect("the disk has a top");
    for i in 0..2 {
        let log = dir.join(format!("{top}.pending.{i}"));
        std::fs::remove_file(&log).unwrap();
        std::os::unix::fs::symlink(tmpfs.join(format!("pending.{i}")), &log).unwrap();
    }
    // Room for the first two chunks of log 0 (64 KiB, then 128 KiB), not the third (256 KiB).
    std::fs::write(tmpfs.join("filler"), vec![1u8; 300 << 10]).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(&exe)
        .args(["--exact", "kill9_child_full_log_writer", "--nocapture", "--test-threads=1"])
        .env(ENV_FULL_WRITER, dir)
        .env_remove(ENV_FULL)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut acked = None;
    let mut failed = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(i) = line.split("ACKED ").nth(1) {
            acked = Some(i.trim().parse::<u64>().unwrap());
        } else if let Some(f) = line.split("FAILED ").nth(1) {
            failed = Some(f.to_string());
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL: the logs were never synced nor closed
    child.wait().unwrap();
    let failed = failed.expect("a write failed once the tmpfs was full");
    assert!(
        failed.contains("pending.0") && failed.contains("No space left on device"),
        "the failed write names the log and ENOSPC: {failed}"
    );
    let acked = acked.expect("writes were acknowledged before the tmpfs was full");
    let log_len = std::fs::metadata(tmpfs.join("pending.0")).unwrap().len();
    assert!(
        log_len > 0 && log_len.is_multiple_of(64 << 10),
        "the log was preallocated in chunks (written through a mapping): {log_len} bytes"
    );
    assert!(acked > 100, "the logs took records before they filled up ({acked})");
    // Room again, as a user would make it, then the reopen applies what the logs hold.
    std::fs::remove_file(tmpfs.join("filler")).unwrap();
    let mut model = base_content();
    for i in 0..=acked {
        let (off, data) = full_write(i);
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
    let d = Disk::open(dir, Default::default()).unwrap();
    assert!(d.top().recovered().records > 0, "the reopen applied the logs' records");
    let got = read_all(&d);
    assert!(
        got == model,
        "an acknowledged write is lost, or the failed one is there (first difference at byte {:?})",
        common::first_diff(&got, &model)
    );
    drop(d);
    assert_check_clean(dir);
}

/// Tried: a disk (on the test's ordinary filesystem) whose pending logs lead, by symlinks, to a
/// 512 KiB tmpfs that is nearly full (mounted for the child alone, under `unshare`; needs
/// root); a writer makes small writes, none flushed, until one fails, and is then killed with
/// SIGKILL. Must hold: the failed write's error names the pending log and ENOSPC (the writer
/// was not killed by a SIGBUS); after room is made, a reopen reads every acknowledged write and
/// nothing of the failed one (it wrote no data), and `check` is clean.
#[test]
fn a_full_pending_log_fails_the_write_and_loses_no_acknowledged_one() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let dir = disk_on_base(tmp.path());
    run_on_small_tmpfs("kill9_child_full_log", &[(ENV_FULL_WRITER, &dir)]);
}
