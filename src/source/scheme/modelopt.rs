//! NVIDIA ModelOpt (`modelopt`, declared in `config.json`'s `quantization_config` or
//! only in `hf_quant_config.json`): one `quant_algo` for the checkpoint, or
//! `MIXED_PRECISION` with a `quantized_layers` map giving each layer its own.
//! FP8 (`weight` F8_E4M3 with a `weight_scale`) and MXFP8 (an E8M0 `weight_scale` per
//! 32) are [`Grid`](super::Grid)s; NVFP4 (`weight` U8 `[R, C/2]`, `weight_scale`
//! F8_E4M3 per 16, `weight_scale_2` F32 `[]`) an [`Fp4`](super::Fp4). Other
//! algorithms (`NVFP4_AWQ`, `W4A8_*`, ...) are refused by name; activation and KV-cache
//! scales are dropped.

use serde_json::Value;

use super::fp4::{Global, MX_GROUP, NVFP4_GROUP};
use super::grid::FP8_CODES;
use super::matcher::Matcher;
use super::{Family, TensorRef};
use crate::dtype::Dtype;
use crate::error::{sanitize, Result};

/// The ModelOpt family (a `quant_method` starting with `modelopt` is read as it).
pub(super) const FAMILY: Family = Family {
    methods: &[("modelopt", "`X.weight` F8_E4M3 or U8 with `X.weight_scale`")],
    listed: "modelopt (FP8, NVFP4, MXFP8, MIXED_PRECISION)",
    recognise: |m| m.modelopt(),
};

/// The algorithms a weight may have.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Algo {
    Fp8,
    Nvfp4,
    Mxfp8,
}

/// The `quant_algo` names read, as `MIXED_PRECISION`'s error lists them.
const KNOWN: &str = "FP8, NVFP4, MXFP8";

/// `quant_algo` (upper-cased, as vLLM reads it) as an algorithm.
fn algo(name: &str) -> Option<Algo> {
    match name.to_ascii_uppercase().as_str() {
        "FP8" => Some(Algo::Fp8),
        "NVFP4" => Some(Algo::Nvfp4),
        "MXFP8" => Some(Algo::Mxfp8),
        _ => None,
    }
}

/// A key of the ModelOpt config: at the top (`quantization_config`) or under
/// `quantization` (`hf_quant_config.json`).
fn key<'v>(c: &'v Value, k: &str) -> Option<&'v Value> {
    c.get(k)
        .or_else(|| c.get("quantization").and_then(|q| q.get(k)))
}

impl Matcher<'_> {
    /// ModelOpt: every quantized weight under `quant_algo`, or under its layer's own
    /// algorithm in a `MIXED_PRECISION` map.
    fn modelopt(&mut self) -> Result<(String, Value)> {
        let c = &self.decl.config;
        let name = key(c, "quant_algo")
            .and_then(Value::as_str)
            .unwrap_or("FP8")
            .to_string();
        self.drop_activation_scales();
        let summary = if name.eq_ignore_ascii_case("MIXED_PRECISION") {
            self.mixed_precision()?
        } else {
            let Some(a) = algo(&name) else {
                return Err(self.config_error(format!(
                    "modelopt `quant_algo` {} is not supported ({KNOWN} and MIXED_PRECISION are); nothing is converted raw",
                    sanitize(&name)
                )));
            };
            self.modelopt_all(a)?;
            format!("modelopt ({})", name.to_ascii_uppercase())
        };
        Ok((summary, c.clone()))
    }

    /// One algorithm for the checkpoint: each `X.weight` that is stored quantized
    /// (F8 for FP8 and MXFP8, U8 for NVFP4).
    fn modelopt_all(&mut self, a: Algo) -> Result<()> {
        let index = self.index();
        for (r, info) in index.all() {
            let Some(stem) = info.name.strip_suffix(".weight") else {
                continue;
            };
            let quantized = match a {
                Algo::Fp8 | Algo::Mxfp8 => info.dtype.is_fp8(),
                Algo::Nvfp4 => info.dtype == Dtype::U8,
            };
            if quantized {
                self.modelopt_weight(r, stem, a)?;
            }
        }
        Ok(())
    }

    /// `MIXED_PRECISION`: each layer of `quantized_layers` under its own algorithm;
    /// a layer without a `weight` or an algorithm not read is an error.
    fn mixed_precision(&mut self) -> Result<String> {
        let c = &self.decl.config;
        let Some(layers) = key(c, "quantized_layers").and_then(Value::as_object) else {
            return Err(self.config_error(
                "modelopt `quant_algo` MIXED_PRECISION without a `quantized_layers` map".into(),
            ));
        };
        let index = self.index();
        let mut seen: Vec<String> = Vec::new();
        for (layer, cfg) in layers {
            let name = cfg.get("quant_algo").and_then(Value::as_str).unwrap_or("");
            let Some(a) = algo(name) else {
                return Err(self.config_error(format!(
                    "MIXED_PRECISION layer `{}` has `quant_algo` {}, which is not supported ({KNOWN} are); nothing is converted raw",
                    sanitize(layer),
                    sanitize(name)
                )));
            };
            let Some((r, _)) = index.get(&format!("{layer}.weight")) else {
                return Err(self.config_error(format!(
                    "MIXED_PRECISION names layer `{}`, which has no `{}.weight` tensor",
                    sanitize(layer),
                    sanitize(layer)
                )));
            };
            self.modelopt_weight(r, layer, a)?;
            let n = name.to_ascii_uppercase();
            if !seen.contains(&n) {
                seen.push(n);
            }
        }
        Ok(format!("modelopt (MIXED_PRECISION: {})", seen.join(", ")))
    }

    /// The weight `r` (`stem.weight`) under the algorithm `a`.
    fn modelopt_weight(&mut self, r: TensorRef, stem: &str, a: Algo) -> Result<()> {
        match a {
            Algo::Fp8 => {
                self.check_dtype(r, "the weight", FP8_CODES)?;
                let scale = self.companion(r, stem, ".weight_scale")?;
                self.grid(r, stem, scale, None, None)
            }
            Algo::Mxfp8 => self.mxfp8(r, stem),
            Algo::Nvfp4 => {
                let scale = self.companion(r, stem, ".weight_scale")?;
                let global = self.companion(r, stem, ".weight_scale_2")?;
                self.fp4(r, stem, scale, Global::Mul(global), NVFP4_GROUP)
            }
        }
    }

    /// MXFP8 (ModelOpt's and compressed-tensors' `mxfp8-quantized`): `stem.weight`
    /// F8_E4M3 with an E8M0 `stem.weight_scale` per 32 values of a row, a grid of
    /// 1 × 32 blocks.
    pub(super) fn mxfp8(&mut self, r: TensorRef, stem: &str) -> Result<()> {
        self.check_dtype(r, "the weight", &[Dtype::F8E4M3])?;
        let scale = self.companion(r, stem, ".weight_scale")?;
        let (rows, cols) = match self.index().info(r).shape[..] {
            [rows, cols] => (rows, cols),
            ref s => {
                return Err(self.fail.at(
                    r,
                    format!("the weight has shape {s:?}; MXFP8 needs [rows, columns]"),
                ))
            }
        };
        self.mx_scale(scale, (rows, cols), MX_GROUP)?;
        self.grid(r, stem, scale, None, Some((1, MX_GROUP)))
    }
}
