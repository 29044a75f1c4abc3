//! `mcow export`: a disk's content as a raw or qcow2 image, or (`--chain`) as a qcow2 backing
//! chain of one image per layer. Output appears only once complete: it is written under a
//! temporary name beside it and renamed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use mcow_engine::{Disk, ops};
use mcow_format::ExtentKind;

use crate::Global;
use crate::paths::{TempFile, file_stem, open_read_only, parent_dir};
use crate::progress::Progress;
use crate::qcow2;
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

/// Export a disk's content as an image file, or its layers as a qcow2 backing chain.
#[derive(Debug, clap::Args)]
#[command(long_about = "Write the disk's content (all layers and the writable top, as a guest sees it) to \
    the image file OUT, replacing it. OUT appears only when complete: it is written under a \
    temporary name beside it (.NAME.part-PID) and renamed; on failure nothing is left.\n\n\
    raw: a sparse file; ranges that read as zeros are left as holes.\n\
    qcow2: the disk is first exported as raw to a temporary sparse file beside OUT, then \
    converted with `qemu-img convert -f raw -O qcow2` (qemu-img must be installed); the \
    temporary file is removed afterwards. Progress (-p) covers both steps in one display.\n\n\
    With --chain, OUT is a directory (new, or empty) that receives a qcow2 backing chain with \
    one image per layer: layer-01.qcow2 is the bottom sealed layer, layer-02.qcow2 the one on \
    it, and so on, then top.qcow2 for the writable top if it holds anything (or if the disk \
    has no sealed layer). Each image holds only its layer's own blocks: data clusters, zero \
    clusters for its zero and discard markers, the rest unallocated; each is backed by the \
    one below it (a name relative to the directory, backing format qcow2), so \
    `qemu-img info --backing-chain` of the last one shows the whole stack, and the last one, \
    whose path is printed, reads as the disk. The cluster size is the disk's block size. The \
    images are written by mcow itself (qemu-img is not needed), into a temporary directory \
    beside OUT that is renamed to OUT when complete.")]
pub struct ExportArgs {
    /// The disk directory.
    pub disk: PathBuf,
    /// The image file to write (with --chain: the directory).
    pub out: PathBuf,
    /// Output format.
    #[arg(short = 'O', long = "output-format", value_enum, default_value_t, value_name = "FORMAT")]
    pub format: ExportFormat,
    /// Export each layer as its own qcow2 image, backed by the one below, into the directory OUT.
    #[arg(long, conflicts_with = "format")]
    pub chain: bool,
    /// Export even if another process is writing to the disk: each block is one of its own
    /// values (at least as of the writer's last flush), never another block's, but blocks may
    /// come from different moments, so the whole may be inconsistent.
    #[arg(short = 'U', long)]
    pub force_share: bool,
}

pub fn run(a: ExportArgs, g: Global) -> Result<ExitCode> {
    if a.chain {
        return run_chain(&a, g);
    }
    let disk = open_read_only(&a.disk, a.force_share)?;
    let dir = parent_dir(&a.out)?;
    let part = TempFile(fresh_name(&dir, &format!(".{}.part", file_stem(&a.out))));
    let size = disk.size();
    let mut progress = Progress::new(g, "exporting");
    match a.format {
        ExportFormat::Raw => {
            ops::export_raw(&disk, part.path(), &mut |d, t| progress.update(d, t))
                .with_context(|| format!("exporting disk {} to {}", a.disk.display(), a.out.display()))?;
        }
        ExportFormat::Qcow2 => {
            // One display for both steps, over the disk's size: the raw export is its first
            // half, qemu-img's conversion (its own -p progress, read back) the second.
            let raw = TempFile::new_in(&dir, &file_stem(&a.out), "export");
            ops::export_raw(&disk, raw.path(), &mut |d, t| progress.update(d / 2, t)).with_context(|| {
                format!("exporting disk {} to {}", a.disk.display(), raw.path().display())
            })?;
            drop(disk);
            let mut report = |d: u64, t: u64| {
                let converted = (u128::from(size) * u128::from(d) / u128::from(t.max(1))) as u64;
                progress.update(size / 2 + converted / 2, size);
            };
            let shown = Progress::shown(g).then_some(&mut report as &mut dyn FnMut(u64, u64));
            qemu::convert(raw.path().as_os_str(), Some("raw"), part.path(), "qcow2", shown)?;
        }
    }
    std::fs::rename(part.path(), &a.out)
        .with_context(|| format!("renaming {} to {}", part.path().display(), a.out.display()))?;
    progress.finish();
    Ok(ExitCode::SUCCESS)
}

/// A name `NAME-PID[-n]` in `dir` that nothing has yet.
fn fresh_name(dir: &Path, name: &str) -> PathBuf {
    let pid = std::process::id();
    (0u32..)
        .map(
            |n| {
                if n == 0 { dir.join(format!("{name}-{pid}")) } else { dir.join(format!("{name}-{pid}-{n}")) }
            },
        )
        .find(|p| !p.exists())
        .expect("some name is free")
}

/// A directory removed, with what it holds, when this guard is dropped unless `keep` was called.
struct TempDir(Option<PathBuf>);

impl TempDir {
    fn keep(&mut self) {
        self.0 = None;
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(p) = &self.0
            && let Err(e) = std::fs::remove_dir_all(p)
        {
            tracing::warn!(path = %p.display(), error = %e, "could not remove temporary directory");
        }
    }
}

/// The file name of the image of layer `id` in an exported chain.
fn image_name(id: ops::LayerId) -> String {
    match id {
        ops::LayerId::Sealed(i) => format!("layer-{:02}.qcow2", i + 1),
        ops::LayerId::Top => "top.qcow2".into(),
    }
}

/// `export --chain`: one qcow2 per layer into a new directory.
fn run_chain(a: &ExportArgs, g: Global) -> Result<ExitCode> {
    let disk = open_read_only(&a.disk, a.force_share)?;
    if a.out.exists() {
        let empty = a.out.is_dir()
            && std::fs::read_dir(&a.out)
                .with_context(|| format!("reading {}", a.out.display()))?
                .next()
                .is_none();
        if !empty {
            bail!("exporting a chain to {}: it exists and is not an empty directory", a.out.display());
        }
    }
    let parent = parent_dir(&a.out)?;
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp_path = fresh_name(&parent, &format!(".{}.export", file_stem(&a.out)));
    std::fs::create_dir(&tmp_path).with_context(|| format!("creating {}", tmp_path.display()))?;
    let mut tmp = TempDir(Some(tmp_path.clone()));

    let mut ids: Vec<ops::LayerId> = (0..disk.stack().depth()).map(ops::LayerId::Sealed).collect();
    if !disk.top().extents().is_empty() || ids.is_empty() {
        ids.push(ops::LayerId::Top);
    }
    let mut contents = Vec::with_capacity(ids.len());
    for &id in &ids {
        contents.push(
            ops::layer_content(&disk, id)
                .with_context(|| format!("reading the layers of disk {}", a.disk.display()))?,
        );
    }
    let bs = u64::from(disk.block_size());
    let total: u64 = contents
        .iter()
        .flat_map(|c| c.runs.iter())
        .filter(|r| r.loc.kind == ExtentKind::Data)
        .map(|r| (r.end - r.start) * bs)
        .sum();
    let mut progress = Progress::new(g, "exporting");
    let mut done_before = 0u64;
    let mut below: Option<String> = None;
    for (&id, content) in ids.iter().zip(&contents) {
        let name = image_name(id);
        write_layer_image(&disk, content, &tmp_path.join(&name), below.as_deref(), &mut |d, _| {
            progress.update(done_before + d, total)
        })
        .with_context(|| format!("exporting disk {} to {}", a.disk.display(), a.out.join(&name).display()))?;
        done_before += content
            .runs
            .iter()
            .filter(|r| r.loc.kind == ExtentKind::Data)
            .map(|r| (r.end - r.start) * bs)
            .sum::<u64>();
        below = Some(name);
    }
    drop(contents);
    drop(disk);
    // rename(2) replaces an empty directory.
    std::fs::rename(&tmp_path, &a.out)
        .with_context(|| format!("renaming {} to {}", tmp_path.display(), a.out.display()))?;
    tmp.keep();
    progress.finish();
    let last = below.expect("at least one image");
    println!("{}", a.out.join(last).display());
    Ok(ExitCode::SUCCESS)
}

/// Writes one layer's own blocks as a qcow2 image backed by `backing`.
fn write_layer_image(
    disk: &Disk,
    content: &ops::LayerContent,
    out: &Path,
    backing: Option<&str>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let runs: Vec<qcow2::ClusterRun> = content
        .runs
        .iter()
        .map(|r| qcow2::ClusterRun {
            start: r.start,
            end: r.end,
            kind: if r.loc.kind == ExtentKind::Data {
                qcow2::ClusterKind::Data
            } else {
                qcow2::ClusterKind::Zero
            },
        })
        .collect();
    let img =
        qcow2::Image { virtual_size: disk.size(), cluster_size: disk.block_size(), backing, runs: &runs };
    // Data clusters come in order, so the run holding each is found by walking forward.
    let data_runs: Vec<_> = content.runs.iter().filter(|r| r.loc.kind == ExtentKind::Data).collect();
    let mut at = 0usize;
    let mut read = |vblock: u64, buf: &mut [u8]| -> Result<()> {
        while data_runs[at].end <= vblock {
            at += 1;
        }
        content.read(data_runs[at], vblock, buf).map_err(anyhow::Error::new)
    };
    qcow2::write(out, &img, &mut read, progress)
}
