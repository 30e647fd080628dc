//! One Parquet file of a weight file (the whole file, or one part of a parted output):
//! mapped, its footer read, and its offset index checked before it is trusted. Also the
//! guard that turns a panic inside the parquet crate into an error naming the file.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
use parquet::arrow::ProjectionMask;
use parquet::file::metadata::{PageIndexPolicy, ParquetMetaData};

use super::io::{MappedFile, RangeLog};
use crate::error::{Error, Result};
use crate::format;

/// Runs a Parquet call, turning a panic inside the parquet crate into an `Internal`
/// error naming the file (and the tensor).
pub(super) fn guard<T>(
    path: &Path,
    tensor: Option<&str>,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            // The parquet crate panicked on this file: reported as a bug (ours to wrap,
            // or the crate's), never as a clean rejection.
            let at = match tensor {
                Some(t) => format!("{}, tensor `{}`", path.display(), crate::error::sanitize(t)),
                None => path.display().to_string(),
            };
            Err(Error::internal(format!(
                "{at}: the parquet reader panicked: {msg}"
            )))
        }
    }
}

/// One Parquet file of a weight file: the whole of it, or one part of a parted output.
#[derive(Debug, Clone)]
pub(super) struct PartFile {
    /// The file.
    pub(super) path: PathBuf,
    /// Its mapping.
    pub(super) file: MappedFile,
    /// Its footer.
    pub(super) meta: ArrowReaderMetadata,
}

/// Opens one Parquet weight file (the whole, or a part): mapped, its footer read and
/// checked, the seed's columns present. Returns it with its key-value metadata.
pub(super) fn open_part(
    path: &Path,
    log: Option<RangeLog>,
) -> Result<(PartFile, HashMap<String, String>)> {
    let mut file = MappedFile::open(path)?;
    if let Some(l) = log {
        file = file.with_log(l);
    }
    let p = path.to_path_buf();
    let meta = guard(path, None, || {
        let opts = ArrowReaderOptions::new()
            .with_offset_index_policy(PageIndexPolicy::Optional)
            .with_column_index_policy(PageIndexPolicy::Skip);
        ArrowReaderMetadata::load(&file, opts)
            .map_err(|e| Error::corrupt(&p, None, format!("not a readable Parquet file: {e}")))
    })?;
    let file_len = std::fs::metadata(path)
        .map_err(|e| Error::io("stat", path, e))?
        .len();
    check_offset_index(path, meta.metadata(), file_len)?;
    let schema = meta.schema().clone();
    for (col, want) in [
        (format::COL_NAME, "utf8"),
        (format::COL_SHAPE, "list<int32>"),
        (format::COL_DTYPE, "utf8"),
        (format::COL_DATA, "binary"),
    ] {
        if schema.field_with_name(col).is_err() {
            return Err(Error::corrupt(
                path,
                None,
                format!("not a weight file: no `{col}` column ({want})"),
            ));
        }
    }
    let kv: HashMap<String, String> = meta
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .map(|kv| {
            kv.iter()
                .map(|k| (k.key.clone(), k.value.clone().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    Ok((
        PartFile {
            path: path.to_path_buf(),
            file,
            meta,
        },
        kv,
    ))
}

/// How many of the first `in_rg` rows of row group `rg` can be skipped without
/// skipping values inside a page of a binary column in `mask`: the latest page
/// start at or before `in_rg` common to all of them (0 without an offset index).
pub(super) fn safe_skip(part: &PartFile, rg: usize, in_rg: u64, mask: &ProjectionMask) -> u64 {
    if in_rg == 0 {
        return 0;
    }
    let meta = part.meta.metadata();
    if meta.page_index().is_none() {
        return 0;
    }
    let index = meta.page_index_for_row_group(rg);
    let schema = part.meta.parquet_schema();
    let mut skip = in_rg;
    for (c, col) in schema.columns().iter().enumerate() {
        if !mask.leaf_included(c) || col.physical_type() != parquet::basic::Type::BYTE_ARRAY {
            continue;
        }
        let Some(pages) = index.page_locations(c) else {
            return 0;
        };
        let start = pages
            .iter()
            .map(|p| u64::try_from(p.first_row_index).unwrap_or(0))
            .filter(|&f| f <= skip)
            .max()
            .unwrap_or(0);
        skip = skip.min(start);
    }
    skip
}

/// Checks the offset index before the parquet reader trusts it (a damaged
/// `first_row_index` makes it subtract past zero): per column chunk, pages start at row
/// 0, in increasing row order inside the row group, and lie inside the file.
fn check_offset_index(path: &Path, meta: &ParquetMetaData, file_len: u64) -> Result<()> {
    if meta.page_index().is_none() {
        return Ok(());
    }
    for (rg, group) in meta.row_groups().iter().enumerate() {
        let rows = group.num_rows();
        let index = meta.page_index_for_row_group(rg);
        for col in 0..group.num_columns() {
            let Some(pages) = index.page_locations(col) else {
                continue;
            };
            // Pages lie inside their column chunk, which lies inside the file (read
            // from the fields: `byte_range` asserts they are not negative).
            let c = group.column(col);
            let start = c.dictionary_page_offset().unwrap_or(c.data_page_offset());
            let (Ok(start), Ok(len)) = (u64::try_from(start), u64::try_from(c.compressed_size()))
            else {
                return Err(Error::corrupt(
                    path,
                    None,
                    format!("row group {rg}, column {col} has a negative offset or size"),
                ));
            };
            let chunk_end = start.checked_add(len).filter(|&e| e <= file_len);
            let mut prev: Option<i64> = None;
            for page in pages {
                let begin = u64::try_from(page.offset).ok();
                let end = begin
                    .zip(u64::try_from(page.compressed_page_size).ok())
                    .and_then(|(o, n)| o.checked_add(n));
                let ok = (0..rows).contains(&page.first_row_index)
                    && prev.map_or(page.first_row_index == 0, |p| page.first_row_index > p)
                    && page.compressed_page_size > 0
                    && begin.is_some_and(|b| b >= start)
                    && end.zip(chunk_end).is_some_and(|(e, c)| e <= c);
                if !ok {
                    return Err(Error::corrupt(
                        path,
                        None,
                        format!("the offset index of row group {rg}, column {col} is damaged"),
                    ));
                }
                prev = Some(page.first_row_index);
            }
        }
    }
    Ok(())
}
