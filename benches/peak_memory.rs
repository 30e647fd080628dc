//! Backs the bounded-memory claim: converts two Llama-shaped f32 checkpoints whose largest
//! tensors match but whose total sizes differ 4×, and reports the peak heap each
//! conversion needed (a tracking global allocator), with the ratio; then the same two
//! layouts pre-quantized as FP8 (F8_E4M3 codes, F32 scales per 128×128 block, DeepSeek's
//! layout), whose weights are dequantized in the cast stage: their peak must stay flat
//! too. Run with `cargo bench --bench peak_memory`.

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

/// A Llama-shaped checkpoint: embedding + `layers` blocks (hidden 1024, mlp 2816) + head;
/// with `fp8`, every linear layer as F8_E4M3 codes with `weight_scale_inv` blocks.
fn llama(dir: &std::path::Path, layers: usize, fp8: bool) -> u64 {
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
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut tensors: Vec<(String, &str, Vec<u64>, Vec<u8>)> = Vec::new();
    for (n, s) in shapes {
        let linear = n.starts_with("model.layers.") && n.ends_with("proj.weight");
        let numel = s.iter().product::<u64>() as usize;
        if fp8 && linear {
            // Random E4M3 codes, NaN (0x7f, 0xff) excluded; scales near 1e-4.
            let codes: Vec<u8> = (0..numel)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let b = (x >> 56) as u8;
                    if b & 0x7f == 0x7f {
                        b - 1
                    } else {
                        b
                    }
                })
                .collect();
            let grid = vec![s[0].div_ceil(128), s[1].div_ceil(128)];
            let scales: Vec<u8> = (0..grid[0] * grid[1])
                .flat_map(|i| (1e-4f32 + i as f32 * 1e-7).to_le_bytes())
                .collect();
            let stem = n.trim_end_matches(".weight").to_string();
            tensors.push((n, "F8_E4M3", s, codes));
            tensors.push((format!("{stem}.weight_scale_inv"), "F32", grid, scales));
        } else {
            let mut d = vec![0u8; numel * 4];
            rng.fill_f32(&mut d);
            tensors.push((n, "F32", s, d));
        }
    }
    let refs: Vec<(&str, &str, Vec<u64>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.as_str(), *d, s.clone(), b.clone()))
        .collect();
    common::write_safetensors(&dir.join("model.safetensors"), &refs);
    drop(refs);
    drop(tensors);
    let quant = if fp8 {
        r#","quantization_config":{"quant_method":"fp8","fmt":"e4m3","weight_block_size":[128,128]}"#
    } else {
        ""
    };
    std::fs::write(
        dir.join("config.json"),
        format!(r#"{{"model_type":"llama","architectures":["LlamaForCausalLM"]{quant}}}"#),
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
        let size = llama(&dir, layers, false);
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
    // The same layouts as FP8, dequantized to f16 (the same output as the f32 runs).
    let mut fp8 = Vec::new();
    for layers in [4usize, 16] {
        let dir = tmp.path().join(format!("fp8-{layers}"));
        let size = llama(&dir, layers, true);
        let out = tmp.path().join(format!("out-fp8-{layers}"));
        let cfg = modelconv::ConvertConfig::builder()
            .threads(2)
            .build()
            .unwrap();
        PEAK.store(CURRENT.load(Ordering::Relaxed), Ordering::Relaxed);
        let base = CURRENT.load(Ordering::Relaxed);
        modelconv::convert(&dir, &out, &cfg).unwrap();
        let peak = PEAK.load(Ordering::Relaxed) - base;
        println!(
            "llama-shaped FP8 (128×128 blocks), {layers:>2} layers, {:>6.0} MiB: peak heap during conversion {:>6.1} MiB",
            size as f64 / 1048576.0,
            peak as f64 / 1048576.0
        );
        fp8.push((size, peak));
        std::fs::remove_dir_all(&out).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
    println!(
        "FP8: model size ratio {:.2}×, peak heap ratio {:.2}×; against the f32 layouts {:.2}× and {:.2}×",
        fp8[1].0 as f64 / fp8[0].0 as f64,
        fp8[1].1 as f64 / fp8[0].1 as f64,
        fp8[0].1 as f64 / p0 as f64,
        fp8[1].1 as f64 / p1 as f64
    );
}
