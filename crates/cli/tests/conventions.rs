//! qemu-img's conventions in the command surface: `map` and `info` side by side with a real
//! `qemu-img` on the same chain, quiet ends into a closed pipe, qemu-img's positional size, hints
//! for a qcow2 given as a disk, an empty seal, push's word on a top of markers, retry times in
//! the help, the demo's hint, one list of size suffixes, completions and man pages.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

const K64: u64 = 64 << 10;
const SIZE: u64 = 4 * MIB;

/// `map --output json` (qemu-img's or mcow's) as one (depth, present, zero, data) per 64 KiB
/// cluster, so that two maps that merge neighbours differently still compare.
fn per_cluster(map: &Value) -> Vec<(u64, bool, bool, bool)> {
    let mut out = Vec::new();
    for e in map.as_array().unwrap() {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        assert_eq!(start, out.len() as u64 * K64, "the map is in order and whole: {e}");
        assert_eq!(len % K64, 0, "{e}");
        let v = (
            e["depth"].as_u64().unwrap(),
            e["present"].as_bool().unwrap(),
            e["zero"].as_bool().unwrap(),
            e["data"].as_bool().unwrap(),
        );
        for _ in 0..len / K64 {
            out.push(v);
        }
    }
    out
}

/// The same history twice: a qcow2 chain base <- mid <- top made with qemu-img and qemu-io,
/// and an mcow disk whose first two sealed layers got the same writes and whose top got the
/// top's: base data at 0 and 1M; mid data at 64K and zeros over base's data at 1M; top data at
/// 128K, a discard over base's data at 0, and zeros at 2M over nothing.
fn same_chain_twice(dir: &Path) {
    let q = |args: &[&str]| qemu_ok("qemu-img", dir, args);
    let io = |file: &str, cmds: &[&str]| {
        let mut args = vec!["-f", "qcow2"];
        for c in cmds {
            args.extend(["-c", c]);
        }
        args.push(file);
        qemu_ok("qemu-io", dir, &args);
    };
    q(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", "base.qcow2", "4M"]);
    io("base.qcow2", &["write -P 1 0 64k", "write -P 2 1M 64k"]);
    q(&["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2"]);
    io("mid.qcow2", &["write -P 3 64k 64k", "write -z 1M 64k"]);
    q(&["create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2"]);
    io("top.qcow2", &["write -P 4 128k 64k", "discard 0 64k", "write -z 2M 64k"]);

    mcow_ok(dir, &["create", "d", "4M"]);
    mcow_ok(dir, &["write", "d", "0", "--pattern", "1", "64K"]);
    mcow_ok(dir, &["write", "d", "1M", "--pattern", "2", "64K"]);
    mcow_ok(dir, &["seal", "d"]);
    mcow_ok(dir, &["write", "d", "64K", "--pattern", "3", "64K"]);
    mcow_ok(dir, &["write", "d", "1M", "--zero", "64K"]);
    mcow_ok(dir, &["seal", "d"]);
    mcow_ok(dir, &["write", "d", "128K", "--pattern", "4", "64K"]);
    mcow_ok(dir, &["write", "d", "0", "--discard", "64K"]);
    mcow_ok(dir, &["write", "d", "2M", "--zero", "64K"]);
}

/// Tried: the same three-image history in qemu-img 10 (qcow2 chain) and mcow (two sealed
/// layers and the top), then `map --output json` of both. Must hold: start, length, depth,
/// present, zero and data agree on every cluster; in particular unallocated ranges are at
/// depth 2 (the bottom's, not 3) with present false, the discard in the top over data below
/// is present, zero, not data at depth 0 (qemu-img's zero cluster); and mcow's text map says
/// `hole` exactly where the JSON says present false, `zero` where present without data. A disk
/// of one image (no sealed layer) puts unallocated ranges at depth 0, as qemu-img does for an
/// image without a backing file.
#[test]
fn map_agrees_with_qemu_img_on_the_same_chain() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    same_chain_twice(dir);
    let qemu: Value =
        serde_json::from_str(&qemu_ok("qemu-img", dir, &["map", "--output=json", "top.qcow2"])).unwrap();
    let mcow = mcow_in(dir, &["map", "d", "--output", "json"]).json();
    let (qc, mc) = (per_cluster(&qemu), per_cluster(&mcow));
    assert_eq!(qc.len() as u64, SIZE / K64);
    assert_eq!(mc, qc, "mcow map vs qemu-img map\nmcow: {mcow}\nqemu-img: {qemu}");
    // What qemu-img 10 prints, said outright (so a change in qemu-img shows here too).
    assert_eq!(qc[0], (0, true, true, false), "discarded in the top: a zero cluster of the top");
    assert_eq!(qc[1], (1, true, false, true));
    assert_eq!(qc[2], (0, true, false, true));
    assert_eq!(qc[3], (2, false, true, false), "unallocated: the bottom's depth, 2 in a chain of 3");
    assert_eq!(qc[16], (1, true, true, false), "zeros in mid over base's data");
    assert_eq!(qc[32], (0, true, true, false));

    // The text map means the same by hole and zero.
    let text = mcow_ok(dir, &["map", "d"]);
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let start = u64::from_str_radix(f[0].trim_start_matches("0x"), 16).unwrap();
        let (what, depth) = (f[f.len() - 3], f[f.len() - 2].parse::<u64>().unwrap());
        let (d, present, _zero, data) = mc[(start / K64) as usize];
        let want = if data {
            "data"
        } else if present {
            "zero"
        } else {
            "hole"
        };
        assert_eq!((what, depth), (want, d), "text map line {line:?}");
    }

    // One image: qemu-img gives unallocated ranges depth 0; so does a disk with no sealed layer.
    qemu_ok("qemu-img", dir, &["create", "-q", "-f", "qcow2", "one.qcow2", "1M"]);
    qemu_ok("qemu-io", dir, &["-f", "qcow2", "-c", "write -P 9 0 64k", "one.qcow2"]);
    mcow_ok(dir, &["create", "one", "1M"]);
    mcow_ok(dir, &["write", "one", "0", "--pattern", "9", "64K"]);
    let q1: Value =
        serde_json::from_str(&qemu_ok("qemu-img", dir, &["map", "--output=json", "one.qcow2"])).unwrap();
    assert_eq!(per_cluster(&mcow_in(dir, &["map", "one", "--output", "json"]).json()), per_cluster(&q1));
    assert_eq!(per_cluster(&q1)[1], (0, false, true, false));

    let help = mcow_ok(dir, &["map", "--help"]);
    for word in ["qemu-img map --output=json", "present", "zero cluster", "hole"] {
        assert!(help.contains(word), "map --help does not mention {word:?}:\n{help}");
    }
}

/// Tried: `info --output json` of the mcow disk of the shared history beside `qemu-img info
/// --output=json` of the qcow2 chain. Must hold: the qemu-img keys mcow adds are keys qemu-img
/// prints, with the same virtual-size and cluster-size; format is "mcow"; backing-chain lists
/// the top then the sealed layers top first (depths 0, 1, 2), each naming the next as its
/// backing file, the files exist and sealed layers take space; the existing keys are still
/// there; and a disk with no sealed layer has no backing-filename, as a qcow2 with no backing.
#[test]
fn info_carries_qemu_img_keys() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    same_chain_twice(dir);
    let q: Value =
        serde_json::from_str(&qemu_ok("qemu-img", dir, &["info", "--output=json", "top.qcow2"])).unwrap();
    let m = mcow_in(dir, &["info", "d", "--output", "json"]).json();
    for key in [
        "filename",
        "format",
        "virtual-size",
        "cluster-size",
        "actual-size",
        "backing-filename",
        "backing-filename-format",
    ] {
        assert!(q.get(key).is_some(), "qemu-img info has no {key}: {q}");
        assert!(m.get(key).is_some(), "mcow info has no {key}: {m}");
    }
    assert_eq!(m["virtual-size"], q["virtual-size"]);
    assert_eq!(m["cluster-size"], q["cluster-size"]);
    assert_eq!(m["format"], "mcow");
    assert_eq!(m["virtual-size"], m["virtual_size"]);
    assert!(m["actual-size"].as_u64().unwrap() > 0, "the top holds data: {m}");
    for key in ["disk", "virtual_size", "block_size", "store", "chain_digest", "layer_count", "layers", "top"]
    {
        assert!(m.get(key).is_some(), "the existing key {key} is gone: {m}");
    }
    let chain = m["backing-chain"].as_array().unwrap();
    assert_eq!(chain.len(), 3, "{m}");
    let formats: Vec<&str> = chain.iter().map(|c| c["format"].as_str().unwrap()).collect();
    assert_eq!(formats, ["mcow-top", "mcow-layer", "mcow-layer"]);
    let depths: Vec<u64> = chain.iter().map(|c| c["depth"].as_u64().unwrap()).collect();
    assert_eq!(depths, [0, 1, 2]);
    assert_eq!(m["backing-filename"], chain[1]["filename"]);
    assert_eq!(chain[0]["filename"], m["top"]["file"]);
    // Sealed layers top first: the reverse of `layers` (bottom first).
    let layers = m["layers"].as_array().unwrap();
    for (c, l) in chain[1..].iter().zip(layers.iter().rev()) {
        let hex = l["digest"].as_str().unwrap().trim_start_matches("sha256:");
        assert!(c["filename"].as_str().unwrap().ends_with(hex), "{c} vs {l}");
        assert!(Path::new(c["filename"].as_str().unwrap()).is_file(), "{c}");
        assert!(c["actual-size"].as_u64().unwrap() > 0, "{c}");
    }
    for w in chain.windows(2) {
        assert_eq!(w[0]["backing-filename"], w[1]["filename"]);
        assert_eq!(w[0]["backing-filename-format"], "mcow-layer");
    }
    assert!(chain[2].get("backing-filename").is_none(), "the bottom has no backing file");

    mcow_ok(dir, &["create", "bare", "1M"]);
    let b = mcow_in(dir, &["info", "bare", "--output", "json"]).json();
    assert!(b.get("backing-filename").is_none() && b["backing-chain"].as_array().unwrap().len() == 1, "{b}");
    let qb: Value =
        serde_json::from_str(&qemu_ok("qemu-img", dir, &["info", "--output=json", "base.qcow2"])).unwrap();
    assert!(qb.get("backing-filename").is_none(), "qemu-img omits it without a backing file: {qb}");
}

/// Runs `sh -c SCRIPT` in `dir` with `$MCOW` set to the binary; returns (stdout, stderr).
fn sh(dir: &Path, script: &str) -> (String, String) {
    let out = Command::new("sh")
        .args(["-c", script])
        .current_dir(dir)
        .env("MCOW", env!("CARGO_BIN_EXE_mcow"))
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(out.status.success(), "sh -c {script:?}: {out:?}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Tried: a disk of 2048 ranges (every other 4 KiB block of 8 MiB holds data; its JSON map is
/// some 300 KB, far more than a pipe holds), then `map` (JSON and text), `info` (both) and a
/// long `read` into `head -1` and into `true` (which reads nothing). Must hold: mcow exits 0
/// and prints nothing on stderr (no "Broken pipe" message, no panic), and head got the first
/// line. (Before, mcow said "writing output: Broken pipe" and exited 1.)
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let mut raw = vec![0u8; 8 << 20];
    for (i, block) in raw.chunks_mut(4096).enumerate() {
        if i % 2 == 0 {
            block.fill(0x5a);
        }
    }
    std::fs::write(dir.join("striped.raw"), &raw).unwrap();
    mcow_ok(dir, &["import", "striped.raw", "d", "-b", "4K"]);
    for (verb, first) in [
        ("map d --output json", "["),
        ("map d", "      OFFSET"),
        ("info d --output json", "{"),
        ("info d", "disk: d"),
        ("read d 0 8M", "00000000:"),
    ] {
        for reader in ["head -1", "true"] {
            let script = format!("{{ \"$MCOW\" {verb}; echo $? > status; }} | {reader}");
            let (stdout, stderr) = sh(dir, &script);
            let status = std::fs::read_to_string(dir.join("status")).unwrap();
            assert_eq!(status.trim(), "0", "{script}: mcow exited {status}, stderr {stderr:?}");
            assert_eq!(stderr, "", "{script}: stderr");
            if reader == "head -1" {
                assert!(stdout.starts_with(first), "{script}: {stdout:?}");
            }
        }
    }
    // Any other failure to write still fails: stdout to a full device.
    let r = Command::new(env!("CARGO_BIN_EXE_mcow"))
        .args(["map", "d", "--output", "json"])
        .current_dir(dir)
        .stdout(std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap())
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(1), "{r:?}");
    assert!(String::from_utf8_lossy(&r.stderr).contains("writing output"), "{r:?}");
}

/// Tried: `create DISK SIZE` as qemu-img takes it, beside `-s`; both at once; neither. Must
/// hold: the positional size makes the same disk as -s; two sizes or none is a usage error.
#[test]
fn create_takes_qemu_img_positional_size() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    mcow_ok(dir, &["create", "a", "1G"]);
    mcow_ok(dir, &["create", "b", "-s", "1G"]);
    for d in ["a", "b"] {
        let info = mcow_in(dir, &["info", d, "--output", "json"]).json();
        assert_eq!(info["virtual_size"], 1u64 << 30, "{d}");
    }
    for args in [&["create", "c", "1G", "-s", "1G"][..], &["create", "c"], &["create", "c", "12Q"]] {
        let r = mcow_in(dir, args);
        assert_eq!(r.code, 1, "{args:?}: {}", r.stderr);
        assert!(!dir.join("c").exists(), "{args:?} made a disk");
    }
    assert!(mcow_ok(dir, &["create", "--help"]).contains("qemu-img"));
}

/// Tried: `info`, `map` and `check` of a qcow2 image and of a raw file given where a disk
/// directory goes. Must hold: exit 1 with a message that says what the file is and to use
/// `mcow import`; the file is untouched.
#[test]
fn an_image_file_given_as_a_disk_gets_a_hint() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    qemu_ok("qemu-img", dir, &["create", "-q", "-f", "qcow2", "img.qcow2", "1M"]);
    std::fs::write(dir.join("img.raw"), vec![0u8; 4096]).unwrap();
    let before = std::fs::read(dir.join("img.qcow2")).unwrap();
    for verb in ["info", "map", "check"] {
        let r = mcow_in(dir, &[verb, "img.qcow2"]);
        assert_eq!(r.code, 1, "{verb}: {}", r.stderr);
        assert!(
            r.stderr.contains("img.qcow2 is a qcow2 image")
                && r.stderr.contains("mcow import img.qcow2 DISK"),
            "{verb}: {}",
            r.stderr
        );
        let r = mcow_in(dir, &[verb, "img.raw"]);
        assert_eq!(r.code, 1);
        assert!(r.stderr.contains("img.raw is a file") && r.stderr.contains("mcow import"), "{}", r.stderr);
    }
    assert!(std::fs::read(dir.join("img.qcow2")).unwrap() == before);
}

/// Tried: seal a fresh disk, then write and seal, then seal again; `commit -n 0` too. Must
/// hold: a seal of an empty top exits 0, says "nothing to seal" on stderr, prints no digest and
/// adds no layer (layer_count and chain digest unchanged); a top with only a discard marker is
/// not empty and is sealed.
#[test]
fn sealing_an_empty_top_adds_no_layer() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    mcow_ok(dir, &["create", "d", "1M"]);
    let count = |dir: &Path| {
        let i = mcow_in(dir, &["info", "d", "--output", "json"]).json();
        (i["layer_count"].as_u64().unwrap(), i["chain_digest"].as_str().unwrap().to_string())
    };
    let check_empty_seal = |args: &[&str], layers: u64| {
        let before = count(dir);
        let r = mcow_in(dir, args);
        assert_eq!(r.code, 0, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains("nothing to seal") && r.stderr.contains("no layer added"), "{}", r.stderr);
        assert_eq!(r.stdout, "", "no digest");
        assert_eq!(count(dir), before);
        assert_eq!(before.0, layers);
    };
    check_empty_seal(&["seal", "d"], 0);
    mcow_ok(dir, &["write", "d", "0", "--pattern", "7", "64K"]);
    assert!(mcow_ok(dir, &["seal", "d"]).starts_with("sha256:"));
    check_empty_seal(&["seal", "d"], 1);
    check_empty_seal(&["commit", "d", "-n", "0"], 1);
    mcow_ok(dir, &["write", "d", "0", "--discard", "64K"]);
    mcow_ok(dir, &["seal", "d"]);
    assert_eq!(count(dir).0, 2, "a discard marker is a change");
}

/// Tried: push of a disk whose top holds only a discard and a zero marker, then one whose top
/// also holds data, then one with an empty top (file:// layouts). Must hold: the first warning
/// says the top holds no data but markers over 2 blocks (not "changes (0 stored blocks)"); the
/// second counts the stored blocks and the markers; the third warns of nothing.
#[test]
fn push_says_what_an_unsealed_top_holds() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    mcow_ok(dir, &["create", "d", "1M"]);
    mcow_ok(dir, &["write", "d", "0", "--pattern", "7", "128K"]);
    mcow_ok(dir, &["seal", "d"]);
    mcow_ok(dir, &["write", "d", "0", "--discard", "64K"]);
    mcow_ok(dir, &["write", "d", "64K", "--zero", "64K"]);
    let push = |tag: &str| {
        let reference = format!("file://{}:{tag}", dir.join("img").display());
        let r = mcow_in(dir, &["push", "d", &reference]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        r.stderr
    };
    let e = push("a");
    assert!(e.contains("holds no data but zero or discard markers over 2 blocks"), "{e}");
    assert!(!e.contains("0 stored blocks"), "{e}");
    mcow_ok(dir, &["write", "d", "256K", "--pattern", "8", "64K"]);
    let e = push("b");
    assert!(e.contains("(1 stored blocks and zero or discard markers over 2 blocks)"), "{e}");
    mcow_ok(dir, &["seal", "d"]);
    assert_eq!(push("c"), "");
}

/// Tried: push's and pull's --help. Must hold: both say how long a transient failure is retried
/// (the numbers are checked against the HTTP defaults by a unit test in transfer.rs).
#[test]
fn push_and_pull_help_say_the_retry_times() {
    let t = tempfile::tempdir().unwrap();
    for verb in ["push", "pull"] {
        let help = mcow_ok(t.path(), &[verb, "--help"]).split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            help.contains("until 30 s after its first attempt")
                && help.contains("MCOW_RETRY_DEADLINE_MS (30000)"),
            "{verb} --help: {help}"
        );
    }
}

/// Tried: run the demo and the `mcow read` line it suggests. Must hold: the read shows what
/// the hint promises: the editor's data and the user edit.
#[test]
fn the_demo_read_hint_shows_what_it_promises() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let out = mcow_ok(dir, &["demo"]);
    let line = out.lines().find(|l| l.trim_start().starts_with("mcow read")).expect("a read hint");
    let (cmd, promise) = line.split_once('#').unwrap();
    assert!(promise.contains("editor") && promise.contains("user edit"), "{line}");
    let args: Vec<&str> = cmd.split_whitespace().skip(1).collect();
    let dump = mcow_ok(dir, &args);
    assert!(dump.contains("|[app: editor 1.0|") && dump.contains("|[user edit] sect|"), "{line}:\n{dump}");
}

/// Tried: the size syntax in `create --help` and in the error for a bad suffix. Must hold: both
/// list the same suffixes (one text).
#[test]
fn size_help_and_size_error_list_the_same_suffixes() {
    let t = tempfile::tempdir().unwrap();
    let flat = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let help = flat(&mcow_ok(t.path(), &["create", "--help"]));
    let r = mcow_in(t.path(), &["create", "d", "-s", "12Q"]);
    assert_eq!(r.code, 1);
    let err = flat(&r.stderr);
    let list =
        "suffix K, M, G, T, P or E (powers of 1024; lower case and KiB, MiB, ... accepted; B for bytes)";
    assert!(help.contains(list), "{help}");
    assert!(err.contains(list), "{err}");
}

/// Tried: `completions bash`, `man`, `man VERB` and `man --dir`. Must hold: the bash script is
/// a completion function naming the verbs; `man` output is roff (starts with .TH) that `man -l`
/// renders with the verbs; `--dir` writes mcow.1 and one page per verb, and `man -l` renders
/// map's page with its qemu-img explanation; an unknown verb is an error.
#[test]
fn completions_and_man_pages_come_from_the_definitions() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let bash = mcow_ok(dir, &["completions", "bash"]);
    assert!(bash.contains("complete -F") && bash.contains("_mcow"), "{bash}");
    for verb in ["create", "import", "serve", "completions", "man"] {
        assert!(bash.contains(verb), "the bash completion does not know {verb}");
    }
    assert!(mcow_ok(dir, &["completions", "zsh"]).contains("#compdef mcow"));
    assert_eq!(mcow_in(dir, &["completions", "tcsh"]).code, 1);

    let page = mcow_ok(dir, &["man"]);
    assert!(page.lines().any(|l| l.starts_with(".TH mcow 1")), "{}", &page[..200.min(page.len())]);
    std::fs::write(dir.join("mcow.1"), &page).unwrap();
    let render = |file: &Path| {
        let out = Command::new("man")
            .args(["-l", "-P", "cat"])
            .arg(file)
            .env("MANWIDTH", "100")
            .env("LC_ALL", "C.UTF-8")
            .output()
            .expect("running man (install man-db)");
        assert!(out.status.success(), "man -l {}: {out:?}", file.display());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = render(&dir.join("mcow.1"));
    assert!(
        text.contains("NAME") && text.contains("mcow-create(1)") && text.contains("mcow-man(1)"),
        "{text}"
    );

    let pages = dir.join("man1");
    let listed = mcow_ok(dir, &["man", "--dir", pages.to_str().unwrap()]);
    for name in ["mcow.1", "mcow-create.1", "mcow-map.1", "mcow-push.1", "mcow-completions.1"] {
        assert!(pages.join(name).is_file(), "{name} not written: {listed}");
        assert!(listed.contains(name), "{listed}");
    }
    let map = render(&pages.join("mcow-map.1"));
    assert!(map.contains("qemu-img") && map.contains("--output"), "{map}");
    assert_eq!(mcow_ok(dir, &["man", "map"]), std::fs::read_to_string(pages.join("mcow-map.1")).unwrap());
    let r = mcow_in(dir, &["man", "nosuchverb"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("no verb"), "{}", r.stderr);
}
