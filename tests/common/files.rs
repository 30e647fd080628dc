//! Files the tests read back or edit: directory listings, JSON files (metadata, indexes,
//! configs).

use std::path::{Path, PathBuf};

/// The names in `dir`, sorted; none when it cannot be read (it does not exist).
pub fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The temp files (`.tmp-` in their name) in `dir`, sorted.
pub fn temp_files(dir: &Path) -> Vec<String> {
    entries(dir)
        .into_iter()
        .filter(|n| n.contains(".tmp-"))
        .collect()
}

/// A JSON file.
pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The `metadata.json` of a conversion.
pub fn metadata(out: &Path) -> serde_json::Value {
    read_json(&out.join("metadata.json"))
}

/// Rewrites a JSON file through `f`.
pub fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v = read_json(path);
    f(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

/// Rewrites the `model.safetensors.index.json` of `dir` through `f`; its path.
pub fn edit_index(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let index = dir.join("model.safetensors.index.json");
    edit_json(&index, f);
    index
}
