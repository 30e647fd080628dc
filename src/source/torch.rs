//! PyTorch checkpoints (`pytorch_model.bin`, `.pt`, `.pth`), zip (torch ≥ 1.6) and
//! legacy (a stream of pickles followed by raw storages), read without running them:
//! the pickle goes through [`super::pickle`], and the inert tree it builds must have
//! the shape of a state dict (a dict of names to tensors rebuilt from storages). Every
//! storage is checked against the bytes present, every view against its storage, with
//! checked arithmetic; what passes becomes the same [`TensorInfo`] a safetensors header
//! gives, pointing into the mapped file (zero copy for contiguous tensors).

use std::collections::HashMap;
use std::path::Path;

use super::header::TensorInfo;
use super::pickle::{self, Callable, Id, Node, PickleError, Tree, MAX_RANK};
use super::zip::Archive;
use crate::dtype::Dtype;
use crate::error::{sanitize, Error, Result};

/// The legacy format's magic number, the first pickle of the file.
const LEGACY_MAGIC: u128 = 0x1950a86a20f9469cfc6c;
/// The legacy format's protocol version, the second pickle.
const LEGACY_PROTOCOL: i64 = 1001;
/// Longest storage key accepted (torch writes decimal numbers).
const MAX_KEY_LEN: usize = 1024;

/// What a PyTorch checkpoint holds: its tensors (in file order) and which of them are
/// the same view of the same storage as an earlier one (`(name, tied to)`).
#[derive(Debug)]
pub(crate) struct Checkpoint {
    pub(crate) tensors: Vec<TensorInfo>,
    pub(crate) ties: Vec<(String, String)>,
}

/// A storage: its element type and where its bytes are in the file.
#[derive(Debug, Clone, Copy)]
struct Storage {
    dtype: Dtype,
    /// Absolute offset of its first byte.
    start: u64,
    /// Elements.
    numel: u64,
}

/// One entry of the state dict, before its storage is located.
struct Raw {
    name: String,
    key: String,
    dtype: Dtype,
    /// Elements the persistent id declares for the storage.
    declared: u64,
    /// A legacy view: `(offset, size)` in elements inside the root storage.
    view: Option<(u64, u64)>,
    offset: u64,
    size: Vec<u64>,
    stride: Vec<u64>,
}

/// True when the file is a zip archive (torch ≥ 1.6) rather than the legacy format.
pub(crate) fn is_zip(b: &[u8]) -> bool {
    b.starts_with(b"PK\x03\x04") || b.starts_with(b"PK\x05\x06")
}

/// Reads a PyTorch checkpoint from its mapped bytes.
///
/// # Errors
///
/// `InvalidArchive` for a damaged zip or legacy layout, `ForbiddenGlobal`,
/// `PickledModule` and `Pickle` for the pickle, `NotAStateDict` when the tree is not
/// one, `TorchTensor` naming the tensor whose storage or view does not fit.
pub(crate) fn read(path: &Path, b: &[u8]) -> Result<Checkpoint> {
    let (raws, storages) = if is_zip(b) {
        read_zip(path, b)?
    } else {
        read_legacy(path, b)?
    };
    build(path, raws, &storages)
}

fn archive_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::InvalidArchive {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn pickle_err(path: &Path, part: &str, base: u64, e: PickleError) -> Error {
    let at = |p: u64| format!("byte {p} of {part}");
    match e {
        PickleError::Invalid { position, reason } => Error::Pickle {
            path: path.to_path_buf(),
            at: at(position - base),
            reason,
        },
        PickleError::Forbidden { position, global } => Error::ForbiddenGlobal {
            path: path.to_path_buf(),
            at: at(position - base),
            global,
        },
        PickleError::Module { global } => Error::PickledModule {
            path: path.to_path_buf(),
            class: global,
        },
    }
}

fn read_zip(path: &Path, b: &[u8]) -> Result<(Vec<Raw>, HashMap<String, Storage>)> {
    let archive = Archive::read(b).map_err(|r| archive_err(path, r))?;
    let mut pkls = archive
        .entries
        .iter()
        .filter(|e| e.name == "data.pkl" || e.name.ends_with("/data.pkl"));
    let pkl = pkls
        .next()
        .ok_or_else(|| archive_err(path, "no `data.pkl` entry"))?;
    if pkls.next().is_some() {
        return Err(archive_err(path, "more than one `data.pkl`"));
    }
    let prefix = &pkl.name[..pkl.name.len() - "data.pkl".len()];
    let slice = |e: &super::zip::Entry| -> Result<&[u8]> {
        let (start, len) = Archive::data_range(b, e).map_err(|r| archive_err(path, r))?;
        Ok(&b[start as usize..(start + len) as usize])
    };
    if let Some(order) = archive.entry(&format!("{prefix}byteorder")) {
        let order = slice(order)?;
        if order.trim_ascii() != b"little" {
            return Err(archive_err(
                path,
                format!(
                    "byte order `{}`: only little-endian checkpoints are read",
                    sanitize(&String::from_utf8_lossy(order))
                ),
            ));
        }
    }
    let pkl_bytes = slice(pkl)?;
    let (tree, root, _) =
        pickle::load(pkl_bytes, 0).map_err(|e| pickle_err(path, &pkl.name, 0, e))?;
    let raws = state_dict(path, &tree, root, false)?;
    let mut storages = HashMap::new();
    for r in &raws {
        if storages.contains_key(&r.key) {
            continue;
        }
        let name = format!("{prefix}data/{}", r.key);
        let entry = archive.entry(&name).ok_or_else(|| {
            archive_err(
                path,
                format!(
                    "tensor `{}`: no storage entry `{}`",
                    sanitize(&r.name),
                    sanitize(&name)
                ),
            )
        })?;
        let (start, len) = Archive::data_range(b, entry).map_err(|e| archive_err(path, e))?;
        let es = r.dtype.size() as u64;
        if r.declared.checked_mul(es) != Some(len) {
            return Err(tensor_err(
                path,
                &r.name,
                format!(
                    "storage `{}` holds {len} bytes, but declares {} elements of {} ({} bytes)",
                    sanitize(&r.key),
                    r.declared,
                    r.dtype,
                    r.declared.saturating_mul(es)
                ),
            ));
        }
        storages.insert(
            r.key.clone(),
            Storage {
                dtype: r.dtype,
                start,
                numel: r.declared,
            },
        );
    }
    Ok((raws, storages))
}

fn read_legacy(path: &Path, b: &[u8]) -> Result<(Vec<Raw>, HashMap<String, Storage>)> {
    let mut pos = 0usize;
    let mut next = |what: &str| -> Result<(Tree, Id)> {
        let (tree, root, end) = pickle::load(b, pos)
            .map_err(|e| pickle_err(path, &format!("the file ({what} pickle)"), 0, e))?;
        pos = end;
        Ok((tree, root))
    };
    let (t, magic) = next("first")?;
    let is_magic = match t.get(magic) {
        Node::BigInt(v) if v.len() <= 16 => {
            let mut w = [0u8; 16];
            w[..v.len()].copy_from_slice(v);
            u128::from_le_bytes(w) == LEGACY_MAGIC
        }
        _ => false,
    };
    if !is_magic {
        return Err(archive_err(
            path,
            "neither a zip archive nor a legacy PyTorch file (bad magic number)",
        ));
    }
    let (t, proto) = next("protocol")?;
    if t.get(proto) != &Node::Int(LEGACY_PROTOCOL) {
        return Err(archive_err(path, "unsupported legacy protocol version"));
    }
    let (t, info) = next("system information")?;
    let little = match t.get(info) {
        Node::Dict(d) => d.iter().any(|&(k, v)| {
            t.get(k) == &Node::Str("little_endian".into()) && t.get(v) == &Node::Bool(true)
        }),
        _ => false,
    };
    if !little {
        return Err(archive_err(
            path,
            "written on a big-endian machine; only little-endian checkpoints are read",
        ));
    }
    let (tree, root) = next("state dict")?;
    let raws = state_dict(path, &tree, root, true)?;
    let (t, keys) = next("storage keys")?;
    let storages = legacy_storages(path, b, pos as u64, &raws, &t, keys)?;
    if let Some(r) = raws.iter().find(|r| !storages.contains_key(&r.key)) {
        return Err(archive_err(
            path,
            format!(
                "tensor `{}`: storage `{}` is not in the file",
                sanitize(&r.name),
                sanitize(&r.key)
            ),
        ));
    }
    Ok((raws, storages))
}

/// The raw storages that follow a legacy file's pickles, in the order of the key list
/// `keys`: each an 8-byte element count, then its bytes. Checked against what the state
/// dict's persistent ids declare.
fn legacy_storages(
    path: &Path,
    b: &[u8],
    mut at: u64,
    raws: &[Raw],
    t: &Tree,
    keys: Id,
) -> Result<HashMap<String, Storage>> {
    let Node::List(keys) = t.get(keys) else {
        return Err(archive_err(path, "the storage key list is not a list"));
    };
    let mut declared: HashMap<&str, (Dtype, u64)> = HashMap::new();
    for r in raws {
        // A key declared twice differently is refused when the tensors are built.
        declared
            .entry(r.key.as_str())
            .or_insert((r.dtype, r.declared));
    }
    let cut = |key: &str| {
        archive_err(
            path,
            format!("storage `{}` is cut off (truncated file)", sanitize(key)),
        )
    };
    let mut storages = HashMap::new();
    for &k in keys {
        let Node::Str(key) = t.get(k) else {
            return Err(archive_err(path, "a storage key is not a string"));
        };
        let &(dtype, numel) = declared.get(key.as_str()).ok_or_else(|| {
            archive_err(
                path,
                format!(
                    "storage `{}` is listed but no tensor uses it",
                    sanitize(key)
                ),
            )
        })?;
        let start = at
            .checked_add(8)
            .filter(|&e| e <= b.len() as u64)
            .ok_or_else(|| cut(key))?;
        let mut count = [0u8; 8];
        count.copy_from_slice(&b[(start - 8) as usize..start as usize]);
        let count = u64::from_le_bytes(count);
        if count != numel {
            return Err(archive_err(
                path,
                format!(
                    "storage `{}` has {count} elements, its tensors declare {numel}",
                    sanitize(key)
                ),
            ));
        }
        let end = numel
            .checked_mul(dtype.size() as u64)
            .and_then(|n| start.checked_add(n))
            .filter(|&e| e <= b.len() as u64)
            .ok_or_else(|| cut(key))?;
        storages.insert(
            key.clone(),
            Storage {
                dtype,
                start,
                numel,
            },
        );
        at = end;
    }
    if at != b.len() as u64 {
        return Err(archive_err(
            path,
            format!("{} bytes after the last storage", b.len() as u64 - at),
        ));
    }
    Ok(storages)
}

fn not_state_dict(path: &Path, reason: impl Into<String>) -> Error {
    Error::NotAStateDict {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn tensor_err(path: &Path, tensor: &str, reason: impl Into<String>) -> Error {
    Error::TorchTensor {
        path: path.to_path_buf(),
        tensor: tensor.to_string(),
        reason: reason.into(),
    }
}

/// The state dict in `tree`: a dict of names to tensors, each resolved to its storage
/// key and view (nothing located yet).
fn state_dict(path: &Path, tree: &Tree, root: Id, legacy: bool) -> Result<Vec<Raw>> {
    let Node::Dict(items) = tree.get(root) else {
        return Err(not_state_dict(
            path,
            format!("the file holds {}, not a dict of tensors", tree.kind(root)),
        ));
    };
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(items.len());
    for &(k, v) in items {
        let Node::Str(name) = tree.get(k) else {
            return Err(not_state_dict(
                path,
                format!("a key is {}, not a name", tree.kind(k)),
            ));
        };
        let Node::Tensor {
            storage,
            offset,
            size,
            stride,
        } = *tree.get(v)
        else {
            let hint = match tree.get(v) {
                Node::Dict(_) => format!(
                    " (convert `checkpoint[\"{}\"]` saved on its own)",
                    sanitize(name)
                ),
                _ => String::new(),
            };
            return Err(not_state_dict(
                path,
                format!(
                    "`{}` is {}, not a tensor{hint}",
                    sanitize(name),
                    tree.kind(v)
                ),
            ));
        };
        if !seen.insert(name.clone()) {
            return Err(Error::DuplicateTensor {
                path: path.to_path_buf(),
                tensor: name.clone(),
                other: None,
            });
        }
        let bad = |what: &str| tensor_err(path, name, what.to_string());
        let (key, dtype, declared, view) =
            persistent_storage(tree, storage, legacy).map_err(|r| bad(&r))?;
        let offset = uint(tree, offset)
            .ok_or_else(|| bad("storage offset is not a non-negative integer"))?;
        let size = uints(tree, size).ok_or_else(|| {
            bad(&format!(
                "size is not a tuple of at most {MAX_RANK} non-negative integers"
            ))
        })?;
        let stride = uints(tree, stride).ok_or_else(|| {
            bad(&format!(
                "stride is not a tuple of at most {MAX_RANK} non-negative integers"
            ))
        })?;
        if size.len() != stride.len() {
            return Err(bad("size and stride have different lengths"));
        }
        out.push(Raw {
            name: name.clone(),
            key,
            dtype,
            declared,
            view,
            offset,
            size,
            stride,
        });
    }
    Ok(out)
}

/// `('storage', <class>, key, location, numel[, view])` → key, dtype, numel, view.
#[allow(clippy::type_complexity)]
fn persistent_storage(
    tree: &Tree,
    id: Id,
    legacy: bool,
) -> std::result::Result<(String, Dtype, u64, Option<(u64, u64)>), String> {
    let Node::PersId(pid) = *tree.get(id) else {
        return Err(format!(
            "its storage is {}, not a persistent id",
            tree.kind(id)
        ));
    };
    let Node::Tuple(t) = tree.get(pid) else {
        return Err("its persistent id is not a tuple".into());
    };
    let want = if legacy { 6 } else { 5 };
    if t.len() != want || tree.get(t[0]) != &Node::Str("storage".into()) {
        return Err("its persistent id is not a storage".into());
    }
    let Node::Callable(Callable::Storage(dtype)) = *tree.get(t[1]) else {
        return Err("its storage class is not a torch storage".into());
    };
    let Node::Str(key) = tree.get(t[2]) else {
        return Err("its storage key is not a string".into());
    };
    if key.len() > MAX_KEY_LEN {
        return Err(format!(
            "its storage key is longer than {MAX_KEY_LEN} bytes"
        ));
    }
    let numel = uint(tree, t[4]).ok_or("its storage size is not a non-negative integer")?;
    let view = match legacy.then(|| tree.get(t[5])) {
        None | Some(Node::None) => None,
        Some(Node::Tuple(v)) if v.len() == 3 => {
            let off = uint(tree, v[1]).ok_or("bad storage view offset")?;
            let len = uint(tree, v[2]).ok_or("bad storage view size")?;
            Some((off, len))
        }
        Some(_) => return Err("its storage view is not (key, offset, size)".into()),
    };
    Ok((key.clone(), dtype, numel, view))
}

fn uint(tree: &Tree, id: Id) -> Option<u64> {
    match tree.get(id) {
        Node::Int(v) => u64::try_from(*v).ok(),
        _ => None,
    }
}

/// A shape or stride: a tuple of at most [`MAX_RANK`] non-negative integers (the
/// limit also keeps a huge tuple shared by many tensors from costing time per tensor).
fn uints(tree: &Tree, id: Id) -> Option<Vec<u64>> {
    match tree.get(id) {
        Node::Tuple(items) if items.len() <= MAX_RANK => {
            items.iter().map(|&i| uint(tree, i)).collect()
        }
        _ => None,
    }
}

/// Locates every tensor in its storage, checking the view stays inside it.
fn build(path: &Path, raws: Vec<Raw>, storages: &HashMap<String, Storage>) -> Result<Checkpoint> {
    let mut tensors = Vec::with_capacity(raws.len());
    let mut ties = Vec::new();
    let mut first_of: HashMap<(String, u64, Vec<u64>, Vec<u64>), String> = HashMap::new();
    for r in raws {
        let bad = |reason: String| tensor_err(path, &r.name, reason);
        let st = storages
            .get(&r.key)
            .ok_or_else(|| bad(format!("storage `{}` is missing", sanitize(&r.key))))?;
        if st.dtype != r.dtype || st.numel != r.declared {
            return Err(bad(format!(
                "storage `{}` is declared differently by two tensors",
                sanitize(&r.key)
            )));
        }
        let es = r.dtype.size() as u64;
        // A legacy view narrows the root storage.
        let (base, avail) = match r.view {
            Some((off, len)) if off.checked_add(len).is_some_and(|e| e <= st.numel) => (off, len),
            Some(_) => return Err(bad("its storage view lies outside the storage".into())),
            None => (0, st.numel),
        };
        let numel = r
            .size
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad("size overflows".into()))?;
        // Last element's index + 1, relative to the storage (or view) start.
        let extent = if numel == 0 {
            Some(r.offset)
        } else {
            r.size
                .iter()
                .zip(&r.stride)
                .try_fold(r.offset, |a, (&d, &s)| {
                    (d - 1).checked_mul(s).and_then(|x| a.checked_add(x))
                })
                .and_then(|last| last.checked_add(1))
        };
        let extent = extent
            .filter(|&e| e <= avail)
            .ok_or_else(|| {
                bad(format!(
                    "its view (offset {}, size {:?}, stride {:?}) reaches past its storage of {avail} elements",
                    r.offset, r.size, r.stride
                ))
            })?;
        let contiguous = numel == 0 || {
            let mut expect = 1u64;
            r.size.iter().zip(&r.stride).rev().all(|(&d, &s)| {
                let ok = d == 1 || s == expect;
                expect = expect.saturating_mul(d);
                ok
            })
        };
        let start_elem = base + r.offset;
        let offset = st.start + start_elem * es;
        let (len, strides) = if contiguous {
            (numel * es, None)
        } else {
            ((extent - r.offset) * es, Some(r.stride.clone()))
        };
        let tie_key = (r.key.clone(), start_elem, r.size.clone(), r.stride.clone());
        match first_of.get(&tie_key) {
            Some(first) => ties.push((r.name.clone(), first.clone())),
            None => {
                first_of.insert(tie_key, r.name.clone());
            }
        }
        tensors.push(TensorInfo {
            name: r.name,
            dtype: r.dtype,
            shape: r.size,
            numel,
            offset,
            len,
            strides,
        });
    }
    // File order, like a safetensors header; ties keep the dict's order.
    tensors.sort_by_key(|t| t.offset);
    Ok(Checkpoint { tensors, ties })
}
