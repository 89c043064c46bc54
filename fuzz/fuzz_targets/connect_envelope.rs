//! The Connect envelope decoder (every streaming request body of the gateway and the agent):
//! arbitrary bytes, pushed in arbitrary chunks, never panic and never yield a payload over the
//! limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use soulbox_wire::connect::EnvelopeDecoder;

const LIMIT: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let mut decoder = EnvelopeDecoder::new(LIMIT);
    for chunk in rest.chunks(usize::from(split).max(1)) {
        decoder.push(chunk);
        loop {
            match decoder.next_envelope() {
                Ok(Some(e)) => assert!(e.payload.len() <= LIMIT),
                Ok(None) | Err(_) => break,
            }
        }
    }
    let _ = decoder.finish();
});
