//! `mcow serve` of an image whose origin misbehaves: a real OCI registry (docker-registry on
//! loopback) behind a proxy written in the test (crates/remote/tests/common/origin.rs) that can
//! be switched to send bodies one byte per 100 ms. The timeouts come from the `MCOW_HTTP_*` and
//! `MCOW_RETRY_*` variables, as `mcow serve --help` states. Clients are qemu-io under `timeout`;
//! missing tools fail the test (never skip).

mod common;
#[path = "common/nbd.rs"]
mod nbd;
#[path = "../../remote/tests/common/origin.rs"]
mod origin;
#[path = "common/registry.rs"]
mod registry;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use nbd::*;
use origin::{Mode, Origin};

/// qemu-io `cmd` (read-only) on export `t` of `serve`; returns stdout and stderr together.
fn qemu_io(serve: &Serve, cmd: &str) -> String {
    let uri = serve.unix_uri("t");
    let r = tool_run("qemu-io", Path::new("/"), &["-r", "-f", "raw", "-c", cmd, &uri]);
    format!("{}{}", r.stdout, r.stderr)
}

#[test]
fn a_slow_origin_fails_reads_in_time_recovers_and_never_holds_up_sigterm() {
    // Tried: an 8 MiB disk (1 MiB of 0xab at 0, sealed) pushed to a registry, served lazily from
    // an empty cache through the proxy. (1) With MCOW_HTTP_DEADLINE_MS=300,
    // MCOW_HTTP_MIN_RATE=1048576 and MCOW_RETRY_DEADLINE_MS=1000, the origin trickles. Must
    // hold: a 64 KiB read fails with an I/O error after the 1 s budget (+64 KiB at 1 MiB/s)
    // and well before 3 s; once the origin is normal the same read returns the right bytes.
    // (2) With budgets of 60 s, the origin trickles (then, in a second serve, stalls: 1000
    // bytes, then nothing, so a read blocks for the 30 s per-read timeout) while a read waits
    // for its fetch, and the server gets SIGTERM. Must hold: it exits 0 within 5 s (fetches
    // are cancelled 2 s after the signal, blocked reads interrupted), and the client is not
    // left hanging either.
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    mcow_ok(dir, &["create", "d", "-s", "8M"]);
    mcow_ok(dir, &["write", "d", "0", "--pattern", "0xab", &MIB.to_string()]);
    mcow_ok(dir, &["seal", "d"]);
    let reg = registry::Registry::start(&dir.join("reg"));
    mcow_ok(dir, &["push", "d", &format!("oci://127.0.0.1:{}/mcow/t:v1", reg.port)]);
    let proxy = Origin::start(reg.port);
    let reference = format!("oci://127.0.0.1:{}/mcow/t:v1", proxy.port);

    let quick = [
        ("MCOW_HTTP_DEADLINE_MS", "300"),
        ("MCOW_HTTP_MIN_RATE", "1048576"),
        ("MCOW_RETRY_DEADLINE_MS", "1000"),
    ];
    let serve = Serve::start_env(dir, &["-r", "--cache", "cache", &reference], &quick);
    proxy.set(Mode::Trickle);
    let start = Instant::now();
    let out = qemu_io(&serve, "read 0 64k");
    let took = start.elapsed();
    eprintln!("serve: the read under a trickle failed after {took:?}");
    assert!(out.contains("read failed: Input/output error"), "{out}");
    assert!(took >= Duration::from_secs(1), "failed after {took:?}, before the retry budget");
    assert!(took < Duration::from_secs(3), "failed after {took:?}, past the deadline");
    assert!(proxy.misbehaved.load(Ordering::SeqCst) >= 2, "the slow fetch was not retried");
    proxy.set(Mode::Normal);
    let out = qemu_io(&serve, "read -P 0xab 0 64k");
    assert!(out.contains("read 65536/65536 bytes") && !out.contains("failed"), "{out}");
    serve.stop();

    // Blocks 12 and 14: not fetched yet (the read that recovered fetched a window of 0..4).
    let slow = [("MCOW_HTTP_DEADLINE_MS", "60000"), ("MCOW_RETRY_DEADLINE_MS", "60000")];
    for (mode, offset) in [(Mode::Trickle, "768k"), (Mode::Stall, "896k")] {
        let serve = Serve::start_env(dir, &["-r", "--cache", "cache", &reference], &slow);
        proxy.set(mode);
        let before = proxy.misbehaved.load(Ordering::SeqCst);
        let mut client = tool_cmd("qemu-io", Path::new("/"))
            .args(["-r", "-f", "raw", "-c", &format!("read {offset} 64k"), &serve.unix_uri("t")])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let wait = Instant::now();
        while proxy.misbehaved.load(Ordering::SeqCst) == before {
            if wait.elapsed() > Duration::from_secs(10) {
                let _ = client.kill();
                let out = client.wait_with_output().unwrap();
                panic!(
                    "the read never reached the origin: {}{}\nserve log:\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    serve.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(300)); // the body is trickling or stalled now
        let log = serve.log();
        let (code, took) = serve.stop_timed();
        eprintln!("serve: exited {code} {took:?} after SIGTERM with a fetch in {mode:?}");
        assert_eq!(code, 0, "{log}");
        assert!(took < Duration::from_secs(5), "SIGTERM took {took:?} with an origin in {mode:?}");
        assert!(wait_timeout(&mut client, Duration::from_secs(5)).is_some(), "the client still hangs");
        proxy.set(Mode::Normal);
    }
}
