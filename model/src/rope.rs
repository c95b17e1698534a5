//! Per-layer RoPE frequency tables (spec §3.4 "RoPE details").
//!
//! Window-only layers (and the MTP block) rotate with `rope_theta` and no YaRN; compressed
//! layers (ratio > 0) with `compress_rope_theta` and YaRN frequency interpolation. The
//! arithmetic is f32 throughout, in the reference's order, so the tables agree with its
//! `precompute_freqs_cis` to the last bit or two.

use crate::config::ModelConfig;

/// The `rope_dim / 2` angular frequencies of layer `ratio` (0 = window-only).
pub fn layer_freqs(cfg: &ModelConfig, ratio: usize) -> Vec<f32> {
    if ratio == 0 {
        freqs(cfg.rope_head_dim, cfg.rope_theta, None)
    } else {
        let yarn = (cfg.original_seq_len > 0).then_some(Yarn {
            factor: cfg.rope_factor,
            original_seq_len: cfg.original_seq_len,
            beta_fast: cfg.beta_fast,
            beta_slow: cfg.beta_slow,
        });
        freqs(cfg.rope_head_dim, cfg.compress_rope_theta, yarn.as_ref())
    }
}

/// YaRN frequency interpolation parameters.
#[derive(Clone, Debug)]
pub struct Yarn {
    pub factor: f32,
    pub original_seq_len: usize,
    pub beta_fast: f32,
    pub beta_slow: f32,
}

/// `ω_i = 1 / θ^(2i/dim)`, then with YaRN `ω_i ← ω_i/factor · ramp_i + ω_i · (1 − ramp_i)`,
/// `ramp_i = clamp((i − low)/(high − low), 0, 1)` over the correction range `[low, high]`.
pub fn freqs(dim: usize, theta: f32, yarn: Option<&Yarn>) -> Vec<f32> {
    let half = dim / 2;
    let mut w: Vec<f32> = (0..half).map(|i| 1.0 / theta.powf((2 * i) as f32 / dim as f32)).collect();
    if let Some(y) = yarn {
        let correction = |rotations: f64| {
            dim as f64 * (y.original_seq_len as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()
                / (2.0 * (theta as f64).ln())
        };
        let low = correction(y.beta_fast as f64).floor().max(0.0) as f32;
        let mut high = correction(y.beta_slow as f64).ceil().min(dim as f64 - 1.0) as f32;
        if low == high {
            high += 0.001;
        }
        for (i, wi) in w.iter_mut().enumerate() {
            let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
            let smooth = 1.0 - ramp;
            *wi = *wi / y.factor * (1.0 - smooth) + *wi * smooth;
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yarn_range_for_theta_160000_matches_spec() {
        // Spec §3.4: low = 15, high = 25 → ω_0..15 unchanged, ω_25.. divided by 16.
        let plain = freqs(64, 160000.0, None);
        let y = Yarn { factor: 16.0, original_seq_len: 65536, beta_fast: 32.0, beta_slow: 1.0 };
        let w = freqs(64, 160000.0, Some(&y));
        for i in 0..=15 {
            assert_eq!(w[i], plain[i]);
        }
        for i in 25..32 {
            assert!((w[i] * 16.0 / plain[i] - 1.0).abs() < 1e-6);
        }
        assert!((w[16] / plain[16] - 0.90625).abs() < 1e-6, "ratio at 16: {}", w[16] / plain[16]);
    }
}
