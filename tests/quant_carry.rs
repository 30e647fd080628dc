//! Pre-quantized integer codes carried into V2 (`--quantize int8`) without a second
//! quantization: GPTQ, AWQ and compressed-tensors weights whose groups tile their rows
//! are written from their own codes, scales and zero points, so that the seed loader's
//! `(q − zero_point) × scale` (numpy, tests/python/seed_loader_carry.py) and our reader
//! give the fixture's reference f32 values (computed by torch, numpy or
//! compressed-tensors, never by modelconv) bit for bit; the others (act-order `g_idx`,
//! FP8, MXFP4, groups that do not tile a row) are quantized from their values as
//! before, and the report and `metadata.json` say which and why; `--lossless` refuses
//! those by name with nothing written; `verify --source` checks carried rows code for
//! code.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use modelconv::{
    convert, export, ConvertConfig, ExportOptions, QuantType, Quantize, Requantized, TargetDtype,
    WeightFile,
};
use safetensors::SafeTensors;

const Q: &str = "model.layers.0.self_attn.q_proj.weight";
const O: &str = "model.layers.0.self_attn.o_proj.weight";
const K: &str = "model.layers.0.self_attn.k_proj.weight";
const V: &str = "model.layers.0.self_attn.v_proj.weight";
const DOWN: &str = "model.layers.0.mlp.down_proj.weight";
const GATE: &str = "model.layers.0.mlp.gate_proj.weight";
const UP: &str = "model.layers.0.mlp.up_proj.weight";
const F8: &str = "F8_E4M3 codes";
const NF4: &str = "bitsandbytes NF4 codes (a table, not an integer grid)";
const INT8: &str = "LLM.int8 codes (two products, q × SCB × 1/127)";

/// A fixture, the weights carried, and those re-quantized with their reason.
type Case = (
    &'static str,
    &'static [&'static str],
    &'static [(&'static str, &'static str)],
);

const CASES: &[Case] = &[
    // Made by compressed-tensors' own compressor (make_carry_fixtures.py): W8A8 int8
    // per channel (`int-quantized`), W4A16 groups of 128 (`pack-quantized`).
    ("ct-w8a8-int", &[DOWN, Q], &[]),
    ("ct-w4a16-g128", &[DOWN, Q], &[]),
    // Groups of 128 over rows of 128 (per channel) and of 192 (groups of 64 in V2).
    ("gptq-4bit", &[DOWN, Q], &[]),
    ("gptq-3bit", &[DOWN, Q], &[]),
    ("gptq-8bit-v2", &[DOWN, Q], &[]),
    ("gptq-2bit", &[DOWN, Q], &[]),
    ("awq", &[GATE, Q], &[]),
    (
        "ct-w4a16",
        &[DOWN],
        &[(
            O,
            "groups of 32 do not tile rows of 100 (V2 groups would hold 4)",
        )],
    ),
    (
        "ct-w3-asym",
        &[O],
        &[(
            DOWN,
            "groups of 50 do not tile rows of 128 (V2 groups would hold 2)",
        )],
    ),
    (
        "ct-fp8-int8",
        &[UP],
        &[(K, "F8_E4M3 codes"), (V, "F8_E4M3 codes")],
    ),
    // NVFP4 (ModelOpt's `weight_scale_2`, compressed-tensors' `weight_global_scale`
    // as [1] and 0-dim) and compressed-tensors MXFP4, made by their own producers
    // (make_fp4_fixtures.py): codes 2·E2M1 with half the group's scale. The 32 × 32
    // attention weights are below the quantization threshold.
    ("modelopt-nvfp4", &[DOWN, GATE, UP], &[]),
    ("ct-nvfp4", &[DOWN, GATE, UP], &[]),
    ("ct-nvfp4-0dim", &[DOWN, GATE, UP], &[]),
    ("ct-mxfp4", &[DOWN, GATE, UP], &[]),
    // MXFP8 codes are floats; ModelOpt MIXED_PRECISION's MLP here is FP8.
    ("ct-mxfp8", &[], &[(DOWN, F8), (GATE, F8), (UP, F8)]),
    ("modelopt-mixed", &[], &[(DOWN, F8), (GATE, F8), (UP, F8)]),
    // bitsandbytes (transformers + bitsandbytes, make_bnb_fixtures.py): never carried.
    ("bnb-nf4", &[], &[(DOWN, NF4), (GATE, NF4), (UP, NF4)]),
    ("bnb-int8", &[], &[(DOWN, INT8), (GATE, INT8), (UP, INT8)]),
    (
        "gptq-4bit-desc-act",
        &[],
        &[(DOWN, "act-order g_idx"), (Q, "act-order g_idx")],
    ),
    (
        "ct-w4-asym-actorder",
        &[],
        &[(DOWN, "act-order g_idx"), (O, "act-order g_idx")],
    ),
];

fn model(name: &str) -> PathBuf {
    fixture("prequant").join(name)
}

fn reference_file(name: &str) -> PathBuf {
    fixture("prequant").join(format!("{name}.reference.safetensors"))
}

/// The f32 tensors of a safetensors file, as bits (both zeros as +0: a carried FP4
/// code 8, −0 in compressed-tensors' reference, is the integer code 0).
fn f32_bits(path: &Path) -> BTreeMap<String, Vec<u32>> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .filter(|(_, v)| v.dtype() == safetensors::Dtype::F32)
        .map(|(n, v)| {
            let bits = v
                .data()
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
                .map(|v| if v == 0x8000_0000 { 0 } else { v })
                .collect();
            (n, bits)
        })
        .collect()
}

fn int8(lossless: bool, max_row_bytes: u64) -> ConvertConfig {
    ConvertConfig::builder()
        .quantize(Some(Quantize::default()))
        .lossless(lossless)
        .max_row_bytes(max_row_bytes)
        .build()
        .unwrap()
}

/// Our reader's f32 values of the carried weights of `out` equal the reference's bits.
fn assert_reader_gives_the_reference(name: &str, out: &Path, carried: &[&str]) {
    let st = out.join("dequantized.safetensors");
    let opts = ExportOptions {
        dtype: TargetDtype::F32,
        force: true,
        ..Default::default()
    };
    export(out, &st, &opts).unwrap();
    let (ours, refs) = (f32_bits(&st), f32_bits(&reference_file(name)));
    for n in carried {
        assert!(ours[*n] == refs[*n], "{name} {n}: our reader differs");
    }
}

#[test]
fn carried_weights_read_back_as_the_reference_bit_for_bit_and_are_reported() {
    let tmp = tempdir();
    for &(name, carried, requantized) in CASES {
        let out = tmp.path().join(name);
        let r = convert(model(name), &out, &int8(false, 1 << 20)).unwrap();
        let q = r.quantization.as_ref().unwrap();
        assert_eq!(q.carried, carried, "{name}: carried");
        let want: Vec<Requantized> = requantized
            .iter()
            .map(|(n, why)| Requantized {
                name: n.to_string(),
                reason: why.to_string(),
            })
            .collect();
        assert_eq!(q.requantized, want, "{name}: re-quantized");
        for t in q
            .tensors
            .iter()
            .filter(|t| carried.contains(&t.name.as_str()))
        {
            assert_eq!(t.sqnr_db, f64::INFINITY, "{name} {}", t.name);
            assert_eq!(
                (t.max_abs_error, t.rel_rms),
                (0.0, 0.0),
                "{name} {}",
                t.name
            );
        }
        // metadata.json says the same; an exact SQNR is `null`.
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("metadata.json")).unwrap()).unwrap();
        let mq = &meta["quantization"];
        assert_eq!(mq["carried"], serde_json::json!(carried), "{name}");
        let reasons: Vec<(String, String)> = mq["requantized"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["name"].as_str().unwrap().into(),
                    r["reason"].as_str().unwrap().into(),
                )
            })
            .collect();
        let want: Vec<(String, String)> = requantized
            .iter()
            .map(|(n, w)| (n.to_string(), w.to_string()))
            .collect();
        assert_eq!(reasons, want, "{name}");
        for t in mq["tensors"].as_array().unwrap() {
            let exact = carried.contains(&t["name"].as_str().unwrap());
            assert_eq!(t["sqnr_db"].is_null(), exact, "{name} {t}");
        }
        // Every carried weight is an int8 row the seed loader reads as the reference.
        let wf = WeightFile::open(&out).unwrap();
        for n in carried {
            assert!(wf.info(n).unwrap().quant.is_some(), "{name} {n}");
        }
        if !carried.is_empty() {
            let weights = out.join("weights.parquet");
            let reference = reference_file(name);
            let mut args = vec![s(&weights), s(&reference)];
            args.extend(carried.iter().copied());
            let text = python_script("seed_loader_carry.py", &args);
            assert_eq!(
                text.trim(),
                format!(
                    "{} carried weights: the seed loader's values equal the reference bit for bit",
                    carried.len()
                )
            );
        }
        assert_reader_gives_the_reference(name, &out, carried);
        // verify --source checks the carried rows code for code.
        let v = assert_verifies(&out, &model(name));
        let checked: Vec<&str> = v
            .checks
            .iter()
            .filter(|c| c.carried)
            .map(|c| c.name.as_str())
            .collect();
        let mut want = carried.to_vec();
        want.sort_unstable();
        let mut checked = checked;
        checked.sort_unstable();
        assert_eq!(checked, want, "{name}: verified code for code");
    }
}

#[test]
fn carried_weights_split_over_many_rows_keep_whole_groups_and_the_reference() {
    let tmp = tempdir();
    for &(name, carried, _) in CASES.iter().filter(|c| !c.1.is_empty()) {
        let out = tmp.path().join(name);
        // 600-byte rows: a few V2 groups (or channels) per row.
        convert(model(name), &out, &int8(false, 600)).unwrap();
        let wf = WeightFile::open(&out).unwrap();
        for n in carried {
            let t = wf.info(n).unwrap();
            assert!(t.rows > 1, "{name} {n}: {} rows", t.rows);
        }
        assert_reader_gives_the_reference(name, &out, carried);
        assert_verifies(&out, &model(name));
    }
    // A parted output (a directory of part files) carries and verifies the same.
    let out = tmp.path().join("parted");
    let c = ConvertConfig::builder()
        .quantize(Some(Quantize::default()))
        .max_row_bytes(600)
        .max_file_size(Some(modelconv::MIN_FILE_SIZE))
        .build()
        .unwrap();
    let r = convert(model("gptq-4bit"), &out, &c).unwrap();
    assert_eq!(r.quantization.unwrap().carried, [DOWN, Q]);
    assert_reader_gives_the_reference("gptq-4bit", &out, &[DOWN, Q]);
    let v = assert_verifies(&out, &model("gptq-4bit"));
    assert_eq!(v.checks.iter().filter(|c| c.carried).count(), 2);
}

#[test]
fn lossless_refuses_what_cannot_be_carried_by_name_and_writes_nothing() {
    let tmp = tempdir();
    let why = "cannot quantize: --lossless, and its codes cannot be carried into V2 exactly";
    for (name, tensor, reason) in [
        ("gptq-4bit-desc-act", DOWN, "act-order g_idx"),
        ("ct-w4-asym-actorder", DOWN, "act-order g_idx"),
        ("ct-fp8-int8", K, "F8_E4M3 codes"),
        (
            "ct-w3-asym",
            DOWN,
            "groups of 50 do not tile rows of 128 (V2 groups would hold 2)",
        ),
        ("fp8-block", DOWN, "F8_E4M3 codes"),
        (
            "mxfp4",
            "model.layers.0.mlp.experts.down_proj",
            "MXFP4 (gpt-oss): E2M1 codes in a transposed layout",
        ),
    ] {
        let file = model(name).join("model.safetensors");
        let want = format!("{}: tensor `{tensor}`: {why}: {reason}", file.display());
        refused(
            tmp.path(),
            &model(name),
            &["--quantize", "int8", "--lossless"],
            &want,
        );
    }
    // An option error (exit 2), before anything is read.
    let out = tmp.path().join("no-quantize");
    let o = convert_cli(&model("gptq-4bit"), &out, &["--lossless"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert_eq!(
        text(&o.stderr),
        "error: --lossless applies to --quantize int8 or int2 (without it nothing is quantized)\n"
    );
    assert!(!out.exists());
}

#[test]
fn lossless_carries_every_prequantized_weight_and_leaves_float_tensors_unquantized() {
    let tmp = tempdir();
    for name in ["gptq-4bit", "awq"] {
        let out = tmp.path().join(name);
        let r = convert(model(name), &out, &int8(true, 1 << 20)).unwrap();
        let q = r.quantization.as_ref().unwrap();
        // The embedding is not pre-quantized: it stays an f16 row, nothing re-quantized.
        assert_eq!(
            (q.quantized_tensors, q.unquantized_tensors),
            (2, 2),
            "{name}"
        );
        assert_eq!(q.carried.len(), 2, "{name}");
        assert!(q.requantized.is_empty(), "{name}");
        assert_eq!(q.model.sqnr_db, f64::INFINITY, "{name}");
        let wf = WeightFile::open(&out).unwrap();
        let emb = wf.info("model.embed_tokens.weight").unwrap();
        assert!(emb.quant.is_none(), "{name}");
        assert_eq!(emb.dtype, modelconv::Dtype::F16, "{name}");
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("metadata.json")).unwrap()).unwrap();
        assert_eq!(
            meta["conversion_config"]["lossless"],
            serde_json::json!(true)
        );
        assert_verifies(&out, &model(name));
    }
}

#[test]
fn two_bit_codes_are_carried_into_int2_and_wider_ones_are_named() {
    let tmp = tempdir();
    let int2 = |lossless: bool| {
        ConvertConfig::builder()
            .quantize(Some(Quantize::new(QuantType::Int2)))
            .lossless(lossless)
            .build()
            .unwrap()
    };
    // GPTQ 2-bit: codes q − 2 in [−2, 1], its own groups, read back as the reference.
    let out = tmp.path().join("gptq-2bit");
    let r = convert(model("gptq-2bit"), &out, &int2(true)).unwrap();
    let q = r.quantization.as_ref().unwrap();
    assert_eq!(q.carried, [DOWN, Q]);
    assert!(q.requantized.is_empty());
    assert_eq!(q.model.sqnr_db, f64::INFINITY);
    let wf = WeightFile::open(&out).unwrap();
    for n in [DOWN, Q] {
        assert_eq!(
            wf.info(n).unwrap().quant.unwrap().kind,
            QuantType::Int2,
            "{n}"
        );
    }
    let (weights, reference) = (out.join("weights.parquet"), reference_file("gptq-2bit"));
    let text = python_script(
        "seed_loader_carry.py",
        &[s(&weights), s(&reference), DOWN, Q],
    );
    assert_eq!(
        text.trim(),
        "2 carried weights: the seed loader's values equal the reference bit for bit"
    );
    assert_reader_gives_the_reference("gptq-2bit", &out, &[DOWN, Q]);
    assert_verifies(&out, &model("gptq-2bit"));
    // 4-bit codes do not fit int2: quantized from their values, and named.
    let out = tmp.path().join("gptq-4bit");
    let r = convert(model("gptq-4bit"), &out, &int2(false)).unwrap();
    let q = r.quantization.as_ref().unwrap();
    assert!(q.carried.is_empty());
    let why: Vec<(&str, &str)> = q
        .requantized
        .iter()
        .map(|r| (r.name.as_str(), r.reason.as_str()))
        .collect();
    assert_eq!(
        why,
        [
            (DOWN, "4-bit codes do not fit int2"),
            (Q, "4-bit codes do not fit int2")
        ]
    );
    let err = convert(model("gptq-4bit"), tmp.path().join("no"), &int2(true)).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: tensor `{DOWN}`: cannot quantize: --lossless, and its codes cannot be carried into V2 exactly: 4-bit codes do not fit int2",
            model("gptq-4bit").join("model.safetensors").display()
        )
    );
    assert!(!tmp.path().join("no").exists());
}

#[test]
fn verify_source_catches_a_changed_code_scale_or_zero_point_of_a_carried_weight() {
    let tmp = tempdir();
    let out = tmp.path().join("o");
    convert(model("gptq-4bit"), &out, &int8(false, 1 << 20)).unwrap();
    let q_proj = "model.layers.0.self_attn.q_proj";
    for (k, (component, byte, flip)) in [
        ("qweight", 100usize, 0x10u8),
        ("scales", 6, 0x01),
        ("qzeros", 2, 0x01),
    ]
    .into_iter()
    .enumerate()
    {
        let src = copy_dir(&model("gptq-4bit"), &tmp.path().join(format!("changed{k}")));
        let file = src.join("model.safetensors");
        let bytes = std::fs::read(&file).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let name = format!("{q_proj}.{component}");
        let mut tensors: Vec<(String, String, Vec<u64>, Vec<u8>)> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| {
                let mut d = v.data().to_vec();
                if n == name {
                    d[byte] ^= flip;
                }
                let shape = v.shape().iter().map(|&x| x as u64).collect();
                (n, format!("{:?}", v.dtype()), shape, d)
            })
            .collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let refs: Vec<(&str, &str, Vec<u64>, Vec<u8>)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.as_str(), d.as_str(), s.clone(), b.clone()))
            .collect();
        write_safetensors(&file, &refs);
        let report =
            modelconv::verify(&out, Some(&open_source(&src)), &Default::default()).unwrap();
        let failed: Vec<(&str, u64)> = report
            .failures()
            .map(|c| (c.name.as_str(), c.value_mismatches))
            .collect();
        // One changed code is one mismatch; a scale or zero point, its row's (counted once).
        assert_eq!(failed, [(Q, 1)], "{component}");
    }
}

#[test]
fn dry_run_says_per_weight_whether_it_is_carried_and_lossless_refuses_there_too() {
    for (name, want) in [
        ("gptq-4bit", vec![(DOWN, "carried"), (Q, "carried")]),
        (
            "gptq-4bit-desc-act",
            vec![
                (DOWN, "re-quantized: act-order g_idx"),
                (Q, "re-quantized: act-order g_idx"),
            ],
        ),
        (
            "ct-fp8-int8",
            vec![
                (UP, "carried"),
                (K, "re-quantized: F8_E4M3 codes"),
                (V, "re-quantized: F8_E4M3 codes"),
            ],
        ),
    ] {
        let plan = modelconv::plan_conversion(model(name), &int8(false, 1 << 20)).unwrap();
        let mut got: Vec<(&str, &str)> = plan
            .kept
            .iter()
            .filter_map(|k| Some((k.name.as_str(), k.dequantized.as_ref()?.int8.as_deref()?)))
            .collect();
        got.sort_unstable();
        assert_eq!(got, want, "{name}");
    }
    let e =
        modelconv::plan_conversion(model("gptq-4bit-desc-act"), &int8(true, 1 << 20)).unwrap_err();
    assert!(matches!(e, modelconv::Error::Quantization { .. }), "{e}");
}
