//! AWQ (GEMM): `qweight` `[in, out/8]` of 4-bit codes in AWQ's nibble order, 4-bit
//! zero points and scales per group of inputs, dequantized to `[out, in]`: each piece's
//! columns of words transposed, then one output row per nibble position. The
//! description is `source/scheme/awq.rs`'s [`Awq`].

#[cfg(target_arch = "x86_64")]
use super::simd::avx2;
use super::{bits::words, row_groups, transposed, Bufs, Decode, Reader, Release, Sink};
use crate::error::Result;
use crate::plan::Carry;
use crate::source::scheme::Awq;

impl Decode for Awq {
    fn fill(
        &self,
        r: &Reader,
        first: u64,
        count: u64,
        bufs: &mut Bufs,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        transposed(first, count, out, r.d.info.shape[1], |o0, o1, tile| {
            awq(r, self, o0, o1, bufs, tile)
        })
    }

    /// 4-bit codes in groups of inputs that tile the rows.
    fn carry(&self, _r: &Reader) -> std::result::Result<Carry, String> {
        let group = row_groups(self.group, self.inputs.max(1))?;
        Ok(Carry { group, bits: 4 })
    }

    /// Output `o`, input `i`: nibble `n` (`AWQ_ORDER[n] == o % 8`) of word `[i, o / 8]`,
    /// its group's zero point the same nibble of `qzeros[k, o / 8]`; codes and zero
    /// points shifted by 8.
    fn codes(
        &self,
        r: &Reader,
        first: u64,
        count: u64,
        bufs: &mut Bufs,
        sink: &mut Sink,
    ) -> Result<()> {
        let [qb, sb, zb, _] = bufs;
        let (ins, outs) = (self.inputs.max(1), self.outputs);
        let wpr = outs / 8;
        let (o0, o1) = (first / ins, (first + count).div_ceil(ins));
        let zall: Vec<u32> = words(r.bytes(self.qzeros, 0, r.info(self.qzeros).len, zb)?).collect();
        // The stored words, read in place (a piece reads every stored row).
        let qall = r.bytes_read(self.qweight, 0, r.info(self.qweight).len, qb, o0 == 0)?;
        let word = |k: u64| {
            let at = (k * 4) as usize;
            u32::from_le_bytes([qall[at], qall[at + 1], qall[at + 2], qall[at + 3]])
        };
        let mut srow = Vec::new();
        for o in o0..o1 {
            let (c, n) = (
                o / 8,
                AWQ_ORDER.iter().position(|&x| x == o % 8).unwrap_or(0),
            );
            let shift = 4 * n as u32;
            let i0 = first.max(o * ins) - o * ins;
            let i1 = (first + count).min((o + 1) * ins) - o * ins;
            let mut i = i0;
            while i < i1 {
                // A run of one group.
                let k = i / self.group;
                let ge = ((k + 1) * self.group).min(i1);
                r.scales(self.scales, k * outs + o, 1, sb, &mut srow)?;
                let z = (zall[(k * wpr + c) as usize] >> shift) & 15;
                if let Some(q) = sink.run((ge - i) as usize, srow[0], (z as i32 - 8) as f32) {
                    for (j, q) in (i..).zip(q.iter_mut()) {
                        *q = (((word(j * wpr + c) >> shift) & 15) as i32 - 8) as i8 as u8;
                    }
                }
                i = ge;
            }
        }
        Ok(())
    }

    /// Every component, with the last piece (each piece reads every stored row).
    unsafe fn release(&self, p: &Release) {
        if p.last {
            for c in [self.qweight, self.qzeros, self.scales] {
                // SAFETY: forwarded to the caller.
                unsafe { p.whole(c) }
            }
        }
    }
}

/// AWQ's packing order: nibble `n` of a word holds output column `8c + AWQ_ORDER[n]`.
const AWQ_ORDER: [u64; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// AWQ (GEMM): output rows `[o0, o1)` (`[out, in]`) into `tile`.
fn awq(r: &Reader, a: &Awq, o0: u64, o1: u64, bufs: &mut Bufs, tile: &mut [f32]) -> Result<()> {
    let [qb, sb, zb, _] = bufs;
    let (ins, outs) = (a.inputs, a.outputs);
    let wpr = outs / 8;
    let (c0, c1) = (o0 / 8, o1.div_ceil(8));
    let width = ((c1 - c0) * 8) as usize;
    // Scales and zeros of every group for the columns of words [c0, c1).
    let mut scale = Vec::with_capacity(a.groups as usize * width);
    let mut zero = vec![0f32; a.groups as usize * width];
    let mut row = Vec::new();
    let zt = r.info(a.qzeros);
    let zall: Vec<u32> = words(r.bytes(a.qzeros, 0, zt.len, zb)?).collect();
    for k in 0..a.groups {
        r.scales(a.scales, k * outs + c0 * 8, (c1 - c0) * 8, sb, &mut row)?;
        scale.extend_from_slice(&row);
        for c in c0..c1 {
            let w = zall[(k * wpr + c) as usize];
            for (n, &col) in AWQ_ORDER.iter().enumerate() {
                let at = k as usize * width + ((c - c0) * 8 + col) as usize;
                zero[at] = ((w >> (4 * n)) & 15) as f32;
            }
        }
    }
    let qt = r.info(a.qweight);
    let all = r.bytes_read(a.qweight, 0, qt.len, qb, o0 == 0)?;
    // The piece's columns of words, transposed: `cols[c − c0][i]`, each stored row's
    // words of the piece read once, in order.
    let (nc, n_in) = ((c1 - c0) as usize, ins as usize);
    let mut cols = vec![0u32; nc * n_in];
    for i in 0..n_in {
        let at = ((i as u64 * wpr + c0) * 4) as usize;
        for (j, b) in all[at..at + nc * 4].chunks_exact(4).enumerate() {
            cols[j * n_in + i] = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    }
    let groups = a.groups as usize;
    let (mut srow, mut zrow) = (vec![0f32; groups], vec![0f32; groups]);
    for c in c0..c1 {
        let col = &cols[(c - c0) as usize * n_in..][..n_in];
        for (n, &cc) in AWQ_ORDER.iter().enumerate() {
            let o = c * 8 + cc;
            if o < o0 || o >= o1 {
                continue;
            }
            let x = ((c - c0) * 8 + cc) as usize;
            for k in 0..groups {
                (srow[k], zrow[k]) = (scale[k * width + x], zero[k * width + x]);
            }
            let out = &mut tile[((o - o0) * ins) as usize..][..n_in];
            let (shift, group) = (4 * n as u32, a.group as usize);
            #[cfg(target_arch = "x86_64")]
            if avx2() {
                // SAFETY: the CPU has AVX2 (checked at run time).
                unsafe { awq_row_avx2(col, shift, group, &srow, &zrow, out) };
                continue;
            }
            awq_row(col, shift, group, &srow, &zrow, out);
        }
    }
    Ok(())
}

/// One AWQ output row: `out[i] = (nibble (shift / 4) of col[i] − z) × s` in f32, with
/// group `i / group`'s `s` and `z` (the loop vectorizes: one shift for the row).
#[inline(always)]
fn awq_row(col: &[u32], shift: u32, group: usize, s: &[f32], z: &[f32], out: &mut [f32]) {
    let runs = out.chunks_mut(group.max(1)).zip(col.chunks(group.max(1)));
    for ((o, c), (&sv, &zv)) in runs.zip(s.iter().zip(z)) {
        for (v, &w) in o.iter_mut().zip(c) {
            *v = (((w >> shift) & 15) as f32 - zv) * sv;
        }
    }
}

/// [`awq_row`] compiled for AVX2 (eight lanes).
///
/// # Safety
///
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn awq_row_avx2(
    col: &[u32],
    shift: u32,
    group: usize,
    s: &[f32],
    z: &[f32],
    out: &mut [f32],
) {
    awq_row(col, shift, group, s, z, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An AWQ row, scalar and with AVX2, against the formula: every nibble position,
    /// groups of 32 and 20 (the last one short) and one group for the row.
    #[test]
    fn awq_row_equals_the_formula() {
        let col: Vec<u32> = (0..100u32)
            .map(|i| i.wrapping_mul(0x9E37_79B9) ^ (i << 7))
            .collect();
        for group in [32usize, 20, 100] {
            let groups = col.len().div_ceil(group);
            let s: Vec<f32> = (0..groups).map(|k| 1e-3 * (k as f32 + 1.5)).collect();
            let z: Vec<f32> = (0..groups).map(|k| (k * 5 % 16) as f32).collect();
            for n in 0..8u32 {
                let mut rows = vec![vec![f32::NAN; col.len()]];
                awq_row(&col, 4 * n, group, &s, &z, &mut rows[0]);
                #[cfg(target_arch = "x86_64")]
                if avx2() {
                    rows.push(vec![f32::NAN; col.len()]);
                    // SAFETY: AVX2 is present (checked).
                    unsafe { awq_row_avx2(&col, 4 * n, group, &s, &z, &mut rows[1]) };
                }
                for out in &rows {
                    for (i, v) in out.iter().enumerate() {
                        let q = (col[i] >> (4 * n)) & 15;
                        let want = (q as f32 - z[i / group]) * s[i / group];
                        assert_eq!(
                            v.to_bits(),
                            want.to_bits(),
                            "group {group} nibble {n} value {i}"
                        );
                    }
                }
            }
        }
    }
}
