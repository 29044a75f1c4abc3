//! The format on disk: small disks written by versions 1 and 2 (in `tests/golden/v1` and `v2`)
//! must keep opening and reading the same, and the same writes must keep producing the very
//! same version 2 sealed layer bytes (the layer is named by their digest). A change that breaks
//! either is a format change: it needs a new version or a feature bit (docs/FORMAT.md).

use std::path::Path;

use mcow_engine::{CreateOptions, Disk, OpenOptions, ops};

/// The sealed layer of each golden disk (version 1: SHA-256 block hashes; version 2: BLAKE3).
const GOLDEN_V1: &str = "sha256:dec3cf12c7764282c719b10c295e0e74e9fab88bd5f1e210de16b324bb7344d5";
const GOLDEN_V2: &str = "sha256:5f83fd4d3d9ccb3c08681968da5a736bb830b5c8c9b2c825d0b6fa09dc4edb69";

/// The content both golden disks were made with: 64 KiB, 4 KiB blocks; 0x5a over [4096, 8192),
/// 0xa5 over [10000, 10100), zeros written over [12288, 16384), then sealed.
fn expected() -> Vec<u8> {
    let mut m = vec![0u8; 65536];
    m[4096..8192].fill(0x5a);
    m[10000..10100].fill(0xa5);
    m
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// Opens the golden disk of `version` (a copy), reads it whole, and checks it; returns the
/// format version in its sealed layer's header.
fn opens_reads_and_checks_clean(version: &str, layer: &str) -> u32 {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(version), tmp.path());
    let dir = tmp.path().join("disk");
    let d = Disk::open(&dir, OpenOptions { read_only: true, verify: true, force_share: false }).unwrap();
    assert_eq!(d.manifest().layers.iter().map(|l| l.to_string()).collect::<Vec<_>>(), vec![layer]);
    let mut all = vec![0u8; 65536];
    d.read(0, &mut all).unwrap();
    assert!(all == expected(), "the golden disk {version} reads differently");
    drop(d);
    let report = ops::check(&dir, false, &mut |_, _| {}).unwrap();
    assert!(report.errors.is_empty() && report.debris.is_empty(), "{report:?}");
    let file = std::fs::read(tmp.path().join("layers/blobs/sha256").join(&layer["sha256:".len()..])).unwrap();
    u32::from_le_bytes(file[8..12].try_into().unwrap())
}

#[test]
fn version_1_disk_still_opens_reads_and_checks_clean() {
    assert_eq!(opens_reads_and_checks_clean("v1", GOLDEN_V1), 1);
}

#[test]
fn version_2_disk_still_opens_reads_and_checks_clean() {
    assert_eq!(opens_reads_and_checks_clean("v2", GOLDEN_V2), 2);
}

#[test]
fn the_same_writes_still_make_the_same_layer_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("disk");
    let opts = CreateOptions {
        virtual_size: 65536,
        block_size: 4096,
        store: tmp.path().join("layers"),
        layers: vec![],
    };
    Disk::create(&dir, &opts).unwrap();
    {
        let d = Disk::open(&dir, OpenOptions::default()).unwrap();
        d.write(4096, &[0x5a; 4096]).unwrap();
        d.write(10000, &[0xa5; 100]).unwrap();
        d.write_zeroes(12288, 4096, false).unwrap();
        d.flush().unwrap();
    }
    let digest = ops::merge(&dir, 0, &mut |_, _| {}).unwrap();
    assert_eq!(digest.to_string(), GOLDEN_V2, "the sealed layer's bytes changed: that is a format change");
}
