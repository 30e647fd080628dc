//! The converter core on real layouts: exact values, sharding, splitting, casting
//! policy, overflow, atomic output and the input checks.

mod common;

use std::path::Path;

use common::*;
use modelconv::{convert, ConvertConfig, Error, ModelType, Part, TargetDtype, WeightFile};

fn no_temp_files(dir: &Path) {
    let left = entries(dir);
    assert!(
        !left.iter().any(|n| n.contains(".tmp-")),
        "temp files left: {left:?}"
    );
    assert!(
        !left.iter().any(|n| n == "weights.parquet"),
        "weights.parquet left: {left:?}"
    );
}

#[test]
fn every_fixture_converts_exactly_with_every_dtype() {
    for name in FIXTURES {
        let src = read_source(&fixture(name));
        for target in ["f16", "bf16", "f32", "keep"] {
            let tmp = tempdir();
            let out = tmp.path().join("out");
            let r = convert(fixture(name), &out, &every_tensor(target.parse().unwrap())).unwrap();
            assert!(r.success);
            assert_eq!(r.tensors, src.len(), "{name}");
            let total: u64 = src
                .values()
                .map(|s| s.shape.iter().product::<usize>() as u64)
                .sum();
            assert_eq!(r.total_parameters, total, "{name}");
            assert_matches_source(&out, &src, &same_names(&src), target);
        }
    }
}

#[test]
fn trained_minilm_converts_exactly() {
    let dir = minilm();
    let src = read_source(&dir);
    let tmp = tempdir();
    let out = tmp.path().join("minilm");
    let r = convert(&dir, &out, &ConvertConfig::default()).unwrap();
    assert_eq!(r.tensors, src.len());
    assert_matches_source(&out, &src, &same_names(&src), "f16");
    // The integer position ids are never cast.
    let wf = WeightFile::open(&out).unwrap();
    assert_eq!(
        wf.info("embeddings.position_ids")
            .unwrap()
            .dtype
            .torch_name(),
        "torch.int64"
    );
    // Tokenizer files come along.
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
    ] {
        assert_eq!(
            std::fs::read(out.join("tokenizer").join(f)).unwrap(),
            std::fs::read(dir.join(f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(
        std::fs::read(out.join("config.json")).unwrap(),
        std::fs::read(dir.join("config.json")).unwrap()
    );
}

#[test]
fn rows_are_in_shard_then_offset_order() {
    let tmp = tempdir();
    let out = tmp.path().join("o");
    convert(
        fixture("tiny-llama-sharded-bf16"),
        &out,
        &every_tensor(TargetDtype::F16),
    )
    .unwrap();
    let wf = WeightFile::open(&out).unwrap();
    let mut expected = Vec::new();
    let dir = fixture("tiny-llama-sharded-bf16");
    for i in 1..=5 {
        let bytes = std::fs::read(dir.join(format!("model-0000{i}-of-00005.safetensors"))).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let mut names: Vec<(usize, String)> = meta
            .tensors()
            .into_iter()
            .map(|(n, info)| (info.data_offsets.0, n))
            .collect();
        names.sort();
        expected.extend(names.into_iter().map(|(_, n)| n));
    }
    let got: Vec<&str> = wf.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(got, expected);
    assert_eq!(wf.tensors().len(), 39);
}

#[test]
fn same_input_same_rows() {
    let tmp = tempdir();
    let cfg = ConvertConfig::builder()
        .threads(2)
        .row_group_bytes(4096)
        .build()
        .unwrap();
    convert(fixture("tiny-clip"), tmp.path().join("a"), &cfg).unwrap();
    let cfg1 = ConvertConfig::builder()
        .threads(1)
        .row_group_bytes(4096)
        .build()
        .unwrap();
    convert(fixture("tiny-clip"), tmp.path().join("b"), &cfg1).unwrap();
    let (a, b) = (
        WeightFile::open(tmp.path().join("a")).unwrap(),
        WeightFile::open(tmp.path().join("b")).unwrap(),
    );
    assert_eq!(a.tensors(), b.tensors());
    assert!(
        a.num_row_groups() > 3,
        "small budget gives several row groups"
    );
    for t in a.tensors() {
        assert_eq!(a.tensor(&t.name).unwrap(), b.tensor(&t.name).unwrap());
    }
}

#[test]
fn tensors_over_the_row_limit_split_and_read_back_whole() {
    let tmp = tempdir();
    let out = tmp.path().join("o");
    let src = read_source(&fixture("tiny-llama-sharded-bf16"));
    let cfg = ConvertConfig::builder()
        .model_type(ModelType::CausalLm)
        .max_row_bytes(1000)
        .row_group_bytes(3000)
        .build()
        .unwrap();
    convert(fixture("tiny-llama-sharded-bf16"), &out, &cfg).unwrap();
    let wf = WeightFile::open(&out).unwrap();
    let embed = wf.info("model.embed_tokens.weight").unwrap();
    // 512 × 64 f16 = 65536 bytes, 500 elements (1000 bytes) per row.
    assert_eq!(embed.rows, 32768u64.div_ceil(500));
    assert!(wf.tensors().iter().filter(|t| t.rows > 1).count() > 10);
    assert_matches_source(&out, &src, &same_names(&src), "f16");
    assert_verifies(&out, &fixture("tiny-llama-sharded-bf16"));
}

/// `file` written again by the parquet crate's own `ArrowWriter`, row group by row
/// group, with the weight files' writer properties and key-value metadata.
fn rewritten_by_the_column_writer(
    file: &Path,
    compression: parquet::basic::Compression,
) -> Vec<u8> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let open = || {
        ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(file).unwrap())
            .unwrap()
            .with_batch_size(1 << 20)
    };
    let builder = open();
    let meta = builder.metadata().clone();
    let mut out = Vec::new();
    let props = modelconv::internals::writer_properties(compression);
    // The reader puts the file's key-value metadata on the schema; the writer's own
    // `ARROW:schema` has none.
    let schema = std::sync::Arc::new(
        builder
            .schema()
            .as_ref()
            .clone()
            .with_metadata(std::collections::HashMap::<String, String>::new()),
    );
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, schema, Some(props)).unwrap();
    for rg in 0..meta.num_row_groups() {
        for batch in open().with_row_groups(vec![rg]).build().unwrap() {
            w.write(&batch.unwrap()).unwrap();
        }
        w.flush().unwrap();
    }
    for kv in meta.file_metadata().key_value_metadata().unwrap() {
        if kv.key != "ARROW:schema" {
            w.append_key_value_metadata(kv.clone());
        }
    }
    w.close().unwrap();
    out
}

#[test]
fn data_pages_are_the_bytes_the_parquet_column_writer_writes() {
    // The writer compresses `data` pages itself, from the cast buffer; the file must
    // be the one the parquet crate's column writer makes of the same rows.
    use parquet::basic::{Compression, ZstdLevel};
    let zstd = |l| Compression::ZSTD(ZstdLevel::try_new(l).unwrap());
    let cases: [(&str, &str, u32, Compression, bool); 7] = [
        ("tiny-llama-sharded-bf16", "zstd", 3, zstd(3), false),
        ("tiny-llama-sharded-bf16", "zstd", 9, zstd(9), true),
        ("tiny-whisper", "lz4", 3, Compression::LZ4_RAW, false),
        ("tiny-clip", "snappy", 3, Compression::SNAPPY, false),
        ("tiny-bert", "none", 3, Compression::UNCOMPRESSED, false),
        ("tiny-bert", "none", 3, Compression::UNCOMPRESSED, true),
        ("tiny-clip", "zstd", 1, zstd(1), true),
    ];
    for (name, codec, level, compression, quantize) in cases {
        let tmp = tempdir();
        let out = tmp.path().join("o");
        let mut b = ConvertConfig::builder();
        b = b
            .model_type(ModelType::CausalLm)
            .compression(codec.parse::<modelconv::Codec>().unwrap())
            .level(level as i32)
            // Split rows and many rows per group.
            .max_row_bytes(3000)
            .row_group_bytes(20_000);
        if quantize {
            b = b.quantize(Some(modelconv::Quantize {
                kind: modelconv::QuantType::Int8,
                scheme: modelconv::QuantScheme::Asymmetric,
                group_size: 16,
                skip: Vec::new(),
            }));
        }
        convert(fixture(name), &out, &b.build().unwrap()).unwrap();
        let file = out.join("weights.parquet");
        let ours = std::fs::read(&file).unwrap();
        let wf = WeightFile::open(&out).unwrap();
        assert!(
            wf.tensors().iter().any(|t| t.rows > 1),
            "{name}: no split rows"
        );
        let theirs = rewritten_by_the_column_writer(&file, compression);
        assert_eq!(
            ours.len(),
            theirs.len(),
            "{name} {codec} quantize={quantize}"
        );
        assert!(
            ours == theirs,
            "{name} {codec} quantize={quantize}: bytes differ"
        );
    }
}

#[test]
fn f64_sources_round_once_to_nearest_even() {
    // 200,000 f64 values over the whole f16 and bf16 ranges (subnormals and overflow
    // included), against the midpoint reference in tests/common/rounding.rs. `half`'s
    // from_f64, which the cast used before, misrounds about 1 in 20,000 to bf16.
    let tmp = tempdir();
    let file = tmp.path().join("m.safetensors");
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let vals: Vec<f64> = (0..200_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let m = f64::from_bits((x & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
            let e = ((x >> 52) % 300) as i32 - 150;
            let sign = if x & (1 << 63) == 0 { 1.0 } else { -1.0 };
            sign * m * 2f64.powi(e)
        })
        .collect();
    let data: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_safetensors(&file, &[("model.w", "F64", vec![vals.len() as u64], data)]);
    for (target, bf16) in [("f16", false), ("bf16", true)] {
        let out = tmp.path().join(target);
        let cfg = ConvertConfig::builder()
            .model_type(ModelType::CausalLm)
            .dtype(target.parse().unwrap())
            .allow_overflow(true)
            .build()
            .unwrap();
        convert(&file, &out, &cfg).unwrap();
        let got = WeightFile::open(&out)
            .unwrap()
            .tensor("model.w")
            .unwrap()
            .data;
        let mut wrong = 0;
        for (i, v) in vals.iter().enumerate() {
            let want = rounding::round_f64(*v, bf16);
            if u16::from_le_bytes([got[2 * i], got[2 * i + 1]]) != want {
                wrong += 1;
            }
        }
        assert_eq!(wrong, 0, "{target}: {wrong} values misrounded");
    }
}

fn overflow_checkpoint(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let big = half::bf16::from_f32(1e5);
    let vals = [
        half::bf16::from_f32(1.0),
        big,
        half::bf16::from_f32(-2.0e5),
        half::bf16::from_f32(f32::NAN),
    ];
    let data: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let ok: Vec<u8> = [0.5f32, 1.5].iter().flat_map(|v| v.to_le_bytes()).collect();
    write_safetensors(
        &dir.join("model.safetensors"),
        &[
            ("ok.weight", "F32", vec![2], ok),
            ("model.layers.0.big", "BF16", vec![2, 2], data),
        ],
    );
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type":"llama","architectures":["LlamaForCausalLM"]}"#,
    )
    .unwrap();
}

#[test]
fn overflow_is_an_error_and_leaves_nothing() {
    let tmp = tempdir();
    let src = tmp.path().join("src");
    overflow_checkpoint(&src);
    let out = tmp.path().join("out");
    let err = convert(&src, &out, &ConvertConfig::default()).unwrap_err();
    let big = half::bf16::from_f32(-2.0e5).to_f32().abs();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: tensor `model.layers.0.big`: 2 finite values would overflow to infinity casting BF16 to F16 \
             (largest magnitude {big})",
            src.join("model.safetensors").display()
        )
    );
    assert!(matches!(err, Error::Overflow { count: 2, .. }));
    no_temp_files(&out);
    assert!(!out.join("metadata.json").exists());

    let cfg = ConvertConfig::builder()
        .allow_overflow(true)
        .build()
        .unwrap();
    let r = convert(&src, &out, &cfg).unwrap();
    let cast = &r.metadata["cast_report"]["model.layers.0.big"];
    assert_eq!(cast["overflow"], 2);
    assert_eq!(cast["nan"], 1);
    assert_eq!(cast["max_overflow_magnitude"], big as f64);
    let t = WeightFile::open(&out)
        .unwrap()
        .tensor_f32("model.layers.0.big")
        .unwrap();
    assert_eq!(t[0], 1.0);
    assert_eq!(t[1], f32::INFINITY);
    assert_eq!(t[2], f32::NEG_INFINITY);
    assert!(t[3].is_nan());
    // bf16 and f32 hold the values: no overflow, no error.
    for d in [TargetDtype::Bf16, TargetDtype::F32, TargetDtype::Keep] {
        let o = tmp.path().join(format!("out-{d}"));
        convert(
            &src,
            &o,
            &ConvertConfig::builder().dtype(d).build().unwrap(),
        )
        .unwrap();
    }
}

#[test]
fn existing_output_is_refused_without_force_and_replaced_with_it() {
    let tmp = tempdir();
    let out = tmp.path().join("o");
    convert(fixture("tiny-bert"), &out, &ConvertConfig::default()).unwrap();
    let before = std::fs::read(out.join("weights.parquet")).unwrap();
    let err = convert(fixture("tiny-clip"), &out, &ConvertConfig::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: output already holds a conversion",
            out.join("weights.parquet").display()
        )
    );
    assert_eq!(std::fs::read(out.join("weights.parquet")).unwrap(), before);
    // A failing forced conversion leaves the old one intact.
    let bad = tmp.path().join("bad");
    overflow_checkpoint(&bad);
    convert(
        &bad,
        &out,
        &ConvertConfig::builder().force(true).build().unwrap(),
    )
    .unwrap_err();
    assert_eq!(std::fs::read(out.join("weights.parquet")).unwrap(), before);
    let r = convert(
        fixture("tiny-clip"),
        &out,
        &ConvertConfig::builder()
            .force(true)
            .part(Part::All)
            .build()
            .unwrap(),
    )
    .unwrap();
    let n = read_source(&fixture("tiny-clip")).len();
    assert_eq!(r.tensors, n);
    assert_eq!(WeightFile::open(&out).unwrap().tensors().len(), n);
    assert!(
        !out.join("tokenizer").exists() || out.join("tokenizer").read_dir().unwrap().count() > 0
    );
}

#[test]
fn output_that_is_an_input_is_refused() {
    let tmp = tempdir();
    let model = tmp.path().join("m");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["model.safetensors", "config.json"] {
        std::fs::copy(fixture("tiny-bert").join(f), model.join(f)).unwrap();
    }
    // Converting into the model's own directory would overwrite its config.json.
    let err = convert(&model, &model, &ConvertConfig::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: output path is an input file",
            model.join("config.json").display()
        )
    );
    // A weights.parquet that links to the source.
    let out = tmp.path().join("o");
    std::fs::create_dir_all(&out).unwrap();
    std::os::unix::fs::symlink(model.join("model.safetensors"), out.join("weights.parquet"))
        .unwrap();
    let err = convert(
        &model,
        &out,
        &ConvertConfig::builder().force(true).build().unwrap(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::OutputIsInput { .. }), "{err}");
    // The output is an input file.
    let err = convert(
        &model,
        model.join("model.safetensors"),
        &ConvertConfig::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::OutputIsInput { .. }), "{err}");
    assert_eq!(
        std::fs::read(model.join("model.safetensors")).unwrap(),
        std::fs::read(fixture("tiny-bert/model.safetensors")).unwrap()
    );
}

fn sharded_copy(tmp: &Path) -> std::path::PathBuf {
    copy_dir(&fixture("tiny-llama-sharded-bf16"), &tmp.join("llama"))
}

#[test]
fn index_and_shards_must_agree() {
    let tmp = tempdir();
    let out = tmp.path().join("out");
    let cfg = ConvertConfig::default();

    let dir = sharded_copy(&tmp.path().join("missing"));
    std::fs::remove_file(dir.join("model-00002-of-00005.safetensors")).unwrap();
    std::fs::remove_file(dir.join("model-00004-of-00005.safetensors")).unwrap();
    let err = convert(&dir, &out, &cfg).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: missing shards: model-00002-of-00005.safetensors, model-00004-of-00005.safetensors",
            dir.join("model.safetensors.index.json").display()
        )
    );
    assert!(
        !out.exists(),
        "nothing is written before the inputs are validated"
    );

    let dir = sharded_copy(&tmp.path().join("wrong"));
    edit_index(&dir, |v| {
        v["weight_map"]["lm_head.weight"] = "model-00001-of-00005.safetensors".into()
    });
    let err = convert(&dir, &out, &cfg).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: tensor `lm_head.weight`: the index maps it to model-00001-of-00005.safetensors, but it is in model-00005-of-00005.safetensors",
            dir.join("model.safetensors.index.json").display()
        )
    );

    let dir = sharded_copy(&tmp.path().join("unlisted"));
    edit_index(&dir, |v| {
        v["weight_map"]
            .as_object_mut()
            .unwrap()
            .remove("model.layers.0.mlp.up_proj.weight");
    });
    let err = convert(&dir, &out, &cfg).unwrap_err();
    assert!(
        err.to_string().ends_with(
            "tensor `model.layers.0.mlp.up_proj.weight`: it is in model-00002-of-00005.safetensors but the index does not list it"
        ),
        "{err}"
    );

    let dir = sharded_copy(&tmp.path().join("ghost"));
    edit_index(&dir, |v| {
        v["weight_map"]["ghost.weight"] = "model-00001-of-00005.safetensors".into()
    });
    let err = convert(&dir, &out, &cfg).unwrap_err();
    assert!(err.to_string().ends_with("tensor `ghost.weight`: the index maps it to model-00001-of-00005.safetensors, but no shard holds it"), "{err}");

    for bad in [
        "../model-00001-of-00005.safetensors",
        "/etc/passwd",
        "sub/x.safetensors",
    ] {
        let dir = sharded_copy(&tmp.path().join(format!("bad{}", bad.len())));
        edit_index(&dir, |v| v["weight_map"]["lm_head.weight"] = bad.into());
        let err = convert(&dir, &out, &cfg).unwrap_err();
        assert!(matches!(err, Error::InvalidIndex { .. }), "{err}");
        assert!(
            err.to_string().contains("is not a plain file name"),
            "{err}"
        );
    }

    // A duplicate key inside weight_map.
    let dir = sharded_copy(&tmp.path().join("dupkey"));
    let p = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&p).unwrap().replacen(
        "\"weight_map\": {",
        "\"weight_map\": {\n    \"lm_head.weight\": \"model-00005-of-00005.safetensors\",",
        1,
    );
    std::fs::write(&p, text).unwrap();
    let err = convert(&dir, &out, &cfg).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{}: duplicate tensor `lm_head.weight`", p.display())
    );
    assert!(!out.exists());
}

#[test]
fn a_tensor_in_two_shards_is_a_duplicate() {
    let tmp = tempdir();
    let dir = tmp.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    let a: Vec<u8> = vec![0; 8];
    write_safetensors(
        &dir.join("a.safetensors"),
        &[("w", "F32", vec![2], a.clone())],
    );
    write_safetensors(&dir.join("b.safetensors"), &[("w", "F32", vec![2], a)]);
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"metadata":{},"weight_map":{"w":"a.safetensors"}}"#,
    )
    .unwrap();
    // b.safetensors is not in the index, so it is not read: only a's `w` counts.
    let cfg = ConvertConfig::builder()
        .model_type(ModelType::Transformers)
        .build()
        .unwrap();
    convert(
        dir.join("model.safetensors.index.json"),
        tmp.path().join("o1"),
        &cfg,
    )
    .unwrap();
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"metadata":{},"weight_map":{"w":"a.safetensors","x":"b.safetensors"}}"#,
    )
    .unwrap();
    let err = convert(&dir, tmp.path().join("o2"), &cfg).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: duplicate tensor `w` (also in {})",
            dir.join("b.safetensors").display(),
            dir.join("a.safetensors").display()
        )
    );
}

#[test]
fn single_file_input_and_odd_sizes() {
    // Zero-size tensors, scalars, odd-length u8 values before f16 values (misaligned
    // destination offsets), and bool.
    let tmp = tempdir();
    let dir = tmp.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    let tensors = vec![
        ("a.odd", "U8", vec![3], vec![1u8, 2, 3]),
        (
            "b.after_odd",
            "F32",
            vec![5],
            f32s(&[1.0, -2.5, 2.718_281_7, 1e-7, 65504.0]),
        ),
        ("c.empty", "F32", vec![2, 0], vec![]),
        ("d.scalar", "F32", vec![], f32s(&[0.333])),
        ("e.bool", "BOOL", vec![3], vec![1, 0, 1]),
        (
            "f.i64",
            "I64",
            vec![2],
            [7i64, -9].iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        (
            "g.f64",
            "F64",
            vec![2],
            [1.0f64 / 3.0, -1e30]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
    ];
    write_safetensors(&dir.join("weights.safetensors"), &tensors);
    let src = read_source(&dir);
    for target in ["f32", "keep", "bf16"] {
        let out = tmp.path().join(format!("o-{target}"));
        let cfg = ConvertConfig::builder()
            .dtype(target.parse().unwrap())
            .model_type(ModelType::Transformers)
            .row_group_bytes(16)
            .build()
            .unwrap();
        convert(dir.join("weights.safetensors"), &out, &cfg).unwrap();
        assert_matches_source(&out, &src, &same_names(&src), target);
    }
    // f16: -1e30 overflows; with the overflow allowed every other value is exact.
    let out = tmp.path().join("o-f16");
    let cfg = ConvertConfig::builder()
        .model_type(ModelType::Transformers)
        .allow_overflow(true)
        .build()
        .unwrap();
    convert(&dir, &out, &cfg).unwrap();
    assert_matches_source(&out, &src, &same_names(&src), "f16");
}

#[test]
fn cancelled_conversion_leaves_nothing() {
    let tmp = tempdir();
    let out = tmp.path().join("o");
    let cfg = ConvertConfig::builder()
        .row_group_bytes(1024)
        .build()
        .unwrap();
    cfg.cancel_flag()
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let err = convert(fixture("tiny-llama-sharded-bf16"), &out, &cfg).unwrap_err();
    assert!(matches!(err, Error::Cancelled));
    no_temp_files(&out);
}

#[test]
fn a_write_that_fails_midway_names_the_output_and_leaves_nothing() {
    // tiny-clip writes ~100 KiB of weights; a 16 KiB file limit stops the write after
    // part of the file is out, whoever runs the test (root included).
    let tmp = tempdir();
    let out = tmp.path().join("o");
    let o = modelconv_with_file_limit(
        32,
        &[
            "convert",
            fixture("tiny-clip").to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--compression",
            "none",
            "--row-group-mb",
            "1",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with(&format!(
            "error: {}: ",
            out.join("weights.parquet").display()
        )),
        "{err}"
    );
    assert!(err.contains("File too large"), "{err}");
    no_temp_files(&out);
    for f in ["metadata.json", "config.json", "tokenizer"] {
        assert!(!out.join(f).exists(), "{f} left behind");
    }
    // The same limit leaves an earlier good conversion intact under --force.
    let good = tmp.path().join("good");
    convert(fixture("tiny-clip"), &good, &ConvertConfig::default()).unwrap();
    let before = std::fs::read(good.join("weights.parquet")).unwrap();
    let meta = std::fs::read(good.join("metadata.json")).unwrap();
    let o = modelconv_with_file_limit(
        32,
        &[
            "convert",
            fixture("tiny-clip").to_str().unwrap(),
            "-o",
            good.to_str().unwrap(),
            "--compression",
            "none",
            "--force",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(std::fs::read(good.join("weights.parquet")).unwrap(), before);
    assert_eq!(std::fs::read(good.join("metadata.json")).unwrap(), meta);
    let left: Vec<_> = std::fs::read_dir(&good)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn an_output_path_that_is_a_file_is_refused() {
    let tmp = tempdir();
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let err = convert(fixture("tiny-bert"), &file, &ConvertConfig::default()).unwrap_err();
    assert!(matches!(err, Error::OutputNotDirectory { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("{}: the output must be a directory", file.display())
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
    // Below a file: the directory cannot be created.
    let below = file.join("sub");
    let err = convert(fixture("tiny-bert"), &below, &ConvertConfig::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: cannot create: Not a directory (os error 20)",
            below.display()
        )
    );
}

#[test]
fn nothing_left_after_the_filters_is_an_error() {
    let tmp = tempdir();
    let out = tmp.path().join("o");
    let cfg = ConvertConfig::builder()
        .filters(modelconv::Filters {
            exclude: vec!["*".into()],
            ..Default::default()
        })
        .build()
        .unwrap();
    let err = convert(fixture("tiny-bert"), &out, &cfg).unwrap_err();
    assert!(matches!(err, Error::NothingToConvert { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "{}: nothing to convert: the bert recipe and the filters keep no tensor",
            fixture("tiny-bert").display()
        )
    );
    assert!(!out.exists(), "nothing is created before the plan is made");
}

#[test]
fn a_dimension_past_int32_is_refused_before_writing() {
    // A valid safetensors file: [2^31, 0] has no elements and no bytes, but the
    // format's int32 `shape` column cannot hold the first dimension.
    let tmp = tempdir();
    let model = tmp.path().join("m.safetensors");
    write_safetensors(
        &model,
        &[
            ("model.layers.0.w", "F32", vec![2], vec![0; 8]),
            ("model.layers.0.wide", "F32", vec![1 << 31, 0], vec![]),
        ],
    );
    let out = tmp.path().join("o");
    let cfg = ConvertConfig::builder()
        .model_type(ModelType::CausalLm)
        .build()
        .unwrap();
    let err = convert(&model, &out, &cfg).unwrap_err();
    assert!(
        matches!(
            err,
            Error::DimensionTooLarge {
                dim: 2_147_483_648,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "{}: tensor `model.layers.0.wide`: dimension 2147483648 does not fit the format's int32 shape",
            model.display()
        )
    );
    assert!(!out.exists());
}

/// Grows `path` by a few bytes the first time the conversion reports progress.
struct GrowOnProgress {
    path: std::path::PathBuf,
    done: std::sync::atomic::AtomicBool,
}

impl modelconv::Observer for GrowOnProgress {
    fn event(&self, e: &modelconv::Event) {
        if matches!(e, modelconv::Event::Progress { .. })
            && !self.done.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&self.path)
                .unwrap();
            f.write_all(&[0; 8]).unwrap();
        }
    }
}

#[test]
fn a_shard_that_changes_size_during_conversion_stops_it() {
    let tmp = tempdir();
    let model = copy_dir(&fixture("tiny-llama-sharded-bf16"), &tmp.path().join("m"));
    let last = model.join("model-00005-of-00005.safetensors");
    let was = std::fs::metadata(&last).unwrap().len();
    // Small row groups, one in flight: the last shard is read long after the first
    // group is written (and reported).
    let cfg = ConvertConfig::builder()
        .model_type(ModelType::CausalLm)
        .row_group_bytes(2048)
        .threads(1)
        .inflight_per_thread(1)
        .build()
        .unwrap();
    let out = tmp.path().join("o");
    let grow = GrowOnProgress {
        path: last.clone(),
        done: Default::default(),
    };
    let err = modelconv::convert_with(&model, &out, &cfg, &grow).unwrap_err();
    assert!(matches!(err, Error::SourceChanged { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "{}: the file changed while being converted: its size changed ({was} → {} bytes)",
            last.display(),
            was + 8
        )
    );
    no_temp_files(&out);
    assert!(!out.join("metadata.json").exists());
}

#[test]
fn the_same_input_gives_the_same_file_whatever_the_thread_count() {
    // SOURCE_DATE_EPOCH pins the conversion time, the one thing that differs between
    // runs; the file must then not depend on how the work was spread over threads.
    let tmp = tempdir();
    let out = tmp.path().join("o");
    let mut files = Vec::new();
    for threads in ["1", "2", "1"] {
        let o = bin()
            .arg("convert")
            .arg(minilm())
            .args([
                "-o",
                out.to_str().unwrap(),
                "--force",
                "-q",
                "--threads",
                threads,
            ])
            .args(["--row-group-mb", "1", "--max-row-mb", "1"])
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        files.push(std::fs::read(out.join("weights.parquet")).unwrap());
    }
    assert!(files[0] == files[1], "1 and 2 threads give different files");
    assert!(files[0] == files[2]);
    let wf = WeightFile::open(&out).unwrap();
    assert_eq!(
        wf.metadata().unwrap()["converted_at"],
        "2023-11-14T22:13:20Z"
    );
    assert!(
        wf.parquet_metadata().num_row_groups() > 20,
        "many groups in flight"
    );
    assert!(wf.tensors().iter().any(|t| t.rows > 1), "split rows too");
}

#[test]
fn export_of_a_keep_conversion_is_the_source_file_byte_for_byte() {
    // The trained all-MiniLM-L6-v2, as a new user would try it: convert with --dtype
    // keep, export, and compare with the file the Hub lists (sha256 53aa5117…).
    let dir = minilm();
    let tmp = tempdir();
    let out = tmp.path().join("o");
    let cfg = ConvertConfig::builder()
        .dtype(TargetDtype::Keep)
        .build()
        .unwrap();
    convert(&dir, &out, &cfg).unwrap();
    let st = tmp.path().join("model.safetensors");
    modelconv::export(&out, &st, &Default::default()).unwrap();
    let got = std::fs::read(&st).unwrap();
    let want = std::fs::read(dir.join("model.safetensors")).unwrap();
    assert_eq!(got.len(), want.len());
    assert!(got == want, "exported file differs from the source");
    // The stamp is opt-in; with it the header says who wrote the file.
    let stamped = tmp.path().join("stamped.safetensors");
    let opts = modelconv::ExportOptions {
        stamp: true,
        ..Default::default()
    };
    modelconv::export(&out, &stamped, &opts).unwrap();
    let bytes = std::fs::read(&stamped).unwrap();
    let st = safetensors::SafeTensors::read_metadata(&bytes).unwrap().1;
    let meta = st.metadata().as_ref().unwrap();
    assert_eq!(
        meta["exported_by"],
        format!("modelconv {}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(meta["format"], "pt");
}

#[test]
fn full_size_clip_layout_converts() {
    let tmp = tempdir();
    let model = tmp.path().join("clip");
    build_from_manifest(&fixture("manifests/clip-vit-base-patch32.json"), &model);
    let out = tmp.path().join("out");
    let r = convert(&model, &out, &ConvertConfig::default()).unwrap();
    assert_eq!(r.tensors, 200, "CLIP vision part");
    let report = modelconv::verify(&out, Some(&open_source(&model)), &Default::default()).unwrap();
    assert!(report.passed());
    assert_eq!(report.tensors, 200);
}

#[test]
fn force_never_mixes_a_new_conversion_with_an_earlier_ones_files() {
    let tmp = tempdir();
    let out = tmp.path().join("o");
    let st = ConvertConfig::default();
    convert(fixture("tiny-sentence-transformer"), &out, &st).unwrap();
    for f in [
        "modules.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
        "config.json",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    // A different model into the same directory: nothing of the first may remain.
    let force = ConvertConfig::builder().force(true).build().unwrap();
    convert(fixture("tiny-clip"), &out, &force).unwrap();
    let mut left: Vec<String> = Vec::new();
    let mut stack = vec![out.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            left.push(p.strip_prefix(&out).unwrap().display().to_string());
        }
    }
    left.sort();
    assert_eq!(left, ["config.json", "metadata.json", "weights.parquet"]);
    let m = metadata(&out);
    assert_eq!(
        m["files"],
        serde_json::json!(["weights.parquet", "metadata.json", "config.json"])
    );
    assert_eq!(
        std::fs::read(out.join("config.json")).unwrap(),
        std::fs::read(fixture("tiny-clip/config.json")).unwrap()
    );
}

#[test]
fn a_rename_that_fails_leaves_the_earlier_conversion_and_no_temp_file() {
    // `weights.parquet` replaced by a non-empty directory: the final rename fails
    // (EISDIR) after the whole file was written and synced, whoever runs the test.
    let tmp = tempdir();
    let out = tmp.path().join("o");
    convert(fixture("tiny-bert"), &out, &ConvertConfig::default()).unwrap();
    let meta = std::fs::read(out.join("metadata.json")).unwrap();
    std::fs::remove_file(out.join("weights.parquet")).unwrap();
    std::fs::create_dir_all(out.join("weights.parquet/keep")).unwrap();
    let force = ConvertConfig::builder().force(true).build().unwrap();
    let err = convert(fixture("tiny-bert"), &out, &force).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(
        err.to_string().starts_with(&format!(
            "{}: cannot rename into: ",
            out.join("weights.parquet").display()
        )),
        "{err}"
    );
    no_temp_files_anywhere(&out);
    assert_eq!(std::fs::read(out.join("metadata.json")).unwrap(), meta);
    assert!(out.join("weights.parquet/keep").is_dir());
}

fn no_temp_files_anywhere(dir: &Path) {
    let left = temp_files(dir);
    assert!(left.is_empty(), "temp files left: {left:?}");
}

#[test]
fn read_mode_reuses_its_piece_buffer_across_pieces_and_rows_exactly() {
    // One thread, so one read buffer serves every piece: a 4099 x 1280 f32 tensor
    // (twenty-one 1 MiB pieces, the last short), then smaller and larger rows of other
    // dtypes after it. A stale byte left from an earlier, longer piece would show. The
    // same for int8 (per channel and per group), against the mapped conversion.
    let tmp = tempdir();
    let dir = tmp.path().join("m");
    std::fs::create_dir(&dir).unwrap();
    let big = weights_f32(4099 * 1280);
    let bf = f32_bytes_to_bf16(&weights_f32(2305 * 3840));
    write_safetensors(
        &dir.join("model.safetensors"),
        &[
            ("a.big", "F32", vec![4099, 1280], big),
            ("b.small", "F32", vec![1000], weights_f32(1000)),
            ("c.bf16", "BF16", vec![2305, 3840], bf),
            ("d.tail", "F32", vec![7, 3], weights_f32(21)),
        ],
    );
    let source = read_source(&dir);
    // One worker thread, `io`, int8 with `group_size` if given; the output directory.
    let run = |io: modelconv::IoMode, group_size: Option<u64>| {
        let out = tmp.path().join(format!("{io:?}-{group_size:?}"));
        let cfg = ConvertConfig::builder()
            .model_type(ModelType::CausalLm)
            .io(io)
            .threads(1)
            .quantize(group_size.map(|group_size| modelconv::Quantize {
                kind: modelconv::QuantType::Int8,
                scheme: modelconv::QuantScheme::Symmetric,
                group_size,
                skip: Vec::new(),
            }))
            .build()
            .unwrap();
        convert(&dir, &out, &cfg).unwrap();
        out
    };
    for io in [modelconv::IoMode::Read, modelconv::IoMode::Mmap] {
        let out = run(io, None);
        assert_matches_source(&out, &source, &same_names(&source), "f16");
    }
    for group_size in [0, 128] {
        let files: Vec<WeightFile> = [modelconv::IoMode::Read, modelconv::IoMode::Mmap]
            .into_iter()
            .map(|io| WeightFile::open(run(io, Some(group_size))).unwrap())
            .collect();
        assert_eq!(files[0].tensors(), files[1].tensors());
        for t in files[0].tensors() {
            let (a, b) = (
                files[0].tensor(&t.name).unwrap(),
                files[1].tensor(&t.name).unwrap(),
            );
            let big = t.name == "a.big" || t.name == "c.bf16";
            assert_eq!(a.quant.is_some(), big, "{}", t.name);
            assert_eq!(a, b, "{group_size}: {}", t.name);
        }
    }
}
