//! Helpers shared by the integration tests. Sources are read with the `safetensors`
//! crate (not our parser) and expected casts are computed element by element with
//! `half`, so the expectations never come from the code under test.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::{Dtype as StDtype, SafeTensors};

pub mod files;
pub mod hub;
pub mod prequant;
pub mod rounding;
pub mod run;

// Not every test file uses every helper: the same as `dead_code` above.
#[allow(unused_imports)]
pub use files::*;
#[allow(unused_imports)]
pub use run::*;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

pub const FIXTURES: &[&str] = &[
    "tiny-bert",
    "tiny-sentence-transformer",
    "tiny-clip",
    "tiny-whisper",
    "tiny-llama-sharded-bf16",
];

/// One source tensor.
#[derive(Debug, Clone)]
pub struct Src {
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Every tensor of a model directory (single file or shards), by name.
pub fn read_source(dir: &Path) -> BTreeMap<String, Src> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    let mut out = BTreeMap::new();
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            let prev = out.insert(
                name.clone(),
                Src {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    data: view.data().to_vec(),
                },
            );
            assert!(prev.is_none(), "fixture has duplicate {name}");
        }
    }
    out
}

pub fn torch_name(d: StDtype) -> &'static str {
    match d {
        StDtype::F16 => "torch.float16",
        StDtype::BF16 => "torch.bfloat16",
        StDtype::F32 => "torch.float32",
        StDtype::F64 => "torch.float64",
        StDtype::I64 => "torch.int64",
        StDtype::I32 => "torch.int32",
        StDtype::I8 => "torch.int8",
        StDtype::U8 => "torch.uint8",
        StDtype::BOOL => "torch.bool",
        other => panic!("unexpected dtype {other:?}"),
    }
}

fn is_float(d: StDtype) -> bool {
    matches!(
        d,
        StDtype::F16 | StDtype::BF16 | StDtype::F32 | StDtype::F64
    )
}

fn values_f64(d: StDtype, data: &[u8]) -> Vec<f64> {
    match d {
        StDtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        StDtype::BF16 => data
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f64())
            .collect(),
        StDtype::F16 => data
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f64())
            .collect(),
        StDtype::F64 => data
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        _ => unreachable!(),
    }
}

/// The bytes and torch dtype a tensor must have in the output under `--dtype target`.
pub fn expected(src: &Src, target: &str) -> (Vec<u8>, &'static str) {
    if !is_float(src.dtype) || target == "keep" {
        return (src.data.clone(), torch_name(src.dtype));
    }
    let v = values_f64(src.dtype, &src.data);
    match target {
        "f16" => {
            let out = match src.dtype {
                // f32 and bf16 (exactly widened to f32) round once, f32 → f16.
                StDtype::F32 | StDtype::BF16 | StDtype::F16 => v
                    .iter()
                    .flat_map(|x| f16::from_f32(*x as f32).to_le_bytes())
                    .collect(),
                // f64 rounds once, f64 → f16 (not through half's from_f64: see rounding).
                _ => v
                    .iter()
                    .flat_map(|x| rounding::round_f64(*x, false).to_le_bytes())
                    .collect(),
            };
            (out, "torch.float16")
        }
        "bf16" => {
            let out = match src.dtype {
                StDtype::F64 => v
                    .iter()
                    .flat_map(|x| rounding::round_f64(*x, true).to_le_bytes())
                    .collect(),
                _ => v
                    .iter()
                    .flat_map(|x| bf16::from_f32(*x as f32).to_le_bytes())
                    .collect(),
            };
            (out, "torch.bfloat16")
        }
        "f32" => (
            v.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect(),
            "torch.float32",
        ),
        t => panic!("unknown target {t}"),
    }
}

/// Asserts that every tensor of `out` (a conversion output dir) equals the expected
/// cast of its source, bit for bit. `names` maps output name → source name.
pub fn assert_matches_source(
    out: &Path,
    source: &BTreeMap<String, Src>,
    names: &[(String, String)],
    target: &str,
) {
    let wf = modelconv::WeightFile::open(out).unwrap();
    assert_eq!(wf.tensors().len(), names.len(), "tensor count");
    for (out_name, src_name) in names {
        let src = &source[src_name];
        let t = wf
            .tensor(out_name)
            .unwrap_or_else(|e| panic!("{out_name}: {e}"));
        let (bytes, dtype) = expected(src, target);
        assert_eq!(t.dtype.torch_name(), dtype, "{out_name} dtype");
        assert_eq!(
            t.shape,
            src.shape.iter().map(|&d| d as u64).collect::<Vec<_>>(),
            "{out_name} shape"
        );
        let info = wf.info(out_name).unwrap();
        assert_eq!(
            info.num_params,
            src.shape.iter().product::<usize>() as u64,
            "{out_name} num_params"
        );
        assert!(
            t.data == bytes,
            "{out_name}: bytes differ from the expected {target} cast of the source"
        );
    }
}

/// Identity name map of a source, in name order.
pub fn same_names(source: &BTreeMap<String, Src>) -> Vec<(String, String)> {
    source.keys().map(|k| (k.clone(), k.clone())).collect()
}

/// The Python of the test venv (made by scripts/setup-test-env.sh).
pub fn python() -> PathBuf {
    let p = root().join(".venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup-test-env.sh (scripts/test.sh does)",
        p.display()
    );
    p
}

/// The trained all-MiniLM-L6-v2 (fetched by scripts/setup-test-env.sh).
pub fn minilm() -> PathBuf {
    let p = root().join(".cache/all-MiniLM-L6-v2");
    assert!(
        p.join("model.safetensors").exists(),
        "{} is missing: run scripts/setup-test-env.sh (scripts/test.sh does)",
        p.display()
    );
    p
}

/// Options that make a conversion slow and finely stepped (zstd 19 on one thread, 1 MiB
/// row groups), for tests that act on a conversion while it writes.
pub const SLOW_CONVERT: [&str; 6] = ["--level", "19", "--threads", "1", "--row-group-mb", "1"];

/// Options that make a conversion in 8 MB parts slow enough to kill after its first
/// part; the thread count is not part of a plan, so a resumed run may use more.
pub const SLOW_PARTED: [&str; 6] = [
    "--level",
    "19",
    "--row-group-mb",
    "1",
    "--max-file-size",
    "8MB",
];

/// Options that keep every tensor whatever the family, cast to `target`: `transformers`
/// on a model it recognises keeps the base model, `causallm` keeps everything.
pub fn every_tensor(target: modelconv::TargetDtype) -> modelconv::ConvertConfig {
    modelconv::ConvertConfig::builder()
        .dtype(target)
        .model_type(modelconv::ModelType::CausalLm)
        .build()
        .unwrap()
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("modelconv-test-")
        .tempdir()
        .unwrap()
}

/// Writes a safetensors file from `(name, dtype, shape, bytes)` in the given order.
pub fn write_safetensors(path: &Path, tensors: &[(&str, &str, Vec<u64>, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (name, dtype, shape, data) in tensors {
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [off, off + data.len()]}),
        );
        off += data.len();
    }
    let mut text = serde_json::Value::Object(header).to_string();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    f.write_all(&(text.len() as u64).to_le_bytes()).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    for (_, _, _, d) in tensors {
        f.write_all(d).unwrap();
    }
    f.flush().unwrap();
}

/// A fast deterministic normal-ish generator (xorshift + Box–Muller), std 0.02.
pub struct Normal(u64);

impl Normal {
    pub fn new(seed: u64) -> Self {
        Normal(seed | 1)
    }
    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn fill_f32(&mut self, out: &mut [u8]) {
        for c in out.chunks_exact_mut(8) {
            let u1 = ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
            let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            let r = (-2.0 * u1.ln()).sqrt() * 0.02;
            let (s, co) = (2.0 * std::f64::consts::PI * u2).sin_cos();
            c[..4].copy_from_slice(&((r * co) as f32).to_le_bytes());
            c[4..].copy_from_slice(&((r * s) as f32).to_le_bytes());
        }
    }
}

/// Builds a full-size checkpoint from a manifest (config.json + safetensors header),
/// filling float data with normal values (std 0.02) and integers with zeros.
pub fn build_from_manifest(manifest: &Path, dir: &Path) {
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(manifest).unwrap()).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&m["config"]).unwrap(),
    )
    .unwrap();
    let header = &m["safetensors_header"];
    let text = {
        let mut t = header.to_string();
        while !t.len().is_multiple_of(8) {
            t.push(' ');
        }
        t
    };
    let mut entries: Vec<(u64, u64, String)> = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(_, v)| {
            let o = v["data_offsets"].as_array().unwrap();
            (
                o[0].as_u64().unwrap(),
                o[1].as_u64().unwrap(),
                v["dtype"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    entries.sort();
    let mut f = std::io::BufWriter::with_capacity(
        1 << 22,
        std::fs::File::create(dir.join("model.safetensors")).unwrap(),
    );
    f.write_all(&(text.len() as u64).to_le_bytes()).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    let mut rng = Normal::new(42);
    let mut buf = vec![0u8; 1 << 20];
    for (b, e, dtype) in entries {
        let mut left = (e - b) as usize;
        while left > 0 {
            let n = left.min(buf.len());
            if dtype == "F32" && n.is_multiple_of(8) {
                rng.fill_f32(&mut buf[..n]);
            } else {
                buf[..n].fill(0);
            }
            f.write_all(&buf[..n]).unwrap();
            left -= n;
        }
    }
    f.flush().unwrap();
}

/// Copies every file of `src` (flat) into `dst`.
pub fn copy_dir(src: &Path, dst: &Path) -> PathBuf {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
        }
    }
    dst.to_path_buf()
}

/// f16 element bytes widened exactly to f32 element bytes.
pub fn widen_f16(bytes: &[u8]) -> Vec<u8> {
    bytes
        .chunks_exact(2)
        .flat_map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32().to_le_bytes())
        .collect()
}

/// Asserts that an exported safetensors file holds exactly the source's tensors
/// (names, dtypes, shapes, bytes).
pub fn assert_safetensors_equal_source(path: &Path, src: &BTreeMap<String, Src>) {
    let bytes = std::fs::read(path).unwrap();
    let back = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(back.len(), src.len(), "{}", path.display());
    for (n, s) in src {
        let t = back.tensor(n).unwrap();
        assert_eq!((t.dtype(), t.shape()), (s.dtype, &s.shape[..]), "{n}");
        assert!(t.data() == &s.data[..], "{n}: bytes differ");
    }
}

/// A checkpoint opened the way `verify --source` opens it.
pub fn open_source(p: &Path) -> modelconv::Source {
    modelconv::open_source(p, &Default::default()).unwrap()
}

/// Verifies `out` against the checkpoint at `source`, value for value, and requires it
/// to pass.
pub fn assert_verifies(out: &Path, source: &Path) -> modelconv::VerifyReport {
    let report = modelconv::verify(out, Some(&open_source(source)), &Default::default()).unwrap();
    assert!(
        report.passed(),
        "{:?}",
        report.failures().collect::<Vec<_>>()
    );
    report
}

/// `n` f32 values in [-0.05, 0.05) from a xorshift stream, as little-endian bytes: the
/// magnitude of trained weights, every value f16-representable without overflow.
pub fn weights_f32(n: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1).to_le_bytes()
        })
        .collect()
}

/// f32 values as little-endian bytes.
pub fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// f32 element bytes rounded to f16 element bytes.
pub fn f32_bytes_to_f16(bytes: &[u8]) -> Vec<u8> {
    bytes
        .chunks_exact(4)
        .flat_map(|b| f16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]])).to_le_bytes())
        .collect()
}

/// f32 element bytes rounded to bf16 element bytes.
pub fn f32_bytes_to_bf16(bytes: &[u8]) -> Vec<u8> {
    bytes
        .chunks_exact(4)
        .flat_map(|b| bf16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]])).to_le_bytes())
        .collect()
}
