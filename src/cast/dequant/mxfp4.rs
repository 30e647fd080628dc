//! MXFP4 (gpt-oss): `*_blocks` `[E, R, G, 16]` of FP4 E2M1 nibbles (low first) and
//! `*_scales` `[E, R, G]` of E8M0 exponents, dequantized to `[E, G·32, R]`, the stored
//! values transposed, as `transformers.integrations.mxfp4.convert_moe_packed_tensors`
//! gives them. A piece is some output rows: columns of the stored blocks, read
//! through a per-worker slab of regrouped groups ([`Slab`]), decoded into f32 for the
//! cast ([`mxfp4`]) or, for an f16 or bf16 target, straight into its bits
//! ([`mxfp4_half`]): an FP4 value times a power of two is exact in f32, so its
//! rounding to the target is the only rounding either way.
//!
//! The slab is `slab.rs`; the decode into f32 `to_f32.rs`, into f16 or bf16
//! `to_half.rs`. The description is `source/scheme/mxfp4.rs`'s [`Mxfp4`].

mod slab;
#[cfg(test)]
mod tests;
mod to_f32;
mod to_half;

use std::ops::Range;

use super::half::Half;
use super::{transposed, Bufs, Decode, Reader, Release};
use crate::cast::CastStats;
use crate::error::{Error, Result};
use crate::source::scheme::Mxfp4;
use crate::source::TensorRef;
use slab::{drop_slab, slab_groups, Slab, Span, SLAB};
use to_f32::group_f32;
use to_half::group_half;

impl Decode for Mxfp4 {
    /// Whole groups of 32: a piece's output rows are columns of the stored blocks, so
    /// that no group is decoded twice (measured on the bench's 1.1B layout, CPU time,
    /// when a piece held at least this many rows: 1 row 2.74 s, 16 rows 2.67 s, 32 rows
    /// 2.43 s, 64 rows 2.74 s, 128 rows 2.98 s; larger pieces no longer fit the cache
    /// between the dequantization and the cast).
    fn row_unit(&self) -> u64 {
        32
    }

    fn fill(
        &self,
        r: &Reader,
        first: u64,
        count: u64,
        bufs: &mut Bufs,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        transposed(first, count, out, self.rows, |o0, o1, tile| {
            mxfp4(r, self, o0, o1, bufs, tile)
        })
    }

    /// Into f16 or bf16 ([`mxfp4_half`]), in whole output rows.
    fn fill_half(
        &self,
        r: &Reader,
        to: Half,
        (first, count): (u64, u64),
        bufs: &mut Bufs,
        dst: &mut [u8],
    ) -> Result<Option<CastStats>> {
        let row = self.rows.max(1);
        if !first.is_multiple_of(row) || !count.is_multiple_of(row) {
            return Ok(None);
        }
        let rows = first / row..(first + count) / row;
        mxfp4_half(r, self, rows, bufs, to, dst).map(Some)
    }

    /// gpt-oss stores E2M1 codes with E8M0 scales along the output of its `[in, out]`
    /// layout: V2 groups run along the flattened `[out, in]` rows, and E2M1 is not an
    /// integer grid with one zero point.
    fn carry(&self, _r: &Reader) -> std::result::Result<crate::plan::Carry, String> {
        Err("MXFP4 (gpt-oss): E2M1 codes in a transposed layout".into())
    }

    /// Each expert the piece ends, its blocks and scales, and this worker's slab of it.
    unsafe fn release(&self, p: &Release) {
        let m = self;
        let per = m.groups * 32 * m.rows;
        for e in p.first / per..p.end / per {
            if (e + 1) * per <= p.end {
                // SAFETY: forwarded to the caller.
                unsafe {
                    p.bytes(m.blocks, e * m.rows * m.groups * 16, m.rows * m.groups * 16);
                    p.bytes(m.scales, e * m.rows * m.groups, m.rows * m.groups);
                }
                drop_slab(p.source, m, e);
            }
        }
    }
}

/// MXFP4: output rows `[o0, o1)` of `[E, G·32, R]` (each `R` values) into `tile`.
fn mxfp4(r: &Reader, m: &Mxfp4, o0: u64, o1: u64, bufs: &mut Bufs, tile: &mut [f32]) -> Result<()> {
    let rows = m.rows as usize;
    groups(r, m, o0, o1, bufs, |gr, at| {
        group_f32(gr, &mut tile[at as usize * rows..])
    })
}

/// MXFP4: output rows `rows` straight into `out` as `to` (f16 or bf16) bits,
/// little-endian, row `o` at `(o − rows.start) · R · 2`: what [`mxfp4`] and the cast
/// after it give, bit for bit (sixteen stored rows whose scales keep every value normal
/// in `to` are exact by integer arithmetic; other rows are multiplied in f32 and
/// rounded to nearest even); returns the infinities, counted as the cast counts them.
fn mxfp4_half(
    r: &Reader,
    m: &Mxfp4,
    rows: Range<u64>,
    bufs: &mut Bufs,
    to: Half,
    out: &mut [u8],
) -> Result<CastStats> {
    let (o0, o1) = (rows.start, rows.end);
    let rows = m.rows as usize;
    let mut stats = CastStats::default();
    groups(r, m, o0, o1, bufs, |gr, at| {
        group_half(gr, to, &mut out[at as usize * rows * 2..], &mut stats)
    })?;
    Ok(stats)
}

/// Runs `each(group, at)` for the groups covering output rows `[o0, o1)`, through this
/// worker's slab: `at` is the group's first wanted output row counted from `o0`.
fn groups(
    r: &Reader,
    m: &Mxfp4,
    o0: u64,
    o1: u64,
    bufs: &mut Bufs,
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
            match expert_rows(slab, (r.source.id, m.blocks, e), per, c0..c1, fill, each) {
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

/// Output rows `cols` (`[c0, c1)`) of one expert (`key`: source id, blocks tensor,
/// expert), group by group through `slab` (`per` groups a slab): `each(group, at)`
/// decodes the wanted rows of a group, the first of them `at` rows after `c0`, and
/// returns the stored row of an E8M0 NaN scale; `fill` copies the slab of a key from
/// the expert's stored bytes ([`Slab::hold`]).
fn expert_rows(
    slab: &mut Slab,
    key: (u64, TensorRef, u64),
    per: u64,
    cols: Range<u64>,
    mut fill: impl FnMut(&mut Slab, (u64, TensorRef, u64, u64)) -> Result<()>,
    mut each: impl FnMut(&Group, u64) -> std::result::Result<(), u64>,
) -> std::result::Result<(), Fail> {
    let (c0, c1) = (cols.start, cols.end);
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

/// One group of an expert, regrouped: blocks `[R, 16]`, scales `[R]`, and the columns
/// `[lo, hi)` of its 32 a piece wants.
struct Group<'a> {
    blocks: &'a [u8],
    scales: &'a [u8],
    lo: u64,
    hi: u64,
}
