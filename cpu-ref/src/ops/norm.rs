//! RMSNorm.

use hal::ops::RmsNorm;
use hal::Result;
use rayon::prelude::*;

use super::quant::run_quant_sim;
use super::rope::run_rope;
use super::PAR_MACS;
use crate::device::CpuStorage;

/// `1 / sqrt(mean(x²) + eps)` as the reference computes it: the mean in f32 (here from an f64
/// sum, rounded once), `+ eps` in f32, then the reciprocal square root rounded to f32.
pub fn rms_factor(x: &[f32], eps: f32) -> f32 {
    let ms = (x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64) as f32;
    (1.0 / ((ms + eps) as f64).sqrt()) as f32
}

/// `y = w ⊙ (x · rms_factor(x))` (the reference scales x first, then multiplies the weight);
/// without a weight, `y = x · rms_factor(x)`.
pub fn rms_norm_row(x: &[f32], weight: Option<&[f32]>, eps: f32, y: &mut [f32]) {
    let r = rms_factor(x, eps);
    match weight {
        Some(w) => {
            for ((o, &v), &wi) in y.iter_mut().zip(x).zip(w) {
                *o = wi * (v * r);
            }
        }
        None => {
            for (o, &v) in y.iter_mut().zip(x) {
                *o = v * r;
            }
        }
    }
}

/// Op entry: [`RmsNorm`] of every row, then its RoPE and FP8 simulation (the [`Rope`](hal::ops::Rope) and
/// [`QuantSim`](hal::ops::QuantSim) entries on the output).
pub fn run_rms_norm(op: &RmsNorm, ins: &[&CpuStorage], outs: &mut [&mut CpuStorage]) -> Result<()> {
    let x = ins[0].f32s();
    let w = op.weighted.then(|| ins[1].f32s());
    let d = op.dim;
    if d == 0 {
        return Ok(());
    }
    {
        let y = outs[0].f32s_mut();
        let each = |(r, yr): (usize, &mut [f32])| rms_norm_row(&x[r * d..(r + 1) * d], w, op.eps, yr);
        if x.len() < PAR_MACS {
            y.chunks_exact_mut(d).enumerate().for_each(each);
        } else {
            y.par_chunks_exact_mut(d).enumerate().for_each(each);
        }
    }
    if let Some(rope) = op.rope_op() {
        let at = op.rope_inputs_at();
        run_rope(&rope, &ins[at..at + 2], outs)?;
    }
    if let Some(q) = op.quant_op() {
        run_quant_sim(&q, outs)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_rms_after_norm() {
        let x = [3.0f32, -4.0, 0.0, 5.0];
        let mut y = [0.0; 4];
        rms_norm_row(&x, Some(&[1.0, 2.0, 1.0, 1.0]), 0.0, &mut y);
        let r = 1.0 / (50.0f32 / 4.0).sqrt();
        assert!((y[0] - 3.0 * r).abs() < 1e-7 && (y[1] + 8.0 * r).abs() < 1e-6);
    }
}
