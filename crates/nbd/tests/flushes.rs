//! Flushes do not stall a connection: a worker running a flush (waiting for a slow sync) does
//! not count against `workers_per_connection`, so the requests sent after the flush still run.
//! Tried: one worker per connection, an export whose flush takes 1.5 s, a FLUSH then a WRITE on
//! one connection (raw protocol). Must hold: the WRITE's reply comes first and the data is
//! written; with `flush_workers_per_connection: 0` (the old rule) the FLUSH's reply comes first,
//! which shows the test depends on the rule.

mod support;

use std::time::Duration;

use mcow_nbd::proto::Command;
use mcow_nbd::{MemExport, ServerConfig};
use support::{Raw, TestServer, ex};

/// The handles of the two replies, in the order they arrived, and the bytes at 0 afterwards.
fn flush_then_write(flush_workers: usize) -> (Vec<u64>, Vec<u8>) {
    let config = ServerConfig {
        workers_per_connection: 1,
        flush_workers_per_connection: flush_workers,
        ..ServerConfig::default()
    };
    let export = MemExport::new(1 << 20).with_flush_delay(Duration::from_millis(1500));
    let server = TestServer::start_with(config, vec![ex("slow", "slow flushes", export)]);
    let mut c = Raw::go(&server, "slow", false, &[]);
    c.request(Command::Flush, 0, 1, 0, 0);
    c.request(Command::Write, 0, 2, 0, 4096);
    c.send(&[0xab; 4096]);
    let order: Vec<u64> = (0..2)
        .map(|_| {
            let r = c.simple_reply();
            assert_eq!(r.error, 0, "request {} failed", r.handle);
            r.handle
        })
        .collect();
    c.request(Command::Read, 0, 3, 0, 4096);
    let r = c.simple_reply();
    assert_eq!((r.error, r.handle), (0, 3));
    let data = c.read_vec(4096);
    c.request(Command::Disc, 0, 4, 0, 0);
    assert_eq!(server.export("slow").flush_count(), 1);
    (order, data)
}

#[test]
fn a_write_after_a_slow_flush_is_answered_first() {
    let (order, data) = flush_then_write(32);
    assert_eq!(order, vec![2, 1], "the write waited for the flush");
    assert!(data.iter().all(|&b| b == 0xab));
}

#[test]
fn without_flush_workers_the_write_waits_behind_the_flush() {
    let (order, data) = flush_then_write(0);
    assert_eq!(order, vec![1, 2]);
    assert!(data.iter().all(|&b| b == 0xab));
}
