//! Mixture of experts: the sqrt-softplus gate, the clamped SwiGLU and the routed experts.

use hal::ops::{GateMode, MoeExperts, MoeGate, SwiGlu};
use hal::{Error, Result};
use rayon::prelude::*;

use super::indexer::top_k;
use super::linear::{linear_input, weight_f32};
use super::{arity, dot, matmul};
use crate::device::CpuStorage;

/// `ln(1 + e^z)`, or `z` itself above 20 (PyTorch's threshold); `ln_1p` keeps it accurate for
/// very negative z.
pub fn softplus(z: f32) -> f32 {
    if z > 20.0 {
        z
    } else {
        (z as f64).exp().ln_1p() as f32
    }
}

/// Gate scores of one token: `s_e = sqrt(softplus(gate_w[e] · x))` for the `experts` rows of
/// `gate_w [experts, dim]`.
pub fn gate_scores(x: &[f32], gate_w: &[f32], experts: usize) -> Vec<f32> {
    let d = x.len();
    (0..experts).map(|e| softplus(dot(&gate_w[e * d..(e + 1) * d], x)).sqrt()).collect()
}

/// Routing weights of the chosen experts from the unbiased scores:
/// `route_scale · s_e / Σ_{e'∈S} s_{e'}` (sum rounded to f32, then an f32 divide and multiply).
pub fn route_weights(scores: &[f32], chosen: &[usize], route_scale: f32) -> Vec<f32> {
    let sum = chosen.iter().map(|&e| scores[e] as f64).sum::<f64>() as f32;
    chosen.iter().map(|&e| scores[e] / sum * route_scale).collect()
}

/// Score routing: the `k` experts (all of them if fewer) with the largest `s_e + bias_e`,
/// descending, ties lower e first.
pub fn select_scored(scores: &[f32], bias: &[f32], k: usize) -> Vec<usize> {
    let biased: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
    let mut idx = vec![-1i32; k];
    top_k(&biased, k, &mut idx);
    idx.into_iter().filter_map(|e| usize::try_from(e).ok()).collect()
}

/// `SiLU(min(g, limit)) · clamp(u, −limit, limit)`; `limit = 0` disables both clamps. NaN
/// passes through, as in the reference.
pub fn swiglu(g: f32, u: f32, limit: f32) -> f32 {
    let (g, u) = if limit > 0.0 { (if g > limit { limit } else { g }, u.clamp(-limit, limit)) } else { (g, u) };
    ((g as f64 / (1.0 + (-(g as f64)).exp())) as f32) * u
}

fn check_limit(op: &str, limit: f32) -> Result<()> {
    if limit >= 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(op, format!("swiglu limit {limit} must be ≥ 0 (0 disables the clamp)")))
    }
}

/// Op entry: [`MoeGate`].
pub fn run_moe_gate(op: &MoeGate, ins: &[&CpuStorage], outs: &mut [&mut CpuStorage]) -> Result<()> {
    let name = "moe_gate";
    let (d, e_n, k) = (op.dim, op.experts, op.topk);
    let (x, gate_w) = (ins[0].f32s(), ins[1].f32s());
    // Expert sets first (all errors before any output is written).
    let mut chosen: Vec<Vec<usize>> = Vec::with_capacity(op.rows);
    let mut scores: Vec<Vec<f32>> = Vec::with_capacity(op.rows);
    for r in 0..op.rows {
        let row_err = |m: String| Error::invalid(format!("{name} row {r}"), m);
        let s = gate_scores(&x[r * d..(r + 1) * d], gate_w, e_n);
        chosen.push(match op.mode {
            GateMode::Scored => select_scored(&s, ins[2].f32s(), k),
            GateMode::Hashed { vocab } => {
                let id = ins[3].i32s()[r];
                let id = usize::try_from(id)
                    .ok()
                    .filter(|&i| i < vocab)
                    .ok_or_else(|| row_err(format!("token id {id} outside [0, {vocab})")))?;
                ins[2].i32s()[id * k..(id + 1) * k]
                    .iter()
                    .map(|&e| {
                        usize::try_from(e)
                            .ok()
                            .filter(|&e| e < e_n)
                            .ok_or_else(|| row_err(format!("tid2eid[{id}] holds expert {e} outside [0, {e_n})")))
                    })
                    .collect::<Result<Vec<_>>>()?
            }
        });
        scores.push(s);
    }
    let [experts, weights] = outs else { return Err(arity(name)) };
    let experts = experts.i32s_mut();
    for (o, c) in experts.iter_mut().zip(chosen.iter().flatten()) {
        *o = *c as i32;
    }
    let weights = weights.f32s_mut();
    for (r, (c, s)) in chosen.iter().zip(&scores).enumerate() {
        weights[r * k..(r + 1) * k].copy_from_slice(&route_weights(s, c, op.route_scale));
    }
    Ok(())
}

/// Op entry: [`SwiGlu`].
pub fn run_swiglu(op: &SwiGlu, ins: &[&CpuStorage], outs: &mut [&mut CpuStorage]) -> Result<()> {
    check_limit("swiglu", op.limit)?;
    let (g, u) = (ins[0].f32s(), ins[1].f32s());
    for ((h, &g), &u) in outs[0].f32s_mut().iter_mut().zip(g).zip(u) {
        *h = swiglu(g, u, op.limit);
    }
    Ok(())
}

/// One token through its experts, in ascending expert order: for each `(e, w)`,
/// `y += W2_e · q(w · SwiGlu(W1_e · q(x), W3_e · q(x)))` with `q` the linear-input
/// quantization of `format` and `y` summed in f32. `w1`, `w3`: `[E, inter, dim]`,
/// `w2`: `[E, dim, inter]`, all f32.
#[allow(clippy::too_many_arguments)]
pub fn experts_row(
    x: &[f32],
    routes: &[(usize, f32)],
    w1: &[f32],
    w3: &[f32],
    w2: &[f32],
    inter: usize,
    limit: f32,
    quantize: bool,
    y: &mut [f32],
) {
    let dim = x.len();
    let xq = linear_input(x, dim, quantize);
    let (mut g, mut u, mut ye) = (vec![0.0; inter], vec![0.0; inter], vec![0.0; dim]);
    y.fill(0.0);
    for &(e, wt) in routes {
        let m = e * inter * dim;
        matmul(&xq, &w1[m..m + inter * dim], dim, inter, &mut g);
        matmul(&xq, &w3[m..m + inter * dim], dim, inter, &mut u);
        let h: Vec<f32> = g.iter().zip(&u).map(|(&g, &u)| swiglu(g, u, limit) * wt).collect();
        matmul(&linear_input(&h, inter, quantize), &w2[m..m + inter * dim], inter, dim, &mut ye);
        for (a, b) in y.iter_mut().zip(&ye) {
            *a += b;
        }
    }
}

/// Op entry: [`MoeExperts`]. Every row's expert list is checked (range, no repeats) before any
/// output is written.
pub fn run_moe_experts(op: &MoeExperts, ins: &[&CpuStorage], outs: &mut [&mut CpuStorage]) -> Result<()> {
    let name = "moe_experts";
    check_limit(name, op.swiglu_limit)?;
    let (d, inter, e_n, k) = (op.dim, op.inter, op.experts, op.topk);
    let (x, ids, wts) = (ins[0].f32s(), ins[1].i32s(), ins[2].f32s());
    let mut routes: Vec<Vec<(usize, f32)>> = Vec::with_capacity(op.rows);
    for r in 0..op.rows {
        let row_err = |m: String| Error::invalid(format!("{name} row {r}"), m);
        let mut rr = Vec::with_capacity(k);
        for (&e, &w) in ids[r * k..(r + 1) * k].iter().zip(&wts[r * k..(r + 1) * k]) {
            let e = usize::try_from(e)
                .ok()
                .filter(|&e| e < e_n)
                .ok_or_else(|| row_err(format!("expert {e} outside [0, {e_n})")))?;
            rr.push((e, w));
        }
        rr.sort_by_key(|&(e, _)| e);
        if let Some(p) = rr.windows(2).find(|p| p[0].0 == p[1].0) {
            return Err(row_err(format!("expert {} is listed twice", p[0].0)));
        }
        routes.push(rr);
    }
    let per = op.format.weight_specs(1, 1).len();
    let weight = |i: usize, out: usize, inp: usize| {
        let (w, s) = (ins[3 + i * per], (per == 2).then(|| ins[4 + i * per]));
        weight_f32(name, op.format, w, s, (e_n, out, inp))
    };
    let (w1, w3, w2) = (weight(0, inter, d)?, weight(1, inter, d)?, weight(2, d, inter)?);
    let y = outs[0].f32s_mut();
    if d == 0 {
        return Ok(());
    }
    let quantize = op.format.quantizes_input();
    let each = |(r, yr): (usize, &mut [f32])| {
        experts_row(&x[r * d..(r + 1) * d], &routes[r], &w1, &w3, &w2, inter, op.swiglu_limit, quantize, yr)
    };
    if op.rows <= 1 {
        y.chunks_exact_mut(d).enumerate().for_each(each);
    } else {
        y.par_chunks_exact_mut(d).enumerate().for_each(each);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softplus_is_stable() {
        assert_eq!(softplus(30.0), 30.0);
        assert!((softplus(-100.0) - (-100f64).exp() as f32).abs() < 1e-45);
        assert!((softplus(0.0) - std::f32::consts::LN_2).abs() < 1e-7);
    }

    #[test]
    fn gate_ties_pick_lower_expert() {
        assert_eq!(select_scored(&[1.0, 2.0, 2.0, 0.5], &[0.0, 0.0, 0.0, 1.5], 3), vec![1, 2, 3]);
        let w = route_weights(&[1.0, 3.0, 1.0], &[1, 2], 2.0);
        assert_eq!(w, vec![1.5, 0.5]);
    }

    #[test]
    fn swiglu_clamps_gate_above_only() {
        let silu = |g: f32| g / (1.0 + (-g).exp());
        assert_eq!(swiglu(20.0, 20.0, 10.0), silu(10.0) * 10.0);
        assert_eq!(swiglu(-20.0, -20.0, 10.0), ((-20f64 / (1.0 + 20f64.exp())) as f32) * -10.0);
        assert_eq!(swiglu(20.0, 20.0, 0.0), ((20f64 / (1.0 + (-20f64).exp())) as f32) * 20.0);
    }
}
