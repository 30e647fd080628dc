//! A small valid checkpoint made from the input, converted and read back: see
//! [`props::roundtrip`].
#![no_main]

mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| props::roundtrip(data));
