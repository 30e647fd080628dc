//! A parted output (`--max-file-size`): `weights.parquet/` is a folder of part files,
//! each a complete weight file of whole row groups that appears only whole; then
//! `_manifest.json` (the parts, their sizes, rows, tensors and XXH3-128) and, last,
//! `metadata.json`. A folder without both is not a conversion. The same steps at every
//! [`Destination`], a local directory or an object-store prefix.
//!
//! A part is a pure function of the plan and its index ([`write_part`]): its footer
//! holds the part's own tensor index and a stamp ([`PartStamp`]) naming the plan it
//! belongs to (the input's files and headers, the options, the modelconv version),
//! never a time. So `--resume` can keep every complete part an interrupted conversion
//! left that belongs to the same plan and passes its checks, and convert only the
//! rest: the result is byte-identical to an uninterrupted run.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use super::output::OutputLayout;
use super::{Commit, Committed, ConvertConfig, Job, Observer, ObserverSink, QuantReport};
use crate::cast::{CastStats, QuantError};
use crate::error::{Error, Result};
use crate::format::{self, Identity, Manifest, ManifestPart, PartStamp, TensorIndex};
use crate::io::hex128;
use crate::io::Listed;
use crate::write::dest::{parts_dir, Check, Content, Destination, Output, Recorded};
use crate::write::parts::{
    check_part, check_stamp, journal_json, journal_name, merge_records, part_rows, recorded,
    refuse_foreign, write_part, Kept, PartJob, Slot,
};
use crate::write::{ProgressSink, Share};
use crate::Event;

pub use crate::write::parts::{PartOutcome, PartStatus};

/// XXH3-128 of the canonical JSON of `v`.
fn hash_json(v: &Value) -> String {
    hex128(xxhash_rust::xxh3::xxh3_128(v.to_string().as_bytes()))
}

/// `v` as JSON.
///
/// # Errors
///
/// `Internal` naming `what` (serialising our own types cannot fail).
fn to_json(v: impl serde::Serialize, what: &str) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| Error::internal(format!("{what}: {e}")))
}

/// What the parts of `job` are converted from and how (see [`Identity`]).
///
/// # Errors
///
/// `Internal` when the plan's tensor index does not serialise.
pub(crate) fn identity(job: &Job, config: &ConvertConfig) -> Result<Identity> {
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
    Ok(Identity {
        format: format::FORMAT_VERSION.to_string(),
        modelconv: env!("CARGO_PKG_VERSION").to_string(),
        files,
        input: hash_json(&json!([headers, scheme])),
        options,
        plan: plan_hash(job)?,
    })
}

/// XXH3-128 of the plan: its tensor index, rows, row groups and parts.
fn plan_hash(job: &Job) -> Result<String> {
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
    let index = to_json(TensorIndex::of(plan), "the tensor index")?;
    Ok(hash_json(&json!([index, rows, groups, parts])))
}

/// The parts of a parted conversion as they stand: kept or written, and what their
/// casts saw.
struct Tally {
    /// Kept or written parts; `None` for the rest.
    outcomes: Vec<Option<PartOutcome>>,
    /// What the parts' casts saw, per planned tensor.
    stats: Vec<CastStats>,
    /// The parts' quantization errors, per planned tensor.
    quant: Vec<QuantError>,
    /// The parts to convert, in order, and why.
    todo: Vec<(usize, PartStatus)>,
}

/// Sorts the parts named `names` by what their check (`None`: no part there) said.
fn tally(job: &Job, names: &[String], checked: Vec<Option<Check<Kept>>>) -> Tally {
    let plan = &job.plan;
    let mut t = Tally {
        outcomes: vec![None; plan.parts.len()],
        stats: vec![CastStats::default(); plan.tensors.len()],
        quant: vec![QuantError::default(); plan.tensors.len()],
        todo: Vec::new(),
    };
    for (k, c) in checked.into_iter().enumerate() {
        match c {
            Some(Check::Keep(kept)) => {
                merge_stamp(&kept.stamp, &mut t.stats, &mut t.quant);
                t.outcomes[k] = Some(PartOutcome {
                    file: names[k].clone(),
                    bytes: kept.bytes,
                    rows: part_rows(plan, k),
                    xxh3_128: kept.hash,
                    status: PartStatus::Kept,
                    e_tag: None,
                });
            }
            Some(Check::Redo(reason)) => t.todo.push((k, PartStatus::Redone { reason })),
            None => t.todo.push((k, PartStatus::Written)),
        }
    }
    t
}

/// Writes the parts of `job` that are missing at `dest` (all of them, unless
/// resuming), then the manifest and the side files, `metadata.json` last.
pub(super) fn write_and_commit(c: &Commit<'_>) -> Result<Committed> {
    let Commit {
        job,
        dest,
        config,
        observer,
        begun,
        ..
    } = *c;
    job.notify(observer, &begun.stale);
    let now = identity(job, config)?;
    clear_for_parts(dest, config.resume)?;
    let pdir = parts_dir();
    let stale = dest.make_dir(&pdir, true)?;
    if !stale.is_empty() {
        let message = format!(
            "removed {} temp file(s) a killed conversion left in {}",
            stale.len(),
            dest.locate(&pdir).display()
        );
        observer.event(&Event::Notice(&message));
    }
    let count = job.plan.parts.len();
    let names: Vec<String> = (0..count).map(|k| format::part_name(k, count)).collect();
    let listed = dest.list(&pdir)?;
    // Every part there must belong to this plan (a part of another count, or of
    // another input, would be mixed in by a dataset reader).
    refuse_foreign(dest, &listed, &names, &now, config.resume)?;
    let checked = check_left(job, dest, config, &now, &listed)?;
    let mut t = tally(job, &names, checked);
    // Every kept part checked: from here on the output is not a conversion until the
    // manifest and metadata.json are in place again.
    dest.remove(format::METADATA_FILE)?;
    dest.remove(&format!("{pdir}{}", format::MANIFEST_FILE))?;
    let total = announce(job, &t.outcomes, observer);
    let sink = ObserverSink {
        observer,
        total,
        source: &job.source,
    };
    let share = Share::new(&job.write_options(config))?;
    let part_job = part_job(job, config, &now, &share);
    write_todo(job, &part_job, dest, &listed, &mut t, &sink)?;
    commit_parts(c, now, t)
}

/// What writing any part of `job`'s plan needs.
fn part_job<'a>(
    job: &'a Job,
    config: &'a ConvertConfig,
    now: &'a Identity,
    share: &'a Share,
) -> PartJob<'a> {
    PartJob {
        source: &job.source,
        plan: &job.plan,
        identity: now,
        options: job.write_options(config),
        share,
        cancel: &config.cancel,
    }
}

/// Removes what must go before parts are written: a single-file conversion there
/// (refused when resuming), and without `resume` every part of an earlier run.
///
/// # Errors
///
/// `ResumeRefused`; `Io`/`Remote` naming what could not be removed.
fn clear_for_parts(dest: &dyn Destination, resume: bool) -> Result<()> {
    if dest.head(format::WEIGHTS_FILE)?.is_some() {
        if resume {
            return Err(Error::ResumeRefused {
                path: dest.locate(format::WEIGHTS_FILE),
                reason: "it is a single-file conversion, not parts".into(),
            });
        }
        // --force: the file goes; its metadata.json first, so nothing looks complete.
        dest.remove(format::METADATA_FILE)?;
        dest.remove(format::WEIGHTS_FILE)?;
    } else if !resume {
        dest.remove(format::METADATA_FILE)?;
        dest.remove(&parts_dir())?;
    }
    Ok(())
}

/// The parts an interrupted run left (`listed`), checked in parallel when resuming
/// (each as its destination checks it: a local file read whole, an object by its
/// footer and ETag); `None` for a part that is not there.
///
/// # Errors
///
/// `ResumeRefused` for the first part in order that belongs to another plan;
/// `ThreadPool`; `Io`/`Remote`.
fn check_left(
    job: &Job,
    dest: &dyn Destination,
    config: &ConvertConfig,
    now: &Identity,
    listed: &BTreeMap<String, Listed>,
) -> Result<Vec<Option<Check<Kept>>>> {
    let count = job.plan.parts.len();
    if !config.resume {
        return Ok((0..count).map(|_| None).collect());
    }
    // What the journal of an interrupted run (or the manifest of a complete one)
    // recorded of each part it wrote.
    let recorded = recorded(dest)?;
    use rayon::prelude::*;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(config.threads.max(1))
        .build()
        .map_err(|e| Error::ThreadPool {
            reason: e.to_string(),
        })?;
    pool.install(|| {
        (0..count)
            .into_par_iter()
            .map(|k| {
                let name = format::part_name(k, count);
                let Some(l) = listed.get(&name) else {
                    return Ok(None);
                };
                let slot = Slot {
                    now,
                    index: k,
                    count,
                    rows: part_rows(&job.plan, k),
                };
                let full = format!("{}{name}", parts_dir());
                check_part(dest, &full, l, slot, recorded.get(&name)).map(Some)
            })
            .collect::<Vec<Result<_>>>()
    })
    .into_iter()
    // The first part in order that belongs to another plan is the one named.
    .collect()
}

/// Writes the parts `t` has to do, in order, rewriting the journal after each.
///
/// # Errors
///
/// Every error of [`write_part`]; `Io`/`Remote` naming the journal.
fn write_todo(
    job: &Job,
    part_job: &PartJob<'_>,
    dest: &dyn Destination,
    listed: &BTreeMap<String, Listed>,
    t: &mut Tally,
    sink: &dyn ProgressSink,
) -> Result<()> {
    let mut done = 0u64;
    for (k, status) in std::mem::take(&mut t.todo) {
        let (outcome, stamp) = write_part(part_job, k, dest, status, done, sink)?;
        done += part_src_bytes(job, k);
        merge_stamp(&stamp, &mut t.stats, &mut t.quant);
        t.outcomes[k] = Some(outcome);
        // A kept part is recorded with the ETag it was listed with.
        let entries: Vec<Recorded> = t
            .outcomes
            .iter()
            .flatten()
            .map(|o| Recorded {
                e_tag: o
                    .e_tag
                    .clone()
                    .or_else(|| listed.get(&o.file).and_then(|l| l.e_tag.clone())),
                ..Recorded::from(o)
            })
            .collect();
        let journal = journal_json(&entries)?;
        dest.stage(&journal_name(), Content::Bytes(journal.as_bytes()))?
            .commit()?;
    }
    Ok(())
}

/// Commits a parted conversion whose parts are all in `t`: the side files staged, the
/// manifest, the journal removed, then the side files and `metadata.json`.
fn commit_parts(c: &Commit<'_>, now: Identity, t: Tally) -> Result<Committed> {
    let Commit {
        job,
        out,
        dest,
        config,
        observer,
        begun,
    } = *c;
    let outcomes: Vec<PartOutcome> = t.outcomes.into_iter().flatten().collect();
    let done = PartsDone {
        outcomes: &outcomes,
        stats: &t.stats,
        quant: &t.quant,
    };
    let fin = finish_manifest(job, config, out, now, &done, observer)?;
    let staged = out.stage(dest, &fin.metadata, begun.old_metadata.as_deref())?;
    if config.cancel.load(Ordering::Relaxed) {
        return Err(Error::Cancelled);
    }
    let pdir = parts_dir();
    dest.stage(
        &format!("{pdir}{}", format::MANIFEST_FILE),
        Content::Bytes(fin.manifest.as_bytes()),
    )?
    .commit()?;
    // The manifest records every part: the journal is done.
    dest.remove(&journal_name())?;
    dest.sync(&pdir);
    staged.commit(dest, None)?;
    let file_bytes = outcomes.iter().map(|o| o.bytes).sum();
    Ok(Committed {
        file_bytes,
        metadata: fin.metadata,
        quant: fin.quant,
        parts: outcomes,
    })
}

/// Tells `observer` what is left to convert once the parts `outcomes` has are kept:
/// returns the source bytes of the others.
fn announce(job: &Job, outcomes: &[Option<PartOutcome>], observer: &dyn Observer) -> u64 {
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

/// Every part of a parted conversion, in order, and what their casts saw in total.
struct PartsDone<'a> {
    outcomes: &'a [PartOutcome],
    stats: &'a [CastStats],
    quant: &'a [QuantError],
}

/// What a parted conversion commits once every part is in.
struct Finished {
    /// The `metadata.json` content (listing the parts).
    metadata: Value,
    /// The `_manifest.json` text.
    manifest: String,
    /// The quantization report, from every part's stamp.
    quant: Option<QuantReport>,
}

/// The manifest and `metadata.json` of a parted conversion whose parts are `done`.
///
/// # Errors
///
/// `Internal` when a part is missing.
fn finish_manifest(
    job: &Job,
    config: &ConvertConfig,
    out: &OutputLayout,
    now: Identity,
    done: &PartsDone<'_>,
    observer: &dyn Observer,
) -> Result<Finished> {
    let plan = &job.plan;
    if done.outcomes.len() != plan.parts.len() {
        return Err(Error::internal("a part was neither kept nor written"));
    }
    job.notice_overflow(done.stats, observer);
    let quant_report = job.quant_report(done.quant);
    let listed: Vec<ManifestPart> = plan
        .parts
        .iter()
        .zip(done.outcomes)
        .enumerate()
        .map(|(k, (p, o))| ManifestPart {
            file: o.file.clone(),
            bytes: o.bytes,
            xxh3_128: o.xxh3_128.clone(),
            first_row: p.rows.start as u64,
            rows: o.rows,
            row_groups: p.groups.end - p.groups.start,
            tensors: plan.part_tensors(k),
        })
        .collect();
    let mut metadata = job.metadata(config, out, done.stats, quant_report.as_ref())?;
    if let Some(o) = metadata.as_object_mut() {
        o.insert("parts".into(), to_json(&listed, "the parts")?);
    }
    let manifest = Manifest {
        format_version: format::FORMAT_VERSION.to_string(),
        identity: now,
        parts: listed,
        rows: plan.rows.len() as u64,
        index: to_json(TensorIndex::of(plan), "the tensor index")?,
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

/// Converts one part of a parted conversion (`config` must give `max_file_size`) into
/// `output/weights.parquet/`, and nothing else: no manifest, no side files, no lock.
/// A part is a pure function of the input, the options and `index`, so parts can be
/// converted in any order by independent processes (a cluster's workers) and committed
/// by one [`crate::convert`] with `resume` (which keeps them all and writes the
/// manifest and `metadata.json`). A part already there of the same plan that passes
/// its checks is kept (in object storage, where checking would read it back whole, it
/// is written again); a damaged one is written again.
///
/// # Errors
///
/// `InvalidOption` without `max_file_size` or for an index past the plan's parts;
/// `ResumeRefused` for a part of another plan at that name; every error of
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
    let output = Output::parse(output.as_ref())?;
    let job = Job::prepare(crate::source::open(input, config.source_options())?, config)?;
    let count = job.plan.parts.len();
    if index >= count {
        return Err(Error::option(format!(
            "part {index} does not exist: the plan has {count} parts (0 to {})",
            count - 1
        )));
    }
    let dest = output.open()?;
    let now = identity(&job, config)?;
    let slot = Slot {
        now: &now,
        index,
        count,
        rows: part_rows(&job.plan, index),
    };
    dest.make_dir(&parts_dir(), false)?;
    let status = match part_alone(dest.as_ref(), slot)? {
        Ok(kept) => {
            return Ok(PartOutcome {
                file: format::part_name(index, count),
                bytes: kept.bytes,
                rows: slot.rows,
                xxh3_128: kept.hash,
                status: PartStatus::Kept,
                e_tag: None,
            })
        }
        Err(status) => status,
    };
    let share = Share::new(&job.write_options(config))?;
    let part_job = part_job(&job, config, &now, &share);
    let (outcome, _) = write_part(&part_job, index, dest.as_ref(), status, 0, &Quiet)?;
    Ok(outcome)
}

/// What a part converted alone finds at its name: `Ok` a part of this plan to keep, or
/// `Err` the status of the part it writes.
///
/// # Errors
///
/// `ResumeRefused` for a part of another plan; `Io`/`Remote`.
fn part_alone(
    dest: &dyn Destination,
    slot: Slot<'_>,
) -> Result<std::result::Result<Kept, PartStatus>> {
    let name = format!(
        "{}{}",
        parts_dir(),
        format::part_name(slot.index, slot.count)
    );
    let Some(l) = dest.head(&name)? else {
        return Ok(Err(PartStatus::Written));
    };
    if let Some(why) = dest.redo_alone() {
        // Still refused when it is another plan's.
        if let Check::Keep(f) = dest.footer(&name, l.size)? {
            check_stamp(&dest.locate(&name), f.stamp.as_deref(), slot)?;
        }
        return Ok(Err(PartStatus::Redone { reason: why.into() }));
    }
    Ok(match check_part(dest, &name, &l, slot, None)? {
        Check::Keep(kept) => Ok(kept),
        Check::Redo(reason) => Err(PartStatus::Redone { reason }),
    })
}

/// Progress of a part converted alone: nobody watches it.
struct Quiet;

impl ProgressSink for Quiet {
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
    let dest = Output::parse(output.as_ref())?.open()?;
    dest.make_dir(&parts_dir(), false)?;
    let old = dest.get(&journal_name())?;
    let entries = merge_records(old.as_deref(), parts.iter().map(Recorded::from));
    let journal = journal_json(&entries)?;
    dest.stage(&journal_name(), Content::Bytes(journal.as_bytes()))?
        .commit()?;
    Ok(())
}

/// Gets `output` ready for parts converted elsewhere ([`convert_part`], on a cluster's
/// workers) and committed by a [`crate::convert`] with `resume`: refuses what the
/// destination cannot do (`validate` on an object store), and with `force` removes the
/// conversion there (`metadata.json`, then the weights, a file or parts), so that the
/// commit starts over.
///
/// # Errors
///
/// `InvalidOption`; `Io`/`Remote` naming what could not be removed.
pub fn prepare_parts(output: impl AsRef<Path>, config: &ConvertConfig) -> Result<()> {
    let output = Output::parse(output.as_ref())?;
    if config.validate && !output.is_local() {
        return Err(crate::write::dest::validate_refused());
    }
    if config.force {
        let dest = output.open()?;
        dest.remove(format::METADATA_FILE)?;
        if dest.head(format::WEIGHTS_FILE)?.is_some() {
            dest.remove(format::WEIGHTS_FILE)?;
        }
        dest.remove(&parts_dir())?;
    }
    Ok(())
}

/// Source bytes part `k` of `job`'s plan reads.
fn part_src_bytes(job: &Job, k: usize) -> u64 {
    job.plan.groups[job.plan.parts[k].groups.clone()]
        .iter()
        .map(|g| g.src_bytes)
        .sum()
}

/// Adds a part's stamped statistics to the conversion's.
fn merge_stamp(stamp: &PartStamp, stats: &mut [CastStats], quant: &mut [QuantError]) {
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
