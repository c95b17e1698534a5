//! Sparse attention and the window ring store, composed from generic aclnn ops with a
//! host-side *plan* (which key rows each query row sees). Where CANN exports the fused
//! `aclnnSparseFlashMla` (the V4 attention, CANN ≥ 9.1) and the shape fits it, `fused.rs` uses
//! that instead; this composition is kept and tested on both profiles.
//!
//! **Host round trip (labelled slow path):** the key set of a row depends on its slot and
//! position (and, for CSA, on the indexer's top-k list), i.e. on device data. Generic aclnn
//! ops cannot build a per-row, variable-length gather list, so `slots`, `positions` (and
//! `indices`) are copied to the host (one small D2H + stream drain — the same one the HAL's
//! row validation already needs), the plan is computed there, and two small tables go back
//! (gather indices, additive mask). All arithmetic stays on the device.
//!
//! [`SparseAttention`] (R rows, H heads, head dim d, L = window + max compressed keys):
//! 1. gather source `src [S·W + R + 1 + S·C, d]` in the cache dtype: `aclnnInplaceCopy` of
//!    `ring`, `kv`, a zero row (`aclrtMemsetAsync`) and `compressed` into one temporary. With
//!    a bf16 cache, `kv` goes in through `aclnnCast` (nearest even — every key is then its
//!    bf16 value, fresh rows included, as the HAL requires). **Known cost:** the caches are
//!    copied once per call (O(cache), not O(keys)); the fused op removes this.
//! 2. `K = aclnnIndexSelect(src, 0, gidx [R·L]) → [R, L, d]` (padding → the zero row); a bf16
//!    `K` is widened by `aclnnCast` (exact; only the R·L gathered keys).
//! 3. `ℓ = aclnnBatchMatMul(q [R, H, d], Kᵀ [R, d, L])`, `aclnnMuls(scale)`,
//!    `aclnnAdd(·, mask [R, 1, L])` (0 or −∞).
//! 4. `Z [R, H, L+1]`: `aclnnInplaceCopy` of the masked logits into `Z[:, :, :L]` and of
//!    `sink [1, H, 1]` (broadcast, unscaled) into `Z[:, :, L]`; `P = aclnnSoftmax(Z, −1)` —
//!    the sink column is the `e^{sink−m}` term of the denominator.
//! 5. `o = aclnnBatchMatMul(P[:, :, :L], K)` (the sink's value vector is zero).
//!
//! [`WindowStore`]: destination rows `slot·W + pos mod W`, deduplicated on the host (the last
//! row wins, as in issue order), then `aclnnIndexSelect(kv, rows)` (skipped when every row is
//! kept), for a bf16 ring `aclnnCast` of those `n` rows (nearest even), and
//! `aclnnInplaceScatter(ring [S·W, d], 0, dest expanded to [n, d], rows)` — see
//! `scatter_rows` for why not `aclnnInplaceIndexCopy`.

use hal::backend::Support;
use hal::ops::attention::CompressedKv;
use hal::ops::{SparseAttention, WindowStore};
use hal::{DType, Error, Result};

use super::{need, Buf, Ctx, View};
use crate::runtime::DeviceBuffer;
use crate::sys::AclnnOps;

const F: DType = DType::F32;

use hal::dtype::i32_bytes;
pub(crate) use hal::ops::rows::place_rows;

/// Uploads host bytes into a fresh device temporary (queued; ordered before later launches).
pub(crate) fn upload(cx: &mut Ctx<'_>, bytes: &[u8]) -> Result<DeviceBuffer> {
    let buf = cx.be.pool.alloc(bytes.len().max(1))?;
    cx.be.h2d_locked(cx.st, buf.ptr(), buf.capacity(), bytes)?;
    Ok(buf)
}

/// WindowStore: IndexSelect + InplaceScatter (and `Cast` for a bf16 ring, `ops::supports`).
pub fn supports_window_store(ops: &AclnnOps) -> Support {
    need(&[("IndexSelect", ops.IndexSelect.is_some()), ("InplaceScatter", ops.InplaceScatter.is_some())])
}

/// Op entry: [`WindowStore`].
pub fn run_window_store(cx: &mut Ctx<'_>, op: &WindowStore, ins: &[Buf], outs: &[Buf]) -> Result<()> {
    let (r, s, w, d) = (op.rows, op.slots, op.window, op.dim);
    if r == 0 {
        return Ok(());
    }
    let slots = cx.read_i32(ins[1], r)?;
    let positions = cx.read_i32(ins[2], r)?;
    let places = place_rows("window_store", &slots, &positions, s)?;
    if d == 0 || w == 0 {
        return Ok(());
    }
    // Last writer wins: keep, per destination, the last row that targets it.
    let mut last = std::collections::HashMap::new();
    for (row, p) in places.iter().enumerate() {
        last.insert(p.slot * w + p.pos % w, row);
    }
    let mut pairs: Vec<(usize, usize)> = last.into_iter().map(|(dst, row)| (row, dst)).collect();
    pairs.sort_unstable();
    let n = pairs.len();
    let dest: Vec<usize> = pairs.iter().map(|&(_, dst)| dst).collect();
    let kv = View::new(ins[0], F, &[r, d]);
    let (_src_buf, src) = if n == r {
        (None, kv)
    } else {
        let rows: Vec<i32> = pairs.iter().map(|&(row, _)| row as i32).collect();
        let rows_buf = upload(cx, &i32_bytes(&rows))?;
        let tb = cx.temp(&[n, d], F)?;
        let t = View::of_temp(&tb, F, &[n, d]);
        index_select(cx, &kv, &View::of_temp(&rows_buf, DType::I32, &[n]), &t)?;
        (Some(tb), t)
    };
    // A bf16 ring stores the kept rows' nearest-even bf16 (only those n rows are cast).
    let cd = op.cache_dtype;
    let (_cast_buf, src) = cx.to_cache_dtype(&src, cd, &[n, d])?;
    scatter_rows(cx, &View::new(outs[0], cd, &[s * w, d]), &dest, &src, d)
}

/// `dst[rows[i], :] = src[i, :]` for a row-major `dst [N, w]` and `src [n, w]`, through
/// `aclnnInplaceScatter(dim 0, reduce = replace)` with the index expanded on the host to
/// `[n, w]` (`aclnnInplaceIndexCopy` would take the `[n]` list directly, but the ops-nn docs
/// list it for A2/A3 only, not the 950). Destinations must be distinct.
pub(crate) fn scatter_rows(cx: &mut Ctx<'_>, dst: &View, rows: &[usize], src: &View, w: usize) -> Result<()> {
    let n = rows.len();
    if n == 0 || w == 0 {
        return Ok(());
    }
    let idx: Vec<u8> = rows.iter().flat_map(|&r| std::iter::repeat_n((r as i32).to_le_bytes(), w)).flatten().collect();
    let ib = upload(cx, &idx)?;
    let iv = View::of_temp(&ib, DType::I32, &[n, w]);
    let (dt, it, st) = (cx.tensor(dst)?, cx.tensor(&iv)?, cx.tensor(src)?);
    let pair = cx.ops().InplaceScatter;
    // SAFETY: descriptors outlive the launch; `ws`/`ex` are launch()'s out-pointers.
    cx.launch("InplaceScatter", pair, |f, ws, ex| unsafe { f(dt.ptr(), 0, it.ptr(), st.ptr(), 0, ws, ex) })
}

/// `out = x.index_select(0, idx)`.
fn index_select(cx: &mut Ctx<'_>, x: &View, idx: &View, out: &View) -> Result<()> {
    index_select_dim(cx, x, 0, idx, out)
}

/// `out = x.index_select(dim, idx)`.
pub(crate) fn index_select_dim(cx: &mut Ctx<'_>, x: &View, dim: i64, idx: &View, out: &View) -> Result<()> {
    let (xt, it, ot) = (cx.tensor(x)?, cx.tensor(idx)?, cx.tensor(out)?);
    let pair = cx.ops().IndexSelect;
    // SAFETY: descriptors outlive the launch; `ws`/`ex` are launch()'s out-pointers.
    cx.launch("IndexSelect", pair, |f, ws, ex| unsafe { f(xt.ptr(), dim, it.ptr(), ot.ptr(), ws, ex) })
}

/// The window key rows of a row placed at `p`, oldest first, numbered in a source that holds
/// the ring (`[0, S·W)`, slot-major) followed by this call's `kv` rows from `kv0`: positions
/// from the row's own run come from `kv`, earlier ones from the ring.
pub(crate) fn window_keys(p: &hal::ops::rows::RowPlace, w: usize, kv0: usize) -> impl Iterator<Item = i32> + '_ {
    let first = if w == 0 { p.pos + 1 } else { p.pos.saturating_sub(w - 1) };
    (first..=p.pos)
        .map(move |t| if t >= p.run_pos { kv0 + p.run_row + (t - p.run_pos) } else { p.slot * w + t % w } as i32)
}

/// HCA: how many compressed entries the row at `p` sees, `⌊(pos + 1)/ratio⌋`, checked against
/// the cache capacity.
pub(crate) fn visible_entries(
    name: &str,
    row: usize,
    p: &hal::ops::rows::RowPlace,
    ratio: usize,
    capacity: usize,
) -> Result<usize> {
    let n = (p.pos + 1) / ratio;
    if n > capacity {
        return Err(Error::invalid(
            format!("{name} row {row}"),
            format!("position {} sees {n} compressed entries, capacity is {capacity}", p.pos),
        ));
    }
    Ok(n)
}

/// SparseAttention: the ops of the module docs (and `Cast` for a bf16 cache, `ops::supports`).
pub fn supports_sparse_attention(ops: &AclnnOps) -> Support {
    need(&[
        ("InplaceCopy", ops.InplaceCopy.is_some()),
        ("IndexSelect", ops.IndexSelect.is_some()),
        ("BatchMatMul", ops.BatchMatMul.is_some()),
        ("Muls", ops.Muls.is_some()),
        ("Add", ops.Add.is_some()),
        ("Softmax", ops.Softmax.is_some()),
    ])
}

/// Op entry: [`SparseAttention`].
pub fn run_sparse_attention(cx: &mut Ctx<'_>, op: &SparseAttention, ins: &[Buf], outs: &[Buf]) -> Result<()> {
    let name = "sparse_attention";
    let (r, h, d, s, w) = (op.rows, op.heads, op.head_dim, op.slots, op.window);
    if r == 0 {
        return Ok(());
    }
    let slots = cx.read_i32(ins[4], r)?;
    let positions = cx.read_i32(ins[5], r)?;
    let places = place_rows(name, &slots, &positions, s)?;
    let (cap, selected) = match op.compressed {
        CompressedKv::None => (0, None),
        CompressedKv::All { capacity, .. } => (capacity, None),
        CompressedKv::Selected { capacity, topk, .. } => (capacity, Some((topk, cx.read_i32(ins[7], r * topk)?))),
    };
    // Source row layout: ring [0, S·W), kv [S·W, S·W+R), zero row, compressed after it.
    let (kv0, zero, c0) = (s * w, s * w + r, s * w + r + 1);
    let mut keys: Vec<Vec<i32>> = Vec::with_capacity(r);
    for (row, p) in places.iter().enumerate() {
        let row_err = |m: String| Error::invalid(format!("{name} row {row}"), m);
        let mut k: Vec<i32> = window_keys(p, w, kv0).collect();
        match (&op.compressed, &selected) {
            (CompressedKv::All { ratio, capacity }, _) => {
                let n = visible_entries(name, row, p, *ratio, *capacity)?;
                k.extend((0..n).map(|j| (c0 + p.slot * capacity + j) as i32));
            }
            (CompressedKv::Selected { .. }, Some((topk, idx))) => {
                for &j in &idx[row * topk..(row + 1) * topk] {
                    if j == -1 {
                        continue;
                    }
                    match usize::try_from(j).ok().filter(|&j| j < cap) {
                        Some(j) => k.push((c0 + p.slot * cap + j) as i32),
                        None => return Err(row_err(format!("compressed index {j} outside [0, {cap}) (or −1)"))),
                    }
                }
            }
            _ => {}
        }
        keys.push(k);
    }
    if h == 0 || d == 0 {
        return Ok(());
    }
    let l = keys.iter().map(Vec::len).max().unwrap_or(0);
    let o = View::new(outs[0], F, &[r, h, d]);
    if l == 0 {
        return cx.zero(outs[0]);
    }
    let mut gidx = Vec::with_capacity(r * l);
    let mut mask = Vec::with_capacity(r * l);
    for k in &keys {
        gidx.extend(k.iter().copied().chain(std::iter::repeat_n(zero as i32, l - k.len())));
        mask.extend((0..l).map(|i| if i < k.len() { 0f32 } else { f32::NEG_INFINITY }));
    }
    let gidx_buf = upload(cx, &i32_bytes(&gidx))?;
    let mask_buf = upload(cx, &mask.iter().flat_map(|m| m.to_le_bytes()).collect::<Vec<u8>>())?;
    // 1. one gather source, in the cache dtype (a bf16 cache is copied as it is; this call's
    //    kv rows are rounded into it, so they are the keys a later call reads from the ring)
    let cd = op.cache_dtype;
    let n_src = c0 + s * cap;
    let src_buf = cx.temp(&[n_src, d], cd)?;
    let src = View::of_temp(&src_buf, cd, &[n_src, d]);
    if s * w > 0 {
        cx.copy(&src.strided(&[s * w, d], &[d, 1], 0), &View::new(ins[2], cd, &[s * w, d]))?;
    }
    let kv_dst = src.strided(&[r, d], &[d, 1], kv0 * d);
    if cd == F {
        cx.copy(&kv_dst, &View::new(ins[1], F, &[r, d]))?;
    } else {
        cx.cast(&View::new(ins[1], F, &[r, d]), &kv_dst)?;
    }
    let zero_ptr = src_buf.ptr().offset(zero * d * cd.size());
    cx.zero(Buf { ptr: zero_ptr, len: d * cd.size() })?;
    if s * cap > 0 {
        cx.copy(&src.strided(&[s * cap, d], &[d, 1], c0 * d), &View::new(ins[6], cd, &[s * cap, d]))?;
    }
    // 2. keys (a bf16 source: gathered as bf16, then only the gathered keys widened, exactly)
    let gb = cx.temp(&[r, l, d], cd)?;
    let gathered = View::of_temp(&gb, cd, &[r * l, d]);
    index_select(cx, &src, &View::of_temp(&gidx_buf, DType::I32, &[r * l]), &gathered)?;
    let (_kb, kview) = if cd == F {
        (None, gathered.reshape(&[r, l, d]))
    } else {
        let kb = cx.temp(&[r, l, d], F)?;
        let k = View::of_temp(&kb, F, &[r, l, d]);
        cx.cast(&gathered.reshape(&[r, l, d]), &k)?;
        (Some(kb), k)
    };
    // 3. logits
    let lb = cx.temp(&[r, h, l], F)?;
    let logits = View::of_temp(&lb, F, &[r, h, l]);
    cx.batch_matmul(&View::new(ins[0], F, &[r, h, d]), &kview.strided(&[r, d, l], &[l * d, 1, d], 0), &logits)?;
    let sb = cx.temp(&[r, h, l], F)?;
    let scaled = View::of_temp(&sb, F, &[r, h, l]);
    cx.muls(&logits, op.softmax_scale, &scaled)?;
    cx.add(&scaled, &View::of_temp(&mask_buf, F, &[r, 1, l]), &logits, false)?;
    // 4. softmax with the sink column
    let zb = cx.temp(&[r, h, l + 1], F)?;
    let z = View::of_temp(&zb, F, &[r, h, l + 1]);
    cx.copy(&z.strided(&[r, h, l], &[h * (l + 1), l + 1, 1], 0), &logits)?;
    cx.copy(&z.strided(&[r, h, 1], &[h * (l + 1), l + 1, 1], l), &View::new(ins[3], F, &[1, h, 1]))?;
    let pb = cx.temp(&[r, h, l + 1], F)?;
    let p = View::of_temp(&pb, F, &[r, h, l + 1]);
    cx.softmax(&z, -1, &p)?;
    // 5. weighted sum
    cx.batch_matmul(&p.strided(&[r, h, l], &[h * (l + 1), l + 1, 1], 0), &kview, &o)
}
