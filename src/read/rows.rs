//! Reading rows: the rows `[first, first + n)` of a weight file, across its row groups
//! and, for a parted output, its part files, touching only the row groups (and, with an
//! offset index, the pages) that hold them; the cells of each row handed to a callback.
//! [`WeightFile::scan_row_group`] is the scanner `verify` and `export` use.

use std::path::Path;

use arrow_array::{
    Array, BinaryArray, Int32Array, Int64Array, ListArray, RecordBatch, StringArray, UInt64Array,
};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReaderBuilder, RowSelection, RowSelector};
use parquet::arrow::ProjectionMask;

use super::file::{guard, safe_skip};
use super::WeightFile;
use crate::error::{Error, Result};
use crate::format;

/// The cells of one row that the readers use.
pub(super) struct Cells<'a> {
    /// Global row number.
    pub(super) row: u64,
    /// The `data` cell.
    pub(super) data: &'a [u8],
    /// The `checksum` cell, when the file has the column.
    pub(super) checksum: Option<u64>,
    /// The `chunk_offset` cell, when the file has the column.
    pub(super) offset: Option<i64>,
    /// V2: f32 little-endian scales and zero points (empty for V1 files and unquantized
    /// rows).
    pub(super) scales: &'a [u8],
    pub(super) zero_points: &'a [u8],
    /// With `describe`: the row's own description cells.
    pub(super) described: Option<Described<'a>>,
}

/// A row's description cells as stored (`verify` compares them with the footer index).
#[derive(Debug, Clone)]
pub(crate) struct Described<'a> {
    pub(crate) name: &'a str,
    pub(crate) dtype: &'a str,
    pub(crate) shape: Vec<i64>,
    pub(crate) num_params: Option<i64>,
}

/// A row callback.
pub(super) type RowFn<'a> = dyn FnMut(Cells) -> Result<()> + 'a;

/// One row as the scanner hands it out.
#[derive(Debug)]
pub(crate) struct Row<'a> {
    /// Global row number.
    pub(crate) row: u64,
    /// Index of its tensor in [`WeightFile::tensors`].
    pub(crate) tensor: usize,
    /// Byte offset of this row's data inside the tensor.
    pub(crate) offset: u64,
    /// The data.
    pub(crate) data: &'a [u8],
    /// The stored checksum, when the file has them.
    pub(crate) checksum: Option<u64>,
    /// V2: the row's scales and zero points, f32 little-endian (empty otherwise).
    pub(crate) scales: &'a [u8],
    pub(crate) zero_points: &'a [u8],
    /// With `describe`: the row's own name, dtype, shape and count cells.
    pub(crate) described: Option<Described<'a>>,
}

impl WeightFile {
    /// Row group holding global row `row`, and the row's position inside it.
    pub(super) fn locate(&self, row: u64) -> Option<(usize, u64)> {
        let rg = self
            .rg_first_row
            .partition_point(|&f| f <= row)
            .checked_sub(1)?;
        if rg + 1 >= self.rg_first_row.len() {
            return None;
        }
        Some((rg, row - self.rg_first_row[rg]))
    }

    /// Reads rows `[first, first + n)` (the `data`, `chunk_offset` and `checksum`
    /// columns), calling `f` per row in order. Only the row groups (and, with the offset
    /// index, the pages) holding those rows are read.
    pub(super) fn read_rows(
        &self,
        first: u64,
        n: u64,
        tensor: Option<&str>,
        describe: bool,
        f: &mut RowFn,
    ) -> Result<()> {
        let path = &self.path;
        let end = first.saturating_add(n);
        let mut row = first;
        while row < end {
            let (rg, in_rg) = self.locate(row).ok_or_else(|| {
                Error::corrupt(path, tensor, format!("row {row} is not in the file"))
            })?;
            let rg_rows = self.rg_first_row[rg + 1] - self.rg_first_row[rg];
            let take = (end - row).min(rg_rows - in_rg);
            let cols = self.row_columns(describe);
            let (pi, lrg) = self.rg_part[rg];
            let part = &self.parts[pi];
            let path = &part.path;
            let mask = ProjectionMask::columns(part.meta.parquet_schema(), cols.iter().copied());
            // Rows before `in_rg` are skipped only up to a page start of every binary
            // column read; the rest are read and dropped below. parquet 60.1 skips
            // binary values inside a page without bounds checks, and a damaged length
            // there made a later read ask the allocator for exabytes (an abort, not a
            // panic). Our files start a `data` page at every row, so nothing changes
            // for them; a page skipped whole is never decoded.
            let skip = safe_skip(part, lrg, in_rg, &mask)?;
            let mut drop_rows = in_rg - skip;
            let batches = guard(path, tensor, || {
                let mut sel = Vec::new();
                if skip > 0 {
                    sel.push(RowSelector::skip(skip as usize));
                }
                sel.push(RowSelector::select((in_rg - skip + take) as usize));
                let rdr = ParquetRecordBatchReaderBuilder::new_with_metadata(
                    part.file.clone(),
                    part.meta.clone(),
                )
                .with_row_groups(vec![lrg])
                .with_projection(mask)
                .with_row_selection(RowSelection::from(sel))
                .with_batch_size(1)
                .build()
                .map_err(|e| Error::parquet(path, tensor, e))?;
                Ok(rdr)
            })?;
            let mut iter = batches;
            loop {
                let next = guard(path, tensor, || Ok(iter.next()))?;
                let Some(batch) = next else { break };
                let batch = batch.map_err(|e| {
                    Error::corrupt(path, tensor, format!("cannot decode row group {rg}: {e}"))
                })?;
                // Batches are one row: the rows before the selection are dropped.
                if drop_rows > 0 {
                    drop_rows = drop_rows.saturating_sub(batch.num_rows() as u64);
                    continue;
                }
                if row.saturating_add(batch.num_rows() as u64) > end {
                    return Err(Error::corrupt(path, tensor, "more rows than selected"));
                }
                self.each_row(&batch, row, describe, f)?;
                row += batch.num_rows() as u64;
            }
            if row < first.saturating_add(n).min(self.rg_first_row[rg + 1]) {
                return Err(Error::corrupt(
                    path,
                    tensor,
                    format!("row group {rg} ended early"),
                ));
            }
        }
        Ok(())
    }

    /// The columns a row read needs: `data` and our extras, the V2 scales, and with
    /// `describe` the description cells.
    fn row_columns(&self, describe: bool) -> Vec<&'static str> {
        let mut cols = vec![format::COL_DATA];
        if self.has_checksums {
            cols.push(format::COL_CHECKSUM);
        }
        let schema = self.parts[0].meta.schema();
        if schema.field_with_name(format::COL_CHUNK_OFFSET).is_ok() {
            cols.push(format::COL_CHUNK_OFFSET);
        }
        if self.quantized {
            cols.extend([format::COL_SCALES, format::COL_ZERO_POINTS]);
        }
        if describe {
            cols.extend([
                format::COL_NAME,
                format::COL_DTYPE,
                format::COL_SHAPE,
                format::COL_NUM_PARAMS,
            ]);
        }
        cols
    }

    /// Calls `f` with the cells of every row of `batch`, the first being global row
    /// `first`.
    fn each_row(
        &self,
        batch: &RecordBatch,
        first: u64,
        describe: bool,
        f: &mut RowFn,
    ) -> Result<()> {
        let path = &self.path;
        let data = col::<BinaryArray>(batch, format::COL_DATA, path)?;
        let sums = if self.has_checksums {
            Some(col::<UInt64Array>(batch, format::COL_CHECKSUM, path)?)
        } else {
            None
        };
        let offs = batch
            .column_by_name(format::COL_CHUNK_OFFSET)
            .and_then(|c| c.as_any().downcast_ref::<Int64Array>());
        let quant = if self.quantized {
            Some((
                col::<BinaryArray>(batch, format::COL_SCALES, path)?,
                col::<BinaryArray>(batch, format::COL_ZERO_POINTS, path)?,
            ))
        } else {
            None
        };
        let described = if describe {
            Some((
                col::<StringArray>(batch, format::COL_NAME, path)?,
                col::<StringArray>(batch, format::COL_DTYPE, path)?,
                col::<ListArray>(batch, format::COL_SHAPE, path)?,
                batch
                    .column_by_name(format::COL_NUM_PARAMS)
                    .and_then(|c| c.as_any().downcast_ref::<Int64Array>()),
            ))
        } else {
            None
        };
        fn text(a: &StringArray, i: usize) -> &str {
            if a.is_null(i) {
                ""
            } else {
                a.value(i)
            }
        }
        for i in 0..batch.num_rows() {
            let described = described.map(|(names, dtypes, shapes, counts)| Described {
                name: text(names, i),
                dtype: text(dtypes, i),
                shape: shapes
                    .value(i)
                    .as_any()
                    .downcast_ref::<Int32Array>()
                    .map(|d| d.values().iter().map(|&x| x as i64).collect())
                    .unwrap_or_default(),
                num_params: counts.and_then(|c| (!c.is_null(i)).then(|| c.value(i))),
            });
            let (scales, zero_points) =
                quant.map_or((&[][..], &[][..]), |(s, z)| (s.value(i), z.value(i)));
            f(Cells {
                row: first + i as u64,
                data: data.value(i),
                checksum: sums.and_then(|s| (!s.is_null(i)).then(|| s.value(i))),
                offset: offs.and_then(|o| (!o.is_null(i)).then(|| o.value(i))),
                scales,
                zero_points,
                described,
            })?;
        }
        Ok(())
    }

    /// Calls `f` for every row of row group `rg`, in order; with `describe`, each row
    /// carries its name, dtype, shape and count cells too.
    pub(crate) fn scan_row_group(
        &self,
        rg: usize,
        describe: bool,
        f: &mut dyn FnMut(Row) -> Result<()>,
    ) -> Result<()> {
        let first = *self
            .rg_first_row
            .get(rg)
            .ok_or_else(|| Error::corrupt(&self.path, None, format!("no row group {rg}")))?;
        let n = self.rg_first_row.get(rg + 1).copied().unwrap_or(first) - first;
        let mut ti = self.tensor_at_row(first);
        self.read_rows(first, n, None, describe, &mut |c| {
            let row = c.row;
            while ti < self.tensors.len() && self.tensors[ti].row + self.tensors[ti].rows <= row {
                ti += 1;
            }
            if ti >= self.tensors.len() {
                return Err(Error::corrupt(
                    &self.path,
                    None,
                    format!("row {row} belongs to no tensor"),
                ));
            }
            let offset = match c.offset {
                Some(o) => u64::try_from(o).map_err(|_| {
                    Error::corrupt(
                        &self.path,
                        Some(&self.tensors[ti].name),
                        "negative chunk offset",
                    )
                })?,
                None => 0,
            };
            f(Row {
                row,
                tensor: ti,
                offset,
                data: c.data,
                checksum: c.checksum,
                scales: c.scales,
                zero_points: c.zero_points,
                described: c.described,
            })
        })
    }

    fn tensor_at_row(&self, row: u64) -> usize {
        self.tensors.partition_point(|t| t.row + t.rows <= row)
    }
}

/// Column `name` of `batch`, as arrow type `T`.
pub(super) fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str, path: &Path) -> Result<&'a T> {
    b.column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| {
            Error::corrupt(
                path,
                None,
                format!("column `{name}` has an unexpected type"),
            )
        })
}
