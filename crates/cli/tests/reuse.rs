//! Block reuse through `mcow serve` and a real OCI registry (Debian's docker-registry on
//! loopback): a new version of a base layer, served from a cache that holds the old one, fetches
//! only the blocks that changed. nbdcopy and docker-registry must be installed: a missing one
//! fails the test.

mod common;
#[path = "common/nbd.rs"]
mod nbd;
#[path = "common/registry.rs"]
mod registry;

use common::*;
use nbd::*;

const BS: u64 = 65536;
const BLOCKS: u64 = 64;
/// The blocks image B's base layer changes (three runs).
const CHANGED: [u64; 4] = [3, 30, 31, 60];

/// `key=N` of the exit line of `mcow serve`'s log that contains `line` (and `export=NAME ` if
/// given).
fn logged(log: &str, line: &str, export: Option<&str>, key: &str) -> u64 {
    let l = log
        .lines()
        .find(|l| l.contains(line) && export.is_none_or(|e| l.contains(&format!("export={e} "))))
        .unwrap_or_else(|| panic!("no {line:?} line in the serve log:\n{log}"));
    let v = l
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {l:?}"));
    v.parse().unwrap_or_else(|e| panic!("bad {key} in {l:?}: {e}"))
}

/// A raw image of BLOCKS distinct 64 KiB blocks; in version 1, the CHANGED blocks differ.
fn image(version: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity((BLOCKS * BS) as usize);
    for b in 0..BLOCKS {
        let v = if CHANGED.contains(&b) { u64::from(version) } else { 0 };
        let mut x = (b + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (v + 1).wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
        out.extend((0..BS).map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x as u8) | 1
        }));
    }
    out
}

/// Serves `reference` read-only from `dir/cache` and copies the whole export out with nbdcopy;
/// returns the copy and the serve's log.
fn serve_and_copy(dir: &std::path::Path, reference: &str, out: &str) -> (Vec<u8>, String) {
    let srv = Serve::start_env(
        dir,
        &["-r", "--cache", "cache", &format!("t={reference}")],
        &[("RUST_LOG", "info")],
    );
    tool_ok("nbdcopy", dir, &[&srv.unix_uri("t"), out]);
    let log = srv.stop_with_log();
    (std::fs::read(dir.join(out)).unwrap(), log)
}

/// Tried: image A (one base layer of 64 distinct blocks) and image B (the same base with 4 blocks
/// changed: a new layer, another digest) pushed to a docker-registry; A served from an empty
/// cache and read whole, then B served from the same cache and read whole.
/// Must hold: both read back their bytes; A fetches all 64 blocks and reuses none; B fetches
/// exactly its 4 changed blocks' bytes and logs the other 60 as reused.
#[test]
fn a_new_base_layer_fetches_only_its_changed_blocks() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let (a, b) = (image(0), image(1));
    std::fs::write(dir.join("a.raw"), &a).unwrap();
    std::fs::write(dir.join("b.raw"), &b).unwrap();
    let da = mcow_ok(dir, &["import", "a.raw", "a"]);
    let db = mcow_ok(dir, &["import", "b.raw", "b"]);
    assert_ne!(da.lines().next(), db.lines().next(), "the two base layers must differ");
    let reg = registry::Registry::start(&dir.join("reg"));
    let (ra, rb) = (format!("oci://{}/mcow/base:a", reg.host()), format!("oci://{}/mcow/base:b", reg.host()));
    mcow_ok(dir, &["push", "a", &ra]);
    mcow_ok(dir, &["push", "b", &rb]);

    let (copy, log) = serve_and_copy(dir, &ra, "a.copy");
    assert!(copy == a, "image A reads wrong");
    let fetched = logged(&log, "served; fetched from the origin", Some("t"), "blocks_bytes_fetched");
    assert_eq!(fetched, BLOCKS * BS, "image A: block bytes fetched\n{log}");
    assert_eq!(logged(&log, "copied from other local layers", None, "blocks_reused"), 0, "{log}");

    let (copy, log) = serve_and_copy(dir, &rb, "b.copy");
    assert!(copy == b, "image B reads wrong");
    let k = CHANGED.len() as u64;
    let fetched = logged(&log, "served; fetched from the origin", Some("t"), "blocks_bytes_fetched");
    assert_eq!(fetched, k * BS, "image B: block bytes fetched\n{log}");
    assert_eq!(logged(&log, "copied from other local layers", None, "blocks_reused"), BLOCKS - k, "{log}");
    assert_eq!(
        logged(&log, "copied from other local layers", None, "bytes_reused"),
        (BLOCKS - k) * BS,
        "{log}"
    );
}
