//! Casts agree with `half`'s scalar conversions bit for bit, and the counts add up.
#![no_main]

use half::{bf16, f16};
use libfuzzer_sys::fuzz_target;
use modelconv::internals::cast_into;
use modelconv::Dtype;

fuzz_target!(|data: &[u8]| {
    let n = data.len() / 4;
    let src = &data[..n * 4];
    let mut out = vec![0u8; n * 2];
    let st = cast_into(Dtype::F32, Dtype::F16, src, &mut out).expect("lengths match");
    let mut overflow = 0;
    for (i, b) in src.chunks_exact(4).enumerate() {
        let x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let want = f16::from_f32(x);
        let got = f16::from_le_bytes([out[2 * i], out[2 * i + 1]]);
        if x.is_nan() {
            assert!(got.is_nan());
        } else {
            assert_eq!(got.to_bits(), want.to_bits(), "{x}");
        }
        overflow += (x.is_finite() && got.is_infinite()) as u64;
    }
    assert_eq!(st.overflow, overflow);
    // bf16 -> f16 is the f32 path after an exact widening.
    let m = data.len() / 2;
    let mut out = vec![0u8; m * 2];
    cast_into(Dtype::Bf16, Dtype::F16, &data[..m * 2], &mut out).expect("lengths match");
    for (i, b) in data[..m * 2].chunks_exact(2).enumerate() {
        let x = bf16::from_le_bytes([b[0], b[1]]);
        let got = f16::from_le_bytes([out[2 * i], out[2 * i + 1]]);
        if !x.is_nan() {
            assert_eq!(got.to_bits(), f16::from_f32(x.to_f32()).to_bits());
        }
    }
});
