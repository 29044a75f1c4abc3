//! The `Content-Range` decoder (`http_client::parse_content_range`), which reads a web server's
//! or registry's answer to range requests, for one part or for each part of a multipart answer.
//! A range it accepts must be one the callers can use as is: START <= END, and END + 1 - START
//! (the part's length, as the callers compute it) must not overflow.
#![no_main]

use mcow_remote::http_client::parse_content_range;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else { return };
    if let Ok((start, end)) = parse_content_range("GET", "http://127.0.0.1/blob", value) {
        assert!(start <= end, "{value:?} gave {start}..={end}");
        let len = end.checked_add(1).map(|e| e - start);
        assert!(len.is_some(), "{value:?} gave a part whose length overflows: {start}..={end}");
    }
});
