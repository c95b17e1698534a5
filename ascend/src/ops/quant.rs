//! Quantization simulation (`QuantSim`) and the Hadamard rotation.
//!
//! * `Hadamard`: `x ← x · (H_n / sqrt(n))` as one `aclnnMm(x [R, n], Hₙ, tmp, KEEP_DTYPE)` and
//!   `aclnnInplaceCopy(x ← tmp)`. `H_n` is symmetric, so no transpose; it is built on the host
//!   (±1/sqrt(n) in f32) and uploaded once per `n`, then cached by the backend. An O(n²)
//!   matmul instead of the O(n log n) butterfly: for the model's n = 128 that is a small cube
//!   op, and it needs no custom kernel.
//! * `QuantSim`: **known slow path, host-side.** The op is exact (bit-identical to the
//!   reference): per block, `s = 2^ceil(log2(amax/max))` then round-to-nearest-even onto the
//!   e4m3 / e2m1 grid. On a 910B there is no FP8/FP4 dtype to `aclnnCast` through, and an
//!   exact grid rounding from generic ops (Abs, ReduceMax per block, Log2, Ceil, Pow, Div,
//!   Round with a per-element exponent-dependent quantum) is a long chain whose rounding modes
//!   are not documented tightly enough to promise bit-exactness. So this phase copies `x` to
//!   the host (stream drained), simulates there with the HAL's codecs (`hal::dtype`), and
//!   copies it back. Planned: on the 950, `aclnnDynamicMxQuant` + `aclnnAntiMxQuant` (block 32)
//!   or `Cast` to FP8 after a per-block scale; on 910B an AscendC kernel.

use hal::backend::Support;
use hal::dtype::{e2m1_to_f32, e4m3_to_f32, exp2i, f32_to_e2m1, f32_to_e4m3, E2M1_MAX, E4M3_MAX};
use hal::ops::{Hadamard, QuantFormat, QuantSim};
use hal::{DType, Result};

use super::{need, Buf, Ctx, View};
use crate::sys::{self, AclnnOps};

/// Hadamard: a matmul and a copy.
pub fn supports_hadamard(ops: &AclnnOps) -> Support {
    need(&[("Mm", ops.Mm.is_some() || ops.Matmul.is_some()), ("InplaceCopy", ops.InplaceCopy.is_some())])
}

/// The device matrix `H_n / sqrt(n)`, built and uploaded on first use.
fn hadamard_matrix(cx: &mut Ctx<'_>, n: usize) -> Result<Buf> {
    if let Some(b) = cx.st.hadamard.get(&n) {
        return Ok(Buf::of(b));
    }
    let scale = 1.0 / (n as f64).sqrt();
    // Sylvester order: H[i][j] = (−1)^popcount(i & j).
    let bytes: Vec<u8> = (0..n * n)
        .flat_map(|k| {
            let (i, j) = (k / n, k % n);
            let v = if (i & j).count_ones() % 2 == 0 { scale } else { -scale };
            (v as f32).to_le_bytes()
        })
        .collect();
    let buf = cx.be.pool.alloc(bytes.len())?;
    cx.be.h2d_locked(cx.st, buf.ptr(), buf.capacity(), &bytes)?;
    let b = Buf::of(&buf);
    cx.st.hadamard.insert(n, buf);
    Ok(b)
}

/// Op entry: [`Hadamard`].
pub fn run_hadamard(cx: &mut Ctx<'_>, op: &Hadamard, outs: &[Buf]) -> Result<()> {
    let (r, n) = (op.rows, op.dim);
    if r == 0 || n == 0 {
        return Ok(());
    }
    let h = View::new(hadamard_matrix(cx, n)?, DType::F32, &[n, n]);
    let x = View::new(outs[0], DType::F32, &[r, n]);
    let tb = cx.temp(&[r, n], DType::F32)?;
    let t = View::of_temp(&tb, DType::F32, &[r, n]);
    super::linear::matmul(cx, &x, &h, &t, sys::CUBE_KEEP_DTYPE)?;
    cx.copy(&x, &t)
}

/// QuantSim: always possible (host path), but say it is slow.
pub fn supports_quant_sim() -> Support {
    Support::Yes
}

/// `2^ceil(log2(v))` exponent of a positive normal f32, from its bits (no libm rounding).
fn log2_ceil(v: f32) -> i32 {
    let bits = v.to_bits();
    ((bits >> 23) & 0xFF) as i32 - 127 + i32::from(bits & 0x7F_FFFF != 0)
}

/// One block, in place, per the HAL definition of [`QuantFormat`].
pub(crate) fn sim_block(b: &mut [f32], format: QuantFormat) {
    let (floor, max) = match format {
        QuantFormat::Fp8E4M3 => (1e-4f32, E4M3_MAX),
        QuantFormat::Fp4E2M1 => (E2M1_MAX * f32::MIN_POSITIVE, E2M1_MAX),
    };
    let amax = b.iter().fold(floor, |m, v| m.max(v.abs()));
    let s = exp2i(log2_ceil(amax * (1.0 / max)));
    for v in b.iter_mut() {
        let q = (*v / s).clamp(-max, max);
        *v = match format {
            QuantFormat::Fp8E4M3 => e4m3_to_f32(f32_to_e4m3(q)),
            QuantFormat::Fp4E2M1 => e2m1_to_f32(f32_to_e2m1(q)),
        } * s;
    }
}

/// Op entry: [`QuantSim`] — host-side slow path (see the module docs).
pub fn run_quant_sim(cx: &mut Ctx<'_>, op: &QuantSim, outs: &[Buf]) -> Result<()> {
    let (r, dim, qd, block) = (op.rows, op.dim, op.quant_dims, op.block);
    if r == 0 || dim == 0 || qd == 0 {
        return Ok(());
    }
    let x = outs[0];
    let bytes = cx.be.d2h_locked(cx.st, x.ptr, r * dim * 4)?;
    let mut v: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    for row in v.chunks_exact_mut(dim) {
        row[..qd].chunks_mut(block).for_each(|b| sim_block(b, op.format));
    }
    let out: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
    cx.be.h2d_locked(cx.st, x.ptr, x.len, &out)
}
