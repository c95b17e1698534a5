//! The fused-op vocabulary: every computation the V4 model issues on a backend.
//!
//! Each op is a descriptor struct (sizes and constants, no data) whose doc comment states its
//! exact math, and whose `signature()` lists the tensors it reads and writes, in order. That is
//! the whole contract: `cpu-ref` implements the math literally, other backends must match it
//! within the tolerances of the conformance suite, and the suite builds inputs from signatures.
//!
//! Conventions used by every op:
//! * Activations are f32, row-major. `R` is the number of rows (tokens) in one call.
//! * Rows carry a `slot` (which sequence's cache they use) and a `position` (0-based token index
//!   in that sequence), both `i32 [R]`. Rows of one slot form one contiguous run with consecutive
//!   positions (a prefill chunk, or one decode token); different slots are independent.
//! * Caches are indexed by slot: `[S, ...]` with `S` the number of slots.
//! * KV cache tensors (the window ring, compressed entries, indexer keys) have the dtype named
//!   by the op's `cache_dtype`: [`DType::F32`], or [`DType::BF16`] (what the reference stores:
//!   half the bytes). A store rounds each f32 value to the nearest bf16 (ties to even); a load
//!   widens it exactly. Entries are e4m3/e2m1-simulated before they are stored, so only their
//!   unquantized RoPE dims change. The compressor's running state stays f32 either way.
//! * "act_quant" = the reference's per-row e4m3 quantization of a linear layer's input, see
//!   [`linear::Linear`]. "FP8/FP4 simulation" = quantize then dequantize in place, see
//!   [`quant::QuantSim`].

pub mod attention;
pub mod compressor;
pub mod embed;
pub mod hc;
pub mod indexer;
pub mod linear;
pub mod moe;
pub mod norm;
pub mod quant;
pub mod rope;
pub mod rows;
pub mod sample;

pub use attention::{SparseAttention, WindowStore};
pub use compressor::Compressor;
pub use embed::{Add, Embed, GatherRows, HcExpand};
pub use hc::{hc_weights_at, HcHead, HcPost, HcPre};
pub use indexer::IndexerTopK;
pub use linear::{GroupedLinear, Linear, WeightFormat};
pub use moe::{GateMode, MoeExperts, MoeGate, SwiGlu};
pub use norm::{NormRope, RmsNorm, NORM_FP8_BLOCK};
pub use quant::{Hadamard, QuantFormat, QuantSim};
pub use rope::Rope;
pub use sample::SampleTokens;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Whether `d` can hold a KV cache (see the module conventions): f32 or bf16.
pub fn cache_dtype_supported(d: DType) -> bool {
    matches!(d, DType::F32 | DType::BF16)
}

/// One op descriptor. See each variant's type for its math.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Embed(Embed),
    HcExpand(HcExpand),
    Add(Add),
    GatherRows(GatherRows),
    HcPre(HcPre),
    HcPost(HcPost),
    HcHead(HcHead),
    RmsNorm(RmsNorm),
    Linear(Linear),
    GroupedLinear(GroupedLinear),
    Rope(Rope),
    QuantSim(QuantSim),
    Hadamard(Hadamard),
    WindowStore(WindowStore),
    Compressor(Compressor),
    IndexerTopK(IndexerTopK),
    SparseAttention(SparseAttention),
    MoeGate(MoeGate),
    MoeExperts(MoeExperts),
    SwiGlu(SwiGlu),
    SampleTokens(SampleTokens),
}

/// How an op uses one tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    /// Read, then written (caches, in-place transforms).
    ReadWrite,
}

/// One tensor of an op's signature.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: &'static str,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub access: Access,
}

/// The tensors an op reads (`inputs`) and writes (`outputs`, some of them also read).
#[derive(Clone, Debug, PartialEq)]
pub struct Signature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

pub(crate) fn input(name: &'static str, shape: &[usize], dtype: DType) -> TensorSpec {
    TensorSpec { name, shape: shape.to_vec(), dtype, access: Access::Read }
}
pub(crate) fn output(name: &'static str, shape: &[usize], dtype: DType) -> TensorSpec {
    TensorSpec { name, shape: shape.to_vec(), dtype, access: Access::Write }
}
pub(crate) fn inout(name: &'static str, shape: &[usize], dtype: DType) -> TensorSpec {
    TensorSpec { name, shape: shape.to_vec(), dtype, access: Access::ReadWrite }
}

impl Op {
    /// Short name used in tables and error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Embed(_) => "embed",
            Op::HcExpand(_) => "hc_expand",
            Op::Add(_) => "add",
            Op::GatherRows(_) => "gather_rows",
            Op::HcPre(_) => "hc_pre",
            Op::HcPost(_) => "hc_post",
            Op::HcHead(_) => "hc_head",
            Op::RmsNorm(_) => "rms_norm",
            Op::Linear(_) => "linear",
            Op::GroupedLinear(_) => "grouped_linear",
            Op::Rope(_) => "rope",
            Op::QuantSim(_) => "quant_sim",
            Op::Hadamard(_) => "hadamard",
            Op::WindowStore(_) => "window_store",
            Op::Compressor(_) => "compressor",
            Op::IndexerTopK(_) => "indexer_topk",
            Op::SparseAttention(_) => "sparse_attention",
            Op::MoeGate(_) => "moe_gate",
            Op::MoeExperts(_) => "moe_experts",
            Op::SwiGlu(_) => "swiglu",
            Op::SampleTokens(_) => "sample_tokens",
        }
    }

    /// The KV cache dtype of the ops that read or write the cache; `None` for the others.
    pub fn cache_dtype(&self) -> Option<DType> {
        match self {
            Op::WindowStore(o) => Some(o.cache_dtype),
            Op::SparseAttention(o) => Some(o.cache_dtype),
            Op::Compressor(o) => Some(o.cache_dtype),
            Op::IndexerTopK(o) => Some(o.cache_dtype),
            _ => None,
        }
    }

    /// This op with KV cache dtype `dtype`; `None` for ops that do not touch the cache.
    pub fn with_cache_dtype(&self, dtype: DType) -> Option<Op> {
        let mut op = self.clone();
        match &mut op {
            Op::WindowStore(o) => o.cache_dtype = dtype,
            Op::SparseAttention(o) => o.cache_dtype = dtype,
            Op::Compressor(o) => o.cache_dtype = dtype,
            Op::IndexerTopK(o) => o.cache_dtype = dtype,
            _ => return None,
        }
        Some(op)
    }

    /// Inputs then outputs, with shapes and dtypes, in the order `Backend::run` takes them.
    pub fn signature(&self) -> Signature {
        match self {
            Op::Embed(o) => o.signature(),
            Op::HcExpand(o) => o.signature(),
            Op::Add(o) => o.signature(),
            Op::GatherRows(o) => o.signature(),
            Op::HcPre(o) => o.signature(),
            Op::HcPost(o) => o.signature(),
            Op::HcHead(o) => o.signature(),
            Op::RmsNorm(o) => o.signature(),
            Op::Linear(o) => o.signature(),
            Op::GroupedLinear(o) => o.signature(),
            Op::Rope(o) => o.signature(),
            Op::QuantSim(o) => o.signature(),
            Op::Hadamard(o) => o.signature(),
            Op::WindowStore(o) => o.signature(),
            Op::Compressor(o) => o.signature(),
            Op::IndexerTopK(o) => o.signature(),
            Op::SparseAttention(o) => o.signature(),
            Op::MoeGate(o) => o.signature(),
            Op::MoeExperts(o) => o.signature(),
            Op::SwiGlu(o) => o.signature(),
            Op::SampleTokens(o) => o.signature(),
        }
    }

    /// Checks the op's own constants (divisibility, ranges) before any tensor is looked at.
    pub fn check_params(&self) -> Result<()> {
        let fail = |m: String| Err(Error::invalid(self.name(), m));
        match self {
            Op::Linear(l) => match l.format {
                WeightFormat::Fp8Block128 | WeightFormat::Fp4Group32 if l.in_features % 128 != 0 => {
                    fail(format!("in_features {} must be a multiple of 128 for {:?}", l.in_features, l.format))
                }
                _ => Ok(()),
            },
            Op::MoeExperts(m) if m.dim % 128 != 0 || m.inter % 128 != 0 => {
                fail(format!("dim {} and inter {} must be multiples of 128", m.dim, m.inter))
            }
            Op::RmsNorm(RmsNorm { rows, dim, rope: Some(r), .. })
                if r.heads == 0 || rows % r.heads != 0 || r.rope_dim % 2 != 0 || r.rope_dim > *dim || dim % 2 != 0 =>
            {
                fail(format!(
                    "rope: heads {} must divide rows {rows}; rope_dim {} must be even and ≤ the even dim {dim}",
                    r.heads, r.rope_dim
                ))
            }
            Op::RmsNorm(RmsNorm { dim, rope: Some(r @ NormRope { fp8_nope: true, .. }), .. })
                if (dim - r.rope_dim) % NORM_FP8_BLOCK != 0 =>
            {
                fail(format!(
                    "dim − rope_dim = {} must be a multiple of the {NORM_FP8_BLOCK}-wide FP8 blocks",
                    dim - r.rope_dim
                ))
            }
            Op::Rope(r) if r.rope_dim % 2 != 0 || r.rope_dim > r.head_dim => {
                fail(format!("rope_dim {} must be even and ≤ head_dim {}", r.rope_dim, r.head_dim))
            }
            Op::QuantSim(q) if q.block == 0 || q.quant_dims % q.block != 0 || q.quant_dims > q.dim => {
                fail(format!("quant_dims {} must be a multiple of block {} and ≤ dim {}", q.quant_dims, q.block, q.dim))
            }
            Op::Hadamard(h) if !h.dim.is_power_of_two() => fail(format!("dim {} must be a power of two", h.dim)),
            Op::Compressor(c) if c.ratio == 0 || (c.rotate && !c.width.is_power_of_two()) => {
                fail(format!("ratio {} must be > 0 and a rotated width {} a power of two", c.ratio, c.width))
            }
            Op::GroupedLinear(g) if g.groups == 0 => fail("groups must be > 0".into()),
            Op::GroupedLinear(g) if g.format == WeightFormat::Fp4Group32 && g.in_per_group % 32 != 0 => {
                fail(format!("in_per_group {} must be a multiple of 32 for FP4 weights", g.in_per_group))
            }
            Op::Compressor(c) if c.rope_dim % 2 != 0 || c.rope_dim > c.width => {
                fail(format!("rope_dim {} must be even and ≤ width {}", c.rope_dim, c.width))
            }
            Op::Compressor(c) if !c.rotate && (c.width - c.rope_dim) % 64 != 0 => fail(format!(
                "width − rope_dim = {} must be a multiple of the 64-wide FP8 blocks",
                c.width - c.rope_dim
            )),
            Op::Compressor(c) if c.rotate && c.width % 32 != 0 => {
                fail(format!("rotated width {} must be a multiple of the 32-wide FP4 blocks", c.width))
            }
            Op::SparseAttention(SparseAttention { window: 0, .. }) | Op::WindowStore(WindowStore { window: 0, .. }) => {
                fail("window must be > 0 (each row attends to itself)".into())
            }
            Op::SparseAttention(SparseAttention {
                compressed: attention::CompressedKv::All { ratio: 0, .. }, ..
            })
            | Op::SparseAttention(SparseAttention {
                compressed: attention::CompressedKv::Selected { ratio: 0, .. },
                ..
            }) => fail("compressed ratio must be > 0".into()),
            Op::IndexerTopK(i) if i.ratio == 0 => fail("ratio must be > 0".into()),
            Op::WindowStore(WindowStore { cache_dtype: d, .. })
            | Op::SparseAttention(SparseAttention { cache_dtype: d, .. })
            | Op::Compressor(Compressor { cache_dtype: d, .. })
            | Op::IndexerTopK(IndexerTopK { cache_dtype: d, .. })
                if !cache_dtype_supported(*d) =>
            {
                fail(format!("cache dtype {d} is not a KV cache dtype (f32 or bf16)"))
            }
            Op::Add(a) if (a.b_rows == 0 && a.rows > 0) || (a.b_rows > 0 && a.rows % a.b_rows != 0) => {
                fail(format!("b_rows {} must divide rows {}", a.b_rows, a.rows))
            }
            Op::SwiGlu(g) if g.limit.is_nan() || g.limit < 0.0 => {
                fail(format!("limit {} must be ≥ 0 (0 = no clamp)", g.limit))
            }
            Op::MoeExperts(m) if m.swiglu_limit.is_nan() || m.swiglu_limit < 0.0 => {
                fail(format!("swiglu_limit {} must be ≥ 0 (0 = no clamp)", m.swiglu_limit))
            }
            Op::SampleTokens(t) if !(t.temperature.is_finite() && t.temperature >= 0.0) => {
                fail(format!("temperature {} must be finite and ≥ 0 (0 = greedy)", t.temperature))
            }
            Op::MoeGate(g) if g.topk > g.experts => fail(format!("topk {} exceeds the {} experts", g.topk, g.experts)),
            Op::Embed(e) if !matches!(e.table_dtype, DType::F32 | DType::BF16 | DType::F16) => {
                fail(format!("table dtype {} is not a float type", e.table_dtype))
            }
            _ => Ok(()),
        }
    }

    /// Validates `inputs` / `outputs` against [`Op::signature`]: count, shape and dtype.
    /// Every backend calls this first; the error names the op and the offending tensor.
    pub fn validate(&self, inputs: &[&Tensor], outputs: &[&mut Tensor]) -> Result<()> {
        self.check_params()?;
        let sig = self.signature();
        let check = |kind: &str, specs: &[TensorSpec], got: Vec<(&[usize], DType)>| -> Result<()> {
            if specs.len() != got.len() {
                return Err(Error::invalid(
                    self.name(),
                    format!(
                        "expected {} {kind} tensors ({}), got {}",
                        specs.len(),
                        specs.iter().map(|s| s.name).collect::<Vec<_>>().join(", "),
                        got.len()
                    ),
                ));
            }
            for (spec, (shape, dtype)) in specs.iter().zip(got) {
                if spec.shape != shape || spec.dtype != dtype {
                    return Err(Error::invalid(
                        format!("{} {kind} '{}'", self.name(), spec.name),
                        format!("expected {} {:?}, got {} {:?}", spec.dtype, spec.shape, dtype, shape),
                    ));
                }
            }
            Ok(())
        };
        check("input", &sig.inputs, inputs.iter().map(|t| (t.shape(), t.dtype())).collect())?;
        check("output", &sig.outputs, outputs.iter().map(|t| (t.shape(), t.dtype())).collect())
    }
}
