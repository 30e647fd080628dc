//! GPTQ (`gptq`, also declared by an older repository's `quantize_config.json`):
//! `X.qweight` (2, 3, 4 or 8-bit codes packed along the input into i32 words) with
//! `X.scales`, and `X.qzeros` and `X.g_idx` when stored, described as a [`Gptq`],
//! decoded by `cast/dequant/gptq.rs`.

use serde_json::Value;

use super::config::uint;
use super::matcher::{Matcher, Weight};
use super::{Family, Kernel, TensorRef};
use crate::dtype::Dtype;
use crate::error::{sanitize, Result};

/// The GPTQ family.
pub(super) const FAMILY: Family = Family {
    methods: &[("gptq", "`X.qweight` with `X.scales`, `X.qzeros`, `X.g_idx`")],
    listed: "gptq",
    recognise: |m| m.gptq(),
};

/// See [`Kernel::Gptq`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Gptq {
    pub(crate) qweight: TensorRef,
    pub(crate) qzeros: Option<TensorRef>,
    pub(crate) scales: TensorRef,
    pub(crate) g_idx: Option<TensorRef>,
    pub(crate) bits: u32,
    /// Input rows per group (when there is no `g_idx`).
    pub(crate) group: u64,
    pub(crate) groups: u64,
    pub(crate) inputs: u64,
    pub(crate) outputs: u64,
    /// Added to the stored zero: 1 for AutoGPTQ's `gptq` format (zeros stored minus
    /// one), 0 for `gptq_v2`.
    pub(crate) zero_offset: u32,
}

/// What the GPTQ config says of every weight.
struct Config {
    /// Bits per code: 2, 3, 4 or 8.
    bits: u32,
    /// `group_size` (−1 or 0: one group for all inputs).
    group_size: i64,
    /// `checkpoint_format`: `gptq` or `gptq_v2`.
    format: String,
    /// See [`Gptq::zero_offset`].
    zero_offset: u32,
}

impl Matcher<'_> {
    /// GPTQ: every `X.qweight` with `X.scales`, `X.qzeros` and `X.g_idx`.
    fn gptq(&mut self) -> Result<(String, Value)> {
        let c = self.decl.config.clone();
        let cfg = self.gptq_config()?;
        let index = self.index();
        for (r, info) in index.all() {
            let Some(stem) = info.name.strip_suffix(".qweight") else {
                continue;
            };
            self.gptq_weight(r, stem, &cfg)?;
        }
        let desc = c.get("desc_act").and_then(Value::as_bool).unwrap_or(false);
        let sym = c.get("sym").and_then(Value::as_bool).unwrap_or(true);
        Ok((
            format!(
                "gptq ({}-bit, group {}, {}{}, {})",
                cfg.bits,
                cfg.group_size,
                if sym { "symmetric" } else { "asymmetric" },
                if desc { ", desc_act" } else { "" },
                cfg.format
            ),
            c,
        ))
    }

    /// The bits, group size and checkpoint format the config declares.
    fn gptq_config(&self) -> Result<Config> {
        let c = &self.decl.config;
        let bits = uint(c, "bits").unwrap_or(4);
        if !matches!(bits, 2 | 3 | 4 | 8) {
            return Err(
                self.config_error(format!("`bits` is {bits}; GPTQ packs 2, 3, 4 or 8 bits"))
            );
        }
        let bits = bits as u32;
        let group_size = uint(c, "group_size").unwrap_or(128);
        let format = c
            .get("checkpoint_format")
            .and_then(Value::as_str)
            .unwrap_or("gptq")
            .to_string();
        let zero_offset = match format.as_str() {
            "gptq" => 1,
            "gptq_v2" => 0,
            o => {
                return Err(self.config_error(format!(
                    "`checkpoint_format` `{}` is not supported (gptq and gptq_v2 are)",
                    sanitize(o)
                )))
            }
        };
        Ok(Config {
            bits,
            group_size,
            format,
            zero_offset,
        })
    }

    /// One `X.qweight` (`r`, `stem` the `X`) with its companions.
    fn gptq_weight(&mut self, r: TensorRef, stem: &str, cfg: &Config) -> Result<()> {
        let (bits, group_size) = (cfg.bits, cfg.group_size);
        let index = self.index();
        let info = index.info(r);
        self.check_dtype(r, "`qweight`", &[Dtype::I32])?;
        let scales = self.companion(r, stem, ".scales")?;
        let qzeros = index.get(&format!("{stem}.qzeros")).map(|x| x.0);
        let g_idx = index.get(&format!("{stem}.g_idx")).map(|x| x.0);
        self.check_dtype(scales, "the scales", &[Dtype::F16, Dtype::Bf16, Dtype::F32])?;
        let [packed_rows, outputs] = info.shape[..] else {
            return Err(self.fail.at(
                r,
                format!(
                    "`qweight` has shape {:?}; expected [in·bits/32, out]",
                    info.shape
                ),
            ));
        };
        let inputs = packed_rows * 32 / bits as u64;
        if (packed_rows * 32) % bits as u64 != 0 || (bits == 3 && packed_rows % 3 != 0) {
            return Err(self.fail.at(
                r,
                format!(
                    "`qweight` has {packed_rows} packed rows, no whole number of {bits}-bit inputs"
                ),
            ));
        }
        let (group, groups) = self.input_groups(scales, inputs, outputs, group_size)?;
        if let Some(z) = qzeros {
            self.check_dtype(z, "`qzeros`", &[Dtype::I32])?;
            let words = (outputs * bits as u64).div_ceil(32);
            self.check_shape(
                z,
                "`qzeros` has",
                &[groups, words],
                &format!("{bits}-bit zeros of {outputs} outputs"),
            )?;
        }
        if let Some(g) = g_idx {
            self.check_dtype(g, "`g_idx`", &[Dtype::I32, Dtype::I64])?;
            self.check_shape(g, "`g_idx` has", &[inputs], "one group per input")?;
        }
        let mut parts = vec![scales];
        parts.extend(qzeros);
        parts.extend(g_idx);
        let compute = self.compute(index.info(scales));
        self.add(Weight {
            name: format!("{stem}.weight"),
            main: r,
            shape: vec![outputs, inputs],
            kernel: Kernel::Gptq(Gptq {
                qweight: r,
                qzeros,
                scales,
                g_idx,
                bits,
                group,
                groups,
                inputs,
                outputs,
                zero_offset: cfg.zero_offset,
            }),
            parts: &parts,
            compute,
        })
    }
}
