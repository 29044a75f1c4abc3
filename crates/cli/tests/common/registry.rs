//! Debian's docker-registry for the CLI tests: on a free loopback port with its storage in a
//! temporary directory, stopped with SIGTERM on drop; it can be stopped and started again on the
//! same port and data (around an offline `garbage-collect`, which needs the registry stopped).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::nbd::{tool, tool_ok, tool_run, wait_timeout};

/// Debian's docker-registry on a free loopback port, its storage in `dir/data`. SIGTERM on drop.
pub struct Registry {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// Whether the registry writes its access log (one line per request) into its log.
    access_log: bool,
}

impl Registry {
    pub fn start(dir: &Path) -> Registry {
        Registry::start_with(dir, false)
    }

    /// A registry that logs every request it answers (see [`Registry::access_log`]).
    pub fn start_logged(dir: &Path) -> Registry {
        Registry::start_with(dir, true)
    }

    fn start_with(dir: &Path, access_log: bool) -> Registry {
        tool("docker-registry");
        tool("curl");
        std::fs::create_dir_all(dir).unwrap();
        let mut r = Registry { port: 0, dir: dir.to_path_buf(), child: None, access_log };
        for _ in 0..10 {
            r.port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            if r.spawn() {
                return r;
            }
        }
        panic!("docker-registry would not start; log:\n{}", r.log());
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The registry's configuration file (for `docker-registry garbage-collect`).
    pub fn config(&self) -> PathBuf {
        self.dir.join("registry.yml")
    }

    /// The file holding blob `digest` (`sha256:<hex>`) in the registry's storage.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        self.dir.join(format!("data/docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
    }

    /// The requests answered so far (of a registry started with [`Registry::start_logged`]), as
    /// (method, path and query, status), in order, from its access log (combined log format:
    /// `… "METHOD URI HTTP/1.1" STATUS …`).
    pub fn access_log(&self) -> Vec<(String, String, u16)> {
        assert!(self.access_log, "the registry was started without its access log");
        self.log()
            .lines()
            .filter_map(|l| {
                let (_, rest) = l.split_once('"')?;
                let (request, rest) = rest.split_once('"')?;
                let mut words = request.split(' ');
                let (method, uri) = (words.next()?, words.next()?);
                let status = rest.split_whitespace().next()?.parse().ok()?;
                Some((method.to_string(), uri.to_string(), status))
            })
            .collect()
    }

    /// Writes the configuration for `self.port` and starts the registry; false if it exited
    /// before answering (the port was taken).
    fn spawn(&mut self) -> bool {
        std::fs::write(
            self.config(),
            format!(
                "version: 0.1\nlog: {{level: warn, accesslog: {{disabled: {}}}}}\n\
                 storage:\n  filesystem: {{rootdirectory: {}}}\n  delete: {{enabled: true}}\n\
                 http: {{addr: 127.0.0.1:{}, secret: test-secret}}\n",
                !self.access_log,
                self.dir.join("data").display(),
                self.port
            ),
        )
        .unwrap();
        let log = std::fs::File::create(self.dir.join("registry.log")).unwrap();
        let child = Command::new(tool("docker-registry"))
            .arg("serve")
            .arg(self.config())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting docker-registry");
        self.child = Some(child);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if self.child.as_mut().unwrap().try_wait().unwrap().is_some() {
                self.child = None;
                return false;
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        panic!("docker-registry did not answer in 10 s; log:\n{}", self.log());
    }

    /// SIGTERM, and waits for the registry to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            if wait_timeout(&mut child, Duration::from_secs(10)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Starts the stopped registry again on the same port and data.
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

    /// Runs `docker-registry garbage-collect [ARGS] CONFIG` on the stopped registry (the
    /// collector must not race uploads: the registry has to be stopped or read-only); asserts
    /// it succeeds and returns its output.
    pub fn garbage_collect(&mut self, args: &[&str]) -> String {
        assert!(self.child.is_none(), "garbage-collect needs the registry stopped");
        let config = self.config();
        let mut all: Vec<&str> = vec!["garbage-collect"];
        all.extend_from_slice(args);
        all.push(config.to_str().unwrap());
        let r = tool_run("docker-registry", &self.dir, &all);
        assert_eq!(r.code, 0, "docker-registry {all:?} failed:\n{}{}", r.stdout, r.stderr);
        format!("{}{}", r.stdout, r.stderr)
    }

    /// The manifest of `repo:tag`, as the registry serves it.
    pub fn manifest(&self, repo: &str, tag: &str) -> String {
        tool_ok(
            "curl",
            Path::new("/"),
            &[
                "-sf",
                "-H",
                "Accept: application/vnd.oci.image.manifest.v1+json",
                &format!("http://127.0.0.1:{}/v2/{repo}/manifests/{tag}", self.port),
            ],
        )
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}
