//! Linear layers over the checkpoint's weight formats, and the block-diagonal `wo_a`.
//!
//! Every weight format decodes exactly to f32 (e4m3 and e2m1 values times a power of two, or
//! bf16), so a matmul is "decode the weight once, keep it, then an f32 matmul with f64
//! accumulation" — the same numbers the reference's FP8×FP8 GEMM with f32 accumulation
//! approximates.

use std::borrow::Cow;

use hal::dtype::{bf16_to_f32, e2m1_to_f32, e4m3_to_f32, e8m0_to_f32, fp4_unpack};
use hal::ops::{GroupedLinear, Linear, WeightFormat};
use hal::{Error, Result};
use rayon::prelude::*;

use super::quant::quant_sim_fp8;
use super::{dot, matmul, PAR_MACS};
use crate::device::{CpuStorage, DequantKey};

/// Block length of the linear-input activation quantization.
pub const ACT_BLOCK: usize = 128;

fn e4m3_table() -> [f32; 256] {
    std::array::from_fn(|c| e4m3_to_f32(c as u8))
}

/// Decodes `batch` stacked FP8 matrices `[out, inp]` (e4m3 codes) with one e8m0 scale per
/// 128×128 block (`scales [batch, ceil(out/128), ceil(inp/128)]`).
pub fn dequant_fp8_block128(codes: &[u8], scales: &[u8], batch: usize, out: usize, inp: usize) -> Vec<f32> {
    let (sr, sc) = (out.div_ceil(128), inp.div_ceil(128));
    let lut = e4m3_table();
    let mut w = vec![0.0f32; batch * out * inp];
    if inp == 0 {
        return w;
    }
    w.par_chunks_mut(inp).enumerate().for_each(|(row, wr)| {
        let (b, o) = (row / out, row % out);
        let srow = &scales[(b * sr + o / 128) * sc..][..sc];
        for ((v, &c), i) in wr.iter_mut().zip(&codes[row * inp..][..inp]).zip(0..) {
            *v = lut[c as usize] * e8m0_to_f32(srow[i / 128]);
        }
    });
    w
}

/// Decodes `batch` stacked FP4 matrices `[out, inp]`: packed e2m1 pairs `[out, inp/2]` (low
/// nibble = even input) with one e8m0 scale per 32 inputs of a row (`scales [out, inp/32]`).
/// `inp` must be a multiple of 32.
pub fn dequant_fp4_group32(packed: &[u8], scales: &[u8], batch: usize, out: usize, inp: usize) -> Vec<f32> {
    let mut w = vec![0.0f32; batch * out * inp];
    if inp == 0 {
        return w;
    }
    w.par_chunks_mut(inp).enumerate().for_each(|(row, wr)| {
        let bytes = &packed[row * (inp / 2)..][..inp / 2];
        let srow = &scales[row * (inp / 32)..][..inp / 32];
        for (i, v) in wr.iter_mut().enumerate() {
            *v = e2m1_to_f32(fp4_unpack(bytes, i)) * e8m0_to_f32(srow[i / 32]);
        }
    });
    w
}

/// Decodes little-endian bf16 values.
pub fn dequant_bf16(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(2).map(|c| bf16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect()
}

/// The f32 values of `batch` stacked weights `[out, inp]` stored in `format` (`scale` is the
/// format's scale tensor, if it has one). f32 weights are borrowed as they are; the others are
/// decoded once and cached inside the weight's storage, keyed on the scale tensor's version.
pub fn weight_f32<'a>(
    op: &str,
    format: WeightFormat,
    weight: &'a CpuStorage,
    scale: Option<&CpuStorage>,
    (batch, out, inp): (usize, usize, usize),
) -> Result<Cow<'a, [f32]>> {
    let key = DequantKey { format, scale_version: scale.map(CpuStorage::version), batch, out, inp };
    let no_scale = || Error::invalid(op, format!("{format:?} weight given without its scale tensor"));
    Ok(match format {
        WeightFormat::F32 => Cow::Borrowed(weight.f32s()),
        WeightFormat::Bf16 => weight.dequantized(key, dequant_bf16),
        WeightFormat::Fp8Block128 => {
            let s = scale.ok_or_else(no_scale)?.bytes();
            weight.dequantized(key, |b| dequant_fp8_block128(b, s, batch, out, inp))
        }
        WeightFormat::Fp4Group32 => {
            if inp % 32 != 0 {
                return Err(Error::invalid(op, format!("FP4 weight input dimension {inp} is not a multiple of 32")));
            }
            let s = scale.ok_or_else(no_scale)?.bytes();
            weight.dequantized(key, |b| dequant_fp4_group32(b, s, batch, out, inp))
        }
    })
}

/// The linear input the reference multiplies: rows of `x` (length `inp`) act_quant'ed in
/// blocks of 128 and dequantized (`quantize = true`), or `x` itself.
pub fn linear_input(x: &[f32], inp: usize, quantize: bool) -> Cow<'_, [f32]> {
    if !quantize {
        return Cow::Borrowed(x);
    }
    let mut xq = x.to_vec();
    for row in xq.chunks_mut(inp.max(1)) {
        quant_sim_fp8(row, ACT_BLOCK);
    }
    Cow::Owned(xq)
}

/// `y[r, :] = W · x̃[r, :]` with `W [out, inp]` in f32 and x̃ from [`linear_input`].
pub fn linear(x: &[f32], w: &[f32], inp: usize, out: usize, quantize_input: bool, y: &mut [f32]) {
    matmul(&linear_input(x, inp, quantize_input), w, inp, out, y);
}

/// Block-diagonal product: group g of each row of `x` (`ipg` values) times rows
/// `g·opg .. (g+1)·opg` of `w [groups·opg, ipg]`, written to group g of the row of `y`.
pub fn grouped_linear(x: &[f32], w: &[f32], groups: usize, ipg: usize, opg: usize, y: &mut [f32]) {
    if opg == 0 {
        return;
    }
    // Chunk c of y is row c / groups, group c % groups; chunk c of x (ipg long) is its input.
    let each = |(c, yc): (usize, &mut [f32])| {
        let g = c % groups;
        let xc = &x[c * ipg..(c + 1) * ipg];
        for (o, v) in yc.iter_mut().enumerate() {
            *v = dot(&w[(g * opg + o) * ipg..][..ipg], xc);
        }
    };
    if y.len() * ipg < PAR_MACS {
        y.chunks_exact_mut(opg).enumerate().for_each(each);
    } else {
        y.par_chunks_exact_mut(opg).enumerate().for_each(each);
    }
}

/// Op entry: [`Linear`].
pub fn run_linear(op: &Linear, ins: &[&CpuStorage], outs: &mut [&mut CpuStorage]) -> Result<()> {
    let (inp, out) = (op.in_features, op.out_features);
    let w = weight_f32("linear", op.format, ins[1], ins.get(2).copied(), (1, out, inp))?;
    linear(ins[0].f32s(), &w, inp, out, op.format.quantizes_input(), outs[0].f32s_mut());
    Ok(())
}

/// Op entry: [`GroupedLinear`]. Any weight format is decoded to f32 and used without
/// activation quantization (the reference dequantizes `wo_a` at load and runs an einsum).
pub fn run_grouped_linear(op: &GroupedLinear, ins: &[&CpuStorage], outs: &mut [&mut CpuStorage]) -> Result<()> {
    let (g, ipg, opg) = (op.groups, op.in_per_group, op.out_per_group);
    let w = weight_f32("grouped_linear", op.format, ins[1], ins.get(2).copied(), (1, g * opg, ipg))?;
    grouped_linear(ins[0].f32s(), &w, g, ipg, opg, outs[0].f32s_mut());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp4_nibble_order_and_scales() {
        // Row 0: element 0 = 1.0 (code 2, low nibble), element 1 = -6 (code 0xF, high nibble).
        let mut packed = vec![0u8; 16];
        packed[0] = 0xF2;
        let w = dequant_fp4_group32(&packed, &[128], 1, 1, 32);
        assert_eq!(&w[..3], &[2.0, -12.0, 0.0]);
    }

    #[test]
    fn fp8_block_scales_by_block() {
        let (out, inp) = (130, 256);
        let codes = vec![0x38u8; out * inp]; // 1.0
        let scales = [127u8, 128, 129, 130];
        let w = dequant_fp8_block128(&codes, &scales, 1, out, inp);
        assert_eq!((w[0], w[128], w[129 * inp], w[129 * inp + 200]), (1.0, 2.0, 4.0, 8.0));
    }

    #[test]
    fn grouped_is_block_diagonal() {
        // 2 groups, 2 inputs, 1 output each: w rows [1, 2] and [3, 4].
        let mut y = [0.0; 2];
        grouped_linear(&[1.0, 1.0, 10.0, 100.0], &[1.0, 2.0, 3.0, 4.0], 2, 2, 1, &mut y);
        assert_eq!(y, [3.0, 430.0]);
    }
}
