//! The cast kernels: source element bytes → output element bytes, with every
//! floating-point cast checked.
//!
//! f32 → f16 goes through `half`'s slice conversion (F16C when the CPU has it); bf16 is
//! widened to f32 exactly by a shift and then takes the same path, so the one rounding
//! is f32 → f16, round-to-nearest-even. f64 → f16/bf16 rounds once, directly. Overflow
//! (a finite source value that becomes ±inf) is found by scanning the output for
//! infinities, which costs one cheap pass; only when there are some is the source
//! consulted to tell overflow from an infinity that was already there.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;
pub use xxhash_rust::xxh3::Xxh3;

use crate::dtype::Dtype;

/// Elements converted per step, through stack-sized scratch buffers.
const CHUNK: usize = 8192;
/// Rows larger than this are cast by several rayon tasks.
const PAR_BYTES: usize = 8 << 20;

/// What a cast saw.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CastStats {
    /// NaN values (in the source, kept as NaN).
    pub nan: u64,
    /// Infinities already present in the source (kept).
    pub inf: u64,
    /// Finite source values that became ±inf.
    pub overflow: u64,
    /// The largest magnitude among the overflowing values (0 when none).
    pub max_overflow: f64,
}

impl CastStats {
    /// Adds another part's counts.
    pub fn merge(&mut self, o: &CastStats) {
        self.nan += o.nan;
        self.inf += o.inf;
        self.overflow += o.overflow;
        self.max_overflow = self.max_overflow.max(o.max_overflow);
    }
}

/// f32 → f16 over whole slices with F16C, inlined (half's runtime-detected path calls
/// its 8-lane kernel once per 8 elements, which costs more than the conversion).
#[cfg(target_arch = "x86_64")]
mod f16c {
    use std::arch::x86_64::{__m128i, _mm256_cvtps_ph, _mm256_loadu_ps, _mm_storeu_si128};
    use std::sync::OnceLock;

    /// True when the CPU has F16C and AVX.
    pub fn available() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("f16c") && is_x86_feature_detected!("avx"))
    }

    /// Converts `n = src.len() / 4` little-endian f32 values into `dst` (2n bytes),
    /// round-to-nearest-even. Returns how many elements it converted (a multiple of 8);
    /// the caller converts the rest.
    ///
    /// # Safety
    ///
    /// The CPU must support F16C and AVX ([`available`]).
    #[target_feature(enable = "avx,f16c")]
    pub unsafe fn f32_to_f16(src: &[u8], dst: &mut [u8]) -> usize {
        let n = (src.len() / 4).min(dst.len() / 2) / 8 * 8;
        let mut i = 0;
        while i < n {
            // SAFETY: i + 8 <= n elements, so bytes [4i, 4i + 32) of src and
            // [2i, 2i + 16) of dst are in bounds; loadu/storeu accept any alignment.
            unsafe {
                let v = _mm256_loadu_ps(src.as_ptr().add(4 * i).cast());
                // Imm 0 = _MM_FROUND_TO_NEAREST_INT: round to nearest, ties to even.
                let h = _mm256_cvtps_ph::<0>(v);
                _mm_storeu_si128(dst.as_mut_ptr().add(2 * i).cast::<__m128i>(), h);
            }
            i += 8;
        }
        n
    }
}

/// f32 bytes → f16 bytes, round-to-nearest-even.
fn f32_bytes_to_f16(src: &[u8], dst: &mut [u8]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if f16c::available() {
        // SAFETY: F16C and AVX were detected at run time.
        done = unsafe { f16c::f32_to_f16(src, dst) };
    }
    for (o, b) in dst[2 * done..]
        .chunks_exact_mut(2)
        .zip(src[4 * done..].chunks_exact(4))
    {
        o.copy_from_slice(
            &f16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]])).to_le_bytes(),
        );
    }
}

/// One element's little-endian bytes of a float type as f64 (exact for every castable
/// type; 0 for anything else).
pub(crate) fn value_f64(dtype: Dtype, b: &[u8]) -> f64 {
    match (dtype, b) {
        (Dtype::F16, [a, b, ..]) => f16::from_le_bytes([*a, *b]).to_f64(),
        (Dtype::Bf16, [a, b, ..]) => bf16::from_le_bytes([*a, *b]).to_f64(),
        (Dtype::F32, [a, b, c, d, ..]) => f32::from_le_bytes([*a, *b, *c, *d]) as f64,
        (Dtype::F64, [a, b, c, d, e, f, g, h, ..]) => {
            f64::from_le_bytes([*a, *b, *c, *d, *e, *f, *g, *h])
        }
        _ => 0.0,
    }
}

/// Appends the elements of a float source to `out` as f32 (exact for f16, bf16 and
/// f32; f64 rounds to nearest); other dtypes append nothing.
pub(crate) fn widen(dtype: Dtype, src: &[u8], out: &mut Vec<f32>) {
    match dtype {
        Dtype::F32 => out.extend(
            src.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        Dtype::Bf16 => out.extend(
            src.chunks_exact(2)
                .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)),
        ),
        Dtype::F16 => {
            let start = out.len();
            out.resize(start + src.len() / 2, 0.0);
            match bytemuck::try_cast_slice::<u8, f16>(&src[..src.len() / 2 * 2]) {
                Ok(h) => h.convert_to_f32_slice(&mut out[start..]),
                Err(_) => {
                    for (o, b) in out[start..].iter_mut().zip(src.chunks_exact(2)) {
                        *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
                    }
                }
            }
        }
        Dtype::F64 => {
            out.extend(src.chunks_exact(8).map(|b| {
                f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
            }))
        }
        _ => {}
    }
}

/// Reads element `i` of a float source as f64.
fn src_value(dtype: Dtype, src: &[u8], i: usize) -> f64 {
    let s = dtype.size();
    src.get(i * s..i * s + s)
        .map_or(0.0, |b| value_f64(dtype, b))
}

/// `v` as f32 rounded to odd: truncated toward zero, its last bit set when that lost
/// anything. Rounding the result to nearest-even in a format at least two bits
/// narrower (f16, bf16) rounds `v` correctly, once; rounding `v` to nearest f32 first
/// would round twice, and `half`'s `from_f64` misrounds about 1 value in 20,000 to
/// bf16 and 1 in 150,000 to f16 (found by the `roundtrip` fuzz target).
#[inline]
fn f64_to_f32_odd(v: f64) -> f32 {
    let t = v as f32;
    if v.is_nan() || t as f64 == v {
        return t;
    }
    let mut bits = t.to_bits();
    if t.is_infinite() || (t as f64).abs() > v.abs() {
        // One step toward zero (infinity steps back to the largest finite value).
        bits -= 1;
    }
    f32::from_bits(bits | 1)
}

/// f32 → bf16 bits, round-to-nearest-even, NaN kept quiet (as `half::bf16::from_f32`).
#[inline(always)]
pub(crate) fn f32_to_bf16_bits(x: u32) -> u16 {
    if x & 0x7fff_ffff > 0x7f80_0000 {
        ((x >> 16) | 0x0040) as u16
    } else {
        (x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16) as u16
    }
}

/// Loads `n` elements of a float source into `out` as f32 (exact for f16/bf16/f32).
fn load_f32(dtype: Dtype, src: &[u8], out: &mut [f32]) {
    match dtype {
        Dtype::F32 => {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Dtype::Bf16 => {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        Dtype::F16 => {
            let mut h = [f16::ZERO; CHUNK];
            let h = &mut h[..out.len()];
            for (o, b) in h.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16::from_le_bytes([b[0], b[1]]);
            }
            h.convert_to_f32_slice(out);
        }
        Dtype::F64 => {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(8)) {
                *o = f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32;
            }
        }
        _ => {}
    }
}

/// True when some element of `out` has an all-ones exponent (±inf or NaN). One
/// max-reduction over the magnitudes, which the compiler vectorizes; the common case,
/// no specials, costs a fraction of the conversion itself.
fn any_special(dtype: Dtype, out: &[u8]) -> bool {
    match dtype {
        Dtype::F16 | Dtype::Bf16 => {
            let exp = if dtype == Dtype::F16 {
                0x7c00u16
            } else {
                0x7f80
            };
            let max = match bytemuck::try_cast_slice::<u8, u16>(out) {
                Ok(v) => v.iter().fold(0u16, |m, &x| m.max(u16::from_le(x) & 0x7fff)),
                Err(_) => out.chunks_exact(2).fold(0u16, |m, b| {
                    m.max(u16::from_le_bytes([b[0], b[1]]) & 0x7fff)
                }),
            };
            max >= exp
        }
        Dtype::F32 => {
            let max = match bytemuck::try_cast_slice::<u8, u32>(out) {
                Ok(v) => v
                    .iter()
                    .fold(0u32, |m, &x| m.max(u32::from_le(x) & 0x7fff_ffff)),
                Err(_) => out.chunks_exact(4).fold(0u32, |m, b| {
                    m.max(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff)
                }),
            };
            max >= 0x7f80_0000
        }
        Dtype::F64 => true,
        _ => false,
    }
}

/// Counts infinities and NaNs in output bytes of `dtype`.
fn scan_special(dtype: Dtype, out: &[u8]) -> (u64, u64) {
    let (mut inf, mut nan) = (0u64, 0u64);
    if !any_special(dtype, out) {
        return (0, 0);
    }
    match dtype {
        Dtype::F16 | Dtype::Bf16 => {
            let (exp, man) = if dtype == Dtype::F16 {
                (0x7c00u16, 0x03ffu16)
            } else {
                (0x7f80, 0x007f)
            };
            for b in out.chunks_exact(2) {
                let v = u16::from_le_bytes([b[0], b[1]]);
                let special = (v & exp) == exp;
                let m = (v & man) != 0;
                inf += (special & !m) as u64;
                nan += (special & m) as u64;
            }
        }
        Dtype::F32 => {
            for b in out.chunks_exact(4) {
                let v = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                let special = (v & 0x7f80_0000) == 0x7f80_0000;
                let m = (v & 0x007f_ffff) != 0;
                inf += (special & !m) as u64;
                nan += (special & m) as u64;
            }
        }
        Dtype::F64 => {
            for b in out.chunks_exact(8) {
                let v = f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
                inf += v.is_infinite() as u64;
                nan += v.is_nan() as u64;
            }
        }
        _ => {}
    }
    (inf, nan)
}

/// Tells source infinities from overflow among the infinities of `out`.
fn classify_inf(from: Dtype, to: Dtype, src: &[u8], out: &[u8], stats: &mut CastStats) {
    let s = to.size();
    for (i, b) in out.chunks_exact(s).enumerate() {
        let is_inf = match to {
            Dtype::F16 => (u16::from_le_bytes([b[0], b[1]]) & 0x7fff) == 0x7c00,
            Dtype::Bf16 => (u16::from_le_bytes([b[0], b[1]]) & 0x7fff) == 0x7f80,
            Dtype::F32 => {
                (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff) == 0x7f80_0000
            }
            _ => false,
        };
        if is_inf {
            let v = src_value(from, src, i);
            if v.is_finite() {
                stats.overflow += 1;
                stats.max_overflow = stats.max_overflow.max(v.abs());
            } else {
                stats.inf += 1;
            }
        }
    }
}

/// Casts one piece sequentially, chunk by chunk, feeding each output chunk to `hash`
/// while it is still in cache. `src.len() / from.size() == dst.len() / to.size()`.
fn cast_piece(
    from: Dtype,
    to: Dtype,
    src: &[u8],
    dst: &mut [u8],
    mut hash: Option<&mut Xxh3>,
) -> CastStats {
    let mut stats = CastStats::default();
    let (fs, ts) = (from.size(), to.size());
    if from == to || !from.is_castable_float() || !to.is_castable_float() {
        for (s, d) in src.chunks(CHUNK * 8).zip(dst.chunks_mut(CHUNK * 8)) {
            d.copy_from_slice(s);
            let (inf, nan) = scan_special(to, d);
            stats.inf += inf;
            stats.nan += nan;
            if let Some(h) = hash.as_deref_mut() {
                h.update(d);
            }
        }
        return stats;
    }
    let mut f = [0f32; CHUNK];
    for (s, d) in src.chunks(CHUNK * fs).zip(dst.chunks_mut(CHUNK * ts)) {
        let n = s.len() / fs;
        match (from, to) {
            (Dtype::F64, Dtype::F16) => {
                for (o, b) in d.chunks_exact_mut(2).zip(s.chunks_exact(8)) {
                    let v = f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
                    o.copy_from_slice(&f16::from_f32(f64_to_f32_odd(v)).to_le_bytes());
                }
            }
            (Dtype::F64, Dtype::Bf16) => {
                for (o, b) in d.chunks_exact_mut(2).zip(s.chunks_exact(8)) {
                    let v = f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
                    o.copy_from_slice(&f32_to_bf16_bits(f64_to_f32_odd(v).to_bits()).to_le_bytes());
                }
            }
            // Straight from the mapping into the output, any alignment.
            (Dtype::F32, Dtype::F16) => f32_bytes_to_f16(s, d),
            // bf16 (the only other source left) widens exactly to f32 first.
            (_, Dtype::F16) => {
                let f = &mut f[..n];
                load_f32(from, s, f);
                f32_bytes_to_f16(bytemuck::cast_slice(f), d);
            }
            (_, Dtype::Bf16) => {
                let f = &mut f[..n];
                load_f32(from, s, f);
                for (o, v) in d.chunks_exact_mut(2).zip(f.iter()) {
                    o.copy_from_slice(&f32_to_bf16_bits(v.to_bits()).to_le_bytes());
                }
            }
            (_, Dtype::F32) => {
                let f = &mut f[..n];
                load_f32(from, s, f);
                for (o, v) in d.chunks_exact_mut(4).zip(f.iter()) {
                    o.copy_from_slice(&v.to_le_bytes());
                }
            }
            (_, Dtype::F64) => {
                for (i, o) in d.chunks_exact_mut(8).enumerate() {
                    o.copy_from_slice(&src_value(from, s, i).to_le_bytes());
                }
            }
            _ => d.copy_from_slice(s),
        }
        let (inf, nan) = scan_special(to, d);
        stats.nan += nan;
        if inf > 0 {
            classify_inf(from, to, s, d, &mut stats);
        }
        if let Some(hs) = hash.as_deref_mut() {
            hs.update(d);
        }
    }
    stats
}

/// Casts sequentially, feeding the output bytes to `hash` chunk by chunk as they are
/// produced (while they are in cache). The writer uses it: row groups already run in
/// parallel, and a row can be cast in pieces that continue the same hash.
///
/// Returns `None` when the lengths do not describe the same number of elements.
pub fn cast_hashing(
    from: Dtype,
    to: Dtype,
    src: &[u8],
    dst: &mut [u8],
    hash: &mut Xxh3,
) -> Option<CastStats> {
    let (fs, ts) = (from.size(), to.size());
    if !src.len().is_multiple_of(fs)
        || !dst.len().is_multiple_of(ts)
        || src.len() / fs != dst.len() / ts
    {
        return None;
    }
    Some(cast_piece(from, to, src, dst, Some(hash)))
}

/// [`cast_hashing`] of a whole row: the stats and the XXH3-64 of the output.
pub fn cast_and_hash(
    from: Dtype,
    to: Dtype,
    src: &[u8],
    dst: &mut [u8],
) -> Option<(CastStats, u64)> {
    let mut h = Xxh3::new();
    let stats = cast_hashing(from, to, src, dst, &mut h)?;
    Some((stats, h.digest()))
}

/// Casts `src` (elements of `from`) into `dst` (elements of `to`), splitting large
/// inputs over rayon tasks.
///
/// Returns `None` when the lengths do not describe the same number of elements.
pub fn cast_into(from: Dtype, to: Dtype, src: &[u8], dst: &mut [u8]) -> Option<CastStats> {
    let (fs, ts) = (from.size(), to.size());
    if !src.len().is_multiple_of(fs)
        || !dst.len().is_multiple_of(ts)
        || src.len() / fs != dst.len() / ts
    {
        return None;
    }
    if src.len() < PAR_BYTES {
        return Some(cast_piece(from, to, src, dst, None));
    }
    let per = (PAR_BYTES / 2 / fs).max(1);
    let stats = src
        .par_chunks(per * fs)
        .zip(dst.par_chunks_mut(per * ts))
        .map(|(s, d)| cast_piece(from, to, s, d, None))
        .reduce(CastStats::default, |mut a, b| {
            a.merge(&b);
            a
        });
    Some(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_f32(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn f32_to_f16_matches_half_bit_for_bit() {
        let mut v: Vec<f32> = (0..100_000)
            .map(|i| ((i as f32) * 0.7431).sin() * 70000.0 / (1.0 + i as f32 % 97.0))
            .collect();
        v.extend([
            0.0,
            -0.0,
            1e-8,
            -1e-8,
            65504.0,
            65519.99,
            6.1e-5,
            5.96e-8,
            f32::MIN_POSITIVE,
        ]);
        let src = bytes_f32(&v);
        let mut dst = vec![0u8; v.len() * 2];
        let st = cast_into(Dtype::F32, Dtype::F16, &src, &mut dst).unwrap();
        for (i, x) in v.iter().enumerate() {
            let got = u16::from_le_bytes([dst[2 * i], dst[2 * i + 1]]);
            assert_eq!(got, f16::from_f32(*x).to_bits(), "element {i} = {x}");
        }
        let expected = v.iter().filter(|x| x.abs() >= 65520.0).count() as u64;
        assert!(expected > 0);
        assert_eq!(st.overflow, expected);
    }

    #[test]
    fn overflow_nan_inf_counted() {
        let v = [
            1.0f32,
            65520.0,
            -1e5,
            f32::INFINITY,
            f32::NAN,
            f32::NEG_INFINITY,
            65519.0,
        ];
        let src = bytes_f32(&v);
        let mut dst = vec![0u8; v.len() * 2];
        let st = cast_into(Dtype::F32, Dtype::F16, &src, &mut dst).unwrap();
        assert_eq!(
            st,
            CastStats {
                nan: 1,
                inf: 2,
                overflow: 2,
                max_overflow: 1e5
            }
        );
    }

    #[test]
    fn bf16_to_f16_widens_then_rounds_once() {
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let src: Vec<u8> = all.iter().flat_map(|b| b.to_le_bytes()).collect();
        let mut dst = vec![0u8; src.len()];
        let st = cast_into(Dtype::Bf16, Dtype::F16, &src, &mut dst).unwrap();
        let mut overflow = 0;
        for (i, b) in all.iter().enumerate() {
            let x = bf16::from_bits(*b);
            let want = f16::from_f32(x.to_f32());
            let got = f16::from_bits(u16::from_le_bytes([dst[2 * i], dst[2 * i + 1]]));
            if x.is_nan() {
                assert!(got.is_nan());
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "bf16 bits {b:#x}");
                overflow += (x.is_finite() && got.is_infinite()) as u64;
            }
        }
        assert_eq!(st.overflow, overflow);
        assert_eq!(st.inf, 2);
    }

    #[test]
    fn f32_to_bf16_matches_half() {
        let v: Vec<f32> = (0..200_000u32)
            .map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761)))
            .collect();
        let src = bytes_f32(&v);
        let mut dst = vec![0u8; v.len() * 2];
        cast_into(Dtype::F32, Dtype::Bf16, &src, &mut dst).unwrap();
        for (i, x) in v.iter().enumerate() {
            assert_eq!(
                u16::from_le_bytes([dst[2 * i], dst[2 * i + 1]]),
                bf16::from_f32(*x).to_bits(),
                "{x}"
            );
        }
    }

    #[test]
    fn f64_rounds_to_nearest_even_where_half_does_not() {
        // Worked by hand: bf16 near 208 steps by 1, so -208.50004... (past the
        // midpoint) is -209 = 0xc351 (`half` gives -208); f16 near 2.5e-4 steps by
        // 2^-22, and 2.5022029337317374e-4 is below the midpoint 1049.5 × 2^-22 =
        // 2.5022029876708984375e-4, so 1049 × 2^-22 = 0x0c19 (`half` gives 0x0c1a);
        // f32 0xfbfc8002 widened is past the bf16 midpoint 0xfbfc8000: 0xfbfd.
        let cases: [(f64, Dtype, u16); 4] = [
            (-208.50004374239953, Dtype::Bf16, 0xc351),
            (2.5022029337317374e-4, Dtype::F16, 0x0c19),
            (f32::from_bits(0xfbfc_8002) as f64, Dtype::Bf16, 0xfbfd),
            (-(2.0f64.powi(-150)), Dtype::F16, 0x8000),
        ];
        for (v, to, want) in cases {
            let mut dst = [0u8; 2];
            cast_into(Dtype::F64, to, &v.to_le_bytes(), &mut dst).unwrap();
            assert_eq!(u16::from_le_bytes(dst), want, "{v:e} to {to}");
        }
    }

    #[test]
    fn f64_rounds_once_and_ints_copy() {
        let v = [1.0f64 + 2f64.powi(-11) + 2f64.powi(-40), 3.0e5, -2.5];
        let src: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut dst = vec![0u8; 6];
        let st = cast_into(Dtype::F64, Dtype::F16, &src, &mut dst).unwrap();
        // 1 + 2^-11 + 2^-40 is just above the midpoint of 1 and 1 + 2^-10: up.
        assert_eq!(u16::from_le_bytes([dst[0], dst[1]]), 0x3c01);
        assert_eq!(st.overflow, 1);
        let ints = [7u8, 1, 2, 3, 4, 5, 6, 7];
        let mut out = [0u8; 8];
        cast_into(Dtype::I64, Dtype::I64, &ints, &mut out).unwrap();
        assert_eq!(ints, out);
        assert!(cast_into(Dtype::F32, Dtype::F16, &[0; 8], &mut [0; 2]).is_none());
    }

    #[test]
    fn streamed_hash_equals_one_shot_and_unaligned_offsets_cast_the_same() {
        let v: Vec<f32> = (0..50_001)
            .map(|i| (i as f32).sqrt() * 0.01 - 1.0)
            .collect();
        let mut src = vec![0u8; 1];
        src.extend(bytes_f32(&v));
        let mut dst = vec![0u8; v.len() * 2 + 1];
        // Both sides misaligned by one byte.
        let (st, hash) = cast_and_hash(Dtype::F32, Dtype::F16, &src[1..], &mut dst[1..]).unwrap();
        assert_eq!(st, CastStats::default());
        assert_eq!(hash, xxhash_rust::xxh3::xxh3_64(&dst[1..]));
        for (i, x) in v.iter().enumerate() {
            assert_eq!(
                u16::from_le_bytes([dst[1 + 2 * i], dst[2 + 2 * i]]),
                f16::from_f32(*x).to_bits()
            );
        }
        let ints: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let mut out = vec![0u8; ints.len()];
        let (_, hash) = cast_and_hash(Dtype::U8, Dtype::U8, &ints, &mut out).unwrap();
        assert_eq!(out, ints);
        assert_eq!(hash, xxhash_rust::xxh3::xxh3_64(&ints));
    }

    #[test]
    fn large_rows_split_over_tasks_same_result() {
        let n = (PAR_BYTES / 4) * 3 + 17;
        let v: Vec<f32> = (0..n).map(|i| (i as f32) * 0.37 - 1e5).collect();
        let src = bytes_f32(&v);
        let mut dst = vec![0u8; n * 2];
        let st = cast_into(Dtype::F32, Dtype::F16, &src, &mut dst).unwrap();
        let expect_over = v.iter().filter(|x| x.abs() >= 65520.0).count() as u64;
        assert_eq!(st.overflow, expect_over);
        for i in (0..n).step_by(997) {
            assert_eq!(
                u16::from_le_bytes([dst[2 * i], dst[2 * i + 1]]),
                f16::from_f32(v[i]).to_bits()
            );
        }
    }
}
