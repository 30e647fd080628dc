//! Packed integer codes, shared by the GPTQ, AWQ and compressed-tensors kernels:
//! little-endian u32 words, the reader of a dense bitstream of `bits`-bit values, and
//! the AVX2 row of 4-bit codes in input order.

/// Little-endian u32 words.
pub(super) fn words(b: &[u8]) -> impl Iterator<Item = u32> + '_ {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

/// Value `i` of `bits` bits of a dense little-endian bitstream of u32 `words` (values
/// may straddle two words).
#[inline]
pub(super) fn bitstream(w: &[u32], i: u64, bits: u32) -> u32 {
    bits_at(|k| w.get(k).copied().unwrap_or(0), i, bits)
}

/// Value `i` of a little-endian bitstream of `bits`-bit values whose word `k` is
/// `word(k)`.
#[inline(always)]
pub(super) fn bits_at(word: impl Fn(usize) -> u32, i: u64, bits: u32) -> u32 {
    let p = i * bits as u64;
    let (k, off) = ((p / 32) as usize, (p % 32) as u32);
    let lo = word(k) >> off;
    let v = if off + bits > 32 {
        lo | (word(k + 1) << (32 - off))
    } else {
        lo
    };
    v & ((1u32 << bits) - 1)
}

/// One output row of 4-bit codes in input order (GPTQ's, compressed-tensors'; group
/// `group`, a multiple of 8):
/// `out[8k + j] = (nibble j of w[k] − z) × s` in f32, with the group's `s` and `z`, eight
/// values per word with AVX2 (the scalar loop's arithmetic, the same two roundings).
///
/// # Safety
///
/// The CPU must support AVX2. Panics (before any store) when `out` is shorter than
/// `8 · w.len()` or the groups do not cover the row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn int4_row_avx2(w: &[u32], out: &mut [f32], s: &[f32], z: &[f32], group: usize) {
    use std::arch::x86_64::*;
    let per = group / 8;
    assert!(per > 0 && out.len() >= w.len() * 8 && s.len().min(z.len()) * per >= w.len());
    // SAFETY: stores of 8 f32 at out[8k..8k + 8] for k < w.len() (inside by the assert).
    unsafe {
        let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        let mask = _mm256_set1_epi32(15);
        for (gk, ws) in w.chunks(per).enumerate() {
            let (sv, zv) = (_mm256_set1_ps(s[gk]), _mm256_set1_ps(z[gk]));
            for (j, &word) in ws.iter().enumerate() {
                let q = _mm256_and_si256(
                    _mm256_srlv_epi32(_mm256_set1_epi32(word as i32), shifts),
                    mask,
                );
                let v = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(q), zv), sv);
                _mm256_storeu_ps(out.as_mut_ptr().add((gk * per + j) * 8), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "x86_64")]
    use half::f16;

    use super::*;
    #[cfg(target_arch = "x86_64")]
    use crate::cast::dequant::simd::avx2;

    /// The AVX2 4-bit row against the formula, scalar, with groups of 8, 128 and
    /// a last group cut short, zero points on both sides of the codes.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn int4_row_avx2_equals_the_formula() {
        if !avx2() {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for (words, group) in [(16usize, 8usize), (40, 128), (3, 128), (24, 64)] {
            let w: Vec<u32> = (0..words).map(|_| next() as u32).collect();
            let groups = (words * 8).div_ceil(group);
            let s: Vec<f32> = (0..groups)
                .map(|_| f16::from_bits((next() % 0x7800) as u16).to_f32())
                .collect();
            let z: Vec<f32> = (0..groups).map(|_| (next() % 17) as f32).collect();
            let mut out = vec![f32::NAN; words * 8];
            // SAFETY: AVX2 is present (checked above).
            unsafe { int4_row_avx2(&w, &mut out, &s, &z, group) };
            for (i, v) in out.iter().enumerate() {
                let q = (w[i / 8] >> (4 * (i % 8))) & 15;
                let want = (q as f32 - z[i / group]) * s[i / group];
                assert_eq!(
                    v.to_bits(),
                    want.to_bits(),
                    "{words} words, group {group}, value {i}"
                );
            }
        }
    }

    #[test]
    fn bitstream_reads_across_words() {
        // 3-bit values 0..=7 repeated, packed densely.
        let vals: Vec<u32> = (0..64).map(|i| i % 8).collect();
        let mut w = vec![0u32; 6];
        for (i, v) in vals.iter().enumerate() {
            let p = i * 3;
            w[p / 32] |= v << (p % 32);
            if p % 32 + 3 > 32 {
                w[p / 32 + 1] |= v >> (32 - p % 32);
            }
        }
        for (i, v) in vals.iter().enumerate() {
            assert_eq!(bitstream(&w, i as u64, 3), *v, "{i}");
        }
    }
}
