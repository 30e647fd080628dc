//! The `modelconv` command: flags → validated options → one library call → printing.
//! The error is rendered once here, with the command-line hint for it, and picks the
//! exit code.

mod args;
mod print;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use clap::Parser;
use modelconv::{ConversionReport, Error, VerifyOptions};

use args::{Cli, Command, ConvertArgs, ExportArgs, InspectArgs, VerifyArgs};

/// Page-sized buffers are allocated and freed per Parquet page; mimalloc reuses them
/// where glibc maps fresh zeroed pages each time (measured: sys time 3.6 s → 1.2 s on a
/// 4.4 GB checkpoint).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h (v2 and v3): after `eager_commit_delay` (14).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// When mimalloc hands freed memory back to the OS during a conversion, in ms.
///
/// By default never: the writer's buffers are freed and allocated again all along (a
/// big row's two buffers, each row group's), and memory handed back comes again as
/// fresh pages the kernel zeroes. mimalloc's own default (after 1 s) did that for most
/// of it: on the 13.5 GB 7B checkpoint, 1,500–1,900 fresh 2 MiB pages per run instead
/// of 310, system time 6.9–9.9 s instead of 6.0 s and wall time 13.8–16.1 s instead of
/// 12.7–13.3 s, for a peak RSS of 685 MiB instead of 620 MiB. The peak stays what the
/// writer's budget allows; the process ends with the conversion.
///
/// In low-memory mode (`--max-row-mb` 64 or less) at once: peak RSS on that checkpoint
/// 396 MiB instead of 657 MiB, for more page faults (system time about doubles).
fn purge_delay(config: &modelconv::ConvertConfig) -> std::ffi::c_long {
    if config.low_memory() {
        0
    } else {
        -1
    }
}

/// How the process ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// Done, and everything checked passed.
    Success = 0,
    /// An error, or a check that failed.
    Failure = 1,
    /// The command line or an option value is wrong (clap uses 2 as well).
    Usage = 2,
    /// Stopped by Ctrl-C.
    Interrupted = 130,
}

impl From<Exit> for std::process::ExitCode {
    fn from(e: Exit) -> Self {
        std::process::ExitCode::from(e as u8)
    }
}

/// A failed command: the error, and the exit code it calls for.
struct Failed(anyhow::Error, Exit);

impl<E: Into<anyhow::Error>> From<E> for Failed {
    fn from(e: E) -> Self {
        let e = e.into();
        let code = match e.downcast_ref::<Error>() {
            Some(Error::Cancelled) => Exit::Interrupted,
            Some(Error::InvalidOption { .. }) => Exit::Usage,
            _ => Exit::Failure,
        };
        Failed(e, code)
    }
}

type Outcome = Result<Exit, Failed>;

/// What to tell a command-line user about an error, beyond the error itself.
fn hint(e: &Error) -> Option<&'static str> {
    match e {
        Error::OutputExists { .. } => Some("pass --force to replace it"),
        Error::ResumeRefused { .. } => {
            Some("convert into another output, or pass --force to start over")
        }
        Error::Overflow { .. } => {
            Some("choose --dtype keep, bf16 or f32, or pass --allow-overflow")
        }
        Error::HeaderTooLarge { .. } => Some("pass --max-header-mb to raise the cap"),
        _ => None,
    }
}

/// Ctrl-C: the first stops the work at the next unit and lets it clean up; a second
/// removes the temp files and exits at once.
fn install_ctrlc(cancel: Arc<AtomicBool>) {
    let hits = AtomicUsize::new(0);
    let _ = ctrlc::set_handler(move || {
        if hits.fetch_add(1, Ordering::SeqCst) == 0 {
            cancel.store(true, Ordering::SeqCst);
        } else {
            modelconv::remove_temp_files();
            std::process::exit(Exit::Interrupted as i32);
        }
    });
}

fn run_convert(a: ConvertArgs) -> Outcome {
    let cancel = Arc::new(AtomicBool::new(false));
    let config = a.config(cancel.clone())?;
    if a.dry_run {
        let plan = modelconv::plan_conversion(&a.input, &config)?;
        if a.out.json {
            print::json(&plan)?;
        } else {
            print::plan(&plan);
        }
        return Ok(Exit::Success);
    }
    let Some(output) = a.output.as_deref() else {
        return Err(anyhow::anyhow!("--output is required").into());
    };
    // SAFETY: mi_option_set only stores an option value; any value is valid for
    // purge_delay (0 = purge at once, -1 = never).
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, purge_delay(&config)) };
    install_ctrlc(cancel);
    let bar = print::Bar::new(a.out);
    let started = std::time::Instant::now();
    let result = modelconv::convert_with(&a.input, output, &config, &bar);
    bar.0.finish_and_clear();
    let r = match result {
        Ok(r) => r,
        Err(e) => {
            if a.out.json {
                let name = a.input.display().to_string();
                let secs = started.elapsed().as_secs_f64();
                print::json(&ConversionReport::failure(&name, output, &e, secs))?;
            }
            return Err(e.into());
        }
    };
    if a.out.json {
        print::json(&r)?;
    } else if !a.out.quiet {
        print::summary(&r);
    }
    if r.validation_passed == Some(false) {
        eprintln!("error: validation against the source failed (run `modelconv verify --source` for details)");
        return Ok(Exit::Failure);
    }
    Ok(Exit::Success)
}

fn run_inspect(a: InspectArgs) -> Outcome {
    if is_checkpoint(&a.path) {
        let source = modelconv::open_source(&a.path, &Default::default())?;
        let report = modelconv::inspect_source(&source);
        if a.json {
            print::json(&report)?;
        } else {
            print::source(&report);
        }
        return Ok(Exit::Success);
    }
    let report = modelconv::inspect(&a.path)?;
    if a.json {
        if a.row_groups {
            print::json(&report)?;
        } else {
            let mut v = serde_json::to_value(&report)?;
            v["row_groups"] = serde_json::Value::Null;
            print::json(&v)?;
        }
    } else {
        print::inspect(&report, a.row_groups);
    }
    Ok(Exit::Success)
}

/// True when `path` names a checkpoint rather than a weight file: a directory without
/// `weights.parquet`, or a `.safetensors`, `.bin`, `.pt`, `.pth` or `.json` index file.
fn is_checkpoint(path: &std::path::Path) -> bool {
    if modelconv::is_url(&path.to_string_lossy()) {
        return true;
    }
    if path.is_dir() {
        return !path.join("weights.parquet").exists();
    }
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e, "safetensors" | "bin" | "pt" | "pth" | "json"))
}

fn run_verify(a: VerifyArgs) -> Outcome {
    let source = match &a.source {
        Some(s) => Some(modelconv::open_source(s, &a.open.options())?),
        None => None,
    };
    let opts = VerifyOptions { threads: a.threads };
    let report = modelconv::verify(&a.path, source.as_ref(), &opts)?;
    if a.out.json {
        print::json(&report)?;
    } else if !a.out.quiet {
        print::verify(&report);
    }
    Ok(if report.passed() {
        Exit::Success
    } else {
        Exit::Failure
    })
}

fn run_export(a: ExportArgs) -> Outcome {
    // Export has one temp file and nothing else to finish: any Ctrl-C or SIGTERM
    // removes it and exits.
    let _ = ctrlc::set_handler(|| {
        modelconv::remove_temp_files();
        std::process::exit(Exit::Interrupted as i32);
    });
    let r = modelconv::export(&a.path, &a.output, &a.options())?;
    if a.out.json {
        print::json(&r)?;
    } else if !a.out.quiet {
        print::export(&r);
    }
    Ok(Exit::Success)
}

fn main() -> std::process::ExitCode {
    // Like other Unix filters: a closed pipe (`modelconv inspect x | head`) ends the
    // process quietly instead of failing every later print.
    // SAFETY: called first thing in main, before any thread exists; SIG_DFL is a valid
    // disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Convert(a) => run_convert(a),
        Command::Inspect(a) => run_inspect(a),
        Command::Verify(a) => run_verify(a),
        Command::Export(a) => run_export(a),
    };
    match outcome {
        Ok(code) => code.into(),
        Err(Failed(e, code)) => {
            match e.downcast_ref::<Error>().and_then(hint) {
                Some(h) => eprintln!("error: {e:#}; {h}"),
                None => eprintln!("error: {e:#}"),
            }
            code.into()
        }
    }
}
