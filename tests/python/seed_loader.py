"""Reads a modelconv weights.parquet exactly the way the seed's WeightLoader does
(pq.read_table + a name -> row dict + np.frombuffer(...).reshape(shape)) and checks
every tensor against the source safetensors, bit for bit.

usage: seed_loader.py WEIGHTS.parquet SOURCE_DIR TARGET [--names MAP.json] [--expect-split-failure]
TARGET is f16, bf16, f32 or keep. MAP.json maps output names to source names.
"""
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SEED_DTYPES = {
    "torch.float16": np.float16,
    "torch.float32": np.float32,
    "torch.float64": np.float64,
    "torch.int64": np.int64,
    "torch.int32": np.int32,
    "torch.int8": np.int8,
    "torch.uint8": np.uint8,
    "torch.bool": np.bool_,
}
ST = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32,
      "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_, "BF16": np.uint16}


def read_safetensors(directory):
    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        raw = f.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        data = raw[8 + n:]
        for name, info in header.items():
            if name == "__metadata__":
                continue
            b, e = info["data_offsets"]
            arr = np.frombuffer(data[b:e], ST[info["dtype"]]).reshape(info["shape"])
            out[name] = (info["dtype"], arr)
    return out


def bf16_to_f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x):
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    nan = np.isnan(x)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    r[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return r.reshape(np.shape(x))


def expected(src_dtype, arr, target):
    """(torch dtype string, expected array) under the cast policy."""
    floats = {"F16", "F32", "F64", "BF16"}
    if src_dtype not in floats or target == "keep":
        names = {"F16": "torch.float16", "F32": "torch.float32", "F64": "torch.float64", "BF16": "torch.bfloat16",
                 "I64": "torch.int64", "I32": "torch.int32", "I8": "torch.int8", "U8": "torch.uint8", "BOOL": "torch.bool"}
        return names[src_dtype], arr
    wide = bf16_to_f32(arr) if src_dtype == "BF16" else arr
    if target == "f16":
        return "torch.float16", wide.astype(np.float16)
    if target == "f32":
        return "torch.float32", wide.astype(np.float32)
    if target == "bf16":
        return "torch.bfloat16", f32_to_bf16_bits(wide.astype(np.float32))
    raise SystemExit(f"unknown target {target}")


def main():
    path, source, target = sys.argv[1], sys.argv[2], sys.argv[3]
    names = {}
    if "--names" in sys.argv:
        names = json.loads(Path(sys.argv[sys.argv.index("--names") + 1]).read_text())
    expect_split_failure = "--expect-split-failure" in sys.argv

    table = pq.read_table(path, memory_map=True)
    want = [("layer_name", pa.string()), ("shape", pa.list_(pa.int32())), ("dtype", pa.string()),
            ("data", pa.binary()), ("num_params", pa.int64())]
    got = [(f.name, f.type) for f in list(table.schema)[:5]]
    assert got == want, f"schema {got} != {want}"

    # The seed's loader: a dict layer_name -> row (last wins), then frombuffer + reshape.
    index = {n: i for i, n in enumerate(table.column("layer_name").to_pylist())}
    src = read_safetensors(source)
    checked = 0
    for name, i in index.items():
        dtype = table.column("dtype")[i].as_py()
        shape = table.column("shape")[i].as_py()
        num_params = table.column("num_params")[i].as_py()
        buf = table.column("data")[i].as_buffer()
        np_dtype = SEED_DTYPES.get(dtype, np.uint16 if dtype == "torch.bfloat16" else None)
        assert np_dtype is not None, f"{name}: dtype {dtype} unknown to the seed's table"
        try:
            arr = np.frombuffer(buf, np_dtype).reshape(shape)
        except ValueError:
            if expect_split_failure:
                checked += 1
                continue
            raise
        src_dtype, src_arr = src[names.get(name, name)]
        want_dtype, want_arr = expected(src_dtype, src_arr, target)
        assert dtype == want_dtype, f"{name}: {dtype} != {want_dtype}"
        assert list(arr.shape) == list(src_arr.shape), f"{name}: shape"
        assert num_params == src_arr.size, f"{name}: num_params"
        if arr.dtype.itemsize > 1 and arr.dtype.kind == "f":
            ok = np.array_equal(arr.view(f"u{arr.dtype.itemsize}"), want_arr.view(f"u{want_arr.dtype.itemsize}"))
        else:
            ok = np.array_equal(arr, want_arr)
        assert ok, f"{name}: values differ"
        if dtype == "torch.float16":
            # The seed upcasts float16 to float32 by default.
            up = arr.astype(np.float32)
            assert np.array_equal(up, want_arr.astype(np.float32), equal_nan=True), f"{name}: upcast"
        checked += 1
    if expect_split_failure:
        split = sum(1 for n in table.column("layer_name").to_pylist() if table.column("layer_name").to_pylist().count(n) > 1)
        assert split > 0, "expected split tensors"
    print(f"ok {checked} tensors, {table.num_rows} rows")


if __name__ == "__main__":
    main()
