//! End to end on a full-size CLIP ViT-B/32 layout built from its manifest (random normal
//! weights, std 0.02): conversion with zstd and without compression, reading every tensor
//! back as f32, and opening one tensor by name. Throughput is source bytes per second.

#[path = "../tests/common/mod.rs"]
mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use modelconv::{convert, Codec, ConvertConfig, ModelType, Part, WeightFile};
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let tmp = common::tempdir();
    let model = tmp.path().join("clip");
    common::build_from_manifest(
        &common::fixture("manifests/clip-vit-base-patch32.json"),
        &model,
    );
    let src_bytes = std::fs::metadata(model.join("model.safetensors"))
        .unwrap()
        .len();
    let base = ConvertConfig::builder()
        .model_type(ModelType::Clip)
        .part(Part::All)
        .force(true);

    let mut g = c.benchmark_group("convert clip-vit-base-patch32 (all parts)");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(src_bytes));
    for (label, codec) in [
        ("f16 zstd-3", Codec::Zstd),
        ("f16 none", Codec::None),
        ("f16 lz4", Codec::Lz4),
    ] {
        let cfg = base.clone().compression(codec).build().unwrap();
        let out = tmp.path().join(format!("out-{}", codec.as_str()));
        g.bench_function(label, |b| {
            b.iter(|| convert(black_box(&model), &out, &cfg).unwrap())
        });
    }
    g.finish();

    let out = tmp.path().join("out-zstd");
    let wf = WeightFile::open(&out).unwrap();
    let data_bytes: u64 = wf.tensors().iter().map(|t| t.bytes).sum();
    let mut g = c.benchmark_group("read clip-vit-base-patch32");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(data_bytes));
    g.bench_function("every tensor as f32 (parallel row groups)", |b| {
        b.iter(|| {
            wf.for_each_f32(&|_, v| {
                black_box(v);
            })
            .unwrap()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("open one tensor");
    g.bench_function(
        "open file + read text_model.embeddings.token_embedding.weight",
        |b| {
            b.iter(|| {
                let wf = WeightFile::open(&out).unwrap();
                black_box(
                    wf.tensor("text_model.embeddings.token_embedding.weight")
                        .unwrap(),
                )
            })
        },
    );
    g.bench_function(
        "read vision_model.encoder.layers.5.mlp.fc1.bias (file open)",
        |b| {
            b.iter(|| {
                black_box(
                    wf.tensor("vision_model.encoder.layers.5.mlp.fc1.bias")
                        .unwrap(),
                )
            })
        },
    );
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
