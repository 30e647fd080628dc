//! Where a conversion's files go: one [`Destination`], a local directory
//! ([`LocalDir`]) or, with the `remote` feature, an object-store prefix
//! (`s3://BUCKET/PREFIX/`). The output is parsed once, at the API edge, into an
//! [`Output`]; everything after it (the single-file commit, the parted commit, part
//! checks, the journal and resume, one part converted alone) is written once, over the
//! trait. A new destination is one implementation of it.
//!
//! Names are relative to the output and `/`-separated (`weights.parquet/part-…`).
//! Whatever the destination, a file appears only whole: a weight file or part is
//! created by [`Destination::create`] and appears at its commit ([`Pending::commit`]);
//! a side file is staged by [`Destination::stage`] and appears at its commit.

mod local;
#[cfg(feature = "remote")]
mod object;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use parquet::file::metadata::ParquetMetaData;

pub(crate) use local::LocalDir;

use super::Pending;
use crate::error::{Error, Result};
use crate::io::Listed;

/// An output, parsed once: a local directory or an object-store prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Output {
    /// A local directory.
    Dir(PathBuf),
    /// An object-store prefix.
    #[cfg(feature = "remote")]
    Object(crate::io::url::ObjectUrl),
}

impl Output {
    /// What `output` names: an object-store prefix (`s3://…`) or a local directory.
    ///
    /// # Errors
    ///
    /// `InvalidOption` for an object-store URL without a bucket, or in a build without
    /// the `remote` feature.
    pub(crate) fn parse(output: &Path) -> Result<Output> {
        let url = output.to_str().filter(|s| crate::io::url::is_object_url(s));
        match url {
            None => Ok(Output::Dir(output.to_path_buf())),
            #[cfg(feature = "remote")]
            Some(u) => Ok(Output::Object(crate::io::url::ObjectUrl::parse(u)?)),
            #[cfg(not(feature = "remote"))]
            Some(_) => Err(Error::option(
                "this build of modelconv writes local files only (build it with the `remote` \
                 feature for s3:// outputs)",
            )),
        }
    }

    /// The output's root, for messages and reports: the directory, or the prefix's
    /// URL without its trailing `/`.
    pub(crate) fn root(&self) -> PathBuf {
        match self {
            Output::Dir(d) => d.clone(),
            #[cfg(feature = "remote")]
            Output::Object(u) => PathBuf::from(u.to_string()),
        }
    }

    /// Whether it is a local directory (which a conversion can read back).
    pub(crate) fn is_local(&self) -> bool {
        matches!(self, Output::Dir(_))
    }

    /// The destination, ready for requests (an object store's client is made from the
    /// environment; nothing is sent or created).
    ///
    /// # Errors
    ///
    /// `Remote` when the environment does not make a client.
    pub(crate) fn open(&self) -> Result<Box<dyn Destination>> {
        match self {
            Output::Dir(d) => Ok(Box::new(LocalDir::new(d))),
            #[cfg(feature = "remote")]
            Output::Object(u) => Ok(Box::new(object::ObjectDest::open(u)?)),
        }
    }
}

/// What [`Destination::begin`] checks the output against.
#[derive(Debug)]
pub(crate) struct Begin<'a> {
    /// Replace an existing conversion.
    pub(crate) force: bool,
    /// Keep what an interrupted conversion left (parts).
    pub(crate) resume: bool,
    /// The conversion reads its output back (`--validate`).
    pub(crate) validate: bool,
    /// Files the conversion reads (a local output must not be one of them).
    pub(crate) inputs: &'a [PathBuf],
    /// Names the conversion writes, besides the weights and `metadata.json`.
    pub(crate) side_files: &'a [String],
}

/// A destination made ready by [`Destination::begin`].
pub(crate) struct Begun {
    /// Temp files a killed conversion left, removed.
    pub(crate) stale: Vec<String>,
    /// The `metadata.json` of the conversion there before, if any.
    pub(crate) old_metadata: Option<Vec<u8>>,
    /// Released when the conversion ends (a local directory's lock).
    pub(crate) _guard: Option<Box<dyn std::any::Any>>,
}

/// A part's footer, read back: its stamp ([`crate::format::KEY_PART`]) and metadata.
pub(crate) struct Footer {
    /// The stamp's JSON, if the footer has one.
    pub(crate) stamp: Option<String>,
    /// The Parquet footer.
    pub(crate) meta: ParquetMetaData,
}

/// What a check of a part an earlier run left says.
#[derive(Debug)]
pub(crate) enum Check<T> {
    /// It passed: keep what was read.
    Keep(T),
    /// It failed (damaged, another part of the plan, not what was recorded): write it
    /// again, for this reason.
    Redo(String),
}

/// One journal (or manifest) entry: a part as it was written.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Recorded {
    /// File name inside `weights.parquet/`.
    pub(crate) file: String,
    /// Its bytes.
    pub(crate) bytes: u64,
    /// Its XXH3-128.
    pub(crate) xxh3_128: String,
    /// The object's ETag, for a part in object storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) e_tag: Option<String>,
}

/// What a destination does: where files go, how they appear whole, and how what an
/// earlier conversion left is read back.
pub(crate) trait Destination: std::fmt::Debug + Sync {
    /// Where `name` is, for messages and reports: a path, or an object's URL.
    fn locate(&self, name: &str) -> PathBuf;

    /// Refuses what must not be written over (an existing conversion without `force` or
    /// `resume`; an input; options the destination cannot honour), then creates and
    /// locks the destination.
    ///
    /// # Errors
    ///
    /// `OutputExists`, `OutputIsInput`, `OutputNotDirectory`, `OutputBusy`,
    /// `InvalidOption`; `Io`/`Remote` naming what could not be read or created.
    fn begin(&self, begin: &Begin<'_>) -> Result<Begun>;

    /// Undoes what [`Destination::begin`] created when the conversion failed.
    fn abandon(&self) {}

    /// Whether a weight file written over an earlier one replaces it in one step (a
    /// rename), so that the earlier conversion stays whole until the commit. Where it
    /// does not, the earlier `metadata.json` goes first.
    fn replaces_atomically(&self) -> bool;

    /// `name`'s size (and ETag), if it is a file.
    ///
    /// # Errors
    ///
    /// `Io`/`Remote` naming it.
    fn head(&self, name: &str) -> Result<Option<Listed>>;

    /// `name`'s content, if it is a file.
    ///
    /// # Errors
    ///
    /// `Io`/`Remote` naming it.
    fn get(&self, name: &str) -> Result<Option<Vec<u8>>>;

    /// The files below `dir` (a name ending with `/`), by name relative to it.
    ///
    /// # Errors
    ///
    /// `Io`/`Remote` naming it.
    fn list(&self, dir: &str) -> Result<BTreeMap<String, Listed>>;

    /// Makes the folder `dir` (a name ending with `/`) where files can be created;
    /// returns the temp files a killed conversion left in it, removed when `clean`.
    ///
    /// # Errors
    ///
    /// `Io` naming it.
    fn make_dir(&self, dir: &str, clean: bool) -> Result<Vec<String>>;

    /// A new file `name` of about `expected` bytes, whose bytes appear only when the
    /// writer's [`Pending`] is committed.
    ///
    /// # Errors
    ///
    /// `Io`/`Remote` naming it.
    fn create(&self, name: &str, expected: u64) -> Result<super::Out>;

    /// Stages `name` with `content`, to appear when the [`Pending`] is committed.
    ///
    /// # Errors
    ///
    /// `Io` naming what could not be read or written.
    fn stage(&self, name: &str, content: Content<'_>) -> Result<Pending>;

    /// Removes `name` (a file, or a folder and everything in it), if it is there.
    ///
    /// # Errors
    ///
    /// `Io`/`Remote` naming it.
    fn remove(&self, name: &str) -> Result<()>;

    /// Removes `name` as [`Destination::remove`] does, and its folder when that is left
    /// empty (a module file's `1_Pooling/`).
    ///
    /// # Errors
    ///
    /// As [`Destination::remove`].
    fn remove_leftover(&self, name: &str) -> Result<()> {
        self.remove(name)
    }

    /// Makes what was committed in `dir` durable (a directory sync).
    fn sync(&self, dir: &str);

    /// The footer of the part `name` (`size` bytes), or why it is not a readable part.
    ///
    /// # Errors
    ///
    /// `Io`/`Remote` when it cannot be read at all.
    fn footer(&self, name: &str, size: u64) -> Result<Check<Footer>>;

    /// Checks the content of the part `name` (as `listed`) against what the journal
    /// recorded of it: its size and XXH3-128, or why it is not the part recorded.
    ///
    /// # Errors
    ///
    /// `Io`/`Remote` when it cannot be read.
    fn content(
        &self,
        name: &str,
        listed: &Listed,
        recorded: Option<&Recorded>,
    ) -> Result<Check<(u64, String)>>;

    /// Why a part already at `name` is written again by a part converted alone, before
    /// any check of its content; `None` to check it (a local file, read at disk speed).
    fn redo_alone(&self) -> Option<&'static str> {
        None
    }
}

/// What a staged side file holds.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Content<'a> {
    /// These bytes.
    Bytes(&'a [u8]),
    /// A copy of this local file.
    Copy(&'a Path),
    /// A folder of copies: `(name inside it, local file)`.
    Folder(&'a [(String, PathBuf)]),
}

/// Reads a local file for a destination that stores bytes.
///
/// # Errors
///
/// `Io` naming it.
#[cfg(feature = "remote")]
fn read_local(from: &Path) -> Result<Vec<u8>> {
    std::fs::read(from).map_err(|e| Error::io("read", from, e))
}

/// `weights.parquet/`, the parts' folder.
pub(crate) fn parts_dir() -> String {
    format!("{}/", crate::format::WEIGHTS_FILE)
}

/// The refusal of `--validate` where the output cannot be read back.
pub(crate) fn validate_refused() -> Error {
    Error::option(
        "--validate reads the output back from a local directory: it does not apply to \
         an object-store output (verify a downloaded copy with `modelconv verify`)",
    )
}
