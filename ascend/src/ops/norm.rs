//! RMSNorm: `aclnnRmsNorm(x, gamma, eps, y, rstd)` with `x [R, d]`, `gamma [d]` and an fp32
//! `rstd [R, 1]` temporary. The weightless form (per-head query rescale) uses a cached
//! all-ones `gamma`, uploaded once per width.

use hal::ops::RmsNorm;
use hal::{DType, Result};

use super::{need, Buf, Ctx, View};
use crate::sys::AclnnOps;
use hal::backend::Support;

/// The all-ones weight of width `dim`, uploaded on first use and kept by the backend.
pub(crate) fn ones(cx: &mut Ctx<'_>, dim: usize) -> Result<Buf> {
    if let Some(b) = cx.st.ones.get(&dim) {
        return Ok(Buf::of(b));
    }
    let buf = cx.be.pool.alloc(dim * 4)?;
    let bytes: Vec<u8> = (0..dim).flat_map(|_| 1.0f32.to_le_bytes()).collect();
    cx.be.h2d_locked(cx.st, buf.ptr(), buf.capacity(), &bytes)?;
    let b = Buf::of(&buf);
    cx.st.ones.insert(dim, buf);
    Ok(b)
}

/// Op entry: [`RmsNorm`], then its RoPE and FP8 simulation (the `Rope` and `QuantSim`
/// compositions on the output).
pub fn run_rms_norm(cx: &mut Ctx<'_>, op: &RmsNorm, ins: &[Buf], outs: &[Buf]) -> Result<()> {
    if op.rows == 0 || op.dim == 0 {
        return Ok(());
    }
    let gamma = if op.weighted { ins[1] } else { ones(cx, op.dim)? };
    rms_norm_rows(cx, ins[0], gamma, outs[0], op.rows, op.dim, op.eps)?;
    if let Some(rope) = op.rope_op() {
        let at = op.rope_inputs_at();
        super::rope::run_rope(cx, &rope, &ins[at..at + 2], outs)?;
    }
    match op.quant_op() {
        Some(q) => super::quant::run_quant_sim(cx, &q, outs),
        None => Ok(()),
    }
}

/// What [`run_rms_norm`] needs: `aclnnRmsNorm`, and those of the RoPE and FP8 simulation.
pub fn supports_rms_norm(op: &RmsNorm, ops: &AclnnOps) -> Support {
    let parts = [
        need(&[("RmsNorm", ops.RmsNorm.is_some())]),
        if op.rope.is_some() { super::rope::supports_rope(ops) } else { Support::Yes },
        if op.quant_op().is_some() { super::quant::supports_quant_sim(ops) } else { Support::Yes },
    ];
    parts.into_iter().find(|s| *s != Support::Yes).unwrap_or(Support::Yes)
}

/// `y = gamma ⊙ (x · rstd)` for the `rows` rows of width `dim` of `x` (f32 buffers): one
/// `aclnnRmsNorm`. Also the last step of the mHC ops (`hc.rs`, `fused.rs`).
pub(crate) fn rms_norm_rows(
    cx: &mut Ctx<'_>,
    x: Buf,
    gamma: Buf,
    y: Buf,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<()> {
    let x = View::new(x, DType::F32, &[rows, dim]);
    let g = View::new(gamma, DType::F32, &[dim]);
    let y = View::new(y, DType::F32, &[rows, dim]);
    let rstd = cx.temp(&[rows, 1], DType::F32)?;
    let r = View::of_temp(&rstd, DType::F32, &[rows, 1]);
    let (xt, gt, yt, rt) = (cx.tensor(&x)?, cx.tensor(&g)?, cx.tensor(&y)?, cx.tensor(&r)?);
    let eps = eps as f64;
    let pair = cx.ops().RmsNorm;
    // SAFETY: descriptors outlive the launch; `ws`/`ex` are launch()'s out-pointers.
    cx.launch("RmsNorm", pair, |f, ws, ex| unsafe { f(xt.ptr(), gt.ptr(), eps, yt.ptr(), rt.ptr(), ws, ex) })
}
