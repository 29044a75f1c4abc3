//! `mcow demo`: builds a small layered disk in a local directory, with nothing but this binary,
//! and shows `info` and `map` of it.
//!
//! The steps are separate so that more can be added: [`prepare_dir`] makes an empty demo
//! directory, [`build`] makes the stack and returns a [`Demo`] describing it, [`explain`] prints
//! it. Serving the result over NBD is one more step taking `Demo::disk`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail, ensure};
use mcow_engine::{CreateOptions, DEFAULT_BLOCK_SIZE, Digest, Disk, OpenOptions, disk, ops};

use crate::Global;
use crate::commands::{info, map};
use crate::output::human_size;

/// Marker file that says a directory was made by `mcow demo` (and may be removed by it).
const MARKER: &str = ".mcow-demo";
const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

/// Build a small layered demo disk and show it.
#[derive(Debug, clap::Args)]
#[command(long_about = "Build a small layered disk in DIR, using nothing but this program (no qemu, no \
    network), and print `mcow info` and `mcow map` of it with short explanations.\n\n\
    The stack: a 64 MiB disk whose base layer holds a recognizable \"OS\" pattern, then three \
    small \"software\" layers, each written into the disk's top and sealed; then a second disk \
    `vm` created on that stack (`mcow create --from`) with a little data in its writable top. \
    Everything is read back and compared with what was written.\n\n\
    DIR is removed and rebuilt if an earlier `mcow demo` made it; any other non-empty directory \
    is left alone and the demo refuses to run.")]
pub struct DemoArgs {
    /// Directory to build the demo in.
    #[arg(long, default_value = "mcow-demo", value_name = "DIR")]
    pub dir: PathBuf,
    /// Then serve the disk over NBD (as export `vm`) until Ctrl-C.
    #[arg(long)]
    pub serve: bool,
    /// Where --serve listens.
    #[arg(long, default_value = crate::serve::DEFAULT_TCP, value_name = "ADDR")]
    pub tcp: String,
}

/// A built demo.
pub struct Demo {
    pub dir: PathBuf,
    /// The disk on top of the stack, with its writable top: what to look at or serve.
    pub disk: PathBuf,
    /// The disk the layers were built in.
    pub build_disk: PathBuf,
    /// Sealed layers, bottom first, with what each one holds.
    pub layers: Vec<(Digest, String)>,
    /// What the writable top of `disk` holds.
    pub top: String,
}

/// Empties `dir` if an earlier demo made it, refuses if it holds anything else, and creates it.
pub fn prepare_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        let mut entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
        if dir.join(MARKER).exists() {
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("removing the old demo {}", dir.display()))?;
        } else if entries.next().is_some() {
            bail!(
                "{} exists and was not made by `mcow demo`; remove it or pick another --dir",
                dir.display()
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join(MARKER), "made by `mcow demo`; the demo removes this directory when re-run\n")
        .with_context(|| format!("writing {}", dir.join(MARKER).display()))
}

/// A region filled with 512-byte sectors of text naming what it is and where, so that
/// `mcow read` shows where each byte came from.
fn pattern(label: &str, offset: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize);
    let mut pos = offset;
    while (out.len() as u64) < len {
        let mut sector = format!("[{label}] sector @ {pos:#010x} ").into_bytes();
        sector.resize(511, b'.');
        sector.push(b'\n');
        out.extend_from_slice(&sector);
        pos += 512;
    }
    out.truncate(len as usize);
    out
}

/// A disk open for writing, and the bytes it should hold.
struct Builder<'a> {
    disk: Option<Disk>,
    model: &'a mut Vec<u8>,
}

impl Builder<'_> {
    fn disk(&self) -> &Disk {
        self.disk.as_ref().expect("disk is open")
    }
    fn write(&mut self, label: &str, offset: u64, len: u64) -> Result<()> {
        let data = pattern(label, offset, len);
        self.disk().write(offset, &data).with_context(|| format!("writing {label}"))?;
        self.model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
        Ok(())
    }
    fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.disk().write_zeroes(offset, len, false).context("zeroing")?;
        self.model[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    /// Flushes, closes and seals the disk, then reopens it.
    fn seal(&mut self, dir: &Path) -> Result<Digest> {
        let d = self.disk.take().expect("disk is open");
        d.flush().context("flushing")?;
        drop(d);
        let digest = ops::seal(dir, &mut |_, _| {}).with_context(|| format!("sealing {}", dir.display()))?;
        self.disk = Some(open(dir)?);
        Ok(digest)
    }
}

fn open(dir: &Path) -> Result<Disk> {
    Disk::open(dir, OpenOptions::default()).with_context(|| format!("opening disk {}", dir.display()))
}

/// Builds the stack in `dir` (which must be empty but for the marker).
pub fn build(dir: &Path) -> Result<Demo> {
    let store = dir.join("layers");
    let build_disk = dir.join("build");
    let vm = dir.join("vm");
    let opts =
        CreateOptions { virtual_size: SIZE, block_size: DEFAULT_BLOCK_SIZE, store, layers: Vec::new() };
    Disk::create(&build_disk, &opts).with_context(|| format!("creating disk {}", build_disk.display()))?;
    let mut model = vec![0u8; SIZE as usize];
    let mut b = Builder { disk: Some(open(&build_disk)?), model: &mut model };
    let mut layers = Vec::new();

    b.write("mcow demo OS: boot", 0, 64 << 10)?;
    b.write("mcow demo OS: /usr", MIB, 4 * MIB)?;
    b.write("mcow demo OS: /var/tmp", 32 * MIB, 2 * MIB)?;
    let d = b.seal(&build_disk)?;
    layers.push((d, "base OS: boot block at 0, /usr (4 MiB at 1 MiB), /var/tmp (2 MiB at 32 MiB)".into()));

    b.write("app: editor 1.0", 8 * MIB, 512 << 10)?;
    let d = b.seal(&build_disk)?;
    layers.push((d, "software: an editor (512 KiB at 8 MiB)".into()));

    b.write("app: webserver 2.4", 12 * MIB, MIB)?;
    b.write("OS security update", MIB, 128 << 10)?;
    let d = b.seal(&build_disk)?;
    layers.push((d, "software: a web server (1 MiB at 12 MiB) and an OS update over 128 KiB of /usr".into()));

    b.write("config: hostname=demo", 16 * MIB, 4096)?;
    b.zero(32 * MIB, 2 * MIB)?;
    let d = b.seal(&build_disk)?;
    layers
        .push((d, "configuration: 4 KiB at 16 MiB; /var/tmp cleared (a zero marker: no data stored)".into()));
    drop(b.disk.take());

    // A new disk on the stack, as `mcow create vm --from build` makes it.
    let m = disk::read_manifest(&build_disk).context("reading the build disk")?;
    Disk::create(&vm, &CreateOptions { layers: m.layers, ..opts })
        .with_context(|| format!("creating disk {}", vm.display()))?;
    let mut b = Builder { disk: Some(open(&vm)?), model: &mut model };
    b.write("user data", 20 * MIB, 256 << 10)?;
    b.write("user edit", 8 * MIB + 4096, 4096)?;
    b.disk().flush().context("flushing")?;
    drop(b.disk.take());

    // Read everything back through the stack.
    let d = Disk::open(&vm, OpenOptions { read_only: true, verify: true, force_share: false })
        .with_context(|| format!("opening disk {}", vm.display()))?;
    let mut buf = vec![0u8; SIZE as usize];
    d.read(0, &mut buf).context("reading the demo disk back")?;
    ensure!(buf == model, "the demo disk does not read back what was written");

    Ok(Demo {
        dir: dir.to_path_buf(),
        disk: vm,
        build_disk,
        layers,
        top: "user data (256 KiB at 20 MiB); a 4 KiB edit at 8 MiB + 4 KiB, \
              which copied the editor's 64 KiB block up"
            .into(),
    })
}

/// Prints what was built, then `info` and `map` of the demo disk.
pub fn explain(demo: &Demo, w: &mut dyn Write) -> Result<()> {
    let disk = Disk::open(&demo.disk, OpenOptions { read_only: true, verify: true, force_share: true })
        .with_context(|| format!("opening disk {}", demo.disk.display()))?;
    let n = demo.layers.len();
    writeln!(w, "mcow demo: a {} layered disk in {}", human_size(SIZE), demo.dir.display())?;
    writeln!(w)?;
    writeln!(
        w,
        "Sealed layers were built in disk {}: each written into its top, then sealed",
        demo.build_disk.display()
    )?;
    writeln!(
        w,
        "(`mcow seal`). Disk {} was then created on them (`mcow create --from`).",
        demo.disk.display()
    )?;
    writeln!(w, "Top to bottom, with the depth `mcow map` reports:")?;
    writeln!(w, "  depth 0  writable top: {}", demo.top)?;
    for (i, (digest, what)) in demo.layers.iter().enumerate().rev() {
        writeln!(w, "  depth {}  {}  {what}", n - i, digest.short())?;
    }
    writeln!(
        w,
        "  (ranges no layer holds read as zeros: `map` shows them as holes at depth {n}, the bottom's, as qemu-img does)"
    )?;
    writeln!(w)?;
    writeln!(w, "All {} were read back through the stack and match what was written.", human_size(SIZE))?;
    writeln!(w)?;
    writeln!(w, "$ mcow info {}", demo.disk.display())?;
    info::write_human(&info::collect(&disk), w)?;
    writeln!(w)?;
    writeln!(w, "$ mcow map {}", demo.disk.display())?;
    map::write_human(&disk, w)?;
    writeln!(w)?;
    writeln!(w, "Each range is resolved by one lookup in the top and one in the flattened map of the")?;
    writeln!(w, "sealed layers, however deep the stack. Next, try:")?;
    let d = demo.disk.display();
    // The edit is at 8 MiB + 4 KiB: 1 KiB from 0x800e00 is the editor's last sector before it
    // and the edit's first sector (a test runs this line and checks both show).
    writeln!(w, "  mcow read {d} 0x800e00 1K    # the editor's sector before the user edit, then the edit")?;
    writeln!(w, "  mcow map {d} --output json   # the same map for scripts")?;
    writeln!(w, "  mcow check {d}               # verify every block of every layer")?;
    writeln!(w, "  mcow export {d} demo.raw     # the disk as a raw image")?;
    Ok(())
}

pub fn run(a: DemoArgs, _g: Global) -> Result<ExitCode> {
    prepare_dir(&a.dir)?;
    let demo = build(&a.dir)?;
    explain(&demo, &mut std::io::stdout().lock())?;
    if a.serve {
        let disk = mcow_engine::Disk::open(&demo.disk, mcow_engine::OpenOptions::default())
            .with_context(|| format!("opening disk {}", demo.disk.display()))?;
        let export = std::sync::Arc::new(crate::serve::DiskExport::new(std::sync::Arc::new(disk)));
        crate::serve::serve_disks(
            vec![("vm".into(), export)],
            mcow_nbd::ServerConfig::default(),
            Some(a.tcp.clone()),
            None,
            |addrs| {
                for url in addrs {
                    println!("\nServing the disk over NBD at {url}/vm until Ctrl-C. Try:");
                    println!("  qemu-img info {url}/vm");
                    println!("  qemu-io -f raw -c 'read -v 0 512' {url}/vm");
                    println!("  nbdinfo --map=mcow:allocation-depth {url}/vm");
                }
            },
            || {},
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
