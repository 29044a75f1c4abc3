//! The trace decoder (`image::Trace::parse`, for the trace blob an image may carry, read again
//! by `mcow serve` before it prefetches). A trace that parses must survive `to_bytes` and parse
//! again to the same value, and its blocks must be usable the way the serve's prefetch uses
//! them: grouped into runs of consecutive blocks, whose ends (`start + count`) cannot overflow.
#![no_main]

use mcow_remote::image::Trace;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(t) = Trace::parse(data) else { return };
    let again = Trace::parse(&t.to_bytes()).expect("an encoded trace parses");
    assert_eq!(again, t, "trace round trip");
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &b in &t.blocks {
        match runs.last_mut() {
            Some((start, n)) if start.checked_add(*n) == Some(b) => *n += 1,
            _ => runs.push((b, 1)),
        }
    }
    for (start, n) in runs {
        assert!(start.checked_add(n).is_some(), "a run of the trace ends past u64: {start}+{n}");
    }
});
