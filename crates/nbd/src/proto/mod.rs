//! The NBD wire codec: every constant of the protocol, decoding of what a client sends
//! and encoding of what a server sends, over plain byte slices.
//!
//! This module owns byte layouts and the pure rules that can be decided from a message
//! alone (is this request valid for an export of this size? how are extents clipped?).
//! It does not own sockets, threads, timeouts, the choice of export, or any policy about
//! which features to offer: that is [`crate::server`]. Nothing here performs I/O or
//! panics on any input; all arithmetic on wire values is checked.
//!
//! All integers on the wire are big-endian ("network byte order").
//! Client-side encoders (requests, options) and client-side decoders (replies) are also
//! provided so tests and fuzzers can speak both directions with the same code.

use std::fmt;

// ---------------------------------------------------------------------------------------
// Magic numbers
// ---------------------------------------------------------------------------------------

/// `NBDMAGIC`, first eight bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, sent by the server after [`NBD_MAGIC`] and by the client before each option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic opening every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic opening every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic opening a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic opening a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---------------------------------------------------------------------------------------
// Handshake flags (16 bits from the server) and client flags (32 bits from the client)
// ---------------------------------------------------------------------------------------

/// Server handshake flag: fixed newstyle negotiation is supported.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: the 124 bytes of padding after `NBD_OPT_EXPORT_NAME` may be omitted.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client wants no padding after `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---------------------------------------------------------------------------------------
// Transmission flags (16 bits, per export)
// ---------------------------------------------------------------------------------------

/// Always set.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export refuses writes.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_CMD_FLUSH` is accepted.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_CMD_FLAG_FUA` is accepted.
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// Hint: the medium is rotational.
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
/// `NBD_CMD_TRIM` is accepted.
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_CMD_WRITE_ZEROES` is accepted.
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_CMD_FLAG_DF` is accepted on reads (only with structured replies).
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
/// Several connections to the export see one consistent cache.
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_CMD_RESIZE` is accepted (not offered by this crate).
pub const NBD_FLAG_SEND_RESIZE: u16 = 1 << 9;
/// `NBD_CMD_CACHE` is accepted.
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
/// `NBD_CMD_FLAG_FAST_ZERO` is accepted on `NBD_CMD_WRITE_ZEROES`.
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------

/// Select an export and enter transmission; cannot report errors.
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
/// End negotiation.
pub const NBD_OPT_ABORT: u32 = 2;
/// List exports.
pub const NBD_OPT_LIST: u32 = 3;
/// Withdrawn extension, never supported.
pub const NBD_OPT_PEEK_EXPORT: u32 = 4;
/// Upgrade to TLS.
pub const NBD_OPT_STARTTLS: u32 = 5;
/// Describe an export without selecting it.
pub const NBD_OPT_INFO: u32 = 6;
/// Describe an export and enter transmission.
pub const NBD_OPT_GO: u32 = 7;
/// Enable structured replies.
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts.
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
/// 64-bit headers (not offered by this crate).
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;

// ---------------------------------------------------------------------------------------
// Option reply types
// ---------------------------------------------------------------------------------------

/// Option accepted / end of a list.
pub const NBD_REP_ACK: u32 = 1;
/// One export in an `NBD_OPT_LIST` answer.
pub const NBD_REP_SERVER: u32 = 2;
/// One information item in an `NBD_OPT_INFO`/`NBD_OPT_GO` answer.
pub const NBD_REP_INFO: u32 = 3;
/// One metadata context.
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Bit set in every error reply type.
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
/// Unknown option.
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
/// Known option, refused by policy.
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
/// Known option, malformed.
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
/// Not supported on this platform.
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR | 4;
/// TLS required first.
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR | 5;
/// No such export.
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
/// Server shutting down.
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
/// Client must request block sizes.
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR | 8;
/// Option payload too large.
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;

// ---------------------------------------------------------------------------------------
// Information items (NBD_REP_INFO payloads)
// ---------------------------------------------------------------------------------------

/// Size and transmission flags.
pub const NBD_INFO_EXPORT: u16 = 0;
/// Canonical export name.
pub const NBD_INFO_NAME: u16 = 1;
/// Human-readable description.
pub const NBD_INFO_DESCRIPTION: u16 = 2;
/// Minimum, preferred and maximum block sizes.
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------------------
// Commands and command flags
// ---------------------------------------------------------------------------------------

/// Read.
pub const NBD_CMD_READ: u16 = 0;
/// Write (payload follows the header).
pub const NBD_CMD_WRITE: u16 = 1;
/// Disconnect; no reply.
pub const NBD_CMD_DISC: u16 = 2;
/// Flush.
pub const NBD_CMD_FLUSH: u16 = 3;
/// Discard hint.
pub const NBD_CMD_TRIM: u16 = 4;
/// Prefetch hint.
pub const NBD_CMD_CACHE: u16 = 5;
/// Write zeroes.
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
/// Query metadata.
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;

/// Force unit access.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
/// Write zeroes must not punch a hole.
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Read reply must be a single content chunk.
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
/// Block status: one extent per context is enough.
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Write zeroes: fail with `NBD_ENOTSUP` rather than be slow.
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// ---------------------------------------------------------------------------------------
// Structured replies
// ---------------------------------------------------------------------------------------

/// Last chunk of a structured reply.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
/// Empty final chunk.
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
/// Offset + data.
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Offset + length of a run of zeroes.
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Context id + extent descriptors.
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Bit set in every error chunk type.
pub const NBD_REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
/// Error without an offset.
pub const NBD_REPLY_TYPE_ERROR: u16 = NBD_REPLY_TYPE_FLAG_ERROR | 1;
/// Error at an offset.
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = NBD_REPLY_TYPE_FLAG_ERROR | 2;

// ---------------------------------------------------------------------------------------
// Error values carried in replies (fixed by the protocol, not the host's errno)
// ---------------------------------------------------------------------------------------

/// Operation not permitted (writes to a read-only export).
pub const NBD_EPERM: u32 = 1;
/// Input/output error.
pub const NBD_EIO: u32 = 5;
/// Out of memory (servers should avoid it).
pub const NBD_ENOMEM: u32 = 12;
/// Invalid argument.
pub const NBD_EINVAL: u32 = 22;
/// No space (writes past the end).
pub const NBD_ENOSPC: u32 = 28;
/// Value too large.
pub const NBD_EOVERFLOW: u32 = 75;
/// Not supported (fast zero impossible).
pub const NBD_ENOTSUP: u32 = 95;
/// Server shutting down.
pub const NBD_ESHUTDOWN: u32 = 108;

// ---------------------------------------------------------------------------------------
// Metadata contexts
// ---------------------------------------------------------------------------------------

/// The one context the protocol defines.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation`: the extent is not allocated.
pub const NBD_STATE_HOLE: u32 = 1 << 0;
/// `base:allocation`: the extent reads as zeroes.
pub const NBD_STATE_ZERO: u32 = 1 << 1;

// ---------------------------------------------------------------------------------------
// Sizes
// ---------------------------------------------------------------------------------------

/// Longest string (export name, description, query, message) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;
/// Bytes of the server greeting (`NBDMAGIC`, `IHAVEOPT`, handshake flags).
pub const GREETING_LEN: usize = 18;
/// Bytes of an option header (`IHAVEOPT`, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Bytes of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Bytes of a transmission request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Bytes of the `NBD_OPT_EXPORT_NAME` answer padding.
pub const EXPORT_NAME_PADDING: usize = 124;

// ---------------------------------------------------------------------------------------
// Shared value types
// ---------------------------------------------------------------------------------------

/// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Smallest addressable unit (a power of two, 1 to 64 KiB).
    pub minimum: u32,
    /// Size the client should prefer for efficiency.
    pub preferred: u32,
    /// Largest payload of a read or write request.
    pub maximum: u32,
}

impl Default for BlockSizes {
    fn default() -> Self {
        Self { minimum: 1, preferred: 4096, maximum: 32 << 20 }
    }
}

/// One extent of a block status answer, as produced by an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    /// Bytes covered (zero-length extents are ignored).
    pub length: u64,
    /// Context-defined flags (`NBD_STATE_*` for `base:allocation`).
    pub flags: u32,
}

/// Errors decoding a fixed-layout message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The magic number did not match: the peer does not speak NBD or the stream is out of step.
    #[error("bad magic: expected {expected:#x}, found {found:#x}")]
    BadMagic {
        /// What the protocol requires.
        expected: u64,
        /// What arrived.
        found: u64,
    },
    /// Fewer bytes than the fixed layout needs.
    #[error("message truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes given.
        have: usize,
    },
    /// The client set flags the server did not offer.
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
}

/// A malformed option payload; the server answers it with `NBD_REP_ERR_INVALID`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {option_name} option: {reason}")]
pub struct OptionError {
    /// The option code.
    pub option: u32,
    /// Its name, for messages.
    pub option_name: &'static str,
    /// What was wrong.
    pub reason: &'static str,
}

/// A request the server must refuse; carries the error value for the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{reason} (error {errno})")]
pub struct RequestError {
    /// `NBD_E*` value to send.
    pub errno: u32,
    /// Human-readable cause, sent in structured error chunks.
    pub reason: &'static str,
}

/// The name of an NBD error value, for logs.
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        0 => "OK",
        NBD_EPERM => "EPERM",
        NBD_EIO => "EIO",
        NBD_ENOMEM => "ENOMEM",
        NBD_EINVAL => "EINVAL",
        NBD_ENOSPC => "ENOSPC",
        NBD_EOVERFLOW => "EOVERFLOW",
        NBD_ENOTSUP => "ENOTSUP",
        NBD_ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown error",
    }
}

/// The name of an option code, for logs and messages.
pub fn option_name(option: u32) -> &'static str {
    match option {
        NBD_OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        NBD_OPT_ABORT => "NBD_OPT_ABORT",
        NBD_OPT_LIST => "NBD_OPT_LIST",
        NBD_OPT_PEEK_EXPORT => "NBD_OPT_PEEK_EXPORT",
        NBD_OPT_STARTTLS => "NBD_OPT_STARTTLS",
        NBD_OPT_INFO => "NBD_OPT_INFO",
        NBD_OPT_GO => "NBD_OPT_GO",
        NBD_OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        NBD_OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        NBD_OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        NBD_OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => "unknown option",
    }
}

// ---------------------------------------------------------------------------------------
// Byte helpers
// ---------------------------------------------------------------------------------------

/// A bounds-checked cursor over a byte slice; every getter returns `None` past the end.
struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N).and_then(|s| s.try_into().ok())
    }
    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }
    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    fn rest(&self) -> &'a [u8] {
        self.buf
    }
}

fn fixed<const N: usize>(buf: &[u8]) -> Result<[u8; N], DecodeError> {
    buf.get(..N)
        .and_then(|s| <[u8; N]>::try_from(s).ok())
        .ok_or(DecodeError::Truncated { need: N, have: buf.len() })
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        a.copy_from_slice(s);
    }
    u16::from_be_bytes(a)
}
fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}
fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

/// Length of `s` as a `u32`, saturating (callers keep strings far below 4 GiB).
fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Validates a protocol string: UTF-8, no NUL, at most [`MAX_STRING_LEN`] bytes.
fn proto_string(bytes: &[u8]) -> Result<String, &'static str> {
    if bytes.len() > MAX_STRING_LEN {
        return Err("string longer than 4096 bytes");
    }
    if bytes.contains(&0) {
        return Err("string contains NUL");
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| "string is not UTF-8")
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------

/// The greeting a newstyle server sends on accept.
pub fn encode_greeting(handshake_flags: u16) -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&handshake_flags.to_be_bytes());
    out
}

/// Decodes a server greeting (client side); returns the handshake flags.
pub fn decode_greeting(buf: &[u8]) -> Result<u16, DecodeError> {
    let b: [u8; GREETING_LEN] = fixed(buf)?;
    let magic = be_u64(&b, 0);
    if magic != NBD_MAGIC {
        return Err(DecodeError::BadMagic { expected: NBD_MAGIC, found: magic });
    }
    let opt = be_u64(&b, 8);
    if opt != IHAVEOPT {
        return Err(DecodeError::BadMagic { expected: IHAVEOPT, found: opt });
    }
    Ok(be_u16(&b, 16))
}

/// What the client answered to the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientFlags {
    /// `NBD_FLAG_C_FIXED_NEWSTYLE`.
    pub fixed_newstyle: bool,
    /// `NBD_FLAG_C_NO_ZEROES`.
    pub no_zeroes: bool,
}

impl ClientFlags {
    /// Encodes the 32-bit client flags (client side).
    pub fn encode(self) -> [u8; 4] {
        let mut v = 0;
        if self.fixed_newstyle {
            v |= NBD_FLAG_C_FIXED_NEWSTYLE;
        }
        if self.no_zeroes {
            v |= NBD_FLAG_C_NO_ZEROES;
        }
        u32::to_be_bytes(v)
    }
}

/// Decodes the client flags, refusing any flag not offered in `offered` (the server's
/// handshake flags); the protocol requires the server to drop such a client.
pub fn decode_client_flags(buf: &[u8], offered: u16) -> Result<ClientFlags, DecodeError> {
    let v = u32::from_be_bytes(fixed(buf)?);
    let mut allowed = 0u32;
    if offered & NBD_FLAG_FIXED_NEWSTYLE != 0 {
        allowed |= NBD_FLAG_C_FIXED_NEWSTYLE;
    }
    if offered & NBD_FLAG_NO_ZEROES != 0 {
        allowed |= NBD_FLAG_C_NO_ZEROES;
    }
    if v & !allowed != 0 {
        return Err(DecodeError::UnknownClientFlags(v));
    }
    Ok(ClientFlags {
        fixed_newstyle: v & NBD_FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: v & NBD_FLAG_C_NO_ZEROES != 0,
    })
}

/// The header of one client option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option code (`NBD_OPT_*`).
    pub option: u32,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Decodes the 16-byte option header.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let b: [u8; OPTION_HEADER_LEN] = fixed(buf)?;
        let magic = be_u64(&b, 0);
        if magic != IHAVEOPT {
            return Err(DecodeError::BadMagic { expected: IHAVEOPT, found: magic });
        }
        Ok(Self { option: be_u32(&b, 8), length: be_u32(&b, 12) })
    }

    /// Encodes the header (client side).
    pub fn encode(self) -> [u8; OPTION_HEADER_LEN] {
        let mut out = [0u8; OPTION_HEADER_LEN];
        out[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..16].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// Payload of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InfoRequest {
    /// Export name ("" is the default export).
    pub name: String,
    /// `NBD_INFO_*` items the client asks for.
    pub requests: Vec<u16>,
}

/// Payload of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MetaContextQuery {
    /// Export the contexts apply to.
    pub export: String,
    /// Queries; empty means "all" for LIST and "none" for SET.
    pub queries: Vec<String>,
}

/// A decoded client option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME`.
    ExportName(String),
    /// `NBD_OPT_ABORT`.
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_STARTTLS`.
    StartTls,
    /// `NBD_OPT_INFO`.
    Info(InfoRequest),
    /// `NBD_OPT_GO`.
    Go(InfoRequest),
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext(MetaContextQuery),
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext(MetaContextQuery),
    /// Anything else; answered with `NBD_REP_ERR_UNSUP`.
    Unknown(u32),
}

impl ClientOption {
    /// The option code.
    pub fn code(&self) -> u32 {
        match self {
            Self::ExportName(_) => NBD_OPT_EXPORT_NAME,
            Self::Abort => NBD_OPT_ABORT,
            Self::List => NBD_OPT_LIST,
            Self::StartTls => NBD_OPT_STARTTLS,
            Self::Info(_) => NBD_OPT_INFO,
            Self::Go(_) => NBD_OPT_GO,
            Self::StructuredReply => NBD_OPT_STRUCTURED_REPLY,
            Self::ListMetaContext(_) => NBD_OPT_LIST_META_CONTEXT,
            Self::SetMetaContext(_) => NBD_OPT_SET_META_CONTEXT,
            Self::Unknown(c) => *c,
        }
    }

    /// Decodes the data of option `option` (the bytes after the option header).
    pub fn decode(option: u32, data: &[u8]) -> Result<Self, OptionError> {
        let err = |reason| OptionError { option, option_name: option_name(option), reason };
        let no_data = |v: Self| if data.is_empty() { Ok(v) } else { Err(err("unexpected data")) };
        match option {
            NBD_OPT_EXPORT_NAME => proto_string(data).map(Self::ExportName).map_err(err),
            // The client is leaving either way; data is ignored.
            NBD_OPT_ABORT => Ok(Self::Abort),
            NBD_OPT_LIST => no_data(Self::List),
            NBD_OPT_STARTTLS => no_data(Self::StartTls),
            NBD_OPT_STRUCTURED_REPLY => no_data(Self::StructuredReply),
            NBD_OPT_INFO | NBD_OPT_GO => {
                let req = decode_info_request(data).map_err(err)?;
                Ok(if option == NBD_OPT_GO { Self::Go(req) } else { Self::Info(req) })
            }
            NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => {
                let q = decode_meta_query(data).map_err(err)?;
                Ok(if option == NBD_OPT_SET_META_CONTEXT {
                    Self::SetMetaContext(q)
                } else {
                    Self::ListMetaContext(q)
                })
            }
            other => Ok(Self::Unknown(other)),
        }
    }

    /// Encodes the whole option, header included (client side).
    pub fn encode(&self) -> Vec<u8> {
        let mut data = Vec::new();
        match self {
            Self::ExportName(name) => data.extend_from_slice(name.as_bytes()),
            Self::Info(r) | Self::Go(r) => {
                put_u32(&mut data, len32(r.name.len()));
                data.extend_from_slice(r.name.as_bytes());
                put_u16(&mut data, u16::try_from(r.requests.len()).unwrap_or(u16::MAX));
                for &i in r.requests.iter().take(usize::from(u16::MAX)) {
                    put_u16(&mut data, i);
                }
            }
            Self::ListMetaContext(q) | Self::SetMetaContext(q) => {
                put_u32(&mut data, len32(q.export.len()));
                data.extend_from_slice(q.export.as_bytes());
                put_u32(&mut data, len32(q.queries.len()));
                for s in &q.queries {
                    put_u32(&mut data, len32(s.len()));
                    data.extend_from_slice(s.as_bytes());
                }
            }
            Self::Abort | Self::List | Self::StartTls | Self::StructuredReply | Self::Unknown(_) => {}
        }
        let mut out = OptionHeader { option: self.code(), length: len32(data.len()) }.encode().to_vec();
        out.extend_from_slice(&data);
        out
    }
}

fn decode_info_request(data: &[u8]) -> Result<InfoRequest, &'static str> {
    let mut c = Cursor::new(data);
    let name_len = c.u32().ok_or("truncated name length")?;
    let name_len = usize::try_from(name_len).map_err(|_| "name length overflows")?;
    let name = proto_string(c.take(name_len).ok_or("name runs past the option data")?)?;
    let count = c.u16().ok_or("truncated information request count")?;
    let mut requests = Vec::with_capacity(usize::from(count).min(c.rest().len() / 2));
    for _ in 0..count {
        requests.push(c.u16().ok_or("information requests run past the option data")?);
    }
    if !c.is_empty() {
        return Err("trailing bytes after information requests");
    }
    Ok(InfoRequest { name, requests })
}

fn decode_meta_query(data: &[u8]) -> Result<MetaContextQuery, &'static str> {
    let mut c = Cursor::new(data);
    let name_len = c.u32().ok_or("truncated export name length")?;
    let name_len = usize::try_from(name_len).map_err(|_| "name length overflows")?;
    let export = proto_string(c.take(name_len).ok_or("export name runs past the option data")?)?;
    let count = c.u32().ok_or("truncated query count")?;
    // Each query needs at least four bytes, so a count larger than that is a lie.
    let max_possible = c.rest().len() / 4;
    if usize::try_from(count).map_or(true, |n| n > max_possible) {
        return Err("query count exceeds the option data");
    }
    let mut queries = Vec::with_capacity(max_possible.min(count as usize));
    for _ in 0..count {
        let len = c.u32().ok_or("truncated query length")?;
        let len = usize::try_from(len).map_err(|_| "query length overflows")?;
        queries.push(proto_string(c.take(len).ok_or("query runs past the option data")?)?);
    }
    if !c.is_empty() {
        return Err("trailing bytes after queries");
    }
    Ok(MetaContextQuery { export, queries })
}

/// One reply to an option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionReply<'a> {
    /// `NBD_REP_ACK`.
    Ack,
    /// `NBD_REP_SERVER`: name and description of one export.
    Server {
        /// Export name.
        name: &'a str,
        /// Free text shown to humans.
        description: &'a str,
    },
    /// `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
    InfoExport {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// `NBD_REP_INFO` / `NBD_INFO_NAME`.
    InfoName(&'a str),
    /// `NBD_REP_INFO` / `NBD_INFO_DESCRIPTION`.
    InfoDescription(&'a str),
    /// `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
    InfoBlockSize(BlockSizes),
    /// `NBD_REP_META_CONTEXT`.
    MetaContext {
        /// Context id (0 for LIST answers).
        id: u32,
        /// Context name.
        name: &'a str,
    },
    /// An error reply type with an optional message.
    Error {
        /// `NBD_REP_ERR_*`.
        code: u32,
        /// Message for humans (cut to [`MAX_STRING_LEN`]).
        message: &'a str,
    },
}

impl OptionReply<'_> {
    /// The reply type.
    pub fn reply_type(&self) -> u32 {
        match self {
            Self::Ack => NBD_REP_ACK,
            Self::Server { .. } => NBD_REP_SERVER,
            Self::InfoExport { .. }
            | Self::InfoName(_)
            | Self::InfoDescription(_)
            | Self::InfoBlockSize(_) => NBD_REP_INFO,
            Self::MetaContext { .. } => NBD_REP_META_CONTEXT,
            Self::Error { code, .. } => *code,
        }
    }

    /// Appends the encoded reply to `option` onto `out`.
    pub fn encode(&self, option: u32, out: &mut Vec<u8>) {
        let mut data = Vec::new();
        match self {
            Self::Ack => {}
            Self::Server { name, description } => {
                let name = truncate_str(name, MAX_STRING_LEN);
                put_u32(&mut data, len32(name.len()));
                data.extend_from_slice(name.as_bytes());
                data.extend_from_slice(truncate_str(description, MAX_STRING_LEN).as_bytes());
            }
            Self::InfoExport { size, flags } => {
                put_u16(&mut data, NBD_INFO_EXPORT);
                put_u64(&mut data, *size);
                put_u16(&mut data, *flags);
            }
            Self::InfoName(name) => {
                put_u16(&mut data, NBD_INFO_NAME);
                data.extend_from_slice(truncate_str(name, MAX_STRING_LEN).as_bytes());
            }
            Self::InfoDescription(d) => {
                put_u16(&mut data, NBD_INFO_DESCRIPTION);
                data.extend_from_slice(truncate_str(d, MAX_STRING_LEN).as_bytes());
            }
            Self::InfoBlockSize(b) => {
                put_u16(&mut data, NBD_INFO_BLOCK_SIZE);
                put_u32(&mut data, b.minimum);
                put_u32(&mut data, b.preferred);
                put_u32(&mut data, b.maximum);
            }
            Self::MetaContext { id, name } => {
                put_u32(&mut data, *id);
                data.extend_from_slice(truncate_str(name, MAX_STRING_LEN).as_bytes());
            }
            Self::Error { message, .. } => {
                data.extend_from_slice(truncate_str(message, MAX_STRING_LEN).as_bytes());
            }
        }
        put_u64(out, OPTION_REPLY_MAGIC);
        put_u32(out, option);
        put_u32(out, self.reply_type());
        put_u32(out, len32(data.len()));
        out.extend_from_slice(&data);
    }
}

/// A decoded option reply header (client side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// Option this answers.
    pub option: u32,
    /// `NBD_REP_*`.
    pub reply_type: u32,
    /// Bytes of data that follow.
    pub length: u32,
}

impl OptionReplyHeader {
    /// Decodes the 20-byte option reply header.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let b: [u8; OPTION_REPLY_HEADER_LEN] = fixed(buf)?;
        let magic = be_u64(&b, 0);
        if magic != OPTION_REPLY_MAGIC {
            return Err(DecodeError::BadMagic { expected: OPTION_REPLY_MAGIC, found: magic });
        }
        Ok(Self { option: be_u32(&b, 8), reply_type: be_u32(&b, 12), length: be_u32(&b, 16) })
    }
}

/// The answer to `NBD_OPT_EXPORT_NAME`: size, flags and (unless `no_zeroes`) padding.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + EXPORT_NAME_PADDING);
    put_u64(&mut out, size);
    put_u16(&mut out, flags);
    if !no_zeroes {
        out.resize(10 + EXPORT_NAME_PADDING, 0);
    }
    out
}

// ---------------------------------------------------------------------------------------
// Transmission: requests
// ---------------------------------------------------------------------------------------

/// A transmission command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`.
    Write,
    /// `NBD_CMD_DISC`.
    Disc,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_CACHE`.
    Cache,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus,
    /// Anything else.
    Unknown(u16),
}

impl Command {
    /// Maps a wire command type.
    pub fn from_wire(v: u16) -> Self {
        match v {
            NBD_CMD_READ => Self::Read,
            NBD_CMD_WRITE => Self::Write,
            NBD_CMD_DISC => Self::Disc,
            NBD_CMD_FLUSH => Self::Flush,
            NBD_CMD_TRIM => Self::Trim,
            NBD_CMD_CACHE => Self::Cache,
            NBD_CMD_WRITE_ZEROES => Self::WriteZeroes,
            NBD_CMD_BLOCK_STATUS => Self::BlockStatus,
            other => Self::Unknown(other),
        }
    }

    /// The wire command type.
    pub fn to_wire(self) -> u16 {
        match self {
            Self::Read => NBD_CMD_READ,
            Self::Write => NBD_CMD_WRITE,
            Self::Disc => NBD_CMD_DISC,
            Self::Flush => NBD_CMD_FLUSH,
            Self::Trim => NBD_CMD_TRIM,
            Self::Cache => NBD_CMD_CACHE,
            Self::WriteZeroes => NBD_CMD_WRITE_ZEROES,
            Self::BlockStatus => NBD_CMD_BLOCK_STATUS,
            Self::Unknown(v) => v,
        }
    }

    /// Command flags that are meaningful for this command (FUA is accepted on every
    /// command, because existing clients send it everywhere).
    fn allowed_flags(self, structured: bool) -> u16 {
        NBD_CMD_FLAG_FUA
            | match self {
                Self::Read if structured => NBD_CMD_FLAG_DF,
                Self::WriteZeroes => NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
                Self::BlockStatus => NBD_CMD_FLAG_REQ_ONE,
                _ => 0,
            }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown(v) => write!(f, "NBD_CMD_{v}"),
            other => write!(f, "{other:?}"),
        }
    }
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `NBD_CMD_FLAG_*`.
    pub flags: u16,
    /// Command.
    pub command: Command,
    /// Opaque cookie echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

impl Request {
    /// Decodes the 28-byte request header.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let b: [u8; REQUEST_HEADER_LEN] = fixed(buf)?;
        let magic = be_u32(&b, 0);
        if magic != REQUEST_MAGIC {
            return Err(DecodeError::BadMagic { expected: REQUEST_MAGIC.into(), found: magic.into() });
        }
        Ok(Self {
            flags: be_u16(&b, 4),
            command: Command::from_wire(be_u16(&b, 6)),
            handle: be_u64(&b, 8),
            offset: be_u64(&b, 16),
            length: be_u32(&b, 24),
        })
    }

    /// Encodes the header (client side).
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut out = [0u8; REQUEST_HEADER_LEN];
        out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_wire().to_be_bytes());
        out[8..16].copy_from_slice(&self.handle.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    /// Bytes of payload that follow this header on the wire, whether or not the request
    /// turns out to be valid: a write always carries its data.
    pub fn payload_len(&self) -> u32 {
        if self.command == Command::Write { self.length } else { 0 }
    }

    /// Whether a flag is set.
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// Checks this request against what was negotiated; `Ok` means the server may run it.
    pub fn check(&self, t: &TransmissionParams) -> Result<(), RequestError> {
        let e = |errno, reason| Err(RequestError { errno, reason });
        let cmd = self.command;
        if let Command::Unknown(_) = cmd {
            return e(NBD_EINVAL, "unknown command");
        }
        if self.flags & !cmd.allowed_flags(t.structured) != 0 {
            return e(NBD_EINVAL, "command flag not valid for this command");
        }
        let writes = matches!(cmd, Command::Write | Command::Trim | Command::WriteZeroes);
        if writes && t.read_only {
            return e(NBD_EPERM, "export is read-only");
        }
        match cmd {
            Command::Disc | Command::Flush => return Ok(()),
            Command::Read | Command::Write if self.length > t.max_payload => {
                return e(NBD_EINVAL, "length exceeds the maximum block size");
            }
            Command::BlockStatus => {
                if !t.structured || t.meta_contexts == 0 {
                    return e(NBD_EINVAL, "no metadata context was negotiated");
                }
                if self.length == 0 {
                    return e(NBD_EINVAL, "block status of zero bytes");
                }
            }
            _ => {}
        }
        let end = self.offset.checked_add(u64::from(self.length));
        if end.is_none_or(|end| end > t.size) {
            return if writes {
                e(NBD_ENOSPC, "request extends past the end of the export")
            } else {
                e(NBD_EINVAL, "request extends past the end of the export")
            };
        }
        Ok(())
    }
}

/// What a request is checked against: the export and the negotiated features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransmissionParams {
    /// Export size in bytes.
    pub size: u64,
    /// Writes are refused.
    pub read_only: bool,
    /// Largest read or write payload accepted.
    pub max_payload: u32,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// Number of metadata contexts selected.
    pub meta_contexts: usize,
}

// ---------------------------------------------------------------------------------------
// Transmission: replies
// ---------------------------------------------------------------------------------------

/// A simple reply header; a successful simple read reply is followed by the data.
pub fn encode_simple_reply(error: u32, handle: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out
}

/// A structured chunk header with a payload of `length` bytes.
pub fn encode_chunk_header(flags: u16, kind: u16, handle: u64, length: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut out = [0u8; CHUNK_HEADER_LEN];
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out[16..20].copy_from_slice(&length.to_be_bytes());
    out
}

fn done_flag(done: bool) -> u16 {
    if done { NBD_REPLY_FLAG_DONE } else { 0 }
}

/// The part of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk that precedes `data_len` bytes of data.
/// Returns `None` if the data does not fit one chunk (more than 2^32 - 9 bytes).
pub fn encode_offset_data_prefix(handle: u64, offset: u64, data_len: usize, done: bool) -> Option<[u8; 28]> {
    let len = u32::try_from(data_len).ok()?.checked_add(8)?;
    let mut out = [0u8; 28];
    out[..CHUNK_HEADER_LEN].copy_from_slice(&encode_chunk_header(
        done_flag(done),
        NBD_REPLY_TYPE_OFFSET_DATA,
        handle,
        len,
    ));
    out[20..28].copy_from_slice(&offset.to_be_bytes());
    Some(out)
}

/// An `NBD_REPLY_TYPE_OFFSET_HOLE` chunk: `length` (non-zero) bytes of zeroes at `offset`.
pub fn encode_offset_hole(handle: u64, offset: u64, length: u32, done: bool) -> [u8; 32] {
    let mut out = [0u8; 32];
    out[..CHUNK_HEADER_LEN].copy_from_slice(&encode_chunk_header(
        done_flag(done),
        NBD_REPLY_TYPE_OFFSET_HOLE,
        handle,
        12,
    ));
    out[20..28].copy_from_slice(&offset.to_be_bytes());
    out[28..32].copy_from_slice(&length.to_be_bytes());
    out
}

/// The final `NBD_REPLY_TYPE_NONE` chunk.
pub fn encode_none_chunk(handle: u64) -> [u8; CHUNK_HEADER_LEN] {
    encode_chunk_header(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, handle, 0)
}

/// Appends an `NBD_REPLY_TYPE_ERROR` chunk (always final) with a message for humans.
pub fn encode_error_chunk(out: &mut Vec<u8>, handle: u64, errno: u32, message: &str) {
    let message = truncate_str(message, MAX_STRING_LEN);
    let mlen = u16::try_from(message.len()).unwrap_or(0);
    let message = if mlen == 0 { "" } else { message };
    out.extend_from_slice(&encode_chunk_header(
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_ERROR,
        handle,
        6 + u32::from(mlen),
    ));
    // The protocol forbids a zero error in an error chunk.
    put_u32(out, if errno == 0 { NBD_EIO } else { errno });
    put_u16(out, mlen);
    out.extend_from_slice(message.as_bytes());
}

/// Appends one `NBD_REPLY_TYPE_BLOCK_STATUS` chunk. `extents` must be non-empty (as
/// produced by [`normalize_extents`]); an empty slice encodes nothing and returns false.
pub fn encode_block_status_chunk(
    out: &mut Vec<u8>,
    handle: u64,
    context_id: u32,
    extents: &[(u32, u32)],
    done: bool,
) -> bool {
    let Some(len) = extents.len().checked_mul(8).and_then(|n| n.checked_add(4)) else {
        return false;
    };
    let Ok(len) = u32::try_from(len) else { return false };
    if extents.is_empty() {
        return false;
    }
    out.extend_from_slice(&encode_chunk_header(done_flag(done), NBD_REPLY_TYPE_BLOCK_STATUS, handle, len));
    put_u32(out, context_id);
    for &(length, flags) in extents {
        put_u32(out, length);
        put_u32(out, flags);
    }
    true
}

/// Turns an export's extents into wire descriptors for a request of `request_len` bytes:
/// zero-length extents are dropped, lengths are clipped so their sum never exceeds the
/// request, neighbours with equal flags are merged, and the list is cut to one descriptor
/// with `req_one` or to `max_descriptors` otherwise. The result is empty only if the
/// export gave no non-empty extent.
pub fn normalize_extents(
    raw: &[StatusExtent],
    request_len: u32,
    req_one: bool,
    max_descriptors: usize,
) -> Vec<(u32, u32)> {
    let limit = if req_one { 1 } else { max_descriptors.max(1) };
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut remaining = request_len;
    for ext in raw {
        if remaining == 0 {
            break;
        }
        if ext.length == 0 {
            continue;
        }
        let take = u32::try_from(ext.length).unwrap_or(u32::MAX).min(remaining);
        remaining -= take;
        match out.last_mut() {
            Some(last) if last.1 == ext.flags => last.0 += take,
            _ => {
                if out.len() == limit {
                    break;
                }
                out.push((take, ext.flags));
            }
        }
    }
    out
}

/// A decoded simple reply header (client side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// Error value (0 for success).
    pub error: u32,
    /// Handle of the request.
    pub handle: u64,
}

/// A decoded structured chunk header (client side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// `NBD_REPLY_FLAG_*`.
    pub flags: u16,
    /// `NBD_REPLY_TYPE_*`.
    pub kind: u16,
    /// Handle of the request.
    pub handle: u64,
    /// Payload bytes that follow.
    pub length: u32,
}

/// The first reply message the server can send in transmission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply (16 bytes).
    Simple(SimpleReply),
    /// A structured chunk (20 bytes).
    Chunk(ChunkHeader),
}

impl ReplyHeader {
    /// Bytes needed to decode a reply header whose first four bytes are `magic`.
    pub fn len_for_magic(magic: u32) -> Option<usize> {
        match magic {
            SIMPLE_REPLY_MAGIC => Some(SIMPLE_REPLY_LEN),
            STRUCTURED_REPLY_MAGIC => Some(CHUNK_HEADER_LEN),
            _ => None,
        }
    }

    /// Decodes a simple or structured reply header (client side).
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let magic = u32::from_be_bytes(fixed(buf)?);
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let b: [u8; SIMPLE_REPLY_LEN] = fixed(buf)?;
                Ok(Self::Simple(SimpleReply { error: be_u32(&b, 4), handle: be_u64(&b, 8) }))
            }
            STRUCTURED_REPLY_MAGIC => {
                let b: [u8; CHUNK_HEADER_LEN] = fixed(buf)?;
                Ok(Self::Chunk(ChunkHeader {
                    flags: be_u16(&b, 4),
                    kind: be_u16(&b, 6),
                    handle: be_u64(&b, 8),
                    length: be_u32(&b, 16),
                }))
            }
            other => Err(DecodeError::BadMagic { expected: SIMPLE_REPLY_MAGIC.into(), found: other.into() }),
        }
    }
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

#[cfg(test)]
mod tests;
