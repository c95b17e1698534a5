//! Rotary position embedding (`kernels/rope.cu`).

use hal::ops::Rope;
use hal::Result;

use super::{check_range, grid_for, l, launch, Arg, BLOCK, E_POS_NEG};
use crate::device::Dev;

/// [`Rope`]: negative positions are reported on the device ("rope row r"), then the rotation.
pub(crate) fn rope(dev: &Dev, op: &Rope, ins: &[u64], outs: &[u64]) -> Result<()> {
    check_range(dev, "rope", "rope", ins[1], op.rows, 1i64 << 31, E_POS_NEG)?;
    let n = op.rows * op.heads * (op.rope_dim / 2);
    if n == 0 || op.head_dim == 0 {
        return Ok(());
    }
    let args = [
        Arg::P(ins[0]),
        Arg::P(ins[1]),
        Arg::P(outs[0]),
        l(op.rows),
        l(op.heads),
        l(op.head_dim),
        l(op.rope_dim),
        Arg::I(op.inverse as i32),
        Arg::P(dev.err_ptr),
    ];
    launch(dev, "rope", "rope", (grid_for(n, BLOCK), 1, 1), BLOCK, 0, &args)
}
