//! Test support: an in-process server on a temporary Unix socket and a loopback TCP
//! port, real client binaries run as subprocesses, and a raw-socket client speaking the
//! protocol through `mcow_nbd::proto`.

#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mcow_nbd::proto::{
    self, ClientFlags, ClientOption, InfoRequest, MetaContextQuery, OptionReplyHeader, ReplyHeader, Request,
};
use mcow_nbd::{Export, MemExport, Server, ServerConfig, ServerError, ShutdownHandle};

/// One export to serve in a test.
pub struct Ex {
    pub name: &'static str,
    pub description: &'static str,
    pub export: Arc<MemExport>,
}

pub fn ex(name: &'static str, description: &'static str, export: MemExport) -> Ex {
    Ex { name, description, export: Arc::new(export) }
}

/// The extra metadata context the standard test export offers.
pub const EXTRA_CONTEXT: &str = "mcow:test-alloc";

/// 64 MiB writable export "mem" with an extra context, and a 1 MiB read-only export
/// "ro" filled with 0x5a.
pub fn standard_exports() -> Vec<Ex> {
    vec![
        ex("mem", "scratch disk", MemExport::new(64 << 20).with_extra_context(EXTRA_CONTEXT)),
        ex("ro", "read-only disk", MemExport::from_bytes(&vec![0x5a; 1 << 20]).read_only(true)),
    ]
}

/// A server running in-process on both a Unix socket and a loopback TCP port.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub port: u16,
    pub exports: Vec<Ex>,
    handle: ShutdownHandle,
    threads: Vec<JoinHandle<Result<(), ServerError>>>,
}

impl TestServer {
    pub fn start(exports: Vec<Ex>) -> Self {
        Self::start_with(ServerConfig::default(), exports)
    }

    pub fn start_with(config: ServerConfig, exports: Vec<Ex>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("nbd.sock");
        let server = Server::with_config(config);
        for e in &exports {
            let export: Arc<dyn Export> = e.export.clone();
            server.add_export(e.name, e.description, export).expect("add export");
        }
        let handle = server.shutdown_handle();
        // Bind before spawning so clients can connect as soon as this returns.
        let unix = UnixListener::bind(&socket).expect("bind unix socket");
        let tcp = TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        let port = tcp.local_addr().expect("local addr").port();
        let server = Arc::new(server);
        let s1 = Arc::clone(&server);
        let s2 = Arc::clone(&server);
        let threads = vec![
            std::thread::spawn(move || s1.serve_unix_listener(unix)),
            std::thread::spawn(move || s2.serve_tcp_listener(tcp)),
        ];
        Self { dir, socket, port, exports, handle, threads }
    }

    pub fn export(&self, name: &str) -> &Arc<MemExport> {
        &self.exports.iter().find(|e| e.name == name).expect("export exists").export
    }

    pub fn unix_uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.socket.display())
    }

    pub fn tcp_uri(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{name}", self.port)
    }

    /// Stops the server and returns what both `serve_*` calls returned.
    pub fn stop(&mut self) -> Vec<Result<(), ServerError>> {
        self.handle.stop();
        let started = Instant::now();
        let results = self.threads.drain(..).map(|t| t.join().expect("server thread panicked")).collect();
        assert!(started.elapsed() < Duration::from_secs(15), "server took too long to stop");
        results
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            let results = self.stop();
            if !std::thread::panicking() {
                for r in results {
                    r.expect("serve returned an error");
                }
            }
        }
    }
}

// ----- real client binaries ----------------------------------------------------------

/// A `Command` for a client binary; panics loudly if the binary is not installed.
pub fn tool(name: &str) -> Command {
    let path = std::env::var("PATH").unwrap_or_default();
    let path = format!("/usr/bin:{path}");
    let found = path.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file());
    let Some(bin) = found else {
        panic!(
            "required client binary `{name}` is not installed; install it with: \
             apt-get install -y --no-install-recommends libnbd-bin nbdkit python3-libnbd qemu-utils"
        );
    };
    let mut c = Command::new(bin);
    c.env("PATH", path).stdin(Stdio::null());
    c
}

/// Runs a command with a timeout and returns its output.
pub fn run(cmd: &mut Command) -> Output {
    let desc = format!("{cmd:?}");
    let mut child =
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("{desc}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("{desc} timed out; stderr: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs a command that must succeed; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let desc = format!("{cmd:?}");
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{desc} failed with {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts the server still serves well-behaved clients on both transports (nbdinfo
/// over Unix, a qemu-io read over TCP), using its first export.
pub fn assert_healthy(server: &TestServer) {
    let first = &server.exports[0];
    let size = run_ok(tool("nbdinfo").arg("--size").arg(server.unix_uri(first.name)));
    assert_eq!(size.trim(), first.export.size().to_string());
    let out =
        run_ok(tool("qemu-io").args(["-f", "raw", "-r", "-c", "read 0 4k"]).arg(server.tcp_uri(first.name)));
    assert!(out.contains("read 4096/4096 bytes"), "qemu-io output: {out}");
}

// ----- raw protocol client -----------------------------------------------------------

/// A raw client on the Unix socket, for tests that misbehave on purpose.
pub struct Raw {
    pub s: UnixStream,
}

impl Raw {
    /// Connects and reads the greeting.
    pub fn connect(server: &TestServer) -> Self {
        Self::connect_path(&server.socket)
    }

    /// Connects to the Unix socket at `path` and reads the greeting.
    pub fn connect_path(path: &Path) -> Self {
        let s = UnixStream::connect(path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        s.set_write_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut r = Self { s };
        let mut g = [0u8; proto::GREETING_LEN];
        r.s.read_exact(&mut g).expect("greeting");
        let flags = proto::decode_greeting(&g).expect("valid greeting");
        assert_eq!(flags, proto::NBD_FLAG_FIXED_NEWSTYLE | proto::NBD_FLAG_NO_ZEROES);
        r
    }

    /// Connects and sends the usual client flags.
    pub fn connect_fixed(server: &TestServer) -> Self {
        Self::connect_fixed_path(&server.socket)
    }

    /// [`Raw::connect_fixed`] to the Unix socket at `path`.
    pub fn connect_fixed_path(path: &Path) -> Self {
        let mut r = Self::connect_path(path);
        r.send(&ClientFlags { fixed_newstyle: true, no_zeroes: true }.encode());
        r
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    pub fn option(&mut self, o: &ClientOption) {
        self.send(&o.encode());
    }

    pub fn read_vec(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v).expect("read");
        v
    }

    pub fn option_reply(&mut self) -> (OptionReplyHeader, Vec<u8>) {
        let h =
            OptionReplyHeader::decode(&self.read_vec(proto::OPTION_REPLY_HEADER_LEN)).expect("option reply");
        let data = self.read_vec(h.length as usize);
        (h, data)
    }

    /// Reads option replies up to and including the final one (ACK or an error).
    pub fn option_replies(&mut self) -> Vec<(OptionReplyHeader, Vec<u8>)> {
        let mut all = Vec::new();
        loop {
            let r = self.option_reply();
            let last =
                r.0.reply_type == proto::NBD_REP_ACK || r.0.reply_type & proto::NBD_REP_FLAG_ERROR != 0;
            all.push(r);
            if last {
                return all;
            }
        }
    }

    /// Negotiates (optionally structured replies and contexts) and enters transmission.
    pub fn go(server: &TestServer, name: &str, structured: bool, contexts: &[&str]) -> Self {
        let mut r = Self::connect_fixed(server);
        if structured {
            r.option(&ClientOption::StructuredReply);
            assert_eq!(r.option_reply().0.reply_type, proto::NBD_REP_ACK);
        }
        if !contexts.is_empty() {
            r.option(&ClientOption::SetMetaContext(MetaContextQuery {
                export: name.into(),
                queries: contexts.iter().map(|s| s.to_string()).collect(),
            }));
            let replies = r.option_replies();
            assert_eq!(replies.last().unwrap().0.reply_type, proto::NBD_REP_ACK);
        }
        r.option(&ClientOption::Go(InfoRequest { name: name.into(), requests: vec![] }));
        let replies = r.option_replies();
        assert_eq!(replies.last().unwrap().0.reply_type, proto::NBD_REP_ACK, "GO failed: {replies:?}");
        r
    }

    pub fn request(&mut self, command: proto::Command, flags: u16, handle: u64, offset: u64, length: u32) {
        self.send(&Request { flags, command, handle, offset, length }.encode());
    }

    /// Reads a simple reply header.
    pub fn simple_reply(&mut self) -> proto::SimpleReply {
        match ReplyHeader::decode(&self.read_vec(proto::SIMPLE_REPLY_LEN)).expect("reply") {
            ReplyHeader::Simple(s) => s,
            other => panic!("expected a simple reply, got {other:?}"),
        }
    }

    /// Reads one reply (simple or every chunk of a structured one); returns the chunks
    /// as (header, payload), a simple reply being a chunk of kind `u16::MAX` whose
    /// payload is the error value.
    pub fn any_reply(&mut self) -> Vec<(proto::ChunkHeader, Vec<u8>)> {
        let mut chunks = Vec::new();
        loop {
            let magic = self.read_vec(4);
            let len = ReplyHeader::len_for_magic(u32::from_be_bytes(magic.clone().try_into().unwrap()))
                .expect("reply magic");
            let mut hdr = magic;
            hdr.extend(self.read_vec(len - 4));
            match ReplyHeader::decode(&hdr).unwrap() {
                ReplyHeader::Simple(s) => {
                    let h = proto::ChunkHeader { flags: 1, kind: u16::MAX, handle: s.handle, length: 0 };
                    chunks.push((h, s.error.to_be_bytes().to_vec()));
                    return chunks;
                }
                ReplyHeader::Chunk(h) => {
                    let payload = self.read_vec(h.length as usize);
                    let done = h.flags & proto::NBD_REPLY_FLAG_DONE != 0;
                    chunks.push((h, payload));
                    if done {
                        return chunks;
                    }
                }
            }
        }
    }

    /// Asserts the server closes the connection (EOF or reset) within the read timeout.
    pub fn expect_closed(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return,
                Err(e) => panic!("expected the server to close the connection, got {e}"),
            }
        }
    }
}
