//! The image config decoder (`image::DiskConfig::parse`, checked against the manifest that
//! named it). To get past the agreement check, the manifest is built from the config's own
//! layer list (and its trace) when the bytes deserialize at all; an empty manifest is tried as well. A config
//! that parses must have a valid block and virtual size, agree with the manifest, and survive
//! `to_bytes` and parse again to the same value.
#![no_main]

use mcow_format::{Digest, check_block_size, check_virtual_size};
use mcow_remote::image::{
    CONFIG_MEDIA_TYPE, Descriptor, DiskConfig, LAYER_MEDIA_TYPE, Manifest, TRACE_MEDIA_TYPE,
};

fn descriptor(media_type: &str, digest: Digest, size: u64) -> Descriptor {
    Descriptor { media_type: media_type.into(), digest, size, annotations: Default::default() }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let config = descriptor(CONFIG_MEDIA_TYPE, Digest::of(data), data.len() as u64);
    let empty = Manifest::new(config.clone(), Vec::new(), None);
    let _ = DiskConfig::parse(data, &empty);
    let Ok(raw) = serde_json::from_slice::<DiskConfig>(data) else { return };
    let layers = raw.layers.iter().map(|r| descriptor(LAYER_MEDIA_TYPE, r.digest, r.size)).collect();
    // The manifest lists the config's trace too, as a push writes it.
    let manifest = Manifest::new(config, layers, raw.trace.clone());
    match DiskConfig::parse(data, &manifest) {
        Ok(c) => {
            assert_eq!(c, raw);
            assert!(check_block_size(c.block_size).is_ok() && check_virtual_size(c.virtual_size).is_ok());
            let again = DiskConfig::parse(&c.to_bytes(), &manifest).expect("an encoded config parses");
            assert_eq!(again, c, "config round trip");
        }
        Err(_) => {
            let foreign_trace = raw.trace.as_ref().is_some_and(|t| t.media_type != TRACE_MEDIA_TYPE);
            assert!(
                check_block_size(raw.block_size).is_err()
                    || check_virtual_size(raw.virtual_size).is_err()
                    || foreign_trace
            );
        }
    }
});
