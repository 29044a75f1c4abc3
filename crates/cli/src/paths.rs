//! Paths, references and opening disks, with the context every error message at this edge
//! carries. Owns the process's list of insecure registries (set once by `main`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result};
use mcow_engine::{Disk, Engine, FetchPolicy, OpenOptions};
use mcow_remote::transfer::{FetchStats, Sources};
use mcow_remote::transfer::{LazyOrigin, ORIGIN_FILE};
use mcow_remote::{InsecureRegistries, Reference};

/// `path` made absolute and cleaned of `.` and `..` components (without touching the
/// filesystem, so it works for paths that do not exist yet).
pub fn absolute_clean(path: &Path) -> Result<PathBuf> {
    mcow_engine::disk::absolute_clean(path).with_context(|| format!("resolving {}", path.display()))
}

/// The directory that holds `path` (absolute), for default stores and temporary files.
pub fn parent_dir(path: &Path) -> Result<PathBuf> {
    let abs = absolute_clean(path)?;
    Ok(abs.parent().map(Path::to_path_buf).unwrap_or(abs))
}

/// The default layer store of a new disk: `layers` beside the disk directory.
pub fn default_store(disk: &Path) -> Result<PathBuf> {
    Ok(parent_dir(disk)?.join("layers"))
}

/// The registries `oci://` reaches over plain HTTP: set once by `main` from
/// `--insecure-registry` and `MCOW_INSECURE_REGISTRIES` before any verb runs, read-only after.
static INSECURE: OnceLock<InsecureRegistries> = OnceLock::new();

/// Sets the insecure registries (the first call wins; `main` makes the only one).
pub fn set_insecure_registries(insecure: InsecureRegistries) {
    let _ = INSECURE.set(insecure);
}

pub fn insecure_registries() -> &'static InsecureRegistries {
    INSECURE.get_or_init(InsecureRegistries::default)
}

/// Parses a reference the way every verb does (with the insecure registries).
pub fn parse_reference(text: &str) -> Result<Reference> {
    Reference::parse_with(text, insecure_registries()).map_err(anyhow::Error::new)
}

/// A new set of remote sources that parses origins the way every verb does.
pub fn new_sources() -> Sources {
    Sources::with_insecure(insecure_registries().clone())
}

/// How a disk pulled lazily (one with a `remote.json`) gets the blocks it does not hold yet.
#[derive(Clone, Copy)]
pub enum Fetch<'a> {
    /// Never: the verb only looks at the disk's structure (info, map); nothing is fetched and
    /// the remote need not be reachable.
    Offline,
    /// From the disk's origin, as the policy says, through the source `sources` holds for it
    /// (shared with the other disks of that origin opened through the same `Sources`).
    Remote(FetchPolicy, &'a Sources),
}

/// Opens a disk read-only (for info, map, export, read), with `force_share` like `-U`. A lazy
/// disk's missing blocks are fetched from its origin.
pub fn open_read_only(dir: &Path, force_share: bool) -> Result<Disk> {
    let opts = OpenOptions { read_only: true, verify: true, force_share };
    open(dir, opts)
}

/// Opens a disk, adding which disk and, where it helps, what to do. A lazy disk's missing
/// blocks are fetched from its origin (with the default [`FetchPolicy`], through a source of
/// its own: the verbs that use this open one disk).
pub fn open(dir: &Path, opts: OpenOptions) -> Result<Disk> {
    let sources = new_sources();
    Ok(open_lazy(&Engine::default(), dir, opts, Fetch::Remote(FetchPolicy::default(), &sources))?.0)
}

/// Opens a disk in `engine`; if it was pulled lazily, its partial layers fetch as `fetch` says.
/// Returns the remote source too (for its statistics) when there is one.
pub fn open_lazy(
    engine: &Engine,
    dir: &Path,
    opts: OpenOptions,
    fetch: Fetch<'_>,
) -> Result<(Disk, Option<FetchStats>)> {
    let hint = |locked: bool| {
        if locked && opts.read_only {
            " (another process has it open for writing; -U/--force-share reads it anyway)"
        } else {
            ""
        }
    };
    let fail = |e: anyhow::Error, locked: bool| {
        with_disk_hint(e.context(format!("opening disk {}{}", dir.display(), hint(locked))), dir)
    };
    let lazy = dir.join(ORIGIN_FILE).exists();
    match fetch {
        Fetch::Remote(policy, sources) if lazy => {
            sources.open_lazy_disk(engine, dir, opts, policy).map_err(|e| {
                let locked = matches!(e, mcow_remote::RemoteError::Engine(mcow_engine::Error::Locked { .. }));
                fail(anyhow::Error::new(e), locked)
            })
        }
        _ => {
            let opened = if lazy {
                let offline = Arc::new(mcow_engine::Offline);
                Disk::open_with_source_in(engine, dir, opts, offline, FetchPolicy::default())
            } else {
                Disk::open_in(engine, dir, opts)
            };
            opened.map(|d| (d, None)).map_err(|e| {
                let locked = matches!(e, mcow_engine::Error::Locked { .. });
                fail(anyhow::Error::new(e), locked)
            })
        }
    }
}

/// `e`, a failure to use `path` as a disk, with a hint on top when `path` is a file.
pub fn with_disk_hint(e: anyhow::Error, path: &Path) -> anyhow::Error {
    match not_a_disk_hint(path) {
        Some(h) => e.context(h),
        None => e,
    }
}

/// What to say when `path`, given as a disk, is a file: a disk is a directory, and an image
/// file (qcow2 above all, which `qemu-img` users will reach for) is made into one by import.
fn not_a_disk_hint(path: &Path) -> Option<String> {
    use std::io::Read;
    if !path.is_file() {
        return None;
    }
    let mut magic = [0u8; 4];
    let qcow2 =
        std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && magic == *b"QFI\xfb";
    let p = path.display();
    Some(if qcow2 {
        format!(
            "{p} is a qcow2 image, not an mcow disk (a disk is a directory): \
             `mcow import {p} DISK` makes a disk of it"
        )
    } else {
        format!(
            "{p} is a file, not an mcow disk (a disk is a directory): \
             `mcow import {p} DISK` makes a disk of an image file"
        )
    })
}

/// The origin of a disk pulled lazily (its `remote.json`), or `None` for any other disk.
pub fn read_origin(dir: &Path) -> Result<Option<LazyOrigin>> {
    let path = dir.join(ORIGIN_FILE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(anyhow::Error::new(e).context(format!("reading {}", path.display()))),
    };
    let origin = serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(Some(origin))
}

/// A file removed when this guard is dropped (temporary images for import and export).
pub struct TempFile(pub PathBuf);

impl TempFile {
    /// A fresh, not yet existing name `.<stem>.<what>-<pid>[-n].raw` in `dir`.
    pub fn new_in(dir: &Path, stem: &str, what: &str) -> TempFile {
        let pid = std::process::id();
        let mut n = 0u32;
        loop {
            let name = if n == 0 {
                format!(".{stem}.{what}-{pid}.raw")
            } else {
                format!(".{stem}.{what}-{pid}-{n}.raw")
            };
            let p = dir.join(name);
            if !p.exists() {
                return TempFile(p);
            }
            n += 1;
        }
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.0) {
            Ok(()) => tracing::debug!(path = %self.0.display(), "removed temporary file"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %self.0.display(), error = %e, "could not remove temporary file"),
        }
    }
}

/// The last component of `path` as a string, for naming temporary files.
pub fn file_stem(path: &Path) -> String {
    path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "mcow".into())
}
