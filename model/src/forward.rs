//! The V4 forward pass: embedding → blocks → head, plus the MTP block (spec §3).
//!
//! The model knows V4 and nothing about hardware: every computation is a HAL op issued through
//! [`Exec`]. One call handles any mix of sequences ("chunks"): a prefill of many tokens, one
//! decode token each for several sequences, or a prefill continuing at a later position —
//! every op takes per-row slots and positions.

use std::path::Path;
use std::sync::Arc;

use hal::ops::attention::CompressedKv;
use hal::ops::{self, GateMode, QuantFormat};
use hal::{Backend, DType, Tensor};

use crate::cache::{KvCache, LayerCache};
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::exec::{Exec, HcParams, Rows, Streams};
use crate::weights::{BlockW, GateRoute, Weights};

type Result<T> = std::result::Result<T, ModelError>;

/// A model resident on one backend.
pub struct Model {
    pub cfg: ModelConfig,
    weights: Weights,
    backend: Arc<dyn Backend>,
}

/// Tokens to process for one sequence, continuing at its slot's current position.
#[derive(Clone, Copy, Debug)]
pub struct Chunk<'a> {
    pub slot: usize,
    pub tokens: &'a [u32],
}

/// Which rows get logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsAt {
    /// Every row (prefill parity).
    All,
    /// The last row of each chunk (generation).
    Last,
}

/// What one forward call should return besides the logits.
#[derive(Clone, Debug)]
pub struct ForwardOptions<'a> {
    pub logits: LogitsAt,
    /// Record each layer's routing and indexer choices.
    pub decisions: bool,
    /// Run MTP block 0 on the final streams with these input ids (one per row; the V3
    /// convention passes the next tokens) and return its logits for every row.
    pub mtp_ids: Option<&'a [u32]>,
}

/// One layer's discrete choices for every row of a call.
#[derive(Clone, Debug, Default)]
pub struct LayerDecisions {
    /// `[rows, n_activated_experts]`, in the gate's order.
    pub experts: Vec<i32>,
    /// Routing weights, same order.
    pub expert_weights: Vec<f32>,
    /// `[rows, index_topk]` compressed-entry ids (−1 padding), CSA layers only.
    pub topk: Option<Vec<i32>>,
    /// The indexer scores of those entries (−∞ for padding).
    pub topk_scores: Option<Vec<f32>>,
}

/// The result of [`Model::forward`].
#[derive(Clone, Debug)]
pub struct ForwardOutput {
    /// `[n, vocab]`: every row, or the last row of each chunk (chunk order).
    pub logits: Vec<f32>,
    /// `[rows, vocab]` when MTP was asked for.
    pub mtp_logits: Option<Vec<f32>>,
    /// Per layer (MTP last, if run) when decisions were asked for.
    pub decisions: Vec<LayerDecisions>,
}

impl Model {
    /// Loads `dir` (config.json + safetensors shards), validating every tensor against the
    /// config before anything is uploaded.
    pub fn load(dir: &Path, backend: Arc<dyn Backend>) -> Result<Model> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let ck = Checkpoint::open(dir)?;
        Self::from_checkpoint(cfg, &ck, backend)
    }

    pub fn from_checkpoint(cfg: ModelConfig, ck: &Checkpoint, backend: Arc<dyn Backend>) -> Result<Model> {
        ck.validate(&cfg)?;
        let weights = Weights::load(&cfg, ck, backend.as_ref())?;
        Ok(Model { cfg, weights, backend })
    }

    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// What the backend did with the FP8/FP4 weights at load ([`Backend::prepare`]): tensors
    /// converted, bytes of the copies, and why (all zero and empty when it kept them as is).
    pub fn prepared(&self) -> &hal::backend::Prepared {
        &self.weights.prepared
    }

    /// A cache for this model on its backend, in the backend's preferred dtype
    /// ([`crate::cache::preferred_kv_dtype`]).
    pub fn new_cache(&self, slots: usize, capacity: usize) -> Result<KvCache> {
        KvCache::new(&self.cfg, self.backend(), slots, capacity)
    }

    /// A cache whose entries have dtype `dtype` (f32 or bf16); an error if the backend cannot
    /// run the cache ops with it.
    pub fn new_cache_with(&self, slots: usize, capacity: usize, dtype: DType) -> Result<KvCache> {
        KvCache::with_dtype(&self.cfg, self.backend(), slots, capacity, dtype)
    }

    fn exec(&self) -> Exec<'_> {
        Exec { b: self.backend() }
    }

    fn hc_params(&self) -> HcParams {
        HcParams { sinkhorn_iters: self.cfg.hc_sinkhorn_iters, hc_eps: self.cfg.hc_eps, norm_eps: self.cfg.norm_eps }
    }

    /// Checks a call against the vocabulary and the cache, and uploads its row metadata.
    pub fn rows(&self, cache: &KvCache, chunks: &[Chunk]) -> Result<Rows> {
        let (slots, positions, ids) = self.row_values(cache, chunks)?;
        self.exec().rows(&slots, &positions, &ids)
    }

    /// A call's per-row slots, positions and token ids, after checking the call against the
    /// vocabulary and the cache.
    pub(crate) fn row_values(&self, cache: &KvCache, chunks: &[Chunk]) -> Result<(Vec<i32>, Vec<i32>, Vec<i32>)> {
        if chunks.is_empty() {
            return Err(ModelError::Request("forward call with no sequences".into()));
        }
        let (mut slots, mut positions, mut ids) = (Vec::new(), Vec::new(), Vec::new());
        for (k, c) in chunks.iter().enumerate() {
            if chunks[..k].iter().any(|o| o.slot == c.slot) {
                return Err(ModelError::Request(format!("slot {} appears twice in one call", c.slot)));
            }
            if c.tokens.is_empty() {
                return Err(ModelError::Request(format!("slot {}: no tokens to process", c.slot)));
            }
            let start = cache.position(c.slot)?;
            let end = start + c.tokens.len();
            if end > cache.capacity() {
                return Err(ModelError::Request(format!(
                    "slot {}: {} tokens at position {start} would reach position {end}, past the cache capacity of {} tokens",
                    c.slot, c.tokens.len(), cache.capacity()
                )));
            }
            for (i, &t) in c.tokens.iter().enumerate() {
                if t as usize >= self.cfg.vocab_size {
                    return Err(ModelError::Request(format!(
                        "token id {t} at position {} of slot {} is outside the vocabulary [0, {})",
                        start + i,
                        c.slot,
                        self.cfg.vocab_size
                    )));
                }
                slots.push(c.slot as i32);
                positions.push((start + i) as i32);
                ids.push(t as i32);
            }
        }
        Ok((slots, positions, ids))
    }

    /// Runs one call: every chunk's tokens through the model, advancing their slots.
    ///
    /// Everything the call needs from the host is uploaded before the first block, so a
    /// device backend runs the whole pass without waiting on the host.
    pub fn forward(&self, cache: &mut KvCache, chunks: &[Chunk], opts: &ForwardOptions) -> Result<ForwardOutput> {
        let rows = self.rows(cache, chunks)?;
        let e = self.exec();
        let mtp_ids = match opts.mtp_ids {
            None => None,
            Some(_) if self.weights.mtp.is_empty() => {
                return Err(ModelError::Request("this model has no MTP block".into()))
            }
            Some(m) => Some(self.upload_ids(m, rows.n, "MTP")?),
        };
        // With one token per chunk every row is a last row: no gather.
        let keep = match opts.logits {
            LogitsAt::Last if chunks.iter().any(|c| c.tokens.len() > 1) => {
                let last: Vec<i32> = chunks
                    .iter()
                    .scan(0, |end, c| {
                        *end += c.tokens.len();
                        Some(*end as i32 - 1)
                    })
                    .collect();
                Some(e.upload_i32(&last)?)
            }
            _ => None,
        };
        let (x, mut decisions) = self.trunk(cache, &rows, opts.decisions)?;
        let (x, logits) = self.head_with(x, keep.as_ref(), &self.weights.hc_head, &self.weights.norm)?;
        let mtp_logits = match mtp_ids {
            Some(ids) => {
                let (l, d) = self.mtp_with(0, cache, &rows, x, &ids, opts.decisions)?;
                decisions.extend(d);
                Some(l)
            }
            None => None,
        };
        for c in chunks {
            cache.advance(c.slot, c.tokens.len());
        }
        Ok(ForwardOutput { logits, mtp_logits, decisions })
    }

    /// Embedding and every block on `rows` → the final streams `[rows, hc_mult, dim]`, with the
    /// last HcPost pending (and each block's decisions when asked). Issues only `alloc` and
    /// `run`, so that it can be recorded ([`crate::decode::DecodeStep`]) when `decisions` is
    /// false. Does not advance the cache.
    pub(crate) fn trunk(
        &self,
        cache: &mut KvCache,
        rows: &Rows,
        decisions: bool,
    ) -> Result<(Streams, Vec<LayerDecisions>)> {
        let mut x = Streams::Ready(self.embed_streams(rows)?);
        let mut out = Vec::new();
        for layer in 0..self.cfg.n_layers {
            let (w, lc) = (&self.weights.blocks[layer], &mut cache.layers[layer]);
            let (next, d) = self.block_with(w, lc, rows, &rows.ids, x, decisions)?;
            x = next;
            out.extend(d);
        }
        Ok((x, out))
    }

    /// Checks token ids against the vocabulary and uploads them.
    fn upload_ids(&self, ids: &[u32], rows: usize, what: &str) -> Result<Tensor> {
        if ids.len() != rows {
            return Err(ModelError::Request(format!("{} {what} ids given for {rows} rows", ids.len())));
        }
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(ModelError::Request(format!(
                "{what} token id {bad} is outside the vocabulary [0, {})",
                self.cfg.vocab_size
            )));
        }
        let ids: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
        self.exec().upload_i32(&ids)
    }

    /// `[rows, hc_mult, dim]`: each row's embedding copied into the residual streams.
    pub fn embed_streams(&self, rows: &Rows) -> Result<Tensor> {
        let e = self.exec();
        let emb = e.embed(&rows.ids, &self.weights.embed)?;
        e.hc_expand(&emb, self.cfg.hc_mult)
    }

    /// Block `layer` on streams `x [rows, hc_mult, dim]` → new streams (spec §3.3).
    pub fn block(
        &self,
        layer: usize,
        lc: &mut LayerCache,
        rows: &Rows,
        x: Tensor,
        decisions: bool,
    ) -> Result<(Tensor, Option<LayerDecisions>)> {
        let w = self.weights.blocks.get(layer).ok_or_else(|| {
            ModelError::Request(format!("block {layer} does not exist (the model has {})", self.cfg.n_layers))
        })?;
        let (x, d) = self.block_with(w, lc, rows, &rows.ids, Streams::Ready(x), decisions)?;
        Ok((self.exec().settle(x)?, d))
    }

    /// The caches of block `layer` (for callers that run blocks one by one).
    pub fn layer_cache<'c>(&self, cache: &'c mut KvCache, layer: usize) -> Result<&'c mut LayerCache> {
        let n = cache.layers.len();
        cache
            .layers
            .get_mut(layer)
            .ok_or_else(|| ModelError::Request(format!("block {layer} does not exist (the cache has {n})")))
    }

    /// `ids` are the token ids the hash gate routes by (the MTP block's own input ids there).
    /// Returns the streams with the MoE sub-layer's HcPost pending.
    fn block_with(
        &self,
        w: &BlockW,
        lc: &mut LayerCache,
        rows: &Rows,
        ids: &Tensor,
        x: Streams,
        decisions: bool,
    ) -> Result<(Streams, Option<LayerDecisions>)> {
        let e = self.exec();
        let (x, xn, post, comb) = e.hc_pre(x, &w.hc_attn, &w.attn_norm, self.hc_params())?;
        let (a, topk) = self.attention(w, lc, rows, &xn)?;

        let after_attn = Streams::AfterPost { f: a, x, post, comb };
        let (x, xn, post, comb) = e.hc_pre(after_attn, &w.hc_ffn, &w.ffn_norm, self.hc_params())?;
        let (m, experts, weights) = self.moe(w, rows, ids, &xn)?;
        let x = Streams::AfterPost { f: m, x, post, comb };
        let d = if decisions {
            Some(LayerDecisions {
                experts: e.download_i32(&experts)?,
                expert_weights: e.download_f32(&weights)?,
                topk: topk.as_ref().map(|(t, _)| e.download_i32(t)).transpose()?,
                topk_scores: topk.as_ref().map(|(_, s)| e.download_f32(s)).transpose()?,
            })
        } else {
            None
        };
        Ok((x, d))
    }

    /// Attention sub-layer (spec §3.4–3.7). Returns its output and the indexer's choice.
    fn attention(
        &self,
        w: &BlockW,
        lc: &mut LayerCache,
        rows: &Rows,
        xn: &Tensor,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let (c, e, a) = (&self.cfg, self.exec(), &w.attn);
        let (r, h, hd, rd) = (rows.n, c.n_heads, c.head_dim, c.rope_head_dim);
        let eps = c.norm_eps;

        // Two independent sequences. The first: this call's window entries (normed, rotated,
        // FP8-simulated on the non-rope dims), the compressed entries these rows finish
        // (attention's and the indexer's compressor, which make them visible to these rows) and
        // the indexer's head weights. The second: the query (low-rank, normed latent, per-head
        // RMS rescale, RoPE) and the indexer's query from the same latent (RoPE, Hadamard, FP4
        // simulation).
        // The indexer runs where the block has its weights and the cache its state.
        let index = a.indexer.as_ref().filter(|_| lc.indexer.is_some());
        let (ih, id) = (c.index_n_heads, c.index_head_dim);
        let ((kv, iwts), (q, iq)) = e.concurrently(
            || {
                let kv_rope = ops::NormRope { heads: 1, rope_dim: rd, fp8_nope: true };
                let kv =
                    e.rms_norm_rope(&e.linear(xn, &a.wkv)?, Some(&a.kv_norm), eps, kv_rope, &a.freqs, &rows.positions)?;
                if let (Some(cw), Some(cc)) = (&a.compressor, lc.compressor.as_mut()) {
                    e.compressor(xn, cw, &a.freqs, rows, cc)?;
                }
                let mut iwts = None;
                if let (Some(iw), Some(ic)) = (&a.indexer, lc.indexer.as_mut()) {
                    e.compressor(xn, &iw.compressor, &a.freqs, rows, ic)?;
                    iwts = Some(e.linear(xn, &iw.weights_proj)?);
                }
                Ok((kv, iwts))
            },
            || {
                let latent = e.rms_norm(&e.linear(xn, &a.wq_a)?, Some(&a.q_norm), eps)?;
                let q = e.linear(&latent, &a.wq_b)?.reshape(vec![r * h, hd]);
                let q_rope = ops::NormRope { heads: h, rope_dim: rd, fp8_nope: false };
                let q = e.rms_norm_rope(&q, None, eps, q_rope, &a.freqs, &rows.positions)?.reshape(vec![r, h, hd]);
                let iq = index
                    .map(|iw| -> Result<Tensor> {
                        let mut iq = e.linear(&latent, &iw.wq_b)?.reshape(vec![r, ih, id]);
                        e.rope(&mut iq, &a.freqs, &rows.positions, false)?;
                        let mut iq = iq.reshape(vec![r * ih, id]);
                        e.hadamard(&mut iq)?;
                        e.quant_sim(&mut iq, id, 32, QuantFormat::Fp4E2M1)?;
                        Ok(iq.reshape(vec![r, ih, id]))
                    })
                    .transpose()?;
                Ok((q, iq))
            },
        )?;

        let topk = match (lc.indexer.as_ref(), iq, iwts) {
            (Some(ic), Some(iq), Some(iwts)) => {
                let op = ops::IndexerTopK {
                    rows: r,
                    heads: ih,
                    head_dim: id,
                    slots: ic.spec.slots,
                    capacity: ic.spec.capacity,
                    ratio: a.ratio,
                    topk: c.index_topk,
                    weight_scale: ((id as f64).powf(-0.5) * (ih as f64).powf(-0.5)) as f32,
                    cache_dtype: ic.state.cache.dtype(),
                };
                Some(e.indexer_topk(op, &iq, &iwts, &ic.state.cache, rows)?)
            }
            _ => None,
        };

        let ring_shape = lc.ring.shape();
        let compressed = match (&lc.compressor, &topk) {
            (None, _) => CompressedKv::None,
            (Some(cc), None) => CompressedKv::All { ratio: a.ratio, capacity: cc.spec.capacity },
            (Some(cc), Some(_)) => {
                CompressedKv::Selected { ratio: a.ratio, capacity: cc.spec.capacity, topk: c.index_topk }
            }
        };
        let op = ops::SparseAttention {
            rows: r,
            heads: h,
            head_dim: hd,
            slots: ring_shape[0],
            window: ring_shape[1],
            compressed,
            softmax_scale: (1.0 / (hd as f64).sqrt()) as f32,
            cache_dtype: lc.ring.dtype(),
        };
        let mut o = e.sparse_attention(
            op,
            &q,
            &kv,
            &lc.ring,
            &a.sink,
            rows,
            lc.compressor.as_ref().map(|cc| &cc.state.cache),
            topk.as_ref().map(|(i, _)| i),
        )?;

        // This call's entries go into the ring once the attention has read the slots they
        // replace; nothing after it reads the ring, so the store runs beside the output:
        // de-rotate, grouped low-rank projection, then wo_b.
        let ((), out) = e.concurrently(
            || e.window_store(&kv, rows, &mut lc.ring),
            || {
                e.rope(&mut o, &a.freqs, &rows.positions, true)?;
                let o = o.reshape(vec![r, h * hd]);
                let z = e.grouped_linear(&o, &a.wo_a, c.o_groups)?;
                e.linear(&z, &a.wo_b)
            },
        )?;
        Ok((out, topk))
    }

    /// MoE sub-layer (spec §3.8): routed experts + shared expert. Returns output, experts, weights.
    fn moe(&self, w: &BlockW, rows: &Rows, ids: &Tensor, xn: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (c, e, m) = (&self.cfg, self.exec(), &w.moe);
        let (mode, route) = match &m.route {
            GateRoute::Bias(b) => (GateMode::Scored, b),
            GateRoute::Hash(t) => (GateMode::Hashed { vocab: c.vocab_size }, t),
        };
        let gate = ops::MoeGate {
            rows: rows.n,
            dim: c.dim,
            experts: c.n_routed_experts,
            topk: c.n_activated_experts,
            route_scale: c.route_scale,
            mode,
        };
        let op = ops::MoeExperts {
            rows: rows.n,
            dim: c.dim,
            inter: c.moe_inter_dim,
            experts: c.n_routed_experts,
            topk: c.n_activated_experts,
            swiglu_limit: c.swiglu_limit,
            format: m.experts.format,
        };
        // The shared expert does not depend on the routing: the two may run side by side.
        let (shared, (routed, experts, weights)) = e.concurrently(
            || {
                let h = e.swiglu(&e.linear(xn, &m.shared_w1)?, &e.linear(xn, &m.shared_w3)?, c.swiglu_limit)?;
                e.linear(&h, &m.shared_w2)
            },
            || {
                let (experts, weights) = e.moe_gate(gate, xn, &m.gate_w, route, ids)?;
                let routed = e.moe_experts(op, xn, &experts, &weights, &m.experts)?;
                Ok((routed, experts, weights))
            },
        )?;
        Ok((e.add(&routed, &shared)?, experts, weights))
    }

    /// Final hc merge, norm and LM head for the rows `keep` → `[keep.len(), vocab]` f32.
    pub fn head(&self, x: Tensor, keep: &[usize]) -> Result<Vec<f32>> {
        let idx: Vec<i32> = keep.iter().map(|&k| k as i32).collect();
        let idx = self.exec().upload_i32(&idx)?;
        Ok(self.head_with(Streams::Ready(x), Some(&idx), &self.weights.hc_head, &self.weights.norm)?.1)
    }

    /// hc head, norm, then the LM head on the rows `keep` (all rows when `None`). Also returns
    /// the ready streams.
    fn head_with(
        &self,
        x: Streams,
        keep: Option<&Tensor>,
        hc: &crate::exec::HcW,
        norm: &Tensor,
    ) -> Result<(Tensor, Vec<f32>)> {
        let e = self.exec();
        let (x, h) = self.head_input(x, keep, hc, norm)?;
        Ok((x, e.download_f32(&e.linear(&h, &self.weights.head)?)?))
    }

    /// The ready streams, and the LM head's input: hc head and norm of the streams `x`, on the
    /// rows `keep` (all when `None`).
    fn head_input(
        &self,
        x: Streams,
        keep: Option<&Tensor>,
        hc: &crate::exec::HcW,
        norm: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let e = self.exec();
        let (x, h) = e.hc_head(x, hc, norm, self.hc_params())?;
        match keep {
            Some(idx) => Ok((x, e.gather_rows(&h, idx)?)),
            None => Ok((x, h)),
        }
    }

    /// The main model's logits of every row of `rows` into `logits [rows, vocab]` (f32, made
    /// by the caller): [`Model::trunk`] and the head, issuing only `alloc` and `run`.
    pub(crate) fn logits_into(&self, cache: &mut KvCache, rows: &Rows, logits: &mut Tensor) -> Result<()> {
        let (x, _) = self.trunk(cache, rows, false)?;
        let (_, h) = self.head_input(x, None, &self.weights.hc_head, &self.weights.norm)?;
        self.exec().linear_into(&h, &self.weights.head, logits)
    }

    /// MTP block `k` on the main model's final streams `x` with input `ids` (one per row):
    /// `e_proj(enorm(embed(ids)))` broadcast over the streams `+ h_proj(hnorm(x))`, the block,
    /// then its own hc head and norm and the shared LM head (spec §3.10). Logits for every row.
    pub fn mtp(
        &self,
        k: usize,
        cache: &mut KvCache,
        rows: &Rows,
        x: Tensor,
        ids: &[u32],
        decisions: bool,
    ) -> Result<(Vec<f32>, Option<LayerDecisions>)> {
        let ids = self.upload_ids(ids, rows.n, "MTP")?;
        self.mtp_with(k, cache, rows, x, &ids, decisions)
    }

    fn mtp_with(
        &self,
        k: usize,
        cache: &mut KvCache,
        rows: &Rows,
        x: Tensor,
        ids: &Tensor,
        decisions: bool,
    ) -> Result<(Vec<f32>, Option<LayerDecisions>)> {
        let (c, e) = (&self.cfg, self.exec());
        let w =
            self.weights.mtp.get(k).ok_or_else(|| ModelError::Request(format!("this model has no MTP block {k}")))?;
        let (r, m, d) = (rows.n, c.hc_mult, c.dim);
        let emb = e.rms_norm(&e.embed(ids, &self.weights.embed)?, Some(&w.enorm), c.norm_eps)?;
        let ep = e.linear(&emb, &w.e_proj)?;
        let h = e.rms_norm(&x.reshape(vec![r * m, d]), Some(&w.hnorm), c.norm_eps)?;
        let hp = e.linear(&h, &w.h_proj)?;
        let x0 = e.add(&hp, &ep)?.reshape(vec![r, m, d]);
        let (x1, dec) = self.block_with(&w.block, &mut cache.mtp[k], rows, ids, Streams::Ready(x0), decisions)?;
        Ok((self.head_with(x1, None, &w.hc_head, &w.norm)?.1, dec))
    }
}
