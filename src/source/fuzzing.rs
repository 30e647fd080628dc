//! Entry points for the fuzz targets (`crate::internals`): the pickle reader, the
//! PyTorch checkpoint reader and the zip directory reader, each on raw bytes.

use std::path::Path;

/// Loads `data` as a pickle: the number of nodes of the tree it builds, or the error.
pub(crate) fn pickle_load(data: &[u8]) -> Result<usize, String> {
    super::pickle::load(data, 0)
        .map(|(t, _, _)| t.len())
        .map_err(|e| format!("{e:?}"))
}

/// Reads `data` as a PyTorch checkpoint: each tensor's name, elements, offset and
/// length.
pub(crate) fn torch_tensors(data: &[u8]) -> crate::Result<Vec<(String, u64, u64, u64)>> {
    let c = super::torch::read(Path::new("fuzz.bin"), data)?;
    Ok(c.tensors
        .into_iter()
        .map(|t| (t.name, t.numel, t.offset, t.len))
        .collect())
}

/// Reads `data` as a zip archive: each stored entry's name and data range.
pub(crate) fn zip_entries(data: &[u8]) -> Result<Vec<(String, u64, u64)>, String> {
    let a = super::zip::Archive::read(data)?;
    a.entries
        .iter()
        .filter(|e| e.method == 0)
        .map(|e| super::zip::Archive::data_range(data, e).map(|(s, l)| (e.name.clone(), s, l)))
        .collect()
}
