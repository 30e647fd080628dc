//! Stage 1, the source: resolve what the user named (a directory, a file, a shard index
//! or a hub id in the local cache), find the shards, validate every header before
//! anything is planned, map the data, and check that a shard index and the shard
//! headers agree both ways. [`open`] is the one way in, for convert and verify alike.

mod header;
mod hub;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use memmap2::{Advice, Mmap, UncheckedAdvice};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;

pub use header::{check_prefix, parse_header, Header, TensorInfo, DEFAULT_MAX_HEADER_BYTES};

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
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            hub_cache: None,
        }
    }
}

/// One memory-mapped, validated safetensors file.
pub(crate) struct Shard {
    /// Where it is.
    pub(crate) path: PathBuf,
    /// Its length when it was validated.
    pub(crate) file_len: u64,
    /// The validated header.
    pub(crate) header: Header,
    file: File,
    map: Option<Mmap>,
}

impl fmt::Debug for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shard")
            .field("path", &self.path)
            .field("file_len", &self.file_len)
            .field("tensors", &self.header.tensors.len())
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

impl Shard {
    /// Opens and validates a safetensors file: the header is read with positioned reads
    /// and validated before the data is mapped.
    ///
    /// # Errors
    ///
    /// I/O errors, and every header rule of [`parse_header`].
    pub(crate) fn open(path: &Path, max_header_bytes: u64) -> Result<Shard> {
        let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
        let meta = file.metadata().map_err(|e| Error::io("stat", path, e))?;
        if !meta.is_file() {
            return Err(Error::NoWeights {
                path: path.to_path_buf(),
                reason: "not a regular file".into(),
            });
        }
        let file_len = meta.len();
        let mut prefix = [0u8; 8];
        let prefix = if file_len >= 8 {
            file.read_exact_at(&mut prefix, 0)
                .map_err(|e| Error::io("read", path, e))?;
            Some(prefix)
        } else {
            None
        };
        let n = check_prefix(path, prefix, file_len, max_header_bytes)?;
        // n <= cap <= u64 range checked against the file length: the allocation is bounded
        // by the cap and by the file's real size.
        let n_usize = usize::try_from(n).map_err(|_| Error::HeaderTooLarge {
            path: path.to_path_buf(),
            claimed: n,
            cap: max_header_bytes,
        })?;
        let mut bytes = vec![0u8; n_usize];
        file.read_exact_at(&mut bytes, 8)
            .map_err(|e| Error::io("read", path, e))?;
        let header = parse_header(path, &bytes, file_len)?;
        drop(bytes);
        let map = if file_len > 8 + header.header_len {
            // SAFETY: see `map_file`; the risk is documented for the whole crate.
            let m = unsafe { map_file(&file) }.map_err(|e| Error::io("map", path, e))?;
            if m.len() as u64 != file_len {
                return Err(Error::SourceChanged {
                    path: path.to_path_buf(),
                    was: file_len,
                    now: m.len() as u64,
                });
            }
            let _ = m.advise(Advice::Sequential);
            Some(m)
        } else {
            None
        };
        Ok(Shard {
            path: path.to_path_buf(),
            file_len,
            header,
            file,
            map,
        })
    }

    /// The bytes of one of this shard's tensors (a sub-range `[start, start+len)` of it).
    ///
    /// # Errors
    ///
    /// `Internal` if the range is not inside the tensor or the mapping: ranges derived
    /// from this shard's validated header always are.
    pub(crate) fn bytes(&self, t: &TensorInfo, start: u64, len: u64) -> Result<&[u8]> {
        if len == 0 {
            return Ok(&[]);
        }
        let range = t
            .offset
            .checked_add(start)
            .and_then(|b| Some((b, b.checked_add(len)?)))
            .filter(|&(_, e)| e <= t.offset.saturating_add(t.len))
            .and_then(|(b, e)| Some(usize::try_from(b).ok()?..usize::try_from(e).ok()?));
        let bytes = range.and_then(|r| self.map.as_ref()?.get(r));
        debug_assert!(bytes.is_some(), "range outside tensor `{}`", t.name);
        bytes.ok_or_else(|| {
            Error::internal(format!(
                "{}: bytes [{start}, {start}+{len}) of tensor `{}` are outside it",
                self.path.display(),
                crate::error::sanitize(&t.name)
            ))
        })
    }

    /// Re-checks that the file still has the length it was validated with.
    ///
    /// # Errors
    ///
    /// `SourceChanged` when it shrank or grew.
    pub(crate) fn check_unchanged(&self) -> Result<()> {
        let now = self
            .file
            .metadata()
            .map_err(|e| Error::io("stat", &self.path, e))?
            .len();
        if now != self.file_len {
            return Err(Error::SourceChanged {
                path: self.path.clone(),
                was: self.file_len,
                now,
            });
        }
        Ok(())
    }

    /// Maps the pages of `[offset, offset+len)` in one call (`MADV_POPULATE_READ`)
    /// instead of one page fault per 16 pages while casting. Best effort: older kernels
    /// without it just fault as usual.
    pub(crate) fn prefetch(&self, offset: u64, len: u64) {
        const PAGE: u64 = 4096;
        let Some(m) = &self.map else { return };
        let start = offset / PAGE * PAGE;
        let end = offset.saturating_add(len).min(m.len() as u64);
        if end > start {
            let _ = m.advise_range(Advice::PopulateRead, start as usize, (end - start) as usize);
        }
    }

    /// Tells the kernel the pages of `[offset, offset+len)` are no longer needed, so the
    /// mapping does not keep the whole checkpoint resident. Only whole pages strictly
    /// inside the range are released, so neighbouring tensors are untouched.
    ///
    /// # Safety
    ///
    /// No slice borrowed from this range (through [`Shard::bytes`]) may be read after
    /// the call. For this read-only, file-backed mapping a later read would fault the
    /// pages back in from the file, so the data seen stays the same; the contract is
    /// kept anyway so that the release is never a surprise to a borrower.
    pub(crate) unsafe fn release(&self, offset: u64, len: u64) {
        const PAGE: u64 = 4096;
        let Some(m) = &self.map else { return };
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

/// Looks for `tensor` in the headers of `.safetensors` files of `dir` that the index
/// does not list, to say where a mis-indexed tensor really is.
fn find_in_unlisted(dir: &Path, listed: &[&str], tensor: &str, cap: u64) -> Option<String> {
    let mut others: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !listed.contains(&n))
        })
        .collect();
    others.sort();
    others.into_iter().find_map(|p| {
        let shard = Shard::open(&p, cap).ok()?;
        shard
            .header
            .tensors
            .iter()
            .any(|t| t.name == tensor)
            .then(|| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .flatten()
    })
}

/// Opens a sharded checkpoint from its index file.
fn open_index(index: &Path, cap: u64) -> Result<(Vec<Shard>, PathBuf)> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io("read", index, e))?;
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
    let dir = index.parent().unwrap_or(Path::new(".")).to_path_buf();
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
        .filter(|n| !dir.join(n).is_file())
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
        .map(|n| Shard::open(&dir.join(n), cap))
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
                let elsewhere = find_in_unlisted(&dir, &names, tensor, cap);
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
    Ok((shards, dir))
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
    let path = if hub::looks_like_hub_id(&name) {
        let cache = opts.hub_cache.clone().unwrap_or_else(hub::cache_dir);
        hub::resolve(&name, &cache)?
    } else {
        input.to_path_buf()
    };
    let mut source = open_path(&path, opts.max_header_bytes)?;
    source.name = name;
    Ok(source)
}

fn open_path(input: &Path, max_header_bytes: u64) -> Result<Source> {
    if cfg!(target_endian = "big") {
        return Err(Error::BigEndianHost);
    }
    let meta = std::fs::metadata(input).map_err(|e| Error::io("open", input, e))?;
    let parent = |p: &Path| match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let (shards, model_dir, index) = if meta.is_dir() {
        let idx = input.join(INDEX_FILE);
        let single = input.join(SINGLE_FILE);
        if idx.is_file() {
            let (s, d) = open_index(&idx, max_header_bytes)?;
            (s, d, Some(idx))
        } else if single.is_file() {
            (
                vec![Shard::open(&single, max_header_bytes)?],
                input.to_path_buf(),
                None,
            )
        } else {
            let mut found: Vec<PathBuf> = std::fs::read_dir(input)
                .map_err(|e| Error::io("list", input, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            found.sort();
            match found.len() {
                1 => (
                    vec![Shard::open(&found[0], max_header_bytes)?],
                    input.to_path_buf(),
                    None,
                ),
                0 => {
                    let bin = input.join("pytorch_model.bin").exists();
                    return Err(Error::NoWeights {
                        path: input.to_path_buf(),
                        reason: if bin {
                            "only pytorch_model.bin (pickle) found; modelconv reads safetensors"
                                .into()
                        } else {
                            "no model.safetensors, no model.safetensors.index.json".into()
                        },
                    });
                }
                _ => {
                    return Err(Error::NoWeights {
                        path: input.to_path_buf(),
                        reason: format!(
                            "{} .safetensors files and no {INDEX_FILE}; name one file or the index",
                            found.len()
                        ),
                    })
                }
            }
        }
    } else if input.extension().is_some_and(|e| e == "json") {
        let (s, d) = open_index(input, max_header_bytes)?;
        (s, d, Some(input.to_path_buf()))
    } else {
        (
            vec![Shard::open(input, max_header_bytes)?],
            parent(input),
            None,
        )
    };
    Ok(Source {
        name: String::new(),
        input: input.to_path_buf(),
        model_dir,
        index,
        shards,
    })
}
