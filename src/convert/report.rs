//! What a conversion reports: progress events to an [`Observer`] while it runs, a
//! [`ConversionReport`] when it is done, and a [`ConversionPlan`] for a dry run. Plain
//! data with `serde` derive: the binary and the Python package only print them.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::cast::TensorQuantError;
use crate::error::Error;

/// What a conversion tells its observer.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// The plan is made: this many tensors and source bytes will be converted.
    Planned {
        /// Tensors.
        tensors: usize,
        /// Source bytes to read.
        source_bytes: u64,
    },
    /// `done` of `total` source bytes are written.
    Progress {
        /// Bytes done.
        done: u64,
        /// Bytes in all.
        total: u64,
        /// For a remote input: bytes fetched so far.
        fetched: Option<u64>,
    },
    /// Something the user should know (unknown architecture, tied weights, ...).
    Notice(&'a str),
    /// Verifying the output against the source.
    Validating,
}

/// Receives [`Event`]s; the CLI's progress bar is one implementation.
pub trait Observer: Sync {
    /// Called from the converting threads; keep it cheap.
    fn event(&self, event: &Event);
}

/// An observer that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Observer for Silent {
    fn event(&self, _: &Event) {}
}

/// The outcome of a conversion, with the seed's `ConversionResult` fields first.
#[derive(Debug, Clone, Serialize)]
pub struct ConversionReport {
    /// True when the conversion finished.
    pub success: bool,
    /// The name the user gave.
    pub model_name: String,
    /// The output directory.
    pub output_dir: PathBuf,
    /// `weights.parquet`.
    pub parquet_path: Option<PathBuf>,
    /// `tokenizer/`, when tokenizer files were copied.
    pub tokenizer_path: Option<PathBuf>,
    /// `metadata.json`.
    pub metadata_path: Option<PathBuf>,
    /// Elements over all converted tensors.
    pub total_parameters: u64,
    /// Size of `weights.parquet` in MiB.
    pub file_size_mb: f64,
    /// Source MiB of the converted tensors / output MiB.
    pub compression_ratio: f64,
    /// Wall time.
    pub conversion_time_sec: f64,
    /// Result of `--validate`, when it ran.
    pub validation_passed: Option<bool>,
    /// The error, when `success` is false.
    pub error_message: Option<String>,
    /// The `metadata.json` content.
    pub metadata: Value,
    /// Tensors written.
    pub tensors: usize,
    /// Source bytes of the converted tensors.
    pub source_bytes: u64,
    /// Bytes of `weights.parquet`.
    pub output_bytes: u64,
    /// Notices (unknown architecture, tied weights, overflow allowed, ...).
    pub notices: Vec<String>,
    /// What quantization did, for a quantized conversion.
    pub quantization: Option<QuantReport>,
    /// The parts of a parted output, in order (empty for one file): written, kept
    /// from an interrupted run, or redone.
    pub parts: Vec<super::PartOutcome>,
    /// For a remote input: what was fetched over the network.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fetched: Option<Fetched>,
}

/// What a remote conversion fetched: body bytes (retried ranges and chunks fetched
/// again included) and requests (retries included).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Fetched {
    /// Body bytes received.
    pub bytes: u64,
    /// Requests sent.
    pub requests: u64,
}

/// What `--quantize` did to the model.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QuantReport {
    /// The V2 `quant_type` written: `int8` or `int2`.
    pub quant_type: String,
    /// `symmetric` or `asymmetric`.
    pub scheme: String,
    /// 0 per-channel, else the group size.
    pub group_size: u64,
    /// Tensors stored as int8 (or int2) codes.
    pub quantized_tensors: usize,
    /// Tensors stored as floats or integers (`fp16`/`fp32` rows).
    pub unquantized_tensors: usize,
    /// Model-wide over the quantized tensors: max |x − x̂|, ‖x − x̂‖ / ‖x‖, SQNR (dB).
    pub model: TensorQuantError,
    /// Every quantized tensor, worst (lowest SQNR) first.
    pub tensors: Vec<TensorQuantError>,
    /// Pre-quantized weights written from their own integer codes, scales and zero
    /// points: exact (their error is 0, their SQNR infinite: `null` in JSON).
    pub carried: Vec<String>,
    /// Pre-quantized weights quantized from their dequantized values, and why their
    /// codes could not be carried.
    pub requantized: Vec<Requantized>,
}

/// A pre-quantized weight quantized again from its dequantized values.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Requantized {
    /// Output name.
    pub name: String,
    /// Why its codes were not carried (`act-order g_idx`, `F8_E4M3 codes`, …).
    pub reason: String,
}

impl ConversionReport {
    /// The report of a failed conversion, as the seed's `ConversionResult` gave it.
    pub fn failure(model_name: &str, output_dir: &Path, error: &Error, seconds: f64) -> Self {
        ConversionReport {
            success: false,
            model_name: model_name.to_string(),
            output_dir: output_dir.to_path_buf(),
            parquet_path: None,
            tokenizer_path: None,
            metadata_path: None,
            total_parameters: 0,
            file_size_mb: 0.0,
            compression_ratio: 0.0,
            conversion_time_sec: seconds,
            validation_passed: None,
            error_message: Some(error.to_string()),
            metadata: Value::Null,
            tensors: 0,
            source_bytes: 0,
            output_bytes: 0,
            notices: Vec::new(),
            quantization: None,
            parts: Vec::new(),
            fetched: None,
        }
    }
}

/// One part of a parted output in a dry-run plan.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedPart {
    /// File name inside `weights.parquet/`.
    pub file: String,
    /// Rows.
    pub rows: u64,
    /// Row groups.
    pub row_groups: usize,
    /// Source bytes it reads.
    pub source_bytes: u64,
    /// Output `data` bytes before compression.
    pub output_bytes: u64,
    /// Its first and last tensors (a tensor split over parts is in both).
    pub tensors: (String, String),
}

/// One tensor in a dry-run plan.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedEntry {
    /// Output name.
    pub name: String,
    /// Source name, when renamed.
    pub source_name: Option<String>,
    /// Source dtype (safetensors spelling).
    pub source_dtype: String,
    /// Output dtype (torch spelling).
    pub dtype: String,
    /// Dimensions.
    pub shape: Vec<u64>,
    /// Output bytes before compression.
    pub bytes: u64,
    /// Rows it spans.
    pub rows: u64,
    /// For a dequantized pre-quantized weight: the scheme and the stored tensors it
    /// consumes (codes first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dequantized: Option<Dequantization>,
}

/// How one weight of a pre-quantized checkpoint is dequantized (`--dry-run`).
#[derive(Debug, Clone, Serialize)]
pub struct Dequantization {
    /// The scheme, as `config.json` names it (`fp8`, `gptq`, ...).
    pub scheme: String,
    /// The stored dtype of its codes.
    pub stored_dtype: String,
    /// The stored tensors it consumes, codes first.
    pub consumes: Vec<String>,
    /// With `--quantize int8`: `carried` (written from its own codes, scales and zero
    /// points) or `re-quantized: REASON`; none when it is not quantized.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub int8: Option<String>,
}

/// What a conversion would do (`--dry-run`).
#[derive(Debug, Clone, Serialize)]
pub struct ConversionPlan {
    /// The name the user gave.
    pub model_name: String,
    /// Where it resolved to.
    pub resolved_path: PathBuf,
    /// Family.
    pub model_type: String,
    /// Part.
    pub part: String,
    /// How the family was decided.
    pub detected_by: String,
    /// Notices.
    pub notices: Vec<String>,
    /// The pre-quantization scheme of the checkpoint, in one line, when it has one.
    pub source_quantization: Option<String>,
    /// Tensors kept, in row order.
    pub kept: Vec<PlannedEntry>,
    /// Tensors dropped, with the rule that dropped them.
    pub dropped: Vec<(String, String)>,
    /// Renames `(source, output)`.
    pub renamed: Vec<(String, String)>,
    /// Tensors whose dtype the cast policy changes.
    pub cast: usize,
    /// Source bytes read.
    pub source_bytes: u64,
    /// Output `data` bytes before compression.
    pub output_bytes: u64,
    /// Row groups.
    pub row_groups: usize,
    /// The parts of a parted output (`max_file_size`; empty for one file): what each
    /// part index of [`crate::convert_part`] writes.
    pub parts: Vec<PlannedPart>,
    /// Expected file size after compression (zstd on trained f16 weights saves about 8%).
    pub estimated_file_bytes: u64,
}
