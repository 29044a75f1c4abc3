//! `mcow read` and `mcow write`: small debugging verbs on a disk's bytes.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use mcow_engine::OpenOptions;

use crate::Global;
use crate::paths::{open, open_read_only};
use crate::size::{parse_byte, parse_size};

/// Largest read or write these debugging verbs do in memory at once.
const MAX_LEN: u64 = 1 << 30;

/// Read bytes from a disk (hex dump, or raw with --raw).
#[derive(Debug, clap::Args)]
#[command(long_about = "Read LENGTH bytes at OFFSET from the disk, as a guest would see them, and print a \
    hex dump (identical lines collapsed into `*`), or the bytes themselves with --raw. OFFSET \
    and LENGTH take size suffixes (4K, 1M) or 0x hex.")]
pub struct ReadArgs {
    /// The disk directory.
    pub disk: PathBuf,
    /// Where to start, in bytes.
    #[arg(value_parser = parse_size)]
    pub offset: u64,
    /// How many bytes.
    #[arg(value_parser = parse_size)]
    pub length: u64,
    /// Write the bytes to stdout instead of a hex dump.
    #[arg(long)]
    pub raw: bool,
    /// Read even if another process is writing to the disk: each block as one of its own values
    /// (at least as of the writer's last flush), never another block's data.
    #[arg(short = 'U', long)]
    pub force_share: bool,
}

/// Write bytes to a disk (a pattern, a file, zeros or a discard).
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Write to the disk's writable top at OFFSET, then flush. Exactly one of:\n  \
    --pattern BYTE LENGTH  LENGTH bytes of BYTE (e.g. 0x5a 1M);\n  \
    --from FILE            the whole content of FILE;\n  \
    --zero LENGTH          zeros (whole blocks become zero markers, nothing is stored);\n  \
    --discard LENGTH       discard (reads as zeros; whole blocks become holes).\n\
    OFFSET and LENGTH take size suffixes (4K, 1M) or 0x hex.",
    group(clap::ArgGroup::new("data").required(true).args(["pattern", "from", "zero", "discard"]))
)]
pub struct WriteArgs {
    /// The disk directory.
    pub disk: PathBuf,
    /// Where to start, in bytes.
    #[arg(value_parser = parse_size)]
    pub offset: u64,
    /// Write LENGTH bytes of BYTE.
    #[arg(long, num_args = 2, value_names = ["BYTE", "LENGTH"])]
    pub pattern: Option<Vec<String>>,
    /// Write the content of FILE.
    #[arg(long, value_name = "FILE")]
    pub from: Option<PathBuf>,
    /// Write LENGTH zero bytes.
    #[arg(long, value_name = "LENGTH", value_parser = parse_size)]
    pub zero: Option<u64>,
    /// Discard LENGTH bytes.
    #[arg(long, value_name = "LENGTH", value_parser = parse_size)]
    pub discard: Option<u64>,
}

pub fn run_read(a: ReadArgs, _g: Global) -> Result<ExitCode> {
    if a.length > MAX_LEN {
        bail!("reading {} bytes: at most {MAX_LEN} at a time (use `mcow export` for more)", a.length);
    }
    let disk = open_read_only(&a.disk, a.force_share)?;
    let mut buf = vec![0u8; a.length as usize];
    disk.read(a.offset, &mut buf)
        .with_context(|| format!("reading {}+{} of disk {}", a.offset, a.length, a.disk.display()))?;
    let mut out = crate::output::stdout();
    if a.raw {
        out.write_all(&buf).context("writing output")?;
    } else {
        hexdump(a.offset, &buf, &mut out).context("writing output")?;
    }
    out.flush().context("writing output")?;
    Ok(ExitCode::SUCCESS)
}

/// `xxd`-like dump with absolute offsets; runs of identical 16-byte lines print as `*`.
pub fn hexdump(base: u64, buf: &[u8], w: &mut dyn Write) -> std::io::Result<()> {
    let mut prev: Option<&[u8]> = None;
    let mut starred = false;
    for (i, line) in buf.chunks(16).enumerate() {
        if prev == Some(line) && line.len() == 16 {
            if !starred {
                writeln!(w, "*")?;
                starred = true;
            }
            continue;
        }
        starred = false;
        prev = Some(line);
        let mut hex = String::with_capacity(48);
        for (j, b) in line.iter().enumerate() {
            if j == 8 {
                hex.push(' ');
            }
            hex.push_str(&format!("{b:02x} "));
        }
        let text: String =
            line.iter().map(|&b| if b.is_ascii_graphic() || b == b' ' { b as char } else { '.' }).collect();
        writeln!(w, "{:08x}:  {hex:<49} |{text}|", base + (i * 16) as u64)?;
    }
    if !buf.is_empty() && starred {
        writeln!(w, "{:08x}:", base + buf.len() as u64)?;
    }
    Ok(())
}

pub fn run_write(a: WriteArgs, _g: Global) -> Result<ExitCode> {
    let ctx = |what: &str, len: u64| format!("{what} {}+{len} of disk {}", a.offset, a.disk.display());
    let disk = open(&a.disk, OpenOptions::default())?;
    if let Some(p) = &a.pattern {
        let byte = parse_byte(&p[0]).map_err(anyhow::Error::msg).context("--pattern BYTE")?;
        let len = parse_size(&p[1]).map_err(anyhow::Error::msg).context("--pattern LENGTH")?;
        if len > MAX_LEN {
            bail!("writing {len} bytes: at most {MAX_LEN} at a time");
        }
        disk.write(a.offset, &vec![byte; len as usize]).with_context(|| ctx("writing", len))?;
    } else if let Some(f) = &a.from {
        let data = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        disk.write(a.offset, &data).with_context(|| ctx("writing", data.len() as u64))?;
    } else if let Some(len) = a.zero {
        disk.write_zeroes(a.offset, len, false).with_context(|| ctx("zeroing", len))?;
    } else if let Some(len) = a.discard {
        disk.discard(a.offset, len).with_context(|| ctx("discarding", len))?;
    }
    disk.flush().with_context(|| format!("flushing disk {}", a.disk.display()))?;
    Ok(ExitCode::SUCCESS)
}
