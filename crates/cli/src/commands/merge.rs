//! `mcow seal`, `mcow commit`, `mcow flatten`: merging the top and sealed layers into one new
//! sealed layer (`ops::seal`, `ops::merge`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use mcow_engine::{disk, ops};

use crate::Global;
use crate::progress::Progress;

/// Seal the writable top into a new sealed layer.
#[derive(Debug, clap::Args)]
#[command(long_about = "Seal the disk's writable top: its blocks become a new sealed layer on top of the \
    stack, and the disk gets a fresh, empty top. Prints the new layer's digest.\n\n\
    The disk must not be in use by another process. Sealed layers are immutable and named by \
    their content (sha256), so other disks can be created on them (`mcow create --from`).\n\n\
    A top that holds nothing (no data, no zero or discard marker) is not sealed: seal says so \
    on stderr, adds no layer, prints no digest and exits 0.")]
pub struct SealArgs {
    /// The disk directory.
    pub disk: PathBuf,
}

/// Merge the top and the N topmost sealed layers into one layer.
#[derive(Debug, clap::Args)]
#[command(long_about = "Merge the disk's writable top and its N topmost sealed layers (default 1) into one \
    new sealed layer that replaces them; the disk gets a fresh, empty top. Prints the new layer's \
    digest.\n\n\
    The replaced layers stay in the layer store (other disks may use them). `commit -n 0` is \
    `seal`; `commit -n <depth>` is `flatten`.")]
pub struct CommitArgs {
    /// The disk directory.
    pub disk: PathBuf,
    /// How many sealed layers (from the top) to merge with the writable top.
    #[arg(short = 'n', long, default_value_t = 1, value_name = "N")]
    pub layers: usize,
}

/// Merge everything into one sealed layer.
#[derive(Debug, clap::Args)]
#[command(long_about = "Merge the disk's writable top and all its sealed layers into a single sealed layer \
    that needs no other; the disk gets a fresh, empty top. Prints the new layer's digest.\n\n\
    The replaced layers stay in the layer store (other disks may use them).")]
pub struct FlattenArgs {
    /// The disk directory.
    pub disk: PathBuf,
}

fn merge(dir: &Path, n: usize, g: Global, label: &str, what: &str) -> Result<ExitCode> {
    if n == 0 {
        // An empty top would become an empty layer: one more level that changes nothing.
        let opts = mcow_engine::OpenOptions { read_only: true, verify: true, force_share: false };
        let engine = mcow_engine::Engine::default();
        let (disk, _) = crate::paths::open_lazy(&engine, dir, opts, crate::paths::Fetch::Offline)?;
        if disk.top().extents().is_empty() {
            eprintln!(
                "mcow: nothing to seal: the writable top of {} holds no writes; no layer added",
                dir.display()
            );
            return Ok(ExitCode::SUCCESS);
        }
    }
    // A lazily pulled disk fetches the missing blocks of the layers it merges from its origin.
    let source = match crate::paths::read_origin(dir)? {
        Some(origin) if n > 0 => {
            let reference = crate::paths::parse_reference(&origin.reference)
                .with_context(|| format!("the origin of disk {}", dir.display()))?;
            let remote = mcow_remote::open_remote(&reference)
                .with_context(|| format!("opening the origin {reference} of disk {}", dir.display()))?;
            let source: Arc<dyn mcow_engine::BlockSource> = Arc::new(mcow_remote::RemoteSource::new(remote));
            Some((source, mcow_engine::FetchPolicy::default()))
        }
        _ => None,
    };
    let mut progress = Progress::new(g, label);
    let mut update = |d, t| progress.update(d, t);
    let digest = if n == 0 {
        ops::seal(dir, &mut update)
    } else {
        ops::merge_with_source(dir, n, source, &mut update)
    }
    .with_context(|| format!("{what} disk {}", dir.display()))?;
    progress.finish();
    println!("{digest}");
    Ok(ExitCode::SUCCESS)
}

pub fn run_seal(a: SealArgs, g: Global) -> Result<ExitCode> {
    merge(&a.disk, 0, g, "sealing", "sealing")
}

pub fn run_commit(a: CommitArgs, g: Global) -> Result<ExitCode> {
    merge(&a.disk, a.layers, g, "committing", "committing")
}

pub fn run_flatten(a: FlattenArgs, g: Global) -> Result<ExitCode> {
    let m = disk::read_manifest(&a.disk).with_context(|| format!("reading disk {}", a.disk.display()))?;
    merge(&a.disk, m.layers.len(), g, "flattening", "flattening")
}
