//! Linear layers over the checkpoint's weight formats.

use super::{input, output, Signature, TensorSpec};
use crate::dtype::DType;

/// How a weight matrix `W [out, in]` is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    /// f32 values. Plain `y = W·x`, no activation quantization.
    F32,
    /// bf16 values, used in f32. Plain `y = W·x`, no activation quantization.
    Bf16,
    /// e4m3 codes `[out, in]` + e8m0 scales `[ceil(out/128), ceil(in/128)]`, one per 128×128
    /// block: `W[o, i] = e4m3(q[o, i]) · 2^(s[o/128, i/128] − 127)`. Input is act_quant'ed.
    Fp8Block128,
    /// Packed e2m1 codes `[out, in/2]` (low nibble = even input) + e8m0 scales `[out, in/32]`,
    /// one per 32 consecutive inputs of a row. Input is act_quant'ed.
    Fp4Group32,
}

impl WeightFormat {
    /// Whether the reference quantizes the activation to e4m3 before this GEMM.
    pub fn quantizes_input(self) -> bool {
        matches!(self, WeightFormat::Fp8Block128 | WeightFormat::Fp4Group32)
    }

    /// The weight tensor(s) of an `[out, in]` matrix in this format: values, then scales if any.
    pub fn weight_specs(self, out: usize, inp: usize) -> Vec<TensorSpec> {
        match self {
            WeightFormat::F32 => vec![input("weight", &[out, inp], DType::F32)],
            WeightFormat::Bf16 => vec![input("weight", &[out, inp], DType::BF16)],
            WeightFormat::Fp8Block128 => vec![
                input("weight", &[out, inp], DType::F8E4M3),
                input("scale", &[out.div_ceil(128), inp.div_ceil(128)], DType::F8E8M0),
            ],
            WeightFormat::Fp4Group32 => {
                vec![input("weight", &[out, inp / 2], DType::F4E2M1x2), input("scale", &[out, inp / 32], DType::F8E8M0)]
            }
        }
    }

    /// Bytes of an `[out, in]` matrix in this format, scales included.
    pub fn bytes(self, out: usize, inp: usize) -> usize {
        self.weight_specs(out, inp).iter().map(|s| s.shape.iter().product::<usize>() * s.dtype.size()).sum()
    }
}

/// `y[r, o] = Σ_i W[o, i] · x̃[r, i]` (f32 accumulation).
///
/// For `F32`/`Bf16` weights `x̃ = x`. For `Fp8Block128`/`Fp4Group32` weights `x̃` is the
/// reference's act_quant of `x`: per row, in blocks of 128 along `in`,
/// `amax = max(max|x_block|, 1e-4)`, `s = 2^ceil(log2(amax · fl32(1/448)))`,
/// `x̃ = e4m3_rne(clamp(x / s, −448, 448)) · s`. The FP4 weight is exact in e4m3, so both
/// formats are FP8×FP8 products with f32 accumulation.
#[derive(Clone, Debug, PartialEq)]
pub struct Linear {
    pub rows: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub format: WeightFormat,
}

impl Linear {
    pub fn signature(&self) -> Signature {
        let mut inputs = vec![input("x", &[self.rows, self.in_features], DType::F32)];
        inputs.extend(self.format.weight_specs(self.out_features, self.in_features));
        Signature { inputs, outputs: vec![output("y", &[self.rows, self.out_features], DType::F32)] }
    }
}

/// Block-diagonal linear: the attention's grouped low-rank output projection `wo_a` (spec §3.4).
///
/// `y[r, g·out_per_group + o] = Σ_i W[g·out_per_group + o, i] · x[r, g·in_per_group + i]`
/// with `W [groups·out_per_group, in_per_group]` in any [`WeightFormat`] (scales over the whole
/// `[groups·out_per_group, in_per_group]` matrix), used as its exact f32 values **without**
/// act_quant: the reference dequantizes the checkpoint's FP8 `wo_a` at load and runs this as a
/// plain einsum, so keeping it FP8 changes no value, only the bytes read.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupedLinear {
    pub rows: usize,
    pub groups: usize,
    pub in_per_group: usize,
    pub out_per_group: usize,
    pub format: WeightFormat,
}

impl GroupedLinear {
    pub fn signature(&self) -> Signature {
        let (r, g) = (self.rows, self.groups);
        let mut inputs = vec![input("x", &[r, g * self.in_per_group], DType::F32)];
        inputs.extend(self.format.weight_specs(g * self.out_per_group, self.in_per_group));
        Signature { inputs, outputs: vec![output("y", &[r, g * self.out_per_group], DType::F32)] }
    }
}
