//! # v4rt-tests — the conformance and parity suite
//!
//! * [`conformance`] — every op × every backend against cpu-ref (poison, canaries, inputs
//!   unchanged, per-op thresholds) and the end-to-end golden tiers; `v4rt conformance` runs it.
//! * [`faults`] — a cpu-ref wrapper with one planted fault, to test the suite itself.
//! * [`metrics`] — elementwise comparisons (relative error, NMSE) for op-level checks.
//! * [`tiers`] — row-wise measures and the golden MANIFEST's tolerance tiers for block- and
//!   model-level parity.
//!
//! The tests themselves live in `tests/`: `kernels.rs` (op-level golden vectors), `parity.rs`
//! (teacher-forced blocks and end-to-end logits against DeepSeek's reference), `bad_input.rs`
//! and `config_fixtures.rs`.

pub mod conformance;
pub mod faults;
pub mod metrics;
pub mod tiers;
