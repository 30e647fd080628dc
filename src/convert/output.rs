//! What a conversion writes beside the weights: every name decided before anything is
//! written, then the side files staged at the destination and everything committed in
//! one sweep, `metadata.json` last.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::ConvertConfig;
use crate::error::{Error, Result};
use crate::format;
use crate::model::ModelFiles;
use crate::source::{Source, TOKENIZER_FILES};
use crate::write::dest::{Content, Destination};
use crate::write::Pending;

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

    /// Every file copied from the model directory, by its name relative to the output
    /// (`tokenizer/vocab.txt`, with `/` between its parts).
    pub(crate) fn side_names(&self) -> Vec<String> {
        self.copies().map(|(_, name)| name).collect()
    }

    /// Every local file the side files are copied from.
    pub(crate) fn inputs(&self) -> impl Iterator<Item = PathBuf> + '_ {
        self.copies().map(|(from, _)| from)
    }

    /// Every file copied from the model directory: `(from, name)`.
    fn copies(&self) -> impl Iterator<Item = (PathBuf, String)> + '_ {
        let config = self
            .config
            .iter()
            .map(|c| (c.clone(), "config.json".to_string()));
        let tok = self
            .tokenizer
            .iter()
            .map(|f| (self.model_dir.join(f), format!("tokenizer/{f}")));
        let st = self.st_files.iter().map(|f| {
            let parts: Vec<String> = f
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            (self.model_dir.join(f), parts.join("/"))
        });
        config.chain(tok).chain(st)
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

    /// Stages `metadata.json` and every side file at `dest`, ready for
    /// [`Staged::commit`]; what the conversion there before wrote (its `metadata.json`
    /// is `old_metadata`) and this one does not is removed by the commit.
    ///
    /// # Errors
    ///
    /// `Io` naming the file that could not be written or copied.
    pub(crate) fn stage(
        &self,
        dest: &dyn Destination,
        metadata: &Value,
        old_metadata: Option<&[u8]>,
    ) -> Result<Staged> {
        let text = serde_json::to_string_pretty(metadata)
            .map_err(|e| Error::internal(format!("metadata.json: {e}")))?;
        let meta = dest.stage(format::METADATA_FILE, Content::Bytes(text.as_bytes()))?;
        let mut files = Vec::new();
        if let Some(cfg) = &self.config {
            files.push(dest.stage("config.json", Content::Copy(cfg))?);
        }
        for f in &self.st_files {
            let from = self.model_dir.join(f);
            let name = f.to_string_lossy().replace(std::path::MAIN_SEPARATOR, "/");
            files.push(dest.stage(&name, Content::Copy(&from))?);
        }
        if !self.tokenizer.is_empty() {
            let tok: Vec<(String, PathBuf)> = self
                .tokenizer
                .iter()
                .map(|f| (f.to_string(), self.model_dir.join(f)))
                .collect();
            files.push(dest.stage("tokenizer", Content::Folder(&tok))?);
        }
        Ok(Staged {
            files,
            metadata: meta,
            leftovers: self.stale_names(old_metadata),
        })
    }
}

/// Side files staged at the destination, not yet in place.
pub(crate) struct Staged {
    files: Vec<Pending>,
    metadata: Pending,
    /// Names of an earlier conversion this one does not replace (`--force`).
    leftovers: Vec<String>,
}

impl Staged {
    /// Commits `weights`, then every side file, removes what an earlier conversion
    /// wrote and this one does not, then commits `metadata.json` and syncs: a
    /// `metadata.json` beside the weights means a whole conversion, never mixed with
    /// another's files.
    ///
    /// # Errors
    ///
    /// `Io`/`Remote` naming the target that could not be replaced or removed.
    pub(crate) fn commit(self, dest: &dyn Destination, weights: Option<Pending>) -> Result<()> {
        if let Some(w) = weights {
            w.commit()?;
        }
        for t in self.files {
            t.commit()?;
        }
        for old in &self.leftovers {
            dest.remove_leftover(old)?;
        }
        self.metadata.commit()?;
        dest.sync("");
        Ok(())
    }
}
