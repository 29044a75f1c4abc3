//! What a snapshot of a disk in use costs its writer, against the size of the top (issue 15; a
//! measurement, not a test): for each size, a fresh disk on real files whose top holds that much
//! data (flushed), one thread writing random 4 KiB blocks without pause and timing each write,
//! a snapshot taken while it writes, then the frozen top sealed (in the background, as a server
//! does) while the writes go on.
//!
//! Reported per size: the snapshot call's time and its switch (how long writes could be held
//! up); the writer's slowest write in the snapshot's window against its p99 before; and the time
//! until the new layer is sealed (ready to push).
//!
//! `cargo run --release -p mcow-engine --example snapshot_pause [DIR] [MAX_MIB]` (DIR default a
//! temporary directory; sizes 1, 16, 256, 1024 MiB up to MAX_MIB, default 1024).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mcow_engine::{CreateOptions, Disk, OpenOptions};

const BS: u32 = 64 * 1024;

fn main() {
    let mut args = std::env::args().skip(1);
    let tmp;
    let root = match args.next() {
        Some(d) => std::path::PathBuf::from(d),
        None => {
            tmp = tempfile::tempdir().expect("temporary directory");
            tmp.path().to_path_buf()
        }
    };
    let max_mib: u64 = args.next().map_or(1024, |s| s.parse().expect("MAX_MIB"));
    println!(
        "| top data | snapshot call | switch | slowest write in window | p99 write before | seal until ready |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for mib in [1u64, 16, 256, 1024].into_iter().filter(|&m| m <= max_mib) {
        let dir = root.join(format!("d{mib}"));
        let _ = std::fs::remove_dir_all(&dir);
        let size = (2 * max_mib.max(16)) << 20;
        let mut opts = CreateOptions::new(size, root.join("layers"));
        opts.block_size = BS;
        Disk::create(&dir, &opts).expect("create");
        let disk = Arc::new(Disk::open(&dir, OpenOptions::default()).expect("open"));
        let chunk = vec![0x5au8; 1 << 20];
        for i in 0..mib {
            disk.write(i << 20, &chunk).expect("fill the top");
        }
        disk.flush().expect("flush");

        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (disk, stop) = (disk.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut times: Vec<(Instant, Duration)> = Vec::new();
                let mut x = 0x9e37_79b9_7f4a_7c15u64;
                let buf = vec![0xa5u8; 4096];
                let blocks = size / 4096;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let t = Instant::now();
                    disk.write((x % blocks) * 4096, &buf).expect("write");
                    times.push((t, t.elapsed()));
                }
                times
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        let t0 = Instant::now();
        let snap = disk.snapshot().expect("snapshot");
        let t1 = Instant::now();
        let sealer = {
            let disk = disk.clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                disk.seal_frozen(&mut |_, _| {}).expect("seal").expect("a frozen top");
                t.elapsed()
            })
        };
        let sealed = sealer.join().expect("sealer");
        std::thread::sleep(Duration::from_millis(100));
        stop.store(true, Ordering::Relaxed);
        let times = writer.join().expect("writer");
        let mut before: Vec<Duration> = times.iter().filter(|(t, _)| *t < t0).map(|(_, d)| *d).collect();
        before.sort();
        let p99 = before.get(before.len() * 99 / 100).copied().unwrap_or_default();
        // Writes that overlapped the snapshot call.
        let slowest = times
            .iter()
            .filter(|(t, d)| *t + *d >= t0 && *t <= t1)
            .map(|(_, d)| *d)
            .max()
            .unwrap_or_default();
        println!(
            "| {mib} MiB | {:.2} ms | {:.1} µs | {:.2} ms | {:.3} ms | {:.2} s |",
            snap.took.as_secs_f64() * 1e3,
            snap.switch.as_secs_f64() * 1e6,
            slowest.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            sealed.as_secs_f64()
        );
        drop(disk);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
