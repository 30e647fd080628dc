//! Dequantization of pre-quantized weights, a piece at a time, inside the cast stage.
//!
//! Each kernel computes the f32 values of output elements `[first, first + count)` of a
//! dequantized weight ([`Dequantized`], described by `source/scheme.rs`) straight from
//! the mapped (or read) codes and their scales: the reference implementations'
//! arithmetic in f32, the code times its scale with the zero point subtracted first
//! where there is one. The cast stage then rounds these values once to the target
//! dtype with the usual policy (RNE, overflow checked), or quantizes them to int8.
//! Nothing holds a whole tensor in f32: a piece is about 1 MiB of values.
//!
//! A scale that is NaN or infinite (an E8M0 255, a corrupt f32), and a `g_idx` past
//! the group count, are errors naming the tensor: the value they would make is not the
//! checkpoint's weight.

use std::cell::RefCell;
use std::sync::OnceLock;

use half::{bf16, f16};

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::source::scheme::{Awq, Gptq, Grid, Mxfp4, Packed};
use crate::source::{Dequantized, Kernel, Source, TensorInfo, TensorRef};

/// Output values per piece of a dequantized row (1 MiB of f32): the piece stays in the
/// CPU cache between its dequantization and its cast.
pub(crate) const PIECE_VALUES: u64 = 1 << 18;

/// Output rows a piece of `d` should hold at least: for MXFP4, whose output rows are
/// columns of the stored blocks, one whole group of 32 (measured on the bench's 1.1B
/// layout, CPU time: 1 row minimum 2.74 s, 16 rows 2.67 s, 32 rows 2.43 s, 64 rows
/// 2.74 s, 128 rows 2.98 s; larger pieces no longer fit the cache between the
/// dequantization and the cast).
pub(crate) fn min_piece_rows(d: &Dequantized) -> u64 {
    match d.kernel {
        Kernel::Mxfp4(_) => 32,
        _ => 1,
    }
}

/// The FP4 E2M1 values by nibble (transformers' `FP4_VALUES`, the OCP MX table): what
/// [`fp4`] computes, checked by the tests.
#[cfg(test)]
const FP4: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// AWQ's packing order: nibble `n` of a word holds output column `8c + AWQ_ORDER[n]`.
const AWQ_ORDER: [u64; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

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
fn table(d: Dtype) -> &'static [f32; 256] {
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

/// `2^(e − 127)`, an E8M0 scale, exactly (`None` for 255, its NaN).
#[inline]
fn e8m0(e: u8) -> Option<f32> {
    match e {
        255 => None,
        0 => Some(f32::from_bits(1 << 22)),
        e => Some(f32::from_bits((e as u32) << 23)),
    }
}

/// Scale-like values (f32, bf16, f16, E8M0 bytes, integers) as f32, appended to `out`.
fn widen_scales(d: Dtype, b: &[u8], out: &mut Vec<f32>) {
    match d {
        Dtype::F32 => out.extend(
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        Dtype::Bf16 => out.extend(
            b.chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        Dtype::F16 => out.extend(
            b.chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        Dtype::U8 | Dtype::F8E8M0 => out.extend(b.iter().map(|&e| e8m0(e).unwrap_or(f32::NAN))),
        Dtype::I8 => out.extend(b.iter().map(|&v| v as i8 as f32)),
        Dtype::I32 => out.extend(
            b.chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32),
        ),
        _ => {}
    }
}

/// Little-endian u32 words.
fn words(b: &[u8]) -> impl Iterator<Item = u32> + '_ {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

/// Value `i` of `bits` bits of a dense little-endian bitstream of u32 `words` (values
/// may straddle two words).
#[inline]
fn bitstream(w: &[u32], i: u64, bits: u32) -> u32 {
    let p = i * bits as u64;
    let (k, off) = ((p / 32) as usize, (p % 32) as u32);
    let lo = w.get(k).copied().unwrap_or(0) >> off;
    let v = if off + bits > 32 {
        lo | (w.get(k + 1).copied().unwrap_or(0) << (32 - off))
    } else {
        lo
    };
    v & ((1u32 << bits) - 1)
}

thread_local! {
    /// Buffers a worker reads components into in read mode, reused across pieces.
    static BUFS: RefCell<[Vec<u8>; 4]> = const {
        RefCell::new([Vec::new(), Vec::new(), Vec::new(), Vec::new()])
    };
}

/// Reads components of one dequantized weight.
struct Reader<'a> {
    source: &'a Source,
    d: &'a Dequantized,
}

impl<'a> Reader<'a> {
    fn info(&self, r: TensorRef) -> &'a TensorInfo {
        &self.source.shards[r.shard].header.tensors[r.tensor]
    }

    /// Bytes `[at, at + len)` of component `r`.
    fn bytes<'b>(&self, r: TensorRef, at: u64, len: u64, buf: &'b mut Vec<u8>) -> Result<&'b [u8]>
    where
        'a: 'b,
    {
        self.source.shards[r.shard].bytes(self.info(r), at, len, buf)
    }

    /// [`Reader::bytes`] of a range that `first` says an earlier piece already read
    /// (its mapped pages are not populated again).
    fn bytes_read<'b>(
        &self,
        r: TensorRef,
        at: u64,
        len: u64,
        buf: &'b mut Vec<u8>,
        first: bool,
    ) -> Result<&'b [u8]>
    where
        'a: 'b,
    {
        let shard = &self.source.shards[r.shard];
        match first {
            true => shard.bytes(self.info(r), at, len, buf),
            false => shard.bytes_again(self.info(r), at, len, buf),
        }
    }

    /// Elements `[first, first + n)` of a scale-like component, as f32, into `out`
    /// (cleared): every one finite, or an error naming the component.
    fn scales(
        &self,
        r: TensorRef,
        first: u64,
        n: u64,
        buf: &mut Vec<u8>,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let t = self.info(r);
        let es = t.dtype.size() as u64;
        out.clear();
        let b = self.bytes(r, first * es, n * es, buf)?;
        widen_scales(t.dtype, b, out);
        if let Some(k) = out.iter().position(|v| !v.is_finite()) {
            return Err(self.error(
                r,
                format!(
                    "scale {} is {} (stored {}); no weight is dequantized from a NaN or infinite scale",
                    first + k as u64,
                    out[k],
                    t.dtype
                ),
            ));
        }
        Ok(())
    }

    /// Group indices `[first, first + n)` of `g_idx`, each checked against `groups`.
    fn groups(&self, r: TensorRef, groups: u64, buf: &mut Vec<u8>) -> Result<Vec<u32>> {
        let t = self.info(r);
        let b = self.bytes(r, 0, t.len, buf)?;
        let vals = crate::source::le_ints(t.dtype, b);
        vals.iter()
            .enumerate()
            .map(|(i, &g)| {
                u32::try_from(g)
                    .ok()
                    .filter(|&g| (g as u64) < groups)
                    .ok_or_else(|| {
                        self.error(r, format!("entry {i} is {g}, outside the {groups} groups"))
                    })
            })
            .collect()
    }

    fn error(&self, r: TensorRef, reason: String) -> Error {
        let scheme = self
            .source
            .scheme()
            .map_or("unknown".to_string(), |s| s.method.clone());
        Error::Prequantized {
            path: self.source.shards[r.shard].path.clone(),
            tensor: Some(self.info(r).name.clone()),
            scheme,
            reason: format!("(for `{}`) {reason}", crate::error::sanitize(&self.d.name)),
        }
    }
}

/// Fills `out` with the f32 values of elements `[first, first + count)` of `d`.
///
/// # Errors
///
/// `Prequantized` for a NaN or infinite scale or a `g_idx` entry out of range, naming
/// the tensor; `Io` for a failed read.
pub(crate) fn fill(
    source: &Source,
    d: &Dequantized,
    first: u64,
    count: u64,
    out: &mut Vec<f32>,
) -> Result<()> {
    if count == 0 {
        out.clear();
        return Ok(());
    }
    let r = Reader { source, d };
    BUFS.with(|b| {
        let mut owned;
        let mut guard = b.try_borrow_mut();
        let bufs: &mut [Vec<u8>; 4] = match guard.as_deref_mut() {
            Ok(b) => b,
            Err(_) => {
                owned = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
                &mut owned
            }
        };
        match &d.kernel {
            Kernel::Grid(g) => {
                out.clear();
                grid(&r, g, first, count, bufs, out)
            }
            Kernel::Packed(p) => {
                out.clear();
                packed(&r, p, first, count, bufs, out)
            }
            Kernel::Gptq(g) => {
                transposed(&r, first, count, out, d.info.shape[1], |o0, o1, tile| {
                    gptq(&r, g, o0, o1, bufs, tile)
                })
            }
            Kernel::Awq(a) => transposed(&r, first, count, out, d.info.shape[1], |o0, o1, tile| {
                awq(&r, a, o0, o1, bufs, tile)
            }),
            Kernel::Mxfp4(m) => transposed(&r, first, count, out, m.rows, |o0, o1, tile| {
                mxfp4(&r, m, o0, o1, bufs, tile)
            }),
        }
    })?;
    debug_assert_eq!(out.len() as u64, count);
    Ok(())
}

/// For the kernels whose output is the stored layout transposed: computes whole output
/// rows (`row_len` values each) covering `[first, first + count)` with `rows(o0, o1,
/// tile)`, then keeps the requested range.
fn transposed(
    _r: &Reader,
    first: u64,
    count: u64,
    out: &mut Vec<f32>,
    row_len: u64,
    rows: impl FnOnce(u64, u64, &mut [f32]) -> Result<()>,
) -> Result<()> {
    let o0 = first / row_len;
    let o1 = (first + count).div_ceil(row_len);
    // Every value is written by `rows`: only a buffer grown past its last piece's
    // length is zero-filled (a cleared one would be zeroed for every piece).
    let n = ((o1 - o0) * row_len) as usize;
    if out.len() < n {
        out.resize(n, 0.0);
    } else {
        out.truncate(n);
    }
    rows(o0, o1, out)?;
    let skip = (first - o0 * row_len) as usize;
    if skip > 0 {
        out.drain(..skip);
    }
    out.truncate(count as usize);
    Ok(())
}

/// `(q − zero) × scale` with one scale per block of a grid.
fn grid(
    r: &Reader,
    g: &Grid,
    first: u64,
    count: u64,
    bufs: &mut [Vec<u8>; 4],
    out: &mut Vec<f32>,
) -> Result<()> {
    let [qb, sb, zb, _] = bufs;
    let qt = r.info(g.q);
    let lut = table(qt.dtype);
    let q = r.bytes(g.q, first, count, qb)?;
    let (rows, cols) = (g.rows.max(1), g.cols.max(1));
    let mat = rows * cols;
    let (br, bc) = g.block;
    let (gr, gc) = g.grid;
    // The scale (and zero) entries the range needs: contiguous in the grid.
    let cell = |e: u64| -> u64 {
        if g.per_tensor {
            0
        } else {
            let (b, rr) = (e / mat, (e % mat) / cols);
            (b * gr + rr / br) * gc
        }
    };
    let s0 = cell(first);
    let s1 = if g.per_tensor {
        1
    } else {
        cell(first + count - 1) + gc
    };
    let mut sv = Vec::with_capacity((s1 - s0) as usize);
    r.scales(g.scale, s0, s1 - s0, sb, &mut sv)?;
    let mut zv = Vec::new();
    if let Some(z) = g.zero {
        r.scales(z, s0, s1 - s0, zb, &mut zv)?;
    }
    out.reserve(count as usize);
    let mut e = first;
    let end = first + count;
    let mut qi = 0usize;
    while e < end {
        let c = e % cols;
        let row_end = end.min(e - c + cols);
        let base = (cell(e) - s0) as usize;
        let mut c0 = c;
        while e < row_end {
            // A run of one scale: to the end of the block or of the range.
            let run = (bc - c0 % bc).min(row_end - e) as usize;
            let k = if g.per_tensor {
                0
            } else {
                base + (c0 / bc) as usize
            };
            let s = sv[k];
            let src = &q[qi..qi + run];
            match zv.get(k) {
                None => out.extend(src.iter().map(|&b| lut[b as usize] * s)),
                Some(&z) => out.extend(src.iter().map(|&b| (lut[b as usize] - z) * s)),
            }
            qi += run;
            e += run as u64;
            c0 += run as u64;
        }
    }
    Ok(())
}

/// compressed-tensors `pack-quantized`: rows of densely packed offset-binary codes.
fn packed(
    r: &Reader,
    p: &Packed,
    first: u64,
    count: u64,
    bufs: &mut [Vec<u8>; 4],
    out: &mut Vec<f32>,
) -> Result<()> {
    let [qb, sb, zb, gb] = bufs;
    let cols = p.cols.max(1);
    let (o0, o1) = (first / cols, (first + count).div_ceil(cols));
    let wb = r.bytes(
        p.packed,
        o0 * p.row_words * 4,
        (o1 - o0) * p.row_words * 4,
        qb,
    )?;
    let w: Vec<u32> = words(wb).collect();
    let mut sv = Vec::new();
    r.scales(p.scale, o0 * p.groups, (o1 - o0) * p.groups, sb, &mut sv)?;
    let offset = 1i32 << (p.bits - 1);
    // Zero points: packed along the output, column g's bitstream over the rows.
    let zeros: Option<Vec<u32>> = match p.zero {
        Some(z) => {
            let t = r.info(z);
            Some(words(r.bytes(z, 0, t.len, zb)?).collect())
        }
        None => None,
    };
    let gi = match p.g_idx {
        Some(g) => Some(r.groups(g, p.groups, gb)?),
        None => None,
    };
    let zrows = (p.rows * p.bits as u64).div_ceil(32);
    out.reserve(count as usize);
    for o in o0..o1 {
        let row = &w[((o - o0) * p.row_words) as usize..((o - o0 + 1) * p.row_words) as usize];
        let i0 = if o == o0 { first - o0 * cols } else { 0 };
        let i1 = if o + 1 == o1 {
            first + count - o * cols
        } else {
            cols
        };
        let srow = &sv[((o - o0) * p.groups) as usize..((o - o0 + 1) * p.groups) as usize];
        for i in i0..i1 {
            let g = match &gi {
                Some(gi) => gi[i as usize] as u64,
                None => i / p.group,
            };
            let q = bitstream(row, i, p.bits) as i32 - offset;
            let z = match &zeros {
                // Word (k, g) of the [zrows, groups] packed zeros; row o at bit o·bits.
                Some(zw) => {
                    let col: Vec<u32> = (0..zrows)
                        .map(|k| zw[(k * p.groups + g) as usize])
                        .collect();
                    bitstream(&col, o, p.bits) as i32 - offset
                }
                None => 0,
            };
            out.push((q - z) as f32 * srow[g as usize]);
        }
    }
    Ok(())
}

/// GPTQ: output rows `[o0, o1)` (`[out, in]`) into `tile`. The packed columns of the
/// tile are transposed first, so that each output row is produced in order from its
/// own words, with its groups' scales and zero points at hand.
fn gptq(
    r: &Reader,
    g: &Gptq,
    o0: u64,
    o1: u64,
    bufs: &mut [Vec<u8>; 4],
    tile: &mut [f32],
) -> Result<()> {
    let [qb, sb, zb, gb] = bufs;
    let (ins, outs, groups) = (g.inputs, g.outputs, g.groups as usize);
    let width = (o1 - o0) as usize;
    // Scales and zero points (stored zero + offset), `[row of the tile][group]`.
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
    let gi: Vec<u32> = match g.g_idx {
        Some(t) => r.groups(t, g.groups, gb)?,
        None => (0..ins).map(|i| (i / g.group) as u32).collect(),
    };
    // The tile's packed columns, transposed: `wt[oo][k]`.
    let packed = (ins * g.bits as u64 / 32) as usize;
    let qt = r.info(g.qweight);
    let all = r.bytes_read(g.qweight, 0, qt.len, qb, o0 == 0)?;
    let mut wt = vec![0u32; width * packed];
    // Sixteen packed rows at a time, so that each tile row gets 64 contiguous bytes.
    for k0 in (0..packed).step_by(16) {
        let k1 = (k0 + 16).min(packed);
        for oo in 0..width {
            let dst = &mut wt[oo * packed + k0..oo * packed + k1];
            for (d, k) in dst.iter_mut().zip(k0..k1) {
                let at = (k as u64 * outs + o0) as usize * 4 + oo * 4;
                *d = u32::from_le_bytes([all[at], all[at + 1], all[at + 2], all[at + 3]]);
            }
        }
    }
    let bits = g.bits as usize;
    let mask = (1u32 << g.bits) - 1;
    // Groups in input order (no `g_idx`, or one that is `i / group`): one scale and
    // zero point per run of words.
    let per = 32 / bits;
    let plain = 32 % bits == 0
        && g.group.is_multiple_of(per as u64)
        && gi
            .iter()
            .enumerate()
            .all(|(i, &x)| x as u64 == i as u64 / g.group);
    for oo in 0..width {
        let w = &wt[oo * packed..(oo + 1) * packed];
        let out = &mut tile[oo * ins as usize..(oo + 1) * ins as usize];
        let (s, z) = (
            &scale[oo * groups..(oo + 1) * groups],
            &zero[oo * groups..(oo + 1) * groups],
        );
        if plain {
            for (k, (&word, o)) in w.iter().zip(out.chunks_exact_mut(per)).enumerate() {
                let gk = k * per / g.group as usize;
                let (sv, zv) = (s[gk], z[gk]);
                for (j, v) in o.iter_mut().enumerate() {
                    *v = (((word >> (bits * j)) & mask) as f32 - zv) * sv;
                }
            }
        } else if 32 % bits == 0 {
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
    Ok(())
}

/// AWQ (GEMM): output rows `[o0, o1)` (`[out, in]`) into `tile`.
fn awq(
    r: &Reader,
    a: &Awq,
    o0: u64,
    o1: u64,
    bufs: &mut [Vec<u8>; 4],
    tile: &mut [f32],
) -> Result<()> {
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
    for i in 0..ins {
        let gk = (i / a.group) as usize * width;
        let at = (i * wpr * 4) as usize;
        for c in c0..c1 {
            let b = at + (c * 4) as usize;
            let w = u32::from_le_bytes([all[b], all[b + 1], all[b + 2], all[b + 3]]);
            for (n, &col) in AWQ_ORDER.iter().enumerate() {
                let o = c * 8 + col;
                if o < o0 || o >= o1 {
                    continue;
                }
                let k = gk + ((c - c0) * 8 + col) as usize;
                let q = ((w >> (4 * n)) & 15) as f32;
                tile[((o - o0) * ins + i) as usize] = (q - zero[k]) * scale[k];
            }
        }
    }
    Ok(())
}

/// Stored rows ahead that an MXFP4 slab copy prefetches.
const PREFETCH_AHEAD: usize = 16;

/// Hints the CPU to fetch `bytes[at..at + len]` into the cache (nothing when outside).
#[inline(always)]
fn prefetch(bytes: &[u8], at: u64, len: u64) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let mut a = at as usize;
        let end = (at + len) as usize;
        while a < end {
            if let Some(b) = bytes.get(a) {
                // SAFETY: a prefetch never faults and reads nothing into the program;
                // the pointer is inside `bytes`.
                unsafe { _mm_prefetch::<_MM_HINT_T0>((b as *const u8).cast()) };
            }
            a += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (bytes, at, len);
}

/// Bytes of stored MXFP4 blocks an [`Slab`] holds at most (beyond its first four
/// groups): the groups of one expert regrouped so that each group's rows are
/// contiguous.
const SLAB_BYTES: u64 = 4 << 20;

/// Some groups of one MXFP4 expert, regrouped: blocks `[S, R, 16]` and scales `[S, R]`
/// for groups `[g0, g0 + S)`, copied from the stored `[R, G, 16]` and `[R, G]`.
///
/// A piece's output rows are columns of the stored values: reading them in place
/// touches every stored row's page for each group (1 KiB rows: hundreds of
/// translation misses per group on a 4 KiB-page mapping, and a cache line read four
/// times). Copying a slab of groups touches each page once per slab, and every piece
/// of its groups then reads contiguous bytes.
#[derive(Default)]
struct Slab {
    /// (source id, blocks tensor, expert, first group) of what `blocks` holds.
    key: Option<(u64, TensorRef, u64, u64)>,
    /// Stored rows of the expert.
    rows: u64,
    blocks: Vec<u8>,
    scales: Vec<u8>,
}

thread_local! {
    /// The slab this worker read last, reused by the pieces of its groups.
    static SLAB: RefCell<Slab> = RefCell::new(Slab::default());
}

/// Groups per slab of an expert with `rows` stored rows of `groups` groups: whole
/// 64-byte lines of every row (4 groups), up to [`SLAB_BYTES`].
fn slab_groups(rows: u64, groups: u64) -> u64 {
    let fit = SLAB_BYTES / (rows * 16).max(1);
    (fit / 4 * 4).max(4).min(groups)
}

impl Slab {
    /// Copies groups `[g0, g0 + per)` (those that exist) of the expert `span` into the
    /// slab, under `key` (whose last field is `g0`).
    fn hold(&mut self, key: (u64, TensorRef, u64, u64), per: u64, span: &Span) {
        let (rows, g, g0) = (span.rows, span.groups, key.3);
        let n = per.min(g - g0);
        let (r, nn, g, g0) = (rows as usize, n as usize, g as usize, g0 as usize);
        self.blocks.resize(r * nn * 16, 0);
        self.scales.resize(r * nn, 0);
        for rr in 0..r {
            let at = (rr * g + g0) * 16;
            // Rows are G·16 bytes apart: the hardware prefetcher stops at each page,
            // so ask for a row some way ahead explicitly.
            prefetch(span.blocks, (at + PREFETCH_AHEAD * g * 16) as u64, n * 16);
            let src = &span.blocks[at..at + nn * 16];
            for (j, b) in src.chunks_exact(16).enumerate() {
                self.blocks[(j * r + rr) * 16..][..16].copy_from_slice(b);
            }
            let sa = rr * g + g0;
            for (j, &s) in span.scales[sa..sa + nn].iter().enumerate() {
                self.scales[j * r + rr] = s;
            }
        }
        self.key = Some(key);
        self.rows = rows;
    }

    /// Group `gg`'s blocks `[R, 16]` and scales `[R]` (it must be held).
    fn group(&self, gg: u64) -> (&[u8], &[u8]) {
        let j = (gg - self.key.map_or(0, |k| k.3)) as usize;
        let r = self.rows as usize;
        (
            &self.blocks[j * r * 16..(j + 1) * r * 16],
            &self.scales[j * r..(j + 1) * r],
        )
    }
}

/// MXFP4: output rows `[o0, o1)` of `[E, G·32, R]` (each `R` values) into `tile`.
fn mxfp4(
    r: &Reader,
    m: &Mxfp4,
    o0: u64,
    o1: u64,
    bufs: &mut [Vec<u8>; 4],
    tile: &mut [f32],
) -> Result<()> {
    let [qb, sb, _, _] = bufs;
    let (rows, g) = (m.rows, m.groups);
    let cols = g * 32;
    let per = slab_groups(rows, g);
    let mut o = o0;
    let mut owned = None;
    SLAB.with(|cell| {
        let mut guard = cell.try_borrow_mut();
        let slab: &mut Slab = match guard.as_deref_mut() {
            Ok(s) => s,
            Err(_) => owned.insert(Slab::default()),
        };
        while o < o1 {
            let e = o / cols;
            let c0 = o % cols;
            let c1 = (o1 - e * cols).min(cols);
            let out = &mut tile[((e * cols + c0 - o0) * rows) as usize..];
            // Expert e's blocks [R, G, 16] and scales [R, G], read when a slab is
            // copied (a fresh piece's pages were not populated by an earlier one).
            let fresh = c0 == 0;
            let fill = |slab: &mut Slab, key| {
                let blocks = r.bytes_read(m.blocks, e * rows * g * 16, rows * g * 16, qb, fresh)?;
                let scales = r.bytes_read(m.scales, e * rows * g, rows * g, sb, fresh)?;
                slab.hold(key, per, &Span { blocks, scales, groups: g, rows });
                Ok(())
            };
            match expert_rows(slab, (r.source.id, m.blocks, e), per, c0, c1, out, fill) {
                Ok(()) => {}
                Err(Fail::Read(err)) => return Err(err),
                Err(Fail::NanScale(rr, gg)) => {
                    return Err(r.error(
                        m.scales,
                        format!(
                            "scale [{e}, {rr}, {gg}] is 255, E8M0's NaN; no weight is dequantized from a NaN scale (stored {})",
                            r.info(m.scales).dtype
                        ),
                    ))
                }
            }
            o = e * cols + c1;
        }
        Ok(())
    })
}

/// Why [`expert_rows`] stopped.
enum Fail {
    /// Reading the stored bytes failed.
    Read(Error),
    /// The scale of (stored row, group) is E8M0's NaN.
    NanScale(u64, u64),
}

/// Output rows `[c0, c1)` of one expert (`key`: source id, blocks tensor, expert) into
/// `out` (row `c` at `(c − c0) · R`), through `slab` (`per` groups a slab); `fill`
/// copies the slab of a key from the expert's stored bytes ([`Slab::hold`]).
fn expert_rows(
    slab: &mut Slab,
    key: (u64, TensorRef, u64),
    per: u64,
    c0: u64,
    c1: u64,
    out: &mut [f32],
    mut fill: impl FnMut(&mut Slab, (u64, TensorRef, u64, u64)) -> Result<()>,
) -> std::result::Result<(), Fail> {
    for gg in c0 / 32..(c1 - 1) / 32 + 1 {
        let want = (key.0, key.1, key.2, gg / per * per);
        if slab.key != Some(want) {
            fill(slab, want).map_err(Fail::Read)?;
        }
        let rows = slab.rows;
        let (blocks, scales) = slab.group(gg);
        let (lo, hi) = (c0.max(gg * 32), c1.min(gg * 32 + 32));
        let group = Group {
            blocks,
            scales,
            lo: lo - gg * 32,
            hi: hi - gg * 32,
        };
        let out = &mut out[((lo - c0) * rows) as usize..];
        #[cfg(target_arch = "x86_64")]
        let done = if avx2() {
            // SAFETY: the CPU has AVX2 (checked at run time).
            unsafe { mxfp4_group_avx2(&group, out) }
        } else {
            mxfp4_group::<false>(&group, out)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let done = mxfp4_group::<false>(&group, out);
        done.map_err(|rr| Fail::NanScale(rr, gg))?;
    }
    Ok(())
}

/// One expert's stored blocks `[R, G, 16]` and scales `[R, G]`.
struct Span<'a> {
    blocks: &'a [u8],
    scales: &'a [u8],
    groups: u64,
    rows: u64,
}

/// One group of an expert, regrouped: blocks `[R, 16]`, scales `[R]`, and the columns
/// `[lo, hi)` of its 32 a piece wants.
struct Group<'a> {
    blocks: &'a [u8],
    scales: &'a [u8],
    lo: u64,
    hi: u64,
}

/// True when the CPU has AVX2.
#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2"))
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
                let (a0, a1, a2, a3) = (ld(0), ld(1), ld(2), ld(3));
                let (a4, a5, a6, a7) = (ld(4), ld(5), ld(6), ld(7));
                let t0 = _mm256_unpacklo_ps(a0, a1);
                let t1 = _mm256_unpackhi_ps(a0, a1);
                let t2 = _mm256_unpacklo_ps(a2, a3);
                let t3 = _mm256_unpackhi_ps(a2, a3);
                let t4 = _mm256_unpacklo_ps(a4, a5);
                let t5 = _mm256_unpackhi_ps(a4, a5);
                let t6 = _mm256_unpacklo_ps(a6, a7);
                let t7 = _mm256_unpackhi_ps(a6, a7);
                let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                let rows = [
                    _mm256_permute2f128_ps::<0x20>(u0, u4),
                    _mm256_permute2f128_ps::<0x20>(u1, u5),
                    _mm256_permute2f128_ps::<0x20>(u2, u6),
                    _mm256_permute2f128_ps::<0x20>(u3, u7),
                    _mm256_permute2f128_ps::<0x31>(u0, u4),
                    _mm256_permute2f128_ps::<0x31>(u1, u5),
                    _mm256_permute2f128_ps::<0x31>(u2, u6),
                    _mm256_permute2f128_ps::<0x31>(u3, u7),
                ];
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
const FP4_BF16_HI: [u8; 16] = [
    0x00, 0x3F, 0x3F, 0x3F, 0x40, 0x40, 0x40, 0x40, 0x80, 0xBF, 0xBF, 0xBF, 0xC0, 0xC0, 0xC0, 0xC0,
];
/// The low bytes of FP4[n] as bfloat16.
#[cfg(target_arch = "x86_64")]
const FP4_BF16_LO: [u8; 16] = [
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
unsafe fn fp4_group_avx2(blk: &[u8], scale: f32, out: &mut [f32; 32]) {
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
fn fp4_group(blk: &[u8], scale: f32, out: &mut [f32; 32]) {
    for (i, &b) in blk.iter().enumerate().take(16) {
        out[2 * i] = fp4(b as u32 & 15) * scale;
        out[2 * i + 1] = fp4(b as u32 >> 4) * scale;
    }
}

/// The FP4 E2M1 value of nibble `n`, computed rather than looked up so that the decode
/// loop vectorizes: exponent field 0 is zero or the subnormal 0.5, others are
/// `2^(e−1) · (1 + m/2)`; bit 3 is the sign.
#[inline(always)]
fn fp4(n: u32) -> f32 {
    let (e, m) = ((n >> 1) & 3, n & 1);
    let mag = if e == 0 {
        m * 0x3F00_0000
    } else {
        ((e + 126) << 23) | (m << 22)
    };
    f32::from_bits(mag | ((n & 8) << 28))
}

/// Releases the mapped pages of `d`'s components that the piece `[first, first +
/// count)` was the last to read: the codes of the piece for elementwise kernels, and
/// for the transposed ones (which read every stored row for each piece) whole
/// components, or an MXFP4 expert, once the piece ends them.
///
/// # Safety
///
/// As [`crate::source::Shard::release`]: no slice borrowed from those ranges is read
/// afterwards by this row.
pub(crate) unsafe fn release(source: &Source, d: &Dequantized, first: u64, count: u64) {
    let info = |r: TensorRef| &source.shards[r.shard].header.tensors[r.tensor];
    let rel = |r: TensorRef, at: u64, len: u64| {
        // SAFETY: forwarded to the caller.
        unsafe { source.shards[r.shard].release_bytes(info(r), at, len) }
    };
    let end = first + count;
    match &d.kernel {
        Kernel::Grid(g) => rel(g.q, first, count),
        Kernel::Packed(p) => {
            let cols = p.cols.max(1);
            let (o0, o1) = (first.div_ceil(cols), end / cols);
            if o1 > o0 {
                rel(p.packed, o0 * p.row_words * 4, (o1 - o0) * p.row_words * 4);
            }
        }
        Kernel::Gptq(g) if end == d.info.numel => rel(g.qweight, 0, info(g.qweight).len),
        Kernel::Awq(a) if end == d.info.numel => rel(a.qweight, 0, info(a.qweight).len),
        Kernel::Mxfp4(m) => {
            let per = m.groups * 32 * m.rows;
            for e in first / per..end / per {
                if (e + 1) * per <= end {
                    rel(m.blocks, e * m.rows * m.groups * 16, m.rows * m.groups * 16);
                    // The expert's slab is not read again: its memory goes back.
                    SLAB.with(|cell| {
                        if let Ok(mut s) = cell.try_borrow_mut() {
                            if s.key
                                .is_some_and(|k| (k.0, k.1, k.2) == (source.id, m.blocks, e))
                            {
                                *s = Slab::default();
                            }
                        }
                    });
                }
            }
        }
        _ => {}
    }
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

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn fp4_group_avx2_equals_the_scalar_decode() {
        if !avx2() {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        let scales = [0u8, 1, 100, 127, 130, 200, 254];
        for start in (0..=255u8).step_by(16) {
            let blk: Vec<u8> = (0..16).map(|i| start.wrapping_add(i * 17)).collect();
            for &s in &scales {
                let scale = e8m0(s).unwrap_or(1.0);
                let (mut a, mut b) = ([0f32; 32], [0f32; 32]);
                fp4_group(&blk, scale, &mut a);
                // SAFETY: AVX2 is present (checked above).
                unsafe { fp4_group_avx2(&blk, scale, &mut b) };
                assert_eq!(
                    a.map(f32::to_bits),
                    b.map(f32::to_bits),
                    "bytes {blk:?} scale {s}"
                );
            }
        }
    }

    /// Output rows of MXFP4 experts through slabs of 4 groups (9 groups: the last slab
    /// short; 37 stored rows: the last block of 16 short), in pieces that start and end
    /// inside groups and cross slabs, the two experts alternating (a slab of the other
    /// is never reused): every value equals FP4[nibble] × 2^(scale − 127) at its place.
    #[test]
    fn experts_through_slabs_equal_the_direct_decode() {
        let (rows, g, experts) = (37u64, 9u64, 2u64);
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let blocks: Vec<Vec<u8>> = (0..experts)
            .map(|_| (0..rows * g * 16).map(|_| next() as u8).collect())
            .collect();
        let scales: Vec<Vec<u8>> = (0..experts)
            .map(|_| (0..rows * g).map(|_| 110 + (next() % 30) as u8).collect())
            .collect();
        let direct = |e: usize, c: u64, rr: u64| {
            let (gg, k) = (c / 32, c % 32);
            let byte = blocks[e][((rr * g + gg) * 16 + k / 2) as usize];
            let nib = if k % 2 == 0 { byte & 15 } else { byte >> 4 };
            let s = scales[e][(rr * g + gg) as usize] as i32 - 127;
            FP4[nib as usize] * 2f32.powi(s)
        };
        let blocks_ref = TensorRef {
            shard: 0,
            tensor: 5,
        };
        let mut slab = Slab::default();
        let cols = g * 32;
        let pieces = [
            (0, 32),
            (32, 45),
            (45, 150),
            (150, 288),
            (0, 288),
            (100, 101),
            (287, 288),
        ];
        for (c0, c1) in pieces {
            for e in [0usize, 1, 0] {
                let mut out = vec![f32::NAN; ((c1 - c0) * rows) as usize];
                let fill = |slab: &mut Slab, key: (u64, TensorRef, u64, u64)| {
                    let span = Span {
                        blocks: &blocks[e],
                        scales: &scales[e],
                        groups: g,
                        rows,
                    };
                    slab.hold(key, 4, &span);
                    Ok(())
                };
                let done = expert_rows(
                    &mut slab,
                    (7, blocks_ref, e as u64),
                    4,
                    c0,
                    c1,
                    &mut out,
                    fill,
                );
                assert!(done.is_ok());
                for c in c0..c1.min(cols) {
                    for rr in 0..rows {
                        let got = out[((c - c0) * rows + rr) as usize];
                        assert_eq!(
                            got.to_bits(),
                            direct(e, c, rr).to_bits(),
                            "e {e} c {c} row {rr}"
                        );
                    }
                }
            }
        }
        // An E8M0 NaN scale is reported at its (row, group).
        let mut bad = scales[0].clone();
        bad[(20 * g + 6) as usize] = 255;
        let mut out = vec![0f32; (cols * rows) as usize];
        let fill = |slab: &mut Slab, key: (u64, TensorRef, u64, u64)| {
            slab.hold(
                key,
                4,
                &Span {
                    blocks: &blocks[0],
                    scales: &bad,
                    groups: g,
                    rows,
                },
            );
            Ok(())
        };
        let done = expert_rows(
            &mut Slab::default(),
            (8, blocks_ref, 0),
            4,
            0,
            cols,
            &mut out,
            fill,
        );
        assert!(matches!(done, Err(Fail::NanScale(20, 6))));
    }

    #[test]
    fn fp4_computes_the_table() {
        for n in 0..16u32 {
            assert_eq!(fp4(n).to_bits(), FP4[n as usize].to_bits(), "nibble {n}");
        }
    }

    #[test]
    fn e8m0_is_a_power_of_two() {
        assert_eq!(e8m0(127), Some(1.0));
        assert_eq!(e8m0(0), Some(2f32.powi(-127)));
        assert_eq!(e8m0(254), Some(2f32.powi(127)));
        assert_eq!(e8m0(255), None);
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
}
