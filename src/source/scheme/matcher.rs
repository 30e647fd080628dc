//! The machinery every scheme family shares: the stored tensors by name ([`Index`]),
//! the errors naming a tensor ([`Fail`]), the tensors that only a scheme explains
//! ([`marker`]), and the [`Matcher`] a family records its weights with (companions,
//! dtype and shape checks, the roles of the stored tensors, the final check that
//! every quantized tensor is taken).

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use super::config::Declared;
use super::{Dequantized, Kernel, Role, Scheme, TensorRef};
use crate::dtype::Dtype;
use crate::error::{sanitize, Error, Result};
use crate::source::{Shard, TensorInfo};

/// Names of activation, KV-cache and other scales a weight does not need.
const DROPPED_SUFFIXES: &[&str] = &[
    ".input_scale",
    ".input_zero_point",
    ".output_scale",
    ".output_zero_point",
    ".k_scale",
    ".v_scale",
    ".q_scale",
    ".prob_scale",
    ".kv_scale",
    ".input_global_scale",
];

/// The stored tensors by name.
pub(super) struct Index<'a> {
    /// The shards, as `TensorRef::shard` counts them.
    pub(super) shards: &'a [Shard],
    by_name: HashMap<&'a str, TensorRef>,
}

impl<'a> Index<'a> {
    pub(super) fn new(shards: &'a [Shard]) -> Self {
        let mut by_name = HashMap::new();
        for (s, shard) in shards.iter().enumerate() {
            for (t, info) in shard.header.tensors.iter().enumerate() {
                by_name.insert(
                    info.name.as_str(),
                    TensorRef {
                        shard: s,
                        tensor: t,
                    },
                );
            }
        }
        Index { shards, by_name }
    }

    pub(super) fn info(&self, r: TensorRef) -> &'a TensorInfo {
        &self.shards[r.shard].header.tensors[r.tensor]
    }

    pub(super) fn path(&self, r: TensorRef) -> &'a Path {
        &self.shards[r.shard].path
    }

    pub(super) fn get(&self, name: &str) -> Option<(TensorRef, &'a TensorInfo)> {
        let r = *self.by_name.get(name)?;
        Some((r, self.info(r)))
    }

    /// Every stored tensor in source order.
    pub(super) fn all(&self) -> impl Iterator<Item = (TensorRef, &'a TensorInfo)> + '_ {
        self.shards.iter().enumerate().flat_map(|(s, shard)| {
            shard.header.tensors.iter().enumerate().map(move |(t, i)| {
                (
                    TensorRef {
                        shard: s,
                        tensor: t,
                    },
                    i,
                )
            })
        })
    }
}

/// Builds the errors of one scheme.
pub(super) struct Fail<'a> {
    scheme: &'a str,
    index: &'a Index<'a>,
}

impl Fail<'_> {
    pub(super) fn at(&self, r: TensorRef, reason: String) -> Error {
        Error::Prequantized {
            path: self.index.path(r).to_path_buf(),
            tensor: Some(self.index.info(r).name.clone()),
            scheme: self.scheme.to_string(),
            reason,
        }
    }
}

/// True when a stored tensor belongs to some quantization scheme by its dtype or name
/// (checked when no scheme is declared, and after matching, for leftovers).
pub(super) fn marker(name: &str, info: &TensorInfo, index: &Index) -> Option<&'static str> {
    if info.dtype.is_fp8() {
        return Some("an 8-bit float tensor");
    }
    if info.dtype.is_sub_byte() {
        return Some("a sub-byte float tensor");
    }
    const NAMES: &[(&str, &str)] = &[
        (".qweight", "a GPTQ/AWQ packed weight"),
        (".qzeros", "a GPTQ/AWQ packed zero point"),
        (".weight_scale_inv", "an FP8 block scale"),
        (".weight_scale", "a weight scale"),
        (".weight_packed", "a compressed-tensors packed weight"),
        (".weight_zero_point", "a weight zero point"),
        (".weight_scale_2", "an NVFP4 global scale"),
        (".weight_global_scale", "an NVFP4 global scale"),
        (".absmax", "a bitsandbytes absmax"),
        (".SCB", "a bitsandbytes int8 scale"),
        (".quant_map", "a bitsandbytes quant map"),
        (".nested_absmax", "a bitsandbytes nested absmax"),
        (".nested_quant_map", "a bitsandbytes nested quant map"),
        (".weight_format", "a bitsandbytes int8 weight format"),
    ];
    for (suffix, what) in NAMES {
        if name.ends_with(suffix) {
            return Some(what);
        }
    }
    if name.contains(".quant_state.") {
        return Some("a bitsandbytes quant state");
    }
    if let Some(stem) = name.strip_suffix("_blocks") {
        if index.get(&format!("{stem}_scales")).is_some() {
            return Some("an MXFP4 block tensor");
        }
    }
    None
}

/// What a family records its weights with: the declaration, the stored tensors, and
/// the weights and roles found so far.
pub(super) struct Matcher<'a> {
    /// The errors of this scheme (and the stored tensors, `fail.index`).
    pub(super) fail: Fail<'a>,
    /// The declaration.
    pub(super) decl: &'a Declared,
    tensors: Vec<Dequantized>,
    roles: HashMap<TensorRef, Role>,
}

/// A dequantized weight a family found, for [`Matcher::add`].
pub(super) struct Weight<'p> {
    /// The output name.
    pub(super) name: String,
    /// The stored tensor it takes (its codes).
    pub(super) main: TensorRef,
    /// The output shape.
    pub(super) shape: Vec<u64>,
    /// How its values are computed from the stored tensors.
    pub(super) kernel: Kernel,
    /// The other stored tensors it consumes (scales, zeros, indices).
    pub(super) parts: &'p [TensorRef],
    /// The compute dtype.
    pub(super) compute: Dtype,
}

impl<'a> Matcher<'a> {
    /// A matcher for the scheme `decl` declares over the stored tensors `index`.
    pub(super) fn new(decl: &'a Declared, index: &'a Index<'a>) -> Self {
        Matcher {
            fail: Fail {
                scheme: &decl.method,
                index,
            },
            decl,
            tensors: Vec::new(),
            roles: HashMap::new(),
        }
    }

    /// The stored tensors.
    pub(super) fn index(&self) -> &'a Index<'a> {
        self.fail.index
    }

    /// An error about the declaration itself (no tensor).
    pub(super) fn config_error(&self, reason: String) -> Error {
        Error::Prequantized {
            path: self.decl.path.clone(),
            tensor: None,
            scheme: self.decl.method.clone(),
            reason,
        }
    }

    /// The compute dtype: `torch_dtype`, else the scales' dtype when it is a float of
    /// 16 bits or more, else f32.
    pub(super) fn compute(&self, scale: &TensorInfo) -> Dtype {
        self.decl.torch_dtype.unwrap_or(match scale.dtype {
            d @ (Dtype::F16 | Dtype::Bf16 | Dtype::F32) => d,
            _ => Dtype::F32,
        })
    }

    /// Records a dequantized weight taking `w.main` and consuming `w.parts`.
    pub(super) fn add(&mut self, w: Weight) -> Result<()> {
        let Weight {
            name,
            main,
            shape,
            kernel,
            parts,
            compute,
        } = w;
        let index = self.index();
        for &p in std::iter::once(&main).chain(parts) {
            if let Some(Role::Main(i) | Role::Consumed(i)) = self.roles.get(&p) {
                return Err(self.fail.at(
                    p,
                    format!(
                        "it is taken by `{}` already",
                        sanitize(&self.tensors[*i].name)
                    ),
                ));
            }
        }
        let numel = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(4).map(|_| n))
            .ok_or_else(|| self.fail.at(main, "the dequantized shape overflows".into()))?;
        let i = self.tensors.len();
        self.roles.insert(main, Role::Main(i));
        for &p in parts {
            self.roles.insert(p, Role::Consumed(i));
        }
        let main_info = index.info(main);
        let stored_bytes = std::iter::once(&main)
            .chain(parts)
            .map(|&p| index.info(p).len)
            .sum();
        self.tensors.push(Dequantized {
            info: TensorInfo {
                name: name.clone(),
                dtype: Dtype::F32,
                shape,
                numel,
                offset: 0,
                len: numel * 4,
                strides: None,
            },
            name,
            kernel,
            compute,
            stored_bytes,
            consumes: std::iter::once(&main)
                .chain(parts)
                .map(|&p| index.info(p).name.clone())
                .collect(),
            stored_dtype: main_info.dtype,
        });
        Ok(())
    }

    /// A required companion tensor of `main`: `stem + suffix`.
    pub(super) fn companion(&self, main: TensorRef, stem: &str, suffix: &str) -> Result<TensorRef> {
        self.index()
            .get(&format!("{stem}{suffix}"))
            .map(|(r, _)| r)
            .ok_or_else(|| {
                self.fail.at(
                    main,
                    format!(
                        "its `{}{suffix}` is missing",
                        sanitize(stem.rsplit('.').next().unwrap_or(stem))
                    ),
                )
            })
    }

    /// `r`'s dtype, when it is one of `allowed`.
    pub(super) fn check_dtype(&self, r: TensorRef, what: &str, allowed: &[Dtype]) -> Result<Dtype> {
        let d = self.index().info(r).dtype;
        if allowed.contains(&d) {
            return Ok(d);
        }
        Err(self.fail.at(
            r,
            format!(
                "{what} is {d}; expected {}",
                allowed
                    .iter()
                    .map(|d| d.safetensors_name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ))
    }

    /// Checks that `r` has the shape `want`, which `because` needs.
    pub(super) fn check_shape(
        &self,
        r: TensorRef,
        what: &str,
        want: &[u64],
        because: &str,
    ) -> Result<()> {
        let got = &self.index().info(r).shape;
        if got == want {
            return Ok(());
        }
        Err(self
            .fail
            .at(r, format!("{what} shape {got:?}; {because} needs {want:?}")))
    }

    /// The group size of `inputs` rows (`group_size`, or all of them when it is 0 or
    /// less) and the group count, with a check that `scales` holds one per group and
    /// output (GPTQ's and AWQ's `[groups, out]`).
    pub(super) fn input_groups(
        &self,
        scales: TensorRef,
        inputs: u64,
        outputs: u64,
        group_size: i64,
    ) -> Result<(u64, u64)> {
        let group = if group_size <= 0 {
            inputs.max(1)
        } else {
            group_size as u64
        };
        let groups = inputs.div_ceil(group).max(1);
        self.check_shape(
            scales,
            "the scales have",
            &[groups, outputs],
            &format!("[{inputs} in, {outputs} out] in groups of {group}"),
        )?;
        Ok((group, groups))
    }

    /// Drops the activation and KV-cache scales, which the weights do not need.
    pub(super) fn drop_activation_scales(&mut self) {
        let index = self.index();
        for (r, info) in index.all() {
            if DROPPED_SUFFIXES.iter().any(|s| info.name.ends_with(s)) {
                self.roles.insert(
                    r,
                    Role::Dropped(format!(
                        "{}: an activation or KV-cache scale, not needed for the weights",
                        self.decl.method
                    )),
                );
            }
        }
    }

    /// Every tensor of a scheme must be taken; the scheme must take something (its
    /// weights look like `layout`).
    pub(super) fn finish(self, summary: String, params: Value, layout: &str) -> Result<Scheme> {
        let index = self.index();
        for (r, info) in index.all() {
            if self.roles.contains_key(&r) {
                continue;
            }
            if let Some(what) = marker(&info.name, info, index) {
                return Err(self.fail.at(
                    r,
                    format!(
                        "{what} ({}) that the declared scheme `{}` does not explain; nothing is converted raw",
                        info.dtype,
                        sanitize(&self.decl.method)
                    ),
                ));
            }
        }
        if self.tensors.is_empty() {
            return Err(Error::Prequantized {
                path: self.decl.path.clone(),
                tensor: None,
                scheme: self.decl.method.clone(),
                reason: format!(
                    "config.json declares `{}` but no tensor has its layout ({})",
                    sanitize(&self.decl.method),
                    layout
                ),
            });
        }
        Ok(Scheme {
            method: self.decl.method.clone(),
            summary,
            params,
            tensors: self.tensors,
            roles: self.roles,
        })
    }
}
