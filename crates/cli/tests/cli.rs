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
    assert!(map.contains("N+1"), "map --help must document depths");
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
    for d in 0..=5 {
        assert!(depths.contains(&d), "the demo map shows depth {d}: {depths:?}");
    }
    // Another directory, and a directory it did not make is left alone.
    mcow_ok(dir, &["demo", "--dir", "other"]);
    std::fs::create_dir(dir.join("mine")).unwrap();
    std::fs::write(dir.join("mine/file"), b"keep").unwrap();
    let r = mcow_in(dir, &["demo", "--dir", "mine"]);
    assert_eq!(r.code, 1);
    assert_eq!(std::fs::read(dir.join("mine/file")).unwrap(), b"keep");
}
