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

/// The V2 `quant_type` of quantized rows (`--quantize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantType {
    /// One signed byte per element, codes in [-128, 127] (default).
    #[default]
    Int8,
    /// Codes in [-2, 1] stored as `q + 2`, four per byte over the flattened tensor,
    /// the first element in the two highest bits.
    Int2,
}

impl std::str::FromStr for QuantType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "int8" => Ok(QuantType::Int8),
            "int2" => Ok(QuantType::Int2),
            o => Err(format!(
                "unknown quantization type `{o}` (expected int8 or int2)"
            )),
        }
    }
}

impl QuantType {
    /// The V2 `quant_type` cell, also the name used on the command line and in metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            QuantType::Int8 => "int8",
            QuantType::Int2 => "int2",
        }
    }

    /// Bits per code.
    pub fn bits(self) -> u32 {
        match self {
            QuantType::Int8 => 8,
            QuantType::Int2 => 2,
        }
    }

    /// Codes per stored byte.
    pub fn per_byte(self) -> u64 {
        (8 / self.bits()) as u64
    }

    /// Bytes that `elems` codes take (the last byte of int2 padded).
    pub fn bytes(self, elems: u64) -> u64 {
        elems.div_ceil(self.per_byte())
    }

    /// The group size used when none is asked for: 0 (per channel) for int8, 128 for
    /// int2 (the seed's default: four levels per channel of thousands of values lose
    /// too much).
    pub fn default_group_size(self) -> u64 {
        match self {
            QuantType::Int8 => 0,
            QuantType::Int2 => 128,
        }
    }

    /// The scheme used when none is asked for: symmetric for int8, asymmetric for
    /// int2 (the only one int2 has: see `docs/quantized-v2.md`).
    pub fn default_scheme(self) -> QuantScheme {
        match self {
            QuantType::Int8 => QuantScheme::Symmetric,
            QuantType::Int2 => QuantScheme::Asymmetric,
        }
    }
}

/// What `--quantize` does.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Quantize {
    /// The codes written (`quant_type`).
    pub kind: QuantType,
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
    /// The codes written.
    pub(crate) kind: QuantType,
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

impl Carry {
    /// The spec of a weight of `shape` carried with `self`: per channel (V2 `quant_axis`
    /// 0) when a group is an index of axis 0, else per group.
    pub(crate) fn spec(self, kind: QuantType, shape: &[u64]) -> QuantSpec {
        let numel: u64 = shape.iter().product();
        let row = shape
            .first()
            .map_or(numel, |&d0| numel.checked_div(d0).unwrap_or(0));
        let per_channel = self.group == row;
        QuantSpec {
            kind,
            scheme: QuantScheme::Asymmetric,
            unit: self.group,
            axis: if per_channel { 0 } else { -1 },
            group_size: if per_channel { 0 } else { self.group },
            carried: true,
        }
    }
}

impl QuantSpec {
    /// Elements a row holds a multiple of (all rows of a tensor but its last): whole
    /// units, and for packed codes whole bytes, so that the rows' bytes concatenated
    /// are the packed tensor.
    pub(crate) fn row_align(&self) -> u64 {
        let (a, b) = (self.unit.max(1), self.kind.per_byte());
        let mut g = (a, b);
        while g.1 != 0 {
            g = (g.1, g.0 % g.1);
        }
        (a / g.0).saturating_mul(b)
    }
}

impl Quantize {
    /// `kind` with its default scheme and group size, no skips.
    pub fn new(kind: QuantType) -> Quantize {
        Quantize {
            kind,
            scheme: kind.default_scheme(),
            group_size: kind.default_group_size(),
            skip: Vec::new(),
        }
    }

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
                kind: self.kind,
                scheme: self.scheme,
                unit: self.group_size,
                axis: -1,
                group_size: self.group_size,
                carried: false,
            }
        } else {
            QuantSpec {
                kind: self.kind,
                scheme: self.scheme,
                unit: numel / shape[0],
                axis: 0,
                group_size: 0,
                carried: false,
            }
        })
    }
}
