//! Row-wise agreement measures and the tolerance tiers of the golden MANIFEST (§8).
//!
//! Per-position relative L2 error over a row (logits over the vocabulary, block outputs over
//! the 4×dim streams), per-row cosine, argmax agreement, and decision agreement (identical
//! sets, mean overlap). NaN anywhere makes a measure fail: `rel` is +∞ and `cos` −∞ then.

use std::path::PathBuf;

/// Folder of the golden data copied into this repository (see data/golden/PROVENANCE.md).
pub fn golden_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/data/golden"))
}

/// `‖a − b‖₂ / ‖b‖₂` for each row of `width` values.
pub fn row_rel(a: &[f32], b: &[f32], width: usize) -> Vec<f64> {
    assert_eq!(a.len(), b.len(), "compared tensors differ in size");
    a.chunks(width)
        .zip(b.chunks(width))
        .map(|(x, y)| {
            let (mut num, mut den) = (0f64, 0f64);
            for (&p, &q) in x.iter().zip(y) {
                num += (p as f64 - q as f64).powi(2);
                den += (q as f64).powi(2);
            }
            let r = num.sqrt() / den.sqrt().max(f64::MIN_POSITIVE);
            if r.is_nan() {
                f64::INFINITY
            } else {
                r
            }
        })
        .collect()
}

/// Cosine similarity of each row.
pub fn row_cos(a: &[f32], b: &[f32], width: usize) -> Vec<f64> {
    a.chunks(width)
        .zip(b.chunks(width))
        .map(|(x, y)| {
            let (mut d, mut nx, mut ny) = (0f64, 0f64, 0f64);
            for (&p, &q) in x.iter().zip(y) {
                d += p as f64 * q as f64;
                nx += (p as f64).powi(2);
                ny += (q as f64).powi(2);
            }
            let c = d / (nx.sqrt() * ny.sqrt()).max(f64::MIN_POSITIVE);
            if c.is_nan() {
                f64::NEG_INFINITY
            } else {
                c
            }
        })
        .collect()
}

/// Fraction of rows whose argmax agrees.
pub fn argmax_agreement(a: &[f32], b: &[f32], width: usize) -> f64 {
    let am = |r: &[f32]| r.iter().enumerate().fold(0, |best, (i, &v)| if v > r[best] { i } else { best });
    let rows: Vec<bool> = a.chunks(width).zip(b.chunks(width)).map(|(x, y)| am(x) == am(y)).collect();
    rows.iter().filter(|&&s| s).count() as f64 / rows.len() as f64
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

pub fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

pub fn frac_le(v: &[f64], bound: f64) -> f64 {
    v.iter().filter(|&&x| x <= bound).count() as f64 / v.len() as f64
}

/// The valid (≥ 0) ids of each row of `k`, sorted.
fn sets(ids: &[i64], k: usize) -> Vec<Vec<i64>> {
    ids.chunks(k)
        .map(|r| {
            let mut s: Vec<i64> = r.iter().copied().filter(|&x| x >= 0).collect();
            s.sort_unstable();
            s
        })
        .collect()
}

/// Fraction of rows whose id sets are identical.
pub fn sets_equal(ours: &[i64], golden: &[i64], k: usize) -> f64 {
    let (a, b) = (sets(ours, k), sets(golden, k));
    a.iter().zip(&b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64
}

/// Fraction of rows whose sets are identical up to exact ties at the selection boundary: a row
/// counts if every entry we chose and the golden did not has exactly our lowest chosen score
/// (`scores` are ours, aligned with `ours`; −1 entries are padding). A top-k may pick any of
/// several equal-scoring entries; any other difference is a wrong selection.
pub fn sets_equal_up_to_ties(ours: &[i64], scores: &[f32], golden: &[i64], k: usize) -> f64 {
    let rows = ours.len() / k;
    let ok = (0..rows)
        .filter(|&r| {
            let (o, s, g) = (&ours[r * k..(r + 1) * k], &scores[r * k..(r + 1) * k], &golden[r * k..(r + 1) * k]);
            let valid = |v: &[i64]| v.iter().filter(|&&x| x >= 0).count();
            let boundary = o.iter().zip(s).filter(|(&j, _)| j >= 0).map(|(_, &v)| v).fold(f32::INFINITY, f32::min);
            valid(o) == valid(g) && o.iter().zip(s).all(|(&j, &v)| j < 0 || g.contains(&j) || v == boundary)
        })
        .count();
    ok as f64 / rows as f64
}

/// Mean of |A ∩ B| / |B| over rows (B = golden set; a row with empty B counts 1 if A is empty).
pub fn sets_overlap(ours: &[i64], golden: &[i64], k: usize) -> f64 {
    let (a, b) = (sets(ours, k), sets(golden, k));
    let per: Vec<f64> = a
        .iter()
        .zip(&b)
        .map(|(x, y)| {
            if y.is_empty() {
                return if x.is_empty() { 1.0 } else { 0.0 };
            }
            y.iter().filter(|v| x.contains(v)).count() as f64 / y.len() as f64
        })
        .collect();
    mean(&per)
}

/// A summary line for test logs.
pub fn describe(rel: &[f64]) -> String {
    let mut s = rel.to_vec();
    s.sort_by(f64::total_cmp);
    let q = |f: f64| s[((s.len() - 1) as f64 * f) as usize];
    format!(
        "rel median {:.2e} p90 {:.2e} p99 {:.2e} max {:.2e}, frac≤1e-3 {:.3}",
        q(0.5),
        q(0.9),
        q(0.99),
        q(1.0),
        frac_le(rel, 1e-3)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_are_forgiven_only_at_the_boundary() {
        // Golden chose {1, 5}; we chose {1, 2}. Entry 2 scores exactly our boundary: a tie.
        assert_eq!(sets_equal_up_to_ties(&[1, 2], &[3.0, 0.0], &[1, 5], 2), 1.0);
        // Entry 2 scores above our boundary (entry 1 is lower): the golden left out an entry
        // that must be in any correct top-2, so the row is a real mismatch.
        assert_eq!(sets_equal_up_to_ties(&[2, 1], &[4.0, 3.0], &[1, 5], 2), 0.0);
        // Different counts of valid entries never match.
        assert_eq!(sets_equal_up_to_ties(&[1, -1], &[3.0, f32::NEG_INFINITY], &[1, 5], 2), 0.0);
    }

    #[test]
    fn nan_never_passes() {
        let rel = row_rel(&[f32::NAN, 1.0], &[1.0, 1.0], 2);
        assert!(rel[0].is_infinite());
        assert!(row_cos(&[f32::NAN, 1.0], &[1.0, 1.0], 2)[0] < 0.0);
    }
}
