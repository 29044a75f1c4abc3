//! A file written through a shared memory mapping: the storage of a writable top's pending logs.
//!
//! Owns: [`MappedStorage`], a [`Storage`] whose writes are stores into a `MAP_SHARED` mapping
//! of its file instead of one `pwrite` each, and the choice of the filesystems it is used on
//! ([`MappedStorage::or_file`]). The stores land in the host's page cache, as a plain write's
//! bytes do, so they outlive the process (a kill) and, like plain writes, promise nothing
//! after a power loss until a [`Storage::sync`].
//!
//! A store to a mapped page must never fault, since a fault is a `SIGBUS` that ends the process
//! instead of an error a caller can report. Three things could make one, and each is kept out:
//! - a page past the file's end: the mapping never reaches past it (the file grows before the
//!   mapping does, and shrinks only after the mapping is gone), and no one else changes the
//!   file while it is mapped (the caller's promise; for the pending logs, the top's writer
//!   lock keeps every other writer out, and readers of the logs cannot run beside it);
//! - a page the filesystem has no space for (a hole, or a full disk): every byte of the
//!   mapping was allocated first with `fallocate`, in chunks that grow with the file (64 KiB,
//!   doubling up to 4 MiB), so a full disk is an `ENOSPC` error from the write that needed the
//!   next chunk and never a fault on a store; and only filesystems that overwrite allocated
//!   blocks in place (ext4, XFS, tmpfs) get a mapped file: on a copy-on-write one (btrfs) a
//!   store to an allocated block can still need space, so those get plain writes;
//! - a page that must be read in and cannot be (a media error): pages written are either fresh
//!   from `fallocate` (read as zeros, with no I/O) or ones this handle wrote before, which a
//!   store only needs to read again if the kernel wrote them back and dropped them meanwhile.
//!   That one case remains: a read error of such a page ends the process (a restart recovers as
//!   after a kill) where a `pwrite` would have returned `EIO`.
//!
//! Reads use `pread`, which the kernel serves from the same page cache the stores went to, so
//! a read error is an error. A log's length therefore says nothing about where its records
//! end: the zeros after the last record end it (docs/FORMAT.md, "Pending logs").

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, MutexGuard};

use memmap2::{MmapMut, MmapOptions};

use crate::storage::{FileStorage, Storage};

/// The first chunk a mapped file is allocated in, and the unit its allocation is rounded to.
const GROW_MIN: u64 = 64 << 10;
/// The largest chunk it grows by at once (chunks double up to it).
const GROW_MAX: u64 = 4 << 20;

/// `f_type` of the filesystems that overwrite a file's allocated blocks in place, where a store
/// to a preallocated page needs no space: ext4 (also ext2/ext3), XFS, tmpfs.
const IN_PLACE_FILESYSTEMS: [u64; 3] = [0xEF53, 0x5846_5342, 0x0102_1994];

/// A file whose writes are stores into a shared mapping of it (see the module doc). The
/// caller's promise (see [`MappedStorage::new`]): while the handle lives, no one else writes or
/// truncates the file.
pub struct MappedStorage {
    file: File,
    state: Mutex<State>,
}

struct State {
    /// The mapping of bytes `[0, reserved)`; `None` when nothing is reserved yet, or after a
    /// `set_len` (mapped again by the next write).
    map: Option<MmapMut>,
    /// The file's length.
    len: u64,
    /// Bytes from offset 0 that this handle allocated with `fallocate` (at most `len`): the
    /// only ones a store may go to.
    reserved: u64,
}

impl MappedStorage {
    /// Writes to `file` through a mapping. The caller promises that no one else writes or
    /// truncates the file while this handle lives, and that its filesystem overwrites allocated
    /// blocks in place (see the module doc; [`MappedStorage::or_file`] checks that).
    pub fn new(file: File) -> io::Result<MappedStorage> {
        let len = file.metadata()?.len();
        Ok(MappedStorage { file, state: Mutex::new(State { map: None, len, reserved: 0 }) })
    }

    /// A mapped storage for `file` if its filesystem is one where stores to allocated blocks
    /// need no space (ext4, XFS, tmpfs) and it can preallocate the file, plain writes
    /// ([`FileStorage`]) otherwise. The same promise as [`MappedStorage::new`]: no one else
    /// writes or truncates the file meanwhile.
    pub fn or_file(file: File) -> io::Result<Box<dyn Storage>> {
        use rustix::fs::{FallocateFlags, fallocate};
        let kind = rustix::fs::fstatfs(&file)?.f_type as u64;
        // And only if it can preallocate this file (ext4's driver cannot for a file without
        // extents, on an ext2 or ext3 filesystem): one block at the start, the length unchanged.
        if IN_PLACE_FILESYSTEMS.contains(&kind) && fallocate(&file, FallocateFlags::KEEP_SIZE, 0, 1).is_ok() {
            Ok(Box::new(MappedStorage::new(file)?))
        } else {
            Ok(Box::new(FileStorage(file)))
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Allocates the file's blocks up to at least `end` (the next chunk) and maps them.
    /// On failure (a full disk: `ENOSPC`) nothing changes: the bytes already written stay,
    /// mapped as before.
    fn reserve(&self, s: &mut State, end: u64) -> io::Result<()> {
        use rustix::fs::{FallocateFlags, fallocate};
        let step = s.reserved.clamp(GROW_MIN, GROW_MAX);
        let target = end.max(s.reserved + step).next_multiple_of(GROW_MIN);
        let target_len = usize::try_from(target).map_err(|_| io::Error::from(io::ErrorKind::FileTooLarge))?;
        // From 0: whatever the file held before this handle wrote to it (a hole left by a
        // truncate that extended it) gets its blocks too. Mode 0 extends the file's length to
        // `target` if it was shorter, and allocates without changing what any byte reads as.
        fallocate(&self.file, FallocateFlags::empty(), 0, target).map_err(io::Error::from)?;
        s.len = s.len.max(target);
        s.map = None;
        // SAFETY: the mapping covers `[0, target)`, all of which lies inside the file (its length
        // is at least `target` since the fallocate above) and has its blocks allocated (same
        // fallocate), so a store to it needs neither a longer file nor new space on the
        // filesystems `or_file` admits. The file's length only changes through this handle and
        // under `state`'s lock: `set_len` drops the mapping before it truncates. No one else
        // truncates or writes the file (the promise of `new`: for the pending logs, only the
        // top's writer, which holds the top's exclusive lock, opens them for writing, and
        // readers of them cannot run beside it). The mapping's bytes are only accessed under
        // `state`'s lock, so the `&mut [u8]` it gives is never aliased in this process.
        let map = unsafe { MmapOptions::new().len(target_len).map_mut(&self.file) }?;
        s.map = Some(map);
        s.reserved = target;
        Ok(())
    }
}

impl Storage for MappedStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // pread sees what the stores wrote: both go through the same page cache.
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "write past the largest offset"))?;
        let mut s = self.lock();
        if end > s.reserved || s.map.is_none() {
            self.reserve(&mut s, end)?;
        }
        let map = s.map.as_mut().expect("reserved above");
        // `offset` < `end` <= `reserved` = the mapping's length, which fits in usize.
        map[offset as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.lock();
        // Unmapped first: no page of the mapping may lie past the file's end.
        s.map = None;
        self.file.set_len(len)?;
        s.len = len;
        s.reserved = s.reserved.min(len);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let s = self.lock();
        if let Some(map) = &s.map {
            map.flush()?;
        }
        self.file.sync_data()
    }

    fn allocated(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata()?.blocks() * 512)
    }

    fn file_id(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata()?.ino())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage() -> (tempfile::TempDir, MappedStorage, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        (dir, MappedStorage::new(f).unwrap(), path)
    }

    /// Writes across several chunk boundaries read back through the storage and through the
    /// file (another handle), and the file is preallocated beyond the last byte written, with
    /// zeros there.
    #[test]
    fn stores_read_back_and_the_file_is_preallocated() {
        let (_dir, s, path) = storage();
        let mut model = Vec::new();
        let mut off = 0u64;
        for i in 0..3000u32 {
            let rec: Vec<u8> =
                (0..(52 + (i % 40) as usize * 4)).map(|k| (i as usize * 7 + k) as u8).collect();
            s.write_at(&rec, off).unwrap();
            model.extend_from_slice(&rec);
            off += rec.len() as u64;
        }
        assert!(off > 2 * GROW_MIN, "the writes crossed chunk boundaries ({off} bytes)");
        let len = s.len().unwrap();
        assert!(len >= off && len.is_multiple_of(GROW_MIN), "length {len} is whole chunks past {off}");
        let mut back = vec![0u8; len as usize];
        s.read_at(&mut back, 0).unwrap();
        assert_eq!(&back[..model.len()], &model[..]);
        assert!(back[model.len()..].iter().all(|&b| b == 0), "zeros after the last write");
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(on_disk, back, "another handle reads the same bytes");
        assert!(s.allocated().unwrap() >= len, "the whole length is allocated");
    }

    /// A truncate drops what lay past it, a write at 0 after it maps again, and a read past the
    /// end is an error.
    #[test]
    fn set_len_then_write_again() {
        let (_dir, s, path) = storage();
        s.write_at(&[7u8; 1000], 0).unwrap();
        s.set_len(0).unwrap();
        assert_eq!(s.len().unwrap(), 0);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        s.write_at(b"header", 0).unwrap();
        let mut b = [0u8; 8];
        s.read_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"header\0\0", "the old bytes are gone");
        let len = s.len().unwrap();
        assert_eq!(s.read_at(&mut [0u8; 1], len).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        // A file extended by set_len (a hole) is allocated before a store goes there.
        s.set_len(3 * GROW_MIN).unwrap();
        s.write_at(b"x", 3 * GROW_MIN - 1).unwrap();
        assert!(s.allocated().unwrap() >= 3 * GROW_MIN);
        s.sync().unwrap();
    }
}
