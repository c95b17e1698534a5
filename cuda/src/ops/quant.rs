//! Quantization simulation and the Hadamard rotation (`kernels/quant.cu`, `quant_rows` of the
//! prelude).

use std::sync::Arc;

use hal::ops::{Hadamard, QuantFormat, QuantSim};
use hal::Result;

use super::{grid_for, l, launch, smem, Arg, BLOCK};
use crate::device::Dev;
use crate::device::DevBuf;
use crate::memo::{Memo, QuantKey};

/// `quant_rows` kernel format codes.
pub(crate) const FMT_FP8: i32 = 0;
pub(crate) const FMT_FP4: i32 = 1;

/// How an FP8 act_quant'ed input is stored for the kernel that multiplies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ActForm {
    /// The dequantized values in f32 (`quant_rows`): the CUDA-core kernels.
    F32,
    /// The same values in bf16, which holds them exactly (e4m3 × power of two;
    /// `quant_rows_bf16`): the tensor-core tiles.
    Bf16,
    /// The e4m3 codes, then their f32 scales at [`codes_scales_offset`] (`quant_rows_e4m3`):
    /// the FP8 tensor-core GEMV. Needs `dim % block == 0`.
    E4m3,
}

impl ActForm {
    /// [`QuantKey`] format code (`FMT_FP8` for F32, as `quant_rows` writes it).
    fn key_code(self) -> i32 {
        match self {
            ActForm::F32 => FMT_FP8,
            ActForm::Bf16 => 2,
            ActForm::E4m3 => 3,
        }
    }

    /// Bytes of the copy of `rows × dim` values in blocks of `block`.
    fn bytes(self, rows: usize, dim: usize, block: usize) -> usize {
        match self {
            ActForm::F32 => rows * dim * 4,
            ActForm::Bf16 => rows * dim * 2,
            ActForm::E4m3 => codes_scales_offset(rows, dim) + rows * (dim / block.max(1)) * 4,
        }
    }
}

/// Byte offset of the scales in an [`ActForm::E4m3`] copy: after the codes, 16-byte aligned.
pub(crate) fn codes_scales_offset(rows: usize, dim: usize) -> usize {
    (rows * dim).div_ceil(16) * 16
}

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

/// The FP8 act_quant of `src [rows, dim]` in blocks of `block` into `dst`, stored as `form`
/// says. Launched in `family`'s module.
#[allow(clippy::too_many_arguments)]
pub(crate) fn act_quant_into(
    dev: &Dev,
    family: &'static str,
    src: u64,
    dst: u64,
    rows: usize,
    dim: usize,
    block: usize,
    form: ActForm,
) -> Result<()> {
    match form {
        ActForm::F32 => quant_rows(dev, family, src, dst, rows, dim, dim, block, FMT_FP8),
        ActForm::Bf16 => {
            if rows == 0 || dim == 0 {
                return Ok(());
            }
            let args = [Arg::P(src), Arg::P(dst), l(rows), l(dim), Arg::I(block as i32)];
            launch(dev, family, "quant_rows_bf16", quant_grid(rows, dim, block), BLOCK, 0, &args)
        }
        ActForm::E4m3 => quant_rows_e4m3(dev, family, src, dst, 0, rows, dim, block),
    }
}

/// Grid of the block-quantization kernels: one warp per (row, block).
fn quant_grid(rows: usize, dim: usize, block: usize) -> (u32, u32, u32) {
    (grid_for(rows * dim.div_ceil(block.max(1)) * 32, BLOCK), 1, 1)
}

/// Launches `quant_rows_e4m3`: the [`ActForm::E4m3`] copy at `codes` and, unless `vals` is 0,
/// the [`ActForm::F32`] copy at `vals`.
#[allow(clippy::too_many_arguments)]
fn quant_rows_e4m3(
    dev: &Dev,
    family: &'static str,
    src: u64,
    codes: u64,
    vals: u64,
    rows: usize,
    dim: usize,
    block: usize,
) -> Result<()> {
    if rows == 0 || dim == 0 {
        return Ok(());
    }
    let scales = codes + codes_scales_offset(rows, dim) as u64;
    let args = [Arg::P(src), Arg::P(codes), Arg::P(scales), Arg::P(vals), l(rows), l(dim), Arg::I(block as i32)];
    launch(dev, family, "quant_rows_e4m3", quant_grid(rows, dim, block), BLOCK, 0, &args)
}

/// The act_quant'ed copy (FP8, blocks of `block`) of an op input `x [rows, dim]` that a linear
/// multiplies, stored as `form` says: the memo's copy if the same unchanged input was quantized
/// before (a decode step quantizes the attention norm's output for `wq_a` and `wkv`, and the FFN
/// norm's for the routed and both shared-expert projections), else a new one, kept in the memo
/// when small. Returns its address and, when the memo does not keep it, the buffer to hold until
/// the op's kernels are issued.
///
/// With `V4RT_CUDA_GEMV_ACT=separate`, one row (decode) in f32 or e4m3 form, where the FP8 GEMV
/// runs, is quantized into both forms by one kernel: the FFN norm's row feeds the routed experts
/// (f32) and the shared expert (e4m3), and a second kernel of a few µs would cost more than
/// writing the other form along. By default the GEMV quantizes its own row and asks for no copy.
pub(crate) fn act_quant(
    dev: &Dev,
    family: &'static str,
    x: u64,
    rows: usize,
    dim: usize,
    block: usize,
    form: ActForm,
) -> Result<(u64, Option<Arc<DevBuf>>)> {
    let key = QuantKey { src: x, rows, dim, block, fmt: form.key_code() };
    if let Some(p) = dev.memo.quantized(&key) {
        return Ok((p, None));
    }
    let both = dev.fp8_mma
        && !dev.gemv_quantizes
        && rows == 1
        && form != ActForm::Bf16
        && block > 0
        && dim.is_multiple_of(block);
    if both && Memo::keeps(&key) {
        let f32_bytes = ActForm::F32.bytes(rows, dim, block).div_ceil(16) * 16;
        let buf = Arc::new(dev.scratch(f32_bytes + ActForm::E4m3.bytes(rows, dim, block))?);
        let (vals, codes) = (buf.ptr(), buf.ptr() + f32_bytes as u64);
        quant_rows_e4m3(dev, family, x, codes, vals, rows, dim, block)?;
        for (f, p) in [(ActForm::F32, vals), (ActForm::E4m3, codes)] {
            dev.memo.keep_quantized(QuantKey { fmt: f.key_code(), ..key }, p, buf.clone());
        }
        return Ok((if form == ActForm::F32 { vals } else { codes }, None));
    }
    let buf = Arc::new(dev.scratch(form.bytes(rows, dim, block))?);
    let p = buf.ptr();
    act_quant_into(dev, family, x, p, rows, dim, block, form)?;
    if Memo::keeps(&key) {
        dev.memo.keep_quantized(key, p, buf);
        Ok((p, None))
    } else {
        Ok((p, Some(buf)))
    }
}

/// Where an op's FP8 act_quant'ed input goes when one of the op's own kernels writes it along
/// with its work, in [`ActForm::F32`] or [`ActForm::E4m3`] form.
pub(crate) struct ActQuantTarget {
    /// The copy's source and form, as the memo knows it.
    key: QuantKey,
    copy: TargetCopy,
}

enum TargetCopy {
    /// The memo's copy: nothing to write.
    Known(u64),
    /// A new buffer for the kernel to fill; [`ActQuantTarget::issued`] once it is launched.
    Fresh(Arc<DevBuf>),
}

impl ActQuantTarget {
    /// The target of the act_quant of `x [rows, dim]` in blocks of `block`, stored as `form`.
    pub(crate) fn of(dev: &Dev, x: u64, rows: usize, dim: usize, block: usize, form: ActForm) -> Result<Self> {
        let key = QuantKey { src: x, rows, dim, block, fmt: form.key_code() };
        let copy = match dev.memo.quantized(&key) {
            Some(p) => TargetCopy::Known(p),
            None => TargetCopy::Fresh(Arc::new(dev.scratch(form.bytes(rows, dim, block))?)),
        };
        Ok(ActQuantTarget { key, copy })
    }

    /// The copy's address.
    pub(crate) fn ptr(&self) -> u64 {
        match &self.copy {
            TargetCopy::Known(p) => *p,
            TargetCopy::Fresh(buf) => buf.ptr(),
        }
    }

    /// The source the writing kernel should quantize: `x`, or 0 (null) when the copy is known.
    pub(crate) fn source(&self) -> u64 {
        match self.copy {
            TargetCopy::Known(_) => 0,
            TargetCopy::Fresh(_) => self.key.src,
        }
    }

    /// After the writing kernel is issued: the memo keeps a small fresh copy (as [`act_quant`]
    /// does). Returns the buffer to hold until the op's kernels are issued.
    pub(crate) fn issued(self, dev: &Dev) -> Option<Arc<DevBuf>> {
        let TargetCopy::Fresh(buf) = self.copy else { return None };
        if Memo::keeps(&self.key) {
            dev.memo.keep_quantized(self.key, buf.ptr(), buf);
            None
        } else {
            Some(buf)
        }
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
    let (scratch, shared) = if bytes <= 48 * 1024 { (None, bytes) } else { (Some(dev.scratch(op.rows * bytes)?), 0) };
    let sp = scratch.as_ref().map(|s| s.ptr()).unwrap_or(0);
    let args = [Arg::P(outs[0]), Arg::I(op.dim as i32), Arg::P(sp)];
    launch(dev, "quant", "hadamard_rows", (op.rows as u32, 1, 1), BLOCK, smem(shared), &args)
}
