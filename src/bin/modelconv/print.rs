//! Everything the binary prints: the progress bar, and the library's reports as text.
//! Names read from files go through `sanitize` before they reach a terminal.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{HumanBytes, HumanCount, ProgressBar, ProgressDrawTarget, ProgressStyle};
use modelconv::{
    sanitize, ConversionPlan, ConversionReport, Event, ExportReport, InspectReport, Observer,
    VerifyReport,
};

use crate::args::OutputArgs;

/// The progress bar, as the conversion's observer.
pub struct Bar(pub ProgressBar);

impl Bar {
    /// A bar on stderr when it is a terminal and `--quiet` is not given.
    pub fn new(out: OutputArgs) -> Bar {
        if out.quiet || !std::io::stderr().is_terminal() {
            return Bar(ProgressBar::hidden());
        }
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(200));
        Bar(bar)
    }
}

impl Observer for Bar {
    fn event(&self, e: &Event) {
        match e {
            Event::Planned { source_bytes, .. } => {
                self.0.set_length(*source_bytes);
                self.0.reset_elapsed();
            }
            Event::Progress { done, fetched, .. } => {
                self.0.set_position(*done);
                if let Some(f) = fetched {
                    self.0
                        .set_message(format!("fetched {}", indicatif::BinaryBytes(*f)));
                }
            }
            Event::Notice(n) => self.0.suspend(|| eprintln!("note: {n}")),
            Event::Validating => self.0.set_message("validating"),
        }
    }
}

pub fn json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub fn summary(r: &ConversionReport) {
    eprintln!(
        "converted {} tensors, {} parameters: {} → {} ({:.2}×) in {:.2} s",
        r.tensors,
        HumanCount(r.total_parameters),
        HumanBytes(r.source_bytes),
        HumanBytes(r.output_bytes),
        r.compression_ratio,
        r.conversion_time_sec
    );
    let paths = [
        ("weights", &r.parquet_path),
        ("metadata", &r.metadata_path),
        ("tokenizer", &r.tokenizer_path),
    ];
    for (what, p) in paths {
        if let Some(p) = p {
            eprintln!("  {what:<10} {}", p.display());
        }
    }
    if !r.parts.is_empty() {
        let count =
            |f: fn(&modelconv::PartStatus) -> bool| r.parts.iter().filter(|p| f(&p.status)).count();
        let kept = count(|s| matches!(s, modelconv::PartStatus::Kept));
        let redone = count(|s| matches!(s, modelconv::PartStatus::Redone { .. }));
        eprintln!(
            "  parts      {} ({} written, {kept} kept, {redone} redone), largest {}",
            r.parts.len(),
            r.parts.len() - kept - redone,
            HumanBytes(r.parts.iter().map(|p| p.bytes).max().unwrap_or(0))
        );
        for p in &r.parts {
            if let modelconv::PartStatus::Redone { reason } = &p.status {
                eprintln!("    redone   {}: {}", p.file, sanitize(reason));
            }
        }
    }
    if let Some(q) = &r.quantization {
        let m = &q.model;
        eprintln!(
            "  quantized  {} tensors to {} ({}{}), {} kept as floats: SQNR {:.1} dB, relative RMS error {:.2e}, max abs error {:.3e}",
            q.quantized_tensors,
            q.quant_type,
            q.scheme,
            if q.group_size > 0 { format!(", groups of {}", q.group_size) } else { ", per channel".into() },
            q.unquantized_tensors,
            m.sqnr_db,
            m.rel_rms,
            m.max_abs_error
        );
        for t in q.tensors.iter().filter(|t| t.sqnr_db.is_finite()).take(3) {
            eprintln!(
                "    worst    {:<48} SQNR {:.1} dB, relative RMS {:.2e}, max abs {:.3e}",
                sanitize(&t.name),
                t.sqnr_db,
                t.rel_rms,
                t.max_abs_error
            );
        }
        if !q.carried.is_empty() {
            eprintln!(
                "    carried  {} pre-quantized weights exactly, from their own codes, scales and zero points",
                q.carried.len()
            );
        }
        for t in &q.requantized {
            eprintln!(
                "    requantized {}: its codes are not carried ({})",
                sanitize(&t.name),
                sanitize(&t.reason)
            );
        }
    }
    if let Some(v) = r.validation_passed {
        let verdict = if v {
            "passed: every value matches the source"
        } else {
            "FAILED"
        };
        eprintln!("  validation {verdict}");
    }
}

pub fn source(r: &modelconv::SourceReport) {
    println!("checkpoint   {}", sanitize(&r.path.display().to_string()));
    for s in &r.shards {
        println!("shard        {}", sanitize(&s.display().to_string()));
    }
    if let Some(q) = &r.quantization {
        println!("quantized    {q}");
    }
    println!("\ntensors ({}):", r.tensors.len());
    for t in &r.tensors {
        println!("  {:<60} {:>8} {:?}", sanitize(&t.name), t.dtype, t.shape);
        if let Some(from) = &t.dequantized_from {
            let parts: Vec<String> = from.iter().map(|c| sanitize(c)).collect();
            println!("      dequantized from {}", parts.join(" + "));
        }
    }
    if !r.dropped.is_empty() {
        println!("\ndropped ({}):", r.dropped.len());
        for (n, why) in &r.dropped {
            println!("  {:<60} {}", sanitize(n), sanitize(why));
        }
    }
}

pub fn plan(plan: &ConversionPlan) {
    println!("model        {}", sanitize(&plan.model_name));
    let resolved = plan.resolved_path.display().to_string();
    println!("resolved to  {}", sanitize(&resolved));
    println!(
        "type         {} (part {}), from {}",
        plan.model_type,
        plan.part,
        sanitize(&plan.detected_by)
    );
    if let Some(q) = &plan.source_quantization {
        println!("quantized    {q}");
    }
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
        let stored = k
            .dequantized
            .as_ref()
            .map_or(k.source_dtype.as_str(), |d| d.stored_dtype.as_str());
        println!(
            "  {:<60} {:>6} → {:<15} {:?} {}{from}",
            sanitize(&k.name),
            stored,
            k.dtype,
            k.shape,
            HumanBytes(k.bytes)
        );
        if let Some(d) = &k.dequantized {
            let parts: Vec<String> = d.consumes.iter().map(|c| sanitize(c)).collect();
            let int8 = d
                .int8
                .as_deref()
                .map(|q| format!("; int8 {}", sanitize(q)))
                .unwrap_or_default();
            println!(
                "      dequantized ({}) from {}{int8}",
                d.scheme,
                parts.join(" + ")
            );
        }
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
        HumanBytes(plan.source_bytes),
        HumanBytes(plan.output_bytes),
        plan.row_groups,
        HumanBytes(plan.estimated_file_bytes)
    );
}

pub fn inspect(r: &InspectReport, row_groups: bool) {
    let names: Vec<String> = r.tensors.iter().map(|t| sanitize(&t.name)).collect();
    let w = names.iter().map(|n| n.chars().count()).max().unwrap_or(0);
    let w = w.max(4);
    println!(
        "{:<w$}  {:<16}  {:<20}  {:>12}  {:>10}",
        "name", "dtype", "shape", "params", "bytes"
    );
    for (t, n) in r.tensors.iter().zip(&names) {
        let shape = format!("{:?}", t.shape);
        let mut split = if t.rows > 1 {
            format!("  ({} rows)", t.rows)
        } else {
            String::new()
        };
        if let Some(q) = t.quant {
            let how = if q.group_size > 0 {
                format!("groups of {}", q.group_size)
            } else {
                format!("axis {}", q.axis)
            };
            split.push_str(&format!(
                "  {}, {how}, {} scales",
                q.kind.as_str(),
                q.scales
            ));
        }
        println!(
            "{n:<w$}  {:<16}  {shape:<20}  {:>12}  {:>10}{split}",
            t.dtype.torch_name(),
            t.num_params,
            HumanBytes(t.bytes).to_string()
        );
    }
    let codec = r.compression.as_deref().unwrap_or("-");
    println!(
        "\n{} tensors, {} parameters, {} of data, {} on disk ({codec}), {} row groups",
        r.total_tensors,
        HumanCount(r.total_parameters),
        HumanBytes(r.total_bytes),
        HumanBytes(r.file_bytes),
        r.row_groups.len()
    );
    let yes = |b: bool| if b { "yes" } else { "no" };
    println!(
        "format {}, cast {}, footer index {}, checksums {}",
        r.format_version
            .as_deref()
            .unwrap_or("seed (V1, no modelconv footer)"),
        r.cast.as_deref().unwrap_or("unknown"),
        yes(r.footer_index),
        yes(r.checksums)
    );
    if let Some(m) = &r.metadata {
        let get = |k: &str| m.get(k).map_or_else(|| "-".into(), |v| v.to_string());
        println!(
            "model {}, type {}, converted {}",
            sanitize(&get("model_name")),
            sanitize(&get("model_type")),
            get("converted_at")
        );
    }
    if row_groups {
        println!("\nrow group  rows  uncompressed  compressed");
        for g in &r.row_groups {
            println!(
                "{:>9}  {:>4}  {:>12}  {:>10}",
                g.index,
                g.rows,
                HumanBytes(g.uncompressed_bytes).to_string(),
                HumanBytes(g.compressed_bytes).to_string()
            );
        }
    }
}

pub fn verify(report: &VerifyReport) {
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
        println!(
            "note: this file has no checksums (written by another converter); structure checked only"
        );
    }
    let worst = report.checks.iter().fold((0f64, 0f64), |a, c| {
        (a.0.max(c.max_abs_error), a.1.max(c.max_rel_error))
    });
    let quantized: Vec<_> = report
        .checks
        .iter()
        .filter_map(|c| c.quant.as_ref())
        .collect();
    let carried = report.checks.iter().filter(|c| c.carried).count();
    if carried > 0 {
        println!(
            "carried tensors: {carried} with the source's own codes, scales and zero points, code for code"
        );
    }
    if let Some(worst) = quantized
        .iter()
        .filter(|q| q.sqnr_db.is_finite())
        .min_by(|a, b| a.sqnr_db.total_cmp(&b.sqnr_db))
    {
        println!(
            "quantized tensors: {} re-quantized from the source with identical codes and scales; lowest SQNR {:.1} dB (`{}`)",
            quantized.len() - carried,
            worst.sqnr_db,
            sanitize(&worst.name)
        );
    }
    let checksums = if report.checksums_present {
        ", checksums verified"
    } else {
        ""
    };
    let values = if report.compared_with_source {
        format!(
            ", every value equals the cast of the source (max abs error {:.3e}, max rel error {:.3e})",
            worst.0, worst.1
        )
    } else {
        String::new()
    };
    println!(
        "{}: {} tensors, {} rows{checksums}{values}",
        if report.passed() { "ok" } else { "FAILED" },
        report.tensors,
        report.rows,
    );
}

pub fn export(r: &ExportReport) {
    eprintln!(
        "exported {} tensors to {} ({})",
        r.tensors,
        r.path.display(),
        HumanBytes(r.bytes)
    );
}
