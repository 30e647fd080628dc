//! The conversion, top to bottom: open the source, plan, check the output, write the
//! weights in three steps, stage and commit the side files, optionally verify, report.
//! Each step is one call into the stage that owns it; this module only sequences them.

mod config;
mod output;
mod parts;
mod report;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use serde_json::{json, Map, Value};

pub use config::{
    parse_size, ConvertConfig, ConvertConfigBuilder, DEFAULT_INFLIGHT_PER_THREAD,
    DEFAULT_MAX_ROW_MB, DEFAULT_ROW_GROUP_MB, DEFAULT_ZSTD_LEVEL, LOW_MEMORY_ROW_MB,
    MAX_BUDGET_BYTES, MIN_FILE_SIZE,
};
pub use parts::{convert_part, prepare_parts, record_parts, PartOutcome, PartStatus};
pub use report::{
    ConversionPlan, ConversionReport, Dequantization, Event, Fetched, Observer, PlannedEntry,
    PlannedPart, QuantReport, Requantized, Silent,
};

use crate::cast::{CastStats, QuantError, TensorQuantError};
use crate::error::{sanitize, Error, Result};
use crate::format;
use crate::model::{self, MetadataInput, ModelFiles, Recipe, Selection};
use crate::plan::{Plan, PlanOptions};
use crate::read::{verify, VerifyOptions};
use crate::source::{self, Source};
use crate::write::dest::{parts_dir, Begin, Begun, Destination, Output};
use crate::write::{ProgressSink, Share, WeightWriter};
use output::OutputLayout;

/// Converts a checkpoint into `output`, with no progress reports.
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

/// Converts a checkpoint (model directory, `.safetensors` file, shard index, hub id in
/// the local cache, or with the `remote` feature a URL: `hf://`, `https://`, `s3://`)
/// into `output/weights.parquet`, `metadata.json`, `config.json` and `tokenizer/`,
/// reporting progress to `observer`. With the `remote` feature `output` may be an S3
/// prefix (`s3://BUCKET/PREFIX/`), written as objects by multipart uploads.
///
/// # Errors
///
/// Every input validation error (before anything is written), `OutputExists` without
/// `force`, `OutputIsInput`, `OutputNotDirectory`, `Overflow` without
/// `allow_overflow`, `SourceChanged`, I/O and Parquet errors naming the file,
/// `Cancelled`. On any error no `weights.parquet` and no temp file is left behind, and
/// an existing conversion is left as it was.
///
/// # Memory
///
/// Bounded by the output bytes in flight (threads × in-flight groups per thread ×
/// row-group budget, or the largest row when it is larger) times about three (cast
/// rows, compressed pages, reused buffers), whatever the model size; see the writer's
/// `# Memory`.
pub fn convert_with(
    input: impl AsRef<Path>,
    output: impl AsRef<Path>,
    config: &ConvertConfig,
    observer: &dyn Observer,
) -> Result<ConversionReport> {
    let started = Instant::now();
    let output = Output::parse(output.as_ref())?;
    let job = Job::prepare(source::open(input, config.source_options())?, config)?;
    let dest = output.open()?;
    let out = OutputLayout::of(&output.root(), &job.source, &job.files, config);
    let mut inputs: Vec<PathBuf> = job.source.files().map(Path::to_path_buf).collect();
    inputs.extend(out.inputs());
    let begun = dest.begin(&Begin {
        force: config.force,
        resume: config.resume,
        validate: config.validate,
        inputs: &inputs,
        side_files: &out.side_names(),
    })?;
    let commit = Commit {
        job: &job,
        out: &out,
        dest: dest.as_ref(),
        config,
        observer,
        begun: &begun,
    };
    let written = if job.plan.parted {
        parts::write_and_commit(&commit)
    } else {
        write_and_commit(&commit)
    };
    drop(begun);
    if written.is_err() {
        // A directory this conversion created is removed again (it is empty by then:
        // the temp file and staged side files are gone).
        dest.abandon();
    }
    let Committed {
        file_bytes,
        metadata,
        quant,
        parts,
    } = written?;

    let validation_passed = match &output {
        Output::Dir(_) if config.validate => {
            observer.event(&Event::Validating);
            let opts = VerifyOptions {
                threads: config.threads,
            };
            Some(verify(out.weights(), Some(&job.source), &opts)?.passed())
        }
        _ => None,
    };
    let outcome = Outcome {
        file_bytes,
        metadata,
        validation_passed,
        quantization: quant,
        parts,
    };
    Ok(job.report(&out, outcome, started))
}

/// What a committed conversion wrote.
struct Committed {
    /// Bytes of the weight file (of every part).
    file_bytes: u64,
    /// The `metadata.json` content.
    metadata: Value,
    /// The quantization report.
    quant: Option<QuantReport>,
    /// The parts of a parted output (empty for one file).
    parts: Vec<PartOutcome>,
}

/// What a conversion commits with: the job, its output's names, the destination made
/// ready, the options and who watches.
struct Commit<'a> {
    job: &'a Job,
    out: &'a OutputLayout,
    dest: &'a dyn Destination,
    config: &'a ConvertConfig,
    observer: &'a dyn Observer,
    begun: &'a Begun,
}

/// Writes the weight file and the side files and commits them, `metadata.json` last.
fn write_and_commit(c: &Commit<'_>) -> Result<Committed> {
    let Commit {
        job,
        out,
        dest,
        config,
        observer,
        begun,
    } = *c;
    job.notify(observer, &begun.stale);
    if !dest.replaces_atomically() {
        // Nothing there is a conversion from here on; a parted output there goes.
        dest.remove(format::METADATA_FILE)?;
        dest.remove(&parts_dir())?;
    }
    let share = Share::new(&job.write_options(config))?;
    let name = format::WEIGHTS_FILE;
    let writer = WeightWriter::create(
        dest.create(name, job.plan.out_bytes())?,
        &dest.locate(name),
        job.write_options(config),
        &share,
    )?;
    let (written, metadata, quant) = write_one(job, writer, out, config, observer)?;
    let staged = out.stage(dest, &metadata, begun.old_metadata.as_deref())?;
    if config.cancel.load(Ordering::Relaxed) {
        return Err(Error::Cancelled);
    }
    staged.commit(dest, Some(written.tmp))?;
    Ok(Committed {
        file_bytes: written.file_bytes,
        metadata,
        quant,
        parts: Vec::new(),
    })
}

/// Writes the whole weight file with `writer` (a temp file or an upload): every row
/// group, then the footer with the metadata. Returns it finished, not yet committed,
/// with `metadata.json`'s content and the quantization report.
///
/// # Errors
///
/// Every error of the writer.
fn write_one(
    job: &Job,
    mut writer: WeightWriter,
    out: &OutputLayout,
    config: &ConvertConfig,
    observer: &dyn Observer,
) -> Result<(crate::write::Written, Value, Option<QuantReport>)> {
    let total = job.plan.src_bytes();
    observer.event(&Event::Planned {
        tensors: job.plan.tensors.len(),
        source_bytes: total,
    });
    let sink = ObserverSink {
        observer,
        total,
        source: &job.source,
    };
    let stats = writer.write(&job.source, &job.plan, &config.cancel, &sink)?;
    job.notice_overflow(&stats.cast, observer);
    let quant = job.quant_report(&stats.quant);
    let metadata = job.metadata(config, out, &stats.cast, quant.as_ref())?;
    let written = writer.finish(format::footer(&job.plan, &metadata))?;
    Ok((written, metadata, quant))
}

/// Works out what [`convert`] would do, reading only headers and config files.
///
/// # Errors
///
/// Every input, recipe and filter error [`convert`] would give before writing.
pub fn plan_conversion(input: impl AsRef<Path>, config: &ConvertConfig) -> Result<ConversionPlan> {
    let job = Job::prepare(source::open(input, config.source_options())?, config)?;
    Ok(job.dry_run(config))
}

/// Seconds since the Unix epoch to record as the conversion time: `SOURCE_DATE_EPOCH`
/// when it is set (reproducible builds' convention, so that the same input and options
/// give the same file), otherwise now.
fn conversion_time() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        })
}

struct ObserverSink<'a> {
    observer: &'a dyn Observer,
    total: u64,
    source: &'a Source,
}

impl ProgressSink for ObserverSink<'_> {
    fn advanced(&self, done: u64) {
        self.observer.event(&Event::Progress {
            done,
            total: self.total,
            fetched: self.source.fetched().map(|f| f.0),
        });
    }
}

/// What writing produced, for the report.
struct Outcome {
    file_bytes: u64,
    metadata: Value,
    validation_passed: Option<bool>,
    quantization: Option<QuantReport>,
    parts: Vec<PartOutcome>,
}

/// An open source with its model knowledge applied: what will be converted, and how.
struct Job {
    source: Source,
    /// Input bytes the source holds in memory (a remote source's range cache), counted
    /// in the writer's budget.
    held: u64,
    files: ModelFiles,
    recipe: Recipe,
    selection: Selection,
    plan: Plan,
}

impl Job {
    fn prepare(source: Source, config: &ConvertConfig) -> Result<Job> {
        source.set_cancel(config.cancel.clone());
        let held = source.size_for(config.threads, config.write_options().inflight_bytes);
        let files = ModelFiles::load(source.model_dir())?;
        let mut recipe = model::resolve_recipe(
            config.model_type,
            config.part,
            &files,
            &source,
            source.name(),
        )?;
        let selection = model::select(&source, &recipe, &config.filters, config.keep_quantized)?;
        let plan = Plan::build(
            &source,
            &selection.selected,
            &PlanOptions {
                target: config.dtype,
                quantize: config.quantize.as_ref(),
                keep_quantized: config.keep_quantized,
                carry: Some(crate::cast::carry),
                lossless: config.lossless,
                max_row_bytes: config.max_row_bytes,
                group_bytes: config.row_group_bytes,
                max_file_size: config.max_file_size,
            },
        )?;
        let has_head = plan.tensors.iter().any(|t| t.name == "lm_head.weight");
        recipe.note_tied_head(&files, has_head);
        recipe
            .notices
            .splice(0..0, source.notices().iter().cloned());
        let mut job = Job {
            source,
            held,
            files,
            recipe,
            selection,
            plan,
        };
        job.notice_prequantized(config);
        for (a, b) in job.ties() {
            job.recipe.notices.push(format!(
                "`{}` shares its storage with `{}` (tied weights): both are stored, the tie is recorded in metadata.json",
                sanitize(&a),
                sanitize(&b)
            ));
        }
        Ok(job)
    }

    /// What the writer needs of `config`, with the input the source holds in memory
    /// counted in its budget: a remote conversion stays within a local one's memory.
    fn write_options(&self, config: &ConvertConfig) -> crate::write::WriteOptions {
        crate::write::WriteOptions {
            held_bytes: self.held,
            ..config.write_options()
        }
    }

    /// What the user should know of a pre-quantized checkpoint: how many weights are
    /// dequantized; with `--keep-quantized`, which stored dtypes the seed's loader
    /// cannot read.
    fn notice_prequantized(&mut self, config: &ConvertConfig) {
        let deq = self
            .plan
            .tensors
            .iter()
            .filter(|t| t.dequant.is_some())
            .count();
        if let Some(s) = self.source.scheme() {
            if deq > 0 {
                self.recipe.notices.push(format!(
                    "pre-quantized checkpoint, {}: {deq} weights dequantized, {} scale and index tensors consumed, {} activation scales dropped",
                    s.summary,
                    self.selection.consumed.len(),
                    s.roles.values().filter(|r| matches!(r, crate::source::Role::Dropped(_))).count(),
                ));
            }
        }
        if config.keep_quantized {
            let mut unreadable: Vec<String> = self
                .plan
                .tensors
                .iter()
                .filter(|t| !t.dtype.seed_loader_reads())
                .map(|t| t.dtype.to_string())
                .collect();
            unreadable.sort();
            unreadable.dedup();
            let packed = self.source.scheme().map_or(0, |s| s.tensors.len());
            if !unreadable.is_empty() || packed > 0 {
                self.recipe.notices.push(format!(
                    "--keep-quantized: tensors are written as stored{}{}; the seed's loader cannot use them (it misreads or cannot map these rows); modelconv's reader and pyarrow read them",
                    if unreadable.is_empty() {
                        String::new()
                    } else {
                        format!(", dtypes {} included", unreadable.join(", "))
                    },
                    if packed > 0 {
                        format!(", {packed} quantized weights as their packed codes and scales")
                    } else {
                        String::new()
                    }
                ));
            }
        }
    }

    /// Tells the observer what the user should know: the recipe's notices, and the temp
    /// files of killed conversions that were removed from the output directory.
    fn notify(&self, observer: &dyn Observer, stale: &[String]) {
        for n in &self.recipe.notices {
            observer.event(&Event::Notice(n));
        }
        for s in stale {
            observer.event(&Event::Notice(&format!(
                "removed `{}`, left by a conversion that no longer runs",
                sanitize(s)
            )));
        }
    }

    /// Source ties between tensors that are both converted, under their output names.
    fn ties(&self) -> Vec<(String, String)> {
        let out: std::collections::HashMap<&str, &str> = self
            .plan
            .tensors
            .iter()
            .map(|t| (t.src.name.as_str(), t.name.as_str()))
            .collect();
        self.source
            .ties()
            .filter_map(|(a, b)| {
                Some((
                    out.get(a.as_str())?.to_string(),
                    out.get(b.as_str())?.to_string(),
                ))
            })
            .collect()
    }

    fn notice_overflow(&self, stats: &[CastStats], observer: &dyn Observer) {
        for (t, s) in self.plan.tensors.iter().zip(stats) {
            if s.overflow > 0 {
                observer.event(&Event::Notice(&format!(
                    "tensor `{}`: {} values overflowed to infinity (overflow allowed)",
                    sanitize(&t.name),
                    s.overflow
                )));
            }
        }
    }

    /// What quantization did, from the per-tensor errors the writer measured.
    fn quant_report(&self, errors: &[QuantError]) -> Option<QuantReport> {
        let q = self.plan.quantize.as_ref()?;
        let mut model = QuantError::default();
        let (mut tensors, mut carried, mut requantized) = (Vec::new(), Vec::new(), Vec::new());
        for (t, e) in self.plan.tensors.iter().zip(errors) {
            let Some(spec) = t.quant else { continue };
            model.merge(e);
            tensors.push(TensorQuantError::new(&t.name, e));
            if spec.carried {
                carried.push(t.name.clone());
            } else if let Some(why) = &t.requantized {
                requantized.push(Requantized {
                    name: t.name.clone(),
                    reason: why.clone(),
                });
            }
        }
        tensors.sort_by(|a, b| a.sqnr_db.total_cmp(&b.sqnr_db));
        Some(QuantReport {
            quant_type: q.kind.as_str().to_string(),
            scheme: q.scheme.as_str().to_string(),
            group_size: q.group_size,
            quantized_tensors: tensors.len(),
            unquantized_tensors: self.plan.tensors.len() - tensors.len(),
            model: TensorQuantError::new("model", &model),
            tensors,
            carried,
            requantized,
        })
    }

    /// `metadata.json`, with the cast counts that matter (NaN, inf, overflow) and the
    /// quantization report.
    ///
    /// # Errors
    ///
    /// `Internal` when the quantization report does not serialise.
    fn metadata(
        &self,
        config: &ConvertConfig,
        out: &OutputLayout,
        stats: &[CastStats],
        quant: Option<&QuantReport>,
    ) -> Result<Value> {
        let mut cast_report = Map::new();
        for (t, s) in self.plan.tensors.iter().zip(stats) {
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
        let tensors = self.plan.tensors.iter();
        let mut metadata = model::build_metadata(&MetadataInput {
            model_name: self.source.name(),
            recipe: &self.recipe,
            files: &self.files,
            tensors: tensors
                .map(|t| {
                    let shape = t.src.shape.as_slice();
                    (t.name.as_str(), shape, t.dtype.torch_name(), t.src.numel)
                })
                .collect(),
            conversion_config: config.as_json(),
            parquet_path: out.weights().display().to_string(),
            tokenizer_path: out.tokenizer_dir().map(|t| t.display().to_string()),
            cast_report: Value::Object(cast_report),
            converted_at: conversion_time(),
            ties: self.ties(),
        });
        if let Some(o) = metadata.as_object_mut() {
            if let Some(s) = self.source.scheme() {
                let dequantized: Vec<Value> = self
                    .plan
                    .tensors
                    .iter()
                    .filter_map(|t| {
                        let d = t.dequant.as_ref()?;
                        Some(json!({
                            "name": t.name,
                            "stored_dtype": d.stored_dtype.to_string(),
                            "consumes": d.consumes,
                        }))
                    })
                    .collect();
                let dropped: Vec<Value> = self
                    .selection
                    .scheme_dropped
                    .iter()
                    .map(|(n, why)| json!({"name": n, "reason": why}))
                    .collect();
                o.insert(
                    "source_quantization".into(),
                    json!({
                        "method": s.method,
                        "summary": s.summary,
                        "config": s.params,
                        "kept_quantized": config.keep_quantized,
                        "dequantized": if config.keep_quantized { Vec::new() } else { dequantized },
                        "dropped": if config.keep_quantized { Vec::new() } else { dropped },
                    }),
                );
            }
            if let Some(q) = quant {
                let q = serde_json::to_value(q)
                    .map_err(|e| Error::internal(format!("the quantization report: {e}")))?;
                o.insert("quantization".into(), q);
            }
            o.insert("files".into(), json!(out.written()));
        }
        Ok(metadata)
    }

    fn report(&self, out: &OutputLayout, outcome: Outcome, started: Instant) -> ConversionReport {
        let Outcome {
            file_bytes,
            metadata,
            validation_passed,
            quantization,
            parts,
        } = outcome;
        let src = self.plan.src_bytes();
        ConversionReport {
            success: true,
            model_name: self.source.name().to_string(),
            output_dir: out.dir().to_path_buf(),
            parquet_path: Some(out.weights().to_path_buf()),
            tokenizer_path: out.tokenizer_dir(),
            metadata_path: Some(out.metadata().to_path_buf()),
            total_parameters: self.plan.total_params(),
            file_size_mb: file_bytes as f64 / (1u64 << 20) as f64,
            compression_ratio: if file_bytes > 0 {
                src as f64 / file_bytes as f64
            } else {
                0.0
            },
            conversion_time_sec: started.elapsed().as_secs_f64(),
            validation_passed,
            error_message: None,
            metadata,
            tensors: self.plan.tensors.len(),
            source_bytes: src,
            output_bytes: file_bytes,
            notices: self.recipe.notices.clone(),
            quantization,
            parts,
            fetched: self
                .source
                .fetched()
                .map(|(bytes, requests)| report::Fetched { bytes, requests }),
        }
    }

    fn dry_run(self, config: &ConvertConfig) -> ConversionPlan {
        let renamed: std::collections::HashMap<&str, &str> = self
            .selection
            .renamed
            .iter()
            .map(|(a, b)| (b.as_str(), a.as_str()))
            .collect();
        let kept: Vec<PlannedEntry> = self
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
                dequantized: t.dequant.as_ref().map(|d| Dequantization {
                    scheme: self
                        .source
                        .scheme()
                        .map_or(String::new(), |s| s.method.clone()),
                    stored_dtype: d.stored_dtype.to_string(),
                    consumes: d.consumes.clone(),
                    int8: t.quant.map(|q| match (q.carried, &t.requantized) {
                        (true, _) => "carried".to_string(),
                        (false, Some(why)) => format!("re-quantized: {why}"),
                        (false, None) => "re-quantized".to_string(),
                    }),
                }),
            })
            .collect();
        let out = self.plan.out_bytes();
        let cast = self.plan.tensors.iter();
        ConversionPlan {
            model_name: self.source.name().to_string(),
            resolved_path: self.source.path().to_path_buf(),
            model_type: self.recipe.model_type.as_str().into(),
            part: self.recipe.part.as_str().into(),
            detected_by: self.recipe.detected_by.clone(),
            notices: self.recipe.notices.clone(),
            source_quantization: self.source.scheme().map(|s| s.summary.clone()),
            cast: cast.filter(|t| t.dtype != t.src.dtype).count(),
            kept,
            dropped: self.selection.dropped,
            renamed: self.selection.renamed,
            source_bytes: self.plan.src_bytes(),
            output_bytes: out,
            row_groups: self.plan.groups.len(),
            parts: if self.plan.parted {
                let n = self.plan.parts.len();
                self.plan
                    .parts
                    .iter()
                    .enumerate()
                    .map(|(k, p)| {
                        let groups = &self.plan.groups[p.groups.clone()];
                        PlannedPart {
                            file: format::part_name(k, n),
                            rows: (p.rows.end - p.rows.start) as u64,
                            row_groups: groups.len(),
                            source_bytes: groups.iter().map(|g| g.src_bytes).sum(),
                            output_bytes: groups.iter().map(|g| g.out_bytes).sum(),
                            tensors: self.plan.part_tensors(k),
                        }
                    })
                    .collect()
            } else {
                Vec::new()
            },
            // zstd on trained f16 weights saves about 8%.
            estimated_file_bytes: match config.codec {
                crate::write::Codec::None => out,
                _ => out / 100 * 92,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_input_a_source_holds_is_handed_to_the_writer_as_part_of_its_budget() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-bert");
        let config = ConvertConfig::builder()
            .threads(2)
            .row_group_bytes(32 << 20)
            .build()
            .expect("options");
        let source = source::open(dir, config.source_options()).expect("open");
        let mut job = Job::prepare(source, &config).expect("prepare");
        // A local source holds nothing; the budget is 2 threads × 2 groups × 32 MiB.
        assert_eq!(job.held, 0);
        let w = job.write_options(&config);
        assert_eq!((w.inflight_bytes, w.held_bytes), (128 << 20, 0));
        // A remote one's range cache (a quarter of that budget) goes with the options.
        job.held = 32 << 20;
        let w = job.write_options(&config);
        assert_eq!((w.inflight_bytes, w.held_bytes), (128 << 20, 32 << 20));
    }
}
