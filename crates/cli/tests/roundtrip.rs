//! Import and export through real qemu-img: raw and qcow2 round trips, and thin imports on a
//! parent.

mod common;

use common::*;

/// A 16 MiB raw image with 0x5a over 1M..4M, made with qemu-img and qemu-io.
fn make_source(dir: &std::path::Path) -> std::path::PathBuf {
    qemu_ok("qemu-img", dir, &["create", "-q", "-f", "raw", "src.raw", "16M"]);
    qemu_ok("qemu-io", dir, &["-f", "raw", "-c", "write -P 0x5a 1M 3M", "src.raw"]);
    dir.join("src.raw")
}

fn no_temp_files_left(dir: &std::path::Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && n.ends_with(".raw"))
        .collect();
    assert!(left.is_empty(), "temporary files left behind: {left:?}");
}

#[test]
fn raw_import_export_round_trip() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    make_source(dir);
    let out = mcow_ok(dir, &["import", "src.raw", "d"]);
    let mut lines = out.lines();
    let digest = lines.next().unwrap();
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{out}");
    assert!(out.contains("Stored 3145728 bytes"), "{out}");
    assert!(dir.join("layers/blobs/sha256").join(&digest[7..]).exists(), "default store is DISK/../layers");
    mcow_ok(dir, &["export", "d", "out.raw"]);
    qemu_ok("qemu-img", dir, &["compare", "-f", "raw", "-F", "raw", "out.raw", "src.raw"]);
    // 3 MiB of data at 64 KiB blocks; holes are never stored.
    assert_eq!(stored_blocks(dir, "d"), vec![48]);
}

#[test]
fn qcow2_import_and_qcow2_export() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    make_source(dir);
    qemu_ok("qemu-img", dir, &["convert", "-f", "raw", "-O", "qcow2", "src.raw", "src.qcow2"]);

    // Detected format.
    mcow_ok(dir, &["import", "src.qcow2", "q"]);
    no_temp_files_left(dir);
    mcow_ok(dir, &["export", "q", "q.raw"]);
    qemu_ok("qemu-img", dir, &["compare", "-f", "raw", "-F", "raw", "q.raw", "src.raw"]);
    // Forced format, with a progress display on a non-terminal.
    let r = mcow_in(dir, &["import", "-p", "-f", "qcow2", "src.qcow2", "q2"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("importing: 100%"), "{}", r.stderr);
    no_temp_files_left(dir);
    assert_eq!(stored_blocks(dir, "q"), stored_blocks(dir, "q2"));

    // Export as qcow2: same content as the original, and a clean qcow2.
    mcow_ok(dir, &["export", "-O", "qcow2", "q", "out.qcow2"]);
    no_temp_files_left(dir);
    qemu_ok("qemu-img", dir, &["compare", "-f", "qcow2", "-F", "raw", "out.qcow2", "src.raw"]);
    let info = qemu_ok("qemu-img", dir, &["info", "--output=json", "out.qcow2"]);
    assert!(info.contains("\"format\": \"qcow2\""), "{info}");
    let check = qemu_ok("qemu-img", dir, &["check", "out.qcow2"]);
    assert!(check.contains("No errors"), "{check}");

    // A bad format name fails with exit 1 and says what failed.
    let r = mcow_in(dir, &["import", "-f", "nosuchformat", "src.raw", "bad"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("qemu-img failed"), "{}", r.stderr);
    no_temp_files_left(dir);
}

#[test]
fn import_with_parent_stores_only_differences() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    // A dense base image: explicit zeros everywhere but 1M..4M.
    let base = dir.join("base.raw");
    dense_zero_file(&base, 16 * MIB);
    write_at(&base, MIB, &vec![0x5a; 3 * MIB as usize]);
    mcow_ok(dir, &["import", "-f", "raw", "base.raw", "base"]);
    assert_eq!(stored_blocks(dir, "base"), vec![48], "all-zero blocks are never stored");

    // The next image: one block changed, one block zeroed, one new block, the rest equal.
    let next = dir.join("next.raw");
    std::fs::copy(&base, &next).unwrap();
    write_at(&next, 2 * MIB, &[0x77; 65536]);
    write_at(&next, 3 * MIB, &[0; 65536]);
    write_at(&next, 8 * MIB + 4096, b"new data");
    let out = mcow_ok(dir, &["import", "next.raw", "next", "--parent", "base"]);
    assert!(out.contains("Stored 131072 bytes"), "{out}");
    assert_eq!(stored_blocks(dir, "next"), vec![48, 2]);
    let info = mcow_in(dir, &["info", "next", "--output", "json"]).json();
    assert_eq!(info["layer_count"], 2);
    mcow_ok(dir, &["export", "next", "next.out"]);
    qemu_ok("qemu-img", dir, &["compare", "-f", "raw", "-F", "raw", "next.out", "next.raw"]);
    // The parent is untouched.
    mcow_ok(dir, &["export", "base", "base.out"]);
    qemu_ok("qemu-img", dir, &["compare", "-f", "raw", "-F", "raw", "base.out", "base.raw"]);

    // A parent of another size is refused.
    qemu_ok("qemu-img", dir, &["create", "-q", "-f", "raw", "small.raw", "1M"]);
    let r = mcow_in(dir, &["import", "small.raw", "small", "--parent", "base"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("parent disk"), "{}", r.stderr);
}
