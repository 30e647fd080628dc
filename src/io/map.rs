//! Mapped reads: a file mapped read-only, for the source's shards and the reader's
//! weight files alike.

use std::fs::File;

use memmap2::Mmap;

/// Maps `file` read-only.
///
/// # Safety
///
/// The mapping is undefined behaviour if another process changes the file while it is
/// mapped, and truncation turns later reads into SIGBUS. This is the documented risk of
/// converting a checkpoint that is being rewritten; the source's `Shard::check_unchanged` re-checks
/// the length before every batch of reads to catch the common case early.
pub(crate) unsafe fn map_file(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: forwarded to the caller, see above.
    unsafe { Mmap::map(file) }
}
