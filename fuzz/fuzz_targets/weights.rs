//! Any bytes as weights.parquet: see [`props::weights`].
#![no_main]

mod props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // libfuzzer-sys's panic hook aborts on every panic, even one the reader catches and
    // reports as an internal error (which the property judges). With this hook such
    // panics unwind to the reader's catch as they do in production; a panic the
    // property raises still reaches libfuzzer-sys's catch_unwind, which aborts.
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| std::panic::set_hook(Box::new(|info| eprintln!("{info}"))));
    props::weights(data)
});
