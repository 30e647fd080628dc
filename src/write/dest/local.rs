//! A local output directory: files written to temp paths beside their targets, synced
//! and renamed into place; an advisory lock against a second conversion into it; parts
//! checked by reading them back at disk speed.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::{Begin, Begun, Check, Content, Destination, Footer, Recorded};
use crate::error::{Error, Result};
use crate::format;
use crate::io::temp::{remove_stale_temp_files, sync_dir, TempPath};
use crate::io::{file_hash, Listed};
use crate::read::WeightFile;
use crate::write::{Out, Pending};

/// A local output directory.
#[derive(Debug)]
pub(crate) struct LocalDir {
    dir: PathBuf,
    /// Whether [`Destination::begin`] created the directory (removed again, empty, by
    /// [`Destination::abandon`]).
    created: AtomicBool,
}

impl LocalDir {
    /// The directory `dir` (nothing is checked or created).
    pub(crate) fn new(dir: &Path) -> LocalDir {
        LocalDir {
            dir: dir.to_path_buf(),
            created: AtomicBool::new(false),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name.trim_end_matches('/'))
    }
}

impl Destination for LocalDir {
    fn locate(&self, name: &str) -> PathBuf {
        self.path(name)
    }

    fn begin(&self, b: &Begin<'_>) -> Result<Begun> {
        let weights = self.path(format::WEIGHTS_FILE);
        let metadata = self.path(format::METADATA_FILE);
        let mut outputs = vec![self.dir.clone(), weights.clone(), metadata.clone()];
        outputs.extend(b.side_files.iter().map(|n| self.path(n)));
        refuse_inputs(b.inputs, &outputs)?;
        if self.dir.exists() && !self.dir.is_dir() {
            return Err(Error::OutputNotDirectory {
                path: self.dir.clone(),
            });
        }
        if !b.force && !b.resume {
            for existing in [&weights, &metadata] {
                if existing.exists() {
                    return Err(Error::OutputExists {
                        path: existing.clone(),
                    });
                }
            }
        }
        self.created.store(!self.dir.exists(), Ordering::Relaxed);
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io("create", &self.dir, e))?;
        let stale = remove_stale_temp_files(&self.dir);
        let lock = OutputLock::acquire(&self.dir)?;
        Ok(Begun {
            stale,
            old_metadata: std::fs::read(&metadata).ok(),
            _guard: Some(Box::new(lock)),
        })
    }

    fn abandon(&self) {
        if self.created.load(Ordering::Relaxed) {
            let _ = std::fs::remove_dir(&self.dir);
        }
    }

    fn replaces_atomically(&self) -> bool {
        true
    }

    fn head(&self, name: &str) -> Result<Option<Listed>> {
        Ok(std::fs::metadata(self.path(name))
            .ok()
            .filter(std::fs::Metadata::is_file)
            .map(|m| Listed {
                size: m.len(),
                e_tag: None,
            }))
    }

    fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(std::fs::read(self.path(name)).ok())
    }

    fn list(&self, dir: &str) -> Result<BTreeMap<String, Listed>> {
        let path = self.path(dir);
        let entries = match std::fs::read_dir(&path) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(Error::io("list", &path, e)),
        };
        Ok(entries
            .flatten()
            .filter_map(|e| {
                let m = e.metadata().ok().filter(std::fs::Metadata::is_file)?;
                let listed = Listed {
                    size: m.len(),
                    e_tag: None,
                };
                Some((e.file_name().to_string_lossy().into_owned(), listed))
            })
            .collect())
    }

    fn make_dir(&self, dir: &str, clean: bool) -> Result<Vec<String>> {
        let path = self.path(dir);
        std::fs::create_dir_all(&path).map_err(|e| Error::io("create", &path, e))?;
        Ok(if clean {
            remove_stale_temp_files(&path)
        } else {
            Vec::new()
        })
    }

    fn create(&self, name: &str, _expected: u64) -> Result<Out> {
        Out::temp_file(&self.path(name))
    }

    fn stage(&self, name: &str, content: Content<'_>) -> Result<Pending> {
        let target = self.path(name);
        let copy = |from: &Path, to: &Path| {
            std::fs::copy(from, to)
                .map(|_| ())
                .map_err(|e| Error::io("copy", from, e))
        };
        let t = TempPath::beside(&target);
        match content {
            Content::Bytes(b) => t.write_all(b)?,
            Content::Copy(from) => {
                if let Some(parent) = target.parent().filter(|p| *p != self.dir) {
                    std::fs::create_dir_all(parent).map_err(|e| Error::io("create", parent, e))?;
                }
                copy(from, t.path())?;
            }
            Content::Folder(files) => {
                std::fs::create_dir(t.path()).map_err(|e| Error::io("create", t.path(), e))?;
                for (n, from) in files {
                    copy(from, &t.path().join(n))?;
                }
            }
        }
        Ok(Pending::File(t))
    }

    fn remove(&self, name: &str) -> Result<()> {
        let p = self.path(name);
        let gone = if name.ends_with('/') {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        match gone {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove", &p, e)),
        }
    }

    fn remove_leftover(&self, name: &str) -> Result<()> {
        let old = self.path(name);
        let gone = if old.is_dir() {
            std::fs::remove_dir_all(&old)
        } else {
            std::fs::remove_file(&old)
        };
        match gone {
            Ok(()) => {
                if let Some(parent) = old.parent().filter(|p| *p != self.dir) {
                    let _ = std::fs::remove_dir(parent);
                }
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove", &old, e)),
        }
    }

    fn sync(&self, dir: &str) {
        sync_dir(&self.path(dir));
    }

    fn footer(&self, name: &str, _size: u64) -> Result<Check<Footer>> {
        Ok(match WeightFile::open(self.path(name)) {
            Ok(wf) => Check::Keep(Footer {
                stamp: wf.key_value(format::KEY_PART).map(str::to_owned),
                meta: wf.parquet_metadata().clone(),
            }),
            Err(e) => Check::Redo(format!("unreadable ({e})")),
        })
    }

    /// A part the journal (or a manifest) recorded when it was written: its whole
    /// file's XXH3-128 must be the recorded one (footer and pages included, at memory
    /// speed); otherwise every row's checksum is checked, decompressing it.
    fn content(
        &self,
        name: &str,
        _listed: &Listed,
        recorded: Option<&Recorded>,
    ) -> Result<Check<(u64, String)>> {
        let path = self.path(name);
        if let Some(r) = recorded {
            let (b, h) = file_hash(&path)?;
            if b == r.bytes && h == r.xxh3_128 {
                return Ok(Check::Keep((b, h)));
            }
            return Ok(Check::Redo(format!(
                "its content differs from the one recorded when it was written ({b} bytes, XXH3-128 {h}; recorded {} bytes, {})",
                r.bytes, r.xxh3_128
            )));
        }
        if let Some(why) = bad_row(&path) {
            return Ok(Check::Redo(why));
        }
        file_hash(&path).map(Check::Keep)
    }
}

/// Why the part at `path` fails its rows' checksums, if it does.
fn bad_row(path: &Path) -> Option<String> {
    let wf = match WeightFile::open(path) {
        Ok(wf) => wf,
        Err(e) => return Some(format!("unreadable ({e})")),
    };
    let mut bad = None;
    for rg in 0..wf.num_row_groups() {
        let scanned = wf.scan_row_group(rg, false, &mut |r| {
            let ok = r
                .checksum
                .is_some_and(|c| c == xxhash_rust::xxh3::xxh3_64(r.data));
            if !ok && bad.is_none() {
                bad = Some(r.row);
            }
            Ok(())
        });
        if let Err(e) = scanned {
            return Some(format!("row group {rg} is unreadable ({e})"));
        }
    }
    bad.map(|row| format!("row {row} fails its checksum"))
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
                crate::io::temp::track(&path);
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
        crate::io::temp::untrack(&self.path);
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
