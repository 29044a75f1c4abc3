//! `mcow import`: an image file becomes a new sealed layer and a new disk on it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use mcow_engine::{DEFAULT_BLOCK_SIZE, disk, ops};

use crate::Global;
use crate::output::human_size;
use crate::paths::{TempFile, default_store, file_stem, open_read_only, parent_dir};
use crate::progress::Progress;
use crate::qemu;
use crate::size::parse_size_u32;

/// Import an image file as a new sealed layer and create a disk on it.
#[derive(Debug, clap::Args)]
#[command(long_about = "Import the image SRC as a new sealed layer and create the disk DISK on it (with an \
    empty writable top). Prints the new layer's digest, then how much was stored.\n\n\
    Raw images are read directly; holes and all-zero blocks are never stored. Any other format \
    (qcow2, vmdk, vdi, vhdx, ...; `qemu-img info` detects it, -f overrides) is first converted \
    with `qemu-img convert -O raw` into a temporary sparse file beside DISK, removed afterwards.\n\n\
    With --parent DISK2, the new layer sits on DISK2's sealed layers (not its writable top) and \
    stores only the blocks that differ from them: this is how to turn successive full images \
    of the same machine into thin layers. The image must then be exactly DISK2's size; the \
    block size and layer store are DISK2's.")]
pub struct ImportArgs {
    /// The image file to import.
    pub src: PathBuf,
    /// Directory of the new disk (must not already hold a disk).
    pub disk: PathBuf,
    /// Format of SRC (raw, qcow2, vmdk, ...) [default: detected by qemu-img].
    #[arg(short = 'f', long, value_name = "FORMAT")]
    pub format: Option<String>,
    /// Store only what differs from this disk's sealed layers, and put the new disk on them.
    #[arg(long, value_name = "DISK2")]
    pub parent: Option<PathBuf>,
    /// Block size of the new layer [default: 64K].
    #[arg(short = 'b', long, value_parser = parse_size_u32, conflicts_with = "parent")]
    pub block_size: Option<u32>,
    /// Layer store directory [default: DISK/../layers].
    #[arg(long, value_name = "DIR", conflicts_with = "parent")]
    pub store: Option<PathBuf>,
}

pub fn run(a: ImportArgs, g: Global) -> Result<ExitCode> {
    if a.disk.join(disk::MANIFEST_FILE).exists() {
        bail!("importing into {}: it already holds a disk", a.disk.display());
    }
    if !a.src.exists() {
        bail!("importing {}: no such file", a.src.display());
    }
    let format = match &a.format {
        Some(f) => f.clone(),
        None => qemu::probe_format(&a.src)?,
    };
    let converted = if format == "raw" {
        None
    } else {
        let parent = parent_dir(&a.disk)?;
        std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
        let tmp = TempFile::new_in(&parent, &file_stem(&a.disk), "import");
        let show = Progress::shown(g);
        if show {
            eprintln!("Converting {} from {format} to raw...", a.src.display());
        }
        qemu::convert(&a.src, &format, tmp.path(), "raw", show)?;
        if show {
            eprintln!();
        }
        Some(tmp)
    };
    let raw = converted.as_ref().map_or(a.src.as_path(), TempFile::path);
    let store = match &a.store {
        Some(s) => s.clone(),
        None => default_store(&a.disk)?,
    };
    let opts = ops::ImportOptions {
        dir: &a.disk,
        store,
        block_size: a.block_size.unwrap_or(DEFAULT_BLOCK_SIZE),
        parent: a.parent.as_deref(),
    };
    let mut progress = Progress::new(g, "importing");
    let digest = ops::import_raw(raw, &opts, &mut |d, t| progress.update(d, t))
        .with_context(|| format!("importing {} into disk {}", a.src.display(), a.disk.display()))?;
    progress.finish();
    drop(converted); // removes the temporary raw file

    let disk = open_read_only(&a.disk, false)?;
    let stack = disk.stack();
    let layer = &stack.layers()[stack.depth() - 1];
    let blocks = layer.trailer.block_count;
    let bytes = blocks * u64::from(disk.block_size());
    println!("{digest}");
    println!(
        "Stored {bytes} bytes ({}, {blocks} blocks of {}) in a {} layer; disk {} has {} sealed layer{}.",
        human_size(bytes),
        human_size(u64::from(disk.block_size())),
        human_size(layer.file_len()),
        a.disk.display(),
        disk.stack().depth(),
        if disk.stack().depth() == 1 { "" } else { "s" }
    );
    Ok(ExitCode::SUCCESS)
}
