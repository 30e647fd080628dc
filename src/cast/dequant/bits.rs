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

/// Nibbles `[p, p + n)` of `src` (the low nibble of each byte first: 4-bit codes in
/// little-endian words, or E2M1 pairs), each through `table`, into `out` (a byte
/// each): carried codes. Sixteen bytes at a time by byte shuffles with AVX2.
pub(super) fn nibble_codes(src: &[u8], mut p: usize, n: usize, table: &[u8; 16], out: &mut [u8]) {
    let end = p + n;
    let out = &mut out[..n];
    let mut o = 0usize;
    #[cfg(target_arch = "x86_64")]
    if super::simd::avx2() {
        if p % 2 == 1 && p < end {
            out[0] = table[(src[p / 2] >> 4) as usize];
            (p, o) = (p + 1, 1);
        }
        // SAFETY: the CPU has AVX2 (checked at run time).
        let done = unsafe { nibble_codes_avx2(&src[p / 2..end / 2], table, &mut out[o..]) };
        (p, o) = (p + 2 * done, o + 2 * done);
    }
    for (i, q) in out[o..].iter_mut().enumerate() {
        let b = src[(p + i) / 2];
        *q = table[(if (p + i).is_multiple_of(2) {
            b & 15
        } else {
            b >> 4
        }) as usize];
    }
}

/// [`nibble_codes`] of whole bytes `src` from a low nibble on, sixteen bytes at a time;
/// returns the bytes done.
///
/// # Safety
///
/// The CPU must support AVX2. Panics (before any store) when `out` is shorter than
/// `2 · src.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn nibble_codes_avx2(src: &[u8], table: &[u8; 16], out: &mut [u8]) -> usize {
    use std::arch::x86_64::*;
    let full = src.len() / 16 * 16;
    assert!(out.len() >= 2 * full);
    // SAFETY: loads of 16 bytes at src[i..], stores of 32 bytes at out[2i..], i + 16
    // <= full.
    unsafe {
        let t = _mm_loadu_si128(table.as_ptr().cast());
        let nib = _mm_set1_epi8(0x0f);
        for i in (0..full).step_by(16) {
            let v = _mm_loadu_si128(src.as_ptr().add(i).cast());
            let lo = _mm_shuffle_epi8(t, _mm_and_si128(v, nib));
            let hi = _mm_shuffle_epi8(t, _mm_and_si128(_mm_srli_epi16::<4>(v), nib));
            let at = out.as_mut_ptr().add(2 * i);
            _mm_storeu_si128(at.cast(), _mm_unpacklo_epi8(lo, hi));
            _mm_storeu_si128(at.add(16).cast(), _mm_unpackhi_epi8(lo, hi));
        }
    }
    full
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
        let mut next = crate::cast::dequant::xorshift(0x2545_F491_4F6C_DD1Du64);
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

    #[test]
    fn nibble_codes_take_the_low_nibble_first_from_any_start() {
        let src: Vec<u8> = (0..80u32).map(|i| (i * 37 + 11) as u8).collect();
        let table: [u8; 16] = std::array::from_fn(|j| (j as u8).wrapping_mul(7) ^ 0x80);
        for p in [0usize, 1, 2, 5, 31, 32, 33] {
            for n in [0usize, 1, 2, 3, 31, 32, 33, 63, 64, 65, 100] {
                let mut out = vec![0u8; n];
                nibble_codes(&src, p, n, &table, &mut out);
                let want: Vec<u8> = (p..p + n)
                    .map(|k| table[((src[k / 2] >> (4 * (k % 2))) & 15) as usize])
                    .collect();
                assert_eq!(out, want, "p {p} n {n}");
            }
        }
    }
}
