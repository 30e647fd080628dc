//! Stage 1, the source: resolve what the user named (a directory, a file, a shard index
//! or a hub id in the local cache), find the shards, validate every header before
//! anything is planned, map the data, and check that a shard index and the shard
//! headers agree both ways. [`open`] is the one way in, for convert and verify alike.

mod files;
mod header;
mod hub;
mod pickle;
#[cfg(feature = "remote")]
pub(crate) mod remote;
pub(crate) mod scheme;
mod torch;
mod zip;

pub use files::TOKENIZER_FILES;

/// Entry points for the fuzz targets (`crate::internals`).
pub(crate) mod fuzzing {
    use std::path::Path;

    pub(crate) fn pickle_load(data: &[u8]) -> Result<usize, String> {
        super::pickle::load(data, 0)
            .map(|(t, _, _)| t.len())
            .map_err(|e| format!("{e:?}"))
    }

    pub(crate) fn torch_tensors(data: &[u8]) -> crate::Result<Vec<(String, u64, u64, u64)>> {
        let c = super::torch::read(Path::new("fuzz.bin"), data)?;
        Ok(c.tensors
            .into_iter()
            .map(|t| (t.name, t.numel, t.offset, t.len))
            .collect())
    }

    pub(crate) fn zip_entries(data: &[u8]) -> Result<Vec<(String, u64, u64)>, String> {
        let a = super::zip::Archive::read(data)?;
        a.entries
            .iter()
            .filter(|e| e.method == 0)
            .map(|e| super::zip::Archive::data_range(data, e).map(|(s, l)| (e.name.clone(), s, l)))
            .collect()
    }
}

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use memmap2::{Advice, Mmap, UncheckedAdvice};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;

pub use header::{check_prefix, parse_header, Header, TensorInfo, DEFAULT_MAX_HEADER_BYTES};
pub(crate) use scheme::{Dequantized, Kernel, Role, Scheme, TensorRef};

use crate::dtype::Dtype;
use crate::error::{Error, Result};

/// The conventional name of a sharded checkpoint's index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The conventional name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

/// How a checkpoint is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceOptions {
    /// The largest safetensors header accepted, in bytes (default
    /// [`DEFAULT_MAX_HEADER_BYTES`]).
    pub max_header_bytes: u64,
    /// The Hugging Face cache that hub ids resolve in (default: `HF_HUB_CACHE`,
    /// `HF_HOME/hub`, `~/.cache/huggingface/hub`).
    pub hub_cache: Option<PathBuf>,
    /// How shard data is read (default: auto).
    pub io: IoMode,
    /// Open a pre-quantized checkpoint for writing its tensors as stored: a scheme
    /// that does not match its tensors, or tensors of no declared scheme, are then
    /// not refused (default false).
    pub keep_quantized: bool,
    /// A file holding the Hugging Face token for `hf://` inputs (default: `HF_TOKEN`,
    /// else the token file `huggingface_hub` writes).
    pub token_file: Option<PathBuf>,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            hub_cache: None,
            io: IoMode::Auto,
            keep_quantized: false,
            token_file: None,
        }
    }
}

/// How shard bytes are read (`--io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoMode {
    /// Memory-map on local file systems, positioned reads on network and FUSE file
    /// systems (NFS, SMB, Lustre, Ceph, FUSE/s3fs...), where page faults on a mapping
    /// are reported 30–50× slower.
    #[default]
    Auto,
    /// Memory-map every shard.
    Mmap,
    /// Positioned reads into buffers, a piece of a row at a time.
    Read,
}

impl std::str::FromStr for IoMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(IoMode::Auto),
            "mmap" => Ok(IoMode::Mmap),
            "read" => Ok(IoMode::Read),
            o => Err(format!(
                "unknown I/O mode `{o}` (expected auto, mmap or read)"
            )),
        }
    }
}

impl IoMode {
    /// `Mmap` or `Read` for the file at `path`.
    fn resolve(self, path: &Path) -> IoMode {
        match self {
            IoMode::Auto if is_network_fs(path) => IoMode::Read,
            IoMode::Auto => IoMode::Mmap,
            m => m,
        }
    }
}

/// True when `path` is on a network or FUSE file system, from `/proc/self/mountinfo`
/// (the mount with the longest matching mount point). False when it cannot tell.
fn is_network_fs(path: &Path) -> bool {
    let Ok(path) = std::fs::canonicalize(path) else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let mut best: Option<(usize, &str)> = None;
    for line in info.lines() {
        // `id parent major:minor root mount-point options ... - fstype source options`
        let mut fields = line.split(' ');
        let Some(mount) = fields.nth(4) else { continue };
        let Some(fstype) = line.split(" - ").nth(1).and_then(|r| r.split(' ').next()) else {
            continue;
        };
        let mount = mount.replace("\\040", " ");
        if path.starts_with(&mount) && best.is_none_or(|(n, _)| mount.len() >= n) {
            best = Some((mount.len(), fstype));
        }
    }
    best.is_some_and(|(_, t)| {
        let t = t.to_ascii_lowercase();
        t.starts_with("nfs")
            || t.starts_with("fuse")
            || matches!(
                t.as_str(),
                "cifs"
                    | "smb3"
                    | "smbfs"
                    | "lustre"
                    | "ceph"
                    | "9p"
                    | "glusterfs"
                    | "gpfs"
                    | "beegfs"
                    | "afs"
                    | "davfs"
                    | "virtiofs"
            )
    })
}

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

/// Maps `file` read-only.
///
/// # Safety
///
/// The mapping is undefined behaviour if another process changes the file while it is
/// mapped, and truncation turns later reads into SIGBUS. This is the documented risk of
/// converting a checkpoint that is being rewritten; [`Shard::check_unchanged`] re-checks
/// the length before every batch of reads to catch the common case early.
unsafe fn map_file(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: forwarded to the caller, see above.
    unsafe { Mmap::map(file) }
}

/// True for the extensions PyTorch checkpoints carry.
fn is_torch_name(path: &Path) -> bool {
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
        let map_whole = |file: &File| -> Result<Mmap> {
            // SAFETY: see `map_file`; the risk is documented for the whole crate.
            let m = unsafe { map_file(file) }.map_err(|e| Error::io("map", path, e))?;
            if m.len() as u64 != file_len {
                return Err(Error::size_changed(path, file_len, m.len() as u64));
            }
            Ok(m)
        };
        let (header, ties, format, map) = if is_torch_name(path) || sniffed_zip {
            // The directory, the pickle and the legacy storage headers are read through
            // a mapping (a few pages); the data goes the way `io` says.
            let m = map_whole(&file)?;
            let ckpt = torch::read(path, &m)?;
            // Reading the directory touched a local header before every storage, and a
            // fault maps the whole (large) page-cache folio around it: 80-120 MB of
            // each 1.4 GB shard stayed mapped until its tensors were cast. Unmap them;
            // the pages stay in the page cache.
            // SAFETY: the mapping is read-only and file-backed, and nothing borrowed
            // from it is alive (the checkpoint's description is owned): a later read
            // faults the same bytes in again from the file.
            let _ = unsafe { m.unchecked_advise(UncheckedAdvice::DontNeed) };
            let header = Header {
                header_len: 0,
                tensors: ckpt.tensors,
                metadata: Vec::new(),
            };
            (
                header,
                ckpt.ties,
                ShardFormat::Torch,
                (io == IoMode::Mmap).then_some(m),
            )
        } else {
            let header = read_safetensors_header(path, &file, file_len, opts.max_header_bytes)?;
            let has_data = file_len > 8 + header.header_len;
            let map = if has_data && io == IoMode::Mmap {
                Some(map_whole(&file)?)
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
    fn open_remote(file: remote::RemoteFile, name: &str, opts: &SourceOptions) -> Result<Shard> {
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
                header: Header {
                    header_len: 0,
                    tensors: ckpt.tensors,
                    metadata: Vec::new(),
                },
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

    /// Source bytes of elements `[first, first + count)` of tensor `t` (one of this
    /// shard's), in row-major order: borrowed from the mapping for a contiguous tensor,
    /// read with a positioned read in read mode, gathered for a strided view.
    ///
    /// # Errors
    ///
    /// `Io` for a failed read; `Internal` if the range is not inside the tensor (ranges
    /// derived from a validated plan always are).
    ///
    /// Bytes that are not borrowed from the mapping (read mode, strided views) go into
    /// `scratch`, which the caller keeps across calls: its memory is reused, not
    /// allocated and zeroed again for every piece.
    ///
    /// # Memory
    ///
    /// `scratch` grows to the largest request, plus for a strided view in read mode the
    /// storage span the view covers is read into a buffer of its own.
    pub(crate) fn elements<'a>(
        &'a self,
        t: &TensorInfo,
        first: u64,
        count: u64,
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8]> {
        let es = t.dtype.size() as u64;
        let outside = || {
            Error::internal(format!(
                "{}: elements [{first}, {first}+{count}) of tensor `{}` are outside it",
                self.path.display(),
                crate::error::sanitize(&t.name)
            ))
        };
        let inside = first.checked_add(count).is_some_and(|end| end <= t.numel);
        debug_assert!(inside, "elements outside tensor `{}`", t.name);
        if !inside {
            return Err(outside());
        }
        if count == 0 {
            return Ok(&[]);
        }
        match &t.strides {
            None => self
                .range(t.offset + first * es, count * es, scratch)
                .ok_or_else(outside)?,
            Some(strides) => {
                let mut own = Vec::new();
                let span = self
                    .range(t.offset, t.len, &mut own)
                    .ok_or_else(outside)??;
                gather(span, &t.shape, strides, es as usize, first, count, scratch)
                    .ok_or_else(outside)?;
                Ok(scratch.as_slice())
            }
        }
    }

    /// `len` bytes at absolute offset `at`, borrowed from the mapping or read into
    /// `scratch`: `None` when outside the file.
    fn range<'a>(
        &'a self,
        at: u64,
        len: u64,
        scratch: &'a mut Vec<u8>,
    ) -> Option<Result<&'a [u8]>> {
        self.range_with(at, len, scratch, true)
    }

    /// [`Shard::range`], populating mapped pages first only with `populate`.
    fn range_with<'a>(
        &'a self,
        at: u64,
        len: u64,
        scratch: &'a mut Vec<u8>,
        populate: bool,
    ) -> Option<Result<&'a [u8]>> {
        let end = at.checked_add(len).filter(|&e| e <= self.file_len)?;
        let (file, map) = match &self.data {
            Data::Local { file, map } => (file, map),
            #[cfg(feature = "remote")]
            Data::Remote(r) => {
                let n = usize::try_from(len).ok()?;
                if scratch.len() < n {
                    scratch.resize(n, 0);
                }
                let buf = &mut scratch[..n];
                return Some(r.read_into(at, buf).map(|()| &*buf));
            }
        };
        match map {
            Some(m) => {
                let slice = m.get(usize::try_from(at).ok()?..usize::try_from(end).ok()?)?;
                if populate {
                    self.prefetch(at, len);
                }
                Some(Ok(slice))
            }
            None => {
                let n = usize::try_from(len).ok()?;
                // Only growth is zero-filled; the bytes are overwritten by the read.
                if scratch.len() < n {
                    scratch.resize(n, 0);
                }
                let buf = &mut scratch[..n];
                Some(
                    file.read_exact_at(buf, at)
                        // A read that fails because the file shrank says so.
                        .map_err(|e| match self.check_unchanged() {
                            Err(changed) => changed,
                            Ok(()) => Error::io("read", &self.path, e),
                        })
                        .map(|()| &*buf),
                )
            }
        }
    }

    /// Bytes `[at, at + len)` of the contiguous tensor `t` (byte offsets inside the
    /// tensor), borrowed from the mapping or read into `scratch`; the way the
    /// dequantizers read codes, scales and indices, sub-byte types included.
    ///
    /// # Errors
    ///
    /// `Io` for a failed read; `Internal` if the range is not inside the tensor.
    pub(crate) fn bytes<'a>(
        &'a self,
        t: &TensorInfo,
        at: u64,
        len: u64,
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8]> {
        self.bytes_with(t, at, len, scratch, true)
    }

    /// [`Shard::bytes`] of a range an earlier piece already read: a mapped range is
    /// borrowed without populating its pages again (the kernels that read a whole
    /// stored tensor for every piece of their output would otherwise walk all its
    /// pages once per piece).
    pub(crate) fn bytes_again<'a>(
        &'a self,
        t: &TensorInfo,
        at: u64,
        len: u64,
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8]> {
        self.bytes_with(t, at, len, scratch, false)
    }

    fn bytes_with<'a>(
        &'a self,
        t: &TensorInfo,
        at: u64,
        len: u64,
        scratch: &'a mut Vec<u8>,
        populate: bool,
    ) -> Result<&'a [u8]> {
        let inside = t.strides.is_none() && at.checked_add(len).is_some_and(|e| e <= t.len);
        if !inside {
            return Err(Error::internal(format!(
                "{}: bytes [{at}, {at}+{len}) of tensor `{}` are outside it",
                self.path.display(),
                crate::error::sanitize(&t.name)
            )));
        }
        if len == 0 {
            return Ok(&[]);
        }
        self.range_with(t.offset + at, len, scratch, populate)
            .ok_or_else(|| {
                Error::internal(format!(
                    "{}: tensor `{}` lies outside the file",
                    self.path.display(),
                    crate::error::sanitize(&t.name)
                ))
            })?
    }

    /// The values of a small integer tensor (`weight_shape`: a few I64 or I32), read
    /// at open time; at most 64 of them.
    ///
    /// # Errors
    ///
    /// `Prequantized` for another dtype, more than 64 values or a negative one; `Io`.
    pub(crate) fn read_ints(&self, t: &TensorInfo) -> Result<Vec<u64>> {
        let bad = |reason: String| Error::Prequantized {
            path: self.path.clone(),
            tensor: Some(t.name.clone()),
            scheme: "compressed-tensors".into(),
            reason,
        };
        if !matches!(t.dtype, Dtype::I64 | Dtype::I32) || t.numel > 64 {
            return Err(bad(format!(
                "expected at most 64 integers (I64 or I32), found {} {:?}",
                t.dtype, t.shape
            )));
        }
        let mut scratch = Vec::new();
        let b = self.bytes(t, 0, t.len, &mut scratch)?;
        let vals = le_ints(t.dtype, b);
        vals.iter()
            .map(|&v| u64::try_from(v).map_err(|_| bad(format!("holds the negative value {v}"))))
            .collect()
    }

    /// [`Shard::release`] by bytes `[at, at + len)` inside the contiguous tensor `t`.
    ///
    /// # Safety
    ///
    /// As [`Shard::release`]: no slice borrowed from the range is read afterwards.
    pub(crate) unsafe fn release_bytes(&self, t: &TensorInfo, at: u64, len: u64) {
        const PAGE: u64 = 4096;
        let Some(m) = self.map() else { return };
        if t.strides.is_some() {
            return;
        }
        let offset = t.offset.saturating_add(at);
        let start = offset.div_ceil(PAGE) * PAGE;
        let end = (offset.saturating_add(len) / PAGE) * PAGE;
        if end > start && end <= m.len() as u64 {
            // SAFETY: the mapping is read-only and file-backed: dropping its pages only
            // makes a later read fault them in again from the file; the caller promises
            // no borrowed slice of the range is read afterwards.
            let _ = unsafe {
                m.unchecked_advise_range(
                    UncheckedAdvice::DontNeed,
                    start as usize,
                    (end - start) as usize,
                )
            };
        }
    }

    /// Whether the shard's data is mapped (else it is read with positioned reads).
    pub(crate) fn is_mapped(&self) -> bool {
        self.map().is_some()
    }

    fn map(&self) -> Option<&Mmap> {
        match &self.data {
            Data::Local { map, .. } => map.as_ref(),
            #[cfg(feature = "remote")]
            Data::Remote(_) => None,
        }
    }

    /// Re-checks that the file still has the length it was validated with.
    ///
    /// # Errors
    ///
    /// `SourceChanged` when it shrank or grew.
    pub(crate) fn check_unchanged(&self) -> Result<()> {
        let file = match &self.data {
            Data::Local { file, .. } => file,
            // Every response is checked as it arrives; this reports the first mismatch.
            #[cfg(feature = "remote")]
            Data::Remote(r) => return r.check(),
        };
        let now = file
            .metadata()
            .map_err(|e| Error::io("stat", &self.path, e))?
            .len();
        if now != self.file_len {
            return Err(Error::size_changed(&self.path, self.file_len, now));
        }
        Ok(())
    }

    /// Maps the pages of `[offset, offset+len)` in one call (`MADV_POPULATE_READ`)
    /// instead of one page fault per 16 pages while casting. Best effort: older kernels
    /// without it just fault as usual.
    fn prefetch(&self, offset: u64, len: u64) {
        const PAGE: u64 = 4096;
        let Some(m) = self.map() else { return };
        let start = offset / PAGE * PAGE;
        let end = offset.saturating_add(len).min(m.len() as u64);
        if end > start {
            let _ = m.advise_range(Advice::PopulateRead, start as usize, (end - start) as usize);
        }
    }

    /// Tells the kernel the mapped pages of elements `[first, first + count)` of the
    /// contiguous tensor `t` are no longer needed, so the mapping does not keep the
    /// whole checkpoint resident. Only whole pages strictly inside the range are
    /// released, so neighbouring tensors are untouched; views and read mode release
    /// nothing.
    ///
    /// # Safety
    ///
    /// No slice borrowed from this range (through [`Shard::elements`]) may be read after
    /// the call. For this read-only, file-backed mapping a later read would fault the
    /// pages back in from the file, so the data seen stays the same; the contract is
    /// kept anyway so that the release is never a surprise to a borrower.
    pub(crate) unsafe fn release(&self, t: &TensorInfo, first: u64, count: u64) {
        let es = t.dtype.size() as u64;
        // SAFETY: forwarded to the caller.
        unsafe { self.release_bytes(t, first.saturating_mul(es), count.saturating_mul(es)) }
    }
}

/// Little-endian I64 elements, or I32 ones for any other dtype, as i64.
pub(crate) fn le_ints(dtype: Dtype, b: &[u8]) -> Vec<i64> {
    match dtype {
        Dtype::I64 => b
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
        _ => b
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
            .collect(),
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

/// Elements `[first, first + count)` in row-major order of a view with `shape` and
/// element `strides` over `span` (which starts at the view's first element), into
/// `out` (cleared first). `None` when an element falls outside `span` (the view was
/// checked against its storage, so it does not).
fn gather(
    span: &[u8],
    shape: &[u64],
    strides: &[u64],
    es: usize,
    first: u64,
    count: u64,
    out: &mut Vec<u8>,
) -> Option<()> {
    out.clear();
    out.reserve(usize::try_from(count).ok()?.checked_mul(es)?);
    let nd = shape.len();
    let mut idx = vec![0u64; nd];
    let mut rem = first;
    for d in (0..nd).rev() {
        idx[d] = rem % shape[d];
        rem /= shape[d];
    }
    let mut off: u64 = idx.iter().zip(strides).map(|(&i, &s)| i * s).sum();
    for _ in 0..count {
        let at = usize::try_from(off).ok()?.checked_mul(es)?;
        out.extend_from_slice(span.get(at..at.checked_add(es)?)?);
        for d in (0..nd).rev() {
            idx[d] += 1;
            off += strides[d];
            if idx[d] < shape[d] {
                break;
            }
            off -= strides[d] * shape[d];
            idx[d] = 0;
        }
    }
    Some(())
}

/// An open checkpoint: every header validated, every shard mapped, in order, with the
/// directory that holds its config and tokenizer files. Made by [`open`].
#[derive(Debug)]
pub struct Source {
    /// What the user named (a path or a hub id).
    pub(crate) name: String,
    /// Where it resolved to (after hub resolution).
    pub(crate) input: PathBuf,
    /// The directory with `config.json` and tokenizer files.
    pub(crate) model_dir: PathBuf,
    /// The shard index, when the checkpoint is sharded.
    pub(crate) index: Option<PathBuf>,
    /// Shards in order (index order by file name, or the single file).
    pub(crate) shards: Vec<Shard>,
    /// What the user should know about how the input was read.
    pub(crate) notices: Vec<String>,
    /// The pre-quantization scheme `config.json` declares, matched to the tensors.
    pub(crate) scheme: Option<Scheme>,
    /// Unique among the sources this process opened: what per-thread caches of its
    /// bytes are keyed on (a later source may map the same addresses).
    pub(crate) id: u64,
    /// A remote source's client, cache and private directory of small files.
    #[cfg(feature = "remote")]
    pub(crate) remote: Option<remote::Remote>,
}

/// A tensor as a conversion sees it: stored, or dequantized from several stored ones.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Logical<'a> {
    /// Where it stands in source order (the stored tensor, or the dequantized one's
    /// main tensor).
    pub(crate) at: TensorRef,
    /// Its name, dtype and shape (a dequantized one's: F32 values of the output shape).
    pub(crate) info: &'a TensorInfo,
    /// How it is dequantized, if it is.
    pub(crate) dequant: Option<&'a Dequantized>,
}

/// What [`Source::logical`] leaves out, and why.
#[derive(Debug, Clone, Default)]
pub(crate) struct Consumed {
    /// `(stored name, dequantized name)` of the scales, zeros and indices consumed.
    pub(crate) consumed: Vec<(String, String)>,
    /// `(stored name, reason)` of the tensors the scheme does not need.
    pub(crate) dropped: Vec<(String, String)>,
}

impl Source {
    /// What the user named: a path, or a hub id.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The path it resolved to: a directory, a file or a shard index.
    pub fn path(&self) -> &Path {
        &self.input
    }

    /// The directory holding `config.json` and the tokenizer files.
    pub fn model_dir(&self) -> &Path {
        &self.model_dir
    }

    /// The files holding tensors, in order.
    pub fn shard_paths(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|s| s.path.as_path())
    }

    /// The input files: the shards and the index, when there is one.
    pub(crate) fn files(&self) -> impl Iterator<Item = &Path> {
        self.shard_paths().chain(self.index.as_deref())
    }

    /// What the user should know about how the input was read (both safetensors and
    /// `.bin` weights found, ...).
    pub fn notices(&self) -> &[String] {
        &self.notices
    }

    /// Tensors of PyTorch checkpoints that are the same view of the same storage as an
    /// earlier one (tied weights): `(name, tied to)`.
    pub(crate) fn ties(&self) -> impl Iterator<Item = &(String, String)> {
        self.shards.iter().flat_map(|s| &s.ties)
    }

    /// The tensors a conversion takes, in source order: with `dequantize` (unless
    /// `--keep-quantized`), each quantized weight of the scheme once, dequantized, in
    /// its main tensor's place, its scales and zeros consumed and activation scales
    /// dropped; otherwise every stored tensor as it is.
    pub(crate) fn logical(&self, dequantize: bool) -> (Vec<Logical<'_>>, Consumed) {
        let mut out = Vec::new();
        let mut gone = Consumed::default();
        let scheme = self.scheme.as_ref().filter(|_| dequantize);
        for (s, shard) in self.shards.iter().enumerate() {
            for (t, info) in shard.header.tensors.iter().enumerate() {
                let at = TensorRef {
                    shard: s,
                    tensor: t,
                };
                match scheme.and_then(|sc| sc.roles.get(&at).map(|r| (sc, r))) {
                    None => out.push(Logical {
                        at,
                        info,
                        dequant: None,
                    }),
                    Some((sc, Role::Main(i))) => {
                        let d = &sc.tensors[*i];
                        out.push(Logical {
                            at,
                            info: &d.info,
                            dequant: Some(d),
                        })
                    }
                    Some((sc, Role::Consumed(i))) => gone
                        .consumed
                        .push((info.name.clone(), sc.tensors[*i].name.clone())),
                    Some((_, Role::Dropped(why))) => {
                        gone.dropped.push((info.name.clone(), why.clone()))
                    }
                }
            }
        }
        (out, gone)
    }

    /// The dequantized weight whose main tensor is `at`, when `dequantize` is on and
    /// the scheme has one there.
    pub(crate) fn dequantized_at(&self, at: TensorRef, dequantize: bool) -> Option<&Dequantized> {
        let sc = self.scheme.as_ref().filter(|_| dequantize)?;
        match sc.roles.get(&at)? {
            Role::Main(i) => sc.tensors.get(*i),
            _ => None,
        }
    }

    /// Makes reads of a remote source that wait on the network return `Cancelled`
    /// once `flag` is set (a local source reads without waiting on anyone).
    pub(crate) fn set_cancel(&self, flag: std::sync::Arc<std::sync::atomic::AtomicBool>) {
        #[cfg(feature = "remote")]
        if let Some(r) = &self.remote {
            r.set_cancel(flag);
        }
        #[cfg(not(feature = "remote"))]
        let _ = flag;
    }

    /// Sizes what a remote source holds in memory (its range cache) for `readers`
    /// reading at once within a conversion's `budget` of bytes in flight; the bytes it
    /// may hold, 0 for a local source (its mapped pages are the page cache's, released
    /// once cast).
    pub(crate) fn size_for(&self, readers: usize, budget: u64) -> u64 {
        #[cfg(feature = "remote")]
        if let Some(r) = &self.remote {
            return r.size_for(readers, budget);
        }
        let _ = (readers, budget);
        0
    }

    /// For a remote source: the body bytes received so far and the requests sent.
    pub fn fetched(&self) -> Option<(u64, u64)> {
        #[cfg(feature = "remote")]
        return self.remote.as_ref().map(|r| r.fetched());
        #[cfg(not(feature = "remote"))]
        None
    }

    /// The pre-quantization scheme, when the checkpoint has one.
    pub(crate) fn scheme(&self) -> Option<&Scheme> {
        self.scheme.as_ref()
    }

    /// Every tensor with its shard index, in source order.
    pub(crate) fn tensors(&self) -> impl Iterator<Item = (usize, &TensorInfo)> {
        self.shards
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.header.tensors.iter().map(move |t| (i, t)))
    }
}

/// A `name -> value` JSON map that refuses duplicate keys instead of keeping the last.
struct StrictMap(Vec<(String, String)>, Option<String>);

impl<'de> Deserialize<'de> for StrictMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StrictMap;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of tensor names to shard file names")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<StrictMap, A::Error> {
                let mut seen = HashSet::new();
                let mut out = StrictMap(Vec::new(), None);
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    if !seen.insert(k.clone()) && out.1.is_none() {
                        out.1 = Some(k);
                        continue;
                    }
                    out.0.push((k, v));
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Deserialize)]
struct RawIndex {
    weight_map: StrictMap,
}

/// Rejects shard names that could leave the model directory.
fn check_shard_name(index: &Path, name: &str) -> Result<()> {
    let bad = name.is_empty()
        || name.contains('/')
        || name.contains('\\')
        || name.contains('\0')
        || name == "."
        || name == ".."
        || Path::new(name).is_absolute();
    if bad {
        return Err(Error::InvalidIndex {
            path: index.to_path_buf(),
            reason: format!(
                "shard name `{}` is not a plain file name",
                crate::error::sanitize(name)
            ),
        });
    }
    Ok(())
}

/// Where a checkpoint's files are: a local directory, or a remote listing. The rules
/// for finding the weights in it and checking an index against its shards are the same
/// for both.
pub(crate) trait Dir {
    /// A file's path as messages show it (a local path, or a URL).
    fn path(&self, name: &str) -> PathBuf;
    /// Whether `name` is a file of the directory.
    fn is_file(&self, name: &str) -> bool;
    /// The directory's file names (not in subdirectories), sorted.
    fn names(&self) -> Result<Vec<String>>;
    /// Opens and validates the shard `name`.
    fn open_shard(&self, name: &str, opts: &SourceOptions) -> Result<Shard>;
    /// The text of the small file `name` (an index).
    fn read_to_string(&self, name: &str) -> Result<String>;
}

/// A local directory.
struct LocalDir(PathBuf);

impl Dir for LocalDir {
    fn path(&self, name: &str) -> PathBuf {
        if name.is_empty() {
            // The directory itself, as the user named it (no trailing `/`).
            return self.0.clone();
        }
        self.0.join(name)
    }

    fn is_file(&self, name: &str) -> bool {
        self.0.join(name).is_file()
    }

    fn names(&self) -> Result<Vec<String>> {
        Ok(files_in(&self.0, |_| true)?
            .iter()
            .filter_map(|p| p.file_name()?.to_str().map(String::from))
            .collect())
    }

    fn open_shard(&self, name: &str, opts: &SourceOptions) -> Result<Shard> {
        Shard::open(&self.0.join(name), opts)
    }

    fn read_to_string(&self, name: &str) -> Result<String> {
        let p = self.0.join(name);
        std::fs::read_to_string(&p).map_err(|e| Error::io("read", &p, e))
    }
}

/// Looks for `tensor` in the files of `dir` with the listed shards' extension that the
/// index does not list, to say where a mis-indexed tensor really is.
fn find_in_unlisted(
    dir: &dyn Dir,
    listed: &[&str],
    tensor: &str,
    opts: &SourceOptions,
) -> Option<String> {
    let ext = listed.first().and_then(|n| Path::new(n).extension())?;
    let others: Vec<String> = dir
        .names()
        .ok()?
        .into_iter()
        .filter(|n| Path::new(n).extension() == Some(ext) && !listed.contains(&n.as_str()))
        .collect();
    others.into_iter().find(|n| {
        dir.open_shard(n, opts)
            .is_ok_and(|s| s.header.tensors.iter().any(|t| t.name == tensor))
    })
}

/// Opens a sharded checkpoint from its index file `name` in `dir`.
fn open_index(dir: &dyn Dir, name: &str, opts: &SourceOptions) -> Result<(Vec<Shard>, PathBuf)> {
    let index = &dir.path(name);
    let text = dir.read_to_string(name)?;
    let raw: RawIndex = serde_json::from_str(&text).map_err(|e| Error::InvalidIndex {
        path: index.to_path_buf(),
        reason: e.to_string(),
    })?;
    if let Some(tensor) = raw.weight_map.1 {
        return Err(Error::DuplicateTensor {
            path: index.to_path_buf(),
            tensor,
            other: None,
        });
    }
    let map: Vec<(String, String)> = raw.weight_map.0;
    if map.is_empty() {
        return Err(Error::InvalidIndex {
            path: index.to_path_buf(),
            reason: "`weight_map` is empty".into(),
        });
    }
    let mut names: Vec<&str> = map.iter().map(|(_, s)| s.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    for n in &names {
        check_shard_name(index, n)?;
    }
    let missing: Vec<String> = names
        .iter()
        .filter(|n| !dir.is_file(n))
        .map(|n| n.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(Error::MissingShards {
            path: index.to_path_buf(),
            shards: missing,
        });
    }
    let shards = names
        .iter()
        .map(|n| dir.open_shard(n, opts))
        .collect::<Result<Vec<_>>>()?;
    // Where each tensor really is, refusing duplicates across shards.
    let mut found: HashMap<&str, usize> = HashMap::new();
    for (i, s) in shards.iter().enumerate() {
        for t in &s.header.tensors {
            if let Some(&j) = found.get(t.name.as_str()) {
                return Err(Error::DuplicateTensor {
                    path: s.path.clone(),
                    tensor: t.name.clone(),
                    other: Some(shards[j].path.clone()),
                });
            }
            found.insert(&t.name, i);
        }
    }
    let by_name: HashMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let mismatch = |tensor: &str, reason: String| Error::ShardMismatch {
        path: index.to_path_buf(),
        tensor: tensor.to_string(),
        reason,
    };
    let listed: BTreeMap<&str, &str> = map.iter().map(|(t, s)| (t.as_str(), s.as_str())).collect();
    for (tensor, shard) in &listed {
        match found.get(tensor) {
            None => {
                let elsewhere = find_in_unlisted(dir, &names, tensor, opts);
                return Err(mismatch(
                    tensor,
                    match elsewhere {
                        Some(other) => {
                            format!("the index maps it to {shard}, but it is in {other}")
                        }
                        None => format!("the index maps it to {shard}, but no shard holds it"),
                    },
                ));
            }
            Some(&i) if by_name.get(shard) != Some(&i) => {
                return Err(mismatch(
                    tensor,
                    format!("the index maps it to {shard}, but it is in {}", names[i]),
                ))
            }
            Some(_) => {}
        }
    }
    for (i, s) in shards.iter().enumerate() {
        for t in &s.header.tensors {
            if !listed.contains_key(t.name.as_str()) {
                return Err(mismatch(
                    &t.name,
                    format!("it is in {} but the index does not list it", names[i]),
                ));
            }
        }
    }
    let parent = index.parent().unwrap_or(Path::new(".")).to_path_buf();
    Ok((shards, parent))
}

/// Opens what the user named: a model directory, a `.safetensors` file, a shard index,
/// or a hub id (`org/name[@revision]`) in the local Hugging Face cache, and validates
/// every header before anything is planned.
///
/// # Errors
///
/// `NotInHubCache` for a hub id that is not cached, `NoWeights` when there is nothing
/// to convert, and every header and index rule.
pub fn open(input: impl AsRef<Path>, opts: &SourceOptions) -> Result<Source> {
    let input = input.as_ref();
    let name = input.to_string_lossy().into_owned();
    if is_url(&name) {
        #[cfg(feature = "remote")]
        {
            let mut source = open_url(&name, opts)?;
            source.name = name;
            return Ok(source);
        }
        #[cfg(not(feature = "remote"))]
        return Err(Error::NoWeights {
            path: input.to_path_buf(),
            reason: "this build of modelconv reads local files only (build it with the \
                     `remote` feature for hf://, https:// and s3:// inputs)"
                .into(),
        });
    }
    let path = if hub::looks_like_hub_id(&name) {
        let cache = opts.hub_cache.clone().unwrap_or_else(hub::cache_dir);
        hub::resolve(&name, &cache)?
    } else {
        input.to_path_buf()
    };
    let mut source = open_path(&path, opts)?;
    source.name = name;
    Ok(source)
}

pub use crate::io::url::is_url;

/// The conventional names of a PyTorch checkpoint and its shard index.
pub const TORCH_FILE: &str = "pytorch_model.bin";
/// The index of a sharded PyTorch checkpoint.
pub const TORCH_INDEX_FILE: &str = "pytorch_model.bin.index.json";

/// Files in `dir` whose extension passes `keep`, sorted.
fn files_in(dir: &Path, keep: impl Fn(&Path) -> bool) -> Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io("list", dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && keep(p))
        .collect();
    found.sort();
    Ok(found)
}

/// The weights of a model directory: a safetensors index or file first, then a
/// PyTorch index or file; `(shards, index, notices)`.
fn open_dir(
    input: &dyn Dir,
    opts: &SourceOptions,
) -> Result<(Vec<Shard>, Option<PathBuf>, Vec<String>)> {
    let names = input.names()?;
    let st: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    let bin: Vec<&String> = names
        .iter()
        .filter(|n| is_torch_name(Path::new(n)))
        .collect();
    let mut notices = Vec::new();
    let (idx, single, found, kind) = if input.is_file(INDEX_FILE) || !st.is_empty() {
        if input.is_file(TORCH_INDEX_FILE) || !bin.is_empty() {
            notices.push(
                "the directory has safetensors and PyTorch .bin weights; using safetensors".into(),
            );
        }
        (INDEX_FILE, SINGLE_FILE, st, ".safetensors")
    } else {
        (
            TORCH_INDEX_FILE,
            TORCH_FILE,
            bin,
            "PyTorch (.bin, .pt, .pth)",
        )
    };
    if input.is_file(idx) {
        let (s, _) = open_index(input, idx, opts)?;
        return Ok((s, Some(input.path(idx)), notices));
    }
    if input.is_file(single) {
        return Ok((vec![input.open_shard(single, opts)?], None, notices));
    }
    let base = input.path("");
    match found.as_slice() {
        [one] => Ok((vec![input.open_shard(one, opts)?], None, notices)),
        [] => Err(Error::NoWeights {
            path: base,
            reason: format!("no {SINGLE_FILE}, {INDEX_FILE}, {TORCH_FILE} or {TORCH_INDEX_FILE}"),
        }),
        many => Err(Error::NoWeights {
            path: base,
            reason: format!(
                "{} {kind} files and no index; name one file or the index",
                many.len()
            ),
        }),
    }
}

/// `BigEndianHost` on a big-endian host: safetensors, PyTorch storages and the weight
/// format are little-endian and nothing byte-swaps them. The environment variable
/// `MODELCONV_TEST_BIG_ENDIAN_HOST` makes a little-endian host take this path, so the
/// refusal is tested through the binary where no big-endian machine or emulator is at
/// hand (RELIABILITY row 30).
pub(crate) fn refuse_big_endian_host() -> Result<()> {
    if cfg!(target_endian = "big") || std::env::var_os("MODELCONV_TEST_BIG_ENDIAN_HOST").is_some() {
        return Err(Error::BigEndianHost);
    }
    Ok(())
}

fn open_path(input: &Path, opts: &SourceOptions) -> Result<Source> {
    refuse_big_endian_host()?;
    let meta = std::fs::metadata(input).map_err(|e| Error::io("open", input, e))?;
    let parent = |p: &Path| match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let (shards, model_dir, index, notices) = if meta.is_dir() {
        let (s, index, notices) = open_dir(&LocalDir(input.to_path_buf()), opts)?;
        (s, input.to_path_buf(), index, notices)
    } else if input.extension().is_some_and(|e| e == "json") {
        let dir = LocalDir(parent(input));
        let name = input
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (s, d) = open_index(&dir, &name, opts)?;
        (s, d, Some(input.to_path_buf()), Vec::new())
    } else {
        (
            vec![Shard::open(input, opts)?],
            parent(input),
            None,
            Vec::new(),
        )
    };
    finish(input, model_dir, index, shards, notices, opts)
}

/// The source of validated shards: the pre-quantization scheme recognised, an id.
fn finish(
    input: &Path,
    model_dir: PathBuf,
    index: Option<PathBuf>,
    shards: Vec<Shard>,
    notices: Vec<String>,
    opts: &SourceOptions,
) -> Result<Source> {
    let scheme = match scheme::recognise(&model_dir, &shards) {
        // Kept as stored: the scheme (when it matches) is only recorded.
        Err(_) if opts.keep_quantized => None,
        r => r?,
    };
    Ok(Source {
        name: String::new(),
        input: input.to_path_buf(),
        model_dir,
        index,
        shards,
        notices,
        scheme,
        id: {
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        },
        #[cfg(feature = "remote")]
        remote: None,
    })
}

/// Opens a checkpoint by URL (`hf://`, `https://`, `s3://`).
#[cfg(feature = "remote")]
fn open_url(url: &str, opts: &SourceOptions) -> Result<Source> {
    refuse_big_endian_host()?;
    let o = remote::open(url, opts)?;
    let mut source = finish(
        Path::new(url),
        o.model_dir,
        o.index,
        o.shards,
        o.notices,
        opts,
    )?;
    source.remote = Some(o.remote);
    Ok(source)
}
