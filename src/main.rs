//! The `modelconv` command: flags → validated options → one library call; the error is
//! rendered once here and picks the exit code.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use modelconv::{
    sanitize, Codec, ConversionReport, ConvertConfig, Error, Event, ExportOptions, Filters,
    ModelType, Observer, Part, TargetDtype, VerifyOptions, WeightFile,
};

/// Page-sized buffers are allocated and freed per Parquet page; mimalloc reuses them
/// where glibc maps fresh zeroed pages each time (measured: sys time 3.6 s → 1.2 s on a
/// 4.4 GB checkpoint).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Convert Hugging Face safetensors checkpoints into Parquet weight files, and read them back.
#[derive(Parser, Debug)]
#[command(name = "modelconv", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
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
struct ConvertArgs {
    /// Model directory, model.safetensors, model.safetensors.index.json, or org/name[@rev] from the local HF cache.
    input: PathBuf,
    /// Output directory (weights.parquet, metadata.json, config.json, tokenizer/).
    #[arg(short, long, required_unless_present = "dry_run")]
    output: Option<PathBuf>,
    /// What floating-point tensors become: f16, bf16, f32 or keep.
    #[arg(long, default_value = "f16")]
    dtype: TargetDtype,
    /// Page compression: zstd, lz4, snappy or none.
    #[arg(long, default_value = "zstd")]
    compression: Codec,
    /// Zstd level.
    #[arg(long, default_value_t = modelconv::DEFAULT_ZSTD_LEVEL)]
    level: i32,
    /// Tensors larger than this many MiB are split over consecutive rows.
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
    /// Print the plan (type, tensors kept and dropped, renames, casts, size) and write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Largest safetensors header accepted, in MiB.
    #[arg(long, default_value_t = 100)]
    max_header_mb: u64,
    /// Hugging Face cache directory for hub ids (default: HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub).
    #[arg(long)]
    hub_cache: Option<PathBuf>,
    #[command(flatten)]
    out: OutputArgs,
}

#[derive(Args, Debug, Clone, Copy)]
struct OutputArgs {
    /// Print JSON on stdout for scripts.
    #[arg(long)]
    json: bool,
    /// No progress bar, no summary.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// weights.parquet or the directory holding it.
    path: PathBuf,
    /// Also list the row groups.
    #[arg(long)]
    row_groups: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct VerifyArgs {
    /// weights.parquet or the directory holding it.
    path: PathBuf,
    /// Compare every value with this source checkpoint (directory, file, index or hub id).
    #[arg(long)]
    source: Option<PathBuf>,
    /// Worker threads (default: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[command(flatten)]
    out: OutputArgs,
}

#[derive(Args, Debug)]
struct ExportArgs {
    /// weights.parquet or the directory holding it.
    path: PathBuf,
    /// The safetensors file to write.
    output: PathBuf,
    /// keep (as stored) or f32 (widen f16/bf16 back); also f16, bf16.
    #[arg(long, default_value = "keep")]
    dtype: TargetDtype,
    /// Replace an existing output file.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    out: OutputArgs,
}

/// Bytes in binary units.
fn human(b: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn human_count(n: u64) -> String {
    match n {
        0..=9_999 => n.to_string(),
        10_000..=999_999 => format!("{:.1} K", n as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.1} M", n as f64 / 1e6),
        _ => format!("{:.2} B", n as f64 / 1e9),
    }
}

struct Bar {
    bar: ProgressBar,
}

impl Observer for Bar {
    fn event(&self, e: &Event) {
        match e {
            Event::Planned { source_bytes, .. } => {
                self.bar.set_length(*source_bytes);
                self.bar.reset_elapsed();
            }
            Event::Progress { done, .. } => self.bar.set_position(*done),
            Event::Notice(n) => self.bar.suspend(|| eprintln!("note: {n}")),
            Event::Validating => self.bar.set_message("validating"),
        }
    }
}

fn progress_bar(out: OutputArgs) -> ProgressBar {
    if out.quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn install_ctrlc(cancel: Arc<AtomicBool>) {
    let hits = AtomicUsize::new(0);
    let _ = ctrlc::set_handler(move || {
        if hits.fetch_add(1, Ordering::SeqCst) == 0 {
            cancel.store(true, Ordering::SeqCst);
        } else {
            modelconv::remove_temp_files();
            std::process::exit(130);
        }
    });
}

fn convert_config(a: &ConvertArgs, cancel: Arc<AtomicBool>) -> anyhow::Result<ConvertConfig> {
    let rename = a
        .rename
        .iter()
        .map(|r| Filters::parse_rename(r))
        .collect::<Result<Vec<_>, _>>()?;
    let mb = |v: u64, what: &str| {
        v.checked_mul(1 << 20)
            .filter(|&b| b > 0)
            .with_context(|| format!("--{what} must be a positive number of MiB"))
    };
    let mut b = ConvertConfig::builder()
        .dtype(a.dtype)
        .compression(a.compression)
        .level(a.level)
        .max_row_bytes(mb(a.max_row_mb, "max-row-mb")?)
        .row_group_bytes(mb(a.row_group_mb, "row-group-mb")?)
        .threads(a.threads)
        .inflight_per_thread(if a.max_row_mb <= LOW_MEMORY_ROW_MB {
            1
        } else {
            modelconv::DEFAULT_INFLIGHT_PER_THREAD
        })
        .allow_overflow(a.allow_overflow)
        .force(a.force)
        .extract_tokenizer(!a.no_tokenizer)
        .validate(a.validate)
        .max_header_bytes(mb(a.max_header_mb, "max-header-mb")?)
        .model_type(a.model_type)
        .part(a.part)
        .filters(Filters {
            include: a.include.clone(),
            exclude: a.exclude.clone(),
            rename,
        })
        .cancel(cancel);
    if let Some(c) = &a.hub_cache {
        b = b.hub_cache(c);
    }
    Ok(b.build())
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// `mi_option_purge_delay` in mimalloc.h (v2 and v3): after `eager_commit_delay` (14).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// At or below this row limit the user has chosen memory over speed.
const LOW_MEMORY_ROW_MB: u64 = 64;

fn run_convert(a: ConvertArgs) -> anyhow::Result<ExitCode> {
    if a.max_row_mb <= LOW_MEMORY_ROW_MB {
        // Low-memory mode (with one row group per thread in flight, see convert_config):
        // return freed pages to the OS at once instead of after 10 ms. Peak RSS on a
        // 13.5 GB bf16 checkpoint with --max-row-mb 64: 396 MiB instead of 657 MiB, for
        // more page faults (sys time about doubles).
        // SAFETY: mi_option_set only stores an option value; any value is valid for
        // purge_delay (0 = purge immediately).
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    }
    let cancel = Arc::new(AtomicBool::new(false));
    install_ctrlc(cancel.clone());
    let config = convert_config(&a, cancel)?;
    if a.dry_run {
        let plan = modelconv::plan_conversion(&a.input, &config)?;
        if a.out.json {
            return print_json(&plan).map(|_| ExitCode::SUCCESS);
        }
        println!("model        {}", sanitize(&plan.model_name));
        println!(
            "resolved to  {}",
            sanitize(&plan.resolved_path.display().to_string())
        );
        println!(
            "type         {} (part {}), from {}",
            plan.model_type,
            plan.part,
            sanitize(&plan.detected_by)
        );
        for n in &plan.notices {
            println!("note         {n}");
        }
        println!("\nkept ({}):", plan.kept.len());
        for k in &plan.kept {
            let from = k
                .source_name
                .as_deref()
                .map(|s| format!("  ← {}", sanitize(s)))
                .unwrap_or_default();
            println!(
                "  {:<60} {:>6} → {:<15} {:?} {}{from}",
                sanitize(&k.name),
                k.source_dtype,
                k.dtype,
                k.shape,
                human(k.bytes)
            );
        }
        println!("\ndropped ({}):", plan.dropped.len());
        for (n, rule) in &plan.dropped {
            println!("  {:<60} {}", sanitize(n), sanitize(rule));
        }
        if !plan.renamed.is_empty() {
            println!("\nrenamed ({}):", plan.renamed.len());
            for (f, t) in &plan.renamed {
                println!("  {} → {}", sanitize(f), sanitize(t));
            }
        }
        println!(
            "\n{} tensors cast; reads {}, writes {} before compression in {} row groups, about {} on disk",
            plan.cast,
            human(plan.source_bytes),
            human(plan.output_bytes),
            plan.row_groups,
            human(plan.estimated_file_bytes)
        );
        return Ok(ExitCode::SUCCESS);
    }
    let output = a.output.clone().context("--output is required")?;
    let bar = Bar {
        bar: progress_bar(a.out),
    };
    let started = std::time::Instant::now();
    let result = modelconv::convert_with(&a.input, &output, &config, &bar);
    bar.bar.finish_and_clear();
    let name = a.input.display().to_string();
    match result {
        Ok(r) => {
            let failed_validation = r.validation_passed == Some(false);
            if a.out.json {
                print_json(&r)?;
            } else if !a.out.quiet {
                print_summary(&r);
            }
            if failed_validation {
                eprintln!("error: validation against the source failed (run `modelconv verify --source` for details)");
                return Ok(ExitCode::from(1));
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if a.out.json {
                print_json(&ConversionReport::failure(
                    &name,
                    &output,
                    &e,
                    started.elapsed().as_secs_f64(),
                ))?;
            }
            Err(e.into())
        }
    }
}

fn print_summary(r: &ConversionReport) {
    eprintln!(
        "converted {} tensors, {} parameters: {} → {} ({:.2}×) in {:.2} s",
        r.tensors,
        human_count(r.total_parameters),
        human(r.source_bytes),
        human(r.output_bytes),
        r.compression_ratio,
        r.conversion_time_sec
    );
    if let Some(p) = &r.parquet_path {
        eprintln!("  weights    {}", p.display());
    }
    if let Some(p) = &r.metadata_path {
        eprintln!("  metadata   {}", p.display());
    }
    if let Some(p) = &r.tokenizer_path {
        eprintln!("  tokenizer  {}", p.display());
    }
    if let Some(v) = r.validation_passed {
        eprintln!(
            "  validation {}",
            if v {
                "passed: every value matches the source"
            } else {
                "FAILED"
            }
        );
    }
}

fn run_inspect(a: InspectArgs) -> anyhow::Result<ExitCode> {
    let wf = WeightFile::open(&a.path)?;
    let md = wf.parquet_metadata();
    let total_params: u64 = wf.tensors().iter().map(|t| t.num_params).sum();
    let total_bytes: u64 = wf.tensors().iter().map(|t| t.bytes).sum();
    let file_bytes = std::fs::metadata(wf.path()).map(|m| m.len()).unwrap_or(0);
    let codec = md
        .row_groups()
        .first()
        .and_then(|rg| {
            rg.columns()
                .iter()
                .find(|c| c.column_path().string() == "data")
        })
        .map(|c| format!("{:?}", c.compression()))
        .unwrap_or_else(|| "-".into());
    let row_groups: Vec<serde_json::Value> = md
        .row_groups()
        .iter()
        .enumerate()
        .map(|(i, rg)| {
            serde_json::json!({
                "index": i,
                "rows": rg.num_rows(),
                "uncompressed_bytes": rg.total_byte_size(),
                "compressed_bytes": rg.compressed_size(),
            })
        })
        .collect();
    if a.json {
        let v = serde_json::json!({
            "path": wf.path(),
            "format_version": wf.key_value(modelconv::format::KEY_FORMAT),
            "cast": wf.key_value(modelconv::format::KEY_CAST),
            "compression": codec,
            "footer_index": wf.has_index(),
            "checksums": wf.has_checksums(),
            "tensors": wf.tensors(),
            "total_tensors": wf.tensors().len(),
            "total_parameters": total_params,
            "total_bytes": total_bytes,
            "file_bytes": file_bytes,
            "row_groups": if a.row_groups { serde_json::Value::from(row_groups) } else { serde_json::Value::Null },
            "metadata": wf.metadata(),
        });
        return print_json(&v).map(|_| ExitCode::SUCCESS);
    }
    let names: Vec<String> = wf.tensors().iter().map(|t| sanitize(&t.name)).collect();
    let w = names
        .iter()
        .map(|n| n.chars().count())
        .max()
        .unwrap_or(4)
        .max(4);
    println!(
        "{:<w$}  {:<16}  {:<20}  {:>12}  {:>10}",
        "name", "dtype", "shape", "params", "bytes"
    );
    for (t, n) in wf.tensors().iter().zip(&names) {
        let shape = format!("{:?}", t.shape);
        let split = if t.rows > 1 {
            format!("  ({} rows)", t.rows)
        } else {
            String::new()
        };
        println!(
            "{n:<w$}  {:<16}  {shape:<20}  {:>12}  {:>10}{split}",
            t.dtype.torch_name(),
            t.num_params,
            human(t.bytes)
        );
    }
    println!(
        "\n{} tensors, {} parameters, {} of data, {} on disk ({}), {} row groups",
        wf.tensors().len(),
        human_count(total_params),
        human(total_bytes),
        human(file_bytes),
        codec,
        md.num_row_groups()
    );
    println!(
        "format {}, cast {}, footer index {}, checksums {}",
        wf.key_value(modelconv::format::KEY_FORMAT)
            .unwrap_or("seed (V1, no modelconv footer)"),
        wf.key_value(modelconv::format::KEY_CAST)
            .unwrap_or("unknown"),
        if wf.has_index() { "yes" } else { "no" },
        if wf.has_checksums() { "yes" } else { "no" }
    );
    if let Some(m) = wf.metadata() {
        let get = |k: &str| {
            m.get(k)
                .map(|v| v.to_string())
                .unwrap_or_else(|| "-".into())
        };
        println!(
            "model {}, type {}, converted {}",
            get("model_name"),
            get("model_type"),
            get("converted_at")
        );
    }
    if a.row_groups {
        println!("\nrow group  rows  uncompressed  compressed");
        for (i, rg) in md.row_groups().iter().enumerate() {
            println!(
                "{i:>9}  {:>4}  {:>12}  {:>10}",
                rg.num_rows(),
                human(rg.total_byte_size().max(0) as u64),
                human(rg.compressed_size().max(0) as u64)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run_verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let opts = VerifyOptions {
        threads: a.threads,
        ..VerifyOptions::default()
    };
    let report = modelconv::verify(&a.path, a.source.as_deref(), &opts)?;
    if a.out.json {
        print_json(&report)?;
    } else if !a.out.quiet {
        for c in report.failures() {
            let mut why = Vec::new();
            if c.checksum_mismatches > 0 {
                why.push(format!(
                    "{} row checksum mismatch(es)",
                    c.checksum_mismatches
                ));
            }
            if c.value_mismatches > 0 {
                why.push(format!(
                    "{} value(s) differ from the source",
                    c.value_mismatches
                ));
            }
            why.extend(c.problems.iter().cloned());
            println!("FAIL `{}`: {}", sanitize(&c.name), why.join("; "));
        }
        for p in &report.problems {
            println!("FAIL {p}");
        }
        if !report.checksums_present {
            println!("note: this file has no checksums (written by another converter); structure checked only");
        }
        let worst = report.checks.iter().fold((0f64, 0f64), |a, c| {
            (a.0.max(c.max_abs_error), a.1.max(c.max_rel_error))
        });
        println!(
            "{}: {} tensors, {} rows{}{}",
            if report.passed() { "ok" } else { "FAILED" },
            report.tensors,
            report.rows,
            if report.checksums_present {
                ", checksums verified"
            } else {
                ""
            },
            if report.compared_with_source {
                format!(", every value equals the cast of the source (max abs error {:.3e}, max rel error {:.3e})", worst.0, worst.1)
            } else {
                String::new()
            }
        );
    }
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn run_export(a: ExportArgs) -> anyhow::Result<ExitCode> {
    let r = modelconv::export(
        &a.path,
        &a.output,
        &ExportOptions {
            dtype: a.dtype,
            force: a.force,
        },
    )?;
    if a.out.json {
        print_json(&r)?;
    } else if !a.out.quiet {
        eprintln!(
            "exported {} tensors to {} ({})",
            r.tensors,
            r.path.display(),
            human(r.bytes)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    // Like other Unix filters: a closed pipe (`modelconv inspect x | head`) ends the
    // process quietly instead of failing every later print.
    // SAFETY: called first thing in main, before any thread exists; SIG_DFL is a valid
    // disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Convert(a) => run_convert(a),
        Command::Inspect(a) => run_inspect(a),
        Command::Verify(a) => run_verify(a),
        Command::Export(a) => run_export(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let cancelled = matches!(e.downcast_ref::<Error>(), Some(Error::Cancelled));
            eprintln!("error: {e:#}");
            if cancelled {
                ExitCode::from(130)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
