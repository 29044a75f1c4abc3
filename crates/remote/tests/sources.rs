//! `Sources`, the caller's registry of one remote source per origin (which replaced a
//! process-global map): disks of one origin opened through the same `Sources` share one source
//! (its counters move for both when either fetches), disks opened through different ones share
//! nothing. The origin is a `file://` layout, so no server is needed.

mod common;

use std::sync::Arc;

use common::*;
use mcow_engine::OpenOptions;
use mcow_remote::Reference;
use mcow_remote::transfer::{self, LazyOrigin, ORIGIN_FILE, Sources};

fn ro() -> OpenOptions {
    OpenOptions { read_only: true, verify: true, force_share: true }
}

#[test]
fn disks_of_one_origin_share_a_source_within_one_sources_only() {
    let t = tempfile::tempdir().unwrap();
    let (disk, bytes) = build_disk(&t.path().join("a"));
    let r = Reference::parse(&format!("file://{}:v1", t.path().join("layout").display())).unwrap();
    transfer::push(&disk, &r, &mut |_, _| {}).unwrap();
    for vm in ["b", "c"] {
        let d = t.path().join(vm);
        transfer::pull(&r, &d.join("disk"), &d.join("layers"), true, &mut |_, _| {}).unwrap();
    }
    let origin: LazyOrigin =
        serde_json::from_slice(&std::fs::read(t.path().join("b/disk").join(ORIGIN_FILE)).unwrap()).unwrap();

    let sources = Sources::new();
    let (b, b_stats) = sources
        .open_lazy_disk(&mcow_engine::Engine::default(), &t.path().join("b/disk"), ro(), EXACT)
        .unwrap();
    let (_c, c_stats) = sources
        .open_lazy_disk(&mcow_engine::Engine::default(), &t.path().join("c/disk"), ro(), EXACT)
        .unwrap();
    let (b_stats, c_stats) = (b_stats.unwrap(), c_stats.unwrap());
    assert!(Arc::ptr_eq(&sources.get(&origin.reference).unwrap(), &sources.get(&origin.reference).unwrap()));
    // A disk of the same origin opened through another registry: a source of its own.
    let (_c2, c2_stats) = Sources::new()
        .open_lazy_disk(&mcow_engine::Engine::default(), &t.path().join("c/disk"), ro(), EXACT)
        .unwrap();
    let c2_stats = c2_stats.unwrap();

    let (vb, _) = data_blocks_of(&b, 1)[0];
    let mut buf = vec![0u8; 4096];
    b.read(vb * BS, &mut buf).unwrap();
    assert_eq!(buf, bytes[(vb * BS) as usize..][..4096]);
    assert_eq!(b_stats.stats(), (BS, 1), "one block fetched for b");
    assert_eq!(c_stats.stats(), (BS, 1), "c shares b's source: the same counters");
    assert_eq!(c2_stats.stats(), (0, 0), "a disk opened through another Sources shares nothing");
}
