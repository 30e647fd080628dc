//! Stage 3, the cast: one planned row's source bytes, straight from the mapped shard,
//! become its output bytes in the writer's buffer, hashed while they are in cache, with
//! every floating-point cast checked against the overflow policy. The kernels
//! ([`kernels`]) know dtypes only; this stage knows where a row's bytes live and how to
//! stream them: a large row is cast in pieces (source pages mapped in one call and
//! released once cast, or read into a buffer in read mode, or gathered from a strided
//! PyTorch view), so the input never stays resident. A tensor chosen for quantization
//! takes the same path into int8 codes and per-unit scales ([`quant`]).

mod dequant;
mod kernels;
mod quant;

pub(crate) use crate::plan::QuantSpec;
pub(crate) use dequant::{carry, codes};
pub use kernels::{cast_and_hash, cast_into, CastStats};
pub(crate) use kernels::{value_f64, widen};
pub(crate) use quant::{dequantize, pack_int2, quantize_unit, unpack_int2};
pub use quant::{QuantError, TensorQuantError};

use kernels::{cast_hashing, Xxh3};

use crate::error::{Error, Result};
use crate::plan::{Plan, PlannedTensor, RowPlan};
use crate::source::Source;

/// Source bytes cast per piece of a row of a mapped shard: its pages are populated and
/// released in one call each.
const PIECE_BYTES: u64 = 16 << 20;

/// Source bytes per piece in read mode: small enough that the piece just read is still
/// in the CPU cache when it is cast, and a usual network file system's read size. With
/// 16 MiB pieces (two threads' worth are this machine's whole L3) each piece was read
/// back from memory: on the 4.4 GB checkpoint `--io read` took 2.23–2.98 s where the
/// mapped conversion took 1.99–2.31 s; with 1 MiB, 2.00–2.17 s.
const READ_PIECE_BYTES: u64 = 1 << 20;

/// Source bytes per piece of a row of planned tensor `t`: for a dequantized one, its
/// f32 values, in whole output rows where a row fits.
fn piece_bytes(source: &Source, t: &PlannedTensor) -> u64 {
    if let Some(d) = &t.dequant {
        let row = t.src.shape.last().copied().unwrap_or(1).max(1);
        let unit = dequant::piece_row_unit(d);
        let per = if row <= dequant::PIECE_VALUES {
            (dequant::PIECE_VALUES / row / unit).max(1) * unit * row
        } else {
            dequant::PIECE_VALUES
        };
        return per * 4;
    }
    // A strided view in read mode reads its whole span for every piece: few pieces.
    if source.shards[t.shard].is_mapped() || t.src.strides.is_some() {
        PIECE_BYTES
    } else {
        READ_PIECE_BYTES
    }
}

thread_local! {
    /// Where a worker dequantizes a piece: f32 values, reused by every piece.
    static VALUES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A source tensor as the cast reads it: `info` in shard `shard`, dequantized as `dq`
/// describes where it is a pre-quantized weight.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stored<'a> {
    /// Index of its shard.
    pub(crate) shard: usize,
    /// The tensor (the weight's own description when dequantized).
    pub(crate) info: &'a crate::source::TensorInfo,
    /// How it is dequantized, if it is.
    pub(crate) dq: Option<&'a crate::source::Dequantized>,
}

/// Source bytes of elements `[first, first + n)` of the tensor `of`: the stored bytes,
/// or a dequantized tensor's f32 values computed into `values`.
pub(crate) fn tensor_elements<'a>(
    source: &'a Source,
    of: Stored<'_>,
    first: u64,
    n: u64,
    scratch: &'a mut Vec<u8>,
    values: &'a mut Vec<f32>,
) -> Result<&'a [u8]> {
    let Stored { shard, info, dq } = of;
    match dq {
        Some(d) => {
            dequant::fill(source, d, first, n, values)?;
            Ok(bytemuck::cast_slice(values.as_slice()))
        }
        None => source.shards[shard].elements(info, first, n, scratch),
    }
}

/// How the cast reads the planned tensor `t` from the source.
fn stored(t: &PlannedTensor) -> Stored<'_> {
    Stored {
        shard: t.shard,
        info: &t.src,
        dq: t.dequant.as_ref(),
    }
}

/// Releases what a piece of `t` read (see [`crate::source::Shard::release`]).
///
/// # Safety
///
/// No slice of the piece's source bytes is read afterwards.
unsafe fn release_piece(source: &Source, t: &PlannedTensor, first: u64, n: u64) {
    match &t.dequant {
        // SAFETY: forwarded to the caller.
        Some(d) => unsafe { dequant::release(source, d, first, n) },
        // SAFETY: forwarded to the caller.
        None => unsafe { source.shards[t.shard].release(&t.src, first, n) },
    }
}

/// Runs `f` with this thread's buffer of dequantized values.
fn with_values<R>(f: impl FnOnce(&mut Vec<f32>) -> R) -> R {
    VALUES.with(|s| match s.try_borrow_mut() {
        Ok(mut b) => f(&mut b),
        Err(_) => f(&mut Vec::new()),
    })
}

thread_local! {
    /// Where a worker reads pieces in read mode (and gathers strided views): one buffer
    /// of at most a piece per thread of the conversion's pool, reused by every row it
    /// casts instead of a fresh, zeroed allocation per piece.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's scratch buffer (a fresh one if `f` re-enters).
fn with_scratch<R>(f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut b) => f(&mut b),
        Err(_) => f(&mut Vec::new()),
    })
}

/// What casting one row produced, besides its bytes.
#[derive(Debug, Clone)]
pub(crate) struct RowCast {
    /// What the cast saw (NaN, inf, overflow).
    pub(crate) stats: CastStats,
    /// XXH3-64 of the output bytes.
    pub(crate) checksum: u64,
    /// For a quantized row: its scales, zero points and error.
    pub(crate) quant: Option<RowQuant>,
}

/// The V2 side of a quantized row: one scale and zero point per unit of the row.
#[derive(Debug, Clone, Default)]
pub(crate) struct RowQuant {
    pub(crate) scales: Vec<f32>,
    pub(crate) zero_points: Vec<f32>,
    pub(crate) error: QuantError,
}

/// Casts `row` of `plan` from `source` into `dst` (exactly the row's output bytes).
///
/// # Errors
///
/// `Overflow` naming the shard and tensor when a finite value would become ±inf and
/// `allow_overflow` is false; `Internal` if the plan and the source disagree (they
/// cannot: the plan is built from the validated headers).
pub(crate) fn cast_row(
    source: &Source,
    plan: &Plan,
    row: &RowPlan,
    dst: &mut [u8],
    allow_overflow: bool,
) -> Result<RowCast> {
    let t = &plan.tensors[row.tensor];
    if let Some(spec) = t.quant {
        return quantize_row(source, plan, row, dst, spec);
    }
    let shard = &source.shards[t.shard];
    let (ss, os) = (t.src.dtype.size() as u64, t.dtype.size() as u64);
    debug_assert_eq!(dst.len() as u64, row.elems * os);
    let per = (piece_bytes(source, t) / ss).max(1);
    let mut hash = Xxh3::new();
    let mut stats = CastStats::default();
    with_scratch(|scratch| {
        with_values(|values| {
            for (k, d_piece) in dst.chunks_mut((per * os) as usize).enumerate() {
                let first = row.elem_start + k as u64 * per;
                let n = d_piece.len() as u64 / os;
                if let Some(d) = &t.dequant {
                    // A kernel that writes the target type itself: no f32 in between.
                    if let Some(piece) = dequant::fill_half(source, d, t.dtype, first, n, d_piece)?
                    {
                        hash.update(d_piece);
                        stats.merge(&piece);
                        // SAFETY: as below.
                        unsafe { release_piece(source, t, first, n) };
                        continue;
                    }
                }
                let s_piece = tensor_elements(source, stored(t), first, n, scratch, values)?;
                let piece = cast_hashing(t.src.dtype, t.dtype, s_piece, d_piece, &mut hash)
                    .ok_or_else(|| {
                        Error::internal(format!(
                            "row of `{}`: {} source bytes for {} output bytes",
                            crate::error::sanitize(&t.name),
                            s_piece.len(),
                            d_piece.len()
                        ))
                    })?;
                stats.merge(&piece);
                // SAFETY: this piece is cast and hashed, and its slice is not used again; no
                // other slice of these source elements is read again by this row.
                unsafe { release_piece(source, t, first, n) };
            }
            Ok::<(), Error>(())
        })
    })?;
    if stats.overflow > 0 && !allow_overflow {
        return Err(Error::Overflow {
            path: shard.path.clone(),
            tensor: t.name.clone(),
            from: t.src.dtype.to_string(),
            to: t.dtype.to_string(),
            count: stats.overflow,
            max_abs: stats.max_overflow,
        });
    }
    Ok(RowCast {
        stats,
        checksum: hash.digest(),
        quant: None,
    })
}

/// Quantizes `row` of a tensor with `spec` into `dst` (one code per element, int2
/// codes packed four to a byte), unit by unit: each unit's source values are widened
/// to f32 while in cache, its scale and zero point computed, its codes written and its
/// error measured.
///
/// # Errors
///
/// `Quantization` naming the tensor when a unit holds NaN or infinities (no scale
/// represents them) or spans more than f32 holds.
fn quantize_row(
    source: &Source,
    plan: &Plan,
    row: &RowPlan,
    dst: &mut [u8],
    spec: QuantSpec,
) -> Result<RowCast> {
    let t = &plan.tensors[row.tensor];
    if let (true, Some(d)) = (spec.carried, &t.dequant) {
        return carry_row(source, d, row, dst, spec);
    }
    let shard = &source.shards[t.shard];
    let ss = t.src.dtype.size() as u64;
    debug_assert_eq!(dst.len() as u64, spec.kind.bytes(row.elems));
    debug_assert_eq!(row.elem_start % spec.row_align(), 0);
    let fail = |reason: String| Error::Quantization {
        path: shard.path.clone(),
        tensor: t.name.clone(),
        reason,
    };
    // Pieces of whole units and, for packed codes, whole bytes.
    let align = spec.row_align();
    let piece_elems = ((piece_bytes(source, t) / ss).max(1) / align).max(1) * align;
    let per_byte = spec.kind.per_byte();
    let packed = per_byte > 1;
    let mut out = RowQuant::default();
    let mut hash = Xxh3::new();
    let mut x: Vec<f32> = Vec::with_capacity(spec.unit.min(PIECE_BYTES) as usize);
    let mut codes: Vec<u8> = Vec::new();
    with_scratch(|scratch| {
        with_values(|values| {
            for (k, d_piece) in dst
                .chunks_mut((piece_elems / per_byte) as usize)
                .enumerate()
            {
                let first = row.elem_start + k as u64 * piece_elems;
                let n = piece_elems.min(row.elem_start + row.elems - first);
                let s_piece = tensor_elements(source, stored(t), first, n, scratch, values)?;
                let q: &mut [u8] = if packed {
                    codes.resize(n as usize, 0);
                    &mut codes
                } else {
                    &mut *d_piece
                };
                let units = s_piece
                    .chunks((spec.unit * ss) as usize)
                    .zip(q.chunks_mut(spec.unit as usize));
                for (src, q) in units {
                    let (scale, zp) = quant::quantize_unit(
                        (spec.kind, spec.scheme),
                        t.src.dtype,
                        src,
                        &mut x,
                        q,
                        &mut out.error,
                    )
                    .map_err(|e| fail(e.to_string()))?;
                    out.scales.push(scale);
                    out.zero_points.push(zp);
                }
                if packed {
                    pack_int2(bytemuck::cast_slice(&codes), d_piece);
                }
                hash.update(d_piece);
                // SAFETY: this piece is quantized and hashed, and its slice is not used
                // again; no other slice of these source elements is read again by this row.
                unsafe { release_piece(source, t, first, n) };
            }
            Ok::<(), Error>(())
        })
    })?;
    Ok(RowCast {
        stats: CastStats::default(),
        checksum: hash.digest(),
        quant: Some(out),
    })
}

/// The sum of the squared values `(q − z) × s` of carried codes `c` (in f64, eight
/// running sums, which the compiler vectorizes).
fn sum_squares(c: &[u8], s: f32, z: f32) -> f64 {
    let mut acc = [0f64; 8];
    let mut chunks = c.chunks_exact(8);
    for ch in &mut chunks {
        for (a, &b) in acc.iter_mut().zip(ch) {
            let v = quant::dequantize(b, s, z) as f64;
            *a += v * v;
        }
    }
    let tail = chunks.remainder().iter().map(|&b| {
        let v = quant::dequantize(b, s, z) as f64;
        v * v
    });
    acc.iter().sum::<f64>() + tail.sum::<f64>()
}

/// Writes `row` of the pre-quantized weight `d` from its own codes, scales and zero
/// points (`spec` carried), a piece of whole groups at a time: no second quantization,
/// so the error is 0; `Σx²` is measured on the values the codes give.
///
/// # Errors
///
/// As [`dequant::fill`].
fn carry_row(
    source: &Source,
    d: &crate::source::Dequantized,
    row: &RowPlan,
    dst: &mut [u8],
    spec: QuantSpec,
) -> Result<RowCast> {
    // Pieces of whole groups and, for int2, whole bytes (rows are planned so).
    let align = spec.row_align();
    let per = (dequant::PIECE_VALUES / align).max(1) * align;
    let per_byte = spec.kind.per_byte();
    let mut out = RowQuant::default();
    let mut hash = Xxh3::new();
    let mut codes: Vec<u8> = Vec::new();
    for (k, d_piece) in dst.chunks_mut((per / per_byte) as usize).enumerate() {
        let first = row.elem_start + k as u64 * per;
        let n = per.min(row.elem_start + row.elems - first);
        let q: &mut [u8] = if per_byte > 1 {
            codes.resize(n as usize, 0);
            &mut codes
        } else {
            &mut *d_piece
        };
        let (scales, zero_points) = dequant::codes(source, d, spec.unit, first, q)?;
        for (c, (&s, &z)) in q
            .chunks(spec.unit as usize)
            .zip(scales.iter().zip(&zero_points))
        {
            out.error.sum_x2 += sum_squares(c, s, z);
        }
        out.error.count += n;
        out.scales.extend_from_slice(&scales);
        out.zero_points.extend_from_slice(&zero_points);
        if per_byte > 1 {
            // Carried only where the codes are 2-bit ones: in [-2, 1].
            pack_int2(bytemuck::cast_slice(&codes), d_piece);
        }
        hash.update(d_piece);
        // SAFETY: the piece's codes are copied and hashed; nothing borrowed from them
        // is read again by this row.
        unsafe { dequant::release(source, d, first, n) };
    }
    Ok(RowCast {
        stats: CastStats::default(),
        checksum: hash.digest(),
        quant: Some(out),
    })
}
