//! One tensor read whole: [`WeightFile::tensor`] reassembles its rows (a split tensor
//! spans several) with its scales and zero points, and [`Tensor::to_f32`] widens its
//! elements or dequantizes its int8 codes; [`WeightFile::for_each_f32`] does it for
//! every tensor, row groups in parallel.

use super::rows::Row;
use super::{TensorInfo, WeightFile};
use std::borrow::Cow;

use crate::cast::{dequantize, unpack_int2};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::plan::QuantType;

/// One tensor's data.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions.
    pub shape: Vec<u64>,
    /// Little-endian element bytes, row-major (int8 codes for a quantized tensor, int2
    /// codes packed four to a byte).
    pub data: Vec<u8>,
    /// For a quantized tensor (V2): its scales and zero points, over all its rows.
    pub quant: Option<QuantData>,
}

/// The scales of a quantized tensor as stored: `(q - zero_point) * scale` is the value.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantData {
    /// int8 (one code per byte of `data`) or int2 (four per byte, the first element in
    /// the two highest bits, stored as `q + 2`).
    pub kind: QuantType,
    /// 0 per-channel along axis 0, -1 per-group.
    pub axis: i32,
    /// 0 per-channel, else elements per group of the flattened tensor.
    pub group_size: u64,
    /// One per channel or group.
    pub scales: Vec<f32>,
    /// One per channel or group (integer values; 0 when symmetric).
    pub zero_points: Vec<f32>,
}

impl Tensor {
    /// The elements as f32: floats widened (or narrowed from f64), integers converted,
    /// int8 or int2 codes of a quantized tensor dequantized with the seed loader's formula,
    /// `(q - zero_point) * scale` in f32.
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.quant {
            Some(q) => {
                let info = crate::format::QuantInfo {
                    kind: q.kind,
                    axis: q.axis,
                    group_size: q.group_size,
                    scales: q.scales.len() as u64,
                };
                let unit = info.unit(&self.shape);
                let n: u64 = self.shape.iter().product();
                let codes = codes(q.kind, &self.data, n);
                dequantize_units(&codes, unit, &q.scales, &q.zero_points)
            }
            None => to_f32(self.dtype, &self.data),
        }
    }
}

/// The first `n` codes of quantized `data` as signed bytes: int8 as stored, int2
/// unpacked (the two highest bits of a byte first).
pub(crate) fn codes(kind: QuantType, data: &[u8], n: u64) -> Cow<'_, [u8]> {
    match kind {
        QuantType::Int8 => Cow::Borrowed(data),
        QuantType::Int2 => {
            let mut out = Vec::with_capacity(n.min(data.len() as u64 * 4) as usize);
            unpack_int2(data, n as usize, &mut out);
            Cow::Owned(out)
        }
    }
}

/// Elements of a quantized row of `data` bytes starting at byte `offset` of a tensor
/// of `numel` elements (an int2 row but the last holds four per byte).
pub(crate) fn row_elems(kind: QuantType, numel: u64, offset: u64, data: usize) -> u64 {
    let per = kind.per_byte();
    (data as u64 * per).min(numel.saturating_sub(offset.saturating_mul(per)))
}

/// Dequantizes `codes` whose consecutive runs of `unit` elements share a scale and a
/// zero point. Callers check there is one of each per unit.
pub(crate) fn dequantize_units(codes: &[u8], unit: u64, scales: &[f32], zps: &[f32]) -> Vec<f32> {
    let unit = unit.max(1) as usize;
    codes
        .chunks(unit)
        .zip(scales.iter().zip(zps))
        .flat_map(|(c, (&s, &z))| c.iter().map(move |&q| dequantize(q, s, z)))
        .collect()
}

/// Converts element bytes of `dtype` to f32.
pub(crate) fn to_f32(dtype: Dtype, data: &[u8]) -> Vec<f32> {
    if dtype.is_castable_float() {
        let mut out = Vec::with_capacity(data.len() / dtype.size());
        crate::cast::widen(dtype, data, &mut out);
        return out;
    }
    let s = dtype.size();
    data.chunks_exact(s)
        .map(|b| match dtype {
            Dtype::I64 => i64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32,
            Dtype::U64 => u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32,
            Dtype::I32 => i32::from_le_bytes(b.try_into().unwrap_or([0; 4])) as f32,
            Dtype::U32 => u32::from_le_bytes(b.try_into().unwrap_or([0; 4])) as f32,
            Dtype::I16 => i16::from_le_bytes(b.try_into().unwrap_or([0; 2])) as f32,
            Dtype::U16 => u16::from_le_bytes(b.try_into().unwrap_or([0; 2])) as f32,
            Dtype::I8 => b[0] as i8 as f32,
            Dtype::U8 | Dtype::Bool => b[0] as f32,
            _ => f32::NAN,
        })
        .collect()
}

/// Appends f32 little-endian values (a partial trailing value is ignored: counts are
/// checked by the caller).
pub(crate) fn f32s_into(bytes: &[u8], out: &mut Vec<f32>) {
    out.extend(
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
    );
}

impl WeightFile {
    /// Reads one tensor by name, reassembling split rows.
    ///
    /// # Errors
    ///
    /// `TensorNotFound`; `CorruptWeights` naming the tensor when its rows do not add up
    /// to its shape.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let i = *self
            .by_name
            .get(name)
            .ok_or_else(|| Error::TensorNotFound {
                path: self.path.clone(),
                tensor: name.to_string(),
            })?;
        let t = &self.tensors[i];
        let cap = usize::try_from(t.bytes).map_err(|_| {
            Error::corrupt(&self.path, Some(name), "tensor too large for this machine")
        })?;
        let mut data = Vec::with_capacity(cap.min(1 << 30));
        let (mut scales, mut zero_points) = (Vec::new(), Vec::new());
        self.read_rows(t.row, t.rows, Some(name), false, &mut |c| {
            if (data.len() + c.data.len()) as u64 > t.bytes {
                return Err(Error::corrupt(
                    &self.path,
                    Some(name),
                    "rows hold more bytes than the shape needs",
                ));
            }
            data.extend_from_slice(c.data);
            if t.quant.is_some() {
                f32s_into(c.scales, &mut scales);
                f32s_into(c.zero_points, &mut zero_points);
            }
            Ok(())
        })?;
        if data.len() as u64 != t.bytes {
            return Err(Error::corrupt(
                &self.path,
                Some(name),
                format!(
                    "rows hold {} bytes, the shape needs {}",
                    data.len(),
                    t.bytes
                ),
            ));
        }
        let quant = match t.quant {
            Some(q) => {
                if scales.len() as u64 != q.scales || zero_points.len() as u64 != q.scales {
                    return Err(Error::corrupt(
                        &self.path,
                        Some(name),
                        format!(
                            "rows hold {} scales and {} zero points, the tensor needs {}",
                            scales.len(),
                            zero_points.len(),
                            q.scales
                        ),
                    ));
                }
                Some(QuantData {
                    kind: q.kind,
                    axis: q.axis,
                    group_size: q.group_size,
                    scales,
                    zero_points,
                })
            }
            None => None,
        };
        Ok(Tensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            data,
            quant,
        })
    }

    /// Reads one tensor as f32.
    ///
    /// # Errors
    ///
    /// As [`WeightFile::tensor`].
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        self.tensor(name).map(|t| t.to_f32())
    }

    /// Reads every tensor as f32, row groups in parallel, calling `f` once per tensor
    /// (from several threads).
    ///
    /// # Errors
    ///
    /// The first read error.
    pub fn for_each_f32(&self, f: &(dyn Fn(&TensorInfo, Vec<f32>) + Sync)) -> Result<()> {
        use rayon::prelude::*;
        (0..self.num_row_groups())
            .into_par_iter()
            .try_for_each(|rg| {
                let mut pending: Option<(usize, Vec<u8>)> = None;
                let first = self.rg_first_row[rg];
                let last = self.rg_first_row[rg + 1];
                self.scan_row_group(rg, false, &mut |r: Row| {
                    let t = &self.tensors[r.tensor];
                    if t.row < first || t.row + t.rows > last || t.quant.is_some() {
                        // Spans row groups, or needs its scales: read whole below.
                        return Ok(());
                    }
                    if t.rows == 1 {
                        f(t, to_f32(t.dtype, r.data));
                        return Ok(());
                    }
                    if !matches!(&pending, Some((i, _)) if *i == r.tensor) {
                        pending =
                            Some((r.tensor, Vec::with_capacity(t.bytes.min(1 << 30) as usize)));
                    }
                    if let Some((_, buf)) = &mut pending {
                        buf.extend_from_slice(r.data);
                    }
                    if r.row + 1 == t.row + t.rows {
                        if let Some((_, b)) = pending.take() {
                            f(t, to_f32(t.dtype, &b));
                        }
                    }
                    Ok(())
                })
            })?;
        for t in &self.tensors {
            let (Some((a, _)), Some((b, _))) =
                (self.locate(t.row), self.locate(t.row + t.rows - 1))
            else {
                continue;
            };
            if a != b || t.quant.is_some() {
                f(t, self.tensor_f32(&t.name)?);
            }
        }
        Ok(())
    }
}
