//! The S3 backend against a real S3-compatible server: s3s-fs (installed by
//! scripts/install-deps.sh), which checks SigV4 signatures and keeps objects as plain files.
//!
//! Every case that goes through `open_remote` runs in the one test function below, because the
//! backend reads its configuration from process-wide environment variables; the cases that use
//! `S3Store` directly pass an explicit `S3Config` instead.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mcow_engine::{CreateOptions, Disk, FetchPolicy, OpenOptions, ops};
use mcow_format::Digest;
use mcow_remote::RangeRead;
use mcow_remote::http_client::HttpConfig;
use mcow_remote::layout::ObjectStore;
use mcow_remote::retry::RetryPolicy;
use mcow_remote::s3::{S3Config, S3Store};
use mcow_remote::transfer::{PushOptions, Sources, push_with};
use mcow_remote::{Reference, RemoteError, pull, push};

const KEY: &str = "AKIDMCOWTEST";
const SECRET: &str = "mcow-test-secret";
const BUCKET: &str = "mcow";
const SIZE: u64 = 4 << 20;
const BS: u32 = 65536;

/// A running s3s-fs on a free loopback port; dropping it sends SIGTERM (then SIGKILL).
struct S3Server {
    child: Child,
    endpoint: String,
    root: PathBuf,
}

impl S3Server {
    fn start(root: &Path) -> S3Server {
        let found = Command::new("s3s-fs").arg("--version").stdout(Stdio::null()).status();
        if !matches!(found, Ok(s) if s.success()) {
            panic!(
                "s3s-fs is not installed (or not on PATH): run scripts/install-deps.sh, or \
                 `cargo install --locked s3s-fs@0.14.1 --features binary`"
            );
        }
        std::fs::create_dir_all(root).unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", KEY, "--secret-key", SECRET])
            .arg(root)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting s3s-fs");
        let mut server =
            S3Server { child, endpoint: format!("http://127.0.0.1:{port}"), root: root.to_path_buf() };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("s3s-fs exited before listening on port {port}: {status}");
            }
            assert!(Instant::now() < deadline, "s3s-fs did not listen on port {port} within 20 s");
            std::thread::sleep(Duration::from_millis(10));
        }
        server
    }

    fn config(&self, secret: &str) -> S3Config {
        S3Config {
            endpoint: Some(self.endpoint.clone()),
            region: "us-east-1".into(),
            access_key_id: Some(KEY.into()),
            secret_access_key: Some(secret.into()),
            session_token: None,
            http: HttpConfig {
                retry: RetryPolicy { first_delay: Duration::from_millis(10), ..RetryPolicy::default() },
                ..HttpConfig::default()
            },
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_child(&self.child),
            rustix::process::Signal::TERM,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Tried: S3 reads through a proxy in front of the real s3s-fs that, once switched, stops
/// sending each body after its first 1000 bytes and holds the connection open. The store is
/// configured as the `MCOW_HTTP_*` variables would: a 500 ms per-read stall timeout and a 500 ms
/// retry budget (plus the size at 1 MiB/s). Must hold: through the proxy a read works while it
/// behaves; then a ranged read and a download of the whole object each fail with a transient
/// error once the budget is spent (never hang), and work again once the proxy behaves.
fn stalled_bodies_fail_within_the_configured_timeouts(server: &S3Server, payload: &[u8], tmp: &Path) {
    #[path = "common/origin.rs"]
    mod origin;
    let port: u16 = server.endpoint.rsplit(':').next().unwrap().parse().unwrap();
    let proxy = origin::Origin::start(port);
    let mut config = server.config(SECRET);
    config.endpoint = Some(proxy.url());
    config.http.request_timeout = Duration::from_millis(500);
    config.http.pace.min_rate = 1 << 20;
    config.http.retry.deadline = Duration::from_millis(500);
    let store = S3Store::new(config, BUCKET, "direct").unwrap();
    assert_eq!(store.get_range("obj", 1000, 200_000).unwrap(), &payload[1000..201_000]);
    proxy.set(origin::Mode::Stall);
    let start = Instant::now();
    let e = store.get_range("obj", 1000, 200_000).unwrap_err();
    let ranged = start.elapsed();
    assert!(e.is_transient(), "{e}");
    let start = Instant::now();
    let e = store.get_to("obj", &tmp.join("stalled.bin"), &mut |_| {}).unwrap_err();
    let whole = start.elapsed();
    eprintln!("s3 stall: the ranged read failed after {ranged:?}, the download after {whole:?}: {e}");
    assert!(e.is_transient(), "{e}");
    for took in [ranged, whole] {
        assert!(took >= Duration::from_millis(500), "gave up before the budget: {took:?}");
        assert!(took < Duration::from_millis(2500), "past the timeouts: {took:?}");
    }
    proxy.set(origin::Mode::Normal);
    assert_eq!(store.get_range("obj", 1000, 200_000).unwrap(), &payload[1000..201_000]);
}

fn set_env(name: &str, value: &str) {
    // SAFETY: this test binary has a single test, so no other thread reads or writes the
    // environment while it runs.
    unsafe { std::env::set_var(name, value) };
}

/// A disk of three sealed layers (and an empty writable top); returns its directory and content.
fn three_layer_disk(tmp: &Path) -> (PathBuf, Vec<u8>) {
    let dir = tmp.join("src");
    Disk::create(
        &dir,
        &CreateOptions { virtual_size: SIZE, block_size: BS, store: tmp.join("src-layers"), layers: vec![] },
    )
    .unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let writes: [&[(u64, usize, u8)]; 3] = [
        &[(0, 3 << 20, 1), (3 << 20, 100_000, 7)],
        &[(65536, 200_000, 2), (2 << 20, 5000, 3)],
        &[(100, 4000, 4), (SIZE - 65536, 65536, 5)],
    ];
    for (n, layer) in writes.iter().enumerate() {
        {
            let d = Disk::open(&dir, OpenOptions::default()).unwrap();
            for &(off, len, seed) in layer.iter() {
                let data: Vec<u8> =
                    (0..len).map(|i| (i as u64 * 31 + off + u64::from(seed)) as u8 ^ seed).collect();
                d.write(off, &data).unwrap();
                model[off as usize..off as usize + len].copy_from_slice(&data);
            }
            d.flush().unwrap();
        }
        ops::merge(&dir, 0, &mut |_, _| {}).unwrap();
        let d = Disk::open(&dir, OpenOptions::default()).unwrap();
        assert_eq!(d.stack().depth(), n + 1);
    }
    (dir, model)
}

fn read_all(d: &Disk) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE as usize];
    d.read(0, &mut buf).unwrap();
    buf
}

/// The disk's sealed layers (digest, length), bottom first.
fn layer_list(dir: &Path) -> Vec<(Digest, u64)> {
    let d = Disk::open(dir, OpenOptions { read_only: true, verify: false, force_share: true }).unwrap();
    d.stack().layers().iter().map(|l| (l.digest, l.file_len())).collect()
}

/// Tried (inside the one S3 test, its environment set): the three-layer disk pushed compressed
/// under another tag, pushed again, pulled in full into a fresh store and lazily (read in full,
/// twice). Must hold: the compressed push uploads three blobs, under a quarter of the bytes of
/// the uncompressed push (`plain`); the second uploads nothing and gives the same manifest; the
/// full pull makes the source's layers (digests, lengths, bytes) and keeps nothing else; the
/// lazy disk reads every byte right and its second open fetches nothing.
fn compressed_round_trip(src: &Path, model: &[u8], plain: &mcow_remote::transfer::PushReport, tmp: &Path) {
    let r = Reference::parse("s3://mcow/images/demo:zstd").unwrap();
    let opts = PushOptions { trace: None, compress: Some(mcow_format::DEFAULT_LEVEL) };
    let z = push_with(src, &r, &opts, &mut |_, _| {}).unwrap();
    assert_eq!((z.layers, z.uploaded, z.layer_bytes), (3, 3, plain.bytes_uploaded));
    assert!(z.bytes_uploaded < plain.bytes_uploaded / 4, "{} of {}", z.bytes_uploaded, plain.bytes_uploaded);
    let again = push_with(src, &r, &opts, &mut |_, _| {}).unwrap();
    assert_eq!((again.uploaded, again.manifest_digest), (0, z.manifest_digest));

    let full = tmp.join("zfull");
    let pulled = pull(&r, &full, &tmp.join("store-zfull"), false, &mut |_, _| {}).unwrap();
    assert_eq!(pulled.bytes_fetched, z.blob_bytes);
    assert_eq!(layer_list(&full), layer_list(src));
    assert!(read_all(&Disk::open(&full, OpenOptions::default()).unwrap()) == model, "full pull differs");
    let mut kept: Vec<String> = std::fs::read_dir(tmp.join("store-zfull/blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    kept.sort();
    let mut want: Vec<String> = layer_list(src).iter().map(|l| l.0.hex()).collect();
    want.sort();
    assert_eq!(kept, want, "the store keeps the layers, nothing else");
    assert_eq!(std::fs::read_dir(tmp.join("store-zfull/tmp")).unwrap().count(), 0);

    let lazy = tmp.join("zlazy");
    pull(&r, &lazy, &tmp.join("store-zlazy"), true, &mut |_, _| {}).unwrap();
    for round in 0..2 {
        let (d, source) = Sources::new()
            .open_lazy_disk(
                &mcow_engine::Engine::default(),
                &lazy,
                OpenOptions::default(),
                FetchPolicy::default(),
            )
            .unwrap();
        assert!(read_all(&d) == model, "round {round}: the lazy disk differs");
        let (bytes, _) = source.unwrap().stats();
        assert!(if round == 0 { bytes > 0 } else { bytes == 0 }, "round {round}: {bytes}");
    }
}

#[test]
fn s3_push_pull_lazy_pull_and_errors_against_a_real_server() {
    let tmp = tempfile::tempdir().unwrap();
    let server = S3Server::start(&tmp.path().join("s3"));
    let (src, model) = three_layer_disk(tmp.path());

    // The bucket, with a signed PUT through the store itself.
    let direct = S3Store::new(server.config(SECRET), BUCKET, "direct").unwrap();
    direct.create_bucket().unwrap();
    direct.create_bucket().unwrap(); // already ours: fine

    // The object store's operations, with explicit configuration.
    assert!(!direct.exists("nothing").unwrap());
    assert_eq!(direct.get("nothing").unwrap(), None);
    assert!(matches!(direct.get_range("nothing", 0, 10), Err(RemoteError::NotFound { .. })));
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 253) as u8).collect();
    direct.put_bytes("obj", &payload).unwrap();
    assert!(direct.exists("obj").unwrap());
    assert_eq!(direct.get("obj").unwrap().as_deref(), Some(&payload[..]));
    assert_eq!(direct.get_range("obj", 1000, 5000).unwrap(), &payload[1000..6000]);
    assert_eq!(direct.get_range("obj", 299_990, 10).unwrap(), &payload[299_990..]);
    assert!(direct.get_range("obj", 299_990, 11).is_err(), "a range past the end is an error");
    let file = tmp.path().join("obj.bin");
    std::fs::write(&file, &payload).unwrap();
    let mut last = 0;
    direct.put_file("from-file", &file, &mut |n| last = n).unwrap();
    assert_eq!(last, payload.len() as u64);
    let back = tmp.path().join("back.bin");
    direct.get_to("from-file", &back, &mut |n| last = n).unwrap();
    assert_eq!(std::fs::read(&back).unwrap(), payload);
    assert_eq!(last, payload.len() as u64);
    // Objects are plain files under the server's root: the prefix is a directory.
    assert_eq!(std::fs::read(server.root.join(BUCKET).join("direct/obj")).unwrap(), payload);

    // Wrong secret: the signature is refused with a clear 403, and it is not retried.
    let wrong = S3Store::new(server.config("not-the-secret"), BUCKET, "direct").unwrap();
    let e = wrong.exists("obj").unwrap_err();
    assert!(matches!(e, RemoteError::Http { status: 403, .. }), "{e}");
    let e = wrong.get("obj").unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("HTTP 403") && msg.contains("AWS_SECRET_ACCESS_KEY"), "{msg}");
    assert!(!msg.contains("X-Amz-Signature"), "no signed URL in messages: {msg}");

    stalled_bodies_fail_within_the_configured_timeouts(&server, &payload, tmp.path());

    // From here on through `open_remote`, configured by the environment.
    set_env("MCOW_S3_ENDPOINT", &server.endpoint);
    set_env("AWS_REGION", "us-east-1");
    set_env("AWS_ACCESS_KEY_ID", KEY);
    set_env("AWS_SECRET_ACCESS_KEY", SECRET);

    // Push.
    let reference = Reference::parse("s3://mcow/images/demo:v1").unwrap();
    let report = push(&src, &reference, &mut |_, _| {}).unwrap();
    assert_eq!((report.layers, report.uploaded), (3, 3));
    let layout = server.root.join(BUCKET).join("images/demo"); // the prefix is a directory
    assert!(layout.join("oci-layout").is_file() && layout.join("index.json").is_file());
    let index = std::fs::read_to_string(layout.join("index.json")).unwrap();
    assert!(index.contains("org.opencontainers.image.ref.name") && index.contains("\"v1\""), "{index}");
    assert!(layout.join("blobs/sha256").join(report.manifest_digest.hex()).is_file());
    // Pushing again uploads nothing.
    let again = push(&src, &reference, &mut |_, _| {}).unwrap();
    assert_eq!((again.uploaded, again.manifest_digest), (0, report.manifest_digest));

    // Full pull into a fresh store: every byte equal.
    let full = tmp.path().join("full");
    let pulled = pull(&reference, &full, &tmp.path().join("store-full"), false, &mut |_, _| {}).unwrap();
    assert_eq!((pulled.layers, pulled.manifest_digest), (3, report.manifest_digest));
    assert_eq!(pulled.bytes_fetched, report.bytes_uploaded);
    {
        let d = Disk::open(&full, OpenOptions::default()).unwrap();
        assert_eq!(d.stack().depth(), 3);
        assert!(read_all(&d) == model, "full pull differs");
    }

    // Lazy pull, pinned by manifest digest: headers and indexes only, then blocks on demand.
    let pinned = Reference::parse(&format!("s3://mcow/images/demo:v1@{}", report.manifest_digest)).unwrap();
    let lazy = tmp.path().join("lazy");
    let lp = pull(&pinned, &lazy, &tmp.path().join("store-lazy"), true, &mut |_, _| {}).unwrap();
    assert!(lp.bytes_fetched < report.bytes_uploaded / 4, "lazy pull fetched {}", lp.bytes_fetched);
    {
        let (d, source) = Sources::new()
            .open_lazy_disk(
                &mcow_engine::Engine::default(),
                &lazy,
                OpenOptions::default(),
                FetchPolicy::default(),
            )
            .unwrap();
        let source = source.expect("a lazily pulled disk has a remote source");
        assert!(read_all(&d) == model, "lazy read differs");
        let (bytes, requests) = source.stats();
        assert!(bytes > 0 && requests > 0, "{bytes} bytes in {requests} requests");
    }
    {
        let (d, source) = Sources::new()
            .open_lazy_disk(
                &mcow_engine::Engine::default(),
                &lazy,
                OpenOptions::default(),
                FetchPolicy::default(),
            )
            .unwrap();
        assert!(read_all(&d) == model, "second lazy read differs");
        assert_eq!(source.unwrap().stats(), (0, 0), "the second open fetched again");
    }

    compressed_round_trip(&src, &model, &report, tmp.path());

    // A pin that is not the tag's manifest: not found.
    let bogus = Reference::parse(&format!("s3://mcow/images/demo:v1@{}", Digest::of(b"nope"))).unwrap();
    let e = pull(&bogus, &tmp.path().join("bogus"), &tmp.path().join("store-bogus"), true, &mut |_, _| {})
        .err()
        .unwrap();
    assert!(matches!(e, RemoteError::NotFound { .. }), "{e}");

    // Missing tags: in a layout that has other tags (named in the error), and where there is no
    // layout at all (which the error says, rather than that the tag is missing).
    for (missing, says) in
        [("s3://mcow/images/demo:nope", "its tags: v1, zstd"), ("s3://mcow/elsewhere:v1", "index.json")]
    {
        let r = Reference::parse(missing).unwrap();
        let e =
            pull(&r, &tmp.path().join("missing"), &tmp.path().join("store-missing"), false, &mut |_, _| {})
                .err()
                .unwrap();
        if says == "index.json" {
            assert!(matches!(e, RemoteError::NoLayout { .. }), "{missing}: {e}");
        } else {
            assert!(matches!(e, RemoteError::NotFound { .. }), "{missing}: {e}");
            assert!(e.to_string().contains("tag nope"), "{missing}: {e}");
        }
        assert!(e.to_string().contains(says), "{missing}: {e}");
    }

    // Wrong secret through the environment: push and pull fail with a clear 403.
    set_env("AWS_SECRET_ACCESS_KEY", "not-the-secret");
    let e = push(&src, &reference, &mut |_, _| {}).unwrap_err();
    assert!(matches!(e, RemoteError::Http { status: 403, .. }), "{e}");
    assert!(e.to_string().contains("HTTP 403"), "{e}");
    let e =
        pull(&reference, &tmp.path().join("denied"), &tmp.path().join("store-denied"), false, &mut |_, _| {})
            .err()
            .unwrap();
    assert!(matches!(e, RemoteError::Http { status: 403, .. }), "{e}");
    set_env("AWS_SECRET_ACCESS_KEY", SECRET);
    drop(server);
}
