//! The reader, the writer's twin: open a `weights.parquet`, list its tensors from the
//! footer without reading data, read one tensor by name touching only its row group,
//! scan row groups in order for verification and export.
//!
//! Files written by the seed's Python converter (one row group, no footer index, no
//! checksums) are read by scanning `layer_name` once.

mod export;
mod inspect;
mod io;
mod verify;

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use arrow_array::{
    Array, BinaryArray, Int64Array, ListArray, RecordBatch, StringArray, UInt64Array,
};
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder, RowSelection,
    RowSelector,
};
use parquet::arrow::ProjectionMask;
use parquet::file::metadata::PageIndexPolicy;

pub use crate::format::TensorInfo;
pub use export::{export, ExportOptions, ExportReport};
pub use inspect::{
    inspect, inspect_source, InspectReport, RowGroupInfo, SourceReport, SourceTensorInfo,
};
pub use io::RangeLog;
pub use verify::{verify, TensorCheck, VerifyOptions, VerifyReport};

use crate::cast::dequantize;
use crate::dtype::{Dtype, TargetDtype};
use crate::error::sanitize;
use crate::error::{Error, Result};
use crate::format::{self, QuantInfo};
use io::MappedFile;

/// Runs a Parquet call, turning a panic inside the parquet crate into an `Internal`
/// error naming the file (and the tensor).
fn guard<T>(path: &Path, tensor: Option<&str>, f: impl FnOnce() -> Result<T>) -> Result<T> {
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

/// One tensor's data.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions.
    pub shape: Vec<u64>,
    /// Little-endian element bytes, row-major (int8 codes for a quantized tensor).
    pub data: Vec<u8>,
    /// For a quantized tensor (V2): its scales and zero points, over all its rows.
    pub quant: Option<QuantData>,
}

/// The scales of a quantized tensor as stored: `(q - zero_point) * scale` is the value.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantData {
    /// 0 per-channel along axis 0, -1 per-group.
    pub axis: i32,
    /// 0 per-channel, else elements per group of the flattened tensor.
    pub group_size: u64,
    /// One per channel or group.
    pub scales: Vec<f32>,
    /// One per channel or group (integer values; 0 when symmetric).
    pub zero_points: Vec<f32>,
}

impl Tensor {
    /// The elements as f32: floats widened (or narrowed from f64), integers converted,
    /// int8 codes of a quantized tensor dequantized with the seed loader's formula,
    /// `(q - zero_point) * scale` in f32.
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.quant {
            Some(q) => {
                let info = crate::format::QuantInfo {
                    axis: q.axis,
                    group_size: q.group_size,
                    scales: q.scales.len() as u64,
                };
                let unit = info.unit(&self.shape);
                dequantize_units(&self.data, unit, &q.scales, &q.zero_points)
            }
            None => to_f32(self.dtype, &self.data),
        }
    }
}

/// Dequantizes `codes` whose consecutive runs of `unit` elements share a scale and a
/// zero point. Callers check there is one of each per unit.
pub(crate) fn dequantize_units(codes: &[u8], unit: u64, scales: &[f32], zps: &[f32]) -> Vec<f32> {
    let unit = unit.max(1) as usize;
    codes
        .chunks(unit)
        .zip(scales.iter().zip(zps))
        .flat_map(|(c, (&s, &z))| c.iter().map(move |&q| dequantize(q, s, z)))
        .collect()
}

/// Converts element bytes of `dtype` to f32.
pub(crate) fn to_f32(dtype: Dtype, data: &[u8]) -> Vec<f32> {
    if dtype.is_castable_float() {
        let mut out = Vec::with_capacity(data.len() / dtype.size());
        crate::cast::widen(dtype, data, &mut out);
        return out;
    }
    let s = dtype.size();
    data.chunks_exact(s)
        .map(|b| match dtype {
            Dtype::I64 => i64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32,
            Dtype::U64 => u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32,
            Dtype::I32 => i32::from_le_bytes(b.try_into().unwrap_or([0; 4])) as f32,
            Dtype::U32 => u32::from_le_bytes(b.try_into().unwrap_or([0; 4])) as f32,
            Dtype::I16 => i16::from_le_bytes(b.try_into().unwrap_or([0; 2])) as f32,
            Dtype::U16 => u16::from_le_bytes(b.try_into().unwrap_or([0; 2])) as f32,
            Dtype::I8 => b[0] as i8 as f32,
            Dtype::U8 | Dtype::Bool => b[0] as f32,
            _ => f32::NAN,
        })
        .collect()
}

/// The cells of one row that the readers use.
struct Cells<'a> {
    row: u64,
    data: &'a [u8],
    checksum: Option<u64>,
    offset: Option<i64>,
    /// V2: f32 little-endian scales and zero points (empty for V1 files and unquantized
    /// rows).
    scales: &'a [u8],
    zero_points: &'a [u8],
    /// With `describe`: the row's own description cells.
    described: Option<Described<'a>>,
}

/// A row's description cells as stored (`verify` compares them with the footer index).
#[derive(Debug, Clone)]
pub(crate) struct Described<'a> {
    pub(crate) name: &'a str,
    pub(crate) dtype: &'a str,
    pub(crate) shape: Vec<i64>,
    pub(crate) num_params: Option<i64>,
}

/// A row callback.
type RowFn<'a> = dyn FnMut(Cells) -> Result<()> + 'a;

/// An open weight file.
#[derive(Debug, Clone)]
pub struct WeightFile {
    path: PathBuf,
    /// The file, or a parted output's part files in row order.
    parts: Vec<PartFile>,
    /// Global row group → (part, row group inside it).
    rg_part: Vec<(usize, usize)>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    rg_first_row: Vec<u64>,
    kv: HashMap<String, String>,
    has_checksums: bool,
    /// V2: the file has the quantization columns.
    quantized: bool,
}

/// One Parquet file of a weight file: the whole of it, or one part of a parted output.
#[derive(Debug, Clone)]
struct PartFile {
    path: PathBuf,
    file: MappedFile,
    meta: ArrowReaderMetadata,
}

/// Whether directory `dir` is a parted output's `weights.parquet/` (complete or not):
/// named so, or holding a manifest or part files.
fn is_parted(dir: &Path) -> bool {
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

/// Opens one Parquet weight file (the whole, or a part): mapped, its footer read and
/// checked, the seed's columns present. Returns it with its key-value metadata.
fn open_part(path: &Path, log: Option<RangeLog>) -> Result<(PartFile, HashMap<String, String>)> {
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
fn safe_skip(part: &PartFile, rg: usize, in_rg: u64, mask: &ProjectionMask) -> u64 {
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

/// One row as the scanner hands it out.
#[derive(Debug)]
pub(crate) struct Row<'a> {
    /// Global row number.
    pub(crate) row: u64,
    /// Index of its tensor in [`WeightFile::tensors`].
    pub(crate) tensor: usize,
    /// Byte offset of this row's data inside the tensor.
    pub(crate) offset: u64,
    /// The data.
    pub(crate) data: &'a [u8],
    /// The stored checksum, when the file has them.
    pub(crate) checksum: Option<u64>,
    /// V2: the row's scales and zero points, f32 little-endian (empty otherwise).
    pub(crate) scales: &'a [u8],
    pub(crate) zero_points: &'a [u8],
    /// With `describe`: the row's own name, dtype, shape and count cells.
    pub(crate) described: Option<Described<'a>>,
}

impl WeightFile {
    /// Opens a weight file, or the `weights.parquet` inside a directory.
    ///
    /// # Errors
    ///
    /// `Io`, `Parquet` or `CorruptWeights` naming the file; never panics on a damaged file.
    pub fn open(path: impl AsRef<Path>) -> Result<WeightFile> {
        Self::open_with(path, None)
    }

    /// Like [`WeightFile::open`], logging every byte range read into `log`.
    ///
    /// # Errors
    ///
    /// As [`WeightFile::open`].
    pub fn open_with(path: impl AsRef<Path>, log: Option<RangeLog>) -> Result<WeightFile> {
        crate::source::refuse_big_endian_host()?;
        let mut path = path.as_ref().to_path_buf();
        if path.is_dir() && !is_parted(&path) {
            path = path.join(format::WEIGHTS_FILE);
        }
        if path.is_dir() {
            return Self::open_parted(path, log);
        }
        let (part, kv) = open_part(&path, log)?;
        let mut wf = Self::assemble(path, vec![part], kv)?;
        let tensors = match wf.kv.get(format::KEY_INDEX) {
            Some(idx) => {
                let rows = wf.rg_first_row.last().copied().unwrap_or(0);
                format::parse_index(&wf.path, idx, rows)?
            }
            None => wf.tensors_from_scan()?,
        };
        wf.set_tensors(tensors)?;
        Ok(wf)
    }

    /// Opens a parted output's directory: its manifest, then every part it lists, each
    /// checked to be of the manifest's conversion and to hold the rows it says.
    fn open_parted(dir: PathBuf, log: Option<RangeLog>) -> Result<WeightFile> {
        let mpath = dir.join(format::MANIFEST_FILE);
        let text = std::fs::read(&mpath).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::corrupt(
                    &dir,
                    None,
                    format!(
                        "a directory without {}: not a complete conversion (an interrupted parted conversion finishes with --resume)",
                        format::MANIFEST_FILE
                    ),
                )
            } else {
                Error::io("read", &mpath, e)
            }
        })?;
        let manifest: format::Manifest = serde_json::from_slice(&text)
            .map_err(|e| Error::corrupt(&mpath, None, format!("damaged manifest: {e}")))?;
        if manifest.parts.is_empty() {
            return Err(Error::corrupt(&mpath, None, "the manifest lists no part"));
        }
        let mut parts = Vec::with_capacity(manifest.parts.len());
        let mut kv = HashMap::new();
        let mut row = 0u64;
        for (k, mp) in manifest.parts.iter().enumerate() {
            let plain = Path::new(&mp.file)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
            if !plain || mp.file.contains('/') {
                return Err(Error::corrupt(
                    &mpath,
                    None,
                    format!("part name `{}` is not a file name", sanitize(&mp.file)),
                ));
            }
            let p = dir.join(&mp.file);
            let (part, pkv) = open_part(&p, log.clone())?;
            let stamp: Option<format::PartStamp> = pkv
                .get(format::KEY_PART)
                .and_then(|s| serde_json::from_str(s).ok());
            let held: u64 = part
                .meta
                .metadata()
                .row_groups()
                .iter()
                .map(|g| u64::try_from(g.num_rows()).unwrap_or(0))
                .sum();
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
            if held != mp.rows || mp.first_row != row {
                return Err(Error::corrupt(
                    &p,
                    None,
                    format!(
                        "the part holds {held} rows, the manifest says {} from row {}",
                        mp.rows, mp.first_row
                    ),
                ));
            }
            row += held;
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

    /// A weight file of `parts` (the same schema each), before its tensor list.
    fn assemble(
        path: PathBuf,
        parts: Vec<PartFile>,
        kv: HashMap<String, String>,
    ) -> Result<WeightFile> {
        let schema = parts[0].meta.schema().clone();
        for p in &parts[1..] {
            if p.meta.schema().fields() != schema.fields() {
                return Err(Error::corrupt(
                    &p.path,
                    None,
                    "this part's schema differs from the first part's",
                ));
            }
        }
        let has_checksums = schema.field_with_name(format::COL_CHECKSUM).is_ok();
        let quantized = [
            format::COL_QUANT_TYPE,
            format::COL_SCALES,
            format::COL_ZERO_POINTS,
        ]
        .iter()
        .all(|c| schema.field_with_name(c).is_ok());
        let mut rg_first_row = Vec::new();
        let mut rg_part = Vec::new();
        let mut acc = 0u64;
        for (k, p) in parts.iter().enumerate() {
            for (i, rg) in p.meta.metadata().row_groups().iter().enumerate() {
                rg_first_row.push(acc);
                rg_part.push((k, i));
                acc = acc.saturating_add(u64::try_from(rg.num_rows()).unwrap_or(0));
            }
        }
        rg_first_row.push(acc);
        Ok(WeightFile {
            path,
            parts,
            rg_part,
            tensors: Vec::new(),
            by_name: HashMap::new(),
            rg_first_row,
            kv,
            has_checksums,
            quantized,
        })
    }

    /// Sets the tensor list, refusing two tensors of one name.
    fn set_tensors(&mut self, tensors: Vec<TensorInfo>) -> Result<()> {
        // Names are keys: a second tensor of a name would be unreachable by name, and
        // reading "it" would give the first one's bytes.
        let mut by_name = HashMap::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            if by_name.insert(t.name.clone(), i).is_some() {
                return Err(Error::corrupt(
                    &self.path,
                    Some(&t.name),
                    "the file holds two tensors of this name",
                ));
            }
        }
        self.by_name = by_name;
        self.tensors = tensors;
        Ok(())
    }

    /// Builds the tensor list of a file without our footer index by reading the small
    /// columns (not `data`).
    fn tensors_from_scan(&self) -> Result<Vec<TensorInfo>> {
        let path = self.path.clone();
        let batches = guard(&path, None, || {
            let mut cols = vec![format::COL_NAME, format::COL_SHAPE, format::COL_DTYPE];
            if self.quantized {
                cols.extend([
                    format::COL_QUANT_TYPE,
                    format::COL_QUANT_AXIS,
                    format::COL_GROUP_SIZE,
                ]);
            }
            let p0 = &self.parts[0];
            let mask = ProjectionMask::columns(p0.meta.parquet_schema(), cols);
            let rdr = ParquetRecordBatchReaderBuilder::new_with_metadata(
                p0.file.clone(),
                p0.meta.clone(),
            )
            .with_projection(mask)
            .with_batch_size(8192)
            .build()
            .map_err(|e| Error::parquet(&path, None, e))?;
            rdr.collect::<std::result::Result<Vec<RecordBatch>, _>>()
                .map_err(|e| {
                    Error::corrupt(&path, None, format!("cannot read the tensor names: {e}"))
                })
        })?;
        let mut out: Vec<TensorInfo> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut row = 0u64;
        for b in &batches {
            let names = col::<StringArray>(b, format::COL_NAME, &path)?;
            let dtypes = col::<StringArray>(b, format::COL_DTYPE, &path)?;
            let shapes = col::<ListArray>(b, format::COL_SHAPE, &path)?;
            let v2 = if self.quantized {
                Some((
                    col::<StringArray>(b, format::COL_QUANT_TYPE, &path)?,
                    col::<arrow_array::Int32Array>(b, format::COL_QUANT_AXIS, &path)?,
                    col::<arrow_array::Int32Array>(b, format::COL_GROUP_SIZE, &path)?,
                ))
            } else {
                None
            };
            for i in 0..b.num_rows() {
                let name = names.value(i).to_string();
                let v2_cells = v2.map(|(k, a, g)| (k.value(i), a.value(i), g.value(i)));
                let dims = shapes.value(i);
                let (dtype, shape, numel, bytes, quant) =
                    scanned_row(&path, &name, dtypes.value(i), dims.as_ref(), v2_cells)?;
                match out.last_mut() {
                    Some(last) if last.name == name && last.row + last.rows == row => {
                        last.rows += 1
                    }
                    _ => {
                        if !seen.insert(name.clone()) {
                            return Err(Error::DuplicateTensor {
                                path: path.clone(),
                                tensor: name,
                                other: None,
                            });
                        }
                        out.push(TensorInfo {
                            name,
                            dtype,
                            shape,
                            num_params: numel,
                            bytes,
                            row,
                            rows: 1,
                            source: None,
                            source_dtype: None,
                            quant,
                        })
                    }
                }
                row += 1;
            }
        }
        Ok(out)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor, in row order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor called `name`.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The footer's key-value metadata.
    pub fn key_value(&self, key: &str) -> Option<&str> {
        self.kv.get(key).map(String::as_str)
    }

    /// The `metadata.json` content stored in the footer, if any.
    pub fn metadata(&self) -> Option<serde_json::Value> {
        self.key_value(format::KEY_METADATA)
            .and_then(|m| serde_json::from_str(m).ok())
    }

    /// The cast policy the file was written with, if recorded.
    pub fn cast_policy(&self) -> Option<TargetDtype> {
        self.key_value(format::KEY_CAST)
            .and_then(|c| c.parse().ok())
    }

    /// The quantization scheme of a V2 file written by modelconv.
    pub fn quant_scheme(&self) -> Option<crate::plan::QuantScheme> {
        let v: serde_json::Value =
            serde_json::from_str(self.key_value(format::KEY_QUANTIZATION)?).ok()?;
        v.get("scheme")?.as_str()?.parse().ok()
    }

    /// True when rows carry checksums.
    pub fn has_checksums(&self) -> bool {
        self.has_checksums
    }

    /// True when the file has our footer index (false for the seed's files).
    pub fn has_index(&self) -> bool {
        self.kv.contains_key(format::KEY_INDEX)
    }

    /// Parquet metadata (row groups, column chunks) of the file, or of a parted
    /// output's first part ([`WeightFile::part_files`] has them all).
    pub fn parquet_metadata(&self) -> &parquet::file::metadata::ParquetMetaData {
        self.parts[0].meta.metadata()
    }

    /// The Parquet files holding the rows, in row order: the file itself, or every part
    /// of a parted output, each with its metadata.
    pub fn part_files(&self) -> Vec<(&Path, &parquet::file::metadata::ParquetMetaData)> {
        self.parts
            .iter()
            .map(|p| (p.path.as_path(), p.meta.metadata().as_ref()))
            .collect()
    }

    /// True when the rows are in the part files of a directory (`--max-file-size`).
    pub fn is_parted(&self) -> bool {
        self.path.is_dir()
    }

    /// Row group holding global row `row`, and the row's position inside it.
    fn locate(&self, row: u64) -> Option<(usize, u64)> {
        let rg = self
            .rg_first_row
            .partition_point(|&f| f <= row)
            .checked_sub(1)?;
        if rg + 1 >= self.rg_first_row.len() {
            return None;
        }
        Some((rg, row - self.rg_first_row[rg]))
    }

    /// Reads rows `[first, first + n)` (the `data`, `chunk_offset` and `checksum`
    /// columns), calling `f` per row in order. Only the row groups (and, with the offset
    /// index, the pages) holding those rows are read.
    fn read_rows(
        &self,
        first: u64,
        n: u64,
        tensor: Option<&str>,
        describe: bool,
        f: &mut RowFn,
    ) -> Result<()> {
        let path = &self.path;
        let end = first.saturating_add(n);
        let mut row = first;
        while row < end {
            let (rg, in_rg) = self.locate(row).ok_or_else(|| {
                Error::corrupt(path, tensor, format!("row {row} is not in the file"))
            })?;
            let rg_rows = self.rg_first_row[rg + 1] - self.rg_first_row[rg];
            let take = (end - row).min(rg_rows - in_rg);
            let cols = self.row_columns(describe);
            let (pi, lrg) = self.rg_part[rg];
            let part = &self.parts[pi];
            let path = &part.path;
            let mask = ProjectionMask::columns(part.meta.parquet_schema(), cols.iter().copied());
            // Rows before `in_rg` are skipped only up to a page start of every binary
            // column read; the rest are read and dropped below. parquet 60.1 skips
            // binary values inside a page without bounds checks, and a damaged length
            // there made a later read ask the allocator for exabytes (an abort, not a
            // panic). Our files start a `data` page at every row, so nothing changes
            // for them; a page skipped whole is never decoded.
            let skip = safe_skip(part, lrg, in_rg, &mask);
            let mut drop_rows = in_rg - skip;
            let batches = guard(path, tensor, || {
                let mut sel = Vec::new();
                if skip > 0 {
                    sel.push(RowSelector::skip(skip as usize));
                }
                sel.push(RowSelector::select((in_rg - skip + take) as usize));
                let rdr = ParquetRecordBatchReaderBuilder::new_with_metadata(
                    part.file.clone(),
                    part.meta.clone(),
                )
                .with_row_groups(vec![lrg])
                .with_projection(mask)
                .with_row_selection(RowSelection::from(sel))
                .with_batch_size(1)
                .build()
                .map_err(|e| Error::parquet(path, tensor, e))?;
                Ok(rdr)
            })?;
            let mut iter = batches;
            loop {
                let next = guard(path, tensor, || Ok(iter.next()))?;
                let Some(batch) = next else { break };
                let batch = batch.map_err(|e| {
                    Error::corrupt(path, tensor, format!("cannot decode row group {rg}: {e}"))
                })?;
                // Batches are one row: the rows before the selection are dropped.
                if drop_rows > 0 {
                    drop_rows = drop_rows.saturating_sub(batch.num_rows() as u64);
                    continue;
                }
                if row.saturating_add(batch.num_rows() as u64) > end {
                    return Err(Error::corrupt(path, tensor, "more rows than selected"));
                }
                self.each_row(&batch, row, describe, f)?;
                row += batch.num_rows() as u64;
            }
            if row < first.saturating_add(n).min(self.rg_first_row[rg + 1]) {
                return Err(Error::corrupt(
                    path,
                    tensor,
                    format!("row group {rg} ended early"),
                ));
            }
        }
        Ok(())
    }

    /// The columns a row read needs: `data` and our extras, the V2 scales, and with
    /// `describe` the description cells.
    fn row_columns(&self, describe: bool) -> Vec<&'static str> {
        let mut cols = vec![format::COL_DATA];
        if self.has_checksums {
            cols.push(format::COL_CHECKSUM);
        }
        let schema = self.parts[0].meta.schema();
        if schema.field_with_name(format::COL_CHUNK_OFFSET).is_ok() {
            cols.push(format::COL_CHUNK_OFFSET);
        }
        if self.quantized {
            cols.extend([format::COL_SCALES, format::COL_ZERO_POINTS]);
        }
        if describe {
            cols.extend([
                format::COL_NAME,
                format::COL_DTYPE,
                format::COL_SHAPE,
                format::COL_NUM_PARAMS,
            ]);
        }
        cols
    }

    /// Calls `f` with the cells of every row of `batch`, the first being global row
    /// `first`.
    fn each_row(
        &self,
        batch: &RecordBatch,
        first: u64,
        describe: bool,
        f: &mut RowFn,
    ) -> Result<()> {
        let path = &self.path;
        let data = col::<BinaryArray>(batch, format::COL_DATA, path)?;
        let sums = if self.has_checksums {
            Some(col::<UInt64Array>(batch, format::COL_CHECKSUM, path)?)
        } else {
            None
        };
        let offs = batch
            .column_by_name(format::COL_CHUNK_OFFSET)
            .and_then(|c| c.as_any().downcast_ref::<Int64Array>());
        let quant = if self.quantized {
            Some((
                col::<BinaryArray>(batch, format::COL_SCALES, path)?,
                col::<BinaryArray>(batch, format::COL_ZERO_POINTS, path)?,
            ))
        } else {
            None
        };
        let described = if describe {
            Some((
                col::<StringArray>(batch, format::COL_NAME, path)?,
                col::<StringArray>(batch, format::COL_DTYPE, path)?,
                col::<ListArray>(batch, format::COL_SHAPE, path)?,
                batch
                    .column_by_name(format::COL_NUM_PARAMS)
                    .and_then(|c| c.as_any().downcast_ref::<Int64Array>()),
            ))
        } else {
            None
        };
        fn text(a: &StringArray, i: usize) -> &str {
            if a.is_null(i) {
                ""
            } else {
                a.value(i)
            }
        }
        for i in 0..batch.num_rows() {
            let described = described.map(|(names, dtypes, shapes, counts)| Described {
                name: text(names, i),
                dtype: text(dtypes, i),
                shape: shapes
                    .value(i)
                    .as_any()
                    .downcast_ref::<arrow_array::Int32Array>()
                    .map(|d| d.values().iter().map(|&x| x as i64).collect())
                    .unwrap_or_default(),
                num_params: counts.and_then(|c| (!c.is_null(i)).then(|| c.value(i))),
            });
            let (scales, zero_points) =
                quant.map_or((&[][..], &[][..]), |(s, z)| (s.value(i), z.value(i)));
            f(Cells {
                row: first + i as u64,
                data: data.value(i),
                checksum: sums.and_then(|s| (!s.is_null(i)).then(|| s.value(i))),
                offset: offs.and_then(|o| (!o.is_null(i)).then(|| o.value(i))),
                scales,
                zero_points,
                described,
            })?;
        }
        Ok(())
    }

    /// Reads one tensor by name, reassembling split rows.
    ///
    /// # Errors
    ///
    /// `TensorNotFound`; `CorruptWeights` naming the tensor when its rows do not add up
    /// to its shape.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let i = *self
            .by_name
            .get(name)
            .ok_or_else(|| Error::TensorNotFound {
                path: self.path.clone(),
                tensor: name.to_string(),
            })?;
        let t = &self.tensors[i];
        let cap = usize::try_from(t.bytes).map_err(|_| {
            Error::corrupt(&self.path, Some(name), "tensor too large for this machine")
        })?;
        let mut data = Vec::with_capacity(cap.min(1 << 30));
        let (mut scales, mut zero_points) = (Vec::new(), Vec::new());
        self.read_rows(t.row, t.rows, Some(name), false, &mut |c| {
            if (data.len() + c.data.len()) as u64 > t.bytes {
                return Err(Error::corrupt(
                    &self.path,
                    Some(name),
                    "rows hold more bytes than the shape needs",
                ));
            }
            data.extend_from_slice(c.data);
            if t.quant.is_some() {
                f32s_into(c.scales, &mut scales);
                f32s_into(c.zero_points, &mut zero_points);
            }
            Ok(())
        })?;
        if data.len() as u64 != t.bytes {
            return Err(Error::corrupt(
                &self.path,
                Some(name),
                format!(
                    "rows hold {} bytes, the shape needs {}",
                    data.len(),
                    t.bytes
                ),
            ));
        }
        let quant = match t.quant {
            Some(q) => {
                if scales.len() as u64 != q.scales || zero_points.len() as u64 != q.scales {
                    return Err(Error::corrupt(
                        &self.path,
                        Some(name),
                        format!(
                            "rows hold {} scales and {} zero points, the tensor needs {}",
                            scales.len(),
                            zero_points.len(),
                            q.scales
                        ),
                    ));
                }
                Some(QuantData {
                    axis: q.axis,
                    group_size: q.group_size,
                    scales,
                    zero_points,
                })
            }
            None => None,
        };
        Ok(Tensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            data,
            quant,
        })
    }

    /// Reads one tensor as f32.
    ///
    /// # Errors
    ///
    /// As [`WeightFile::tensor`].
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        self.tensor(name).map(|t| t.to_f32())
    }

    /// Calls `f` for every row of row group `rg`, in order; with `describe`, each row
    /// carries its name, dtype, shape and count cells too.
    pub(crate) fn scan_row_group(
        &self,
        rg: usize,
        describe: bool,
        f: &mut dyn FnMut(Row) -> Result<()>,
    ) -> Result<()> {
        let first = *self
            .rg_first_row
            .get(rg)
            .ok_or_else(|| Error::corrupt(&self.path, None, format!("no row group {rg}")))?;
        let n = self.rg_first_row.get(rg + 1).copied().unwrap_or(first) - first;
        let mut ti = self.tensor_at_row(first);
        self.read_rows(first, n, None, describe, &mut |c| {
            let row = c.row;
            while ti < self.tensors.len() && self.tensors[ti].row + self.tensors[ti].rows <= row {
                ti += 1;
            }
            if ti >= self.tensors.len() {
                return Err(Error::corrupt(
                    &self.path,
                    None,
                    format!("row {row} belongs to no tensor"),
                ));
            }
            let offset = match c.offset {
                Some(o) => u64::try_from(o).map_err(|_| {
                    Error::corrupt(
                        &self.path,
                        Some(&self.tensors[ti].name),
                        "negative chunk offset",
                    )
                })?,
                None => 0,
            };
            f(Row {
                row,
                tensor: ti,
                offset,
                data: c.data,
                checksum: c.checksum,
                scales: c.scales,
                zero_points: c.zero_points,
                described: c.described,
            })
        })
    }

    fn tensor_at_row(&self, row: u64) -> usize {
        self.tensors.partition_point(|t| t.row + t.rows <= row)
    }

    /// Number of row groups.
    pub fn num_row_groups(&self) -> usize {
        self.rg_first_row.len().saturating_sub(1)
    }

    /// Reads every tensor as f32, row groups in parallel, calling `f` once per tensor
    /// (from several threads).
    ///
    /// # Errors
    ///
    /// The first read error.
    pub fn for_each_f32(&self, f: &(dyn Fn(&TensorInfo, Vec<f32>) + Sync)) -> Result<()> {
        use rayon::prelude::*;
        (0..self.num_row_groups())
            .into_par_iter()
            .try_for_each(|rg| {
                let mut pending: Option<(usize, Vec<u8>)> = None;
                let first = self.rg_first_row[rg];
                let last = self.rg_first_row[rg + 1];
                self.scan_row_group(rg, false, &mut |r: Row| {
                    let t = &self.tensors[r.tensor];
                    if t.row < first || t.row + t.rows > last || t.quant.is_some() {
                        // Spans row groups, or needs its scales: read whole below.
                        return Ok(());
                    }
                    if t.rows == 1 {
                        f(t, to_f32(t.dtype, r.data));
                        return Ok(());
                    }
                    if !matches!(&pending, Some((i, _)) if *i == r.tensor) {
                        pending =
                            Some((r.tensor, Vec::with_capacity(t.bytes.min(1 << 30) as usize)));
                    }
                    if let Some((_, buf)) = &mut pending {
                        buf.extend_from_slice(r.data);
                    }
                    if r.row + 1 == t.row + t.rows {
                        if let Some((_, b)) = pending.take() {
                            f(t, to_f32(t.dtype, &b));
                        }
                    }
                    Ok(())
                })
            })?;
        for t in &self.tensors {
            let (Some((a, _)), Some((b, _))) =
                (self.locate(t.row), self.locate(t.row + t.rows - 1))
            else {
                continue;
            };
            if a != b || t.quant.is_some() {
                f(t, self.tensor_f32(&t.name)?);
            }
        }
        Ok(())
    }
}

/// Checks the offset index before the parquet reader trusts it (a damaged
/// `first_row_index` makes it subtract past zero): per column chunk, pages start at row
/// 0, in increasing row order inside the row group, and lie inside the file.
fn check_offset_index(
    path: &Path,
    meta: &parquet::file::metadata::ParquetMetaData,
    file_len: u64,
) -> Result<()> {
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

/// Appends f32 little-endian values (a partial trailing value is ignored: counts are
/// checked by the caller).
pub(crate) fn f32s_into(bytes: &[u8], out: &mut Vec<f32>) {
    out.extend(
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
    );
}

/// One row of a file without our footer index: `(stored dtype, shape, elements, bytes,
/// quantization)` from its `dtype` and `shape` cells, and for a V2 file its
/// `(quant_type, quant_axis, group_size)` cells (an int8 row stores codes whatever its
/// `dtype` says: the original dtype).
#[allow(clippy::type_complexity)]
fn scanned_row(
    path: &Path,
    name: &str,
    dtype_s: &str,
    dims: &dyn Array,
    v2: Option<(&str, i32, i32)>,
) -> Result<(Dtype, Vec<u64>, u64, u64, Option<QuantInfo>)> {
    let bad = |why: String| Error::corrupt(path, Some(name), why);
    let mut dtype =
        Dtype::from_torch(dtype_s).ok_or_else(|| bad(format!("unknown dtype `{dtype_s}`")))?;
    let mut quant = None;
    if let Some((kind, axis, group)) = v2 {
        match kind {
            "fp16" | "fp32" => {}
            "int8" => {
                dtype = Dtype::I8;
                let group_size =
                    u64::try_from(group).map_err(|_| bad("negative group size".into()))?;
                if group_size == 0 && axis != 0 {
                    return Err(bad(format!(
                        "quant_axis {axis} without groups is not read by modelconv"
                    )));
                }
                quant = Some(QuantInfo {
                    axis,
                    group_size,
                    scales: 0,
                });
            }
            other => {
                return Err(bad(format!(
                    "quant_type `{}` is not read by modelconv",
                    sanitize(other)
                )))
            }
        }
    }
    let dims = dims
        .as_any()
        .downcast_ref::<arrow_array::Int32Array>()
        .ok_or_else(|| bad("shape is not a list of int32".into()))?;
    let shape = dims
        .values()
        .iter()
        .map(|&d| u64::try_from(d))
        .collect::<std::result::Result<Vec<u64>, _>>()
        .map_err(|_| bad("negative dimension".into()))?;
    let numel = shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("shape overflows".into()))?;
    let bytes = numel
        .checked_mul(dtype.size() as u64)
        .ok_or_else(|| bad("shape overflows".into()))?;
    if let Some(q) = &mut quant {
        let unit = q.unit(&shape);
        q.scales = if unit == 0 { 0 } else { numel.div_ceil(unit) };
    }
    Ok((dtype, shape, numel, bytes, quant))
}

fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str, path: &Path) -> Result<&'a T> {
    b.column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| {
            Error::corrupt(
                path,
                None,
                format!("column `{name}` has an unexpected type"),
            )
        })
}
