//! envd request messages in both codecs (JSON from every SDK, protobuf): never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use soulbox_wire::connect::Codec;
use soulbox_wire::envd::{filesystem, process};

fuzz_target!(|data: &[u8]| {
    for codec in [Codec::Json, Codec::Proto] {
        let _ = codec.decode::<process::StartRequest>(data);
        let _ = codec.decode::<process::SendInputRequest>(data);
        let _ = codec.decode::<filesystem::ListDirRequest>(data);
        let _ = codec.decode::<filesystem::WatchDirRequest>(data);
    }
});
