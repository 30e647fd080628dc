//! FP4 E2M1 codes packed two to a byte, low nibble first, with one scale per group of
//! a row (the description NVFP4 and MXFP4 in the ModelOpt and compressed-tensors
//! layouts share): `weight` or `weight_packed` U8 `[R, C/2]`, `weight_scale`
//! `[R, C/G]`: F8_E4M3 per 16 (NVFP4) with a per-tensor F32 global scale, or E8M0 per
//! 32 (MXFP4). Its decoder is `cast/dequant/fp4.rs`.

use super::matcher::{Matcher, Weight};
use super::{Kernel, TensorRef};
use crate::dtype::Dtype;
use crate::error::Result;

/// See [`Kernel::Fp4`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Fp4 {
    /// The codes `[R, C/2]`, U8, element `2k` in the low nibble.
    pub(crate) packed: TensorRef,
    /// One scale per group: F8_E4M3 (NVFP4) or E8M0 (MXFP4) `[R, C/group]`.
    pub(crate) scale: TensorRef,
    /// How the per-tensor global scale combines with each group's scale.
    pub(crate) global: Global,
    pub(crate) rows: u64,
    pub(crate) cols: u64,
    /// Values per scale: 16 (NVFP4) or 32 (MXFP4).
    pub(crate) group: u64,
}

/// An NVFP4 weight's global scale and how it makes a group's scale `S` from the
/// stored one `s` (both in f32, one rounding each).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Global {
    /// MXFP4: none, `S = 2^(e − 127)`.
    None,
    /// ModelOpt's `weight_scale_2`: `S = fl(s × g)`.
    Mul(TensorRef),
    /// compressed-tensors' `weight_global_scale` `[1]`: `S = fl(s / g)`.
    Div(TensorRef),
    /// compressed-tensors' `weight_global_scale` stored 0-dim: torch's promotion makes
    /// the quotient bf16, `S = bf16(fl(s / g))`.
    DivBf16(TensorRef),
}

impl Global {
    /// The stored global scale, if any.
    pub(crate) fn tensor(self) -> Option<TensorRef> {
        match self {
            Global::None => None,
            Global::Mul(r) | Global::Div(r) | Global::DivBf16(r) => Some(r),
        }
    }
}

/// NVFP4's group: 16 values per F8_E4M3 scale.
pub(super) const NVFP4_GROUP: u64 = 16;
/// MX formats' group: 32 values per E8M0 scale.
pub(super) const MX_GROUP: u64 = 32;

impl Matcher<'_> {
    /// The packed FP4 weight `packed` (output `stem.weight`) with `scale` per `group`
    /// values (16: F8_E4M3, 32: E8M0) and `global`, all checked against each other.
    pub(super) fn fp4(
        &mut self,
        packed: TensorRef,
        stem: &str,
        scale: TensorRef,
        global: Global,
        group: u64,
    ) -> Result<()> {
        let index = self.index();
        self.check_dtype(packed, "the packed weight", &[Dtype::U8])?;
        let [rows, half] = index.info(packed).shape[..] else {
            return Err(self.fail.at(
                packed,
                format!(
                    "the packed weight has shape {:?}; expected [rows, columns / 2]",
                    index.info(packed).shape
                ),
            ));
        };
        let cols = half * 2;
        self.mx_scale(scale, (rows, cols), group)?;
        if let Some(g) = global.tensor() {
            self.check_dtype(g, "the global scale", &[Dtype::F32])?;
            let gs = &index.info(g).shape;
            if !(gs.is_empty() || gs[..] == [1]) {
                return Err(self.fail.at(
                    g,
                    format!("the global scale has shape {gs:?}; expected [] or [1]"),
                ));
            }
        }
        let compute = self.decl.torch_dtype.unwrap_or(Dtype::Bf16);
        let mut parts = vec![scale];
        parts.extend(global.tensor());
        self.add(Weight {
            name: format!("{stem}.weight"),
            main: packed,
            shape: vec![rows, cols],
            kernel: Kernel::Fp4(Fp4 {
                packed,
                scale,
                global,
                rows,
                cols,
                group,
            }),
            parts: &parts,
            compute,
        })
    }

    /// Checks a group scale of `[rows, cols]` values: F8_E4M3 per 16 (NVFP4) or E8M0
    /// (U8) per 32 (MX formats), `[rows, cols / group]`.
    pub(super) fn mx_scale(
        &self,
        scale: TensorRef,
        (rows, cols): (u64, u64),
        group: u64,
    ) -> Result<()> {
        let (what, dtypes): (&str, &[Dtype]) = if group == NVFP4_GROUP {
            ("NVFP4", &[Dtype::F8E4M3])
        } else {
            ("an MX format", &[Dtype::U8, Dtype::F8E8M0])
        };
        self.check_dtype(scale, "the scale", dtypes)?;
        let want = [rows, cols / group];
        if !cols.is_multiple_of(group) || self.index().info(scale).shape[..] != want {
            return Err(self.fail.at(
                scale,
                format!(
                    "the scale has shape {:?}; {what} needs one per {group} values of the weight's [{rows}, {cols}]{}",
                    self.index().info(scale).shape,
                    if cols.is_multiple_of(group) {
                        format!(": {want:?}")
                    } else {
                        format!(", whose {cols} columns are not a multiple of {group}")
                    }
                ),
            ));
        }
        Ok(())
    }
}
