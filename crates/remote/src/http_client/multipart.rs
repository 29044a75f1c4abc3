//! Answers to multi-range requests: a `multipart/byteranges` body (RFC 9110, 14.6), a single
//! `206` part covering several ranges, or a `200` with the whole object; and the parser of
//! `multipart/byteranges` bodies ([`read_byteranges`]), which works on any buffered reader so
//! that it can be tested and fuzzed without a server. Every part's bytes go to the requested
//! ranges they continue (parts may merge neighbouring ranges, come in any order, or cover
//! nothing asked for); what a body leaves short is counted, for the caller to ask again.

use std::io::{BufRead, Read};

use ureq::http::{Response, StatusCode};

use super::client::{HttpClient, STREAM_CHUNK, body_error, content_length, header, read_chunks};
use super::ranges::parse_content_range;
use crate::error::{RemoteError, Result};
use crate::range::MultiSink;

/// The longest line read as one in a multipart body's delimiters and part headers; a longer
/// one is read in pieces of this size (which match no delimiter), so memory stays bounded.
const MAX_LINE: u64 = 8 << 10;

/// The `boundary` parameter of a `multipart/byteranges` content type, if it is one.
pub fn byteranges_boundary(content_type: &str) -> Option<String> {
    if !content_type.to_ascii_lowercase().starts_with("multipart/byteranges") {
        return None;
    }
    content_type.split(';').find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        k.trim().eq_ignore_ascii_case("boundary").then(|| v.trim().trim_matches('"').to_string())
    })
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
    let boundary = byteranges_boundary(&header(&resp, "content-type").unwrap_or_default());
    let single = if status == StatusCode::PARTIAL_CONTENT {
        header(&resp, "content-range").map(|cr| parse_content_range(method, url, &cr)).transpose()?
    } else {
        None
    };
    let whole = content_length(&resp);
    let mut reader = std::io::BufReader::with_capacity(STREAM_CHUNK, client.body(&mut resp));
    match (status, boundary, single) {
        (StatusCode::OK, _, _) => {
            feed_part(method, url, &mut reader, 0, whole.unwrap_or(u64::MAX), ranges, done, sink)?;
        }
        (StatusCode::PARTIAL_CONTENT, Some(b), _) => {
            read_byteranges(method, url, &mut reader, &b, ranges, done, sink)?;
        }
        (StatusCode::PARTIAL_CONTENT, None, Some((start, end))) => {
            let len = part_len(method, url, start, end)?;
            feed_part(method, url, &mut reader, start, len, ranges, done, sink)?;
        }
        _ => {
            return Err(RemoteError::Invalid(format!(
                "{method} {url}: a {status} answer to a multi-range request without Content-Range"
            )));
        }
    }
    Ok(())
}

/// Reads a `multipart/byteranges` body delimited by `boundary` from `reader`, handing the bytes
/// of each part to the `ranges` (offset, length) they continue (counted in `done`, see
/// [`stream_multi_range_body`]). A part's length is its `Content-Range`; its bytes are taken as
/// they are, delimiters in them included. Lines between parts that are no delimiter are
/// skipped; a body that ends early (without the closing delimiter, or within a part's headers)
/// leaves what it did not deliver short, for the caller to ask again; one that ends within a
/// part's bytes is a transient error. A part without (or with a bad) `Content-Range` is an
/// error. Returns early, without error, when `sink` returns false.
pub fn read_byteranges(
    method: &'static str,
    url: &str,
    reader: &mut dyn BufRead,
    boundary: &str,
    ranges: &[(u64, u64)],
    done: &mut [u64],
    sink: &mut MultiSink<'_>,
) -> Result<()> {
    let delimiter = format!("--{boundary}");
    let close = format!("{delimiter}--");
    let mut line = Vec::new();
    let read_line = |reader: &mut dyn BufRead, line: &mut Vec<u8>| -> Result<bool> {
        line.clear();
        let n = reader.take(MAX_LINE).read_until(b'\n', line).map_err(|e| body_error(method, url, e))?;
        Ok(n > 0)
    };
    loop {
        if !read_line(reader, &mut line)? {
            return Ok(()); // ended without the closing delimiter: what is short is asked again
        }
        let l = line.trim_ascii_end();
        if l == close.as_bytes() {
            return Ok(());
        }
        if l != delimiter.as_bytes() {
            continue; // the preamble or the blank line before a delimiter
        }
        let mut part_range = None;
        loop {
            if !read_line(reader, &mut line)? {
                return Ok(());
            }
            let l = line.trim_ascii_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = std::str::from_utf8(l).ok().and_then(|l| l.split_once(':'))
                && k.trim().eq_ignore_ascii_case("content-range")
            {
                part_range = Some(parse_content_range(method, url, v.trim())?);
            }
        }
        let Some((start, end)) = part_range else {
            return Err(RemoteError::Invalid(format!("{method} {url}: a part without Content-Range")));
        };
        let len = part_len(method, url, start, end)?;
        if !feed_part(method, url, reader, start, len, ranges, done, sink)? {
            return Ok(());
        }
    }
}

/// The length of bytes `start..=end`; a range that ends at the last possible offset has no
/// length we can count (and no object is that large).
fn part_len(method: &'static str, url: &str, start: u64, end: u64) -> Result<u64> {
    end.checked_add(1)
        .map(|e| e - start)
        .ok_or_else(|| RemoteError::Invalid(format!("{method} {url}: bad Content-Range bytes {start}-{end}")))
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
        let (lo, hi) = (at, at.saturating_add(chunk.len() as u64));
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
            reason: format!(
                "short body: a part ended at {}, before {}",
                start.saturating_add(got),
                start.saturating_add(len)
            ),
        });
    }
    Ok(!stopped)
}
