//! Processes the tests run: the real binary (with the checks every refusal shares), the
//! test venv's Python, and the waiting and signalling around a child that is stopped
//! while it works.

use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// The real binary, not started yet.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_modelconv"))
}

/// Runs the real binary with `args` to its end.
pub fn modelconv(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

/// Runs the real binary under `sh` with a file-size limit of `blocks` 512-byte blocks
/// (`RLIMIT_FSIZE`: it binds root too) and SIGXFSZ ignored, so a write past the limit
/// fails with EFBIG instead of killing the process.
pub fn modelconv_with_file_limit(blocks: u64, args: &[&str]) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "trap '' XFSZ; ulimit -f {blocks} && exec \"$0\" \"$@\""
        ))
        .arg(env!("CARGO_BIN_EXE_modelconv"))
        .args(args)
        .output()
        .unwrap()
}

/// Output bytes as text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A path as an argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Requires `o` to have succeeded, showing its output if not.
pub fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "{}\n{}",
        text(&o.stdout),
        text(&o.stderr)
    );
}

/// `convert INPUT -o OUT` with `extra`, through the binary.
pub fn convert_cli(input: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["convert", s(input), "-o", s(out)];
    args.extend_from_slice(extra);
    modelconv(&args)
}

/// Converts `input` with `args` into `out`, quietly; it must succeed.
pub fn converts(input: &Path, out: &Path, args: &[&str]) -> Output {
    let o = convert_cli(input, out, &[&["-q"], args].concat());
    assert!(o.status.success(), "{}", text(&o.stderr));
    o
}

/// Asserts `o` failed with exit 1 and exactly `error: {want}` (one line), no panic.
pub fn failed_with(o: &Output, want: &str) {
    let err = text(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err, format!("error: {want}\n"));
}

/// Converts `input` into a fresh directory with `args`; expects exit 1 with exactly
/// `error: {want}` and no output directory at all.
pub fn refused(tmp: &Path, input: &Path, args: &[&str], want: &str) {
    let out = tmp.join("refused-out");
    failed_with(&convert_cli(input, &out, args), want);
    assert!(!out.exists(), "{}: output left behind", input.display());
}

/// Converts `file` and expects it refused with `error: {file}: {want}`, nothing written.
pub fn refused_file(tmp: &Path, file: &Path, want: &str) {
    refused(tmp, file, &[], &format!("{}: {want}", file.display()));
}

/// Writes `bytes` as `name` in `tmp` and expects it refused with `error: {path}: {want}`.
pub fn refused_bytes(tmp: &Path, name: &str, bytes: &[u8], want: &str) {
    let file = tmp.join(name);
    std::fs::write(&file, bytes).unwrap();
    refused_file(tmp, &file, want);
}

/// Runs the test venv's Python with `args`; it must succeed. Its standard output.
pub fn python_ok(args: &[&str]) -> String {
    let o = Command::new(super::python()).args(args).output().unwrap();
    let stdout = text(&o.stdout);
    assert!(
        o.status.success(),
        "python {args:?} failed:\n{stdout}\n{}",
        text(&o.stderr)
    );
    stdout
}

/// Runs `tests/python/{script}` with `args`; it must succeed. Its standard output.
pub fn python_script(script: &str, args: &[&str]) -> String {
    let path = super::root().join("tests/python").join(script);
    python_ok(&[&[s(&path)], args].concat())
}

/// Polls `ready` every `step_ms` until it holds; fails saying `what` after `secs`.
pub fn wait_until(secs: u64, step_ms: u64, what: &str, mut ready: impl FnMut() -> bool) {
    let started = Instant::now();
    while !ready() {
        assert!(started.elapsed() < Duration::from_secs(secs), "{what}");
        std::thread::sleep(Duration::from_millis(step_ms));
    }
}

/// False while `child` runs; fails once it has ended, for a wait on a child that is to
/// be stopped before its end.
pub fn ended_too_soon(child: &mut Child) -> bool {
    if child.try_wait().unwrap().is_some() {
        panic!("the conversion ended before it could be killed");
    }
    false
}

/// Sends `sig` to `child`.
pub fn signal(child: &Child, sig: i32) {
    // SAFETY: a signal to our own child process.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}
