//! Model knowledge: which family a checkpoint is, what each family keeps and how it
//! renames (the seed's rules, and the parts it could not convert), and the
//! `metadata.json` each family's inference engine expects.

mod filter;
mod metadata;

use std::path::{Path, PathBuf};

use serde_json::Value;

pub(crate) use filter::CompiledFilters;
pub use filter::Filters;
pub(crate) use metadata::{build as build_metadata, MetadataInput};

use crate::error::{Error, Result};
use crate::source::Source;

/// A model family (`--model-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ModelType {
    /// Detect from `config.json`, the sentence-transformers markers and names.
    #[default]
    Auto,
    /// A BERT-style encoder: the bare model's tensors.
    Bert,
    /// A sentence-transformers model around a BERT-style encoder.
    SentenceTransformers,
    /// Any `transformers` model: the base model's tensors, or every tensor when the
    /// architecture is unknown.
    Transformers,
    /// CLIP: the vision tower by default.
    Clip,
    /// Whisper: the encoder by default.
    Whisper,
    /// A causal language model: every tensor.
    CausalLm,
}

impl ModelType {
    /// The name used on the command line and in `metadata.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelType::Auto => "auto",
            ModelType::Bert => "bert",
            ModelType::SentenceTransformers => "sentence-transformers",
            ModelType::Transformers => "transformers",
            ModelType::Clip => "clip",
            ModelType::Whisper => "whisper",
            ModelType::CausalLm => "causallm",
        }
    }
}

impl std::str::FromStr for ModelType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" => ModelType::Auto,
            "bert" => ModelType::Bert,
            "sentence-transformers" | "sentence_transformers" | "st" => ModelType::SentenceTransformers,
            "transformers" => ModelType::Transformers,
            "clip" => ModelType::Clip,
            "whisper" => ModelType::Whisper,
            "causallm" | "causal-lm" | "llm" => ModelType::CausalLm,
            o => {
                return Err(format!(
                    "unknown model type `{o}` (expected auto, bert, sentence-transformers, transformers, clip, whisper or causallm)"
                ))
            }
        })
    }
}

/// Which part of a multi-tower model to convert (`--part`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Part {
    /// The family's default: CLIP vision, Whisper encoder, everything else all.
    #[default]
    Default,
    /// CLIP's vision tower and `visual_projection`.
    Vision,
    /// CLIP's text tower and `text_projection`.
    Text,
    /// Whisper's encoder.
    Encoder,
    /// Whisper's decoder (and `proj_out` when stored).
    Decoder,
    /// Every tower.
    All,
}

impl Part {
    /// The name used on the command line and in `metadata.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Part::Default => "default",
            Part::Vision => "vision",
            Part::Text => "text",
            Part::Encoder => "encoder",
            Part::Decoder => "decoder",
            Part::All => "all",
        }
    }
}

impl std::str::FromStr for Part {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "default" => Part::Default,
            "vision" => Part::Vision,
            "text" => Part::Text,
            "encoder" => Part::Encoder,
            "decoder" => Part::Decoder,
            "all" => Part::All,
            o => {
                return Err(format!(
                    "unknown part `{o}` (expected vision, text, encoder, decoder or all)"
                ))
            }
        })
    }
}

/// What is known about the model besides its tensors.
#[derive(Debug, Clone, Default)]
pub struct ModelFiles {
    /// `config.json`, parsed, when present.
    pub config: Option<Value>,
    /// Where `config.json` is.
    pub config_path: Option<PathBuf>,
    /// `modules.json` of a sentence-transformers model.
    pub st_modules: Option<Value>,
    /// `sentence_bert_config.json`.
    pub st_config: Option<Value>,
    /// The pooling module's `config.json`.
    pub st_pooling: Option<Value>,
    /// Relative paths of the sentence-transformers module files (copied to the output).
    pub st_files: Vec<PathBuf>,
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Ok(t) => serde_json::from_str(&t)
            .map(Some)
            .map_err(|e| Error::ModelConfig {
                path: path.to_path_buf(),
                reason: format!("not valid JSON: {e}"),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("read", path, e)),
    }
}

impl ModelFiles {
    /// Reads the description files of the model in `dir`.
    ///
    /// # Errors
    ///
    /// `ModelConfig` for a file that exists but is not JSON.
    pub fn load(dir: &Path) -> Result<ModelFiles> {
        let config_path = dir.join("config.json");
        let config = read_json(&config_path)?;
        if let Some(c) = &config {
            if !c.is_object() {
                return Err(Error::ModelConfig {
                    path: config_path,
                    reason: "not a JSON object".into(),
                });
            }
        }
        let st_modules = read_json(&dir.join("modules.json"))?;
        let st_config = read_json(&dir.join("sentence_bert_config.json"))?;
        let mut st_files = Vec::new();
        let mut st_pooling = None;
        if st_modules.is_some() {
            st_files.push(PathBuf::from("modules.json"));
        }
        if st_config.is_some() {
            st_files.push(PathBuf::from("sentence_bert_config.json"));
        }
        if dir.join("config_sentence_transformers.json").is_file() {
            st_files.push(PathBuf::from("config_sentence_transformers.json"));
        }
        if let Some(Value::Array(mods)) = &st_modules {
            for m in mods {
                let path = m.get("path").and_then(Value::as_str).unwrap_or("");
                let ty = m.get("type").and_then(Value::as_str).unwrap_or("");
                // Module folders are plain relative names; anything else is not followed.
                if path.is_empty() || path.contains("..") || Path::new(path).is_absolute() {
                    continue;
                }
                let cfg = Path::new(path).join("config.json");
                if dir.join(&cfg).is_file() {
                    if ty.ends_with("Pooling") {
                        st_pooling = read_json(&dir.join(&cfg))?;
                    }
                    st_files.push(cfg);
                }
            }
        }
        Ok(ModelFiles {
            config_path: config.is_some().then_some(config_path),
            config,
            st_modules,
            st_config,
            st_pooling,
            st_files,
        })
    }

    fn config_str(&self, key: &str) -> Option<&str> {
        self.config.as_ref()?.get(key)?.as_str()
    }

    fn architectures(&self) -> Vec<&str> {
        self.config
            .as_ref()
            .and_then(|c| c.get("architectures"))
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default()
    }

    /// True when the sentence-transformers markers are present.
    pub fn is_sentence_transformers(&self) -> bool {
        self.st_modules.is_some() || self.st_config.is_some()
    }
}

const CAUSAL_TYPES: &[&str] = &[
    "llama",
    "qwen2",
    "qwen3",
    "qwen2_moe",
    "qwen3_moe",
    "mistral",
    "mixtral",
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "phi",
    "phi3",
    "gpt2",
    "gpt_neox",
    "falcon",
    "olmo",
    "olmo2",
    "starcoder2",
    "stablelm",
];
const BERT_TYPES: &[&str] = &[
    "bert",
    "roberta",
    "distilbert",
    "xlm-roberta",
    "camembert",
    "electra",
    "mpnet",
    "albert",
    "deberta",
    "deberta-v2",
    "modernbert",
    "nomic_bert",
];

/// The family a config says, if it says one we know.
fn family_from_config(files: &ModelFiles) -> Option<(ModelType, String)> {
    let mt = files
        .config_str("model_type")
        .unwrap_or("")
        .to_ascii_lowercase();
    let arch = files.architectures();
    let what = match (mt.is_empty(), arch.first()) {
        (false, Some(a)) => format!("model_type `{mt}` ({a})"),
        (false, None) => format!("model_type `{mt}`"),
        (true, Some(a)) => format!("architecture {a}"),
        (true, None) => return None,
    };
    let ty = if mt == "clip" || arch.iter().any(|a| a.starts_with("CLIP")) {
        ModelType::Clip
    } else if mt == "whisper" || arch.iter().any(|a| a.starts_with("Whisper")) {
        ModelType::Whisper
    } else if CAUSAL_TYPES.contains(&mt.as_str()) || arch.iter().any(|a| a.ends_with("ForCausalLM"))
    {
        ModelType::CausalLm
    } else if BERT_TYPES.contains(&mt.as_str()) {
        ModelType::Bert
    } else {
        return None;
    };
    Some((ty, what))
}

/// The family a name says (the seed's patterns).
fn family_from_name(name: &str) -> Option<ModelType> {
    let n = name.to_ascii_lowercase();
    if n.contains("clip") {
        Some(ModelType::Clip)
    } else if n.contains("whisper") {
        Some(ModelType::Whisper)
    } else if ["qwen", "llama", "gemma", "mistral"]
        .iter()
        .any(|p| n.contains(p))
    {
        Some(ModelType::CausalLm)
    } else if n.contains("sentence-transformers") || n.contains("minilm") || n.contains("mpnet") {
        Some(ModelType::SentenceTransformers)
    } else if n.contains("bert") {
        Some(ModelType::Bert)
    } else {
        None
    }
}

/// The family the tensor names say, for checkpoints without a config.
fn family_from_tensors(source: &Source) -> Option<ModelType> {
    let has = |p: &str| {
        source
            .shards
            .iter()
            .flat_map(|s| &s.header.tensors)
            .any(|t| t.name.starts_with(p))
    };
    if has("vision_model.") {
        Some(ModelType::Clip)
    } else if has("model.encoder.conv1") || has("encoder.conv1") {
        Some(ModelType::Whisper)
    } else if has("model.layers.") || has("lm_head.") {
        Some(ModelType::CausalLm)
    } else if has("embeddings.word_embeddings") || has("bert.embeddings") {
        Some(ModelType::Bert)
    } else {
        None
    }
}

/// The resolved recipe: family, part, and what the user should be told about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipe {
    /// The family.
    pub model_type: ModelType,
    /// The part (never `Default` once resolved).
    pub part: Part,
    /// How the family was decided.
    pub detected_by: String,
    /// Things worth telling the user (unknown architecture, tied weights).
    pub notices: Vec<String>,
    /// The base-model prefix stripped from names (`bert.`), when one applies.
    pub base_prefix: Option<String>,
    /// True when the architecture was not recognised and every tensor is kept.
    pub keep_everything: bool,
    /// True for a causal LM whose `lm_head.weight` is tied to the embeddings and not
    /// stored (set once the tensors are selected).
    pub tied_head: bool,
}

impl Recipe {
    /// Records a causal LM whose `lm_head.weight` is not stored because
    /// `tie_word_embeddings` ties it to the embeddings; `has_head` says whether the
    /// selection keeps an `lm_head.weight`.
    pub(crate) fn note_tied_head(&mut self, files: &ModelFiles, has_head: bool) {
        let tie = files
            .config
            .as_ref()
            .and_then(|c| c.get("tie_word_embeddings"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if self.model_type == ModelType::CausalLm && tie && !has_head {
            self.tied_head = true;
            self.notices.push(
                "lm_head.weight is tied to model.embed_tokens.weight (tie_word_embeddings) and not stored"
                    .into(),
            );
        }
    }
}

/// Decides the family and part for a checkpoint.
///
/// # Errors
///
/// `ModelConfig` when the requested type contradicts `config.json`, when a part does not
/// exist for the family, or when nothing tells the family apart and none was given.
pub fn resolve_recipe(
    requested: ModelType,
    part: Part,
    files: &ModelFiles,
    source: &Source,
    name: &str,
) -> Result<Recipe> {
    let config_path = files
        .config_path
        .clone()
        .unwrap_or_else(|| source.model_dir.join("config.json"));
    let from_config = family_from_config(files);
    let mut notices = Vec::new();
    let found = match requested {
        ModelType::Auto => detect(from_config, files, source, name, &mut notices),
        t => check_requested(t, from_config, &config_path, &mut notices).map(Some)?,
    };
    let Some(Found {
        model_type,
        detected_by,
        keep_everything,
    }) = found
    else {
        return Err(Error::ModelConfig {
            path: config_path,
            reason:
                "no config.json, and neither the name nor the tensor names tell the model type; \
                     pass --model-type"
                    .into(),
        });
    };
    let part = resolve_part(model_type, part)?;
    let base_prefix = if keep_everything {
        None
    } else {
        base_prefix(model_type, files)
    };
    Ok(Recipe {
        model_type,
        part,
        detected_by,
        notices,
        base_prefix,
        keep_everything,
        tied_head: false,
    })
}

/// A family, how it was decided, and whether every tensor is kept.
struct Found {
    model_type: ModelType,
    detected_by: String,
    keep_everything: bool,
}

impl Found {
    fn new(model_type: ModelType, detected_by: String) -> Found {
        Found {
            model_type,
            detected_by,
            keep_everything: false,
        }
    }
}

/// Detects the family from `config.json`, then the name, the sentence-transformers
/// markers, the tensor names, and last an unknown architecture converted whole; `None`
/// when nothing tells.
fn detect(
    from_config: Option<(ModelType, String)>,
    files: &ModelFiles,
    source: &Source,
    name: &str,
    notices: &mut Vec<String>,
) -> Option<Found> {
    let st = files.is_sentence_transformers();
    Some(match from_config {
        Some((ModelType::Bert, what)) if st => Found::new(
            ModelType::SentenceTransformers,
            format!("config.json {what} with sentence-transformers modules"),
        ),
        Some((t, what)) => Found::new(t, format!("config.json {what}")),
        None => {
            if let Some(t) = family_from_name(name) {
                Found::new(t, format!("the name `{}`", crate::error::sanitize(name)))
            } else if st {
                Found::new(
                    ModelType::SentenceTransformers,
                    "sentence-transformers modules".into(),
                )
            } else if let Some(t) = family_from_tensors(source) {
                Found::new(t, "tensor names".into())
            } else {
                files.config.as_ref()?;
                let what = files
                    .architectures()
                    .first()
                    .map(|a| a.to_string())
                    .or_else(|| files.config_str("model_type").map(str::to_owned))
                    .unwrap_or_else(|| "unnamed".into());
                notices.push(format!(
                    "unknown architecture `{}`: converting every tensor as `transformers` (pass --model-type to choose)",
                    crate::error::sanitize(&what)
                ));
                Found {
                    model_type: ModelType::Transformers,
                    detected_by: format!("unknown architecture `{what}`"),
                    keep_everything: true,
                }
            }
        }
    })
}

/// Accepts the family the user asked for unless `config.json` names another.
fn check_requested(
    t: ModelType,
    from_config: Option<(ModelType, String)>,
    config_path: &Path,
    notices: &mut Vec<String>,
) -> Result<Found> {
    if let Some((found, what)) = &from_config {
        let compatible = match t {
            ModelType::Clip | ModelType::Whisper => *found == t,
            ModelType::Bert | ModelType::SentenceTransformers => *found == ModelType::Bert,
            _ => true,
        };
        if !compatible {
            return Err(Error::ModelConfig {
                path: config_path.to_path_buf(),
                reason: format!(
                    "--model-type {} contradicts the checkpoint: config.json has {what}, a {} model",
                    t.as_str(),
                    found.as_str()
                ),
            });
        }
    }
    let keep = t == ModelType::Transformers && from_config.is_none();
    if keep {
        notices.push("architecture not recognised: `transformers` keeps every tensor".into());
    }
    Ok(Found {
        model_type: t,
        detected_by: "--model-type".to_string(),
        keep_everything: keep,
    })
}

/// The part a family converts: its default, or the one asked for if the family has it.
fn resolve_part(model_type: ModelType, part: Part) -> Result<Part> {
    match (model_type, part) {
        (ModelType::Clip, Part::Default) => Ok(Part::Vision),
        (ModelType::Clip, p @ (Part::Vision | Part::Text | Part::All)) => Ok(p),
        (ModelType::Whisper, Part::Default) => Ok(Part::Encoder),
        (ModelType::Whisper, p @ (Part::Encoder | Part::Decoder | Part::All)) => Ok(p),
        (ModelType::Clip | ModelType::Whisper, p) => Err(Error::option(format!(
            "--part {} does not exist for {} (choose {})",
            p.as_str(),
            model_type.as_str(),
            if model_type == ModelType::Clip {
                "vision, text or all"
            } else {
                "encoder, decoder or all"
            }
        ))),
        (_, Part::Default | Part::All) => Ok(Part::All),
        (t, p) => Err(Error::option(format!(
            "--part {} applies to clip and whisper only, not {}",
            p.as_str(),
            t.as_str()
        ))),
    }
}

/// The base-model prefix (`bert.`, `model.`) stripped from an encoder family's names.
fn base_prefix(model_type: ModelType, files: &ModelFiles) -> Option<String> {
    match model_type {
        ModelType::Bert | ModelType::SentenceTransformers | ModelType::Transformers => {
            files.config_str("model_type").map(|m| {
                let m = m.replace('-', "_");
                match m.as_str() {
                    "xlm_roberta" | "camembert" => "roberta.".to_string(),
                    "llama" | "qwen2" | "qwen3" | "mistral" | "gemma" | "gemma2" | "whisper" => {
                        "model.".to_string()
                    }
                    _ => format!("{m}."),
                }
            })
        }
        _ => None,
    }
}

/// One tensor picked from the source, under its output name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Selected {
    /// Index of the shard in [`Source::shards`].
    pub(crate) shard: usize,
    /// Index of the tensor in that shard's header.
    pub(crate) tensor: usize,
    /// Name in the output.
    pub(crate) name: String,
}

/// The outcome of applying a recipe and the filters to a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Tensors kept, in source order, with output names.
    pub selected: Vec<Selected>,
    /// Tensors dropped: `(source name, rule that dropped it)`.
    pub dropped: Vec<(String, String)>,
    /// Renames: `(source name, output name)`.
    pub renamed: Vec<(String, String)>,
    /// Stored tensors a dequantized weight consumed: `(stored name, weight name)`.
    pub consumed: Vec<(String, String)>,
    /// Stored tensors the pre-quantization scheme does not need (activation scales),
    /// also listed in `dropped`: `(stored name, reason)`.
    pub scheme_dropped: Vec<(String, String)>,
}

/// What the recipe does with one source name: `Ok(output name)` or `Err(rule)`.
fn apply_recipe(r: &Recipe, name: &str, has_base: bool) -> std::result::Result<String, String> {
    match r.model_type {
        ModelType::Clip => {
            let vision = name.starts_with("vision_model.") || name == "visual_projection.weight";
            let text = name.starts_with("text_model.") || name == "text_projection.weight";
            match r.part {
                Part::Vision if vision => Ok(name.to_string()),
                Part::Vision => Err(
                    "clip --part vision keeps vision_model.* and visual_projection.weight".into(),
                ),
                Part::Text if text => Ok(name.to_string()),
                Part::Text => {
                    Err("clip --part text keeps text_model.* and text_projection.weight".into())
                }
                _ => Ok(name.to_string()),
            }
        }
        ModelType::Whisper => {
            let bare = name.strip_prefix("model.").unwrap_or(name);
            let enc = bare.starts_with("encoder.");
            let dec = bare.starts_with("decoder.") || bare.starts_with("proj_out.");
            let keep = match r.part {
                Part::Encoder => enc,
                Part::Decoder => dec,
                _ => true,
            };
            if !keep {
                return Err(format!(
                    "whisper --part {} keeps {}",
                    r.part.as_str(),
                    if r.part == Part::Encoder {
                        "model.encoder.*"
                    } else {
                        "model.decoder.* and proj_out"
                    }
                ));
            }
            Ok(match bare {
                "encoder.embed_positions.weight" => "encoder.position_embedding".to_string(),
                "decoder.embed_positions.weight" => "decoder.position_embedding".to_string(),
                b => b.to_string(),
            })
        }
        ModelType::CausalLm => Ok(name.to_string()),
        _ if r.keep_everything => Ok(name.to_string()),
        _ => match (&r.base_prefix, has_base) {
            (Some(p), true) => match name.strip_prefix(p.as_str()) {
                Some(rest) => Ok(rest.to_string()),
                None => Err(format!("task head: not part of the base model `{}*`", p)),
            },
            _ => Ok(name.to_string()),
        },
    }
}

/// Applies the recipe, then the filters, to every tensor of `source` in source order:
/// a pre-quantized checkpoint's weights once each, dequantized (unless
/// `keep_quantized`), their scales consumed and activation scales dropped.
///
/// # Errors
///
/// `InvalidOption` when a filter matches nothing, `NothingToConvert` when nothing is
/// left.
pub(crate) fn select(
    source: &Source,
    recipe: &Recipe,
    filters: &CompiledFilters,
    keep_quantized: bool,
) -> Result<Selection> {
    let (logical, gone) = source.logical(!keep_quantized);
    let has_base = recipe
        .base_prefix
        .as_deref()
        .is_some_and(|p| logical.iter().any(|t| t.info.name.starts_with(p)));
    let mut out = Selection {
        dropped: gone.dropped.clone(),
        consumed: gone.consumed,
        scheme_dropped: gone.dropped,
        ..Selection::default()
    };
    let mut kept = Vec::new();
    for t in &logical {
        match apply_recipe(recipe, &t.info.name, has_base) {
            Ok(n) => kept.push((t.at.shard, t.at.tensor, t.info.name.clone(), n)),
            Err(rule) => out.dropped.push((t.info.name.clone(), rule)),
        }
    }
    let filtered = filters.apply(kept, &mut out.dropped)?;
    for (shard, tensor, src, name) in filtered {
        if src != name {
            out.renamed.push((src, name.clone()));
        }
        out.selected.push(Selected {
            shard,
            tensor,
            name,
        });
    }
    if out.selected.is_empty() {
        return Err(Error::NothingToConvert {
            path: source.input.clone(),
            model_type: recipe.model_type.as_str(),
        });
    }
    Ok(out)
}
