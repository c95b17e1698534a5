//! The clamped SwiGLU, composed from primitives (the fused `aclnnSwiGlu` takes one
//! concatenated `[.., 2w]` input and has no clamp):
//! `gc = aclnnClamp(g, max = limit)`, `uc = aclnnClamp(u, −limit, limit)` (both skipped when
//! `limit = 0`), `s = aclnnSilu(gc)`, `h = aclnnMul(s, uc)`. MoE gate/experts are not
//! implemented on Ascend yet.

use std::ptr;

use hal::backend::Support;
use hal::ops::SwiGlu;
use hal::{DType, Result};

use super::{need, Buf, Ctx, View};
use crate::sys::AclnnOps;

/// SwiGlu needs Silu and Mul, plus Clamp when the clamp is on.
pub fn supports_swiglu(s: &SwiGlu, ops: &AclnnOps) -> Support {
    need(&[("Silu", ops.Silu.is_some()), ("Mul", ops.Mul.is_some()), ("Clamp", s.limit == 0.0 || ops.Clamp.is_some())])
}

/// `out = clamp(x, lo, hi)`; `None` leaves that side open.
fn clamp(cx: &mut Ctx<'_>, x: &View, lo: Option<f32>, hi: Option<f32>, out: &View) -> Result<()> {
    let (xt, ot) = (cx.tensor(x)?, cx.tensor(out)?);
    let lo = lo.map(|v| cx.scalar_f32(v)).transpose()?;
    let hi = hi.map(|v| cx.scalar_f32(v)).transpose()?;
    let (lp, hp) = (lo.as_ref().map_or(ptr::null(), |s| s.raw.cast_const()), hi.as_ref().map_or(ptr::null(), |s| s.raw.cast_const()));
    let pair = cx.ops().Clamp;
    // SAFETY: descriptors and scalars outlive the launch; NULL bounds are documented as open.
    cx.launch("Clamp", pair, |f, ws, ex| unsafe { f(xt.ptr(), lp, hp, ot.ptr(), ws, ex) })
}

/// Op entry: [`SwiGlu`].
pub fn run_swiglu(cx: &mut Ctx<'_>, op: &SwiGlu, ins: &[Buf], outs: &[Buf]) -> Result<()> {
    let n = op.rows * op.width;
    if n == 0 {
        return Ok(());
    }
    let shape = [op.rows, op.width];
    let g = View::new(ins[0], DType::F32, &shape);
    let u = View::new(ins[1], DType::F32, &shape);
    let h = View::new(outs[0], DType::F32, &shape);
    let (gc_buf, uc_buf);
    let (gc, uc) = if op.limit > 0.0 {
        gc_buf = cx.temp(&shape, DType::F32)?;
        uc_buf = cx.temp(&shape, DType::F32)?;
        let (gc, uc) = (View::of_temp(&gc_buf, DType::F32, &shape), View::of_temp(&uc_buf, DType::F32, &shape));
        clamp(cx, &g, None, Some(op.limit), &gc)?;
        clamp(cx, &u, Some(-op.limit), Some(op.limit), &uc)?;
        (gc, uc)
    } else {
        (g, u)
    };
    let s_buf = cx.temp(&shape, DType::F32)?;
    let s = View::of_temp(&s_buf, DType::F32, &shape);
    {
        let (gt, st) = (cx.tensor(&gc)?, cx.tensor(&s)?);
        let pair = cx.ops().Silu;
        // SAFETY: descriptors outlive the launch; `ws`/`ex` are launch()'s out-pointers.
        cx.launch("Silu", pair, |f, ws, ex| unsafe { f(gt.ptr(), st.ptr(), ws, ex) })?;
    }
    cx.mul(&s, &uc, &h)
}
