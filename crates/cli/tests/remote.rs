//! `mcow push`, `mcow pull` (in full and lazily), lazy disks under the other verbs, and
//! `mcow serve` of lazy disks and of references, all with the `file://` backend (no servers).
//! NBD clients (nbdcopy, qemu-io) must be installed: a missing one fails the test.

mod common;
#[path = "common/nbd.rs"]
mod nbd;

use std::path::Path;

use common::*;
use nbd::*;
use serde_json::Value;

const SIZE: u64 = 8 * MIB;

/// Writes BYTE over [off, off+len) of disk `d`, and into `model`.
fn put(dir: &Path, d: &str, model: &mut [u8], off: u64, byte: u8, len: u64) {
    mcow_ok(dir, &["write", d, &off.to_string(), "--pattern", &format!("{byte:#x}"), &len.to_string()]);
    model[off as usize..(off + len) as usize].fill(byte);
}

/// An 8 MiB disk `d` with three sealed layers (unaligned edges, overlaps) and an empty top.
/// Returns its content.
fn three_layer_disk(dir: &Path, d: &str) -> Vec<u8> {
    let mut m = vec![0u8; SIZE as usize];
    mcow_ok(dir, &["create", d, "-s", "8M"]);
    put(dir, d, &mut m, 0, 0x11, MIB);
    put(dir, d, &mut m, 3 * MIB + 100, 0x12, 300_000);
    mcow_ok(dir, &["seal", d]);
    put(dir, d, &mut m, 512 * 1024, 0x21, MIB);
    put(dir, d, &mut m, 5 * MIB + 777, 0x22, 100_000);
    mcow_ok(dir, &["seal", d]);
    put(dir, d, &mut m, 6 * MIB, 0x31, 2 * MIB);
    mcow_ok(dir, &["seal", d]);
    m
}

fn json(dir: &Path, args: &[&str]) -> Value {
    let r = mcow_in(dir, args);
    assert!(
        r.code == 0 || args[0] == "check",
        "mcow {args:?} failed ({}):\n{}{}",
        r.code,
        r.stdout,
        r.stderr
    );
    r.json()
}

fn layers(info: &Value) -> &Vec<Value> {
    info["layers"].as_array().unwrap()
}

/// The `bytes_fetched` of the exit line `mcow serve` logs for `export` (RUST_LOG=info).
fn served_bytes_fetched(log: &str, export: &str) -> u64 {
    let line = log
        .lines()
        .find(|l| l.contains("served; fetched from the origin") && l.contains(&format!("export={export} ")))
        .unwrap_or_else(|| panic!("no exit line for export {export} in the serve log:\n{log}"));
    let v = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("bytes_fetched="))
        .unwrap_or_else(|| panic!("no bytes_fetched in {line:?}"));
    v.parse().unwrap_or_else(|e| panic!("bad bytes_fetched in {line:?}: {e}"))
}

/// `read -P` commands that check every byte of `model` (one per run of equal bytes).
fn verify_cmds(model: &[u8]) -> Vec<String> {
    let mut cmds = Vec::new();
    let mut start = 0;
    while start < model.len() {
        let b = model[start];
        let mut end = start;
        while end < model.len() && model[end] == b {
            end += 1;
        }
        cmds.push(format!("read -P {b:#x} {start} {}", end - start));
        start = end;
    }
    cmds
}

fn qemu_io_ok(uri: &str, cmds: &[String]) {
    let mut args: Vec<&str> = vec!["-f", "raw", "-r"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    let r = tool_run("qemu-io", Path::new("/"), &args);
    let all = format!("{}{}", r.stdout, r.stderr);
    assert!(
        r.code == 0
            && !all.contains("failed")
            && !all.contains("can't")
            && !all.contains("Pattern verification"),
        "qemu-io on {uri} failed ({}):\n{all}",
        r.code
    );
}

/// Push a 3-layer disk, pull it in full and lazily; the lazy disk works with info, check,
/// map, read and serve (nbdcopy), fetches only what is read, and ends up all local.
#[test]
fn push_pull_lazy_and_serve() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let model = three_layer_disk(dir, "d");
    assert!(export_bytes(dir, "d") == model);
    // Data in the top is not pushed, and push says so.
    mcow_ok(dir, &["write", "d", "0", "--pattern", "0x77", "4096"]);
    let reference = format!("file://{}/repo:v1", dir.display());
    let r = mcow_in(dir, &["push", "d", &reference, "--output", "json"]);
    assert_eq!(r.code, 0, "push failed:\n{}", r.stderr);
    assert!(r.stderr.contains("warning") && r.stderr.contains("not pushed"), "no top warning:\n{}", r.stderr);
    let p = r.json();
    assert_eq!(
        (p["layers"].as_u64(), p["uploaded"].as_u64(), p["already_there"].as_u64()),
        (Some(3), Some(3), Some(0))
    );
    assert!(p["bytes_uploaded"].as_u64().unwrap() > 3 * MIB);
    let manifest = p["manifest_digest"].as_str().unwrap().to_string();
    // A second push uploads nothing and gives the same manifest.
    let out = mcow_ok(dir, &["push", "-q", "d", &reference]);
    assert!(out.contains(&manifest), "{out}");
    assert!(out.contains("3 layers, 0 uploaded (0 B, 0 bytes), 3 already there"), "{out}");

    // In full: same content.
    let full = json(dir, &["pull", &reference, "full/d", "--output", "json"]);
    assert_eq!(full["manifest_digest"].as_str(), Some(manifest.as_str()));
    assert!(full["bytes_fetched"].as_u64().unwrap() > 3 * MIB);
    assert!(export_bytes(dir, "full/d") == model, "full pull differs from the original");
    assert!(!dir.join("full/d/remote.json").exists());
    let r = mcow_in(dir, &["pull", &reference, "full/d"]);
    assert_ne!(r.code, 0, "pull into an existing disk must fail");

    // Lazily: headers and indexes only.
    let lazy = json(dir, &["pull", &reference, "lazy/d", "--lazy", "--output", "json"]);
    assert_eq!(lazy["manifest_digest"].as_str(), Some(manifest.as_str()));
    let pulled = lazy["bytes_fetched"].as_u64().unwrap();
    assert!(pulled > 0 && pulled < 64 * 1024, "lazy pull fetched {pulled} bytes");
    let info = json(dir, &["info", "lazy/d", "--output", "json"]);
    assert_eq!(info["origin"].as_str(), Some(reference.as_str()));
    assert_eq!(info["origin_manifest"].as_str(), Some(manifest.as_str()));
    assert_eq!(layers(&info).len(), 3);
    for l in layers(&info) {
        assert_eq!(l["partial"], Value::Bool(true), "{l}");
        assert_eq!(l["local_bytes"].as_u64(), Some(0), "{l}");
        assert!(l["data_bytes"].as_u64().unwrap() > 0, "{l}");
    }
    let human = mcow_ok(dir, &["info", "lazy/d"]);
    assert!(human.contains("origin: file://") && human.contains("partial: 0 B of"), "{human}");
    // A full disk's info says nothing partial.
    let finfo = json(dir, &["info", "full/d", "--output", "json"]);
    assert!(finfo["origin"].is_null());
    for l in layers(&finfo) {
        assert_eq!(l["partial"], Value::Bool(false));
        assert_eq!(l["local_bytes"], l["data_bytes"]);
    }
    // check: partial, not corrupt; fetches nothing.
    let c = json(dir, &["check", "lazy/d", "--output", "json"]);
    assert_eq!(c["result"].as_str(), Some("clean"), "{c}");
    let partial = c["partial_layers"].as_array().unwrap();
    assert_eq!(partial.len(), 3);
    assert!(partial.iter().all(|p| p["blocks_local"].as_u64() == Some(0)), "{c}");
    let human = mcow_ok(dir, &["check", "lazy/d"]);
    assert!(human.contains("Partial layer sha256:") && human.contains(": 0 of "), "{human}");
    // map needs no data.
    let map = json(dir, &["map", "lazy/d", "--output", "json"]);
    assert!(map.as_array().unwrap().iter().any(|e| e["data"] == Value::Bool(true)));
    assert!(
        json(dir, &["info", "lazy/d", "--output", "json"])["layers"][0]["local_bytes"].as_u64() == Some(0)
    );
    // read fetches a little (one window at most per layer touched).
    let out = mcow_ok(dir, &["read", "lazy/d", "0", "16", "--raw"]);
    assert_eq!(out.as_bytes(), &[0x11u8; 16]);
    let info = json(dir, &["info", "lazy/d", "--output", "json"]);
    let local: u64 = layers(&info).iter().map(|l| l["local_bytes"].as_u64().unwrap()).sum();
    assert!(local > 0 && local <= 4 * 65536, "read of 16 bytes made {local} bytes local");

    // Serve the lazy disk and read all of it.
    let srv = Serve::start_env(dir, &["-r", "lazy/d"], &[("RUST_LOG", "info")]);
    tool_ok("nbdcopy", dir, &[&srv.unix_uri("d"), "copy.raw"]);
    let log = srv.stop_with_log();
    assert!(std::fs::read(dir.join("copy.raw")).unwrap() == model, "served lazy disk differs");
    let fetched = served_bytes_fetched(&log, "d");
    let data: u64 = layers(&info).iter().map(|l| l["data_bytes"].as_u64().unwrap()).sum();
    assert!(fetched > 0 && fetched + local <= data, "fetched {fetched}, {local} were local, data {data}");
    // Now everything the disk shows is local: all of the upper layers; of the bottom layer, all
    // but the 8 blocks the middle layer hides (512 KiB..1 MiB), which no read needs.
    let info = json(dir, &["info", "lazy/d", "--output", "json"]);
    for (i, l) in layers(&info).iter().enumerate() {
        let hidden = if i == 0 { 8 * 65536 } else { 0 };
        assert_eq!(l["local_bytes"].as_u64().unwrap() + hidden, l["data_bytes"].as_u64().unwrap(), "{l}");
    }
    assert_eq!(fetched + local, data - 8 * 65536, "fetched more than the disk shows");
    let c = json(dir, &["check", "lazy/d", "--output", "json"]);
    assert_eq!(c["result"].as_str(), Some("clean"), "{c}");
    for (i, p) in c["partial_layers"].as_array().unwrap().iter().enumerate() {
        let hidden = if i == 0 { 8 } else { 0 };
        assert_eq!(p["blocks_local"].as_u64().unwrap() + hidden, p["blocks_total"].as_u64().unwrap(), "{c}");
    }
    // Serving again fetches nothing.
    let srv = Serve::start_env(dir, &["-r", "lazy/d"], &[("RUST_LOG", "info")]);
    tool_ok("nbdcopy", dir, &[&srv.unix_uri("d"), "copy2.raw"]);
    let log = srv.stop_with_log();
    assert!(std::fs::read(dir.join("copy2.raw")).unwrap() == model);
    assert_eq!(served_bytes_fetched(&log, "d"), 0, "{log}");
}

/// Writes, seal and commit on a lazy disk fetch what they need.
/// Tried: `push --compress` of a 3-layer disk (as JSON, then again in human form), a level out
/// of range, then pulls of the compressed image in full and lazily. Must hold: the push reports
/// the level, the layers' size and blobs a small part of it, and uploads exactly the blobs;
/// the second push uploads nothing (same manifest) and prints the compressed size and ratio;
/// `--compress=0` is refused naming the range; the full pull makes the same layers (digests in
/// `info`) and content, the lazy one starts with no data local and exports the same content.
#[test]
fn push_compressed_then_pull_in_full_and_lazily() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let model = three_layer_disk(dir, "d");
    let reference = format!("file://{}/repo:z", dir.display());
    let p = json(dir, &["push", "d", &reference, "--compress", "--output", "json"]);
    assert_eq!((p["compress"].as_i64(), p["uploaded"].as_u64()), (Some(3), Some(3)));
    let (layer_bytes, blob_bytes) = (p["layer_bytes"].as_u64().unwrap(), p["blob_bytes"].as_u64().unwrap());
    assert!(layer_bytes > 3 * MIB && blob_bytes * 10 < layer_bytes, "{p}");
    assert_eq!(p["bytes_uploaded"].as_u64(), Some(blob_bytes));
    let manifest = p["manifest_digest"].as_str().unwrap().to_string();
    let out = mcow_ok(dir, &["push", "-q", "d", &reference, "--compress=3"]);
    assert!(out.contains(&manifest) && out.contains("3 layers, 0 uploaded"), "{out}");
    assert!(out.contains("compressed (zstd level 3): layers") && out.contains("% of the size"), "{out}");
    let r = mcow_in(dir, &["push", "d", &reference, "--compress=0"]);
    assert!(r.code != 0 && r.stderr.contains("1..=19"), "{}{}", r.stdout, r.stderr);

    let digests = |info: &Value| -> Vec<String> {
        layers(info).iter().map(|l| l["digest"].as_str().unwrap().to_string()).collect()
    };
    let full = json(dir, &["pull", &reference, "full/d", "--output", "json"]);
    assert_eq!(full["bytes_fetched"].as_u64(), Some(blob_bytes));
    let src = json(dir, &["info", "d", "--output", "json"]);
    assert_eq!(digests(&json(dir, &["info", "full/d", "--output", "json"])), digests(&src));
    assert!(export_bytes(dir, "full/d") == model, "full pull differs from the original");

    json(dir, &["pull", &reference, "lazy/d", "--lazy", "--output", "json"]);
    let info = json(dir, &["info", "lazy/d", "--output", "json"]);
    assert_eq!(digests(&info), digests(&src));
    assert!(layers(&info).iter().all(|l| l["local_bytes"].as_u64() == Some(0)), "{info}");
    assert!(export_bytes(dir, "lazy/d") == model, "lazy pull differs from the original");
}

#[test]
fn lazy_disk_write_seal_commit() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let mut model = three_layer_disk(dir, "d");
    let original = model.clone();
    let reference = format!("file://{}/repo", dir.display());
    mcow_ok(dir, &["push", "d", &reference]);
    mcow_ok(dir, &["pull", "--lazy", &reference, "lazy/d"]);
    // A sub-block write over a partial layer's data copies the block up (fetching it).
    put(dir, "lazy/d", &mut model, MIB - 100, 0x99, 200);
    let sealed = mcow_ok(dir, &["seal", "lazy/d"]);
    assert!(sealed.trim().starts_with("sha256:"));
    assert!(export_bytes(dir, "lazy/d") == model);
    let info = json(dir, &["info", "lazy/d", "--output", "json"]);
    assert_eq!(layers(&info).len(), 4);
    assert_eq!(layers(&info)[3]["partial"], Value::Bool(false), "the new layer is complete");
    // Merging the new layer with a partial one fetches the partial one's blocks.
    mcow_ok(dir, &["commit", "-n", "2", "lazy/d"]);
    let info = json(dir, &["info", "lazy/d", "--output", "json"]);
    assert_eq!(layers(&info).len(), 3);
    assert!(export_bytes(dir, "lazy/d") == model);
    let c = json(dir, &["check", "lazy/d", "--output", "json"]);
    assert_eq!(c["result"].as_str(), Some("clean"), "{c}");
    assert_eq!(c["partial_layers"].as_array().unwrap().len(), 2, "{c}");
    // A disk created on a lazy disk's layers fetches from the same origin.
    mcow_ok(dir, &["pull", "--lazy", &reference, "lazy2/d"]);
    mcow_ok(dir, &["create", "--from", "lazy2/d", "lazy2/e"]);
    assert!(dir.join("lazy2/e/remote.json").exists());
    assert!(export_bytes(dir, "lazy2/e") == original);
    // Push refuses a disk whose layers are not all local.
    let r = mcow_in(dir, &["push", "lazy/d", &format!("file://{}/other", dir.display())]);
    assert_ne!(r.code, 0, "push of a partial disk succeeded:\n{}", r.stdout);
}

/// `mcow serve REF` pulls lazily into --cache and serves; qemu-io and nbdcopy read it right; a
/// second serve of the same REF from the same cache reuses the disk and fetches nothing; a
/// lazy pull into the cache's store finds every layer there.
#[test]
fn serve_reference_from_cache() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let model = three_layer_disk(dir, "d");
    let reference = format!("file://{}/images/vm:v1", dir.display());
    let manifest = json(dir, &["push", "d", &reference, "--output", "json"])["manifest_digest"]
        .as_str()
        .unwrap()
        .to_string();
    let short = &manifest["sha256:".len().."sha256:".len() + 12];

    let srv = Serve::start_env(dir, &["-r", "--cache", "cache", &reference], &[("RUST_LOG", "info")]);
    // Export named after the repository.
    qemu_io_ok(&srv.unix_uri("vm"), &verify_cmds(&model));
    tool_ok("nbdcopy", dir, &[&srv.tcp_uri("vm"), "copy.raw"]);
    let log = srv.stop_with_log();
    assert!(std::fs::read(dir.join("copy.raw")).unwrap() == model, "served image differs");
    assert!(log.contains("pulled lazily into the cache"), "{log}");
    let first = served_bytes_fetched(&log, "vm");
    assert!(first > 3 * MIB, "first serve fetched only {first} bytes:\n{log}");
    let disk = dir.join("cache/disks").join(format!("vm-{short}"));
    assert!(disk.join("disk.json").exists(), "no cached disk at {}", disk.display());
    assert!(dir.join("cache/layers/partial/sha256").is_dir());

    // Again, with a name: nothing is fetched.
    let srv = Serve::start_env(
        dir,
        &["-r", "--cache", "cache", &format!("again={reference}")],
        &[("RUST_LOG", "info")],
    );
    tool_ok("nbdcopy", dir, &[&srv.unix_uri("again"), "copy2.raw"]);
    let log = srv.stop_with_log();
    assert!(std::fs::read(dir.join("copy2.raw")).unwrap() == model);
    assert!(log.contains("reusing the cached disk"), "{log}");
    assert_eq!(served_bytes_fetched(&log, "again"), 0, "{log}");
    assert_eq!(std::fs::read_dir(dir.join("cache/disks")).unwrap().count(), 1);

    // Writable serve keeps its top across serves.
    let srv = Serve::start(dir, &["--cache", "cache", &reference]);
    let r = tool_run(
        "qemu-io",
        Path::new("/"),
        &["-f", "raw", "-c", "write -P 0x5a 4096 4096", &srv.unix_uri("vm")],
    );
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    srv.stop();
    let srv = Serve::start(dir, &["-r", "--cache", "cache", &reference]);
    qemu_io_ok(&srv.unix_uri("vm"), &["read -P 0x5a 4096 4096".to_string()]);
    srv.stop();

    // The cache's store has every layer: a lazy pull into it fetches no layer.
    let p =
        json(dir, &["pull", "--lazy", "--store", "cache/layers", &reference, "other", "--output", "json"]);
    assert_eq!(p["layers_local"].as_u64(), Some(3), "{p}");
    assert_eq!(p["bytes_fetched"].as_u64(), Some(0), "{p}");
    assert!(export_bytes(dir, "other") == model);
}
