//! int8 quantization (the V2 output's kernel), in bytes of source per second: per
//! channel (one unit per 4096-wide row) and per group of 128, both schemes, from f32
//! and bf16; beside the f32 -> f16 cast of the same bytes, the V1 path it replaces.

#[path = "../tests/common/mod.rs"]
mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use modelconv::internals::{cast_and_hash, quantize_units};
use modelconv::{Dtype, QuantScheme};
use std::hint::black_box;

const COLS: usize = 4096;
const ROWS: usize = 1024;
const N: usize = COLS * ROWS; // elements: a 16 MiB f32 matrix

fn bench(c: &mut Criterion) {
    let f32s = common::weights_f32(N);
    let bf16s = common::f32_bytes_to_bf16(&f32s);
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
