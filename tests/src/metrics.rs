//! Comparison metrics for golden and parity tests.
//!
//! Every metric treats a NaN or infinity on either side as an infinite error, so a test that
//! checks "error ≤ tolerance" can never pass on non-finite output (`NaN ≤ tol` would be false
//! for the wrong reason, and `max` would silently skip it).

/// Elementwise error summary of `got` against `want`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Errors {
    /// `max |g − w|`.
    pub max_abs: f64,
    /// `max |g − w| / max(|w|, floor)`.
    pub max_rel: f64,
    /// `Σ (g − w)² / Σ w²` (normalized mean squared error).
    pub nmse: f64,
    /// Index of the element with the largest relative error.
    pub worst: usize,
}

/// Compares two equally long slices; `floor` bounds the denominator of the relative error
/// (use it to keep values near zero from dominating, e.g. a fraction of the tensor's peak).
/// A length mismatch or any non-finite value gives infinite errors.
pub fn compare(got: &[f32], want: &[f32], floor: f64) -> Errors {
    let inf = Errors { max_abs: f64::INFINITY, max_rel: f64::INFINITY, nmse: f64::INFINITY, worst: 0 };
    if got.len() != want.len() {
        return inf;
    }
    let (mut e, mut sq, mut ref_sq) = (Errors { max_abs: 0.0, max_rel: 0.0, nmse: 0.0, worst: 0 }, 0.0, 0.0);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if !g.is_finite() || !w.is_finite() {
            return Errors { worst: i, ..inf };
        }
        let (g, w) = (g as f64, w as f64);
        let d = (g - w).abs();
        let rel = d / w.abs().max(floor);
        e.max_abs = e.max_abs.max(d);
        if rel > e.max_rel {
            e.max_rel = rel;
            e.worst = i;
        }
        sq += d * d;
        ref_sq += w * w;
    }
    e.nmse = if ref_sq > 0.0 {
        sq / ref_sq
    } else if sq > 0.0 {
        f64::INFINITY
    } else {
        0.0
    };
    e
}

/// `max |w|` of a slice (NaN counts as infinite).
pub fn peak(want: &[f32]) -> f64 {
    want.iter().map(|&w| if w.is_nan() { f64::INFINITY } else { (w as f64).abs() }).fold(0.0, f64::max)
}

/// Relative error against the tensor's peak: `max |g − w| / max |w|` — the right measure for
/// sums whose individual outputs may cancel to near zero.
pub fn max_rel_to_peak(got: &[f32], want: &[f32]) -> f64 {
    let e = compare(got, want, 0.0).max_abs;
    if !e.is_finite() {
        f64::INFINITY
    } else if e == 0.0 {
        0.0
    } else {
        e / peak(want)
    }
}

/// Indices where the bit patterns differ (so `-0.0` vs `0.0` and NaN count as differences
/// unless identical); a length mismatch reports every index of the longer slice.
pub fn bit_mismatches(got: &[f32], want: &[f32]) -> Vec<usize> {
    if got.len() != want.len() {
        return (0..got.len().max(want.len())).collect();
    }
    (0..got.len()).filter(|&i| got[i].to_bits() != want[i].to_bits()).collect()
}

/// Distance in units in the last place between two finite f32 of the same sign (or zero):
/// how many representable values lie between them. Non-finite input gives `u32::MAX`.
pub fn ulp_distance(a: f32, b: f32) -> u32 {
    if !a.is_finite() || !b.is_finite() {
        return u32::MAX;
    }
    // Map the sign-magnitude bit patterns onto a monotonic integer line.
    let key = |x: f32| {
        let b = x.to_bits() as i64;
        if b & 0x8000_0000 != 0 {
            -(b & 0x7FFF_FFFF)
        } else {
            b
        }
    };
    (key(a) - key(b)).unsigned_abs().min(u32::MAX as u64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_fails() {
        let e = compare(&[1.0, f32::NAN], &[1.0, 2.0], 1e-30);
        assert!(e.max_rel.is_infinite() && e.worst == 1);
        assert!(max_rel_to_peak(&[f32::NAN], &[1.0]).is_infinite());
        assert_eq!(ulp_distance(f32::NAN, 1.0), u32::MAX);
    }

    #[test]
    fn ulps_cross_zero() {
        assert_eq!(ulp_distance(1.0, 1.0), 0);
        assert_eq!(ulp_distance(f32::from_bits(1), -f32::from_bits(1)), 2);
        assert_eq!(ulp_distance(1.0, f32::from_bits(1.0f32.to_bits() + 3)), 3);
        assert_eq!(bit_mismatches(&[0.0, 1.0], &[-0.0, 1.0]), vec![0]);
    }

    #[test]
    fn relative_error() {
        let e = compare(&[1.1, 0.0], &[1.0, 0.0], 1e-3);
        assert!((e.max_rel - 0.1).abs() < 1e-6 && e.worst == 0);
        assert!((e.nmse - 0.01).abs() < 1e-6);
    }
}
