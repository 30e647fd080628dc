//! The reader's I/O layer: a memory-mapped file served to the Parquet reader as
//! zero-copy `Bytes`, with an optional log of every byte range handed out (tests use
//! it to prove that reading one tensor touches only its row group).

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes};
use parquet::errors::ParquetError;
use parquet::file::reader::{ChunkReader, Length};

use crate::error::{Error, Result};

/// A log of the byte ranges `[start, end)` read through a [`MappedFile`].
pub type RangeLog = Arc<Mutex<Vec<(u64, u64)>>>;

/// A read-only mapped file.
#[derive(Clone)]
pub struct MappedFile {
    bytes: Bytes,
    log: Option<RangeLog>,
}

impl std::fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedFile")
            .field("len", &self.bytes.len())
            .finish()
    }
}

impl MappedFile {
    /// Maps `path` (an empty file is served from an empty buffer).
    ///
    /// # Errors
    ///
    /// `Io` naming the file.
    pub fn open(path: &Path) -> Result<MappedFile> {
        let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("stat", path, e))?
            .len();
        let bytes = if len == 0 {
            Bytes::new()
        } else {
            // SAFETY: the weight file must not be modified while it is read; this is the
            // same documented risk as for the source shards (see `source::Shard`).
            let map = unsafe { crate::io::map::map_file(&file) }
                .map_err(|e| Error::io("map", path, e))?;
            Bytes::from_owner(map)
        };
        Ok(MappedFile { bytes, log: None })
    }

    /// Starts logging the ranges handed to the Parquet reader.
    pub fn with_log(mut self, log: RangeLog) -> Self {
        self.log = Some(log);
        self
    }

    fn record(&self, start: u64, end: u64) {
        if let Some(l) = &self.log {
            if let Ok(mut l) = l.lock() {
                l.push((start, end));
            }
        }
    }

    fn slice(&self, start: u64, len: usize) -> parquet::errors::Result<Bytes> {
        let total = self.bytes.len() as u64;
        let end = start
            .checked_add(len as u64)
            .filter(|&e| e <= total)
            .ok_or_else(|| {
                ParquetError::EOF(format!(
                    "range {start}+{len} is past the end of the file ({total} bytes)"
                ))
            })?;
        self.record(start, end);
        Ok(self.bytes.slice(start as usize..end as usize))
    }
}

impl Length for MappedFile {
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }
}

impl ChunkReader for MappedFile {
    type T = bytes::buf::Reader<Bytes>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        let total = self.bytes.len() as u64;
        if start > total {
            return Err(ParquetError::EOF(format!(
                "offset {start} is past the end of the file"
            )));
        }
        let b = self.slice(start, (total - start) as usize)?;
        Ok(b.reader())
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        self.slice(start, length)
    }
}
