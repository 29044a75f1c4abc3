//! Reading byte ranges, the one abstraction every backend's range reads go through: the sink
//! types bytes are streamed to ([`Sink`], [`MultiSink`]), the [`RangeRead`] trait (one range
//! streamed, several ranges, a range collected in memory) that both `Remote` (keyed by blob
//! digest) and `layout::ObjectStore` (keyed by object key) extend, and its defaults: several
//! ranges asked for one at a time, a range collected into memory. It owns no transport: how a
//! backend asks for ranges (one HTTP request for several, a file read) is the backend's.
//!
//! (The engine's `BlockSource` is the engine's side of the same contract, with `io::Error`s;
//! `transfer::RemoteSource` implements it over a `Remote`.)

use crate::error::Result;

/// Where streamed bytes go: consecutive pieces of the range, in order; `false` stops the
/// transfer early (that is no error).
pub type Sink<'a> = dyn FnMut(&[u8]) -> bool + 'a;

/// Where the bytes of several ranges go: the range's index and consecutive pieces of it;
/// `false` stops the transfer early.
pub type MultiSink<'a> = dyn FnMut(usize, &[u8]) -> bool + 'a;

/// Byte ranges of objects named by keys of type `K` (a blob digest, an object key).
/// Implementations retry transient failures themselves (see `retry`) and report an error only
/// after their bounded retries.
pub trait RangeRead<K: ?Sized>: Send + Sync {
    /// Streams exactly `len` bytes at `offset` of object `key` to `sink`, in order, as they
    /// arrive (a short answer is an error; after a transient failure midway the rest is asked
    /// for again). Stops early, without error, when `sink` returns false.
    fn stream_range(&self, key: &K, offset: u64, len: u64, sink: &mut Sink<'_>) -> Result<()>;

    /// Streams several ranges (offset, length) of object `key` to `sink` (the range's index and
    /// consecutive pieces of it). Backends that can ask for them in one request do (OCI
    /// registries, plain HTTP); this default asks one range at a time. Stops early when `sink`
    /// returns false. Returns the number of requests made.
    fn stream_ranges(&self, key: &K, ranges: &[(u64, u64)], sink: &mut MultiSink<'_>) -> Result<u64> {
        let mut stopped = false;
        for (i, &(o, l)) in ranges.iter().enumerate() {
            self.stream_range(key, o, l, &mut |piece: &[u8]| {
                stopped = !sink(i, piece);
                !stopped
            })?;
            if stopped {
                return Ok(i as u64 + 1);
            }
        }
        Ok(ranges.len() as u64)
    }

    /// Exactly `len` bytes at `offset` of object `key`, in memory (for small ranges: headers,
    /// indexes, tests).
    fn get_range(&self, key: &K, offset: u64, len: u64) -> Result<Vec<u8>> {
        collect_range(len, |sink| self.stream_range(key, offset, len, sink))
    }
}

/// Collects a streamed range of `len` bytes into memory.
pub fn collect_range(len: u64, stream: impl FnOnce(&mut Sink<'_>) -> Result<()>) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(0).min(64 << 20));
    stream(&mut |piece: &[u8]| {
        buf.extend_from_slice(piece);
        true
    })?;
    Ok(buf)
}
