//! `mcow import`: an image file becomes a new sealed layer and a new disk on it; a qcow2
//! backing chain (`--chain`) becomes one sealed layer per image.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use mcow_engine::{DEFAULT_BLOCK_SIZE, Disk, disk, ops};

use crate::Global;
use crate::output::human_size;
use crate::paths::{TempFile, default_store, file_stem, open_read_only, parent_dir};
use crate::progress::Progress;
use crate::qemu;
use crate::size::parse_size_u32;

/// Import an image file as a new sealed layer (or a qcow2 backing chain as one layer per image)
/// and create a disk on it.
#[derive(Debug, clap::Args)]
#[command(long_about = "Import the image SRC as a new sealed layer and create the disk DISK on it (with an \
    empty writable top). Prints the new layer's digest, then how much was stored.\n\n\
    Raw images are read directly; holes and all-zero blocks are never stored. Any other format \
    (qcow2, vmdk, vdi, vhdx, ...; `qemu-img info` detects it, -f overrides) is first converted \
    with `qemu-img convert -O raw` into a temporary sparse file beside DISK, removed afterwards.\n\n\
    With --parent DISK2, the new layer sits on DISK2's sealed layers (not its writable top) and \
    stores only the blocks that differ from them: this is how to turn successive full images \
    of the same machine into thin layers. The image must then be exactly DISK2's size; the \
    block size and layer store are DISK2's.\n\n\
    With --chain, SRC is the top of a qcow2 backing chain (as `qemu-img info --backing-chain` \
    reads it): the disk gets one sealed layer per image, bottom to top, each storing only what \
    that image holds itself (`qemu-img map` of the image opened without its backing file): its \
    data, and its zero clusters as zero markers that hide what the images below hold there \
    (on the bottom layer they hide nothing and are left out). Each qcow2 image is converted \
    alone to a temporary raw file beside DISK, one at a time, removed afterwards. A block the \
    image holds only in part (clusters or subclusters smaller than the block size) is stored \
    whole. The images must be qcow2 (the bottom one may be raw) and of one virtual size; a \
    missing backing file, another format or another size is refused before anything is \
    written. Prints the layers' digests, bottom first.")]
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
    /// Block size of the new layer (with --chain, layers) [default: 64K].
    #[arg(short = 'b', long, value_parser = parse_size_u32, conflicts_with = "parent")]
    pub block_size: Option<u32>,
    /// Layer store directory [default: DISK/../layers].
    #[arg(long, value_name = "DIR", conflicts_with = "parent")]
    pub store: Option<PathBuf>,
    /// SRC is the top of a qcow2 backing chain: import one layer per image of the chain.
    #[arg(long, conflicts_with_all = ["parent", "format"])]
    pub chain: bool,
}

pub fn run(a: ImportArgs, g: Global) -> Result<ExitCode> {
    if a.disk.join(disk::MANIFEST_FILE).exists() {
        bail!("importing into {}: it already holds a disk", a.disk.display());
    }
    if !a.src.exists() {
        bail!("importing {}: no such file", a.src.display());
    }
    if a.chain {
        return run_chain(&a, g);
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
        let size = if Progress::shown(g) { qemu::virtual_size(&a.src, &format)? } else { 0 };
        let mut progress = Progress::new(g, &format!("converting from {format}"));
        let mut report = |d: u64, t: u64| progress.update(scale(size, d, t), size);
        let shown = Progress::shown(g).then_some(&mut report as &mut dyn FnMut(u64, u64));
        qemu::convert(a.src.as_os_str(), Some(&format), tmp.path(), "raw", shown)?;
        progress.finish();
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
    println!("{digest}");
    print_stored(&a, &disk, 1);
    Ok(ExitCode::SUCCESS)
}

/// Prints how much the `new` topmost layers of the imported disk store.
fn print_stored(a: &ImportArgs, disk: &Disk, new: usize) {
    let depth = disk.stack().depth();
    let blocks: u64 = (depth - new..depth).map(|i| disk.layer(i).trailer.block_count).sum();
    let file_bytes: u64 = (depth - new..depth).map(|i| disk.layer(i).file_len()).sum();
    let bytes = blocks * u64::from(disk.block_size());
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    println!(
        "Stored {bytes} bytes ({}, {blocks} blocks of {}) in {}; disk {} has {depth} sealed layer{}.",
        human_size(bytes),
        human_size(u64::from(disk.block_size())),
        if new == 1 {
            format!("a {} layer", human_size(file_bytes))
        } else {
            format!("{new} layers of {} in all", human_size(file_bytes))
        },
        a.disk.display(),
        plural(depth)
    );
}

/// `import --chain`: checks the whole chain first, then imports its images bottom to top.
fn run_chain(a: &ImportArgs, g: Global) -> Result<ExitCode> {
    let top = crate::paths::absolute_clean(&a.src)?;
    let chain = qemu::backing_chain(&top)?;
    let size = chain.last().map_or(0, |m| m.virtual_size);
    for (k, m) in chain.iter().enumerate() {
        let ok = m.format == "qcow2" || (k == 0 && m.format == "raw");
        if !ok {
            bail!(
                "importing the chain of {}: {} is a {} image; --chain imports qcow2 images (the \
                 bottom one may be raw)",
                a.src.display(),
                m.filename.display(),
                m.format
            );
        }
        if m.virtual_size != size {
            bail!(
                "importing the chain of {}: {} is {} bytes but {} is {size} bytes; the images of \
                 a chain must all have one virtual size",
                a.src.display(),
                m.filename.display(),
                m.virtual_size,
                a.src.display()
            );
        }
    }
    let parent = parent_dir(&a.disk)?;
    let store = match &a.store {
        Some(s) => s.clone(),
        None => default_store(&a.disk)?,
    };
    let disk_existed = a.disk.exists();
    let result = import_chain(a, g, &chain, &parent, store, size);
    if result.is_err() && !disk_existed {
        // Nothing of a failed import stays: a disk directory it began is removed.
        let _ = std::fs::remove_dir_all(&a.disk);
    }
    let digests = result?;
    let disk = open_read_only(&a.disk, false)?;
    for d in &digests {
        println!("{d}");
    }
    print_stored(a, &disk, digests.len());
    Ok(ExitCode::SUCCESS)
}

/// Imports the images of `chain` (bottom first, checked) as the layers of a new disk.
fn import_chain(
    a: &ImportArgs,
    g: Global,
    chain: &[qemu::ChainMember],
    parent: &std::path::Path,
    store: PathBuf,
    size: u64,
) -> Result<Vec<mcow_engine::Digest>> {
    let mut import = ops::ChainImport::new(store, size, a.block_size.unwrap_or(DEFAULT_BLOCK_SIZE))
        .with_context(|| format!("importing the chain of {}", a.src.display()))?;
    let n = chain.len();
    for (k, m) in chain.iter().enumerate() {
        let what = || format!("importing {} (image {} of {n}, from the bottom)", m.filename.display(), k + 1);
        let held = qemu::held_ranges(m).with_context(what)?;
        let converted = if m.format == "raw" {
            None
        } else {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
            let tmp = TempFile::new_in(parent, &file_stem(&a.disk), "import");
            let mut progress = Progress::new(g, &format!("converting {}/{n}", k + 1));
            let mut report = |d: u64, t: u64| progress.update(scale(size, d, t), size);
            let shown = Progress::shown(g).then_some(&mut report as &mut dyn FnMut(u64, u64));
            qemu::convert(&qemu::alone(m)?, None, tmp.path(), "raw", shown).with_context(what)?;
            progress.finish();
            Some(tmp)
        };
        let own = converted.as_ref().map_or(m.filename.as_path(), TempFile::path);
        let mut progress = Progress::new(g, &format!("importing {}/{n}", k + 1));
        import.push(own, &held, &mut |d, t| progress.update(d, t)).with_context(what)?;
        progress.finish();
    }
    import.finish(&a.disk).with_context(|| format!("creating disk {}", a.disk.display()))
}

/// `done` of `total` (qemu-img's progress) as a share of `size` bytes.
fn scale(size: u64, done: u64, total: u64) -> u64 {
    (u128::from(size) * u128::from(done) / u128::from(total.max(1))) as u64
}
