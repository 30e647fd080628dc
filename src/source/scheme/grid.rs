//! Codes on a grid of scales (the description FP8 and compressed-tensors' float- and
//! int-quantized weights share): `(q − zero) × scale` elementwise, one scale (and zero
//! point) per block of the last two dimensions, or one for the tensor. Its decoder is
//! `cast/dequant/grid.rs`.

use super::matcher::{Matcher, Weight};
use super::{Kernel, TensorRef};
use crate::dtype::Dtype;
use crate::error::{sanitize, Result};
use crate::source::TensorInfo;

/// See [`Kernel::Grid`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Grid {
    /// The codes `[..., rows, cols]`: F8 (E4M3, E5M2 and FNUZ) or I8.
    pub(crate) q: TensorRef,
    /// One scale per block: `[..., ⌈rows/br⌉, ⌈cols/bc⌉]`, or one for the tensor.
    pub(crate) scale: TensorRef,
    /// Zero points on the same grid (asymmetric), if any.
    pub(crate) zero: Option<TensorRef>,
    /// Rows and columns of the last two dimensions (1 and the length for a vector).
    pub(crate) rows: u64,
    pub(crate) cols: u64,
    /// Block height and width.
    pub(crate) block: (u64, u64),
    /// The scale grid's rows and columns per matrix (1 × 1 for a per-tensor scale,
    /// which then covers every matrix of a stacked tensor).
    pub(crate) grid: (u64, u64),
    /// True when one scale covers the whole tensor.
    pub(crate) per_tensor: bool,
}

/// The code types a grid holds: the FP8 types ([`FP8_CODES`]), then int8.
pub(super) const GRID_CODES: [Dtype; 5] = [
    Dtype::F8E4M3,
    Dtype::F8E5M2,
    Dtype::F8E4M3Fnuz,
    Dtype::F8E5M2Fnuz,
    Dtype::I8,
];

/// The FP8 code types.
pub(super) const FP8_CODES: &[Dtype] = GRID_CODES.split_at(4).0;

impl Matcher<'_> {
    /// `q` (`[..., R, C]`) with `scale` on a grid of blocks, and an optional `zero`.
    pub(super) fn grid(
        &mut self,
        q: TensorRef,
        stem: &str,
        scale: TensorRef,
        zero: Option<TensorRef>,
        block: Option<(u64, u64)>,
    ) -> Result<()> {
        let index = self.index();
        let qi = index.info(q);
        let si = index.info(scale);
        self.check_dtype(
            scale,
            "the scale",
            &[
                Dtype::F32,
                Dtype::Bf16,
                Dtype::F16,
                Dtype::U8,
                Dtype::F8E8M0,
            ],
        )?;
        let (rows, cols) = match qi.shape.as_slice() {
            [] => (1, 1),
            [c] => (1, *c),
            [.., r, c] => (*r, *c),
        };
        let per_tensor = si.numel == 1 && si.shape.len() <= 1;
        let (block, grid) = if per_tensor && block.is_none() {
            ((rows.max(1), cols.max(1)), (1, 1))
        } else {
            self.blocks(q, scale, (rows, cols), block)?
        };
        if let Some(z) = zero {
            self.check_zero(z, si)?;
        }
        let compute = self.compute(si);
        let mut parts = vec![scale];
        parts.extend(zero);
        self.add(Weight {
            name: format!("{stem}.weight"),
            main: q,
            shape: qi.shape.clone(),
            kernel: Kernel::Grid(Grid {
                q,
                scale,
                zero,
                rows,
                cols,
                block,
                grid,
                per_tensor: per_tensor && grid == (1, 1),
            }),
            parts: &parts,
            compute,
        })
    }

    /// The blocks and the scale grid of `q` (`rows` × `cols` per matrix) whose `scale`
    /// is not one for the tensor: `block` when the config gives it, else what the
    /// scale's shape says; the scale's shape checked against them.
    fn blocks(
        &self,
        q: TensorRef,
        scale: TensorRef,
        (rows, cols): (u64, u64),
        block: Option<(u64, u64)>,
    ) -> Result<((u64, u64), (u64, u64))> {
        let index = self.index();
        let qi = index.info(q);
        let si = index.info(scale);
        let lead: Vec<u64> = qi.shape[..qi.shape.len().saturating_sub(2)].to_vec();
        let (br, bc) = match block {
            Some(b) => b,
            // A scale of shape [..., R, 1] is per channel, [..., R, G] per group.
            None => {
                let (gr, gc) = match si.shape.as_slice() {
                    [.., r, c] => (*r, *c),
                    [c] => (1, *c),
                    [] => (1, 1),
                };
                if gr == 0 || gc == 0 || rows % gr != 0 {
                    return Err(self.fail.at(
                        scale,
                        format!(
                            "the scale has shape {:?}, which is no grid of blocks over the weight's {:?}",
                            si.shape, qi.shape
                        ),
                    ));
                }
                (rows / gr, cols.div_ceil(gc).max(1))
            }
        };
        if br == 0 || bc == 0 {
            return Err(self.config_error("a block size is 0".into()));
        }
        let grid = (rows.div_ceil(br), cols.div_ceil(bc));
        let mut want = lead.clone();
        want.extend([grid.0, grid.1]);
        let scale_shape_ok = si.shape == want
            // A vector's scale may drop the leading 1.
            || (qi.shape.len() < 2 && si.shape == [grid.1]);
        if !scale_shape_ok {
            return Err(self.fail.at(
                scale,
                format!(
                    "the scale has shape {:?}; the weight `{}` {:?} with {}×{} blocks needs {want:?}",
                    si.shape,
                    sanitize(&qi.name),
                    qi.shape,
                    br,
                    bc
                ),
            ));
        }
        Ok(((br, bc), grid))
    }

    /// A zero point `z` on the grid of the scale `si`.
    fn check_zero(&self, z: TensorRef, si: &TensorInfo) -> Result<()> {
        let zi = self.index().info(z);
        self.check_dtype(
            z,
            "the zero point",
            &[
                Dtype::I8,
                Dtype::U8,
                Dtype::I32,
                Dtype::F32,
                Dtype::Bf16,
                Dtype::F16,
            ],
        )?;
        if zi.shape != si.shape {
            return Err(self.fail.at(
                z,
                format!(
                    "the zero point has shape {:?}, its scale {:?}",
                    zi.shape, si.shape
                ),
            ));
        }
        Ok(())
    }
}
