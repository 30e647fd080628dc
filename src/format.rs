//! The `weights.parquet` contract, shared by the writer and the reader.
//!
//! The first five columns are exactly the seed's V1 schema; two columns follow that
//! the seed's loader ignores: `chunk_offset` (the byte offset of a row's data inside
//! its tensor, for tensors split over rows) and `checksum` (XXH3-64 of `data`). The
//! footer's key-value metadata carries the format version, the cast policy, the
//! `metadata.json` content and a tensor index for direct access.

use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, SchemaRef};
use serde::{Deserialize, Serialize};

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
/// The checksum algorithm's name.
pub const CHECKSUM_ALGO: &str = "xxh3_64";

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
#[allow(missing_docs)]
pub const COL_CHUNK_OFFSET: &str = "chunk_offset";
#[allow(missing_docs)]
pub const COL_CHECKSUM: &str = "checksum";

/// The list item field of `shape`, as pyarrow names it.
pub fn shape_item_field() -> Arc<Field> {
    Arc::new(Field::new_list_field(DataType::Int32, true))
}

/// The Arrow schema of the files we write. Fields are nullable, as pyarrow's defaults
/// make them in the seed's files.
pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(COL_NAME, DataType::Utf8, true),
        Field::new(COL_SHAPE, DataType::List(shape_item_field()), true),
        Field::new(COL_DTYPE, DataType::Utf8, true),
        Field::new(COL_DATA, DataType::Binary, true),
        Field::new(COL_NUM_PARAMS, DataType::Int64, true),
        Field::new(COL_CHUNK_OFFSET, DataType::Int64, true),
        Field::new(COL_CHECKSUM, DataType::UInt64, true),
    ]))
}

/// One tensor's entry in the footer index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
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
}

/// The footer index: every tensor, in row order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorIndex {
    /// Entries in row order.
    pub tensors: Vec<IndexEntry>,
}
