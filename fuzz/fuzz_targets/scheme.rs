//! Any config.json + safetensors file as a pre-quantized checkpoint: see
//! [`props::scheme`].
#![no_main]

mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| props::scheme(data));
