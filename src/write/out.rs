//! Where a weight file's bytes go and how it appears: [`Out`] (a temp file or an
//! upload), hashed on the way ([`Hashing`]), then [`Pending`] until its commit.

use std::fs::File;

use crate::error::Result;
use crate::io::temp::TempPath;

/// Where a weight file's bytes go: a temp file beside the target, or a multipart
/// upload to object storage.
pub(crate) enum Out {
    /// The temp file, and its path (renamed over the target by the commit).
    File(File, TempPath),
    /// An upload whose completion is the commit.
    #[cfg(feature = "remote")]
    Object(crate::io::store::Upload),
}

impl Out {
    /// A new temp file beside `target`.
    ///
    /// # Errors
    ///
    /// `Io` naming the temp file.
    pub(crate) fn temp_file(target: &std::path::Path) -> Result<Out> {
        let tmp = TempPath::beside(target);
        let file = tmp.create_file()?;
        Ok(Out::File(file, tmp))
    }
}

impl std::io::Write for Out {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Out::File(f, _) => f.write(buf),
            #[cfg(feature = "remote")]
            Out::Object(u) => u.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Out::File(f, _) => f.flush(),
            #[cfg(feature = "remote")]
            Out::Object(u) => u.flush(),
        }
    }
}

/// A file not yet in place: a synced temp file (or folder), an upload with every part
/// stored, or objects to store.
pub(crate) enum Pending {
    /// Renamed over its target by the commit.
    File(TempPath),
    /// Completed by the commit.
    #[cfg(feature = "remote")]
    Object(crate::io::store::Upload),
    /// Objects stored by the commit, one request each: `(name, content)`.
    #[cfg(feature = "remote")]
    Put(
        std::sync::Arc<crate::io::store::ObjectDir>,
        Vec<(String, Vec<u8>)>,
    ),
}

impl Pending {
    /// Puts the file in place: renames the temp file, or completes the upload (whose
    /// ETag is returned).
    ///
    /// # Errors
    ///
    /// `Io` naming the target, `Remote` naming the object.
    pub(crate) fn commit(self) -> Result<Option<String>> {
        match self {
            Pending::File(t) => t.commit().map(|()| None),
            #[cfg(feature = "remote")]
            Pending::Object(u) => u.complete(),
            #[cfg(feature = "remote")]
            Pending::Put(dir, objects) => {
                let mut tag = None;
                for (name, bytes) in objects {
                    tag = dir.put(&name, bytes)?;
                }
                Ok(tag)
            }
        }
    }
}

/// The file under the writer's buffer: every byte hashed on its way (when asked).
pub(crate) struct Hashing {
    /// Where the bytes go.
    pub(crate) file: Out,
    /// The hash of the bytes so far, when asked.
    pub(crate) hash: Option<Box<xxhash_rust::xxh3::Xxh3>>,
}

impl std::io::Write for Hashing {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        if let Some(h) = &mut self.hash {
            h.update(&buf[..n]);
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}
