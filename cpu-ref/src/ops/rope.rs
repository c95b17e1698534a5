//! Rotary position embedding: interleaved pairs on the last `rope_dim` dims.

use hal::ops::Rope;
use hal::{Error, Result};

use crate::device::CpuStorage;

/// `(cos θ, sin θ)` with `θ = fl32(f32(pos) · freq)`, each computed in f64 and rounded to f32 —
/// one entry of the reference's complex64 table `polar(1, outer(t, ω))`.
pub fn cos_sin(pos: f32, freq: f32) -> (f32, f32) {
    let theta = (pos * freq) as f64;
    (theta.cos() as f32, theta.sin() as f32)
}

/// The rotation table of one position: `(cos, sin)` per frequency.
pub fn rope_table(pos: f32, freqs: &[f32]) -> Vec<(f32, f32)> {
    freqs.iter().map(|&f| cos_sin(pos, f)).collect()
}

/// Rotates interleaved pairs `(x[2i], x[2i+1])` of `x` (the rope slice, `2·table.len()` long)
/// by `table[i]`: forward `(a·c − b·s, a·s + b·c)` (a complex64 product, each term rounded in
/// f32), inverse the conjugate `(a·c + b·s, b·c − a·s)`.
pub fn rotate(x: &mut [f32], table: &[(f32, f32)], inverse: bool) {
    for (pair, &(c, s)) in x.chunks_exact_mut(2).zip(table) {
        let (a, b) = (pair[0], pair[1]);
        if inverse {
            pair[0] = a * c + b * s;
            pair[1] = b * c - a * s;
        } else {
            pair[0] = a * c - b * s;
            pair[1] = a * s + b * c;
        }
    }
}

/// Op entry: [`Rope`] on every row and head at the row's position.
pub fn run_rope(op: &Rope, ins: &[&CpuStorage], outs: &mut [&mut CpuStorage]) -> Result<()> {
    let (freqs, positions) = (ins[0].f32s(), ins[1].i32s());
    let x = outs[0].f32s_mut();
    let (hd, rd) = (op.head_dim, op.rope_dim);
    if let Some(r) = positions.iter().position(|&p| p < 0) {
        return Err(Error::invalid(format!("rope row {r}"), format!("position {} is negative", positions[r])));
    }
    if op.heads == 0 || hd == 0 {
        return Ok(());
    }
    for (xr, &p) in x.chunks_exact_mut(op.heads * hd).zip(positions) {
        let table = rope_table(p as f32, freqs);
        for head in xr.chunks_exact_mut(hd) {
            rotate(&mut head[hd - rd..], &table, op.inverse);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_undoes_forward() {
        let freqs: Vec<f32> = (0..8).map(|i| 10000f32.powf(-(2 * i) as f32 / 16.0)).collect();
        let x: Vec<f32> = (0..16).map(|i| (i as f32 * 0.37).cos()).collect();
        let table = rope_table(1234.0, &freqs);
        let mut y = x.clone();
        rotate(&mut y, &table, false);
        assert!(y.iter().zip(&x).any(|(a, b)| (a - b).abs() > 1e-3));
        rotate(&mut y, &table, true);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn pairs_are_interleaved() {
        let mut x = [1.0f32, 0.0, 1.0, 0.0];
        rotate(&mut x, &[(0.0, 1.0), (1.0, 0.0)], false);
        assert_eq!(x, [0.0, 1.0, 1.0, 0.0]);
    }
}
