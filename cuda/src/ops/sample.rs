//! Token sampling (`kernels/sample.cu`).

use hal::ops::SampleTokens;
use hal::Result;

use super::{i, l, launch, Arg};
use crate::device::Dev;

const FAMILY: &str = "sample";

/// Threads of a `sample_partial` block.
const PART_BLOCK: u32 = 256;
/// Vocabulary columns per `sample_partial` block: 8 per thread, so that a 129K vocabulary keeps
/// 64 SMs busy with the f64 logarithms of a sampling row.
const PART_COLS: usize = 8 * PART_BLOCK as usize;

/// [`SampleTokens`]: each block the best of its part of a row, then a warp per row.
pub(crate) fn sample_tokens(dev: &Dev, op: &SampleTokens, ins: &[u64], outs: &[u64]) -> Result<()> {
    let name = "sample_tokens";
    if op.rows == 0 {
        return Ok(());
    }
    i(name, "vocab", op.vocab)?;
    let parts = op.vocab.div_ceil(PART_COLS).max(1);
    let scratch = dev.scratch(op.rows * parts * 12)?;
    let (keys, idx) = (scratch.ptr(), scratch.ptr() + (op.rows * parts * 8) as u64);
    let t = Arg::F(op.temperature);
    let args =
        [Arg::P(ins[0]), l(op.vocab), t, Arg::P(outs[1]), l(PART_COLS), Arg::P(keys), Arg::P(idx), Arg::P(dev.err_ptr)];
    launch(dev, FAMILY, "sample_partial", (parts as u32, op.rows as u32, 1), PART_BLOCK, 0, &args)?;
    let args = [
        Arg::P(keys),
        Arg::P(idx),
        i(name, "parts", parts)?,
        l(op.vocab),
        t,
        Arg::P(outs[1]),
        Arg::P(outs[0]),
        Arg::P(dev.err_ptr),
    ];
    launch(dev, FAMILY, "sample_finish", (op.rows as u32, 1, 1), 32, 0, &args)
}
