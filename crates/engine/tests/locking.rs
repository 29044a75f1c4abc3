//! Locking of a disk's top: one writer, or any number of readers; `force_share` lets a reader in
//! beside a writer (like `qemu-img -U`).

mod common;

use common::{create_disk, open_rw};
use mcow_engine::{Disk, Error, OpenOptions, ops};

const RO: OpenOptions = OpenOptions { read_only: true, verify: true, force_share: false };
const SHARED: OpenOptions = OpenOptions { read_only: true, verify: true, force_share: true };

fn assert_locked(r: mcow_engine::Result<Disk>, what: &str) {
    match r {
        Err(e @ Error::Locked { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("top-1.mcow") && msg.contains("locked"), "{what}: {msg}");
            assert_eq!(e.io_kind(), std::io::ErrorKind::WouldBlock);
        }
        Err(e) => panic!("{what}: expected Error::Locked, got {e}"),
        Ok(_) => panic!("{what}: expected Error::Locked, but the open succeeded"),
    }
}

#[test]
fn second_writer_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = create_disk(tmp.path(), "d", 1 << 20, 4096);
    let w = open_rw(&dir);
    assert_locked(Disk::open(&dir, OpenOptions::default()), "second writable open");
    assert_locked(
        Disk::open(&dir, OpenOptions { force_share: true, ..Default::default() }),
        "force_share is for readers",
    );
    match ops::merge(&dir, 0, &mut |_, _| {}) {
        Err(Error::Locked { .. }) => {}
        other => panic!("merge beside a writer: {other:?}"),
    }
    drop(w);
    drop(open_rw(&dir)); // released on drop
}

#[test]
fn reader_beside_a_writer_needs_force_share() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = create_disk(tmp.path(), "d", 1 << 20, 4096);
    let w = open_rw(&dir);
    w.write(4096, &[7; 100]).unwrap();
    w.flush().unwrap();
    assert_locked(Disk::open(&dir, RO), "read-only open beside a writer");
    assert!(matches!(ops::check(&dir, false, &mut |_, _| {}), Err(Error::Locked { .. })));
    let r = Disk::open(&dir, SHARED).expect("force_share opens beside a writer");
    let mut buf = [0u8; 100];
    r.read(4096, &mut buf).unwrap();
    assert_eq!(buf, [7; 100], "the shared reader sees the writer's flushed data");
    assert!(matches!(r.write(0, &[1]), Err(Error::ReadOnly)));
    let report = ops::check(&dir, true, &mut |_, _| {}).unwrap();
    assert!(report.errors.is_empty(), "{report:?}");
    drop(r);
    drop(w);
}

#[test]
fn readers_share_and_keep_a_writer_out() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = create_disk(tmp.path(), "d", 1 << 20, 4096);
    let r1 = Disk::open(&dir, RO).unwrap();
    let r2 = Disk::open(&dir, RO).unwrap();
    assert_locked(Disk::open(&dir, OpenOptions::default()), "writable open beside readers");
    drop(r1);
    assert_locked(Disk::open(&dir, OpenOptions::default()), "writable open beside one reader");
    drop(r2);
    drop(open_rw(&dir));
}
