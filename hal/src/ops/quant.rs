//! The reference's in-place quantization simulations and the Hadamard rotation.

use super::{inout, Signature};
use crate::dtype::DType;

/// Target of a [`QuantSim`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// e4m3: `amax` floored at 1e-4, `s = 2^ceil(log2(amax · fl32(1/448)))`, clamp ±448.
    Fp8E4M3,
    /// e2m1: `amax` floored at 6·2^-126, `s = 2^ceil(log2(amax · fl32(1/6)))`, clamp ±6.
    Fp4E2M1,
}

/// In place, per row, for each block of `block` values among the first `quant_dims`:
/// `x ← round_rne(clamp(x / s, ±max)) · s` with `s` from [`QuantFormat`]. Values past
/// `quant_dims` are untouched. Window/compressed KV use e4m3, block 64, the first
/// `head_dim − rope_dim` dims; the indexer query uses e2m1, block 32, all dims.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantSim {
    pub rows: usize,
    pub dim: usize,
    pub quant_dims: usize,
    pub block: usize,
    pub format: QuantFormat,
}

impl QuantSim {
    pub fn signature(&self) -> Signature {
        Signature { inputs: vec![], outputs: vec![inout("x", &[self.rows, self.dim], DType::F32)] }
    }
}

/// In place: `x[r, :] ← (H_n · x[r, :]) · n^{-1/2}` with `H_n` the unnormalized Sylvester
/// Walsh–Hadamard matrix in natural order (`H_1 = [1]`, `H_2k = [[H, H], [H, −H]]`), `n = dim`.
#[derive(Clone, Debug, PartialEq)]
pub struct Hadamard {
    pub rows: usize,
    pub dim: usize,
}

impl Hadamard {
    pub fn signature(&self) -> Signature {
        Signature { inputs: vec![], outputs: vec![inout("x", &[self.rows, self.dim], DType::F32)] }
    }
}
