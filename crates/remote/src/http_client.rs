//! HTTP plumbing shared by the registry (`registry`), plain-HTTP (`http`) and S3 (`s3`)
//! backends: one `ureq` agent with timeouts, the retry policy and the pace of bodies, the
//! client's cancel, error mapping (404 is `NotFound`; transport errors, 5xx, 429, short bodies
//! and bodies too slow are transient), ranged reads that insist on exactly the bytes asked for,
//! streamed downloads, and `WWW-Authenticate` parsing.
//!
//! Tuning from the environment (all optional, read when a backend is opened):
//! - `MCOW_HTTP_CONNECT_TIMEOUT_MS` (default 5000): TCP connect timeout;
//! - `MCOW_HTTP_TIMEOUT_MS` (default 30000): time to send a request and get the response headers,
//!   and the longest stall allowed for any single read or write of a body;
//! - `MCOW_HTTP_DEADLINE_MS` (default 10000) and `MCOW_HTTP_MIN_RATE` (bytes per second, default
//!   262144; 0 turns it off): the pace of a response body. After the first `DEADLINE_MS` it
//!   must average at least `MIN_RATE`, so N bytes take at most `DEADLINE_MS + N / MIN_RATE`; a
//!   body that falls behind is abandoned and what is missing is asked for again;
//! - `MCOW_RETRY_DEADLINE_MS` (default 30000): transient failures are retried (jittered
//!   exponential backoff, `Retry-After` honoured) until this long after the first attempt, plus
//!   N / `MIN_RATE` for a transfer of N bytes (see `retry`).

use std::fs::File;
use std::io::{BufRead, Read, Write};
use std::path::Path;
use std::time::Duration;

use ureq::http::{Response, StatusCode};

use crate::error::{RemoteError, Result};
use crate::range::{MultiSink, Sink};
use crate::retry::{Cancel, Pace, Paced, RetryPolicy, abandoned};

/// Timeouts, the pace of bodies and retries of an HTTP backend.
#[derive(Debug, Clone, Copy)]
pub struct HttpConfig {
    pub connect_timeout: Duration,
    /// Sending a request and receiving its response headers; also the longest stall of any one
    /// body read or write.
    pub request_timeout: Duration,
    /// The pace every response body must keep (which bounds a whole transfer by its size).
    pub pace: Pace,
    pub retry: RetryPolicy,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            pace: Pace { grace: Duration::from_secs(10), min_rate: 256 << 10 },
            retry: RetryPolicy::default(),
        }
    }
}

fn env_ms(name: &str) -> Option<Duration> {
    let v = std::env::var(name).ok()?;
    match v.trim().parse::<u64>() {
        Ok(ms) => Some(Duration::from_millis(ms)),
        Err(_) => {
            tracing::warn!("ignoring {name}={v:?}: expected milliseconds");
            None
        }
    }
}

impl HttpConfig {
    /// The defaults, overridden by `MCOW_HTTP_CONNECT_TIMEOUT_MS`, `MCOW_HTTP_TIMEOUT_MS`,
    /// `MCOW_HTTP_DEADLINE_MS`, `MCOW_HTTP_MIN_RATE` and `MCOW_RETRY_DEADLINE_MS` when set.
    pub fn from_env() -> HttpConfig {
        let mut c = HttpConfig::default();
        if let Some(d) = env_ms("MCOW_HTTP_CONNECT_TIMEOUT_MS") {
            c.connect_timeout = d;
        }
        if let Some(d) = env_ms("MCOW_HTTP_TIMEOUT_MS") {
            c.request_timeout = d;
        }
        if let Some(d) = env_ms("MCOW_HTTP_DEADLINE_MS") {
            c.pace.grace = d;
        }
        if let Ok(v) = std::env::var("MCOW_HTTP_MIN_RATE") {
            match v.trim().parse::<u64>() {
                Ok(n) => c.pace.min_rate = n,
                Err(_) => tracing::warn!("ignoring MCOW_HTTP_MIN_RATE={v:?}: expected bytes per second"),
            }
        }
        if let Some(d) = env_ms("MCOW_RETRY_DEADLINE_MS") {
            c.retry.deadline = d;
        }
        if std::env::var_os("MCOW_RETRY_ATTEMPTS").is_some() {
            tracing::warn!(
                "ignoring MCOW_RETRY_ATTEMPTS: retries are bounded by time (MCOW_RETRY_DEADLINE_MS)"
            );
        }
        c
    }
}

/// An agent, the retry policy and pace it works under, and its cancel.
pub struct HttpClient {
    pub agent: ureq::Agent,
    pub retry: RetryPolicy,
    pub pace: Pace,
    cancel: Cancel,
}

impl HttpClient {
    pub fn new(config: &HttpConfig) -> HttpClient {
        let t = Some(config.request_timeout);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(config.connect_timeout))
            .timeout_send_request(t)
            .timeout_recv_response(t)
            .timeout_per_read(t)
            .timeout_per_write(t)
            .user_agent(concat!("mcow/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        HttpClient { agent, retry: config.retry, pace: config.pace, cancel: Cancel::default() }
    }

    /// Runs `op` under the retry policy (see [`RetryPolicy::run`]).
    pub fn run<T>(&self, what: &str, op: impl FnMut() -> Result<T>) -> Result<T> {
        self.retry.run(what, Duration::ZERO, &self.cancel, op)
    }

    /// Runs `op`, a transfer of `len` bytes, under the retry policy, whose budget grows by the
    /// time `len` bytes take at the minimum rate.
    pub fn run_transfer<T>(&self, what: &str, len: u64, op: impl FnMut() -> Result<T>) -> Result<T> {
        self.retry.run(what, self.pace.allowance(len), &self.cancel, op)
    }

    /// A response body's reader, held to the pace and the cancel.
    pub fn body<'a>(&self, resp: &'a mut Response<ureq::Body>) -> Paced<ureq::BodyReader<'a>> {
        Paced::new(resp.body_mut().as_reader(), self.pace, self.cancel.clone())
    }

    /// Ends this client's work for good (for the end of a process): retries waiting stop, bodies
    /// being read stop at their next read, and its connections are closed, which interrupts
    /// requests blocked on them; later requests fail at once. Each fails with
    /// [`RemoteError::Cancelled`].
    pub fn cancel(&self) {
        self.cancel.cancel();
        self.agent.clone().shutdown();
    }
}

/// Maps a ureq failure (no HTTP answer) to our error: network trouble is transient, a bad URL or
/// header is not.
pub fn transport_error(method: &'static str, url: &str, e: ureq::Error) -> RemoteError {
    match e {
        ureq::Error::BadUri(_) | ureq::Error::Http(_) | ureq::Error::InvalidProxyUrl => {
            RemoteError::Invalid(format!("{method} {url}: {e}"))
        }
        ureq::Error::StatusCode(status) => {
            RemoteError::Http { method, url: url.to_string(), status, body: String::new(), retry_after: None }
        }
        other => RemoteError::Transport { method, url: url.to_string(), reason: other.to_string() },
    }
}

/// A body read that failed midway: transient (the connection broke or timed out, the body was
/// too slow), unless the client was cancelled.
pub fn body_error(method: &'static str, url: &str, e: std::io::Error) -> RemoteError {
    abandoned(method, url, e)
}

/// The pace of the short error bodies read for messages: a trickle does not hold them up.
const ERROR_BODY_PACE: Pace = Pace { grace: Duration::from_secs(1), min_rate: 1024 };

/// Turns an unexpected answer into an error: 404 (and 416 when `range` is set) become
/// `NotFound`, others `Http` with the start of the body (error JSON from registries).
pub fn status_error(
    method: &'static str,
    url: &str,
    what: &str,
    mut resp: Response<ureq::Body>,
) -> RemoteError {
    let status = resp.status().as_u16();
    let retry_after = retry_after(&resp);
    let body = if method != "HEAD" { error_body(&mut resp, 2048).trim().to_string() } else { String::new() };
    if status == 404 {
        return RemoteError::NotFound { what: what.to_string(), location: url.to_string() };
    }
    RemoteError::Http { method, url: url.to_string(), status, body, retry_after }
}

/// The start (up to `limit` bytes) of an error answer's body, for messages: read at a pace
/// that a trickle cannot hold up, and cut short (without error) when it fails.
pub fn error_body(resp: &mut Response<ureq::Body>, limit: u64) -> String {
    let mut buf = Vec::new();
    let reader = Paced::new(resp.body_mut().as_reader(), ERROR_BODY_PACE, Cancel::default());
    let _ = reader.take(limit).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// A `Retry-After` given in seconds (the HTTP-date form is ignored).
pub fn retry_after(resp: &Response<ureq::Body>) -> Option<Duration> {
    header(resp, "retry-after")?.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Bytes read from a body before they are handed to a sink: large enough that a sink sees a
/// few blocks at once, small enough that the first block is not held back long.
const STREAM_CHUNK: usize = 256 << 10;

/// Streams `len` bytes at `offset` to `sink`, one request per `attempt(offset, len, sink)`,
/// retried under `client`'s policy with the budget of a transfer of `len` bytes. After a
/// transient failure midway (a dropped connection, a short or too slow body) the retry asks
/// only for the bytes not yet delivered, so the sink sees every byte once and in order.
pub fn stream_range(
    client: &HttpClient,
    what: &str,
    offset: u64,
    len: u64,
    sink: &mut Sink<'_>,
    mut attempt: impl FnMut(u64, u64, &mut Sink<'_>) -> Result<()>,
) -> Result<()> {
    let mut done = 0u64;
    let mut stopped = false;
    client.run_transfer(what, len, || {
        if done == len || stopped {
            return Ok(());
        }
        attempt(offset + done, len - done, &mut |piece: &[u8]| {
            done += piece.len() as u64;
            stopped = !sink(piece);
            !stopped
        })
    })
}

/// Streams exactly `len` bytes of a ranged answer for `offset` to `sink`. A 206 must say it
/// starts at `offset`; a 200 (the server ignored `Range`) is read up to the wanted bytes, the
/// ones before them dropped. A body that ends early is a transient error.
pub fn stream_range_body(
    client: &HttpClient,
    method: &'static str,
    url: &str,
    mut resp: Response<ureq::Body>,
    offset: u64,
    len: u64,
    sink: &mut Sink<'_>,
) -> Result<()> {
    let mut skip = 0;
    if resp.status() == StatusCode::PARTIAL_CONTENT {
        let cr = header(&resp, "content-range").unwrap_or_default();
        let start = cr
            .strip_prefix("bytes ")
            .and_then(|r| r.split_once('-'))
            .and_then(|(s, _)| s.trim().parse::<u64>().ok());
        if start != Some(offset) {
            return Err(RemoteError::Invalid(format!(
                "{method} {url}: asked for bytes from {offset}, got Content-Range {cr:?}"
            )));
        }
        // A range running over the end is clamped by some servers: that is no transient failure.
        if let Some(total) = cr.rsplit_once('/').and_then(|(_, t)| t.trim().parse::<u64>().ok())
            && offset + len > total
        {
            return Err(RemoteError::Invalid(format!(
                "{method} {url}: bytes {offset}..{} asked for, but the object has {total}",
                offset + len
            )));
        }
    } else {
        // 200: the whole object. Skip to the range and read only what is needed.
        if let Some(total) = content_length(&resp)
            && offset + len > total
        {
            return Err(RemoteError::Invalid(format!(
                "{method} {url}: bytes {offset}..{} asked for, but the object has {total}",
                offset + len
            )));
        }
        tracing::warn!(url, offset, len, "server ignored the Range header; reading the whole body");
        skip = offset;
    }
    let mut reader = client.body(&mut resp);
    if skip > 0 {
        let skipped = std::io::copy(&mut (&mut reader).take(skip), &mut std::io::sink())
            .map_err(|e| body_error(method, url, e))?;
        if skipped < skip {
            return Err(RemoteError::Invalid(format!(
                "{method} {url}: the object has {skipped} bytes, fewer than offset {offset}"
            )));
        }
    }
    stream_body(method, url, &mut reader, offset, len, sink)
}

/// Feeds the next `len` bytes of `reader` to `sink` in pieces of up to [`STREAM_CHUNK`] bytes.
/// A body that ends early is a transient error (naming `offset`, where the body started).
pub fn stream_body(
    method: &'static str,
    url: &str,
    reader: &mut dyn Read,
    offset: u64,
    len: u64,
    sink: &mut Sink<'_>,
) -> Result<()> {
    let (stopped, got) = read_chunks(method, url, reader, len, sink)?;
    if !stopped && got < len {
        return Err(RemoteError::Transport {
            method,
            url: url.to_string(),
            reason: format!("short body: got {got} of {len} bytes at offset {offset}"),
        });
    }
    Ok(())
}

/// Hands the next `len` bytes of `reader` (or all of it, for `u64::MAX`) to `each` in pieces
/// of up to [`STREAM_CHUNK`] bytes, each filled as far as the body allows. Returns whether
/// `each` stopped the transfer and how many bytes it got. On a read error, what arrived is
/// handed over first (so that a retry resumes after it).
fn read_chunks(
    method: &'static str,
    url: &str,
    reader: &mut dyn Read,
    len: u64,
    each: &mut dyn FnMut(&[u8]) -> bool,
) -> Result<(bool, u64)> {
    let mut buf = vec![0u8; STREAM_CHUNK.min(usize::try_from(len).unwrap_or(usize::MAX))];
    let mut got = 0u64;
    while got < len {
        let want = buf.len().min(usize::try_from(len - got).unwrap_or(usize::MAX));
        let mut filled = 0;
        while filled < want {
            match reader.read(&mut buf[filled..want]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if filled > 0 {
                        each(&buf[..filled]);
                    }
                    return Err(body_error(method, url, e));
                }
            }
        }
        if filled > 0 && !each(&buf[..filled]) {
            return Ok((true, got + filled as u64));
        }
        got += filled as u64;
        if filled < want {
            break; // the body ended
        }
    }
    Ok((false, got))
}

/// The `Range` header value asking for `ranges` (offset, length), all in one request.
pub fn multi_range_header(ranges: &[(u64, u64)]) -> String {
    let parts: Vec<String> = ranges.iter().map(|&(o, l)| format!("{o}-{}", o + l - 1)).collect();
    format!("bytes={}", parts.join(","))
}

/// Streams the answer to a request for several `ranges` (offset, length) to `sink`, and counts
/// in `done` the bytes each range got (in order from its start; a range's bytes that do not
/// continue what it got are dropped). The answer may be `multipart/byteranges` (one part per
/// range, or parts that merge neighbouring ranges), a single 206 part covering them, or a 200
/// with the whole object. Ranges it leaves short are the caller's to ask for again; an error
/// says the transfer broke (what arrived before it is delivered).
pub fn stream_multi_range_body(
    client: &HttpClient,
    method: &'static str,
    url: &str,
    mut resp: Response<ureq::Body>,
    ranges: &[(u64, u64)],
    done: &mut [u64],
    sink: &mut MultiSink<'_>,
) -> Result<()> {
    let status = resp.status();
    let content_type = header(&resp, "content-type").unwrap_or_default();
    let boundary = content_type
        .to_ascii_lowercase()
        .starts_with("multipart/byteranges")
        .then(|| {
            content_type.split(';').find_map(|p| {
                let (k, v) = p.trim().split_once('=')?;
                k.trim().eq_ignore_ascii_case("boundary").then(|| v.trim().trim_matches('"').to_string())
            })
        })
        .flatten();
    let single = if status == StatusCode::PARTIAL_CONTENT {
        header(&resp, "content-range").map(|cr| parse_content_range(method, url, &cr)).transpose()?
    } else {
        None
    };
    let whole = content_length(&resp);
    let mut reader = std::io::BufReader::with_capacity(STREAM_CHUNK, client.body(&mut resp));
    let mut feed = |start: u64, len: u64, reader: &mut dyn Read| -> Result<bool> {
        feed_part(method, url, reader, start, len, ranges, done, sink)
    };
    match (status, boundary, single) {
        (StatusCode::OK, _, _) => {
            feed(0, whole.unwrap_or(u64::MAX), &mut reader)?;
        }
        (StatusCode::PARTIAL_CONTENT, Some(b), _) => {
            let delimiter = format!("--{b}");
            let mut line = String::new();
            loop {
                line.clear();
                if reader.read_line(&mut line).map_err(|e| body_error(method, url, e))? == 0 {
                    break; // ended without the closing delimiter: what is short is asked again
                }
                let l = line.trim_end();
                if l == format!("{delimiter}--") {
                    break;
                }
                if l != delimiter {
                    continue; // the preamble or the blank line before a delimiter
                }
                let mut part_range = None;
                loop {
                    line.clear();
                    if reader.read_line(&mut line).map_err(|e| body_error(method, url, e))? == 0 {
                        return Ok(());
                    }
                    let l = line.trim_end();
                    if l.is_empty() {
                        break;
                    }
                    if let Some((k, v)) = l.split_once(':')
                        && k.trim().eq_ignore_ascii_case("content-range")
                    {
                        part_range = Some(parse_content_range(method, url, v.trim())?);
                    }
                }
                let Some((start, end)) = part_range else {
                    return Err(RemoteError::Invalid(format!(
                        "{method} {url}: a part without Content-Range"
                    )));
                };
                if !feed(start, end + 1 - start, &mut reader)? {
                    return Ok(());
                }
            }
        }
        (StatusCode::PARTIAL_CONTENT, None, Some((start, end))) => {
            feed(start, end + 1 - start, &mut reader)?;
        }
        _ => {
            return Err(RemoteError::Invalid(format!(
                "{method} {url}: a {status} answer to a multi-range request without Content-Range"
            )));
        }
    }
    Ok(())
}

/// Several ranges in one request where the server allows: `multi(header, done, sink)` makes
/// that request (see [`stream_multi_range_body`]); whatever it leaves short (an error, a
/// server that merged or dropped ranges) is asked for again one range at a time with
/// `single(offset, len, sink)`, which retries. Returns the number of requests made.
pub fn stream_ranges(
    ranges: &[(u64, u64)],
    sink: &mut MultiSink<'_>,
    multi: impl FnOnce(&str, &mut [u64], &mut MultiSink<'_>) -> Result<()>,
    mut single: impl FnMut(u64, u64, &mut Sink<'_>) -> Result<()>,
) -> Result<u64> {
    let mut done = vec![0u64; ranges.len()];
    let mut stopped = false;
    let mut requests = 0;
    if ranges.len() > 1 {
        requests += 1;
        let header = multi_range_header(ranges);
        let result = multi(&header, &mut done, &mut |i: usize, piece: &[u8]| {
            stopped = !sink(i, piece);
            !stopped
        });
        if stopped {
            return Ok(requests);
        }
        if let Err(e) = result {
            tracing::debug!(error = %e, "multi-range request failed; asking range by range");
        }
    }
    for (i, &(o, l)) in ranges.iter().enumerate() {
        if done[i] >= l {
            continue;
        }
        requests += 1;
        single(o + done[i], l - done[i], &mut |piece: &[u8]| {
            stopped = !sink(i, piece);
            !stopped
        })?;
        if stopped {
            break;
        }
    }
    Ok(requests)
}

/// `bytes START-END/TOTAL` (or `*` for the total) as (START, END).
fn parse_content_range(method: &'static str, url: &str, cr: &str) -> Result<(u64, u64)> {
    let bad = || RemoteError::Invalid(format!("{method} {url}: bad Content-Range {cr:?}"));
    let r = cr.trim().strip_prefix("bytes ").ok_or_else(bad)?;
    let (span, _) = r.split_once('/').ok_or_else(bad)?;
    let (a, b) = span.split_once('-').ok_or_else(bad)?;
    let (a, b): (u64, u64) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
    if b < a {
        return Err(bad());
    }
    Ok((a, b))
}

/// Streams one part of an answer, covering bytes `[start, start + len)` of the object (`len`
/// may be `u64::MAX`: to the end of the body), handing each requested range the bytes of it
/// that continue what it got. False if the sink stopped.
#[allow(clippy::too_many_arguments)]
fn feed_part(
    method: &'static str,
    url: &str,
    reader: &mut dyn Read,
    start: u64,
    len: u64,
    ranges: &[(u64, u64)],
    done: &mut [u64],
    sink: &mut MultiSink<'_>,
) -> Result<bool> {
    let mut at = start;
    let (stopped, got) = read_chunks(method, url, reader, len, &mut |chunk: &[u8]| {
        let (lo, hi) = (at, at + chunk.len() as u64);
        at = hi;
        for (i, &(o, l)) in ranges.iter().enumerate() {
            let next = o + done[i];
            if done[i] >= l || next < lo || next >= hi {
                continue;
            }
            let piece = &chunk[(next - lo) as usize..((o + l).min(hi) - lo) as usize];
            done[i] += piece.len() as u64;
            if !sink(i, piece) {
                return false;
            }
        }
        true
    })?;
    if !stopped && len != u64::MAX && got < len {
        return Err(RemoteError::Transport {
            method,
            url: url.to_string(),
            reason: format!("short body: a part ended at {}, before {}", start + got, start + len),
        });
    }
    Ok(!stopped)
}

/// Reads a whole body of at most `limit` bytes; checks Content-Length when there is one.
pub fn read_body(
    client: &HttpClient,
    method: &'static str,
    url: &str,
    mut resp: Response<ureq::Body>,
    limit: u64,
) -> Result<Vec<u8>> {
    let expected = content_length(&resp);
    if let Some(n) = expected
        && n > limit
    {
        return Err(RemoteError::Invalid(format!(
            "{method} {url}: {n} bytes is more than the {limit} allowed"
        )));
    }
    let mut buf = Vec::new();
    client.body(&mut resp).take(limit + 1).read_to_end(&mut buf).map_err(|e| body_error(method, url, e))?;
    if buf.len() as u64 > limit {
        return Err(RemoteError::Invalid(format!("{method} {url}: more than the {limit} bytes allowed")));
    }
    if let Some(n) = expected
        && (buf.len() as u64) < n
    {
        return Err(RemoteError::Transport {
            method,
            url: url.to_string(),
            reason: format!("short body: got {} of {n} bytes", buf.len()),
        });
    }
    Ok(buf)
}

/// Streams a body into a new file at `dest`, reporting bytes so far. A body shorter than its
/// Content-Length is a transient error.
pub fn body_to_file(
    client: &HttpClient,
    method: &'static str,
    url: &str,
    mut resp: Response<ureq::Body>,
    dest: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<u64> {
    let expected = content_length(&resp);
    let mut out = File::create(dest).map_err(RemoteError::io("create", dest))?;
    let mut reader = client.body(&mut resp);
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(body_error(method, url, e)),
        };
        out.write_all(&buf[..n]).map_err(RemoteError::io("write", dest))?;
        done += n as u64;
        progress(done);
    }
    out.flush().map_err(RemoteError::io("write", dest))?;
    if let Some(n) = expected
        && done < n
    {
        return Err(RemoteError::Transport {
            method,
            url: url.to_string(),
            reason: format!("short body: got {done} of {n} bytes"),
        });
    }
    Ok(done)
}

/// A header's value as text.
pub fn header(resp: &Response<ureq::Body>, name: &str) -> Option<String> {
    resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

fn content_length(resp: &Response<ureq::Body>) -> Option<u64> {
    header(resp, "content-length").and_then(|v| v.trim().parse().ok())
}

/// A reader that reports how many bytes went through it.
pub struct ProgressReader<'a, R> {
    pub inner: R,
    pub done: u64,
    pub progress: &'a mut dyn FnMut(u64),
}

impl<R: Read> Read for ProgressReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        (self.progress)(self.done);
        Ok(n)
    }
}

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Lower case: `bearer`, `basic`, ...
    pub scheme: String,
    /// Parameter names in lower case.
    pub params: Vec<(String, String)>,
}

impl Challenge {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Parses a `WWW-Authenticate` value such as
/// `Bearer realm="https://auth/token",service="registry",scope="repository:a/b:pull,push"`
/// (quoted values may hold commas) or `Basic realm="r"`. Several challenges may follow each
/// other; a new one starts at a token that is not followed by `=`.
pub fn parse_www_authenticate(value: &str) -> Vec<Challenge> {
    let mut out: Vec<Challenge> = Vec::new();
    let s = value.as_bytes();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < s.len() && (s[*i] == b' ' || s[*i] == b'\t' || s[*i] == b',') {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        if i >= s.len() {
            break;
        }
        let start = i;
        while i < s.len() && !matches!(s[i], b' ' | b'\t' | b',' | b'=') {
            i += 1;
        }
        let token = &value[start..i];
        // Look past spaces for '='.
        let mut j = i;
        while j < s.len() && (s[j] == b' ' || s[j] == b'\t') {
            j += 1;
        }
        if j < s.len() && s[j] == b'=' && !out.is_empty() && !token.is_empty() {
            // A parameter of the current challenge (token68 values such as "abc==" fall here too
            // and are ignored gracefully).
            i = j + 1;
            while i < s.len() && (s[i] == b' ' || s[i] == b'\t') {
                i += 1;
            }
            let mut val = String::new();
            if i < s.len() && s[i] == b'"' {
                i += 1;
                while i < s.len() && s[i] != b'"' {
                    if s[i] == b'\\' && i + 1 < s.len() {
                        i += 1;
                    }
                    // Push whole UTF-8 characters.
                    let ch_len = utf8_len(s[i]);
                    val.push_str(&value[i..(i + ch_len).min(s.len())]);
                    i += ch_len;
                }
                i += 1; // closing quote
            } else {
                let vs = i;
                while i < s.len() && s[i] != b',' {
                    i += 1;
                }
                val = value[vs..i].trim().to_string();
            }
            out.last_mut().expect("checked").params.push((token.to_ascii_lowercase(), val));
        } else if !token.is_empty() {
            out.push(Challenge { scheme: token.to_ascii_lowercase(), params: Vec::new() });
        } else {
            i += 1;
        }
    }
    out
}

fn utf8_len(b: u8) -> usize {
    match b {
        0xf0..=0xff => 4,
        0xe0..=0xef => 3,
        0xc0..=0xdf => 2,
        _ => 1,
    }
}

/// Standard base64 with padding (for `Authorization: Basic`).
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 { T[(n >> 6) as usize & 63] as char } else { '=' });
        out.push(if c.len() > 2 { T[n as usize & 63] as char } else { '=' });
    }
    out
}

/// Percent-encodes a query parameter value (RFC 3986 unreserved characters stay).
pub fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_and_basic_challenges() {
        let c = parse_www_authenticate(
            r#"Bearer realm="http://127.0.0.1:1/token",service="reg",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].param("realm"), Some("http://127.0.0.1:1/token"));
        assert_eq!(c[0].param("service"), Some("reg"));
        assert_eq!(c[0].param("scope"), Some("repository:a/b:pull,push"));
        let c = parse_www_authenticate(r#"Basic realm="r""#);
        assert_eq!(c, vec![Challenge { scheme: "basic".into(), params: vec![("realm".into(), "r".into())] }]);
        let c =
            parse_www_authenticate(r#"Basic realm="a \"q\"", Bearer realm=http://x/t, error=invalid_token"#);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].param("realm"), Some("a \"q\""));
        assert_eq!(c[1].scheme, "bearer");
        assert_eq!(c[1].param("realm"), Some("http://x/t"));
        assert_eq!(c[1].param("error"), Some("invalid_token"));
        assert!(parse_www_authenticate("").is_empty());
        let c = parse_www_authenticate("Negotiate");
        assert_eq!(c[0].scheme, "negotiate");
    }

    #[test]
    fn base64_and_escaping() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"user:pa ss"), "dXNlcjpwYSBzcw==");
        assert_eq!(query_escape("sha256:ab/c d"), "sha256%3Aab%2Fc%20d");
    }
}
