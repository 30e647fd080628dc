"""Writes a weights.parquet the way the seed's Python converter did: pyarrow, the V1
schema, one row group, float32/bfloat16 cast to float16, no footer index, no checksums.

usage: write_seed_file.py SOURCE_DIR OUT.parquet COMPRESSION
"""
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from seed_loader import bf16_to_f32, read_safetensors

TORCH = {"F16": "torch.float16", "F32": "torch.float32", "I64": "torch.int64", "BF16": "torch.bfloat16"}


def main():
    source, out, compression = sys.argv[1], sys.argv[2], sys.argv[3]
    rows = {"layer_name": [], "shape": [], "dtype": [], "data": [], "num_params": []}
    for name, (dtype, arr) in read_safetensors(source).items():
        if dtype in ("F32", "BF16"):
            arr = (bf16_to_f32(arr) if dtype == "BF16" else arr).astype(np.float16)
            dtype = "F16"
        rows["layer_name"].append(name)
        rows["shape"].append(list(arr.shape))
        rows["dtype"].append(TORCH[dtype])
        rows["data"].append(arr.tobytes())
        rows["num_params"].append(int(arr.size))
    schema = pa.schema([("layer_name", pa.string()), ("shape", pa.list_(pa.int32())), ("dtype", pa.string()),
                        ("data", pa.binary()), ("num_params", pa.int64())])
    table = pa.table(rows, schema=schema)
    pq.write_table(table, out, compression=compression)
    print(f"wrote {table.num_rows} rows")


if __name__ == "__main__":
    main()
