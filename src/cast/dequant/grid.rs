//! Codes on a grid of scales (FP8 E4M3, E5M2 and their FNUZ variants, and int8):
//! `(q − zero) × scale` elementwise, a run of one scale at a time; an F8 E4M3 grid
//! without zero points also straight into f16 bits. The description is
//! `source/scheme/grid.rs`'s [`Grid`] (made by the FP8 and compressed-tensors
//! families).

use std::sync::OnceLock;

use half::f16;

#[cfg(target_arch = "x86_64")]
use super::half::count as count_special;
use super::half::Half;
#[cfg(target_arch = "x86_64")]
use super::simd::f16c;
use super::{row_groups, Bufs, Decode, Reader, Release, Sink};
use crate::cast::CastStats;
use crate::dtype::Dtype;
use crate::error::Result;
use crate::plan::Carry;
use crate::source::scheme::Grid;

impl Decode for Grid {
    fn fill(
        &self,
        r: &Reader,
        first: u64,
        count: u64,
        bufs: &mut Bufs,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        out.clear();
        grid(r, self, first, count, bufs, out)
    }

    /// An F8 E4M3 grid without zero points into f16 ([`grid_f16`]), where the CPU has
    /// AVX2 and F16C.
    fn fill_half(
        &self,
        r: &Reader,
        to: Half,
        (first, count): (u64, u64),
        bufs: &mut Bufs,
        dst: &mut [u8],
    ) -> Result<Option<CastStats>> {
        #[cfg(target_arch = "x86_64")]
        if to == Half::F16 && self.zero.is_none() && r.info(self.q).dtype == Dtype::F8E4M3 && f16c()
        {
            return grid_f16(r, self, first, count, bufs, dst).map(Some);
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (r, to, first, count, bufs, dst);
        Ok(None)
    }

    /// int8 codes (compressed-tensors `int-quantized`, `naive-quantized`) per tensor,
    /// per channel or in groups of a row; FP8 codes are not integers.
    fn carry(&self, r: &Reader) -> std::result::Result<Carry, String> {
        let dt = r.info(self.q).dtype;
        if dt != Dtype::I8 {
            return Err(format!("{dt} codes"));
        }
        let (br, bc) = self.block;
        let group = match self.per_tensor {
            // One scale, repeated for every row.
            true => self.cols.max(1),
            false if br == 1 => row_groups(bc, self.cols.max(1))?,
            false => return Err(format!("blocks of {br}×{bc} span several rows")),
        };
        Ok(Carry { group, bits: 8 })
    }

    fn codes(
        &self,
        r: &Reader,
        first: u64,
        count: u64,
        bufs: &mut Bufs,
        sink: &mut Sink,
    ) -> Result<()> {
        grid_runs(r, self, first, count, bufs, |src, s, z| {
            if let Some(q) = sink.run(src.len(), s, z.unwrap_or(0.0)) {
                q.copy_from_slice(src);
            }
        })
    }

    /// The codes of the piece; the scales and zero points with the last piece.
    unsafe fn release(&self, p: &Release) {
        // SAFETY: forwarded to the caller.
        unsafe {
            p.bytes(self.q, p.first, p.end - p.first);
            if p.last {
                [Some(self.scale), self.zero]
                    .into_iter()
                    .flatten()
                    .for_each(|r| p.whole(r));
            }
        }
    }
}

/// An 8-bit float decoded exactly: sign, exponent of `ebits` with `bias`, mantissa of
/// `mbits`; `fnuz` types have no negative zero (0x80 is their NaN) and no infinity.
fn decode_f8(b: u8, ebits: u32, mbits: u32, bias: i32, kind: Dtype) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let e = ((b >> mbits) & ((1 << ebits) - 1) as u8) as i32;
    let m = (b & ((1 << mbits) - 1) as u8) as f32;
    let emax = (1 << ebits) - 1;
    match kind {
        Dtype::F8E4M3 if e == emax && m as u32 == (1 << mbits) - 1 => return f32::NAN,
        Dtype::F8E5M2 if e == emax => {
            return if m == 0.0 {
                sign * f32::INFINITY
            } else {
                f32::NAN
            }
        }
        Dtype::F8E4M3Fnuz | Dtype::F8E5M2Fnuz if b == 0x80 => return f32::NAN,
        _ => {}
    }
    let frac = m / (1 << mbits) as f32;
    let v = if e == 0 {
        frac * 2f32.powi(1 - bias)
    } else {
        (1.0 + frac) * 2f32.powi(e - bias)
    };
    sign * v
}

/// The 256 values of an 8-bit code type as f32 (exact); integers as themselves.
pub(super) fn table(d: Dtype) -> &'static [f32; 256] {
    static T: OnceLock<[[f32; 256]; 6]> = OnceLock::new();
    let all = T.get_or_init(|| {
        let mut t = [[0f32; 256]; 6];
        for b in 0..=255u8 {
            let i = b as usize;
            t[0][i] = decode_f8(b, 4, 3, 7, Dtype::F8E4M3);
            t[1][i] = decode_f8(b, 5, 2, 15, Dtype::F8E5M2);
            t[2][i] = decode_f8(b, 4, 3, 8, Dtype::F8E4M3Fnuz);
            t[3][i] = decode_f8(b, 5, 2, 16, Dtype::F8E5M2Fnuz);
            t[4][i] = b as i8 as f32;
            t[5][i] = b as f32;
        }
        t
    });
    match d {
        Dtype::F8E4M3 => &all[0],
        Dtype::F8E5M2 => &all[1],
        Dtype::F8E4M3Fnuz => &all[2],
        Dtype::F8E5M2Fnuz => &all[3],
        Dtype::I8 => &all[4],
        _ => &all[5],
    }
}

/// `(q − zero) × scale` with one scale per block of a grid.
fn grid(
    r: &Reader,
    g: &Grid,
    first: u64,
    count: u64,
    bufs: &mut Bufs,
    out: &mut Vec<f32>,
) -> Result<()> {
    let lut = table(r.info(g.q).dtype);
    out.reserve(count as usize);
    grid_runs(r, g, first, count, bufs, |src, s, z| match z {
        None => out.extend(src.iter().map(|&b| lut[b as usize] * s)),
        Some(z) => out.extend(src.iter().map(|&b| (lut[b as usize] - z) * s)),
    })
}

/// Elements `[first, first + count)` of an F8 E4M3 grid without zero points, straight
/// into `dst` as f16 bits: each code widened to f32 by its bit fields (with AVX2 and
/// F16C), times its scale in f32, rounded to nearest even by F16C: [`grid`]'s values
/// and the cast's rounding, without the f32 buffer between them. Returns what the cast
/// would have counted (NaN codes, overflow).
#[cfg(target_arch = "x86_64")]
fn grid_f16(
    r: &Reader,
    g: &Grid,
    first: u64,
    count: u64,
    bufs: &mut Bufs,
    dst: &mut [u8],
) -> Result<CastStats> {
    // The runs of one scale first, then one call for the piece: short blocks (MXFP8's
    // 32 codes) would otherwise pay a call each.
    let (q, sv, _) = grid_piece(r, g, first, count, bufs)?;
    let mut runs = Vec::new();
    for_runs(g, first, count, |n, k| runs.push((n, sv[k])));
    // SAFETY: `fill_half` takes this path only where the CPU has AVX2 and F16C.
    let special = unsafe { e4m3_f16_runs(q, &runs, dst) };
    let mut stats = CastStats::default();
    if special {
        // A NaN code or an overflow somewhere: count them as the cast does, from the
        // values.
        let lut = table(Dtype::F8E4M3);
        let mut i = 0usize;
        grid_runs(r, g, first, count, bufs, |src, s, _| {
            for &b in src {
                let h = u16::from_le_bytes([dst[2 * i], dst[2 * i + 1]]);
                count_special(lut[b as usize] * s, h, Half::F16, &mut stats);
                i += 1;
            }
        })?;
    }
    Ok(stats)
}

/// Runs `run(codes, scale, zero)` over elements `[first, first + count)` of a grid in
/// order, a run of one scale (to the end of its block or of the range) at a time.
fn grid_runs(
    r: &Reader,
    g: &Grid,
    first: u64,
    count: u64,
    bufs: &mut Bufs,
    mut run: impl FnMut(&[u8], f32, Option<f32>),
) -> Result<()> {
    let (q, sv, zv) = grid_piece(r, g, first, count, bufs)?;
    let mut qi = 0usize;
    for_runs(g, first, count, |n, k| {
        run(&q[qi..qi + n], sv[k], zv.get(k).copied());
        qi += n;
    });
    Ok(())
}

/// What elements `[first, first + count)` of a grid read: their codes, and the scales
/// (and zero points) of the grid cells from the first one's on.
fn grid_piece<'a: 'b, 'b>(
    r: &Reader<'a>,
    g: &Grid,
    first: u64,
    count: u64,
    bufs: &'b mut Bufs,
) -> Result<(&'b [u8], Vec<f32>, Vec<f32>)> {
    let [qb, sb, zb, _] = bufs;
    let q = r.bytes(g.q, first, count, qb)?;
    let (s0, s1) = match g.per_tensor {
        true => (0, 1),
        false => (cell(g, first), cell(g, first + count - 1) + g.grid.1),
    };
    let mut sv = Vec::with_capacity((s1 - s0) as usize);
    r.scales(g.scale, s0, s1 - s0, sb, &mut sv)?;
    let mut zv = Vec::new();
    if let Some(z) = g.zero {
        r.scales(z, s0, s1 - s0, zb, &mut zv)?;
    }
    Ok((q, sv, zv))
}

/// The first scale entry of element `e`'s row of blocks (0 per tensor).
fn cell(g: &Grid, e: u64) -> u64 {
    if g.per_tensor {
        return 0;
    }
    let (rows, cols) = (g.rows.max(1), g.cols.max(1));
    let mat = rows * cols;
    let (b, rr) = (e / mat, (e % mat) / cols);
    (b * g.grid.0 + rr / g.block.0) * g.grid.1
}

/// Runs `run(n, k)` over elements `[first, first + count)` of a grid in order: `n`
/// elements of one scale (to the end of its block or of the range), scale entry `k`
/// counted from [`grid_piece`]'s first.
fn for_runs(g: &Grid, first: u64, count: u64, mut run: impl FnMut(usize, usize)) {
    let cols = g.cols.max(1);
    let bc = g.block.1.max(1);
    let s0 = cell(g, first);
    let mut e = first;
    let end = first + count;
    while e < end {
        // A row at a time (its divisions once): the first run to the end of its
        // block, then whole blocks, each the next scale.
        let c = e % cols;
        let row_end = end.min(e - c + cols);
        let mut k = (cell(g, e) - s0 + c / bc) as usize;
        let mut n = (bc - c % bc).min(row_end - e);
        loop {
            run(n as usize, if g.per_tensor { 0 } else { k });
            e += n;
            if e >= row_end {
                break;
            }
            k += 1;
            n = bc.min(row_end - e);
        }
    }
}

/// [`e4m3_f16_run`] over consecutive runs `(codes, scale)` of `q`, into `out` in
/// order. Returns true when some output is infinite or NaN.
///
/// # Safety
///
/// The CPU must support AVX2 and F16C. Panics when the runs pass the end of `q` or
/// `out` is shorter than `2 · q.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn e4m3_f16_runs(q: &[u8], runs: &[(usize, f32)], out: &mut [u8]) -> bool {
    let mut at = 0usize;
    let mut special = false;
    for &(n, s) in runs {
        // SAFETY: the caller's.
        special |= unsafe { e4m3_f16_run(&q[at..at + n], s, &mut out[2 * at..2 * (at + n)]) };
        at += n;
    }
    special
}

/// F8 E4M3 codes times `s`, as f16 bits into `out` (2 bytes a code), eight at a time:
/// a normal code's f32 bits are its own shifted into place with the exponent rebased
/// (`(b & 0x7f) << 20` plus 120 exponent steps), a subnormal's its mantissa times 2^-9,
/// `0x7f` NaN (positive, as the table has it), the sign bit its own. Returns true when
/// some output is infinite or NaN.
///
/// # Safety
///
/// The CPU must support AVX2 and F16C. Panics when `out` is shorter than `2 ·
/// q.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn e4m3_f16_run(q: &[u8], s: f32, out: &mut [u8]) -> bool {
    use std::arch::x86_64::*;
    let out = &mut out[..q.len() * 2];
    let full = q.len() / 8 * 8;
    let mut special = 0i32;
    // SAFETY: loads of 8 bytes at q[i..i + 8] and stores of 16 bytes at out[2i..2i +
    // 16] for i + 8 <= full <= q.len().
    unsafe {
        let sv = _mm256_set1_ps(s);
        let mag = _mm256_set1_epi32(0x7f);
        let rebase = _mm256_set1_epi32(120 << 23);
        let sub_scale = _mm256_set1_ps(1.0 / 512.0);
        let eight = _mm256_set1_epi32(8);
        let nan = _mm256_set1_epi32(0x7fc0_0000);
        let exp = _mm_set1_epi16(0x7c00);
        for i in (0..full).step_by(8) {
            let b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(q.as_ptr().add(i).cast()));
            let m = _mm256_and_si256(b, mag);
            let sign = _mm256_slli_epi32::<24>(_mm256_andnot_si256(mag, b));
            let normal = _mm256_add_epi32(_mm256_slli_epi32::<20>(m), rebase);
            let sub = _mm256_castps_si256(_mm256_mul_ps(_mm256_cvtepi32_ps(m), sub_scale));
            let is_sub = _mm256_cmpgt_epi32(eight, m);
            let v = _mm256_or_si256(_mm256_blendv_epi8(normal, sub, is_sub), sign);
            let v = _mm256_blendv_epi8(v, nan, _mm256_cmpeq_epi32(m, mag));
            let h = _mm256_cvtps_ph::<0>(_mm256_mul_ps(_mm256_castsi256_ps(v), sv));
            special |= _mm_movemask_epi8(_mm_cmpeq_epi16(_mm_and_si128(h, exp), exp));
            _mm_storeu_si128(out.as_mut_ptr().add(2 * i).cast(), h);
        }
    }
    let lut = table(Dtype::F8E4M3);
    for (o, &b) in out[2 * full..].chunks_exact_mut(2).zip(&q[full..]) {
        let h = f16::from_f32(lut[b as usize] * s).to_bits();
        special |= (h & 0x7c00 == 0x7c00) as i32;
        o.copy_from_slice(&h.to_le_bytes());
    }
    special != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_tables_match_their_definitions() {
        let e4 = table(Dtype::F8E4M3);
        assert_eq!(e4[0x7e], 448.0);
        assert_eq!(e4[0x01], 2f32.powi(-9));
        assert_eq!(e4[0x38], 1.0);
        assert_eq!(e4[0xb8], -1.0);
        assert!(e4[0x7f].is_nan() && e4[0xff].is_nan());
        assert_eq!(e4[0x80].to_bits(), (-0.0f32).to_bits());
        let e5 = table(Dtype::F8E5M2);
        assert_eq!(e5[0x7b], 57344.0);
        assert_eq!(e5[0x7c], f32::INFINITY);
        assert!(e5[0x7d].is_nan());
        assert_eq!(e5[0x01], 2f32.powi(-16));
        // Every E5M2 code is the top byte of the f16 with the same value.
        for b in 0..=255u8 {
            let h = f16::from_bits((b as u16) << 8).to_f32();
            let v = e5[b as usize];
            assert!(
                h.to_bits() == v.to_bits() || (h.is_nan() && v.is_nan()),
                "{b:#x}"
            );
        }
        let fnuz = table(Dtype::F8E4M3Fnuz);
        assert!(fnuz[0x80].is_nan());
        assert_eq!(fnuz[0x7f], 240.0);
        assert_eq!(table(Dtype::I8)[0xff], -1.0);
    }

    /// Every E4M3 code, in runs of 0 to 21 codes (the 8-wide loop and its tail), times
    /// scales that keep it finite, underflow it to f16 subnormals and zero, and overflow
    /// it: each output is the table's value times the scale rounded once by the `half`
    /// crate, and a run reports exactly when an output is infinite or NaN.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn e4m3_f16_run_equals_the_table_times_the_scale_rounded_once() {
        if !f16c() {
            eprintln!("skipped: no AVX2 and F16C on this CPU");
            return;
        }
        let lut = table(Dtype::F8E4M3);
        let codes: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
        for s in [
            1.0f32,
            3.7e-3,
            1.0 / 448.0,
            2.5e-7,
            1e-12,
            200.0,
            -0.75,
            0.0,
        ] {
            for len in 0..22usize {
                for q in codes
                    .chunks(len.max(1))
                    .take(if len == 0 { 1 } else { usize::MAX })
                {
                    let q = &q[..len.min(q.len())];
                    let mut out = vec![0xA5u8; q.len() * 2];
                    // SAFETY: AVX2 and F16C are present (checked above).
                    let special = unsafe { e4m3_f16_run(q, s, &mut out) };
                    let mut any = false;
                    for (i, &b) in q.iter().enumerate() {
                        let want = f16::from_f32(lut[b as usize] * s);
                        let got = u16::from_le_bytes([out[2 * i], out[2 * i + 1]]);
                        assert_eq!(got, want.to_bits(), "code {b:#04x} scale {s}");
                        any |= !want.is_finite();
                    }
                    assert_eq!(special, any, "{q:?} scale {s}");
                }
            }
        }
    }
}
