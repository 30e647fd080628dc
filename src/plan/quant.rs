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
    /// True when the tensor is a pre-quantized weight written from its own codes,
    /// scales and zero points ([`Carry`]) rather than quantized from its values.
    pub(crate) carried: bool,
}

/// How a pre-quantized weight's integer codes go into V2 unchanged: the cast stage's
/// decoder says whether they can (`cast::carry`), from the weight's description and
/// small metadata (a `g_idx`), before any row is sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Carry {
    /// Elements per scale and zero point, contiguous in the flattened output: a whole
    /// output row (per channel, or a per-tensor scale repeated per row) or a group.
    pub(crate) group: u64,
    /// The width of the source codes in bits: a V2 type of `n` bits holds codes of at
    /// most `n` (int8 any up to 8).
    pub(crate) bits: u32,
}

/// The cast stage's answer to "can this weight be carried", handed to the plan (which
/// sits below the cast) by its caller; the reason when it cannot.
pub(crate) type CarryFn =
    fn(&crate::source::Source, &crate::source::Dequantized) -> std::result::Result<Carry, String>;

/// The bits of the codes a V2 int8 row holds.
pub(crate) const INT8_BITS: u32 = 8;

impl Carry {
    /// The spec of a weight of `shape` carried with `self`: per channel (V2 `quant_axis`
    /// 0) when a group is an index of axis 0, else per group.
    pub(crate) fn spec(self, shape: &[u64]) -> QuantSpec {
        let numel: u64 = shape.iter().product();
        let row = shape
            .first()
            .map_or(numel, |&d0| numel.checked_div(d0).unwrap_or(0));
        let per_channel = self.group == row;
        QuantSpec {
            scheme: QuantScheme::Asymmetric,
            unit: self.group,
            axis: if per_channel { 0 } else { -1 },
            group_size: if per_channel { 0 } else { self.group },
            carried: true,
        }
    }
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
                carried: false,
            }
        } else {
            QuantSpec {
                scheme: self.scheme,
                unit: numel / shape[0],
                axis: 0,
                group_size: 0,
                carried: false,
            }
        })
    }
}
