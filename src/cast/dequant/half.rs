//! Dequantized values written straight into f16 or bf16 bits ([`Half`]), with what
//! the cast would have counted: the 4-bit table kernels (a group's 16 values `fl(LUT[c]
//! × s)` rounded once to the target, then one lookup a nibble: bitsandbytes NF4 and
//! FP4, NVFP4, compressed-tensors MXFP4) and LLM.int8's rows (`fl(fl(q × s) × c)`,
//! eight at a time). Bit for bit what the f32 values and the cast after them give.
//!
//! With AVX2 and F16C a group's table is two products of eight lanes and two
//! conversions, and a nibble's value two byte shuffles; a group whose scale could
//! reach an infinity (or is not finite) is written value by value and counted as the
//! cast counts. Without them, every value is rounded in scalar code.

use half::f16;

#[cfg(target_arch = "x86_64")]
use super::simd::f16c;
use crate::cast::CastStats;
use crate::dtype::Dtype;

/// A 16-bit float type dequantized values are written as directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Half {
    F16,
    Bf16,
}

impl Half {
    /// The half type of `d`, if it is one.
    pub(super) fn of(d: Dtype) -> Option<Half> {
        match d {
            Dtype::F16 => Some(Half::F16),
            Dtype::Bf16 => Some(Half::Bf16),
            _ => None,
        }
    }

    /// `v` rounded to nearest even, as the cast rounds it.
    #[inline]
    pub(super) fn round(self, v: f32) -> u16 {
        match self {
            Half::F16 => f16::from_f32(v).to_bits(),
            Half::Bf16 => crate::cast::kernels::f32_to_bf16_bits(v.to_bits()),
        }
    }

    /// The largest finite value of the type: an f32 of at most this magnitude rounds
    /// to a finite value.
    fn max(self) -> f32 {
        match self {
            Half::F16 => 65504.0,
            Half::Bf16 => f32::from_bits(0x7f7f_0000),
        }
    }
}

/// Counts `v`, written as `h`, as the cast counts its output: a NaN, a source infinity,
/// or a finite value that overflowed to an infinity.
#[inline]
pub(super) fn count(v: f32, h: u16, to: Half, stats: &mut CastStats) {
    let exp = match to {
        Half::F16 => 0x7c00,
        Half::Bf16 => 0x7f80,
    };
    if h & exp != exp {
        return;
    }
    if v.is_nan() {
        stats.nan += 1;
    } else if v.is_finite() {
        stats.overflow += 1;
        stats.max_overflow = stats.max_overflow.max(v.abs() as f64);
    } else {
        stats.inf += 1;
    }
}

/// 4-bit codes through a table of 16 f32 values (`lut`), times a scale per group of
/// elements, written as `to`: `fl(lut[c] × s)` rounded once.
pub(super) struct Nibbles<'a> {
    pub lut: &'a [f32; 16],
    pub to: Half,
    /// The first element of a byte is its high nibble (bitsandbytes), else its low
    /// one (E2M1 pairs).
    pub high_first: bool,
}

/// Where [`Nibbles::write`]'s elements are: element `e`'s code is nibble `e − nib0` of
/// `codes`, its scale `scales[e / group − first / group]`.
pub(super) struct Codes<'a> {
    pub codes: &'a [u8],
    pub nib0: u64,
    pub group: u64,
    pub scales: &'a [f32],
}

impl Nibbles<'_> {
    /// Elements `[first, first + count)` of `c` into `out` (two bytes each), returning
    /// what the cast would have counted.
    pub(super) fn write(&self, c: &Codes, first: u64, count: u64, out: &mut [u8]) -> CastStats {
        #[cfg(target_arch = "x86_64")]
        if f16c() {
            // SAFETY: the CPU has AVX2 and F16C (checked at run time).
            return unsafe { self.write_avx2(c, first, count, out) };
        }
        self.write_scalar(c, first, count, out)
    }

    /// [`Nibbles::write`] without SIMD: each group's table rounded value by value.
    fn write_scalar(&self, c: &Codes, first: u64, count: u64, out: &mut [u8]) -> CastStats {
        self.groups(c, (first, count), out, |codes, p, n, s, dst| {
            let t = self.lut.map(|v| self.to.round(v * s));
            for (i, o) in dst.chunks_exact_mut(2).take(n).enumerate() {
                o.copy_from_slice(&t[self.nibble(codes, p + i)].to_le_bytes());
            }
        })
    }

    /// [`Nibbles::write`] with [`Nibbles::run_avx2`] for the groups whose values stay
    /// finite (the whole loop compiled for AVX2, so that a group of 16 pays no call).
    ///
    /// # Safety
    ///
    /// The CPU must support AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn write_avx2(&self, c: &Codes, first: u64, count: u64, out: &mut [u8]) -> CastStats {
        let lut = self.lut;
        let symmetric = (0..8).all(|j| lut[8 + j].to_bits() == lut[j].to_bits() ^ 0x8000_0000);
        self.groups(c, (first, count), out, |codes, p, n, s, dst| {
            // SAFETY: the caller's.
            unsafe { self.run_avx2(codes, (p, n), s, symmetric, dst) }
        })
    }

    /// Runs `finite(codes, p, n, s, dst)` for each group's run of the range (nibbles
    /// `[p, p + n)` with scale `s` into `dst`, `2n` bytes) whose values stay finite in
    /// the target, and writes the others value by value, counted as the cast counts.
    #[inline(always)]
    fn groups(
        &self,
        c: &Codes,
        (first, count): (u64, u64),
        out: &mut [u8],
        mut finite: impl FnMut(&[u8], usize, usize, f32, &mut [u8]),
    ) -> CastStats {
        let mut stats = CastStats::default();
        // An f32 of at most `limit` times the largest table magnitude is finite in `to`.
        let top = self.lut.iter().fold(0f32, |m, v| m.max(v.abs()));
        let limit = if top > 0.0 {
            self.to.max() / top
        } else {
            f32::MAX
        };
        let (end, g) = (first + count, c.group.max(1));
        let mut at = 0usize;
        let mut lo = first;
        // The end of the first group; each next one is `g` further (no division per
        // group: for groups of 16 it cost more than their lookups).
        let mut next = (first / g + 1) * g;
        for &s in c.scales {
            if lo >= end {
                break;
            }
            let hi = end.min(next);
            next += g;
            let n = (hi - lo) as usize;
            let dst = &mut out[at..at + 2 * n];
            let p = (lo - c.nib0) as usize;
            if s.abs() <= limit {
                finite(c.codes, p, n, s, dst);
            } else {
                self.run_counted(c.codes, p, n, s, dst, &mut stats);
            }
            (at, lo) = (at + 2 * n, hi);
        }
        debug_assert_eq!(at as u64, 2 * count, "scales for every group of the range");
        stats
    }

    /// Nibble `p` of `codes`.
    #[inline(always)]
    fn nibble(&self, codes: &[u8], p: usize) -> usize {
        let b = codes[p / 2];
        (if p.is_multiple_of(2) == self.high_first {
            b >> 4
        } else {
            b & 15
        }) as usize
    }

    /// Nibbles `[p, p + n)` times `s` one by one, each counted as the cast counts it.
    fn run_counted(
        &self,
        codes: &[u8],
        p: usize,
        n: usize,
        s: f32,
        out: &mut [u8],
        stats: &mut CastStats,
    ) {
        for (i, o) in out.chunks_exact_mut(2).take(n).enumerate() {
            let v = self.lut[self.nibble(codes, p + i)] * s;
            let h = self.to.round(v);
            count(v, h, self.to, stats);
            o.copy_from_slice(&h.to_le_bytes());
        }
    }

    /// Nibbles `[p, p + n)` times `s`, which keeps every value finite in the target,
    /// with the group's table as the target's low and high bytes in two registers (for a
    /// `symmetric` table, codes 8 to 15 the negatives of 0 to 7, from one product of
    /// eight lanes), and sixteen or thirty-two nibbles per step through two byte
    /// shuffles.
    ///
    /// # Safety
    ///
    /// The CPU must support AVX2 and F16C. Panics (before any store) when `out` is
    /// shorter than `2n` or `codes` than `(p + n) / 2` bytes.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    unsafe fn run_avx2(
        &self,
        codes: &[u8],
        (mut p, n): (usize, usize),
        s: f32,
        symmetric: bool,
        out: &mut [u8],
    ) {
        use std::arch::x86_64::*;
        let end = p + n;
        assert!(out.len() >= 2 * n && codes.len() >= end / 2);
        // A nibble alone (at an odd start or at the end), rounded by itself: the
        // table's value.
        let one = |p: usize, o: &mut [u8]| {
            let h = self.to.round(self.lut[self.nibble(codes, p)] * s);
            o[..2].copy_from_slice(&h.to_le_bytes());
        };
        let mut o = 0usize;
        if p % 2 == 1 {
            one(p, &mut out[..2]);
            (p, o) = (p + 1, 2);
        }
        // SAFETY: the loads read 16 (or 8) bytes at codes[p / 2..], p / 2 + 16 <= end / 2;
        // the stores write 64 (or 32) bytes at out[o..], o + 64 <= 2n.
        unsafe {
            let (tlo, thi) = table_avx2(self.lut, s, self.to, symmetric);
            let hf = self.high_first;
            while p + 32 <= end {
                let (i0, i1) = order(_mm_loadu_si128(codes.as_ptr().add(p / 2).cast()), hf);
                put(tlo, thi, i0, out.as_mut_ptr().add(o));
                put(tlo, thi, i1, out.as_mut_ptr().add(o + 32));
                (p, o) = (p + 32, o + 64);
            }
            if p + 16 <= end {
                let (i0, _) = order(_mm_loadl_epi64(codes.as_ptr().add(p / 2).cast()), hf);
                put(tlo, thi, i0, out.as_mut_ptr().add(o));
                (p, o) = (p + 16, o + 32);
            }
        }
        while p < end {
            one(p, &mut out[o..o + 2]);
            (p, o) = (p + 1, o + 2);
        }
    }
}

/// LLM.int8 codes `q` of one row as `to` bits into `out`: `fl(fl(q × s) × c)` rounded
/// once, eight at a time with AVX2 and F16C where the row's scale keeps every value
/// finite; otherwise value by value, counted as the cast counts.
pub(super) fn int8_row(
    q: &[u8],
    (s, c): (f32, f32),
    to: Half,
    out: &mut [u8],
    stats: &mut CastStats,
) {
    let mut done = 0;
    // |q| <= 128: the products stay below the target's largest value, with room for
    // their two roundings.
    #[cfg(target_arch = "x86_64")]
    if f16c() && (s.abs() * 129.0) * c.abs() <= to.max() {
        // SAFETY: the CPU has AVX2 and F16C (checked at run time).
        done = unsafe { int8_row_avx2(q, (s, c), to, out) };
    }
    for (o, &b) in out[2 * done..].chunks_exact_mut(2).zip(&q[done..]) {
        let v = (b as i8 as f32 * s) * c;
        let h = to.round(v);
        count(v, h, to, stats);
        o.copy_from_slice(&h.to_le_bytes());
    }
}

/// [`int8_row`]'s values for the first multiple of eight codes; returns how many.
///
/// # Safety
///
/// The CPU must support AVX2 and F16C. Panics (before any store) when `out` is
/// shorter than `2 · q.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn int8_row_avx2(q: &[u8], (s, c): (f32, f32), to: Half, out: &mut [u8]) -> usize {
    use std::arch::x86_64::*;
    let full = q.len() / 8 * 8;
    assert!(out.len() >= 2 * full);
    // SAFETY: loads of 8 bytes at q[i..], stores of 16 bytes at out[2i..], i + 8 <= full.
    unsafe {
        let (sv, cv) = (_mm256_set1_ps(s), _mm256_set1_ps(c));
        for i in (0..full).step_by(8) {
            let b = _mm256_cvtepi8_epi32(_mm_loadl_epi64(q.as_ptr().add(i).cast()));
            let v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(b), sv), cv);
            _mm_storeu_si128(out.as_mut_ptr().add(2 * i).cast(), halves_avx2(v, to));
        }
    }
    full
}

/// The 32 nibbles of `v` as element-ordered indices: the first 16 elements, then the
/// next 16 (`high_first`: each byte's high nibble is its first element).
///
/// # Safety
///
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn order(
    v: std::arch::x86_64::__m128i,
    high_first: bool,
) -> (std::arch::x86_64::__m128i, std::arch::x86_64::__m128i) {
    use std::arch::x86_64::*;
    let nib = _mm_set1_epi8(0x0f);
    let lo = _mm_and_si128(v, nib);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), nib);
    match high_first {
        true => (_mm_unpacklo_epi8(hi, lo), _mm_unpackhi_epi8(hi, lo)),
        false => (_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)),
    }
}

/// Stores the 16 values of indices `i` (32 bytes at `at`) from the table's low and
/// high bytes.
///
/// # Safety
///
/// The CPU must support AVX2; `at` must be valid for 32 bytes of writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn put(
    tlo: std::arch::x86_64::__m128i,
    thi: std::arch::x86_64::__m128i,
    i: std::arch::x86_64::__m128i,
    at: *mut u8,
) {
    use std::arch::x86_64::*;
    let (l, h) = (_mm_shuffle_epi8(tlo, i), _mm_shuffle_epi8(thi, i));
    // SAFETY: the caller's.
    unsafe {
        _mm_storeu_si128(at.cast(), _mm_unpacklo_epi8(l, h));
        _mm_storeu_si128(at.add(16).cast(), _mm_unpackhi_epi8(l, h));
    }
}

/// The 16 values `fl(lut[j] × s)` rounded to `to`, as two registers: their low bytes
/// and their high bytes, by code.
///
/// # Safety
///
/// The CPU must support AVX2 and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn table_avx2(
    lut: &[f32; 16],
    s: f32,
    to: Half,
    symmetric: bool,
) -> (std::arch::x86_64::__m128i, std::arch::x86_64::__m128i) {
    use std::arch::x86_64::*;
    // SAFETY: loads of 8 f32 at lut[0..8] and lut[8..16].
    unsafe {
        let sv = _mm256_set1_ps(s);
        let p0 = _mm256_mul_ps(_mm256_loadu_ps(lut.as_ptr()), sv);
        let h0 = halves_avx2(p0, to);
        // Each value's low byte into the first eight bytes, its high byte after.
        let split = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
        let a = _mm_shuffle_epi8(h0, split);
        if symmetric {
            // Codes 8 to 15 are codes 0 to 7 negated, exactly (`fl(−v × s) = −fl(v ×
            // s)`, and rounding to nearest even is symmetric): their sign bit flipped.
            let sign = _mm_set_epi64x(0x8080_8080_8080_8080u64 as i64, 0);
            return (
                _mm_unpacklo_epi64(a, a),
                _mm_xor_si128(_mm_unpackhi_epi64(a, a), sign),
            );
        }
        let p1 = _mm256_mul_ps(_mm256_loadu_ps(lut.as_ptr().add(8)), sv);
        let b = _mm_shuffle_epi8(halves_avx2(p1, to), split);
        (_mm_unpacklo_epi64(a, b), _mm_unpackhi_epi64(a, b))
    }
}

/// Eight f32 lanes rounded to nearest even as `to` bits (finite or infinite lanes;
/// no NaN).
///
/// # Safety
///
/// The CPU must support AVX2 and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
#[inline]
pub(super) unsafe fn halves_avx2(
    v: std::arch::x86_64::__m256,
    to: Half,
) -> std::arch::x86_64::__m128i {
    use std::arch::x86_64::*;
    match to {
        // Imm 0: round to nearest, ties to even.
        Half::F16 => _mm256_cvtps_ph::<0>(v),
        Half::Bf16 => {
            // x + 0x7fff + ((x >> 16) & 1), the high half: f32_to_bf16_bits for
            // non-NaN x.
            let x = _mm256_castps_si256(v);
            let odd = _mm256_and_si256(_mm256_srli_epi32::<16>(x), _mm256_set1_epi32(1));
            let r = _mm256_add_epi32(x, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
            let r = _mm256_srli_epi32::<16>(r);
            let lo = _mm256_castsi256_si128(r);
            _mm_packus_epi32(lo, _mm256_extracti128_si256::<1>(r))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The f32 values of elements `[first, first + count)` (each byte's nibbles taken
    /// apart here, in the table's order), through the cast itself: its bytes and its
    /// counts.
    fn reference(n: &Nibbles, c: &Codes, first: u64, count: u64) -> (Vec<u8>, CastStats) {
        let values: Vec<u8> = (first..first + count)
            .flat_map(|e| {
                let p = (e - c.nib0) as usize;
                let (hi, lo) = (c.codes[p / 2] >> 4, c.codes[p / 2] & 15);
                let (one, two) = if n.high_first { (hi, lo) } else { (lo, hi) };
                let code = if p.is_multiple_of(2) { one } else { two };
                let s = c.scales[(e / c.group - first / c.group) as usize];
                (n.lut[code as usize] * s).to_le_bytes()
            })
            .collect();
        let to = match n.to {
            Half::F16 => Dtype::F16,
            Half::Bf16 => Dtype::Bf16,
        };
        let mut out = vec![0u8; 2 * count as usize];
        let stats = crate::cast::cast_into(Dtype::F32, to, &values, &mut out).unwrap();
        (out, stats)
    }

    /// Every start and length over a few groups, both nibble orders, both targets, a
    /// table with codes 8–15 the negatives of 0–7 (E2M1's) and one without, scales
    /// that are negative, overflow f16 and bf16 (and one infinite), against the values
    /// rounded one by one.
    #[test]
    fn tables_write_what_rounding_each_value_gives() {
        let mut next = crate::cast::dequant::xorshift(0x9E37_79B9_7F4A_7C15u64);
        let skewed: [f32; 16] = std::array::from_fn(|j| (j as f32 - 7.3) * 0.173);
        let e2m1 = [
            0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
        ];
        let codes: Vec<u8> = (0..200).map(|_| next() as u8).collect();
        for group in [16u64, 32, 64, 48] {
            let mut scales: Vec<f32> = (0..400 / group + 2)
                .map(|_| f32::from_bits(0x3000_0000 + (next() as u32 % 0x1800_0000)))
                .collect();
            scales[1] = 40_000.0;
            scales[2] = 3.0e38;
            scales[3] = f32::INFINITY;
            scales[4] = -0.37;
            for (lut, to, high_first) in [
                (&skewed, Half::F16, true),
                (&skewed, Half::F16, false),
                (&skewed, Half::Bf16, true),
                (&e2m1, Half::Bf16, false),
                (&e2m1, Half::F16, false),
                (&e2m1, Half::F16, true),
            ] {
                let n = Nibbles {
                    lut,
                    to,
                    high_first,
                };
                for nib0 in [0u64, 6] {
                    check(&n, &codes, nib0, group, &scales);
                }
            }
        }
    }

    /// [`Nibbles::write`] and [`Nibbles::write_scalar`] against [`reference`] from a
    /// few starts, every length class.
    fn check(n: &Nibbles, codes: &[u8], nib0: u64, group: u64, scales: &[f32]) {
        for first in [nib0, nib0 + 1, nib0 + 7, nib0 + 33] {
            for count in [1u64, 2, 15, 16, 17, 31, 32, 33, 95, 300] {
                let c = Codes {
                    codes,
                    nib0,
                    group,
                    scales: &scales[(first / group) as usize..],
                };
                let (want, ws) = reference(n, &c, first, count);
                for simd in [true, false] {
                    let mut got = vec![0u8; 2 * count as usize];
                    let gs = match simd {
                        true => n.write(&c, first, count, &mut got),
                        false => n.write_scalar(&c, first, count, &mut got),
                    };
                    let at = format!(
                        "{:?} high {} lut[1] {} group {group} first {first} count {count} simd {simd}",
                        n.to, n.high_first, n.lut[1]
                    );
                    assert_eq!(got, want, "{at}");
                    assert_eq!(
                        (gs.nan, gs.inf, gs.overflow, gs.max_overflow),
                        (ws.nan, ws.inf, ws.overflow, ws.max_overflow),
                        "{at}"
                    );
                }
            }
        }
    }

    /// Every code, rows not a multiple of eight long, scales that keep the row finite
    /// and scales that overflow f16 (and bf16), against the two products rounded once.
    #[test]
    fn int8_rows_write_what_rounding_each_value_gives() {
        let q: Vec<u8> = (0..261u32).map(|i| (i * 97 + 3) as u8).collect();
        let c = f32::from_bits(0x3c01_0204);
        for s in [0.0f32, 1.7e-3, 0.37, 513.25, 65504.0, 7.0e4, 2.9e38, -3.1] {
            for to in [Half::F16, Half::Bf16] {
                for len in [0usize, 7, 8, 9, 256, 261] {
                    // The two products in f32, then the cast itself.
                    let values: Vec<u8> = q[..len]
                        .iter()
                        .flat_map(|&b| ((b as i8 as f32 * s) * c).to_le_bytes())
                        .collect();
                    let dt = if to == Half::F16 {
                        Dtype::F16
                    } else {
                        Dtype::Bf16
                    };
                    let mut want = vec![0u8; 2 * len];
                    let ws = crate::cast::cast_into(Dtype::F32, dt, &values, &mut want).unwrap();
                    let (mut got, mut gs) = (vec![0u8; 2 * len], CastStats::default());
                    int8_row(&q[..len], (s, c), to, &mut got, &mut gs);
                    assert_eq!(got, want, "{to:?} s {s} len {len}");
                    assert_eq!(
                        (gs.nan, gs.inf, gs.overflow, gs.max_overflow),
                        (ws.nan, ws.inf, ws.overflow, ws.max_overflow),
                        "{to:?} s {s} len {len}"
                    );
                }
            }
        }
    }
}
