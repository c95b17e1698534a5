//! The KV cache: per layer, per slot (one slot per live sequence).
//!
//! What each layer type keeps (spec §4.1), with `S` slots and `C` tokens of capacity per slot:
//! * every layer (MTP included): a window ring `[S, window, head_dim]`;
//! * compressed layers: the compressor's state `[S, c·ratio, c·head_dim]` ×2 and its entries
//!   `[S, C/ratio, head_dim]`;
//! * CSA layers also the indexer compressor's state and keys `[S, C/4, index_head_dim]`.
//! Capacity is fixed at creation and enforced per call: a sequence never silently wraps.

use hal::ops::Compressor;
use hal::{Backend, DType, Tensor};

use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::exec::CompressorState;

type Result<T> = std::result::Result<T, ModelError>;

/// One compressor's op descriptor (sizes fixed by the cache) and its state.
pub struct CompressorCache {
    pub spec: Compressor,
    pub state: CompressorState,
}

/// The cache of one block.
pub struct LayerCache {
    pub ring: Tensor,
    pub compressor: Option<CompressorCache>,
    pub indexer: Option<CompressorCache>,
}

/// All layers' caches plus the position each slot has reached.
pub struct KvCache {
    slots: usize,
    capacity: usize,
    pub(crate) layers: Vec<LayerCache>,
    pub(crate) mtp: Vec<LayerCache>,
    /// Next position of each slot; `None` = free.
    next: Vec<Option<usize>>,
}

impl KvCache {
    /// A cache for `slots` sequences of up to `capacity` tokens each.
    pub fn new(cfg: &ModelConfig, b: &dyn Backend, slots: usize, capacity: usize) -> Result<KvCache> {
        if slots == 0 || capacity == 0 {
            return Err(ModelError::Request(format!("cache needs at least one slot and one token (slots {slots}, capacity {capacity})")));
        }
        let layer = |ratio: usize| -> Result<LayerCache> {
            let compressor = |width: usize, rotate: bool| -> Result<CompressorCache> {
                let spec = Compressor {
                    rows: 0,
                    slots,
                    ratio,
                    overlap: ratio == 4,
                    width,
                    rope_dim: cfg.rope_head_dim,
                    rotate,
                    capacity: (capacity / ratio).max(1),
                    norm_eps: cfg.norm_eps,
                };
                let c = spec.coff();
                let state = CompressorState {
                    kv: b.alloc(&[slots, c * ratio, c * width], DType::F32)?,
                    score: b.alloc(&[slots, c * ratio, c * width], DType::F32)?,
                    cache: b.alloc(&[slots, spec.capacity, width], DType::F32)?,
                };
                Ok(CompressorCache { spec, state })
            };
            Ok(LayerCache {
                ring: b.alloc(&[slots, cfg.window_size, cfg.head_dim], DType::F32)?,
                compressor: if ratio > 0 { Some(compressor(cfg.head_dim, false)?) } else { None },
                indexer: if ratio == 4 { Some(compressor(cfg.index_head_dim, true)?) } else { None },
            })
        };
        let layers = (0..cfg.n_layers).map(|i| layer(cfg.layer_ratio(i))).collect::<Result<Vec<_>>>()?;
        let mtp = (0..cfg.n_mtp_layers).map(|k| layer(cfg.layer_ratio(cfg.n_layers + k))).collect::<Result<Vec<_>>>()?;
        Ok(KvCache { slots, capacity, layers, mtp, next: vec![None; slots] })
    }

    pub fn slots(&self) -> usize {
        self.slots
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Claims a free slot for a new sequence, its compressor state reset.
    pub fn alloc_slot(&mut self, b: &dyn Backend) -> Result<usize> {
        let s = self
            .next
            .iter()
            .position(Option::is_none)
            .ok_or_else(|| ModelError::Request(format!("all {} cache slots are in use", self.slots)))?;
        self.reset_slot(b, s)?;
        Ok(s)
    }

    /// Frees a slot.
    pub fn free_slot(&mut self, slot: usize) {
        if let Some(n) = self.next.get_mut(slot) {
            *n = None;
        }
    }

    /// Restarts slot `s` at position 0: compressor kv state 0, score state −∞ (the reference's
    /// initial values; it never resets them between prompts, we do — spec §6.19).
    pub fn reset_slot(&mut self, b: &dyn Backend, s: usize) -> Result<()> {
        for lc in self.layers.iter_mut().chain(self.mtp.iter_mut()) {
            for cc in lc.compressor.iter_mut().chain(lc.indexer.iter_mut()) {
                let per_slot = cc.state.kv.numel() / self.slots;
                b.write(&mut cc.state.kv, s * per_slot, &hal::dtype::f32_bytes(&vec![0.0; per_slot]))?;
                b.write(&mut cc.state.score, s * per_slot, &hal::dtype::f32_bytes(&vec![f32::NEG_INFINITY; per_slot]))?;
            }
        }
        self.next[s] = Some(0);
        Ok(())
    }

    /// The next position of `slot`, or an error if the slot is not in use.
    pub fn position(&self, slot: usize) -> Result<usize> {
        self.next
            .get(slot)
            .copied()
            .flatten()
            .ok_or_else(|| ModelError::Request(format!("cache slot {slot} is not allocated (slots: {})", self.slots)))
    }

    /// Moves `slot` on by `tokens` positions. [`crate::forward::Model::forward`] does this itself;
    /// callers that run blocks one at a time (teacher-forced tests) do it after the last block.
    pub fn advance(&mut self, slot: usize, tokens: usize) {
        if let Some(Some(n)) = self.next.get_mut(slot) {
            *n += tokens;
        }
    }

    /// For benchmarks: puts allocated `slot` at position `len` as if `len` tokens had been
    /// prefilled, with pseudo-random values in [−1, 1) (from `seed`) in its window rings and
    /// compressed entries and a zero kv / −∞ score compressor state (a block boundary). The
    /// values belong to no prompt; what a later decode step costs at this context length does
    /// not depend on them, which is what `v4rt bench --fill` measures.
    pub fn fill_synthetic(&mut self, b: &dyn Backend, slot: usize, len: usize, seed: u64) -> Result<()> {
        self.position(slot)?;
        if len > self.capacity {
            return Err(ModelError::Request(format!("fill of {len} tokens exceeds the cache capacity {}", self.capacity)));
        }
        self.reset_slot(b, slot)?;
        const CHUNK: usize = 1 << 22;
        let mut rng = crate::synthetic::SplitMix64(seed);
        let noise: Vec<f32> = (0..CHUNK).map(|_| (2.0 * rng.uniform() - 1.0) as f32).collect();
        let bytes = hal::dtype::f32_bytes(&noise);
        let slots = self.slots;
        let fill = |t: &mut Tensor| -> Result<()> {
            let per_slot = t.numel() / slots;
            let mut done = 0;
            while done < per_slot {
                let n = CHUNK.min(per_slot - done);
                b.write(t, slot * per_slot + done, &bytes[..n * 4])?;
                done += n;
            }
            Ok(())
        };
        for lc in self.layers.iter_mut().chain(self.mtp.iter_mut()) {
            fill(&mut lc.ring)?;
            for cc in lc.compressor.iter_mut().chain(lc.indexer.iter_mut()) {
                fill(&mut cc.state.cache)?;
            }
        }
        self.next[slot] = Some(len);
        Ok(())
    }

    /// Bytes held by the cache on its backend.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .chain(&self.mtp)
            .map(|l| {
                l.ring.len_bytes()
                    + l.compressor.iter().chain(&l.indexer)
                        .map(|c| c.state.kv.len_bytes() + c.state.score.len_bytes() + c.state.cache.len_bytes())
                        .sum::<usize>()
            })
            .sum()
    }
}
