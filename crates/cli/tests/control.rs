//! `mcow serve --control`: the control API driven by real clients, `curl --unix-socket` and
//! the `mcow ctl` verbs, with real NBD clients (nbdinfo, qemu-io) on the exports it adds.
//! The server is always stopped with SIGTERM; a missing tool fails the test (never skips).

mod common;
#[path = "common/nbd.rs"]
mod nbd;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use nbd::*;
use serde_json::Value;

/// `curl --unix-socket SOCK` of METHOD PATH (with a JSON body): the status and the JSON body.
fn curl(dir: &Path, sock: &str, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let url = format!("http://mcow{path}");
    let mut args = vec!["-sS", "--unix-socket", sock, "-X", method, "-w", "\n%{http_code}"];
    if let Some(b) = body {
        args.extend(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    args.push(&url);
    let out = tool_run("curl", dir, &args);
    assert_eq!(out.code, 0, "curl {args:?} failed: {}", out.stderr);
    let (json, code) = out.stdout.trim_end().rsplit_once('\n').expect("a body and a status");
    let v = serde_json::from_str(json).unwrap_or_else(|e| panic!("not JSON ({e}): {json}"));
    (code.parse().unwrap(), v)
}

/// A 4 MiB disk `base` whose first MiB holds 0x42, sealed and pushed as the image
/// `file://DIR/img:v1`; returns that reference.
fn push_base_image(dir: &Path) -> String {
    mcow_ok(dir, &["create", "base", "-s", "4M"]);
    mcow_ok(dir, &["write", "base", "0", "--pattern", "0x42", "1048576"]);
    mcow_ok(dir, &["seal", "base"]);
    let image = format!("file://{}/img:v1", dir.display());
    mcow_ok(dir, &["push", "base", &image]);
    image
}

fn list(dir: &Path, sock: &str) -> Value {
    let (code, v) = curl(dir, sock, "GET", "/exports", None);
    assert_eq!(code, 200, "{v}");
    v
}

fn names(v: &Value) -> Vec<String> {
    v["exports"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap().to_string()).collect()
}

/// Tried: a server started with only a control socket; a disk added with `mcow ctl add`, read
/// and written by nbdinfo and qemu-io; a qemu-io that stays connected (having written and
/// flushed) while `mcow ctl remove` runs; the disk read back by another process after the
/// removal; the same disk added again with curl. Must hold: the list shows the export with one
/// client and its counters; the removal answers only once the connected qemu-io was
/// disconnected (its next read fails; the server logs a clean close, no error) and the disk was
/// flushed and closed (another `mcow` opens it and reads the bytes written); nothing else
/// changed.
#[test]
fn add_read_list_remove_with_curl_and_ctl() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    mcow_ok(dir, &["create", "vm", "-s", "8M"]);
    mcow_ok(dir, &["write", "vm", "0", "--pattern", "0xaa", "65536"]);
    let serve = Serve::start_env(dir, &["--control", "ctl.sock"], &[("RUST_LOG", "info")]);
    assert_eq!(names(&list(dir, "ctl.sock")), Vec::<String>::new());

    let added = mcow_ok(dir, &["ctl", "-c", "ctl.sock", "add", "vm", "vm"]);
    assert!(added.starts_with("added vm: "), "{added}");
    assert_eq!(tool_ok("nbdinfo", dir, &["--size", &serve.unix_uri("vm")]).trim(), (8 * MIB).to_string());
    let out = tool_ok("qemu-io", dir, &["-f", "raw", "-c", "read -P 0xaa 0 64k", &serve.unix_uri("vm")]);
    assert!(out.contains("read 65536/65536"), "{out}");

    // A client that stays: it writes, flushes, and waits for more commands.
    let mut qio = std::process::Command::new(tool("qemu-io"))
        .args(["-f", "raw", &serve.unix_uri("vm")])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = qio.stdin.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = qio.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let wait_for = |what: &str| loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("qemu-io never said {what:?}"));
        if line.contains(what) {
            break;
        }
    };
    writeln!(stdin, "write -P 0xbb 1M 64k").unwrap();
    wait_for("wrote 65536/65536");
    writeln!(stdin, "flush").unwrap();

    // The list shows the client and what it did.
    let v = mcow_in(dir, &["ctl", "-c", "ctl.sock", "list", "--output", "json"]).json();
    let e = &v["exports"][0];
    assert_eq!(e["name"], "vm");
    assert_eq!(e["disk"].as_str().unwrap(), dir.join("vm").canonicalize().unwrap().to_str().unwrap());
    assert_eq!((e["size"].as_u64(), e["read_only"].as_bool()), (Some(8 * MIB), Some(false)));
    assert_eq!(e["clients"], 1, "{v}");
    assert!(
        e["bytes_written"].as_u64().unwrap() >= 65536 && e["bytes_read"].as_u64().unwrap() >= 65536,
        "{v}"
    );
    assert!(e["requests"].as_u64().unwrap() >= 3 && e["errors"] == 0, "{v}");
    let human = mcow_ok(dir, &["ctl", "-c", "ctl.sock", "list"]);
    assert!(human.lines().any(|l| l.starts_with("vm ") && l.contains("8 MiB")), "{human}");

    // Removal: returns once the client is gone and the disk flushed.
    let removed = mcow_in(dir, &["ctl", "-c", "ctl.sock", "remove", "vm", "--output", "json"]);
    assert_eq!(removed.code, 0, "{}", removed.stderr);
    let r = removed.json();
    assert_eq!((r["name"].as_str(), r["clients"].as_u64()), (Some("vm"), Some(0)), "{r}");
    writeln!(stdin, "read -P 0xbb 1M 64k").unwrap();
    drop(stdin);
    let st = wait_timeout(&mut qio, Duration::from_secs(20)).expect("qemu-io exits");
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(
        !rest.iter().any(|l| l.contains("read 65536/65536")),
        "read after removal succeeded: {rest:?} ({st})"
    );
    assert_eq!(names(&list(dir, "ctl.sock")), Vec::<String>::new());
    // Closed and flushed: another process opens the disk and reads what was written.
    let bytes = export_bytes(dir, "vm");
    assert!(
        bytes[..65536].iter().all(|&b| b == 0xaa)
            && bytes[MIB as usize..][..65536].iter().all(|&b| b == 0xbb)
    );

    // Added again, with curl: the data is there.
    let (code, v) = curl(dir, "ctl.sock", "POST", "/exports", Some(r#"{"name": "again", "disk": "vm"}"#));
    assert_eq!(code, 201, "{v}");
    let out =
        tool_ok("qemu-io", dir, &["-f", "raw", "-r", "-c", "read -P 0xbb 1M 64k", &serve.unix_uri("again")]);
    assert!(out.contains("read 65536/65536"), "{out}");
    let log = serve.stop_with_log();
    assert!(log.contains("NBD export removed"), "{log}");
    let vm_closes: Vec<&str> =
        log.lines().filter(|l| l.contains("NBD connection closed") && l.contains("export=vm ")).collect();
    assert!(!vm_closes.is_empty(), "{log}");
    assert!(vm_closes.iter().all(|l| !l.contains("with error")), "{vm_closes:?}");
}

/// Tried: an unknown name, bad JSON, a missing field, an unknown route and method, a duplicate
/// name, a second writable export of a served disk and a disk that does not exist, with curl
/// and with `mcow ctl`. Must hold: each is refused with its status (404, 400, 409) and a
/// message naming the problem, and the list before and after is the same.
#[test]
fn errors_are_clear_and_change_nothing() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    mcow_ok(dir, &["create", "vm", "-s", "4M"]);
    mcow_ok(dir, &["create", "other", "-s", "4M"]);
    let serve = Serve::start(dir, &["--control", "ctl.sock", "vm"]);
    let before = list(dir, "ctl.sock");
    assert_eq!(names(&before), ["vm"]);

    let cases: [(&str, &str, Option<&str>, u16, &str); 9] = [
        ("DELETE", "/exports/nope", None, 404, "no export named \"nope\""),
        ("GET", "/exports/nope", None, 404, "no export named \"nope\""),
        ("POST", "/exports", Some("{\"name\": \"x\", "), 400, "invalid JSON"),
        ("POST", "/exports", Some("{\"name\": \"x\"}"), 400, "missing field `disk`"),
        (
            "POST",
            "/exports",
            Some("{\"name\": \"x\", \"disk\": \"other\", \"rw\": 1}"),
            400,
            "unknown field `rw`",
        ),
        (
            "POST",
            "/exports",
            Some("{\"name\": \"vm\", \"disk\": \"other\"}"),
            409,
            "export name \"vm\" is already used",
        ),
        ("POST", "/exports", Some("{\"name\": \"vm2\", \"disk\": \"vm\"}"), 409, "can only be read-only"),
        ("POST", "/exports", Some("{\"name\": \"x\", \"disk\": \"missing\"}"), 400, "opening disk missing"),
        ("PUT", "/exports", None, 405, "not allowed"),
    ];
    for (method, path, body, want, text) in cases {
        let (code, v) = curl(dir, "ctl.sock", method, path, body);
        assert_eq!(code, want, "{method} {path} {body:?}: {v}");
        let msg = v["error"].as_str().unwrap_or_else(|| panic!("no error message: {v}"));
        assert!(msg.contains(text), "{method} {path}: {msg:?} lacks {text:?}");
    }
    let (code, _) = curl(dir, "ctl.sock", "GET", "/nowhere", None);
    assert_eq!(code, 404);

    let r = mcow_in(dir, &["ctl", "-c", "ctl.sock", "remove", "nope"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("no export named \"nope\" (HTTP 404)"), "{}", r.stderr);
    let r = mcow_in(dir, &["ctl", "-c", "ctl.sock", "add", "vm", "other"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("already used (HTTP 409)"), "{}", r.stderr);
    let r = mcow_in(dir, &["ctl", "-c", "nowhere.sock", "list"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("is `mcow serve --control` running?"), "{}", r.stderr);

    assert_eq!(list(dir, "ctl.sock"), before, "a refused request changed the exports");
    // The export refused a twin still serves.
    assert_eq!(tool_ok("nbdinfo", dir, &["--size", &serve.unix_uri("vm")]).trim(), (4 * MIB).to_string());
    serve.stop();
}

/// Tried: one image served twice in one process: as arguments (a tag and its pinned digest,
/// writable: refused at start; with -r: both served), and at run time through the control API
/// (a second, writable export of the cached disk: refused; read-only: added; the writer
/// removed, a new writable one: added). Must hold: the refusals say which export already
/// serves the disk and that a second one can only be read-only; the read-only twin reads what
/// the writable export wrote; the exports not removed are never taken down.
#[test]
fn the_same_image_twice_is_one_disk_with_one_writer() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    mcow_ok(dir, &["create", "vm", "-s", "4M"]);
    mcow_ok(dir, &["write", "vm", "0", "--pattern", "0x5c", "65536"]);
    mcow_ok(dir, &["seal", "vm"]);
    let pushed = mcow_ok(dir, &["push", "vm", &format!("file://{}/img:v1", dir.display())]);
    let digest =
        pushed.lines().find_map(|l| l.strip_prefix("manifest: ")).expect("the manifest digest").trim();
    let tag = format!("file://{}/img:v1", dir.display());
    let pinned = format!("file://{}/img@{digest}", dir.display());

    let r = mcow_in(
        dir,
        &["serve", "-k", "x.sock", "--cache", "cache", &format!("a={tag}"), &format!("b={pinned}")],
    );
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("is already served as export \"a\"") && r.stderr.contains("read-only"),
        "{}",
        r.stderr
    );
    let serve = Serve::start(dir, &["-r", "--cache", "cache", &format!("a={tag}"), &format!("b={pinned}")]);
    for name in ["a", "b"] {
        let out =
            tool_ok("qemu-io", dir, &["-f", "raw", "-r", "-c", "read -P 0x5c 0 64k", &serve.unix_uri(name)]);
        assert!(out.contains("read 65536/65536"), "{name}: {out}");
    }
    serve.stop();

    let serve = Serve::start(dir, &["--cache", "cache", "--control", "ctl.sock", &format!("a={tag}")]);
    let before = list(dir, "ctl.sock");
    let body = format!(r#"{{"name": "b", "disk": "{pinned}"}}"#);
    let (code, v) = curl(dir, "ctl.sock", "POST", "/exports", Some(&body));
    assert_eq!(code, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("already served as export \"a\""), "{v}");
    assert_eq!(list(dir, "ctl.sock"), before);
    let out = tool_ok("qemu-io", dir, &["-f", "raw", "-c", "write -P 0x77 64k 64k", &serve.unix_uri("a")]);
    assert!(out.contains("wrote 65536/65536"), "{out}");
    let body = format!(r#"{{"name": "b", "disk": "{pinned}", "read_only": true}}"#);
    let (code, v) = curl(dir, "ctl.sock", "POST", "/exports", Some(&body));
    assert_eq!(code, 201, "{v}");
    assert_eq!(
        (v["read_only"].as_bool(), v["disk"].clone()),
        (Some(true), before["exports"][0]["disk"].clone())
    );
    let out =
        tool_ok("qemu-io", dir, &["-f", "raw", "-r", "-c", "read -P 0x77 64k 64k", &serve.unix_uri("b")]);
    assert!(out.contains("read 65536/65536"), "the twin reads what the writer wrote: {out}");
    let w = tool_run("qemu-io", dir, &["-f", "raw", "-c", "write -P 0x11 0 4k", &serve.unix_uri("b")]);
    assert!(!w.stdout.contains("wrote 4096/4096"), "the read-only twin took a write: {}", w.stdout);
    // The writer removed, the twin goes on, and a new writer of the disk may come.
    let (code, _) = curl(dir, "ctl.sock", "DELETE", "/exports/a", None);
    assert_eq!(code, 200);
    let body = format!(r#"{{"name": "c", "disk": "{tag}"}}"#);
    let (code, v) = curl(dir, "ctl.sock", "POST", "/exports", Some(&body));
    assert_eq!(code, 201, "{v}");
    let out = tool_ok("qemu-io", dir, &["-f", "raw", "-c", "write -P 0x78 128k 64k", &serve.unix_uri("c")]);
    assert!(out.contains("wrote 65536/65536"), "{out}");
    let out =
        tool_ok("qemu-io", dir, &["-f", "raw", "-r", "-c", "read -P 0x78 128k 64k", &serve.unix_uri("b")]);
    assert!(out.contains("read 65536/65536"), "the twin reads the new writer's data: {out}");
    // Removing the twin leaves the writer serving.
    let (code, _) = curl(dir, "ctl.sock", "DELETE", "/exports/b", None);
    assert_eq!(code, 200);
    let out =
        tool_ok("qemu-io", dir, &["-f", "raw", "-r", "-c", "read -P 0x77 64k 64k", &serve.unix_uri("c")]);
    assert!(out.contains("read 65536/65536"), "{out}");
    assert_eq!(names(&list(dir, "ctl.sock")), ["c"]);
    serve.stop();
}

/// The value of the sample `name` (with its labels, as printed) in Prometheus text.
fn sample(text: &str, name: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ')))
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Tried: a local disk and an image served lazily, each read (and the local one written) by
/// qemu-io, then `GET /metrics` with curl, checked by `promtool check metrics` (which fails
/// on syntax errors and on lint problems such as a counter without `_total`). Must hold:
/// promtool accepts it; the per-export counters are the bytes the clients moved; the latency
/// histogram's `+Inf` bucket equals its count, which covers the requests run; only the lazy
/// disk fetched from its origin, and none of its fetches failed; its two blocks read count as
/// two cache hits or misses, and read again as two more hits; `--metrics 127.0.0.1:0` serves
/// the same metrics over TCP (promtool accepts them) and refuses every other route (404, 405:
/// nothing listed or added there). Then the image's blobs are
/// removed from its layout and a block not fetched yet is read: the read fails, and the fetch
/// error is counted.
#[test]
fn metrics_pass_promtool_and_count_what_clients_did() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let image = push_base_image(dir);
    mcow_ok(dir, &["create", "vm", "-s", "4M"]);
    let serve = Serve::start(
        dir,
        &[
            "--cache",
            "cache",
            "--control",
            "ctl.sock",
            "--metrics",
            "127.0.0.1:0",
            "vm",
            &format!("img={image}"),
        ],
    );
    let tcp_metrics = serve
        .log()
        .lines()
        .find_map(|l| l.strip_prefix("mcow: metrics on ").map(str::to_string))
        .unwrap_or_else(|| panic!("no metrics address printed: {}", serve.log()));
    assert!(
        tcp_metrics.starts_with("http://127.0.0.1:") && tcp_metrics.ends_with("/metrics"),
        "{tcp_metrics}"
    );
    let out = tool_ok(
        "qemu-io",
        dir,
        &["-f", "raw", "-c", "write -P 0x1 0 64k", "-c", "read -P 0x1 0 64k", &serve.unix_uri("vm")],
    );
    assert!(out.contains("read 65536/65536"), "{out}");
    let out =
        tool_ok("qemu-io", dir, &["-f", "raw", "-r", "-c", "read -P 0x42 0 128k", &serve.unix_uri("img")]);
    assert!(out.contains("read 131072/131072"), "{out}");

    let got = tool_run(
        "curl",
        dir,
        &[
            "-sS",
            "--unix-socket",
            "ctl.sock",
            "-o",
            "metrics.txt",
            "-w",
            "%{http_code} %{content_type}",
            "http://x/metrics",
        ],
    );
    assert_eq!(got.stdout, "200 text/plain; version=0.0.4", "{}", got.stderr);
    let checked = sh_ok(dir, "promtool check metrics < metrics.txt && echo PROMTOOL-OK");
    assert!(checked.contains("PROMTOOL-OK"), "{checked}");
    let text = std::fs::read_to_string(dir.join("metrics.txt")).unwrap();
    assert_eq!(sample(&text, "mcow_exports"), 2.0);
    assert_eq!(sample(&text, r#"mcow_export_written_bytes_total{export="vm"}"#), 65536.0);
    assert_eq!(sample(&text, r#"mcow_export_read_bytes_total{export="vm"}"#), 65536.0);
    assert_eq!(sample(&text, r#"mcow_export_read_bytes_total{export="img"}"#), 131072.0);
    assert_eq!(sample(&text, r#"mcow_export_errors_total{export="vm"}"#), 0.0);
    assert_eq!(sample(&text, r#"mcow_export_clients{export="vm"}"#), 0.0);
    let count = sample(&text, r#"mcow_export_request_duration_seconds_count{export="vm"}"#);
    assert!(count >= 2.0, "a write and a read at least: {count}");
    assert_eq!(sample(&text, r#"mcow_export_request_duration_seconds_bucket{export="vm",le="+Inf"}"#), count);
    assert!(count <= sample(&text, r#"mcow_export_requests_total{export="vm"}"#));
    assert!(sample(&text, r#"mcow_export_request_duration_seconds_sum{export="vm"}"#) > 0.0);
    assert_eq!(sample(&text, r#"mcow_export_fetched_bytes_total{export="vm"}"#), 0.0);
    assert!(sample(&text, r#"mcow_export_fetched_bytes_total{export="img"}"#) >= 131072.0);
    assert!(sample(&text, r#"mcow_export_fetch_requests_total{export="img"}"#) >= 1.0);
    assert_eq!(sample(&text, r#"mcow_export_fetch_errors_total{export="img"}"#), 0.0);
    // (file:// is local: never retried.)
    assert_eq!(sample(&text, r#"mcow_export_fetch_retries_total{export="img"}"#), 0.0);
    // Cache hits and misses: the two blocks read once from the lazy disk, nothing for the
    // local one; read again, both are hits.
    let hits_misses = |text: &str, export: &str| {
        let get = |m: &str| sample(text, &format!("mcow_export_cache_{m}_total{{export=\"{export}\"}}"));
        (get("hits"), get("misses"))
    };
    assert_eq!(hits_misses(&text, "vm"), (0.0, 0.0));
    let (hits, misses) = hits_misses(&text, "img");
    assert_eq!(hits + misses, 2.0, "{text}");
    let out =
        tool_ok("qemu-io", dir, &["-f", "raw", "-r", "-c", "read -P 0x42 0 128k", &serve.unix_uri("img")]);
    assert!(out.contains("read 131072/131072"), "{out}");
    let got =
        tool_run("curl", dir, &["-sS", "--unix-socket", "ctl.sock", "-o", "metrics.txt", "http://x/metrics"]);
    assert_eq!(got.code, 0, "{}", got.stderr);
    let text = std::fs::read_to_string(dir.join("metrics.txt")).unwrap();
    assert_eq!(hits_misses(&text, "img"), (hits + 2.0, misses), "{text}");

    // The same metrics on the TCP address, and nothing else there: no list, no add.
    let got = tool_run("curl", dir, &["-sS", "-o", "tcp-metrics.txt", "-w", "%{http_code}", &tcp_metrics]);
    assert_eq!(got.stdout, "200", "{}", got.stderr);
    let checked = sh_ok(dir, "promtool check metrics < tcp-metrics.txt && echo PROMTOOL-OK");
    assert!(checked.contains("PROMTOOL-OK"), "{checked}");
    let tcp_text = std::fs::read_to_string(dir.join("tcp-metrics.txt")).unwrap();
    assert_eq!(sample(&tcp_text, "mcow_exports"), 2.0);
    assert_eq!(hits_misses(&tcp_text, "img"), (hits + 2.0, misses));
    let base = tcp_metrics.trim_end_matches("/metrics");
    for (method, path) in [("GET", "/exports"), ("POST", "/exports"), ("POST", "/metrics")] {
        let url = format!("{base}{path}");
        let got = tool_run(
            "curl",
            dir,
            &["-sS", "-X", method, "-d", "{\"disk\": \"vm\"}", "-o", "/dev/null", "-w", "%{http_code}", &url],
        );
        let want = if path == "/metrics" { "405" } else { "404" };
        assert_eq!(got.stdout, want, "{method} {url}: {}", got.stderr);
    }
    assert_eq!(names(&list(dir, "ctl.sock")), ["vm", "img"], "the TCP address changed the exports");

    // The origin loses its blobs: a read of a block not fetched yet fails, and is counted.
    std::fs::remove_dir_all(dir.join("img/blobs")).unwrap();
    let out = tool_run("qemu-io", dir, &["-f", "raw", "-r", "-c", "read 896k 64k", &serve.unix_uri("img")]);
    let failed = out.stdout.contains("error") || out.stderr.contains("error") || out.code != 0;
    assert!(failed, "the read did not fail: {} {}", out.stdout, out.stderr);
    let got =
        tool_run("curl", dir, &["-sS", "--unix-socket", "ctl.sock", "-o", "metrics.txt", "http://x/metrics"]);
    assert_eq!(got.code, 0, "{}", got.stderr);
    let text = std::fs::read_to_string(dir.join("metrics.txt")).unwrap();
    assert!(sample(&text, r#"mcow_export_fetch_errors_total{export="img"}"#) >= 1.0, "{text}");
    serve.stop();
}

/// Tried: a disk served writable and read-only under two names; qemu-io writes, then a
/// snapshot through curl (sealed in the background), more writes, a second one through `mcow
/// ctl snapshot --wait`, more writes; snapshots of an unknown name, of the read-only export,
/// and with GET. Must hold: each snapshot answers 201 with the frozen and the new top; --wait
/// prints the new layer's digest; clients read every write throughout (the read-only twin too);
/// the errors are 404, 409 and 405 with messages, and change nothing; after the server stops
/// the disk has two more sealed layers, the last the digest --wait printed, reads back every
/// write, and `mcow check` is clean.
#[test]
fn snapshots_of_a_disk_in_use() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    mcow_ok(dir, &["create", "vm", "-s", "8M"]);
    mcow_ok(dir, &["seal", "vm"]);
    let layers = |v: &Value| v["layers"].as_array().unwrap().len();
    let before = layers(&mcow_in(dir, &["info", "vm", "--output", "json"]).json());
    let serve = Serve::start_env(dir, &["--control", "ctl.sock", "vm=vm"], &[("RUST_LOG", "info")]);
    let uri = serve.unix_uri("vm");
    let io = |cmd: &str| {
        let out = tool_ok("qemu-io", dir, &["-f", "raw", "-c", cmd, &uri]);
        assert!(!out.contains("error") && !out.contains("failed"), "{cmd}: {out}");
    };
    io("write -P 0x11 0 1M");
    let (code, v) = curl(dir, "ctl.sock", "POST", "/exports/vm/snapshot", None);
    assert_eq!(code, 201, "{v}");
    assert!(
        v["frozen"].as_str().unwrap().starts_with("top-") && v["top"].as_str().unwrap().starts_with("top-")
    );
    assert!(v["layer"].is_null(), "sealed in the background: {v}");
    io("write -P 0x22 512k 1M");
    io("read -P 0x11 0 512k");
    let out = mcow_ok(dir, &["ctl", "-c", "ctl.sock", "snapshot", "vm", "--wait"]);
    let digest = out.lines().last().unwrap().trim().to_string();
    assert!(digest.starts_with("sha256:"), "{out}");
    io("write -P 0x33 7M 1M");
    io("read -P 0x22 512k 1M");

    let (code, v) = curl(dir, "ctl.sock", "POST", "/exports/nope/snapshot", None);
    assert_eq!(code, 404, "{v}");
    let (code, v) =
        curl(dir, "ctl.sock", "POST", "/exports", Some(r#"{"name": "ro", "disk": "vm", "read_only": true}"#));
    assert_eq!(code, 201, "{v}");
    let ro = serve.unix_uri("ro");
    let out = tool_ok("qemu-io", dir, &["-f", "raw", "-r", "-c", "read -P 0x33 7M 1M", &ro]);
    assert!(out.contains("read 1048576/1048576"), "the read-only twin reads the writer's data: {out}");
    let (code, v) = curl(dir, "ctl.sock", "POST", "/exports/ro/snapshot", None);
    assert_eq!(code, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("ro"), "{v}");
    let (code, v) = curl(dir, "ctl.sock", "GET", "/exports/vm/snapshot", None);
    assert_eq!(code, 405, "{v}");
    serve.stop();

    let info = mcow_in(dir, &["info", "vm", "--output", "json"]).json();
    assert_eq!(layers(&info), before + 2, "two snapshots, two layers: {info}");
    assert_eq!(info["layers"].as_array().unwrap().last().unwrap()["digest"].as_str(), Some(digest.as_str()));
    let check = |cmd: &str| {
        let out = tool_ok("qemu-io", dir, &["-f", "raw", "-r", "-c", cmd, "vm.raw"]);
        assert!(out.contains("read "), "{cmd}: {out}");
        assert!(!out.contains("Pattern verification failed"), "{cmd}: {out}");
    };
    mcow_ok(dir, &["export", "vm", "vm.raw"]);
    check("read -P 0x11 0 512k");
    check("read -P 0x22 512k 1M");
    check("read -P 0x00 1536k 5632k");
    check("read -P 0x33 7M 1M");
    mcow_ok(dir, &["check", "vm"]);
}

/// Tried: a lazily pulled image added with `mcow ctl add --fetch-window 1 --readahead 0
/// --no-prefetch`, read block by block (8 sequential 64 KiB reads); a second export of the same
/// image asking for another window, one asking for none, and requests with a window of 0 and an
/// unknown fetch key, with curl. Must hold: the export lists the settings asked for; the reads
/// cost one fetch each (the server's default window of 4 would make 3 requests of them); the
/// conflicting export is refused with 409 naming the export and its settings, the one without
/// options is added and fetches the same way; the bad requests get 400 with the problem named;
/// the list changes only by the export that was added.
#[test]
fn fetch_options_per_export_apply_and_conflicts_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let image = push_base_image(dir);
    let serve = Serve::start(dir, &["--cache", "cache", "--control", "ctl.sock"]);
    let out = mcow_ok(
        dir,
        &[
            "ctl",
            "-c",
            "ctl.sock",
            "add",
            "img",
            &image,
            "-r",
            "--fetch-window",
            "1",
            "--readahead",
            "0",
            "--no-prefetch",
            "--output",
            "json",
        ],
    );
    let added: Value = serde_json::from_str(&out).unwrap();
    let settings = serde_json::json!({"window": 1, "readahead": 0, "prefetch": false, "all": false});
    assert_eq!(added["fetch"], settings, "{added}");
    let requests = |dir: &Path| {
        let (code, v) = curl(dir, "ctl.sock", "GET", "/exports/img", None);
        assert_eq!(code, 200, "{v}");
        v["fetch_requests"].as_u64().unwrap()
    };
    let before = requests(dir);
    let mut args: Vec<String> = vec!["-f".into(), "raw".into(), "-r".into()];
    for b in 0..8 {
        args.extend(["-c".into(), format!("read -P 0x42 {} 64k", b * 65536)]);
    }
    args.push(serve.unix_uri("img"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = tool_ok("qemu-io", dir, &args);
    assert_eq!(out.matches("read 65536/65536").count(), 8, "{out}");
    assert_eq!(requests(dir) - before, 8, "a fetch window of 1: one request per block read");

    let listed = list(dir, "ctl.sock");
    let cases: [(&str, u16, &str); 3] = [
        (
            r#"{"name": "img2", "disk": "IMAGE", "read_only": true, "fetch": {"window": 4}}"#,
            409,
            "already served as export \"img\", fetching with window 1 blocks, read-ahead 0 bytes, prefetch false",
        ),
        (
            r#"{"name": "img3", "disk": "IMAGE", "read_only": true, "fetch": {"window": 0}}"#,
            400,
            "fetch window 0",
        ),
        (
            r#"{"name": "img4", "disk": "IMAGE", "read_only": true, "fetch": {"windoww": 1}}"#,
            400,
            "unknown field `windoww`",
        ),
    ];
    for (body, want, text) in cases {
        let body = body.replace("IMAGE", &image);
        let (code, v) = curl(dir, "ctl.sock", "POST", "/exports", Some(&body));
        assert_eq!(code, want, "{body}: {v}");
        let msg = v["error"].as_str().unwrap_or_else(|| panic!("no error message: {v}"));
        assert!(msg.contains(text), "{body}: {msg:?} lacks {text:?}");
    }
    assert_eq!(list(dir, "ctl.sock"), listed, "a refused request changed the list");
    let body = format!(r#"{{"name": "img5", "disk": "{image}", "read_only": true}}"#);
    let (code, v) = curl(dir, "ctl.sock", "POST", "/exports", Some(&body));
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["fetch"], settings, "a second export of the disk fetches as the disk was opened");
    assert_eq!(names(&list(dir, "ctl.sock")), ["img", "img5"]);
    serve.stop();
}
