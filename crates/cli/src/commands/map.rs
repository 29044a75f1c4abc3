//! `mcow map`: which layer every range of the disk comes from, like `qemu-img map`.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use mcow_engine::{Disk, RunKind};
use serde::Serialize;

use crate::Global;
use crate::output::{OutputFormat, depth_of, human_size, layer_name, print_json};

/// Show where each range of a disk comes from.
#[derive(Debug, clap::Args)]
#[command(long_about = "Show, for every range of the disk, what it reads as and which layer decides it, \
    like `qemu-img map`. Neighbouring ranges from the same layer and of the same kind are merged.\n\n\
    Human output is a table of offset, length, what and depth (as the JSON below) and layer (the \
    short digest of a sealed layer, `top` for the writable top, `-` for none). WHAT is `data` \
    (stored data), `zero` (a zero or discard marker in the layer shown: reads as zeros and \
    hides what is below) or `hole` (no layer holds the range: reads as zeros).\n\n\
    JSON output (--output json) is an array covering the whole disk in order, of objects with \
    these keys, named and meant as in `qemu-img map --output=json` of a qcow2 backing chain \
    (the writable top is the chain's top image, the sealed layers its backing files):\n  \
    start, length  the range, in bytes;\n  \
    depth          0 = the writable top, 1 = the topmost sealed layer, ..., N = the bottom layer \
    of a stack of N; a range no layer holds gets N too, the bottom's depth (as qemu-img 10 \
    reports unallocated ranges), and present false;\n  \
    present        true if some layer holds the range (data, or a zero or discard marker that \
    hides what is below: qemu-img's allocated cluster or zero cluster), false if no layer \
    does (WHAT `hole`);\n  \
    zero           true if the range reads as zeros without stored data (zero and discard \
    markers, and ranges no layer holds), as qemu-img's \"zero\";\n  \
    data           true if the range is stored data (WHAT `data`), as qemu-img's \"data\";\n  \
    layer          the layer's digest (\"sha256:...\"), \"top\", or null where present is false \
    (in place of qemu-img's \"offset\" and \"filename\", which have no counterpart).\n\n\
    So for a qcow2 chain and an mcow disk of the same content and history, start, length, \
    depth, present, zero and data agree.")]
pub struct MapArgs {
    #[command(flatten)]
    pub disk: super::InspectArgs,
}

/// One range of `map --output json`.
#[derive(Debug, Serialize)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    pub depth: u32,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub layer: Option<String>,
}

pub fn collect(disk: &Disk) -> Result<Vec<MapEntry>> {
    let runs = disk.block_status(0, disk.size()).context("reading the block status")?;
    let digests = &disk.manifest().layers;
    let n = disk.stack().depth();
    Ok(runs
        .into_iter()
        .map(|r| MapEntry {
            start: r.offset,
            length: r.length,
            depth: depth_of(r.layer, n),
            present: r.layer.is_some(),
            zero: r.kind != RunKind::Data,
            data: r.kind == RunKind::Data,
            layer: layer_name(r.layer, digests, false),
        })
        .collect())
}

/// Writes the human table of a disk's map.
pub fn write_human(disk: &Disk, w: &mut dyn Write) -> Result<()> {
    let runs = disk.block_status(0, disk.size()).context("reading the block status")?;
    let digests = &disk.manifest().layers;
    let n = disk.stack().depth();
    writeln!(w, "{:>12}  {:>12}  {:>9}  {:<4}  {:>5}  LAYER", "OFFSET", "LENGTH", "", "WHAT", "DEPTH")?;
    for r in runs {
        // The same meanings as the JSON: data, present without data, not present.
        let what = match (r.kind, r.layer) {
            (RunKind::Data, _) => "data",
            (_, Some(_)) => "zero",
            (_, None) => "hole",
        };
        writeln!(
            w,
            "{:>#12x}  {:>#12x}  {:>9}  {:<4}  {:>5}  {}",
            r.offset,
            r.length,
            human_size(r.length),
            what,
            depth_of(r.layer, n),
            layer_name(r.layer, digests, true).unwrap_or_else(|| "-".into())
        )?;
    }
    Ok(())
}

pub fn run(a: MapArgs, _g: Global) -> Result<ExitCode> {
    let disk = a.disk.open()?;
    match a.disk.output {
        OutputFormat::Json => print_json(&collect(&disk)?)?,
        OutputFormat::Human => {
            let mut out = crate::output::stdout();
            write_human(&disk, &mut out)?;
            out.flush().context("writing output")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
