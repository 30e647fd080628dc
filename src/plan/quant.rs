//! What the plan decides of quantization: the options (`--quantize`, its scheme,
//! groups and skips) and, per tensor, whether and how it is quantized ([`QuantSpec`]).
//! The cast stage carries the decision out.

use serde::Serialize;

/// How int8 codes map to values (`--quant-scheme`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantScheme {
    /// `scale = max|x| / 127`, zero point 0 (default).
    #[default]
    Symmetric,
    /// 256 levels over `[min, max]` with an integer zero point.
    Asymmetric,
}

impl std::str::FromStr for QuantScheme {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "symmetric" => Ok(QuantScheme::Symmetric),
            "asymmetric" => Ok(QuantScheme::Asymmetric),
            o => Err(format!(
                "unknown quantization scheme `{o}` (expected symmetric or asymmetric)"
            )),
        }
    }
}

impl QuantScheme {
    /// The name used on the command line and in metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            QuantScheme::Symmetric => "symmetric",
            QuantScheme::Asymmetric => "asymmetric",
        }
    }
}

/// What `--quantize int8` does.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Quantize {
    /// How codes map to values.
    pub scheme: QuantScheme,
    /// Elements per group of the flattened tensor; 0 (default) is per channel along
    /// axis 0.
    pub group_size: u64,
    /// Tensors never quantized, by glob on the output name (`--quantize-skip`).
    pub skip: Vec<String>,
}

/// Tensors smaller than this stay unquantized: their scales would cost more than the
/// codes save, and their error weighs more (a LayerNorm-sized vector).
pub const MIN_QUANT_ELEMENTS: u64 = 4096;

/// How one tensor is quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QuantSpec {
    pub(crate) scheme: QuantScheme,
    /// Elements sharing one scale: a channel (per-channel) or a group.
    pub(crate) unit: u64,
    /// The V2 `quant_axis`: 0 per-channel, -1 per-group.
    pub(crate) axis: i32,
    /// The V2 `group_size`: 0 per-channel.
    pub(crate) group_size: u64,
}

impl Quantize {
    /// How the tensor `name` of `shape` and source `dtype` is quantized, if it is: a
    /// floating-point matrix (rank ≥ 2) of at least [`MIN_QUANT_ELEMENTS`] that no skip
    /// glob names. Biases, norms, scalars and integer or bool buffers never are.
    pub(crate) fn spec_for(
        &self,
        name: &str,
        dtype: crate::Dtype,
        shape: &[u64],
    ) -> Option<QuantSpec> {
        let numel: u64 = shape.iter().product();
        let eligible = dtype.is_castable_float()
            && shape.len() >= 2
            && numel >= MIN_QUANT_ELEMENTS
            && !self.skip.iter().any(|g| crate::glob::glob_match(g, name));
        if !eligible {
            return None;
        }
        Some(if self.group_size > 0 {
            QuantSpec {
                scheme: self.scheme,
                unit: self.group_size,
                axis: -1,
                group_size: self.group_size,
            }
        } else {
            QuantSpec {
                scheme: self.scheme,
                unit: numel / shape[0],
                axis: 0,
                group_size: 0,
            }
        })
    }
}
