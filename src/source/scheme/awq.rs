//! AWQ (`awq`, GEMM version): `X.qweight` `[in, out/8]` (4-bit codes in AWQ's nibble
//! order) with `X.qzeros` and `X.scales`, described as an [`Awq`], decoded by
//! `cast/dequant/awq.rs`.

use serde_json::Value;

use super::config::uint;
use super::matcher::{Matcher, Weight};
use super::{Family, Kernel, TensorRef};
use crate::dtype::Dtype;
use crate::error::{sanitize, Result};

/// The AWQ family.
pub(super) const FAMILY: Family = Family {
    methods: &[("awq", "`X.qweight` with `X.scales`, `X.qzeros`")],
    listed: "awq",
    recognise: |m| m.awq(),
};

/// See [`Kernel::Awq`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Awq {
    pub(crate) qweight: TensorRef,
    pub(crate) qzeros: TensorRef,
    pub(crate) scales: TensorRef,
    pub(crate) group: u64,
    pub(crate) groups: u64,
    pub(crate) inputs: u64,
    pub(crate) outputs: u64,
}

impl Matcher<'_> {
    /// AWQ (GEMM): every `X.qweight` with `X.qzeros` and `X.scales`.
    fn awq(&mut self) -> Result<(String, Value)> {
        let c = self.decl.config.clone();
        let version = c
            .get("version")
            .and_then(Value::as_str)
            .unwrap_or("gemm")
            .to_ascii_lowercase();
        if version != "gemm" {
            return Err(self.config_error(format!(
                "AWQ version `{}` is not supported (gemm is)",
                sanitize(&version)
            )));
        }
        let bits = uint(&c, "bits").or_else(|| uint(&c, "w_bit")).unwrap_or(4);
        if bits != 4 {
            return Err(self.config_error(format!("`bits` is {bits}; AWQ GEMM packs 4 bits")));
        }
        let group_size = uint(&c, "group_size")
            .or_else(|| uint(&c, "q_group_size"))
            .unwrap_or(128);
        let index = self.index();
        for (r, info) in index.all() {
            let Some(stem) = info.name.strip_suffix(".qweight") else {
                continue;
            };
            self.check_dtype(r, "`qweight`", &[Dtype::I32])?;
            let scales = self.companion(r, stem, ".scales")?;
            let qzeros = self.companion(r, stem, ".qzeros")?;
            self.check_dtype(scales, "the scales", &[Dtype::F16, Dtype::Bf16, Dtype::F32])?;
            self.check_dtype(qzeros, "`qzeros`", &[Dtype::I32])?;
            let [inputs, words] = info.shape[..] else {
                return Err(self.fail.at(
                    r,
                    format!("`qweight` has shape {:?}; expected [in, out/8]", info.shape),
                ));
            };
            let outputs = words * 8;
            let (group, groups) = self.input_groups(scales, inputs, outputs, group_size)?;
            self.check_shape(
                qzeros,
                "`qzeros` has",
                &[groups, words],
                &format!("4-bit zeros of {outputs} outputs"),
            )?;
            let compute = self.compute(index.info(scales));
            self.add(Weight {
                name: format!("{stem}.weight"),
                main: r,
                shape: vec![outputs, inputs],
                kernel: Kernel::Awq(Awq {
                    qweight: r,
                    qzeros,
                    scales,
                    group,
                    groups,
                    inputs,
                    outputs,
                }),
                parts: &[scales, qzeros],
                compute,
            })?;
        }
        Ok((format!("awq (4-bit, group {group_size}, gemm)"), c))
    }
}
