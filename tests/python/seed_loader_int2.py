"""An int2 (V2) weights.parquet, checked from outside modelconv:

1. int2 codes, scales and zero points recomputed here with numpy from the safetensors
   source, by the rule of docs/quantized-v2.md (floating matrices of rank >= 2 with
   >= 4096 elements; groups of GROUP of the flattened tensor, or per channel along
   axis 0 when GROUP is 0; for each clipping ratio r of 1, 0.95, ..., 0.4:
   scale = (max - min) / 3 * r, lo_r = min + (max - min) * 0.5 * (1 - r),
   zero point round(-2 - lo_r / scale) (bounded by 2^21), codes
   round(x / scale) + zp clipped to [-2, 1], all in float32; the first ratio with the
   least sum of squared errors, summed in float64 in lanes i % 8; a constant unit c gets
   scale |c| (1 for zeros) and zero point 0), packed as q + 2 four to a byte with the
   first element in the two highest bits, must equal the file's bytes exactly;
2. the seed's V2 loader, reimplemented from SEED-SYSTEM.md (unpacking (b >> 6) & 3
   first, then x = (q - zero_point) * scale in float32, group_size before quant_axis),
   must give bit for bit the float32 values modelconv's reader exported
   (EXPORT.safetensors);
3. the file rewritten the seed converter's way (the ten V2 columns, no footer index, no
   extras) is written to SEED_OUT.parquet for modelconv to read back.

usage: seed_loader_int2.py WEIGHTS.parquet SOURCE_DIR EXPORT.safetensors GROUP SEED_OUT.parquet
"""
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from seed_loader import read_safetensors
from seed_loader_v2 import read_safetensors_file, seed_dequantize, widen

MIN_ELEMENTS = 4096
RATIOS = [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4]
ZP_MAX = np.float32(2 ** 21)
f32 = np.float32


def sse(x, back):
    """Per row of x: the sum of squared errors in float64, element i in lane i % 8 in
    order, then the lanes in order."""
    e = x.astype(np.float64) - back.astype(np.float64)
    e2 = e * e
    pad = (-e2.shape[1]) % 8
    e2 = np.concatenate([e2, np.zeros((e2.shape[0], pad))], axis=1).reshape(e2.shape[0], -1, 8)
    lane_sums = np.cumsum(e2, axis=1)[:, -1, :]
    return np.cumsum(lane_sums, axis=1)[:, -1]


def quantize_units(x):
    """(codes int8 in [-2, 1], scales f32, zero points f32) of the rows of x (units of
    one length), all in float32."""
    x = x.astype(np.float32)
    lo, hi = np.min(x, axis=1), np.max(x, axis=1)
    span = (hi - lo).astype(np.float32)
    const = ~((span / f32(3)) > 0)
    best_err = np.full(x.shape[0], np.inf)
    best_s = np.where(lo != 0, np.abs(lo), f32(1)).astype(np.float32)
    best_z = np.zeros(x.shape[0], np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        for r in map(f32, RATIOS):
            scale = ((span / f32(3)) * r).astype(np.float32)
            lo_r = (lo + (span * f32(0.5)) * (f32(1) - r)).astype(np.float32)
            zp = np.clip(np.round(f32(-2) - lo_r / scale), -ZP_MAX, ZP_MAX).astype(np.float32)
            ok = (scale > 0) & ~const
            s_ = np.where(ok, scale, f32(1))[:, None]
            z_ = np.where(ok, zp, f32(0))[:, None]
            c = np.clip(np.round(x / s_) + z_, f32(-2), f32(1))
            err = np.where(ok, sse(x, ((c - z_) * s_).astype(np.float32)), np.inf)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_s = np.where(better, scale, best_s).astype(np.float32)
            best_z = np.where(better, zp, best_z).astype(np.float32)
    c = np.clip(np.round(x / best_s[:, None]) + best_z[:, None], f32(-2), f32(1)).astype(np.int8)
    return c, best_s, best_z


def pack(codes):
    c = (codes.astype(np.int16) + 2).astype(np.uint8)
    c = np.concatenate([c, np.zeros((-c.size) % 4, np.uint8)]).reshape(-1, 4)
    return (c[:, 0] << 6 | c[:, 1] << 4 | c[:, 2] << 2 | c[:, 3]).astype(np.uint8).tobytes()


def seed_int2(data, shape, scales, zps, axis, group):
    """The seed loader's int2 path, as SEED-SYSTEM.md documents it."""
    b = np.frombuffer(data, np.uint8)
    q = np.stack([(b >> 6) & 3, (b >> 4) & 3, (b >> 2) & 3, b & 3], axis=1).reshape(-1)
    n = int(np.prod(shape))
    q = q[:n].astype(np.float32) - np.float32(2)
    return seed_dequantize("int8", shape, "", q.astype(np.int8).tobytes(), scales, zps, axis, group)


def main():
    path, source, exported, group, seed_out = sys.argv[1:6]
    group = int(group)
    table = pq.read_table(path, memory_map=True)
    names = table.schema.names
    assert names[:10] == ["layer_name", "shape", "dtype", "data", "num_params", "quant_type", "scales",
                          "zero_points", "quant_axis", "group_size"], names
    src = read_safetensors(source)
    ours = read_safetensors_file(exported)
    cols = {c: table.column(c).to_pylist() for c in ["layer_name", "shape", "dtype", "quant_type", "quant_axis",
                                                     "group_size", "num_params"]}
    quantized = 0
    for i, name in enumerate(cols["layer_name"]):
        shape, dtype, qt = cols["shape"][i], cols["dtype"][i], cols["quant_type"][i]
        axis, gs = cols["quant_axis"][i], cols["group_size"][i]
        data = table.column("data")[i].as_py()
        scales = table.column("scales")[i].as_py()
        zps = table.column("zero_points")[i].as_py()
        src_dtype, src_arr = src[name]
        floating = src_dtype in ("F16", "BF16", "F32", "F64")
        eligible = floating and len(shape) >= 2 and src_arr.size >= MIN_ELEMENTS
        assert (qt == "int2") == eligible, f"{name}: quant_type {qt}, eligible {eligible}"
        assert cols["num_params"][i] == src_arr.size, f"{name}: num_params"
        if eligible:
            quantized += 1
            x = widen(src_dtype, src_arr).reshape(-1)
            unit = group if group > 0 else x.size // shape[0]
            assert (axis, gs) == ((-1, group) if group > 0 else (0, 0)), f"{name}: axis {axis} group {gs}"
            assert len(data) == (x.size + 3) // 4, f"{name}: {len(data)} bytes"
            whole = x.size // unit * unit
            parts = [quantize_units(x[:whole].reshape(-1, unit))]
            if whole < x.size:
                parts.append(quantize_units(x[whole:].reshape(1, -1)))
            codes = np.concatenate([p[0].reshape(-1) for p in parts])
            ss = np.concatenate([p[1] for p in parts])
            zz = np.concatenate([p[2] for p in parts])
            assert pack(codes) == data, f"{name}: int2 bytes differ"
            assert ss.astype(np.float32).tobytes() == scales, f"{name}: scales differ"
            assert zz.astype(np.float32).tobytes() == zps, f"{name}: zero points differ"
            seed = seed_int2(data, shape, scales, zps, axis, gs)
        else:
            seed = seed_dequantize(qt, shape, dtype, data, scales, zps, axis, gs)
        mine = ours[name]
        assert seed.shape == mine.shape, f"{name}: shape"
        if seed.dtype.kind == "f":
            assert seed.dtype == np.float32 and mine.dtype == np.float32, f"{name}: {seed.dtype} {mine.dtype}"
            assert np.array_equal(seed.view(np.uint32), mine.view(np.uint32)), f"{name}: dequantized values differ"
        else:
            assert np.array_equal(seed, mine), f"{name}: values differ"
    pq.write_table(table.select(names[:10]).replace_schema_metadata(None), seed_out)
    print(f"ok {table.num_rows} tensors, {quantized} quantized")


if __name__ == "__main__":
    main()
