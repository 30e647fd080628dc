//! The side files a Hugging Face checkpoint directory carries beside its weights, by
//! name: what a remote input fetches whole and a conversion copies.

/// The tokenizer and preprocessing files copied into `tokenizer/`: fetched whole with a
/// remote checkpoint, whose listing (or probing, over plain HTTP) finds them by name.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
    "normalizer.json",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.jinja",
];
