"""A quantized (V2) weights.parquet, checked from outside modelconv:

1. int8 codes, scales and zero points recomputed here with numpy from the safetensors
   source (the rules: floating matrices of rank >= 2 with >= 4096 elements, not skipped;
   per channel along axis 0 or per group of the flattened tensor; symmetric
   scale = max|x|/127, asymmetric scale = (max-min)/255 with zero point
   round(-128 - min/scale); codes round-half-even(x/scale) + zp clipped to [-128, 127],
   all in float32) must equal the file's bytes exactly;
2. the seed's V2 loader, reimplemented from SEED-SYSTEM.md (V1/V2 detection by the
   quant_type column, x = (q - zero_point) * scale in float32, group_size before
   quant_axis, fp16/fp32 rows decoded by dtype, float16 upcast to float32), must give
   bit for bit the float32 values modelconv's reader exported (EXPORT.safetensors);
3. asymmetric codes must not be worse than the seed quantizer's (truncated zero point)
   on any tensor.

usage: seed_loader_v2.py WEIGHTS.parquet SOURCE_DIR EXPORT.safetensors SCHEME GROUP [SKIP_GLOB...]
"""
import fnmatch
import sys

import numpy as np
import pyarrow.parquet as pq

from seed_loader import bf16_to_f32, read_safetensors

MIN_ELEMENTS = 4096
SEED_DTYPES = {"torch.float16": np.float16, "torch.float32": np.float32, "torch.int64": np.int64,
               "torch.int32": np.int32, "torch.int8": np.int8, "torch.uint8": np.uint8, "torch.bool": np.bool_}


def widen(dtype, arr):
    if dtype == "BF16":
        return bf16_to_f32(arr)
    return arr.astype(np.float32)


def quantize_unit(x, scheme, seed_zero_point=False):
    """(codes int8, scale f32, zero point f32) of one unit, in float32 like the seed."""
    x = x.astype(np.float32)
    if scheme == "symmetric":
        scale = np.float32(np.max(np.abs(x)) / np.float32(127)) if x.size else np.float32(0)
        zp = np.float32(0)
        if not scale > 0:
            scale = np.float32(1)
    else:
        lo, hi = np.min(x), np.max(x)
        scale = np.float32((hi - lo) / np.float32(255))
        if not scale > 0:
            scale, zp = np.float32(1), np.float32(0)
        else:
            z = np.float32(np.float32(-128) - lo / scale)
            zp = np.float32(np.clip(np.trunc(z) if seed_zero_point else np.round(z), -128, 127))
    q = np.clip(np.round(x / scale) + zp, -128, 127).astype(np.int8)
    return q, np.float32(scale), np.float32(zp)


def seed_dequantize(row, shape, dtype, data, scales, zps, axis, group):
    """The seed loader's V2 path for one row."""
    qt = row
    if qt in ("fp16", "fp32"):
        arr = np.frombuffer(data, SEED_DTYPES[dtype]).reshape(shape)
        return arr.astype(np.float32) if arr.dtype == np.float16 else arr
    q = np.frombuffer(data, np.int8).astype(np.float32)
    s = np.frombuffer(scales, np.float32)
    z = np.frombuffer(zps, np.float32)
    if group > 0:
        idx = np.arange(q.size) // group
        return ((q - z[idx]) * s[idx]).astype(np.float32).reshape(shape)
    if axis == -1:
        return ((q - z[0]) * s[0]).astype(np.float32).reshape(shape)
    q = q.reshape(shape[0], -1)
    return ((q - z[:, None]) * s[:, None]).astype(np.float32).reshape(shape)


def main():
    path, source, exported, scheme, group = sys.argv[1:6]
    group = int(group)
    skip = sys.argv[6:]
    table = pq.read_table(path, memory_map=True)
    names = table.schema.names
    assert names[:10] == ["layer_name", "shape", "dtype", "data", "num_params", "quant_type", "scales",
                          "zero_points", "quant_axis", "group_size"], names
    for c in names[5:10]:
        assert table.column(c).null_count == 0, f"nulls in {c}"
    src = read_safetensors(source)
    ours = read_safetensors_file(exported)
    cols = {c: table.column(c).to_pylist() for c in ["layer_name", "shape", "dtype", "quant_type", "quant_axis", "group_size"]}
    quantized = 0
    for i, name in enumerate(cols["layer_name"]):
        shape, dtype, qt = cols["shape"][i], cols["dtype"][i], cols["quant_type"][i]
        axis, gs = cols["quant_axis"][i], cols["group_size"][i]
        data = table.column("data")[i].as_py()
        scales = table.column("scales")[i].as_py()
        zps = table.column("zero_points")[i].as_py()
        src_dtype, src_arr = src[name]
        floating = src_dtype in ("F16", "BF16", "F32", "F64")
        eligible = floating and len(shape) >= 2 and src_arr.size >= MIN_ELEMENTS and \
            not any(fnmatch.fnmatchcase(name, g) for g in skip)
        assert (qt == "int8") == eligible, f"{name}: quant_type {qt}, eligible {eligible}"
        if eligible:
            quantized += 1
            x = widen(src_dtype, src_arr).reshape(-1)
            unit = group if group > 0 else x.size // shape[0]
            assert (axis, gs) == ((-1, group) if group > 0 else (0, 0)), f"{name}: axis {axis} group {gs}"
            codes, ss, zz, seed_err, our_err = [], [], [], 0.0, 0.0
            for u in range(0, x.size, unit):
                c, s, z = quantize_unit(x[u:u + unit], scheme)
                codes.append(c)
                ss.append(s)
                zz.append(z)
                if scheme == "asymmetric":
                    cs, s2, z2 = quantize_unit(x[u:u + unit], scheme, seed_zero_point=True)
                    xs = x[u:u + unit].astype(np.float64)
                    seed_err += np.sum((xs - (cs.astype(np.float32) - z2) * s2) ** 2)
                    our_err += np.sum((xs - (c.astype(np.float32) - z) * s) ** 2)
            assert np.concatenate(codes).tobytes() == data, f"{name}: int8 codes differ"
            assert np.array(ss, np.float32).tobytes() == scales, f"{name}: scales differ"
            assert np.array(zz, np.float32).tobytes() == zps, f"{name}: zero points differ"
            assert our_err <= seed_err * (1 + 1e-12), f"{name}: error {our_err} worse than the seed's {seed_err}"
        else:
            assert scales == b"" and zps == b"" and axis == -1 and gs == 0, f"{name}: unquantized row"
            want = {"F16": "fp16", "BF16": "fp16", "F32": "fp16", "F64": "fp16"}.get(src_dtype, "fp32")
            assert qt == want, f"{name}: quant_type {qt} != {want}"
        seed = seed_dequantize(qt, shape, dtype, data, scales, zps, axis, gs)
        mine = ours[name]
        assert seed.shape == mine.shape, f"{name}: shape"
        if seed.dtype.kind == "f":
            assert seed.dtype == np.float32 and mine.dtype == np.float32, f"{name}: {seed.dtype} {mine.dtype}"
            assert np.array_equal(seed.view(np.uint32), mine.view(np.uint32)), f"{name}: dequantized values differ"
        else:
            assert np.array_equal(seed, mine), f"{name}: values differ"
    print(f"ok {table.num_rows} tensors, {quantized} quantized")


def read_safetensors_file(path):
    import json
    import struct
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    st = {"F32": np.float32, "I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        out[name] = np.frombuffer(data[b:e], st[info["dtype"]]).reshape(info["shape"])
    return out


if __name__ == "__main__":
    main()
