//! Converts Hugging Face checkpoints (safetensors or PyTorch `.bin`, single file or
//! sharded, local or by URL) into Parquet weight files that the seed system's loaders
//! read unchanged, and reads them back: one tensor by name, inspect, verify, export to
//! safetensors. Input is mapped or read by ranges and streamed, so memory stays bounded
//! whatever the model size.
//!
//! Three faces over this one library: the library itself (no CLI or Python
//! dependencies), the `modelconv` binary (the default `cli` feature) and the Python
//! package (PyO3, in `python/`). Each face only translates; what a conversion does is
//! decided here.
//!
//! The pipeline: source (find the shards, validate every header) → plan (tensors, rows,
//! row groups) → cast (dequantize, cast or quantize each row) → write (row groups in
//! order, the footer, an atomic commit), sequenced by [`convert()`]; [`WeightFile`] reads
//! the result.
//!
//! # Example
//!
//! Convert the CLIP fixture that ships with the crate, then read one tensor back:
//!
//! ```
//! use modelconv::{convert, ConvertConfig, Dtype, TargetDtype, WeightFile};
//!
//! fn main() -> modelconv::Result<()> {
//!     let out = std::env::temp_dir().join(format!("modelconv-doc-{}", std::process::id()));
//!     let config = ConvertConfig::builder().dtype(TargetDtype::F16).force(true).build()?;
//!     let report = convert("tests/fixtures/tiny-clip", &out, &config)?;
//!     assert!(report.success);
//!
//!     let weights = WeightFile::open(&out)?;
//!     let t = weights.tensor("vision_model.post_layernorm.weight")?;
//!     assert_eq!((t.dtype, t.shape.as_slice()), (Dtype::F16, &[32][..]));
//!     assert_eq!(t.to_f32().len(), 32);
//!     std::fs::remove_dir_all(&out).ok();
//!     Ok(())
//! }
//! ```
//!
//! The repository's `README.md` shows the command line and the Python package;
//! `docs/` holds the format, each feature, the measurements and the error catalogue.
#![deny(missing_docs)]
#![forbid(unsafe_op_in_unsafe_fn)]

// One module per stage, bottom to top: a module uses only the modules before it here
// (docs/architecture.md says what each holds).
// Support: the element types, the error enum, globs.
mod dtype;
mod error;
mod glob;
// I/O under source and write: temp files, URLs, HTTP, object storage.
mod io;
// Stage 1: find, validate and map (or fetch) the checkpoint.
mod source;
// Model knowledge: families, recipes, metadata.json.
mod model;
// Stage 2: tensors, rows, row groups, parts.
mod plan;
// Stage 3: dequantize, cast or quantize each row.
mod cast;
// The file contract shared by the reader and the writer.
mod format;
// The reader (the writer reads back the parts an earlier run left through it).
mod read;
// Stage 4: the writer and its one destination (a local directory or an object store).
mod write;
// Sequences the stages: the API.
mod convert;

pub use cast::TensorQuantError;
pub use convert::{
    convert, convert_part, convert_with, parse_size, plan_conversion, prepare_parts, record_parts,
    ConversionPlan, ConversionReport, ConvertConfig, ConvertConfigBuilder, Dequantization, Event,
    Fetched, Observer, PartOutcome, PartStatus, PlannedEntry, PlannedPart, QuantReport,
    Requantized, Silent, DEFAULT_INFLIGHT_PER_THREAD, DEFAULT_MAX_ROW_MB, DEFAULT_ROW_GROUP_MB,
    DEFAULT_ZSTD_LEVEL, LOW_MEMORY_ROW_MB, MAX_BUDGET_BYTES, MIN_FILE_SIZE,
};
pub use dtype::{Dtype, TargetDtype};
pub use error::{sanitize, Error, Result};
pub use format::QuantInfo;
pub use io::temp::remove_temp_files;
pub use model::{Filters, ModelType, Part};
pub use plan::{QuantScheme, QuantType, Quantize, MIN_QUANT_ELEMENTS};
pub use read::{
    export, inspect, inspect_source, verify, ExportOptions, ExportReport, InspectReport, QuantData,
    RangeLog, RowGroupInfo, SourceReport, SourceTensorInfo, Tensor, TensorCheck, TensorInfo,
    VerifyOptions, VerifyReport, WeightFile,
};
pub use source::{
    is_url, open as open_source, IoMode, Source, SourceOptions, DEFAULT_MAX_HEADER_BYTES,
    TOKENIZER_FILES,
};
pub use write::Codec;

/// Pipeline internals for the fuzz targets and benches. Not a stable API.
#[doc(hidden)]
pub mod internals {
    pub use crate::cast::{cast_and_hash, cast_into, CastStats};
    pub use crate::source::{check_prefix, parse_header, Header};

    /// The Parquet writer properties of every weight file, for tests that rebuild a
    /// converted file with the parquet crate's own column writers.
    pub fn writer_properties(
        compression: parquet::basic::Compression,
    ) -> parquet::file::properties::WriterProperties {
        crate::write::writer_properties(compression)
    }

    /// Opens `input` as a checkpoint (every header and index check): each tensor's
    /// shard file and name, in source order.
    ///
    /// # Errors
    ///
    /// Every rule of [`crate::open_source`].
    pub fn source_tensors(
        input: &std::path::Path,
    ) -> crate::Result<Vec<(std::path::PathBuf, String)>> {
        let source = crate::source::open(input, &crate::SourceOptions::default())?;
        Ok(source
            .tensors()
            .map(|(i, t)| (source.shards[i].path.clone(), t.name.clone()))
            .collect())
    }

    /// Quantizes `src` (elements of `dtype`) unit by unit, `unit` elements each, into
    /// `dst` (one int8 code per element): every unit's scale and zero point. The cast
    /// stage's per-unit quantizer, for the benches.
    ///
    /// # Errors
    ///
    /// A unit that cannot be quantized (non-finite values, a span past f32), as text.
    pub fn quantize_units(
        scheme: crate::QuantScheme,
        dtype: crate::Dtype,
        src: &[u8],
        unit: usize,
        dst: &mut [u8],
    ) -> Result<Vec<(f32, f32)>, String> {
        let size = dtype.size();
        let mut x = Vec::with_capacity(unit);
        let mut err = crate::cast::QuantError::default();
        src.chunks(unit * size)
            .zip(dst.chunks_mut(unit))
            .map(|(s, q)| {
                crate::cast::quantize_unit(
                    (crate::QuantType::Int8, scheme),
                    dtype,
                    s,
                    &mut x,
                    q,
                    &mut err,
                )
                .map_err(|e| e.to_string())
            })
            .collect()
    }

    /// Runs the pickle interpreter over `data`; the number of values it built.
    ///
    /// # Errors
    ///
    /// The interpreter's refusal, as text.
    pub fn pickle_load(data: &[u8]) -> Result<usize, String> {
        crate::source::fuzzing::pickle_load(data)
    }

    /// Reads `data` as a PyTorch checkpoint (zip or legacy): every tensor's name,
    /// element count, and the byte range `[offset, offset + len)` it reads.
    ///
    /// # Errors
    ///
    /// Every rule of the PyTorch reader.
    pub fn torch_tensors(data: &[u8]) -> crate::Result<Vec<(String, u64, u64, u64)>> {
        crate::source::fuzzing::torch_tensors(data)
    }

    /// The stored entries of a zip archive: name, data offset, data length.
    ///
    /// # Errors
    ///
    /// The directory's first problem, as text.
    pub fn zip_entries(data: &[u8]) -> Result<Vec<(String, u64, u64)>, String> {
        crate::source::fuzzing::zip_entries(data)
    }
}
