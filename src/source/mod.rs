//! Stage 1, the source: resolve what the user named (a directory, a file, a shard index
//! or a hub id in the local cache), find the shards, validate every header before
//! anything is planned, map the data, and check that a shard index and the shard
//! headers agree both ways. [`open`] is the one way in, for convert and verify alike.

mod files;
mod header;
mod hub;
mod layout;
mod logical;
mod options;
mod pickle;
#[cfg(feature = "remote")]
pub(crate) mod remote;
pub(crate) mod scheme;
mod shard;
mod torch;
mod zip;

pub(crate) mod fuzzing;
pub use files::TOKENIZER_FILES;

use std::path::{Path, PathBuf};

pub use header::{check_prefix, parse_header, Header, TensorInfo, DEFAULT_MAX_HEADER_BYTES};
pub(crate) use scheme::{Dequantized, Kernel, Role, Scheme, TensorRef};

#[cfg(feature = "remote")]
use layout::{open_dir, open_index, Dir};
#[cfg(feature = "remote")]
pub use layout::{INDEX_FILE, SINGLE_FILE, TORCH_FILE, TORCH_INDEX_FILE};
pub(crate) use logical::Logical;
pub use options::{IoMode, SourceOptions};
pub(crate) use shard::{le_ints, Shard};

use crate::error::{Error, Result};

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
    let layout::Found {
        shards,
        model_dir,
        index,
        notices,
    } = layout::open_local(input, opts)?;
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
