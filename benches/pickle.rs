//! The pickle interpreter on a large state dict's `data.pkl`, in pickle bytes per
//! second: 20,000 tensors written the way `torch.save` writes them (protocol 2, the
//! rebuild function and storage classes memoized after their first use, SETITEMS in
//! batches of 1000), so the cost per tensor entry is what is measured.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use modelconv::internals::pickle_load;
use std::hint::black_box;

const TENSORS: usize = 20_000;

fn unicode(p: &mut Vec<u8>, s: &str) {
    p.push(b'X');
    p.extend_from_slice(&(s.len() as u32).to_le_bytes());
    p.extend_from_slice(s.as_bytes());
}

fn int(p: &mut Vec<u8>, v: u32) {
    p.push(b'J');
    p.extend_from_slice(&(v as i32).to_le_bytes());
}

/// `torch.save(state_dict)`'s `data.pkl` for `TENSORS` 2-d f16 tensors.
fn data_pkl() -> Vec<u8> {
    let mut p = vec![0x80, 2, b'}', b'q', 0];
    let mut memo = 1u32;
    let put = |p: &mut Vec<u8>, memo: &mut u32| {
        p.push(b'r');
        p.extend_from_slice(&memo.to_le_bytes());
        *memo += 1;
    };
    let get = |p: &mut Vec<u8>, i: u32| {
        p.push(b'j');
        p.extend_from_slice(&i.to_le_bytes());
    };
    let (mut rebuild, mut storage, mut ordered) = (None, None, None);
    for t in 0..TENSORS {
        if t % 1000 == 0 {
            if t > 0 {
                p.push(b'u'); // SETITEMS
            }
            p.push(b'(');
        }
        unicode(
            &mut p,
            &format!("model.layers.{}.mlp.w{}.weight", t / 8, t % 8),
        );
        match rebuild {
            Some(i) => get(&mut p, i),
            None => {
                p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n");
                rebuild = Some(memo);
                put(&mut p, &mut memo);
            }
        }
        p.extend_from_slice(b"((");
        unicode(&mut p, "storage");
        match storage {
            Some(i) => get(&mut p, i),
            None => {
                p.extend_from_slice(b"ctorch\nHalfStorage\n");
                storage = Some(memo);
                put(&mut p, &mut memo);
            }
        }
        unicode(&mut p, &t.to_string());
        unicode(&mut p, "cpu");
        int(&mut p, 4096 * 1024);
        p.extend_from_slice(b"tQ"); // TUPLE, BINPERSID
        int(&mut p, 0);
        int(&mut p, 4096);
        int(&mut p, 1024);
        p.push(0x86); // TUPLE2
        int(&mut p, 1024);
        int(&mut p, 1);
        p.push(0x86);
        p.push(0x89); // NEWFALSE
        match ordered {
            Some(i) => get(&mut p, i),
            None => {
                p.extend_from_slice(b"ccollections\nOrderedDict\n");
                ordered = Some(memo);
                put(&mut p, &mut memo);
            }
        }
        p.extend_from_slice(b")RtR"); // EMPTY_TUPLE REDUCE, TUPLE REDUCE
    }
    p.extend_from_slice(b"u.");
    p
}

fn bench(c: &mut Criterion) {
    let pkl = data_pkl();
    // The interpreter accepts it: one dict, and the values it built.
    assert!(
        pickle_load(&pkl).is_ok_and(|n| n > TENSORS),
        "{:?}",
        pickle_load(&pkl)
    );
    let mut g = c.benchmark_group("pickle");
    g.throughput(Throughput::Bytes(pkl.len() as u64));
    g.bench_function(
        format!("data.pkl of {TENSORS} tensors ({} KiB)", pkl.len() >> 10),
        |b| b.iter(|| pickle_load(black_box(&pkl))),
    );
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
