"""Writes a Llama-shaped sharded f32 checkpoint (TinyLlama-1.1B layout: real key names,
GQA shapes, random normal weights with std 0.02) and, optionally, the raw f16 bytes of
all its tensors in file order (the input of the zstd reference run).

usage: make_llama.py OUT_DIR LAYERS SHARDS [--f16-raw FILE] [--7b] [--bf16]
--7b uses Llama-2-7B shapes (hidden 4096, mlp 11008, 32 heads, no GQA); --bf16 stores bf16.
"""
import json
import struct
import sys
from pathlib import Path

import numpy as np

H, MLP, VOCAB, KV = 2048, 5632, 32000, 256
if "--7b" in sys.argv:
    H, MLP, KV = 4096, 11008, 4096
BF16 = "--bf16" in sys.argv
ES = 2 if BF16 else 4


def tensors(layers):
    yield "model.embed_tokens.weight", (VOCAB, H)
    for l in range(layers):
        p = f"model.layers.{l}."
        yield p + "self_attn.q_proj.weight", (H, H)
        yield p + "self_attn.k_proj.weight", (KV, H)
        yield p + "self_attn.v_proj.weight", (KV, H)
        yield p + "self_attn.o_proj.weight", (H, H)
        yield p + "mlp.gate_proj.weight", (MLP, H)
        yield p + "mlp.up_proj.weight", (MLP, H)
        yield p + "mlp.down_proj.weight", (H, MLP)
        yield p + "input_layernorm.weight", (H,)
        yield p + "post_attention_layernorm.weight", (H,)
    yield "model.norm.weight", (H,)
    yield "lm_head.weight", (VOCAB, H)


def main():
    out, layers, shards = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    raw = Path(sys.argv[sys.argv.index("--f16-raw") + 1]) if "--f16-raw" in sys.argv else None
    out.mkdir(parents=True, exist_ok=True)
    items = list(tensors(layers))
    total = sum(int(np.prod(s)) * ES for _, s in items)
    per_shard = total / shards
    groups, cur, size = [], [], 0
    for name, shape in items:
        cur.append((name, shape))
        size += int(np.prod(shape)) * ES
        if size >= per_shard and len(groups) < shards - 1:
            groups.append(cur)
            cur, size = [], 0
    groups.append(cur)
    rng = np.random.default_rng(0)
    weight_map = {}
    raw_f = open(raw, "wb") if raw else None
    for i, group in enumerate(groups, 1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in group:
            n = int(np.prod(shape)) * ES
            header[name] = {"dtype": "BF16" if BF16 else "F32", "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
            weight_map[name] = fname
        text = json.dumps(header)
        text += " " * (-len(text) % 8)
        with open(out / fname, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text.encode())
            for name, shape in group:
                a = rng.standard_normal(shape, dtype=np.float32)
                a *= 0.02
                f.write((a.view(np.uint32) >> 16).astype(np.uint16).tobytes() if BF16 else a.tobytes())
                if raw_f:
                    raw_f.write(a.astype(np.float16).tobytes())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": MLP,
        "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": VOCAB,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16" if BF16 else "float32"}, indent=2))
    print(f"{out}: {len(items)} tensors, {total / 1e9:.2f} GB in {len(groups)} shards")


if __name__ == "__main__":
    main()
