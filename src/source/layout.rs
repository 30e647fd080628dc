//! Where a checkpoint's weights are: the [`Dir`] a checkpoint lives in (a local
//! directory here, a remote listing in `remote`), finding the weights in it (a
//! safetensors index or file, then a PyTorch index or file), and checking a shard index
//! and the shard headers against each other both ways.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::options::SourceOptions;
use super::shard::{is_torch_name, Shard};
use crate::error::{Error, Result};

/// The conventional name of a sharded checkpoint's index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The conventional name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The conventional names of a PyTorch checkpoint and its shard index.
pub const TORCH_FILE: &str = "pytorch_model.bin";
/// The index of a sharded PyTorch checkpoint.
pub const TORCH_INDEX_FILE: &str = "pytorch_model.bin.index.json";

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

/// Opens a sharded checkpoint from its index file `name` in `dir`.
pub(super) fn open_index(
    dir: &dyn Dir,
    name: &str,
    opts: &SourceOptions,
) -> Result<(Vec<Shard>, PathBuf)> {
    let index = &dir.path(name);
    let map = read_weight_map(dir, name, index)?;
    let names = shard_names(dir, index, &map)?;
    let shards = names
        .iter()
        .map(|n| dir.open_shard(n, opts))
        .collect::<Result<Vec<_>>>()?;
    let found = tensor_homes(&shards)?;
    let listed: BTreeMap<&str, &str> = map.iter().map(|(t, s)| (t.as_str(), s.as_str())).collect();
    let check = IndexCheck {
        dir,
        index,
        names: &names,
        opts,
    };
    check.listed_where_found(&listed, &found)?;
    check.found_listed(&shards, &listed)?;
    let parent = index.parent().unwrap_or(Path::new(".")).to_path_buf();
    Ok((shards, parent))
}

/// The `weight_map` of the index file `name` (shown as `index`): `(tensor, shard)`
/// pairs, refusing a duplicate tensor and an empty map.
fn read_weight_map(dir: &dyn Dir, name: &str, index: &Path) -> Result<Vec<(String, String)>> {
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
    Ok(map)
}

/// The shard names the index lists, sorted and once each: plain file names, every one
/// a file of `dir`.
fn shard_names<'m>(
    dir: &dyn Dir,
    index: &Path,
    map: &'m [(String, String)],
) -> Result<Vec<&'m str>> {
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
    Ok(names)
}

/// Where each tensor really is (its shard's position), refusing duplicates across
/// shards.
fn tensor_homes(shards: &[Shard]) -> Result<HashMap<&str, usize>> {
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
    Ok(found)
}

/// What checking an index against its shards' headers needs.
struct IndexCheck<'a> {
    /// Where the index and its shards are.
    dir: &'a dyn Dir,
    /// The index, as messages show it.
    index: &'a Path,
    /// The shard names, sorted, in the order the shards were opened.
    names: &'a [&'a str],
    /// How shards are opened (to look in the unlisted ones).
    opts: &'a SourceOptions,
}

impl IndexCheck<'_> {
    fn mismatch(&self, tensor: &str, reason: String) -> Error {
        Error::ShardMismatch {
            path: self.index.to_path_buf(),
            tensor: tensor.to_string(),
            reason,
        }
    }

    /// Looks for `tensor` in the files of the directory with the listed shards'
    /// extension that the index does not list, to say where a mis-indexed tensor
    /// really is.
    fn find_in_unlisted(&self, tensor: &str) -> Option<String> {
        let listed = self.names;
        let ext = listed.first().and_then(|n| Path::new(n).extension())?;
        let others: Vec<String> = self
            .dir
            .names()
            .ok()?
            .into_iter()
            .filter(|n| Path::new(n).extension() == Some(ext) && !listed.contains(&n.as_str()))
            .collect();
        others.into_iter().find(|n| {
            self.dir
                .open_shard(n, self.opts)
                .is_ok_and(|s| s.header.tensors.iter().any(|t| t.name == tensor))
        })
    }

    /// Every tensor the index lists is in the shard it names.
    fn listed_where_found(
        &self,
        listed: &BTreeMap<&str, &str>,
        found: &HashMap<&str, usize>,
    ) -> Result<()> {
        let names = self.names;
        let by_name: HashMap<&str, usize> =
            names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        for (tensor, shard) in listed {
            match found.get(tensor) {
                None => {
                    let elsewhere = self.find_in_unlisted(tensor);
                    return Err(self.mismatch(
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
                    return Err(self.mismatch(
                        tensor,
                        format!("the index maps it to {shard}, but it is in {}", names[i]),
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Every tensor of the shards is listed in the index.
    fn found_listed(&self, shards: &[Shard], listed: &BTreeMap<&str, &str>) -> Result<()> {
        for (i, s) in shards.iter().enumerate() {
            for t in &s.header.tensors {
                if !listed.contains_key(t.name.as_str()) {
                    return Err(self.mismatch(
                        &t.name,
                        format!("it is in {} but the index does not list it", self.names[i]),
                    ));
                }
            }
        }
        Ok(())
    }
}

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
pub(super) fn open_dir(
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

/// The weights found at a local path.
pub(super) struct Found {
    /// The shards, in order.
    pub(super) shards: Vec<Shard>,
    /// The directory with `config.json` and the tokenizer files.
    pub(super) model_dir: PathBuf,
    /// The shard index, when the checkpoint is sharded.
    pub(super) index: Option<PathBuf>,
    /// What the user should know about how the input was read.
    pub(super) notices: Vec<String>,
}

/// The weights at a local path: a model directory, a shard index or a single shard.
pub(super) fn open_local(input: &Path, opts: &SourceOptions) -> Result<Found> {
    let meta = std::fs::metadata(input).map_err(|e| Error::io("open", input, e))?;
    let parent = |p: &Path| match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok(if meta.is_dir() {
        let (shards, index, notices) = open_dir(&LocalDir(input.to_path_buf()), opts)?;
        Found {
            shards,
            model_dir: input.to_path_buf(),
            index,
            notices,
        }
    } else if input.extension().is_some_and(|e| e == "json") {
        let dir = LocalDir(parent(input));
        let name = input
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (shards, model_dir) = open_index(&dir, &name, opts)?;
        Found {
            shards,
            model_dir,
            index: Some(input.to_path_buf()),
            notices: Vec::new(),
        }
    } else {
        Found {
            shards: vec![Shard::open(input, opts)?],
            model_dir: parent(input),
            index: None,
            notices: Vec::new(),
        }
    })
}
