//! A remote PyTorch zip checkpoint read by ranges: its end records, its central
//! directory, every entry's local header, and the `data.pkl` and `byteorder` entries
//! are fetched (nothing else: never a storage's bytes) into a sparse view of the whole
//! file, an anonymous mapping as long as the file whose other pages are never touched
//! (so never allocated). The local reader ([`super::super::torch::read`]) then runs on
//! the view unchanged: every check of a local `.bin` holds for a remote one, and the
//! storages it locates are read by range like a safetensors shard's tensors.
//!
//! The legacy format (torch < 1.6) is a stream of pickles with the storages after them:
//! nothing tells where a storage is without reading everything before it, so it is
//! refused remotely.
//!
//! # Memory
//!
//! The fetched bytes only: the directory (about 100 bytes an entry), a local header an
//! entry, and the pickle (a few MB for the largest models).

use std::ops::Range;
use std::path::Path;

use memmap2::{Mmap, MmapMut, MmapOptions};

use super::fetch::RemoteFile;
use crate::error::{Error, Result};
use crate::source::zip::{self, Archive};

/// Bytes fetched at each local header beyond its name (torch pads the extra field to
/// 64-byte alignment, so one read holds the header whole).
const LOCAL_SLACK: u64 = 30 + 256;

fn archive_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::InvalidArchive {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// The sparse view being filled.
struct View {
    map: MmapMut,
}

impl View {
    fn put(&mut self, at: u64, bytes: &[u8]) {
        let start = usize::try_from(at).unwrap_or(usize::MAX);
        if let Some(dst) = start
            .checked_add(bytes.len())
            .and_then(|end| self.map.get_mut(start..end))
        {
            dst.copy_from_slice(bytes);
        }
    }

    /// Fetches `ranges` (clamped to the file) into the view.
    fn fetch(&mut self, file: &RemoteFile, ranges: &[Range<u64>]) -> Result<()> {
        let clamped: Vec<Range<u64>> = ranges
            .iter()
            .map(|r| r.start.min(file.size)..r.end.min(file.size))
            .collect();
        for (at, bytes) in file.read_many(&clamped)? {
            self.put(at, &bytes);
        }
        Ok(())
    }
}

/// The parts of the zip checkpoint `file` that describe it, fetched into a sparse view
/// of the whole file, ready for the local reader.
///
/// # Errors
///
/// `InvalidArchive` for a legacy checkpoint or a damaged archive (what the local reader
/// would say of the same bytes), `Remote` or `SourceChanged` from the fetches.
pub(crate) fn view(file: &RemoteFile) -> Result<Mmap> {
    let path = Path::new(&file.url);
    let size = file.size;
    let len = usize::try_from(size).map_err(|_| archive_err(path, "too large for this host"))?;
    let head = file.read_direct(0..size.min(4))?;
    if !crate::source::torch::is_zip(&head) {
        return Err(archive_err(
            path,
            "a legacy (torch < 1.6) checkpoint: its storages follow a stream of pickles that \
             range reads cannot locate; download it, or re-save it with torch.save",
        ));
    }
    let map = MmapOptions::new()
        .len(len.max(1))
        .no_reserve_swap()
        .map_anon()
        .map_err(|e| Error::io("map a view of", path, e))?;
    let mut v = View { map };
    // The end record, its ZIP64 locator and record.
    let tail = size.saturating_sub(zip::TAIL_BYTES)..size;
    v.fetch(file, std::slice::from_ref(&tail))?;
    let tail_bytes = v.map.get(tail.start as usize..len).unwrap_or(&[]);
    if let Some((_, _, Some(rec))) = zip::locate(tail_bytes) {
        if rec < tail.start {
            v.fetch(file, std::slice::from_ref(&(rec..rec.saturating_add(56))))?;
        }
    }
    // The directory (the reader checks that it lies inside the file).
    if let Ok((_, dir_off, dir_len)) = zip::end_record(&v.map) {
        let end = dir_off.saturating_add(dir_len);
        if end <= size && dir_off < tail.start {
            v.fetch(file, std::slice::from_ref(&(dir_off..end.min(tail.start))))?;
        }
    }
    let archive = Archive::read(&v.map).map_err(|r| archive_err(path, r))?;
    // Every local header, then the small entries the reader reads whole.
    let headers: Vec<Range<u64>> = archive
        .entries
        .iter()
        .map(|e| e.local..e.local.saturating_add(LOCAL_SLACK + e.name.len() as u64))
        .collect();
    v.fetch(file, &headers)?;
    let mut longer = Vec::new();
    for (e, r) in archive.entries.iter().zip(&headers) {
        let at = usize::try_from(e.local).unwrap_or(usize::MAX);
        let field = |o: usize| {
            let b = v.map.get(at.checked_add(o)?..at.checked_add(o + 2)?)?;
            Some(u16::from_le_bytes([b[0], b[1]]) as u64)
        };
        if let (Some(n), Some(x)) = (field(26), field(28)) {
            let end = e.local.saturating_add(30 + n + x);
            if end > r.end {
                longer.push(r.end..end);
            }
        }
    }
    if !longer.is_empty() {
        v.fetch(file, &longer)?;
    }
    let small: Vec<Range<u64>> = archive
        .entries
        .iter()
        .filter(|e| e.name.ends_with("data.pkl") || e.name.ends_with("byteorder"))
        .filter_map(|e| Archive::data_range(&v.map, e).ok())
        .map(|(start, n)| start..start.saturating_add(n))
        .collect();
    v.fetch(file, &small)?;
    v.map
        .make_read_only()
        .map_err(|e| Error::io("map a view of", path, e))
}
