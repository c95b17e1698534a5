//! Quantization simulation and the Hadamard rotation (`kernels/quant.cu`, `quant_rows` of the
//! prelude).

use hal::ops::{Hadamard, QuantFormat, QuantSim};
use hal::Result;

use super::{grid_for, l, launch, smem, Arg, BLOCK};
use crate::device::Dev;
use crate::memo::{Memo, QuantKey};
use crate::device::DevBuf;

/// `quant_rows` kernel format codes.
pub(crate) const FMT_FP8: i32 = 0;
pub(crate) const FMT_FP4: i32 = 1;
/// [`QuantKey`] format of an FP8 act_quant'ed copy stored in bf16 (`quant_rows_bf16`).
const FMT_FP8_IN_BF16: i32 = 2;

/// Launches `quant_rows` (in `family`'s module): per row of `src [rows, dim]`, each block of
/// `block` among the first `qdims` values through quantize-dequantize into `dst` (may be `src`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn quant_rows(
    dev: &Dev,
    family: &'static str,
    src: u64,
    dst: u64,
    rows: usize,
    dim: usize,
    qdims: usize,
    block: usize,
    fmt: i32,
) -> Result<()> {
    if rows == 0 || dim == 0 || (qdims == 0 && src == dst) {
        return Ok(());
    }
    let warps = rows * qdims.div_ceil(block.max(1)).max(1);
    let args = [Arg::P(src), Arg::P(dst), l(rows), l(dim), l(qdims), Arg::I(block as i32), Arg::I(fmt)];
    launch(dev, family, "quant_rows", (grid_for(warps * 32, BLOCK), 1, 1), BLOCK, 0, &args)
}

/// The FP8 act_quant of `src [rows, dim]` in blocks of `block` into `dst`: f32 (`quant_rows`),
/// or bf16 with `bf16` (`quant_rows_bf16`; exact, as e4m3 × power of two), the input form of the
/// tensor-core tiles. Launched in `family`'s module.
#[allow(clippy::too_many_arguments)]
pub(crate) fn act_quant_into(
    dev: &Dev,
    family: &'static str,
    src: u64,
    dst: u64,
    rows: usize,
    dim: usize,
    block: usize,
    bf16: bool,
) -> Result<()> {
    if !bf16 {
        return quant_rows(dev, family, src, dst, rows, dim, dim, block, FMT_FP8);
    }
    if rows == 0 || dim == 0 {
        return Ok(());
    }
    let warps = rows * dim.div_ceil(block.max(1));
    let args = [Arg::P(src), Arg::P(dst), l(rows), l(dim), Arg::I(block as i32)];
    launch(dev, family, "quant_rows_bf16", (grid_for(warps * 32, BLOCK), 1, 1), BLOCK, 0, &args)
}

/// The act_quant'ed copy (FP8, blocks of `block`) of an op input `x [rows, dim]` that a linear
/// multiplies, in f32, or in bf16 (`bf16`) for the tensor-core tiles: the memo's copy if the same
/// unchanged input was quantized before (a decode step quantizes the attention norm's output for
/// `wq_a` and `wkv`, and the FFN norm's for the routed and both shared-expert projections), else
/// a new one, kept in the memo when small. Returns its address and, when the memo does not keep
/// it, the buffer to hold until the op's kernels are issued.
pub(crate) fn act_quant(
    dev: &Dev,
    family: &'static str,
    x: u64,
    rows: usize,
    dim: usize,
    block: usize,
    bf16: bool,
) -> Result<(u64, Option<DevBuf>)> {
    let key = QuantKey { src: x, rows, dim, block, fmt: if bf16 { FMT_FP8_IN_BF16 } else { FMT_FP8 } };
    if let Some(p) = dev.memo.quantized(&key) {
        return Ok((p, None));
    }
    let buf = dev.scratch(rows * dim * if bf16 { 2 } else { 4 })?;
    let p = buf.ptr();
    act_quant_into(dev, family, x, p, rows, dim, block, bf16)?;
    if Memo::keeps(&key) {
        dev.memo.keep_quantized(key, p, buf);
        Ok((p, None))
    } else {
        Ok((p, Some(buf)))
    }
}

/// [`QuantSim`], in place.
pub(crate) fn quant_sim(dev: &Dev, op: &QuantSim, outs: &[u64]) -> Result<()> {
    let fmt = match op.format {
        QuantFormat::Fp8E4M3 => FMT_FP8,
        QuantFormat::Fp4E2M1 => FMT_FP4,
    };
    if op.quant_dims == 0 {
        return Ok(());
    }
    quant_rows(dev, "quant", outs[0], outs[0], op.rows, op.dim, op.quant_dims, op.block, fmt)
}

/// [`Hadamard`], in place: one block per row, the f64 values in shared memory when they fit in
/// 48 KiB, else in a global scratch buffer.
pub(crate) fn hadamard(dev: &Dev, op: &Hadamard, outs: &[u64]) -> Result<()> {
    if op.rows == 0 || op.dim == 0 {
        return Ok(());
    }
    let bytes = op.dim * 8;
    let (scratch, shared) = if bytes <= 48 * 1024 {
        (None, bytes)
    } else {
        (Some(dev.scratch(op.rows * bytes)?), 0)
    };
    let sp = scratch.as_ref().map(|s| s.ptr()).unwrap_or(0);
    let args = [Arg::P(outs[0]), Arg::I(op.dim as i32), Arg::P(sp)];
    launch(dev, "quant", "hadamard_rows", (op.rows as u32, 1, 1), BLOCK, smem(shared), &args)
}
