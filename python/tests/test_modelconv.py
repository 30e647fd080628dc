"""The Python package against real inputs: the seed's own usage verbatim, round trips
of every fixture against numpy reads of the safetensors source, zero-copy reads, the
GIL released, bounded progress calls, Ctrl-C, the error hierarchy, threads."""
import _thread
import json
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import modelconv

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT / "tests" / "python"))
from seed_loader import bf16_to_f32, expected, read_safetensors  # noqa: E402

NAMES = ["tiny-bert", "tiny-sentence-transformer", "tiny-clip", "tiny-whisper", "tiny-llama-sharded-bf16"]
MINILM = ROOT / ".cache" / "all-MiniLM-L6-v2"


def header(path):
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return {k: v for k, v in json.loads(raw[8:8 + n]).items() if k != "__metadata__"}


def test_the_seeds_usage_verbatim_fills_every_result_field(tmp_path):
    from modelconv import ModelConverter, ConversionConfig

    out = tmp_path / "clip"
    result = ModelConverter(ConversionConfig()).convert(str(FIXTURES / "tiny-clip"), str(out), model_type="clip")
    assert result.success is True
    assert result.error_message is None
    assert result.model_name == str(FIXTURES / "tiny-clip")
    assert result.output_dir == str(out)
    assert result.parquet_path == str(out / "weights.parquet")
    assert result.metadata_path == str(out / "metadata.json")
    # tiny-clip ships no tokenizer files: the seed reports None then.
    assert not any((FIXTURES / "tiny-clip" / f).exists() for f in ["tokenizer.json", "vocab.json", "merges.txt"])
    assert result.tokenizer_path is None and not (out / "tokenizer").exists()
    vision = {k: v for k, v in header(FIXTURES / "tiny-clip" / "model.safetensors").items()
              if k.startswith("vision_model.") or k == "visual_projection.weight"}
    numel = sum(int(np.prod(v["shape"])) for v in vision.values())
    src_bytes = sum(v["data_offsets"][1] - v["data_offsets"][0] for v in vision.values())
    size = (out / "weights.parquet").stat().st_size
    assert result.total_parameters == numel
    assert result.file_size_mb == size / 2**20
    assert result.compression_ratio == pytest.approx(src_bytes / size, rel=1e-12)
    assert result.conversion_time_sec > 0
    assert result.validation_passed is True  # validate_output=True by default, as in the seed
    assert result.metadata == json.loads((out / "metadata.json").read_text())
    assert result.metadata["model_type"] == "CLIP Vision Transformer"


def test_a_failed_conversion_is_reported_not_raised(tmp_path):
    r = modelconv.ModelConverter().convert(str(tmp_path / "nope"), str(tmp_path / "o"))
    assert r.success is False
    assert r.error_message == f"{tmp_path / 'nope'}: cannot open: No such file or directory (os error 2)"
    assert r.total_parameters == 0 and r.parquet_path is None


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("target", ["f16", "f32", "keep"])
def test_every_fixture_reads_back_exactly_under_the_cast_rules(tmp_path, name, target):
    out = tmp_path / "o"
    modelconv.convert(FIXTURES / name, out, model_type="causallm", dtype=target, validate=False)
    src = read_safetensors(FIXTURES / name)
    f = modelconv.open(out)
    assert sorted(f.keys()) == sorted(src)
    for key, (src_dtype, arr) in src.items():
        got = f.get_tensor(key)
        _, want = expected(src_dtype, arr, target)
        if src_dtype == "BF16" and target == "keep":
            # No ml_dtypes here: bfloat16 comes back as float32, exactly.
            want = bf16_to_f32(want)
        assert got.shape == arr.shape, key
        assert got.dtype == want.dtype, key
        assert got.tobytes() == np.ascontiguousarray(want).tobytes(), key
        up = f.get_tensor(key, dtype="float32")
        assert up.dtype == np.float32
        if want.dtype.kind == "f":
            assert np.array_equal(up.view(np.uint32), want.astype(np.float32).view(np.uint32)), key


@pytest.mark.parametrize("name", NAMES)
def test_get_tensors_reads_in_parallel_what_get_tensor_reads_one_by_one(tmp_path, name):
    out = tmp_path / "o"
    # Small rows and row groups: tensors split over rows and across row groups.
    modelconv.convert(FIXTURES / name, out, model_type="causallm", dtype="keep", validate=False,
                      max_row_bytes=2000, row_group_bytes=10_000)
    f = modelconv.open(out)
    for dtype in (None, "float32"):
        every = f.get_tensors(dtype)
        assert list(every) == f.keys()
        for key, got in every.items():
            want = f.get_tensor(key, dtype)
            assert (got.dtype, got.shape) == (want.dtype, want.shape), key
            assert got.tobytes() == want.tobytes(), key
    assert list(modelconv.load_file(out)) == f.keys()


def test_reads_are_zero_copy_views_kept_alive_by_their_base(tmp_path):
    out = tmp_path / "o"
    modelconv.convert(FIXTURES / "tiny-bert", out)
    f = modelconv.open(out)
    a = f.get_tensor("embeddings.word_embeddings.weight")
    assert not a.flags.owndata
    assert not a.flags.writeable
    assert type(a.base).__name__ == "TensorBuffer"
    # The array is the buffer's memory itself, not a copy of it.
    assert np.shares_memory(a, np.asarray(a.base))
    assert a.__array_interface__["data"][0] == a.base.__array_interface__["data"][0]
    b = a.base
    del f
    assert a[0, 0] == np.asarray(b)[0, 0]


def test_the_gil_is_released_while_converting(tmp_path):
    ticks = 0
    stop = threading.Event()

    def count():
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            time.sleep(0.001)

    t = threading.Thread(target=count)
    t.start()
    started = time.monotonic()
    modelconv.convert(MINILM, tmp_path / "o", threads=1, compression_level=9, validate=False)
    elapsed = time.monotonic() - started
    stop.set()
    t.join()
    # With the GIL held for the whole conversion the counter could not move at all.
    assert elapsed > 0.1
    assert ticks > elapsed * 100, (ticks, elapsed)


def test_progress_calls_are_few_and_end_at_the_total(tmp_path):
    calls = []
    started = time.monotonic()
    modelconv.convert(MINILM, tmp_path / "o", threads=1, compression_level=9, validate=False,
                      progress=lambda done, total: calls.append((time.monotonic(), done, total)))
    elapsed = time.monotonic() - started
    assert calls, "at least the final call"
    assert len(calls) <= elapsed / 0.2 + 2, (len(calls), elapsed)
    assert calls[-1][1] == calls[-1][2] > 80_000_000
    assert all(a[1] <= b[1] for a, b in zip(calls, calls[1:]))


def test_keyboard_interrupt_stops_and_leaves_nothing(tmp_path):
    out = tmp_path / "o"
    timer = threading.Timer(0.3, _thread.interrupt_main)
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        modelconv.convert(MINILM, out, threads=1, compression_level=19, row_group_mb=1, validate=False)
    assert time.monotonic() - started < 10
    left = sorted(os.listdir(out)) if out.exists() else []
    assert not [n for n in left if ".tmp-" in n or n in ("weights.parquet", "metadata.json")], left


def test_errors_are_typed_and_carry_the_clis_messages(tmp_path):
    out = tmp_path / "o"
    modelconv.convert(FIXTURES / "tiny-bert", out)
    with pytest.raises(modelconv.OutputExistsError) as e:
        modelconv.convert(FIXTURES / "tiny-bert", out)
    assert isinstance(e.value, modelconv.Error) and isinstance(e.value, FileExistsError)
    assert str(e.value) == f"{out / 'weights.parquet'}: output already holds a conversion"
    with pytest.raises(modelconv.OptionError) as e:
        modelconv.convert(FIXTURES / "tiny-bert", tmp_path / "o2", compression_level=99)
    assert str(e.value) == "zstd level 99 is out of range (-131072 to 22)"
    assert not (tmp_path / "o2").exists()
    with pytest.raises(modelconv.UnsafeCheckpointError) as e:
        modelconv.convert(FIXTURES / "hostile-bin" / "reduce-system.bin", tmp_path / "o3")
    assert "refused global `posix.system`" in str(e.value)
    assert isinstance(e.value, modelconv.InputError) and isinstance(e.value, ValueError)
    with pytest.raises(modelconv.TensorNotFoundError) as e:
        modelconv.open(out).get_tensor("nope")
    assert isinstance(e.value, KeyError)
    assert str(e.value) == f"{out / 'weights.parquet'}: no tensor named `nope`"
    with pytest.raises(modelconv.CorruptFileError):
        bad = tmp_path / "bad.parquet"
        bad.write_bytes(b"PAR1 not really")
        modelconv.open(bad)
    with pytest.raises(TypeError):
        modelconv.convert(FIXTURES / "tiny-bert", tmp_path / "o4", no_such_option=1)
    # The same message the CLI prints after `error: `.
    cli = ROOT / "target" / "debug" / "modelconv"
    if cli.exists():
        o = subprocess.run([str(cli), "convert", str(FIXTURES / "tiny-bert"), "-o", str(out)], capture_output=True, text=True)
        assert o.stderr.startswith(f"error: {out / 'weights.parquet'}: output already holds a conversion")


def test_conversions_from_several_threads_at_once(tmp_path):
    errors = []

    def run(i):
        try:
            modelconv.convert(FIXTURES / NAMES[i], tmp_path / f"o{i}", model_type="causallm", validate=True)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(NAMES))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for i, name in enumerate(NAMES):
        assert len(modelconv.open(tmp_path / f"o{i}")) == len(read_safetensors(FIXTURES / name))


# Converts MiniLM in a fresh interpreter (`at_once` conversions in threads) and prints
# its resident memory before, after, and at the peak, in MiB.
RSS_PROBE = """
import json, re, sys, threading, modelconv
def mib(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
src, out, options, at_once = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
before = mib("VmRSS")
ts = [threading.Thread(target=modelconv.convert, args=(src, f"{out}{i}"), kwargs=dict(validate=False, **options))
      for i in range(at_once)]
for t in ts:
    t.start()
for t in ts:
    t.join()
print(before, mib("VmRSS"), mib("VmHWM"))
"""


@pytest.mark.parametrize("options,at_once", [({}, 1), ({"max_row_mb": 64}, 1), ({}, 2)])
def test_a_conversion_hands_its_memory_back_when_it_returns(tmp_path, options, at_once):
    # While conversions run, the memory they free is kept for reuse (as in the CLI);
    # when the last one returns, it goes back to the system. (Before, about 100 MiB of
    # the 106 MiB a MiniLM conversion used stayed resident afterwards.)
    o = subprocess.run([sys.executable, "-c", RSS_PROBE, str(MINILM), str(tmp_path / "o"), json.dumps(options),
                        str(at_once)], capture_output=True, text=True)
    assert o.returncode == 0, o.stderr
    before, after, peak = map(float, o.stdout.split())
    for i in range(at_once):
        assert len(modelconv.open(tmp_path / f"o{i}")) == len(read_safetensors(MINILM))
    assert peak - before > 64, f"the conversion used {peak - before:.0f} MiB: nothing to hand back"
    assert after - before < 24, f"{after - before:.0f} MiB of the {peak - before:.0f} MiB used stayed resident"


def test_quantized_tensors_come_back_dequantized_like_the_seed_loader(tmp_path):
    out = tmp_path / "o"
    modelconv.convert(MINILM, out, quantize="int8", validate=False)
    t = pq.read_table(out / "weights.parquet")
    f = modelconv.open(out)
    i = t.column("layer_name").to_pylist().index("encoder.layer.0.attention.self.query.weight")
    q = np.frombuffer(t.column("data")[i].as_py(), np.int8).astype(np.float32).reshape(384, 384)
    s = np.frombuffer(t.column("scales")[i].as_py(), np.float32)
    z = np.frombuffer(t.column("zero_points")[i].as_py(), np.float32)
    want = (q - z[:, None]) * s[:, None]
    got = f.get_tensor("encoder.layer.0.attention.self.query.weight")
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert f.info("encoder.layer.0.attention.self.query.weight")["quant"] == {"axis": 0, "group_size": 0, "scales": 384}
    every = f.get_tensors()
    assert every["encoder.layer.0.attention.self.query.weight"].tobytes() == got.tobytes()


def test_int2_tensors_come_back_dequantized_like_the_seed_loader(tmp_path):
    out = tmp_path / "o"
    modelconv.convert(MINILM, out, quantize="int2", validate=False)
    t = pq.read_table(out / "weights.parquet")
    f = modelconv.open(out)
    name = "encoder.layer.0.attention.self.query.weight"
    i = t.column("layer_name").to_pylist().index(name)
    assert t.column("quant_type")[i].as_py() == "int2" and t.column("group_size")[i].as_py() == 128
    b = np.frombuffer(t.column("data")[i].as_py(), np.uint8)
    assert b.size == 384 * 384 // 4
    # The seed loader's unpacking: the two highest bits first, code q + 2.
    q = np.stack([(b >> 6) & 3, (b >> 4) & 3, (b >> 2) & 3, b & 3], axis=1).reshape(-1).astype(np.float32) - 2
    s = np.frombuffer(t.column("scales")[i].as_py(), np.float32)
    z = np.frombuffer(t.column("zero_points")[i].as_py(), np.float32)
    g = np.arange(q.size) // 128
    want = ((q - z[g]) * s[g]).astype(np.float32).reshape(384, 384)
    got = f.get_tensor(name)
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert f.info(name)["quant"] == {"kind": "int2", "axis": -1, "group_size": 128, "scales": 1152}
    assert f.get_tensors()[name].tobytes() == got.tobytes()
    with pytest.raises(modelconv.OptionError, match=r"^quantize `int4`: only int8 and int2 are supported$"):
        modelconv.convert(MINILM, tmp_path / "p", quantize="int4")


def test_files_written_by_the_seed_and_load_file(tmp_path):
    path = tmp_path / "seed.parquet"
    w = np.arange(6, dtype=np.float16).reshape(2, 3)
    ids = np.arange(4, dtype=np.int64)
    pq.write_table(pa.table({
        "layer_name": ["w", "ids"],
        "shape": pa.array([[2, 3], [4]], pa.list_(pa.int32())),
        "dtype": ["torch.float16", "torch.int64"],
        "data": pa.array([w.tobytes(), ids.tobytes()], pa.binary()),
        "num_params": pa.array([6, 4], pa.int64()),
    }), path)
    all_ = modelconv.load_file(path)
    assert list(all_) == ["w", "ids"]
    assert np.array_equal(all_["w"], w) and all_["w"].dtype == np.float16
    assert np.array_equal(all_["ids"], ids)
    assert modelconv.open(path).metadata is None


def test_verify_from_python(tmp_path):
    out = tmp_path / "o"
    modelconv.convert(FIXTURES / "tiny-llama-sharded-bin", out, validate=False)
    r = modelconv.verify(out, FIXTURES / "tiny-llama-sharded-bin")
    assert r["passed"] and r["compared_with_source"] and r["tensors"] == 39


def test_tokenizer_files_come_along_and_the_path_is_reported(tmp_path):
    out = tmp_path / "minilm"
    r = modelconv.ModelConverter(modelconv.ConversionConfig(validate_output=False)).convert(str(MINILM), str(out))
    assert r.success and r.tokenizer_path == str(out / "tokenizer")
    for name in ["tokenizer.json", "vocab.txt", "special_tokens_map.json"]:
        assert (out / "tokenizer" / name).read_bytes() == (MINILM / name).read_bytes()


def read_reference(path):
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    h = json.loads(raw[8:8 + n])
    return {k: np.frombuffer(raw[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]], np.float32).reshape(v["shape"])
            for k, v in h.items() if k != "__metadata__"}


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("name", ["fp8-block", "gptq-4bit-desc-act", "gptq-4bit", "mxfp4", "ct-w4a16"])
def test_prequantized_checkpoints_convert_and_read_back_unchanged(tmp_path, name, dtype):
    # f16 takes the kernels that write f16 directly (FP8 E4M3, MXFP4): numpy's
    # float32 -> float16 (round to nearest even) of the reference is the expected value.
    src = FIXTURES / "prequant" / name
    ref = read_reference(FIXTURES / "prequant" / f"{name}.reference.safetensors")
    result = modelconv.ModelConverter(modelconv.ConversionConfig(dtype=dtype)).convert(str(src), str(tmp_path / "o"))
    assert result.success and result.validation_passed, result.error_message
    f = modelconv.open(tmp_path / "o")
    for k, want in ref.items():
        got = f.get_tensor(k)
        want = want.astype(np.float16) if dtype == "f16" else want
        assert got.dtype == want.dtype and np.array_equal(got.view(np.uint8), want.view(np.uint8)), k
    assert json.loads((tmp_path / "o" / "metadata.json").read_text())["source_quantization"]["kept_quantized"] is False


def test_lossless_carries_prequantized_codes_and_refuses_what_it_cannot(tmp_path):
    # GPTQ 4-bit in input order: both weights carried from their codes; the embedding,
    # not pre-quantized, stays an fp16 row under lossless.
    src = FIXTURES / "prequant" / "gptq-4bit"
    r = modelconv.convert(src, tmp_path / "o", quantize="int8", lossless=True, validate=False)
    q = r["quantization"]
    assert q["carried"] == ["model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"]
    assert q["requantized"] == [] and q["model"]["sqnr_db"] is None
    t = pq.read_table(tmp_path / "o" / "weights.parquet")
    kinds = dict(zip(t.column("layer_name").to_pylist(), t.column("quant_type").to_pylist()))
    assert kinds["model.embed_tokens.weight"] == "fp16"
    ref = read_reference(FIXTURES / "prequant" / "gptq-4bit.reference.safetensors")
    f = modelconv.open(tmp_path / "o")
    for k, want in ref.items():
        assert np.array_equal(f.get_tensor(k).view(np.uint32), want.view(np.uint32)), k
    # The same option through ModelConverter; act-order GPTQ cannot be carried.
    cfg = modelconv.ConversionConfig(quantize="int8", lossless=True)
    result = modelconv.ModelConverter(cfg).convert(str(FIXTURES / "prequant" / "gptq-4bit-desc-act"), str(tmp_path / "x"))
    assert not result.success and "act-order g_idx" in result.error_message
    with pytest.raises(modelconv.QuantizationError, match=r"tensor `model.layers.0.mlp.down_proj.weight`: cannot quantize: --lossless, and its codes cannot be carried into V2 exactly: act-order g_idx"):
        modelconv.convert(FIXTURES / "prequant" / "gptq-4bit-desc-act", tmp_path / "y", quantize="int8", lossless=True)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_prequantized_checkpoint_without_its_scale_is_a_typed_error(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    cfg = json.loads((FIXTURES / "prequant" / "fp8-block" / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(cfg))
    h = header(FIXTURES / "prequant" / "fp8-block" / "model.safetensors")
    w = h["model.layers.0.self_attn.q_proj.weight"]
    # A one-tensor file: the fp8 weight alone, its scale missing.
    raw = Path(FIXTURES / "prequant" / "fp8-block" / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    b, e = w["data_offsets"]
    hdr = json.dumps({"q.weight": {"dtype": "F8_E4M3", "shape": w["shape"], "data_offsets": [0, e - b]}}).encode()
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(hdr)) + hdr + raw[8 + n + b:8 + n + e])
    with pytest.raises(modelconv.PrequantizedError, match=r"tensor `q.weight`: pre-quantized \(fp8\): its `weight_scale_inv` is missing"):
        modelconv.convert(src, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    r = modelconv.convert(src, tmp_path / "kept", keep_quantized=True, validate=False)
    t = pq.read_table(tmp_path / "kept" / "weights.parquet")
    assert t.column("dtype").to_pylist() == ["torch.float8_e4m3fn"]


def test_a_parted_conversion_resumes_and_reads_back_as_one_file(tmp_path):
    from modelconv import ModelConverter, ConversionConfig

    one, parted = tmp_path / "one", tmp_path / "parted"
    modelconv.convert(MINILM, one, validate=False)
    cfg = ConversionConfig(max_file_size="10MB", validate_output=True)
    r = ModelConverter(cfg).convert(str(MINILM), str(parted))
    assert r.success, r.error_message
    assert r.validation_passed is True
    files = sorted(p.name for p in (parted / "weights.parquet").iterdir())
    assert files[0] == "_manifest.json" and len(files) == len(r.parts) + 1
    assert [p["file"] for p in r.parts] == files[1:]
    assert all(p["status"] == "written" and p["bytes"] <= 10_000_000 for p in r.parts)
    assert r.file_size_mb == sum(p["bytes"] for p in r.parts) / 2**20
    # Every tensor reads back from the parts as from the single file, bit for bit.
    a, b = modelconv.load_file(one), modelconv.load_file(parted)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k
    assert modelconv.open(parted).get_tensor("embeddings.word_embeddings.weight").shape == (30522, 384)
    # Interrupted (no manifest, no metadata.json): resume keeps every part.
    (parted / "metadata.json").unlink()
    (parted / "weights.parquet" / "_manifest.json").unlink()
    with pytest.raises(modelconv.CorruptFileError, match="not a complete conversion"):
        modelconv.open(parted)
    r2 = ModelConverter(ConversionConfig(max_file_size=10_000_000, resume=True)).convert(str(MINILM), str(parted))
    assert r2.success, r2.error_message
    assert [p["status"] for p in r2.parts] == ["kept"] * len(r.parts)
    assert [p["xxh3_128"] for p in r2.parts] == [p["xxh3_128"] for p in r.parts]
    # Other options are refused, saying which.
    (parted / "metadata.json").unlink()
    with pytest.raises(modelconv.OutputError, match=r"cannot resume: it was converted with other options: compression_level 3 \(now 5\)"):
        modelconv.convert(MINILM, parted, max_file_size="10MB", resume=True, compression_level=5)


def test_duckdb_and_polars_read_a_parted_output_with_a_glob(tmp_path):
    import duckdb
    import polars as pl

    one, parted = tmp_path / "one", tmp_path / "parted"
    modelconv.convert(MINILM, one, validate=False)
    modelconv.convert(MINILM, parted, max_file_size="8MB", validate=False)
    parts = sorted((parted / "weights.parquet").glob("part-*.parquet"))
    assert len(parts) >= 4
    glob = str(parted / "weights.parquet" / "*.parquet")

    def grouped(names, datas):
        out = []
        for n, d in zip(names, datas):
            if out and out[-1][0] == n:
                out[-1][1] += d
            else:
                out.append([n, d])
        return out

    single = pq.read_table(one / "weights.parquet")
    want = grouped(single.column("layer_name").to_pylist(), single.column("data").to_pylist())
    # Rows in part order (file name order), as the files sort.
    rows = duckdb.sql(
        f"SELECT layer_name, data FROM read_parquet('{glob}', filename = true, file_row_number = true) "
        "ORDER BY filename, file_row_number"
    ).fetchall()
    assert grouped([r[0] for r in rows], [bytes(r[1]) for r in rows]) == want
    df = pl.read_parquet(glob)
    assert grouped(df["layer_name"].to_list(), df["data"].to_list()) == want


def test_parts_converted_one_by_one_commit_into_the_whole_conversion(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    opts = dict(max_file_size="8MB", validate=False)
    modelconv.convert(MINILM, whole, **opts)
    p = modelconv.plan(MINILM, **opts)
    n = len(p["parts"])
    assert n >= 4 and [x["file"] for x in p["parts"]] == [f"part-{k + 1:05}-of-{n:05}.parquet" for k in range(n)]
    got = [modelconv.convert_part(MINILM, parts, k, **opts) for k in reversed(range(n))][::-1]
    assert [g["status"] for g in got] == ["written"] * n
    assert not (parts / "metadata.json").exists()
    r = modelconv.convert(MINILM, parts, resume=True, **opts)
    assert [x["status"] for x in r["parts"]] == ["kept"] * n
    want = json.loads((whole / "weights.parquet" / "_manifest.json").read_text())["parts"]
    assert [x["xxh3_128"] for x in r["parts"]] == [g["xxh3_128"] for g in got] == [w["xxh3_128"] for w in want]
    with pytest.raises(modelconv.OptionError, match="part 99 does not exist"):
        modelconv.convert_part(MINILM, parts, 99, **opts)


@pytest.fixture
def hub(tmp_path):
    """The Hub-like server of tests/servers (loopback, two ports), stopped afterwards."""
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "servers" / "hub_server.py"),
         "--repo", f"org/bert={FIXTURES / 'tiny-bert'}", "--repo", f"me/private={FIXTURES / 'tiny-bert'}",
         "--private", "me/private", "--token", "hf_pytoken_123"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    port, _storage = server.stdout.readline().split()
    old = os.environ.get("HF_ENDPOINT")
    os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{int(port)}"
    os.environ.pop("HF_TOKEN", None)
    yield server
    if old is None:
        os.environ.pop("HF_ENDPOINT", None)
    else:
        os.environ["HF_ENDPOINT"] = old
    server.stdin.close()
    server.kill()
    server.wait()


def test_a_checkpoint_on_the_hub_converts_like_the_local_one(tmp_path, hub):
    local = modelconv.ModelConverter().convert(str(FIXTURES / "tiny-bert"), str(tmp_path / "l"))
    remote = modelconv.ModelConverter().convert("hf://org/bert", str(tmp_path / "r"))
    assert local.success and remote.success, remote.error_message
    assert remote.model_name == "hf://org/bert"
    a = pq.read_table(tmp_path / "l" / "weights.parquet", memory_map=True)
    b = pq.read_table(tmp_path / "r" / "weights.parquet", memory_map=True)
    assert a.equals(b)
    with modelconv.WeightFile(tmp_path / "r") as wr, modelconv.WeightFile(tmp_path / "l") as wl:
        name = "embeddings.word_embeddings.weight"
        assert np.array_equal(wr.get_tensor(name), wl.get_tensor(name))
    # A private repository: a typed error naming it without the token, then with it.
    with pytest.raises(modelconv.RemoteAccessError, match=r"^hf://me/private: access denied \(401\)"):
        modelconv.convert("hf://me/private", tmp_path / "p")
    token = tmp_path / "token"
    token.write_text("hf_pytoken_123\n")
    modelconv.convert("hf://me/private", tmp_path / "p", token_file=str(token))
    assert pq.read_table(tmp_path / "p" / "weights.parquet").equals(a)
    # As on the Hub, a repository that does not exist answers 401 to a caller without
    # access: the same typed error, saying it may not exist.
    with pytest.raises(modelconv.RemoteAccessError, match=r"or does not exist: Repository Not Found"):
        modelconv.convert("hf://org/absent", tmp_path / "x")
    assert not (tmp_path / "x").exists()
