//! Choosing each row's next token from its logits on the device, so that a decode step can feed
//! its own output to the next step without a round trip through the host.

use super::{inout, input, output, Signature};
use crate::dtype::DType;

/// Picks one token per row: greedy at temperature 0, otherwise a sample from
/// `softmax(logits / temperature)` by the exponential race (Gumbel-max in another guise).
///
/// For row `r` with logits `v[0..vocab)` and generator state `s = rng[r]` (a u64 held as i64):
/// * **temperature 0:** `tokens[r]` = the first index of the largest logit; `rng[r]` unchanged.
/// * **temperature T > 0:** for every `i`, in f64,
///   `u_i = sample_uniform(s, i)` (the `i`-th draw of [`splitmix64`] from state `s`, in (0, 1]),
///   `e_i = max(−ln u_i, f64::MIN_POSITIVE)`, `key_i = v_i / T − ln e_i`;
///   `tokens[r]` = the first index of the largest key, and `rng[r] = s + vocab·γ` (wrapping;
///   γ = [`GAMMA`]), the state after `vocab` draws. `argmax_i p_i / e_i` with `e_i ~ Exp(1)` is
///   exactly a draw from `p`, in one pass with no sort.
///
/// NaN logits (and NaN keys) never win; a row with no other value gives token 0. The draws are
/// counter-based, so the device computes them in any order and a host that draws the same
/// numbers one after another ([`Rng`]) picks the same token: `ln` may differ by an ulp between
/// implementations, so two keys within a few ulp of each other may be picked either way.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleTokens {
    pub rows: usize,
    pub vocab: usize,
    /// 0 = greedy; must be finite and ≥ 0.
    pub temperature: f32,
}

impl SampleTokens {
    pub fn signature(&self) -> Signature {
        Signature {
            inputs: vec![input("logits", &[self.rows, self.vocab], DType::F32)],
            outputs: vec![output("tokens", &[self.rows], DType::I32), inout("rng", &[self.rows], DType::I64)],
        }
    }
}

/// splitmix64's increment.
pub const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// splitmix64's output function of an advanced state.
pub fn splitmix64(z: u64) -> u64 {
    let z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The `i`-th uniform draw (0-based) from state `s`, in (0, 1]: 53 bits of
/// `splitmix64(s + (i + 1)·γ)`.
pub fn sample_uniform(s: u64, i: u64) -> f64 {
    let z = splitmix64(s.wrapping_add(i.wrapping_add(1).wrapping_mul(GAMMA)));
    ((z >> 11) + 1) as f64 / (1u64 << 53) as f64
}

/// The race key of logit `v` with uniform draw `u` at temperature `t` > 0 (see [`SampleTokens`]).
pub fn sample_key(v: f32, t: f32, u: f64) -> f64 {
    let e = (-u.ln()).max(f64::MIN_POSITIVE);
    v as f64 / t as f64 - e.ln()
}

/// A splitmix64 generator: the host side of [`SampleTokens`]' draws, so that a seed reproduces
/// a generation whichever side samples.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        splitmix64(self.0)
    }
}

/// [`SampleTokens`] on one row, on the host: the token and the generator after it.
pub fn sample_row(logits: &[f32], temperature: f32, rng: &mut Rng) -> usize {
    let mut best: Option<(usize, f64)> = None;
    let greedy = temperature == 0.0;
    for (i, &v) in logits.iter().enumerate() {
        let key = if greedy { v as f64 } else { sample_key(v, temperature, sample_uniform(rng.0, i as u64)) };
        if key.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, k)| key > k) {
            best = Some((i, key));
        }
    }
    if !greedy {
        rng.0 = rng.0.wrapping_add((logits.len() as u64).wrapping_mul(GAMMA));
    }
    best.map_or(0, |(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_draws_follow_the_sequential_generator() {
        let mut rng = Rng::new(12345);
        let s = rng.0;
        for i in 0..100u64 {
            let z = rng.next_u64();
            assert_eq!(((z >> 11) + 1) as f64 / (1u64 << 53) as f64, sample_uniform(s, i));
        }
    }

    #[test]
    fn greedy_takes_the_first_largest_and_skips_nan() {
        let mut rng = Rng::new(1);
        assert_eq!(sample_row(&[0.1, 3.0, -1.0, 3.0], 0.0, &mut rng), 1);
        assert_eq!(sample_row(&[f32::NAN, -5.0, f32::NAN], 0.0, &mut rng), 1);
        assert_eq!(sample_row(&[f32::NAN, f32::NAN], 0.0, &mut rng), 0);
        assert_eq!(sample_row(&[f32::NEG_INFINITY, f32::NEG_INFINITY], 0.0, &mut rng), 0);
        assert_eq!(rng, Rng::new(1), "greedy draws nothing");
    }

    #[test]
    fn sampling_follows_the_distribution_and_advances_by_vocab_draws() {
        // p = softmax([ln 1, ln 3]) = [0.25, 0.75]; 20k draws → within 1.5 % of 0.75.
        let logits = [0.0f32, (3.0f32).ln()];
        let mut rng = Rng::new(7);
        let n = 20_000;
        let ones = (0..n).filter(|_| sample_row(&logits, 1.0, &mut rng) == 1).count();
        let frac = ones as f64 / n as f64;
        assert!((frac - 0.75).abs() < 0.015, "frac {frac}");
        assert_eq!(rng.0, 7u64.wrapping_add((2 * n as u64).wrapping_mul(GAMMA)));
    }

    #[test]
    fn a_low_temperature_is_nearly_greedy() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1000) as f32 * 0.01).collect();
        let best = sample_row(&logits, 0.0, &mut Rng::new(0));
        let mut rng = Rng::new(3);
        assert!((0..50).all(|_| sample_row(&logits, 1e-4, &mut rng) == best));
    }
}
