//! MXFP4 groups decoded into f32 for the cast: FP4 E2M1 values computed from their
//! bits (or looked up as bfloat16 bytes with AVX2) times the group's E8M0 scale, a
//! `[16][32]` tile at a time transposed into the output rows.

use super::super::e8m0;
#[cfg(target_arch = "x86_64")]
use super::super::simd::{avx2, transpose8_avx2};
use super::Group;

/// One group's wanted output rows as f32 into `out` (row `c` at `(c − lo) · R`), with
/// AVX2 where the CPU has it; returns the stored row of an E8M0 NaN scale.
pub(super) fn group_f32(gr: &Group, out: &mut [f32]) -> std::result::Result<(), u64> {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 (checked at run time).
        return unsafe { mxfp4_group_avx2(gr, out) };
    }
    mxfp4_group::<false>(gr, out)
}

/// [`mxfp4_group`] compiled for AVX2 (the decode loop vectorizes 8 lanes wide).
///
/// # Safety
///
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn mxfp4_group_avx2(gr: &Group, out: &mut [f32]) -> std::result::Result<(), u64> {
    mxfp4_group::<true>(gr, out)
}

/// Output rows `[lo, hi)` of one group into `out` (row `c` at `(c − lo) · R`): a
/// transpose of the group's `[R, 32]` values. Sixteen stored rows at a time are
/// decoded into a `[16][32]` tile (contiguous, the loop vectorizes), then each output
/// row gets its 16 values as 64 contiguous bytes (with `AVX2`, through 8×8 register
/// transposes). Returns the row of an E8M0 NaN scale.
#[inline(always)]
fn mxfp4_group<const AVX2: bool>(gr: &Group, out: &mut [f32]) -> std::result::Result<(), u64> {
    const RB: usize = 16;
    let rows = gr.scales.len();
    let mut dec = [[0f32; 32]; RB];
    for r0 in (0..rows).step_by(RB) {
        let n = (rows - r0).min(RB);
        for (ro, d) in dec.iter_mut().enumerate().take(n) {
            let rr = r0 + ro;
            let Some(scale) = e8m0(gr.scales[rr]) else {
                return Err(rr as u64);
            };
            let blk = &gr.blocks[rr * 16..rr * 16 + 16];
            #[cfg(target_arch = "x86_64")]
            if AVX2 {
                // SAFETY: as below.
                unsafe { fp4_group_avx2(blk, scale, d) };
                continue;
            }
            fp4_group(blk, scale, d);
        }
        #[cfg(target_arch = "x86_64")]
        if AVX2 && n == RB && gr.hi - gr.lo == 32 {
            // SAFETY: AVX2 is only true in `mxfp4_group_avx2`, whose caller checked
            // the CPU.
            unsafe { transpose_group_avx2(&dec, &mut out[r0..], rows) };
            continue;
        }
        for k in gr.lo as usize..gr.hi as usize {
            let at = (k - gr.lo as usize) * rows + r0;
            for (v, d) in out[at..at + n].iter_mut().zip(&dec) {
                *v = d[k];
            }
        }
    }
    Ok(())
}

/// `out[k · stride + ro] = dec[ro][k]` for the 16 rows and 32 columns of `dec`, in 8×8
/// blocks transposed in registers: each output row gets two adjacent 32-byte stores.
///
/// # Safety
///
/// The CPU must support AVX2. Panics (before any store) when `out` is shorter than
/// `31 · stride + 16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose_group_avx2(dec: &[[f32; 32]; 16], out: &mut [f32], stride: usize) {
    use std::arch::x86_64::*;
    assert!(out.len() >= 31 * stride + 16);
    for rb in 0..2 {
        for kb in 0..4 {
            // SAFETY: loads of 8 f32 at dec[8rb + i][8kb..8kb + 8] (inside the array);
            // stores of 8 f32 at out[(8kb + i) · stride + 8rb..] (inside by the assert).
            unsafe {
                let ld = |i: usize| _mm256_loadu_ps(dec[8 * rb + i].as_ptr().add(8 * kb));
                let rows =
                    transpose8_avx2([ld(0), ld(1), ld(2), ld(3), ld(4), ld(5), ld(6), ld(7)]);
                for (i, v) in rows.into_iter().enumerate() {
                    let p = out.as_mut_ptr().add((8 * kb + i) * stride + 8 * rb);
                    _mm256_storeu_ps(p, v);
                }
            }
        }
    }
}

/// The high bytes of FP4[n] as bfloat16 (0.5 = 0x3F00, 6 = 0x40C0, sign in bit 15).
#[cfg(target_arch = "x86_64")]
pub(super) const FP4_BF16_HI: [u8; 16] = [
    0x00, 0x3F, 0x3F, 0x3F, 0x40, 0x40, 0x40, 0x40, 0x80, 0xBF, 0xBF, 0xBF, 0xC0, 0xC0, 0xC0, 0xC0,
];
/// The low bytes of FP4[n] as bfloat16.
#[cfg(target_arch = "x86_64")]
pub(super) const FP4_BF16_LO: [u8; 16] = [
    0x00, 0x00, 0x80, 0xC0, 0x00, 0x40, 0x80, 0xC0, 0x00, 0x00, 0x80, 0xC0, 0x00, 0x40, 0x80, 0xC0,
];

/// [`fp4_group`] with byte shuffles: each FP4 value is a bfloat16 (two bytes looked up
/// by nibble), widened to f32 and multiplied by the scale in f32.
///
/// # Safety
///
/// The CPU must support AVX2. Panics when `blk` is shorter than 16 bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn fp4_group_avx2(blk: &[u8], scale: f32, out: &mut [f32; 32]) {
    use std::arch::x86_64::*;
    let blk = &blk[..16];
    // SAFETY: 16 bytes are read from `blk` and 32 f32 written to `out`, both in bounds.
    unsafe {
        let b = _mm_loadu_si128(blk.as_ptr().cast());
        let m = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(b, m);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(b), m);
        // The bfloat16 bits of FP4[n]: high bytes, then low bytes.
        let th = _mm_loadu_si128(FP4_BF16_HI.as_ptr().cast());
        let tl = _mm_loadu_si128(FP4_BF16_LO.as_ptr().cast());
        let sc = _mm256_set1_ps(scale);
        // Nibbles in element order: byte i gives elements 2i (low) and 2i + 1 (high).
        for (half, n) in [_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)]
            .into_iter()
            .enumerate()
        {
            let h = _mm_shuffle_epi8(th, n);
            let l = _mm_shuffle_epi8(tl, n);
            for (q, w) in [_mm_unpacklo_epi8(l, h), _mm_unpackhi_epi8(l, h)]
                .into_iter()
                .enumerate()
            {
                let f = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(w)));
                let p = out.as_mut_ptr().add(16 * half + 8 * q);
                _mm256_storeu_ps(p, _mm256_mul_ps(f, sc));
            }
        }
    }
}

/// One group's 16 bytes (low nibble first) times its scale, as 32 f32.
#[inline(always)]
pub(super) fn fp4_group(blk: &[u8], scale: f32, out: &mut [f32; 32]) {
    for (i, &b) in blk.iter().enumerate().take(16) {
        out[2 * i] = fp4(b as u32 & 15) * scale;
        out[2 * i + 1] = fp4(b as u32 >> 4) * scale;
    }
}

/// The FP4 E2M1 value of nibble `n`, computed rather than looked up so that the decode
/// loop vectorizes: exponent field 0 is zero or the subnormal 0.5, others are
/// `2^(e−1) · (1 + m/2)`; bit 3 is the sign.
#[inline(always)]
pub(super) fn fp4(n: u32) -> f32 {
    let (e, m) = ((n >> 1) & 3, n & 1);
    let mag = if e == 0 {
        m * 0x3F00_0000
    } else {
        ((e + 126) << 23) | (m << 22)
    };
    f32::from_bits(mag | ((n & 8) << 28))
}
