//! `mcow info`: what a disk is made of.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use mcow_engine::{Disk, ops};
use serde::Serialize;

use crate::Global;
use crate::output::{OutputFormat, human_size, print_json};
use crate::paths::read_origin;

/// Show a disk's size, layers, top and map.
#[derive(Debug, clap::Args)]
#[command(long_about = "Show a disk's virtual size, block size, layer store, chain digest, each sealed \
    layer (digest, file size, stored blocks, extents), its writable top (stored blocks, data file \
    size and the space it takes on the host, which shrinks when the guest discards or trims \
    blocks, journal bytes) and the number of extents in the flattened map of its sealed \
    layers.\n\n\
    Layers are listed top first with their depth: depth 0 is the writable top, 1 the topmost \
    sealed layer, N the bottom one (the same depths `mcow map` reports).\n\n\
    JSON output (--output json) is an object with the keys disk, virtual_size, block_size, \
    store, chain_digest, layer_count, layers (bottom first; each with depth, digest, file_bytes, \
    stored_blocks, extents), top (file, stored_blocks, file_bytes, allocated_bytes: st_blocks x \
    512 of the data file, journal_bytes) and map_extents. Sizes are in bytes.\n\n\
    Beside them, the keys of `qemu-img info --output=json` that mean something here, spelt as \
    qemu-img spells them: filename (the disk directory), format (\"mcow\"), virtual-size, \
    cluster-size (the block size), actual-size (the space the disk's own files, its writable \
    top's data file and journal, take on the host: sealed layers are shared and counted in \
    the chain), backing-filename and backing-filename-format (the topmost sealed layer's file \
    and \"mcow-layer\"; absent without sealed layers), and backing-chain: the images top \
    first, as `qemu-img info --backing-chain` lists them, each with filename, format \
    (\"mcow-top\" for the writable top, \"mcow-layer\" for a sealed layer), depth, \
    virtual-size, cluster-size, actual-size (st_blocks x 512 of its file; the journal too for \
    the top) and, but for the bottom, backing-filename and backing-filename-format of the \
    image below.\n\n\
    A disk pulled with `mcow pull --lazy` (or served from a reference) also shows its origin \
    (the reference and manifest digest it fetches missing blocks from) and, per layer, how much \
    of its stored data is local; in JSON, origin and origin_manifest (null for other disks) and, \
    per layer, partial (true while the layer is a partial copy), data_bytes (its stored blocks' \
    bytes) and local_bytes (how many of those are local: the allocated ranges of a partial \
    copy's data region, which only ever receives blocks that matched their hashes). Nothing is \
    fetched by `info`.")]
pub struct InfoArgs {
    #[command(flatten)]
    pub disk: super::InspectArgs,
}

/// The `info` report; also its JSON form.
#[derive(Debug, Serialize)]
pub struct Info {
    pub disk: String,
    pub virtual_size: u64,
    pub block_size: u32,
    pub store: String,
    pub chain_digest: String,
    /// The reference a lazily pulled disk fetches from.
    pub origin: Option<String>,
    pub origin_manifest: Option<String>,
    pub layer_count: usize,
    /// Bottom first.
    pub layers: Vec<LayerInfo>,
    pub top: TopInfo,
    pub map_extents: usize,
    /// The keys of `qemu-img info --output=json` that have a meaning here (see the help).
    #[serde(flatten)]
    pub qemu: QemuInfo,
}

/// `qemu-img info` keys: the disk as a whole.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct QemuInfo {
    pub filename: String,
    pub format: &'static str,
    pub virtual_size: u64,
    pub cluster_size: u32,
    pub actual_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<&'static str>,
    /// Top first, like `qemu-img info --backing-chain`.
    pub backing_chain: Vec<ChainImage>,
}

/// One image of `backing-chain`: the writable top or a sealed layer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ChainImage {
    pub filename: String,
    pub format: &'static str,
    pub depth: usize,
    pub virtual_size: u64,
    pub cluster_size: u32,
    pub actual_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<&'static str>,
}

/// `format` of the disk, of its writable top and of a sealed layer.
pub const FORMAT_DISK: &str = "mcow";
pub const FORMAT_TOP: &str = "mcow-top";
pub const FORMAT_LAYER: &str = "mcow-layer";

/// Space `path` takes on its device (st_blocks x 512), 0 if it cannot be read.
fn allocated(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

/// The qemu-img view of a disk: the chain top first, each image backed by the next.
fn qemu_info(disk: &Disk, i: &ops::DiskInfo) -> QemuInfo {
    let (data, journal) = disk.top().allocated_sizes();
    let top_actual = data + journal;
    // Layer files under the store's canonical path, as `store` shows it.
    let root = disk.store().root();
    let canonical = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    let in_store = |p: std::path::PathBuf| match p.strip_prefix(root) {
        Ok(rel) => canonical.join(rel),
        Err(_) => p,
    };
    let store = disk.store();
    let mut chain = vec![ChainImage {
        filename: disk.top().path().display().to_string(),
        format: FORMAT_TOP,
        depth: 0,
        virtual_size: i.virtual_size,
        cluster_size: i.block_size,
        actual_size: top_actual,
        backing_filename: None,
        backing_filename_format: None,
    }];
    let n = i.layers.len();
    for (idx, l) in i.layers.iter().enumerate().rev() {
        let path =
            in_store(if l.partial { store.partial_path(&l.digest) } else { store.layer_path(&l.digest) });
        chain.push(ChainImage {
            filename: path.display().to_string(),
            format: FORMAT_LAYER,
            depth: n - idx,
            virtual_size: i.virtual_size,
            cluster_size: i.block_size,
            actual_size: allocated(&path),
            backing_filename: None,
            backing_filename_format: None,
        });
    }
    for k in 1..chain.len() {
        chain[k - 1].backing_filename = Some(chain[k].filename.clone());
        chain[k - 1].backing_filename_format = Some(FORMAT_LAYER);
    }
    QemuInfo {
        filename: disk.dir().display().to_string(),
        format: FORMAT_DISK,
        virtual_size: i.virtual_size,
        cluster_size: i.block_size,
        actual_size: top_actual,
        backing_filename: chain[0].backing_filename.clone(),
        backing_filename_format: chain[0].backing_filename_format,
        backing_chain: chain,
    }
}

#[derive(Debug, Serialize)]
pub struct LayerInfo {
    pub depth: usize,
    pub digest: String,
    pub file_bytes: u64,
    pub stored_blocks: u64,
    pub extents: u64,
    pub partial: bool,
    pub data_bytes: u64,
    pub local_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct TopInfo {
    pub file: String,
    pub stored_blocks: u64,
    pub file_bytes: u64,
    /// Space the data file takes on its device (st_blocks x 512).
    pub allocated_bytes: u64,
    pub journal_bytes: u64,
}

pub fn collect(disk: &Disk) -> Info {
    let i = ops::info(disk);
    let origin = read_origin(disk.dir()).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot read the disk's origin");
        None
    });
    let bs = u64::from(i.block_size);
    let n = i.layers.len();
    Info {
        disk: disk.dir().display().to_string(),
        virtual_size: i.virtual_size,
        block_size: i.block_size,
        store: std::fs::canonicalize(disk.store().root())
            .unwrap_or_else(|_| disk.store().root().to_path_buf())
            .display()
            .to_string(),
        chain_digest: i.chain.to_string(),
        origin: origin.as_ref().map(|o| o.reference.clone()),
        origin_manifest: origin.as_ref().map(|o| o.manifest_digest.to_string()),
        layer_count: n,
        layers: i
            .layers
            .iter()
            .enumerate()
            .map(|(idx, l)| LayerInfo {
                depth: n - idx,
                digest: l.digest.to_string(),
                file_bytes: l.file_bytes,
                stored_blocks: l.stored_blocks,
                extents: l.extents,
                partial: l.partial,
                data_bytes: l.stored_blocks * bs,
                local_bytes: l.local_bytes,
            })
            .collect(),
        top: TopInfo {
            file: disk.top().path().display().to_string(),
            stored_blocks: i.top_stored_blocks,
            file_bytes: i.top_file_bytes,
            allocated_bytes: i.top_allocated_bytes,
            journal_bytes: i.top_journal_bytes,
        },
        map_extents: i.map_extents,
        qemu: qemu_info(disk, &i),
    }
}

/// Writes the human form of `info`.
pub fn write_human(info: &Info, w: &mut dyn Write) -> std::io::Result<()> {
    let bs = u64::from(info.block_size);
    writeln!(w, "disk: {}", info.disk)?;
    writeln!(w, "virtual size: {} ({} bytes)", human_size(info.virtual_size), info.virtual_size)?;
    writeln!(w, "block size: {} ({} bytes)", human_size(bs), bs)?;
    writeln!(w, "layer store: {}", info.store)?;
    writeln!(w, "chain digest: {}", info.chain_digest)?;
    if let (Some(r), Some(m)) = (&info.origin, &info.origin_manifest) {
        writeln!(w, "origin: {r} (manifest {m})")?;
    }
    writeln!(w, "sealed layers: {}", info.layer_count)?;
    // A LOCAL column only when some layer is a partial (lazily fetched) copy.
    let partial = info.layers.iter().any(|l| l.partial);
    if !info.layers.is_empty() {
        let local_head = if partial { "  LOCAL" } else { "" };
        writeln!(
            w,
            "  {:>5}  {:<71}  {:>10}  {:>8}  {:>7}{local_head}",
            "DEPTH", "DIGEST", "FILE", "BLOCKS", "EXTENTS"
        )?;
    }
    for l in info.layers.iter().rev() {
        let local = match (partial, l.partial) {
            (false, _) => String::new(),
            (true, true) => {
                format!("  partial: {} of {}", human_size(l.local_bytes), human_size(l.data_bytes))
            }
            (true, false) => "  complete".to_string(),
        };
        writeln!(
            w,
            "  {:>5}  {:<71}  {:>10}  {:>8}  {:>7}{local}",
            l.depth,
            l.digest,
            human_size(l.file_bytes),
            l.stored_blocks,
            l.extents
        )?;
    }
    writeln!(w, "writable top (depth 0): {}", info.top.file)?;
    writeln!(
        w,
        "  stored blocks: {} ({}), data file: {} ({} allocated), journal: {}",
        info.top.stored_blocks,
        human_size(info.top.stored_blocks * bs),
        human_size(info.top.file_bytes),
        human_size(info.top.allocated_bytes),
        human_size(info.top.journal_bytes)
    )?;
    writeln!(w, "flattened map extents: {}", info.map_extents)
}

pub fn run(a: InfoArgs, _g: Global) -> Result<ExitCode> {
    let disk = a.disk.open()?;
    let info = collect(&disk);
    match a.disk.output {
        OutputFormat::Json => print_json(&info)?,
        OutputFormat::Human => {
            let mut out = crate::output::stdout();
            write_human(&info, &mut out).context("writing output")?;
            out.flush().context("writing output")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
