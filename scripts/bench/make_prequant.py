"""Writes the bench's Llama-shaped checkpoint (make_llama.py's TinyLlama-1.1B layout,
real key names) pre-quantized, for the dequantization bench: every linear layer as

  fp8    F8_E4M3 codes + F32 `weight_scale_inv` per 128x128 block (DeepSeek-V3 style)
  gptq   4-bit GPTQ, group 128 (`qweight`, `qzeros`, `scales` F16, `g_idx`)
  gptq-act  the same with `desc_act`: `g_idx` a permutation of the groups
  mxfp4  each MLP as one MXFP4 expert (`experts.gate_up_proj_blocks`/`_scales`,
         `experts.down_proj_blocks`/`_scales`, gpt-oss layout); attention stays bf16
  ct     compressed-tensors pack-quantized int4, symmetric, group 32, BF16 scales
         (`weight_packed`, `weight_scale`, `weight_shape`: Kimi-K2's W4A16 layout)
  awq    AWQ GEMM 4-bit, group 128 (`qweight` [in, out/8] in AWQ's nibble order,
         `qzeros`, `scales` F16)
  nf4    bitsandbytes nf4 with double quantization, blocks of 64 (`weight` U8, U8
         `absmax` through `nested_quant_map` with `nested_absmax` per 256, the JSON
         `quant_state`), as `save_pretrained` writes it
  fp4    bitsandbytes fp4, blocks of 64, F32 `absmax`
  int8   bitsandbytes LLM.int8 (`weight` I8, `SCB` F32 per row, `weight_format` 0)
  nvfp4  NVIDIA ModelOpt NVFP4 (`weight` U8 E2M1 pairs, `weight_scale` F8_E4M3 per
         16, `weight_scale_2` F32)
  nvfp4-real  the same format quantized from normal weights as ModelOpt's recipe does
         (`weight_scale_2` = amax / (6·448), each block's E4M3 scale nearest to its
         amax / 6 / `weight_scale_2`, each code the nearest E2M1 value): codes as
         trained weights give them (small magnitudes more frequent), where `nvfp4`'s
         are uniform bytes, the worst case for compression
  ct-nvfp4  compressed-tensors nvfp4-pack-quantized (`weight_packed`, `weight_scale`
         F8_E4M3 per 16, `weight_global_scale` F32 [1])
  ct-mxfp4  compressed-tensors mxfp4-pack-quantized (`weight_packed`, E8M0
         `weight_scale` per 32)
  mxfp8  compressed-tensors mxfp8-quantized (`weight` F8_E4M3, E8M0 `weight_scale`
         per 32)
  bf16   the reference: the same layout in bf16

with embeddings, norms and the LM head in bf16. Every variant dequantizes to the same
number of parameters, so each converts to the same f16 output size.

usage: make_prequant.py OUT_DIR LAYERS SHARDS SCHEME
"""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import make_llama as L  # noqa: E402

out, layers, shards, scheme = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = np.random.default_rng(0)
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def bf16(shape):
    a = rng.standard_normal(shape, dtype=np.float32) * 0.02
    return "BF16", shape, (a.view(np.uint32) >> 16).astype(np.uint16).tobytes()


NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)


def e4m3_values():
    """The 127 non-negative finite F8_E4M3 values, ascending, by code 0..126."""
    codes = np.arange(127)
    e, m = codes >> 3, codes & 7
    return np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * 2.0 ** (e - 7)).astype(np.float32)


E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)


def nearest(table, x):
    """Index of the nearest value of ascending `table` for each of `x` (>= 0)."""
    mid = (table[1:] + table[:-1]) / 2
    return np.searchsorted(mid, x)


def nvfp4_from_normal(r, c):
    """NVFP4 codes, E4M3 block scales and the global scale of a normal [r, c] weight,
    by ModelOpt's recipe (nearest E4M3 scale, nearest E2M1 code)."""
    w = rng.standard_normal((r, c), dtype=np.float32) * 0.02
    g = np.float32(np.abs(w).max() / (6 * 448))
    blocks = w.reshape(r, c // 16, 16)
    amax = np.abs(blocks).max(axis=2)
    e4 = e4m3_values()
    sc = nearest(e4, amax / 6 / g).astype(np.uint8)
    s = (e4[sc] * g)[..., None]
    mag = nearest(E2M1, np.abs(blocks) / np.where(s > 0, s, 1)).astype(np.uint8)
    nib = (mag | np.where(blocks < 0, 8, 0).astype(np.uint8)).reshape(r, c)
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).astype(np.uint8), sc, g


def e4m3_scales(shape):
    """Positive, finite F8_E4M3 codes around 2^-4..2^2 (no NaN)."""
    return rng.integers(0x28, 0x48, size=shape, dtype=np.uint8)


def bnb4(stem, shape, kind, nested):
    n = shape[0] * shape[1]
    blocks = -(-n // 64)
    yield stem + ".weight", "U8", ((n + 1) // 2, 1), rng.integers(0, 256, size=(n + 1) // 2, dtype=np.uint8).tobytes()
    state = {"quant_type": kind, "blocksize": 64, "dtype": "bfloat16", "shape": list(shape)}
    if nested:
        yield stem + ".weight.absmax", "U8", (blocks,), rng.integers(0, 256, size=blocks, dtype=np.uint8).tobytes()
    else:
        yield stem + ".weight.absmax", "F32", (blocks,), (rng.random(blocks, dtype=np.float32) * 0.05 + 0.01).tobytes()
    lut = NF4 if kind == "nf4" else np.array([0, 0.0052083, 0.6666667, 1, 0.3333333, 0.5, 0.1666667, 0.25] * 2, np.float32)
    yield stem + ".weight.quant_map", "F32", (16,), lut.astype(np.float32).tobytes()
    if nested:
        nb = -(-blocks // 256)
        yield stem + ".weight.nested_absmax", "F32", (nb,), (rng.random(nb, dtype=np.float32) * 1e-3 + 1e-4).tobytes()
        yield stem + ".weight.nested_quant_map", "F32", (256,), np.linspace(-1, 1, 256, dtype=np.float32).tobytes()
        state.update(nested_blocksize=256, nested_dtype="float32", nested_offset=0.03125)
    js = np.frombuffer(json.dumps(state).encode(), np.uint8)
    yield f"{stem}.weight.quant_state.bitsandbytes__{kind}", "U8", js.shape, js.tobytes()


def stored(name, shape):
    """The stored tensors of one source tensor under `scheme`: (name, dtype, shape, bytes)."""
    linear = name.endswith(".weight") and name.split(".")[-2] in LINEAR
    if scheme == "bf16" or not linear or (scheme == "mxfp4" and ".mlp." not in name):
        yield (name,) + bf16(shape)
        return
    r, c = shape
    stem = name[: -len(".weight")]
    if scheme == "fp8":
        q = rng.integers(0, 256, size=shape, dtype=np.uint8)
        q[(q & 0x7F) == 0x7F] -= 1  # no NaN codes
        yield name, "F8_E4M3", shape, q.tobytes()
        grid = (-(-r // 128), -(-c // 128))
        s = (rng.random(grid, dtype=np.float32) * 1e-4 + 1e-5).astype(np.float32)
        yield stem + ".weight_scale_inv", "F32", grid, s.tobytes()
    elif scheme in ("gptq", "gptq-act"):
        ins, outs = c, r
        g = ins // 128
        yield stem + ".qweight", "I32", (ins // 8, outs), rng.integers(0, 2**32, size=(ins // 8, outs), dtype=np.uint32).tobytes()
        yield stem + ".qzeros", "I32", (g, outs // 8), np.full((g, outs // 8), 0x77777777, np.uint32).tobytes()
        yield stem + ".scales", "F16", (g, outs), (rng.random((g, outs), dtype=np.float32) * 3e-3 + 1e-4).astype(np.float16).tobytes()
        g_idx = np.arange(ins) // 128
        if scheme == "gptq-act":
            g_idx = rng.permutation(g_idx)
        yield stem + ".g_idx", "I32", (ins,), g_idx.astype(np.int32).tobytes()
    elif scheme == "awq":
        ins, outs = c, r
        g = ins // 128
        yield stem + ".qweight", "I32", (ins, outs // 8), rng.integers(0, 2**32, size=(ins, outs // 8), dtype=np.uint32).tobytes()
        yield stem + ".qzeros", "I32", (g, outs // 8), rng.integers(0, 2**32, size=(g, outs // 8), dtype=np.uint32).tobytes()
        yield stem + ".scales", "F16", (g, outs), (rng.random((g, outs), dtype=np.float32) * 3e-3 + 1e-4).astype(np.float16).tobytes()
    elif scheme == "ct":
        # Codes q + 8 in [0, 16), eight to a little-endian int32 word along the input.
        q = rng.integers(0, 16, size=(r, c // 8, 8), dtype=np.uint32)
        words = np.bitwise_or.reduce(q << (np.arange(8, dtype=np.uint32) * 4), axis=-1)
        yield stem + ".weight_packed", "I32", (r, c // 8), words.astype(np.uint32).tobytes()
        s = rng.random((r, c // 32), dtype=np.float32) * 3e-3 + 1e-4
        yield stem + ".weight_scale", "BF16", (r, c // 32), (s.view(np.uint32) >> 16).astype(np.uint16).tobytes()
        yield stem + ".weight_shape", "I64", (2,), np.array([r, c], np.int64).tobytes()
    elif scheme in ("nf4", "fp4"):
        yield from bnb4(stem, shape, scheme, scheme == "nf4")
    elif scheme == "int8":
        yield name, "I8", shape, rng.integers(-127, 128, size=shape, dtype=np.int8).tobytes()
        scb = (rng.random(r, dtype=np.float32) * 0.1 + 0.01).astype(np.float16).astype(np.float32)
        yield stem + ".SCB", "F32", (r,), scb.tobytes()
        yield stem + ".weight_format", "U8", (), b"\0"
    elif scheme in ("nvfp4", "ct-nvfp4"):
        codes = rng.integers(0, 256, size=(r, c // 2), dtype=np.uint8)
        if scheme == "nvfp4":
            yield name, "U8", codes.shape, codes.tobytes()
            yield stem + ".weight_scale", "F8_E4M3", (r, c // 16), e4m3_scales((r, c // 16)).tobytes()
            yield stem + ".weight_scale_2", "F32", (), np.float32(2.5e-4).tobytes()
            yield stem + ".input_scale", "F32", (), np.float32(0.01).tobytes()
        else:
            yield stem + ".weight_packed", "U8", codes.shape, codes.tobytes()
            yield stem + ".weight_scale", "F8_E4M3", (r, c // 16), e4m3_scales((r, c // 16)).tobytes()
            yield stem + ".weight_global_scale", "F32", (1,), np.float32(4000.0).tobytes()
    elif scheme == "nvfp4-real":
        codes, scale, global_scale = nvfp4_from_normal(r, c)
        yield name, "U8", codes.shape, codes.tobytes()
        yield stem + ".weight_scale", "F8_E4M3", scale.shape, scale.tobytes()
        yield stem + ".weight_scale_2", "F32", (), np.float32(global_scale).tobytes()
        yield stem + ".input_scale", "F32", (), np.float32(0.01).tobytes()
    elif scheme == "ct-mxfp4":
        yield stem + ".weight_packed", "U8", (r, c // 2), rng.integers(0, 256, size=(r, c // 2), dtype=np.uint8).tobytes()
        yield stem + ".weight_scale", "U8", (r, c // 32), rng.integers(118, 123, size=(r, c // 32), dtype=np.uint8).tobytes()
    elif scheme == "mxfp8":
        q = rng.integers(0, 256, size=shape, dtype=np.uint8)
        q[(q & 0x7F) == 0x7F] -= 1  # no NaN codes
        yield name, "F8_E4M3", shape, q.tobytes()
        yield stem + ".weight_scale", "U8", (r, c // 32), rng.integers(118, 123, size=(r, c // 32), dtype=np.uint8).tobytes()
    elif scheme == "mxfp4":
        # gate and up become one expert's gate_up_proj [1, 2*MLP, H]; down_proj [1, H, MLP].
        base = stem.replace(".mlp.", ".mlp.experts.").rsplit(".", 1)[0]
        kind = stem.rsplit(".", 1)[1]
        if kind == "up_proj":
            return
        rows = 2 * r if kind == "gate_proj" else r
        tag = "gate_up_proj" if kind == "gate_proj" else "down_proj"
        # [E=1, out features, in/32, 16]: the output [1, in, out] is the transpose.
        blocks = rng.integers(0, 256, size=(1, rows, c // 32, 16), dtype=np.uint8)
        scales = rng.integers(118, 123, size=(1, rows, c // 32), dtype=np.uint8)
        yield f"{base}.{tag}_blocks", "U8", blocks.shape, blocks.tobytes()
        yield f"{base}.{tag}_scales", "U8", scales.shape, scales.tobytes()


def ct_float(fmt, bits, strategy, group, scale_dtype):
    """A compressed-tensors config of one float scheme over every Linear but lm_head."""
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "format": fmt, "weights": {
                "num_bits": bits, "type": "float", "strategy": strategy, "group_size": group,
                "symmetric": True, "dynamic": False, "scale_dtype": scale_dtype}}},
            "ignore": ["lm_head"]}


def main():
    out.mkdir(parents=True, exist_ok=True)
    items = [t for name, shape in L.tensors(layers) for t in stored(name, shape)]
    total = sum(len(b) for *_, b in items)
    per, groups, cur, size = total / shards, [], [], 0
    for it in items:
        cur.append(it)
        size += len(it[3])
        if size >= per and len(groups) < shards - 1:
            groups.append(cur)
            cur, size = [], 0
    groups.append(cur)
    weight_map = {}
    for i, group in enumerate(groups, 1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape, b in group:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(b)]}
            off += len(b)
            weight_map[name] = fname
        text = json.dumps(header)
        text += " " * (-len(text) % 8)
        with open(out / fname, "wb") as f:
            f.write(len(text).to_bytes(8, "little"))
            f.write(text.encode())
            for *_, b in group:
                f.write(b)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    L.BF16 = True
    L.write_config(out, layers)
    cfg = json.loads((out / "config.json").read_text())
    q = {"fp8": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
         "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True, "checkpoint_format": "gptq"},
         "gptq-act": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": True, "checkpoint_format": "gptq"},
         "mxfp4": {"quant_method": "mxfp4"},
         "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
         "nf4": {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                 "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                 "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8",
                 "llm_int8_skip_modules": None},
         "fp4": {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                 "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False,
                 "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8",
                 "llm_int8_skip_modules": None},
         "int8": {"quant_method": "bitsandbytes", "load_in_4bit": False, "load_in_8bit": True,
                  "llm_int8_threshold": 6.0, "llm_int8_skip_modules": None,
                  "llm_int8_has_fp16_weight": False},
         "nvfp4": {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16,
                   "exclude_modules": ["lm_head"]},
         "nvfp4-real": {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16,
                        "exclude_modules": ["lm_head"]},
         "ct-nvfp4": ct_float("nvfp4-pack-quantized", 4, "tensor_group", 16, "torch.float8_e4m3fn"),
         "ct-mxfp4": ct_float("mxfp4-pack-quantized", 4, "group", 32, "torch.uint8"),
         "mxfp8": ct_float("mxfp8-quantized", 8, "group", 32, "torch.uint8"),
         "ct": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                    "num_bits": 4, "type": "int", "strategy": "group", "group_size": 32,
                    "symmetric": True, "actorder": None}}},
                "ignore": ["lm_head"]}}.get(scheme)
    if q:
        cfg["quantization_config"] = q
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    print(f"{out}: {scheme}, {len(items)} tensors, {total / 1e9:.2f} GB in {len(groups)} shards")


main()
