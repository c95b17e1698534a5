//! Embedding lookup, stream expansion, the broadcast add and the row gather (`kernels/embed.cu`).

use hal::ops::{Add, Embed, GatherRows, HcExpand};
use hal::{DType, Error, Result};

use super::{check_range, grid_for, l, launch, Arg, BLOCK, E_GATHER, E_TOKEN};
use crate::device::Dev;

const FAMILY: &str = "embed";

/// [`Embed`]: ids checked on the device (an id outside `[0, vocab)` is reported at the next
/// synchronize/download as "embed row r"), then the gather with dtype conversion.
pub(crate) fn embed(dev: &Dev, op: &Embed, ins: &[u64], outs: &[u64]) -> Result<()> {
    let dtype = match op.table_dtype {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::F16 => 2,
        d => return Err(Error::invalid("embed", format!("table dtype {d} is not supported"))),
    };
    check_range(dev, FAMILY, "embed", ins[0], op.rows, op.vocab as i64, E_TOKEN)?;
    let n = op.rows * op.dim;
    let args = [
        Arg::P(ins[0]),
        Arg::P(ins[1]),
        Arg::I(dtype),
        l(op.vocab),
        l(op.dim),
        l(op.rows),
        Arg::P(outs[0]),
        Arg::P(dev.err_ptr),
    ];
    launch(dev, FAMILY, "embed_rows", (if n == 0 { 0 } else { grid_for(n, BLOCK) }, 1, 1), BLOCK, 0, &args)
}

/// [`HcExpand`].
pub(crate) fn hc_expand(dev: &Dev, op: &HcExpand, ins: &[u64], outs: &[u64]) -> Result<()> {
    let n = op.rows * op.mult * op.dim;
    if n == 0 {
        return Ok(());
    }
    let args = [Arg::P(ins[0]), Arg::P(outs[0]), l(op.rows), l(op.mult), l(op.dim)];
    launch(dev, FAMILY, "hc_expand", (grid_for(n, BLOCK), 1, 1), BLOCK, 0, &args)
}

/// [`Add`]. `b_rows` must divide `rows` (checked here, as cpu-ref does).
pub(crate) fn add(dev: &Dev, op: &Add, ins: &[u64], outs: &[u64]) -> Result<()> {
    let divides = op.rows == 0 || op.rows.checked_rem(op.b_rows) == Some(0);
    if !divides {
        return Err(Error::invalid("add", format!("b_rows {} does not divide rows {}", op.b_rows, op.rows)));
    }
    if op.width == 0 || op.rows == 0 {
        return Ok(());
    }
    let per = op.rows / op.b_rows;
    let n = op.rows * op.width;
    let args = [Arg::P(ins[0]), Arg::P(ins[1]), Arg::P(outs[0]), l(op.rows), l(per), l(op.width)];
    launch(dev, FAMILY, "add_bcast", (grid_for(n, BLOCK), 1, 1), BLOCK, 0, &args)
}

/// [`GatherRows`]: indices checked on the device ("gather_rows index i"), then the copy.
pub(crate) fn gather_rows(dev: &Dev, op: &GatherRows, ins: &[u64], outs: &[u64]) -> Result<()> {
    if op.width == 0 {
        return Ok(());
    }
    check_range(dev, FAMILY, "gather_rows", ins[1], op.out_rows, op.rows as i64, E_GATHER)?;
    let n = op.out_rows * op.width;
    let args =
        [Arg::P(ins[0]), Arg::P(ins[1]), Arg::P(outs[0]), l(op.rows), l(op.width), l(op.out_rows), Arg::P(dev.err_ptr)];
    launch(dev, FAMILY, "gather_rows", (if n == 0 { 0 } else { grid_for(n, BLOCK) }, 1, 1), BLOCK, 0, &args)
}
