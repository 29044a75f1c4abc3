//! The pool of open layer files, which keeps a deep stack within the process's open-file limit.
//!
//! Owns: how many layer files are open at once and which one is closed when the bound is
//! reached; a layer's place in the pool (`FileSlot`) opens its file again on its next use.
//! Does not own: what the files hold (see `layer`), where they are (see `store`), or how large
//! the bound is (the engine's configuration, see `context`).

use std::collections::VecDeque;
use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock, Weak};

use crate::error::{Error, Result};

/// Bounds how many layer files are open at once. Below the bound (the usual case) a file stays
/// open once opened and a read takes no lock but its layer's read lock; past it, the oldest
/// opened file is closed and reopened on its next use.
pub(crate) struct FilePool {
    cap: usize,
    opened: Mutex<VecDeque<Weak<SlotState>>>,
}

impl FilePool {
    /// A pool that keeps at most `cap` files open (an engine's; see `context`).
    pub(crate) fn new(cap: usize) -> FilePool {
        FilePool { cap: cap.max(1), opened: Mutex::new(VecDeque::new()) }
    }

    fn register(&self, slot: &Arc<SlotState>) {
        let mut opened = self.opened.lock().unwrap_or_else(|p| p.into_inner());
        opened.push_back(Arc::downgrade(slot));
        while opened.len() > self.cap {
            if let Some(old) = opened.pop_front().and_then(|w| w.upgrade()) {
                *old.file.write().unwrap_or_else(|p| p.into_inner()) = None;
            }
        }
    }
}

struct SlotState {
    file: RwLock<Option<Arc<File>>>,
}

/// One layer's place in the pool.
pub(crate) struct FileSlot {
    state: Arc<SlotState>,
    pool: Arc<FilePool>,
}

impl FileSlot {
    pub(crate) fn new(pool: &Arc<FilePool>) -> FileSlot {
        FileSlot { state: Arc::new(SlotState { file: RwLock::new(None) }), pool: pool.clone() }
    }

    /// The open file, opening it (and maybe closing another) if needed.
    pub(crate) fn get(&self, path: &Path) -> Result<Arc<File>> {
        if let Some(f) = self.state.file.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Ok(f.clone());
        }
        let f = Arc::new(File::open(path).map_err(Error::io("open", path))?);
        *self.state.file.write().unwrap_or_else(|p| p.into_inner()) = Some(f.clone());
        self.pool.register(&self.state);
        Ok(f)
    }
}
