//! Stage 2, the plan: which tensors, under which names and dtypes, in which rows and
//! row groups. A [`Plan`] is only built by [`Plan::build`], which checks every limit,
//! so the writer can trust it.

use std::collections::HashMap;

use crate::dtype::{Dtype, TargetDtype};
use crate::error::{Error, Result};
use crate::source::{Source, TensorInfo};

/// The largest row or row-group byte budget accepted (Arrow `Binary` offsets are i32).
pub const MAX_BUDGET_BYTES: u64 = 1 << 30;

/// One tensor picked from the source, under its output name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selected {
    /// Index of the shard in [`Source::shards`].
    pub shard: usize,
    /// Index of the tensor in that shard's header.
    pub tensor: usize,
    /// Name in the output.
    pub name: String,
}

/// A tensor of the plan.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    /// Shard index.
    pub shard: usize,
    /// The source tensor.
    pub src: TensorInfo,
    /// Output name.
    pub name: String,
    /// Output dtype.
    pub dtype: Dtype,
    /// Output bytes.
    pub out_len: u64,
    /// First row.
    pub first_row: u64,
    /// Rows it spans (1 unless split).
    pub rows: u64,
}

/// One row: a whole tensor, or a chunk of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowPlan {
    /// Index into [`Plan::tensors`].
    pub tensor: usize,
    /// First element of the chunk.
    pub elem_start: u64,
    /// Elements in the chunk.
    pub elems: u64,
}

/// One row group: consecutive rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPlan {
    /// Range into [`Plan::rows`].
    pub rows: std::ops::Range<usize>,
    /// Output bytes of `data`.
    pub out_bytes: u64,
    /// Source bytes read.
    pub src_bytes: u64,
}

/// A validated conversion plan.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Tensors in output order.
    pub tensors: Vec<PlannedTensor>,
    /// Rows in output order.
    pub rows: Vec<RowPlan>,
    /// Row groups in output order.
    pub groups: Vec<GroupPlan>,
    /// The cast policy.
    pub target: TargetDtype,
}

impl Plan {
    /// Plans `selection` (in output order) with rows of at most `max_row_bytes` and row
    /// groups of about `group_bytes` output bytes.
    ///
    /// # Errors
    ///
    /// `DuplicateTensor` if two selected tensors get the same output name,
    /// `InvalidOption` for budgets out of range or a dimension that does not fit the
    /// format's int32 shape.
    pub fn build(
        source: &Source,
        selection: &[Selected],
        target: TargetDtype,
        max_row_bytes: u64,
        group_bytes: u64,
    ) -> Result<Plan> {
        if max_row_bytes == 0 || max_row_bytes > MAX_BUDGET_BYTES {
            return Err(Error::option(format!(
                "the row limit must be between 1 byte and {} MiB",
                MAX_BUDGET_BYTES >> 20
            )));
        }
        if group_bytes == 0 || group_bytes > MAX_BUDGET_BYTES {
            return Err(Error::option(format!(
                "the row-group budget must be between 1 byte and {} MiB",
                MAX_BUDGET_BYTES >> 20
            )));
        }
        let mut tensors = Vec::with_capacity(selection.len());
        let mut rows = Vec::with_capacity(selection.len());
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (i, s) in selection.iter().enumerate() {
            let shard = source
                .shards
                .get(s.shard)
                .ok_or_else(|| Error::option("selection names a shard that does not exist"))?;
            let src = shard
                .header
                .tensors
                .get(s.tensor)
                .ok_or_else(|| Error::option("selection names a tensor that does not exist"))?;
            if let Some(&j) = names.get(s.name.as_str()) {
                let other: &Selected = &selection[j];
                return Err(Error::DuplicateTensor {
                    path: shard.path.clone(),
                    tensor: s.name.clone(),
                    other: Some(source.shards[other.shard].path.clone()),
                });
            }
            names.insert(&s.name, i);
            if let Some(d) = src.shape.iter().find(|&&d| d > i32::MAX as u64) {
                return Err(Error::option(format!(
                    "tensor `{}` has dimension {d}, which the format's int32 shape cannot hold",
                    crate::error::sanitize(&src.name)
                )));
            }
            let dtype = target.output_for(src.dtype);
            let size = dtype.size() as u64;
            // numel * size fits: size <= 8 and the source size numel * src_size fit u64,
            // but a 1-byte source widened to 8 bytes could not; check anyway.
            let out_len = src
                .numel
                .checked_mul(size)
                .ok_or_else(|| Error::ShapeOverflow {
                    path: shard.path.clone(),
                    tensor: src.name.clone(),
                })?;
            let per_row = (max_row_bytes / size).max(1);
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
            tensors.push(PlannedTensor {
                shard: s.shard,
                src: src.clone(),
                name: s.name.clone(),
                dtype,
                out_len,
                first_row,
                rows: rows.len() as u64 - first_row,
            });
        }
        let mut groups = Vec::new();
        let mut cur = GroupPlan {
            rows: 0..0,
            out_bytes: 0,
            src_bytes: 0,
        };
        for (r, row) in rows.iter().enumerate() {
            let t = &tensors[row.tensor];
            let out = row.elems * t.dtype.size() as u64;
            let src = row.elems * t.src.dtype.size() as u64;
            if !cur.rows.is_empty() && cur.out_bytes + out > group_bytes {
                let next = GroupPlan {
                    rows: r..r,
                    out_bytes: 0,
                    src_bytes: 0,
                };
                groups.push(std::mem::replace(&mut cur, next));
            }
            cur.rows.end = r + 1;
            cur.out_bytes += out;
            cur.src_bytes += src;
        }
        if !cur.rows.is_empty() {
            groups.push(cur);
        }
        Ok(Plan {
            tensors,
            rows,
            groups,
            target,
        })
    }

    /// Source bytes the plan reads.
    pub fn src_bytes(&self) -> u64 {
        self.groups.iter().map(|g| g.src_bytes).sum()
    }

    /// Output bytes of `data` before compression.
    pub fn out_bytes(&self) -> u64 {
        self.groups.iter().map(|g| g.out_bytes).sum()
    }

    /// Elements over all tensors.
    pub fn total_params(&self) -> u64 {
        self.tensors.iter().map(|t| t.src.numel).sum()
    }
}
