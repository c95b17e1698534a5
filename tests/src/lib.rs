//! # v4rt-tests — the conformance and parity suite
//!
//! * [`metrics`] — elementwise comparisons (relative error, NMSE) for op-level checks.
//! * [`tiers`] — row-wise measures and the golden MANIFEST's tolerance tiers for block- and
//!   model-level parity.
//!
//! The tests themselves live in `tests/`: `kernels.rs` (op-level golden vectors), `parity.rs`
//! (teacher-forced blocks and end-to-end logits against DeepSeek's reference), `bad_input.rs`
//! and `config_fixtures.rs`.

pub mod metrics;
pub mod tiers;
