"""The seed's way of reading every tensor as float32: pq.read_table + np.frombuffer +
astype(float32). Best of 5. usage: read_pyarrow.py WEIGHTS.parquet"""
import sys
import time

import numpy as np
import pyarrow.parquet as pq

DT = {"torch.float16": np.float16, "torch.float32": np.float32, "torch.int64": np.int64}

best, n = float("inf"), 0
for _ in range(5):
    t = time.perf_counter()
    table = pq.read_table(sys.argv[1], memory_map=True)
    names = table.column("layer_name").to_pylist()
    dtypes = table.column("dtype").to_pylist()
    shapes = table.column("shape").to_pylist()
    data = table.column("data")
    n = 0
    for i in range(len(names)):
        a = np.frombuffer(data[i].as_buffer(), DT[dtypes[i]]).reshape(shapes[i]).astype(np.float32)
        n += a.size
    best = min(best, time.perf_counter() - t)
print(f"pyarrow:   every tensor as f32: {best:.4f} s ({n} elements)")
