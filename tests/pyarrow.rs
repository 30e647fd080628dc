//! Interoperability with the seed's Python world: pyarrow + numpy read our files the way
//! the seed's loader does, and files pyarrow writes with the seed's schema read back here.

mod common;

use common::*;
use modelconv::{
    convert, export, ConvertConfig, ExportOptions, ModelType, TargetDtype, WeightFile,
};

#[test]
fn seed_loader_reads_every_fixture_with_every_dtype() {
    for name in FIXTURES {
        for target in ["f16", "bf16", "f32", "keep"] {
            let tmp = tempdir();
            let out = tmp.path().join("o");
            let cfg = ConvertConfig::builder()
                .dtype(target.parse().unwrap())
                .model_type(ModelType::CausalLm)
                .build()
                .unwrap();
            convert(fixture(name), &out, &cfg).unwrap();
            let n = read_source(&fixture(name)).len();
            let stdout = python_script(
                "seed_loader.py",
                &[s(&out.join("weights.parquet")), s(&fixture(name)), target],
            );
            assert_eq!(
                stdout.trim(),
                format!("ok {n} tensors, {n} rows"),
                "{name} {target}"
            );
        }
    }
}

#[test]
fn seed_loader_reads_trained_minilm_and_renamed_whisper() {
    let tmp = tempdir();
    let out = tmp.path().join("minilm");
    convert(minilm(), &out, &ConvertConfig::default()).unwrap();
    let stdout = python_script(
        "seed_loader.py",
        &[s(&out.join("weights.parquet")), s(&minilm()), "f16"],
    );
    let n = read_source(&minilm()).len();
    assert_eq!(stdout.trim(), format!("ok {n} tensors, {n} rows"));

    // Whisper's default recipe renames; the map says which source each output came from.
    let out = tmp.path().join("whisper");
    convert(fixture("tiny-whisper"), &out, &ConvertConfig::default()).unwrap();
    let wf = WeightFile::open(&out).unwrap();
    let map: serde_json::Map<String, serde_json::Value> = wf
        .tensors()
        .iter()
        .map(|t| (t.name.clone(), t.source.clone().unwrap().into()))
        .collect();
    let map_path = tmp.path().join("names.json");
    std::fs::write(&map_path, serde_json::Value::Object(map).to_string()).unwrap();
    let stdout = python_script(
        "seed_loader.py",
        &[
            s(&out.join("weights.parquet")),
            s(&fixture("tiny-whisper")),
            "f16",
            "--names",
            s(&map_path),
        ],
    );
    assert!(
        stdout.starts_with(&format!("ok {} tensors", wf.tensors().len())),
        "{stdout}"
    );
}

#[test]
fn a_naive_reader_fails_loudly_on_split_tensors() {
    let tmp = tempdir();
    let out = tmp.path().join("o");
    let cfg = ConvertConfig::builder()
        .model_type(ModelType::CausalLm)
        .max_row_bytes(4096)
        .build()
        .unwrap();
    convert(fixture("tiny-llama-sharded-bf16"), &out, &cfg).unwrap();
    let stdout = python_script(
        "seed_loader.py",
        &[
            s(&out.join("weights.parquet")),
            s(&fixture("tiny-llama-sharded-bf16")),
            "f16",
            "--expect-split-failure",
        ],
    );
    assert!(stdout.starts_with("ok 39 tensors"), "{stdout}");
}

#[test]
fn files_written_by_pyarrow_with_the_seed_schema_are_read_and_exported() {
    for (name, compression) in [
        ("tiny-bert", "zstd"),
        ("tiny-llama-sharded-bf16", "lz4"),
        ("tiny-clip", "none"),
    ] {
        let tmp = tempdir();
        let file = tmp.path().join("weights.parquet");
        python_script(
            "write_seed_file.py",
            &[s(&fixture(name)), s(&file), compression],
        );
        let wf = WeightFile::open(&file).unwrap();
        assert!(!wf.has_index() && !wf.has_checksums());
        let src = read_source(&fixture(name));
        // The seed's file is in name order (it iterated a dict); compare by name.
        assert_matches_source(tmp.path(), &src, &same_names(&src), "f16");
        let report = modelconv::verify(
            &file,
            Some(&open_source(&fixture(name))),
            &Default::default(),
        )
        .unwrap();
        assert!(
            report.passed(),
            "{name}: {:?}",
            report.failures().collect::<Vec<_>>()
        );
        assert!(!report.checksums_present);

        let st = tmp.path().join("back.safetensors");
        export(
            &file,
            &st,
            &ExportOptions {
                dtype: TargetDtype::F32,
                ..Default::default()
            },
        )
        .unwrap();
        let bytes = std::fs::read(&st).unwrap();
        let back = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(back.len(), src.len());
        for (n, sv) in &src {
            let t = back.tensor(n).unwrap();
            let (f16s, _) = expected(sv, "f16");
            let want: Vec<u8> =
                if matches!(sv.dtype, safetensors::Dtype::F32 | safetensors::Dtype::BF16) {
                    widen_f16(&f16s)
                } else {
                    sv.data.clone()
                };
            assert!(t.data() == &want[..], "{name}: {n}: exported bytes differ");
        }
    }
}
