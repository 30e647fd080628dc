//! The tensor list of a file without our footer index (the seed's converter writes
//! none): built by one scan of the small columns (`layer_name`, `shape`, `dtype`, and
//! for a V2 file the quantization cells), never `data`. Consecutive rows of one name are
//! one split tensor.

use std::path::Path;

use arrow_array::{Array, Int32Array, ListArray, RecordBatch, StringArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use super::file::guard;
use super::rows::col;
use super::{TensorInfo, WeightFile};
use crate::dtype::Dtype;
use crate::error::{sanitize, Error, Result};
use crate::format::{self, QuantInfo};
use crate::plan::QuantType;

impl WeightFile {
    /// Builds the tensor list of a file without our footer index by reading the small
    /// columns (not `data`).
    pub(super) fn tensors_from_scan(&self) -> Result<Vec<TensorInfo>> {
        let path = self.path.clone();
        let batches = self.small_columns()?;
        let mut out: Vec<TensorInfo> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut row = 0u64;
        for b in &batches {
            let names = col::<StringArray>(b, format::COL_NAME, &path)?;
            let dtypes = col::<StringArray>(b, format::COL_DTYPE, &path)?;
            let shapes = col::<ListArray>(b, format::COL_SHAPE, &path)?;
            let v2 = if self.quantized {
                Some((
                    col::<StringArray>(b, format::COL_QUANT_TYPE, &path)?,
                    col::<Int32Array>(b, format::COL_QUANT_AXIS, &path)?,
                    col::<Int32Array>(b, format::COL_GROUP_SIZE, &path)?,
                ))
            } else {
                None
            };
            for i in 0..b.num_rows() {
                let name = names.value(i).to_string();
                let v2_cells = v2.map(|(k, a, g)| (k.value(i), a.value(i), g.value(i)));
                let dims = shapes.value(i);
                let (dtype, shape, numel, bytes, quant) =
                    scanned_row(&path, &name, dtypes.value(i), dims.as_ref(), v2_cells)?;
                match out.last_mut() {
                    Some(last) if last.name == name && last.row + last.rows == row => {
                        last.rows += 1
                    }
                    _ => {
                        if !seen.insert(name.clone()) {
                            return Err(Error::DuplicateTensor {
                                path: path.clone(),
                                tensor: name,
                                other: None,
                            });
                        }
                        out.push(TensorInfo {
                            name,
                            dtype,
                            shape,
                            num_params: numel,
                            bytes,
                            row,
                            rows: 1,
                            source: None,
                            source_dtype: None,
                            quant,
                        })
                    }
                }
                row += 1;
            }
        }
        Ok(out)
    }

    /// Reads the small columns of the (only) file in batches.
    fn small_columns(&self) -> Result<Vec<RecordBatch>> {
        let path = &self.path;
        guard(path, None, || {
            let mut cols = vec![format::COL_NAME, format::COL_SHAPE, format::COL_DTYPE];
            if self.quantized {
                cols.extend([
                    format::COL_QUANT_TYPE,
                    format::COL_QUANT_AXIS,
                    format::COL_GROUP_SIZE,
                ]);
            }
            let p0 = &self.parts[0];
            let mask = ProjectionMask::columns(p0.meta.parquet_schema(), cols);
            let rdr = ParquetRecordBatchReaderBuilder::new_with_metadata(
                p0.file.clone(),
                p0.meta.clone(),
            )
            .with_projection(mask)
            .with_batch_size(8192)
            .build()
            .map_err(|e| Error::parquet(path, None, e))?;
            rdr.collect::<std::result::Result<Vec<RecordBatch>, _>>()
                .map_err(|e| {
                    Error::corrupt(path, None, format!("cannot read the tensor names: {e}"))
                })
        })
    }
}

/// One row of a file without our footer index: `(stored dtype, shape, elements, bytes,
/// quantization)` from its `dtype` and `shape` cells, and for a V2 file its
/// `(quant_type, quant_axis, group_size)` cells (an int8 or int2 row stores codes
/// whatever its `dtype` says: the original dtype).
#[allow(clippy::type_complexity)]
fn scanned_row(
    path: &Path,
    name: &str,
    dtype_s: &str,
    dims: &dyn Array,
    v2: Option<(&str, i32, i32)>,
) -> Result<(Dtype, Vec<u64>, u64, u64, Option<QuantInfo>)> {
    let bad = |why: String| Error::corrupt(path, Some(name), why);
    let mut dtype =
        Dtype::from_torch(dtype_s).ok_or_else(|| bad(format!("unknown dtype `{dtype_s}`")))?;
    let mut quant = None;
    if let Some((kind, axis, group)) = v2 {
        match kind {
            "fp16" | "fp32" => {}
            "int8" | "int2" => {
                dtype = Dtype::I8;
                let group_size =
                    u64::try_from(group).map_err(|_| bad("negative group size".into()))?;
                if group_size == 0 && axis != 0 {
                    return Err(bad(format!(
                        "quant_axis {axis} without groups is not read by modelconv"
                    )));
                }
                quant = Some(QuantInfo {
                    kind: if kind == "int2" {
                        QuantType::Int2
                    } else {
                        QuantType::Int8
                    },
                    axis,
                    group_size,
                    scales: 0,
                });
            }
            other => {
                return Err(bad(format!(
                    "quant_type `{}` is not read by modelconv",
                    sanitize(other)
                )))
            }
        }
    }
    let dims = dims
        .as_any()
        .downcast_ref::<Int32Array>()
        .ok_or_else(|| bad("shape is not a list of int32".into()))?;
    let shape = dims
        .values()
        .iter()
        .map(|&d| u64::try_from(d))
        .collect::<std::result::Result<Vec<u64>, _>>()
        .map_err(|_| bad("negative dimension".into()))?;
    let numel = shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("shape overflows".into()))?;
    let bytes = match &quant {
        Some(q) => Some(q.kind.bytes(numel)),
        None => numel.checked_mul(dtype.size() as u64),
    }
    .ok_or_else(|| bad("shape overflows".into()))?;
    if let Some(q) = &mut quant {
        let unit = q.unit(&shape);
        q.scales = if unit == 0 { 0 } else { numel.div_ceil(unit) };
    }
    Ok((dtype, shape, numel, bytes, quant))
}
