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
    /// The storage's length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Truncates or extends (with zeros) the storage to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn sync(&self) -> io::Result<()>;
    /// Gives back the space of `len` bytes at `offset`, which then read as zeros; the length is
    /// unchanged. Like a write, durable only after the next sync. The default writes nothing
    /// and reports that it could not (callers treat it as a hint).
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    /// Bytes of space the storage takes on its device (for a file, what `st_blocks` counts);
    /// `len` where that is unknown.
    fn allocated(&self) -> io::Result<u64> {
        self.len()
    }
    /// Names the file behind this handle, so that one can tell whether a path still leads to
    /// it (the inode number for a host file). Zero where there is no such notion.
    fn file_id(&self) -> io::Result<u64> {
        Ok(0)
    }
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
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::{FallocateFlags, fallocate};
        fallocate(&self.0, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, offset, len)
            .map_err(io::Error::from)
    }
    fn allocated(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.0.metadata()?.blocks() * 512)
    }
    fn file_id(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.0.metadata()?.ino())
    }
}
