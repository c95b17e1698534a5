//! Issuing HAL ops from the model: one small method per op, so that the forward pass reads as
//! the spec's equations and every allocation/validation detail lives in one place.

use hal::ops::attention::CompressedKv;
use hal::ops::{self, Op, QuantFormat, WeightFormat};
use hal::{Backend, DType, Tensor};

use crate::cache::CompressorCache;
use crate::error::ModelError;

type Result<T> = std::result::Result<T, ModelError>;

/// A weight matrix in its checkpoint format, resident on the backend.
pub struct LinearW {
    pub format: WeightFormat,
    pub out: usize,
    pub inp: usize,
    pub weight: Tensor,
    pub scale: Option<Tensor>,
}

impl LinearW {
    fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        std::iter::once(&self.weight).chain(self.scale.as_ref())
    }
}

/// The per-row metadata of one forward call, resident on the backend.
pub struct Rows {
    pub n: usize,
    pub slots: Tensor,
    pub positions: Tensor,
    pub ids: Tensor,
}

/// The residual streams `[rows, hc_mult, dim]` between sub-layers: ready, or the last
/// sub-layer's output `f` with its HcPost (of `x`, `post`, `comb`) still to apply. The next mHC
/// op applies it on the way in (HAL `HcPre` step 0), which saves a backend a kernel per
/// sub-layer; [`Exec::settle`] applies it alone.
pub enum Streams {
    Ready(Tensor),
    AfterPost { f: Tensor, x: Tensor, post: Tensor, comb: Tensor },
}

impl Streams {
    /// `(rows, hc_mult, dim)`.
    pub fn shape(&self) -> (usize, usize, usize) {
        let x = match self {
            Streams::Ready(x) | Streams::AfterPost { x, .. } => x,
        };
        (x.shape()[0], x.shape()[1], x.shape()[2])
    }

    fn after_post(&self) -> bool {
        matches!(self, Streams::AfterPost { .. })
    }
}

/// The backend plus shorthands that allocate outputs and issue one op each.
pub struct Exec<'a> {
    pub b: &'a dyn Backend,
}

impl<'a> Exec<'a> {
    fn run(&self, op: Op, inputs: &[&Tensor], outputs: &mut [&mut Tensor]) -> Result<()> {
        Ok(self.b.run(&op, inputs, outputs)?)
    }
    fn new_f32(&self, shape: &[usize]) -> Result<Tensor> {
        Ok(self.b.alloc(shape, DType::F32)?)
    }

    /// The results of `first` and `second`, two independent op sequences that the backend may
    /// run side by side ([`Backend::concurrently`]: neither may write what the other reads or
    /// writes, and both issue only ops). The first error, in that order, is returned.
    pub fn concurrently<A, B>(
        &self,
        first: impl FnOnce() -> Result<A>,
        second: impl FnOnce() -> Result<B>,
    ) -> Result<(A, B)> {
        let (mut first, mut second) = (Some(first), Some(second));
        let (mut a, mut b) = (None, None);
        // A model error inside a closure stops that closure's ops and is returned below.
        self.b.concurrently(
            &mut || {
                a = first.take().map(|f| f());
                Ok(())
            },
            &mut || {
                b = second.take().map(|f| f());
                Ok(())
            },
        )?;
        let missing = || ModelError::Request("Backend::concurrently ran a sequence other than once".into());
        let a = a.ok_or_else(missing)??;
        let b = b.ok_or_else(missing)??;
        Ok((a, b))
    }

    pub fn rows(&self, slots: &[i32], positions: &[i32], ids: &[i32]) -> Result<Rows> {
        let n = slots.len();
        Ok(Rows {
            n,
            slots: self.b.upload(&[n], DType::I32, &hal::dtype::i32_bytes(slots))?,
            positions: self.b.upload(&[n], DType::I32, &hal::dtype::i32_bytes(positions))?,
            ids: self.b.upload(&[n], DType::I32, &hal::dtype::i32_bytes(ids))?,
        })
    }

    pub fn embed(&self, ids: &Tensor, table: &Tensor) -> Result<Tensor> {
        let (vocab, dim) = (table.shape()[0], table.shape()[1]);
        let rows = ids.numel();
        let mut out = self.new_f32(&[rows, dim])?;
        let op = ops::Embed { rows, vocab, dim, table_dtype: table.dtype() };
        self.run(Op::Embed(op), &[ids, table], &mut [&mut out])?;
        Ok(out)
    }

    pub fn hc_expand(&self, x: &Tensor, mult: usize) -> Result<Tensor> {
        let (rows, dim) = (x.shape()[0], x.shape()[1]);
        let mut out = self.new_f32(&[rows, mult, dim])?;
        self.run(Op::HcExpand(ops::HcExpand { rows, mult, dim }), &[x], &mut [&mut out])?;
        Ok(out)
    }

    /// `a [rows, w] + b [b_rows, w]`, `b`'s rows broadcast over consecutive groups of `a`'s rows.
    pub fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (rows, width, b_rows) = (a.shape()[0], a.shape()[1], b.shape()[0]);
        let mut out = self.new_f32(&[rows, width])?;
        self.run(Op::Add(ops::Add { rows, b_rows, width }), &[a, b], &mut [&mut out])?;
        Ok(out)
    }

    /// The ready streams, the sub-layer input `norm ⊙ RMSNorm(Σ pre_i·X_i)`, `post` and `comb`
    /// of the streams `s` (HAL `HcPre`, which applies a pending HcPost on the way in).
    pub fn hc_pre(
        &self,
        s: Streams,
        w: &HcW,
        norm: &Tensor,
        cfg: HcParams,
    ) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let (rows, mult, dim) = s.shape();
        let op = ops::HcPre {
            rows,
            mult,
            dim,
            sinkhorn_iters: cfg.sinkhorn_iters,
            hc_eps: cfg.hc_eps,
            norm_eps: cfg.norm_eps,
            after_post: s.after_post(),
        };
        let mut y = self.new_f32(&[rows, dim])?;
        let mut post = self.new_f32(&[rows, mult])?;
        let mut comb = self.new_f32(&[rows, mult, mult])?;
        let x = self.mhc(Op::HcPre(op), s, &[&w.fn_, &w.base, &w.scale, norm], vec![&mut y, &mut post, &mut comb])?;
        Ok((x, y, post, comb))
    }

    /// Runs an mHC op on the streams `s` (with a pending HcPost, its inputs first and its output
    /// first), then `weights`, into `outs`; returns the ready streams.
    fn mhc(&self, op: Op, s: Streams, weights: &[&Tensor], outs: Vec<&mut Tensor>) -> Result<Tensor> {
        match s {
            Streams::Ready(x) => {
                let ins: Vec<&Tensor> = std::iter::once(&x).chain(weights.iter().copied()).collect();
                let mut outs = outs;
                self.run(op, &ins, &mut outs)?;
                Ok(x)
            }
            Streams::AfterPost { f, x: x_prev, post, comb } => {
                let mut x = self.new_f32(x_prev.shape())?;
                let ins: Vec<&Tensor> =
                    [&f, &x_prev, &post, &comb].into_iter().chain(weights.iter().copied()).collect();
                let mut all: Vec<&mut Tensor> = std::iter::once(&mut x).chain(outs).collect();
                self.run(op, &ins, &mut all)?;
                Ok(x)
            }
        }
    }

    /// `s` as ready streams: a pending HcPost applied on its own (where no mHC op follows).
    pub fn settle(&self, s: Streams) -> Result<Tensor> {
        match s {
            Streams::Ready(x) => Ok(x),
            Streams::AfterPost { f, x, post, comb } => self.hc_post(&f, &x, &post, &comb),
        }
    }

    pub fn hc_post(&self, f: &Tensor, x: &Tensor, post: &Tensor, comb: &Tensor) -> Result<Tensor> {
        let (rows, mult, dim) = (x.shape()[0], x.shape()[1], x.shape()[2]);
        let mut out = self.new_f32(&[rows, mult, dim])?;
        self.run(Op::HcPost(ops::HcPost { rows, mult, dim }), &[f, x, post, comb], &mut [&mut out])?;
        Ok(out)
    }

    /// The ready streams, and `s` merged and normed with the output `norm`: the LM head's input.
    pub fn hc_head(&self, s: Streams, w: &HcW, norm: &Tensor, cfg: HcParams) -> Result<(Tensor, Tensor)> {
        let (rows, mult, dim) = s.shape();
        let mut y = self.new_f32(&[rows, dim])?;
        let op =
            ops::HcHead { rows, mult, dim, hc_eps: cfg.hc_eps, norm_eps: cfg.norm_eps, after_post: s.after_post() };
        let x = self.mhc(Op::HcHead(op), s, &[&w.fn_, &w.base, &w.scale, norm], vec![&mut y])?;
        Ok((x, y))
    }

    /// RMSNorm of the rows of `x [rows, dim]`; `weight = None` is the weight-less rescale.
    pub fn rms_norm(&self, x: &Tensor, weight: Option<&Tensor>, eps: f32) -> Result<Tensor> {
        self.rms_norm_with(x, weight, eps, None)
    }

    /// [`Exec::rms_norm`], then RoPE at `positions` (one per `rope.heads` rows) with `freqs`, and
    /// with `rope.fp8_nope` the FP8 simulation of the values before the RoPE dims.
    pub fn rms_norm_rope(
        &self,
        x: &Tensor,
        weight: Option<&Tensor>,
        eps: f32,
        rope: ops::NormRope,
        freqs: &Tensor,
        positions: &Tensor,
    ) -> Result<Tensor> {
        self.rms_norm_with(x, weight, eps, Some((rope, freqs, positions)))
    }

    fn rms_norm_with(
        &self,
        x: &Tensor,
        weight: Option<&Tensor>,
        eps: f32,
        rope: Option<(ops::NormRope, &Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        let (rows, dim) = (x.shape()[0], x.shape()[1]);
        let op = ops::RmsNorm { rows, dim, eps, weighted: weight.is_some(), rope: rope.map(|r| r.0) };
        let mut out = self.new_f32(&[rows, dim])?;
        let mut inputs = vec![x];
        inputs.extend(weight);
        if let Some((_, freqs, positions)) = rope {
            inputs.extend([freqs, positions]);
        }
        self.run(Op::RmsNorm(op), &inputs, &mut [&mut out])?;
        Ok(out)
    }

    pub fn linear(&self, x: &Tensor, w: &LinearW) -> Result<Tensor> {
        let mut y = self.new_f32(&[x.shape()[0], w.out])?;
        self.linear_into(x, w, &mut y)?;
        Ok(y)
    }

    /// [`Exec::linear`] into an existing `y [rows, out]`.
    pub fn linear_into(&self, x: &Tensor, w: &LinearW, y: &mut Tensor) -> Result<()> {
        let rows = x.shape()[0];
        let op = ops::Linear { rows, in_features: w.inp, out_features: w.out, format: w.format };
        let mut inputs = vec![x];
        inputs.extend(w.tensors());
        self.run(Op::Linear(op), &inputs, &mut [y])
    }

    pub fn grouped_linear(&self, x: &Tensor, w: &LinearW, groups: usize) -> Result<Tensor> {
        let in_per_group = w.inp;
        let rows = x.shape()[0];
        let out_per_group = w.out / groups;
        let op = ops::GroupedLinear { rows, groups, in_per_group, out_per_group, format: w.format };
        let mut y = self.new_f32(&[rows, w.out])?;
        let mut inputs = vec![x];
        inputs.extend(w.tensors());
        self.run(Op::GroupedLinear(op), &inputs, &mut [&mut y])?;
        Ok(y)
    }

    /// RoPE in place on `x [rows, heads, head_dim]`.
    pub fn rope(&self, x: &mut Tensor, freqs: &Tensor, positions: &Tensor, inverse: bool) -> Result<()> {
        let (rows, heads, head_dim) = (x.shape()[0], x.shape()[1], x.shape()[2]);
        let op = ops::Rope { rows, heads, head_dim, rope_dim: freqs.numel() * 2, inverse };
        self.run(Op::Rope(op), &[freqs, positions], &mut [x])
    }

    /// Quantize-dequantize simulation in place on the first `quant_dims` of each row of `x [rows, dim]`.
    pub fn quant_sim(&self, x: &mut Tensor, quant_dims: usize, block: usize, format: QuantFormat) -> Result<()> {
        let (rows, dim) = (x.shape()[0], x.shape()[1]);
        let op = ops::QuantSim { rows, dim, quant_dims, block, format };
        self.run(Op::QuantSim(op), &[], &mut [x])
    }

    /// Hadamard rotation in place on each row of `x [rows, dim]`.
    pub fn hadamard(&self, x: &mut Tensor) -> Result<()> {
        let (rows, dim) = (x.shape()[0], x.shape()[1]);
        self.run(Op::Hadamard(ops::Hadamard { rows, dim }), &[], &mut [x])
    }

    pub fn window_store(&self, kv: &Tensor, rows: &Rows, ring: &mut Tensor) -> Result<()> {
        let (slots, window, dim) = (ring.shape()[0], ring.shape()[1], ring.shape()[2]);
        let op = ops::WindowStore { rows: rows.n, slots, window, dim, cache_dtype: ring.dtype() };
        self.run(Op::WindowStore(op), &[kv, &rows.slots, &rows.positions], &mut [ring])
    }

    /// The compressor of `cache` over the normed input `xn` of `rows`: its kv and gate
    /// projections, then the op, which advances the state and writes the entries it finishes.
    pub fn compressor(
        &self,
        xn: &Tensor,
        w: &CompressorW,
        freqs: &Tensor,
        rows: &Rows,
        cache: &mut CompressorCache,
    ) -> Result<()> {
        let (kv, score) = (self.linear(xn, &w.wkv)?, self.linear(xn, &w.wgate)?);
        let spec = ops::Compressor { rows: rows.n, ..cache.spec.clone() };
        let state = &mut cache.state;
        self.run(
            Op::Compressor(spec),
            &[&kv, &score, &w.ape, &w.norm, freqs, &rows.slots, &rows.positions],
            &mut [&mut state.kv, &mut state.score, &mut state.cache],
        )
    }

    /// The selected compressed entries `[rows, topk]` and their scores.
    pub fn indexer_topk(
        &self,
        op: ops::IndexerTopK,
        q: &Tensor,
        w: &Tensor,
        keys: &Tensor,
        rows: &Rows,
    ) -> Result<(Tensor, Tensor)> {
        let mut idx = self.b.alloc(&[rows.n, op.topk], DType::I32)?;
        let mut scores = self.new_f32(&[rows.n, op.topk])?;
        self.run(Op::IndexerTopK(op), &[q, w, keys, &rows.slots, &rows.positions], &mut [&mut idx, &mut scores])?;
        Ok((idx, scores))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn sparse_attention(
        &self,
        op: ops::SparseAttention,
        q: &Tensor,
        kv: &Tensor,
        ring: &Tensor,
        sink: &Tensor,
        rows: &Rows,
        compressed: Option<&Tensor>,
        indices: Option<&Tensor>,
    ) -> Result<Tensor> {
        let mut o = self.new_f32(q.shape())?;
        let mut inputs = vec![q, kv, ring, sink, &rows.slots, &rows.positions];
        match op.compressed {
            CompressedKv::None => {}
            CompressedKv::All { .. } => inputs.extend(compressed),
            CompressedKv::Selected { .. } => {
                inputs.extend(compressed);
                inputs.extend(indices);
            }
        }
        self.run(Op::SparseAttention(op), &inputs, &mut [&mut o])?;
        Ok(o)
    }

    pub fn moe_gate(
        &self,
        op: ops::MoeGate,
        x: &Tensor,
        gate_w: &Tensor,
        route: &Tensor,
        ids: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let mut experts = self.b.alloc(&[op.rows, op.topk], DType::I32)?;
        let mut weights = self.new_f32(&[op.rows, op.topk])?;
        let inputs: Vec<&Tensor> = match op.mode {
            ops::GateMode::Scored => vec![x, gate_w, route],
            ops::GateMode::Hashed { .. } => vec![x, gate_w, route, ids],
        };
        self.run(Op::MoeGate(op), &inputs, &mut [&mut experts, &mut weights])?;
        Ok((experts, weights))
    }

    pub fn moe_experts(
        &self,
        op: ops::MoeExperts,
        x: &Tensor,
        experts: &Tensor,
        weights: &Tensor,
        w: &ExpertsW,
    ) -> Result<Tensor> {
        let mut y = self.new_f32(&[op.rows, op.dim])?;
        let mut inputs = vec![x, experts, weights];
        inputs.extend(w.tensors.iter());
        self.run(Op::MoeExperts(op), &inputs, &mut [&mut y])?;
        Ok(y)
    }

    pub fn swiglu(&self, g: &Tensor, u: &Tensor, limit: f32) -> Result<Tensor> {
        let (rows, width) = (g.shape()[0], g.shape()[1]);
        let mut h = self.new_f32(&[rows, width])?;
        self.run(Op::SwiGlu(ops::SwiGlu { rows, width, limit }), &[g, u], &mut [&mut h])?;
        Ok(h)
    }

    pub fn download_f32(&self, t: &Tensor) -> Result<Vec<f32>> {
        Ok(hal::dtype::bytes_f32(&self.b.download(t)?))
    }
    pub fn download_i32(&self, t: &Tensor) -> Result<Vec<i32>> {
        Ok(hal::dtype::bytes_i32(&self.b.download(t)?))
    }
}

/// Constants of the mHC ops.
#[derive(Clone, Copy, Debug)]
pub struct HcParams {
    pub sinkhorn_iters: usize,
    pub hc_eps: f32,
    pub norm_eps: f32,
}

/// One mHC site's parameters.
pub struct HcW {
    pub fn_: Tensor,
    pub base: Tensor,
    pub scale: Tensor,
}

/// A compressor's parameters (main KV or indexer keys).
pub struct CompressorW {
    pub wkv: LinearW,
    pub wgate: LinearW,
    pub ape: Tensor,
    pub norm: Tensor,
}

/// A compressor's per-slot state and its output cache.
pub struct CompressorState {
    pub kv: Tensor,
    pub score: Tensor,
    pub cache: Tensor,
}

/// Routed experts stacked per expert: w1, (w1_scale), w3, (w3_scale), w2, (w2_scale); the scales
/// where the format has them.
pub struct ExpertsW {
    pub format: WeightFormat,
    pub tensors: Vec<Tensor>,
}

impl Exec<'_> {
    /// `out[i] = x[idx[i]]` for `x [rows, width]` and row indices `idx [n]` (i32).
    pub fn gather_rows(&self, x: &Tensor, idx: &Tensor) -> Result<Tensor> {
        let (rows, width, out_rows) = (x.shape()[0], x.shape()[1], idx.numel());
        let mut out = self.new_f32(&[out_rows, width])?;
        self.run(Op::GatherRows(ops::GatherRows { rows, width, out_rows }), &[x, idx], &mut [&mut out])?;
        Ok(out)
    }

    pub fn upload_i32(&self, values: &[i32]) -> Result<Tensor> {
        Ok(self.b.upload(&[values.len()], DType::I32, &hal::dtype::i32_bytes(values))?)
    }
}
