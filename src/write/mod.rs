//! Stage 4, the writer: row groups cast and encoded in parallel on a rayon pool, appended
//! in order by one writer, into a temp file that is synced and renamed into place.
//!
//! # Memory
//!
//! A producer thread dispatches row groups only while the output bytes in flight stay
//! under a budget (`threads × 2 × row-group budget`, and always at least one group), and
//! the writer releases a group's bytes once it is appended. A group holds its Arrow value
//! buffer, the encoder's copy and the compressed pages, so peak memory is a small
//! multiple of that budget and of the largest row, never of the model size. Source
//! pages are released from the mapping once cast.

pub mod atomic;

use std::collections::BTreeMap;
use std::io::BufWriter;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use arrow_array::builder::{Int32Builder, ListBuilder};
use arrow_array::{ArrayRef, BinaryArray, Int64Array, StringArray, UInt64Array};
use arrow_buffer::{MutableBuffer, OffsetBuffer};
use arrow_schema::SchemaRef;
use parquet::arrow::arrow_writer::ArrowWriterOptions;
use parquet::arrow::arrow_writer::{compute_leaves, ArrowColumnChunk, ArrowRowGroupWriterFactory};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use crate::cast::{cast_hashing, CastStats, Xxh3};
use crate::error::{Error, Result};
use crate::format;
use crate::plan::{GroupPlan, Plan};
use crate::source::Source;
use atomic::TempPath;

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

/// What the writer needs besides the plan.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// Page compression.
    pub codec: Codec,
    /// Zstd level.
    pub level: i32,
    /// Worker threads.
    pub threads: usize,
    /// Let finite values overflow to ±inf instead of failing.
    pub allow_overflow: bool,
    /// Output bytes allowed in flight.
    pub inflight_bytes: u64,
    /// Largest value buffer kept for reuse.
    pub pool_max_bytes: u64,
}

/// Progress reports from the writer: source bytes done so far.
pub trait ProgressSink: Sync {
    /// `done` source bytes of the plan are written.
    fn advanced(&self, done: u64);
}

/// What writing produced.
#[derive(Debug, Clone)]
pub struct WriteSummary {
    /// Per planned tensor, what its cast saw.
    pub stats: Vec<CastStats>,
    /// Bytes of the finished file.
    pub file_bytes: u64,
}

fn writer_properties(o: &WriteOptions) -> Result<WriterProperties> {
    let compression = match o.codec {
        Codec::Zstd => Compression::ZSTD(
            ZstdLevel::try_new(o.level)
                .map_err(|e| Error::option(format!("zstd level {}: {e}", o.level)))?,
        ),
        Codec::Lz4 => Compression::LZ4_RAW,
        Codec::Snappy => Compression::SNAPPY,
        Codec::None => Compression::UNCOMPRESSED,
    };
    let data = ColumnPath::from(format::COL_DATA);
    let name = ColumnPath::from(format::COL_NAME);
    Ok(WriterProperties::builder()
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
        .build())
}

/// Bytes in flight, bounded; waits are on plain threads only, never on rayon workers.
struct Budget {
    state: Mutex<u64>,
    cv: Condvar,
    cap: u64,
}

impl Budget {
    fn acquire(&self, bytes: u64, stopped: &dyn Fn() -> bool) -> bool {
        let mut used = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while *used > 0 && *used + bytes > self.cap {
            if stopped() {
                return false;
            }
            used = self
                .cv
                .wait_timeout(used, std::time::Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *used += bytes;
        !stopped()
    }
    fn release(&self, bytes: u64) {
        let mut used = self.state.lock().unwrap_or_else(|p| p.into_inner());
        *used = used.saturating_sub(bytes);
        self.cv.notify_all();
    }
}

struct Encoded {
    chunks: Vec<ArrowColumnChunk>,
    stats: Vec<(usize, CastStats)>,
}

/// Source bytes cast per piece of a row (see `encode_group`).
const PIECE_BYTES: u64 = 16 << 20;

/// Value buffers handed back after encoding, so later row groups reuse memory that is
/// already mapped instead of faulting in (and zeroing) fresh pages for every group.
struct BufferPool {
    free: Mutex<Vec<MutableBuffer>>,
    keep: usize,
    /// Larger buffers (a single big row) are freed, not kept.
    max_bytes: usize,
}

impl BufferPool {
    /// A buffer of exactly `len` bytes; its contents are overwritten by the caller.
    fn take(&self, len: usize) -> MutableBuffer {
        let reused = self.free.lock().ok().and_then(|mut f| {
            // Prefer the smallest buffer that is already large enough.
            let best = f
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= len)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i)
                .or_else(|| (!f.is_empty()).then_some(0))?;
            Some(f.swap_remove(best))
        });
        match reused {
            Some(mut b) => {
                // Growth is zero-filled; shrinking only moves the length.
                b.resize(len, 0);
                b
            }
            None => MutableBuffer::from_len_zeroed(len),
        }
    }

    fn give(&self, b: MutableBuffer) {
        if b.capacity() > self.max_bytes {
            return;
        }
        if let Ok(mut f) = self.free.lock() {
            if f.len() < self.keep {
                f.push(b);
            }
        }
    }
}

/// What every encoding task shares.
struct Ctx<'a> {
    source: &'a Source,
    plan: &'a Plan,
    factory: &'a ArrowRowGroupWriterFactory,
    schema: &'a SchemaRef,
    opts: &'a WriteOptions,
    out_path: &'a Path,
    pool: &'a BufferPool,
}

/// Casts one row group straight into its Arrow value buffer and encodes it.
fn encode_group(ctx: &Ctx, group: &GroupPlan, index: usize) -> Result<Encoded> {
    let Ctx {
        source,
        plan,
        factory,
        schema,
        opts,
        out_path,
        pool,
    } = *ctx;
    let rows = &plan.rows[group.rows.clone()];
    let mut shards: Vec<usize> = rows.iter().map(|r| plan.tensors[r.tensor].shard).collect();
    shards.dedup();
    for s in shards {
        source.shards[s].check_unchanged()?;
    }
    let total =
        usize::try_from(group.out_bytes).map_err(|_| Error::option("row group too large"))?;
    let mut values = pool.take(total);
    let mut lens = Vec::with_capacity(rows.len());
    let mut checksums = Vec::with_capacity(rows.len());
    let mut stats = Vec::new();
    {
        let mut rest = values.as_slice_mut();
        for row in rows {
            let t = &plan.tensors[row.tensor];
            let shard = &source.shards[t.shard];
            let (ss, os) = (t.src.dtype.size() as u64, t.dtype.size() as u64);
            let src_start = t.src.offset + row.elem_start * ss;
            let src = shard.bytes(&t.src, row.elem_start * ss, row.elems * ss)?;
            let n = (row.elems * os) as usize;
            let (dst, tail) = std::mem::take(&mut rest).split_at_mut(n);
            rest = tail;
            // Cast in pieces: map a piece's source pages in one call, cast it, hash it,
            // release its pages, so a large row never has all its source resident.
            let per = (PIECE_BYTES / ss).max(1) as usize;
            let mut hash = Xxh3::new();
            let mut st = CastStats::default();
            let pieces = src
                .chunks(per * ss as usize)
                .zip(dst.chunks_mut(per * os as usize));
            for (k, (s_piece, d_piece)) in pieces.enumerate() {
                let off = src_start + (k * per) as u64 * ss;
                shard.prefetch(off, s_piece.len() as u64);
                let piece = cast_hashing(t.src.dtype, t.dtype, s_piece, d_piece, &mut hash)
                    .ok_or_else(|| Error::Coverage {
                        path: shard.path.clone(),
                        reason: format!(
                            "tensor `{}` byte length does not match its shape",
                            t.src.name
                        ),
                    })?;
                st.merge(&piece);
                shard.release(off, s_piece.len() as u64);
            }
            if st.overflow > 0 && !opts.allow_overflow {
                return Err(Error::Overflow {
                    tensor: t.name.clone(),
                    from: t.src.dtype.to_string(),
                    to: t.dtype.to_string(),
                    count: st.overflow,
                    max_abs: st.max_overflow,
                });
            }
            if st != CastStats::default() {
                stats.push((row.tensor, st));
            }
            checksums.push(hash.digest());
            lens.push(n);
        }
    }
    let names =
        StringArray::from_iter_values(rows.iter().map(|r| plan.tensors[r.tensor].name.as_str()));
    let mut shapes = ListBuilder::new(Int32Builder::new()).with_field(format::shape_item_field());
    for r in rows {
        for &d in &plan.tensors[r.tensor].src.shape {
            // Plan::build checked every dimension fits i32.
            shapes.values().append_value(d as i32);
        }
        shapes.append(true);
    }
    let dtypes = StringArray::from_iter_values(
        rows.iter()
            .map(|r| plan.tensors[r.tensor].dtype.torch_name()),
    );
    let offsets = OffsetBuffer::<i32>::from_lengths(lens);
    let data = Arc::new(
        BinaryArray::try_new(offsets, values.into(), None)
            .map_err(|e| Error::parquet(out_path, None, e))?,
    );
    let params =
        Int64Array::from_iter_values(rows.iter().map(|r| plan.tensors[r.tensor].src.numel as i64));
    let chunk_offsets = Int64Array::from_iter_values(
        rows.iter()
            .map(|r| (r.elem_start * plan.tensors[r.tensor].dtype.size() as u64) as i64),
    );
    let checks = UInt64Array::from(checksums);
    let cols: Vec<ArrayRef> = vec![
        Arc::new(names),
        Arc::new(shapes.finish()),
        Arc::new(dtypes),
        data.clone(),
        Arc::new(params),
        Arc::new(chunk_offsets),
        Arc::new(checks),
    ];
    let first = rows.first().map(|r| plan.tensors[r.tensor].name.as_str());
    let perr = |e: parquet::errors::ParquetError| Error::parquet(out_path, first, e);
    let mut writers = factory.create_column_writers(index).map_err(perr)?;
    let mut w = writers.iter_mut();
    for (field, arr) in schema.fields().iter().zip(&cols) {
        for leaf in compute_leaves(field, arr).map_err(perr)? {
            match w.next() {
                Some(writer) => writer.write(&leaf).map_err(perr)?,
                None => {
                    return Err(Error::parquet(
                        out_path,
                        first,
                        "schema has more leaves than writers",
                    ))
                }
            }
        }
    }
    drop(cols);
    // The encoder has copied the values: hand the buffer back for the next group.
    if let Ok(data) = Arc::try_unwrap(data) {
        let (_, values, _) = data.into_parts();
        if let Ok(buf) = values.into_mutable() {
            pool.give(buf);
        }
    }
    let chunks = writers
        .into_iter()
        .map(|w| w.close())
        .collect::<parquet::errors::Result<Vec<_>>>()
        .map_err(perr)?;
    Ok(Encoded { chunks, stats })
}

/// Writes `plan` to `tmp` and returns the open-file summary; `footer` computes the
/// key-value metadata once every group's cast statistics are known.
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_weights(
    source: &Source,
    plan: &Plan,
    opts: &WriteOptions,
    tmp: &TempPath,
    cancel: &AtomicBool,
    progress: &dyn ProgressSink,
    footer: &dyn Fn(&[CastStats]) -> Vec<KeyValue>,
) -> Result<WriteSummary> {
    let out_path = tmp.target();
    let file = tmp.create_file()?;
    let schema = format::schema();
    let props = writer_properties(opts)?;
    let perr = |e: parquet::errors::ParquetError| Error::parquet(out_path, None, e);
    let writer = ArrowWriter::try_new_with_options(
        BufWriter::with_capacity(8 << 20, file),
        schema.clone(),
        ArrowWriterOptions::new().with_properties(props),
    )
    .map_err(perr)?;
    let (mut fw, factory) = writer.into_serialized_writer().map_err(perr)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.max(1))
        .thread_name(|i| format!("modelconv-encode-{i}"))
        .build()
        .map_err(|e| Error::option(format!("cannot start worker threads: {e}")))?;
    let budget = Budget {
        state: Mutex::new(0),
        cv: Condvar::new(),
        cap: opts.inflight_bytes.max(1),
    };
    let stop = AtomicBool::new(false);
    let stopped = || stop.load(Ordering::Relaxed) || cancel.load(Ordering::Relaxed);
    let (tx, rx) = crossbeam_channel::unbounded::<(usize, Result<Encoded>)>();
    let mut stats = vec![CastStats::default(); plan.tensors.len()];
    let mut first_error: Option<(usize, Error)> = None;

    let buffers = BufferPool {
        free: Mutex::new(Vec::new()),
        keep: opts.threads.max(1) + 1,
        max_bytes: usize::try_from(opts.pool_max_bytes).unwrap_or(usize::MAX),
    };
    let ctx = Ctx {
        source,
        plan,
        factory: &factory,
        schema: &schema,
        opts,
        out_path,
        pool: &buffers,
    };
    std::thread::scope(|ts| {
        let (ctx, budget, stop_ref) = (&ctx, &budget, &stop);
        let pool = &pool;
        ts.spawn(move || {
            pool.in_place_scope(|s| {
                for (i, g) in plan.groups.iter().enumerate() {
                    let halt =
                        || stop_ref.load(Ordering::Relaxed) || cancel.load(Ordering::Relaxed);
                    if !budget.acquire(g.out_bytes, &halt) {
                        break;
                    }
                    let tx = tx.clone();
                    s.spawn(move |_| {
                        let r =
                            if stop_ref.load(Ordering::Relaxed) || cancel.load(Ordering::Relaxed) {
                                Err(Error::Cancelled)
                            } else {
                                encode_group(ctx, g, i)
                            };
                        let _ = tx.send((i, r));
                    });
                }
                drop(tx);
            });
        });

        let mut pending: BTreeMap<usize, Result<Encoded>> = BTreeMap::new();
        let mut next = 0usize;
        let mut done_bytes = 0u64;
        while next < plan.groups.len() {
            let msg = match rx.recv_timeout(std::time::Duration::from_millis(100)) {
                Ok(m) => Some(m),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            };
            if cancel.load(Ordering::Relaxed) && first_error.is_none() {
                first_error = Some((usize::MAX, Error::Cancelled));
                stop.store(true, Ordering::Relaxed);
            }
            let Some((i, r)) = msg else { continue };
            if let Err(e) = &r {
                if !matches!(e, Error::Cancelled) {
                    stop.store(true, Ordering::Relaxed);
                }
            }
            pending.insert(i, r);
            while let Some(r) = pending.remove(&next) {
                let g = &plan.groups[next];
                match r {
                    Ok(enc) if first_error.is_none() => {
                        let appended = (|| {
                            let mut rg = fw.next_row_group()?;
                            for c in enc.chunks {
                                c.append_to_row_group(&mut rg)?;
                            }
                            rg.close().map(|_| ())
                        })();
                        if let Err(e) = appended {
                            first_error = Some((next, perr(e)));
                            stop.store(true, Ordering::Relaxed);
                        }
                        for (t, s) in enc.stats {
                            stats[t].merge(&s);
                        }
                        done_bytes += g.src_bytes;
                        progress.advanced(done_bytes);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let better = match &first_error {
                            None => true,
                            Some((_, Error::Cancelled)) => !matches!(e, Error::Cancelled),
                            Some(_) => false,
                        };
                        if better {
                            first_error = Some((next, e));
                        }
                        stop.store(true, Ordering::Relaxed);
                    }
                }
                budget.release(g.out_bytes);
                next += 1;
            }
            if stopped() && first_error.is_some() {
                // Drain what is in flight so the producer can finish, keeping the
                // first real error.
                for (_, r) in rx.iter() {
                    if let (Err(e), Some((_, Error::Cancelled))) = (&r, &first_error) {
                        if !matches!(e, Error::Cancelled) {
                            first_error = r.err().map(|e| (0, e));
                        }
                    }
                    budget.release(u64::MAX);
                }
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        budget.release(u64::MAX);
    });
    if let Some((_, e)) = first_error {
        return Err(e);
    }
    if cancel.load(Ordering::Relaxed) {
        return Err(Error::Cancelled);
    }
    for kv in footer(&stats) {
        fw.append_key_value_metadata(kv);
    }
    let buf = fw.into_inner().map_err(perr)?;
    let file = buf
        .into_inner()
        .map_err(|e| Error::io("write", tmp.path(), e.into_error()))?;
    file.sync_all()
        .map_err(|e| Error::io("sync", tmp.path(), e))?;
    let file_bytes = file
        .metadata()
        .map_err(|e| Error::io("stat", tmp.path(), e))?
        .len();
    Ok(WriteSummary { stats, file_bytes })
}
