//! Option decoding: arbitrary bytes through every option decoder (see `mcow_nbd::fuzz`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mcow_nbd::fuzz::option_decoding(data);
});
