//! Sparse attention over the sliding window plus compressed entries, and the window ring store.

use super::{inout, input, output, Signature};
use crate::dtype::DType;

/// Which compressed entries a query sees besides its window (spec §3.4 "Which entries").
#[derive(Clone, Debug, PartialEq)]
pub enum CompressedKv {
    /// Window only (ratio-0 layers and the MTP block).
    None,
    /// HCA: every visible entry `j < floor((pos + 1) / ratio)`, in index order.
    All { ratio: usize, capacity: usize },
    /// CSA: the entries listed in `indices [R, topk]` (from [`super::IndexerTopK`]), in list
    /// order; `−1` entries are skipped.
    Selected { ratio: usize, capacity: usize, topk: usize },
}

/// Multi-query attention with one shared K = V head, per-head sinks (spec §3.4, kernel
/// `sparse_attn`).
///
/// For row r (slot s, position p) the key set is, in this order:
/// * the window: positions `max(0, p − window + 1) ..= p` of slot s, oldest first. A position
///   at or after the first position of slot s's rows in this call is read from `kv[row]` (this
///   call's fresh entries); an earlier one from `ring[s, position mod window]`;
/// * the compressed entries chosen by [`CompressedKv`], read from `compressed[s, j]`.
///
/// With `ℓ_j = (q[r, h] · k_j) · softmax_scale` and `m = max_j ℓ_j`:
/// `o[r, h] = Σ_j e^{ℓ_j − m} k_j / (Σ_j e^{ℓ_j − m} + e^{sink[h] − m})`.
/// The sink is a logit with a zero value vector and is not scaled. Keys are never deduplicated.
///
/// `ring` and `compressed` have dtype `cache_dtype` (module conventions). With a BF16 cache every
/// key is its bf16 value, this call's fresh `kv` rows included (rounded to nearest-even), so a
/// key does not change when a later call reads it from the ring instead.
#[derive(Clone, Debug, PartialEq)]
pub struct SparseAttention {
    pub rows: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub slots: usize,
    pub window: usize,
    pub compressed: CompressedKv,
    pub softmax_scale: f32,
    pub cache_dtype: DType,
}

impl SparseAttention {
    pub fn signature(&self) -> Signature {
        let (r, h, d, s) = (self.rows, self.heads, self.head_dim, self.slots);
        let mut inputs = vec![
            input("q", &[r, h, d], DType::F32),
            input("kv", &[r, d], DType::F32),
            input("ring", &[s, self.window, d], self.cache_dtype),
            input("sink", &[h], DType::F32),
            input("slots", &[r], DType::I32),
            input("positions", &[r], DType::I32),
        ];
        match self.compressed {
            CompressedKv::None => {}
            CompressedKv::All { capacity, .. } => inputs.push(input("compressed", &[s, capacity, d], self.cache_dtype)),
            CompressedKv::Selected { capacity, topk, .. } => {
                inputs.push(input("compressed", &[s, capacity, d], self.cache_dtype));
                inputs.push(input("indices", &[r, topk], DType::I32));
            }
        }
        Signature { inputs, outputs: vec![output("o", &[r, h, d], DType::F32)] }
    }
}

/// Stores this call's window entries: `ring[slot[r], pos[r] mod window] = kv[r]`, rows in
/// order (so a prefill longer than the window leaves its last `window` entries). Issue it after
/// the layer's [`SparseAttention`], which still needs the older ring entries. The ring has dtype
/// `cache_dtype` (module conventions: a BF16 ring stores the nearest-even bf16 of `kv`).
#[derive(Clone, Debug, PartialEq)]
pub struct WindowStore {
    pub rows: usize,
    pub slots: usize,
    pub window: usize,
    pub dim: usize,
    pub cache_dtype: DType,
}

impl WindowStore {
    pub fn signature(&self) -> Signature {
        Signature {
            inputs: vec![
                input("kv", &[self.rows, self.dim], DType::F32),
                input("slots", &[self.rows], DType::I32),
                input("positions", &[self.rows], DType::I32),
            ],
            outputs: vec![inout("ring", &[self.slots, self.window, self.dim], self.cache_dtype)],
        }
    }
}
