//! Sparse attention and the window ring store (`kernels/attention.cu`), over an f32 or bf16 KV
//! cache (the `_bf16` kernels; with a bf16 cache the fresh `kv` rows are rounded to bf16 too).

use hal::ops::attention::CompressedKv;
use hal::ops::{SparseAttention, WindowStore};
use hal::{Error, Result};

use super::{
    cache_kernel, check_rows, grid_for, i, l, launch, row_check, smem, Arg, BLOCK, CHECK_INDICES, CHECK_NONE,
    CHECK_SEES, NO_ROWS_CHECK,
};
use crate::device::Dev;

const FAMILY: &str = "attention";
/// Heads per `sparse_attn` block (one warp each; fewer where shared memory is short).
const HEADS_PER_BLOCK: usize = 8;
/// Fewest keys a split of one (row, head)'s key set takes in `sparse_attn` (the default of
/// `Dev::attn_split_keys`).
pub(crate) const KEYS_PER_SPLIT: usize = 16;
/// Output elements per `sparse_attn_combine` block, one thread each (`COMBINE_COLS`).
pub(crate) const COMBINE_COLS: usize = 128;

/// Heads per `sparse_attn_tc_*` block (the mma tiles' M), keys per chunk, warps per block, and
/// bf16 terms per f32 operand (attention.cu `ATC_*`).
const TC_HEADS: usize = 16;
const TC_KEYS: usize = 64;
const TC_WARPS: usize = 4;
const TC_TERMS: usize = 3;

/// Dynamic shared memory of `sparse_attn_tc_<d>` (attention.cu `AtcSmem`): two chunks of keys,
/// q and the weights as bf16 terms, the warps' partial logits, the heads' softmax state, the
/// chunks' key flags and each warp's key addresses.
pub(crate) fn tc_smem_for(d: usize) -> usize {
    let bf16_elems = 2 * TC_KEYS * d + TC_TERMS * TC_HEADS * d + TC_TERMS * TC_HEADS * TC_KEYS;
    bf16_elems * 2
        + TC_WARPS * TC_HEADS * TC_KEYS * 4
        + TC_HEADS * (4 + 4 + 8)
        + 2 * TC_KEYS * 4
        + TC_WARPS * TC_KEYS * 8
}

/// The tensor-core kernel for this op, where it applies: a bf16 cache (the keys are the tiles'
/// bf16 operand as stored), head_dim 128, 256 or 512, 16-byte aligned rows (`ptrs`: q, kv, ring,
/// compressed entries, output), shared memory for [`tc_smem_for`], and `Dev::attn_mma`.
fn tc_kernel(dev: &Dev, op: &SparseAttention, ptrs: &[u64]) -> Option<&'static str> {
    if !dev.attn_mma || op.cache_dtype != hal::DType::BF16 || tc_smem_for(op.head_dim) > dev.smem_optin {
        return None;
    }
    if !ptrs.iter().all(|p| p % 16 == 0) {
        return None;
    }
    match op.head_dim {
        128 => Some("sparse_attn_tc_128"),
        256 => Some("sparse_attn_tc_256"),
        512 => Some("sparse_attn_tc_512"),
        _ => None,
    }
}

/// Dynamic shared memory of `sparse_attn` with `heads` heads per block: per head, q (d f32) and
/// the f64 accumulators.
pub(crate) fn smem_for(d: usize, heads: usize) -> usize {
    heads * d * (4 + 8)
}

/// [`WindowStore`]: row convention checked on the device, then the store (the last row of a
/// slot mapping to a ring entry wins, as rows in order would).
pub(crate) fn window_store(dev: &Dev, op: &WindowStore, ins: &[u64], outs: &[u64]) -> Result<()> {
    let name = "window_store";
    if op.window == 0 {
        return Err(Error::invalid(name, "window must be at least 1"));
    }
    check_rows(dev, FAMILY, name, ins[1], ins[2], op.rows, op.slots, CHECK_NONE, 0, 0, 0, 0)?;
    let n = op.rows * op.dim;
    if n == 0 {
        return Ok(());
    }
    let args = [
        Arg::P(ins[0]),
        Arg::P(ins[1]),
        Arg::P(ins[2]),
        Arg::P(outs[0]),
        l(op.rows),
        i(name, "slots", op.slots)?,
        l(op.window),
        l(op.dim),
        Arg::P(dev.err_ptr),
    ];
    let kernel = cache_kernel(op.cache_dtype, "window_store", "window_store_bf16");
    launch(dev, FAMILY, kernel, (grid_for(n, BLOCK), 1, 1), BLOCK, 0, &args)
}

/// [`SparseAttention`]: row convention and compressed-entry checks on the device, then one block
/// per (row, group of heads) and key split, and the combination of the splits.
pub(crate) fn sparse_attention(dev: &Dev, op: &SparseAttention, ins: &[u64], outs: &[u64]) -> Result<()> {
    let name = "sparse_attention";
    let (h, d) = (op.heads, op.head_dim);
    let (mode, ratio, cap, topk) = match op.compressed {
        CompressedKv::None => (0, 1, 0, 0),
        CompressedKv::All { ratio, capacity } => (1, ratio, capacity, 0),
        CompressedKv::Selected { ratio, capacity, topk } => (2, ratio.max(1), capacity, topk),
    };
    let (check, a, b) = match op.compressed {
        CompressedKv::None => (CHECK_NONE, 0, 0),
        CompressedKv::All { ratio, capacity } => (CHECK_SEES, ratio.max(1) as i64, capacity as i64),
        CompressedKv::Selected { capacity, .. } => (CHECK_INDICES, 0, capacity as i64),
    };
    let comp = ins.get(6).copied().unwrap_or(0);
    let idx = ins.get(7).copied().unwrap_or(0);
    // Host-side checks first: an op refused here launches nothing (no deferred error either).
    if op.window == 0 {
        return Err(Error::invalid(name, "window must be at least 1 (each row attends to itself)"));
    }
    if mode == 1 && ratio == 0 {
        return Err(Error::invalid(name, "compressed ratio must be > 0"));
    }
    // The row check runs beside the attention, as one more block of its launch (the kernel bounds
    // what it reads itself); with nothing to attend, as a kernel of its own.
    let row_check = row_check(dev, name, ins[4], ins[5], op.rows, op.slots, check, a, b, idx, topk)?;
    if h == 0 || d == 0 || op.rows == 0 {
        return row_check.map_or(Ok(()), |c| c.launch(dev, FAMILY));
    }
    let max_keys = op.window
        + match op.compressed {
            CompressedKv::None => 0,
            CompressedKv::All { capacity, .. } => capacity,
            CompressedKv::Selected { topk, .. } => topk,
        };
    let tc = tc_kernel(dev, op, &[ins[0], ins[1], ins[2], comp, outs[0]]);
    // Heads per block: TC_HEADS for the tensor-core tiles; else one warp each, as many as the
    // shared memory holds.
    let mut hg = if tc.is_some() { TC_HEADS } else { HEADS_PER_BLOCK.min(h) };
    while tc.is_none() && hg > 1 && smem_for(d, hg) > dev.smem_optin {
        hg -= 1;
    }
    let pairs = op.rows * h;
    let blocks =
        u32::try_from(op.rows * h.div_ceil(hg)).map_err(|_| Error::invalid(name, "rows × heads exceeds 2^32"))?;
    // Key splits so that few rows (decode) still fill the device, each split keeping at least
    // `Dev::attn_split_keys` keys (a chunk of TC_KEYS for the tiles, whose block fills an SM)
    // of the longest possible key set.
    let splits = match tc {
        Some(_) => dev.sms.div_ceil(blocks as usize).min(max_keys.div_ceil(TC_KEYS)),
        None => (4 * dev.sms).div_ceil(blocks as usize).min(max_keys.div_ceil(dev.attn_split_keys)),
    }
    .clamp(1, 65_535);
    let (parts, pm, pden, pacc) = if splits > 1 {
        let n = pairs * splits;
        let buf = dev.scratch(n * 4 + n * 8 + n * d * 8)?;
        let base = buf.ptr();
        // The sums first (at the buffer's alignment: the kernels store them as 16-byte vectors),
        // then the other doubles, then the f32 maxima.
        (Some(buf), base + (n * d * 8 + n * 8) as u64, base + (n * d * 8) as u64, base)
    } else {
        (None, 0, 0, 0)
    };
    let grid_x = blocks
        .checked_add(row_check.is_some() as u32)
        .ok_or_else(|| Error::invalid(name, "rows × heads exceeds 2^32"))?;
    // The two kernels take the same arguments, except that the warp-per-head one takes d at run
    // time (the tiles' d is their template's) and says whether it may keep q and its sums in
    // registers.
    let mut args =
        [ins[0], ins[1], ins[2], ins[3], ins[4], ins[5], comp, idx].into_iter().map(Arg::P).collect::<Vec<_>>();
    args.push(l(h));
    if tc.is_none() {
        args.push(l(d));
    }
    args.extend([
        i(name, "slots", op.slots)?,
        l(op.window),
        Arg::I(mode),
        l(ratio),
        l(cap),
        i(name, "topk", topk)?,
        Arg::F(op.softmax_scale),
        Arg::P(outs[0]),
        Arg::P(dev.err_ptr),
        i(name, "splits", splits)?,
        Arg::P(pm),
        Arg::P(pden),
        Arg::P(pacc),
    ]);
    let (kernel, block, shared) = match tc {
        Some(kernel) => (kernel, 32 * TC_WARPS, tc_smem_for(d)),
        None => {
            // d = 128, 256, 512 keep q and the sums in registers (no shared memory) where every
            // row is 16-byte aligned, for the kernel's vector loads and stores.
            let in_regs = matches!(d, 128 | 256 | 512)
                && [ins[0], ins[1], ins[2], comp, outs[0], pacc].iter().all(|p| p % 16 == 0);
            args.push(Arg::I(in_regs as i32));
            let kernel = cache_kernel(op.cache_dtype, "sparse_attn", "sparse_attn_bf16");
            (kernel, 32 * hg, if in_regs { 0 } else { smem_for(d, hg) })
        }
    };
    args.extend(row_check.as_ref().map_or(NO_ROWS_CHECK, |c| c.params()));
    launch(dev, FAMILY, kernel, (grid_x, splits as u32, 1), block as u32, smem(shared), &args)?;
    if let Some(c) = row_check {
        c.issued(dev);
    }
    if splits > 1 {
        let args = [
            Arg::P(ins[3]),
            Arg::P(ins[4]),
            Arg::P(ins[5]),
            l(h),
            l(d),
            i(name, "slots", op.slots)?,
            i(name, "splits", splits)?,
            Arg::P(pm),
            Arg::P(pden),
            Arg::P(pacc),
            Arg::P(outs[0]),
            Arg::P(dev.err_ptr),
        ];
        let pairs = u32::try_from(pairs).map_err(|_| Error::invalid(name, "rows × heads exceeds 2^32"))?;
        let cols = u32::try_from(d.div_ceil(COMBINE_COLS)).map_err(|_| Error::invalid(name, "head_dim too large"))?;
        launch(
            dev,
            FAMILY,
            "sparse_attn_combine",
            (pairs, cols, 1),
            COMBINE_COLS as u32,
            smem(splits.next_multiple_of(4) * 8),
            &args,
        )?;
    }
    drop(parts);
    Ok(())
}
