//! Byte-range locks between processes: open file description (OFD) locks taken with `fcntl`.
//!
//! Owns: taking a read or write lock on a byte range of a file (waiting for it or not),
//! releasing it when the guard drops, holding one without a guard for as long as the file is
//! open ([`hold`]: converting a held lock to the other type is atomic), and telling a range
//! another process holds apart from a filesystem that has no such locks. Does not own: what the
//! ranges mean (`fetch` locks the ranges of a partial layer it is fetching, so that processes
//! sharing a cache do not fetch the same blocks at once; every open partial layer holds a read
//! lock on [`IN_USE`], so that the bounded cache (`cache`) and `mcow gc` can tell a layer
//! another process uses).
//!
//! An OFD lock belongs to the open file description, not to the process: threads sharing one
//! handle never block each other, and the kernel drops the lock when the last descriptor of the
//! description closes (also when the process dies).

use std::fs::File;
use std::os::fd::AsRawFd;

/// What a lock keeps others from doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockType {
    /// Shared: others may read-lock the range too, no one may write-lock it.
    Read,
    /// Exclusive: no one else may lock any part of the range.
    Write,
}

impl LockType {
    fn raw(self) -> libc::c_int {
        match self {
            LockType::Read => libc::F_RDLCK,
            LockType::Write => libc::F_WRLCK,
        }
    }
}

/// Why a range could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another open file description holds a conflicting lock on part of the range (only from
    /// [`RangeLock::try_lock`], which does not wait).
    #[error("the byte range is locked by another process")]
    Held,
    /// The filesystem (or kernel) offers no byte-range locks here.
    #[error("byte-range locks are not supported here: {0}")]
    Unsupported(std::io::Error),
    /// Any other failure of the call.
    #[error("byte-range lock failed: {0}")]
    Io(std::io::Error),
}

impl LockError {
    fn classify(e: std::io::Error) -> LockError {
        match e.raw_os_error() {
            Some(libc::EAGAIN | libc::EACCES) => LockError::Held,
            Some(libc::EINVAL | libc::ENOLCK | libc::EOPNOTSUPP) => LockError::Unsupported(e),
            _ => LockError::Io(e),
        }
    }
}

impl From<LockError> for std::io::Error {
    fn from(e: LockError) -> std::io::Error {
        match e {
            LockError::Held => std::io::Error::new(std::io::ErrorKind::WouldBlock, e.to_string()),
            LockError::Unsupported(e) | LockError::Io(e) => e,
        }
    }
}

/// The byte range of a sealed layer file that every process that has it open as a partial layer
/// read-locks (its first byte: in the header, which no fetch locks). A write lock on it
/// succeeds only when no other open file description holds it: the bounded cache takes one
/// (converting its own read lock) before it punches blocks out of the file, `mcow gc` before
/// it removes the file.
pub const IN_USE: (u64, u64) = (0, 1);

/// Takes, or converts to, a `kind` lock on `[start, start + len)` of `file` and keeps it,
/// without a guard, until the open file description closes or another call on the same range
/// changes it (the conversion is atomic: a read lock converted to a write lock that cannot be
/// had stays a read lock). With `wait`, waits for conflicting locks to go.
pub fn hold(file: &File, kind: LockType, start: u64, len: u64, wait: bool) -> Result<(), LockError> {
    loop {
        let cmd = if wait { libc::F_OFD_SETLKW } else { libc::F_OFD_SETLK };
        match fcntl_lock(file, cmd, kind.raw(), start, len) {
            Ok(()) => return Ok(()),
            Err(e) if wait && e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(LockError::classify(e)),
        }
    }
}

/// A lock held on `[start, start + len)` of a file; released on drop.
pub struct RangeLock<'a> {
    file: &'a File,
    start: u64,
    len: u64,
}

impl<'a> RangeLock<'a> {
    /// Locks `[start, start + len)` of `file` if no other open file description holds a
    /// conflicting lock on part of it; [`LockError::Held`] if one does.
    pub fn try_lock(file: &'a File, kind: LockType, start: u64, len: u64) -> Result<Self, LockError> {
        let lock = RangeLock { file, start, len };
        fcntl_lock(file, libc::F_OFD_SETLK, kind.raw(), start, len).map_err(LockError::classify)?;
        Ok(lock)
    }

    /// Locks `[start, start + len)` of `file`, waiting as long as other open file descriptions
    /// hold conflicting locks on it (a signal interrupting the wait does not end it).
    pub fn lock_wait(file: &'a File, kind: LockType, start: u64, len: u64) -> Result<Self, LockError> {
        loop {
            match fcntl_lock(file, libc::F_OFD_SETLKW, kind.raw(), start, len) {
                Ok(()) => return Ok(RangeLock { file, start, len }),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(LockError::classify(e)),
            }
        }
    }
}

impl Drop for RangeLock<'_> {
    fn drop(&mut self) {
        if let Err(e) = fcntl_lock(self.file, libc::F_OFD_SETLK, libc::F_UNLCK, self.start, self.len) {
            tracing::warn!(error = %e, "unlocking a byte range failed");
        }
    }
}

/// One `fcntl` lock call (`cmd` one of the `F_OFD_SETLK*`, `kind` a lock type or `F_UNLCK`).
fn fcntl_lock(file: &File, cmd: libc::c_int, kind: libc::c_int, start: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: all-zero is a valid `struct flock` (plain integers); the fields that matter
    // are set below, and `l_pid` must be 0 for open file description locks.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start as libc::off_t;
    fl.l_len = len as libc::off_t;
    // SAFETY: the descriptor is open for as long as `file` is borrowed, and `fl` is a valid,
    // initialised `struct flock` that outlives the call, which only reads and writes it.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl) };
    if r == -1 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Two handles on one file are two open file descriptions: a write lock through one keeps
    // the other from locking an overlapping range (not a disjoint one), until it drops.
    #[test]
    fn write_locks_exclude_overlapping_ranges_of_other_descriptions() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 16).unwrap();
        let path = format!("/proc/self/fd/{}", f.as_raw_fd());
        let g = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
        let held = RangeLock::try_lock(&f, LockType::Write, 0, 4096).unwrap();
        assert!(matches!(RangeLock::try_lock(&g, LockType::Write, 2048, 4096), Err(LockError::Held)));
        assert!(matches!(RangeLock::try_lock(&g, LockType::Read, 0, 1), Err(LockError::Held)));
        drop(RangeLock::try_lock(&g, LockType::Write, 4096, 4096).unwrap());
        drop(held);
        drop(RangeLock::try_lock(&g, LockType::Write, 0, 4096).unwrap());
        // Read locks share.
        let r1 = RangeLock::try_lock(&f, LockType::Read, 0, 4096).unwrap();
        let r2 = RangeLock::try_lock(&g, LockType::Read, 0, 4096).unwrap();
        drop((r1, r2));
    }

    // A held read lock converts to a write lock only while no other description holds one,
    // and back; a failed conversion keeps the read lock.
    #[test]
    fn held_locks_convert_atomically() {
        let f = tempfile::tempfile().unwrap();
        let path = format!("/proc/self/fd/{}", f.as_raw_fd());
        let g = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
        hold(&f, LockType::Read, 0, 1, false).unwrap();
        hold(&g, LockType::Read, 0, 1, false).unwrap();
        assert!(matches!(hold(&f, LockType::Write, 0, 1, false), Err(LockError::Held)));
        assert!(matches!(RangeLock::try_lock(&g, LockType::Write, 0, 1), Err(LockError::Held)));
        drop(g); // its description closes: its lock goes
        hold(&f, LockType::Write, 0, 1, false).unwrap();
        let h = std::fs::File::open(format!("/proc/self/fd/{}", f.as_raw_fd())).unwrap();
        assert!(matches!(RangeLock::try_lock(&h, LockType::Read, 0, 1), Err(LockError::Held)));
        hold(&f, LockType::Read, 0, 1, false).unwrap();
        drop(RangeLock::try_lock(&h, LockType::Read, 0, 1).unwrap());
    }
}
