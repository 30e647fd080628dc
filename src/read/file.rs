//! One Parquet file of a weight file (the whole file, or one part of a parted output):
//! mapped, its footer read, and every number the reader takes from that footer checked
//! before it is trusted (row counts, sizes, the offset index). Also the guard that turns
//! a panic inside the parquet crate into an error naming the file.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
use parquet::arrow::ProjectionMask;
use parquet::file::metadata::{
    ColumnChunkMetaData, PageIndexPolicy, ParquetMetaData, RowGroupMetaData,
};

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
    /// Rows of each of its row groups, as the footer says (checked).
    pub(super) rg_rows: Vec<u64>,
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
    let rg_rows = check_row_groups(path, meta.metadata())?;
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
            rg_rows,
        },
        kv,
    ))
}

/// How many of the first `in_rg` rows of row group `rg` can be skipped without
/// skipping values inside a page of a binary column in `mask`: the latest page
/// start at or before `in_rg` common to all of them (0 without an offset index).
///
/// # Errors
///
/// `CorruptWeights` naming the file when a page starts at a negative row (the offset
/// index was checked at open, so this is a second line of defence).
pub(super) fn safe_skip(
    part: &PartFile,
    rg: usize,
    in_rg: u64,
    mask: &ProjectionMask,
) -> Result<u64> {
    if in_rg == 0 {
        return Ok(0);
    }
    let meta = part.meta.metadata();
    if meta.page_index().is_none() {
        return Ok(0);
    }
    let index = meta.page_index_for_row_group(rg);
    let schema = part.meta.parquet_schema();
    let mut skip = in_rg;
    for (c, col) in schema.columns().iter().enumerate() {
        if !mask.leaf_included(c) || col.physical_type() != parquet::basic::Type::BYTE_ARRAY {
            continue;
        }
        let Some(pages) = index.page_locations(c) else {
            return Ok(0);
        };
        let mut start = 0;
        for p in pages {
            let first = u64::try_from(p.first_row_index)
                .map_err(|_| damaged_offset_index(&part.path, rg, c))?;
            if first <= skip {
                start = start.max(first);
            }
        }
        skip = skip.min(start);
    }
    Ok(skip)
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
            // Pages lie inside their column chunk, which lies inside the file.
            let (start, len) = column_span(path, rg, col, group.column(col))?;
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
                    return Err(damaged_offset_index(path, rg, col));
                }
                prev = Some(page.first_row_index);
            }
        }
    }
    Ok(())
}

/// Checks the numbers of the footer at `path` that the reader relies on, row group by
/// row group: its row count (not negative, all of them adding up within 64 bits) and
/// the offset and size of each column chunk (not negative: the parquet reader asserts
/// it). Returns the row counts.
fn check_row_groups(path: &Path, meta: &ParquetMetaData) -> Result<Vec<u64>> {
    let mut total = 0u64;
    let mut out = Vec::with_capacity(meta.num_row_groups());
    for (rg, group) in meta.row_groups().iter().enumerate() {
        let rows = rg_rows(path, rg, group)?;
        for (col, c) in group.columns().iter().enumerate() {
            column_span(path, rg, col, c)?;
        }
        total = add_rows(path, total, rows)?;
        out.push(rows);
    }
    Ok(out)
}

/// The rows of row group `rg` of the file at `path`, as its footer says.
///
/// # Errors
///
/// `CorruptWeights` naming the file when the count is negative.
pub(super) fn rg_rows(path: &Path, rg: usize, group: &RowGroupMetaData) -> Result<u64> {
    u64::try_from(group.num_rows()).map_err(|_| {
        Error::corrupt(
            path,
            None,
            format!("row group {rg} has a negative row count"),
        )
    })
}

/// The bytes of row group `rg` of the file at `path` before and after compression, as
/// its footer says (the latter summed over its column chunks).
///
/// # Errors
///
/// `CorruptWeights` naming the file when a size is negative or the sum overflows.
pub(super) fn rg_sizes(path: &Path, rg: usize, group: &RowGroupMetaData) -> Result<(u64, u64)> {
    let uncompressed = u64::try_from(group.total_byte_size())
        .map_err(|_| Error::corrupt(path, None, format!("row group {rg} has a negative size")))?;
    let mut compressed = 0u64;
    for (col, c) in group.columns().iter().enumerate() {
        let (_, len) = column_span(path, rg, col, c)?;
        compressed = compressed.checked_add(len).ok_or_else(|| {
            Error::corrupt(
                path,
                None,
                format!("the column sizes of row group {rg} add up past 64 bits"),
            )
        })?;
    }
    Ok((uncompressed, compressed))
}

/// `rows + more`, refused when past 64 bits (row counts of a footer or a manifest).
pub(super) fn add_rows(path: &Path, rows: u64, more: u64) -> Result<u64> {
    rows.checked_add(more)
        .ok_or_else(|| Error::corrupt(path, None, "the row counts add up past 64 bits"))
}

/// The byte range `(start, length)` of column chunk `col` of row group `rg`, from its
/// footer fields (the chunk starts at its dictionary page, if any).
///
/// # Errors
///
/// `CorruptWeights` naming the file when the offset or the size is negative.
fn column_span(path: &Path, rg: usize, col: usize, c: &ColumnChunkMetaData) -> Result<(u64, u64)> {
    let start = c.dictionary_page_offset().unwrap_or(c.data_page_offset());
    match (u64::try_from(start), u64::try_from(c.compressed_size())) {
        (Ok(start), Ok(len)) => Ok((start, len)),
        _ => Err(Error::corrupt(
            path,
            None,
            format!("row group {rg}, column {col} has a negative offset or size"),
        )),
    }
}

/// An offset index that contradicts its row group.
fn damaged_offset_index(path: &Path, rg: usize, col: usize) -> Error {
    Error::corrupt(
        path,
        None,
        format!("the offset index of row group {rg}, column {col} is damaged"),
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{ArrayRef, BinaryArray, RecordBatch};
    use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
    use parquet::arrow::{ArrowWriter, ProjectionMask};
    use parquet::file::metadata::page_index::PageIndexBuilder;
    use parquet::file::metadata::PageIndexPolicy;

    use super::{safe_skip, MappedFile, PartFile};

    /// `open_part` refuses a page that starts at a negative row; `safe_skip`, given
    /// such metadata all the same, names the file instead of skipping from row 0.
    #[test]
    fn a_page_starting_at_a_negative_row_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.parquet");
        let data: ArrayRef = Arc::new(BinaryArray::from(vec![&[1u8][..], &[2u8][..]]));
        let batch = RecordBatch::try_from_iter([("data", data)]).unwrap();
        let mut w =
            ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), batch.schema(), None)
                .unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let file = MappedFile::open(&path).unwrap();
        let opts = ArrowReaderOptions::new().with_offset_index_policy(PageIndexPolicy::Required);
        let good = ArrowReaderMetadata::load(&file, opts).unwrap();
        let mut index = good
            .metadata()
            .page_index_for_row_group(0)
            .offset_index(0)
            .unwrap()
            .clone();
        index.page_locations[0].first_row_index = -1;
        let mut pages = PageIndexBuilder::new(1, 1);
        pages.put_offset_index(index, 0, 0);
        let md = good.metadata().as_ref().clone().into_builder();
        let md = md.set_page_index(Some(Arc::new(pages.build()))).build();
        let meta = ArrowReaderMetadata::try_new(Arc::new(md), ArrowReaderOptions::new()).unwrap();
        let mask = ProjectionMask::all();
        let part = PartFile {
            path: path.clone(),
            file,
            meta,
            rg_rows: vec![2],
        };
        let err = safe_skip(&part, 0, 1, &mask).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: the offset index of row group 0, column 0 is damaged",
                path.display()
            )
        );
    }
}
