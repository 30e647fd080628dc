//! The command line: clap's raw arguments, and their translation into the library's
//! validated options (no I/O here).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use modelconv::{
    Codec, ConvertConfig, ExportOptions, Filters, IoMode, ModelType, Part, QuantScheme, QuantType,
    Quantize, SourceOptions, TargetDtype,
};

/// Convert Hugging Face safetensors checkpoints into Parquet weight files, and read them back.
#[derive(Parser, Debug)]
#[command(name = "modelconv", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Convert a model directory, .safetensors file, shard index or cached hub id.
    Convert(ConvertArgs),
    /// List the tensors, totals and metadata of a weight file.
    Inspect(InspectArgs),
    /// Check a weight file's structure and checksums, and optionally every value against its source.
    Verify(VerifyArgs),
    /// Write a weight file back to safetensors.
    Export(ExportArgs),
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Model directory, model.safetensors, model.safetensors.index.json, org/name[@rev] from the local HF cache, or a URL: hf://org/name[@rev], https://…, s3://bucket/prefix/.
    pub input: PathBuf,
    /// Output directory (weights.parquet, metadata.json, config.json, tokenizer/), or s3://BUCKET/PREFIX/ (written as objects, by multipart uploads).
    #[arg(short, long, required_unless_present = "dry_run")]
    pub output: Option<PathBuf>,
    /// What floating-point tensors become: f16, bf16, f32 or keep.
    #[arg(long, default_value = "f16")]
    dtype: TargetDtype,
    /// Page compression: zstd, lz4, snappy or none.
    #[arg(long, default_value = "zstd")]
    compression: Codec,
    /// Zstd level.
    #[arg(long, default_value_t = modelconv::DEFAULT_ZSTD_LEVEL, allow_negative_numbers = true)]
    level: i32,
    /// Tensors larger than this many MiB are split over consecutive rows; 64 or less selects low-memory mode.
    #[arg(long, default_value_t = modelconv::DEFAULT_MAX_ROW_MB)]
    max_row_mb: u64,
    /// Row-group budget in MiB of output bytes.
    #[arg(long, default_value_t = modelconv::DEFAULT_ROW_GROUP_MB)]
    row_group_mb: u64,
    /// Worker threads (default: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Let finite values beyond the target's range become ±inf instead of failing.
    #[arg(long)]
    allow_overflow: bool,
    /// Write a pre-quantized checkpoint's tensors (FP8 codes, packed ints, scales) as
    /// they are stored instead of dequantizing them. The seed's loader cannot read
    /// those rows; modelconv's reader and pyarrow can.
    #[arg(long)]
    keep_quantized: bool,
    /// Write weights.parquet as a directory of part files of at most this size each
    /// (5GB, 2GiB; decimal units like llama.cpp's), whole row groups, a tensor split
    /// over parts only when it alone is larger. Default: one file.
    #[arg(long, value_parser = modelconv::parse_size, value_name = "SIZE")]
    max_file_size: Option<u64>,
    /// Finish an interrupted parted conversion into the same output: keep every
    /// complete part of the same input, options and version that passes its checks,
    /// convert the rest.
    #[arg(long)]
    resume: bool,
    /// Replace an existing conversion in the output directory.
    #[arg(long)]
    force: bool,
    /// Do not copy tokenizer files.
    #[arg(long)]
    no_tokenizer: bool,
    /// After converting, verify every value against the source.
    #[arg(long)]
    validate: bool,
    /// Model family: auto, bert, sentence-transformers, transformers, clip, whisper or causallm.
    #[arg(long, default_value = "auto")]
    model_type: ModelType,
    /// Part of a multi-tower model: vision, text, encoder, decoder or all (default: the family's).
    #[arg(long, default_value = "default")]
    part: Part,
    /// Keep only tensors matching this glob (repeatable; after the model recipe).
    #[arg(long, value_name = "GLOB")]
    include: Vec<String>,
    /// Drop tensors matching this glob (repeatable).
    #[arg(long, value_name = "GLOB")]
    exclude: Vec<String>,
    /// Rename tensors: FROM is a regex, TO its replacement (repeatable).
    #[arg(long, value_name = "FROM=TO")]
    rename: Vec<String>,
    /// Quantize weight matrices into the seed's V2 schema: int8, or int2 (four codes a byte).
    #[arg(long, value_name = "int8|int2")]
    quantize: Option<QuantType>,
    /// Quantize per group of G elements of the flattened tensor; 0 is per channel along
    /// axis 0 (default: 0 for int8, 128 for int2).
    #[arg(long, value_name = "G")]
    group_size: Option<u64>,
    /// symmetric (scale = max|x|/127) or asymmetric (256 levels over [min, max], integer
    /// zero point); int2 is asymmetric only (default: symmetric for int8).
    #[arg(long)]
    quant_scheme: Option<QuantScheme>,
    /// Never quantize tensors matching this glob (repeatable).
    #[arg(long, value_name = "GLOB")]
    quantize_skip: Vec<String>,
    /// With --quantize: add no quantization error. Pre-quantized weights are carried
    /// as their own codes; one that cannot be (act-order GPTQ, FP8, MXFP4) is an
    /// error naming it, nothing written; tensors that are not pre-quantized stay float.
    #[arg(long)]
    lossless: bool,
    /// Print the plan (type, tensors kept and dropped, renames, casts, size) and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// How a source checkpoint is opened.
#[derive(Args, Debug)]
pub struct SourceArgs {
    /// Largest safetensors header accepted, in MB (10^6 bytes, like safetensors' own cap).
    #[arg(long, default_value_t = modelconv::DEFAULT_MAX_HEADER_BYTES / MB)]
    max_header_mb: u64,
    /// Hugging Face cache directory for hub ids (default: HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub).
    #[arg(long)]
    hub_cache: Option<PathBuf>,
    /// How shard data is read: mmap, read (positioned reads, for network file systems) or auto.
    #[arg(long, default_value = "auto")]
    io: IoMode,
    /// A file holding the Hugging Face token for hf:// inputs (default: HF_TOKEN, else ~/.cache/huggingface/token).
    #[arg(long)]
    token_file: Option<PathBuf>,
}

#[derive(Args, Debug, Clone, Copy)]
pub struct OutputArgs {
    /// Print JSON on stdout for scripts.
    #[arg(long)]
    pub json: bool,
    /// No progress bar, no summary.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// weights.parquet or the directory holding it; or a checkpoint (model directory,
    /// .safetensors, shard index, .bin), shown as a conversion reads it.
    pub path: PathBuf,
    /// Also list the row groups.
    #[arg(long)]
    pub row_groups: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// weights.parquet or the directory holding it.
    pub path: PathBuf,
    /// Compare every value with this source checkpoint (directory, file, index or hub id).
    #[arg(long)]
    pub source: Option<PathBuf>,
    /// Worker threads (default: all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[command(flatten)]
    pub open: SourceArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// weights.parquet or the directory holding it.
    pub path: PathBuf,
    /// The safetensors file to write.
    pub output: PathBuf,
    /// keep (as stored) or f32 (widen f16/bf16 back); also f16, bf16.
    #[arg(long, default_value = "keep")]
    dtype: TargetDtype,
    /// Replace an existing output file.
    #[arg(long)]
    force: bool,
    /// Record `exported_by: modelconv <version>` in the header's __metadata__.
    #[arg(long)]
    stamp: bool,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// Decimal megabytes: header caps are counted like safetensors counts them.
const MB: u64 = 1_000_000;

/// A value in MiB as bytes (0 and overflow are left for the library to refuse).
fn mib(v: u64) -> u64 {
    v.saturating_mul(1 << 20)
}

impl SourceArgs {
    pub fn options(&self) -> SourceOptions {
        SourceOptions {
            max_header_bytes: self.max_header_mb.saturating_mul(MB),
            hub_cache: self.hub_cache.clone(),
            io: self.io,
            keep_quantized: false,
            token_file: self.token_file.clone(),
        }
    }
}

impl ConvertArgs {
    /// The validated library options.
    ///
    /// # Errors
    ///
    /// The library's `InvalidOption` for anything out of range.
    pub fn config(&self, cancel: Arc<AtomicBool>) -> modelconv::Result<ConvertConfig> {
        let rename = self
            .rename
            .iter()
            .map(|r| Filters::parse_rename(r))
            .collect::<modelconv::Result<Vec<_>>>()?;
        let source = self.source.options();
        let mut b = ConvertConfig::builder()
            .dtype(self.dtype)
            .compression(self.compression)
            .level(self.level)
            .max_row_bytes(mib(self.max_row_mb))
            .row_group_bytes(mib(self.row_group_mb))
            .threads(self.threads)
            .allow_overflow(self.allow_overflow)
            .keep_quantized(self.keep_quantized)
            .lossless(self.lossless)
            .max_file_size(self.max_file_size)
            .resume(self.resume)
            .force(self.force)
            .extract_tokenizer(!self.no_tokenizer)
            .validate(self.validate)
            .max_header_bytes(source.max_header_bytes)
            .quantize(self.quantize.map(|kind| Quantize {
                kind,
                scheme: self.quant_scheme.unwrap_or(kind.default_scheme()),
                group_size: self.group_size.unwrap_or(kind.default_group_size()),
                skip: self.quantize_skip.clone(),
            }))
            .io(source.io)
            .token_file(source.token_file)
            .model_type(self.model_type)
            .part(self.part)
            .filters(Filters {
                include: self.include.clone(),
                exclude: self.exclude.clone(),
                rename,
            })
            .cancel(cancel);
        if let Some(c) = source.hub_cache {
            b = b.hub_cache(c);
        }
        b.build()
    }
}

impl ExportArgs {
    pub fn options(&self) -> ExportOptions {
        ExportOptions {
            dtype: self.dtype,
            force: self.force,
            stamp: self.stamp,
        }
    }
}
