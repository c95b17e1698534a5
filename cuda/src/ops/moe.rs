//! Mixture of experts: gate, SwiGLU and the routed experts (`kernels/moe.cu`).
//!
//! Routed experts, per chunk of rows: `moe_route` builds per-expert lists of (row, slot) pairs,
//! the list of experts in use and each row's ascending-expert order (`moe_route_checked` also
//! checks the experts and zeroes the counts when the rows are few, one launch instead of three;
//! the input's act_quant copy is shared with the shared expert's linears through `Dev::memo`);
//! `moe_up` (grid: output
//! features × experts in use × pair tiles) computes `h = w·SwiGlu(W1·x̃, W3·x̃)` reading each expert's weights once per tile of
//! up to 4 pairs (one when experts have about one pair each); `h` is act_quant'ed; `moe_down` computes `W2·h̃` per pair; `moe_combine` sums
//! the pairs of each row in ascending expert order (f32, as cpu-ref). With many pairs (prefill)
//! `moe_up_tc` / `moe_down_tc` replace the two products: bf16 tensor-core tiles of 64 pairs of one
//! expert × 128 weight rows (64 features of W1 and W3 each in `moe_up_tc`) on exact bf16 operands
//! (common.cuh), the same f32-class result.

use hal::ops::{GateMode, MoeExperts, MoeGate, SwiGlu, WeightFormat};
use hal::{Error, Result};

use super::linear::{
    feature_blocks, format_code, mma_k_split, stages_x, tc_fits, tc_split, tc_stage_bytes, ACT_BLOCK,
    FEATURES_PER_STEP, MMA_ROWS, ROWS_PER_PASS, TC_FEATURES, TC_MIN_ROWS, TC_ROWS,
};
use super::quant::{act_quant, act_quant_into, codes_scales_offset, ActForm, ActQuantTarget};
use super::{check_threads, grid_for, i, l, launch, op_id, Arg, BLOCK, DOT_ROWS};
use crate::device::Dev;

const FAMILY: &str = "moe";
/// Warps of a `moe_up_fp4_r1` / `moe_down_fp4_r1` block (moe.cu `FP4_WARPS`), and those resident on
/// an SM (`__launch_bounds__(128, 4)`).
const FP4_R1_WARPS: usize = 4;
const FP4_R1_RESIDENT_WARPS: usize = 16;
/// Most (row, expert) pairs routed by the one-block `moe_route_checked`.
const ROUTE_CHECKED_PAIRS: usize = 1024;
/// Most FP8 blocks (rows × blocks of a row) of input that `moe_route_checked` act_quants in its
/// second block (two a warp at 1024 threads): a decode step's row or two.
const ROUTE_QUANT_BLOCKS: usize = 64;
/// Bytes of the per-chunk pair scratch (h, h̃, expert outputs) beyond which rows are chunked:
/// a 4096-token prefill chunk of V4-Flash (six pairs a row) fits in one. Every chunk streams all
/// the experts' weights once more, and a smaller one fills the tensor-core pair tiles less.
const PAIR_SCRATCH: usize = 1 << 30;

/// Dynamic shared memory of `moe_up_fp4_r1` / `moe_down_fp4_r1` for an input row of `width`
/// columns (moe.cu `fp4_stage`): the row as f16, 16 zero words, a scale per 128 columns.
fn fp4_f16_smem(width: usize) -> u32 {
    (width * 2 + 16 * 4 + width / ACT_BLOCK * 4) as u32
}

fn check_limit(op: &str, limit: f32) -> Result<()> {
    if limit >= 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(op, format!("swiglu limit {limit} must be ≥ 0 (0 disables the clamp)")))
    }
}

/// [`SwiGlu`].
pub(crate) fn swiglu(dev: &Dev, op: &SwiGlu, ins: &[u64], outs: &[u64]) -> Result<()> {
    check_limit("swiglu", op.limit)?;
    let n = op.rows * op.width;
    if n == 0 {
        return Ok(());
    }
    let args = [Arg::P(ins[0]), Arg::P(ins[1]), Arg::P(outs[0]), l(n), Arg::F(op.limit)];
    launch(dev, FAMILY, "swiglu", (grid_for(n, BLOCK), 1, 1), BLOCK, 0, &args)
}

/// [`MoeGate`]: scores (one warp per row and expert), then selection and weights (one warp per
/// row). Hashed ids and table entries are checked on the device, for a few rows (a decode step)
/// beside the selection, in a second block of its launch (`gate_select_checked`).
pub(crate) fn moe_gate(dev: &Dev, op: &MoeGate, ins: &[u64], outs: &[u64]) -> Result<()> {
    let name = "moe_gate";
    let (rows, d, e_n, k) = (op.rows, op.dim, op.experts, op.topk);
    if op.mode == GateMode::Scored && k > e_n {
        return Err(Error::invalid(name, format!("topk {k} exceeds the {e_n} experts")));
    }
    let (hashed, vocab, bias, tid2eid, ids) = match op.mode {
        GateMode::Scored => (0, 0, ins[2], 0, 0),
        GateMode::Hashed { vocab } => (1, vocab, 0, ins[2], ins[3]),
    };
    let experts_i = i(name, "experts", e_n)?;
    let k_i = i(name, "topk", k)?;
    // Rows a warp each in one block: the selection checks a hashed gate itself.
    let select_checks = hashed == 1 && k > 0 && rows * 32 <= 1024;
    if hashed == 1 && rows > 0 && !select_checks {
        let args =
            [Arg::P(ids), Arg::P(tid2eid), l(rows), k_i, l(vocab), experts_i, Arg::I(op_id(name)), Arg::P(dev.err_ptr)];
        launch(dev, FAMILY, "check_gate_hashed", (1, 1, 1), check_threads(rows), 0, &args)?;
    }
    if rows == 0 || k == 0 {
        return Ok(());
    }
    let scores = dev.scratch(rows * e_n * 4)?;
    let sp = scores.ptr();
    let dots = rows * e_n;
    if rows >= DOT_ROWS && e_n > 0 {
        // Many rows: tiles of DOT_ROWS rows × DOT_ROWS experts share each loaded weight.
        let args = [Arg::P(ins[0]), Arg::P(ins[1]), l(rows), l(d), l(e_n), Arg::P(sp)];
        let grid = (rows.div_ceil(DOT_ROWS) as u32, e_n.div_ceil(DOT_ROWS) as u32, 1);
        launch(dev, FAMILY, "gate_scores_tiled", grid, BLOCK, 0, &args)?;
    } else if dots > 0 {
        // Warps per dot: up to 8 while that keeps about 16 warps per SM busy at most. (Many dots
        // take the one-warp form: the split form cost a 4096-row prefill's 1M dots 3.6× as much.)
        let mut parts = 1;
        while parts < 8 && dots * parts * 2 <= dev.sms * 16 && 32 * parts * 2 <= d.max(32) {
            parts *= 2;
        }
        // Dots per block: 8 warps each at one warp per dot (grid-stride), else one loop step's.
        let per_block = BLOCK as usize / 32 / parts;
        let args = [Arg::P(ins[0]), Arg::P(ins[1]), l(rows), l(d), l(e_n), Arg::I(parts as i32), Arg::P(sp)];
        launch(dev, FAMILY, "gate_scores", (grid_for(dots, per_block as u32), 1, 1), BLOCK, 0, &args)?;
    }
    if select_checks {
        let args = [
            Arg::P(sp),
            Arg::P(tid2eid),
            Arg::P(ids),
            l(rows),
            experts_i,
            k_i,
            l(vocab),
            Arg::F(op.route_scale),
            Arg::I(op_id(name)),
            Arg::P(outs[0]),
            Arg::P(outs[1]),
            Arg::P(dev.err_ptr),
        ];
        return launch(dev, FAMILY, "gate_select_checked", (2, 1, 1), check_threads(rows * 32), 0, &args);
    }
    let args = [
        Arg::P(sp),
        Arg::P(bias),
        Arg::P(tid2eid),
        Arg::P(ids),
        l(rows),
        experts_i,
        k_i,
        l(vocab),
        Arg::I(hashed),
        Arg::F(op.route_scale),
        Arg::P(outs[0]),
        Arg::P(outs[1]),
        Arg::P(dev.err_ptr),
    ];
    launch(dev, FAMILY, "gate_select", (grid_for(rows * 32, BLOCK), 1, 1), BLOCK, 0, &args)
}

/// [`MoeExperts`].
pub(crate) fn moe_experts(dev: &Dev, op: &MoeExperts, ins: &[u64], outs: &[u64]) -> Result<()> {
    let name = "moe_experts";
    check_limit(name, op.swiglu_limit)?;
    let (rows, d, inter, e_n, k) = (op.rows, op.dim, op.inter, op.experts, op.topk);
    let (x, ex, wts) = (ins[0], ins[1], ins[2]);
    let per = op.format.weight_specs(1, 1).len();
    let weight = |m: usize| (ins[3 + m * per], if per == 2 { ins[4 + m * per] } else { 0 });
    let ((w1, s1), (w3, s3), (w2, s2)) = (weight(0), weight(1), weight(2));
    let k_i = i(name, "topk", k)?;
    let e_i = i(name, "experts", e_n)?;
    // The experts' own check kernel; moe_route_checked checks them itself.
    let check_experts = || {
        let args = [Arg::P(ex), l(rows), k_i, e_i, Arg::I(op_id(name)), Arg::P(dev.err_ptr)];
        launch(dev, FAMILY, "check_experts", (1, 1, 1), check_threads(rows), 0, &args)
    };
    if rows == 0 || d == 0 {
        if rows > 0 {
            check_experts()?;
        }
        return Ok(());
    }
    let quantize = op.format.quantizes_input();
    let fmt = format_code(op.format);
    // h (f32), h̃ (f32; bf16 would do for the tensor-core tiles) and the expert output (f32).
    let pair_bytes = (2 * inter + d) * 4;
    let most = (PAIR_SCRATCH / (pair_bytes * k.max(1)).max(1)).clamp(1, rows);
    // Chunks of even size: a short last chunk would fill its pair tiles poorly.
    let chunk = rows.div_ceil(rows.div_ceil(most));
    let cnt = dev.scratch((e_n + 1) * 4)?;
    let active = dev.scratch(e_n.max(1) * 4)?;
    let list = dev.scratch(e_n.max(1) * chunk * 4)?;
    let order = dev.scratch(chunk * k.max(1) * 4)?;
    let h = dev.scratch(chunk * k * inter * 4)?;
    let hq_buf = if quantize { Some(dev.scratch(chunk * k * inter * 4)?) } else { None };
    let ye = dev.scratch(chunk * k * d * 4)?;
    let (cp, lp, op_, hp, yep) = (cnt.ptr(), list.ptr(), order.ptr(), h.ptr(), ye.ptr());
    let ap = active.ptr();
    let hqp = hq_buf.as_ref().map(|b| b.ptr()).unwrap_or(hp);
    // Few pairs in one chunk (decode): check, zeroing and routing in one one-block kernel.
    let checked_route = chunk >= rows && rows * k <= ROUTE_CHECKED_PAIRS;
    if !checked_route {
        check_experts()?;
    }
    let mut r0 = 0;
    while r0 < rows {
        let n = chunk.min(rows - r0);
        let pairs = n * k;
        let ex_c = ex + (r0 * k * 4) as u64;
        // Grid: output features × (at most) the experts in use × pair tiles; blocks past the
        // number of experts in use, or past their expert's pairs, return at once.
        let used = e_n.min(pairs) as u32;
        // About one pair per expert in use (decode): the one-pair kernels, with fewer registers.
        // (Its input rows are staged in shared memory.)
        let single = 4 * pairs <= 5 * used as usize && stages_x(dev, d.max(inter) * 4);
        // Many pairs (prefill): the tensor-core tiles, TC_ROWS pairs of one expert per block.
        let tc = !single && pairs >= TC_MIN_ROWS && tc_fits(dev, op.format, d) && tc_fits(dev, op.format, inter);
        // Kernels, grid (x: feature blocks of up, of down; z: pair tiles) and trailing arguments.
        let (up_k, down_k, up_x, down_x, tiles, extra) = if tc {
            // About two pair tiles per expert in use; blocks loop over an expert's further tiles.
            let tiles = (2 * pairs.div_ceil(TC_ROWS * used.max(1) as usize)).clamp(1, n.div_ceil(TC_ROWS).min(65_535));
            // A moe_up_tc tile holds TC_FEATURES / 2 features of each of W1 and W3.
            let (fx, fd) = (inter.div_ceil(TC_FEATURES / 2), d.div_ceil(TC_FEATURES));
            ("moe_up_tc", "moe_down_tc", fx, fd, tiles, Some(tc_split(quantize)))
        } else {
            let per_pass = if single { 1 } else { ROWS_PER_PASS };
            let tiles = if single {
                1
            } else {
                (2 * pairs).div_ceil(per_pass * used.max(1) as usize).clamp(1, n.div_ceil(per_pass)).min(65_535)
            };
            let others = used as usize * tiles;
            let per_warp = if single { FEATURES_PER_STEP } else { 1 };
            let (up_k, down_k) = if single { ("moe_up_r1", "moe_down_r1") } else { ("moe_up", "moe_down") };
            let (fx, fd) = (feature_blocks(dev, inter, others, per_warp), feature_blocks(dev, d, others, per_warp));
            (up_k, down_k, fx, fd, tiles, None)
        };
        let tiles = tiles as u32;
        // FP4 experts with about one pair each, where enabled: the one-pair kernels on f16
        // tensor-core tiles, their inputs act_quant'ed as e4m3 codes and scales.
        let fp4_mma = single
            && dev.fp4_mma
            && op.format == WeightFormat::Fp4Group32
            && d % ACT_BLOCK == 0
            && inter % ACT_BLOCK == 0;
        // Their split of the 128-column steps (mma_k_split) for up and down, and their grids.
        let (up_k, down_k, up_x, down_x, splits) = if fp4_mma {
            let split =
                |row_groups: usize, k: usize| mma_k_split(dev, row_groups, k, FP4_R1_RESIDENT_WARPS, FP4_R1_WARPS);
            let splits = (
                split(used as usize * inter.div_ceil(MMA_ROWS), d),
                split(used as usize * d.div_ceil(MMA_ROWS), inter),
            );
            let blocks = |n: usize, split: usize| n.div_ceil(MMA_ROWS * (FP4_R1_WARPS / split));
            ("moe_up_fp4_r1", "moe_down_fp4_r1", blocks(inter, splits.0), blocks(d, splits.1), splits)
        } else {
            (up_k, down_k, up_x, down_x, (0, 0))
        };
        // The chunk's input rows, act_quant'ed (bf16 for the tensor-core tiles).
        let x_c = x + (r0 * d * 4) as u64;
        let form = if fp4_mma {
            ActForm::E4m3
        } else if tc {
            ActForm::Bf16
        } else {
            ActForm::F32
        };
        // A few rows (decode) for the one-pair kernels: the routing kernel act_quants them too.
        let route_quant = checked_route
            && quantize
            && matches!(form, ActForm::F32 | ActForm::E4m3)
            && n * d.div_ceil(ACT_BLOCK) <= ROUTE_QUANT_BLOCKS;
        let target = if route_quant { Some(ActQuantTarget::of(dev, x_c, n, d, ACT_BLOCK, form)?) } else { None };
        if checked_route {
            let (qx, qdst) = target.as_ref().map_or((0, 0), |t| (t.source(), t.ptr()));
            let args = [
                Arg::P(ex_c),
                l(n),
                k_i,
                e_i,
                Arg::I(op_id(name)),
                Arg::P(cp),
                Arg::P(lp),
                Arg::P(op_),
                Arg::P(ap),
                Arg::P(dev.err_ptr),
                Arg::P(qx),
                Arg::P(qdst),
                l(d),
                Arg::I(ACT_BLOCK as i32),
                Arg::I((form == ActForm::E4m3) as i32),
                l(codes_scales_offset(n, d)),
            ];
            // A second block quantizes, with a warp per FP8 block of the input.
            let (blocks, threads) =
                if qx != 0 { (2, check_threads(n * d.div_ceil(ACT_BLOCK) * 32).max(BLOCK)) } else { (1, BLOCK) };
            launch(dev, FAMILY, "moe_route_checked", (blocks, 1, 1), threads, 0, &args)?;
        } else {
            dev.zero(cp, (e_n + 1) * 4)?;
            let args =
                [Arg::P(ex_c), l(n), k_i, e_i, Arg::P(cp), Arg::P(lp), Arg::P(op_), Arg::P(ap), Arg::P(dev.err_ptr)];
            if pairs > 0 {
                launch(dev, FAMILY, "moe_route", (grid_for(pairs, BLOCK), 1, 1), BLOCK, 0, &args)?;
            }
        }
        let (xq, _held) = match target {
            Some(t) => (t.ptr(), t.issued(dev)),
            None if quantize => act_quant(dev, FAMILY, x_c, n, d, ACT_BLOCK, form)?,
            None => (x_c, None),
        };
        // The tensor-core one-pair kernels' trailing arguments: the input's scales and the split.
        let fp4_extra = |codes: u64, rows: usize, width: usize, split: usize| {
            [Arg::P(codes + codes_scales_offset(rows, width) as u64), Arg::I(split as i32)]
        };
        let threads = if fp4_mma { (FP4_R1_WARPS * 32) as u32 } else { BLOCK };
        let staged_smem = |width: usize| {
            if fp4_mma {
                fp4_f16_smem(width)
            } else if single {
                (width * 4) as u32
            } else if tc {
                tc_stage_bytes(quantize)
            } else {
                0
            }
        };
        if pairs > 0 && inter > 0 {
            let args = [
                Arg::P(xq),
                Arg::P(w1),
                Arg::P(s1),
                Arg::P(w3),
                Arg::P(s3),
                Arg::P(wts + (r0 * k * 4) as u64),
                Arg::P(cp),
                Arg::P(lp),
                Arg::P(ap),
                e_i,
                l(n),
                k_i,
                l(d),
                l(inter),
                Arg::I(fmt),
                Arg::F(op.swiglu_limit),
                Arg::P(hp),
                Arg::P(dev.err_ptr),
            ];
            let args: Vec<Arg> = if fp4_mma {
                args.into_iter().chain(fp4_extra(xq, n, d, splits.0)).collect()
            } else {
                args.into_iter().chain(extra).collect()
            };
            launch(dev, FAMILY, up_k, (up_x as u32, used, tiles), threads, staged_smem(d), &args)?;
            if quantize {
                act_quant_into(dev, FAMILY, hp, hqp, pairs, inter, ACT_BLOCK, form)?;
            }
        }
        if pairs > 0 {
            let args = [
                Arg::P(hqp),
                Arg::P(w2),
                Arg::P(s2),
                Arg::P(cp),
                Arg::P(lp),
                Arg::P(ap),
                e_i,
                l(n),
                l(d),
                l(inter),
                Arg::I(fmt),
                Arg::P(yep),
                Arg::P(dev.err_ptr),
            ];
            let args: Vec<Arg> = if fp4_mma {
                args.into_iter().chain(fp4_extra(hqp, pairs, inter, splits.1)).collect()
            } else {
                args.into_iter().chain(extra).collect()
            };
            launch(dev, FAMILY, down_k, (down_x as u32, used, tiles), threads, staged_smem(inter), &args)?;
        }
        let args =
            [Arg::P(yep), Arg::P(op_), l(n), k_i, l(d), Arg::P(outs[0] + (r0 * d * 4) as u64), Arg::P(dev.err_ptr)];
        launch(dev, FAMILY, "moe_combine", (grid_for(n * d, BLOCK), 1, 1), BLOCK, 0, &args)?;
        r0 += n;
    }
    Ok(())
}
