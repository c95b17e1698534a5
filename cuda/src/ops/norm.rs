//! RMSNorm (`kernels/norm.cu`).

use hal::ops::RmsNorm;
use hal::Result;

use super::{check_range, l, launch, Arg, BLOCK, E_POS_NEG};
use crate::device::Dev;

/// [`RmsNorm`]: one block per row; the unweighted form passes a null weight. With RoPE one
/// kernel norms, rotates and (FP8) simulates each row (`rms_norm_rope`).
pub(crate) fn rms_norm(dev: &Dev, op: &RmsNorm, ins: &[u64], outs: &[u64]) -> Result<()> {
    if op.dim == 0 || op.rows == 0 {
        return Ok(());
    }
    let w = if op.weighted { ins[1] } else { 0 };
    if let Some(r) = op.rope {
        let at = op.rope_inputs_at();
        let (freqs, positions) = (ins[at], ins[at + 1]);
        check_range(dev, "norm", "rms_norm", positions, op.rows / r.heads, 1i64 << 31, E_POS_NEG)?;
        let args = [
            Arg::P(ins[0]),
            Arg::P(w),
            Arg::P(outs[0]),
            l(op.dim),
            Arg::F(op.eps),
            Arg::P(freqs),
            Arg::P(positions),
            l(r.heads),
            l(r.rope_dim),
            Arg::I(r.fp8_nope as i32),
            Arg::P(dev.err_ptr),
        ];
        // A thread per pair, whole warps (the FP8 blocks are warp maxima).
        let threads = (op.dim / 2).next_multiple_of(32).clamp(32, 1024) as u32;
        return launch(dev, "norm", "rms_norm_rope", (op.rows as u32, 1, 1), threads, 0, &args);
    }
    let args = [Arg::P(ins[0]), Arg::P(w), Arg::P(outs[0]), l(op.dim), Arg::F(op.eps)];
    // One block per row: a few rows (decode) get 1024 threads each, so that the row is read in
    // one round of loads.
    let threads = if op.rows < dev.sms { 1024 } else { BLOCK };
    launch(dev, "norm", "rms_norm", (op.rows as u32, 1, 1), threads, 0, &args)
}
