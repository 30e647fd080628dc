//! Any bytes as a safetensors file: never a panic, and an accepted header describes
//! tensors that are sorted, in bounds, sized by their shape and cover the data exactly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelconv::internals::{check_prefix, parse_header};
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let p = Path::new("fuzz.safetensors");
    let len = data.len() as u64;
    let prefix = data.get(..8).and_then(|b| b.try_into().ok());
    let Ok(n) = check_prefix(p, prefix, len, 1 << 20) else { return };
    let Some(header) = data.get(8..8 + n as usize) else { panic!("prefix accepted past the end") };
    if let Ok(h) = parse_header(p, header, len) {
        let mut at = 8 + n;
        for t in &h.tensors {
            assert_eq!(t.offset, at, "tensors cover the data in order");
            assert_eq!(t.len, t.numel * t.dtype.size() as u64);
            assert_eq!(t.numel, t.shape.iter().product::<u64>());
            at += t.len;
        }
        assert_eq!(at, len, "the last tensor ends at the end of the file");
    }
});
