//! The output directory: every path a conversion writes, decided and checked before
//! anything is written (refuse an existing conversion without `force`, never write over
//! an input), then the side files staged beside their targets and everything renamed
//! into place in one sweep, `metadata.json` last.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::ConvertConfig;
use crate::error::{Error, Result};
use crate::format;
use crate::model::ModelFiles;
use crate::source::Source;
use crate::write::atomic::{remove_stale_temp_files, sync_dir, TempPath};
use crate::write::Pending;

/// The tokenizer and preprocessing files copied into `tokenizer/`.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
    "normalizer.json",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.jinja",
];

/// Where a conversion's files go, and what is copied from where.
#[derive(Debug)]
pub(crate) struct OutputLayout {
    dir: PathBuf,
    weights: PathBuf,
    metadata: PathBuf,
    model_dir: PathBuf,
    /// The model's `config.json`, copied as is.
    config: Option<PathBuf>,
    /// Tokenizer files present in the model directory.
    tokenizer: Vec<&'static str>,
    /// Sentence-transformers module files, relative to the model directory.
    st_files: Vec<PathBuf>,
}

impl OutputLayout {
    /// Decides every output path and refuses what must not be written. Creates nothing.
    ///
    /// # Errors
    ///
    /// `OutputIsInput` when an output path is (or links to) an input file,
    /// `OutputNotDirectory`, `OutputExists` without `force`.
    pub(crate) fn plan(
        dir: &Path,
        source: &Source,
        files: &ModelFiles,
        config: &ConvertConfig,
    ) -> Result<OutputLayout> {
        let layout = Self::of(dir, source, files, config);
        let mut inputs: Vec<PathBuf> = source.files().map(Path::to_path_buf).collect();
        inputs.extend(layout.copies().map(|(from, _)| from));
        let mut outputs: Vec<PathBuf> = vec![dir.to_path_buf(), layout.weights.clone()];
        outputs.push(layout.metadata.clone());
        outputs.extend(layout.copies().map(|(_, to)| to));
        refuse_inputs(&inputs, &outputs)?;
        if dir.exists() && !dir.is_dir() {
            return Err(Error::OutputNotDirectory {
                path: dir.to_path_buf(),
            });
        }
        if !config.force && !config.resume {
            for existing in [&layout.weights, &layout.metadata] {
                if existing.exists() {
                    return Err(Error::OutputExists {
                        path: existing.clone(),
                    });
                }
            }
        }
        Ok(layout)
    }

    /// The paths of a conversion into `dir` (a local directory, or an object-store
    /// prefix's URL), unchecked.
    pub(crate) fn of(
        dir: &Path,
        source: &Source,
        files: &ModelFiles,
        config: &ConvertConfig,
    ) -> OutputLayout {
        let model_dir = source.model_dir().to_path_buf();
        let tokenizer = if config.extract_tokenizer {
            TOKENIZER_FILES
                .iter()
                .copied()
                .filter(|f| model_dir.join(f).is_file())
                .collect()
        } else {
            Vec::new()
        };
        OutputLayout {
            dir: dir.to_path_buf(),
            weights: dir.join(format::WEIGHTS_FILE),
            metadata: dir.join(format::METADATA_FILE),
            model_dir,
            config: files.config_path.clone(),
            tokenizer,
            st_files: files.st_files.clone(),
        }
    }

    /// Every file copied from the model directory: `(from, name)`, the name relative
    /// to the output (`tokenizer/vocab.txt`, with `/` between its parts).
    #[cfg(feature = "remote")]
    pub(crate) fn copied_names(&self) -> Vec<(PathBuf, String)> {
        self.copies()
            .filter_map(|(from, to)| {
                let rel = to.strip_prefix(&self.dir).ok()?;
                let parts: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                Some((from, parts.join("/")))
            })
            .collect()
    }

    /// Every file copied from the model directory: `(from, to)`.
    fn copies(&self) -> impl Iterator<Item = (PathBuf, PathBuf)> + '_ {
        let config = self
            .config
            .iter()
            .map(|c| (c.clone(), self.dir.join("config.json")));
        let tok = self
            .tokenizer
            .iter()
            .map(|f| (self.model_dir.join(f), self.dir.join("tokenizer").join(f)));
        let st = self
            .st_files
            .iter()
            .map(|f| (self.model_dir.join(f), self.dir.join(f)));
        config.chain(tok).chain(st)
    }

    /// Creates the output directory, and removes the temp files a killed conversion
    /// left in it; returns their names.
    ///
    /// # Errors
    ///
    /// `Io` naming the directory.
    pub(crate) fn create_dir(&self) -> Result<Vec<String>> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io("create", &self.dir, e))?;
        Ok(remove_stale_temp_files(&self.dir))
    }

    /// The output directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// `weights.parquet`.
    pub(crate) fn weights(&self) -> &Path {
        &self.weights
    }

    /// `metadata.json`.
    pub(crate) fn metadata(&self) -> &Path {
        &self.metadata
    }

    /// Every path this conversion writes, relative to the output directory (recorded in
    /// `metadata.json` as `files`, so that a later `--force` conversion can remove what
    /// it does not replace).
    pub(crate) fn written(&self) -> Vec<String> {
        let mut files = vec![
            format::WEIGHTS_FILE.to_string(),
            format::METADATA_FILE.to_string(),
        ];
        if self.config.is_some() {
            files.push("config.json".into());
        }
        if !self.tokenizer.is_empty() {
            files.push("tokenizer".into());
        }
        files.extend(
            self.st_files
                .iter()
                .map(|f| f.to_string_lossy().into_owned()),
        );
        files
    }

    /// What an earlier conversion in the directory wrote (its `metadata.json` `files`,
    /// or the side files every version writes) that this one does not: plain relative
    /// paths only.
    fn leftovers(&self) -> Vec<PathBuf> {
        let old = std::fs::read(&self.metadata).ok();
        self.stale_names(old.as_deref())
            .into_iter()
            .map(|p| self.dir.join(p))
            .collect()
    }

    /// The names, relative to the output, that an earlier conversion whose
    /// `metadata.json` is `old` wrote and this one does not.
    pub(crate) fn stale_names(&self, old: Option<&[u8]>) -> Vec<String> {
        let old: Vec<String> = old
            .and_then(|b| serde_json::from_slice::<Value>(b).ok())
            .map(|m| match m.get("files").and_then(Value::as_array) {
                Some(files) => files
                    .iter()
                    .filter_map(|f| f.as_str().map(str::to_owned))
                    .collect(),
                None => vec!["config.json".into(), "tokenizer".into()],
            })
            .unwrap_or_default();
        let new = self.written();
        old.into_iter()
            .filter(|f| !new.contains(f))
            .filter(|f| {
                Path::new(f)
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)))
            })
            .collect()
    }

    /// `tokenizer/`, when tokenizer files are copied.
    pub(crate) fn tokenizer_dir(&self) -> Option<PathBuf> {
        (!self.tokenizer.is_empty()).then(|| self.dir.join("tokenizer"))
    }

    /// Writes `metadata.json` and copies every side file to temp paths beside their
    /// targets, ready for [`Staged::commit`].
    ///
    /// # Errors
    ///
    /// `Io` naming the file that could not be written or copied.
    pub(crate) fn stage(&self, metadata: &Value) -> Result<Staged> {
        let meta = TempPath::beside(&self.metadata);
        let text = serde_json::to_string_pretty(metadata)
            .map_err(|e| Error::internal(format!("metadata.json: {e}")))?;
        meta.write_all(text.as_bytes())?;
        let mut files = Vec::new();
        let copy = |from: &Path, to: &Path| {
            std::fs::copy(from, to)
                .map(|_| ())
                .map_err(|e| Error::io("copy", from, e))
        };
        if let Some(cfg) = &self.config {
            let t = TempPath::beside(&self.dir.join("config.json"));
            copy(cfg, t.path())?;
            files.push(t);
        }
        let mut dirs = HashSet::new();
        for f in &self.st_files {
            let target = self.dir.join(f);
            if let Some(parent) = target.parent() {
                if dirs.insert(parent.to_path_buf()) {
                    std::fs::create_dir_all(parent).map_err(|e| Error::io("create", parent, e))?;
                }
            }
            let t = TempPath::beside(&target);
            copy(&self.model_dir.join(f), t.path())?;
            files.push(t);
        }
        if let Some(tok) = self.tokenizer_dir() {
            let t = TempPath::beside(&tok);
            std::fs::create_dir(t.path()).map_err(|e| Error::io("create", t.path(), e))?;
            for f in &self.tokenizer {
                copy(&self.model_dir.join(f), &t.path().join(f))?;
            }
            files.push(t);
        }
        Ok(Staged {
            dir: self.dir.clone(),
            files,
            metadata: meta,
            leftovers: self.leftovers(),
        })
    }
}

/// Side files written beside their targets, not yet in place.
#[derive(Debug)]
pub(crate) struct Staged {
    dir: PathBuf,
    files: Vec<TempPath>,
    metadata: TempPath,
    /// Files of an earlier conversion this one does not replace (`--force`).
    leftovers: Vec<PathBuf>,
}

impl Staged {
    /// Renames `weights`, then every side file into place, removes what an earlier
    /// conversion wrote and this one does not, then renames `metadata.json` and syncs
    /// the directory: a `metadata.json` beside the weights means a whole conversion,
    /// never mixed with another's files.
    ///
    /// # Errors
    ///
    /// `Io` naming the target that could not be replaced or removed.
    pub(crate) fn commit(self, weights: Option<Pending>) -> Result<()> {
        if let Some(w) = weights {
            w.commit()?;
        }
        for t in self.files {
            t.commit()?;
        }
        for old in &self.leftovers {
            let gone = if old.is_dir() {
                std::fs::remove_dir_all(old)
            } else {
                std::fs::remove_file(old)
            };
            match gone {
                Ok(()) => {
                    // A module file's folder (`1_Pooling/`) goes with its last file.
                    if let Some(parent) = old.parent().filter(|p| *p != self.dir) {
                        let _ = std::fs::remove_dir(parent);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("remove", old, e)),
            }
        }
        self.metadata.commit()?;
        sync_dir(&self.dir);
        Ok(())
    }
}

/// The lock a conversion holds on its output directory (`.modelconv.lock`, an advisory
/// `flock` that dies with its process): a second conversion into the same output is
/// refused instead of interleaving its files with the first's.
#[derive(Debug)]
pub(crate) struct OutputLock {
    path: PathBuf,
    file: Option<std::fs::File>,
}

/// The lock file's name in the output directory.
pub(crate) const LOCK_FILE: &str = ".modelconv.lock";

impl OutputLock {
    /// Takes the lock of `dir` (which exists).
    ///
    /// # Errors
    ///
    /// `OutputBusy` when a live process holds it; `Io` naming the lock file.
    pub(crate) fn acquire(dir: &Path) -> Result<OutputLock> {
        let path = dir.join(LOCK_FILE);
        // A holder removes the file before it unlocks: the inode locked must still be
        // the one at the path, or the lock was taken on a removed file.
        for _ in 0..8 {
            let file = std::fs::File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| Error::io("create", &path, e))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(Error::OutputBusy { path });
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(Error::io("lock", &path, e)),
            }
            let same = match (file.metadata(), std::fs::metadata(&path)) {
                (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                _ => false,
            };
            if same {
                crate::write::atomic::track(&path);
                return Ok(OutputLock {
                    path,
                    file: Some(file),
                });
            }
        }
        Err(Error::OutputBusy { path })
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still held (see `acquire`), then unlocked by the close.
        let _ = std::fs::remove_file(&self.path);
        crate::write::atomic::untrack(&self.path);
        drop(self.file.take());
    }
}

/// Refuses output paths that are, or link to, input files.
fn refuse_inputs(inputs: &[PathBuf], outputs: &[PathBuf]) -> Result<()> {
    let same =
        |a: &std::fs::Metadata, b: &std::fs::Metadata| a.dev() == b.dev() && a.ino() == b.ino();
    let metas: Vec<std::fs::Metadata> = inputs
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .collect();
    for o in outputs {
        if let Ok(m) = std::fs::metadata(o) {
            if metas.iter().any(|i| same(i, &m)) {
                return Err(Error::OutputIsInput { path: o.clone() });
            }
        }
    }
    Ok(())
}
