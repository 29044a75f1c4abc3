//! One connection's life: fixed newstyle negotiation, then hand-over to transmission,
//! then the closing log line.
//!
//! Owns the option state machine (which export, structured replies, selected metadata
//! contexts) and the answer to every option. Does not own request processing
//! ([`super::transmission`]) nor byte layouts ([`crate::proto`]).

use std::io;
use std::sync::Arc;
use std::time::Instant;

use super::transmission::{self, Negotiated, Stats};
use super::transport::Transport;
use super::{ConnError, Ctx, ExportEntry};
use crate::proto::{
    self, BlockSizes, ClientOption, InfoRequest, MetaContextQuery, NBD_FLAG_CAN_MULTI_CONN,
    NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_HAS_FLAGS, NBD_FLAG_NO_ZEROES, NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_CACHE,
    NBD_FLAG_SEND_DF, NBD_FLAG_SEND_FAST_ZERO, NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_FUA, NBD_FLAG_SEND_TRIM,
    NBD_FLAG_SEND_WRITE_ZEROES, NBD_INFO_DESCRIPTION, NBD_INFO_NAME, NBD_OPT_EXPORT_NAME,
    NBD_REP_ERR_INVALID, NBD_REP_ERR_SHUTDOWN, NBD_REP_ERR_TOO_BIG, NBD_REP_ERR_UNKNOWN, NBD_REP_ERR_UNSUP,
    OPTION_HEADER_LEN, OptionHeader, OptionReply,
};

/// Handshake flags this server offers.
const HANDSHAKE_FLAGS: u16 = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;

/// Transmission flags for an export.
pub(crate) fn transmission_flags(read_only: bool, structured: bool) -> u16 {
    let mut f = NBD_FLAG_HAS_FLAGS
        | NBD_FLAG_SEND_FLUSH
        | NBD_FLAG_SEND_FUA
        | NBD_FLAG_SEND_CACHE
        | NBD_FLAG_CAN_MULTI_CONN;
    if read_only {
        f |= NBD_FLAG_READ_ONLY;
    } else {
        f |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
    }
    if structured {
        f |= NBD_FLAG_SEND_DF;
    }
    f
}

/// The export's block sizes made consistent and capped to the server's payload limit.
pub(crate) fn effective_block_sizes(b: BlockSizes, max_payload: u32) -> BlockSizes {
    let minimum = b.minimum.clamp(1, 64 * 1024);
    let maximum = b.maximum.min(max_payload).max(minimum);
    let preferred = b.preferred.clamp(minimum, maximum);
    BlockSizes { minimum, preferred, maximum }
}

/// Runs one connection to completion; logs one line when it closes. `enter` is called when
/// negotiation is over, with the export chosen, before the client is told so; if it says no
/// (the server cut the connection meanwhile, or the export was removed), the connection ends
/// there.
pub(crate) fn run_connection<S: Transport>(ctx: &Ctx, mut stream: S, peer: &str, enter: &Enter<'_>) {
    let started = Instant::now();
    let stats = Stats::default();
    let mut export_name = String::new();
    let outcome = match negotiate(ctx, &mut stream, enter) {
        Ok(Some(neg)) => {
            export_name.clone_from(&neg.export.name);
            transmission::run(ctx, stream, neg, &stats, peer)
        }
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    let (requests, bytes_read, bytes_written, io_errors) = stats.totals();
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    match outcome {
        Ok(()) => tracing::info!(
            %peer, export = %export_name, requests, bytes_read, bytes_written, io_errors, duration_ms,
            "NBD connection closed"
        ),
        Err(e) => tracing::info!(
            %peer, export = %export_name, requests, bytes_read, bytes_written, io_errors, duration_ms, error = %e,
            "NBD connection closed with error"
        ),
    }
    transmission::report_suppressed_io_errors(ctx);
}

/// Called when a connection enters transmission with an export (see [`run_connection`]).
pub(crate) type Enter<'a> = dyn Fn(&Arc<ExportEntry>) -> bool + 'a;

/// Selected metadata contexts and the export they were selected for.
struct MetaSelection {
    export: Arc<ExportEntry>,
    contexts: Vec<(u32, String)>,
}

/// Negotiation state of one connection.
struct Handshake<'a, S> {
    ctx: &'a Ctx,
    stream: &'a mut S,
    deadline: Instant,
    no_zeroes: bool,
    structured: bool,
    meta: Option<MetaSelection>,
    out: Vec<u8>,
}

/// Runs fixed newstyle negotiation. `Ok(None)` means the client left politely.
fn negotiate<S: Transport>(
    ctx: &Ctx,
    stream: &mut S,
    enter: &Enter<'_>,
) -> Result<Option<Negotiated>, ConnError> {
    let deadline = Instant::now() + ctx.config.handshake_timeout;
    let mut h =
        Handshake { ctx, stream, deadline, no_zeroes: false, structured: false, meta: None, out: Vec::new() };
    h.out.extend_from_slice(&proto::encode_greeting(HANDSHAKE_FLAGS));
    h.flush()?;
    let mut flags = [0u8; 4];
    h.read_exact(&mut flags)?;
    let client = proto::decode_client_flags(&flags, HANDSHAKE_FLAGS)?;
    h.no_zeroes = client.no_zeroes;
    // Clients without the fixed-newstyle bit are still answered in fixed newstyle: the
    // only option they may send (EXPORT_NAME) is handled the same way in both.
    loop {
        let mut hdr = [0u8; OPTION_HEADER_LEN];
        h.read_exact(&mut hdr)?;
        let hdr = OptionHeader::decode(&hdr)?;
        let step = h.option(hdr)?;
        if let Some(Some(neg)) = &step
            && !enter(&neg.export)
        {
            return Err(ConnError::Evicted);
        }
        h.flush()?;
        if let Some(neg) = step {
            return Ok(neg);
        }
    }
}

/// Result of one option: keep negotiating, stop (client left), or enter transmission.
type Step = Option<Option<Negotiated>>;

impl<S: Transport> Handshake<'_, S> {
    /// Time left before the handshake deadline; an error once it passed.
    fn left(&self) -> Result<std::time::Duration, ConnError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() { Err(ConnError::HandshakeTimeout) } else { Ok(left) }
    }

    /// One read, bounded by the deadline (every read is, so a client trickling bytes cannot
    /// stretch negotiation past it). 0 means the stream ended.
    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize, ConnError> {
        loop {
            let left = self.left()?;
            self.stream.set_read_timeout_opt(Some(left))?;
            match self.stream.read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Err(ConnError::HandshakeTimeout);
                }
                Err(e) => return Err(ConnError::Io(e)),
            }
        }
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ConnError> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.read_some(&mut buf[filled..])? {
                0 => return Err(ConnError::Io(io::ErrorKind::UnexpectedEof.into())),
                n => filled += n,
            }
        }
        Ok(())
    }

    fn reply(&mut self, option: u32, r: OptionReply<'_>) {
        r.encode(option, &mut self.out);
    }

    fn error(&mut self, option: u32, code: u32, message: &str) {
        self.reply(option, OptionReply::Error { code, message });
    }

    /// Sends the replies gathered so far, bounded by the deadline too (a client that sends
    /// options without reading the replies must not hold the connection past it).
    fn flush(&mut self) -> Result<(), ConnError> {
        if !self.out.is_empty() {
            self.send_now()?;
        }
        Ok(())
    }

    fn send_now(&mut self) -> Result<(), ConnError> {
        let out = std::mem::take(&mut self.out);
        let mut sent = 0;
        while sent < out.len() {
            // Every write is bounded by what is left, so a client reading a byte at a time
            // cannot stretch negotiation either.
            let left = self.left()?;
            self.stream.set_write_timeout_opt(Some(left))?;
            match self.stream.write(&out[sent..]) {
                Ok(0) => return Err(ConnError::Io(io::ErrorKind::WriteZero.into())),
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Err(ConnError::HandshakeTimeout);
                }
                Err(e) => return Err(ConnError::Io(e)),
            }
        }
        Ok(())
    }

    /// Handles one option whose header was read.
    fn option(&mut self, hdr: OptionHeader) -> Result<Step, ConnError> {
        let opt = hdr.option;
        if hdr.length > self.ctx.config.max_option_len {
            if opt == NBD_OPT_EXPORT_NAME {
                // This option cannot be answered with an error: the session must end.
                return Err(ConnError::UnknownExport("<oversized name>".into()));
            }
            self.skip(hdr.length)?;
            self.error(opt, NBD_REP_ERR_TOO_BIG, "option data too large");
            return Ok(None);
        }
        let mut data = vec![0u8; hdr.length as usize];
        self.read_exact(&mut data)?;
        let parsed = ClientOption::decode(opt, &data);
        if self.ctx.shared.is_stopping() {
            match parsed {
                Ok(ClientOption::Abort) => {}
                Ok(ClientOption::ExportName(_)) => return Ok(Some(None)),
                _ => {
                    self.error(opt, NBD_REP_ERR_SHUTDOWN, "server is shutting down");
                    return Ok(None);
                }
            }
        }
        let parsed = match parsed {
            Ok(p) => p,
            Err(e) if opt == NBD_OPT_EXPORT_NAME => return Err(ConnError::BadExportName(e)),
            Err(e) => {
                tracing::debug!(error = %e, "invalid option");
                self.error(opt, NBD_REP_ERR_INVALID, &e.to_string());
                return Ok(None);
            }
        };
        tracing::trace!(option = proto::option_name(opt), "option");
        match parsed {
            ClientOption::ExportName(name) => self.export_name(&name).map(Some),
            ClientOption::Abort => {
                self.reply(opt, OptionReply::Ack);
                // The client may already have closed; that is fine.
                let _ = self.flush();
                self.out.clear();
                Ok(Some(None))
            }
            ClientOption::List => {
                let exports = self.ctx.exports();
                for e in &exports {
                    OptionReply::Server { name: &e.name, description: &e.description }
                        .encode(opt, &mut self.out);
                }
                self.reply(opt, OptionReply::Ack);
                Ok(None)
            }
            ClientOption::StartTls => {
                self.error(opt, NBD_REP_ERR_UNSUP, "this server does not support TLS");
                Ok(None)
            }
            ClientOption::StructuredReply => {
                self.structured = true;
                self.reply(opt, OptionReply::Ack);
                Ok(None)
            }
            ClientOption::Info(req) => {
                self.info(opt, &req, false);
                Ok(None)
            }
            ClientOption::Go(req) => Ok(self.info(opt, &req, true).map(Some)),
            ClientOption::ListMetaContext(q) => {
                self.meta_context(opt, &q, false);
                Ok(None)
            }
            ClientOption::SetMetaContext(q) => {
                self.meta_context(opt, &q, true);
                Ok(None)
            }
            ClientOption::Unknown(_) => {
                self.error(opt, NBD_REP_ERR_UNSUP, "option not supported by this server");
                Ok(None)
            }
        }
    }

    fn skip(&mut self, len: u32) -> Result<(), ConnError> {
        let mut left = len as usize;
        let mut scratch = vec![0u8; left.min(64 << 10)];
        while left > 0 {
            let want = left.min(scratch.len());
            match self.read_some(&mut scratch[..want])? {
                0 => return Err(ConnError::Io(io::ErrorKind::UnexpectedEof.into())),
                n => left -= n,
            }
        }
        Ok(())
    }

    fn negotiated(&self, e: &Arc<ExportEntry>) -> Negotiated {
        let contexts = match &self.meta {
            Some(m) if Arc::ptr_eq(&m.export, e) && self.structured => m.contexts.clone(),
            _ => Vec::new(),
        };
        let block_sizes = effective_block_sizes(e.export.block_sizes(), self.ctx.config.max_payload);
        Negotiated {
            export: Arc::clone(e),
            size: e.export.size(),
            read_only: e.export.read_only(),
            structured: self.structured,
            contexts,
            max_payload: block_sizes.maximum,
        }
    }

    fn export_name(&mut self, name: &str) -> Result<Option<Negotiated>, ConnError> {
        let e = self.ctx.find(name).ok_or_else(|| ConnError::UnknownExport(name.to_string()))?;
        let neg = self.negotiated(&e);
        let flags = transmission_flags(neg.read_only, neg.structured);
        self.out.extend_from_slice(&proto::encode_export_name_reply(neg.size, flags, self.no_zeroes));
        Ok(Some(neg))
    }

    /// `NBD_OPT_INFO` / `NBD_OPT_GO`. Returns the negotiated state for a successful GO.
    fn info(&mut self, opt: u32, req: &InfoRequest, go: bool) -> Option<Negotiated> {
        let Some(e) = self.ctx.find(&req.name) else {
            let msg = format!("no export named {:?}", proto::truncate_str(&req.name, 256));
            self.error(opt, NBD_REP_ERR_UNKNOWN, &msg);
            return None;
        };
        let neg = self.negotiated(&e);
        let flags = transmission_flags(neg.read_only, neg.structured);
        OptionReply::InfoExport { size: neg.size, flags }.encode(opt, &mut self.out);
        if req.requests.contains(&NBD_INFO_NAME) {
            OptionReply::InfoName(&e.name).encode(opt, &mut self.out);
        }
        if req.requests.contains(&NBD_INFO_DESCRIPTION) && !e.description.is_empty() {
            OptionReply::InfoDescription(&e.description).encode(opt, &mut self.out);
        }
        // Block sizes are always sent: the protocol allows it unrequested, and it tells
        // every client the largest request we accept.
        let bs = effective_block_sizes(e.export.block_sizes(), self.ctx.config.max_payload);
        OptionReply::InfoBlockSize(bs).encode(opt, &mut self.out);
        self.reply(opt, OptionReply::Ack);
        go.then_some(neg)
    }

    /// `NBD_OPT_LIST_META_CONTEXT` (`set == false`) or `NBD_OPT_SET_META_CONTEXT`.
    fn meta_context(&mut self, opt: u32, q: &MetaContextQuery, set: bool) {
        if !self.structured {
            self.error(opt, NBD_REP_ERR_INVALID, "structured replies must be negotiated first");
            return;
        }
        let Some(e) = self.ctx.find(&q.export) else {
            let msg = format!("no export named {:?}", proto::truncate_str(&q.export, 256));
            self.error(opt, NBD_REP_ERR_UNKNOWN, &msg);
            return;
        };
        let all = &e.contexts;
        let mut chosen: Vec<(u32, String)> = Vec::new();
        for (i, name) in all.iter().enumerate() {
            let wanted = if q.queries.is_empty() {
                // LIST with no query lists everything; SET with no query selects nothing.
                !set
            } else {
                q.queries.iter().any(|query| meta_query_matches(query, name))
            };
            if wanted {
                let id = u32::try_from(i + 1).unwrap_or(u32::MAX);
                chosen.push((if set { id } else { 0 }, name.clone()));
            }
        }
        for (id, name) in &chosen {
            OptionReply::MetaContext { id: *id, name }.encode(opt, &mut self.out);
        }
        self.reply(opt, OptionReply::Ack);
        if set {
            self.meta = Some(MetaSelection { export: e, contexts: chosen });
        }
    }
}

/// Whether a metadata context query selects `name`: a query ending in `:` (a bare
/// namespace such as `base:` or `mcow:`) selects every context of that namespace; any
/// other query selects the context of exactly that name.
pub(crate) fn meta_query_matches(query: &str, name: &str) -> bool {
    if query.ends_with(':') { name.starts_with(query) } else { query == name }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_query_selects_all_contexts_of_the_namespace() {
        assert!(meta_query_matches("mcow:", "mcow:allocation-depth"));
        assert!(meta_query_matches("base:", "base:allocation"));
        assert!(!meta_query_matches("mcow:", "base:allocation"));
        assert!(meta_query_matches("base:allocation", "base:allocation"));
        assert!(!meta_query_matches("base:alloc", "base:allocation"));
        assert!(!meta_query_matches("", "base:allocation"));
    }

    #[test]
    fn read_only_exports_do_not_offer_writing_commands() {
        let f = transmission_flags(true, false);
        assert_ne!(f & NBD_FLAG_READ_ONLY, 0);
        assert_eq!(f & (NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_DF), 0);
        let f = transmission_flags(false, true);
        assert_eq!(f & NBD_FLAG_READ_ONLY, 0);
        assert_ne!(f & NBD_FLAG_SEND_DF, 0);
        assert_ne!(f & NBD_FLAG_CAN_MULTI_CONN, 0);
    }

    #[test]
    fn block_sizes_are_made_consistent_and_capped() {
        let b =
            effective_block_sizes(BlockSizes { minimum: 0, preferred: 1 << 30, maximum: u32::MAX }, 32 << 20);
        assert_eq!(b, BlockSizes { minimum: 1, preferred: 32 << 20, maximum: 32 << 20 });
        let b = effective_block_sizes(BlockSizes { minimum: 4096, preferred: 512, maximum: 1024 }, 32 << 20);
        assert_eq!(b, BlockSizes { minimum: 4096, preferred: 4096, maximum: 4096 });
    }
}
