//! Entry points for fuzzers: each takes arbitrary bytes and must never panic.
//!
//! The cargo-fuzz targets under `fuzz/` at the repository root call these functions,
//! and this crate's unit tests run them over many pseudo-random inputs, so they stay
//! compiled and exercised on stable Rust. This module owns no protocol logic; it only
//! drives [`crate::proto`] and the server's connection code with hostile input.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::mem::MemExport;
use crate::proto::{
    self, BASE_ALLOCATION, ClientFlags, ClientOption, InfoRequest, MetaContextQuery, OptionHeader,
    OptionReplyHeader, ReplyHeader, Request, StatusExtent, TransmissionParams,
};
use crate::server::transport::Transport;
use crate::server::{Server, ServerConfig};

/// Decodes `data` as option traffic: the first four bytes pick the option code, the rest
/// is its payload. A decoded option must survive an encode/decode round trip.
pub fn option_decoding(data: &[u8]) {
    let _ = OptionHeader::decode(data);
    let _ = OptionReplyHeader::decode(data);
    let _ = proto::decode_greeting(data);
    let _ = proto::decode_client_flags(data, proto::NBD_FLAG_FIXED_NEWSTYLE | proto::NBD_FLAG_NO_ZEROES);
    let Some((code, payload)) = data.split_first_chunk::<4>() else { return };
    // Fold the code onto the interesting range so most inputs reach a real decoder.
    let code = u32::from_be_bytes(*code) % 16;
    if let Ok(opt) = ClientOption::decode(code, payload) {
        let wire = opt.encode();
        let hdr = OptionHeader::decode(&wire).expect("encoded header decodes");
        let again = ClientOption::decode(hdr.option, &wire[proto::OPTION_HEADER_LEN..]);
        assert_eq!(again.as_ref(), Ok(&opt), "option round trip");
    }
}

/// Decodes `data` as a stream of request headers, checks each against export
/// parameters taken from the input, and exercises the reply encoders on the results.
pub fn request_decoding(data: &[u8]) {
    let _ = ReplyHeader::decode(data);
    let size = data.get(..8).map_or(1 << 20, |b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])));
    let flags = data.first().copied().unwrap_or(0);
    let params = TransmissionParams {
        size,
        read_only: flags & 1 != 0,
        max_payload: 32 << 20,
        structured: flags & 2 != 0,
        meta_contexts: usize::from(flags >> 6),
    };
    for window in data.chunks(proto::REQUEST_HEADER_LEN) {
        let Ok(req) = Request::decode(window) else { continue };
        assert_eq!(Request::decode(&req.encode()), Ok(req), "request round trip");
        if let Err(e) = req.check(&params) {
            assert_ne!(e.errno, 0);
            continue;
        }
        assert!(
            req.offset.checked_add(u64::from(req.length)).is_some_and(|end| end <= size)
                || req.length == 0
                || matches!(req.command, proto::Command::Flush | proto::Command::Disc)
        );
        let raw: Vec<StatusExtent> = window
            .chunks(3)
            .map(|c| StatusExtent {
                length: u64::from(c[0]) << (c.len() * 4),
                flags: u32::from(c[c.len() - 1]),
            })
            .collect();
        let ext = proto::normalize_extents(&raw, req.length, req.has(proto::NBD_CMD_FLAG_REQ_ONE), 8);
        let sum: u64 = ext.iter().map(|e| u64::from(e.0)).sum();
        assert!(sum <= u64::from(req.length), "extents exceed the request");
        assert!(ext.iter().all(|e| e.0 > 0), "zero-length extent");
        let mut out = Vec::new();
        proto::encode_block_status_chunk(&mut out, req.handle, 1, &ext, true);
        proto::encode_error_chunk(&mut out, req.handle, u32::from(req.flags), "x");
        let _ = ReplyHeader::decode(&out);
    }
}

/// An in-memory byte stream: reads come from a fixed input, writes are collected.
#[derive(Clone)]
struct MemStream {
    input: Arc<Mutex<io::Cursor<Vec<u8>>>>,
    output: Arc<Mutex<Vec<u8>>>,
}

impl Read for MemStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.lock().unwrap_or_else(PoisonError::into_inner).read(buf)
    }
}

impl Write for MemStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.lock().unwrap_or_else(PoisonError::into_inner).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Transport for MemStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        Ok(self.clone())
    }
    fn set_read_timeout_opt(&self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
    fn set_write_timeout_opt(&self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
    fn shutdown_how(&self, _: Shutdown) -> io::Result<()> {
        Ok(())
    }
}

/// A prologue that negotiates structured replies, `base:allocation` and the extra
/// context, then enters transmission on the default export.
fn prologue() -> Vec<u8> {
    let mut v = ClientFlags { fixed_newstyle: true, no_zeroes: true }.encode().to_vec();
    v.extend(ClientOption::StructuredReply.encode());
    v.extend(
        ClientOption::SetMetaContext(MetaContextQuery {
            export: String::new(),
            queries: vec![BASE_ALLOCATION.into(), "fuzz:".into()],
        })
        .encode(),
    );
    v.extend(ClientOption::Go(InfoRequest { name: String::new(), requests: vec![1, 2, 3] }).encode());
    v
}

/// Runs one whole server connection over `data` as the client's bytes, against a small
/// [`MemExport`]. With the low bit of the first byte set, a valid negotiation is
/// prepended so the rest of the input lands in the transmission phase. Returns what
/// the server wrote.
pub fn session(data: &[u8]) -> Vec<u8> {
    let mut input = Vec::new();
    let rest = match data.split_first() {
        Some((first, rest)) if first & 1 == 1 => {
            input.extend(prologue());
            rest
        }
        Some((_, rest)) => rest,
        None => data,
    };
    input.extend_from_slice(rest);
    let config = ServerConfig { workers_per_connection: 2, max_payload: 1 << 16, ..ServerConfig::default() };
    let server = Server::with_config(config);
    let export =
        MemExport::new(1 << 20).with_extra_context("fuzz:alloc").with_failing_range(900_000..901_000);
    if server.add_export("fuzz", "fuzzing export", Arc::new(export)).is_err() {
        return Vec::new();
    }
    let stream = MemStream { input: Arc::new(Mutex::new(io::Cursor::new(input))), output: Arc::default() };
    let output = Arc::clone(&stream.output);
    server.run_session(stream);
    output.lock().unwrap_or_else(PoisonError::into_inner).clone()
}
