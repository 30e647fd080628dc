//! One row group, from plan to encoded column chunks: its rows are cast by the cast
//! stage straight into one Arrow value buffer, the small columns are built beside it,
//! and the parquet column writers encode and compress them. Runs on the rayon pool,
//! several row groups at once.

use std::sync::{Arc, Mutex};

use arrow_array::builder::{Int32Builder, ListBuilder};
use arrow_array::{ArrayRef, BinaryArray, Int32Array, Int64Array, StringArray, UInt64Array};
use arrow_buffer::{MutableBuffer, OffsetBuffer};
use arrow_schema::SchemaRef;
use parquet::arrow::arrow_writer::{compute_leaves, ArrowColumnChunk, ArrowRowGroupWriterFactory};

use crate::cast::{cast_row, CastStats, QuantError, RowQuant};
use crate::error::{Error, Result};
use crate::format;
use crate::plan::{GroupPlan, Plan};
use crate::source::Source;

/// A row group, encoded, waiting for its turn to be appended.
pub(super) struct Encoded {
    pub(super) chunks: Vec<ArrowColumnChunk>,
    /// `(tensor, stats)` for the rows whose cast saw NaN, inf or overflow.
    pub(super) stats: Vec<(usize, CastStats)>,
    /// `(tensor, error)` for quantized rows.
    pub(super) quant: Vec<(usize, QuantError)>,
}

/// Value buffers handed back after encoding, so later row groups reuse memory that is
/// already mapped instead of faulting in (and zeroing) fresh pages for every group.
pub(super) struct BufferPool {
    free: Mutex<Vec<MutableBuffer>>,
    keep: usize,
    /// Larger buffers (a single big row) are freed, not kept.
    max_bytes: usize,
}

impl BufferPool {
    pub(super) fn new(keep: usize, max_bytes: u64) -> BufferPool {
        BufferPool {
            free: Mutex::new(Vec::new()),
            keep,
            max_bytes: usize::try_from(max_bytes).unwrap_or(usize::MAX),
        }
    }

    /// A buffer of exactly `len` bytes; its contents are overwritten by the caller.
    fn take(&self, len: usize) -> MutableBuffer {
        let reused = self.free.lock().ok().and_then(|mut f| {
            // Prefer the smallest buffer that is already large enough.
            let best = f
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= len)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i)
                .or_else(|| (!f.is_empty()).then_some(0))?;
            Some(f.swap_remove(best))
        });
        match reused {
            Some(mut b) => {
                // Growth is zero-filled; shrinking only moves the length.
                b.resize(len, 0);
                b
            }
            None => MutableBuffer::from_len_zeroed(len),
        }
    }

    fn give(&self, b: MutableBuffer) {
        if b.capacity() > self.max_bytes {
            return;
        }
        if let Ok(mut f) = self.free.lock() {
            if f.len() < self.keep {
                f.push(b);
            }
        }
    }
}

/// What every encoding task shares.
pub(super) struct Encoder<'a> {
    pub(super) source: &'a Source,
    pub(super) plan: &'a Plan,
    pub(super) factory: &'a ArrowRowGroupWriterFactory,
    pub(super) schema: &'a SchemaRef,
    pub(super) allow_overflow: bool,
    pub(super) out_path: &'a std::path::Path,
    pub(super) pool: &'a BufferPool,
}

impl Encoder<'_> {
    /// Casts row group `index` into one value buffer and encodes every column.
    pub(super) fn encode(&self, group: &GroupPlan, index: usize) -> Result<Encoded> {
        let (plan, source) = (self.plan, self.source);
        let rows = &plan.rows[group.rows.clone()];
        let mut shards: Vec<usize> = rows.iter().map(|r| plan.tensors[r.tensor].shard).collect();
        shards.dedup();
        for s in shards {
            source.shards[s].check_unchanged()?;
        }
        // The plan's budgets are at most 1 GiB.
        let mut values = self.pool.take(group.out_bytes as usize);
        let mut lens = Vec::with_capacity(rows.len());
        let mut checksums = Vec::with_capacity(rows.len());
        let mut stats = Vec::new();
        let mut quant = Vec::with_capacity(rows.len());
        let mut errors = Vec::new();
        let mut rest = values.as_slice_mut();
        for row in rows {
            let n = (row.elems * plan.tensors[row.tensor].dtype.size() as u64) as usize;
            let (dst, tail) = std::mem::take(&mut rest).split_at_mut(n);
            rest = tail;
            let cast = cast_row(source, plan, row, dst, self.allow_overflow)?;
            if cast.stats != CastStats::default() {
                stats.push((row.tensor, cast.stats));
            }
            checksums.push(cast.checksum);
            lens.push(n);
            if let Some(q) = &cast.quant {
                errors.push((row.tensor, q.error));
            }
            quant.push(cast.quant);
        }
        debug_assert!(rest.is_empty());
        let data = Arc::new(
            BinaryArray::try_new(OffsetBuffer::<i32>::from_lengths(lens), values.into(), None)
                .map_err(|e| Error::internal(format!("row group {index}: {e}")))?,
        );
        let chunks = self.encode_columns(group, index, data, checksums, quant)?;
        Ok(Encoded {
            chunks,
            stats,
            quant: errors,
        })
    }

    /// The columns of a row group around its `data`, encoded; the value buffer goes
    /// back to the pool once the encoder has copied it.
    fn encode_columns(
        &self,
        group: &GroupPlan,
        index: usize,
        data: Arc<BinaryArray>,
        checksums: Vec<u64>,
        quant: Vec<Option<RowQuant>>,
    ) -> Result<Vec<ArrowColumnChunk>> {
        let plan = self.plan;
        let rows = &plan.rows[group.rows.clone()];
        let tensor = |r: &crate::plan::RowPlan| &plan.tensors[r.tensor];
        let mut shapes =
            ListBuilder::new(Int32Builder::new()).with_field(format::shape_item_field());
        for r in rows {
            // Plan::build checked every dimension fits i32.
            for &d in &tensor(r).src.shape {
                shapes.values().append_value(d as i32);
            }
            shapes.append(true);
        }
        // A quantized row's `dtype` is the original one (the seed's loader ignores it
        // for int8 rows); every other row's names the bytes stored.
        let dtype = |r: &crate::plan::RowPlan| match tensor(r).quant {
            Some(_) => tensor(r).src.dtype.torch_name(),
            None => tensor(r).dtype.torch_name(),
        };
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| tensor(r).name.as_str()),
            )),
            Arc::new(shapes.finish()),
            Arc::new(StringArray::from_iter_values(rows.iter().map(dtype))),
            data.clone(),
            Arc::new(Int64Array::from_iter_values(
                rows.iter().map(|r| tensor(r).src.numel as i64),
            )),
        ];
        if plan.quantize.is_some() {
            cols.extend(v2_columns(plan, rows, &quant));
        }
        cols.push(Arc::new(Int64Array::from_iter_values(
            rows.iter()
                .map(|r| (r.elem_start * tensor(r).dtype.size() as u64) as i64),
        )));
        cols.push(Arc::new(UInt64Array::from(checksums)));
        let first = rows.first().map(|r| tensor(r).name.as_str());
        let perr = |e: parquet::errors::ParquetError| Error::parquet(self.out_path, first, e);
        let mut writers = self.factory.create_column_writers(index).map_err(perr)?;
        let mut w = writers.iter_mut();
        for (field, arr) in self.schema.fields().iter().zip(&cols) {
            for leaf in compute_leaves(field, arr).map_err(perr)? {
                let writer = w.next().ok_or_else(|| {
                    Error::internal("the schema has more leaves than column writers")
                })?;
                writer.write(&leaf).map_err(perr)?;
            }
        }
        drop(cols);
        if let Ok(data) = Arc::try_unwrap(data) {
            let (_, values, _) = data.into_parts();
            if let Ok(buf) = values.into_mutable() {
                self.pool.give(buf);
            }
        }
        writers
            .into_iter()
            .map(|w| w.close())
            .collect::<parquet::errors::Result<Vec<_>>>()
            .map_err(perr)
    }
}

/// The five V2 columns of `rows`: quantized rows carry their scales and zero points;
/// every other row is `fp16` or `fp32` by the bytes it stores, with empty scales.
fn v2_columns(
    plan: &Plan,
    rows: &[crate::plan::RowPlan],
    quant: &[Option<RowQuant>],
) -> [ArrayRef; 5] {
    let f32_bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let mut kind = Vec::with_capacity(rows.len());
    let mut scales = Vec::with_capacity(rows.len());
    let mut zeros = Vec::with_capacity(rows.len());
    let mut axis = Vec::with_capacity(rows.len());
    let mut group = Vec::with_capacity(rows.len());
    for (r, q) in rows.iter().zip(quant) {
        let t = &plan.tensors[r.tensor];
        match (t.quant, q) {
            (Some(spec), Some(q)) => {
                kind.push("int8");
                scales.push(f32_bytes(&q.scales));
                zeros.push(f32_bytes(&q.zero_points));
                axis.push(spec.axis);
                // Checked to fit i32 when the options were built.
                group.push(spec.group_size as i32);
            }
            _ => {
                kind.push(if t.dtype.size() == 2 && t.dtype.is_castable_float() {
                    "fp16"
                } else {
                    "fp32"
                });
                scales.push(Vec::new());
                zeros.push(Vec::new());
                axis.push(-1);
                group.push(0);
            }
        }
    }
    [
        Arc::new(StringArray::from_iter_values(kind)),
        Arc::new(BinaryArray::from_iter_values(scales)),
        Arc::new(BinaryArray::from_iter_values(zeros)),
        Arc::new(Int32Array::from(axis)),
        Arc::new(Int32Array::from(group)),
    ]
}
