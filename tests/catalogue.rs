//! The bad-input and fault catalogue (`RELIABILITY.md` rows 1–30 and 41–44), each row
//! through the real binary: exit status, the exact error text, no panic, and nothing
//! left in the output directory. Rows 31–40 (PyTorch checkpoints) are in
//! `tests/torch.rs`; rows whose faults need a long-running process (21, 22, 41, 42) and
//! row 29 (`verify_names_a_tensor_with_a_flipped_byte`) are in `tests/cli.rs` and
//! `tests/convert.rs`, named in the table of the README.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};

use common::*;
use modelconv::WeightFile;

/// A safetensors file: the 8-byte length prefix, `header` as given, then `data`.
fn raw(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

#[test]
fn row_01_a_file_shorter_than_8_bytes() {
    let tmp = tempdir();
    refused_bytes(
        tmp.path(),
        "short.safetensors",
        &[1, 2, 3],
        "header too small: the file has 3 bytes, a safetensors file needs at least 8",
    );
}

#[test]
fn row_02_a_length_prefix_over_the_cap_or_past_the_end() {
    let tmp = tempdir();
    let mut v = 200_000_000u64.to_le_bytes().to_vec();
    v.extend_from_slice(b"{}");
    refused_bytes(
        tmp.path(),
        "huge.safetensors",
        &v,
        "header too large: the length prefix claims 200000000 bytes, the cap is 100000000 bytes; \
         pass --max-header-mb to raise the cap",
    );
    let mut v = 50u64.to_le_bytes().to_vec();
    v.extend_from_slice(b"{}");
    refused_bytes(
        tmp.path(),
        "past.safetensors",
        &v,
        "header length 50 runs past the end of the file (10 bytes)",
    );
}

#[test]
fn row_03_a_genuine_header_over_100_mb_and_the_option_that_raises_the_cap() {
    let tmp = tempdir();
    let file = tmp.path().join("big-header.safetensors");
    // Valid JSON of 101,000,111 bytes: a long metadata value and one tensor.
    let header = format!(
        r#"{{"__metadata__":{{"notes":"{}"}},"model.layers.0.w":{{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}}}"#,
        "x".repeat(101_000_000)
    );
    let data = f32s(&[1.5f32, -2.25]);
    std::fs::write(&file, raw(&header, &data)).unwrap();
    let args = ["--model-type", "causallm"];
    refused(
        tmp.path(),
        &file,
        &args,
        &format!(
            "{}: header too large: the length prefix claims {} bytes, the cap is 100000000 bytes; \
             pass --max-header-mb to raise the cap",
            file.display(),
            header.len()
        ),
    );
    let out = tmp.path().join("o");
    converts(
        &file,
        &out,
        &["--model-type", "causallm", "--max-header-mb", "200"],
    );
    let t = WeightFile::open(&out)
        .unwrap()
        .tensor("model.layers.0.w")
        .unwrap();
    assert_eq!(t.data, [0x00, 0x3e, 0x80, 0xc0], "f16 1.5 and -2.25");
}

#[test]
fn row_04_headers_not_utf8_not_json_or_nul_padded() {
    let tmp = tempdir();
    let mut v = raw(r#"{"a":1}"#, &[]);
    v[9] = 0xff;
    refused_bytes(
        tmp.path(),
        "utf8.safetensors",
        &v,
        "invalid header at byte 9: header is not valid UTF-8",
    );
    refused_bytes(
        tmp.path(),
        "nul.safetensors",
        &raw("{}\0\0", &[]),
        "invalid header at byte 10: NUL byte in header (only JSON whitespace may pad it)",
    );
    refused_bytes(
        tmp.path(),
        "json.safetensors",
        &raw("{]", &[]),
        "invalid header at byte 9: not a safetensors JSON header: key must be a string at line 1 column 2",
    );
    // JSON whitespace padding is fine.
    let padded = tmp.path().join("padded.safetensors");
    let h = r#"{"model.layers.0.w":{"dtype":"F16","shape":[1],"data_offsets":[0,2]}}   "#;
    std::fs::write(&padded, raw(h, &[0x00, 0x3c])).unwrap();
    let out = tmp.path().join("o");
    converts(&padded, &out, &["--model-type", "causallm"]);
    let t = WeightFile::open(&out)
        .unwrap()
        .tensor("model.layers.0.w")
        .unwrap();
    assert_eq!(t.data, [0x00, 0x3c]);
}

/// Runs the binary with `args` (stderr into `stderr`): its exit code and peak resident
/// memory in bytes. Measured by a small Python parent: `wait4` on a child spawned from
/// this (large, multi-threaded) test process would report this process's own peak,
/// which a vfork-style spawn shares until `exec`.
fn run_measured(args: &[&str], stderr: &Path) -> (Option<i32>, u64) {
    let script = "import resource, subprocess, sys\n\
                  r = subprocess.run(sys.argv[2:], stderr=open(sys.argv[1], 'wb'))\n\
                  print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)";
    let out = python_ok(
        &[
            &["-c", script, s(stderr), env!("CARGO_BIN_EXE_modelconv")],
            args,
        ]
        .concat(),
    );
    let mut it = out.split_whitespace().map(|w| w.parse::<i64>().unwrap());
    let (code, kib) = (it.next().unwrap(), it.next().unwrap());
    ((code >= 0).then_some(code as i32), kib as u64 * 1024)
}

#[test]
fn row_05_a_header_with_200000_entries_and_memory_tied_to_its_size() {
    let tmp = tempdir();
    let file = tmp.path().join("many.safetensors");
    let n = 200_000;
    let entries: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#""model.layers.{i}.w":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{}]}}"#,
                i + 1
            )
        })
        .collect();
    let header = format!("{{{}}}", entries.join(","));
    let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, raw(&header, &data)).unwrap();
    let out = tmp.path().join("o");
    let err = tmp.path().join("err");
    let (code, peak) = run_measured(
        &[
            "convert",
            s(&file),
            "-o",
            s(&out),
            "-q",
            "--model-type",
            "causallm",
        ],
        &err,
    );
    assert_eq!(code, Some(0), "{}", std::fs::read_to_string(&err).unwrap());
    let wf = WeightFile::open(&out).unwrap();
    assert_eq!(wf.tensors().len(), n);
    for i in [0, 1, 250, 251, 199_999] {
        let t = wf.tensor(&format!("model.layers.{i}.w")).unwrap();
        assert_eq!(t.data, [(i % 251) as u8]);
    }
    // Memory follows the header (every entry is a tensor, a row, an index entry and a
    // metadata entry): 16 MB of header peaked at 488 MB in the release build. The
    // header cap bounds the header, so this bounds the process.
    let bound = 64 * 1024 * 1024 + 40 * header.len() as u64;
    assert!(
        peak < bound,
        "peak {} MiB for a {} MiB header, bound {} MiB",
        peak >> 20,
        header.len() >> 20,
        bound >> 20
    );
    eprintln!(
        "row 5: {} entries, header {} MiB, peak RSS {} MiB",
        n,
        header.len() >> 20,
        peak >> 20
    );
}

#[test]
fn row_06_duplicate_names_in_a_header_across_shards_and_in_the_weight_map() {
    let tmp = tempdir();
    let h = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
    refused_bytes(
        tmp.path(),
        "dup.safetensors",
        &raw(h, &[0]),
        "duplicate tensor `a`",
    );
    // The same name in two shards of an index.
    let m = tmp.path().join("m");
    std::fs::create_dir_all(&m).unwrap();
    write_safetensors(
        &m.join("a.safetensors"),
        &[("w", "F32", vec![2], vec![0; 8])],
    );
    write_safetensors(
        &m.join("b.safetensors"),
        &[("w", "F32", vec![2], vec![0; 8])],
    );
    std::fs::write(
        m.join("model.safetensors.index.json"),
        r#"{"metadata":{},"weight_map":{"w":"a.safetensors","x":"b.safetensors"}}"#,
    )
    .unwrap();
    refused(
        tmp.path(),
        &m,
        &[],
        &format!(
            "{}: duplicate tensor `w` (also in {})",
            m.join("b.safetensors").display(),
            m.join("a.safetensors").display()
        ),
    );
    // The same key twice in the index's weight_map: never last-wins.
    let m = copy_dir(&fixture("tiny-llama-sharded-bf16"), &tmp.path().join("m2"));
    let index = m.join("model.safetensors.index.json");
    let t = std::fs::read_to_string(&index).unwrap().replacen(
        "\"weight_map\": {",
        "\"weight_map\": {\"lm_head.weight\": \"model-00001-of-00005.safetensors\",",
        1,
    );
    std::fs::write(&index, t).unwrap();
    refused(
        tmp.path(),
        &m,
        &[],
        &format!("{}: duplicate tensor `lm_head.weight`", index.display()),
    );
}

#[test]
fn row_07_metadata_that_is_not_a_string_map() {
    let tmp = tempdir();
    refused_bytes(
        tmp.path(),
        "meta.safetensors",
        &raw(r#"{"__metadata__":{"a":1}}"#, &[]),
        "invalid header at byte 8: `__metadata__` is not a map of strings",
    );
}

#[test]
fn row_08_an_unknown_dtype() {
    let tmp = tempdir();
    refused_bytes(
        tmp.path(),
        "dtype.safetensors",
        &raw(
            r#"{"a":{"dtype":"Q9","shape":[1],"data_offsets":[0,1]}}"#,
            &[0],
        ),
        "tensor `a`: unknown dtype `Q9`",
    );
}

#[test]
fn row_09_a_shape_whose_size_overflows() {
    let tmp = tempdir();
    refused_bytes(
        tmp.path(),
        "overflow.safetensors",
        &raw(
            r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,1]}}"#,
            &[0],
        ),
        "tensor `a`: shape × dtype size overflows",
    );
}

#[test]
fn row_10_offsets_reversed_or_out_of_bounds() {
    let tmp = tempdir();
    refused_bytes(
        tmp.path(),
        "reversed.safetensors",
        &raw(
            r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,0]}}"#,
            &[0],
        ),
        "tensor `a`: invalid offsets [1, 0) for a data section of 1 bytes",
    );
    refused_bytes(
        tmp.path(),
        "outside.safetensors",
        &raw(
            r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,9]}}"#,
            &[0],
        ),
        "tensor `a`: invalid offsets [0, 9) for a data section of 1 bytes",
    );
}

#[test]
fn row_11_a_byte_length_that_is_not_the_shape_times_the_dtype() {
    let tmp = tempdir();
    refused_bytes(
        tmp.path(),
        "length.safetensors",
        &raw(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
            &[0; 4],
        ),
        "tensor `a`: F32 [2] needs 8 bytes but its offsets give 4",
    );
}

#[test]
fn row_12_overlapping_ranges() {
    let tmp = tempdir();
    refused_bytes(
        tmp.path(),
        "overlap.safetensors",
        &raw(
            r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}"#,
            &[0; 3],
        ),
        "tensors `a` and `b` overlap",
    );
}

#[test]
fn row_13_gaps_trailing_bytes_and_a_short_data_section() {
    let tmp = tempdir();
    refused_bytes(
        tmp.path(),
        "gap.safetensors",
        &raw(
            r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
            &[0; 2],
        ),
        "data section not covered exactly: gap of 1 bytes before tensor `a`",
    );
    refused_bytes(
        tmp.path(),
        "trailing.safetensors",
        &raw(
            r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
            &[0; 3],
        ),
        "data section not covered exactly: 2 trailing bytes after the last tensor",
    );
    refused_bytes(
        tmp.path(),
        "short-data.safetensors",
        &raw(
            r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#,
            &[0; 2],
        ),
        "tensor `a`: invalid offsets [0, 4) for a data section of 2 bytes",
    );
}

#[test]
fn row_14_zero_size_tensors_and_scalars_convert() {
    let tmp = tempdir();
    let file = tmp.path().join("m.safetensors");
    let h = r#"{"model.z":{"dtype":"F32","shape":[2,0],"data_offsets":[0,0]},"model.s":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}"#;
    std::fs::write(&file, raw(h, &0.1f32.to_le_bytes())).unwrap();
    let out = tmp.path().join("o");
    converts(&file, &out, &["--model-type", "causallm"]);
    let wf = WeightFile::open(&out).unwrap();
    let z = wf.tensor("model.z").unwrap();
    assert_eq!((z.shape.as_slice(), z.data.len()), (&[2u64, 0][..], 0));
    let sc = wf.tensor("model.s").unwrap();
    assert!(sc.shape.is_empty());
    assert_eq!(sc.data, half::f16::from_f32(0.1).to_le_bytes());
}

#[test]
fn row_15_names_with_path_characters_are_never_paths() {
    // Printing is sanitised (tests/cli.rs, escape_characters_in_names_are_sanitised_
    // when_printed); here names that look like paths stay names.
    let tmp = tempdir();
    let file = tmp.path().join("m.safetensors");
    let evil = "../../../escaped\u{202e}";
    write_safetensors(&file, &[(evil, "U8", vec![1], vec![7])]);
    let out = tmp.path().join("o");
    converts(&file, &out, &["--model-type", "causallm"]);
    assert_eq!(
        WeightFile::open(&out).unwrap().tensor(evil).unwrap().data,
        [7]
    );
    let mut found = Vec::new();
    for e in std::fs::read_dir(tmp.path()).unwrap() {
        found.push(e.unwrap().file_name().to_string_lossy().into_owned());
    }
    found.sort();
    assert_eq!(found, ["m.safetensors", "o"]);
    assert!(!tmp.path().join("../../escaped\u{202e}").exists());
}

#[test]
fn row_16_an_index_that_lists_missing_shards() {
    let tmp = tempdir();
    let m = copy_dir(&fixture("tiny-llama-sharded-bf16"), &tmp.path().join("m"));
    std::fs::remove_file(m.join("model-00002-of-00005.safetensors")).unwrap();
    std::fs::remove_file(m.join("model-00004-of-00005.safetensors")).unwrap();
    refused(
        tmp.path(),
        &m,
        &[],
        &format!(
            "{}: missing shards: model-00002-of-00005.safetensors, model-00004-of-00005.safetensors",
            m.join("model.safetensors.index.json").display()
        ),
    );
}

#[test]
fn row_17_an_index_that_maps_a_tensor_to_the_wrong_shard() {
    let tmp = tempdir();
    let m = copy_dir(&fixture("tiny-llama-sharded-bf16"), &tmp.path().join("m"));
    let index = edit_index(&m, |v| {
        v["weight_map"]["lm_head.weight"] = "model-00003-of-00005.safetensors".into();
    });
    refused(
        tmp.path(),
        &m,
        &[],
        &format!(
            "{}: tensor `lm_head.weight`: the index maps it to model-00003-of-00005.safetensors, \
             but it is in model-00005-of-00005.safetensors",
            index.display()
        ),
    );
}

#[test]
fn row_18_shard_names_with_dotdot_slashes_or_absolute_paths() {
    let tmp = tempdir();
    for bad in [
        "../model-00005-of-00005.safetensors",
        "sub/model-00005-of-00005.safetensors",
        "/etc/passwd",
    ] {
        let m = copy_dir(&fixture("tiny-llama-sharded-bf16"), &tmp.path().join("m"));
        let index = edit_index(&m, |v| {
            v["weight_map"]["lm_head.weight"] = bad.into();
        });
        refused(
            tmp.path(),
            &m,
            &[],
            &format!(
                "{}: invalid shard index: shard name `{bad}` is not a plain file name",
                index.display()
            ),
        );
        std::fs::remove_dir_all(&m).unwrap();
    }
}

/// A two-shard f32 checkpoint of `per_shard` tensors of `elems` elements each, written
/// a tensor at a time; returns its directory.
fn two_shards(dir: &Path, per_shard: usize, elems: usize) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut map = serde_json::Map::new();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for shard in 0..2 {
        let file = format!("model-0000{}-of-00002.safetensors", shard + 1);
        let mut header = serde_json::Map::new();
        for t in 0..per_shard {
            let name = format!("model.layers.{}.w", shard * per_shard + t);
            let (a, b) = (t * elems * 4, (t + 1) * elems * 4);
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": "F32", "shape": [elems], "data_offsets": [a, b]}),
            );
            map.insert(name, file.clone().into());
        }
        let text = serde_json::Value::Object(header).to_string();
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join(&file)).unwrap());
        f.write_all(&(text.len() as u64).to_le_bytes()).unwrap();
        f.write_all(text.as_bytes()).unwrap();
        let mut buf = vec![0u8; elems * 4];
        for _ in 0..per_shard {
            for c in buf.chunks_exact_mut(4) {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                // Values in [-1, 1), f16-representable magnitudes.
                let v = ((seed >> 41) as f32 / (1u64 << 22) as f32) - 1.0;
                c.copy_from_slice(&v.to_le_bytes());
            }
            f.write_all(&buf).unwrap();
        }
        f.flush().unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    dir.to_path_buf()
}

#[test]
fn row_19_a_shard_truncated_during_conversion() {
    let tmp = tempdir();
    let m = two_shards(&tmp.path().join("m"), 8, 1 << 18);
    let last = m.join("model-00002-of-00002.safetensors");
    let was = std::fs::metadata(&last).unwrap().len();
    let out = tmp.path().join("o");
    // Slow and in small steps (zstd 19, one thread, 1 MiB row groups) so the second
    // shard is read well after the first row group is written; positioned reads, so a
    // truncated file is a short read (a mapping would fault instead: the documented
    // risk of --io mmap, where sizes are re-checked before every row group).
    let child = bin()
        .args(["convert", s(&m), "-o", s(&out), "--model-type", "causallm"])
        .args(["--io", "read"])
        .args(SLOW_CONVERT)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(120, 5, "never started writing", || {
        !temp_files(&out).is_empty()
    });
    let f = std::fs::OpenOptions::new().write(true).open(&last).unwrap();
    f.set_len(was / 2).unwrap();
    let o = child.wait_with_output().unwrap();
    failed_with(
        &o,
        &format!(
            "{}: the file changed while being converted: its size changed ({was} → {} bytes)",
            last.display(),
            was / 2
        ),
    );
    let left: Vec<_> = std::fs::read_dir(&out)
        .map(|d| d.count())
        .into_iter()
        .collect();
    assert!(left.iter().all(|&n| n == 0), "output left: {left:?}");
}

#[test]
fn row_20_an_output_path_that_is_or_links_to_an_input_file() {
    let tmp = tempdir();
    let m = copy_dir(&fixture("tiny-bert"), &tmp.path().join("m"));
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&m, &link).unwrap();
    for out in [m.clone(), link.clone()] {
        let o = modelconv(&["convert", s(&m), "-o", s(&out)]);
        failed_with(
            &o,
            &format!(
                "{}: output path is an input file",
                out.join("config.json").display()
            ),
        );
    }
    let o = modelconv(&["convert", s(&m), "-o", s(&m.join("model.safetensors"))]);
    failed_with(
        &o,
        &format!(
            "{}: output path is an input file",
            m.join("model.safetensors").display()
        ),
    );
    // Nothing was added to the input directory.
    let mut names: Vec<String> = std::fs::read_dir(&m)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want: Vec<String> = std::fs::read_dir(fixture("tiny-bert"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    want.sort();
    assert_eq!(names, want);
}

#[test]
fn row_23_an_earlier_conversion_is_refused_without_force_and_never_mixed() {
    let tmp = tempdir();
    let out = tmp.path().join("o");
    converts(&fixture("tiny-clip"), &out, &["--part", "all"]);
    let before = std::fs::read(out.join("weights.parquet")).unwrap();
    let o = modelconv(&["convert", s(&fixture("tiny-bert")), "-o", s(&out)]);
    failed_with(
        &o,
        &format!(
            "{}: output already holds a conversion; pass --force to replace it",
            out.join("weights.parquet").display()
        ),
    );
    assert_eq!(std::fs::read(out.join("weights.parquet")).unwrap(), before);
    // With --force, the files of the earlier conversion that the new one does not
    // write are removed (tests/convert.rs checks tokenizer/ and module files).
    converts(&fixture("tiny-bert"), &out, &["--force"]);
    let wf = WeightFile::open(&out).unwrap();
    assert!(wf.tensors().iter().all(|t| !t.name.contains("vision")));
}

#[test]
fn row_24_a_tensor_over_the_row_limit_is_split_and_read_back_whole() {
    // The default limit is 512 MiB (2 GiB is the format's); 1 MiB shows the mechanism
    // on a 4 MiB tensor.
    let tmp = tempdir();
    let m = two_shards(&tmp.path().join("m"), 1, 1 << 20);
    let out = tmp.path().join("o");
    converts(&m, &out, &["--model-type", "causallm", "--max-row-mb", "1"]);
    let wf = WeightFile::open(&out).unwrap();
    let info = wf.info("model.layers.0.w").unwrap();
    assert_eq!(info.rows, 2, "2 MiB of f16 over 1 MiB rows");
    let t = wf.tensor("model.layers.0.w").unwrap();
    let src = read_source(&m);
    let want = f32_bytes_to_f16(&src["model.layers.0.w"].data);
    assert!(t.data == want, "read back whole and exact");
}

#[test]
fn row_25_f16_overflow_is_an_error_naming_tensor_count_and_magnitude() {
    let tmp = tempdir();
    let file = tmp.path().join("m.safetensors");
    let vals = f32s(&[1.0f32, 1e5, -7e4, 3.0]);
    write_safetensors(&file, &[("model.w", "F32", vec![4], vals)]);
    refused(
        tmp.path(),
        &file,
        &["--model-type", "causallm"],
        &format!(
            "{}: tensor `model.w`: 2 finite values would overflow to infinity casting F32 to F16 \
             (largest magnitude 100000); choose --dtype keep, bf16 or f32, or pass --allow-overflow",
            file.display()
        ),
    );
    let out = tmp.path().join("o");
    converts(
        &file,
        &out,
        &["--model-type", "causallm", "--allow-overflow"],
    );
    let t = WeightFile::open(&out).unwrap().tensor("model.w").unwrap();
    assert_eq!(t.data, [0x00, 0x3c, 0x00, 0x7c, 0x00, 0xfc, 0x00, 0x42]);
}

#[test]
fn row_26_nan_and_inf_are_preserved_and_counted() {
    let tmp = tempdir();
    let file = tmp.path().join("m.safetensors");
    let vals = f32s(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 2.0, f32::NAN]);
    write_safetensors(&file, &[("model.w", "F32", vec![5], vals)]);
    let out = tmp.path().join("o");
    let o = converts(&file, &out, &["--model-type", "causallm", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let cast = &v["metadata"]["cast_report"]["model.w"];
    assert_eq!(
        (&cast["nan"], &cast["inf"], &cast["overflow"]),
        (&2.into(), &2.into(), &0.into()),
        "{v}"
    );
    let t = WeightFile::open(&out).unwrap().tensor("model.w").unwrap();
    let h: Vec<half::f16> = t
        .data
        .chunks_exact(2)
        .map(|b| half::f16::from_le_bytes([b[0], b[1]]))
        .collect();
    assert!(h[0].is_nan() && h[4].is_nan());
    assert_eq!(
        h[1..4],
        [
            half::f16::INFINITY,
            half::f16::NEG_INFINITY,
            half::f16::from_f32(2.0)
        ]
    );
}

#[test]
fn row_27_a_missing_or_malformed_config() {
    let tmp = tempdir();
    let m = tmp.path().join("m");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::copy(
        fixture("tiny-bert").join("model.safetensors"),
        m.join("model.safetensors"),
    )
    .unwrap();
    std::fs::write(m.join("config.json"), "{bad").unwrap();
    refused(
        tmp.path(),
        &m,
        &[],
        &format!(
            "{}: not valid JSON: key must be a string at line 1 column 2",
            m.join("config.json").display()
        ),
    );
    // Without config.json the family comes from the tensor names.
    std::fs::remove_file(m.join("config.json")).unwrap();
    let out = tmp.path().join("o");
    converts(&m, &out, &[]);
    let meta = metadata(&out);
    assert_eq!(meta["model_type"], "bert", "{meta}");
}

#[test]
fn row_28_a_truncated_or_corrupted_weight_file_given_to_the_reader() {
    let tmp = tempdir();
    let out = tmp.path().join("o");
    converts(&fixture("tiny-bert"), &out, &[]);
    let path = out.join("weights.parquet");
    let good = std::fs::read(&path).unwrap();
    for cut in [5, good.len() / 2, good.len() - 1] {
        std::fs::write(&path, &good[..cut]).unwrap();
        for cmd in ["inspect", "verify"] {
            let o = modelconv(&[cmd, s(&out)]);
            let err = text(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "{cmd} {cut}: {err}");
            assert!(!err.contains("panicked"), "{err}");
            assert!(
                err.starts_with(&format!(
                    "error: {}: not a readable Parquet file: ",
                    path.display()
                )),
                "{cmd} {cut}: {err}"
            );
        }
    }
}

#[test]
fn row_30_a_big_endian_host_is_refused() {
    // No big-endian machine or emulator here: the variable makes this host take the
    // big-endian path (see source::refuse_big_endian_host).
    let tmp = tempdir();
    let out = tmp.path().join("o");
    let refusal = "this host is big-endian; safetensors and the weight format are \
                   little-endian, and modelconv does not byte-swap";
    let o = bin()
        .args(["convert", s(&fixture("tiny-bert")), "-o", s(&out)])
        .env("MODELCONV_TEST_BIG_ENDIAN_HOST", "1")
        .output()
        .unwrap();
    failed_with(&o, refusal);
    assert!(!out.exists());
    // Reading a weight file is refused the same way.
    converts(&fixture("tiny-bert"), &out, &[]);
    let o = bin()
        .args(["inspect", s(&out)])
        .env("MODELCONV_TEST_BIG_ENDIAN_HOST", "1")
        .output()
        .unwrap();
    failed_with(&o, refusal);
}

#[test]
fn row_43_peak_memory_stays_under_a_bound_from_the_options_and_largest_row() {
    // 768 MiB of f32 in 2 shards of 12 tensors of 32 MiB; each becomes a 16 MiB f16 row.
    let tmp = tempdir();
    let m = two_shards(&tmp.path().join("m"), 12, 8 << 20);
    let input: u64 = std::fs::read_dir(&m)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let largest_row: u64 = 16 << 20;
    // Default options (bound 496 MiB), then 8 MiB row groups (bound 208 MiB).
    for (args, row_group, below) in [
        (&[][..], 32u64 << 20, 1),
        (&["--row-group-mb", "8"][..], 8 << 20, 3),
    ] {
        let out = tmp.path().join("o");
        let err = tmp.path().join("err");
        let mut all = vec!["convert", s(&m), "-o", s(&out), "-q", "--force"];
        all.extend(["--model-type", "causallm", "--threads", "2"]);
        all.extend(args);
        let (code, peak) = run_measured(&all, &err);
        assert_eq!(code, Some(0), "{}", std::fs::read_to_string(&err).unwrap());
        // In flight: 2 threads × 2 row groups of the budget, or one row when it is
        // larger; each group holds its cast rows, then their compressed pages, and the
        // buffer pool keeps a few cast buffers for reuse: about three times that, plus
        // the largest row a few times, plus the process itself.
        let in_flight = (2 * 2 * row_group).max(largest_row);
        let bound = (64 << 20) + 3 * in_flight + 3 * largest_row;
        eprintln!(
            "row 43 {args:?}: input {} MiB, peak RSS {} MiB, bound {} MiB",
            input >> 20,
            peak >> 20,
            bound >> 20
        );
        assert!(
            peak < bound,
            "peak {} MiB over the bound {} MiB",
            peak >> 20,
            bound >> 20
        );
        assert!(
            bound * below < input,
            "the bound is {below}× below the input"
        );
    }
}

#[test]
fn row_44_a_damaged_description_cell_is_named_by_verify() {
    let tmp = tempdir();
    let out = tmp.path().join("o");
    converts(&fixture("tiny-bert"), &out, &[]);
    let path = out.join("weights.parquet");
    let script = r#"
import sys, pyarrow as pa, pyarrow.parquet as pq
p = sys.argv[1]
f = pq.ParquetFile(p)
t = f.read()
v = t.column("shape").to_pylist()
v[5] = [7, 7]
t = t.set_column(t.schema.get_field_index("shape"), "shape", pa.array(v, t.schema.field("shape").type))
pq.write_table(t.replace_schema_metadata({k: v for k, v in f.metadata.metadata.items() if k != b"ARROW:schema"}), p)
"#;
    python_ok(&["-c", script, s(&path)]);
    let name = WeightFile::open(&out).unwrap().tensors()[5].name.clone();
    let o = modelconv(&["verify", s(&out)]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let t = text(&o.stdout);
    assert!(
        t.contains(&format!(
            "FAIL `{name}`: row 5: shape [7, 7] differs from the index's [32]"
        )),
        "{t}"
    );
}

/// Rewrites the footer of the weight file at `path` with `edit` applied to its first
/// row group, and without the page index (whose own checks would refuse the file first).
fn edit_first_row_group(
    path: &Path,
    edit: impl FnOnce(
        parquet::file::metadata::RowGroupMetaDataBuilder,
    ) -> parquet::file::metadata::RowGroupMetaDataBuilder,
) {
    use parquet::file::metadata::{ParquetMetaDataReader, ParquetMetaDataWriter};
    let md = ParquetMetaDataReader::new()
        .parse_and_finish(&std::fs::File::open(path).unwrap())
        .unwrap();
    let bytes = std::fs::read(path).unwrap();
    let n = bytes.len();
    let footer = u32::from_le_bytes(bytes[n - 8..n - 4].try_into().unwrap()) as usize;
    let mut md = md.into_builder();
    let mut groups = md.take_row_groups();
    groups[0] = edit(groups[0].clone().into_builder()).build().unwrap();
    let md = md.set_row_groups(groups).build();
    let mut out = bytes[..n - 8 - footer].to_vec();
    ParquetMetaDataWriter::new(&mut out, &md)
        .with_preserve_page_index_locations(false)
        .finish()
        .unwrap();
    std::fs::write(path, out).unwrap();
}

#[test]
fn row_28_a_footer_with_a_negative_row_count_or_size_given_to_the_reader() {
    let tmp = tempdir();
    let out = tmp.path().join("o");
    converts(&fixture("tiny-bert"), &out, &[]);
    let path = out.join("weights.parquet");
    // The footer rewritten as it is reads as before: the errors below are the edits'.
    edit_first_row_group(&path, |g| g);
    let o = modelconv(&["inspect", s(&out)]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let good = std::fs::read(&path).unwrap();
    let at = |why: &str| format!("{}: {why}", path.display());
    // A negative row count or column size is refused on opening, by every command
    // (a negative column size made the parquet reader panic under `verify`).
    edit_first_row_group(&path, |g| g.set_num_rows(-1));
    for cmd in ["inspect", "verify"] {
        failed_with(
            &modelconv(&[cmd, s(&out)]),
            &at("row group 0 has a negative row count"),
        );
    }
    std::fs::write(&path, &good).unwrap();
    edit_first_row_group(&path, |mut g| {
        let mut cols = g.take_columns();
        cols[1] = cols[1]
            .clone()
            .into_builder()
            .set_total_compressed_size(-1)
            .build()
            .unwrap();
        g.set_column_metadata(cols)
    });
    for cmd in ["inspect", "verify"] {
        failed_with(
            &modelconv(&[cmd, s(&out)]),
            &at("row group 0, column 1 has a negative offset or size"),
        );
    }
    // The row group's size only `inspect` reports.
    std::fs::write(&path, &good).unwrap();
    edit_first_row_group(&path, |g| g.set_total_byte_size(-1));
    failed_with(
        &modelconv(&["inspect", s(&out)]),
        &at("row group 0 has a negative size"),
    );
    let o = modelconv(&["verify", s(&out)]);
    assert!(o.status.success(), "{}", text(&o.stderr));
}
