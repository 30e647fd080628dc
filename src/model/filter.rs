//! `--include`, `--exclude` and `--rename`, applied to output names after the recipe.
//! A filter that matches nothing is an error: a typo must not silently keep or drop
//! everything.

use regex_lite::Regex;

use crate::error::{Error, Result};
use crate::glob::glob_match;

/// The user's filters.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    /// Keep only names matching one of these globs (when any are given).
    pub include: Vec<String>,
    /// Drop names matching one of these globs.
    pub exclude: Vec<String>,
    /// Regex renames `(from, to)`, applied in order to every kept name.
    pub rename: Vec<(String, String)>,
}

impl Filters {
    /// Parses `FROM=TO`.
    ///
    /// # Errors
    ///
    /// `InvalidOption` when there is no `=`.
    pub fn parse_rename(s: &str) -> Result<(String, String)> {
        s.split_once('=')
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .ok_or_else(|| {
                Error::option(format!("--rename `{s}`: expected FROM=TO (FROM a regex)"))
            })
    }

    /// Checks the filters once: every rename pattern must be a regex.
    ///
    /// # Errors
    ///
    /// `InvalidOption` naming the pattern that does not compile.
    pub(crate) fn compile(self) -> Result<CompiledFilters> {
        let rename = self
            .rename
            .into_iter()
            .map(|(from, to)| {
                Regex::new(&from)
                    .map(|re| (re, from.clone(), to))
                    .map_err(|e| Error::option(format!("--rename `{from}`: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CompiledFilters {
            include: self.include,
            exclude: self.exclude,
            rename,
        })
    }
}

/// [`Filters`] with the rename patterns compiled.
#[derive(Debug, Clone, Default)]
pub(crate) struct CompiledFilters {
    include: Vec<String>,
    exclude: Vec<String>,
    /// `(regex, its source text, replacement)`.
    rename: Vec<(Regex, String, String)>,
}

/// A tensor on its way through the filters: `(shard, tensor, source name, output name)`.
pub(crate) type Candidate = (usize, usize, String, String);

impl CompiledFilters {
    /// Applies the filters to the candidates the recipe keeps, recording what they drop.
    ///
    /// # Errors
    ///
    /// `InvalidOption` when a filter matches nothing: a typo must not silently keep or
    /// drop everything.
    pub(crate) fn apply(
        &self,
        rows: Vec<Candidate>,
        dropped: &mut Vec<(String, String)>,
    ) -> Result<Vec<Candidate>> {
        let mut rows = rows;
        if !self.include.is_empty() {
            for g in &self.include {
                if !rows.iter().any(|r| glob_match(g, &r.3)) {
                    return Err(Error::option(format!(
                        "--include `{g}` matches no tensor the recipe keeps"
                    )));
                }
            }
            let (keep, drop): (Vec<_>, Vec<_>) = rows
                .into_iter()
                .partition(|r| self.include.iter().any(|g| glob_match(g, &r.3)));
            dropped.extend(
                drop.into_iter()
                    .map(|r| (r.2, "--include matches none of it".to_string())),
            );
            rows = keep;
        }
        for g in &self.exclude {
            if !rows.iter().any(|r| glob_match(g, &r.3)) {
                return Err(Error::option(format!(
                    "--exclude `{g}` matches no tensor the recipe keeps"
                )));
            }
            let (drop, keep): (Vec<_>, Vec<_>) =
                rows.into_iter().partition(|r| glob_match(g, &r.3));
            dropped.extend(drop.into_iter().map(|r| (r.2, format!("--exclude {g}"))));
            rows = keep;
        }
        for (re, from, to) in &self.rename {
            let mut hit = false;
            for r in rows.iter_mut() {
                if re.is_match(&r.3) {
                    hit = true;
                    r.3 = re.replace_all(&r.3, to.as_str()).into_owned();
                }
            }
            if !hit {
                return Err(Error::option(format!(
                    "--rename `{from}` matches no tensor name"
                )));
            }
        }
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("lm_head.*", "lm_head.weight"));
        assert!(glob_match(
            "*.bias",
            "encoder.layer.0.attention.output.dense.bias"
        ));
        assert!(glob_match(
            "model.layers.?.mlp.*",
            "model.layers.3.mlp.up_proj.weight"
        ));
        assert!(!glob_match(
            "model.layers.?.mlp.*",
            "model.layers.13.mlp.up_proj.weight"
        ));
        assert!(!glob_match("lm_head", "lm_head.weight"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
    }

    #[test]
    fn filters_that_match_nothing_are_errors() {
        let rows = vec![
            (0, 0, "a.w".to_string(), "a.w".to_string()),
            (0, 1, "b.w".into(), "b.w".into()),
        ];
        let f = Filters {
            include: vec!["c.*".into()],
            ..Default::default()
        };
        assert_eq!(
            f.compile()
                .unwrap()
                .apply(rows.clone(), &mut vec![])
                .unwrap_err()
                .to_string(),
            "--include `c.*` matches no tensor the recipe keeps"
        );
        let f = Filters {
            exclude: vec!["a.*".into()],
            rename: vec![("^b\\.".into(), "B.".into())],
            ..Default::default()
        };
        let mut dropped = vec![];
        let out = f
            .compile()
            .unwrap()
            .apply(rows.clone(), &mut dropped)
            .unwrap();
        assert_eq!(out, vec![(0, 1, "b.w".to_string(), "B.w".to_string())]);
        assert_eq!(
            dropped,
            vec![("a.w".to_string(), "--exclude a.*".to_string())]
        );
        let f = Filters {
            rename: vec![("zzz".into(), "y".into())],
            ..Default::default()
        };
        assert_eq!(
            f.compile()
                .unwrap()
                .apply(rows, &mut vec![])
                .unwrap_err()
                .to_string(),
            "--rename `zzz` matches no tensor name"
        );
    }
}
