//! Where a pre-quantized checkpoint declares its scheme: `config.json`'s
//! `quantization_config` (or `compression_config`), ModelOpt's `hf_quant_config.json`,
//! or an older GPTQ repository's `quantize_config.json`; and reading parameters from
//! them.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::dtype::Dtype;
use crate::error::{Error, Result};

/// Where the scheme was declared, for errors.
pub(super) struct Declared {
    /// The file that declares it.
    pub(super) path: PathBuf,
    /// `quant_method`, lowercase.
    pub(super) method: String,
    /// The quantization config object.
    pub(super) config: Value,
    /// `config.json`'s `torch_dtype` (or `dtype`), when it is a float the cast takes.
    pub(super) torch_dtype: Option<Dtype>,
}

/// Reads `config.json`'s `quantization_config` (or `compression_config`), ModelOpt's
/// `hf_quant_config.json` and an older GPTQ repository's `quantize_config.json` in
/// `dir`, in that order.
pub(super) fn declared(dir: &Path) -> Result<Option<Declared>> {
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
            // vLLM reads `modelopt_fp4` and the like as ModelOpt.
            Some(m) if m.to_ascii_lowercase().starts_with("modelopt") => "modelopt".into(),
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
        let mut config = q.clone();
        if method == "modelopt" {
            // What `config.json` does not say (older exports keep MIXED_PRECISION's
            // `quantized_layers` only there), ModelOpt's side file may.
            let side = read(&dir.join("hf_quant_config.json"))?;
            let side = side.as_ref().and_then(|s| s.get("quantization"));
            if let (Some(obj), Some(side)) = (config.as_object_mut(), side) {
                obj.entry("quantization").or_insert_with(|| side.clone());
            }
        }
        return Ok(Some(Declared {
            path: config_path,
            method,
            config,
            torch_dtype,
        }));
    }
    // ModelOpt's side file: `{"producer": ..., "quantization": {"quant_algo": ...}}`.
    let mo_path = dir.join("hf_quant_config.json");
    if let Some(q) = read(&mo_path)?.filter(|q| q.get("quantization").is_some()) {
        return Ok(Some(Declared {
            path: mo_path,
            method: "modelopt".into(),
            config: q,
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

/// Parameters from a JSON config.
pub(super) fn uint(c: &Value, key: &str) -> Option<i64> {
    c.get(key).and_then(Value::as_i64)
}
