//! GPTQ: `qweight` `[in·bits/32, out]` of 2, 3, 4 or 8-bit codes packed along the
//! input, zero points packed along the output, scales per group (or per `g_idx`
//! entry), dequantized to `[out, in]`: each output row from its own packed column,
//! eight 4-bit rows at a time with AVX2. The description is `source/scheme/gptq.rs`'s
//! [`Gptq`].

#[cfg(target_arch = "x86_64")]
use super::bits::int4_row_avx2;
use super::bits::{bitstream, nibble_codes, words};
use super::compressed_tensors::INT4_CODES;
#[cfg(target_arch = "x86_64")]
use super::simd::{avx2, transpose8_avx2};
use super::{integer_carry, transposed, Bufs, Decode, Reader, Release, Sink};
use crate::error::Result;
use crate::plan::Carry;
use crate::source::scheme::Gptq;

impl Decode for Gptq {
    fn fill(
        &self,
        r: &Reader,
        first: u64,
        count: u64,
        bufs: &mut Bufs,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        transposed(first, count, out, r.d.info.shape[1], |o0, o1, tile| {
            gptq(r, self, o0, o1, bufs, tile)
        })
    }

    /// Codes of 2 to 8 bits without a `g_idx` or with one in input order, in groups
    /// that tile the rows.
    fn carry(&self, r: &Reader) -> std::result::Result<Carry, String> {
        let groups = (self.groups, self.group);
        integer_carry(r, self.g_idx, groups, self.inputs, self.bits)
    }

    /// Each output row from its own packed column, codes and zero points shifted by
    /// `2^(bits − 1)` (the zero point with GPTQ v1's +1 already in it).
    fn codes(
        &self,
        r: &Reader,
        first: u64,
        count: u64,
        bufs: &mut Bufs,
        sink: &mut Sink,
    ) -> Result<()> {
        let ins = self.inputs.max(1);
        let (o0, o1) = (first / ins, (first + count).div_ceil(ins));
        let [qb, sb, zb, _] = bufs;
        let (scale, zero) = tile_params(r, self, (o0, o1), sb, zb)?;
        let all = r.bytes_read(self.qweight, 0, r.info(self.qweight).len, qb, o0 == 0)?;
        let wt = columns(all, self, o0, 0..(o1 - o0) as usize);
        let (packed, groups) = ((ins * self.bits as u64 / 32) as usize, self.groups as usize);
        let offset = 1i32 << (self.bits - 1);
        for o in o0..o1 {
            let oo = (o - o0) as usize;
            let w = &wt[oo * packed..(oo + 1) * packed];
            let i0 = first.max(o * ins) - o * ins;
            let i1 = (first + count).min((o + 1) * ins) - o * ins;
            let mut i = i0;
            while i < i1 {
                // A run of one group.
                let k = oo * groups + (i / self.group) as usize;
                let ge = ((i / self.group + 1) * self.group).min(i1);
                let n = (ge - i) as usize;
                if let Some(q) = sink.run(n, scale[k], zero[k] - offset as f32) {
                    if self.bits == 4 {
                        // The words' bytes in memory are their little-endian bytes (a
                        // big-endian host is refused when the source opens).
                        let wb: &[u8] = bytemuck::cast_slice(w);
                        nibble_codes(wb, i as usize, n, &INT4_CODES, q);
                    } else {
                        for (j, q) in (i..).zip(q.iter_mut()) {
                            *q = (bitstream(w, j, self.bits) as i32 - offset) as i8 as u8;
                        }
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
            let all = [
                Some(self.qweight),
                Some(self.scales),
                self.qzeros,
                self.g_idx,
            ];
            for c in all.into_iter().flatten() {
                // SAFETY: forwarded to the caller.
                unsafe { p.whole(c) }
            }
        }
    }
}

/// GPTQ: output rows `[o0, o1)` (`[out, in]`) into `tile`. The packed columns of the
/// tile are transposed first, so that each output row is produced in order from its
/// own words, with its groups' scales and zero points at hand.
fn gptq(r: &Reader, g: &Gptq, o0: u64, o1: u64, bufs: &mut Bufs, tile: &mut [f32]) -> Result<()> {
    let [qb, sb, zb, gb] = bufs;
    let ins = g.inputs;
    let width = (o1 - o0) as usize;
    let (scale, zero) = tile_params(r, g, (o0, o1), sb, zb)?;
    let gi: Vec<u32> = match g.g_idx {
        Some(t) => r.groups(t, g.groups, gb)?,
        None => (0..ins).map(|i| (i / g.group) as u32).collect(),
    };
    let qt = r.info(g.qweight);
    let all = r.bytes_read(g.qweight, 0, qt.len, qb, o0 == 0)?;
    let bits = g.bits as usize;
    // Groups in input order (no `g_idx`, or one that is `i / group`): one scale and
    // zero point per run of words.
    let per = 32 / bits;
    let plain = 32 % bits == 0
        && g.group.is_multiple_of(per as u64)
        && gi
            .iter()
            .enumerate()
            .all(|(i, &x)| x as u64 == i as u64 / g.group);
    // 4-bit codes with AVX2: eight tile rows at a time straight from the stored words
    // (`blocks` rows; any `g_idx` order), the rest one by one.
    #[cfg(target_arch = "x86_64")]
    let blocks = if bits == 4 && ins.is_multiple_of(8) && avx2() {
        width / 8 * 8
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let blocks = 0;
    #[cfg(target_arch = "x86_64")]
    if blocks > 0 {
        let (st, zt) = by_group(&scale, &zero, width, g.groups as usize);
        let t = GidxTile {
            words: all,
            outs: g.outputs as usize,
            o0: o0 as usize,
            gi: &gi,
            st: &st,
            zt: &zt,
            width,
            ins: ins as usize,
        };
        for oo in (0..blocks).step_by(8) {
            // SAFETY: the CPU has AVX2 (checked above); every `g_idx` entry is below the
            // group count (`Reader::groups`).
            unsafe { gptq4_gidx_rows8_avx2(&t, oo, &mut tile[oo * ins as usize..]) };
        }
    }
    let packed = (ins * g.bits as u64 / 32) as usize;
    let wt = columns(all, g, o0, blocks..width);
    let groups = g.groups as usize;
    for oo in blocks..width {
        let w = &wt[(oo - blocks) * packed..(oo - blocks + 1) * packed];
        let out = &mut tile[oo * ins as usize..(oo + 1) * ins as usize];
        let (s, z) = (
            &scale[oo * groups..(oo + 1) * groups],
            &zero[oo * groups..(oo + 1) * groups],
        );
        row(g, w, (s, z), (!plain).then_some(&gi[..]), out);
    }
    Ok(())
}

/// Scales and zero points (stored zero + offset) of tile rows `[o0, o1)`, `[row of the
/// tile][group]`.
fn tile_params(
    r: &Reader,
    g: &Gptq,
    (o0, o1): (u64, u64),
    sb: &mut Vec<u8>,
    zb: &mut Vec<u8>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (outs, groups) = (g.outputs, g.groups as usize);
    let width = (o1 - o0) as usize;
    let mut scale = vec![0f32; width * groups];
    let mut zero = vec![0f32; width * groups];
    let mut row = Vec::new();
    let zwords = (outs * g.bits as u64).div_ceil(32);
    let zall: Option<Vec<u32>> = match g.qzeros {
        Some(z) => Some(words(r.bytes(z, 0, g.groups * zwords * 4, zb)?).collect()),
        None => None,
    };
    for k in 0..groups {
        r.scales(g.scales, k as u64 * outs + o0, o1 - o0, sb, &mut row)?;
        for (oo, &v) in row.iter().enumerate() {
            scale[oo * groups + k] = v;
            let z = match &zall {
                Some(zw) => {
                    let zr = &zw[k * zwords as usize..(k + 1) * zwords as usize];
                    bitstream(zr, o0 + oo as u64, g.bits)
                }
                // No stored zeros: the symmetric midpoint.
                None => (1u32 << (g.bits - 1)) - g.zero_offset,
            };
            zero[oo * groups + k] = (z + g.zero_offset) as f32;
        }
    }
    Ok((scale, zero))
}

/// `[row][group]` scales and zero points of `width` rows, transposed to `[group][row]`.
#[cfg(target_arch = "x86_64")]
fn by_group(scale: &[f32], zero: &[f32], width: usize, groups: usize) -> (Vec<f32>, Vec<f32>) {
    let mut st = vec![0f32; groups * width];
    let mut zt = vec![0f32; groups * width];
    for oo in 0..width {
        for k in 0..groups {
            st[k * width + oo] = scale[oo * groups + k];
            zt[k * width + oo] = zero[oo * groups + k];
        }
    }
    (st, zt)
}

/// Tile rows `rows`' packed columns, transposed: `wt[oo − rows.start][k]`, from the
/// stored words `all` `[packed rows, out]`, sixteen packed rows at a time, each read
/// in order: each tile row gets 64 contiguous bytes.
fn columns(all: &[u8], g: &Gptq, o0: u64, rows: std::ops::Range<usize>) -> Vec<u32> {
    let (blocks, width) = (rows.start, rows.end);
    let (outs, packed) = (g.outputs, (g.inputs * g.bits as u64 / 32) as usize);
    let mut wt = vec![0u32; (width - blocks) * packed];
    for k0 in (0..packed).step_by(16) {
        for k in k0..(k0 + 16).min(packed) {
            let at = (k as u64 * outs + o0) as usize * 4;
            for (oo, b) in all[at + blocks * 4..at + width * 4]
                .chunks_exact(4)
                .enumerate()
            {
                wt[oo * packed + k] = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
    }
    wt
}

/// One tile row into `out` from its packed column `w`, with its groups' scales and
/// zero points `sz`: groups in input order (`gi` none: one scale and zero point per
/// run of words, 4-bit codes with AVX2) or by `gi`.
fn row(g: &Gptq, w: &[u32], sz: (&[f32], &[f32]), gi: Option<&[u32]>, out: &mut [f32]) {
    let (s, z) = sz;
    let bits = g.bits as usize;
    let mask = (1u32 << g.bits) - 1;
    let per = 32 / bits;
    let Some(gi) = gi else {
        #[cfg(target_arch = "x86_64")]
        if bits == 4 && avx2() {
            // SAFETY: the CPU has AVX2 (checked at run time).
            unsafe { int4_row_avx2(w, out, s, z, g.group as usize) };
            return;
        }
        for (k, (&word, o)) in w.iter().zip(out.chunks_exact_mut(per)).enumerate() {
            let gk = k * per / g.group as usize;
            let (sv, zv) = (s[gk], z[gk]);
            for (j, v) in o.iter_mut().enumerate() {
                *v = (((word >> (bits * j)) & mask) as f32 - zv) * sv;
            }
        }
        return;
    };
    if 32 % bits == 0 {
        for (k, &word) in w.iter().enumerate() {
            for j in 0..per {
                let i = k * per + j;
                let gk = gi[i] as usize;
                out[i] = (((word >> (bits * j)) & mask) as f32 - z[gk]) * s[gk];
            }
        }
    } else {
        // 3 bits: one little-endian bitstream over the column's words.
        for (i, o) in out.iter_mut().enumerate() {
            let gk = gi[i] as usize;
            *o = (bitstream(w, i as u64, g.bits) as f32 - z[gk]) * s[gk];
        }
    }
}

/// A piece of GPTQ 4-bit codes (any `g_idx` order): the stored words `[ins / 8, outs]`
/// (bytes), the tile's first output `o0` and `width` outputs, and the tile's scales and
/// zero points transposed, `[groups][width]`.
#[cfg(target_arch = "x86_64")]
struct GidxTile<'a> {
    words: &'a [u8],
    outs: usize,
    o0: usize,
    gi: &'a [u32],
    st: &'a [f32],
    zt: &'a [f32],
    width: usize,
    ins: usize,
}

/// Tile rows `oo..oo + 8` of `t` into `out` (row `r` at `r · ins`): for each block of
/// eight inputs, the eight rows' words are one load; input `j`'s codes for the eight
/// rows are one shift, its group's scales and zero points for them two loads, the
/// value `(q − z) × s` in f32 (the scalar arithmetic); an 8 × 8 transpose then gives
/// each row its eight values, one store.
///
/// # Safety
///
/// The CPU must support AVX2, and every entry of `t.gi` must be below the group count
/// (`t.st.len() / t.width`). Panics (before any store) when a stored word, a `g_idx`
/// entry or an output the rows need is out of range.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn gptq4_gidx_rows8_avx2(t: &GidxTile, oo: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let kw = t.ins / 8;
    assert!(
        oo + 8 <= t.width && t.st.len() == t.zt.len() && t.st.len().is_multiple_of(t.width.max(1))
    );
    assert!(t.gi.len() >= kw * 8 && out.len() >= 7 * t.ins + kw * 8);
    assert!(kw == 0 || ((kw - 1) * t.outs + t.o0 + oo + 8) * 4 <= t.words.len());
    // SAFETY: for k < kw: a load of 8 words at word (k · outs + o0 + oo) of `words`
    // (inside by the third assert); loads of 8 f32 at st/zt[g · width + oo..] for g
    // below the group count (the caller's promise; oo + 8 <= width); stores of 8 f32
    // at out[r · ins + 8k..] for r < 8 (inside by the second assert).
    unsafe {
        let mask = _mm256_set1_epi32(15);
        for k in 0..kw {
            let at = (k * t.outs + t.o0 + oo) * 4;
            let w = _mm256_loadu_si256(t.words.as_ptr().add(at).cast());
            let mut v = [_mm256_setzero_ps(); 8];
            for (j, v) in v.iter_mut().enumerate() {
                let g = t.gi[8 * k + j] as usize * t.width + oo;
                let q =
                    _mm256_and_si256(_mm256_srlv_epi32(w, _mm256_set1_epi32(4 * j as i32)), mask);
                let zv = _mm256_loadu_ps(t.zt.as_ptr().add(g));
                let sv = _mm256_loadu_ps(t.st.as_ptr().add(g));
                *v = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(q), zv), sv);
            }
            for (r, row) in transpose8_avx2(v).into_iter().enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add(r * t.ins + 8 * k), row);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "x86_64")]
    use half::f16;

    use super::*;

    /// Eight GPTQ 4-bit tile rows with a permuted `g_idx` against the formula, from
    /// stored words `[ins / 8, outs]` with the tile at an offset inside them.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn gptq4_gidx_rows8_avx2_equals_the_formula() {
        if !avx2() {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        let (ins, outs, groups, width, o0) = (48usize, 40usize, 5usize, 16usize, 8usize);
        let words: Vec<u32> = (0..(ins / 8 * outs) as u32)
            .map(|i| i.wrapping_mul(0x2545_F491) ^ 0x5A5A_A5A5)
            .collect();
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let gi: Vec<u32> = (0..ins)
            .map(|i| ((i * 7 + i / 3) % groups) as u32)
            .collect();
        let st: Vec<f32> = (0..groups * width)
            .map(|k| f16::from_f32(0.003 * (k as f32 + 0.7)).to_f32())
            .collect();
        let zt: Vec<f32> = (0..groups * width).map(|k| (k * 3 % 16) as f32).collect();
        let t = GidxTile {
            words: &bytes,
            outs,
            o0,
            gi: &gi,
            st: &st,
            zt: &zt,
            width,
            ins,
        };
        for oo in [0, 8] {
            let mut out = vec![f32::NAN; 8 * ins];
            // SAFETY: AVX2 is present (checked above); every gi entry is below 5.
            unsafe { gptq4_gidx_rows8_avx2(&t, oo, &mut out) };
            for r in 0..8 {
                for i in 0..ins {
                    let word = words[(i / 8) * outs + o0 + oo + r];
                    let (q, g) = ((word >> (4 * (i % 8))) & 15, gi[i] as usize);
                    let (s, z) = (st[g * width + oo + r], zt[g * width + oo + r]);
                    let want = (q as f32 - z) * s;
                    assert_eq!(
                        out[r * ins + i].to_bits(),
                        want.to_bits(),
                        "row {oo}+{r} input {i}"
                    );
                }
            }
        }
    }
}
