//! The write stage. A weight file is written in three steps: [`WeightWriter::create`]
//! on a new file of the destination (a temp file beside the target, or an upload);
//! [`WeightWriter::write`] casts and encodes row groups in parallel on a rayon pool and
//! appends them in order; [`WeightWriter::finish`] writes the footer that `format.rs`
//! built, syncs the file and hands it back ([`Pending`]) for the caller to commit with
//! the side files. Where files go is one [`dest::Destination`] (a local directory, an
//! object-store prefix); [`parts`] writes and checks the parts of a parted output.
//!
//! # Memory
//!
//! A producer thread dispatches row groups only while the output bytes in flight stay
//! under a budget (threads × in-flight groups per thread × row-group budget, and always
//! at least one group, plus one group larger than that budget at a time), and the
//! appender releases a group's bytes once it is written.
//! A group holds its value buffer (the cast rows, laid out as the `data` pages) and
//! their compressed pages, which [`pages`] compresses straight from it, so peak memory
//! is about twice that budget plus twice the largest row, never a multiple of the
//! model size. Source pages are released from the mapping once cast. A remote source's
//! range cache is counted in the budget (`WriteOptions::held_bytes`).

pub(crate) mod dest;
mod encode;
mod pages;
pub(crate) mod parts;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufWriter;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use arrow_schema::SchemaRef;
use parquet::arrow::arrow_writer::{ArrowRowGroupWriterFactory, ArrowWriterOptions};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::{ColumnDescPtr, ColumnPath};

use crate::cast::{CastStats, QuantError};
use crate::error::{Error, Result};
use crate::format;
use crate::io::temp::TempPath;
use crate::plan::Plan;
use crate::source::Source;
use encode::{BufferPool, Chunk, Encoded, Encoder};

/// Page compression of the output (`--compression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Codec {
    /// Zstandard (default), at the configured level.
    #[default]
    Zstd,
    /// LZ4 (raw, the Parquet `LZ4_RAW` codec).
    Lz4,
    /// Snappy.
    Snappy,
    /// No compression.
    None,
}

impl std::str::FromStr for Codec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "zstd" => Ok(Codec::Zstd),
            "lz4" => Ok(Codec::Lz4),
            "snappy" => Ok(Codec::Snappy),
            "none" | "uncompressed" => Ok(Codec::None),
            o => Err(format!(
                "unknown compression `{o}` (expected zstd, lz4, snappy or none)"
            )),
        }
    }
}

impl Codec {
    /// The name used on the command line and in metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            Codec::Zstd => "zstd",
            Codec::Lz4 => "lz4",
            Codec::Snappy => "snappy",
            Codec::None => "none",
        }
    }
}

/// What the writer needs besides the plan; every value already validated.
#[derive(Debug, Clone)]
pub(crate) struct WriteOptions {
    /// Page compression, level included.
    pub(crate) compression: Compression,
    /// Worker threads (at least 1).
    pub(crate) threads: usize,
    /// Let finite values overflow to ±inf instead of failing.
    pub(crate) allow_overflow: bool,
    /// Output bytes allowed in flight.
    pub(crate) inflight_bytes: u64,
    /// Input bytes the source holds in memory (a remote source's range cache), counted
    /// against `inflight_bytes` and the ceiling beside a big row.
    pub(crate) held_bytes: u64,
    /// Largest buffer kept for reuse.
    pub(crate) pool_max_bytes: u64,
    /// Buffers kept for reuse.
    pub(crate) pool_keep: usize,
    /// Bytes of capacity kept for reuse, at most.
    pub(crate) pool_total_bytes: u64,
    /// Write the V2 schema (quantized output).
    pub(crate) quantized: bool,
    /// Memory over speed (one row group per thread in flight): the in-flight cap holds
    /// for every group, and groups start in plan order (see [`Budget`], [`start_order`]).
    pub(crate) lean: bool,
    /// Hash the file's bytes with XXH3-128 as they are written (the parts of a parted
    /// output, whose manifest lists them: sha256 on the appender thread made a 7B
    /// conversion 1.28x slower).
    pub(crate) content_hash: bool,
}

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
    file: Out,
    hash: Option<Box<xxhash_rust::xxh3::Xxh3>>,
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

/// What the cast stage saw, per planned tensor.
#[derive(Debug, Clone)]
pub(crate) struct WriteStats {
    /// NaN, inf and overflow counts.
    pub(crate) cast: Vec<CastStats>,
    /// Quantization error (zero for tensors not quantized).
    pub(crate) quant: Vec<QuantError>,
}

/// Progress reports from the writer: source bytes done so far.
pub(crate) trait ProgressSink: Sync {
    /// `done` source bytes of the plan are written.
    fn advanced(&self, done: u64);
}

/// The properties of every weight file. The `data` column's pages are written by
/// [`pages`]; these settings are the ones its bytes match (one row per page, PLAIN, no
/// statistics).
pub(crate) fn writer_properties(compression: Compression) -> WriterProperties {
    let data = ColumnPath::from(format::COL_DATA);
    let name = ColumnPath::from(format::COL_NAME);
    WriterProperties::builder()
        .set_compression(compression)
        .set_dictionary_enabled(false)
        .set_statistics_enabled(EnabledStatistics::Chunk)
        .set_column_statistics_enabled(name, EnabledStatistics::Page)
        .set_column_statistics_enabled(data.clone(), EnabledStatistics::None)
        .set_column_encoding(data.clone(), Encoding::PLAIN)
        // One row per `data` page: the encoder flushes a page only after a value has
        // been added, so a small tensor followed by a large one would share a page and
        // reading the small one would decompress both (4.3 MiB for a 1.5 KiB bias).
        .set_column_data_page_row_count_limit(data, 1)
        .set_created_by(format!("modelconv {}", env!("CARGO_PKG_VERSION")))
        .build()
}

/// The file writer's buffer. Appending a chunk copies it through this buffer into the
/// kernel; a small one is still in the CPU cache when the kernel copies it out, where an
/// 8 MiB one is read back from memory. Measured on the 4.4 GB f32 checkpoint to
/// /dev/shm: 8 MiB 2.22 s (user 2.92, sys 0.83), 256 KiB 2.05 s (user 2.76, sys 0.69),
/// 64 KiB the same as 256 KiB.
const WRITE_BUFFER_BYTES: usize = 256 << 10;

/// The worker threads and the kept chunk buffers of a conversion, one for all the part
/// writers of a parted output: a pool and threads per part let the allocator keep the
/// last part's buffers and the exited threads' heaps beside new ones (+40 to 100 MiB
/// peak on the 7B).
#[derive(Clone)]
pub(crate) struct Share {
    buffers: std::sync::Arc<BufferPool>,
    pool: std::sync::Arc<rayon::ThreadPool>,
}

impl Share {
    /// Threads and an empty buffer pool for `opts`.
    ///
    /// # Errors
    ///
    /// `ThreadPool` when the threads cannot start.
    pub(crate) fn new(opts: &WriteOptions) -> Result<Share> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(opts.threads.max(1))
            .thread_name(|i| format!("modelconv-encode-{i}"))
            .build()
            .map_err(|e| Error::ThreadPool {
                reason: e.to_string(),
            })?;
        Ok(Share {
            buffers: std::sync::Arc::new(BufferPool::new(
                opts.pool_keep,
                opts.pool_max_bytes,
                opts.pool_total_bytes,
            )),
            pool: std::sync::Arc::new(pool),
        })
    }
}

/// A weight file being written: created, then its row groups written, then finished.
pub(crate) struct WeightWriter {
    /// The worker threads and kept buffers, shared by the writers of a parted
    /// output's parts.
    share: Share,
    /// The final path (or URL), for messages.
    target: std::path::PathBuf,
    file: SerializedFileWriter<BufWriter<Hashing>>,
    factory: ArrowRowGroupWriterFactory,
    schema: SchemaRef,
    /// The `data` leaf of the Parquet schema.
    data_descr: ColumnDescPtr,
    opts: WriteOptions,
}

/// A finished weight file, still at its temp path.
pub(crate) struct Written {
    /// The synced temp file or the stored upload, to be committed.
    pub(crate) tmp: Pending,
    /// Bytes of the file.
    pub(crate) file_bytes: u64,
    /// XXH3-128 of the file ([`crate::io::hex128`]), when the options asked for it.
    pub(crate) content_hash: Option<String>,
}

impl WeightWriter {
    /// Step 1: the Parquet writer on `file` (a temp file or an upload, from the
    /// destination's [`dest::Destination::create`]) whose final place is `target`, on
    /// the threads and kept buffers of `share` (one for all the parts of a parted
    /// output).
    ///
    /// # Errors
    ///
    /// `Parquet` naming the target.
    pub(crate) fn create(
        file: Out,
        target: &std::path::Path,
        opts: WriteOptions,
        share: &Share,
    ) -> Result<WeightWriter> {
        let schema = format::schema(opts.quantized);
        let perr = |e| Error::parquet(target, None, e);
        let writer = ArrowWriter::try_new_with_options(
            BufWriter::with_capacity(
                WRITE_BUFFER_BYTES,
                Hashing {
                    file,
                    hash: opts
                        .content_hash
                        .then(|| Box::new(xxhash_rust::xxh3::Xxh3::new())),
                },
            ),
            schema.clone(),
            ArrowWriterOptions::new().with_properties(writer_properties(opts.compression)),
        )
        .map_err(perr)?;
        let (file, factory) = writer.into_serialized_writer().map_err(perr)?;
        let data_descr = file
            .schema_descr()
            .columns()
            .iter()
            .find(|c| c.path().string() == format::COL_DATA)
            .cloned()
            .ok_or_else(|| Error::internal("the schema has no `data` leaf"))?;
        Ok(WeightWriter {
            share: share.clone(),
            target: target.to_path_buf(),
            file,
            factory,
            schema,
            data_descr,
            opts,
        })
    }

    /// Step 2: casts and encodes every row group of `plan` on a pool of worker threads
    /// and appends them in plan order. Returns what the cast saw, per planned tensor.
    ///
    /// # Errors
    ///
    /// The first error of any row group in plan order (`Overflow`, `SourceChanged`,
    /// `Parquet`, ...), `Cancelled` when `cancel` is set, `ThreadPool`.
    pub(crate) fn write(
        &mut self,
        source: &Source,
        plan: &Plan,
        cancel: &AtomicBool,
        progress: &dyn ProgressSink,
    ) -> Result<WriteStats> {
        self.write_groups(source, plan, 0..plan.groups.len(), 0, cancel, progress)
    }

    /// [`WeightWriter::write`] of the row groups `groups` of `plan` only (one part of a
    /// parted output), reporting progress from `done` source bytes on.
    ///
    /// # Errors
    ///
    /// As [`WeightWriter::write`].
    pub(crate) fn write_groups(
        &mut self,
        source: &Source,
        plan: &Plan,
        groups: std::ops::Range<usize>,
        done: u64,
        cancel: &AtomicBool,
        progress: &dyn ProgressSink,
    ) -> Result<WriteStats> {
        let threads = self.opts.threads.max(1);
        let pool = self.share.pool.clone();
        // The chunk buffers of the groups in flight, a cast buffer per thread, a spare.
        let buffers = self.share.buffers.clone();
        let encoder = Encoder {
            source,
            plan,
            factory: &self.factory,
            schema: &self.schema,
            data_descr: self.data_descr.clone(),
            compression: self.opts.compression,
            allow_overflow: self.opts.allow_overflow,
            out_path: &self.target,
            pool: &buffers,
        };
        let budget =
            Budget::new(self.opts.inflight_bytes, self.opts.lean).holding(self.opts.held_bytes);
        let stop = AtomicBool::new(false);
        let halted = || stop.load(Ordering::Relaxed) || cancel.load(Ordering::Relaxed);
        let (tx, rx) = crossbeam_channel::unbounded::<(usize, Result<Encoded>)>();
        let mut appender = Appender::new(
            &mut self.file,
            &self.target,
            plan,
            groups.clone(),
            done,
            progress,
            &buffers,
        );
        std::thread::scope(|ts| {
            // The producer is a plain thread: it blocks on the budget, never a rayon
            // worker.
            let (encoder, budget, halted) = (&encoder, &budget, &halted);
            let (pool, tx) = (&pool, tx);
            ts.spawn(move || {
                let sizes: Vec<u64> = plan.groups[groups.clone()]
                    .iter()
                    .map(|g| g.out_bytes)
                    .collect();
                pool.in_place_scope(|s| {
                    let threads = if budget.lean { 1 } else { threads };
                    for i in start_order(&sizes, budget.cap, budget.held, threads) {
                        let i = groups.start + i;
                        let g = &plan.groups[i];
                        if !budget.acquire(g.out_bytes, halted) {
                            break;
                        }
                        let tx = tx.clone();
                        s.spawn(move |_| {
                            let r = if halted() {
                                Err(Error::Cancelled)
                            } else {
                                encoder.encode(g, i)
                            };
                            let _ = tx.send((i, r));
                        });
                    }
                    drop(tx);
                });
            });
            appender.run(&rx, budget, &stop, cancel);
            stop.store(true, Ordering::Relaxed);
            budget.open();
        });
        appender.finish(cancel)
    }

    /// Step 3: writes `footer` (built by [`format::footer`]) and syncs the file.
    ///
    /// # Errors
    ///
    /// `Parquet` naming the target, `Io` naming the temp file.
    pub(crate) fn finish(mut self, footer: Vec<KeyValue>) -> Result<Written> {
        for kv in footer {
            self.file.append_key_value_metadata(kv);
        }
        let target = self.target;
        let buf = self
            .file
            .into_inner()
            .map_err(|e| Error::parquet(&target, None, e))?;
        let Hashing { file, hash } = buf
            .into_inner()
            .map_err(|e| Error::io("write", &target, e.into_error()))?;
        let (tmp, file_bytes) = match file {
            Out::File(file, tmp) => {
                file.sync_all().map_err(|e| Error::io("sync", &target, e))?;
                let len = file
                    .metadata()
                    .map_err(|e| Error::io("stat", tmp.path(), e))?
                    .len();
                (Pending::File(tmp), len)
            }
            #[cfg(feature = "remote")]
            Out::Object(mut up) => {
                let len = up.finish()?;
                (Pending::Object(up), len)
            }
        };
        Ok(Written {
            tmp,
            file_bytes,
            content_hash: hash.map(|h| crate::io::hex128(h.digest128())),
        })
    }
}

/// Bytes in flight, bounded; waits are on plain threads only, never on rayon workers.
///
/// Groups within the cap share it. The largest group in flight, when it holds more than
/// half the cap (a row larger than the row-group budget: an embedding, a 7B's MLP
/// weights), does not count against it, as long as all their buffers stay under
/// [`ALONGSIDE_BYTES`]; otherwise such a row would run with the other threads idle.
/// A group larger than the cap has a budget of its own, one such group at a time, so
/// the other threads go on with the small groups after it, again as long as both
/// together stay under [`ALONGSIDE_BYTES`]; a bigger row runs alone.
/// In flight at most: the cap plus the largest group, or the largest group alone.
/// Buffers in flight are about twice the bytes (cast and compressed); kept ones, about
/// the cap again. This bounds them beside a big row: 768 MiB, leaving room under 1 GiB.
const ALONGSIDE_BYTES: u64 = 768 << 20;

/// Whether a group holds more than half the budget `cap`: it cannot share it with another
/// of its size (see [`Budget::fits`], [`start_order`]).
fn large(bytes: u64, cap: u64) -> bool {
    bytes > cap / 2
}

/// Whether a group of `big` bytes (more than `cap`) may run beside the small groups
/// sharing `cap`.
fn alongside(big: u64, cap: u64) -> bool {
    big.saturating_mul(2).saturating_add(cap.saturating_mul(3)) <= ALONGSIDE_BYTES
}

/// The order in which row groups are started (they are appended in plan order
/// whatever it is). Plan order, except that a large group (one row of more than half
/// the budget: an embedding, an LM head) that may run beside small ones starts earlier,
/// before about as many bytes of the small groups just ahead of it as the other threads
/// can cast while one thread does it. At the end of a checkpoint such a row would
/// otherwise be cast and compressed by one thread while the others had nothing left to
/// do (on the 4.4 GB Llama-shaped checkpoint the 131 MB `lm_head` is the last group).
/// It is held, encoded, until its turn.
///
/// No deadlock: the appender waits for the earliest group not yet started, so the
/// budget must admit it beside whatever was started out of order. A large group passes
/// only small groups after the previous large one (so at most one group is ever
/// started ahead of a waiting one), and only those the budget admits beside it.
fn start_order(out_bytes: &[u64], cap: u64, held: u64, threads: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..out_bytes.len()).collect();
    if threads < 2 {
        return order;
    }
    // Whether, with only a large group of `h` bytes in flight, the budget admits a
    // group of `u` bytes.
    let budget = Budget::new(cap, false).holding(held);
    let admits = |h: u64, u: u64| {
        let mut alone = Used::default();
        alone.add(h, cap);
        budget.fits(&alone, u)
    };
    // Groups before `floor` (plan order) are never passed; from it on, positions in
    // `order` are still plan order, since every move stays behind the group that moved.
    let mut floor = 0;
    for (i, &bytes) in out_bytes.iter().enumerate() {
        if !large(bytes, cap) {
            continue;
        }
        let from = floor;
        floor = i + 1;
        if !alongside(bytes, cap) {
            continue;
        }
        let others = bytes.saturating_mul(threads as u64 - 1);
        // Move back past small groups while they hold less than the others' share.
        let (mut to, mut before) = (i, 0u64);
        while to > from && before < others && admits(bytes, out_bytes[to - 1]) {
            to -= 1;
            before = before.saturating_add(out_bytes[to]);
        }
        let g = order.remove(i);
        order.insert(to, g);
    }
    order
}

struct Budget {
    used: Mutex<Used>,
    cv: Condvar,
    cap: u64,
    /// No group runs beside the cap (low-memory mode).
    lean: bool,
    /// Input bytes held by the source, taken from the cap the small groups share and
    /// from [`ALONGSIDE_BYTES`] (which groups are large still follows the whole cap).
    held: u64,
}

#[derive(Default)]
struct Used {
    /// The bytes of each small group in flight.
    small_groups: Vec<u64>,
    big: u64,
    /// Set when the write stops: every wait ends.
    open: bool,
}

impl Used {
    /// Bytes of the small groups in flight.
    fn small(&self) -> u64 {
        self.small_groups.iter().sum()
    }

    fn add(&mut self, bytes: u64, cap: u64) {
        if bytes > cap {
            self.big = self.big.saturating_add(bytes);
        } else {
            self.small_groups.push(bytes);
        }
    }

    fn remove(&mut self, bytes: u64, cap: u64) {
        if bytes > cap {
            self.big = self.big.saturating_sub(bytes);
        } else if let Some(i) = self.small_groups.iter().position(|&b| b == bytes) {
            self.small_groups.swap_remove(i);
        }
    }
}

impl Budget {
    fn new(cap: u64, lean: bool) -> Budget {
        Budget {
            used: Mutex::new(Used::default()),
            cv: Condvar::new(),
            cap: cap.max(1),
            lean,
            held: 0,
        }
    }

    /// The budget with `held` input bytes counted in it.
    fn holding(mut self, held: u64) -> Budget {
        self.held = held;
        self
    }

    /// Whether a group of `bytes` may start beside the groups in flight (always when
    /// nothing of its kind is in flight).
    fn fits(&self, u: &Used, bytes: u64) -> bool {
        let cap = self.cap;
        // What the small groups share: the cap less the input held.
        let share = cap.saturating_sub(self.held);
        let small = u.small();
        // All buffers of the groups in flight with this one, and the input held, under
        // ALONGSIDE_BYTES.
        let under = small
            .saturating_add(u.big)
            .saturating_add(bytes)
            .saturating_mul(2)
            .saturating_add(self.held)
            <= ALONGSIDE_BYTES;
        u.open
            || if bytes > cap {
                u.big == 0 && (small == 0 || (alongside(bytes, cap) && under))
            } else {
                // The largest small group, this one included, does not count against
                // the cap when it holds more than half of it: a row larger than the
                // row-group budget runs while the others go on as usual.
                let largest = u.small_groups.iter().copied().fold(bytes, u64::max);
                let free = if large(largest, cap) && !self.lean {
                    largest
                } else {
                    0
                };
                let rest = small.saturating_add(bytes).saturating_sub(free);
                (u.big == 0 || alongside(u.big, cap))
                    && (small == 0
                        || small.saturating_add(bytes) <= share
                        || (rest <= share && under))
            }
    }

    /// Waits until `bytes` fit; false when `halted` says to stop.
    fn acquire(&self, bytes: u64, halted: &dyn Fn() -> bool) -> bool {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        while !self.fits(&used, bytes) {
            if halted() {
                return false;
            }
            used = self
                .cv
                .wait_timeout(used, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        used.add(bytes, self.cap);
        !halted()
    }

    fn release(&self, bytes: u64) {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        used.remove(bytes, self.cap);
        self.cv.notify_all();
    }

    /// Ends every wait: the write is stopping.
    fn open(&self) {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        used.open = true;
        self.cv.notify_all();
    }
}

/// Receives encoded row groups in any order and appends them in plan order, keeping
/// the first error in plan order (a real error beats a cancellation it caused).
struct Appender<'a> {
    file: &'a mut SerializedFileWriter<BufWriter<Hashing>>,
    target: &'a std::path::Path,
    plan: &'a Plan,
    progress: &'a dyn ProgressSink,
    /// Where appended chunks' buffers go back.
    pool: &'a BufferPool,
    pending: BTreeMap<usize, Result<Encoded>>,
    next: usize,
    /// One past the last group to append.
    end: usize,
    done_bytes: u64,
    stats: Vec<CastStats>,
    quant: Vec<QuantError>,
    error: Option<Error>,
}

impl<'a> Appender<'a> {
    fn new(
        file: &'a mut SerializedFileWriter<BufWriter<Hashing>>,
        target: &'a std::path::Path,
        plan: &'a Plan,
        groups: std::ops::Range<usize>,
        done: u64,
        progress: &'a dyn ProgressSink,
        pool: &'a BufferPool,
    ) -> Self {
        Appender {
            file,
            target,
            plan,
            progress,
            pool,
            pending: BTreeMap::new(),
            next: groups.start,
            end: groups.end,
            done_bytes: done,
            stats: vec![CastStats::default(); plan.tensors.len()],
            quant: vec![QuantError::default(); plan.tensors.len()],
            error: None,
        }
    }

    /// Keeps `e` unless an error is already kept; a real error replaces a cancellation.
    fn keep_error(&mut self, e: Error) {
        let better = match &self.error {
            None => true,
            Some(Error::Cancelled) => !matches!(e, Error::Cancelled),
            Some(_) => false,
        };
        if better {
            self.error = Some(e);
        }
    }

    /// Appends every group as it becomes the next in order, until all are written or
    /// something stops the write; then drains what is still in flight.
    fn run(
        &mut self,
        rx: &crossbeam_channel::Receiver<(usize, Result<Encoded>)>,
        budget: &Budget,
        stop: &AtomicBool,
        cancel: &AtomicBool,
    ) {
        while self.next < self.end {
            let msg = match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(m) => Some(m),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            };
            if cancel.load(Ordering::Relaxed) {
                self.keep_error(Error::Cancelled);
            }
            if let Some((i, r)) = msg {
                self.pending.insert(i, r);
                while let Some(r) = self.pending.remove(&self.next) {
                    self.append(r);
                    budget.release(self.plan.groups[self.next].out_bytes);
                    self.next += 1;
                }
            }
            if self.error.is_some() {
                stop.store(true, Ordering::Relaxed);
                budget.open();
                // Drain so the producer can finish, keeping the first real error.
                for (_, r) in rx.iter() {
                    if let Err(e) = r {
                        self.keep_error(e);
                    }
                }
                return;
            }
        }
    }

    fn append(&mut self, r: Result<Encoded>) {
        let enc = match r {
            Ok(enc) if self.error.is_none() => enc,
            Ok(_) => return,
            Err(e) => return self.keep_error(e),
        };
        let appended = (|| {
            let mut rg = self.file.next_row_group()?;
            for c in enc.chunks {
                match c {
                    Chunk::Parquet(c) => c.append_to_row_group(&mut rg)?,
                    Chunk::Data(d) => {
                        rg.append_column(&d.pages, d.close)?;
                        if let Some(b) = d.pages.into_buffer() {
                            self.pool.give(b);
                        }
                    }
                }
            }
            rg.close().map(|_| ())
        })();
        if let Err(e) = appended {
            return self.keep_error(Error::parquet(self.target, None, e));
        }
        for (t, s) in enc.stats {
            self.stats[t].merge(&s);
        }
        for (t, e) in enc.quant {
            self.quant[t].merge(&e);
        }
        self.done_bytes += self.plan.groups[self.next].src_bytes;
        self.progress.advanced(self.done_bytes);
    }

    fn finish(self, cancel: &AtomicBool) -> Result<WriteStats> {
        match self.error {
            Some(e) => Err(e),
            None if cancel.load(Ordering::Relaxed) => Err(Error::Cancelled),
            None if self.next < self.end => Err(Error::internal(format!(
                "the encoders stopped at row group {} of {}",
                self.next, self.end
            ))),
            None => Ok(WriteStats {
                cast: self.stats,
                quant: self.quant,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{alongside, large, start_order, Budget, Used, ALONGSIDE_BYTES};

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_big_last_group_starts_before_as_many_bytes_of_small_groups_as_the_other_threads_take() {
        // The 4.4 GB Llama's layout: a 125 MiB embedding, 32 MiB groups, a 125 MiB LM
        // head; cap 128 MiB.
        let mut sizes = vec![125 * MIB];
        sizes.extend(std::iter::repeat_n(32 * MIB, 10));
        sizes.push(125 * MIB);
        let order = start_order(&sizes, 128 * MIB, 0, 2);
        // The head passes four 32 MiB groups (128 MiB >= 125 MiB); the embedding,
        // already first, stays.
        assert_eq!(order, [0, 1, 2, 3, 4, 5, 6, 11, 7, 8, 9, 10]);
        // Three threads: the other two take twice its bytes, eight groups.
        let order = start_order(&sizes, 128 * MIB, 0, 3);
        assert_eq!(order, [0, 1, 2, 11, 3, 4, 5, 6, 7, 8, 9, 10]);
        // A group of at most half the cap is not moved.
        assert_eq!(
            start_order(&[MIB, MIB, 64 * MIB], 128 * MIB, 0, 2),
            [0, 1, 2]
        );
        // One thread: plan order.
        assert_eq!(
            start_order(&sizes, 128 * MIB, 0, 1),
            (0..12).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_big_group_never_passes_another_big_one_nor_one_that_must_run_alone() {
        // The second big group stops behind the first.
        let sizes = [32 * MIB, 200 * MIB, 32 * MIB, 150 * MIB];
        assert_eq!(start_order(&sizes, 128 * MIB, 0, 2), [0, 1, 3, 2]);
        // A 262 MB row (the 7B's LM head) with a 128 MiB cap runs alone: not moved.
        let big = 262 * 1_000_000;
        assert!(!alongside(big, 128 * MIB));
        let sizes = [32 * MIB, 32 * MIB, 32 * MIB, big];
        assert_eq!(start_order(&sizes, 128 * MIB, 0, 2), [0, 1, 2, 3]);
        // Right at the limit it still runs beside them.
        assert!(alongside((ALONGSIDE_BYTES - 3 * 128 * MIB) / 2, 128 * MIB));
        // Small groups only: plan order.
        assert_eq!(start_order(&[MIB; 5], 128 * MIB, 0, 2), [0, 1, 2, 3, 4]);
    }

    /// Runs the producer and the appender against a budget: the producer starts groups
    /// in `order` as soon as they fit (the fullest budget, the worst case), every group
    /// finishes at once, the appender appends in plan order. False on a deadlock: the
    /// next group cannot start and the next to append has not started.
    fn completes(out_bytes: &[u64], cap: u64, held: u64, lean: bool, order: &[usize]) -> bool {
        let b = Budget::new(cap, lean).holding(held);
        let mut u = Used::default();
        let (mut started, mut next_start, mut next_append) = (vec![false; out_bytes.len()], 0, 0);
        while next_append < out_bytes.len() {
            if next_start < order.len() && b.fits(&u, out_bytes[order[next_start]]) {
                let g = order[next_start];
                u.add(out_bytes[g], cap);
                started[g] = true;
                next_start += 1;
            } else if started[next_append] {
                u.remove(out_bytes[next_append], cap);
                next_append += 1;
            } else {
                return false;
            }
        }
        true
    }

    #[test]
    fn the_start_order_never_deadlocks_the_budget() {
        // The 7B's layers: q, k, v, o (32 MiB), gate, up, down (86 MiB, large but not
        // big), two norms, between 262 MB embedding and head rows that run alone.
        let mut seven_b = vec![262 * 1_000_000];
        for _ in 0..32 {
            seven_b.extend([32 * MIB, 32 * MIB, 32 * MIB, 32 * MIB]);
            seven_b.extend([86 * MIB, 86 * MIB, 86 * MIB, 8192, 8192]);
        }
        seven_b.push(262 * 1_000_000);
        let mut llama22 = vec![125 * MIB];
        llama22.extend(std::iter::repeat_n(32 * MIB, 66));
        llama22.push(125 * MIB);
        let mut layouts = vec![seven_b, llama22];
        // Random layouts: sizes around the cap, from 1 byte to 3 caps.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..400 {
            let n = 2 + (x % 40) as usize;
            layouts.push(
                (0..n)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        1 + x % (3 * 128 * MIB)
                    })
                    .collect(),
            );
        }
        for sizes in &layouts {
            for cap in [8 * MIB, 32 * MIB, 128 * MIB, 300 * MIB, 1 << 30] {
                // Input held by the source: none, a quarter of the cap (a remote
                // source's range cache), all of it and more.
                for held in [0, cap / 4, cap, 2 * cap] {
                    for threads in [1, 2, 3, 8] {
                        let order = start_order(sizes, cap, held, threads);
                        let mut sorted = order.clone();
                        sorted.sort_unstable();
                        assert_eq!(sorted, (0..sizes.len()).collect::<Vec<_>>());
                        assert!(
                            completes(sizes, cap, held, false, &order),
                            "deadlock: cap {cap}, held {held}, {threads} threads, sizes {sizes:?}, order {order:?}"
                        );
                    }
                    // Low-memory mode: plan order, the cap for every group.
                    let order = start_order(sizes, cap, held, 1);
                    assert!(completes(sizes, cap, held, true, &order));
                }
            }
        }
        // The check itself finds a deadlock: a 7B layer's three MLP rows moved ahead of
        // its attention rows (an earlier order did this, and hung).
        let (g, mlp) = (32 * MIB, 86 * MIB);
        let sizes = [g, g, g, g, mlp, mlp, mlp];
        assert!(!completes(
            &sizes,
            128 * MIB,
            0,
            false,
            &[0, 4, 5, 6, 1, 2, 3]
        ));
    }

    /// Small groups of `small` bytes and big ones of `big` bytes in flight.
    fn used(small: &[u64], big: &[u64]) -> Used {
        let mut u = Used::default();
        for &b in small {
            u.add(b, 128 * MIB);
        }
        for &b in big {
            u.add(b, 128 * MIB);
        }
        u
    }

    #[test]
    fn a_row_larger_than_the_row_group_budget_starts_beside_others_while_memory_allows() {
        let b = Budget::new(128 * MIB, false);
        let g = 32 * MIB;
        // Within the cap: always.
        assert!(b.fits(&used(&[g, g, g], &[]), g));
        assert!(!b.fits(&used(&[g, g, g, g], &[]), g));
        // The 125 MiB embedding in flight does not count against the cap: the other
        // threads go on with four 32 MiB groups beside it, not a fifth.
        let emb = 125 * MIB;
        assert!(b.fits(&used(&[emb], &[]), g));
        assert!(b.fits(&used(&[emb, g, g, g], &[]), g));
        assert!(!b.fits(&used(&[emb, g, g, g, g], &[]), g));
        // Nor when it comes second.
        assert!(b.fits(&used(&[g, g, g], &[]), emb));
        // A 7B's MLP rows (86 MiB): two, and one beside them, not a third.
        let mlp = 86 * MIB;
        assert!(b.fits(&used(&[mlp], &[]), mlp));
        assert!(b.fits(&used(&[mlp, mlp], &[]), g));
        assert!(!b.fits(&used(&[mlp, mlp], &[]), mlp));
        // Not when all buffers would pass 768 MiB: two 125 MiB rows and a third group.
        assert!(b.fits(&used(&[emb], &[]), emb));
        assert!(!b.fits(&used(&[emb, emb], &[]), 100 * MIB));
        // Nothing in flight: anything starts.
        assert!(b.fits(&used(&[], &[]), 1 << 40));
        // Beside a big row (over the cap) that may run alongside: small groups as usual,
        // while all buffers stay under 768 MiB.
        assert!(b.fits(&used(&[g, g, g], &[180 * MIB]), g));
        assert!(!b.fits(&used(&[100 * MIB, g], &[180 * MIB]), 100 * MIB));
        // A big row that must run alone: small groups wait for it.
        assert!(!b.fits(&used(&[], &[200 * MIB]), g));
        // A big row beside small ones only when both fit; one big at a time.
        assert!(b.fits(&used(&[g, g], &[]), 150 * MIB));
        assert!(!b.fits(&used(&[g, g], &[150 * MIB]), 150 * MIB));
        assert!(!b.fits(&used(&[g, g], &[]), 262 * 1_000_000));
        assert!(b.fits(&used(&[], &[]), 262 * 1_000_000));
        // Low-memory mode: the cap holds for every group.
        let lean = Budget::new(128 * MIB, true);
        assert!(!lean.fits(&used(&[emb], &[]), g));
        assert!(lean.fits(&used(&[g, g, g], &[]), g));
        assert!(!lean.fits(&used(&[mlp], &[]), mlp));
    }

    #[test]
    fn input_held_by_the_source_is_taken_from_the_budget_not_from_what_is_large() {
        // A remote source's 32 MiB range cache in a 128 MiB budget: three 32 MiB groups
        // in flight, not four.
        let b = Budget::new(128 * MIB, false).holding(32 * MIB);
        let g = 32 * MIB;
        assert!(b.fits(&used(&[g, g], &[]), g));
        assert!(!b.fits(&used(&[g, g, g], &[]), g));
        // A 32 MiB group is still small (half the whole cap at most): two of them do
        // not run as large rows beside each other.
        assert!(!large(g, b.cap));
        // The 125 MiB embedding still runs beside the small groups, two of them now.
        let emb = 125 * MIB;
        assert!(b.fits(&used(&[emb, g], &[]), g));
        assert!(!b.fits(&used(&[emb, g, g, g], &[]), g));
        // The held bytes count under the 768 MiB ceiling beside a large row: with a
        // 384 MiB cap, a 250 MiB row and a 50 MiB group in flight, another 50 MiB group
        // passes what the small groups share (350 MiB) and may start only while all
        // buffers, 2 × 350 MiB, and the held bytes stay under 768 MiB: 40 MiB held
        // leaves room, 96 MiB does not.
        let mut u = Used::default();
        u.add(250 * MIB, 384 * MIB);
        u.add(50 * MIB, 384 * MIB);
        assert!(Budget::new(384 * MIB, false)
            .holding(40 * MIB)
            .fits(&u, 50 * MIB));
        assert!(!Budget::new(384 * MIB, false)
            .holding(96 * MIB)
            .fits(&u, 50 * MIB));
        // Beside a big row (over the cap) small groups share what is left.
        let held = Budget::new(128 * MIB, false).holding(64 * MIB);
        assert!(held.fits(&used(&[g], &[180 * MIB]), g));
        assert!(!held.fits(&used(&[g, g], &[180 * MIB]), g));
        // Nothing in flight: anything starts, whatever is held.
        assert!(Budget::new(128 * MIB, false)
            .holding(1 << 40)
            .fits(&used(&[], &[]), g));
    }
}
