//! What the pre-quantized checkpoint tests share (`tests/prequant*.rs`): the fixtures
//! and their references, the rounding the references are compared after, the plain
//! conversion config, an independent int8 quantizer, editing a fixture's tensors, and
//! a refusal through the real binary.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use modelconv::{ConvertConfig, TargetDtype};
use safetensors::SafeTensors;

use super::{fixture, modelconv, s, write_safetensors};

/// The pre-quantized fixture `name`.
pub fn model(name: &str) -> PathBuf {
    fixture("prequant").join(name)
}

/// The fixture's reference (`NAME.reference.safetensors`, written by its producer's
/// own dequantizer): every dequantized weight's shape and f32 values.
pub fn reference(name: &str) -> BTreeMap<String, (Vec<u64>, Vec<f32>)> {
    let bytes =
        std::fs::read(fixture("prequant").join(format!("{name}.reference.safetensors"))).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F32);
            let vals = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (n, (v.shape().iter().map(|&d| d as u64).collect(), vals))
        })
        .collect()
}

/// `x` rounded once to `target` (`f16`, `bf16`, else f32), as bytes, every sign of
/// zero kept.
pub fn round_exact(x: &[f32], target: &str) -> Vec<u8> {
    match target {
        "f16" => x
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        "bf16" => x
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// [`round_exact`] with every zero +0: the producers disagree on the sign of a zero
/// code (bitsandbytes' FP4 code 8 is +0 on the CPU and −0 on CUDA; E2M1's code 8 is −0
/// for compressed-tensors and +0 for ModelOpt), so ±0 are compared as equal, through
/// [`plus_zero`] on both sides.
pub fn round(x: &[f32], target: &str) -> Vec<u8> {
    let width = if target == "f16" || target == "bf16" {
        2
    } else {
        4
    };
    plus_zero(&round_exact(x, target), width)
}

/// `b` (little-endian values of `width` bytes) with every −0 made +0.
pub fn plus_zero(b: &[u8], width: usize) -> Vec<u8> {
    let mut out = b.to_vec();
    for v in out.chunks_exact_mut(width) {
        let top = width - 1;
        if v[top] == 0x80 && v[..top].iter().all(|&x| x == 0) {
            v[top] = 0;
        }
    }
    out
}

/// A conversion to `dtype` with every other option at its default.
pub fn cfg(dtype: TargetDtype) -> ConvertConfig {
    ConvertConfig::builder().dtype(dtype).build().unwrap()
}

/// Independent int8 quantization, per row or per group of the flattened tensor:
/// `scale = max|x| / 127` (1 for a zero unit), codes `round_ties_even(x / scale)`.
pub fn int8(x: &[f32], unit: usize) -> (Vec<i8>, Vec<f32>) {
    let mut codes = Vec::with_capacity(x.len());
    let mut scales = Vec::new();
    for u in x.chunks(unit) {
        let amax = u.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s = if amax > 0.0 { amax / 127.0 } else { 1.0 };
        scales.push(s);
        codes.extend(
            u.iter()
                .map(|v| (v / s).round_ties_even().clamp(-128.0, 127.0) as i8),
        );
    }
    (codes, scales)
}

/// A stored tensor as [`edit`] hands it over: name, safetensors dtype, shape, bytes.
pub type Entry = (String, String, Vec<u64>, Vec<u8>);

/// Rewrites a safetensors file in place through `f` over its tensors, sorted by name.
pub fn edit(path: &Path, f: impl FnOnce(&mut Vec<Entry>)) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<Entry> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let shape = v.shape().iter().map(|&d| d as u64).collect();
            (n, format!("{:?}", v.dtype()), shape, v.data().to_vec())
        })
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    f(&mut tensors);
    let refs: Vec<(&str, &str, Vec<u64>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.as_str(), d.as_str(), s.clone(), b.clone()))
        .collect();
    write_safetensors(path, &refs);
}

/// `convert INPUT -o TMP/out` through the binary fails with exit 1 and `error: WANT`
/// as its error line, without a panic, and leaves no output.
pub fn refused_with_error_line(input: &Path, tmp: &Path, want: &str) {
    let out = tmp.join("out");
    let o = modelconv(&["convert", s(input), "-o", s(&out)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(o.status.code(), Some(1), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_default();
    assert_eq!(line, format!("error: {want}"), "{err}");
    assert!(!out.exists(), "output left behind for {want}");
}
