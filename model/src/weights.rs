//! The model's weights, uploaded once to a backend in the formats its ops take.
//!
//! Kept in checkpoint formats: FP8 linears as e4m3 + e8m0 blocks, routed experts as packed FP4
//! (stacked per layer so a device backend sees one buffer), bf16 compressor/indexer/head
//! weights, and `wo_a` FP8 where the backend runs an FP8 `GroupedLinear`. Converted on load, as
//! the reference does: `wo_a` FP8 → f32 elsewhere (exact, convert.py), norm weights and the gate
//! weight bf16 → f32, `tid2eid` i64 → i32.
//!
//! After uploading, every FP8/FP4 linear and every layer's routed experts go through
//! [`Backend::prepare`] once, so that a backend may convert them for its chip at load (the
//! Ascend backend makes exact BF16 copies on 910B/910C, which have no FP8/FP4 compute);
//! [`Weights::prepared`] sums up what the backend did.

use std::cell::RefCell;

use hal::backend::Prepared;
use hal::backend::Support;
use hal::ops::{GroupedLinear, Linear, MoeExperts, WeightFormat};
use hal::{Backend, DType, Op, Tensor};

use crate::checkpoint::Checkpoint;
use crate::config::{ExpertFormat, ModelConfig};
use crate::error::{LoadError, ModelError};
use crate::exec::{CompressorW, ExpertsW, HcW, LinearW};

type Result<T> = std::result::Result<T, ModelError>;

/// One attention sub-layer.
pub struct AttentionW {
    pub ratio: usize,
    pub sink: Tensor,
    pub wq_a: LinearW,
    pub q_norm: Tensor,
    pub wq_b: LinearW,
    pub wkv: LinearW,
    pub kv_norm: Tensor,
    /// `wo_a`, one `[o_lora, H·head_dim/G]` block per group, stacked: FP8 blocks, or f32
    /// dequantized at load where the backend has no FP8 `GroupedLinear`.
    pub wo_a: LinearW,
    pub wo_b: LinearW,
    pub compressor: Option<CompressorW>,
    pub indexer: Option<IndexerW>,
    /// RoPE frequencies of this layer (θ and YaRN depend on `ratio`).
    pub freqs: Tensor,
}

/// The lightning indexer of a CSA layer.
pub struct IndexerW {
    pub wq_b: LinearW,
    pub weights_proj: LinearW,
    pub compressor: CompressorW,
}

/// Gate of one MoE layer: scored (bias) or hashed (token-id table).
pub enum GateRoute {
    Bias(Tensor),
    Hash(Tensor),
}

/// One MoE sub-layer.
pub struct MoeW {
    pub gate_w: Tensor,
    pub route: GateRoute,
    pub experts: ExpertsW,
    pub shared_w1: LinearW,
    pub shared_w3: LinearW,
    pub shared_w2: LinearW,
}

/// One transformer block (`layers.{i}` or `mtp.{k}`).
pub struct BlockW {
    pub attn_norm: Tensor,
    pub ffn_norm: Tensor,
    pub hc_attn: HcW,
    pub hc_ffn: HcW,
    pub attn: AttentionW,
    pub moe: MoeW,
}

/// The MTP head around its block.
pub struct MtpW {
    pub block: BlockW,
    pub e_proj: LinearW,
    pub h_proj: LinearW,
    pub enorm: Tensor,
    pub hnorm: Tensor,
    pub norm: Tensor,
    pub hc_head: HcW,
}

/// Every weight of the model.
pub struct Weights {
    pub embed: Tensor,
    pub head: LinearW,
    pub norm: Tensor,
    pub hc_head: HcW,
    pub blocks: Vec<BlockW>,
    pub mtp: Vec<MtpW>,
    /// What the backend's load-time `prepare` did with the FP8/FP4 weights, summed.
    pub prepared: Prepared,
}

/// Reads tensors from a checkpoint and uploads them.
struct Loader<'a> {
    ck: &'a Checkpoint,
    cfg: &'a ModelConfig,
    b: &'a dyn Backend,
    prepared: RefCell<Prepared>,
}

impl Loader<'_> {
    fn raw(&self, name: &str, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let bytes = self.ck.get(name, dtype, shape)?;
        Ok(self.b.upload(shape, dtype, bytes)?)
    }

    /// A float tensor converted to f32 (norm weights, gate weight, hc/ape/sink parameters).
    fn f32(&self, name: &str, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let values = hal::dtype::decode_to_f32(dtype, self.ck.get(name, dtype, shape)?);
        Ok(self.b.upload(shape, DType::F32, &hal::dtype::f32_bytes(&values))?)
    }

    /// Offers `op`'s weights (`Some` in `weights`) to the backend's load-time `prepare`; a
    /// failure is a load error naming `tensor`.
    fn prepare(&self, tensor: &str, op: Op, weights: &[Option<&Tensor>]) -> Result<()> {
        let done = self.b.prepare(&op, weights).map_err(|e| LoadError::Tensor {
            file: self.ck.source_of(tensor),
            tensor: tensor.to_string(),
            message: format!("preparing it for the {} backend: {e}", self.b.info().name),
        })?;
        self.prepared.borrow_mut().absorb(done);
        Ok(())
    }

    fn norm(&self, prefix: &str, dim: usize) -> Result<Tensor> {
        self.f32(&format!("{prefix}.weight"), DType::BF16, &[dim])
    }

    fn linear(&self, prefix: &str, format: WeightFormat, out: usize, inp: usize) -> Result<LinearW> {
        let w = self.linear_unprepared(prefix, format, out, inp)?;
        if format.quantizes_input() {
            let op = Op::Linear(Linear { rows: 0, in_features: inp, out_features: out, format });
            self.prepare(&format!("{prefix}.weight"), op, &[None, Some(&w.weight), w.scale.as_ref()])?;
        }
        Ok(w)
    }

    /// The weight (and scale) of `prefix` uploaded in `format`, not offered to `prepare`.
    fn linear_unprepared(&self, prefix: &str, format: WeightFormat, out: usize, inp: usize) -> Result<LinearW> {
        let specs = format.weight_specs(out, inp);
        let weight_spec = &specs[0];
        let stored = if weight_spec.dtype == DType::F4E2M1x2 { DType::I8 } else { weight_spec.dtype };
        let weight = self.raw(&format!("{prefix}.weight"), stored, &weight_spec.shape)?.with_dtype(weight_spec.dtype);
        let scale = match specs.get(1) {
            Some(s) => Some(self.raw(&format!("{prefix}.scale"), s.dtype, &s.shape)?),
            None => None,
        };
        Ok(LinearW { format, out, inp, weight, scale })
    }

    fn hc(&self, prefix: &str, site: &str, mix: usize) -> Result<HcW> {
        let width = self.cfg.hc_mult * self.cfg.dim;
        Ok(HcW {
            fn_: self.f32(&format!("{prefix}hc_{site}_fn"), DType::F32, &[mix, width])?,
            base: self.f32(&format!("{prefix}hc_{site}_base"), DType::F32, &[mix])?,
            scale: self.f32(&format!("{prefix}hc_{site}_scale"), DType::F32, &[if site == "head" { 1 } else { 3 }])?,
        })
    }

    fn compressor(&self, prefix: &str, ratio: usize, width: usize) -> Result<CompressorW> {
        let coff = if ratio == 4 { 2 } else { 1 };
        let d = self.cfg.dim;
        Ok(CompressorW {
            wkv: self.linear(&format!("{prefix}.wkv"), WeightFormat::Bf16, coff * width, d)?,
            wgate: self.linear(&format!("{prefix}.wgate"), WeightFormat::Bf16, coff * width, d)?,
            ape: self.f32(&format!("{prefix}.ape"), DType::F32, &[ratio, coff * width])?,
            norm: self.norm(&format!("{prefix}.norm"), width)?,
        })
    }

    /// `wo_a` is stored FP8; the reference runs it as a plain einsum over dequantized values
    /// (no activation quantization), which is what `GroupedLinear` computes in any format. It
    /// stays FP8 where the backend runs an FP8 `GroupedLinear` (a quarter of the f32 bytes per
    /// decode step), and is dequantized to f32 once here otherwise (exact either way).
    fn wo_a(&self, prefix: &str) -> Result<LinearW> {
        let c = self.cfg;
        let (out, inp) = (c.o_groups * c.o_lora_rank, c.n_heads * c.head_dim / c.o_groups);
        let fp8 = WeightFormat::Fp8Block128;
        let op = Op::GroupedLinear(GroupedLinear {
            rows: 1,
            groups: c.o_groups,
            in_per_group: inp,
            out_per_group: c.o_lora_rank,
            format: fp8,
        });
        if self.b.supports(&op) == Support::Yes {
            let w = self.linear_unprepared(prefix, fp8, out, inp)?;
            self.prepare(&format!("{prefix}.weight"), op, &[None, Some(&w.weight), w.scale.as_ref()])?;
            return Ok(w);
        }
        let name = format!("{prefix}.weight");
        let q = self.ck.get(&name, DType::F8E4M3, &[out, inp])?;
        let sname = format!("{prefix}.scale");
        let s = self.ck.get(&sname, DType::F8E8M0, &[out.div_ceil(128), inp.div_ceil(128)])?;
        let cols = inp.div_ceil(128);
        let values: Vec<f32> = (0..out * inp)
            .map(|k| {
                let (o, i) = (k / inp, k % inp);
                hal::dtype::e4m3_to_f32(q[k]) * hal::dtype::e8m0_to_f32(s[(o / 128) * cols + i / 128])
            })
            .collect();
        let weight = self.b.upload(&[out, inp], DType::F32, &hal::dtype::f32_bytes(&values))?;
        Ok(LinearW { format: WeightFormat::F32, out, inp, weight, scale: None })
    }

    fn attention(&self, prefix: &str, ratio: usize) -> Result<AttentionW> {
        let c = self.cfg;
        let fp8 = WeightFormat::Fp8Block128;
        let hd = c.head_dim;
        let compressor =
            if ratio > 0 { Some(self.compressor(&format!("{prefix}.compressor"), ratio, hd)?) } else { None };
        let indexer = if ratio == 4 {
            let ip = format!("{prefix}.indexer");
            Some(IndexerW {
                wq_b: self.linear(&format!("{ip}.wq_b"), fp8, c.index_n_heads * c.index_head_dim, c.q_lora_rank)?,
                weights_proj: self.linear(&format!("{ip}.weights_proj"), WeightFormat::Bf16, c.index_n_heads, c.dim)?,
                compressor: self.compressor(&format!("{ip}.compressor"), ratio, c.index_head_dim)?,
            })
        } else {
            None
        };
        let freqs = crate::rope::layer_freqs(c, ratio);
        Ok(AttentionW {
            ratio,
            sink: self.f32(&format!("{prefix}.attn_sink"), DType::F32, &[c.n_heads])?,
            wq_a: self.linear(&format!("{prefix}.wq_a"), fp8, c.q_lora_rank, c.dim)?,
            q_norm: self.norm(&format!("{prefix}.q_norm"), c.q_lora_rank)?,
            wq_b: self.linear(&format!("{prefix}.wq_b"), fp8, c.n_heads * hd, c.q_lora_rank)?,
            wkv: self.linear(&format!("{prefix}.wkv"), fp8, hd, c.dim)?,
            kv_norm: self.norm(&format!("{prefix}.kv_norm"), hd)?,
            wo_a: self.wo_a(&format!("{prefix}.wo_a"))?,
            wo_b: self.linear(&format!("{prefix}.wo_b"), fp8, c.dim, c.o_groups * c.o_lora_rank)?,
            compressor,
            indexer,
            freqs: self.b.upload(&[freqs.len()], DType::F32, &hal::dtype::f32_bytes(&freqs))?,
        })
    }

    /// Routed experts of one layer, stacked into `[E, ...]` tensors.
    fn experts(&self, prefix: &str) -> Result<ExpertsW> {
        let c = self.cfg;
        let format = match c.expert_format {
            ExpertFormat::Fp4 => WeightFormat::Fp4Group32,
            ExpertFormat::Fp8 => WeightFormat::Fp8Block128,
        };
        let mut tensors = Vec::new();
        for (w, out, inp) in
            [("w1", c.moe_inter_dim, c.dim), ("w3", c.moe_inter_dim, c.dim), ("w2", c.dim, c.moe_inter_dim)]
        {
            for (k, spec) in format.weight_specs(out, inp).into_iter().enumerate() {
                let suffix = if k == 0 { "weight" } else { "scale" };
                let stored = if spec.dtype == DType::F4E2M1x2 { DType::I8 } else { spec.dtype };
                let mut bytes = Vec::new();
                for e in 0..c.n_routed_experts {
                    bytes.extend_from_slice(self.ck.get(
                        &format!("{prefix}.experts.{e}.{w}.{suffix}"),
                        stored,
                        &spec.shape,
                    )?);
                }
                let mut shape = vec![c.n_routed_experts];
                shape.extend(&spec.shape);
                tensors.push(self.b.upload(&shape, spec.dtype, &bytes)?);
            }
        }
        let op = MoeExperts {
            rows: 0,
            dim: c.dim,
            inter: c.moe_inter_dim,
            experts: c.n_routed_experts,
            topk: c.n_activated_experts,
            swiglu_limit: c.swiglu_limit,
            format,
        };
        let mut weights: Vec<Option<&Tensor>> = vec![None; 3];
        weights.extend(tensors.iter().map(Some));
        self.prepare(&format!("{prefix}.experts"), Op::MoeExperts(op), &weights)?;
        Ok(ExpertsW { format, tensors })
    }

    fn moe(&self, prefix: &str, hashed: bool) -> Result<MoeW> {
        let c = self.cfg;
        let fp8 = WeightFormat::Fp8Block128;
        let route = if hashed {
            let name = format!("{prefix}.gate.tid2eid");
            let shape = [c.vocab_size, c.n_activated_experts];
            let ids = self.ck.get(&name, DType::I64, &shape)?;
            let mut table = Vec::with_capacity(ids.len() / 8);
            for chunk in ids.chunks_exact(8) {
                let e = i64::from_le_bytes(chunk.try_into().expect("8 bytes"));
                if e < 0 || e as usize >= c.n_routed_experts {
                    return Err(LoadError::Tensor {
                        file: self.ck.source_of(&name),
                        tensor: name.clone(),
                        message: format!("expert id {e} outside [0, {})", c.n_routed_experts),
                    }
                    .into());
                }
                table.push(e as i32);
            }
            GateRoute::Hash(self.b.upload(&shape, DType::I32, &hal::dtype::i32_bytes(&table))?)
        } else {
            GateRoute::Bias(self.f32(&format!("{prefix}.gate.bias"), DType::F32, &[c.n_routed_experts])?)
        };
        Ok(MoeW {
            gate_w: self.f32(&format!("{prefix}.gate.weight"), DType::BF16, &[c.n_routed_experts, c.dim])?,
            route,
            experts: self.experts(prefix)?,
            shared_w1: self.linear(&format!("{prefix}.shared_experts.w1"), fp8, c.moe_inter_dim, c.dim)?,
            shared_w3: self.linear(&format!("{prefix}.shared_experts.w3"), fp8, c.moe_inter_dim, c.dim)?,
            shared_w2: self.linear(&format!("{prefix}.shared_experts.w2"), fp8, c.dim, c.moe_inter_dim)?,
        })
    }

    fn block(&self, prefix: &str, ratio: usize, hashed: bool) -> Result<BlockW> {
        let c = self.cfg;
        let mix = (2 + c.hc_mult) * c.hc_mult;
        Ok(BlockW {
            attn_norm: self.norm(&format!("{prefix}attn_norm"), c.dim)?,
            ffn_norm: self.norm(&format!("{prefix}ffn_norm"), c.dim)?,
            hc_attn: self.hc(prefix, "attn", mix)?,
            hc_ffn: self.hc(prefix, "ffn", mix)?,
            attn: self.attention(&format!("{prefix}attn"), ratio)?,
            moe: self.moe(&format!("{prefix}ffn"), hashed)?,
        })
    }
}

impl Weights {
    /// Uploads every weight of `cfg` from `ck` (which the caller validated) to `b`.
    pub fn load(cfg: &ModelConfig, ck: &Checkpoint, b: &dyn Backend) -> Result<Weights> {
        let l = Loader { ck, cfg, b, prepared: RefCell::new(Prepared::default()) };
        let (v, d, m) = (cfg.vocab_size, cfg.dim, cfg.hc_mult);
        let blocks = (0..cfg.n_layers)
            .map(|i| l.block(&format!("layers.{i}."), cfg.layer_ratio(i), cfg.is_hash_layer(i)))
            .collect::<Result<Vec<_>>>()?;
        let mtp = (0..cfg.n_mtp_layers)
            .map(|k| {
                let p = format!("mtp.{k}.");
                Ok(MtpW {
                    block: l.block(&p, cfg.layer_ratio(cfg.n_layers + k), false)?,
                    e_proj: l.linear(&format!("{p}e_proj"), WeightFormat::Fp8Block128, d, d)?,
                    h_proj: l.linear(&format!("{p}h_proj"), WeightFormat::Fp8Block128, d, d)?,
                    enorm: l.norm(&format!("{p}enorm"), d)?,
                    hnorm: l.norm(&format!("{p}hnorm"), d)?,
                    norm: l.norm(&format!("{p}norm"), d)?,
                    hc_head: l.hc(&p, "head", m)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Weights {
            embed: l.raw("embed.weight", DType::BF16, &[v, d])?,
            head: l.linear("head", WeightFormat::Bf16, v, d)?,
            norm: l.norm("norm", d)?,
            hc_head: l.hc("", "head", m)?,
            blocks,
            mtp,
            prepared: l.prepared.into_inner(),
        })
    }
}
