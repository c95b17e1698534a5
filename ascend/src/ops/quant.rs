//! Quantization simulation (`QuantSim`) and the Hadamard rotation.
//!
//! * `Hadamard`: `x ← x · (H_n / sqrt(n))` as one `aclnnMm(x [R, n], Hₙ, tmp, KEEP_DTYPE)` and
//!   `aclnnInplaceCopy(x ← tmp)`. `H_n` is symmetric, so no transpose; it is built on the host
//!   (±1/sqrt(n) in f32) and uploaded once per `n`, then cached by the backend. An O(n²)
//!   matmul instead of the O(n log n) butterfly: for the model's n = 128 that is a small cube
//!   op, and it needs no custom kernel.
//! * `QuantSim` (and the FP8/FP4 linears' `act_quant`, which is the same simulation with
//!   e4m3 blocks of 128): exact, bit-identical to the reference, entirely on the device from
//!   generic ops. Exponents are taken from the f32 bits, never from `log2`/`pow` (whose
//!   rounding is undocumented): an f32 buffer is also described as an `INT32` tensor of the
//!   same storage. Per block of `B` values (a `[R, nb, B]` view; a short last block gets its
//!   own view):
//!   1. `a = aclnnAmax(aclnnAbs(x), last dim, keepDim)`, `aclnnClamp(a, min = floor)`;
//!   2. `t = aclnnMuls(a, fl32(1/max))`; `s = 2^ceil(log2 t)` as bits
//!      `(bits(t) + 0x7FFFFF) & 0x7F800000` (`aclnnAdds` on INT32, `aclnnBitwiseAndScalar`):
//!      adding a mantissa-full of ones carries into the exponent exactly when `t` is not a
//!      power of two;
//!   3. `y = aclnnClamp(aclnnDiv(x, s), ±max)` (exact: `s` is a power of two);
//!   4. round `y` to nearest-even on the format's grid: `p = 2^floor(log2|y|)` as
//!      `bits(y) & 0x7F800000`, clamped below at the format's smallest normal (2^-6 for e4m3,
//!      1 for e2m1, so subnormals get the fixed quantum); `M = 1.5·2^(23−m)·p` (m = mantissa
//!      bits); `r = (y + M) − M` — the f32 addition rounds `y` to a multiple of `p·2^-m`,
//!      ties to even, because `y + M` stays in `M`'s binade whose ulp is exactly that quantum;
//!   5. `(y + M) − M` loses the sign of a zero result; the reference keeps it (e4m3 `−0`), so
//!      `bits(r) |= bits(y) & 0x80000000` (`aclnnBitwiseAndScalar`, `aclnnBitwiseOrTensor`);
//!   6. `x = aclnnMul(r, s)`.
//!
//!   This replaces an earlier host round trip (copy out, simulate, copy back).

use hal::backend::Support;
use hal::dtype::{exp2i, E2M1_MAX, E4M3_MAX};
use hal::ops::{Hadamard, QuantFormat, QuantSim};
use hal::{DType, Result};

use super::{need, Buf, Ctx, View};
use crate::runtime::DeviceBuffer;
use crate::sys::{self, AclnnOps};

const F: DType = DType::F32;

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

/// QuantSim (and act_quant): the ops of the module docs.
pub fn supports_quant_sim(ops: &AclnnOps) -> Support {
    need(&[
        ("Abs", ops.Abs.is_some()),
        ("Amax", ops.Amax.is_some()),
        ("Clamp", ops.Clamp.is_some()),
        ("Muls", ops.Muls.is_some()),
        ("Adds", ops.Adds.is_some()),
        ("BitwiseAndScalar", ops.BitwiseAndScalar.is_some()),
        ("BitwiseOrTensor", ops.BitwiseOrTensor.is_some()),
        ("Div", ops.Div.is_some()),
        ("Add", ops.Add.is_some()),
        ("Sub", ops.Sub.is_some()),
        ("Mul", ops.Mul.is_some()),
        ("InplaceCopy", ops.InplaceCopy.is_some()),
    ])
}

/// `(floor of amax, max, mantissa bits, smallest normal)` of a format (HAL [`QuantFormat`]).
fn format_consts(format: QuantFormat) -> (f32, f32, i32, f32) {
    match format {
        QuantFormat::Fp8E4M3 => (1e-4, E4M3_MAX, 3, exp2i(-6)),
        QuantFormat::Fp4E2M1 => (E2M1_MAX * f32::MIN_POSITIVE, E2M1_MAX, 1, 1.0),
    }
}

/// A scratch tensor of `shape` (`dtype`) and its contiguous view.
fn scratch(cx: &Ctx<'_>, shape: &[usize], dtype: DType) -> Result<(DeviceBuffer, View)> {
    let b = cx.temp(shape, dtype)?;
    let v = View::of_temp(&b, dtype, shape);
    Ok((b, v))
}

/// The same storage described as INT32 (f32 bits).
fn bits(v: &View) -> View {
    v.with_dtype(DType::I32)
}

/// `out = self & mask` on INT32 views.
fn and_scalar(cx: &mut Ctx<'_>, x: &View, mask: i32, out: &View) -> Result<()> {
    let (xt, ot) = (cx.tensor(x)?, cx.tensor(out)?);
    let m = cx.scalar_i32(mask)?;
    let pair = cx.ops().BitwiseAndScalar;
    // SAFETY: descriptors and the scalar outlive the launch; `ws`/`ex` are launch()'s out-pointers.
    cx.launch("BitwiseAndScalar", pair, |f, ws, ex| unsafe { f(xt.ptr(), m.raw, ot.ptr(), ws, ex) })
}

/// In place on `x` (an f32 view `[R, nb, B]`): the simulation of the module docs, step by step.
fn sim_blocks(cx: &mut Ctx<'_>, x: &View, shape: [usize; 3], format: QuantFormat) -> Result<()> {
    let (floor, max, mbits, min_normal) = format_consts(format);
    let scale_shape = [shape[0], shape[1], 1];
    // 1. block amax, floored
    let (_ab, a) = scratch(cx, &shape, F)?;
    {
        let (xt, at) = (cx.tensor(x)?, cx.tensor(&a)?);
        let pair = cx.ops().Abs;
        // SAFETY: descriptors outlive the launch; `ws`/`ex` are launch()'s out-pointers.
        cx.launch("Abs", pair, |f, ws, ex| unsafe { f(xt.ptr(), at.ptr(), ws, ex) })?;
    }
    let (_mb, amax) = scratch(cx, &scale_shape, F)?;
    {
        let (at, mt) = (cx.tensor(&a)?, cx.tensor(&amax)?);
        let dims = cx.int_array(&[-1])?;
        let pair = cx.ops().Amax;
        // SAFETY: descriptors and the int array outlive the launch; `ws`/`ex` are launch()'s out-pointers.
        cx.launch("Amax", pair, |f, ws, ex| unsafe { f(at.ptr(), dims.raw, true, mt.ptr(), ws, ex) })?;
    }
    let (_fb, floored) = scratch(cx, &scale_shape, F)?;
    clamp(cx, &amax, Some(floor), None, &floored)?;
    // 2. s = 2^ceil(log2(amax · fl32(1/max))) from the bits
    let (_tb, t) = scratch(cx, &scale_shape, F)?;
    cx.muls(&floored, 1.0 / max, &t)?;
    let (_ub, up) = scratch(cx, &scale_shape, DType::I32)?;
    {
        let (tt, ut) = (cx.tensor(&bits(&t))?, cx.tensor(&up)?);
        let (c, one) = (cx.scalar_i32(0x7F_FFFF)?, cx.scalar_i32(1)?);
        let pair = cx.ops().Adds;
        // SAFETY: descriptors and scalars outlive the launch; `ws`/`ex` are launch()'s out-pointers.
        cx.launch("Adds", pair, |f, ws, ex| unsafe { f(tt.ptr(), c.raw, one.raw, ut.ptr(), ws, ex) })?;
    }
    let (_sb, s) = scratch(cx, &scale_shape, F)?;
    and_scalar(cx, &up, 0x7F80_0000, &bits(&s))?;
    // 3. y = clamp(x / s, ±max)
    let (_qb, q) = scratch(cx, &shape, F)?;
    cx.div(x, &s, &q)?;
    let (_yb, y) = scratch(cx, &shape, F)?;
    clamp(cx, &q, Some(-max), Some(max), &y)?;
    // 4. r = (y + M) − M with M = 1.5·2^(23−m)·max(2^floor(log2|y|), smallest normal)
    let (_pb, p) = scratch(cx, &shape, F)?;
    and_scalar(cx, &bits(&y), 0x7F80_0000, &bits(&p))?;
    clamp(cx, &p, Some(min_normal), None, &q)?;
    let (_magic_buf, magic) = scratch(cx, &shape, F)?;
    cx.muls(&q, 1.5 * exp2i(23 - mbits), &magic)?;
    cx.add(&y, &magic, &a, false)?;
    let (_rb, r) = scratch(cx, &shape, F)?;
    cx.add(&a, &magic, &r, true)?;
    // 5. restore the sign of zero results
    and_scalar(cx, &bits(&y), i32::MIN, &bits(&p))?;
    {
        let (rt, pt, ot) = (cx.tensor(&bits(&r))?, cx.tensor(&bits(&p))?, cx.tensor(&bits(&q))?);
        let pair = cx.ops().BitwiseOrTensor;
        // SAFETY: descriptors outlive the launch; `ws`/`ex` are launch()'s out-pointers.
        cx.launch("BitwiseOrTensor", pair, |f, ws, ex| unsafe { f(rt.ptr(), pt.ptr(), ot.ptr(), ws, ex) })?;
    }
    // 6. back to the input's scale, in place
    cx.mul(&q, &s, &r)?;
    cx.copy(x, &r)
}

/// `out = clamp(x, lo, hi)` with f32 bounds (`None`: open).
fn clamp(cx: &mut Ctx<'_>, x: &View, lo: Option<f32>, hi: Option<f32>, out: &View) -> Result<()> {
    let (xt, ot) = (cx.tensor(x)?, cx.tensor(out)?);
    let lo = lo.map(|v| cx.scalar_f32(v)).transpose()?;
    let hi = hi.map(|v| cx.scalar_f32(v)).transpose()?;
    let raw = |s: &Option<super::ScalarDesc<'_>>| s.as_ref().map_or(std::ptr::null(), |s| s.raw.cast_const());
    let (l, h) = (raw(&lo), raw(&hi));
    let pair = cx.ops().Clamp;
    // SAFETY: descriptors and scalars outlive the launch; `ws`/`ex` are launch()'s out-pointers.
    cx.launch("Clamp", pair, |f, ws, ex| unsafe { f(xt.ptr(), l, h, ot.ptr(), ws, ex) })
}

/// In place: the HAL's [`QuantSim`] of the first `quant_dims` of each of `rows` rows of `x`
/// (f32, row length `dim`), in blocks of `block` (a shorter last block is its own block).
pub(crate) fn quant_sim_rows(
    cx: &mut Ctx<'_>,
    x: Buf,
    rows: usize,
    dim: usize,
    quant_dims: usize,
    block: usize,
    format: QuantFormat,
) -> Result<()> {
    if rows == 0 || quant_dims == 0 || block == 0 {
        return Ok(());
    }
    let xv = View::new(x, F, &[rows, dim]);
    let (full, tail) = (quant_dims / block, quant_dims % block);
    if full > 0 {
        sim_blocks(cx, &xv.strided(&[rows, full, block], &[dim, block, 1], 0), [rows, full, block], format)?;
    }
    if tail > 0 {
        sim_blocks(cx, &xv.strided(&[rows, 1, tail], &[dim, tail, 1], full * block), [rows, 1, tail], format)?;
    }
    Ok(())
}

/// Op entry: [`QuantSim`].
pub fn run_quant_sim(cx: &mut Ctx<'_>, op: &QuantSim, outs: &[Buf]) -> Result<()> {
    quant_sim_rows(cx, outs[0], op.rows, op.dim, op.quant_dims, op.block, op.format)
}
