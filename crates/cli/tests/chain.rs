//! Migration from qcow2 backing chains through real qemu-img and qemu-io: `import --chain` (one
//! layer per image), `export --chain` (one qcow2 per layer), bad chains refused with nothing left
//! behind, failed exports leaving no output, and export's single progress display.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

/// A 32 MiB chain of 4 qcow2 images (64 KiB clusters), bottom to top base, mid1, mid2, top:
/// - base: 0x11 over 0..8M, 0x12 over 16M..20M;
/// - mid1: 0x21 over 4M..8M (over base's data), 0x22 over 24M..25M (new);
/// - mid2: zeros written over 0..2M (zero clusters hiding base's data), 0x31 over 6M..7M (over
///   mid1's), 17M..18M discarded (a zero cluster too: it has a backing file);
/// - top: 0x41 over 1M..1.5M (over mid2's zeros), 0x42 over 30M..30M+64K, 0x43 over 16M..16.5M.
fn make_chain(dir: &Path) {
    let io = |img: &str, cmds: &[&str]| {
        let mut args = vec!["-f", "qcow2"];
        for c in cmds {
            args.extend(["-c", c]);
        }
        args.push(img);
        qemu_ok("qemu-io", dir, &args);
    };
    qemu_ok("qemu-img", dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "32M"]);
    io("base.qcow2", &["write -P 0x11 0 8M", "write -P 0x12 16M 4M"]);
    qemu_ok(
        "qemu-img",
        dir,
        &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid1.qcow2"],
    );
    io("mid1.qcow2", &["write -P 0x21 4M 4M", "write -P 0x22 24M 1M"]);
    qemu_ok(
        "qemu-img",
        dir,
        &["create", "-q", "-f", "qcow2", "-b", "mid1.qcow2", "-F", "qcow2", "mid2.qcow2"],
    );
    io("mid2.qcow2", &["write -z 0 2M", "write -P 0x31 6M 1M", "discard 17M 1M"]);
    qemu_ok(
        "qemu-img",
        dir,
        &["create", "-q", "-f", "qcow2", "-b", "mid2.qcow2", "-F", "qcow2", "top.qcow2"],
    );
    io("top.qcow2", &["write -P 0x41 1M 512K", "write -P 0x42 30M 64K", "write -P 0x43 16M 512K"]);
}

/// One range of a map: (start, end, depth, present, zero, data).
type Range = (u64, u64, u64, bool, bool, bool);

/// The ranges of a `map --output json` (qemu-img's or mcow's), neighbours with the same
/// depth and flags merged (qemu-img splits where host offsets are not contiguous).
fn ranges(json: &str) -> Vec<Range> {
    let v: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("not JSON ({e}): {json}"));
    let mut out: Vec<Range> = Vec::new();
    for e in v.as_array().unwrap() {
        let start = e["start"].as_u64().unwrap();
        let r = (
            start,
            start + e["length"].as_u64().unwrap(),
            e["depth"].as_u64().unwrap(),
            e["present"].as_bool().unwrap(),
            e["zero"].as_bool().unwrap(),
            e["data"].as_bool().unwrap(),
        );
        match out.last_mut() {
            Some(l) if l.1 == r.0 && (l.2, l.3, l.4, l.5) == (r.2, r.3, r.4, r.5) => l.1 = r.1,
            _ => out.push(r),
        }
    }
    out
}

/// The range of `map` holding byte `at`.
fn range_at(map: &[Range], at: u64) -> Range {
    *map.iter().find(|r| r.0 <= at && at < r.1).unwrap_or_else(|| panic!("no range holds {at}: {map:?}"))
}

/// `qemu-img map` of an image opened alone (without its backing file): what it holds itself,
/// depth dropped (always 0).
fn held_alone(dir: &Path, image: &str) -> Vec<(u64, u64, bool, bool, bool)> {
    let abs = dir.join(image);
    let spec = serde_json::json!({
        "driver": "qcow2",
        "file": {"driver": "file", "filename": abs.to_str().unwrap()},
        "backing": null,
    });
    let json = qemu_ok("qemu-img", dir, &["map", "--output=json", &format!("json:{spec}")]);
    let mut out: Vec<(u64, u64, bool, bool, bool)> = Vec::new();
    for r in ranges(&json) {
        match out.last_mut() {
            Some(l) if l.1 == r.0 && (l.2, l.3, l.4) == (r.3, r.4, r.5) => l.1 = r.1,
            _ => out.push((r.0, r.1, r.3, r.4, r.5)),
        }
    }
    out
}

/// Files and directories of `dir` whose names start with a dot (temporary files), and any
/// layer blobs of `dir/layers`.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut left: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    if let Ok(blobs) = std::fs::read_dir(dir.join("layers/blobs/sha256")) {
        left.extend(blobs.map(|e| format!("blob {}", e.unwrap().file_name().to_string_lossy())));
    }
    left
}

/// Tried: importing the 4-image chain with --chain, then exporting it as raw and as a chain.
/// Must hold: 4 sealed layers; for every range the original chain holds, `mcow map` names the
/// layer of the image qemu-img names (mcow depth d is qemu-img depth d-1: mcow's 0 is the
/// empty writable top) with the same zero/data flags, and ranges no image holds are not
/// present; the raw export and the exported chain's top read exactly as the original top; the
/// exported chain has 4 images, each backed by the one below by a relative name, each holding
/// exactly what the original image at its place holds alone (data, zero clusters,
/// unallocated); and qemu-img check finds no error in any of them.
#[test]
fn chain_import_and_export_keep_every_layer() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    make_chain(dir);
    let out = mcow_ok(dir, &["import", "--chain", "top.qcow2", "d"]);
    let digests: Vec<&str> = out.lines().filter(|l| l.starts_with("sha256:")).collect();
    assert_eq!(digests.len(), 4, "{out}");
    assert!(out.contains("disk d has 4 sealed layers"), "{out}");
    let info = mcow_in(dir, &["info", "d", "--output", "json"]).json();
    assert_eq!(info["layer_count"], 4);

    let qemu_map = ranges(&qemu_ok("qemu-img", dir, &["map", "--output=json", "top.qcow2"]));
    let mcow_map = ranges(&mcow_ok(dir, &["map", "d", "--output", "json"]));
    let mut cuts: Vec<u64> = qemu_map.iter().chain(&mcow_map).flat_map(|r| [r.0, r.1]).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut compared = 0;
    for w in cuts.windows(2) {
        let (q, m) = (range_at(&qemu_map, w[0]), range_at(&mcow_map, w[0]));
        if q.3 {
            assert_eq!(
                (m.2, m.3, m.4, m.5),
                (q.2 + 1, true, q.4, q.5),
                "at {:#x}: qemu {q:?}, mcow {m:?}",
                w[0]
            );
            compared += w[1] - w[0];
        } else {
            assert!(!m.3, "at {:#x} no image holds anything, but mcow has {m:?}", w[0]);
        }
    }
    // All four depths occur among the compared ranges, zeros of an upper image included.
    let depths: std::collections::BTreeSet<u64> = qemu_map.iter().filter(|r| r.3).map(|r| r.2).collect();
    assert_eq!(depths.into_iter().collect::<Vec<_>>(), vec![0, 1, 2, 3], "{qemu_map:?}");
    assert!(qemu_map.iter().any(|r| r.3 && r.4 && r.2 == 1), "mid2's zeros show: {qemu_map:?}");
    assert_eq!(compared, 8 * MIB + 4 * MIB + MIB + 64 * 1024, "{qemu_map:?}");

    mcow_ok(dir, &["export", "d", "d.raw"]);
    qemu_ok("qemu-img", dir, &["compare", "-f", "raw", "-F", "qcow2", "d.raw", "top.qcow2"]);

    let printed = mcow_ok(dir, &["export", "--chain", "d", "ex"]);
    assert_eq!(printed.trim(), "ex/layer-04.qcow2");
    let names: Vec<String> = {
        let mut n: Vec<String> = std::fs::read_dir(dir.join("ex"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        n.sort();
        n
    };
    assert_eq!(
        names,
        ["layer-01.qcow2", "layer-02.qcow2", "layer-03.qcow2", "layer-04.qcow2"],
        "the top is empty"
    );
    let cmp = qemu_ok("qemu-img", dir, &["compare", "ex/layer-04.qcow2", "top.qcow2"]);
    assert!(cmp.contains("identical"), "{cmp}");
    let chain: Value = serde_json::from_str(&qemu_ok(
        "qemu-img",
        dir,
        &["info", "--backing-chain", "--output=json", "ex/layer-04.qcow2"],
    ))
    .unwrap();
    let chain = chain.as_array().unwrap();
    assert_eq!(chain.len(), 4, "{chain:?}");
    for (k, image) in chain.iter().enumerate() {
        assert_eq!(image["format"], "qcow2");
        assert_eq!(image["cluster-size"], 65536);
        if k < 3 {
            assert_eq!(image["backing-filename"], format!("layer-{:02}.qcow2", 3 - k), "{image}");
            assert_eq!(image["backing-filename-format"], "qcow2", "{image}");
        } else {
            assert!(image.get("backing-filename").is_none(), "{image}");
        }
    }
    for (original, exported) in [
        ("base.qcow2", "ex/layer-01.qcow2"),
        ("mid1.qcow2", "ex/layer-02.qcow2"),
        ("mid2.qcow2", "ex/layer-03.qcow2"),
        ("top.qcow2", "ex/layer-04.qcow2"),
    ] {
        assert_eq!(held_alone(dir, exported), held_alone(dir, original), "{exported} against {original}");
        let check = qemu_ok("qemu-img", dir, &["check", exported]);
        assert!(check.contains("No errors"), "{check}");
    }

    // An export into a directory that holds something is refused, and leaves it alone.
    let r = mcow_in(dir, &["export", "--chain", "d", "ex"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("not an empty directory"), "{}", r.stderr);
    assert_eq!(std::fs::read_dir(dir.join("ex")).unwrap().count(), 4);

    // A write to the disk's top adds a fifth image for it.
    mcow_ok(dir, &["write", "d", "10M", "--pattern", "0x55", "4096"]);
    let printed = mcow_ok(dir, &["export", "--chain", "d", "ex2"]);
    assert_eq!(printed.trim(), "ex2/top.qcow2");
    mcow_ok(dir, &["export", "d", "d2.raw"]);
    qemu_ok("qemu-img", dir, &["compare", "-f", "qcow2", "-F", "raw", "ex2/top.qcow2", "d2.raw"]);
    let chain = qemu_ok("qemu-img", dir, &["info", "--backing-chain", "--output=json", "ex2/top.qcow2"]);
    assert_eq!(serde_json::from_str::<Value>(&chain).unwrap().as_array().unwrap().len(), 5);
    assert!(leftovers(dir).iter().all(|n| n.starts_with("blob")), "{:?}", leftovers(dir));
}

/// Tried: the same chain imported with 256 KiB blocks, where most blocks are held by an image
/// only in part (64 KiB clusters). Must hold: the disk still reads exactly as the top, and the
/// raw export matches it.
#[test]
fn chain_import_with_blocks_larger_than_clusters() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    make_chain(dir);
    // And two more cluster-sized writes in the top, inside blocks the images below hold.
    qemu_ok(
        "qemu-io",
        dir,
        &["-f", "qcow2", "-c", "write -P 0x44 3M 64K", "-c", "write -z 7M 64K", "top.qcow2"],
    );
    mcow_ok(dir, &["import", "--chain", "-b", "256K", "top.qcow2", "d"]);
    mcow_ok(dir, &["export", "d", "d.raw"]);
    qemu_ok("qemu-img", dir, &["compare", "-f", "raw", "-F", "qcow2", "d.raw", "top.qcow2"]);
    let printed = mcow_ok(dir, &["export", "--chain", "d", "ex"]);
    qemu_ok("qemu-img", dir, &["compare", "-F", "qcow2", printed.trim(), "top.qcow2"]);
}

/// Tried: a raw bottom image under a qcow2 overlay (accepted: one layer each), and three bad
/// chains: a missing backing file, a vmdk member, and images of different virtual sizes.
/// Must hold: the raw-bottomed chain imports and reads as its top; each bad chain fails with
/// exit 1 and a message naming the problem, and leaves no disk directory, no layer in the
/// store and no temporary file.
#[test]
fn chain_import_accepts_a_raw_bottom_and_refuses_bad_chains() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    qemu_ok("qemu-img", dir, &["create", "-q", "-f", "raw", "base.raw", "8M"]);
    qemu_ok("qemu-io", dir, &["-f", "raw", "-c", "write -P 0x61 0 2M", "base.raw"]);
    qemu_ok("qemu-img", dir, &["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "over.qcow2"]);
    qemu_ok(
        "qemu-io",
        dir,
        &["-f", "qcow2", "-c", "write -P 0x62 1M 2M", "-c", "write -z 0 64K", "over.qcow2"],
    );
    let out = mcow_ok(dir, &["import", "--chain", "over.qcow2", "r"]);
    assert!(out.contains("disk r has 2 sealed layers"), "{out}");
    mcow_ok(dir, &["export", "r", "r.raw"]);
    qemu_ok("qemu-img", dir, &["compare", "-f", "raw", "-F", "qcow2", "r.raw", "over.qcow2"]);
    std::fs::remove_dir_all(dir.join("r")).unwrap();
    std::fs::remove_dir_all(dir.join("layers")).unwrap();

    let refused = |top: &str, expect: &str| {
        let r = mcow_in(dir, &["import", "--chain", top, "bad"]);
        assert_eq!(r.code, 1, "{top}: {}", r.stderr);
        assert!(r.stderr.contains(expect), "{top}: expected {expect:?} in:\n{}", r.stderr);
        assert!(!dir.join("bad").exists(), "{top}: a disk directory was left");
        assert!(leftovers(dir).is_empty(), "{top}: left {:?}", leftovers(dir));
    };
    // A missing backing file.
    qemu_ok("qemu-img", dir, &["create", "-q", "-f", "qcow2", "gone.qcow2", "8M"]);
    qemu_ok(
        "qemu-img",
        dir,
        &["create", "-q", "-f", "qcow2", "-b", "gone.qcow2", "-F", "qcow2", "orphan.qcow2"],
    );
    qemu_ok("qemu-io", dir, &["-f", "qcow2", "-c", "write -P 1 0 1M", "orphan.qcow2"]);
    std::fs::remove_file(dir.join("gone.qcow2")).unwrap();
    refused("orphan.qcow2", "gone.qcow2");
    // A vmdk in the chain.
    qemu_ok("qemu-img", dir, &["create", "-q", "-f", "vmdk", "base.vmdk", "8M"]);
    qemu_ok(
        "qemu-img",
        dir,
        &["create", "-q", "-f", "qcow2", "-b", "base.vmdk", "-F", "vmdk", "on-vmdk.qcow2"],
    );
    refused("on-vmdk.qcow2", "is a vmdk image; --chain imports qcow2 images");
    // Images of different sizes.
    qemu_ok("qemu-img", dir, &["create", "-q", "-f", "qcow2", "small.qcow2", "4M"]);
    qemu_ok("qemu-io", dir, &["-f", "qcow2", "-c", "write -P 2 0 1M", "small.qcow2"]);
    qemu_ok(
        "qemu-img",
        dir,
        &["create", "-q", "-f", "qcow2", "-b", "small.qcow2", "-F", "qcow2", "big.qcow2", "8M"],
    );
    refused("big.qcow2", "must all have one virtual size");
    // --chain with -f is a usage error.
    let r = mcow_in(dir, &["import", "--chain", "-f", "qcow2", "big.qcow2", "bad"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("cannot be used with"), "{}", r.stderr);
}

/// Tried: exports (raw, qcow2, chain) of a disk whose layer was corrupted (a byte of a stored
/// block flipped), over an existing output file. Must hold: each fails with exit 1 and leaves
/// the output as it was (the existing file unchanged; no chain directory), with no temporary
/// file beside it.
#[test]
fn failed_exports_leave_no_output() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    qemu_ok("qemu-img", dir, &["create", "-q", "-f", "raw", "src.raw", "8M"]);
    qemu_ok("qemu-io", dir, &["-f", "raw", "-c", "write -P 0x5a 1M 3M", "src.raw"]);
    let digest = mcow_ok(dir, &["import", "src.raw", "d"]).lines().next().unwrap().to_string();
    let blob = dir.join("layers/blobs/sha256").join(&digest[7..]);
    let mut perms = std::fs::metadata(&blob).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&blob, perms).unwrap();
    // A byte in the middle of the stored data (the data region follows the 4 KiB header).
    write_at(&blob, 4096 + MIB + 17, &[0xa5]);
    std::fs::write(dir.join("old.raw"), b"an older export").unwrap();
    let before = || {
        let mut n: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        n.sort();
        n
    };
    let names = before();
    for args in [
        &["export", "d", "old.raw"][..],
        &["export", "-O", "qcow2", "d", "old.raw"],
        &["export", "d", "new.raw"],
        &["export", "--chain", "d", "chain"],
    ] {
        let r = mcow_in(dir, args);
        assert_eq!(r.code, 1, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains("exporting disk d"), "{args:?}: {}", r.stderr);
        assert_eq!(before(), names, "{args:?} left something behind");
        assert_eq!(std::fs::read(dir.join("old.raw")).unwrap(), b"an older export");
    }
}

/// Tried: `export -p -O qcow2` and `import -p` of a qcow2 on a non-terminal stderr. Must hold:
/// every progress line is labelled by mcow (export: one "exporting" display rising to 100 %
/// over both steps, the raw export its first half and qemu-img's conversion the second; import: "converting from qcow2" then "importing"), and
/// none of qemu-img's own `(NN.NN/100%)` lines gets through.
#[test]
fn qcow2_progress_is_one_labelled_display() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    qemu_ok("qemu-img", dir, &["create", "-q", "-f", "qcow2", "src.qcow2", "16M"]);
    qemu_ok("qemu-io", dir, &["-f", "qcow2", "-c", "write -P 0x5a 1M 3M", "src.qcow2"]);
    let r = mcow_in(dir, &["import", "-p", "src.qcow2", "d"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.is_empty()).collect();
    assert!(
        lines.iter().all(|l| l.starts_with("converting from qcow2: ") || l.starts_with("importing: ")),
        "{lines:?}"
    );
    assert!(
        lines.contains(&"converting from qcow2: 100%") && lines.contains(&"importing: 100%"),
        "{lines:?}"
    );

    let r = mcow_in(dir, &["export", "-p", "-O", "qcow2", "d", "out.qcow2"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.is_empty()).collect();
    let pcts: Vec<u64> = lines
        .iter()
        .map(|l| {
            let p = l.strip_prefix("exporting: ").and_then(|p| p.strip_suffix('%'));
            p.and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("not an export progress line: {l:?}\n{}", r.stderr))
        })
        .collect();
    assert!(pcts.windows(2).all(|w| w[0] < w[1]), "one display, each step once: {pcts:?}");
    assert_eq!(pcts.last(), Some(&100), "{pcts:?}");
    assert!(
        pcts.iter().any(|&p| (10..50).contains(&p)) && pcts.iter().any(|&p| (60..100).contains(&p)),
        "both steps show: {pcts:?}"
    );
    qemu_ok("qemu-img", dir, &["compare", "-f", "qcow2", "-F", "qcow2", "out.qcow2", "src.qcow2"]);
}
