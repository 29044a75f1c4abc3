//! The disk manifest decoder (`DiskManifest::from_json`, as every disk open reads `disk.json`).
//! A manifest that decodes must survive `to_json` and decode again to the same value.
#![no_main]

use mcow_format::DiskManifest;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(m) = DiskManifest::from_json(data) {
        assert_eq!(DiskManifest::from_json(m.to_json().as_bytes()), Ok(m), "manifest round trip");
    }
});
