//! Quantized output (`--quantize int8`, the seed's V2 schema): codes and scales equal an
//! independent numpy computation from the safetensors source, the seed's V2 loader
//! (reimplemented in Python from SEED-SYSTEM.md) reads back exactly what our reader
//! dequantizes, error figures equal an independent computation, and the rules (skips,
//! short last groups, zero tensors, NaN, split rows) hold.

mod common;

use std::path::Path;

use common::*;
use modelconv::{
    convert, export, ConvertConfig, Error, ExportOptions, ModelType, QuantScheme, Quantize,
    TargetDtype, WeightFile,
};

fn q(scheme: QuantScheme, group_size: u64) -> Quantize {
    Quantize {
        kind: modelconv::QuantType::Int8,
        scheme,
        group_size,
        skip: Vec::new(),
    }
}

fn cfg(quant: Quantize) -> ConvertConfig {
    ConvertConfig::builder()
        .model_type(ModelType::CausalLm)
        .quantize(Some(quant))
        .build()
        .unwrap()
}

/// Converts `model` with `quant`, exports the dequantized f32 values with our reader,
/// and runs the Python check (numpy codes + the seed's V2 loader) on both.
fn check_with_python(model: &Path, quant: Quantize, tmp: &Path) -> String {
    let out = tmp.join("o");
    let _ = std::fs::remove_dir_all(&out);
    convert(model, &out, &cfg(quant.clone())).unwrap();
    let st = tmp.join("dequantized.safetensors");
    let opts = ExportOptions {
        dtype: TargetDtype::F32,
        force: true,
        ..Default::default()
    };
    export(&out, &st, &opts).unwrap();
    let group = quant.group_size.to_string();
    let weights = out.join("weights.parquet");
    let mut args = vec![s(&weights), s(model), s(&st), quant.scheme.as_str(), &group];
    args.extend(quant.skip.iter().map(String::as_str));
    python_script("seed_loader_v2.py", &args)
}

#[test]
fn codes_and_scales_match_numpy_and_the_seed_loader_reads_what_we_read() {
    let tmp = tempdir();
    for name in FIXTURES {
        for scheme in [QuantScheme::Symmetric, QuantScheme::Asymmetric] {
            // Per channel, and groups of 100 (which divide no fixture tensor evenly:
            // every last group is shorter).
            for group in [0, 100] {
                let out = check_with_python(&fixture(name), q(scheme, group), tmp.path());
                assert!(out.starts_with("ok "), "{name}: {out}");
            }
        }
    }
}

#[test]
fn the_trained_minilm_quantizes_exactly_and_no_worse_than_the_seed() {
    let tmp = tempdir();
    for scheme in [QuantScheme::Symmetric, QuantScheme::Asymmetric] {
        let out = check_with_python(&minilm(), q(scheme, 0), tmp.path());
        assert_eq!(out.trim(), "ok 104 tensors, 39 quantized");
    }
    let skip = Quantize {
        skip: vec!["embeddings.*".into(), "*.output.dense.weight".into()],
        ..q(QuantScheme::Symmetric, 128)
    };
    let out = check_with_python(&minilm(), skip, tmp.path());
    assert_eq!(out.trim(), "ok 104 tensors, 25 quantized");
}

#[test]
fn error_figures_equal_an_independent_computation() {
    let tmp = tempdir();
    let out = tmp.path().join("o");
    let r = convert(minilm(), &out, &cfg(q(QuantScheme::Symmetric, 0))).unwrap();
    let report = r.quantization.expect("a quantization report");
    let src = read_source(&minilm());
    let wf = WeightFile::open(&out).unwrap();
    let (mut all_x2, mut all_e2) = (0f64, 0f64);
    for t in &report.tensors {
        let x: Vec<f64> = src[&t.name]
            .data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect();
        let back = wf.tensor_f32(&t.name).unwrap();
        let (mut x2, mut e2, mut mx) = (0f64, 0f64, 0f64);
        for (a, b) in x.iter().zip(&back) {
            let e = a - *b as f64;
            x2 += a * a;
            e2 += e * e;
            mx = f64::max(mx, e.abs());
        }
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(b.abs());
        assert!(close(t.rel_rms, (e2 / x2).sqrt()), "{}", t.name);
        assert!(close(t.sqnr_db, 10.0 * (x2 / e2).log10()), "{}", t.name);
        assert_eq!(t.max_abs_error, mx, "{}", t.name);
        all_x2 += x2;
        all_e2 += e2;
    }
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(b.abs());
    assert!(close(
        report.model.sqnr_db,
        10.0 * (all_x2 / all_e2).log10()
    ));
    assert_eq!(report.quantized_tensors, 39);
    assert_eq!(report.unquantized_tensors, 65);
    assert!(
        report
            .tensors
            .windows(2)
            .all(|w| w[0].sqnr_db <= w[1].sqnr_db),
        "worst first"
    );
    // metadata.json carries the same report.
    let m = metadata(&out);
    assert_eq!(m["quantization"]["quantized_tensors"], 39);
    assert_eq!(
        m["quantization"]["tensors"][0]["name"],
        report.tensors[0].name.as_str()
    );
    // verify re-quantizes from the source and finds the same codes and scales.
    let v = assert_verifies(&out, &minilm());
    let worst = v
        .checks
        .iter()
        .filter_map(|c| c.quant.as_ref())
        .min_by(|a, b| a.sqnr_db.total_cmp(&b.sqnr_db))
        .unwrap();
    assert_eq!(worst.name, report.tensors[0].name);
    assert!((worst.sqnr_db - report.tensors[0].sqnr_db).abs() < 1e-9);
}

#[test]
fn zero_tensors_get_scale_one_and_nan_is_refused_by_name() {
    let tmp = tempdir();
    let model = tmp.path().join("m.safetensors");
    let zeros = vec![0u8; 64 * 64 * 4];
    let mut bad: Vec<u8> = (0..64 * 64)
        .flat_map(|i| (i as f32 * 1e-3).to_le_bytes())
        .collect();
    bad[400..404].copy_from_slice(&f32::NAN.to_le_bytes());
    write_safetensors(
        &model,
        &[("model.layers.0.zero", "F32", vec![64, 64], zeros.clone())],
    );
    let out = tmp.path().join("o");
    convert(&model, &out, &cfg(q(QuantScheme::Asymmetric, 0))).unwrap();
    let t = WeightFile::open(&out)
        .unwrap()
        .tensor("model.layers.0.zero")
        .unwrap();
    let qd = t.quant.unwrap();
    assert_eq!(t.data, vec![0u8; 64 * 64]);
    assert_eq!(qd.scales, vec![1.0; 64]);
    assert_eq!(qd.zero_points, vec![0.0; 64]);
    write_safetensors(
        &model,
        &[
            ("model.layers.0.zero", "F32", vec![64, 64], zeros),
            ("model.layers.0.bad", "F32", vec![64, 64], bad),
        ],
    );
    let out = tmp.path().join("o2");
    let err = convert(&model, &out, &cfg(q(QuantScheme::Symmetric, 0))).unwrap_err();
    assert!(matches!(err, Error::Quantization { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "{}: tensor `model.layers.0.bad`: cannot quantize: it holds 1 NaN or infinite value \
             (no scale represents them); skip it with a quantize-skip glob",
            model.display()
        )
    );
    assert!(!out.join("weights.parquet").exists());
}

#[test]
fn unquantized_rows_keep_the_cast_rules_overflow_included() {
    let tmp = tempdir();
    let model = tmp.path().join("m.safetensors");
    // A bf16 bias too large for f16: unquantized (rank 1), so the overflow rule applies.
    let big = half::bf16::from_f32(-2.0e5).to_le_bytes().to_vec();
    write_safetensors(&model, &[("model.layers.0.bias", "BF16", vec![1], big)]);
    let err = convert(
        &model,
        tmp.path().join("o"),
        &cfg(q(QuantScheme::Symmetric, 0)),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Overflow { .. }), "{err}");
}

#[test]
fn split_quantized_tensors_keep_whole_units_per_row_and_read_back() {
    let tmp = tempdir();
    let out = tmp.path().join("o");
    // 3000-byte rows: the 512×64 embedding (64-element channels) splits into rows of
    // 46 channels; groups of 100 into rows of 30 groups.
    for group in [0u64, 100] {
        let _ = std::fs::remove_dir_all(&out);
        let config = ConvertConfig::builder()
            .model_type(ModelType::CausalLm)
            .max_row_bytes(3000)
            .row_group_bytes(8192)
            .quantize(Some(q(QuantScheme::Symmetric, group)))
            .build()
            .unwrap();
        convert(fixture("tiny-llama-sharded-bf16"), &out, &config).unwrap();
        let wf = WeightFile::open(&out).unwrap();
        let info = wf.info("model.embed_tokens.weight").unwrap();
        let unit = if group > 0 { group } else { 64 };
        assert_eq!(info.rows, 32768u64.div_ceil(3000 / unit * unit));
        // Reassembled: the same as an unsplit conversion.
        let whole = tmp.path().join("whole");
        let _ = std::fs::remove_dir_all(&whole);
        convert(
            fixture("tiny-llama-sharded-bf16"),
            &whole,
            &cfg(q(QuantScheme::Symmetric, group)),
        )
        .unwrap();
        let a = wf.tensor("model.embed_tokens.weight").unwrap();
        let b = WeightFile::open(&whole)
            .unwrap()
            .tensor("model.embed_tokens.weight")
            .unwrap();
        assert_eq!(a, b, "group {group}");
        assert_verifies(&out, &fixture("tiny-llama-sharded-bf16"));
    }
}

#[test]
fn a_changed_scale_is_caught_by_verify() {
    let tmp = tempdir();
    let out = tmp.path().join("o");
    convert(
        fixture("tiny-bert"),
        &out,
        &cfg(q(QuantScheme::Symmetric, 0)),
    )
    .unwrap();
    // Rewrite the file with one scale changed, through pyarrow (checksums cover `data`
    // only, so only the comparison with the source can notice).
    let script = r#"
import sys, pyarrow as pa, pyarrow.parquet as pq, numpy as np
p = sys.argv[1]
f = pq.ParquetFile(p)
t = f.read()
rows = t.column("scales").to_pylist()
i = next(k for k, s in enumerate(rows) if s)
s = np.frombuffer(rows[i], np.float32).copy(); s[0] *= 2
rows[i] = s.tobytes()
t = t.set_column(t.schema.get_field_index("scales"), "scales", pa.array(rows, pa.binary()))
t = t.replace_schema_metadata({k: v for k, v in f.metadata.metadata.items() if k != b"ARROW:schema"})
pq.write_table(t, p)
print(t.column("layer_name")[i])
"#;
    let stdout = python_ok(&["-c", script, s(&out.join("weights.parquet"))]);
    let name = stdout.trim().to_string();
    let v = modelconv::verify(
        &out,
        Some(&open_source(&fixture("tiny-bert"))),
        &Default::default(),
    )
    .unwrap();
    let failed: Vec<_> = v.failures().map(|c| c.name.clone()).collect();
    assert_eq!(failed, vec![name]);
}

#[test]
fn a_v1_conversion_is_unchanged_by_the_v2_code() {
    // Without --quantize the schema is exactly V1 + our two columns.
    let tmp = tempdir();
    let out = tmp.path().join("o");
    convert(fixture("tiny-bert"), &out, &ConvertConfig::default()).unwrap();
    let wf = WeightFile::open(&out).unwrap();
    let names: Vec<String> = wf
        .parquet_metadata()
        .file_metadata()
        .schema_descr()
        .columns()
        .iter()
        .map(|c| c.path().string())
        .collect();
    assert_eq!(
        names,
        [
            "layer_name",
            "shape.list.item",
            "dtype",
            "data",
            "num_params",
            "chunk_offset",
            "checksum"
        ]
    );
    assert!(wf.tensors().iter().all(|t| t.quant.is_none()));
    let m = metadata(&out);
    assert!(m.get("quantization").is_none());
    assert!(m["conversion_config"].get("quantization").is_none());
}

#[test]
fn v2_files_written_by_the_seeds_quantizer_read_back_dequantized() {
    // A V2 file as the seed's quantizer writes it (pyarrow, no footer index, original
    // dtypes in `dtype`): per-channel, per-group and per-tensor-free int8 rows and an
    // fp16 row; the expected floats come from the seed's formula in numpy.
    let tmp = tempdir();
    let path = tmp.path().join("seed-v2.parquet");
    let script = r#"
import sys, json, numpy as np, pyarrow as pa, pyarrow.parquet as pq
rng = np.random.default_rng(1)
rows, want = [], {}
def add(name, shape, q, scales, zps, axis, group):
    q = np.asarray(q, np.int8); s = np.asarray(scales, np.float32); z = np.asarray(zps, np.float32)
    rows.append((name, list(shape), "torch.float32", q.tobytes(), int(np.prod(shape)), "int8", s.tobytes(), z.tobytes(), axis, group))
    f = q.astype(np.float32).reshape(-1)
    if group > 0:
        idx = np.arange(f.size) // group
        x = (f - z[idx]) * s[idx]
    else:
        x = ((f.reshape(shape[0], -1) - z[:, None]) * s[:, None]).reshape(-1)
    want[name] = [int(v) for v in x.astype(np.float32).view(np.uint32)]
add("w", (4, 3), rng.integers(-128, 128, 12), rng.random(4) / 100, [0, 3, -5, 0], 0, 0)
add("g", (5,), rng.integers(-128, 128, 5), rng.random(3) / 100, [1, 0, -2], -1, 2)
b = np.array([0.5, -1.25, 3.0], np.float16)
rows.append(("b", [3], "torch.float16", b.tobytes(), 3, "fp16", b"", b"", -1, 0))
want["b"] = [int(v) for v in b.astype(np.float32).view(np.uint32)]
cols = list(zip(*rows))
t = pa.table({"layer_name": pa.array(cols[0]), "shape": pa.array(cols[1], pa.list_(pa.int32())),
              "dtype": pa.array(cols[2]), "data": pa.array(cols[3], pa.binary()),
              "num_params": pa.array(cols[4], pa.int64()), "quant_type": pa.array(cols[5]),
              "scales": pa.array(cols[6], pa.binary()), "zero_points": pa.array(cols[7], pa.binary()),
              "quant_axis": pa.array(cols[8], pa.int32()), "group_size": pa.array(cols[9], pa.int32())})
pq.write_table(t, sys.argv[1])
print(json.dumps(want))
"#;
    let stdout = python_ok(&["-c", script, s(&path)]);
    let want: std::collections::BTreeMap<String, Vec<u32>> = serde_json::from_str(&stdout).unwrap();
    let wf = WeightFile::open(&path).unwrap();
    assert!(!wf.has_index());
    for (name, bits) in want {
        let got: Vec<u32> = wf
            .tensor_f32(&name)
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        assert_eq!(got, bits, "{name}");
    }
    let g = wf.info("g").unwrap();
    assert_eq!(g.quant.unwrap().scales, 3, "5 elements in groups of 2");
}
