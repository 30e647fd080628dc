//! `metadata.json` as the seed's loaders expect it, per family.

use serde_json::{json, Map, Value};

use super::{ModelFiles, ModelType, Part, Recipe};

/// ISO 8601 UTC time (`2026-11-26T10:49:58Z`) of a Unix timestamp.
pub fn iso8601_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// What the metadata is built from.
#[derive(Debug, Clone)]
pub struct MetadataInput<'a> {
    /// The name the user gave (hub id or path).
    pub model_name: &'a str,
    /// The recipe.
    pub recipe: &'a Recipe,
    /// The model's description files.
    pub files: &'a ModelFiles,
    /// `(name, shape, torch dtype, num_params)` of every output tensor, in row order.
    pub tensors: Vec<(&'a str, &'a [u64], &'a str, u64)>,
    /// The conversion options.
    pub conversion_config: Value,
    /// Where the weights are.
    pub parquet_path: String,
    /// Where the tokenizer files are, if any were copied.
    pub tokenizer_path: Option<String>,
    /// Per-tensor cast counts that matter (overflow, NaN, inf).
    pub cast_report: Value,
    /// Seconds since the Unix epoch at conversion.
    pub converted_at: u64,
    /// Output tensors stored twice because the source shares one storage between them
    /// (a PyTorch checkpoint's tied weights): `(name, tied to)`.
    pub ties: Vec<(String, String)>,
}

fn get(v: Option<&Value>, k: &str) -> Value {
    v.and_then(|v| v.get(k)).cloned().unwrap_or(Value::Null)
}

fn or(v: Value, default: Value) -> Value {
    if v.is_null() {
        default
    } else {
        v
    }
}

/// The generic `model_info` (bert / transformers / sentence-transformers / causallm).
pub fn model_info(recipe: &Recipe, files: &ModelFiles) -> Value {
    let c = files.config.as_ref();
    let st = recipe.model_type == ModelType::SentenceTransformers;
    let arch = if st {
        json!("SentenceTransformer")
    } else {
        c.and_then(|c| c.get("architectures"))
            .and_then(|a| a.get(0))
            .cloned()
            .unwrap_or(Value::Null)
    };
    let hidden = get(c, "hidden_size");
    let heads = get(c, "num_attention_heads");
    let rope = or(
        get(c, "rope_theta"),
        get(c.and_then(|c| c.get("rope_parameters")), "rope_theta"),
    );
    let kv = if recipe.model_type == ModelType::CausalLm {
        or(get(c, "num_key_value_heads"), heads.clone())
    } else {
        get(c, "num_key_value_heads")
    };
    let mut info = Map::new();
    info.insert("architecture".into(), arch);
    info.insert("embedding_dimension".into(), hidden.clone());
    info.insert("hidden_size".into(), hidden);
    info.insert("num_attention_heads".into(), heads);
    info.insert("num_key_value_heads".into(), kv);
    info.insert("intermediate_size".into(), get(c, "intermediate_size"));
    info.insert("num_hidden_layers".into(), get(c, "num_hidden_layers"));
    info.insert("vocab_size".into(), get(c, "vocab_size"));
    info.insert(
        "max_position_embeddings".into(),
        get(c, "max_position_embeddings"),
    );
    info.insert("layer_norm_eps".into(), get(c, "layer_norm_eps"));
    info.insert("rms_norm_eps".into(), get(c, "rms_norm_eps"));
    info.insert("rope_theta".into(), rope);
    if st {
        let pool = files.st_pooling.as_ref();
        let dim = get(pool, "word_embedding_dimension");
        if !dim.is_null() {
            info.insert("embedding_dimension".into(), dim);
        }
        info.insert(
            "max_seq_length".into(),
            get(files.st_config.as_ref(), "max_seq_length"),
        );
        let mode = pool.and_then(|p| {
            if let Some(m) = p.get("pooling_mode").and_then(Value::as_str) {
                return Some(m.to_string());
            }
            [
                ("pooling_mode_cls_token", "cls"),
                ("pooling_mode_mean_tokens", "mean"),
                ("pooling_mode_max_tokens", "max"),
                ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens"),
                ("pooling_mode_weightedmean_tokens", "weightedmean"),
                ("pooling_mode_lasttoken", "lasttoken"),
            ]
            .iter()
            .find(|(k, _)| p.get(*k).and_then(Value::as_bool) == Some(true))
            .map(|(_, m)| m.to_string())
        });
        info.insert(
            "pooling_mode".into(),
            mode.map(Value::from).unwrap_or(Value::Null),
        );
        let normalize = files
            .st_modules
            .as_ref()
            .and_then(Value::as_array)
            .is_some_and(|m| {
                m.iter().any(|m| {
                    m.get("type")
                        .and_then(Value::as_str)
                        .is_some_and(|t| t.ends_with("Normalize"))
                })
            });
        info.insert("normalize_embeddings".into(), Value::Bool(normalize));
    }
    if recipe.model_type == ModelType::CausalLm {
        info.insert(
            "tie_word_embeddings".into(),
            or(get(c, "tie_word_embeddings"), json!(false)),
        );
    }
    Value::Object(info)
}

fn clip_config(c: Option<&Value>, part: Part) -> Value {
    let top_proj = get(c, "projection_dim");
    let v = c.and_then(|c| c.get("vision_config"));
    let t = c.and_then(|c| c.get("text_config"));
    let vision = json!({
        "image_size": or(get(v, "image_size"), json!(224)),
        "patch_size": or(get(v, "patch_size"), json!(32)),
        "hidden_size": or(get(v, "hidden_size"), json!(768)),
        "num_layers": or(get(v, "num_hidden_layers"), json!(12)),
        "num_attention_heads": or(get(v, "num_attention_heads"), json!(12)),
        "intermediate_size": or(get(v, "intermediate_size"), json!(3072)),
        "layer_norm_eps": or(get(v, "layer_norm_eps"), json!(1e-5)),
        "projection_dim": or(top_proj.clone(), or(get(v, "projection_dim"), json!(512))),
    });
    let text = json!({
        "vocab_size": or(get(t, "vocab_size"), json!(49408)),
        "max_position_embeddings": or(get(t, "max_position_embeddings"), json!(77)),
        "hidden_size": or(get(t, "hidden_size"), json!(512)),
        "num_layers": or(get(t, "num_hidden_layers"), json!(12)),
        "num_attention_heads": or(get(t, "num_attention_heads"), json!(8)),
        "intermediate_size": or(get(t, "intermediate_size"), json!(2048)),
        "layer_norm_eps": or(get(t, "layer_norm_eps"), json!(1e-5)),
        "projection_dim": or(top_proj, or(get(t, "projection_dim"), json!(512))),
    });
    match part {
        Part::Text => text,
        Part::All => {
            let mut m = vision;
            m["text_config"] = text;
            m
        }
        _ => vision,
    }
}

fn whisper_config(c: Option<&Value>, part: Part) -> Value {
    let d_model = or(get(c, "d_model"), json!(384));
    let encoder = json!({
        "n_mels": or(get(c, "num_mel_bins"), json!(80)),
        "hidden_size": d_model,
        "num_layers": or(get(c, "encoder_layers"), json!(4)),
        "num_attention_heads": or(get(c, "encoder_attention_heads"), json!(6)),
        "intermediate_size": or(get(c, "encoder_ffn_dim"), json!(1536)),
        "layer_norm_eps": 1e-5,
        "max_positions": or(get(c, "max_source_positions"), json!(1500)),
    });
    let decoder = json!({
        "vocab_size": or(get(c, "vocab_size"), json!(51865)),
        "hidden_size": d_model,
        "num_layers": or(get(c, "decoder_layers"), json!(4)),
        "num_attention_heads": or(get(c, "decoder_attention_heads"), json!(6)),
        "intermediate_size": or(get(c, "decoder_ffn_dim"), json!(1536)),
        "layer_norm_eps": 1e-5,
        "max_positions": or(get(c, "max_target_positions"), json!(448)),
    });
    match part {
        Part::Decoder => decoder,
        Part::All => {
            let mut m = encoder;
            m["decoder_config"] = decoder;
            m
        }
        _ => encoder,
    }
}

/// Builds `metadata.json` for the recipe's family.
pub fn build(m: &MetadataInput) -> Value {
    let total: u64 = m.tensors.iter().map(|t| t.3).sum();
    let mut layer_info = Map::new();
    for (name, shape, dtype, n) in &m.tensors {
        layer_info.insert(
            name.to_string(),
            json!({"shape": shape, "dtype": dtype, "num_params": n}),
        );
    }
    let c = m.files.config.as_ref();
    let version = env!("CARGO_PKG_VERSION");
    let converted_at = iso8601_utc(m.converted_at);
    let mut out = match m.recipe.model_type {
        ModelType::Clip => {
            let (ty, arch) = match m.recipe.part {
                Part::Text => ("CLIP Text Transformer", "Transformer"),
                Part::All => ("CLIP", "ViT"),
                _ => ("CLIP Vision Transformer", "ViT"),
            };
            json!({
                "model_name": m.model_name,
                "model_type": ty,
                "architecture": arch,
                "config": clip_config(c, m.recipe.part),
                "total_parameters": total,
                "num_weight_tensors": m.tensors.len(),
                "layer_info": layer_info,
                "converted_at": converted_at,
                "converter_version": version,
            })
        }
        ModelType::Whisper => {
            let ty = match m.recipe.part {
                Part::Decoder => "Whisper Text Decoder",
                Part::All => "Whisper",
                _ => "Whisper Audio Encoder",
            };
            json!({
                "model_name": m.model_name,
                "model_type": ty,
                "architecture": "Whisper",
                "config": whisper_config(c, m.recipe.part),
                "total_parameters": total,
                "num_weight_tensors": m.tensors.len(),
                "layer_info": layer_info,
                "converted_at": converted_at,
                "converter_version": version,
            })
        }
        _ => json!({
            "model_name": m.model_name,
            "model_type": m.recipe.model_type.as_str(),
            "model_info": model_info(m.recipe, m.files),
            "conversion_config": m.conversion_config,
            "total_parameters": total,
            "num_layers": m.tensors.len(),
            "layer_info": layer_info,
            "converted_at": converted_at,
            "converter_version": version,
        }),
    };
    if let Value::Object(o) = &mut out {
        o.entry("conversion_config")
            .or_insert_with(|| m.conversion_config.clone());
        o.insert("part".into(), json!(m.recipe.part.as_str()));
        o.insert("parquet_path".into(), json!(m.parquet_path));
        o.insert("tokenizer_path".into(), json!(m.tokenizer_path));
        let mut tied = Map::new();
        if m.recipe.tied_head {
            tied.insert("lm_head.weight".into(), json!("model.embed_tokens.weight"));
        }
        for (name, to) in &m.ties {
            tied.insert(name.clone(), json!(to));
        }
        if !tied.is_empty() {
            o.insert("tied_weights".into(), Value::Object(tied));
        }
        if m.cast_report.as_object().is_some_and(|r| !r.is_empty()) {
            o.insert("cast_report".into(), m.cast_report.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_dates() {
        assert_eq!(iso8601_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(iso8601_utc(1_795_690_198), "2026-11-26T10:49:58Z");
    }
}
