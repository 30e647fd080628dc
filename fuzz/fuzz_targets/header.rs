//! Any bytes as a safetensors file: see [`props::header`].
#![no_main]

mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| props::header(data));
