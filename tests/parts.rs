//! Output in parts (`--max-file-size`) and `--resume`, through the real binary: the
//! parts read back as the single file does (our reader, export, verify, pyarrow as the
//! seed's loader calls it), a conversion killed after its first part resumes into the
//! same bytes, and what must not be resumed is refused saying what differs.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use common::*;
use modelconv::WeightFile;
use sha2::{Digest, Sha256};

/// sha256 of every part file in `dir`, by name.
fn part_hashes(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("part-"))
        .map(|e| {
            let h = Sha256::digest(std::fs::read(e.path()).unwrap());
            let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
            (e.file_name().to_string_lossy().into_owned(), hex)
        })
        .collect()
}

/// MiniLM converted into `dir/one` as one file and into `dir/parted` in parts of at
/// most `size`.
fn one_and_parted(dir: &Path, size: &str) -> (PathBuf, PathBuf) {
    let (one, parted) = (dir.join("one"), dir.join("parted"));
    ok(&convert_cli(&minilm(), &one, &["--quiet"]));
    ok(&convert_cli(
        &minilm(),
        &parted,
        &["--quiet", "--max-file-size", size],
    ));
    (one, parted)
}

#[test]
fn a_parted_conversion_reads_back_as_the_single_file_does() {
    let tmp = tempdir();
    let (one, parted) = one_and_parted(tmp.path(), "10MB");
    let dir = parted.join("weights.parquet");
    assert!(dir.is_dir());

    // Part names sort in row order, each at most 10 MB; nothing else a dataset reader
    // would take for data.
    let names = entries(&dir);
    let count = names.len() - 1;
    assert!(count >= 4, "{names:?}");
    assert_eq!(names[0], "_manifest.json");
    for (k, n) in names[1..].iter().enumerate() {
        assert_eq!(n, &format!("part-{:05}-of-{count:05}.parquet", k + 1));
        let len = std::fs::metadata(dir.join(n)).unwrap().len();
        assert!(len <= 10_000_000, "{n}: {len} bytes");
    }

    // The manifest lists every part with its size, rows and sha256; metadata.json too.
    let manifest = read_json(&dir.join("_manifest.json"));
    let listed = manifest["parts"].as_array().unwrap();
    assert_eq!(listed.len(), count);
    let mut rows = 0;
    for p in listed {
        let f = p["file"].as_str().unwrap();
        let h = xxhash_rust::xxh3::xxh3_128(&std::fs::read(dir.join(f)).unwrap());
        assert_eq!(p["xxh3_128"].as_str().unwrap(), format!("{h:032x}"));
        assert_eq!(
            p["bytes"].as_u64().unwrap(),
            std::fs::metadata(dir.join(f)).unwrap().len()
        );
        assert_eq!(p["first_row"].as_u64().unwrap(), rows);
        rows += p["rows"].as_u64().unwrap();
    }
    assert_eq!(manifest["rows"].as_u64().unwrap(), rows);
    let meta = metadata(&parted);
    assert_eq!(&meta["parts"], &manifest["parts"]);

    // Our reader: every tensor's bytes equal the single file's.
    let (a, b) = (
        WeightFile::open(&one).unwrap(),
        WeightFile::open(&parted).unwrap(),
    );
    assert!(b.is_parted());
    assert_eq!(b.part_files().len(), count);
    assert_eq!(a.tensors().len(), b.tensors().len());
    for t in a.tensors() {
        assert_eq!(
            a.tensor(&t.name).unwrap().data,
            b.tensor(&t.name).unwrap().data,
            "{}",
            t.name
        );
    }
    // The embedding is larger than a part: its rows span parts and read back whole.
    let emb = b.info("embeddings.word_embeddings.weight").unwrap();
    assert!(emb.rows >= 3);

    // inspect: the tensors of the single file, every part's row groups and bytes.
    let i = modelconv(&[
        "inspect",
        parted.to_str().unwrap(),
        "--json",
        "--row-groups",
    ]);
    ok(&i);
    let i: serde_json::Value = serde_json::from_slice(&i.stdout).unwrap();
    let parts_bytes: u64 = listed.iter().map(|p| p["bytes"].as_u64().unwrap()).sum();
    let parts_groups: u64 = listed
        .iter()
        .map(|p| p["row_groups"].as_u64().unwrap())
        .sum();
    assert_eq!(i["file_bytes"].as_u64().unwrap(), parts_bytes);
    assert_eq!(
        i["row_groups"].as_array().unwrap().len() as u64,
        parts_groups
    );
    let i_rows: u64 = i["row_groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["rows"].as_u64().unwrap())
        .sum();
    assert_eq!(i_rows, rows);
    let names_of = |v: &serde_json::Value| -> Vec<String> {
        v["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_string())
            .collect()
    };
    let single = modelconv(&["inspect", one.to_str().unwrap(), "--json"]);
    let single: serde_json::Value = serde_json::from_slice(&single.stdout).unwrap();
    assert_eq!(names_of(&i), names_of(&single));
    assert_eq!(i["total_parameters"], single["total_parameters"]);
    assert_eq!(i["metadata"]["parts"], manifest["parts"]);

    // Export gives the same safetensors bytes; verify checks every part against the
    // source.
    let (ea, eb) = (
        tmp.path().join("a.safetensors"),
        tmp.path().join("b.safetensors"),
    );
    ok(&modelconv(&[
        "export",
        one.to_str().unwrap(),
        ea.to_str().unwrap(),
    ]));
    ok(&modelconv(&[
        "export",
        parted.to_str().unwrap(),
        eb.to_str().unwrap(),
    ]));
    assert_eq!(std::fs::read(&ea).unwrap(), std::fs::read(&eb).unwrap());
    let v = modelconv(&[
        "verify",
        parted.to_str().unwrap(),
        "--source",
        minilm().to_str().unwrap(),
    ]);
    ok(&v);
    assert!(
        text(&v.stdout).contains("every value equals the cast of the source"),
        "{}",
        text(&v.stdout)
    );

    // pyarrow reads the directory as one table, exactly as the seed's loader calls it,
    // rows in part order: the single file's rows, the embedding (larger than a part)
    // in consecutive rows whose data concatenate to the single file's.
    let script = r#"
import sys, pyarrow.parquet as pq
a = pq.read_table(sys.argv[1], memory_map=True)
b = pq.read_table(sys.argv[2], memory_map=True)
def rows(t):
    out = []
    for n, s, d, data in zip(*(t.column(c).to_pylist() for c in ["layer_name", "shape", "dtype", "data"])):
        if out and out[-1][0] == n:
            out[-1][3] += data
        else:
            out.append([n, s, d, data])
    return out
assert rows(a) == rows(b)
print(b.num_rows)
"#;
    let stdout = python_ok(&["-c", script, s(&one.join("weights.parquet")), s(&dir)]);
    assert_eq!(stdout.trim(), rows.to_string());
}

#[test]
fn a_conversion_killed_after_its_first_part_resumes_into_the_same_bytes() {
    let tmp = tempdir();
    let (whole, out) = (tmp.path().join("whole"), tmp.path().join("out"));
    let mut reference = vec!["--quiet"];
    reference.extend_from_slice(&SLOW_PARTED);
    ok(&convert_cli(&minilm(), &whole, &reference));

    let mut child = bin()
        .args([
            "convert",
            minilm().to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--quiet",
        ])
        .args(SLOW_PARTED)
        .args(["--threads", "1"])
        .spawn()
        .unwrap();
    let dir = out.join("weights.parquet");
    let first = dir.join("part-00001-of-00007.parquet");
    wait_until(120, 5, "no first part", || {
        first.exists() || ended_too_soon(&mut child)
    });
    child.kill().unwrap();
    child.wait().unwrap();
    // Killed: complete parts, at most a temp file, no manifest, no metadata.json.
    assert!(!out.join("metadata.json").exists());
    assert!(!dir.join("_manifest.json").exists());
    let left = part_hashes(&dir);
    assert!(!left.is_empty() && left.len() < 7, "{left:?}");
    // At most one temp file (the part in flight), besides the journal.
    let temps: Vec<String> = entries(&dir)
        .into_iter()
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(
        temps.len() <= 1 && temps.iter().all(|t| t.contains(".tmp-")),
        "{temps:?}"
    );
    // Not a conversion: the reader says so.
    let e = WeightFile::open(&out).unwrap_err().to_string();
    assert!(e.ends_with("a directory without _manifest.json: not a complete conversion (an interrupted parted conversion finishes with --resume)"), "{e}");
    // Without --resume it is refused as an existing conversion.
    let o = convert_cli(&minilm(), &out, &SLOW_PARTED);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("output already holds a conversion"),
        "{}",
        text(&o.stderr)
    );

    let mut args = vec!["--json", "--threads", "2"];
    args.extend_from_slice(&SLOW_PARTED);
    let o = convert_cli(&minilm(), &out, &[&args[..], &["--resume"]].concat());
    ok(&o);
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let statuses: Vec<&str> = report["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses.len(), 7);
    let kept = statuses.iter().filter(|s| **s == "kept").count();
    assert_eq!(kept, left.len(), "{statuses:?}");
    assert!(
        statuses[..kept].iter().all(|s| *s == "kept"),
        "{statuses:?}"
    );
    assert!(
        statuses[kept..].iter().all(|s| *s == "written"),
        "{statuses:?}"
    );
    // Every part byte-identical to the uninterrupted run's.
    assert_eq!(
        part_hashes(&dir),
        part_hashes(&whole.join("weights.parquet"))
    );
    // The manifests list the same parts (the conversion times differ).
    let m = |d: &Path| -> serde_json::Value { read_json(&d.join("_manifest.json")) };
    assert_eq!(m(&dir)["parts"], m(&whole.join("weights.parquet"))["parts"]);
}

/// Interrupts a finished parted conversion as a crash would (no manifest, no
/// metadata.json).
fn interrupt(out: &Path) {
    std::fs::remove_file(out.join("metadata.json")).unwrap();
    std::fs::remove_file(out.join("weights.parquet/_manifest.json")).unwrap();
}

/// XORs `mask` into the byte of `path` at `at(file length)`.
fn flip(path: &Path, at: impl Fn(usize) -> usize, mask: u8) {
    let mut b = std::fs::read(path).unwrap();
    let i = at(b.len());
    b[i] ^= mask;
    std::fs::write(path, &b).unwrap();
}

/// `--resume` of MiniLM in 6 MB parts into `out`: its JSON report.
fn resume_6mb(out: &Path) -> serde_json::Value {
    let o = convert_cli(
        &minilm(),
        out,
        &["--json", "--max-file-size", "6MB", "--resume"],
    );
    ok(&o);
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn resume_redoes_damaged_and_missing_parts_and_refuses_another_plan() {
    let tmp = tempdir();
    let out = tmp.path().join("out");
    let opts = ["--quiet", "--max-file-size", "6MB"];
    ok(&convert_cli(&minilm(), &out, &opts));
    let dir = out.join("weights.parquet");
    let before = part_hashes(&dir);
    let names: Vec<String> = before.keys().cloned().collect();
    assert!(names.len() >= 5);

    interrupt(&out);
    // A damaged part (one byte flipped in its data) and a deleted one.
    let damaged = dir.join(&names[2]);
    flip(&damaged, |len| len / 2, 0x40);
    std::fs::remove_file(dir.join(&names[3])).unwrap();

    let report = resume_6mb(&out);
    let parts = report["parts"].as_array().unwrap();
    for (k, p) in parts.iter().enumerate() {
        let want = match k {
            2 => "redone",
            3 => "written",
            _ => "kept",
        };
        assert_eq!(p["status"], want, "part {k}: {p}");
    }
    let reason = parts[2]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("row group")
            || reason.starts_with("row ")
            || reason.starts_with("unreadable"),
        "{reason}"
    );
    assert_eq!(part_hashes(&dir), before);
    assert!(out.join("metadata.json").exists());

    // Other options: refused, saying which, and nothing changed.
    interrupt(&out);
    let o = convert_cli(
        &minilm(),
        &out,
        &["--max-file-size", "6MB", "--resume", "--dtype", "bf16"],
    );
    assert_eq!(o.status.code(), Some(1));
    let first = dir.join(&names[0]);
    assert_eq!(
        text(&o.stderr).trim_end(),
        format!(
            "error: {}: cannot resume: it was converted with other options: dtype \"f16\" (now \"bf16\"), use_float16 true (now false); convert into another output, or pass --force to start over",
            first.display()
        )
    );
    assert_eq!(part_hashes(&dir), before);

    // Another input into the same output: refused, naming the files.
    let o = convert_cli(
        &common::fixture("tiny-bert"),
        &out,
        &["--max-file-size", "6MB", "--resume"],
    );
    assert_eq!(o.status.code(), Some(1));
    let e = text(&o.stderr);
    assert!(
        e.contains("cannot resume: it was converted from other input files: model.safetensors (90868376 bytes); this input is model.safetensors ("),
        "{e}"
    );
    assert_eq!(part_hashes(&dir), before);

    // --force starts over and gives the same parts.
    ok(&convert_cli(
        &minilm(),
        &out,
        &["--quiet", "--max-file-size", "6MB", "--force"],
    ));
    assert_eq!(part_hashes(&dir), before);
    // A complete conversion resumed: the manifest's hashes decide (the whole file
    // hashed, no row decompressed); a part changed since is redone.
    flip(&dir.join(&names[1]), |len| len - 20, 1);
    let report = resume_6mb(&out);
    let parts = report["parts"].as_array().unwrap();
    assert_eq!(parts[1]["status"], "redone");
    let reason = parts[1]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("its content differs from the one recorded when it was written")
            || reason.starts_with("unreadable"),
        "{reason}"
    );
    assert!(parts
        .iter()
        .enumerate()
        .all(|(k, p)| k == 1 || p["status"] == "kept"));
    assert_eq!(part_hashes(&dir), before);
    assert!(!dir.join("_journal.json").exists());
}

#[test]
fn a_second_conversion_into_a_locked_output_is_refused() {
    let tmp = tempdir();
    let out: PathBuf = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    // The lock a running conversion holds, taken here by this process.
    let lock = std::fs::File::create(out.join(".modelconv.lock")).unwrap();
    lock.lock().unwrap();
    let o = convert_cli(&common::fixture("tiny-bert"), &out, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        text(&o.stderr).trim_end(),
        format!(
            "error: {}: another conversion is writing into this output (it holds this lock)",
            out.join(".modelconv.lock").display()
        )
    );
    assert!(!out.join("weights.parquet").exists());
    assert!(!out.join("metadata.json").exists());
    drop(lock);
    // Released (the process holding it ended): the conversion goes ahead, and leaves
    // no lock file behind.
    ok(&convert_cli(
        &common::fixture("tiny-bert"),
        &out,
        &["--quiet"],
    ));
    assert!(!out.join(".modelconv.lock").exists());
}

#[test]
fn part_sizes_parse_in_decimal_and_binary_units_and_too_small_is_refused() {
    assert_eq!(modelconv::parse_size("5GB"), Ok(5_000_000_000));
    assert_eq!(modelconv::parse_size("2gib"), Ok(2 << 30));
    assert_eq!(modelconv::parse_size("750MB"), Ok(750_000_000));
    assert_eq!(modelconv::parse_size("1.5MB"), Ok(1_500_000));
    assert_eq!(modelconv::parse_size("4096"), Ok(4096));
    assert!(modelconv::parse_size("5 GBs").is_err());
    assert!(modelconv::parse_size("").is_err());
    let tmp = tempdir();
    let o = convert_cli(
        &common::fixture("tiny-bert"),
        &tmp.path().join("o"),
        &["--max-file-size", "10KB"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr)
            .contains("the largest part size must be at least 1000000 bytes (1MB), not 10000"),
        "{}",
        text(&o.stderr)
    );
    let o = convert_cli(
        &common::fixture("tiny-bert"),
        &tmp.path().join("o"),
        &["--resume"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("--resume keeps the complete parts of a parted conversion: give the same --max-file-size"),
        "{}",
        text(&o.stderr)
    );
}

/// MiniLM converted by the CLI in 6 MB parts into `cli` (the reference for parts
/// converted one by one), the library options of the same plan (one thread), and its
/// part count.
fn six_mb_reference(cli: &Path) -> (modelconv::ConvertConfig, usize) {
    ok(&convert_cli(
        &minilm(),
        cli,
        &["--quiet", "--max-file-size", "6MB"],
    ));
    let cfg = modelconv::ConvertConfig::builder()
        .max_file_size(Some(6_000_000))
        .threads(1)
        .build()
        .unwrap();
    let n = modelconv::plan_conversion(minilm(), &cfg)
        .unwrap()
        .parts
        .len();
    assert_eq!(n, part_hashes(&cli.join("weights.parquet")).len());
    (cfg, n)
}

/// The options of the resumed conversion that commits parts converted one by one.
fn six_mb_commit() -> modelconv::ConvertConfig {
    modelconv::ConvertConfig::builder()
        .max_file_size(Some(6_000_000))
        .resume(true)
        .build()
        .unwrap()
}

/// Commits the parts converted one by one into `out`: every part is kept, and they
/// are byte for byte the parts the CLI wrote into `cli`.
fn commit_keeps_the_clis_parts(out: &Path, cli: &Path) -> modelconv::ConversionReport {
    let r = modelconv::convert(minilm(), out, &six_mb_commit()).unwrap();
    assert!(r
        .parts
        .iter()
        .all(|p| p.status == modelconv::PartStatus::Kept));
    assert_eq!(
        part_hashes(&out.join("weights.parquet")),
        part_hashes(&cli.join("weights.parquet"))
    );
    r
}

#[test]
fn parts_converted_one_by_one_in_any_order_commit_into_the_clis_output() {
    let tmp = tempdir();
    let (cli, lib) = (tmp.path().join("cli"), tmp.path().join("lib"));
    let (cfg, n) = six_mb_reference(&cli);
    let plan = modelconv::plan_conversion(minilm(), &cfg).unwrap();
    // Two "workers" at once, each taking parts from the end.
    let next = std::sync::Mutex::new((0..n).collect::<Vec<usize>>());
    let done = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let Some(k) = next.lock().unwrap().pop() else {
                    break;
                };
                let o = modelconv::convert_part(minilm(), &lib, &cfg, k).unwrap();
                assert_eq!(o.file, plan.parts[k].file);
                assert_eq!(o.status, modelconv::PartStatus::Written);
                done.lock().unwrap().push((k, o.xxh3_128));
            });
        }
    });
    // A part converted again is kept, not rewritten.
    let again = modelconv::convert_part(minilm(), &lib, &cfg, 0).unwrap();
    assert_eq!(again.status, modelconv::PartStatus::Kept);
    assert!(!lib.join("metadata.json").exists());
    let e = modelconv::convert_part(minilm(), &lib, &cfg, n)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!(
            "part {n} does not exist: the plan has {n} parts (0 to {})",
            n - 1
        )
    );
    // The commit: a resumed conversion keeps every part and writes the manifest.
    let r = commit_keeps_the_clis_parts(&lib, &cli);
    let mut done = done.into_inner().unwrap();
    done.sort();
    let listed: Vec<(usize, String)> = r
        .parts
        .iter()
        .enumerate()
        .map(|(k, p)| (k, p.xxh3_128.clone()))
        .collect();
    assert_eq!(done, listed);
}

#[test]
fn parts_recorded_by_their_workers_are_checked_by_hash_at_the_commit() {
    let tmp = tempdir();
    let (cli, out) = (tmp.path().join("cli"), tmp.path().join("out"));
    let (cfg, n) = six_mb_reference(&cli);
    let outcomes: Vec<modelconv::PartOutcome> = (0..n)
        .map(|k| modelconv::convert_part(minilm(), &out, &cfg, k).unwrap())
        .collect();
    // What the workers reported goes to the journal; one part is damaged after.
    modelconv::record_parts(&out, &outcomes).unwrap();
    let journal = read_json(&out.join("weights.parquet/_journal.json"));
    assert_eq!(journal.as_array().unwrap().len(), n);
    let damaged = out.join("weights.parquet").join(&outcomes[1].file);
    flip(&damaged, |len| len / 2, 0x01);
    let r = modelconv::convert(minilm(), &out, &six_mb_commit()).unwrap();
    for (k, p) in r.parts.iter().enumerate() {
        match &p.status {
            modelconv::PartStatus::Redone { reason } if k == 1 => assert!(
                reason.starts_with("its content differs from the one recorded when it was written"),
                "{reason}"
            ),
            s => assert_eq!(*s, modelconv::PartStatus::Kept, "part {k}"),
        }
    }
    assert_eq!(
        part_hashes(&out.join("weights.parquet")),
        part_hashes(&cli.join("weights.parquet"))
    );
    assert!(!out.join("weights.parquet/_journal.json").exists());
}

#[test]
fn a_part_written_twice_at_once_commits_into_the_clis_bytes() {
    // A retried task whose first attempt was not dead after all: two writers of the
    // same part at the same time, each to its own temp file, each renamed whole.
    let tmp = tempdir();
    let (cli, out) = (tmp.path().join("cli"), tmp.path().join("out"));
    let (cfg, n) = six_mb_reference(&cli);
    let twice: Vec<modelconv::PartOutcome> = std::thread::scope(|s| {
        let a = s.spawn(|| modelconv::convert_part(minilm(), &out, &cfg, 1).unwrap());
        let b = s.spawn(|| modelconv::convert_part(minilm(), &out, &cfg, 1).unwrap());
        vec![a.join().unwrap(), b.join().unwrap()]
    });
    assert_eq!(twice[0].xxh3_128, twice[1].xxh3_128);
    let mut outcomes: Vec<modelconv::PartOutcome> = (0..n)
        .filter(|k| *k != 1)
        .map(|k| modelconv::convert_part(minilm(), &out, &cfg, k).unwrap())
        .collect();
    outcomes.push(twice[1].clone());
    modelconv::record_parts(&out, &outcomes).unwrap();
    commit_keeps_the_clis_parts(&out, &cli);
    assert!(entries(&out.join("weights.parquet"))
        .iter()
        .all(|n| !n.starts_with('.')));
}

#[test]
fn a_write_that_fails_in_part_two_keeps_part_one_and_resumes() {
    // RLIMIT_FSIZE binds root too: no part file may pass 4 MB. The first part (the
    // small embeddings) is smaller; the second (an embedding row of about 6 MB,
    // uncompressed) fails midway, as on a full disk.
    let tmp = tempdir();
    let (out, clean) = (tmp.path().join("out"), tmp.path().join("clean"));
    let opts = ["--max-file-size", "6MB", "--compression", "none", "--quiet"];
    let model = minilm();
    let mut args = vec![
        "convert",
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(&opts);
    let o = modelconv_with_file_limit(8000, &args);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let dir = out.join("weights.parquet");
    let n = part_hashes(&dir).len();
    assert_eq!(n, 1, "{:?}", part_hashes(&dir));
    let count = {
        let cfg = modelconv::ConvertConfig::builder()
            .max_file_size(Some(6_000_000))
            .compression(modelconv::Codec::None)
            .build()
            .unwrap();
        modelconv::plan_conversion(minilm(), &cfg)
            .unwrap()
            .parts
            .len()
    };
    let second = dir.join(format!("part-00002-of-{count:05}.parquet"));
    assert!(
        err.starts_with(&format!("error: {}: ", second.display())),
        "{err}"
    );
    assert!(err.contains("File too large"), "{err}");
    // Nothing but the complete first part and the journal that records it: no temp
    // file, no manifest, no metadata.json.
    let names = entries(&dir);
    let first = format!("part-00001-of-{count:05}.parquet");
    assert_eq!(names, vec!["_journal.json".to_string(), first.clone()]);
    let journal = read_json(&dir.join("_journal.json"));
    let h = xxhash_rust::xxh3::xxh3_128(&std::fs::read(dir.join(&first)).unwrap());
    assert_eq!(journal[0]["file"], first.as_str());
    assert_eq!(journal[0]["xxh3_128"], format!("{h:032x}").as_str());
    assert!(!out.join("metadata.json").exists());

    let o = convert_cli(
        &minilm(),
        &out,
        &[&opts[..], &["--resume", "--json"]].concat(),
    );
    ok(&o);
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["parts"][0]["status"], "kept");
    assert_eq!(report["parts"][1]["status"], "written");
    ok(&convert_cli(&minilm(), &clean, &opts));
    assert_eq!(
        part_hashes(&dir),
        part_hashes(&clean.join("weights.parquet"))
    );
}

#[test]
fn one_tensor_by_name_reads_only_the_part_that_holds_it() {
    let tmp = tempdir();
    let (one, parted) = one_and_parted(tmp.path(), "6MB");
    let wf = WeightFile::open(&parted).unwrap();
    let files: Vec<PathBuf> = wf
        .part_files()
        .iter()
        .map(|(p, _)| p.to_path_buf())
        .collect();
    let last = wf.tensors().last().unwrap().name.clone();
    // Every other part emptied after the open: reading the tensor must not touch them
    // (a mapped page of a truncated file would fault, a read would come up short).
    for f in &files[..files.len() - 1] {
        std::fs::OpenOptions::new()
            .write(true)
            .open(f)
            .unwrap()
            .set_len(0)
            .unwrap();
    }
    let started = Instant::now();
    let t = wf.tensor(&last).unwrap();
    eprintln!(
        "`{last}` from part {} of {} in {:?}",
        files.len(),
        files.len(),
        started.elapsed()
    );
    assert_eq!(
        t.data,
        WeightFile::open(&one).unwrap().tensor(&last).unwrap().data
    );
}

/// `v` with every number written to 12 significant digits.
fn rounded(v: &serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Number(n) => match n.as_f64() {
            Some(f) if !n.is_u64() && !n.is_i64() => serde_json::json!(format!("{f:.11e}")),
            _ => v.clone(),
        },
        serde_json::Value::Array(a) => a.iter().map(rounded).collect(),
        serde_json::Value::Object(o) => o.iter().map(|(k, x)| (k.clone(), rounded(x))).collect(),
        _ => v.clone(),
    }
}

#[test]
fn a_quantized_output_in_parts_reports_and_reads_as_the_single_file() {
    let tmp = tempdir();
    let (one, parted) = (tmp.path().join("one"), tmp.path().join("parted"));
    let q = ["--quantize", "int8", "--group-size", "64", "--json"];
    let a = convert_cli(&minilm(), &one, &q);
    ok(&a);
    let b = convert_cli(
        &minilm(),
        &parted,
        &[&q[..], &["--max-file-size", "4MB"]].concat(),
    );
    ok(&b);
    let (ra, rb): (serde_json::Value, serde_json::Value) = (
        serde_json::from_slice(&a.stdout).unwrap(),
        serde_json::from_slice(&b.stdout).unwrap(),
    );
    assert!(rb["parts"].as_array().unwrap().len() >= 3);
    // The error report, summed over the parts, is the single file's (to 12 digits: a
    // tensor split over parts has its squared errors summed per part, then added).
    assert_eq!(rounded(&ra["quantization"]), rounded(&rb["quantization"]));
    let (wa, wb) = (
        WeightFile::open(&one).unwrap(),
        WeightFile::open(&parted).unwrap(),
    );
    for t in wa.tensors() {
        let (x, y) = (wa.tensor(&t.name).unwrap(), wb.tensor(&t.name).unwrap());
        assert_eq!(x.data, y.data, "{}", t.name);
        assert_eq!(x.to_f32(), y.to_f32(), "{}", t.name);
    }
    // Resumed with every part kept: the report comes from the parts' stamps.
    std::fs::remove_file(parted.join("metadata.json")).unwrap();
    std::fs::remove_file(parted.join("weights.parquet/_manifest.json")).unwrap();
    let c = convert_cli(
        &minilm(),
        &parted,
        &[&q[..], &["--max-file-size", "4MB", "--resume"]].concat(),
    );
    ok(&c);
    let rc: serde_json::Value = serde_json::from_slice(&c.stdout).unwrap();
    assert!(rc["parts"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["status"] == "kept"));
    assert_eq!(rc["quantization"], rb["quantization"]);
    let v = modelconv(&[
        "verify",
        parted.to_str().unwrap(),
        "--source",
        minilm().to_str().unwrap(),
    ]);
    ok(&v);
}
