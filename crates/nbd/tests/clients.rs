//! The server against real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy) run as
//! subprocesses, over a Unix socket and loopback TCP.

mod support;

use std::sync::Arc;

use mcow_nbd::proto::{NBD_STATE_HOLE, NBD_STATE_ZERO};
use mcow_nbd::{MemExport, ServerConfig};
use support::{EXTRA_CONTEXT, TestServer, ex, run, run_ok, standard_exports, tool};

/// Deterministic non-trivial content.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn sha256_of(path: &std::path::Path) -> String {
    let out = run_ok(tool("sha256sum").arg(path));
    out.split_whitespace().next().expect("sha256sum output").to_string()
}

#[test]
fn qemu_io_writes_then_reads_a_pattern_over_unix() {
    let server = TestServer::start(standard_exports());
    let out = run_ok(
        tool("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0xab 0 64k", "-c", "read -P 0xab 0 64k"])
            .arg(server.unix_uri("mem")),
    );
    assert!(out.contains("wrote 65536/65536 bytes at offset 0"), "{out}");
    assert!(out.contains("read 65536/65536 bytes at offset 0"), "{out}");
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let disk = server.export("mem").to_vec();
    assert!(disk[..65536].iter().all(|&b| b == 0xab));
    assert!(disk[65536..131072].iter().all(|&b| b == 0));

    // A wrong pattern is detected, so the check above means something.
    let out = run(tool("qemu-io").args(["-f", "raw", "-c", "read -P 0xcd 0 4k"]).arg(server.unix_uri("mem")));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success() && text.contains("Pattern verification failed"), "{text}");
}

#[test]
fn qemu_io_over_tcp_with_zeroes_discard_and_flush() {
    let server = TestServer::start(standard_exports());
    let out = run_ok(
        tool("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 0x11 1M 1M",
                "-c",
                "write -z 1M 64k",
                "-c",
                "write -z -u 1536k 128k",
                "-c",
                "discard 1920k 64k",
                "-c",
                "flush",
                "-c",
                "read -P 0 1M 64k",
                "-c",
                "read -P 0x11 1088k 448k",
                "-c",
                "read -P 0 1536k 128k",
                "-c",
                "write -P 0x22 -f 4M 8k",
                "-c",
                "read -P 0x22 4M 8k",
            ])
            .arg(server.tcp_uri("mem")),
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.contains("error"), "{out}");
    assert!(server.export("mem").flush_count() >= 1, "flush reached the export");
    let disk = server.export("mem").to_vec();
    assert!(disk[(1 << 20)..(1 << 20) + 65536].iter().all(|&b| b == 0));
    assert!(disk[(4 << 20)..(4 << 20) + 8192].iter().all(|&b| b == 0x22));
}

#[test]
fn default_export_name_maps_to_the_first_export() {
    let server = TestServer::start(standard_exports());
    let out = run_ok(tool("nbdinfo").arg("--size").arg(format!("nbd://127.0.0.1:{}", server.port)));
    assert_eq!(out.trim(), (64u64 << 20).to_string());
    let out = run_ok(
        tool("qemu-io")
            .args(["-f", "raw", "-c", "read 0 512"])
            .arg(format!("nbd+unix://?socket={}", server.socket.display())),
    );
    assert!(out.contains("read 512/512 bytes"), "{out}");
}

#[test]
fn qemu_img_compare_sees_identical_and_different_images() {
    let content = pattern(4 << 20, 7);
    let server = TestServer::start(vec![ex("data", "", MemExport::from_bytes(&content))]);
    let file = server.dir.path().join("ref.raw");
    std::fs::write(&file, &content).unwrap();
    let out = run_ok(
        tool("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&file).arg(server.unix_uri("data")),
    );
    assert!(out.contains("Images are identical"), "{out}");

    let mut changed = content.clone();
    changed[3 << 20] ^= 0xff;
    std::fs::write(&file, &changed).unwrap();
    let out = run(tool("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&file)
        .arg(server.tcp_uri("data")));
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Content mismatch at offset 3145728"));
}

#[test]
fn nbdinfo_list_shows_every_export_with_its_description() {
    let server = TestServer::start(standard_exports());
    let out = run_ok(tool("nbdinfo").arg("--list").arg(server.unix_uri("")));
    assert!(out.contains("export=\"mem\""), "{out}");
    assert!(out.contains("export=\"ro\""), "{out}");
    assert!(out.contains("description: scratch disk"), "{out}");
    assert!(out.contains("description: read-only disk"), "{out}");
}

#[test]
fn nbdinfo_json_reports_size_flags_contexts_and_block_sizes() {
    let server = TestServer::start(standard_exports());
    let out = run_ok(tool("nbdinfo").arg("--json").arg(server.unix_uri("mem")));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["protocol"], "newstyle-fixed");
    assert_eq!(v["structured"], true);
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "mem");
    assert_eq!(e["description"], "scratch disk");
    assert_eq!(e["export-size"], 64u64 << 20);
    let contexts: Vec<&str> = e["contexts"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert_eq!(contexts, ["base:allocation", EXTRA_CONTEXT]);
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32u64 << 20);
    for flag in [
        "can_cache",
        "can_df",
        "can_fast_zero",
        "can_flush",
        "can_fua",
        "can_multi_conn",
        "can_trim",
        "can_zero",
    ] {
        assert_eq!(e[flag], true, "{flag}: {out}");
    }
    assert_eq!(e["is_read_only"], false);

    let out = run_ok(tool("nbdinfo").arg("--json").arg(server.tcp_uri("ro")));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["is_read_only"], true);
    assert_eq!(e["can_trim"], false);
    assert_eq!(e["can_zero"], false);
    assert_eq!(e["export-size"], 1 << 20);
}

#[test]
fn block_sizes_are_capped_to_the_server_limit() {
    let config = ServerConfig { max_payload: 1 << 20, ..ServerConfig::default() };
    let export = MemExport::new(8 << 20).with_block_sizes(mcow_nbd::BlockSizes {
        minimum: 512,
        preferred: 65536,
        maximum: 64 << 20,
    });
    let server = TestServer::start_with(config, vec![ex("bs", "", export)]);
    let out = run_ok(tool("nbdinfo").arg("--json").arg(server.unix_uri("bs")));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["block_size_minimum"], 512);
    assert_eq!(e["block_size_preferred"], 65536);
    assert_eq!(e["block_size_maximum"], 1 << 20);
    // qemu honours the advertised maximum by splitting a large request.
    let out = run_ok(
        tool("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x33 0 4M", "-c", "read -P 0x33 0 4M"])
            .arg(server.tcp_uri("bs")),
    );
    assert!(!out.contains("Pattern verification failed") && out.contains("read 4194304/4194304"), "{out}");
}

/// Parses `nbdinfo --map` output into (offset, length, value).
fn parse_map(out: &str) -> Vec<(u64, u64, u32)> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap())
        })
        .collect()
}

#[test]
fn nbdinfo_map_shows_allocation_and_the_extra_context() {
    let server = TestServer::start(standard_exports());
    run_ok(
        tool("qemu-io")
            .args(["-f", "raw", "-c", "write -P 1 1M 128k", "-c", "write -P 2 8M 64k"])
            .arg(server.unix_uri("mem")),
    );
    let hz = NBD_STATE_HOLE | NBD_STATE_ZERO;
    let want = vec![
        (0, 1 << 20, hz),
        (1 << 20, 128 << 10, 0),
        ((1 << 20) + (128 << 10), (7 << 20) - (128 << 10), hz),
        (8 << 20, 64 << 10, 0),
        ((8 << 20) + (64 << 10), (56 << 20) - (64 << 10), hz),
    ];
    let out = run_ok(tool("nbdinfo").arg("--map").arg(server.unix_uri("mem")));
    assert_eq!(parse_map(&out), want, "{out}");
    let out = run_ok(tool("nbdinfo").arg(format!("--map={EXTRA_CONTEXT}")).arg(server.tcp_uri("mem")));
    let extra: Vec<_> = want.iter().map(|&(o, l, f)| (o, l, if f == 0 { 1 } else { 0 })).collect();
    assert_eq!(parse_map(&out), extra, "{out}");
    let out = run_ok(tool("nbdinfo").args(["--map", "--totals"]).arg(server.unix_uri("mem")));
    assert!(out.contains("196608"), "{out}");
}

#[test]
fn nbdcopy_out_and_in_preserve_content() {
    let mut content = vec![0u8; 16 << 20];
    content[..1 << 20].copy_from_slice(&pattern(1 << 20, 3));
    content[10 << 20..11 << 20].copy_from_slice(&pattern(1 << 20, 5));
    let server = TestServer::start(vec![
        ex("src", "", MemExport::from_bytes(&content)),
        ex("dst", "", MemExport::new(16 << 20)),
    ]);
    let dir = server.dir.path();
    let reference = dir.join("reference.raw");
    std::fs::write(&reference, &content).unwrap();

    let copied = dir.join("copied.raw");
    run_ok(tool("nbdcopy").arg(server.unix_uri("src")).arg(&copied));
    assert_eq!(sha256_of(&copied), sha256_of(&reference));

    // Into the server over TCP; nbdcopy uses several connections (multi-conn).
    run_ok(
        tool("nbdcopy").args(["--connections=4", "--requests=16"]).arg(&reference).arg(server.tcp_uri("dst")),
    );
    assert!(server.export("dst").to_vec() == content, "content written by nbdcopy differs");

    // Server to server through nbdcopy, then compare with qemu-img.
    run_ok(tool("nbdcopy").arg(server.unix_uri("src")).arg(server.unix_uri("dst")));
    let out = run_ok(
        tool("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(server.unix_uri("src"))
            .arg(server.tcp_uri("dst")),
    );
    assert!(out.contains("Images are identical"), "{out}");
}

#[test]
fn read_only_export_rejects_writes_from_qemu_io() {
    let server = TestServer::start(standard_exports());
    let out = run(tool("qemu-io").args(["-f", "raw", "-c", "write -P 0 0 4k"]).arg(server.unix_uri("ro")));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains("wrote 4096/4096"), "write succeeded on a read-only export: {text}");
    // qemu sees NBD_FLAG_READ_ONLY and refuses to open the export for writing.
    assert!(text.contains("Permission denied") || text.to_lowercase().contains("read-only"), "{text}");
    assert!(server.export("ro").to_vec().iter().all(|&b| b == 0x5a), "read-only export changed");
    // Reading works.
    let out = run_ok(
        tool("qemu-io").args(["-f", "raw", "-r", "-c", "read -P 0x5a 0 1M"]).arg(server.unix_uri("ro")),
    );
    assert!(out.contains("read 1048576/1048576"), "{out}");
}

#[test]
fn many_clients_at_once() {
    let server = Arc::new(TestServer::start(standard_exports()));
    let threads: Vec<_> = (0..6u64)
        .map(|i| {
            let server = Arc::clone(&server);
            std::thread::spawn(move || {
                let off = i << 20;
                let uri = if i % 2 == 0 { server.unix_uri("mem") } else { server.tcp_uri("mem") };
                let out = run_ok(
                    tool("qemu-io")
                        .args([
                            "-f",
                            "raw",
                            "-c",
                            &format!("aio_write -P {} {off} 1M", i + 1),
                            "-c",
                            "aio_flush",
                        ])
                        .args(["-c", &format!("read -P {} {off} 1M", i + 1)])
                        .arg(uri),
                );
                assert!(!out.contains("Pattern verification failed"), "{out}");
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    let disk = server.export("mem").to_vec();
    for i in 0..6usize {
        assert!(disk[i << 20..(i + 1) << 20].iter().all(|&b| b == i as u8 + 1), "region {i}");
    }
}

#[test]
fn stop_finishes_connections_and_flushes_exports() {
    let mut server = TestServer::start(standard_exports());
    run_ok(tool("qemu-io").args(["-f", "raw", "-c", "write -P 7 0 64k"]).arg(server.unix_uri("mem")));
    let flushes_before = server.export("mem").flush_count();
    // A connection left open in transmission must not keep the server from stopping.
    let idle = support::Raw::go(&server, "mem", true, &[]);
    for r in server.stop() {
        r.expect("serve returned Ok");
    }
    assert!(server.export("mem").flush_count() > flushes_before, "export flushed at stop");
    assert!(!server.socket.exists() || std::os::unix::net::UnixStream::connect(&server.socket).is_err());
    drop(idle);
}

#[test]
fn serve_by_path_and_address_lifecycle() {
    use mcow_nbd::{Server, ServerError};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let server = Server::new();
    server.add_export("a", "first", Arc::new(MemExport::new(1 << 20))).unwrap();
    assert!(matches!(
        server.add_export("a", "again", Arc::new(MemExport::new(1))),
        Err(ServerError::DuplicateExport(_))
    ));
    assert!(matches!(
        server.add_export("bad\0name", "", Arc::new(MemExport::new(1))),
        Err(ServerError::InvalidExportName { .. })
    ));
    let server = Arc::new(server);
    let stop = server.shutdown_handle();
    let s = Arc::clone(&server);
    let p = path.clone();
    let t = std::thread::spawn(move || s.serve_unix(&p));
    let started = std::time::Instant::now();
    while !path.exists() {
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "socket never appeared");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let out = run_ok(tool("nbdinfo").arg("--size").arg(format!("nbd+unix:///a?socket={}", path.display())));
    assert_eq!(out.trim(), "1048576");
    // Binding the same path again fails cleanly.
    assert!(matches!(server.serve_unix(&path), Err(ServerError::Bind { .. })));
    assert!(!stop.is_stopped());
    stop.stop();
    t.join().unwrap().expect("serve_unix returned Ok");
    assert!(!path.exists(), "socket file removed on stop");
    // A stopped server stays stopped: serving again returns at once.
    server.serve_tcp("127.0.0.1:0").expect("stopped server returns Ok");
}
