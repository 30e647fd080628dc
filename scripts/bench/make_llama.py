"""Writes a Llama-shaped sharded f32 checkpoint (TinyLlama-1.1B layout: real key names,
GQA shapes, random normal weights with std 0.02) and, optionally, the raw f16 bytes of
all its tensors in file order (the input of the zstd reference run).

usage: make_llama.py OUT_DIR LAYERS SHARDS [--f16-raw FILE] [--7b] [--bf16] [--bin]
--7b uses Llama-2-7B shapes (hidden 4096, mlp 11008, 32 heads, no GQA); --bf16 stores bf16;
--bin writes the same weights as PyTorch zip checkpoints (pytorch_model-0000N-of-0000M.bin
with pytorch_model.bin.index.json), laid out as torch.save lays them out: stored entries,
data 64-byte aligned, the state dict pickled with protocol 2. No torch needed.
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


def pickle_state_dict(group, storage):
    """The data.pkl torch.save writes for a dict of contiguous tensors, one storage each."""
    def uni(x):
        b = x.encode()
        return b"X" + struct.pack("<I", len(b)) + b

    def num(v):
        return b"J" + struct.pack("<i", v) if v < 2**31 else b"\x8a\x08" + struct.pack("<q", v)

    p = b"\x80\x02}q\x00("
    for key, (name, shape) in enumerate(group):
        n = int(np.prod(shape))
        strides = [int(np.prod(shape[i + 1:])) for i in range(len(shape))]
        p += uni(name) + b"ctorch._utils\n_rebuild_tensor_v2\n(("
        p += uni("storage") + b"ctorch\n" + storage + b"\n" + uni(str(key)) + uni("cpu") + num(n) + b"tQ"
        p += num(0) + b"(" + b"".join(num(d) for d in shape) + b"t(" + b"".join(num(d) for d in strides) + b"t"
        p += b"\x89ccollections\nOrderedDict\n)RtR"
    return p + b"u."


class ZipWriter:
    """Stored entries with their data 64-byte aligned (torch's layout, for mmap)."""

    def __init__(self, f):
        self.f, self.central = f, []

    def add(self, name, chunks, size):
        name = name.encode()
        off = self.f.tell()
        pad = -(off + 30 + len(name) + 4) % 64
        extra = struct.pack("<HH", 0xFFFB, pad) + b"\0" * pad
        self.f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, 0, size, size, len(name), len(extra)))
        self.f.write(name + extra)
        written = 0
        for c in chunks:
            self.f.write(c)
            written += len(c)
        assert written == size and off + size < 2**32, "entries past 4 GiB need ZIP64"
        self.central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0, 0, size, size,
                                        len(name), 0, 0, 0, 0, 0, off) + name)

    def close(self):
        off = self.f.tell()
        d = b"".join(self.central)
        self.f.write(d)
        self.f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(self.central), len(self.central), len(d), off, 0))


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
    if "--bin" in sys.argv:
        return write_bin(out, groups, rng, total, layers)
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
    write_config(out, layers)
    print(f"{out}: {len(items)} tensors, {total / 1e9:.2f} GB in {len(groups)} shards")


def write_bin(out, groups, rng, total, layers):
    weight_map = {}
    for i, group in enumerate(groups, 1):
        fname = f"pytorch_model-{i:05d}-of-{len(groups):05d}.bin"
        with open(out / fname, "wb") as f:
            z = ZipWriter(f)
            pkl = pickle_state_dict(group, b"BFloat16Storage" if BF16 else b"FloatStorage")
            z.add("pytorch_model/data.pkl", [pkl], len(pkl))
            z.add("pytorch_model/byteorder", [b"little"], 6)
            for key, (name, shape) in enumerate(group):
                a = rng.standard_normal(shape, dtype=np.float32)
                a *= 0.02
                b = (a.view(np.uint32) >> 16).astype(np.uint16).tobytes() if BF16 else a.tobytes()
                z.add(f"pytorch_model/data/{key}", [b], len(b))
                weight_map[name] = fname
            z.add("pytorch_model/version", [b"3\n"], 2)
            z.close()
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    write_config(out, layers)
    print(f"{out}: {sum(len(g) for g in groups)} tensors, {total / 1e9:.2f} GB in {len(groups)} .bin shards")


def write_config(out, layers):
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": MLP,
        "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": VOCAB,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16" if BF16 else "float32"}, indent=2))


if __name__ == "__main__":
    main()
