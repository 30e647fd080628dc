//! Stage 4, the writer, in three steps: [`WeightWriter::create`] opens a temp file
//! beside the target; [`WeightWriter::write`] casts and encodes row groups in parallel
//! on a rayon pool and appends them in order; [`WeightWriter::finish`] writes the
//! footer that `format.rs` built, syncs the file and hands back the temp path for the
//! caller to rename into place with the side files.
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
//! model size. Source pages are released from the mapping once cast.

pub(crate) mod atomic;
mod encode;
mod pages;

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
use crate::plan::Plan;
use crate::source::Source;
use atomic::TempPath;
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
    /// Largest buffer kept for reuse.
    pub(crate) pool_max_bytes: u64,
    /// Buffers kept for reuse.
    pub(crate) pool_keep: usize,
    /// Write the V2 schema (quantized output).
    pub(crate) quantized: bool,
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

/// A weight file being written: created, then its row groups written, then finished.
pub(crate) struct WeightWriter {
    tmp: TempPath,
    file: SerializedFileWriter<BufWriter<File>>,
    factory: ArrowRowGroupWriterFactory,
    schema: SchemaRef,
    /// The `data` leaf of the Parquet schema.
    data_descr: ColumnDescPtr,
    opts: WriteOptions,
}

/// A finished weight file, still at its temp path.
pub(crate) struct Written {
    /// The synced temp file, to be committed over the target.
    pub(crate) tmp: TempPath,
    /// Bytes of the file.
    pub(crate) file_bytes: u64,
}

impl WeightWriter {
    /// Step 1: creates the temp file beside `target` and the Parquet writer on it.
    ///
    /// # Errors
    ///
    /// `Io` naming the temp file; `Parquet` naming the target.
    pub(crate) fn create(target: &std::path::Path, opts: WriteOptions) -> Result<WeightWriter> {
        let tmp = TempPath::beside(target);
        let file = tmp.create_file()?;
        let schema = format::schema(opts.quantized);
        let perr = |e| Error::parquet(target, None, e);
        let writer = ArrowWriter::try_new_with_options(
            BufWriter::with_capacity(8 << 20, file),
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
            tmp,
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
        let threads = self.opts.threads.max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("modelconv-encode-{i}"))
            .build()
            .map_err(|e| Error::ThreadPool {
                reason: e.to_string(),
            })?;
        // The chunk buffers of the groups in flight, a cast buffer per thread, a spare.
        let buffers = BufferPool::new(self.opts.pool_keep, self.opts.pool_max_bytes);
        let encoder = Encoder {
            source,
            plan,
            factory: &self.factory,
            schema: &self.schema,
            data_descr: self.data_descr.clone(),
            compression: self.opts.compression,
            allow_overflow: self.opts.allow_overflow,
            out_path: self.tmp.target(),
            pool: &buffers,
        };
        let budget = Budget::new(self.opts.inflight_bytes);
        let stop = AtomicBool::new(false);
        let halted = || stop.load(Ordering::Relaxed) || cancel.load(Ordering::Relaxed);
        let (tx, rx) = crossbeam_channel::unbounded::<(usize, Result<Encoded>)>();
        let mut appender =
            Appender::new(&mut self.file, self.tmp.target(), plan, progress, &buffers);
        std::thread::scope(|ts| {
            // The producer is a plain thread: it blocks on the budget, never a rayon
            // worker.
            let (encoder, budget, halted) = (&encoder, &budget, &halted);
            let (pool, tx) = (&pool, tx);
            ts.spawn(move || {
                pool.in_place_scope(|s| {
                    for (i, g) in plan.groups.iter().enumerate() {
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
        let target = self.tmp.target().to_path_buf();
        let buf = self
            .file
            .into_inner()
            .map_err(|e| Error::parquet(&target, None, e))?;
        let file = buf
            .into_inner()
            .map_err(|e| Error::io("write", &target, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io("sync", &target, e))?;
        let file_bytes = file
            .metadata()
            .map_err(|e| Error::io("stat", self.tmp.path(), e))?
            .len();
        Ok(Written {
            tmp: self.tmp,
            file_bytes,
        })
    }
}

/// Bytes in flight, bounded; waits are on plain threads only, never on rayon workers.
///
/// Groups within the cap share it; a group larger than the cap (one big row) has a
/// budget of its own, one such group at a time, so the other threads go on with the
/// small groups after it instead of idling while one thread casts and compresses it,
/// as long as both together stay small ([`ALONGSIDE_BYTES`]); a bigger row runs alone.
/// In flight at most: the cap plus the largest group, or the largest group alone.
/// A big group runs beside small ones while its buffers (about twice its bytes) and
/// theirs (about three times the cap) stay under this: 768 MiB, leaving room under 1 GiB.
const ALONGSIDE_BYTES: u64 = 768 << 20;

struct Budget {
    used: Mutex<Used>,
    cv: Condvar,
    cap: u64,
}

#[derive(Default)]
struct Used {
    small: u64,
    big: u64,
    /// Set when the write stops: every wait ends.
    open: bool,
}

impl Budget {
    fn new(cap: u64) -> Budget {
        Budget {
            used: Mutex::new(Used::default()),
            cv: Condvar::new(),
            cap: cap.max(1),
        }
    }

    /// Waits until `bytes` fit (a group always fits when nothing of its kind is in
    /// flight); false when `halted` says to stop.
    fn acquire(&self, bytes: u64, halted: &dyn Fn() -> bool) -> bool {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let big = bytes > self.cap;
        let alongside = |big: u64| {
            big.saturating_mul(2)
                .saturating_add(self.cap.saturating_mul(3))
                <= ALONGSIDE_BYTES
        };
        let fits = |u: &Used| {
            u.open
                || if big {
                    u.big == 0 && (u.small == 0 || alongside(bytes))
                } else {
                    (u.big == 0 || alongside(u.big))
                        && (u.small == 0 || u.small.saturating_add(bytes) <= self.cap)
                }
        };
        while !fits(&used) {
            if halted() {
                return false;
            }
            used = self
                .cv
                .wait_timeout(used, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if big {
            used.big = used.big.saturating_add(bytes);
        } else {
            used.small = used.small.saturating_add(bytes);
        }
        !halted()
    }

    fn release(&self, bytes: u64) {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        if bytes > self.cap {
            used.big = used.big.saturating_sub(bytes);
        } else {
            used.small = used.small.saturating_sub(bytes);
        }
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
    file: &'a mut SerializedFileWriter<BufWriter<File>>,
    target: &'a std::path::Path,
    plan: &'a Plan,
    progress: &'a dyn ProgressSink,
    /// Where appended chunks' buffers go back.
    pool: &'a BufferPool,
    pending: BTreeMap<usize, Result<Encoded>>,
    next: usize,
    done_bytes: u64,
    stats: Vec<CastStats>,
    quant: Vec<QuantError>,
    error: Option<Error>,
}

impl<'a> Appender<'a> {
    fn new(
        file: &'a mut SerializedFileWriter<BufWriter<File>>,
        target: &'a std::path::Path,
        plan: &'a Plan,
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
            next: 0,
            done_bytes: 0,
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
        while self.next < self.plan.groups.len() {
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
            None if self.next < self.plan.groups.len() => Err(Error::internal(format!(
                "the encoders stopped after {} of {} row groups",
                self.next,
                self.plan.groups.len()
            ))),
            None => Ok(WriteStats {
                cast: self.stats,
                quant: self.quant,
            }),
        }
    }
}
