//! MXFP4 groups written straight into f16 or bf16 bits ([`Half`]): sixteen stored rows
//! whose scales keep every value normal in the target by byte lookups and an exponent
//! add (AVX2), other rows multiplied in f32 and rounded to nearest even, with the
//! infinities counted as the cast counts them.

use super::super::e8m0;
#[cfg(target_arch = "x86_64")]
use super::super::simd::avx2;
use super::to_f32::fp4;
#[cfg(target_arch = "x86_64")]
use super::to_f32::{FP4_BF16_HI, FP4_BF16_LO};
use super::Group;
use crate::cast::dequant::half::Half;
use crate::cast::CastStats;

/// The high bytes of FP4[n] as f16 (0.5 = 0x3800, 6 = 0x4600; every low byte is 0).
#[cfg(target_arch = "x86_64")]
const FP4_F16_HI: [u8; 16] = [
    0x00, 0x38, 0x3C, 0x3E, 0x40, 0x42, 0x44, 0x46, 0x80, 0xB8, 0xBC, 0xBE, 0xC0, 0xC2, 0xC4, 0xC6,
];

impl Half {
    /// The type's mantissa bits, and the E8M0 codes `[lo, hi]` whose scale keeps every
    /// nonzero FP4 value (0.5 to 6, exponents −1 to 2) a normal number of the type:
    /// exponents −14 to 15 for f16, −126 to 127 for bf16.
    pub(super) fn exact(self) -> (u32, u8, u8) {
        match self {
            Half::F16 => (10, 127 - 13, 127 + 13),
            Half::Bf16 => (7, 127 - 125, 127 + 125),
        }
    }

    /// The high and low bytes of each FP4 value in this type, by nibble.
    #[cfg(target_arch = "x86_64")]
    pub(super) fn tables(self) -> ([u8; 16], [u8; 16]) {
        match self {
            Half::F16 => (FP4_F16_HI, [0; 16]),
            Half::Bf16 => (FP4_BF16_HI, FP4_BF16_LO),
        }
    }
}

/// One group's wanted output rows as `to` bits into `out` (row `c` at `(c − lo) · R ·
/// 2` bytes), with AVX2 where the CPU has it; returns the stored row of an E8M0 NaN
/// scale.
pub(super) fn group_half(
    gr: &Group,
    to: Half,
    out: &mut [u8],
    stats: &mut CastStats,
) -> std::result::Result<(), u64> {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 (checked at run time).
        return unsafe { half_group_avx2(gr, to, out, stats) };
    }
    half_group(gr, to, 0..gr.scales.len(), out, stats)
}

/// Output rows `[lo, hi)` of one group as `to` bits into `out` (row `c` at `(c − lo) ·
/// R · 2` bytes), for stored rows `rows`: each value FP4 × scale in f32, rounded to
/// nearest even, an infinity counted as the cast counts it (from an f32 product that
/// is already infinite: a source infinity; otherwise an overflow). Returns the row of
/// an E8M0 NaN scale.
pub(super) fn half_group(
    gr: &Group,
    to: Half,
    rows: std::ops::Range<usize>,
    out: &mut [u8],
    stats: &mut CastStats,
) -> std::result::Result<(), u64> {
    let stride = gr.scales.len();
    let inf = to.round(f32::INFINITY);
    for rr in rows {
        let Some(scale) = e8m0(gr.scales[rr]) else {
            return Err(rr as u64);
        };
        let blk = &gr.blocks[rr * 16..rr * 16 + 16];
        for k in gr.lo as usize..gr.hi as usize {
            let n = (blk[k / 2] >> (4 * (k % 2))) & 15;
            let v = fp4(n as u32) * scale;
            let h = to.round(v);
            if h & 0x7fff == inf {
                if v.is_finite() {
                    stats.overflow += 1;
                    stats.max_overflow = stats.max_overflow.max(v.abs() as f64);
                } else {
                    stats.inf += 1;
                }
            }
            let at = ((k - gr.lo as usize) * stride + rr) * 2;
            out[at..at + 2].copy_from_slice(&h.to_le_bytes());
        }
    }
    Ok(())
}

/// [`half_group`] sixteen stored rows at a time where their scales keep every value
/// normal in `to` (the usual case): the rows' 16 × 16 bytes are transposed in
/// registers, so that each byte column holds two output rows' nibbles for the sixteen
/// stored rows; a nibble's value in `to` is two byte lookups, and its scale, a power of
/// two, is added to the exponent field of the nonzero ones (exact: the product is
/// representable). Each output row gets 32 contiguous bytes. Other rows go through
/// [`half_group`].
///
/// # Safety
///
/// The CPU must support AVX2. Panics (before any store) when `out` is shorter than
/// the group's rows need.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn half_group_avx2(
    gr: &Group,
    to: Half,
    out: &mut [u8],
    stats: &mut CastStats,
) -> std::result::Result<(), u64> {
    use std::arch::x86_64::*;
    let rows = gr.scales.len();
    let (lo, hi) = (gr.lo as usize, gr.hi as usize);
    assert!(gr.blocks.len() >= rows * 16 && out.len() >= ((hi - lo) * rows) * 2);
    let (mbits, elo, ehi) = to.exact();
    let (th, tl) = to.tables();
    let full = rows / 16 * 16;
    // SAFETY: loads of 16 bytes at blocks[r · 16..] and scales[r0..r0 + 16] for r <
    // full ≤ rows (inside by the assert); stores of 32 bytes at out[((c − lo) · rows
    // + r0) · 2..] for c < hi, r0 + 16 ≤ rows (inside by the assert).
    unsafe {
        let th = _mm_loadu_si128(th.as_ptr().cast());
        let tl = _mm_loadu_si128(tl.as_ptr().cast());
        let nib = _mm_set1_epi8(0x0F);
        let mag = _mm256_set1_epi16(0x7fff);
        let (vlo, vhi) = (_mm_set1_epi8(elo as i8), _mm_set1_epi8(ehi as i8));
        let shift = _mm_cvtsi32_si128(mbits as i32);
        let bias = _mm256_set1_epi16(127);
        for r0 in (0..full).step_by(16) {
            let s = _mm_loadu_si128(gr.scales.as_ptr().add(r0).cast());
            let inside = _mm_and_si128(
                _mm_cmpeq_epi8(_mm_max_epu8(s, vlo), s),
                _mm_cmpeq_epi8(_mm_min_epu8(s, vhi), s),
            );
            if _mm_movemask_epi8(inside) != 0xFFFF {
                // Some scale outside (or NaN): these rows one by one.
                half_group(gr, to, r0..r0 + 16, out, stats)?;
                continue;
            }
            // (scale − 127) << mantissa bits, per stored row.
            let k = _mm256_sll_epi16(_mm256_sub_epi16(_mm256_cvtepu8_epi16(s), bias), shift);
            let mut a = [_mm_setzero_si128(); 16];
            for (i, v) in a.iter_mut().enumerate() {
                *v = _mm_loadu_si128(gr.blocks.as_ptr().add((r0 + i) * 16).cast());
            }
            // 16 × 16 byte transpose: four rounds of interleaving row k with row k + 8.
            for _ in 0..4 {
                let mut b = [_mm_setzero_si128(); 16];
                for j in 0..8 {
                    b[2 * j] = _mm_unpacklo_epi8(a[j], a[j + 8]);
                    b[2 * j + 1] = _mm_unpackhi_epi8(a[j], a[j + 8]);
                }
                a = b;
            }
            for c in lo..hi {
                // Column c of the group: nibble c % 2 of byte c / 2 of each row.
                let byte = a[c / 2];
                let n = if c % 2 == 0 {
                    _mm_and_si128(byte, nib)
                } else {
                    _mm_and_si128(_mm_srli_epi16::<4>(byte), nib)
                };
                let (h, l) = (_mm_shuffle_epi8(th, n), _mm_shuffle_epi8(tl, n));
                let v = _mm256_set_m128i(_mm_unpackhi_epi8(l, h), _mm_unpacklo_epi8(l, h));
                let zero = _mm256_cmpeq_epi16(_mm256_and_si256(v, mag), _mm256_setzero_si256());
                let v = _mm256_add_epi16(v, _mm256_andnot_si256(zero, k));
                let p = out.as_mut_ptr().add(((c - lo) * rows + r0) * 2);
                _mm256_storeu_si256(p.cast(), v);
            }
        }
    }
    half_group(gr, to, full..rows, out, stats)
}
