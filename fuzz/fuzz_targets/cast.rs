//! f32 and bf16 casts against `half`: see [`props::cast`].
#![no_main]

mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| props::cast(data));
