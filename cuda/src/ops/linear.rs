//! Linear layers over the checkpoint formats (`kernels/linear.cu`).
//!
//! FP8/FP4 linears first act_quant the input per row in blocks of 128 into a scratch buffer
//! (`quant_rows`, the dequantized x̃ that cpu-ref multiplies; in bf16, which holds it exactly, for
//! the tensor-core tiles that many rows take: `act_quant_into`, `takes_tc`), then `linear_fwd` computes
//! `y = W·x̃` with the weight dequantized on the fly: one warp per output feature at a time with
//! `LIN_RT` = 4 rows per pass, or for one row a group of 1–8 warps per 4 features splitting the
//! row (`k_split`); 16-byte weight loads, f32 FMA
//! lane sums, a shuffle tree, and the group's partial sums added in warp order.
//!
//! One-row FP8 linears on sm_89+ (the decode projections) take `linear_fp8_r1` instead: each
//! warp act_quants the row's blocks it needs as e4m3 codes and scales, multiplies them with the
//! raw weight bytes by `mma.sync` e4m3 tiles and promotes to f32 every 128 columns
//! (`takes_fp8_mma`); no act_quant kernel runs before it.

use hal::ops::{GroupedLinear, Linear, WeightFormat};
use hal::{Error, Result};

use super::quant::{act_quant, codes_scales_offset, ActForm};
use super::{l, launch, Arg, BLOCK};
use crate::device::Dev;

const FAMILY: &str = "linear";
/// Rows per warp pass in the multi-row kernels (`LIN_RT`); the `_r1` variants take one.
pub(crate) const ROWS_PER_PASS: usize = 4;
/// Block length of the linear-input activation quantization.
pub(crate) const ACT_BLOCK: usize = 128;

/// `WF_*` code of a weight format.
pub(crate) fn format_code(f: WeightFormat) -> i32 {
    match f {
        WeightFormat::F32 => 0,
        WeightFormat::Bf16 => 1,
        WeightFormat::Fp8Block128 => 2,
        WeightFormat::Fp4Group32 => 3,
    }
}

/// Blocks along the output features for a weight-streaming kernel whose other grid dimensions
/// hold `others` blocks: enough for about 8 blocks per SM in total (each warp then loops over
/// several features), never more than one warp per feature.
/// `per_warp`: features a warp takes per step (`LIN_OT` = 4 in the one-row kernels, else 1).
pub(crate) fn feature_blocks(dev: &Dev, n: usize, others: usize, per_warp: usize) -> usize {
    let wpb = BLOCK as usize / 32;
    n.div_ceil(wpb * per_warp).min((dev.sms * 8).div_ceil(others.max(1))).max(1)
}

/// Largest x row (bytes) that the one-row kernels stage in shared memory (`stage_x`); two blocks
/// per SM still fit beside it on an H100. Longer rows take the one-warp-per-feature path.
const STAGED_X_MAX: usize = 96 * 1024;

/// Whether a one-row kernel can stage an x row of `bytes` in dynamic shared memory: at most
/// STAGED_X_MAX, and within the device's opt-in limit beside the kernels' static tables (under
/// 2 KiB).
pub(crate) fn stages_x(dev: &Dev, bytes: usize) -> bool {
    bytes <= STAGED_X_MAX && bytes + 2048 <= dev.smem_optin
}

/// Output features per warp step in the one-row kernels (`LIN_OT`).
pub(crate) const FEATURES_PER_STEP: usize = 4;

/// Fewest rows for which the tensor-core tiles replace the weight-streaming kernels (below it the
/// step is bound by reading the weights, which the GEMV kernels do at fewer instructions).
pub(crate) const TC_MIN_ROWS: usize = 16;
/// Tensor-core tile: rows × output features, and the k step (`TC_BM`, `TC_BN`, `TC_BK`).
pub(crate) const TC_ROWS: usize = 64;
pub(crate) const TC_FEATURES: usize = 128;
pub(crate) const TC_K: usize = 32;

/// Whether the tensor-core tiles can take weights of `format` with inputs of `k` columns: bf16
/// holds FP8/FP4 (times their scales) and BF16 weights exactly, not F32 ones.
pub(crate) fn tc_fits(dev: &Dev, format: WeightFormat, k: usize) -> bool {
    dev.tensor_cores && format != WeightFormat::F32 && k.is_multiple_of(TC_K) && k > 0
}

/// bf16 terms per input value in the tensor-core tiles: 1 for act_quant'ed inputs (exact in
/// bf16), 3 otherwise (an exact split of any f32).
fn tc_terms(quantized: bool) -> usize {
    if quantized {
        1
    } else {
        3
    }
}

/// [`tc_terms`] as the tensor-core kernels' `split` argument.
pub(crate) fn tc_split(quantized: bool) -> Arg {
    Arg::I(tc_terms(quantized) as i32)
}

/// Dynamic shared memory of a tensor-core kernel: two stages, each a bf16 slice of the weight
/// tile and one of each input term, rows padded by 8 (`TcStage` in common.cuh). 30 KiB for
/// act_quant'ed inputs, 50 KiB for three terms.
pub(crate) fn tc_stage_bytes(quantized: bool) -> u32 {
    (2 * (TC_FEATURES + tc_terms(quantized) * TC_ROWS) * (TC_K + 8) * 2) as u32
}

/// Warps that share one group of `FEATURES_PER_STEP` output features in the one-row kernel
/// (1, 2, 4 or 8): the fewest that put about 16 warps per SM to work, and no more than the row
/// has 32-chunk slabs. Short rows of few features (a 4096 → 512 projection) otherwise leave most
/// of the GPU idle.
pub(crate) fn k_split(dev: &Dev, n: usize, k: usize, format: WeightFormat) -> usize {
    // Weights per 16-byte chunk (`Chunk<FMT>::E` in common.cuh).
    let chunk = match format {
        WeightFormat::F32 => 4,
        WeightFormat::Bf16 => 8,
        WeightFormat::Fp8Block128 => 16,
        WeightFormat::Fp4Group32 => 32,
    };
    let slabs = (k / chunk).div_ceil(32).max(1);
    let groups = n.div_ceil(FEATURES_PER_STEP);
    let mut split = 1;
    while split < 8 && groups * split < dev.sms * 16 && split * 2 <= slabs {
        split *= 2;
    }
    split
}

/// Whether [`linear_fwd`] takes the tensor-core tiles (`linear_tc`) for this shape; they read an
/// act_quant'ed input (`quantized`) in bf16, any other in f32.
#[allow(clippy::too_many_arguments)]
pub(crate) fn takes_tc(
    dev: &Dev,
    rows: usize,
    k: usize,
    n: usize,
    opg: usize,
    x_stride: usize,
    format: WeightFormat,
    quantized: bool,
) -> bool {
    // 16-byte aligned input rows.
    let align = if quantized { 8 } else { 4 };
    rows >= TC_MIN_ROWS
        && tc_fits(dev, format, k)
        && x_stride.is_multiple_of(align)
        && (opg.is_multiple_of(TC_FEATURES) || opg >= n)
}

/// Launches `linear_fwd`: `y[r, o] = Σ_i W[o, i] · x[r·x_stride + (o / opg)·k + i]`. With
/// `quantized` (x holds act_quant'ed values) x is bf16 where [`takes_tc`], else f32.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_fwd(
    dev: &Dev,
    x: u64,
    x_stride: usize,
    (w, sc): (u64, u64),
    y: u64,
    y_stride: usize,
    rows: usize,
    k: usize,
    n: usize,
    opg: usize,
    format: WeightFormat,
    quantized: bool,
) -> Result<()> {
    if rows == 0 || n == 0 {
        return Ok(());
    }
    // The arguments both kernels share; each takes one more (its variant flag).
    let mut args = vec![
        Arg::P(x),
        l(x_stride),
        Arg::P(w),
        Arg::P(sc),
        Arg::P(y),
        l(y_stride),
        l(rows),
        l(k),
        l(n),
        l(opg.max(1)),
        Arg::I(format_code(format)),
    ];
    if takes_tc(dev, rows, k, n, opg, x_stride, format, quantized) {
        let gx = n.div_ceil(TC_FEATURES) as u32;
        let gy = rows.div_ceil(TC_ROWS).min(65_535) as u32;
        args.push(tc_split(quantized));
        return launch(dev, FAMILY, "linear_tc", (gx, gy, 1), BLOCK, tc_stage_bytes(quantized), &args);
    }
    // 16-byte vector loads: every weight row and x row (group) starts 16-byte aligned.
    let vec = k.is_multiple_of(32) && x_stride.is_multiple_of(4);
    args.push(Arg::I(vec as i32));
    if rows > 1 {
        let gy = rows.div_ceil(ROWS_PER_PASS).min(65_535);
        let gx = feature_blocks(dev, n, gy, 1) as u32;
        return launch(dev, FAMILY, "linear_fwd", (gx, gy as u32, 1), BLOCK, 0, &args);
    }
    // One row: on the vector path groups of `split` warps take FEATURES_PER_STEP features each
    // (k_split) with the x row staged in shared memory, else one warp takes one feature.
    let split = k_split(dev, n, k, format);
    let staged_per_block = (BLOCK as usize / 32 / split) * FEATURES_PER_STEP;
    let staged = vec
        && opg.is_multiple_of(FEATURES_PER_STEP)
        && (opg.is_multiple_of(staged_per_block) || opg >= n)
        && stages_x(dev, k * 4);
    let per_block = if staged { staged_per_block } else { BLOCK as usize / 32 };
    let gx = n.div_ceil(per_block).min(dev.sms * 8) as u32;
    args.push(Arg::I(split as i32));
    args.push(Arg::I(staged as i32));
    let smem = if staged { k * 4 } else { 0 };
    // Weights the L2 holds with room to spare are asked for before the kernel's wait.
    let early = staged && format.bytes(n, k) <= dev.early_l2_max;
    let name = if early { "linear_fwd_r1_early" } else { "linear_fwd_r1" };
    launch(dev, FAMILY, name, (gx, 1, 1), BLOCK, smem as u32, &args)
}

/// Rows of a warp's tile in the one-row tensor-core kernels (`MMA_ROWS` in common.cuh, the mma's M).
pub(crate) const MMA_ROWS: usize = 16;

/// Whether a one-row FP8 linear takes the e4m3 tensor-core GEMV (`linear_fp8_r1`).
fn takes_fp8_mma(dev: &Dev, rows: usize, k: usize, format: WeightFormat) -> bool {
    dev.fp8_mma && rows == 1 && format == WeightFormat::Fp8Block128 && k > 0 && k.is_multiple_of(ACT_BLOCK)
}

/// Warps that split one 16-row group's 128-column steps in the one-row tensor-core kernels
/// (`linear_fp8_r1`, `moe_*_fp4_r1`; a power of two up to the `block_warps` of a block), for
/// `row_groups` groups in all and rows of `k` columns, in a kernel of which `resident` warps fit on
/// an SM: the fewest that put about 16 warps per SM to work, no more than there are steps, and no
/// more than one wave of warps (a second, partial wave leaves most SMs idle at the end: `wq_b`'s
/// 2048 row groups split in two were 1.3 waves).
pub(crate) fn mma_k_split(dev: &Dev, row_groups: usize, k: usize, resident: usize, block_warps: usize) -> usize {
    let mut split = 1;
    while split < block_warps
        && row_groups * split < dev.sms * 16
        && row_groups * split * 2 <= dev.sms * resident
        && split * 2 <= k / ACT_BLOCK
    {
        split *= 2;
    }
    split
}

/// Warps of `linear_fp8_r1` resident on an SM (`__launch_bounds__(256, 3)`).
pub(crate) const FP8_R1_RESIDENT_WARPS: usize = 24;

/// Launches the FP8 tensor-core GEMV `y = W·x̃` for the one f32 row at `x`: `linear_fp8_r1`,
/// which act_quants the row's blocks itself, where [`Dev::gemv_quantizes`] and `x` is 16-byte
/// aligned; else `linear_fp8_r1_codes` after a separate act_quant ([`ActForm::E4m3`]).
fn linear_fp8_mma(dev: &Dev, x: u64, (w, sc): (u64, u64), y: u64, k: usize, n: usize) -> Result<()> {
    let split = mma_k_split(dev, n.div_ceil(MMA_ROWS), k, FP8_R1_RESIDENT_WARPS, BLOCK as usize / 32);
    let groups_per_block = BLOCK as usize / 32 / split;
    let grid = (n.div_ceil(MMA_ROWS * groups_per_block) as u32, 1, 1);
    let tail = [Arg::P(w), Arg::P(sc), Arg::P(y), l(n), l(k), Arg::I(split as i32), Arg::I(dev.early_weights)];
    if dev.gemv_quantizes && x.is_multiple_of(16) {
        let args: Vec<Arg> = std::iter::once(Arg::P(x)).chain(tail).collect();
        return launch(dev, FAMILY, "linear_fp8_r1", grid, BLOCK, 0, &args);
    }
    let (xq, _held) = act_quant(dev, FAMILY, x, 1, k, ACT_BLOCK, ActForm::E4m3)?;
    let xs = xq + codes_scales_offset(1, k) as u64;
    let args: Vec<Arg> = [Arg::P(xq), Arg::P(xs)].into_iter().chain(tail).collect();
    launch(dev, FAMILY, "linear_fp8_r1_codes", grid, BLOCK, 0, &args)
}

/// [`Linear`].
pub(crate) fn linear(dev: &Dev, op: &Linear, ins: &[u64], outs: &[u64]) -> Result<()> {
    let (rows, k, n) = (op.rows, op.in_features, op.out_features);
    if rows == 0 || n == 0 {
        return Ok(());
    }
    let sc = ins.get(2).copied().unwrap_or(0);
    let quantized = op.format.quantizes_input();
    if takes_fp8_mma(dev, rows, k, op.format) {
        return linear_fp8_mma(dev, ins[0], (ins[1], sc), outs[0], k, n);
    }
    let (x, _held) = if quantized && k > 0 {
        let form = if takes_tc(dev, rows, k, n, n, k, op.format, quantized) { ActForm::Bf16 } else { ActForm::F32 };
        act_quant(dev, FAMILY, ins[0], rows, k, ACT_BLOCK, form)?
    } else {
        (ins[0], None)
    };
    linear_fwd(dev, x, k, (ins[1], sc), outs[0], n, rows, k, n, n, op.format, quantized)
}

/// [`GroupedLinear`]: the same kernel with the input column offset `(o / out_per_group)·in_per_group`;
/// any weight format, never act_quant'ed (as cpu-ref).
pub(crate) fn grouped_linear(dev: &Dev, op: &GroupedLinear, ins: &[u64], outs: &[u64]) -> Result<()> {
    let (g, ipg, opg) = (op.groups, op.in_per_group, op.out_per_group);
    if op.format == WeightFormat::Fp4Group32 && ipg % 32 != 0 {
        return Err(Error::invalid(
            "grouped_linear",
            format!("FP4 weight input dimension {ipg} is not a multiple of 32"),
        ));
    }
    let sc = ins.get(2).copied().unwrap_or(0);
    linear_fwd(dev, ins[0], g * ipg, (ins[1], sc), outs[0], g * opg, op.rows, ipg, g * opg, opg, op.format, false)
}
