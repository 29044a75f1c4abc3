//! The read-only plain-HTTP backend against nginx serving a layout pushed to `file://`.

mod common;

use common::*;
use mcow_engine::{Disk, FetchPolicy, OpenOptions};
use mcow_remote::RangeRead;
use mcow_remote::layout::ObjectStore;
use mcow_remote::{Reference, RemoteError, transfer};

fn ro() -> OpenOptions {
    OpenOptions { read_only: true, verify: true, force_share: true }
}

#[test]
fn pull_full_and_lazy_from_nginx_and_refuse_pushes() {
    let t = tempfile::tempdir().unwrap();
    let (disk, bytes) = build_disk(&t.path().join("a"));
    let www = t.path().join("www");
    let layout = www.join("images");
    let file_ref = Reference::parse(&format!("file://{}:v1", layout.display())).unwrap();
    transfer::push(&disk, &file_ref, &mut |_, _| {}).unwrap();
    let ngx = Nginx::start(&t.path().join("ngx"), &www);
    let base = format!("http://127.0.0.1:{}/images", ngx.port);
    let r = Reference::parse(&format!("{base}:v1")).unwrap();
    let total: u64 = layers(&disk).iter().map(|l| l.1).sum();

    let full =
        transfer::pull(&r, &t.path().join("b/disk"), &t.path().join("b/layers"), false, &mut |_, _| {})
            .unwrap();
    assert_eq!((full.layers, full.bytes_fetched), (3, total));
    assert!(read_all(&Disk::open(&t.path().join("b/disk"), ro()).unwrap()) == bytes);

    let lazy = transfer::pull(&r, &t.path().join("c/disk"), &t.path().join("c/layers"), true, &mut |_, _| {})
        .unwrap();
    assert!(lazy.bytes_fetched * 20 < total, "{}", lazy.bytes_fetched);
    {
        let (d, src) = transfer::Sources::new()
            .open_lazy_disk(&mcow_engine::Engine::default(), &t.path().join("c/disk"), ro(), EXACT)
            .unwrap();
        let blocks = data_blocks_of(&d, 1);
        let mut buf = vec![0u8; 4096];
        for &(vb, _) in blocks.iter().take(3) {
            d.read(vb * BS + 7, &mut buf).unwrap();
            assert_eq!(buf, bytes[(vb * BS + 7) as usize..][..4096]);
        }
        assert_eq!(src.unwrap().stats(), (3 * BS, 3));
        assert!(read_all(&d) == bytes);
    }
    let (d, src) = transfer::Sources::new()
        .open_lazy_disk(
            &mcow_engine::Engine::default(),
            &t.path().join("c/disk"),
            ro(),
            FetchPolicy::default(),
        )
        .unwrap();
    assert!(read_all(&d) == bytes);
    assert_eq!(src.unwrap().stats(), (0, 0));

    // Read-only.
    let e =
        transfer::push(&disk, &Reference::parse(&format!("{base}:v2")).unwrap(), &mut |_, _| {}).unwrap_err();
    assert!(matches!(e, RemoteError::ReadOnly(_)), "{e}");
    let store = mcow_remote::http::HttpStore::new(&base);
    assert!(matches!(store.put_bytes("x", b"y"), Err(RemoteError::ReadOnly(_))));

    // Missing objects and tags.
    assert!(store.exists("index.json").unwrap());
    assert!(!store.exists("nope").unwrap());
    assert_eq!(store.get("nope").unwrap(), None);
    assert!(matches!(store.get_range("nope", 0, 10), Err(RemoteError::NotFound { .. })));
    let e = transfer::pull(
        &Reference::parse(&format!("{base}:nope")).unwrap(),
        &t.path().join("d/disk"),
        &t.path().join("d/layers"),
        false,
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(matches!(e, RemoteError::NotFound { .. }), "{e}");
    // A range past the end is an error, not a short answer.
    let index = std::fs::read(layout.join("index.json")).unwrap();
    let n = index.len() as u64;
    assert_eq!(store.get_range("index.json", n - 5, 5).unwrap(), index[index.len() - 5..]);
    assert!(store.get_range("index.json", n - 5, 10).is_err());
    // Several ranges in one request: nginx answers multipart/byteranges.
    let ranges = [(0, 4), (10, 6), (n - 3, 3)];
    let mut got = vec![Vec::new(); 3];
    let requests = store.stream_ranges("index.json", &ranges, &mut |i, p| {
        got[i].extend_from_slice(p);
        true
    });
    assert_eq!(requests.unwrap(), 1, "one request for three ranges");
    for (i, &(o, l)) in ranges.iter().enumerate() {
        assert_eq!(got[i], index[o as usize..(o + l) as usize], "range {i}");
    }
}

/// A one-shot-per-connection HTTP server answering every request with `answer(n, request)`
/// (`n` counts requests from 0); returns its base URL and the request counter.
fn fake_server(
    answer: impl Fn(usize, &str) -> Vec<u8> + Send + Sync + 'static,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, BufReader, Write};
    use std::sync::atomic::Ordering;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut req = String::new();
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                req.push_str(&line);
            }
            let n = c.fetch_add(1, Ordering::SeqCst);
            let _ = conn.write_all(&answer(n, &req));
        }
    });
    (format!("http://127.0.0.1:{port}"), count)
}

fn quick() -> mcow_remote::http_client::HttpConfig {
    let mut c = mcow_remote::http_client::HttpConfig::default();
    c.retry.deadline = std::time::Duration::from_millis(300);
    c.retry.first_delay = std::time::Duration::from_millis(10);
    c.retry.max_delay = std::time::Duration::from_millis(50);
    c
}

#[test]
fn ranges_from_servers_that_ignore_them_fail_or_stop_short() {
    use mcow_remote::http::HttpStore;
    use std::sync::atomic::Ordering;
    let data = pattern(9, 5000);

    // A server that ignores Range: the wanted bytes are cut out of the full body.
    let d = data.clone();
    let (base, count) = fake_server(move |_, _| {
        let mut a = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", d.len())
            .into_bytes();
        a.extend_from_slice(&d);
        a
    });
    let s = HttpStore::with_config(&base, quick());
    assert_eq!(s.get_range("obj", 1000, 100).unwrap(), data[1000..1100]);
    assert_eq!(s.get_range("obj", 0, 10).unwrap(), data[..10]);
    let e = s.get_range("obj", 4990, 100).unwrap_err();
    assert!(!e.is_transient(), "{e}");
    assert_eq!(count.load(Ordering::SeqCst), 3, "a range past the end is not retried");

    // Several ranges from a server that ignores Range: cut out of the one whole body.
    let s = HttpStore::with_config(&base, quick());
    let mut got = vec![Vec::new(); 2];
    let n = s
        .stream_ranges("obj", &[(10, 5), (4000, 20)], &mut |i, p| {
            got[i].extend_from_slice(p);
            true
        })
        .unwrap();
    assert_eq!((got[0].as_slice(), got[1].as_slice()), (&data[10..15], &data[4000..4020]));
    assert_eq!(n, 1);

    // A 206 whose body stops short (half of what it announces, every time) is transient: each
    // retry asks only for the bytes still missing, then the error comes once the budget is spent.
    let d = data.clone();
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = asked.clone();
    let (base, count) = fake_server(move |_, req| {
        let lower = req.to_ascii_lowercase();
        let range = lower.split("range: bytes=").nth(1).and_then(|r| r.lines().next()).unwrap_or("");
        let (a, b) = range.trim().split_once('-').unwrap();
        let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
        log.lock().unwrap().push(a);
        let len = b + 1 - a;
        let mut out = format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/5000\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
        )
        .into_bytes();
        out.extend_from_slice(&d[a..a + len / 2]);
        out
    });
    let s = HttpStore::with_config(&base, quick());
    let start = std::time::Instant::now();
    let e = s.get_range("obj", 1000, 100).unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert!(start.elapsed() >= std::time::Duration::from_millis(300), "gave up early: {:?}", start.elapsed());
    let asked = asked.lock().unwrap().clone();
    assert!(
        asked.len() >= 3 && asked[..3] == [1000, 1050, 1075],
        "retries resume after what arrived: {asked:?}"
    );
    assert!(asked.windows(2).all(|w| w[0] <= w[1]), "{asked:?}");
    assert_eq!(count.load(Ordering::SeqCst), asked.len());

    // A 503, then the right answer: retried transparently.
    let d = data.clone();
    let (base, count) = fake_server(move |n, req| {
        assert!(req.to_ascii_lowercase().contains("range: bytes=10-19"), "{req}");
        if n == 0 {
            return b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec();
        }
        let mut a = b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 10-19/5000\r\nContent-Length: 10\r\nConnection: close\r\n\r\n".to_vec();
        a.extend_from_slice(&d[10..20]);
        a
    });
    let s = HttpStore::with_config(&base, quick());
    assert_eq!(s.get_range("obj", 10, 10).unwrap(), data[10..20]);
    assert_eq!(count.load(Ordering::SeqCst), 2);

    // A 206 for the wrong range is refused, not retried.
    let (base, count) = fake_server(move |_, _| {
        b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-9/5000\r\nContent-Length: 10\r\nConnection: close\r\n\r\n0123456789".to_vec()
    });
    let s = HttpStore::with_config(&base, quick());
    assert!(s.get_range("obj", 10, 10).is_err());
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

/// A lazy disk pulled through `origin` (a misbehaving proxy in front of nginx serving a layout
/// pushed to `file://`), opened with `config` and fetching exactly the blocks read. Returns the
/// disk, its bytes, and the nginx that must outlive it.
fn lazy_disk_behind(
    t: &std::path::Path,
    config: mcow_remote::http_client::HttpConfig,
) -> (Disk, Vec<u8>, common::origin::Origin, Nginx) {
    use mcow_remote::http::HttpStore;
    use mcow_remote::layout::Layout;
    let (disk, bytes) = build_disk(&t.join("a"));
    let www = t.join("www");
    let file_ref = Reference::parse(&format!("file://{}:v1", www.join("images").display())).unwrap();
    transfer::push(&disk, &file_ref, &mut |_, _| {}).unwrap();
    let ngx = Nginx::start(&t.join("ngx"), &www);
    let origin = common::origin::Origin::start(ngx.port);
    let base = format!("{}/images", origin.url());
    let r = Reference::parse(&format!("{base}:v1")).unwrap();
    transfer::pull(&r, &t.join("c/disk"), &t.join("c/layers"), true, &mut |_, _| {}).unwrap();
    let source = std::sync::Arc::new(transfer::RemoteSource::new(std::sync::Arc::new(Layout::new(
        HttpStore::with_config(&base, config),
    ))));
    let d = Disk::open_with_source(&t.join("c/disk"), ro(), source, EXACT).unwrap();
    (d, bytes, origin, ngx)
}

#[test]
fn a_trickling_origin_fails_reads_within_the_deadline_and_they_succeed_once_it_recovers() {
    // Tried: an origin that answers the range request with 206 and then sends one byte per
    // 100 ms, under a pace of 1 MiB/s after 300 ms and a retry budget of 1 s (so a 64 KiB block
    // may take 1 s + 64 KiB at 1 MiB/s = 1.06 s of retries, each attempt abandoned ~0.3 s in).
    // Two readers ask for the same block, the second while the first one's fetch is in flight.
    // Must hold: both fail with an I/O error within the deadline (the second is woken with the
    // fetch's error, not left waiting or starting a fetch of its own), having been retried for
    // the whole budget; once the origin is normal again the same block reads correctly.
    use std::time::{Duration, Instant};
    let t = tempfile::tempdir().unwrap();
    let mut config = quick();
    config.pace = mcow_remote::retry::Pace { grace: Duration::from_millis(300), min_rate: 1 << 20 };
    config.retry.deadline = Duration::from_secs(1);
    config.retry.max_delay = Duration::from_millis(200);
    let (d, bytes, origin, _ngx) = lazy_disk_behind(t.path(), config);
    let vb = data_blocks_of(&d, 1)[0].0;
    origin.set(common::origin::Mode::Trickle);
    let start = Instant::now();
    let (first, second) = std::thread::scope(|s| {
        let a = s.spawn(|| {
            let mut buf = vec![0u8; BS as usize];
            (d.read(vb * BS, &mut buf), start.elapsed())
        });
        std::thread::sleep(Duration::from_millis(100));
        let b = s.spawn(|| {
            let mut buf = vec![0u8; 4096];
            (d.read(vb * BS + 4096, &mut buf), start.elapsed())
        });
        (a.join().unwrap(), b.join().unwrap())
    });
    let trickled = origin.misbehaved.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!(
        "trickle: first read failed after {:?}, second after {:?}, {trickled} requests",
        first.1, second.1
    );
    for (r, took) in [&first, &second] {
        let e = r.as_ref().unwrap_err();
        assert!(matches!(e, mcow_engine::Error::Io { .. }), "expected an I/O error, got {e:?}");
        assert!(*took < Duration::from_millis(2500), "the read took {took:?}, past the deadline");
    }
    assert!(first.1 >= Duration::from_secs(1), "gave up before the retry budget: {:?}", first.1);
    assert!(second.1 < first.1 + Duration::from_millis(300), "the waiter was not woken with the error");
    assert!(trickled >= 2, "the slow transfer was not abandoned and retried ({trickled} requests)");
    assert_eq!(
        origin.requests.load(std::sync::atomic::Ordering::SeqCst),
        trickled + origin_requests_before_trickle(),
        "the waiting reader started a fetch of its own"
    );

    origin.set(common::origin::Mode::Normal);
    let mut buf = vec![0u8; BS as usize];
    d.read(vb * BS, &mut buf).unwrap();
    assert!(buf == bytes[(vb * BS) as usize..][..BS as usize]);
}

/// Requests the lazy pull made before the tests switch the origin's mode: `index.json`, the
/// manifest, the config and one multi-range request per layer (3 layers).
fn origin_requests_before_trickle() -> usize {
    6
}

#[test]
fn a_connection_cut_mid_body_is_retried_for_the_whole_budget() {
    // Tried: an origin that cuts every answer halfway through its body, under a retry budget
    // of 4 s with the default backoff (100 ms doubling to 2 s). The old policy gave up after 6
    // attempts, 3.1 s. Must hold: the read fails with an I/O error only once the budget (4 s
    // plus 64 KiB at the minimum rate) is spent, after more than 6 requests (each resuming
    // after what arrived), and reads correctly once the origin is normal.
    use std::time::{Duration, Instant};
    let t = tempfile::tempdir().unwrap();
    let mut config = mcow_remote::http_client::HttpConfig::default();
    config.retry.deadline = Duration::from_secs(4);
    let (d, bytes, origin, _ngx) = lazy_disk_behind(t.path(), config);
    let vb = data_blocks_of(&d, 2)[0].0;
    origin.set(common::origin::Mode::Cut);
    let start = Instant::now();
    let mut buf = vec![0u8; BS as usize];
    let e = d.read(vb * BS, &mut buf).unwrap_err();
    let took = start.elapsed();
    let cut = origin.misbehaved.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!("cut: the read failed after {took:?} and {cut} requests");
    assert!(matches!(e, mcow_engine::Error::Io { .. }), "expected an I/O error, got {e:?}");
    assert!(took >= Duration::from_secs(4), "gave up after {took:?}, before the 4 s budget");
    assert!(took < Duration::from_secs(6), "took {took:?}");
    assert!(cut > 6, "only {cut} requests");
    origin.set(common::origin::Mode::Normal);
    d.read(vb * BS, &mut buf).unwrap();
    assert!(buf == bytes[(vb * BS) as usize..][..BS as usize]);
}

#[test]
fn a_retry_after_is_waited_for_within_the_budget() {
    // Tried: a server that answers 503 with `Retry-After: 1`, then the right bytes, under a
    // 3 s budget whose own backoff starts at 10 ms. Must hold: the second request comes only
    // after the second the server asked for, the read then succeeds, and one retry is counted.
    use std::time::{Duration, Instant};
    let data = pattern(4, 100);
    let d = data.clone();
    let (base, count) = fake_server(move |n, _| {
        if n == 0 {
            return b"HTTP/1.1 503 Busy\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                .to_vec();
        }
        let mut a = b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 10-19/100\r\nContent-Length: 10\r\nConnection: close\r\n\r\n".to_vec();
        a.extend_from_slice(&d[10..20]);
        a
    });
    let mut config = quick();
    config.retry.deadline = Duration::from_secs(3);
    let s = mcow_remote::http::HttpStore::with_config(&base, config);
    let start = Instant::now();
    assert_eq!(s.get_range("obj", 10, 10).unwrap(), data[10..20]);
    let took = start.elapsed();
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(2), "{took:?}");
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 2);
    use mcow_remote::layout::ObjectStore;
    assert_eq!(s.retries(), 1, "the retry is counted (the metric mcow_export_fetch_retries_total)");
}

// Ranged fetches reuse their connection: a lazy disk on nginx reads 12 scattered blocks one
// after another (one single-range GET each) and prefetches runs in two multi-range GETs; every
// answer is read to its end, so the HTTP client keeps the connection and nginx's log shows all
// of those requests on one or two TCP connections (a new connection per fetch costs a TCP
// handshake, one round trip more, on every read of a lazy disk). The bytes must still be right.
#[test]
fn ranged_fetches_reuse_their_connection() {
    let t = tempfile::tempdir().unwrap();
    let (disk, bytes) = build_disk(&t.path().join("a"));
    let www = t.path().join("www");
    let file_ref = Reference::parse(&format!("file://{}:v1", www.join("images").display())).unwrap();
    transfer::push(&disk, &file_ref, &mut |_, _| {}).unwrap();
    let ngx_dir = t.path().join("ngx");
    let ngx = Nginx::start(&ngx_dir, &www);
    let r = Reference::parse(&format!("http://127.0.0.1:{}/images:v1", ngx.port)).unwrap();
    transfer::pull(&r, &t.path().join("c/disk"), &t.path().join("c/layers"), true, &mut |_, _| {}).unwrap();
    let before = Nginx::access_log(&ngx_dir).len();
    let (d, src) = transfer::Sources::new()
        .open_lazy_disk(&mcow_engine::Engine::default(), &t.path().join("c/disk"), ro(), EXACT)
        .unwrap();
    let blocks: Vec<(u64, u64)> = (0..3).flat_map(|l| data_blocks_of(&d, l)).collect();
    assert!(blocks.len() >= 24, "the test needs blocks to read: {}", blocks.len());
    let mut buf = vec![0u8; 4096];
    for &(vb, _) in blocks.iter().step_by(2).take(12) {
        d.read(vb * BS, &mut buf).unwrap();
        assert_eq!(buf, bytes[(vb * BS) as usize..][..4096]);
    }
    let rest: Vec<(u64, u64)> = blocks.iter().skip(1).step_by(2).map(|&(vb, _)| (vb, 1)).collect();
    let (a, b) = rest.split_at(rest.len() / 2);
    d.prefetch_runs(a).unwrap();
    d.prefetch_runs(b).unwrap();
    let log: Vec<String> = Nginx::access_log(&ngx_dir)[before..].to_vec();
    let (_, requests) = src.unwrap().stats();
    // (Whole-disk reads fetch pieces of several layers at once, on connections of their own.)
    assert!(read_all(&d) == bytes);
    assert!(requests >= 14, "12 reads and 2 prefetches, at least: {requests}");
    assert!(log.iter().any(|l| l.contains(',')), "a multi-range request among them:\n{}", log.join("\n"));
    let conns: std::collections::BTreeSet<&str> = log.iter().filter_map(|l| l.split(' ').next()).collect();
    assert!(
        conns.len() <= 2,
        "{} requests came on {} connections:\n{}",
        log.len(),
        conns.len(),
        log.join("\n")
    );
}

/// Tried: a disk (half text, half noise) pushed compressed to a `file://` layout, the
/// directory served by nginx, pulled from it in full and lazily (read in full twice). Must
/// hold: the image's layers are compressed blobs smaller than the layers; the full pull fetches
/// the blobs' bytes and makes the source's layers (same digests, same disk bytes) and nothing
/// else in its store; the lazy pull fetches less than a twentieth of the blobs, reads every byte
/// right, and its second open fetches nothing.
#[test]
fn compressed_images_pull_full_and_lazy_from_nginx() {
    let t = tempfile::tempdir().unwrap();
    let (disk, bytes) = build_compressible_disk(&t.path().join("a"));
    let www = t.path().join("www");
    let file_ref = Reference::parse(&format!("file://{}:v1", www.join("images").display())).unwrap();
    let opts = transfer::PushOptions { trace: None, compress: Some(mcow_format::DEFAULT_LEVEL) };
    let rep = transfer::push_with(&disk, &file_ref, &opts, &mut |_, _| {}).unwrap();
    let ngx = Nginx::start(&t.path().join("ngx"), &www);
    let r = Reference::parse(&format!("http://127.0.0.1:{}/images:v1", ngx.port)).unwrap();
    let remote = mcow_remote::open_remote(&r).unwrap();
    check_compressed_image(remote.as_ref(), &r, &disk);

    let full =
        transfer::pull(&r, &t.path().join("b/disk"), &t.path().join("b/layers"), false, &mut |_, _| {})
            .unwrap();
    assert_eq!((full.layers, full.bytes_fetched), (3, rep.blob_bytes));
    assert_eq!(layers(&t.path().join("b/disk")), layers(&disk));
    assert!(read_all(&Disk::open(&t.path().join("b/disk"), ro()).unwrap()) == bytes);
    let mut want: Vec<String> = layers(&disk).iter().map(|l| l.0.hex()).collect();
    want.sort();
    assert_eq!(store_contents(&t.path().join("b/layers")), (want, true));

    let lazy = transfer::pull(&r, &t.path().join("c/disk"), &t.path().join("c/layers"), true, &mut |_, _| {})
        .unwrap();
    assert!(lazy.bytes_fetched * 20 < rep.blob_bytes, "{} of {}", lazy.bytes_fetched, rep.blob_bytes);
    for round in 0..2 {
        let (d, src) = transfer::Sources::new()
            .open_lazy_disk(
                &mcow_engine::Engine::default(),
                &t.path().join("c/disk"),
                ro(),
                FetchPolicy::default(),
            )
            .unwrap();
        assert!(read_all(&d) == bytes, "round {round}: the lazy disk differs");
        let (fetched, _) = src.unwrap().stats();
        assert!(if round == 0 { fetched > 0 } else { fetched == 0 }, "round {round}: {fetched}");
    }
}
