//! `verify`: the file's structure and checksums, and with a source, every value against
//! what the recorded cast policy makes of the source, bit for bit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rayon::prelude::*;
use serde::Serialize;

use super::{Row, WeightFile};
use crate::cast::{cast_into, value_f64};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::source::Source;

/// Options of [`verify`].
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Worker threads (0 = all cores).
    pub threads: usize,
}

/// The verdict on one tensor.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TensorCheck {
    /// Name.
    pub name: String,
    /// Rows whose checksum did not match.
    pub checksum_mismatches: u64,
    /// With a source: elements whose bytes differ from the expected cast.
    pub value_mismatches: u64,
    /// With a source: largest |stored − source| over elements (cast tensors).
    pub max_abs_error: f64,
    /// With a source: largest |stored − source| / |source| over non-zero elements.
    pub max_rel_error: f64,
    /// Problems found (wrong dtype, missing in the source, unreadable rows).
    pub problems: Vec<String>,
}

impl TensorCheck {
    fn new(name: &str) -> Self {
        TensorCheck {
            name: name.to_string(),
            checksum_mismatches: 0,
            value_mismatches: 0,
            max_abs_error: 0.0,
            max_rel_error: 0.0,
            problems: Vec::new(),
        }
    }

    /// True when nothing is wrong with it.
    pub fn ok(&self) -> bool {
        self.checksum_mismatches == 0 && self.value_mismatches == 0 && self.problems.is_empty()
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// The file.
    pub path: PathBuf,
    /// Tensors checked.
    pub tensors: usize,
    /// Rows checked.
    pub rows: u64,
    /// Whether the file has checksums (the seed's files have none).
    pub checksums_present: bool,
    /// Whether values were compared with a source.
    pub compared_with_source: bool,
    /// File-level problems.
    pub problems: Vec<String>,
    /// Per tensor, in row order.
    pub checks: Vec<TensorCheck>,
}

impl VerifyReport {
    /// True when nothing is wrong.
    pub fn passed(&self) -> bool {
        self.problems.is_empty() && self.checks.iter().all(TensorCheck::ok)
    }

    /// The tensors with problems.
    pub fn failures(&self) -> impl Iterator<Item = &TensorCheck> {
        self.checks.iter().filter(|c| !c.ok())
    }
}

/// Compares `stored` with the cast of `src`, element by element.
fn compare(check: &mut TensorCheck, src_dtype: Dtype, out_dtype: Dtype, src: &[u8], stored: &[u8]) {
    let mut expected = vec![0u8; stored.len()];
    if cast_into(src_dtype, out_dtype, src, &mut expected).is_none() {
        check.problems.push(format!(
            "{} source bytes cannot become {} stored bytes of {}",
            src.len(),
            stored.len(),
            out_dtype.torch_name()
        ));
        return;
    }
    let s = out_dtype.size();
    let float = src_dtype.is_castable_float() && out_dtype.is_castable_float();
    for (i, (e, g)) in expected
        .chunks_exact(s)
        .zip(stored.chunks_exact(s))
        .enumerate()
    {
        if e != g {
            check.value_mismatches += 1;
        }
        if float && src_dtype != out_dtype {
            let sv = value_f64(
                src_dtype,
                &src[i * src_dtype.size()..(i + 1) * src_dtype.size()],
            );
            let gv = value_f64(out_dtype, g);
            if sv.is_finite() && gv.is_finite() {
                let err = (gv - sv).abs();
                check.max_abs_error = check.max_abs_error.max(err);
                if sv != 0.0 {
                    check.max_rel_error = check.max_rel_error.max(err / sv.abs());
                }
            }
        }
    }
}

/// Verifies a weight file: structure (rows add up to every shape), each row's checksum,
/// and, given an open `source` (see [`crate::open_source`]), every stored value against
/// the source under the file's cast policy.
///
/// # Errors
///
/// Opening errors of the file, `ThreadPool`; problems found are in the report.
pub fn verify(
    path: impl AsRef<Path>,
    source: Option<&Source>,
    opts: &VerifyOptions,
) -> Result<VerifyReport> {
    let wf = WeightFile::open(path)?;
    let src = source;
    let src_index: HashMap<&str, (usize, &crate::source::TensorInfo)> = src
        .iter()
        .flat_map(|s| s.tensors())
        .map(|(si, t)| (t.name.as_str(), (si, t)))
        .collect();
    let checks: Vec<Mutex<TensorCheck>> = wf
        .tensors()
        .iter()
        .map(|t| Mutex::new(TensorCheck::new(&t.name)))
        .collect();
    let seen_bytes: Vec<Mutex<u64>> = wf.tensors().iter().map(|_| Mutex::new(0)).collect();
    let policy = wf.cast_policy();
    let threads = if opts.threads > 0 {
        opts.threads
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::ThreadPool {
            reason: e.to_string(),
        })?;
    let rows_seen = Mutex::new(0u64);
    let file_problems = Mutex::new(Vec::new());
    pool.install(|| {
        (0..wf.num_row_groups()).into_par_iter().for_each(|rg| {
            let r = wf.scan_row_group(rg, &mut |row: Row| {
                let t = &wf.tensors()[row.tensor];
                let mut guard = checks[row.tensor].lock().unwrap_or_else(|p| p.into_inner());
                let check = &mut *guard;
                if let Some(sum) = row.checksum {
                    if xxhash_rust::xxh3::xxh3_64(row.data) != sum {
                        check.checksum_mismatches += 1;
                    }
                }
                if let Ok(mut b) = seen_bytes[row.tensor].lock() {
                    *b += row.data.len() as u64;
                }
                if let Some(src) = &src {
                    let sname = t.source.as_deref().unwrap_or(&t.name);
                    match src_index.get(sname) {
                        None => check.problems.push(format!(
                            "source has no tensor `{}`",
                            crate::error::sanitize(sname)
                        )),
                        Some(&(si, st)) => {
                            let expect_dtype =
                                policy.map(|p| p.output_for(st.dtype)).unwrap_or(t.dtype);
                            if expect_dtype != t.dtype {
                                check.problems.push(format!(
                                    "stored as {} but the cast policy gives {}",
                                    t.dtype.torch_name(),
                                    expect_dtype.torch_name()
                                ));
                            } else if st.shape != t.shape {
                                check.problems.push(format!(
                                    "shape {:?} differs from the source's {:?}",
                                    t.shape, st.shape
                                ));
                            } else {
                                let os = t.dtype.size() as u64;
                                let ss = st.dtype.size() as u64;
                                let elem0 = row.offset / os;
                                let elems = row.data.len() as u64 / os;
                                match src.shards[si].bytes(st, elem0 * ss, elems * ss) {
                                    Ok(sb) => compare(check, st.dtype, t.dtype, sb, row.data),
                                    Err(e) => check.problems.push(e.to_string()),
                                }
                            }
                        }
                    }
                }
                drop(guard);
                if let Ok(mut n) = rows_seen.lock() {
                    *n += 1;
                }
                Ok(())
            });
            if let Err(e) = r {
                if let Ok(mut p) = file_problems.lock() {
                    p.push(e.to_string());
                }
            }
        })
    });
    let mut checks: Vec<TensorCheck> = checks
        .into_iter()
        .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
        .collect();
    for ((c, t), b) in checks.iter_mut().zip(wf.tensors()).zip(seen_bytes) {
        let b = b.into_inner().unwrap_or_else(|p| p.into_inner());
        if b != t.bytes {
            c.problems
                .push(format!("rows hold {b} bytes, the shape needs {}", t.bytes));
        }
        // Problems repeat per row of a split tensor; say each once.
        c.problems.dedup();
    }
    let mut problems = file_problems
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    problems.sort();
    Ok(VerifyReport {
        path: wf.path().to_path_buf(),
        tensors: wf.tensors().len(),
        rows: rows_seen.into_inner().unwrap_or_else(|p| p.into_inner()),
        checksums_present: wf.has_checksums(),
        compared_with_source: src.is_some(),
        problems,
        checks,
    })
}
