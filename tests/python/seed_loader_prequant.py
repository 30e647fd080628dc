"""Reads a converted pre-quantized checkpoint exactly the way the seed's WeightLoader
does (pq.read_table(path, memory_map=True), a name -> row dict, its dtype table,
np.frombuffer(...).reshape(shape)) and checks that every dtype is one the table knows
and every dequantized weight equals the reference (torch / numpy / transformers, from
make_prequant_fixtures.py) rounded once to f16 by numpy.

usage: seed_loader_prequant.py WEIGHTS.parquet REFERENCE.safetensors
"""
import json
import struct
import sys

import numpy as np
import pyarrow.parquet as pq

from seed_loader import SEED_DTYPES  # the seed loader's table: no fp8, no bfloat16


def read_reference(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", name
        b, e = info["data_offsets"]
        out[name] = np.frombuffer(data[b:e], np.float32).reshape(info["shape"])
    return out


def main():
    weights, ref_path = sys.argv[1], sys.argv[2]
    table = pq.read_table(weights, memory_map=True)
    rows = {}
    for i in range(table.num_rows):
        name = table.column("layer_name")[i].as_py()
        dtype = table.column("dtype")[i].as_py()
        assert dtype in SEED_DTYPES, f"{name}: dtype {dtype} unknown to the seed's table"
        shape = table.column("shape")[i].as_py()
        arr = np.frombuffer(table.column("data")[i].as_buffer(), SEED_DTYPES[dtype]).reshape(shape)
        rows[name] = arr
    ref = read_reference(ref_path)
    for name, want in ref.items():
        got = rows[name]
        exp = want.astype(np.float16)
        assert got.dtype == np.float16 and got.shape == exp.shape, name
        assert np.array_equal(got.view(np.uint16), exp.view(np.uint16)), f"{name}: values differ"
    print(f"{len(rows)} rows read with the seed's dtype table; {len(ref)} dequantized weights equal the reference")


if __name__ == "__main__":
    main()
