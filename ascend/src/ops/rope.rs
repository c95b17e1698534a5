//! Rotary position embedding, composed from elementwise aclnn ops.
//!
//! The HAL rotates interleaved pairs `(2i, 2i+1)` of the last `rope_dim` dims of each head.
//! `aclnnRotaryPositionEmbedding` mode 1 ("interleave") would cover the forward case, but it
//! needs a contiguous `[B, S, N, D]` input and pair-duplicated cos/sin tables, and its exact
//! interleave convention is only documented, not verified; so this is built from primitives
//! whose semantics are unambiguous, on strided views (no copies of `x`):
//!
//! 1. `p = Cast(positions → f32)` as `[R, 1]`; `θ = Mul(p, freqs [1, half])` — exactly the
//!    reference's `fl32(f32(pos) · freq)`.
//! 2. `c = Cos(θ)`, `s = Sin(θ)`, viewed `[R, 1, half]` (broadcast over heads).
//! 3. `a`, `b` = views of `x` with shape `[R, H, half]`, strides `(H·hd, hd, 2)`, offsets
//!    `hd − rope_dim` and `hd − rope_dim + 1`.
//! 4. Forward: `a' = a·c − b·s`, `b' = b·c + a·s`; inverse: `a' = a·c + b·s`, `b' = b·c − a·s`
//!    (each product rounded to f32, as the reference's complex64 product).
//! 5. `InplaceCopy(a ← a')`, `InplaceCopy(b ← b')`.
//!
//! Positions are checked on the host first (a negative one is an error naming the row).

use hal::backend::Support;
use hal::ops::Rope;
use hal::{DType, Error, Result};

use super::{need, Buf, Ctx, View};
use crate::sys::AclnnOps;

/// Rope needs Cast, Mul, Cos, Sin, Add, Sub and InplaceCopy.
pub fn supports_rope(ops: &AclnnOps) -> Support {
    need(&[
        ("Cast", ops.Cast.is_some()),
        ("Mul", ops.Mul.is_some()),
        ("Cos", ops.Cos.is_some()),
        ("Sin", ops.Sin.is_some()),
        ("Add", ops.Add.is_some()),
        ("Sub", ops.Sub.is_some()),
        ("InplaceCopy", ops.InplaceCopy.is_some()),
    ])
}

fn unary(cx: &mut Ctx<'_>, name: &str, cos: bool, x: &View, out: &View) -> Result<()> {
    let (xt, ot) = (cx.tensor(x)?, cx.tensor(out)?);
    let pair = if cos { cx.ops().Cos } else { cx.ops().Sin };
    // SAFETY: descriptors outlive the launch; `ws`/`ex` are launch()'s out-pointers.
    cx.launch(name, pair, |f, ws, ex| unsafe { f(xt.ptr(), ot.ptr(), ws, ex) })
}

/// Op entry: [`Rope`].
pub fn run_rope(cx: &mut Ctx<'_>, op: &Rope, ins: &[Buf], outs: &[Buf]) -> Result<()> {
    let positions = cx.read_i32(ins[1], op.rows)?;
    if let Some(r) = positions.iter().position(|&p| p < 0) {
        return Err(Error::invalid(format!("rope row {r}"), format!("position {} is negative", positions[r])));
    }
    let (r, h, hd, rd) = (op.rows, op.heads, op.head_dim, op.rope_dim);
    let half = rd / 2;
    if r == 0 || h == 0 || half == 0 {
        return Ok(());
    }
    let f32t = DType::F32;
    let pos = View::new(ins[1], DType::I32, &[r, 1]);
    let freqs = View::new(ins[0], f32t, &[1, half]);
    let posf_buf = cx.temp(&[r, 1], f32t)?;
    let posf = View::of_temp(&posf_buf, f32t, &[r, 1]);
    cx.cast(&pos, &posf)?;
    let theta_buf = cx.temp(&[r, half], f32t)?;
    let theta = View::of_temp(&theta_buf, f32t, &[r, half]);
    cx.mul(&posf, &freqs, &theta)?;
    let (c_buf, s_buf) = (cx.temp(&[r, half], f32t)?, cx.temp(&[r, half], f32t)?);
    let (c, s) = (View::of_temp(&c_buf, f32t, &[r, half]), View::of_temp(&s_buf, f32t, &[r, half]));
    unary(cx, "Cos", true, &theta, &c)?;
    unary(cx, "Sin", false, &theta, &s)?;
    let (c, s) = (c.reshape(&[r, 1, half]), s.reshape(&[r, 1, half]));

    let x = View::new(outs[0], f32t, &[r, h, hd]);
    let n = hd - rd;
    let a = x.strided(&[r, h, half], &[h * hd, hd, 2], n);
    let b = x.strided(&[r, h, half], &[h * hd, hd, 2], n + 1);
    let shape = [r, h, half];
    let tmp: Vec<_> = (0..6).map(|_| cx.temp(&shape, f32t)).collect::<Result<_>>()?;
    let t: Vec<View> = tmp.iter().map(|bf| View::of_temp(bf, f32t, &shape)).collect();
    cx.mul(&a, &c, &t[0])?; // a·c
    cx.mul(&b, &s, &t[1])?; // b·s
    cx.mul(&b, &c, &t[2])?; // b·c
    cx.mul(&a, &s, &t[3])?; // a·s
    cx.add(&t[0], &t[1], &t[4], !op.inverse)?; // a' = a·c ∓ b·s
    cx.add(&t[2], &t[3], &t[5], op.inverse)?; // b' = b·c ± a·s
    cx.copy(&a, &t[4])?;
    cx.copy(&b, &t[5])
}
