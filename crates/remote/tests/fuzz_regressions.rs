//! Inputs the fuzz targets (fuzz/fuzz_targets/) found in this crate's HTTP header decoders,
//! kept as tests here rather than in `http_client.rs`'s own tests so that module stays small to
//! merge. No server is involved: the decoders take header values.

use mcow_remote::RemoteError;
use mcow_remote::http_client::parse_content_range;

/// Tried: the `Content-Range` the content_range target found, whose END is u64::MAX, so the
/// part's length `END + 1 - START` that the multi-range reader computes overflowed (a panic in
/// debug builds, a wrong length in release ones). Must hold: a clean `Invalid` error for it and
/// for `bytes 0-18446744073709551615/*`, while the largest usable END still parses.
#[test]
fn content_range_ending_at_u64_max_is_refused() {
    for bad in ["bytes 40964-0000018446744073709551615/", "bytes 0-18446744073709551615/*"] {
        assert!(matches!(parse_content_range("GET", "u", bad), Err(RemoteError::Invalid(_))), "{bad}");
    }
    assert_eq!(parse_content_range("GET", "u", "bytes 7-18446744073709551614/*").unwrap(), (7, u64::MAX - 1));
    assert_eq!(parse_content_range("GET", "u", "bytes 0-65535/1048576").unwrap(), (0, 65535));
}
