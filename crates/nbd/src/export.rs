//! The [`Export`] trait: what the server needs from a disk.
//!
//! This module owns the contract between the transport and whatever holds the bytes
//! (the mcow engine, [`crate::MemExport`], a file). It does not own any protocol detail:
//! offsets and lengths reaching an export have already been checked against
//! [`Export::size`] and the advertised maximum block size, and read-only exports never
//! see write calls.

use std::io;

use crate::proto::{BlockSizes, StatusExtent};

/// Where an export hands the bytes of a read as slices of its own memory, in order (see
/// [`Export::read_borrowed`]).
pub type Parts<'a> = dyn FnMut(&[&[u8]]) + 'a;

/// A disk served over NBD.
///
/// Every method may be called concurrently from several connections and several worker
/// threads of one connection, so implementations must be internally synchronised. The
/// server advertises `NBD_FLAG_CAN_MULTI_CONN`: a `flush` (or a write with `fua`) must make
/// the data durable and visible to every connection before returning, which holds
/// naturally when all connections share one instance behind an `Arc`.
///
/// Requests arrive at any byte alignment the client chooses; the minimum block size is
/// advertised as a hint and not enforced by the server.
pub trait Export: Send + Sync + 'static {
    /// Size in bytes; fixed for the life of a connection.
    fn size(&self) -> u64;

    /// Whether writes, trims and write-zeroes are refused (`NBD_FLAG_READ_ONLY`).
    fn read_only(&self) -> bool;

    /// `(minimum, preferred, maximum)` block sizes for `NBD_INFO_BLOCK_SIZE`. The server
    /// advertises `maximum` capped to its own payload limit and refuses larger reads
    /// and writes.
    fn block_sizes(&self) -> BlockSizes {
        BlockSizes::default()
    }

    /// Fills `buf` with the bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Hands the `len` bytes at `offset` to `send` as slices of the export's own memory (a
    /// mapped file, say), so that the reply is written from them without a copy into a buffer.
    /// `None` when the export cannot for this range, without calling `send` (the server then
    /// calls [`Export::read`]). `send` is called at most once, and only if the read succeeds:
    /// an `Err` means it was not called.
    fn read_borrowed(&self, _offset: u64, _len: usize, _send: &mut Parts<'_>) -> Option<io::Result<()>> {
        None
    }

    /// Writes `data` at `offset`; with `fua`, durable before returning.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()>;

    /// Makes `[offset, offset+len)` read as zeroes. With `may_trim` the export may
    /// deallocate the range instead of writing zeroes.
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()>;

    /// Discard hint: the range's contents are no longer needed.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()>;

    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;

    /// Prefetch hint.
    fn cache(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    /// Whether `write_zeroes` is always cheap (no data written). When false, requests
    /// carrying `NBD_CMD_FLAG_FAST_ZERO` fail at once with `NBD_ENOTSUP` without calling
    /// the export, as the protocol asks of a server that could only zero slowly.
    fn fast_zero(&self) -> bool {
        true
    }

    /// Names of metadata contexts this export offers besides `base:allocation`
    /// (for example `mcow:allocation-depth`).
    fn extra_meta_contexts(&self) -> Vec<String> {
        Vec::new()
    }

    /// Extents covering `[offset, offset+len)` for `context`, in order from `offset`.
    /// The list may stop early but must cover at least one byte. For `base:allocation`
    /// the flags are `NBD_STATE_HOLE` / `NBD_STATE_ZERO`; for an extra context the value
    /// is export-defined.
    fn block_status(&self, context: &str, offset: u64, len: u64) -> io::Result<Vec<StatusExtent>>;
}
