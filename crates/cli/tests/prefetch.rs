//! Traces and background fetching: `mcow trace` records first reads in order, `push --trace`
//! ships the trace with the image, and lazy `serve` prefetches it (and with `--fetch-all`
//! downloads the rest, completing the layers). Mostly the `file://` backend; the trace's life in
//! a registry (copies made with skopeo, the registry's garbage collection) with Debian's
//! docker-registry. qemu-io, skopeo and docker-registry must be installed (a missing one fails).

mod common;
#[path = "common/nbd.rs"]
mod nbd;
#[path = "common/registry.rs"]
mod registry;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use mcow_engine::Digest;
use nbd::*;
use registry::Registry;
use serde_json::Value;

const TRACE_MEDIA_TYPE: &str = "application/vnd.mcow.trace.v1+json";

/// A 4 MiB disk with two sealed layers of distinct data.
fn two_layer_disk(dir: &Path) {
    mcow_ok(dir, &["create", "d", "-s", "4M"]);
    mcow_ok(dir, &["write", "d", "0", "--pattern", "0x11", "2097152"]);
    mcow_ok(dir, &["seal", "d"]);
    mcow_ok(dir, &["write", "d", "1048576", "--pattern", "0x22", "2097152"]);
    mcow_ok(dir, &["seal", "d"]);
}

/// Writes a trace of `blocks` (64 KiB blocks) to `dir/name`, as `mcow trace` would.
fn write_trace(dir: &Path, name: &str, blocks: &[u64]) -> PathBuf {
    let path = dir.join(name);
    let list: Vec<String> = blocks.iter().map(u64::to_string).collect();
    std::fs::write(&path, format!("{{\"block_size\":65536,\"blocks\":[{}]}}", list.join(","))).unwrap();
    path
}

/// The digest of a file's bytes, `sha256:<hex>`.
fn digest_of(path: &Path) -> String {
    Digest::of(&std::fs::read(path).unwrap()).to_string()
}

/// Serves `reference` lazily from the (empty) cache `dir/cache` with RUST_LOG=info, waits for
/// the trace's prefetch to finish, stops; returns the log and the cached disk.
fn serve_until_prefetched(dir: &Path, cache: &str, reference: &str) -> (String, PathBuf) {
    let srv = Serve::start_env(dir, &["--cache", cache, &format!("vm={reference}")], &[("RUST_LOG", "info")]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !srv.log().contains("prefetched the trace") {
        assert!(Instant::now() < deadline, "no prefetch line:\n{}", srv.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    (srv.stop_with_log(), cached_disk(&dir.join(cache)))
}

/// The one disk `serve REF` made in `cache`.
fn cached_disk(cache: &Path) -> PathBuf {
    let disks: Vec<PathBuf> =
        std::fs::read_dir(cache.join("disks")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(disks.len(), 1, "one cached disk expected: {disks:?}");
    disks[0].clone()
}

/// Bytes of the disk's sealed layers held locally (fetched so far).
fn local_bytes(dir: &Path, disk: &Path) -> u64 {
    let info = mcow_ok(dir, &["info", disk.to_str().unwrap(), "--output", "json"]);
    let info: Value = serde_json::from_str(&info).unwrap();
    info["layers"].as_array().unwrap().iter().map(|l| l["local_bytes"].as_u64().unwrap()).sum()
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
    let (log, disk) = serve_until_prefetched(dir, "cache", &image);
    assert!(log.contains("blocks=4"), "{log}");
    // Exactly the four blocks (each lives in one layer): a prefetch fetches no neighbours.
    assert_eq!(local_bytes(dir, &disk), 4 * 65536, "local bytes");
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

/// Runs `skopeo copy --all --preserve-digests SRC DEST` (plain HTTP to the loopback registry, no
/// signature policy needed); asserts it succeeds.
fn skopeo_copy(dir: &Path, src: &str, dest: &str) {
    tool_ok(
        "skopeo",
        dir,
        &[
            "--insecure-policy",
            "copy",
            "--all",
            "--preserve-digests",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            src,
            dest,
        ],
    );
}

/// The `manifest_digest` of `mcow push ... --output json`.
fn push_json(dir: &Path, args: &[&str]) -> String {
    let mut all = vec!["push"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--output", "json"]);
    let out: Value = serde_json::from_str(&mcow_ok(dir, &all)).unwrap();
    out["manifest_digest"].as_str().unwrap().to_string()
}

/// Tried: `push --trace` to a docker-registry, then `skopeo copy --all --preserve-digests` of the
/// image to another repository of the same registry and to an `oci:DIR:TAG` layout, and a lazy
/// pull and a lazy serve of each copy.
/// Must hold: the pushed manifest lists the trace as its last `layers` entry, of the trace's
/// media type; both copies keep the manifest's digest and hold the trace blob byte for byte;
/// each copy pulls lazily with no warning, its trace.json is the trace, its bytes are the
/// disk's, and serving it prefetches exactly the trace's 4 blocks.
#[test]
fn a_trace_travels_with_skopeo_copies_of_the_image() {
    tool("skopeo");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    two_layer_disk(dir);
    let original = export_bytes(dir, "d");
    let trace = write_trace(dir, "boot.trace", &[40, 3, 10, 11]);
    let trace_digest = digest_of(&trace);
    let reg = Registry::start(&dir.join("registry"));
    let host = reg.host();
    let digest =
        push_json(dir, &["d", &format!("oci://{host}/mcow/src:v1"), "--trace", trace.to_str().unwrap()]);

    let m: Value = serde_json::from_str(&reg.manifest("mcow/src", "v1")).unwrap();
    let entries = m["layers"].as_array().unwrap();
    assert_eq!(entries.len(), 3, "two disk layers and the trace: {m}");
    assert_eq!(entries[2]["mediaType"], TRACE_MEDIA_TYPE, "{m}");
    assert_eq!(entries[2]["digest"], trace_digest.as_str(), "{m}");

    skopeo_copy(dir, &format!("docker://{host}/mcow/src:v1"), &format!("docker://{host}/mcow/copy:v1"));
    let layout = dir.join("oci-copy");
    skopeo_copy(dir, &format!("docker://{host}/mcow/src:v1"), &format!("oci:{}:v1", layout.display()));
    let copied = reg.manifest("mcow/copy", "v1");
    assert_eq!(Digest::of(copied.as_bytes()).to_string(), digest, "skopeo changed the manifest");
    let hex = trace_digest.strip_prefix("sha256:").unwrap();
    let in_layout = layout.join("blobs/sha256").join(hex);
    assert!(std::fs::read(&in_layout).unwrap() == std::fs::read(&trace).unwrap(), "the trace blob differs");
    assert!(reg.blob_file(&trace_digest).exists());

    for (k, reference) in
        [format!("oci://{host}/mcow/copy:v1"), format!("file://{}:v1", layout.display())].iter().enumerate()
    {
        let pulled = format!("pulled{k}");
        let r = mcow_in(dir, &["pull", "--lazy", reference, &pulled]);
        assert_eq!(r.code, 0, "pull --lazy {reference} failed:\n{}", r.stderr);
        assert!(!r.stderr.contains("warning"), "pull of {reference} warned:\n{}", r.stderr);
        let kept = std::fs::read(dir.join(&pulled).join("trace.json")).unwrap();
        assert!(kept == std::fs::read(&trace).unwrap(), "{reference}: trace.json is not the trace");
        assert!(export_bytes(dir, &pulled) == original, "{reference}: the disk's bytes differ");

        let (log, disk) = serve_until_prefetched(dir, &format!("cache{k}"), reference);
        assert!(log.contains("blocks=4"), "{reference}:\n{log}");
        assert!(!log.contains("warning"), "{reference}:\n{log}");
        assert_eq!(local_bytes(dir, &disk), 4 * 65536, "{reference}: local bytes after the prefetch");
    }
}

/// Tried: push the image with trace A to tag v1, then again with trace B (same layers): the
/// first manifest is now untagged and trace A referenced by nothing that lives. Stop the
/// registry, run `docker-registry garbage-collect --delete-untagged` as a dry run, then for
/// real, and start the registry again.
/// Must hold: the dry run marks trace B and lists trace A (and the old config) for deletion,
/// but neither trace B, nor a layer, nor the current config; after the real run trace A's blob
/// is gone and trace B's is there, and serving the image from an empty cache prefetches B's
/// 2 blocks.
#[test]
fn registry_garbage_collection_keeps_the_trace_of_a_live_image() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    two_layer_disk(dir);
    let (a, b) = (write_trace(dir, "a.trace", &[40, 3, 10, 11]), write_trace(dir, "b.trace", &[20, 30]));
    let (da, db) = (digest_of(&a), digest_of(&b));
    let mut reg = Registry::start(&dir.join("registry"));
    let image = format!("oci://{}/mcow/vm:v1", reg.host());
    push_json(dir, &["d", &image, "--trace", a.to_str().unwrap()]);
    let old: Value = serde_json::from_str(&reg.manifest("mcow/vm", "v1")).unwrap();
    push_json(dir, &["d", &image, "--trace", b.to_str().unwrap()]);
    let live: Value = serde_json::from_str(&reg.manifest("mcow/vm", "v1")).unwrap();
    let old_config = old["config"]["digest"].as_str().unwrap();
    let config = live["config"]["digest"].as_str().unwrap();
    assert_ne!(old_config, config, "the config names the trace, so it changed");

    reg.stop();
    let dry = reg.garbage_collect(&["--dry-run", "--delete-untagged"]);
    let eligible = |d: &str| dry.contains(&format!("blob eligible for deletion: {d}"));
    assert!(dry.contains(&format!("marking blob {db}")), "trace B not marked:\n{dry}");
    assert!(eligible(&da) && eligible(old_config), "the old trace and config are garbage:\n{dry}");
    assert!(!eligible(&db) && !eligible(config), "the live trace or config would be deleted:\n{dry}");
    for l in live["layers"].as_array().unwrap() {
        assert!(!eligible(l["digest"].as_str().unwrap()), "a live blob would be deleted:\n{dry}");
    }
    reg.garbage_collect(&["--delete-untagged"]);
    assert!(!reg.blob_file(&da).exists(), "trace A was not collected");
    assert!(reg.blob_file(&db).exists(), "trace B was collected");
    reg.restart();

    let (log, disk) = serve_until_prefetched(dir, "cache", &image);
    assert!(log.contains("blocks=2"), "{log}");
    assert_eq!(local_bytes(dir, &disk), 2 * 65536, "local bytes after the prefetch");
}

/// Tried: push with a trace to a `file://` layout, then delete the trace blob from the layout
/// (what a copy without it or a collected blob leaves), and pull the image (in full and
/// lazily) and serve it lazily with exact fetches, reading one block.
/// Must hold: each pull and the serve succeed with a warning naming the missing trace; no
/// trace.json is written; the serve prefetches nothing (only the block read is local) and the
/// block read has the disk's bytes.
#[test]
fn a_missing_trace_blob_degrades_to_no_prefetch_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    two_layer_disk(dir);
    let trace = write_trace(dir, "boot.trace", &[40, 3, 10, 11]);
    let image = format!("file://{}:v1", dir.join("images").display());
    mcow_ok(dir, &["push", "d", &image, "--trace", trace.to_str().unwrap()]);
    let d = digest_of(&trace);
    std::fs::remove_file(dir.join("images/blobs/sha256").join(d.strip_prefix("sha256:").unwrap())).unwrap();
    let warned = |text: &str| text.contains("warning") && text.contains(&d) && text.contains("missing");

    for (pulled, lazy) in [("full", false), ("lazy", true)] {
        let mut args = vec!["pull", &image, pulled];
        if lazy {
            args.insert(1, "--lazy");
        }
        let r = mcow_in(dir, &args);
        assert_eq!(r.code, 0, "pull {args:?} failed:\n{}", r.stderr);
        assert!(warned(&r.stderr), "pull {args:?} did not warn:\n{}", r.stderr);
        assert!(!dir.join(pulled).join("trace.json").exists());
    }

    let srv = Serve::start_env(
        dir,
        &["--cache", "cache", "--fetch-window", "1", "--readahead", "0", &format!("vm={image}")],
        &[("RUST_LOG", "info")],
    );
    // Block 20 (1.25 MiB) is the second layer's 0x22.
    let out = tool_ok(
        "qemu-io",
        dir,
        &["-f", "raw", "-r", "-c", "read -P 0x22 1310720 65536", &srv.unix_uri("vm")],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let log = srv.stop_with_log();
    assert!(warned(&log), "serve did not warn:\n{log}");
    assert!(!log.contains("prefetched the trace"), "{log}");
    let disk = cached_disk(&dir.join("cache"));
    assert!(!disk.join("trace.json").exists());
    assert_eq!(local_bytes(dir, &disk), 65536, "only the block read is local");
}

/// Tried: an image as pushed before traces were listed in the manifest, made by hand: push with
/// a trace to a `file://` layout, take the trace entry out of the manifest's `layers` (the
/// config, which names the trace, unchanged) and point the tag at the rewritten manifest.
/// Must hold: it serves lazily with no warning and prefetches exactly the trace's 4 blocks.
#[test]
fn an_image_with_its_trace_in_the_config_only_still_prefetches() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    two_layer_disk(dir);
    let trace = write_trace(dir, "boot.trace", &[40, 3, 10, 11]);
    let images = dir.join("images");
    let image = format!("file://{}:v1", images.display());
    let digest = push_json(dir, &["d", &image, "--trace", trace.to_str().unwrap()]);

    let blob = |d: &str| images.join("blobs/sha256").join(d.strip_prefix("sha256:").unwrap());
    let mut m: Value = serde_json::from_slice(&std::fs::read(blob(&digest)).unwrap()).unwrap();
    let entry = m["layers"].as_array_mut().unwrap().pop().unwrap();
    assert_eq!(entry["mediaType"], TRACE_MEDIA_TYPE);
    let config: Value =
        serde_json::from_slice(&std::fs::read(blob(m["config"]["digest"].as_str().unwrap())).unwrap())
            .unwrap();
    assert_eq!(config["trace"]["digest"], entry["digest"], "the config names the trace");
    let bytes = serde_json::to_vec(&m).unwrap();
    let old_digest = Digest::of(&bytes);
    let old_style = old_digest.to_string();
    std::fs::write(blob(&old_style), &bytes).unwrap();
    let mut index: Value =
        serde_json::from_slice(&std::fs::read(images.join("index.json")).unwrap()).unwrap();
    let tagged = &mut index["manifests"][0];
    assert_eq!(tagged["digest"], digest.as_str());
    tagged["digest"] = Value::from(old_style.clone());
    tagged["size"] = Value::from(bytes.len());
    std::fs::write(images.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();

    let (log, disk) = serve_until_prefetched(dir, "cache", &image);
    assert!(log.contains("blocks=4"), "{log}");
    assert!(!log.contains("warning"), "{log}");
    let name = disk.file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.ends_with(&old_digest.short()), "not the hand-made manifest: {name}");
    assert_eq!(local_bytes(dir, &disk), 4 * 65536, "local bytes after the prefetch");
}
