//! Request decoding and checking, extent normalisation and reply encoding.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mcow_nbd::fuzz::request_decoding(data);
});
