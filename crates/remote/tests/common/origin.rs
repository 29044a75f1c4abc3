//! A misbehaving origin for tests: a loopback HTTP proxy in front of a real server (nginx,
//! docker-registry, s3s-fs) that forwards each request and answers with the real server's
//! answer, but can be switched at any moment to send response bodies one byte per 100 ms
//! (`Mode::Trickle`), to stop sending a body after its first bytes while keeping the connection
//! open (`Mode::Stall`), or to cut the connection halfway through a body (`Mode::Cut`). No real
//! server misbehaves on cue, hence this one. Standard library only (shared by the remote and cli
//! tests). One request per connection (the answer says `Connection: close`).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

/// What the origin does with response bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Forwards them as they come.
    Normal = 0,
    /// One byte per 100 ms.
    Trickle = 1,
    /// The first 1000 bytes, then nothing more (the connection stays open until the mode
    /// changes or the client goes away).
    Stall = 2,
    /// The first half, then the connection is closed.
    Cut = 3,
}

/// The proxy; it stops accepting when dropped.
pub struct Origin {
    pub port: u16,
    mode: Arc<AtomicU8>,
    /// Requests whose body was sent under a mode other than `Normal`.
    pub misbehaved: Arc<AtomicUsize>,
    /// All requests forwarded.
    pub requests: Arc<AtomicUsize>,
    closed: Arc<AtomicBool>,
}

impl Origin {
    /// Starts a proxy to `127.0.0.1:upstream` on a free loopback port, in `Mode::Normal`.
    pub fn start(upstream: u16) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let o = Origin {
            port,
            mode: Arc::new(AtomicU8::new(Mode::Normal as u8)),
            misbehaved: Arc::new(AtomicUsize::new(0)),
            requests: Arc::new(AtomicUsize::new(0)),
            closed: Arc::new(AtomicBool::new(false)),
        };
        let (mode, misbehaved, requests, closed) =
            (o.mode.clone(), o.misbehaved.clone(), o.requests.clone(), o.closed.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if closed.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (mode, misbehaved, requests) = (mode.clone(), misbehaved.clone(), requests.clone());
                std::thread::spawn(move || {
                    let _ = relay(conn, upstream, &mode, &misbehaved, &requests);
                });
            }
        });
        o
    }

    pub fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port)); // wakes the accept loop
    }
}

/// Reads an HTTP head (up to the blank line) and returns its lines.
fn read_head(r: &mut impl BufRead) -> std::io::Result<Vec<String>> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let l = line.trim_end().to_string();
        if l.is_empty() {
            return Ok(lines);
        }
        lines.push(l);
    }
}

fn content_length(head: &[String]) -> Option<u64> {
    head.iter().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case("content-length").then(|| v.trim().parse().ok()).flatten()
    })
}

/// Writes a head with `Connection: close` in place of any connection header.
fn write_head(w: &mut impl Write, head: &[String]) -> std::io::Result<()> {
    let mut out = String::new();
    for l in head {
        let name = l.split_once(':').map(|(k, _)| k.trim().to_ascii_lowercase());
        if matches!(name.as_deref(), Some("connection" | "keep-alive")) {
            continue;
        }
        out.push_str(l);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    w.write_all(out.as_bytes())
}

fn relay(
    client: TcpStream,
    upstream: u16,
    mode: &AtomicU8,
    misbehaved: &AtomicUsize,
    requests: &AtomicUsize,
) -> std::io::Result<()> {
    let mut from_client = BufReader::new(client.try_clone()?);
    let mut to_client = client;
    let request = read_head(&mut from_client)?;
    let is_head = request.first().is_some_and(|l| l.starts_with("HEAD "));
    requests.fetch_add(1, Ordering::SeqCst);
    let server = TcpStream::connect(("127.0.0.1", upstream))?;
    let mut to_server = server.try_clone()?;
    write_head(&mut to_server, &request)?;
    if let Some(n) = content_length(&request) {
        std::io::copy(&mut (&mut from_client).take(n), &mut to_server)?;
    }
    let mut from_server = BufReader::new(server);
    let response = read_head(&mut from_server)?;
    write_head(&mut to_client, &response)?;
    if is_head {
        return Ok(());
    }
    let len = content_length(&response);
    let mut body = (&mut from_server).take(len.unwrap_or(u64::MAX));
    let m = mode.load(Ordering::SeqCst);
    if m != Mode::Normal as u8 {
        misbehaved.fetch_add(1, Ordering::SeqCst);
    }
    match m {
        m if m == Mode::Trickle as u8 => {
            let mut byte = [0u8; 1];
            while body.read(&mut byte)? == 1 {
                to_client.write_all(&byte)?;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        m if m == Mode::Stall as u8 => {
            std::io::copy(&mut (&mut body).take(1000), &mut to_client)?;
            // Hold the connection, sending nothing, while the mode stays (at most 60 s); a
            // client that gave up is seen by the probe write failing once the mode changes.
            for _ in 0..600 {
                if mode.load(Ordering::SeqCst) != Mode::Stall as u8 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        m if m == Mode::Cut as u8 => {
            std::io::copy(&mut (&mut body).take(len.unwrap_or(2) / 2), &mut to_client)?;
            to_client.shutdown(std::net::Shutdown::Both)?;
        }
        _ => {
            std::io::copy(&mut body, &mut to_client)?;
        }
    }
    Ok(())
}
