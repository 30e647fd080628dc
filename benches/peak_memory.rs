//! Backs the bounded-memory claim: converts two Llama-shaped f32 checkpoints whose largest
//! tensors match but whose total sizes differ 4×, and reports the peak heap each
//! conversion needed (a tracking global allocator), with the ratio. Run with
//! `cargo bench --bench peak_memory`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Tracking;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: forwarded to the system allocator with the caller's layout.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from this allocator with this layout.
        unsafe { System.dealloc(p, l) };
        CURRENT.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: as above.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            CURRENT.fetch_sub(l.size(), Ordering::Relaxed);
            let now = CURRENT.fetch_add(new, Ordering::Relaxed) + new;
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Tracking = Tracking;

/// A Llama-shaped checkpoint: embedding + `layers` blocks (hidden 1024, mlp 2816) + head.
fn llama(dir: &std::path::Path, layers: usize) -> u64 {
    std::fs::create_dir_all(dir).unwrap();
    let (h, m, v) = (1024u64, 2816u64, 32000u64);
    let mut shapes: Vec<(String, Vec<u64>)> =
        vec![("model.embed_tokens.weight".into(), vec![v, h])];
    for l in 0..layers {
        for (n, s) in [
            ("self_attn.q_proj.weight", vec![h, h]),
            ("self_attn.k_proj.weight", vec![h, h]),
            ("self_attn.v_proj.weight", vec![h, h]),
            ("self_attn.o_proj.weight", vec![h, h]),
            ("mlp.gate_proj.weight", vec![m, h]),
            ("mlp.up_proj.weight", vec![m, h]),
            ("mlp.down_proj.weight", vec![h, m]),
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
        ] {
            shapes.push((format!("model.layers.{l}.{n}"), s));
        }
    }
    shapes.push(("model.norm.weight".into(), vec![h]));
    shapes.push(("lm_head.weight".into(), vec![v, h]));
    let mut rng = common::Normal::new(7);
    let tensors: Vec<(String, Vec<u64>, Vec<u8>)> = shapes
        .into_iter()
        .map(|(n, s)| {
            let mut d = vec![0u8; (s.iter().product::<u64>() * 4) as usize];
            rng.fill_f32(&mut d);
            (n, s, d)
        })
        .collect();
    let refs: Vec<(&str, &str, Vec<u64>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, d)| (n.as_str(), "F32", s.clone(), d.clone()))
        .collect();
    common::write_safetensors(&dir.join("model.safetensors"), &refs);
    drop(refs);
    drop(tensors);
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type":"llama","architectures":["LlamaForCausalLM"]}"#,
    )
    .unwrap();
    std::fs::metadata(dir.join("model.safetensors"))
        .unwrap()
        .len()
}

fn main() {
    let tmp = common::tempdir();
    let mut results = Vec::new();
    let mut results_read = Vec::new();
    for layers in [4usize, 16] {
        let dir = tmp.path().join(format!("llama-{layers}"));
        let size = llama(&dir, layers);
        let mut peaks = Vec::new();
        // mmap, then positioned reads (--io read), whose buffers are heap: both bounded.
        for io in [modelconv::IoMode::Mmap, modelconv::IoMode::Read] {
            let out = tmp.path().join(format!("out-{layers}-{io:?}"));
            let cfg = modelconv::ConvertConfig::builder()
                .threads(2)
                .io(io)
                .build()
                .unwrap();
            PEAK.store(CURRENT.load(Ordering::Relaxed), Ordering::Relaxed);
            let base = CURRENT.load(Ordering::Relaxed);
            modelconv::convert(&dir, &out, &cfg).unwrap();
            let peak = PEAK.load(Ordering::Relaxed) - base;
            println!(
                "llama-shaped, {layers:>2} layers, {:>6.0} MiB f32, {io:?}: peak heap during conversion {:>6.1} MiB",
                size as f64 / 1048576.0,
                peak as f64 / 1048576.0
            );
            std::fs::remove_dir_all(&out).unwrap();
            peaks.push(peak);
        }
        results.push((size, peaks[0]));
        results_read.push((size, peaks[1]));
        std::fs::remove_dir_all(&dir).unwrap();
    }
    let (r0, r1) = (results_read[0].1, results_read[1].1);
    println!(
        "--io read: peak heap ratio {:.2}× for a {:.2}× larger model",
        r1 as f64 / r0 as f64,
        results_read[1].0 as f64 / results_read[0].0 as f64
    );
    let (s0, p0) = results[0];
    let (s1, p1) = results[1];
    println!(
        "model size ratio {:.2}×, peak heap ratio {:.2}× (flat means bounded by the pipeline, not the model)",
        s1 as f64 / s0 as f64,
        p1 as f64 / p0 as f64
    );
}
