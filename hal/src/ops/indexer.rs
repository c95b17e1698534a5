//! The lightning indexer's scoring and top-k (spec §3.6).

use super::{input, output, Signature};
use crate::dtype::DType;

/// Chooses which compressed entries each CSA query attends to.
///
/// For row r (slot s, position p), `n = floor((p + 1) / ratio)` entries are visible. With
/// `q [R, H, D]` the finished index queries (RoPE, Hadamard, e2m1 simulation already applied),
/// `w [R, H]` the raw `weights_proj · x` and `keys [S, capacity, D]` the indexer compressor's
/// cache (dtype `cache_dtype`, read exactly; module conventions):
/// `I_j = Σ_h (w[r, h] · weight_scale) · max(0, q[r, h] · keys[s, j])` for j < n.
/// Output `indices[r]` = the `min(topk, n)` j with the largest `I_j`, by descending score
/// (ties: lower j first), then `−1` padding; `scores[r]` = their `I_j` (−∞ for padding).
///
/// Exact ties are common: an entry on which every head's dot product is ≤ 0 scores exactly 0.
/// Which of several tied entries fill the last places is therefore implementation-defined
/// (DeepSeek's reference inherits it from its sort routine); the scores let a comparison tell
/// such a legitimate difference from a wrong selection.
#[derive(Clone, Debug, PartialEq)]
pub struct IndexerTopK {
    pub rows: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub slots: usize,
    pub capacity: usize,
    pub ratio: usize,
    pub topk: usize,
    /// `head_dim^{-1/2} · heads^{-1/2}` in the reference.
    pub weight_scale: f32,
    pub cache_dtype: DType,
}

impl IndexerTopK {
    pub fn signature(&self) -> Signature {
        let (r, h, d) = (self.rows, self.heads, self.head_dim);
        Signature {
            inputs: vec![
                input("q", &[r, h, d], DType::F32),
                input("w", &[r, h], DType::F32),
                input("keys", &[self.slots, self.capacity, d], self.cache_dtype),
                input("slots", &[r], DType::I32),
                input("positions", &[r], DType::I32),
            ],
            outputs: vec![
                output("indices", &[r, self.topk], DType::I32),
                output("scores", &[r, self.topk], DType::F32),
            ],
        }
    }
}
