//! Manifold-constrained hyper-connections (mHC): the 4-stream residual mixing (spec §3.2).

use super::{input, output, Signature};
use crate::dtype::DType;

/// Mixing weights and the normed sub-layer input of one mHC site.
///
/// Per row, with `m = mult` streams `X_0..X_{m-1}` of width `d` and `x̄ = concat(X_0..X_{m-1})`:
/// 1. `ρ = 1 / sqrt(mean(x̄²) + norm_eps)`; `μ = (fn · x̄) · ρ` ∈ R^{(2+m)·m}.
/// 2. `pre_i = sigmoid(scale[0]·μ_i + base_i) + hc_eps` for i < m (not normalized).
/// 3. `post_i = 2·sigmoid(scale[1]·μ_{m+i} + base_{m+i})`.
/// 4. `C_{jk} = scale[2]·μ_{2m+m·j+k} + base_{2m+m·j+k}`; Sinkhorn: `C ← softmax_k(C) + hc_eps`,
///    `C ← C / (Σ_j C_{jk} + hc_eps)` (column), then `sinkhorn_iters − 1` times: row
///    normalization `C ← C / (Σ_k C_{jk} + hc_eps)` then column normalization.
/// 5. `u = Σ_i pre_i · X_i`, rounded to f32.
/// 6. `y = norm ⊙ (u · ρ_u)`, `ρ_u = 1 / sqrt(mean(u²) + norm_eps)`: the sub-layer's input
///    RMSNorm (`attn_norm` / `ffn_norm`), exactly [`RmsNorm`](super::RmsNorm) of `u`. It is part
///    of this op because every mHC site is followed by it, and a backend can then norm the row it
///    has just merged instead of reading it back in another kernel.
///
/// Outputs `y [R, d]`, `post [R, m]`, `comb [R, m, m]` (C, row j = source stream).
#[derive(Clone, Debug, PartialEq)]
pub struct HcPre {
    pub rows: usize,
    pub mult: usize,
    pub dim: usize,
    pub sinkhorn_iters: usize,
    pub hc_eps: f32,
    pub norm_eps: f32,
}

impl HcPre {
    pub fn mix_width(&self) -> usize {
        (2 + self.mult) * self.mult
    }
    pub fn signature(&self) -> Signature {
        let (r, m, d) = (self.rows, self.mult, self.dim);
        Signature {
            inputs: vec![
                input("x", &[r, m, d], DType::F32),
                input("fn", &[self.mix_width(), m * d], DType::F32),
                input("base", &[self.mix_width()], DType::F32),
                input("scale", &[3], DType::F32),
                input("norm", &[d], DType::F32),
            ],
            outputs: vec![
                output("y", &[r, d], DType::F32),
                output("post", &[r, m], DType::F32),
                output("comb", &[r, m, m], DType::F32),
            ],
        }
    }
}

/// Writes a sub-layer's output back into the streams:
/// `out[r, k, :] = post[r, k] · f[r, :] + Σ_j comb[r, j, k] · x[r, j, :]`.
/// (Stream j feeds stream k with weight `C[j][k]`, i.e. the transpose of a matrix product.)
#[derive(Clone, Debug, PartialEq)]
pub struct HcPost {
    pub rows: usize,
    pub mult: usize,
    pub dim: usize,
}

impl HcPost {
    pub fn signature(&self) -> Signature {
        let (r, m, d) = (self.rows, self.mult, self.dim);
        Signature {
            inputs: vec![
                input("f", &[r, d], DType::F32),
                input("x", &[r, m, d], DType::F32),
                input("post", &[r, m], DType::F32),
                input("comb", &[r, m, m], DType::F32),
            ],
            outputs: vec![output("out", &[r, m, d], DType::F32)],
        }
    }
}

/// Final stream merge and output norm (main model and MTP):
/// `ρ`, `μ = (fn · x̄)·ρ ∈ R^m` as in [`HcPre`]; `p_i = sigmoid(scale[0]·μ_i + base_i) + hc_eps`;
/// `u = Σ_i p_i · X_i` (rounded to f32); `y = norm ⊙ (u · ρ_u)` as in [`HcPre`] step 6 (the
/// model's final `norm`). No Sinkhorn, no post.
#[derive(Clone, Debug, PartialEq)]
pub struct HcHead {
    pub rows: usize,
    pub mult: usize,
    pub dim: usize,
    pub hc_eps: f32,
    pub norm_eps: f32,
}

impl HcHead {
    pub fn signature(&self) -> Signature {
        let (r, m, d) = (self.rows, self.mult, self.dim);
        Signature {
            inputs: vec![
                input("x", &[r, m, d], DType::F32),
                input("fn", &[m, m * d], DType::F32),
                input("base", &[m], DType::F32),
                input("scale", &[1], DType::F32),
                input("norm", &[d], DType::F32),
            ],
            outputs: vec![output("y", &[r, d], DType::F32)],
        }
    }
}
