//! Helpers for the VM tests: the guest assets (scripts/vm-assets.sh), QEMU command lines, boots
//! under `timeout` whose console is returned, and reading `mcow info` / the serve log's fetch
//! statistics. (The registry is in registry.rs.)
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::nbd::tool;

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// Panics unless `name` is installed, naming the package (never skips).
pub fn require(name: &str) -> PathBuf {
    let package = match name {
        "qemu-system-x86_64" => {
            "qemu-system-x86 from bookworm-backports (scripts/install-deps.sh does it; the bookworm one removes qemu-utils)"
        }
        "docker-registry" => "docker-registry",
        "nginx" => "nginx-light",
        "ip" | "tc" => "iproute2",
        "skopeo" => "skopeo",
        "nbdfuse" => "libnbd-bin",
        "mkfs.ext4" | "debugfs" | "e2fsck" => "e2fsprogs",
        "systemd-socket-activate" => "systemd",
        "lz4" => "lz4",
        "curl" => "curl",
        "apt-get" | "dpkg" => "apt / dpkg (a Debian host)",
        "losetup" | "mount" | "umount" | "mountpoint" => "util-linux / mount",
        _ => "the package providing it",
    };
    for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is required by the VM test but is not installed: install {package}");
}

/// Runs `bash SCRIPT ARGS` from the repository's scripts/ under `timeout`, with `MCOW` set to
/// the built binary; asserts it succeeds and returns stdout.
pub fn script_ok(name: &str, args: &[&str], limit_secs: u32) -> String {
    let script = repo_root().join("scripts").join(name);
    let out = Command::new(tool("timeout"))
        .args(["-k", "10", &limit_secs.to_string(), "bash"])
        .arg(&script)
        .args(args)
        .env("MCOW", env!("CARGO_BIN_EXE_mcow"))
        .env("PATH", format!("/usr/bin:/usr/sbin:/bin:/sbin:{}", std::env::var("PATH").unwrap_or_default()))
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("running a script");
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{name} {args:?} failed ({}):\nstdout:\n{so}\nstderr:\n{se}", out.status);
    so.into_owned()
}

/// The guest assets (kernel, initramfs), built once into target/vm-assets.
pub struct Assets {
    pub vmlinux: PathBuf,
    pub initrd: PathBuf,
}

pub fn assets() -> Assets {
    for t in ["apt-get", "dpkg", "lz4"] {
        require(t);
    }
    let dir = repo_root().join("target/vm-assets");
    script_ok("vm-assets.sh", &[dir.to_str().unwrap()], 600);
    Assets { vmlinux: dir.join("vmlinux"), initrd: dir.join("initrd.cpio.gz") }
}

/// How a guest's disk reaches QEMU's NBD client.
pub enum Drive {
    /// `-drive` with the export's NBD URI, on virtio.
    Uri,
    /// `-blockdev` with `reconnect-delay` (seconds), so that it rides out a restart of the
    /// server, on a virtio-blk device.
    Reconnecting { delay_secs: u32 },
}

/// The QEMU command (under `timeout`, killed after `limit_secs`) that boots the guest as VM `id`
/// from NBD export `export` on the Unix socket `sock`, attached as `drive`, with `params` (its
/// `vmmode=...` and the like) on the kernel command line; stdin is null.
pub fn qemu_command(
    a: &Assets,
    sock: &Path,
    export: &str,
    id: u32,
    params: &str,
    drive: Drive,
    limit_secs: u32,
) -> Command {
    let qemu = require("qemu-system-x86_64");
    let mut cmd = Command::new(tool("timeout"));
    cmd.args(["-k", "5", &limit_secs.to_string()])
        .arg(qemu)
        .args(["-accel", "tcg", "-m", "256", "-smp", "1", "-nographic", "-no-reboot", "-nodefaults"])
        .args(["-serial", "stdio", "-kernel"])
        .arg(&a.vmlinux)
        .arg("-initrd")
        .arg(&a.initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 quiet vmid={id} {params}"));
    match drive {
        Drive::Uri => cmd
            .arg("-drive")
            .arg(format!("file=nbd+unix:///{export}?socket={},format=raw,if=virtio", sock.display())),
        Drive::Reconnecting { delay_secs } => cmd
            .arg("-blockdev")
            .arg(format!(
                "driver=nbd,node-name=d0,server.type=unix,server.path={},export={export},reconnect-delay={delay_secs}",
                sock.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=d0"]),
    };
    cmd.stdin(Stdio::null());
    cmd
}

/// Boots the guest from NBD export `export` on the Unix socket `sock`, as VM `id`, read-write;
/// returns its console (carriage returns removed). Under `timeout`; qemu's exit code is not
/// trusted (it exits 0 when killed): callers judge by marker lines.
pub fn boot(a: &Assets, sock: &Path, export: &str, id: u32) -> String {
    let out = qemu_command(a, sock, export, id, "vmmode=rw", Drive::Uri, 240)
        .output()
        .expect("running qemu-system-x86_64");
    let mut console = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    console.push_str(&String::from_utf8_lossy(&out.stderr));
    console
}

/// Asserts the console of VM `id` shows a complete boot: markers, the app's output (with the
/// checksum of its data file, `sha`), the write and a clean unmount.
pub fn assert_booted(console: &str, id: u32, sha: &str) {
    let lines: Vec<&str> = console.lines().map(str::trim).collect();
    for want in [
        format!("MCOW-VM-BOOTED id={id}"),
        format!("MCOW-VM-MOUNTED id={id}"),
        "APP2-HELLO host=mcow-guest app1=app1 1.0".to_string(),
        format!("APP2-SHA256 {sha}"),
        format!("MCOW-VM-WROTE id={id}"),
        format!("MCOW-VM-DONE id={id} ok"),
    ] {
        assert!(
            lines.iter().any(|l| l.ends_with(&want)),
            "VM {id}: no line {want:?} on the console:\n{console}"
        );
    }
}

/// `blocks_bytes_fetched` and `requests` of the serve log's exit line for `export`.
pub fn fetched(log: &str, export: &str) -> (u64, u64) {
    let line = log
        .lines()
        .find(|l| l.contains("served; fetched from the origin") && l.contains(&format!("export={export} ")))
        .unwrap_or_else(|| panic!("no fetch statistics for {export} in the serve log:\n{log}"));
    let field = |k: &str| -> u64 {
        let rest = line.split(&format!(" {k}=")).nth(1).unwrap_or_else(|| panic!("no {k} in {line}"));
        rest.split_whitespace().next().unwrap().parse().unwrap()
    };
    (field("blocks_bytes_fetched"), field("requests"))
}
