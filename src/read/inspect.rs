//! `inspect`: what a weight file holds (tensors, totals, codec, footer, row groups),
//! as a report the binary prints as a table or serialises as JSON.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::file::{rg_rows, rg_sizes};
use super::{TensorInfo, WeightFile};
use crate::error::{Error, Result};
use crate::format;

/// One row group of a weight file.
#[derive(Debug, Clone, Serialize)]
pub struct RowGroupInfo {
    /// Position in the file.
    pub index: usize,
    /// Rows.
    pub rows: u64,
    /// Bytes before compression.
    pub uncompressed_bytes: u64,
    /// Bytes on disk.
    pub compressed_bytes: u64,
}

/// What [`inspect`] found.
#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    /// The file.
    pub path: PathBuf,
    /// Our footer's format version; `None` for files written by the seed's converter.
    pub format_version: Option<String>,
    /// The cast policy it was written with, when recorded.
    pub cast: Option<String>,
    /// The `data` column's codec (`zstd`, `lz4`, `snappy`, `none`; the file does not
    /// record the level).
    pub compression: Option<String>,
    /// True when the footer indexes the tensors.
    pub footer_index: bool,
    /// True when rows carry checksums.
    pub checksums: bool,
    /// Every tensor, in row order.
    pub tensors: Vec<TensorInfo>,
    /// Number of tensors.
    pub total_tensors: usize,
    /// Elements over all tensors.
    pub total_parameters: u64,
    /// Data bytes over all tensors.
    pub total_bytes: u64,
    /// Bytes of the file.
    pub file_bytes: u64,
    /// The row groups.
    pub row_groups: Vec<RowGroupInfo>,
    /// The `metadata.json` content stored in the footer.
    pub metadata: Option<serde_json::Value>,
}

/// Describes the weight file at `path` (or the `weights.parquet` in that directory),
/// reading only its footer.
///
/// # Errors
///
/// As [`WeightFile::open`]; `Io` when the file cannot be measured; `CorruptWeights`
/// naming the file when its footer gives a row group a negative size.
pub fn inspect(path: impl AsRef<Path>) -> Result<InspectReport> {
    let wf = WeightFile::open(path)?;
    let md = wf.parquet_metadata();
    let mut file_bytes = 0u64;
    let mut row_groups = Vec::new();
    // Every part of a parted output, row groups numbered over all of them.
    for (path, pmd) in wf.part_files() {
        file_bytes += std::fs::metadata(path)
            .map_err(|e| Error::io("stat", path, e))?
            .len();
        for (i, rg) in pmd.row_groups().iter().enumerate() {
            let (uncompressed_bytes, compressed_bytes) = rg_sizes(path, i, rg)?;
            row_groups.push(RowGroupInfo {
                index: row_groups.len(),
                rows: rg_rows(path, i, rg)?,
                uncompressed_bytes,
                compressed_bytes,
            });
        }
    }
    let compression = md.row_groups().first().and_then(|rg| {
        rg.columns()
            .iter()
            .find(|c| c.column_path().string() == format::COL_DATA)
            .map(|c| codec_name(c.compression()).to_string())
    });
    let tensors = wf.tensors().to_vec();
    let sum = |f: fn(&TensorInfo) -> u64| {
        tensors
            .iter()
            .try_fold(0u64, |a, t| a.checked_add(f(t)))
            .ok_or_else(|| Error::corrupt(wf.path(), None, "tensor sizes add up past 64 bits"))
    };
    let (total_parameters, total_bytes) = (sum(|t| t.num_params)?, sum(|t| t.bytes)?);
    Ok(InspectReport {
        path: wf.path().to_path_buf(),
        format_version: wf.key_value(format::KEY_FORMAT).map(str::to_owned),
        cast: wf.key_value(format::KEY_CAST).map(str::to_owned),
        compression,
        footer_index: wf.has_index(),
        checksums: wf.has_checksums(),
        total_tensors: tensors.len(),
        total_parameters,
        total_bytes,
        tensors,
        file_bytes,
        row_groups,
        metadata: wf.metadata(),
    })
}

/// Our name of a Parquet codec.
fn codec_name(c: parquet::basic::Compression) -> &'static str {
    use parquet::basic::Compression as C;
    match c {
        C::ZSTD(_) => "zstd",
        C::LZ4_RAW | C::LZ4 => "lz4",
        C::SNAPPY => "snappy",
        C::UNCOMPRESSED => "none",
        C::GZIP(_) => "gzip",
        C::BROTLI(_) => "brotli",
        C::LZO => "lzo",
    }
}

/// One tensor of a checkpoint as a conversion reads it.
#[derive(Debug, Clone, Serialize)]
pub struct SourceTensorInfo {
    /// Name (a dequantized weight's output name).
    pub name: String,
    /// Stored dtype (a dequantized weight's codes).
    pub dtype: String,
    /// Dimensions (a dequantized weight's output shape).
    pub shape: Vec<u64>,
    /// For a dequantized weight: the stored tensors it is computed from, codes first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dequantized_from: Option<Vec<String>>,
}

/// What [`inspect_source`] found in a checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct SourceReport {
    /// What was named.
    pub path: PathBuf,
    /// The files holding tensors.
    pub shards: Vec<PathBuf>,
    /// The pre-quantization scheme in one line, when there is one.
    pub quantization: Option<String>,
    /// The scheme's `quantization_config`.
    pub quantization_config: Option<serde_json::Value>,
    /// Tensors in source order, each quantized weight once.
    pub tensors: Vec<SourceTensorInfo>,
    /// Stored tensors the scheme consumes (`stored`, `weight`) or drops (`stored`,
    /// reason).
    pub consumed: Vec<(String, String)>,
    /// Stored tensors the scheme does not need, with the reason.
    pub dropped: Vec<(String, String)>,
}

/// Describes a checkpoint (model directory, `.safetensors` file, shard index or
/// `.bin`): its tensors as a conversion reads them, and its pre-quantization scheme
/// with what each quantized weight is computed from.
pub fn inspect_source(source: &crate::Source) -> SourceReport {
    let (logical, gone) = source.logical(true);
    SourceReport {
        path: source.path().to_path_buf(),
        shards: source.shard_paths().map(Path::to_path_buf).collect(),
        quantization: source.scheme().map(|s| s.summary.clone()),
        quantization_config: source.scheme().map(|s| s.params.clone()),
        tensors: logical
            .iter()
            .map(|t| SourceTensorInfo {
                name: t.info.name.clone(),
                dtype: t
                    .dequant
                    .map_or(t.info.dtype, |d| d.stored_dtype)
                    .to_string(),
                shape: t.info.shape.clone(),
                dequantized_from: t.dequant.map(|d| d.consumes.clone()),
            })
            .collect(),
        consumed: gone.consumed,
        dropped: gone.dropped,
    }
}
