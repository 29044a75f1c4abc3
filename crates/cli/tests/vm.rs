//! Deploying to a VM, end to end: a base layer (ext4 with busybox) and two software layers built
//! with scripts/build-layer.sh, pushed to a real OCI registry (docker-registry on loopback), then
//! served lazily from an empty cache by `mcow serve REF` and booted by QEMU (TCG) with a Debian
//! cloud kernel and a busybox initramfs (scripts/vm-assets.sh). The guest runs the top layer's
//! program, checks a file it ships and writes a file. Then 4 VMs boot at once from one serve
//! process on one cache, and the registry serves each block once.
//!
//! Every external command runs under `timeout`; servers are stopped and mounts undone by guards.
//! Missing tools fail the test with the package to install (never skip).

mod common;
#[path = "common/nbd.rs"]
mod nbd;
#[path = "common/registry.rs"]
mod registry;
#[path = "common/vm.rs"]
mod vmh;

use std::path::Path;

use common::*;
use nbd::*;
use registry::Registry;
use serde_json::Value;
use vmh::*;

fn info(cwd: &Path, disk: &Path) -> Value {
    let r = mcow_in(cwd, &["info", disk.to_str().unwrap(), "--output", "json"]);
    assert_eq!(r.code, 0, "mcow info {}: {}", disk.display(), r.stderr);
    r.json()
}

fn layer_digests(v: &Value) -> Vec<String> {
    v["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap().to_string()).collect()
}

/// Bytes of each sealed layer's blocks that are local in the cache (bottom first).
fn local_bytes(v: &Value) -> u64 {
    v["layers"].as_array().unwrap().iter().map(|l| l["local_bytes"].as_u64().unwrap()).sum()
}

/// The content of `path` in the ext4 filesystem of `disk` (exported to a raw file), or `None`.
fn file_in_disk(cwd: &Path, disk: &Path, path: &str) -> Option<String> {
    require("debugfs");
    let raw = cwd.join("probe.raw");
    mcow_ok(cwd, &["export", disk.to_str().unwrap(), raw.to_str().unwrap()]);
    let r = tool_run("debugfs", cwd, &["-R", &format!("cat {path}"), raw.to_str().unwrap()]);
    std::fs::remove_file(&raw).unwrap();
    let exists = !r.stderr.contains("File not found");
    exists.then_some(r.stdout)
}

/// The disk directory `serve REF` made in a cache.
fn cache_disk(cache: &Path) -> std::path::PathBuf {
    let mut disks: Vec<_> =
        std::fs::read_dir(cache.join("disks")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(disks.len(), 1, "one cached disk expected in {}: {disks:?}", cache.display());
    disks.pop().unwrap()
}

#[test]
fn build_push_boot_lazily_and_many_vms_on_one_cache() {
    for t in
        ["qemu-system-x86_64", "docker-registry", "nbdfuse", "mkfs.ext4", "debugfs", "losetup", "mountpoint"]
    {
        require(t);
    }
    let assets = assets();
    let t = tempfile::Builder::new().prefix("mcow-vm").tempdir_in("/tmp").unwrap();
    let w = t.path();
    let img = w.join("img");

    // 1. Build: base (mkfs.ext4 -d + import), app1 and app2 with scripts/build-layer.sh.
    script_ok("demo-vm.sh", &["build", img.to_str().unwrap()], 600);
    let app2 = img.join("app2");
    let built = info(w, &app2);
    let bs = built["block_size"].as_u64().unwrap();
    let size = built["virtual_size"].as_u64().unwrap();
    let layers = built["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3, "base + app1 + app2");
    // Software layers hold about what they add (3 MiB and 2 MiB of files) plus metadata, not
    // the 256 MiB disk.
    for (layer, added, what) in [(&layers[1], 3 * MIB, "app1"), (&layers[2], 2 * MIB, "app2")] {
        let stored = layer["stored_blocks"].as_u64().unwrap() * bs;
        assert!(
            stored >= added && stored <= added + 2 * MIB,
            "layer {what} stores {stored} bytes for {added} bytes of files (disk {size})"
        );
    }
    let sha = sha256_file(&img.join("src/app2/opt/app2/share/data.bin"));

    // 2. Push to a registry.
    let reg = Registry::start(&w.join("registry"));
    let reference = format!("oci://127.0.0.1:{}/mcow/vm:v1", reg.port);
    mcow_ok(w, &["push", app2.to_str().unwrap(), &reference]);
    let manifest = reg.manifest("mcow/vm", "v1");

    // 3. A fresh host: serve the image from an empty cache and boot one VM from it.
    let c1 = w.join("cache1");
    let c1s = c1.to_str().unwrap();
    let serve = Serve::start_env(w, &["--cache", c1s, &format!("vm={reference}")], &[("RUST_LOG", "info")]);
    let console = boot(&assets, &serve.sock, "vm", 1);
    let log = serve.stop_with_log();
    assert_booted(&console, 1, &sha);
    let (f1, r1) = fetched(&log, "vm");
    let cd = cache_disk(&c1);
    let cached = info(w, &cd);
    assert!(f1 > 0 && f1 < size / 4, "one boot fetched {f1} bytes of a {size}-byte image");
    assert_eq!(local_bytes(&cached), f1, "every fetched block is kept, none fetched twice");
    // The write is in the cache disk's own top; its sealed layers are the pushed ones.
    assert!(cached["top"]["stored_blocks"].as_u64().unwrap() > 0, "the guest's writes are in the top");
    assert_eq!(layer_digests(&cached), layer_digests(&built));
    assert_eq!(file_in_disk(w, &cd, "/vm-wrote.txt").as_deref(), Some("written by vm 1\n"));
    // ... and nowhere else: not in the image that was pushed, not in the registry.
    assert_eq!(file_in_disk(w, &app2, "/vm-wrote.txt"), None);
    assert_eq!(info(w, &app2)["top"]["stored_blocks"].as_u64(), Some(0));
    assert_eq!(reg.manifest("mcow/vm", "v1"), manifest, "the registry's manifest changed");
    let full = w.join("repull");
    mcow_ok(w, &["pull", &reference, full.to_str().unwrap()]);
    mcow_ok(w, &["check", full.to_str().unwrap()]);
    assert_eq!(layer_digests(&info(w, &full)), layer_digests(&built));
    assert_eq!(file_in_disk(w, &full, "/vm-wrote.txt"), None);

    // 4. Four VMs at once: one cache, one serve process, each VM with its own top.
    let c4 = w.join("cache4");
    let c4s = c4.to_str().unwrap();
    Serve::start(w, &["--cache", c4s, &format!("vm={reference}")]).stop(); // headers + indexes only
    let cd4 = cache_disk(&c4);
    let mut args = Vec::new();
    for i in 1..=4 {
        let d = c4.join(format!("vms/vm{i}"));
        mcow_ok(w, &["create", "--from", cd4.to_str().unwrap(), d.to_str().unwrap()]);
        args.push(format!("vm{i}={}", d.display()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let serve = Serve::start_env(w, &args, &[("RUST_LOG", "info")]);
    let consoles: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = (1..=4u32)
            .map(|i| {
                let (a, sock) = (&assets, &serve.sock);
                s.spawn(move || boot(a, sock, &format!("vm{i}"), i))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let log = serve.stop_with_log();
    for (i, c) in consoles.iter().enumerate() {
        assert_booted(c, i as u32 + 1, &sha);
    }
    eprintln!(
        "fetched from the registry: 1 VM {f1} bytes ({r1} requests), 4 VMs {f4} bytes ({r4} requests)",
        f4 = fetched(&log, "vm1").0,
        r4 = fetched(&log, "vm1").1
    );
    // Disks on one origin share one source: every export reports the same total.
    let (f4, r4) = fetched(&log, "vm1");
    for i in 2..=4 {
        assert_eq!(fetched(&log, &format!("vm{i}")), (f4, r4));
    }
    // Each block once: what was fetched is exactly what the cache holds, and about what one VM
    // booting alone fetched (the boots read the same blocks; when they overlap, read-ahead can
    // take a few more blocks ahead of them).
    assert_eq!(local_bytes(&info(w, &cd4)), f4, "a block was fetched more than once:\n{log}");
    assert!(f4 <= f1 + f1 / 8, "4 VMs fetched {f4} bytes ({r4} requests), 1 VM {f1} ({r1} requests)");
    assert!(f4 + 4 * bs >= f1, "4 VMs fetched {f4} bytes ({r4} requests), 1 VM {f1} ({r1} requests)");
    assert_eq!(info(w, &cd4)["top"]["stored_blocks"].as_u64(), Some(0), "VM writes leaked into the base");
    for i in 1..=4 {
        let d = c4.join(format!("vms/vm{i}"));
        assert!(info(w, &d)["top"]["stored_blocks"].as_u64().unwrap() > 0);
        assert_eq!(file_in_disk(w, &d, "/vm-wrote.txt"), Some(format!("written by vm {i}\n")));
    }
    assert_eq!(reg.manifest("mcow/vm", "v1"), manifest);

    // 5. A boot trace: record one boot (`mcow trace` on a disk made on the built layers), push
    // the image again with it, and boot a fresh host from that image. Its serve fetches the
    // traced blocks in the background, exactly (no neighbours), and the boot finds them there.
    let traced = w.join("traced");
    mcow_ok(w, &["create", "--from", app2.to_str().unwrap(), traced.to_str().unwrap()]);
    let trace = w.join("boot.trace");
    let tracer =
        Serve::start_verb(w, "trace", &[traced.to_str().unwrap(), "--out", trace.to_str().unwrap()], &[]);
    let console = boot(&assets, &tracer.sock, "traced", 5);
    tracer.stop();
    assert_booted(&console, 5, &sha);
    let blocks: Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
    let traced_blocks = blocks["blocks"].as_array().unwrap().len();
    assert!(traced_blocks > 0, "an empty trace");
    let with_trace = format!("oci://127.0.0.1:{}/mcow/vm:traced", reg.port);
    mcow_ok(w, &["push", app2.to_str().unwrap(), &with_trace, "--trace", trace.to_str().unwrap()]);
    let ct = w.join("cache-traced");
    let serve = Serve::start_env(
        w,
        &["--cache", ct.to_str().unwrap(), &format!("vm={with_trace}")],
        &[("RUST_LOG", "info")],
    );
    let console = boot(&assets, &serve.sock, "vm", 6);
    let log = serve.stop_with_log();
    assert_booted(&console, 6, &sha);
    let line = log
        .lines()
        .find(|l| l.contains("prefetched the trace"))
        .unwrap_or_else(|| panic!("no prefetch:\n{log}"));
    assert!(
        line.contains(&format!(" blocks={traced_blocks}")),
        "not every traced block was prefetched: {line}"
    );
    let (ft, rt) = fetched(&log, "vm");
    eprintln!("with the trace: {ft} bytes in {rt} requests (without: {f1} bytes in {r1} requests)");
    assert_eq!(local_bytes(&info(w, &cache_disk(&ct))), ft, "a block was fetched twice");
    // The prefetch asks for each layer's traced blocks in one request (the registry answers
    // several ranges at once), so far fewer requests than reads would make.
    assert!(rt < r1, "the traced boot made {rt} requests, the untraced one {r1}");
    // The traced blocks, and at most one window besides (reads that ran ahead of the prefetch).
    assert!(
        ft <= (traced_blocks as u64 + 4) * bs,
        "the traced boot fetched {ft} bytes for a trace of {traced_blocks} blocks (untraced: {f1})"
    );
}
