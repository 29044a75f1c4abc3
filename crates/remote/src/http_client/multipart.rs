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
    if status == StatusCode::PARTIAL_CONTENT {
        // What follows the last part (the closing delimiter's line end) and the body's end: the
        // HTTP client keeps the connection for the next request only once it has seen the end.
        // Bounded, so that a body with more than it should have is dropped, not read.
        let mut rest = [0u8; 1024];
        let mut left = rest.len();
        while left > 0 {
            match std::io::Read::read(&mut reader, &mut rest[..left]) {
                Ok(0) | Err(_) => break,
                Ok(n) => left -= n,
            }
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

#[cfg(test)]
mod tests {
    //! The parser on bodies built here: well-formed ones, the same read in small pieces,
    //! truncated ones and hostile ones. What must hold: every range gets exactly its bytes of
    //! the object, in order, or is left short (counted in `done`, for the caller to ask again);
    //! no range ever gets more than it asked for; bad part headers are errors.
    use std::io::{BufReader, Read};

    use super::*;

    /// The object the parts are cut from.
    fn object() -> Vec<u8> {
        (0..4096u32).map(|i| (i % 251) as u8).collect()
    }

    /// One part: delimiter, headers, the object's bytes `start..=end`, and the CRLF before the
    /// next delimiter.
    fn part(obj: &[u8], start: usize, end: usize) -> Vec<u8> {
        let mut p = format!(
            "--B\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {start}-{end}/{}\r\n\r\n",
            obj.len()
        )
        .into_bytes();
        p.extend_from_slice(&obj[start..=end]);
        p.extend_from_slice(b"\r\n");
        p
    }

    fn body(pieces: &[&[u8]]) -> Vec<u8> {
        pieces.concat()
    }

    /// Hands out at most `step` bytes per read.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.step.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    struct Outcome {
        result: Result<()>,
        got: Vec<Vec<u8>>,
        done: Vec<u64>,
    }

    /// Parses `body` read `step` bytes at a time through a buffer of `capacity` bytes.
    fn parse_in_pieces(body: &[u8], ranges: &[(u64, u64)], step: usize, capacity: usize) -> Outcome {
        let mut reader = BufReader::with_capacity(capacity, Trickle { data: body, step });
        let mut got = vec![Vec::new(); ranges.len()];
        let mut done = vec![0u64; ranges.len()];
        let result = read_byteranges("GET", "http://t/", &mut reader, "B", ranges, &mut done, &mut |i, p| {
            got[i].extend_from_slice(p);
            true
        });
        for (i, g) in got.iter().enumerate() {
            assert_eq!(g.len() as u64, done[i], "range {i}: done counts what it was handed");
            assert!(done[i] <= ranges[i].1, "range {i} got more than it asked for");
        }
        Outcome { result, got, done }
    }

    fn parse(body: &[u8], ranges: &[(u64, u64)]) -> Outcome {
        parse_in_pieces(body, ranges, usize::MAX, 64 << 10)
    }

    fn slice(obj: &[u8], (o, l): (u64, u64)) -> &[u8] {
        &obj[o as usize..(o + l) as usize]
    }

    const TWO: [(u64, u64); 2] = [(10, 5), (100, 20)];

    #[test]
    fn well_formed_bodies_fill_every_range() {
        let obj = object();
        // One part per range, with a preamble; then one part merging both ranges.
        for b in [
            body(&[b"preamble\r\n", &part(&obj, 10, 14), &part(&obj, 100, 119), b"--B--\r\n"]),
            body(&[&part(&obj, 10, 119), b"--B--\r\n"]),
        ] {
            let out = parse(&b, &TWO);
            out.result.unwrap();
            assert_eq!(out.got[0], slice(&obj, TWO[0]));
            assert_eq!(out.got[1], slice(&obj, TWO[1]));
        }
    }

    #[test]
    fn a_body_read_in_small_pieces_gives_the_same() {
        let obj = object();
        let b = body(&[b"\r\n", &part(&obj, 10, 14), &part(&obj, 100, 119), b"--B--\r\n"]);
        for step in 1..=7 {
            for capacity in [1, 2, 3, 5, 64] {
                let out = parse_in_pieces(&b, &TWO, step, capacity);
                assert!(out.result.is_ok(), "step {step}, capacity {capacity}: {:?}", out.result.err());
                assert_eq!(out.got[0], slice(&obj, TWO[0]), "step {step}, capacity {capacity}");
                assert_eq!(out.got[1], slice(&obj, TWO[1]), "step {step}, capacity {capacity}");
            }
        }
    }

    #[test]
    fn parts_out_of_order_still_fill_their_ranges() {
        let obj = object();
        let b = body(&[&part(&obj, 100, 119), &part(&obj, 10, 14), b"--B--\r\n"]);
        let out = parse(&b, &TWO);
        out.result.unwrap();
        assert_eq!(out.got[0], slice(&obj, TWO[0]));
        assert_eq!(out.got[1], slice(&obj, TWO[1]));
    }

    #[test]
    fn delimiters_inside_the_data_are_data() {
        // The object's bytes hold what looks like a closing delimiter and a new part.
        let mut obj = object();
        let fake = b"\r\n--B--\r\n--B\r\nContent-Range: bytes 0-3/4096\r\n\r\n";
        obj[10..10 + fake.len()].copy_from_slice(fake);
        let ranges = [(10, fake.len() as u64), (100, 20)];
        let b = body(&[&part(&obj, 10, 9 + fake.len()), &part(&obj, 100, 119), b"--B--\r\n"]);
        let out = parse(&b, &ranges);
        out.result.unwrap();
        assert_eq!(out.got[0], fake);
        assert_eq!(out.got[1], slice(&obj, ranges[1]));
    }

    #[test]
    fn missing_crs_and_crlfs_are_tolerated_or_leave_ranges_short() {
        let obj = object();
        // Bare LF line ends throughout.
        let lf = String::from_utf8_lossy(&part(&obj, 10, 14)).replace("\r\n", "\n");
        let mut b = lf.into_bytes();
        // (The object's bytes 10..15 hold no CR or LF, so they survived the replace.)
        b.extend_from_slice(&part(&obj, 100, 119));
        let out = parse(&b, &TWO);
        out.result.unwrap();
        assert_eq!(out.got[0], slice(&obj, TWO[0]));
        assert_eq!(out.got[1], slice(&obj, TWO[1]));
        // No CRLF between a part's data and the next delimiter.
        let mut first = part(&obj, 10, 14);
        first.truncate(first.len() - 2);
        let out = parse(&body(&[&first, &part(&obj, 100, 119)]), &TWO);
        out.result.unwrap();
        assert_eq!(out.done, [5, 20]);
        // Headers that never end with a blank line: nothing delivered, no error.
        let out = parse(b"--B\r\nContent-Range: bytes 10-14/4096\r\n", &TWO);
        out.result.unwrap();
        assert_eq!(out.done, [0, 0]);
    }

    #[test]
    fn truncated_bodies_deliver_what_arrived() {
        let obj = object();
        let b = body(&[&part(&obj, 10, 14), &part(&obj, 100, 119), b"--B--\r\n"]);
        // Cut within the second part's data: a transient error, the first range whole and the
        // second one's first bytes delivered.
        let cut = b.len() - b"--B--\r\n".len() - 2 - 8;
        let out = parse(&b[..cut], &TWO);
        assert!(out.result.as_ref().is_err_and(|e| e.is_transient()), "{:?}", out.result.err());
        assert_eq!(out.got[0], slice(&obj, TWO[0]));
        assert_eq!(out.got[1], obj[100..112]);
        // Cut before the closing delimiter, or within the second part's headers: no error, the
        // second range left short for the caller to ask again.
        for (cut, second) in [(b.len() - b"--B--\r\n".len(), 20), (part(&obj, 10, 14).len() + 20, 0)] {
            let out = parse(&b[..cut], &TWO);
            out.result.unwrap();
            assert_eq!(out.got[0], slice(&obj, TWO[0]));
            assert_eq!(out.done[1], second, "cut at {cut}");
        }
        // Nothing at all.
        let out = parse(b"", &TWO);
        out.result.unwrap();
        assert_eq!(out.done, [0, 0]);
    }

    #[test]
    fn lengths_that_lie_never_overfill_a_range() {
        let obj = object();
        // A Content-Range shorter than the bytes sent: the range gets the 3 bytes it names (and
        // is left short), the extra bytes are skipped up to the next delimiter.
        let mut liar = b"--B\r\nContent-Range: bytes 10-12/4096\r\n\r\n".to_vec();
        liar.extend_from_slice(&obj[10..15]);
        liar.extend_from_slice(b"\r\n");
        let out = parse(&body(&[&liar, &part(&obj, 100, 119), b"--B--\r\n"]), &TWO);
        out.result.unwrap();
        assert_eq!(out.got[0], obj[10..13]);
        assert_eq!(out.got[1], slice(&obj, TWO[1]));
        // A Content-Range longer than the bytes sent swallows what follows as data: the parser
        // cannot tell (the engine's block hashes do), but the range gets no more than it asked
        // for, and the part it swallowed leaves its range short.
        let mut liar = b"--B\r\nContent-Range: bytes 10-24/4096\r\n\r\n".to_vec();
        liar.extend_from_slice(&obj[10..15]);
        liar.extend_from_slice(b"\r\n");
        let out = parse(&body(&[&liar, &part(&obj, 100, 119), b"--B--\r\n"]), &TWO);
        assert_eq!(out.done[0], 5);
        assert_eq!(out.got[0], obj[10..15]);
        assert_eq!(out.done[1], 0);
        // Ranges that are no ranges are errors, without overflow at the top of u64.
        for bad in ["bytes 20-10/4096", "bytes 0-18446744073709551615/*", "bytes x-1/2", "10-20/4096"] {
            let b = format!("--B\r\nContent-Range: {bad}\r\n\r\n0123456789\r\n--B--\r\n");
            let out = parse(b.as_bytes(), &TWO);
            assert!(
                matches!(out.result, Err(RemoteError::Invalid(_))),
                "{bad}: {:?}",
                out.result.map(|_| out.done)
            );
        }
        // A part without Content-Range.
        let out = parse(b"--B\r\nContent-Type: text/plain\r\n\r\nabc\r\n--B--\r\n", &TWO);
        assert!(matches!(out.result, Err(RemoteError::Invalid(_))));
    }

    #[test]
    fn parts_outside_the_requested_ranges_are_dropped() {
        let obj = object();
        // A part far away, one that starts inside range 0 (so does not continue it), then the
        // real ones.
        let b = body(&[
            &part(&obj, 2000, 2099),
            &part(&obj, 12, 14),
            &part(&obj, 10, 14),
            &part(&obj, 100, 119),
            b"--B--\r\n",
        ]);
        let out = parse(&b, &TWO);
        out.result.unwrap();
        assert_eq!(out.got[0], slice(&obj, TWO[0]));
        assert_eq!(out.got[1], slice(&obj, TWO[1]));
        // Only parts outside: nothing delivered.
        let out = parse(&body(&[&part(&obj, 2000, 2099), &part(&obj, 0, 9), b"--B--\r\n"]), &TWO);
        out.result.unwrap();
        assert_eq!(out.done, [0, 0]);
    }

    #[test]
    fn junk_between_parts_is_skipped_in_bounded_lines() {
        let obj = object();
        // 100 KiB without a line end, and bytes that are not UTF-8, before the first part.
        let junk = vec![b'x'; 100 << 10];
        let b = body(&[&junk, b"\r\n\xff\xfe\x00\r\n", &part(&obj, 10, 14), &part(&obj, 100, 119)]);
        let out = parse(&b, &TWO);
        out.result.unwrap();
        assert_eq!(out.done, [5, 20]);
    }

    #[test]
    fn a_sink_that_stops_ends_the_parse() {
        let obj = object();
        let b = body(&[&part(&obj, 10, 14), &part(&obj, 100, 119), b"--B--\r\n"]);
        let mut reader = BufReader::new(&b[..]);
        let mut done = [0u64; 2];
        let mut calls = 0;
        read_byteranges("GET", "http://t/", &mut reader, "B", &TWO, &mut done, &mut |_, _| {
            calls += 1;
            false
        })
        .unwrap();
        assert_eq!((calls, done), (1, [5, 0]));
    }

    #[test]
    fn boundaries_from_content_types() {
        assert_eq!(byteranges_boundary("multipart/byteranges; boundary=abc").as_deref(), Some("abc"));
        assert_eq!(byteranges_boundary("Multipart/ByteRanges;BOUNDARY=\"a b\"").as_deref(), Some("a b"));
        assert_eq!(byteranges_boundary("multipart/byteranges"), None);
        assert_eq!(byteranges_boundary("text/plain; boundary=abc"), None);
    }
}
