//! OCI conventions through the CLI: cross-repository blob mounts on `mcow push` to a real
//! registry (Debian's docker-registry on loopback, its access log read to see what was
//! uploaded), and the errors users get for references other tools taught them (`docker://`,
//! skopeo's `oci:DIR`) and for image layouts that are not there. docker-registry and curl must
//! be installed: a missing one fails the test.

mod common;
#[path = "common/nbd.rs"]
mod nbd;
#[path = "common/registry.rs"]
mod registry;

use std::path::Path;

use common::*;
use nbd::*;
use registry::Registry;

/// A 4 MiB disk `d` with two sealed layers and an empty top; returns its content.
fn two_layer_disk(dir: &Path) -> Vec<u8> {
    mcow_ok(dir, &["create", "d", "-s", "4M"]);
    mcow_ok(dir, &["write", "d", "0", "--pattern", "0x11", &MIB.to_string()]);
    mcow_ok(dir, &["seal", "d"]);
    mcow_ok(dir, &["write", "d", &(2 * MIB + 4096).to_string(), "--pattern", "0x22", "300000"]);
    mcow_ok(dir, &["seal", "d"]);
    export_bytes(dir, "d")
}

fn push_json(dir: &Path, reference: &str) -> serde_json::Value {
    let r = mcow_in(dir, &["push", "d", reference, "--output", "json"]);
    assert_eq!(r.code, 0, "push to {reference} failed:\n{}", r.stderr);
    r.json()
}

/// The requests of `log` that sent blob bytes to repository `repo` (PATCH or PUT of an upload).
fn uploads_to<'a>(log: &'a [(String, String, u16)], repo: &str) -> Vec<&'a (String, String, u16)> {
    let prefix = format!("/v2/{repo}/blobs/uploads/");
    log.iter().filter(|(m, uri, _)| (m == "PUT" || m == "PATCH") && uri.starts_with(&prefix)).collect()
}

/// Tried: a 2-layer disk pushed to repository mcow/a of a registry, then to mcow/b of the same
/// registry; the b image pulled into a fresh directory and store. Then the link of one layer
/// removed from both repositories (`DELETE /v2/<repo>/blobs/<digest>`) and the disk pushed to
/// mcow/c. Must hold: the push to b mounts every layer (and the config) from a, which the
/// registry answers 201, and sends no blob bytes (no PUT or PATCH of an upload to b in the
/// registry's access log; 0 bytes uploaded in the report); the image in b has a's manifest and
/// pulls and exports byte for byte as the source. For c, the layer no repository links any
/// more is refused as a mount by both (202), the first refused session is cancelled (DELETE)
/// and the last one is used to upload it (one PUT to c, 201); the other layer is mounted; c
/// pulls and exports as the source.
#[test]
fn a_push_to_a_second_repository_mounts_the_blobs_instead_of_uploading() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let reg = Registry::start_logged(&dir.join("reg"));
    let model = two_layer_disk(dir);
    let a = format!("oci://{}/mcow/a:v1", reg.host());
    let first = push_json(dir, &a);
    assert_eq!((first["layers"].as_u64(), first["uploaded"].as_u64()), (Some(2), Some(2)), "{first}");
    assert_eq!(first["mounted"].as_u64(), Some(0), "{first}");
    assert!(dir.join("layers/blob-locations.json").exists(), "the push recorded no blob locations");
    let before = reg.access_log().len();
    assert!(!uploads_to(&reg.access_log(), "mcow/a").is_empty(), "the access log shows no uploads at all");

    let b = format!("oci://{}/mcow/b:v1", reg.host());
    let second = push_json(dir, &b);
    assert_eq!((second["uploaded"].as_u64(), second["mounted"].as_u64()), (Some(0), Some(2)), "{second}");
    assert_eq!((second["bytes_uploaded"].as_u64(), second["already_there"].as_u64()), (Some(0), Some(0)));
    assert_eq!(second["manifest_digest"], first["manifest_digest"]);
    let log = reg.access_log();
    let new = &log[before..];
    assert!(uploads_to(new, "mcow/b").is_empty(), "blob bytes were sent to b: {new:#?}");
    let mounts: Vec<_> = new.iter().filter(|(m, uri, _)| m == "POST" && uri.contains("mount=")).collect();
    assert_eq!(mounts.len(), 3, "two layers and the config are mounted: {new:#?}");
    assert!(mounts.iter().all(|(_, uri, s)| *s == 201 && uri.contains("from=mcow%2Fa")), "{mounts:#?}");
    let human = mcow_ok(dir, &["push", "d", &b]);
    assert!(human.contains("2 already there"), "{human}");

    let pulled = mcow_in(dir, &["pull", &b, "pb/d", "--store", "pb/layers", "--output", "json"]);
    assert_eq!(pulled.code, 0, "pull of b failed:\n{}", pulled.stderr);
    assert_eq!(pulled.json()["manifest_digest"], first["manifest_digest"]);
    assert!(export_bytes(dir, "pb/d") == model, "the image pulled from b differs from the source");

    // One layer unlinked from a and b: the mounts of it are refused and it is uploaded.
    let info = mcow_in(dir, &["info", "d", "--output", "json"]).json();
    let top_layer = info["layers"][1]["digest"].as_str().unwrap().to_string();
    for repo in ["mcow/a", "mcow/b"] {
        let url = format!("http://{}/v2/{repo}/blobs/{top_layer}", reg.host());
        let out =
            tool_ok("curl", dir, &["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "DELETE", &url]);
        assert_eq!(out.trim(), "202", "DELETE {url}");
    }
    let before = reg.access_log().len();
    let c = format!("oci://{}/mcow/c:v1", reg.host());
    let third = push_json(dir, &c);
    assert_eq!((third["uploaded"].as_u64(), third["mounted"].as_u64()), (Some(1), Some(1)), "{third}");
    let log = reg.access_log();
    let new = &log[before..];
    let puts = uploads_to(new, "mcow/c");
    assert_eq!(puts.len(), 1, "one upload to c: {new:#?}");
    assert_eq!(puts[0].2, 201, "{new:#?}");
    let refused: Vec<_> = new
        .iter()
        .filter(|(m, uri, s)| m == "POST" && uri.contains(&top_layer.replace(':', "%3A")) && *s == 202)
        .collect();
    assert_eq!(refused.len(), 2, "both repositories were asked for the unlinked layer: {new:#?}");
    let cancelled = new
        .iter()
        .filter(|(m, uri, _)| m == "DELETE" && uri.starts_with("/v2/mcow/c/blobs/uploads/"))
        .count();
    assert_eq!(cancelled, 1, "the first refused session is cancelled: {new:#?}");
    let pulled = mcow_in(dir, &["pull", &c, "pc/d", "--store", "pc/layers"]);
    assert_eq!(pulled.code, 0, "pull of c failed:\n{}", pulled.stderr);
    assert!(export_bytes(dir, "pc/d") == model, "the image pulled from c differs from the source");
}

/// Tried: pulls from references users of other tools type: `docker://HOST/REPO:TAG`, a Docker
/// Hub short name, skopeo's `oci:DIR:TAG`, a registry without a scheme; and `file://` layouts
/// that are not there (a missing directory, a file, an empty directory) or lack the tag. Must
/// hold: each fails (exit 1) with the reference to write instead, or with what is wrong with
/// the layout (a missing directory is said to not exist, not a missing tag; a missing tag names
/// the tags there), and no disk directory is left behind.
#[test]
fn references_from_other_tools_and_missing_layouts_get_clear_errors() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let fail = |args: &[&str], says: &[&str]| {
        let r = mcow_in(dir, args);
        assert_eq!(r.code, 1, "mcow {args:?} should fail:\n{}{}", r.stdout, r.stderr);
        for s in says {
            assert!(r.stderr.contains(s), "mcow {args:?}: no {s:?} in:\n{}", r.stderr);
        }
        r.stderr
    };
    let pull = |reference: &str, says: &[&str]| {
        let e = fail(&["pull", reference, "x"], says);
        assert!(!dir.join("x").exists(), "a failed pull of {reference} left x behind");
        e
    };
    pull("docker://127.0.0.1:5000/mcow/vm:v1", &["here it is oci://: oci://127.0.0.1:5000/mcow/vm:v1"]);
    pull("docker://debian:12", &["oci://HOST[:PORT]/REPOSITORY[:TAG]"]);
    let layout = dir.join("layout");
    pull(&format!("oci:{}:v1", layout.display()), &[&format!("is file://{}:v1 here", layout.display())]);
    pull("127.0.0.1:5000/mcow/vm:v1", &["for a registry: oci://127.0.0.1:5000/mcow/vm:v1"]);

    let missing = format!("file://{}:v1", layout.display());
    let e = pull(&missing, &["no OCI image layout at", "the directory does not exist"]);
    assert!(!e.contains("tag v1"), "{e}");
    std::fs::write(dir.join("afile"), b"x").unwrap();
    pull(&format!("file://{}/afile:v1", dir.display()), &["it is not a directory"]);
    std::fs::create_dir(&layout).unwrap();
    pull(&missing, &["has no index.json"]);
    // A layout with another tag: the missing tag is named, with the tags there.
    mcow_ok(dir, &["create", "d", "-s", "1M"]);
    mcow_ok(dir, &["write", "d", "0", "--pattern", "0x5a", "65536"]);
    mcow_ok(dir, &["seal", "d"]);
    mcow_ok(dir, &["push", "d", &format!("file://{}:v2", layout.display())]);
    pull(&missing, &["tag v1 not found at", "(its tags: v2)"]);
    // serve takes docker:// for a reference too, and says the same.
    fail(&["serve", "--cache", "c", "vm=docker://127.0.0.1:5000/mcow/vm"], &["oci://127.0.0.1:5000/mcow/vm"]);
}
