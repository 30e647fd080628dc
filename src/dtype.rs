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
    F4,
    F6E2M3,
    F6E3M2,
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

/// `(dtype, safetensors name, torch name, bits per element)`: every dtype of the
/// safetensors spec (`safetensors/src/tensor.rs`).
const TABLE: &[(Dtype, &str, &str, usize)] = &[
    (Dtype::Bool, "BOOL", "torch.bool", 8),
    (Dtype::U8, "U8", "torch.uint8", 8),
    (Dtype::I8, "I8", "torch.int8", 8),
    (Dtype::F8E5M2, "F8_E5M2", "torch.float8_e5m2", 8),
    (Dtype::F8E4M3, "F8_E4M3", "torch.float8_e4m3fn", 8),
    (Dtype::F8E8M0, "F8_E8M0", "torch.float8_e8m0fnu", 8),
    (Dtype::F8E4M3Fnuz, "F8_E4M3FNUZ", "torch.float8_e4m3fnuz", 8),
    (Dtype::F8E5M2Fnuz, "F8_E5M2FNUZ", "torch.float8_e5m2fnuz", 8),
    // Sub-byte types: elements packed several to a byte. torch has no tensor dtype
    // for a single such element, so their names here are never parsed back.
    (Dtype::F4, "F4", "float4_e2m1", 4),
    (Dtype::F6E2M3, "F6_E2M3", "float6_e2m3", 6),
    (Dtype::F6E3M2, "F6_E3M2", "float6_e3m2", 6),
    (Dtype::I16, "I16", "torch.int16", 16),
    (Dtype::U16, "U16", "torch.uint16", 16),
    (Dtype::F16, "F16", "torch.float16", 16),
    (Dtype::Bf16, "BF16", "torch.bfloat16", 16),
    (Dtype::I32, "I32", "torch.int32", 32),
    (Dtype::U32, "U32", "torch.uint32", 32),
    (Dtype::F32, "F32", "torch.float32", 32),
    (Dtype::C64, "C64", "torch.complex64", 64),
    (Dtype::F64, "F64", "torch.float64", 64),
    (Dtype::I64, "I64", "torch.int64", 64),
    (Dtype::U64, "U64", "torch.uint64", 64),
];

/// The torch-style dtype names the seed's loader maps (`SEED-SYSTEM.md`), bf16 aside
/// (it lacks it; writing bf16 is allowed with a warning).
const SEED_LOADER_DTYPES: &[Dtype] = &[
    Dtype::F32,
    Dtype::F16,
    Dtype::F64,
    Dtype::I64,
    Dtype::I32,
    Dtype::I8,
    Dtype::U8,
    Dtype::Bool,
];

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

    /// Bytes per element. A sub-byte type ([`Dtype::is_sub_byte`]) has no whole
    /// number of bytes per element: its tensors are measured with [`Dtype::byte_len`],
    /// and only the dequantizers that consume them read them.
    pub fn size(self) -> usize {
        self.row().3.div_ceil(8)
    }

    /// Bits per element.
    pub fn bits(self) -> usize {
        self.row().3
    }

    /// True for the types that pack several elements per byte (F4, F6).
    pub fn is_sub_byte(self) -> bool {
        self.bits() < 8
    }

    /// Bytes that `numel` elements take; `None` when that overflows or, for a
    /// sub-byte type, is not a whole number of bytes.
    pub fn byte_len(self, numel: u64) -> Option<u64> {
        let bits = numel.checked_mul(self.bits() as u64)?;
        bits.is_multiple_of(8).then_some(bits / 8)
    }

    /// True for the 8-bit float types (E4M3, E5M2, E8M0 and the FNUZ variants).
    pub fn is_fp8(self) -> bool {
        matches!(
            self,
            Dtype::F8E4M3 | Dtype::F8E5M2 | Dtype::F8E8M0 | Dtype::F8E4M3Fnuz | Dtype::F8E5M2Fnuz
        )
    }

    /// True when the seed's loader maps this dtype's torch name to a numpy type; bf16,
    /// which it lacks, is allowed with a warning and counts as known here.
    pub fn seed_loader_reads(self) -> bool {
        self == Dtype::Bf16 || SEED_LOADER_DTYPES.contains(&self)
    }

    /// Parses a safetensors dtype string.
    pub fn from_safetensors(s: &str) -> Option<Dtype> {
        TABLE.iter().find(|r| r.1 == s).map(|r| r.0)
    }

    /// Parses a torch-style dtype string (`torch.float16`, also `float16`). Sub-byte
    /// types have no torch name.
    pub fn from_torch(s: &str) -> Option<Dtype> {
        let s = s.strip_prefix("torch.").unwrap_or(s);
        TABLE
            .iter()
            .filter(|r| r.3 >= 8)
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
            assert_eq!(r.0.bits(), r.3);
            if r.3 >= 8 {
                assert_eq!(Dtype::from_torch(r.2), Some(r.0));
                assert_eq!(r.0.size() * 8, r.3);
            } else {
                assert_eq!(Dtype::from_torch(r.2), None);
            }
        }
        assert_eq!(Dtype::F16.torch_name(), "torch.float16");
        assert_eq!(Dtype::Bf16.torch_name(), "torch.bfloat16");
        assert_eq!(Dtype::F4.byte_len(6), Some(3));
        assert_eq!(Dtype::F4.byte_len(5), None);
        assert_eq!(Dtype::F6E2M3.byte_len(4), Some(3));
        assert_eq!(Dtype::F6E3M2.byte_len(3), None);
        assert_eq!(Dtype::F32.byte_len(u64::MAX), None);
        assert!(Dtype::F8E4M3.is_fp8() && !Dtype::U8.is_fp8());
        assert!(!Dtype::F8E4M3.seed_loader_reads() && Dtype::Bf16.seed_loader_reads());
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
