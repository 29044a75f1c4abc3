//! Exports added and removed while the server serves, with real clients (nbdsh, nbdinfo) and
//! the raw protocol client for the exact option reply.
//!
//! Tried: a client (nbdsh) with a read in flight on export "a" (held in the export by a gate)
//! and another client on export "b"; "a" is removed. Must hold: the removal returns at once
//! but does not report the connection gone while the read is still held; released, the read
//! completes with the right data, then that client sees the connection closed (its next read
//! fails) and the removal reports every connection gone; a new client asking for "a" gets
//! `NBD_REP_ERR_UNKNOWN` (nbdinfo fails); "b" and its client carry on; an export added while
//! serving is reachable at once, and a server with no export at all serves (and lists nothing).

mod support;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use mcow_nbd::proto::{self, ClientOption, InfoRequest};
use mcow_nbd::{BlockSizes, Export, MemExport, Server, StatusExtent};
use support::{Raw, run, run_ok, tool};

/// A memory export whose first read waits until the test opens the gate (and says when it
/// started waiting).
struct Gated {
    inner: MemExport,
    open: Mutex<bool>,
    opened: Condvar,
    entered: Mutex<Option<mpsc::Sender<()>>>,
}

impl Gated {
    fn release(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

impl Export for Gated {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn block_sizes(&self) -> BlockSizes {
        self.inner.block_sizes()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if let Some(tx) = self.entered.lock().unwrap().take() {
            let _ = tx.send(());
        }
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
        drop(open);
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> std::io::Result<()> {
        self.inner.write(offset, data, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> std::io::Result<()> {
        self.inner.write_zeroes(offset, len, may_trim, fua)
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> std::io::Result<()> {
        self.inner.trim(offset, len, fua)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn block_status(&self, context: &str, offset: u64, len: u64) -> std::io::Result<Vec<StatusExtent>> {
        self.inner.block_status(context, offset, len)
    }
}

/// What `NBD_OPT_GO` for `name` is answered with (the final reply's type).
fn go_reply(socket: &std::path::Path, name: &str) -> u32 {
    let mut raw = Raw::connect_fixed_path(socket);
    raw.option(&ClientOption::Go(InfoRequest { name: name.into(), requests: vec![] }));
    raw.option_replies().last().unwrap().0.reply_type
}

#[test]
fn removing_an_export_finishes_its_requests_then_disconnects_only_its_clients() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbd.sock");
    let (entered_tx, entered_rx) = mpsc::channel();
    let gated = Arc::new(Gated {
        inner: MemExport::from_bytes(&vec![0x11; 1 << 20]),
        open: Mutex::new(false),
        opened: Condvar::new(),
        entered: Mutex::new(Some(entered_tx)),
    });
    let server = Arc::new(Server::new());
    server.add_export("a", "gated", gated.clone()).unwrap();
    server.add_export("b", "other", Arc::new(MemExport::from_bytes(&vec![0x22; 1 << 20]))).unwrap();
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let s = server.clone();
    let serving = std::thread::spawn(move || s.serve_unix_listener(listener));

    let uri = |n: &str| format!("nbd+unix:///{n}?socket={}", socket.display());
    let script = format!(
        "import nbd\n\
         a = nbd.NBD(); a.connect_uri({a:?})\n\
         b = nbd.NBD(); b.connect_uri({b:?})\n\
         print('CONNECTED', flush=True)\n\
         buf = a.pread(4096, 0)\n\
         print('READ', buf[:1].hex(), buf.count(b'\\x11'), flush=True)\n\
         try:\n    a.pread(4096, 0)\n    print('SECOND OK', flush=True)\n\
         except nbd.Error as e:\n    print('SECOND FAILED', e, flush=True)\n\
         print('B', b.pread(4096, 4096)[:1].hex(), flush=True)\n",
        a = uri("a"),
        b = uri("b"),
    );
    let mut child = tool("nbdsh")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nbdsh");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "CONNECTED");
    entered_rx.recv_timeout(Duration::from_secs(10)).expect("the read reached the export");
    let listed = server.exports();
    assert_eq!(listed.iter().map(|e| (e.name.as_str(), e.clients)).collect::<Vec<_>>(), [("a", 1), ("b", 1)]);

    let removed = server.remove_export("a").unwrap();
    assert!(matches!(server.remove_export("a"), Err(mcow_nbd::ServerError::UnknownExport(_))));
    // The read is still held in the export: its connection cannot be gone yet.
    assert!(!removed.wait_closed(Some(Duration::from_millis(300))), "closed before its request finished");
    // A new client asking for the removed name is refused; the other export still serves.
    assert_eq!(go_reply(&socket, "a"), proto::NBD_REP_ERR_UNKNOWN);
    let out = run(tool("nbdinfo").arg("--size").arg(uri("a")));
    assert!(!out.status.success(), "nbdinfo of a removed export succeeded");
    assert_eq!(run_ok(tool("nbdinfo").arg("--size").arg(uri("b"))).trim(), (1u64 << 20).to_string());
    assert_eq!(server.exports().iter().map(|e| e.name.clone()).collect::<Vec<_>>(), ["b"]);

    gated.release();
    assert!(removed.wait_closed(Some(Duration::from_secs(10))), "the removed export's client was not closed");
    assert_eq!(lines.next().unwrap().unwrap(), "READ 11 4096", "the in-flight read completed, whole");
    let second = lines.next().unwrap().unwrap();
    assert!(second.starts_with("SECOND FAILED"), "after removal the client must be disconnected: {second}");
    assert_eq!(lines.next().unwrap().unwrap(), "B 22", "the other export's client carries on");
    assert!(child.wait().unwrap().success());
    let status = removed.status();
    assert_eq!((status.clients, status.connections), (0, 1));
    assert!(status.requests >= 1 && status.bytes_read == 4096, "{status:?}");

    // Added while serving: reachable at once, under a name just freed too.
    server.add_export("a", "new", Arc::new(MemExport::new(2 << 20))).unwrap();
    assert_eq!(run_ok(tool("nbdinfo").arg("--size").arg(uri("a"))).trim(), (2u64 << 20).to_string());

    server.shutdown_handle().stop();
    serving.join().unwrap().unwrap();
}

#[test]
fn a_server_without_exports_serves_and_lists_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbd.sock");
    let server = Arc::new(Server::new());
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let s = server.clone();
    let serving = std::thread::spawn(move || s.serve_unix_listener(listener));
    assert_eq!(go_reply(&socket, ""), proto::NBD_REP_ERR_UNKNOWN);
    let list = run_ok(
        tool("nbdinfo").args(["--list", "--json"]).arg(format!("nbd+unix://?socket={}", socket.display())),
    );
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(v["exports"].as_array().map(Vec::len), Some(0), "{list}");
    server.shutdown_handle().stop();
    serving.join().unwrap().unwrap();
}
