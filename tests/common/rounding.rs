//! Round to nearest, ties to even, of an f64 to f16 or bf16, found the slow way: the two
//! representable neighbours by a binary search over bit patterns, then `v` against their
//! midpoint, which is exact in f64. Independent of any conversion routine (`half`'s
//! `from_f64` rounds some values wrongly: about 1 in 20,000 to bf16 and 1 in 150,000
//! to f16 of random values, found by the `roundtrip` fuzz target).
//! Shared by `tests/common` and `fuzz/fuzz_targets/props.rs`.

/// The value of the non-negative pattern `p` (finite) in f16 or bf16, computed from its
/// fields.
fn value(p: u16, bf16: bool) -> f64 {
    let (man_bits, bias) = if bf16 { (7, 127) } else { (10, 15) };
    let exp = (p >> man_bits) as i32;
    let man = (p & ((1 << man_bits) - 1)) as f64;
    if exp == 0 {
        man * 2f64.powi(1 - bias - man_bits)
    } else {
        (man + (1u32 << man_bits) as f64) * 2f64.powi(exp - bias - man_bits)
    }
}

/// `v` rounded to nearest, ties to even, as f16 (`bf16 = false`) or bf16 bits. NaN
/// gives a quiet NaN of the same sign.
pub fn round_f64(v: f64, bf16: bool) -> u16 {
    let inf: u16 = if bf16 { 0x7f80 } else { 0x7c00 };
    let sign = if v.is_sign_negative() { 0x8000 } else { 0 };
    if v.is_nan() {
        return sign | inf | (inf >> 1 & !inf);
    }
    let a = v.abs();
    let max = value(inf - 1, bf16);
    if a >= max {
        // Past the largest finite value, the next step would be 2^16 (f16) or 2^128
        // (bf16): from its midpoint on (ties included, that step being even), infinity.
        let step = max - value(inf - 2, bf16);
        return sign | if a < max + step / 2.0 { inf - 1 } else { inf };
    }
    // The largest pattern whose value is at most `a`.
    let (mut lo, mut hi) = (0u16, inf - 1);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if value(mid, bf16) <= a {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let below = value(lo, bf16);
    if below == a {
        return sign | lo;
    }
    let half_way = (below + value(lo + 1, bf16)) / 2.0;
    let p = if a < half_way {
        lo
    } else if a > half_way || lo & 1 == 1 {
        lo + 1
    } else {
        lo
    };
    sign | p
}
