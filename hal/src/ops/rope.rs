//! Rotary position embedding, interleaved pairs on the last `rope_dim` dims.

use super::{inout, input, Signature};
use crate::dtype::DType;

/// In place, for every row r, head h and pair i < rope_dim/2, with `n = head_dim − rope_dim`:
/// `(a, b) = (x[r, h, n + 2i], x[r, h, n + 2i + 1])`, `θ = fl32(f32(pos[r]) · freqs[i])`,
/// `(c, s) = (cos θ, sin θ)` rounded to f32, and
/// `(a, b) ← (a·c − b·s, a·s + b·c)` (forward) or `(a·c + b·s, b·c − a·s)` (inverse, used to
/// de-rotate the attention output). Pairs are interleaved (2i, 2i+1), never half-split.
///
/// `freqs` is the layer's table of `rope_dim/2` angular frequencies, YaRN already applied
/// (spec §3.4 "RoPE details"); positions come per row so one call serves any mix of sequences.
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    pub rows: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub rope_dim: usize,
    pub inverse: bool,
}

impl Rope {
    pub fn signature(&self) -> Signature {
        Signature {
            inputs: vec![
                input("freqs", &[self.rope_dim / 2], DType::F32),
                input("positions", &[self.rows], DType::I32),
            ],
            outputs: vec![inout("x", &[self.rows, self.heads, self.head_dim], DType::F32)],
        }
    }
}
