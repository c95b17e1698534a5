//! Linear layers.
//!
//! * `F32` weights: `aclnnMm(x [R, in], Wᵀ, y [R, out], cubeMathType = ALLOW_FP32_DOWN_PRECISION)`
//!   where `Wᵀ` is the `[out, in]` weight viewed as `[in, out]` with strides `(1, in)` — a
//!   transposed view, which the matmul docs accept for `mat2`; no copy of the weight.
//! * `Bf16` weights: the cube computes bf16 × bf16 with fp32 accumulation, so `x` is cast to
//!   bf16, multiplied into a bf16 result, and cast back to f32 (`aclnnCast` → `aclnnMm` →
//!   `aclnnCast`). Against the reference (bf16 weights used in f32) this adds two bf16
//!   roundings, an NMSE around 1e-5, inside the 5e-4 matmul tolerance.
//! * `aclnnMatmul` (same arguments) stands in when `aclnnMm` is missing.
//! * FP8/FP4 formats: not yet; on 910B/910C they need offline conversion (no FP8/FP4 cube),
//!   on the 950 they map to `aclnnQuantMatmulV5`.

use hal::backend::Support;
use hal::ops::{Linear, WeightFormat};
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
        WeightFormat::Fp8Block128 | WeightFormat::Fp4Group32 if !profile.fp8_compute => Support::No(format!(
            "not yet implemented on ascend ({:?} weights: {} has no FP8/FP4 compute; convert offline to INT8 or BF16)",
            l.format, profile.soc_name
        )),
        WeightFormat::Fp8Block128 | WeightFormat::Fp4Group32 => Support::No(format!(
            "not yet implemented on ascend ({:?} weights on {}: planned via aclnnQuantMatmulV5)",
            l.format, profile.soc_name
        )),
    }
}

/// `out = a @ b` through `aclnnMm`, or `aclnnMatmul` when `Mm` is missing.
fn matmul(cx: &mut Ctx<'_>, a: &View, b: &View, out: &View, cube: i8) -> Result<()> {
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
    let x = View::new(ins[0], DType::F32, &[r, k]);
    let y = View::new(outs[0], DType::F32, &[r, n]);
    match op.format {
        WeightFormat::F32 => {
            let wt = View::new(ins[1], DType::F32, &[n, k]).strided(&[k, n], &[1, k], 0);
            matmul(cx, &x, &wt, &y, sys::CUBE_ALLOW_FP32_DOWN_PRECISION)
        }
        _ => {
            let wt = View::new(ins[1], DType::BF16, &[n, k]).strided(&[k, n], &[1, k], 0);
            let xb_buf = cx.temp(&[r, k], DType::BF16)?;
            let yb_buf = cx.temp(&[r, n], DType::BF16)?;
            let xb = View::of_temp(&xb_buf, DType::BF16, &[r, k]);
            let yb = View::of_temp(&yb_buf, DType::BF16, &[r, n]);
            cx.cast(&x, &xb)?;
            matmul(cx, &xb, &wt, &yb, sys::CUBE_KEEP_DTYPE)?;
            cx.cast(&yb, &y)
        }
    }
}
