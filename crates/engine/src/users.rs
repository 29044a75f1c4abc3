//! What a layer store knows of the processes using it, for garbage collection: its `gc.lock`
//! (held shared by every process from its first new file in the store until it drops the
//! store, see `LayerStore::temp_file`, so that a layer a pull or a seal has just added and not
//! yet named in a manifest is never collected; held exclusively by `gc`), and its registry of
//! layers in use (`users/`: each process that opens layers of the store keeps one file there,
//! locked while it lives, listing the digests it opened, written under a shared `gc.lock`, so
//! that `gc` sees every layer a running process uses, whichever disk it came from). Does not
//! own: deciding what to collect (see `gc`). Depends on nothing of the engine above files and
//! locks, so that the store and the engine context can use it.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use mcow_format::Digest;

use crate::error::{Error, Result};
use crate::temp::{TempFile, stale_temporaries};

/// The lock file of a store (see the module doc).
pub const GC_LOCK: &str = "gc.lock";
/// The directory of the registry of layers in use.
pub const USERS_DIR: &str = "users";

/// Opens (creating it if need be) the `gc.lock` of the store at `root`.
pub(crate) fn open_gc_lock(root: &Path) -> std::io::Result<File> {
    fs::create_dir_all(root)?;
    File::options().read(true).write(true).create(true).truncate(false).open(root.join(GC_LOCK))
}

/// This process's entry in a store's registry of layers in use: a file in `users/`, locked while
/// the process lives, with one digest per line.
pub(crate) struct StoreUsers {
    root: PathBuf,
    state: Mutex<Option<UsersState>>,
}

struct UsersState {
    /// The registry file (its `TempFile` holds the lock).
    file: TempFile,
    /// The `gc.lock`, locked shared while a digest is added and its layer opened.
    gc_lock: File,
    listed: BTreeSet<Digest>,
}

impl StoreUsers {
    pub(crate) fn new(root: &Path) -> StoreUsers {
        StoreUsers { root: root.to_path_buf(), state: Mutex::new(None) }
    }

    /// Lists `digest` as in use by this process (once), then runs `open` (which opens its
    /// layer), both under a shared `gc.lock`: a gc either ran before (and the layer is there
    /// or not, as it left it) or runs after and sees the digest. A store where the registry
    /// cannot be written (read-only) opens unregistered, with a debug line.
    pub(crate) fn register<T>(&self, digest: &Digest, open: impl FnOnce() -> Result<T>) -> Result<T> {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            match self.start() {
                Ok(s) => *guard = Some(s),
                Err(e) => {
                    tracing::debug!(store = %self.root.display(), error = %e, "no registry of layers in use");
                    drop(guard);
                    return open();
                }
            }
        }
        let state = guard.as_mut().expect("started above");
        if state.listed.contains(digest) {
            drop(guard);
            return open();
        }
        let lock_path = self.root.join(GC_LOCK);
        state.gc_lock.lock_shared().map_err(Error::io("lock", &lock_path))?;
        let line = format!("{}\n", digest.hex());
        let mut out: &File = state.file.file();
        let written = out.write_all(line.as_bytes());
        let result = match written {
            Ok(()) => {
                state.listed.insert(*digest);
                open()
            }
            Err(e) => Err(Error::io("write", state.file.path())(e)),
        };
        let _ = state.gc_lock.unlock();
        result
    }

    fn start(&self) -> std::io::Result<UsersState> {
        let dir = self.root.join(USERS_DIR);
        fs::create_dir_all(&dir)?;
        let gc_lock = open_gc_lock(&self.root)?;
        let file = TempFile::create(&dir, "users").map_err(std::io::Error::other)?;
        Ok(UsersState { file, gc_lock, listed: BTreeSet::new() })
    }
}

/// The digests that running processes have listed as in use in the store at `root` (their
/// registry files are locked); with `remove`, the files of processes that are gone are
/// removed. Call with `gc.lock` held exclusively (no file is being written).
pub(crate) fn layers_in_use(root: &Path, remove: bool) -> Result<BTreeSet<Digest>> {
    let dir = root.join(USERS_DIR);
    let stale: BTreeSet<PathBuf> = stale_temporaries(&dir, remove)?.into_iter().map(|s| s.path).collect();
    let mut used = BTreeSet::new();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(used),
        Err(e) => return Err(Error::io("list", &dir)(e)),
    };
    for entry in entries {
        let path = entry.map_err(Error::io("list", &dir))?.path();
        if stale.contains(&path) || !path.to_string_lossy().ends_with(".tmp") {
            continue;
        }
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // its process just ended
            Err(e) => return Err(Error::io("read", &path)(e)),
        };
        for line in text.lines() {
            let d = line
                .trim()
                .parse::<Digest>()
                .map_err(|_| Error::Invalid(format!("{}: {line:?} is not a layer digest", path.display())))?;
            used.insert(d);
        }
    }
    Ok(used)
}
