//! Sparse attention with per-head sinks over the window and compressed entries, and the
//! window ring store.

use hal::ops::attention::CompressedKv;
use hal::ops::{SparseAttention, WindowStore};
use std::borrow::Cow;

use hal::dtype::round_bf16;
use hal::{DType, Error, Result};
use rayon::prelude::*;

use super::{dot, place_rows, PAR_MACS};
use crate::device::CpuStorage;

/// One head of one query over its keys (K = V): `ℓ_j = (q·k_j)·scale`, `m = max ℓ`,
/// `out = Σ e^{ℓ_j−m} k_j / (Σ e^{ℓ_j−m} + e^{sink−m})`. The sink only enlarges the denominator
/// and is not scaled. No keys gives zeros (the sink alone has a zero value vector).
pub fn sparse_attn_row<'k>(
    q_head: &[f32],
    keys: impl Iterator<Item = &'k [f32]>,
    sink: f32,
    scale: f32,
    out: &mut [f32],
) {
    let keys: Vec<&[f32]> = keys.collect();
    let logits: Vec<f32> = keys.iter().map(|k| dot(q_head, k) * scale).collect();
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    if keys.is_empty() {
        out.fill(0.0);
        return;
    }
    let mut acc = vec![0f64; out.len()];
    let mut den = ((sink - m) as f64).exp();
    for (k, &l) in keys.iter().zip(&logits) {
        let p = ((l - m) as f64).exp();
        den += p;
        for (a, &v) in acc.iter_mut().zip(k.iter()) {
            *a += p * v as f64;
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = (a / den) as f32;
    }
}

/// Op entry: [`SparseAttention`]. Key sets are resolved (and every index checked) for all rows
/// before anything is computed.
pub fn run_sparse_attention(op: &SparseAttention, ins: &[&CpuStorage], outs: &mut [&mut CpuStorage]) -> Result<()> {
    let name = "sparse_attention";
    let (h, d, w) = (op.heads, op.head_dim, op.window);
    let (q, sink) = (ins[0].f32s(), ins[3].f32s());
    // Every key as the cache holds it: with a bf16 cache the fresh rows are rounded too.
    let kv: Cow<[f32]> = match op.cache_dtype {
        DType::BF16 => Cow::Owned(ins[1].f32s().iter().map(|&v| round_bf16(v)).collect()),
        _ => Cow::Borrowed(ins[1].f32s()),
    };
    let ring = ins[2].cache_values(op.cache_dtype);
    let places = place_rows(name, ins[4].i32s(), ins[5].i32s(), op.slots)?;
    let compressed = ins.get(6).map(|c| c.cache_values(op.cache_dtype)).unwrap_or(Cow::Borrowed(&[]));
    let indices = ins.get(7).map(|c| c.i32s()).unwrap_or(&[]);
    let mut key_sets: Vec<Vec<&[f32]>> = Vec::with_capacity(places.len());
    for (r, p) in places.iter().enumerate() {
        let row_err = |m: String| Error::invalid(format!("{name} row {r}"), m);
        let mut keys = Vec::new();
        for t in p.pos.saturating_sub(w - 1)..=p.pos {
            keys.push(if t >= p.run_pos {
                let row = p.run_row + (t - p.run_pos);
                &kv[row * d..(row + 1) * d]
            } else {
                let i = p.slot * w + t % w;
                &ring[i * d..(i + 1) * d]
            });
        }
        let entry = |j: usize, cap: usize| &compressed[(p.slot * cap + j) * d..(p.slot * cap + j + 1) * d];
        match op.compressed {
            CompressedKv::None => {}
            CompressedKv::All { ratio, capacity } => {
                let n = (p.pos + 1) / ratio;
                if n > capacity {
                    return Err(row_err(format!(
                        "position {} sees {n} compressed entries, capacity is {capacity}",
                        p.pos
                    )));
                }
                keys.extend((0..n).map(|j| entry(j, capacity)));
            }
            CompressedKv::Selected { capacity, topk, .. } => {
                for &j in &indices[r * topk..(r + 1) * topk] {
                    if j == -1 {
                        continue;
                    }
                    match usize::try_from(j).ok().filter(|&j| j < capacity) {
                        Some(j) => keys.push(entry(j, capacity)),
                        None => return Err(row_err(format!("compressed index {j} outside [0, {capacity}) (or −1)"))),
                    }
                }
            }
        }
        key_sets.push(keys);
    }
    let o = outs[0].f32s_mut();
    if h == 0 || d == 0 {
        return Ok(());
    }
    let scale = op.softmax_scale;
    // Chunk c of o (and of q) is row c / h, head c % h.
    let each = |(c, oc): (usize, &mut [f32])| {
        let keys = &key_sets[c / h];
        sparse_attn_row(&q[c * d..(c + 1) * d], keys.iter().copied(), sink[c % h], scale, oc);
    };
    let work: usize = key_sets.iter().map(Vec::len).sum::<usize>() * h * d;
    if work < PAR_MACS {
        o.chunks_exact_mut(d).enumerate().for_each(each);
    } else {
        o.par_chunks_exact_mut(d).enumerate().for_each(each);
    }
    Ok(())
}

/// Op entry: [`WindowStore`]: `ring[slot, pos mod window] = kv[r]` for every row in order, each
/// value stored in the ring's dtype.
pub fn run_window_store(op: &WindowStore, ins: &[&CpuStorage], outs: &mut [&mut CpuStorage]) -> Result<()> {
    let places = place_rows("window_store", ins[1].i32s(), ins[2].i32s(), op.slots)?;
    let (kv, d) = (ins[0].f32s(), op.dim);
    for (r, p) in places.iter().enumerate() {
        let i = p.slot * op.window + p.pos % op.window;
        outs[0].cache_store(op.cache_dtype, i * d, &kv[r * d..(r + 1) * d]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_only_in_denominator() {
        // One key equal to q: ℓ = 1, weight e^0 / (e^0 + e^{sink−1}).
        let k = [1.0f32, 0.0];
        let mut o = [0.0; 2];
        sparse_attn_row(&[1.0, 0.0], [&k[..]].into_iter(), 1.0, 1.0, &mut o);
        assert!((o[0] - 0.5).abs() < 1e-7 && o[1] == 0.0);
        sparse_attn_row(&[1.0, 0.0], std::iter::empty(), 1.0, 1.0, &mut o);
        assert_eq!(o, [0.0, 0.0]);
    }
}
