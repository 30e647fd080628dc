//! An object-store output prefix (`-o s3://BUCKET/PREFIX/`): weight files and parts
//! stream out as multipart uploads, completed when whole; side files are single PUTs.
//!
//! An earlier conversion cannot be replaced in one step: its `metadata.json` goes first
//! and comes back last, so that nothing there is a conversion in between. A part is
//! checked by its footer, read by two ranges, and by the ETag the journal recorded (a
//! part listed only by a manifest is hashed as it is read back).
//!
//! There is no lock: object stores have no advisory locks, so two conversions into one
//! prefix at once are the user's to avoid.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use parquet::file::metadata::{FooterTail, ParquetMetaDataReader};

use super::{read_local, Begin, Begun, Check, Content, Destination, Footer, Recorded};
use crate::error::{Error, Result};
use crate::format;
use crate::io::store::ObjectDir;
use crate::io::url::ObjectUrl;
use crate::io::Listed;
use crate::write::{Out, Pending};

/// The largest footer read back from a part (ours are a few MB for the largest models).
const MAX_FOOTER: u64 = 64 << 20;

/// An output prefix in a bucket.
#[derive(Debug)]
pub(crate) struct ObjectDest {
    dir: Arc<ObjectDir>,
}

impl ObjectDest {
    /// The prefix `url` names, with a client from the environment. Sends no request.
    ///
    /// # Errors
    ///
    /// `Remote` when the environment does not make a client.
    pub(crate) fn open(url: &ObjectUrl) -> Result<ObjectDest> {
        Ok(ObjectDest {
            dir: Arc::new(ObjectDir::open(url)?),
        })
    }

    /// Deletes every object below `dir` (a name ending with `/`).
    fn delete_below(&self, dir: &str) -> Result<()> {
        for name in self.dir.list(dir)?.keys() {
            self.dir.delete(&format!("{dir}{name}"))?;
        }
        Ok(())
    }
}

impl Destination for ObjectDest {
    fn locate(&self, name: &str) -> PathBuf {
        PathBuf::from(self.dir.url(name))
    }

    fn begin(&self, b: &Begin<'_>) -> Result<Begun> {
        if b.validate {
            return Err(super::validate_refused());
        }
        let old_metadata = self.dir.get(format::METADATA_FILE)?.map(|b| b.to_vec());
        if !b.force && !b.resume {
            let parts = super::parts_dir();
            let there = if old_metadata.is_some() {
                Some(format::METADATA_FILE.to_string())
            } else if self.dir.head(format::WEIGHTS_FILE)?.is_some() {
                Some(format::WEIGHTS_FILE.to_string())
            } else {
                let listed = self.dir.list(&parts)?;
                listed.keys().next().map(|n| format!("{parts}{n}"))
            };
            if let Some(name) = there {
                return Err(Error::OutputExists {
                    path: self.locate(&name),
                });
            }
        }
        Ok(Begun {
            stale: Vec::new(),
            old_metadata,
            _guard: None,
        })
    }

    fn replaces_atomically(&self) -> bool {
        false
    }

    fn head(&self, name: &str) -> Result<Option<Listed>> {
        self.dir.head(name)
    }

    fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.dir.get(name)?.map(|b| b.to_vec()))
    }

    fn list(&self, dir: &str) -> Result<BTreeMap<String, Listed>> {
        self.dir.list(dir)
    }

    fn make_dir(&self, _dir: &str, _clean: bool) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    fn create(&self, name: &str, expected: u64) -> Result<Out> {
        Ok(Out::Object(self.dir.upload(name, expected)?))
    }

    fn stage(&self, name: &str, content: Content<'_>) -> Result<Pending> {
        let objects = match content {
            Content::Bytes(b) => vec![(name.to_string(), b.to_vec())],
            Content::Copy(from) => vec![(name.to_string(), read_local(from)?)],
            Content::Folder(files) => files
                .iter()
                .map(|(n, from)| Ok((format!("{name}/{n}"), read_local(from)?)))
                .collect::<Result<_>>()?,
        };
        Ok(Pending::Put(self.dir.clone(), objects))
    }

    fn remove(&self, name: &str) -> Result<()> {
        if name.ends_with('/') {
            self.delete_below(name)
        } else {
            self.dir.delete(name)
        }
    }

    fn remove_leftover(&self, name: &str) -> Result<()> {
        self.dir.delete(name)?;
        self.delete_below(&format!("{name}/"))
    }

    fn sync(&self, _dir: &str) {}

    fn footer(&self, name: &str, size: u64) -> Result<Check<Footer>> {
        if size < 12 {
            return Ok(Check::Redo(format!("{size} bytes: not a Parquet file")));
        }
        let tail = self.dir.get_range(name, size - 8..size)?;
        let Ok(tail) = <[u8; 8]>::try_from(tail.as_ref()) else {
            return Ok(Check::Redo("the server sent a short footer".into()));
        };
        let len = match FooterTail::try_new(&tail) {
            Ok(t) => t.metadata_length() as u64,
            Err(e) => return Ok(Check::Redo(format!("not a Parquet file ({e})"))),
        };
        if len > MAX_FOOTER || len + 8 > size {
            return Ok(Check::Redo(format!(
                "its footer length ({len} bytes) is not plausible"
            )));
        }
        let buf = self.dir.get_range(name, size - 8 - len..size - 8)?;
        let meta = match ParquetMetaDataReader::decode_metadata(&buf) {
            Ok(m) => m,
            Err(e) => return Ok(Check::Redo(format!("its footer is unreadable ({e})"))),
        };
        let stamp = meta
            .file_metadata()
            .key_value_metadata()
            .and_then(|kv| kv.iter().find(|k| k.key == format::KEY_PART))
            .and_then(|k| k.value.clone());
        Ok(Check::Keep(Footer { stamp, meta }))
    }

    fn content(
        &self,
        name: &str,
        listed: &Listed,
        recorded: Option<&Recorded>,
    ) -> Result<Check<(u64, String)>> {
        let Some(r) = recorded else {
            return Ok(Check::Redo(
                "the journal does not record it (it was completed as the run stopped)".into(),
            ));
        };
        let (bytes, hash) = match &r.e_tag {
            // Recorded with its ETag: the object is the one this conversion stored.
            Some(tag) if Some(tag) == listed.e_tag.as_ref() && r.bytes == listed.size => {
                (r.bytes, r.xxh3_128.clone())
            }
            Some(tag) => {
                return Ok(Check::Redo(format!(
                    "it changed since it was written ({} bytes, ETag {}; recorded {} bytes, ETag {tag})",
                    listed.size,
                    listed.e_tag.as_deref().unwrap_or("none"),
                    r.bytes
                )))
            }
            // Recorded by a manifest only: its content is hashed as it is read back.
            None => self.dir.hash(name)?,
        };
        if bytes != r.bytes || hash != r.xxh3_128 {
            return Ok(Check::Redo(format!(
                "its content differs from the one recorded when it was written ({bytes} bytes, XXH3-128 {hash}; recorded {} bytes, {})",
                r.bytes, r.xxh3_128
            )));
        }
        Ok(Check::Keep((bytes, hash)))
    }

    fn redo_alone(&self) -> Option<&'static str> {
        Some("a part in object storage is written again (checking it would read it back whole)")
    }
}
