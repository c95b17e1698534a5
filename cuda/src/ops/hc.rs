//! Manifold-constrained hyper-connections (`kernels/hc.cu`).

use hal::ops::{hc_weights_at, HcHead, HcPost, HcPre};
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

/// Most shared memory (bytes) that `hc_post_mix_partial` keeps a split's streams in; a wider
/// split runs `hc_post` first.
const POST_MIX_MAX_SMEM: usize = 32 * 1024;

/// An mHC op's streams on the device (`HcPre` step 0): ready at `x`, or HcPost's inputs
/// (`f`, `x_prev`, `post`, `comb`) and the output `x` it writes.
enum Streams {
    Ready(u64),
    AfterPost { post_in: [u64; 4], x: u64 },
}

impl Streams {
    /// The streams of an op whose inputs and outputs are `ins` / `outs`, with the rest of each.
    fn of<'a>(after_post: bool, ins: &'a [u64], outs: &'a [u64]) -> (Streams, &'a [u64], &'a [u64]) {
        let rest = &ins[hc_weights_at(after_post)..];
        if after_post {
            (Streams::AfterPost { post_in: [ins[0], ins[1], ins[2], ins[3]], x: outs[0] }, rest, &outs[1..])
        } else {
            (Streams::Ready(ins[0]), rest, outs)
        }
    }

    /// Where the streams are once formed.
    fn x(&self) -> u64 {
        match self {
            Streams::Ready(x) | Streams::AfterPost { x, .. } => *x,
        }
    }
}

/// The mixing partial sums of `rows` rows of `mult` streams of width `d` against `nm` mixing
/// rows (`fnw`), forming the streams first where they come after an HcPost: returns the
/// scratch holding the sums and its split count.
fn mix_partials(
    dev: &Dev,
    op: &str,
    streams: &Streams,
    fnw: u64,
    (rows, mult, d): (usize, usize, usize),
    nm: usize,
) -> Result<(crate::device::DevBuf, usize)> {
    let n = mult * d;
    // Many rows: tiles of DOT_ROWS rows share each loaded mixing weight (`hc_mix_tiled`; the
    // mixes and Σ x² take one lane each of 32, so with few mixes most lanes idle: at 4096 rows
    // the HcPre op (24 mixes) went from 1.51 to 0.84 ms, HcHead (4) from 0.64 to 0.79 ms). Few
    // rows or few mixes: a block per row and split.
    let tiled = rows >= DOT_ROWS && (8..32).contains(&nm);
    let row_blocks = if tiled { rows.div_ceil(DOT_ROWS) } else { rows };
    let s = splits(dev, row_blocks, n);
    let part = dev.scratch(rows * s * (nm + 1) * 8)?;
    let (nm_i, s_i, pp) = (i(op, "mixes", nm)?, i(op, "splits", s)?, Arg::P(part.ptr()));
    let split_bytes = n.div_ceil(s) * 4;
    if let Streams::AfterPost { post_in: [f, x_prev, post, comb], x } = *streams {
        if !tiled && split_bytes <= POST_MIX_MAX_SMEM {
            let args = [
                Arg::P(f),
                Arg::P(x_prev),
                Arg::P(post),
                Arg::P(comb),
                Arg::P(x),
                Arg::P(fnw),
                l(n),
                i(op, "mult", mult)?,
                nm_i,
                s_i,
                pp,
            ];
            launch(
                dev,
                FAMILY,
                "hc_post_mix_partial",
                (rows as u32, s as u32, 1),
                MIX_BLOCK,
                smem(split_bytes),
                &args,
            )?;
            return Ok((part, s));
        }
        post_kernel(dev, [f, x_prev, post, comb], x, (rows, mult, d))?;
    }
    let x = streams.x();
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
    let (streams, ins, outs) = Streams::of(op.after_post, ins, outs);
    let (part, s) = mix_partials(dev, name, &streams, ins[0], (rows, m, d), nm)?;
    let (shared, stashed) = finish_smem(nm + 2 * m * m + m, nm + 1, d);
    let args = [
        Arg::P(part.ptr()),
        i(name, "splits", s)?,
        Arg::P(ins[1]),
        Arg::P(ins[2]),
        i(name, "mult", m)?,
        l(m * d),
        i(name, "sinkhorn_iters", op.sinkhorn_iters)?,
        Arg::F(op.hc_eps),
        Arg::F(op.norm_eps),
        Arg::P(streams.x()),
        Arg::P(ins[3]),
        Arg::I(stashed as i32),
        Arg::P(outs[0]),
        Arg::P(outs[1]),
        Arg::P(outs[2]),
    ];
    launch(dev, FAMILY, "hc_pre_finish", (rows as u32, 1, 1), FINISH_BLOCK, shared, &args)
}

/// [`HcPost`]: elementwise, f64 sum per output.
pub(crate) fn hc_post(dev: &Dev, op: &HcPost, ins: &[u64], outs: &[u64]) -> Result<()> {
    post_kernel(dev, [ins[0], ins[1], ins[2], ins[3]], outs[0], (op.rows, op.mult, op.dim))
}

/// `hc_post` of `f`, `x`, `post`, `comb` into `out`.
fn post_kernel(
    dev: &Dev,
    [f, x, post, comb]: [u64; 4],
    out: u64,
    (rows, mult, dim): (usize, usize, usize),
) -> Result<()> {
    let n = rows * mult * dim;
    if n == 0 {
        return Ok(());
    }
    let args =
        [Arg::P(f), Arg::P(x), Arg::P(post), Arg::P(comb), Arg::P(out), l(rows), i("hc_post", "mult", mult)?, l(dim)];
    launch(dev, FAMILY, "hc_post", (grid_for(n, BLOCK), 1, 1), BLOCK, 0, &args)
}

/// [`HcHead`]: mixing partial sums, then per row the weights and the merged, normed streams.
pub(crate) fn hc_head(dev: &Dev, op: &HcHead, ins: &[u64], outs: &[u64]) -> Result<()> {
    let name = "hc_head";
    let (m, d, rows) = (op.mult, op.dim, op.rows);
    if m == 0 || d == 0 || rows == 0 {
        return Ok(());
    }
    let (streams, ins, outs) = Streams::of(op.after_post, ins, outs);
    let (part, s) = mix_partials(dev, name, &streams, ins[0], (rows, m, d), m)?;
    let (shared, stashed) = finish_smem(2 * m, m + 1, d);
    let args = [
        Arg::P(part.ptr()),
        i(name, "splits", s)?,
        Arg::P(ins[1]),
        Arg::P(ins[2]),
        i(name, "mult", m)?,
        l(m * d),
        Arg::F(op.hc_eps),
        Arg::F(op.norm_eps),
        Arg::P(streams.x()),
        Arg::P(ins[3]),
        Arg::I(stashed as i32),
        Arg::P(outs[0]),
    ];
    launch(dev, FAMILY, "hc_head_finish", (rows as u32, 1, 1), FINISH_BLOCK, shared, &args)
}
