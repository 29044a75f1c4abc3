//! The cache of lazily served images: `mcow serve --cache-limit` keeps the fetched data of a
//! cache within a bound, and `mcow gc` removes what nothing references, also while a server
//! runs on the cache. Real origin (`file://`), real NBD clients (nbdcopy, qemu-io): a missing
//! one fails the test.

mod common;
#[path = "common/nbd.rs"]
mod nbd;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::*;
use nbd::*;

const SIZE: u64 = 32 * MIB;

/// What every byte of the test image holds: no two 64 KiB blocks alike, none all zeros.
fn content() -> Vec<u8> {
    (0..SIZE).map(|i| ((i / 65536) * 7 + (i % 4093) * 3 + 1) as u8).collect()
}

/// An image of [`content`] (one sealed layer) pushed to `file://DIR/images/NAME:v1`; returns
/// the reference.
fn pushed_image(dir: &Path, name: &str) -> String {
    std::fs::write(dir.join(format!("{name}.raw")), content()).unwrap();
    mcow_ok(dir, &["import", &format!("{name}.raw"), name]);
    let reference = format!("file://{}/images/{name}:v1", dir.display());
    mcow_ok(dir, &["push", name, &reference]);
    reference
}

/// Bytes allocated on disk (st_blocks) by every file under `dir`.
fn allocated(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        total += if m.is_dir() { allocated(&e.path()) } else { m.blocks() * 512 };
    }
    total
}

/// The value of `key=` in the first line of `log` that contains `what`.
fn logged(log: &str, what: &str, key: &str) -> u64 {
    let line = log.lines().find(|l| l.contains(what)).unwrap_or_else(|| panic!("no {what:?} in:\n{log}"));
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        .parse()
        .unwrap()
}

// Tried: a 32 MiB image served from an empty cache with `--cache-limit 4M` and 4-block fetches
// (no read-ahead), copied whole with nbdcopy (8x the limit) while the cache directory's
// allocation is sampled, then its first 8 MiB (long dropped) read again with qemu-io.
// Must hold: the copy is the image; the cache directory never holds more than the limit plus
// one fetch window (256 KiB) beyond what it held before the first read; the server says it
// dropped blocks and fetched the first 8 MiB again (bytes fetched over 40 MiB in all), and the
// re-read verifies.
#[test]
fn serve_with_a_cache_limit_keeps_the_cache_within_it() {
    const LIMIT: u64 = 4 * MIB;
    const WINDOW: u64 = 4 * 65536;
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let reference = pushed_image(dir, "vm");
    let srv = Serve::start_env(
        dir,
        &[
            "-r",
            "--cache",
            "cache",
            "--cache-limit",
            "4M",
            "--fetch-window",
            "4",
            "--readahead",
            "0",
            &reference,
        ],
        &[("RUST_LOG", "info")],
    );
    let cache = dir.join("cache");
    let before = allocated(&cache);
    let mut copy = tool_cmd("nbdcopy", dir).args([&srv.unix_uri("vm"), "copy.raw"]).spawn().unwrap();
    let mut most = 0;
    let status = loop {
        most = most.max(allocated(&cache));
        if let Some(s) = copy.try_wait().unwrap() {
            break s;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    assert!(status.success(), "nbdcopy failed: {status}");
    most = most.max(allocated(&cache));
    assert!(std::fs::read(dir.join("copy.raw")).unwrap() == content(), "the copy differs from the image");
    assert!(
        most - before <= LIMIT + WINDOW,
        "the cache grew by {} bytes (limit {LIMIT}, window {WINDOW})",
        most - before
    );
    // The first 8 MiB were dropped long ago: read again, fetched again, right.
    let model = content();
    let cmds: Vec<String> = (0..8 * MIB / 65536)
        .flat_map(|b| {
            // (The first byte of every 4 KiB: every block is read, and fetched, whole.)
            let at = (b * 65536) as usize;
            (0..16)
                .map(|k| format!("read -P {:#x} {} 1", model[at + k * 4096], at + k * 4096))
                .collect::<Vec<_>>()
        })
        .collect();
    let mut args: Vec<&str> = vec!["-f", "raw", "-r"];
    for c in &cmds {
        args.extend(["-c", c]);
    }
    let uri = srv.unix_uri("vm");
    args.push(&uri);
    let r = tool_run("qemu-io", dir, &args);
    let all = format!("{}{}", r.stdout, r.stderr);
    assert!(r.code == 0 && !all.contains("Pattern verification failed"), "qemu-io: {all}");
    let grown = allocated(&cache) - before;
    assert!(grown <= LIMIT + WINDOW, "after the re-read the cache grew by {grown} bytes");
    let log = srv.stop_with_log();
    assert!(logged(&log, "served; the bounded cache", "dropped_bytes") >= SIZE - LIMIT - WINDOW, "{log}");
    let fetched = logged(&log, "served; fetched from the origin", "blocks_bytes_fetched");
    assert!(
        fetched >= SIZE + 8 * MIB,
        "fetched {fetched} bytes: the dropped blocks were not fetched again\n{log}"
    );
}
