//! bitsandbytes: 4-bit NF4 and FP4 blocks and LLM.int8 rows, in the order of
//! bitsandbytes' own f32 arithmetic (`dequantize_4bit`, `int8_vectorwise_dequant`):
//!
//! - 4-bit: element `i` of the flattened tensor is nibble `i` of the packed bytes, the
//!   HIGH nibble of each byte first, and its value `fl(LUT[nibble] × absmax[i / B])`;
//!   a double-quantized absmax is `fl(fl(map[code[j]] × nested_absmax[j / 256]) +
//!   offset)` first (the map is the checkpoint's stored `nested_quant_map`).
//! - LLM.int8: `fl(fl(f32(q) × SCB[row]) × c)` with `c` = f32 `0x3C010204` (1/127),
//!   left to right as `A * stats.view(-1, 1) * 7.874015718698502e-3`.
//!
//! The LUTs are bitsandbytes' (`get_4bit_type`, and its CUDA and CPU literals), as f32
//! bit patterns. FP4 is bitsandbytes' own table, not OCP E2M1; its code 8 is +0.0 as in
//! `get_4bit_type` and the CPU build (CUDA gives −0.0). The description is
//! `source/scheme/bitsandbytes.rs`'s [`Bnb`].

use super::half::{int8_row, Codes, Half, Nibbles};
use super::{Bufs, Decode, Reader, Release};
use crate::cast::CastStats;
use crate::error::Result;
use crate::source::scheme::{Bnb, Bnb4, BnbInt8};

/// NF4 (`get_4bit_type("nf4")`), as f32 bits.
const NF4: [u32; 16] = [
    0xbf80_0000,
    0xbf32_39b1,
    0xbf06_6b30,
    0xbeca_32a0,
    0xbe91_a24d,
    0xbe3d_353f,
    0xbdba_7871,
    0x0000_0000,
    0x3da2_faff,
    0x3e24_cae3,
    0x3e7c_04dd,
    0x3ead_033a,
    0x3ee1_a4b8,
    0x3f10_07ab,
    0x3f39_13b3,
    0x3f80_0000,
];

/// FP4 (`get_4bit_type("fp4")`: `fl(k / 12)` for k = 0, 0.0625, 8, 12, 4, 6, 2, 3, the
/// sign in bit 3, code 8 +0.0), as f32 bits.
const FP4: [u32; 16] = [
    0x0000_0000,
    0x3baa_aaab,
    0x3f2a_aaab,
    0x3f80_0000,
    0x3eaa_aaab,
    0x3f00_0000,
    0x3e2a_aaab,
    0x3e80_0000,
    0x0000_0000,
    0xbbaa_aaab,
    0xbf2a_aaab,
    0xbf80_0000,
    0xbeaa_aaab,
    0xbf00_0000,
    0xbe2a_aaab,
    0xbe80_0000,
];

/// `int8_vectorwise_dequant`'s constant `7.874015718698502e-3` as f32.
const INT8_C: u32 = 0x3c01_0204;

/// The table of `fp4` (else NF4) as f32.
fn lut(fp4: bool) -> [f32; 16] {
    (if fp4 { FP4 } else { NF4 }).map(f32::from_bits)
}

impl Decode for Bnb {
    /// Never carried: NF4 and FP4 levels are a table no integer grid holds exactly,
    /// and LLM.int8's value is two products, `fl(fl(q × SCB) × c)`, where V2 has one.
    fn carry(&self, _r: &Reader) -> std::result::Result<crate::plan::Carry, String> {
        Err(match self {
            Bnb::Four(b) if b.fp4 => "bitsandbytes FP4 codes (a table, not an integer grid)",
            Bnb::Four(_) => "bitsandbytes NF4 codes (a table, not an integer grid)",
            Bnb::Int8(_) => "LLM.int8 codes (two products, q × SCB × 1/127)",
        }
        .into())
    }

    fn fill(
        &self,
        r: &Reader,
        first: u64,
        count: u64,
        bufs: &mut Bufs,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        out.clear();
        match self {
            Bnb::Four(b) => four(r, b, first, count, bufs, out),
            Bnb::Int8(b) => int8(r, b, first, count, bufs, out),
        }
    }

    /// Into f16 or bf16 directly: 4-bit blocks through a table of the block's 16
    /// values, LLM.int8 rows eight products at a time ([`int8_half`]).
    fn fill_half(
        &self,
        r: &Reader,
        to: Half,
        (first, count): (u64, u64),
        bufs: &mut Bufs,
        dst: &mut [u8],
    ) -> Result<Option<CastStats>> {
        match self {
            Bnb::Four(b) => four_half(r, b, to, (first, count), bufs, dst),
            Bnb::Int8(b) => int8_half(r, b, to, (first, count), bufs, dst),
        }
        .map(Some)
    }

    /// The codes of the piece; the scales whole with the last piece.
    unsafe fn release(&self, p: &Release) {
        // SAFETY: forwarded to the caller.
        unsafe {
            match self {
                Bnb::Four(b) => {
                    p.bytes(b.packed, p.first / 2, p.end / 2 - p.first / 2);
                    if p.last {
                        p.whole(b.absmax);
                        if let Some(n) = &b.nested {
                            p.whole(n.absmax);
                            p.whole(n.map);
                        }
                    }
                }
                Bnb::Int8(b) => {
                    p.bytes(b.weight, p.first, p.end - p.first);
                    if p.last {
                        p.whole(b.scb);
                    }
                }
            }
        }
    }
}

/// What the 4-bit piece `[first, end)` reads: the absmax of each of its blocks (a
/// double-quantized one decoded first), from block `first / blocksize` on, and its
/// packed bytes from byte `first / 2` on.
fn four_piece<'a: 'b, 'b>(
    r: &Reader<'a>,
    b: &Bnb4,
    first: u64,
    end: u64,
    bufs: &'b mut Bufs,
) -> Result<(Vec<f32>, &'b [u8])> {
    let [qb, sb, zb, _] = bufs;
    let bs = b.blocksize;
    let (b0, b1) = (first / bs, (end - 1) / bs + 1);
    let mut absmax = Vec::new();
    match &b.nested {
        None => r.scales(b.absmax, b0, b1 - b0, sb, &mut absmax)?,
        Some(n) => {
            let codes = r.bytes(b.absmax, b0, b1 - b0, zb)?.to_vec();
            let mut map = Vec::new();
            r.scales(n.map, 0, 256, sb, &mut map)?;
            let (n0, n1) = (b0 / n.blocksize, (b1 - 1) / n.blocksize + 1);
            let mut nested = Vec::new();
            r.scales(n.absmax, n0, n1 - n0, sb, &mut nested)?;
            absmax.extend(codes.iter().zip(b0..).map(|(&c, j)| {
                let s = nested[(j / n.blocksize - n0) as usize];
                map[c as usize] * s + n.offset
            }));
            if let Some(k) = absmax.iter().position(|v| !v.is_finite()) {
                return Err(r.error(
                    n.absmax,
                    format!(
                        "the double-quantized absmax of block {} is {}; no weight is dequantized from a NaN or infinite scale",
                        b0 + k as u64,
                        absmax[k]
                    ),
                ));
            }
        }
    }
    let (y0, y1) = (first / 2, (end - 1) / 2 + 1);
    let bytes = r.bytes(b.packed, y0, y1 - y0, qb)?;
    Ok((absmax, bytes))
}

/// 4-bit elements `[first, first + count)`: the blocks' absmax, then one product per
/// nibble.
fn four(
    r: &Reader,
    b: &Bnb4,
    first: u64,
    count: u64,
    bufs: &mut Bufs,
    out: &mut Vec<f32>,
) -> Result<()> {
    let end = first + count;
    let bs = b.blocksize;
    let b0 = first / bs;
    let y0 = first / 2;
    let (absmax, bytes) = four_piece(r, b, first, end, bufs)?;
    let lut = lut(b.fp4);
    out.reserve(count as usize);
    let mut i = first;
    while i < end {
        let blk = i / bs;
        // The block's 16 products `fl(LUT[q] × absmax)`: each nibble is one lookup.
        let s = absmax[(blk - b0) as usize];
        let t = lut.map(|v| v * s);
        let stop = end.min((blk + 1) * bs);
        if i % 2 == 1 {
            out.push(t[(bytes[(i / 2 - y0) as usize] & 15) as usize]);
            i += 1;
        }
        // Whole bytes: high nibble, then low.
        let pairs = (stop - i) / 2;
        let at = (i / 2 - y0) as usize;
        for &q in &bytes[at..at + pairs as usize] {
            out.push(t[(q >> 4) as usize]);
            out.push(t[(q & 15) as usize]);
        }
        i += pairs * 2;
        if i < stop {
            out.push(t[(bytes[(i / 2 - y0) as usize] >> 4) as usize]);
            i += 1;
        }
    }
    Ok(())
}

/// [`four`] straight into `to` bits ([`Nibbles`]: each block's 16 values rounded once).
fn four_half(
    r: &Reader,
    b: &Bnb4,
    to: Half,
    (first, count): (u64, u64),
    bufs: &mut Bufs,
    dst: &mut [u8],
) -> Result<CastStats> {
    let (absmax, bytes) = four_piece(r, b, first, first + count, bufs)?;
    let lut = lut(b.fp4);
    let n = Nibbles {
        lut: &lut,
        to,
        high_first: true,
    };
    let c = Codes {
        codes: bytes,
        nib0: first / 2 * 2,
        group: b.blocksize,
        scales: &absmax,
    };
    Ok(n.write(&c, first, count, dst))
}

/// Runs `each(codes, scb)` over the rows of LLM.int8 elements `[first, first +
/// count)`: each row's codes in the range, in order, and its `SCB`.
fn int8_rows(
    r: &Reader,
    b: &BnbInt8,
    (first, count): (u64, u64),
    bufs: &mut Bufs,
    mut each: impl FnMut(&[u8], f32),
) -> Result<()> {
    let [qb, sb, _, _] = bufs;
    let cols = b.cols.max(1);
    let end = first + count;
    let (o0, o1) = (first / cols, (end - 1) / cols + 1);
    let mut scb = Vec::new();
    r.scales(b.scb, o0, o1 - o0, sb, &mut scb)?;
    let q = r.bytes(b.weight, first, count, qb)?;
    let mut at = 0usize;
    for o in o0..o1 {
        let n = (((o + 1) * cols).min(end) - (o * cols).max(first)) as usize;
        each(&q[at..at + n], scb[(o - o0) as usize]);
        at += n;
    }
    Ok(())
}

/// LLM.int8 elements `[first, first + count)`: row `o`'s codes times `SCB[o]`, then
/// times `c`.
fn int8(
    r: &Reader,
    b: &BnbInt8,
    first: u64,
    count: u64,
    bufs: &mut Bufs,
    out: &mut Vec<f32>,
) -> Result<()> {
    let c = f32::from_bits(INT8_C);
    out.reserve(count as usize);
    int8_rows(r, b, (first, count), bufs, |row, s| {
        if row.len() >= 64 {
            // The 256 values `fl(fl(q × s) × c)` once, then a lookup each (the same
            // two products; tests/prequant_bnb.rs has rows of 45 and of 93 values).
            let t: [f32; 256] = std::array::from_fn(|b| (b as u8 as i8 as f32 * s) * c);
            out.extend(row.iter().map(|&b| t[b as usize]));
        } else {
            out.extend(row.iter().map(|&b| (b as i8 as f32 * s) * c));
        }
    })
}

/// [`int8`] straight into `to` bits ([`int8_row`] a row at a time).
fn int8_half(
    r: &Reader,
    b: &BnbInt8,
    to: Half,
    (first, count): (u64, u64),
    bufs: &mut Bufs,
    dst: &mut [u8],
) -> Result<CastStats> {
    let c = f32::from_bits(INT8_C);
    let mut stats = CastStats::default();
    let mut at = 0usize;
    int8_rows(r, b, (first, count), bufs, |row, s| {
        let n = row.len();
        int8_row(row, (s, c), to, &mut dst[2 * at..2 * (at + n)], &mut stats);
        at += n;
    })?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tables against their definitions: NF4's values from bitsandbytes'
    /// `create_normal_map` (printed to 8 digits), FP4's as `k / 12` rounded once.
    #[test]
    fn the_luts_are_bitsandbytes_tables() {
        let nf4 = lut(false);
        let printed = [
            -1.0,
            -0.696_192_8,
            -0.525_073_05,
            -0.394_917_5,
            -0.284_441_38,
            -0.184_773_43,
            -0.091_050_036,
            0.0,
            0.079_580_3,
            0.160_930_2,
            0.246_112_3,
            0.337_915_24,
            0.440_709_83,
            0.562_617,
            0.722_956_84,
            1.0,
        ];
        for (k, (v, p)) in nf4.iter().zip(printed).enumerate() {
            assert!((v - p).abs() < 1e-7, "nf4 {k}: {v} vs {p}");
        }
        assert_eq!(nf4[7].to_bits(), 0);
        let fp4 = lut(true);
        for (j, k) in [0.0f64, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]
            .iter()
            .enumerate()
        {
            assert_eq!(fp4[j].to_bits(), ((k / 12.0) as f32).to_bits(), "fp4 {j}");
            let neg = if j == 0 { 0.0 } else { -fp4[j] };
            assert_eq!(fp4[8 + j].to_bits(), neg.to_bits(), "fp4 {}", 8 + j);
        }
        assert_eq!(f32::from_bits(INT8_C), (1.0f64 / 127.0) as f32);
        assert_eq!(f32::from_bits(INT8_C), 7.874015718698502e-3f64 as f32);
    }
}
