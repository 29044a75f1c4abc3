//! Temporaries: files being written in a layer store's `tmp/` directory before they are renamed
//! to their content-addressed names.
//!
//! Owns: creating a temporary with a unique name, held under an exclusive `flock` by its writer
//! for as long as the [`TempFile`] lives, and finding and removing the temporaries whose writer
//! is gone (the lock is free: the process died, say by `kill -9`, or leaked it). Locks, not
//! process ids: a pid can be reused or belong to another pid namespace, a lock is released by
//! the kernel exactly when the last descriptor of its writer closes.
//!
//! The two races are closed by checking identities. A writer creates its file, then locks it,
//! then checks that its name still points at the file it locked (a cleaner may have removed
//! the file between the create and the lock; the writer then starts over with a new name). A
//! cleaner locks a file, then removes the name only if it still points at that same file.

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Suffix of every temporary's name.
const SUFFIX: &str = ".tmp";

/// A file being written in a `tmp/` directory, locked by this process until dropped. Dropped,
/// it removes its name unless [`TempFile::persisted`] was called (after a rename).
#[derive(Debug)]
pub struct TempFile {
    path: PathBuf,
    /// Holds the lock (and shares its open file description with any clone of it).
    file: File,
    keep: bool,
}

impl TempFile {
    /// Creates `dir/<prefix>-<pid>-<n>.tmp`, locked, with the first `n` whose name is free.
    /// `dir` must exist.
    pub fn create(dir: &Path, prefix: &str) -> Result<TempFile> {
        let mut n = 0u64;
        loop {
            let path = dir.join(format!("{prefix}-{}-{n}{SUFFIX}", std::process::id()));
            n += 1;
            let file = match File::options().read(true).write(true).create_new(true).open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io("create", &path)(e)),
            };
            file.lock().map_err(Error::io("lock", &path))?;
            if same_file(&path, &file) {
                return Ok(TempFile { path, file, keep: false });
            }
            // A cleaner took it for stale between the create and the lock: try another name.
        }
    }

    /// The temporary's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The locked file (write through it, or through a clone of it: the lock is shared).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The file was renamed away: do not remove the name on drop. The lock is held until drop.
    pub fn persisted(&mut self) {
        self.keep = true;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn same_file(path: &Path, file: &File) -> bool {
    match (fs::metadata(path), file.metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// A temporary whose writer is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleTemp {
    /// Its path.
    pub path: PathBuf,
    /// Its length.
    pub bytes: u64,
}

/// The temporaries in `dir` that no live writer holds (none if `dir` does not exist). With
/// `remove`, they are removed as they are found; what could not be removed is not listed.
pub fn stale_temporaries(dir: &Path, remove: bool) -> Result<Vec<StaleTemp>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list", dir)(e)),
    };
    let mut stale = Vec::new();
    for entry in entries {
        let entry = entry.map_err(Error::io("list", dir))?;
        let path = entry.path();
        if !path.to_str().is_some_and(|p| p.ends_with(SUFFIX)) {
            continue;
        }
        let Ok(file) = File::open(&path) else { continue };
        // Held: a writer is alive. Any other failure: leave it alone.
        if file.try_lock().is_err() {
            continue;
        }
        if !same_file(&path, &file) {
            continue; // renamed or replaced meanwhile
        }
        let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
        if remove {
            match fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), bytes, "removed a temporary left by a dead process")
                }
                Err(_) => continue,
            }
        }
        stale.push(StaleTemp { path, bytes });
    }
    stale.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(stale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_temporary_is_not_stale_and_a_dropped_one_is_gone() {
        let t = tempfile::tempdir().unwrap();
        let a = TempFile::create(t.path(), "layer").unwrap();
        assert!(a.path().file_name().unwrap().to_str().unwrap().starts_with("layer-"));
        assert_eq!(stale_temporaries(t.path(), true).unwrap(), vec![], "a live writer's file is kept");
        assert!(a.path().exists());
        let p = a.path().to_path_buf();
        drop(a);
        assert!(!p.exists(), "dropped without persisting: removed");
    }

    #[test]
    fn an_unlocked_temporary_is_stale_and_removed() {
        let t = tempfile::tempdir().unwrap();
        // What a killed writer leaves: a file nobody holds a lock on.
        let left = t.path().join("pull-123-0.tmp");
        fs::write(&left, vec![7u8; 5000]).unwrap();
        fs::write(t.path().join("other-file"), b"not a temporary").unwrap();
        let listed = stale_temporaries(t.path(), false).unwrap();
        assert_eq!(listed, vec![StaleTemp { path: left.clone(), bytes: 5000 }]);
        assert!(left.exists(), "listing removes nothing");
        assert_eq!(stale_temporaries(t.path(), true).unwrap().len(), 1);
        assert!(!left.exists());
        assert!(t.path().join("other-file").exists(), "only temporaries are touched");
        assert_eq!(stale_temporaries(&t.path().join("missing"), true).unwrap(), vec![]);
    }
}
