//! RMSNorm, with or without a learned weight, optionally followed by RoPE and the FP8 simulation
//! of a query or KV entry.

use super::{input, output, Signature};
use crate::dtype::DType;

/// `y[r, :] = w ⊙ x[r, :] / sqrt(mean(x[r, :]²) + eps)` (f32).
///
/// With `weighted = false` there is no `w` input: this is the per-head query rescale of
/// spec §3.4 step 3 (rows = tokens × heads, dim = head_dim).
///
/// With `rope`, `y` then goes through [`Rope`](super::Rope) (forward) as `[R / heads, heads,
/// dim]` at the positions of input `positions [R / heads]` with the frequencies `freqs`, and,
/// with `fp8_nope`, through [`QuantSim`](super::QuantSim) e4m3 in blocks of 64 over its first
/// `dim − rope_dim` values (the window KV entry). Every query and KV row is normed right before
/// its RoPE, so a backend can rotate and quantize the values it has just normed instead of
/// reading them back in two more kernels.
#[derive(Clone, Debug, PartialEq)]
pub struct RmsNorm {
    pub rows: usize,
    pub dim: usize,
    pub eps: f32,
    pub weighted: bool,
    pub rope: Option<NormRope>,
}

/// The RoPE (and FP8 simulation) that follows an [`RmsNorm`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NormRope {
    /// Rows per position: the heads of one token.
    pub heads: usize,
    pub rope_dim: usize,
    /// Simulate e4m3 (blocks of 64) on the first `dim − rope_dim` values after the rotation.
    pub fp8_nope: bool,
}

/// Block of the FP8 simulation after an [`RmsNorm`] with `fp8_nope`.
pub const NORM_FP8_BLOCK: usize = 64;

impl RmsNorm {
    pub fn signature(&self) -> Signature {
        let mut inputs = vec![input("x", &[self.rows, self.dim], DType::F32)];
        if self.weighted {
            inputs.push(input("weight", &[self.dim], DType::F32));
        }
        if let Some(r) = self.rope {
            inputs.push(input("freqs", &[r.rope_dim / 2], DType::F32));
            inputs.push(input("positions", &[self.rows / r.heads.max(1)], DType::I32));
        }
        Signature { inputs, outputs: vec![output("y", &[self.rows, self.dim], DType::F32)] }
    }

    /// The RoPE part as a [`Rope`](super::Rope) op on the output.
    pub fn rope_op(&self) -> Option<super::Rope> {
        self.rope.map(|r| super::Rope {
            rows: self.rows / r.heads.max(1),
            heads: r.heads,
            head_dim: self.dim,
            rope_dim: r.rope_dim,
            inverse: false,
        })
    }

    /// The FP8 simulation part as a [`QuantSim`](super::QuantSim) op on the output.
    pub fn quant_op(&self) -> Option<super::QuantSim> {
        self.rope.filter(|r| r.fp8_nope).map(|r| super::QuantSim {
            rows: self.rows,
            dim: self.dim,
            quant_dims: self.dim - r.rope_dim,
            block: NORM_FP8_BLOCK,
            format: super::QuantFormat::Fp8E4M3,
        })
    }

    /// The position of the `freqs` input (`positions` follows it): after `x` and the weight.
    pub fn rope_inputs_at(&self) -> usize {
        1 + self.weighted as usize
    }
}
