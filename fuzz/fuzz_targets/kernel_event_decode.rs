//! The agent's decoder of ring-buffer items: whatever the bytes (a kernel bug, a mismatched
//! build), it must answer with an error, never panic or read out of bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = agent_common::decode::decode(data);
});
