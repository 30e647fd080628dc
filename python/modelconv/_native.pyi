"""Type stubs of the compiled module (the Rust engine behind `modelconv`)."""
from typing import Any, Callable, List, Optional, Tuple

__version__: str

class NativeError(Exception):
    """args: (kind, message)."""

def convert(
    input: str,
    output: str,
    progress: Optional[Callable[[int, int], None]] = None,
    **options: Any,
) -> str:
    """Converts; the report as JSON text."""

def plan(input: str, **options: Any) -> str:
    """The plan of a conversion (the CLI's dry run) as JSON text."""

def convert_part(input: str, output: str, index: int, **options: Any) -> str:
    """Converts one part of a parted conversion; its outcome as JSON text."""

def prepare_parts(output: str, **options: Any) -> None:
    """Gets ``output`` ready for parts converted elsewhere: refuses options it cannot take; with ``force`` removes the conversion there."""

def record_parts(output: str, outcomes: str) -> None:
    """Records parts' outcomes (JSON list) in the output's journal."""

def verify(path: str, source: Optional[str] = None, threads: int = 0) -> str:
    """Verifies; the report as JSON text."""

class TensorBuffer:
    """Rust-owned tensor bytes exposed to numpy through `__array_interface__`."""
    dtype: str
    @property
    def __array_interface__(self) -> dict: ...
    def __len__(self) -> int: ...

class WeightFile:
    def __init__(self, path: str) -> None: ...
    def keys(self) -> List[str]: ...
    def __len__(self) -> int: ...
    def __contains__(self, name: str) -> bool: ...
    def metadata_json(self) -> Optional[str]: ...
    def tensors_json(self) -> str: ...
    def path(self) -> str: ...
    def get_tensor(self, name: str, upcast: bool = False) -> TensorBuffer: ...
    def get_tensors(self, upcast: bool = False, upcast_bf16: bool = False) -> List[Tuple[str, TensorBuffer]]: ...
