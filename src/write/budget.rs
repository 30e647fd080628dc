//! The bytes a conversion holds in flight, bounded: which row groups start in which
//! order ([`start_order`]) and how many run side by side ([`Budget`]).

use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Bytes in flight, bounded; waits are on plain threads only, never on rayon workers.
///
/// Groups within the cap share it. The largest group in flight, when it holds more than
/// half the cap (a row larger than the row-group budget: an embedding, a 7B's MLP
/// weights), does not count against it, as long as all their buffers stay under
/// [`ALONGSIDE_BYTES`]; otherwise such a row would run with the other threads idle.
/// A group larger than the cap has a budget of its own, one such group at a time, so
/// the other threads go on with the small groups after it, again as long as both
/// together stay under [`ALONGSIDE_BYTES`]; a bigger row runs alone.
/// In flight at most: the cap plus the largest group, or the largest group alone.
/// Buffers in flight are about twice the bytes (cast and compressed); kept ones, about
/// the cap again. This bounds them beside a big row: 768 MiB, leaving room under 1 GiB.
const ALONGSIDE_BYTES: u64 = 768 << 20;

/// Whether a group holds more than half the budget `cap`: it cannot share it with another
/// of its size (see [`Budget::fits`], [`start_order`]).
fn large(bytes: u64, cap: u64) -> bool {
    bytes > cap / 2
}

/// Whether a group of `big` bytes (more than `cap`) may run beside the small groups
/// sharing `cap`.
fn alongside(big: u64, cap: u64) -> bool {
    big.saturating_mul(2).saturating_add(cap.saturating_mul(3)) <= ALONGSIDE_BYTES
}

/// The order in which row groups are started (they are appended in plan order
/// whatever it is). Plan order, except that a large group (one row of more than half
/// the budget: an embedding, an LM head) that may run beside small ones starts earlier,
/// before about as many bytes of the small groups just ahead of it as the other threads
/// can cast while one thread does it. At the end of a checkpoint such a row would
/// otherwise be cast and compressed by one thread while the others had nothing left to
/// do (on the 4.4 GB Llama-shaped checkpoint the 131 MB `lm_head` is the last group).
/// It is held, encoded, until its turn.
///
/// No deadlock: the appender waits for the earliest group not yet started, so the
/// budget must admit it beside whatever was started out of order. A large group passes
/// only small groups after the previous large one (so at most one group is ever
/// started ahead of a waiting one), and only those the budget admits beside it.
pub(super) fn start_order(out_bytes: &[u64], cap: u64, held: u64, threads: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..out_bytes.len()).collect();
    if threads < 2 {
        return order;
    }
    // Whether, with only a large group of `h` bytes in flight, the budget admits a
    // group of `u` bytes.
    let budget = Budget::new(cap, false).holding(held);
    let admits = |h: u64, u: u64| {
        let mut alone = Used::default();
        alone.add(h, cap);
        budget.fits(&alone, u)
    };
    // Groups before `floor` (plan order) are never passed; from it on, positions in
    // `order` are still plan order, since every move stays behind the group that moved.
    let mut floor = 0;
    for (i, &bytes) in out_bytes.iter().enumerate() {
        if !large(bytes, cap) {
            continue;
        }
        let from = floor;
        floor = i + 1;
        if !alongside(bytes, cap) {
            continue;
        }
        let others = bytes.saturating_mul(threads as u64 - 1);
        // Move back past small groups while they hold less than the others' share.
        let (mut to, mut before) = (i, 0u64);
        while to > from && before < others && admits(bytes, out_bytes[to - 1]) {
            to -= 1;
            before = before.saturating_add(out_bytes[to]);
        }
        let g = order.remove(i);
        order.insert(to, g);
    }
    order
}

pub(super) struct Budget {
    used: Mutex<Used>,
    cv: Condvar,
    pub(super) cap: u64,
    /// No group runs beside the cap (low-memory mode).
    pub(super) lean: bool,
    /// Input bytes held by the source, taken from the cap the small groups share and
    /// from [`ALONGSIDE_BYTES`] (which groups are large still follows the whole cap).
    pub(super) held: u64,
}

#[derive(Default)]
struct Used {
    /// The bytes of each small group in flight.
    small_groups: Vec<u64>,
    big: u64,
    /// Set when the write stops: every wait ends.
    open: bool,
}

impl Used {
    /// Bytes of the small groups in flight.
    fn small(&self) -> u64 {
        self.small_groups.iter().sum()
    }

    fn add(&mut self, bytes: u64, cap: u64) {
        if bytes > cap {
            self.big = self.big.saturating_add(bytes);
        } else {
            self.small_groups.push(bytes);
        }
    }

    fn remove(&mut self, bytes: u64, cap: u64) {
        if bytes > cap {
            self.big = self.big.saturating_sub(bytes);
        } else if let Some(i) = self.small_groups.iter().position(|&b| b == bytes) {
            self.small_groups.swap_remove(i);
        }
    }
}

impl Budget {
    pub(super) fn new(cap: u64, lean: bool) -> Budget {
        Budget {
            used: Mutex::new(Used::default()),
            cv: Condvar::new(),
            cap: cap.max(1),
            lean,
            held: 0,
        }
    }

    /// The budget with `held` input bytes counted in it.
    pub(super) fn holding(mut self, held: u64) -> Budget {
        self.held = held;
        self
    }

    /// Whether a group of `bytes` may start beside the groups in flight (always when
    /// nothing of its kind is in flight).
    fn fits(&self, u: &Used, bytes: u64) -> bool {
        let cap = self.cap;
        // What the small groups share: the cap less the input held.
        let share = cap.saturating_sub(self.held);
        let small = u.small();
        // All buffers of the groups in flight with this one, and the input held, under
        // ALONGSIDE_BYTES.
        let under = small
            .saturating_add(u.big)
            .saturating_add(bytes)
            .saturating_mul(2)
            .saturating_add(self.held)
            <= ALONGSIDE_BYTES;
        u.open
            || if bytes > cap {
                u.big == 0 && (small == 0 || (alongside(bytes, cap) && under))
            } else {
                // The largest small group, this one included, does not count against
                // the cap when it holds more than half of it: a row larger than the
                // row-group budget runs while the others go on as usual.
                let largest = u.small_groups.iter().copied().fold(bytes, u64::max);
                let free = if large(largest, cap) && !self.lean {
                    largest
                } else {
                    0
                };
                let rest = small.saturating_add(bytes).saturating_sub(free);
                (u.big == 0 || alongside(u.big, cap))
                    && (small == 0
                        || small.saturating_add(bytes) <= share
                        || (rest <= share && under))
            }
    }

    /// Waits until `bytes` fit; false when `halted` says to stop.
    pub(super) fn acquire(&self, bytes: u64, halted: &dyn Fn() -> bool) -> bool {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        while !self.fits(&used, bytes) {
            if halted() {
                return false;
            }
            used = self
                .cv
                .wait_timeout(used, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        used.add(bytes, self.cap);
        !halted()
    }

    pub(super) fn release(&self, bytes: u64) {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        used.remove(bytes, self.cap);
        self.cv.notify_all();
    }

    /// Ends every wait: the write is stopping.
    pub(super) fn open(&self) {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        used.open = true;
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::{alongside, large, start_order, Budget, Used, ALONGSIDE_BYTES};

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_big_last_group_starts_before_as_many_bytes_of_small_groups_as_the_other_threads_take() {
        // The 4.4 GB Llama's layout: a 125 MiB embedding, 32 MiB groups, a 125 MiB LM
        // head; cap 128 MiB.
        let mut sizes = vec![125 * MIB];
        sizes.extend(std::iter::repeat_n(32 * MIB, 10));
        sizes.push(125 * MIB);
        let order = start_order(&sizes, 128 * MIB, 0, 2);
        // The head passes four 32 MiB groups (128 MiB >= 125 MiB); the embedding,
        // already first, stays.
        assert_eq!(order, [0, 1, 2, 3, 4, 5, 6, 11, 7, 8, 9, 10]);
        // Three threads: the other two take twice its bytes, eight groups.
        let order = start_order(&sizes, 128 * MIB, 0, 3);
        assert_eq!(order, [0, 1, 2, 11, 3, 4, 5, 6, 7, 8, 9, 10]);
        // A group of at most half the cap is not moved.
        assert_eq!(
            start_order(&[MIB, MIB, 64 * MIB], 128 * MIB, 0, 2),
            [0, 1, 2]
        );
        // One thread: plan order.
        assert_eq!(
            start_order(&sizes, 128 * MIB, 0, 1),
            (0..12).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_big_group_never_passes_another_big_one_nor_one_that_must_run_alone() {
        // The second big group stops behind the first.
        let sizes = [32 * MIB, 200 * MIB, 32 * MIB, 150 * MIB];
        assert_eq!(start_order(&sizes, 128 * MIB, 0, 2), [0, 1, 3, 2]);
        // A 262 MB row (the 7B's LM head) with a 128 MiB cap runs alone: not moved.
        let big = 262 * 1_000_000;
        assert!(!alongside(big, 128 * MIB));
        let sizes = [32 * MIB, 32 * MIB, 32 * MIB, big];
        assert_eq!(start_order(&sizes, 128 * MIB, 0, 2), [0, 1, 2, 3]);
        // Right at the limit it still runs beside them.
        assert!(alongside((ALONGSIDE_BYTES - 3 * 128 * MIB) / 2, 128 * MIB));
        // Small groups only: plan order.
        assert_eq!(start_order(&[MIB; 5], 128 * MIB, 0, 2), [0, 1, 2, 3, 4]);
    }

    /// Runs the producer and the appender against a budget: the producer starts groups
    /// in `order` as soon as they fit (the fullest budget, the worst case), every group
    /// finishes at once, the appender appends in plan order. False on a deadlock: the
    /// next group cannot start and the next to append has not started.
    fn completes(out_bytes: &[u64], cap: u64, held: u64, lean: bool, order: &[usize]) -> bool {
        let b = Budget::new(cap, lean).holding(held);
        let mut u = Used::default();
        let (mut started, mut next_start, mut next_append) = (vec![false; out_bytes.len()], 0, 0);
        while next_append < out_bytes.len() {
            if next_start < order.len() && b.fits(&u, out_bytes[order[next_start]]) {
                let g = order[next_start];
                u.add(out_bytes[g], cap);
                started[g] = true;
                next_start += 1;
            } else if started[next_append] {
                u.remove(out_bytes[next_append], cap);
                next_append += 1;
            } else {
                return false;
            }
        }
        true
    }

    #[test]
    fn the_start_order_never_deadlocks_the_budget() {
        // The 7B's layers: q, k, v, o (32 MiB), gate, up, down (86 MiB, large but not
        // big), two norms, between 262 MB embedding and head rows that run alone.
        let mut seven_b = vec![262 * 1_000_000];
        for _ in 0..32 {
            seven_b.extend([32 * MIB, 32 * MIB, 32 * MIB, 32 * MIB]);
            seven_b.extend([86 * MIB, 86 * MIB, 86 * MIB, 8192, 8192]);
        }
        seven_b.push(262 * 1_000_000);
        let mut llama22 = vec![125 * MIB];
        llama22.extend(std::iter::repeat_n(32 * MIB, 66));
        llama22.push(125 * MIB);
        let mut layouts = vec![seven_b, llama22];
        // Random layouts: sizes around the cap, from 1 byte to 3 caps.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..400 {
            let n = 2 + (x % 40) as usize;
            layouts.push(
                (0..n)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        1 + x % (3 * 128 * MIB)
                    })
                    .collect(),
            );
        }
        for sizes in &layouts {
            for cap in [8 * MIB, 32 * MIB, 128 * MIB, 300 * MIB, 1 << 30] {
                // Input held by the source: none, a quarter of the cap (a remote
                // source's range cache), all of it and more.
                for held in [0, cap / 4, cap, 2 * cap] {
                    for threads in [1, 2, 3, 8] {
                        let order = start_order(sizes, cap, held, threads);
                        let mut sorted = order.clone();
                        sorted.sort_unstable();
                        assert_eq!(sorted, (0..sizes.len()).collect::<Vec<_>>());
                        assert!(
                            completes(sizes, cap, held, false, &order),
                            "deadlock: cap {cap}, held {held}, {threads} threads, sizes {sizes:?}, order {order:?}"
                        );
                    }
                    // Low-memory mode: plan order, the cap for every group.
                    let order = start_order(sizes, cap, held, 1);
                    assert!(completes(sizes, cap, held, true, &order));
                }
            }
        }
        // The check itself finds a deadlock: a 7B layer's three MLP rows moved ahead of
        // its attention rows (an earlier order did this, and hung).
        let (g, mlp) = (32 * MIB, 86 * MIB);
        let sizes = [g, g, g, g, mlp, mlp, mlp];
        assert!(!completes(
            &sizes,
            128 * MIB,
            0,
            false,
            &[0, 4, 5, 6, 1, 2, 3]
        ));
    }

    /// Small groups of `small` bytes and big ones of `big` bytes in flight.
    fn used(small: &[u64], big: &[u64]) -> Used {
        let mut u = Used::default();
        for &b in small {
            u.add(b, 128 * MIB);
        }
        for &b in big {
            u.add(b, 128 * MIB);
        }
        u
    }

    #[test]
    fn a_row_larger_than_the_row_group_budget_starts_beside_others_while_memory_allows() {
        let b = Budget::new(128 * MIB, false);
        let g = 32 * MIB;
        // Within the cap: always.
        assert!(b.fits(&used(&[g, g, g], &[]), g));
        assert!(!b.fits(&used(&[g, g, g, g], &[]), g));
        // The 125 MiB embedding in flight does not count against the cap: the other
        // threads go on with four 32 MiB groups beside it, not a fifth.
        let emb = 125 * MIB;
        assert!(b.fits(&used(&[emb], &[]), g));
        assert!(b.fits(&used(&[emb, g, g, g], &[]), g));
        assert!(!b.fits(&used(&[emb, g, g, g, g], &[]), g));
        // Nor when it comes second.
        assert!(b.fits(&used(&[g, g, g], &[]), emb));
        // A 7B's MLP rows (86 MiB): two, and one beside them, not a third.
        let mlp = 86 * MIB;
        assert!(b.fits(&used(&[mlp], &[]), mlp));
        assert!(b.fits(&used(&[mlp, mlp], &[]), g));
        assert!(!b.fits(&used(&[mlp, mlp], &[]), mlp));
        // Not when all buffers would pass 768 MiB: two 125 MiB rows and a third group.
        assert!(b.fits(&used(&[emb], &[]), emb));
        assert!(!b.fits(&used(&[emb, emb], &[]), 100 * MIB));
        // Nothing in flight: anything starts.
        assert!(b.fits(&used(&[], &[]), 1 << 40));
        // Beside a big row (over the cap) that may run alongside: small groups as usual,
        // while all buffers stay under 768 MiB.
        assert!(b.fits(&used(&[g, g, g], &[180 * MIB]), g));
        assert!(!b.fits(&used(&[100 * MIB, g], &[180 * MIB]), 100 * MIB));
        // A big row that must run alone: small groups wait for it.
        assert!(!b.fits(&used(&[], &[200 * MIB]), g));
        // A big row beside small ones only when both fit; one big at a time.
        assert!(b.fits(&used(&[g, g], &[]), 150 * MIB));
        assert!(!b.fits(&used(&[g, g], &[150 * MIB]), 150 * MIB));
        assert!(!b.fits(&used(&[g, g], &[]), 262 * 1_000_000));
        assert!(b.fits(&used(&[], &[]), 262 * 1_000_000));
        // Low-memory mode: the cap holds for every group.
        let lean = Budget::new(128 * MIB, true);
        assert!(!lean.fits(&used(&[emb], &[]), g));
        assert!(lean.fits(&used(&[g, g, g], &[]), g));
        assert!(!lean.fits(&used(&[mlp], &[]), mlp));
    }

    #[test]
    fn input_held_by_the_source_is_taken_from_the_budget_not_from_what_is_large() {
        // A remote source's 32 MiB range cache in a 128 MiB budget: three 32 MiB groups
        // in flight, not four.
        let b = Budget::new(128 * MIB, false).holding(32 * MIB);
        let g = 32 * MIB;
        assert!(b.fits(&used(&[g, g], &[]), g));
        assert!(!b.fits(&used(&[g, g, g], &[]), g));
        // A 32 MiB group is still small (half the whole cap at most): two of them do
        // not run as large rows beside each other.
        assert!(!large(g, b.cap));
        // The 125 MiB embedding still runs beside the small groups, two of them now.
        let emb = 125 * MIB;
        assert!(b.fits(&used(&[emb, g], &[]), g));
        assert!(!b.fits(&used(&[emb, g, g, g], &[]), g));
        // The held bytes count under the 768 MiB ceiling beside a large row: with a
        // 384 MiB cap, a 250 MiB row and a 50 MiB group in flight, another 50 MiB group
        // passes what the small groups share (350 MiB) and may start only while all
        // buffers, 2 × 350 MiB, and the held bytes stay under 768 MiB: 40 MiB held
        // leaves room, 96 MiB does not.
        let mut u = Used::default();
        u.add(250 * MIB, 384 * MIB);
        u.add(50 * MIB, 384 * MIB);
        assert!(Budget::new(384 * MIB, false)
            .holding(40 * MIB)
            .fits(&u, 50 * MIB));
        assert!(!Budget::new(384 * MIB, false)
            .holding(96 * MIB)
            .fits(&u, 50 * MIB));
        // Beside a big row (over the cap) small groups share what is left.
        let held = Budget::new(128 * MIB, false).holding(64 * MIB);
        assert!(held.fits(&used(&[g], &[180 * MIB]), g));
        assert!(!held.fits(&used(&[g, g], &[180 * MIB]), g));
        // Nothing in flight: anything starts, whatever is held.
        assert!(Budget::new(128 * MIB, false)
            .holding(1 << 40)
            .fits(&used(&[], &[]), g));
    }
}
