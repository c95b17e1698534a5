//! RMSNorm (`kernels/norm.cu`).

use hal::ops::RmsNorm;
use hal::Result;

use super::{l, launch, Arg, BLOCK};
use crate::device::Dev;

/// [`RmsNorm`]: one block per row; the unweighted form passes a null weight.
pub(crate) fn rms_norm(dev: &Dev, op: &RmsNorm, ins: &[u64], outs: &[u64]) -> Result<()> {
    if op.dim == 0 || op.rows == 0 {
        return Ok(());
    }
    let w = if op.weighted { ins[1] } else { 0 };
    let args = [Arg::P(ins[0]), Arg::P(w), Arg::P(outs[0]), l(op.dim), Arg::F(op.eps)];
    // One block per row: a few rows (decode) get 1024 threads each, so that the row is read in
    // one round of loads.
    let threads = if op.rows < dev.sms { 1024 } else { BLOCK };
    launch(dev, "norm", "rms_norm", (op.rows as u32, 1, 1), threads, 0, &args)
}
