//! `mcow export`: a disk's content as a raw or qcow2 image.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use mcow_engine::ops;

use crate::Global;
use crate::paths::{TempFile, file_stem, open_read_only, parent_dir};
use crate::progress::Progress;
use crate::qemu;

/// Image formats `export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ExportFormat {
    /// A sparse raw image (zero ranges are left as holes).
    #[default]
    Raw,
    /// A qcow2 image, written by `qemu-img convert`.
    Qcow2,
}

/// Export a disk's content as an image file.
#[derive(Debug, clap::Args)]
#[command(long_about = "Write the disk's content (all layers and the writable top, as a guest sees it) to \
    the image file OUT, overwriting it.\n\n\
    raw: a sparse file; ranges that read as zeros are left as holes.\n\
    qcow2: the disk is first exported as raw to a temporary sparse file beside OUT, then \
    converted with `qemu-img convert -f raw -O qcow2` (qemu-img must be installed); the \
    temporary file is removed afterwards.")]
pub struct ExportArgs {
    /// The disk directory.
    pub disk: PathBuf,
    /// The image file to write.
    pub out: PathBuf,
    /// Output format.
    #[arg(short = 'O', long = "output-format", value_enum, default_value_t, value_name = "FORMAT")]
    pub format: ExportFormat,
    /// Export even if another process is writing to the disk: each block is one of its own
    /// values (at least as of the writer's last flush), never another block's, but blocks may
    /// come from different moments, so the whole may be inconsistent.
    #[arg(short = 'U', long)]
    pub force_share: bool,
}

pub fn run(a: ExportArgs, g: Global) -> Result<ExitCode> {
    let disk = open_read_only(&a.disk, a.force_share)?;
    let tmp;
    let raw_out = match a.format {
        ExportFormat::Raw => a.out.clone(),
        ExportFormat::Qcow2 => {
            tmp = TempFile::new_in(&parent_dir(&a.out)?, &file_stem(&a.out), "export");
            tmp.path().to_path_buf()
        }
    };
    let mut progress = Progress::new(g, "exporting");
    ops::export_raw(&disk, &raw_out, &mut |d, t| progress.update(d, t))
        .with_context(|| format!("exporting disk {} to {}", a.disk.display(), raw_out.display()))?;
    progress.finish();
    drop(disk);
    if a.format == ExportFormat::Qcow2 {
        let show = Progress::shown(g);
        qemu::convert(&raw_out, "raw", &a.out, "qcow2", show)?;
        if show {
            eprintln!();
        }
    }
    Ok(ExitCode::SUCCESS)
}
