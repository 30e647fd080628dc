//! The real binary in a scratch directory: summary and JSON output, exit codes, errors
//! rendered once, dry run, inspect, verify, export.

mod common;

use std::path::Path;
use std::process::Output;

use common::*;

#[test]
fn convert_prints_a_summary_and_json_on_request() {
    let tmp = tempdir();
    let out = tmp.path().join("o");
    let o = modelconv(&["convert", s(&fixture("tiny-bert")), "-o", s(&out)]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(
        err.starts_with("converted 39 tensors, 36,704 parameters: "),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "weights    {}",
            out.join("weights.parquet").display()
        )),
        "{err}"
    );
    assert!(o.stdout.is_empty(), "stdout is for --json only");

    let out2 = tmp.path().join("o2");
    let o = modelconv(&[
        "convert",
        s(&fixture("tiny-bert")),
        "-o",
        s(&out2),
        "--json",
        "--validate",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for k in [
        "success",
        "model_name",
        "output_dir",
        "parquet_path",
        "tokenizer_path",
        "metadata_path",
        "total_parameters",
        "file_size_mb",
        "compression_ratio",
        "conversion_time_sec",
        "validation_passed",
        "error_message",
        "metadata",
    ] {
        assert!(v.get(k).is_some(), "missing {k}");
    }
    assert_eq!(v["success"], true);
    assert_eq!(v["validation_passed"], true);
    assert_eq!(
        v["total_parameters"], 36_704,
        "39 tensors of tiny-bert, counted from its header"
    );
    assert!(v["error_message"].is_null());
}

#[test]
fn failures_exit_non_zero_with_one_error_line_and_json_result() {
    let tmp = tempdir();
    let out = tmp.path().join("o");
    let o = modelconv(&["convert", s(&tmp.path().join("nope")), "-o", s(&out)]);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains("cannot open"), "{err}");
    assert_eq!(
        err.matches("No such file or directory").count(),
        1,
        "the cause once: {err}"
    );

    let o = modelconv(&[
        "convert",
        s(&tmp.path().join("nope")),
        "-o",
        s(&out),
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["success"], false);
    assert!(v["error_message"].as_str().unwrap().contains("cannot open"));

    // Usage errors are clap's, exit 2.
    let o = modelconv(&[
        "convert",
        s(&fixture("tiny-bert")),
        "-o",
        s(&out),
        "--dtype",
        "f8",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("unknown dtype `f8`"));

    // An existing conversion is refused.
    assert!(
        modelconv(&["convert", s(&fixture("tiny-bert")), "-o", s(&out), "-q"])
            .status
            .success()
    );
    let o = modelconv(&["convert", s(&fixture("tiny-bert")), "-o", s(&out), "-q"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("output already holds a conversion; pass --force to replace it")
    );
    converts(&fixture("tiny-bert"), &out, &["--force"]);
}

#[test]
fn escape_characters_in_names_are_sanitised_when_printed() {
    let tmp = tempdir();
    let dir = tmp.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    write_safetensors(
        &dir.join("model.safetensors"),
        &[("evil\u{1b}[31m\u{202e}name", "F32", vec![1], vec![0; 4])],
    );
    let o = modelconv(&[
        "convert",
        s(&dir),
        "--dry-run",
        "--model-type",
        "transformers",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(
        !out.contains('\u{1b}') && !out.contains('\u{202e}'),
        "{out}"
    );
    assert!(out.contains("evil\\u{1b}[31m\\u{202e}name"), "{out}");
}

#[test]
fn inspect_verify_export_round_trip() {
    let tmp = tempdir();
    let out = tmp.path().join("o");
    converts(
        &fixture("tiny-llama-sharded-bf16"),
        &out,
        &["--dtype", "keep"],
    );

    let o = modelconv(&["inspect", s(&out)]);
    assert!(o.status.success());
    let t = text(&o.stdout);
    assert!(t.contains("model.embed_tokens.weight"), "{t}");
    assert!(
        t.contains("39 tensors, 213,568 parameters, 417.12 KiB of data"),
        "{t}"
    );
    assert!(
        t.contains("format 1, cast keep, footer index yes, checksums yes"),
        "{t}"
    );

    let o = modelconv(&["inspect", s(&out), "--json", "--row-groups"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["total_tensors"], 39);
    assert_eq!(v["total_parameters"], 213_568);
    assert_eq!(v["tensors"][0]["dtype"], "BF16");
    assert_eq!(v["row_groups"][0]["rows"], 39);

    let o = modelconv(&[
        "verify",
        s(&out),
        "--source",
        s(&fixture("tiny-llama-sharded-bf16")),
    ]);
    assert!(o.status.success(), "{}", text(&o.stdout));
    assert!(
        text(&o.stdout)
            .starts_with("ok: 39 tensors, 39 rows, checksums verified, every value equals"),
        "{}",
        text(&o.stdout)
    );

    let st = tmp.path().join("back.safetensors");
    let o = modelconv(&["export", s(&out), s(&st)]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    // --dtype keep exported back is tensor-for-tensor byte-identical to the source.
    let src = read_source(&fixture("tiny-llama-sharded-bf16"));
    assert_safetensors_equal_source(&st, &src);
    let o = modelconv(&["export", s(&out), s(&st)]);
    assert_eq!(o.status.code(), Some(1), "existing export refused");
}

#[test]
fn verify_names_a_tensor_with_a_flipped_byte() {
    let tmp = tempdir();
    let out = tmp.path().join("o");
    converts(&fixture("tiny-bert"), &out, &["--compression", "none"]);
    let wf = modelconv::WeightFile::open(&out).unwrap();
    // Find the bytes of one tensor in the uncompressed file and flip one.
    let t = wf.tensor("encoder.layer.1.output.dense.weight").unwrap();
    let path = out.join("weights.parquet");
    let mut bytes = std::fs::read(&path).unwrap();
    let pos = bytes
        .windows(64)
        .position(|w| w == &t.data[256..320])
        .unwrap();
    bytes[pos + 10] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    let o = modelconv(&["verify", s(&out)]);
    assert_eq!(o.status.code(), Some(1));
    let t = text(&o.stdout);
    assert!(
        t.contains("FAIL `encoder.layer.1.output.dense.weight`: 1 row checksum mismatch(es)"),
        "{t}"
    );
    assert!(t.contains("FAILED: 39 tensors"), "{t}");
    let o = modelconv(&[
        "verify",
        s(&out),
        "--source",
        s(&fixture("tiny-bert")),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let bad: Vec<&serde_json::Value> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["value_mismatches"] != 0)
        .collect();
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0]["name"], "encoder.layer.1.output.dense.weight");
    assert_eq!(bad[0]["value_mismatches"], 1);
}

/// Starts the real binary with `args`, waits until `ready` holds (it is writing), sends
/// `signals` (with `gap` between them), and returns its output.
fn signalled(args: &[&str], ready: &dyn Fn() -> bool, signals: &[i32], gap: u64) -> Output {
    let child = bin()
        .args(args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(120, 10, "the command never got going", ready);
    for &sig in signals {
        std::thread::sleep(std::time::Duration::from_millis(gap));
        signal(&child, sig);
    }
    child.wait_with_output().unwrap()
}

#[test]
fn signals_stop_convert_and_export_and_leave_nothing() {
    let tmp = tempdir();
    let model = tmp.path().join("clip");
    build_from_manifest(&fixture("manifests/clip-vit-base-patch32.json"), &model);
    let out = tmp.path().join("o");
    // zstd level 19 on one thread takes minutes for this 600 MB model; 1 MiB row groups
    // make the cancellation point frequent.
    let mut slow = vec!["convert", s(&model), "-o", s(&out), "--part", "all"];
    slow.extend(SLOW_CONVERT);
    let writing = || entries(&out).iter().any(|n| n.contains(".tmp-"));
    // Ctrl-C, then SIGTERM: the conversion stops at its next row group, cleans up, 130.
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let o = signalled(&slow, &writing, &[sig], 300);
        assert_eq!(o.status.code(), Some(130), "{sig}: {}", text(&o.stderr));
        assert_eq!(text(&o.stderr), "error: cancelled\n");
        assert!(entries(&out).is_empty(), "{sig}: left {:?}", entries(&out));
    }
    // A second Ctrl-C exits at once, still leaving no file that looks complete.
    let o = signalled(&slow, &writing, &[libc::SIGINT, libc::SIGINT], 100);
    assert_eq!(o.status.code(), Some(130), "{}", text(&o.stderr));
    assert!(entries(&out).is_empty(), "left {:?}", entries(&out));
    // export: convert quickly, then interrupt the export of every tensor as f32.
    let o = modelconv(&[
        "convert",
        s(&model),
        "-o",
        s(&out),
        "--part",
        "all",
        "-q",
        "--compression",
        "none",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let st = tmp.path().join("x.safetensors");
    let exporting = || {
        entries(tmp.path())
            .iter()
            .any(|n| n.starts_with(".x.safetensors.tmp-"))
    };
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let o = signalled(
            &["export", s(&out), s(&st), "--dtype", "f32"],
            &exporting,
            &[sig],
            0,
        );
        assert_eq!(o.status.code(), Some(130), "{sig}: {}", text(&o.stderr));
        let left: Vec<String> = entries(tmp.path())
            .into_iter()
            .filter(|n| n.contains("x.safetensors"))
            .collect();
        assert!(left.is_empty(), "{sig}: left {left:?}");
    }
}

/// Runs `convert` with `args` after the input and output, expects exit 2 with exactly
/// `error: {want}`, and nothing created.
fn refused_usage(input: &str, out: &Path, args: &[&str], want: &str) {
    let mut all = vec!["convert", s(Path::new(input)), "-o", s(out)];
    all.extend(args);
    let o = modelconv(&all);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{args:?}: an option value is a usage error"
    );
    assert_eq!(text(&o.stderr), format!("error: {want}\n"));
    assert!(!out.exists(), "nothing may be created for a refused option");
}

#[test]
fn option_values_are_checked_before_anything_is_created() {
    let tmp = tempdir();
    let out = tmp.path().join("o");
    let bert = fixture("tiny-bert");
    let bert = bert.to_str().unwrap();
    refused_usage(
        bert,
        &out,
        &["--level", "99"],
        "zstd level 99 is out of range (-131072 to 22)",
    );
    refused_usage(
        bert,
        &out,
        &["--row-group-mb", "0"],
        "the row-group budget must be between 1 byte and 1024 MiB, not 0 bytes",
    );
}

#[test]
fn a_part_on_a_family_without_parts_is_refused() {
    let tmp = tempdir();
    let out = tmp.path().join("o");
    let (bert, whisper) = (fixture("tiny-bert"), fixture("tiny-whisper"));
    refused_usage(
        bert.to_str().unwrap(),
        &out,
        &["--part", "vision"],
        "--part vision applies to clip and whisper only, not bert",
    );
    refused_usage(
        whisper.to_str().unwrap(),
        &out,
        &["--part", "vision"],
        "--part vision does not exist for whisper (choose encoder, decoder or all)",
    );
}

#[test]
fn the_binary_adds_the_command_line_hint_to_library_errors() {
    let tmp = tempdir();
    let model = tmp.path().join("m.safetensors");
    // bf16 -2e5 does not fit f16.
    let big = half::bf16::from_f32(-2.0e5).to_le_bytes().to_vec();
    write_safetensors(&model, &[("model.layers.0.w", "BF16", vec![1], big)]);
    let out = tmp.path().join("o");
    let o = modelconv(&[
        "convert",
        s(&model),
        "-o",
        s(&out),
        "--model-type",
        "causallm",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        text(&o.stderr),
        format!(
            "error: {}: tensor `model.layers.0.w`: 1 finite value would overflow to infinity casting \
             BF16 to F16 (largest magnitude 199680); choose --dtype keep, bf16 or f32, or pass --allow-overflow\n",
            model.display()
        )
    );
    assert!(!out.join("weights.parquet").exists());
}

#[test]
fn a_killed_conversion_leaves_a_named_temp_file_that_the_next_run_removes() {
    let tmp = tempdir();
    let out = tmp.path().join("o");
    // Slow enough to be caught mid-write: zstd 19 on one thread, 1 MiB row groups.
    let mut child = bin()
        .args(["convert", s(&minilm()), "-o", s(&out), "-q"])
        .args(SLOW_CONVERT)
        .spawn()
        .unwrap();
    wait_until(120, 20, "no temp file appeared", || {
        !temp_files(&out).is_empty()
    });
    std::thread::sleep(std::time::Duration::from_millis(200));
    child.kill().unwrap(); // SIGKILL: no handler runs
    child.wait().unwrap();
    let left = temp_files(&out);
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(
        left[0].starts_with(&format!(".weights.parquet.tmp-{}-", child.id())),
        "the temp file names the weights and the killed process: {left:?}"
    );
    assert!(!out.join("weights.parquet").exists());
    // The next conversion into the directory removes it and says so.
    let o = modelconv(&["convert", s(&fixture("tiny-bert")), "-o", s(&out), "-q"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(
        text(&o.stderr),
        format!(
            "note: removed `{}`, left by a conversion that no longer runs\n",
            left[0]
        )
    );
    assert!(temp_files(&out).is_empty());
    assert!(out.join("weights.parquet").exists());
}
