//! bitsandbytes checkpoints (NF4, FP4, double quantization, another quant storage,
//! LLM.int8, `llm_int8_skip_modules`): every dequantized value equals bitsandbytes' own
//! f32 result (`dequantize_4bit`, `int8_vectorwise_dequant`, computed by
//! `tests/fixtures/make_bnb_fixtures.py` on checkpoints transformers quantized and
//! saved) rounded once to the target; int8 re-quantization equals an independent
//! computation; malformed states are refused through the real binary with their exact
//! text and nothing left behind.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::prequant::{
    cfg, edit, int8, model, plus_zero, reference, refused_with_error_line, round,
};
use common::*;
use modelconv::{convert, ConvertConfig, QuantScheme, Quantize, TargetDtype, WeightFile};

/// Every bitsandbytes fixture.
const FIXTURES: &[&str] = &[
    "bnb-nf4",
    "bnb-fp4",
    "bnb-nf4-dq",
    "bnb-fp4-dq",
    "bnb-nf4-bf16-storage",
    "bnb-int8",
    "bnb-nf4-skip",
];

/// The stored names a bitsandbytes weight consumes (never in the output).
fn is_component(n: &str) -> bool {
    [
        ".absmax",
        ".quant_map",
        ".nested_absmax",
        ".nested_quant_map",
        ".SCB",
        ".weight_format",
    ]
    .iter()
    .any(|c| n.ends_with(c))
        || n.contains(".quant_state.")
}

#[test]
fn every_fixture_dequantizes_to_bitsandbytes_reference_rounded_once_bit_for_bit() {
    let tmp = tempdir();
    for name in FIXTURES {
        let refs = reference(name);
        let src = read_source(&model(name));
        let plain: BTreeMap<&String, &Src> = src
            .iter()
            .filter(|(n, _)| !refs.contains_key(*n) && !is_component(n))
            .collect();
        for (target, dtype, torch, es) in [
            ("f16", TargetDtype::F16, "torch.float16", 2),
            ("bf16", TargetDtype::Bf16, "torch.bfloat16", 2),
            ("f32", TargetDtype::F32, "torch.float32", 4),
        ] {
            let out = tmp.path().join(format!("{name}-{target}"));
            let r = convert(model(name), &out, &cfg(dtype)).unwrap();
            assert_eq!(r.tensors, refs.len() + plain.len(), "{name}: tensor count");
            let wf = WeightFile::open(&out).unwrap();
            for (n, (shape, x)) in &refs {
                let t = wf.tensor(n).unwrap_or_else(|e| panic!("{name} {n}: {e}"));
                assert_eq!(t.dtype.torch_name(), torch, "{name} {n}");
                assert_eq!(&t.shape, shape, "{name} {n}: shape");
                assert!(
                    plus_zero(&t.data, es) == round(x, target),
                    "{name} {n}: values differ from the reference in {target}"
                );
            }
            for (n, s) in &plain {
                let t = wf.tensor(n).unwrap();
                assert!(t.data == expected(s, target).0, "{name} {n}: plain tensor");
            }
            for n in wf.tensors() {
                assert!(!is_component(&n.name), "{name}: {} written", n.name);
            }
        }
    }
}

#[test]
fn the_fixtures_cover_what_they_are_named_for() {
    // Element counts that are not multiples of 64 (blocks straddle rows, the last one
    // partial) and odd ones (a half-filled last byte); two nested blocks; bf16 storage.
    let src = read_source(&model("bnb-nf4"));
    let gate = "model.layers.0.mlp.gate_proj.weight";
    assert_eq!(src[gate].shape, [2093, 1]);
    assert_eq!(src[&format!("{gate}.absmax")].shape, [66]);
    let dq = read_source(&model("bnb-nf4-dq"));
    assert_eq!(dq[&format!("{gate}.nested_absmax")].shape, [2]);
    assert_eq!(dq[&format!("{gate}.absmax")].dtype, safetensors::Dtype::U8);
    let bf = read_source(&model("bnb-nf4-bf16-storage"));
    assert_eq!(bf[gate].dtype, safetensors::Dtype::BF16);
    let skip = read_source(&model("bnb-nf4-skip"));
    let down = "model.layers.0.mlp.down_proj.weight";
    assert_eq!(skip[down].dtype, safetensors::Dtype::BF16);
    assert!(!reference("bnb-nf4-skip").contains_key(down));
    assert!(reference("bnb-nf4").contains_key(down));
    let i8 = read_source(&model("bnb-int8"));
    assert_eq!(i8[gate].dtype, safetensors::Dtype::I8);
    // The FP4 fixtures hold code 8 (a zero with the sign bit) somewhere.
    let fp4 = read_source(&model("bnb-fp4"));
    assert!(fp4[gate].data.iter().any(|b| b >> 4 == 8 || b & 15 == 8));
}

#[test]
fn verify_source_dequantizes_the_same_way() {
    let tmp = tempdir();
    for name in FIXTURES {
        let out = tmp.path().join(name);
        convert(model(name), &out, &cfg(TargetDtype::F16)).unwrap();
        let v = assert_verifies(&out, &model(name));
        assert!(v.compared_with_source, "{name}");
    }
}

#[test]
fn keep_is_the_checkpoints_compute_dtype_and_metadata_names_the_components() {
    let tmp = tempdir();
    let out = tmp.path().join("o");
    convert(model("bnb-nf4-dq"), &out, &cfg(TargetDtype::Keep)).unwrap();
    let wf = WeightFile::open(&out).unwrap();
    for (n, (_, x)) in reference("bnb-nf4-dq") {
        let t = wf.tensor(&n).unwrap();
        assert_eq!(t.dtype.torch_name(), "torch.bfloat16", "{n}");
        assert!(plus_zero(&t.data, 2) == round(&x, "bf16"), "{n}");
    }
    let m = metadata(&out);
    let q = &m["source_quantization"];
    assert_eq!(q["method"], "bitsandbytes");
    let k = "model.layers.0.self_attn.k_proj.weight";
    let d = q["dequantized"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == k)
        .unwrap();
    assert_eq!(
        d["consumes"],
        serde_json::json!([
            k,
            format!("{k}.absmax"),
            format!("{k}.nested_absmax"),
            format!("{k}.nested_quant_map"),
            format!("{k}.quant_state.bitsandbytes__nf4"),
            format!("{k}.quant_map"),
        ])
    );
}

#[test]
fn int8_requantizes_the_dequantized_values() {
    let tmp = tempdir();
    for name in ["bnb-nf4-dq", "bnb-fp4", "bnb-int8"] {
        for group in [0u64, 32] {
            let out = tmp.path().join(format!("{name}-{group}"));
            let q = Quantize {
                scheme: QuantScheme::Symmetric,
                group_size: group,
                ..Quantize::default()
            };
            let c = ConvertConfig::builder().quantize(Some(q)).build().unwrap();
            convert(model(name), &out, &c).unwrap();
            let wf = WeightFile::open(&out).unwrap();
            let mut checked = 0;
            for (n, (shape, x)) in reference(name) {
                if x.len() < modelconv::MIN_QUANT_ELEMENTS as usize {
                    continue;
                }
                let unit = if group > 0 {
                    group as usize
                } else {
                    x.len() / shape[0] as usize
                };
                let (codes, scales) = int8(&x, unit);
                let t = wf.tensor(&n).unwrap();
                let qd = t.quant.as_ref().unwrap_or_else(|| panic!("{name} {n}"));
                let got: Vec<i8> = t.data.iter().map(|&b| b as i8).collect();
                assert!(got == codes, "{name} {n} group {group}: codes");
                assert_eq!(qd.scales, scales, "{name} {n} group {group}: scales");
                checked += 1;
            }
            assert!(checked > 0, "{name}: nothing quantized");
            assert_verifies(&out, &model(name));
        }
    }
}

#[test]
fn weights_split_over_many_rows_dequantize_the_same() {
    // Rows of 600 bytes cut every weight mid-block and mid-byte.
    let tmp = tempdir();
    for name in FIXTURES {
        let out = tmp.path().join(name);
        let c = ConvertConfig::builder()
            .max_row_bytes(600)
            .row_group_bytes(4096)
            .build()
            .unwrap();
        convert(model(name), &out, &c).unwrap();
        let wf = WeightFile::open(&out).unwrap();
        let mut split = 0;
        for (n, (_, x)) in reference(name) {
            let t = wf.tensor(&n).unwrap();
            assert!(plus_zero(&t.data, 2) == round(&x, "f16"), "{name} {n}");
            split += (wf.info(&n).unwrap().rows > 1) as usize;
        }
        assert!(split > 0, "{name}: nothing was split");
    }
}

/// Sets tensor `name`'s bytes (and its 1-D shape, for a U8 state).
fn set(path: &Path, name: &str, data: Vec<u8>) {
    edit(path, |t| {
        let e = t.iter_mut().find(|e| e.0 == name).unwrap();
        if e.1 == "U8" && e.2.len() == 1 {
            e.2 = vec![data.len() as u64];
        }
        e.3 = data;
    });
}

/// Rewrites the JSON quant state `name` through `f`.
fn edit_state(path: &Path, name: &str, f: impl FnOnce(&mut serde_json::Value)) {
    let src = read_source(path.parent().unwrap());
    let mut j: serde_json::Value = serde_json::from_slice(&src[name].data).unwrap();
    f(&mut j);
    set(path, name, serde_json::to_vec(&j).unwrap());
}

#[test]
fn malformed_bitsandbytes_checkpoints_are_refused_by_name_and_leave_nothing() {
    let tmp = tempdir();
    let case = |name: &str, from: &str| {
        let d = tmp.path().join(name);
        copy_dir(&model(from), &d);
        (d.clone(), d.join("model.safetensors"))
    };
    let k = "model.layers.0.self_attn.k_proj.weight";
    let state = format!("{k}.quant_state.bitsandbytes__nf4");
    let at = |f: &Path, t: &str, why: &str| {
        format!(
            "{}: tensor `{t}`: pre-quantized (bitsandbytes): {why}",
            f.display()
        )
    };

    // A state that is not JSON, lacks a key, or disagrees with the bytes.
    let (d, f) = case("not-json", "bnb-nf4");
    set(&f, &state, b"{\"quant_type\": nf4}".to_vec());
    let why = "the quant state is not JSON: expected ident at line 1 column 17";
    refused_with_error_line(&d, tmp.path(), &at(&f, &state, why));

    let (d, f) = case("no-key", "bnb-nf4");
    edit_state(&f, &state, |j| {
        j.as_object_mut().unwrap().remove("blocksize");
    });
    let why = "the quant state lacks `blocksize`";
    refused_with_error_line(&d, tmp.path(), &at(&f, &state, why));

    let (d, f) = case("shape", "bnb-nf4");
    edit_state(&f, &state, |j| j["shape"] = serde_json::json!([14, 46]));
    let why =
        "the packed weight holds 315 bytes; the state's shape [14, 46] (644 values) needs 322";
    refused_with_error_line(&d, tmp.path(), &at(&f, k, why));

    let (d, f) = case("blocksize", "bnb-nf4");
    edit_state(&f, &state, |j| j["blocksize"] = serde_json::json!(128));
    let why = "the absmax has shape [10]; 630 values in blocks of 128 need [5]";
    refused_with_error_line(&d, tmp.path(), &at(&f, &format!("{k}.absmax"), why));

    let (d, f) = case("quant-type", "bnb-nf4");
    edit_state(&f, &state, |j| j["quant_type"] = serde_json::json!("nf5"));
    let why = "unknown bitsandbytes quant_type \"nf5\" (nf4 and fp4 are supported)";
    refused_with_error_line(&d, tmp.path(), &at(&f, &state, why));

    let (d, f) = case("state-name", "bnb-nf4");
    edit(&f, |t| {
        let e = t.iter_mut().find(|e| e.0 == state).unwrap();
        e.0 = format!("{k}.quant_state.bitsandbytes__int4");
    });
    let why = "unknown bitsandbytes quant type `int4` (nf4 and fp4 are supported)";
    let name = format!("{k}.quant_state.bitsandbytes__int4");
    refused_with_error_line(&d, tmp.path(), &at(&f, &name, why));

    // LLM.int8 in a GPU tile layout.
    let (d, f) = case("format", "bnb-int8");
    let wf = "model.layers.0.self_attn.k_proj.weight_format";
    set(&f, wf, vec![2]);
    let why = "`weight_format` is [2]; only 0 (row-major) is supported (1–3 are GPU tile layouts)";
    refused_with_error_line(&d, tmp.path(), &at(&f, wf, why));

    // NaN and infinite absmax, plain, nested and the LLM.int8 scale.
    for (what, v) in [("NaN", f32::NAN), ("inf", f32::INFINITY)] {
        let (d, f) = case(&format!("absmax-{what}"), "bnb-nf4");
        let a = format!("{k}.absmax");
        let src = read_source(&d);
        let mut b = src[&a].data.clone();
        b[8..12].copy_from_slice(&v.to_le_bytes());
        set(&f, &a, b);
        let why = format!("(for `{k}`) scale 2 is {what} (stored F32); no weight is dequantized from a NaN or infinite scale");
        refused_with_error_line(&d, tmp.path(), &at(&f, &a, &why));
    }
    let (d, f) = case("nested-inf", "bnb-nf4-dq");
    let na = format!("{k}.nested_absmax");
    set(&f, &na, f32::INFINITY.to_le_bytes().to_vec());
    let why = format!("(for `{k}`) scale 0 is inf (stored F32); no weight is dequantized from a NaN or infinite scale");
    refused_with_error_line(&d, tmp.path(), &at(&f, &na, &why));
    let (d, f) = case("scb-nan", "bnb-int8");
    let scb = "model.layers.0.self_attn.k_proj.SCB";
    set(
        &f,
        scb,
        [f32::NAN; 14]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
    );
    let why = format!("(for `{k}`) scale 0 is NaN (stored F32); no weight is dequantized from a NaN or infinite scale");
    refused_with_error_line(&d, tmp.path(), &at(&f, scb, &why));

    // The config and the tensors disagree.
    let (d, f) = case("skipped", "bnb-nf4");
    edit_json(&d.join("config.json"), |c| {
        c["quantization_config"]["llm_int8_skip_modules"] = serde_json::json!(["k_proj"])
    });
    let why = "a quantized weight in module `k_proj`, which config.json's `llm_int8_skip_modules` keeps unquantized";
    refused_with_error_line(&d, tmp.path(), &at(&f, &format!("{k}.absmax"), why));
    let (d, f) = case("double", "bnb-nf4");
    edit_json(&d.join("config.json"), |c| {
        c["quantization_config"]["bnb_4bit_use_double_quant"] = serde_json::json!(true)
    });
    let why =
        "config.json's `bnb_4bit_use_double_quant` is true, but the weight has no `nested_absmax`";
    let first = "model.layers.0.mlp.down_proj.weight.absmax";
    refused_with_error_line(&d, tmp.path(), &at(&f, first, why));

    let (d, f) = case("type", "bnb-nf4");
    edit_json(&d.join("config.json"), |c| {
        c["quantization_config"]["bnb_4bit_quant_type"] = serde_json::json!("fp4")
    });
    let why = "the state's quant_type `nf4` contradicts config.json's `bnb_4bit_quant_type` `fp4`";
    let first = "model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4";
    refused_with_error_line(&d, tmp.path(), &at(&f, first, why));
    let (d, f) = case("eight", "bnb-nf4");
    edit_json(&d.join("config.json"), |c| {
        c["quantization_config"]["load_in_4bit"] = serde_json::json!(false);
        c["quantization_config"]["load_in_8bit"] = serde_json::json!(true);
    });
    let why = "a bitsandbytes 4-bit absmax, but config.json does not declare `load_in_4bit`";
    let first = "model.layers.0.mlp.down_proj.weight.absmax";
    refused_with_error_line(&d, tmp.path(), &at(&f, first, why));
    let (d, f) = case("four", "bnb-int8");
    edit_json(&d.join("config.json"), |c| {
        c["quantization_config"]["load_in_4bit"] = serde_json::json!(true);
        c["quantization_config"]["load_in_8bit"] = serde_json::json!(false);
    });
    let why = "a bitsandbytes LLM.int8 scale, but config.json does not declare `load_in_8bit`";
    let first = "model.layers.0.mlp.down_proj.SCB";
    refused_with_error_line(&d, tmp.path(), &at(&f, first, why));
    // LLM.int8 codes without their scale, and a 4-bit weight without its absmax.
    let (d, f) = case("no-scb", "bnb-int8");
    edit(&f, |t| {
        t.retain(|e| e.0 != "model.layers.0.self_attn.k_proj.SCB")
    });
    refused_with_error_line(&d, tmp.path(), &at(&f, k, "its `SCB` is missing"));
    let (d, f) = case("no-absmax", "bnb-nf4");
    edit(&f, |t| t.retain(|e| e.0 != format!("{k}.absmax")));
    let why = "a bitsandbytes quant map (F32) that the declared scheme `bitsandbytes` does not explain; nothing is converted raw";
    refused_with_error_line(&d, tmp.path(), &at(&f, &format!("{k}.quant_map"), why));

    // A bitsandbytes config over tensors that have none of its layout.
    let plain = tmp.path().join("plain");
    copy_dir(&fixture("tiny-llama-sharded-bf16"), &plain);
    edit_json(
        &plain.join("config.json"),
        |c| c["quantization_config"] = serde_json::json!({"quant_method": "bitsandbytes", "load_in_4bit": true, "bnb_4bit_quant_type": "nf4"}),
    );
    refused_with_error_line(&plain, tmp.path(), &format!(
        "{}: pre-quantized (bitsandbytes): config.json declares `bitsandbytes` but no tensor has its layout (`X.weight` with `X.weight.absmax` and `X.weight.quant_state.bitsandbytes__nf4` or `__fp4`, or `X.weight` I8 with `X.SCB`)",
        plain.join("config.json").display()
    ));
}
