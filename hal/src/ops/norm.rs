//! RMSNorm, with or without a learned weight.

use super::{input, output, Signature};
use crate::dtype::DType;

/// `y[r, :] = w ⊙ x[r, :] / sqrt(mean(x[r, :]²) + eps)` (f32).
///
/// With `weighted = false` there is no `w` input: this is the per-head query rescale of
/// spec §3.4 step 3 (rows = tokens × heads, dim = head_dim).
#[derive(Clone, Debug, PartialEq)]
pub struct RmsNorm {
    pub rows: usize,
    pub dim: usize,
    pub eps: f32,
    pub weighted: bool,
}

impl RmsNorm {
    pub fn signature(&self) -> Signature {
        let mut inputs = vec![input("x", &[self.rows, self.dim], DType::F32)];
        if self.weighted {
            inputs.push(input("weight", &[self.dim], DType::F32));
        }
        Signature { inputs, outputs: vec![output("y", &[self.rows, self.dim], DType::F32)] }
    }
}
