//! MXFP4 (`mxfp4`, gpt-oss): `X_blocks` `[E, R, G, 16]` of FP4 E2M1 pairs (U8, or F4
//! `[E, R, G, 32]`) with `X_scales` `[E, R, G]` of E8M0 exponents, described as an
//! [`Mxfp4`] whose output is `X`, decoded by `cast/dequant/mxfp4.rs`.

use serde_json::Value;

use super::matcher::{Matcher, Weight};
use super::{Family, Kernel, TensorRef};
use crate::dtype::Dtype;
use crate::error::Result;

/// The MXFP4 family.
pub(super) const FAMILY: Family = Family {
    methods: &[("mxfp4", "`X_blocks` with `X_scales`")],
    listed: "mxfp4",
    recognise: |m| m.mxfp4(),
};

/// See [`Kernel::Mxfp4`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Mxfp4 {
    pub(crate) blocks: TensorRef,
    pub(crate) scales: TensorRef,
    pub(crate) experts: u64,
    pub(crate) rows: u64,
    pub(crate) groups: u64,
}

impl Matcher<'_> {
    /// MXFP4: every `X_blocks` with its `X_scales`.
    fn mxfp4(&mut self) -> Result<(String, Value)> {
        let index = self.index();
        for (r, info) in index.all() {
            let Some(stem) = info.name.strip_suffix("_blocks") else {
                continue;
            };
            let scales = self.companion(r, stem, "_scales")?;
            let bd = self.check_dtype(r, "the blocks", &[Dtype::U8, Dtype::F4])?;
            self.check_dtype(scales, "the scales", &[Dtype::U8, Dtype::F8E8M0])?;
            // F4 blocks count elements: [E, R, G, 32] holds what U8 [E, R, G, 16] does.
            let per = if bd == Dtype::F4 { 32 } else { 16 };
            let [experts, rows, groups, b] = info.shape[..] else {
                return Err(self.fail.at(
                    r,
                    format!(
                        "the blocks have shape {:?}; expected [experts, rows, groups, {per}]",
                        info.shape
                    ),
                ));
            };
            if b != per {
                return Err(self.fail.at(
                    r,
                    format!("the blocks' last dimension is {b}; MXFP4 packs 32 values in {per}"),
                ));
            }
            self.check_shape(
                scales,
                "the scales have",
                &[experts, rows, groups],
                "one scale per block of 32",
            )?;
            let compute = self.decl.torch_dtype.unwrap_or(Dtype::Bf16);
            self.add(Weight {
                name: stem.to_string(),
                main: r,
                shape: vec![experts, groups * 32, rows],
                kernel: Kernel::Mxfp4(Mxfp4 {
                    blocks: r,
                    scales,
                    experts,
                    rows,
                    groups,
                }),
                parts: &[scales],
                compute,
            })?;
        }
        Ok((
            "mxfp4 (FP4 E2M1, E8M0 scales per 32)".into(),
            self.decl.config.clone(),
        ))
    }
}
