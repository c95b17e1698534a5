//! The reference's block quantizers (act_quant, FP8 and FP4 simulation) and the Hadamard
//! rotation.
//!
//! Scales are powers of two chosen exactly as the reference kernel does: `v = amax · fl32(1/max)`
//! in f32, then `2^ceil(log2 v)` read off v's bits (exponent, plus one if any mantissa bit is
//! set). Dividing by a power of two is exact, so codes depend only on that scale rule and the
//! round-to-nearest-even encoders of `hal::dtype`.

use hal::dtype::{e2m1_to_f32, e4m3_to_f32, exp2i, f32_to_e2m1, f32_to_e4m3, E2M1_MAX, E4M3_MAX};
use hal::ops::{Hadamard, QuantFormat, QuantSim};
use hal::Result;
use rayon::prelude::*;

use super::PAR_MACS;
use crate::device::CpuStorage;

/// Smallest block amax the e4m3 quantizer uses (keeps all-zero blocks finite).
pub const FP8_AMAX_FLOOR: f32 = 1e-4;
/// Smallest block amax the e2m1 quantizer uses: `6·2^-126`, so the scale stays a normal f32.
pub const FP4_AMAX_FLOOR: f32 = E2M1_MAX * f32::MIN_POSITIVE;

/// `ceil(log2 v)` from the bits of a positive f32, as the reference kernel computes it
/// (subnormal `v` counts as `2^-126`).
fn log2_ceil_bits(v: f32) -> i32 {
    let bits = v.to_bits();
    let exp = ((bits >> 23) & 0xFF) as i32;
    exp - 127 + i32::from(bits & 0x7F_FFFF != 0)
}

/// Exponent `k` of a block's scale `2^k`: `ceil(log2(max(amax, floor) · fl32(1/max)))`.
fn scale_exp(block: &[f32], floor: f32, max: f32) -> i32 {
    let amax = block.iter().fold(floor, |m, v| m.max(v.abs()));
    log2_ceil_bits(amax * (1.0 / max))
}

/// The e8m0 byte of a scale `2^k` (saturating; 255 is e8m0's NaN).
fn e8m0_byte(k: i32) -> u8 {
    (k + 127).clamp(0, 255) as u8
}

/// Per-block e4m3 quantization of `x` (blocks of `block` consecutive values; a short last
/// block is its own block): returns the e4m3 codes and one e8m0 scale byte per block. This is
/// what every FP8/FP4 linear does to its input (`block` = 128).
pub fn act_quant(x: &[f32], block: usize) -> (Vec<u8>, Vec<u8>) {
    let mut codes = Vec::with_capacity(x.len());
    let mut scales = Vec::with_capacity(x.len().div_ceil(block.max(1)));
    for b in x.chunks(block.max(1)) {
        let k = scale_exp(b, FP8_AMAX_FLOOR, E4M3_MAX);
        let s = exp2i(k);
        codes.extend(b.iter().map(|&v| f32_to_e4m3((v / s).clamp(-E4M3_MAX, E4M3_MAX))));
        scales.push(e8m0_byte(k));
    }
    (codes, scales)
}

/// In place: `x ← e4m3(x / s) · s` per block — the dequantized [`act_quant`]. Used for linear
/// inputs (block 128) and window/compressed KV (block 64).
pub fn quant_sim_fp8(x: &mut [f32], block: usize) {
    for b in x.chunks_mut(block.max(1)) {
        let s = exp2i(scale_exp(b, FP8_AMAX_FLOOR, E4M3_MAX));
        for v in b.iter_mut() {
            *v = e4m3_to_f32(f32_to_e4m3((*v / s).clamp(-E4M3_MAX, E4M3_MAX))) * s;
        }
    }
}

/// In place: `x ← e2m1(x / s) · s` per block, `s = 2^ceil(log2(amax · fl32(1/6)))` with amax
/// floored at `6·2^-126` (the indexer's queries and keys, block 32).
pub fn quant_sim_fp4(x: &mut [f32], block: usize) {
    for b in x.chunks_mut(block.max(1)) {
        let s = exp2i(scale_exp(b, FP4_AMAX_FLOOR, E2M1_MAX));
        for v in b.iter_mut() {
            *v = e2m1_to_f32(f32_to_e2m1((*v / s).clamp(-E2M1_MAX, E2M1_MAX))) * s;
        }
    }
}

/// Dequantizes per-block e4m3 codes with e8m0 scales (one per `block` codes): the inverse of
/// [`act_quant`], i.e. the `x̃` an FP8 GEMM multiplies.
pub fn act_dequant(codes: &[u8], scales: &[u8], block: usize) -> Vec<f32> {
    codes
        .chunks(block.max(1))
        .zip(scales)
        .flat_map(|(b, &s)| {
            let s = hal::dtype::e8m0_to_f32(s);
            b.iter().map(move |&c| e4m3_to_f32(c) * s)
        })
        .collect()
}

/// In place: `x ← H_n·x · n^{-1/2}` with the Sylvester Walsh–Hadamard matrix in natural order
/// (`n = x.len()`, a power of two). Butterflies run in f64 and each output is rounded once.
pub fn hadamard(x: &mut [f32]) {
    let n = x.len();
    let mut v: Vec<f64> = x.iter().map(|&a| a as f64).collect();
    let mut h = 1;
    while h < n {
        for start in (0..n).step_by(2 * h) {
            for j in start..(start + h).min(n.saturating_sub(h)) {
                let (a, b) = (v[j], v[j + h]);
                v[j] = a + b;
                v[j + h] = a - b;
            }
        }
        h *= 2;
    }
    let scale = 1.0 / (n as f64).sqrt();
    for (o, a) in x.iter_mut().zip(v) {
        *o = (a * scale) as f32;
    }
}

/// Op entry: [`QuantSim`] over the first `quant_dims` of every row.
pub fn run_quant_sim(op: &QuantSim, outs: &mut [&mut CpuStorage]) -> Result<()> {
    let (dim, qd, block) = (op.dim, op.quant_dims, op.block);
    let sim = match op.format {
        QuantFormat::Fp8E4M3 => quant_sim_fp8,
        QuantFormat::Fp4E2M1 => quant_sim_fp4,
    };
    let x = outs[0].f32s_mut();
    if dim == 0 {
        return Ok(());
    }
    let each = |row: &mut [f32]| sim(&mut row[..qd], block);
    if x.len() < PAR_MACS {
        x.chunks_exact_mut(dim).for_each(each);
    } else {
        x.par_chunks_exact_mut(dim).for_each(each);
    }
    Ok(())
}

/// Op entry: [`Hadamard`] of every row.
pub fn run_hadamard(op: &Hadamard, outs: &mut [&mut CpuStorage]) -> Result<()> {
    let x = outs[0].f32s_mut();
    if op.dim == 0 {
        return Ok(());
    }
    if x.len() * (op.dim.trailing_zeros() as usize) < PAR_MACS {
        x.chunks_exact_mut(op.dim).for_each(hadamard);
    } else {
        x.par_chunks_exact_mut(op.dim).for_each(hadamard);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_rule_edges() {
        // amax exactly 448·2^k gets scale 2^k (448·fl(1/448) rounds to 1).
        let (_, s) = act_quant(&[448.0, 1.0], 128);
        assert_eq!(s, vec![127]);
        let (c, s) = act_quant(&[14.0, -14.0], 128);
        assert_eq!((c, s), (vec![0x7E, 0xFE], vec![122]));
        // All zero: floor 1e-4 → 2^-13·... = 2^ceil(log2(1e-4/448)) = 2^-22.
        assert_eq!(act_quant(&[0.0; 4], 128).1, vec![127 - 22]);
        // FP4 floor gives a normal scale 2^-126 (6·2^-126·fl(1/6) rounds to 2^-126).
        let mut z = [0.0f32; 32];
        quant_sim_fp4(&mut z, 32);
        assert_eq!(z, [0.0; 32]);
        let mut t = [48.0f32, -24.0, 20.0];
        quant_sim_fp4(&mut t, 32);
        assert_eq!(t, [48.0, -24.0, 16.0]);
    }

    #[test]
    fn sim_is_dequantized_act_quant() {
        let x: Vec<f32> = (0..256).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.37).collect();
        let (c, s) = act_quant(&x, 128);
        let mut y = x.clone();
        quant_sim_fp8(&mut y, 128);
        assert_eq!(act_dequant(&c, &s, 128), y);
    }

    #[test]
    fn hadamard_twice_is_identity() {
        let x: Vec<f32> = (0..128).map(|i| (i as f32 * 0.731).sin()).collect();
        let mut y = x.clone();
        hadamard(&mut y);
        hadamard(&mut y);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        let mut e = vec![0.0f32; 4];
        e[1] = 1.0;
        hadamard(&mut e);
        assert_eq!(e, [0.5, -0.5, 0.5, -0.5]);
    }
}
