//! Byte storage under the engine: the one trait every layer file is read and written through.
//!
//! Owns: the `Storage` trait and its file implementation. The trait is small on purpose so a
//! test can put a simulated device under the engine (see `sim`) that loses unflushed writes or
//! fails on cue. Does not own: file naming, locking policy or layouts.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Positioned reads and writes with an explicit durability point.
#[allow(clippy::len_without_is_empty)]
pub trait Storage: Send + Sync {
    /// Fills `buf` from `offset`; reading past the end is an `UnexpectedEof` error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, extending the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn sync(&self) -> io::Result<()>;
}

/// A file on the host filesystem.
pub struct FileStorage(pub File);

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        self.0.sync_data()
    }
}
