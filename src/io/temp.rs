//! Output that appears only complete: temp files beside the target, renamed into
//! place after they are synced, removed on any error, on drop, and by the Ctrl-C
//! handler through [`remove_temp_files`].

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};

static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Removes every temp file this process has open. Meant for a signal handler that is
/// about to exit without unwinding.
pub fn remove_temp_files() {
    if let Ok(live) = LIVE.lock() {
        for p in live.iter() {
            let _ = std::fs::remove_file(p);
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// Registers a file for [`remove_temp_files`] (a lock file, removed with the temp
/// files when a second Ctrl-C exits at once).
pub(crate) fn track(path: &Path) {
    if let Ok(mut live) = LIVE.lock() {
        live.push(path.to_path_buf());
    }
}

/// Unregisters a file [`track`] registered.
pub(crate) fn untrack(path: &Path) {
    if let Ok(mut live) = LIVE.lock() {
        live.retain(|p| p != path);
    }
}

/// A file or directory being written beside its final name.
#[derive(Debug)]
pub(crate) struct TempPath {
    tmp: PathBuf,
    target: PathBuf,
    done: bool,
}

impl TempPath {
    /// A temp path in `target`'s directory, named after it, not yet created.
    pub(crate) fn beside(target: &Path) -> TempPath {
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tmp = target.with_file_name(format!(".{name}.tmp-{}-{nonce:08x}", std::process::id()));
        if let Ok(mut live) = LIVE.lock() {
            live.push(tmp.clone());
        }
        TempPath {
            tmp,
            target: target.to_path_buf(),
            done: false,
        }
    }

    /// The temp path.
    pub(crate) fn path(&self) -> &Path {
        &self.tmp
    }

    /// Creates the temp file (refusing to follow anything already there).
    ///
    /// # Errors
    ///
    /// `Io` naming the temp file.
    pub(crate) fn create_file(&self) -> Result<File> {
        File::options()
            .write(true)
            .create_new(true)
            .open(&self.tmp)
            .map_err(|e| Error::io("create", &self.tmp, e))
    }

    /// Writes `bytes` to the temp file and syncs it.
    ///
    /// # Errors
    ///
    /// `Io` naming the temp file.
    pub(crate) fn write_all(&self, bytes: &[u8]) -> Result<()> {
        use std::io::Write;
        let mut f = self.create_file()?;
        f.write_all(bytes)
            .and_then(|_| f.sync_all())
            .map_err(|e| Error::io("write", &self.tmp, e))
    }

    /// Renames the temp file (or directory) over the target.
    ///
    /// # Errors
    ///
    /// `Io` naming the target.
    pub(crate) fn commit(mut self) -> Result<()> {
        if self.tmp.is_dir() && self.target.is_dir() {
            std::fs::remove_dir_all(&self.target)
                .map_err(|e| Error::io("replace", &self.target, e))?;
        }
        std::fs::rename(&self.tmp, &self.target)
            .map_err(|e| Error::io("rename into", &self.target, e))?;
        self.done = true;
        self.forget();
        Ok(())
    }

    fn forget(&self) {
        if let Ok(mut live) = LIVE.lock() {
            live.retain(|p| p != &self.tmp);
        }
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if !self.done {
            if self.tmp.is_dir() {
                let _ = std::fs::remove_dir_all(&self.tmp);
            } else {
                let _ = std::fs::remove_file(&self.tmp);
            }
            self.forget();
        }
    }
}

/// Syncs a directory so renames inside it are durable.
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The process id in a temp file name of ours (`.NAME.tmp-PID-NONCE`), if it is one.
fn temp_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let (_, tail) = rest.rsplit_once(".tmp-")?;
    let (pid, nonce) = tail.split_once('-')?;
    let hex = !nonce.is_empty() && nonce.bytes().all(|b| b.is_ascii_hexdigit());
    hex.then(|| pid.parse().ok()).flatten()
}

/// Removes the temp files (and staged directories) in `dir` that a process which no
/// longer exists left behind (a conversion killed with SIGKILL or by the OOM killer),
/// and returns their names. Those of live processes (another conversion into the same
/// directory) are left alone. Linux: liveness is `/proc/PID`.
pub(crate) fn remove_stale_temp_files(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let me = std::process::id();
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = temp_owner(&name) else {
            continue;
        };
        if pid == me || Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let p = e.path();
        let gone = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        if gone.is_ok() {
            removed.push(name);
        }
    }
    removed.sort();
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_give_their_owner() {
        assert_eq!(temp_owner(".weights.parquet.tmp-4242-0a1b2c3d"), Some(4242));
        assert_eq!(temp_owner(".tokenizer.tmp-7-ff"), Some(7));
        for other in [
            "weights.parquet",
            ".weights.parquet",
            ".x.tmp-abc-12",
            ".x.tmp-12-",
            "x.tmp-12-ab",
        ] {
            assert_eq!(temp_owner(other), None, "{other}");
        }
    }
}
