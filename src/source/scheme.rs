//! Pre-quantized checkpoints: which scheme `config.json` declares (its
//! `quantization_config`, or an older GPTQ repository's `quantize_config.json`), and
//! which stored tensors make up each quantized weight under it: FP8 with block,
//! channel or tensor scales (`fp8`, `fbgemm_fp8`, `modelopt`, compressed-tensors
//! `float-quantized`), int8 with scales (`int-quantized`), packed int4/int8
//! (compressed-tensors `pack-quantized`), GPTQ, AWQ and MXFP4.
//!
//! The scheme is checked against the tensors both ways before anything is planned: a
//! quantized weight without its scale, a scale of the wrong shape or dtype, packed
//! metadata out of range, a tensor of a scheme the config does not declare, or a
//! declared scheme with none of its tensors, is an error naming the tensor. What comes
//! out is a description (which tensors, which parameters, the output shape); the cast
//! stage's dequantizers (`cast/dequant.rs`) compute the values from it. Schemes that
//! are not supported (bitsandbytes, anything unknown) are refused by name: nothing is
//! ever converted raw unless the user asks for it (`--keep-quantized`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{Shard, TensorInfo};
use crate::dtype::Dtype;
use crate::error::{sanitize, Error, Result};

/// A stored tensor: its shard and its index in that shard's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct TensorRef {
    /// Index into `Source::shards`.
    pub(crate) shard: usize,
    /// Index into that shard's `header.tensors`.
    pub(crate) tensor: usize,
}

/// How quantized values are stored and what they mean, per weight.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Kernel {
    /// `(q − zero) × scale` elementwise, one scale per block of a grid over the last
    /// two dimensions: FP8 block/channel/tensor scales and int8 with scales.
    Grid(Grid),
    /// GPTQ: `qweight` `[in·bits/32, out]` packed along the input, `qzeros` packed
    /// along the output, `scales` `[groups, out]`, `g_idx`; output `[out, in]`.
    Gptq(Gptq),
    /// AWQ (GEMM): `qweight` `[in, out/8]` in AWQ's nibble order, `qzeros`, `scales`
    /// `[groups, out]`; output `[out, in]`.
    Awq(Awq),
    /// compressed-tensors `pack-quantized`: `weight_packed` `[out, ⌈in·bits/32⌉]`,
    /// offset-binary codes, lowest bits first; output `[out, in]`.
    Packed(Packed),
    /// MXFP4: FP4 E2M1 pairs in `blocks` `[E, R, G, 16]`, one E8M0 scale per 32
    /// values; output `[E, G·32, R]` (the last two axes swapped, as transformers does).
    Mxfp4(Mxfp4),
}

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

/// See [`Kernel::Mxfp4`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Mxfp4 {
    pub(crate) blocks: TensorRef,
    pub(crate) scales: TensorRef,
    pub(crate) experts: u64,
    pub(crate) rows: u64,
    pub(crate) groups: u64,
}

/// One weight that is dequantized: its output name and shape, and how.
#[derive(Debug, Clone)]
pub(crate) struct Dequantized {
    /// The output (source-side) name: `X.weight`, or `X` for MXFP4's `X_blocks`.
    pub(crate) name: String,
    /// The tensor as the plan sees it: F32 values of the output shape (the cast stage
    /// produces them piece by piece; nothing is stored at `offset`).
    pub(crate) info: TensorInfo,
    pub(crate) kernel: Kernel,
    /// The checkpoint's compute dtype (`torch_dtype`), what `--dtype keep` gives.
    pub(crate) compute: Dtype,
    /// Stored bytes it consumes (codes, scales, zeros, indices).
    pub(crate) stored_bytes: u64,
    /// Stored names it consumes, main first.
    pub(crate) consumes: Vec<String>,
    /// The stored dtype of its codes, for reports (`F8_E4M3`, `I32`, `U8`).
    pub(crate) stored_dtype: Dtype,
}

/// What the scheme makes of one stored tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Role {
    /// The main tensor of `Scheme::tensors[i]`.
    Main(usize),
    /// Consumed by `Scheme::tensors[i]`.
    Consumed(usize),
    /// Not needed for the weights (an activation or KV-cache scale): the reason.
    Dropped(String),
}

/// A recognised pre-quantized checkpoint.
#[derive(Debug, Clone)]
pub(crate) struct Scheme {
    /// `quant_method` as the config gives it (`fp8`, `gptq`, `compressed-tensors`, ...).
    pub(crate) method: String,
    /// One line for people: `fp8 (E4M3, 128×128 blocks)`.
    pub(crate) summary: String,
    /// The parameters, for `metadata.json`.
    pub(crate) params: Value,
    /// The dequantized weights, in the source order of their main tensors.
    pub(crate) tensors: Vec<Dequantized>,
    /// Every stored tensor the scheme takes or drops.
    pub(crate) roles: HashMap<TensorRef, Role>,
}

/// Where the scheme was declared, for errors.
struct Declared {
    path: PathBuf,
    method: String,
    config: Value,
    torch_dtype: Option<Dtype>,
}

/// Reads `config.json`'s `quantization_config` (or `compression_config`) and an older
/// GPTQ repository's `quantize_config.json` in `dir`.
fn declared(dir: &Path) -> Result<Option<Declared>> {
    let read = |p: &Path| -> Result<Option<Value>> {
        match std::fs::read_to_string(p) {
            Ok(t) => serde_json::from_str(&t)
                .map(Some)
                .map_err(|e| Error::ModelConfig {
                    path: p.to_path_buf(),
                    reason: format!("not valid JSON: {e}"),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("read", p, e)),
        }
    };
    let config_path = dir.join("config.json");
    let config = read(&config_path)?;
    let torch_dtype = config
        .as_ref()
        .and_then(|c| c.get("torch_dtype").or_else(|| c.get("dtype")))
        .and_then(Value::as_str)
        .and_then(Dtype::from_torch)
        .filter(|d| d.is_castable_float());
    let q = config.as_ref().and_then(|c| {
        c.get("quantization_config")
            .or_else(|| c.get("compression_config"))
            .filter(|v| !v.is_null())
    });
    if let Some(q) = q {
        let method = match q.get("quant_method").and_then(Value::as_str) {
            Some(m) => m.to_ascii_lowercase(),
            // compressed-tensors' older configs say only their format.
            None if q.get("config_groups").is_some() => "compressed-tensors".into(),
            None => {
                return Err(Error::Prequantized {
                    path: config_path,
                    tensor: None,
                    scheme: "unknown".into(),
                    reason: "`quantization_config` has no `quant_method`".into(),
                })
            }
        };
        return Ok(Some(Declared {
            path: config_path,
            method,
            config: q.clone(),
            torch_dtype,
        }));
    }
    let qc_path = dir.join("quantize_config.json");
    if let Some(q) = read(&qc_path)? {
        let method = q
            .get("quant_method")
            .and_then(Value::as_str)
            .unwrap_or("gptq")
            .to_ascii_lowercase();
        return Ok(Some(Declared {
            path: qc_path,
            method,
            config: q,
            torch_dtype,
        }));
    }
    Ok(None)
}

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
struct Index<'a> {
    shards: &'a [Shard],
    by_name: HashMap<&'a str, TensorRef>,
}

impl<'a> Index<'a> {
    fn new(shards: &'a [Shard]) -> Self {
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

    fn info(&self, r: TensorRef) -> &'a TensorInfo {
        &self.shards[r.shard].header.tensors[r.tensor]
    }

    fn path(&self, r: TensorRef) -> &'a Path {
        &self.shards[r.shard].path
    }

    fn get(&self, name: &str) -> Option<(TensorRef, &'a TensorInfo)> {
        let r = *self.by_name.get(name)?;
        Some((r, self.info(r)))
    }

    /// Every stored tensor in source order.
    fn all(&self) -> impl Iterator<Item = (TensorRef, &'a TensorInfo)> + '_ {
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
struct Fail<'a> {
    scheme: &'a str,
    index: &'a Index<'a>,
}

impl Fail<'_> {
    fn at(&self, r: TensorRef, reason: String) -> Error {
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
fn marker(name: &str, info: &TensorInfo, index: &Index) -> Option<&'static str> {
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
        (".absmax", "a bitsandbytes absmax"),
        (".SCB", "a bitsandbytes int8 scale"),
        (".quant_map", "a bitsandbytes quant map"),
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

/// Recognises the scheme of the checkpoint in `dir` with `shards` (already validated)
/// and matches every quantized weight to its scales.
///
/// # Errors
///
/// `Prequantized` for an unsupported or contradicted scheme, or a malformed quantized
/// weight, naming the tensor; `ModelConfig` for a config file that is not JSON.
pub(crate) fn recognise(dir: &Path, shards: &[Shard]) -> Result<Option<Scheme>> {
    let index = Index::new(shards);
    let Some(decl) = declared(dir)? else {
        // No scheme declared: a tensor that only a scheme can explain is refused.
        for (r, info) in index.all() {
            if let Some(what) = marker(&info.name, info, &index) {
                return Err(Error::Prequantized {
                    path: index.path(r).to_path_buf(),
                    tensor: Some(info.name.clone()),
                    scheme: "none".into(),
                    reason: format!(
                        "{what} ({}), but no config.json `quantization_config` declares a scheme; \
                         nothing is converted raw (--keep-quantized writes the stored tensors as they are)",
                        info.dtype
                    ),
                });
            }
        }
        return Ok(None);
    };
    let mut m = Matcher {
        fail: Fail {
            scheme: &decl.method,
            index: &index,
        },
        decl: &decl,
        tensors: Vec::new(),
        roles: HashMap::new(),
    };
    let (summary, params) = match decl.method.as_str() {
        "fp8" | "fbgemm_fp8" | "modelopt" => m.fp8()?,
        "compressed-tensors" | "compressed_tensors" => m.compressed_tensors()?,
        "gptq" => m.gptq()?,
        "awq" => m.awq()?,
        "mxfp4" => m.mxfp4()?,
        other => {
            let first = index
                .all()
                .find(|(_, i)| marker(&i.name, i, &index).is_some())
                .or_else(|| index.all().next());
            let what = match other {
                "bitsandbytes" => {
                    let c = &decl.config;
                    let kind = if c.get("load_in_4bit").and_then(Value::as_bool) == Some(true) {
                        c.get("bnb_4bit_quant_type")
                            .and_then(Value::as_str)
                            .unwrap_or("nf4")
                            .to_string()
                    } else {
                        "int8".to_string()
                    };
                    format!("bitsandbytes {kind} checkpoints are not supported")
                }
                o => format!("quant_method `{}` is not supported", sanitize(o)),
            };
            return Err(Error::Prequantized {
                path: decl.path.clone(),
                tensor: first.map(|(_, i)| i.name.clone()),
                scheme: decl.method.clone(),
                reason: format!(
                    "{what} (supported: fp8, fbgemm_fp8, modelopt FP8, compressed-tensors, gptq, awq, mxfp4); nothing is converted raw"
                ),
            });
        }
    };
    m.finish(summary, params).map(Some)
}

struct Matcher<'a> {
    fail: Fail<'a>,
    decl: &'a Declared,
    tensors: Vec<Dequantized>,
    roles: HashMap<TensorRef, Role>,
}

/// Parameters from a JSON config.
fn uint(c: &Value, key: &str) -> Option<i64> {
    c.get(key).and_then(Value::as_i64)
}

impl<'a> Matcher<'a> {
    fn index(&self) -> &'a Index<'a> {
        self.fail.index
    }

    fn config_error(&self, reason: String) -> Error {
        Error::Prequantized {
            path: self.decl.path.clone(),
            tensor: None,
            scheme: self.decl.method.clone(),
            reason,
        }
    }

    /// The compute dtype: `torch_dtype`, else the scales' dtype when it is a float of
    /// 16 bits or more, else f32.
    fn compute(&self, scale: &TensorInfo) -> Dtype {
        self.decl.torch_dtype.unwrap_or(match scale.dtype {
            d @ (Dtype::F16 | Dtype::Bf16 | Dtype::F32) => d,
            _ => Dtype::F32,
        })
    }

    /// Records a dequantized weight taking `main` and consuming `parts`.
    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        name: String,
        main: TensorRef,
        shape: Vec<u64>,
        kernel: Kernel,
        parts: &[TensorRef],
        compute: Dtype,
    ) -> Result<()> {
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
    fn companion(&self, main: TensorRef, stem: &str, suffix: &str) -> Result<TensorRef> {
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

    fn check_dtype(&self, r: TensorRef, what: &str, allowed: &[Dtype]) -> Result<Dtype> {
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

    fn check_shape(&self, r: TensorRef, what: &str, want: &[u64], because: &str) -> Result<()> {
        let got = &self.index().info(r).shape;
        if got == want {
            return Ok(());
        }
        Err(self
            .fail
            .at(r, format!("{what} shape {got:?}; {because} needs {want:?}")))
    }

    /// Drops the activation and KV-cache scales, which the weights do not need.
    fn drop_activation_scales(&mut self) {
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

    /// `q` (`[..., R, C]`) with `scale` on a grid of blocks, and an optional `zero`.
    fn grid(
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
        let lead: Vec<u64> = qi.shape[..qi.shape.len().saturating_sub(2)].to_vec();
        let per_tensor = si.numel == 1 && si.shape.len() <= 1;
        let (block, grid) = if per_tensor && block.is_none() {
            ((rows.max(1), cols.max(1)), (1, 1))
        } else {
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
            ((br, bc), grid)
        };
        if let Some(z) = zero {
            let zi = index.info(z);
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
        }
        let compute = self.compute(si);
        let mut parts = vec![scale];
        parts.extend(zero);
        self.add(
            format!("{stem}.weight"),
            q,
            qi.shape.clone(),
            Kernel::Grid(Grid {
                q,
                scale,
                zero,
                rows,
                cols,
                block,
                grid,
                per_tensor: per_tensor && grid == (1, 1),
            }),
            &parts,
            compute,
        )
    }

    /// FP8: `weight` F8 with `weight_scale_inv` (DeepSeek-style blocks) or
    /// `weight_scale` (per tensor or channel).
    fn fp8(&mut self) -> Result<(String, Value)> {
        let c = &self.decl.config;
        if self.decl.method == "modelopt" {
            let algo = c
                .get("quant_algo")
                .or_else(|| c.pointer("/quantization/quant_algo"))
                .and_then(Value::as_str)
                .unwrap_or("FP8");
            if !algo.eq_ignore_ascii_case("fp8") {
                return Err(self.config_error(format!(
                    "modelopt `quant_algo` {} is not supported (only FP8 is); nothing is converted raw",
                    sanitize(algo)
                )));
            }
        }
        let block = match c.get("weight_block_size") {
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
        };
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
            self.check_dtype(
                r,
                "the weight",
                &[
                    Dtype::F8E4M3,
                    Dtype::F8E5M2,
                    Dtype::F8E4M3Fnuz,
                    Dtype::F8E5M2Fnuz,
                ],
            )?;
            let inv = index.get(&format!("{stem}.weight_scale_inv")).map(|x| x.0);
            let plain = index.get(&format!("{stem}.weight_scale")).map(|x| x.0);
            let scale = match (inv, plain) {
                (Some(s), None) | (None, Some(s)) => s,
                (Some(_), Some(s)) => {
                    return Err(self.fail.at(
                        s,
                        "both `weight_scale` and `weight_scale_inv` are stored for one weight"
                            .into(),
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

    /// compressed-tensors: `weight_packed` (pack-quantized), or `weight` with
    /// `weight_scale` (float- and int-quantized, naive-quantized).
    fn compressed_tensors(&mut self) -> Result<(String, Value)> {
        let c = &self.decl.config;
        let format = c
            .get("format")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        // The weight arguments of every config group.
        let mut args: Vec<Value> = Vec::new();
        if let Some(groups) = c.get("config_groups").and_then(Value::as_object) {
            for (name, g) in groups {
                let f = g.get("format").and_then(Value::as_str).unwrap_or(&format);
                match f {
                    "" | "float-quantized" | "int-quantized" | "pack-quantized"
                    | "naive-quantized" | "dense" => {}
                    other => {
                        return Err(self.config_error(format!(
                            "config group `{}` has format `{}`, which is not supported \
                             (float-quantized, int-quantized, naive-quantized and pack-quantized are); nothing is converted raw",
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
        self.drop_activation_scales();
        let index = self.index();
        for (r, info) in index.all() {
            if let Some(stem) = info.name.strip_suffix(".weight_packed") {
                self.pack_quantized(r, stem, &args)?;
            } else if let Some(stem) = info.name.strip_suffix(".weight") {
                if index.get(&format!("{stem}.weight_scale")).is_none() {
                    if info.dtype.is_fp8() {
                        return Err(self.fail.at(r, "its `weight_scale` is missing".into()));
                    }
                    continue;
                }
                self.check_dtype(
                    r,
                    "the weight",
                    &[
                        Dtype::F8E4M3,
                        Dtype::F8E5M2,
                        Dtype::F8E4M3Fnuz,
                        Dtype::F8E5M2Fnuz,
                        Dtype::I8,
                    ],
                )?;
                let scale = self.companion(r, stem, ".weight_scale")?;
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
                self.grid(r, stem, scale, zero, b)?;
            }
        }
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
        Ok((
            format!(
                "compressed-tensors ({}{})",
                if format.is_empty() { "" } else { &format },
                if kinds.is_empty() {
                    String::new()
                } else {
                    format!(
                        "{}{}",
                        if format.is_empty() { "" } else { ", " },
                        kinds.join("; ")
                    )
                }
            ),
            c.clone(),
        ))
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
        let bits = uint(arg, "num_bits").unwrap_or(4) as u32;
        if rows != out {
            return Err(self.fail.at(
                shape_t,
                format!("`weight_shape` says {rows} rows, the packed weight has {out}"),
            ));
        }
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
        let compute = self.compute(sc);
        self.add(
            format!("{stem}.weight"),
            r,
            vec![rows, cols],
            Kernel::Packed(Packed {
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
            &parts,
            compute,
        )
    }

    /// GPTQ: every `X.qweight` with `X.scales`, `X.qzeros` and `X.g_idx`.
    fn gptq(&mut self) -> Result<(String, Value)> {
        let c = self.decl.config.clone();
        let bits = uint(&c, "bits").unwrap_or(4);
        if !matches!(bits, 2 | 3 | 4 | 8) {
            return Err(
                self.config_error(format!("`bits` is {bits}; GPTQ packs 2, 3, 4 or 8 bits"))
            );
        }
        let bits = bits as u32;
        let group_size = uint(&c, "group_size").unwrap_or(128);
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
        let index = self.index();
        for (r, info) in index.all() {
            let Some(stem) = info.name.strip_suffix(".qweight") else {
                continue;
            };
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
                    format!("`qweight` has {packed_rows} packed rows, no whole number of {bits}-bit inputs"),
                ));
            }
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
            self.add(
                format!("{stem}.weight"),
                r,
                vec![outputs, inputs],
                Kernel::Gptq(Gptq {
                    qweight: r,
                    qzeros,
                    scales,
                    g_idx,
                    bits,
                    group,
                    groups,
                    inputs,
                    outputs,
                    zero_offset,
                }),
                &parts,
                compute,
            )?;
        }
        let desc = c.get("desc_act").and_then(Value::as_bool).unwrap_or(false);
        let sym = c.get("sym").and_then(Value::as_bool).unwrap_or(true);
        Ok((
            format!(
                "gptq ({bits}-bit, group {group_size}, {}{}, {format})",
                if sym { "symmetric" } else { "asymmetric" },
                if desc { ", desc_act" } else { "" }
            ),
            c,
        ))
    }

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
            self.check_shape(
                qzeros,
                "`qzeros` has",
                &[groups, words],
                &format!("4-bit zeros of {outputs} outputs"),
            )?;
            let compute = self.compute(index.info(scales));
            self.add(
                format!("{stem}.weight"),
                r,
                vec![outputs, inputs],
                Kernel::Awq(Awq {
                    qweight: r,
                    qzeros,
                    scales,
                    group,
                    groups,
                    inputs,
                    outputs,
                }),
                &[scales, qzeros],
                compute,
            )?;
        }
        Ok((format!("awq (4-bit, group {group_size}, gemm)"), c))
    }

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
            self.add(
                stem.to_string(),
                r,
                vec![experts, groups * 32, rows],
                Kernel::Mxfp4(Mxfp4 {
                    blocks: r,
                    scales,
                    experts,
                    rows,
                    groups,
                }),
                &[scales],
                compute,
            )?;
        }
        Ok((
            "mxfp4 (FP4 E2M1, E8M0 scales per 32)".into(),
            self.decl.config.clone(),
        ))
    }

    /// Every tensor of a scheme must be taken; the scheme must take something.
    fn finish(self, summary: String, params: Value) -> Result<Scheme> {
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
                    expected_layout(&self.decl.method)
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

/// What a scheme's tensors look like, for the error when none are there.
fn expected_layout(method: &str) -> &'static str {
    match method {
        "fp8" => "`X.weight` F8_E4M3 with `X.weight_scale_inv`",
        "fbgemm_fp8" | "modelopt" => "`X.weight` F8_E4M3 with `X.weight_scale`",
        "compressed-tensors" | "compressed_tensors" => {
            "`X.weight_packed` or `X.weight` with `X.weight_scale`"
        }
        "gptq" => "`X.qweight` with `X.scales`, `X.qzeros`, `X.g_idx`",
        "awq" => "`X.qweight` with `X.scales`, `X.qzeros`",
        "mxfp4" => "`X_blocks` with `X_scales`",
        _ => "",
    }
}
