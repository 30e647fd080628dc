//! Any bytes as a pickle, then as a whole PyTorch checkpoint (zip or legacy): never a
//! panic, memory bounded by the input, and every tensor accepted reads only bytes that
//! are in the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelconv::internals::{pickle_load, torch_tensors};

fuzz_target!(|data: &[u8]| {
    if let Ok(n) = pickle_load(data) {
        // Every opcode makes at most one value.
        assert!(n <= data.len(), "{n} values from {} bytes", data.len());
    }
    if let Ok(tensors) = torch_tensors(data) {
        for (name, _numel, offset, len) in tensors {
            let end = offset.checked_add(len).expect("tensor range overflows");
            assert!(end <= data.len() as u64, "tensor `{name}` reads past the file");
        }
    }
});
