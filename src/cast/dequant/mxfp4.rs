//! MXFP4 (gpt-oss): `*_blocks` `[E, R, G, 16]` of FP4 E2M1 nibbles (low first) and
//! `*_scales` `[E, R, G]` of E8M0 exponents, dequantized to `[E, G·32, R]`, the stored
//! values transposed, as `transformers.integrations.mxfp4.convert_moe_packed_tensors`
//! gives them. A piece is some output rows: columns of the stored blocks, read
//! through a per-worker slab of regrouped groups ([`Slab`]), decoded into f32 for the
//! cast ([`mxfp4`]) or, for an f16 or bf16 target, straight into its bits
//! ([`mxfp4_half`]): an FP4 value times a power of two is exact in f32, so its
//! rounding to the target is the only rounding either way.

use std::cell::RefCell;

use half::f16;

#[cfg(target_arch = "x86_64")]
use super::avx2;
use super::{e8m0, Reader};
use crate::cast::CastStats;
use crate::error::{Error, Result};
use crate::source::scheme::Mxfp4;
use crate::source::{Source, TensorRef};

/// The FP4 E2M1 values by nibble (transformers' `FP4_VALUES`, the OCP MX table): what
/// [`fp4`] computes, checked by the tests.
#[cfg(test)]
const FP4: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

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
pub(super) fn mxfp4(
    r: &Reader,
    m: &Mxfp4,
    o0: u64,
    o1: u64,
    bufs: &mut [Vec<u8>; 4],
    tile: &mut [f32],
) -> Result<()> {
    let rows = m.rows as usize;
    groups(r, m, o0, o1, bufs, |gr, at| {
        group_f32(gr, &mut tile[at as usize * rows..])
    })
}

/// MXFP4: output rows `[o0, o1)` straight into `out` as `to` (f16 or bf16) bits,
/// little-endian, row `o` at `(o − o0) · R · 2`: what [`mxfp4`] and the cast after it
/// give, bit for bit (sixteen stored rows whose scales keep every value normal in `to`
/// are exact by integer arithmetic; other rows are multiplied in f32 and rounded to
/// nearest even); returns the infinities, counted as the cast counts them.
pub(super) fn mxfp4_half(
    r: &Reader,
    m: &Mxfp4,
    o0: u64,
    o1: u64,
    bufs: &mut [Vec<u8>; 4],
    to: Half,
    out: &mut [u8],
) -> Result<CastStats> {
    let rows = m.rows as usize;
    let mut stats = CastStats::default();
    groups(r, m, o0, o1, bufs, |gr, at| {
        group_half(gr, to, &mut out[at as usize * rows * 2..], &mut stats)
    })?;
    Ok(stats)
}

/// One group's wanted output rows as f32 into `out` (row `c` at `(c − lo) · R`), with
/// AVX2 where the CPU has it; returns the stored row of an E8M0 NaN scale.
fn group_f32(gr: &Group, out: &mut [f32]) -> std::result::Result<(), u64> {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 (checked at run time).
        return unsafe { mxfp4_group_avx2(gr, out) };
    }
    mxfp4_group::<false>(gr, out)
}

/// One group's wanted output rows as `to` bits into `out` (row `c` at `(c − lo) · R ·
/// 2` bytes), with AVX2 where the CPU has it; returns the stored row of an E8M0 NaN
/// scale.
fn group_half(
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

/// Runs `each(group, at)` for the groups covering output rows `[o0, o1)`, through this
/// worker's slab: `at` is the group's first wanted output row counted from `o0`.
fn groups(
    r: &Reader,
    m: &Mxfp4,
    o0: u64,
    o1: u64,
    bufs: &mut [Vec<u8>; 4],
    mut each: impl FnMut(&Group, u64) -> std::result::Result<(), u64>,
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
            let base = e * cols + c0 - o0;
            // Expert e's blocks [R, G, 16] and scales [R, G], read when a slab is
            // copied (a fresh piece's pages were not populated by an earlier one).
            let fresh = c0 == 0;
            let fill = |slab: &mut Slab, key| {
                let blocks = r.bytes_read(m.blocks, e * rows * g * 16, rows * g * 16, qb, fresh)?;
                let scales = r.bytes_read(m.scales, e * rows * g, rows * g, sb, fresh)?;
                slab.hold(key, per, &Span { blocks, scales, groups: g, rows });
                Ok(())
            };
            let each = |gr: &Group, at: u64| each(gr, base + at);
            match expert_rows(slab, (r.source.id, m.blocks, e), per, c0, c1, fill, each) {
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

/// Output rows `[c0, c1)` of one expert (`key`: source id, blocks tensor, expert),
/// group by group through `slab` (`per` groups a slab): `each(group, at)` decodes the
/// wanted rows of a group, the first of them `at` rows after `c0`, and returns the
/// stored row of an E8M0 NaN scale; `fill` copies the slab of a key from the expert's
/// stored bytes ([`Slab::hold`]).
fn expert_rows(
    slab: &mut Slab,
    key: (u64, TensorRef, u64),
    per: u64,
    c0: u64,
    c1: u64,
    mut fill: impl FnMut(&mut Slab, (u64, TensorRef, u64, u64)) -> Result<()>,
    mut each: impl FnMut(&Group, u64) -> std::result::Result<(), u64>,
) -> std::result::Result<(), Fail> {
    for gg in c0 / 32..(c1 - 1) / 32 + 1 {
        let want = (key.0, key.1, key.2, gg / per * per);
        if slab.key != Some(want) {
            fill(slab, want).map_err(Fail::Read)?;
        }
        let (blocks, scales) = slab.group(gg);
        let (lo, hi) = (c0.max(gg * 32), c1.min(gg * 32 + 32));
        let group = Group {
            blocks,
            scales,
            lo: lo - gg * 32,
            hi: hi - gg * 32,
        };
        each(&group, lo - c0).map_err(|rr| Fail::NanScale(rr, gg))?;
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
                let rows = super::transpose8_avx2([
                    ld(0),
                    ld(1),
                    ld(2),
                    ld(3),
                    ld(4),
                    ld(5),
                    ld(6),
                    ld(7),
                ]);
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
/// The high bytes of FP4[n] as f16 (0.5 = 0x3800, 6 = 0x4600; every low byte is 0).
#[cfg(target_arch = "x86_64")]
const FP4_F16_HI: [u8; 16] = [
    0x00, 0x38, 0x3C, 0x3E, 0x40, 0x42, 0x44, 0x46, 0x80, 0xB8, 0xBC, 0xBE, 0xC0, 0xC2, 0xC4, 0xC6,
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

/// A 16-bit float type MXFP4 values are written as directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Half {
    F16,
    Bf16,
}

impl Half {
    /// The type's mantissa bits, and the E8M0 codes `[lo, hi]` whose scale keeps every
    /// nonzero FP4 value (0.5 to 6, exponents −1 to 2) a normal number of the type:
    /// exponents −14 to 15 for f16, −126 to 127 for bf16.
    fn exact(self) -> (u32, u8, u8) {
        match self {
            Half::F16 => (10, 127 - 13, 127 + 13),
            Half::Bf16 => (7, 127 - 125, 127 + 125),
        }
    }

    /// `v` rounded to nearest even, as the cast rounds it.
    fn round(self, v: f32) -> u16 {
        match self {
            Half::F16 => f16::from_f32(v).to_bits(),
            Half::Bf16 => crate::cast::kernels::f32_to_bf16_bits(v.to_bits()),
        }
    }

    /// The high and low bytes of each FP4 value in this type, by nibble.
    #[cfg(target_arch = "x86_64")]
    fn tables(self) -> ([u8; 16], [u8; 16]) {
        match self {
            Half::F16 => (FP4_F16_HI, [0; 16]),
            Half::Bf16 => (FP4_BF16_HI, FP4_BF16_LO),
        }
    }
}

/// Output rows `[lo, hi)` of one group as `to` bits into `out` (row `c` at `(c − lo) ·
/// R · 2` bytes), for stored rows `rows`: each value FP4 × scale in f32, rounded to
/// nearest even, an infinity counted as the cast counts it (from an f32 product that
/// is already infinite: a source infinity; otherwise an overflow). Returns the row of
/// an E8M0 NaN scale.
fn half_group(
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
unsafe fn half_group_avx2(
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

/// Forgets this worker's slab if it holds expert `e` of `m` in `source` (the expert's
/// pages are released: it is not read again, and its memory goes back).
pub(super) fn drop_slab(source: &Source, m: &Mxfp4, e: u64) {
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

#[cfg(test)]
mod tests {
    use super::*;

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

    /// What a group decode writes, by sink.
    #[derive(Clone, Copy, Debug)]
    enum Sink {
        F32,
        Half(Half),
    }

    /// What [`expert_rows`] decoded into each sink for output rows `[c0, c1)` of an
    /// expert stored as `blocks` and `scales` (`key` its slab key).
    struct Decoded {
        done: std::result::Result<(), Fail>,
        f32s: Vec<f32>,
        bits: Vec<u8>,
        stats: CastStats,
    }

    fn decode(
        slab: &mut Slab,
        key: (u64, TensorRef, u64),
        (blocks, scales, g, rows): (&[u8], &[u8], u64, u64),
        c0: u64,
        c1: u64,
        sink: Sink,
    ) -> Decoded {
        let n = ((c1 - c0) * rows) as usize;
        let (mut f32s, mut bits) = (vec![f32::NAN; n], vec![0xA5u8; n * 2]);
        let mut stats = CastStats::default();
        let fill = |slab: &mut Slab, key: (u64, TensorRef, u64, u64)| {
            let span = Span {
                blocks,
                scales,
                groups: g,
                rows,
            };
            slab.hold(key, 4, &span);
            Ok(())
        };
        let each = |gr: &Group, at: u64| match sink {
            Sink::F32 => group_f32(gr, &mut f32s[(at * rows) as usize..]),
            Sink::Half(h) => group_half(gr, h, &mut bits[(at * rows * 2) as usize..], &mut stats),
        };
        let done = expert_rows(slab, key, 4, c0, c1, fill, each);
        Decoded {
            done,
            f32s,
            bits,
            stats,
        }
    }

    /// Output rows of MXFP4 experts through slabs of 4 groups (9 groups: the last slab
    /// short; 37 stored rows: the last block of 16 short), in pieces that start and end
    /// inside groups and cross slabs, the two experts alternating (a slab of the other
    /// is never reused), into f32 and straight into f16 and bf16, with scales that keep
    /// every value normal in f16 and with scales over the whole E8M0 range (f16
    /// subnormals, zeros and overflow, f32 infinities): every f32 value equals
    /// FP4[nibble] × 2^(scale − 127) at its place, and every f16 and bf16 value that
    /// number rounded once by the `half` crate, the infinities counted as the cast
    /// counts them.
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
        let normal: Vec<Vec<u8>> = (0..experts)
            .map(|_| (0..rows * g).map(|_| 114 + (next() % 27) as u8).collect())
            .collect();
        let wide: Vec<Vec<u8>> = (0..experts)
            .map(|_| {
                (0..rows * g)
                    .map(|_| match next() % 8 {
                        0 => [0, 1, 253, 254][(next() % 4) as usize],
                        _ => 95 + (next() % 70) as u8,
                    })
                    .collect()
            })
            .collect();
        let blocks_ref = TensorRef {
            shard: 0,
            tensor: 5,
        };
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
        let sinks = [Sink::F32, Sink::Half(Half::F16), Sink::Half(Half::Bf16)];
        for (scales, sink) in [&normal, &wide]
            .into_iter()
            .flat_map(|s| sinks.map(|k| (s, k)))
        {
            let direct = |e: usize, c: u64, rr: u64| {
                let (gg, k) = (c / 32, c % 32);
                let byte = blocks[e][((rr * g + gg) * 16 + k / 2) as usize];
                let nib = if k % 2 == 0 { byte & 15 } else { byte >> 4 };
                let s = scales[e][(rr * g + gg) as usize] as i32 - 127;
                FP4[nib as usize] * 2f32.powi(s)
            };
            let mut slab = Slab::default();
            let mut seen = 0u64;
            for (c0, c1) in pieces {
                for e in [0usize, 1, 0] {
                    let expert = (&blocks[e][..], &scales[e][..], g, rows);
                    let d = decode(&mut slab, (7, blocks_ref, e as u64), expert, c0, c1, sink);
                    let (out, bits) = (&d.f32s, &d.bits);
                    assert!(d.done.is_ok(), "{sink:?}");
                    let mut want = CastStats::default();
                    for c in c0..c1.min(cols) {
                        for rr in 0..rows {
                            let i = ((c - c0) * rows + rr) as usize;
                            let v = direct(e, c, rr);
                            let (got, exp) = match sink {
                                Sink::F32 => (out[i].to_bits(), v.to_bits()),
                                Sink::Half(h) => {
                                    let exp = match h {
                                        Half::F16 => f16::from_f32(v).to_bits(),
                                        Half::Bf16 => half::bf16::from_f32(v).to_bits(),
                                    };
                                    let inf = if h == Half::F16 { 0x7c00 } else { 0x7f80 };
                                    if exp & 0x7fff == inf {
                                        if v.is_finite() {
                                            want.overflow += 1;
                                            want.max_overflow =
                                                want.max_overflow.max(v.abs() as f64);
                                        } else {
                                            want.inf += 1;
                                        }
                                    }
                                    let got = u16::from_le_bytes([bits[2 * i], bits[2 * i + 1]]);
                                    (got as u32, exp as u32)
                                }
                            };
                            assert_eq!(got, exp, "{sink:?} e {e} c {c} row {rr} value {v}");
                        }
                    }
                    assert_eq!(d.stats, want, "{sink:?} piece {c0}..{c1}");
                    seen += want.overflow + want.inf;
                }
            }
            // The wide scales reach f16 overflow and f32 infinity; the usual ones do not.
            match (std::ptr::eq(scales, &wide), sink) {
                (true, Sink::Half(_)) => assert!(seen > 0, "{sink:?}"),
                (false, _) => assert_eq!(seen, 0),
                _ => {}
            }
        }
        // An E8M0 NaN scale is reported at its (row, group), by every sink.
        let mut bad = normal[0].clone();
        bad[(20 * g + 6) as usize] = 255;
        for sink in sinks {
            let expert = (&blocks[0][..], &bad[..], g, rows);
            let d = decode(
                &mut Slab::default(),
                (8, blocks_ref, 0),
                expert,
                0,
                cols,
                sink,
            );
            assert!(matches!(d.done, Err(Fail::NanScale(20, 6))), "{sink:?}");
        }
    }

    /// The 16 × 16 byte transpose and the exponent add of the AVX2 half kernel against
    /// the scalar one, every nibble with every E8M0 code that keeps f16 normal.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn half_group_avx2_equals_the_scalar_decode() {
        if !avx2() {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        let rows = 48usize;
        let blocks: Vec<u8> = (0..rows * 16).map(|i| (i * 37 + i / 16) as u8).collect();
        for to in [Half::F16, Half::Bf16] {
            for s0 in 0..=255u8 {
                let scales: Vec<u8> = (0..rows).map(|r| s0.wrapping_add(r as u8 % 3)).collect();
                let gr = Group {
                    blocks: &blocks,
                    scales: &scales,
                    lo: 3,
                    hi: 32,
                };
                let (mut a, mut b) = (vec![0u8; 29 * rows * 2], vec![0u8; 29 * rows * 2]);
                let (mut sa, mut sb) = (CastStats::default(), CastStats::default());
                let ra = half_group(&gr, to, 0..rows, &mut a, &mut sa);
                // SAFETY: AVX2 is present (checked above).
                let rb = unsafe { half_group_avx2(&gr, to, &mut b, &mut sb) };
                assert_eq!(ra, rb, "{to:?} scale {s0}");
                if ra.is_ok() {
                    assert_eq!((a, sa), (b, sb), "{to:?} scale {s0}");
                }
            }
        }
    }

    #[test]
    fn fp4_computes_the_table() {
        for n in 0..16u32 {
            assert_eq!(fp4(n).to_bits(), FP4[n as usize].to_bits(), "nibble {n}");
        }
        // The byte tables the AVX2 kernels look values up in.
        #[cfg(target_arch = "x86_64")]
        for to in [Half::F16, Half::Bf16] {
            let (hi, lo) = to.tables();
            for n in 0..16 {
                let want = to.round(FP4[n]).to_le_bytes();
                assert_eq!([lo[n], hi[n]], want, "{to:?} nibble {n}");
            }
        }
    }
}
