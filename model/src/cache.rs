//! The KV cache: per layer, per slot (one slot per live sequence).
//!
//! What each layer type keeps (spec §4.1), with `S` slots and `C` tokens of capacity per slot:
//! * every layer (MTP included): a window ring `[S, window, head_dim]`;
//! * compressed layers: the compressor's state `[S, c·ratio, c·head_dim]` ×2 and its entries
//!   `[S, C/ratio, head_dim]`;
//! * CSA layers also the indexer compressor's state and keys `[S, C/4, index_head_dim]`.
//!
//! Capacity is fixed at creation and enforced per call: a sequence never silently wraps.
//!
//! Rings and entries are bf16 where the backend runs the cache ops with it: the reference's
//! layout and the size `v4rt kv-size` gives (spec §4.1); f32 otherwise. The compressor state is
//! f32 in both (the reference keeps it in fp32). [`KvCache::save`] / [`KvCache::load`] move a
//! whole cache to a file and back, so a session (or a long prefill) can continue in another
//! process.

use hal::backend::Support;
use hal::ops::attention::CompressedKv;
use hal::ops::{Compressor, IndexerTopK, SparseAttention, WindowStore};
use hal::{Backend, DType, Op, Tensor};

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::ModelConfig;
use crate::error::{LoadError, ModelError};
use crate::exec::CompressorState;
use crate::safetensors::{self, SafeTensors, WriteTensor};

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
    /// Unique per cache made in this process: a recorded decode step names the one cache whose
    /// tensors it uses ([`crate::decode::DecodeStep`]).
    id: u64,
    slots: usize,
    capacity: usize,
    dtype: DType,
    pub(crate) layers: Vec<LayerCache>,
    pub(crate) mtp: Vec<LayerCache>,
    /// Next position of each slot; `None` = free.
    next: Vec<Option<usize>>,
}

/// Why `b` cannot run this model's cache ops with entries of `dtype`, or `None` if it can.
/// Asks [`Backend::supports`] for each cache op at the model's shapes.
pub fn kv_dtype_unsupported(cfg: &ModelConfig, b: &dyn Backend, dtype: DType) -> Option<String> {
    let (hd, id) = (cfg.head_dim, cfg.index_head_dim);
    let comp = |width, rotate| Compressor {
        rows: 1,
        slots: 1,
        ratio: 4,
        overlap: true,
        width,
        rope_dim: cfg.rope_head_dim,
        rotate,
        capacity: 1,
        norm_eps: cfg.norm_eps,
        cache_dtype: dtype,
    };
    let probes = [
        Op::WindowStore(WindowStore { rows: 1, slots: 1, window: cfg.window_size, dim: hd, cache_dtype: dtype }),
        Op::SparseAttention(SparseAttention {
            rows: 1,
            heads: cfg.n_heads,
            head_dim: hd,
            slots: 1,
            window: cfg.window_size,
            compressed: CompressedKv::Selected { ratio: 4, capacity: 1, topk: cfg.index_topk },
            softmax_scale: 1.0,
            cache_dtype: dtype,
        }),
        Op::Compressor(comp(hd, false)),
        Op::Compressor(comp(id, true)),
        Op::IndexerTopK(IndexerTopK {
            rows: 1,
            heads: cfg.index_n_heads,
            head_dim: id,
            slots: 1,
            capacity: 1,
            ratio: 4,
            topk: cfg.index_topk,
            weight_scale: 1.0,
            cache_dtype: dtype,
        }),
    ];
    probes.iter().find_map(|op| match b.supports(op) {
        Support::Yes => None,
        Support::No(why) => Some(format!("{}: {why}", op.name())),
    })
}

/// The entry dtype [`KvCache::new`] picks on `b`: bf16 where every cache op runs with it, else
/// f32.
pub fn preferred_kv_dtype(cfg: &ModelConfig, b: &dyn Backend) -> DType {
    match kv_dtype_unsupported(cfg, b, DType::BF16) {
        None => DType::BF16,
        Some(_) => DType::F32,
    }
}

impl KvCache {
    /// A cache for `slots` sequences of up to `capacity` tokens each, with entries in the
    /// backend's [`preferred_kv_dtype`].
    pub fn new(cfg: &ModelConfig, b: &dyn Backend, slots: usize, capacity: usize) -> Result<KvCache> {
        Self::with_dtype(cfg, b, slots, capacity, preferred_kv_dtype(cfg, b))
    }

    /// A cache whose rings and compressed entries have dtype `dtype` (f32 or bf16).
    pub fn with_dtype(
        cfg: &ModelConfig,
        b: &dyn Backend,
        slots: usize,
        capacity: usize,
        dtype: DType,
    ) -> Result<KvCache> {
        if slots == 0 || capacity == 0 {
            return Err(ModelError::Request(format!(
                "cache needs at least one slot and one token (slots {slots}, capacity {capacity})"
            )));
        }
        if !hal::ops::cache_dtype_supported(dtype) {
            return Err(ModelError::Request(format!("KV cache dtype {dtype} is not supported (use f32 or bf16)")));
        }
        if let Some(why) = kv_dtype_unsupported(cfg, b, dtype) {
            return Err(ModelError::Request(format!(
                "backend {} cannot keep a {dtype} KV cache ({why})",
                b.info().name
            )));
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
                    cache_dtype: dtype,
                };
                let c = spec.coff();
                let state = CompressorState {
                    kv: b.alloc(&[slots, c * ratio, c * width], DType::F32)?,
                    score: b.alloc(&[slots, c * ratio, c * width], DType::F32)?,
                    cache: b.alloc(&[slots, spec.capacity, width], dtype)?,
                };
                Ok(CompressorCache { spec, state })
            };
            Ok(LayerCache {
                ring: b.alloc(&[slots, cfg.window_size, cfg.head_dim], dtype)?,
                compressor: if ratio > 0 { Some(compressor(cfg.head_dim, false)?) } else { None },
                indexer: if ratio == 4 { Some(compressor(cfg.index_head_dim, true)?) } else { None },
            })
        };
        let layers = (0..cfg.n_layers).map(|i| layer(cfg.layer_ratio(i))).collect::<Result<Vec<_>>>()?;
        let mtp =
            (0..cfg.n_mtp_layers).map(|k| layer(cfg.layer_ratio(cfg.n_layers + k))).collect::<Result<Vec<_>>>()?;
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        Ok(KvCache { id, slots, capacity, dtype, layers, mtp, next: vec![None; slots] })
    }

    /// This cache's identity in the process (its tensors never change for its lifetime).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The dtype of the rings and compressed entries.
    pub fn dtype(&self) -> DType {
        self.dtype
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
            return Err(ModelError::Request(format!(
                "fill of {len} tokens exceeds the cache capacity {}",
                self.capacity
            )));
        }
        self.reset_slot(b, slot)?;
        const CHUNK: usize = 1 << 22;
        let mut rng = crate::synthetic::SplitMix64(seed);
        let noise: Vec<f32> = (0..CHUNK).map(|_| (2.0 * rng.uniform() - 1.0) as f32).collect();
        let bytes = match self.dtype {
            DType::BF16 => hal::dtype::bf16_bytes(&noise),
            _ => hal::dtype::f32_bytes(&noise),
        };
        let size = self.dtype.size();
        let slots = self.slots;
        let fill = |t: &mut Tensor| -> Result<()> {
            let per_slot = t.numel() / slots;
            let mut done = 0;
            while done < per_slot {
                let n = CHUNK.min(per_slot - done);
                b.write(t, slot * per_slot + done, &bytes[..n * size])?;
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

    /// Every tensor of the cache with its name in a saved file, in a fixed order.
    fn named_tensors(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut out = Vec::new();
        let groups = self.layers.iter_mut().enumerate().map(|(i, l)| (format!("layers.{i}"), l));
        let mtp = self.mtp.iter_mut().enumerate().map(|(k, l)| (format!("mtp.{k}"), l));
        for (prefix, lc) in groups.chain(mtp) {
            out.push((format!("{prefix}.ring"), &mut lc.ring));
            for (part, cc) in [("compressor", lc.compressor.as_mut()), ("indexer", lc.indexer.as_mut())] {
                if let Some(cc) = cc {
                    out.push((format!("{prefix}.{part}.state_kv"), &mut cc.state.kv));
                    out.push((format!("{prefix}.{part}.state_score"), &mut cc.state.score));
                    out.push((format!("{prefix}.{part}.cache"), &mut cc.state.cache));
                }
            }
        }
        out
    }

    /// Writes the whole cache (every slot's rings, compressor states and entries, and where each
    /// slot stands) to a safetensors file that [`KvCache::load`] reads back: a session can stop
    /// and resume in another process, or a long prefill can be split across processes.
    pub fn save(&mut self, b: &dyn Backend, path: &Path) -> Result<()> {
        let next = serde_json::to_string(&self.next).expect("positions serialize");
        let mut host: Vec<(String, DType, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, t) in self.named_tensors() {
            host.push((name, t.dtype(), t.shape().to_vec(), b.download(t)?));
        }
        let tensors: Vec<WriteTensor> = host
            .iter()
            .map(|(name, dtype, shape, data)| WriteTensor { name, dtype: *dtype, shape: shape.clone(), data })
            .collect();
        let meta = BTreeMap::from([("v4rt.kv.positions".to_string(), next)]);
        safetensors::write(path, &tensors, &meta)?;
        Ok(())
    }

    /// Replaces this cache's contents with a file written by [`KvCache::save`] for a cache of the
    /// same model, slots, capacity and dtype. Every tensor is checked (present, dtype, shape)
    /// before anything is written; an error names the file and the tensor.
    pub fn load(&mut self, b: &dyn Backend, path: &Path) -> Result<()> {
        let file = SafeTensors::open(path)?;
        let bad = |tensor: &str, message: String| {
            ModelError::from(LoadError::Tensor { file: path.to_path_buf(), tensor: tensor.into(), message })
        };
        let meta_err = |message: String| ModelError::from(LoadError::Corrupt { file: path.to_path_buf(), message });
        let next: Vec<Option<usize>> = file
            .metadata()
            .get("v4rt.kv.positions")
            .ok_or_else(|| meta_err("no 'v4rt.kv.positions' metadata: not a saved v4rt KV cache".into()))
            .and_then(|j| serde_json::from_str(j).map_err(|e| meta_err(format!("'v4rt.kv.positions': {e}"))))?;
        if next.len() != self.slots {
            return Err(meta_err(format!("saved for {} slots, this cache has {}", next.len(), self.slots)));
        }
        if let Some(p) = next.iter().flatten().find(|&&p| p > self.capacity) {
            return Err(meta_err(format!(
                "a slot stands at position {p}, past this cache's capacity {}",
                self.capacity
            )));
        }
        let mut tensors = self.named_tensors();
        for (name, t) in &tensors {
            let info = file.info(name).ok_or_else(|| bad(name, "missing".into()))?;
            if info.dtype != t.dtype() || info.shape != t.shape() {
                return Err(bad(
                    name,
                    format!("{} {:?} saved, this cache has {} {:?}", info.dtype, info.shape, t.dtype(), t.shape()),
                ));
            }
        }
        if let Some(extra) = file.names().find(|n| !tensors.iter().any(|(name, _)| name == n)) {
            return Err(bad(extra, "not a tensor of this model's cache".into()));
        }
        for (name, t) in tensors.iter_mut() {
            b.write(t, 0, file.bytes(name)?)?;
        }
        self.next = next;
        Ok(())
    }

    /// Bytes held by the cache on its backend.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .chain(&self.mtp)
            .map(|l| {
                l.ring.len_bytes()
                    + l.compressor
                        .iter()
                        .chain(&l.indexer)
                        .map(|c| c.state.kv.len_bytes() + c.state.score.len_bytes() + c.state.cache.len_bytes())
                        .sum::<usize>()
            })
            .sum()
    }
}
