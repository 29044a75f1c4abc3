//! Range requests over HTTP: streaming one range with retries that resume after what was
//! delivered ([`stream_range`]), checking a ranged answer (`206` with the right
//! `Content-Range`, or a `200` read up to the range), the `Range` header for several ranges and
//! asking for them in one request with a fallback range by range ([`stream_ranges`]), and
//! parsing `Content-Range` ([`parse_content_range`]). Multi-range answers are `multipart`'s.

use std::io::Read;

use ureq::http::{Response, StatusCode};

use super::client::{HttpClient, body_error, content_length, header, read_chunks};
use crate::error::{RemoteError, Result};
use crate::range::{MultiSink, Sink};

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
    let past_end = |size: u64| RemoteError::OutOfRange {
        location: format!("{method} {url}"),
        object: "object",
        offset,
        end: offset + len,
        size,
    };
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
            return Err(past_end(total));
        }
    } else {
        // 200: the whole object. Skip to the range and read only what is needed.
        if let Some(total) = content_length(&resp)
            && offset + len > total
        {
            return Err(past_end(total));
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
    let mut stopped = false;
    stream_body(method, url, &mut reader, offset, len, &mut |piece: &[u8]| {
        stopped = !sink(piece);
        !stopped
    })?;
    if skip == 0 && !stopped {
        // The answer's bytes are all read; one more read sees its end, which is what lets the
        // HTTP client keep the connection for the next request. Without it every ranged fetch
        // opened a new connection: a TCP handshake (one round trip more) per fetch.
        let mut probe = [0u8; 64];
        let _ = reader.read(&mut probe);
    }
    Ok(())
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

/// The `Range` header value asking for `ranges` (offset, length), all in one request.
pub fn multi_range_header(ranges: &[(u64, u64)]) -> String {
    let parts: Vec<String> = ranges.iter().map(|&(o, l)| format!("{o}-{}", o + l - 1)).collect();
    format!("bytes={}", parts.join(","))
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

/// `bytes START-END/TOTAL` (or `*` for the total) as (START, END). Public for the fuzz target
/// (fuzz/fuzz_targets/content_range.rs). What it accepts has START <= END < u64::MAX, so the
/// part's length END + 1 - START cannot overflow.
pub fn parse_content_range(method: &'static str, url: &str, cr: &str) -> Result<(u64, u64)> {
    let bad = || RemoteError::Invalid(format!("{method} {url}: bad Content-Range {cr:?}"));
    let r = cr.trim().strip_prefix("bytes ").ok_or_else(bad)?;
    let (span, _) = r.split_once('/').ok_or_else(bad)?;
    let (a, b) = span.split_once('-').ok_or_else(bad)?;
    let (a, b): (u64, u64) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
    if b < a || b == u64::MAX {
        return Err(bad());
    }
    Ok((a, b))
}
