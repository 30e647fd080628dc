//! FP4 E2M1 codes with a scale per group of a row: NVFP4 (ModelOpt's
//! `weight_scale_2`, compressed-tensors' `weight_global_scale`) and compressed-tensors'
//! MXFP4. The stored layout is the output's, row-major `[R, C]` with two codes a byte
//! (element `2k` in the low nibble) and one scale per `group` values, so element `i`
//! is nibble `i` and takes scale `i / group`: a piece is a plain element range.
//!
//! The arithmetic is the references' in f32: a group's scale `S` is the stored scale
//! (F8_E4M3, exact in f32; E8M0 `2^(e − 127)`) times ModelOpt's global scale, or
//! divided by compressed-tensors' (bf16-rounded when that is stored 0-dim, as torch
//! promotes it), one rounding; each value is `fl(E2M1 × S)`, which the cast then rounds
//! once to the target. The description is `source/scheme/fp4.rs`'s [`Fp4`].

use half::bf16;

use super::bits::nibble_codes;
use super::half::{Codes, Half, Nibbles};
use super::{row_groups, Bufs, Decode, Reader, Release, Sink};
use crate::cast::CastStats;
use crate::error::Result;
use crate::plan::Carry;
use crate::source::scheme::{Fp4, Global};

/// The FP4 E2M1 values by nibble (bit 3 the sign; code 8 is −0, as compressed-tensors
/// and vLLM decode it; ModelOpt's table gives +0).
const E2M1: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Twice the E2M1 values by nibble: the integer codes a carried weight is written with.
const CODES2: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

impl Decode for Fp4 {
    fn fill(
        &self,
        r: &Reader,
        first: u64,
        count: u64,
        bufs: &mut Bufs,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        out.clear();
        out.reserve(count as usize);
        let (end, g, b0) = (first + count, self.group, first / 2);
        let (scales, codes) = self.piece(r, first, end, bufs)?;
        for (k, &s) in (first / g..).zip(&scales) {
            let (lo, hi) = (first.max(k * g), end.min((k + 1) * g));
            decode_run(codes, lo - b0 * 2, hi - lo, s, out);
        }
        Ok(())
    }

    /// Into f16 or bf16 directly: each group's 16 values `fl(E2M1 × S)` rounded once,
    /// then one lookup a nibble ([`Nibbles`]).
    fn fill_half(
        &self,
        r: &Reader,
        to: Half,
        (first, count): (u64, u64),
        bufs: &mut Bufs,
        dst: &mut [u8],
    ) -> Result<Option<CastStats>> {
        let (scales, codes) = self.piece(r, first, first + count, bufs)?;
        let n = Nibbles {
            lut: &E2M1,
            to,
            high_first: false,
        };
        let c = Codes {
            codes,
            nib0: first / 2 * 2,
            group: self.group,
            scales: &scales,
        };
        Ok(Some(n.write(&c, first, count, dst)))
    }

    /// Carried as codes `2·E2M1` (in [−12, 12]: 5 bits) with half the group's scale:
    /// `(2·E) × S/2` is `E × S` as a real number, so the seed loader's product rounds to
    /// the reference's `fl(E × S)` bit for bit (−0, code 8, becomes +0).
    fn carry(&self, _r: &Reader) -> std::result::Result<Carry, String> {
        let group = row_groups(self.group, self.cols.max(1))?;
        Ok(Carry { group, bits: 5 })
    }

    fn codes(
        &self,
        r: &Reader,
        first: u64,
        count: u64,
        bufs: &mut Bufs,
        sink: &mut Sink,
    ) -> Result<()> {
        let (end, g, b0) = (first + count, self.group, first / 2);
        let (scales, codes) = self.piece(r, first, end, bufs)?;
        for (k, &s) in (first / g..).zip(&scales) {
            let half = s * 0.5;
            if half * 2.0 != s {
                return Err(r.error(
                    self.scale,
                    format!(
                        "group {k}'s scale {s:e} is below 2^-125: halved it is not exact, so its codes cannot be carried into V2"
                    ),
                ));
            }
            let (lo, hi) = (first.max(k * g), end.min((k + 1) * g));
            sink.mark((hi - lo) as usize, half, 0.0);
        }
        // The codes of the whole piece at once: they do not depend on the scales.
        if let Some(q) = sink.take(count as usize) {
            let table = CODES2.map(|c| c as u8);
            nibble_codes(codes, (first - b0 * 2) as usize, count as usize, &table, q);
        }
        Ok(())
    }

    /// The codes and scales of the piece; the scales and the global scale whole with
    /// the last piece.
    unsafe fn release(&self, p: &Release) {
        let g = self.group;
        // SAFETY: forwarded to the caller.
        unsafe {
            p.bytes(self.packed, p.first / 2, p.end / 2 - p.first / 2);
            p.bytes(self.scale, p.first / g, p.end / g - p.first / g);
            if p.last {
                p.whole(self.scale);
                if let Some(t) = self.global.tensor() {
                    p.whole(t);
                }
            }
        }
    }
}

impl Fp4 {
    /// What the piece `[first, end)` reads: the scale `S` of each of its groups (the
    /// global scale applied), from group `first / group` on, and its code bytes from
    /// byte `first / 2` on.
    fn piece<'a: 'b, 'b>(
        &self,
        r: &Reader<'a>,
        first: u64,
        end: u64,
        bufs: &'b mut Bufs,
    ) -> Result<(Vec<f32>, &'b [u8])> {
        let [qb, sb, _, _] = bufs;
        let (g0, g1) = (first / self.group, (end - 1) / self.group + 1);
        let global = self.global_value(r, sb)?;
        let mut scales = Vec::with_capacity((g1 - g0) as usize);
        r.scales(self.scale, g0, g1 - g0, sb, &mut scales)?;
        // One loop per kind of global scale, which the compiler vectorizes (a division
        // per group of 16 cost compressed-tensors' NVFP4 7 % of its CPU time).
        match self.global {
            Global::None => {}
            Global::Mul(_) => scales.iter_mut().for_each(|s| *s *= global),
            Global::Div(_) => scales.iter_mut().for_each(|s| *s /= global),
            Global::DivBf16(_) => scales
                .iter_mut()
                .for_each(|s| *s = group_scale(*s, self.global, global)),
        }
        let b0 = first / 2;
        let codes = r.bytes(self.packed, b0, end.div_ceil(2) - b0, qb)?;
        Ok((scales, codes))
    }

    /// The global scale's value (1 without one): finite and not 0, or an error naming
    /// it.
    fn global_value(&self, r: &Reader, buf: &mut Vec<u8>) -> Result<f32> {
        let Some(t) = self.global.tensor() else {
            return Ok(1.0);
        };
        let b = r.bytes(t, 0, 4, buf)?;
        let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if v.is_finite() && v != 0.0 {
            return Ok(v);
        }
        Err(r.error(
            t,
            format!("the global scale is {v}; no weight is dequantized from a zero, NaN or infinite global scale"),
        ))
    }
}

/// A group's scale `S` from its stored scale `s` (as f32) and the global scale `g`.
#[inline]
fn group_scale(s: f32, global: Global, g: f32) -> f32 {
    match global {
        Global::None => s,
        Global::Mul(_) => s * g,
        Global::Div(_) => s / g,
        Global::DivBf16(_) => bf16::from_f32(s / g).to_f32(),
    }
}

/// Appends `n` values from nibble `at` of `codes` on, each `fl(E2M1 × s)`.
#[inline]
fn decode_run(codes: &[u8], at: u64, n: u64, s: f32, out: &mut Vec<f32>) {
    let table = E2M1.map(|v| v * s);
    let (mut i, end) = (at as usize, (at + n) as usize);
    if i % 2 == 1 && i < end {
        out.push(table[(codes[i / 2] >> 4) as usize]);
        i += 1;
    }
    let pairs = (end - i) / 2;
    for &b in &codes[i / 2..i / 2 + pairs] {
        out.push(table[(b & 15) as usize]);
        out.push(table[(b >> 4) as usize]);
    }
    i += pairs * 2;
    if i < end {
        out.push(table[(codes[i / 2] & 15) as usize]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::TensorRef;

    const T: TensorRef = TensorRef {
        shard: 0,
        tensor: 0,
    };

    #[test]
    fn nibbles_decode_low_first_from_any_start() {
        // Bytes 0x10, 0x32, ...: nibbles 0, 1, 2, 3, ... in element order.
        let codes: Vec<u8> = (0..8u8).map(|k| (2 * k) | ((2 * k + 1) << 4)).collect();
        for at in 0..16u64 {
            for n in 0..=16 - at {
                let mut out = Vec::new();
                decode_run(&codes, at, n, 2.0, &mut out);
                let want: Vec<u32> = (at..at + n)
                    .map(|i| (E2M1[i as usize] * 2.0).to_bits())
                    .collect();
                let got: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, want, "at {at} n {n}");
            }
        }
    }

    #[test]
    fn carried_codes_are_twice_the_e2m1_values() {
        for (c, &q) in CODES2.iter().enumerate() {
            assert_eq!(q as f32, E2M1[c] * 2.0, "code {c}");
        }
    }

    #[test]
    fn e2m1_is_the_ocp_table() {
        for c in 0..16u32 {
            let (s, e, m) = (c >> 3, (c >> 1) & 3, c & 1);
            let mag = if e == 0 {
                m as f32 * 0.5
            } else {
                (1.0 + m as f32 * 0.5) * 2f32.powi(e as i32 - 1)
            };
            let v = if s == 1 { -mag } else { mag };
            assert_eq!(E2M1[c as usize].to_bits(), v.to_bits(), "code {c}");
        }
    }

    #[test]
    fn group_scales_follow_each_producers_operation_order() {
        let (s, g) = (0.4375f32, 1237.6403f32);
        assert_eq!(group_scale(s, Global::None, 1.0), s);
        assert_eq!(
            group_scale(s, Global::Mul(T), g).to_bits(),
            (s * g).to_bits()
        );
        // A division, not a multiplication by the reciprocal: they differ here.
        let d = group_scale(s, Global::Div(T), g);
        assert_eq!(d.to_bits(), (s / g).to_bits());
        assert_ne!(d.to_bits(), (s * (1.0 / g)).to_bits());
        // 0-dim: the quotient rounded to bf16 (torch's own result for these values).
        let b = group_scale(s, Global::DivBf16(T), g);
        assert_eq!(b, 1.4453125 * 2f32.powi(-12));
        assert_eq!(b.to_bits() & 0xffff, 0);
    }
}
