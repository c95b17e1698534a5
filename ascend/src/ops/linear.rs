//! Linear layers.
//!
//! * `F32` weights: `aclnnMm(x [R, in], Wᵀ, y [R, out], cubeMathType = KEEP_DTYPE)` where `Wᵀ`
//!   is the `[out, in]` weight viewed as `[in, out]` with strides `(1, in)` — a transposed
//!   view, which the matmul docs accept for `mat2`; no copy of the weight. KEEP_DTYPE, not the
//!   documented-default ALLOW_FP32_DOWN_PRECISION: HF32 (≈ 1e-7 NMSE) fails the suite's 1e-9
//!   bound for f32 linears.
//! * `Bf16` weights: the HAL defines them as bf16 values *used in f32* (x is not rounded), so
//!   the weight is widened with `aclnnCast(W → f32)` into a temporary and multiplied as above.
//!   A bf16×bf16 cube product (casting x down) would be ~2× faster but gives NMSE ≈ 6e-6,
//!   far outside the 1e-9 bound. The per-call widening costs one weight-sized temporary.
//! * `aclnnMatmul` (same arguments) stands in when `aclnnMm` is missing.
//! * FP8/FP4 formats: `super::lowp` (the weight's load-time BF16 copy widened, or without
//!   `prepare` a per-call dequantization per SoC profile; act_quant on the host).
//! * [`GroupedLinear`] (block-diagonal `wo_a`): one `aclnnBatchMatMul` over the groups, with
//!   `x` viewed as `[G, R, in_g]` (strides `(in_g, G·in_g, 1)`) and `W` as `[G, in_g, out_g]`
//!   (strides `(out_g·in_g, 1, in_g)`), into a `[G, R, out_g]` temporary that
//!   `aclnnInplaceCopy` scatters into `y` viewed as `[G, R, out_g]` (strides
//!   `(out_g, G·out_g, 1)`). Bf16 weights are widened first, as above; FP8/FP4 ones (the
//!   checkpoint's `wo_a`) come from `lowp`'s f32 weight, with no act_quant.

use hal::backend::Support;
use hal::ops::{GroupedLinear, Linear, WeightFormat};
use hal::{DType, Result};

use super::{Buf, Ctx, View};
use crate::sys::{self, AclnnOps};
use crate::SocProfile;

/// Linear support: F32/BF16 weights with a matmul (and Cast for BF16).
pub fn supports_linear(l: &Linear, ops: &AclnnOps, profile: &SocProfile) -> Support {
    match l.format {
        WeightFormat::F32 | WeightFormat::Bf16 => {
            if ops.Mm.is_none() && ops.Matmul.is_none() {
                return Support::No("neither aclnnMm nor aclnnMatmul is exported by the loaded CANN op library".into());
            }
            if l.format == WeightFormat::Bf16 && ops.Cast.is_none() {
                return Support::No("aclnnCast is not exported by the loaded CANN op library".into());
            }
            Support::Yes
        }
        // Yes on every profile, through the dequantizing path of `lowp` (table decode on
        // 910B/910C, FP8 Cast on 950); act_quant is a host-side slow path.
        WeightFormat::Fp8Block128 | WeightFormat::Fp4Group32 => {
            let _ = profile;
            super::lowp::supports_lowp(ops)
        }
    }
}

/// `out = a @ b` through `aclnnMm`, or `aclnnMatmul` when `Mm` is missing.
pub(crate) fn matmul(cx: &mut Ctx<'_>, a: &View, b: &View, out: &View, cube: i8) -> Result<()> {
    let ops = cx.ops();
    let (at, bt, ot) = (cx.tensor(a)?, cx.tensor(b)?, cx.tensor(out)?);
    if ops.Mm.is_some() {
        // SAFETY: descriptors outlive the launch; `ws`/`ex` are launch()'s out-pointers.
        cx.launch("Mm", ops.Mm, |f, ws, ex| unsafe { f(at.ptr(), bt.ptr(), ot.ptr(), cube, ws, ex) })
    } else {
        // SAFETY: as above.
        cx.launch("Matmul", ops.Matmul, |f, ws, ex| unsafe { f(at.ptr(), bt.ptr(), ot.ptr(), cube, ws, ex) })
    }
}

/// Op entry: [`Linear`] (F32/BF16 weights; `supports` has excluded the others).
pub fn run_linear(cx: &mut Ctx<'_>, op: &Linear, ins: &[Buf], outs: &[Buf]) -> Result<()> {
    let (r, k, n) = (op.rows, op.in_features, op.out_features);
    if r == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        return cx.zero(outs[0]);
    }
    if op.format.quantizes_input() {
        let profile = cx.be.profile.clone();
        let copy = super::lowp::current(cx, 1);
        return super::lowp::linear_lowp(
            cx,
            &profile,
            op.format,
            copy.as_deref(),
            ins[0],
            ins[1],
            ins[2],
            outs[0],
            r,
            k,
            n,
        );
    }
    let x = View::new(ins[0], DType::F32, &[r, k]);
    let y = View::new(outs[0], DType::F32, &[r, n]);
    let w = weight_f32(cx, ins[1], op.format, n, k)?;
    let wt = w.view.strided(&[k, n], &[1, k], 0);
    matmul(cx, &x, &wt, &y, sys::CUBE_KEEP_DTYPE)
}

/// An f32 view of an `[n, k]` weight: the weight itself (F32) or a widened copy (Bf16).
struct WeightF32 {
    view: View,
    _temp: Option<crate::runtime::DeviceBuffer>,
}

fn weight_f32(cx: &mut Ctx<'_>, w: Buf, format: WeightFormat, n: usize, k: usize) -> Result<WeightF32> {
    if format == WeightFormat::F32 {
        return Ok(WeightF32 { view: View::new(w, DType::F32, &[n, k]), _temp: None });
    }
    let tb = cx.temp(&[n, k], DType::F32)?;
    let t = View::of_temp(&tb, DType::F32, &[n, k]);
    cx.cast(&View::new(w, DType::BF16, &[n, k]), &t)?;
    Ok(WeightF32 { view: t, _temp: Some(tb) })
}

/// GroupedLinear support: F32/BF16 weights, and FP8/FP4 through `lowp`'s f32 weight.
pub fn supports_grouped_linear(g: &GroupedLinear, ops: &AclnnOps) -> Support {
    if g.format.quantizes_input() {
        if let Support::No(why) = super::lowp::supports_lowp(ops) {
            return Support::No(why);
        }
    }
    super::need(&[
        ("BatchMatMul", ops.BatchMatMul.is_some()),
        ("InplaceCopy", ops.InplaceCopy.is_some()),
        ("Cast", g.format == WeightFormat::F32 || ops.Cast.is_some()),
    ])
}

/// Op entry: [`GroupedLinear`].
pub fn run_grouped_linear(cx: &mut Ctx<'_>, op: &GroupedLinear, ins: &[Buf], outs: &[Buf]) -> Result<()> {
    let (r, g, ki, no) = (op.rows, op.groups, op.in_per_group, op.out_per_group);
    if r == 0 || g == 0 || no == 0 {
        return Ok(());
    }
    if ki == 0 {
        return cx.zero(outs[0]);
    }
    let x = View::new(ins[0], DType::F32, &[r, g * ki]).strided(&[g, r, ki], &[ki, g * ki, 1], 0);
    // FP8/FP4: the exact f32 values (no act_quant: the reference's einsum over dequantized wo_a).
    let (_lowp_temp, wv) = if op.format.quantizes_input() {
        let profile = cx.be.profile.clone();
        let copy = super::lowp::current(cx, 1);
        super::lowp::weight_f32(cx, &profile, op.format, copy.as_deref(), 0, ins[1], ins[2], g * no, ki)?
    } else {
        let w = weight_f32(cx, ins[1], op.format, g * no, ki)?;
        (w._temp, w.view)
    };
    let wt = wv.strided(&[g, ki, no], &[no * ki, 1, ki], 0);
    let tb = cx.temp(&[g, r, no], DType::F32)?;
    let t = View::of_temp(&tb, DType::F32, &[g, r, no]);
    cx.batch_matmul(&x, &wt, &t)?;
    let y = View::new(outs[0], DType::F32, &[r, g * no]).strided(&[g, r, no], &[no, g * no, 1], 0);
    cx.copy(&y, &t)
}
