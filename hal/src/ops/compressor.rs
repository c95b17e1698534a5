//! The KV compressor of CSA (ratio 4, overlapping) and HCA (ratio 128) layers, and of the
//! indexer (spec §3.5).

use super::{inout, input, Signature};
use crate::dtype::DType;

/// Feeds rows into a slot's compressor state and emits each finished compressed entry.
///
/// Inputs per row: `kv = wkv·x` and `score = wgate·x`, both `[R, c·D]` with `c = 2` when
/// `overlap` (ratio 4) else 1, `D = width`. State per slot: `state_kv`, `state_score`
/// `[S, c·ratio, c·D]` (fresh slot: kv 0, score −∞).
///
/// For each row in order (slot s, position t, `i = t mod ratio`):
/// * the row goes to state row `i + (overlap ? ratio : 0)` with `score + ape[i]`;
/// * if `(t + 1) mod ratio == 0`, entry `j = t div ratio` is emitted: per channel c < D, a
///   softmax over the slots' scores weights their kv values —
///   overlap: slots = state rows `0..ratio` through channel c (previous block; −∞ for j = 0)
///   and rows `ratio..2·ratio` through channel `D + c` (this block);
///   no overlap: rows `0..ratio` through channel c;
///   then, for overlap, rows `ratio..2·ratio` are copied to rows `0..ratio`.
/// * the entry `e` is finished as `ê = RMSNorm(e) ⊙ norm_w` (eps `norm_eps`), RoPE (forward,
///   `freqs`) on its last `rope_dim` dims at position `j·ratio`, then
///   `rotate = false`: e4m3 simulation (block 64) of the first `D − rope_dim` dims;
///   `rotate = true` (indexer keys): Hadamard over all D dims, then e2m1 simulation (block 32)
///   of all D dims — and written to `cache[s, j]`. `j ≥ capacity` is an error. `cache` has
///   dtype `cache_dtype` (module conventions: a BF16 cache stores the nearest-even bf16 of ê);
///   the state is f32.
#[derive(Clone, Debug, PartialEq)]
pub struct Compressor {
    pub rows: usize,
    pub slots: usize,
    pub ratio: usize,
    pub overlap: bool,
    pub width: usize,
    pub rope_dim: usize,
    pub rotate: bool,
    pub capacity: usize,
    pub norm_eps: f32,
    pub cache_dtype: DType,
}

impl Compressor {
    /// `c` in the doc above: 2 for the overlapping (ratio 4) compressor, else 1.
    pub fn coff(&self) -> usize {
        if self.overlap {
            2
        } else {
            1
        }
    }
    pub fn signature(&self) -> Signature {
        let (r, s, c, d) = (self.rows, self.slots, self.coff(), self.width);
        Signature {
            inputs: vec![
                input("kv", &[r, c * d], DType::F32),
                input("score", &[r, c * d], DType::F32),
                input("ape", &[self.ratio, c * d], DType::F32),
                input("norm_w", &[d], DType::F32),
                input("freqs", &[self.rope_dim / 2], DType::F32),
                input("slots", &[r], DType::I32),
                input("positions", &[r], DType::I32),
            ],
            outputs: vec![
                inout("state_kv", &[s, c * self.ratio, c * d], DType::F32),
                inout("state_score", &[s, c * self.ratio, c * d], DType::F32),
                inout("cache", &[s, self.capacity, d], self.cache_dtype),
            ],
        }
    }
}
