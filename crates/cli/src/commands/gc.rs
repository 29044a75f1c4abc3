//! `mcow gc`: removes what no disk or running process references from a cache or a layer store.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use mcow_engine::gc::{GcOptions, collect};

use crate::Global;
use crate::output::human_size;

/// Remove unreferenced layers, partial layers and (with --disks) unused cache disks.
#[derive(Debug, clap::Args)]
#[command(long_about = "Remove what nothing references from a cache (a --cache directory of `mcow serve`: \
    CACHE/layers and CACHE/disks) or from a layer store (blobs/ and partial/): complete layers, \
    partial (lazily fetched) layers and their sidecars.\n\n\
    Referenced are the layers named by the manifests of the disks in CACHE/disks, of the disks \
    beside the store (the subdirectories of its parent directory: a store made by `mcow create` \
    is `layers` beside its disks), and of every --keep DISK, when they name this store; and every \
    layer a running mcow process has opened from this store (each process lists them in \
    STORE/users/, in a file it holds locked while it lives). A disk elsewhere that uses the store \
    and is not running must be named with --keep, or its layers are removed.\n\n\
    Cache disks (CACHE/disks/NAME-DIGEST, made by `mcow serve REF`) are references themselves \
    and are kept, unless --disks: then those no running process has open (their top's lock is \
    free) are removed too, and the layers only they referenced with them; a later serve of the \
    image pulls it again.\n\n\
    Safe beside running servers and pulls: gc holds STORE/gc.lock exclusively while it works, \
    which every process adding files to the store holds shared from its first new file until \
    it has named it in a manifest (gc waits up to 10 s for them, then fails, removing nothing), \
    and which a process takes shared while it lists a layer it opens. Prints one line per item \
    removed (or, with --dry-run, that would be removed): KIND PATH, KIND one of cache-disk, \
    layer, partial.\n\n\
    Examples:\n  mcow gc --dry-run /var/cache/mcow\n  mcow gc --disks /var/cache/mcow")]
pub struct GcArgs {
    /// The cache or layer store directory.
    pub dir: PathBuf,
    /// List what would be removed; remove nothing.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// Also remove the cache disks (CACHE/disks/*) that no running process has open.
    #[arg(long)]
    pub disks: bool,
    /// A disk elsewhere whose layers must be kept (repeatable).
    #[arg(long, value_name = "DISK")]
    pub keep: Vec<PathBuf>,
}

pub fn run(args: GcArgs, _g: Global) -> Result<ExitCode> {
    let opts = GcOptions {
        dry_run: args.dry_run,
        disks: args.disks,
        keep: args.keep.clone(),
        ..GcOptions::default()
    };
    let report = collect(&args.dir, &opts).with_context(|| format!("collecting {}", args.dir.display()))?;
    let mut bytes = 0;
    for (g, b) in &report.garbage {
        println!("{} {}", g.kind(), g.path().display());
        bytes += b;
    }
    for d in &report.disks_in_use {
        eprintln!("mcow: kept {} (a running process has it open)", d.display());
    }
    let verb = if args.dry_run { "would remove" } else { "removed" };
    eprintln!("mcow: {verb} {} items, {}", report.garbage.len(), human_size(bytes));
    Ok(ExitCode::SUCCESS)
}
