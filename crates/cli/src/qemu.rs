//! Calling `qemu-img` for image formats other than raw. The binary is `qemu-img` from `PATH`,
//! or `$MCOW_QEMU_IMG` if set.

use std::ffi::OsString;
use std::io::Read;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// The `qemu-img` program to run.
pub fn qemu_img() -> OsString {
    std::env::var_os("MCOW_QEMU_IMG").unwrap_or_else(|| "qemu-img".into())
}

/// Runs `qemu-img` with `args`. Its stdout goes to our stderr (so `-p` progress never mixes
/// with our output); its stderr is captured and included in the error if it fails.
fn run(args: &[&std::ffi::OsStr], what: &str) -> Result<Vec<u8>> {
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
fn spawn_error(e: std::io::Error, prog: &std::ffi::OsStr, what: &str) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        anyhow::anyhow!(
            "{what} needs qemu-img, which was not found (install qemu-utils, or set MCOW_QEMU_IMG)"
        )
    } else {
        anyhow::Error::new(e).context(format!("running {}", prog.to_string_lossy()))
    }
}

/// Like [`run`], with qemu-img's stdout on our stderr (for `convert -p`).
fn run_to_stderr(args: &[&std::ffi::OsStr], what: &str) -> Result<()> {
    let prog = qemu_img();
    let stderr = std::io::stderr().as_fd().try_clone_to_owned().context("duplicating stderr")?;
    let mut cmd = Command::new(&prog);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::from(stderr)).stderr(Stdio::piped());
    tracing::info!(command = ?cmd, "running qemu-img");
    let mut child = cmd.spawn().map_err(|e| spawn_error(e, &prog, what))?;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = child.wait().context("waiting for qemu-img")?;
    if !status.success() {
        bail!("{what}: qemu-img failed ({status}): {}", err.trim());
    }
    Ok(())
}

/// The format `qemu-img info` detects for `path` ("raw", "qcow2", "vmdk", ...). Without
/// qemu-img, files that start like no known image format are taken as raw.
pub fn probe_format(path: &Path) -> Result<String> {
    let args = [std::ffi::OsStr::new("info"), std::ffi::OsStr::new("--output=json"), path.as_os_str()];
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

/// `qemu-img convert [-p] -f FORMAT -O OUT_FORMAT SRC DST`.
pub fn convert(src: &Path, format: &str, dst: &Path, out_format: &str, progress: bool) -> Result<()> {
    use std::ffi::OsStr;
    let mut args: Vec<&OsStr> = vec![OsStr::new("convert")];
    if progress {
        args.push(OsStr::new("-p"));
    }
    args.extend([OsStr::new("-f"), OsStr::new(format), OsStr::new("-O"), OsStr::new(out_format)]);
    args.extend([src.as_os_str(), dst.as_os_str()]);
    let what = format!("converting {} from {format} to {out_format}", src.display());
    run_to_stderr(&args, &what)
}
