//! Any bytes as a zip archive: never a panic, every stored entry's data inside the
//! file, names plain relative paths and unique.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelconv::internals::zip_entries;

fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = zip_entries(data) {
        let mut names = std::collections::HashSet::new();
        for (name, start, len) in entries {
            assert!(start.checked_add(len).is_some_and(|e| e <= data.len() as u64));
            assert!(!name.starts_with('/') && !name.split('/').any(|c| c == ".."), "{name}");
            assert!(names.insert(name.clone()), "duplicate {name}");
        }
    }
});
