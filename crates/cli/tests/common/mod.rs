//! Helpers for the CLI tests: running the built `mcow` binary and the real `qemu-img`/`qemu-io`.
#![allow(dead_code)]

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const MIB: u64 = 1 << 20;

/// The output of one command, with its exit code.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }
}

/// Runs `mcow` with `args` in `cwd`.
pub fn mcow_in(cwd: &Path, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_mcow"))
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .output()
        .expect("running the mcow binary");
    Run::from(out)
}

/// Runs `mcow` and asserts it succeeds; returns stdout.
pub fn mcow_ok(cwd: &Path, args: &[&str]) -> String {
    let r = mcow_in(cwd, args);
    assert_eq!(r.code, 0, "mcow {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}", r.code, r.stdout, r.stderr);
    r.stdout
}

/// Path to a qemu tool; panics with a clear message if it is not installed (never skips).
pub fn qemu_tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "{name} is required for these tests but was not found in /usr/bin or /usr/local/bin: install qemu-utils"
    );
}

/// Runs a qemu tool and asserts it succeeds; returns stdout.
pub fn qemu_ok(name: &str, cwd: &Path, args: &[&str]) -> String {
    let out = Command::new(qemu_tool(name)).args(args).current_dir(cwd).output().expect("running qemu tool");
    let r = Run::from(out);
    assert_eq!(r.code, 0, "{name} {args:?} failed:\nstdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    r.stdout
}

/// Writes `data` at `offset` into a file (created if missing).
pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
}

/// A non-sparse file of `len` zero bytes (every byte written, so holes cannot hide blocks).
pub fn dense_zero_file(path: &Path, len: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; MIB as usize];
    let mut left = len;
    while left > 0 {
        let n = left.min(MIB);
        f.write_all(&chunk[..n as usize]).unwrap();
        left -= n;
    }
}

/// The stored blocks of each sealed layer (bottom first), from `info --output json`.
pub fn stored_blocks(cwd: &Path, disk: &str) -> Vec<u64> {
    let v = mcow_in(cwd, &["info", disk, "--output", "json"]).json();
    v["layers"].as_array().unwrap().iter().map(|l| l["stored_blocks"].as_u64().unwrap()).collect()
}

/// Exports `disk` as raw and returns its bytes.
pub fn export_bytes(cwd: &Path, disk: &str) -> Vec<u8> {
    let out = cwd.join(format!("{disk}.export.raw"));
    mcow_ok(cwd, &["export", disk, out.to_str().unwrap()]);
    let b = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    b
}
