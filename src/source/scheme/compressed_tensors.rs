//! compressed-tensors (`compressed-tensors`): the weight arguments of every config
//! group; `X.weight_packed` (`pack-quantized`: offset-binary codes packed into i32
//! words, described as a [`Packed`], decoded by `cast/dequant/compressed_tensors.rs`),
//! or `X.weight` with `X.weight_scale` (float-, int- and naive-quantized: a
//! [`Grid`](super::Grid) of scales; `mxfp8-quantized` with E8M0 scales per 32). A U8
//! `X.weight_packed` is FP4 ([`Fp4`](super::Fp4)): `nvfp4-pack-quantized` with
//! `X.weight_global_scale`, or `mxfp4-pack-quantized`. Activation and KV-cache scales
//! are dropped.

use serde_json::Value;

use super::config::uint;
use super::fp4::{Global, MX_GROUP, NVFP4_GROUP};
use super::grid::GRID_CODES;
use super::matcher::{Matcher, Weight};
use super::{Family, Kernel, TensorRef};
use crate::dtype::Dtype;
use crate::error::{sanitize, Result};

/// The compressed-tensors family.
pub(super) const FAMILY: Family = Family {
    methods: &[
        ("compressed-tensors", CT_LAYOUT),
        ("compressed_tensors", CT_LAYOUT),
    ],
    listed: "compressed-tensors",
    recognise: |m| m.compressed_tensors(),
};

/// What compressed-tensors' weights look like.
const CT_LAYOUT: &str = "`X.weight_packed` or `X.weight` with `X.weight_scale`";

/// See [`Kernel::Packed`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Packed {
    pub(crate) packed: TensorRef,
    pub(crate) scale: TensorRef,
    /// Zero points `[⌈out·bits/32⌉, groups]` packed along the output (asymmetric).
    pub(crate) zero: Option<TensorRef>,
    pub(crate) g_idx: Option<TensorRef>,
    pub(crate) bits: u32,
    pub(crate) group: u64,
    pub(crate) groups: u64,
    pub(crate) rows: u64,
    pub(crate) cols: u64,
    /// 32-bit words per packed row.
    pub(crate) row_words: u64,
}

impl Matcher<'_> {
    /// compressed-tensors: `weight_packed` (pack-quantized), or `weight` with
    /// `weight_scale` (float- and int-quantized, naive-quantized).
    fn compressed_tensors(&mut self) -> Result<(String, Value)> {
        let c = &self.decl.config;
        let format = c
            .get("format")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let args = self.weight_args(&format)?;
        self.drop_activation_scales();
        let index = self.index();
        for (r, info) in index.all() {
            if let Some(stem) = info.name.strip_suffix(".weight_packed") {
                if info.dtype == Dtype::U8 {
                    self.fp4_packed(r, stem)?;
                } else {
                    self.pack_quantized(r, stem, &args)?;
                }
            } else if let Some(stem) = info.name.strip_suffix(".weight") {
                self.quantized(r, stem, &args)?;
            }
        }
        Ok((summary(&format, &args), c.clone()))
    }

    /// The weight arguments of every config group (whose format, else the config's
    /// `format`, must be one this reads).
    fn weight_args(&self, format: &str) -> Result<Vec<Value>> {
        let c = &self.decl.config;
        let mut args: Vec<Value> = Vec::new();
        if let Some(groups) = c.get("config_groups").and_then(Value::as_object) {
            for (name, g) in groups {
                let f = g.get("format").and_then(Value::as_str).unwrap_or(format);
                match f {
                    "" | "float-quantized" | "int-quantized" | "pack-quantized"
                    | "naive-quantized" | "dense" | "mixed-precision" | "nvfp4-pack-quantized"
                    | "mxfp4-pack-quantized" | "mxfp8-quantized" => {}
                    other => {
                        return Err(self.config_error(format!(
                            "config group `{}` has format `{}`, which is not supported \
                             (float-quantized, int-quantized, naive-quantized, pack-quantized, \
                             nvfp4-pack-quantized, mxfp4-pack-quantized and mxfp8-quantized are); nothing is converted raw",
                            sanitize(name),
                            sanitize(other)
                        )))
                    }
                }
                if let Some(w) = g.get("weights").filter(|w| !w.is_null()) {
                    args.push(w.clone());
                }
            }
        }
        if args.is_empty() {
            return Err(self.config_error("`config_groups` declares no quantized weights".into()));
        }
        Ok(args)
    }

    /// One float-, int- or naive-quantized `X.weight` (`r`): a grid of its
    /// `weight_scale` (a weight without one is not quantized, unless it is F8).
    fn quantized(&mut self, r: TensorRef, stem: &str, args: &[Value]) -> Result<()> {
        let index = self.index();
        let info = index.info(r);
        if index.get(&format!("{stem}.weight_scale")).is_none() {
            if info.dtype.is_fp8() {
                return Err(self.fail.at(r, "its `weight_scale` is missing".into()));
            }
            return Ok(());
        }
        self.check_dtype(r, "the weight", &GRID_CODES)?;
        let scale = self.companion(r, stem, ".weight_scale")?;
        if matches!(index.info(scale).dtype, Dtype::U8 | Dtype::F8E8M0) {
            // `mxfp8-quantized`: E8M0 scales per 32.
            return self.mxfp8(r, stem);
        }
        let zero = index.get(&format!("{stem}.weight_zero_point")).map(|x| x.0);
        let block = args.iter().find_map(|a| {
            (a.get("strategy").and_then(Value::as_str) == Some("block"))
                .then(|| a.get("block_structure").and_then(Value::as_array).cloned())
                .flatten()
                .and_then(|b| Some((b.first()?.as_u64()?, b.get(1)?.as_u64()?)))
        });
        let si = index.info(scale);
        // The block structure applies where the scale's shape is its grid.
        let b = block.filter(|&(br, bc)| {
            let (rows, cols) = match info.shape.as_slice() {
                [.., r, c] => (*r, *c),
                _ => (0, 0),
            };
            br > 0
                && bc > 0
                && si.shape.len() >= 2
                && si.shape[si.shape.len() - 2..] == [rows.div_ceil(br), cols.div_ceil(bc)]
        });
        self.grid(r, stem, scale, zero, b)
    }

    /// One FP4 `weight_packed` (U8): `nvfp4-pack-quantized` (an F8_E4M3 scale per 16
    /// and `weight_global_scale`, divided by) or `mxfp4-pack-quantized` (E8M0 per 32).
    fn fp4_packed(&mut self, r: TensorRef, stem: &str) -> Result<()> {
        let index = self.index();
        let scale = self.companion(r, stem, ".weight_scale")?;
        if index.info(scale).dtype != Dtype::F8E4M3 {
            return self.fp4(r, stem, scale, Global::None, MX_GROUP);
        }
        let g = self.companion(r, stem, ".weight_global_scale")?;
        // A 0-dim global scale makes torch's quotient bf16 (`bf16 / f32[]`).
        let global = match index.info(g).shape.is_empty() {
            true => Global::DivBf16(g),
            false => Global::Div(g),
        };
        self.fp4(r, stem, scale, global, NVFP4_GROUP)
    }

    /// One compressed-tensors `pack-quantized` weight.
    fn pack_quantized(&mut self, r: TensorRef, stem: &str, args: &[Value]) -> Result<()> {
        let index = self.index();
        let info = index.info(r);
        self.check_dtype(r, "the packed weight", &[Dtype::I32])?;
        let scale = self.companion(r, stem, ".weight_scale")?;
        let shape_t = self.companion(r, stem, ".weight_shape")?;
        let zero = index.get(&format!("{stem}.weight_zero_point")).map(|x| x.0);
        let g_idx = index.get(&format!("{stem}.weight_g_idx")).map(|x| x.0);
        self.check_dtype(scale, "the scale", &[Dtype::F32, Dtype::Bf16, Dtype::F16])?;
        let [out, words] = info.shape[..] else {
            return Err(self.fail.at(
                r,
                format!(
                    "the packed weight has shape {:?}; expected [out, words]",
                    info.shape
                ),
            ));
        };
        let (rows, cols, groups) = self.packed_layout(shape_t, scale)?;
        let (arg, bits) = self.packed_bits(r, (cols, words), args)?;
        if rows != out {
            return Err(self.fail.at(
                shape_t,
                format!("`weight_shape` says {rows} rows, the packed weight has {out}"),
            ));
        }
        let group = self.packed_group(scale, arg, cols, groups)?;
        if let Some(z) = zero {
            self.check_dtype(z, "the zero point", &[Dtype::I32])?;
            let want = [rows.saturating_mul(bits as u64).div_ceil(32), groups];
            self.check_shape(z, "the zero point has", &want, "the packed layout")?;
        }
        if let Some(g) = g_idx {
            self.check_dtype(g, "`weight_g_idx`", &[Dtype::I32, Dtype::I64])?;
            self.check_shape(g, "`weight_g_idx` has", &[cols], "one group per column")?;
        }
        let mut parts = vec![scale, shape_t];
        parts.extend(zero);
        parts.extend(g_idx);
        let compute = self.compute(index.info(scale));
        self.add(Weight {
            name: format!("{stem}.weight"),
            main: r,
            shape: vec![rows, cols],
            kernel: Kernel::Packed(Packed {
                packed: r,
                scale,
                zero,
                g_idx,
                bits,
                group,
                groups,
                rows,
                cols,
                row_words: words,
            }),
            parts: &parts,
            compute,
        })
    }

    /// The original rows and columns (`weight_shape`, a tensor of two integers) and
    /// the groups per row the scale `[rows, groups]` has.
    fn packed_layout(&self, shape_t: TensorRef, scale: TensorRef) -> Result<(u64, u64, u64)> {
        let index = self.index();
        // The original shape, stored as a tensor of two integers.
        let si = index.info(shape_t);
        let dims = self.index().shards[shape_t.shard].read_ints(si)?;
        let [rows, cols] = dims[..] else {
            return Err(self.fail.at(
                shape_t,
                format!("`weight_shape` holds {} values; expected 2", dims.len()),
            ));
        };
        // The scale's groups tell the group size; the packed width tells the bits.
        let sc = index.info(scale);
        let groups = match sc.shape[..] {
            [o, g] if o == rows && g > 0 => g,
            _ => {
                return Err(self.fail.at(
                    scale,
                    format!(
                    "the scale has shape {:?}; the weight [{rows}, {cols}] needs [{rows}, groups]",
                    sc.shape
                ),
                ))
            }
        };
        Ok((rows, cols, groups))
    }

    /// The config group whose bits give the packed width (`words` per row of `cols`
    /// columns), and those bits.
    fn packed_bits<'v>(
        &self,
        r: TensorRef,
        (cols, words): (u64, u64),
        args: &'v [Value],
    ) -> Result<(&'v Value, u32)> {
        // The config group whose bits give the packed width says the group size.
        let fits = |a: &&Value| {
            uint(a, "num_bits")
                .and_then(|b| u32::try_from(b).ok())
                .is_some_and(|b| {
                    (1..=8).contains(&b)
                        && cols.checked_mul(b as u64).map(|x| x.div_ceil(32)) == Some(words)
                })
        };
        let Some(arg) = args.iter().find(fits) else {
            let bits: Vec<String> = args
                .iter()
                .filter_map(|a| uint(a, "num_bits"))
                .map(|b| {
                    format!(
                        "{b} bits need {}",
                        cols.saturating_mul(b.max(0) as u64).div_ceil(32)
                    )
                })
                .collect();
            return Err(self.fail.at(
                r,
                format!(
                    "the packed weight has {words} words per row; for {cols} columns {}",
                    bits.join(", ")
                ),
            ));
        };
        Ok((arg, uint(arg, "num_bits").unwrap_or(4) as u32))
    }

    /// The group size `arg` gives (a row when it has none), which must make the
    /// scale's `groups` of `cols` columns.
    fn packed_group(&self, scale: TensorRef, arg: &Value, cols: u64, groups: u64) -> Result<u64> {
        let group = match (
            arg.get("strategy").and_then(Value::as_str),
            uint(arg, "group_size"),
        ) {
            (Some("group"), Some(g)) if g > 0 => g as u64,
            _ => cols.max(1),
        };
        if cols.div_ceil(group).max(1) != groups {
            return Err(self.fail.at(
                scale,
                format!(
                    "the scale has {groups} groups per row; {cols} columns in groups of {group} need {}",
                    cols.div_ceil(group).max(1)
                ),
            ));
        }
        Ok(group)
    }
}

/// One line for people: the format and each config group's weights.
fn summary(format: &str, args: &[Value]) -> String {
    let kinds: Vec<String> = args
        .iter()
        .map(|a| {
            format!(
                "{} {}-bit {}{}",
                a.get("type").and_then(Value::as_str).unwrap_or("int"),
                uint(a, "num_bits").unwrap_or(8),
                a.get("strategy")
                    .and_then(Value::as_str)
                    .unwrap_or("tensor"),
                uint(a, "group_size")
                    .map(|g| format!(" {g}"))
                    .unwrap_or_default()
            )
        })
        .collect();
    format!(
        "compressed-tensors ({}{})",
        if format.is_empty() { "" } else { format },
        if kinds.is_empty() {
            String::new()
        } else {
            format!(
                "{}{}",
                if format.is_empty() { "" } else { ", " },
                kinds.join("; ")
            )
        }
    )
}
