//! `mcow serve` end to end, with real NBD clients: qemu-io, qemu-img, nbdinfo, nbdcopy, nbdsh
//! and nbdfuse (plus a loop device and ext4). Every client runs under a timeout; the server is
//! always stopped with SIGTERM, and mounts, loop devices and FUSE mounts are undone by guards
//! even when a test fails. A missing tool fails the test (never skips).

mod common;
#[path = "common/nbd.rs"]
mod nbd;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use nbd::*;
use serde_json::Value;

const K64: u64 = 65536;
const SIZE: u64 = 8 * MIB;

/// Writes BYTE over [off, off+len) of disk `d` with `mcow write --pattern`, and into `model`.
fn put(dir: &Path, d: &str, model: &mut [u8], off: u64, byte: u8, len: u64) {
    mcow_ok(dir, &["write", d, &off.to_string(), "--pattern", &format!("{byte:#x}"), &len.to_string()]);
    model[off as usize..(off + len) as usize].fill(byte);
}

/// `mcow write --zero` or `--discard` over [off, off+len), and into `model`.
fn clear(dir: &Path, d: &str, model: &mut [u8], how: &str, off: u64, len: u64) {
    mcow_ok(dir, &["write", d, &off.to_string(), how, &len.to_string()]);
    model[off as usize..(off + len) as usize].fill(0);
}

fn seal(dir: &Path, d: &str) -> String {
    mcow_ok(dir, &["seal", d]).trim().to_string()
}

fn info(dir: &Path, d: &str) -> Value {
    mcow_in(dir, &["info", d, "--output", "json"]).json()
}

fn layer_digests(dir: &Path, d: &str) -> Vec<String> {
    info(dir, d)["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

fn top_blocks(dir: &Path, d: &str) -> u64 {
    info(dir, d)["top"]["stored_blocks"].as_u64().unwrap()
}

/// Asserts every sealed layer file in the store still hashes to its name.
fn assert_blobs_intact(dir: &Path, d: &str) {
    let v = info(dir, d);
    let store = Path::new(v["store"].as_str().unwrap()).to_path_buf();
    for digest in layer_digests(dir, d) {
        let hex = digest.strip_prefix("sha256:").unwrap();
        let path = store.join("blobs/sha256").join(hex);
        assert_eq!(sha256_file(&path), hex, "sealed layer {} was modified", path.display());
    }
}

/// An 8 MiB disk `d` with 64 KiB blocks: two sealed layers and some data in its top, with
/// unaligned data edges. Returns its content.
fn layered_disk(dir: &Path, d: &str) -> Vec<u8> {
    let mut m = vec![0u8; SIZE as usize];
    mcow_ok(dir, &["create", d, "-s", "8M"]);
    put(dir, d, &mut m, 0, 0x11, MIB);
    put(dir, d, &mut m, 3 * MIB, 0x12, 200_000);
    seal(dir, d);
    put(dir, d, &mut m, 512 * 1024, 0x21, MIB);
    put(dir, d, &mut m, 5 * MIB + 777, 0x22, 100_000);
    seal(dir, d);
    put(dir, d, &mut m, 6 * MIB, 0x31, K64);
    m
}

/// Runs `mcow` under a timeout (for verbs that would block if they wrongly succeeded).
fn mcow_timeout(dir: &Path, args: &[&str]) -> Run {
    let out = std::process::Command::new(tool("timeout"))
        .args(["-k", "5", "20", env!("CARGO_BIN_EXE_mcow")])
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let r = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert_ne!(r.code, 124, "mcow {args:?} timed out:\n{}", r.stderr);
    r
}

/// Runs qemu-io on an NBD URI with the given commands.
fn qemu_io(uri: &str, cmds: &[String], read_only: bool) -> Run {
    let mut args: Vec<&str> = vec!["-f", "raw"];
    if read_only {
        args.push("-r");
    }
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    tool_run("qemu-io", Path::new("/"), &args)
}

/// Runs qemu-io and asserts every command succeeded (exit 0, no "failed" message).
fn qemu_io_ok(uri: &str, cmds: &[String], read_only: bool) -> String {
    let r = qemu_io(uri, cmds, read_only);
    let all = format!("{}{}", r.stdout, r.stderr);
    assert!(
        r.code == 0 && !all.contains("failed") && !all.contains("can't"),
        "qemu-io on {uri} with {cmds:?} failed ({}):\n{all}",
        r.code
    );
    r.stdout
}

/// `read -P` commands that check every byte of `model` (one per run of equal bytes).
fn verify_cmds(model: &[u8]) -> Vec<String> {
    let mut cmds = Vec::new();
    let mut start = 0;
    while start < model.len() {
        let b = model[start];
        let mut end = start;
        while end < model.len() && model[end] == b && end - start < (16 << 20) {
            end += 1;
        }
        cmds.push(format!("read -P {b:#x} {start} {}", end - start));
        start = end;
    }
    assert!(cmds.len() < 200, "model too fragmented for qemu-io checks");
    cmds
}

/// (1) qemu-io writes through the Unix socket and TCP on a 2-layer stack, including sub-block
/// writes over sealed data; everything reads back through both transports and from the disk
/// after the server stopped, and the writes landed in the top only.
#[test]
fn qemu_io_writes_over_unix_and_tcp_land_in_the_top() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let mut m = layered_disk(dir, "d");
    let digests = layer_digests(dir, "d");
    let sealed_blocks = stored_blocks(dir, "d");
    let top_before = top_blocks(dir, "d");
    assert_eq!(digests.len(), 2);

    let srv = Serve::start(dir, &["d"]);
    let (unix, tcp) = (srv.unix_uri("d"), srv.tcp_uri("d"));
    // Over the Unix socket: one whole aligned span over layer 2, one sub-block write at an odd
    // offset inside a block of layer 1.
    qemu_io_ok(&unix, &["write -P 0xab 1048576 131072".into(), "write -P 0xcd 12345 512".into()], false);
    m[1048576..1048576 + 131072].fill(0xab);
    m[12345..12345 + 512].fill(0xcd);
    // Over TCP: an unaligned write crossing a block boundary over layer 1's data, and a
    // sub-block write of zeros over layer 2's data.
    let cross = 50 * K64 - 1000;
    qemu_io_ok(&tcp, &[format!("write -P 0xef {cross} 4097"), "write -z 600001 1000".into()], false);
    m[cross as usize..cross as usize + 4097].fill(0xef);
    m[600001..601001].fill(0);

    let cmds = verify_cmds(&m);
    qemu_io_ok(&unix, &cmds, true);
    qemu_io_ok(&tcp, &cmds, true);
    // While served writable, the disk is locked: a second server cannot open it.
    let r = mcow_timeout(dir, &["serve", "-k", "other.sock", "d"]);
    assert_eq!(r.code, 1, "a second writable `mcow serve` of the same disk:\n{}", r.stderr);
    assert!(r.stderr.contains("opening disk"), "{}", r.stderr);
    // A wrong pattern is noticed (the check above can fail).
    let bad = qemu_io(&unix, &["read -P 0xcd 12344 2".into()], true);
    assert!(bad.code != 0 && bad.stdout.contains("Pattern verification failed"), "{}", bad.stdout);
    srv.stop();

    assert!(export_bytes(dir, "d") == m, "exported content differs from what qemu-io wrote");
    mcow_ok(dir, &["check", "d"]);
    assert_eq!(layer_digests(dir, "d"), digests, "sealed layers changed");
    assert_eq!(stored_blocks(dir, "d"), sealed_blocks, "sealed layers' stored blocks changed");
    assert_blobs_intact(dir, "d");
    let top_after = top_blocks(dir, "d");
    assert!(
        top_after >= top_before + 4,
        "top stored blocks {top_before} -> {top_after}: writes not in the top?"
    );
}

/// (2) `qemu-img compare` of a read-only export against `mcow export` of the same disk, made
/// while the server has it open.
#[test]
fn qemu_img_compare_export_against_mcow_export() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let m = layered_disk(dir, "d");
    let srv = Serve::start(dir, &["-r", "-U", "d"]);
    // The disk is served (read-only): exporting it at the same time works.
    mcow_ok(dir, &["export", "d", "out.raw"]);
    assert!(std::fs::read(dir.join("out.raw")).unwrap() == m);
    for uri in [srv.unix_uri("d"), srv.tcp_uri("d")] {
        let out = qemu_ok("qemu-img", dir, &["compare", "-f", "raw", "-F", "raw", &uri, "out.raw"]);
        assert!(out.contains("Images are identical"), "{out}");
    }
    // One changed byte inside sealed data is found at its offset.
    std::fs::copy(dir.join("out.raw"), dir.join("bad.raw")).unwrap();
    write_at(&dir.join("bad.raw"), 5 * MIB + 1000, &[0x99]);
    let r = tool_run("qemu-img", dir, &["compare", "-f", "raw", "-F", "raw", &srv.unix_uri("d"), "bad.raw"]);
    assert_eq!(r.code, 1, "compare should report a difference:\n{}{}", r.stdout, r.stderr);
    // qemu-img reports the 512-byte sector holding the difference.
    assert!(r.stdout.contains(&format!("offset {}", (5 * MIB + 1000) / 512 * 512)), "{}", r.stdout);
    srv.stop();
}

/// (3) `qemu-img convert` out of an export (to qcow2 and raw) and into a writable export
/// (`-n`, over sealed layers, including zeros over sealed data).
#[test]
fn qemu_img_convert_from_and_into_exports() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let m = layered_disk(dir, "d");
    std::fs::write(dir.join("orig.raw"), &m).unwrap();

    let srv = Serve::start(dir, &["-r", "d"]);
    let uri = srv.unix_uri("d");
    qemu_ok("qemu-img", dir, &["convert", "-f", "raw", "-O", "qcow2", &uri, "out.qcow2"]);
    qemu_ok("qemu-img", dir, &["convert", "-f", "raw", "-O", "raw", &srv.tcp_uri("d"), "out.raw"]);
    srv.stop();
    assert!(std::fs::read(dir.join("out.raw")).unwrap() == m, "convert to raw differs");
    let out = qemu_ok("qemu-img", dir, &["compare", "-f", "qcow2", "-F", "raw", "out.qcow2", "orig.raw"]);
    assert!(out.contains("Images are identical"), "{out}");

    // A source image unlike the sealed layers: data, zeros over sealed data, odd edges.
    let mut src = vec![0u8; SIZE as usize];
    for (i, b) in src[..2 * MIB as usize].iter_mut().enumerate() {
        *b = (i / 4096 % 251) as u8 + 1;
    }
    src[(5 * MIB + 3) as usize..(7 * MIB - 5) as usize].fill(0x5a);
    src[100_001..100_001 + 333].fill(0);
    std::fs::write(dir.join("src.raw"), &src).unwrap();
    mcow_ok(dir, &["create", "--from", "d", "t"]);
    let digests = layer_digests(dir, "t");
    let srv = Serve::start(dir, &["t"]);
    qemu_ok("qemu-img", dir, &["convert", "-n", "-f", "raw", "-O", "raw", "src.raw", &srv.unix_uri("t")]);
    srv.stop();
    assert!(export_bytes(dir, "t") == src, "convert -n into the export: content differs from src.raw");
    mcow_ok(dir, &["check", "t"]);
    assert_eq!(layer_digests(dir, "t"), digests);
    assert_blobs_intact(dir, "t");
}

fn exports_by_name(list: &Value) -> std::collections::BTreeMap<String, Value> {
    list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["export-name"].as_str().unwrap().to_string(), e.clone()))
        .collect()
}

/// (4) nbdinfo lists both exports with sizes, contexts and block sizes; a read-only export says
/// so and refuses writes, both in qemu-io and from the server itself (libnbd, strict mode off).
#[test]
fn nbdinfo_lists_exports_and_read_only_refuses_writes() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let mut m = vec![0u8; 4 * MIB as usize];
    mcow_ok(dir, &["create", "a", "-s", "4M", "-b", "4K"]);
    put(dir, "a", &mut m, 4096, 0x42, 10_000);
    mcow_ok(dir, &["create", "b", "-s", "3M"]);

    let srv = Serve::start(dir, &["first=a", "second=b"]);
    let list_uri = format!("nbd+unix:///?socket={}", srv.sock.display());
    let list: Value =
        serde_json::from_str(&tool_ok("nbdinfo", dir, &["--list", "--json", &list_uri])).unwrap();
    assert_eq!(list["structured"], Value::Bool(true));
    let ex = exports_by_name(&list);
    assert_eq!(ex.keys().cloned().collect::<Vec<_>>(), ["first", "second"]);
    for (name, size, preferred) in [("first", 4 * MIB, 4096), ("second", 3 * MIB, K64)] {
        let e = &ex[name];
        assert_eq!(e["export-size"].as_u64(), Some(size), "{name}: {e}");
        let ctx: Vec<&str> = e["contexts"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
        assert!(
            ctx.contains(&"base:allocation") && ctx.contains(&"mcow:allocation-depth"),
            "{name}: {ctx:?}"
        );
        assert_eq!(e["block_size_minimum"].as_u64(), Some(1), "{name}");
        assert_eq!(e["block_size_preferred"].as_u64(), Some(preferred), "{name}");
        assert_eq!(e["block_size_maximum"].as_u64(), Some(32 * MIB), "{name}");
        assert_eq!(e["is_read_only"], Value::Bool(false), "{name}");
        for flag in ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"] {
            assert_eq!(e[flag], Value::Bool(true), "{name}: {flag}");
        }
    }
    // One export over TCP, by name.
    let one: Value =
        serde_json::from_str(&tool_ok("nbdinfo", dir, &["--json", &srv.tcp_uri("second")])).unwrap();
    assert_eq!(one["exports"][0]["export-size"].as_u64(), Some(3 * MIB), "{one}");
    // An unknown export name is refused.
    let r = tool_run("nbdinfo", dir, &["--json", &srv.unix_uri("nope")]);
    assert_ne!(r.code, 0, "nbdinfo on an unknown export succeeded:\n{}", r.stdout);
    srv.stop();

    let srv = Serve::start(dir, &["-r", "first=a"]);
    let uri = srv.unix_uri("first");
    let one: Value = serde_json::from_str(&tool_ok("nbdinfo", dir, &["--json", &uri])).unwrap();
    assert_eq!(one["exports"][0]["is_read_only"], Value::Bool(true), "{one}");
    let r = qemu_io(&uri, &["write -P 0xee 0 4096".into()], false);
    let all = format!("{}{}", r.stdout, r.stderr);
    assert!(r.code != 0, "qemu-io wrote to a read-only export:\n{all}");
    assert!(
        all.contains("Permission denied")
            || all.contains("Operation not permitted")
            || all.contains("read-only"),
        "unexpected qemu-io error:\n{all}"
    );
    // Past libnbd's own checks, the server itself answers EPERM to every kind of write.
    let script = "h.set_strict_mode(0)\n\
        for name, f in [('write', lambda: h.pwrite(b'x' * 512, 0)), ('zero', lambda: h.zero(4096, 0)),\n\
                        ('trim', lambda: h.trim(4096, 0))]:\n\
        \x20   try:\n\
        \x20       f()\n\
        \x20       print(name, 'OK')\n\
        \x20   except nbd.Error as e:\n\
        \x20       print(name, e.errno)\n";
    let out = tool_ok("nbdsh", dir, &["-u", &uri, "-c", script]);
    assert_eq!(out, "write EPERM\nzero EPERM\ntrim EPERM\n");
    qemu_io_ok(&uri, &["read -P 0x42 4096 10000".into()], true);
    srv.stop();
    assert!(export_bytes(dir, "a") == m, "the read-only export was modified");
}

/// One extent of `nbdinfo --map --json`: (offset, length, type).
fn nbd_map(dir: &Path, context: &str, uri: &str, size: u64) -> Vec<(u64, u64, u64)> {
    let out = tool_ok("nbdinfo", dir, &[&format!("--map={context}"), "--json", uri]);
    let v: Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo --map output ({e}):\n{out}"));
    let ext: Vec<(u64, u64, u64)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["type"].as_u64().unwrap()))
        .collect();
    let mut pos = 0;
    for (i, &(off, len, ty)) in ext.iter().enumerate() {
        assert_eq!(off, pos, "{context}: gap or overlap at {i}: {ext:?}");
        assert!(len > 0);
        if i > 0 {
            assert_ne!(ext[i - 1].2, ty, "{context}: neighbours with the same type were not merged: {ext:?}");
        }
        pos += len;
    }
    assert_eq!(pos, size, "{context}: map does not cover the disk: {ext:?}");
    ext
}

/// The type of the extent holding `at`.
fn type_at(ext: &[(u64, u64, u64)], at: u64) -> u64 {
    ext.iter().find(|e| e.0 <= at && at < e.0 + e.1).unwrap().2
}

/// (5) `nbdinfo --map` (base:allocation and mcow:allocation-depth) agrees with `mcow map`.
#[test]
fn nbdinfo_map_matches_mcow_map() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let mut m = layered_disk(dir, "d");
    // A zero marker and a discard over sealed data, data and zeros in the top.
    clear(dir, "d", &mut m, "--zero", 0, K64);
    clear(dir, "d", &mut m, "--discard", 2 * K64, K64);
    put(dir, "d", &mut m, 7 * MIB, 0x41, 3 * K64);
    clear(dir, "d", &mut m, "--zero", 7 * MIB + K64, K64);
    let map = mcow_in(dir, &["map", "d", "--output", "json"]).json();
    let map = map.as_array().unwrap();

    let srv = Serve::start(dir, &["-r", "d"]);
    let base = nbd_map(dir, "base:allocation", &srv.unix_uri("d"), SIZE);
    let depth = nbd_map(dir, "mcow:allocation-depth", &srv.tcp_uri("d"), SIZE);
    srv.stop();

    // Compare on every piece between the boundaries of all three maps.
    let mut cuts: Vec<u64> = vec![SIZE];
    cuts.extend(map.iter().map(|e| e["start"].as_u64().unwrap()));
    cuts.extend(base.iter().chain(&depth).map(|e| e.0));
    cuts.sort();
    cuts.dedup();
    let mut seen_depths = std::collections::BTreeSet::new();
    for w in cuts.windows(2) {
        let at = w[0];
        let e = map
            .iter()
            .find(|e| {
                let s = e["start"].as_u64().unwrap();
                s <= at && at < s + e["length"].as_u64().unwrap()
            })
            .unwrap();
        let (present, data) = (e["present"].as_bool().unwrap(), e["data"].as_bool().unwrap());
        let mdepth = e["depth"].as_u64().unwrap();
        let bt = type_at(&base, at);
        let ok = if data {
            bt == 0
        } else if !present {
            bt == 3
        } else {
            bt == 2 || bt == 3
        };
        assert!(ok, "base:allocation at {at}: type {bt}, mcow map {e}");
        let want = if present { mdepth + 1 } else { 0 };
        let dt = type_at(&depth, at);
        assert_eq!(dt, want, "mcow:allocation-depth at {at}: mcow map {e}");
        seen_depths.insert(dt);
    }
    assert_eq!(
        seen_depths.into_iter().collect::<Vec<_>>(),
        [0, 1, 2, 3],
        "all of absent/top/layer 2/layer 1"
    );
    // The zero marker is "zero", the discard a hole, both held by the top.
    assert_eq!(type_at(&base, 0), 2, "{base:?}");
    assert_eq!(type_at(&base, 2 * K64), 3, "{base:?}");
    assert_eq!((type_at(&depth, 0), type_at(&depth, 2 * K64)), (1, 1), "{depth:?}");
    assert_eq!((type_at(&base, 7 * MIB), type_at(&base, 7 * MIB + K64)), (0, 2));
    // And the bytes agree with the map.
    assert!(export_bytes(dir, "d") == m);
}

/// (6) nbdcopy to a file and to a pipe gives the bytes of `mcow export`.
#[test]
fn nbdcopy_matches_mcow_export() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    layered_disk(dir, "d");
    mcow_ok(dir, &["export", "d", "exp.raw"]);
    let want = sha256_file(&dir.join("exp.raw"));
    let srv = Serve::start(dir, &["-r", "d"]);
    tool_ok("nbdcopy", dir, &[&srv.unix_uri("d"), "copy.raw"]);
    assert_eq!(sha256_file(&dir.join("copy.raw")), want, "nbdcopy to a file");
    let piped = sh_ok(dir, &format!("nbdcopy '{}' - | sha256sum", srv.tcp_uri("d")));
    assert_eq!(piped.split_whitespace().next(), Some(want.as_str()), "nbdcopy to a pipe");
    srv.stop();
}

/// Mounts the ext4 filesystem of export `name` (nbdfuse, then a loop device), runs `f` on the
/// mount point, and undoes everything (also if `f` panics).
fn with_mounted_export(work: &Path, uri: &str, f: impl FnOnce(&Path)) {
    let fusemnt = work.join("fusemnt");
    let mnt = work.join("mnt");
    std::fs::create_dir_all(&fusemnt).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let fuse = FuseFile::mount(&fusemnt, uri);
    let lo = Loop::attach(&fuse.file);
    let mount = Mount::attach(lo.dev(), &mnt);
    f(&mnt);
    mount.finish();
    lo.finish();
    fuse.finish();
}

/// (7) An ext4 base image, a software layer installed through nbdfuse + loop + mount and
/// sealed, then a VM disk on it: everything is visible, the VM's write lands in its top only,
/// and the exported image is a clean filesystem holding the new file.
#[test]
fn ext4_software_layer_and_vm_through_nbdfuse_and_loop() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let src = dir.join("rootdir");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/os-release"), "NAME=mcow-test\n").unwrap();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 253) as u8).collect();
    std::fs::write(src.join("base.bin"), &big).unwrap();
    tool_ok(
        "mkfs.ext4",
        dir,
        &["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", "-d", "rootdir", "img", "64M"],
    );
    let base_digest = mcow_ok(dir, &["import", "img", "base"]).lines().next().unwrap().trim().to_string();
    assert!(base_digest.starts_with("sha256:"), "{base_digest}");

    // The software layer.
    mcow_ok(dir, &["create", "--from", "base", "sw"]);
    let app: Vec<u8> = (0..200_000u32).map(|i| (i * 13 % 241) as u8).collect();
    let srv = Serve::start(dir, &["sw"]);
    with_mounted_export(dir, &srv.unix_uri("sw"), |mnt| {
        assert_eq!(std::fs::read_to_string(mnt.join("etc/os-release")).unwrap(), "NAME=mcow-test\n");
        std::fs::create_dir_all(mnt.join("opt/app")).unwrap();
        std::fs::write(mnt.join("opt/app/app.bin"), &app).unwrap();
        std::fs::write(mnt.join("opt/app/VERSION"), "1.2.3\n").unwrap();
    });
    srv.stop();
    mcow_ok(dir, &["check", "sw"]);
    assert!(top_blocks(dir, "sw") > 0, "the software install did not reach sw's top");
    seal(dir, "sw");
    let sw_layers = layer_digests(dir, "sw");
    assert_eq!(sw_layers.len(), 2);
    assert_eq!(sw_layers[0], base_digest);

    // The VM disk.
    mcow_ok(dir, &["create", "--from", "sw", "vm"]);
    let srv = Serve::start(dir, &["vm"]);
    with_mounted_export(dir, &srv.tcp_uri("vm"), |mnt| {
        assert_eq!(std::fs::read_to_string(mnt.join("etc/os-release")).unwrap(), "NAME=mcow-test\n");
        assert!(std::fs::read(mnt.join("base.bin")).unwrap() == big, "base file content");
        assert!(std::fs::read(mnt.join("opt/app/app.bin")).unwrap() == app, "app file content");
        assert_eq!(std::fs::read_to_string(mnt.join("opt/app/VERSION")).unwrap(), "1.2.3\n");
        std::fs::write(mnt.join("newfile"), "written by the VM\n").unwrap();
    });
    srv.stop();

    mcow_ok(dir, &["check", "vm"]);
    assert!(top_blocks(dir, "vm") > 0, "the VM's write did not reach its top");
    assert_eq!(layer_digests(dir, "vm"), sw_layers, "the VM disk's sealed layers changed");
    assert_eq!(layer_digests(dir, "sw"), sw_layers);
    assert_blobs_intact(dir, "vm");
    mcow_ok(dir, &["export", "vm", "vm.raw"]);
    let r = tool_run("e2fsck", dir, &["-fn", "vm.raw"]);
    assert_eq!(r.code, 0, "e2fsck -fn on the exported VM disk:\n{}{}", r.stdout, r.stderr);
    let cat = |file: &str| tool_ok("debugfs", dir, &["-R", &format!("cat {file}"), "vm.raw"]);
    assert_eq!(cat("/newfile"), "written by the VM\n");
    assert_eq!(cat("/opt/app/VERSION"), "1.2.3\n");
    // The software layer alone (sw's export) has the app but not the VM's file.
    mcow_ok(dir, &["export", "sw", "sw.raw"]);
    let r = tool_run("debugfs", dir, &["-R", "stat /newfile", "sw.raw"]);
    assert!(format!("{}{}", r.stdout, r.stderr).contains("File not found"), "{}{}", r.stdout, r.stderr);
}

/// (8) SIGTERM while a qemu-io client is connected and idle (after an unflushed write): the
/// server exits 0 promptly and the write is in the disk.
#[test]
fn sigterm_with_an_idle_client_exits_zero_and_keeps_writes() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let mut m = layered_disk(dir, "d");
    let srv = Serve::start(dir, &["d"]);
    let mut qio = tool_cmd("qemu-io", dir)
        .args(["-f", "raw", &srv.unix_uri("d")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting qemu-io");
    let mut stdin = qio.stdin.take().unwrap();
    let stdout = qio.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    // Unaligned, across blocks, over sealed data of both layers; no flush requested.
    writeln!(stdin, "write -P 0x77 1000000 70000").unwrap();
    stdin.flush().unwrap();
    m[1_000_000..1_070_000].fill(0x77);
    let mut got = String::new();
    while !got.contains("wrote 70000/70000") {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => got += &format!("{l}\n"),
            Err(_) => panic!("qemu-io did not report the write:\n{got}"),
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let (code, took) = srv.stop_timed();
    assert_eq!(code, 0, "mcow serve exited {code} after SIGTERM with a client connected");
    assert!(took < Duration::from_secs(8), "shutdown waited for the idle client: {took:?}");
    drop(stdin);
    let st = wait_timeout(&mut qio, Duration::from_secs(30));
    if st.is_none() {
        let _ = qio.kill();
        let _ = qio.wait();
        panic!("qemu-io did not exit after its stdin closed");
    }
    assert!(export_bytes(dir, "d") == m, "the write before SIGTERM is not in the disk");
    mcow_ok(dir, &["check", "d"]);
}

/// (9) Garbage from raw TCP and Unix clients does not hurt the server: qemu-io still reads.
#[test]
fn garbage_clients_do_not_hurt_the_server() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let m = layered_disk(dir, "d");
    let mut srv = Serve::start(dir, &["d"]);
    let garbage: Vec<u8> = (0..8192u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();

    let mut s = std::net::TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT", "newstyle greeting");
    let _ = s.write_all(&garbage);
    // The server drops the connection instead of waiting for more.
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the server kept a garbage connection open: {e}"),
    }
    drop(s);

    // Garbage before reading the greeting, over the Unix socket; and an instant hang-up.
    let mut u = std::os::unix::net::UnixStream::connect(&srv.sock).unwrap();
    let _ = u.write_all(&garbage);
    drop(u);
    drop(std::net::TcpStream::connect(("127.0.0.1", srv.port)).unwrap());

    assert!(srv.running(), "the server died:\n{}", srv.log());
    let cmds = verify_cmds(&m);
    qemu_io_ok(&srv.tcp_uri("d"), &cmds, true);
    qemu_io_ok(&srv.unix_uri("d"), &cmds, true);
    srv.stop();
    mcow_ok(dir, &["check", "d"]);
}

/// (10) The issue's case over NBD: a `mcow serve -r -U` reader beside a `mcow serve` writer of
/// the same disk. Tried: `mcow write` puts 0x5a at 8M and flushes; both servers start; the
/// reader's qemu-io sees 0x5a at 8M; the writer's qemu-io discards 8M, flushes, writes 0xc3 at
/// 12M (into the physical block 8M had: the top's data file keeps one block) and flushes.
/// Must hold: the reader never shows 0xc3 at 8M; as both flushes completed before its reads,
/// it shows zeros at 8M and 0xc3 at 12M, through qemu-io and through a whole-disk nbdcopy.
#[test]
fn force_share_reader_beside_a_writer_never_shows_another_offsets_data() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let (at8, at12) = (8 * MIB, 12 * MIB);
    mcow_ok(dir, &["create", "d", "-s", "16M"]);
    mcow_ok(dir, &["write", "d", &at8.to_string(), "--pattern", "0x5a", &K64.to_string()]);
    let writer = Serve::start(dir, &["d"]);
    let reader = Serve::start(dir, &["-r", "-U", "d"]);
    let r = reader.unix_uri("d");
    qemu_io_ok(&r, &[format!("read -P 0x5a {at8} {K64}")], true);

    qemu_io_ok(
        &writer.unix_uri("d"),
        &[
            format!("discard {at8} {K64}"),
            "flush".into(),
            format!("write -P 0xc3 {at12} {K64}"),
            "flush".into(),
        ],
        false,
    );
    let data_len = std::fs::metadata(dir.join("d/top-1.mcow")).unwrap().len();
    assert_eq!(data_len, 4096 + K64, "the write at 12M reused the block freed at 8M");

    // A wrong answer is noticed: the reader's 8M is not 0xc3.
    let bad = qemu_io(&r, &[format!("read -P 0xc3 {at8} {K64}")], true);
    assert!(bad.stdout.contains("Pattern verification failed"), "{}{}", bad.stdout, bad.stderr);
    qemu_io_ok(&r, &[format!("read -P 0 {at8} {K64}"), format!("read -P 0xc3 {at12} {K64}")], true);
    tool_ok("nbdcopy", dir, &[&r, "copy.raw"]);
    let mut want = vec![0u8; 16 * MIB as usize];
    want[at12 as usize..(at12 + K64) as usize].fill(0xc3);
    assert!(std::fs::read(dir.join("copy.raw")).unwrap() == want, "nbdcopy of the -U export differs");
    reader.stop();
    writer.stop();
    assert!(export_bytes(dir, "d") == want, "the disk itself differs from what the writer wrote");
}

/// A raw client on `sock` that negotiates `export` (NBD_OPT_GO, simple replies) and stays.
fn negotiated(sock: &Path, export: &str) -> std::os::unix::net::UnixStream {
    use mcow_nbd::proto::{self, ClientFlags, ClientOption, InfoRequest, OptionReplyHeader};
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; proto::GREETING_LEN];
    s.read_exact(&mut greeting).expect("greeting");
    s.write_all(&ClientFlags { fixed_newstyle: true, no_zeroes: true }.encode()).unwrap();
    s.write_all(&ClientOption::Go(InfoRequest { name: export.into(), requests: vec![] }).encode()).unwrap();
    loop {
        let mut h = [0u8; proto::OPTION_REPLY_HEADER_LEN];
        s.read_exact(&mut h).expect("option reply");
        let h = OptionReplyHeader::decode(&h).unwrap();
        assert_eq!(h.reply_type & proto::NBD_REP_FLAG_ERROR, 0, "GO refused: {h:?}");
        let mut data = vec![0u8; h.length as usize];
        s.read_exact(&mut data).unwrap();
        if h.reply_type == proto::NBD_REP_ACK {
            return s;
        }
    }
}

/// Threads of process `pid`, from /proc.
fn threads_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Threads:")).unwrap();
    line["Threads:".len()..].trim().parse().unwrap()
}

/// Waits (up to `limit`) until `pid` has `want` threads; returns the last count seen.
fn wait_threads(pid: u32, want: u64, limit: Duration) -> u64 {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let n = threads_of(pid);
        if n == want || std::time::Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// (11) Idle connections hold one thread each; busy ones more, for a while.
#[test]
fn idle_connections_hold_one_server_thread_each() {
    // Tried: 40 raw clients negotiate and stay idle; then each sends 16 pipelined 64 KiB
    // reads and reads the replies; then they are idle again, then leave. Must hold (threads
    // of `mcow serve` from /proc/PID/status): idle, exactly one thread per connection over
    // the count before; busy, at most one per request in flight (16 per connection; the
    // limit, 32, is above that); about a second after the last
    // request, one per connection again; when they leave, the count before.
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let m = layered_disk(dir, "d");
    let srv = Serve::start(dir, &["d"]);
    let pid = srv.pid();
    std::thread::sleep(Duration::from_millis(200));
    let before = threads_of(pid);
    const N: u64 = 40;
    let mut conns: Vec<_> = (0..N).map(|_| negotiated(&srv.sock, "d")).collect();
    assert_eq!(
        wait_threads(pid, before + N, Duration::from_secs(5)),
        before + N,
        "threads at {N} idle connections"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(threads_of(pid), before + N, "idle connections started more threads");

    let mut peak = 0;
    for (c, s) in conns.iter_mut().enumerate() {
        let mut batch = Vec::new();
        for i in 0..16u64 {
            let offset = (c as u64 * 16 + i) * K64 % SIZE;
            let req = mcow_nbd::proto::Request {
                flags: 0,
                command: mcow_nbd::proto::Command::Read,
                handle: i,
                offset,
                length: K64 as u32,
            };
            batch.extend(req.encode());
        }
        s.write_all(&batch).unwrap();
        peak = peak.max(threads_of(pid));
        for _ in 0..16 {
            let mut hdr = [0u8; 16];
            s.read_exact(&mut hdr).unwrap();
            assert_eq!(&hdr[4..8], &[0, 0, 0, 0], "read failed");
            let handle = u64::from_be_bytes(hdr[8..16].try_into().unwrap());
            let offset = ((c as u64 * 16 + handle) * K64 % SIZE) as usize;
            let mut data = vec![0u8; K64 as usize];
            s.read_exact(&mut data).unwrap();
            assert!(data == m[offset..offset + K64 as usize], "wrong data at {offset}");
        }
        peak = peak.max(threads_of(pid));
    }
    assert!(peak <= before + 16 * N, "{peak} threads for {N} connections");
    eprintln!("threads: {before} before, {} with {N} idle connections, peak {peak} while busy", before + N);
    assert_eq!(
        wait_threads(pid, before + N, Duration::from_secs(10)),
        before + N,
        "extra workers did not end"
    );
    drop(conns);
    assert_eq!(wait_threads(pid, before, Duration::from_secs(5)), before, "connection threads did not end");
    srv.stop();
}

/// (12) `--max-connections`, `--max-handshakes`, `--handshake-timeout`: clients that never
/// finish negotiating cannot lock out nbdinfo; a full server refuses with a warning.
#[test]
fn connection_limits_keep_room_for_real_clients_and_warn_when_full() {
    // Tried: room for 4 connections, 1 negotiating, a 0.5 s handshake timeout; 2 clients
    // negotiate and stay idle, 1 connects and sends nothing. Must hold: nbdinfo gets through
    // at once (the silent client is cut for it, and logged); a client that negotiates too
    // slowly is cut by the timeout; with 4 idle clients a new connection is closed at once and
    // the server warns "too many NBD connections" (default log level); nbdinfo works again once
    // one leaves.
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    layered_disk(dir, "d");
    let srv = Serve::start(
        dir,
        &["d", "--max-connections", "4", "--max-handshakes", "1", "--handshake-timeout", "0.5"],
    );
    let mut idle = vec![negotiated(&srv.sock, "d"), negotiated(&srv.sock, "d")];
    let mut silent = std::os::unix::net::UnixStream::connect(&srv.sock).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    silent.read_exact(&mut greeting).unwrap();
    let size = tool_ok("nbdinfo", dir, &["--size", &srv.unix_uri("d")]);
    assert_eq!(size.trim(), SIZE.to_string());
    // (That the silent client was cut for nbdinfo, not by the timeout, the log shows below.)
    let mut rest = Vec::new();
    let _ = silent.read_to_end(&mut rest);
    // A slow client, alone in negotiation: cut by the timeout.
    let mut slow = std::os::unix::net::UnixStream::connect(&srv.sock).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = std::time::Instant::now();
    let _ = slow.read_to_end(&mut rest);
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(400) && took < Duration::from_secs(3), "cut after {took:?}");

    idle.push(negotiated(&srv.sock, "d"));
    idle.push(negotiated(&srv.sock, "d"));
    let mut refused = std::os::unix::net::UnixStream::connect(&srv.sock).unwrap();
    refused.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    match refused.read_to_end(&mut got) {
        Ok(_) => assert!(got.is_empty(), "a 5th connection was greeted"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }
    drop(idle.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while tool_run("nbdinfo", dir, &["--size", &srv.unix_uri("d")]).code != 0 {
        assert!(std::time::Instant::now() < deadline, "nbdinfo never got the freed place");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(idle);
    let log = srv.stop_with_log();
    assert!(log.contains("WARN") && log.contains("too many NBD connections; refusing a new one"), "{log}");
    assert!(log.contains("limit=4"), "{log}");
    assert!(log.contains("too many NBD connections negotiating at once"), "{log}");
}

/// (13) A read that fails in the disk (here a sealed block that no longer matches its hash)
/// reaches the client as EIO and is logged at the default level, with its cause.
#[test]
fn a_failing_read_is_logged_at_warn_with_its_cause() {
    // Tried: one byte of a sealed layer's first block flipped, then qemu-io reads that block
    // through `mcow serve` (no RUST_LOG). Must hold: the read fails; the server's stderr has a
    // WARN line "I/O error returned to the NBD client" naming the export, the offset and the
    // engine's error; the server keeps serving the other blocks.
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    mcow_ok(dir, &["create", "d", "-s", "8M"]);
    let mut m = vec![0u8; SIZE as usize];
    put(dir, "d", &mut m, 0, 0x11, 2 * K64);
    let digest = seal(dir, "d");
    let store = std::path::PathBuf::from(info(dir, "d")["store"].as_str().unwrap().to_string());
    let layer = store.join("blobs/sha256").join(digest.trim_start_matches("sha256:"));
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&layer).unwrap();
    let at = mcow_format::HEADER_SIZE as u64 + 100;
    let mut b = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, at).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[b[0] ^ 0xff], at).unwrap();
    drop(f);
    let srv = Serve::start(dir, &["d"]);
    let r = qemu_io(&srv.unix_uri("d"), &["read 0 4k".to_string()], true);
    let all = format!("{}{}", r.stdout, r.stderr);
    assert!(all.contains("Input/output error") || all.contains("failed"), "the read did not fail: {all}");
    qemu_io_ok(&srv.unix_uri("d"), &[format!("read -P 0x11 {K64} {K64}")], true);
    let log = srv.stop_with_log();
    let line = log
        .lines()
        .find(|l| l.contains("I/O error returned to the NBD client"))
        .unwrap_or_else(|| panic!("no warn line for the failed read:\n{log}"));
    assert!(line.contains("WARN") && line.contains("export=d") && line.contains("offset=0"), "{line}");
    assert!(line.contains("fails its checksum"), "the cause is missing: {line}");
}
