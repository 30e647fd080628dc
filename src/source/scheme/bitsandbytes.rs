//! bitsandbytes (`bitsandbytes`): 4-bit NF4 and FP4 weights (`X.weight` packed two
//! codes a byte, `X.weight.absmax` per block, optionally double-quantized, and the
//! per-tensor JSON state `X.weight.quant_state.bitsandbytes__nf4`/`__fp4`), and LLM.int8
//! weights (`X.weight` I8 with `X.SCB` per row and `X.weight_format`), described as a
//! [`Bnb`], decoded by `cast/dequant/bitsandbytes.rs`.
//!
//! A weight is recognised by its own tensors (`X.weight.absmax`, `X.SCB`), as
//! transformers' loader does; the config must agree (4-bit or 8-bit, the quant type,
//! double quantization, `llm_int8_skip_modules`). The block size and the shape come
//! from the state, never from the config (it has neither).

use serde_json::Value;

use super::matcher::{Matcher, Weight};
use super::{Family, Kernel, TensorRef};
use crate::dtype::Dtype;
use crate::error::{sanitize, Result};

/// The bitsandbytes family.
pub(super) const FAMILY: Family = Family {
    methods: &[(
        "bitsandbytes",
        "`X.weight` with `X.weight.absmax` and `X.weight.quant_state.bitsandbytes__nf4` or `__fp4`, or `X.weight` I8 with `X.SCB`",
    )],
    listed: "bitsandbytes",
    recognise: |m| m.bitsandbytes(),
};

/// The largest quant state read (bitsandbytes writes about 200 bytes of JSON).
const MAX_STATE: u64 = 1 << 16;

/// See [`Kernel::Bitsandbytes`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Bnb {
    /// 4-bit NF4 or FP4 blocks.
    Four(Bnb4),
    /// LLM.int8 rows.
    Int8(BnbInt8),
}

/// A 4-bit weight: `fl(LUT[nibble] × absmax[i / blocksize])` over the flattened
/// tensor, the high nibble of each byte first.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Bnb4 {
    /// The packed codes (any stored dtype: its bytes).
    pub(crate) packed: TensorRef,
    /// F32 per block, or U8 codes of the nested map when double-quantized.
    pub(crate) absmax: TensorRef,
    pub(crate) nested: Option<Nested>,
    /// FP4 (bitsandbytes' own table, not OCP E2M1), else NF4.
    pub(crate) fp4: bool,
    pub(crate) blocksize: u64,
}

/// Double quantization: `absmax[j] = fl(fl(map[code[j]] × nested_absmax[j /
/// blocksize]) + offset)`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Nested {
    /// `nested_quant_map`, F32 `[256]`.
    pub(crate) map: TensorRef,
    /// `nested_absmax`, F32 per `blocksize` absmax codes.
    pub(crate) absmax: TensorRef,
    pub(crate) blocksize: u64,
    pub(crate) offset: f32,
}

/// An LLM.int8 weight: `fl(fl(f32(q) × SCB[row]) × c)`, c the f32 nearest 1/127.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BnbInt8 {
    pub(crate) weight: TensorRef,
    pub(crate) scb: TensorRef,
    pub(crate) cols: u64,
}

/// A weight's parsed quant state.
struct State {
    fp4: bool,
    blocksize: u64,
    shape: Vec<u64>,
    nested: Option<(u64, f32)>,
    dtype: Option<Dtype>,
}

impl Matcher<'_> {
    /// bitsandbytes: every `X.weight.absmax` (4-bit) and every `X.SCB` (LLM.int8).
    fn bitsandbytes(&mut self) -> Result<(String, Value)> {
        let index = self.index();
        for (r, info) in index.all() {
            if let Some(p) = info.name.strip_suffix(".absmax") {
                self.bnb4(r, p)?;
            } else if let Some(stem) = info.name.strip_suffix(".SCB") {
                self.bnb_int8(r, stem)?;
            } else if let Some(stem) = info.name.strip_suffix(".weight") {
                // An I8 weight is LLM.int8's codes: never converted raw without its scale.
                let int8 = info.dtype == Dtype::I8 && flag(&self.decl.config, "load_in_8bit");
                if int8 && index.get(&format!("{stem}.SCB")).is_none() {
                    return Err(self.fail.at(r, "its `SCB` is missing".into()));
                }
            }
        }
        let c = &self.decl.config;
        let summary = if flag(c, "load_in_4bit") {
            format!(
                "bitsandbytes ({} 4-bit{})",
                c.get("bnb_4bit_quant_type")
                    .and_then(Value::as_str)
                    .unwrap_or("fp4"),
                if flag(c, "bnb_4bit_use_double_quant") {
                    ", double quantization"
                } else {
                    ""
                }
            )
        } else {
            "bitsandbytes (LLM.int8, a scale per row)".into()
        };
        Ok((summary, c.clone()))
    }

    /// One 4-bit weight `p` (`X.weight`), found by its absmax `a`.
    fn bnb4(&mut self, a: TensorRef, p: &str) -> Result<()> {
        let index = self.index();
        let c = &self.decl.config;
        if !flag(c, "load_in_4bit") {
            return Err(self.fail.at(
                a,
                "a bitsandbytes 4-bit absmax, but config.json does not declare `load_in_4bit`"
                    .into(),
            ));
        }
        self.not_skipped(a, p)?;
        let Some((packed, _)) = index.get(p) else {
            return Err(self
                .fail
                .at(a, format!("its weight `{}` is missing", sanitize(p))));
        };
        let (st_ref, st) = self.bnb_state(a, p)?;
        let want = c
            .get("bnb_4bit_quant_type")
            .and_then(Value::as_str)
            .unwrap_or("fp4");
        let kind = if st.fp4 { "fp4" } else { "nf4" };
        if kind != want {
            return Err(self.fail.at(
                st_ref,
                format!("the state's quant_type `{kind}` contradicts config.json's `bnb_4bit_quant_type` `{}`", sanitize(want)),
            ));
        }
        let n = st.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        let n = n.ok_or_else(|| self.fail.at(st_ref, "the state's shape overflows".into()))?;
        let need = n.div_ceil(2);
        let len = index.info(packed).len;
        if len != need {
            return Err(self.fail.at(
                packed,
                format!(
                    "the packed weight holds {len} bytes; the state's shape {:?} ({n} values) needs {need}",
                    st.shape
                ),
            ));
        }
        if index.info(packed).dtype.is_sub_byte() {
            self.check_dtype(packed, "the packed weight", &[Dtype::U8])?;
        }
        let blocks = n.div_ceil(st.blocksize);
        let (nested, mut parts) = self.bnb_absmax(a, p, &st, blocks)?;
        parts.push(st_ref);
        if let Some((m, _)) = index.get(&format!("{p}.quant_map")) {
            parts.push(m);
        }
        let compute = self.decl.torch_dtype.or(st.dtype).unwrap_or(Dtype::Bf16);
        self.add(Weight {
            name: p.to_string(),
            main: packed,
            shape: st.shape,
            kernel: Kernel::Bitsandbytes(Bnb::Four(Bnb4 {
                packed,
                absmax: a,
                nested,
                fp4: st.fp4,
                blocksize: st.blocksize,
            })),
            parts: &parts,
            compute,
        })
    }

    /// The absmax `a` of `blocks` blocks, plain (F32) or double-quantized (U8 codes
    /// with `nested_absmax` and `nested_quant_map`), checked against the state and the
    /// config; the parts it consumes.
    fn bnb_absmax(
        &self,
        a: TensorRef,
        p: &str,
        st: &State,
        blocks: u64,
    ) -> Result<(Option<Nested>, Vec<TensorRef>)> {
        let index = self.index();
        let got = index.info(a).numel;
        if got != blocks || index.info(a).shape.len() != 1 {
            return Err(self.fail.at(
                a,
                format!(
                    "the absmax has shape {:?}; {} values in blocks of {} need [{blocks}]",
                    index.info(a).shape,
                    st.shape.iter().product::<u64>(),
                    st.blocksize
                ),
            ));
        }
        let declared = flag(&self.decl.config, "bnb_4bit_use_double_quant");
        let nested_t = index.get(&format!("{p}.nested_absmax")).map(|x| x.0);
        if declared != nested_t.is_some() {
            return Err(self.fail.at(
                a,
                format!(
                    "config.json's `bnb_4bit_use_double_quant` is {declared}, but the weight has {} `nested_absmax`",
                    if declared { "no" } else { "a" }
                ),
            ));
        }
        let Some(na) = nested_t else {
            self.check_dtype(a, "the absmax", &[Dtype::F32])?;
            return Ok((None, vec![a]));
        };
        self.check_dtype(a, "the double-quantized absmax", &[Dtype::U8])?;
        let map = self.companion(a, p, ".nested_quant_map")?;
        self.check_dtype(map, "the nested quant map", &[Dtype::F32])?;
        self.check_shape(map, "the nested quant map has", &[256], "a U8 absmax code")?;
        self.check_dtype(na, "the nested absmax", &[Dtype::F32])?;
        let Some((nb, offset)) = st.nested else {
            return Err(self.fail.at(
                na,
                "the state has no `nested_blocksize` and `nested_offset`".into(),
            ));
        };
        let want = blocks.div_ceil(nb);
        self.check_shape(
            na,
            "the nested absmax has",
            &[want],
            &format!("{blocks} absmax codes in blocks of {nb}"),
        )?;
        let nested = Nested {
            map,
            absmax: na,
            blocksize: nb,
            offset,
        };
        Ok((Some(nested), vec![a, na, map]))
    }

    /// The state of 4-bit weight `p` (`quant_state.bitsandbytes__nf4` or `__fp4`),
    /// parsed and checked.
    fn bnb_state(&self, a: TensorRef, p: &str) -> Result<(TensorRef, State)> {
        let index = self.index();
        let prefix = format!("{p}.quant_state.bitsandbytes__");
        let found = ["nf4", "fp4"]
            .iter()
            .find_map(|k| index.get(&format!("{prefix}{k}")))
            .or_else(|| index.all().find(|(_, i)| i.name.starts_with(&prefix)));
        let Some((r, info)) = found else {
            return Err(self.fail.at(
                a,
                "its `quant_state.bitsandbytes__nf4` (or `__fp4`) is missing".into(),
            ));
        };
        let suffix = &info.name[prefix.len()..];
        if suffix != "nf4" && suffix != "fp4" {
            return Err(self.fail.at(
                r,
                format!(
                    "unknown bitsandbytes quant type `{}` (nf4 and fp4 are supported)",
                    sanitize(suffix)
                ),
            ));
        }
        self.check_dtype(r, "the quant state", &[Dtype::U8])?;
        if info.len > MAX_STATE {
            return Err(self.fail.at(
                r,
                format!(
                    "the quant state has {} bytes; at most {MAX_STATE} are read",
                    info.len
                ),
            ));
        }
        let mut scratch = Vec::new();
        let bytes = index.shards[r.shard].bytes(info, 0, info.len, &mut scratch)?;
        let json: Value = serde_json::from_slice(bytes)
            .map_err(|e| self.fail.at(r, format!("the quant state is not JSON: {e}")))?;
        let st = parse_state(&json).map_err(|why| self.fail.at(r, why))?;
        if st.fp4 != (suffix == "fp4") {
            return Err(self.fail.at(
                r,
                format!(
                    "the state's quant_type `{}` contradicts its name `bitsandbytes__{suffix}`",
                    if st.fp4 { "fp4" } else { "nf4" }
                ),
            ));
        }
        Ok((r, st))
    }

    /// One LLM.int8 weight `stem.weight`, found by its `SCB` (`s`).
    fn bnb_int8(&mut self, s: TensorRef, stem: &str) -> Result<()> {
        let index = self.index();
        if !flag(&self.decl.config, "load_in_8bit") {
            return Err(self.fail.at(
                s,
                "a bitsandbytes LLM.int8 scale, but config.json does not declare `load_in_8bit`"
                    .into(),
            ));
        }
        let name = format!("{stem}.weight");
        self.not_skipped(s, &name)?;
        let Some((w, info)) = index.get(&name) else {
            return Err(self
                .fail
                .at(s, format!("its weight `{}` is missing", sanitize(&name))));
        };
        self.check_dtype(w, "the weight", &[Dtype::I8])?;
        let [rows, cols] = info.shape[..] else {
            return Err(self.fail.at(
                w,
                format!("the weight has shape {:?}; expected [out, in]", info.shape),
            ));
        };
        self.check_dtype(s, "`SCB`", &[Dtype::F32])?;
        self.check_shape(s, "`SCB` has", &[rows], "one scale per row")?;
        let mut parts = vec![s];
        if let Some((f, fi)) = index.get(&format!("{stem}.weight_format")) {
            self.check_dtype(f, "`weight_format`", &[Dtype::U8])?;
            let mut scratch = Vec::new();
            let b = index.shards[f.shard].bytes(fi, 0, fi.len, &mut scratch)?;
            if b != [0] {
                return Err(self.fail.at(
                    f,
                    format!(
                        "`weight_format` is {b:?}; only 0 (row-major) is supported (1–3 are GPU tile layouts)"
                    ),
                ));
            }
            parts.push(f);
        }
        let compute = self.decl.torch_dtype.unwrap_or(Dtype::F16);
        self.add(Weight {
            name,
            main: w,
            shape: vec![rows, cols],
            kernel: Kernel::Bitsandbytes(Bnb::Int8(BnbInt8 {
                weight: w,
                scb: s,
                cols,
            })),
            parts: &parts,
            compute,
        })
    }

    /// Refuses a quantized weight `name` (whose component `r` was found) in a module
    /// that `llm_int8_skip_modules` keeps unquantized.
    fn not_skipped(&self, r: TensorRef, name: &str) -> Result<()> {
        let skip = self
            .decl
            .config
            .get("llm_int8_skip_modules")
            .and_then(Value::as_array);
        let dotted = format!(".{name}.");
        let hit = skip
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .find(|m| !m.is_empty() && dotted.contains(&format!(".{m}.")));
        match hit {
            Some(m) => Err(self.fail.at(
                r,
                format!(
                    "a quantized weight in module `{}`, which config.json's `llm_int8_skip_modules` keeps unquantized",
                    sanitize(m)
                ),
            )),
            None => Ok(()),
        }
    }
}

/// A boolean of the config (false when absent).
fn flag(c: &Value, key: &str) -> bool {
    c.get(key).and_then(Value::as_bool) == Some(true)
}

/// A quant state's keys (`QuantState.as_dict`): `quant_type`, `blocksize`, `shape`,
/// `dtype`, and with double quantization `nested_blocksize` and `nested_offset`.
fn parse_state(j: &Value) -> std::result::Result<State, String> {
    if !j.is_object() {
        return Err("the quant state is not a JSON object".into());
    }
    let key = |k: &str| {
        j.get(k)
            .ok_or_else(|| format!("the quant state lacks `{k}`"))
    };
    let fp4 = match key("quant_type")?.as_str() {
        Some("fp4") => true,
        Some("nf4") => false,
        _ => {
            return Err(format!(
                "unknown bitsandbytes quant_type {} (nf4 and fp4 are supported)",
                sanitize(&key("quant_type")?.to_string())
            ))
        }
    };
    let positive = |k: &str| -> std::result::Result<u64, String> {
        key(k)?.as_u64().filter(|&b| b > 0).ok_or_else(|| {
            format!(
                "the state's `{k}` is {}; expected a positive integer",
                key(k).map(|v| sanitize(&v.to_string())).unwrap_or_default()
            )
        })
    };
    let blocksize = positive("blocksize")?;
    let shape = key("shape")?
        .as_array()
        .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<u64>>>())
        .ok_or_else(|| "the state's `shape` is not a list of sizes".to_string())?;
    let nested = match j.get("nested_blocksize").or_else(|| j.get("nested_offset")) {
        None => None,
        Some(_) => {
            let nb = positive("nested_blocksize")?;
            let off = key("nested_offset")?
                .as_f64()
                .map(|v| v as f32)
                .filter(|v| v.is_finite())
                .ok_or_else(|| "the state's `nested_offset` is not a finite number".to_string())?;
            Some((nb, off))
        }
    };
    let dtype = j
        .get("dtype")
        .and_then(Value::as_str)
        .and_then(|d| Dtype::from_torch(&format!("torch.{d}")))
        .filter(|d| d.is_castable_float());
    Ok(State {
        fp4,
        blocksize,
        shape,
        nested,
        dtype,
    })
}
