//! The top-level conversion: resolve → plan → write → metadata, with the options, the
//! progress observer and the report.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use parquet::file::metadata::KeyValue;
use serde::Serialize;
use serde_json::{json, Value};

use crate::cast::CastStats;
use crate::dtype::TargetDtype;
use crate::error::{Error, Result};
use crate::format::{self, IndexEntry, TensorIndex};
use crate::model::{self, Filters, MetadataInput, ModelFiles, ModelType, Part, Recipe, Selection};
use crate::plan::Plan;
use crate::source::{self, hub, Source};
use crate::write::atomic::{sync_dir, TempPath};
use crate::write::{self, Codec, ProgressSink, WriteOptions};

/// Default row limit: tensors larger than this many MiB are split over rows.
pub const DEFAULT_MAX_ROW_MB: u64 = 512;
/// Default row-group budget in MiB of output bytes.
pub const DEFAULT_ROW_GROUP_MB: u64 = 32;
/// Default zstd level, the seed's.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;
/// Row groups in flight per worker thread.
pub const DEFAULT_INFLIGHT_PER_THREAD: u64 = 2;

/// The tokenizer and preprocessing files copied into `tokenizer/`.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
    "normalizer.json",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.jinja",
];

/// Options of a conversion. [`ConvertConfig::default`] gives the documented defaults;
/// [`ConvertConfig::builder`] changes them one at a time.
#[derive(Debug, Clone)]
pub struct ConvertConfig {
    /// What floating-point tensors become (default f16).
    pub dtype: TargetDtype,
    /// Page compression (default zstd).
    pub compression: Codec,
    /// Zstd level (default [`DEFAULT_ZSTD_LEVEL`]).
    pub level: i32,
    /// Row limit in bytes (default [`DEFAULT_MAX_ROW_MB`] MiB).
    pub max_row_bytes: u64,
    /// Row-group budget in bytes (default [`DEFAULT_ROW_GROUP_MB`] MiB).
    pub row_group_bytes: u64,
    /// Worker threads; 0 means every core (default).
    pub threads: usize,
    /// Row groups encoded at once per worker thread (default
    /// [`DEFAULT_INFLIGHT_PER_THREAD`]); 1 lowers peak memory, 2 keeps the cores busier.
    pub inflight_per_thread: u64,
    /// Let finite values overflow to ±inf instead of failing (default false).
    pub allow_overflow: bool,
    /// Replace an existing conversion in the output directory (default false).
    pub force: bool,
    /// Copy tokenizer files into `tokenizer/` (default true).
    pub extract_tokenizer: bool,
    /// Verify the written file against the source afterwards (default false).
    pub validate: bool,
    /// Cap on a safetensors header (default 100 MB).
    pub max_header_bytes: u64,
    /// Model family (default auto).
    pub model_type: ModelType,
    /// Part of a multi-tower model (default: the family's default).
    pub part: Part,
    /// Include / exclude / rename filters.
    pub filters: Filters,
    /// Hugging Face cache for hub ids (default: from the environment).
    pub hub_cache: Option<PathBuf>,
    /// Set to true to stop the conversion (Ctrl-C); the output is then not written.
    pub cancel: Arc<AtomicBool>,
}

impl Default for ConvertConfig {
    fn default() -> Self {
        ConvertConfig {
            dtype: TargetDtype::F16,
            compression: Codec::Zstd,
            level: DEFAULT_ZSTD_LEVEL,
            max_row_bytes: DEFAULT_MAX_ROW_MB << 20,
            row_group_bytes: DEFAULT_ROW_GROUP_MB << 20,
            threads: 0,
            inflight_per_thread: DEFAULT_INFLIGHT_PER_THREAD,
            allow_overflow: false,
            force: false,
            extract_tokenizer: true,
            validate: false,
            max_header_bytes: source::DEFAULT_MAX_HEADER_BYTES,
            model_type: ModelType::Auto,
            part: Part::Default,
            filters: Filters::default(),
            hub_cache: None,
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// Builds a [`ConvertConfig`].
///
/// # Example
///
/// ```
/// use modelconv::{ConvertConfig, TargetDtype, Codec};
/// let cfg = ConvertConfig::builder().dtype(TargetDtype::Bf16).compression(Codec::Lz4).threads(2).build();
/// assert_eq!(cfg.dtype, TargetDtype::Bf16);
/// ```
#[derive(Debug, Clone, Default)]
pub struct ConvertConfigBuilder(ConvertConfig);

macro_rules! setter {
    ($(#[$m:meta])* $name:ident: $t:ty) => {
        $(#[$m])*
        pub fn $name(mut self, v: $t) -> Self {
            self.0.$name = v;
            self
        }
    };
}

impl ConvertConfigBuilder {
    setter!(/// Target dtype.
        dtype: TargetDtype);
    setter!(/// Compression codec.
        compression: Codec);
    setter!(/// Zstd level.
        level: i32);
    setter!(/// Row limit in bytes.
        max_row_bytes: u64);
    setter!(/// Row-group budget in bytes.
        row_group_bytes: u64);
    setter!(/// Worker threads (0 = all cores).
        threads: usize);
    setter!(/// Row groups in flight per worker thread (at least 1).
        inflight_per_thread: u64);
    setter!(/// Allow overflow to ±inf.
        allow_overflow: bool);
    setter!(/// Replace an existing conversion.
        force: bool);
    setter!(/// Copy tokenizer files.
        extract_tokenizer: bool);
    setter!(/// Verify against the source after writing.
        validate: bool);
    setter!(/// Header cap in bytes.
        max_header_bytes: u64);
    setter!(/// Model family.
        model_type: ModelType);
    setter!(/// Part to convert.
        part: Part);
    setter!(/// Filters.
        filters: Filters);
    setter!(/// Cancellation flag.
        cancel: Arc<AtomicBool>);

    /// Hugging Face cache directory for hub ids.
    pub fn hub_cache(mut self, dir: impl Into<PathBuf>) -> Self {
        self.0.hub_cache = Some(dir.into());
        self
    }

    /// The finished options.
    pub fn build(self) -> ConvertConfig {
        self.0
    }
}

impl ConvertConfig {
    /// A builder starting from the defaults.
    pub fn builder() -> ConvertConfigBuilder {
        ConvertConfigBuilder::default()
    }

    fn threads(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }
    }

    fn as_json(&self) -> Value {
        json!({
            "compression": self.compression.as_str(),
            "compression_level": self.level,
            "use_float16": self.dtype == TargetDtype::F16,
            "dtype": self.dtype.as_str(),
            "extract_tokenizer": self.extract_tokenizer,
            "validate_output": self.validate,
            "allow_overflow": self.allow_overflow,
            "max_row_bytes": self.max_row_bytes,
            "row_group_bytes": self.row_group_bytes,
        })
    }
}

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
        }
    }
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
    /// Expected file size after compression (zstd on trained f16 weights saves about 8%).
    pub estimated_file_bytes: u64,
}

struct Prepared {
    name: String,
    source: Source,
    files: ModelFiles,
    recipe: Recipe,
    selection: Selection,
    plan: Plan,
}

fn resolve_input(input: &Path, config: &ConvertConfig) -> Result<(String, PathBuf)> {
    let name = input.to_string_lossy().into_owned();
    if hub::looks_like_hub_id(&name) {
        let cache = config.hub_cache.clone().unwrap_or_else(hub::cache_dir);
        return Ok((name.clone(), hub::resolve(&name, &cache)?));
    }
    Ok((name, input.to_path_buf()))
}

fn prepare(input: &Path, config: &ConvertConfig) -> Result<Prepared> {
    let (name, path) = resolve_input(input, config)?;
    let source = source::open_source(&path, config.max_header_bytes)?;
    let files = ModelFiles::load(&source.model_dir)?;
    let recipe = model::resolve_recipe(config.model_type, config.part, &files, &source, &name)?;
    let selection = model::select(&source, &recipe, &config.filters)?;
    let plan = Plan::build(
        &source,
        &selection.selected,
        config.dtype,
        config.max_row_bytes,
        config.row_group_bytes,
    )?;
    let mut recipe = recipe;
    if recipe.model_type == ModelType::CausalLm {
        let tie = files
            .config
            .as_ref()
            .and_then(|c| c.get("tie_word_embeddings"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let has_head = plan.tensors.iter().any(|t| t.name == "lm_head.weight");
        if !has_head && tie {
            recipe.tied_head = true;
            recipe
                .notices
                .push("lm_head.weight is tied to model.embed_tokens.weight (tie_word_embeddings) and not stored".into());
        }
    }
    Ok(Prepared {
        name,
        source,
        files,
        recipe,
        selection,
        plan,
    })
}

/// Works out what [`convert`] would do, reading only headers and config files.
///
/// # Errors
///
/// Every input, recipe and filter error [`convert`] would give before writing.
pub fn plan_conversion(input: impl AsRef<Path>, config: &ConvertConfig) -> Result<ConversionPlan> {
    let p = prepare(input.as_ref(), config)?;
    let renamed: std::collections::HashMap<&str, &str> = p
        .selection
        .renamed
        .iter()
        .map(|(a, b)| (b.as_str(), a.as_str()))
        .collect();
    let kept: Vec<PlannedEntry> = p
        .plan
        .tensors
        .iter()
        .map(|t| PlannedEntry {
            name: t.name.clone(),
            source_name: renamed.get(t.name.as_str()).map(|s| s.to_string()),
            source_dtype: t.src.dtype.to_string(),
            dtype: t.dtype.torch_name().to_string(),
            shape: t.src.shape.clone(),
            bytes: t.out_len,
            rows: t.rows,
        })
        .collect();
    let out = p.plan.out_bytes();
    let estimate = match config.compression {
        Codec::None => out,
        _ => out / 100 * 92,
    };
    Ok(ConversionPlan {
        model_name: p.name,
        resolved_path: p.source.input.clone(),
        model_type: p.recipe.model_type.as_str().into(),
        part: p.recipe.part.as_str().into(),
        detected_by: p.recipe.detected_by.clone(),
        notices: p.recipe.notices.clone(),
        cast: p
            .plan
            .tensors
            .iter()
            .filter(|t| t.dtype != t.src.dtype)
            .count(),
        kept,
        dropped: p.selection.dropped,
        renamed: p.selection.renamed,
        source_bytes: p.plan.src_bytes(),
        output_bytes: out,
        row_groups: p.plan.groups.len(),
        estimated_file_bytes: estimate,
    })
}

/// Converts a checkpoint into `output` with the defaults and no progress reports.
///
/// # Errors
///
/// See [`convert_with`].
pub fn convert(
    input: impl AsRef<Path>,
    output: impl AsRef<Path>,
    config: &ConvertConfig,
) -> Result<ConversionReport> {
    convert_with(input, output, config, &Silent)
}

fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    a.dev() == b.dev() && a.ino() == b.ino()
}

/// Refuses output paths that are, or link to, input files.
fn check_outputs(inputs: &[PathBuf], outputs: &[PathBuf]) -> Result<()> {
    let metas: Vec<std::fs::Metadata> = inputs
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .collect();
    for o in outputs {
        if let Ok(m) = std::fs::metadata(o) {
            if metas.iter().any(|i| same_file(i, &m)) {
                return Err(Error::OutputIsInput { path: o.clone() });
            }
        }
    }
    Ok(())
}

struct ObserverSink<'a> {
    observer: &'a dyn Observer,
    total: u64,
}

impl ProgressSink for ObserverSink<'_> {
    fn advanced(&self, done: u64) {
        self.observer.event(&Event::Progress {
            done,
            total: self.total,
        });
    }
}

/// Converts a checkpoint (model directory, `.safetensors` file, shard index, or hub id
/// in the local cache) into `output/weights.parquet`, `metadata.json`, `config.json`
/// and `tokenizer/`, reporting progress to `observer`.
///
/// # Errors
///
/// Every input validation error (before anything is written), `OutputExists` without
/// `force`, `OutputIsInput`, `Overflow` without `allow_overflow`, I/O and Parquet errors
/// naming the file, `Cancelled`. On any error no `weights.parquet` and no temp file is
/// left behind, and an existing conversion is left as it was.
///
/// # Memory
///
/// Bounded by `threads × 2 × row_group_bytes` of output in flight, times the encoder's copies, plus a few copies of the largest row,
/// whatever the model size; see [`crate::write`].
pub fn convert_with(
    input: impl AsRef<Path>,
    output: impl AsRef<Path>,
    config: &ConvertConfig,
    observer: &dyn Observer,
) -> Result<ConversionReport> {
    let started = Instant::now();
    let out_dir = output.as_ref();
    let p = prepare(input.as_ref(), config)?;
    for n in &p.recipe.notices {
        observer.event(&Event::Notice(n));
    }

    // Output directory checks, before anything is written.
    if out_dir.exists() && !out_dir.is_dir() {
        let inputs: Vec<PathBuf> = p.source.shards.iter().map(|s| s.path.clone()).collect();
        check_outputs(&inputs, &[out_dir.to_path_buf()])?;
        return Err(Error::option(format!(
            "{}: the output must be a directory",
            out_dir.display()
        )));
    }
    let weights_path = out_dir.join(format::WEIGHTS_FILE);
    let metadata_path = out_dir.join(format::METADATA_FILE);
    if !config.force {
        for existing in [&weights_path, &metadata_path] {
            if existing.exists() {
                return Err(Error::OutputExists {
                    path: existing.clone(),
                });
            }
        }
    }
    let model_dir = &p.source.model_dir;
    let tokenizer_files: Vec<&str> = if config.extract_tokenizer {
        TOKENIZER_FILES
            .iter()
            .copied()
            .filter(|f| model_dir.join(f).is_file())
            .collect()
    } else {
        Vec::new()
    };
    let mut inputs: Vec<PathBuf> = p.source.shards.iter().map(|s| s.path.clone()).collect();
    inputs.extend(p.source.index.clone());
    inputs.extend(p.files.config_path.clone());
    inputs.extend(tokenizer_files.iter().map(|f| model_dir.join(f)));
    inputs.extend(p.files.st_files.iter().map(|f| model_dir.join(f)));
    let mut outputs = vec![
        weights_path.clone(),
        metadata_path.clone(),
        out_dir.join("config.json"),
    ];
    outputs.extend(
        tokenizer_files
            .iter()
            .map(|f| out_dir.join("tokenizer").join(f)),
    );
    outputs.extend(p.files.st_files.iter().map(|f| out_dir.join(f)));
    check_outputs(&inputs, &outputs)?;
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io("create", out_dir, e))?;

    observer.event(&Event::Planned {
        tensors: p.plan.tensors.len(),
        source_bytes: p.plan.src_bytes(),
    });
    let threads = config.threads();
    let opts = WriteOptions {
        codec: config.compression,
        level: config.level,
        threads,
        allow_overflow: config.allow_overflow,
        inflight_bytes: (threads as u64)
            .saturating_mul(config.inflight_per_thread.max(1))
            .saturating_mul(config.row_group_bytes),
        pool_max_bytes: config.row_group_bytes,
    };
    let tokenizer_path = (!tokenizer_files.is_empty()).then(|| out_dir.join("tokenizer"));
    let converted_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let metadata_slot: Mutex<Option<Value>> = Mutex::new(None);
    let footer = |stats: &[CastStats]| -> Vec<KeyValue> {
        let mut cast_report = serde_json::Map::new();
        for (t, s) in p.plan.tensors.iter().zip(stats) {
            if s.nan + s.inf + s.overflow > 0 {
                cast_report.insert(
                    t.name.clone(),
                    json!({
                        "source_dtype": t.src.dtype.to_string(),
                        "dtype": t.dtype.torch_name(),
                        "nan": s.nan,
                        "inf": s.inf,
                        "overflow": s.overflow,
                        "max_overflow_magnitude": s.max_overflow,
                    }),
                );
            }
        }
        let metadata = model::build_metadata(&MetadataInput {
            model_name: &p.name,
            recipe: &p.recipe,
            files: &p.files,
            tensors: p
                .plan
                .tensors
                .iter()
                .map(|t| {
                    (
                        t.name.as_str(),
                        t.src.shape.as_slice(),
                        t.dtype.torch_name(),
                        t.src.numel,
                    )
                })
                .collect(),
            conversion_config: config.as_json(),
            parquet_path: weights_path.display().to_string(),
            tokenizer_path: tokenizer_path.as_ref().map(|t| t.display().to_string()),
            cast_report: Value::Object(cast_report),
            converted_at,
        });
        let index = TensorIndex {
            tensors: p
                .plan
                .tensors
                .iter()
                .map(|t| IndexEntry {
                    name: t.name.clone(),
                    source: t.src.name.clone(),
                    dtype: t.dtype.torch_name().to_string(),
                    source_dtype: t.src.dtype.to_string(),
                    shape: t.src.shape.clone(),
                    bytes: t.out_len,
                    row: t.first_row,
                    rows: t.rows,
                })
                .collect(),
        };
        let kv = vec![
            KeyValue::new(
                format::KEY_FORMAT.to_string(),
                format::FORMAT_VERSION.to_string(),
            ),
            KeyValue::new(
                format::KEY_CAST.to_string(),
                config.dtype.as_str().to_string(),
            ),
            KeyValue::new(
                format::KEY_CHECKSUM.to_string(),
                format::CHECKSUM_ALGO.to_string(),
            ),
            KeyValue::new(format::KEY_METADATA.to_string(), metadata.to_string()),
            KeyValue::new(
                format::KEY_INDEX.to_string(),
                serde_json::to_string(&index).unwrap_or_default(),
            ),
        ];
        if let Ok(mut slot) = metadata_slot.lock() {
            *slot = Some(metadata);
        }
        kv
    };

    let weights_tmp = TempPath::beside(&weights_path);
    let sink = ObserverSink {
        observer,
        total: p.plan.src_bytes(),
    };
    let summary = write::write_weights(
        &p.source,
        &p.plan,
        &opts,
        &weights_tmp,
        &config.cancel,
        &sink,
        &footer,
    )?;
    let metadata = metadata_slot
        .into_inner()
        .ok()
        .flatten()
        .ok_or_else(|| Error::option("internal: metadata was not built"))?;
    for (t, s) in p.plan.tensors.iter().zip(&summary.stats) {
        if s.overflow > 0 {
            observer.event(&Event::Notice(&format!(
                "tensor `{}`: {} values overflowed to infinity (--allow-overflow)",
                crate::error::sanitize(&t.name),
                s.overflow
            )));
        }
    }

    // Everything else is staged beside its target too, then renamed in one sweep.
    let meta_tmp = TempPath::beside(&metadata_path);
    let text = serde_json::to_string_pretty(&metadata).map_err(|e| Error::option(e.to_string()))?;
    meta_tmp.write_all(text.as_bytes())?;
    let mut staged = Vec::new();
    if let Some(cfg) = &p.files.config_path {
        let t = TempPath::beside(&out_dir.join("config.json"));
        std::fs::copy(cfg, t.path()).map_err(|e| Error::io("copy", cfg, e))?;
        staged.push(t);
    }
    let mut st_dirs = HashSet::new();
    for f in &p.files.st_files {
        let target = out_dir.join(f);
        if let Some(parent) = target.parent() {
            if st_dirs.insert(parent.to_path_buf()) {
                std::fs::create_dir_all(parent).map_err(|e| Error::io("create", parent, e))?;
            }
        }
        let t = TempPath::beside(&target);
        std::fs::copy(model_dir.join(f), t.path())
            .map_err(|e| Error::io("copy", model_dir.join(f), e))?;
        staged.push(t);
    }
    if let Some(tok) = &tokenizer_path {
        let t = TempPath::beside(tok);
        std::fs::create_dir(t.path()).map_err(|e| Error::io("create", t.path(), e))?;
        for f in &tokenizer_files {
            std::fs::copy(model_dir.join(f), t.path().join(f))
                .map_err(|e| Error::io("copy", model_dir.join(f), e))?;
        }
        staged.push(t);
    }
    if config.cancel.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(Error::Cancelled);
    }
    weights_tmp.commit()?;
    for t in staged {
        t.commit()?;
    }
    meta_tmp.commit()?;
    sync_dir(out_dir);

    let mut validation_passed = None;
    if config.validate {
        observer.event(&Event::Validating);
        let report = crate::read::verify(
            &weights_path,
            Some(input.as_ref()),
            &config.verify_options(),
        )?;
        validation_passed = Some(report.passed());
    }

    let src = p.plan.src_bytes();
    let mb = |b: u64| b as f64 / (1u64 << 20) as f64;
    Ok(ConversionReport {
        success: true,
        model_name: p.name.clone(),
        output_dir: out_dir.to_path_buf(),
        parquet_path: Some(weights_path),
        tokenizer_path,
        metadata_path: Some(metadata_path),
        total_parameters: p.plan.total_params(),
        file_size_mb: mb(summary.file_bytes),
        compression_ratio: if summary.file_bytes > 0 {
            src as f64 / summary.file_bytes as f64
        } else {
            0.0
        },
        conversion_time_sec: started.elapsed().as_secs_f64(),
        validation_passed,
        error_message: None,
        metadata,
        tensors: p.plan.tensors.len(),
        source_bytes: src,
        output_bytes: summary.file_bytes,
        notices: p.recipe.notices.clone(),
    })
}

impl ConvertConfig {
    /// The options `verify --source` needs to open the source the same way.
    pub fn verify_options(&self) -> crate::read::VerifyOptions {
        crate::read::VerifyOptions {
            max_header_bytes: self.max_header_bytes,
            hub_cache: self.hub_cache.clone(),
            threads: self.threads,
        }
    }
}

/// Resolves a source for `verify --source`: a path or a hub id.
pub(crate) fn open_for_verify(input: &Path, o: &crate::read::VerifyOptions) -> Result<Source> {
    let cfg = ConvertConfig {
        hub_cache: o.hub_cache.clone(),
        ..ConvertConfig::default()
    };
    let (_, path) = resolve_input(input, &cfg)?;
    source::open_source(&path, o.max_header_bytes)
}
