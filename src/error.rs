//! The one error type of the library.
//!
//! Every variant names the rule that was broken and carries the file it concerns,
//! and the tensor where there is one. The binary renders it once.

use std::fmt;
use std::path::{Path, PathBuf};

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while converting or reading.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// An I/O operation on `path` failed.
    Io {
        /// What was being done ("open", "map", "write", ...).
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A safetensors file is shorter than its 8-byte length prefix.
    HeaderTooSmall {
        /// The shard.
        path: PathBuf,
        /// Its length in bytes.
        len: u64,
    },
    /// The header length prefix exceeds the cap.
    HeaderTooLarge {
        /// The shard.
        path: PathBuf,
        /// The claimed header length.
        claimed: u64,
        /// The cap in force.
        cap: u64,
    },
    /// The header length prefix points past the end of the file.
    HeaderPastEnd {
        /// The shard.
        path: PathBuf,
        /// The claimed header length.
        claimed: u64,
        /// The file length.
        file_len: u64,
    },
    /// The header is not valid UTF-8 JSON of the safetensors shape.
    InvalidHeader {
        /// The shard.
        path: PathBuf,
        /// Byte position inside the file where the problem was found.
        position: u64,
        /// What is wrong.
        reason: String,
    },
    /// The same tensor name appears twice.
    DuplicateTensor {
        /// The file where the second occurrence was found.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The other file holding it, when the duplicate spans two files.
        other: Option<PathBuf>,
    },
    /// A dtype string that safetensors does not define.
    UnknownDtype {
        /// The shard.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The dtype string found.
        dtype: String,
    },
    /// A dtype this converter cannot represent in the output format.
    UnsupportedDtype {
        /// The shard.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The dtype.
        dtype: String,
    },
    /// Shape times dtype size does not fit in 64 bits, or is not a whole number of bytes.
    ShapeOverflow {
        /// The shard.
        path: PathBuf,
        /// The tensor.
        tensor: String,
    },
    /// Offsets reversed or outside the data section.
    InvalidOffset {
        /// The shard.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Begin offset (relative to the data section).
        begin: u64,
        /// End offset.
        end: u64,
        /// Length of the data section.
        data_len: u64,
    },
    /// A sub-byte dtype's elements do not make a whole number of bytes.
    PartialBytes {
        /// The shard.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The dtype.
        dtype: String,
        /// Its element count.
        numel: u64,
    },
    /// A pre-quantized checkpoint (FP8, MXFP4, GPTQ, AWQ, compressed-tensors, ...) that
    /// cannot be dequantized as it stands: a scheme that is not supported, a config
    /// that contradicts the tensors, a missing or malformed scale, zero point or index,
    /// a NaN or infinite scale. Nothing is converted raw.
    Prequantized {
        /// `config.json`, or the shard holding the tensor.
        path: PathBuf,
        /// The tensor concerned, when there is one.
        tensor: Option<String>,
        /// The scheme as the config names it (`fp8`, `gptq`, ...), or `none`.
        scheme: String,
        /// What is wrong.
        reason: String,
    },
    /// The byte length does not equal elements × dtype size.
    SizeMismatch {
        /// The shard.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The dtype.
        dtype: String,
        /// The shape.
        shape: Vec<u64>,
        /// Bytes the shape and dtype require.
        expected: u64,
        /// Bytes the offsets give.
        actual: u64,
    },
    /// Two tensors' byte ranges overlap.
    OverlappingTensors {
        /// The shard.
        path: PathBuf,
        /// The earlier tensor.
        first: String,
        /// The tensor overlapping it.
        second: String,
    },
    /// The tensors do not cover the data section exactly (gap, trailing bytes, short data).
    Coverage {
        /// The shard.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The shard index is malformed.
    InvalidIndex {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Shards named by the index do not exist.
    MissingShards {
        /// The index file.
        path: PathBuf,
        /// The missing shard file names.
        shards: Vec<String>,
    },
    /// The index and a shard header disagree about where a tensor lives.
    ShardMismatch {
        /// The index file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// What the index says and what was found.
        reason: String,
    },
    /// Nothing convertible at the input path.
    NoWeights {
        /// The input.
        path: PathBuf,
        /// What was found instead.
        reason: String,
    },
    /// A cast would turn finite values into infinities.
    Overflow {
        /// The shard holding the tensor.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Source dtype.
        from: String,
        /// Target dtype.
        to: String,
        /// How many finite values overflow.
        count: u64,
        /// The largest magnitude among them.
        max_abs: f64,
    },
    /// The output directory already holds a conversion.
    OutputExists {
        /// The existing file.
        path: PathBuf,
    },
    /// Another conversion is writing into the output directory.
    OutputBusy {
        /// The lock file it holds.
        path: PathBuf,
    },
    /// `--resume` found parts it must not keep nor replace: another input, other
    /// options or another version wrote them.
    ResumeRefused {
        /// The part (or output) that differs.
        path: PathBuf,
        /// What differs.
        reason: String,
    },
    /// An output path is, or links to, an input file.
    OutputIsInput {
        /// The output path.
        path: PathBuf,
    },
    /// A source file changed after it was validated (it is being rewritten): its size,
    /// or for a remote file its ETag.
    SourceChanged {
        /// The shard (a URL for a remote one).
        path: PathBuf,
        /// What changed.
        reason: String,
    },
    /// A remote input could not be read: unreachable, not found, or still failing after
    /// the retries.
    Remote {
        /// The URL (never with credentials).
        url: String,
        /// What happened.
        reason: String,
    },
    /// The Hub or the object store refused access (401 or 403).
    RemoteDenied {
        /// The repository or object.
        url: String,
        /// The HTTP status.
        status: u16,
        /// What to do about it.
        reason: String,
    },
    /// The output path exists and is not a directory.
    OutputNotDirectory {
        /// The output path.
        path: PathBuf,
    },
    /// The recipe and the filters leave no tensor to convert.
    NothingToConvert {
        /// The input.
        path: PathBuf,
        /// The family whose recipe was applied.
        model_type: &'static str,
    },
    /// A dimension does not fit the format's int32 `shape` column.
    DimensionTooLarge {
        /// The shard.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The dimension.
        dim: u64,
    },
    /// A hub id could not be resolved from the local Hugging Face cache.
    NotInHubCache {
        /// The hub id as given.
        id: String,
        /// What is missing and where it looked.
        reason: String,
    },
    /// The worker threads could not be started.
    ThreadPool {
        /// The system's reason.
        reason: String,
    },
    /// A rule modelconv itself guarantees was broken: a bug, never the input's fault.
    Internal {
        /// What went wrong.
        reason: String,
    },
    /// A PyTorch checkpoint's zip or legacy layout is damaged or not what torch writes.
    InvalidArchive {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A pickle is malformed, uses an opcode a state dict never needs, or goes past a
    /// limit.
    Pickle {
        /// The file.
        path: PathBuf,
        /// Where (`byte 23 of archive/data.pkl`).
        at: String,
        /// What is wrong.
        reason: String,
    },
    /// A pickle names a global outside the state-dict allowlist (nothing is run).
    ForbiddenGlobal {
        /// The file.
        path: PathBuf,
        /// Where.
        at: String,
        /// `module.name`.
        global: String,
    },
    /// A pickle holds a whole model (an `nn.Module`), not a state dict.
    PickledModule {
        /// The file.
        path: PathBuf,
        /// The module's class.
        class: String,
    },
    /// A pickle's object is not a dict of names to tensors.
    NotAStateDict {
        /// The file.
        path: PathBuf,
        /// What it is instead.
        reason: String,
    },
    /// A tensor of a PyTorch checkpoint does not fit its storage.
    TorchTensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor chosen for quantization holds values no scale can represent.
    Quantization {
        /// The shard.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// An option or a combination of options is invalid.
    InvalidOption {
        /// What is wrong.
        reason: String,
    },
    /// The Parquet library reported an error for `path`.
    Parquet {
        /// The file.
        path: PathBuf,
        /// The tensor, where known.
        tensor: Option<String>,
        /// The library's message.
        message: String,
    },
    /// A Parquet file is not a weight file we can read, or is damaged.
    CorruptWeights {
        /// The file.
        path: PathBuf,
        /// The tensor, where known.
        tensor: Option<String>,
        /// What is wrong.
        reason: String,
    },
    /// No tensor of that name in the weight file.
    TensorNotFound {
        /// The file.
        path: PathBuf,
        /// The name asked for.
        tensor: String,
    },
    /// `config.json` (or another model description file) is malformed or contradicts the request.
    ModelConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The work was cancelled (Ctrl-C).
    Cancelled,
    /// The host is big-endian; safetensors and the weight format are little-endian.
    BigEndianHost,
}

impl Error {
    /// `SourceChanged` for a file whose length went from `was` to `now`.
    pub(crate) fn size_changed(path: &std::path::Path, was: u64, now: u64) -> Self {
        Error::SourceChanged {
            path: path.to_path_buf(),
            reason: format!("its size changed ({was} → {now} bytes)"),
        }
    }

    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn parquet(path: &Path, tensor: Option<&str>, e: impl fmt::Display) -> Self {
        Error::Parquet {
            path: path.to_path_buf(),
            tensor: tensor.map(str::to_owned),
            message: e.to_string(),
        }
    }

    pub(crate) fn corrupt(path: &Path, tensor: Option<&str>, reason: impl Into<String>) -> Self {
        Error::CorruptWeights {
            path: path.to_path_buf(),
            tensor: tensor.map(str::to_owned),
            reason: reason.into(),
        }
    }

    pub(crate) fn option(reason: impl Into<String>) -> Self {
        Error::InvalidOption {
            reason: reason.into(),
        }
    }

    pub(crate) fn internal(reason: impl Into<String>) -> Self {
        Error::Internal {
            reason: reason.into(),
        }
    }
}

/// Renders a name read from a file so that it cannot move the terminal's cursor or
/// reorder text: control, escape and bidi characters become `\u{..}` escapes.
pub fn sanitize(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        let bidi = matches!(c as u32, 0x200E | 0x200F | 0x202A..=0x202E | 0x2066..=0x2069 | 0x061C);
        if c.is_control() || bidi {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

struct Name<'a>(&'a str);
impl fmt::Display for Name<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`", sanitize(self.0))
    }
}

struct P<'a>(&'a Path);
impl fmt::Display for P<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", sanitize(&self.0.display().to_string()))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Error::*;
        match self {
            Io { action, path, source } => write!(f, "{}: cannot {action}: {source}", P(path)),
            HeaderTooSmall { path, len } => write!(
                f,
                "{}: header too small: the file has {len} bytes, a safetensors file needs at least 8",
                P(path)
            ),
            HeaderTooLarge { path, claimed, cap } => write!(
                f,
                "{}: header too large: the length prefix claims {claimed} bytes, the cap is {cap} bytes",
                P(path)
            ),
            HeaderPastEnd { path, claimed, file_len } => write!(
                f,
                "{}: header length {claimed} runs past the end of the file ({file_len} bytes)",
                P(path)
            ),
            InvalidHeader { path, position, reason } => {
                write!(f, "{}: invalid header at byte {position}: {reason}", P(path))
            }
            DuplicateTensor { path, tensor, other } => match other {
                Some(o) => write!(
                    f,
                    "{}: duplicate tensor {} (also in {})",
                    P(path),
                    Name(tensor),
                    P(o)
                ),
                None => write!(f, "{}: duplicate tensor {}", P(path), Name(tensor)),
            },
            UnknownDtype { path, tensor, dtype } => write!(
                f,
                "{}: tensor {}: unknown dtype {}",
                P(path),
                Name(tensor),
                Name(dtype)
            ),
            UnsupportedDtype { path, tensor, dtype } => write!(
                f,
                "{}: tensor {}: dtype {dtype} is not supported by the weight format",
                P(path),
                Name(tensor)
            ),
            ShapeOverflow { path, tensor } => write!(
                f,
                "{}: tensor {}: shape × dtype size overflows",
                P(path),
                Name(tensor)
            ),
            PartialBytes { path, tensor, dtype, numel } => write!(
                f,
                "{}: tensor {}: {numel} elements of {dtype} are not a whole number of bytes",
                P(path),
                Name(tensor)
            ),
            Prequantized { path, tensor, scheme, reason } => match tensor {
                Some(t) => write!(
                    f,
                    "{}: tensor {}: pre-quantized ({scheme}): {reason}",
                    P(path),
                    Name(t)
                ),
                None => write!(f, "{}: pre-quantized ({scheme}): {reason}", P(path)),
            },
            InvalidOffset { path, tensor, begin, end, data_len } => write!(
                f,
                "{}: tensor {}: invalid offsets [{begin}, {end}) for a data section of {data_len} bytes",
                P(path),
                Name(tensor)
            ),
            SizeMismatch { path, tensor, dtype, shape, expected, actual } => write!(
                f,
                "{}: tensor {}: {dtype} {shape:?} needs {expected} bytes but its offsets give {actual}",
                P(path),
                Name(tensor)
            ),
            OverlappingTensors { path, first, second } => write!(
                f,
                "{}: tensors {} and {} overlap",
                P(path),
                Name(first),
                Name(second)
            ),
            Coverage { path, reason } => write!(f, "{}: data section not covered exactly: {reason}", P(path)),
            InvalidIndex { path, reason } => write!(f, "{}: invalid shard index: {reason}", P(path)),
            MissingShards { path, shards } => write!(
                f,
                "{}: missing shard{}: {}",
                P(path),
                if shards.len() == 1 { "" } else { "s" },
                shards.iter().map(|s| sanitize(s)).collect::<Vec<_>>().join(", ")
            ),
            ShardMismatch { path, tensor, reason } => {
                write!(f, "{}: tensor {}: {reason}", P(path), Name(tensor))
            }
            NoWeights { path, reason } => write!(f, "{}: no weights: {reason}", P(path)),
            Overflow { path, tensor, from, to, count, max_abs } => write!(
                f,
                "{}: tensor {}: {count} finite value{} would overflow to infinity casting {from} to {to} \
                 (largest magnitude {max_abs})",
                P(path),
                Name(tensor),
                if *count == 1 { "" } else { "s" },
            ),
            OutputExists { path } => write!(f, "{}: output already holds a conversion", P(path)),
            OutputBusy { path } => write!(
                f,
                "{}: another conversion is writing into this output (it holds this lock)",
                P(path)
            ),
            ResumeRefused { path, reason } => write!(f, "{}: cannot resume: {reason}", P(path)),
            SourceChanged { path, reason } => write!(
                f,
                "{}: the file changed while being converted: {reason}",
                P(path)
            ),
            Remote { url, reason } => write!(f, "{}: {reason}", sanitize(url)),
            RemoteDenied {
                url,
                status,
                reason,
            } => write!(f, "{}: access denied ({status}): {reason}", sanitize(url)),
            OutputNotDirectory { path } => write!(f, "{}: the output must be a directory", P(path)),
            NothingToConvert { path, model_type } => write!(
                f,
                "{}: nothing to convert: the {model_type} recipe and the filters keep no tensor",
                P(path)
            ),
            DimensionTooLarge { path, tensor, dim } => write!(
                f,
                "{}: tensor {}: dimension {dim} does not fit the format's int32 shape",
                P(path),
                Name(tensor)
            ),
            NotInHubCache { id, reason } => write!(f, "{}: {reason}", sanitize(id)),
            ThreadPool { reason } => write!(f, "cannot start worker threads: {reason}"),
            Internal { reason } => write!(f, "internal error (a bug in modelconv): {reason}"),
            OutputIsInput { path } => write!(f, "{}: output path is an input file", P(path)),
            InvalidArchive { path, reason } => {
                write!(f, "{}: invalid PyTorch checkpoint: {reason}", P(path))
            }
            Pickle { path, at, reason } => write!(f, "{}: invalid pickle at {at}: {reason}", P(path)),
            ForbiddenGlobal { path, at, global } => write!(
                f,
                "{}: refused global {} at {at}: it is not part of a state dict (nothing in the file was run)",
                P(path),
                Name(global)
            ),
            PickledModule { path, class } => write!(
                f,
                "{}: holds a pickled model ({}), not a state dict; load it in Python and save its `state_dict()` instead",
                P(path),
                Name(class)
            ),
            NotAStateDict { path, reason } => write!(f, "{}: not a state dict: {reason}", P(path)),
            TorchTensor { path, tensor, reason } => {
                write!(f, "{}: tensor {}: {reason}", P(path), Name(tensor))
            }
            Quantization { path, tensor, reason } => {
                write!(f, "{}: tensor {}: cannot quantize: {reason}", P(path), Name(tensor))
            }
            InvalidOption { reason } => write!(f, "{reason}"),
            Parquet { path, tensor, message } => match tensor {
                Some(t) => write!(f, "{}: tensor {}: parquet: {message}", P(path), Name(t)),
                None => write!(f, "{}: parquet: {message}", P(path)),
            },
            CorruptWeights { path, tensor, reason } => match tensor {
                Some(t) => write!(f, "{}: tensor {}: {reason}", P(path), Name(t)),
                None => write!(f, "{}: {reason}", P(path)),
            },
            TensorNotFound { path, tensor } => {
                write!(f, "{}: no tensor named {}", P(path), Name(tensor))
            }
            ModelConfig { path, reason } => write!(f, "{}: {reason}", P(path)),
            Cancelled => write!(f, "cancelled"),
            BigEndianHost => write!(
                f,
                "this host is big-endian; safetensors and the weight format are little-endian, \
                 and modelconv does not byte-swap"
            ),
        }
    }
}

/// `Display` already renders the cause of an `Io` error, so `source()` stays `None`:
/// error chains (`{:#}` in anyhow) would print it twice otherwise.
impl std::error::Error for Error {}
