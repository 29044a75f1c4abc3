//! Byte streams and listeners the server can run over (TCP and Unix sockets).
//!
//! Owns the small amount of socket plumbing the connection code needs (cloning a stream
//! for a separate writer, timeouts, shutdown, waking a blocked `accept`). Owns no
//! protocol logic.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A connected byte stream.
pub(crate) trait Transport: Read + Write + Send + Sized + 'static {
    fn try_clone_stream(&self) -> io::Result<Self>;
    fn set_read_timeout_opt(&self, d: Option<Duration>) -> io::Result<()>;
    fn set_write_timeout_opt(&self, d: Option<Duration>) -> io::Result<()>;
    fn shutdown_how(&self, how: Shutdown) -> io::Result<()>;
}

impl Transport for TcpStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn set_read_timeout_opt(&self, d: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(d)
    }
    fn set_write_timeout_opt(&self, d: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(d)
    }
    fn shutdown_how(&self, how: Shutdown) -> io::Result<()> {
        self.shutdown(how)
    }
}

impl Transport for UnixStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn set_read_timeout_opt(&self, d: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(d)
    }
    fn set_write_timeout_opt(&self, d: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(d)
    }
    fn shutdown_how(&self, how: Shutdown) -> io::Result<()> {
        self.shutdown(how)
    }
}

/// Something that can shut a connection down from another thread.
pub(crate) trait Shut: Send {
    fn shut(&self, how: Shutdown);
}

impl<T: Transport> Shut for T {
    fn shut(&self, how: Shutdown) {
        // The peer may already be gone; nothing to do then.
        let _ = self.shutdown_how(how);
    }
}

/// A listening socket.
pub(crate) trait Listener {
    type Stream: Transport;
    fn accept_conn(&self) -> io::Result<(Self::Stream, String)>;
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    fn accept_conn(&self) -> io::Result<(TcpStream, String)> {
        let (s, addr) = self.accept()?;
        // Replies are written whole; Nagle would only add latency.
        let _ = s.set_nodelay(true);
        Ok((s, addr.to_string()))
    }
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    fn accept_conn(&self) -> io::Result<(UnixStream, String)> {
        let (s, _) = self.accept()?;
        Ok((s, "unix".to_string()))
    }
}

/// How to wake a thread blocked in `accept`: shut the listening socket down (accept then
/// fails at once, even if a Unix socket's file was removed), or failing that, connect to it.
/// A socket other processes share (systemd's) is only connected to: shutting it down would
/// shut it for them too.
#[derive(Debug, Clone)]
pub(crate) struct Waker {
    /// A duplicate of the listening socket.
    listener: Arc<OwnedFd>,
    addr: WakeAddr,
    shared: bool,
}

#[derive(Debug, Clone)]
pub(crate) enum WakeAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Waker {
    pub(crate) fn new(listener: impl AsFd, addr: WakeAddr, shared: bool) -> io::Result<Waker> {
        Ok(Waker { listener: Arc::new(listener.as_fd().try_clone_to_owned()?), addr, shared })
    }

    pub(crate) fn wake(&self) {
        if !self.shared && rustix::net::shutdown(&*self.listener, rustix::net::Shutdown::Read).is_ok() {
            return;
        }
        let result = match &self.addr {
            WakeAddr::Tcp(addr) => {
                let mut addr = *addr;
                if addr.ip().is_unspecified() {
                    let loopback: std::net::IpAddr = match addr {
                        SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                        SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                    };
                    addr.set_ip(loopback);
                }
                TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map(drop)
            }
            WakeAddr::Unix(path) => UnixStream::connect(path).map(drop),
        };
        if let Err(e) = result {
            tracing::warn!(listener = ?self, error = %e, "could not wake the listener; it stops at its next connection");
        }
    }
}

/// `write_all` for a list of buffers, so a header and its data leave in one system call
/// without being copied together first.
pub(crate) fn write_all_vectored<W: Write>(w: &mut W, bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    let mut bufs = bufs;
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether a read failed only because the socket's read timeout passed.
pub(crate) fn timed_out(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// How a read that may wait for a request to start ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Filled {
    /// `buf` is full.
    Full,
    /// The stream ended cleanly before the first byte.
    Eof,
    /// The read timeout passed before the first byte (only when `may_idle`).
    Idle,
}

/// Fills `buf` completely, waiting through read timeouts once a byte has come (so a request
/// is never cut in two). Before the first byte a timeout gives `Idle` if `may_idle`, else it
/// waits on; a stream that ends part-way is `UnexpectedEof`.
pub(crate) fn fill<R: Read>(r: &mut R, buf: &mut [u8], may_idle: bool) -> io::Result<Filled> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(Filled::Eof),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if timed_out(&e) => {
                if filled == 0 && may_idle {
                    return Ok(Filled::Idle);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Filled::Full)
}

/// Reads and throws away exactly `len` bytes (waiting through read timeouts).
pub(crate) fn discard<R: Read>(r: &mut R, len: u64) -> io::Result<()> {
    let mut scratch = [0u8; 8192];
    let mut left = len;
    while left > 0 {
        let n = left.min(scratch.len() as u64) as usize;
        if fill(r, &mut scratch[..n], false)? != Filled::Full {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        left -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gives its steps in order: bytes, or a timeout.
    struct Steps(Vec<Option<&'static [u8]>>);

    impl Read for Steps {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0.is_empty() {
                return Ok(0);
            }
            match self.0.remove(0) {
                Some(b) => {
                    buf[..b.len()].copy_from_slice(b);
                    Ok(b.len())
                }
                None => Err(io::ErrorKind::WouldBlock.into()),
            }
        }
    }

    #[test]
    fn a_timeout_ends_a_wait_only_before_the_first_byte() {
        let mut buf = [0u8; 4];
        // Before any byte: idle if allowed, else it waits on.
        assert_eq!(fill(&mut Steps(vec![None, Some(b"ab")]), &mut buf[..2], true).unwrap(), Filled::Idle);
        assert_eq!(fill(&mut Steps(vec![None, Some(b"ab")]), &mut buf[..2], false).unwrap(), Filled::Full);
        // After one: never cut in two.
        let mut r = Steps(vec![Some(b"a"), None, None, Some(b"bcd")]);
        assert_eq!(fill(&mut r, &mut buf, true).unwrap(), Filled::Full);
        assert_eq!(&buf, b"abcd");
        assert_eq!(fill(&mut Steps(vec![]), &mut buf, true).unwrap(), Filled::Eof);
        let e = fill(&mut Steps(vec![Some(b"a")]), &mut buf, true).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        discard(&mut Steps(vec![Some(b"xy"), None, Some(b"z")]), 3).unwrap();
    }
}
