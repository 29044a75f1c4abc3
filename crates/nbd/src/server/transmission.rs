//! The transmission phase of one connection: a few worker threads that take turns reading
//! one request each (one reader at a time), run it against the export, and write its reply
//! (under a writer lock). No request changes threads, so a request costs no hand-off between
//! threads; requests still run in parallel, and a slow one (a flush, a fetch from a remote)
//! does not hold up the others.
//!
//! Workers come and go with the load: the connection's own thread is always one; when a worker
//! takes a request and no other is left to read the next one, it starts another (up to
//! `workers_per_connection`, not counting workers running a flush, up to
//! `flush_workers_per_connection` of them: a flush mostly waits for a sync, and the requests
//! behind it should not); a worker other than the first that finds nothing to read for
//! `worker_linger` (the socket's read timeout while there are several) ends. An idle
//! connection holds one thread.
//!
//! Owns request scheduling, the counts of each connection and its export (requests, bytes,
//! errors, request latency), back-pressure (each worker holds at most one request, so a
//! connection holds at most `workers` requests, flushes included), reply assembly and the mapping of export
//! errors to NBD error values. Does not own negotiation ([`super::handshake`]) nor byte
//! layouts ([`crate::proto`]).
//!
//! Ordering: requests run in any order, as the protocol allows. A flush covers every
//! write already answered, because a write is answered only after the export returned.

use std::io::{self, BufReader, IoSlice, Read};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, Scope};
use std::time::{Duration, Instant};

use super::transport::{Filled, Transport, discard, fill, write_all_vectored};
use super::{ConnError, Ctx, ExportCounters, ExportEntry, lock};
use crate::export::Export;
use crate::proto::{
    self, Command, NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLAG_REQ_ONE,
    NBD_EINVAL, NBD_EIO, NBD_ENOSPC, NBD_ENOTSUP, NBD_EPERM, REQUEST_HEADER_LEN, Request, RequestError,
    TransmissionParams,
};

/// Most descriptors sent per context in one block status reply.
const MAX_EXTENTS: usize = 1 << 16;
/// Worker read buffers larger than this are not kept between requests.
const KEEP_BUFFER: usize = 4 << 20;
/// Read-ahead buffer of the request reader.
const READ_BUFFER: usize = 256 << 10;

/// What negotiation settled for transmission.
#[derive(Clone)]
pub(crate) struct Negotiated {
    pub(crate) export: Arc<ExportEntry>,
    pub(crate) size: u64,
    pub(crate) read_only: bool,
    pub(crate) structured: bool,
    /// Selected metadata contexts: (id, name).
    pub(crate) contexts: Vec<(u32, String)>,
    pub(crate) max_payload: u32,
}

/// Per-connection counters for the closing log line.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    requests: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    /// Export errors returned to the client.
    io_errors: AtomicU64,
}

impl Stats {
    pub(crate) fn totals(&self) -> (u64, u64, u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.bytes_read.load(Ordering::Relaxed),
            self.bytes_written.load(Ordering::Relaxed),
            self.io_errors.load(Ordering::Relaxed),
        )
    }
}

/// Whose turn it is to read the next request: at most one worker reads at a time. Unlike a
/// mutex, a worker can give up waiting for its turn.
#[derive(Default)]
struct Turn {
    state: Mutex<TurnState>,
    freed: Condvar,
}

#[derive(Default)]
struct TurnState {
    taken: bool,
    /// Workers waiting for the turn (so a freed turn wakes someone only if someone waits).
    waiting: usize,
}

impl Turn {
    /// Waits for the turn, forever or up to `timeout`; `None` if the time ran out.
    fn take(&self, timeout: Option<Duration>) -> Option<TurnGuard<'_>> {
        let mut st = lock(&self.state);
        if st.taken {
            let deadline = timeout.map(|t| Instant::now() + t);
            st.waiting += 1;
            while st.taken {
                st = match deadline {
                    None => self.freed.wait(st).unwrap_or_else(PoisonError::into_inner),
                    Some(d) => {
                        let left = d.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            st.waiting -= 1;
                            return None;
                        }
                        self.freed.wait_timeout(st, left).unwrap_or_else(PoisonError::into_inner).0
                    }
                };
            }
            st.waiting -= 1;
        }
        st.taken = true;
        Some(TurnGuard(self))
    }
}

/// The turn to read; handed on when dropped.
struct TurnGuard<'a>(&'a Turn);

impl Drop for TurnGuard<'_> {
    fn drop(&mut self) {
        let mut st = lock(&self.0.state);
        st.taken = false;
        if st.waiting > 0 {
            self.0.freed.notify_one();
        }
    }
}

/// What a worker's turn to read gave.
enum Next {
    Job(Job),
    /// No request began within the read timeout.
    Idle,
    /// The request stream ended.
    End,
}

/// A request read by a worker.
struct Job {
    req: Request,
}

/// The first `len` bytes of `buf`, grown to that length if shorter (only the growth is zeroed;
/// what earlier requests left there stays until overwritten).
fn grown(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buf.len() < len {
        buf.resize(len, 0);
    }
    &mut buf[..len]
}

/// State shared by the reader and the workers of one connection.
struct Conn<'a, S> {
    ctx: &'a Ctx,
    peer: &'a str,
    export_name: &'a str,
    export: &'a dyn Export,
    neg: &'a Negotiated,
    params: TransmissionParams,
    writer: Mutex<S>,
    broken: AtomicBool,
    /// Set once the request stream has ended (or failed); workers then stop reading.
    ended: AtomicBool,
    /// The first error that ended the request stream.
    error: Mutex<Option<ConnError>>,
    stats: &'a Stats,
    /// The export's counters (summed over its connections).
    counters: &'a ExportCounters,
    reader: Mutex<BufReader<S>>,
    turn: Turn,
    /// Workers running, the connection's own thread included. While there is more than one,
    /// the socket's read timeout is `worker_linger`, so a worker other than the first that
    /// waits that long for a request can end; with one, reads wait for ever.
    workers: Mutex<usize>,
    /// `workers`, readable without the lock.
    workers_now: AtomicUsize,
    /// Workers not running a request: waiting for the turn or reading.
    idle: AtomicUsize,
    /// Workers running a flush (mostly waiting for a sync): they do not count against
    /// `max_workers`, up to `max_flushing` of them, so that flushes waiting for the export's
    /// sync do not stall the writes queued behind them (and flushes in flight together can
    /// share one sync in an export that groups them).
    flushing: AtomicUsize,
    max_workers: usize,
    max_flushing: usize,
}

/// What a connection counts, both in its own [`Stats`] and in its export's counters.
#[derive(Debug, Clone, Copy)]
enum Count {
    Requests,
    BytesRead,
    BytesWritten,
    IoErrors,
}

/// Maps an export's error to an NBD error value.
pub(crate) fn errno_for(e: &io::Error) -> u32 {
    use io::ErrorKind as K;
    match e.kind() {
        K::PermissionDenied | K::ReadOnlyFilesystem => NBD_EPERM,
        K::StorageFull | K::QuotaExceeded | K::FileTooLarge => NBD_ENOSPC,
        K::InvalidInput => NBD_EINVAL,
        K::Unsupported => NBD_ENOTSUP,
        _ => NBD_EIO,
    }
}

/// Runs transmission until the client disconnects, the stream fails, or the server
/// shuts the read side; every request already read is answered before returning.
pub(crate) fn run<S: Transport>(
    ctx: &Ctx,
    stream: S,
    neg: Negotiated,
    stats: &Stats,
    peer: &str,
) -> Result<(), ConnError> {
    stream.set_read_timeout_opt(None)?;
    let writer = stream.try_clone_stream()?;
    writer.set_write_timeout_opt(ctx.config.write_timeout)?;
    let entry = Arc::clone(&neg.export);
    let params = TransmissionParams {
        size: neg.size,
        read_only: neg.read_only,
        max_payload: neg.max_payload,
        structured: neg.structured,
        meta_contexts: neg.contexts.len(),
    };
    let conn = Conn {
        ctx,
        peer,
        export_name: &entry.name,
        export: entry.export.as_ref(),
        counters: &entry.counters,
        neg: &neg,
        params,
        writer: Mutex::new(writer),
        broken: AtomicBool::new(false),
        ended: AtomicBool::new(false),
        error: Mutex::new(None),
        stats,
        reader: Mutex::new(BufReader::with_capacity(READ_BUFFER, stream)),
        turn: Turn::default(),
        workers: Mutex::new(1),
        workers_now: AtomicUsize::new(1),
        idle: AtomicUsize::new(1),
        flushing: AtomicUsize::new(0),
        max_workers: ctx.config.workers_per_connection.max(1),
        max_flushing: ctx.config.flush_workers_per_connection,
    };
    // This thread is the first worker; it starts the others as the load needs them.
    thread::scope(|scope| conn.worker(scope, true));
    match lock(&conn.error).take() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Logs how many I/O errors the rate limit left out, if any (when a connection closes, so
/// the count of a storm that ended is not lost).
pub(crate) fn report_suppressed_io_errors(ctx: &Ctx) {
    let n = ctx.shared.io_errors.take_suppressed();
    if n > 0 {
        tracing::warn!(suppressed = n, "more I/O errors were returned to NBD clients than were logged");
    }
}

impl<S: Transport> Conn<'_, S> {
    /// Adds `n` to a count of this connection and of its export.
    fn count(&self, what: Count, n: u64) {
        let (mine, export) = match what {
            Count::Requests => (&self.stats.requests, &self.counters.requests),
            Count::BytesRead => (&self.stats.bytes_read, &self.counters.bytes_read),
            Count::BytesWritten => (&self.stats.bytes_written, &self.counters.bytes_written),
            Count::IoErrors => (&self.stats.io_errors, &self.counters.io_errors),
        };
        mine.fetch_add(n, Ordering::Relaxed);
        export.fetch_add(n, Ordering::Relaxed);
    }

    /// Takes turns with the other workers: reads one request in its turn, then runs it and
    /// sends its reply, until the request stream ends. The first worker (`first`) waits for
    /// requests for ever; the others end after `worker_linger` without one.
    fn worker<'scope, 'env>(&'env self, scope: &'scope Scope<'scope, 'env>, first: bool) {
        let mut buf: Vec<u8> = Vec::new();
        let linger = self.ctx.config.worker_linger;
        loop {
            let job = {
                let Some(_turn) = self.turn.take((!first).then_some(linger)) else {
                    return self.retire();
                };
                let mut r = lock(&self.reader);
                if self.ended.load(Ordering::SeqCst) || self.broken.load(Ordering::SeqCst) {
                    return self.retire();
                }
                match self.read_request(&mut *r, !first, &mut buf) {
                    Ok(Next::Job(job)) => job,
                    Ok(Next::Idle) => return self.retire(),
                    Ok(Next::End) => {
                        self.ended.store(true, Ordering::SeqCst);
                        return self.retire();
                    }
                    Err(e) => {
                        self.ended.store(true, Ordering::SeqCst);
                        lock(&self.error).get_or_insert(e);
                        return self.retire();
                    }
                }
            };
            let flush = job.req.command == Command::Flush;
            if flush {
                self.flushing.fetch_add(1, Ordering::SeqCst);
            }
            if self.idle.fetch_sub(1, Ordering::SeqCst) == 1 {
                // No other worker will read the next request while this one runs.
                self.hire(scope);
            }
            if !self.broken.load(Ordering::SeqCst) {
                let started = Instant::now();
                self.execute(&job, &mut buf);
                self.counters.latency.record(started.elapsed());
            }
            if flush {
                self.flushing.fetch_sub(1, Ordering::SeqCst);
            }
            self.idle.fetch_add(1, Ordering::SeqCst);
            if buf.capacity() > KEEP_BUFFER {
                buf = Vec::new();
            }
        }
    }

    /// Starts one more worker, unless there are enough (workers in a flush aside, up to
    /// `max_flushing`).
    fn hire<'scope, 'env>(&'env self, scope: &'scope Scope<'scope, 'env>) {
        let limit = || self.max_workers + self.flushing.load(Ordering::SeqCst).min(self.max_flushing);
        if self.workers_now.load(Ordering::SeqCst) >= limit() {
            return;
        }
        {
            let mut n = lock(&self.workers);
            if *n >= limit() {
                return;
            }
            *n += 1;
            self.workers_now.store(*n, Ordering::SeqCst);
            if *n == 2 {
                self.set_read_timeout(Some(self.ctx.config.worker_linger));
            }
            self.idle.fetch_add(1, Ordering::SeqCst);
        }
        let spawned = thread::Builder::new().name("nbd-worker".into()).spawn_scoped(scope, move || {
            self.worker(scope, false);
        });
        if let Err(e) = spawned {
            self.retire();
            tracing::warn!(error = %e, "cannot start another worker for an NBD connection");
        }
    }

    /// A worker ends (it was idle).
    fn retire(&self) {
        self.idle.fetch_sub(1, Ordering::SeqCst);
        let mut n = lock(&self.workers);
        *n -= 1;
        self.workers_now.store(*n, Ordering::SeqCst);
        if *n == 1 {
            self.set_read_timeout(None);
        }
    }

    /// Sets the socket's read timeout (through the writer's handle: the reader's may be in a
    /// read). A read already waiting keeps the timeout it started with.
    fn set_read_timeout(&self, d: Option<Duration>) {
        if let Err(e) = lock(&self.writer).set_read_timeout_opt(d) {
            tracing::debug!(error = %e, "cannot set the read timeout");
        }
    }

    /// Reads the next request to run. Requests that can be refused without the export are
    /// answered here. `End` when the client disconnects (or sends DISC); `Idle` (only if
    /// `may_idle`) when no request began within the read timeout.
    /// A write's payload is read into `buf` (the worker's buffer, reused from request to
    /// request: no allocation or zeroing per write).
    fn read_request<R: Read>(&self, r: &mut R, may_idle: bool, buf: &mut Vec<u8>) -> Result<Next, ConnError> {
        loop {
            let mut hdr = [0u8; REQUEST_HEADER_LEN];
            match fill(r, &mut hdr, may_idle)? {
                Filled::Full => {}
                Filled::Eof => return Ok(Next::End),
                Filled::Idle => return Ok(Next::Idle),
            }
            // A bad magic means the stream is out of step; nothing after it can be trusted.
            let req = Request::decode(&hdr)?;
            self.count(Count::Requests, 1);
            if req.command == Command::Disc {
                tracing::debug!("client sent NBD_CMD_DISC");
                return Ok(Next::End);
            }
            if let Err(e) = req.check(&self.params) {
                tracing::debug!(command = %req.command, offset = req.offset, length = req.length, error = %e, "request refused");
                // A refused write still carries its payload; consume it to stay in step.
                discard(r, u64::from(req.payload_len()))?;
                self.send_error(&req, e);
                continue;
            }
            if req.command == Command::Write {
                let payload = grown(buf, req.length as usize);
                if fill(r, payload, false)? != Filled::Full {
                    return Err(ConnError::Io(io::ErrorKind::UnexpectedEof.into()));
                }
            }
            return Ok(Next::Job(Job { req }));
        }
    }

    /// Runs `job`; a write's payload is the start of `buf` (see `read_request`).
    fn execute(&self, job: &Job, buf: &mut Vec<u8>) {
        let req = &job.req;
        let e = self.export;
        let fua = req.has(NBD_CMD_FLAG_FUA);
        let len = u64::from(req.length);
        let result = match req.command {
            Command::Read => return self.read(req, buf),
            Command::BlockStatus => return self.block_status(req),
            Command::Write => e.write(req.offset, &buf[..req.length as usize], fua).map(|()| {
                self.count(Count::BytesWritten, len);
            }),
            Command::Flush => e.flush(),
            Command::Trim if len == 0 => Ok(()),
            Command::Trim => e.trim(req.offset, len, fua),
            Command::WriteZeroes if req.has(NBD_CMD_FLAG_FAST_ZERO) && !e.fast_zero() => {
                return self
                    .send_error(req, RequestError { errno: NBD_ENOTSUP, reason: "zeroing is not fast" });
            }
            Command::WriteZeroes if len == 0 => Ok(()),
            Command::WriteZeroes => e.write_zeroes(req.offset, len, !req.has(NBD_CMD_FLAG_NO_HOLE), fua),
            Command::Cache => e.cache(req.offset, len),
            Command::Disc | Command::Unknown(_) => {
                return self.send_error(req, RequestError { errno: NBD_EINVAL, reason: "unknown command" });
            }
        };
        match result {
            Ok(()) => self.send(&mut [IoSlice::new(&proto::encode_simple_reply(0, req.handle))]),
            Err(err) => self.send_io_error(req, &err),
        }
    }

    fn read(&self, req: &Request, buf: &mut Vec<u8>) {
        let len = req.length as usize;
        if len > 0 {
            let mut reply = |parts: &[&[u8]]| self.send_read_reply(req, parts);
            match self.export.read_borrowed(req.offset, len, &mut reply) {
                Some(Ok(())) => {
                    self.count(Count::BytesRead, u64::from(req.length));
                    return;
                }
                Some(Err(err)) => return self.send_io_error(req, &err),
                None => {}
            }
        }
        // `read` fills all of `buf` or fails (and then none of it is sent), so what an earlier
        // request of this worker left there needs no zeroing first.
        let buf = grown(buf, len);
        if let Err(err) = self.export.read(req.offset, buf) {
            return self.send_io_error(req, &err);
        }
        self.count(Count::BytesRead, u64::from(req.length));
        self.send_read_reply(req, &[buf]);
    }

    /// The reply to a successful read whose bytes are `parts`, in order.
    fn send_read_reply(&self, req: &Request, parts: &[&[u8]]) {
        let len = req.length as usize;
        debug_assert_eq!(parts.iter().map(|p| p.len()).sum::<usize>(), len);
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(parts.len() + 1);
        if !self.neg.structured {
            let hdr = proto::encode_simple_reply(0, req.handle);
            slices.push(IoSlice::new(&hdr));
            slices.extend(parts.iter().map(|p| IoSlice::new(p)));
            return self.send(&mut slices);
        }
        if len == 0 {
            return self.send(&mut [IoSlice::new(&proto::encode_none_chunk(req.handle))]);
        }
        if parts.iter().all(|p| is_zero(p)) {
            // A single hole chunk is one content chunk, so it also satisfies DF.
            let chunk = proto::encode_offset_hole(req.handle, req.offset, req.length, true);
            return self.send(&mut [IoSlice::new(&chunk)]);
        }
        // Every read is answered with one content chunk, so NBD_CMD_FLAG_DF needs no work.
        match proto::encode_offset_data_prefix(req.handle, req.offset, len, true) {
            Some(prefix) => {
                slices.push(IoSlice::new(&prefix));
                slices.extend(parts.iter().map(|p| IoSlice::new(p)));
                self.send(&mut slices)
            }
            None => self.send_error(req, RequestError { errno: NBD_EINVAL, reason: "read too large" }),
        }
    }

    fn block_status(&self, req: &Request) {
        let mut out = Vec::new();
        let n = self.neg.contexts.len();
        for (i, (id, name)) in self.neg.contexts.iter().enumerate() {
            let raw = match self.export.block_status(name, req.offset, u64::from(req.length)) {
                Ok(r) => r,
                Err(err) => return self.send_io_error(req, &err),
            };
            let ext = proto::normalize_extents(&raw, req.length, req.has(NBD_CMD_FLAG_REQ_ONE), MAX_EXTENTS);
            if !proto::encode_block_status_chunk(&mut out, req.handle, *id, &ext, i + 1 == n) {
                tracing::error!(context = %name, "export returned no extent for a block status request");
                let e = RequestError { errno: NBD_EIO, reason: "export returned no extent" };
                return self.send_error(req, e);
            }
        }
        self.send(&mut [IoSlice::new(&out)]);
    }

    /// Answers a request with the export's error, and logs it (at most a few lines a second
    /// for the whole server; the next line logged says how many were left out).
    fn send_io_error(&self, req: &Request, err: &io::Error) {
        let errno = errno_for(err);
        self.count(Count::IoErrors, 1);
        if let Some(suppressed) = self.ctx.shared.io_errors.admit() {
            tracing::warn!(
                peer = %self.peer, export = %self.export_name, command = %req.command, offset = req.offset,
                length = req.length, errno = %proto::errno_name(errno), suppressed, error = %err,
                "I/O error returned to the NBD client"
            );
        }
        let message = err.to_string();
        self.send_error_msg(req, errno, &message);
    }

    fn send_error(&self, req: &Request, e: RequestError) {
        self.send_error_msg(req, e.errno, e.reason);
    }

    fn send_error_msg(&self, req: &Request, errno: u32, message: &str) {
        if self.neg.structured {
            let mut out = Vec::new();
            proto::encode_error_chunk(&mut out, req.handle, errno, message);
            self.send(&mut [IoSlice::new(&out)]);
        } else {
            self.send(&mut [IoSlice::new(&proto::encode_simple_reply(errno, req.handle))]);
        }
    }

    /// Writes one whole reply. On failure (client gone, or not reading within the write
    /// timeout) the connection is marked broken and shut so the reader stops too.
    fn send(&self, parts: &mut [IoSlice<'_>]) {
        if self.broken.load(Ordering::SeqCst) {
            return;
        }
        let mut w = lock(&self.writer);
        if let Err(e) = write_all_vectored(&mut *w, parts) {
            if !self.broken.swap(true, Ordering::SeqCst) {
                tracing::debug!(error = %e, "cannot write reply; dropping connection");
            }
            let _ = w.shutdown_how(Shutdown::Both);
        }
    }
}

/// Whether every byte is zero (in 64-byte strides the compiler can vectorise).
fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    let whole = chunks.by_ref().all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0);
    whole && chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection_looks_at_every_byte() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 1000]));
        for pos in [0, 63, 64, 999] {
            let mut v = vec![0u8; 1000];
            v[pos] = 1;
            assert!(!is_zero(&v), "byte {pos}");
        }
    }

    #[test]
    fn export_errors_map_to_protocol_errors() {
        assert_eq!(errno_for(&io::Error::other("x")), NBD_EIO);
        assert_eq!(errno_for(&io::ErrorKind::StorageFull.into()), NBD_ENOSPC);
        assert_eq!(errno_for(&io::ErrorKind::PermissionDenied.into()), NBD_EPERM);
        assert_eq!(errno_for(&io::ErrorKind::InvalidInput.into()), NBD_EINVAL);
    }
}
