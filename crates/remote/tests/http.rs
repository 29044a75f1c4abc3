//! The read-only plain-HTTP backend against nginx serving a layout pushed to `file://`.

mod common;

use common::*;
use mcow_engine::{Disk, FetchPolicy, OpenOptions};
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
        let (d, src) = transfer::open_lazy_disk(&t.path().join("c/disk"), ro(), EXACT).unwrap();
        let blocks = data_blocks_of(&d, 1);
        let mut buf = vec![0u8; 4096];
        for &(vb, _) in blocks.iter().take(3) {
            d.read(vb * BS + 7, &mut buf).unwrap();
            assert_eq!(buf, bytes[(vb * BS + 7) as usize..][..4096]);
        }
        assert_eq!(src.unwrap().stats(), (3 * BS, 3));
        assert!(read_all(&d) == bytes);
    }
    let (d, src) = transfer::open_lazy_disk(&t.path().join("c/disk"), ro(), FetchPolicy::default()).unwrap();
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
    c.retry.attempts = 3;
    c.retry.first_delay = std::time::Duration::from_millis(10);
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
    // retry asks only for the bytes still missing, then the error comes after the attempts.
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
    let e = s.get_range("obj", 1000, 100).unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert_eq!(count.load(Ordering::SeqCst), 3);
    assert_eq!(*asked.lock().unwrap(), vec![1000, 1050, 1075], "retries resume after what arrived");

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
