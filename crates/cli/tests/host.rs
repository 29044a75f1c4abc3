//! The host service with real guests: QEMU (TCG) guests whose disks `mcow serve` exports, while
//! the control API snapshots them. The guest (scripts/vm-assets.sh, `vmmode=writer`) writes
//! files `/w/1 .. /w/N` to an ext4 filesystem on its disk, each followed by `sync` (a flush of
//! the disk) and a console line, so the test knows which writes the guest had made durable.
//!
//! Every external command runs under `timeout`; servers and guests are stopped by guards.
//! Missing tools fail the test with the package to install (never skip).

mod common;
#[path = "common/nbd.rs"]
mod nbd;
#[path = "common/vm.rs"]
mod vmh;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use nbd::*;
use vmh::*;

/// Held by each test: they boot guests (2 cores) and build the guest assets in one directory,
/// so they run one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// A guest in writer mode, its console read line by line as it runs.
struct Guest {
    child: Child,
    lines: mpsc::Receiver<String>,
    console: String,
    /// The highest n of the `MCOW-VM-FLUSHED id=ID n=N` lines seen.
    flushed: u64,
    id: u32,
}

impl Guest {
    /// Boots guest `id` on the NBD export `export` of socket `sock` (QEMU's NBD client with
    /// `reconnect-delay`, so that it rides out a restart of the server), writing `writes` files.
    fn boot(a: &Assets, sock: &Path, export: &str, id: u32, writes: u32) -> Guest {
        let params = format!("vmmode=writer vmwrites={writes}");
        let mut child =
            qemu_command(a, sock, export, id, &params, Drive::Reconnecting { delay_secs: 30 }, 300)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("running qemu-system-x86_64");
        let (tx, rx) = mpsc::channel();
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    let _ = tx.send(line.replace('\r', ""));
                }
            });
        }
        Guest { child, lines: rx, console: String::new(), flushed: 0, id }
    }

    /// Reads console lines until `until` holds for the guest's state or `limit` passes;
    /// returns whether it held.
    fn wait(&mut self, limit: Duration, until: impl Fn(&Guest) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        while !until(self) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let marker = format!("MCOW-VM-FLUSHED id={} n=", self.id);
                    if let Some(n) = line.trim().rsplit_once(&marker).and_then(|(_, n)| n.parse().ok()) {
                        self.flushed = self.flushed.max(n);
                    }
                    self.console.push_str(&line);
                    self.console.push('\n');
                }
                Err(_) => return until(self),
            }
        }
        true
    }

    /// Waits for the guest to power off (its console closes); asserts it wrote every file and
    /// unmounted cleanly, and saw no I/O error. Returns the console.
    fn finish(mut self, writes: u64) -> String {
        let done = format!("MCOW-VM-DONE id={}", self.id);
        self.wait(Duration::from_secs(240), |g| g.console.contains(&done));
        let _ = self.child.wait();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.console.push_str(&line);
            self.console.push('\n');
        }
        let c = &self.console;
        assert!(
            c.contains(&format!("MCOW-VM-DONE id={} ok", self.id)),
            "guest {}: no clean end:\n{c}",
            self.id
        );
        assert!(
            c.contains(&format!("MCOW-VM-WROTE id={}", self.id)),
            "guest {}: not every write:\n{c}",
            self.id
        );
        assert_eq!(self.flushed, writes, "guest {}: flushed writes:\n{c}", self.id);
        for bad in ["I/O error", "EXT4-fs error", "Buffer I/O", "blk_update_request"] {
            assert!(!c.contains(bad), "guest {}: {bad:?} on the console:\n{c}", self.id);
        }
        std::mem::take(&mut self.console)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A 64 MiB disk holding an empty ext4 filesystem, imported as the base layer of `name`.
fn ext4_disk(dir: &Path, name: &str) {
    require("mkfs.ext4");
    let raw = dir.join(format!("{name}.raw"));
    dense_zero_file(&raw, 64 * MIB);
    tool_ok("mkfs.ext4", dir, &["-q", "-F", "-b", "4096", raw.to_str().unwrap()]);
    mcow_ok(dir, &["import", raw.to_str().unwrap(), &format!("{name}-base")]);
    mcow_ok(dir, &["create", "--from", &format!("{name}-base"), name]);
    std::fs::remove_file(&raw).unwrap();
}

/// Asserts the ext4 filesystem in raw image `raw` is clean once its journal is replayed (on a
/// copy: `e2fsck -fy`, then `-fn` must find nothing) and holds the guest's files `/w/1..=n`
/// with their content (more may be there). Returns how many of `/w/1..=max` it holds.
fn assert_files(dir: &Path, raw: &Path, id: u32, n: u64, max: u64) -> u64 {
    require("debugfs");
    let fixed = dir.join("fsck.raw");
    std::fs::copy(raw, &fixed).unwrap();
    let f = fixed.to_str().unwrap();
    let r = tool_run("e2fsck", dir, &["-fy", f]);
    assert!(r.code == 0 || r.code == 1, "e2fsck -fy {}: {}{}", raw.display(), r.stdout, r.stderr);
    let r = tool_run("e2fsck", dir, &["-fn", f]);
    assert_eq!(r.code, 0, "the filesystem is not clean after its journal: {}{}", r.stdout, r.stderr);
    let listing = tool_run("debugfs", dir, &["-R", "ls -p /w", f]).stdout;
    // `ls -p`: one `/inode/mode/uid/gid/name/size/` line per entry.
    let names: Vec<&str> = listing.lines().filter_map(|l| l.split('/').nth(5)).collect();
    let files = (1..=max).filter(|k| names.contains(&k.to_string().as_str())).count() as u64;
    for k in 1..=n {
        let r = tool_run("debugfs", dir, &["-R", &format!("cat /w/{k}"), f]);
        let line = format!("vm {id} file {k}\n");
        let want: String = line.repeat(16384 / line.len() + 1).chars().take(16384).collect();
        assert!(
            r.stdout == want,
            "/w/{k} of {} is not what guest {id} wrote: {:?}",
            raw.display(),
            &r.stdout[..r.stdout.len().min(80)]
        );
    }
    std::fs::remove_file(&fixed).unwrap();
    files
}

/// Tried: a guest writing 40 files, each synced, to a disk `mcow serve --control` exports;
/// a snapshot through `mcow ctl snapshot` after its 10th file (sealed in the background) and
/// another with `--wait` after its 20th, while it keeps writing. Then the disk's sealed layers
/// are pushed to an OCI layout and served from there by another `mcow serve` into a new cache.
/// Must hold: the guest never sees an error and finishes every write; after the server stops,
/// the disk (its layers and top) holds all 40 files, its filesystem clean; it has two more
/// layers; the pushed image (the layers up to the second snapshot), served elsewhere and copied
/// out with nbdcopy, holds every file the guest had synced before the second snapshot was
/// asked for, with its content, and a clean filesystem.
#[test]
fn snapshots_while_a_guest_writes() {
    let _one = one_at_a_time();
    for t in ["qemu-system-x86_64", "nbdcopy", "e2fsck"] {
        require(t);
    }
    let assets = assets();
    let t = tempfile::Builder::new().prefix("mcow-host").tempdir_in("/tmp").unwrap();
    let w = t.path();
    ext4_disk(w, "vm");
    let layers = |disk: &str| {
        mcow_in(w, &["info", disk, "--output", "json"]).json()["layers"].as_array().unwrap().len()
    };
    let before = layers("vm");
    let serve = Serve::start_env(w, &["--control", "ctl.sock", "vm=vm"], &[("RUST_LOG", "info")]);
    let writes = 40;
    let mut guest = Guest::boot(&assets, &serve.sock, "vm", 1, writes);
    assert!(
        guest.wait(Duration::from_secs(180), |g| g.flushed >= 10),
        "the guest did not write:\n{}",
        guest.console
    );
    let out = mcow_ok(w, &["ctl", "-c", "ctl.sock", "snapshot", "vm"]);
    assert!(out.contains("frozen"), "{out}");
    assert!(
        guest.wait(Duration::from_secs(120), |g| g.flushed >= 20),
        "the guest stopped:\n{}",
        guest.console
    );
    let synced_before = guest.flushed;
    let out = mcow_ok(w, &["ctl", "-c", "ctl.sock", "snapshot", "vm", "--wait"]);
    let digest = out.lines().last().unwrap().trim().to_string();
    assert!(digest.starts_with("sha256:"), "{out}");
    guest.finish(u64::from(writes));
    let log = serve.stop_with_log();
    assert!(log.contains("snapshot sealed") || log.contains("snapshot taken"), "{log}");

    assert_eq!(layers("vm"), before + 2, "two snapshots, two layers");
    mcow_ok(w, &["check", "vm"]);
    let raw = w.join("vm.raw");
    mcow_ok(w, &["export", "vm", raw.to_str().unwrap()]);
    assert_eq!(assert_files(w, &raw, 1, u64::from(writes), u64::from(writes)), u64::from(writes));

    // The sealed layers, elsewhere: pushed to an OCI layout, served lazily from it.
    let image = format!("file://{}/img:snap", w.display());
    mcow_ok(w, &["push", "vm", &image]);
    let elsewhere = Serve::start(w, &["--cache", "cache2", &format!("snap={image}")]);
    let copy = w.join("snap.raw");
    tool_ok("nbdcopy", w, &[&elsewhere.unix_uri("snap"), copy.to_str().unwrap()]);
    elsewhere.stop();
    let files = assert_files(w, &copy, 1, synced_before, u64::from(writes));
    eprintln!(
        "the image holds {files} of {writes} files; the guest had synced {synced_before} before the snapshot"
    );
    assert!(files < u64::from(writes), "the image holds {files} files: the snapshot did not freeze the disk");
}

/// The pid in `file` once it is there and names a process other than `not`.
fn wait_pid(file: &Path, not: Option<u32>, limit: Duration) -> u32 {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(pid) = std::fs::read_to_string(file).ok().and_then(|s| s.trim().parse::<u32>().ok())
            && Some(pid) != not
            && Path::new(&format!("/proc/{pid}")).exists()
        {
            return pid;
        }
        assert!(Instant::now() < deadline, "no server pid in {} (other than {not:?})", file.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Tried: two guests writing 40 synced files each to their disks, served by `mcow serve
/// --control --state` under `systemd-socket-activate` (the NBD and control sockets made once
/// and inherited, the server run again whenever it exits, as systemd's Restart=always does),
/// the exports added with `mcow ctl`; `kill -9` of the server once
/// both guests have synced 10 files, then a graceful restart (SIGTERM) once both have synced
/// 20. QEMU's NBD client has `reconnect-delay`; nbdinfo connects right after the kill. Must
/// hold: nbdinfo is answered (by the next server: no connection is refused); the restarted
/// server lists both exports (from its state file); both guests carry
/// on and finish every write without an I/O error; the server really ran three times; after it
/// stops, `mcow check` is clean on both disks, and each disk holds all 40 of its guest's files
/// with their content in a clean filesystem: no flushed write was lost.
#[test]
fn a_killed_or_restarted_server_loses_no_flushed_write() {
    let _one = one_at_a_time();
    for t in ["qemu-system-x86_64", "systemd-socket-activate", "e2fsck"] {
        require(t);
    }
    let assets = assets();
    let t = tempfile::Builder::new().prefix("mcow-restart").tempdir_in("/tmp").unwrap();
    let w = t.path();
    ext4_disk(w, "vm1");
    ext4_disk(w, "vm2");
    let sock = w.join("nbd.sock");
    let ctl = w.join("ctl.sock");
    // The supervisor: socket-activate keeps the listening sockets (fds 3 and 4: NBD, control)
    // for ever; each server it runs gets them through LISTEN_FDS (LISTEN_PID left empty: the
    // pid differs from the shell's), and the exports the control API added through --state.
    // Each run's pid goes to serve.pid.
    let script = format!(
        "while [ ! -e stop ]; do (echo $BASHPID > serve.pid; LISTEN_PID= exec {} serve --control ctl.sock \
         --state state.json >>serve.log 2>&1); echo exited >> runs.log; done",
        env!("CARGO_BIN_EXE_mcow")
    );
    let mut supervisor = Command::new(tool("timeout"))
        .args(["-k", "5", "400"])
        .arg(require("systemd-socket-activate"))
        .arg("-l")
        .arg(&sock)
        .arg("-l")
        .arg(&ctl)
        .args(["-E", "RUST_LOG=info", "bash", "-c", &script])
        .current_dir(w)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Stop<'a>(&'a Path, &'a mut Child);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            let _ = std::fs::write(self.0.join("stop"), "");
            if let Some(pid) = std::fs::read_to_string(self.0.join("serve.pid"))
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
            {
                let _ = Command::new("kill").arg(pid.to_string()).status();
            }
            if wait_timeout(self.1, Duration::from_secs(20)).is_none() {
                let _ = self.1.kill();
                let _ = self.1.wait();
            }
        }
    }
    let stop = Stop(w, &mut supervisor);
    let writes = 40u32;
    // The exports, through the control API (socket-activate runs the server once the first
    // client connects).
    let c = ctl.to_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(ctl.exists() && sock.exists()) {
        assert!(Instant::now() < deadline, "systemd-socket-activate made no sockets");
        std::thread::sleep(Duration::from_millis(20));
    }
    mcow_ok(w, &["ctl", "-c", c, "add", "vm1", w.join("vm1").to_str().unwrap()]);
    mcow_ok(w, &["ctl", "-c", c, "add", "vm2", w.join("vm2").to_str().unwrap()]);
    let first = wait_pid(&w.join("serve.pid"), None, Duration::from_secs(30));
    let mut g1 = Guest::boot(&assets, &sock, "vm1", 1, writes);
    let mut g2 = Guest::boot(&assets, &sock, "vm2", 2, writes);
    let limit = Duration::from_secs(200);
    assert!(
        g1.wait(limit, |g| g.flushed >= 10) && g2.wait(limit, |g| g.flushed >= 10),
        "guests did not write"
    );
    send_signal(first, "KILL");
    // A client connecting while no server runs waits in the socket's backlog for the next one:
    // never refused.
    let size = tool_ok("nbdinfo", w, &["--size", &format!("nbd+unix:///vm1?socket={}", sock.display())]);
    assert_eq!(size.trim(), (64 * MIB).to_string());
    let second = wait_pid(&w.join("serve.pid"), Some(first), Duration::from_secs(20));
    let listed = mcow_ok(w, &["ctl", "-c", c, "list"]);
    assert!(
        listed.contains("vm1") && listed.contains("vm2"),
        "the restarted server lost its exports:\n{listed}"
    );
    assert!(
        g1.wait(limit, |g| g.flushed >= 20) && g2.wait(limit, |g| g.flushed >= 20),
        "guests stopped after the kill:\n{}\n{}",
        g1.console,
        g2.console
    );
    send_signal(second, "TERM");
    let third = wait_pid(&w.join("serve.pid"), Some(second), Duration::from_secs(20));
    g1.finish(u64::from(writes));
    g2.finish(u64::from(writes));
    drop(stop);
    let state = std::fs::read_to_string(w.join("state.json")).unwrap();
    assert!(state.contains("\"vm1\"") && state.contains("\"vm2\""), "{state}");
    let runs = std::fs::read_to_string(w.join("runs.log")).unwrap_or_default();
    assert!(runs.lines().count() >= 3 && third != second, "the server ran {} times", runs.lines().count());
    let log = std::fs::read_to_string(w.join("serve.log")).unwrap();
    assert!(
        log.contains("stopping: finishing in-flight requests"),
        "the graceful stop is not in the log:\n{log}"
    );
    for (disk, id) in [("vm1", 1), ("vm2", 2)] {
        mcow_ok(w, &["check", disk]);
        let raw = w.join(format!("{disk}.raw"));
        mcow_ok(w, &["export", disk, raw.to_str().unwrap()]);
        assert_eq!(assert_files(w, &raw, id, u64::from(writes), u64::from(writes)), u64::from(writes));
    }
}
