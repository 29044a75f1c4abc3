//! Paths and opening disks, with the context every error message at this edge carries.

use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result};
use mcow_engine::{Disk, OpenOptions};

/// `path` made absolute and cleaned of `.` and `..` components (without touching the
/// filesystem, so it works for paths that do not exist yet).
pub fn absolute_clean(path: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?;
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    Ok(out)
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

/// Opens a disk read-only (for info, map, export, read), with `force_share` like `-U`.
pub fn open_read_only(dir: &Path, force_share: bool) -> Result<Disk> {
    let opts = OpenOptions { read_only: true, verify: true, force_share };
    open(dir, opts)
}

/// Opens a disk, adding which disk and, where it helps, what to do.
pub fn open(dir: &Path, opts: OpenOptions) -> Result<Disk> {
    Disk::open(dir, opts).map_err(|e| {
        let hint = match &e {
            mcow_engine::Error::Locked { .. } if opts.read_only => {
                " (another process has it open for writing; -U/--force-share reads it anyway)"
            }
            _ => "",
        };
        anyhow::Error::new(e).context(format!("opening disk {}{hint}", dir.display()))
    })
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
