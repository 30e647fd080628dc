//! `export`: a weight file back to safetensors, streaming row group by row group, so
//! memory stays at one row group whatever the file size.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::rows::Row;
use super::tensor::{codes, dequantize_units, f32s_into, row_elems};
use super::{TensorInfo, WeightFile};
use crate::cast::cast_into;
use crate::dtype::{Dtype, TargetDtype};
use crate::error::{Error, Result};
use crate::io::temp::TempPath;

/// Options of [`export`]. The default writes every tensor as stored.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// What floating-point tensors become; `Keep` (default) writes them as stored,
    /// `F32` widens f16/bf16 back.
    pub dtype: TargetDtype,
    /// Replace an existing output file.
    pub force: bool,
    /// Record `exported_by: modelconv <version>` in the header's `__metadata__`. Off
    /// by default, so that exporting a `keep` conversion gives the source file byte for
    /// byte.
    pub stamp: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            dtype: TargetDtype::Keep,
            force: false,
            stamp: false,
        }
    }
}

/// What [`export`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    /// The safetensors file.
    pub path: PathBuf,
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of the file.
    pub bytes: u64,
}

/// Writes `weights` (a weight file or its directory) as a safetensors file at `out`.
///
/// # Errors
///
/// Reading errors naming the tensor, `OutputExists` without `force`, I/O errors naming
/// the output; on error no output and no temp file is left.
///
/// # Memory
///
/// One row group of the weight file at a time, plus its cast copy.
pub fn export(
    weights: impl AsRef<Path>,
    out: impl AsRef<Path>,
    opts: &ExportOptions,
) -> Result<ExportReport> {
    let wf = WeightFile::open(weights)?;
    let out = out.as_ref();
    if out.exists() && !opts.force {
        return Err(Error::OutputExists {
            path: out.to_path_buf(),
        });
    }
    if let (Ok(a), Ok(b)) = (std::fs::canonicalize(out), std::fs::canonicalize(wf.path())) {
        if a == b {
            return Err(Error::OutputIsInput {
                path: out.to_path_buf(),
            });
        }
    }
    let (text, data_len) = header(&wf, opts)?;
    let tmp = TempPath::beside(out);
    let file = tmp.create_file()?;
    let werr = |e: std::io::Error| Error::io("write", tmp.path(), e);
    let mut w = BufWriter::with_capacity(8 << 20, file);
    w.write_all(&(text.len() as u64).to_le_bytes())
        .map_err(werr)?;
    w.write_all(text.as_bytes()).map_err(werr)?;
    let mut written = 0u64;
    let mut scratch = Vec::new();
    for rg in 0..wf.num_row_groups() {
        wf.scan_row_group(rg, false, &mut |r: Row| {
            let t = &wf.tensors()[r.tensor];
            let d = out_dtype(opts, t);
            let bytes: &[u8] = if let Some(q) = t.quant {
                // Dequantized (the row holds whole units, each with its scale), then
                // cast to the export dtype.
                let (mut scales, mut zps) = (Vec::new(), Vec::new());
                f32s_into(r.scales, &mut scales);
                f32s_into(r.zero_points, &mut zps);
                let unit = q.unit(&t.shape);
                let n = row_elems(q.kind, t.num_params, r.offset, r.data.len());
                let codes = codes(q.kind, r.data, n);
                if unit == 0
                    || (codes.len() as u64).div_ceil(unit) != scales.len() as u64
                    || zps.len() != scales.len()
                {
                    return Err(Error::corrupt(
                        wf.path(),
                        Some(&t.name),
                        "a row's scales do not match its codes",
                    ));
                }
                let values = dequantize_units(&codes, unit, &scales, &zps);
                let f: &[u8] = bytemuck::cast_slice(&values);
                scratch.resize(values.len() * d.size(), 0);
                cast_into(Dtype::F32, d, f, &mut scratch)
                    .ok_or_else(|| Error::internal("dequantized row length"))?;
                &scratch
            } else if d == t.dtype {
                r.data
            } else {
                scratch.resize(r.data.len() / t.dtype.size() * d.size(), 0);
                cast_into(t.dtype, d, r.data, &mut scratch).ok_or_else(|| {
                    Error::corrupt(
                        wf.path(),
                        Some(&t.name),
                        "row is not a whole number of elements",
                    )
                })?;
                &scratch
            };
            written += bytes.len() as u64;
            w.write_all(bytes).map_err(werr)
        })?;
    }
    if written != data_len {
        return Err(Error::corrupt(
            wf.path(),
            None,
            format!("rows hold {written} bytes, the shapes need {data_len}"),
        ));
    }
    let file = w
        .into_inner()
        .map_err(|e| Error::io("write", tmp.path(), e.into_error()))?;
    file.sync_all()
        .map_err(|e| Error::io("sync", tmp.path(), e))?;
    let bytes = 8 + text.len() as u64 + data_len;
    tmp.commit()?;
    Ok(ExportReport {
        path: out.to_path_buf(),
        tensors: wf.tensors().len(),
        bytes,
    })
}

/// The safetensors header of the exported file, padded to 8 bytes, and the length of
/// its data section: every tensor in row order, in the dtype `opts` asks for.
fn header(wf: &WeightFile, opts: &ExportOptions) -> Result<(String, u64)> {
    let mut header = serde_json::Map::new();
    let mut meta = serde_json::Map::new();
    meta.insert("format".into(), "pt".into());
    if opts.stamp {
        meta.insert(
            "exported_by".into(),
            format!("modelconv {}", env!("CARGO_PKG_VERSION")).into(),
        );
    }
    header.insert("__metadata__".into(), serde_json::Value::Object(meta));
    let mut offset = 0u64;
    for t in wf.tensors() {
        let d = out_dtype(opts, t);
        let end = t
            .num_params
            .checked_mul(d.size() as u64)
            .and_then(|len| offset.checked_add(len))
            .ok_or_else(|| Error::corrupt(wf.path(), Some(&t.name), "size overflows"))?;
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": d.safetensors_name(), "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut text = serde_json::to_string(&serde_json::Value::Object(header))
        .map_err(|e| Error::internal(format!("safetensors header: {e}")))?;
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    Ok((text, offset))
}

/// What a stored tensor becomes in the export: `Keep` writes it as stored, except a
/// quantized tensor, which is written dequantized as f32 (f16 or bf16 when asked).
fn out_dtype(opts: &ExportOptions, t: &TensorInfo) -> Dtype {
    match (opts.dtype, t.quant) {
        (TargetDtype::Keep, Some(_)) => Dtype::F32,
        (TargetDtype::Keep, None) => t.dtype,
        (target, Some(_)) => target.output_for(Dtype::F32),
        (target, None) => target.output_for(t.dtype),
    }
}
