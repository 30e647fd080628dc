//! The cast stage alone, in bytes of source per second: our checked casts next to
//! `half`'s unchecked slice conversion (the floor) and a scalar loop.

#[path = "../tests/common/mod.rs"]
mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use modelconv::internals::cast_into;
use modelconv::Dtype;
use std::hint::black_box;

const N: usize = 4 << 20; // elements

fn bench(c: &mut Criterion) {
    let f32s = common::weights_f32(N);
    let bf16s = common::f32_bytes_to_bf16(&f32s);
    let mut out = vec![0u8; N * 4];

    let mut g = c.benchmark_group("cast");
    g.throughput(Throughput::Bytes((N * 4) as u64));
    g.bench_function(
        "f32->f16 checked, rows > 8 MiB split over cores (modelconv)",
        |b| b.iter(|| cast_into(Dtype::F32, Dtype::F16, black_box(&f32s), &mut out[..N * 2])),
    );
    g.bench_function(
        "f32->f16 checked + xxh3, one thread (the writer's path)",
        |b| {
            b.iter(|| {
                modelconv::internals::cast_and_hash(
                    Dtype::F32,
                    Dtype::F16,
                    black_box(&f32s),
                    &mut out[..N * 2],
                )
            })
        },
    );
    g.bench_function("f32->f16 half slice, unchecked", |b| {
        let src: &[f32] = bytemuck::cast_slice(&f32s);
        let mut dst = vec![f16::ZERO; N];
        b.iter(|| dst.convert_from_f32_slice(black_box(src)))
    });
    g.bench_function("f32->f16 scalar from_f32", |b| {
        b.iter(|| {
            for (o, i) in out[..N * 2].chunks_exact_mut(2).zip(f32s.chunks_exact(4)) {
                o.copy_from_slice(
                    &f16::from_f32(f32::from_le_bytes([i[0], i[1], i[2], i[3]])).to_le_bytes(),
                );
            }
        })
    });
    g.bench_function("f32->bf16 checked (modelconv)", |b| {
        b.iter(|| cast_into(Dtype::F32, Dtype::Bf16, black_box(&f32s), &mut out[..N * 2]))
    });
    g.finish();

    let mut g = c.benchmark_group("cast-bf16");
    g.throughput(Throughput::Bytes((N * 2) as u64));
    g.bench_function("bf16->f16 checked (modelconv)", |b| {
        b.iter(|| {
            cast_into(
                Dtype::Bf16,
                Dtype::F16,
                black_box(&bf16s),
                &mut out[..N * 2],
            )
        })
    });
    g.bench_function("bf16->f16 half scalar", |b| {
        b.iter(|| {
            for (o, i) in out[..N * 2].chunks_exact_mut(2).zip(bf16s.chunks_exact(2)) {
                o.copy_from_slice(
                    &f16::from_f32(bf16::from_le_bytes([i[0], i[1]]).to_f32()).to_le_bytes(),
                );
            }
        })
    });
    g.bench_function("bf16->f32 checked (modelconv)", |b| {
        b.iter(|| {
            cast_into(
                Dtype::Bf16,
                Dtype::F32,
                black_box(&bf16s),
                &mut out[..N * 4],
            )
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
