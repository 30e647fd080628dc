//! NVFP4 (ModelOpt and compressed-tensors), MXFP4 and MXFP8 (compressed-tensors),
//! ModelOpt MXFP8 and MIXED_PRECISION: every dequantized value equals the fixture's
//! reference (the producing library's own dequantizer, f32 output, in
//! `tests/fixtures/make_fp4_fixtures.py`; never modelconv) rounded once to the target;
//! malformed inputs are refused through the real binary with their exact text and
//! nothing left behind.
//!
//! FP4 code 8 is −0: compressed-tensors and vLLM decode it as −0.0 (so does modelconv),
//! ModelOpt's table as +0.0, so values are compared with ±0 equal.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::prequant::{
    cfg, edit, int8, model, plus_zero, reference, refused_with_error_line, round, Entry,
};
use common::*;
use modelconv::{convert, ConvertConfig, QuantScheme, Quantize, TargetDtype, WeightFile};

/// Every fixture, with the fixture whose reference it has.
const FIXTURES: &[(&str, &str)] = &[
    ("ct-nvfp4", "ct-nvfp4"),
    ("ct-nvfp4-0dim", "ct-nvfp4-0dim"),
    ("ct-mxfp4", "ct-mxfp4"),
    ("ct-mxfp8", "ct-mxfp8"),
    ("modelopt-nvfp4", "modelopt-nvfp4"),
    ("modelopt-nvfp4-sidefile", "modelopt-nvfp4"),
    ("modelopt-fp8", "modelopt-fp8"),
    ("modelopt-mxfp8", "modelopt-mxfp8"),
    ("modelopt-mixed", "modelopt-mixed"),
];

/// Stored names the schemes consume or drop (never in the output).
const COMPONENTS: &[&str] = &[
    ".weight_packed",
    ".weight_scale",
    ".weight_scale_2",
    ".weight_global_scale",
    ".input_global_scale",
    ".input_scale",
];

#[test]
fn every_fp4_and_mx_fixture_dequantizes_to_the_reference_rounded_once() {
    let tmp = tempdir();
    for &(name, refname) in FIXTURES {
        let refs = reference(refname);
        let plain: BTreeMap<String, Src> = read_source(&model(name))
            .into_iter()
            .filter(|(n, _)| !refs.contains_key(n) && !COMPONENTS.iter().any(|c| n.ends_with(c)))
            .collect();
        for (target, dtype, torch) in [
            ("f16", TargetDtype::F16, "torch.float16"),
            ("bf16", TargetDtype::Bf16, "torch.bfloat16"),
            ("f32", TargetDtype::F32, "torch.float32"),
        ] {
            let out = tmp.path().join(format!("{name}-{target}"));
            let r = convert(model(name), &out, &cfg(dtype)).unwrap();
            assert_eq!(r.tensors, refs.len() + plain.len(), "{name}: tensor count");
            let wf = WeightFile::open(&out).unwrap();
            for n in wf.tensors().iter().map(|i| &i.name) {
                assert!(
                    !COMPONENTS.iter().any(|c| n.ends_with(c)),
                    "{name}: component {n} in the output"
                );
            }
            for (n, (shape, x)) in &refs {
                let t = wf.tensor(n).unwrap_or_else(|e| panic!("{name} {n}: {e}"));
                assert_eq!(t.dtype.torch_name(), torch, "{name} {n}");
                assert_eq!(&t.shape, shape, "{name} {n}: shape");
                let width = if target == "f32" { 4 } else { 2 };
                assert!(
                    plus_zero(&t.data, width) == round(x, target),
                    "{name} {n}: values differ from the reference in {target}"
                );
            }
            for (n, src) in &plain {
                let t = wf.tensor(n).unwrap();
                assert!(t.data == expected(src, target).0, "{name} {n}: plain");
            }
        }
        assert!(refs.len() >= 4, "{name}: {} quantized weights", refs.len());
    }
}

#[test]
fn verify_source_dequantizes_the_fp4_and_mx_fixtures_the_same_way() {
    let tmp = tempdir();
    for &(name, _) in FIXTURES {
        let out = tmp.path().join(name);
        convert(model(name), &out, &cfg(TargetDtype::F16)).unwrap();
        let v = assert_verifies(&out, &model(name));
        assert!(v.compared_with_source, "{name}");
    }
}

#[test]
fn weights_split_mid_group_and_mid_byte_dequantize_the_same() {
    // Rows of 31 f16 values, shorter than every output row (32 or 128 values): pieces
    // start at odd elements (the high nibble of a byte) and inside groups of 16 and 32.
    let tmp = tempdir();
    for &(name, refname) in FIXTURES {
        let out = tmp.path().join(name);
        let c = ConvertConfig::builder()
            .max_row_bytes(62)
            .row_group_bytes(4096)
            .build()
            .unwrap();
        convert(model(name), &out, &c).unwrap();
        let wf = WeightFile::open(&out).unwrap();
        for (n, (_, x)) in reference(refname) {
            let t = wf.tensor(&n).unwrap();
            assert!(plus_zero(&t.data, 2) == round(&x, "f16"), "{name} {n}");
            let rows = wf.info(&n).unwrap().rows;
            assert_eq!(rows, x.len().div_ceil(31) as u64, "{name} {n}: rows");
        }
        assert_verifies(&out, &model(name));
    }
}

#[test]
fn the_schemes_are_recognised_with_their_summaries() {
    let tmp = tempdir();
    for (name, method, summary) in [
        (
            "ct-nvfp4",
            "compressed-tensors",
            "compressed-tensors (nvfp4-pack-quantized, float 4-bit tensor_group 16)",
        ),
        (
            "ct-mxfp4",
            "compressed-tensors",
            "compressed-tensors (mxfp4-pack-quantized, float 4-bit group 32)",
        ),
        (
            "ct-mxfp8",
            "compressed-tensors",
            "compressed-tensors (mxfp8-quantized, float 8-bit group 32)",
        ),
        ("modelopt-nvfp4", "modelopt", "modelopt (NVFP4)"),
        ("modelopt-nvfp4-sidefile", "modelopt", "modelopt (NVFP4)"),
        ("modelopt-fp8", "modelopt", "modelopt (FP8)"),
        ("modelopt-mxfp8", "modelopt", "modelopt (MXFP8)"),
        (
            "modelopt-mixed",
            "modelopt",
            "modelopt (MIXED_PRECISION: NVFP4, FP8)",
        ),
    ] {
        let out = tmp.path().join(name);
        convert(model(name), &out, &cfg(TargetDtype::F16)).unwrap();
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("metadata.json")).unwrap()).unwrap();
        let q = &m["source_quantization"];
        assert_eq!(q["method"], method, "{name}: {q}");
        assert_eq!(q["summary"], summary, "{name}: {q}");
    }
}

#[test]
fn int8_requantizes_the_dequantized_fp4_and_mx_values() {
    let tmp = tempdir();
    for &(name, refname) in FIXTURES {
        let out = tmp.path().join(name);
        let q = Quantize {
            scheme: QuantScheme::Symmetric,
            group_size: 0,
            ..Quantize::default()
        };
        let c = ConvertConfig::builder().quantize(Some(q)).build().unwrap();
        let r = convert(model(name), &out, &c).unwrap();
        // NVFP4 and MXFP4 codes are carried (tests/quant_carry.rs); the rest, MXFP8
        // and FP8, are quantized from their dequantized values.
        let carried = &r.quantization.as_ref().unwrap().carried;
        let wf = WeightFile::open(&out).unwrap();
        let mut checked = 0;
        for (n, (shape, x)) in reference(refname) {
            if x.len() < modelconv::MIN_QUANT_ELEMENTS as usize {
                continue;
            }
            if carried.contains(&n) {
                checked += 1;
                continue;
            }
            let (codes, scales) = int8(&x, x.len() / shape[0] as usize);
            let t = wf.tensor(&n).unwrap();
            let qd = t.quant.as_ref().unwrap_or_else(|| panic!("{name} {n}"));
            let got: Vec<i8> = t.data.iter().map(|&b| b as i8).collect();
            assert!(got == codes, "{name} {n}: codes");
            assert_eq!(qd.scales, scales, "{name} {n}: scales");
            checked += 1;
        }
        assert_eq!(checked, 3, "{name}: the MLP's three weights checked");
    }
}

/// The entry named `name`.
fn entry<'a>(t: &'a mut [Entry], name: &str) -> &'a mut Entry {
    t.iter_mut().find(|e| e.0 == name).unwrap()
}

/// A copy of fixture `from` under `tmp` as `name`, and its weights file.
fn case(tmp: &Path, name: &str, from: &str) -> (PathBuf, PathBuf) {
    let d = tmp.join(name);
    copy_dir(&model(from), &d);
    let st = d.join("model.safetensors");
    (d, st)
}

const Q: &str = "model.layers.0.self_attn.q_proj";

#[test]
fn malformed_nvfp4_scales_are_refused_by_name_and_leave_nothing() {
    let tmp = tempdir();
    let t = tmp.path();

    // A ModelOpt scale of the wrong shape (the same bytes).
    let (d, st) = case(t, "shape", "modelopt-nvfp4");
    edit(&st, |e| {
        entry(e, &format!("{Q}.weight_scale")).2 = vec![16, 4]
    });
    refused_with_error_line(&d, t, &format!(
        "{}: tensor `{Q}.weight_scale`: pre-quantized (modelopt): the scale has shape [16, 4]; NVFP4 needs one per 16 values of the weight's [32, 32]: [32, 2]",
        st.display()
    ));

    // A scale of the wrong dtype.
    let (d, st) = case(t, "dtype", "modelopt-nvfp4");
    edit(&st, |e| {
        let s = entry(e, &format!("{Q}.weight_scale"));
        s.1 = "BF16".into();
        s.3 = s.3.iter().flat_map(|&b| [b, b]).collect();
    });
    refused_with_error_line(&d, t, &format!(
        "{}: tensor `{Q}.weight_scale`: pre-quantized (modelopt): the scale is BF16; expected F8_E4M3",
        st.display()
    ));

    // A missing global scale, in each layout.
    let (d, st) = case(t, "missing-2", "modelopt-nvfp4");
    edit(&st, |e| e.retain(|x| x.0 != format!("{Q}.weight_scale_2")));
    refused_with_error_line(
        &d,
        t,
        &format!(
        "{}: tensor `{Q}.weight`: pre-quantized (modelopt): its `q_proj.weight_scale_2` is missing",
        st.display()
    ),
    );
    let (d, st) = case(t, "missing-gs", "ct-nvfp4");
    edit(&st, |e| {
        e.retain(|x| x.0 != format!("{Q}.weight_global_scale"))
    });
    refused_with_error_line(&d, t, &format!(
        "{}: tensor `{Q}.weight_packed`: pre-quantized (compressed-tensors): its `q_proj.weight_global_scale` is missing",
        st.display()
    ));

    // A global scale of the wrong shape.
    let (d, st) = case(t, "gs-shape", "ct-nvfp4");
    edit(&st, |e| {
        let g = entry(e, &format!("{Q}.weight_global_scale"));
        g.2 = vec![2];
        g.3 = [g.3.clone(), g.3.clone()].concat();
    });
    refused_with_error_line(&d, t, &format!(
        "{}: tensor `{Q}.weight_global_scale`: pre-quantized (compressed-tensors): the global scale has shape [2]; expected [] or [1]",
        st.display()
    ));

    // A zero, NaN or infinite global scale, in each layout.
    for (from, suffix, scheme) in [
        ("modelopt-nvfp4", "weight_scale_2", "modelopt"),
        ("ct-nvfp4", "weight_global_scale", "compressed-tensors"),
    ] {
        for (v, shown) in [(0.0f32, "0"), (f32::NAN, "NaN"), (f32::INFINITY, "inf")] {
            let (d, st) = case(t, &format!("{from}-{shown}"), from);
            edit(&st, |e| {
                entry(e, &format!("{Q}.{suffix}")).3 = v.to_le_bytes().to_vec()
            });
            refused_with_error_line(&d, t, &format!(
                "{}: tensor `{Q}.{suffix}`: pre-quantized ({scheme}): (for `{Q}.weight`) the global scale is {shown}; no weight is dequantized from a zero, NaN or infinite global scale",
                st.display()
            ));
        }
    }
}

#[test]
fn malformed_mx_scales_are_refused_by_name_and_leave_nothing() {
    let tmp = tempdir();
    let t = tmp.path();

    // An E8M0 255 (its NaN) in MXFP4 and MXFP8 scales.
    for from in ["ct-mxfp4", "ct-mxfp8", "modelopt-mxfp8"] {
        let (d, st) = case(t, from, from);
        edit(&st, |e| entry(e, &format!("{Q}.weight_scale")).3[1] = 255);
        let scheme = if from.starts_with("ct") {
            "compressed-tensors"
        } else {
            "modelopt"
        };
        refused_with_error_line(&d, t, &format!(
            "{}: tensor `{Q}.weight_scale`: pre-quantized ({scheme}): (for `{Q}.weight`) scale 1 is NaN (stored U8); no weight is dequantized from a NaN or infinite scale",
            st.display()
        ));
    }

    // An MXFP4 scale of the wrong shape, and of the wrong dtype.
    let (d, st) = case(t, "mx-shape", "ct-mxfp4");
    edit(&st, |e| {
        entry(e, &format!("{Q}.weight_scale")).2 = vec![16, 2]
    });
    refused_with_error_line(&d, t, &format!(
        "{}: tensor `{Q}.weight_scale`: pre-quantized (compressed-tensors): the scale has shape [16, 2]; an MX format needs one per 32 values of the weight's [32, 32]: [32, 1]",
        st.display()
    ));
    let (d, st) = case(t, "mx8-dtype", "ct-mxfp8");
    edit(&st, |e| {
        entry(e, &format!("{Q}.weight_scale")).1 = "I8".into()
    });
    refused_with_error_line(&d, t, &format!(
        "{}: tensor `{Q}.weight_scale`: pre-quantized (compressed-tensors): the scale is I8; expected F32, BF16, F16, U8, F8_E8M0",
        st.display()
    ));
}

/// Rewrites the JSON file `path` through `f`.
fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

#[test]
fn modelopt_algorithms_and_layers_not_read_are_refused_by_name() {
    let tmp = tempdir();
    let t = tmp.path();

    // An algorithm not read, in config.json and in the side file alone.
    let (d, _) = case(t, "awq", "modelopt-nvfp4");
    edit_json(&d.join("config.json"), |c| {
        c["quantization_config"]["quant_algo"] = "NVFP4_AWQ".into()
    });
    refused_with_error_line(&d, t, &format!(
        "{}: pre-quantized (modelopt): modelopt `quant_algo` NVFP4_AWQ is not supported (FP8, NVFP4, MXFP8 and MIXED_PRECISION are); nothing is converted raw",
        d.join("config.json").display()
    ));
    let (d, _) = case(t, "w4a8", "modelopt-nvfp4-sidefile");
    edit_json(&d.join("hf_quant_config.json"), |c| {
        c["quantization"]["quant_algo"] = "W4A8_AWQ".into()
    });
    refused_with_error_line(&d, t, &format!(
        "{}: pre-quantized (modelopt): modelopt `quant_algo` W4A8_AWQ is not supported (FP8, NVFP4, MXFP8 and MIXED_PRECISION are); nothing is converted raw",
        d.join("hf_quant_config.json").display()
    ));

    // MIXED_PRECISION naming a layer that does not exist, and an algorithm not read.
    let layers = "/quantization_config/quantized_layers";
    let (d, _) = case(t, "ghost", "modelopt-mixed");
    edit_json(&d.join("config.json"), |c| {
        let m = c.pointer_mut(layers).unwrap().as_object_mut().unwrap();
        m.insert(
            "model.layers.7.mlp.up_proj".into(),
            serde_json::json!({"quant_algo": "FP8"}),
        );
    });
    refused_with_error_line(&d, t, &format!(
        "{}: pre-quantized (modelopt): MIXED_PRECISION names layer `model.layers.7.mlp.up_proj`, which has no `model.layers.7.mlp.up_proj.weight` tensor",
        d.join("config.json").display()
    ));
    let (d, _) = case(t, "w4a8-layer", "modelopt-mixed");
    edit_json(&d.join("config.json"), |c| {
        c.pointer_mut(&format!("{layers}/{Q}"))
            .map(|l| l["quant_algo"] = "W4A8_NVFP4_FP8".into())
            .unwrap();
    });
    refused_with_error_line(&d, t, &format!(
        "{}: pre-quantized (modelopt): MIXED_PRECISION layer `{Q}` has `quant_algo` W4A8_NVFP4_FP8, which is not supported (FP8, NVFP4, MXFP8 are); nothing is converted raw",
        d.join("config.json").display()
    ));
}

#[test]
fn modelopt_is_read_from_either_declaration() {
    let tmp = tempdir();
    let t = tmp.path();
    // MIXED_PRECISION declared only in `hf_quant_config.json`.
    let (mixed, _) = case(t, "mixed-sidefile", "modelopt-mixed");
    edit_json(&mixed.join("config.json"), |c| {
        c.as_object_mut().unwrap().remove("quantization_config");
    });
    // A `quant_method` starting with `modelopt`, as vLLM reads it.
    let (fp4, _) = case(t, "modelopt-fp4", "modelopt-nvfp4");
    edit_json(&fp4.join("config.json"), |c| {
        c["quantization_config"]["quant_method"] = "modelopt_fp4".into();
        c["quantization_config"]["quant_algo"] = "nvfp4".into();
    });
    std::fs::remove_file(fp4.join("hf_quant_config.json")).unwrap();
    for (d, refname, summary) in [
        (
            &mixed,
            "modelopt-mixed",
            "modelopt (MIXED_PRECISION: NVFP4, FP8)",
        ),
        (&fp4, "modelopt-nvfp4", "modelopt (NVFP4)"),
    ] {
        let out = t.join(format!("{}-out", d.file_name().unwrap().to_str().unwrap()));
        convert(d, &out, &cfg(TargetDtype::F32)).unwrap();
        let wf = WeightFile::open(&out).unwrap();
        for (n, (_, x)) in reference(refname) {
            let got = wf.tensor(&n).unwrap().data;
            assert!(plus_zero(&got, 4) == round(&x, "f32"), "{refname} {n}");
        }
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("metadata.json")).unwrap()).unwrap();
        assert_eq!(m["source_quantization"]["summary"], summary);
    }
}

#[test]
fn keep_is_the_checkpoints_bf16() {
    let tmp = tempdir();
    for &(name, refname) in FIXTURES {
        let out = tmp.path().join(name);
        convert(model(name), &out, &cfg(TargetDtype::Keep)).unwrap();
        let wf = WeightFile::open(&out).unwrap();
        for (n, (_, x)) in reference(refname) {
            let t = wf.tensor(&n).unwrap();
            assert_eq!(t.dtype.torch_name(), "torch.bfloat16", "{name} {n}");
            assert!(plus_zero(&t.data, 2) == round(&x, "bf16"), "{name} {n}");
        }
    }
}
