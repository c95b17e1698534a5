//! Choosing the next token from logits, as DeepSeek's generate.py does. The math is
//! [`hal::ops::SampleTokens`]'s, written once in `hal::ops::sample`, so that the host and a
//! backend that samples on the device pick the same tokens from the same seed.

pub use hal::ops::sample::{sample_row as sample, Rng};

/// Index of the largest value (the first on ties); NaN never wins.
pub fn argmax(logits: &[f32]) -> usize {
    sample(logits, 0.0, &mut Rng::new(0))
}
