//! What the device has already established about tensors whose contents have not changed since:
//! argument checks that passed and act_quant'ed copies of linear inputs.
//!
//! A decode step checks the same slot and position tensors before every cache op (13 RoPE calls,
//! 12 row checks in a 4-block step) and quantizes the same normed activation for every linear that
//! reads it (`wq_a` and `wkv`; the routed and the two shared-expert projections; `wq_b` and the
//! indexer's `wq_b`). Each of those kernels costs a few µs of a 1.5 ms step, for work already
//! done. The memo remembers the facts and buffers, each with the device byte ranges it was derived
//! from, and forgets an entry as soon as anything may have changed one of those ranges:
//! * an op writes an output overlapping it (`Backend::run`, before the op's kernels are issued);
//! * the host writes into it, or a new tensor is allocated over it (`alloc`, `upload`, `write`:
//!   a freed tensor's address may come back with other contents);
//! * a recorded graph replays (its ops write without passing through `run`), a recording starts
//!   or ends (facts of eager work do not hold for later replays; buffers made inside a capture
//!   must be freed inside it);
//! * a device-side error is taken: a check kernel does nothing while an error is recorded, so a
//!   check issued then proved nothing.
//!
//! A lookup (`knows`) and the `learn` after the check's launch are two lock holds, not one, and
//! need not be one: the bytes a fact covers belong to tensors the op borrows for the whole call,
//! so no other thread can write or free them in between (that would need `&mut` to them, or
//! their drop). Two threads checking the same tensor at once at worst both issue the check.
//!
//! Inputs of an op are immutable for the op (`&Tensor`), so an op cannot change what it reads.
//! Skipping a check that passed before on the same bytes cannot hide an error: it would pass
//! again, and if the earlier one failed, every later check and guarded kernel is a no-op anyway
//! until the error is taken (which clears the memo).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use crate::device::DevBuf;

/// A device-side check that passed, by kernel and the arguments that decide it (not the op id or
/// error code, which only label a failure).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Fact {
    pub kernel: &'static str,
    pub args: Vec<i64>,
}

/// An act_quant'ed copy of `rows × dim` f32 values at `src` (blocks of `block`, format `fmt`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct QuantKey {
    pub src: u64,
    pub rows: usize,
    pub dim: usize,
    pub block: usize,
    pub fmt: i32,
}

/// Device byte range `[start, start + len)`.
type Range = (u64, usize);

fn overlaps(a: Range, b: Range) -> bool {
    a.0 < b.0 + b.1 as u64 && b.0 < a.0 + a.1 as u64
}

/// Most quantized copies kept at once (least recently made dropped first), and the largest one
/// kept: a decode row's copies are 4–32 KiB, and its FP8 row is kept in two forms (f32 and e4m3,
/// `ops::quant::act_quant`); prefill chunks would pin 64–128 MiB each.
const QUANT_ENTRIES: usize = 8;
const QUANT_MAX_BYTES: usize = 8 << 20;

#[derive(Default)]
struct State {
    facts: Vec<(Fact, Vec<Range>)>,
    quants: VecDeque<(QuantKey, u64, Arc<DevBuf>)>,
    /// What was learned or kept while frozen: forgotten like the rest, known only after the thaw.
    pending_facts: Vec<(Fact, Vec<Range>)>,
    pending_quants: Vec<(QuantKey, u64, Arc<DevBuf>)>,
}

/// The memo of one backend (see the module docs). Lookups are linear: a step holds a few
/// dozen entries at most, and every op clears those its outputs overlap.
#[derive(Default)]
pub(crate) struct Memo {
    state: Mutex<State>,
    /// While set, what is learned or kept waits until the thaw (`Dev::concurrently`: an entry
    /// issued on one stream is not ordered before the other stream's kernels, but after the join
    /// it is ordered before everything).
    frozen: std::sync::atomic::AtomicBool,
}

impl Memo {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `fact` is known (a check that passed on bytes unchanged since).
    pub fn knows(&self, fact: &Fact) -> bool {
        self.state().facts.iter().any(|(f, _)| f == fact)
    }

    /// Records `fact`, read from `reads`, once its check kernel has been issued: the check either
    /// establishes it or records an error, which clears the memo when taken.
    pub fn learn(&self, fact: Fact, reads: &[Range]) {
        let entry = (fact, reads.iter().copied().filter(|r| r.1 > 0).collect());
        let mut s = self.state();
        if self.is_frozen() {
            s.pending_facts.push(entry);
        } else if !s.facts.iter().any(|(f, _)| *f == entry.0) {
            s.facts.push(entry);
        }
    }

    /// The address of the quantized copy for `key`, if one is kept.
    pub fn quantized(&self, key: &QuantKey) -> Option<u64> {
        self.state().quants.iter().find(|(k, _, _)| k == key).map(|(_, p, _)| *p)
    }

    /// Whether a quantized copy for `key` would be kept (small copies only; see `QUANT_MAX_BYTES`).
    pub fn keeps(key: &QuantKey) -> bool {
        key.rows * key.dim * 4 <= QUANT_MAX_BYTES
    }

    /// Keeps `buf`, which holds the quantized copy for `key` at device address `ptr`, once the
    /// kernel that fills it has been issued. One buffer may hold the copies of several keys.
    pub fn keep_quantized(&self, key: QuantKey, ptr: u64, buf: Arc<DevBuf>) {
        let mut s = self.state();
        if self.is_frozen() {
            s.pending_quants.push((key, ptr, buf));
            return;
        }
        if s.quants.len() == QUANT_ENTRIES {
            s.quants.pop_front();
        }
        s.quants.push_back((key, ptr, buf));
    }

    /// Forgets every entry derived from bytes overlapping `range` (written or reallocated).
    pub fn written(&self, range: Range) {
        if range.1 == 0 {
            return;
        }
        let mut s = self.state();
        s.facts.retain(|(_, reads)| !reads.iter().any(|r| overlaps(*r, range)));
        s.quants.retain(|(k, _, _)| !overlaps((k.src, k.rows * k.dim * 4), range));
        s.pending_facts.retain(|(_, reads)| !reads.iter().any(|r| overlaps(*r, range)));
        s.pending_quants.retain(|(k, _, _)| !overlaps((k.src, k.rows * k.dim * 4), range));
    }

    /// Freezes (or thaws) the memo: while frozen, what is learned or kept is held back (and
    /// forgotten on overlapping writes as usual); the thaw makes it known.
    pub fn freeze(&self, on: bool) {
        self.frozen.store(on, std::sync::atomic::Ordering::SeqCst);
        if !on {
            let (facts, quants) = {
                let mut s = self.state();
                (std::mem::take(&mut s.pending_facts), std::mem::take(&mut s.pending_quants))
            };
            for (fact, reads) in facts {
                self.learn(fact, &reads);
            }
            for (key, ptr, buf) in quants {
                self.keep_quantized(key, ptr, buf);
            }
        }
    }

    fn is_frozen(&self) -> bool {
        self.frozen.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Forgets everything (dropping kept buffers is stream-ordered after their readers).
    pub fn clear(&self) {
        let mut s = self.state();
        s.facts.clear();
        s.quants.clear();
        s.pending_facts.clear();
        s.pending_quants.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fact(v: i64) -> Fact {
        Fact { kernel: "check_range", args: vec![v] }
    }

    #[test]
    fn a_fact_is_known_until_a_write_overlaps_what_it_read() {
        let m = Memo::default();
        assert!(!m.knows(&fact(1)));
        m.learn(fact(1), &[(1000, 16)]);
        m.learn(fact(2), &[(1000, 16)]);
        assert!(m.knows(&fact(1)) && m.knows(&fact(2)));
        // A different check on the same bytes is not implied.
        assert!(!m.knows(&fact(3)));
        // Writes next to the range, on either side, leave it alone.
        m.written((984, 16));
        m.written((1016, 8));
        assert!(m.knows(&fact(1)));
        // One overlapping byte forgets both facts on it.
        m.written((1015, 1));
        assert!(!m.knows(&fact(1)) && !m.knows(&fact(2)));
        m.learn(fact(1), &[(1000, 16)]);
        m.clear();
        assert!(!m.knows(&fact(1)));
    }

    #[test]
    fn a_frozen_memo_holds_back_what_it_learns_until_the_thaw() {
        let m = Memo::default();
        m.learn(fact(1), &[(0x100, 8)]);
        m.freeze(true);
        m.learn(fact(2), &[(0x200, 8)]);
        m.learn(fact(3), &[(0x300, 8)]);
        // Known from before the freeze; not yet what was learned since.
        assert!(m.knows(&fact(1)) && !m.knows(&fact(2)));
        // A write while frozen forgets a held-back fact too.
        m.written((0x304, 1));
        m.freeze(false);
        assert!(m.knows(&fact(1)) && m.knows(&fact(2)) && !m.knows(&fact(3)));
    }

    #[test]
    fn a_fact_over_several_ranges_goes_with_any_of_them() {
        let m = Memo::default();
        m.learn(fact(3), &[(0x1000, 4), (0x2000, 4), (0x3000, 0)]);
        // An empty range reads nothing, so writes there leave the fact.
        m.written((0x3000, 64));
        assert!(m.knows(&fact(3)));
        m.written((0x2002, 1));
        assert!(!m.knows(&fact(3)));
    }
}
