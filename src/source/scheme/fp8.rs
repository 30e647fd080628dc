//! FP8 (`fp8`, `fbgemm_fp8`): `X.weight` F8 with `X.weight_scale_inv`
//! (DeepSeek-style blocks, `weight_block_size`) or `X.weight_scale` (per tensor or
//! channel). Each weight is a [`Grid`](super::Grid) of scales; activation and KV-cache
//! scales are dropped.

use serde_json::Value;

use super::grid::FP8_CODES;
use super::matcher::Matcher;
use super::{Family, TensorRef};
use crate::error::Result;

/// The FP8 family.
pub(super) const FAMILY: Family = Family {
    methods: &[
        ("fp8", "`X.weight` F8_E4M3 with `X.weight_scale_inv`"),
        ("fbgemm_fp8", "`X.weight` F8_E4M3 with `X.weight_scale`"),
    ],
    listed: "fp8, fbgemm_fp8",
    recognise: |m| m.fp8(),
};

impl Matcher<'_> {
    /// FP8: `weight` F8 with `weight_scale_inv` (DeepSeek-style blocks) or
    /// `weight_scale` (per tensor or channel).
    fn fp8(&mut self) -> Result<(String, Value)> {
        let c = &self.decl.config;
        let block = self.fp8_config()?;
        self.drop_activation_scales();
        let index = self.index();
        let mut fmts = Vec::new();
        for (r, info) in index.all() {
            let Some(stem) = info.name.strip_suffix(".weight") else {
                continue;
            };
            if !info.dtype.is_fp8() {
                continue;
            }
            self.check_dtype(r, "the weight", FP8_CODES)?;
            let (scale, b) = self.fp8_scale(r, stem, block)?;
            if !fmts.contains(&info.dtype) {
                fmts.push(info.dtype);
            }
            self.grid(r, stem, scale, None, b)?;
        }
        let fmt = fmts
            .iter()
            .map(|d| d.safetensors_name())
            .collect::<Vec<_>>()
            .join(", ");
        let summary = match block {
            Some((a, b)) => format!("{} ({fmt}, {a}×{b} blocks)", self.decl.method),
            None => format!("{} ({fmt}, per-tensor/channel scales)", self.decl.method),
        };
        Ok((summary, c.clone()))
    }

    /// The config's block size (`weight_block_size`).
    fn fp8_config(&self) -> Result<Option<(u64, u64)>> {
        let c = &self.decl.config;
        Ok(match c.get("weight_block_size") {
            None | Some(Value::Null) => None,
            Some(v) => match v
                .as_array()
                .map(|a| a.iter().map(Value::as_u64).collect::<Vec<_>>())
            {
                Some(b) if b.len() == 2 && b.iter().all(|x| x.is_some_and(|x| x > 0)) => {
                    Some((b[0].unwrap_or(1), b[1].unwrap_or(1)))
                }
                _ => {
                    return Err(self.config_error(format!(
                        "`weight_block_size` is {v}; expected two positive integers"
                    )))
                }
            },
        })
    }

    /// The scale of the FP8 weight `r` (`stem.weight`), and the block size that
    /// applies to it (the config's `block` for a `weight_scale_inv`; none for a
    /// `weight_scale`, whose shape says its grid).
    fn fp8_scale(
        &self,
        r: TensorRef,
        stem: &str,
        block: Option<(u64, u64)>,
    ) -> Result<(TensorRef, Option<(u64, u64)>)> {
        let index = self.index();
        let inv = index.get(&format!("{stem}.weight_scale_inv")).map(|x| x.0);
        let plain = index.get(&format!("{stem}.weight_scale")).map(|x| x.0);
        let scale = match (inv, plain) {
            (Some(s), None) | (None, Some(s)) => s,
            (Some(_), Some(s)) => {
                return Err(self.fail.at(
                    s,
                    "both `weight_scale` and `weight_scale_inv` are stored for one weight".into(),
                ))
            }
            (None, None) => {
                return Err(self.fail.at(
                    r,
                    format!(
                        "its `{}` is missing",
                        if block.is_some() {
                            "weight_scale_inv"
                        } else {
                            "weight_scale"
                        }
                    ),
                ))
            }
        };
        // A block size applies to the block-wise scales; per-tensor and per-channel
        // scales say their grid by their shape.
        let b = if inv.is_some() { block } else { None };
        if inv.is_some() && b.is_none() {
            return Err(self.fail.at(
                scale,
                "a `weight_scale_inv` without `weight_block_size` in the config".into(),
            ));
        }
        Ok((scale, b))
    }
}
