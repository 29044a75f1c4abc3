//! A whole server connection (negotiation and transmission) fed with arbitrary client
//! bytes, against an in-memory export.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = mcow_nbd::fuzz::session(data);
});
