//! What killed and failing processes leave behind, and who cleans it up: temporaries in a
//! store's `tmp/` (a `kill -9` mid-import) and the files of a seal that failed on a full disk.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn tmp_files(store: &Path) -> Vec<String> {
    match std::fs::read_dir(store.join("tmp")) {
        Ok(e) => e.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => Vec::new(),
    }
}

/// Tried: `mcow import` of a 384 MiB image killed with SIGKILL while it writes the new layer
/// into the store's `tmp/`. Must hold: the temporary is there afterwards; `check` of another
/// disk on that store reports it as debris (exit 3) with its size; the next write to the store
/// (a seal of that disk) removes it; then `check` is clean (exit 0) and the sealed content is
/// right. A live writer's temporary is never taken for stale (the seal itself writes one).
#[test]
fn a_temporary_of_a_killed_import_is_reported_then_removed_by_the_next_write() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let raw = dir.join("big.raw");
    {
        let f = std::fs::File::create(&raw).unwrap();
        let chunk: Vec<u8> = (0..MIB as usize).map(|i| (i % 251) as u8 | 1).collect();
        for i in 0..384u64 {
            std::os::unix::fs::FileExt::write_all_at(&f, &chunk, i * MIB).unwrap();
        }
    }
    mcow_ok(dir, &["create", "other", "-s", "4M"]);
    let store = dir.join("layers");
    std::fs::create_dir_all(&store).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mcow"))
        .args(["import", raw.to_str().unwrap(), "imported", "--store", store.to_str().unwrap()])
        .current_dir(dir)
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    loop {
        let grown = std::fs::read_dir(store.join("tmp"))
            .ok()
            .and_then(|mut e| e.next())
            .and_then(|e| e.ok().and_then(|e| e.metadata().ok()).filter(|m| m.len() > 8 * MIB));
        if grown.is_some() {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "the import ended before it could be killed");
        assert!(t0.elapsed().as_secs() < 60, "no temporary appeared in {}", store.display());
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let left = tmp_files(&store);
    assert_eq!(left.len(), 1, "{left:?}");

    let r = mcow_in(dir, &["check", "other"]);
    assert_eq!(r.code, 3, "check must report the temporary as debris:\n{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains(&left[0]) && r.stdout.contains("died"), "{}", r.stdout);
    assert_eq!(tmp_files(&store), left, "check alone removes nothing");

    mcow_ok(dir, &["write", "other", "1M", "--pattern", "0x42", "64k"]);
    mcow_ok(dir, &["seal", "other"]);
    assert_eq!(tmp_files(&store), Vec::<String>::new(), "the seal's write to the store removed it");
    assert_eq!(mcow_in(dir, &["check", "other"]).code, 0);
    assert_eq!(mcow_ok(dir, &["read", "other", "1M", "1", "--raw"]).as_bytes(), [0x42]);
}

/// A small tmpfs mounted for one test and unmounted (lazily, even if the test fails).
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(at: &Path, size: &str) -> SmallFs {
        std::fs::create_dir_all(at).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status();
        assert!(
            st.is_ok_and(|s| s.success()),
            "mounting a tmpfs at {} failed: these tests run as root (as CI does)",
            at.display()
        );
        SmallFs(at.to_path_buf())
    }

    fn free_bytes(&self) -> u64 {
        let out = Command::new("stat").args(["-f", "-c", "%a %S"]).arg(&self.0).output().unwrap();
        let s = String::from_utf8(out.stdout).unwrap();
        let v: Vec<u64> = s.split_whitespace().map(|x| x.parse().unwrap()).collect();
        v[0] * v[1]
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Tried: seals on a nearly full filesystem (a 24 MiB tmpfs), filled so that the free space
/// ends a few pages before, at, and after the new layer's size, so that the seal fails while
/// writing the layer, while creating the next top, or succeeds. Must hold after each failed
/// seal: no temporary in the store, no next top and no `disk.tmp` in the disk directory, the
/// disk opens with the same layers and content, and `check` is clean; at least one seal must
/// have failed after the layer was written (the case that used to leave an empty next top).
#[test]
fn a_seal_that_fails_on_a_full_disk_leaves_nothing_behind() {
    let t = tempfile::tempdir().unwrap();
    let fs = SmallFs::mount(&t.path().join("small"), "24m");
    let dir = fs.0.clone();
    let mut failed_late = 0;
    for extra_pages in 0..6u64 {
        let d = format!("d{extra_pages}");
        mcow_ok(&dir, &["create", &d, "-s", "8M"]);
        mcow_ok(&dir, &["write", &d, "0", "--pattern", "0x5a", "1M"]);
        let before = mcow_in(&dir, &["info", &d, "--output", "json"]).json()["layer_count"].clone();
        // The layer: a 4 KiB header, 16 blocks, and a tail (index, hashes, trailer) under a page.
        let layer_pages = 1 + 256 + 1;
        let free = fs.free_bytes();
        let filler = free.saturating_sub((layer_pages + extra_pages) * 4096);
        std::fs::write(dir.join("filler"), vec![1u8; filler as usize]).unwrap();
        let r = mcow_in(&dir, &["seal", &d]);
        std::fs::remove_file(dir.join("filler")).unwrap();
        if r.code == 0 {
            continue;
        }
        assert!(r.stderr.contains("No space left"), "seal failed otherwise: {}", r.stderr);
        if r.stderr.contains("top-2.mcow") || r.stderr.contains("disk.tmp") {
            failed_late += 1;
        }
        assert_eq!(tmp_files(&dir.join("layers")), Vec::<String>::new(), "{d}: a temporary is left");
        let mut names: Vec<String> = std::fs::read_dir(dir.join(&d))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["disk.json", "top-1.mcow", "top-1.mcow.journal", "top-1.mcow.pending.0", "top-1.mcow.pending.1"],
            "{d}: files left: {}",
            r.stderr
        );
        let after = mcow_in(&dir, &["info", &d, "--output", "json"]).json()["layer_count"].clone();
        assert_eq!(before, after, "{d}");
        assert_eq!(mcow_ok(&dir, &["read", &d, "1M", "1", "--raw"]).as_bytes(), [0]);
        assert_eq!(mcow_ok(&dir, &["read", &d, "0", "1", "--raw"]).as_bytes(), [0x5a]);
        assert_eq!(mcow_in(&dir, &["check", &d]).code, 0, "{d}");
    }
    assert!(failed_late > 0, "no seal failed after writing its layer: the test did not reach that case");
}

/// Tried: the files a crash between the steps of a seal leaves in a disk directory (a new top
/// the manifest does not name yet, or an old one it no longer names, and the manifest's
/// temporary), put there by hand. Must hold: `check` reports each as debris (exit 3) and
/// removes nothing; the next writable open (a `write`) removes exactly those files; then
/// `check` is clean and the disk reads as before.
#[test]
fn files_of_an_interrupted_seal_are_reported_then_removed_by_the_next_writable_open() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    mcow_ok(dir, &["create", "d", "-s", "4M"]);
    mcow_ok(dir, &["write", "d", "0", "--pattern", "0x33", "4k"]);
    let d = dir.join("d");
    std::fs::copy(d.join("top-1.mcow"), d.join("top-2.mcow")).unwrap();
    std::fs::copy(d.join("top-1.mcow.journal"), d.join("top-2.mcow.journal")).unwrap();
    std::fs::copy(d.join("top-1.mcow.pending.0"), d.join("top-2.mcow.pending.0")).unwrap();
    std::fs::write(d.join("disk.tmp"), b"{").unwrap();
    std::fs::write(d.join("notes.txt"), b"mine").unwrap();
    let r = mcow_in(dir, &["check", "d"]);
    assert_eq!(r.code, 3, "{}{}", r.stdout, r.stderr);
    for f in ["top-2.mcow", "top-2.mcow.journal", "top-2.mcow.pending.0", "disk.tmp"] {
        assert!(r.stdout.contains(f) && d.join(f).exists(), "{f}: {}", r.stdout);
    }
    mcow_ok(dir, &["write", "d", "8k", "--pattern", "0x34", "4k"]);
    let mut names: Vec<String> =
        std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "disk.json",
            "notes.txt",
            "top-1.mcow",
            "top-1.mcow.journal",
            "top-1.mcow.pending.0",
            "top-1.mcow.pending.1"
        ]
    );
    assert_eq!(mcow_in(dir, &["check", "d"]).code, 0);
    assert_eq!(mcow_ok(dir, &["read", "d", "0", "1", "--raw"]).as_bytes(), [0x33]);
}
