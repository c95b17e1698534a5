//! The ops, one file per `hal::ops` family.
//!
//! Every file has two layers: plain `pub fn`s over slices that implement the math literally
//! (the executable spec, called directly by the golden tests), and the op entries that unpack
//! validated tensors and call them. This module holds what several families share: the f64
//! dot product, the matmul driver, and the slot/position row convention.

pub mod attention;
pub mod compressor;
pub mod embed;
pub mod hc;
pub mod indexer;
pub mod linear;
pub mod moe;
pub mod norm;
pub mod quant;
pub mod rope;
pub mod sample;

use hal::{Error, Op, Result};
use rayon::prelude::*;

use crate::device::CpuStorage;

/// Multiply-accumulates above which a call is split over rayon threads; below it the thread
/// hand-off costs more than it saves (decode-sized norms and tiny projections stay serial).
pub const PAR_MACS: usize = 1 << 16;

/// `Σ a[i]·b[i]` accumulated in f64, rounded once to f32.
///
/// Products of two f32 are exact in f64, so the only rounding that matters is the final one;
/// this is the accuracy floor the reference's float32 mode is measured against.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_f64(a, b) as f32
}

/// Lanes of the f64 accumulation: element `i` goes to lane `i % LANES`.
const LANES: usize = 16;

/// [`dot`] before the final rounding.
///
/// Sixteen f64 partial sums (element i into lane i mod 16), reduced in a fixed tree, then the
/// tail. The AVX2+FMA path (chosen at run time) and the portable path follow the same order,
/// and an FMA of an exact product equals a multiply then add, so both give the same bits on
/// every machine.
#[inline]
pub fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features the function is compiled for were just detected.
            return unsafe { dot_f64_avx2(a, b) };
        }
    }
    dot_f64_portable(a, b)
}

fn dot_f64_portable(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0f64; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f64 = ca.remainder().iter().zip(cb.remainder()).fold(0.0, |t, (x, y)| t + *x as f64 * *y as f64);
    for (x, y) in ca.zip(cb) {
        for k in 0..LANES {
            acc[k] += x[k] as f64 * y[k] as f64;
        }
    }
    let lane = |l: usize| (acc[l] + acc[4 + l]) + (acc[8 + l] + acc[12 + l]);
    ((lane(0) + lane(1)) + (lane(2) + lane(3))) + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f64_avx2(a: &[f32], b: &[f32]) -> f64 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let body = n - n % LANES;
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_pd(); 4];
    let mut i = 0;
    while i < body {
        for (j, acc_j) in acc.iter_mut().enumerate() {
            // SAFETY: i + 4j + 4 ≤ body ≤ n, so the 4-float loads stay inside both slices.
            let x = _mm256_cvtps_pd(_mm_loadu_ps(pa.add(i + 4 * j)));
            let y = _mm256_cvtps_pd(_mm_loadu_ps(pb.add(i + 4 * j)));
            *acc_j = _mm256_fmadd_pd(x, y, *acc_j);
        }
        i += LANES;
    }
    let v = _mm256_add_pd(_mm256_add_pd(acc[0], acc[1]), _mm256_add_pd(acc[2], acc[3]));
    let mut l = [0f64; 4];
    _mm256_storeu_pd(l.as_mut_ptr(), v);
    let tail: f64 = a[body..n].iter().zip(&b[body..n]).fold(0.0, |t, (x, y)| t + *x as f64 * *y as f64);
    ((l[0] + l[1]) + (l[2] + l[3])) + tail
}

/// `y[r, o] = dot(x[r, :], w[o, :])` with `x [rows, inp]`, `w [out, inp]`, `y [rows, out]`.
///
/// Parallel once the call is large: over output features for a single row (decode's matvec,
/// where the weight read dominates), over rows otherwise.
pub fn matmul(x: &[f32], w: &[f32], inp: usize, out: usize, y: &mut [f32]) {
    if out == 0 {
        return;
    }
    let rows = y.len() / out;
    let row_of = |r: usize| &x[r * inp..(r + 1) * inp];
    if rows * out * inp < PAR_MACS {
        for (r, yr) in y.chunks_exact_mut(out).enumerate() {
            for (o, v) in yr.iter_mut().enumerate() {
                *v = dot(row_of(r), &w[o * inp..(o + 1) * inp]);
            }
        }
    } else if rows == 1 {
        const CHUNK: usize = 64;
        y.par_chunks_mut(CHUNK).enumerate().for_each(|(c, yc)| {
            for (k, v) in yc.iter_mut().enumerate() {
                let o = c * CHUNK + k;
                *v = dot(row_of(0), &w[o * inp..(o + 1) * inp]);
            }
        });
    } else {
        y.par_chunks_mut(out).enumerate().for_each(|(r, yr)| {
            for (o, v) in yr.iter_mut().enumerate() {
                *v = dot(row_of(r), &w[o * inp..(o + 1) * inp]);
            }
        });
    }
}

pub use hal::ops::rows::{place_rows, RowPlace};

/// Runs a validated op on cpu-ref storages (`ins`/`outs` in signature order).
pub fn dispatch(op: &Op, ins: &[&CpuStorage], outs: &mut [&mut CpuStorage]) -> Result<()> {
    match op {
        Op::Embed(o) => embed::run_embed(o, ins, outs),
        Op::HcExpand(o) => embed::run_hc_expand(o, ins, outs),
        Op::Add(o) => embed::run_add(o, ins, outs),
        Op::GatherRows(o) => embed::run_gather_rows(o, ins, outs),
        Op::HcPre(o) => hc::run_hc_pre(o, ins, outs),
        Op::HcPost(o) => hc::run_hc_post(o, ins, outs),
        Op::HcHead(o) => hc::run_hc_head(o, ins, outs),
        Op::RmsNorm(o) => norm::run_rms_norm(o, ins, outs),
        Op::Linear(o) => linear::run_linear(o, ins, outs),
        Op::GroupedLinear(o) => linear::run_grouped_linear(o, ins, outs),
        Op::Rope(o) => rope::run_rope(o, ins, outs),
        Op::QuantSim(o) => quant::run_quant_sim(o, outs),
        Op::Hadamard(o) => quant::run_hadamard(o, outs),
        Op::WindowStore(o) => attention::run_window_store(o, ins, outs),
        Op::Compressor(o) => compressor::run_compressor(o, ins, outs),
        Op::IndexerTopK(o) => indexer::run_indexer_topk(o, ins, outs),
        Op::SparseAttention(o) => attention::run_sparse_attention(o, ins, outs),
        Op::MoeGate(o) => moe::run_moe_gate(o, ins, outs),
        Op::MoeExperts(o) => moe::run_moe_experts(o, ins, outs),
        Op::SwiGlu(o) => moe::run_swiglu(o, ins, outs),
        Op::SampleTokens(o) => sample::run_sample_tokens(o, ins, outs),
    }
}

/// The error for an output list whose length `Op::validate` should already have rejected.
pub(crate) fn arity(op: &str) -> Error {
    Error::invalid(op, "unexpected number of output tensors")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_paths_agree_bit_for_bit() {
        for n in [0usize, 1, 15, 16, 17, 100, 257, 1024] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1.37e-3).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 104_729 % 997) as f32 - 498.0) * 2.11e2).collect();
            assert_eq!(dot_f64(&a, &b).to_bits(), dot_f64_portable(&a, &b).to_bits(), "n = {n}");
        }
    }

    #[test]
    fn dot_rounds_once() {
        // 1 + 2^-30 - 1 is lost in f32 accumulation but not in f64.
        let a = [1.0f32, 2f32.powi(-30), -1.0];
        assert_eq!(dot(&a, &[1.0, 1.0, 1.0]), 2f32.powi(-30));
    }

    #[test]
    fn matmul_serial_and_parallel_agree() {
        let (inp, out) = (300, 260);
        let x: Vec<f32> = (0..2 * inp).map(|i| ((i * 7919) % 13) as f32 - 6.0).collect();
        let w: Vec<f32> = (0..out * inp).map(|i| ((i * 104729) % 17) as f32 * 0.25 - 2.0).collect();
        let mut y = vec![0.0; 2 * out];
        matmul(&x, &w, inp, out, &mut y);
        let mut y1 = vec![0.0; out];
        matmul(&x[inp..], &w, inp, out, &mut y1);
        assert_eq!(&y[out..], &y1[..]);
        for o in [0, 17, out - 1] {
            assert_eq!(y[o], dot(&x[..inp], &w[o * inp..(o + 1) * inp]));
        }
    }

    #[test]
    fn row_convention_errors_name_the_row() {
        assert!(place_rows("t", &[0, 0, 1], &[3, 4, 0], 2).is_ok());
        let e = place_rows("t", &[0, 1, 0], &[3, 0, 4], 2).unwrap_err().to_string();
        assert!(e.contains("t row 2") && e.contains("contiguous"), "{e}");
        let e = place_rows("t", &[0, 0], &[3, 5], 1).unwrap_err().to_string();
        assert!(e.contains("row 1"), "{e}");
        assert!(place_rows("t", &[2], &[0], 2).is_err());
        assert!(place_rows("t", &[0], &[-1], 2).is_err());
    }
}
