//! Element types: safetensors names, torch-style names, sizes and the cast policy.

use std::fmt;
use std::str::FromStr;

/// An element type as safetensors spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    F8E5M2,
    F8E4M3,
    F8E8M0,
    F8E4M3Fnuz,
    F8E5M2Fnuz,
    I16,
    U16,
    F16,
    Bf16,
    I32,
    U32,
    F32,
    C64,
    F64,
    I64,
    U64,
}

/// `(dtype, safetensors name, torch name, bytes per element)`.
const TABLE: &[(Dtype, &str, &str, usize)] = &[
    (Dtype::Bool, "BOOL", "torch.bool", 1),
    (Dtype::U8, "U8", "torch.uint8", 1),
    (Dtype::I8, "I8", "torch.int8", 1),
    (Dtype::F8E5M2, "F8_E5M2", "torch.float8_e5m2", 1),
    (Dtype::F8E4M3, "F8_E4M3", "torch.float8_e4m3fn", 1),
    (Dtype::F8E8M0, "F8_E8M0", "torch.float8_e8m0fnu", 1),
    (Dtype::F8E4M3Fnuz, "F8_E4M3FNUZ", "torch.float8_e4m3fnuz", 1),
    (Dtype::F8E5M2Fnuz, "F8_E5M2FNUZ", "torch.float8_e5m2fnuz", 1),
    (Dtype::I16, "I16", "torch.int16", 2),
    (Dtype::U16, "U16", "torch.uint16", 2),
    (Dtype::F16, "F16", "torch.float16", 2),
    (Dtype::Bf16, "BF16", "torch.bfloat16", 2),
    (Dtype::I32, "I32", "torch.int32", 4),
    (Dtype::U32, "U32", "torch.uint32", 4),
    (Dtype::F32, "F32", "torch.float32", 4),
    (Dtype::C64, "C64", "torch.complex64", 8),
    (Dtype::F64, "F64", "torch.float64", 8),
    (Dtype::I64, "I64", "torch.int64", 8),
    (Dtype::U64, "U64", "torch.uint64", 8),
];

/// Safetensors dtypes that pack several elements per byte; the weight format has no
/// torch-style name for them.
pub(crate) const SUB_BYTE: &[&str] = &["F4", "F6_E2M3", "F6_E3M2"];

impl Dtype {
    fn row(self) -> &'static (Dtype, &'static str, &'static str, usize) {
        // The table lists every variant; the fallback is never reached.
        TABLE.iter().find(|r| r.0 == self).unwrap_or(&TABLE[0])
    }

    /// The safetensors spelling (`F32`, `BF16`, ...).
    pub fn safetensors_name(self) -> &'static str {
        self.row().1
    }

    /// The torch-style spelling the seed's loader maps (`torch.float16`, ...).
    pub fn torch_name(self) -> &'static str {
        self.row().2
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        self.row().3
    }

    /// Parses a safetensors dtype string.
    pub fn from_safetensors(s: &str) -> Option<Dtype> {
        TABLE.iter().find(|r| r.1 == s).map(|r| r.0)
    }

    /// Parses a torch-style dtype string (`torch.float16`, also `float16`).
    pub fn from_torch(s: &str) -> Option<Dtype> {
        let s = s.strip_prefix("torch.").unwrap_or(s);
        TABLE
            .iter()
            .find(|r| &r.2["torch.".len()..] == s)
            .map(|r| r.0)
            .or(match s {
                "half" => Some(Dtype::F16),
                "float" => Some(Dtype::F32),
                "double" => Some(Dtype::F64),
                "long" => Some(Dtype::I64),
                "int" => Some(Dtype::I32),
                _ => None,
            })
    }

    /// True for the floating types the cast policy converts (f16, bf16, f32, f64).
    /// fp8 and complex are never cast.
    pub fn is_castable_float(self) -> bool {
        matches!(self, Dtype::F16 | Dtype::Bf16 | Dtype::F32 | Dtype::F64)
    }
}

impl serde::Serialize for Dtype {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.safetensors_name())
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.safetensors_name())
    }
}

/// What floating-point tensors become (`--dtype`). Integers, bools, fp8 and complex
/// tensors are never cast.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetDtype {
    /// IEEE half precision, the seed's `use_float16` (default).
    #[default]
    F16,
    /// bfloat16.
    Bf16,
    /// IEEE single precision.
    F32,
    /// No cast: bytes are copied as they are.
    Keep,
}

impl TargetDtype {
    /// The output dtype of a source tensor under this policy.
    pub fn output_for(self, src: Dtype) -> Dtype {
        if !src.is_castable_float() {
            return src;
        }
        match self {
            TargetDtype::F16 => Dtype::F16,
            TargetDtype::Bf16 => Dtype::Bf16,
            TargetDtype::F32 => Dtype::F32,
            TargetDtype::Keep => src,
        }
    }

    /// The name used on the command line and in the footer (`f16`, `bf16`, `f32`, `keep`).
    pub fn as_str(self) -> &'static str {
        match self {
            TargetDtype::F16 => "f16",
            TargetDtype::Bf16 => "bf16",
            TargetDtype::F32 => "f32",
            TargetDtype::Keep => "keep",
        }
    }
}

impl FromStr for TargetDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f16" | "float16" | "fp16" | "half" => Ok(TargetDtype::F16),
            "bf16" | "bfloat16" => Ok(TargetDtype::Bf16),
            "f32" | "float32" | "fp32" | "float" => Ok(TargetDtype::F32),
            "keep" | "none" => Ok(TargetDtype::Keep),
            other => Err(format!(
                "unknown dtype `{other}` (expected f16, bf16, f32 or keep)"
            )),
        }
    }
}

impl fmt::Display for TargetDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for r in TABLE {
            assert_eq!(Dtype::from_safetensors(r.1), Some(r.0));
            assert_eq!(Dtype::from_torch(r.2), Some(r.0));
            assert_eq!(r.0.size(), r.3);
        }
        assert_eq!(Dtype::F16.torch_name(), "torch.float16");
        assert_eq!(Dtype::Bf16.torch_name(), "torch.bfloat16");
        assert_eq!(Dtype::from_safetensors("F4"), None);
    }

    #[test]
    fn policy_never_casts_integers_or_fp8() {
        for t in [
            TargetDtype::F16,
            TargetDtype::Bf16,
            TargetDtype::F32,
            TargetDtype::Keep,
        ] {
            for d in [
                Dtype::I64,
                Dtype::Bool,
                Dtype::U8,
                Dtype::F8E4M3,
                Dtype::C64,
            ] {
                assert_eq!(t.output_for(d), d);
            }
        }
        assert_eq!(TargetDtype::F16.output_for(Dtype::Bf16), Dtype::F16);
        assert_eq!(TargetDtype::Keep.output_for(Dtype::F64), Dtype::F64);
    }
}
