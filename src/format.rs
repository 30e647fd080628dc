//! The `weights.parquet` contract, shared by the writer and the reader: the schema,
//! and the footer, built here from the plan ([`footer`]) beside the code that parses it
//! back ([`parse_index`]).
//!
//! The first five columns are exactly the seed's V1 schema; two columns follow that
//! the seed's loader ignores: `chunk_offset` (the byte offset of a row's data inside
//! its tensor, for tensors split over rows) and `checksum` (XXH3-64 of `data`). The
//! footer's key-value metadata carries the format version, the cast policy, the
//! `metadata.json` content and a tensor index for direct access.

use std::path::Path;
use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::file::metadata::KeyValue;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::plan::{Plan, QuantType};

/// Version of our footer contract.
pub const FORMAT_VERSION: &str = "1";
/// The output file's name inside the output directory.
pub const WEIGHTS_FILE: &str = "weights.parquet";
/// The metadata file's name.
pub const METADATA_FILE: &str = "metadata.json";

/// Footer key: our format version.
pub const KEY_FORMAT: &str = "modelconv.format_version";
/// Footer key: the cast policy (`f16`, `bf16`, `f32`, `keep`).
pub const KEY_CAST: &str = "modelconv.cast";
/// Footer key: the checksum algorithm of the `checksum` column.
pub const KEY_CHECKSUM: &str = "modelconv.checksum";
/// Footer key: the `metadata.json` content.
pub const KEY_METADATA: &str = "modelconv.metadata";
/// Footer key: the tensor index ([`TensorIndex`] as JSON).
pub const KEY_INDEX: &str = "modelconv.index";
/// Footer key of a V2 file: the quantization options (`{"bits", "scheme", "group_size"}`).
pub const KEY_QUANTIZATION: &str = "modelconv.quantization";
/// The checksum algorithm's name.
pub const CHECKSUM_ALGO: &str = "xxh3_64";
/// Footer key of one part of a parted output: its [`PartStamp`] as JSON.
pub const KEY_PART: &str = "modelconv.part";
/// The manifest of a parted output, inside the `weights.parquet/` directory, written
/// after every part: a directory without it is not a conversion. Its name starts with
/// `_`, which Parquet dataset readers (pyarrow, DuckDB, polars) skip.
pub const MANIFEST_FILE: &str = "_manifest.json";

/// The file name of part `index` (from 0) of `count`: `part-00001-of-00008.parquet`,
/// counted from 1 like safetensors' shards, so that names sort in row order.
pub fn part_name(index: usize, count: usize) -> String {
    format!("part-{:05}-of-{:05}.parquet", index + 1, count)
}

/// What a part of a parted output was converted from and how: every field must match
/// for `--resume` to keep the part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Our footer contract's version ([`FORMAT_VERSION`]).
    pub format: String,
    /// The modelconv version that wrote it.
    pub modelconv: String,
    /// Each input file's name and size.
    pub files: Vec<(String, u64)>,
    /// XXH3-128 of the input's headers: every source tensor's name, dtype, shape and
    /// byte range in its file, and the checkpoint's `quantization_config`.
    pub input: String,
    /// The options that shape the output bytes, as `metadata.json` records them.
    pub options: Value,
    /// XXH3-128 of the plan: every output tensor, row and row group, and the parts.
    pub plan: String,
}

/// The footer stamp of one part: which part of which plan it is, and what its cast
/// saw (so that a resumed conversion reports kept parts' statistics).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartStamp {
    /// Part index, from 0.
    pub index: usize,
    /// Parts in the plan.
    pub count: usize,
    /// The part's first row in the whole output.
    pub first_row: u64,
    /// Rows in the part.
    pub rows: u64,
    /// The plan it belongs to.
    pub identity: Identity,
    /// Per planned tensor with anything to say: (tensor index, NaN, inf, overflow,
    /// largest overflowing magnitude). Floats are stored as their IEEE-754 bits, so a
    /// kept part's statistics come back exactly (a JSON decimal may not).
    #[serde(default)]
    pub cast: Vec<(usize, u64, u64, u64, u64)>,
    /// Per quantized tensor of a V2 part: (tensor index, Σx², Σe², max |e|, count),
    /// floats as their bits.
    #[serde(default)]
    pub quant: Vec<(usize, u64, u64, u64, u64)>,
}

/// One part as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestPart {
    /// File name inside the directory.
    pub file: String,
    /// Bytes of the file.
    pub bytes: u64,
    /// XXH3-128 of the file (32 hex digits).
    pub xxh3_128: String,
    /// First row in the whole output.
    pub first_row: u64,
    /// Rows.
    pub rows: u64,
    /// Row groups.
    pub row_groups: usize,
    /// Names of its first and last tensors (a tensor split over parts is in both).
    pub tensors: (String, String),
}

/// `_manifest.json`: the parts in order, the plan they belong to, and the whole
/// output's tensor index (rows counted over all parts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT_VERSION`].
    pub format_version: String,
    /// What the parts were converted from.
    pub identity: Identity,
    /// Parts in row order.
    pub parts: Vec<ManifestPart>,
    /// Rows over all parts.
    pub rows: u64,
    /// The tensor index of the whole output (as [`KEY_INDEX`]).
    pub index: Value,
    /// The `metadata.json` content.
    pub metadata: Value,
}

/// Column names, in schema order.
pub const COL_NAME: &str = "layer_name";
#[allow(missing_docs)]
pub const COL_SHAPE: &str = "shape";
#[allow(missing_docs)]
pub const COL_DTYPE: &str = "dtype";
#[allow(missing_docs)]
pub const COL_DATA: &str = "data";
#[allow(missing_docs)]
pub const COL_NUM_PARAMS: &str = "num_params";
/// V2: `int8`, `fp16` or `fp32` (the seed's `int2` is read by neither side here).
pub const COL_QUANT_TYPE: &str = "quant_type";
/// V2: f32 little-endian scales, one per channel or group of the row.
pub const COL_SCALES: &str = "scales";
/// V2: f32 little-endian zero points (integer values).
pub const COL_ZERO_POINTS: &str = "zero_points";
/// V2: -1 per-tensor or per-group, 0 per-channel along axis 0.
pub const COL_QUANT_AXIS: &str = "quant_axis";
/// V2: 0 none, G > 0 groups of G over the flattened tensor.
pub const COL_GROUP_SIZE: &str = "group_size";
#[allow(missing_docs)]
pub const COL_CHUNK_OFFSET: &str = "chunk_offset";
#[allow(missing_docs)]
pub const COL_CHECKSUM: &str = "checksum";

/// The list item field of `shape`, as pyarrow names it.
pub fn shape_item_field() -> Arc<Field> {
    Arc::new(Field::new_list_field(DataType::Int32, true))
}

/// The Arrow schema of the files we write: the seed's V1 columns, the five V2 columns
/// when `quantized`, then ours. Fields are nullable, as pyarrow's defaults make them in
/// the seed's files (we never write a null).
pub fn schema(quantized: bool) -> SchemaRef {
    let mut fields = vec![
        Field::new(COL_NAME, DataType::Utf8, true),
        Field::new(COL_SHAPE, DataType::List(shape_item_field()), true),
        Field::new(COL_DTYPE, DataType::Utf8, true),
        Field::new(COL_DATA, DataType::Binary, true),
        Field::new(COL_NUM_PARAMS, DataType::Int64, true),
    ];
    if quantized {
        fields.extend([
            Field::new(COL_QUANT_TYPE, DataType::Utf8, true),
            Field::new(COL_SCALES, DataType::Binary, true),
            Field::new(COL_ZERO_POINTS, DataType::Binary, true),
            Field::new(COL_QUANT_AXIS, DataType::Int32, true),
            Field::new(COL_GROUP_SIZE, DataType::Int32, true),
        ]);
    }
    fields.extend([
        Field::new(COL_CHUNK_OFFSET, DataType::Int64, true),
        Field::new(COL_CHECKSUM, DataType::UInt64, true),
    ]);
    Arc::new(Schema::new(fields))
}

/// One tensor's entry in the footer index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct IndexEntry {
    /// Output name.
    pub name: String,
    /// Name of the source tensor it was converted from.
    pub source: String,
    /// Torch-style output dtype.
    pub dtype: String,
    /// Safetensors dtype of the source tensor.
    pub source_dtype: String,
    /// Dimensions.
    pub shape: Vec<u64>,
    /// Output bytes.
    pub bytes: u64,
    /// First row (counted over the whole file).
    pub row: u64,
    /// Number of consecutive rows holding it.
    pub rows: u64,
    /// How it is quantized (V2 files), if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quant: Option<QuantInfo>,
}

/// How a stored tensor is quantized: int8 codes (or int2 codes packed four to a
/// byte), with `scales` scales and zero points (one per channel along axis 0, or per
/// group of `group_size` elements).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantInfo {
    /// The V2 `quant_type` (absent from the index for int8, as files before int2).
    #[serde(default, skip_serializing_if = "is_int8")]
    pub kind: QuantType,
    /// The V2 `quant_axis`: 0 per-channel, -1 per-group.
    pub axis: i32,
    /// The V2 `group_size`: 0 per-channel.
    pub group_size: u64,
    /// Scales (and zero points) over all its rows.
    pub scales: u64,
}

fn is_int8(k: &QuantType) -> bool {
    *k == QuantType::Int8
}

impl QuantInfo {
    /// Elements sharing one scale, for a tensor of `shape`.
    pub(crate) fn unit(&self, shape: &[u64]) -> u64 {
        if self.group_size > 0 {
            self.group_size
        } else {
            let n: u64 = shape.iter().product();
            shape
                .first()
                .map_or(n, |&d0| n.checked_div(d0).unwrap_or(0))
        }
    }
}

/// The footer index: every tensor, in row order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TensorIndex {
    /// Entries in row order.
    pub tensors: Vec<IndexEntry>,
}

impl TensorIndex {
    /// The index of a file written from `plan`.
    pub(crate) fn of(plan: &Plan) -> TensorIndex {
        Self::of_rows(plan, 0..plan.rows.len())
    }

    /// The index of a part holding `rows` of `plan`: the tensors with rows there, rows
    /// counted from the part's first (a tensor split over parts lists the rows this
    /// part holds).
    pub(crate) fn of_rows(plan: &Plan, rows: std::ops::Range<usize>) -> TensorIndex {
        let (lo, hi) = (rows.start as u64, rows.end as u64);
        TensorIndex {
            tensors: plan
                .tensors
                .iter()
                .filter(|t| t.first_row < hi && t.first_row + t.rows > lo)
                .map(|t| IndexEntry {
                    name: t.name.clone(),
                    source: t.src.name.clone(),
                    dtype: t.dtype.torch_name().to_string(),
                    source_dtype: t.src.dtype.to_string(),
                    shape: t.src.shape.clone(),
                    bytes: t.out_len,
                    row: t.first_row.max(lo) - lo,
                    rows: (t.first_row + t.rows).min(hi) - t.first_row.max(lo),
                    quant: t.quant.map(|q| QuantInfo {
                        kind: q.kind,
                        axis: q.axis,
                        group_size: q.group_size,
                        scales: t.src.numel.div_ceil(q.unit),
                    }),
                })
                .collect(),
        }
    }
}

/// The footer key-value metadata of a file written from `plan`, with `metadata` (the
/// `metadata.json` content) embedded.
pub(crate) fn footer(plan: &Plan, metadata: &Value) -> Vec<KeyValue> {
    footer_of(plan, TensorIndex::of(plan), Some(metadata), None)
}

/// The footer of part file `stamp.index` of `plan`: no `metadata.json` (it records
/// the conversion's time and totals, which the manifest holds), the part's own index
/// and its stamp, so that a part is a pure function of the plan and its index.
pub(crate) fn part_footer(plan: &Plan, stamp: &PartStamp) -> Vec<KeyValue> {
    let rows = plan.parts[stamp.index].rows.clone();
    let stamp = serde_json::to_string(stamp).ok();
    footer_of(plan, TensorIndex::of_rows(plan, rows), None, stamp)
}

fn footer_of(
    plan: &Plan,
    index: TensorIndex,
    metadata: Option<&Value>,
    stamp: Option<String>,
) -> Vec<KeyValue> {
    let index = serde_json::to_string(&index);
    // Serialising plain strings and numbers cannot fail.
    debug_assert!(index.is_ok());
    let quant = plan.quantize.as_ref().map(|q| {
        serde_json::json!({
            "bits": q.kind.bits(),
            "quant_type": q.kind.as_str(),
            "scheme": q.scheme.as_str(),
            "group_size": q.group_size,
        })
        .to_string()
    });
    [
        (KEY_FORMAT, Some(FORMAT_VERSION.to_string())),
        (KEY_CAST, Some(plan.target.as_str().to_string())),
        (KEY_CHECKSUM, Some(CHECKSUM_ALGO.to_string())),
        (KEY_METADATA, metadata.map(Value::to_string)),
        (KEY_INDEX, Some(index.unwrap_or_default())),
        (KEY_QUANTIZATION, quant),
        (KEY_PART, stamp),
    ]
    .into_iter()
    .filter_map(|(k, v)| Some(KeyValue::new(k.to_string(), v?)))
    .collect()
}

/// One tensor as stored in a weight file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorInfo {
    /// Name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions.
    pub shape: Vec<u64>,
    /// Elements.
    pub num_params: u64,
    /// Bytes of its data.
    pub bytes: u64,
    /// First row.
    pub row: u64,
    /// Rows it spans.
    pub rows: u64,
    /// Source tensor name, when the file records it.
    pub source: Option<String>,
    /// Source dtype, when the file records it.
    pub source_dtype: Option<String>,
    /// How it is quantized (V2 files): `dtype` is then int8, the codes' type (int2
    /// codes are stored packed, `bytes` is then a quarter of the elements rounded up).
    pub quant: Option<QuantInfo>,
}

/// Parses the footer index of the file at `path` (the [`footer`]'s twin) and checks it
/// against the file: known dtypes, sizes that match shapes, rows that follow each other
/// and stay inside the file's `total_rows`.
///
/// # Errors
///
/// `CorruptWeights` naming the file, and the tensor where one is at fault.
pub(crate) fn parse_index(path: &Path, text: &str, total_rows: u64) -> Result<Vec<TensorInfo>> {
    let index: TensorIndex = serde_json::from_str(text)
        .map_err(|e| Error::corrupt(path, None, format!("footer tensor index is damaged: {e}")))?;
    let mut next_row = 0u64;
    index
        .tensors
        .into_iter()
        .map(|e: IndexEntry| {
            let dtype = Dtype::from_torch(&e.dtype).ok_or_else(|| {
                Error::corrupt(path, Some(&e.name), format!("unknown dtype `{}`", e.dtype))
            })?;
            let numel = e.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            let end = e.row.checked_add(e.rows);
            let quant_ok = e.quant.is_none_or(|q| {
                let unit = q.unit(&e.shape);
                dtype == Dtype::I8
                    && unit > 0
                    && numel.is_some_and(|n| n.div_ceil(unit) == q.scales)
                    && (q.group_size > 0 || q.axis == 0)
            });
            let bytes = match e.quant {
                Some(q) => numel.map(|n| q.kind.bytes(n)),
                None => numel.and_then(|n| n.checked_mul(dtype.size() as u64)),
            };
            let ok = bytes == Some(e.bytes)
                && quant_ok
                && e.row == next_row
                && e.rows >= 1
                && end.is_some_and(|end| end <= total_rows);
            let (Some(numel), Some(end), true) = (numel, end, ok) else {
                return Err(Error::corrupt(
                    path,
                    Some(&e.name),
                    "footer tensor index is inconsistent",
                ));
            };
            next_row = end;
            Ok(TensorInfo {
                name: e.name,
                dtype,
                shape: e.shape,
                num_params: numel,
                bytes: e.bytes,
                row: e.row,
                rows: e.rows,
                source: Some(e.source),
                source_dtype: Some(e.source_dtype),
                quant: e.quant,
            })
        })
        .collect()
}
