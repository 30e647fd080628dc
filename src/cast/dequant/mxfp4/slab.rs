//! The per-worker slab an MXFP4 piece reads its groups through: some groups of one
//! expert copied so that each group's stored rows are contiguous.

use std::cell::RefCell;

use crate::source::scheme::Mxfp4;
use crate::source::{Source, TensorRef};

/// Stored rows ahead that an MXFP4 slab copy prefetches.
const PREFETCH_AHEAD: usize = 16;

/// Hints the CPU to fetch `bytes[at..at + len]` into the cache (nothing when outside).
#[inline(always)]
fn prefetch(bytes: &[u8], at: u64, len: u64) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let mut a = at as usize;
        let end = (at + len) as usize;
        while a < end {
            if let Some(b) = bytes.get(a) {
                // SAFETY: a prefetch never faults and reads nothing into the program;
                // the pointer is inside `bytes`.
                unsafe { _mm_prefetch::<_MM_HINT_T0>((b as *const u8).cast()) };
            }
            a += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (bytes, at, len);
}

/// Bytes of stored MXFP4 blocks an [`Slab`] holds at most (beyond its first four
/// groups): the groups of one expert regrouped so that each group's rows are
/// contiguous.
const SLAB_BYTES: u64 = 4 << 20;

/// Some groups of one MXFP4 expert, regrouped: blocks `[S, R, 16]` and scales `[S, R]`
/// for groups `[g0, g0 + S)`, copied from the stored `[R, G, 16]` and `[R, G]`.
///
/// A piece's output rows are columns of the stored values: reading them in place
/// touches every stored row's page for each group (1 KiB rows: hundreds of
/// translation misses per group on a 4 KiB-page mapping, and a cache line read four
/// times). Copying a slab of groups touches each page once per slab, and every piece
/// of its groups then reads contiguous bytes.
#[derive(Default)]
pub(super) struct Slab {
    /// (source id, blocks tensor, expert, first group) of what `blocks` holds.
    pub(super) key: Option<(u64, TensorRef, u64, u64)>,
    /// Stored rows of the expert.
    rows: u64,
    blocks: Vec<u8>,
    scales: Vec<u8>,
}

thread_local! {
    /// The slab this worker read last, reused by the pieces of its groups.
    pub(super) static SLAB: RefCell<Slab> = RefCell::new(Slab::default());
}

/// Groups per slab of an expert with `rows` stored rows of `groups` groups: whole
/// 64-byte lines of every row (4 groups), up to [`SLAB_BYTES`].
pub(super) fn slab_groups(rows: u64, groups: u64) -> u64 {
    let fit = SLAB_BYTES / (rows * 16).max(1);
    (fit / 4 * 4).max(4).min(groups)
}

impl Slab {
    /// Copies groups `[g0, g0 + per)` (those that exist) of the expert `span` into the
    /// slab, under `key` (whose last field is `g0`).
    pub(super) fn hold(&mut self, key: (u64, TensorRef, u64, u64), per: u64, span: &Span) {
        let (rows, g, g0) = (span.rows, span.groups, key.3);
        let n = per.min(g - g0);
        let (r, nn, g, g0) = (rows as usize, n as usize, g as usize, g0 as usize);
        self.blocks.resize(r * nn * 16, 0);
        self.scales.resize(r * nn, 0);
        for rr in 0..r {
            let at = (rr * g + g0) * 16;
            // Rows are G·16 bytes apart: the hardware prefetcher stops at each page,
            // so ask for a row some way ahead explicitly.
            prefetch(span.blocks, (at + PREFETCH_AHEAD * g * 16) as u64, n * 16);
            let src = &span.blocks[at..at + nn * 16];
            for (j, b) in src.chunks_exact(16).enumerate() {
                self.blocks[(j * r + rr) * 16..][..16].copy_from_slice(b);
            }
            let sa = rr * g + g0;
            for (j, &s) in span.scales[sa..sa + nn].iter().enumerate() {
                self.scales[j * r + rr] = s;
            }
        }
        self.key = Some(key);
        self.rows = rows;
    }

    /// Group `gg`'s blocks `[R, 16]` and scales `[R]` (it must be held).
    pub(super) fn group(&self, gg: u64) -> (&[u8], &[u8]) {
        let j = (gg - self.key.map_or(0, |k| k.3)) as usize;
        let r = self.rows as usize;
        (
            &self.blocks[j * r * 16..(j + 1) * r * 16],
            &self.scales[j * r..(j + 1) * r],
        )
    }
}

/// One expert's stored blocks `[R, G, 16]` and scales `[R, G]`.
pub(super) struct Span<'a> {
    pub(super) blocks: &'a [u8],
    pub(super) scales: &'a [u8],
    pub(super) groups: u64,
    pub(super) rows: u64,
}

/// Forgets this worker's slab if it holds expert `e` of `m` in `source` (the expert's
/// pages are released: it is not read again, and its memory goes back).
pub(super) fn drop_slab(source: &Source, m: &Mxfp4, e: u64) {
    SLAB.with(|cell| {
        if let Ok(mut s) = cell.try_borrow_mut() {
            if s.key
                .is_some_and(|k| (k.0, k.1, k.2) == (source.id, m.blocks, e))
            {
                *s = Slab::default();
            }
        }
    });
}
