//! What the server logs when it returns an export's I/O error to a client: one warn line per
//! error, with its cause, a few lines a second at most, and the count of the rest. The log
//! lines are captured by a subscriber installed for this test binary (its only test, so no
//! other test's lines mix in).

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mcow_nbd::MemExport;
use mcow_nbd::proto::{self, Command, NBD_EIO};
use support::{Raw, TestServer, ex};

/// Every line logged, at warn and above.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn install() -> Captured {
        let c = Captured::default();
        let w = c.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || w.clone())
            .init();
        c
    }
    fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap()).lines().map(str::to_string).collect()
    }
}

/// The number in `suppressed=N` of a line (0 if absent).
fn suppressed(line: &str) -> u64 {
    line.split_once("suppressed=")
        .map_or(0, |(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap())
}

#[test]
fn io_errors_returned_to_clients_are_logged_with_their_cause_and_rate_limited() {
    // Tried: an export whose first MiB fails every read; a client sends 200 reads there in one
    // go (a storm), waits past the one-second window, sends one more, and leaves. Must hold:
    // every reply is EIO; the errors are logged at WARN with the export's message ("injected
    // I/O error") and the request; the storm logs at most 10 lines a second; and the lines
    // plus the counts of suppressed ones they report add up to exactly the 201 errors.
    let log = Captured::install();
    let export = MemExport::new(4 << 20).with_failing_range(0..1 << 20);
    let server = TestServer::start(vec![ex("bad", "failing disk", export)]);
    let mut r = Raw::go(&server, "bad", false, &[]);
    let started = Instant::now();
    let mut batch = Vec::new();
    for i in 0..200u64 {
        let req =
            proto::Request { flags: 0, command: Command::Read, handle: i, offset: i * 4096, length: 4096 };
        batch.extend(req.encode());
    }
    r.send(&batch);
    for _ in 0..200 {
        assert_eq!(r.simple_reply().error, NBD_EIO);
    }
    let storm = started.elapsed();
    std::thread::sleep(Duration::from_millis(1100));
    r.request(Command::Read, 0, 999, 8192, 512);
    assert_eq!(r.simple_reply().error, NBD_EIO);
    r.request(Command::Disc, 0, 1000, 0, 0);
    r.expect_closed();
    // Each error is logged before its reply is sent, so every line is in by now.
    let lines = log.lines();
    let errors: Vec<&String> =
        lines.iter().filter(|l| l.contains("I/O error returned to the NBD client")).collect();
    for l in &errors {
        assert!(l.contains("WARN"), "not at warn: {l}");
        assert!(l.contains("injected I/O error"), "the cause is missing: {l}");
        assert!(l.contains("errno=EIO") && l.contains("command=Read") && l.contains("export=bad"), "{l}");
    }
    let windows = storm.as_secs() + 1;
    assert!(errors.len() >= 2, "the storm and the later error are both logged: {lines:#?}");
    assert!(
        errors.len() as u64 <= 10 * windows + 1,
        "{} lines for 201 errors in {storm:?}: not rate-limited\n{lines:#?}",
        errors.len()
    );
    let summaries: u64 = lines
        .iter()
        .filter(|l| l.contains("more I/O errors were returned to NBD clients than were logged"))
        .map(|l| suppressed(l))
        .sum();
    let reported: u64 = errors.iter().map(|l| 1 + suppressed(l)).sum::<u64>() + summaries;
    assert_eq!(reported, 201, "every error is either logged or counted\n{lines:#?}");
    // The error after the pause is logged and carries the storm's count.
    assert!(suppressed(errors.last().unwrap()) > 0, "{lines:#?}");
}
