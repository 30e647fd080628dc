//! Any bytes as a zip archive: see [`props::zip`].
#![no_main]

mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| props::zip(data));
