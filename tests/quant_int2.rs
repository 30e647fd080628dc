//! int2 output (`--quantize int2`, the seed's V2 `int2` rows): codes, scales and zero
//! points equal an independent computation of the documented rule (docs/quantized-v2.md)
//! from the safetensors source, packed four to a byte with the first element in the two
//! highest bits; the last byte is padded with zeros; split rows hold whole bytes; the
//! seed's loader (in Python, unpacking `(b >> 6) & 3` first) reads bit for bit what our
//! reader and `export` give; `verify --source` re-quantizes and catches a changed code;
//! options int2 cannot express are refused with exact texts.

mod common;

use std::path::Path;

use common::*;
use modelconv::{
    convert, export, Codec, ConvertConfig, Error, ExportOptions, ModelType, QuantScheme, QuantType,
    Quantize, TargetDtype, WeightFile,
};

/// The clipping ratios of the rule, widest first.
const RATIOS: [f32; 13] = [
    1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4,
];

/// The documented int2 rule for one unit, written apart from the crate: `(codes,
/// scale, zero point)`.
fn int2_unit(x: &[f32]) -> (Vec<i8>, f32, f32) {
    let lo = x.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let span = hi - lo;
    let code = |v: f32, s: f32, z: f32| ((v / s).round_ties_even() + z).clamp(-2.0, 1.0);
    if span / 3.0 <= 0.0 {
        let s = if lo != 0.0 { lo.abs() } else { 1.0 };
        return (x.iter().map(|&v| code(v, s, 0.0) as i8).collect(), s, 0.0);
    }
    let mut best: Option<(f64, f32, f32)> = None;
    for r in RATIOS {
        let s = span / 3.0 * r;
        let lo_r = lo + span * 0.5 * (1.0 - r);
        let z = (-2.0 - lo_r / s)
            .round_ties_even()
            .clamp(-2_097_152.0, 2_097_152.0);
        let mut lanes = [0f64; 8];
        for (i, &v) in x.iter().enumerate() {
            let e = v as f64 - ((code(v, s, z) - z) * s) as f64;
            lanes[i % 8] += e * e;
        }
        let sse = lanes.iter().fold(0.0, |a, b| a + b);
        if best.is_none_or(|b| sse < b.0) {
            best = Some((sse, s, z));
        }
    }
    let (_, s, z) = best.unwrap();
    (x.iter().map(|&v| code(v, s, z) as i8).collect(), s, z)
}

/// Codes packed as V2 int2 stores them, written apart from the crate.
fn pack(codes: &[i8]) -> Vec<u8> {
    codes
        .chunks(4)
        .map(|c| {
            let mut b = 0u8;
            for (j, &q) in c.iter().enumerate() {
                b |= ((q + 2) as u8) << (6 - 2 * j);
            }
            b
        })
        .collect()
}

/// A source tensor's values as f32 (f32, f16 or bf16 sources).
fn values(src: &Src) -> Vec<f32> {
    let b = &src.data;
    match src.dtype {
        safetensors::Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        safetensors::Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        safetensors::Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        d => panic!("{d:?}"),
    }
}

fn int2(group_size: u64) -> Quantize {
    Quantize {
        group_size,
        ..Quantize::new(QuantType::Int2)
    }
}

fn cfg(quant: Quantize, max_row_bytes: u64) -> ConvertConfig {
    ConvertConfig::builder()
        .model_type(ModelType::CausalLm)
        .quantize(Some(quant))
        .max_row_bytes(max_row_bytes)
        .build()
        .unwrap()
}

/// Checks every int2 tensor of the conversion `out` of `model` against [`int2_unit`]
/// and [`pack`], and its values against `(q - zp) * scale`; the number checked.
fn check_against_source(model: &Path, out: &Path, group_size: u64) -> usize {
    let src = read_source(model);
    let wf = WeightFile::open(out).unwrap();
    let mut n = 0;
    for t in wf.tensors() {
        let Some(q) = t.quant else { continue };
        n += 1;
        assert_eq!(q.kind, QuantType::Int2, "{}", t.name);
        let x = values(&src[&t.name]);
        let unit = if group_size > 0 {
            group_size as usize
        } else {
            x.len() / t.shape[0] as usize
        };
        let (mut codes, mut scales, mut zps) = (Vec::new(), Vec::new(), Vec::new());
        for u in x.chunks(unit) {
            let (c, s, z) = int2_unit(u);
            codes.extend(c);
            scales.push(s);
            zps.push(z);
        }
        let got = wf.tensor(&t.name).unwrap();
        assert_eq!(got.data, pack(&codes), "{}", t.name);
        assert_eq!(got.data.len() as u64, t.bytes);
        assert_eq!(t.bytes, t.num_params.div_ceil(4));
        let qd = got.quant.as_ref().unwrap();
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&qd.scales), bits(&scales), "{}", t.name);
        assert_eq!(bits(&qd.zero_points), bits(&zps), "{}", t.name);
        let want: Vec<u32> = codes
            .iter()
            .enumerate()
            .map(|(i, &c)| ((c as f32 - zps[i / unit]) * scales[i / unit]).to_bits())
            .collect();
        assert_eq!(bits(&got.to_f32()), want, "{}", t.name);
    }
    n
}

#[test]
fn codes_scales_and_packing_equal_an_independent_computation() {
    let tmp = tempdir();
    // The trained MiniLM (f32) in groups of 128 (the default), per channel and in groups
    // of 100 (every last group shorter); the bf16 llama in groups of 128.
    for (model, group, quantized) in [
        (minilm(), 128, 39),
        (minilm(), 0, 39),
        (minilm(), 100, 39),
        (fixture("tiny-llama-sharded-bf16"), 128, 22),
    ] {
        let out = tmp.path().join(format!("o{group}"));
        let _ = std::fs::remove_dir_all(&out);
        let r = convert(&model, &out, &cfg(int2(group), 64 << 20)).unwrap();
        let q = r.quantization.unwrap();
        assert_eq!(
            (q.quant_type.as_str(), q.scheme.as_str()),
            ("int2", "asymmetric")
        );
        assert_eq!(q.quantized_tensors, quantized);
        assert_eq!(check_against_source(&model, &out, group), quantized);
    }
    // The recorded options: metadata.json and the footer say int2.
    let m = metadata(&tmp.path().join("o128"));
    assert_eq!(m["conversion_config"]["quantization"]["bits"], 2);
    assert_eq!(m["conversion_config"]["quantization"]["quant_type"], "int2");
    assert_eq!(m["conversion_config"]["quantization"]["group_size"], 128);
}

#[test]
fn the_trained_minilm_in_int2_groups_of_128_reaches_8_5_db() {
    let tmp = tempdir();
    let out = tmp.path().join("o");
    let r = convert(minilm(), &out, &cfg(int2(128), 64 << 20)).unwrap();
    let q = r.quantization.unwrap();
    // Min/max alone (the first ratio only) gives 5.8 dB here.
    assert_eq!(format!("{:.1}", q.model.sqnr_db), "8.5");
    assert_eq!(q.tensors[0].name, "encoder.layer.1.output.dense.weight");
    // Four codes a byte: the quantized tensors take a quarter of a byte per value.
    let wf = WeightFile::open(&out).unwrap();
    let t = wf
        .tensor("encoder.layer.0.attention.self.query.weight")
        .unwrap();
    assert_eq!(t.data.len(), 384 * 384 / 4);
    assert_eq!(t.quant.unwrap().scales.len(), 384 * 384 / 128);
}

/// A `[65, 65]` f32 matrix whose groups of four are `[1, -2, 0, -1]`: exact codes.
fn patterned(tmp: &Path) -> std::path::PathBuf {
    let model = tmp.join("m.safetensors");
    let v: Vec<f32> = (0..65 * 65)
        .map(|i| [1.0, -2.0, 0.0, -1.0][i % 4])
        .collect();
    write_safetensors(&model, &[("model.w", "F32", vec![65, 65], f32s(&v))]);
    model
}

#[test]
fn the_first_element_is_in_the_two_highest_bits_and_the_last_byte_is_padded() {
    let tmp = tempdir();
    let model = patterned(tmp.path());
    let out = tmp.path().join("o");
    convert(&model, &out, &cfg(int2(4), 64 << 20)).unwrap();
    let t = WeightFile::open(&out).unwrap().tensor("model.w").unwrap();
    // [1, -2, 0, -1] with scale 1, zero point 0: stored 3, 0, 2, 1 = 0b11_00_10_01.
    let mut want = vec![0xC9u8; 1056];
    // The 4225th value (1) alone in its group: scale 1, code 1, stored 3, in the two
    // highest bits; the other six bits zero.
    want.push(0xC0);
    assert_eq!(t.data, want);
    let q = t.quant.unwrap();
    assert_eq!((q.axis, q.group_size, q.scales.len()), (-1, 4, 1057));
    assert!(q.scales.iter().all(|&s| s == 1.0));
    assert!(q.zero_points.iter().all(|&z| z == 0.0));
    let back = WeightFile::open(&out)
        .unwrap()
        .tensor_f32("model.w")
        .unwrap();
    let src: Vec<f32> = (0..65 * 65)
        .map(|i| [1.0, -2.0, 0.0, -1.0][i % 4])
        .collect();
    assert_eq!(back, src);
}

#[test]
fn a_tensor_over_the_row_limit_splits_into_rows_of_whole_bytes() {
    let tmp = tempdir();
    let model = tmp.path().join("m");
    std::fs::create_dir(&model).unwrap();
    write_safetensors(
        &model.join("model.safetensors"),
        &[("model.w", "F32", vec![65, 65], weights_f32(65 * 65))],
    );
    // Rows of at most 1000 bytes: 4000 codes. Groups of 6 align on 12 codes (3996 a
    // row); channels of 65 on 260 (3900 a row, 60 channels).
    for (group, rows) in [
        (6u64, [(0u64, 999u64), (999, 58)]),
        (0, [(0, 975), (975, 82)]),
    ] {
        let out = tmp.path().join(format!("o{group}"));
        convert(&model, &out, &cfg(int2(group), 1000)).unwrap();
        let wf = WeightFile::open(&out).unwrap();
        let t = &wf.tensors()[0];
        assert_eq!((t.rows, t.bytes), (2, 1057), "group {group}");
        // Each row's byte offset in the tensor and its length, as stored.
        let table = python_ok(&[
            "-c",
            "import sys, pyarrow.parquet as pq\n\
             t = pq.read_table(sys.argv[1])\n\
             print([(o, len(d)) for o, d in zip(t.column('chunk_offset').to_pylist(), t.column('data').to_pylist())])",
            s(&out.join("weights.parquet")),
        ]);
        assert_eq!(
            table.trim(),
            format!("{:?}", rows.to_vec()),
            "group {group}"
        );
        assert_eq!(check_against_source(&model, &out, group), 1);
        assert_verifies(&out, &model);
    }
}

#[test]
fn channels_that_cannot_end_a_row_on_a_byte_are_refused() {
    let tmp = tempdir();
    let model = patterned(tmp.path());
    // Four channels of 65 (260 codes, 65 bytes) do not fit rows of 64 bytes.
    let err = convert(&model, tmp.path().join("o"), &cfg(int2(0), 64)).unwrap_err();
    assert!(matches!(err, Error::InvalidOption { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "tensor `model.w`: its rows must hold whole bytes of int2 codes, \
         and 260 elements (whole channels of 65) are larger than the row limit; quantize \
         it per group (a group size) or raise the row limit"
    );
}

#[test]
fn the_seed_loader_reads_what_our_reader_and_export_give() {
    let tmp = tempdir();
    for (model, group) in [
        (minilm(), 128u64),
        (minilm(), 0),
        (fixture("tiny-llama-sharded-bf16"), 100),
        (fixture("tiny-bert"), 128),
    ] {
        let out = tmp.path().join("o");
        let _ = std::fs::remove_dir_all(&out);
        convert(&model, &out, &cfg(int2(group), 64 << 20)).unwrap();
        let st = tmp.path().join("dequantized.safetensors");
        let opts = ExportOptions {
            dtype: TargetDtype::F32,
            force: true,
            ..Default::default()
        };
        export(&out, &st, &opts).unwrap();
        let seed = tmp.path().join("seed.parquet");
        let got = python_script(
            "seed_loader_int2.py",
            &[
                s(&out.join("weights.parquet")),
                s(&model),
                s(&st),
                &group.to_string(),
                s(&seed),
            ],
        );
        assert!(got.starts_with("ok "), "{got}");
        // The same rows as the seed's converter would lay them out (no footer index):
        // our reader finds the int2 rows by their quant_type and reads the same values.
        let ours = WeightFile::open(&out).unwrap();
        let theirs = WeightFile::open(&seed).unwrap();
        assert!(!theirs.has_index());
        for t in ours.tensors() {
            let u = theirs.tensor(&t.name).unwrap();
            assert_eq!(u.quant.as_ref().map(|q| q.kind), t.quant.map(|q| q.kind));
            assert_eq!(ours.tensor_f32(&t.name).unwrap(), u.to_f32(), "{}", t.name);
        }
    }
    let got = python_script(
        "seed_loader_int2.py",
        &[
            s(&tmp.path().join("o/weights.parquet")),
            s(&fixture("tiny-bert")),
            s(&tmp.path().join("dequantized.safetensors")),
            "128",
            s(&tmp.path().join("seed.parquet")),
        ],
    );
    assert_eq!(got.trim(), "ok 39 tensors, 1 quantized");
}

#[test]
fn verify_requantizes_and_catches_a_changed_code_and_padding() {
    let tmp = tempdir();
    let model = patterned(tmp.path());
    let c = ConvertConfig::builder()
        .model_type(ModelType::CausalLm)
        .quantize(Some(int2(128)))
        .compression(Codec::None)
        .build()
        .unwrap();
    let out = tmp.path().join("o");
    convert(&model, &out, &c).unwrap();
    let v = assert_verifies(&out, &model);
    assert_eq!(v.checks[0].quant.as_ref().unwrap().sqnr_db, f64::INFINITY);
    let path = out.join("weights.parquet");
    let good = std::fs::read(&path).unwrap();
    let data = WeightFile::open(&out)
        .unwrap()
        .tensor("model.w")
        .unwrap()
        .data;
    let pos = good.windows(data.len()).position(|w| w == data).unwrap();
    // One code changed (the first of byte 10: its two highest bits), then one padding
    // bit of the last byte: each is one mismatch against the re-quantized source.
    for (at, flip) in [(10usize, 0b0100_0000u8), (data.len() - 1, 0b0000_0001)] {
        let mut bytes = good.clone();
        bytes[pos + at] ^= flip;
        std::fs::write(&path, &bytes).unwrap();
        let r = modelconv::verify(&out, Some(&open_source(&model)), &Default::default()).unwrap();
        let failed: Vec<_> = r.failures().collect();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].name, "model.w");
        assert_eq!(
            (failed[0].value_mismatches, failed[0].checksum_mismatches),
            (1, 1),
            "byte {at}"
        );
    }
}

#[test]
fn options_int2_cannot_express_are_refused() {
    let tmp = tempdir();
    let sym = Quantize {
        scheme: QuantScheme::Symmetric,
        ..Quantize::new(QuantType::Int2)
    };
    let err = ConvertConfig::builder()
        .quantize(Some(sym))
        .build()
        .unwrap_err();
    let want = "int2 quantization is asymmetric only (scale = (max - min) / 3, an integer zero \
                point): with zero point 0 one of its four codes [-2, 1] would go unused";
    assert!(matches!(err, Error::InvalidOption { .. }), "{err:?}");
    assert_eq!(err.to_string(), want);
    let model = fixture("tiny-bert");
    // Through the CLI: an invalid option, exit 2, nothing written.
    let out = tmp.path().join("o");
    let o = convert_cli(
        &model,
        &out,
        &["--quantize", "int2", "--quant-scheme", "symmetric"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(text(&o.stderr), format!("error: {want}\n"));
    assert!(!out.exists());
    let o = convert_cli(&model, &tmp.path().join("o"), &["--quantize", "int4"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).starts_with(
            "error: invalid value 'int4' for '--quantize <int8|int2>': unknown quantization \
             type `int4` (expected int8 or int2)"
        ),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn the_cli_defaults_to_groups_of_128_and_inspect_names_int2() {
    let tmp = tempdir();
    let out = tmp.path().join("o");
    converts(&fixture("tiny-bert"), &out, &["--quantize", "int2"]);
    let wf = WeightFile::open(&out).unwrap();
    let t = wf
        .tensors()
        .iter()
        .find(|t| t.quant.is_some())
        .unwrap()
        .clone();
    let q = t.quant.unwrap();
    assert_eq!((q.kind, q.axis, q.group_size), (QuantType::Int2, -1, 128));
    let o = modelconv(&["inspect", s(&out)]);
    ok(&o);
    assert!(
        text(&o.stdout).contains("int2, groups of 128, 128 scales"),
        "{}",
        text(&o.stdout)
    );
    // `--group-size 0` asks for one scale per channel.
    let out = tmp.path().join("p");
    converts(
        &fixture("tiny-bert"),
        &out,
        &["--quantize", "int2", "--group-size", "0"],
    );
    let wf = WeightFile::open(&out).unwrap();
    let q = wf.tensors().iter().find_map(|t| t.quant).unwrap();
    assert_eq!(
        (q.kind, q.axis, q.group_size, q.scales),
        (QuantType::Int2, 0, 0, 512)
    );
    let o = modelconv(&["verify", s(&out), "--source", s(&fixture("tiny-bert"))]);
    ok(&o);
}

#[test]
fn int2_in_parts_reads_and_verifies_as_the_single_file() {
    let tmp = tempdir();
    let (one, parted) = (tmp.path().join("one"), tmp.path().join("parted"));
    let q = ["--quantize", "int2", "-q"];
    ok(&convert_cli(&minilm(), &one, &q));
    // Parts of 2 MB: the word embeddings (2.9 MB of codes) are split over two of them.
    ok(&convert_cli(
        &minilm(),
        &parted,
        &[&q[..], &["--max-file-size", "2MB"]].concat(),
    ));
    let (wa, wb) = (
        WeightFile::open(&one).unwrap(),
        WeightFile::open(&parted).unwrap(),
    );
    let words = wb
        .tensors()
        .iter()
        .find(|t| t.name == "embeddings.word_embeddings.weight")
        .unwrap();
    assert_eq!((words.rows, words.bytes), (2, 30522 * 384 / 4));
    for t in wa.tensors() {
        let (x, y) = (wa.tensor(&t.name).unwrap(), wb.tensor(&t.name).unwrap());
        assert_eq!(x.data, y.data, "{}", t.name);
        assert_eq!(x.quant, y.quant, "{}", t.name);
    }
    ok(&modelconv(&[
        "verify",
        s(&parted),
        "--source",
        s(&minilm()),
    ]));
}
