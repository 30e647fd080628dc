//! Hub ids (`org/name`, `org/name@revision`) resolved from the local Hugging Face cache.
//! modelconv never downloads: a model that is not in the cache is an error that says
//! where it looked.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// True when `s` has the shape of a hub id and is not an existing path.
pub(crate) fn looks_like_hub_id(s: &str) -> bool {
    if Path::new(s).exists() {
        return false;
    }
    let id = s.split_once('@').map_or(s, |(id, _)| id);
    let mut parts = id.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// The hub cache directory: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `~/.cache/huggingface/hub` (`XDG_CACHE_HOME` honoured).
pub(crate) fn cache_dir() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = var("HF_HUB_CACHE") {
        return p;
    }
    if let Some(p) = var("HF_HOME") {
        return p.join("hub");
    }
    let cache = var("XDG_CACHE_HOME").or_else(|| var("HOME").map(|h| h.join(".cache")));
    cache
        .unwrap_or_else(|| PathBuf::from(".cache"))
        .join("huggingface")
        .join("hub")
}

/// Resolves `org/name[@revision]` to its snapshot directory in `cache`.
///
/// The revision (default `main`) is looked up in `refs/`; a commit hash names a snapshot
/// directly. Without a `refs/main`, a repository with a single snapshot resolves to it.
///
/// # Errors
///
/// `NotInHubCache` saying where it looked and that modelconv works offline.
pub(crate) fn resolve(id: &str, cache: &Path) -> Result<PathBuf> {
    let (repo, rev) = match id.split_once('@') {
        Some((r, v)) => (r, Some(v)),
        None => (id, None),
    };
    let folder = cache.join(format!("models--{}", repo.replace('/', "--")));
    let not_found = |what: String| Error::NotInHubCache {
        id: id.to_string(),
        reason: format!(
            "{what} (looked in {}); modelconv works offline: download the model first \
             (e.g. `huggingface-cli download {repo}`), or pass a local path",
            folder.display()
        ),
    };
    if !folder.is_dir() {
        return Err(not_found("not in the local Hugging Face cache".into()));
    }
    let snapshots = folder.join("snapshots");
    let rev_name = rev.unwrap_or("main");
    let valid =
        |s: &str| !s.is_empty() && !s.contains("..") && !s.starts_with('/') && !s.contains('\0');
    if !valid(rev_name) {
        return Err(not_found(format!(
            "revision `{rev_name}` is not a valid name"
        )));
    }
    let from_ref = std::fs::read_to_string(folder.join("refs").join(rev_name))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| valid(s) && !s.contains('/'));
    let commit = match from_ref {
        Some(c) => c,
        None if snapshots.join(rev_name).is_dir() && !rev_name.contains('/') => {
            rev_name.to_string()
        }
        None if rev.is_none() => {
            let mut snaps: Vec<String> = std::fs::read_dir(&snapshots)
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            snaps.sort();
            match snaps.len() {
                1 => snaps.remove(0),
                0 => return Err(not_found("no snapshot in the cache".into())),
                n => {
                    return Err(not_found(format!(
                        "no refs/main and {n} snapshots; name one with {repo}@<commit>"
                    )))
                }
            }
        }
        None => {
            return Err(not_found(format!(
                "revision `{rev_name}` is not in the cache"
            )))
        }
    };
    let dir = snapshots.join(&commit);
    if !dir.is_dir() {
        return Err(not_found(format!("snapshot {commit} is missing")));
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_id_shapes() {
        assert!(looks_like_hub_id("openai/clip-vit-base-patch32"));
        assert!(looks_like_hub_id("openai/whisper-base@main"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("../x"));
        assert!(!looks_like_hub_id("model.safetensors"));
    }
}
