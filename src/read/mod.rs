//! The reader, the writer's twin: open a `weights.parquet`, list its tensors from the
//! footer without reading data, read one tensor by name touching only its row group,
//! scan row groups in order for verification and export.
//!
//! Files written by the seed's Python converter (one row group, no footer index, no
//! checksums) are read by scanning `layer_name` once.
//!
//! # Layout
//!
//! As on the write side, a single file and a parted output are two ways of holding the
//! same rows; above them the reader does not tell them apart.
//!
//! - this file: [`WeightFile`], the entry point: opening (a file, a directory holding
//!   one, or a parted output), its tensor list and what its footer records;
//! - [`file`]: one Parquet file (the whole, or a part): mapped, its footer read and
//!   every number taken from it checked, the guard around parquet calls;
//! - [`parts`]: a parted output's `weights.parquet/` directory and its manifest, read
//!   as one weight file;
//! - [`scan`]: the tensor list of a file without our footer index;
//! - [`rows`]: rows read across row groups and parts, and the row-group scanner;
//! - [`tensor`]: one tensor reassembled from its rows, widened or dequantized to f32;
//! - [`io`]: the memory-mapped file handed to the parquet reader;
//! - `inspect`, `verify`, `export`: the commands built on these.

mod export;
mod file;
mod inspect;
mod io;
mod parts;
mod rows;
mod scan;
mod tensor;
mod verify;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use crate::format::TensorInfo;
pub use export::{export, ExportOptions, ExportReport};
pub use inspect::{
    inspect, inspect_source, InspectReport, RowGroupInfo, SourceReport, SourceTensorInfo,
};
pub use io::RangeLog;
pub use tensor::{QuantData, Tensor};
pub use verify::{verify, TensorCheck, VerifyOptions, VerifyReport};

use crate::dtype::TargetDtype;
use crate::error::{Error, Result};
use crate::format;
use file::{add_rows, open_part, PartFile};
use parts::is_parted;

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
        // Checked at open to add up within 64 bits.
        let rows: u64 = part.rg_rows.iter().sum();
        let mut wf = Self::assemble(path, vec![part], kv)?;
        let tensors = match wf.kv.get(format::KEY_INDEX) {
            Some(idx) => format::parse_index(&wf.path, idx, rows)?,
            None => wf.tensors_from_scan()?,
        };
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
            for (i, &rows) in p.rg_rows.iter().enumerate() {
                rg_first_row.push(acc);
                rg_part.push((k, i));
                acc = add_rows(&path, acc, rows)?;
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

    /// Number of row groups.
    pub fn num_row_groups(&self) -> usize {
        self.rg_first_row.len().saturating_sub(1)
    }
}
