"""Carried pre-quantized weights, read the seed loader's way: every named weight is an
int8 (or int2) row of a V2 weights.parquet, and the seed's V2 loader (seed_loader_v2.py's
seed_dequantize: x = (q - zero_point) * scale in float32, group_size before
quant_axis) gives the fixture's reference float32 values (computed by torch, numpy or
compressed-tensors, never by modelconv) bit for bit, +0 and -0 counted equal.

usage: seed_loader_carry.py WEIGHTS.parquet REFERENCE.safetensors NAME...
"""
import sys

import numpy as np
import pyarrow.parquet as pq

from seed_loader_int2 import seed_int2
from seed_loader_prequant import read_reference
from seed_loader_v2 import seed_dequantize


def main():
    weights, ref_path, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    table = pq.read_table(weights, memory_map=True)
    index = {n: i for i, n in enumerate(table.column("layer_name").to_pylist())}
    ref = read_reference(ref_path)
    for name in names:
        i = index[name]
        row = {c: table.column(c)[i].as_py() for c in
               ["shape", "dtype", "quant_type", "data", "scales", "zero_points", "quant_axis", "group_size"]}
        if row["quant_type"] == "int2":
            got = seed_int2(row["data"], row["shape"], row["scales"], row["zero_points"],
                            row["quant_axis"], row["group_size"])
        else:
            assert row["quant_type"] == "int8", f"{name}: {row['quant_type']}"
            got = seed_dequantize("int8", row["shape"], row["dtype"], row["data"], row["scales"],
                                  row["zero_points"], row["quant_axis"], row["group_size"])
        want = ref[name]
        assert got.dtype == np.float32 and got.shape == want.shape, name
        # Bit for bit, both zeros equal (a carried FP4 code 8, -0 in compressed-tensors'
        # reference, is the integer code 0).
        zeros = (got == 0) & (want == 0)
        diff = int(np.count_nonzero((got.view(np.uint32) != want.view(np.uint32)) & ~zeros))
        assert diff == 0, f"{name}: {diff} values differ from the reference"
    print(f"{len(names)} carried weights: the seed loader's values equal the reference bit for bit")


if __name__ == "__main__":
    main()
