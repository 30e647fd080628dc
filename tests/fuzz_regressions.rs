//! Replays every input kept under `fuzz/regressions/<target>/` (seed inputs and what the
//! fuzzers found) through the same properties the fuzz targets assert, on every test
//! run, with or without cargo-fuzz.

mod common;

use common::root;
use modelconv::internals::{pickle_load, torch_tensors, zip_entries};

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = root().join("fuzz/regressions").join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (p.display().to_string(), std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no inputs in {}", dir.display());
    out
}

#[test]
fn pickle_regressions_hold_the_target_properties() {
    for (name, data) in inputs("pickle") {
        if let Ok(n) = pickle_load(&data) {
            assert!(
                n <= data.len(),
                "{name}: {n} values from {} bytes",
                data.len()
            );
        }
        if let Ok(tensors) = torch_tensors(&data) {
            for (t, _, offset, len) in tensors {
                assert!(
                    offset
                        .checked_add(len)
                        .is_some_and(|e| e <= data.len() as u64),
                    "{name}: tensor `{t}` reads past the file"
                );
            }
        }
    }
}

#[test]
fn zip_regressions_hold_the_target_properties() {
    for (name, data) in inputs("zip") {
        if let Ok(entries) = zip_entries(&data) {
            let mut names = std::collections::HashSet::new();
            for (e, start, len) in entries {
                assert!(
                    start
                        .checked_add(len)
                        .is_some_and(|x| x <= data.len() as u64),
                    "{name}"
                );
                assert!(
                    !e.starts_with('/') && !e.split('/').any(|c| c == ".."),
                    "{name}: {e}"
                );
                assert!(names.insert(e.clone()), "{name}: duplicate {e}");
            }
        }
    }
}
