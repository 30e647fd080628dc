//! The appender: encoded row groups arrive in any order and are appended to the file
//! in plan order, their bytes released from the budget as they go.

use std::collections::BTreeMap;
use std::io::BufWriter;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parquet::file::writer::SerializedFileWriter;

use super::budget::Budget;
use super::encode::{BufferPool, Chunk, Encoded};
use super::{Hashing, ProgressSink, WriteStats};
use crate::cast::{CastStats, QuantError};
use crate::error::{Error, Result};
use crate::plan::Plan;

/// Receives encoded row groups in any order and appends them in plan order, keeping
/// the first error in plan order (a real error beats a cancellation it caused).
pub(super) struct Appender<'a> {
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
    pub(super) fn new(
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
    pub(super) fn run(
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

    pub(super) fn finish(self, cancel: &AtomicBool) -> Result<WriteStats> {
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
