//! Parsing and validating one safetensors header.
//!
//! Checks run in a fixed order, each before anything is allocated from the numbers it
//! checks: length prefix, header bytes (UTF-8, no NUL, JSON), each entry (dtype, shape,
//! size, offsets), then coverage of the data section (sorted, no overlap, no gap, no
//! trailing bytes).

use std::collections::HashSet;
use std::fmt;
use std::path::Path;

use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

use crate::dtype::Dtype;
use crate::error::{Error, Result};

/// The default cap on a header's length, the safetensors crate's own limit.
pub const DEFAULT_MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor of a validated safetensors file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Name as stored.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions, outermost first; empty for a scalar.
    pub shape: Vec<u64>,
    /// Number of elements (product of `shape`, 1 for a scalar).
    pub numel: u64,
    /// Absolute byte offset of the first element inside the file.
    pub offset: u64,
    /// Byte length (for a strided view: of the storage range it spans).
    pub len: u64,
    /// `None` for a tensor stored contiguously in row-major order at `offset`; for a
    /// view (a transposed weight, a strided slice of a PyTorch storage) its strides in
    /// elements, from the element at `offset`.
    pub strides: Option<Vec<u64>>,
}

/// A validated header: tensors in file (offset) order and the `__metadata__` map.
#[derive(Debug, Clone)]
pub struct Header {
    /// Length of the JSON header (without the 8-byte prefix).
    pub header_len: u64,
    /// Tensors sorted by offset.
    pub tensors: Vec<TensorInfo>,
    /// The string map under `__metadata__`, in file order.
    pub metadata: Vec<(String, String)>,
}

#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

#[derive(Default)]
struct RawHeader {
    entries: Vec<(String, RawEntry)>,
    metadata: Vec<(String, String)>,
    duplicate: Option<String>,
    bad_metadata: bool,
}

impl<'de> Deserialize<'de> for RawHeader {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawHeader;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object mapping tensor names to {dtype, shape, data_offsets}")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<RawHeader, A::Error> {
                let mut out = RawHeader::default();
                let mut seen = HashSet::new();
                let mut seen_metadata = false;
                while let Some(key) = map.next_key::<String>()? {
                    if key == "__metadata__" {
                        let v: serde_json::Value = map.next_value()?;
                        if seen_metadata && out.duplicate.is_none() {
                            out.duplicate = Some(key);
                            continue;
                        }
                        seen_metadata = true;
                        match v {
                            serde_json::Value::Object(m) => {
                                for (k, v) in m {
                                    match v {
                                        serde_json::Value::String(s) => out.metadata.push((k, s)),
                                        _ => out.bad_metadata = true,
                                    }
                                }
                            }
                            serde_json::Value::Null => {}
                            _ => out.bad_metadata = true,
                        }
                    } else if seen.contains(&key) {
                        let _: IgnoredAny = map.next_value()?;
                        if out.duplicate.is_none() {
                            out.duplicate = Some(key);
                        }
                    } else {
                        let entry: RawEntry = map.next_value()?;
                        seen.insert(key.clone());
                        out.entries.push((key, entry));
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}

/// Byte position (from the start of the header JSON) of serde_json's line/column.
fn json_position(text: &str, line: usize, column: usize) -> u64 {
    let mut start = 0usize;
    for _ in 1..line {
        match text.get(start..).and_then(|t| t.find('\n')) {
            Some(i) => start += i + 1,
            None => break,
        }
    }
    (start + column.saturating_sub(1)) as u64
}

/// Reads the 8-byte prefix and checks it against the file length and the cap.
/// Returns the header length.
pub fn check_prefix(path: &Path, prefix: Option<[u8; 8]>, file_len: u64, cap: u64) -> Result<u64> {
    let prefix = match prefix {
        Some(p) if file_len >= 8 => p,
        _ => {
            return Err(Error::HeaderTooSmall {
                path: path.to_path_buf(),
                len: file_len,
            })
        }
    };
    let n = u64::from_le_bytes(prefix);
    if n > cap {
        return Err(Error::HeaderTooLarge {
            path: path.to_path_buf(),
            claimed: n,
            cap,
        });
    }
    match n.checked_add(8) {
        Some(end) if end <= file_len => Ok(n),
        _ => Err(Error::HeaderPastEnd {
            path: path.to_path_buf(),
            claimed: n,
            file_len,
        }),
    }
}

/// Parses and validates header bytes (the `n` bytes after the prefix) of a file of
/// `file_len` bytes.
///
/// # Errors
///
/// One error per broken rule, in the order the module docs give, naming the file and
/// the tensor where there is one.
pub fn parse_header(path: &Path, bytes: &[u8], file_len: u64) -> Result<Header> {
    let header_len = bytes.len() as u64;
    let invalid = |position: u64, reason: String| Error::InvalidHeader {
        path: path.to_path_buf(),
        position: 8 + position,
        reason,
    };
    let text = std::str::from_utf8(bytes)
        .map_err(|e| invalid(e.valid_up_to() as u64, "header is not valid UTF-8".into()))?;
    if let Some(i) = text.find('\0') {
        return Err(invalid(
            i as u64,
            "NUL byte in header (only JSON whitespace may pad it)".into(),
        ));
    }
    let raw: RawHeader = serde_json::from_str(text).map_err(|e| {
        invalid(
            json_position(text, e.line(), e.column()),
            format!("not a safetensors JSON header: {e}"),
        )
    })?;
    if let Some(tensor) = raw.duplicate {
        return Err(Error::DuplicateTensor {
            path: path.to_path_buf(),
            tensor,
            other: None,
        });
    }
    if raw.bad_metadata {
        return Err(invalid(0, "`__metadata__` is not a map of strings".into()));
    }
    let data_start = 8 + header_len;
    let data_len = file_len - data_start; // check_prefix guaranteed data_start <= file_len
    let mut tensors = Vec::with_capacity(raw.entries.len());
    for (name, e) in raw.entries {
        let dtype = match Dtype::from_safetensors(&e.dtype) {
            Some(d) => d,
            None => {
                return Err(Error::UnknownDtype {
                    path: path.to_path_buf(),
                    tensor: name,
                    dtype: e.dtype,
                })
            }
        };
        let overflow = || Error::ShapeOverflow {
            path: path.to_path_buf(),
            tensor: name.clone(),
        };
        let numel = e
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(overflow)?;
        // Sub-byte dtypes (F4, F6): the bits must make whole bytes.
        let size = match dtype.byte_len(numel) {
            Some(s) => s,
            None if numel.checked_mul(dtype.bits() as u64).is_some() => {
                return Err(Error::PartialBytes {
                    path: path.to_path_buf(),
                    tensor: name,
                    dtype: e.dtype,
                    numel,
                })
            }
            None => return Err(overflow()),
        };
        let (begin, end) = e.data_offsets;
        if begin > end || end > data_len {
            return Err(Error::InvalidOffset {
                path: path.to_path_buf(),
                tensor: name,
                begin,
                end,
                data_len,
            });
        }
        if end - begin != size {
            return Err(Error::SizeMismatch {
                path: path.to_path_buf(),
                tensor: name,
                dtype: dtype.to_string(),
                shape: e.shape,
                expected: size,
                actual: end - begin,
            });
        }
        tensors.push(TensorInfo {
            name,
            dtype,
            shape: e.shape,
            numel,
            offset: data_start + begin,
            len: size,
            strides: None,
        });
    }
    // Offset order; zero-length tensors first at equal offsets so they never "overlap".
    tensors.sort_by_key(|t| (t.offset, t.len));
    let mut covered = data_start;
    let mut last: Option<&TensorInfo> = None;
    for t in &tensors {
        if t.offset < covered {
            return Err(Error::OverlappingTensors {
                path: path.to_path_buf(),
                first: last.map(|l| l.name.clone()).unwrap_or_default(),
                second: t.name.clone(),
            });
        }
        if t.offset > covered {
            return Err(Error::Coverage {
                path: path.to_path_buf(),
                reason: format!(
                    "gap of {} bytes before tensor `{}`",
                    t.offset - covered,
                    crate::error::sanitize(&t.name)
                ),
            });
        }
        covered = t.offset + t.len;
        if t.len > 0 {
            last = Some(t);
        }
    }
    if covered != file_len {
        return Err(Error::Coverage {
            path: path.to_path_buf(),
            reason: format!(
                "{} trailing bytes after the last tensor",
                file_len - covered
            ),
        });
    }
    Ok(Header {
        header_len,
        tensors,
        metadata: raw.metadata,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data_len: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend(std::iter::repeat_n(0u8, data_len));
        v
    }

    fn parse(bytes: &[u8]) -> Result<Header> {
        let p = Path::new("x.safetensors");
        let n = check_prefix(
            p,
            bytes.get(..8).and_then(|b| b.try_into().ok()),
            bytes.len() as u64,
            DEFAULT_MAX_HEADER_BYTES,
        )?;
        parse_header(p, &bytes[8..8 + n as usize], bytes.len() as u64)
    }

    fn err(bytes: &[u8]) -> String {
        parse(bytes).unwrap_err().to_string()
    }

    #[test]
    fn valid_header_in_offset_order() {
        let h = parse(&file(
            r#"{"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]},"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"__metadata__":{"format":"pt"}}  "#,
            12,
        ))
        .unwrap();
        assert_eq!(
            h.tensors
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(h.tensors[1].offset, 8 + h.header_len + 4);
        assert_eq!(h.metadata, vec![("format".to_string(), "pt".to_string())]);
    }

    #[test]
    fn header_too_small() {
        assert_eq!(err(&[1, 2, 3]), "x.safetensors: header too small: the file has 3 bytes, a safetensors file needs at least 8");
    }

    #[test]
    fn header_too_large() {
        let mut v = (200_000_000u64).to_le_bytes().to_vec();
        v.extend_from_slice(b"{}");
        assert_eq!(err(&v), "x.safetensors: header too large: the length prefix claims 200000000 bytes, the cap is 100000000 bytes");
    }

    #[test]
    fn header_past_end() {
        let mut v = (50u64).to_le_bytes().to_vec();
        v.extend_from_slice(b"{}");
        assert_eq!(
            err(&v),
            "x.safetensors: header length 50 runs past the end of the file (10 bytes)"
        );
    }

    #[test]
    fn not_utf8_not_json_nul() {
        let mut v = file(r#"{"a":1}"#, 0);
        v[9] = 0xff;
        assert_eq!(
            err(&v),
            "x.safetensors: invalid header at byte 9: header is not valid UTF-8"
        );
        assert_eq!(err(&file("{}\0\0", 0)), "x.safetensors: invalid header at byte 10: NUL byte in header (only JSON whitespace may pad it)");
        assert!(err(&file("{]", 0))
            .starts_with("x.safetensors: invalid header at byte 9: not a safetensors JSON header"));
    }

    #[test]
    fn duplicate_and_metadata() {
        let h = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        assert_eq!(err(&file(h, 1)), "x.safetensors: duplicate tensor `a`");
        assert_eq!(
            err(&file(r#"{"__metadata__":{"a":1}}"#, 0)),
            "x.safetensors: invalid header at byte 8: `__metadata__` is not a map of strings"
        );
    }

    #[test]
    fn dtype_shape_offsets() {
        assert_eq!(
            err(&file(
                r#"{"a":{"dtype":"Q9","shape":[1],"data_offsets":[0,1]}}"#,
                1
            )),
            "x.safetensors: tensor `a`: unknown dtype `Q9`"
        );
        // Sub-byte dtypes: whole bytes from the bit count, or refused.
        let h = parse(&file(
            r#"{"a":{"dtype":"F4","shape":[2],"data_offsets":[0,1]},"b":{"dtype":"F6_E2M3","shape":[4],"data_offsets":[1,4]}}"#,
            4,
        ))
        .unwrap();
        assert_eq!((h.tensors[0].dtype, h.tensors[0].len), (Dtype::F4, 1));
        assert_eq!((h.tensors[1].dtype, h.tensors[1].len), (Dtype::F6E2M3, 3));
        assert_eq!(
            err(&file(
                r#"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#,
                2
            )),
            "x.safetensors: tensor `a`: 3 elements of F4 are not a whole number of bytes"
        );
        assert_eq!(
            err(&file(
                r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,1]}}"#,
                1
            )),
            "x.safetensors: tensor `a`: shape × dtype size overflows"
        );
        assert_eq!(
            err(&file(
                r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,0]}}"#,
                1
            )),
            "x.safetensors: tensor `a`: invalid offsets [1, 0) for a data section of 1 bytes"
        );
        assert_eq!(
            err(&file(
                r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,9]}}"#,
                1
            )),
            "x.safetensors: tensor `a`: invalid offsets [0, 9) for a data section of 1 bytes"
        );
        assert_eq!(
            err(&file(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
                4
            )),
            "x.safetensors: tensor `a`: F32 [2] needs 8 bytes but its offsets give 4"
        );
    }

    #[test]
    fn coverage() {
        let overlap = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}"#;
        assert_eq!(
            err(&file(overlap, 3)),
            "x.safetensors: tensors `a` and `b` overlap"
        );
        let gap = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
        assert_eq!(
            err(&file(gap, 2)),
            "x.safetensors: data section not covered exactly: gap of 1 bytes before tensor `a`"
        );
        let trailing = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        assert_eq!(err(&file(trailing, 3)), "x.safetensors: data section not covered exactly: 2 trailing bytes after the last tensor");
    }

    #[test]
    fn zero_size_and_scalars() {
        let h = parse(&file(
            r#"{"z":{"dtype":"F32","shape":[2,0],"data_offsets":[0,0]},"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}"#,
            4,
        ))
        .unwrap();
        assert_eq!(h.tensors.len(), 2);
        assert_eq!(h.tensors[0].numel, 0);
        assert_eq!(h.tensors[1].numel, 1);
    }
}
