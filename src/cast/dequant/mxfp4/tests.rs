//! Unit tests of the MXFP4 kernels: the AVX2 decodes against the scalar ones, the FP4
//! values and byte tables against the OCP MX table, and experts decoded through slabs
//! against the direct decode.

use half::f16;

#[cfg(target_arch = "x86_64")]
use super::super::simd::avx2;
use super::slab::{Slab, Span};
use super::to_f32::{fp4, group_f32};
#[cfg(target_arch = "x86_64")]
use super::to_f32::{fp4_group, fp4_group_avx2};
use super::to_half::group_half;
#[cfg(target_arch = "x86_64")]
use super::to_half::{half_group, half_group_avx2};
use super::*;
#[cfg(target_arch = "x86_64")]
use crate::cast::dequant::e8m0;
use crate::cast::dequant::half::Half;

/// The FP4 E2M1 values by nibble (transformers' `FP4_VALUES`, the OCP MX table): what
/// [`fp4`] computes, checked by the tests.
const FP4: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

#[test]
#[cfg(target_arch = "x86_64")]
fn fp4_group_avx2_equals_the_scalar_decode() {
    if !avx2() {
        eprintln!("skipped: no AVX2 on this CPU");
        return;
    }
    let scales = [0u8, 1, 100, 127, 130, 200, 254];
    for start in (0..=255u8).step_by(16) {
        let blk: Vec<u8> = (0..16).map(|i| start.wrapping_add(i * 17)).collect();
        for &s in &scales {
            let scale = e8m0(s).unwrap_or(1.0);
            let (mut a, mut b) = ([0f32; 32], [0f32; 32]);
            fp4_group(&blk, scale, &mut a);
            // SAFETY: AVX2 is present (checked above).
            unsafe { fp4_group_avx2(&blk, scale, &mut b) };
            assert_eq!(
                a.map(f32::to_bits),
                b.map(f32::to_bits),
                "bytes {blk:?} scale {s}"
            );
        }
    }
}

/// What a group decode writes, by sink.
#[derive(Clone, Copy, Debug)]
enum Sink {
    F32,
    Half(Half),
}

/// What [`expert_rows`] decoded into a sink.
struct Decoded {
    done: std::result::Result<(), Fail>,
    f32s: Vec<f32>,
    bits: Vec<u8>,
    stats: CastStats,
}

/// What [`expert_rows`] decodes into `sink` for output rows `[c0, c1)` of an expert
/// stored as `blocks` and `scales` (`key` its slab key).
fn decode(
    slab: &mut Slab,
    key: (u64, TensorRef, u64),
    (blocks, scales, g, rows): (&[u8], &[u8], u64, u64),
    c0: u64,
    c1: u64,
    sink: Sink,
) -> Decoded {
    let n = ((c1 - c0) * rows) as usize;
    let (mut f32s, mut bits) = (vec![f32::NAN; n], vec![0xA5u8; n * 2]);
    let mut stats = CastStats::default();
    let fill = |slab: &mut Slab, key: (u64, TensorRef, u64, u64)| {
        let span = Span {
            blocks,
            scales,
            groups: g,
            rows,
        };
        slab.hold(key, 4, &span);
        Ok(())
    };
    let each = |gr: &Group, at: u64| match sink {
        Sink::F32 => group_f32(gr, &mut f32s[(at * rows) as usize..]),
        Sink::Half(h) => group_half(gr, h, &mut bits[(at * rows * 2) as usize..], &mut stats),
    };
    let done = expert_rows(slab, key, 4, c0..c1, fill, each);
    Decoded {
        done,
        f32s,
        bits,
        stats,
    }
}

/// Stored MXFP4 experts: blocks, scales that keep every value normal in f16, and
/// scales over the whole E8M0 range.
struct Experts {
    blocks: Vec<Vec<u8>>,
    normal: Vec<Vec<u8>>,
    wide: Vec<Vec<u8>>,
}

/// `experts` experts of `rows` stored rows of `g` groups, from a fixed seed.
fn stored(rows: u64, g: u64, experts: u64) -> Experts {
    let mut next = crate::cast::dequant::xorshift(0x9E37_79B9_7F4A_7C15u64);
    let blocks: Vec<Vec<u8>> = (0..experts)
        .map(|_| (0..rows * g * 16).map(|_| next() as u8).collect())
        .collect();
    let normal: Vec<Vec<u8>> = (0..experts)
        .map(|_| (0..rows * g).map(|_| 114 + (next() % 27) as u8).collect())
        .collect();
    let wide: Vec<Vec<u8>> = (0..experts)
        .map(|_| {
            (0..rows * g)
                .map(|_| match next() % 8 {
                    0 => [0, 1, 253, 254][(next() % 4) as usize],
                    _ => 95 + (next() % 70) as u8,
                })
                .collect()
        })
        .collect();
    Experts {
        blocks,
        normal,
        wide,
    }
}

/// FP4[nibble] × 2^(scale − 127): output row `c`, stored row `rr` of an expert stored
/// as `blocks` and `scales` with `g` groups.
fn direct(blocks: &[u8], scales: &[u8], g: u64, c: u64, rr: u64) -> f32 {
    let (gg, k) = (c / 32, c % 32);
    let byte = blocks[((rr * g + gg) * 16 + k / 2) as usize];
    let nib = if k % 2 == 0 { byte & 15 } else { byte >> 4 };
    let s = scales[(rr * g + gg) as usize] as i32 - 127;
    FP4[nib as usize] * 2f32.powi(s)
}

/// Value `i` that `d` decoded into `sink` and the direct value `v` as `sink` holds it
/// (f32 bits, or `v` rounded once by the `half` crate), counting into `want` the
/// infinities the cast counts.
fn got_and_expected(d: &Decoded, i: usize, v: f32, sink: Sink, want: &mut CastStats) -> (u32, u32) {
    let (out, bits) = (&d.f32s, &d.bits);
    match sink {
        Sink::F32 => (out[i].to_bits(), v.to_bits()),
        Sink::Half(h) => {
            let exp = match h {
                Half::F16 => f16::from_f32(v).to_bits(),
                Half::Bf16 => half::bf16::from_f32(v).to_bits(),
            };
            let inf = if h == Half::F16 { 0x7c00 } else { 0x7f80 };
            if exp & 0x7fff == inf {
                if v.is_finite() {
                    want.overflow += 1;
                    want.max_overflow = want.max_overflow.max(v.abs() as f64);
                } else {
                    want.inf += 1;
                }
            }
            let got = u16::from_le_bytes([bits[2 * i], bits[2 * i + 1]]);
            (got as u32, exp as u32)
        }
    }
}

/// Output rows of MXFP4 experts through slabs of 4 groups (9 groups: the last slab
/// short; 37 stored rows: the last block of 16 short), in pieces that start and end
/// inside groups and cross slabs, the two experts alternating (a slab of the other
/// is never reused), into f32 and straight into f16 and bf16, with scales that keep
/// every value normal in f16 and with scales over the whole E8M0 range (f16
/// subnormals, zeros and overflow, f32 infinities): every f32 value equals
/// FP4[nibble] × 2^(scale − 127) at its place, and every f16 and bf16 value that
/// number rounded once by the `half` crate, the infinities counted as the cast
/// counts them.
#[test]
fn experts_through_slabs_equal_the_direct_decode() {
    let (rows, g, experts) = (37u64, 9u64, 2u64);
    let Experts {
        blocks,
        normal,
        wide,
    } = stored(rows, g, experts);
    let blocks_ref = TensorRef {
        shard: 0,
        tensor: 5,
    };
    let cols = g * 32;
    let pieces = [
        (0, 32),
        (32, 45),
        (45, 150),
        (150, 288),
        (0, 288),
        (100, 101),
        (287, 288),
    ];
    let sinks = [Sink::F32, Sink::Half(Half::F16), Sink::Half(Half::Bf16)];
    for (scales, sink) in [&normal, &wide]
        .into_iter()
        .flat_map(|s| sinks.map(|k| (s, k)))
    {
        let mut slab = Slab::default();
        let mut seen = 0u64;
        for (c0, c1) in pieces {
            for e in [0usize, 1, 0] {
                let expert = (&blocks[e][..], &scales[e][..], g, rows);
                let d = decode(&mut slab, (7, blocks_ref, e as u64), expert, c0, c1, sink);
                assert!(d.done.is_ok(), "{sink:?}");
                let mut want = CastStats::default();
                for c in c0..c1.min(cols) {
                    for rr in 0..rows {
                        let i = ((c - c0) * rows + rr) as usize;
                        let v = direct(&blocks[e], &scales[e], g, c, rr);
                        let (got, exp) = got_and_expected(&d, i, v, sink, &mut want);
                        assert_eq!(got, exp, "{sink:?} e {e} c {c} row {rr} value {v}");
                    }
                }
                assert_eq!(d.stats, want, "{sink:?} piece {c0}..{c1}");
                seen += want.overflow + want.inf;
            }
        }
        // The wide scales reach f16 overflow and f32 infinity; the usual ones do not.
        match (std::ptr::eq(scales, &wide), sink) {
            (true, Sink::Half(_)) => assert!(seen > 0, "{sink:?}"),
            (false, _) => assert_eq!(seen, 0),
            _ => {}
        }
    }
    // An E8M0 NaN scale is reported at its (row, group), by every sink.
    let mut bad = normal[0].clone();
    bad[(20 * g + 6) as usize] = 255;
    for sink in sinks {
        let expert = (&blocks[0][..], &bad[..], g, rows);
        let d = decode(
            &mut Slab::default(),
            (8, blocks_ref, 0),
            expert,
            0,
            cols,
            sink,
        );
        assert!(matches!(d.done, Err(Fail::NanScale(20, 6))), "{sink:?}");
    }
}

/// The 16 × 16 byte transpose and the exponent add of the AVX2 half kernel against
/// the scalar one, every nibble with every E8M0 code that keeps f16 normal.
#[test]
#[cfg(target_arch = "x86_64")]
fn half_group_avx2_equals_the_scalar_decode() {
    if !avx2() {
        eprintln!("skipped: no AVX2 on this CPU");
        return;
    }
    let rows = 48usize;
    let blocks: Vec<u8> = (0..rows * 16).map(|i| (i * 37 + i / 16) as u8).collect();
    for to in [Half::F16, Half::Bf16] {
        for s0 in 0..=255u8 {
            let scales: Vec<u8> = (0..rows).map(|r| s0.wrapping_add(r as u8 % 3)).collect();
            let gr = Group {
                blocks: &blocks,
                scales: &scales,
                lo: 3,
                hi: 32,
            };
            let (mut a, mut b) = (vec![0u8; 29 * rows * 2], vec![0u8; 29 * rows * 2]);
            let (mut sa, mut sb) = (CastStats::default(), CastStats::default());
            let ra = half_group(&gr, to, 0..rows, &mut a, &mut sa);
            // SAFETY: AVX2 is present (checked above).
            let rb = unsafe { half_group_avx2(&gr, to, &mut b, &mut sb) };
            assert_eq!(ra, rb, "{to:?} scale {s0}");
            if ra.is_ok() {
                assert_eq!((a, sa), (b, sb), "{to:?} scale {s0}");
            }
        }
    }
}

#[test]
fn fp4_computes_the_table() {
    for n in 0..16u32 {
        assert_eq!(fp4(n).to_bits(), FP4[n as usize].to_bits(), "nibble {n}");
    }
    // The byte tables the AVX2 kernels look values up in.
    #[cfg(target_arch = "x86_64")]
    for to in [Half::F16, Half::Bf16] {
        let (hi, lo) = to.tables();
        for n in 0..16 {
            let want = to.round(FP4[n]).to_le_bytes();
            assert_eq!([lo[n], hi[n]], want, "{to:?} nibble {n}");
        }
    }
}
