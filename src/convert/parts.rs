//! A parted output (`--max-file-size`): `weights.parquet/` is a directory of part files,
//! each a complete weight file of whole row groups, written to a temp name, synced and
//! renamed when complete; then `_manifest.json` (the parts, their sizes, rows, tensors
//! and XXH3-128) and, last, `metadata.json`. A directory without both is not a
//! conversion.
//!
//! A part is a pure function of the plan and its index: its footer holds the part's
//! own tensor index and a stamp ([`PartStamp`]) naming the plan it belongs to (the
//! input's files and headers, the options, the modelconv version), never a time. So
//! `--resume` can keep every complete part an interrupted conversion left that belongs
//! to the same plan and passes its checks (footer, row checksums), and convert only the
//! rest: the result is byte-identical to an uninterrupted run.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{json, Value};

use super::{Committed, ConvertConfig, Job, Observer, ObserverSink, QuantReport};
use crate::cast::{CastStats, QuantError};
use crate::error::{Error, Result};
use crate::format::{self, Identity, Manifest, ManifestPart, PartStamp, TensorIndex};
use crate::read::WeightFile;
use crate::write::atomic::{remove_stale_temp_files, sync_dir, TempPath};
use crate::write::{file_hash, hex128, Share, WeightWriter, Written};
use crate::Event;

use super::output::OutputLayout;

/// What became of one part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum PartStatus {
    /// Converted by this run.
    Written,
    /// Kept from an interrupted run (`--resume`): complete, of the same plan, checked.
    Kept,
    /// Converted again by this run: the part an interrupted run left failed its check.
    Redone {
        /// Why it was not kept.
        reason: String,
    },
}

/// One part of a parted output, as the report lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PartOutcome {
    /// File name inside `weights.parquet/`.
    pub file: String,
    /// Bytes of the file.
    pub bytes: u64,
    /// Rows it holds.
    pub rows: u64,
    /// XXH3-128 of the file (32 hex digits), as the manifest lists it.
    pub xxh3_128: String,
    /// Written, kept or redone.
    #[serde(flatten)]
    pub status: PartStatus,
    /// The object's ETag, for a part in object storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e_tag: Option<String>,
}

/// XXH3-128 of the canonical JSON of `v`.
fn hash_json(v: &Value) -> String {
    hex128(xxhash_rust::xxh3::xxh3_128(v.to_string().as_bytes()))
}

/// What the parts of `job` are converted from and how (see [`Identity`]).
pub(crate) fn identity(job: &Job, config: &ConvertConfig) -> Identity {
    let src = &job.source;
    let files = src
        .shards
        .iter()
        .map(|s| {
            let name = s.path.file_name().map_or_else(
                || s.path.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            );
            (name, s.file_len)
        })
        .collect();
    let headers: Vec<Value> = src
        .shards
        .iter()
        .map(|s| {
            let tensors: Vec<Value> = s
                .header
                .tensors
                .iter()
                .map(|t| json!([t.name, t.dtype.to_string(), t.shape, t.offset, t.len]))
                .collect();
            Value::Array(tensors)
        })
        .collect();
    let scheme = src.scheme().map(|s| json!([s.method, s.params]));
    let mut options = config.as_json();
    if let Some(o) = options.as_object_mut() {
        // Neither changes a part's bytes.
        o.remove("validate_output");
        o.remove("extract_tokenizer");
    }
    let plan = &job.plan;
    let rows: Vec<Value> = plan
        .rows
        .iter()
        .map(|r| json!([r.tensor, r.elem_start, r.elems]))
        .collect();
    let groups: Vec<Value> = plan
        .groups
        .iter()
        .map(|g| json!([g.rows.start, g.rows.end]))
        .collect();
    let parts: Vec<Value> = plan
        .parts
        .iter()
        .map(|p| json!([p.groups.start, p.groups.end]))
        .collect();
    let index = serde_json::to_value(TensorIndex::of(plan)).unwrap_or_default();
    Identity {
        format: format::FORMAT_VERSION.to_string(),
        modelconv: env!("CARGO_PKG_VERSION").to_string(),
        files,
        input: hash_json(&json!([headers, scheme])),
        options,
        plan: hash_json(&json!([index, rows, groups, parts])),
    }
}

/// What differs between the identity a part was written with (`was`) and this
/// conversion's (`now`), if anything.
pub(crate) fn differs(was: &Identity, now: &Identity) -> Option<String> {
    if was.format != now.format || was.modelconv != now.modelconv {
        return Some(format!(
            "it was written by modelconv {} (format {}), this is modelconv {} (format {})",
            was.modelconv, was.format, now.modelconv, now.format
        ));
    }
    let list = |f: &[(String, u64)]| {
        f.iter()
            .map(|(n, s)| format!("{n} ({s} bytes)"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if was.files != now.files {
        return Some(format!(
            "it was converted from other input files: {}; this input is {}",
            list(&was.files),
            list(&now.files)
        ));
    }
    if was.input != now.input {
        return Some(
            "it was converted from an input whose headers differ (same files and sizes: another checkpoint, or one rewritten since)"
                .into(),
        );
    }
    if was.options != now.options {
        let (a, b) = (was.options.as_object(), now.options.as_object());
        let mut keys: Vec<&String> = a.into_iter().chain(b).flat_map(|o| o.keys()).collect();
        keys.sort();
        keys.dedup();
        let show = |o: Option<&serde_json::Map<String, Value>>, k: &str| {
            o.and_then(|o| o.get(k))
                .map_or("unset".to_string(), Value::to_string)
        };
        let diff: Vec<String> = keys
            .into_iter()
            .filter(|k| a.and_then(|o| o.get(*k)) != b.and_then(|o| o.get(*k)))
            .map(|k| format!("{k} {} (now {})", show(a, k), show(b, k)))
            .collect();
        return Some(format!(
            "it was converted with other options: {}",
            diff.join(", ")
        ));
    }
    if was.plan != now.plan {
        return Some("its plan differs (another selection of tensors or rows)".into());
    }
    None
}

/// A kept part: its size, hash and what its cast saw.
pub(super) struct Kept {
    pub(super) bytes: u64,
    pub(super) hash: String,
    pub(super) stamp: PartStamp,
}

/// Checks the part file at `path` for part `index` of this plan: `Ok(Ok(kept))` to
/// keep it, `Ok(Err(reason))` to convert it again, `Err` when it belongs to another
/// plan (resuming would mix two conversions).
fn check_part(
    path: &Path,
    now: &Identity,
    index: usize,
    count: usize,
    rows: u64,
    recorded: Option<&(u64, String)>,
) -> Result<std::result::Result<Kept, String>> {
    let wf = match WeightFile::open(path) {
        Ok(wf) => wf,
        Err(e) => return Ok(Err(format!("unreadable ({e})"))),
    };
    let value = wf.key_value(format::KEY_PART);
    let stamp = match check_stamp(path, value, now, index, count, rows)? {
        Ok(s) => s,
        Err(why) => return Ok(Err(why)),
    };
    if let Some(why) = wrong_rows(wf.parquet_metadata(), rows) {
        return Ok(Err(why));
    }
    // A part the journal (or a manifest) recorded when it was written: its whole
    // file's XXH3-128 must be the recorded one (footer and pages included, at memory
    // speed); otherwise every row's checksum is checked, decompressing it.
    if let Some((bytes, hash)) = recorded {
        let (b, h) = file_hash(path)?;
        if b == *bytes && h == *hash {
            return Ok(Ok(Kept {
                bytes: b,
                hash: h,
                stamp,
            }));
        }
        return Ok(Err(format!(
            "its content differs from the one recorded when it was written ({b} bytes, XXH3-128 {h}; recorded {bytes} bytes, {hash})"
        )));
    }
    let mut bad = None;
    for rg in 0..wf.num_row_groups() {
        let scanned = wf.scan_row_group(rg, false, &mut |r| {
            let ok = r
                .checksum
                .is_some_and(|c| c == xxhash_rust::xxh3::xxh3_64(r.data));
            if !ok && bad.is_none() {
                bad = Some(r.row);
            }
            Ok(())
        });
        if let Err(e) = scanned {
            return Ok(Err(format!("row group {rg} is unreadable ({e})")));
        }
    }
    if let Some(row) = bad {
        return Ok(Err(format!("row {row} fails its checksum")));
    }
    let (bytes, hash) = file_hash(path)?;
    Ok(Ok(Kept { bytes, hash, stamp }))
}

/// The stamp of the part at `path` (its footer's [`format::KEY_PART`] value): `Ok(Ok)`
/// when it is part `index` of `count` of the conversion `now`, `Ok(Err(reason))` when
/// it is another part of it or damaged (to be converted again), `Err` when it belongs
/// to another plan.
pub(super) fn check_stamp(
    path: &Path,
    value: Option<&str>,
    now: &Identity,
    index: usize,
    count: usize,
    rows: u64,
) -> Result<std::result::Result<PartStamp, String>> {
    let stamp: PartStamp = match value.map(serde_json::from_str::<PartStamp>) {
        Some(Ok(s)) => s,
        Some(Err(e)) => return Ok(Err(format!("its part stamp is damaged ({e})"))),
        None => return Ok(Err("it has no part stamp".into())),
    };
    if let Some(why) = differs(&stamp.identity, now) {
        return Err(Error::ResumeRefused {
            path: path.to_path_buf(),
            reason: why,
        });
    }
    if stamp.index != index || stamp.count != count || stamp.rows != rows {
        return Ok(Err(format!(
            "it holds part {} of {} ({} rows), not part {} of {count} ({rows} rows)",
            stamp.index + 1,
            stamp.count,
            stamp.rows,
            index + 1
        )));
    }
    Ok(Ok(stamp))
}

/// Why a part whose footer is `meta` does not hold the `rows` the plan gives it, if it
/// does not.
pub(super) fn wrong_rows(
    meta: &parquet::file::metadata::ParquetMetaData,
    rows: u64,
) -> Option<String> {
    let held: u64 = meta
        .row_groups()
        .iter()
        .map(|g| u64::try_from(g.num_rows()).unwrap_or(0))
        .sum();
    (held != rows).then(|| format!("it holds {held} rows, not {rows}"))
}

/// The parts of a parted conversion once those an interrupted run left are checked.
pub(super) struct Tally {
    /// Kept parts; `None` for the rest.
    pub(super) outcomes: Vec<Option<PartOutcome>>,
    /// What the kept parts' casts saw, per planned tensor.
    pub(super) stats: Vec<CastStats>,
    /// The kept parts' quantization errors, per planned tensor.
    pub(super) quant: Vec<QuantError>,
    /// The parts to convert, in order, and why.
    pub(super) todo: Vec<(usize, PartStatus)>,
}

/// Sorts the parts named `names` by what their check (`None`: no part there) said.
pub(super) fn tally(
    job: &Job,
    names: &[String],
    checked: Vec<Option<std::result::Result<Kept, String>>>,
) -> Tally {
    let plan = &job.plan;
    let mut t = Tally {
        outcomes: vec![None; plan.parts.len()],
        stats: vec![CastStats::default(); plan.tensors.len()],
        quant: vec![QuantError::default(); plan.tensors.len()],
        todo: Vec::new(),
    };
    for (k, c) in checked.into_iter().enumerate() {
        let part = &plan.parts[k];
        let rows = (part.rows.end - part.rows.start) as u64;
        match c {
            Some(Ok(kept)) => {
                merge_stamp(&kept.stamp, &mut t.stats, &mut t.quant);
                t.outcomes[k] = Some(PartOutcome {
                    file: names[k].clone(),
                    bytes: kept.bytes,
                    rows,
                    xxh3_128: kept.hash,
                    status: PartStatus::Kept,
                    e_tag: None,
                });
            }
            Some(Err(reason)) => t.todo.push((k, PartStatus::Redone { reason })),
            None => t.todo.push((k, PartStatus::Written)),
        }
    }
    t
}

/// Writes the parts of `job` that are missing (all of them, unless resuming), then the
/// manifest and the side files, `metadata.json` last.
pub(crate) fn write_and_commit(
    job: &Job,
    out: &OutputLayout,
    config: &ConvertConfig,
    observer: &dyn Observer,
    stale: &[String],
) -> Result<Committed> {
    job.notify(observer, stale);
    let plan = &job.plan;
    let dir = out.weights().to_path_buf();
    let now = identity(job, config);
    if dir.is_file() {
        if config.resume {
            return Err(Error::ResumeRefused {
                path: dir,
                reason: "it is a single-file conversion, not parts".into(),
            });
        }
        // --force: the file goes; its metadata.json first, so nothing looks complete.
        remove(out.metadata())?;
        remove(&dir)?;
    } else if dir.is_dir() && !config.resume {
        remove(out.metadata())?;
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io("remove", &dir, e))?;
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
    let stale_parts = remove_stale_temp_files(&dir);
    if !stale_parts.is_empty() {
        let message = format!(
            "removed {} temp file(s) a killed conversion left in {}",
            stale_parts.len(),
            dir.display()
        );
        observer.event(&Event::Notice(&message));
    }
    let count = plan.parts.len();
    let names: Vec<String> = (0..count).map(|k| format::part_name(k, count)).collect();
    // Every part file there must belong to this plan (a part of another count, or of
    // another input, would be mixed in by a dataset reader).
    refuse_foreign(&dir, &names, &now, config.resume)?;

    // What the journal of an interrupted run (or the manifest of a complete one)
    // recorded of each part it wrote.
    let recorded = if config.resume {
        recorded_parts(&dir)
    } else {
        Default::default()
    };
    // The parts an interrupted run left, checked in parallel (each is read whole:
    // its row checksums and its XXH3-128).
    let checked: Vec<Option<std::result::Result<Kept, String>>> = if !config.resume {
        (0..count).map(|_| None).collect()
    } else {
        use rayon::prelude::*;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.threads.max(1))
            .build()
            .map_err(|e| Error::ThreadPool {
                reason: e.to_string(),
            })?;
        pool.install(|| {
            plan.parts
                .par_iter()
                .enumerate()
                .map(|(k, part)| {
                    let path = dir.join(&names[k]);
                    let rows = (part.rows.end - part.rows.start) as u64;
                    if path.exists() {
                        check_part(&path, &now, k, count, rows, recorded.get(&names[k])).map(Some)
                    } else {
                        Ok(None)
                    }
                })
                .collect::<Vec<Result<_>>>()
        })
        .into_iter()
        // The first part in order that belongs to another plan is the one named.
        .collect::<Result<Vec<_>>>()?
    };
    let Tally {
        mut outcomes,
        mut stats,
        mut quant,
        todo,
    } = tally(job, &names, checked);
    // Every kept part checked: from here on the output is not a conversion until the
    // manifest and metadata.json are renamed into place again.
    remove(out.metadata())?;
    remove(&dir.join(format::MANIFEST_FILE))?;
    let total = announce(job, &outcomes, observer);
    let sink = ObserverSink {
        observer,
        total,
        source: &job.source,
    };
    let mut done = 0u64;
    let share = Share::new(&job.write_options(config))?;
    for (k, status) in todo {
        let (outcome, stamp) = write_part(job, config, &dir, k, &now, status, done, &sink, &share)?;
        done += part_src_bytes(job, k);
        merge_stamp(&stamp, &mut stats, &mut quant);
        outcomes[k] = Some(outcome);
        write_journal(&dir, &outcomes)?;
    }
    let outcomes: Vec<PartOutcome> = outcomes.into_iter().flatten().collect();
    let done = finish_manifest(job, config, out, now, &outcomes, &stats, &quant, observer)?;
    let staged = out.stage(&done.metadata)?;
    if config.cancel.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(Error::Cancelled);
    }
    let m = TempPath::beside(&dir.join(format::MANIFEST_FILE));
    m.write_all(done.manifest.as_bytes())?;
    m.commit()?;
    // The manifest records every part: the journal is done.
    remove(&dir.join(JOURNAL_FILE))?;
    sync_dir(&dir);
    staged.commit(None)?;
    let file_bytes = outcomes.iter().map(|o| o.bytes).sum();
    Ok(Committed {
        file_bytes,
        metadata: done.metadata,
        quant: done.quant,
        parts: outcomes,
    })
}

/// Tells `observer` what is left to convert once the parts `outcomes` has are kept:
/// returns the source bytes of the others.
pub(super) fn announce(
    job: &Job,
    outcomes: &[Option<PartOutcome>],
    observer: &dyn Observer,
) -> u64 {
    let plan = &job.plan;
    let kept_src: u64 = (0..plan.parts.len())
        .filter(|k| outcomes[*k].is_some())
        .map(|k| part_src_bytes(job, k))
        .sum();
    let total = plan.src_bytes() - kept_src;
    observer.event(&Event::Planned {
        tensors: plan.tensors.len(),
        source_bytes: total,
    });
    total
}

/// What a parted conversion commits once every part is in.
pub(super) struct Finished {
    /// The `metadata.json` content (listing the parts).
    pub(super) metadata: Value,
    /// The `_manifest.json` text.
    pub(super) manifest: String,
    /// The quantization report, from every part's stamp.
    pub(super) quant: Option<QuantReport>,
}

/// The manifest and `metadata.json` of a parted conversion whose parts are
/// `outcomes` (every part, in order) and whose stamps added up to `stats` and `quant`.
///
/// # Errors
///
/// `Internal` when a part is missing.
#[allow(clippy::too_many_arguments)]
pub(super) fn finish_manifest(
    job: &Job,
    config: &ConvertConfig,
    out: &OutputLayout,
    now: Identity,
    outcomes: &[PartOutcome],
    stats: &[CastStats],
    quant: &[QuantError],
    observer: &dyn Observer,
) -> Result<Finished> {
    let plan = &job.plan;
    if outcomes.len() != plan.parts.len() {
        return Err(Error::internal("a part was neither kept nor written"));
    }
    job.notice_overflow(stats, observer);
    let quant_report = job.quant_report(quant);
    let listed: Vec<ManifestPart> = plan
        .parts
        .iter()
        .zip(outcomes)
        .enumerate()
        .map(|(k, (p, o))| {
            let tensors = plan.part_tensors(k);
            ManifestPart {
                file: o.file.clone(),
                bytes: o.bytes,
                xxh3_128: o.xxh3_128.clone(),
                first_row: p.rows.start as u64,
                rows: o.rows,
                row_groups: p.groups.end - p.groups.start,
                tensors,
            }
        })
        .collect();
    let mut metadata = job.metadata(config, out, stats, quant_report.as_ref());
    if let Some(o) = metadata.as_object_mut() {
        o.insert(
            "parts".into(),
            serde_json::to_value(&listed).unwrap_or_default(),
        );
    }
    let manifest = Manifest {
        format_version: format::FORMAT_VERSION.to_string(),
        identity: now,
        parts: listed,
        rows: plan.rows.len() as u64,
        index: serde_json::to_value(TensorIndex::of(plan)).unwrap_or_default(),
        metadata: metadata.clone(),
    };
    let manifest = serde_json::to_string_pretty(&manifest)
        .map_err(|e| Error::internal(format!("{}: {e}", format::MANIFEST_FILE)))?;
    Ok(Finished {
        metadata,
        manifest,
        quant: quant_report,
    })
}

/// Converts part `k` of `job`'s plan into `dir` (`weights.parquet/`): a temp file,
/// its row groups, the footer with its stamp, synced, then renamed into place.
#[allow(clippy::too_many_arguments)]
fn write_part(
    job: &Job,
    config: &ConvertConfig,
    dir: &Path,
    k: usize,
    now: &Identity,
    status: PartStatus,
    done: u64,
    sink: &dyn crate::write::ProgressSink,
    share: &Share,
) -> Result<(PartOutcome, PartStamp)> {
    let count = job.plan.parts.len();
    let name = format::part_name(k, count);
    let target = dir.join(&name);
    let writer = WeightWriter::create_sharing(&target, job.write_options(config), share)?;
    let (written, stamp) = encode_part(job, config, writer, k, now, done, sink)?;
    let (bytes, hash) = (
        written.file_bytes,
        written.content_hash.clone().unwrap_or_default(),
    );
    written.tmp.commit()?;
    sync_dir(dir);
    let outcome = PartOutcome {
        file: name,
        bytes,
        rows: stamp.rows,
        xxh3_128: hash,
        status,
        e_tag: None,
    };
    Ok((outcome, stamp))
}

/// Writes part `k` of `job`'s plan with `writer` (a temp file or an upload): its row
/// groups, then the footer with its stamp. Returns it finished, not yet committed.
///
/// # Errors
///
/// Every error of the writer; `Cancelled`.
pub(super) fn encode_part(
    job: &Job,
    config: &ConvertConfig,
    mut writer: WeightWriter,
    k: usize,
    now: &Identity,
    done: u64,
    sink: &dyn crate::write::ProgressSink,
) -> Result<(Written, PartStamp)> {
    let plan = &job.plan;
    let count = plan.parts.len();
    let part = &plan.parts[k];
    let st = writer.write_groups(
        &job.source,
        plan,
        part.groups.clone(),
        done,
        &config.cancel,
        sink,
    )?;
    let stamp = PartStamp {
        index: k,
        count,
        first_row: part.rows.start as u64,
        rows: (part.rows.end - part.rows.start) as u64,
        identity: now.clone(),
        cast: st
            .cast
            .iter()
            .enumerate()
            .filter(|(_, s)| **s != CastStats::default())
            .map(|(t, s)| (t, s.nan, s.inf, s.overflow, s.max_overflow.to_bits()))
            .collect(),
        quant: st
            .quant
            .iter()
            .enumerate()
            .filter(|(_, q)| **q != QuantError::default())
            .map(|(t, q)| {
                let bits = (q.sum_x2.to_bits(), q.sum_e2.to_bits(), q.max_abs.to_bits());
                (t, bits.0, bits.1, bits.2, q.count)
            })
            .collect(),
    };
    let written = writer.finish(format::part_footer(plan, &stamp))?;
    if config.cancel.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(Error::Cancelled);
    }
    Ok((written, stamp))
}

/// Converts one part of a parted conversion (`config` must give `max_file_size`) into
/// `output/weights.parquet/`, and nothing else: no manifest, no side files, no lock.
/// A part is a pure function of the input, the options and `index`, so parts can be
/// converted in any order by independent processes (a cluster's workers) and committed
/// by one [`crate::convert`] with `resume` (which keeps them all and writes the
/// manifest and `metadata.json`). A part already there of the same plan that passes
/// its checks is kept; a damaged one is written again.
///
/// # Errors
///
/// `InvalidOption` without `max_file_size` or for an index past the plan's parts;
/// `ResumeRefused` for a part file of another plan at that name; every error of
/// [`crate::convert`].
pub fn convert_part(
    input: impl AsRef<Path>,
    output: impl AsRef<Path>,
    config: &ConvertConfig,
    index: usize,
) -> Result<PartOutcome> {
    if config.max_file_size.is_none() {
        return Err(Error::option(
            "converting one part needs the part size (max_file_size) of the whole conversion",
        ));
    }
    let job = Job::prepare(crate::source::open(input, config.source_options())?, config)?;
    let count = job.plan.parts.len();
    if index >= count {
        return Err(Error::option(format!(
            "part {index} does not exist: the plan has {count} parts (0 to {})",
            count - 1
        )));
    }
    if let Some(url) = super::object_url(output.as_ref())? {
        #[cfg(feature = "remote")]
        return super::store::convert_part(&job, &url, config, index);
        #[cfg(not(feature = "remote"))]
        let _ = url;
    }
    let dir = output.as_ref().join(format::WEIGHTS_FILE);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
    let now = identity(&job, config);
    let path = dir.join(format::part_name(index, count));
    let rows = {
        let p = &job.plan.parts[index];
        (p.rows.end - p.rows.start) as u64
    };
    let status = if path.exists() {
        match check_part(&path, &now, index, count, rows, None)? {
            Ok(kept) => {
                return Ok(PartOutcome {
                    file: format::part_name(index, count),
                    bytes: kept.bytes,
                    rows,
                    xxh3_128: kept.hash,
                    status: PartStatus::Kept,
                    e_tag: None,
                })
            }
            Err(reason) => PartStatus::Redone { reason },
        }
    } else {
        PartStatus::Written
    };
    let share = Share::new(&job.write_options(config))?;
    let (outcome, _) = write_part(&job, config, &dir, index, &now, status, 0, &Quiet, &share)?;
    Ok(outcome)
}

/// Progress of a part converted alone: nobody watches it.
pub(super) struct Quiet;

impl crate::write::ProgressSink for Quiet {
    fn advanced(&self, _: u64) {}
}

/// Records parts that [`convert_part`] converted (in other processes: a cluster's
/// workers) in the journal of the parted output `output`, beside the parts it already
/// records, so that the [`crate::convert`] with `resume` that commits them checks each
/// by its XXH3-128 (in object storage, its ETag) instead of reading every row. A part
/// whose file no longer matches its record is converted again by that commit.
///
/// # Errors
///
/// `Io` naming the journal (`Remote` in object storage).
pub fn record_parts(output: impl AsRef<Path>, parts: &[PartOutcome]) -> Result<()> {
    if let Some(url) = super::object_url(output.as_ref())? {
        #[cfg(feature = "remote")]
        return super::store::record_parts(&url, parts.iter().map(Recorded::from));
        #[cfg(not(feature = "remote"))]
        let _ = url;
    }
    let dir = output.as_ref().join(format::WEIGHTS_FILE);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
    let old = std::fs::read(dir.join(JOURNAL_FILE)).ok();
    let entries = merge_records(old.as_deref(), parts.iter().map(Recorded::from));
    let t = TempPath::beside(&dir.join(JOURNAL_FILE));
    t.write_all(journal_json(&entries)?.as_bytes())?;
    t.commit()
}

/// The journal `old` (if it reads) with `new` added, an entry of `new` replacing one of
/// the same file; sorted by file.
pub(super) fn merge_records(
    old: Option<&[u8]>,
    new: impl Iterator<Item = Recorded>,
) -> Vec<Recorded> {
    let mut by_file: std::collections::BTreeMap<String, Recorded> = old
        .and_then(|b| serde_json::from_slice::<Vec<Recorded>>(b).ok())
        .unwrap_or_default()
        .into_iter()
        .map(|r| (r.file.clone(), r))
        .collect();
    for r in new {
        by_file.insert(r.file.clone(), r);
    }
    by_file.into_values().collect()
}

/// The journal of a parted conversion in progress, in `weights.parquet/`: every part
/// written so far with its size and XXH3-128, rewritten (temp file, rename) after each
/// part, so that `--resume` checks a part it lists by hashing the file instead of
/// decompressing every row. Removed once the manifest (which lists them all) is in.
pub(super) const JOURNAL_FILE: &str = "_journal.json";

/// One journal (or manifest) entry.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub(super) struct Recorded {
    pub(super) file: String,
    pub(super) bytes: u64,
    pub(super) xxh3_128: String,
    /// The object's ETag, for a part in object storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) e_tag: Option<String>,
}

impl From<&PartOutcome> for Recorded {
    fn from(o: &PartOutcome) -> Recorded {
        Recorded {
            file: o.file.clone(),
            bytes: o.bytes,
            xxh3_128: o.xxh3_128.clone(),
            e_tag: o.e_tag.clone(),
        }
    }
}

/// Rewrites the journal with the parts `outcomes` has.
fn write_journal(dir: &Path, outcomes: &[Option<PartOutcome>]) -> Result<()> {
    let entries: Vec<Recorded> = outcomes.iter().flatten().map(Recorded::from).collect();
    let t = TempPath::beside(&dir.join(JOURNAL_FILE));
    t.write_all(journal_json(&entries)?.as_bytes())?;
    t.commit()
}

/// The journal's text.
///
/// # Errors
///
/// `Internal` (serialising cannot fail).
pub(super) fn journal_json(entries: &[Recorded]) -> Result<String> {
    serde_json::to_string(entries).map_err(|e| Error::internal(format!("{JOURNAL_FILE}: {e}")))
}

/// The parts a journal, or else a manifest, records, by name. Empty when neither
/// reads.
pub(super) fn recorded_in(
    journal: Option<&[u8]>,
    manifest: Option<&[u8]>,
) -> std::collections::HashMap<String, Recorded> {
    let from_journal = journal.and_then(|b| serde_json::from_slice::<Vec<Recorded>>(b).ok());
    let entries = from_journal.or_else(|| {
        let m: Manifest = serde_json::from_slice(manifest?).ok()?;
        Some(
            m.parts
                .into_iter()
                .map(|p| Recorded {
                    file: p.file,
                    bytes: p.bytes,
                    xxh3_128: p.xxh3_128,
                    e_tag: None,
                })
                .collect(),
        )
    });
    entries
        .unwrap_or_default()
        .into_iter()
        .map(|r| (r.file.clone(), r))
        .collect()
}

/// The parts the journal, or else the manifest, of `dir` records: name → (bytes,
/// XXH3-128). Empty when neither reads.
fn recorded_parts(dir: &Path) -> std::collections::HashMap<String, (u64, String)> {
    let journal = std::fs::read(dir.join(JOURNAL_FILE)).ok();
    let manifest = std::fs::read(dir.join(format::MANIFEST_FILE)).ok();
    recorded_in(journal.as_deref(), manifest.as_deref())
        .into_iter()
        .map(|(name, r)| (name, (r.bytes, r.xxh3_128)))
        .collect()
}

/// Source bytes part `k` of `job`'s plan reads.
pub(super) fn part_src_bytes(job: &Job, k: usize) -> u64 {
    job.plan.groups[job.plan.parts[k].groups.clone()]
        .iter()
        .map(|g| g.src_bytes)
        .sum()
}

/// Adds a part's stamped statistics to the conversion's.
pub(super) fn merge_stamp(stamp: &PartStamp, stats: &mut [CastStats], quant: &mut [QuantError]) {
    for &(t, nan, inf, overflow, max_overflow) in &stamp.cast {
        if let Some(s) = stats.get_mut(t) {
            s.merge(&CastStats {
                nan,
                inf,
                overflow,
                max_overflow: f64::from_bits(max_overflow),
            });
        }
    }
    for &(t, sum_x2, sum_e2, max_abs, count) in &stamp.quant {
        if let Some(q) = quant.get_mut(t) {
            q.merge(&QuantError {
                sum_x2: f64::from_bits(sum_x2),
                sum_e2: f64::from_bits(sum_e2),
                max_abs: f64::from_bits(max_abs),
                count,
            });
        }
    }
}

/// Refuses part files in `dir` that this plan does not name: with `resume`, saying
/// what differs in the plan that wrote it; without, as an existing conversion (the
/// directory was emptied, so none is there).
fn refuse_foreign(dir: &Path, names: &[String], now: &Identity, resume: bool) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))?;
    let mut foreign: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().map(|n| n.to_string_lossy().into_owned());
            n.is_some_and(|n| n.starts_with("part-") && !names.contains(&n))
        })
        .collect();
    foreign.sort();
    let Some(p) = foreign.into_iter().next() else {
        return Ok(());
    };
    let why = WeightFile::open(&p)
        .ok()
        .and_then(|wf| {
            let s: PartStamp = serde_json::from_str(wf.key_value(format::KEY_PART)?).ok()?;
            Some(differs(&s.identity, now))
        })
        .flatten();
    Err(match (resume, why) {
        (true, Some(reason)) => Error::ResumeRefused { path: p, reason },
        (true, None) => Error::ResumeRefused {
            path: p,
            reason: "this conversion plans no part of this name (another part count, or not a modelconv part)".into(),
        },
        (false, _) => Error::OutputExists { path: p },
    })
}

/// Removes a file if it is there.
pub(super) fn remove(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", p, e)),
    }
}
