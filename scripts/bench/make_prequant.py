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
  nvfp4  ModelOpt NVFP4 (`weight` U8 [R, C/2] FP4 pairs, low nibble first,
         `weight_scale` F8_E4M3 per 16, `weight_scale_2` F32 [], `input_scale` F32 [])
  ct-mxfp4  compressed-tensors `mxfp4-pack-quantized` (`weight_packed` U8 [R, C/2],
         `weight_scale` U8 E8M0 per 32)
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
    elif scheme in ("nvfp4", "ct-mxfp4"):
        codes = rng.integers(0, 256, size=(r, c // 2), dtype=np.uint8)
        if scheme == "nvfp4":
            yield name, "U8", (r, c // 2), codes.tobytes()
            # E4M3 scales 0x20..0x5f (2^-4 .. 2^3, finite), a global scale of amax/2688.
            s = rng.integers(0x20, 0x60, size=(r, c // 16), dtype=np.uint8)
            yield stem + ".weight_scale", "F8_E4M3", (r, c // 16), s.tobytes()
            yield stem + ".weight_scale_2", "F32", (), np.float32(0.05 / 2688).tobytes()
            yield stem + ".input_scale", "F32", (), np.float32(0.01).tobytes()
        else:
            yield stem + ".weight_packed", "U8", (r, c // 2), codes.tobytes()
            s = rng.integers(118, 123, size=(r, c // 32), dtype=np.uint8)
            yield stem + ".weight_scale", "U8", (r, c // 32), s.tobytes()
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
         "ct": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                    "num_bits": 4, "type": "int", "strategy": "group", "group_size": 32,
                    "symmetric": True, "actorder": None}}},
                "ignore": ["lm_head"]},
         "nvfp4": {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16,
                   "ignore": ["lm_head"], "producer": {"name": "modelopt"}},
         "ct-mxfp4": {"quant_method": "compressed-tensors", "format": "mxfp4-pack-quantized",
                      "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                          "num_bits": 4, "type": "float", "strategy": "group", "group_size": 32,
                          "symmetric": True, "scale_dtype": "torch.uint8"}}},
                      "ignore": ["lm_head"]}}.get(scheme)
    if q:
        cfg["quantization_config"] = q
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    print(f"{out}: {scheme}, {len(items)} tensors, {total / 1e9:.2f} GB in {len(groups)} shards")


main()
