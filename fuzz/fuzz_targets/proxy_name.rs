//! The egress proxy's first look at a sandbox's connection (a TLS ClientHello's SNI or an
//! HTTP/1 Host header; sandbox-controlled bytes read by the root server): never a panic, and a
//! name found is lower-case.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(name) = soulbox_net::fuzzing::server_name(data) {
        assert_eq!(name, name.to_ascii_lowercase());
    }
});
