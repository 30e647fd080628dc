//! Reading a shard's bytes: elements of a tensor (borrowed from the mapping, read with
//! positioned reads, or gathered from a strided view), byte ranges for the
//! dequantizers, small integer tensors, and releasing mapped pages once read.

use std::os::unix::fs::FileExt;

use memmap2::{Advice, Mmap, UncheckedAdvice};

use super::{Data, Shard};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::source::header::TensorInfo;

impl Shard {
    /// Source bytes of elements `[first, first + count)` of tensor `t` (one of this
    /// shard's), in row-major order: borrowed from the mapping for a contiguous tensor,
    /// read with a positioned read in read mode, gathered for a strided view.
    ///
    /// # Errors
    ///
    /// `Io` for a failed read; `Internal` if the range is not inside the tensor (ranges
    /// derived from a validated plan always are).
    ///
    /// Bytes that are not borrowed from the mapping (read mode, strided views) go into
    /// `scratch`, which the caller keeps across calls: its memory is reused, not
    /// allocated and zeroed again for every piece.
    ///
    /// # Memory
    ///
    /// `scratch` grows to the largest request, plus for a strided view in read mode the
    /// storage span the view covers is read into a buffer of its own.
    pub(crate) fn elements<'a>(
        &'a self,
        t: &TensorInfo,
        first: u64,
        count: u64,
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8]> {
        let es = t.dtype.size() as u64;
        let outside = || {
            Error::internal(format!(
                "{}: elements [{first}, {first}+{count}) of tensor `{}` are outside it",
                self.path.display(),
                crate::error::sanitize(&t.name)
            ))
        };
        let inside = first.checked_add(count).is_some_and(|end| end <= t.numel);
        debug_assert!(inside, "elements outside tensor `{}`", t.name);
        if !inside {
            return Err(outside());
        }
        if count == 0 {
            return Ok(&[]);
        }
        match &t.strides {
            None => self
                .range(t.offset + first * es, count * es, scratch)
                .ok_or_else(outside)?,
            Some(strides) => {
                let mut own = Vec::new();
                let span = self
                    .range(t.offset, t.len, &mut own)
                    .ok_or_else(outside)??;
                let view = View {
                    shape: &t.shape,
                    strides,
                    es: es as usize,
                };
                view.gather(span, first, count, scratch)
                    .ok_or_else(outside)?;
                Ok(scratch.as_slice())
            }
        }
    }

    /// `len` bytes at absolute offset `at`, borrowed from the mapping or read into
    /// `scratch`: `None` when outside the file.
    fn range<'a>(
        &'a self,
        at: u64,
        len: u64,
        scratch: &'a mut Vec<u8>,
    ) -> Option<Result<&'a [u8]>> {
        self.range_with(at, len, scratch, true)
    }

    /// [`Shard::range`], populating mapped pages first only with `populate`.
    fn range_with<'a>(
        &'a self,
        at: u64,
        len: u64,
        scratch: &'a mut Vec<u8>,
        populate: bool,
    ) -> Option<Result<&'a [u8]>> {
        let end = at.checked_add(len).filter(|&e| e <= self.file_len)?;
        let (file, map) = match &self.data {
            Data::Local { file, map } => (file, map),
            #[cfg(feature = "remote")]
            Data::Remote(r) => {
                let n = usize::try_from(len).ok()?;
                if scratch.len() < n {
                    scratch.resize(n, 0);
                }
                let buf = &mut scratch[..n];
                return Some(r.read_into(at, buf).map(|()| &*buf));
            }
        };
        match map {
            Some(m) => {
                let slice = m.get(usize::try_from(at).ok()?..usize::try_from(end).ok()?)?;
                if populate {
                    self.prefetch(at, len);
                }
                Some(Ok(slice))
            }
            None => {
                let n = usize::try_from(len).ok()?;
                // Only growth is zero-filled; the bytes are overwritten by the read.
                if scratch.len() < n {
                    scratch.resize(n, 0);
                }
                let buf = &mut scratch[..n];
                Some(
                    file.read_exact_at(buf, at)
                        // A read that fails because the file shrank says so.
                        .map_err(|e| match self.check_unchanged() {
                            Err(changed) => changed,
                            Ok(()) => Error::io("read", &self.path, e),
                        })
                        .map(|()| &*buf),
                )
            }
        }
    }

    /// Bytes `[at, at + len)` of the contiguous tensor `t` (byte offsets inside the
    /// tensor), borrowed from the mapping or read into `scratch`; the way the
    /// dequantizers read codes, scales and indices, sub-byte types included.
    ///
    /// # Errors
    ///
    /// `Io` for a failed read; `Internal` if the range is not inside the tensor.
    pub(crate) fn bytes<'a>(
        &'a self,
        t: &TensorInfo,
        at: u64,
        len: u64,
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8]> {
        self.bytes_with(t, at, len, scratch, true)
    }

    /// [`Shard::bytes`] of a range an earlier piece already read: a mapped range is
    /// borrowed without populating its pages again (the kernels that read a whole
    /// stored tensor for every piece of their output would otherwise walk all its
    /// pages once per piece).
    pub(crate) fn bytes_again<'a>(
        &'a self,
        t: &TensorInfo,
        at: u64,
        len: u64,
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8]> {
        self.bytes_with(t, at, len, scratch, false)
    }

    fn bytes_with<'a>(
        &'a self,
        t: &TensorInfo,
        at: u64,
        len: u64,
        scratch: &'a mut Vec<u8>,
        populate: bool,
    ) -> Result<&'a [u8]> {
        let inside = t.strides.is_none() && at.checked_add(len).is_some_and(|e| e <= t.len);
        if !inside {
            return Err(Error::internal(format!(
                "{}: bytes [{at}, {at}+{len}) of tensor `{}` are outside it",
                self.path.display(),
                crate::error::sanitize(&t.name)
            )));
        }
        if len == 0 {
            return Ok(&[]);
        }
        self.range_with(t.offset + at, len, scratch, populate)
            .ok_or_else(|| {
                Error::internal(format!(
                    "{}: tensor `{}` lies outside the file",
                    self.path.display(),
                    crate::error::sanitize(&t.name)
                ))
            })?
    }

    /// The values of a small integer tensor (`weight_shape`: a few I64 or I32), read
    /// at open time; at most 64 of them.
    ///
    /// # Errors
    ///
    /// `Prequantized` for another dtype, more than 64 values or a negative one; `Io`.
    pub(crate) fn read_ints(&self, t: &TensorInfo) -> Result<Vec<u64>> {
        let bad = |reason: String| Error::Prequantized {
            path: self.path.clone(),
            tensor: Some(t.name.clone()),
            scheme: "compressed-tensors".into(),
            reason,
        };
        if !matches!(t.dtype, Dtype::I64 | Dtype::I32) || t.numel > 64 {
            return Err(bad(format!(
                "expected at most 64 integers (I64 or I32), found {} {:?}",
                t.dtype, t.shape
            )));
        }
        let mut scratch = Vec::new();
        let b = self.bytes(t, 0, t.len, &mut scratch)?;
        let vals = le_ints(t.dtype, b);
        vals.iter()
            .map(|&v| u64::try_from(v).map_err(|_| bad(format!("holds the negative value {v}"))))
            .collect()
    }

    /// [`Shard::release`] by bytes `[at, at + len)` inside the contiguous tensor `t`.
    ///
    /// # Safety
    ///
    /// As [`Shard::release`]: no slice borrowed from the range is read afterwards.
    pub(crate) unsafe fn release_bytes(&self, t: &TensorInfo, at: u64, len: u64) {
        const PAGE: u64 = 4096;
        let Some(m) = self.map() else { return };
        if t.strides.is_some() {
            return;
        }
        let offset = t.offset.saturating_add(at);
        let start = offset.div_ceil(PAGE) * PAGE;
        let end = (offset.saturating_add(len) / PAGE) * PAGE;
        if end > start && end <= m.len() as u64 {
            // SAFETY: the mapping is read-only and file-backed: dropping its pages only
            // makes a later read fault them in again from the file; the caller promises
            // no borrowed slice of the range is read afterwards.
            let _ = unsafe {
                m.unchecked_advise_range(
                    UncheckedAdvice::DontNeed,
                    start as usize,
                    (end - start) as usize,
                )
            };
        }
    }

    /// Whether the shard's data is mapped (else it is read with positioned reads).
    pub(crate) fn is_mapped(&self) -> bool {
        self.map().is_some()
    }

    fn map(&self) -> Option<&Mmap> {
        match &self.data {
            Data::Local { map, .. } => map.as_ref(),
            #[cfg(feature = "remote")]
            Data::Remote(_) => None,
        }
    }

    /// Re-checks that the file still has the length it was validated with.
    ///
    /// # Errors
    ///
    /// `SourceChanged` when it shrank or grew.
    pub(crate) fn check_unchanged(&self) -> Result<()> {
        let file = match &self.data {
            Data::Local { file, .. } => file,
            // Every response is checked as it arrives; this reports the first mismatch.
            #[cfg(feature = "remote")]
            Data::Remote(r) => return r.check(),
        };
        let now = file
            .metadata()
            .map_err(|e| Error::io("stat", &self.path, e))?
            .len();
        if now != self.file_len {
            return Err(Error::size_changed(&self.path, self.file_len, now));
        }
        Ok(())
    }

    /// Maps the pages of `[offset, offset+len)` in one call (`MADV_POPULATE_READ`)
    /// instead of one page fault per 16 pages while casting. Best effort: older kernels
    /// without it just fault as usual.
    fn prefetch(&self, offset: u64, len: u64) {
        const PAGE: u64 = 4096;
        let Some(m) = self.map() else { return };
        let start = offset / PAGE * PAGE;
        let end = offset.saturating_add(len).min(m.len() as u64);
        if end > start {
            let _ = m.advise_range(Advice::PopulateRead, start as usize, (end - start) as usize);
        }
    }

    /// Tells the kernel the mapped pages of elements `[first, first + count)` of the
    /// contiguous tensor `t` are no longer needed, so the mapping does not keep the
    /// whole checkpoint resident. Only whole pages strictly inside the range are
    /// released, so neighbouring tensors are untouched; views and read mode release
    /// nothing.
    ///
    /// # Safety
    ///
    /// No slice borrowed from this range (through [`Shard::elements`]) may be read after
    /// the call. For this read-only, file-backed mapping a later read would fault the
    /// pages back in from the file, so the data seen stays the same; the contract is
    /// kept anyway so that the release is never a surprise to a borrower.
    pub(crate) unsafe fn release(&self, t: &TensorInfo, first: u64, count: u64) {
        let es = t.dtype.size() as u64;
        // SAFETY: forwarded to the caller.
        unsafe { self.release_bytes(t, first.saturating_mul(es), count.saturating_mul(es)) }
    }
}

/// Little-endian I64 elements, or I32 ones for any other dtype, as i64.
pub(crate) fn le_ints(dtype: Dtype, b: &[u8]) -> Vec<i64> {
    match dtype {
        Dtype::I64 => b
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
        _ => b
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
            .collect(),
    }
}

/// A strided view of a tensor's storage.
struct View<'a> {
    /// The view's shape.
    shape: &'a [u64],
    /// Its strides, in elements.
    strides: &'a [u64],
    /// The size of one element, in bytes.
    es: usize,
}

impl View<'_> {
    /// Elements `[first, first + count)` in row-major order of the view over `span`
    /// (which starts at the view's first element), into `out` (cleared first). `None`
    /// when an element falls outside `span` (the view was checked against its storage,
    /// so it does not).
    fn gather(&self, span: &[u8], first: u64, count: u64, out: &mut Vec<u8>) -> Option<()> {
        let View { shape, strides, es } = *self;
        out.clear();
        out.reserve(usize::try_from(count).ok()?.checked_mul(es)?);
        let nd = shape.len();
        let mut idx = vec![0u64; nd];
        let mut rem = first;
        for d in (0..nd).rev() {
            idx[d] = rem % shape[d];
            rem /= shape[d];
        }
        let mut off: u64 = idx.iter().zip(strides).map(|(&i, &s)| i * s).sum();
        for _ in 0..count {
            let at = usize::try_from(off).ok()?.checked_mul(es)?;
            out.extend_from_slice(span.get(at..at.checked_add(es)?)?);
            for d in (0..nd).rev() {
                idx[d] += 1;
                off += strides[d];
                if idx[d] < shape[d] {
                    break;
                }
                off -= strides[d] * shape[d];
                idx[d] = 0;
            }
        }
        Some(())
    }
}
