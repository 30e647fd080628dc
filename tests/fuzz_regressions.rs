//! Replays every input kept under `fuzz/regressions/<target>/` (seed inputs and what the
//! fuzzers found: crashes, timeouts, slow units) through the very properties the fuzz
//! targets assert (`fuzz/fuzz_targets/props.rs`), on every test run, with or without
//! cargo-fuzz.

#[path = "../fuzz/fuzz_targets/props.rs"]
mod props;

/// The repository (props.rs brings the shared rounding reference; tests/common would
/// bring it a second time).
fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `target`'s property over each kept input; a failure names the input.
fn replay(target: &str) -> usize {
    let (_, property) = props::TARGETS
        .iter()
        .find(|(t, _)| *t == target)
        .expect("a fuzz target");
    let inputs = props::regressions(&root(), target);
    for path in &inputs {
        let data = std::fs::read(path).unwrap();
        if std::panic::catch_unwind(|| property(&data)).is_err() {
            panic!("{target}: {} fails the target's property", path.display());
        }
    }
    inputs.len()
}

#[test]
fn every_fuzz_target_has_its_property_here_and_a_directory_of_kept_inputs() {
    let targets: Vec<String> = std::fs::read_dir(root().join("fuzz/fuzz_targets"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "props.rs")
        .map(|n| n.trim_end_matches(".rs").to_string())
        .collect();
    assert_eq!(targets.len(), props::TARGETS.len(), "{targets:?}");
    for t in &targets {
        assert!(
            props::TARGETS.iter().any(|(n, _)| n == t),
            "fuzz target `{t}` has no property in props.rs"
        );
        assert!(
            !props::regressions(&root(), t).is_empty(),
            "fuzz/regressions/{t}/ has no inputs"
        );
    }
}

#[test]
fn header_regressions() {
    replay("header");
}

#[test]
fn cast_regressions() {
    replay("cast");
}

#[test]
fn weights_regressions() {
    replay("weights");
}

#[test]
fn pickle_regressions() {
    replay("pickle");
}

#[test]
fn zip_regressions() {
    replay("zip");
}

#[test]
fn index_regressions() {
    replay("index");
}

#[test]
fn roundtrip_regressions() {
    replay("roundtrip");
}

#[test]
fn scheme_regressions() {
    replay("scheme");
}
