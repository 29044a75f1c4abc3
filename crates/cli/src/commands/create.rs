//! `mcow create`: a new, empty disk, optionally on another disk's sealed layers.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use mcow_engine::{CreateOptions, DEFAULT_BLOCK_SIZE, Disk, disk, stack::Stack, store::LayerStore};

use mcow_remote::transfer::ORIGIN_FILE;

use crate::Global;
use crate::paths::default_store;
use crate::size::{parse_size, parse_size_u32};

/// Create a new disk.
#[derive(Debug, clap::Args)]
#[command(
    long_about = concat!("Create a new disk: a directory DISK holding disk.json and an empty writable top.\n\n\
    Without --from, the disk has no sealed layers and reads as zeros; SIZE (as in `qemu-img \
    create FILE SIZE`) or -s gives its virtual size. \
    Its layer store is --store, or a directory named `layers` beside DISK (DISK/../layers), \
    created if missing.\n\n\
    With --from DISK2, the new disk sits on DISK2's sealed layers and inherits its virtual size, \
    block size and layer store (and, if DISK2 was pulled lazily, its origin, from which both \
    fetch missing blocks). DISK2's writable top is NOT included: seal DISK2 first \
    (`mcow seal DISK2`) if its latest writes should be part of the new disk. The layers are \
    shared, not copied, so this is instant whatever the size or depth.\n\n\
    A size is ", crate::size::size_syntax!(), ".")
)]
pub struct CreateArgs {
    /// Directory of the new disk (created; must not already hold a disk).
    pub disk: PathBuf,
    /// Virtual size, e.g. 64M, 10G, as qemu-img takes it (or give -s; one is required unless
    /// --from).
    #[arg(value_name = "SIZE", value_parser = parse_size, conflicts_with_all = ["from", "size"])]
    pub size_arg: Option<u64>,
    /// Virtual size, e.g. 64M, 10G (the same as SIZE).
    #[arg(
        short = 's',
        long,
        value_parser = parse_size,
        required_unless_present_any = ["from", "size_arg"],
        conflicts_with = "from"
    )]
    pub size: Option<u64>,
    /// Block size: a power of two, e.g. 4K, 64K, 1M [default: 64K].
    #[arg(short = 'b', long, value_parser = parse_size_u32, conflicts_with = "from")]
    pub block_size: Option<u32>,
    /// Layer store directory [default: DISK/../layers].
    #[arg(long, value_name = "DIR", conflicts_with = "from")]
    pub store: Option<PathBuf>,
    /// Start from this disk's sealed layers (not its writable top); inherits its size, block
    /// size and store.
    #[arg(long, value_name = "DISK2")]
    pub from: Option<PathBuf>,
}

pub fn run(a: CreateArgs, _g: Global) -> Result<ExitCode> {
    if a.disk.join(disk::MANIFEST_FILE).exists() {
        bail!("creating disk {}: it already holds a disk", a.disk.display());
    }
    let opts = match &a.from {
        Some(from) => {
            let m = disk::read_manifest(from).with_context(|| format!("reading disk {}", from.display()))?;
            let store = disk::resolve_store(from, &m);
            // Check the layers now rather than at the first open of the new disk (partial layers
            // of a lazily pulled DISK2 too, fetching nothing).
            let layers = LayerStore::new(&store)
                .with_source(Arc::new(mcow_engine::Offline), mcow_engine::FetchPolicy::default());
            Stack::open(&layers, &m.layers, m.virtual_size, m.block_size, false)
                .with_context(|| format!("opening the sealed layers of disk {}", from.display()))?;
            CreateOptions { virtual_size: m.virtual_size, block_size: m.block_size, store, layers: m.layers }
        }
        None => CreateOptions {
            virtual_size: a.size.or(a.size_arg).expect("clap requires SIZE or --size without --from"),
            block_size: a.block_size.unwrap_or(DEFAULT_BLOCK_SIZE),
            store: match a.store {
                Some(s) => s,
                None => default_store(&a.disk)?,
            },
            layers: Vec::new(),
        },
    };
    Disk::create(&a.disk, &opts).with_context(|| format!("creating disk {}", a.disk.display()))?;
    // On a lazily pulled disk's layers, the new disk fetches missing blocks from the same origin.
    if let Some(from) = &a.from {
        let origin = from.join(ORIGIN_FILE);
        if origin.exists() {
            std::fs::copy(&origin, a.disk.join(ORIGIN_FILE))
                .with_context(|| format!("copying {} to {}", origin.display(), a.disk.display()))?;
        }
    }
    let layers = opts.layers.len();
    println!(
        "Created {}: {} ({} bytes), block size {}, {} sealed layer{}, store {}",
        a.disk.display(),
        crate::output::human_size(opts.virtual_size),
        opts.virtual_size,
        crate::output::human_size(u64::from(opts.block_size)),
        layers,
        if layers == 1 { "" } else { "s" },
        opts.store.display()
    );
    Ok(ExitCode::SUCCESS)
}
