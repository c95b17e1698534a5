//! The KV compressor (`kernels/compressor.cu`): emit (pool, norm, RoPE, rotate/quantize) for
//! every row that completes a block, then the state update — see the kernel file for how the
//! sequential state machine of cpu-ref is computed in parallel. The state is f32; the cache of
//! finished entries is f32 or bf16 (`comp_emit_bf16`).

use hal::ops::Compressor;
use hal::{Error, Result};

use super::{cache_kernel, check_rows, grid_for, i, l, launch, smem, Arg, BLOCK, CHECK_EMIT};
use crate::device::Dev;

const FAMILY: &str = "compressor";

/// Dynamic shared memory of `comp_emit`: the entry (f32) plus, rotated, its f64 Hadamard copy.
pub(crate) fn smem_for(c: &Compressor) -> usize {
    c.width * 4 + if c.rotate { c.width * 8 } else { 0 }
}

/// [`Compressor`].
pub(crate) fn compressor(dev: &Dev, op: &Compressor, ins: &[u64], outs: &[u64]) -> Result<()> {
    let name = "compressor";
    let (ratio, d, rd) = (op.ratio, op.width, op.rope_dim);
    if rd % 2 != 0 || rd > d {
        return Err(Error::invalid(name, format!("rope_dim {rd} must be even and ≤ width {d}")));
    }
    if op.rotate && d % 32 != 0 {
        return Err(Error::invalid(name, format!("rotated width {d} must be a multiple of 32")));
    }
    if !op.rotate && (d - rd) % 64 != 0 {
        return Err(Error::invalid(name, format!("width − rope_dim = {} must be a multiple of 64", d - rd)));
    }
    let (slots, positions) = (ins[5], ins[6]);
    check_rows(
        dev,
        FAMILY,
        name,
        slots,
        positions,
        op.rows,
        op.slots,
        CHECK_EMIT,
        ratio as i64,
        op.capacity as i64,
        0,
        0,
    )?;
    if op.rows == 0 || d == 0 {
        return Ok(());
    }
    let (kv, score, ape, norm_w, freqs) = (ins[0], ins[1], ins[2], ins[3], ins[4]);
    let (state_kv, state_score, cache) = (outs[0], outs[1], outs[2]);
    let ns = i(name, "slots", op.slots)?;
    let ratio_i = i(name, "ratio", ratio)?;
    let rows = u32::try_from(op.rows).map_err(|_| Error::invalid(name, "too many rows"))?;
    let emit = [
        Arg::P(kv),
        Arg::P(score),
        Arg::P(ape),
        Arg::P(norm_w),
        Arg::P(freqs),
        Arg::P(slots),
        Arg::P(positions),
        Arg::P(state_kv),
        Arg::P(state_score),
        Arg::P(cache),
        ns,
        ratio_i,
        Arg::I(op.overlap as i32),
        l(d),
        l(rd),
        Arg::I(op.rotate as i32),
        l(op.capacity),
        Arg::F(op.norm_eps),
        Arg::P(dev.err_ptr),
    ];
    let kernel = cache_kernel(op.cache_dtype, "comp_emit", "comp_emit_bf16");
    launch(dev, FAMILY, kernel, (rows, 1, 1), BLOCK, smem(smem_for(op)), &emit)?;
    if op.overlap {
        let args = [
            Arg::P(kv),
            Arg::P(score),
            Arg::P(ape),
            Arg::P(slots),
            Arg::P(positions),
            Arg::P(state_kv),
            Arg::P(state_score),
            l(op.rows),
            ns,
            ratio_i,
            l(d),
            l(op.capacity),
            Arg::P(dev.err_ptr),
        ];
        launch(dev, FAMILY, "comp_save_prev", (rows, 1, 1), BLOCK, 0, &args)?;
    }
    let args = [
        Arg::P(kv),
        Arg::P(score),
        Arg::P(ape),
        Arg::P(slots),
        Arg::P(positions),
        Arg::P(state_kv),
        Arg::P(state_score),
        l(op.rows),
        ns,
        ratio_i,
        Arg::I(op.overlap as i32),
        l(d),
        Arg::P(dev.err_ptr),
    ];
    let n = op.rows * op.coff() * d;
    launch(dev, FAMILY, "comp_save_rows", (grid_for(n, BLOCK), 1, 1), BLOCK, 0, &args)
}
