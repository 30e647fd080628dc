//! Any bytes as weights.parquet: see [`props::weights`].
#![no_main]

mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| props::weights(data));
