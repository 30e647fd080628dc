"""modelconv: convert Hugging Face checkpoints (safetensors or PyTorch ``.bin``) into
Parquet weight files, streaming, and read them back as numpy arrays without copies.

The seed converter's API, on modelconv's Rust engine::

    from modelconv import ModelConverter, ConversionConfig
    result = ModelConverter(ConversionConfig()).convert("openai/clip-vit-base-patch32", "out/clip", model_type="clip")
    assert result.success

and a reader::

    import modelconv
    with modelconv.open("out/clip") as f:
        w = f.get_tensor("vision_model.embeddings.patch_embedding.weight")   # numpy, zero-copy
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _native

__version__: str = _native.__version__

__all__ = [
    "ConversionConfig",
    "ConversionResult",
    "ModelConverter",
    "convert",
    "open",
    "load_file",
    "verify",
    "WeightFile",
    "Error",
    "InputError",
    "UnsafeCheckpointError",
    "PrequantizedError",
    "OptionError",
    "RemoteError",
    "RemoteAccessError",
    "SourceChangedError",
    "OutputError",
    "OutputExistsError",
    "CastOverflowError",
    "QuantizationError",
    "CorruptFileError",
    "TensorNotFoundError",
    "IOError_",
]

PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------- errors


class Error(Exception):
    """Every error modelconv reports; the message is the one the CLI prints."""


class InputError(Error, ValueError):
    """The checkpoint is missing, malformed or not what it claims (a header, an index, a
    pickle, a model directory)."""


class UnsafeCheckpointError(InputError):
    """A pickle asks to run something outside a state dict's allowlist, or holds a whole
    model; nothing in it was run."""


class PrequantizedError(InputError):
    """A pre-quantized checkpoint (FP8, GPTQ, AWQ, MXFP4, compressed-tensors, bitsandbytes...) that
    cannot be dequantized as it stands: an unsupported scheme, a config that
    contradicts the tensors, a missing or malformed scale. Nothing was converted raw
    (``keep_quantized=True`` writes the stored tensors as they are)."""


class RemoteError(Error, ConnectionError):
    """A remote input (``hf://``, ``https://``, ``s3://``) could not be read: not found,
    unreachable, or still failing after the retries. The message names the URL."""


class RemoteAccessError(RemoteError, PermissionError):
    """The Hub or the object store refused access (401/403): a private or gated
    repository needs ``HF_TOKEN`` (or ``token_file=``) with access to it."""


class SourceChangedError(InputError):
    """An input file changed while it was converted (its size, or a remote file's
    ETag); nothing was committed."""


class OptionError(Error, ValueError):
    """An option value is out of range, or options contradict each other."""


class OutputError(Error):
    """The output path cannot be used (an input file, not a directory)."""


class OutputExistsError(OutputError, FileExistsError):
    """The output directory already holds a conversion (pass ``force=True``)."""


class CastOverflowError(Error, ArithmeticError):
    """A cast would turn finite values into infinities (choose another dtype, or
    ``allow_overflow=True``)."""


class QuantizationError(Error, ArithmeticError):
    """A tensor chosen for quantization holds values no scale represents."""


class CorruptFileError(Error, ValueError):
    """A weight file is damaged or not a weight file."""


class TensorNotFoundError(Error, KeyError):
    """No tensor of that name in the weight file."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the CLI's text
        return str(self.args[0]) if self.args else ""


class IOError_(Error, OSError):
    """An operating-system error on a named file."""


class InternalError(Error, RuntimeError):
    """A rule modelconv itself guarantees was broken: a bug, please report it."""


_KINDS = {
    "input": InputError,
    "not_found_input": InputError,
    "unsafe": UnsafeCheckpointError,
    "prequantized": PrequantizedError,
    "option": OptionError,
    "output": OutputError,
    "output_exists": OutputExistsError,
    "overflow": CastOverflowError,
    "quantization": QuantizationError,
    "corrupt": CorruptFileError,
    "not_found": TensorNotFoundError,
    "io": IOError_,
    "internal": InternalError,
    "cancelled": Error,
    "remote": RemoteError,
    "remote_denied": RemoteAccessError,
    "source_changed": SourceChangedError,
}


def _typed(e: "_native.NativeError") -> Error:
    kind, message = e.args
    return _KINDS.get(kind, Error)(message)


def _call(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return f(*args, **kwargs)
    except _native.NativeError as e:
        raise _typed(e) from None


# --------------------------------------------------------------------------- converting


@dataclass
class ConversionConfig:
    """The seed's options (first five, same names and defaults), then modelconv's.

    ``use_float16=True`` makes float32, float64 and bfloat16 tensors float16 (round to
    nearest even, overflow checked); ``False`` keeps every dtype. ``dtype`` (``"f16"``,
    ``"bf16"``, ``"f32"``, ``"keep"``) overrides it.
    """

    compression: str = "zstd"
    compression_level: int = 3
    use_float16: bool = True
    extract_tokenizer: bool = True
    validate_output: bool = True
    dtype: Optional[str] = None
    threads: int = 0
    max_row_mb: int = 512
    row_group_mb: int = 32
    part: Optional[str] = None
    include: List[str] = field(default_factory=list)
    exclude: List[str] = field(default_factory=list)
    rename: List[Tuple[str, str]] = field(default_factory=list)
    force: bool = False
    allow_overflow: bool = False
    keep_quantized: bool = False
    max_file_size: Optional[Union[int, str]] = None
    resume: bool = False
    quantize: Optional[str] = None  # "int8" or "int2"
    group_size: Optional[int] = None  # default: 0 (per channel) for int8, 128 for int2
    quant_scheme: Optional[str] = None  # default: symmetric for int8; int2 is asymmetric
    quantize_skip: List[str] = field(default_factory=list)
    lossless: bool = False
    io: str = "auto"
    hub_cache: Optional[str] = None
    token_file: Optional[str] = None
    progress: Union[bool, Callable[[int, int], None]] = False

    def _options(self) -> Dict[str, Any]:
        return {
            "compression": self.compression,
            "compression_level": self.compression_level,
            "dtype": self.dtype or ("f16" if self.use_float16 else "keep"),
            "extract_tokenizer": self.extract_tokenizer,
            "validate": self.validate_output,
            "threads": self.threads,
            "max_row_mb": self.max_row_mb,
            "row_group_mb": self.row_group_mb,
            "part": self.part,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "rename": [tuple(r) for r in self.rename],
            "force": self.force,
            "allow_overflow": self.allow_overflow,
            "keep_quantized": self.keep_quantized,
            "max_file_size": self.max_file_size,
            "resume": self.resume,
            "quantize": self.quantize,
            "group_size": self.group_size,
            "quant_scheme": self.quant_scheme,
            "quantize_skip": list(self.quantize_skip),
            "lossless": self.lossless,
            "io": self.io,
            "hub_cache": self.hub_cache,
            **({"token_file": self.token_file} if self.token_file else {}),
        }


@dataclass
class ConversionResult:
    """The seed's result: it reports, it never raises."""

    success: bool
    model_name: str
    output_dir: str
    parquet_path: Optional[str] = None
    tokenizer_path: Optional[str] = None
    metadata_path: Optional[str] = None
    total_parameters: int = 0
    file_size_mb: float = 0.0
    compression_ratio: float = 0.0
    conversion_time_sec: float = 0.0
    validation_passed: Optional[bool] = None
    error_message: Optional[str] = None
    metadata: Dict[str, Any] = field(default_factory=dict)
    notices: List[str] = field(default_factory=list)
    quantization: Optional[Dict[str, Any]] = None
    parts: List[Dict[str, Any]] = field(default_factory=list)
    #: For :func:`modelconv.distributed.convert`: per part, the task that wrote it
    #: (``file``, ``status``, ``node``, ``pid``, ``seconds``).
    tasks: List[Dict[str, Any]] = field(default_factory=list)


def _result(report: Dict[str, Any]) -> ConversionResult:
    """The result of a successful conversion, from its report (the CLI's ``--json``)."""
    fields = ConversionResult.__dataclass_fields__
    return ConversionResult(**{k: (v if not isinstance(v, os.PathLike) else os.fspath(v))
                               for k, v in report.items() if k in fields})


def _progress(progress: Union[bool, Callable[[int, int], None], None]) -> Tuple[Optional[Callable[[int, int], None]], Callable[[], None]]:
    """A callback for the engine (called at most every 200 ms), and how to close it."""
    if callable(progress):
        return progress, lambda: None
    if progress:
        try:
            from tqdm import tqdm  # type: ignore
        except ImportError:
            return None, lambda: None
        bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024)

        def update(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        return update, bar.close
    return None, lambda: None


def convert(
    model_name_or_path: PathLike,
    output_dir: PathLike,
    model_type: str = "auto",
    *,
    progress: Union[bool, Callable[[int, int], None]] = False,
    **options: Any,
) -> Dict[str, Any]:
    """Converts a checkpoint (model directory, ``.safetensors`` file or shard index,
    ``pytorch_model.bin`` or its index, or a hub id in the local cache) into
    ``output_dir``; returns the report (the CLI's ``--json``). Options are the CLI's with
    underscores (``dtype="bf16"``, ``quantize="int8"``, ``threads=2``, ...).

    Raises a :class:`Error` subclass; ``KeyboardInterrupt`` stops the conversion at its
    next unit of work and leaves nothing behind. The GIL is released while it runs.
    """
    callback, close = _progress(progress)
    try:
        text = _call(_native.convert, os.fspath(model_name_or_path), os.fspath(output_dir),
                     callback, model_type=model_type, **options)
    finally:
        close()
    return json.loads(text)


def plan(model_name_or_path: PathLike, model_type: str = "auto", **options: Any) -> Dict[str, Any]:
    """What :func:`convert` would do with these options, reading headers only (the
    CLI's ``--dry-run --json``). With ``max_file_size``, ``plan(...)["parts"]`` lists
    the parts: what each index of :func:`convert_part` writes."""
    return json.loads(_call(_native.plan, os.fspath(model_name_or_path), model_type=model_type, **options))


def convert_part(model_name_or_path: PathLike, output_dir: PathLike, index: int,
                 model_type: str = "auto", **options: Any) -> Dict[str, Any]:
    """Converts part ``index`` (from 0) of a parted conversion (``max_file_size`` is
    required) into ``output_dir/weights.parquet/``, and nothing else: independent
    processes can convert the parts in any order, then one :func:`convert` with
    ``resume=True`` and the same options commits them (it keeps every part and writes
    the manifest and ``metadata.json``). A part is a pure function of the input, the
    options and its index; one already there of the same plan is kept. Returns the
    part's outcome (``file``, ``bytes``, ``rows``, ``xxh3_128``, ``status``)."""
    return json.loads(_call(_native.convert_part, os.fspath(model_name_or_path), os.fspath(output_dir),
                            index, model_type=model_type, **options))


class ModelConverter:
    """The seed's converter: ``ModelConverter(config).convert(name, out, model_type)``."""

    def __init__(self, config: Optional[ConversionConfig] = None) -> None:
        self.config = config or ConversionConfig()

    def convert(self, model_name_or_path: PathLike, output_dir: PathLike, model_type: str = "auto") -> ConversionResult:
        """Converts, and reports failure in the result instead of raising (as the seed
        does); ``KeyboardInterrupt`` still propagates."""
        started = time.monotonic()
        try:
            r = convert(model_name_or_path, output_dir, model_type,
                        progress=self.config.progress, **self.config._options())
        except Error as e:
            return ConversionResult(
                success=False,
                model_name=os.fspath(model_name_or_path),
                output_dir=os.fspath(output_dir),
                conversion_time_sec=time.monotonic() - started,
                error_message=str(e),
            )
        return _result(r)


def verify(path: PathLike, source: Optional[PathLike] = None, threads: int = 0) -> Dict[str, Any]:
    """Checks a weight file's structure and checksums, and with ``source`` every value
    against it; returns the report (``report["checks"]`` per tensor)."""
    text = _call(_native.verify, os.fspath(path), None if source is None else os.fspath(source), threads)
    report = json.loads(text)
    report["passed"] = not report["problems"] and all(
        c["checksum_mismatches"] == 0 and c["value_mismatches"] == 0 and not c["problems"]
        for c in report["checks"])
    return report


# --------------------------------------------------------------------------- reading

try:  # bfloat16 and float8 as numpy dtypes, when available
    import ml_dtypes as _ml_dtypes  # type: ignore
except ImportError:  # pragma: no cover - depends on the environment
    _ml_dtypes = None


class WeightFile:
    """An open ``weights.parquet``: names from the footer, tensors read one by one,
    touching only their row group.

    ``get_tensor`` returns a read-only numpy array over the bytes the reader decoded,
    without copying them (the array's ``base`` keeps them alive). bfloat16 tensors come
    back as ``ml_dtypes.bfloat16`` when ml_dtypes is installed, otherwise as float32
    (exact: every bfloat16 is a float32). Quantized (int8 or int2, V2) tensors come back
    dequantized as float32, with the seed loader's formula.
    """

    def __init__(self, path: PathLike) -> None:
        self._f = _call(_native.WeightFile, os.fspath(path))
        self._info: Dict[str, Dict[str, Any]] = {t["name"]: t for t in json.loads(self._f.tensors_json())}

    def __enter__(self) -> "WeightFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def keys(self) -> List[str]:
        """Tensor names, in row order."""
        return list(self._info)

    def __len__(self) -> int:
        return len(self._info)

    def __contains__(self, name: object) -> bool:
        return name in self._info

    def __iter__(self) -> Iterator[str]:
        return iter(self._info)

    @property
    def metadata(self) -> Optional[Dict[str, Any]]:
        """The ``metadata.json`` content stored in the file's footer."""
        text = self._f.metadata_json()
        return None if text is None else json.loads(text)

    def info(self, name: str) -> Dict[str, Any]:
        """``{"shape", "dtype", "bytes", ...}`` of one tensor, without reading it."""
        try:
            t = self._info[name]
        except KeyError:
            raise TensorNotFoundError(f"{self._f.path()}: no tensor named `{name}`") from None
        return dict(t)

    def get_tensor(self, name: str, dtype: Optional[str] = None, framework: str = "np") -> Any:
        """One tensor as a numpy array (``framework="pt"``: a torch tensor, when torch is
        installed). ``dtype="float32"`` upcasts in Rust; ``None`` keeps what is stored."""
        if dtype not in (None, "float32"):
            raise OptionError(f"dtype `{dtype}`: get_tensor returns the stored dtype or float32")
        stored = self._info.get(name, {}).get("dtype")
        upcast = dtype == "float32" or (stored == "BF16" and _ml_dtypes is None)
        buf = _call(self._f.get_tensor, name, upcast)
        arr = np.asarray(buf)
        if buf.dtype == "bfloat16" or buf.dtype.startswith("float8"):
            if _ml_dtypes is not None:
                arr = arr.view(getattr(_ml_dtypes, buf.dtype))
        if framework == "pt":
            import torch  # type: ignore
            return torch.from_numpy(arr.copy() if not arr.flags.writeable else arr)
        if framework != "np":
            raise OptionError(f"framework `{framework}`: np or pt")
        return arr

    def get_tensors(self, dtype: Optional[str] = None) -> Dict[str, np.ndarray]:
        """Every tensor as numpy arrays, by name in row order, read in parallel in Rust
        with the GIL released (the same values as ``get_tensor`` one by one)."""
        if dtype not in (None, "float32"):
            raise OptionError(f"dtype `{dtype}`: get_tensors returns the stored dtype or float32")
        bufs = _call(self._f.get_tensors, dtype == "float32", _ml_dtypes is None)
        out: Dict[str, np.ndarray] = {}
        for name, buf in bufs:
            arr = np.asarray(buf)
            if _ml_dtypes is not None and (buf.dtype == "bfloat16" or buf.dtype.startswith("float8")):
                arr = arr.view(getattr(_ml_dtypes, buf.dtype))
            out[name] = arr
        return out


def open(path: PathLike) -> WeightFile:  # noqa: A001 - the name users expect
    """Opens a weight file (or the directory holding its ``weights.parquet``)."""
    return WeightFile(path)


def load_file(path: PathLike, dtype: Optional[str] = None) -> Dict[str, np.ndarray]:
    """Every tensor of a weight file, by name (like ``safetensors.numpy.load_file``)."""
    return WeightFile(path).get_tensors(dtype)
