//! Layer operations through the CLI: seal, commit and flatten keep content; `map` depths and
//! layers on a 3-layer stack; `create --from`; `check` exit codes.

mod common;

use common::*;
use serde_json::json;

const K64: u64 = 65536;

/// Writes BYTE over [off, off+len) of disk `d` with `mcow write --pattern`.
fn put(dir: &std::path::Path, d: &str, off: u64, byte: u8, len: u64) {
    mcow_ok(dir, &["write", d, &off.to_string(), "--pattern", &format!("{byte:#x}"), &len.to_string()]);
}

fn seal(dir: &std::path::Path, d: &str) -> String {
    let out = mcow_ok(dir, &["seal", d]);
    let digest = out.trim().to_string();
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{out}");
    digest
}

fn layer_count(dir: &std::path::Path, d: &str) -> u64 {
    mcow_in(dir, &["info", d, "--output", "json"]).json()["layer_count"].as_u64().unwrap()
}

#[test]
fn seal_commit_flatten_keep_content() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    mcow_ok(dir, &["create", "d", "-s", "4M", "-b", "4K"]);
    let mut model = vec![0u8; 4 << 20];
    let mut write = |off: u64, byte: u8, len: u64| {
        put(dir, "d", off, byte, len);
        model[off as usize..(off + len) as usize].fill(byte);
        model.clone()
    };
    write(0, 0x11, 100_000);
    seal(dir, "d");
    write(50_000, 0x22, 10_000);
    write(3 << 20, 0x33, 4096);
    seal(dir, "d");
    write(1 << 20, 0x44, 8192);
    seal(dir, "d");
    let model = write(60_000, 0x55, 1);
    mcow_ok(dir, &["write", "d", "8K", "--zero", "8K"]);
    let mut model = model;
    model[8192..16384].fill(0);
    assert_eq!(layer_count(dir, "d"), 3);
    assert_eq!(export_bytes(dir, "d"), model, "before merging");

    seal(dir, "d");
    assert_eq!(layer_count(dir, "d"), 4);
    assert_eq!(export_bytes(dir, "d"), model, "after seal");

    mcow_ok(dir, &["commit", "d", "-n", "2"]);
    assert_eq!(layer_count(dir, "d"), 3, "the top and 2 of 4 layers became 1");
    assert_eq!(export_bytes(dir, "d"), model, "after commit -n 2");

    put(dir, "d", 2 << 20, 0x66, 4096);
    model[(2 << 20)..(2 << 20) + 4096].fill(0x66);
    mcow_ok(dir, &["commit", "d"]);
    assert_eq!(layer_count(dir, "d"), 3, "commit merges the top and one layer");
    assert_eq!(export_bytes(dir, "d"), model, "after commit");

    mcow_ok(dir, &["flatten", "d"]);
    assert_eq!(layer_count(dir, "d"), 1);
    assert_eq!(export_bytes(dir, "d"), model, "after flatten");
    assert_eq!(mcow_in(dir, &["check", "d"]).code, 0);

    // Committing more layers than the stack has fails cleanly.
    let r = mcow_in(dir, &["commit", "d", "-n", "5"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("committing disk d"), "{}", r.stderr);
    assert_eq!(export_bytes(dir, "d"), model);
}

#[test]
fn map_depths_and_layers_on_a_three_layer_stack() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    mcow_ok(dir, &["create", "d", "-s", "1M"]); // 64 KiB blocks
    put(dir, "d", 0, 0x11, K64);
    put(dir, "d", 4 * K64, 0x11, K64);
    let l1 = seal(dir, "d");
    put(dir, "d", K64, 0x22, K64);
    put(dir, "d", 5 * K64, 0x22, K64);
    let l2 = seal(dir, "d");
    mcow_ok(dir, &["write", "d", "0", "--zero", "64K"]);
    put(dir, "d", 2 * K64, 0x33, K64);
    let l3 = seal(dir, "d");
    put(dir, "d", 3 * K64, 0x44, K64);
    mcow_ok(dir, &["write", "d", "64K", "--discard", "64K"]);

    let map = mcow_in(dir, &["map", "d", "--output", "json"]).json();
    let e = |start: u64, length: u64, depth: u32, present: bool, zero: bool, layer: Option<&str>| {
        json!({"start": start, "length": length, "depth": depth, "present": present,
               "zero": zero, "data": !zero, "layer": layer})
    };
    let expected = json!([
        e(0, K64, 1, true, true, Some(&l3)),     // zero marker in the topmost layer
        e(K64, K64, 0, true, true, Some("top")), // discarded in the top, over l2's data
        e(2 * K64, K64, 1, true, false, Some(&l3)),
        e(3 * K64, K64, 0, true, false, Some("top")),
        e(4 * K64, K64, 3, true, false, Some(&l1)), // the bottom layer
        e(5 * K64, K64, 2, true, false, Some(&l2)),
        e(6 * K64, 10 * K64, 3, false, true, None), // no layer: the bottom's depth, as qemu-img
    ]);
    assert_eq!(map, expected, "{}", serde_json::to_string_pretty(&map).unwrap());

    let info = mcow_in(dir, &["info", "d", "--output", "json"]).json();
    let layers = info["layers"].as_array().unwrap();
    let got: Vec<(u64, &str)> =
        layers.iter().map(|l| (l["depth"].as_u64().unwrap(), l["digest"].as_str().unwrap())).collect();
    assert_eq!(got, vec![(3, l1.as_str()), (2, l2.as_str()), (1, l3.as_str())], "bottom first");
    assert_eq!(info["virtual_size"], 1 << 20);
    assert_eq!(info["block_size"], 65536);
    assert_eq!(info["top"]["stored_blocks"], 1);
    for key in ["disk", "store", "chain_digest", "map_extents"] {
        assert!(info.get(key).is_some(), "info has no {key}: {info}");
    }

    // The human forms name the same things.
    let human = mcow_ok(dir, &["map", "d"]);
    assert!(human.contains(&l1[7..19]) && human.contains("top") && human.contains("hole"), "{human}");
    let human = mcow_ok(dir, &["info", "d"]);
    assert!(human.contains(&l2) && human.contains("sealed layers: 3"), "{human}");

    // A disk created on the stack sees the sealed layers but not d's top.
    let r = mcow_in(dir, &["create", "e", "--from", "d"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let map_e = mcow_in(dir, &["map", "e", "--output", "json"]).json();
    assert_eq!(map_e[1], e(K64, K64, 2, true, false, Some(&l2)));
    assert_eq!(map_e[3], e(3 * K64, K64, 3, false, true, None));
    let a = mcow_ok(dir, &["read", "e", "64K", "16", "--raw"]);
    assert_eq!(a.as_bytes(), &[0x22; 16]);
    assert_eq!(mcow_in(dir, &["create", "e", "--from", "d"]).code, 1, "e already holds a disk");
}

#[test]
fn check_exit_codes() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    mcow_ok(dir, &["create", "d", "-s", "1M", "-b", "4K", "--store", "store"]);
    assert_eq!(mcow_in(dir, &["check", "d"]).code, 0, "fresh disk");
    put(dir, "d", 0, 0xaa, 40960);
    let digest = seal(dir, "d");
    let r = mcow_in(dir, &["check", "d", "--output", "json"]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert_eq!(r.json()["result"], "clean");
    assert_eq!(r.json()["blocks_checked"], 10);

    // Leftovers of a crash: an unused block after the top's data. Exit 3; -r drops it.
    put(dir, "d", 0, 0xbb, 4096);
    let top = dir.join("d/top-2.mcow");
    let len = std::fs::metadata(&top).unwrap().len();
    write_at(&top, len, &[0xcc; 4096]);
    let r = mcow_in(dir, &["check", "d"]);
    assert_eq!(r.code, 3, "{}{}", r.stdout, r.stderr);
    let r = mcow_in(dir, &["check", "-r", "d"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("Repair"), "{}", r.stdout);

    // One flipped byte in the layer's first data block: corruption, exit 2, naming the file.
    let layer = dir.join("store/blobs/sha256").join(&digest[7..]);
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&layer).unwrap();
    let at = mcow_format::HEADER_SIZE as u64 + 100;
    let mut b = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, at).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[b[0] ^ 0xff], at).unwrap();
    drop(f);
    let r = mcow_in(dir, &["check", "d"]);
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains(&digest[7..]) && r.stdout.contains("checksum"), "{}", r.stdout);
    let r = mcow_in(dir, &["check", "d", "--output", "json"]);
    assert_eq!(r.code, 2);
    assert_eq!(r.json()["result"], "corrupt");

    // No disk there: the check cannot run.
    let r = mcow_in(dir, &["check", "nosuchdisk"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("nosuchdisk"), "{}", r.stderr);
}

/// `mcow info` reports the top's data file both as its apparent size and as the space it takes;
/// a discard of everything written gives the space back (the freed blocks are punched out of
/// the file) while the apparent size stays. Tried: 4 MiB written, then discarded.
#[test]
fn info_shows_the_space_a_discard_gives_back() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    mcow_ok(dir, &["create", "d", "-s", "4M", "-b", "64K"]);
    put(dir, "d", 0, 0x5a, 4 << 20);
    let top = |info: &serde_json::Value, key: &str| info["top"][key].as_u64().unwrap();
    let full = mcow_in(dir, &["info", "d", "--output", "json"]).json();
    assert!(top(&full, "allocated_bytes") >= 4 << 20, "{full}");
    assert_eq!(top(&full, "file_bytes"), 4096 + (4 << 20), "{full}");
    mcow_ok(dir, &["write", "d", "0", "--discard", "4M"]);
    let after = mcow_in(dir, &["info", "d", "--output", "json"]).json();
    assert!(top(&after, "allocated_bytes") < 1 << 20, "{after}");
    assert_eq!(top(&after, "file_bytes"), 4096 + (4 << 20), "{after}");
    let human = mcow_ok(dir, &["info", "d"]);
    assert!(human.contains("allocated)"), "{human}");
}
