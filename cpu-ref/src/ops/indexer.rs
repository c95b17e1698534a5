//! The lightning indexer's scores and top-k selection.

use hal::ops::IndexerTopK;
use hal::{Error, Result};
use rayon::prelude::*;

use super::{dot, place_rows, PAR_MACS};
use crate::device::CpuStorage;

/// `I_j = Σ_h (w[h]·weight_scale) · max(0, q_h · k_j)` for each key (`q [heads, dim]`, keys
/// `dim` wide). Each head dot is rounded to f32, the head sum is taken in f64 and rounded once.
pub fn index_scores(q: &[f32], w: &[f32], weight_scale: f32, keys: &[f32], dim: usize) -> Vec<f32> {
    if dim == 0 {
        return Vec::new();
    }
    keys.chunks_exact(dim)
        .map(|k| {
            let terms = w
                .iter()
                .enumerate()
                .map(|(h, &wh)| (wh * weight_scale) as f64 * dot(&q[h * dim..(h + 1) * dim], k).max(0.0) as f64);
            terms.sum::<f64>() as f32
        })
        .collect()
}

/// The indices of the `min(k, scores.len())` largest scores, by descending score (ties: lower
/// index first; NaN ranks above everything, so it cannot hide), padded with −1 to length `k`.
pub fn top_k(scores: &[f32], k: usize, out: &mut [i32]) {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    let order = |a: &usize, b: &usize| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b));
    let n = k.min(idx.len());
    if n > 0 && n < idx.len() {
        idx.select_nth_unstable_by(n - 1, order);
    }
    idx.truncate(n);
    idx.sort_unstable_by(order);
    for (o, v) in out.iter_mut().zip(idx.into_iter().map(|j| j as i32).chain(std::iter::repeat(-1))) {
        *o = v;
    }
}

/// Op entry: [`IndexerTopK`].
pub fn run_indexer_topk(op: &IndexerTopK, ins: &[&CpuStorage], outs: &mut [&mut CpuStorage]) -> Result<()> {
    let name = "indexer_topk";
    let (h, d, cap, k) = (op.heads, op.head_dim, op.capacity, op.topk);
    let (q, w, keys) = (ins[0].f32s(), ins[1].f32s(), ins[2].cache_values(op.cache_dtype));
    let places = place_rows(name, ins[3].i32s(), ins[4].i32s(), op.slots)?;
    for (r, p) in places.iter().enumerate() {
        let n = (p.pos + 1) / op.ratio;
        if n > cap {
            return Err(Error::invalid(
                format!("{name} row {r}"),
                format!("position {} sees {n} entries, capacity is {cap}", p.pos),
            ));
        }
    }
    if k == 0 {
        return Ok(());
    }
    let each = |r: usize| -> (Vec<i32>, Vec<f32>) {
        let p = places[r];
        let n = (p.pos + 1) / op.ratio;
        let ks = &keys[p.slot * cap * d..(p.slot * cap + n) * d];
        let scores = index_scores(&q[r * h * d..(r + 1) * h * d], &w[r * h..(r + 1) * h], op.weight_scale, ks, d);
        let mut idx = vec![0; k];
        top_k(&scores, k, &mut idx);
        let picked = idx.iter().map(|&j| if j < 0 { f32::NEG_INFINITY } else { scores[j as usize] }).collect();
        (idx, picked)
    };
    let work: usize = places.iter().map(|p| (p.pos + 1) / op.ratio).sum::<usize>() * h * d;
    let rows: Vec<(Vec<i32>, Vec<f32>)> = if work < PAR_MACS {
        (0..places.len()).map(each).collect()
    } else {
        (0..places.len()).into_par_iter().map(each).collect()
    };
    let [indices, scores] = outs else { return Err(super::arity(name)) };
    for ((ri, rs), (i, s)) in
        indices.i32s_mut().chunks_exact_mut(k).zip(scores.f32s_mut().chunks_exact_mut(k)).zip(rows)
    {
        ri.copy_from_slice(&i);
        rs.copy_from_slice(&s);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_ties_and_pads() {
        let mut out = [0; 5];
        top_k(&[1.0, 3.0, 3.0, 2.0], 5, &mut out);
        assert_eq!(out, [1, 2, 3, 0, -1]);
        let mut out = [0; 2];
        top_k(&[1.0, 3.0, 3.0, 2.0, 3.0], 2, &mut out);
        assert_eq!(out, [1, 2]);
        top_k(&[], 2, &mut out);
        assert_eq!(out, [-1, -1]);
    }

    #[test]
    fn relu_per_head_then_weighted_sum() {
        // Two heads, dim 1, one key k = 1: head dots 2 and −3 → ReLU → 2·w0 only.
        let s = index_scores(&[2.0, -3.0], &[0.5, 10.0], 2.0, &[1.0], 1);
        assert_eq!(s, vec![2.0]);
    }
}
