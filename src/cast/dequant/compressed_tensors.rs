//! compressed-tensors `pack-quantized`: rows `[out, ⌈in·bits/32⌉]` of offset-binary
//! codes packed lowest bits first, zero points packed along the output, scales per
//! group (or per `g_idx` entry), dequantized to `[out, in]` a piece of elements at a
//! time. The description is `source/scheme/compressed_tensors.rs`'s [`Packed`].

#[cfg(target_arch = "x86_64")]
use super::bits::int4_row_avx2;
#[cfg(target_arch = "x86_64")]
use super::simd::avx2;
use super::{
    bits::{bits_at, bitstream, nibble_codes, words},
    integer_carry, Bufs, Decode, Reader, Release, Sink,
};
use crate::error::Result;
use crate::plan::Carry;
use crate::source::scheme::Packed;

impl Decode for Packed {
    fn fill(
        &self,
        r: &Reader,
        first: u64,
        count: u64,
        bufs: &mut Bufs,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        out.clear();
        packed(r, self, first, count, bufs, out)
    }

    /// Codes of up to 8 bits in groups that tile the rows (a `g_idx` in input order).
    fn carry(&self, r: &Reader) -> std::result::Result<Carry, String> {
        let groups = (self.groups, self.group);
        integer_carry(r, self.g_idx, groups, self.cols, self.bits)
    }

    fn codes(
        &self,
        r: &Reader,
        first: u64,
        count: u64,
        bufs: &mut Bufs,
        sink: &mut Sink,
    ) -> Result<()> {
        packed_codes(r, self, (first, count), bufs, sink)
    }

    /// The whole rows of the piece and their scales; the scale-like components whole
    /// with the last piece.
    unsafe fn release(&self, p: &Release) {
        let cols = self.cols.max(1);
        let (o0, o1) = (p.first.div_ceil(cols), p.end / cols);
        // SAFETY: forwarded to the caller.
        unsafe {
            if o1 > o0 {
                let (at, len) = (o0 * self.row_words * 4, (o1 - o0) * self.row_words * 4);
                p.bytes(self.packed, at, len);
                // Int4 codes with a BF16 scale per 32 (Kimi-K2's W4A16): the scales are
                // an eighth of the input, released with their rows.
                let es = p.info(self.scale).dtype.size() as u64;
                p.bytes(
                    self.scale,
                    o0 * self.groups * es,
                    (o1 - o0) * self.groups * es,
                );
            }
            if p.last {
                [Some(self.scale), self.zero, self.g_idx]
                    .into_iter()
                    .flatten()
                    .for_each(|r| p.whole(r));
            }
        }
    }
}

/// What rows `[o0, o1)` of a packed weight read ([`rows`]).
struct Rows<'b> {
    /// The rows' words as stored (little-endian bytes), and as words.
    wb: &'b [u8],
    w: Vec<u32>,
    /// The rows' groups' scales, row after row.
    sv: Vec<f32>,
    /// The zero points, whole: packed along the output, column g's bitstream over the
    /// rows.
    zeros: Option<Vec<u32>>,
}

/// Reads rows `[o0, o1)` of `p` with the buffers for its codes, scales and zero points.
fn rows<'a: 'b, 'b>(
    r: &Reader<'a>,
    p: &Packed,
    (o0, o1): (u64, u64),
    [qb, sb, zb]: [&'b mut Vec<u8>; 3],
) -> Result<Rows<'b>> {
    let wb = r.bytes(
        p.packed,
        o0 * p.row_words * 4,
        (o1 - o0) * p.row_words * 4,
        qb,
    )?;
    let w: Vec<u32> = words(wb).collect();
    let mut sv = Vec::new();
    r.scales(p.scale, o0 * p.groups, (o1 - o0) * p.groups, sb, &mut sv)?;
    let zeros = match p.zero {
        Some(z) => Some(words(r.bytes(z, 0, r.info(z).len, zb)?).collect()),
        None => None,
    };
    Ok(Rows { wb, w, sv, zeros })
}

/// The 4-bit offset-binary codes shifted into [−8, 7], as bytes, by code.
pub(super) const INT4_CODES: [u8; 16] = [
    0xf8, 0xf9, 0xfa, 0xfb, 0xfc, 0xfd, 0xfe, 0xff, 0, 1, 2, 3, 4, 5, 6, 7,
];

/// The codes of elements `[first, first + count)` into `sink`, offset-binary codes and
/// zero points shifted by the same offset `2^(bits − 1)`.
fn packed_codes(
    r: &Reader,
    p: &Packed,
    (first, count): (u64, u64),
    bufs: &mut Bufs,
    sink: &mut Sink,
) -> Result<()> {
    let [qb, sb, zb, _] = bufs;
    let cols = p.cols.max(1);
    let (o0, o1) = (first / cols, (first + count).div_ceil(cols));
    let Rows { wb, w, sv, zeros } = rows(r, p, (o0, o1), [qb, sb, zb])?;
    let offset = 1i32 << (p.bits - 1);
    let groups = p.groups as usize;
    for o in o0..o1 {
        let row = &w[((o - o0) * p.row_words) as usize..((o - o0 + 1) * p.row_words) as usize];
        let srow = &sv[((o - o0) * p.groups) as usize..((o - o0 + 1) * p.groups) as usize];
        let i0 = first.max(o * cols) - o * cols;
        let i1 = (first + count).min((o + 1) * cols) - o * cols;
        let rb = &wb[((o - o0) * p.row_words * 4) as usize..];
        let mut i = i0;
        while i < i1 {
            // A run of one group.
            let g = (i / p.group) as usize;
            let ge = ((g as u64 + 1) * p.group).min(i1);
            let z = match &zeros {
                Some(zw) => bits_at(|k| zw.get(k * groups + g).copied().unwrap_or(0), o, p.bits),
                None => offset as u32,
            };
            let n = (ge - i) as usize;
            if let Some(q) = sink.run(n, srow[g], (z as i32 - offset) as f32) {
                if p.bits == 4 {
                    nibble_codes(rb, i as usize, n, &INT4_CODES, q);
                } else {
                    for (k, q) in (i..).zip(q.iter_mut()) {
                        *q = (bitstream(row, k, p.bits) as i32 - offset) as i8 as u8;
                    }
                }
            }
            i = ge;
        }
    }
    Ok(())
}

/// compressed-tensors `pack-quantized`: rows of densely packed offset-binary codes,
/// `(q − z) × s` with the codes' offset cancelling between `q` and `z` (no zero points:
/// `z` is the offset). Whole 4-bit rows in input order take the AVX2 row kernel.
fn packed(
    r: &Reader,
    p: &Packed,
    first: u64,
    count: u64,
    bufs: &mut Bufs,
    out: &mut Vec<f32>,
) -> Result<()> {
    let [qb, sb, zb, gb] = bufs;
    let cols = p.cols.max(1);
    let (o0, o1) = (first / cols, (first + count).div_ceil(cols));
    let Rows { w, sv, zeros, .. } = rows(r, p, (o0, o1), [qb, sb, zb])?;
    let offset = 1u32 << (p.bits - 1);
    let gi = match p.g_idx {
        Some(g) => Some(r.groups(g, p.groups, gb)?),
        None => None,
    };
    let groups = p.groups as usize;
    // The zero code of each group for the row at hand, as an integer and as f32.
    let (mut zi, mut zf) = (vec![offset; groups], vec![offset as f32; groups]);
    #[cfg(target_arch = "x86_64")]
    let whole_rows = gi.is_none()
        && p.bits == 4
        && cols.is_multiple_of(8)
        && p.group.is_multiple_of(8)
        && avx2();
    out.reserve(count as usize);
    for o in o0..o1 {
        let row = &w[((o - o0) * p.row_words) as usize..((o - o0 + 1) * p.row_words) as usize];
        let i0 = if o == o0 { first - o0 * cols } else { 0 };
        let i1 = if o + 1 == o1 {
            first + count - o * cols
        } else {
            cols
        };
        let srow = &sv[((o - o0) * p.groups) as usize..((o - o0 + 1) * p.groups) as usize];
        if let Some(zw) = &zeros {
            // Column g's bitstream: its word k is zw[k · groups + g].
            for (g, (zi, zf)) in zi.iter_mut().zip(zf.iter_mut()).enumerate() {
                let word = |k: usize| zw.get(k * groups + g).copied().unwrap_or(0);
                *zi = bits_at(word, o, p.bits);
                *zf = *zi as f32;
            }
        }
        #[cfg(target_arch = "x86_64")]
        if whole_rows && i0 == 0 && i1 == cols {
            let at = out.len();
            out.resize(at + cols as usize, 0.0);
            // SAFETY: the CPU has AVX2 (checked at run time); the row's words hold its
            // `cols` codes, eight a word.
            unsafe { int4_row_avx2(row, &mut out[at..], srow, &zf, p.group as usize) };
            continue;
        }
        for i in i0..i1 {
            let g = match &gi {
                Some(gi) => gi[i as usize] as usize,
                None => (i / p.group) as usize,
            };
            let q = bitstream(row, i, p.bits) as i32;
            out.push((q - zi[g] as i32) as f32 * srow[g]);
        }
    }
    Ok(())
}
