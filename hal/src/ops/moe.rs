//! Mixture of experts: routing gate, routed experts, and the clamped SwiGLU (spec §3.8).

use super::linear::WeightFormat;
use super::{input, output, Signature};
use crate::dtype::DType;

/// How a gate chooses experts.
#[derive(Clone, Debug, PartialEq)]
pub enum GateMode {
    /// `S = top-k of (s_e + bias_e)`; inputs `bias [E]`.
    Scored,
    /// `S = tid2eid[token]` (hash layers); inputs `tid2eid [vocab, k]` and `ids [R]`.
    Hashed { vocab: usize },
}

/// Routing: `s_e = sqrt(softplus(gate_w[e] · x))` (f32; softplus(z) = z for z > 20), expert
/// set `S` by [`GateMode`], weights `w_e = route_scale · s_e / Σ_{e'∈S} s_{e'}` from the
/// unbiased scores. Outputs `experts [R, k]` (Scored: by descending biased score, ties lower
/// e first; Hashed: table order) and `weights [R, k]` in the same order.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeGate {
    pub rows: usize,
    pub dim: usize,
    pub experts: usize,
    pub topk: usize,
    pub route_scale: f32,
    pub mode: GateMode,
}

impl MoeGate {
    pub fn signature(&self) -> Signature {
        let (r, k) = (self.rows, self.topk);
        let mut inputs =
            vec![input("x", &[r, self.dim], DType::F32), input("gate_w", &[self.experts, self.dim], DType::F32)];
        match self.mode {
            GateMode::Scored => inputs.push(input("bias", &[self.experts], DType::F32)),
            GateMode::Hashed { vocab } => {
                inputs.push(input("tid2eid", &[vocab, k], DType::I32));
                inputs.push(input("ids", &[r], DType::I32));
            }
        }
        Signature {
            inputs,
            outputs: vec![output("experts", &[r, k], DType::I32), output("weights", &[r, k], DType::F32)],
        }
    }
}

/// Clamped SwiGLU: `h = SiLU(min(g, limit)) ⊙ clamp(u, −limit, limit)` (gate clamped above
/// only); `limit = 0` disables the clamp (initial-revision shared expert).
#[derive(Clone, Debug, PartialEq)]
pub struct SwiGlu {
    pub rows: usize,
    pub width: usize,
    pub limit: f32,
}

impl SwiGlu {
    pub fn signature(&self) -> Signature {
        let (r, w) = (self.rows, self.width);
        Signature {
            inputs: vec![input("g", &[r, w], DType::F32), input("u", &[r, w], DType::F32)],
            outputs: vec![output("h", &[r, w], DType::F32)],
        }
    }
}

/// Routed experts: `y[r] = Σ_{e ∈ experts[r]} (ascending e) W2_e · (weights[r, e] · h_e)`,
/// `h_e = SwiGlu(W1_e · x[r], W3_e · x[r])`, each product a [`super::Linear`] in `format`
/// (act_quant of `x` and of the weighted `h`). Weights are stacked per expert:
/// `w1`, `w3` as `[E, inter, dim]` and `w2` as `[E, dim, inter]` in `format`'s layout
/// (values then scales for each of w1, w3, w2). Rows whose expert list repeats an expert are
/// an error.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeExperts {
    pub rows: usize,
    pub dim: usize,
    pub inter: usize,
    pub experts: usize,
    pub topk: usize,
    pub swiglu_limit: f32,
    pub format: WeightFormat,
}

impl MoeExperts {
    pub fn signature(&self) -> Signature {
        let (r, k, e) = (self.rows, self.topk, self.experts);
        let mut inputs = vec![
            input("x", &[r, self.dim], DType::F32),
            input("experts", &[r, k], DType::I32),
            input("weights", &[r, k], DType::F32),
        ];
        for (name, out, inp) in
            [("w1", self.inter, self.dim), ("w3", self.inter, self.dim), ("w2", self.dim, self.inter)]
        {
            for mut spec in self.format.weight_specs(out, inp) {
                spec.shape.insert(0, e);
                spec.name = match (name, spec.name) {
                    ("w1", "weight") => "w1",
                    ("w1", _) => "w1_scale",
                    ("w3", "weight") => "w3",
                    ("w3", _) => "w3_scale",
                    ("w2", "weight") => "w2",
                    _ => "w2_scale",
                };
                inputs.push(spec);
            }
        }
        Signature { inputs, outputs: vec![output("y", &[r, self.dim], DType::F32)] }
    }
}
