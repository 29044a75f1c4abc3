//! Garbage collection of a layer store (`mcow gc`): removing the layers, partial layers and
//! cache disks that nothing references, safely beside running processes, by locks.
//!
//! Owns: [`collect`], which finds what is unreferenced and removes it (a layer only if no
//! running process lists it in the store's registry, under an exclusive `gc.lock`, see
//! `users`; a partial layer also only if its in-use lock is free, see `lock`). Does not own: the
//! files' layouts (see `store`, `disk`), nor the lock and the registry (`users`).

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use mcow_format::Digest;

use crate::error::{Error, Result};
use crate::users::{GC_LOCK, layers_in_use, open_gc_lock};

/// What `collect` removes (or, dry, would remove).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Garbage {
    /// A cache disk (a directory of `CACHE/disks`) no running process has open, or the debris of
    /// an interrupted pull there (no manifest).
    CacheDisk(PathBuf),
    /// A complete layer (`blobs/sha256/<hex>`).
    Layer(PathBuf),
    /// A partial layer (`partial/sha256/<hex>`, with its `.chunks` and `.frames` sidecars), or
    /// a sidecar left without its partial file.
    Partial(PathBuf),
}

impl Garbage {
    /// The file or directory to remove.
    pub fn path(&self) -> &Path {
        match self {
            Garbage::CacheDisk(p) | Garbage::Layer(p) | Garbage::Partial(p) => p,
        }
    }

    /// What it is, as `mcow gc` prints it: `cache-disk`, `layer` or `partial`.
    pub fn kind(&self) -> &'static str {
        match self {
            Garbage::CacheDisk(_) => "cache-disk",
            Garbage::Layer(_) => "layer",
            Garbage::Partial(_) => "partial",
        }
    }
}

/// What `collect` is asked to do.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// List what would be removed; remove nothing.
    pub dry_run: bool,
    /// Also remove the cache disks (`CACHE/disks/*` pulled from an origin) that no running
    /// process has open, and so the layers only they referenced.
    pub disks: bool,
    /// More disks whose layers count as referenced (disks elsewhere that use the store).
    pub keep: Vec<PathBuf>,
    /// How long to wait for processes adding files to the store (their lease) before failing.
    pub lock_wait: std::time::Duration,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions { dry_run: false, disks: false, keep: Vec::new(), lock_wait: LOCK_WAIT }
    }
}

/// What `collect` found.
#[derive(Debug, Clone, Default)]
pub struct GcReport {
    /// The store collected.
    pub store: PathBuf,
    /// Removed (or, dry, to be removed), sorted, with the bytes each held on disk.
    pub garbage: Vec<(Garbage, u64)>,
    /// Cache disks kept because a running process has them open.
    pub disks_in_use: Vec<PathBuf>,
}

/// How long `collect` waits by default for processes adding files to the store to finish.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Collects the store of `dir`: a cache (`dir/layers` and `dir/disks`) or a layer store
/// (`blobs/`, `partial/`). Referenced are the layers of the disks in `dir/disks`, of the disks
/// beside the store (its parent directory's subdirectories: the default layout) and of
/// `opts.keep`, whose manifests name this store, and the layers running processes have listed
/// as in use. With `opts.disks`, the cache disks no running process has open (their top's lock
/// is free) are removed first and reference nothing. Everything else in `blobs/` and `partial/`
/// is garbage. Holds the store's `gc.lock` exclusively throughout (waiting up to 10 s for
/// processes that are adding files). A manifest that cannot be read fails it, removing nothing.
pub fn collect(dir: &Path, opts: &GcOptions) -> Result<GcReport> {
    let cache = dir.join("layers").is_dir().then(|| dir.to_path_buf());
    let store = cache.as_ref().map_or_else(|| dir.to_path_buf(), |c| c.join("layers"));
    if !store.join("blobs").is_dir() && !store.join("partial").is_dir() {
        return Err(Error::Invalid(format!(
            "{}: neither a cache (with layers/) nor a layer store (with blobs/ or partial/)",
            dir.display()
        )));
    }
    let canon = |p: &Path| fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let store_canon = canon(&store);
    let lock = open_gc_lock(&store).map_err(Error::io("open", store.join(GC_LOCK)))?;
    let since = std::time::Instant::now();
    loop {
        match lock.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) if since.elapsed() < opts.lock_wait => {
                std::thread::sleep(std::time::Duration::from_millis(50))
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::Invalid(format!(
                    "{}: another process is adding layers to this store (a pull, import or seal); try again when it is done",
                    store.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io("lock", store.join(GC_LOCK))(e)),
        }
    }
    // The disks that may reference the store.
    let mut disks: Vec<(PathBuf, bool)> = Vec::new(); // (dir, is a cache disk)
    let subdirs = |d: &Path| -> Result<Vec<PathBuf>> {
        match fs::read_dir(d) {
            Ok(entries) => {
                let mut out = Vec::new();
                for e in entries {
                    let p = e.map_err(Error::io("list", d))?.path();
                    if p.is_dir() {
                        out.push(p);
                    }
                }
                out.sort();
                Ok(out)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(Error::io("list", d)(e)),
        }
    };
    if let Some(c) = &cache {
        disks.extend(subdirs(&c.join("disks"))?.into_iter().map(|p| (p, true)));
    }
    if let Some(parent) = store_canon.parent() {
        for p in subdirs(parent)? {
            if p.join(crate::disk::MANIFEST_FILE).is_file() {
                disks.push((p, false));
            }
        }
    }
    disks.extend(opts.keep.iter().map(|p| (p.clone(), false)));
    let mut seen = BTreeSet::new();
    disks.retain(|(p, _)| seen.insert(canon(p)));

    let mut report = GcReport { store: store.clone(), ..GcReport::default() };
    let mut referenced: BTreeSet<Digest> = BTreeSet::new();
    let mut doomed: Vec<(PathBuf, Option<File>)> = Vec::new(); // cache disks, with their top locked
    for (d, is_cache) in &disks {
        let manifest_path = d.join(crate::disk::MANIFEST_FILE);
        if !manifest_path.exists() {
            if *is_cache && opts.disks {
                doomed.push((d.clone(), None)); // debris of an interrupted pull (none runs now)
            } else if !*is_cache {
                return Err(Error::Invalid(format!(
                    "{}: not a disk (no {})",
                    d.display(),
                    crate::disk::MANIFEST_FILE
                )));
            }
            continue;
        }
        let m = crate::disk::read_manifest(d)?;
        if canon(&crate::disk::resolve_store(d, &m)) != store_canon {
            continue;
        }
        let removable = *is_cache && opts.disks && d.join("remote.json").is_file();
        if removable {
            match lock_top(d, &m)? {
                Some(held) => {
                    doomed.push((d.clone(), held));
                    continue;
                }
                None => report.disks_in_use.push(d.clone()),
            }
        }
        referenced.extend(m.layers.iter().copied());
    }
    referenced.extend(layers_in_use(&store, !opts.dry_run)?);

    for (d, _) in &doomed {
        report.garbage.push((Garbage::CacheDisk(d.clone()), allocated_tree(d)));
    }
    // Complete layers.
    for path in files(&store.join("blobs/sha256"))? {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.parse::<Digest>().is_ok_and(|d| !referenced.contains(&d)) {
            report.garbage.push((Garbage::Layer(path.clone()), allocated(&path)));
        }
    }
    // Partial layers and their sidecars (named `<hex>`, `<hex>.chunks`, `<hex>.frames`). A
    // partial layer some process has open holds its in-use lock (see `lock::IN_USE`): it is
    // kept even if unlisted; the others are locked exclusively until they are removed, so that
    // a process opening one meanwhile waits, then finds it gone.
    let partials = files(&store.join("partial/sha256"))?;
    let mut held = Vec::new();
    for path in &partials {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let Ok(d) = name.parse::<Digest>() else { continue };
        if referenced.contains(&d) {
            continue;
        }
        match lock_partial(path)? {
            Some(f) => held.push(f),
            None => {
                referenced.insert(d);
            }
        }
    }
    for path in partials {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let hex = name.split('.').next().unwrap_or_default();
        if hex.parse::<Digest>().is_ok_and(|d| !referenced.contains(&d)) {
            report.garbage.push((Garbage::Partial(path.clone()), allocated(&path)));
        }
    }
    report.garbage.sort();
    report.disks_in_use.sort();
    if opts.dry_run {
        return Ok(report);
    }
    for (g, _) in &report.garbage {
        let removed = match g {
            Garbage::CacheDisk(d) => fs::remove_dir_all(d),
            Garbage::Layer(p) | Garbage::Partial(p) => fs::remove_file(p),
        };
        match removed {
            Ok(()) => tracing::info!(kind = g.kind(), path = %g.path().display(), "removed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove", g.path())(e)),
        }
    }
    for sub in ["blobs/sha256", "partial/sha256"] {
        let d = store.join(sub);
        if d.is_dir() {
            crate::store::sync_dir(&d)?;
        }
    }
    drop((doomed, held));
    drop(lock);
    Ok(report)
}

/// Locks the writable top of disk `d` exclusively, as a writer opening it would; `None` if a
/// running process has it open (the lock is held), `Some(None)` for a disk without a top.
fn lock_top(d: &Path, m: &mcow_format::DiskManifest) -> Result<Option<Option<File>>> {
    let Some(top) = &m.top else { return Ok(Some(None)) };
    let path = d.join(top);
    let f = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some(None)),
        Err(e) => return Err(Error::io("open", &path)(e)),
    };
    match f.try_lock() {
        Ok(()) => Ok(Some(Some(f))),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io("lock", &path)(e)),
    }
}

/// Takes the in-use lock of the partial layer file at `path` exclusively (see `lock::IN_USE`):
/// the file, holding it, or `None` if a process has the layer open. A filesystem without
/// byte-range locks gives the file unlocked (the registry of layers in use still holds).
fn lock_partial(path: &Path) -> Result<Option<File>> {
    use crate::lock::{IN_USE, LockError, LockType, hold};
    let f = File::options().read(true).write(true).open(path).map_err(Error::io("open", path))?;
    match hold(&f, LockType::Write, IN_USE.0, IN_USE.1, false) {
        Ok(()) | Err(LockError::Unsupported(_)) => Ok(Some(f)),
        Err(LockError::Held) => Ok(None),
        Err(e) => Err(Error::io("lock", path)(e.into())),
    }
}

/// The regular files in `dir` (none if it does not exist), sorted.
fn files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list", dir)(e)),
    };
    let mut out = Vec::new();
    for e in entries {
        let p = e.map_err(Error::io("list", dir))?.path();
        if p.is_file() {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(path).map_or(0, |m| m.blocks() * 512)
}

fn allocated_tree(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else { return allocated(dir) };
    entries
        .filter_map(|e| e.ok())
        .map(|e| {
            let p = e.path();
            if p.is_dir() { allocated_tree(&p) } else { allocated(&p) }
        })
        .sum()
}
