//! The spool reader over arbitrary segment contents (a crash mid-write, disk corruption):
//! it must stop at the first bad entry and say where, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (entries, corruption) = phi_chain::spool::decode_entries(data, 8);
    if let Some(c) = corruption {
        assert!(c.offset >= 8 && c.offset - 8 <= data.len() as u64);
        assert_eq!(c.offset - 8 + c.bytes, data.len() as u64);
    }
    let mut last = 0;
    for (at, _) in entries {
        assert!(at >= last);
        last = at;
    }
});
