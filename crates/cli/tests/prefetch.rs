//! Traces and background fetching: `mcow trace` records first reads in order, `push --trace`
//! ships the trace with the image, and lazy `serve` prefetches it (and with `--fetch-all`
//! downloads the rest, completing the layers). `file://` backend; qemu-io must be installed.

mod common;
#[path = "common/nbd.rs"]
mod nbd;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use nbd::*;

/// A 4 MiB disk with two sealed layers of distinct data.
fn two_layer_disk(dir: &Path) {
    mcow_ok(dir, &["create", "d", "-s", "4M"]);
    mcow_ok(dir, &["write", "d", "0", "--pattern", "0x11", "2097152"]);
    mcow_ok(dir, &["seal", "d"]);
    mcow_ok(dir, &["write", "d", "1048576", "--pattern", "0x22", "2097152"]);
    mcow_ok(dir, &["seal", "d"]);
}

fn trace_blocks(path: &Path) -> Vec<u64> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    assert_eq!(v["block_size"], 65536);
    v["blocks"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap()).collect()
}

#[test]
fn trace_records_first_reads_in_order_and_lazy_serving_prefetches_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    two_layer_disk(dir);
    // Record: read block 40, then 3, then 40 again, then blocks 10-11.
    let trace = dir.join("boot.trace");
    let srv = Serve::start_verb(dir, "trace", &["d", "--out", trace.to_str().unwrap()], &[]);
    let uri = srv.unix_uri("d");
    for cmd in ["read 2621440 4096", "read 196608 512", "read 2621440 4096", "read 655360 131072"] {
        tool_ok("qemu-io", dir, &["-f", "raw", "-c", cmd, &uri]);
    }
    let log = srv.stop_with_log();
    assert!(log.contains("wrote a trace of 4 blocks"), "{log}");
    assert_eq!(trace_blocks(&trace), vec![40, 3, 10, 11]);

    // Push with the trace; a lazy serve from a fresh cache prefetches exactly those blocks.
    let image = format!("file://{}:v1", dir.join("images").display());
    mcow_ok(dir, &["push", "d", &image, "--trace", trace.to_str().unwrap()]);
    let srv = Serve::start_env(dir, &["--cache", "cache", &format!("vm={image}")], &[("RUST_LOG", "info")]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !srv.log().contains("prefetched the trace") {
        assert!(Instant::now() < deadline, "no prefetch line:\n{}", srv.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = srv.stop_with_log();
    assert!(log.contains("blocks=4"), "{log}");
    let disks: Vec<_> = std::fs::read_dir(dir.join("cache/disks")).unwrap().collect();
    assert_eq!(disks.len(), 1);
    let disk = disks[0].as_ref().unwrap().path();
    let info = mcow_ok(dir, &["info", disk.to_str().unwrap(), "--output", "json"]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let local: u64 =
        info["layers"].as_array().unwrap().iter().map(|l| l["local_bytes"].as_u64().unwrap()).sum();
    // Exactly the four blocks (each lives in one layer): a prefetch fetches no neighbours.
    assert_eq!(local, 4 * 65536, "local bytes");
    assert!(disk.join("trace.json").exists(), "the pulled disk keeps the trace");
}

#[test]
fn fetch_all_completes_the_layers_in_the_background() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    two_layer_disk(dir);
    let image = format!("file://{}:v1", dir.join("images").display());
    mcow_ok(dir, &["push", "d", &image]);
    let original = export_bytes(dir, "d");
    let srv = Serve::start_env(
        dir,
        &["--cache", "cache", "--fetch-all", &format!("vm={image}")],
        &[("RUST_LOG", "info")],
    );
    let blobs = dir.join("cache/layers/blobs/sha256");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_dir(&blobs).map(|d| d.count()).unwrap_or(0) < 2 {
        assert!(Instant::now() < deadline, "layers not completed in time:\n{}", srv.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    srv.stop();
    let partial = dir.join("cache/layers/partial/sha256");
    assert_eq!(std::fs::read_dir(&partial).map(|d| d.count()).unwrap_or(0), 0, "partial copies remain");
    // The disk now reads without its origin: move the image away and export it.
    std::fs::rename(dir.join("images"), dir.join("gone")).unwrap();
    let disks: Vec<_> = std::fs::read_dir(dir.join("cache/disks")).unwrap().collect();
    let disk = disks[0].as_ref().unwrap().path();
    let out = dir.join("out.raw");
    mcow_ok(dir, &["export", disk.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == original, "the completed disk differs");
    assert!(mcow_in(dir, &["check", disk.to_str().unwrap()]).code == 0);
}
