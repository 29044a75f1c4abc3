//! Stopping a server whose Unix socket file was removed while it listened: the listener is shut
//! down directly, so the server still stops (it used to wait for a connection that could no
//! longer come).

use std::sync::Arc;
use std::time::{Duration, Instant};

use mcow_nbd::{MemExport, Server};

#[test]
fn stop_works_after_the_socket_file_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let server = Server::new();
    server.add_export("m", "memory", Arc::new(MemExport::new(1 << 20))).unwrap();
    let server = Arc::new(server);
    let stop = server.shutdown_handle();
    let s = server.clone();
    let t = std::thread::spawn(move || s.serve_unix_listener(listener));
    std::thread::sleep(Duration::from_millis(100));
    std::fs::remove_file(&path).unwrap();
    stops_within_5s(stop, t);
}

#[test]
fn stop_works_on_tcp() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server = Server::new();
    server.add_export("m", "memory", Arc::new(MemExport::new(1 << 20))).unwrap();
    let server = Arc::new(server);
    let stop = server.shutdown_handle();
    let s = server.clone();
    let t = std::thread::spawn(move || s.serve_tcp_listener(listener));
    std::thread::sleep(Duration::from_millis(100));
    stops_within_5s(stop, t);
}

/// Stops the server and asserts that its serving thread `t` ends cleanly within 5 seconds.
fn stops_within_5s<E: std::fmt::Debug>(
    stop: mcow_nbd::ShutdownHandle,
    t: std::thread::JoinHandle<Result<(), E>>,
) {
    let start = Instant::now();
    stop.stop();
    while !t.is_finished() {
        assert!(start.elapsed() < Duration::from_secs(5), "the server did not stop");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(t.join().unwrap().is_ok());
}
