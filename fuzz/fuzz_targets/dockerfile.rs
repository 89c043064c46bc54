//! The Dockerfile subset parser (template builds take user Dockerfiles): never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = soulbox_templates::dockerfile::parse(text);
    }
});
