//! Remote shard bytes: large aligned ranges (chunks) fetched ahead of the reader, a few
//! in flight, kept in one bounded cache shared by every shard of a source.
//!
//! The cast stage reads a piece of a row at a time (about 1 MiB), in source order, from
//! as many threads as the pipeline has row groups in flight. A piece is served from the
//! chunks that cover it; the read also starts the next [`ahead`] chunks of its file, so
//! the network stays busy while the pipeline casts and compresses. The cache holds at
//! most [`capacity`] chunks (fetched or in flight), evicting the least recently used:
//! with the pipeline's bounded window of row groups, a chunk is used and done with long
//! before it is the oldest; one that is needed again is fetched again (correct, and
//! counted in the bytes fetched). Memory: at most `capacity × CHUNK` bytes of input,
//! whatever the model size, in place of the mapped pages a local shard would use: a
//! quarter of the conversion's budget of bytes in flight, which the writer counts.
//!
//! Every response is checked against the size and ETag the file had when its header
//! was read: a file that changes while it is read is `SourceChanged`.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use object_store::path::Path as StorePath;
use object_store::{GetOptions, GetRange, ObjectStore};

use crate::error::{Error, Result};
use crate::io::http::Client;

/// Bytes per chunk: one request's range.
pub(crate) const CHUNK: u64 = 4 << 20;

/// Chunks the cache holds, fetched or in flight, for `readers` reading at once (the
/// pipeline's worker threads) within a conversion's `budget` of bytes in flight: a
/// quarter of it (the rest is the writer's), and at least each reader's chunk and the
/// one after it, and two more (a piece that spans two chunks, one evicted early).
pub(crate) fn capacity(readers: usize, budget: u64) -> usize {
    let least = readers.max(1).saturating_mul(2).saturating_add(2);
    usize::try_from(budget / 4 / CHUNK)
        .unwrap_or(usize::MAX)
        .max(least)
}

/// Chunks a read starts ahead of itself: what `capacity` leaves each of `readers`
/// beyond the chunk it reads and the two spare.
pub(crate) fn ahead(capacity: usize, readers: usize) -> u64 {
    (capacity.saturating_sub(2) / readers.max(1))
        .saturating_sub(1)
        .max(1) as u64
}

/// Why a fetch failed, kept for every reader of the source.
#[derive(Debug, Clone)]
enum Failure {
    Changed(String, String),
    Failed(String, String),
}

impl Failure {
    fn error(&self) -> Error {
        match self {
            Failure::Changed(url, reason) => Error::SourceChanged {
                path: url.into(),
                reason: reason.clone(),
            },
            Failure::Failed(url, reason) => Error::Remote {
                url: url.clone(),
                reason: reason.clone(),
            },
        }
    }
}

/// Buffers of chunks the cache no longer holds, kept for the next ones: a remote input
/// allocates its cache's capacity once. A fresh buffer per response cost page faults,
/// and keeping a response's frames instead pinned the HTTP client's read buffers (peak
/// RSS 60–90 MiB higher on the 4.4 GB bench).
#[derive(Default)]
struct Pool(Mutex<Vec<Vec<u8>>>);

impl Pool {
    fn take(&self) -> Vec<u8> {
        let mut free = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut buf = free.pop().unwrap_or_default();
        buf.clear();
        buf
    }

    fn put(&self, buf: Vec<u8>, keep: usize) {
        let mut free = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < keep && buf.capacity() > 0 {
            free.push(buf);
        }
    }
}

/// A fetched chunk's bytes; its buffer goes back to the pool when the cache and the
/// last reader copying from it are done with it.
struct Chunk {
    buf: Vec<u8>,
    pool: Arc<Pool>,
    keep: usize,
}

impl Drop for Chunk {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.buf), self.keep);
    }
}

enum Slot {
    Pending,
    Ready {
        data: Arc<Chunk>,
        used: u64,
        /// A read ended at or past the chunk's end: its reader has moved on.
        passed: bool,
    },
}

#[derive(Default)]
struct Cache {
    /// `(file, chunk)` → its slot.
    slots: HashMap<(usize, u64), Slot>,
    tick: u64,
    failed: Option<Failure>,
}

/// What every remote file of one source shares: the client, the cache, the
/// cancellation flag of the conversion reading it.
pub(crate) struct Shared {
    pub(crate) client: Arc<Client>,
    cache: Mutex<Cache>,
    ready: Condvar,
    cancel: OnceLock<Arc<AtomicBool>>,
    files: std::sync::atomic::AtomicUsize,
    /// Chunks the cache holds (see [`capacity`]).
    capacity: std::sync::atomic::AtomicUsize,
    /// Chunks a read starts ahead of itself (see [`ahead`]).
    ahead: std::sync::atomic::AtomicU64,
    pool: Arc<Pool>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) fn new(client: Arc<Client>) -> Arc<Shared> {
        Arc::new(Shared {
            client,
            cache: Mutex::new(Cache::default()),
            ready: Condvar::new(),
            cancel: OnceLock::new(),
            files: Default::default(),
            capacity: capacity(1, 0).into(),
            ahead: ahead(capacity(1, 0), 1).into(),
            pool: Arc::default(),
        })
    }

    /// Makes reads waiting on the network return `Cancelled` once `flag` is set.
    pub(crate) fn set_cancel(&self, flag: Arc<AtomicBool>) {
        let _ = self.cancel.set(flag);
    }

    /// Sizes the cache for `readers` reading at once within `budget` bytes in flight;
    /// returns the bytes it may hold, which the writer counts in that budget.
    pub(crate) fn size_for(&self, readers: usize, budget: u64) -> u64 {
        let n = capacity(readers, budget);
        self.capacity.store(n, Ordering::Relaxed);
        self.ahead.store(ahead(n, readers), Ordering::Relaxed);
        n as u64 * CHUNK
    }

    fn cancelled(&self) -> bool {
        self.cancel.get().is_some_and(|f| f.load(Ordering::Relaxed))
    }

    fn lock(&self) -> MutexGuard<'_, Cache> {
        // A poisoned lock means a reader panicked; the cache itself is still coherent.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One remote file: where it is, its size and ETag as first seen.
#[derive(Debug)]
pub(crate) struct RemoteFile {
    /// The URL shown to the user (no credentials in it).
    pub(crate) url: String,
    pub(crate) size: u64,
    /// The ETag every response must carry: the listing's, else the first response's
    /// (the Hub's listing has none for the storage it redirects to).
    seen: Arc<OnceLock<String>>,
    store: Arc<dyn ObjectStore>,
    path: StorePath,
    shared: Arc<Shared>,
    id: usize,
}

impl RemoteFile {
    pub(crate) fn new(
        url: String,
        store: Arc<dyn ObjectStore>,
        path: StorePath,
        size: u64,
        etag: Option<String>,
        shared: Arc<Shared>,
    ) -> RemoteFile {
        let id = shared.files.fetch_add(1, Ordering::Relaxed);
        let seen = Arc::new(OnceLock::new());
        if let Some(e) = &etag {
            let _ = seen.set(e.clone());
        }
        RemoteFile {
            url,
            size,
            seen,
            store,
            path,
            shared,
            id,
        }
    }

    /// Bytes `range` read at once, outside the cache (headers, small files).
    ///
    /// # Errors
    ///
    /// `Remote` after the retries, `SourceChanged` when the file is not the one seen.
    pub(crate) fn read_direct(&self, range: Range<u64>) -> Result<Bytes> {
        let fut = fetch_into(
            Vec::new(),
            self.store.clone(),
            self.path.clone(),
            range,
            self.seen.clone(),
            self.size,
            self.url.clone(),
        );
        let data = self.shared.client.rt().block_on(fut);
        data.map(Bytes::from).map_err(|f| f.error())
    }

    /// Bytes of every range of `ranges` (small and scattered: a zip archive's local
    /// headers), fetched outside the cache: ranges less than 64 KiB apart are read as
    /// one, eight requests at a time. Returns the ranges read, each with its first
    /// byte's offset; they cover `ranges`.
    ///
    /// # Errors
    ///
    /// As [`RemoteFile::read_direct`].
    pub(crate) fn read_many(&self, ranges: &[Range<u64>]) -> Result<Vec<(u64, Bytes)>> {
        use futures_util::{StreamExt, TryStreamExt};
        const GAP: u64 = 64 << 10;
        let mut sorted: Vec<Range<u64>> =
            ranges.iter().filter(|r| r.end > r.start).cloned().collect();
        sorted.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::new();
        for r in sorted {
            match merged.last_mut() {
                Some(last) if r.start <= last.end.saturating_add(GAP) => {
                    last.end = last.end.max(r.end);
                }
                _ => merged.push(r),
            }
        }
        let fetches = merged.into_iter().map(|r| {
            let start = r.start;
            let f = fetch_into(
                Vec::new(),
                self.store.clone(),
                self.path.clone(),
                r,
                self.seen.clone(),
                self.size,
                self.url.clone(),
            );
            async move { f.await.map(|b| (start, Bytes::from(b))) }
        });
        let all = futures_util::stream::iter(fetches)
            .buffer_unordered(8)
            .try_collect::<Vec<_>>();
        self.shared.client.rt().block_on(all).map_err(|f| f.error())
    }

    /// The first error a fetch of this source met, if any.
    pub(crate) fn check(&self) -> Result<()> {
        match &self.shared.lock().failed {
            Some(f) => Err(f.error()),
            None => Ok(()),
        }
    }

    fn chunks(&self) -> u64 {
        self.size.div_ceil(CHUNK)
    }

    fn spawn(&self, k: u64) {
        let start = k * CHUNK;
        let range = start..(start + CHUNK).min(self.size);
        let buf = self.shared.pool.take();
        let fut = fetch_into(
            buf,
            self.store.clone(),
            self.path.clone(),
            range,
            self.seen.clone(),
            self.size,
            self.url.clone(),
        );
        let shared = self.shared.clone();
        let key = (self.id, k);
        self.shared.client.rt().spawn(async move {
            let r = fut.await;
            let mut g = shared.lock();
            match r {
                Ok(buf) => {
                    let data = Arc::new(Chunk {
                        buf,
                        pool: shared.pool.clone(),
                        keep: shared.capacity.load(Ordering::Relaxed),
                    });
                    g.tick += 1;
                    let used = g.tick;
                    g.slots.insert(
                        key,
                        Slot::Ready {
                            data,
                            used,
                            passed: false,
                        },
                    );
                }
                Err(f) => {
                    g.slots.remove(&key);
                    g.failed.get_or_insert(f);
                }
            }
            drop(g);
            shared.ready.notify_all();
        });
    }

    /// Frees a slot for a new chunk, evicting a fetched chunk outside `keep` (this
    /// file's chunks being read): one a reader has moved past before one fetched ahead
    /// and not read yet, the least recently used first; false when there is none.
    fn make_room(&self, g: &mut Cache, keep: &Range<u64>) -> bool {
        let capacity = self.shared.capacity.load(Ordering::Relaxed);
        while g.slots.len() >= capacity {
            let victim = g
                .slots
                .iter()
                .filter_map(|(key, s)| match s {
                    Slot::Ready { used, passed, .. }
                        if !(key.0 == self.id && keep.contains(&key.1)) =>
                    {
                        Some((!*passed, *used, *key))
                    }
                    _ => None,
                })
                .min()
                .map(|(_, used, key)| (used, key));
            match victim {
                Some((_, key)) => {
                    g.slots.remove(&key);
                }
                None => return false,
            }
        }
        true
    }

    /// Fills `out` with the bytes at `at`, from the cache, fetching what is missing and
    /// starting the chunks after it.
    ///
    /// # Errors
    ///
    /// `Remote` after the retries, `SourceChanged`, `Cancelled`.
    pub(crate) fn read_into(&self, at: u64, out: &mut [u8]) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let end = at + out.len() as u64;
        let need = at / CHUNK..(end - 1) / CHUNK + 1;
        let mut g = self.shared.lock();
        // The chunks read, then the ones ahead while there is room.
        let ahead = self.shared.ahead.load(Ordering::Relaxed);
        let last = (need.end + ahead).min(self.chunks());
        for k in need.start..last {
            if g.slots.contains_key(&(self.id, k)) {
                continue;
            }
            let room = self.make_room(&mut g, &need);
            if !room && !need.contains(&k) {
                break;
            }
            g.slots.insert((self.id, k), Slot::Pending);
            self.spawn(k);
        }
        for k in need.clone() {
            let data = loop {
                if let Some(f) = &g.failed {
                    return Err(f.error());
                }
                if self.shared.cancelled() {
                    return Err(Error::Cancelled);
                }
                g.tick += 1;
                let tick = g.tick;
                match g.slots.get_mut(&(self.id, k)) {
                    Some(Slot::Ready { data, used, passed }) => {
                        *used = tick;
                        *passed |= end >= k * CHUNK + data.buf.len() as u64;
                        break data.clone();
                    }
                    Some(Slot::Pending) => {
                        g = self
                            .shared
                            .ready
                            .wait_timeout(g, Duration::from_millis(100))
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                    // Evicted since it was fetched (another reader needed the room).
                    None => {
                        self.make_room(&mut g, &need);
                        g.slots.insert((self.id, k), Slot::Pending);
                        self.spawn(k);
                    }
                }
            };
            drop(g);
            let base = k * CHUNK;
            let from = at.max(base);
            let to = end.min(base + data.buf.len() as u64);
            let src = data
                .buf
                .get((from - base) as usize..(to - base) as usize)
                .ok_or_else(|| Error::internal("a fetched chunk is shorter than its range"))?;
            out[(from - at) as usize..(to - at) as usize].copy_from_slice(src);
            g = self.shared.lock();
        }
        Ok(())
    }
}

/// GETs `range` of `path` into `buf` (a pooled buffer, or a new one: the body's frames
/// are copied into it as they arrive), checking that the file still has `size` and the
/// ETag in `seen` (set by the first response when the listing gave none).
async fn fetch_into(
    mut buf: Vec<u8>,
    store: Arc<dyn ObjectStore>,
    path: StorePath,
    range: Range<u64>,
    seen: Arc<OnceLock<String>>,
    size: u64,
    url: String,
) -> std::result::Result<Vec<u8>, Failure> {
    use futures_util::StreamExt;
    let want = range.end - range.start;
    let res = get(&store, &path, range.clone(), &seen, size, &url).await?;
    buf.reserve_exact((want as usize).saturating_sub(buf.len()));
    let mut body = res.into_stream();
    while let Some(frame) = body.next().await {
        let frame = frame.map_err(|e| failure(&url, e))?;
        let got = (buf.len() + frame.len()) as u64;
        if got > want {
            // More than asked for: refused before it is kept.
            check_len(&url, &range, got, want)?;
        }
        buf.extend_from_slice(&frame);
    }
    check_len(&url, &range, buf.len() as u64, want)?;
    Ok(buf)
}

/// The response to a GET of `range` of `path`, once its size and ETag are checked.
async fn get(
    store: &Arc<dyn ObjectStore>,
    path: &StorePath,
    range: Range<u64>,
    seen: &OnceLock<String>,
    size: u64,
    url: &str,
) -> std::result::Result<object_store::GetResult, Failure> {
    let opts = GetOptions {
        range: Some(GetRange::Bounded(range)),
        ..Default::default()
    };
    let res = store
        .get_opts(path, opts)
        .await
        .map_err(|e| failure(url, e))?;
    if let Some(now) = &res.meta.e_tag {
        let was = seen.get_or_init(|| now.clone());
        if was != now {
            return Err(Failure::Changed(
                url.to_string(),
                format!("its ETag changed from {was} to {now} while it was read"),
            ));
        }
    }
    if res.meta.size != size {
        return Err(Failure::Changed(
            url.to_string(),
            format!(
                "it changed size while it was read ({size} → {} bytes)",
                res.meta.size
            ),
        ));
    }
    Ok(res)
}

/// A body of `got` bytes for `range` (`want` bytes) is whole, or the failure.
fn check_len(
    url: &str,
    range: &Range<u64>,
    got: u64,
    want: u64,
) -> std::result::Result<(), Failure> {
    if got == want {
        return Ok(());
    }
    Err(Failure::Failed(
        url.to_string(),
        format!(
            "asked for bytes {}..{} and received {got}{} bytes",
            range.start,
            range.end,
            if got > want { " or more" } else { "" }
        ),
    ))
}

/// What an `object_store` error means for the user.
fn failure(url: &str, e: object_store::Error) -> Failure {
    match e {
        object_store::Error::Precondition { .. } => Failure::Changed(
            url.to_string(),
            "it changed while it was read (its ETag no longer matches)".into(),
        ),
        other => Failure::Failed(url.to_string(), super::describe(&other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunks_buffer_goes_back_to_the_pool_and_is_reused_up_to_the_capacity() {
        let pool = Arc::new(Pool::default());
        let mut first = pool.take();
        first.extend_from_slice(&[7; 100]);
        let at = first.as_ptr();
        drop(Chunk {
            buf: first,
            pool: pool.clone(),
            keep: 1,
        });
        let again = pool.take();
        assert_eq!((again.as_ptr(), again.len()), (at, 0));
        // Past the capacity a buffer is freed, not kept.
        let mut two = pool.take();
        two.push(1);
        pool.put(again, 1);
        pool.put(two, 1);
        assert_eq!(pool.0.lock().unwrap().len(), 1);
    }

    #[test]
    fn the_cache_is_a_quarter_of_the_budget_and_at_least_two_chunks_a_reader() {
        // The default budget (2 threads × 2 groups × 32 MiB): 32 MiB, 8 chunks, each
        // reader 2 ahead.
        assert_eq!(capacity(2, 128 << 20), 8);
        assert_eq!(ahead(8, 2), 2);
        // A small budget still gives each reader its chunk, the next, and two spare.
        assert_eq!(capacity(2, 8 << 20), 6);
        assert_eq!(ahead(6, 2), 1);
        assert_eq!(capacity(0, 0), 4);
        // 32 threads with 64 MiB groups: 1 GiB of chunks, 6 ahead each.
        assert_eq!(capacity(32, 32 * 2 * (64 << 20)), 256);
        assert_eq!(ahead(256, 32), 6);
        assert_eq!(capacity(usize::MAX, u64::MAX), usize::MAX);
    }
}
