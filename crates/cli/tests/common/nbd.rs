//! Helpers for the `mcow serve` end-to-end tests: locating and running the real NBD clients
//! (qemu-io, qemu-img, libnbd tools) under a timeout, a running `mcow serve` child process that
//! is always stopped, and guards for nbdfuse, loop devices and mounts that are undone even when
//! a test panics.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::Run;

/// Seconds any external command may take before the test fails instead of hanging.
pub const TIMEOUT_SECS: u32 = 60;

/// Where a tool is installed; panics with a clear message if it is not (never skips).
pub fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    let package = match name {
        "qemu-img" | "qemu-io" | "qemu-nbd" => "qemu-utils",
        "nbdinfo" | "nbdcopy" | "nbdfuse" | "nbdsh" => "libnbd-bin (and python3-libnbd for nbdsh)",
        "nbdkit" => "nbdkit",
        "mkfs.ext4" | "e2fsck" | "debugfs" => "e2fsprogs",
        "losetup" | "mount" | "umount" => "mount / util-linux",
        "docker-registry" => "docker-registry",
        "skopeo" => "skopeo",
        "curl" => "curl",
        "promtool" => "prometheus",
        _ => "the package providing it",
    };
    panic!("{name} is required by the `mcow serve` tests but is not installed: install {package}");
}

/// A command running `name` under `timeout`, with /usr/bin first on PATH (nbdsh needs the
/// system python3, which has the `nbd` module).
pub fn tool_cmd(name: &str, cwd: &Path) -> Command {
    let path = tool(name);
    let mut c = Command::new(tool("timeout"));
    c.args(["-k", "5", &TIMEOUT_SECS.to_string()]).arg(path).current_dir(cwd);
    let old = std::env::var("PATH").unwrap_or_default();
    c.env("PATH", format!("/usr/bin:/usr/sbin:/bin:/sbin:{old}"));
    c
}

fn finish(name: &str, args: &[&str], out: std::process::Output) -> Run {
    let r = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(
        r.code != 124 && r.code != 137,
        "{name} {args:?} timed out after {TIMEOUT_SECS} s:\nstdout:\n{}\nstderr:\n{}",
        r.stdout,
        r.stderr
    );
    r
}

/// Runs a tool (under a timeout) and returns its output, whatever the exit code.
pub fn tool_run(name: &str, cwd: &Path, args: &[&str]) -> Run {
    let out = tool_cmd(name, cwd).args(args).stdin(Stdio::null()).output().expect("running a tool");
    finish(name, args, out)
}

/// Runs a tool (under a timeout), asserts it exits 0 and returns stdout.
pub fn tool_ok(name: &str, cwd: &Path, args: &[&str]) -> String {
    let r = tool_run(name, cwd, args);
    assert_eq!(
        r.code, 0,
        "{name} {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        r.code, r.stdout, r.stderr
    );
    r.stdout
}

/// Runs a shell pipeline (under a timeout), asserts it exits 0 and returns stdout.
pub fn sh_ok(cwd: &Path, script: &str) -> String {
    let out = Command::new(tool("timeout"))
        .args(["-k", "5", &TIMEOUT_SECS.to_string(), "sh", "-ec", script])
        .current_dir(cwd)
        .env("PATH", format!("/usr/bin:/usr/sbin:/bin:/sbin:{}", std::env::var("PATH").unwrap_or_default()))
        .stdin(Stdio::null())
        .output()
        .expect("running sh");
    let r = finish("sh", &[script], out);
    assert_eq!(
        r.code, 0,
        "sh -c {script:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        r.code, r.stdout, r.stderr
    );
    r.stdout
}

/// The sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> String {
    let out = tool_ok("sha256sum", Path::new("/"), &[path.to_str().unwrap()]);
    out.split_whitespace().next().unwrap().to_string()
}

/// Sends `sig` (e.g. "TERM") to a process.
pub fn send_signal(pid: u32, sig: &str) {
    let st = Command::new(tool("kill"))
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("running kill");
    assert!(st.success(), "kill -{sig} {pid} failed");
}

/// Waits for a child up to `limit`; `None` if it is still running then.
pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("waiting for a child") {
            return Some(st);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A running `mcow serve`, listening on a Unix socket and on an ephemeral loopback TCP port.
/// Dropping it sends SIGTERM (then SIGKILL if it does not exit).
pub struct Serve {
    child: Option<Child>,
    pub sock: PathBuf,
    pub port: u16,
    log: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Serve {
    /// Starts `mcow serve -k DIR/NAME.sock --tcp 127.0.0.1:0 ARGS...` in `cwd` and waits until
    /// it prints both listening addresses.
    pub fn start(cwd: &Path, args: &[&str]) -> Serve {
        Serve::start_env(cwd, args, &[])
    }

    /// [`Serve::start`] with extra environment variables (e.g. `RUST_LOG`).
    pub fn start_env(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Serve {
        Serve::start_verb(cwd, "serve", args, env)
    }

    /// [`Serve::start_env`] with another verb that serves (`trace`).
    #[allow(dead_code)]
    pub fn start_verb(cwd: &Path, verb: &str, args: &[&str], env: &[(&str, &str)]) -> Serve {
        Serve::start_wrapped(&[], cwd, verb, args, env)
    }

    /// [`Serve::start_verb`] run through `wrapper` (a command that execs its arguments, such as
    /// `ip netns exec NS`, so that the child is still the server: signals reach it).
    pub fn start_wrapped(
        wrapper: &[&str],
        cwd: &Path,
        verb: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Serve {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let sock = cwd.join(format!("nbd{n}.sock"));
        assert!(sock.as_os_str().len() < 100, "socket path too long for AF_UNIX: {}", sock.display());
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(tool(program));
                c.args(rest).arg(env!("CARGO_BIN_EXE_mcow"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_mcow")),
        };
        let mut child = cmd
            .arg(verb)
            .arg("-k")
            .arg(&sock)
            .args(["--tcp", "127.0.0.1:0"])
            .args(args)
            .current_dir(cwd)
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting mcow serve");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel::<String>();
        let reader = {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    log.lock().unwrap().push_str(&format!("{line}\n"));
                    let _ = tx.send(line);
                }
            })
        };
        let mut serve = Serve { child: Some(child), sock: sock.clone(), port: 0, log, reader: Some(reader) };
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut unix_seen = false;
        while serve.port == 0 || !unix_seen {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("mcow: serving on nbd://127.0.0.1:") {
                        serve.port =
                            rest.trim().parse().unwrap_or_else(|e| panic!("bad port in {line:?}: {e}"));
                        assert_ne!(serve.port, 0, "serve printed port 0 instead of the bound port");
                    } else if line.starts_with("mcow: serving on nbd+unix:///?socket=") {
                        assert_eq!(line, format!("mcow: serving on nbd+unix:///?socket={}", sock.display()));
                        unix_seen = true;
                    }
                }
                Err(_) => {
                    let st = serve.child.as_mut().unwrap().try_wait().unwrap();
                    panic!(
                        "mcow serve {args:?} did not become ready (status {st:?}); stderr:\n{}",
                        serve.log()
                    );
                }
            }
        }
        assert!(sock.exists(), "socket {} missing after ready", sock.display());
        serve
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// What the server printed on stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    pub fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }

    /// Whether the server process is still running.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// SIGTERM, then waits (at most 20 s) and returns the exit code and how long it took.
    pub fn stop_timed(mut self) -> (i32, Duration) {
        let mut child = self.child.take().unwrap();
        let start = Instant::now();
        send_signal(child.id(), "TERM");
        let Some(st) = wait_timeout(&mut child, Duration::from_secs(20)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("mcow serve did not exit within 20 s of SIGTERM; stderr:\n{}", self.log());
        };
        (st.code().unwrap_or(-1), start.elapsed())
    }

    /// [`Serve::stop`], then returns everything the server printed on stderr (read to the end).
    pub fn stop_with_log(mut self) -> String {
        let reader = self.reader.take();
        let log = self.log.clone();
        self.stop();
        if let Some(r) = reader {
            let _ = r.join();
        }
        log.lock().unwrap().clone()
    }

    /// SIGTERM; asserts the server exits 0 and removed its socket.
    pub fn stop(self) {
        let sock = self.sock.clone();
        let log = self.log.clone();
        let (code, _) = self.stop_timed();
        assert_eq!(code, 0, "mcow serve exited {code} after SIGTERM; stderr:\n{}", log.lock().unwrap());
        assert!(!sock.exists(), "the Unix socket {} was left behind", sock.display());
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            if wait_timeout(&mut child, Duration::from_secs(15)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Runs `umount` on `path` (lazily as a last resort); true on success.
fn umount(path: &Path) -> bool {
    let st = Command::new(tool("timeout"))
        .args(["-k", "5", "30"])
        .arg(tool("umount"))
        .arg(path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if matches!(st, Ok(s) if s.success()) {
        return true;
    }
    let _ = Command::new(tool("umount")).arg("-l").arg(path).status();
    false
}

/// An NBD export seen as a file `MNT/disk.img` through `nbdfuse`. Unmounted on drop.
pub struct FuseFile {
    child: Option<Child>,
    mnt: PathBuf,
    pub file: PathBuf,
}

impl FuseFile {
    /// Mounts `uri` at `mnt` (an existing empty directory) as `mnt/disk.img`; waits until ready.
    pub fn mount(mnt: &Path, uri: &str) -> FuseFile {
        let pidfile = mnt.with_extension("pid");
        let _ = std::fs::remove_file(&pidfile);
        let file = mnt.join("disk.img");
        let child = Command::new(tool("nbdfuse"))
            .arg("-P")
            .arg(&pidfile)
            .arg(&file)
            .arg(uri)
            .stdin(Stdio::null())
            .spawn()
            .expect("starting nbdfuse");
        let mut f = FuseFile { child: Some(child), mnt: mnt.to_path_buf(), file };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !pidfile.exists() || !f.file.exists() {
            if let Some(st) = f.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("nbdfuse {uri} exited early: {st}");
            }
            assert!(Instant::now() < deadline, "nbdfuse {uri} not ready within 20 s");
            std::thread::sleep(Duration::from_millis(10));
        }
        f
    }

    /// Unmounts; asserts the unmount worked and nbdfuse exited 0.
    pub fn finish(mut self) {
        let mut child = self.child.take().unwrap();
        assert!(umount(&self.mnt), "umount {} failed", self.mnt.display());
        let st = wait_timeout(&mut child, Duration::from_secs(20));
        if st.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let st = st.expect("nbdfuse did not exit after its mount point was unmounted");
        assert!(st.success(), "nbdfuse exited with {st}");
    }
}

impl Drop for FuseFile {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            umount(&self.mnt);
            if wait_timeout(&mut child, Duration::from_secs(10)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// A loop device on a file. Detached on drop.
pub struct Loop {
    pub dev: Option<String>,
}

impl Loop {
    pub fn attach(file: &Path) -> Loop {
        let out = tool_ok("losetup", Path::new("/"), &["-f", "--show", file.to_str().unwrap()]);
        let dev = out.trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {out:?}");
        Loop { dev: Some(dev) }
    }

    pub fn dev(&self) -> &str {
        self.dev.as_deref().unwrap()
    }

    pub fn finish(mut self) {
        let dev = self.dev.take().unwrap();
        tool_ok("losetup", Path::new("/"), &["-d", &dev]);
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if let Some(dev) = self.dev.take() {
            let _ = Command::new(tool("losetup")).args(["-d", &dev]).status();
        }
    }
}

/// A mounted filesystem. Unmounted on drop.
pub struct Mount {
    pub dir: Option<PathBuf>,
}

impl Mount {
    pub fn attach(dev: &str, dir: &Path) -> Mount {
        tool_ok("mount", Path::new("/"), &[dev, dir.to_str().unwrap()]);
        Mount { dir: Some(dir.to_path_buf()) }
    }

    pub fn finish(mut self) {
        let dir = self.dir.take().unwrap();
        assert!(umount(&dir), "umount {} failed", dir.display());
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            umount(&dir);
        }
    }
}
