//! The zip directory of a PyTorch checkpoint, read from the mapped bytes without
//! extracting anything: each entry's name and the byte range of its (stored) data.
//!
//! Checks, in order: the end-of-central-directory record (and its ZIP64 form), every
//! central entry inside the file, names that are plain relative paths, no duplicates,
//! and for each entry that is used, its local header agreeing with the central one.

use std::collections::HashMap;

/// End of central directory record signature and minimum size.
const EOCD_SIG: u32 = 0x0605_4b50;
const EOCD_LEN: usize = 22;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const LOCAL_SIG: u32 = 0x0403_4b50;
/// Entries accepted in one archive (a 70B shard has a few hundred storages).
const MAX_ENTRIES: u64 = 10_000_000;

/// One entry of the central directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) name: String,
    /// Compression method (0 = stored).
    pub(crate) method: u16,
    pub(crate) compressed: u64,
    pub(crate) size: u64,
    /// Offset of the local header.
    pub(crate) local: u64,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// The central directory of the archive in `b`.
#[derive(Debug)]
pub(crate) struct Archive {
    pub(crate) entries: Vec<Entry>,
    /// Entry index by name.
    by_name: std::collections::HashMap<String, usize>,
}

impl Archive {
    /// Reads the central directory.
    ///
    /// # Errors
    ///
    /// A sentence saying what is wrong (truncated, no directory, bad names, ...).
    pub(crate) fn read(b: &[u8]) -> Result<Archive, String> {
        let (count, dir_off, dir_len) = end_record(b)?;
        if count > MAX_ENTRIES {
            return Err(format!("{count} entries is more than {MAX_ENTRIES}"));
        }
        let dir_end = dir_off
            .checked_add(dir_len)
            .filter(|&e| e <= b.len() as u64)
            .ok_or("the central directory lies outside the file (truncated?)")?;
        let mut at = usize::try_from(dir_off).map_err(|_| "directory offset too large")?;
        let mut entries = Vec::new();
        let mut names = HashMap::new();
        for i in 0..count {
            if at as u64 >= dir_end || u32_at(b, at) != Some(CENTRAL_SIG) {
                return Err(format!("central directory entry {i} is damaged"));
            }
            let field = |o: usize| u16_at(b, at + o).ok_or("truncated directory entry");
            let (method, name_len, extra_len, comment_len) = (
                field(10)?,
                field(28)? as usize,
                field(30)? as usize,
                field(32)? as usize,
            );
            let mut compressed = u32_at(b, at + 20).ok_or("truncated directory entry")? as u64;
            let mut size = u32_at(b, at + 24).ok_or("truncated directory entry")? as u64;
            let mut local = u32_at(b, at + 42).ok_or("truncated directory entry")? as u64;
            let name_at = at + 46;
            let name = b
                .get(name_at..name_at + name_len)
                .ok_or("truncated directory entry")?;
            let name = std::str::from_utf8(name)
                .map_err(|_| format!("entry {i} has a name that is not UTF-8"))?
                .to_string();
            let extra = b
                .get(name_at + name_len..name_at + name_len + extra_len)
                .ok_or("truncated directory entry")?;
            zip64_sizes(extra, &mut size, &mut compressed, &mut local)?;
            check_name(&name)?;
            if names.insert(name.clone(), entries.len()).is_some() {
                return Err(format!(
                    "entry `{}` appears twice",
                    crate::error::sanitize(&name)
                ));
            }
            entries.push(Entry {
                name,
                method,
                compressed,
                size,
                local,
            });
            at = name_at + name_len + extra_len + comment_len;
        }
        Ok(Archive {
            entries,
            by_name: names,
        })
    }

    /// The entry called `name`.
    pub(crate) fn entry(&self, name: &str) -> Option<&Entry> {
        self.by_name.get(name).map(|&i| &self.entries[i])
    }

    /// The byte range of `e`'s data inside `b`, from its local header: stored (not
    /// compressed), sizes agreeing, inside the file.
    pub(crate) fn data_range(b: &[u8], e: &Entry) -> Result<(u64, u64), String> {
        let name = crate::error::sanitize(&e.name);
        if e.method != 0 {
            return Err(format!(
                "entry `{name}` is compressed (method {}); torch writes stored entries: re-save the checkpoint with torch.save",
                e.method
            ));
        }
        if e.compressed != e.size {
            return Err(format!("entry `{name}`: stored sizes disagree"));
        }
        let at = usize::try_from(e.local).map_err(|_| format!("entry `{name}`: bad offset"))?;
        if u32_at(b, at) != Some(LOCAL_SIG) {
            return Err(format!("entry `{name}`: no local header at byte {at}"));
        }
        let name_len = u16_at(b, at + 26).ok_or("truncated local header")? as u64;
        let extra_len = u16_at(b, at + 28).ok_or("truncated local header")? as u64;
        let start = e.local + 30 + name_len + extra_len;
        let end = start
            .checked_add(e.size)
            .filter(|&end| end <= b.len() as u64)
            .ok_or_else(|| format!("entry `{name}` runs past the end of the file (truncated?)"))?;
        Ok((start, end - start))
    }
}

/// Bytes at the end of an archive that hold its end record, its ZIP64 locator and
/// (as torch writes it) its ZIP64 end record: what a reader by ranges fetches first.
#[cfg(feature = "remote")]
pub(crate) const TAIL_BYTES: u64 = (EOCD_LEN + 0xffff + 20 + 56) as u64;

/// The offset of the end record in `b` (an archive, or its last bytes).
fn end_record_at(b: &[u8]) -> Result<usize, String> {
    if b.len() < EOCD_LEN {
        return Err("too short to be a zip archive".into());
    }
    // The record is the last 22 bytes unless a comment (at most 64 KiB) follows it.
    let lowest = b.len().saturating_sub(EOCD_LEN + 0xffff);
    (lowest..=b.len() - EOCD_LEN)
        .rev()
        .find(|&i| u32_at(b, i) == Some(EOCD_SIG))
        .ok_or_else(|| "no end of central directory (truncated, or not a zip archive)".into())
}

/// Where the directory of the archive whose last bytes are `tail` is: `(offset,
/// length)`, and the offset of its ZIP64 end record when it has one (which a reader by
/// ranges needs before [`end_record`] can read it). `None` when `tail` has no end
/// record.
#[cfg(feature = "remote")]
pub(crate) fn locate(tail: &[u8]) -> Option<(u64, u64, Option<u64>)> {
    let at = end_record_at(tail).ok()?;
    let dir_len = u32_at(tail, at + 12)? as u64;
    let dir_off = u32_at(tail, at + 16)? as u64;
    let loc = at.checked_sub(20);
    let zip64 = loc
        .filter(|&l| u32_at(tail, l) == Some(ZIP64_LOCATOR_SIG))
        .and_then(|l| u64_at(tail, l + 8));
    Some((dir_off, dir_len, zip64))
}

/// `(entries, directory offset, directory length)` from the end record.
pub(crate) fn end_record(b: &[u8]) -> Result<(u64, u64, u64), String> {
    let at = end_record_at(b)?;
    let count = u16_at(b, at + 10).ok_or("truncated end record")? as u64;
    let dir_len = u32_at(b, at + 12).ok_or("truncated end record")? as u64;
    let dir_off = u32_at(b, at + 16).ok_or("truncated end record")? as u64;
    if count != 0xffff && dir_len != 0xffff_ffff && dir_off != 0xffff_ffff {
        return Ok((count, dir_off, dir_len));
    }
    // ZIP64: the locator sits just before the end record.
    let loc = at.checked_sub(20).ok_or("ZIP64 locator missing")?;
    if u32_at(b, loc) != Some(ZIP64_LOCATOR_SIG) {
        return Err("ZIP64 locator missing".into());
    }
    let rec = u64_at(b, loc + 8).ok_or("truncated ZIP64 locator")?;
    let rec = usize::try_from(rec).map_err(|_| "ZIP64 record offset too large")?;
    if u32_at(b, rec) != Some(ZIP64_EOCD_SIG) {
        return Err("ZIP64 end record missing".into());
    }
    let count = u64_at(b, rec + 32).ok_or("truncated ZIP64 end record")?;
    let dir_len = u64_at(b, rec + 40).ok_or("truncated ZIP64 end record")?;
    let dir_off = u64_at(b, rec + 48).ok_or("truncated ZIP64 end record")?;
    Ok((count, dir_off, dir_len))
}

/// Replaces saturated 32-bit fields with the ZIP64 extra field's values, in the order
/// the format gives them (size, compressed size, local header offset).
fn zip64_sizes(
    extra: &[u8],
    size: &mut u64,
    comp: &mut u64,
    local: &mut u64,
) -> Result<(), String> {
    let mut at = 0;
    while at + 4 <= extra.len() {
        let id = u16_at(extra, at).unwrap_or(0);
        let len = u16_at(extra, at + 2).unwrap_or(0) as usize;
        let body = extra
            .get(at + 4..at + 4 + len)
            .ok_or("damaged extra field")?;
        if id == 0x0001 {
            let mut p = 0;
            for v in [size, comp, local] {
                if *v == 0xffff_ffff {
                    *v = u64_at(body, p).ok_or("damaged ZIP64 extra field")?;
                    p += 8;
                }
            }
            return Ok(());
        }
        at += 4 + len;
    }
    Ok(())
}

/// A name must be a plain relative path: nothing is extracted, but a name that could
/// leave a directory says the archive was not written by torch.
fn check_name(name: &str) -> Result<(), String> {
    let bad = name.is_empty()
        || name.starts_with('/')
        || name.starts_with('\\')
        || name.contains('\0')
        || name.contains('\\')
        || name.split('/').any(|c| c == "..")
        || name.get(1..2) == Some(":");
    if bad {
        return Err(format!(
            "entry name `{}` is not a plain relative path",
            crate::error::sanitize(name)
        ));
    }
    Ok(())
}
