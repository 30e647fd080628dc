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

mod append;
mod budget;
pub(crate) mod dest;
mod encode;
mod out;
mod pages;
pub(crate) mod parts;

pub(crate) use out::{Hashing, Out, Pending};

use std::io::BufWriter;
use std::sync::atomic::{AtomicBool, Ordering};

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
use append::Appender;
use budget::{start_order, Budget};
use encode::{BufferPool, Encoded, Encoder};

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
