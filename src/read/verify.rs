//! `verify`: the file's structure and checksums, and with a source, every value against
//! what the recorded cast policy makes of the source, bit for bit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use rayon::prelude::*;
use serde::Serialize;

use xxhash_rust::xxh3::xxh3_64;

use super::rows::Row;
use super::tensor::{codes as stored_codes, f32s_into, row_elems};
use super::{TensorInfo, WeightFile};
use crate::cast::{
    carry, cast_into, codes, dequantize, quantize_unit, tensor_elements, value_f64, QuantError,
    Stored, TensorQuantError,
};
use crate::dtype::{Dtype, TargetDtype};
use crate::error::{sanitize, Error, Result};
use crate::format::QuantInfo;
use crate::plan::QuantScheme;
use crate::source::{Logical, Source};

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
    /// With a source, for a quantized tensor: the error its codes make against the
    /// source values after dequantization.
    pub quant: Option<TensorQuantError>,
    /// With a source, for a weight carried from its own codes: checked code for code
    /// against the source's codes, scales and zero points.
    pub carried: bool,
    #[serde(skip)]
    quant_err: Option<QuantError>,
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
            quant: None,
            carried: false,
            quant_err: None,
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
    let against = source.map(|src| Against::new(src, &wf));
    // Per tensor: its verdict and the (chunk offset, length) of every row seen.
    let tallies: Vec<Mutex<Tally>> = wf
        .tensors()
        .iter()
        .map(|t| Mutex::new((TensorCheck::new(&t.name), Vec::new())))
        .collect();
    let (rows, mut problems) = check_rows(&wf, against.as_ref(), &tallies, opts.threads)?;
    let checks = tallies
        .into_iter()
        .zip(wf.tensors())
        .map(|(m, t)| {
            let tally = m.into_inner().unwrap_or_else(|p| p.into_inner());
            close_check(tally, t, wf.has_index())
        })
        .collect();
    problems.sort();
    Ok(VerifyReport {
        path: wf.path().to_path_buf(),
        tensors: wf.tensors().len(),
        rows,
        checksums_present: wf.has_checksums(),
        compared_with_source: source.is_some(),
        problems,
        checks,
    })
}

/// Checks every row of `wf` on `threads` threads (0 = all cores), row groups in
/// parallel, into its tensor's tally. Returns the rows seen and the file-level problems
/// (a row group that cannot be read), unsorted.
fn check_rows(
    wf: &WeightFile,
    against: Option<&Against>,
    tallies: &[Mutex<Tally>],
    threads: usize,
) -> Result<(u64, Vec<String>)> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::ThreadPool {
            reason: e.to_string(),
        })?;
    let rows_seen = AtomicU64::new(0);
    let file_problems = Mutex::new(Vec::new());
    pool.install(|| {
        (0..wf.num_row_groups()).into_par_iter().for_each(|rg| {
            let r = wf.scan_row_group(rg, true, &mut |row: Row| {
                let t = &wf.tensors()[row.tensor];
                let mut tally = lock(&tallies[row.tensor]);
                let (check, spans) = &mut *tally;
                if row.checksum.is_some_and(|sum| xxh3_64(row.data) != sum) {
                    check.checksum_mismatches += 1;
                }
                check_description(check, t, &row);
                spans.push((row.offset, row.data.len() as u64));
                if let Some(a) = against {
                    a.check_row(check, t, &row);
                }
                rows_seen.fetch_add(1, Ordering::Relaxed);
                Ok(())
            });
            if let Err(e) = r {
                lock(&file_problems).push(e.to_string());
            }
        })
    });
    let problems = file_problems
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    Ok((rows_seen.into_inner(), problems))
}

/// The verdict on tensor `t` once all its rows are seen: their lengths add up to its
/// bytes and, in a file with our index, their chunk offsets tile it in order.
fn close_check(tally: Tally, t: &TensorInfo, has_index: bool) -> TensorCheck {
    let (mut c, mut spans) = tally;
    let b = spans.iter().fold(0u64, |a, s| a.saturating_add(s.1));
    if b != t.bytes {
        c.problems
            .push(format!("rows hold {b} bytes, the shape needs {}", t.bytes));
    } else if has_index {
        // The rows' chunk offsets must tile the tensor exactly, in order.
        spans.sort_unstable();
        let mut at = 0u64;
        for (off, len) in spans {
            if off != at {
                c.problems.push(format!(
                    "a row's chunk offset is {off}, the rows before it end at {at}"
                ));
                break;
            }
            at = at.saturating_add(len);
        }
    }
    // Problems repeat per row of a split tensor; say each once.
    c.problems.dedup();
    c.quant = c.quant_err.map(|e| TensorQuantError::new(&c.name, &e));
    c
}

impl Against<'_> {
    /// A row of a weight carried from its codes: its codes, scales and zero points
    /// equal the source's own, code for code; the error is 0.
    fn check_carried_row(
        &self,
        check: &mut TensorCheck,
        t: &TensorInfo,
        (q, d): (QuantInfo, &crate::source::Dequantized),
        row: &Row,
    ) {
        check.carried = true;
        let carry = match carry(self.src, d) {
            Ok(c) => c,
            Err(why) => {
                return check.problems.push(format!(
                    "recorded as carried, but its codes cannot be: {why}"
                ))
            }
        };
        let per = q.kind.per_byte();
        let (first, elems) = (
            row.offset.saturating_mul(per),
            row_elems(q.kind, t.num_params, row.offset, row.data.len()),
        );
        let unit = q.unit(&t.shape);
        if d.info.shape != t.shape || unit != carry.group || first % unit != 0 {
            return check.problems.push(format!(
                "shape {:?} or groups of {unit} differ from the source's {:?} in groups of {}",
                t.shape, d.info.shape, carry.group
            ));
        }
        if first
            .checked_add(elems)
            .is_none_or(|end| end > d.info.numel)
        {
            return check.problems.push(format!(
                "a row at element {first} holds more than the source's {} elements",
                d.info.numel
            ));
        }
        let mut codes_want = vec![0u8; elems as usize];
        let (scales, zps) = match codes(self.src, d, carry.group, first, &mut codes_want) {
            Ok(c) => c,
            Err(e) => return check.problems.push(e.to_string()),
        };
        let got = stored_codes(q.kind, row.data, elems);
        check.value_mismatches += codes_want
            .iter()
            .zip(got.iter())
            .filter(|(a, b)| a != b)
            .count() as u64;
        let (mut got_s, mut got_z) = (Vec::new(), Vec::new());
        f32s_into(row.scales, &mut got_s);
        f32s_into(row.zero_points, &mut got_z);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        if bits(&got_s) != bits(&scales) || bits(&got_z) != bits(&zps) {
            check.value_mismatches += 1;
        }
        let err = check.quant_err.get_or_insert_with(QuantError::default);
        for (c, (&s, &z)) in got.chunks(unit as usize).zip(scales.iter().zip(&zps)) {
            err.sum_x2 += c
                .iter()
                .map(|&b| (dequantize(b, s, z) as f64).powi(2))
                .sum::<f64>();
        }
        err.count += elems;
    }

    /// Quantizes the source's values of a stored int8 or int2 row again and requires
    /// the same codes (int2 ones unpacked, padding bits included: they must be zero),
    /// scales and zero points; measures the error the codes make.
    fn check_quantized_row(
        &self,
        check: &mut TensorCheck,
        t: &TensorInfo,
        q: QuantInfo,
        src: &Logical,
        row: &Row,
    ) {
        let st = src.info;
        let Some(scheme) = self.scheme else {
            return check
                .problems
                .push("quantized, but the file does not record its scheme".into());
        };
        let per = q.kind.per_byte();
        let (first, elems) = (
            row.offset.saturating_mul(per),
            row_elems(q.kind, t.num_params, row.offset, row.data.len()),
        );
        let unit = q.unit(&t.shape);
        if st.shape != t.shape || unit == 0 || first % unit != 0 {
            return check.problems.push(format!(
                "shape {:?} or row layout differs from the source's {:?}",
                t.shape, st.shape
            ));
        }
        if first.checked_add(elems).is_none_or(|end| end > st.numel) {
            return check.problems.push(format!(
                "a row at element {first} holds more than the source's {} elements",
                st.numel
            ));
        }
        let (mut scratch, mut values) = (Vec::new(), Vec::new());
        let src = match self.elements(src, first, elems, &mut scratch, &mut values) {
            Ok(s) => s,
            Err(e) => return check.problems.push(e.to_string()),
        };
        let (mut scales, mut zps) = (Vec::new(), Vec::new());
        f32s_into(row.scales, &mut scales);
        f32s_into(row.zero_points, &mut zps);
        let units = elems.div_ceil(unit) as usize;
        if scales.len() != units || zps.len() != units {
            return check.problems.push(format!(
                "a row holds {} scales and {} zero points for {units} units",
                scales.len(),
                zps.len()
            ));
        }
        let ss = st.dtype.size();
        let err = check.quant_err.get_or_insert_with(QuantError::default);
        let mut x = Vec::new();
        let mut codes = Vec::new();
        let stored_codes = stored_codes(q.kind, row.data, elems);
        if stored_codes.len() as u64 != elems || q.kind.bytes(elems) != row.data.len() as u64 {
            return check.problems.push(format!(
                "a row of {} bytes does not hold whole {} codes",
                row.data.len(),
                q.kind.as_str()
            ));
        }
        // The padding of a last int2 byte is zero, as the conversion writes it.
        let used = (elems % q.kind.per_byte()) as u32 * q.kind.bits();
        if used > 0 && row.data.last().is_some_and(|&b| b & (0xff >> used) != 0) {
            check.value_mismatches += 1;
        }
        let pieces = src
            .chunks(unit as usize * ss)
            .zip(stored_codes.chunks(unit as usize));
        for (u, (s, stored)) in pieces.enumerate() {
            codes.clear();
            codes.resize(stored.len(), 0);
            let how = (q.kind, scheme);
            let Ok((scale, zp)) = quantize_unit(how, st.dtype, s, &mut x, &mut codes, err) else {
                check.value_mismatches += stored.len() as u64;
                continue;
            };
            check.value_mismatches +=
                codes.iter().zip(stored).filter(|(a, b)| a != b).count() as u64;
            if scale.to_bits() != scales[u].to_bits() || zp.to_bits() != zps[u].to_bits() {
                check.value_mismatches += 1;
            }
        }
    }
}

/// A tensor's verdict so far, and the `(chunk offset, length)` of every row seen.
type Tally = (TensorCheck, Vec<(u64, u64)>);

/// Compares a row's own cells (name, shape, dtype, count) with the footer index.
fn check_description(check: &mut TensorCheck, t: &TensorInfo, row: &Row) {
    let Some(d) = &row.described else { return };
    let r = row.row;
    if d.name != t.name {
        check.problems.push(format!(
            "row {r}: layer_name `{}` differs from the index's",
            sanitize(d.name)
        ));
    }
    let shape_ok = d.shape.len() == t.shape.len()
        && d.shape
            .iter()
            .zip(&t.shape)
            .all(|(&a, &b)| u64::try_from(a) == Ok(b));
    if !shape_ok {
        check.problems.push(format!(
            "row {r}: shape {:?} differs from the index's {:?}",
            d.shape, t.shape
        ));
    }
    // A quantized row's `dtype` names the original (source) dtype.
    let want = match (&t.quant, &t.source_dtype) {
        (Some(_), Some(src)) => Dtype::from_safetensors(src).map(|d| d.torch_name()),
        // A V2 file without our index does not say what the original dtype was.
        (Some(_), None) => None,
        (None, _) => Some(t.dtype.torch_name()),
    };
    if want.is_some_and(|w| w != d.dtype) {
        check.problems.push(format!(
            "row {r}: dtype `{}` differs from the index's",
            sanitize(d.dtype)
        ));
    }
    if let Some(n) = d
        .num_params
        .filter(|&n| u64::try_from(n) != Ok(t.num_params))
    {
        check.problems.push(format!(
            "row {r}: num_params {n} differs from the index's {}",
            t.num_params
        ));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The source a file is verified against, indexed by tensor name.
struct Against<'a> {
    src: &'a Source,
    by_name: HashMap<&'a str, Logical<'a>>,
    /// The cast policy the file records (none for the seed's files).
    policy: Option<TargetDtype>,
    /// The quantization scheme a V2 file records.
    scheme: Option<QuantScheme>,
    /// The tensors the file says were carried from their own codes.
    carried: std::collections::HashSet<String>,
}

impl<'a> Against<'a> {
    /// The source `src` indexed by name, as the conversion of `wf` read it: a
    /// pre-quantized source dequantized, unless the file says its tensors were kept as
    /// stored.
    fn new(src: &'a Source, wf: &WeightFile) -> Self {
        let kept = wf
            .metadata()
            .and_then(|m| m.pointer("/source_quantization/kept_quantized")?.as_bool())
            .unwrap_or(false);
        Against {
            src,
            by_name: src
                .logical(!kept)
                .0
                .into_iter()
                .map(|t| (t.info.name.as_str(), t))
                .collect(),
            policy: wf.cast_policy(),
            scheme: wf.quant_scheme(),
            carried: wf
                .metadata()
                .and_then(|m| m.pointer("/quantization/carried")?.as_array().cloned())
                .unwrap_or_default()
                .iter()
                .filter_map(|v| Some(v.as_str()?.to_string()))
                .collect(),
        }
    }

    /// Source bytes of elements `[first, first + n)`: stored, or dequantized f32.
    fn elements<'b>(
        &'b self,
        src: &Logical,
        first: u64,
        n: u64,
        scratch: &'b mut Vec<u8>,
        values: &'b mut Vec<f32>,
    ) -> Result<&'b [u8]> {
        let of = Stored {
            shard: src.at.shard,
            info: src.info,
            dq: src.dequant,
        };
        tensor_elements(self.src, of, first, n, scratch, values)
    }

    /// Compares one stored row with what the cast policy makes of the source's bytes.
    fn check_row(&self, check: &mut TensorCheck, t: &TensorInfo, row: &Row) {
        let sname = t.source.as_deref().unwrap_or(&t.name);
        let Some(src) = self.by_name.get(sname) else {
            return check
                .problems
                .push(format!("source has no tensor `{}`", sanitize(sname)));
        };
        let st = src.info;
        if let Some(q) = t.quant {
            if let (true, Some(d)) = (self.carried.contains(&t.name), src.dequant) {
                return self.check_carried_row(check, t, (q, d), row);
            }
            return self.check_quantized_row(check, t, q, src, row);
        }
        let expect = match (self.policy, src.dequant) {
            (None, _) => t.dtype,
            (Some(TargetDtype::Keep), Some(d)) => d.compute,
            (Some(p), _) => p.output_for(st.dtype),
        };
        if expect != t.dtype {
            return check.problems.push(format!(
                "stored as {} but the cast policy gives {}",
                t.dtype.torch_name(),
                expect.torch_name()
            ));
        }
        if st.shape != t.shape {
            return check.problems.push(format!(
                "shape {:?} differs from the source's {:?}",
                t.shape, st.shape
            ));
        }
        let os = t.dtype.size() as u64;
        let elems = row.data.len() as u64 / os;
        // The stored row must lie inside the source tensor (it may not, for a file
        // checked against the wrong source).
        let first = row.offset / os;
        if first.checked_add(elems).is_none_or(|end| end > st.numel) {
            return check.problems.push(format!(
                "a row at byte {} holds more than the source's {} elements",
                row.offset, st.numel
            ));
        }
        let (mut scratch, mut values) = (Vec::new(), Vec::new());
        match self.elements(src, first, elems, &mut scratch, &mut values) {
            Ok(sb) => compare(check, st.dtype, t.dtype, sb, row.data),
            Err(e) => check.problems.push(e.to_string()),
        }
    }
}
