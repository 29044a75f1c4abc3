//! Calling `qemu-img` for image formats other than raw: probing, converting (with its progress
//! passed on), and reading a backing chain and what each of its images holds. The binary is
//! `qemu-img` from `PATH`, or `$MCOW_QEMU_IMG` if set.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use mcow_engine::ops;

/// The `qemu-img` program to run.
pub fn qemu_img() -> OsString {
    std::env::var_os("MCOW_QEMU_IMG").unwrap_or_else(|| "qemu-img".into())
}

/// Runs `qemu-img` with `args` and returns its stdout; its stderr is captured and included in
/// the error if it fails.
fn run(args: &[&OsStr], what: &str) -> Result<Vec<u8>> {
    let prog = qemu_img();
    let mut cmd = Command::new(&prog);
    cmd.args(args).stdin(Stdio::null()).stderr(Stdio::piped());
    tracing::info!(command = ?cmd, "running qemu-img");
    let out = cmd.output().map_err(|e| spawn_error(e, &prog, what))?;
    if !out.status.success() {
        bail!("{what}: qemu-img failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out.stdout)
}

/// Why qemu-img could not be started, saying what to install when it is missing.
fn spawn_error(e: std::io::Error, prog: &OsStr, what: &str) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        anyhow::anyhow!(
            "{what} needs qemu-img, which was not found (install qemu-utils, or set MCOW_QEMU_IMG)"
        )
    } else {
        anyhow::Error::new(e).context(format!("running {}", prog.to_string_lossy()))
    }
}

/// Like [`run`], for `convert -p`: qemu-img's progress lines on its stdout (`    (12.34/100%)`)
/// are read and passed to `progress` as (hundredths of a percent, 10000).
fn run_with_progress(args: &[&OsStr], what: &str, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
    let prog = qemu_img();
    let mut cmd = Command::new(&prog);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    tracing::info!(command = ?cmd, "running qemu-img");
    let mut child = cmd.spawn().map_err(|e| spawn_error(e, &prog, what))?;
    // Its stderr is read beside, so that neither pipe can fill while the other is read.
    let stderr = child.stderr.take().map(|mut e| {
        std::thread::spawn(move || {
            let mut err = String::new();
            let _ = e.read_to_string(&mut err);
            err
        })
    });
    if let Some(mut out) = child.stdout.take() {
        let mut buf = [0u8; 4096];
        let mut line = Vec::new();
        loop {
            let n = match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            for &c in &buf[..n] {
                if c == b'\r' || c == b'\n' {
                    if let Some(p) = parse_progress(&line) {
                        progress(p, 10_000);
                    }
                    line.clear();
                } else {
                    line.push(c);
                }
            }
        }
    }
    let status = child.wait().context("waiting for qemu-img")?;
    let err = stderr.and_then(|t| t.join().ok()).unwrap_or_default();
    if !status.success() {
        bail!("{what}: qemu-img failed ({status}): {}", err.trim());
    }
    Ok(())
}

/// Hundredths of a percent from one progress line of `qemu-img -p` (`    (12.34/100%)`).
fn parse_progress(line: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(line).ok()?.trim();
    let pct = text.strip_prefix('(')?.strip_suffix("/100%)")?;
    let value: f64 = pct.parse().ok()?;
    Some((value.clamp(0.0, 100.0) * 100.0).round() as u64)
}

/// The format `qemu-img info` detects for `path` ("raw", "qcow2", "vmdk", ...). Without
/// qemu-img, files that start like no known image format are taken as raw.
pub fn probe_format(path: &Path) -> Result<String> {
    let args = [OsStr::new("info"), OsStr::new("--output=json"), path.as_os_str()];
    match run(&args, &format!("probing the format of {}", path.display())) {
        Ok(json) => {
            let v: serde_json::Value =
                serde_json::from_slice(&json).context("parsing the output of qemu-img info")?;
            v.get("format")
                .and_then(|f| f.as_str())
                .map(str::to_string)
                .context("qemu-img info reported no format")
        }
        Err(e) if e.to_string().contains("was not found") => {
            if let Some(fmt) = sniff_magic(path)? {
                return Err(e.context(format!("{} looks like a {fmt} image", path.display())));
            }
            tracing::warn!(path = %path.display(), "qemu-img not found; taking the image as raw");
            Ok("raw".into())
        }
        Err(e) => Err(e),
    }
}

/// The virtual size of the image `path` of format `format`, from `qemu-img info`.
pub fn virtual_size(path: &Path, format: &str) -> Result<u64> {
    let what = format!("reading the size of {}", path.display());
    let args = [
        OsStr::new("info"),
        OsStr::new("--output=json"),
        OsStr::new("-f"),
        OsStr::new(format),
        path.as_os_str(),
    ];
    let v: serde_json::Value =
        serde_json::from_slice(&run(&args, &what)?).context("parsing the output of qemu-img info")?;
    v.get("virtual-size")
        .and_then(serde_json::Value::as_u64)
        .with_context(|| format!("{what}: qemu-img info reported no virtual size"))
}

/// Recognizes common image formats by their magic numbers.
fn sniff_magic(path: &Path) -> Result<Option<&'static str>> {
    let mut head = [0u8; 512];
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let n = f.read(&mut head).with_context(|| format!("reading {}", path.display()))?;
    let head = &head[..n];
    let fmt = if head.starts_with(b"QFI\xfb") {
        Some("qcow2")
    } else if head.starts_with(b"KDMV") || head.starts_with(b"# Disk DescriptorFile") {
        Some("vmdk")
    } else if head.starts_with(b"vhdxfile") {
        Some("vhdx")
    } else if head.starts_with(b"conectix") {
        Some("vpc")
    } else if head.len() >= 0x44 && head[0x40..0x44] == [0x7f, 0x10, 0xda, 0xbe] {
        Some("vdi")
    } else {
        None
    };
    Ok(fmt)
}

/// `qemu-img convert [-p] [-f FORMAT] -O OUT_FORMAT SRC DST`. `src` is a file name, or any
/// image specification qemu-img takes (such as [`alone`]'s; then `format` is `None`). With
/// `progress`, qemu-img's own progress is passed on as (hundredths of a percent, 10000);
/// without, qemu-img prints nothing.
pub fn convert(
    src: &OsStr,
    format: Option<&str>,
    dst: &Path,
    out_format: &str,
    progress: Option<&mut dyn FnMut(u64, u64)>,
) -> Result<()> {
    let mut args: Vec<&OsStr> = vec![OsStr::new("convert")];
    if progress.is_some() {
        args.push(OsStr::new("-p"));
    }
    if let Some(f) = format {
        args.extend([OsStr::new("-f"), OsStr::new(f)]);
    }
    args.extend([OsStr::new("-O"), OsStr::new(out_format), src, dst.as_os_str()]);
    let what = match format {
        Some(f) => format!("converting {} from {f} to {out_format}", src.to_string_lossy()),
        None => format!("converting {} to {out_format}", src.to_string_lossy()),
    };
    match progress {
        Some(p) => run_with_progress(&args, &what, p),
        None => run(&args, &what).map(drop),
    }
}

/// One image of a backing chain, as `qemu-img info --backing-chain` reports it.
#[derive(Debug, Clone)]
pub struct ChainMember {
    /// The file, as qemu-img opened it (relative backing names resolved).
    pub filename: PathBuf,
    pub format: String,
    pub virtual_size: u64,
}

/// The backing chain of the image `top`, bottom first. Fails (with qemu-img's message) when a
/// backing file is missing or unreadable.
pub fn backing_chain(top: &Path) -> Result<Vec<ChainMember>> {
    let what = format!("reading the backing chain of {}", top.display());
    let args =
        [OsStr::new("info"), OsStr::new("--backing-chain"), OsStr::new("--output=json"), top.as_os_str()];
    let json = run(&args, &what)?;
    let v: serde_json::Value =
        serde_json::from_slice(&json).context("parsing the output of qemu-img info --backing-chain")?;
    let images = v.as_array().context("qemu-img info --backing-chain did not print a list")?;
    let mut chain = Vec::with_capacity(images.len());
    for image in images.iter().rev() {
        let field =
            |name: &str| image.get(name).with_context(|| format!("{what}: qemu-img info reported no {name}"));
        chain.push(ChainMember {
            filename: PathBuf::from(field("filename")?.as_str().context("a file name that is not text")?),
            format: field("format")?.as_str().context("a format that is not text")?.to_string(),
            virtual_size: field("virtual-size")?.as_u64().context("a virtual size that is not a number")?,
        });
    }
    if chain.is_empty() {
        bail!("{what}: qemu-img info reported no image");
    }
    Ok(chain)
}

/// The image specification of a chain member opened alone, without its backing file (a
/// `json:` pseudo-file name), so that it reads as only what it holds itself.
pub fn alone(member: &ChainMember) -> Result<OsString> {
    let name = member.filename.to_str().with_context(|| {
        format!("{}: a file name qemu-img's json: syntax cannot carry", member.filename.display())
    })?;
    let spec = serde_json::json!({
        "driver": member.format,
        "file": { "driver": "file", "filename": name },
        "backing": null,
    });
    Ok(format!("json:{spec}").into())
}

/// The ranges `member` holds itself (not through its backing file), from `qemu-img map` of the
/// image opened alone: allocated data, and allocated zeros (qcow2 zero clusters, which hide
/// what lies below). A raw image holds everything: its holes are zeros.
pub fn held_ranges(member: &ChainMember) -> Result<Vec<ops::HeldRange>> {
    let what = format!("mapping {}", member.filename.display());
    let spec = if member.format == "raw" { member.filename.clone().into_os_string() } else { alone(member)? };
    let mut args = vec![OsStr::new("map"), OsStr::new("--output=json")];
    if member.format == "raw" {
        args.extend([OsStr::new("-f"), OsStr::new("raw")]);
    }
    args.push(&spec);
    let json = run(&args, &what)?;
    let v: serde_json::Value = serde_json::from_slice(&json).context("parsing the output of qemu-img map")?;
    let entries = v.as_array().context("qemu-img map did not print a list")?;
    let mut held: Vec<ops::HeldRange> = Vec::new();
    for e in entries {
        let num = |k: &str| e.get(k).and_then(serde_json::Value::as_u64);
        let flag = |k: &str| e.get(k).and_then(serde_json::Value::as_bool);
        let (Some(offset), Some(length)) = (num("start"), num("length")) else {
            bail!("{what}: qemu-img map printed an entry without start and length: {e}");
        };
        // Without "present" (older qemu-img), a range is held where it is data or zero.
        let data = flag("data").unwrap_or(false);
        let zero = flag("zero").unwrap_or(false);
        if !flag("present").unwrap_or(data || zero) {
            continue;
        }
        let range = ops::HeldRange { offset, length, zero };
        match held.last_mut() {
            Some(last) if last.zero == zero && last.offset + last.length == offset => last.length += length,
            _ => held.push(range),
        }
    }
    Ok(held)
}
