//! Stage 2, the plan: which tensors, under which names and dtypes, in which rows and
//! row groups. A [`Plan`] is only built by [`Plan::build`], which checks every limit
//! the format sets (unique names, int32 dimensions, sizes that fit), so the cast and
//! write stages can trust it.

use std::collections::HashMap;

use crate::dtype::{Dtype, TargetDtype};
use crate::error::{Error, Result};
use crate::model::Selected;
use crate::source::{Dequantized, Source, TensorInfo, TensorRef};

mod quant;

pub(crate) use quant::{Carry, CarryFn, QuantSpec};
pub use quant::{QuantScheme, QuantType, Quantize, MIN_QUANT_ELEMENTS};

/// The largest row limit or row-group budget, in bytes (Arrow `Binary` offsets are
/// i32, and a row group is one Arrow array).
pub const MAX_BUDGET_BYTES: u64 = 1 << 30;

/// The smallest part size of a parted output (`--max-file-size`), in bytes.
pub const MIN_FILE_SIZE: u64 = 1_000_000;

/// What a part file holds besides its rows' data, at most: the Parquet footer (schema,
/// row-group and column-chunk metadata, our index), the magic bytes, and per row its
/// page headers, cells and index entry ([`ROW_RESERVE`]).
const PART_RESERVE: u64 = 64 << 10;
/// Per row of a part: page headers, the small cells, its share of the footer.
const ROW_RESERVE: u64 = 1 << 10;

/// The data bytes a part of at most `max_file_size` bytes may plan: its size less the
/// fixed reserve, less 1/512 for page framing a compressor may add to data it cannot
/// shrink.
pub fn part_data_bytes(max_file_size: u64) -> u64 {
    let room = max_file_size.saturating_sub(PART_RESERVE);
    (room - room / 512).max(1)
}

/// A tensor of the plan.
#[derive(Debug, Clone)]
pub(crate) struct PlannedTensor {
    /// Shard index.
    pub(crate) shard: usize,
    /// The source tensor.
    pub(crate) src: TensorInfo,
    /// Output name.
    pub(crate) name: String,
    /// Output dtype.
    pub(crate) dtype: Dtype,
    /// Output bytes.
    pub(crate) out_len: u64,
    /// First row.
    pub(crate) first_row: u64,
    /// Rows it spans (1 unless split).
    pub(crate) rows: u64,
    /// How it is quantized (`dtype` is then int8, the codes' type; int2 codes are
    /// packed four to a byte), if it is.
    pub(crate) quant: Option<QuantSpec>,
    /// How a pre-quantized weight is dequantized (`src` then describes its f32
    /// values), if it is one.
    pub(crate) dequant: Option<Dequantized>,
    /// For a pre-quantized weight quantized from its dequantized values: why its codes
    /// were not carried.
    pub(crate) requantized: Option<String>,
}

impl PlannedTensor {
    /// Stored source bytes that `elems` of its elements read (a dequantized weight's
    /// share of its codes and scales).
    pub(crate) fn src_bytes(&self, elems: u64) -> u64 {
        match &self.dequant {
            Some(d) if d.info.numel > 0 => {
                (elems as u128 * d.stored_bytes as u128 / d.info.numel as u128) as u64
            }
            _ => elems * self.src.dtype.size() as u64,
        }
    }

    /// Output bytes of `elems` of its elements (from a multiple of 4 for int2 codes).
    pub(crate) fn out_bytes(&self, elems: u64) -> u64 {
        match self.quant {
            Some(q) => q.kind.bytes(elems),
            None => elems * self.dtype.size() as u64,
        }
    }

    /// The bytes `elems` elements of this tensor write: [`PlannedTensor::out_bytes`],
    /// and for quantized ones their units' f32 scale and zero point (for groups of 16,
    /// half a byte per code), which a row group holds beside its data.
    pub(crate) fn written_bytes(&self, elems: u64) -> u64 {
        let scales = self.quant.map_or(0, |q| 8 * elems.div_ceil(q.unit.max(1)));
        self.out_bytes(elems) + scales
    }
}

/// One row: a whole tensor, or a chunk of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RowPlan {
    /// Index into [`Plan::tensors`].
    pub(crate) tensor: usize,
    /// First element of the chunk.
    pub(crate) elem_start: u64,
    /// Elements in the chunk.
    pub(crate) elems: u64,
}

/// One row group: consecutive rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GroupPlan {
    /// Range into [`Plan::rows`].
    pub(crate) rows: std::ops::Range<usize>,
    /// Output bytes of `data`.
    pub(crate) out_bytes: u64,
    /// Source bytes read.
    pub(crate) src_bytes: u64,
}

/// One part of the output: consecutive row groups written as one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PartPlan {
    /// Range into [`Plan::groups`].
    pub(crate) groups: std::ops::Range<usize>,
    /// Range into [`Plan::rows`].
    pub(crate) rows: std::ops::Range<usize>,
}

/// A validated conversion plan.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// Tensors in output order.
    pub(crate) tensors: Vec<PlannedTensor>,
    /// Rows in output order.
    pub(crate) rows: Vec<RowPlan>,
    /// Row groups in output order.
    pub(crate) groups: Vec<GroupPlan>,
    /// Parts in output order: one (the whole plan) unless the output is split.
    pub(crate) parts: Vec<PartPlan>,
    /// True when the output is split into part files (`--max-file-size`).
    pub(crate) parted: bool,
    /// The cast policy.
    pub(crate) target: TargetDtype,
    /// The quantization options, for a V2 file.
    pub(crate) quantize: Option<Quantize>,
}

/// How a plan is built: the cast policy, the quantization, and the sizes.
#[derive(Debug, Clone)]
pub(crate) struct PlanOptions<'a> {
    /// The cast policy.
    pub(crate) target: TargetDtype,
    /// The quantization options, for a V2 file.
    pub(crate) quantize: Option<&'a Quantize>,
    /// Plan a pre-quantized checkpoint's tensors as stored (not dequantized).
    pub(crate) keep_quantized: bool,
    /// Whether a pre-quantized weight's codes can go into V2 unchanged (none: never).
    pub(crate) carry: Option<CarryFn>,
    /// `--lossless`: a pre-quantized weight that cannot be carried is an error, and
    /// no float tensor is quantized.
    pub(crate) lossless: bool,
    /// The row limit, in output bytes.
    pub(crate) max_row_bytes: u64,
    /// The row-group budget, in output bytes.
    pub(crate) group_bytes: u64,
    /// The part size of a parted output.
    pub(crate) max_file_size: Option<u64>,
}

impl Plan {
    /// Plans `selection` (in output order) with `opts`: rows of at most
    /// `max_row_bytes`, row groups of about `group_bytes` output bytes, and with
    /// `max_file_size` parts of at most that many bytes ([`part_rows`]).
    ///
    /// # Errors
    ///
    /// `DuplicateTensor` if two selected tensors get the same output name,
    /// `DimensionTooLarge` for a dimension that does not fit the format's int32 shape,
    /// `ShapeOverflow` for an output size past 64 bits, `UnsupportedDtype` for a
    /// sub-byte tensor that no scheme consumes. The budgets were checked by
    /// [`crate::ConvertConfigBuilder::build`]. With `keep_quantized`, a pre-quantized
    /// checkpoint's tensors are planned as stored; otherwise its weights dequantized.
    pub(crate) fn build(
        source: &Source,
        selection: &[Selected],
        opts: &PlanOptions<'_>,
    ) -> Result<Plan> {
        debug_assert!((1..=MAX_BUDGET_BYTES).contains(&opts.max_row_bytes));
        debug_assert!((1..=MAX_BUDGET_BYTES).contains(&opts.group_bytes));
        let mut tensors = Vec::with_capacity(selection.len());
        let mut rows = Vec::with_capacity(selection.len());
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (i, s) in selection.iter().enumerate() {
            if let Some(&j) = names.get(s.name.as_str()) {
                let other: &Selected = &selection[j];
                return Err(Error::DuplicateTensor {
                    path: source.shards[s.shard].path.clone(),
                    tensor: s.name.clone(),
                    other: Some(source.shards[other.shard].path.clone()),
                });
            }
            names.insert(&s.name, i);
            tensors.push(plan_tensor(source, s, i, opts, &mut rows)?);
        }
        let cuts = match opts.max_file_size {
            Some(m) => part_rows(&tensors, &rows, part_data_bytes(m)),
            None => std::iter::once(0..rows.len()).collect(),
        };
        let mut groups = Vec::new();
        let mut parts = Vec::with_capacity(cuts.len());
        for cut in cuts {
            let first = groups.len();
            groups.extend(group_rows(&tensors, &rows, cut.clone(), opts.group_bytes));
            parts.push(PartPlan {
                groups: first..groups.len(),
                rows: cut,
            });
        }
        Ok(Plan {
            tensors,
            rows,
            groups,
            parts,
            parted: opts.max_file_size.is_some(),
            target: opts.target,
            quantize: opts.quantize.cloned(),
        })
    }

    /// Source bytes the plan reads.
    pub(crate) fn src_bytes(&self) -> u64 {
        self.groups.iter().map(|g| g.src_bytes).sum()
    }

    /// Output bytes of `data` before compression.
    pub(crate) fn out_bytes(&self) -> u64 {
        self.groups.iter().map(|g| g.out_bytes).sum()
    }

    /// Names of the first and last tensors with rows in part `k` (a tensor split over
    /// parts is in each); empty for a part without rows.
    pub(crate) fn part_tensors(&self, k: usize) -> (String, String) {
        let rows = &self.parts[k].rows;
        if rows.is_empty() {
            return (String::new(), String::new());
        }
        let name = |r: usize| self.tensors[self.rows[r].tensor].name.clone();
        (name(rows.start), name(rows.end - 1))
    }

    /// Elements over all tensors.
    pub(crate) fn total_params(&self) -> u64 {
        self.tensors.iter().map(|t| t.src.numel).sum()
    }
}

/// The bytes a row adds to its part: its data (and a V2 row's scales and zero points)
/// and [`ROW_RESERVE`].
fn row_part_bytes(t: &PlannedTensor, row: &RowPlan) -> u64 {
    let data = t.out_bytes(row.elems);
    let scales = t.quant.map_or(0, |q| row.elems.div_ceil(q.unit.max(1)) * 8);
    data + scales + ROW_RESERVE
}

/// Cuts `rows` into consecutive parts of at most `budget` bytes ([`row_part_bytes`]):
/// a tensor starts a new part when it does not fit in the current one, and only a
/// tensor larger than a whole part has its rows spread over several, from the current
/// one on (each row fits: the row limit is at most the budget). A pure function of the plan, so every run of
/// the same input and options cuts the same parts.
fn part_rows(
    tensors: &[PlannedTensor],
    rows: &[RowPlan],
    budget: u64,
) -> Vec<std::ops::Range<usize>> {
    let mut parts = Vec::new();
    let (mut start, mut used) = (0usize, 0u64);
    let mut r = 0;
    while r < rows.len() {
        let t = &tensors[rows[r].tensor];
        let end = r + t.rows as usize;
        let whole: u64 = rows[r..end].iter().map(|row| row_part_bytes(t, row)).sum();
        // A tensor that fits a part starts a new one rather than straddle two; one
        // larger than a part is split anyway, so it first fills the current one.
        if used > 0 && used + whole > budget && whole <= budget {
            parts.push(start..r);
            (start, used) = (r, 0);
        }
        if whole <= budget {
            used += whole;
        } else {
            for (i, row) in rows[r..end].iter().enumerate() {
                let b = row_part_bytes(t, row);
                if used > 0 && used + b > budget {
                    parts.push(start..r + i);
                    (start, used) = (r + i, 0);
                }
                used += b;
            }
        }
        r = end;
    }
    if start < rows.len() || parts.is_empty() {
        parts.push(start..rows.len());
    }
    parts
}

/// Cuts rows `range` into consecutive groups of at most `group_bytes` written bytes
/// ([`PlannedTensor::written_bytes`]; a row larger than that is a group of its own).
fn group_rows(
    tensors: &[PlannedTensor],
    rows: &[RowPlan],
    range: std::ops::Range<usize>,
    group_bytes: u64,
) -> Vec<GroupPlan> {
    let mut groups = Vec::new();
    let mut cur = GroupPlan {
        rows: range.start..range.start,
        out_bytes: 0,
        src_bytes: 0,
    };
    let mut written = 0u64;
    for (r, row) in rows.iter().enumerate().take(range.end).skip(range.start) {
        let t = &tensors[row.tensor];
        let out = t.out_bytes(row.elems);
        let src = t.src_bytes(row.elems);
        let w = t.written_bytes(row.elems);
        if !cur.rows.is_empty() && written + w > group_bytes {
            written = 0;
            let next = GroupPlan {
                rows: r..r,
                out_bytes: 0,
                src_bytes: 0,
            };
            groups.push(std::mem::replace(&mut cur, next));
        }
        cur.rows.end = r + 1;
        written += w;
        cur.out_bytes += out;
        cur.src_bytes += src;
    }
    if !cur.rows.is_empty() {
        groups.push(cur);
    }
    groups
}

/// Plans the selected tensor `s` (the `i`th of the plan): its output dtype and size,
/// and its rows, appended to `rows`.
///
/// # Errors
///
/// As [`Plan::build`], for this tensor.
fn plan_tensor(
    source: &Source,
    s: &Selected,
    i: usize,
    opts: &PlanOptions<'_>,
    rows: &mut Vec<RowPlan>,
) -> Result<PlannedTensor> {
    // The selection was made from this source's headers.
    let shard = &source.shards[s.shard];
    let at = TensorRef {
        shard: s.shard,
        tensor: s.tensor,
    };
    let dequant = source.dequantized_at(at, !opts.keep_quantized);
    let src = dequant.map_or(&shard.header.tensors[s.tensor], |d| &d.info);
    if src.dtype.is_sub_byte() {
        return Err(Error::UnsupportedDtype {
            path: shard.path.clone(),
            tensor: src.name.clone(),
            dtype: src.dtype.to_string(),
        });
    }
    if let Some(&dim) = src.shape.iter().find(|&&d| d > i32::MAX as u64) {
        return Err(Error::DimensionTooLarge {
            path: shard.path.clone(),
            tensor: src.name.clone(),
            dim,
        });
    }
    let (quant, requantized) = quant_spec(source, s, src, dequant, opts)?;
    let dtype = match (quant, dequant) {
        (Some(_), _) => Dtype::I8,
        // A dequantized weight's `keep` is the checkpoint's compute dtype.
        (None, Some(d)) if opts.target == TargetDtype::Keep => d.compute,
        (None, _) => opts.target.output_for(src.dtype),
    };
    let size = dtype.size() as u64;
    // numel * size fits: size <= 8 and the source size numel * src_size fit u64,
    // but a 1-byte source widened to 8 bytes could not; check anyway.
    let out_len = match quant {
        Some(q) => Some(q.kind.bytes(src.numel)),
        None => src.numel.checked_mul(size),
    }
    .ok_or_else(|| Error::ShapeOverflow {
        path: shard.path.clone(),
        tensor: src.name.clone(),
    })?;
    let per_row = elems_per_row(s, src, quant, dequant.is_some(), size, opts.max_row_bytes)?;
    let first_row = rows.len() as u64;
    let mut start = 0u64;
    loop {
        let elems = per_row.min(src.numel - start);
        rows.push(RowPlan {
            tensor: i,
            elem_start: start,
            elems,
        });
        start += elems;
        if start >= src.numel {
            break;
        }
    }
    Ok(PlannedTensor {
        shard: s.shard,
        src: src.clone(),
        name: s.name.clone(),
        dtype,
        out_len,
        first_row,
        rows: rows.len() as u64 - first_row,
        quant,
        dequant: dequant.cloned(),
        requantized,
    })
}

/// How the selected tensor `s` (`src`, dequantized by `dequant` if pre-quantized) is
/// quantized, if it is, and for a pre-quantized weight quantized from its values, why
/// its codes are not carried. A carried weight's units are its own groups.
///
/// # Errors
///
/// `Quantization` naming the tensor and the reason when `--lossless` is set and a
/// pre-quantized weight that would be quantized cannot be carried.
fn quant_spec(
    source: &Source,
    s: &Selected,
    src: &TensorInfo,
    dequant: Option<&Dequantized>,
    opts: &PlanOptions<'_>,
) -> Result<(Option<QuantSpec>, Option<String>)> {
    let Some(spec) = opts
        .quantize
        .and_then(|q| q.spec_for(&s.name, src.dtype, &src.shape))
    else {
        return Ok((None, None));
    };
    let Some(d) = dequant else {
        // --lossless adds no quantization error: a float tensor stays a float row.
        return Ok(((!opts.lossless).then_some(spec), None));
    };
    let carry = match opts.carry {
        Some(f) => f(source, d),
        None => Err("codes are not carried by this conversion".into()),
    };
    let carry = carry.and_then(|c| match c.bits <= spec.kind.bits() {
        true => Ok(c),
        false => Err(format!(
            "{}-bit codes do not fit {}",
            c.bits,
            spec.kind.as_str()
        )),
    });
    match carry {
        Ok(c) => Ok((Some(c.spec(spec.kind, &src.shape)), None)),
        Err(why) if opts.lossless => Err(Error::Quantization {
            path: source.shards[s.shard].path.clone(),
            tensor: s.name.clone(),
            reason: format!("--lossless, and its codes cannot be carried into V2 exactly: {why}"),
        }),
        Err(why) => Ok((Some(spec), Some(why))),
    }
}

/// Elements per row of the tensor `src` (selected as `s`), `size` bytes each in the
/// output: a quantized row holds whole units (channels or groups), each with its
/// scale; a dequantized weight's rows hold whole output rows where one fits.
///
/// # Errors
///
/// `InvalidOption` when one quantization unit is larger than the row limit.
fn elems_per_row(
    s: &Selected,
    src: &TensorInfo,
    quant: Option<QuantSpec>,
    dequantized: bool,
    size: u64,
    max_row_bytes: u64,
) -> Result<u64> {
    Ok(match quant {
        Some(q) if q.unit > max_row_bytes.saturating_mul(q.kind.per_byte()) => {
            return Err(Error::option(format!(
                "tensor `{}`: a channel of {} elements is larger than the row limit; \
                 quantize it per group (a group size) or raise the row limit",
                crate::error::sanitize(&s.name),
                q.unit
            )))
        }
        // Whole units, and for int2 whole bytes: a row of packed codes ends on a byte.
        Some(q) => {
            let room = max_row_bytes.saturating_mul(q.kind.per_byte());
            let align = q.row_align();
            let per = room / align * align;
            if per == 0 && src.numel > room {
                return Err(Error::option(format!(
                    "tensor `{}`: its rows must hold whole bytes of int2 codes, and {align} \
                     elements (whole channels of {}) are larger than the row limit; \
                     quantize it per group (a group size) or raise the row limit",
                    crate::error::sanitize(&s.name),
                    q.unit
                )));
            }
            if per == 0 {
                src.numel
            } else {
                per
            }
        }
        None => {
            let per = (max_row_bytes / size).max(1);
            match (dequantized, src.shape.last()) {
                (true, Some(&len)) if len > 0 && len <= per => per / len * len,
                _ => per,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Planned f16 tensors of `sizes` bytes each, rows of at most `row` bytes.
    fn planned(sizes: &[u64], row: u64) -> (Vec<PlannedTensor>, Vec<RowPlan>) {
        let mut tensors = Vec::new();
        let mut rows = Vec::new();
        for (i, &bytes) in sizes.iter().enumerate() {
            let numel = bytes / 2;
            let first_row = rows.len() as u64;
            let per = row / 2;
            let mut start = 0;
            while start < numel {
                let elems = per.min(numel - start);
                rows.push(RowPlan {
                    tensor: i,
                    elem_start: start,
                    elems,
                });
                start += elems;
            }
            tensors.push(PlannedTensor {
                shard: 0,
                src: TensorInfo {
                    name: format!("t{i}"),
                    dtype: Dtype::F16,
                    shape: vec![numel],
                    numel,
                    offset: 0,
                    len: bytes,
                    strides: None,
                },
                name: format!("t{i}"),
                dtype: Dtype::F16,
                out_len: bytes,
                first_row,
                rows: rows.len() as u64 - first_row,
                quant: None,
                dequant: None,
                requantized: None,
            });
        }
        (tensors, rows)
    }

    #[test]
    fn parts_keep_tensors_whole_unless_one_is_larger_than_a_part() {
        let kib = 1u64 << 10;
        // Budget 100 KiB (+1 KiB per row reserved): 40 + 40 fit, 30 starts part 2.
        let (t, r) = planned(&[40 * kib, 40 * kib, 30 * kib, 10 * kib], 1 << 20);
        assert_eq!(part_rows(&t, &r, 100 * kib), vec![0..2, 2..4]);
        // A 250 KiB tensor in rows of 90 KiB, after a 20 KiB one: spread a row at a
        // time from the current part on (no 90 KiB row fits beside the small one), its
        // 70 KiB tail sharing a part with the next tensor.
        let (t, r) = planned(&[20 * kib, 250 * kib, 5 * kib], 90 * kib);
        assert_eq!(r.len(), 1 + 3 + 1);
        assert_eq!(part_rows(&t, &r, 100 * kib), vec![0..1, 1..2, 2..3, 3..5]);
        // Every part within the budget, every row in exactly one part, in order.
        let (t, r) = planned(
            &[7 * kib, 300 * kib, 64 * kib, 64 * kib, 1, 99 * kib],
            50 * kib,
        );
        let parts = part_rows(&t, &r, 100 * kib);
        let mut next = 0;
        for p in &parts {
            assert_eq!(p.start, next);
            let bytes: u64 = r[p.clone()]
                .iter()
                .map(|row| row_part_bytes(&t[row.tensor], row))
                .sum();
            assert!(bytes <= 100 * kib, "{p:?}: {bytes}");
            next = p.end;
        }
        assert_eq!(next, r.len());
        // No rows: one empty part.
        assert_eq!(part_rows(&[], &[], 100 * kib), vec![0..0]);
    }

    /// Row groups count a quantized row's scales and zero points (8 bytes a unit)
    /// beside its codes: int8 codes in groups of 16 write 1.5 bytes per element.
    #[test]
    fn row_groups_count_the_scales_beside_the_codes() {
        let kib = 1u64 << 10;
        // Four tensors of 16 Ki elements, one row each.
        let (mut t, r) = planned(&[32 * kib; 4], 1 << 20);
        // As f16: 32 KiB each, two to a 64 KiB group.
        assert_eq!(group_rows(&t, &r, 0..4, 64 * kib).len(), 2);
        for x in &mut t {
            x.quant = Some(QuantSpec {
                kind: QuantType::Int8,
                scheme: QuantScheme::Symmetric,
                unit: 16,
                axis: -1,
                group_size: 16,
                carried: true,
            });
        }
        // As int8 codes in groups of 16: 16 KiB of codes and 8 KiB of scales and zero
        // points each, two to a 48 KiB group (codes alone would take three).
        assert_eq!(t[0].written_bytes(16 * kib), 24 * kib);
        let groups = group_rows(&t, &r, 0..4, 48 * kib);
        let rows: Vec<_> = groups.iter().map(|g| g.rows.clone()).collect();
        assert_eq!(rows, vec![0..2, 2..4]);
        assert!(groups.iter().all(|g| g.out_bytes == 32 * kib));
    }
}
