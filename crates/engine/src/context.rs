//! The engine context: the state that disks opened together share, in one value the caller
//! creates and passes on, instead of process-wide statics.
//!
//! Owns: the pool of open layer files (its size from [`EngineConfig`]), the registry of the
//! layers open in this context (so that disks on the same layers share one verified bitmap and
//! one fetch state), the background fetch threads, which [`Engine::stop_background`] stops
//! and joins, one block index per store for block reuse (see `reuse`), and, with a cache limit,
//! one bounded cache per store (see `cache`), and its entry in each store's registry of layers in
//! use (see `gc`). Does not own:
//! raising the process's open-file limit (the binary decides that, before it makes its engine),
//! opening disks or layers (see `disk`, `store`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use crate::background::Background;
use crate::cache::{CacheStats, FetchedCache};
use crate::fetch::PartialLayer;
use crate::layer::SealedLayer;
use crate::pool::FilePool;
use crate::reuse::{BlockIndex, ReuseStats};
use crate::users::StoreUsers;

/// How an [`Engine`] is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Layer files kept open at once at most; past it, the least recently opened one is closed
    /// and reopened on its next use. At least 16.
    pub max_open_files: usize,
    /// The most bytes of fetched blocks the partial layers of one store may hold (`mcow serve
    /// --cache-limit`): past it, the least recently used fetched blocks are dropped and fetched
    /// again when read (see `cache`). Each store the engine opens partial layers in has its own
    /// count. `None`: no limit. Blocks of complete layers and writable tops never count.
    pub cache_limit: Option<u64>,
}

impl EngineConfig {
    /// Descriptors the default leaves to everything else (sockets, tops, journals, stdio).
    pub const RESERVED_FILES: usize = 128;
}

impl Default for EngineConfig {
    /// The process's current soft open-file limit less [`EngineConfig::RESERVED_FILES`]: the
    /// limit is per process, so one engine per process should draw on it. (It reads the limit
    /// and changes nothing; a binary that wants more raises it first.)
    fn default() -> Self {
        use rustix::process::{Resource, getrlimit};
        let soft = getrlimit(Resource::Nofile).current.unwrap_or(1 << 20);
        let soft = usize::try_from(soft).unwrap_or(usize::MAX);
        EngineConfig { max_open_files: soft.saturating_sub(Self::RESERVED_FILES), cache_limit: None }
    }
}

/// What names an open layer in the registry: its canonical path, whether reads verify, and the
/// identity of its block source (0 for none).
pub(crate) type LayerKey = (PathBuf, bool, usize);

/// A registry entry: the layer, without keeping it open.
pub(crate) enum WeakLayer {
    Complete(Weak<SealedLayer>),
    Partial(Weak<PartialLayer>),
}

impl WeakLayer {
    pub(crate) fn is_alive(&self) -> bool {
        match self {
            WeakLayer::Complete(w) => w.strong_count() > 0,
            WeakLayer::Partial(w) => w.strong_count() > 0,
        }
    }
}

/// State shared by the disks opened in it: the file pool, the open layers, the background
/// fetches. Cheap to clone (one `Arc`); disks opened with clones of one engine share it. A
/// process that serves several disks makes one and, before it exits, calls
/// [`Engine::stop_background`]. [`crate::Disk::open`] makes one of its own for its disk.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    config: EngineConfig,
    pool: Arc<FilePool>,
    open: Mutex<HashMap<LayerKey, WeakLayer>>,
    background: Arc<Background>,
    /// The block index of each store (by canonical root) that partial layers were opened in.
    reuse: Mutex<HashMap<PathBuf, Arc<BlockIndex>>>,
    /// With a cache limit: the bounded cache of each store (by canonical root).
    caches: Mutex<HashMap<PathBuf, Arc<FetchedCache>>>,
    /// This process's entry in the registry of layers in use of each store (see `gc`).
    users: Mutex<HashMap<PathBuf, Arc<StoreUsers>>>,
}

impl Engine {
    /// An engine configured by `config` (at least 16 open files).
    pub fn new(config: EngineConfig) -> Engine {
        let config = EngineConfig { max_open_files: config.max_open_files.max(16), ..config };
        Engine {
            inner: Arc::new(Inner {
                config,
                pool: Arc::new(FilePool::new(config.max_open_files)),
                open: Mutex::new(HashMap::new()),
                background: Arc::default(),
                reuse: Mutex::default(),
                caches: Mutex::default(),
                users: Mutex::default(),
            }),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// Lets no new fetch start on a thread of its own (read-ahead) and waits up to `limit` for
    /// the running ones to finish, then joins them, so that a process about to exit has landed
    /// every block it fetched. Returns false if some were still running. Reads that would start
    /// read-ahead afterwards fetch on their own thread instead.
    pub fn stop_background(&self, limit: Duration) -> bool {
        self.inner.background.stop(limit)
    }

    /// Whether two handles are the same engine.
    pub fn same(&self, other: &Engine) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    pub(crate) fn pool(&self) -> &Arc<FilePool> {
        &self.inner.pool
    }

    pub(crate) fn background(&self) -> &Arc<Background> {
        &self.inner.background
    }

    /// The block index of the store at `root` (one per store and engine, built at its first
    /// use; see `reuse`).
    pub(crate) fn block_index(&self, root: &Path) -> Arc<BlockIndex> {
        let root = canonical(root);
        let mut map = self.inner.reuse.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(root.clone())
            .or_insert_with(|| Arc::new(BlockIndex::new(root, self.inner.pool.clone())))
            .clone()
    }

    /// This engine's entry in the registry of layers in use of the store at `root` (see `gc`).
    pub(crate) fn store_users(&self, root: &Path) -> Arc<StoreUsers> {
        let root = canonical(root);
        let mut map = self.inner.users.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(root.clone()).or_insert_with(|| Arc::new(StoreUsers::new(&root))).clone()
    }

    /// The bounded cache of the store at `root` (one per store and engine), if the engine has a
    /// cache limit.
    pub(crate) fn fetched_cache(&self, root: &Path) -> Option<Arc<FetchedCache>> {
        let limit = self.inner.config.cache_limit?;
        let mut map = self.inner.caches.lock().unwrap_or_else(|p| p.into_inner());
        Some(map.entry(canonical(root)).or_insert_with(|| Arc::new(FetchedCache::new(limit))).clone())
    }

    /// What the bounded caches hold and have dropped, over all stores (`None` without a cache
    /// limit; the limit reported is the per-store limit).
    pub fn cache_stats(&self) -> Option<CacheStats> {
        let limit = self.inner.config.cache_limit?;
        let map = self.inner.caches.lock().unwrap_or_else(|p| p.into_inner());
        Some(map.values().map(|c| c.stats()).fold(CacheStats { limit, ..CacheStats::default() }, |a, s| {
            CacheStats {
                limit,
                bytes: a.bytes + s.bytes,
                dropped_blocks: a.dropped_blocks + s.dropped_blocks,
                dropped_bytes: a.dropped_bytes + s.dropped_bytes,
            }
        }))
    }

    /// Layer `digest` of the store at `root` is now complete at `path`: if the store's block
    /// index was built already, its blocks are added (else the build will find them).
    pub(crate) fn layer_added(&self, root: &Path, digest: &mcow_format::Digest, path: &Path) {
        let root = canonical(root);
        let index = self.inner.reuse.lock().unwrap_or_else(|p| p.into_inner()).get(&root).cloned();
        if let Some(index) = index {
            index.add_complete(digest, path);
        }
    }

    /// The blocks partial layers opened in this engine copied from other local layers of their
    /// store instead of fetching them (block reuse), over all stores.
    pub fn reuse_stats(&self) -> ReuseStats {
        let map = self.inner.reuse.lock().unwrap_or_else(|p| p.into_inner());
        map.values().map(|i| i.stats()).fold(ReuseStats::default(), |a, s| ReuseStats {
            blocks: a.blocks + s.blocks,
            bytes: a.bytes + s.bytes,
        })
    }

    /// The registry of open layers (entries whose layer is gone are pruned as layers are added).
    pub(crate) fn open_layers(&self) -> MutexGuard<'_, HashMap<LayerKey, WeakLayer>> {
        self.inner.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `path` made canonical where it can be (so that two spellings of one store name one index).
fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).or_else(|_| std::path::absolute(path)).unwrap_or(path.into())
}

impl Default for Engine {
    /// An engine with [`EngineConfig::default`].
    fn default() -> Self {
        Engine::new(EngineConfig::default())
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("config", &self.inner.config).finish_non_exhaustive()
    }
}
