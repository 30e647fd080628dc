//! The parts of a parted output (`--max-file-size`), at any [`Destination`]: a part
//! written as a pure function of its index ([`write_part`]: the source, the plan, the
//! index and the destination, nothing of the conversion around it), a part an earlier
//! run left checked against this plan ([`check_part`]), and the journal that records
//! each part as it is written, so that `--resume` trusts it by its hash (or ETag)
//! instead of reading every row.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;
use serde_json::Value;

use super::dest::{parts_dir, Check, Destination, Recorded};
use super::{ProgressSink, Share, WeightWriter, WriteOptions};
use crate::cast::{CastStats, QuantError};
use crate::error::{Error, Result};
use crate::format::{self, Identity, Manifest, PartStamp};
use crate::io::Listed;
use crate::plan::Plan;
use crate::source::Source;

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

/// What writing any part of one plan needs: the input, the plan, who it is
/// ([`Identity`], stamped in every part), and how to write.
pub(crate) struct PartJob<'a> {
    /// The checkpoint.
    pub(crate) source: &'a Source,
    /// The plan, parted.
    pub(crate) plan: &'a Plan,
    /// The plan's identity.
    pub(crate) identity: &'a Identity,
    /// The writer's options.
    pub(crate) options: WriteOptions,
    /// Threads and kept buffers shared by every part.
    pub(crate) share: &'a Share,
    /// Set to stop.
    pub(crate) cancel: &'a AtomicBool,
}

/// A part's place in the plan: its name and rows.
pub(crate) fn part_rows(plan: &Plan, k: usize) -> u64 {
    let p = &plan.parts[k];
    (p.rows.end - p.rows.start) as u64
}

/// Writes part `k` of the plan at `dest`: its row groups, the footer with its stamp,
/// then committed (renamed into place, or its upload completed). `done` is the source
/// bytes converted before it, for `progress`.
///
/// # Errors
///
/// Every error of the writer; `Cancelled`; `Io`/`Remote` naming the part.
pub(crate) fn write_part(
    job: &PartJob<'_>,
    k: usize,
    dest: &dyn Destination,
    status: PartStatus,
    done: u64,
    progress: &dyn ProgressSink,
) -> Result<(PartOutcome, PartStamp)> {
    let plan = job.plan;
    let count = plan.parts.len();
    let part = &plan.parts[k];
    let file = format::part_name(k, count);
    let name = format!("{}{file}", parts_dir());
    let expected: u64 = plan.groups[part.groups.clone()]
        .iter()
        .map(|g| g.out_bytes)
        .sum();
    let out = dest.create(&name, expected)?;
    let mut writer =
        WeightWriter::create(out, &dest.locate(&name), job.options.clone(), job.share)?;
    let st = writer.write_groups(
        job.source,
        plan,
        part.groups.clone(),
        done,
        job.cancel,
        progress,
    )?;
    let stamp = stamp(plan, k, job.identity, &st.cast, &st.quant);
    let written = writer.finish(format::part_footer(plan, &stamp))?;
    if job.cancel.load(Ordering::Relaxed) {
        return Err(Error::Cancelled);
    }
    let bytes = written.file_bytes;
    let hash = written
        .content_hash
        .clone()
        .ok_or_else(|| Error::internal("a part was written without its content hash"))?;
    let e_tag = written.tmp.commit()?;
    dest.sync(&parts_dir());
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

/// The stamp of part `k`: which part of which plan it is, and what its cast saw.
fn stamp(
    plan: &Plan,
    k: usize,
    identity: &Identity,
    cast: &[CastStats],
    quant: &[QuantError],
) -> PartStamp {
    let part = &plan.parts[k];
    PartStamp {
        index: k,
        count: plan.parts.len(),
        first_row: part.rows.start as u64,
        rows: part_rows(plan, k),
        identity: identity.clone(),
        cast: cast
            .iter()
            .enumerate()
            .filter(|(_, s)| **s != CastStats::default())
            .map(|(t, s)| (t, s.nan, s.inf, s.overflow, s.max_overflow.to_bits()))
            .collect(),
        quant: quant
            .iter()
            .enumerate()
            .filter(|(_, q)| **q != QuantError::default())
            .map(|(t, q)| {
                let bits = (q.sum_x2.to_bits(), q.sum_e2.to_bits(), q.max_abs.to_bits());
                (t, bits.0, bits.1, bits.2, q.count)
            })
            .collect(),
    }
}

/// A part an earlier run left, checked and kept: its size, hash and what its cast saw.
pub(crate) struct Kept {
    /// Bytes of the part.
    pub(crate) bytes: u64,
    /// Its XXH3-128.
    pub(crate) hash: String,
    /// Its stamp.
    pub(crate) stamp: PartStamp,
}

/// Where a part stands in the plan `now`: its index, the plan's part count, its rows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Slot<'a> {
    /// The plan's identity.
    pub(crate) now: &'a Identity,
    /// Part index.
    pub(crate) index: usize,
    /// Parts in the plan.
    pub(crate) count: usize,
    /// Rows the plan gives it.
    pub(crate) rows: u64,
}

/// Checks the part `name` (as `listed`) at `dest` for `slot`: `Keep(kept)` to keep it,
/// `Redo(reason)` to convert it again, `Err` when it belongs to another plan
/// (resuming would mix two conversions).
///
/// # Errors
///
/// `ResumeRefused`; `Io`/`Remote` when it cannot be read.
pub(crate) fn check_part(
    dest: &dyn Destination,
    name: &str,
    listed: &Listed,
    slot: Slot<'_>,
    recorded: Option<&Recorded>,
) -> Result<Check<Kept>> {
    let footer = match dest.footer(name, listed.size)? {
        Check::Keep(f) => f,
        Check::Redo(why) => return Ok(Check::Redo(why)),
    };
    let stamp = match check_stamp(&dest.locate(name), footer.stamp.as_deref(), slot)? {
        Check::Keep(s) => s,
        Check::Redo(why) => return Ok(Check::Redo(why)),
    };
    if let Some(why) = wrong_rows(&footer.meta, slot.rows) {
        return Ok(Check::Redo(why));
    }
    Ok(match dest.content(name, listed, recorded)? {
        Check::Keep((bytes, hash)) => Check::Keep(Kept { bytes, hash, stamp }),
        Check::Redo(why) => Check::Redo(why),
    })
}

/// The stamp of the part at `path` (its footer's [`format::KEY_PART`] value): `Keep`
/// when it is the part `slot` names, `Redo(reason)` when it is another part of the
/// plan or damaged (to be converted again), `Err` when it belongs to another plan.
///
/// # Errors
///
/// `ResumeRefused` naming `path` and what differs.
pub(crate) fn check_stamp(
    path: &Path,
    value: Option<&str>,
    slot: Slot<'_>,
) -> Result<Check<PartStamp>> {
    let stamp: PartStamp = match value.map(serde_json::from_str::<PartStamp>) {
        Some(Ok(s)) => s,
        Some(Err(e)) => return Ok(Check::Redo(format!("its part stamp is damaged ({e})"))),
        None => return Ok(Check::Redo("it has no part stamp".into())),
    };
    if let Some(why) = differs(&stamp.identity, slot.now) {
        return Err(Error::ResumeRefused {
            path: path.to_path_buf(),
            reason: why,
        });
    }
    let (index, count, rows) = (slot.index, slot.count, slot.rows);
    if stamp.index != index || stamp.count != count || stamp.rows != rows {
        return Ok(Check::Redo(format!(
            "it holds part {} of {} ({} rows), not part {} of {count} ({rows} rows)",
            stamp.index + 1,
            stamp.count,
            stamp.rows,
            index + 1
        )));
    }
    Ok(Check::Keep(stamp))
}

/// Why a part whose footer is `meta` does not hold the `rows` the plan gives it (a
/// negative row count in its footer included), if it does not.
fn wrong_rows(meta: &parquet::file::metadata::ParquetMetaData, rows: u64) -> Option<String> {
    let mut held = 0u64;
    for g in meta.row_groups() {
        match u64::try_from(g.num_rows()) {
            Ok(n) => held = held.saturating_add(n),
            Err(_) => {
                return Some(format!(
                    "its footer gives a row group {} rows",
                    g.num_rows()
                ))
            }
        }
    }
    (held != rows).then(|| format!("it holds {held} rows, not {rows}"))
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
        return Some(format!(
            "it was converted with other options: {}",
            options_diff(&was.options, &now.options)
        ));
    }
    if was.plan != now.plan {
        return Some("its plan differs (another selection of tensors or rows)".into());
    }
    None
}

/// The options that differ between `was` and `now`: `key was (now now)`, by key.
fn options_diff(was: &Value, now: &Value) -> String {
    let (a, b) = (was.as_object(), now.as_object());
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
    diff.join(", ")
}

/// Refuses parts at `dest` (listed in `listed`) that this plan does not name (`names`):
/// with `resume`, saying what differs in the plan that wrote it; without, as an
/// existing conversion.
///
/// # Errors
///
/// `ResumeRefused`, `OutputExists`; `Io`/`Remote` when its footer cannot be read.
pub(crate) fn refuse_foreign(
    dest: &dyn Destination,
    listed: &BTreeMap<String, Listed>,
    names: &[String],
    now: &Identity,
    resume: bool,
) -> Result<()> {
    let foreign = listed
        .iter()
        .find(|(n, _)| n.starts_with("part-") && !names.contains(n));
    let Some((name, l)) = foreign else {
        return Ok(());
    };
    let full = format!("{}{name}", parts_dir());
    let path = dest.locate(&full);
    let why = match dest.footer(&full, l.size)? {
        Check::Keep(f) => f
            .stamp
            .and_then(|v| serde_json::from_str::<PartStamp>(&v).ok())
            .and_then(|s| differs(&s.identity, now)),
        Check::Redo(_) => None,
    };
    Err(match (resume, why) {
        (true, Some(reason)) => Error::ResumeRefused { path, reason },
        (true, None) => Error::ResumeRefused {
            path,
            reason: "this conversion plans no part of this name (another part count, or not a modelconv part)".into(),
        },
        (false, _) => Error::OutputExists { path },
    })
}

/// The journal of a parted conversion in progress, in `weights.parquet/`: every part
/// written so far with its size and XXH3-128 (and ETag), rewritten after each part, so
/// that `--resume` checks a part it lists by its hash instead of decompressing every
/// row. Removed once the manifest (which lists them all) is in.
pub(crate) const JOURNAL_FILE: &str = "_journal.json";

/// The journal's name at the destination.
pub(crate) fn journal_name() -> String {
    format!("{}{JOURNAL_FILE}", parts_dir())
}

/// The journal's text.
///
/// # Errors
///
/// `Internal` (serialising cannot fail).
pub(crate) fn journal_json(entries: &[Recorded]) -> Result<String> {
    serde_json::to_string(entries).map_err(|e| Error::internal(format!("{JOURNAL_FILE}: {e}")))
}

/// The journal `old` (if it reads) with `new` added, an entry of `new` replacing one of
/// the same file; sorted by file.
pub(crate) fn merge_records(
    old: Option<&[u8]>,
    new: impl Iterator<Item = Recorded>,
) -> Vec<Recorded> {
    let mut by_file: BTreeMap<String, Recorded> = old
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

/// The parts the journal, or else the manifest, at `dest` records, by name. Empty when
/// neither reads.
///
/// # Errors
///
/// `Remote` when the store cannot be read.
pub(crate) fn recorded(dest: &dyn Destination) -> Result<HashMap<String, Recorded>> {
    let journal = dest.get(&journal_name())?;
    let manifest = dest.get(&format!("{}{}", parts_dir(), format::MANIFEST_FILE))?;
    let from_journal = journal
        .as_deref()
        .and_then(|b| serde_json::from_slice::<Vec<Recorded>>(b).ok());
    let entries = from_journal.or_else(|| {
        let m: Manifest = serde_json::from_slice(manifest.as_deref()?).ok()?;
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
    Ok(entries
        .unwrap_or_default()
        .into_iter()
        .map(|r| (r.file.clone(), r))
        .collect())
}
