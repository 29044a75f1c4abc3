//! The HTTP client every HTTP backend (`registry`, `http`, `s3`) shares: one `ureq` agent with
//! timeouts ([`HttpConfig`], [`HttpClient`]), the retry policy and pace of bodies it works
//! under, its cancel, the mapping of failures to `RemoteError` (404 is `NotFound`; transport
//! errors, 5xx, 429, short bodies and bodies too slow are transient), and reading whole bodies
//! (into memory, into a file, in chunks for the range readers). Range requests are `ranges`',
//! multi-range answers `multipart`'s, authentication headers `auth`'s.
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
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use ureq::http::Response;

use crate::error::{RemoteError, Result};
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
    /// Retries so far (attempts after a request's first).
    retries: std::sync::atomic::AtomicU64,
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
        HttpClient {
            agent,
            retry: config.retry,
            pace: config.pace,
            cancel: Cancel::default(),
            retries: Default::default(),
        }
    }

    /// Runs `op` under the retry policy (see [`RetryPolicy::run`]).
    pub fn run<T>(&self, what: &str, op: impl FnMut() -> Result<T>) -> Result<T> {
        self.retry.run(what, Duration::ZERO, &self.cancel, &self.retries, op)
    }

    /// Retries so far: attempts of requests after their first.
    pub fn retries(&self) -> u64 {
        self.retries.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs `op`, a transfer of `len` bytes, under the retry policy, whose budget grows by the
    /// time `len` bytes take at the minimum rate.
    pub fn run_transfer<T>(&self, what: &str, len: u64, op: impl FnMut() -> Result<T>) -> Result<T> {
        self.retry.run(what, self.pace.allowance(len), &self.cancel, &self.retries, op)
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
pub(crate) const STREAM_CHUNK: usize = 256 << 10;

/// Hands the next `len` bytes of `reader` (or all of it, for `u64::MAX`) to `each` in pieces
/// of up to [`STREAM_CHUNK`] bytes, each filled as far as the body allows. Returns whether
/// `each` stopped the transfer and how many bytes it got. On a read error, what arrived is
/// handed over first (so that a retry resumes after it).
pub(crate) fn read_chunks(
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

pub fn content_length(resp: &Response<ureq::Body>) -> Option<u64> {
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

/// What stays unescaped in a query parameter value: RFC 3986's unreserved characters.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Percent-encodes a query parameter value (RFC 3986 unreserved characters stay).
pub fn query_escape(s: &str) -> String {
    utf8_percent_encode(s, QUERY_VALUE).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_escaped() {
        assert_eq!(query_escape("sha256:ab/c d"), "sha256%3Aab%2Fc%20d");
        assert_eq!(query_escape("repository:a/b:pull,push"), "repository%3Aa%2Fb%3Apull%2Cpush");
        assert_eq!(query_escape("A-z_0.9~"), "A-z_0.9~");
        assert_eq!(query_escape("é"), "%C3%A9");
    }
}
