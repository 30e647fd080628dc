//! Times the reader on a converted file (used by scripts/bench/read.sh).
//!
//! `read_bench all PATH`: every tensor as f32 (row groups in parallel), best of 5.
//! `read_bench one PATH NAME`: open the file and read one tensor, best of 5, with the
//! bytes the reader touched.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use modelconv::WeightFile;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("all") => {
            let path = args.get(2).ok_or("usage: read_bench all PATH")?;
            let mut best = f64::MAX;
            let elems = AtomicU64::new(0);
            for _ in 0..5 {
                elems.store(0, Ordering::Relaxed);
                let t = Instant::now();
                let wf = WeightFile::open(path)?;
                wf.for_each_f32(&|_, v| {
                    elems.fetch_add(v.len() as u64, Ordering::Relaxed);
                    std::hint::black_box(v);
                })?;
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!(
                "modelconv: every tensor as f32: {best:.4} s ({} elements)",
                elems.load(Ordering::Relaxed)
            );
        }
        Some("one") => {
            let (path, name) = (
                args.get(2).ok_or("usage: read_bench one PATH NAME")?,
                args.get(3).ok_or("NAME")?,
            );
            let mut best = f64::MAX;
            let mut touched = 0;
            for _ in 0..5 {
                let log = Arc::new(Mutex::new(Vec::new()));
                let t = Instant::now();
                let wf = WeightFile::open_with(path, Some(log.clone()))?;
                let x = wf.tensor(name)?;
                best = best.min(t.elapsed().as_secs_f64());
                std::hint::black_box(x);
                touched = log
                    .lock()
                    .map(|l| l.iter().map(|(s, e)| e - s).sum::<u64>())
                    .unwrap_or(0);
            }
            let size = std::fs::metadata(path)?.len();
            println!(
                "modelconv: open + read `{name}`: {:.2} ms, touched {:.1} MiB of a {:.2} GB file",
                best * 1e3,
                touched as f64 / 1048576.0,
                size as f64 / 1e9
            );
        }
        _ => return Err("usage: read_bench all PATH | one PATH NAME".into()),
    }
    Ok(())
}
