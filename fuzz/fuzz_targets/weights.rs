//! Any bytes as weights.parquet: opening, listing, reading and verifying never panic;
//! a tensor that reads back has exactly the bytes its shape needs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelconv::WeightFile;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("weights.parquet");
    std::fs::write(&path, data).expect("write");
    let Ok(wf) = WeightFile::open(&path) else { return };
    for t in wf.tensors().iter().take(64) {
        if let Ok(x) = wf.tensor(&t.name) {
            assert_eq!(x.data.len() as u64, t.bytes);
        }
    }
    let _ = modelconv::verify(&path, None, &Default::default());
});
