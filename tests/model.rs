//! Model knowledge: each family's tensor set and names (written from the rules, not
//! derived from the code), metadata.json, detection, hub ids, filters, dry run.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use modelconv::{
    convert, plan_conversion, ConvertConfig, Error, Filters, ModelType, Part, WeightFile,
};

/// `{prefix}.{name}` for each name.
fn under(prefix: &str, names: &[&str]) -> Vec<String> {
    names.iter().map(|n| format!("{prefix}.{n}")).collect()
}

/// `{prefix}.{module}.weight` and `.bias` for each module.
fn weight_and_bias(prefix: &str, modules: &[&str]) -> Vec<String> {
    modules
        .iter()
        .flat_map(|m| ["weight", "bias"].map(|p| format!("{prefix}.{m}.{p}")))
        .collect()
}

fn clip_tower(prefix: &str, layers: usize) -> Vec<String> {
    (0..layers)
        .flat_map(|l| {
            weight_and_bias(
                &format!("{prefix}.encoder.layers.{l}"),
                &[
                    "layer_norm1",
                    "layer_norm2",
                    "mlp.fc1",
                    "mlp.fc2",
                    "self_attn.k_proj",
                    "self_attn.q_proj",
                    "self_attn.v_proj",
                    "self_attn.out_proj",
                ],
            )
        })
        .collect()
}

/// A CLIP tower's own tensors, its layers and its projection, sorted.
fn clip(tower: &str, own: &[&str], projection: &str, layers: usize) -> Vec<String> {
    let mut v = under(tower, own);
    v.extend(clip_tower(tower, layers));
    v.push(projection.into());
    v.sort();
    v
}

fn clip_vision(layers: usize) -> Vec<String> {
    clip(
        "vision_model",
        &[
            "embeddings.class_embedding",
            "embeddings.patch_embedding.weight",
            "embeddings.position_embedding.weight",
            "pre_layrnorm.weight",
            "pre_layrnorm.bias",
            "post_layernorm.weight",
            "post_layernorm.bias",
        ],
        "visual_projection.weight",
        layers,
    )
}

fn clip_text(layers: usize) -> Vec<String> {
    clip(
        "text_model",
        &[
            "embeddings.position_embedding.weight",
            "embeddings.token_embedding.weight",
            "final_layer_norm.weight",
            "final_layer_norm.bias",
        ],
        "text_projection.weight",
        layers,
    )
}

fn whisper_layer(prefix: &str, l: usize, cross: bool) -> Vec<String> {
    let layer = format!("{prefix}.layers.{l}");
    let mut v = vec![format!("{layer}.self_attn.k_proj.weight")];
    let mut attn = vec!["self_attn"];
    if cross {
        attn.push("encoder_attn");
        v.push(format!("{layer}.encoder_attn.k_proj.weight"));
    }
    for a in attn {
        v.extend(weight_and_bias(
            &format!("{layer}.{a}"),
            &["q_proj", "v_proj", "out_proj"],
        ));
        v.extend(weight_and_bias(&layer, &[&format!("{a}_layer_norm")]));
    }
    v.extend(weight_and_bias(&layer, &["fc1", "fc2", "final_layer_norm"]));
    v
}

/// A Whisper stack (`encoder` or `decoder`, the one with cross-attention): its own
/// tensors, the renamed position embedding and its layers, sorted.
fn whisper_stack(stack: &str, mut v: Vec<String>, layers: usize) -> Vec<String> {
    v.push(format!("{stack}.position_embedding"));
    for l in 0..layers {
        v.extend(whisper_layer(stack, l, stack == "decoder"));
    }
    v.sort();
    v
}

/// Whisper encoder under the seed's rules: `model.` dropped, embed_positions renamed.
fn whisper_encoder(layers: usize) -> Vec<String> {
    let own = weight_and_bias("encoder", &["conv1", "conv2", "layer_norm"]);
    whisper_stack("encoder", own, layers)
}

fn whisper_decoder(layers: usize) -> Vec<String> {
    let own = under(
        "decoder",
        &[
            "embed_tokens.weight",
            "layer_norm.weight",
            "layer_norm.bias",
        ],
    );
    whisper_stack("decoder", own, layers)
}

fn bert(layers: usize) -> Vec<String> {
    let mut v = under(
        "embeddings",
        &[
            "LayerNorm.weight",
            "LayerNorm.bias",
            "position_embeddings.weight",
            "token_type_embeddings.weight",
            "word_embeddings.weight",
        ],
    );
    for l in 0..layers {
        v.extend(weight_and_bias(
            &format!("encoder.layer.{l}"),
            &[
                "attention.output.LayerNorm",
                "attention.output.dense",
                "attention.self.key",
                "attention.self.query",
                "attention.self.value",
                "intermediate.dense",
                "output.LayerNorm",
                "output.dense",
            ],
        ));
    }
    v.extend(weight_and_bias("pooler", &["dense"]));
    v.sort();
    v
}

fn names(out: &Path) -> Vec<String> {
    let mut v: Vec<String> = WeightFile::open(out)
        .unwrap()
        .tensors()
        .iter()
        .map(|t| t.name.clone())
        .collect();
    v.sort();
    v
}

fn cfg() -> ConvertConfig {
    ConvertConfig::default()
}

#[test]
fn clip_parts() {
    let tmp = tempdir();
    let o = tmp.path().join("v");
    convert(fixture("tiny-clip"), &o, &cfg()).unwrap();
    assert_eq!(names(&o), clip_vision(2));
    let m = metadata(&o);
    assert_eq!(m["model_type"], "CLIP Vision Transformer");
    assert_eq!(m["architecture"], "ViT");
    assert_eq!(
        m["config"],
        serde_json::json!({"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 2, "num_attention_heads": 4,
                           "intermediate_size": 64, "layer_norm_eps": 1e-5, "projection_dim": 16})
    );
    assert_eq!(m["num_weight_tensors"], 40);
    let total: u64 = m["layer_info"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v["num_params"].as_u64().unwrap())
        .sum();
    assert_eq!(m["total_parameters"], total);
    for k in [
        "layer_info",
        "converted_at",
        "converter_version",
        "model_name",
    ] {
        assert!(m.get(k).is_some(), "{k}");
    }
    // Values are untouched by the recipe: the stored tensors equal the source's cast.
    let src = read_source(&fixture("tiny-clip"));
    let map: Vec<(String, String)> = clip_vision(2).into_iter().map(|n| (n.clone(), n)).collect();
    assert_matches_source(&o, &src, &map, "f16");

    let o = tmp.path().join("t");
    convert(
        fixture("tiny-clip"),
        &o,
        &ConvertConfig::builder().part(Part::Text).build().unwrap(),
    )
    .unwrap();
    assert_eq!(names(&o), clip_text(2));
    let m = metadata(&o);
    assert_eq!(m["model_type"], "CLIP Text Transformer");
    assert_eq!(m["config"]["hidden_size"], 32);
    assert_eq!(m["config"]["vocab_size"], 512);
    assert_eq!(m["config"]["max_position_embeddings"], 32);

    let o = tmp.path().join("a");
    convert(
        fixture("tiny-clip"),
        &o,
        &ConvertConfig::builder().part(Part::All).build().unwrap(),
    )
    .unwrap();
    let mut all = clip_vision(2);
    all.extend(clip_text(2));
    all.push("logit_scale".into());
    all.sort();
    assert_eq!(names(&o), all);

    let err = convert(
        fixture("tiny-clip"),
        tmp.path().join("x"),
        &ConvertConfig::builder()
            .part(Part::Encoder)
            .build()
            .unwrap(),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "--part encoder does not exist for clip (choose vision, text or all)"
    );
}

#[test]
fn whisper_parts() {
    let tmp = tempdir();
    let o = tmp.path().join("e");
    convert(fixture("tiny-whisper"), &o, &cfg()).unwrap();
    assert_eq!(names(&o), whisper_encoder(2));
    let m = metadata(&o);
    assert_eq!(m["model_type"], "Whisper Audio Encoder");
    assert_eq!(m["architecture"], "Whisper");
    assert_eq!(
        m["config"],
        serde_json::json!({"n_mels": 16, "hidden_size": 32, "num_layers": 2, "num_attention_heads": 4,
                           "intermediate_size": 64, "layer_norm_eps": 1e-5, "max_positions": 30})
    );
    // The renamed tensor holds the source's embed_positions.
    let src = read_source(&fixture("tiny-whisper"));
    let wf = WeightFile::open(&o).unwrap();
    let t = wf.tensor("encoder.position_embedding").unwrap();
    assert!(t.data == expected(&src["model.encoder.embed_positions.weight"], "f16").0);

    let o = tmp.path().join("d");
    convert(
        fixture("tiny-whisper"),
        &o,
        &ConvertConfig::builder()
            .part(Part::Decoder)
            .build()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(names(&o), whisper_decoder(2));
    assert_eq!(metadata(&o)["config"]["max_positions"], 32);

    let o = tmp.path().join("a");
    convert(
        fixture("tiny-whisper"),
        &o,
        &ConvertConfig::builder().part(Part::All).build().unwrap(),
    )
    .unwrap();
    let mut all = whisper_encoder(2);
    all.extend(whisper_decoder(2));
    all.sort();
    assert_eq!(names(&o), all);
    assert_eq!(names(&o).len(), src.len());
}

#[test]
fn bert_and_sentence_transformers() {
    let tmp = tempdir();
    let o = tmp.path().join("b");
    let r = convert(fixture("tiny-bert"), &o, &cfg()).unwrap();
    assert_eq!(names(&o), bert(2));
    let m = metadata(&o);
    assert_eq!(m["model_type"], "bert");
    let info = &m["model_info"];
    assert_eq!(info["architecture"], "BertModel");
    assert_eq!(info["hidden_size"], 32);
    assert_eq!(info["embedding_dimension"], 32);
    assert_eq!(info["num_attention_heads"], 4);
    assert_eq!(info["intermediate_size"], 64);
    assert_eq!(info["num_hidden_layers"], 2);
    assert_eq!(info["vocab_size"], 512);
    assert_eq!(info["max_position_embeddings"], 64);
    assert_eq!(info["layer_norm_eps"], 1e-12);
    for k in ["num_key_value_heads", "rms_norm_eps", "rope_theta"] {
        assert!(info[k].is_null(), "{k} is not in a BERT config");
    }
    for k in [
        "model_name",
        "model_type",
        "model_info",
        "conversion_config",
        "total_parameters",
        "num_layers",
        "layer_info",
        "converted_at",
        "converter_version",
        "parquet_path",
        "tokenizer_path",
    ] {
        assert!(m.get(k).is_some(), "{k}");
    }
    assert_eq!(m["num_layers"], 39);
    assert_eq!(m["total_parameters"], r.total_parameters);
    assert_eq!(m["conversion_config"]["use_float16"], true);
    assert_eq!(m["conversion_config"]["compression"], "zstd");
    assert_eq!(m["conversion_config"]["compression_level"], 3);

    let o = tmp.path().join("st");
    convert(fixture("tiny-sentence-transformer"), &o, &cfg()).unwrap();
    assert_eq!(names(&o), bert(2));
    let m = metadata(&o);
    assert_eq!(m["model_type"], "sentence-transformers");
    assert_eq!(m["model_info"]["architecture"], "SentenceTransformer");
    assert_eq!(m["model_info"]["max_seq_length"], 64);
    assert_eq!(m["model_info"]["embedding_dimension"], 32);
    assert_eq!(m["model_info"]["pooling_mode"], "mean");
    assert_eq!(m["model_info"]["normalize_embeddings"], true);
    for f in [
        "modules.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
    ] {
        assert_eq!(
            std::fs::read(o.join(f)).unwrap(),
            std::fs::read(fixture("tiny-sentence-transformer").join(f)).unwrap(),
            "{f}"
        );
    }

    // The trained MiniLM: 384-d mean pooling, max_seq_length 256.
    let o = tmp.path().join("minilm");
    convert(minilm(), &o, &cfg()).unwrap();
    let m = metadata(&o);
    assert_eq!(m["model_type"], "sentence-transformers");
    assert_eq!(m["model_info"]["embedding_dimension"], 384);
    assert_eq!(m["model_info"]["max_seq_length"], 256);
    assert_eq!(m["model_info"]["num_hidden_layers"], 6);
}

#[test]
fn bert_task_heads_and_prefix_are_dropped() {
    // A BertForMaskedLM-style checkpoint: `bert.` prefix and `cls.*` heads.
    let tmp = tempdir();
    let dir = tmp.path().join("mlm");
    std::fs::create_dir_all(&dir).unwrap();
    let src = read_source(&fixture("tiny-bert"));
    let mut tensors: Vec<(String, String, Vec<u64>, Vec<u8>)> = src
        .iter()
        .filter(|(n, _)| !n.starts_with("pooler"))
        .map(|(n, s)| {
            (
                format!("bert.{n}"),
                "F32".to_string(),
                s.shape.iter().map(|&d| d as u64).collect(),
                s.data.clone(),
            )
        })
        .collect();
    tensors.push((
        "cls.predictions.bias".into(),
        "F32".into(),
        vec![512],
        vec![0; 2048],
    ));
    tensors.push((
        "cls.predictions.transform.dense.weight".into(),
        "F32".into(),
        vec![32, 32],
        vec![0; 4096],
    ));
    let refs: Vec<(&str, &str, Vec<u64>, Vec<u8>)> = tensors
        .iter()
        .map(|t| (t.0.as_str(), t.1.as_str(), t.2.clone(), t.3.clone()))
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &refs);
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type":"bert","architectures":["BertForMaskedLM"],"hidden_size":32}"#,
    )
    .unwrap();
    let o = tmp.path().join("o");
    convert(&dir, &o, &cfg()).unwrap();
    let want: Vec<String> = bert(2)
        .into_iter()
        .filter(|n| !n.starts_with("pooler"))
        .collect();
    assert_eq!(names(&o), want);
    let plan = plan_conversion(&dir, &cfg()).unwrap();
    assert_eq!(plan.dropped.len(), 2);
    assert!(plan.dropped.iter().all(|(n, rule)| n.starts_with("cls.")
        && rule == "task head: not part of the base model `bert.*`"));
    assert_eq!(plan.renamed.len(), want.len());
}

fn llama_copy(tmp: &Path) -> PathBuf {
    copy_dir(&fixture("tiny-llama-sharded-bf16"), &tmp.join("llama"))
}

#[test]
fn causal_lm_keeps_everything_and_reports_tied_embeddings() {
    let tmp = tempdir();
    let o = tmp.path().join("o");
    let r = convert(fixture("tiny-llama-sharded-bf16"), &o, &cfg()).unwrap();
    assert_eq!(r.tensors, 39);
    assert!(names(&o).contains(&"lm_head.weight".to_string()));
    let m = metadata(&o);
    assert_eq!(m["model_type"], "causallm");
    let info = &m["model_info"];
    assert_eq!(info["architecture"], "LlamaForCausalLM");
    assert_eq!(info["num_key_value_heads"], 2);
    assert_eq!(info["rms_norm_eps"], 1e-6);
    assert_eq!(info["rope_theta"], 10000.0);
    assert_eq!(info["tie_word_embeddings"], false);
    assert!(m.get("tied_weights").is_none());

    // Tied: no lm_head.weight stored, tie_word_embeddings true.
    let dir = llama_copy(tmp.path());
    std::fs::remove_file(dir.join("model-00005-of-00005.safetensors")).unwrap();
    let idx = dir.join("model.safetensors.index.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&idx).unwrap()).unwrap();
    v["weight_map"]
        .as_object_mut()
        .unwrap()
        .remove("lm_head.weight");
    std::fs::write(&idx, v.to_string()).unwrap();
    let cfg_path = dir.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    c["tie_word_embeddings"] = true.into();
    std::fs::write(&cfg_path, c.to_string()).unwrap();
    let o = tmp.path().join("tied");
    let r = convert(&dir, &o, &cfg()).unwrap();
    assert_eq!(r.tensors, 38);
    assert_eq!(r.notices, vec!["lm_head.weight is tied to model.embed_tokens.weight (tie_word_embeddings) and not stored".to_string()]);
    let m = metadata(&o);
    assert_eq!(m["model_info"]["tie_word_embeddings"], true);
    assert_eq!(
        m["tied_weights"]["lm_head.weight"],
        "model.embed_tokens.weight"
    );
}

#[test]
fn detection_of_every_type() {
    let tmp = tempdir();
    let cases = [
        ("tiny-bert", "bert"),
        ("tiny-sentence-transformer", "sentence-transformers"),
        ("tiny-clip", "clip"),
        ("tiny-whisper", "whisper"),
        ("tiny-llama-sharded-bf16", "causallm"),
    ];
    for (f, want) in cases {
        let p = plan_conversion(fixture(f), &cfg()).unwrap();
        assert_eq!(p.model_type, want, "{f}");
        assert!(
            p.detected_by.starts_with("config.json model_type"),
            "{f}: {}",
            p.detected_by
        );
    }
    // Every explicit value on a checkpoint it fits.
    let explicit = [
        ("tiny-bert", ModelType::Bert, 39),
        (
            "tiny-sentence-transformer",
            ModelType::SentenceTransformers,
            39,
        ),
        ("tiny-bert", ModelType::Transformers, 39),
        ("tiny-clip", ModelType::Clip, 40),
        ("tiny-whisper", ModelType::Whisper, 37),
        ("tiny-llama-sharded-bf16", ModelType::CausalLm, 39),
        ("tiny-whisper", ModelType::CausalLm, 89),
    ];
    for (f, t, n) in explicit {
        let p = plan_conversion(
            fixture(f),
            &ConvertConfig::builder().model_type(t).build().unwrap(),
        )
        .unwrap();
        assert_eq!(p.model_type, t.as_str());
        assert_eq!(p.kept.len(), n, "{f} as {}", t.as_str());
        assert_eq!(p.detected_by, "--model-type");
    }
    // A contradiction names what was found.
    let err = plan_conversion(
        fixture("tiny-whisper"),
        &ConvertConfig::builder()
            .model_type(ModelType::Clip)
            .build()
            .unwrap(),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: --model-type clip contradicts the checkpoint: config.json has model_type `whisper` (WhisperForConditionalGeneration), a whisper model",
            fixture("tiny-whisper/config.json").display()
        )
    );
    let err = plan_conversion(
        fixture("tiny-clip"),
        &ConvertConfig::builder()
            .model_type(ModelType::Bert)
            .build()
            .unwrap(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::ModelConfig { .. }), "{err}");

    // An unknown architecture keeps every tensor, with a notice.
    let dir = tmp.path().join("mystery");
    std::fs::create_dir_all(&dir).unwrap();
    write_safetensors(
        &dir.join("model.safetensors"),
        &[
            ("a.weight", "F32", vec![2], vec![0; 8]),
            ("head.weight", "F32", vec![1], vec![0; 4]),
        ],
    );
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type":"mystery","architectures":["MysteryModel"]}"#,
    )
    .unwrap();
    let p = plan_conversion(&dir, &cfg()).unwrap();
    assert_eq!(p.model_type, "transformers");
    assert_eq!(p.kept.len(), 2);
    assert_eq!(p.notices, vec!["unknown architecture `MysteryModel`: converting every tensor as `transformers` (pass --model-type to choose)".to_string()]);

    // No config: the tensor names decide; nothing to go on is an error asking for --model-type.
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let err = plan_conversion(&dir, &cfg()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{}: no config.json, and neither the name nor the tensor names tell the model type; pass --model-type", dir.join("config.json").display())
    );
    let noconf = tmp.path().join("noconf-whisper");
    std::fs::create_dir_all(&noconf).unwrap();
    std::fs::copy(
        fixture("tiny-whisper/model.safetensors"),
        noconf.join("model.safetensors"),
    )
    .unwrap();
    assert_eq!(
        plan_conversion(&noconf, &cfg()).unwrap().model_type,
        "whisper"
    );
    // A malformed config.json is a clear error.
    std::fs::write(noconf.join("config.json"), "{not json").unwrap();
    let err = plan_conversion(&noconf, &cfg()).unwrap_err();
    assert!(
        err.to_string().starts_with(&format!(
            "{}: not valid JSON",
            noconf.join("config.json").display()
        )),
        "{err}"
    );
}

#[test]
fn filters_apply_after_the_recipe() {
    let f = |inc: &[&str], exc: &[&str], ren: &[(&str, &str)]| Filters {
        include: inc.iter().map(|s| s.to_string()).collect(),
        exclude: exc.iter().map(|s| s.to_string()).collect(),
        rename: ren
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
    };
    let llama = fixture("tiny-llama-sharded-bf16");
    let p = plan_conversion(
        &llama,
        &ConvertConfig::builder()
            .filters(f(&[], &["lm_head.*"], &[]))
            .build()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(p.kept.len(), 38);
    assert_eq!(
        p.dropped,
        vec![(
            "lm_head.weight".to_string(),
            "--exclude lm_head.*".to_string()
        )]
    );
    let p = plan_conversion(
        &llama,
        &ConvertConfig::builder()
            .filters(f(
                &["model.layers.0.*"],
                &[],
                &[(r"^model\.layers\.(\d+)\.", "blk.$1.")],
            ))
            .build()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(p.kept.len(), 9);
    assert!(p.kept.iter().all(|k| k.name.starts_with("blk.0.")));
    assert_eq!(
        p.kept[0]
            .source_name
            .as_deref()
            .map(|s| s.starts_with("model.layers.0.")),
        Some(true)
    );
    // Whisper: filters see the recipe's names.
    let p = plan_conversion(
        fixture("tiny-whisper"),
        &ConvertConfig::builder()
            .filters(f(&["encoder.position_embedding"], &[], &[]))
            .build()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(p.kept.len(), 1);
    // Typos are errors.
    let err = plan_conversion(
        &llama,
        &ConvertConfig::builder()
            .filters(f(&[], &["lm_haed.*"], &[]))
            .build()
            .unwrap(),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "--exclude `lm_haed.*` matches no tensor the recipe keeps"
    );
    // Two names renamed onto one are refused.
    let err = plan_conversion(
        &llama,
        &ConvertConfig::builder()
            .filters(f(&[], &[], &[(r"^model\.layers\.\d+\.", "")]))
            .build()
            .unwrap(),
    )
    .map(|p| p.kept.len())
    .unwrap_err();
    assert!(matches!(err, Error::DuplicateTensor { .. }), "{err}");
    // Layers 0 and 1 of the MLP are both in shard 2: the first collision in row order.
    let shard = fixture("tiny-llama-sharded-bf16").join("model-00002-of-00005.safetensors");
    assert_eq!(
        err.to_string(),
        format!(
            "{0}: duplicate tensor `mlp.gate_proj.weight` (also in {0})",
            shard.display()
        )
    );
}

fn fake_hub(root: &Path) {
    let repo = root.join("models--openai--clip-vit-base-patch32");
    for (rev, model) in [("aaaa1111", "tiny-clip"), ("bbbb2222", "tiny-whisper")] {
        let snap = repo.join("snapshots").join(rev);
        std::fs::create_dir_all(&snap).unwrap();
        for f in ["model.safetensors", "config.json"] {
            std::fs::copy(fixture(model).join(f), snap.join(f)).unwrap();
        }
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "aaaa1111\n").unwrap();
    std::fs::write(repo.join("refs/v2"), "bbbb2222").unwrap();
}

#[test]
fn hub_ids_resolve_from_the_local_cache() {
    let tmp = tempdir();
    let hub = tmp.path().join("hub");
    fake_hub(&hub);
    let c = |_: ()| ConvertConfig::builder().hub_cache(&hub).build().unwrap();
    let p = plan_conversion("openai/clip-vit-base-patch32", &c(())).unwrap();
    assert_eq!(p.model_type, "clip");
    assert_eq!(
        p.resolved_path,
        hub.join("models--openai--clip-vit-base-patch32/snapshots/aaaa1111")
    );
    let p = plan_conversion("openai/clip-vit-base-patch32@bbbb2222", &c(())).unwrap();
    assert_eq!(p.model_type, "whisper");
    let p = plan_conversion("openai/clip-vit-base-patch32@v2", &c(())).unwrap();
    assert_eq!(p.model_type, "whisper");
    let o = tmp.path().join("o");
    let r = convert("openai/clip-vit-base-patch32", &o, &c(())).unwrap();
    assert_eq!(r.model_name, "openai/clip-vit-base-patch32");
    assert_eq!(metadata(&o)["model_name"], "openai/clip-vit-base-patch32");
    let err = plan_conversion("openai/whisper-base", &c(())).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "openai/whisper-base: not in the local Hugging Face cache (looked in {}); modelconv works offline: \
             download the model first (e.g. `huggingface-cli download openai/whisper-base`), or pass a local path",
            hub.join("models--openai--whisper-base").display()
        )
    );
    let clip_repo = hub.join("models--openai--clip-vit-base-patch32");
    let offline = "modelconv works offline: download the model first \
                   (e.g. `huggingface-cli download openai/clip-vit-base-patch32`), or pass a local path";
    let err = plan_conversion("openai/clip-vit-base-patch32@nope", &c(())).unwrap_err();
    assert!(matches!(err, Error::NotInHubCache { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "openai/clip-vit-base-patch32@nope: revision `nope` is not in the cache (looked in {}); {offline}",
            clip_repo.display()
        )
    );
    // A revision that would leave the cache is refused before any path is built from it.
    for rev in ["..", "../../../etc", "a/../../b"] {
        let id = format!("openai/clip-vit-base-patch32@{rev}");
        let err = plan_conversion(&id, &c(())).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{id}: revision `{rev}` is not a valid name (looked in {}); {offline}",
                clip_repo.display()
            )
        );
    }
    // The environment decides the cache when no directory is given.
    let out = bin()
        .args([
            "convert",
            "openai/clip-vit-base-patch32",
            "--dry-run",
            "--json",
        ])
        .env("HF_HUB_CACHE", &hub)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["model_type"], "clip");
    let out = bin()
        .args([
            "convert",
            "openai/clip-vit-base-patch32",
            "--dry-run",
            "--json",
        ])
        .env_remove("HF_HUB_CACHE")
        .env("HF_HOME", tmp.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn dry_run_prints_the_plan_and_writes_nothing() {
    let tmp = tempdir();
    let o = tmp.path().join("o");
    let out = bin()
        .args([
            "convert",
            fixture("tiny-whisper").to_str().unwrap(),
            "-o",
            o.to_str().unwrap(),
            "--dry-run",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let t = String::from_utf8_lossy(&out.stdout);
    assert!(
        t.contains("type         whisper (part encoder), from config.json model_type `whisper`"),
        "{t}"
    );
    assert!(t.contains("kept (37):"), "{t}");
    assert!(t.contains("dropped (52):"), "{t}");
    assert!(t.contains("model.decoder.embed_tokens.weight"), "{t}");
    assert!(
        t.contains("whisper --part encoder keeps model.encoder.*"),
        "{t}"
    );
    assert!(
        t.contains("model.encoder.embed_positions.weight → encoder.position_embedding"),
        "{t}"
    );
    assert!(t.contains("37 tensors cast"), "{t}");
    assert!(!o.exists());
}

#[test]
fn full_size_layouts_convert_with_the_expected_counts() {
    let tmp = tempdir();
    let clip = tmp.path().join("clip");
    build_from_manifest(&fixture("manifests/clip-vit-base-patch32.json"), &clip);
    let o = tmp.path().join("clip-out");
    let r = convert(&clip, &o, &cfg()).unwrap();
    assert_eq!(r.tensors, 200);
    assert_eq!(names(&o), clip_vision(12));
    assert_eq!(metadata(&o)["config"]["image_size"], 224);
    let report = modelconv::verify(&o, Some(&open_source(&clip)), &Default::default()).unwrap();
    assert!(report.passed());
    drop(std::fs::remove_dir_all(&clip));

    let whisper = tmp.path().join("whisper");
    build_from_manifest(&fixture("manifests/whisper-base.json"), &whisper);
    let o = tmp.path().join("whisper-out");
    let r = convert(&whisper, &o, &cfg()).unwrap();
    assert_eq!(r.tensors, 7 + 15 * 6);
    assert_eq!(names(&o), whisper_encoder(6));
    let m = metadata(&o);
    assert_eq!(m["config"]["n_mels"], 80);
    assert_eq!(m["config"]["hidden_size"], 512);
    assert_eq!(m["config"]["max_positions"], 1500);
}
