//! The command surface: help on every verb, usage errors, the demo, read/write, create.

mod common;

use common::*;

const VERBS: [&str; 12] = [
    "create", "info", "map", "check", "seal", "commit", "flatten", "import", "export", "read", "write",
    "demo",
];

#[test]
fn every_verb_has_help() {
    let t = tempfile::tempdir().unwrap();
    for verb in VERBS {
        for flag in ["--help", "-h"] {
            let r = mcow_in(t.path(), &[verb, flag]);
            assert_eq!(r.code, 0, "mcow {verb} {flag}: {}", r.stderr);
            assert!(r.stdout.contains("Usage: mcow"), "mcow {verb} {flag}:\n{}", r.stdout);
        }
    }
    let top = mcow_ok(t.path(), &["--help"]);
    for verb in VERBS {
        assert!(top.contains(verb), "top-level help does not list {verb}:\n{top}");
    }
    let create = mcow_ok(t.path(), &["create", "--help"]);
    assert!(create.contains("NOT included"), "create --help must say the top is not included");
    let map = mcow_ok(t.path(), &["map", "--help"]);
    assert!(map.contains("qemu-img 10"), "map --help must document depths as qemu-img's");
    assert_eq!(mcow_in(t.path(), &["--version"]).code, 0);
}

#[test]
fn usage_errors_exit_1() {
    let t = tempfile::tempdir().unwrap();
    for args in [
        &["nosuchverb"][..],
        &["create", "d"],              // no size
        &["create", "d", "-s", "12Q"], // bad suffix
        &["create", "d", "-s", "1M", "--from", "e"],
        &["write", "d", "0"], // nothing to write
        &["info", "d", "--output", "xml"],
    ] {
        let r = mcow_in(t.path(), args);
        assert_eq!(r.code, 1, "mcow {args:?}: {}", r.stderr);
        assert!(!r.stderr.is_empty());
    }
    let r = mcow_in(t.path(), &["info", "nosuchdisk"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("opening disk nosuchdisk"), "{}", r.stderr);
}

/// A malformed `--insecure-registry` (a URL, a path) is refused before the verb runs: exit 1,
/// the flag named in the message, and the verb's output (a new disk) never made.
#[test]
fn a_malformed_insecure_registry_is_refused_before_anything_happens() {
    let t = tempfile::tempdir().unwrap();
    for bad in ["http://10.0.0.1:5000", "10.0.0.1:5000/repo", ""] {
        let r = mcow_in(t.path(), &["--insecure-registry", bad, "create", "d", "-s", "1M"]);
        assert_eq!(r.code, 1, "{bad:?}: {}", r.stderr);
        assert!(r.stderr.contains("--insecure-registry") && r.stderr.contains("HOST[:PORT]"), "{}", r.stderr);
        assert!(!t.path().join("d").exists(), "{bad:?}: the disk was created anyway");
    }
    mcow_ok(t.path(), &["--insecure-registry", "10.0.0.1:5000", "create", "d", "-s", "1M"]);
}

#[test]
fn create_read_write() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let out = mcow_ok(dir, &["create", "vm/d", "-s", "1.5M", "-b", "4k"]);
    assert!(out.contains("1.5 MiB"), "{out}");
    assert!(dir.join("vm/layers").is_dir(), "default store is beside the disk");
    let info = mcow_in(dir, &["info", "vm/d", "--output", "json"]).json();
    assert_eq!(info["virtual_size"], 1536 * 1024);
    assert_eq!(info["block_size"], 4096);
    assert_eq!(info["layer_count"], 0);

    std::fs::write(dir.join("hello.txt"), b"hello, mcow").unwrap();
    mcow_ok(dir, &["write", "vm/d", "0x1003", "--from", "hello.txt"]);
    mcow_ok(dir, &["write", "vm/d", "1M", "--pattern", "0x5a", "100"]);
    let raw = mcow_ok(dir, &["read", "vm/d", "4K", "32", "--raw"]);
    assert_eq!(&raw.as_bytes()[..14], b"\0\0\0hello, mcow");
    let dump = mcow_ok(dir, &["read", "vm/d", "1M", "128"]);
    assert!(dump.contains("00100000:  5a 5a"), "{dump}");
    assert!(dump.contains('*'), "identical lines collapse:\n{dump}");
    let r = mcow_in(dir, &["read", "vm/d", "1535K", "2K"]);
    assert_eq!(r.code, 1, "reading past the end fails");
    assert!(r.stderr.contains("past the end"), "{}", r.stderr);
}

#[test]
fn demo_builds_and_rebuilds() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    for _ in 0..2 {
        let out = mcow_ok(dir, &["demo"]);
        assert!(out.contains("$ mcow info"), "{out}");
        assert!(out.contains("$ mcow map"), "{out}");
        assert!(out.contains("sealed layers: 4"), "{out}");
        assert!(out.contains("match what was written"), "{out}");
    }
    assert_eq!(mcow_in(dir, &["check", "mcow-demo/vm"]).code, 0);
    let map = mcow_in(dir, &["map", "mcow-demo/vm", "--output", "json"]).json();
    let depths: Vec<u64> = map.as_array().unwrap().iter().map(|e| e["depth"].as_u64().unwrap()).collect();
    for d in 0..=4 {
        assert!(depths.contains(&d), "the demo map shows depth {d}: {depths:?}");
    }
    // Ranges no layer holds are at the bottom's depth, as qemu-img reports them.
    assert!(depths.iter().all(|&d| d <= 4), "{depths:?}");
    assert!(map.as_array().unwrap().iter().any(|e| e["present"] == false && e["depth"] == 4));
    // Another directory, and a directory it did not make is left alone.
    mcow_ok(dir, &["demo", "--dir", "other"]);
    std::fs::create_dir(dir.join("mine")).unwrap();
    std::fs::write(dir.join("mine/file"), b"keep").unwrap();
    let r = mcow_in(dir, &["demo", "--dir", "mine"]);
    assert_eq!(r.code, 1);
    assert_eq!(std::fs::read(dir.join("mine/file")).unwrap(), b"keep");
}

/// Regression (one flipped bit in a middle journal batch silently discarded the later,
/// committed batches). Tried: 1 MiB written at 8M, 9M, 10M and 11M, one flush each (four
/// batches of 52 bytes after the 64-byte header), then one bit of byte 150 of the journal
/// (inside batch 2) flipped. Must hold: `check` exits 2 and names the damage; `check -r`, a
/// write and `serve` refuse the disk and leave both files byte for byte as they were; a
/// read-only `read` serves what the first batch says (8M written, 11M not).
#[test]
fn a_flipped_bit_in_a_middle_journal_batch_is_corruption_and_nothing_is_cut() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    mcow_ok(dir, &["create", "d", "-s", "16M"]);
    for (i, at) in ["8M", "9M", "10M", "11M"].iter().enumerate() {
        mcow_ok(dir, &["write", "d", at, "--pattern", &format!("{}", 0x11 * (i + 1)), "1M"]);
    }
    let top = dir.join("d/top-1.mcow");
    let journal = dir.join("d/top-1.mcow.journal");
    let mut j = std::fs::read(&journal).unwrap();
    assert_eq!(j.len(), 64 + 4 * 52, "four batches of one entry each");
    assert_eq!(mcow_in(dir, &["check", "d"]).code, 0);
    j[150] ^= 0x10;
    std::fs::write(&journal, &j).unwrap();
    let data = std::fs::read(&top).unwrap();

    let r = mcow_in(dir, &["check", "d"]);
    assert_eq!(r.code, 2, "check of a damaged journal: {}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("journal is corrupt") && r.stdout.contains("byte 116"), "{}", r.stdout);
    let r = mcow_in(dir, &["check", "-r", "d"]);
    assert_eq!(r.code, 2, "check -r: {}{}", r.stdout, r.stderr);
    let r = mcow_in(dir, &["write", "d", "0", "--pattern", "1", "4k"]);
    assert_ne!(r.code, 0, "a write opened the damaged disk");
    assert!(r.stderr.contains("journal is corrupt"), "{}", r.stderr);
    let sock = dir.join("s.sock");
    let r = mcow_in(dir, &["serve", "-k", sock.to_str().unwrap(), "d"]);
    assert_ne!(r.code, 0, "serve opened the damaged disk");
    assert!(r.stderr.contains("journal is corrupt"), "{}", r.stderr);
    assert!(std::fs::read(&journal).unwrap() == j, "the journal changed");
    assert!(std::fs::read(&top).unwrap() == data, "the data file changed");

    let first = mcow_ok(dir, &["read", "d", "8M", "2", "--raw"]);
    assert_eq!(first.as_bytes(), [0x11, 0x11]);
    let later = mcow_ok(dir, &["read", "d", "11M", "2", "--raw"]);
    assert_eq!(later.as_bytes(), [0, 0], "a read-only open shows the disk as of the last good batch");
}
