//! Hostile and broken clients written with raw sockets. After each, a well-behaved
//! client (nbdinfo and qemu-io) must still be served by the same server.

mod support;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use mcow_nbd::proto::{
    self, ClientOption, Command, InfoRequest, MetaContextQuery, NBD_CMD_FLAG_DF, NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_FLAG_REQ_ONE, NBD_EINVAL, NBD_EIO, NBD_ENOSPC, NBD_ENOTSUP, NBD_EPERM, NBD_REP_ACK,
    NBD_REP_ERR_INVALID, NBD_REP_ERR_TOO_BIG, NBD_REP_ERR_UNKNOWN, NBD_REP_ERR_UNSUP, NBD_REP_INFO,
    NBD_REP_META_CONTEXT, NBD_REPLY_TYPE_BLOCK_STATUS, NBD_REPLY_TYPE_ERROR, NBD_REPLY_TYPE_OFFSET_DATA,
    NBD_REPLY_TYPE_OFFSET_HOLE, OptionHeader,
};
use mcow_nbd::{MemExport, ServerConfig};
use support::{EXTRA_CONTEXT, Raw, TestServer, assert_healthy, ex, run_ok, standard_exports, tool};

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

#[test]
fn bad_option_magic_closes_only_that_connection() {
    let server = TestServer::start(standard_exports());
    let mut r = Raw::connect_fixed(&server);
    r.send(b"NOTMAGIC\0\0\0\x07\0\0\0\0");
    r.expect_closed();
    assert_healthy(&server);
}

#[test]
fn garbage_instead_of_client_flags_closes_the_connection() {
    let server = TestServer::start(standard_exports());
    let mut r = Raw::connect(&server);
    r.send(&[0xff; 4]);
    r.expect_closed();
    // HTTP to an NBD port.
    let mut r = Raw::connect(&server);
    r.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    r.expect_closed();
    assert_healthy(&server);
}

#[test]
fn unknown_options_and_starttls_are_refused_politely() {
    let server = TestServer::start(standard_exports());
    let mut r = Raw::connect_fixed(&server);
    for code in [0u32, 4, 11, 12, 0x7fff_ffff, 0xffff_ffff] {
        r.option(&ClientOption::Unknown(code));
        let (h, _) = r.option_reply();
        assert_eq!((h.option, h.reply_type), (code, NBD_REP_ERR_UNSUP));
    }
    r.option(&ClientOption::StartTls);
    let (h, msg) = r.option_reply();
    assert_eq!(h.reply_type, NBD_REP_ERR_UNSUP);
    assert!(String::from_utf8_lossy(&msg).contains("TLS"));
    // Malformed known option: INVALID, and the session goes on.
    r.send(&OptionHeader { option: proto::NBD_OPT_GO, length: 3 }.encode());
    r.send(&[0, 0, 0]);
    assert_eq!(r.option_reply().0.reply_type, NBD_REP_ERR_INVALID);
    r.send(&OptionHeader { option: proto::NBD_OPT_LIST, length: 1 }.encode());
    r.send(&[0]);
    assert_eq!(r.option_reply().0.reply_type, NBD_REP_ERR_INVALID);
    // Meta contexts before structured replies: INVALID.
    r.option(&ClientOption::ListMetaContext(MetaContextQuery::default()));
    assert_eq!(r.option_reply().0.reply_type, NBD_REP_ERR_INVALID);
    // Unknown export: UNKNOWN for INFO and GO; the session still goes on.
    r.option(&ClientOption::Info(InfoRequest { name: "nope".into(), requests: vec![] }));
    assert_eq!(r.option_reply().0.reply_type, NBD_REP_ERR_UNKNOWN);
    r.option(&ClientOption::Go(InfoRequest { name: "nope".into(), requests: vec![] }));
    assert_eq!(r.option_reply().0.reply_type, NBD_REP_ERR_UNKNOWN);
    // Then a real GO works on the same connection.
    r.option(&ClientOption::Go(InfoRequest { name: "mem".into(), requests: vec![1, 2] }));
    let replies = r.option_replies();
    assert_eq!(replies.last().unwrap().0.reply_type, NBD_REP_ACK);
    assert!(
        replies.iter().any(|(h, d)| h.reply_type == NBD_REP_INFO && d[..2] == [0, 1] && &d[2..] == b"mem")
    );
    r.request(Command::Read, 0, 1, 0, 512);
    assert_eq!(r.simple_reply().error, 0);
    assert_eq!(r.read_vec(512), vec![0; 512]);
    assert_healthy(&server);
}

#[test]
fn abort_is_acknowledged_and_export_name_of_unknown_export_closes() {
    let server = TestServer::start(standard_exports());
    let mut r = Raw::connect_fixed(&server);
    r.option(&ClientOption::Abort);
    assert_eq!(r.option_reply().0.reply_type, NBD_REP_ACK);
    r.expect_closed();
    let mut r = Raw::connect_fixed(&server);
    r.option(&ClientOption::ExportName("missing".into()));
    r.expect_closed();
    // The old-style option on a real export: size + flags, no padding (NO_ZEROES).
    let mut r = Raw::connect_fixed(&server);
    r.option(&ClientOption::ExportName("ro".into()));
    let reply = r.read_vec(10);
    assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), 1 << 20);
    let flags = u16::from_be_bytes([reply[8], reply[9]]);
    assert_ne!(flags & proto::NBD_FLAG_READ_ONLY, 0);
    r.request(Command::Read, 0, 9, 0, 4);
    assert_eq!(r.simple_reply().error, 0);
    assert_eq!(r.read_vec(4), vec![0x5a; 4]);
    assert_healthy(&server);
}

#[test]
fn oversized_options_are_skipped_or_cut() {
    let server = TestServer::start(standard_exports());
    let mut r = Raw::connect_fixed(&server);
    // 1 MiB of option data: skipped and answered TOO_BIG; the session continues.
    r.send(&OptionHeader { option: proto::NBD_OPT_INFO, length: 1 << 20 }.encode());
    r.send(&vec![0x41; 1 << 20]);
    assert_eq!(r.option_reply().0.reply_type, NBD_REP_ERR_TOO_BIG);
    r.option(&ClientOption::List);
    let replies = r.option_replies();
    assert_eq!(replies.len(), 3, "two exports and an ACK");
    // A 4 GiB option the client never sends: the connection is dropped when it leaves.
    r.send(&OptionHeader { option: proto::NBD_OPT_GO, length: u32::MAX }.encode());
    r.send(&[0; 100]);
    drop(r);
    // A huge export name cannot be refused politely: the server closes.
    let mut r = Raw::connect_fixed(&server);
    r.send(&OptionHeader { option: proto::NBD_OPT_EXPORT_NAME, length: 1 << 20 }.encode());
    r.expect_closed();
    assert_healthy(&server);
}

#[test]
fn slow_handshake_is_cut_by_the_timeout() {
    let config = ServerConfig { handshake_timeout: Duration::from_millis(300), ..ServerConfig::default() };
    let server = TestServer::start_with(config, standard_exports());
    let mut r = Raw::connect_fixed(&server);
    let started = Instant::now();
    r.expect_closed();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_healthy(&server);
}

#[test]
fn meta_context_listing_and_selection() {
    let server = TestServer::start(standard_exports());
    let mut r = Raw::connect_fixed(&server);
    r.option(&ClientOption::StructuredReply);
    assert_eq!(r.option_reply().0.reply_type, NBD_REP_ACK);
    let names = |replies: Vec<(proto::OptionReplyHeader, Vec<u8>)>| -> Vec<(u32, String)> {
        assert_eq!(replies.last().unwrap().0.reply_type, NBD_REP_ACK);
        replies
            .iter()
            .filter(|(h, _)| h.reply_type == NBD_REP_META_CONTEXT)
            .map(|(_, d)| (be32(d), String::from_utf8(d[4..].to_vec()).unwrap()))
            .collect()
    };
    let q = |queries: &[&str]| MetaContextQuery {
        export: "mem".into(),
        queries: queries.iter().map(|s| s.to_string()).collect(),
    };
    r.option(&ClientOption::ListMetaContext(q(&[])));
    assert_eq!(names(r.option_replies()), [(0, "base:allocation".into()), (0, EXTRA_CONTEXT.into())]);
    r.option(&ClientOption::ListMetaContext(q(&["mcow:"])));
    assert_eq!(names(r.option_replies()), [(0, EXTRA_CONTEXT.into())]);
    r.option(&ClientOption::ListMetaContext(q(&["base:"])));
    assert_eq!(names(r.option_replies()), [(0, "base:allocation".into())]);
    r.option(&ClientOption::ListMetaContext(q(&["qemu:dirty-bitmap:x", "nonsense"])));
    assert_eq!(names(r.option_replies()), []);
    r.option(&ClientOption::SetMetaContext(q(&[EXTRA_CONTEXT, "base:allocation", "base:allocation"])));
    assert_eq!(names(r.option_replies()), [(1, "base:allocation".into()), (2, EXTRA_CONTEXT.into())]);
    r.option(&ClientOption::SetMetaContext(MetaContextQuery { export: "nope".into(), queries: vec![] }));
    assert_eq!(r.option_reply().0.reply_type, NBD_REP_ERR_UNKNOWN);
}

#[test]
fn unknown_command_bad_flags_and_out_of_range_requests_get_errors() {
    let server = TestServer::start(standard_exports());
    let mut r = Raw::go(&server, "mem", false, &[]);
    let size = 64u64 << 20;
    r.request(Command::Unknown(42), 0, 1, 0, 0);
    assert_eq!(r.simple_reply().error, NBD_EINVAL);
    r.request(Command::Read, 1 << 12, 2, 0, 512);
    assert_eq!(r.simple_reply().error, NBD_EINVAL);
    r.request(Command::Read, 0, 3, size - 100, 512);
    assert_eq!(r.simple_reply().error, NBD_EINVAL);
    r.request(Command::Read, 0, 4, u64::MAX - 10, 512);
    assert_eq!(r.simple_reply().error, NBD_EINVAL);
    // Write past the end: ENOSPC, and its payload is consumed so the stream stays in step.
    r.request(Command::Write, 0, 5, size - 100, 512);
    r.send(&[0xee; 512]);
    assert_eq!(r.simple_reply().error, NBD_ENOSPC);
    r.request(Command::WriteZeroes, 0, 6, size, 1);
    assert_eq!(r.simple_reply().error, NBD_ENOSPC);
    // Block status without structured replies / contexts.
    r.request(Command::BlockStatus, 0, 7, 0, 512);
    assert_eq!(r.simple_reply().error, NBD_EINVAL);
    // Still in step: a normal read right after.
    r.request(Command::Read, 0, 8, size - 512, 512);
    let rep = r.simple_reply();
    assert_eq!((rep.error, rep.handle), (0, 8));
    assert_eq!(r.read_vec(512), vec![0; 512]);
    assert_healthy(&server);
}

#[test]
fn oversized_read_and_write_are_refused_and_the_write_payload_skipped() {
    let server = TestServer::start(standard_exports());
    let mut r = Raw::go(&server, "mem", true, &[]);
    let big = (32 << 20) + 1;
    r.request(Command::Read, 0, 1, 0, big);
    let chunks = r.any_reply();
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].0.kind, NBD_REPLY_TYPE_ERROR);
    assert_eq!(be32(&chunks[0].1), NBD_EINVAL);
    r.request(Command::Write, 0, 2, 0, big);
    r.send(&vec![0x77; big as usize]);
    let chunks = r.any_reply();
    assert_eq!(chunks[0].0.kind, NBD_REPLY_TYPE_ERROR);
    assert_eq!(be32(&chunks[0].1), NBD_EINVAL);
    assert!(server.export("mem").to_vec()[..4096].iter().all(|&b| b == 0), "refused write must not land");
    // The stream is still in step.
    r.request(Command::Write, 0, 3, 0, 4);
    r.send(b"abcd");
    let chunks = r.any_reply();
    assert_eq!(chunks[0].0.handle, 3);
    assert_eq!(chunks[0].1, 0u32.to_be_bytes(), "write succeeded (simple reply, error 0)");
    r.request(Command::Read, NBD_CMD_FLAG_DF, 4, 0, 4);
    let chunks = r.any_reply();
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].0.kind, NBD_REPLY_TYPE_OFFSET_DATA);
    assert_eq!(&chunks[0].1[8..], b"abcd");
    assert_healthy(&server);
}

#[test]
fn writes_to_a_read_only_export_are_eperm() {
    let server = TestServer::start(standard_exports());
    let mut r = Raw::go(&server, "ro", false, &[]);
    r.request(Command::Write, 0, 1, 0, 8);
    r.send(&[0; 8]);
    assert_eq!(r.simple_reply().error, NBD_EPERM);
    r.request(Command::Trim, 0, 2, 0, 4096);
    assert_eq!(r.simple_reply().error, NBD_EPERM);
    r.request(Command::WriteZeroes, 0, 3, 0, 4096);
    assert_eq!(r.simple_reply().error, NBD_EPERM);
    r.request(Command::Flush, 0, 4, 0, 0);
    assert_eq!(r.simple_reply().error, 0);
    assert!(server.export("ro").to_vec().iter().all(|&b| b == 0x5a));

    // libnbd with its client-side checks off sends the write; the server refuses it.
    let script = format!(
        "h.set_strict_mode(0)\nh.connect_uri({:?})\ntry:\n    h.pwrite(b'x' * 512, 0)\n    print('WROTE')\nexcept nbd.Error as e:\n    print('ERRNO', e.errno)\n",
        server.unix_uri("ro")
    );
    let out = run_ok(tool("nbdsh").args(["-c", &script]));
    assert!(out.contains("ERRNO EPERM") || out.contains("ERRNO 1"), "expected EPERM from the server: {out}");
    assert_healthy(&server);
}

#[test]
fn structured_replies_carry_errors_holes_and_block_status() {
    let export =
        MemExport::new(4 << 20).with_extra_context(EXTRA_CONTEXT).with_failing_range(3 << 20..(3 << 20) + 10);
    let server = TestServer::start(vec![
        ex("f", "", export),
        ex("slowzero", "", MemExport::new(1 << 20).with_fast_zero(false)),
    ]);
    let mut r = Raw::go(&server, "f", true, &["base:allocation", EXTRA_CONTEXT]);
    // An export I/O error becomes an EIO error chunk with a message.
    r.request(Command::Read, 0, 1, 3 << 20, 4096);
    let chunks = r.any_reply();
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].0.kind, NBD_REPLY_TYPE_ERROR);
    assert_eq!(be32(&chunks[0].1), NBD_EIO);
    assert!(String::from_utf8_lossy(&chunks[0].1[6..]).contains("injected"));
    // Reading a hole: one OFFSET_HOLE chunk.
    r.request(Command::Read, 0, 2, 0, 65536);
    let chunks = r.any_reply();
    assert_eq!(chunks[0].0.kind, NBD_REPLY_TYPE_OFFSET_HOLE);
    assert_eq!(chunks[0].1, [0u64.to_be_bytes().as_slice(), &65536u32.to_be_bytes()].concat());
    // Write some data, then block status sees one chunk per context, the last one DONE.
    r.request(Command::Write, 0, 3, 1 << 20, 8);
    r.send(b"12345678");
    assert_eq!(r.any_reply()[0].1, 0u32.to_be_bytes());
    r.request(Command::BlockStatus, 0, 4, 0, 2 << 20);
    let chunks = r.any_reply();
    assert_eq!(chunks.len(), 2);
    assert!(chunks.iter().all(|(h, _)| h.kind == NBD_REPLY_TYPE_BLOCK_STATUS));
    assert_eq!(chunks[0].0.flags & 1, 0);
    assert_eq!(chunks[1].0.flags & 1, 1);
    let decode = |d: &[u8]| -> (u32, Vec<(u32, u32)>) {
        (be32(d), d[4..].chunks(8).map(|c| (be32(c), be32(&c[4..]))).collect())
    };
    let (id, ext) = decode(&chunks[0].1);
    assert_eq!(id, 1);
    assert_eq!(ext, [(1 << 20, 3), (65536, 0), ((1 << 20) - 65536, 3)]);
    let (id, ext) = decode(&chunks[1].1);
    assert_eq!(id, 2);
    assert_eq!(ext, [(1 << 20, 0), (65536, 1), ((1 << 20) - 65536, 0)]);
    // REQ_ONE: a single descriptor per context.
    r.request(Command::BlockStatus, NBD_CMD_FLAG_REQ_ONE, 5, 0, 2 << 20);
    let chunks = r.any_reply();
    assert!(chunks.iter().all(|(_, d)| d.len() == 12));
    // Block status past the end.
    r.request(Command::BlockStatus, 0, 6, 4 << 20, 1);
    assert_eq!(be32(&r.any_reply()[0].1), NBD_EINVAL);
    drop(r);
    // FAST_ZERO on an export that cannot zero fast: ENOTSUP; plain zeroing works.
    let mut r = Raw::go(&server, "slowzero", false, &[]);
    r.request(Command::WriteZeroes, NBD_CMD_FLAG_FAST_ZERO, 7, 0, 4096);
    assert_eq!(r.simple_reply().error, NBD_ENOTSUP);
    r.request(Command::WriteZeroes, 0, 8, 0, 4096);
    assert_eq!(r.simple_reply().error, 0);
    assert_healthy(&server);
}

#[test]
fn pipelined_requests_are_all_answered_with_their_handles() {
    let server = TestServer::start(standard_exports());
    let mut r = Raw::go(&server, "mem", false, &[]);
    let mut batch = Vec::new();
    for i in 0..64u64 {
        batch.extend_from_slice(
            &proto::Request { flags: 0, command: Command::Write, handle: i, offset: i * 4096, length: 4096 }
                .encode(),
        );
        batch.extend_from_slice(&[i as u8; 4096]);
    }
    r.send(&batch);
    let mut seen: Vec<u64> = (0..64)
        .map(|_| r.simple_reply())
        .map(|s| {
            assert_eq!(s.error, 0);
            s.handle
        })
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..64).collect::<Vec<_>>());
    let disk = server.export("mem").to_vec();
    for i in 0..64usize {
        assert!(disk[i * 4096..(i + 1) * 4096].iter().all(|&b| b == i as u8));
    }
}

#[test]
fn bad_request_magic_and_disconnects_mid_request() {
    let server = TestServer::start(standard_exports());
    let mut r = Raw::go(&server, "mem", false, &[]);
    r.send(&[0xde; 28]);
    r.expect_closed();
    // Half a header, then gone.
    let mut r = Raw::go(&server, "mem", true, &[]);
    r.send(
        &proto::Request { flags: 0, command: Command::Read, handle: 1, offset: 0, length: 512 }.encode()
            [..13],
    );
    drop(r);
    // A write header and part of its payload, then gone: nothing is written.
    let mut r = Raw::go(&server, "mem", false, &[]);
    r.request(Command::Write, 0, 1, 0, 65536);
    r.send(&[0x99; 1000]);
    drop(r);
    // Gone in the middle of negotiation.
    let mut r = Raw::connect_fixed(&server);
    r.send(&OptionHeader { option: proto::NBD_OPT_GO, length: 100 }.encode()[..9]);
    drop(r);
    // A clean disconnect.
    let mut r = Raw::go(&server, "mem", false, &[]);
    r.request(Command::Disc, 0, 2, 0, 0);
    r.expect_closed();
    std::thread::sleep(Duration::from_millis(50));
    assert!(server.export("mem").to_vec()[..65536].iter().all(|&b| b == 0), "partial write must not land");
    assert_healthy(&server);
}

#[test]
fn a_client_that_never_reads_replies_does_not_block_others() {
    let config = ServerConfig { write_timeout: Some(Duration::from_secs(1)), ..ServerConfig::default() };
    let server = TestServer::start_with(config, standard_exports());
    let mut r = Raw::go(&server, "mem", false, &[]);
    // Fill the disk with data so reads are not holes, then ask for far more replies
    // than the socket buffers hold, never reading any of them.
    run_ok(tool("qemu-io").args(["-f", "raw", "-c", "write -P 9 0 1M"]).arg(server.unix_uri("mem")));
    let mut batch = Vec::new();
    for i in 0..64u64 {
        batch.extend_from_slice(
            &proto::Request { flags: 0, command: Command::Read, handle: i, offset: 0, length: 1 << 20 }
                .encode(),
        );
    }
    r.s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    let _ = r.s.write_all(&batch);
    // Meanwhile everyone else is served.
    assert_healthy(&server);
    let out = run_ok(
        tool("qemu-io")
            .args(["-f", "raw", "-c", "write -P 3 32M 1M", "-c", "read -P 3 32M 1M"])
            .arg(server.unix_uri("mem")),
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // The stuck connection is dropped once a write made no progress for the timeout
    // (a call that made partial progress returns first, so allow two timeouts).
    let started = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    std::thread::sleep(Duration::from_secs(3));
    let mut total = 0usize;
    loop {
        match r.s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("unexpected error {e} after {total} bytes"),
        }
        assert!(started.elapsed() < Duration::from_secs(20), "connection was never dropped");
    }
    assert!(total < 64 << 20, "the server gave up before sending every reply");
    assert_healthy(&server);
}

/// Connects on the Unix socket and reads what the server sends first: `Some` with the
/// connection if a greeting came, `None` if the server closed it at once (refused).
fn greeted(server: &TestServer) -> Option<std::os::unix::net::UnixStream> {
    let mut s = std::os::unix::net::UnixStream::connect(&server.socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; proto::GREETING_LEN];
    match s.read_exact(&mut g) {
        Ok(()) => Some(s),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            ) =>
        {
            None
        }
        Err(e) => panic!("neither a greeting nor a close: {e}"),
    }
}

#[test]
fn idle_and_half_open_clients_cannot_lock_out_a_new_client() {
    // Tried: room for 6 connections, at most 2 of them negotiating, and a long handshake
    // timeout (so only admission can help). 3 clients negotiate and stay idle; 2 connect and
    // never send a byte. Must hold: nbdinfo still gets through (the half-open connection
    // negotiating longest is cut for it), the other half-open one is left alone; once all 6
    // places are taken by idle negotiated clients a new connection is closed at once, and
    // when one of them leaves, nbdinfo gets through again.
    let config = ServerConfig {
        max_connections: 6,
        max_handshakes: 2,
        handshake_timeout: Duration::from_secs(60),
        ..ServerConfig::default()
    };
    let server = TestServer::start_with(config, standard_exports());
    let mut idle: Vec<Raw> = (0..3).map(|_| Raw::go(&server, "mem", false, &[])).collect();
    let mut first = greeted(&server).expect("room for a half-open client");
    std::thread::sleep(Duration::from_millis(20));
    let mut second = greeted(&server).expect("room for a second half-open client");
    let size = run_ok(tool("nbdinfo").arg("--size").arg(server.unix_uri("mem")));
    assert_eq!(size.trim(), (64u64 << 20).to_string());
    let mut buf = [0u8; 1];
    assert_eq!(first.read(&mut buf).expect("the cut connection reads EOF"), 0, "oldest half-open was cut");
    second.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let e = second.read(&mut buf).expect_err("the newer half-open connection is still open");
    assert!(matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut), "{e}");
    // 3 idle + 1 half-open: 2 more idle clients fill the server.
    idle.extend((0..2).map(|_| Raw::go(&server, "mem", false, &[])));
    assert!(greeted(&server).is_none(), "a 7th connection must be refused at once");
    // Every idle client is still served.
    for (i, r) in idle.iter_mut().enumerate() {
        r.request(Command::Read, 0, i as u64, 0, 512);
        assert_eq!(r.simple_reply().error, 0);
        assert_eq!(r.read_vec(512), vec![0; 512]);
    }
    drop(idle.pop());
    // The server notices the departure when the connection's thread ends.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = tool("nbdinfo").arg("--size").arg(server.unix_uri("mem")).output().expect("nbdinfo");
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "nbdinfo never got the freed place");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(second);
    assert_healthy(&server);
}

#[test]
fn negotiation_cannot_outlast_the_handshake_timeout() {
    // Tried, with a 400 ms handshake timeout: a client that sends nothing after the greeting,
    // one that trickles the bytes of an option (one every 100 ms, each read well within the
    // timeout), and one that sends options without ever reading the replies until the socket
    // buffers are full. Must hold: each is closed by the server within a few timeouts, and
    // other clients are served meanwhile.
    let config = ServerConfig { handshake_timeout: Duration::from_millis(400), ..ServerConfig::default() };
    let server = TestServer::start_with(config, standard_exports());
    let started = Instant::now();
    let mut silent = Raw::connect_fixed(&server);
    let trickler = std::thread::spawn({
        let mut r = Raw::connect_fixed(&server);
        move || {
            let opt = ClientOption::Info(InfoRequest { name: "x".repeat(100), requests: vec![] }).encode();
            let t = Instant::now();
            for b in opt {
                if r.s.write_all(&[b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            r.expect_closed();
            t.elapsed()
        }
    });
    let flooder = std::thread::spawn({
        let mut r = Raw::connect_fixed(&server);
        move || {
            let t = Instant::now();
            let opt = ClientOption::List.encode();
            r.s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
            // Replies (two exports, an ACK: about 100 bytes each time) pile up unread.
            while r.s.write_all(&opt).is_ok() && t.elapsed() < Duration::from_secs(20) {}
            r.expect_closed();
            t.elapsed()
        }
    });
    assert_healthy(&server);
    silent.expect_closed();
    assert!(started.elapsed() < Duration::from_secs(3), "silent client held {:?}", started.elapsed());
    let t = trickler.join().unwrap();
    assert!(t < Duration::from_secs(3), "trickling client held {t:?}");
    let t = flooder.join().unwrap();
    assert!(t < Duration::from_secs(5), "client not reading replies held {t:?}");
    assert_healthy(&server);
}
