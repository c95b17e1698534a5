//! # Backend conformance: every op × every backend against the CPU reference
//!
//! Modelled on llama.cpp's `test-backend-ops`, but stricter. [`cases`] draws op descriptors
//! for every [`Op`] kind. Shapes come from proptest strategies with a fixed seed, and the named
//! edge cases and the real V4-Flash / V4-Pro shapes are added to them. Inputs are built from
//! each signature with valid semantics. [`run_suite`] then runs every case on the backend
//! under test and on the reference, and checks five things:
//!
//! * **unwritten outputs**: every write-only output is poisoned on the tested backend before
//!   the run (f32: NaN `0xFFC0DEAD`; i32: `0x7FFFFFFF`). An element still holding the poison
//!   was never written. Read-write outputs (caches, in-place transforms) get the same
//!   plausible pre-fill on both sides instead.
//! * **overruns**: a 1 KiB canary tensor is allocated right before and right after every
//!   output, filled with a pattern, and must be unchanged after the run.
//! * **inputs unchanged**: every input is downloaded after the run and must be bit-identical.
//! * **non-finite values**: NaN anywhere, or ±∞ where the reference is finite, fails.
//! * **values**: each output is compared with the reference by the metric and threshold of the
//!   table below.
//!
//! Nothing is synchronized between the run and the downloads: `download` must wait for the
//! work issued before it (the `Backend` contract), and the poison shows when it does not.
//!
//! ## Thresholds
//!
//! NMSE = Σ(got − ref)² / Σ ref². The reference (cpu-ref) accumulates in f64 and rounds once.
//! A correct backend differs from it only where the op's math leaves freedom: the summation
//! order of f32 accumulations, ≤ 2-ulp `expf`/`cosf`/`sinf`/`rsqrtf`, and FP8 tensor-core
//! accumulation. Any other difference is a bug. The f32-accumulation figures below were
//! measured on random data: naive sequential f32 against f64-rounded-once.
//!
//! | op [variant] · output | metric | threshold | why |
//! |---|---|---|---|
//! | embed, hc_expand, gather_rows, window_store · all | bit-exact | 0 | copies, and bf16/f16 → f32 decodes, which are exact |
//! | add · out | bit-exact | 0 | one correctly rounded IEEE add per element |
//! | quant_sim · x | bit-exact | 0 | the scale is 2^ceil(log2(amax·fl32(1/max))) from the bits, x/s is exact, and RNE onto the e4m3/e2m1 grid is exact. Nothing is left to the implementation |
//! | compressor · state_kv, state_score | bit-exact | 0 | row copies and one f32 add (score + ape) |
//! | swiglu, hc_post, rope · all | NMSE | 1e-12 | a handful of f32 operations per element; with ≤ 2-ulp `expf`/`cosf`/`sinf` that is ≲ 3e-7 relative, NMSE ≲ 1e-13. Fast-math `__cosf` at large positions fails |
//! | hadamard · x | NMSE | 1e-11 | log2(n) f32 butterfly stages, or n-term f32 sums in a matrix form: NMSE ≈ 2e-13 at n = 512 |
//! | rms_norm · y | NMSE | 1e-10 | an f32 sum of squares of ≤ 7168 terms has relative error ≤ 4.3e-6 (9.8e-6 at 28672 terms), halved by the rsqrt: NMSE ≤ 2.5e-11 |
//! | linear [f32, bf16], grouped_linear · y | NMSE | 1e-9 | f32 dot products of ≤ 7168 terms: NMSE 2.3e-12 (7168), 8.4e-12 (28672). The ×100 margin covers small cases whose few outputs nearly cancel. TF32 (≈ 1e-7) and bf16 accumulation fail |
//! | hc_pre, hc_head · all | NMSE | 1e-9 | μ is a 4·dim-term dot (≈ 8e-12 at 4·7168), followed by sigmoid, softmax and Sinkhorn normalizations. All of these are contractive. The merged row's RMSNorm adds at most rms_norm's 2.5e-11 |
//! | sparse_attention · o | NMSE | 1e-10 | 512-term logits, `expf`, and a positive weighted sum of ≤ 1152 keys: ~1e-6 relative |
//! | indexer_topk · scores | NMSE by rank, −∞ padding exact | 1e-9 | 64 heads × 128-term dots, ReLU, then a 64-term sum |
//! | indexer_topk · indices | sets per row, agreement = 1 | swaps within 1e-5·max\|score\| forgiven | exact ties are common (e2m1-grid inputs; ReLU zeros give score 0), and either choice is right. Every index must sit next to its own score, in [0, n), with −1 only as trailing padding |
//! | moe_gate · experts | sets per row, agreement = 1 | swaps within 1e-5 of the biased score forgiven | the harness recomputes the biased scores in f64 to forgive near-ties. The order must be non-increasing in that score. Hashed routing is exact |
//! | moe_gate · weights | NMSE on rows with equal sets, aligned by expert | 1e-10 | sqrt(softplus(dot)) and one normalization |
//! | linear [fp8, fp4] · y | NMSE | 1e-7 | act_quant is fully specified, so identical inputs give identical e4m3 codes and exact products. Only accumulation is left: FP8 tensor cores keep ~14 bits between promotions to f32 (DeepSeek-V3 §3.3.2), NMSE ≲ 1e-8. A missing act_quant gives ≈ 1e-3 (measured 7e-4–1.8e-3), and a scale off by one gives 1 |
//! | moe_experts · y | per-row NMSE ≤ 1e-7; a row may exceed it by ≤ 1/(topk·inter), in at most max(1, rows/4) rows | — | the intermediate h = w·SwiGLU(W1x̃, W3x̃) is computed and then act_quant'ed. A 1e-7 difference in h can cross an e4m3 rounding boundary and flip one code by one step (≤ 1/8 of that element), which moves that row's NMSE by ≤ ~0.25/(topk·inter). This is legitimate and rare (≈ 2e-6 per element). A missing act_quant of h moves every row by 7e-4–1.8e-3 (measured) |
//! | compressor · cache | written entries: NMSE ≤ 1e-10 over elements within 1e-5·rms; the rest must be single quantization flips (\|Δ\| ≤ max(\|got\|, \|ref\|)), at most max(2, 1 %) of them. Entries the reference did not write must be bit-identical | — | the pooled entry goes through softmax, RMSNorm, RoPE and then e4m3 (block 64) or Hadamard + e2m1 (block 32) simulation, so a 1e-7 difference can flip one code by a whole step. Skipping a simulation, or using a wrong RoPE position, changes most elements |
//!
//! **bf16 class.** A backend may run an op through a vendor kernel that only takes bf16 (the
//! Ascend backend's fused CANN ops); it must then answer [`Backend::numerics`] with
//! `Numerics::Bf16`. Such a case gets its own report row (`op · bf16`) and every NMSE bound
//! above becomes [`BF16_NMSE`] = 1e-4 (one bf16 rounding is NMSE ≈ 5e-6; inputs and output
//! rounded, with softmax/ReLU amplification, stay within ×10 of that), the indexer's near-tie
//! tolerance becomes [`BF16_SCORE_TOL`] = 1/32 of the row's largest |score|. Exact, set and
//! cache metrics are unchanged. End to end, a backend that ran any op in bf16 is held to bf16
//! tiers instead of T1/T2: MANIFEST §8's T3 for logits and decisions, and for teacher-forced
//! blocks a bound of our own (`tier1_bf16`, with its rationale) because the MANIFEST's T3b is
//! calibrated against bf16 goldens that are not shipped. At block level bf16 noise is as large
//! as the subtler bugs, so for such a backend the op-level bf16 class is the sharp test.
//!
//! A backend that answers `supports() == No` for a case is listed as *unsupported*. This fails
//! the suite unless [`SuiteOptions::allow_unsupported`] is set: a backend must implement every
//! op the model issues.
//!
//! ## End to end
//!
//! [`end_to_end`] loads the tiny-flash golden checkpoint on the tested backend and on the
//! reference, and applies the tiers of its MANIFEST (§8) against the official float32 goldens
//! and against the reference. T1/T1d are blocks teacher-forced on the golden inputs (prefill,
//! and prefill of P = 37 then one-token decode), plus the head and the MTP block. T2 is the
//! prefill, decode and MTP logits and every routing and indexer decision.
//!
//! The tight end-to-end bound (cos ≥ 0.999 or per-position median rel ≤ 1e-4 against the
//! reference) is reported but does **not** gate. MANIFEST §7.1 and docs/parity.md show that
//! two correct implementations that differ only in summation order reach cos 0.996 / median
//! rel 0.02 (MANIFEST alt impl, decode), and cpu-ref against the golden reaches cos 0.9951 /
//! median rel 0.046 (prefill). Once one e4m3/e2m1 code flips, the difference spreads through
//! attention to every later position, so end-to-end logits cannot be held tighter than T2.
//! The tight gate against the reference is therefore T1/T1d: per-position median rel ≤ 1e-5
//! on the same inputs, where correct implementations agree to ~1e-7.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use hal::dtype::{self, DType};
use hal::ops::attention::CompressedKv;
use hal::ops::sample::{sample_key, sample_uniform};
use hal::ops::{
    Access, Add, Compressor, Embed, GateMode, GatherRows, GroupedLinear, Hadamard, HcExpand, HcHead, HcPost, HcPre,
    IndexerTopK, Linear, MoeExperts, MoeGate, NormRope, QuantFormat, QuantSim, RmsNorm, Rope, SampleTokens,
    SparseAttention, SwiGlu, WeightFormat, WindowStore,
};
use hal::{Backend, Numerics, Op, Support, Tensor};
use model::config::ModelConfig;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{json, Value};

use crate::tiers;

/// Seed used by the CLI and the tests unless told otherwise.
pub const DEFAULT_SEED: u64 = 0x5EED_C0DE;

/// Bit pattern written into f32 outputs before a run (a quiet NaN with a recognisable payload).
pub const POISON_F32: u32 = 0xFFC0_DEAD;
/// Value written into i32 outputs before a run (never a valid index, expert or id).
pub const POISON_I32: i32 = 0x7FFF_FFFF;
/// Bytes of each canary tensor.
pub const CANARY_BYTES: usize = 1024;

/// Random descriptors drawn per op variant.
const RANDOM_PER_VARIANT: usize = 3;

// ---------------------------------------------------------------------------------------------
// Host data
// ---------------------------------------------------------------------------------------------

/// A tensor's contents on the host: little-endian bytes of `dtype` in `shape`.
#[derive(Clone, Debug)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub bytes: Vec<u8>,
}

impl HostTensor {
    fn f32(shape: &[usize], v: &[f32]) -> Self {
        HostTensor { shape: shape.to_vec(), dtype: DType::F32, bytes: dtype::f32_bytes(v) }
    }
    fn i32(shape: &[usize], v: &[i32]) -> Self {
        HostTensor { shape: shape.to_vec(), dtype: DType::I32, bytes: dtype::i32_bytes(v) }
    }
    fn raw(shape: &[usize], dtype: DType, bytes: Vec<u8>) -> Self {
        HostTensor { shape: shape.to_vec(), dtype, bytes }
    }
    /// A KV cache tensor of dtype `dtype` (f32, or bf16 holding each value's nearest bf16).
    fn cache(shape: &[usize], dtype: DType, v: &[f32]) -> Self {
        match dtype {
            DType::BF16 => HostTensor::raw(shape, dtype, dtype::bf16_bytes(v)),
            _ => HostTensor::f32(shape, v),
        }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// The values as f32 (f32 tensors as they are, bf16 ones widened).
    pub fn f32s(&self) -> Vec<f32> {
        dtype::decode_to_f32(self.dtype, &self.bytes)
    }
    pub fn i32s(&self) -> Vec<i32> {
        dtype::bytes_i32(&self.bytes)
    }
}

/// What one case feeds a backend: every input, and the pre-fill of every read-write output
/// (`None` for write-only outputs, which the harness poisons).
#[derive(Clone, Debug)]
pub struct CaseData {
    pub inputs: Vec<HostTensor>,
    pub outputs: Vec<Option<HostTensor>>,
}

/// SplitMix64: small, fast, and the same on every platform.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform integer in [lo, hi).
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        assert!(hi > lo, "empty range {lo}..{hi}");
        lo + (self.next_u64() % (hi - lo) as u64) as usize
    }
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit() as f32
    }
    /// Approximately standard normal (Irwin–Hall of 4 uniforms, rescaled): cheap and bounded.
    fn normal(&mut self) -> f32 {
        let s: f64 = (0..4).map(|_| self.unit()).sum::<f64>() - 2.0;
        (s * 3f64.sqrt()) as f32
    }
    fn normals(&mut self, n: usize, sigma: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * sigma).collect()
    }
    fn uniforms(&mut self, n: usize, amp: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(-amp, amp)).collect()
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(n);
        v
    }
    /// `k` distinct values of `0..n` in random order.
    fn distinct(&mut self, k: usize, n: usize) -> Vec<usize> {
        assert!(k <= n, "{k} distinct values out of {n}");
        if n <= 1 << 16 {
            let mut all: Vec<usize> = (0..n).collect();
            for i in 0..k {
                let j = self.range(i, n);
                all.swap(i, j);
            }
            all.truncate(k);
            all
        } else {
            let mut out: Vec<usize> = Vec::with_capacity(k);
            while out.len() < k {
                let v = self.range(0, n);
                if !out.contains(&v) {
                    out.push(v);
                }
            }
            out
        }
    }
}

fn mix(a: u64, b: u64, c: u64) -> u64 {
    let mut r = Rng::new(a ^ b.rotate_left(21) ^ c.rotate_left(42));
    r.next_u64()
}

// ---------------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------------

/// Slots and positions of every row, following the convention of `hal::ops`: each slot's rows
/// are one contiguous run of consecutive positions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowPlan {
    pub slots: Vec<i32>,
    pub positions: Vec<i32>,
}

impl RowPlan {
    /// Runs of `(slot, first position, length)`, in order.
    pub fn runs(runs: &[(usize, usize, usize)]) -> Self {
        let mut p = RowPlan { slots: Vec::new(), positions: Vec::new() };
        for &(s, start, len) in runs {
            for k in 0..len {
                p.slots.push(s as i32);
                p.positions.push((start + k) as i32);
            }
        }
        p
    }
    /// One decode token per slot: slot i at `positions[i]`.
    pub fn decode(positions: &[usize]) -> Self {
        Self::runs(&positions.iter().enumerate().map(|(s, &p)| (s, p, 1)).collect::<Vec<_>>())
    }
    pub fn rows(&self) -> usize {
        self.slots.len()
    }
    /// First position of `slot`'s run in this call.
    pub fn run_start(&self, slot: usize) -> Option<usize> {
        self.slots.iter().position(|&s| s as usize == slot).map(|r| self.positions[r] as usize)
    }
}

/// A random plan of about `rows` rows over `slots` slots, every position below `max_end`.
fn random_plan(rng: &mut Rng, rows: usize, slots: usize, max_end: usize) -> RowPlan {
    let rows = rows.clamp(1, slots * max_end);
    let k = rng.range(1, rows.min(slots) + 1);
    let chosen = rng.distinct(k, slots);
    let mut cuts = rng.distinct(k - 1, rows - 1).into_iter().map(|c| c + 1).collect::<Vec<_>>();
    cuts.sort_unstable();
    cuts.insert(0, 0);
    cuts.push(rows);
    let runs: Vec<(usize, usize, usize)> = chosen
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            let len = (cuts[i + 1] - cuts[i]).min(max_end);
            (s, rng.range(0, max_end - len + 1), len)
        })
        .collect();
    RowPlan::runs(&runs)
}

/// Semantic choices a case makes beyond its descriptor.
#[derive(Clone, Debug, Default)]
struct Setup {
    plan: Option<RowPlan>,
    /// Route every row to this expert (gate: by bias or table; experts: in every row's list).
    one_expert: Option<usize>,
    /// Quantizer edge values: exact RNE midpoints, amax below the floor, zero rows.
    quant_edges: bool,
    /// The RoPE table to use instead of a generic θ = 10000 one (real-model cases).
    freqs: Option<Vec<f32>>,
    /// Selected attention: −1 and a repeated entry inside the list, not only as padding.
    holes: bool,
    /// Sampling: rows with tied maxima, NaN and −∞ logits, and one all NaN.
    specials: bool,
}

/// One op descriptor with the recipe of its inputs.
#[derive(Clone, Debug)]
pub struct Case {
    pub op: Op,
    /// `random #i`, `edge: ...`, or `V4-Flash: ...` / `V4-Pro: ...`.
    pub label: String,
    /// Real-model shapes: large tensors, the slow part of the suite.
    pub large: bool,
    seed: u64,
    setup: Setup,
}

impl Case {
    fn new(op: Op, label: impl Into<String>, seed: u64) -> Self {
        Case { op, label: label.into(), large: false, seed, setup: Setup::default() }
    }
    fn plan(mut self, p: RowPlan) -> Self {
        self.setup.plan = Some(p);
        self
    }
    fn large(mut self) -> Self {
        self.large = true;
        self
    }
    fn one_expert(mut self, e: usize) -> Self {
        self.setup.one_expert = Some(e);
        self
    }
    fn quant_edges(mut self) -> Self {
        self.setup.quant_edges = true;
        self
    }
    fn freqs(mut self, f: Vec<f32>) -> Self {
        self.setup.freqs = Some(f);
        self
    }
    fn holes(mut self) -> Self {
        self.setup.holes = true;
        self
    }
    fn specials(mut self) -> Self {
        self.setup.specials = true;
        self
    }
    /// Row key of the report: the op name and the variant that changes its threshold or path.
    pub fn variant(&self) -> String {
        variant(&self.op)
    }
    /// The inputs and read-write pre-fills, regenerated deterministically from the case seed.
    pub fn build(&self) -> CaseData {
        let data = build_data(self);
        let sig = self.op.signature();
        assert_eq!(data.inputs.len(), sig.inputs.len(), "{}: input count", self.op.name());
        for (t, s) in data.inputs.iter().zip(&sig.inputs) {
            assert!(
                t.shape == s.shape && t.dtype == s.dtype && t.bytes.len() == t.numel() * t.dtype.size(),
                "{} input {}: built {:?} {} for {:?} {}",
                self.op.name(),
                s.name,
                t.shape,
                t.dtype,
                s.shape,
                s.dtype
            );
        }
        for (t, s) in data.outputs.iter().zip(&sig.outputs) {
            assert_eq!(t.is_some(), s.access == Access::ReadWrite, "{} output {}", self.op.name(), s.name);
            if let Some(t) = t {
                assert!(t.shape == s.shape && t.dtype == s.dtype, "{} output {} pre-fill", self.op.name(), s.name);
            }
        }
        data
    }
}

/// `op.name()` plus the variant: `linear[fp8]`, `sparse_attention[selected]`, ...
pub fn variant(op: &Op) -> String {
    let fmt = |f: WeightFormat| match f {
        WeightFormat::F32 => "f32",
        WeightFormat::Bf16 => "bf16",
        WeightFormat::Fp8Block128 => "fp8",
        WeightFormat::Fp4Group32 => "fp4",
    };
    let v: Option<String> = match op {
        Op::Embed(e) => Some(e.table_dtype.to_string()),
        Op::Linear(l) => Some(fmt(l.format).into()),
        Op::GroupedLinear(g) => Some(fmt(g.format).into()),
        Op::MoeExperts(m) => Some(fmt(m.format).into()),
        Op::RmsNorm(r) => Some(match (r.weighted, r.rope) {
            (_, Some(NormRope { fp8_nope: true, .. })) => "rope,fp8".into(),
            (_, Some(_)) => "rope".into(),
            (true, None) => "weighted".into(),
            (false, None) => "plain".into(),
        }),
        Op::Rope(r) => Some(if r.inverse { "inverse" } else { "forward" }.into()),
        Op::QuantSim(q) => Some(match q.format {
            QuantFormat::Fp8E4M3 => "e4m3".into(),
            QuantFormat::Fp4E2M1 => "e2m1".into(),
        }),
        Op::Compressor(c) => {
            Some(format!("{}{}", if c.overlap { "overlap" } else { "plain" }, if c.rotate { "+rotate" } else { "" }))
        }
        Op::SparseAttention(a) => Some(match a.compressed {
            CompressedKv::None => "window".into(),
            CompressedKv::All { .. } => "all".into(),
            CompressedKv::Selected { .. } => "selected".into(),
        }),
        Op::MoeGate(g) => Some(match g.mode {
            GateMode::Scored => "scored".into(),
            GateMode::Hashed { .. } => "hashed".into(),
        }),
        Op::SampleTokens(t) => Some(if t.temperature == 0.0 { "greedy" } else { "temperature" }.into()),
        Op::HcPre(HcPre { after_post: true, .. }) | Op::HcHead(HcHead { after_post: true, .. }) => {
            Some("after post".into())
        }
        Op::HcExpand(_)
        | Op::Add(_)
        | Op::GatherRows(_)
        | Op::HcPre(_)
        | Op::HcPost(_)
        | Op::HcHead(_)
        | Op::Hadamard(_)
        | Op::WindowStore(_)
        | Op::IndexerTopK(_)
        | Op::SwiGlu(_) => None,
    };
    let v = match (v, op.cache_dtype()) {
        (v, None | Some(DType::F32)) => v,
        (Some(v), Some(d)) => Some(format!("{v},{d} cache")),
        (None, Some(d)) => Some(format!("{d} cache")),
    };
    match v {
        Some(v) => format!("{}[{v}]", op.name()),
        None => op.name().to_string(),
    }
}

/// Number of [`Op`] kinds; [`kind_index`] maps each to `0..N_KINDS`.
pub const N_KINDS: usize = 21;

/// Index of an op's kind. The match is exhaustive: a new `Op` variant does not compile until
/// it has an index here, and [`cases`] then panics until it also has a generator.
pub fn kind_index(op: &Op) -> usize {
    match op {
        Op::Embed(_) => 0,
        Op::HcExpand(_) => 1,
        Op::Add(_) => 2,
        Op::GatherRows(_) => 3,
        Op::HcPre(_) => 4,
        Op::HcPost(_) => 5,
        Op::HcHead(_) => 6,
        Op::RmsNorm(_) => 7,
        Op::Linear(_) => 8,
        Op::GroupedLinear(_) => 9,
        Op::Rope(_) => 10,
        Op::QuantSim(_) => 11,
        Op::Hadamard(_) => 12,
        Op::WindowStore(_) => 13,
        Op::Compressor(_) => 14,
        Op::IndexerTopK(_) => 15,
        Op::SparseAttention(_) => 16,
        Op::MoeGate(_) => 17,
        Op::MoeExperts(_) => 18,
        Op::SwiGlu(_) => 19,
        Op::SampleTokens(_) => 20,
    }
}

fn runner(seed: u64, salt: u64) -> TestRunner {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8..16].copy_from_slice(&salt.to_le_bytes());
    bytes[16..24].copy_from_slice(b"v4rtconf");
    TestRunner::new_with_rng(Config::default(), TestRng::from_seed(RngAlgorithm::ChaCha, &bytes))
}

fn draw<S: Strategy>(r: &mut TestRunner, s: S) -> S::Value {
    s.new_tree(r).expect("conformance strategies never reject").current()
}

/// The real model configurations whose shapes the suite uses.
fn real_configs() -> Vec<(&'static str, ModelConfig)> {
    ["v4-flash", "v4-pro"]
        .iter()
        .zip(["V4-Flash", "V4-Pro"])
        .map(|(n, label)| (label, ModelConfig::embedded(n).expect("embedded config")))
        .collect()
}

/// Every case of the suite: for each op kind, random descriptors, the named edge cases and
/// the real V4-Flash / V4-Pro shapes. Deterministic in `seed`.
pub fn cases(seed: u64) -> Vec<Case> {
    let reals = real_configs();
    let mut all = Vec::new();
    for kind in 0..N_KINDS {
        let mut r = runner(seed, kind as u64);
        let s = |i: u64| mix(seed, kind as u64, 1000 + i);
        let mut cs = kind_cases(kind, &mut r, &s, &reals);
        cs.extend(bf16_cache_cases(&cs));
        assert!(!cs.is_empty(), "op kind {kind} has no cases");
        for c in &cs {
            assert_eq!(kind_index(&c.op), kind, "case {} of kind {kind} builds a {}", c.label, c.op.name());
            c.op.check_params().unwrap_or_else(|e| panic!("case {} ({:?}): {e}", c.label, c.op));
        }
        all.extend(cs);
    }
    all
}

/// The KV-cache ops' cases again with a bf16 cache: every named case, and the first random case
/// of each variant. Same seeds, so the same values, stored as bf16.
fn bf16_cache_cases(cases: &[Case]) -> Vec<Case> {
    cases
        .iter()
        .filter(|c| c.op.cache_dtype().is_some() && (!c.label.starts_with("random #") || c.label == "random #0"))
        .filter_map(|c| {
            let op = c.op.with_cache_dtype(DType::BF16)?;
            Some(Case { op, label: format!("bf16 cache: {}", c.label), ..c.clone() })
        })
        .collect()
}

fn randoms<F: FnMut(&mut TestRunner) -> Case>(r: &mut TestRunner, mut f: F) -> Vec<Case> {
    (0..RANDOM_PER_VARIANT)
        .map(|i| {
            let mut c = f(r);
            c.label = format!("random #{i}");
            c
        })
        .collect()
}

/// θ = 10000 RoPE frequencies for `rope_dim`.
fn generic_freqs(rope_dim: usize) -> Vec<f32> {
    model::rope::freqs(rope_dim, 10000.0, None)
}

#[allow(clippy::too_many_lines)]
fn kind_cases(
    kind: usize,
    r: &mut TestRunner,
    s: &dyn Fn(u64) -> u64,
    reals: &[(&'static str, ModelConfig)],
) -> Vec<Case> {
    let mut out = Vec::new();
    let seed_s = any::<u64>();
    match kind {
        // ---- embed ----
        0 => {
            for table_dtype in [DType::F32, DType::BF16, DType::F16] {
                out.extend(randoms(r, |r| {
                    let (rows, vocab, dim, sd) = draw(r, (1usize..=9, 1usize..=300, 1usize..=300, seed_s));
                    Case::new(Op::Embed(Embed { rows, vocab, dim, table_dtype }), "", sd)
                }));
            }
            out.push(Case::new(
                Op::Embed(Embed { rows: 1, vocab: 129, dim: 77, table_dtype: DType::BF16 }),
                "edge: one token",
                s(0),
            ));
            for (i, (name, c)) in reals.iter().enumerate() {
                let op = Embed { rows: 3, vocab: 1024, dim: c.dim, table_dtype: DType::BF16 };
                out.push(
                    Case::new(
                        Op::Embed(op),
                        format!("{name}: dim {}, bf16 (vocab cut to 1024)", c.dim),
                        s(10 + i as u64),
                    )
                    .large(),
                );
            }
        }
        // ---- hc_expand ----
        1 => {
            out.extend(randoms(r, |r| {
                let (rows, mult, dim, sd) = draw(r, (1usize..=9, 1usize..=4, 1usize..=300, seed_s));
                Case::new(Op::HcExpand(HcExpand { rows, mult, dim }), "", sd)
            }));
            out.push(Case::new(Op::HcExpand(HcExpand { rows: 1, mult: 4, dim: 33 }), "edge: one token", s(0)));
            for (i, (name, c)) in reals.iter().enumerate() {
                let op = HcExpand { rows: 3, mult: c.hc_mult, dim: c.dim };
                out.push(
                    Case::new(Op::HcExpand(op), format!("{name}: 4 streams × {}", c.dim), s(10 + i as u64)).large(),
                );
            }
        }
        // ---- add ----
        2 => {
            out.extend(randoms(r, |r| {
                let (b_rows, per, width, sd) = draw(r, (1usize..=6, 1usize..=4, 1usize..=300, seed_s));
                Case::new(Op::Add(Add { rows: b_rows * per, b_rows, width }), "", sd)
            }));
            out.push(Case::new(Op::Add(Add { rows: 1, b_rows: 1, width: 5 }), "edge: one token", s(0)));
            for (i, (name, c)) in reals.iter().enumerate() {
                let combine = Add { rows: 3, b_rows: 3, width: c.dim };
                out.push(Case::new(Op::Add(combine), format!("{name}: MoE combine"), s(10 + i as u64)).large());
                let mtp = Add { rows: 3 * c.hc_mult, b_rows: 3, width: c.dim };
                out.push(
                    Case::new(Op::Add(mtp), format!("{name}: MTP input, broadcast over 4 streams"), s(20 + i as u64))
                        .large(),
                );
            }
        }
        // ---- gather_rows ----
        3 => {
            out.extend(randoms(r, |r| {
                let (rows, width, out_rows, sd) = draw(r, (1usize..=20, 1usize..=300, 1usize..=8, seed_s));
                Case::new(Op::GatherRows(GatherRows { rows, width, out_rows }), "", sd)
            }));
            out.push(Case::new(Op::GatherRows(GatherRows { rows: 1, width: 9, out_rows: 1 }), "edge: one token", s(0)));
            for (i, (name, c)) in reals.iter().enumerate() {
                let op = GatherRows { rows: 7, width: c.dim, out_rows: 2 };
                out.push(
                    Case::new(Op::GatherRows(op), format!("{name}: last rows of 2 chunks"), s(10 + i as u64)).large(),
                );
            }
        }
        // ---- hc_pre ----
        4 => {
            for after_post in [false, true] {
                out.extend(randoms(r, |r| {
                    let (rows, mult, dim, iters, sd) =
                        draw(r, (1usize..=6, 1usize..=4, 1usize..=300, 1usize..=20, seed_s));
                    let op = HcPre { rows, mult, dim, sinkhorn_iters: iters, hc_eps: 1e-6, norm_eps: 1e-6, after_post };
                    Case::new(Op::HcPre(op), "", sd)
                }));
                let one =
                    HcPre { rows: 1, mult: 4, dim: 64, sinkhorn_iters: 20, hc_eps: 1e-6, norm_eps: 1e-6, after_post };
                out.push(Case::new(Op::HcPre(one.clone()), "edge: one token", s(0)));
                out.push(Case::new(
                    Op::HcPre(HcPre { sinkhorn_iters: 1, ..one.clone() }),
                    "edge: one Sinkhorn iteration",
                    s(1),
                ));
                // Prefill-sized: CUDA sums the mixes over tiles of 32 rows (the last one partial),
                // after a separate HcPost.
                let many = HcPre { rows: 70, mult: 4, dim: 300, ..one };
                out.push(Case::new(Op::HcPre(many), "prefill-sized: 70 tokens", s(2)));
                for (i, (name, c)) in reals.iter().enumerate() {
                    let op = HcPre {
                        rows: 2,
                        mult: c.hc_mult,
                        dim: c.dim,
                        sinkhorn_iters: c.hc_sinkhorn_iters,
                        hc_eps: c.hc_eps,
                        norm_eps: c.norm_eps,
                        after_post,
                    };
                    out.push(Case::new(Op::HcPre(op), format!("{name}: 4 × {}", c.dim), s(10 + i as u64)).large());
                }
            }
        }
        // ---- hc_post ----
        5 => {
            out.extend(randoms(r, |r| {
                let (rows, mult, dim, sd) = draw(r, (1usize..=6, 1usize..=4, 1usize..=300, seed_s));
                Case::new(Op::HcPost(HcPost { rows, mult, dim }), "", sd)
            }));
            out.push(Case::new(Op::HcPost(HcPost { rows: 1, mult: 4, dim: 64 }), "edge: one token", s(0)));
            for (i, (name, c)) in reals.iter().enumerate() {
                let op = HcPost { rows: 2, mult: c.hc_mult, dim: c.dim };
                out.push(Case::new(Op::HcPost(op), format!("{name}: 4 × {}", c.dim), s(10 + i as u64)).large());
            }
        }
        // ---- hc_head ----
        6 => {
            for after_post in [false, true] {
                out.extend(randoms(r, |r| {
                    let (rows, mult, dim, sd) = draw(r, (1usize..=6, 1usize..=4, 1usize..=300, seed_s));
                    Case::new(Op::HcHead(HcHead { rows, mult, dim, hc_eps: 1e-6, norm_eps: 1e-6, after_post }), "", sd)
                }));
                let one = HcHead { rows: 1, mult: 4, dim: 64, hc_eps: 1e-6, norm_eps: 1e-6, after_post };
                out.push(Case::new(Op::HcHead(one.clone()), "edge: one token", s(0)));
                let many = HcHead { rows: 70, mult: 4, dim: 300, ..one };
                out.push(Case::new(Op::HcHead(many), "prefill-sized: 70 tokens (tiles of 32 rows on CUDA)", s(1)));
                for (i, (name, c)) in reals.iter().enumerate() {
                    let op = HcHead {
                        rows: 2,
                        mult: c.hc_mult,
                        dim: c.dim,
                        hc_eps: c.hc_eps,
                        norm_eps: c.norm_eps,
                        after_post,
                    };
                    out.push(Case::new(Op::HcHead(op), format!("{name}: 4 × {}", c.dim), s(10 + i as u64)).large());
                }
            }
            // A prefill chunk whose column splits are too wide to keep in CUDA's shared memory:
            // HcPost runs as its own kernel first.
            let wide = HcHead { rows: 600, mult: 4, dim: 4096, hc_eps: 1e-6, norm_eps: 1e-6, after_post: true };
            out.push(Case::new(Op::HcHead(wide), "prefill-sized: 600 tokens × 4 × 4096", s(20)).large());
        }
        // ---- rms_norm ----
        7 => {
            for weighted in [true, false] {
                out.extend(randoms(r, |r| {
                    let (rows, dim, eps, sd) =
                        draw(r, (1usize..=9, 1usize..=300, prop_oneof![Just(1e-6f32), Just(1e-5f32)], seed_s));
                    Case::new(Op::RmsNorm(RmsNorm { rows, dim, eps, weighted, rope: None }), "", sd)
                }));
            }
            out.push(Case::new(
                Op::RmsNorm(RmsNorm { rows: 1, dim: 130, eps: 1e-6, weighted: true, rope: None }),
                "edge: one token",
                s(0),
            ));
            out.push(
                Case::new(
                    Op::RmsNorm(RmsNorm { rows: 3, dim: 64, eps: 1e-6, weighted: true, rope: None }),
                    "edge: an all-zero row",
                    s(1),
                )
                .quant_edges(),
            );
            // With RoPE (and the FP8 simulation of a KV entry): random heads, widths and positions.
            for fp8_nope in [false, true] {
                out.extend(randoms(r, |r| {
                    let (tokens, heads, half_rope, nope_blocks, weighted, sd) =
                        draw(r, (1usize..=6, 1usize..=8, 1usize..=48, 0usize..=4, any::<bool>(), seed_s));
                    let rope_dim = 2 * half_rope;
                    let mut rng = Rng::new(sd);
                    let plan = random_plan(&mut rng, tokens, tokens, 1 << 17);
                    let rope = Some(NormRope { heads, rope_dim, fp8_nope });
                    let op = RmsNorm {
                        rows: plan.rows() * heads,
                        dim: rope_dim + 64 * nope_blocks,
                        eps: 1e-6,
                        weighted,
                        rope,
                    };
                    Case::new(Op::RmsNorm(op), "", sd).plan(plan)
                }));
            }
            for (i, (name, c)) in reals.iter().enumerate() {
                let i = i as u64;
                let w = |rows, dim, weighted| Op::RmsNorm(RmsNorm { rows, dim, eps: c.norm_eps, weighted, rope: None });
                out.push(
                    Case::new(w(2, c.dim, true), format!("{name}: attn/ffn norm, dim {}", c.dim), s(10 + i)).large(),
                );
                out.push(
                    Case::new(w(2, c.q_lora_rank, true), format!("{name}: q_norm, {}", c.q_lora_rank), s(20 + i))
                        .large(),
                );
                out.push(
                    Case::new(
                        w(2 * c.n_heads, c.head_dim, false),
                        format!("{name}: per-head query rescale, {} × {}", c.n_heads, c.head_dim),
                        s(30 + i),
                    )
                    .large(),
                );
                let plan = RowPlan::decode(&[5, 70_000]);
                let f4 = model::rope::layer_freqs(c, 4);
                let (rd, hd, eps) = (c.rope_head_dim, c.head_dim, c.norm_eps);
                let q = RmsNorm {
                    rows: 2 * c.n_heads,
                    dim: hd,
                    eps,
                    weighted: false,
                    rope: Some(NormRope { heads: c.n_heads, rope_dim: rd, fp8_nope: false }),
                };
                let label = format!("{name}: query rescale + RoPE, {} × {hd}", c.n_heads);
                out.push(Case::new(Op::RmsNorm(q), label, s(40 + i)).plan(plan.clone()).freqs(f4.clone()).large());
                let kv = RmsNorm {
                    rows: 2,
                    dim: hd,
                    eps,
                    weighted: true,
                    rope: Some(NormRope { heads: 1, rope_dim: rd, fp8_nope: true }),
                };
                out.push(
                    Case::new(Op::RmsNorm(kv), format!("{name}: kv_norm + RoPE + FP8 window entry, {hd}"), s(50 + i))
                        .plan(plan)
                        .freqs(f4)
                        .large(),
                );
            }
        }
        // ---- linear ----
        8 => {
            for format in [WeightFormat::F32, WeightFormat::Bf16, WeightFormat::Fp8Block128, WeightFormat::Fp4Group32] {
                out.extend(randoms(r, |r| {
                    let (rows, inp, k, out_features, sd) =
                        draw(r, (1usize..=9, 1usize..=300, 1usize..=3, 4usize..=300, seed_s));
                    let in_features = if format.quantizes_input() { 128 * k } else { inp };
                    Case::new(Op::Linear(Linear { rows, in_features, out_features, format }), "", sd)
                }));
                out.push(Case::new(
                    Op::Linear(Linear { rows: 1, in_features: 256, out_features: 131, format }),
                    "edge: one token",
                    s(format as u64),
                ));
            }
            // Prefill-sized: ≥ 16 rows take the CUDA tensor-core tiles (partial row and feature
            // tiles here); F32 weights stay on the CUDA-core kernels at any size.
            for (j, format) in
                [WeightFormat::F32, WeightFormat::Bf16, WeightFormat::Fp8Block128, WeightFormat::Fp4Group32]
                    .into_iter()
                    .enumerate()
            {
                let op = Linear { rows: 130, in_features: 384, out_features: 200, format };
                out.push(Case::new(Op::Linear(op), "prefill: 130 rows", s(40 + j as u64)));
            }
            for (j, format) in [WeightFormat::Fp8Block128, WeightFormat::Fp4Group32].into_iter().enumerate() {
                let op = Linear { rows: 5, in_features: 384, out_features: 40, format };
                out.push(
                    Case::new(Op::Linear(op), "edge: act_quant ties, amax below the floor, zero row", s(5 + j as u64))
                        .quant_edges(),
                );
                // One row of whole 1024-value spans: the CUDA GEMV act_quants it itself.
                let op = Linear { rows: 1, in_features: 1024, out_features: 40, format };
                out.push(Case::new(Op::Linear(op), "edge: act_quant ties, one token", s(7 + j as u64)).quant_edges());
            }
            // The real shapes as prefill (2 rows) and as decode (1 row: the CUDA one-row GEMV with
            // its split rows and in-kernel act_quant).
            for (i, ((name, c), rows)) in reals.iter().flat_map(|r| [(r, 2usize), (r, 1)]).enumerate() {
                let i = i as u64;
                let lin =
                    |in_features, out_features, format| Op::Linear(Linear { rows, in_features, out_features, format });
                let fp8 = WeightFormat::Fp8Block128;
                let name = format!("{name}, {rows} row(s)");
                let mut add = |op: Op, what: String, k: u64| {
                    out.push(Case::new(op, format!("{name}: {what}"), s(100 + 10 * k + i)).large())
                };
                add(lin(c.dim, c.q_lora_rank, fp8), format!("wq_a {} → {}", c.dim, c.q_lora_rank), 0);
                add(lin(c.dim, c.head_dim, fp8), format!("wkv {} → {}", c.dim, c.head_dim), 1);
                add(
                    lin(c.q_lora_rank, c.index_n_heads * c.index_head_dim, fp8),
                    format!("indexer wq_b {} → {}", c.q_lora_rank, c.index_n_heads * c.index_head_dim),
                    2,
                );
                add(
                    lin(c.dim, c.index_n_heads, WeightFormat::Bf16),
                    format!("indexer weights_proj {} → {} (bf16)", c.dim, c.index_n_heads),
                    3,
                );
                add(
                    lin(c.dim, 2 * c.head_dim, WeightFormat::Bf16),
                    format!("compressor wkv {} → {} (bf16)", c.dim, 2 * c.head_dim),
                    4,
                );
                add(
                    lin(c.dim, c.moe_inter_dim, WeightFormat::Fp4Group32),
                    format!("expert-shaped FP4 {} → {}", c.dim, c.moe_inter_dim),
                    5,
                );
                if i < 2 {
                    add(
                        lin(c.o_groups * c.o_lora_rank, c.dim, fp8),
                        format!("wo_b {} → {}", c.o_groups * c.o_lora_rank, c.dim),
                        6,
                    );
                } else {
                    add(lin(c.moe_inter_dim, c.dim, fp8), format!("shared w2 {} → {}", c.moe_inter_dim, c.dim), 6);
                }
            }
        }
        // ---- grouped_linear ----
        9 => {
            for format in [WeightFormat::F32, WeightFormat::Bf16, WeightFormat::Fp8Block128] {
                out.extend(randoms(r, |r| {
                    let (rows, groups, ipg, opg, sd) =
                        draw(r, (1usize..=6, 1usize..=8, 1usize..=200, 4usize..=64, seed_s));
                    // FP8 as the checkpoint's wo_a: input width in whole 128-blocks.
                    let ipg = if format == WeightFormat::Fp8Block128 { 128 * ipg.div_ceil(64) } else { ipg };
                    Case::new(
                        Op::GroupedLinear(GroupedLinear {
                            rows,
                            groups,
                            in_per_group: ipg,
                            out_per_group: opg,
                            format,
                        }),
                        "",
                        sd,
                    )
                }));
            }
            // Prefill-sized (CUDA tensor-core tiles when a 128-feature tile lies in one group).
            let g = |rows, groups, in_per_group, out_per_group, format| GroupedLinear {
                rows,
                groups,
                in_per_group,
                out_per_group,
                format,
            };
            out.push(Case::new(
                Op::GroupedLinear(g(70, 2, 256, 128, WeightFormat::Fp8Block128)),
                "prefill: 70 rows, FP8",
                s(1),
            ));
            out.push(Case::new(
                Op::GroupedLinear(g(40, 3, 96, 128, WeightFormat::Bf16)),
                "prefill: 40 rows, bf16",
                s(2),
            ));
            out.push(Case::new(
                Op::GroupedLinear(g(33, 3, 64, 40, WeightFormat::Fp8Block128)),
                "prefill: 33 rows, groups narrower than a tile",
                s(3),
            ));
            let one =
                GroupedLinear { rows: 1, groups: 4, in_per_group: 96, out_per_group: 17, format: WeightFormat::F32 };
            out.push(Case::new(Op::GroupedLinear(one), "edge: one token", s(0)));
            for (i, (name, c)) in reals.iter().enumerate() {
                let ipg = c.n_heads * c.head_dim / c.o_groups;
                for (j, format) in [WeightFormat::F32, WeightFormat::Fp8Block128].into_iter().enumerate() {
                    let op = GroupedLinear {
                        rows: 2,
                        groups: c.o_groups,
                        in_per_group: ipg,
                        out_per_group: c.o_lora_rank,
                        format,
                    };
                    let what = format!("{name}: wo_a {format:?}, {} groups of {ipg} → {}", c.o_groups, c.o_lora_rank);
                    out.push(Case::new(Op::GroupedLinear(op), what, s(10 + 2 * i as u64 + j as u64)).large());
                }
                let op = GroupedLinear {
                    rows: 1,
                    groups: c.o_groups,
                    in_per_group: ipg,
                    out_per_group: c.o_lora_rank,
                    format: WeightFormat::Fp8Block128,
                };
                let what =
                    format!("{name}: wo_a Fp8Block128, one token, {} groups of {ipg} → {}", c.o_groups, c.o_lora_rank);
                out.push(Case::new(Op::GroupedLinear(op), what, s(20 + i as u64)).large());
            }
        }
        // ---- rope ----
        10 => {
            for inverse in [false, true] {
                out.extend(randoms(r, |r| {
                    let (rows, heads, half_rope, extra, sd) =
                        draw(r, (1usize..=9, 1usize..=8, 1usize..=64, 0usize..=200, seed_s));
                    let rope_dim = 2 * half_rope;
                    let mut rng = Rng::new(sd);
                    let plan = random_plan(&mut rng, rows, rows, 1 << 17);
                    let op = Rope { rows: plan.rows(), heads, head_dim: rope_dim + extra, rope_dim, inverse };
                    Case::new(Op::Rope(op), "", sd).plan(plan)
                }));
            }
            let op = |rows, inverse| Rope { rows, heads: 2, head_dim: 96, rope_dim: 64, inverse };
            out.push(
                Case::new(Op::Rope(op(1, false)), "edge: one token at position 0", s(0)).plan(RowPlan::decode(&[0])),
            );
            out.push(
                Case::new(Op::Rope(op(4, false)), "edge: mixed slots 127/128/65535/65536", s(1))
                    .plan(RowPlan::decode(&[127, 128, 65535, 65536])),
            );
            out.push(
                Case::new(Op::Rope(op(2, true)), "edge: positions 2^20 − 1 and 2^20 (long context)", s(2))
                    .plan(RowPlan::decode(&[(1 << 20) - 1, 1 << 20])),
            );
            for (i, (name, c)) in reals.iter().enumerate() {
                let i = i as u64;
                let plan = RowPlan::decode(&[5, 70_000]);
                let rope = |heads, head_dim, inverse| {
                    Op::Rope(Rope { rows: 2, heads, head_dim, rope_dim: c.rope_head_dim, inverse })
                };
                let f4 = model::rope::layer_freqs(c, 4);
                let f0 = model::rope::layer_freqs(c, 0);
                out.push(
                    Case::new(
                        rope(c.n_heads, c.head_dim, false),
                        format!("{name}: query, {} heads, YaRN (ratio 4)", c.n_heads),
                        s(10 + i),
                    )
                    .plan(plan.clone())
                    .freqs(f4.clone())
                    .large(),
                );
                out.push(
                    Case::new(
                        rope(c.n_heads, c.head_dim, true),
                        format!("{name}: output de-rotation, window layer"),
                        s(20 + i),
                    )
                    .plan(plan.clone())
                    .freqs(f0)
                    .large(),
                );
                out.push(
                    Case::new(
                        rope(c.index_n_heads, c.index_head_dim, false),
                        format!("{name}: indexer query {} × {}", c.index_n_heads, c.index_head_dim),
                        s(30 + i),
                    )
                    .plan(plan)
                    .freqs(f4)
                    .large(),
                );
            }
        }
        // ---- quant_sim ----
        11 => {
            for format in [QuantFormat::Fp8E4M3, QuantFormat::Fp4E2M1] {
                out.extend(randoms(r, |r| {
                    let (rows, block, blocks, extra, sd) = draw(
                        r,
                        (
                            1usize..=9,
                            prop_oneof![Just(32usize), Just(64), Just(128), 1usize..=100],
                            1usize..=4,
                            0usize..=40,
                            seed_s,
                        ),
                    );
                    let quant_dims = block * blocks;
                    Case::new(
                        Op::QuantSim(QuantSim { rows, dim: quant_dims + extra, quant_dims, block, format }),
                        "",
                        sd,
                    )
                }));
            }
            let kv = QuantSim { rows: 6, dim: 192, quant_dims: 128, block: 64, format: QuantFormat::Fp8E4M3 };
            out.push(
                Case::new(Op::QuantSim(kv.clone()), "edge: e4m3 RNE midpoints, amax below 1e-4, zero row", s(0))
                    .quant_edges(),
            );
            let fp4 = QuantSim { rows: 6, dim: 96, quant_dims: 96, block: 32, format: QuantFormat::Fp4E2M1 };
            out.push(
                Case::new(Op::QuantSim(fp4), "edge: e2m1 RNE midpoints, amax below the floor, zero row", s(1))
                    .quant_edges(),
            );
            out.push(Case::new(Op::QuantSim(QuantSim { rows: 1, ..kv }), "edge: one token", s(2)));
            for (i, (name, c)) in reals.iter().enumerate() {
                let i = i as u64;
                let kv = QuantSim {
                    rows: 4,
                    dim: c.head_dim,
                    quant_dims: c.head_dim - c.rope_head_dim,
                    block: 64,
                    format: QuantFormat::Fp8E4M3,
                };
                out.push(Case::new(Op::QuantSim(kv), format!("{name}: window KV, e4m3 block 64"), s(10 + i)).large());
                let iq = QuantSim {
                    rows: 2 * c.index_n_heads,
                    dim: c.index_head_dim,
                    quant_dims: c.index_head_dim,
                    block: 32,
                    format: QuantFormat::Fp4E2M1,
                };
                out.push(
                    Case::new(Op::QuantSim(iq), format!("{name}: indexer query, e2m1 block 32"), s(20 + i)).large(),
                );
            }
        }
        // ---- hadamard ----
        12 => {
            out.extend(randoms(r, |r| {
                let (rows, log, sd) = draw(r, (1usize..=9, 1u32..=9, seed_s));
                Case::new(Op::Hadamard(Hadamard { rows, dim: 1 << log }), "", sd)
            }));
            out.push(Case::new(Op::Hadamard(Hadamard { rows: 1, dim: 128 }), "edge: one token", s(0)));
            out.push(Case::new(Op::Hadamard(Hadamard { rows: 3, dim: 1 }), "edge: n = 1", s(1)));
            for (i, (name, c)) in reals.iter().enumerate() {
                let op = Hadamard { rows: 2 * c.index_n_heads, dim: c.index_head_dim };
                out.push(
                    Case::new(
                        Op::Hadamard(op),
                        format!("{name}: indexer query {} × {}", c.index_n_heads, c.index_head_dim),
                        s(10 + i as u64),
                    )
                    .large(),
                );
            }
        }
        // ---- window_store ----
        13 => {
            out.extend(randoms(r, |r| {
                let (rows, slots, window, dim, sd) =
                    draw(r, (1usize..=20, 1usize..=3, 1usize..=24, 1usize..=96, seed_s));
                let plan = random_plan(&mut Rng::new(sd), rows, slots, 200);
                Case::new(
                    Op::WindowStore(WindowStore {
                        rows: plan.rows(),
                        slots,
                        window,
                        dim,
                        cache_dtype: hal::DType::F32,
                    }),
                    "",
                    sd,
                )
                .plan(plan)
            }));
            let ws = |plan: RowPlan, slots, window| {
                Op::WindowStore(WindowStore { rows: plan.rows(), slots, window, dim: 24, cache_dtype: hal::DType::F32 })
            };
            let p = RowPlan::decode(&[7]);
            out.push(Case::new(ws(p.clone(), 1, 8), "edge: one token at window − 1", s(0)).plan(p));
            let p = RowPlan::decode(&[7, 8, 9, 0]);
            out.push(
                Case::new(ws(p.clone(), 4, 8), "edge: mixed slots at window − 1, window, window + 1, 0", s(1)).plan(p),
            );
            let p = RowPlan::runs(&[(1, 3, 19)]);
            out.push(
                Case::new(ws(p.clone(), 2, 8), "edge: prefill longer than the window (keeps the last 8)", s(2)).plan(p),
            );
            let p = RowPlan::runs(&[(0, 6, 4), (2, 15, 1)]);
            out.push(
                Case::new(ws(p.clone(), 3, 8), "edge: chunk across the window boundary + a decode row", s(3)).plan(p),
            );
            for (i, (name, c)) in reals.iter().enumerate() {
                let p = RowPlan::decode(&[c.window_size - 1, c.window_size, 3000]);
                let op = WindowStore {
                    rows: 3,
                    slots: 3,
                    window: c.window_size,
                    dim: c.head_dim,
                    cache_dtype: hal::DType::F32,
                };
                out.push(
                    Case::new(
                        Op::WindowStore(op),
                        format!("{name}: window {} × {}, mixed decode", c.window_size, c.head_dim),
                        s(10 + i as u64),
                    )
                    .plan(p)
                    .large(),
                );
            }
        }
        // ---- compressor ----
        14 => {
            for (overlap, rotate) in [(true, false), (false, false), (true, true), (false, true)] {
                out.extend(randoms(r, |r| {
                    let (ratio, rows, slots, cap, half_rope, k, log, sd) = draw(
                        r,
                        (
                            prop_oneof![Just(4usize), 1usize..=8, Just(16)],
                            1usize..=12,
                            1usize..=3,
                            1usize..=10,
                            0usize..=32,
                            1usize..=3,
                            5u32..=8,
                            seed_s,
                        ),
                    );
                    let (width, rope_dim) = if rotate {
                        let w = 1usize << log;
                        (w, (2 * half_rope).min(w))
                    } else {
                        (2 * half_rope + 64 * k, 2 * half_rope)
                    };
                    let plan = random_plan(&mut Rng::new(sd), rows, slots, cap * ratio);
                    let op = Compressor {
                        rows: plan.rows(),
                        slots,
                        ratio,
                        overlap,
                        width,
                        rope_dim,
                        rotate,
                        capacity: cap,
                        norm_eps: 1e-6,
                        cache_dtype: hal::DType::F32,
                    };
                    Case::new(Op::Compressor(op), "", sd).plan(plan)
                }));
            }
            let csa = |plan: RowPlan, slots, rotate: bool| {
                let width = if rotate { 64 } else { 96 };
                Op::Compressor(Compressor {
                    rows: plan.rows(),
                    slots,
                    ratio: 4,
                    overlap: true,
                    width,
                    rope_dim: 32,
                    rotate,
                    capacity: 8,
                    norm_eps: 1e-6,
                    cache_dtype: hal::DType::F32,
                })
            };
            for (j, rotate) in [false, true].into_iter().enumerate() {
                let j = 10 * j as u64;
                let t = if rotate { " (indexer keys)" } else { "" };
                let p = RowPlan::runs(&[(0, 0, 9)]);
                out.push(
                    Case::new(
                        csa(p.clone(), 1, rotate),
                        format!("edge: prefill 0..9 across the 4-block boundaries{t}"),
                        s(j),
                    )
                    .plan(p),
                );
                for pos in [3usize, 4, 7] {
                    let p = RowPlan::decode(&[pos]);
                    out.push(
                        Case::new(
                            csa(p.clone(), 1, rotate),
                            format!("edge: one token at position {pos}{t}"),
                            s(j + 1 + pos as u64),
                        )
                        .plan(p),
                    );
                }
                let p = RowPlan::runs(&[(1, 2, 5)]);
                out.push(
                    Case::new(
                        csa(p.clone(), 2, rotate),
                        format!("edge: chunk from mid-block 2..7 (partial blocks){t}"),
                        s(j + 8),
                    )
                    .plan(p),
                );
                let p = RowPlan::decode(&[3, 6, 7, 0]);
                out.push(
                    Case::new(
                        csa(p.clone(), 4, rotate),
                        format!("edge: mixed decode slots at 3, 6, 7, 0{t}"),
                        s(j + 9),
                    )
                    .plan(p),
                );
            }
            let hca = |plan: RowPlan, slots| {
                Op::Compressor(Compressor {
                    rows: plan.rows(),
                    slots,
                    ratio: 128,
                    overlap: false,
                    width: 128,
                    rope_dim: 64,
                    rotate: false,
                    capacity: 2,
                    norm_eps: 1e-6,
                    cache_dtype: hal::DType::F32,
                })
            };
            let p = RowPlan::decode(&[126, 127, 128]);
            out.push(Case::new(hca(p.clone(), 3), "edge: ratio 128, decode at 126, 127 (emits), 128", s(30)).plan(p));
            let p = RowPlan::runs(&[(0, 0, 130)]);
            out.push(Case::new(hca(p.clone(), 1), "edge: ratio 128, prefill 0..130", s(31)).plan(p));
            for (i, (name, c)) in reals.iter().enumerate() {
                let i = i as u64;
                let comp = |ratio: usize, width, rotate, cap, plan: &RowPlan| {
                    Op::Compressor(Compressor {
                        rows: plan.rows(),
                        slots: 3,
                        ratio,
                        overlap: ratio == 4,
                        width,
                        rope_dim: c.rope_head_dim,
                        rotate,
                        capacity: cap,
                        norm_eps: c.norm_eps,
                        cache_dtype: hal::DType::F32,
                    })
                };
                let p4 = RowPlan::decode(&[3, 130, 255]);
                let f4 = model::rope::layer_freqs(c, 4);
                out.push(
                    Case::new(
                        comp(4, c.head_dim, false, 64, &p4),
                        format!("{name}: CSA compressor, width {}", c.head_dim),
                        s(40 + i),
                    )
                    .plan(p4.clone())
                    .freqs(f4.clone())
                    .large(),
                );
                out.push(
                    Case::new(
                        comp(4, c.index_head_dim, true, 64, &p4),
                        format!("{name}: indexer compressor, width {}", c.index_head_dim),
                        s(50 + i),
                    )
                    .plan(p4)
                    .freqs(f4)
                    .large(),
                );
                let p128 = RowPlan::decode(&[127, 300, 511]);
                out.push(
                    Case::new(
                        comp(128, c.head_dim, false, 4, &p128),
                        format!("{name}: HCA compressor, ratio 128"),
                        s(60 + i),
                    )
                    .plan(p128)
                    .freqs(model::rope::layer_freqs(c, 128))
                    .large(),
                );
            }
        }
        // ---- indexer_topk ----
        15 => {
            out.extend(randoms(r, |r| {
                let (rows, heads, head_dim, slots, ratio, cap, topk, sd) = draw(
                    r,
                    (1usize..=9, 1usize..=8, 1usize..=64, 1usize..=3, 1usize..=8, 1usize..=40, 1usize..=48, seed_s),
                );
                let plan = random_plan(&mut Rng::new(sd), rows, slots, cap * ratio);
                let ws = ((head_dim as f64).powf(-0.5) * (heads as f64).powf(-0.5)) as f32;
                let op = IndexerTopK {
                    rows: plan.rows(),
                    heads,
                    head_dim,
                    slots,
                    capacity: cap,
                    ratio,
                    topk,
                    weight_scale: ws,
                    cache_dtype: hal::DType::F32,
                };
                Case::new(Op::IndexerTopK(op), "", sd).plan(plan)
            }));
            let idx = |plan: &RowPlan, slots, topk| {
                Op::IndexerTopK(IndexerTopK {
                    rows: plan.rows(),
                    heads: 4,
                    head_dim: 32,
                    slots,
                    capacity: 16,
                    ratio: 4,
                    topk,
                    weight_scale: 0.088,
                    cache_dtype: hal::DType::F32,
                })
            };
            let p = RowPlan::decode(&[2]);
            out.push(Case::new(idx(&p, 1, 4), "edge: one token before the first entry (all −1)", s(0)).plan(p));
            let p = RowPlan::decode(&[3, 4, 7, 8]);
            out.push(
                Case::new(idx(&p, 4, 8), "edge: top-k 8 > entries at 3, 4, 7, 8 (−1 padding), mixed slots", s(1))
                    .plan(p),
            );
            let p = RowPlan::runs(&[(0, 0, 12)]);
            out.push(
                Case::new(idx(&p, 1, 2), "edge: prefill 0..12, top-k 2 across the 4-block boundaries", s(2)).plan(p),
            );
            let p = RowPlan::runs(&[(1, 60, 4), (0, 20, 1)]);
            out.push(Case::new(idx(&p, 2, 64), "edge: top-k 64 > capacity 16", s(3)).plan(p));
            // Rows of many entries (CUDA's two-stage top-k: segments of 8192, then their candidates),
            // with the e2m1-grid ties crossing segment boundaries.
            let p = RowPlan::decode(&[19_999, 16_383, 8_191]);
            let op = IndexerTopK {
                rows: 3,
                heads: 4,
                head_dim: 32,
                slots: 3,
                capacity: 20_000,
                ratio: 1,
                topk: 64,
                weight_scale: 0.088,
                cache_dtype: hal::DType::F32,
            };
            out.push(Case::new(Op::IndexerTopK(op), "long rows: 20000 entries, top-64", s(6)).plan(p));
            // Rows past CUDA's rank-per-entry top-k (4096 entries) but of one segment: the
            // one-block select and sort.
            let p = RowPlan::decode(&[5_999, 4_500]);
            let op = IndexerTopK {
                rows: 2,
                heads: 4,
                head_dim: 32,
                slots: 2,
                capacity: 6_000,
                ratio: 1,
                topk: 512,
                weight_scale: 0.088,
                cache_dtype: hal::DType::F32,
            };
            out.push(Case::new(Op::IndexerTopK(op), "rows of 6000 entries, top-512", s(7)).plan(p));
            for (i, (name, c)) in reals.iter().enumerate() {
                let cap = c.index_topk + 100;
                let p = RowPlan::decode(&[4 * cap - 1, 4 * c.index_topk - 10]);
                let ws = ((c.index_head_dim as f64).powf(-0.5) * (c.index_n_heads as f64).powf(-0.5)) as f32;
                let op = IndexerTopK {
                    rows: 2,
                    heads: c.index_n_heads,
                    head_dim: c.index_head_dim,
                    slots: 2,
                    capacity: cap,
                    ratio: 4,
                    topk: c.index_topk,
                    weight_scale: ws,
                    cache_dtype: hal::DType::F32,
                };
                out.push(
                    Case::new(
                        Op::IndexerTopK(op),
                        format!(
                            "{name}: {} × {}, top-k {} (one row padded)",
                            c.index_n_heads, c.index_head_dim, c.index_topk
                        ),
                        s(10 + i as u64),
                    )
                    .plan(p)
                    .large(),
                );
            }
        }
        // ---- sparse_attention ----
        16 => {
            for which in 0..3 {
                out.extend(randoms(r, |r| {
                    let (rows, heads, head_dim, slots, window, ratio, cap, topk, sd) = draw(
                        r,
                        (
                            1usize..=9,
                            1usize..=8,
                            1usize..=96,
                            1usize..=3,
                            1usize..=24,
                            prop_oneof![1usize..=8, Just(128)],
                            1usize..=24,
                            1usize..=32,
                            seed_s,
                        ),
                    );
                    let (compressed, max_end) = match which {
                        0 => (CompressedKv::None, 4 * window + 20),
                        1 => (CompressedKv::All { ratio, capacity: cap }, cap * ratio),
                        _ => (CompressedKv::Selected { ratio: ratio.min(8), capacity: cap, topk }, cap * ratio.min(8)),
                    };
                    let plan = random_plan(&mut Rng::new(sd), rows, slots, max_end);
                    let op = SparseAttention {
                        rows: plan.rows(),
                        heads,
                        head_dim,
                        slots,
                        window,
                        compressed,
                        softmax_scale: (head_dim as f32).powf(-0.5),
                        cache_dtype: hal::DType::F32,
                    };
                    Case::new(Op::SparseAttention(op), "", sd).plan(plan)
                }));
            }
            // The named cases' op: an f32 cache (bf16_cache_cases adds the bf16 variant).
            let attn = |plan: &RowPlan, heads, head_dim, slots, window, compressed, softmax_scale| {
                Op::SparseAttention(SparseAttention {
                    rows: plan.rows(),
                    heads,
                    head_dim,
                    slots,
                    window,
                    compressed,
                    softmax_scale,
                    cache_dtype: hal::DType::F32,
                })
            };
            let sa = |plan: &RowPlan, slots, compressed| attn(plan, 3, 40, slots, 8, compressed, 0.158);
            let p = RowPlan::decode(&[0]);
            out.push(Case::new(sa(&p, 1, CompressedKv::None), "edge: one token at position 0", s(0)).plan(p));
            let p = RowPlan::decode(&[7, 8, 9, 30]);
            out.push(
                Case::new(
                    sa(&p, 4, CompressedKv::None),
                    "edge: mixed decode at window − 1, window, window + 1, 30",
                    s(1),
                )
                .plan(p),
            );
            let p = RowPlan::runs(&[(0, 5, 6), (1, 40, 1)]);
            out.push(
                Case::new(
                    sa(&p, 2, CompressedKv::None),
                    "edge: chunk 5..11 across the window, ring + fresh rows",
                    s(2),
                )
                .plan(p),
            );
            let p = RowPlan::runs(&[(0, 0, 12)]);
            out.push(Case::new(sa(&p, 1, CompressedKv::None), "edge: prefill longer than the window", s(3)).plan(p));
            let p = RowPlan::decode(&[126, 127, 255, 256]);
            out.push(
                Case::new(
                    sa(&p, 4, CompressedKv::All { ratio: 128, capacity: 3 }),
                    "edge: ratio 128 at 126, 127, 255, 256",
                    s(4),
                )
                .plan(p),
            );
            let p = RowPlan::decode(&[2, 3, 4, 13]);
            out.push(
                Case::new(
                    sa(&p, 4, CompressedKv::Selected { ratio: 4, capacity: 8, topk: 6 }),
                    "edge: top-k 6 > entries (−1 padding), mixed slots",
                    s(5),
                )
                .plan(p),
            );
            let p = RowPlan::runs(&[(0, 20, 3)]);
            out.push(
                Case::new(
                    sa(&p, 1, CompressedKv::Selected { ratio: 4, capacity: 8, topk: 6 }),
                    "edge: −1 and a repeated entry inside the list",
                    s(6),
                )
                .plan(p)
                .holes(),
            );
            // Shapes the CUDA tensor-core form takes with a bf16 cache (head_dim 128, 256, 512;
            // bf16_cache_cases adds that variant): 20 heads (a tile of 16 and one of 4 with
            // masked rows), key splits of several 64-key chunks (the online softmax across
            // chunks), a prefill chunk of one split with fresh rows in the window, and
            // selected entries with −1 and repeats.
            let tc = |plan: &RowPlan, head_dim: usize, slots, window, compressed| {
                attn(plan, 20, head_dim, slots, window, compressed, (head_dim as f32).powf(-0.5))
            };
            let p = RowPlan::runs(&[(0, 2100, 9)]);
            out.push(
                Case::new(
                    tc(&p, 128, 1, 64, CompressedKv::All { ratio: 1, capacity: 2200 }),
                    "tiles: 20 heads × 128, 9 rows over ~2.2K keys (several chunks a split)",
                    s(7),
                )
                .plan(p)
                .large(),
            );
            let p = RowPlan::runs(&[(0, 300, 70)]);
            out.push(
                Case::new(
                    tc(&p, 256, 1, 128, CompressedKv::All { ratio: 4, capacity: 100 }),
                    "tiles: 20 heads × 256, a 70-row prefill chunk (one split, fresh rows)",
                    s(8),
                )
                .plan(p)
                .large(),
            );
            let p = RowPlan::runs(&[(0, 150, 2), (1, 37, 1)]);
            out.push(
                Case::new(
                    tc(&p, 512, 2, 16, CompressedKv::Selected { ratio: 4, capacity: 40, topk: 90 }),
                    "tiles: 20 heads × 512, top-k 90 with −1 and repeated entries",
                    s(9),
                )
                .plan(p)
                .holes()
                .large(),
            );
            for (i, (name, c)) in reals.iter().enumerate() {
                let i = i as u64;
                let scale = (1.0 / (c.head_dim as f64).sqrt()) as f32;
                let a =
                    |plan: &RowPlan, compressed| attn(plan, c.n_heads, c.head_dim, 2, c.window_size, compressed, scale);
                let cap = c.index_topk + 64;
                let p = RowPlan::decode(&[4 * cap - 1, 300]);
                out.push(
                    Case::new(
                        a(&p, CompressedKv::Selected { ratio: 4, capacity: cap, topk: c.index_topk }),
                        format!("{name}: CSA, {} heads × {}, top-k {}", c.n_heads, c.head_dim, c.index_topk),
                        s(10 + i),
                    )
                    .plan(p)
                    .large(),
                );
                let p = RowPlan::decode(&[2047, 129]);
                out.push(
                    Case::new(
                        a(&p, CompressedKv::All { ratio: 128, capacity: 16 }),
                        format!("{name}: HCA, ratio 128"),
                        s(20 + i),
                    )
                    .plan(p)
                    .large(),
                );
                let p = RowPlan::runs(&[(0, 120, 3), (1, 7, 1)]);
                out.push(
                    Case::new(
                        a(&p, CompressedKv::None),
                        format!("{name}: window only, chunk across the window"),
                        s(30 + i),
                    )
                    .plan(p)
                    .large(),
                );
            }
        }
        // ---- moe_gate ----
        17 => {
            for hashed in [false, true] {
                out.extend(randoms(r, |r| {
                    let (rows, dim, experts, k, rs, vocab, sd) =
                        draw(r, (1usize..=9, 1usize..=300, 2usize..=64, 1usize..=8, 1.0f32..2.5, 1usize..=300, seed_s));
                    let mode = if hashed { GateMode::Hashed { vocab } } else { GateMode::Scored };
                    Case::new(
                        Op::MoeGate(MoeGate { rows, dim, experts, topk: k.min(experts), route_scale: rs, mode }),
                        "",
                        sd,
                    )
                }));
            }
            let g = |rows, experts, topk, mode| {
                Op::MoeGate(MoeGate { rows, dim: 48, experts, topk, route_scale: 1.5, mode })
            };
            out.push(Case::new(g(1, 8, 2, GateMode::Scored), "edge: one token", s(0)));
            out.push(
                Case::new(g(6, 8, 2, GateMode::Scored), "edge: all tokens routed to expert 5 (bias)", s(1))
                    .one_expert(5),
            );
            out.push(
                Case::new(g(6, 8, 1, GateMode::Hashed { vocab: 50 }), "edge: all tokens hashed to expert 7", s(2))
                    .one_expert(7),
            );
            out.push(Case::new(g(3, 6, 6, GateMode::Scored), "edge: top-k = every expert", s(3)));
            // Prefill-sized: CUDA scores tiles of 32 rows × 32 experts (the last of each partial).
            for (j, mode) in [GateMode::Scored, GateMode::Hashed { vocab: 300 }].into_iter().enumerate() {
                let op = MoeGate { rows: 70, dim: 300, experts: 40, topk: 6, route_scale: 1.5, mode };
                out.push(Case::new(Op::MoeGate(op), "prefill-sized: 70 tokens, 40 experts", s(4 + j as u64)));
            }
            for (i, (name, c)) in reals.iter().enumerate() {
                let i = i as u64;
                let g = |mode| {
                    Op::MoeGate(MoeGate {
                        rows: 3,
                        dim: c.dim,
                        experts: c.n_routed_experts,
                        topk: c.n_activated_experts,
                        route_scale: c.route_scale,
                        mode,
                    })
                };
                out.push(
                    Case::new(
                        g(GateMode::Scored),
                        format!("{name}: {} experts, top-{}", c.n_routed_experts, c.n_activated_experts),
                        s(10 + i),
                    )
                    .large(),
                );
                out.push(
                    Case::new(
                        g(GateMode::Hashed { vocab: c.vocab_size }),
                        format!("{name}: hash layer, vocab {}", c.vocab_size),
                        s(20 + i),
                    )
                    .large(),
                );
            }
        }
        // ---- moe_experts ----
        18 => {
            for format in [WeightFormat::Fp4Group32, WeightFormat::Fp8Block128] {
                out.extend(randoms(r, |r| {
                    let (rows, dk, ik, experts, k, limit, sd) = draw(
                        r,
                        (
                            1usize..=6,
                            1usize..=3,
                            1usize..=4,
                            2usize..=12,
                            1usize..=6,
                            prop_oneof![Just(0.0f32), Just(10.0f32)],
                            seed_s,
                        ),
                    );
                    Case::new(
                        Op::MoeExperts(MoeExperts {
                            rows,
                            dim: 128 * dk,
                            inter: 128 * ik,
                            experts,
                            topk: k.min(experts),
                            swiglu_limit: limit,
                            format,
                        }),
                        "",
                        sd,
                    )
                }));
            }
            let m = |rows, experts, topk| {
                Op::MoeExperts(MoeExperts {
                    rows,
                    dim: 256,
                    inter: 384,
                    experts,
                    topk,
                    swiglu_limit: 10.0,
                    format: WeightFormat::Fp4Group32,
                })
            };
            out.push(Case::new(m(1, 4, 2), "edge: one token", s(0)));
            out.push(Case::new(m(5, 6, 1), "edge: all tokens routed to expert 3 (top-1)", s(1)).one_expert(3));
            out.push(Case::new(m(5, 6, 3), "edge: expert 0 in every row's list", s(2)).one_expert(0));
            // Prefill-sized: many pairs per expert (CUDA tensor-core tiles), and one expert with
            // more pairs than one 64-pair tile.
            for (j, format) in [WeightFormat::Fp4Group32, WeightFormat::Fp8Block128].into_iter().enumerate() {
                let op = MoeExperts { rows: 40, dim: 256, inter: 384, experts: 8, topk: 6, swiglu_limit: 10.0, format };
                out.push(Case::new(Op::MoeExperts(op), "prefill: 40 rows × top-6 of 8", s(3 + j as u64)));
            }
            out.push(Case::new(m(70, 6, 1), "prefill: 70 rows all routed to expert 3 (top-1)", s(5)).one_expert(3));
            for (i, (name, c)) in reals.iter().enumerate() {
                let i = i as u64;
                let e = if i == 0 { 3 } else { 2 };
                let op = MoeExperts {
                    rows: 2,
                    dim: c.dim,
                    inter: c.moe_inter_dim,
                    experts: e,
                    topk: 2,
                    swiglu_limit: c.swiglu_limit,
                    format: WeightFormat::Fp4Group32,
                };
                out.push(
                    Case::new(
                        Op::MoeExperts(op.clone()),
                        format!("{name}: dim {} inter {} (experts cut to {e})", c.dim, c.moe_inter_dim),
                        s(10 + i),
                    )
                    .large(),
                );
                let op = MoeExperts { rows: 1, ..op };
                out.push(
                    Case::new(Op::MoeExperts(op), format!("{name}: decode, one row (experts cut to {e})"), s(30 + i))
                        .large(),
                );
                let op = MoeExperts {
                    rows: 3,
                    dim: 128,
                    inter: 128,
                    experts: c.n_routed_experts,
                    topk: c.n_activated_experts,
                    swiglu_limit: c.swiglu_limit,
                    format: WeightFormat::Fp4Group32,
                };
                out.push(
                    Case::new(
                        Op::MoeExperts(op),
                        format!(
                            "{name}: {} experts, top-{} (dims cut to 128)",
                            c.n_routed_experts, c.n_activated_experts
                        ),
                        s(20 + i),
                    )
                    .one_expert(c.n_routed_experts - 1)
                    .large(),
                );
            }
        }
        // ---- swiglu ----
        19 => {
            out.extend(randoms(r, |r| {
                let (rows, width, limit, sd) =
                    draw(r, (1usize..=9, 1usize..=300, prop_oneof![Just(0.0f32), Just(10.0f32), 0.5f32..20.0], seed_s));
                Case::new(Op::SwiGlu(SwiGlu { rows, width, limit }), "", sd)
            }));
            out.push(Case::new(Op::SwiGlu(SwiGlu { rows: 1, width: 100, limit: 10.0 }), "edge: one token", s(0)));
            out.push(Case::new(
                Op::SwiGlu(SwiGlu { rows: 3, width: 100, limit: 0.0 }),
                "edge: clamp disabled (limit 0)",
                s(1),
            ));
            for (i, (name, c)) in reals.iter().enumerate() {
                let op = SwiGlu { rows: 2, width: c.moe_inter_dim, limit: c.swiglu_limit };
                out.push(
                    Case::new(
                        Op::SwiGlu(op),
                        format!("{name}: shared expert, width {}", c.moe_inter_dim),
                        s(10 + i as u64),
                    )
                    .large(),
                );
            }
        }
        // ---- sample_tokens ----
        20 => {
            for temperature in [0.0f32, 0.6] {
                out.extend(randoms(r, |r| {
                    let (rows, vocab, t, sd) = draw(r, (1usize..=5, 1usize..=5000, 0.05f32..2.0, seed_s));
                    let temperature = if temperature == 0.0 { 0.0 } else { t };
                    Case::new(Op::SampleTokens(SampleTokens { rows, vocab, temperature }), "", sd)
                }));
            }
            let t = |rows, vocab, temperature| Op::SampleTokens(SampleTokens { rows, vocab, temperature });
            out.push(Case::new(t(4, 300, 0.0), "edge: greedy over ties, NaN and −∞", s(0)).specials());
            out.push(Case::new(t(4, 300, 1.0), "edge: sampling over ties, NaN and −∞", s(1)).specials());
            out.push(Case::new(t(3, 1, 0.8), "edge: a one-token vocabulary", s(2)));
            out.push(Case::new(t(2, 5000, 1e-3), "edge: temperature 1e-3", s(3)));
            for (i, (name, c)) in reals.iter().enumerate() {
                let i = i as u64;
                for (j, temperature) in [0.0f32, 0.6].into_iter().enumerate() {
                    let label = format!("{name}: vocab {}, temperature {temperature}", c.vocab_size);
                    out.push(Case::new(t(2, c.vocab_size, temperature), label, s(10 + 2 * i + j as u64)).large());
                }
            }
        }
        _ => panic!("op kind {kind} has no case generator: add one to conformance::kind_cases"),
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------------

/// Activation rows with per-row scales from 1e-3 to 1e2 (so block scales vary).
fn activations(rng: &mut Rng, rows: usize, width: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(rows * width);
    for _ in 0..rows {
        let scale = 10f32.powf(rng.uniform(-3.0, 2.0));
        v.extend(rng.normals(width, scale));
    }
    v
}

/// Valid e4m3 codes (never 0x7F / 0xFF, the NaN codes).
fn e4m3_codes(rng: &mut Rng, n: usize) -> Vec<u8> {
    rng.bytes(n).into_iter().map(|b| if b & 0x7F == 0x7F { b - 1 } else { b }).collect()
}

/// e8m0 scale bytes in `lo..=hi` (127 = 1.0).
fn e8m0(rng: &mut Rng, n: usize, lo: u8, hi: u8) -> Vec<u8> {
    (0..n).map(|_| rng.range(lo as usize, hi as usize + 1) as u8).collect()
}

/// The weight tensors of one `[out, inp]` matrix (stacked `batch` times) in `format`, with
/// values of roughly unit-variance products.
fn weights(rng: &mut Rng, format: WeightFormat, stacked: Option<usize>, out: usize, inp: usize) -> Vec<HostTensor> {
    let specs = format.weight_specs(out, inp);
    let batch = stacked.unwrap_or(1);
    let shape = |i: usize| {
        let mut s = specs[i].shape.clone();
        if let Some(b) = stacked {
            s.insert(0, b);
        }
        s
    };
    let n = batch * out * inp;
    let amp = (3.0 / inp.max(1) as f32).sqrt();
    match format {
        WeightFormat::F32 => vec![HostTensor::f32(&shape(0), &rng.uniforms(n, amp))],
        WeightFormat::Bf16 => {
            let v = rng.uniforms(n, amp);
            vec![HostTensor::raw(&shape(0), DType::BF16, dtype::bf16_bytes(&v))]
        }
        WeightFormat::Fp8Block128 => {
            // Random codes reach ±448; scales 2^-14..2^-10 keep W around 1/√inp for inp ≤ 7168.
            let ns: usize = specs[1].shape.iter().product::<usize>() * batch;
            vec![
                HostTensor::raw(&shape(0), DType::F8E4M3, e4m3_codes(rng, n)),
                HostTensor::raw(&shape(1), DType::F8E8M0, e8m0(rng, ns, 113, 117)),
            ]
        }
        WeightFormat::Fp4Group32 => {
            let ns: usize = specs[1].shape.iter().product::<usize>() * batch;
            vec![
                HostTensor::raw(&shape(0), DType::F4E2M1x2, rng.bytes(n / 2)),
                HostTensor::raw(&shape(1), DType::F8E8M0, e8m0(rng, ns, 120, 124)),
            ]
        }
    }
}

/// Values on the e2m1 grid times a power-of-two scale per 32-block, as the indexer's queries and
/// keys are after their FP4 simulation (exact ties and ReLU zeros are common, as in the model).
fn e2m1_grid(rng: &mut Rng, n: usize, width: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    let mut s = 1.0;
    for i in 0..n {
        if i % width.clamp(1, 32) == 0 {
            s = dtype::exp2i(rng.range(0, 4) as i32 - 3);
        }
        v.push(dtype::e2m1_to_f32((rng.next_u64() & 0xF) as u8) * s);
    }
    v
}

/// Rows exercising a quantizer's edges: RNE midpoints between neighbouring grid values (the
/// block's amax pinned at `max·2^k` so the scale is exactly `2^k`), a row whose amax is below
/// the floor, and an all-zero row; the remaining rows are ordinary noise.
fn quant_edge_rows(rng: &mut Rng, rows: usize, width: usize, block: usize, format: QuantFormat) -> Vec<f32> {
    let grid: Vec<f32> = match format {
        QuantFormat::Fp8E4M3 => (0u8..=0x7E).map(dtype::e4m3_to_f32).collect(),
        QuantFormat::Fp4E2M1 => dtype::E2M1_VALUES.to_vec(),
    };
    let max = *grid.last().expect("grid");
    let mut v = activations(rng, rows, width);
    for r in 0..rows {
        let row = &mut v[r * width..(r + 1) * width];
        match r % 4 {
            0 => {
                for (b, chunk) in row.chunks_mut(block.max(1)).enumerate() {
                    let s = dtype::exp2i(b as i32 % 5 - 2);
                    for (i, x) in chunk.iter_mut().enumerate() {
                        let g = rng.range(0, grid.len() - 1);
                        let mid = (grid[g] + grid[g + 1]) / 2.0 * s;
                        *x = if i == 0 {
                            max * s
                        } else if i % 2 == 0 {
                            -mid
                        } else {
                            mid
                        };
                    }
                }
            }
            1 => row.iter_mut().for_each(|x| *x *= 1e-9),
            2 => row.fill(0.0),
            _ => {}
        }
    }
    v
}

/// Plausible compressor state for one slot whose next row is position `p0`: rows of blocks
/// already seen hold finite values, rows never written hold kv 0 and score −∞.
fn compressor_state(rng: &mut Rng, c: &Compressor, p0: usize, kv: &mut [f32], score: &mut [f32]) {
    let (ratio, cd) = (c.ratio, c.coff() * c.width);
    let (b, i0) = (p0 / ratio, p0 % ratio);
    let mut fill = |row: usize, finite: bool, rng: &mut Rng| {
        let (k, s) = (&mut kv[row * cd..(row + 1) * cd], &mut score[row * cd..(row + 1) * cd]);
        if finite {
            k.copy_from_slice(&rng.normals(cd, 1.0));
            s.copy_from_slice(&rng.normals(cd, 2.0));
        } else {
            k.fill(0.0);
            s.fill(f32::NEG_INFINITY);
        }
    };
    let cur = if c.overlap { ratio } else { 0 };
    if c.overlap {
        for t in 0..ratio {
            fill(t, b >= 1, rng);
        }
    }
    for t in 0..ratio {
        // Rows of this block already fed, or stale rows of an earlier block.
        fill(cur + t, t < i0 || b >= 1, rng);
    }
}

#[allow(clippy::too_many_lines)]
/// The stream inputs of an mHC op: `x [r, m, d]`, or with `after_post` HcPost's `f`, `x_prev`,
/// `post_prev` and `comb_prev` (also HcPost's own inputs).
fn hc_stream_inputs(rng: &mut Rng, after_post: bool, r: usize, m: usize, d: usize) -> Vec<HostTensor> {
    if !after_post {
        return vec![HostTensor::f32(&[r, m, d], &activations(rng, r, m * d))];
    }
    let post: Vec<f32> = (0..r * m).map(|_| rng.uniform(0.0, 2.0)).collect();
    let comb: Vec<f32> = (0..r * m * m).map(|_| rng.uniform(0.0, 1.0)).collect();
    vec![
        HostTensor::f32(&[r, d], &activations(rng, r, d)),
        HostTensor::f32(&[r, m, d], &rng.normals(r * m * d, 1.0)),
        HostTensor::f32(&[r, m], &post),
        HostTensor::f32(&[r, m, m], &comb),
    ]
}

fn build_data(case: &Case) -> CaseData {
    let mut rng = Rng::new(case.seed);
    let rng = &mut rng;
    let st = &case.setup;
    let plan = || st.plan.clone().expect("this op needs a row plan");
    let f32t = HostTensor::f32;
    let i32t = HostTensor::i32;
    let freqs_for = |rope_dim: usize| st.freqs.clone().unwrap_or_else(|| generic_freqs(rope_dim));
    let (inputs, outputs): (Vec<HostTensor>, Vec<Option<HostTensor>>) = match &case.op {
        Op::Embed(o) => {
            let mut ids: Vec<i32> = (0..o.rows).map(|_| rng.range(0, o.vocab) as i32).collect();
            ids[0] = o.vocab as i32 - 1;
            let n = o.vocab * o.dim;
            let table = match o.table_dtype {
                DType::F32 => f32t(&[o.vocab, o.dim], &rng.normals(n, 1.0)),
                DType::BF16 => HostTensor::raw(&[o.vocab, o.dim], DType::BF16, dtype::bf16_bytes(&rng.normals(n, 1.0))),
                DType::F16 => {
                    // Any finite f16 bit pattern (subnormals included).
                    let bits: Vec<u8> = (0..n)
                        .flat_map(|_| {
                            let b = (rng.next_u64() as u16) & 0xBFFF;
                            (if b & 0x7C00 == 0x7C00 { b & 0xBBFF } else { b }).to_le_bytes()
                        })
                        .collect();
                    HostTensor::raw(&[o.vocab, o.dim], DType::F16, bits)
                }
                other => panic!("no embedding table generator for {other}"),
            };
            (vec![i32t(&[o.rows], &ids), table], vec![None])
        }
        Op::HcExpand(o) => (vec![f32t(&[o.rows, o.dim], &activations(rng, o.rows, o.dim))], vec![None]),
        Op::Add(o) => (
            vec![
                f32t(&[o.rows, o.width], &activations(rng, o.rows, o.width)),
                f32t(&[o.b_rows, o.width], &activations(rng, o.b_rows, o.width)),
            ],
            vec![None],
        ),
        Op::GatherRows(o) => {
            let mut idx: Vec<i32> = (0..o.out_rows).map(|_| rng.range(0, o.rows) as i32).collect();
            idx[o.out_rows - 1] = o.rows as i32 - 1;
            (vec![f32t(&[o.rows, o.width], &activations(rng, o.rows, o.width)), i32t(&[o.out_rows], &idx)], vec![None])
        }
        Op::HcPre(o) => {
            let (m, d, mw) = (o.mult, o.dim, o.mix_width());
            let mut ins = hc_stream_inputs(rng, o.after_post, o.rows, m, d);
            ins.extend([
                f32t(&[mw, m * d], &rng.normals(mw * m * d, 1.0 / ((m * d) as f32).sqrt())),
                f32t(&[mw], &rng.normals(mw, 0.5)),
                f32t(&[3], &[rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0)]),
                f32t(&[d], &(0..d).map(|_| rng.uniform(0.5, 1.5)).collect::<Vec<_>>()),
            ]);
            (ins, vec![None; 3 + o.after_post as usize])
        }
        Op::HcPost(o) => (hc_stream_inputs(rng, true, o.rows, o.mult, o.dim), vec![None]),
        Op::HcHead(o) => {
            let (m, d) = (o.mult, o.dim);
            let mut ins = hc_stream_inputs(rng, o.after_post, o.rows, m, d);
            ins.extend([
                f32t(&[m, m * d], &rng.normals(m * m * d, 1.0 / ((m * d) as f32).sqrt())),
                f32t(&[m], &rng.normals(m, 0.5)),
                f32t(&[1], &[rng.uniform(0.5, 2.0)]),
                f32t(&[d], &(0..d).map(|_| rng.uniform(0.5, 1.5)).collect::<Vec<_>>()),
            ]);
            (ins, vec![None; 1 + o.after_post as usize])
        }
        Op::RmsNorm(o) => {
            let mut x = activations(rng, o.rows, o.dim);
            if st.quant_edges {
                x[o.dim..2 * o.dim].fill(0.0);
            }
            let mut ins = vec![f32t(&[o.rows, o.dim], &x)];
            if o.weighted {
                ins.push(f32t(&[o.dim], &(0..o.dim).map(|_| rng.uniform(0.5, 1.5)).collect::<Vec<_>>()));
            }
            if let Some(r) = o.rope {
                ins.push(f32t(&[r.rope_dim / 2], &freqs_for(r.rope_dim)));
                ins.push(i32t(&[o.rows / r.heads], &plan().positions));
            }
            (ins, vec![None])
        }
        Op::Linear(o) => {
            let x = if st.quant_edges {
                quant_edge_rows(rng, o.rows, o.in_features, 128, QuantFormat::Fp8E4M3)
            } else {
                activations(rng, o.rows, o.in_features)
            };
            let mut ins = vec![f32t(&[o.rows, o.in_features], &x)];
            ins.extend(weights(rng, o.format, None, o.out_features, o.in_features));
            (ins, vec![None])
        }
        Op::GroupedLinear(o) => {
            let (g, ipg, opg) = (o.groups, o.in_per_group, o.out_per_group);
            let mut ins = vec![f32t(&[o.rows, g * ipg], &activations(rng, o.rows, g * ipg))];
            ins.extend(weights(rng, o.format, None, g * opg, ipg));
            (ins, vec![None])
        }
        Op::Rope(o) => {
            let p = plan();
            let x = rng.normals(o.rows * o.heads * o.head_dim, 1.0);
            (
                vec![f32t(&[o.rope_dim / 2], &freqs_for(o.rope_dim)), i32t(&[o.rows], &p.positions)],
                vec![Some(f32t(&[o.rows, o.heads, o.head_dim], &x))],
            )
        }
        Op::QuantSim(o) => {
            let x = if st.quant_edges {
                quant_edge_rows(rng, o.rows, o.dim, o.block, o.format)
            } else {
                activations(rng, o.rows, o.dim)
            };
            (vec![], vec![Some(f32t(&[o.rows, o.dim], &x))])
        }
        Op::Hadamard(o) => (vec![], vec![Some(f32t(&[o.rows, o.dim], &activations(rng, o.rows, o.dim)))]),
        Op::WindowStore(o) => {
            let p = plan();
            let cache_t = |shape: &[usize], v: &[f32]| HostTensor::cache(shape, o.cache_dtype, v);
            (
                vec![
                    f32t(&[o.rows, o.dim], &rng.normals(o.rows * o.dim, 1.0)),
                    i32t(&[o.rows], &p.slots),
                    i32t(&[o.rows], &p.positions),
                ],
                vec![Some(cache_t(&[o.slots, o.window, o.dim], &rng.normals(o.slots * o.window * o.dim, 1.0)))],
            )
        }
        Op::Compressor(o) => {
            let p = plan();
            let (r, s, cd, d) = (o.rows, o.slots, o.coff() * o.width, o.width);
            let rows_per_slot = o.coff() * o.ratio;
            let (mut skv, mut ssc) = (vec![0f32; s * rows_per_slot * cd], vec![0f32; s * rows_per_slot * cd]);
            let mut cache = vec![0f32; s * o.capacity * d];
            for slot in 0..s {
                let p0 = p.run_start(slot).unwrap_or_else(|| rng.range(0, o.capacity * o.ratio));
                let span = slot * rows_per_slot * cd..(slot + 1) * rows_per_slot * cd;
                compressor_state(rng, o, p0, &mut skv[span.clone()], &mut ssc[span]);
                // Entries finished before p0 hold plausible values; later ones are still zero.
                for j in 0..(p0 / o.ratio).min(o.capacity) {
                    let at = (slot * o.capacity + j) * d;
                    cache[at..at + d].copy_from_slice(&rng.normals(d, 1.0));
                }
            }
            (
                vec![
                    f32t(&[r, cd], &rng.normals(r * cd, 1.0)),
                    f32t(&[r, cd], &rng.normals(r * cd, 2.0)),
                    f32t(&[o.ratio, cd], &rng.normals(o.ratio * cd, 0.5)),
                    f32t(&[d], &(0..d).map(|_| rng.uniform(0.7, 1.3)).collect::<Vec<_>>()),
                    f32t(&[o.rope_dim / 2], &freqs_for(o.rope_dim)),
                    i32t(&[r], &p.slots),
                    i32t(&[r], &p.positions),
                ],
                vec![
                    Some(f32t(&[s, rows_per_slot, cd], &skv)),
                    Some(f32t(&[s, rows_per_slot, cd], &ssc)),
                    Some(HostTensor::cache(&[s, o.capacity, d], o.cache_dtype, &cache)),
                ],
            )
        }
        Op::IndexerTopK(o) => {
            let p = plan();
            let (r, h, d) = (o.rows, o.heads, o.head_dim);
            (
                vec![
                    f32t(&[r, h, d], &e2m1_grid(rng, r * h * d, d)),
                    f32t(&[r, h], &rng.normals(r * h, 1.0)),
                    HostTensor::cache(
                        &[o.slots, o.capacity, d],
                        o.cache_dtype,
                        &e2m1_grid(rng, o.slots * o.capacity * d, d),
                    ),
                    i32t(&[r], &p.slots),
                    i32t(&[r], &p.positions),
                ],
                vec![None, None],
            )
        }
        Op::SparseAttention(o) => {
            let p = plan();
            let (r, h, d, s, w) = (o.rows, o.heads, o.head_dim, o.slots, o.window);
            let mut ins = vec![
                f32t(&[r, h, d], &rng.normals(r * h * d, 1.0)),
                f32t(&[r, d], &rng.normals(r * d, 1.0)),
                HostTensor::cache(&[s, w, d], o.cache_dtype, &rng.normals(s * w * d, 1.0)),
                f32t(&[h], &rng.normals(h, 1.0)),
                i32t(&[r], &p.slots),
                i32t(&[r], &p.positions),
            ];
            match o.compressed {
                CompressedKv::None => {}
                CompressedKv::All { capacity, .. } => {
                    ins.push(HostTensor::cache(&[s, capacity, d], o.cache_dtype, &rng.normals(s * capacity * d, 1.0)))
                }
                CompressedKv::Selected { ratio, capacity, topk } => {
                    ins.push(HostTensor::cache(&[s, capacity, d], o.cache_dtype, &rng.normals(s * capacity * d, 1.0)));
                    let mut idx = vec![-1i32; r * topk];
                    for row in 0..r {
                        let n = ((p.positions[row] as usize + 1) / ratio).min(capacity);
                        let chosen = rng.distinct(topk.min(n), n);
                        let list = &mut idx[row * topk..(row + 1) * topk];
                        for (slot, j) in list.iter_mut().zip(&chosen) {
                            *slot = *j as i32;
                        }
                        if st.holes && topk >= 3 && !chosen.is_empty() {
                            list[1] = -1;
                            list[topk - 1] = chosen[0] as i32;
                        }
                    }
                    ins.push(i32t(&[r, topk], &idx));
                }
            }
            (ins, vec![None])
        }
        Op::MoeGate(o) => {
            let (r, d, e, k) = (o.rows, o.dim, o.experts, o.topk);
            let mut ins = vec![
                f32t(&[r, d], &rng.normals(r * d, 1.0)),
                f32t(&[e, d], &rng.normals(e * d, 1.0 / (d as f32).sqrt())),
            ];
            match o.mode {
                GateMode::Scored => {
                    let mut bias = rng.normals(e, 0.1);
                    if let Some(x) = st.one_expert {
                        bias[x] = 100.0;
                    }
                    ins.push(f32t(&[e], &bias));
                }
                GateMode::Hashed { vocab } => {
                    let mut table = Vec::with_capacity(vocab * k);
                    for _ in 0..vocab {
                        let mut row = rng.distinct(k, e);
                        if let Some(x) = st.one_expert {
                            if !row.contains(&x) {
                                row[0] = x;
                            }
                        }
                        table.extend(row.into_iter().map(|v| v as i32));
                    }
                    ins.push(i32t(&[vocab, k], &table));
                    let mut ids: Vec<i32> = (0..r).map(|_| rng.range(0, vocab) as i32).collect();
                    ids[0] = vocab as i32 - 1;
                    ins.push(i32t(&[r], &ids));
                }
            }
            (ins, vec![None, None])
        }
        Op::MoeExperts(o) => {
            let (r, k, e) = (o.rows, o.topk, o.experts);
            let mut experts = Vec::with_capacity(r * k);
            let mut wts = Vec::with_capacity(r * k);
            for _ in 0..r {
                let mut row = rng.distinct(k, e);
                if let Some(x) = st.one_expert {
                    if !row.contains(&x) {
                        row[0] = x;
                    }
                }
                experts.extend(row.iter().map(|&v| v as i32));
                let raw: Vec<f32> = (0..k).map(|_| rng.uniform(0.1, 1.0)).collect();
                let sum: f32 = raw.iter().sum();
                wts.extend(raw.iter().map(|w| w / sum * 1.5));
            }
            let mut ins =
                vec![f32t(&[r, o.dim], &activations(rng, r, o.dim)), i32t(&[r, k], &experts), f32t(&[r, k], &wts)];
            ins.extend(weights(rng, o.format, Some(e), o.inter, o.dim));
            ins.extend(weights(rng, o.format, Some(e), o.inter, o.dim));
            ins.extend(weights(rng, o.format, Some(e), o.dim, o.inter));
            (ins, vec![None])
        }
        Op::SwiGlu(o) => {
            let n = o.rows * o.width;
            (
                vec![f32t(&[o.rows, o.width], &rng.normals(n, 8.0)), f32t(&[o.rows, o.width], &rng.normals(n, 8.0))],
                vec![None],
            )
        }
        Op::SampleTokens(o) => {
            let (r, v) = (o.rows, o.vocab);
            let mut logits = rng.normals(r * v, 3.0);
            if st.specials && v >= 8 {
                // Row 0: the maximum twice; row 1: NaN before and at the maximum's place, −∞
                // elsewhere; row 2: every logit NaN; row 3: −∞ except two equal values.
                let row = |k: usize| k * v..(k + 1) * v;
                logits[row(0)][v / 3] = 50.0;
                logits[row(0)][2 * v / 3] = 50.0;
                for (j, x) in logits[row(1)].iter_mut().enumerate() {
                    *x = if j % 5 == 0 {
                        f32::NAN
                    } else if j % 7 == 0 {
                        f32::NEG_INFINITY
                    } else {
                        *x
                    };
                }
                logits[row(1)][1] = 60.0;
                logits[row(1)][0] = f32::NAN;
                logits[row(2)].fill(f32::NAN);
                if r > 3 {
                    logits[row(3)].fill(f32::NEG_INFINITY);
                    logits[row(3)][v - 2] = -1.0;
                    logits[row(3)][v - 1] = -1.0;
                }
            }
            let states: Vec<u8> = (0..r).flat_map(|_| rng.next_u64().to_le_bytes()).collect();
            (vec![f32t(&[r, v], &logits)], vec![None, Some(HostTensor::raw(&[r], DType::I64, states))])
        }
    };
    CaseData { inputs, outputs }
}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

/// What went wrong in a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FailureKind {
    /// `supports()` answered No.
    Unsupported,
    /// A backend call returned an error (or the reference could not run the case).
    Error,
    /// Output elements still hold the poison: never written (or downloaded before the work).
    Poisoned,
    /// NaN, or ±∞ where the reference is finite.
    NonFinite,
    /// A canary next to an output changed: an out-of-bounds write.
    Canary,
    /// An input's bytes changed.
    InputModified,
    /// NMSE above the op's threshold.
    Nmse,
    /// Elements that must be bit-identical (or single quantization flips) differ.
    Mismatch,
    /// Routing / indexer sets disagree beyond near-ties.
    Decisions,
    /// A cache element the reference left alone was changed.
    StaleModified,
}

impl FailureKind {
    pub fn name(self) -> &'static str {
        match self {
            FailureKind::Unsupported => "unsupported",
            FailureKind::Error => "error",
            FailureKind::Poisoned => "poisoned",
            FailureKind::NonFinite => "non-finite",
            FailureKind::Canary => "canary",
            FailureKind::InputModified => "input modified",
            FailureKind::Nmse => "nmse",
            FailureKind::Mismatch => "mismatch",
            FailureKind::Decisions => "decisions",
            FailureKind::StaleModified => "stale cache modified",
        }
    }
}

/// One failed check of one case.
#[derive(Clone, Debug)]
pub struct Failure {
    pub kind: FailureKind,
    /// The tensor it is about (`"run"` for call errors).
    pub tensor: String,
    pub detail: String,
}

impl Failure {
    fn new(kind: FailureKind, tensor: impl Into<String>, detail: impl Into<String>) -> Self {
        Failure { kind, tensor: tensor.into(), detail: detail.into() }
    }
}

/// The outcome of one case.
#[derive(Clone, Debug)]
pub struct CaseResult {
    pub op: &'static str,
    pub variant: String,
    pub label: String,
    pub descriptor: String,
    /// The thresholds of the op's outputs, as text (`exact`, `1e-9`, `sets / 1e-9`).
    pub threshold_text: String,
    /// Worst NMSE over the compared f32 outputs (tolerated flips excluded) and the threshold it
    /// was held to; the worst is the output with the largest NMSE / threshold.
    pub nmse: Option<f64>,
    pub threshold: Option<f64>,
    /// Lowest decision agreement (rows whose sets agree, near-ties forgiven) over the outputs.
    pub agreement: Option<f64>,
    /// Quantization flips tolerated (compressor elements, MoE rows).
    pub flips: usize,
    pub unsupported: Option<String>,
    /// Why the backend ran this case in bf16 numerics (`None`: f32, the HAL's contract).
    pub numerics: Option<String>,
    pub failures: Vec<Failure>,
    pub seconds: f64,
}

impl CaseResult {
    fn note_nmse(&mut self, nmse: f64, thr: f64) {
        let ratio = |n: f64, t: f64| {
            if t > 0.0 {
                n / t
            } else if n > 0.0 {
                f64::INFINITY
            } else {
                0.0
            }
        };
        let worse = match (self.nmse, self.threshold) {
            (Some(n), Some(t)) => ratio(nmse, thr) > ratio(n, t) || (ratio(nmse, thr) == ratio(n, t) && nmse > n),
            _ => true,
        };
        if worse {
            self.nmse = Some(nmse);
            self.threshold = Some(thr);
        }
    }
    fn note_agreement(&mut self, a: f64) {
        self.agreement = Some(self.agreement.map_or(a, |b| b.min(a)));
    }
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

// ---------------------------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------------------------

/// What [`run_suite`] runs and how it judges.
#[derive(Clone, Debug)]
pub struct SuiteOptions {
    pub seed: u64,
    /// Count `supports() == No` as not failing (it is listed either way).
    pub allow_unsupported: bool,
    /// Include the real V4-Flash / V4-Pro shapes (the slow cases).
    pub include_large: bool,
    /// Keep at most this many cases of each op variant (the first ones: random, then edges).
    pub max_cases_per_variant: Option<usize>,
    /// Only these op names (`Op::name()`).
    pub only_ops: Option<Vec<String>>,
    /// Print one line per case to stderr.
    pub progress: bool,
}

impl Default for SuiteOptions {
    fn default() -> Self {
        SuiteOptions {
            seed: DEFAULT_SEED,
            allow_unsupported: false,
            include_large: true,
            max_cases_per_variant: None,
            only_ops: None,
            progress: false,
        }
    }
}

impl SuiteOptions {
    /// The cases these options select from [`cases`].
    pub fn select(&self) -> Vec<Case> {
        let mut per: BTreeMap<String, usize> = BTreeMap::new();
        cases(self.seed)
            .into_iter()
            .filter(|c| self.include_large || !c.large)
            .filter(|c| match &self.only_ops {
                Some(o) => o.iter().any(|n| n == c.op.name()),
                None => true,
            })
            .filter(|c| {
                let n = per.entry(c.variant()).or_default();
                *n += 1;
                !matches!(self.max_cases_per_variant, Some(m) if *n > m)
            })
            .collect()
    }
}

/// Runs every selected case on `under_test` and on `reference` and compares them.
pub fn run_suite(under_test: &dyn Backend, reference: &dyn Backend, opts: &SuiteOptions) -> SuiteReport {
    run_cases(under_test, reference, &opts.select(), opts)
}

/// [`run_suite`] over an explicit list of cases.
pub fn run_cases(
    under_test: &dyn Backend,
    reference: &dyn Backend,
    cases: &[Case],
    opts: &SuiteOptions,
) -> SuiteReport {
    let t0 = Instant::now();
    let mut results = Vec::with_capacity(cases.len());
    for (i, case) in cases.iter().enumerate() {
        let res = run_case(under_test, reference, case);
        if opts.progress {
            let status = if res.passed() { "ok".to_string() } else { format!("FAIL ({})", summarize(&res.failures)) };
            eprintln!(
                "[{:>3}/{}] {:<28} {:<60} {:>6.2}s {status}",
                i + 1,
                cases.len(),
                res.variant,
                res.label,
                res.seconds
            );
        }
        results.push(res);
    }
    SuiteReport {
        backend: under_test.info().name.to_string(),
        device: under_test.info().device.clone(),
        reference: format!("{} ({})", reference.info().name, reference.info().device),
        seed: opts.seed,
        allow_unsupported: opts.allow_unsupported,
        cases: results,
        seconds: t0.elapsed().as_secs_f64(),
    }
}

fn summarize(f: &[Failure]) -> String {
    f.iter().map(|f| format!("{} {}", f.kind.name(), f.tensor)).collect::<Vec<_>>().join(", ")
}

/// Host copies of everything a run left behind on the tested backend.
struct Observed {
    outputs: Vec<Vec<u8>>,
    canaries: Vec<[Vec<u8>; 2]>,
    inputs: Vec<Vec<u8>>,
}

fn canary_pattern(k: usize) -> Vec<u8> {
    (0..CANARY_BYTES).map(|i| (i as u8).wrapping_mul(37) ^ (0x5A + k as u8)).collect()
}

fn poison(dtype: DType, n: usize) -> Vec<u8> {
    match dtype {
        DType::F32 => POISON_F32.to_le_bytes().repeat(n),
        DType::I32 => POISON_I32.to_le_bytes().repeat(n),
        other => vec![0xFF; n * other.size()],
    }
}

/// One case, end to end. Never panics on backend misbehaviour: every problem is a `Failure`.
pub fn run_case(under_test: &dyn Backend, reference: &dyn Backend, case: &Case) -> CaseResult {
    let t0 = Instant::now();
    let mut res = CaseResult {
        op: case.op.name(),
        variant: case.variant(),
        label: case.label.clone(),
        descriptor: format!("{:?}", case.op),
        threshold_text: threshold_text(&case.op, false),
        nmse: None,
        threshold: None,
        agreement: None,
        flips: 0,
        unsupported: None,
        numerics: None,
        failures: Vec::new(),
        seconds: 0.0,
    };
    if let Support::No(reason) = under_test.supports(&case.op) {
        res.failures.push(Failure::new(FailureKind::Unsupported, "op", reason.clone()));
        res.unsupported = Some(reason);
        return res;
    }
    let bf16 = match under_test.numerics(&case.op) {
        Numerics::F32 => false,
        Numerics::Bf16 { why } => {
            // Its own report row: the bf16 class has its own thresholds.
            res.variant += " · bf16";
            res.threshold_text = threshold_text(&case.op, true);
            res.numerics = Some(why);
            true
        }
    };
    let data = case.build();
    match run_reference(reference, case, &data) {
        Err(e) => res.failures.push(Failure::new(FailureKind::Error, "reference", e)),
        Ok(want) => match run_tested(under_test, case, &data) {
            Err((stage, e)) => res.failures.push(Failure::new(FailureKind::Error, stage, e)),
            Ok(obs) => check(case, &data, &obs, &want, bf16, &mut res),
        },
    }
    if let Err(e) = under_test.synchronize() {
        res.failures.push(Failure::new(FailureKind::Error, "synchronize", e.to_string()));
    }
    res.seconds = t0.elapsed().as_secs_f64();
    res
}

fn run_reference(b: &dyn Backend, case: &Case, data: &CaseData) -> Result<Vec<Vec<u8>>, String> {
    let e = |e: hal::Error| e.to_string();
    if let Support::No(r) = b.supports(&case.op) {
        return Err(format!("the reference cannot run this case: {r}"));
    }
    let ins = data
        .inputs
        .iter()
        .map(|t| b.upload(&t.shape, t.dtype, &t.bytes))
        .collect::<hal::Result<Vec<_>>>()
        .map_err(e)?;
    let sig = case.op.signature();
    let mut outs = sig
        .outputs
        .iter()
        .zip(&data.outputs)
        .map(|(s, pre)| match pre {
            Some(t) => b.upload(&t.shape, t.dtype, &t.bytes),
            None => b.alloc(&s.shape, s.dtype),
        })
        .collect::<hal::Result<Vec<_>>>()
        .map_err(e)?;
    let in_refs: Vec<&Tensor> = ins.iter().collect();
    let mut out_refs: Vec<&mut Tensor> = outs.iter_mut().collect();
    b.run(&case.op, &in_refs, &mut out_refs).map_err(e)?;
    outs.iter().map(|t| b.download(t)).collect::<hal::Result<Vec<_>>>().map_err(e)
}

fn run_tested(b: &dyn Backend, case: &Case, data: &CaseData) -> Result<Observed, (String, String)> {
    let sig = case.op.signature();
    let err = |stage: String| move |e: hal::Error| (stage, e.to_string());
    let mut ins = Vec::with_capacity(data.inputs.len());
    for (t, s) in data.inputs.iter().zip(&sig.inputs) {
        ins.push(b.upload(&t.shape, t.dtype, &t.bytes).map_err(err(format!("upload {}", s.name)))?);
    }
    // Canary, output, canary: in this allocation order, so each output sits between its two.
    let mut canaries: Vec<[Tensor; 2]> = Vec::new();
    let mut outs: Vec<Tensor> = Vec::new();
    for (k, (s, pre)) in sig.outputs.iter().zip(&data.outputs).enumerate() {
        let pattern = canary_pattern(k);
        let canary = || -> hal::Result<Tensor> {
            let mut c = b.alloc(&[CANARY_BYTES], DType::U8)?;
            b.write(&mut c, 0, &pattern)?;
            Ok(c)
        };
        let before = canary().map_err(err(format!("canary before {}", s.name)))?;
        let mut t = b.alloc(&s.shape, s.dtype).map_err(err(format!("alloc {}", s.name)))?;
        let fill = match pre {
            Some(p) => p.bytes.clone(),
            None => poison(s.dtype, t.numel()),
        };
        if !fill.is_empty() {
            b.write(&mut t, 0, &fill).map_err(err(format!("write {}", s.name)))?;
        }
        let after = canary().map_err(err(format!("canary after {}", s.name)))?;
        canaries.push([before, after]);
        outs.push(t);
    }
    {
        let in_refs: Vec<&Tensor> = ins.iter().collect();
        let mut out_refs: Vec<&mut Tensor> = outs.iter_mut().collect();
        b.run(&case.op, &in_refs, &mut out_refs).map_err(err("run".into()))?;
    }
    // No synchronize here: download itself must wait for the work issued before it.
    let mut obs = Observed { outputs: Vec::new(), canaries: Vec::new(), inputs: Vec::new() };
    for (t, s) in outs.iter().zip(&sig.outputs) {
        obs.outputs.push(b.download(t).map_err(err(format!("download {}", s.name)))?);
    }
    for ([before, after], s) in canaries.iter().zip(&sig.outputs) {
        let d = |t| b.download(t).map_err(err(format!("download canary of {}", s.name)));
        obs.canaries.push([d(before)?, d(after)?]);
    }
    for (t, s) in ins.iter().zip(&sig.inputs) {
        obs.inputs.push(b.download(t).map_err(err(format!("download input {}", s.name)))?);
    }
    Ok(obs)
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

/// How one output is compared with the reference (see the table in the module doc).
#[derive(Clone, Copy, Debug)]
enum Metric {
    Exact,
    Nmse(f64),
    /// Compressor cache: untouched entries exact, written ones flip-tolerant NMSE.
    Cache(f64),
    /// MoE experts: per-row NMSE with tolerated act_quant flips of the intermediate.
    RowFlips(f64),
    IndexerSets,
    GateSets,
    /// Checked together with the gate's experts.
    GateWeights,
    /// Each row's token the reference's, or one whose race key ties it within [`KEY_ULPS`].
    SampledTokens,
}

/// NMSE bound of the bf16 class ([`Numerics::Bf16`]): one bf16 rounding has relative error
/// ≤ 2⁻⁸ (rms 2⁻⁸/√3 ≈ 2.3e-3, NMSE ≈ 5e-6); rounding the inputs and the output of an op adds
/// a few of those, and softmax or ReLU-gated sums can amplify input rounding by the logit
/// magnitude. 1e-4 leaves a ×10 margin over the floor; docs/conformance.md lists the worst
/// values measured per op. Wrong math (a missing sink, a skipped key) is ≳ 1e-2.
pub const BF16_NMSE: f64 = 1e-4;
/// Indexer near-tie tolerance of the bf16 class, relative to the row's largest |score|: a score
/// is a sum over heads of bf16-rounded products, good to a few 2⁻⁸ of its terms.
pub const BF16_SCORE_TOL: f64 = 1.0 / 32.0;
/// The f32 class's indexer near-tie tolerance (see the module table).
const F32_SCORE_TOL: f64 = 1e-5;

/// [`metric`] for an op run in `bf16` numerics: every NMSE bound becomes [`BF16_NMSE`]; exact,
/// set and cache metrics are unchanged (no bf16 kernel produces those outputs).
fn metric_for(op: &Op, output: &str, bf16: bool) -> Metric {
    match metric(op, output) {
        Metric::Nmse(_) if bf16 => Metric::Nmse(BF16_NMSE),
        m => m,
    }
}

fn metric(op: &Op, output: &str) -> Metric {
    match (op, output) {
        (Op::Embed(_) | Op::HcExpand(_) | Op::Add(_) | Op::GatherRows(_) | Op::QuantSim(_) | Op::WindowStore(_), _) => {
            Metric::Exact
        }
        (Op::Compressor(_), "cache") => Metric::Cache(1e-10),
        (Op::Compressor(_), _) => Metric::Exact,
        (Op::SwiGlu(_) | Op::HcPost(_) | Op::Rope(_), _) | (Op::HcPre(_) | Op::HcHead(_), "x") => Metric::Nmse(1e-12),
        (Op::Hadamard(_), _) => Metric::Nmse(1e-11),
        (Op::RmsNorm(_), _) => Metric::Nmse(1e-10),
        (Op::Linear(l), _) if l.format.quantizes_input() => Metric::Nmse(1e-7),
        (Op::Linear(_) | Op::GroupedLinear(_) | Op::HcPre(_) | Op::HcHead(_), _) => Metric::Nmse(1e-9),
        (Op::SparseAttention(_), _) => Metric::Nmse(1e-10),
        (Op::IndexerTopK(_), "indices") => Metric::IndexerSets,
        (Op::IndexerTopK(_), _) => Metric::Nmse(1e-9),
        (Op::MoeGate(_), "experts") => Metric::GateSets,
        (Op::MoeGate(_), _) => Metric::GateWeights,
        (Op::MoeExperts(_), _) => Metric::RowFlips(1e-7),
        (Op::SampleTokens(_), "tokens") => Metric::SampledTokens,
        (Op::SampleTokens(_), _) => Metric::Exact,
    }
}

/// Threshold text for the report (`exact`, `1e-9`, ...), per op variant.
fn threshold_text(op: &Op, bf16: bool) -> String {
    let sig = op.signature();
    let mut parts: Vec<String> = Vec::new();
    for s in &sig.outputs {
        let t = match metric_for(op, s.name, bf16) {
            Metric::Exact => "exact".to_string(),
            Metric::Nmse(t) | Metric::Cache(t) | Metric::RowFlips(t) => format!("{t:.0e}"),
            Metric::IndexerSets | Metric::GateSets => "sets".to_string(),
            Metric::SampledTokens => "tokens".to_string(),
            Metric::GateWeights => "1e-10".to_string(),
        };
        if !parts.contains(&t) {
            parts.push(t);
        }
    }
    parts.join(" / ")
}

fn check(case: &Case, data: &CaseData, obs: &Observed, want: &[Vec<u8>], bf16: bool, res: &mut CaseResult) {
    let sig = case.op.signature();
    for (k, s) in sig.inputs.iter().enumerate() {
        if obs.inputs[k] != data.inputs[k].bytes {
            let n = diff_count(&obs.inputs[k], &data.inputs[k].bytes);
            res.failures.push(Failure::new(FailureKind::InputModified, s.name, format!("{n} bytes changed")));
        }
    }
    for (k, s) in sig.outputs.iter().enumerate() {
        let pattern = canary_pattern(k);
        for (side, got) in ["before", "after"].iter().zip(&obs.canaries[k]) {
            if *got != pattern {
                let n = diff_count(got, &pattern);
                res.failures.push(Failure::new(
                    FailureKind::Canary,
                    s.name,
                    format!("{n} bytes of the canary {side} it changed"),
                ));
            }
        }
    }
    let mut skip = vec![false; sig.outputs.len()];
    for (k, s) in sig.outputs.iter().enumerate() {
        let (got, w) = (&obs.outputs[k], &want[k]);
        if got.len() != w.len() {
            res.failures.push(Failure::new(
                FailureKind::Error,
                s.name,
                format!("downloaded {} bytes, expected {}", got.len(), w.len()),
            ));
            skip[k] = true;
            continue;
        }
        if s.access == Access::Write {
            let p = poison(s.dtype, 1);
            let n = got.chunks_exact(s.dtype.size()).filter(|c| *c == &p[..]).count();
            if n > 0 {
                let total = got.len() / s.dtype.size();
                res.failures.push(Failure::new(
                    FailureKind::Poisoned,
                    s.name,
                    format!("{n} of {total} elements never written"),
                ));
                skip[k] = true;
                continue;
            }
        }
        if matches!(s.dtype, DType::F32 | DType::BF16) {
            let (g, r) = (dtype::decode_to_f32(s.dtype, got), dtype::decode_to_f32(s.dtype, w));
            let bad =
                g.iter().zip(&r).filter(|(g, r)| g.is_nan() || (g.is_infinite() && g.to_bits() != r.to_bits())).count();
            let missing_inf = g.iter().zip(&r).filter(|(g, r)| r.is_infinite() && g.to_bits() != r.to_bits()).count();
            if bad > 0 {
                res.failures.push(Failure::new(
                    FailureKind::NonFinite,
                    s.name,
                    format!("{bad} NaN or unexpected ±∞ elements"),
                ));
                skip[k] = true;
            } else if missing_inf > 0 {
                res.failures.push(Failure::new(
                    FailureKind::Mismatch,
                    s.name,
                    format!("{missing_inf} elements finite where the reference has ±∞"),
                ));
                skip[k] = true;
            }
        }
    }
    for (k, s) in sig.outputs.iter().enumerate() {
        if skip[k] {
            continue;
        }
        let (got, w) = (&obs.outputs[k], &want[k]);
        match metric_for(&case.op, s.name, bf16) {
            Metric::Exact => exact(s.name, s.dtype, got, w, res),
            Metric::Nmse(thr) => {
                let n = nmse(&dtype::bytes_f32(got), &dtype::bytes_f32(w));
                res.note_nmse(n, thr);
                if n.is_nan() || n > thr {
                    res.failures.push(Failure::new(FailureKind::Nmse, s.name, format!("NMSE {n:.3e} > {thr:.0e}")));
                }
            }
            Metric::Cache(thr) => {
                let pre = data.outputs[k].as_ref().expect("cache is read-write");
                let f = |b: &[u8]| dtype::decode_to_f32(s.dtype, b);
                cache_compare(s.name, &f(got), &f(w), &pre.f32s(), thr, res);
            }
            Metric::RowFlips(thr) => {
                let Op::MoeExperts(m) = &case.op else { unreachable!("row flips are for moe_experts") };
                row_flips(s.name, &dtype::bytes_f32(got), &dtype::bytes_f32(w), m, thr, res);
            }
            Metric::IndexerSets => {
                if !skip[1] {
                    let Op::IndexerTopK(o) = &case.op else { unreachable!() };
                    let tol = if bf16 { BF16_SCORE_TOL } else { F32_SCORE_TOL };
                    indexer_sets(o, data, &obs.outputs, want, tol, res);
                }
            }
            Metric::GateSets => {
                if !skip[1] {
                    let Op::MoeGate(o) = &case.op else { unreachable!() };
                    gate_sets(o, data, &obs.outputs, want, res);
                }
            }
            Metric::GateWeights => {}
            Metric::SampledTokens => {
                let Op::SampleTokens(o) = &case.op else { unreachable!() };
                sampled_tokens(o, data, got, w, res);
            }
        }
    }
}

fn diff_count(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x != y).count() + a.len().abs_diff(b.len())
}

/// `Σ (g − w)² / Σ w²` over elements where the reference is finite (∞ positions are checked
/// for equality separately). 0/0 is 0; x/0 is ∞.
pub fn nmse(got: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        if !w.is_finite() {
            continue;
        }
        let d = g as f64 - w as f64;
        num += d * d;
        den += (w as f64) * (w as f64);
    }
    if num.is_nan() {
        f64::INFINITY
    } else if den > 0.0 {
        num / den
    } else if num > 0.0 {
        f64::INFINITY
    } else {
        0.0
    }
}

fn exact(name: &str, dt: DType, got: &[u8], want: &[u8], res: &mut CaseResult) {
    let size = dt.size();
    let diffs: Vec<usize> =
        (0..got.len() / size).filter(|&i| got[i * size..(i + 1) * size] != want[i * size..(i + 1) * size]).collect();
    if dt == DType::F32 {
        res.note_nmse(nmse(&dtype::bytes_f32(got), &dtype::bytes_f32(want)), 0.0);
    }
    if let Some(&i) = diffs.first() {
        let show = |b: &[u8]| match dt {
            DType::F32 => format!("{:e}", dtype::bytes_f32(&b[i * 4..i * 4 + 4])[0]),
            DType::I32 => format!("{}", dtype::bytes_i32(&b[i * 4..i * 4 + 4])[0]),
            _ => format!("{:02x?}", &b[i * size..(i + 1) * size]),
        };
        res.failures.push(Failure::new(
            FailureKind::Mismatch,
            name,
            format!(
                "{} of {} elements differ (first at {i}: got {}, want {})",
                diffs.len(),
                got.len() / size,
                show(got),
                show(want)
            ),
        ));
    }
}

/// Compressor cache: entries the reference did not touch must keep their pre-fill bits;
/// written elements are compared flip-tolerantly (see the module doc).
fn cache_compare(name: &str, got: &[f32], want: &[f32], pre: &[f32], thr: f64, res: &mut CaseResult) {
    let written: Vec<usize> = (0..want.len()).filter(|&i| want[i].to_bits() != pre[i].to_bits()).collect();
    let stale = (0..want.len())
        .filter(|&i| want[i].to_bits() == pre[i].to_bits() && got[i].to_bits() != pre[i].to_bits())
        .count();
    if stale > 0 {
        res.failures.push(Failure::new(
            FailureKind::StaleModified,
            name,
            format!("{stale} elements outside the emitted entries changed"),
        ));
    }
    if written.is_empty() {
        res.note_nmse(0.0, thr);
        return;
    }
    let rms = (written.iter().map(|&i| (want[i] as f64).powi(2)).sum::<f64>() / written.len() as f64).sqrt();
    let (mut close_g, mut close_w) = (Vec::new(), Vec::new());
    let (mut flips, mut wild) = (0usize, 0usize);
    for &i in &written {
        let (g, w) = (got[i] as f64, want[i] as f64);
        let d = (g - w).abs();
        if d <= 1e-5 * rms {
            close_g.push(got[i]);
            close_w.push(want[i]);
        } else if d <= g.abs().max(w.abs()) {
            flips += 1;
        } else {
            wild += 1;
        }
    }
    let allowed = (written.len() / 100).max(2);
    let n = nmse(&close_g, &close_w);
    res.note_nmse(n, thr);
    res.flips += flips;
    if wild > 0 || flips > allowed {
        let full = nmse(
            &written.iter().map(|&i| got[i]).collect::<Vec<_>>(),
            &written.iter().map(|&i| want[i]).collect::<Vec<_>>(),
        );
        res.failures.push(Failure::new(
            FailureKind::Mismatch,
            name,
            format!("{} of {} written elements differ beyond f32 noise ({flips} within one quantization step, {allowed} allowed; {wild} beyond); NMSE over them {full:.3e}", flips + wild, written.len()),
        ));
    } else if n.is_nan() || n > thr {
        res.failures.push(Failure::new(
            FailureKind::Nmse,
            name,
            format!("NMSE {n:.3e} > {thr:.0e} over elements within f32 noise"),
        ));
    }
}

/// MoE experts: rows are compared one by one; a row over `thr` is tolerated as an act_quant flip
/// of the intermediate if its NMSE is ≤ 1/(topk·inter), in at most max(1, rows/4) rows.
fn row_flips(name: &str, got: &[f32], want: &[f32], m: &MoeExperts, thr: f64, res: &mut CaseResult) {
    let d = m.dim.max(1);
    let bound = 1.0 / (m.topk.max(1) * m.inter.max(1)) as f64;
    let allowed = (m.rows / 4).max(1);
    let (mut ok_g, mut ok_w, mut flips, mut worst) = (Vec::new(), Vec::new(), 0usize, 0f64);
    for (g, w) in got.chunks(d).zip(want.chunks(d)) {
        let n = nmse(g, w);
        if n <= thr {
            ok_g.extend_from_slice(g);
            ok_w.extend_from_slice(w);
        } else {
            flips += 1;
            worst = worst.max(n);
        }
    }
    let n = nmse(&ok_g, &ok_w);
    res.note_nmse(n, thr);
    if flips > allowed || worst > bound {
        res.failures.push(Failure::new(
            FailureKind::Nmse,
            name,
            format!("{flips} of {} rows have NMSE > {thr:.0e} (worst {worst:.3e}; a flip of one intermediate code allows {allowed} rows ≤ {bound:.1e})", m.rows),
        ));
    } else {
        res.flips += flips;
    }
}

/// Indexer: per row, the selected sets must agree up to swaps between entries whose scores are
/// within `tol`·max|score| of the selection boundary (1e-5 for f32, [`BF16_SCORE_TOL`] for the
/// bf16 class); valid counts, ranges, trailing padding and index/score alignment (within the
/// same tolerance) are checked exactly.
fn indexer_sets(o: &IndexerTopK, data: &CaseData, got: &[Vec<u8>], want: &[Vec<u8>], tol: f64, res: &mut CaseResult) {
    let k = o.topk;
    if k == 0 || o.rows == 0 {
        res.note_agreement(1.0);
        return;
    }
    let (gi, gs) = (dtype::bytes_i32(&got[0]), dtype::bytes_f32(&got[1]));
    let (wi, ws) = (dtype::bytes_i32(&want[0]), dtype::bytes_f32(&want[1]));
    let positions = data.inputs[4].i32s();
    let (mut ok, mut strict, mut first_bad) = (0usize, 0usize, None);
    for r in 0..o.rows {
        let n = ((positions[r] as usize + 1) / o.ratio).min(o.capacity);
        let (gi, gs, wi, ws) =
            (&gi[r * k..(r + 1) * k], &gs[r * k..(r + 1) * k], &wi[r * k..(r + 1) * k], &ws[r * k..(r + 1) * k]);
        let verdict = (|| -> Result<bool, String> {
            let vg = gi.iter().take_while(|&&j| j >= 0).count();
            let vw = wi.iter().take_while(|&&j| j >= 0).count();
            if gi[vg..].iter().any(|&j| j != -1) {
                return Err(format!("padding is not trailing −1: {gi:?}"));
            }
            if vg != vw {
                return Err(format!("{vg} entries selected, reference {vw}"));
            }
            if let Some(j) = gi[..vg].iter().find(|&&j| j as usize >= n) {
                return Err(format!("entry {j} is not visible (n = {n})"));
            }
            let mut sorted = gi[..vg].to_vec();
            sorted.sort_unstable();
            if sorted.windows(2).any(|p| p[0] == p[1]) {
                return Err(format!("an entry is selected twice: {gi:?}"));
            }
            if gs[..vg].windows(2).any(|p| p[0] < p[1]) {
                return Err("scores are not in descending order".into());
            }
            let scale = ws[..vw].iter().chain(&gs[..vg]).fold(0f32, |m, s| m.max(s.abs())) as f64;
            let tol = tol * scale.max(f64::MIN_POSITIVE);
            let ref_score = |j: i32| wi[..vw].iter().position(|&x| x == j).map(|p| ws[p] as f64);
            for (p, &j) in gi[..vg].iter().enumerate() {
                if let Some(s) = ref_score(j) {
                    if (gs[p] as f64 - s).abs() > tol {
                        return Err(format!("entry {j} carries score {} but scores {s} in the reference", gs[p]));
                    }
                }
            }
            let same = gi[..vg].iter().all(|j| wi[..vw].contains(j));
            if same {
                return Ok(true);
            }
            let (bw, bg) = (ws[vw - 1] as f64, gs[vg - 1] as f64);
            for (p, &j) in gi[..vg].iter().enumerate() {
                if !wi[..vw].contains(&j) && (gs[p] as f64 - bw).abs() > tol {
                    return Err(format!("entry {j} (score {}) chosen over the reference's boundary score {bw}", gs[p]));
                }
            }
            for (p, &j) in wi[..vw].iter().enumerate() {
                if !gi[..vg].contains(&j) && (ws[p] as f64 - bg).abs() > tol {
                    return Err(format!("reference entry {j} (score {}) left out; boundary here {bg}", ws[p]));
                }
            }
            Ok(false)
        })();
        match verdict {
            Ok(s) => {
                ok += 1;
                strict += s as usize;
            }
            Err(e) => {
                first_bad.get_or_insert(format!("row {r}: {e}"));
            }
        }
    }
    let a = ok as f64 / o.rows as f64;
    res.note_agreement(a);
    if let Some(e) = first_bad {
        res.failures.push(Failure::new(
            FailureKind::Decisions,
            "indices",
            format!("sets agree in {ok} of {} rows up to near-ties ({strict} strictly); {e}", o.rows),
        ));
    }
}

/// The gate's biased selection score of expert `e` for row `x`, in f64 (for forgiving near-ties).
fn gate_score(x: &[f32], gate_w: &[f32], e: usize) -> f64 {
    let d = x.len();
    let z: f64 = x.iter().zip(&gate_w[e * d..(e + 1) * d]).map(|(a, b)| *a as f64 * *b as f64).sum();
    let sp = if z > 20.0 { z } else { z.exp().ln_1p() };
    sp.sqrt()
}

/// MoE gate: per row, expert sets agree up to near-ties of the biased score (recomputed here),
/// experts are distinct and in range, ordered by non-increasing biased score; weights are
/// compared, aligned by expert, on rows whose sets agree. Hashed routing must match exactly.
/// How far apart (in f64 ulps of the larger) two race keys may be and count as a tie: the
/// sampler's keys go through two logarithms, which CUDA and the host's libm may each round
/// differently by an ulp (`hal::ops::SampleTokens`).
const KEY_ULPS: f64 = 8.0;

/// [`Metric::SampledTokens`]: a token differing from the reference's passes only when both keys
/// (recomputed here from the inputs) are finite and within [`KEY_ULPS`] of each other.
fn sampled_tokens(o: &SampleTokens, data: &CaseData, got: &[u8], want: &[u8], res: &mut CaseResult) {
    let (g, w) = (dtype::bytes_i32(got), dtype::bytes_i32(want));
    let logits = data.inputs[0].f32s();
    let states = &data.outputs[1].as_ref().expect("rng is read-write").bytes;
    let mut near_ties = 0;
    for r in 0..o.rows {
        if g[r] == w[r] {
            continue;
        }
        let row = &logits[r * o.vocab..(r + 1) * o.vocab];
        let s = u64::from_le_bytes(states[r * 8..r * 8 + 8].try_into().expect("8 bytes"));
        let key = |t: i32| -> Option<f64> {
            let v = *row.get(usize::try_from(t).ok()?)?;
            Some(if o.temperature == 0.0 {
                v as f64
            } else {
                sample_key(v, o.temperature, sample_uniform(s, t as u64))
            })
        };
        match (key(g[r]), key(w[r])) {
            (Some(a), Some(b))
                if a.is_finite()
                    && b.is_finite()
                    && (a - b).abs() <= KEY_ULPS * f64::EPSILON * a.abs().max(b.abs()) =>
            {
                near_ties += 1;
            }
            (a, b) => {
                let detail = format!("row {r}: token {} (key {a:?}), reference {} (key {b:?})", g[r], w[r]);
                res.failures.push(Failure::new(FailureKind::Mismatch, "tokens", detail));
                return;
            }
        }
    }
    res.note_agreement(1.0 - near_ties as f64 / o.rows.max(1) as f64);
}

fn gate_sets(o: &MoeGate, data: &CaseData, got: &[Vec<u8>], want: &[Vec<u8>], res: &mut CaseResult) {
    let (k, d) = (o.topk, o.dim);
    if k == 0 || o.rows == 0 {
        res.note_agreement(1.0);
        return;
    }
    let (ge, gw) = (dtype::bytes_i32(&got[0]), dtype::bytes_f32(&got[1]));
    let (we, ww) = (dtype::bytes_i32(&want[0]), dtype::bytes_f32(&want[1]));
    let x = data.inputs[0].f32s();
    let gate_w = data.inputs[1].f32s();
    let bias = match o.mode {
        GateMode::Scored => data.inputs[2].f32s(),
        GateMode::Hashed { .. } => vec![0.0; o.experts],
    };
    let (mut ok, mut first_bad) = (0usize, None);
    let (mut wg, mut wr) = (Vec::new(), Vec::new());
    for r in 0..o.rows {
        let (ge, gw, we, ww) =
            (&ge[r * k..(r + 1) * k], &gw[r * k..(r + 1) * k], &we[r * k..(r + 1) * k], &ww[r * k..(r + 1) * k]);
        let xr = &x[r * d..(r + 1) * d];
        let hs = |e: i32| gate_score(xr, &gate_w, e as usize) + bias[e as usize] as f64;
        let verdict = (|| -> Result<bool, String> {
            if let Some(e) = ge.iter().find(|&&e| e < 0 || e as usize >= o.experts) {
                return Err(format!("expert {e} out of range"));
            }
            let mut sorted = ge.to_vec();
            sorted.sort_unstable();
            if sorted.windows(2).any(|p| p[0] == p[1]) {
                return Err(format!("an expert is chosen twice: {ge:?}"));
            }
            if let GateMode::Hashed { .. } = o.mode {
                return if ge == we { Ok(true) } else { Err(format!("hashed experts {ge:?}, table says {we:?}")) };
            }
            let scale = we.iter().map(|&e| hs(e).abs()).fold(1f64, f64::max);
            let tol = 1e-5 * scale;
            if ge.windows(2).any(|p| hs(p[0]) < hs(p[1]) - tol) {
                return Err(format!("experts {ge:?} are not in descending score order"));
            }
            if ge.iter().all(|e| we.contains(e)) {
                return Ok(true);
            }
            let bw = we.iter().map(|&e| hs(e)).fold(f64::INFINITY, f64::min);
            let bg = ge.iter().map(|&e| hs(e)).fold(f64::INFINITY, f64::min);
            for &e in ge {
                if !we.contains(&e) && (hs(e) - bw).abs() > tol {
                    return Err(format!(
                        "expert {e} (score {:.6}) chosen over the reference's boundary {bw:.6}",
                        hs(e)
                    ));
                }
            }
            for &e in we {
                if !ge.contains(&e) && (hs(e) - bg).abs() > tol {
                    return Err(format!("reference expert {e} (score {:.6}) left out; boundary here {bg:.6}", hs(e)));
                }
            }
            Ok(false)
        })();
        match verdict {
            Ok(same) => {
                ok += 1;
                if same {
                    for (p, e) in ge.iter().enumerate() {
                        let q = we.iter().position(|x| x == e).expect("same set");
                        wg.push(gw[p]);
                        wr.push(ww[q]);
                    }
                }
            }
            Err(e) => {
                first_bad.get_or_insert(format!("row {r}: {e}"));
            }
        }
    }
    res.note_agreement(ok as f64 / o.rows as f64);
    if let Some(e) = first_bad {
        res.failures.push(Failure::new(
            FailureKind::Decisions,
            "experts",
            format!("sets agree in {ok} of {} rows up to near-ties; {e}", o.rows),
        ));
    }
    let thr = 1e-10;
    let n = nmse(&wg, &wr);
    res.note_nmse(n, thr);
    if n.is_nan() || n > thr {
        res.failures.push(Failure::new(
            FailureKind::Nmse,
            "weights",
            format!("NMSE {n:.3e} > {thr:.0e} on rows with equal sets"),
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

/// The verdict of one op variant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RowResult {
    Pass,
    /// Every case unsupported (or some, with the rest passing).
    Unsupported,
    /// The kinds of failure seen.
    Fail(Vec<FailureKind>),
}

/// One line of the report: one op variant over all its cases.
#[derive(Clone, Debug)]
pub struct OpRow {
    pub op: String,
    pub cases: usize,
    pub worst_nmse: Option<f64>,
    pub threshold: String,
    pub agreement: Option<f64>,
    pub flips: usize,
    pub seconds: f64,
    pub result: RowResult,
}

/// Everything [`run_suite`] found.
#[derive(Clone, Debug)]
pub struct SuiteReport {
    pub backend: String,
    pub device: String,
    pub reference: String,
    pub seed: u64,
    pub allow_unsupported: bool,
    pub cases: Vec<CaseResult>,
    pub seconds: f64,
}

fn fmt_e(v: Option<f64>) -> String {
    match v {
        None => "—".into(),
        Some(0.0) => "0".into(),
        Some(v) => format!("{v:.2e}"),
    }
}

impl SuiteReport {
    /// Failures that count (unsupported ones only unless allowed), with their case.
    pub fn failures(&self) -> Vec<(&CaseResult, &Failure)> {
        self.cases
            .iter()
            .flat_map(|c| c.failures.iter().map(move |f| (c, f)))
            .filter(|(_, f)| !(self.allow_unsupported && f.kind == FailureKind::Unsupported))
            .collect()
    }

    pub fn passed(&self) -> bool {
        !self.cases.is_empty() && self.failures().is_empty()
    }

    pub fn unsupported(&self) -> usize {
        self.cases.iter().filter(|c| c.unsupported.is_some()).count()
    }

    /// One row per op variant, in suite order.
    pub fn rows(&self) -> Vec<OpRow> {
        let mut order: Vec<String> = Vec::new();
        let mut groups: BTreeMap<String, Vec<&CaseResult>> = BTreeMap::new();
        for c in &self.cases {
            if !groups.contains_key(&c.variant) {
                order.push(c.variant.clone());
            }
            groups.entry(c.variant.clone()).or_default().push(c);
        }
        order
            .into_iter()
            .map(|v| {
                let cs = &groups[&v];
                let worst = cs.iter().filter_map(|c| Some((c.nmse?, c.threshold?))).max_by(|a, b| {
                    let r = |(n, t): (f64, f64)| {
                        if t > 0.0 {
                            n / t
                        } else if n > 0.0 {
                            f64::INFINITY
                        } else {
                            0.0
                        }
                    };
                    r(*a).total_cmp(&r(*b)).then(a.0.total_cmp(&b.0))
                });
                let mut kinds: Vec<FailureKind> = cs
                    .iter()
                    .flat_map(|c| c.failures.iter().map(|f| f.kind))
                    .filter(|k| *k != FailureKind::Unsupported)
                    .collect();
                kinds.sort();
                kinds.dedup();
                let unsupported = cs.iter().any(|c| c.unsupported.is_some());
                let result = if !kinds.is_empty() {
                    RowResult::Fail(kinds)
                } else if unsupported {
                    RowResult::Unsupported
                } else {
                    RowResult::Pass
                };
                OpRow {
                    op: v.clone(),
                    cases: cs.len(),
                    worst_nmse: worst.map(|w| w.0),
                    threshold: cs[0].threshold_text.clone(),
                    agreement: cs.iter().filter_map(|c| c.agreement).reduce(f64::min),
                    flips: cs.iter().map(|c| c.flips).sum(),
                    seconds: cs.iter().map(|c| c.seconds).sum(),
                    result,
                }
            })
            .collect()
    }

    /// The report as an aligned text table, followed by every failure.
    pub fn table(&self) -> String {
        let header = ["op", "cases", "worst NMSE", "threshold", "agreement", "flips", "time", "result"];
        let rows: Vec<[String; 8]> = self
            .rows()
            .iter()
            .map(|r| {
                [
                    r.op.clone(),
                    r.cases.to_string(),
                    fmt_e(r.worst_nmse),
                    r.threshold.clone(),
                    r.agreement.map_or("—".into(), |a| format!("{a:.3}")),
                    r.flips.to_string(),
                    format!("{:.2}s", r.seconds),
                    match &r.result {
                        RowResult::Pass => "pass".into(),
                        RowResult::Unsupported => {
                            if self.allow_unsupported {
                                "unsupported (allowed)".into()
                            } else {
                                "FAIL: unsupported".into()
                            }
                        }
                        RowResult::Fail(k) => {
                            format!("FAIL: {}", k.iter().map(|k| k.name()).collect::<Vec<_>>().join(", "))
                        }
                    },
                ]
            })
            .collect();
        let mut w = header.map(|h| h.chars().count());
        for r in &rows {
            for (i, c) in r.iter().enumerate() {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut s = String::new();
            for (i, c) in cells.iter().enumerate() {
                let pad = w[i] - c.chars().count();
                if (1..=6).contains(&i) {
                    s.push_str(&" ".repeat(pad));
                    s.push_str(c);
                } else {
                    s.push_str(c);
                    s.push_str(&" ".repeat(pad));
                }
                s.push_str("  ");
            }
            s.trim_end().to_string() + "\n"
        };
        let mut out = format!(
            "conformance: {} ({}) vs {}, seed {:#x}: {} cases in {:.1}s\n",
            self.backend,
            self.device,
            self.reference,
            self.seed,
            self.cases.len(),
            self.seconds
        );
        out += &line(&header.map(String::from));
        out += &line(&w.map(|n| "-".repeat(n)));
        for r in &rows {
            out += &line(r);
        }
        let fails = self.failures();
        let _ = writeln!(
            out,
            "{}: {} failures in {} of {} cases{}",
            if self.passed() { "PASS" } else { "FAIL" },
            fails.len(),
            self.cases.iter().filter(|c| !c.passed()).count(),
            self.cases.len(),
            if self.unsupported() > 0 { format!(", {} unsupported", self.unsupported()) } else { String::new() }
        );
        for (c, f) in fails.iter().take(50) {
            let _ = writeln!(
                out,
                "  {} [{}] {}: {} — {}\n      {}",
                c.variant,
                c.label,
                f.tensor,
                f.kind.name(),
                f.detail,
                c.descriptor
            );
        }
        if fails.len() > 50 {
            let _ = writeln!(out, "  ... and {} more (see the JSON report)", fails.len() - 50);
        }
        out
    }

    pub fn to_json(&self) -> Value {
        let num =
            |v: Option<f64>| v.map_or(Value::Null, |v| if v.is_finite() { json!(v) } else { json!(v.to_string()) });
        json!({
            "backend": self.backend,
            "device": self.device,
            "reference": self.reference,
            "seed": self.seed,
            "allow_unsupported": self.allow_unsupported,
            "passed": self.passed(),
            "seconds": self.seconds,
            "rows": self.rows().iter().map(|r| json!({
                "op": r.op,
                "cases": r.cases,
                "worst_nmse": num(r.worst_nmse),
                "threshold": r.threshold,
                "agreement": num(r.agreement),
                "flips": r.flips,
                "seconds": r.seconds,
                "result": match &r.result {
                    RowResult::Pass => json!("pass"),
                    RowResult::Unsupported => json!("unsupported"),
                    RowResult::Fail(k) => json!({"fail": k.iter().map(|k| k.name()).collect::<Vec<_>>()}),
                },
            })).collect::<Vec<_>>(),
            "cases": self.cases.iter().map(|c| json!({
                "op": c.op,
                "variant": c.variant,
                "label": c.label,
                "descriptor": c.descriptor,
                "nmse": num(c.nmse),
                "threshold": num(c.threshold),
                "agreement": num(c.agreement),
                "flips": c.flips,
                "unsupported": c.unsupported,
                "seconds": c.seconds,
                "failures": c.failures.iter().map(|f| json!({"kind": f.kind.name(), "tensor": f.tensor, "detail": f.detail})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// End to end
// ---------------------------------------------------------------------------------------------

/// One end-to-end check.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: String,
    pub measured: String,
    pub bound: String,
    pub pass: bool,
    /// Reported but not gating (the tight end-to-end bound; see the module doc).
    pub informational: bool,
}

impl Check {
    fn gate(name: impl Into<String>, measured: String, bound: &str, pass: bool) -> Self {
        Check { name: name.into(), measured, bound: bound.into(), pass, informational: false }
    }
}

/// Whether every gating check passed (and there is at least one).
pub fn checks_passed(checks: &[Check]) -> bool {
    !checks.is_empty() && checks.iter().all(|c| c.pass || c.informational)
}

/// The checks as an aligned table.
pub fn checks_table(checks: &[Check]) -> String {
    let res = |c: &Check| match (c.pass, c.informational) {
        (true, false) => "pass",
        (false, false) => "FAIL",
        (true, true) => "info: met",
        (false, true) => "info: not met",
    };
    let w0 = checks.iter().map(|c| c.name.chars().count()).max().unwrap_or(0).max(5);
    let w1 = checks.iter().map(|c| c.measured.chars().count()).max().unwrap_or(0).max(8);
    let w2 = checks.iter().map(|c| c.bound.chars().count()).max().unwrap_or(0).max(5);
    let mut out = format!("{:<w0$}  {:<w1$}  {:<w2$}  result\n", "check", "measured", "bound");
    out += &format!("{}  {}  {}  ------\n", "-".repeat(w0), "-".repeat(w1), "-".repeat(w2));
    for c in checks {
        out += &format!("{:<w0$}  {:<w1$}  {:<w2$}  {}\n", c.name, c.measured, c.bound, res(c));
    }
    out
}

pub fn checks_json(checks: &[Check]) -> Value {
    json!(checks
        .iter()
        .map(|c| json!({"name": c.name, "measured": c.measured, "bound": c.bound, "pass": c.pass, "informational": c.informational}))
        .collect::<Vec<_>>())
}

/// Decode split of the golden protocol (MANIFEST §5).
pub const DECODE_SPLIT: usize = 37;

struct Golden {
    tokens: Vec<u32>,
    b: usize,
    t: usize,
    logits: model::safetensors::SafeTensors,
    layers: model::safetensors::SafeTensors,
}

/// One teacher-forced block: output streams per position and its decisions.
#[derive(Clone, Default)]
struct BlockOut {
    out: Vec<f32>,
    experts: Vec<i64>,
    topk: Vec<i64>,
    scores: Vec<f32>,
}

/// Everything one backend produced on the golden inputs.
struct Runs {
    prefill: Vec<f32>,
    mtp: Vec<f32>,
    /// Per layer (MTP last): experts, and indexer choices on CSA layers.
    prefill_experts: Vec<Vec<i64>>,
    prefill_topk: Vec<Option<Vec<i64>>>,
    decode: Vec<f32>,
    decode_experts: Vec<Vec<i64>>,
    decode_topk: Vec<Option<Vec<i64>>>,
    /// The decode again through `Model::decode_step`.
    decode_step: DecodeStepRun,
    t1: Vec<BlockOut>,
    t1d: Vec<BlockOut>,
    t1_head: Vec<f32>,
    t1_mtp: BlockOut,
}

/// The T2 decode run through a recorded decode step.
struct DecodeStepRun {
    logits: Vec<f32>,
    /// Steps that replayed a recording (0 on a backend that does not record).
    replays: usize,
}

/// The recorded decode step against the forward calls of the same backend: bit for bit, since
/// both issue the same ops on the same values (bit-exactness is the point here).
fn decode_step_check(name: String, r: &Runs) -> Check {
    let (got, want) = (&r.decode_step.logits, &r.decode);
    let bad = crate::metrics::bit_mismatches(got, want);
    let nan = got.iter().any(|x| x.is_nan());
    let how = match r.decode_step.replays {
        0 => "no step replayed: the backend runs the ops directly".to_string(),
        n => format!("{n} steps replayed a recording"),
    };
    let measured = format!("{} of {} logits differ in bits; {how}", bad.len(), got.len());
    Check::gate(
        name,
        measured,
        "bit-identical, no NaN",
        got.len() == want.len() && !got.is_empty() && bad.is_empty() && !nan,
    )
}

fn load_golden(dir: &Path) -> Result<Golden, String> {
    use model::safetensors::SafeTensors;
    let e = |e: model::error::LoadError| e.to_string();
    let tok = SafeTensors::open(&dir.join("tokens.safetensors")).map_err(e)?;
    let shape = tok.info("tokens").ok_or("tokens.safetensors has no 'tokens'")?.shape.clone();
    let tokens = tok.i64("tokens").map_err(e)?.into_iter().map(|x| x as u32).collect();
    Ok(Golden {
        tokens,
        b: shape[0],
        t: shape[1],
        logits: SafeTensors::open(&dir.join("golden.safetensors")).map_err(e)?,
        layers: SafeTensors::open(&dir.join("golden_layers.safetensors")).map_err(e)?,
    })
}

/// Runs the golden inputs through `m` with KV caches of dtype `kv`: the T2 prefill (+ MTP) and
/// decode runs, then (with `teacher`) the T1 teacher-forced blocks, head and MTP block.
fn collect(m: &model::forward::Model, g: &Golden, kv: DType, teacher_forced: bool) -> Result<Runs, String> {
    use model::forward::{Chunk, ForwardOptions, LogitsAt};
    let e = |e: model::error::ModelError| e.to_string();
    let (b, t, p, v) = (g.b, g.t, DECODE_SPLIT, m.cfg.vocab_size);
    let (k, kk, layers) = (m.cfg.n_activated_experts, m.cfg.index_topk, m.cfg.n_layers);
    let (hc, d) = (m.cfg.hc_mult, m.cfg.dim);
    let width = hc * d;
    let be = m.backend();
    let streams =
        |x: &[f32], rows: usize| be.upload(&[rows, hc, d], DType::F32, &dtype::f32_bytes(x)).map_err(|e| e.to_string());

    // T2 prefill + MTP, all sequences in one call.
    let mut cache = m.new_cache_with(b, t, kv).map_err(e)?;
    let slots: Vec<usize> = (0..b).map(|_| cache.alloc_slot(be)).collect::<Result<_, _>>().map_err(e)?;
    let chunks: Vec<Chunk> = slots.iter().map(|&s| Chunk { slot: s, tokens: &g.tokens[s * t..(s + 1) * t] }).collect();
    let next: Vec<u32> = (0..b * t).map(|r| if r % t + 1 < t { g.tokens[r + 1] } else { 0 }).collect();
    let out = m
        .forward(&mut cache, &chunks, &ForwardOptions { logits: LogitsAt::All, decisions: true, mtp_ids: Some(&next) })
        .map_err(e)?;
    let prefill_experts = out.decisions.iter().map(|d| d.experts.iter().map(|&x| x as i64).collect()).collect();
    let prefill_topk =
        out.decisions.iter().map(|d| d.topk.as_ref().map(|t| t.iter().map(|&x| x as i64).collect())).collect();
    let (prefill, mtp) = (out.logits, out.mtp_logits.ok_or("no MTP logits")?);

    // T2 decode: prefill P, then one token per sequence per call.
    let mut cache = m.new_cache_with(b, t, kv).map_err(e)?;
    let slots: Vec<usize> = (0..b).map(|_| cache.alloc_slot(be)).collect::<Result<_, _>>().map_err(e)?;
    let opts = ForwardOptions { logits: LogitsAt::All, decisions: true, mtp_ids: None };
    let chunks: Vec<Chunk> = slots.iter().map(|&s| Chunk { slot: s, tokens: &g.tokens[s * t..s * t + p] }).collect();
    m.forward(&mut cache, &chunks, &opts).map_err(e)?;
    let steps = t - p;
    let mut decode = vec![0f32; b * steps * v];
    let mut decode_experts = vec![vec![0i64; b * steps * k]; layers];
    let mut decode_topk: Vec<Option<Vec<i64>>> =
        (0..layers).map(|i| (m.cfg.layer_ratio(i) == 4).then(|| vec![-1i64; b * steps * kk])).collect();
    for pos in p..t {
        let chunks: Vec<Chunk> =
            slots.iter().map(|&s| Chunk { slot: s, tokens: &g.tokens[s * t + pos..s * t + pos + 1] }).collect();
        let out = m.forward(&mut cache, &chunks, &opts).map_err(e)?;
        let j = pos - p;
        for s in 0..b {
            decode[(s * steps + j) * v..(s * steps + j + 1) * v].copy_from_slice(&out.logits[s * v..(s + 1) * v]);
            for (i, dd) in out.decisions.iter().enumerate().take(layers) {
                for x in 0..k {
                    decode_experts[i][(s * steps + j) * k + x] = dd.experts[s * k + x] as i64;
                }
                if let (Some(tk), Some(dst)) = (&dd.topk, decode_topk[i].as_mut()) {
                    for x in 0..kk {
                        dst[(s * steps + j) * kk + x] = tk[s * kk + x] as i64;
                    }
                }
            }
        }
    }

    // The same decode through a recorded decode step (replayed from its third call where the
    // backend records): the logits must be bit for bit the forward calls' above.
    let mut cache = m.new_cache_with(b, t, kv).map_err(e)?;
    let slots: Vec<usize> = (0..b).map(|_| cache.alloc_slot(be)).collect::<Result<_, _>>().map_err(e)?;
    let chunks: Vec<Chunk> = slots.iter().map(|&s| Chunk { slot: s, tokens: &g.tokens[s * t..s * t + p] }).collect();
    m.forward(&mut cache, &chunks, &ForwardOptions { logits: LogitsAt::Last, decisions: false, mtp_ids: None })
        .map_err(e)?;
    let mut step = m.decode_step(&cache, &slots).map_err(e)?;
    let mut decode_step = DecodeStepRun { logits: vec![0f32; b * steps * v], replays: 0 };
    for pos in p..t {
        let tokens: Vec<u32> = slots.iter().map(|&s| g.tokens[s * t + pos]).collect();
        let replay = step.is_recorded();
        let out = step.run(&mut cache, &tokens).map_err(e)?;
        decode_step.replays += replay as usize;
        let j = pos - p;
        for s in 0..b {
            decode_step.logits[(s * steps + j) * v..(s * steps + j + 1) * v].copy_from_slice(&out[s * v..(s + 1) * v]);
        }
    }
    drop(step);

    // T1 / T1d: each block alone on the golden input streams of sequence 0.
    let block_input = |i: usize| -> Result<Vec<f32>, String> {
        if i == 0 {
            let emb = g.layers.f32("embed_out").map_err(|e| e.to_string())?;
            Ok(emb.chunks(d).flat_map(|row| (0..hc).flat_map(move |_| row.iter().copied())).collect())
        } else {
            g.layers.f32(&format!("layer{}_out", i - 1)).map_err(|e| e.to_string())
        }
    };
    let teacher = |i: usize, split: Option<usize>| -> Result<BlockOut, String> {
        let input = block_input(i)?;
        let mut cache = m.new_cache_with(1, t, kv).map_err(e)?;
        let slot = cache.alloc_slot(be).map_err(e)?;
        let spans: Vec<(usize, usize)> = match split {
            None => vec![(0, t)],
            Some(p) => std::iter::once((0, p)).chain((p..t).map(|s| (s, s + 1))).collect(),
        };
        let mut r = BlockOut::default();
        for (a, z) in spans {
            let rows = m.rows(&cache, &[Chunk { slot, tokens: &g.tokens[a..z] }]).map_err(e)?;
            let x = streams(&input[a * width..z * width], z - a)?;
            let (y, dd) = m.block(i, m.layer_cache(&mut cache, i).map_err(e)?, &rows, x, true).map_err(e)?;
            cache.advance(slot, z - a);
            r.out.extend(dtype::bytes_f32(&be.download(&y).map_err(|e| e.to_string())?));
            let dd = dd.ok_or("no decisions")?;
            r.experts.extend(dd.experts.iter().map(|&x| x as i64));
            if let (Some(tk), Some(sc)) = (dd.topk, dd.topk_scores) {
                r.topk.extend(tk.iter().map(|&x| x as i64));
                r.scores.extend(sc);
            }
        }
        Ok(r)
    };
    if !teacher_forced {
        let t1_mtp = BlockOut::default();
        return Ok(Runs {
            prefill,
            mtp,
            prefill_experts,
            prefill_topk,
            decode,
            decode_experts,
            decode_topk,
            decode_step,
            t1: vec![],
            t1d: vec![],
            t1_head: vec![],
            t1_mtp,
        });
    }
    let t1 = (0..layers).map(|i| teacher(i, None)).collect::<Result<Vec<_>, _>>()?;
    let t1d = (0..layers).map(|i| teacher(i, Some(p))).collect::<Result<Vec<_>, _>>()?;
    let x_last = g.layers.f32(&format!("layer{}_out", layers - 1)).map_err(|e| e.to_string())?;
    let keep: Vec<usize> = (0..t).collect();
    let t1_head = m.head(streams(&x_last, t)?, &keep).map_err(e)?;
    let mut cache = m.new_cache_with(1, t, kv).map_err(e)?;
    let slot = cache.alloc_slot(be).map_err(e)?;
    let rows = m.rows(&cache, &[Chunk { slot, tokens: &g.tokens[..t] }]).map_err(e)?;
    let (mtp1, dd) = m.mtp(0, &mut cache, &rows, streams(&x_last, t)?, &next[..t], true).map_err(e)?;
    let t1_mtp = BlockOut {
        out: mtp1,
        experts: dd.ok_or("no MTP decisions")?.experts.iter().map(|&x| x as i64).collect(),
        ..BlockOut::default()
    };
    Ok(Runs {
        prefill,
        mtp,
        prefill_experts,
        prefill_topk,
        decode,
        decode_experts,
        decode_topk,
        decode_step,
        t1,
        t1d,
        t1_head,
        t1_mtp,
    })
}

/// T1 (prefill) or T1d (decode, positions from `from`) bounds on one teacher-forced block.
#[allow(clippy::too_many_arguments)]
fn tier1(
    name: String,
    ours: &BlockOut,
    want_out: &[f32],
    want_experts: &[i64],
    want_topk: Option<&[i64]>,
    width: usize,
    k: usize,
    kk: usize,
    from: Option<usize>,
    bf16: bool,
) -> Check {
    if bf16 {
        return tier1_bf16(name, ours, want_out, want_experts, want_topk, width, k, kk, from);
    }
    let f = from.unwrap_or(0);
    let rel = tiers::row_rel(&ours.out[f * width..], &want_out[f * width..], width);
    let (med, frac) = (tiers::median(&rel), tiers::frac_le(&rel, 1e-3));
    let e_eq = if k > 0 && !want_experts.is_empty() {
        tiers::sets_equal(&ours.experts[f * k..], &want_experts[f * k..], k)
    } else {
        1.0
    };
    let (frac_min, e_min) = if from.is_some() { (0.70, 0.96) } else { (0.95, 0.99) };
    let mut measured = format!("median rel {med:.2e}, ≤1e-3 {frac:.3}");
    let mut bound = format!("median ≤ 1e-5, ≤1e-3 ≥ {frac_min}");
    if k > 0 {
        measured += &format!(", experts {e_eq:.3}");
        bound += &format!(", experts ≥ {e_min}");
    }
    let mut pass = med <= 1e-5 && frac >= frac_min && e_eq >= e_min;
    if let Some(wt) = want_topk {
        if from.is_some() {
            let ov = tiers::sets_overlap(&ours.topk[f * kk..], &wt[f * kk..], kk);
            measured += &format!(", indexer overlap {ov:.3}");
            bound += ", indexer overlap ≥ 0.93";
            pass &= ov >= 0.93;
        } else {
            let eq = tiers::sets_equal_up_to_ties(&ours.topk, &ours.scores, wt, kk);
            measured += &format!(", indexer sets {eq:.3}");
            bound += ", indexer sets (up to ties) ≥ 0.98";
            pass &= eq >= 0.98;
        }
    }
    Check::gate(name, measured, &bound, pass)
}

/// The teacher-forced block tier of a bf16-class backend ([`Numerics::Bf16`]), against the
/// float32 goldens and cpu-ref: median rel ≤ 0.15, experts ≥ 0.90, indexer overlap ≥ 0.85.
///
/// No floor for "bf16 implementation vs float32 golden" per block is in the MANIFEST (its T3b,
/// median ≤ 0.08, compares a bf16 implementation with the *bf16* goldens, which are not
/// shipped). In bf16 the e4m3 activation quantizers turn one-ulp input differences into whole
/// code flips, so a block moves by percents (MANIFEST §7.3); the fused Ascend path measured a
/// worst block median of 0.093, experts 0.973, overlap 0.935 (docs/ascend.md). These bounds
/// keep ≈ 1.6× headroom over that and still catch the gross bugs of MANIFEST §8's sensitivity
/// table (block median 0.24–1.03); subtler bugs (a missing sink: 0.09) are at bf16-noise level
/// here, so for them the op-level bf16 class (NMSE ≤ 1e-4; fused Ascend ops measured ≤ 1.1e-5)
/// is the sharp test.
#[allow(clippy::too_many_arguments)]
fn tier1_bf16(
    name: String,
    ours: &BlockOut,
    want_out: &[f32],
    want_experts: &[i64],
    want_topk: Option<&[i64]>,
    width: usize,
    k: usize,
    kk: usize,
    from: Option<usize>,
) -> Check {
    let f = from.unwrap_or(0);
    let med = tiers::median(&tiers::row_rel(&ours.out[f * width..], &want_out[f * width..], width));
    let mut measured = format!("median rel {med:.2e}");
    let mut bound = "bf16: median ≤ 0.15".to_string();
    let mut pass = med <= 0.15;
    if k > 0 && !want_experts.is_empty() {
        let e_eq = tiers::sets_equal(&ours.experts[f * k..], &want_experts[f * k..], k);
        measured += &format!(", experts {e_eq:.3}");
        bound += ", experts ≥ 0.90";
        pass &= e_eq >= 0.90;
    }
    if let Some(wt) = want_topk {
        let ov = tiers::sets_overlap(&ours.topk[f * kk..], &wt[f * kk..], kk);
        measured += &format!(", indexer overlap {ov:.3}");
        bound += ", indexer overlap ≥ 0.85";
        pass &= ov >= 0.85;
    }
    Check::gate(name, measured, &bound, pass)
}

fn tier2_logits(name: String, ours: &[f32], want: &[f32], v: usize, bf16: bool) -> Check {
    if ours.len() != want.len() {
        return Check::gate(name, format!("{} logits vs {}", ours.len(), want.len()), "same shape", false);
    }
    let (cos, rel, am) =
        (tiers::row_cos(ours, want, v), tiers::row_rel(ours, want, v), tiers::argmax_agreement(ours, want, v));
    let (c, m) = (tiers::mean(&cos), tiers::median(&rel));
    let measured = format!("cos mean {c:.4}, argmax {am:.3}, median rel {m:.3e}");
    if bf16 {
        // MANIFEST §8 T3 (bf16 end to end).
        return Check::gate(
            name,
            measured,
            "T3: cos ≥ 0.93, argmax ≥ 0.50, median rel ≤ 0.30",
            c >= 0.93 && am >= 0.50 && m <= 0.30,
        );
    }
    Check::gate(name, measured, "cos ≥ 0.97, argmax ≥ 0.70, median rel ≤ 0.15", c >= 0.97 && am >= 0.70 && m <= 0.15)
}

fn tight_logits(name: String, ours: &[f32], want: &[f32], v: usize) -> Check {
    let ok = ours.len() == want.len();
    let (c, m) = if ok {
        (tiers::mean(&tiers::row_cos(ours, want, v)), tiers::median(&tiers::row_rel(ours, want, v)))
    } else {
        (f64::NEG_INFINITY, f64::INFINITY)
    };
    Check {
        name,
        measured: format!("cos mean {c:.5}, median rel {m:.3e}"),
        bound: "cos ≥ 0.999 or median rel ≤ 1e-4".into(),
        pass: ok && (c >= 0.999 || m <= 1e-4),
        informational: true,
    }
}

/// The lowest expert-set agreement and indexer overlap over every layer of a decision set.
#[allow(clippy::too_many_arguments)]
fn tier2_decisions(
    name: String,
    ours: &[Vec<i64>],
    ours_topk: &[Option<Vec<i64>>],
    want: &[Vec<i64>],
    want_topk: &[Option<Vec<i64>>],
    k: usize,
    kk: usize,
    bf16: bool,
) -> Check {
    let mut e_min = f64::INFINITY;
    let mut o_min = f64::INFINITY;
    for (i, (o, w)) in ours.iter().zip(want).enumerate() {
        e_min = e_min.min(if o.len() == w.len() { tiers::sets_equal(o, w, k) } else { 0.0 });
        if let (Some(Some(ot)), Some(Some(wt))) = (ours_topk.get(i), want_topk.get(i)) {
            o_min = o_min.min(if ot.len() == wt.len() { tiers::sets_overlap(ot, wt, kk) } else { 0.0 });
        }
    }
    if ours.len() != want.len() {
        e_min = 0.0;
    }
    let o_show = if o_min.is_finite() { format!("{o_min:.3}") } else { "—".into() };
    // bf16: MANIFEST §8 T3 (experts ≥ 0.6, indexer overlap ≥ 0.6).
    let (lo, bound) = if bf16 {
        (0.60, "T3: experts ≥ 0.60, indexer overlap ≥ 0.60")
    } else {
        (0.80, "experts ≥ 0.80, indexer overlap ≥ 0.80")
    };
    Check::gate(
        name,
        format!("experts ≥ {e_min:.3}, indexer overlap ≥ {o_show} (worst layer)"),
        bound,
        e_min >= lo && (o_min.is_infinite() || o_min >= lo),
    )
}

/// Forwards to a backend and records which ops it ran in bf16 numerics (end-to-end tier choice).
struct NumericsRecorder {
    inner: Arc<dyn Backend>,
    bf16: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

impl NumericsRecorder {
    fn new(inner: Arc<dyn Backend>) -> Self {
        NumericsRecorder { inner, bf16: Default::default() }
    }
    fn bf16_ops(&self) -> Vec<String> {
        self.bf16.lock().map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }
}

impl Backend for NumericsRecorder {
    fn info(&self) -> &hal::BackendInfo {
        self.inner.info()
    }
    fn supports(&self, op: &Op) -> Support {
        self.inner.supports(op)
    }
    fn numerics(&self, op: &Op) -> Numerics {
        self.inner.numerics(op)
    }
    fn alloc(&self, shape: &[usize], dtype: DType) -> hal::Result<Tensor> {
        self.inner.alloc(shape, dtype)
    }
    fn upload(&self, shape: &[usize], dtype: DType, bytes: &[u8]) -> hal::Result<Tensor> {
        self.inner.upload(shape, dtype, bytes)
    }
    fn write(&self, t: &mut Tensor, offset: usize, bytes: &[u8]) -> hal::Result<()> {
        self.inner.write(t, offset, bytes)
    }
    fn download(&self, t: &Tensor) -> hal::Result<Vec<u8>> {
        self.inner.download(t)
    }
    fn run(&self, op: &Op, inputs: &[&Tensor], outputs: &mut [&mut Tensor]) -> hal::Result<()> {
        if let Numerics::Bf16 { why } = self.inner.numerics(op) {
            if let Ok(mut s) = self.bf16.lock() {
                s.insert(format!("{}: {why}", op.name()));
            }
        }
        self.inner.run(op, inputs, outputs)
    }
    fn synchronize(&self) -> hal::Result<()> {
        self.inner.synchronize()
    }
    fn calibrate(&self) -> hal::Result<hal::Calibration> {
        self.inner.calibrate()
    }
    fn prepare(&self, op: &Op, weights: &[Option<&Tensor>]) -> hal::Result<hal::backend::Prepared> {
        self.inner.prepare(op, weights)
    }
    fn record(&self, ops: &mut dyn FnMut() -> hal::Result<()>) -> hal::Result<Option<Box<dyn hal::Recording>>> {
        self.inner.record(ops)
    }
    fn concurrently(
        &self,
        first: &mut dyn FnMut() -> hal::Result<()>,
        second: &mut dyn FnMut() -> hal::Result<()>,
    ) -> hal::Result<()> {
        self.inner.concurrently(first, second)
    }
}

/// The tiny-flash golden protocol on `backend`, against the official float32 goldens in
/// `golden_dir` (MANIFEST §8: T1, T1d, T2) and against `reference` (the same tiers; the tight
/// end-to-end bound is reported as information, see the module doc).
pub fn end_to_end(backend: Arc<dyn Backend>, reference: Arc<dyn Backend>, golden_dir: &Path) -> Vec<Check> {
    let fail = |what: &str, e: String| vec![Check::gate(what.to_string(), e, "runs", false)];
    let g = match load_golden(golden_dir) {
        Ok(g) => g,
        Err(e) => return fail("golden data", e),
    };
    let name = backend.info().name;
    let ref_name = reference.info().name;
    let recorder = Arc::new(NumericsRecorder::new(backend));
    let ours_m = match model::forward::Model::load(golden_dir, recorder.clone()) {
        Ok(m) => m,
        Err(e) => return fail(&format!("tiny-flash on {name}"), e.to_string()),
    };
    let theirs_m = match model::forward::Model::load(golden_dir, reference) {
        Ok(m) => m,
        Err(e) => return fail(&format!("tiny-flash on the reference {ref_name}"), e.to_string()),
    };
    // The goldens are the reference's float32 mode, whose KV cache is float32.
    let ours = match collect(&ours_m, &g, DType::F32, true) {
        Ok(r) => r,
        Err(e) => return fail(&format!("tiny-flash on {name}"), e),
    };
    let theirs = match collect(&theirs_m, &g, DType::F32, true) {
        Ok(r) => r,
        Err(e) => return fail(&format!("tiny-flash on the reference {ref_name}"), e),
    };
    let cfg = ours_m.cfg.clone();
    let (t, v, k, kk, layers) = (g.t, cfg.vocab_size, cfg.n_activated_experts, cfg.index_topk, cfg.n_layers);
    let width = cfg.hc_mult * cfg.dim;
    let gl = |n: &str| g.logits.f32(n).unwrap_or_default();
    let gi = |n: &str| g.logits.i64(n).unwrap_or_default();
    let gl_layers = |n: &str| g.layers.f32(n).unwrap_or_default();
    let mut checks = Vec::new();
    // Which tiers: f32 (T1/T2) unless the backend ran some op in bf16 (then the bf16 block tier
    // and MANIFEST §8's T3).
    let bf16_ops = recorder.bf16_ops();
    let bf16 = !bf16_ops.is_empty();
    checks.push(Check {
        name: "numerics".into(),
        measured: if bf16 { format!("bf16 ops: {}", bf16_ops.join("; ")) } else { "f32 throughout".into() },
        bound: if bf16 {
            "bf16 tiers (blocks: tier1_bf16; logits and decisions: T3)".into()
        } else {
            "f32 tiers (T1/T2)".into()
        },
        pass: true,
        informational: true,
    });

    // T1 / T1d against the goldens (sequence 0) and against the reference.
    for i in 0..layers {
        let csa = cfg.layer_ratio(i) == 4;
        let want_out = gl_layers(&format!("layer{i}_out"));
        let ge: Vec<i64> = gi(&format!("layer{i}_experts")).into_iter().take(t * k).collect();
        let gt: Vec<i64> = gi(&format!("layer{i}_topk")).into_iter().take(t * kk).collect();
        let gt = csa.then_some(&gt[..]);
        checks.push(tier1(
            format!("T1 block {i} vs golden"),
            &ours.t1[i],
            &want_out,
            &ge,
            gt,
            width,
            k,
            kk,
            None,
            bf16,
        ));
        let r = &theirs.t1[i];
        checks.push(tier1(
            format!("T1 block {i} vs {ref_name}"),
            &ours.t1[i],
            &r.out,
            &r.experts,
            csa.then_some(&r.topk[..]),
            width,
            k,
            kk,
            None,
            bf16,
        ));
        checks.push(tier1(
            format!("T1d block {i} vs golden"),
            &ours.t1d[i],
            &want_out,
            &ge,
            gt,
            width,
            k,
            kk,
            Some(DECODE_SPLIT),
            bf16,
        ));
        let r = &theirs.t1d[i];
        checks.push(tier1(
            format!("T1d block {i} vs {ref_name}"),
            &ours.t1d[i],
            &r.out,
            &r.experts,
            csa.then_some(&r.topk[..]),
            width,
            k,
            kk,
            Some(DECODE_SPLIT),
            bf16,
        ));
    }
    let head_want: Vec<f32> = gl("prefill_logits").into_iter().take(t * v).collect();
    checks.push(tier1(
        "T1 head vs golden".into(),
        &BlockOut { out: ours.t1_head.clone(), ..BlockOut::default() },
        &head_want,
        &[],
        None,
        v,
        0,
        kk,
        None,
        bf16,
    ));
    checks.push(tier1(
        format!("T1 head vs {ref_name}"),
        &BlockOut { out: ours.t1_head.clone(), ..BlockOut::default() },
        &theirs.t1_head,
        &[],
        None,
        v,
        0,
        kk,
        None,
        bf16,
    ));
    let mtp_want: Vec<f32> = gl("mtp_logits").into_iter().take(t * v).collect();
    let mtp_ge: Vec<i64> = gi("mtp_experts").into_iter().take(t * k).collect();
    checks.push(tier1("T1 MTP block vs golden".into(), &ours.t1_mtp, &mtp_want, &mtp_ge, None, v, k, kk, None, bf16));
    checks.push(tier1(
        format!("T1 MTP block vs {ref_name}"),
        &ours.t1_mtp,
        &theirs.t1_mtp.out,
        &theirs.t1_mtp.experts,
        None,
        v,
        k,
        kk,
        None,
        bf16,
    ));

    // T2 against the goldens.
    for (what, o, key) in [
        ("prefill", &ours.prefill, "prefill_logits"),
        ("decode", &ours.decode, "decode_logits"),
        ("MTP", &ours.mtp, "mtp_logits"),
    ] {
        checks.push(tier2_logits(format!("T2 {what} logits vs golden"), o, &gl(key), v, bf16));
    }
    let mut ge: Vec<Vec<i64>> = (0..layers).map(|i| gi(&format!("layer{i}_experts"))).collect();
    ge.push(gi("mtp_experts"));
    let gt: Vec<Option<Vec<i64>>> =
        (0..=layers).map(|i| (i < layers && cfg.layer_ratio(i) == 4).then(|| gi(&format!("layer{i}_topk")))).collect();
    checks.push(tier2_decisions(
        "T2 prefill + MTP decisions vs golden".into(),
        &ours.prefill_experts,
        &ours.prefill_topk,
        &ge,
        &gt,
        k,
        kk,
        bf16,
    ));
    let dge: Vec<Vec<i64>> = (0..layers).map(|i| gi(&format!("decode_layer{i}_experts"))).collect();
    let dgt: Vec<Option<Vec<i64>>> =
        (0..layers).map(|i| (cfg.layer_ratio(i) == 4).then(|| gi(&format!("decode_layer{i}_topk")))).collect();
    checks.push(tier2_decisions(
        "T2 decode decisions vs golden".into(),
        &ours.decode_experts,
        &ours.decode_topk,
        &dge,
        &dgt,
        k,
        kk,
        bf16,
    ));

    // T2 against the reference, plus the (informational) tight bound.
    for (what, o, r) in [
        ("prefill", &ours.prefill, &theirs.prefill),
        ("decode", &ours.decode, &theirs.decode),
        ("MTP", &ours.mtp, &theirs.mtp),
    ] {
        checks.push(tier2_logits(format!("T2 {what} logits vs {ref_name}"), o, r, v, bf16));
        checks.push(tight_logits(format!("tight {what} logits vs {ref_name}"), o, r, v));
    }
    checks.push(tier2_decisions(
        format!("T2 prefill + MTP decisions vs {ref_name}"),
        &ours.prefill_experts,
        &ours.prefill_topk,
        &theirs.prefill_experts,
        &theirs.prefill_topk,
        k,
        kk,
        bf16,
    ));
    checks.push(tier2_decisions(
        format!("T2 decode decisions vs {ref_name}"),
        &ours.decode_experts,
        &ours.decode_topk,
        &theirs.decode_experts,
        &theirs.decode_topk,
        k,
        kk,
        bf16,
    ));
    checks.push(decode_step_check(format!("decode step (recorded where {name} records) vs forward"), &ours));
    for temperature in [0.0, 0.8] {
        checks.push(sampled_decode_check(&ours_m, &g, temperature));
    }
    checks.extend(bf16_cache_checks(&ours_m, &theirs_m, &g, bf16));
    checks
}

/// Tokens that `sampled_decode_check` generates.
const SAMPLED_STEPS: usize = 12;

/// A decode step that samples its own tokens and feeds them on (`DecodeStep::run_chained`,
/// as `v4rt generate` runs it) picks the same tokens as the host sampling
/// the same backend's logits step by step with the same generator: sequence 0's first
/// `DECODE_SPLIT` tokens, then `SAMPLED_STEPS` tokens at `temperature`.
fn sampled_decode_check(m: &model::forward::Model, g: &Golden, temperature: f32) -> Check {
    let name = format!("decode step sampling on its own at temperature {temperature} vs host sampling");
    let e = |e: model::ModelError| e.to_string();
    let run = || -> Result<(Vec<u32>, Vec<u32>, bool), String> {
        use model::forward::{Chunk, ForwardOptions, LogitsAt};
        let opts = ForwardOptions { logits: LogitsAt::Last, decisions: false, mtp_ids: None };
        let prompt = &g.tokens[..DECODE_SPLIT];
        let mut tokens = [Vec::new(), Vec::new()];
        let mut on_device = false;
        for (side, out) in tokens.iter_mut().enumerate() {
            let mut cache = m.new_cache_with(1, DECODE_SPLIT + SAMPLED_STEPS + 2, DType::F32).map_err(e)?;
            let slot = cache.alloc_slot(m.backend()).map_err(e)?;
            let logits = m.forward(&mut cache, &[Chunk { slot, tokens: prompt }], &opts).map_err(e)?.logits;
            let mut rng = model::sample::Rng::new(0x5eed);
            out.push(model::sample::sample(&logits, temperature, &mut rng) as u32);
            if side == 0 {
                let mut step = m.decode_step(&cache, &[slot]).map_err(e)?;
                while out.len() <= SAMPLED_STEPS {
                    let logits = step.run(&mut cache, &out[out.len() - 1..]).map_err(e)?;
                    out.push(model::sample::sample(&logits, temperature, &mut rng) as u32);
                }
                continue;
            }
            let mut step = m.decode_step(&cache, &[slot]).map_err(e)?.with_sampling(temperature, &[rng]).map_err(e)?;
            on_device = step.samples_on_device();
            let first = [out[0]];
            step.run_chained(&mut cache, &first, SAMPLED_STEPS, |t| {
                out.extend_from_slice(t);
                true
            })
            .map_err(e)?;
        }
        let [host, chained] = tokens;
        Ok((host, chained, on_device))
    };
    match run() {
        Ok((host, chained, on_device)) => {
            let same = host.iter().zip(&chained).filter(|(a, b)| a == b).count();
            let how = if on_device {
                "picked on the device"
            } else {
                "the backend does not run sample_tokens: picked on the host"
            };
            let measured = format!("{same} of {} tokens equal ({how})", host.len());
            Check::gate(name, measured, "the same tokens", host.len() == chained.len() && same == host.len())
        }
        Err(err) => Check::gate(name, err, "runs", false),
    }
}

/// The T2 runs again with bf16 KV caches (the reference's bf16-mode layout, what
/// `Model::new_cache` picks where supported): against the float32 goldens under MANIFEST §8's
/// T3 bounds (bf16 caches are not the goldens' float32 mode), and against the reference
/// backend's own bf16-cache run under the backend's usual tier. A backend that cannot keep a
/// bf16 cache gets an informational line saying so, not a pass.
fn bf16_cache_checks(
    ours: &model::forward::Model,
    theirs: &model::forward::Model,
    g: &Golden,
    bf16: bool,
) -> Vec<Check> {
    let (name, ref_name) = (ours.backend().info().name, theirs.backend().info().name);
    if let Some(why) = model::cache::kv_dtype_unsupported(&ours.cfg, ours.backend(), DType::BF16) {
        return vec![Check {
            name: "bf16 KV cache".into(),
            measured: format!("not run: {name} cannot keep one ({why})"),
            bound: "—".into(),
            pass: false,
            informational: true,
        }];
    }
    let runs: Result<(Runs, Runs), String> =
        collect(ours, g, DType::BF16, false).and_then(|o| Ok((o, collect(theirs, g, DType::BF16, false)?)));
    let (o, r) = match runs {
        Ok(x) => x,
        Err(e) => return vec![Check::gate("bf16 KV cache".to_string(), e, "runs", false)],
    };
    let (v, k, kk) = (ours.cfg.vocab_size, ours.cfg.n_activated_experts, ours.cfg.index_topk);
    let gl = |n: &str| g.logits.f32(n).unwrap_or_default();
    let mut checks = Vec::new();
    for (what, ol, rl, key) in
        [("prefill", &o.prefill, &r.prefill, "prefill_logits"), ("decode", &o.decode, &r.decode, "decode_logits")]
    {
        checks.push(tier2_logits(format!("bf16 KV cache: {what} logits vs golden"), ol, &gl(key), v, true));
        checks.push(tier2_logits(format!("bf16 KV cache: {what} logits vs {ref_name}"), ol, rl, v, bf16));
    }
    checks.push(tier2_decisions(
        format!("bf16 KV cache: decode decisions vs {ref_name}"),
        &o.decode_experts,
        &o.decode_topk,
        &r.decode_experts,
        &r.decode_topk,
        k,
        kk,
        bf16,
    ));
    checks
        .push(decode_step_check(format!("bf16 KV cache: decode step (recorded where {name} records) vs forward"), &o));
    checks
}
