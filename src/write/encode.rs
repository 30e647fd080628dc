//! One row group, from plan to encoded column chunks: its rows are cast by the cast
//! stage straight into one value buffer, laid out as the `data` column's pages (see
//! [`super::pages`]), which are compressed from there; the small columns are built
//! beside it and encoded by the parquet column writers. Runs on the rayon pool,
//! several row groups at once.

use std::sync::{Arc, Mutex};

use arrow_array::builder::{BinaryBuilder, Int32Builder, ListBuilder};
use arrow_array::{ArrayRef, Int32Array, Int64Array, StringArray, UInt64Array};
use arrow_schema::SchemaRef;
use parquet::arrow::arrow_writer::{compute_leaves, ArrowColumnChunk, ArrowRowGroupWriterFactory};
use parquet::basic::Compression;
use parquet::schema::types::ColumnDescPtr;

use super::pages::{
    with_codec, write_prefix, DataChunk, DataChunkBuilder, PageCodec, HEADER_ROOM, PAGE_LEAD,
    PAGE_PREFIX,
};
use crate::cast::{cast_row, CastStats, QuantError, RowQuant};
use crate::error::{Error, Result};
use crate::format;
use crate::plan::{GroupPlan, Plan};
use crate::source::Source;

/// One encoded column chunk of a row group.
pub(super) enum Chunk {
    /// Encoded by the parquet column writer.
    Parquet(ArrowColumnChunk),
    /// The `data` column, written by [`super::pages`].
    Data(DataChunk),
}

/// A row group, encoded, waiting for its turn to be appended.
pub(super) struct Encoded {
    pub(super) chunks: Vec<Chunk>,
    /// `(tensor, stats)` for the rows whose cast saw NaN, inf or overflow.
    pub(super) stats: Vec<(usize, CastStats)>,
    /// `(tensor, error)` for quantized rows.
    pub(super) quant: Vec<(usize, QuantError)>,
}

/// Buffers handed back once used (cast buffers after their pages are compressed,
/// chunk buffers after their pages are appended), so later row groups reuse memory that
/// is already mapped instead of faulting in (and the kernel zeroing) fresh pages.
pub(super) struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
    keep: usize,
    /// Larger buffers (a single big row) are freed, not kept.
    max_bytes: usize,
    /// The kept buffers' capacity, at most: past it the smallest go.
    max_total: usize,
}

impl BufferPool {
    pub(super) fn new(keep: usize, max_bytes: u64, max_total: u64) -> BufferPool {
        BufferPool {
            free: Mutex::new(Vec::new()),
            keep,
            max_bytes: usize::try_from(max_bytes).unwrap_or(usize::MAX),
            max_total: usize::try_from(max_total).unwrap_or(usize::MAX),
        }
    }

    /// The smallest kept buffer with room for `cap` bytes.
    fn reuse(&self, cap: usize) -> Option<Vec<u8>> {
        let mut f = self.free.lock().ok()?;
        let best = f
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= cap)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i)?;
        Some(f.swap_remove(best))
    }

    /// A buffer of exactly `len` bytes; its contents are overwritten by the caller.
    pub(super) fn take(&self, len: usize) -> Vec<u8> {
        match self.reuse(len) {
            Some(mut b) => {
                // Only bytes past its current length are zero-filled.
                if b.len() < len {
                    b.resize(len, 0);
                } else {
                    b.truncate(len);
                }
                b
            }
            // Zeroed by the allocator (fresh pages are zero already).
            None => vec![0; len],
        }
    }

    /// Frees the kept buffers (before a row larger than any of them is cast: they
    /// would sit idle beside its two buffers).
    pub(super) fn clear(&self) {
        if let Ok(mut f) = self.free.lock() {
            f.clear();
        }
    }

    /// Whether a buffer of `bytes` is too large to keep.
    pub(super) fn too_large(&self, bytes: usize) -> bool {
        bytes > self.max_bytes
    }

    /// An empty buffer with room for `cap` bytes.
    pub(super) fn take_empty(&self, cap: usize) -> Vec<u8> {
        match self.reuse(cap) {
            Some(mut b) => {
                b.clear();
                b
            }
            None => Vec::with_capacity(cap),
        }
    }

    /// Keeps `b` for reuse, unless it is too large; while the pool holds more buffers
    /// or more bytes than it keeps, the smallest go.
    pub(super) fn give(&self, b: Vec<u8>) {
        if b.capacity() > self.max_bytes || self.keep == 0 {
            return;
        }
        if let Ok(mut f) = self.free.lock() {
            f.push(b);
            while f.len() > self.keep || f.iter().map(Vec::capacity).sum::<usize>() > self.max_total
            {
                let Some(i) = f
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, b)| b.capacity())
                    .map(|(i, _)| i)
                else {
                    break;
                };
                f.swap_remove(i);
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
    /// The `data` leaf of the Parquet schema.
    pub(super) data_descr: ColumnDescPtr,
    pub(super) compression: Compression,
    pub(super) allow_overflow: bool,
    pub(super) out_path: &'a std::path::Path,
    pub(super) pool: &'a BufferPool,
}

impl Encoder<'_> {
    /// Casts row group `index` into one value buffer, compresses its `data` pages from
    /// there and encodes the other columns.
    pub(super) fn encode(&self, group: &GroupPlan, index: usize) -> Result<Encoded> {
        let (plan, source) = (self.plan, self.source);
        let rows = &plan.rows[group.rows.clone()];
        let mut shards: Vec<usize> = rows.iter().map(|r| plan.tensors[r.tensor].shard).collect();
        shards.dedup();
        for s in shards {
            source.shards[s].check_unchanged()?;
        }
        // The plan's budgets are at most 1 GiB, a row's bytes at most 2 GiB - 1.
        if self.pool.too_large(group.out_bytes as usize) {
            self.pool.clear();
        }
        let mut values = self
            .pool
            .take(group.out_bytes as usize + rows.len() * PAGE_LEAD);
        let mut pages = Vec::with_capacity(rows.len());
        let mut checksums = Vec::with_capacity(rows.len());
        let mut stats = Vec::new();
        let mut quant = Vec::with_capacity(rows.len());
        let mut errors = Vec::new();
        let mut rest = values.as_mut_slice();
        let mut at = 0;
        for row in rows {
            let n = plan.tensors[row.tensor].out_bytes(row.elems) as usize;
            let (page, tail) = std::mem::take(&mut rest).split_at_mut(PAGE_LEAD + n);
            rest = tail;
            let (prefix, dst) = page[HEADER_ROOM..].split_at_mut(PAGE_PREFIX);
            write_prefix(prefix, n as u32);
            let cast = cast_row(source, plan, row, dst, self.allow_overflow)?;
            if cast.stats != CastStats::default() {
                stats.push((row.tensor, cast.stats));
            }
            checksums.push(cast.checksum);
            pages.push(at..at + PAGE_LEAD + n);
            at += PAGE_LEAD + n;
            if let Some(q) = &cast.quant {
                errors.push((row.tensor, q.error));
            }
            quant.push(cast.quant);
        }
        debug_assert!(rest.is_empty());
        let first = rows.first().map(|r| plan.tensors[r.tensor].name.as_str());
        let codes: Vec<bool> = quant.iter().map(Option::is_some).collect();
        let data = self.data_chunk(first, values, (pages, &codes))?;
        let chunks = self.encode_columns(group, index, data, checksums, quant)?;
        Ok(Encoded {
            chunks,
            stats,
            quant: errors,
        })
    }

    /// The `data` column chunk of the pages laid out in `values` (each of `pages` is
    /// header room, prefix and value; `codes` says which hold V2 codes): compressed
    /// into a pooled buffer, after which `values` goes back to the pool; uncompressed,
    /// `values` is the chunk.
    fn data_chunk(
        &self,
        first: Option<&str>,
        values: Vec<u8>,
        (pages, codes): (Vec<std::ops::Range<usize>>, &[bool]),
    ) -> Result<DataChunk> {
        let perr = |e: parquet::errors::ParquetError| Error::parquet(self.out_path, first, e);
        let (descr, compression) = (self.data_descr.clone(), self.compression);
        let chunk = with_codec(compression, |codec| {
            if let PageCodec::None = codec {
                return DataChunkBuilder::uncompressed(descr, compression, values, &pages);
            }
            let cap = pages
                .iter()
                .map(|p| HEADER_ROOM + codec.bound(p.len() - HEADER_ROOM))
                .sum();
            let mut chunk = DataChunkBuilder::new(descr, compression, self.pool.take_empty(cap));
            for (p, &codes) in pages.iter().zip(codes) {
                chunk.push(codec, &values[p.start + HEADER_ROOM..p.end], codes)?;
            }
            self.pool.give(values);
            Ok(chunk)
        })
        .map_err(|e| perr(parquet::errors::ParquetError::External(Box::new(e))))?
        .map_err(perr)?;
        chunk.finish().map_err(perr)
    }

    /// The columns of a row group around its `data` chunk, encoded.
    fn encode_columns(
        &self,
        group: &GroupPlan,
        index: usize,
        data: DataChunk,
        checksums: Vec<u64>,
        quant: Vec<Option<RowQuant>>,
    ) -> Result<Vec<Chunk>> {
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
        // for int8 and int2 rows); every other row's names the bytes stored.
        let dtype = |r: &crate::plan::RowPlan| match tensor(r).quant {
            Some(_) => tensor(r).src.dtype.torch_name(),
            None => tensor(r).dtype.torch_name(),
        };
        // `None` stands for the `data` column, written apart.
        let mut cols: Vec<Option<ArrayRef>> = vec![
            Some(Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| tensor(r).name.as_str()),
            ))),
            Some(Arc::new(shapes.finish())),
            Some(Arc::new(StringArray::from_iter_values(
                rows.iter().map(dtype),
            ))),
            None,
            Some(Arc::new(Int64Array::from_iter_values(
                rows.iter().map(|r| tensor(r).src.numel as i64),
            ))),
        ];
        if plan.quantize.is_some() {
            cols.extend(v2_columns(plan, rows, &quant).map(Some));
        }
        // The scales are in their arrays now: their rows' copies go before the columns
        // are encoded (for groups of 16, half a byte per code).
        drop(quant);
        cols.push(Some(Arc::new(Int64Array::from_iter_values(
            rows.iter()
                .map(|r| tensor(r).out_bytes(r.elem_start) as i64),
        ))));
        cols.push(Some(Arc::new(UInt64Array::from(checksums))));
        let first = rows.first().map(|r| tensor(r).name.as_str());
        let perr = |e: parquet::errors::ParquetError| Error::parquet(self.out_path, first, e);
        let mut writers = self.factory.create_column_writers(index).map_err(perr)?;
        if writers.len() != cols.len() {
            return Err(Error::internal(format!(
                "{} column writers for {} columns",
                writers.len(),
                cols.len()
            )));
        }
        let mut data = Some(data);
        let mut chunks = Vec::with_capacity(cols.len());
        // Every field of the schema is a single leaf (the shape list included).
        for ((field, col), mut writer) in
            self.schema.fields().iter().zip(cols).zip(writers.drain(..))
        {
            match col {
                Some(arr) => {
                    for leaf in compute_leaves(field, &arr).map_err(perr)? {
                        writer.write(&leaf).map_err(perr)?;
                    }
                    chunks.push(Chunk::Parquet(writer.close().map_err(perr)?));
                }
                None => {
                    let d = data
                        .take()
                        .ok_or_else(|| Error::internal("two `data` columns"))?;
                    chunks.push(Chunk::Data(d));
                }
            }
        }
        Ok(chunks)
    }
}

/// The five V2 columns of `rows`: quantized rows carry their scales and zero points;
/// every other row is `fp16` or `fp32` by the bytes it stores, with empty scales.
fn v2_columns(
    plan: &Plan,
    rows: &[crate::plan::RowPlan],
    quant: &[Option<RowQuant>],
) -> [ArrayRef; 5] {
    // The scales and zero points as f32 bytes, each row one value, written once into
    // the arrays' buffers.
    let quantized: Vec<Option<&RowQuant>> = rows
        .iter()
        .zip(quant)
        .map(|(r, q)| {
            q.as_ref()
                .filter(|_| plan.tensors[r.tensor].quant.is_some())
        })
        .collect();
    let bytes = |f: fn(&RowQuant) -> &[f32]| {
        let n = quantized
            .iter()
            .flatten()
            .map(|q| f(q).len())
            .sum::<usize>();
        let mut b = BinaryBuilder::with_capacity(rows.len(), 4 * n);
        for q in &quantized {
            match q {
                Some(q) => b.append_value(bytemuck::cast_slice::<f32, u8>(f(q))),
                None => b.append_value([]),
            }
        }
        b.finish()
    };
    // The values' bytes in memory are their little-endian bytes (a big-endian host is
    // refused when the source opens).
    let (scales, zeros) = (bytes(|q| &q.scales), bytes(|q| &q.zero_points));
    let mut kind = Vec::with_capacity(rows.len());
    let mut axis = Vec::with_capacity(rows.len());
    let mut group = Vec::with_capacity(rows.len());
    for (r, q) in rows.iter().zip(quant) {
        let t = &plan.tensors[r.tensor];
        match (t.quant, q) {
            (Some(spec), Some(q)) => {
                kind.push(spec.kind.as_str());
                debug_assert!(!q.scales.is_empty());
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
                axis.push(-1);
                group.push(0);
            }
        }
    }
    [
        Arc::new(StringArray::from_iter_values(kind)),
        Arc::new(scales),
        Arc::new(zeros),
        Arc::new(Int32Array::from(axis)),
        Arc::new(Int32Array::from(group)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(p: &BufferPool) -> Vec<usize> {
        let mut v: Vec<usize> = p.free.lock().unwrap().iter().map(Vec::capacity).collect();
        v.sort_unstable();
        v
    }

    /// The pool keeps buffers up to its size limit, at most `keep` of them and at most
    /// its byte total, dropping the smallest first; a taken buffer is the smallest that
    /// fits, and its memory is the one given.
    #[test]
    fn the_pool_keeps_the_largest_buffers_within_its_count_and_bytes() {
        let pool = BufferPool::new(3, 100, 200);
        pool.give(Vec::with_capacity(101));
        assert!(held(&pool).is_empty(), "over the size limit");
        for c in [10, 60, 40] {
            pool.give(Vec::with_capacity(c));
        }
        assert_eq!(held(&pool), [10, 40, 60]);
        pool.give(Vec::with_capacity(50));
        assert_eq!(held(&pool), [40, 50, 60], "four buffers: the smallest goes");
        pool.give(Vec::with_capacity(100));
        // 40 + 50 + 60 + 100: four buffers, and 250 bytes: 40 goes, then 50.
        assert_eq!(held(&pool), [60, 100], "the smallest go until within both");
        let b = Vec::<u8>::with_capacity(80);
        let at = b.as_ptr();
        pool.give(b);
        assert_eq!(held(&pool), [80, 100]);
        let t = pool.take(70);
        assert_eq!((t.len(), t.as_ptr()), (70, at), "the smallest that fits");
        assert_eq!(held(&pool), [100]);
        assert_eq!(pool.take(120).capacity(), 120, "none fits: a new one");
        assert_eq!(held(&pool), [100]);
    }
}
