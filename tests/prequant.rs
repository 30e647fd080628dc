//! Pre-quantized checkpoints (FP8, GPTQ, AWQ, compressed-tensors, MXFP4): every
//! dequantized value equals the fixture's reference (computed by torch, numpy packing
//! or transformers in `tests/fixtures/make_prequant_fixtures.py`, never by modelconv)
//! rounded once to the target; int8 re-quantization equals an independent computation;
//! malformed inputs are refused through the real binary with their exact text and
//! nothing left behind (RELIABILITY rows 45–48).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::prequant::{self, cfg, edit, int8, model, refused_with_error_line, round_exact};
use common::*;
use modelconv::{convert, ConvertConfig, QuantScheme, Quantize, TargetDtype, WeightFile};

/// Every scheme fixture.
const SCHEMES: &[&str] = &[
    "fp8-block",
    "fbgemm-fp8",
    "ct-fp8-int8",
    "gptq-4bit-desc-act",
    "gptq-4bit",
    "gptq-3bit",
    "gptq-8bit-v2",
    "gptq-2bit",
    "awq",
    "ct-w4a16",
    "ct-w4-asym-actorder",
    "ct-w3-asym",
    "mxfp4",
    // Made by compressed-tensors' own compressor (make_carry_fixtures.py).
    "ct-w8a8-int",
    "ct-w4a16-g128",
];

/// Stored names a scheme consumes or drops (they never appear in the output).
const COMPONENTS: &[&str] = &[
    ".qweight",
    ".qzeros",
    ".scales",
    ".g_idx",
    ".weight_scale",
    ".weight_scale_inv",
    ".weight_zero_point",
    ".weight_packed",
    ".weight_shape",
    ".weight_g_idx",
    ".input_scale",
    "_blocks",
    "_scales",
];

/// The fixture's reference: every dequantized weight as f32 values.
fn reference(name: &str) -> BTreeMap<String, Vec<f32>> {
    prequant::reference(name)
        .into_iter()
        .map(|(n, (_, x))| (n, x))
        .collect()
}

/// The fixture's reference shapes.
fn reference_shapes(name: &str) -> BTreeMap<String, Vec<u64>> {
    prequant::reference(name)
        .into_iter()
        .map(|(n, (shape, _))| (n, shape))
        .collect()
}

/// The stored tensors of `name` that are converted as they are.
fn plain_tensors(name: &str) -> BTreeMap<String, Src> {
    let refs = reference(name);
    read_source(&model(name))
        .into_iter()
        .filter(|(n, _)| !refs.contains_key(n) && !COMPONENTS.iter().any(|c| n.ends_with(c)))
        .collect()
}

#[test]
fn every_scheme_dequantizes_to_the_reference_rounded_once_bit_for_bit() {
    let tmp = tempdir();
    for name in SCHEMES {
        let refs = reference(name);
        let shapes = reference_shapes(name);
        let plain = plain_tensors(name);
        for (target, dtype, torch) in [
            ("f16", TargetDtype::F16, "torch.float16"),
            ("bf16", TargetDtype::Bf16, "torch.bfloat16"),
            ("f32", TargetDtype::F32, "torch.float32"),
        ] {
            let out = tmp.path().join(format!("{name}-{target}"));
            let r = convert(model(name), &out, &cfg(dtype)).unwrap();
            assert_eq!(r.tensors, refs.len() + plain.len(), "{name}: tensor count");
            let wf = WeightFile::open(&out).unwrap();
            for (n, x) in &refs {
                let t = wf.tensor(n).unwrap_or_else(|e| panic!("{name} {n}: {e}"));
                assert_eq!(t.dtype.torch_name(), torch, "{name} {n}");
                assert_eq!(t.shape, shapes[n], "{name} {n}: shape");
                assert!(
                    t.data == round_exact(x, target),
                    "{name} {n}: values differ from the reference in {target}"
                );
            }
            for (n, src) in &plain {
                let t = wf.tensor(n).unwrap();
                assert!(
                    t.data == expected(src, target).0,
                    "{name} {n}: plain tensor"
                );
            }
        }
    }
}

#[test]
fn keep_is_the_checkpoints_compute_dtype() {
    let tmp = tempdir();
    for (name, torch, target) in [
        ("fp8-block", "torch.bfloat16", "bf16"),
        ("mxfp4", "torch.bfloat16", "bf16"),
        ("gptq-4bit-desc-act", "torch.float16", "f16"),
        ("awq", "torch.float16", "f16"),
    ] {
        let out = tmp.path().join(name);
        convert(model(name), &out, &cfg(TargetDtype::Keep)).unwrap();
        let wf = WeightFile::open(&out).unwrap();
        for (n, x) in reference(name) {
            let t = wf.tensor(&n).unwrap();
            assert_eq!(t.dtype.torch_name(), torch, "{name} {n}");
            assert!(t.data == round_exact(&x, target), "{name} {n}");
        }
        assert_verifies(&out, &model(name));
    }
}

#[test]
fn verify_source_dequantizes_the_same_way_and_catches_a_changed_scale() {
    let tmp = tempdir();
    for name in SCHEMES {
        let out = tmp.path().join(name);
        convert(model(name), &out, &cfg(TargetDtype::F16)).unwrap();
        let v = assert_verifies(&out, &model(name));
        assert!(v.compared_with_source);
    }
    // The same file against a source whose one scale differs: that weight mismatches.
    let src = copy_dir(&model("fp8-block"), &tmp.path().join("changed"));
    rewrite(&src.join("model.safetensors"), |n, d| {
        if n == "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv" {
            d[0..4].copy_from_slice(&0.5f32.to_le_bytes());
        }
    });
    let report = modelconv::verify(
        tmp.path().join("fp8-block"),
        Some(&open_source(&src)),
        &Default::default(),
    )
    .unwrap();
    let failed: Vec<&str> = report.failures().map(|c| c.name.as_str()).collect();
    assert_eq!(
        failed,
        ["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    );
}

#[test]
fn int8_requantizes_the_dequantized_values_in_one_pass() {
    let tmp = tempdir();
    for name in [
        "fp8-block",
        "gptq-4bit-desc-act",
        "mxfp4",
        "ct-w4a16",
        "ct-w3-asym",
    ] {
        for group in [0u64, 32] {
            let out = tmp.path().join(format!("{name}-{group}"));
            let q = Quantize {
                kind: modelconv::QuantType::Int8,
                scheme: QuantScheme::Symmetric,
                group_size: group,
                skip: vec![],
            };
            let c = ConvertConfig::builder().quantize(Some(q)).build().unwrap();
            let r = convert(model(name), &out, &c).unwrap();
            let report = r.quantization.unwrap();
            let wf = WeightFile::open(&out).unwrap();
            let shapes = reference_shapes(name);
            let mut checked = 0;
            for (n, x) in reference(name) {
                // Carried weights are their own codes (tests/quant_carry.rs).
                if x.len() < modelconv::MIN_QUANT_ELEMENTS as usize || report.carried.contains(&n) {
                    continue;
                }
                let unit = if group > 0 {
                    group as usize
                } else {
                    x.len() / shapes[&n][0] as usize
                };
                let (codes, scales) = int8(&x, unit);
                let t = wf.tensor(&n).unwrap();
                let qd = t
                    .quant
                    .as_ref()
                    .unwrap_or_else(|| panic!("{name} {n} not quantized"));
                let got: Vec<i8> = t.data.iter().map(|&b| b as i8).collect();
                assert!(got == codes, "{name} {n} group {group}: codes");
                assert_eq!(qd.scales, scales, "{name} {n} group {group}: scales");
                // The error report measures against the dequantized source.
                let back: Vec<f64> = codes
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| (c as f32 * scales[i / unit]) as f64)
                    .collect();
                let mx = x
                    .iter()
                    .zip(&back)
                    .fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
                let e = report.tensors.iter().find(|e| e.name == n).unwrap();
                assert_eq!(e.max_abs_error, mx, "{name} {n}: max error");
                checked += 1;
            }
            assert!(checked > 0, "{name}: nothing quantized");
            assert_verifies(&out, &model(name));
        }
    }
}

#[test]
fn metadata_records_the_scheme_and_what_was_dequantized_or_dropped() {
    let tmp = tempdir();
    let out = tmp.path().join("o");
    convert(model("fbgemm-fp8"), &out, &cfg(TargetDtype::F16)).unwrap();
    let m = metadata(&out);
    let q = &m["source_quantization"];
    assert_eq!(q["method"], "fbgemm_fp8");
    assert_eq!(q["kept_quantized"], false);
    assert_eq!(q["config"]["activation_scale_ub"], 1200.0);
    assert_eq!(
        q["dequantized"][0]["consumes"],
        serde_json::json!([
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.q_proj.weight_scale"
        ])
    );
    assert_eq!(q["dequantized"][0]["stored_dtype"], "F8_E4M3");
    assert_eq!(
        q["dropped"][0]["name"],
        "model.layers.0.self_attn.q_proj.input_scale"
    );
    // The seed's tensor list names the dequantized weight with its f16 dtype.
    let layers = m["layers"].as_array().or_else(|| m["tensors"].as_array());
    let text = m.to_string();
    assert!(
        text.contains("model.layers.0.self_attn.q_proj.weight"),
        "{layers:?}"
    );
}

#[test]
fn dry_run_and_source_inspect_show_each_weights_scheme_and_what_it_consumes() {
    let o = modelconv(&["convert", s(&model("fp8-block")), "--dry-run"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("quantized    fp8 (F8_E4M3, F8_E5M2, 128×128 blocks)"),
        "{text}"
    );
    assert!(
        text.contains(
            "dequantized (fp8) from model.layers.0.self_attn.q_proj.weight + model.layers.0.self_attn.q_proj.weight_scale_inv"
        ),
        "{text}"
    );
    let o = modelconv(&["inspect", s(&model("gptq-4bit-desc-act"))]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("quantized    gptq (4-bit, group 32, asymmetric, desc_act, gptq)"),
        "{text}"
    );
    assert!(
        text.contains("model.layers.0.mlp.down_proj.weight") && text.contains("[96, 192]"),
        "{text}"
    );
}

#[test]
fn keep_quantized_writes_the_stored_tensors_with_a_warning() {
    let tmp = tempdir();
    let out = tmp.path().join("o");
    let o = modelconv(&[
        "convert",
        s(&model("fp8-block")),
        "-o",
        s(&out),
        "--keep-quantized",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--keep-quantized: tensors are written as stored, dtypes F8_E4M3, F8_E5M2 included, 6 quantized weights as their packed codes and scales; the seed's loader cannot use them"),
        "{err}"
    );
    let src = read_source(&model("fp8-block"));
    let wf = WeightFile::open(&out).unwrap();
    assert_eq!(wf.tensors().len(), src.len());
    for (n, t) in &src {
        let got = wf.tensor(n).unwrap();
        // fp8 codes and f32 scales copied as they are (f32 scales cast like any f32),
        // the bf16 tensors cast as usual.
        let want = match t.dtype {
            safetensors::Dtype::F8_E4M3 | safetensors::Dtype::F8_E5M2 | safetensors::Dtype::U8 => {
                t.data.clone()
            }
            _ => expected(t, "f16").0,
        };
        assert!(got.data == want, "{n}");
    }
    let q = wf.tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(q.dtype.torch_name(), "torch.float8_e4m3fn");
    let m = metadata(&out);
    assert_eq!(m["source_quantization"]["kept_quantized"], true);
    assert_verifies(&out, &model("fp8-block"));
}

/// Rewrites a safetensors file in place, letting `f` change each tensor's bytes.
fn rewrite(path: &Path, mut f: impl FnMut(&str, &mut Vec<u8>)) {
    edit(path, |tensors| {
        for (n, _, _, d) in tensors.iter_mut() {
            f(n, d);
        }
    });
}

#[test]
fn malformed_prequantized_inputs_are_refused_by_name_and_leave_nothing() {
    let tmp = tempdir();
    let case = |name: &str, from: &str| {
        let d = tmp.path().join(name);
        copy_dir(&model(from), &d);
        d
    };
    let kv = "model.layers.0.self_attn.kv_a_proj_with_mqa";

    // A scale of the wrong shape.
    let d = case("shape", "fp8-block");
    edit(&d.join("model.safetensors"), |t| {
        let e = t
            .iter_mut()
            .find(|e| e.0 == format!("{kv}.weight_scale_inv"))
            .unwrap();
        e.2 = vec![3, 2];
    });
    refused_with_error_line(&d, tmp.path(), &format!(
        "{}: tensor `{kv}.weight_scale_inv`: pre-quantized (fp8): the scale has shape [3, 2]; the weight `{kv}.weight` [200, 300] with 128×128 blocks needs [2, 3]",
        d.join("model.safetensors").display()
    ));

    // A missing scale.
    let d = case("missing", "fp8-block");
    edit(&d.join("model.safetensors"), |t| {
        t.retain(|e| e.0 != "model.layers.0.self_attn.q_proj.weight_scale_inv")
    });
    refused_with_error_line(&d, tmp.path(), &format!(
        "{}: tensor `model.layers.0.self_attn.q_proj.weight`: pre-quantized (fp8): its `weight_scale_inv` is missing",
        d.join("model.safetensors").display()
    ));

    // A NaN and an infinite scale.
    for (what, v) in [("NaN", f32::NAN), ("inf", f32::INFINITY)] {
        let d = case(what, "fp8-block");
        rewrite(&d.join("model.safetensors"), |n, b| {
            if n == format!("{kv}.weight_scale_inv") {
                b[4..8].copy_from_slice(&v.to_le_bytes());
            }
        });
        refused_with_error_line(&d, tmp.path(), &format!(
            "{}: tensor `{kv}.weight_scale_inv`: pre-quantized (fp8): (for `{kv}.weight`) scale 1 is {what} (stored F32); no weight is dequantized from a NaN or infinite scale",
            d.join("model.safetensors").display()
        ));
    }

    // g_idx past the group count.
    let d = case("gidx", "gptq-4bit-desc-act");
    let layer = "model.layers.0.self_attn.q_proj";
    rewrite(&d.join("model.safetensors"), |n, b| {
        if n == format!("{layer}.g_idx") {
            b[20..24].copy_from_slice(&99i32.to_le_bytes());
        }
    });
    refused_with_error_line(&d, tmp.path(), &format!(
        "{}: tensor `{layer}.g_idx`: pre-quantized (gptq): (for `{layer}.weight`) entry 5 is 99, outside the 4 groups",
        d.join("model.safetensors").display()
    ));

    // MXFP4 blocks and scales that disagree, and an E8M0 NaN scale.
    let d = case("mx-shape", "mxfp4");
    let base = "model.layers.0.mlp.experts.down_proj";
    edit(&d.join("model.safetensors"), |t| {
        let e = t
            .iter_mut()
            .find(|e| e.0 == format!("{base}_scales"))
            .unwrap();
        e.2 = vec![4, 32, 2];
    });
    refused_with_error_line(&d, tmp.path(), &format!(
        "{}: tensor `{base}_scales`: pre-quantized (mxfp4): the scales have shape [4, 32, 2]; one scale per block of 32 needs [4, 64, 1]",
        d.join("model.safetensors").display()
    ));
    let d = case("mx-nan", "mxfp4");
    rewrite(&d.join("model.safetensors"), |n, b| {
        if n == format!("{base}_scales") {
            b[3] = 255;
        }
    });
    refused_with_error_line(&d, tmp.path(), &format!(
        "{}: tensor `{base}_scales`: pre-quantized (mxfp4): (for `{base}`) scale [0, 3, 0] is 255, E8M0's NaN; no weight is dequantized from a NaN scale (stored U8)",
        d.join("model.safetensors").display()
    ));

    // A config naming a scheme its tensors don't have.
    let d = case("no-tensors", "awq");
    edit_json(
        &d.join("config.json"),
        |c| {
            c["quantization_config"] =
                serde_json::json!({"quant_method": "fp8", "weight_block_size": [128, 128]})
        },
    );
    refused_with_error_line(&d, tmp.path(), &format!(
        "{}: tensor `model.layers.0.mlp.gate_proj.qweight`: pre-quantized (fp8): a GPTQ/AWQ packed weight (I32) that the declared scheme `fp8` does not explain; nothing is converted raw",
        d.join("model.safetensors").display()
    ));
    let plain = tmp.path().join("plain");
    copy_dir(&fixture("tiny-llama-sharded-bf16"), &plain);
    edit_json(&plain.join("config.json"), |c| {
        c["quantization_config"] = serde_json::json!({"quant_method": "gptq", "bits": 4})
    });
    refused_with_error_line(&plain, tmp.path(), &format!(
        "{}: pre-quantized (gptq): config.json declares `gptq` but no tensor has its layout (`X.qweight` with `X.scales`, `X.qzeros`, `X.g_idx`)",
        plain.join("config.json").display()
    ));

    // Tensors of a scheme with no config.
    let d = case("no-config", "fp8-block");
    edit_json(&d.join("config.json"), |c| {
        c.as_object_mut().unwrap().remove("quantization_config");
    });
    // The first tensor in file order that only a scheme explains.
    refused_with_error_line(&d, tmp.path(), &format!(
        "{}: tensor `model.layers.0.mlp.experts.gate_proj.weight_scale_inv`: pre-quantized (none): an FP8 block scale (F32), but no config.json `quantization_config` declares a scheme; nothing is converted raw (--keep-quantized writes the stored tensors as they are)",
        d.join("model.safetensors").display()
    ));

    // Schemes that are not supported: refused by name, never converted raw.
    let d = case("hqq", "fbgemm-fp8");
    edit_json(&d.join("config.json"), |c| {
        c["quantization_config"] = serde_json::json!({"quant_method": "hqq"})
    });
    refused_with_error_line(&d, tmp.path(), &format!(
        "{}: tensor `model.layers.0.self_attn.q_proj.weight_scale`: pre-quantized (hqq): quant_method `hqq` is not supported (supported: fp8, fbgemm_fp8, modelopt (FP8, NVFP4, MXFP8, MIXED_PRECISION), compressed-tensors, gptq, awq, mxfp4, bitsandbytes); nothing is converted raw",
        d.join("config.json").display()
    ));

    // A sub-byte dtype no scheme consumes.
    let d = tmp.path().join("f4");
    std::fs::create_dir_all(&d).unwrap();
    write_safetensors(
        &d.join("model.safetensors"),
        &[("x.weight", "F4", vec![4, 8], vec![0x21; 16])],
    );
    refused_with_error_line(&d, tmp.path(), &format!(
        "{}: tensor `x.weight`: pre-quantized (none): a sub-byte float tensor (F4), but no config.json `quantization_config` declares a scheme; nothing is converted raw (--keep-quantized writes the stored tensors as they are)",
        d.join("model.safetensors").display()
    ));
}

#[test]
fn the_seed_loader_reads_a_converted_fp8_checkpoint_with_its_own_dtype_table() {
    let tmp = tempdir();
    for name in ["fp8-block", "mxfp4", "gptq-4bit-desc-act"] {
        let out = tmp.path().join(name);
        convert(model(name), &out, &cfg(TargetDtype::F16)).unwrap();
        let reference_file = fixture("prequant").join(format!("{name}.reference.safetensors"));
        let text = python_script(
            "seed_loader_prequant.py",
            &[s(&out.join("weights.parquet")), s(&reference_file)],
        );
        let refs = reference(name).len();
        assert!(
            text.contains(&format!("{refs} dequantized weights equal the reference")),
            "{text}"
        );
    }
}

#[test]
fn weights_split_over_many_rows_dequantize_the_same() {
    // A row limit of 600 bytes cuts every weight into rows of a few output rows (whole
    // output rows where one fits, else mid-row): MXFP4's partial groups, the transposed
    // kernels' partial tiles and the grid's partial blocks all run.
    let tmp = tempdir();
    for name in SCHEMES {
        let out = tmp.path().join(name);
        let c = ConvertConfig::builder()
            .max_row_bytes(600)
            .row_group_bytes(4096)
            .build()
            .unwrap();
        convert(model(name), &out, &c).unwrap();
        let wf = WeightFile::open(&out).unwrap();
        let mut split = 0;
        for (n, x) in reference(name) {
            let t = wf.tensor(&n).unwrap();
            assert!(t.data == round_exact(&x, "f16"), "{name} {n}");
            split += (wf.info(&n).unwrap().rows > 1) as usize;
        }
        assert!(split > 0, "{name}: nothing was split");
        assert_verifies(&out, &model(name));
    }
}
