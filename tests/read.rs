//! The reader: round trips, direct access touching one row group, damaged files.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use modelconv::{
    convert, export, verify, Codec, ConvertConfig, Error, ExportOptions, ModelType, TargetDtype,
    WeightFile,
};

#[test]
fn round_trip_every_fixture_through_safetensors() {
    for name in FIXTURES {
        let src = read_source(&fixture(name));
        let tmp = tempdir();
        // keep: exported back, tensor-for-tensor byte-identical to the source.
        let out = tmp.path().join("keep");
        convert(fixture(name), &out, &every_tensor(TargetDtype::Keep)).unwrap();
        let st = tmp.path().join("keep.safetensors");
        let r = export(&out, &st, &ExportOptions::default()).unwrap();
        assert_eq!(r.tensors, src.len());
        assert_safetensors_equal_source(&st, &src);
        // f16, exported with --dtype f32: the f16 values widened exactly.
        let out = tmp.path().join("f16");
        convert(fixture(name), &out, &every_tensor(TargetDtype::F16)).unwrap();
        let st = tmp.path().join("f32.safetensors");
        export(
            &out,
            &st,
            &ExportOptions {
                dtype: TargetDtype::F32,
                ..Default::default()
            },
        )
        .unwrap();
        let bytes = std::fs::read(&st).unwrap();
        let back = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let wf = WeightFile::open(&out).unwrap();
        for (n, s) in &src {
            let t = back.tensor(n).unwrap();
            let (half_bytes, dtype) = expected(s, "f16");
            if dtype == "torch.float16" {
                assert_eq!(t.dtype(), safetensors::Dtype::F32);
                let want = widen_f16(&half_bytes);
                assert!(t.data() == &want[..], "{name} {n}");
                // And the reader's own f32 view agrees.
                let f = wf.tensor_f32(n).unwrap();
                assert!(
                    f.iter()
                        .flat_map(|x| x.to_le_bytes())
                        .eq(want.iter().copied()),
                    "{name} {n}"
                );
            } else {
                assert!(t.data() == &s.data[..], "{name} {n}");
            }
        }
    }
}

#[test]
fn reading_one_tensor_touches_only_its_row_group() {
    let tmp = tempdir();
    let out = tmp.path().join("o");
    let cfg = ConvertConfig::builder()
        .model_type(ModelType::CausalLm)
        .row_group_bytes(20_000)
        .build()
        .unwrap();
    convert(fixture("tiny-llama-sharded-bf16"), &out, &cfg).unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let wf = WeightFile::open_with(&out, Some(log.clone())).unwrap();
    let md = wf.parquet_metadata().clone();
    assert!(
        md.num_row_groups() > 10,
        "{} row groups",
        md.num_row_groups()
    );
    let file_len = std::fs::metadata(out.join("weights.parquet"))
        .unwrap()
        .len();
    let mut checked = 0;
    for t in wf.tensors().iter().step_by(5) {
        log.lock().unwrap().clear();
        let got = wf.tensor(&t.name).unwrap();
        assert_eq!(got.data.len() as u64, t.bytes);
        // Which row group holds it.
        let mut first = 0u64;
        let mut rg_index = None;
        for (i, rg) in md.row_groups().iter().enumerate() {
            let n = rg.num_rows() as u64;
            if t.row >= first && t.row < first + n {
                rg_index = Some(i);
            }
            first += n;
        }
        let rg = md.row_group(rg_index.unwrap());
        let (lo, hi) = rg.columns().iter().fold((u64::MAX, 0u64), |(lo, hi), c| {
            let (s, l) = c.byte_range();
            (lo.min(s), hi.max(s + l))
        });
        let ranges = log.lock().unwrap().clone();
        assert!(!ranges.is_empty());
        let touched: u64 = ranges.iter().map(|(s, e)| e - s).sum();
        for (s, e) in &ranges {
            assert!(
                *s >= lo && *e <= hi,
                "{}: read [{s}, {e}) outside its row group [{lo}, {hi})",
                t.name
            );
        }
        // One row per data page: a small tensor next to a large one touches only its own
        // page (plus the small checksum and offset columns' pages).
        assert!(
            touched <= t.bytes + 4096,
            "{}: touched {touched} bytes for {} bytes of data",
            t.name,
            t.bytes
        );
        assert!(
            touched < file_len / 4,
            "{}: touched {touched} of {file_len} bytes",
            t.name
        );
        checked += 1;
    }
    assert!(checked >= 8);
}

fn small_file(tmp: &std::path::Path, codec: Codec) -> std::path::PathBuf {
    let out = tmp.join(format!("o-{}", codec.as_str()));
    let cfg = ConvertConfig::builder()
        .compression(codec)
        .row_group_bytes(8192)
        .build()
        .unwrap();
    convert(fixture("tiny-bert"), &out, &cfg).unwrap();
    out.join("weights.parquet")
}

/// Opens, reads every tensor and verifies; returns whether anything noticed a problem.
fn damage_noticed(path: &std::path::Path) -> bool {
    // A panic caught inside the reader is a failure here, never a clean rejection.
    let not_internal = |e: &Error| assert!(!matches!(e, Error::Internal { .. }), "{e}");
    let wf = match WeightFile::open(path) {
        Ok(wf) => wf,
        Err(e) => {
            not_internal(&e);
            assert!(
                e.to_string().starts_with(&path.display().to_string()),
                "error names the file: {e}"
            );
            return true;
        }
    };
    for t in wf.tensors() {
        if let Err(e) = wf.tensor(&t.name) {
            not_internal(&e);
            assert!(e.to_string().contains(&path.display().to_string()), "{e}");
            return true;
        }
    }
    match verify(path, None, &Default::default()) {
        Ok(r) => {
            let panicked = r
                .problems
                .iter()
                .any(|p| p.contains("parquet reader panicked"));
            assert!(!panicked, "{:?}", r.problems);
            !r.passed()
        }
        Err(e) => {
            not_internal(&e);
            true
        }
    }
}

#[test]
fn flipped_bytes_anywhere_are_noticed_never_a_panic() {
    let tmp = tempdir();
    for codec in [Codec::Zstd, Codec::None] {
        let path = small_file(tmp.path(), codec);
        let good = std::fs::read(&path).unwrap();
        let mut noticed = 0;
        let mut tried = 0;
        // Every 97th byte, whole file: header, pages, page headers, footer.
        for pos in (0..good.len()).step_by(97) {
            let mut bad = good.clone();
            bad[pos] ^= 0x5a;
            std::fs::write(&path, &bad).unwrap();
            tried += 1;
            if damage_noticed(&path) {
                noticed += 1;
            }
        }
        std::fs::write(&path, &good).unwrap();
        assert!(!damage_noticed(&path));
        // Some flips land in bytes nothing depends on (padding, statistics of small
        // columns), but the data is covered by checksums: nearly all are caught.
        assert!(
            noticed * 10 >= tried * 7,
            "{codec:?}: {noticed} of {tried} flips noticed"
        );
    }
}

#[test]
fn a_flipped_data_byte_is_named_by_verify() {
    let tmp = tempdir();
    let path = small_file(tmp.path(), Codec::None);
    let wf = WeightFile::open(&path).unwrap();
    let target = "encoder.layer.0.intermediate.dense.weight";
    let t = wf.tensor(target).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let pos = bytes
        .windows(64)
        .position(|w| w == &t.data[1000..1064])
        .unwrap();
    bytes[pos + 7] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let r = verify(&path, None, &Default::default()).unwrap();
    let failed: Vec<&str> = r.failures().map(|c| c.name.as_str()).collect();
    assert_eq!(failed, vec![target]);
    assert_eq!(r.failures().next().unwrap().checksum_mismatches, 1);
}

#[test]
fn truncated_and_damaged_footers_are_clear_errors() {
    let tmp = tempdir();
    let path = small_file(tmp.path(), Codec::Zstd);
    let good = std::fs::read(&path).unwrap();
    for cut in [
        0usize,
        3,
        7,
        100,
        good.len() / 2,
        good.len() - 9,
        good.len() - 1,
    ] {
        std::fs::write(&path, &good[..cut]).unwrap();
        let err = WeightFile::open(&path).unwrap_err();
        assert!(
            matches!(err, Error::CorruptWeights { .. }),
            "cut {cut}: {err:?}"
        );
        assert!(
            err.to_string()
                .starts_with(&format!("{}: not a readable Parquet file", path.display())),
            "{err}"
        );
    }
    // Footer length pointing past the start.
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 8..n - 4].copy_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(&path, &bad).unwrap();
    let err = WeightFile::open(&path).unwrap_err();
    assert!(matches!(err, Error::CorruptWeights { .. }));
    assert_eq!(
        err.to_string(),
        format!(
            "{}: not a readable Parquet file: EOF: Parquet file too small. Size is {n} but need {}",
            path.display(),
            u32::MAX as u64 + 8
        )
    );
    // Garbage in the footer's thrift.
    let mut bad = good.clone();
    let footer_len = u32::from_le_bytes(good[n - 8..n - 4].try_into().unwrap()) as usize;
    for b in &mut bad[n - 8 - footer_len..n - 8 - footer_len + 64] {
        *b = 0xff;
    }
    std::fs::write(&path, &bad).unwrap();
    let err = WeightFile::open(&path).unwrap_err();
    assert!(
        err.to_string().starts_with(&format!(
            "{}: not a readable Parquet file: ",
            path.display()
        )),
        "{err}"
    );
    // Not a weight file at all: a Parquet file without our columns.
    std::fs::write(&path, &good).unwrap();
    let err = WeightFile::open(tmp.path()).unwrap_err();
    assert!(
        matches!(err, Error::Io { .. }),
        "a directory without weights.parquet: {err}"
    );
}

#[test]
fn missing_tensors_and_index_are_named() {
    let tmp = tempdir();
    let path = small_file(tmp.path(), Codec::Zstd);
    let wf = WeightFile::open(&path).unwrap();
    let err = wf.tensor("nope").unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{}: no tensor named `nope`", path.display())
    );
}

#[test]
fn reading_every_tensor_as_f32_matches_one_at_a_time() {
    let tmp = tempdir();
    let out = tmp.path().join("o");
    let cfg = ConvertConfig::builder()
        .row_group_bytes(10_000)
        .max_row_bytes(3000)
        .model_type(ModelType::CausalLm)
        .build()
        .unwrap();
    convert(fixture("tiny-llama-sharded-bf16"), &out, &cfg).unwrap();
    let wf = WeightFile::open(&out).unwrap();
    let seen = Mutex::new(Vec::new());
    wf.for_each_f32(&|t, v| seen.lock().unwrap().push((t.name.clone(), v)))
        .unwrap();
    let mut seen = seen.into_inner().unwrap();
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(seen.len(), wf.tensors().len());
    for (n, v) in seen {
        let one = wf.tensor_f32(&n).unwrap();
        assert!(
            v.iter()
                .map(|x| x.to_bits())
                .eq(one.iter().map(|x| x.to_bits())),
            "{n}"
        );
    }
}

/// Writes a Parquet file with the given columns of one row each and footer key-values.
fn parquet_file(
    path: &std::path::Path,
    cols: Vec<(&str, arrow_array::ArrayRef)>,
    kv: &[(&str, &str)],
) {
    let batch = arrow_array::RecordBatch::try_from_iter(cols).unwrap();
    let props = parquet::file::properties::WriterProperties::builder()
        .set_key_value_metadata(Some(
            kv.iter()
                .map(|(k, v)| parquet::file::metadata::KeyValue::new(k.to_string(), v.to_string()))
                .collect(),
        ))
        .build();
    let f = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// The seed's five columns for one f16 tensor `w` of shape [2].
fn seed_columns(with_dtype: bool) -> Vec<(&'static str, arrow_array::ArrayRef)> {
    use arrow_array::builder::{Int32Builder, ListBuilder};
    use std::sync::Arc;
    let mut shape = ListBuilder::new(Int32Builder::new());
    shape.values().append_slice(&[2]);
    shape.append(true);
    let mut cols: Vec<(&str, arrow_array::ArrayRef)> = vec![
        (
            "layer_name",
            Arc::new(arrow_array::StringArray::from(vec!["w"])),
        ),
        ("shape", Arc::new(shape.finish())),
    ];
    if with_dtype {
        cols.push((
            "dtype",
            Arc::new(arrow_array::StringArray::from(vec!["torch.float16"])),
        ));
    }
    cols.push((
        "data",
        Arc::new(arrow_array::BinaryArray::from(vec![&[0u8, 60, 0, 64][..]])),
    ));
    cols.push((
        "num_params",
        Arc::new(arrow_array::Int64Array::from(vec![2])),
    ));
    cols
}

#[test]
fn a_parquet_file_without_a_weight_column_is_named_as_such() {
    let tmp = tempdir();
    let path = tmp.path().join("w.parquet");
    parquet_file(&path, seed_columns(false), &[]);
    let err = WeightFile::open(&path).unwrap_err();
    assert!(matches!(err, Error::CorruptWeights { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "{}: not a weight file: no `dtype` column (utf8)",
            path.display()
        )
    );
    // With the column it is a seed file, read by scanning names.
    parquet_file(&path, seed_columns(true), &[]);
    let t = WeightFile::open(&path).unwrap().tensor_f32("w").unwrap();
    assert_eq!(t, vec![1.0, 2.0]);
}

#[test]
fn a_damaged_or_inconsistent_footer_index_is_refused() {
    let tmp = tempdir();
    let path = tmp.path().join("w.parquet");
    let entry = |row: u64, rows: u64, bytes: u64, dtype: &str| {
        format!(
            r#"{{"tensors":[{{"name":"w","source":"w","dtype":"{dtype}","source_dtype":"F16","shape":[2],"bytes":{bytes},"row":{row},"rows":{rows}}}]}}"#
        )
    };
    let cases = [
        (
            "{\"tensors\": [".to_string(),
            "footer tensor index is damaged: EOF while parsing a list at line 1 column 13"
                .to_string(),
        ),
        (
            entry(0, 1, 4, "torch.float8"),
            "tensor `w`: unknown dtype `torch.float8`".to_string(),
        ),
        (
            entry(0, 1, 6, "torch.float16"),
            "tensor `w`: footer tensor index is inconsistent".to_string(),
        ),
        (
            entry(1, 1, 4, "torch.float16"),
            "tensor `w`: footer tensor index is inconsistent".to_string(),
        ),
        (
            entry(0, 2, 4, "torch.float16"),
            "tensor `w`: footer tensor index is inconsistent".to_string(),
        ),
        (
            entry(0, u64::MAX, 4, "torch.float16"),
            "tensor `w`: footer tensor index is inconsistent".to_string(),
        ),
    ];
    for (index, want) in cases {
        parquet_file(&path, seed_columns(true), &[("modelconv.index", &index)]);
        let err = WeightFile::open(&path).unwrap_err();
        assert!(matches!(err, Error::CorruptWeights { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("{}: {want}", path.display()),
            "{index}"
        );
    }
    // The consistent index opens the file.
    parquet_file(
        &path,
        seed_columns(true),
        &[("modelconv.index", &entry(0, 1, 4, "torch.float16"))],
    );
    assert!(WeightFile::open(&path).unwrap().has_index());
}

#[test]
fn a_footer_index_naming_two_tensors_alike_is_refused() {
    // Found by the `weights` fuzz target: a mutated footer index named two tensors
    // `half.weight`; listing gave both, reading by name gave the first one's bytes for
    // the second.
    let path =
        root().join("fuzz/regressions/weights/found-4358fe792039b33d7a1be7af2f6e77332e6c12fa");
    let err = WeightFile::open(&path).unwrap_err();
    assert!(matches!(err, Error::CorruptWeights { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "{}: tensor `half.weight`: the file holds two tensors of this name",
            path.display()
        )
    );
}

#[test]
fn verify_names_rows_whose_description_cells_were_damaged() {
    // RELIABILITY row 44: layer_name, shape, dtype or num_params changed in a row whose
    // data (and so its checksum) is intact: verify compares every cell with the footer
    // index and names the row.
    let tmp = tempdir();
    let out = tmp.path().join("o");
    convert(fixture("tiny-bert"), &out, &ConvertConfig::default()).unwrap();
    let path = out.join("weights.parquet");
    let good = std::fs::read(&path).unwrap();
    let script = r#"
import sys, pyarrow as pa, pyarrow.parquet as pq
p, col, row = sys.argv[1], sys.argv[2], int(sys.argv[3])
f = pq.ParquetFile(p)
t = f.read()
v = t.column(col).to_pylist()
v[row] = "renamed" if col == "layer_name" else "torch.float32" if col == "dtype" else v[row] + 1 if col == "num_params" else [7, 7]
t = t.set_column(t.schema.get_field_index(col), col, pa.array(v, t.schema.field(col).type))
pq.write_table(t.replace_schema_metadata({k: v for k, v in f.metadata.metadata.items() if k != b"ARROW:schema"}), p)
"#;
    let cases = [
        (
            "layer_name",
            "row 5: layer_name `renamed` differs from the index's",
        ),
        ("shape", "row 5: shape [7, 7] differs from the index's [32]"),
        (
            "dtype",
            "row 5: dtype `torch.float32` differs from the index's",
        ),
        (
            "num_params",
            "row 5: num_params 33 differs from the index's 32",
        ),
    ];
    for (col, want) in cases {
        std::fs::write(&path, &good).unwrap();
        python_ok(&["-c", script, s(&path), col, "5"]);
        let r = verify(&out, None, &Default::default()).unwrap();
        assert!(!r.passed(), "{col}");
        let failed: Vec<(String, Vec<String>)> = r
            .failures()
            .map(|c| (c.name.clone(), c.problems.clone()))
            .collect();
        let name = WeightFile::open(&out).unwrap().tensors()[5].name.clone();
        assert_eq!(failed, vec![(name, vec![want.to_string()])], "{col}");
        assert_eq!(
            r.checks.iter().map(|c| c.checksum_mismatches).sum::<u64>(),
            0
        );
    }
}
