//! One validated shard ([`Shard`]): opened and its header (safetensors) or its pickle
//! and zip directory (PyTorch) validated before anything is mapped, then mapped or read
//! with positioned reads. Reading its bytes is in [`access`].

mod access;

use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use memmap2::{Advice, Mmap, UncheckedAdvice};

pub(crate) use access::le_ints;

use super::header::{check_prefix, parse_header, Header, TensorInfo};
use super::options::{IoMode, SourceOptions};
#[cfg(feature = "remote")]
use super::remote;
use super::torch;
use crate::error::{Error, Result};

/// The format of one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ShardFormat {
    /// A `.safetensors` file.
    Safetensors,
    /// A PyTorch checkpoint (zip or legacy pickle).
    Torch,
}

/// One validated shard, memory-mapped or read with positioned reads.
pub(crate) struct Shard {
    /// Where it is.
    pub(crate) path: PathBuf,
    /// Its length when it was validated.
    pub(crate) file_len: u64,
    /// The validated tensors.
    pub(crate) header: Header,
    /// Its format.
    pub(crate) format: ShardFormat,
    /// Tensors that are the same view of the same storage as an earlier one:
    /// `(name, tied to)` (PyTorch checkpoints only).
    pub(crate) ties: Vec<(String, String)>,
    data: Data,
}

/// Where a shard's bytes come from.
enum Data {
    /// A local file, mapped in mmap mode.
    Local { file: File, map: Option<Mmap> },
    /// A remote file, read by ranges.
    #[cfg(feature = "remote")]
    Remote(remote::RemoteFile),
}

impl fmt::Debug for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shard")
            .field("path", &self.path)
            .field("file_len", &self.file_len)
            .field("format", &self.format)
            .field("tensors", &self.header.tensors.len())
            .field("mapped", &self.is_mapped())
            .finish()
    }
}

/// Maps the whole of `file` (at `path`), checking the mapping has the length the file
/// was validated with.
fn map_whole(path: &Path, file: &File, file_len: u64) -> Result<Mmap> {
    // SAFETY: see `map_file`; the risk is documented for the whole crate.
    let m = unsafe { crate::io::map::map_file(file) }.map_err(|e| Error::io("map", path, e))?;
    if m.len() as u64 != file_len {
        return Err(Error::size_changed(path, file_len, m.len() as u64));
    }
    Ok(m)
}

/// The header of a PyTorch checkpoint's `tensors`: no JSON header, no metadata.
fn torch_header(tensors: Vec<TensorInfo>) -> Header {
    Header {
        header_len: 0,
        tensors,
        metadata: Vec::new(),
    }
}

/// True for the extensions PyTorch checkpoints carry.
pub(super) fn is_torch_name(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e, "bin" | "pt" | "pth" | "ckpt"))
}

impl Shard {
    /// Opens and validates a shard: a safetensors header is read with positioned reads
    /// and validated before anything is mapped; a PyTorch checkpoint is mapped, its
    /// zip directory and pickle read without running anything, and every tensor checked
    /// against its storage. In read mode the data is then read with positioned reads.
    ///
    /// # Errors
    ///
    /// I/O errors, every header rule of [`parse_header`], every rule of the PyTorch
    /// reader.
    pub(crate) fn open(path: &Path, opts: &SourceOptions) -> Result<Shard> {
        let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
        let meta = file.metadata().map_err(|e| Error::io("stat", path, e))?;
        if !meta.is_file() {
            return Err(Error::NoWeights {
                path: path.to_path_buf(),
                reason: "not a regular file".into(),
            });
        }
        let file_len = meta.len();
        let mut magic = [0u8; 4];
        let sniffed_zip = path.extension().is_none_or(|e| e != "safetensors")
            && file.read_exact_at(&mut magic, 0).is_ok()
            && torch::is_zip(&magic);
        let io = opts.io.resolve(path);
        let (header, ties, format, map) = if is_torch_name(path) || sniffed_zip {
            // The directory, the pickle and the legacy storage headers are read through
            // a mapping (a few pages); the data goes the way `io` says.
            let m = map_whole(path, &file, file_len)?;
            let ckpt = torch::read(path, &m)?;
            // Reading the directory touched a local header before every storage, and a
            // fault maps the whole (large) page-cache folio around it: 80-120 MB of
            // each 1.4 GB shard stayed mapped until its tensors were cast. Unmap them;
            // the pages stay in the page cache.
            // SAFETY: the mapping is read-only and file-backed, and nothing borrowed
            // from it is alive (the checkpoint's description is owned): a later read
            // faults the same bytes in again from the file.
            let _ = unsafe { m.unchecked_advise(UncheckedAdvice::DontNeed) };
            (
                torch_header(ckpt.tensors),
                ckpt.ties,
                ShardFormat::Torch,
                (io == IoMode::Mmap).then_some(m),
            )
        } else {
            let header = read_safetensors_header(path, &file, file_len, opts.max_header_bytes)?;
            let has_data = file_len > 8 + header.header_len;
            let map = if has_data && io == IoMode::Mmap {
                Some(map_whole(path, &file, file_len)?)
            } else {
                None
            };
            (header, Vec::new(), ShardFormat::Safetensors, map)
        };
        if let Some(m) = &map {
            let _ = m.advise(Advice::Sequential);
        }
        Ok(Shard {
            path: path.to_path_buf(),
            file_len,
            header,
            format,
            ties,
            data: Data::Local { file, map },
        })
    }

    /// Opens a remote shard: a safetensors header read with a fixed first read and then
    /// its exact length; a PyTorch zip checkpoint's directory, local headers and pickle
    /// read by ranges into a sparse view ([`remote::archive`]). Both are validated as
    /// local ones are.
    ///
    /// # Errors
    ///
    /// `Remote` for what the network does, every header rule of [`parse_header`], every
    /// rule of the PyTorch reader; a legacy PyTorch checkpoint is refused.
    #[cfg(feature = "remote")]
    pub(super) fn open_remote(
        file: remote::RemoteFile,
        name: &str,
        opts: &SourceOptions,
    ) -> Result<Shard> {
        let path = PathBuf::from(&file.url);
        let sniffed_zip = !name.ends_with(".safetensors")
            && file.size >= 4
            && torch::is_zip(&file.read_direct(0..4)?);
        if is_torch_name(Path::new(name)) || sniffed_zip {
            let view = remote::archive::view(&file)?;
            let ckpt = torch::read(&path, &view)?;
            return Ok(Shard {
                path,
                file_len: file.size,
                header: torch_header(ckpt.tensors),
                format: ShardFormat::Torch,
                ties: ckpt.ties,
                data: Data::Remote(file),
            });
        }
        let file_len = file.size;
        // One read of the first 64 KiB holds most headers whole.
        let first = file.read_direct(0..file_len.min(64 << 10))?;
        let header = header_from(&path, file_len, opts.max_header_bytes, |buf, at| {
            let end = at + buf.len() as u64;
            if end <= first.len() as u64 {
                buf.copy_from_slice(&first[at as usize..end as usize]);
            } else {
                let b = file.read_direct(at..end)?;
                buf.copy_from_slice(&b);
            }
            Ok(())
        })?;
        Ok(Shard {
            path,
            file_len,
            header,
            format: ShardFormat::Safetensors,
            ties: Vec::new(),
            data: Data::Remote(file),
        })
    }
}

/// Reads and validates a safetensors header with positioned reads.
fn read_safetensors_header(path: &Path, file: &File, file_len: u64, cap: u64) -> Result<Header> {
    header_from(path, file_len, cap, |buf, at| {
        file.read_exact_at(buf, at)
            .map_err(|e| Error::io("read", path, e))
    })
}

/// Reads and validates a safetensors header through `read_at(buf, offset)`: the
/// 8-byte length first, checked against the cap and the file's length, then exactly
/// that many bytes.
fn header_from(
    path: &Path,
    file_len: u64,
    cap: u64,
    read_at: impl Fn(&mut [u8], u64) -> Result<()>,
) -> Result<Header> {
    let mut prefix = [0u8; 8];
    let prefix = if file_len >= 8 {
        read_at(&mut prefix, 0)?;
        Some(prefix)
    } else {
        None
    };
    let n = check_prefix(path, prefix, file_len, cap)?;
    // n <= cap, checked against the file length: the allocation is bounded by the cap
    // and by the file's real size.
    let n_usize = usize::try_from(n).map_err(|_| Error::HeaderTooLarge {
        path: path.to_path_buf(),
        claimed: n,
        cap,
    })?;
    let mut bytes = vec![0u8; n_usize];
    read_at(&mut bytes, 8)?;
    parse_header(path, &bytes, file_len)
}
