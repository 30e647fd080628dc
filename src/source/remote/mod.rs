//! Inputs by URL, read by ranges with no local copy of the weights: `hf://ORG/NAME[@REV]`
//! (the Hugging Face Hub, `HF_ENDPOINT`, `HF_TOKEN`), `https://` (a `.safetensors` file,
//! a shard index, or a directory URL with one), and `s3://BUCKET/PREFIX/` (the usual
//! `AWS_*` environment, `AWS_ENDPOINT_URL` for S3-compatible stores).
//!
//! Opening one lists the checkpoint's files (the Hub's API, the bucket listing, or
//! `HEAD` requests for the conventional names over plain HTTP), fetches the small ones
//! whole into a private temp directory (config, tokenizer, index: checked against the
//! listing's size and the Hub's sha256), and reads every safetensors header with a fixed
//! first read and then its exact length. The headers are validated exactly like local
//! ones: a hostile header over HTTP is refused the same way. The weights are then read
//! by the cast stage through [`fetch`]'s bounded cache of large ranges.

pub(crate) mod archive;
mod fetch;
mod hub;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::io::http as client;
use crate::io::store::{describe, http_store, list_below, s3_store};
pub(crate) use fetch::RemoteFile;
use fetch::Shared;

use super::{Dir, Shard, SourceOptions};
use crate::error::{Error, Result};

/// What a remote source keeps alive: its private directory of small files, and the
/// client and cache its shards share.
pub(crate) struct Remote {
    dir: PathBuf,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("dir", &self.dir).finish()
    }
}

impl Remote {
    /// Reads waiting on the network return `Cancelled` once `flag` is set.
    pub(crate) fn set_cancel(&self, flag: Arc<AtomicBool>) {
        self.shared.set_cancel(flag);
    }

    /// Sizes the range cache for `readers` reading at once within `budget` bytes in
    /// flight; the bytes it may hold.
    pub(crate) fn size_for(&self, readers: usize, budget: u64) -> u64 {
        self.shared.size_for(readers, budget)
    }

    /// Body bytes received so far, and requests sent.
    pub(crate) fn fetched(&self) -> (u64, u64) {
        let c = &self.shared.client.counters;
        (
            c.fetched.load(Ordering::Relaxed),
            c.requests.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        crate::io::temp::untrack(&self.dir);
    }
}

/// One file of a remote listing.
#[derive(Debug, Clone)]
struct Entry {
    size: u64,
    etag: Option<String>,
    /// The Hub's LFS oid.
    sha256: Option<String>,
}

/// What the URL names inside its directory.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// The directory: weights found as in a local model directory.
    Dir,
    /// One weights file or index, by name.
    File(String),
}

/// A remote directory: a store, the prefix of the directory in it, its files.
struct Listing {
    store: Arc<dyn ObjectStore>,
    /// `store` paths are `prefix` + name.
    prefix: String,
    /// Shown to the user: ends with `/`, no credentials.
    base_url: String,
    /// By name relative to the directory; `None` for plain HTTP, where names are probed.
    files: Option<BTreeMap<String, Entry>>,
    shared: Arc<Shared>,
    /// Where the small files were copied.
    local: PathBuf,
}

impl Listing {
    fn store_path(&self, name: &str) -> Result<StorePath> {
        StorePath::parse(format!("{}{name}", self.prefix)).map_err(|e| Error::Remote {
            url: format!("{}{name}", self.base_url),
            reason: format!("not a valid object path: {e}"),
        })
    }

    fn url(&self, name: &str) -> String {
        format!("{}{name}", self.base_url)
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.shared.client.rt().block_on(f)
    }

    /// The entry of `name`: from the listing, or from a `HEAD` over plain HTTP.
    fn entry(&self, name: &str) -> Result<Option<Entry>> {
        if let Some(files) = &self.files {
            return Ok(files.get(name).cloned());
        }
        let path = self.store_path(name)?;
        match self.block_on(self.store.head(&path)) {
            Ok(meta) => Ok(Some(Entry {
                size: meta.size,
                etag: meta.e_tag,
                sha256: None,
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::Remote {
                url: self.url(name),
                reason: describe(&e),
            }),
        }
    }

    /// Fetches `name` whole into the private directory, checking its size and, when
    /// the listing has them, its ETag and sha256.
    fn copy_small(&self, name: &str, entry: &Entry) -> Result<PathBuf> {
        let path = self.store_path(name)?;
        let url = self.url(name);
        let res = self
            .block_on(async {
                let r = self.store.get(&path).await?;
                let meta = r.meta.clone();
                Ok::<_, object_store::Error>((meta, r.bytes().await?))
            })
            .map_err(|e| Error::Remote {
                url: url.clone(),
                reason: describe(&e),
            })?;
        let (meta, bytes) = res;
        if bytes.len() as u64 != entry.size || meta.size != entry.size {
            return Err(Error::SourceChanged {
                path: url.into(),
                reason: format!(
                    "the listing gives {} bytes, the server sent {}",
                    entry.size,
                    bytes.len()
                ),
            });
        }
        if let (Some(a), Some(b)) = (&entry.etag, &meta.e_tag) {
            if a != b {
                return Err(Error::SourceChanged {
                    path: url.into(),
                    reason: format!("its ETag changed from {a} to {b} since it was listed"),
                });
            }
        }
        if let Some(want) = &entry.sha256 {
            use sha2::Digest;
            let got = sha2::Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>();
            if !got.eq_ignore_ascii_case(want) {
                return Err(Error::SourceChanged {
                    path: url.into(),
                    reason: format!("its sha256 is {got}, the Hub lists {want}"),
                });
            }
        }
        let to = self.local.join(name);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io("create", parent, e))?;
        }
        std::fs::write(&to, &bytes).map_err(|e| Error::io("write", &to, e))?;
        Ok(to)
    }
}

/// Small files worth copying: what the model recipes, the tokenizer copy and the
/// pre-quantization recognition read.
fn is_small_file(name: &str, size: u64) -> bool {
    const MAX: u64 = 64 << 20;
    let base = name.rsplit('/').next().unwrap_or(name);
    let top = !name.contains('/');
    size <= MAX
        && (base.ends_with(".json") && (top || base == "config.json")
            || top
                && (super::TOKENIZER_FILES.contains(&base)
                    || base.ends_with(".txt")
                    || base.ends_with(".model")
                    || base.ends_with(".tiktoken")))
}

/// The names probed over plain HTTP, which has no listing.
fn probe_names() -> Vec<&'static str> {
    let mut v = vec![
        super::INDEX_FILE,
        super::SINGLE_FILE,
        super::TORCH_INDEX_FILE,
        super::TORCH_FILE,
        "config.json",
        "generation_config.json",
        "quantize_config.json",
        "hf_quant_config.json",
        "modules.json",
        "sentence_bert_config.json",
        "config_sentence_transformers.json",
    ];
    v.extend(super::TOKENIZER_FILES.iter().copied());
    v
}

impl Dir for Listing {
    fn path(&self, name: &str) -> PathBuf {
        PathBuf::from(self.url(name))
    }

    fn is_file(&self, name: &str) -> bool {
        matches!(self.entry(name), Ok(Some(_)))
    }

    fn names(&self) -> Result<Vec<String>> {
        Ok(match &self.files {
            Some(f) => f.keys().filter(|k| !k.contains('/')).cloned().collect(),
            None => {
                let mut v: Vec<String> = probe_names()
                    .into_iter()
                    .filter(|n| self.is_file(n))
                    .map(String::from)
                    .collect();
                v.sort();
                v
            }
        })
    }

    fn open_shard(&self, name: &str, opts: &SourceOptions) -> Result<Shard> {
        let entry = self.entry(name)?.ok_or_else(|| Error::MissingShards {
            path: PathBuf::from(self.base_url.clone()),
            shards: vec![name.to_string()],
        })?;
        let file = RemoteFile::new(
            self.url(name),
            self.store.clone(),
            self.store_path(name)?,
            entry.size,
            entry.etag.clone(),
            self.shared.clone(),
        );
        Shard::open_remote(file, name, opts)
    }

    fn read_to_string(&self, name: &str) -> Result<String> {
        let local = self.local.join(name);
        if !local.is_file() {
            let entry = self.entry(name)?.ok_or_else(|| Error::NoWeights {
                path: self.path(name),
                reason: "not found".into(),
            })?;
            self.copy_small(name, &entry)?;
        }
        std::fs::read_to_string(&local).map_err(|e| Error::io("read", &local, e))
    }
}

/// A private directory for the small files, removed with the source (and by the
/// Ctrl-C handler).
fn private_dir() -> Result<PathBuf> {
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "modelconv-remote-{}-{nonce:08x}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
    crate::io::temp::track(&dir);
    Ok(dir)
}

/// Splits `rest` (after the scheme) into the directory and the named file, if the URL
/// names a weights file or an index.
fn split_target(rest: &str) -> (String, Target) {
    if rest.ends_with('/') || rest.is_empty() {
        return (rest.to_string(), Target::Dir);
    }
    let (dir, last) = match rest.rsplit_once('/') {
        Some((d, l)) => (format!("{d}/"), l),
        None => (String::new(), rest),
    };
    let file = [".safetensors", ".json", ".bin", ".pt", ".pth", ".ckpt"]
        .iter()
        .any(|e| last.ends_with(e));
    if file {
        (dir, Target::File(last.to_string()))
    } else {
        (format!("{rest}/"), Target::Dir)
    }
}

/// A remote checkpoint opened: shards, the index if any, the private directory with
/// its small files, and what keeps them alive.
pub(crate) struct Opened {
    pub(crate) shards: Vec<Shard>,
    pub(crate) index: Option<PathBuf>,
    pub(crate) notices: Vec<String>,
    pub(crate) model_dir: PathBuf,
    pub(crate) remote: Remote,
}

/// Opens the checkpoint at `url`.
///
/// # Errors
///
/// `Remote` (unreachable, not found, retries exhausted), `RemoteDenied` (401/403),
/// `SourceChanged`, and every rule a local checkpoint is held to.
pub(crate) fn open(url: &str, opts: &SourceOptions) -> Result<Opened> {
    let settings = client::Settings::from_env(opts.token_file.as_deref())?;
    let client = client::Client::new(settings)?;
    let shared = Shared::new(client.clone());
    let local = private_dir()?;
    let remote = Remote {
        dir: local.clone(),
        shared: shared.clone(),
    };
    let (listing, target) = list_target(url, &client, shared, &local)?;
    copy_small_files(&listing, &local)?;
    let (shards, index, notices) = match &target {
        Target::Dir => super::open_dir(&listing, opts)?,
        Target::File(name) if name.ends_with(".json") => {
            let (s, _) = super::open_index(&listing, name, opts)?;
            (s, Some(listing.path(name)), Vec::new())
        }
        Target::File(name) => (vec![listing.open_shard(name, opts)?], None, Vec::new()),
    };
    Ok(Opened {
        shards,
        index,
        notices,
        model_dir: local,
        remote,
    })
}

/// The listing of the checkpoint `url` names (a Hub repository, an S3 prefix, or a
/// plain HTTP directory, which has none), and what in it was asked for.
///
/// # Errors
///
/// `Remote`, `RemoteDenied` naming what could not be listed.
fn list_target(
    url: &str,
    client: &Arc<client::Client>,
    shared: Arc<Shared>,
    local: &std::path::Path,
) -> Result<(Listing, Target)> {
    let local = local.to_path_buf();
    Ok(if let Some(rest) = url.strip_prefix("hf://") {
        let r = hub::list(client, rest)?;
        (
            Listing {
                store: r.store,
                prefix: r.prefix,
                base_url: r.base_url,
                files: Some(r.files),
                shared,
                local,
            },
            r.target,
        )
    } else if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        let (dir, target) = split_target(key);
        let store = s3_store(client, bucket, url)?;
        let files = list_bucket(client, &store, bucket, &dir)?;
        (
            Listing {
                store,
                prefix: dir.clone(),
                base_url: format!("s3://{bucket}/{dir}"),
                files: Some(files),
                shared,
                local,
            },
            target,
        )
    } else {
        let (scheme, rest) = url.split_once("://").unwrap_or(("https", url));
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (dir, target) = split_target(path);
        let base_url = format!("{scheme}://{host}/{dir}");
        let store = http_store(client, &base_url, url, false)?;
        (
            Listing {
                store,
                prefix: String::new(),
                base_url,
                files: None,
                shared,
                local,
            },
            target,
        )
    })
}

/// Copies the small files of `listing` (configs, tokenizer files) into `local`, whole
/// and checked: found in the listing, or probed by name where there is none.
///
/// # Errors
///
/// `Remote` naming the file that could not be fetched; `Io` naming the copy.
fn copy_small_files(listing: &Listing, local: &std::path::Path) -> Result<()> {
    let small: Vec<(String, Entry)> = match &listing.files {
        Some(f) => f
            .iter()
            .filter(|(n, e)| is_small_file(n, e.size))
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect(),
        None => probe_names()
            .into_iter()
            .filter(|n| n.ends_with(".json") || is_small_file(n, 0))
            .filter_map(|n| match listing.entry(n) {
                Ok(Some(e)) if is_small_file(n, e.size) => Some(Ok((n.to_string(), e))),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<_>>()?,
    };
    for (name, entry) in &small {
        listing.copy_small(name, entry)?;
    }
    if listing.files.is_none() {
        // No listing: the sentence-transformers modules' configs are found by name.
        for module in st_module_dirs(local) {
            let name = format!("{module}/config.json");
            if let Some(e) = listing.entry(&name)? {
                if is_small_file(&name, e.size) {
                    listing.copy_small(&name, &e)?;
                }
            }
        }
    }
    Ok(())
}

/// The module directories `modules.json` lists (plain names only).
fn st_module_dirs(local: &std::path::Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(local.join("modules.json")) else {
        return Vec::new();
    };
    let Ok(serde_json::Value::Array(mods)) = serde_json::from_str(&text) else {
        return Vec::new();
    };
    mods.iter()
        .filter_map(|m| m.get("path")?.as_str())
        .filter(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
                && *p != "."
                && *p != ".."
        })
        .map(String::from)
        .collect()
}

/// Every object under `dir` in the bucket, by name relative to it.
fn list_bucket(
    client: &client::Client,
    store: &Arc<dyn ObjectStore>,
    bucket: &str,
    dir: &str,
) -> Result<BTreeMap<String, Entry>> {
    let below = list_below(client, store.as_ref(), dir).map_err(|e| Error::Remote {
        url: format!("s3://{bucket}/{dir}"),
        reason: describe(&e),
    })?;
    Ok(below
        .into_iter()
        .map(|(name, m)| {
            let entry = Entry {
                size: m.size,
                etag: m.e_tag,
                sha256: None,
            };
            (name, entry)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(split_target("m/"), ("m/".into(), Target::Dir));
        assert_eq!(split_target("m"), ("m/".into(), Target::Dir));
        assert_eq!(
            split_target("a/b/model.safetensors"),
            ("a/b/".into(), Target::File("model.safetensors".into()))
        );
        assert_eq!(
            split_target("x.safetensors.index.json"),
            ("".into(), Target::File("x.safetensors.index.json".into()))
        );
        assert!(is_small_file("config.json", 10));
        assert!(is_small_file("1_Pooling/config.json", 10));
        assert!(!is_small_file("onnx/model.json", 10));
        assert!(!is_small_file("model.safetensors", 10));
        assert!(is_small_file("vocab.txt", 10));
    }
}
