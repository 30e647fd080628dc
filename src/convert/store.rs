//! A conversion into object storage (`-o s3://BUCKET/PREFIX/`): the same objects a
//! local conversion writes as files, in the same order of commitment.
//!
//! - One file: `weights.parquet` streams out as a multipart upload and is completed once
//!   its footer is stored; then the side files; `metadata.json` last.
//! - Parts: each part is its own upload, completed when whole; after each, the journal
//!   (`weights.parquet/_journal.json`, every part so far with its size, XXH3-128 and
//!   ETag) is rewritten; then `_manifest.json`, the side files, and `metadata.json`.
//!
//! `metadata.json` goes first when an earlier conversion is replaced, and comes back
//! last: without it nothing is a conversion. An error or Ctrl-C aborts the open upload
//! (no object, no stored upload parts) and commits nothing after it. `--resume` lists the
//! parts there, reads each one's footer by range (its stamp must name this plan), and
//! keeps it when its size and ETag are those the journal recorded (a part listed only by
//! a manifest is hashed as it is read back); the rest are converted again.
//!
//! There is no lock: object stores have no advisory locks, so two conversions into one
//! prefix at once are the user's to avoid.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Instant;

use parquet::file::metadata::{FooterTail, ParquetMetaData, ParquetMetaDataReader};
use serde_json::Value;

use super::output::OutputLayout;
use super::parts::{
    self, check_stamp, differs, encode_part, finish_manifest, journal_json, part_src_bytes,
    recorded_in, tally, wrong_rows, Kept, PartOutcome, Recorded, Tally, JOURNAL_FILE,
};
use super::{Committed, ConversionReport, ConvertConfig, Job, Observer, ObserverSink, Outcome};
use crate::error::{Error, Result};
use crate::format;
use crate::write::object::{Listed, ObjectDir};
use crate::write::{Out, Share, WeightWriter};

/// The largest footer read back from a part (ours are a few MB for the largest models).
const MAX_FOOTER: u64 = 64 << 20;

/// Converts `job` into the object-store prefix `url`.
///
/// # Errors
///
/// `InvalidOption` for `--validate`; `OutputExists` without `force` or `resume`;
/// `ResumeRefused`; `Remote` naming the object a request failed on; every error of a
/// local conversion.
pub(super) fn convert(
    job: Job,
    url: &str,
    config: &ConvertConfig,
    observer: &dyn Observer,
    started: Instant,
) -> Result<ConversionReport> {
    if config.validate {
        return Err(Error::option(
            "--validate reads the output back from a local directory: it does not apply to \
             an object-store output (verify a downloaded copy with `modelconv verify`)",
        ));
    }
    let dest = ObjectDir::open(url)?;
    let out = OutputLayout::of(&dest.base(), &job.source, &job.files, config);
    let old_meta = dest.get(format::METADATA_FILE)?;
    if !config.force && !config.resume {
        let parted = dest.list(&parts_dir())?;
        let there = if old_meta.is_some() {
            Some(format::METADATA_FILE.to_string())
        } else if dest.head(format::WEIGHTS_FILE)?.is_some() {
            Some(format::WEIGHTS_FILE.to_string())
        } else {
            parted.keys().next().map(|n| format!("{}{n}", parts_dir()))
        };
        if let Some(name) = there {
            return Err(Error::OutputExists {
                path: dest.url(&name).into(),
            });
        }
    }
    let written = if job.plan.parted {
        write_parts(&job, &out, &dest, config, observer, old_meta.as_deref())?
    } else {
        write_one(&job, &out, &dest, config, observer, old_meta.as_deref())?
    };
    let Committed {
        file_bytes,
        metadata,
        quant,
        parts,
    } = written;
    let outcome = Outcome {
        file_bytes,
        metadata,
        validation_passed: None,
        quantization: quant,
        parts,
    };
    Ok(job.report(&out, outcome, started))
}

/// `weights.parquet/`, the parts' prefix.
fn parts_dir() -> String {
    format!("{}/", format::WEIGHTS_FILE)
}

/// Deletes every object below `dir` (a name ending with `/`).
fn delete_below(dest: &ObjectDir, dir: &str) -> Result<()> {
    for name in dest.list(dir)?.keys() {
        dest.delete(&format!("{dir}{name}"))?;
    }
    Ok(())
}

/// A weight writer streaming into a new upload of `name`, a file of about `expected`
/// bytes.
fn upload_writer(
    dest: &ObjectDir,
    name: &str,
    expected: u64,
    job: &Job,
    config: &ConvertConfig,
    share: &Share,
) -> Result<WeightWriter> {
    let upload = dest.upload(name, expected)?;
    let target = std::path::PathBuf::from(upload.url());
    WeightWriter::create_on(
        Out::Object(upload),
        &target,
        job.write_options(config),
        share,
    )
}

/// Writes the side files, removes what an earlier conversion (whose `metadata.json`
/// was `old_meta`) wrote and this one does not, then writes `metadata.json`.
fn commit_side_files(
    dest: &ObjectDir,
    out: &OutputLayout,
    metadata: &Value,
    old_meta: Option<&[u8]>,
) -> Result<()> {
    for (from, name) in out.copied_names() {
        let bytes = std::fs::read(&from).map_err(|e| Error::io("read", &from, e))?;
        dest.put(&name, bytes)?;
    }
    for stale in out.stale_names(old_meta) {
        dest.delete(&stale)?;
        delete_below(dest, &format!("{stale}/"))?;
    }
    let text = serde_json::to_string_pretty(metadata)
        .map_err(|e| Error::internal(format!("metadata.json: {e}")))?;
    dest.put(format::METADATA_FILE, text.into_bytes())?;
    Ok(())
}

/// One weight file: streamed up, completed, then the side files and `metadata.json`.
fn write_one(
    job: &Job,
    out: &OutputLayout,
    dest: &ObjectDir,
    config: &ConvertConfig,
    observer: &dyn Observer,
    old_meta: Option<&[u8]>,
) -> Result<Committed> {
    job.notify(observer, &[]);
    // Nothing there is a conversion from here on; a parted output there goes (--force).
    dest.delete(format::METADATA_FILE)?;
    delete_below(dest, &parts_dir())?;
    let share = Share::new(&job.write_options(config))?;
    let writer = upload_writer(
        dest,
        format::WEIGHTS_FILE,
        job.plan.out_bytes(),
        job,
        config,
        &share,
    )?;
    let (written, metadata, quant) = super::write_one(job, writer, out, config, observer)?;
    if config.cancel.load(Ordering::Relaxed) {
        return Err(Error::Cancelled);
    }
    written.tmp.commit()?;
    commit_side_files(dest, out, &metadata, old_meta)?;
    Ok(Committed {
        file_bytes: written.file_bytes,
        metadata,
        quant,
        parts: Vec::new(),
    })
}

/// The footer of the part `name` (`size` bytes), read by two ranges: its stamp's value
/// and its metadata, or why it is not a readable part.
fn read_footer(
    dest: &ObjectDir,
    name: &str,
    size: u64,
) -> Result<std::result::Result<(Option<String>, ParquetMetaData), String>> {
    if size < 12 {
        return Ok(Err(format!("{size} bytes: not a Parquet file")));
    }
    let tail = dest.get_range(name, size - 8..size)?;
    let Ok(tail) = <[u8; 8]>::try_from(tail.as_ref()) else {
        return Ok(Err("the server sent a short footer".into()));
    };
    let len = match FooterTail::try_new(&tail) {
        Ok(t) => t.metadata_length() as u64,
        Err(e) => return Ok(Err(format!("not a Parquet file ({e})"))),
    };
    if len > MAX_FOOTER || len + 8 > size {
        return Ok(Err(format!(
            "its footer length ({len} bytes) is not plausible"
        )));
    }
    let buf = dest.get_range(name, size - 8 - len..size - 8)?;
    let meta = match ParquetMetaDataReader::decode_metadata(&buf) {
        Ok(m) => m,
        Err(e) => return Ok(Err(format!("its footer is unreadable ({e})"))),
    };
    let stamp = meta
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|k| k.key == format::KEY_PART))
        .and_then(|k| k.value.clone());
    Ok(Ok((stamp, meta)))
}

/// Checks the part object `name` (as `listed`) for part `k` of this plan: `Ok(Ok)` to
/// keep it, `Ok(Err(reason))` to convert it again, `Err` when it belongs to another
/// plan.
#[allow(clippy::too_many_arguments)]
fn check_part(
    dest: &ObjectDir,
    name: &str,
    listed: &Listed,
    now: &format::Identity,
    k: usize,
    count: usize,
    rows: u64,
    recorded: Option<&Recorded>,
) -> Result<std::result::Result<Kept, String>> {
    let (value, meta) = match read_footer(dest, name, listed.size)? {
        Ok(f) => f,
        Err(why) => return Ok(Err(why)),
    };
    let url = dest.url(name);
    let stamp = match check_stamp(Path::new(&url), value.as_deref(), now, k, count, rows)? {
        Ok(s) => s,
        Err(why) => return Ok(Err(why)),
    };
    if let Some(why) = wrong_rows(&meta, rows) {
        return Ok(Err(why));
    }
    let Some(r) = recorded else {
        return Ok(Err(
            "the journal does not record it (it was completed as the run stopped)".into(),
        ));
    };
    let (bytes, hash) = match &r.e_tag {
        // Recorded with its ETag: the object is the one this conversion stored.
        Some(tag) if Some(tag) == listed.e_tag.as_ref() && r.bytes == listed.size => {
            (r.bytes, r.xxh3_128.clone())
        }
        Some(tag) => {
            return Ok(Err(format!(
            "it changed since it was written ({} bytes, ETag {}; recorded {} bytes, ETag {tag})",
            listed.size,
            listed.e_tag.as_deref().unwrap_or("none"),
            r.bytes
        )))
        }
        // Recorded by a manifest only: its content is hashed as it is read back.
        None => dest.hash(name)?,
    };
    if bytes != r.bytes || hash != r.xxh3_128 {
        return Ok(Err(format!(
            "its content differs from the one recorded when it was written ({bytes} bytes, XXH3-128 {hash}; recorded {} bytes, {})",
            r.bytes, r.xxh3_128
        )));
    }
    Ok(Ok(Kept { bytes, hash, stamp }))
}

/// Converts part `k` of `job`'s plan into a new upload of its object under `dest`,
/// completed when whole.
///
/// # Errors
///
/// `Remote` naming the object; every error of the writer.
#[allow(clippy::too_many_arguments)]
fn upload_part(
    job: &Job,
    dest: &ObjectDir,
    config: &ConvertConfig,
    share: &Share,
    k: usize,
    now: &format::Identity,
    status: parts::PartStatus,
    done: u64,
    sink: &dyn crate::write::ProgressSink,
) -> Result<(PartOutcome, format::PartStamp)> {
    let plan = &job.plan;
    let file = format::part_name(k, plan.parts.len());
    let expected: u64 = plan.groups[plan.parts[k].groups.clone()]
        .iter()
        .map(|g| g.out_bytes)
        .sum();
    let writer = upload_writer(
        dest,
        &format!("{}{file}", parts_dir()),
        expected,
        job,
        config,
        share,
    )?;
    let (written, stamp) = encode_part(job, config, writer, k, now, done, sink)?;
    let (bytes, hash) = (
        written.file_bytes,
        written.content_hash.clone().unwrap_or_default(),
    );
    let e_tag = written.tmp.commit()?;
    let outcome = PartOutcome {
        file,
        bytes,
        rows: stamp.rows,
        xxh3_128: hash,
        status,
        e_tag,
    };
    Ok((outcome, stamp))
}

/// Parts: those missing (all, unless resuming) streamed up one by one, the journal after
/// each, then the manifest, the side files and `metadata.json`.
fn write_parts(
    job: &Job,
    out: &OutputLayout,
    dest: &ObjectDir,
    config: &ConvertConfig,
    observer: &dyn Observer,
    old_meta: Option<&[u8]>,
) -> Result<Committed> {
    job.notify(observer, &[]);
    let plan = &job.plan;
    let now = parts::identity(job, config);
    let pdir = parts_dir();
    if dest.head(format::WEIGHTS_FILE)?.is_some() {
        if config.resume {
            return Err(Error::ResumeRefused {
                path: dest.url(format::WEIGHTS_FILE).into(),
                reason: "it is a single-file conversion, not parts".into(),
            });
        }
        // --force: its metadata.json first, so nothing looks complete.
        dest.delete(format::METADATA_FILE)?;
        dest.delete(format::WEIGHTS_FILE)?;
    }
    let mut listed = dest.list(&pdir)?;
    if !config.resume {
        dest.delete(format::METADATA_FILE)?;
        for name in listed.keys() {
            dest.delete(&format!("{pdir}{name}"))?;
        }
        listed.clear();
    }
    let count = plan.parts.len();
    let names: Vec<String> = (0..count).map(|k| format::part_name(k, count)).collect();
    // A part of another count or plan would be mixed in by a dataset reader.
    let foreign = listed
        .iter()
        .find(|(n, _)| n.starts_with("part-") && !names.contains(n));
    if let Some((name, l)) = foreign {
        let full = format!("{pdir}{name}");
        let why = match read_footer(dest, &full, l.size)? {
            Ok((Some(v), _)) => serde_json::from_str::<format::PartStamp>(&v)
                .ok()
                .and_then(|s| differs(&s.identity, &now)),
            _ => None,
        };
        return Err(Error::ResumeRefused {
            path: dest.url(&full).into(),
            reason: why.unwrap_or_else(|| {
                "this conversion plans no part of this name (another part count, or not a modelconv part)".into()
            }),
        });
    }
    let recorded = if config.resume {
        let journal = dest.get(&format!("{pdir}{JOURNAL_FILE}"))?;
        let manifest = dest.get(&format!("{pdir}{}", format::MANIFEST_FILE))?;
        recorded_in(journal.as_deref(), manifest.as_deref())
    } else {
        Default::default()
    };
    let mut checked = Vec::with_capacity(count);
    for (k, part) in plan.parts.iter().enumerate() {
        let rows = (part.rows.end - part.rows.start) as u64;
        checked.push(match listed.get(&names[k]) {
            Some(l) => {
                let full = format!("{pdir}{}", names[k]);
                let r = recorded.get(&names[k]);
                Some(check_part(dest, &full, l, &now, k, count, rows, r)?)
            }
            None => None,
        });
    }
    let Tally {
        mut outcomes,
        mut stats,
        mut quant,
        todo,
    } = tally(job, &names, checked);
    // Every kept part checked: not a conversion until the manifest and metadata.json
    // are written again.
    dest.delete(format::METADATA_FILE)?;
    dest.delete(&format!("{pdir}{}", format::MANIFEST_FILE))?;
    // The journal lists the kept parts (with their ETags) and each part written.
    let mut journal: Vec<Recorded> = outcomes
        .iter()
        .flatten()
        .map(|o| Recorded {
            e_tag: listed.get(&o.file).and_then(|l| l.e_tag.clone()),
            ..Recorded::from(o)
        })
        .collect();
    let total = parts::announce(job, &outcomes, observer);
    let sink = ObserverSink {
        observer,
        total,
        source: &job.source,
    };
    let share = Share::new(&job.write_options(config))?;
    let mut done = 0u64;
    for (k, status) in todo {
        let (outcome, stamp) =
            upload_part(job, dest, config, &share, k, &now, status, done, &sink)?;
        done += part_src_bytes(job, k);
        parts::merge_stamp(&stamp, &mut stats, &mut quant);
        journal.push(Recorded::from(&outcome));
        dest.put(
            &format!("{pdir}{JOURNAL_FILE}"),
            journal_json(&journal)?.into_bytes(),
        )?;
        outcomes[k] = Some(outcome);
    }
    let outcomes: Vec<PartOutcome> = outcomes.into_iter().flatten().collect();
    let fin = finish_manifest(job, config, out, now, &outcomes, &stats, &quant, observer)?;
    if config.cancel.load(Ordering::Relaxed) {
        return Err(Error::Cancelled);
    }
    dest.put(
        &format!("{pdir}{}", format::MANIFEST_FILE),
        fin.manifest.into_bytes(),
    )?;
    // The manifest records every part: the journal is done.
    dest.delete(&format!("{pdir}{JOURNAL_FILE}"))?;
    commit_side_files(dest, out, &fin.metadata, old_meta)?;
    let file_bytes = outcomes.iter().map(|o| o.bytes).sum();
    Ok(Committed {
        file_bytes,
        metadata: fin.metadata,
        quant: fin.quant,
        parts: outcomes,
    })
}

/// Converts part `index` of `job`'s plan into the object-store prefix `url`, and nothing
/// else (see [`super::convert_part`]). A part object already there of this plan is
/// converted again: checking it would read it back whole, and the new one is the same
/// bytes. One of another plan is refused.
///
/// # Errors
///
/// `ResumeRefused` for a part object of another plan at that name; `Remote`; every
/// error of the writer.
pub(super) fn convert_part(
    job: &Job,
    url: &str,
    config: &ConvertConfig,
    index: usize,
) -> Result<PartOutcome> {
    let dest = ObjectDir::open(url)?;
    let plan = &job.plan;
    let count = plan.parts.len();
    let now = parts::identity(job, config);
    let file = format::part_name(index, count);
    let name = format!("{}{file}", parts_dir());
    let rows = (plan.parts[index].rows.end - plan.parts[index].rows.start) as u64;
    let status = match dest.head(&name)? {
        None => parts::PartStatus::Written,
        Some(l) => {
            if let Ok((value, _)) = read_footer(&dest, &name, l.size)? {
                let at = dest.url(&name);
                check_stamp(Path::new(&at), value.as_deref(), &now, index, count, rows)?.ok();
            }
            parts::PartStatus::Redone {
                reason: "a part in object storage is written again (checking it would read it back whole)".into(),
            }
        }
    };
    let share = Share::new(&job.write_options(config))?;
    let (outcome, _) = upload_part(
        job,
        &dest,
        config,
        &share,
        index,
        &now,
        status,
        0,
        &parts::Quiet,
    )?;
    Ok(outcome)
}

/// Adds `records` to the journal of the parted output at `url` (see
/// [`super::record_parts`]).
///
/// # Errors
///
/// `Remote` naming the journal.
pub(super) fn record_parts(url: &str, records: impl Iterator<Item = Recorded>) -> Result<()> {
    let dest = ObjectDir::open(url)?;
    let name = format!("{}{JOURNAL_FILE}", parts_dir());
    let old = dest.get(&name)?;
    let entries = parts::merge_records(old.as_deref(), records);
    dest.put(&name, journal_json(&entries)?.into_bytes())?;
    Ok(())
}
