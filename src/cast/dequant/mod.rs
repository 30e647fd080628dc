//! Dequantization of pre-quantized weights, a piece at a time, inside the cast stage.
//!
//! Each kernel computes the f32 values of output elements `[first, first + count)` of a
//! dequantized weight ([`Dequantized`], described by `source/scheme/`) straight from
//! the mapped (or read) codes and their scales: the reference implementations'
//! arithmetic in f32, the code times its scale with the zero point subtracted first
//! where there is one. The cast stage then rounds these values once to the target
//! dtype with the usual policy (RNE, overflow checked), or quantizes them to int8.
//! Nothing holds a whole tensor in f32: a piece is about 1 MiB of values. Where a
//! kernel can write the target type itself ([`fill_half`]: bitsandbytes, NVFP4, both
//! MXFP4s and LLM.int8 into f16 or bf16, an FP8 E4M3 grid into f16), it does, bit for
//! bit what the f32 values and the cast give, with what the cast would have counted.
//! Where a weight's codes go into V2 unchanged ([`carry`]), [`codes`] writes them.
//!
//! A scale that is NaN or infinite (an E8M0 255, a corrupt f32), and a `g_idx` past
//! the group count, are errors naming the tensor: the value they would make is not the
//! checkpoint's weight.
//!
//! One file per kernel, mirroring `source/scheme/`: `grid` (FP8 and int8 codes on a
//! grid of scales), `compressed_tensors` (`pack-quantized`), `gptq`, `awq`, `mxfp4`,
//! `fp4` (NVFP4 and compressed-tensors' MXFP4), `bitsandbytes` (NF4, FP4, LLM.int8);
//! each implements [`Decode`] for its description, and [`decoder`] is the table from
//! a [`Kernel`] to its decoder. `bits` holds the packed-integer helpers several of them
//! share (the bitstream reader, the 4-bit row, 4-bit codes as carried bytes), `half`
//! the direct f16/bf16 writers (a group's 16 values as a table of the target's bits,
//! LLM.int8 rows), `simd` the CPU checks and the 8 × 8 transpose. This file drives them: the reader of a weight's components, the
//! per-worker buffers, the transposed kernels' rows, the release of what a piece read.

mod awq;
mod bits;
mod bitsandbytes;
mod compressed_tensors;
mod fp4;
mod gptq;
mod grid;
mod half;
mod mxfp4;
mod simd;

use std::cell::RefCell;

use self::half::Half;
use crate::cast::CastStats;
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::plan::Carry;
use crate::source::{Dequantized, Kernel, Source, TensorInfo, TensorRef};

/// Output values per piece of a dequantized row (1 MiB of f32): the piece stays in the
/// CPU cache between its dequantization and its cast.
pub(crate) const PIECE_VALUES: u64 = 1 << 18;

/// The decoder of one kind of description (a variant of [`Kernel`]), in the file of
/// its scheme family.
trait Decode {
    /// The output rows a piece holds a multiple of (see [`piece_row_unit`]).
    fn row_unit(&self) -> u64 {
        1
    }

    /// Fills `out` with the f32 values of elements `[first, first + count)` of the
    /// weight `r` reads (`count` is not 0), with this worker's buffers `bufs`.
    fn fill(
        &self,
        r: &Reader,
        first: u64,
        count: u64,
        bufs: &mut Bufs,
        out: &mut Vec<f32>,
    ) -> Result<()>;

    /// Writes elements `[first, first + count)` as `to` bits into `dst` (two bytes
    /// each) where this decoder writes that type directly: see [`fill_half`]. `None`
    /// (nothing written) where it does not.
    fn fill_half(
        &self,
        _r: &Reader,
        _to: Half,
        _range: (u64, u64),
        _bufs: &mut Bufs,
        _dst: &mut [u8],
    ) -> Result<Option<CastStats>> {
        Ok(None)
    }

    /// Releases the mapped pages of the components that the piece `p` was the last to
    /// read (see [`release`]).
    ///
    /// # Safety
    ///
    /// As [`release`].
    unsafe fn release(&self, p: &Release);

    /// Whether this weight's codes go into V2 unchanged ([`carry`]): its groups as
    /// contiguous runs of the flattened output and the width of its codes, or why not.
    /// Decided from the description and small metadata (a `g_idx`), at plan time.
    fn carry(&self, _r: &Reader) -> std::result::Result<Carry, String> {
        Err("its codes are not integers with scales".into())
    }

    /// Pushes into `sink` the codes of elements `[first, first + count)` (whole
    /// groups of [`Decode::carry`]'s, or the end of the weight), shifted into
    /// [−128, 127], and each group's scale and zero point (shifted alike): the
    /// seed loader's `(q − z) × s` in f32 is then [`Decode::fill`]'s value. Only
    /// called where `carry` said yes.
    fn codes(
        &self,
        r: &Reader,
        _first: u64,
        _count: u64,
        _bufs: &mut Bufs,
        _sink: &mut Sink,
    ) -> Result<()> {
        Err(Error::internal(format!(
            "`{}` has no codes to carry",
            crate::error::sanitize(&r.d.name)
        )))
    }
}

/// Where [`Decode::codes`] writes: int8 codes in order, and a scale and zero point at
/// the start of every group (`group` elements of the flattened weight).
pub(crate) struct Sink<'a> {
    /// The codes, one byte each, from the first element asked for.
    q: &'a mut [u8],
    /// Codes written.
    at: usize,
    /// Elements whose groups' scales are recorded.
    marked: usize,
    /// The element `q[0]` is.
    first: u64,
    group: u64,
    scales: &'a mut Vec<f32>,
    zero_points: &'a mut Vec<f32>,
}

impl Sink<'_> {
    /// The next `n` elements, all of one stored group with scale `s` and zero point
    /// `z`: records their scale ([`Sink::mark`]), and returns their code bytes for the
    /// caller to fill ([`Sink::take`]).
    #[inline]
    fn run(&mut self, n: usize, s: f32, z: f32) -> Option<&mut [u8]> {
        self.mark(n, s, z);
        self.take(n)
    }

    /// The next `n` elements (counted apart from the codes) are all of one stored
    /// group with scale `s` and zero point `z`: records them for each V2 group they
    /// start.
    #[inline]
    fn mark(&mut self, n: usize, s: f32, z: f32) {
        let at = self.first + self.marked as u64;
        let g = self.group;
        for _ in at.div_ceil(g)..(at + n as u64).div_ceil(g) {
            self.scales.push(s);
            self.zero_points.push(z);
        }
        self.marked += n;
    }

    /// The code bytes of the next `n` elements, for the caller to fill (codes in
    /// [−128, 127] as bytes); `None` past the end of the codes asked for.
    #[inline]
    fn take(&mut self, n: usize) -> Option<&mut [u8]> {
        let out = self.q.get_mut(self.at..self.at + n);
        self.at += n;
        out
    }
}

/// The largest group of elements of `len`-long rows that never straddles a group of
/// `group` inputs nor a row: the row (per channel) when one group spans it, else
/// `gcd(group, len)`; an error when that is too small to be worth its scales.
fn row_groups(group: u64, len: u64) -> std::result::Result<u64, String> {
    if group >= len {
        return Ok(len);
    }
    let (mut a, mut b) = (group, len);
    while b != 0 {
        (a, b) = (b, a % b);
    }
    if a < MIN_CARRY_GROUP {
        return Err(format!(
            "groups of {group} do not tile rows of {len} (V2 groups would hold {a})"
        ));
    }
    Ok(a)
}

/// The smallest V2 group a weight whose groups do not divide its rows is carried with
/// (a scale and a zero point cost 8 bytes: at 16 elements, half a byte each).
const MIN_CARRY_GROUP: u64 = 16;

/// How integer codes of `bits` in groups of `group` inputs along rows of `row` are
/// carried: their `g_idx` (of `groups` groups), if any, must be in input order, and
/// the groups must tile the rows ([`row_groups`]). GPTQ and compressed-tensors share it.
fn integer_carry(
    r: &Reader,
    g_idx: Option<TensorRef>,
    (groups, group): (u64, u64),
    row: u64,
    bits: u32,
) -> std::result::Result<Carry, String> {
    if let Some(g) = g_idx {
        let gi = r
            .groups(g, groups, &mut Vec::new())
            .map_err(|e| e.to_string())?;
        in_order(&gi, group)?;
    }
    let group = row_groups(group, row.max(1))?;
    Ok(Carry { group, bits })
}

/// Checks that `g_idx` entries `gi` are in input order (`gi[i] == i / group`).
fn in_order(gi: &[u32], group: u64) -> std::result::Result<(), String> {
    match gi
        .iter()
        .enumerate()
        .all(|(i, &g)| g as u64 == i as u64 / group)
    {
        true => Ok(()),
        false => Err("act-order g_idx".into()),
    }
}

/// Whether `d`'s codes go into V2 unchanged, and how ([`Decode::carry`]).
pub(crate) fn carry(source: &Source, d: &Dequantized) -> std::result::Result<Carry, String> {
    decoder(&d.kernel).carry(&Reader { source, d })
}

/// The carried codes of elements `[first, first + count)` of `d` into `q` (`count`
/// bytes; `first` a multiple of `group`, the carried group [`carry`] gave), and their
/// groups' scales and zero points: `(scales, zero_points)`.
///
/// # Errors
///
/// As [`fill`].
pub(crate) fn codes(
    source: &Source,
    d: &Dequantized,
    group: u64,
    first: u64,
    q: &mut [u8],
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (mut scales, mut zero_points) = (Vec::new(), Vec::new());
    let count = q.len() as u64;
    if count == 0 {
        return Ok((scales, zero_points));
    }
    let mut sink = Sink {
        q,
        at: 0,
        marked: 0,
        first,
        group: group.max(1),
        scales: &mut scales,
        zero_points: &mut zero_points,
    };
    let r = Reader { source, d };
    with_bufs(|bufs| decoder(&d.kernel).codes(&r, first, count, bufs, &mut sink))?;
    let at = sink.at as u64;
    let groups = count.div_ceil(group.max(1)) as usize;
    if at != count
        || sink.marked as u64 != count
        || scales.len() != groups
        || zero_points.len() != groups
    {
        return Err(Error::internal(format!(
            "`{}`: {at} codes and {} scales carried for {count} elements",
            crate::error::sanitize(&d.name),
            scales.len()
        )));
    }
    Ok((scales, zero_points))
}

/// The decoder of each description: a new format is one line here (its description a
/// variant of [`Kernel`], made in its family's file in `source/scheme/`; its decoder a
/// file beside this one).
fn decoder(k: &Kernel) -> &dyn Decode {
    match k {
        Kernel::Grid(g) => g,
        Kernel::Packed(p) => p,
        Kernel::Gptq(g) => g,
        Kernel::Awq(a) => a,
        Kernel::Mxfp4(m) => m,
        Kernel::Fp4(f) => f,
        Kernel::Bitsandbytes(b) => b,
    }
}

/// The output rows a piece of `d` holds a multiple of: 1, or what its decoder needs so
/// that no stored group is decoded twice (for MXFP4, whose output rows are columns of
/// the stored blocks, whole groups of 32).
pub(crate) fn piece_row_unit(d: &Dequantized) -> u64 {
    decoder(&d.kernel).row_unit()
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

/// Scale-like values (f32, bf16, f16, E8M0 bytes, F8_E4M3, integers) as f32, appended
/// to `out`.
fn widen_scales(d: Dtype, b: &[u8], out: &mut Vec<f32>) {
    match d {
        Dtype::F32 | Dtype::Bf16 | Dtype::F16 => crate::cast::widen(d, b, out),
        Dtype::U8 | Dtype::F8E8M0 => out.extend(b.iter().map(|&e| e8m0(e).unwrap_or(f32::NAN))),
        Dtype::F8E4M3 => {
            let t = grid::table(Dtype::F8E4M3);
            out.extend(b.iter().map(|&c| t[c as usize]))
        }
        Dtype::I8 => out.extend(b.iter().map(|&v| v as i8 as f32)),
        Dtype::I32 => out.extend(
            b.chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32),
        ),
        _ => {}
    }
}

/// A worker's read buffers, reused across pieces: codes, scales, zero points, group
/// indices (as each kernel uses them).
type Bufs = [Vec<u8>; 4];

thread_local! {
    /// Buffers a worker reads components into in read mode, reused across pieces.
    static BUFS: RefCell<Bufs> = const {
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
    with_bufs(|bufs| decoder(&d.kernel).fill(&r, first, count, bufs, out))?;
    debug_assert_eq!(out.len() as u64, count);
    Ok(())
}

/// Fills `dst` with elements `[first, first + count)` of `d` cast to `to`, where the
/// kernel writes that type directly (bitsandbytes, NVFP4, compressed-tensors MXFP4 and
/// LLM.int8 into f16 or bf16; gpt-oss MXFP4 into f16 or bf16, in whole output rows; an
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
    let Some(to) = Half::of(to) else {
        return Ok(None);
    };
    let r = Reader { source, d };
    with_bufs(|bufs| decoder(&d.kernel).fill_half(&r, to, (first, count), bufs, dst))
}

/// Runs `f` with this worker's read buffers (fresh ones if `f` re-enters).
fn with_bufs<T>(f: impl FnOnce(&mut Bufs) -> T) -> T {
    BUFS.with(|b| match b.try_borrow_mut() {
        Ok(mut b) => f(&mut b),
        Err(_) => f(&mut [Vec::new(), Vec::new(), Vec::new(), Vec::new()]),
    })
}

/// For the kernels whose output is the stored layout transposed: computes whole output
/// rows (`row_len` values each) covering `[first, first + count)` with `rows(o0, o1,
/// tile)`, then keeps the requested range.
fn transposed(
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

/// What a piece `[first, end)` of a weight releases: the byte ranges of its
/// components, through [`Release::bytes`] and [`Release::whole`].
struct Release<'a> {
    source: &'a Source,
    /// The piece's first element and the element after its last.
    first: u64,
    end: u64,
    /// True when the piece ends the weight: it releases the scale-like components
    /// whole (their pages a piece shares with the next are not released by the piece).
    last: bool,
}

impl Release<'_> {
    /// The stored tensor `r`.
    fn info(&self, r: TensorRef) -> &TensorInfo {
        &self.source.shards[r.shard].header.tensors[r.tensor]
    }

    /// Releases bytes `[at, at + len)` of component `r`.
    ///
    /// # Safety
    ///
    /// As [`release`].
    unsafe fn bytes(&self, r: TensorRef, at: u64, len: u64) {
        // SAFETY: forwarded to the caller.
        unsafe { self.source.shards[r.shard].release_bytes(self.info(r), at, len) }
    }

    /// Releases the whole of component `r`.
    ///
    /// # Safety
    ///
    /// As [`release`].
    unsafe fn whole(&self, r: TensorRef) {
        // SAFETY: forwarded to the caller.
        unsafe { self.bytes(r, 0, self.info(r).len) }
    }
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
    let end = first + count;
    let p = Release {
        source,
        first,
        end,
        last: end == d.info.numel,
    };
    // SAFETY: forwarded to the caller.
    unsafe { decoder(&d.kernel).release(&p) }
}

/// A xorshift64 generator from `seed`: the kernels' tests draw their codes and scales
/// from it.
#[cfg(test)]
fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e8m0_is_a_power_of_two() {
        assert_eq!(e8m0(127), Some(1.0));
        assert_eq!(e8m0(0), Some(2f32.powi(-127)));
        assert_eq!(e8m0(254), Some(2f32.powi(127)));
        assert_eq!(e8m0(255), None);
    }

    #[test]
    fn carried_groups_tile_rows_and_follow_the_input_order() {
        assert_eq!(row_groups(128, 128), Ok(128));
        assert_eq!(row_groups(128, 64), Ok(64));
        assert_eq!(row_groups(32, 128), Ok(32));
        assert_eq!(row_groups(128, 192), Ok(64));
        assert_eq!(row_groups(48, 64), Ok(16));
        assert_eq!(
            row_groups(50, 128),
            Err("groups of 50 do not tile rows of 128 (V2 groups would hold 2)".into())
        );
        assert_eq!(in_order(&[0, 0, 1, 1, 2], 2), Ok(()));
        assert_eq!(in_order(&[0, 1, 0, 1], 2), Err("act-order g_idx".into()));
    }
}
