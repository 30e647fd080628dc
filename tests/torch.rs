//! PyTorch checkpoints as input: the torch-written fixtures convert to exactly what their
//! safetensors twins give, views come out as torch materialises them (its own
//! `reference.safetensors`), and every hostile or damaged file of RELIABILITY rows
//! 31–40 is refused through the real binary with its exact error, nothing run, nothing
//! written.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use modelconv::{convert, ConvertConfig, IoMode, ModelType, TargetDtype, WeightFile};

/// Every tensor of a conversion: name → (dtype, shape, data).
fn tensors(out: &Path) -> BTreeMap<String, (String, Vec<u64>, Vec<u8>)> {
    let wf = WeightFile::open(out).unwrap();
    wf.tensors()
        .iter()
        .map(|t| {
            let d = wf.tensor(&t.name).unwrap();
            (
                t.name.clone(),
                (t.dtype.torch_name().to_string(), t.shape.clone(), d.data),
            )
        })
        .collect()
}

#[test]
fn bin_fixtures_convert_exactly_like_their_safetensors_twins() {
    let tmp = tempdir();
    let pairs = [
        ("tiny-bert-bin", "tiny-bert"),
        ("tiny-bert-bin-legacy", "tiny-bert"),
        ("tiny-llama-sharded-bin", "tiny-llama-sharded-bf16"),
    ];
    for (bin, st) in pairs {
        for target in [
            TargetDtype::F16,
            TargetDtype::Bf16,
            TargetDtype::F32,
            TargetDtype::Keep,
        ] {
            let cfg = ConvertConfig::builder()
                .dtype(target)
                .model_type(ModelType::CausalLm)
                .build()
                .unwrap();
            let (a, b) = (
                tmp.path().join(format!("{bin}-{target}")),
                tmp.path().join(format!("{st}-{target}-{bin}")),
            );
            let r = convert(fixture(bin), &a, &cfg).unwrap();
            convert(fixture(st), &b, &cfg).unwrap();
            let (ta, tb) = (tensors(&a), tensors(&b));
            assert_eq!(ta.len(), r.tensors);
            assert!(ta == tb, "{bin} and {st} differ under --dtype {target}");
            // And the safetensors conversion is the exact cast of the source (tested
            // bit for bit in tests/convert.rs), so the .bin one is too.
            let src = read_source(&fixture(st));
            assert_matches_source(&a, &src, &same_names(&src), &target.to_string());
        }
    }
}

#[test]
fn tricky_storages_come_out_as_torch_materialises_them() {
    // reference.safetensors was written by torch from `.contiguous()` copies of every
    // tensor: tied weights, a transposed view, a slice at a storage offset, a 0-d
    // scalar, int64, bool, f16 and bf16.
    let dir = fixture("tricky-storage-bin");
    let src = read_source(&dir);
    let tmp = tempdir();
    for target in ["keep", "f16", "bf16", "f32"] {
        let out = tmp.path().join(target);
        let cfg = ConvertConfig::builder()
            .dtype(target.parse().unwrap())
            .build()
            .unwrap();
        let r = convert(dir.join("pytorch_model.bin"), &out, &cfg).unwrap();
        assert_eq!(r.tensors, 9);
        assert_matches_source(&out, &src, &same_names(&src), target);
        let m = metadata(&out);
        assert_eq!(
            m["tied_weights"],
            serde_json::json!({"lm_head.weight": "model.embed_tokens.weight"})
        );
        assert!(
            r.notices.iter().any(|n| n
                == "`lm_head.weight` shares its storage with `model.embed_tokens.weight` (tied weights): \
                    both are stored, the tie is recorded in metadata.json"),
            "{:?}",
            r.notices
        );
    }
    // verify --source on the .bin compares every value bit for bit, views included.
    assert_verifies(&tmp.path().join("f16"), &dir.join("pytorch_model.bin"));
    // export of the keep conversion gives torch's contiguous view of every tensor.
    let st = tmp.path().join("back.safetensors");
    modelconv::export(tmp.path().join("keep"), &st, &Default::default()).unwrap();
    assert_safetensors_equal_source(&st, &src);
}

#[test]
fn a_directory_with_both_formats_uses_safetensors_and_says_so() {
    let tmp = tempdir();
    let model = copy_dir(&fixture("tiny-bert"), &tmp.path().join("m"));
    std::fs::copy(
        fixture("tiny-bert-bin/pytorch_model.bin"),
        model.join("pytorch_model.bin"),
    )
    .unwrap();
    let p = modelconv::plan_conversion(&model, &ConvertConfig::default()).unwrap();
    assert_eq!(
        p.notices[0],
        "the directory has safetensors and PyTorch .bin weights; using safetensors"
    );
    // Without the safetensors file the .bin is used.
    std::fs::remove_file(model.join("model.safetensors")).unwrap();
    let p = modelconv::plan_conversion(&model, &ConvertConfig::default()).unwrap();
    assert!(p.notices.is_empty(), "{:?}", p.notices);
    assert_eq!(p.kept.len(), 39);
    // Two loose .bin files and no index: name one.
    std::fs::copy(
        fixture("tiny-bert-bin/pytorch_model.bin"),
        model.join("other.pt"),
    )
    .unwrap();
    std::fs::rename(model.join("pytorch_model.bin"), model.join("a.bin")).unwrap();
    let err = modelconv::plan_conversion(&model, &ConvertConfig::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: no weights: 2 PyTorch (.bin, .pt, .pth) files and no index; name one file or the index",
            model.display()
        )
    );
}

#[test]
fn sharded_bin_index_and_shards_must_agree_both_ways() {
    let tmp = tempdir();
    let model = copy_dir(&fixture("tiny-llama-sharded-bin"), &tmp.path().join("m"));
    let index = model.join("pytorch_model.bin.index.json");
    edit_json(&index, |v| {
        v["weight_map"]["lm_head.weight"] = "pytorch_model-00001-of-00005.bin".into()
    });
    let err = modelconv::plan_conversion(&model, &ConvertConfig::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: tensor `lm_head.weight`: the index maps it to pytorch_model-00001-of-00005.bin, \
             but it is in pytorch_model-00005-of-00005.bin",
            index.display()
        )
    );
}

#[test]
fn read_mode_converts_the_same_bytes_as_mmap() {
    let tmp = tempdir();
    for input in [
        fixture("tiny-llama-sharded-bf16"),
        fixture("tiny-llama-sharded-bin"),
        fixture("tricky-storage-bin/pytorch_model.bin"),
        fixture("tiny-bert-bin-legacy"),
    ] {
        let mut files = Vec::new();
        for io in [IoMode::Mmap, IoMode::Read] {
            let o = bin()
                .arg("convert")
                .arg(&input)
                .arg("-o")
                .arg(tmp.path().join("o"))
                .args(["--force", "-q", "--model-type", "causallm", "--io"])
                .arg(if io == IoMode::Mmap { "mmap" } else { "read" })
                .env("SOURCE_DATE_EPOCH", "1")
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", text(&o.stderr));
            files.push(std::fs::read(tmp.path().join("o/weights.parquet")).unwrap());
        }
        assert!(
            files[0] == files[1],
            "{}: read mode differs",
            input.display()
        );
    }
}

// ---------------------------------------------------------------------------------
// Hostile and damaged files, through the real binary (RELIABILITY rows 31–40).

/// A minimal zip writer: STORED (or another method, for row 37) entries, then the
/// central directory.
fn zip(entries: &[(&str, &[u8], u16)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data, method) in entries {
        let local = out.len() as u32;
        let n = name.as_bytes();
        let mut h = Vec::new();
        h.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        h.extend_from_slice(&20u16.to_le_bytes());
        h.extend_from_slice(&0u16.to_le_bytes());
        h.extend_from_slice(&method.to_le_bytes());
        h.extend_from_slice(&[0; 8]); // time, date, crc (not checked)
        h.extend_from_slice(&(data.len() as u32).to_le_bytes());
        h.extend_from_slice(&(data.len() as u32).to_le_bytes());
        h.extend_from_slice(&(n.len() as u16).to_le_bytes());
        h.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(n);
        out.extend_from_slice(data);
        let mut c = Vec::new();
        c.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        c.extend_from_slice(&20u16.to_le_bytes());
        c.extend_from_slice(&20u16.to_le_bytes());
        c.extend_from_slice(&0u16.to_le_bytes());
        c.extend_from_slice(&method.to_le_bytes());
        c.extend_from_slice(&[0; 8]);
        c.extend_from_slice(&(data.len() as u32).to_le_bytes());
        c.extend_from_slice(&(data.len() as u32).to_le_bytes());
        c.extend_from_slice(&(n.len() as u16).to_le_bytes());
        c.extend_from_slice(&[0; 12]); // extra, comment, disk, attrs
        c.extend_from_slice(&local.to_le_bytes());
        c.extend_from_slice(n);
        central.push(c);
    }
    let dir_off = out.len() as u32;
    let dir: Vec<u8> = central.concat();
    out.extend_from_slice(&dir);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(dir.len() as u32).to_le_bytes());
    out.extend_from_slice(&dir_off.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

/// One tensor of a hand-built state dict.
struct T<'a> {
    name: &'a str,
    storage: &'a str,
    key: &'a str,
    numel: i64,
    offset: i64,
    size: &'a [i64],
    stride: &'a [i64],
}

fn int(p: &mut Vec<u8>, v: i64) {
    p.push(b'J');
    p.extend_from_slice(&(v as i32).to_le_bytes());
}

fn unicode(p: &mut Vec<u8>, s: &str) {
    p.push(b'X');
    p.extend_from_slice(&(s.len() as u32).to_le_bytes());
    p.extend_from_slice(s.as_bytes());
}

fn ints(p: &mut Vec<u8>, v: &[i64]) {
    p.push(b'(');
    for &x in v {
        int(p, x);
    }
    p.push(b't');
}

/// A protocol-2 state-dict pickle of the shape torch writes.
fn state_dict(tensors: &[T]) -> Vec<u8> {
    let mut p = b"\x80\x02}(".to_vec();
    for t in tensors {
        unicode(&mut p, t.name);
        p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n((");
        unicode(&mut p, "storage");
        p.extend_from_slice(format!("ctorch\n{}\n", t.storage).as_bytes());
        unicode(&mut p, t.key);
        unicode(&mut p, "cpu");
        int(&mut p, t.numel);
        p.extend_from_slice(b"tQ");
        int(&mut p, t.offset);
        ints(&mut p, t.size);
        ints(&mut p, t.stride);
        p.extend_from_slice(b"\x89ccollections\nOrderedDict\n)RtR");
    }
    p.extend_from_slice(b"u.");
    p
}

fn checkpoint(pkl: &[u8], storages: &[(&str, &[u8])]) -> Vec<u8> {
    let mut entries: Vec<(String, Vec<u8>, u16)> = vec![
        ("archive/data.pkl".into(), pkl.to_vec(), 0),
        ("archive/byteorder".into(), b"little".to_vec(), 0),
    ];
    for (k, d) in storages {
        entries.push((format!("archive/data/{k}"), d.to_vec(), 0));
    }
    entries.push(("archive/version".into(), b"3\n".to_vec(), 0));
    let refs: Vec<(&str, &[u8], u16)> = entries
        .iter()
        .map(|(n, d, m)| (n.as_str(), d.as_slice(), *m))
        .collect();
    zip(&refs)
}

const W: T = T {
    name: "w",
    storage: "FloatStorage",
    key: "0",
    numel: 4,
    offset: 0,
    size: &[2, 2],
    stride: &[2, 1],
};

fn good_checkpoint() -> Vec<u8> {
    checkpoint(&state_dict(&[W]), &[("0", &f32s(&[1.0, 2.0, 3.0, 4.0]))])
}

#[test]
fn the_hand_built_checkpoint_converts_so_the_refusals_below_are_for_their_one_change() {
    let tmp = tempdir();
    let file = tmp.path().join("good.bin");
    std::fs::write(&file, good_checkpoint()).unwrap();
    let out = tmp.path().join("o");
    let cfg = ConvertConfig::builder()
        .model_type(ModelType::CausalLm)
        .dtype(TargetDtype::Keep)
        .build()
        .unwrap();
    convert(&file, &out, &cfg).unwrap();
    let t = WeightFile::open(&out).unwrap().tensor("w").unwrap();
    assert_eq!(t.shape, vec![2, 2]);
    assert_eq!(t.data, f32s(&[1.0, 2.0, 3.0, 4.0]));
}

#[test]
fn row_31_globals_outside_the_allowlist_are_refused_and_never_run() {
    let tmp = tempdir();
    let pwned = std::env::temp_dir().join("modelconv-pwned");
    let _ = std::fs::remove_file(&pwned);
    // torch's own hostile fixtures: posix.system through REDUCE (its payload would
    // write /tmp/modelconv-pwned), builtins.eval in a raw pickle.
    refused_file(
        tmp.path(),
        &fixture("hostile-bin/reduce-system.bin"),
        "refused global `posix.system` at byte 2 of archive/data.pkl: it is not part of a state dict \
         (nothing in the file was run)",
    );
    assert!(!pwned.exists(), "the payload ran");
    refused_file(
        tmp.path(),
        &fixture("hostile-bin/raw-pickle-eval.bin"),
        "refused global `builtins.eval` at byte 2 of the file (first pickle): it is not part of a \
         state dict (nothing in the file was run)",
    );
    for (module, name) in [
        ("subprocess", "Popen"),
        ("builtins", "getattr"),
        ("builtins", "__import__"),
        ("os", "system"),
        ("torch", "load"),
        ("torch.storage", "_load_from_bytes"),
    ] {
        let pkl = format!("\x02}}(X\x01\x00\x00\x00wc{module}\n{name}\n)Ru.");
        let pkl = [b"\x80".as_slice(), pkl.as_bytes()].concat();
        refused_bytes(
            tmp.path(),
            &format!("{name}.bin"),
            &checkpoint(&pkl, &[]),
            &format!(
                "refused global `{module}.{name}` at byte 10 of archive/data.pkl: it is not part of a \
                 state dict (nothing in the file was run)"
            ),
        );
    }
    // STACK_GLOBAL is looked up the same way.
    let pkl = b"\x80\x04\x8c\x05posix\x8c\x06system\x93.";
    refused_bytes(
        tmp.path(),
        "stack.bin",
        &checkpoint(pkl, &[]),
        "refused global `posix.system` at byte 17 of archive/data.pkl: it is not part of a state dict \
         (nothing in the file was run)",
    );
}

#[test]
fn row_32_constructs_that_build_or_mutate_objects_are_refused() {
    let tmp = tempdir();
    let cases: [(&str, &[u8], &str); 5] = [
        (
            "reduce",
            b"\x80\x02ccollections\nOrderedDict\n(K\x01tR.",
            "invalid pickle at byte 31 of archive/data.pkl: `collections.OrderedDict` called with 1 arguments",
        ),
        (
            "build",
            b"\x80\x02]}(X\x0c\x00\x00\x00__setstate__K\x01ub.",
            "invalid pickle at byte 25 of archive/data.pkl: BUILD (set the state of) a list, which a state dict never does",
        ),
        (
            "inst",
            b"\x80\x02(iposix\nsystem\n.",
            "invalid pickle at byte 3 of archive/data.pkl: opcode INST (object construction or extension) is not part of a state dict",
        ),
        (
            "obj",
            b"\x80\x02(ccollections\nOrderedDict\no.",
            "invalid pickle at byte 28 of archive/data.pkl: opcode OBJ (object construction or extension) is not part of a state dict",
        ),
        (
            "newobj",
            b"\x80\x02ccollections\nOrderedDict\n)\x81.",
            "invalid pickle at byte 28 of archive/data.pkl: opcode NEWOBJ (object construction or extension) is not part of a state dict",
        ),
    ];
    for (name, pkl, want) in cases {
        refused_bytes(
            tmp.path(),
            &format!("{name}.bin"),
            &checkpoint(pkl, &[]),
            want,
        );
    }
}

#[test]
fn row_33_a_pickled_module_asks_for_its_state_dict() {
    let tmp = tempdir();
    let pkl = b"\x80\x02ctorch.nn.modules.linear\nLinear\n)\x81.";
    refused_bytes(
        tmp.path(),
        "model.pt",
        &checkpoint(pkl, &[]),
        "holds a pickled model (`torch.nn.modules.linear.Linear`), not a state dict; load it in \
         Python and save its `state_dict()` instead",
    );
    // A checkpoint dict around a state dict names the key to save on its own.
    let pkl = b"\x80\x02}(X\x05\x00\x00\x00model}u.";
    refused_bytes(
        tmp.path(),
        "ckpt.pt",
        &checkpoint(pkl, &[]),
        "not a state dict: `model` is a dict, not a tensor (convert `checkpoint[\"model\"]` saved on its own)",
    );
}

#[test]
fn row_34_a_storage_shorter_than_its_tensor_is_refused() {
    let tmp = tempdir();
    refused_file(
        tmp.path(),
        &fixture("hostile-bin/storage-too-short.bin"),
        "tensor `w`: storage `0` holds 8 bytes, but declares 4 elements of F32 (16 bytes)",
    );
    // A storage that declares what it holds, but a view that needs more.
    let big = T { size: &[3, 2], ..W };
    refused_bytes(
        tmp.path(),
        "view.bin",
        &checkpoint(&state_dict(&[big]), &[("0", &f32s(&[1.0; 4]))]),
        "tensor `w`: its view (offset 0, size [3, 2], stride [2, 1]) reaches past its storage of 4 elements",
    );
}

#[test]
fn row_35_views_outside_their_storage_and_bad_sizes_are_refused() {
    let tmp = tempdir();
    let data = f32s(&[1.0; 4]);
    let cases: [(&str, T, &str); 4] = [
        (
            "offset",
            T { offset: 1, ..W },
            "tensor `w`: its view (offset 1, size [2, 2], stride [2, 1]) reaches past its storage of 4 elements",
        ),
        (
            "stride",
            T { stride: &[1, 4], ..W },
            "tensor `w`: its view (offset 0, size [2, 2], stride [1, 4]) reaches past its storage of 4 elements",
        ),
        (
            "negative",
            T { size: &[-2, 2], ..W },
            "tensor `w`: size is not a tuple of at most 64 non-negative integers",
        ),
        (
            "rank",
            T { stride: &[1], ..W },
            "tensor `w`: size and stride have different lengths",
        ),
    ];
    for (name, t, want) in cases {
        refused_bytes(
            tmp.path(),
            &format!("{name}.bin"),
            &checkpoint(&state_dict(&[t]), &[("0", &data)]),
            want,
        );
    }
    // Sizes whose product overflows 64 bits.
    let mut pkl = state_dict(&[W]);
    let at = pkl
        .windows(11)
        .position(|w| w == b"(J\x02\x00\x00\x00J\x02\x00\x00\x00")
        .unwrap();
    let huge = [
        b"(\x8a\x08".as_slice(),
        &[0xff; 7],
        b"\x7f\x8a\x08",
        &[0xff; 7],
        b"\x7f",
    ]
    .concat();
    pkl.splice(at..at + 11, huge);
    refused_bytes(
        tmp.path(),
        "overflow.bin",
        &checkpoint(&pkl, &[("0", &data)]),
        "tensor `w`: size overflows",
    );
}

#[test]
fn row_36_damaged_archives_are_refused_naming_the_file() {
    let tmp = tempdir();
    let good = good_checkpoint();
    let data = f32s(&[1.0; 4]);
    let pkl = state_dict(&[W]);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated",
            good[..good.len() / 2].to_vec(),
            "invalid PyTorch checkpoint: no end of central directory (truncated, or not a zip archive)",
        ),
        (
            "no-pkl",
            zip(&[("archive/data/0", &data, 0)]),
            "invalid PyTorch checkpoint: no `data.pkl` entry",
        ),
        (
            "no-storage",
            checkpoint(&pkl, &[]),
            "invalid PyTorch checkpoint: tensor `w`: no storage entry `archive/data/0`",
        ),
        (
            "dotdot",
            zip(&[("archive/data.pkl", &pkl, 0), ("archive/../../etc/passwd", &data, 0)]),
            "invalid PyTorch checkpoint: entry name `archive/../../etc/passwd` is not a plain relative path",
        ),
        (
            "absolute",
            zip(&[("/archive/data.pkl", &pkl, 0)]),
            "invalid PyTorch checkpoint: entry name `/archive/data.pkl` is not a plain relative path",
        ),
        (
            "duplicate",
            zip(&[
                ("archive/data.pkl", &pkl, 0),
                ("archive/data/0", &data, 0),
                ("archive/data/0", &data, 0),
            ]),
            "invalid PyTorch checkpoint: entry `archive/data/0` appears twice",
        ),
        (
            "big-endian",
            zip(&[
                ("archive/data.pkl", &pkl, 0),
                ("archive/byteorder", b"big", 0),
                ("archive/data/0", &data, 0),
            ]),
            "invalid PyTorch checkpoint: byte order `big`: only little-endian checkpoints are read",
        ),
    ];
    for (name, bytes, want) in cases {
        refused_bytes(tmp.path(), &format!("{name}.bin"), &bytes, want);
    }
    // The central directory cut off mid-entry.
    let mut cut = good.clone();
    let n = cut.len();
    let dir_len = u32::from_le_bytes(cut[n - 10..n - 6].try_into().unwrap());
    cut[n - 10..n - 6].copy_from_slice(&(dir_len + 1000).to_le_bytes());
    refused_bytes(
        tmp.path(),
        "dir.bin",
        &cut,
        "invalid PyTorch checkpoint: the central directory lies outside the file (truncated?)",
    );
}

#[test]
fn row_37_compressed_entries_are_refused_clearly() {
    let tmp = tempdir();
    let bytes = zip(&[
        ("archive/data.pkl", &state_dict(&[W]), 0),
        ("archive/data/0", &f32s(&[1.0; 4]), 8),
    ]);
    refused_bytes(
        tmp.path(),
        "deflated.bin",
        &bytes,
        "invalid PyTorch checkpoint: entry `archive/data/0` is compressed (method 8); torch writes \
         stored entries: re-save the checkpoint with torch.save",
    );
}

#[test]
fn row_38_damaged_legacy_files_are_refused() {
    let tmp = tempdir();
    let good = std::fs::read(fixture("tiny-bert-bin-legacy/pytorch_model.bin")).unwrap();
    let mut magic = good.clone();
    magic[4] ^= 0xff;
    refused_bytes(
        tmp.path(),
        "magic.bin",
        &magic,
        "invalid PyTorch checkpoint: neither a zip archive nor a legacy PyTorch file (bad magic number)",
    );
    refused_bytes(
        tmp.path(),
        "cut.bin",
        &good[..good.len() - 100],
        "invalid PyTorch checkpoint: storage `94633669718480` is cut off (truncated file)",
    );
    // The first storage's element count (right after the key list) off by one.
    let keys_end = 5575;
    let mut count = good.clone();
    count[keys_end] += 1;
    refused_bytes(
        tmp.path(),
        "count.bin",
        &count,
        "invalid PyTorch checkpoint: storage `94633669419328` has 2049 elements, its tensors declare 2048",
    );
    let mut trailing = good.clone();
    trailing.extend_from_slice(b"junk");
    refused_bytes(
        tmp.path(),
        "trailing.bin",
        &trailing,
        "invalid PyTorch checkpoint: 4 bytes after the last storage",
    );
}

#[test]
fn row_39_malformed_pickles_are_clear_errors() {
    let tmp = tempdir();
    let pkl = state_dict(&[W]);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "early",
            pkl[..pkl.len() / 2].to_vec(),
            "invalid pickle at byte 78 of archive/data.pkl: the pickle ends early",
        ),
        (
            "opcode",
            b"\x80\x02}\xff.".to_vec(),
            "invalid pickle at byte 3 of archive/data.pkl: unknown opcode 0xff",
        ),
        (
            "protocol",
            b"\x80\x07}.".to_vec(),
            "invalid pickle at byte 0 of archive/data.pkl: pickle protocol 7 is not supported (0 to 5)",
        ),
        (
            "memo",
            b"\x80\x02h\x09.".to_vec(),
            "invalid pickle at byte 2 of archive/data.pkl: memo key 9 was never stored",
        ),
        (
            "setitem-on-list",
            b"\x80\x02]K\x01K\x02s.".to_vec(),
            "invalid pickle at byte 7 of archive/data.pkl: SETITEM on a list, which is not a dict",
        ),
        (
            "huge-string",
            b"\x80\x02X\xff\xff\xff\x7f.".to_vec(),
            "invalid pickle at byte 7 of archive/data.pkl: the pickle ends early",
        ),
    ];
    for (name, pkl, want) in cases {
        refused_bytes(
            tmp.path(),
            &format!("{name}.bin"),
            &checkpoint(&pkl, &[]),
            want,
        );
    }
}

#[test]
fn row_40_shared_storages_views_and_slices_convert_exactly() {
    // The torch-written tricky fixture is tested value by value above; here the
    // hand-built view shapes: a transposed 2×3 and a strided slice of a 4×4.
    let tmp = tempdir();
    let data = f32s(&(0..16).map(|i| i as f32).collect::<Vec<_>>());
    let t = T {
        name: "t",
        numel: 16,
        size: &[3, 2],
        stride: &[1, 3],
        ..W
    };
    let s = T {
        name: "s",
        numel: 16,
        offset: 5,
        size: &[2, 2],
        stride: &[4, 2],
        ..W
    };
    let tied = T { name: "u", ..t };
    let file = tmp.path().join("views.bin");
    std::fs::write(
        &file,
        checkpoint(&state_dict(&[t, s, tied]), &[("0", &data)]),
    )
    .unwrap();
    let out = tmp.path().join("o");
    let cfg = ConvertConfig::builder()
        .model_type(ModelType::CausalLm)
        .dtype(TargetDtype::Keep)
        .build()
        .unwrap();
    convert(&file, &out, &cfg).unwrap();
    let wf = WeightFile::open(&out).unwrap();
    // t[i][j] = storage[i + 3j]; s[i][j] = storage[5 + 4i + 2j].
    assert_eq!(
        wf.tensor("t").unwrap().data,
        f32s(&[0.0, 3.0, 1.0, 4.0, 2.0, 5.0])
    );
    assert_eq!(
        wf.tensor("u").unwrap().data,
        f32s(&[0.0, 3.0, 1.0, 4.0, 2.0, 5.0])
    );
    assert_eq!(wf.tensor("s").unwrap().data, f32s(&[5.0, 7.0, 9.0, 11.0]));
    assert_eq!(
        wf.metadata().unwrap()["tied_weights"],
        serde_json::json!({"u": "t"})
    );
}

#[test]
fn nothing_in_a_hostile_file_runs_even_through_verify_and_dry_run() {
    let tmp = tempdir();
    let pwned = std::env::temp_dir().join("modelconv-pwned");
    let _ = std::fs::remove_file(&pwned);
    let file: PathBuf = fixture("hostile-bin/reduce-system.bin");
    let out = tmp.path().join("o");
    let o = modelconv(&["convert", file.to_str().unwrap(), "--dry-run"]);
    assert_eq!(o.status.code(), Some(1));
    convert(fixture("tiny-bert"), &out, &ConvertConfig::default()).unwrap();
    let o = modelconv(&[
        "verify",
        out.to_str().unwrap(),
        "--source",
        file.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("refused global `posix.system`"));
    assert!(!pwned.exists());
}

/// Resident kilobytes of this process's mappings of files under `dir` (`/proc/self/smaps`).
fn resident_kb_under(dir: &Path) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let dir = dir.to_string_lossy();
    let (mut ours, mut kb) = (false, 0);
    for line in smaps.lines() {
        if let Some(rest) = line.strip_prefix("Rss:") {
            if ours {
                kb += rest
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap();
            }
        } else if line
            .split_whitespace()
            .next()
            .is_some_and(|f| f.contains('-'))
        {
            // A mapping's first line: `start-end perms offset dev inode [path]`.
            ours = line
                .split_whitespace()
                .nth(5)
                .is_some_and(|p| p.starts_with(&*dir));
        }
    }
    kb
}

#[test]
fn opening_a_zip_checkpoint_leaves_none_of_its_data_mapped_in() {
    // Reading the zip directory touches the local header before every storage; each
    // touch used to leave the page-cache folio around it mapped (80-120 MB of each
    // 1.4 GB shard of the 4.4 GB bench checkpoint) until the conversion reached it.
    let tmp = tempdir();
    let dir = copy_dir(&fixture("tiny-llama-sharded-bin"), &tmp.path().join("m"));
    let source = open_source(&dir);
    let mapped = std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&*dir.to_string_lossy()))
        .count();
    assert_eq!(mapped, 5, "every shard is mapped");
    assert_eq!(
        resident_kb_under(&dir),
        0,
        "pages left mapped in after opening"
    );
    drop(source);
}
