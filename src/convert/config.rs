//! The options of a conversion: a builder of raw values whose `build()` checks every one
//! of them once, so the rest of the pipeline can trust a [`ConvertConfig`].

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use parquet::basic::{Compression, ZstdLevel};
use serde_json::{json, Value};

use crate::dtype::TargetDtype;
use crate::error::{Error, Result};
use crate::model::{CompiledFilters, Filters, ModelType, Part};
use crate::plan::{QuantScheme, QuantType, Quantize};
use crate::source::{IoMode, SourceOptions, DEFAULT_MAX_HEADER_BYTES};
use crate::write::{Codec, WriteOptions};

/// Default row limit: tensors larger than this many MiB are split over rows.
pub const DEFAULT_MAX_ROW_MB: u64 = 512;
/// Default row-group budget in MiB of output bytes.
pub const DEFAULT_ROW_GROUP_MB: u64 = 32;
/// Default zstd level, the seed's.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;
/// Row groups in flight per worker thread.
pub const DEFAULT_INFLIGHT_PER_THREAD: u64 = 2;
/// At or below this row limit (in MiB) the user has chosen memory over speed: one row
/// group in flight per thread unless [`ConvertConfigBuilder::inflight_per_thread`] says
/// otherwise.
pub const LOW_MEMORY_ROW_MB: u64 = 64;
pub use crate::plan::{MAX_BUDGET_BYTES, MIN_FILE_SIZE};

/// A size as `--max-file-size` takes it: a number of bytes with an optional unit,
/// decimal like llama.cpp's (`KB`, `MB`, `GB`, `TB`: powers of 1000) or binary (`KiB`,
/// `MiB`, `GiB`, `TiB`), case-insensitive, a fraction allowed (`1.5GB`).
///
/// # Errors
///
/// A message naming the text when it is not such a size or is past 64 bits.
///
/// ```
/// assert_eq!(modelconv::parse_size("5GB"), Ok(5_000_000_000));
/// assert_eq!(modelconv::parse_size("2GiB"), Ok(2 << 30));
/// assert_eq!(modelconv::parse_size("1.5 MB"), Ok(1_500_000));
/// assert!(modelconv::parse_size("5 parsecs").is_err());
/// ```
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = (t[..split].trim(), t[split..].trim().to_ascii_lowercase());
    let mult: u64 = match unit.as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "`{text}` is not a size (a number with KB, MB, GB, TB, KiB, MiB, GiB or TiB)"
            ))
        }
    };
    let bad =
        || format!("`{text}` is not a size (a number with KB, MB, GB, TB, KiB, MiB, GiB or TiB)");
    let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
    if whole.is_empty() && frac.is_empty() {
        return Err(bad());
    }
    let w: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| bad())?
    };
    let mut v = w
        .checked_mul(mult)
        .ok_or_else(|| format!("`{text}` is past 64 bits"))?;
    if !frac.is_empty() {
        let digits = frac.len().min(18) as u32;
        let f: u64 = frac[..digits as usize].parse().map_err(|_| bad())?;
        let part = (f as u128 * mult as u128 / 10u128.pow(digits)) as u64;
        v = v
            .checked_add(part)
            .ok_or_else(|| format!("`{text}` is past 64 bits"))?;
    }
    Ok(v)
}

/// The validated options of a conversion.
///
/// Built only by [`ConvertConfig::builder`] (or [`Default`]), whose `build()` checks
/// every value, so a `ConvertConfig` is always valid: budgets in range, the zstd level
/// accepted, filters and renames compiled, threads resolved.
#[derive(Debug, Clone)]
pub struct ConvertConfig {
    pub(crate) dtype: TargetDtype,
    pub(crate) codec: Codec,
    /// The zstd level (checked by `build` when the codec is zstd).
    pub(crate) level: i32,
    pub(crate) max_row_bytes: u64,
    pub(crate) row_group_bytes: u64,
    /// Resolved: never 0.
    pub(crate) threads: usize,
    pub(crate) inflight_per_thread: u64,
    pub(crate) allow_overflow: bool,
    pub(crate) force: bool,
    pub(crate) extract_tokenizer: bool,
    pub(crate) validate: bool,
    pub(crate) model_type: ModelType,
    pub(crate) part: Part,
    pub(crate) filters: CompiledFilters,
    pub(crate) quantize: Option<Quantize>,
    pub(crate) keep_quantized: bool,
    /// `--lossless`: quantization adds no error (see [`ConvertConfigBuilder::lossless`]).
    pub(crate) lossless: bool,
    /// Split the output into parts of at most this many bytes (`--max-file-size`).
    pub(crate) max_file_size: Option<u64>,
    /// Keep the complete parts of an interrupted conversion (`--resume`).
    pub(crate) resume: bool,
    pub(crate) source: SourceOptions,
    pub(crate) cancel: Arc<AtomicBool>,
}

impl Default for ConvertConfig {
    fn default() -> Self {
        ConvertConfig {
            dtype: TargetDtype::F16,
            codec: Codec::Zstd,
            level: DEFAULT_ZSTD_LEVEL,
            max_row_bytes: DEFAULT_MAX_ROW_MB << 20,
            row_group_bytes: DEFAULT_ROW_GROUP_MB << 20,
            threads: all_cores(),
            inflight_per_thread: DEFAULT_INFLIGHT_PER_THREAD,
            allow_overflow: false,
            force: false,
            extract_tokenizer: true,
            validate: false,
            model_type: ModelType::Auto,
            part: Part::Default,
            filters: CompiledFilters::default(),
            quantize: None,
            keep_quantized: false,
            lossless: false,
            max_file_size: None,
            resume: false,
            source: SourceOptions::default(),
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }
}

fn all_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl ConvertConfig {
    /// A builder starting from the defaults.
    pub fn builder() -> ConvertConfigBuilder {
        ConvertConfigBuilder::default()
    }

    /// What floating-point tensors become.
    pub fn dtype(&self) -> TargetDtype {
        self.dtype
    }

    /// Page compression.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// Worker threads (resolved: the number of cores when 0 was asked for).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The largest part size of a parted output, if the output is split.
    pub fn max_file_size(&self) -> Option<u64> {
        self.max_file_size
    }

    /// True when an interrupted parted conversion is resumed.
    pub fn resume(&self) -> bool {
        self.resume
    }

    /// True when a pre-quantized checkpoint's tensors are written as stored
    /// (`--keep-quantized`) instead of dequantized.
    pub fn keep_quantized(&self) -> bool {
        self.keep_quantized
    }

    /// The row limit in bytes.
    pub fn max_row_bytes(&self) -> u64 {
        self.max_row_bytes
    }

    /// True when the options ask for memory over speed (a row limit of
    /// [`LOW_MEMORY_ROW_MB`] or less): the binary then also returns freed memory to the
    /// system at once.
    pub fn low_memory(&self) -> bool {
        self.max_row_bytes <= LOW_MEMORY_ROW_MB << 20
    }

    /// The flag that stops the conversion when set (Ctrl-C): the output is then not
    /// written and the call returns [`Error::Cancelled`].
    pub fn cancel_flag(&self) -> &Arc<AtomicBool> {
        &self.cancel
    }

    /// How `source` checkpoints are opened (header cap, hub cache).
    pub fn source_options(&self) -> &SourceOptions {
        &self.source
    }

    /// The Parquet codec, level included.
    fn compression(&self) -> Compression {
        match self.codec {
            // `build` refused levels the codec does not accept.
            Codec::Zstd => Compression::ZSTD(ZstdLevel::try_new(self.level).unwrap_or_default()),
            Codec::Lz4 => Compression::LZ4_RAW,
            Codec::Snappy => Compression::SNAPPY,
            Codec::None => Compression::UNCOMPRESSED,
        }
    }

    /// A row group's cast buffer (its rows and their page leads) or its compressed
    /// pages, at most.
    fn pool_buffer_bytes(&self) -> u64 {
        self.row_group_bytes + self.row_group_bytes / 64 + (2 << 20)
    }

    /// Buffers the writer's pool keeps: the chunk buffers of the groups in flight, a
    /// cast buffer per thread, a spare.
    fn pool_keep(&self) -> usize {
        (self.threads as u64)
            .saturating_mul(self.inflight_per_thread + 1)
            .saturating_add(1)
            .min(64) as usize
    }

    /// What the writer needs of these options.
    pub(crate) fn write_options(&self) -> WriteOptions {
        WriteOptions {
            compression: self.compression(),
            threads: self.threads,
            allow_overflow: self.allow_overflow,
            inflight_bytes: (self.threads as u64)
                .saturating_mul(self.inflight_per_thread)
                .saturating_mul(self.row_group_bytes),
            held_bytes: 0,
            // Also a row of up to two row groups (a small model's MLP rows): kept, the
            // next layer's rows reuse it instead of fragmenting the allocator with fresh
            // ones; in low-memory mode row-group-sized buffers only.
            pool_max_bytes: if self.low_memory() {
                self.pool_buffer_bytes()
            } else {
                2 * self.pool_buffer_bytes()
            },
            pool_keep: self.pool_keep(),
            // As many row-group-sized buffers: larger ones count for more.
            pool_total_bytes: (self.pool_keep() as u64).saturating_mul(self.pool_buffer_bytes()),
            quantized: self.quantize.is_some(),
            lean: self.inflight_per_thread <= 1,
            content_hash: self.max_file_size.is_some(),
        }
    }

    /// The options as `metadata.json` records them (the seed's names first).
    pub(crate) fn as_json(&self) -> Value {
        let mut v = json!({
            "compression": self.codec.as_str(),
            "compression_level": self.level,
            "use_float16": self.dtype == TargetDtype::F16,
            "dtype": self.dtype.as_str(),
            "extract_tokenizer": self.extract_tokenizer,
            "validate_output": self.validate,
            "allow_overflow": self.allow_overflow,
            "max_row_bytes": self.max_row_bytes,
            "row_group_bytes": self.row_group_bytes,
            "keep_quantized": self.keep_quantized,
        });
        if let (Some(m), Some(o)) = (self.max_file_size, v.as_object_mut()) {
            o.insert("max_file_size".into(), json!(m));
        }
        if let (Some(q), Some(o)) = (&self.quantize, v.as_object_mut()) {
            o.insert(
                "quantization".into(),
                json!({
                    "bits": q.kind.bits(),
                    "quant_type": q.kind.as_str(),
                    "scheme": q.scheme.as_str(),
                    "group_size": q.group_size,
                    "skip": q.skip,
                    "min_elements": crate::plan::MIN_QUANT_ELEMENTS,
                }),
            );
            if self.lossless {
                o.insert("lossless".into(), json!(true));
            }
        }
        v
    }
}

/// Builds a [`ConvertConfig`]; defaults are the `DEFAULT_*` constants.
///
/// # Example
///
/// ```
/// use modelconv::{Codec, ConvertConfig, TargetDtype};
/// let cfg = ConvertConfig::builder()
///     .dtype(TargetDtype::Bf16)
///     .compression(Codec::Lz4)
///     .threads(2)
///     .build()?;
/// assert_eq!(cfg.dtype(), TargetDtype::Bf16);
/// assert!(ConvertConfig::builder().level(99).build().is_err());
/// # Ok::<(), modelconv::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ConvertConfigBuilder {
    dtype: TargetDtype,
    codec: Codec,
    level: i32,
    max_row_bytes: u64,
    row_group_bytes: u64,
    threads: usize,
    inflight_per_thread: Option<u64>,
    allow_overflow: bool,
    force: bool,
    extract_tokenizer: bool,
    validate: bool,
    max_header_bytes: u64,
    model_type: ModelType,
    part: Part,
    filters: Filters,
    quantize: Option<Quantize>,
    keep_quantized: bool,
    lossless: bool,
    max_file_size: Option<u64>,
    resume: bool,
    hub_cache: Option<PathBuf>,
    io: IoMode,
    token_file: Option<PathBuf>,
    cancel: Arc<AtomicBool>,
}

impl Default for ConvertConfigBuilder {
    fn default() -> Self {
        ConvertConfigBuilder {
            dtype: TargetDtype::F16,
            codec: Codec::Zstd,
            level: DEFAULT_ZSTD_LEVEL,
            max_row_bytes: DEFAULT_MAX_ROW_MB << 20,
            row_group_bytes: DEFAULT_ROW_GROUP_MB << 20,
            threads: 0,
            inflight_per_thread: None,
            allow_overflow: false,
            force: false,
            extract_tokenizer: true,
            validate: false,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            model_type: ModelType::Auto,
            part: Part::Default,
            filters: Filters::default(),
            quantize: None,
            keep_quantized: false,
            lossless: false,
            max_file_size: None,
            resume: false,
            hub_cache: None,
            io: IoMode::Auto,
            token_file: None,
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }
}

macro_rules! setter {
    ($(#[$m:meta])* $name:ident: $t:ty) => {
        $(#[$m])*
        pub fn $name(mut self, v: $t) -> Self {
            self.$name = v;
            self
        }
    };
}

impl ConvertConfigBuilder {
    setter!(/// What f32, f64, bf16 and f16 tensors become (default f16).
        dtype: TargetDtype);
    setter!(/// Zstd level (default [`DEFAULT_ZSTD_LEVEL`]; checked by `build`).
        level: i32);
    setter!(/// Row limit in bytes (default [`DEFAULT_MAX_ROW_MB`] MiB, at most
        /// [`MAX_BUDGET_BYTES`]); larger tensors are split over consecutive rows.
        max_row_bytes: u64);
    setter!(/// Row-group budget in output bytes (default [`DEFAULT_ROW_GROUP_MB`] MiB,
        /// at most [`MAX_BUDGET_BYTES`]).
        row_group_bytes: u64);
    setter!(/// Worker threads; 0 (default) means every core.
        threads: usize);
    setter!(/// Let finite values overflow to ±inf instead of failing (default false).
        allow_overflow: bool);
    setter!(/// Replace an existing conversion in the output directory (default false).
        force: bool);
    setter!(/// Copy tokenizer files into `tokenizer/` (default true).
        extract_tokenizer: bool);
    setter!(/// Verify the written file against the source afterwards (default false).
        validate: bool);
    setter!(/// Cap on a safetensors header in bytes (default
        /// [`DEFAULT_MAX_HEADER_BYTES`], safetensors' own 100 MB).
        max_header_bytes: u64);
    setter!(/// Model family (default auto).
        model_type: ModelType);
    setter!(/// Part of a multi-tower model (default: the family's default).
        part: Part);
    setter!(/// How shard data is read: mapped, positioned reads, or chosen per file
        /// system (default auto).
        io: IoMode);
    setter!(/// int8 quantization into the seed's V2 schema (default none: V1 output).
        quantize: Option<Quantize>);
    setter!(/// Write a pre-quantized checkpoint's tensors (FP8 codes, packed ints,
        /// scales) as they are stored instead of dequantizing them (default false).
        /// The seed's loader cannot read such rows; modelconv's reader and pyarrow can.
        keep_quantized: bool);
    setter!(/// With `quantize`: add no quantization error (default false). A
        /// pre-quantized weight whose integer codes V2 holds is carried as it is
        /// anyway; under `lossless` one that cannot be (act-order GPTQ, FP8, MXFP4) is
        /// an error naming it and why, with nothing written, and tensors that are not
        /// pre-quantized codes (embeddings, norms, a float `lm_head`) stay float rows.
        lossless: bool);
    setter!(/// Include / exclude / rename filters (compiled by `build`).
        filters: Filters);
    setter!(/// Write `weights.parquet` as a directory of part files of at most this
        /// many bytes each, whole row groups, a tensor split over parts only when it
        /// alone is larger (default none: one file). At least [`MIN_FILE_SIZE`].
        max_file_size: Option<u64>);
    setter!(/// Resume an interrupted parted conversion into the same output: keep every
        /// complete part of the same plan that passes its checks, convert the rest
        /// (default false).
        resume: bool);
    setter!(/// A file holding the Hugging Face token for `hf://` inputs (default:
        /// `HF_TOKEN`, else the token file `huggingface_hub` writes). The token is sent
        /// to the Hub only, and never shown or written.
        token_file: Option<PathBuf>);
    setter!(/// The cancellation flag (default: a fresh one; see
        /// [`ConvertConfig::cancel_flag`]).
        cancel: Arc<AtomicBool>);

    /// Page compression (default zstd).
    pub fn compression(mut self, v: Codec) -> Self {
        self.codec = v;
        self
    }

    /// Row groups encoded at once per worker thread (default
    /// [`DEFAULT_INFLIGHT_PER_THREAD`], or 1 at a row limit of [`LOW_MEMORY_ROW_MB`] MiB
    /// or less); 1 lowers peak memory, 2 keeps the cores busier.
    pub fn inflight_per_thread(mut self, v: u64) -> Self {
        self.inflight_per_thread = Some(v);
        self
    }

    /// Hugging Face cache directory for hub ids (default: from the environment).
    pub fn hub_cache(mut self, dir: impl Into<PathBuf>) -> Self {
        self.hub_cache = Some(dir.into());
        self
    }

    /// The quantization options V2 can record: a group size that fits its int32
    /// column, and `lossless` only with `quantize`.
    fn check_quantize(&self) -> Result<()> {
        if let Some(q) = &self.quantize {
            check_quantize(q)?;
        }
        if self.lossless && self.quantize.is_none() {
            return Err(Error::option(
                "--lossless applies to --quantize int8 or int2 (without it nothing is quantized)",
            ));
        }
        Ok(())
    }

    /// Checks every option and returns the finished configuration.
    ///
    /// # Errors
    ///
    /// `InvalidOption` for a budget out of range, a zstd level the codec refuses, an
    /// in-flight count of 0, a header cap of 0, or a rename whose pattern is not a
    /// regex.
    pub fn build(self) -> Result<ConvertConfig> {
        let budget = |v: u64, what: &str| {
            if v == 0 || v > MAX_BUDGET_BYTES {
                Err(Error::option(format!(
                    "the {what} must be between 1 byte and {} MiB, not {v} bytes",
                    MAX_BUDGET_BYTES >> 20
                )))
            } else {
                Ok(v)
            }
        };
        let mut max_row_bytes = budget(self.max_row_bytes, "row limit")?;
        let row_group_bytes = budget(self.row_group_bytes, "row-group budget")?;
        if let Some(m) = self.max_file_size {
            if m < MIN_FILE_SIZE {
                return Err(Error::option(format!(
                    "the largest part size must be at least {MIN_FILE_SIZE} bytes (1MB), not {m}"
                )));
            }
            // A row never straddles two parts: rows fit a part's data.
            max_row_bytes = max_row_bytes.min(crate::plan::part_data_bytes(m));
        }
        if self.resume && self.max_file_size.is_none() {
            return Err(Error::option(
                "--resume keeps the complete parts of a parted conversion: give the same --max-file-size",
            ));
        }
        if self.resume && self.force {
            return Err(Error::option(
                "--resume keeps what an interrupted conversion wrote and --force replaces it: give one of them",
            ));
        }
        if self.codec == Codec::Zstd && ZstdLevel::try_new(self.level).is_err() {
            let (lo, hi) = ZSTD_LEVELS;
            return Err(Error::option(format!(
                "zstd level {} is out of range ({lo} to {hi})",
                self.level
            )));
        }
        let low_memory = max_row_bytes <= LOW_MEMORY_ROW_MB << 20;
        let inflight_per_thread = match self.inflight_per_thread {
            Some(0) => {
                return Err(Error::option(
                    "row groups in flight per thread must be at least 1",
                ))
            }
            Some(n) => n,
            None if low_memory => 1,
            None => DEFAULT_INFLIGHT_PER_THREAD,
        };
        self.check_quantize()?;
        if self.max_header_bytes == 0 {
            return Err(Error::option("the header cap must be at least 1 byte"));
        }
        Ok(ConvertConfig {
            dtype: self.dtype,
            codec: self.codec,
            level: self.level,
            max_row_bytes,
            row_group_bytes,
            threads: if self.threads == 0 {
                all_cores()
            } else {
                self.threads
            },
            inflight_per_thread,
            allow_overflow: self.allow_overflow,
            force: self.force,
            extract_tokenizer: self.extract_tokenizer,
            validate: self.validate,
            model_type: self.model_type,
            part: self.part,
            filters: self.filters.compile()?,
            quantize: self.quantize,
            keep_quantized: self.keep_quantized,
            lossless: self.lossless,
            max_file_size: self.max_file_size,
            resume: self.resume,
            source: SourceOptions {
                max_header_bytes: self.max_header_bytes,
                hub_cache: self.hub_cache,
                io: self.io,
                keep_quantized: self.keep_quantized,
                token_file: self.token_file,
            },
            cancel: self.cancel,
        })
    }
}

/// The zstd levels the codec accepts (negative levels are zstd's fast modes).
const ZSTD_LEVELS: (i32, i32) = (-131_072, 22);

/// Refuses quantization options the V2 schema (or int2) cannot express.
fn check_quantize(q: &Quantize) -> Result<()> {
    if q.group_size > i32::MAX as u64 {
        return Err(Error::option(format!(
            "group size {} does not fit the V2 schema's int32 `group_size`",
            q.group_size
        )));
    }
    if q.kind == QuantType::Int2 && q.scheme == QuantScheme::Symmetric {
        return Err(Error::option(
            "int2 quantization is asymmetric only (scale = (max - min) / 3, an integer zero \
             point): with zero point 0 one of its four codes [-2, 1] would go unused",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_and_the_built_default_compress_alike() {
        let want = Compression::ZSTD(ZstdLevel::try_new(DEFAULT_ZSTD_LEVEL).unwrap());
        assert_eq!(ConvertConfig::default().compression(), want);
        assert_eq!(
            ConvertConfig::builder().build().unwrap().compression(),
            want
        );
    }

    #[test]
    fn zstd_level_range_is_the_codecs() {
        let (lo, hi) = ZSTD_LEVELS;
        for ok in [lo, -1, 1, 3, hi] {
            assert!(ZstdLevel::try_new(ok).is_ok(), "{ok}");
        }
        for bad in [lo - 1, hi + 1] {
            assert!(ZstdLevel::try_new(bad).is_err(), "{bad}");
        }
        assert_eq!(
            ConvertConfig::builder()
                .level(99)
                .build()
                .unwrap_err()
                .to_string(),
            "zstd level 99 is out of range (-131072 to 22)"
        );
    }
}
