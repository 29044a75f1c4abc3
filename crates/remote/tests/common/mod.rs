//! Helpers for the remote crate's integration tests: real servers (Debian's `docker-registry`,
//! nginx) on loopback ports in temporary directories, stopped with SIGTERM when dropped, and
//! 3-layer test disks built with the engine.
#![allow(dead_code)]

pub mod origin;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mcow_engine::{CreateOptions, Digest, Disk, FetchPolicy, OpenOptions};

/// A fetch policy that fetches exactly the blocks read (one request per missing block).
#[allow(dead_code)]
pub const EXACT: FetchPolicy = FetchPolicy { window: 1, readahead: 0 };

/// Held while spawning processes and while building disks. A child briefly holds copies of all
/// the parent's descriptors between fork and exec, and with them the `flock` locks of disk files
/// another test thread has just closed: taking the disk's lock again would then fail.
static FORK_LOCK: Mutex<()> = Mutex::new(());

pub fn fork_lock() -> MutexGuard<'static, ()> {
    FORK_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Panics unless `cmd` is installed, naming the Debian package that provides it.
pub fn require(cmd: &str, package: &str) {
    let _g = fork_lock();
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "`{cmd}` is missing: apt-get install {package} (or run scripts/install-deps.sh)");
}

/// A port that was free a moment ago (bind port 0, read it, close).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// True once something on `port` answers an HTTP request with a status line.
fn answers_http(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 8];
    s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.")
}

/// Sends SIGTERM to the process and waits for it (SIGKILL after 5 s).
fn terminate(child: &mut Child) {
    let _g = fork_lock();
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Spawns `cmd`, then waits until `port` answers HTTP; `false` if the process exited first
/// (most likely the port was taken).
fn spawn_ready(mut cmd: Command, port: u16, log: &Path) -> Option<Child> {
    let out = std::fs::File::create(log).unwrap();
    let err = out.try_clone().unwrap();
    let mut child = {
        let _g = fork_lock();
        cmd.stdout(out).stderr(err).stdin(Stdio::null()).spawn().expect("spawn server")
    };
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if let Ok(Some(_)) = child.try_wait() {
            return None;
        }
        if answers_http(port) {
            return Some(child);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    terminate(&mut child);
    panic!("server did not get ready in 10 s; log:\n{}", std::fs::read_to_string(log).unwrap_or_default());
}

/// Debian's docker-registry on a loopback port, storage in `dir/data`.
pub struct RegistryServer {
    pub dir: PathBuf,
    pub port: u16,
    htpasswd: Option<PathBuf>,
    child: Option<Child>,
}

impl RegistryServer {
    /// Starts a registry (with htpasswd basic auth if `htpasswd` is given).
    pub fn start(dir: &Path, htpasswd: Option<&Path>) -> RegistryServer {
        require("docker-registry", "docker-registry");
        std::fs::create_dir_all(dir).unwrap();
        let mut s = RegistryServer {
            dir: dir.to_path_buf(),
            port: 0,
            htpasswd: htpasswd.map(Path::to_path_buf),
            child: None,
        };
        for _ in 0..10 {
            s.port = free_port();
            if s.spawn() {
                return s;
            }
        }
        panic!("docker-registry would not start; log:\n{}", s.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
    }

    fn spawn(&mut self) -> bool {
        let auth = match &self.htpasswd {
            Some(p) => format!("auth: {{htpasswd: {{realm: mcow-test, path: {}}}}}\n", p.display()),
            None => String::new(),
        };
        let config = format!(
            "version: 0.1\n\
             log: {{level: warn, accesslog: {{disabled: true}}}}\n\
             storage:\n  filesystem: {{rootdirectory: {}}}\n  delete: {{enabled: true}}\n  \
             maintenance: {{uploadpurging: {{enabled: false}}}}\n\
             http: {{addr: 127.0.0.1:{}, secret: test-secret}}\n{auth}",
            self.data().display(),
            self.port
        );
        let cfg = self.dir.join("registry.yml");
        std::fs::write(&cfg, config).unwrap();
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve").arg(&cfg).current_dir(&self.dir);
        self.child = spawn_ready(cmd, self.port, &self.dir.join("registry.log"));
        self.child.is_some()
    }

    /// The storage root.
    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The file holding blob `d` in the registry's storage.
    pub fn blob_file(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.data().join(format!("docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
    }

    /// `host:port`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c);
        }
    }

    /// Starts it again on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        for _ in 0..50 {
            if self.spawn() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("docker-registry would not restart on port {}; log:\n{}", self.port, self.log());
    }
}

impl Drop for RegistryServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// nginx serving `root` read-only on a loopback port (config and logs in `dir`).
pub struct Nginx {
    pub port: u16,
    child: Child,
}

impl Nginx {
    pub fn start(dir: &Path, root: &Path) -> Nginx {
        require("nginx", "nginx-light");
        for d in ["logs", "tmp"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        make_world_readable(root);
        for _ in 0..10 {
            let port = free_port();
            let conf = format!(
                "daemon off; master_process on; worker_processes 1;\n\
                 pid {d}/nginx.pid; error_log {d}/logs/error.log warn;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{\n  log_format conn '$connection $status \"$request\" $http_range';\n  \
                 access_log {d}/logs/access.log conn;\n  client_body_temp_path {d}/tmp/body; proxy_temp_path {d}/tmp/proxy;\n  \
                 fastcgi_temp_path {d}/tmp/fastcgi; uwsgi_temp_path {d}/tmp/uwsgi; scgi_temp_path {d}/tmp/scgi;\n  \
                 default_type application/octet-stream; sendfile on;\n  \
                 server {{ listen 127.0.0.1:{port}; root {r}; location / {{ }} }}\n}}\n",
                d = dir.display(),
                r = root.display()
            );
            let path = dir.join("nginx.conf");
            std::fs::write(&path, conf).unwrap();
            let mut cmd = Command::new("nginx");
            cmd.arg("-e").arg(dir.join("logs/error.log")).arg("-c").arg(&path).arg("-p").arg(dir);
            if let Some(child) = spawn_ready(cmd, port, &dir.join("nginx.out")) {
                return Nginx { port, child };
            }
        }
        panic!(
            "nginx would not start; log:\n{}",
            std::fs::read_to_string(dir.join("logs/error.log")).unwrap_or_default()
        );
    }
}

impl Nginx {
    /// The access log so far: one line per request, `CONNECTION STATUS "REQUEST" RANGE`, where
    /// CONNECTION is nginx's serial number of the TCP connection it came on.
    pub fn access_log(dir: &Path) -> Vec<String> {
        std::fs::read_to_string(dir.join("logs/access.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

/// chmod a+rX over `path` and up to `/` (nginx's workers run as nobody).
pub fn make_world_readable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _g = fork_lock();
    let _ = Command::new("chmod").args(["-R", "a+rX"]).arg(path).status();
    let mut p = path.parent();
    while let Some(d) = p {
        if let Ok(m) = std::fs::metadata(d) {
            let mode = m.permissions().mode();
            if mode & 0o005 != 0o005 {
                let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o005));
            }
        }
        p = d.parent();
    }
}

pub const BS: u64 = 65536;
pub const SIZE: u64 = 8 << 20;

/// Deterministic bytes for (`seed`, `len`), never a long run of zeros.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x as u8) | 1
        })
        .collect()
}

/// Text-like bytes (one numbered line, repeated): zstd shrinks them many times.
pub fn text(seed: u64, len: usize) -> Vec<u8> {
    let line = format!("mcow test data {seed}: the quick brown fox jumps over the lazy dog\n");
    line.bytes().cycle().take(len).collect()
}

/// Writes one layer's worth of data (distinct per `seed`), zero markers from the second layer
/// on, then seals it.
pub fn add_layer(disk: &Path, seed: u64) {
    add_layer_with(disk, seed, false)
}

/// [`add_layer`]; with `mixed`, every other write is [`text`] (compressible) rather than
/// [`pattern`] (noise, which does not compress).
fn add_layer_with(disk: &Path, seed: u64, mixed: bool) {
    let _g = fork_lock();
    let d = Disk::open(disk, OpenOptions::default()).unwrap();
    let l = seed % 3;
    for k in 0..8u64 {
        let off = (k * 12 + l * 3) * BS + 500 + seed % 7;
        let data = if mixed && k % 2 == 0 {
            text(seed * 100 + k, 100_000)
        } else {
            pattern(seed * 100 + k, 100_000)
        };
        d.write(off, &data).unwrap();
    }
    if seed > 0 {
        // Zero markers over data of the layers below.
        d.write_zeroes((seed % 8) * 12 * BS, BS, false).unwrap();
        d.write_zeroes(((seed + 3) % 8) * 12 * BS + 2 * BS, 3 * BS, false).unwrap();
    }
    d.flush().unwrap();
    drop(d);
    mcow_engine::ops::merge(disk, 0, &mut |_, _| {}).unwrap();
}

/// A 3-layer disk at `dir/disk` (layers in `dir/layers`), with its bytes.
pub fn build_disk(dir: &Path) -> (PathBuf, Vec<u8>) {
    build_disk_with(dir, false)
}

/// [`build_disk`] whose layers are half text (compressible) and half noise, so that a
/// compressed push has frames of both kinds (zstd frames, and blocks stored as they are).
pub fn build_compressible_disk(dir: &Path) -> (PathBuf, Vec<u8>) {
    build_disk_with(dir, true)
}

fn build_disk_with(dir: &Path, mixed: bool) -> (PathBuf, Vec<u8>) {
    let disk = dir.join("disk");
    let g = fork_lock();
    Disk::create(
        &disk,
        &CreateOptions {
            virtual_size: SIZE,
            block_size: BS as u32,
            store: dir.join("layers"),
            layers: vec![],
        },
    )
    .unwrap();
    drop(g);
    for seed in 0..3 {
        add_layer_with(&disk, seed, mixed);
    }
    let bytes = read_all(&Disk::open(&disk, OpenOptions::default()).unwrap());
    (disk, bytes)
}

/// All of a disk's bytes.
pub fn read_all(d: &Disk) -> Vec<u8> {
    let mut all = vec![0u8; d.size() as usize];
    d.read(0, &mut all).unwrap();
    all
}

/// The disk's sealed layers (digest, file size), bottom first.
pub fn layers(disk: &Path) -> Vec<(Digest, u64)> {
    let d = Disk::open(disk, OpenOptions { read_only: true, verify: false, force_share: true }).unwrap();
    d.stack().layers().iter().map(|l| (l.digest, l.file_len())).collect()
}

/// Virtual blocks whose data lives in sealed layer `layer` (not zero, not the top).
pub fn data_blocks_of(d: &Disk, layer: u32) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for vb in 0..d.size() / BS {
        if let (Some(loc), _) = d.resolve(vb, vb + 1)
            && loc.kind == mcow_format::ExtentKind::Data
            && loc.layer == layer
        {
            out.push((vb, loc.pblock));
        }
    }
    out
}

/// The files in a store's `blobs/sha256` (as digests), sorted, and whether its `tmp/` is empty:
/// what a pull left behind.
pub fn store_contents(store: &Path) -> (Vec<String>, bool) {
    let list = |p: PathBuf| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(p)
            .map(|d| d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        v.sort();
        v
    };
    (list(store.join("blobs/sha256")), list(store.join("tmp")).is_empty())
}

/// Tried by the compressed round trips: an image pushed with `push --compress` at level 3.
/// Checks what every backend must show of it: each manifest layer entry is a compressed blob
/// whose config record names the source layer by `diff_id` (with its length), and the blobs
/// are smaller in all than the layers (the data is half text).
pub fn check_compressed_image(remote: &dyn mcow_remote::Remote, r: &mcow_remote::Reference, disk: &Path) {
    let image = mcow_remote::transfer::fetch_image(remote, r).unwrap();
    let src = layers(disk);
    assert_eq!(image.config.layers.len(), src.len());
    for ((rec, desc), (digest, len)) in image.config.layers.iter().zip(image.manifest.disk_layers()).zip(&src)
    {
        assert_eq!(desc.media_type, mcow_remote::image::COMPRESSED_LAYER_MEDIA_TYPE);
        assert_eq!((rec.layer_digest(), rec.layer_size()), (*digest, *len));
        assert_ne!(rec.digest, *digest, "the blob is named by its own digest");
    }
    let blobs: u64 = image.config.layers.iter().map(|r| r.size).sum();
    let layers: u64 = src.iter().map(|l| l.1).sum();
    assert!(blobs < layers * 3 / 4, "blobs of {blobs} bytes for layers of {layers}");
}
