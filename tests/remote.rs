//! Remote inputs against the Hub-like server of `tests/servers/hub_server.py` (loopback,
//! started and stopped by each test): every URL form converts to the bytes a local
//! conversion writes; every injected fault has its expected outcome; tokens go to the
//! Hub only and are never shown.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::hub::Hub;
use common::*;

/// The binary with a pinned conversion time and fast retries (50 ms first backoff),
/// `env` added.
fn modelconv_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = bin();
    c.args(args)
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .env("MODELCONV_HTTP_BACKOFF", "0.05")
        .env_remove("HF_TOKEN")
        .env("HF_HOME", "/nonexistent-hf-home");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// A local conversion of `dir` into `out`.
fn local(dir: &Path, out: &Path) {
    ok(&modelconv_env(
        &["convert", s(dir), "-o", s(out), "-q"],
        &[],
    ));
}

/// The bytes of a weight file before its footer (every row group, byte for byte), and
/// its footer's length.
fn before_footer(p: &Path) -> Vec<u8> {
    let b = std::fs::read(p).unwrap();
    let n = b.len();
    assert_eq!(&b[n - 4..], b"PAR1");
    let footer = u32::from_le_bytes(b[n - 8..n - 4].try_into().unwrap()) as usize;
    b[..n - 8 - footer].to_vec()
}

/// The metadata of an output without the two fields that name where it came from and
/// went to.
fn metadata_but_names(out: &Path) -> serde_json::Value {
    let mut v = metadata(out);
    let o = v.as_object_mut().unwrap();
    o.remove("model_name");
    o.remove("parquet_path");
    o.remove("tokenizer_path");
    v
}

/// Every file of `dir` (recursively) with its bytes, relative names.
fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

/// `remote` converted as `local_out` was: the same row groups byte for byte, the same
/// metadata but for the names, the same copied files.
fn assert_same_output(local_out: &Path, remote_out: &Path) {
    let (a, b) = (
        local_out.join("weights.parquet"),
        remote_out.join("weights.parquet"),
    );
    assert!(before_footer(&a) == before_footer(&b), "row groups differ");
    assert_eq!(
        metadata_but_names(local_out),
        metadata_but_names(remote_out)
    );
    let names = |t: &[(PathBuf, Vec<u8>)]| t.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>();
    let (ta, tb) = (tree(local_out), tree(remote_out));
    assert_eq!(names(&ta), names(&tb));
    for ((p, x), (_, y)) in ta.iter().zip(&tb) {
        let n = p.to_string_lossy();
        if n != "weights.parquet" && n != "metadata.json" {
            assert!(x == y, "{n} differs");
        }
    }
}

fn no_temp_dirs_in(tmp: &Path) -> Vec<String> {
    entries(tmp)
        .into_iter()
        .filter(|n| n.starts_with("modelconv-remote-"))
        .collect()
}

#[test]
fn every_fixture_and_minilm_from_the_hub_convert_as_they_do_locally() {
    let tmp = tempdir();
    let minilm = minilm();
    let mut repos: Vec<(String, PathBuf)> = FIXTURES
        .iter()
        .map(|f| (format!("fixtures/{f}"), fixture(f)))
        .collect();
    repos.push((
        "sentence-transformers/all-MiniLM-L6-v2".into(),
        minilm.clone(),
    ));
    let refs: Vec<(&str, &Path)> = repos
        .iter()
        .map(|(n, p)| (n.as_str(), p.as_path()))
        .collect();
    let hub = Hub::start(&refs, None, &[]);
    let ep = hub.endpoint();
    // A token in the environment: it must reach the Hub's API and resolve, never the
    // storage the Hub redirects to, and never any output.
    let token = "hf_SECRETtoken1234567890";
    let scratch = tmp.path().join("tmp");
    std::fs::create_dir(&scratch).unwrap();
    for (name, dir) in &repos {
        let (lo, ro) = (
            tmp.path().join(format!("{name}-l")),
            tmp.path().join(format!("{name}-r")),
        );
        local(dir, &lo);
        let url = format!("hf://{name}");
        let o = modelconv_env(
            &["convert", &url, "-o", s(&ro), "--json"],
            &[
                ("HF_ENDPOINT", &ep),
                ("HF_TOKEN", token),
                ("TMPDIR", s(&scratch)),
            ],
        );
        ok(&o);
        assert_same_output(&lo, &ro);
        let all = format!("{}{}", text(&o.stdout), text(&o.stderr));
        assert!(!all.contains(token), "{name}: the token was printed");
        for (p, b) in tree(&ro) {
            assert!(
                !String::from_utf8_lossy(&b).contains(token),
                "{name}: the token is in {}",
                p.display()
            );
        }
        let meta = metadata(&ro);
        assert_eq!(meta["model_name"], url.as_str());
    }
    let st = hub.stats();
    assert_eq!(
        st["storage_auth"],
        serde_json::json!([]),
        "storage saw a token"
    );
    assert!(st["requests"]["storage"].as_u64().unwrap() > 0);
    // The private copies of the small files are gone with each conversion.
    assert!(
        no_temp_dirs_in(&scratch).is_empty(),
        "{:?}",
        no_temp_dirs_in(&scratch)
    );
}

#[test]
fn every_url_form_reads_the_same_checkpoint() {
    let tmp = tempdir();
    let llama = fixture("tiny-llama-sharded-bf16");
    let hub = Hub::start(&[("org/llama", &llama)], Some(&fixture("")), &[]);
    let ep = hub.endpoint();
    let env = [("HF_ENDPOINT", ep.as_str())];
    let lo = tmp.path().join("local");
    local(&llama, &lo);
    let commit = hub.commit("org/llama");
    let forms = [
        "hf://org/llama".to_string(),
        "hf://org/llama@main".to_string(),
        format!("hf://org/llama@{commit}"),
        "hf://org/llama/model.safetensors.index.json".to_string(),
        hub.file_url("tiny-llama-sharded-bf16/model.safetensors.index.json"),
        hub.file_url("tiny-llama-sharded-bf16/"),
        hub.file_url("tiny-llama-sharded-bf16"),
    ];
    for (i, url) in forms.iter().enumerate() {
        let ro = tmp.path().join(format!("r{i}"));
        let o = modelconv_env(&["convert", url, "-o", s(&ro), "-q"], &env);
        ok(&o);
        assert_same_output(&lo, &ro);
    }
    // A single file by URL (its config.json beside it is found by name).
    let bert = fixture("tiny-bert");
    let (lo, ro) = (tmp.path().join("bl"), tmp.path().join("br"));
    local(&bert.join("model.safetensors"), &lo);
    let o = modelconv_env(
        &[
            "convert",
            &hub.file_url("tiny-bert/model.safetensors"),
            "-o",
            s(&ro),
            "-q",
        ],
        &env,
    );
    ok(&o);
    assert_same_output(&lo, &ro);
    // Revisions and repositories that do not exist.
    let o = modelconv_env(
        &[
            "convert",
            "hf://org/llama@nope",
            "-o",
            s(&tmp.path().join("x")),
        ],
        &env,
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        text(&o.stderr),
        "error: hf://org/llama: revision `nope` not found (404): Invalid rev id: nope\n"
    );
    let o = modelconv_env(
        &["convert", "hf://org/absent", "-o", s(&tmp.path().join("x"))],
        &env,
    );
    assert_eq!(
        text(&o.stderr),
        "error: hf://org/absent: revision `main` not found (404): Repository Not Found\n"
    );
    let o = modelconv_env(
        &[
            "convert",
            &hub.file_url("nothing-here/"),
            "-o",
            s(&tmp.path().join("x")),
        ],
        &env,
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("no model.safetensors"),
        "{}",
        text(&o.stderr)
    );
    assert!(!tmp.path().join("x").exists());
}

#[test]
fn verify_and_inspect_read_a_remote_source() {
    let tmp = tempdir();
    let llama = fixture("tiny-llama-sharded-bf16");
    let hub = Hub::start(&[("org/llama", &llama)], None, &[]);
    let env = [("HF_ENDPOINT", hub.endpoint())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = tmp.path().join("o");
    local(&llama, &out);
    let o = modelconv_env(
        &["verify", s(&out), "--source", "hf://org/llama", "--json"],
        &env,
    );
    ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["compared_with_source"], true, "{v}");
    assert_eq!(v["problems"], serde_json::json!([]), "{v}");
    assert_eq!(v["tensors"], 39);
    let o = modelconv_env(&["inspect", "hf://org/llama", "--json"], &env);
    ok(&o);
    let remote: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let o = modelconv_env(&["inspect", s(&llama), "--json"], &[]);
    let local: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(remote["tensors"], local["tensors"]);
}

/// MiniLM (90 MB, 11 chunks) served under `/files/` from a copy the faults may change.
struct Served {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    hub: Hub,
    local_out: PathBuf,
}

fn served() -> Served {
    let tmp = tempdir();
    let root = tmp.path().join("files");
    std::fs::create_dir(&root).unwrap();
    copy_dir(&minilm(), &root.join("minilm"));
    let local_out = tmp.path().join("local");
    local(&root.join("minilm"), &local_out);
    let hub = Hub::start(&[], Some(&root), &[]);
    Served {
        _tmp: tmp,
        root,
        hub,
        local_out,
    }
}

impl Served {
    fn url(&self) -> String {
        self.hub.file_url("minilm/")
    }

    /// Converts with one thread: a single reader never has a range evicted before it
    /// is done with it, so a conversion's request count is the same every time and a
    /// fault's retries show in it.
    fn convert(&self, out: &str, env: &[(&str, &str)]) -> (Output, PathBuf) {
        let out = self.root.parent().unwrap().join(out);
        let o = modelconv_env(
            &[
                "convert",
                &self.url(),
                "-o",
                s(&out),
                "-q",
                "--threads",
                "1",
            ],
            env,
        );
        (o, out)
    }
}

#[test]
fn network_faults_are_retried_from_where_they_stopped() {
    let sv = served();
    let requests = || sv.hub.stats()["requests"]["files"].as_u64().unwrap_or(0);
    let before = requests();
    let (o, out) = sv.convert("clean", &[]);
    ok(&o);
    assert_same_output(&sv.local_out, &out);
    let clean = requests() - before;
    // (fault, environment): each conversion succeeds with the local bytes.
    let cases: &[(&str, &[(&str, &str)])] = &[
        (r#"{"reset_after": 3000000, "count": 3}"#, &[]),
        (r#"{"status": 503, "count": 4}"#, &[]),
        (r#"{"status": 500, "count": 2}"#, &[]),
        (r#"{"truncate_after": 1000000, "count": 3}"#, &[]),
        (
            r#"{"slow_first_byte": 3, "count": 1}"#,
            &[("MODELCONV_HTTP_TIMEOUT", "1")],
        ),
        (
            r#"{"stall_after": 2000000, "seconds": 3, "count": 1}"#,
            &[("MODELCONV_HTTP_TIMEOUT", "1")],
        ),
        (r#"{"reset_every": 4194304}"#, &[]),
    ];
    for (i, (fault, env)) in cases.iter().enumerate() {
        sv.hub.fault(r#"{"clear": true}"#);
        let before = requests();
        sv.hub.fault(fault);
        let (o, out) = sv.convert(&format!("f{i}"), env);
        ok(&o);
        assert_same_output(&sv.local_out, &out);
        // The fault cost requests beyond the clean run's: it was met and retried.
        let n = requests() - before;
        assert!(
            n > clean,
            "{fault}: {n} requests, {clean} without the fault"
        );
    }
    sv.hub.fault(r#"{"clear": true}"#);
    // A 429 asks for 1.5 s: the next request comes after at least that.
    sv.hub.fault(r#"{"retry_after": 1.5, "count": 1}"#);
    let (o, out) = sv.convert("ra", &[]);
    ok(&o);
    assert_same_output(&sv.local_out, &out);
    let waits = sv.hub.stats()["retry_after_waits"].clone();
    let w = waits[0][0].as_f64().unwrap();
    assert!(w >= 1.5, "waited {w} s after Retry-After: 1.5 ({waits})");
}

#[test]
fn a_network_that_keeps_failing_is_an_error_naming_the_url_and_nothing_is_committed() {
    let sv = served();
    sv.hub.fault(r#"{"status": 503, "count": 1000}"#);
    let (o, out) = sv.convert("bad", &[("MODELCONV_HTTP_RETRIES", "2")]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(err.starts_with(&format!("error: {}", sv.url())), "{err}");
    assert!(err.contains("503"), "{err}");
    assert!(!out.join("weights.parquet").exists());
    assert!(!out.join("metadata.json").exists());
}

#[test]
fn a_remote_file_replaced_while_it_is_read_is_source_changed() {
    let sv = served();
    // The file changes after its header was read, before its first chunk is: the
    // chunk comes with another ETag.
    sv.hub
        .fault(r#"{"replace_on_get": 2, "path": "minilm/model.safetensors"}"#);
    let (o, out) = sv.convert("changed", &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(
        err.starts_with(&format!(
            "error: {}model.safetensors: the file changed while being converted: its ETag changed from ",
            sv.url()
        )),
        "{err}"
    );
    assert!(!out.join("weights.parquet").exists());
    assert!(!out.join("metadata.json").exists());
}

#[test]
fn private_and_gated_repositories_need_the_token_which_is_never_shown() {
    let tmp = tempdir();
    let bert = fixture("tiny-bert");
    let token = "hf_privatetoken_abcdef";
    let hub = Hub::start(
        &[("me/private", &bert), ("them/gated", &bert)],
        None,
        &[
            "--token",
            token,
            "--private",
            "me/private",
            "--gated",
            "them/gated",
        ],
    );
    let ep = hub.endpoint();
    let x = tmp.path().join("x");
    let o = modelconv_env(
        &["convert", "hf://me/private", "-o", s(&x)],
        &[("HF_ENDPOINT", &ep)],
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        text(&o.stderr),
        "error: hf://me/private: access denied (401): the repository is private or gated, or does \
         not exist: Invalid username or password.; set HF_TOKEN or pass --token-file with a token \
         that can read it\n"
    );
    let o = modelconv_env(
        &["convert", "hf://them/gated", "-o", s(&x)],
        &[("HF_ENDPOINT", &ep), ("HF_TOKEN", "hf_wrong")],
    );
    let err = text(&o.stderr);
    assert!(
        err.starts_with("error: hf://them/gated: access denied (403): "),
        "{err}"
    );
    assert!(!err.contains("hf_wrong"), "{err}");
    assert!(!x.exists());
    // With the token: from the environment, and from --token-file.
    let lo = tmp.path().join("l");
    local(&bert, &lo);
    let ro = tmp.path().join("r1");
    let o = modelconv_env(
        &["convert", "hf://me/private", "-o", s(&ro)],
        &[("HF_ENDPOINT", &ep), ("HF_TOKEN", token)],
    );
    ok(&o);
    assert_same_output(&lo, &ro);
    let tf = tmp.path().join("token");
    std::fs::write(&tf, format!("{token}\n")).unwrap();
    let ro = tmp.path().join("r2");
    let o = modelconv_env(
        &[
            "convert",
            "hf://them/gated",
            "-o",
            s(&ro),
            "--token-file",
            s(&tf),
            "--json",
        ],
        &[("HF_ENDPOINT", &ep)],
    );
    ok(&o);
    assert_same_output(&lo, &ro);
    assert!(!text(&o.stdout).contains(token) && !text(&o.stderr).contains(token));
    assert_eq!(hub.stats()["storage_auth"], serde_json::json!([]));
}

/// Hostile headers (RELIABILITY rows 1–20, the ones a file can carry) over HTTP are
/// refused with the local file's message, the URL in place of the path.
#[test]
fn hostile_headers_over_http_are_refused_as_local_files_are() {
    let tmp = tempdir();
    let root = tmp.path().join("files");
    std::fs::create_dir(&root).unwrap();
    let header = |h: &str, data: usize| {
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(h.as_bytes());
        b.extend(std::iter::repeat_n(0u8, data));
        b
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("short", vec![1, 2, 3]),
        ("huge-len", u64::MAX.to_le_bytes().to_vec()),
        ("past-end", {
            let mut b = 1000u64.to_le_bytes().to_vec();
            b.extend_from_slice(b"{}");
            b
        }),
        ("not-json", header("{not json", 0)),
        (
            "bad-dtype",
            header(
                r#"{"a":{"dtype":"Q9","shape":[1],"data_offsets":[0,4]}}"#,
                4,
            ),
        ),
        (
            "size-mismatch",
            header(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
                4,
            ),
        ),
        (
            "overlap",
            header(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                12,
            ),
        ),
        (
            "offset-past-end",
            header(
                r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
                4,
            ),
        ),
        (
            "duplicate",
            header(
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                8,
            ),
        ),
        (
            "shape-overflow",
            header(
                r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,4]}}"#,
                4,
            ),
        ),
    ];
    for (name, bytes) in &cases {
        let d = root.join(name);
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("model.safetensors"), bytes).unwrap();
        std::fs::write(d.join("config.json"), br#"{"model_type": "bert"}"#).unwrap();
    }
    let hub = Hub::start(&[], Some(&root), &[]);
    for (name, _) in &cases {
        let file = root.join(name).join("model.safetensors");
        let url = hub.file_url(&format!("{name}/model.safetensors"));
        let x = tmp.path().join(format!("x-{name}"));
        let lo = modelconv_env(&["convert", s(&file), "-o", s(&x)], &[]);
        let ro = modelconv_env(&["convert", &url, "-o", s(&x)], &[]);
        assert_eq!(lo.status.code(), Some(1), "{name}");
        assert_eq!(ro.status.code(), Some(1), "{name}");
        let want = text(&lo.stderr).replace(s(&file), &url);
        assert_eq!(text(&ro.stderr), want, "{name}");
        assert!(!x.exists(), "{name}");
    }
}

#[test]
fn ctrl_c_cancels_a_remote_conversion_and_leaves_nothing() {
    let sv = served();
    let scratch = sv.root.parent().unwrap().join("tmp");
    std::fs::create_dir(&scratch).unwrap();
    // Every body stalls for 20 s after 1 MB: the conversion is waiting on the network.
    sv.hub
        .fault(r#"{"stall_after": 1000000, "seconds": 20, "count": 1000}"#);
    let out = sv.root.parent().unwrap().join("cancelled");
    let child = bin()
        .args(["convert", &sv.url(), "-o", s(&out)])
        .env("TMPDIR", &scratch)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let chunk_asked = || {
        sv.hub.stats()["ranges"]
            .as_array()
            .unwrap()
            .iter()
            // A weights range (the header reads are 64 KiB and the header's length).
            .any(|r| r[1].as_u64().is_some_and(|n| n >= 1 << 20))
    };
    wait_until(
        60,
        20,
        "the conversion never got to the weights",
        chunk_asked,
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    let sent = std::time::Instant::now();
    signal(&child, libc::SIGINT);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", text(&o.stderr));
    assert!(
        sent.elapsed().as_secs() < 10,
        "cancelling waited for the stalled requests"
    );
    assert_eq!(text(&o.stderr), "error: cancelled\n");
    assert!(!out.join("weights.parquet").exists());
    assert!(
        no_temp_dirs_in(&scratch).is_empty(),
        "{:?}",
        no_temp_dirs_in(&scratch)
    );
}

#[test]
fn s3_inputs_convert_as_local_ones_do() {
    let tmp = tempdir();
    let s3 = common::hub::S3::start();
    let (llama, bert) = (fixture("tiny-llama-sharded-bf16"), fixture("tiny-bert"));
    s3.put("models", &[("llama/", &llama), ("deep/er/bert/", &bert)]);
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (ll, bl) = (tmp.path().join("ll"), tmp.path().join("bl"));
    local(&llama, &ll);
    local(&bert, &bl);
    let forms: [(&str, &Path); 5] = [
        ("s3://models/llama/", &ll),
        ("s3://models/llama", &ll),
        ("s3://models/llama/model.safetensors.index.json", &ll),
        ("s3://models/deep/er/bert/", &bl),
        ("s3://models/deep/er/bert/model.safetensors", &bl),
    ];
    for (i, (url, lo)) in forms.iter().enumerate() {
        let ro = tmp.path().join(format!("r{i}"));
        let o = modelconv_env(&["convert", url, "-o", s(&ro), "-q"], &env);
        ok(&o);
        assert_same_output(lo, &ro);
    }
    let o = modelconv_env(&["verify", s(&ll), "--source", "s3://models/llama/"], &env);
    ok(&o);
    // Nothing there: the directory has no weights; no such bucket.
    let x = tmp.path().join("x");
    let o = modelconv_env(&["convert", "s3://models/nothing/", "-o", s(&x)], &env);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        text(&o.stderr),
        "error: s3://models/nothing/: no weights: no model.safetensors, \
         model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json\n"
    );
    let o = modelconv_env(&["convert", "s3://absent-bucket/m/", "-o", s(&x)], &env);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(err.starts_with("error: s3://absent-bucket/m/: "), "{err}");
    assert!(err.contains("NoSuchBucket"), "{err}");
    assert!(!x.exists());
}

/// The part files of a parted output's `weights.parquet/`, by name, with their bytes.
fn part_files(out: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    tree(&out.join("weights.parquet"))
        .into_iter()
        .filter(|(p, _)| p.to_string_lossy().starts_with("part-"))
        .collect()
}

/// The JSON report's part statuses.
fn statuses(o: &Output) -> Vec<String> {
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    report["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["status"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn outputs_in_s3_hold_the_bytes_a_local_conversion_writes() {
    let tmp = tempdir();
    let s3 = common::hub::S3::start();
    let llama = fixture("tiny-llama-sharded-bf16");
    let st = fixture("tiny-sentence-transformer");
    s3.put("models", &[("llama/", &llama)]);
    s3.put("out", &[]);
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let got = |prefix: &str| {
        let d = tmp.path().join(format!("got-{}", prefix.replace('/', "-")));
        s3.download("out", prefix, &d);
        d
    };
    // One file, from a local input and from an S3 one (no disk for either side); a
    // sentence-transformers model with its module configs and tokenizer.
    let (ll, sl) = (tmp.path().join("ll"), tmp.path().join("sl"));
    local(&llama, &ll);
    local(&st, &sl);
    for (input, prefix, lo) in [
        (s(&llama), "llama/", &ll),
        ("s3://models/llama/", "llama-from-s3/", &ll),
        (s(&st), "deep/st/", &sl),
    ] {
        let o = modelconv_env(
            &["convert", input, "-o", &format!("s3://out/{prefix}"), "-q"],
            &env,
        );
        ok(&o);
        let d = got(prefix);
        assert_same_output(lo, &d);
        let meta = metadata(&d);
        assert_eq!(
            meta["parquet_path"],
            format!("s3://out/{prefix}weights.parquet")
        );
    }
    assert!(s3.uploads("out").is_empty());

    // Parts: every part the local conversion's bytes, the manifest's parts the same.
    let mini = minilm();
    let parted = ["--max-file-size", "10MB"];
    let ml = tmp.path().join("ml");
    ok(&modelconv_env(
        &[&["convert", s(&mini), "-o", s(&ml), "-q"][..], &parted].concat(),
        &[],
    ));
    let o = modelconv_env(
        &[
            &["convert", s(&mini), "-o", "s3://out/minilm", "--json"][..],
            &parted,
        ]
        .concat(),
        &env,
    );
    ok(&o);
    assert!(statuses(&o).iter().all(|s| s == "written"));
    let d = got("minilm/");
    let local_parts = part_files(&ml);
    assert!(local_parts.len() >= 5, "{}", local_parts.len());
    assert!(part_files(&d) == local_parts, "parts differ");
    let manifest = |dir: &Path| -> serde_json::Value {
        read_json(&dir.join("weights.parquet/_manifest.json"))
    };
    assert_eq!(manifest(&ml)["parts"], manifest(&d)["parts"]);
    assert_eq!(manifest(&ml)["identity"], manifest(&d)["identity"]);
    assert_eq!(metadata_but_names(&ml), metadata_but_names(&d));
    assert!(!d.join("weights.parquet/_journal.json").exists());
    // Our reader and pyarrow read the downloaded copy as the local conversion.
    let o = modelconv_env(&["verify", s(&d), "--source", s(&mini)], &[]);
    ok(&o);

    // An existing conversion is refused; --force replaces a parted output by one file
    // and leaves none of the parts.
    let o = modelconv_env(&["convert", s(&mini), "-o", "s3://out/minilm/"], &env);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        text(&o.stderr),
        "error: s3://out/minilm/metadata.json: output already holds a conversion; \
         pass --force to replace it\n"
    );
    let o = modelconv_env(
        &[
            "convert",
            s(&mini),
            "-o",
            "s3://out/minilm/",
            "-q",
            "--force",
        ],
        &env,
    );
    ok(&o);
    let keys = s3.keys("out", "minilm/");
    assert!(
        keys.contains(&"minilm/weights.parquet".to_string()),
        "{keys:?}"
    );
    assert!(
        keys.contains(&"minilm/metadata.json".to_string()),
        "{keys:?}"
    );
    assert!(
        !keys
            .iter()
            .any(|k| k.starts_with("minilm/weights.parquet/")),
        "{keys:?}"
    );
    // --validate reads a local output back: refused before anything is written.
    let o = modelconv_env(
        &["convert", s(&llama), "-o", "s3://out/v/", "--validate"],
        &env,
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(s3.keys("out", "v/").is_empty());
    // No such bucket: an error naming the URL.
    let o = modelconv_env(&["convert", s(&llama), "-o", "s3://nobucket/m/"], &env);
    assert_eq!(o.status.code(), Some(1));
    let e = text(&o.stderr);
    assert!(e.starts_with("error: s3://nobucket/m/"), "{e}");
    assert!(e.contains("NoSuchBucket"), "{e}");
}

#[test]
fn a_failed_or_cancelled_upload_is_aborted_and_nothing_is_committed() {
    let tmp = tempdir();
    let s3 = common::hub::S3::start();
    s3.put("out", &[]);
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // 24 MB of f16 (three upload parts) before a tensor that overflows f16.
    let model = tmp.path().join("overflow");
    std::fs::create_dir(&model).unwrap();
    let big = 1.0e6f32.to_le_bytes();
    write_safetensors(
        &model.join("model.safetensors"),
        &[
            (
                "a.weight",
                "F32",
                vec![3072, 4096],
                weights_f32(3072 * 4096),
            ),
            ("z.weight", "F32", vec![2], [big, big].concat()),
        ],
    );
    // An earlier complete conversion there, replaced with --force.
    let o = modelconv_env(
        &[
            "convert",
            s(&fixture("tiny-bert")),
            "-o",
            "s3://out/m/",
            "-q",
        ],
        &env,
    );
    ok(&o);
    let o = modelconv_env(
        &[
            "convert",
            s(&model),
            "-o",
            "s3://out/m/",
            "--force",
            "--threads",
            "1",
            "--model-type",
            "transformers",
        ],
        &env,
    );
    assert_eq!(o.status.code(), Some(1));
    let e = text(&o.stderr);
    assert!(
        e.contains("tensor `z.weight`: 2 finite values would overflow to infinity"),
        "{e}"
    );
    // No upload left open, no metadata.json: nothing there looks complete.
    assert!(s3.uploads("out").is_empty(), "{:?}", s3.uploads("out"));
    assert!(!s3
        .keys("out", "m/")
        .contains(&"m/metadata.json".to_string()));

    // Ctrl-C while a part is being uploaded: exit 130, the upload aborted, nothing new.
    let child = slow_upload_started(&s3, "c/", &env);
    signal(&child, libc::SIGINT);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", text(&o.stderr));
    assert_eq!(text(&o.stderr), "error: cancelled\n");
    assert!(s3.uploads("out").is_empty(), "{:?}", s3.uploads("out"));
    assert!(
        s3.keys("out", "c/").is_empty(),
        "{:?}",
        s3.keys("out", "c/")
    );
}

#[test]
fn an_s3_parted_conversion_killed_after_a_part_resumes_into_the_same_bytes() {
    let tmp = tempdir();
    let s3 = common::hub::S3::start();
    s3.put("out", &[]);
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mini = minilm();
    let slow = SLOW_PARTED;
    let whole = tmp.path().join("whole");
    ok(&modelconv_env(
        &[&["convert", s(&mini), "-o", s(&whole), "-q"][..], &slow].concat(),
        &[],
    ));
    let mut child = bin()
        .args([
            "convert",
            s(&mini),
            "-o",
            "s3://out/r/",
            "-q",
            "--threads",
            "1",
        ])
        .args(slow)
        .envs(env.iter().copied())
        .spawn()
        .unwrap();
    wait_until(120, 5, "no first part", || {
        s3.keys("out", "r/weights.parquet/")
            .contains(&"r/weights.parquet/_journal.json".to_string())
            || ended_too_soon(&mut child)
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let keys = s3.keys("out", "r/");
    assert!(
        !keys
            .iter()
            .any(|k| k.ends_with("metadata.json") || k.ends_with("_manifest.json")),
        "{keys:?}"
    );
    let left = keys.iter().filter(|k| k.contains("/part-")).count();
    assert!((1..7).contains(&left), "{keys:?}");
    let resume = || {
        let args = [
            "convert",
            s(&mini),
            "-o",
            "s3://out/r/",
            "--resume",
            "--json",
        ];
        modelconv_env(&[&args[..], &slow].concat(), &env)
    };
    // Without --resume it is refused as an existing conversion.
    let o = modelconv_env(
        &[&["convert", s(&mini), "-o", "s3://out/r/"][..], &slow].concat(),
        &env,
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("output already holds a conversion"),
        "{}",
        text(&o.stderr)
    );
    // Other options are refused, saying what differs.
    let o = modelconv_env(
        &[
            &[
                "convert",
                s(&mini),
                "-o",
                "s3://out/r/",
                "--resume",
                "--dtype",
                "bf16",
            ][..],
            &slow,
        ]
        .concat(),
        &env,
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        text(&o.stderr),
        "error: s3://out/r/weights.parquet/part-00001-of-00007.parquet: cannot resume: it was \
         converted with other options: dtype \"f16\" (now \"bf16\"), use_float16 true (now false); \
         convert into another output, or pass --force to start over\n"
    );
    let o = resume();
    ok(&o);
    // The parts the journal recorded are kept; one completed as the run was killed
    // (not yet in the journal) is redone; the rest are written.
    let st = statuses(&o);
    assert_eq!(st.len(), 7);
    let kept = st.iter().filter(|s| *s == "kept").count();
    assert!(kept >= 1 && kept <= left, "{st:?} {left}");
    assert!(st[..kept].iter().all(|s| s == "kept"), "{st:?}");
    assert!(
        st[kept..]
            .iter()
            .all(|s| s == "written" || s.starts_with("redone")),
        "{st:?}"
    );
    let d = tmp.path().join("got");
    s3.download("out", "r/", &d);
    assert!(part_files(&d) == part_files(&whole), "parts differ");
    assert!(!d.join("weights.parquet/_journal.json").exists());

    // A resume of the complete conversion keeps every part (read back and hashed: the
    // manifest records no ETag); a part replaced since is redone.
    let (_, second) = s3.get("/out/r/weights.parquet/part-00002-of-00007.parquet");
    s3.put_object(
        "/out/r/weights.parquet/part-00003-of-00007.parquet",
        &second,
    );
    let o = resume();
    ok(&o);
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let parts = report["parts"].as_array().unwrap();
    for (k, p) in parts.iter().enumerate() {
        if k == 2 {
            assert_eq!(p["status"], "redone", "{p}");
            let m: serde_json::Value = serde_json::from_slice(
                &std::fs::read(whole.join("weights.parquet/_manifest.json")).unwrap(),
            )
            .unwrap();
            let rows = |k: usize| m["parts"][k]["rows"].as_u64().unwrap();
            assert_eq!(
                p["reason"],
                format!(
                    "it holds part 2 of 7 ({} rows), not part 3 of 7 ({} rows)",
                    rows(1),
                    rows(2)
                ),
                "{p}"
            );
        } else {
            assert_eq!(p["status"], "kept", "{p}");
        }
    }
    let d = tmp.path().join("again");
    s3.download("out", "r/", &d);
    assert!(part_files(&d) == part_files(&whole), "parts differ");
}

#[test]
fn pytorch_checkpoints_are_read_by_ranges_as_local_ones_are() {
    let tmp = tempdir();
    let names = [
        "tiny-bert-bin",
        "tiny-llama-sharded-bin",
        "tricky-storage-bin",
        "tiny-bert-bin-legacy",
    ];
    let repos: Vec<(String, PathBuf)> = names
        .iter()
        .map(|n| (format!("fixtures/{n}"), fixture(n)))
        .collect();
    let refs: Vec<(&str, &Path)> = repos
        .iter()
        .map(|(n, p)| (n.as_str(), p.as_path()))
        .collect();
    let hub = Hub::start(&refs, Some(&fixture("")), &[]);
    let ep = hub.endpoint();
    let env = [("HF_ENDPOINT", ep.as_str())];
    // Zip checkpoints, single and sharded, with shared and strided storages: the local
    // bytes, from the Hub and from a plain URL (by file name: tricky-storage-bin also
    // holds a safetensors reference, which a directory would be read from).
    let weights = [
        ("tiny-bert-bin", "pytorch_model.bin"),
        ("tiny-llama-sharded-bin", "pytorch_model.bin.index.json"),
        ("tricky-storage-bin", "pytorch_model.bin"),
    ];
    for (n, w) in weights {
        let lo = tmp.path().join(format!("{n}-l"));
        local(&fixture(n).join(w), &lo);
        let urls = [
            format!("hf://fixtures/{n}/{w}"),
            hub.file_url(&format!("{n}/{w}")),
        ];
        for (i, url) in urls.iter().enumerate() {
            let ro = tmp.path().join(format!("{n}-r{i}"));
            let o = modelconv_env(&["convert", url, "-o", s(&ro), "-q"], &env);
            ok(&o);
            assert_same_output(&lo, &ro);
        }
    }
    // A legacy checkpoint cannot be read by ranges: refused by name.
    let x = tmp.path().join("x");
    let o = modelconv_env(
        &["convert", "hf://fixtures/tiny-bert-bin-legacy", "-o", s(&x)],
        &env,
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        text(&o.stderr),
        format!(
            "error: hf://fixtures/tiny-bert-bin-legacy@{}/pytorch_model.bin: invalid PyTorch \
             checkpoint: a legacy (torch < 1.6) checkpoint: its storages follow a stream of \
             pickles that range reads cannot locate; download it, or re-save it with \
             torch.save\n",
            hub.commit("fixtures/tiny-bert-bin-legacy")
        )
    );
    let url = hub.file_url("hostile-bin/raw-pickle-eval.bin");
    let o = modelconv_env(&["convert", &url, "-o", s(&x), "--model-type", "bert"], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).starts_with(&format!(
            "error: {url}: invalid PyTorch checkpoint: a legacy (torch < 1.6) checkpoint"
        )),
        "{}",
        text(&o.stderr)
    );
    // Hostile and damaged archives are refused with the local file's message (a raw
    // pickle is refused as the legacy format above, before anything in it is read).
    for f in ["reduce-system.bin", "storage-too-short.bin"] {
        let file = fixture("hostile-bin").join(f);
        let url = hub.file_url(&format!("hostile-bin/{f}"));
        let args = |input: &str| {
            modelconv_env(
                &["convert", input, "-o", s(&x), "--model-type", "bert"],
                &[],
            )
        };
        let (lo, ro) = (args(s(&file)), args(&url));
        assert_eq!(lo.status.code(), Some(1), "{f}");
        assert_eq!(ro.status.code(), Some(1), "{f}");
        assert_eq!(
            text(&ro.stderr),
            text(&lo.stderr).replace(s(&file), &url),
            "{f}"
        );
        assert!(!x.exists(), "{f}");
    }
}

/// A slow conversion of MiniLM (see `SLOW_CONVERT`) into `s3://out/PREFIX`, once the
/// first part of its weight file's upload is stored.
fn slow_upload_started(
    s3: &common::hub::S3,
    prefix: &str,
    env: &[(&str, &str)],
) -> std::process::Child {
    let child = bin()
        .args([
            "convert",
            s(&minilm()),
            "-o",
            &format!("s3://out/{prefix}"),
            "-q",
        ])
        .args(SLOW_CONVERT)
        .envs(env.iter().copied())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(120, 20, "no upload part stored", || {
        s3.upload_parts("out", &format!("{prefix}weights.parquet")) > 0
    });
    child
}

#[test]
fn an_upload_whose_store_goes_away_fails_naming_the_object() {
    let mut s3 = common::hub::S3::start();
    s3.put("out", &[]);
    let mut env = s3.env();
    env.push(("MODELCONV_HTTP_RETRIES", "1".into()));
    env.push(("MODELCONV_HTTP_BACKOFF", "0.05".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let child = slow_upload_started(&s3, "gone/", &env);
    // The store is gone with an upload open: the next part fails after its retry.
    s3.kill();
    let gone = std::time::Instant::now();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let e = text(&o.stderr);
    assert!(
        e.starts_with("error: s3://out/gone/weights.parquet: "),
        "{e}"
    );
    assert!(
        e.contains("upload of s3://out/gone/weights.parquet failed"),
        "{e}"
    );
    assert!(
        gone.elapsed().as_secs() < 60,
        "the failed upload took {:?} to end",
        gone.elapsed()
    );
}

#[test]
fn a_hub_file_whose_storage_etag_changes_is_source_changed() {
    // The Hub's listing gives no ETag for the storage it redirects to: the first
    // response's (the header read) is the one every later range must carry.
    let tmp = tempdir();
    let hub = Hub::start(&[("org/minilm", &minilm())], None, &[]);
    hub.fault(r#"{"storage_etag": "changed", "after": 1}"#);
    let out = tmp.path().join("o");
    let o = modelconv_env(
        &["convert", "hf://org/minilm", "-o", s(&out)],
        &[("HF_ENDPOINT", &hub.endpoint())],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let e = text(&o.stderr);
    let want = format!(
        "error: hf://org/minilm@{}/model.safetensors: the file changed while being converted: its ETag changed from \"",
        hub.commit("org/minilm")
    );
    assert!(e.starts_with(&want), "{e}");
    assert!(e.ends_with("to \"changed\" while it was read\n"), "{e}");
    assert!(!out.exists());
}

#[test]
fn a_hub_file_is_resolved_once_for_all_its_ranges_and_again_when_its_location_expires() {
    // The Hub rate-limits `resolve`: every range of a file after the first goes straight
    // to the storage location the first was redirected to, without the token. When that
    // location expires (403, as signed storage URLs do), the file is resolved again and
    // the conversion goes on to the same bytes.
    let tmp = tempdir();
    let mini = minilm();
    let files = tree(&mini).len() as u64;
    let hub = Hub::start(&[("org/minilm", &mini)], None, &[]);
    let env = [
        ("HF_ENDPOINT", hub.endpoint()),
        ("HF_TOKEN", "hf_SECRETtoken1234567890".to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let lo = tmp.path().join("local");
    local(&mini, &lo);
    let count = |k: &str| hub.stats()["requests"][k].as_u64().unwrap_or(0);
    let (resolve0, storage0) = (count("resolve"), count("storage"));
    let clean = tmp.path().join("clean");
    ok(&modelconv_env(
        &["convert", "hf://org/minilm", "-o", s(&clean)],
        &env,
    ));
    assert_same_output(&lo, &clean);
    let (resolve1, storage1) = (count("resolve"), count("storage"));
    // 90 MB in ranges of at most 4 MiB: at least 22 storage requests, and no file
    // resolved twice.
    assert!(
        storage1 - storage0 >= 22,
        "{} storage requests",
        storage1 - storage0
    );
    assert!(
        resolve1 - resolve0 <= files,
        "{} resolve requests for {files} files",
        resolve1 - resolve0
    );
    // The locations given so far expire after 5 more storage requests.
    hub.fault(r#"{"expire_after": 5}"#);
    let again = tmp.path().join("again");
    ok(&modelconv_env(
        &["convert", "hf://org/minilm", "-o", s(&again)],
        &env,
    ));
    assert_same_output(&lo, &again);
    assert!(count("expired") >= 1, "{}", hub.stats());
    assert!(
        count("resolve") - resolve1 > resolve1 - resolve0,
        "the expired location was not resolved again: {}",
        hub.stats()
    );
    assert_eq!(hub.stats()["storage_auth"], serde_json::json!([]));
}
