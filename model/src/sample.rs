//! Choosing the next token from logits, as DeepSeek's generate.py does.
//!
//! Temperature 0 is argmax. Otherwise the exponential race (Gumbel-max in another guise):
//! `argmax_i p_i / E_i` with `p = softmax(logits / T)` and `E_i ~ Exp(1)` i.i.d. — one pass, no
//! sorting, and exactly a sample from `p`.

/// A small deterministic generator (splitmix64) so that a seed reproduces a generation.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1].
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }
}

/// Index of the largest value (first on ties). NaN never wins.
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best
}

/// Samples one token id from `logits` at `temperature`.
pub fn sample(logits: &[f32], temperature: f32, rng: &mut Rng) -> usize {
    if temperature <= 0.0 {
        return argmax(logits);
    }
    let t = temperature as f64;
    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let mut best = (0, f64::NEG_INFINITY);
    for (i, &v) in logits.iter().enumerate() {
        // log(p_i / E_i) up to a constant: (v − max)/T − ln(E_i), E_i = −ln(U).
        let e = -rng.uniform().ln();
        let key = (v as f64 - max) / t - e.max(f64::MIN_POSITIVE).ln();
        if key > best.1 {
            best = (i, key);
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_temperature_is_argmax() {
        let mut rng = Rng::new(1);
        assert_eq!(sample(&[0.1, 3.0, -1.0, 2.9], 0.0, &mut rng), 1);
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // p = softmax([ln 1, ln 3]) = [0.25, 0.75]; 20k draws → within 1.5% of 0.75.
        let logits = [0.0f32, (3.0f32).ln()];
        let mut rng = Rng::new(7);
        let n = 20_000;
        let ones = (0..n).filter(|_| sample(&logits, 1.0, &mut rng) == 1).count();
        let frac = ones as f64 / n as f64;
        assert!((frac - 0.75).abs() < 0.015, "frac {frac}");
    }
}
