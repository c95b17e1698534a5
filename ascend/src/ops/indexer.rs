//! The lightning indexer's scoring and top-k ([`IndexerTopK`]), composed from generic aclnn
//! ops. Where CANN exports `aclnnLightningIndexer`, `fused.rs` uses it instead (bf16
//! numerics); this composition is kept and tested on both profiles.
//!
//! **Host round trip (labelled):** the visible count `n = (pos + 1) / ratio` of each row comes
//! from device `slots`/`positions`, which are copied to the host (one small D2H + stream
//! drain, shared with the HAL's row validation); the host then uploads a `[R, n_max]` additive
//! mask and a `[R, k']` validity table. The arithmetic stays on the device:
//! 1. `Kg = aclnnIndexSelect(keys [S, cap·D], 0, slots) → [R, cap, D]`, in the cache dtype.
//!    **Known cost:** each row gathers its slot's whole cache (O(R·cap·D)); the fused op reads
//!    in place. A bf16 cache is gathered as bf16, then `aclnnCast` widens (exactly) only the
//!    first `n_max` entries of each row, the ones scored, into f32.
//! 2. `dots = aclnnBatchMatMul(q [R, H, D], Kgᵀ [R, D, n_max])`, `aclnnRelu`,
//!    `I = aclnnBatchMatMul(aclnnMuls(w, weight_scale) [R, 1, H], relu) → [R, n_max]`.
//! 3. `aclnnAdd(I, mask)` (−∞ past each row's `n`), `aclnnTopk(k' = min(topk, n_max),
//!    largest, sorted)` → scores; indices `aclnnCast(i64 → f32)`, `aclnnMul(valid)`,
//!    `aclnnAdd(valid − 1)`, `aclnnCast(→ i32)` turn padded places into −1 (exact below 2²⁴).
//! 4. Columns past `k'` are pre-filled from the host (−1 / −∞) and the first `k'` columns are
//!    `aclnnInplaceCopy`'d into strided views of the outputs.
//!
//! Ties: the HAL wants lower `j` first; `aclnnTopk`'s tie order is undocumented (the emulator
//! is stable). The conformance harness forgives tied swaps.

use hal::backend::Support;
use hal::ops::IndexerTopK;
use hal::{DType, Error, Result};

use super::attention::{place_rows, upload};
use super::{need, Buf, Ctx, View};
use crate::sys::AclnnOps;

const F: DType = DType::F32;

/// IndexerTopK: the ops of the module docs (`Cast` also widens a bf16 key cache).
pub fn supports_indexer(ops: &AclnnOps) -> Support {
    need(&[
        ("IndexSelect", ops.IndexSelect.is_some()),
        ("BatchMatMul", ops.BatchMatMul.is_some()),
        ("Relu", ops.Relu.is_some()),
        ("Muls", ops.Muls.is_some()),
        ("Add", ops.Add.is_some()),
        ("Mul", ops.Mul.is_some()),
        ("Topk", ops.Topk.is_some()),
        ("Cast", ops.Cast.is_some()),
        ("InplaceCopy", ops.InplaceCopy.is_some()),
    ])
}

/// Each row's visible key count `⌊(pos + 1)/ratio⌋` (0 when `head_dim = 0`), checked against
/// the capacity. Shared with the fused path.
pub(crate) fn visible_counts(name: &str, op: &IndexerTopK, places: &[hal::ops::rows::RowPlace]) -> Result<Vec<usize>> {
    let mut counts = Vec::with_capacity(places.len());
    for (row, p) in places.iter().enumerate() {
        let n = (p.pos + 1) / op.ratio;
        if n > op.capacity {
            return Err(Error::invalid(
                format!("{name} row {row}"),
                format!("position {} sees {n} entries, capacity is {}", p.pos, op.capacity),
            ));
        }
        counts.push(if op.head_dim == 0 { 0 } else { n });
    }
    Ok(counts)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Op entry: [`IndexerTopK`].
pub fn run_indexer_topk(cx: &mut Ctx<'_>, op: &IndexerTopK, ins: &[Buf], outs: &[Buf]) -> Result<()> {
    let name = "indexer_topk";
    let (r, h, d, s, cap, k) = (op.rows, op.heads, op.head_dim, op.slots, op.capacity, op.topk);
    if r == 0 {
        return Ok(());
    }
    let slots = cx.read_i32(ins[3], r)?;
    let positions = cx.read_i32(ins[4], r)?;
    let places = place_rows(name, &slots, &positions, s)?;
    let counts = visible_counts(name, op, &places)?;
    if k == 0 {
        return Ok(());
    }
    let n_max = counts.iter().copied().max().unwrap_or(0);
    let kk = k.min(n_max);
    if kk < k {
        // Pre-fill the padding columns (and everything, when nothing is visible).
        let idx_fill: Vec<u8> = std::iter::repeat_n((-1i32).to_le_bytes(), r * k).flatten().collect();
        let score_fill = f32_bytes(&vec![f32::NEG_INFINITY; r * k]);
        cx.be.h2d_locked(cx.st, outs[0].ptr, outs[0].len, &idx_fill)?;
        cx.be.h2d_locked(cx.st, outs[1].ptr, outs[1].len, &score_fill)?;
    }
    if kk == 0 {
        return Ok(());
    }
    if h == 0 {
        // Every score is an empty sum (0): the first `n` entries, in index order.
        let idx: Vec<u8> = counts
            .iter()
            .flat_map(|&n| (0..k).map(move |t| if t < n { t as i32 } else { -1 }))
            .flat_map(i32::to_le_bytes)
            .collect();
        let sc: Vec<f32> =
            counts.iter().flat_map(|&n| (0..k).map(move |t| if t < n { 0.0 } else { f32::NEG_INFINITY })).collect();
        cx.be.h2d_locked(cx.st, outs[0].ptr, outs[0].len, &idx)?;
        return cx.be.h2d_locked(cx.st, outs[1].ptr, outs[1].len, &f32_bytes(&sc));
    }
    let mask: Vec<f32> =
        counts.iter().flat_map(|&n| (0..n_max).map(move |j| if j < n { 0.0 } else { f32::NEG_INFINITY })).collect();
    let valid: Vec<f32> = counts.iter().flat_map(|&n| (0..kk).map(move |t| if t < n { 1.0 } else { 0.0 })).collect();
    let validm1: Vec<f32> = valid.iter().map(|v| v - 1.0).collect();
    let slots_buf = upload(cx, &slots.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())?;
    let mask_buf = upload(cx, &f32_bytes(&mask))?;
    let valid_buf = upload(cx, &f32_bytes(&valid))?;
    let validm1_buf = upload(cx, &f32_bytes(&validm1))?;
    // 1. per-row key gather (in the cache dtype)
    let cd = op.cache_dtype;
    let kgb = cx.temp(&[r, cap, d], cd)?;
    let kg = View::of_temp(&kgb, cd, &[r, cap * d]);
    {
        let keys = View::new(ins[2], cd, &[s, cap * d]);
        let sl = View::of_temp(&slots_buf, DType::I32, &[r]);
        let (xt, it, ot) = (cx.tensor(&keys)?, cx.tensor(&sl)?, cx.tensor(&kg)?);
        let pair = cx.ops().IndexSelect;
        // SAFETY: descriptors outlive the launch; `ws`/`ex` are launch()'s out-pointers.
        cx.launch("IndexSelect", pair, |f, ws, ex| unsafe { f(xt.ptr(), 0, it.ptr(), ot.ptr(), ws, ex) })?;
    }
    // A bf16 cache: only the first n_max entries of each gathered row are scored, so only those
    // are widened (exactly) into an f32 [R, n_max·D].
    let (_kfb, keys, row_stride) = if cd == F {
        (None, kg, cap * d)
    } else {
        let kfb = cx.temp(&[r, n_max, d], F)?;
        let kf = View::of_temp(&kfb, F, &[r, n_max * d]);
        cx.cast(&kg.strided(&[r, n_max * d], &[cap * d, 1], 0), &kf)?;
        (Some(kfb), kf, n_max * d)
    };
    // 2. scores
    let db = cx.temp(&[r, h, n_max], F)?;
    let dots = View::of_temp(&db, F, &[r, h, n_max]);
    cx.batch_matmul(&View::new(ins[0], F, &[r, h, d]), &keys.strided(&[r, d, n_max], &[row_stride, 1, d], 0), &dots)?;
    let rb = cx.temp(&[r, h, n_max], F)?;
    let relu = View::of_temp(&rb, F, &[r, h, n_max]);
    {
        let (it, ot) = (cx.tensor(&dots)?, cx.tensor(&relu)?);
        let pair = cx.ops().Relu;
        // SAFETY: descriptors outlive the launch; `ws`/`ex` are launch()'s out-pointers.
        cx.launch("Relu", pair, |f, ws, ex| unsafe { f(it.ptr(), ot.ptr(), ws, ex) })?;
    }
    let wb = cx.temp(&[r, h], F)?;
    let ws = View::of_temp(&wb, F, &[r, 1, h]);
    cx.muls(&View::new(ins[1], F, &[r, 1, h]), op.weight_scale, &ws)?;
    let ib = cx.temp(&[r, n_max], F)?;
    let scores = View::of_temp(&ib, F, &[r, 1, n_max]);
    cx.batch_matmul(&ws, &relu, &scores)?;
    let mb = cx.temp(&[r, n_max], F)?;
    let masked = View::of_temp(&mb, F, &[r, n_max]);
    cx.add(&scores.reshape(&[r, n_max]), &View::of_temp(&mask_buf, F, &[r, n_max]), &masked, false)?;
    // 3. top-k
    let vb = cx.temp(&[r, kk], F)?;
    let ixb = cx.temp(&[r, kk], DType::I64)?;
    let (vals, idx) = (View::of_temp(&vb, F, &[r, kk]), View::of_temp(&ixb, DType::I64, &[r, kk]));
    {
        let (xt, vt, it) = (cx.tensor(&masked)?, cx.tensor(&vals)?, cx.tensor(&idx)?);
        let kk = kk as i64;
        let pair = cx.ops().Topk;
        // SAFETY: descriptors outlive the launch; `ws`/`ex` are launch()'s out-pointers.
        cx.launch("Topk", pair, |f, ws, ex| unsafe { f(xt.ptr(), kk, -1, true, true, vt.ptr(), it.ptr(), ws, ex) })?;
    }
    let shape = [r, kk];
    let fb = cx.temp(&shape, F)?;
    let fidx = View::of_temp(&fb, F, &shape);
    cx.cast(&idx, &fidx)?;
    let gb = cx.temp(&shape, F)?;
    let g = View::of_temp(&gb, F, &shape);
    cx.mul(&fidx, &View::of_temp(&valid_buf, F, &shape), &g)?;
    cx.add(&g, &View::of_temp(&validm1_buf, F, &shape), &fidx, false)?;
    let i32b = cx.temp(&shape, DType::I32)?;
    let idx32 = View::of_temp(&i32b, DType::I32, &shape);
    cx.cast(&fidx, &idx32)?;
    // 4. into the outputs
    let out_i = View::new(outs[0], DType::I32, &[r, k]).strided(&shape, &[k, 1], 0);
    let out_s = View::new(outs[1], F, &[r, k]).strided(&shape, &[k, 1], 0);
    cx.copy(&out_i, &idx32)?;
    cx.copy(&out_s, &vals)
}
