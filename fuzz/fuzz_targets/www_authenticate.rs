//! The `WWW-Authenticate` decoder (`http_client::parse_www_authenticate`), which reads a
//! registry's 401 challenges. Whatever the value, it must return (no panic, no endless loop),
//! with non-empty lower-case schemes and lower-case parameter names, as the registry client
//! compares them.
#![no_main]

use mcow_remote::http_client::parse_www_authenticate;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else { return };
    for c in parse_www_authenticate(value) {
        assert!(!c.scheme.is_empty(), "empty scheme from {value:?}");
        assert_eq!(c.scheme, c.scheme.to_ascii_lowercase());
        for (k, _) in &c.params {
            assert!(!k.is_empty());
            assert_eq!(*k, k.to_ascii_lowercase());
        }
        let _ = c.param("realm");
    }
});
