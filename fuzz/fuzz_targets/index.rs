//! Any bytes as the shard index of real shards: see [`props::index`].
#![no_main]

mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| props::index(data));
