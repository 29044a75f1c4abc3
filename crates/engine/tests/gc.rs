//! `gc::collect` against the locks of other users of the store: a layer being added and not yet
//! named in a manifest, and layers open in a running engine, are never collected.

use std::time::Duration;

use mcow_engine::gc::{GcOptions, collect};
use mcow_engine::store::LayerStore;
use mcow_engine::{CreateOptions, Disk, OpenOptions};

fn quick() -> GcOptions {
    GcOptions { lock_wait: Duration::from_millis(200), ..GcOptions::default() }
}

// Tried: a store with a disk d beside it, sealed once (its layer referenced), and a second
// layer written through `begin_layer`/`commit` by a store value still alive (as a pull is
// between adding a layer and writing the manifest that names it); collect then, after that
// value is dropped, and again while an engine elsewhere holds the orphan layer open through a
// disk whose manifest gc does not see (it is not beside the store).
// Must hold: while the writer's store lives, collect fails (busy) and removes nothing; once
// it is dropped, collect removes the orphan and keeps d's layer; a layer open in a running
// engine is kept even though no manifest gc scans names it, and collected once it is closed.
#[test]
fn layers_being_added_or_in_use_are_never_collected() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("site");
    let store_dir = root.join("layers");
    let opts =
        CreateOptions { virtual_size: 1 << 20, block_size: 65536, store: store_dir.clone(), layers: vec![] };
    let d = root.join("d");
    Disk::create(&d, &opts).unwrap();
    {
        let disk = Disk::open(&d, OpenOptions::default()).unwrap();
        disk.write(0, &[7u8; 65536]).unwrap();
        disk.flush().unwrap();
    }
    let kept = mcow_engine::ops::merge(&d, 0, &mut |_, _| {}).unwrap();
    // An orphan layer, added by a store value that is still alive (its lease held).
    let other = t.path().join("elsewhere"); // not beside the store: gc does not see it
    Disk::create(&other, &opts).unwrap();
    {
        let disk = Disk::open(&other, OpenOptions::default()).unwrap();
        disk.write(65536, &[9u8; 65536]).unwrap();
        disk.flush().unwrap();
    }
    let orphan = mcow_engine::ops::merge(&other, 0, &mut |_, _| {}).unwrap();
    let store = LayerStore::new(&store_dir);
    let writer = store.begin_layer().unwrap(); // the lease
    let busy = collect(&root.join("layers"), &quick());
    assert!(busy.is_err_and(|e| e.to_string().contains("another process is adding layers")));
    assert!(store.contains(&orphan) && store.contains(&kept), "a failed collect removed something");
    drop(writer);
    drop(store);
    // Open in a running engine through a disk gc does not see: kept.
    let open =
        Disk::open(&t.path().join("elsewhere"), OpenOptions { read_only: true, ..OpenOptions::default() })
            .unwrap();
    let report = collect(&store_dir, &quick()).unwrap();
    assert!(report.garbage.is_empty(), "{report:?}");
    drop(open);
    let report = collect(&store_dir, &quick()).unwrap();
    let removed: Vec<_> = report.garbage.iter().map(|(g, _)| g.path().to_path_buf()).collect();
    let s = LayerStore::new(&store_dir);
    assert_eq!(removed, vec![s.layer_path(&orphan)], "{report:?}");
    assert!(!s.contains(&orphan) && s.contains(&kept));
    let mut buf = vec![0u8; 65536];
    Disk::open(&d, OpenOptions::default()).unwrap().read(0, &mut buf).unwrap();
    assert_eq!(buf, vec![7u8; 65536]);
}
