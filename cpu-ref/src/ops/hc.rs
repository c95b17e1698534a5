//! Manifold-constrained hyper-connections: mixing weights (with Sinkhorn), stream merge and
//! stream update.

use std::borrow::Cow;

use hal::ops::{hc_weights_at, HcHead, HcPost, HcPre};
use hal::Result;
use rayon::prelude::*;

use super::norm::{rms_factor, rms_norm_row};
use super::{arity, dot, PAR_MACS};
use crate::device::CpuStorage;

/// `1 / (1 + e^{−z})`, computed in f64 and rounded once.
pub fn sigmoid(z: f32) -> f32 {
    (1.0 / (1.0 + (-(z as f64)).exp())) as f32
}

/// Mixing logits of one row: `μ = (fn · x̄) · ρ` with `ρ = 1/sqrt(mean(x̄²) + norm_eps)` and
/// `x̄` the row's streams concatenated (`fn [mu.len(), x̄.len()]`).
pub fn hc_mixes(xbar: &[f32], fn_w: &[f32], norm_eps: f32, mu: &mut [f32]) {
    let rho = rms_factor(xbar, norm_eps);
    let n = xbar.len();
    for (i, v) in mu.iter_mut().enumerate() {
        *v = dot(&fn_w[i * n..(i + 1) * n], xbar) * rho;
    }
}

/// Splits one row's `(2+m)·m` mixing logits into `pre [m]`, `post [m]` and the
/// Sinkhorn-normalized `comb [m, m]` (row j = source stream), exactly as [`HcPre`] documents:
/// `pre = σ(s0·μ + b) + eps`, `post = 2σ(s1·μ + b)`, comb = softmax over k + eps, column
/// normalization, then `iters − 1` × (row, column) normalizations, each denominator + eps.
pub fn hc_split_sinkhorn(
    mixes: &[f32],
    scale: &[f32],
    base: &[f32],
    m: usize,
    iters: usize,
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let pre = (0..m).map(|i| sigmoid(scale[0] * mixes[i] + base[i]) + eps).collect();
    let post = (m..2 * m).map(|i| 2.0 * sigmoid(scale[1] * mixes[i] + base[i])).collect();
    let mut c: Vec<f32> = (2 * m..(2 + m) * m).map(|i| scale[2] * mixes[i] + base[i]).collect();
    for row in c.chunks_exact_mut(m.max(1)) {
        let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let e: Vec<f64> = row.iter().map(|&z| ((z - mx) as f64).exp()).collect();
        let sum: f64 = e.iter().sum();
        for (v, ei) in row.iter_mut().zip(e) {
            *v = (ei / sum) as f32 + eps;
        }
    }
    let normalize_cols = |c: &mut [f32]| {
        for k in 0..m {
            let s = ((0..m).map(|j| c[j * m + k] as f64).sum::<f64>() as f32) + eps;
            (0..m).for_each(|j| c[j * m + k] /= s);
        }
    };
    let normalize_rows = |c: &mut [f32]| {
        for row in c.chunks_exact_mut(m.max(1)) {
            let s = (row.iter().map(|&v| v as f64).sum::<f64>() as f32) + eps;
            row.iter_mut().for_each(|v| *v /= s);
        }
    };
    normalize_cols(&mut c);
    for _ in 1..iters {
        normalize_rows(&mut c);
        normalize_cols(&mut c);
    }
    (pre, post, c)
}

/// `u = Σ_i p_i · X_i` over the `p.len()` streams of `x` (each `y.len()` wide), f64 sum, then
/// the sub-layer's input norm `y = norm ⊙ (u · ρ_u)` ([`HcPre`] steps 5 and 6).
pub fn hc_merge_norm(x: &[f32], p: &[f32], norm: &[f32], eps: f32, y: &mut [f32]) {
    let d = y.len();
    let u: Vec<f32> = (0..d)
        .map(|c| p.iter().enumerate().map(|(i, &pi)| pi as f64 * x[i * d + c] as f64).sum::<f64>() as f32)
        .collect();
    rms_norm_row(&u, Some(norm), eps, y);
}

/// One row of [`HcPost`]: `out[k] = post[k]·f + Σ_j comb[j, k]·x[j]`, f64 sum rounded once.
pub fn hc_post_row(f: &[f32], x: &[f32], post: &[f32], comb: &[f32], out: &mut [f32]) {
    let (m, d) = (post.len(), f.len());
    for (k, ok) in out.chunks_exact_mut(d.max(1)).enumerate() {
        for (c, v) in ok.iter_mut().enumerate() {
            let mut acc = post[k] as f64 * f[c] as f64;
            for j in 0..m {
                acc += comb[j * m + k] as f64 * x[j * d + c] as f64;
            }
            *v = acc as f32;
        }
    }
}

/// The streams of an mHC op ([`HcPre`] step 0): input `x`, or, `after_post`, HcPost of the
/// first four inputs, written to the output `x`. Returns them with the op's remaining inputs
/// (`fn`, `base`, `scale`, `norm`) and outputs.
#[allow(clippy::type_complexity)]
fn streams<'a, 'o, 's>(
    after_post: bool,
    (rows, mult, dim): (usize, usize, usize),
    ins: &[&'a CpuStorage],
    outs: &'o mut [&'s mut CpuStorage],
) -> Result<(Cow<'a, [f32]>, Vec<&'a CpuStorage>, &'o mut [&'s mut CpuStorage])> {
    let at = hc_weights_at(after_post);
    if !after_post {
        return Ok((Cow::Borrowed(ins[0].f32s()), ins[at..].to_vec(), outs));
    }
    let (x, rest) = outs.split_first_mut().ok_or_else(|| arity("hc streams"))?;
    run_hc_post(&HcPost { rows, mult, dim }, &ins[..at], std::slice::from_mut(x))?;
    Ok((Cow::Owned(x.f32s().to_vec()), ins[at..].to_vec(), rest))
}

/// Op entry: [`HcPre`].
pub fn run_hc_pre(op: &HcPre, ins: &[&CpuStorage], outs: &mut [&mut CpuStorage]) -> Result<()> {
    let (m, d, nm) = (op.mult, op.dim, op.mix_width());
    let (x, ins, outs) = streams(op.after_post, (op.rows, m, d), ins, outs)?;
    let (fn_w, base, scale, norm) = (ins[0].f32s(), ins[1].f32s(), ins[2].f32s(), ins[3].f32s());
    let [u, post, comb] = outs else { return Err(arity("hc_pre")) };
    let (u, post, comb) = (u.f32s_mut(), post.f32s_mut(), comb.f32s_mut());
    let each = |r: usize, ur: &mut [f32], pr: &mut [f32], cr: &mut [f32]| {
        let xr = &x[r * m * d..(r + 1) * m * d];
        let mut mu = vec![0.0; nm];
        hc_mixes(xr, fn_w, op.norm_eps, &mut mu);
        let (pre, po, co) = hc_split_sinkhorn(&mu, scale, base, m, op.sinkhorn_iters, op.hc_eps);
        hc_merge_norm(xr, &pre, norm, op.norm_eps, ur);
        pr.copy_from_slice(&po);
        cr.copy_from_slice(&co);
    };
    if m == 0 || d == 0 {
        return Ok(());
    }
    if x.len() * nm < PAR_MACS {
        let rows = u.chunks_exact_mut(d).zip(post.chunks_exact_mut(m)).zip(comb.chunks_exact_mut(m * m));
        rows.enumerate().for_each(|(r, ((ur, pr), cr))| each(r, ur, pr, cr));
    } else {
        let rows = u.par_chunks_exact_mut(d).zip(post.par_chunks_exact_mut(m)).zip(comb.par_chunks_exact_mut(m * m));
        rows.enumerate().for_each(|(r, ((ur, pr), cr))| each(r, ur, pr, cr));
    }
    Ok(())
}

/// Op entry: [`HcPost`].
pub fn run_hc_post(op: &HcPost, ins: &[&CpuStorage], outs: &mut [&mut CpuStorage]) -> Result<()> {
    let (m, d) = (op.mult, op.dim);
    let (f, x, post, comb) = (ins[0].f32s(), ins[1].f32s(), ins[2].f32s(), ins[3].f32s());
    let out = outs[0].f32s_mut();
    if m == 0 || d == 0 {
        return Ok(());
    }
    let each = |(r, o): (usize, &mut [f32])| {
        hc_post_row(
            &f[r * d..(r + 1) * d],
            &x[r * m * d..(r + 1) * m * d],
            &post[r * m..(r + 1) * m],
            &comb[r * m * m..(r + 1) * m * m],
            o,
        )
    };
    if out.len() * m < PAR_MACS {
        out.chunks_exact_mut(m * d).enumerate().for_each(each);
    } else {
        out.par_chunks_exact_mut(m * d).enumerate().for_each(each);
    }
    Ok(())
}

/// Op entry: [`HcHead`].
pub fn run_hc_head(op: &HcHead, ins: &[&CpuStorage], outs: &mut [&mut CpuStorage]) -> Result<()> {
    let (m, d) = (op.mult, op.dim);
    let (x, ins, outs) = streams(op.after_post, (op.rows, m, d), ins, outs)?;
    let (fn_w, base, scale, norm) = (ins[0].f32s(), ins[1].f32s(), ins[2].f32s(), ins[3].f32s());
    let [u] = outs else { return Err(arity("hc_head")) };
    let u = u.f32s_mut();
    if m == 0 || d == 0 {
        return Ok(());
    }
    let each = |(r, ur): (usize, &mut [f32])| {
        let xr = &x[r * m * d..(r + 1) * m * d];
        let mut mu = vec![0.0; m];
        hc_mixes(xr, fn_w, op.norm_eps, &mut mu);
        let p: Vec<f32> = (0..m).map(|i| sigmoid(scale[0] * mu[i] + base[i]) + op.hc_eps).collect();
        hc_merge_norm(xr, &p, norm, op.norm_eps, ur);
    };
    if x.len() * m < PAR_MACS {
        u.chunks_exact_mut(d).enumerate().for_each(each);
    } else {
        u.par_chunks_exact_mut(d).enumerate().for_each(each);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinkhorn_columns_sum_to_one() {
        let mixes: Vec<f32> = (0..24).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
        let base: Vec<f32> = (0..24).map(|i| (i as f32 * 0.1).sin()).collect();
        let (pre, post, comb) = hc_split_sinkhorn(&mixes, &[0.5, 0.7, 1.3], &base, 4, 20, 1e-6);
        assert!(pre.iter().all(|&p| p > 0.0 && p < 1.0 + 1e-5));
        assert!(post.iter().all(|&p| p > 0.0 && p < 2.0));
        for k in 0..4 {
            let s: f32 = (0..4).map(|j| comb[j * 4 + k]).sum();
            assert!((s - 1.0).abs() < 1e-5, "column {k} sums to {s}");
        }
        for j in 0..4 {
            let s: f32 = comb[j * 4..j * 4 + 4].iter().sum();
            assert!((s - 1.0).abs() < 1e-3, "row {j} sums to {s}");
        }
    }

    #[test]
    fn post_uses_the_transpose() {
        // comb[0][1] = 1: stream 0 feeds stream 1.
        let comb = [0.0, 1.0, 0.0, 0.0];
        let mut out = [0.0; 2];
        hc_post_row(&[10.0], &[1.0, 2.0], &[1.0, 0.5], &comb, &mut out);
        assert_eq!(out, [10.0, 6.0]);
    }
}
