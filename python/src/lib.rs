//! `modelconv._native`: the library's conversion and reader behind a thin PyO3 layer.
//! The Python package (`modelconv/__init__.py`) gives it the seed's API and typed
//! exceptions; everything here only translates.
//!
//! The GIL: a conversion runs on its own thread; the calling thread waits for it with
//! the GIL released, taking it back only to poll for signals (Ctrl-C sets the library's
//! cancel flag) and to call the progress callback, at most every 200 ms. The rayon pool
//! never touches Python. Reads and upcasts run with the GIL released too.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use modelconv::{
    Codec, ConvertConfig, Dtype, Event, Filters, IoMode, ModelType, Observer, Part, QuantScheme,
    QuantType, Quantize, TargetDtype, WeightFile,
};
use pyo3::exceptions::{PyException, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

/// The CLI's allocator (see `src/bin/modelconv/main.rs`): with the system allocator a
/// conversion's buffers and a read's tensors are fresh mappings the kernel zeroes each
/// time. Every allocation made here is also freed here (numpy arrays hold our buffers
/// and hand them back through their base object), so the two allocators never mix.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's policy for handing freed memory back to the system while conversions
/// run: the CLI's (`purge_delay` in `src/bin/modelconv/main.rs`), scoped to the
/// conversions, since this process outlives them.
mod purge {
    use std::ffi::c_long;
    use std::sync::Mutex;

    /// `mi_option_purge_delay` in mimalloc.h (v2 and v3).
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    /// Longer than a conversion: freed memory stays for reuse while one runs, and is
    /// still scheduled for purging, which the last one's end forces.
    const HOLD_MS: c_long = 24 * 3600 * 1000;

    /// Conversions running, and the delay to restore when none does.
    static RUNNING: Mutex<(usize, c_long)> = Mutex::new((0, 0));

    /// Holds the policy for one conversion; dropping the last one restores mimalloc's
    /// delay and hands the memory the conversions freed back at once.
    pub(crate) struct Scope(());

    impl Scope {
        /// Low-memory conversions hand memory back at once (as the CLI does); the
        /// first conversion of several at once sets the policy for all.
        pub(crate) fn enter(low_memory: bool) -> Scope {
            let mut r = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
            if r.0 == 0 {
                // SAFETY: mi_option_get/set only read and store an option value; any
                // value is valid for purge_delay (0 = at once, > 0 = after that many ms).
                unsafe {
                    r.1 = libmimalloc_sys::mi_option_get(PURGE_DELAY);
                    libmimalloc_sys::mi_option_set(
                        PURGE_DELAY,
                        if low_memory { 0 } else { HOLD_MS },
                    );
                }
            }
            r.0 += 1;
            Scope(())
        }
    }

    impl Drop for Scope {
        fn drop(&mut self) {
            let mut r = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
            r.0 -= 1;
            if r.0 == 0 {
                // SAFETY: as above; mi_collect(true) purges what is scheduled for it.
                unsafe {
                    libmimalloc_sys::mi_option_set(PURGE_DELAY, r.1);
                    libmimalloc_sys::mi_collect(true);
                }
            }
        }
    }
}

pyo3::create_exception!(
    _native,
    NativeError,
    PyException,
    "A modelconv error: args are (kind, message); the Python package re-raises it typed."
);

/// The library's error as `NativeError(kind, message)`, the message the CLI prints.
fn err(e: modelconv::Error) -> PyErr {
    use modelconv::Error as E;
    let kind = match &e {
        E::Io { .. } => "io",
        E::OutputExists { .. } => "output_exists",
        E::OutputBusy { .. } | E::ResumeRefused { .. } => "output",
        E::OutputIsInput { .. } | E::OutputNotDirectory { .. } => "output",
        E::Overflow { .. } => "overflow",
        E::Quantization { .. } => "quantization",
        E::Prequantized { .. } => "prequantized",
        E::InvalidOption { .. } => "option",
        E::Parquet { .. } | E::CorruptWeights { .. } => "corrupt",
        E::TensorNotFound { .. } => "not_found",
        E::Cancelled => "cancelled",
        E::ForbiddenGlobal { .. } | E::PickledModule { .. } => "unsafe",
        E::NotInHubCache { .. } | E::NoWeights { .. } => "not_found_input",
        E::Remote { .. } => "remote",
        E::RemoteDenied { .. } => "remote_denied",
        E::SourceChanged { .. } => "source_changed",
        E::Internal { .. } | E::ThreadPool { .. } | E::BigEndianHost => "internal",
        _ => "input",
    };
    NativeError::new_err((kind, e.to_string()))
}

fn option_err(msg: impl Into<String>) -> PyErr {
    NativeError::new_err(("option", msg.into()))
}

fn parse<T: std::str::FromStr<Err = String>>(v: &str) -> PyResult<T> {
    v.parse().map_err(option_err)
}

/// Builds the validated configuration from keyword options (the CLI's names).
fn config(opts: Option<&Bound<'_, PyDict>>, cancel: Arc<AtomicBool>) -> PyResult<ConvertConfig> {
    let mut b = ConvertConfig::builder().cancel(cancel);
    let mut filters = Filters::default();
    let mut quant: Option<QuantType> = None;
    let mut q = Quantize::default();
    let (mut group_size, mut scheme) = (None, None);
    let mib = |v: u64| v.saturating_mul(1 << 20);
    if let Some(opts) = opts {
        for (k, v) in opts.iter() {
            let key: String = k.extract()?;
            if v.is_none() {
                continue;
            }
            b = match key.as_str() {
                "dtype" => b.dtype(parse::<TargetDtype>(&v.extract::<String>()?)?),
                "compression" => b.compression(parse::<Codec>(&v.extract::<String>()?)?),
                "compression_level" | "level" => b.level(v.extract()?),
                "threads" => b.threads(v.extract()?),
                "max_row_mb" => b.max_row_bytes(mib(v.extract()?)),
                "row_group_mb" => b.row_group_bytes(mib(v.extract()?)),
                "max_row_bytes" => b.max_row_bytes(v.extract()?),
                "row_group_bytes" => b.row_group_bytes(v.extract()?),
                "allow_overflow" => b.allow_overflow(v.extract()?),
                "keep_quantized" => b.keep_quantized(v.extract()?),
                "lossless" => b.lossless(v.extract()?),
                "max_file_size" => match v.extract::<u64>() {
                    Ok(n) => b.max_file_size(Some(n)),
                    Err(_) => b.max_file_size(Some(
                        modelconv::parse_size(&v.extract::<String>()?).map_err(option_err)?,
                    )),
                },
                "resume" => b.resume(v.extract()?),
                "force" => b.force(v.extract()?),
                "extract_tokenizer" => b.extract_tokenizer(v.extract()?),
                "validate" | "validate_output" => b.validate(v.extract()?),
                "model_type" => b.model_type(parse::<ModelType>(&v.extract::<String>()?)?),
                "part" => b.part(parse::<Part>(&v.extract::<String>()?)?),
                "max_header_mb" => {
                    b.max_header_bytes(v.extract::<u64>()?.saturating_mul(1_000_000))
                }
                "hub_cache" => b.hub_cache(v.extract::<PathBuf>()?),
                "token_file" => b.token_file(Some(v.extract::<PathBuf>()?)),
                "io" => b.io(parse::<IoMode>(&v.extract::<String>()?)?),
                "include" => {
                    filters.include = v.extract()?;
                    b
                }
                "exclude" => {
                    filters.exclude = v.extract()?;
                    b
                }
                "rename" => {
                    filters.rename = v.extract::<Vec<(String, String)>>()?;
                    b
                }
                "quantize" => {
                    let what: String = v.extract()?;
                    quant = Some(what.parse::<QuantType>().map_err(|_| {
                        option_err(format!(
                            "quantize `{what}`: only int8 and int2 are supported"
                        ))
                    })?);
                    b
                }
                "group_size" => {
                    group_size = Some(v.extract()?);
                    b
                }
                "quant_scheme" => {
                    scheme = Some(parse::<QuantScheme>(&v.extract::<String>()?)?);
                    b
                }
                "quantize_skip" => {
                    q.skip = v.extract()?;
                    b
                }
                other => {
                    return Err(PyTypeError::new_err(format!(
                        "convert() got an unexpected keyword argument '{other}'"
                    )))
                }
            };
        }
    }
    let quant = quant.map(|kind| Quantize {
        kind,
        scheme: scheme.unwrap_or(kind.default_scheme()),
        group_size: group_size.unwrap_or(kind.default_group_size()),
        ..q
    });
    b.filters(filters).quantize(quant).build().map_err(err)
}

/// Progress and notices, shared between the converting thread and the caller.
#[derive(Default)]
struct Shared {
    done: AtomicU64,
    total: AtomicU64,
    notices: Mutex<Vec<String>>,
}

struct Recorder(Arc<Shared>);

impl Observer for Recorder {
    fn event(&self, e: &Event) {
        match e {
            Event::Planned { source_bytes, .. } => {
                self.0.total.store(*source_bytes, Ordering::Relaxed)
            }
            Event::Progress { done, total, .. } => {
                self.0.total.store(*total, Ordering::Relaxed);
                self.0.done.store(*done, Ordering::Relaxed);
            }
            Event::Notice(n) => {
                if let Ok(mut v) = self.0.notices.lock() {
                    v.push(n.to_string());
                }
            }
            Event::Validating => {}
        }
    }
}

/// How often the waiting thread takes the GIL back: signals, and the progress callback.
const POLL: Duration = Duration::from_millis(200);

/// Converts `input` into `output` and returns the report as JSON text (the CLI's
/// `--json`). Keyword options are the CLI's, with underscores. `progress`, when given, is
/// called as `progress(done_bytes, total_bytes)` at most every 200 ms.
///
/// Raises `NativeError(kind, message)`; `KeyboardInterrupt` when interrupted (the
/// conversion stops at its next unit of work and leaves nothing behind).
#[pyfunction]
#[pyo3(signature = (input, output, progress=None, **options))]
fn convert(
    py: Python<'_>,
    input: PathBuf,
    output: PathBuf,
    progress: Option<Py<PyAny>>,
    options: Option<&Bound<'_, PyDict>>,
) -> PyResult<String> {
    let cancel = Arc::new(AtomicBool::new(false));
    let cfg = config(options, cancel.clone())?;
    let shared = Arc::new(Shared::default());
    let (tx, rx) = mpsc::channel();
    // Receiver is Send but not Sync; the closure that waits on it borrows it.
    let rx = Mutex::new(rx);
    let recorder = Recorder(shared.clone());
    let purge = purge::Scope::enter(cfg.low_memory());
    let worker = std::thread::Builder::new()
        .name("modelconv-convert".into())
        .spawn(move || {
            let r = modelconv::convert_with(&input, &output, &cfg, &recorder);
            let _ = tx.send(r);
        })
        .map_err(|e| NativeError::new_err(("internal", format!("cannot start a thread: {e}"))))?;
    let mut interrupted: Option<PyErr> = None;
    let mut last = Instant::now();
    let result = loop {
        let wait = || {
            rx.lock()
                .unwrap_or_else(|p| p.into_inner())
                .recv_timeout(POLL)
        };
        match py.detach(wait) {
            Ok(r) => break r,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break Err(modelconv::Error::Cancelled);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if interrupted.is_none() {
            if let Err(e) = py.check_signals() {
                // Stop at the next unit of work; the worker removes its temp files.
                cancel.store(true, Ordering::SeqCst);
                interrupted = Some(e);
                continue;
            }
        }
        if let Some(cb) = &progress {
            if last.elapsed() >= POLL {
                last = Instant::now();
                let (d, t) = (
                    shared.done.load(Ordering::Relaxed),
                    shared.total.load(Ordering::Relaxed),
                );
                if let Err(e) = cb.call1(py, (d, t)) {
                    cancel.store(true, Ordering::SeqCst);
                    interrupted = Some(e);
                }
            }
        }
    };
    let _ = py.detach(|| worker.join());
    drop(purge);
    if let Some(e) = interrupted {
        return Err(e);
    }
    let report = result.map_err(err)?;
    if let Some(cb) = &progress {
        let t = shared.total.load(Ordering::Relaxed);
        cb.call1(py, (t, t))?;
    }
    serde_json::to_string(&report).map_err(|e| NativeError::new_err(("internal", e.to_string())))
}

/// A tensor's bytes owned by Rust and shown to numpy without a copy through
/// `__array_interface__`: the array's base is this object, which keeps them alive.
#[pyclass(frozen, module = "modelconv._native")]
struct TensorBuffer {
    data: Data,
    shape: Vec<u64>,
    /// numpy typestr (`<f2`, `<f4`, `<u2` for bf16 bits, `|i1`, ...).
    typestr: &'static str,
    /// The element type's name (`float16`, `bfloat16`, ...).
    #[pyo3(get)]
    dtype: &'static str,
}

#[pymethods]
impl TensorBuffer {
    /// The numpy array interface (version 3), read-only.
    #[getter]
    fn __array_interface__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("shape", PyTuple::new(py, &self.shape)?)?;
        d.set_item("typestr", self.typestr)?;
        d.set_item("data", (self.data.ptr(), true))?;
        d.set_item("version", 3)?;
        Ok(d)
    }

    /// Bytes held.
    fn __len__(&self) -> usize {
        self.data.len()
    }
}

/// The bytes behind a [`TensorBuffer`]: as read, or widened to f32 (kept as `f32`s so
/// no byte copy is made).
enum Data {
    Bytes(Vec<u8>),
    F32(Vec<f32>),
}

impl Data {
    fn ptr(&self) -> usize {
        match self {
            Data::Bytes(b) => b.as_ptr() as usize,
            Data::F32(v) => v.as_ptr() as usize,
        }
    }

    fn len(&self) -> usize {
        match self {
            Data::Bytes(b) => b.len(),
            Data::F32(v) => v.len() * 4,
        }
    }
}

/// numpy's typestr and name of an element type (raw bytes for the fp8 kinds, which
/// the Python side views through `ml_dtypes` when it is installed).
fn np_type(d: Dtype) -> (&'static str, &'static str) {
    match d {
        Dtype::F16 => ("<f2", "float16"),
        Dtype::Bf16 => ("<u2", "bfloat16"),
        Dtype::F32 => ("<f4", "float32"),
        Dtype::F64 => ("<f8", "float64"),
        Dtype::I8 => ("|i1", "int8"),
        Dtype::U8 => ("|u1", "uint8"),
        Dtype::I16 => ("<i2", "int16"),
        Dtype::U16 => ("<u2", "uint16"),
        Dtype::I32 => ("<i4", "int32"),
        Dtype::U32 => ("<u4", "uint32"),
        Dtype::I64 => ("<i8", "int64"),
        Dtype::U64 => ("<u8", "uint64"),
        Dtype::Bool => ("|b1", "bool"),
        Dtype::C64 => ("<c8", "complex64"),
        Dtype::F8E5M2 => ("|u1", "float8_e5m2"),
        Dtype::F8E4M3 => ("|u1", "float8_e4m3fn"),
        Dtype::F8E8M0 => ("|u1", "float8_e8m0fnu"),
        Dtype::F8E4M3Fnuz => ("|u1", "float8_e4m3fnuz"),
        Dtype::F8E5M2Fnuz => ("|u1", "float8_e5m2fnuz"),
        // Sub-byte types have no torch name, so no weight file holds them; raw bytes.
        Dtype::F4 | Dtype::F6E2M3 | Dtype::F6E3M2 => ("|u1", "uint8"),
    }
}

/// An open weight file.
#[pyclass(frozen, name = "WeightFile", module = "modelconv._native")]
struct PyWeightFile {
    inner: WeightFile,
}

#[pymethods]
impl PyWeightFile {
    /// Opens a weights.parquet (or the directory holding it), reading only its footer.
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| WeightFile::open(&path)).map_err(err)?;
        Ok(PyWeightFile { inner })
    }

    /// Tensor names, in row order.
    fn keys(&self) -> Vec<String> {
        self.inner
            .tensors()
            .iter()
            .map(|t| t.name.clone())
            .collect()
    }

    fn __len__(&self) -> usize {
        self.inner.tensors().len()
    }

    fn __contains__(&self, name: &str) -> bool {
        self.inner.info(name).is_some()
    }

    /// The `metadata.json` content stored in the footer, as JSON text (or None).
    fn metadata_json(&self) -> Option<String> {
        self.inner.metadata().map(|m| m.to_string())
    }

    /// Every tensor's description as JSON text.
    fn tensors_json(&self) -> PyResult<String> {
        serde_json::to_string(self.inner.tensors())
            .map_err(|e| NativeError::new_err(("internal", e.to_string())))
    }

    /// The path of the file.
    fn path(&self) -> PathBuf {
        self.inner.path().to_path_buf()
    }

    /// One tensor's bytes: as stored (`upcast=False`; quantized tensors are always
    /// dequantized), or as float32.
    #[pyo3(signature = (name, upcast=false))]
    fn get_tensor(&self, py: Python<'_>, name: &str, upcast: bool) -> PyResult<TensorBuffer> {
        let inner = &self.inner;
        py.detach(|| {
            let t = inner.tensor(name)?;
            let shape = t.shape.clone();
            if upcast || t.quant.is_some() {
                return Ok(TensorBuffer {
                    data: Data::F32(t.to_f32()),
                    shape,
                    typestr: "<f4",
                    dtype: "float32",
                });
            }
            let (typestr, dtype) = np_type(t.dtype);
            Ok(TensorBuffer {
                data: Data::Bytes(t.data),
                shape,
                typestr,
                dtype,
            })
        })
        .map_err(err)
    }

    /// Every tensor, read in parallel (row groups at once for `upcast`, tensors at
    /// once otherwise) with the GIL released: `(name, buffer)` in row order. Stored
    /// bytes unless `upcast` (float32); bfloat16 tensors also become float32 with
    /// `upcast_bf16`; quantized tensors are always dequantized.
    #[pyo3(signature = (upcast=false, upcast_bf16=false))]
    fn get_tensors(
        &self,
        py: Python<'_>,
        upcast: bool,
        upcast_bf16: bool,
    ) -> PyResult<Vec<(String, TensorBuffer)>> {
        let inner = &self.inner;
        let f32_buffer = |shape: Vec<u64>, v: Vec<f32>| TensorBuffer {
            data: Data::F32(v),
            shape,
            typestr: "<f4",
            dtype: "float32",
        };
        py.detach(|| {
            let mut out: Vec<(usize, String, TensorBuffer)> = if upcast {
                let found = std::sync::Mutex::new(Vec::with_capacity(inner.tensors().len()));
                inner.for_each_f32(&|t, v| {
                    let b = (
                        t.row as usize,
                        t.name.clone(),
                        f32_buffer(t.shape.clone(), v),
                    );
                    if let Ok(mut f) = found.lock() {
                        f.push(b);
                    }
                })?;
                found.into_inner().unwrap_or_default()
            } else {
                use rayon::prelude::*;
                inner
                    .tensors()
                    .par_iter()
                    .map(|info| {
                        let t = inner.tensor(&info.name)?;
                        let shape = t.shape.clone();
                        let b = if t.quant.is_some() || (upcast_bf16 && t.dtype == Dtype::Bf16) {
                            f32_buffer(shape, t.to_f32())
                        } else {
                            let (typestr, dtype) = np_type(t.dtype);
                            TensorBuffer {
                                data: Data::Bytes(t.data),
                                shape,
                                typestr,
                                dtype,
                            }
                        };
                        Ok((info.row as usize, info.name.clone(), b))
                    })
                    .collect::<modelconv::Result<Vec<_>>>()?
            };
            out.sort_by_key(|(row, _, _)| *row);
            Ok(out.into_iter().map(|(_, n, b)| (n, b)).collect())
        })
        .map_err(err)
    }
}

/// Verifies a weight file, optionally against its source; the report as JSON text.
#[pyfunction]
#[pyo3(signature = (path, source=None, threads=0))]
fn verify(
    py: Python<'_>,
    path: PathBuf,
    source: Option<PathBuf>,
    threads: usize,
) -> PyResult<String> {
    py.detach(|| {
        let src = match &source {
            Some(s) => Some(modelconv::open_source(s, &Default::default())?),
            None => None,
        };
        let r = modelconv::verify(&path, src.as_ref(), &modelconv::VerifyOptions { threads })?;
        Ok(serde_json::to_string(&r).unwrap_or_default())
    })
    .map_err(err)
}

/// The plan of a conversion (the CLI's `--dry-run --json`), reading headers only: for
/// a parted output, its parts (what each index of `convert_part` writes).
#[pyfunction]
#[pyo3(signature = (input, **options))]
fn plan(py: Python<'_>, input: PathBuf, options: Option<&Bound<'_, PyDict>>) -> PyResult<String> {
    let cfg = config(options, Arc::new(AtomicBool::new(false)))?;
    py.detach(|| modelconv::plan_conversion(&input, &cfg))
        .map(|p| serde_json::to_string(&p).unwrap_or_default())
        .map_err(err)
}

/// Converts part `index` of a parted conversion into `output` (no manifest), the GIL
/// released; returns the part's outcome as JSON.
#[pyfunction]
#[pyo3(signature = (input, output, index, **options))]
fn convert_part(
    py: Python<'_>,
    input: PathBuf,
    output: PathBuf,
    index: usize,
    options: Option<&Bound<'_, PyDict>>,
) -> PyResult<String> {
    let cfg = config(options, Arc::new(AtomicBool::new(false)))?;
    py.detach(|| modelconv::convert_part(&input, &output, &cfg, index))
        .map(|o| serde_json::to_string(&o).unwrap_or_default())
        .map_err(err)
}

/// Records parts converted by `convert_part` (their outcomes as JSON, a list) in the
/// output's journal, for the committing `convert` with `resume`.
#[pyfunction]
fn record_parts(py: Python<'_>, output: PathBuf, outcomes: &str) -> PyResult<()> {
    let parts: Vec<modelconv::PartOutcome> = serde_json::from_str(outcomes)
        .map_err(|e| PyTypeError::new_err(format!("part outcomes: {e}")))?;
    py.detach(|| modelconv::record_parts(&output, &parts))
        .map_err(err)
}

/// Gets `output` ready for parts converted elsewhere and committed with `resume`:
/// refuses options it cannot take; with `force` removes the conversion there.
#[pyfunction]
#[pyo3(signature = (output, **options))]
fn prepare_parts(
    py: Python<'_>,
    output: PathBuf,
    options: Option<&Bound<'_, PyDict>>,
) -> PyResult<()> {
    let cfg = config(options, Arc::new(AtomicBool::new(false)))?;
    py.detach(|| modelconv::prepare_parts(&output, &cfg))
        .map_err(err)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("NativeError", m.py().get_type::<NativeError>())?;
    m.add_function(wrap_pyfunction!(convert, m)?)?;
    m.add_function(wrap_pyfunction!(plan, m)?)?;
    m.add_function(wrap_pyfunction!(convert_part, m)?)?;
    m.add_function(wrap_pyfunction!(prepare_parts, m)?)?;
    m.add_function(wrap_pyfunction!(record_parts, m)?)?;
    m.add_function(wrap_pyfunction!(verify, m)?)?;
    m.add_class::<PyWeightFile>()?;
    m.add_class::<TensorBuffer>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
