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
    content_of(0, SIZE)
}

/// `size` bytes of image number `tag` (images with different tags share no block).
fn content_of(tag: u64, size: u64) -> Vec<u8> {
    (0..size).map(|i| ((i / 65536) * 7 + (i % 4093) * 3 + 1 + tag * 61) as u8).collect()
}

/// An image of [`content`] (one sealed layer) pushed to `file://DIR/images/NAME:v1`; returns
/// the reference.
fn pushed_image(dir: &Path, name: &str) -> String {
    pushed(dir, name, &content())
}

/// An image of `bytes` (one sealed layer) pushed to `file://DIR/images/NAME:v1`.
fn pushed(dir: &Path, name: &str, bytes: &[u8]) -> String {
    std::fs::write(dir.join(format!("{name}.raw")), bytes).unwrap();
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

/// The one layer of disk `d` (a disk made from one of these images).
fn layer_of(d: &Path) -> String {
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("disk.json")).unwrap()).unwrap();
    let layers = m["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{m}");
    layers[0].as_str().unwrap().strip_prefix("sha256:").unwrap().to_string()
}

/// The one cache disk of image `name` in `cache/disks`.
fn cache_disk(dir: &Path, name: &str) -> std::path::PathBuf {
    let found: Vec<_> = std::fs::read_dir(dir.join("cache/disks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(&format!("{name}-")))
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    found[0].clone()
}

/// `mcow gc ARGS` in `dir`: its lines (KIND PATH), sorted.
fn gc(dir: &Path, args: &[&str]) -> Vec<String> {
    let mut all = vec!["gc"];
    all.extend(args);
    let mut lines: Vec<String> = mcow_ok(dir, &all).lines().map(str::to_string).collect();
    lines.sort();
    lines
}

// Tried: one cache holding image a (served, read-only, during gc; only 1 MiB of it read before),
// image b (served once and stopped: its cache disk and partial layer are unused), image c
// (pulled in full into the cache's store by a disk since deleted: an unreferenced complete
// layer) and image d (pulled lazily into the cache's store by a disk outside the cache, served
// during gc); `gc --dry-run --disks`, then `gc --disks`, both while both servers run; then,
// with d's server stopped, `gc --dry-run` with and without `--keep` of d's disk.
// Must hold: the dry run lists exactly b's cache disk, b's partial layer and c's layer and
// removes nothing; the real run prints the same lines and those paths are gone; a's disk and
// layer and d's layer stay, and both served disks then read whole and right (blocks never
// fetched before included); once d's server is gone nothing references d's layer but a --keep
// (the running server's registry of layers in use was what kept it).
#[test]
fn gc_beside_running_servers_removes_only_what_nothing_uses() {
    const S: u64 = 4 * MIB;
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let (a, b, c, d) = (content_of(1, S), content_of(2, S), content_of(3, S), content_of(4, S));
    let (ra, rb, rc, rd) =
        (pushed(dir, "a", &a), pushed(dir, "b", &b), pushed(dir, "c", &c), pushed(dir, "d", &d));
    let srv = Serve::start(dir, &["-r", "--cache", "cache", &rb]);
    tool_ok("qemu-io", dir, &["-f", "raw", "-r", "-c", "read 0 64k", &srv.unix_uri("b")]);
    srv.stop();
    mcow_ok(dir, &["pull", &rc, "gone", "--store", "cache/layers"]);
    let layer_c = layer_of(&dir.join("gone"));
    std::fs::remove_dir_all(dir.join("gone")).unwrap();
    mcow_ok(dir, &["pull", "--lazy", &rd, "outside/d", "--store", "cache/layers"]);
    let layer_d = layer_of(&dir.join("outside/d"));
    let srv_d = Serve::start(dir, &["-r", "outside/d"]);
    let srv_a = Serve::start(dir, &["-r", "--cache", "cache", &ra]);
    tool_ok("qemu-io", dir, &["-f", "raw", "-r", "-c", "read 0 1M", &srv_a.unix_uri("a")]);
    let (disk_a, disk_b) = (cache_disk(dir, "a"), cache_disk(dir, "b"));
    let (layer_a, layer_b) = (layer_of(&disk_a), layer_of(&disk_b));
    let rel = |p: &Path| p.strip_prefix(dir).unwrap().display().to_string();
    let mut expect = vec![
        format!("cache-disk {}", rel(&disk_b)),
        format!("layer cache/layers/blobs/sha256/{layer_c}"),
        format!("partial cache/layers/partial/sha256/{layer_b}"),
    ];
    expect.sort();
    let dry = gc(dir, &["--dry-run", "--disks", "cache"]);
    assert_eq!(dry, expect, "the dry run lists exactly the unused");
    for line in &dry {
        let path = dir.join(line.split_once(' ').unwrap().1);
        assert!(path.exists(), "the dry run removed {}", path.display());
    }
    let real = gc(dir, &["--disks", "cache"]);
    assert_eq!(real, dry, "the real run removes what the dry run listed");
    for line in &real {
        let path = dir.join(line.split_once(' ').unwrap().1);
        assert!(!path.exists(), "{} is still there", path.display());
    }
    for kept in [
        disk_a.join("disk.json"),
        dir.join(format!("cache/layers/partial/sha256/{layer_a}")),
        dir.join(format!("cache/layers/partial/sha256/{layer_d}")),
    ] {
        assert!(kept.exists(), "gc removed {} while in use", kept.display());
    }
    // The served disks read whole and right, blocks not fetched before gc included.
    tool_ok("nbdcopy", dir, &[&srv_a.unix_uri("a"), "a.copy"]);
    assert!(std::fs::read(dir.join("a.copy")).unwrap() == a, "a reads wrong after gc");
    tool_ok("nbdcopy", dir, &[&srv_d.unix_uri("d"), "d.copy"]);
    assert!(std::fs::read(dir.join("d.copy")).unwrap() == d, "d reads wrong after gc");
    srv_d.stop();
    // Nothing gc scans references d's layer: only the running server's registry kept it.
    assert_eq!(
        gc(dir, &["--dry-run", "cache"]),
        vec![format!("partial cache/layers/partial/sha256/{layer_d}")]
    );
    assert_eq!(gc(dir, &["--dry-run", "--keep", "outside/d", "cache"]), Vec::<String>::new());
    srv_a.stop();
    // Bad input: not a cache or store; nothing happens.
    let r = mcow_in(dir, &["gc", "outside"]);
    assert!(r.code == 1 && r.stderr.contains("neither a cache"), "{}", r.stderr);
}
