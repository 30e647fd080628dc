//! URL parsing: which strings name a remote location rather than a local path, and an
//! object-store prefix (`s3://BUCKET/PREFIX/`) taken apart once.

use crate::error::{Error, Result};

/// True when `s` names a remote checkpoint (`hf://`, `http(s)://`, `s3://`) rather than a
/// local path.
pub fn is_url(s: &str) -> bool {
    ["hf://", "http://", "https://", "s3://"]
        .iter()
        .any(|p| s.starts_with(p))
}

/// True when `s` names an object-store prefix (`s3://BUCKET/PREFIX/`), which needs the
/// `remote` feature.
pub(crate) fn is_object_url(s: &str) -> bool {
    s.starts_with("s3://")
}

/// An object-store prefix: a bucket and the key prefix below it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ObjectUrl {
    /// The bucket's name.
    pub(crate) bucket: String,
    /// The key prefix: empty for the bucket's root, else ending with `/`.
    pub(crate) prefix: String,
}

impl ObjectUrl {
    /// Parses `s3://BUCKET[/PREFIX[/]]`.
    ///
    /// # Errors
    ///
    /// `InvalidOption` when there is no bucket.
    pub(crate) fn parse(url: &str) -> Result<ObjectUrl> {
        let rest = url.strip_prefix("s3://").unwrap_or(url);
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(Error::option(format!("{url}: no bucket in the output URL")));
        }
        let key = key.trim_matches('/');
        let prefix = if key.is_empty() {
            String::new()
        } else {
            format!("{key}/")
        };
        Ok(ObjectUrl {
            bucket: bucket.to_string(),
            prefix,
        })
    }

    /// `s3://BUCKET/PREFIX/`, ending with `/`.
    pub(crate) fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }
}

impl std::fmt::Display for ObjectUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.url().trim_end_matches('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_url_is_a_bucket_and_a_prefix_ending_with_a_slash() {
        let u = ObjectUrl::parse("s3://b/x/y/").unwrap();
        assert_eq!((u.bucket.as_str(), u.prefix.as_str()), ("b", "x/y/"));
        assert_eq!(u.url(), "s3://b/x/y/");
        assert_eq!(u.to_string(), "s3://b/x/y");
        let root = ObjectUrl::parse("s3://b").unwrap();
        assert_eq!((root.prefix.as_str(), root.url().as_str()), ("", "s3://b/"));
        assert_eq!(
            ObjectUrl::parse("s3:///k").unwrap_err().to_string(),
            Error::option("s3:///k: no bucket in the output URL").to_string()
        );
    }
}
