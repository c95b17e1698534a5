//! Manifold-constrained hyper-connections (`kernels/hc.cu`).

use hal::ops::{HcHead, HcPost, HcPre};
use hal::Result;

use super::{grid_for, i, l, launch, smem, Arg, BLOCK, DOT_ROWS};
use crate::device::Dev;

const FAMILY: &str = "hc";
/// Threads per block of the mixing partial sums (one warp per mixing logit at a time).
const MIX_BLOCK: u32 = 256;
/// Threads per row of the finishing kernels: a warp per split sum, then (Sinkhorn) a thread per
/// mixing-matrix element, and all (HcPre: all but the Sinkhorn warp) for the merge. At least 64.
const FINISH_BLOCK: u32 = 256;
const _: () = assert!(FINISH_BLOCK >= 64, "hc_pre_finish merges in all warps but the first");

/// Widest row (f32 values) whose merged values wait in shared memory between the finishing
/// kernels' merge and norm passes (V4-Pro's 7168 fits); a wider row waits in the output itself.
const STASH_MAX: usize = 8192;

/// Dynamic shared memory of a finishing kernel for rows of width `d`: `floats` f32 (padded to 8
/// bytes), the `doubles` f64 split sums, then (from a 16-byte boundary) the merge stash when `d`
/// fits. Returns the bytes and whether the stash is there.
fn finish_smem(floats: usize, doubles: usize, d: usize) -> (u32, bool) {
    let head = (floats.next_multiple_of(2) + 2 * doubles).next_multiple_of(4);
    let stashed = d <= STASH_MAX;
    (smem((head + if stashed { d } else { 0 }) * 4), stashed)
}
/// Fewest columns a split of the mixing sums takes.
const MIN_SPLIT_COLS: usize = 128;

/// Column splits of a row's mixing sums, for `row_blocks` blocks of rows: enough blocks for about
/// 4 per SM, at least `MIN_SPLIT_COLS` columns each (one split once the rows alone fill the
/// device).
fn splits(dev: &Dev, row_blocks: usize, n: usize) -> usize {
    (4 * dev.sms).div_ceil(row_blocks.max(1)).min(n.div_ceil(MIN_SPLIT_COLS)).clamp(1, 65_535)
}

/// The mixing partial sums of `rows` rows of width `n` against `nm` mixing rows (`fnw`):
/// returns the scratch holding them and its split count.
fn mix_partials(dev: &Dev, op: &str, x: u64, fnw: u64, rows: usize, n: usize, nm: usize)
    -> Result<(crate::device::DevBuf, usize)> {
    // Many rows: tiles of DOT_ROWS rows share each loaded mixing weight (`hc_mix_tiled`; the
    // mixes and Σ x² take one lane each of 32, so with few mixes most lanes idle: at 4096 rows
    // the HcPre op (24 mixes) went from 1.51 to 0.84 ms, HcHead (4) from 0.64 to 0.79 ms). Few
    // rows or few mixes: a block per row and split.
    let tiled = rows >= DOT_ROWS && (8..32).contains(&nm);
    let row_blocks = if tiled { rows.div_ceil(DOT_ROWS) } else { rows };
    let s = splits(dev, row_blocks, n);
    let part = dev.scratch(rows * s * (nm + 1) * 8)?;
    let (nm_i, s_i, pp) = (i(op, "mixes", nm)?, i(op, "splits", s)?, Arg::P(part.ptr()));
    if tiled {
        let args = [Arg::P(x), Arg::P(fnw), l(rows), l(n), nm_i, s_i, pp];
        launch(dev, FAMILY, "hc_mix_tiled", (row_blocks as u32, s as u32, 1), BLOCK, 0, &args)?;
    } else {
        let args = [Arg::P(x), Arg::P(fnw), l(n), nm_i, s_i, pp];
        launch(dev, FAMILY, "hc_mix_partial", (rows as u32, s as u32, 1), MIX_BLOCK, 0, &args)?;
    }
    Ok((part, s))
}

/// [`HcPre`]: mixing partial sums over column splits, then per row the weights (Sinkhorn) and
/// the merged, normed streams.
pub(crate) fn hc_pre(dev: &Dev, op: &HcPre, ins: &[u64], outs: &[u64]) -> Result<()> {
    let name = "hc_pre";
    let (m, d, rows) = (op.mult, op.dim, op.rows);
    if m == 0 || d == 0 || rows == 0 {
        return Ok(());
    }
    let nm = op.mix_width();
    let (part, s) = mix_partials(dev, name, ins[0], ins[1], rows, m * d, nm)?;
    let (shared, stashed) = finish_smem(nm + 2 * m * m + m, nm + 1, d);
    let args = [
        Arg::P(part.ptr()),
        i(name, "splits", s)?,
        Arg::P(ins[2]),
        Arg::P(ins[3]),
        i(name, "mult", m)?,
        l(m * d),
        i(name, "sinkhorn_iters", op.sinkhorn_iters)?,
        Arg::F(op.hc_eps),
        Arg::F(op.norm_eps),
        Arg::P(ins[0]),
        Arg::P(ins[4]),
        Arg::I(stashed as i32),
        Arg::P(outs[0]),
        Arg::P(outs[1]),
        Arg::P(outs[2]),
    ];
    launch(dev, FAMILY, "hc_pre_finish", (rows as u32, 1, 1), FINISH_BLOCK, shared, &args)
}

/// [`HcPost`]: elementwise, f64 sum per output.
pub(crate) fn hc_post(dev: &Dev, op: &HcPost, ins: &[u64], outs: &[u64]) -> Result<()> {
    let n = op.rows * op.mult * op.dim;
    if n == 0 {
        return Ok(());
    }
    let args = [
        Arg::P(ins[0]),
        Arg::P(ins[1]),
        Arg::P(ins[2]),
        Arg::P(ins[3]),
        Arg::P(outs[0]),
        l(op.rows),
        i("hc_post", "mult", op.mult)?,
        l(op.dim),
    ];
    launch(dev, FAMILY, "hc_post", (grid_for(n, BLOCK), 1, 1), BLOCK, 0, &args)
}

/// [`HcHead`]: mixing partial sums, then per row the weights and the merged, normed streams.
pub(crate) fn hc_head(dev: &Dev, op: &HcHead, ins: &[u64], outs: &[u64]) -> Result<()> {
    let name = "hc_head";
    let (m, d, rows) = (op.mult, op.dim, op.rows);
    if m == 0 || d == 0 || rows == 0 {
        return Ok(());
    }
    let (part, s) = mix_partials(dev, name, ins[0], ins[1], rows, m * d, m)?;
    let (shared, stashed) = finish_smem(2 * m, m + 1, d);
    let args = [
        Arg::P(part.ptr()),
        i(name, "splits", s)?,
        Arg::P(ins[2]),
        Arg::P(ins[3]),
        i(name, "mult", m)?,
        l(m * d),
        Arg::F(op.hc_eps),
        Arg::F(op.norm_eps),
        Arg::P(ins[0]),
        Arg::P(ins[4]),
        Arg::I(stashed as i32),
        Arg::P(outs[0]),
    ];
    launch(dev, FAMILY, "hc_head_finish", (rows as u32, 1, 1), FINISH_BLOCK, shared, &args)
}
