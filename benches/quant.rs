//! int8 quantization (the V2 output's kernel), in bytes of source per second: per
//! channel (one unit per 4096-wide row) and per group of 128, both schemes, from f32
//! and bf16; beside the f32 -> f16 cast of the same bytes, the V1 path it replaces.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use modelconv::internals::{cast_and_hash, quantize_units};
use modelconv::{Dtype, QuantScheme};
use std::hint::black_box;

const COLS: usize = 4096;
const ROWS: usize = 1024;
const N: usize = COLS * ROWS; // elements: a 16 MiB f32 matrix

fn data_f32() -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..N)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1).to_le_bytes()
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let f32s = data_f32();
    let bf16s: Vec<u8> = f32s
        .chunks_exact(4)
        .flat_map(|b| bf16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]])).to_le_bytes())
        .collect();
    let mut codes = vec![0u8; N];
    let mut g = c.benchmark_group("quantize");
    for (dtype, src) in [(Dtype::F32, &f32s), (Dtype::Bf16, &bf16s)] {
        g.throughput(Throughput::Bytes(src.len() as u64));
        for (unit, what) in [(COLS, "per channel"), (128, "per group of 128")] {
            for scheme in [QuantScheme::Symmetric, QuantScheme::Asymmetric] {
                let name = format!("{dtype} int8 {} {what}", scheme.as_str());
                g.bench_function(&name, |b| {
                    b.iter(|| quantize_units(scheme, dtype, black_box(src), unit, &mut codes))
                });
            }
        }
    }
    g.throughput(Throughput::Bytes(f32s.len() as u64));
    let mut half = vec![0u8; N * 2];
    g.bench_function("F32 -> F16 cast + xxh3 (V1, for comparison)", |b| {
        b.iter(|| cast_and_hash(Dtype::F32, Dtype::F16, black_box(&f32s), &mut half))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
