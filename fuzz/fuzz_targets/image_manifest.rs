//! The OCI image manifest decoder (`image::Manifest::parse`, what a pull or serve of any
//! reference reads first, from a registry, web server, bucket or directory). A manifest that
//! parses must survive `to_bytes` and parse again to the same value.
#![no_main]

use mcow_remote::image::Manifest;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::parse(data) {
        let again = Manifest::parse(&m.to_bytes()).expect("an encoded manifest parses");
        assert_eq!(again, m, "manifest round trip");
    }
});
