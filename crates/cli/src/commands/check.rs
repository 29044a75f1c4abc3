//! `mcow check`: verify every layer and the top, with `qemu-img check` exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use mcow_engine::{OpenOptions, ops};
use serde::Serialize;

use crate::Global;
use crate::output::{OutputFormat, print_json};
use crate::progress::Progress;

/// Check a disk for corruption.
#[derive(Debug, clap::Args)]
#[command(long_about = "Check a disk in full: its manifest, every sealed layer (content digest, \
    structure, parent chain, every block's hash) and the writable top (header and journal).\n\n\
    Exit status, as with `qemu-img check`:\n  \
    0  no problem found;\n  \
    1  the check could not be completed (no such disk, unreadable manifest, disk in use...);\n  \
    2  corruption found;\n  \
    3  no corruption, only debris: harmless leftovers of writes that never reached a flush \
    (a torn journal tail, unused blocks in the top's data file), of a seal or commit that was \
    interrupted (a top the manifest does not name, disk.tmp), or of a process that died \
    writing into the layer store (a file in STORE/tmp that no live process holds).\n\n\
    A journal batch that is damaged while a whole batch follows it is corruption, not debris: \
    no open cuts it away.\n\n\
    --repair first opens the disk for writing once, which drops such debris (and the store's \
    dead temporaries), then checks. \
    Corruption of sealed layers cannot be repaired: restore the layer file from a copy.\n\n\
    JSON output (--output json) is an object with the keys disk, result (\"clean\", \
    \"corrupt\" or \"debris\"), errors, debris (lists of messages), layers_checked, \
    blocks_checked, partial_layers and repaired (null without --repair; else \
    journal_tail_bytes and unused_blocks found and dropped).\n\n\
    A disk pulled with `mcow pull --lazy` holds partial layers: their structure and every local \
    block are checked, blocks not fetched yet are not errors, and nothing is fetched. They are \
    listed as \"N of M blocks local\" (in JSON, partial_layers: objects with digest, \
    blocks_local, blocks_total); their whole-file digest can only be checked once complete.")]
pub struct CheckArgs {
    /// The disk directory.
    pub disk: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
    /// Check even if another process is writing to the disk (the top may look inconsistent).
    #[arg(short = 'U', long, conflicts_with = "repair")]
    pub force_share: bool,
    /// Drop debris left by a crash (opens the disk for writing), then check.
    #[arg(short = 'r', long)]
    pub repair: bool,
}

#[derive(Debug, Serialize)]
struct CheckJson {
    disk: String,
    result: &'static str,
    errors: Vec<String>,
    debris: Vec<String>,
    layers_checked: usize,
    blocks_checked: u64,
    partial_layers: Vec<PartialJson>,
    repaired: Option<Repaired>,
}

#[derive(Debug, Serialize)]
struct PartialJson {
    digest: String,
    blocks_local: u64,
    blocks_total: u64,
}

#[derive(Debug, Serialize)]
struct Repaired {
    journal_tail_bytes: u64,
    unused_blocks: u64,
}

pub fn run(a: CheckArgs, g: Global) -> Result<ExitCode> {
    let repaired = if a.repair {
        let opened = if a.disk.join(mcow_remote::transfer::ORIGIN_FILE).exists() {
            // A lazy disk: its partial layers are opened without fetching anything.
            let offline = std::sync::Arc::new(mcow_engine::Offline);
            mcow_engine::Disk::open_with_source(&a.disk, OpenOptions::default(), offline, Default::default())
        } else {
            mcow_engine::Disk::open(&a.disk, OpenOptions::default())
        };
        match opened {
            Ok(disk) => {
                // Temporaries that dead processes left in the store go too.
                disk.store().stale_temporaries(true).with_context(|| {
                    format!("removing leftover temporaries of {}", disk.store().root().display())
                })?;
                let d = disk.debris();
                Some(Repaired { journal_tail_bytes: d.journal_tail_bytes, unused_blocks: d.unused_blocks })
            }
            Err(e @ (mcow_engine::Error::Locked { .. } | mcow_engine::Error::Io { .. })) => {
                return Err(
                    anyhow::Error::new(e).context(format!("opening disk {} to repair it", a.disk.display()))
                );
            }
            // Corruption: nothing to repair here; the check below reports it.
            Err(e) => {
                tracing::warn!(disk = %a.disk.display(), error = %e, "cannot open the disk to repair it");
                None
            }
        }
    } else {
        None
    };
    let mut progress = Progress::new(g, "checking");
    let report = ops::check(&a.disk, a.force_share, &mut |d, t| progress.update(d, t))
        .with_context(|| format!("checking disk {}", a.disk.display()))
        .map_err(|e| crate::paths::with_disk_hint(e, &a.disk))?;
    progress.finish();
    let (result, code) = if !report.errors.is_empty() {
        ("corrupt", 2)
    } else if !report.debris.is_empty() {
        ("debris", 3)
    } else {
        ("clean", 0)
    };
    match a.output {
        OutputFormat::Json => print_json(&CheckJson {
            disk: a.disk.display().to_string(),
            result,
            errors: report.errors,
            debris: report.debris,
            layers_checked: report.layers_checked,
            blocks_checked: report.blocks_checked,
            partial_layers: report
                .partial
                .iter()
                .map(|p| PartialJson {
                    digest: p.digest.to_string(),
                    blocks_local: p.blocks_local,
                    blocks_total: p.blocks_total,
                })
                .collect(),
            repaired,
        })?,
        OutputFormat::Human => {
            if let Some(r) = &repaired {
                if r.journal_tail_bytes == 0 && r.unused_blocks == 0 {
                    println!("Repair: nothing to repair.");
                }
                if r.journal_tail_bytes > 0 {
                    println!("Repair: dropped a torn journal tail of {} bytes.", r.journal_tail_bytes);
                }
                if r.unused_blocks > 0 {
                    println!(
                        "Repair: found {} unused blocks in the top's data file; those at its end were trimmed.",
                        r.unused_blocks
                    );
                }
            }
            for e in &report.errors {
                println!("ERROR: {e}");
            }
            for d in &report.debris {
                println!("Debris: {d}");
            }
            for p in &report.partial {
                if p.blocks_local == p.blocks_total {
                    println!("Partial layer {}: all {} blocks local.", p.digest, p.blocks_total);
                } else {
                    println!(
                        "Partial layer {}: {} of {} blocks local (the rest is fetched from the disk's origin when read).",
                        p.digest, p.blocks_local, p.blocks_total
                    );
                }
            }
            println!(
                "Checked {} sealed layer{} ({} blocks) and the writable top.",
                report.layers_checked,
                if report.layers_checked == 1 { "" } else { "s" },
                report.blocks_checked
            );
            match code {
                0 => println!("No errors were found on the disk."),
                2 => println!(
                    "{} error{} found on the disk: it is corrupt.",
                    report.errors.len(),
                    if report.errors.len() == 1 { " was" } else { "s were" }
                ),
                _ => println!(
                    "No corruption; {} kind{} of debris found (run with -r to drop it).",
                    report.debris.len(),
                    if report.debris.len() == 1 { "" } else { "s" }
                ),
            }
        }
    }
    Ok(ExitCode::from(code))
}
