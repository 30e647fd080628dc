//! Object storage by prefix (the `remote` feature): the stores a checkpoint is read
//! from (S3, plain HTTP directories), listing below a prefix, and an output prefix
//! ([`ObjectDir`]: head, get, ranges, list, put, multipart upload, delete). On the write
//! side the weight file, or each part of a parted output, streams out as a multipart
//! upload while it is written; side files are single PUTs.
//!
//! An object appears only when its upload is completed, so an upload plays the part a
//! temp file plays on a disk: [`Upload::complete`] is the rename, and an upload dropped
//! before it (an error, Ctrl-C) is aborted, leaving no object and no stored upload
//! parts. A process killed outright cannot abort: its upload parts stay invisible
//! until the bucket's lifecycle rule (`AbortIncompleteMultipartUpload`) removes them.
//!
//! # Memory
//!
//! Upload parts are fixed-size chunks of the file as the appender writes it
//! ([`chunk_bytes`], 8 MiB or more), at most [`PARTS_IN_FLIGHT`] of them sent at once:
//! about 40 MiB beside the row groups in flight, whatever the file size.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path as StorePath;
use object_store::{MultipartUpload, ObjectStore, ObjectStoreExt, PutPayload};

use crate::error::{Error, Result};
use crate::io::http::{self as client, Client};
use crate::io::url::ObjectUrl;
use crate::io::Listed;

/// A client of the S3 bucket `bucket` from the usual `AWS_*` environment (region,
/// credentials chain, `AWS_ENDPOINT_URL` for S3-compatible stores), sending through
/// `client`; `url` names it in errors.
///
/// # Errors
///
/// `Remote` when the environment does not make a client.
pub(crate) fn s3_store(client: &Client, bucket: &str, url: &str) -> Result<Arc<dyn ObjectStore>> {
    let store = object_store::aws::AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_http_connector(client.connector(false))
        .with_retry(client.settings.retry())
        .build()
        .map_err(|e| Error::Remote {
            url: url.to_string(),
            reason: describe(&e),
        })?;
    Ok(Arc::new(store))
}

/// A client of the plain HTTP(S) directory `base_url`, sending through `client` (with
/// its token where `with_token`: the Hub's own host); `url` names it in errors.
///
/// # Errors
///
/// `Remote` when the URL does not make a client.
pub(crate) fn http_store(
    client: &Client,
    base_url: &str,
    url: &str,
    with_token: bool,
) -> Result<Arc<dyn ObjectStore>> {
    let store = object_store::http::HttpBuilder::new()
        .with_url(base_url.trim_end_matches('/'))
        .with_http_connector(client.connector(with_token))
        .with_retry(client.settings.retry())
        .with_client_options(client.options())
        .build()
        .map_err(|e| Error::Remote {
            url: url.to_string(),
            reason: describe(&e),
        })?;
    Ok(Arc::new(store))
}

/// Every object of `store` below `dir` (a key prefix ending with `/`, or empty for the
/// whole store), by its key relative to `dir`: what an input's and an output's listings
/// read.
///
/// # Errors
///
/// The store's, for the caller to name the URL.
pub(crate) fn list_below(
    client: &Client,
    store: &dyn ObjectStore,
    dir: &str,
) -> std::result::Result<Vec<(String, object_store::ObjectMeta)>, object_store::Error> {
    use futures_util::TryStreamExt;
    let prefix = (!dir.is_empty()).then(|| StorePath::from(dir.trim_end_matches('/')));
    let metas: Vec<object_store::ObjectMeta> = client
        .rt()
        .block_on(store.list(prefix.as_ref()).try_collect())?;
    Ok(metas
        .into_iter()
        .filter_map(|m| {
            let name = m.location.as_ref().strip_prefix(dir)?.to_string();
            Some((name, m))
        })
        .collect())
}

/// An `object_store` error in words for the user: what happened, without the
/// store's internals where they say nothing more.
pub(crate) fn describe(e: &object_store::Error) -> String {
    match e {
        object_store::Error::NotFound { .. } => "not found (404)".into(),
        object_store::Error::PermissionDenied { .. } => {
            "access denied (403): check the credentials".into()
        }
        object_store::Error::Unauthenticated { .. } => {
            "not authenticated (401): check the credentials".into()
        }
        other => {
            let mut s = other.to_string();
            let mut src = std::error::Error::source(other);
            while let Some(e) = src {
                let t = e.to_string();
                if !s.contains(&t) {
                    s.push_str(": ");
                    s.push_str(&t);
                }
                src = e.source();
            }
            shorten_xml(&s)
        }
    }
}

/// An S3 error body (`<Error><Code>NoSuchBucket</Code><Message>…`) in `s`, said as
/// `NoSuchBucket: …`.
fn shorten_xml(s: &str) -> String {
    let tag = |t: &str| {
        let open = format!("<{t}>");
        let a = s.find(&open)? + open.len();
        let b = a + s[a..].find(&format!("</{t}>"))?;
        Some(&s[a..b])
    };
    match (s.find("<?xml").or_else(|| s.find("<Error>")), tag("Code")) {
        (Some(at), Some(code)) => {
            let msg = tag("Message").map(|m| format!(": {m}")).unwrap_or_default();
            format!("{}{code}{msg}", &s[..at])
        }
        _ => s.to_string(),
    }
}

/// Upload parts sent at once; the appender waits for the oldest beyond this.
pub(crate) const PARTS_IN_FLIGHT: usize = 4;

/// The smallest upload part (S3 wants 5 MiB but for the last; larger parts mean fewer
/// requests).
const MIN_CHUNK: u64 = 8 << 20;

/// S3 takes at most 10,000 parts per upload; the planned size leaves this many.
const MAX_CHUNKS: u64 = 9_000;

/// The upload part size for a file of about `expected` bytes: every part but the last
/// the same size (as R2 requires), at least [`MIN_CHUNK`], and few enough for S3's
/// part limit with 10% to spare over the plan (compressed pages are rarely larger than
/// the planned bytes; the footer is small).
pub(crate) fn chunk_bytes(expected: u64) -> usize {
    let need = expected
        .saturating_add(expected / 10)
        .saturating_add(64 << 20)
        / MAX_CHUNKS;
    let mib = 1u64 << 20;
    let c = need.div_ceil(mib).saturating_mul(mib).max(MIN_CHUNK);
    usize::try_from(c).unwrap_or(usize::MAX)
}

/// An output prefix in a bucket.
pub(crate) struct ObjectDir {
    client: Arc<Client>,
    store: Arc<dyn ObjectStore>,
    /// `s3://BUCKET/PREFIX/`, ending with `/`.
    base_url: String,
    /// Object keys are `prefix` + name (`PREFIX/`, or empty for the bucket's root).
    prefix: String,
}

impl std::fmt::Debug for ObjectDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectDir")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl ObjectDir {
    /// The prefix `url` names, with a client from the environment. Sends no request.
    ///
    /// # Errors
    ///
    /// `Remote` when the environment does not make a client.
    pub(crate) fn open(url: &ObjectUrl) -> Result<ObjectDir> {
        let client = Client::new(client::Settings::from_env(None)?)?;
        let store = s3_store(&client, &url.bucket, &url.url())?;
        Ok(ObjectDir {
            client,
            store,
            base_url: url.url(),
            prefix: url.prefix.clone(),
        })
    }

    /// The URL of `name`, for messages and reports.
    pub(crate) fn url(&self, name: &str) -> String {
        format!("{}{name}", self.base_url)
    }

    fn path(&self, name: &str) -> Result<StorePath> {
        StorePath::parse(format!("{}{name}", self.prefix)).map_err(|e| Error::Remote {
            url: self.url(name),
            reason: format!("not a valid object key: {e}"),
        })
    }

    fn error(&self, name: &str, what: &str, e: &object_store::Error) -> Error {
        Error::Remote {
            url: self.url(name),
            reason: format!("{what}: {}", describe(e)),
        }
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.client.rt().block_on(f)
    }

    /// `name`'s size and ETag, or `None` when there is no such object.
    ///
    /// # Errors
    ///
    /// `Remote` naming the object.
    pub(crate) fn head(&self, name: &str) -> Result<Option<Listed>> {
        let path = self.path(name)?;
        match self.block_on(self.store.head(&path)) {
            Ok(m) => Ok(Some(Listed {
                size: m.size,
                e_tag: m.e_tag,
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(name, "cannot look it up", &e)),
        }
    }

    /// The whole of `name`, or `None` when there is no such object.
    ///
    /// # Errors
    ///
    /// `Remote` naming the object.
    pub(crate) fn get(&self, name: &str) -> Result<Option<Bytes>> {
        let path = self.path(name)?;
        let got = self.block_on(async {
            let r = self.store.get(&path).await?;
            r.bytes().await
        });
        match got {
            Ok(b) => Ok(Some(b)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(name, "cannot read it", &e)),
        }
    }

    /// Bytes `range` of `name`.
    ///
    /// # Errors
    ///
    /// `Remote` naming the object.
    pub(crate) fn get_range(&self, name: &str, range: std::ops::Range<u64>) -> Result<Bytes> {
        let path = self.path(name)?;
        self.block_on(self.store.get_range(&path, range))
            .map_err(|e| self.error(name, "cannot read it", &e))
    }

    /// The size and XXH3-128 ([`super::hex128`]) of `name`, read back whole as a
    /// stream.
    ///
    /// # Errors
    ///
    /// `Remote` naming the object.
    pub(crate) fn hash(&self, name: &str) -> Result<(u64, String)> {
        use futures_util::StreamExt;
        let path = self.path(name)?;
        let got = self.block_on(async {
            let mut body = self.store.get(&path).await?.into_stream();
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            let mut n = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                h.update(&chunk);
                n += chunk.len() as u64;
            }
            Ok::<_, object_store::Error>((n, super::hex128(h.digest128())))
        });
        got.map_err(|e| self.error(name, "cannot read it back", &e))
    }

    /// Writes `bytes` as `name` in one request: the object is replaced whole or not at
    /// all. Returns its ETag.
    ///
    /// # Errors
    ///
    /// `Remote` naming the object.
    pub(crate) fn put(&self, name: &str, bytes: Vec<u8>) -> Result<Option<String>> {
        let path = self.path(name)?;
        self.block_on(self.store.put(&path, PutPayload::from(bytes)))
            .map(|r| r.e_tag)
            .map_err(|e| self.error(name, "cannot write it", &e))
    }

    /// Deletes `name`; an object that is not there is fine.
    ///
    /// # Errors
    ///
    /// `Remote` naming the object.
    pub(crate) fn delete(&self, name: &str) -> Result<()> {
        let path = self.path(name)?;
        match self.block_on(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error(name, "cannot delete it", &e)),
        }
    }

    /// Every object below `dir` (a name ending with `/`), by its name relative to it.
    ///
    /// # Errors
    ///
    /// `Remote` naming the prefix.
    pub(crate) fn list(&self, dir: &str) -> Result<BTreeMap<String, Listed>> {
        let full = format!("{}{dir}", self.prefix);
        let below = list_below(&self.client, self.store.as_ref(), &full)
            .map_err(|e| self.error(dir, "cannot list it", &e))?;
        Ok(below
            .into_iter()
            .map(|(name, m)| {
                let l = Listed {
                    size: m.size,
                    e_tag: m.e_tag,
                };
                (name, l)
            })
            .collect())
    }

    /// Starts a multipart upload of `name`, a file of about `expected` bytes.
    ///
    /// # Errors
    ///
    /// `Remote` naming the object.
    pub(crate) fn upload(&self, name: &str, expected: u64) -> Result<Upload> {
        let path = self.path(name)?;
        let upload = self
            .block_on(self.store.put_multipart(&path))
            .map_err(|e| self.error(name, "cannot start its upload", &e))?;
        let chunk = chunk_bytes(expected);
        Ok(Upload {
            url: self.url(name),
            client: self.client.clone(),
            upload: Some(upload),
            chunk,
            buf: Vec::new(),
            inflight: VecDeque::new(),
            sent: 0,
        })
    }
}

/// A file being written as a multipart upload: written to like a file, then
/// [`Upload::finish`]ed (every part sent and stored), then [`Upload::complete`]d (the
/// object appears). Dropped before that, it is aborted.
pub(crate) struct Upload {
    url: String,
    client: Arc<Client>,
    /// `None` once completed or aborted.
    upload: Option<Box<dyn MultipartUpload>>,
    chunk: usize,
    buf: Vec<u8>,
    inflight: VecDeque<tokio::task::JoinHandle<object_store::Result<()>>>,
    /// Bytes handed to parts so far.
    sent: u64,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("url", &self.url)
            .field("sent", &self.sent)
            .finish_non_exhaustive()
    }
}

impl Upload {
    /// Waits for the oldest part in flight.
    fn wait_one(&mut self) -> std::io::Result<()> {
        let Some(h) = self.inflight.pop_front() else {
            return Ok(());
        };
        match self.client.rt().block_on(h) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(std::io::Error::other(format!(
                "upload of {} failed: {}",
                self.url,
                describe(&e)
            ))),
            Err(e) => Err(std::io::Error::other(format!(
                "upload of {} failed: {e}",
                self.url
            ))),
        }
    }

    /// Sends the buffered bytes as the next part, waiting first while
    /// [`PARTS_IN_FLIGHT`] are in flight.
    fn send(&mut self) -> std::io::Result<()> {
        while self.inflight.len() >= PARTS_IN_FLIGHT {
            self.wait_one()?;
        }
        let Some(up) = self.upload.as_mut() else {
            return Err(std::io::Error::other(format!(
                "upload of {} is closed",
                self.url
            )));
        };
        let data = std::mem::take(&mut self.buf);
        self.sent += data.len() as u64;
        let part = up.put_part(PutPayload::from(Bytes::from(data)));
        self.inflight.push_back(self.client.rt().spawn(part));
        Ok(())
    }

    /// Sends the last part and waits until every part is stored; returns the file's
    /// bytes.
    ///
    /// # Errors
    ///
    /// `Remote` naming the object: a part that failed after its retries.
    pub(crate) fn finish(&mut self) -> Result<u64> {
        let url = self.url.clone();
        let io = |e: std::io::Error| Error::Remote {
            url: url.clone(),
            reason: e.to_string(),
        };
        if !self.buf.is_empty() || self.sent == 0 {
            self.send().map_err(io)?;
        }
        while !self.inflight.is_empty() {
            self.wait_one().map_err(io)?;
        }
        Ok(self.sent)
    }

    /// Completes the upload of a [`Upload::finish`]ed file: the object appears whole.
    /// Returns its ETag.
    ///
    /// # Errors
    ///
    /// `Remote` naming the object.
    pub(crate) fn complete(mut self) -> Result<Option<String>> {
        let mut up = self.upload.take().ok_or_else(|| Error::Remote {
            url: self.url.clone(),
            reason: "the upload is closed".into(),
        })?;
        match self.client.rt().block_on(up.complete()) {
            Ok(r) => Ok(r.e_tag),
            Err(e) => {
                let _ = self.client.rt().block_on(up.abort());
                Err(Error::Remote {
                    url: self.url.clone(),
                    reason: format!("cannot complete its upload: {}", describe(&e)),
                })
            }
        }
    }
}

impl Write for Upload {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(self.chunk);
        }
        let n = (self.chunk - self.buf.len()).min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.chunk {
            self.send()?;
        }
        Ok(n)
    }

    /// Parts go out as they fill; the last one at [`Upload::finish`].
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(mut up) = self.upload.take() {
            for h in self.inflight.drain(..) {
                h.abort();
            }
            let _ = self.client.rt().block_on(up.abort());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_parts_are_at_least_8_mib_and_few_enough_for_s3() {
        assert_eq!(chunk_bytes(0), 8 << 20);
        assert_eq!(chunk_bytes(4 << 30), 8 << 20);
        for size in [75u64 << 30, 700 << 30, 1_300_000_000_000] {
            let c = chunk_bytes(size) as u64;
            assert_eq!(c % (1 << 20), 0);
            assert!((size + size / 10).div_ceil(c) <= MAX_CHUNKS, "{size} {c}");
        }
    }
}
