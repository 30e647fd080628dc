//! A parted output (`--max-file-size`): the `weights.parquet/` directory of part files
//! and their manifest, read as one weight file. Each part is opened as a single file
//! ([`super::file`]) and checked to be of the manifest's conversion and to hold the rows
//! the manifest says, in order.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::file::{add_rows, open_part, PartFile};
use super::{RangeLog, WeightFile};
use crate::error::{sanitize, Error, Result};
use crate::format::{self, Manifest};

/// Whether directory `dir` is a parted output's `weights.parquet/` (complete or not):
/// named so, or holding a manifest or part files.
pub(super) fn is_parted(dir: &Path) -> bool {
    if dir.file_name().is_some_and(|n| n == format::WEIGHTS_FILE)
        || dir.join(format::MANIFEST_FILE).exists()
    {
        return true;
    }
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with("part-") && n.ends_with(".parquet")
        })
    })
}

impl WeightFile {
    /// Opens a parted output's directory: its manifest, then every part it lists, each
    /// checked to be of the manifest's conversion and to hold the rows it says.
    pub(super) fn open_parted(dir: PathBuf, log: Option<RangeLog>) -> Result<WeightFile> {
        let mpath = dir.join(format::MANIFEST_FILE);
        let manifest = read_manifest(&dir, &mpath)?;
        let mut parts = Vec::with_capacity(manifest.parts.len());
        let mut kv = HashMap::new();
        let mut row = 0u64;
        for (k, mp) in manifest.parts.iter().enumerate() {
            let (part, pkv) = open_listed(&dir, &mpath, &manifest, k, log.clone())?;
            // Checked at open to add up within 64 bits.
            let held: u64 = part.rg_rows.iter().sum();
            if held != mp.rows || mp.first_row != row {
                return Err(Error::corrupt(
                    &part.path,
                    None,
                    format!(
                        "the part holds {held} rows, the manifest says {} from row {}",
                        mp.rows, mp.first_row
                    ),
                ));
            }
            row = add_rows(&mpath, row, held)?;
            if k == 0 {
                kv = pkv;
            }
            parts.push(part);
        }
        if row != manifest.rows {
            return Err(Error::corrupt(
                &mpath,
                None,
                format!(
                    "the parts hold {row} rows, the manifest says {}",
                    manifest.rows
                ),
            ));
        }
        kv.remove(format::KEY_PART);
        kv.insert(
            format::KEY_METADATA.to_string(),
            manifest.metadata.to_string(),
        );
        let index = manifest.index.to_string();
        kv.insert(format::KEY_INDEX.to_string(), index.clone());
        let mut wf = Self::assemble(dir, parts, kv)?;
        let tensors = format::parse_index(&wf.path, &index, row)?;
        wf.set_tensors(tensors)?;
        Ok(wf)
    }
}

/// Reads the manifest `mpath` of the parted output `dir`; its absence means the
/// conversion did not finish.
fn read_manifest(dir: &Path, mpath: &Path) -> Result<Manifest> {
    let text = std::fs::read(mpath).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::corrupt(
                dir,
                None,
                format!(
                    "a directory without {}: not a complete conversion (an interrupted parted conversion finishes with --resume)",
                    format::MANIFEST_FILE
                ),
            )
        } else {
            Error::io("read", mpath, e)
        }
    })?;
    let manifest: Manifest = serde_json::from_slice(&text)
        .map_err(|e| Error::corrupt(mpath, None, format!("damaged manifest: {e}")))?;
    if manifest.parts.is_empty() {
        return Err(Error::corrupt(mpath, None, "the manifest lists no part"));
    }
    Ok(manifest)
}

/// Opens part `k` of the manifest `mpath` of the parted output `dir`, checking that
/// its name is a plain file name and that its stamp is of the manifest's conversion, at
/// that position. Returns it with its key-value metadata.
fn open_listed(
    dir: &Path,
    mpath: &Path,
    manifest: &Manifest,
    k: usize,
    log: Option<RangeLog>,
) -> Result<(PartFile, HashMap<String, String>)> {
    let mp = &manifest.parts[k];
    let plain = Path::new(&mp.file)
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !plain || mp.file.contains('/') {
        return Err(Error::corrupt(
            mpath,
            None,
            format!("part name `{}` is not a file name", sanitize(&mp.file)),
        ));
    }
    let p = dir.join(&mp.file);
    let (part, pkv) = open_part(&p, log)?;
    let stamp: Option<format::PartStamp> = pkv
        .get(format::KEY_PART)
        .and_then(|s| serde_json::from_str(s).ok());
    let ours = stamp.as_ref().is_some_and(|s| {
        s.identity == manifest.identity && s.index == k && s.count == manifest.parts.len()
    });
    if !ours {
        return Err(Error::corrupt(
            &p,
            None,
            "this part is not of the conversion the manifest describes",
        ));
    }
    Ok((part, pkv))
}
