//! Dequantization of pre-quantized weights, a piece at a time, inside the cast stage.
//!
//! Each kernel computes the f32 values of output elements `[first, first + count)` of a
//! dequantized weight ([`Dequantized`], described by `source/scheme.rs`) straight from
//! the mapped (or read) codes and their scales: the reference implementations'
//! arithmetic in f32, the code times its scale with the zero point subtracted first
//! where there is one. The cast stage then rounds these values once to the target
//! dtype with the usual policy (RNE, overflow checked), or quantizes them to int8.
//! Nothing holds a whole tensor in f32: a piece is about 1 MiB of values. Where a
//! kernel can write the target type itself ([`fill_half`]: MXFP4 into f16 or bf16, an
//! FP8 E4M3 grid into f16), it does, bit for bit what the f32 values and the cast give,
//! with what the cast would have counted.
//!
//! A scale that is NaN or infinite (an E8M0 255, a corrupt f32), and a `g_idx` past
//! the group count, are errors naming the tensor: the value they would make is not the
//! checkpoint's weight.

mod mxfp4;

use std::cell::RefCell;
use std::sync::OnceLock;

use half::f16;

use crate::cast::CastStats;
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::source::scheme::{Awq, Gptq, Grid, Packed};
use crate::source::{Dequantized, Kernel, Source, TensorInfo, TensorRef};

/// Output values per piece of a dequantized row (1 MiB of f32): the piece stays in the
/// CPU cache between its dequantization and its cast.
pub(crate) const PIECE_VALUES: u64 = 1 << 18;

/// The output rows a piece of `d` holds a multiple of: for MXFP4, whose output rows
/// are columns of the stored blocks, whole groups of 32, so that no group is decoded
/// twice (measured on the bench's 1.1B layout, CPU time, when a piece held at least
/// this many rows: 1 row 2.74 s, 16 rows 2.67 s, 32 rows 2.43 s, 64 rows 2.74 s, 128
/// rows 2.98 s; larger pieces no longer fit the cache between the dequantization and
/// the cast).
pub(crate) fn piece_row_unit(d: &Dequantized) -> u64 {
    match d.kernel {
        Kernel::Mxfp4(_) => 32,
        _ => 1,
    }
}

/// True when the CPU has AVX2 and F16C.
#[cfg(target_arch = "x86_64")]
fn f16c() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| avx2() && is_x86_feature_detected!("f16c"))
}

/// True when the CPU has AVX2.
#[cfg(target_arch = "x86_64")]
pub(super) fn avx2() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2"))
}

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
        Dtype::F32 | Dtype::Bf16 | Dtype::F16 => crate::cast::widen(d, b, out),
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
    bits_at(|k| w.get(k).copied().unwrap_or(0), i, bits)
}

/// Value `i` of a little-endian bitstream of `bits`-bit values whose word `k` is
/// `word(k)`.
#[inline(always)]
fn bits_at(word: impl Fn(usize) -> u32, i: u64, bits: u32) -> u32 {
    let p = i * bits as u64;
    let (k, off) = ((p / 32) as usize, (p % 32) as u32);
    let lo = word(k) >> off;
    let v = if off + bits > 32 {
        lo | (word(k + 1) << (32 - off))
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
    with_bufs(|bufs| match &d.kernel {
        Kernel::Grid(g) => {
            out.clear();
            grid(&r, g, first, count, bufs, out)
        }
        Kernel::Packed(p) => {
            out.clear();
            packed(&r, p, first, count, bufs, out)
        }
        Kernel::Gptq(g) => transposed(&r, first, count, out, d.info.shape[1], |o0, o1, tile| {
            gptq(&r, g, o0, o1, bufs, tile)
        }),
        Kernel::Awq(a) => transposed(&r, first, count, out, d.info.shape[1], |o0, o1, tile| {
            awq(&r, a, o0, o1, bufs, tile)
        }),
        Kernel::Mxfp4(m) => transposed(&r, first, count, out, m.rows, |o0, o1, tile| {
            mxfp4::mxfp4(&r, m, o0, o1, bufs, tile)
        }),
    })?;
    debug_assert_eq!(out.len() as u64, count);
    Ok(())
}

/// Fills `dst` with elements `[first, first + count)` of `d` cast to `to`, where the
/// kernel writes that type directly (MXFP4 into f16 or bf16, in whole output rows; an
/// F8 E4M3 grid without zero points into f16), bit for bit what [`fill`] and the cast
/// give, and returns what the cast would have seen; `None` (nothing written) where it
/// does not.
///
/// # Errors
///
/// As [`fill`].
pub(crate) fn fill_half(
    source: &Source,
    d: &Dequantized,
    to: Dtype,
    first: u64,
    count: u64,
    dst: &mut [u8],
) -> Result<Option<CastStats>> {
    if count == 0 || dst.len() as u64 != count * 2 {
        return Ok(None);
    }
    let r = Reader { source, d };
    match &d.kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Grid(g)
            if to == Dtype::F16
                && g.zero.is_none()
                && r.info(g.q).dtype == Dtype::F8E4M3
                && f16c() =>
        {
            with_bufs(|bufs| grid_f16(&r, g, first, count, bufs, dst)).map(Some)
        }
        Kernel::Mxfp4(m) => {
            let half = match to {
                Dtype::F16 => mxfp4::Half::F16,
                Dtype::Bf16 => mxfp4::Half::Bf16,
                _ => return Ok(None),
            };
            let row = m.rows.max(1);
            if !first.is_multiple_of(row) || !count.is_multiple_of(row) {
                return Ok(None);
            }
            let (o0, o1) = (first / row, (first + count) / row);
            with_bufs(|bufs| mxfp4::mxfp4_half(&r, m, o0, o1, bufs, half, dst)).map(Some)
        }
        _ => Ok(None),
    }
}

/// Runs `f` with this worker's read buffers (fresh ones if `f` re-enters).
fn with_bufs<T>(f: impl FnOnce(&mut [Vec<u8>; 4]) -> T) -> T {
    BUFS.with(|b| match b.try_borrow_mut() {
        Ok(mut b) => f(&mut b),
        Err(_) => f(&mut [Vec::new(), Vec::new(), Vec::new(), Vec::new()]),
    })
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

/// The transpose of an 8 × 8 block of f32 held in eight registers (row `i` of the
/// result is lane `i` of each input, in order).
///
/// # Safety
///
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn transpose8_avx2(a: [std::arch::x86_64::__m256; 8]) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    let t0 = _mm256_unpacklo_ps(a[0], a[1]);
    let t1 = _mm256_unpackhi_ps(a[0], a[1]);
    let t2 = _mm256_unpacklo_ps(a[2], a[3]);
    let t3 = _mm256_unpackhi_ps(a[2], a[3]);
    let t4 = _mm256_unpacklo_ps(a[4], a[5]);
    let t5 = _mm256_unpackhi_ps(a[4], a[5]);
    let t6 = _mm256_unpacklo_ps(a[6], a[7]);
    let t7 = _mm256_unpackhi_ps(a[6], a[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
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

/// `(q − zero) × scale` with one scale per block of a grid.
fn grid(
    r: &Reader,
    g: &Grid,
    first: u64,
    count: u64,
    bufs: &mut [Vec<u8>; 4],
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
    bufs: &mut [Vec<u8>; 4],
    dst: &mut [u8],
) -> Result<CastStats> {
    let mut at = 0usize;
    let mut special = false;
    grid_runs(r, g, first, count, bufs, |src, s, _| {
        let out = &mut dst[at..at + src.len() * 2];
        // SAFETY: `fill_half` takes this path only where the CPU has AVX2 and F16C.
        special |= unsafe { e4m3_f16_run(src, s, out) };
        at += src.len() * 2;
    })?;
    let mut stats = CastStats::default();
    if special {
        // A NaN code or an overflow somewhere: count them as the cast does, from the
        // values.
        let lut = table(Dtype::F8E4M3);
        let mut i = 0usize;
        grid_runs(r, g, first, count, bufs, |src, s, _| {
            for &b in src {
                let v = lut[b as usize] * s;
                let h = u16::from_le_bytes([dst[2 * i], dst[2 * i + 1]]);
                if h & 0x7c00 == 0x7c00 {
                    if h & 0x03ff != 0 {
                        stats.nan += 1;
                    } else if v.is_finite() {
                        stats.overflow += 1;
                        stats.max_overflow = stats.max_overflow.max(v.abs() as f64);
                    } else {
                        stats.inf += 1;
                    }
                }
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
    bufs: &mut [Vec<u8>; 4],
    mut run: impl FnMut(&[u8], f32, Option<f32>),
) -> Result<()> {
    let [qb, sb, zb, _] = bufs;
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
            let n = (bc - c0 % bc).min(row_end - e) as usize;
            let k = if g.per_tensor {
                0
            } else {
                base + (c0 / bc) as usize
            };
            run(&q[qi..qi + n], sv[k], zv.get(k).copied());
            qi += n;
            e += n as u64;
            c0 += n as u64;
        }
    }
    Ok(())
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

/// compressed-tensors `pack-quantized`: rows of densely packed offset-binary codes,
/// `(q − z) × s` with the codes' offset cancelling between `q` and `z` (no zero points:
/// `z` is the offset). Whole 4-bit rows in input order take the AVX2 row kernel.
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
    let offset = 1u32 << (p.bits - 1);
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
    let groups = p.groups as usize;
    // The zero code of each group for the row at hand, as an integer and as f32.
    let (mut zi, mut zf) = (vec![offset; groups], vec![offset as f32; groups]);
    #[cfg(target_arch = "x86_64")]
    let whole_rows = gi.is_none()
        && p.bits == 4
        && cols.is_multiple_of(8)
        && p.group.is_multiple_of(8)
        && avx2();
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
        if let Some(zw) = &zeros {
            // Column g's bitstream: its word k is zw[k · groups + g].
            for (g, (zi, zf)) in zi.iter_mut().zip(zf.iter_mut()).enumerate() {
                let word = |k: usize| zw.get(k * groups + g).copied().unwrap_or(0);
                *zi = bits_at(word, o, p.bits);
                *zf = *zi as f32;
            }
        }
        #[cfg(target_arch = "x86_64")]
        if whole_rows && i0 == 0 && i1 == cols {
            let at = out.len();
            out.resize(at + cols as usize, 0.0);
            // SAFETY: the CPU has AVX2 (checked at run time); the row's words hold its
            // `cols` codes, eight a word.
            unsafe { int4_row_avx2(row, &mut out[at..], srow, &zf, p.group as usize) };
            continue;
        }
        for i in i0..i1 {
            let g = match &gi {
                Some(gi) => gi[i as usize] as usize,
                None => (i / p.group) as usize,
            };
            let q = bitstream(row, i, p.bits) as i32;
            out.push((q - zi[g] as i32) as f32 * srow[g]);
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
    let packed = (ins * g.bits as u64 / 32) as usize;
    let qt = r.info(g.qweight);
    let all = r.bytes_read(g.qweight, 0, qt.len, qb, o0 == 0)?;
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
        let mut st = vec![0f32; groups * width];
        let mut zt = vec![0f32; groups * width];
        for oo in 0..width {
            for k in 0..groups {
                st[k * width + oo] = scale[oo * groups + k];
                zt[k * width + oo] = zero[oo * groups + k];
            }
        }
        let t = GidxTile {
            words: all,
            outs: outs as usize,
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
    // The other rows' packed columns, transposed: `wt[oo − blocks][k]`, sixteen packed
    // rows at a time, each read in order: each tile row gets 64 contiguous bytes.
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
    for oo in blocks..width {
        let w = &wt[(oo - blocks) * packed..(oo - blocks + 1) * packed];
        let out = &mut tile[oo * ins as usize..(oo + 1) * ins as usize];
        let (s, z) = (
            &scale[oo * groups..(oo + 1) * groups],
            &zero[oo * groups..(oo + 1) * groups],
        );
        #[cfg(target_arch = "x86_64")]
        if plain && bits == 4 && avx2() {
            // SAFETY: the CPU has AVX2 (checked at run time).
            unsafe { int4_row_avx2(w, out, s, z, g.group as usize) };
            continue;
        }
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

/// One output row of 4-bit codes in input order (GPTQ's, compressed-tensors'; group
/// `group`, a multiple of 8):
/// `out[8k + j] = (nibble j of w[k] − z) × s` in f32, with the group's `s` and `z`, eight
/// values per word with AVX2 (the scalar loop's arithmetic, the same two roundings).
///
/// # Safety
///
/// The CPU must support AVX2. Panics (before any store) when `out` is shorter than
/// `8 · w.len()` or the groups do not cover the row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn int4_row_avx2(w: &[u32], out: &mut [f32], s: &[f32], z: &[f32], group: usize) {
    use std::arch::x86_64::*;
    let per = group / 8;
    assert!(per > 0 && out.len() >= w.len() * 8 && s.len().min(z.len()) * per >= w.len());
    // SAFETY: stores of 8 f32 at out[8k..8k + 8] for k < w.len() (inside by the assert).
    unsafe {
        let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        let mask = _mm256_set1_epi32(15);
        for (gk, ws) in w.chunks(per).enumerate() {
            let (sv, zv) = (_mm256_set1_ps(s[gk]), _mm256_set1_ps(z[gk]));
            for (j, &word) in ws.iter().enumerate() {
                let q = _mm256_and_si256(
                    _mm256_srlv_epi32(_mm256_set1_epi32(word as i32), shifts),
                    mask,
                );
                let v = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(q), zv), sv);
                _mm256_storeu_ps(out.as_mut_ptr().add((gk * per + j) * 8), v);
            }
        }
    }
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
    let whole = |r: TensorRef| rel(r, 0, info(r).len);
    let end = first + count;
    // The piece that ends the weight releases its scale-like components whole (their
    // pages a piece shares with the next are not released by the piece).
    let last = end == d.info.numel;
    match &d.kernel {
        Kernel::Grid(g) => {
            rel(g.q, first, count);
            if last {
                [Some(g.scale), g.zero]
                    .into_iter()
                    .flatten()
                    .for_each(whole);
            }
        }
        Kernel::Packed(p) => {
            let cols = p.cols.max(1);
            let (o0, o1) = (first.div_ceil(cols), end / cols);
            if o1 > o0 {
                rel(p.packed, o0 * p.row_words * 4, (o1 - o0) * p.row_words * 4);
                // Int4 codes with a BF16 scale per 32 (Kimi-K2's W4A16): the scales are
                // an eighth of the input, released with their rows.
                let es = info(p.scale).dtype.size() as u64;
                rel(p.scale, o0 * p.groups * es, (o1 - o0) * p.groups * es);
            }
            if last {
                [Some(p.scale), p.zero, p.g_idx]
                    .into_iter()
                    .flatten()
                    .for_each(whole);
            }
        }
        Kernel::Gptq(g) if last => [Some(g.qweight), Some(g.scales), g.qzeros, g.g_idx]
            .into_iter()
            .flatten()
            .for_each(whole),
        Kernel::Awq(a) if last => [a.qweight, a.qzeros, a.scales].into_iter().for_each(whole),
        Kernel::Mxfp4(m) => {
            let per = m.groups * 32 * m.rows;
            for e in first / per..end / per {
                if (e + 1) * per <= end {
                    rel(m.blocks, e * m.rows * m.groups * 16, m.rows * m.groups * 16);
                    rel(m.scales, e * m.rows * m.groups, m.rows * m.groups);
                    mxfp4::drop_slab(source, m, e);
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
    fn e8m0_is_a_power_of_two() {
        assert_eq!(e8m0(127), Some(1.0));
        assert_eq!(e8m0(0), Some(2f32.powi(-127)));
        assert_eq!(e8m0(254), Some(2f32.powi(127)));
        assert_eq!(e8m0(255), None);
    }

    /// The AVX2 4-bit row against the formula, scalar, with groups of 8, 128 and
    /// a last group cut short, zero points on both sides of the codes.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn int4_row_avx2_equals_the_formula() {
        if !avx2() {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for (words, group) in [(16usize, 8usize), (40, 128), (3, 128), (24, 64)] {
            let w: Vec<u32> = (0..words).map(|_| next() as u32).collect();
            let groups = (words * 8).div_ceil(group);
            let s: Vec<f32> = (0..groups)
                .map(|_| f16::from_bits((next() % 0x7800) as u16).to_f32())
                .collect();
            let z: Vec<f32> = (0..groups).map(|_| (next() % 17) as f32).collect();
            let mut out = vec![f32::NAN; words * 8];
            // SAFETY: AVX2 is present (checked above).
            unsafe { int4_row_avx2(&w, &mut out, &s, &z, group) };
            for (i, v) in out.iter().enumerate() {
                let q = (w[i / 8] >> (4 * (i % 8))) & 15;
                let want = (q as f32 - z[i / group]) * s[i / group];
                assert_eq!(
                    v.to_bits(),
                    want.to_bits(),
                    "{words} words, group {group}, value {i}"
                );
            }
        }
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
