//! int8 quantization, one unit (a channel, or a group of the flattened tensor) at a
//! time, while the unit is in cache: its range, then its scale and zero point, then its
//! codes, and the error the codes make against the source values.
//!
//! The arithmetic is the seed quantizer's, in f32 like its numpy code: symmetric
//! `scale = max|x| / 127`, zero point 0; asymmetric `scale = (max - min) / 255`, zero
//! point `-128 - min / scale` rounded to the nearest integer (the seed truncates, which
//! can push the largest values past 127: rounding never loses more); a unit whose range
//! is zero gets scale 1; codes are `round_half_even(x / scale) + zero_point` clipped to
//! [-128, 127]. Dequantization is `(q - zero_point) * scale` in f32, the seed loader's.
//!
//! int2 (codes in [-2, 1]) is affine only, its range clipped where that lowers the
//! error: for each ratio `r` of [`INT2_RATIOS`] (1 first), `scale = (max - min) / 3 *
//! r` and zero point `round_half_even(-2 - lo_r / scale)` with `lo_r` the clipped
//! range's low end (not clipped to the code range, so a unit of one sign keeps its four
//! levels; bounded by ±2^21 so that `q - zero_point` stays exact in f32); the unit
//! keeps the first candidate with the least Σ (x − x̂)². Codes are `round_half_even(x /
//! scale) + zero_point` clipped to [-2, 1]; a unit of one repeated value `c` gets scale
//! `|c|` (1 for zeros) and zero point 0: exact. Four levels over the whole range leave
//! most values of a bell-shaped group in the two middle ones: on the trained MiniLM the
//! search gives 8.5 dB SQNR in groups of 128 where min/max gives 5.8 dB. The codes are
//! then packed four to a byte ([`pack_int2`]).

use crate::plan::{QuantScheme, QuantType};
use serde::Serialize;

/// The error quantization made, summed so that parts merge.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct QuantError {
    /// Σ x² over the source values.
    pub sum_x2: f64,
    /// Σ (x − x̂)² over the source values.
    pub sum_e2: f64,
    /// max |x − x̂|.
    pub max_abs: f64,
    /// Values quantized.
    pub count: u64,
}

impl QuantError {
    /// Adds another part.
    pub fn merge(&mut self, o: &QuantError) {
        self.sum_x2 += o.sum_x2;
        self.sum_e2 += o.sum_e2;
        self.max_abs = self.max_abs.max(o.max_abs);
        self.count += o.count;
    }

    /// ‖x − x̂‖ / ‖x‖ (0 for a zero tensor).
    pub fn rel_rms(&self) -> f64 {
        if self.sum_x2 > 0.0 {
            (self.sum_e2 / self.sum_x2).sqrt()
        } else {
            0.0
        }
    }

    /// Signal to quantization noise ratio in dB, `10 log10(Σx² / Σe²)`; infinite when
    /// the codes are exact.
    pub fn sqnr_db(&self) -> f64 {
        10.0 * (self.sum_x2 / self.sum_e2).log10()
    }
}

/// The error quantization made in one tensor (or a whole model), measured against its
/// source values.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TensorQuantError {
    /// Output name (`model` for the model-wide figure).
    pub name: String,
    /// max |x − x̂|.
    pub max_abs_error: f64,
    /// ‖x − x̂‖ / ‖x‖.
    pub rel_rms: f64,
    /// 10 log10(Σx² / Σ(x − x̂)²) in dB (`null` in JSON when exact).
    pub sqnr_db: f64,
}

impl TensorQuantError {
    /// The figures of `e`, under `name`.
    pub fn new(name: &str, e: &QuantError) -> Self {
        TensorQuantError {
            name: name.to_string(),
            max_abs_error: e.max_abs,
            rel_rms: e.rel_rms(),
            sqnr_db: e.sqnr_db(),
        }
    }
}

/// The largest int2 zero point: with |x / scale| below 2^21 + 3, [`round_even`] is
/// exact and `q - zero_point` is an f32 integer.
const INT2_ZP_MAX: f32 = 2_097_152.0;

/// The smallest and largest of `x` (`(inf, -inf)` when empty).
#[inline(always)]
fn range(x: &[f32]) -> (f32, f32) {
    x.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
            (l.min(v), h.max(v))
        })
}

/// The ratios an int2 unit's range is clipped to, widest first: [`params_int2`] keeps
/// the one whose codes make the least squared error.
const INT2_RATIOS: [f32; 13] = [
    1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4,
];

/// The scale and zero point of an int2 unit whose values span `span` from `lo`,
/// clipped to ratio `r` of that range about its middle: `scale = span / 3 * r`,
/// `zero_point = round_half_even(-2 - lo_r / scale)` with `lo_r = lo + span * 0.5 *
/// (1 - r)` (all f32; `r = 1` gives `(max - min) / 3` and `lo` exactly).
#[inline(always)]
fn int2_candidate(lo: f32, span: f32, r: f32) -> (f32, f32) {
    let scale = span / 3.0 * r;
    let lo_r = lo + span * 0.5 * (1.0 - r);
    let zp = (-2.0 - lo_r / scale)
        .round_ties_even()
        .clamp(-INT2_ZP_MAX, INT2_ZP_MAX);
    (scale, zp)
}

/// Σ (x − x̂)² over `x` coded in int2 with `scale` and `zp`, in f64: element `i` added
/// to lane `i % 8` in order, then the lanes in order (a fixed order, so that a test can
/// repeat the choice exactly).
#[inline(always)]
fn int2_sse(x: &[f32], scale: f32, zp: f32) -> f64 {
    let mut lanes = [0f64; 8];
    #[inline(always)]
    fn e2(v: f32, scale: f32, zp: f32) -> f64 {
        let c = (round_even(v / scale) + zp).clamp(-2.0, 1.0);
        let e = v as f64 - ((c - zp) * scale) as f64;
        e * e
    }
    let mut xs = x.chunks_exact(8);
    for c in &mut xs {
        for j in 0..8 {
            lanes[j] += e2(c[j], scale, zp);
        }
    }
    for (j, &v) in xs.remainder().iter().enumerate() {
        lanes[j] += e2(v, scale, zp);
    }
    lanes.iter().sum()
}

/// The scale and zero point of one int2 unit of finite values (affine whatever the
/// scheme: see the module's documentation): of the clippings [`INT2_RATIOS`] of its
/// range, the first with the least squared error; `None` when the range does not fit
/// f32.
#[inline(always)]
fn params_int2(x: &[f32]) -> Option<(f32, f32)> {
    let (lo, hi) = range(x);
    let span = hi - lo;
    if !span.is_finite() {
        return (x.is_empty()).then_some((1.0, 0.0));
    }
    if span / 3.0 <= 0.0 {
        // One repeated value: code ±1 with scale |c| gives it exactly.
        return Some((if lo != 0.0 { lo.abs() } else { 1.0 }, 0.0));
    }
    let mut best = (int2_candidate(lo, span, 1.0), f64::INFINITY);
    for r in INT2_RATIOS {
        let (scale, zp) = int2_candidate(lo, span, r);
        // Finite; zero only where a tiny span underflows.
        if scale <= 0.0 {
            continue;
        }
        let sse = int2_sse(x, scale, zp);
        if sse < best.1 {
            best = ((scale, zp), sse);
        }
    }
    Some(best.0)
}

/// The scale and zero point of one unit of finite values; `None` when the range does
/// not fit f32 (values near ±3.4e38 of both signs).
#[inline(always)]
pub(crate) fn params(kind: QuantType, scheme: QuantScheme, x: &[f32]) -> Option<(f32, f32)> {
    if kind == QuantType::Int2 {
        return params_int2(x);
    }
    match scheme {
        QuantScheme::Symmetric => {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = amax / 127.0;
            Some((if scale > 0.0 { scale } else { 1.0 }, 0.0))
        }
        QuantScheme::Asymmetric => {
            let (lo, hi) = range(x);
            let scale = (hi - lo) / 255.0;
            if !scale.is_finite() {
                return (x.is_empty()).then_some((1.0, 0.0));
            }
            if scale <= 0.0 {
                return Some((1.0, 0.0));
            }
            let zp = (-128.0 - lo / scale).round_ties_even().clamp(-128.0, 127.0);
            Some((scale, zp))
        }
    }
}

/// Quantizes one unit into `q` with `scale` and `zp`, codes clipped to [`LO`, `HI`]
/// (one signed byte each), adding its error to `err`.
///
/// Eight independent lanes of error sums (f64) and maxima, combined at the end: one
/// sequential f64 chain would bound the loop by the add latency, several cycles per
/// element; the lanes let it vectorize. Sums differ from a sequential order only in
/// the last bits (the error figures are ratios of them); maxima not at all.
#[inline(always)]
pub(crate) fn quantize<const LO: i32, const HI: i32>(
    x: &[f32],
    scale: f32,
    zp: f32,
    q: &mut [u8],
    err: &mut QuantError,
) {
    const LANES: usize = 8;
    let (mut sx, mut se, mut mx) = ([0f64; LANES], [0f64; LANES], [0f64; LANES]);
    #[inline(always)]
    fn one<const LO: i32, const HI: i32>(
        v: f32,
        (scale, zp): (f32, f32),
        o: &mut u8,
        sx: &mut f64,
        se: &mut f64,
        mx: &mut f64,
    ) {
        let c = (round_even(v / scale) + zp).clamp(LO as f32, HI as f32);
        *o = c as i8 as u8;
        let back = (c - zp) * scale;
        let e = (v as f64) - (back as f64);
        *sx += (v as f64) * (v as f64);
        *se += e * e;
        // A compare, not f64::max: the values are finite, and it vectorizes.
        let a = e.abs();
        *mx = if a > *mx { a } else { *mx };
    }
    let mut xs = x.chunks_exact(LANES);
    let mut qs = q.chunks_exact_mut(LANES);
    for (xc, qc) in (&mut xs).zip(&mut qs) {
        for i in 0..LANES {
            one::<LO, HI>(
                xc[i],
                (scale, zp),
                &mut qc[i],
                &mut sx[i],
                &mut se[i],
                &mut mx[i],
            );
        }
    }
    for (o, &v) in qs.into_remainder().iter_mut().zip(xs.remainder()) {
        one::<LO, HI>(v, (scale, zp), o, &mut sx[0], &mut se[0], &mut mx[0]);
    }
    err.sum_x2 += sx.iter().sum::<f64>();
    err.sum_e2 += se.iter().sum::<f64>();
    err.max_abs = mx
        .iter()
        .fold(err.max_abs, |m, &v| if v > m { v } else { m });
    err.count += x.len() as u64;
}

/// Rounds to the nearest integer, ties to even, for |y| < 2^22 (adding and removing
/// 1.5 × 2^23 leaves no fraction bits under the default rounding mode); this is
/// `round_ties_even` without a libm call, so the loop vectorizes. Larger |y| only occur
/// where the code clamps to ±127/−128 anyway, and stay far outside that range.
#[inline(always)]
fn round_even(y: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    let a = y.abs();
    if a < 4_194_304.0 {
        // Ties to even are symmetric about zero; copysign keeps -0.0 for -0.5.
        ((a + MAGIC) - MAGIC).copysign(y)
    } else {
        y
    }
}

/// Why one unit cannot be quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UnitError {
    /// It holds this many NaN or infinite values: no scale represents them.
    NonFinite(usize),
    /// Its values span more than f32 holds.
    Span,
}

impl std::fmt::Display for UnitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UnitError::NonFinite(n) => write!(
                f,
                "it holds {n} NaN or infinite value{} (no scale represents them); skip it with a quantize-skip glob",
                if *n == 1 { "" } else { "s" }
            ),
            UnitError::Span => write!(f, "its values span more than f32 can hold"),
        }
    }
}

/// Quantizes one unit (a channel or a group) of `src`, elements of `dtype`: widened
/// into the scratch `x` while in cache, checked finite, its scale and zero point
/// computed, its codes (one signed byte each, int2 ones not yet packed) written into
/// `q` and its error added to `err`. The cast stage and `verify` both quantize
/// through it.
pub(crate) fn quantize_unit(
    (kind, scheme): (QuantType, QuantScheme),
    dtype: crate::Dtype,
    src: &[u8],
    x: &mut Vec<f32>,
    q: &mut [u8],
    err: &mut QuantError,
) -> Result<(f32, f32), UnitError> {
    x.clear();
    super::widen(dtype, src, x);
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 (checked once, above).
        return unsafe { check_and_quantize_avx2((kind, scheme), x, q, err) };
    }
    check_and_quantize((kind, scheme), x, q, err)
}

/// Whether the CPU has AVX2 (cached).
#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2"))
}

/// [`check_and_quantize`] compiled for AVX2: the same operations in the same order (no
/// fused multiply-add), so the same codes, scales and error sums, on wider vectors.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn check_and_quantize_avx2(
    how: (QuantType, QuantScheme),
    x: &[f32],
    q: &mut [u8],
    err: &mut QuantError,
) -> Result<(f32, f32), UnitError> {
    check_and_quantize(how, x, q, err)
}

/// The finite check, the unit's scale and zero point, and its codes and error.
#[inline(always)]
fn check_and_quantize(
    (kind, scheme): (QuantType, QuantScheme),
    x: &[f32],
    q: &mut [u8],
    err: &mut QuantError,
) -> Result<(f32, f32), UnitError> {
    // One vectorized pass; the count only when something is wrong.
    if x.iter().fold(false, |acc, v| acc | !v.is_finite()) {
        return Err(UnitError::NonFinite(
            x.iter().filter(|v| !v.is_finite()).count(),
        ));
    }
    let (scale, zp) = params(kind, scheme, x).ok_or(UnitError::Span)?;
    match kind {
        QuantType::Int8 => quantize::<-128, 127>(x, scale, zp, q, err),
        QuantType::Int2 => quantize::<-2, 1>(x, scale, zp, q, err),
    }
    Ok((scale, zp))
}

/// The value of code `q` (the seed loader's formula, in f32).
#[inline]
pub(crate) fn dequantize(q: u8, scale: f32, zp: f32) -> f32 {
    ((q as i8) as f32 - zp) * scale
}

/// Packs int2 codes (each in [-2, 1]) four to a byte as V2 stores them: code `q + 2`,
/// the first element in the two highest bits (`c0 << 6 | c1 << 4 | c2 << 2 | c3`),
/// the last byte's unused low bits zero. `dst` holds `codes.len().div_ceil(4)` bytes.
/// Quantized and carried codes are packed through it.
pub(crate) fn pack_int2(codes: &[i8], dst: &mut [u8]) {
    debug_assert_eq!(dst.len(), codes.len().div_ceil(4));
    for (b, c) in dst.iter_mut().zip(codes.chunks(4)) {
        *b = c.iter().enumerate().fold(0u8, |acc, (j, &q)| {
            acc | ((((q + 2) as u8) & 3) << (6 - 2 * j))
        });
    }
}

/// Appends the first `n` int2 codes of `packed` (see [`pack_int2`]) as signed bytes
/// in [-2, 1]: the two highest bits of each byte first, the seed loader's order.
pub(crate) fn unpack_int2(packed: &[u8], n: usize, out: &mut Vec<u8>) {
    out.extend(
        packed
            .iter()
            .flat_map(|&b| [b >> 6, b >> 4, b >> 2, b].map(|c| ((c & 3) as i8 - 2) as u8))
            .take(n),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_even_is_round_ties_even() {
        let mut y = -300.0f32;
        while y <= 300.0 {
            for v in [y, y + 0.5, y - 0.5, y + 0.499_999_97, y + 0.500_000_06] {
                assert_eq!(
                    round_even(v).to_bits(),
                    v.round_ties_even().to_bits(),
                    "{v}"
                );
            }
            y += 0.25;
        }
        for v in [4_194_303.5f32, -4_194_302.5, 1e9, -1e9, 0.0, -0.0] {
            assert_eq!(round_even(v), v.round_ties_even(), "{v}");
        }
    }

    #[test]
    fn symmetric_and_asymmetric_codes() {
        let x = [0.5f32, -1.0, 0.25, 1.27];
        let (s, z) = params(QuantType::Int8, QuantScheme::Symmetric, &x).unwrap();
        assert_eq!((s, z), (1.27 / 127.0, 0.0));
        let mut q = [0u8; 4];
        let mut e = QuantError::default();
        quantize::<-128, 127>(&x, s, z, &mut q, &mut e);
        let codes: Vec<i8> = q.iter().map(|&b| b as i8).collect();
        assert_eq!(codes, vec![50, -100, 25, 127]);
        assert_eq!(e.count, 4);
        // A zero unit: scale 1, codes 0, no error.
        let (s, z) = params(QuantType::Int8, QuantScheme::Symmetric, &[0.0; 3]).unwrap();
        assert_eq!((s, z), (1.0, 0.0));
        let (s, z) = params(QuantType::Int8, QuantScheme::Asymmetric, &[2.0; 3]).unwrap();
        assert_eq!((s, z), (1.0, 0.0));
        // Asymmetric over [0, 2.55]: scale 0.01, zero point -128.
        let (s, z) = params(QuantType::Int8, QuantScheme::Asymmetric, &[0.0, 2.55, 1.0]).unwrap();
        assert_eq!((s, z), (2.55 / 255.0, -128.0));
        assert_eq!(dequantize(0x80, s, z), 0.0);
        assert_eq!(
            params(QuantType::Int8, QuantScheme::Asymmetric, &[-3e38, 3e38]),
            None
        );
    }

    #[test]
    fn int2_codes_pack_high_bits_first_and_unpack_back() {
        let codes: [i8; 6] = [1, -2, 0, -1, -2, 1];
        let mut b = [0u8; 2];
        pack_int2(&codes, &mut b);
        // Stored q + 2: 3, 0, 2, 1 | 0, 3 and two unused codes of zero bits.
        assert_eq!(b, [0b11_00_10_01, 0b00_11_00_00]);
        let mut back = Vec::new();
        unpack_int2(&b, 6, &mut back);
        assert_eq!(back, codes.map(|c| c as u8));
    }

    #[test]
    fn int2_params_cover_the_range_clip_when_it_pays_and_keep_constants_exact() {
        // Four evenly spaced values: the whole range, exact.
        let x = [-0.5f32, 0.0, 0.5, 1.0];
        assert_eq!(params_int2(&x), Some((0.5, -1.0)));
        let mut q = [0u8; 4];
        let mut e = QuantError::default();
        quantize::<-2, 1>(&x, 0.5, -1.0, &mut q, &mut e);
        assert_eq!(q.map(|c| c as i8), [-2, -1, 0, 1]);
        assert_eq!(e.sum_e2, 0.0);
        // Values crowded about zero with thin tails to ±1: a clipped range makes less
        // error than the whole one (scale 2/3).
        let y: Vec<f32> = (0..=128).map(|i| (i as f32 / 64.0 - 1.0).powi(3)).collect();
        let (s, z) = params_int2(&y).unwrap();
        assert!(s < 2.0 / 3.0, "{s}");
        let sse = |s, z| int2_sse(&y, s, z);
        assert!(sse(s, z) < sse(2.0 / 3.0, int2_candidate(-1.0, 2.0, 1.0).1));
        // A unit of one value (or zeros): exact with scale |c|, zero point 0.
        assert_eq!(params_int2(&[-0.25; 5]), Some((0.25, 0.0)));
        assert_eq!(params_int2(&[0.0; 5]), Some((1.0, 0.0)));
        // All of one sign: the zero point leaves the code range.
        let (s, z) = params_int2(&[3.0, 4.0, 5.0, 6.0]).unwrap();
        assert_eq!((s, z), (1.0, -5.0));
        assert_eq!(params_int2(&[-3e38, 3e38]), None);
    }
}
