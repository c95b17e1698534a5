//! Manifold-constrained hyper-connections (`kernels/hc.cu`).

use hal::ops::{HcHead, HcPost, HcPre};
use hal::Result;

use super::{grid_for, i, l, launch, smem, Arg, BLOCK};
use crate::device::Dev;

const FAMILY: &str = "hc";
/// Threads per row block of hc_pre / hc_head: one warp per mixing logit (24 for mult 4).
const HC_BLOCK: u32 = 1024;

/// [`HcPre`]: one block per row (norm, mixing logits, Sinkhorn by one thread, stream merge).
pub(crate) fn hc_pre(dev: &Dev, op: &HcPre, ins: &[u64], outs: &[u64]) -> Result<()> {
    let (m, d) = (op.mult, op.dim);
    if m == 0 || d == 0 || op.rows == 0 {
        return Ok(());
    }
    let shared = (op.mix_width() + m + m * m) * 4;
    let args = [
        Arg::P(ins[0]),
        Arg::P(ins[1]),
        Arg::P(ins[2]),
        Arg::P(ins[3]),
        i("hc_pre", "mult", m)?,
        l(d),
        i("hc_pre", "sinkhorn_iters", op.sinkhorn_iters)?,
        Arg::F(op.hc_eps),
        Arg::F(op.norm_eps),
        Arg::P(outs[0]),
        Arg::P(outs[1]),
        Arg::P(outs[2]),
    ];
    launch(dev, FAMILY, "hc_pre", (op.rows as u32, 1, 1), HC_BLOCK, smem(shared), &args)
}

/// [`HcPost`]: elementwise, f64 sum per output.
pub(crate) fn hc_post(dev: &Dev, op: &HcPost, ins: &[u64], outs: &[u64]) -> Result<()> {
    let n = op.rows * op.mult * op.dim;
    if n == 0 {
        return Ok(());
    }
    let args = [
        Arg::P(ins[0]),
        Arg::P(ins[1]),
        Arg::P(ins[2]),
        Arg::P(ins[3]),
        Arg::P(outs[0]),
        l(op.rows),
        i("hc_post", "mult", op.mult)?,
        l(op.dim),
    ];
    launch(dev, FAMILY, "hc_post", (grid_for(n, BLOCK), 1, 1), BLOCK, 0, &args)
}

/// [`HcHead`]: one block per row.
pub(crate) fn hc_head(dev: &Dev, op: &HcHead, ins: &[u64], outs: &[u64]) -> Result<()> {
    let (m, d) = (op.mult, op.dim);
    if m == 0 || d == 0 || op.rows == 0 {
        return Ok(());
    }
    let args = [
        Arg::P(ins[0]),
        Arg::P(ins[1]),
        Arg::P(ins[2]),
        Arg::P(ins[3]),
        i("hc_head", "mult", m)?,
        l(d),
        Arg::F(op.hc_eps),
        Arg::F(op.norm_eps),
        Arg::P(outs[0]),
    ];
    launch(dev, FAMILY, "hc_head", (op.rows as u32, 1, 1), HC_BLOCK, smem(2 * m * 4), &args)
}
