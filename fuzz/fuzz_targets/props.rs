//! The property each fuzz target asserts of one input, in one place: the targets call
//! these, and `tests/fuzz_regressions.rs` replays every input kept under
//! `fuzz/regressions/<target>/` through the same functions on every `cargo test`.
//! A property fails by panicking.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use half::{bf16, f16};

#[path = "../../tests/common/rounding.rs"]
mod rounding;

use modelconv::internals::{
    cast_into, check_prefix, parse_header, pickle_load, source_tensors, torch_tensors, zip_entries,
};
use modelconv::{ConvertConfig, Dtype, ModelType, TargetDtype, WeightFile};

/// Any bytes as a safetensors file: an accepted header describes tensors that are
/// sorted, in bounds, sized by their shape and cover the data exactly.
pub fn header(data: &[u8]) {
    let p = Path::new("fuzz.safetensors");
    let len = data.len() as u64;
    let prefix = data.get(..8).and_then(|b| b.try_into().ok());
    let Ok(n) = check_prefix(p, prefix, len, 1 << 20) else {
        return;
    };
    let header = data
        .get(8..8 + n as usize)
        .expect("prefix accepted past the end");
    if let Ok(h) = parse_header(p, header, len) {
        let mut at = 8 + n;
        for t in &h.tensors {
            assert_eq!(t.offset, at, "tensors cover the data in order");
            // Sub-byte dtypes (F4, F6) by their bit count.
            assert_eq!(Some(t.len), t.dtype.byte_len(t.numel));
            assert_eq!(t.numel, t.shape.iter().product::<u64>());
            at += t.len;
        }
        assert_eq!(at, len, "the last tensor ends at the end of the file");
    }
}

/// Casts agree with `half`'s scalar conversions bit for bit, and the counts add up.
pub fn cast(data: &[u8]) {
    let n = data.len() / 4;
    let src = &data[..n * 4];
    let mut out = vec![0u8; n * 2];
    let st = cast_into(Dtype::F32, Dtype::F16, src, &mut out).expect("lengths match");
    let mut overflow = 0;
    for (i, b) in src.chunks_exact(4).enumerate() {
        let x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let want = f16::from_f32(x);
        let got = f16::from_le_bytes([out[2 * i], out[2 * i + 1]]);
        if x.is_nan() {
            assert!(got.is_nan());
        } else {
            assert_eq!(got.to_bits(), want.to_bits(), "{x}");
        }
        overflow += (x.is_finite() && got.is_infinite()) as u64;
    }
    assert_eq!(st.overflow, overflow);
    // bf16 -> f16 is the f32 path after an exact widening.
    let m = data.len() / 2;
    let mut out = vec![0u8; m * 2];
    cast_into(Dtype::Bf16, Dtype::F16, &data[..m * 2], &mut out).expect("lengths match");
    for (i, b) in data[..m * 2].chunks_exact(2).enumerate() {
        let x = bf16::from_le_bytes([b[0], b[1]]);
        let got = f16::from_le_bytes([out[2 * i], out[2 * i + 1]]);
        if !x.is_nan() {
            assert_eq!(got.to_bits(), f16::from_f32(x.to_f32()).to_bits());
        }
    }
}

/// Panics of the parquet crate this version cannot prevent; the reader contains them
/// and reports them as internal errors naming the file. parquet 60.1's packed
/// definition-level decoder reads a bit-packed run longer than the page's level data
/// without a bounds check (`PackedDecoder::read`); only the decompressed page shows it.
/// Found by the `weights` target (`fuzz/regressions/weights/found-e829c170…`).
pub const KNOWN_UPSTREAM_PANICS: &[&str] =
    &["the parquet reader panicked: offset + len out of bounds"];

/// Fails on an internal error (a bug, or a panic the reader caught), except the known
/// upstream panics.
fn no_internal_error(what: &str) {
    let known = KNOWN_UPSTREAM_PANICS.iter().any(|k| what.contains(k));
    assert!(
        !what.contains("internal error") || known,
        "a reader bug: {what}"
    );
}

/// Any bytes as weights.parquet: opening, listing, reading and verifying never panic
/// and never fail with an internal error; a tensor that reads back has exactly the bytes
/// its shape needs.
pub fn weights(data: &[u8]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("weights.parquet");
    std::fs::write(&path, data).expect("write");
    let wf = match WeightFile::open(&path) {
        Ok(wf) => wf,
        Err(e) => return no_internal_error(&e.to_string()),
    };
    for t in wf.tensors().iter().take(64) {
        match wf.tensor(&t.name) {
            Ok(x) => assert_eq!(x.data.len() as u64, t.bytes),
            Err(e) => no_internal_error(&e.to_string()),
        }
    }
    match modelconv::verify(&path, None, &Default::default()) {
        Ok(r) => {
            for p in r
                .problems
                .iter()
                .chain(r.checks.iter().flat_map(|c| &c.problems))
            {
                no_internal_error(p);
            }
        }
        Err(e) => no_internal_error(&e.to_string()),
    }
}

/// Any bytes as a pickle, then as a whole PyTorch checkpoint (zip or legacy): memory
/// bounded by the input, and every tensor accepted reads only bytes in the file.
pub fn pickle(data: &[u8]) {
    if let Ok(n) = pickle_load(data) {
        // Every opcode makes at most one value.
        assert!(n <= data.len(), "{n} values from {} bytes", data.len());
    }
    if let Ok(tensors) = torch_tensors(data) {
        for (name, _numel, offset, len) in tensors {
            let end = offset.checked_add(len).expect("tensor range overflows");
            assert!(
                end <= data.len() as u64,
                "tensor `{name}` reads past the file"
            );
        }
    }
}

/// Any bytes as a zip archive: every stored entry's data inside the file, names plain
/// relative paths and unique.
pub fn zip(data: &[u8]) {
    if let Ok(entries) = zip_entries(data) {
        let mut names = std::collections::HashSet::new();
        for (name, start, len) in entries {
            assert!(start
                .checked_add(len)
                .is_some_and(|e| e <= data.len() as u64));
            assert!(
                !name.starts_with('/') && !name.split('/').any(|c| c == ".."),
                "{name}"
            );
            assert!(names.insert(name.clone()), "duplicate {name}");
        }
    }
}

/// The sharded fixture, copied once into a directory of its own where each input
/// becomes its `model.safetensors.index.json`.
fn sharded_copy() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let rel = "tests/fixtures/tiny-llama-sharded-bf16";
        let src = [manifest.join(rel), manifest.join("..").join(rel)]
            .into_iter()
            .find(|p| p.is_dir())
            .expect("the sharded fixture");
        let dir = tempfile::tempdir().expect("tempdir");
        for e in std::fs::read_dir(&src).expect("fixture") {
            let e = e.expect("entry");
            let name = e.file_name();
            if name.to_string_lossy().ends_with(".safetensors") {
                std::fs::copy(e.path(), dir.path().join(&name)).expect("copy");
            }
        }
        dir
    })
    .path()
}

/// Any bytes as the shard index of five real shards: an accepted index maps exactly
/// the shards' tensors, each to the shard that holds it, and names no other file.
pub fn index(data: &[u8]) {
    let dir = sharded_copy();
    let path = dir.join("model.safetensors.index.json");
    std::fs::write(&path, data).expect("write");
    let Ok(tensors) = source_tensors(&path) else {
        return;
    };
    let map: serde_json::Value = serde_json::from_slice(data).expect("an accepted index is JSON");
    let map = map["weight_map"]
        .as_object()
        .expect("an accepted index has a weight_map");
    assert_eq!(
        map.len(),
        tensors.len(),
        "every mapped tensor is in a shard"
    );
    let mut seen = std::collections::HashSet::new();
    for (shard, name) in &tensors {
        assert!(seen.insert(name.clone()), "`{name}` twice");
        assert_eq!(shard.parent(), Some(dir), "{}", shard.display());
        let file = shard.file_name().and_then(|f| f.to_str());
        assert_eq!(map[name].as_str(), file, "`{name}` is mapped to its shard");
    }
}

/// Reads bytes off the front of a fuzz input; zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> usize {
        let b = self.0.first().copied().unwrap_or(0);
        self.0 = self.0.get(1..).unwrap_or(&[]);
        b as usize
    }

    fn take(&mut self, n: usize) -> Vec<u8> {
        let k = n.min(self.0.len());
        let mut v = self.0[..k].to_vec();
        self.0 = &self.0[k..];
        v.resize(n, 0);
        v
    }
}

/// The exact value of element `i` of `data` as `dtype`, for the castable floats.
fn value(dtype: Dtype, data: &[u8], i: usize) -> f64 {
    let b = |n: usize| &data[i * n..(i + 1) * n];
    match dtype {
        Dtype::F16 => f16::from_le_bytes(b(2).try_into().expect("2")).to_f64(),
        Dtype::Bf16 => bf16::from_le_bytes(b(2).try_into().expect("2")).to_f64(),
        Dtype::F32 => f32::from_le_bytes(b(4).try_into().expect("4")) as f64,
        Dtype::F64 => f64::from_le_bytes(b(8).try_into().expect("8")),
        other => panic!("{other} is not a castable float"),
    }
}

/// `v` rounded to nearest-even in `dtype`, as little-endian bytes (f16 and bf16 by the
/// midpoint reference: `half`'s `from_f64` rounds some values wrongly).
fn rounded(dtype: Dtype, v: f64) -> Vec<u8> {
    match dtype {
        Dtype::F16 => rounding::round_f64(v, false).to_le_bytes().to_vec(),
        Dtype::Bf16 => rounding::round_f64(v, true).to_le_bytes().to_vec(),
        Dtype::F32 => (v as f32).to_le_bytes().to_vec(),
        Dtype::F64 => v.to_le_bytes().to_vec(),
        other => panic!("{other} is not a castable float"),
    }
}

/// An arbitrary small valid checkpoint, built from the input, converted with an
/// arbitrary target dtype, row limit and I/O mode and read back: every tensor comes
/// back with its shape, the policy's dtype, and each value the source's rounded to
/// nearest-even in that dtype (copied bytes identical; NaN stays NaN).
pub fn roundtrip(data: &[u8]) {
    let mut r = Input(data);
    let targets = [
        TargetDtype::F16,
        TargetDtype::Bf16,
        TargetDtype::F32,
        TargetDtype::Keep,
    ];
    let target = targets[r.byte() % targets.len()];
    let dtypes = [
        Dtype::F32,
        Dtype::F16,
        Dtype::Bf16,
        Dtype::F64,
        Dtype::I32,
        Dtype::I64,
        Dtype::U8,
        Dtype::I8,
        Dtype::Bool,
    ];
    let count = 1 + r.byte() % 4;
    let mut tensors = Vec::new();
    for i in 0..count {
        let dtype = dtypes[r.byte() % dtypes.len()];
        let shape: Vec<u64> = (0..r.byte() % 3).map(|_| (r.byte() % 9) as u64).collect();
        let numel = shape.iter().product::<u64>() as usize;
        let mut bytes = r.take(numel * dtype.size());
        if dtype == Dtype::Bool {
            bytes.iter_mut().for_each(|b| *b &= 1);
        }
        tensors.push((format!("layers.{i}.weight"), dtype, shape, bytes));
    }
    let row_limit = 8 + 16 * r.byte() as u64;
    // Last, so inputs kept before it was read still mean what they meant (mapped).
    let io = [modelconv::IoMode::Mmap, modelconv::IoMode::Read][r.byte() % 2];
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("model.safetensors");
    std::fs::write(&input, safetensors(&tensors)).expect("write");
    let cfg = ConvertConfig::builder()
        .model_type(ModelType::CausalLm)
        .dtype(target)
        .allow_overflow(true)
        .threads(1)
        .io(io)
        .max_row_bytes(row_limit)
        .row_group_bytes(3 * row_limit)
        .build()
        .expect("options");
    let out = dir.path().join("out");
    modelconv::convert(&input, &out, &cfg).expect("a valid checkpoint converts");
    let wf = WeightFile::open(&out).expect("the converted file opens");
    assert_eq!(wf.tensors().len(), tensors.len());
    let castable = |d: Dtype| matches!(d, Dtype::F16 | Dtype::Bf16 | Dtype::F32 | Dtype::F64);
    for (name, dtype, shape, bytes) in &tensors {
        let t = wf.tensor(name).expect("every tensor reads back");
        assert_eq!(&t.shape, shape, "{name}");
        let want = match target {
            _ if !castable(*dtype) => *dtype,
            TargetDtype::F16 => Dtype::F16,
            TargetDtype::Bf16 => Dtype::Bf16,
            TargetDtype::F32 => Dtype::F32,
            TargetDtype::Keep => *dtype,
        };
        assert_eq!(t.dtype, want, "{name}");
        if want == *dtype {
            assert!(t.data == *bytes, "{name}: copied bytes differ");
            continue;
        }
        let (n, size) = (bytes.len() / dtype.size(), want.size());
        assert_eq!(t.data.len(), n * size, "{name}");
        for i in 0..n {
            let v = value(*dtype, bytes, i);
            let got = &t.data[i * size..(i + 1) * size];
            if v.is_nan() {
                assert!(value(want, got, 0).is_nan(), "{name}[{i}]: NaN lost");
            } else {
                assert_eq!(got, rounded(want, v).as_slice(), "{name}[{i}] = {v}");
            }
        }
    }
}

/// A safetensors file of `tensors` in order.
fn safetensors(tensors: &[(String, Dtype, Vec<u64>, Vec<u8>)]) -> Vec<u8> {
    let mut header = String::from("{");
    let mut at = 0;
    for (i, (name, dtype, shape, bytes)) in tensors.iter().enumerate() {
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        header += &format!(
            "{}\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":[{}],\"data_offsets\":[{at},{}]}}",
            if i > 0 { "," } else { "" },
            dims.join(","),
            at + bytes.len()
        );
        at += bytes.len();
    }
    header += "}";
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    for (_, _, _, bytes) in tensors {
        out.extend_from_slice(bytes);
    }
    out
}

/// A target's property of one input.
pub type Property = fn(&[u8]);

/// Every property by target name, for the regression replay.
pub const TARGETS: &[(&str, Property)] = &[
    ("header", header),
    ("scheme", scheme),
    ("cast", cast),
    ("weights", weights),
    ("pickle", pickle),
    ("zip", zip),
    ("index", index),
    ("roundtrip", roundtrip),
];

/// Any `config.json` and safetensors file as a checkpoint (the input: a u16 LE length,
/// that many bytes of config, then the safetensors file): the scheme matcher and the
/// dequantizers refuse what they cannot explain, never panic; an accepted checkpoint
/// converts (or is refused with an error that is not internal) into exactly the
/// planned tensors, each dequantized weight of its planned shape.
pub fn scheme(data: &[u8]) {
    let Some(n) = data
        .get(..2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    else {
        return;
    };
    let Some(config) = data.get(2..2 + n) else {
        return;
    };
    let weights = &data[2 + n..];
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("m");
    std::fs::create_dir(&model).expect("mkdir");
    std::fs::write(model.join("config.json"), config).expect("write");
    std::fs::write(model.join("model.safetensors"), weights).expect("write");
    let cfg = ConvertConfig::builder()
        .threads(1)
        .dtype(TargetDtype::F32)
        .build()
        .expect("options");
    let plan = match modelconv::plan_conversion(&model, &cfg) {
        Ok(p) => p,
        Err(e) => return no_internal_error(&e.to_string()),
    };
    // Keep the conversions small: the fuzzer's shapes can ask for gigabytes of f32.
    if plan.output_bytes > 64 << 20 {
        return;
    }
    let out = dir.path().join("o");
    match modelconv::convert(&model, &out, &cfg) {
        Ok(r) => {
            assert_eq!(r.tensors, plan.kept.len());
            let wf = WeightFile::open(&out).expect("written file opens");
            for k in &plan.kept {
                let t = wf.tensor(&k.name).expect("planned tensor");
                assert_eq!(t.shape, k.shape, "{}", k.name);
                assert_eq!(t.data.len() as u64, k.bytes, "{}", k.name);
            }
        }
        Err(e) => no_internal_error(&e.to_string()),
    }
}

/// The kept inputs of `target`, sorted.
pub fn regressions(root: &Path, target: &str) -> Vec<PathBuf> {
    let dir = root.join("fuzz/regressions").join(target);
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| rd.map(|e| e.expect("entry").path()).collect())
        .unwrap_or_default();
    out.sort();
    out
}
