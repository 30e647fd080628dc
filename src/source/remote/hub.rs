//! `hf://ORG/NAME[@REVISION][/FILE]` on the Hugging Face Hub (or `HF_ENDPOINT`): the
//! revision is resolved once to its commit, the file list with sizes and LFS sha256
//! comes from the API's tree of that commit, and every file is read through
//! `resolve/COMMIT/…` (which redirects LFS files to the storage backend, where `Range`
//! works). The token goes to the Hub only: reqwest drops it on a redirect to another
//! host.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;
use serde::Deserialize;

use super::{split_target, Entry, Target};
use crate::error::{Error, Result};
use crate::io::http::{Client, MAX_RETRY_AFTER};

/// The Hub's address: `HF_ENDPOINT`, else `https://huggingface.co`.
fn endpoint() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map(|v| v.trim().trim_end_matches('/').to_string())
        .unwrap_or_else(|| "https://huggingface.co".into())
}

#[derive(Deserialize)]
struct Revision {
    sha: String,
}

#[derive(Deserialize)]
struct Lfs {
    oid: String,
    size: u64,
}

#[derive(Deserialize)]
struct TreeEntry {
    #[serde(rename = "type")]
    kind: String,
    path: String,
    #[serde(default)]
    size: u64,
    lfs: Option<Lfs>,
}

/// Percent-encodes one path segment (a revision like `refs/pr/1` included).
fn segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `ORG/NAME` checked: two plain segments.
fn check_repo(repo: &str, url: &str) -> Result<()> {
    let ok = |p: &str| {
        !p.is_empty()
            && p != "."
            && p != ".."
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    match repo.split_once('/') {
        Some((a, b)) if ok(a) && ok(b) => Ok(()),
        _ => Err(Error::Remote {
            url: url.to_string(),
            reason: "expected hf://ORG/NAME[@REVISION][/FILE]".into(),
        }),
    }
}

/// GETs a JSON document of the API, retrying transport errors, 5xx and 429 as the
/// client's settings say; 401/403 are `RemoteDenied` naming the repository.
fn get_json<T: serde::de::DeserializeOwned>(
    client: &Client,
    url: &str,
    repo: &str,
    what: &str,
) -> Result<(T, Option<String>)> {
    let shown = format!("hf://{repo}");
    let s = &client.settings;
    let mut wait = s.backoff;
    let mut last = String::new();
    for attempt in 0..=s.retries {
        if attempt > 0 {
            std::thread::sleep(wait);
            wait = (wait * 2).min(Duration::from_secs(15));
        }
        let res = client.rt().block_on(async {
            let r = client.http.get(url).send().await?;
            let status = r.status();
            let next = next_link(r.headers());
            let header = |k: &str| {
                r.headers()
                    .get(k)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            let message = header("x-error-message");
            let retry_after = header("retry-after").and_then(|v| v.trim().parse::<f64>().ok());
            let body = r.bytes().await?;
            Ok::<_, reqwest::Error>((status, next, message, retry_after, body))
        });
        let (status, next, message, retry_after, body) = match res {
            Ok(r) => r,
            Err(e) => {
                last = format!("{}", e.without_url());
                continue;
            }
        };
        if status.is_success() {
            let v = serde_json::from_slice(&body).map_err(|e| Error::Remote {
                url: shown.clone(),
                reason: format!("the Hub's {what} is not what modelconv expects: {e}"),
            })?;
            return Ok((v, next));
        }
        let said = message.map(|m| format!(": {m}")).unwrap_or_default();
        match status.as_u16() {
            401 | 403 => {
                return Err(Error::RemoteDenied {
                    url: shown,
                    status: status.as_u16(),
                    reason: format!(
                        "the repository is private or gated, or does not exist{said}; \
                         set HF_TOKEN or pass --token-file with a token that can read it"
                    ),
                })
            }
            404 => {
                return Err(Error::Remote {
                    url: shown,
                    reason: format!("{what} not found (404){said}"),
                })
            }
            429 | 500..=599 => {
                if let Some(ra) = retry_after.filter(|v| v.is_finite() && *v >= 0.0) {
                    wait = Duration::from_secs_f64(ra).min(MAX_RETRY_AFTER);
                }
                last = format!("the Hub answered {status}{said}");
            }
            _ => {
                return Err(Error::Remote {
                    url: shown,
                    reason: format!("the Hub answered {status} for the {what}{said}"),
                })
            }
        }
    }
    Err(Error::Remote {
        url: shown,
        reason: format!(
            "the {what} could not be fetched after {} retries: {last}",
            s.retries
        ),
    })
}

/// The `rel="next"` URL of a `Link` header (the tree API pages long listings).
fn next_link(h: &reqwest::header::HeaderMap) -> Option<String> {
    let v = h.get(reqwest::header::LINK)?.to_str().ok()?;
    v.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        params.contains("rel=\"next\"").then(|| {
            url.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
    })
}

/// A Hub repository at one commit, as a listing reads it.
pub(super) struct Repo {
    pub(super) store: Arc<dyn ObjectStore>,
    /// Store paths of the directory the URL names (inside the repository).
    pub(super) prefix: String,
    /// `hf://ORG/NAME@COMMIT/DIR/`, shown to the user.
    pub(super) base_url: String,
    pub(super) files: BTreeMap<String, Entry>,
    pub(super) target: Target,
}

/// The repository `rest` (after `hf://`) names, resolved to its commit.
pub(super) fn list(client: &Arc<Client>, rest: &str) -> Result<Repo> {
    let url = format!("hf://{rest}");
    // ORG/NAME[@REV][/FILE...]
    let mut segs = rest.splitn(3, '/');
    let org = segs.next().unwrap_or_default();
    let name_rev = segs.next().unwrap_or_default();
    let sub = segs.next().unwrap_or_default();
    let (name, rev) = match name_rev.split_once('@') {
        Some((n, r)) => (n, r),
        None => (name_rev, "main"),
    };
    let repo = format!("{org}/{name}");
    check_repo(&repo, &url)?;
    if rev.is_empty() {
        return Err(Error::Remote {
            url,
            reason: "the revision after `@` is empty".into(),
        });
    }
    let ep = endpoint();
    let (r, _): (Revision, _) = get_json(
        client,
        &format!("{ep}/api/models/{repo}/revision/{}", segment(rev)),
        &repo,
        &format!("revision `{rev}`"),
    )?;
    let commit = r.sha;
    if commit.len() < 7 || !commit.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Error::Remote {
            url,
            reason: format!("the Hub resolved `{rev}` to `{commit}`, not a commit hash"),
        });
    }
    let mut files = BTreeMap::new();
    let mut next = Some(format!(
        "{ep}/api/models/{repo}/tree/{commit}?recursive=true"
    ));
    let mut pages = 0;
    while let Some(page) = next.take() {
        pages += 1;
        if pages > 1000 {
            return Err(Error::Remote {
                url,
                reason: "the file list runs past 1000 pages".into(),
            });
        }
        let (entries, n): (Vec<TreeEntry>, _) = get_json(client, &page, &repo, "file list")?;
        for e in entries.into_iter().filter(|e| e.kind == "file") {
            let (size, sha256) = match e.lfs {
                Some(l) => (l.size, Some(l.oid)),
                None => (e.size, None),
            };
            files.insert(
                e.path,
                Entry {
                    size,
                    etag: None,
                    sha256,
                },
            );
        }
        next = n;
    }
    let (dir, target) = split_target(sub);
    let files = if dir.is_empty() {
        files
    } else {
        files
            .into_iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(&dir)?.to_string(), v)))
            .collect()
    };
    let base = format!("{ep}/{repo}/resolve/{commit}/");
    let store = crate::io::store::http_store(client, &base, &url, true)?;
    Ok(Repo {
        store,
        base_url: format!("hf://{repo}@{commit}/{dir}"),
        prefix: dir,
        files,
        target,
    })
}
