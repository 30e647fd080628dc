//! Pre-quantized checkpoints: which scheme `config.json` declares (its
//! `quantization_config`, or an older GPTQ repository's `quantize_config.json`), and
//! which stored tensors make up each quantized weight under it: FP8 with block,
//! channel or tensor scales (`fp8`, `fbgemm_fp8`, `modelopt`, compressed-tensors
//! `float-quantized`), int8 with scales (`int-quantized`), packed int4/int8
//! (compressed-tensors `pack-quantized`), GPTQ, AWQ and MXFP4; ModelOpt's NVFP4, MXFP8
//! and MIXED_PRECISION, compressed-tensors' NVFP4, MXFP4 and MXFP8; bitsandbytes (NF4,
//! FP4, LLM.int8).
//!
//! The scheme is checked against the tensors both ways before anything is planned: a
//! quantized weight without its scale, a scale of the wrong shape or dtype, packed
//! metadata out of range, a tensor of a scheme the config does not declare, or a
//! declared scheme with none of its tensors, is an error naming the tensor. What comes
//! out is a description (which tensors, which parameters, the output shape); the cast
//! stage's dequantizers (`cast/dequant/`) compute the values from it. Schemes that
//! are not supported (anything unknown) are refused by name: nothing is
//! ever converted raw unless the user asks for it (`--keep-quantized`).
//!
//! One file per scheme family (`fp8`, `modelopt`, `compressed_tensors`, `gptq`, `awq`,
//! `mxfp4`, `bitsandbytes`), each a [`Family`] in [`FAMILIES`]: it recognises its weights and describes
//! each one as a [`Kernel`] (the descriptions live with the family that makes them;
//! `grid` is the one FP8, ModelOpt and compressed-tensors share, `fp4` the one ModelOpt
//! and compressed-tensors share for NVFP4 and MXFP4). `config` reads the declaration,
//! `matcher` holds what every family uses. A new format is a file here (its `Family`
//! and its description), a line in [`FAMILIES`] and a variant of [`Kernel`]; on the
//! cast side, a file in `cast/dequant/` and a line in its table.

mod awq;
mod bitsandbytes;
mod compressed_tensors;
mod config;
mod fp4;
mod fp8;
mod gptq;
mod grid;
mod matcher;
mod modelopt;
mod mxfp4;

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

pub(crate) use awq::Awq;
pub(crate) use bitsandbytes::{Bnb, Bnb4, BnbInt8};
pub(crate) use compressed_tensors::Packed;
use config::{declared, Declared};
pub(crate) use fp4::{Fp4, Global};
pub(crate) use gptq::Gptq;
pub(crate) use grid::Grid;
use matcher::{marker, Index, Matcher};
pub(crate) use mxfp4::Mxfp4;

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

/// How quantized values are stored and what they mean, per weight: each variant a
/// description that a family's file defines, which `cast/dequant/`'s table maps to its
/// decoder.
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
    /// FP4 E2M1 codes `[R, C/2]`, low nibble first, one scale per group of a row:
    /// NVFP4 (ModelOpt, compressed-tensors) and compressed-tensors' MXFP4.
    Fp4(Fp4),
    /// bitsandbytes: 4-bit NF4/FP4 blocks over the flattened tensor (high nibble
    /// first, absmax per block, optionally double-quantized), or LLM.int8 rows with a
    /// scale per row.
    Bitsandbytes(Bnb),
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

/// A scheme family: the `quant_method`s it answers and how it finds its weights.
struct Family {
    /// The `quant_method`s, each with what its weights' tensors are called (for the
    /// error when the checkpoint has none).
    methods: &'static [(&'static str, &'static str)],
    /// Its name in the list of supported schemes.
    listed: &'static str,
    /// Matches every quantized weight to its scales ([`Matcher::add`]); returns the
    /// summary and the parameters.
    recognise: fn(&mut Matcher) -> Result<(String, Value)>,
}

/// The supported scheme families, in the order the supported list names them. A new
/// format: one line here.
const FAMILIES: &[&Family] = &[
    &fp8::FAMILY,
    &modelopt::FAMILY,
    &compressed_tensors::FAMILY,
    &gptq::FAMILY,
    &awq::FAMILY,
    &mxfp4::FAMILY,
    &bitsandbytes::FAMILY,
];

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
        undeclared(&index)?;
        return Ok(None);
    };
    let found = FAMILIES.iter().find_map(|f| {
        let (_, layout) = f.methods.iter().find(|(m, _)| *m == decl.method)?;
        Some((f, layout))
    });
    let Some((family, layout)) = found else {
        return Err(unsupported(&decl, &index));
    };
    let mut m = Matcher::new(&decl, &index);
    let (summary, params) = (family.recognise)(&mut m)?;
    m.finish(summary, params, layout).map(Some)
}

/// No scheme declared: a tensor that only a scheme can explain is refused.
fn undeclared(index: &Index) -> Result<()> {
    for (r, info) in index.all() {
        if let Some(what) = marker(&info.name, info, index) {
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
    Ok(())
}

/// The error for a declared scheme no family answers, naming the first tensor that
/// looks quantized (else the first tensor) and the supported ones.
fn unsupported(decl: &Declared, index: &Index) -> Error {
    let first = index
        .all()
        .find(|(_, i)| marker(&i.name, i, index).is_some())
        .or_else(|| index.all().next());
    let what = format!("quant_method `{}` is not supported", sanitize(&decl.method));
    let supported: Vec<&str> = FAMILIES.iter().map(|f| f.listed).collect();
    Error::Prequantized {
        path: decl.path.clone(),
        tensor: first.map(|(_, i)| i.name.clone()),
        scheme: decl.method.clone(),
        reason: format!(
            "{what} (supported: {}); nothing is converted raw",
            supported.join(", ")
        ),
    }
}
