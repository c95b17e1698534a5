//! The lightning indexer's scores and top-k (`kernels/indexer.cu`). The keys (the indexer
//! compressor's cache) are f32 or bf16: each scoring kernel has a `_bf16` twin.

use hal::ops::IndexerTopK;
use hal::{Error, Result};

use super::{cache_kernel, grid_for, i, l, launch, row_check, smem, Arg, BLOCK, CHECK_SEES, NO_ROWS_CHECK};
use crate::device::Dev;

const FAMILY: &str = "indexer";
/// Bytes of the per-call score scratch beyond which the rows are processed in chunks.
const SCORE_SCRATCH: usize = 256 << 20;

/// Dynamic shared memory of `topk_rows`: a power of two ≥ min(topk, capacity) of u64 keys.
pub(crate) fn smem_for(x: &IndexerTopK) -> usize {
    x.topk.min(x.capacity).max(1).next_power_of_two() * 8
}

/// Keys per block tile and heads per thread of `index_scores_t` (`IS_KEYS`,
/// `IS_HEADS_PER_THREAD` in indexer.cu): its `BLOCK` threads are 32 keys × 8 groups of 8 heads.
pub(crate) const IS_KEYS: usize = 32;
pub(crate) const IS_HEADS_PER_THREAD: usize = 8;

/// Dynamic shared memory of `index_scores_t`: the tile's head-group sums `[IS_KEYS][8]` f64,
/// the 64 head weights f32, q transposed to `[head_dim][64]` f32.
fn scores_t_smem(op: &IndexerTopK) -> usize {
    IS_KEYS * (64 / IS_HEADS_PER_THREAD) * 8 + (64 + op.head_dim * 64) * 4
}

/// Whether `index_scores_t` (tiles of 32 keys, all heads in 8 groups; V4: 64 heads of 128)
/// takes the scores: at most 64 heads, key rows of whole groups of 4 (one float4 of f32 keys,
/// 8 bytes of bf16 ones), q (transposed) and the dots in shared memory; the caller also
/// needs q 16-byte aligned (it is read as float4).
fn scores_by_key(dev: &Dev, op: &IndexerTopK) -> bool {
    op.heads <= 64 && op.head_dim.is_multiple_of(4) && op.head_dim > 0 && scores_t_smem(op) <= dev.smem_optin
}

/// Scores per block in the first stage of the top-k of long rows (at least 8·k); rows of at
/// least two segments take the two-stage path (`topk_partial` + `topk_merge`).
const TOPK_SEGMENT: usize = 8192;

/// Largest capacity whose rows take `topk_rank` (`RANK_MAX` in indexer.cu), entries per block
/// of it (`RANK_BLOCK`).
const RANK_MAX: usize = 4096;
const RANK_BLOCK: usize = 128;

/// Static shared memory of `topk_rows` (per-warp histograms, counters, scan totals), on top of
/// [`smem_for`].
pub(crate) const TOPK_STATIC_SMEM: usize = (32 * 256 + 4 + 32) * 4 + 16;

/// [`IndexerTopK`]: checks on the device, then per chunk of rows the scores of every visible
/// entry into a scratch `[rows, capacity]` and the per-row top-k.
pub(crate) fn indexer_topk(dev: &Dev, op: &IndexerTopK, ins: &[u64], outs: &[u64]) -> Result<()> {
    let name = "indexer_topk";
    if op.ratio == 0 {
        return Err(Error::invalid(name, "ratio must be > 0"));
    }
    let (q, w, keys, slots, positions) = (ins[0], ins[1], ins[2], ins[3], ins[4]);
    let (cap, k) = (op.capacity, op.topk);
    let row_check =
        row_check(dev, name, slots, positions, op.rows, op.slots, CHECK_SEES, op.ratio as i64, cap as i64, 0, 0)?;
    let chunk = (SCORE_SCRATCH / (cap.max(1) * 4)).clamp(1, op.rows.max(1)).min(65_535);
    let seg = TOPK_SEGMENT.max(8 * k);
    // One chunk whose top-k is topk_rows (a decode step): the row check runs beside it, as one
    // more block of its launch (the score and top-k kernels bound what they read themselves);
    // else first, as a kernel of its own.
    let mut beside = None;
    match row_check {
        Some(c) if k > 0 && chunk >= op.rows && cap < 2 * seg => beside = Some(c),
        Some(c) => c.launch(dev, FAMILY)?,
        None => {}
    }
    if k == 0 || op.rows == 0 {
        return Ok(());
    }
    let k_arg = i(name, "topk", k)?;
    let ns = i(name, "slots", op.slots)?;
    let scores = dev.scratch(chunk * cap * 4)?;
    let sp = scores.ptr();
    let mut r0 = 0;
    while r0 < op.rows {
        let nrows = chunk.min(op.rows - r0);
        let warps = nrows * cap;
        let args = [
            Arg::P(q),
            Arg::P(w),
            Arg::P(keys),
            Arg::P(slots),
            Arg::P(positions),
            l(r0),
            l(nrows),
            l(op.heads),
            l(op.head_dim),
            ns,
            l(cap),
            l(op.ratio),
            Arg::F(op.weight_scale),
            Arg::P(sp),
            Arg::P(dev.err_ptr),
            // index_scores_t: one key per thread, all heads, from this many visible keys on.
            l(dev.index_wide_from),
        ];
        if warps > 0 {
            if scores_by_key(dev, op) && q % 16 == 0 {
                // Blocks stride over the tiles (of IS_KEYS keys, or of BLOCK where a row is
                // wide): a long row's blocks stage q once each.
                let tiles = cap.div_ceil(IS_KEYS).min(dev.sms * 8);
                let grid = (tiles as u32, nrows as u32, 1);
                let kernel = cache_kernel(op.cache_dtype, "index_scores_t", "index_scores_t_bf16");
                launch(dev, FAMILY, kernel, grid, BLOCK, smem(scores_t_smem(op)), &args)?;
            } else {
                let kernel = cache_kernel(op.cache_dtype, "index_scores", "index_scores_bf16");
                launch(dev, FAMILY, kernel, (grid_for(warps * 32, BLOCK), 1, 1), BLOCK, 0, &args)?;
            }
        }
        // The top-k kernels' row arguments: scores and what precedes them, the row convention,
        // then what follows it.
        let row_args = |head: &[Arg], tail: &[Arg]| -> Vec<Arg> {
            let rows = [Arg::P(slots), Arg::P(positions), l(r0), l(cap), l(op.ratio), ns, k_arg];
            head.iter().chain(&rows).chain(tail).copied().collect()
        };
        let outputs = [Arg::P(outs[0]), Arg::P(outs[1]), Arg::P(dev.err_ptr)];
        if cap >= 2 * seg {
            // Long rows: the top-k of each segment in parallel, then of their candidates.
            let segments = cap.div_ceil(seg);
            let cand = dev.scratch(nrows * segments * k * 8)?;
            let cp = cand.ptr();
            let args = row_args(&[Arg::P(sp)], &[l(seg), Arg::P(cp), Arg::P(dev.err_ptr)]);
            launch(dev, FAMILY, "topk_partial", (nrows as u32, segments as u32, 1), 1024, smem(smem_for(op)), &args)?;
            let args = row_args(&[Arg::P(sp), Arg::P(cp), i(name, "segments", segments)?], &outputs);
            launch(dev, FAMILY, "topk_merge", (nrows as u32, 1, 1), 1024, smem(smem_for(op)), &args)?;
        } else {
            let check = beside.take();
            let mut args = row_args(&[Arg::P(sp)], &outputs);
            args.extend(check.as_ref().map_or(NO_ROWS_CHECK, |c| c.params()));
            if cap <= RANK_MAX && dev.topk_rank {
                // Each entry's rank is its place: blocks of RANK_BLOCK entries per row.
                let tiles = cap.div_ceil(RANK_BLOCK) as u32 + check.is_some() as u32;
                launch(dev, FAMILY, "topk_rank", (tiles, nrows as u32, 1), RANK_BLOCK as u32, 0, &args)?;
            } else {
                let blocks = nrows as u32 + check.is_some() as u32;
                launch(dev, FAMILY, "topk_rows", (blocks, 1, 1), 1024, smem(smem_for(op)), &args)?;
            }
            if let Some(c) = check {
                c.issued(dev);
            }
        }
        r0 += nrows;
    }
    Ok(())
}
