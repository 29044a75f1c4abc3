//! The image documents are part of the frozen format (docs/FORMAT.md, "Status"): the manifests
//! and configs in `tests/golden/` must keep parsing, and pushing the same disks must keep
//! writing them byte for byte (the manifest's digest is what users pin). Each case pushes a disk
//! made by fixed writes to an OCI layout (`file://`), compares the manifest and config it wrote
//! with the golden files, parses the golden files, and pulls the image back in full (and, for the
//! compressed case, lazily) to check it reads the same. `MCOW_BLESS=1` rewrites the golden files (only for a deliberate format change,
//! with a new version or feature bit: see FORMAT.md).

use std::path::{Path, PathBuf};

use mcow_engine::{CreateOptions, Disk, OpenOptions, ops};
use mcow_remote::Reference;
use mcow_remote::image::{DiskConfig, Manifest};
use mcow_remote::transfer;

fn golden_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(case)
}

/// A disk of `blocks` 4 KiB blocks with fixed content: a base layer (every third block written
/// with its own index) and a second layer (block 1 rewritten, block 2 zeroed), both sealed.
fn make_disk(dir: &Path, blocks: u64) -> Vec<u8> {
    let size = blocks * 4096;
    let opts =
        CreateOptions { virtual_size: size, block_size: 4096, store: dir.join("layers"), layers: vec![] };
    let disk = dir.join("disk");
    Disk::create(&disk, &opts).unwrap();
    let write = |f: &dyn Fn(&Disk)| {
        let d = Disk::open(&disk, OpenOptions::default()).unwrap();
        f(&d);
        d.flush().unwrap();
        drop(d);
        ops::merge(&disk, 0, &mut |_, _| {}).unwrap();
    };
    write(&|d| {
        for b in (0..blocks).step_by(3) {
            let text = format!("block {b} of the golden image\n");
            d.write(b * 4096, &text.repeat(4096 / text.len() + 1).as_bytes()[..4096]).unwrap();
        }
    });
    write(&|d| {
        d.write(4096 + 100, b"second layer").unwrap();
        d.write_zeroes(2 * 4096, 4096, false).unwrap();
    });
    let d = Disk::open(&disk, OpenOptions { read_only: true, verify: true, force_share: false }).unwrap();
    let mut all = vec![0u8; size as usize];
    d.read(0, &mut all).unwrap();
    all
}

/// The manifest and config that the layout at `layout` holds for `tag`.
fn documents(layout: &Path, tag: &str) -> (Vec<u8>, Vec<u8>) {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let desc = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .rfind(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .expect("the tag");
    let blob =
        |digest: &str| std::fs::read(layout.join("blobs/sha256").join(&digest["sha256:".len()..])).unwrap();
    let manifest = blob(desc["digest"].as_str().unwrap());
    let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let config = blob(m["config"]["digest"].as_str().unwrap());
    (manifest, config)
}

/// Pushes the disk of `blocks` blocks (with `trace` if given, compressed at `compress` if given)
/// and checks the documents against the golden case `case`; then pulls it back (in full, and
/// lazily when compressed) and compares the bytes.
fn check_case(case: &str, blocks: u64, trace: Option<&str>, compress: Option<i32>) {
    let t = tempfile::tempdir().unwrap();
    let bytes = make_disk(t.path(), blocks);
    let layout = t.path().join("layout");
    let r = Reference::parse(&format!("file://{}:{case}", layout.display())).unwrap();
    let trace_file = trace.map(|text| {
        let p = t.path().join("trace.json");
        std::fs::write(&p, text).unwrap();
        p
    });
    let opts = transfer::PushOptions { trace: trace_file.as_deref(), compress };
    transfer::push_with(&t.path().join("disk"), &r, &opts, &mut |_, _| {}).unwrap();
    let (manifest, config) = documents(&layout, case);
    let gold = golden_dir(case);
    if std::env::var_os("MCOW_BLESS").is_some() {
        std::fs::create_dir_all(&gold).unwrap();
        std::fs::write(gold.join("manifest.json"), &manifest).unwrap();
        std::fs::write(gold.join("config.json"), &config).unwrap();
    }
    let (gm, gc) = (
        std::fs::read(gold.join("manifest.json")).unwrap(),
        std::fs::read(gold.join("config.json")).unwrap(),
    );
    assert!(
        manifest == gm,
        "{case}: the manifest pushed differs from the golden one: that is a format change"
    );
    assert!(config == gc, "{case}: the config pushed differs from the golden one: that is a format change");
    let m = Manifest::parse(&gm).unwrap();
    DiskConfig::parse(&gc, &m).unwrap();
    transfer::pull(&r, &t.path().join("back/disk"), &t.path().join("back/layers"), false, &mut |_, _| {})
        .unwrap();
    let d = Disk::open(
        &t.path().join("back/disk"),
        OpenOptions { read_only: true, verify: true, force_share: false },
    )
    .unwrap();
    let mut all = vec![0u8; bytes.len()];
    d.read(0, &mut all).unwrap();
    assert!(all == bytes, "{case}: the pulled disk reads differently");
    if compress.is_some() {
        let sources = transfer::Sources::new();
        transfer::pull(&r, &t.path().join("lazy/disk"), &t.path().join("lazy/layers"), true, &mut |_, _| {})
            .unwrap();
        let engine = mcow_engine::Engine::default();
        let (d, _) = sources
            .open_lazy_disk(
                &engine,
                &t.path().join("lazy/disk"),
                OpenOptions { read_only: true, verify: true, force_share: false },
                mcow_engine::FetchPolicy::default(),
            )
            .unwrap();
        let mut all = vec![0u8; bytes.len()];
        d.read(0, &mut all).unwrap();
        assert!(all == bytes, "{case}: the lazily pulled disk reads differently");
    }
}

#[test]
fn plain_image_documents_are_unchanged() {
    check_case("plain", 16, None, None);
}

#[test]
fn image_documents_with_a_trace_are_unchanged() {
    check_case("trace", 16, Some(r#"{"block_size":4096,"blocks":[3,0,6]}"#), None);
}

#[test]
fn image_documents_with_index_chunks_are_unchanged() {
    // 1,536 blocks: the base layer's index region (512 stored blocks of hashes plus extents) is
    // over 16 KiB, so its config record has index chunks.
    check_case("chunks", 1536, None, None);
    let config = std::fs::read(golden_dir("chunks").join("config.json")).unwrap();
    assert!(String::from_utf8_lossy(&config).contains("index_chunks"), "the case must exercise index chunks");
}

#[test]
fn compressed_image_documents_are_unchanged() {
    // The config names each compressed blob by digest, so this also pins the blobs' bytes (zstd
    // level 3 with the zstd version in Cargo.lock: see FORMAT.md, "Compressed layer blobs").
    check_case("compressed", 16, None, Some(mcow_format::DEFAULT_LEVEL));
    let config = std::fs::read(golden_dir("compressed").join("config.json")).unwrap();
    assert!(String::from_utf8_lossy(&config).contains("frame_table_digest"), "the case must be compressed");
}
