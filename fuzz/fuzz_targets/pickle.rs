//! Any bytes as a pickle and as a PyTorch checkpoint: see [`props::pickle`].
#![no_main]

mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| props::pickle(data));
