"""Writes a full-size, real-layout checkpoint from a manifest in tests/fixtures/manifests:
its config.json and model.safetensors with the manifest's header, the data filled with
random normal values (std 0.02; integer tensors with zeros).

usage: from_manifest.py MANIFEST.json OUT_DIR
"""
import json
import struct
import sys
from pathlib import Path

import numpy as np

m = json.loads(Path(sys.argv[1]).read_text())
out = Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
(out / "config.json").write_text(json.dumps(m["config"], indent=2))
header = m["safetensors_header"]
text = json.dumps(header)
text += " " * (-len(text) % 8)
rng = np.random.default_rng(42)
entries = sorted((v["data_offsets"][0], v["data_offsets"][1], v["dtype"]) for k, v in header.items() if k != "__metadata__")
with open(out / "model.safetensors", "wb") as f:
    f.write(struct.pack("<Q", len(text)))
    f.write(text.encode())
    for b, e, dtype in entries:
        n = e - b
        if dtype == "F32":
            f.write((rng.standard_normal(n // 4, dtype=np.float32) * np.float32(0.02)).tobytes())
        else:
            f.write(bytes(n))
print(f"{out}: {len(entries)} tensors")
