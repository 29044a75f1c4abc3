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
    /// Waits up to `timeout` for something to read (data, end of stream or an error); false
    /// if nothing came.
    fn wait_readable(&self, timeout: Duration) -> io::Result<bool>;
}

/// [`Transport::wait_readable`] for a socket.
fn poll_readable(fd: impl AsFd, timeout: Duration) -> io::Result<bool> {
    let timeout = rustix::event::Timespec {
        tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    let mut fds = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
    loop {
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(n) => return Ok(n > 0),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
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
    fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        poll_readable(self, timeout)
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
    fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        poll_readable(self, timeout)
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
#[derive(Debug, Clone)]
pub(crate) struct Waker {
    /// A duplicate of the listening socket.
    listener: Arc<OwnedFd>,
    addr: WakeAddr,
}

#[derive(Debug, Clone)]
pub(crate) enum WakeAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Waker {
    pub(crate) fn new(listener: impl AsFd, addr: WakeAddr) -> io::Result<Waker> {
        Ok(Waker { listener: Arc::new(listener.as_fd().try_clone_to_owned()?), addr })
    }

    pub(crate) fn wake(&self) {
        if rustix::net::shutdown(&*self.listener, rustix::net::Shutdown::Read).is_ok() {
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

/// Reads and throws away exactly `len` bytes.
pub(crate) fn discard<R: Read>(r: &mut R, len: u64) -> io::Result<()> {
    let copied = io::copy(&mut r.take(len), &mut io::sink())?;
    if copied < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Fills `buf` completely. Returns `Ok(false)` on a clean end of stream before the first
/// byte, and `UnexpectedEof` if the stream ends part-way.
pub(crate) fn read_exact_or_eof<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}
