//! CANN's fused DeepSeek-V4 ops, used instead of the compositions where they apply.
//!
//! | HAL op | fused op | when |
//! |---|---|---|
//! | `HcPost` | `aclnnMhcPost` | exported |
//! | `HcPre` | `aclnnMhcPre` + composed Sinkhorn (`hc::sinkhorn`) and `aclnnRmsNorm` | exported and the SoC is a 950 (its only documented product) |
//! | `IndexerTopK` | `aclnnLightningIndexer` | exported, `heads, head_dim, capacity, topk ≥ 1` |
//! | `SparseAttention` | `aclnnSparseFlashMlaMetadata` + `aclnnSparseFlashMla` | exported, `head_dim = 512`, `heads ∈ [1, 128]` (documented limits) |
//!
//! Every argument and layout is in `docs/ascend-fused.md` (our reading of CANN's docs). The
//! fused ops take BF16/FP16 data only, so each call casts its f32 inputs to bf16 and its result
//! back: the backend reports these ops as [`Numerics::Bf16`], and `V4RT_ASCEND_OPS=composed`
//! turns the fused path off for f32 numerics. The composition of each op stays in its family's
//! file and is tested on its own (conformance runs both paths).
//!
//! What this removes compared with the compositions: the indexer's per-row gather of a slot's
//! whole key cache, and — for CSA — the host round trip of the indexer's selection (the
//! indices go from `aclnnLightningIndexer`'s output to `aclnnSparseFlashMla`'s input on the
//! device). What stays on the host: reading `slots`/`positions` (the HAL's row validation
//! needs them, and the window positions and per-row key counts are planned from them).
//!
//! KV caches (`cache_dtype`): a **bf16** cache is what these kernels read natively — the
//! indexer's keys and the compressed cache go to the kernel in place (no cast, no copy), and
//! the ring is copied as it is into the `oriKv` block next to this call's `kv` rows (cast to
//! bf16, nearest even: the values WindowStore stores for them). An **f32** cache costs a
//! per-call bf16 cast of the whole ring and compressed/key cache (O(cache)). Either way the
//! kernels see the same bf16 keys, so the numerics class (bf16) does not change.

use std::ffi::{c_char, CString};
use std::ptr;

use hal::backend::Numerics;
use hal::dtype::i32_bytes;
use hal::ops::attention::CompressedKv;
use hal::ops::{HcPost, HcPre, IndexerTopK, SparseAttention};
use hal::{DType, Error, Op, Result};

use super::attention::{place_rows, upload, visible_entries, window_keys};
use super::{Buf, Ctx, View};
use crate::runtime::DeviceBuffer;
use crate::sys::{AclnnOps, FusedOps};
use crate::{SocFamily, SocProfile};

const F: DType = DType::F32;
const B: DType = DType::BF16;
/// `SparseFlashMla`'s documented head dimension, and its query-head range.
const MLA_HEAD_DIM: usize = 512;
const MLA_MAX_HEADS: usize = 128;
/// INT32 words of `SparseFlashMla`'s metadata (docs/ascend-fused.md §4, chosen).
const MLA_METADATA_WORDS: usize = 1024;

/// Whether the fused path is on: `V4RT_ASCEND_OPS` = `fused` (default) or `composed`.
pub fn policy_from_env() -> std::result::Result<bool, String> {
    match std::env::var("V4RT_ASCEND_OPS") {
        Err(_) => Ok(true),
        Ok(v) => match v.trim() {
            "" | "fused" => Ok(true),
            "composed" => Ok(false),
            other => Err(format!("V4RT_ASCEND_OPS={other:?}: expected \"fused\" or \"composed\"")),
        },
    }
}

/// `(major, minor)` from a CANN version string ("9.1.0", "8.0.RC1"); `None` if it does not
/// start with two numbers.
pub fn parse_version(v: &str) -> Option<(u32, u32)> {
    let mut it = v.trim().split('.');
    let major = it.next()?.trim().parse().ok()?;
    let minor: String = it.next()?.chars().take_while(char::is_ascii_digit).collect();
    Some((major, minor.parse().ok()?))
}

/// The first CANN release whose op docs have `kernel` (docs/ascend-fused.md headings; the docs'
/// release branch is a proxy for the shipping version, UNVERIFIED).
fn min_version(kernel: &str) -> (u32, u32) {
    match kernel {
        "LightningIndexer" => (9, 0),
        _ => (9, 1),
    }
}

/// The fused op that runs `op` here, if any (the composition runs otherwise). Needs the symbol
/// pair; when the CANN version is known (`version`), also at least the op's first documented
/// release (an older library exporting the symbol may have other semantics).
pub fn kernel_for(
    op: &Op,
    fused: &FusedOps,
    ops: &AclnnOps,
    profile: &SocProfile,
    version: Option<(u32, u32)>,
) -> Option<&'static str> {
    let kernel = kernel_by_symbol(op, fused, ops, profile)?;
    match version {
        Some(v) if v < min_version(kernel) => None,
        _ => Some(kernel),
    }
}

fn kernel_by_symbol(op: &Op, fused: &FusedOps, ops: &AclnnOps, profile: &SocProfile) -> Option<&'static str> {
    // Every fused path casts to and from bf16; the indexer scales its weights first.
    ops.Cast?;
    match op {
        Op::HcPost(o) if fused.MhcPost.is_some() && o.rows * o.mult * o.dim > 0 => Some("MhcPost"),
        Op::HcPre(o)
            if fused.MhcPre.is_some()
                && profile.family == SocFamily::Ascend950
                && o.rows * o.mult * o.dim > 0
                && super::hc::supports_hc(true, o.after_post, ops) == hal::backend::Support::Yes =>
        {
            Some("MhcPre")
        }
        Op::IndexerTopK(o)
            if fused.LightningIndexer.is_some()
                && ops.Muls.is_some()
                && o.rows * o.heads * o.head_dim * o.capacity * o.topk > 0 =>
        {
            Some("LightningIndexer")
        }
        Op::SparseAttention(o)
            if fused.SparseFlashMla.is_some()
                && fused.SparseFlashMlaMetadata.is_some()
                && ops.InplaceCopy.is_some()
                && o.head_dim == MLA_HEAD_DIM
                && (1..=MLA_MAX_HEADS).contains(&o.heads)
                && o.rows > 0 =>
        {
            Some("SparseFlashMla")
        }
        _ => None,
    }
}

/// What [`kernel_for`] implies for the numerics of `op`.
pub fn numerics(kernel: Option<&'static str>) -> Numerics {
    match kernel {
        None => Numerics::F32,
        Some(k) => Numerics::Bf16 { why: format!("aclnn{k} takes bf16 activations (docs/ascend-fused.md)") },
    }
}

/// Issues `op` through its fused kernel (chosen by [`kernel_for`]).
pub fn dispatch(cx: &mut Ctx<'_>, op: &Op, ins: &[Buf], outs: &[Buf]) -> Result<()> {
    match op {
        Op::HcPost(o) => run_mhc_post(cx, o, ins, outs),
        Op::HcPre(o) => run_mhc_pre(cx, o, ins, outs),
        Op::IndexerTopK(o) => run_lightning_indexer(cx, o, ins, outs),
        Op::SparseAttention(o) => run_sparse_flash_mla(cx, o, ins, outs),
        other => Err(Error::invalid("ascend fused path", format!("{} has no fused kernel", other.name()))),
    }
}

/// A bf16 temporary holding `src` (f32) cast.
fn to_bf16(cx: &mut Ctx<'_>, src: &View, shape: &[usize]) -> Result<(DeviceBuffer, View)> {
    let b = cx.temp(shape, B)?;
    let v = View::of_temp(&b, B, shape);
    cx.cast(&src.reshape(shape), &v)?;
    Ok((b, v))
}

/// A KV cache (`buf`, dtype `dtype`) as the bf16 tensor of `shape` the fused ops read: a bf16
/// cache in place, an f32 one cast into a temporary (O(cache) per call).
fn cache_as_bf16(cx: &mut Ctx<'_>, buf: Buf, dtype: DType, shape: &[usize]) -> Result<(Option<DeviceBuffer>, View)> {
    if dtype == B {
        return Ok((None, View::new(buf, B, shape)));
    }
    let (b, v) = to_bf16(cx, &View::new(buf, F, shape), shape)?;
    Ok((Some(b), v))
}

/// A layout string for a `char*` argument (the op only reads it during phase 1).
fn layout(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

fn as_arg(s: &CString) -> *mut c_char {
    s.as_ptr().cast_mut()
}

/// Op entry: `HcPost` through `aclnnMhcPost`.
fn run_mhc_post(cx: &mut Ctx<'_>, op: &HcPost, ins: &[Buf], outs: &[Buf]) -> Result<()> {
    let (r, m, d) = (op.rows, op.mult, op.dim);
    let (_xb, x) = to_bf16(cx, &View::new(ins[1], F, &[r, m, d]), &[r, m, d])?;
    let (_fb, f) = to_bf16(cx, &View::new(ins[0], F, &[r, d]), &[r, d])?;
    let ob = cx.temp(&[r, m, d], B)?;
    let out = View::of_temp(&ob, B, &[r, m, d]);
    {
        let post = View::new(ins[2], F, &[r, m]);
        let comb = View::new(ins[3], F, &[r, m, m]);
        let (xt, ct, ft, pt, ot) =
            (cx.tensor(&x)?, cx.tensor(&comb)?, cx.tensor(&f)?, cx.tensor(&post)?, cx.tensor(&out)?);
        let pair = cx.fused().MhcPost;
        // SAFETY: descriptors outlive the launch; `ws`/`ex` are launch()'s out-pointers.
        cx.launch("MhcPost", pair, |g, ws, ex| unsafe { g(xt.ptr(), ct.ptr(), ft.ptr(), pt.ptr(), ot.ptr(), ws, ex) })?;
    }
    cx.cast(&out, &View::new(outs[0], F, &[r, m, d]))
}

/// Op entry: `HcPre` through `aclnnMhcPre` (gates, `u`), the composed Sinkhorn (`comb`) and the
/// input norm of `u` (`y`).
fn run_mhc_pre(cx: &mut Ctx<'_>, op: &HcPre, ins: &[Buf], outs: &[Buf]) -> Result<()> {
    let (r, m, d, nm) = (op.rows, op.mult, op.dim, op.mix_width());
    let (x, ins, outs) = super::hc::streams(cx, op.after_post, (r, m, d), ins, outs)?;
    let (_xb, x) = to_bf16(cx, &View::new(x, F, &[r, m, d]), &[r, m, d])?;
    let ub = cx.temp(&[r, d], B)?;
    let u = View::of_temp(&ub, B, &[r, d]);
    let lb = cx.temp(&[r, m, m], F)?;
    let logits = View::of_temp(&lb, F, &[r, m, m]);
    {
        let phi = View::new(ins[0], F, &[nm, m * d]);
        let bias = View::new(ins[1], F, &[nm]);
        let alpha = View::new(ins[2], F, &[3]);
        let post = View::new(outs[1], F, &[r, m]);
        let (xt, pt, at, bt) = (cx.tensor(&x)?, cx.tensor(&phi)?, cx.tensor(&alpha)?, cx.tensor(&bias)?);
        let (ut, qt, lt) = (cx.tensor(&u)?, cx.tensor(&post)?, cx.tensor(&logits)?);
        let (norm_eps, hc_eps) = (op.norm_eps as f64, op.hc_eps as f64);
        let pair = cx.fused().MhcPre;
        let none = ptr::null_mut();
        // SAFETY: descriptors outlive the launch; the optional tensors are NULL; `ws`/`ex` are
        // launch()'s out-pointers.
        cx.launch("MhcPre", pair, |g, ws, ex| unsafe {
            g(
                xt.ptr(),
                pt.ptr(),
                at.ptr(),
                bt.ptr(),
                ptr::null(),
                norm_eps,
                hc_eps,
                ut.ptr(),
                qt.ptr(),
                lt.ptr(),
                none,
                none,
                none,
                ws,
                ex,
            )
        })?;
    }
    let u32b = cx.temp(&[r, d], F)?;
    cx.cast(&u, &View::of_temp(&u32b, F, &[r, d]))?;
    super::norm::rms_norm_rows(cx, Buf::of(&u32b), ins[3], outs[0], r, d, op.norm_eps)?;
    super::hc::sinkhorn(cx, &logits, outs[2], op)
}

/// Op entry: `IndexerTopK` through `aclnnLightningIndexer`, every row its own batch.
fn run_lightning_indexer(cx: &mut Ctx<'_>, op: &IndexerTopK, ins: &[Buf], outs: &[Buf]) -> Result<()> {
    let name = "indexer_topk";
    let (r, h, d, s, cap, k) = (op.rows, op.heads, op.head_dim, op.slots, op.capacity, op.topk);
    let slots = cx.read_i32(ins[3], r)?;
    let positions = cx.read_i32(ins[4], r)?;
    let places = place_rows(name, &slots, &positions, s)?;
    let counts = super::indexer::visible_counts(name, op, &places)?;
    let (_qb, q) = to_bf16(cx, &View::new(ins[0], F, &[r, h, d]), &[r, h, d])?;
    let (_kb, keys) = cache_as_bf16(cx, ins[2], op.cache_dtype, &[s, cap, 1, d])?;
    let wsb = cx.temp(&[r, h], F)?;
    let wscaled = View::of_temp(&wsb, F, &[r, h]);
    cx.muls(&View::new(ins[1], F, &[r, h]), op.weight_scale, &wscaled)?;
    let (_wb, w) = to_bf16(cx, &wscaled, &[r, h])?;
    let cu_q: Vec<i32> = (1..=r as i32).collect();
    let lens: Vec<i32> = counts.iter().map(|&n| n as i32).collect();
    let cu_buf = upload(cx, &i32_bytes(&cu_q))?;
    let len_buf = upload(cx, &i32_bytes(&lens))?;
    let cu = View::of_temp(&cu_buf, DType::I32, &[r]);
    let klen = View::of_temp(&len_buf, DType::I32, &[r]);
    // Block b of the key cache is slot b (block size = capacity), so the table is `slots`.
    let table = View::new(ins[3], DType::I32, &[r, 1]);
    let idx = View::new(outs[0], DType::I32, &[r, 1, k]);
    let vals = View::new(outs[1], F, &[r, 1, k]);
    let (qt, kt, wt, ct, lt, tt) =
        (cx.tensor(&q)?, cx.tensor(&keys)?, cx.tensor(&w)?, cx.tensor(&cu)?, cx.tensor(&klen)?, cx.tensor(&table)?);
    let (it, vt) = (cx.tensor(&idx)?, cx.tensor(&vals)?);
    let (lq, lk) = (layout("TND"), layout("PA_BSND"));
    let (kk, causal) = (k as i64, 3i64);
    let pair = cx.fused().LightningIndexer;
    // SAFETY: descriptors and layout strings outlive the launch; `ws`/`ex` are launch()'s
    // out-pointers.
    cx.launch("LightningIndexer", pair, |g, ws, ex| unsafe {
        g(
            qt.ptr(),
            kt.ptr(),
            wt.ptr(),
            ct.ptr(),
            lt.ptr(),
            tt.ptr(),
            as_arg(&lq),
            as_arg(&lk),
            kk,
            causal,
            i64::MAX,
            0,
            true,
            it.ptr(),
            vt.ptr(),
            ws,
            ex,
        )
    })
}

/// Op entry: `SparseAttention` through `aclnnSparseFlashMlaMetadata` + `aclnnSparseFlashMla`,
/// every row its own batch (docs/ascend-fused.md §4 "HAL mapping").
fn run_sparse_flash_mla(cx: &mut Ctx<'_>, op: &SparseAttention, ins: &[Buf], outs: &[Buf]) -> Result<()> {
    let name = "sparse_attention";
    let (r, h, d, s, w) = (op.rows, op.heads, op.head_dim, op.slots, op.window);
    let slots = cx.read_i32(ins[4], r)?;
    let positions = cx.read_i32(ins[5], r)?;
    let places = place_rows(name, &slots, &positions, s)?;
    // ori: one block = the ring, then this call's kv rows.
    let kv0 = s * w;
    let n_ori = kv0 + r;
    let ori_rows: Vec<Vec<i32>> = places.iter().map(|p| window_keys(p, w, kv0).collect()).collect();
    let k_ori = ori_rows.iter().map(Vec::len).max().unwrap_or(0);
    // cmp: one block per slot; CSA passes the indexer's output through, HCA is planned here.
    let (ratio, cap, cmp_plan) = match op.compressed {
        CompressedKv::None => (1, 0, None),
        CompressedKv::All { ratio, capacity } => {
            let counts = places
                .iter()
                .enumerate()
                .map(|(row, p)| visible_entries(name, row, p, ratio, capacity))
                .collect::<Result<Vec<_>>>()?;
            let width = counts.iter().copied().max().unwrap_or(0);
            let plan: Vec<i32> =
                counts.iter().flat_map(|&n| (0..width).map(move |j| if j < n { j as i32 } else { -1 })).collect();
            (ratio, capacity, Some((width, Some(plan))))
        }
        CompressedKv::Selected { ratio, capacity, topk } => (ratio, capacity, Some((topk, None))),
    };
    let cmp_plan = cmp_plan.filter(|&(width, _)| width > 0 && cap > 0);
    let (has_ori, has_cmp) = (k_ori > 0, cmp_plan.is_some());
    let o32 = View::new(outs[0], F, &[r, h, d]);
    if !has_ori && !has_cmp {
        return cx.zero(outs[0]);
    }

    let (_qb, q) = to_bf16(cx, &View::new(ins[0], F, &[r, h, d]), &[r, h, d])?;
    // ori tensors
    let mut keep: Vec<DeviceBuffer> = Vec::new();
    let ori = if has_ori {
        let kb = cx.temp(&[n_ori, d], B)?;
        let kv = View::of_temp(&kb, B, &[1, n_ori, 1, d]);
        if kv0 > 0 {
            // A bf16 ring is copied as it is; an f32 one is rounded by the copy.
            cx.copy(&kv.strided(&[kv0, d], &[d, 1], 0), &View::new(ins[2], op.cache_dtype, &[kv0, d]))?;
        }
        // This call's kv rows, rounded to nearest-even bf16 (what WindowStore stores for them).
        cx.cast(&View::new(ins[1], F, &[r, d]), &kv.strided(&[r, d], &[d, 1], kv0 * d))?;
        let plan: Vec<i32> =
            ori_rows.iter().flat_map(|k| k.iter().copied().chain(std::iter::repeat_n(-1, k_ori - k.len()))).collect();
        let ib = upload(cx, &i32_bytes(&plan))?;
        let tb = upload(cx, &i32_bytes(&vec![0; r]))?;
        let views = (kv, View::of_temp(&ib, DType::I32, &[r, 1, k_ori]), View::of_temp(&tb, DType::I32, &[r, 1]));
        keep.extend([kb, ib, tb]);
        Some(views)
    } else {
        None
    };
    // cmp tensors
    let cmp = match &cmp_plan {
        None => None,
        Some((width, plan)) => {
            let (cb, kv) = cache_as_bf16(cx, ins[6], op.cache_dtype, &[s, cap, 1, d])?;
            let idx = match plan {
                Some(p) => {
                    let ib = upload(cx, &i32_bytes(p))?;
                    let v = View::of_temp(&ib, DType::I32, &[r, 1, *width]);
                    keep.push(ib);
                    v
                }
                None => View::new(ins[7], DType::I32, &[r, 1, *width]),
            };
            keep.extend(cb);
            Some((kv, idx, View::new(ins[4], DType::I32, &[r, 1])))
        }
    };
    let cu: Vec<i32> = (0..=r as i32).collect();
    let cu_buf = upload(cx, &i32_bytes(&cu))?;
    let cu_q = View::of_temp(&cu_buf, DType::I32, &[r + 1]);
    let mb = cx.temp(&[MLA_METADATA_WORDS], DType::I32)?;
    let meta = View::of_temp(&mb, DType::I32, &[MLA_METADATA_WORDS]);

    let (lq, lkv) = (layout("TND"), layout("PA_BSND"));
    let (heads, batch, max_kv) = (h as i64, r as i64, n_ori.max(cap) as i64);
    let (cmp_ratio, win_left) = (ratio as i64, w.saturating_sub(1) as i64);
    let cu_t = cx.tensor(&cu_q)?;
    let meta_t = cx.tensor(&meta)?;
    {
        let pair = cx.fused().SparseFlashMlaMetadata;
        let n = ptr::null();
        // SAFETY: descriptors and layout strings outlive the launch; the optional tensors are
        // NULL; `ws`/`ex` are launch()'s out-pointers.
        cx.launch("SparseFlashMlaMetadata", pair, |g, ws, ex| unsafe {
            g(
                cu_t.ptr(),
                n,
                n,
                n,
                n,
                n,
                n,
                n,
                n,
                heads,
                1,
                MLA_HEAD_DIM as i64,
                batch,
                1,
                max_kv,
                cmp_ratio,
                0,
                0,
                win_left,
                0,
                as_arg(&lq),
                as_arg(&lkv),
                has_ori,
                has_cmp,
                meta_t.ptr(),
                ws,
                ex,
            )
        })?;
    }
    let ob = cx.temp(&[r, h, d], B)?;
    let out = View::of_temp(&ob, B, &[r, h, d]);
    {
        let ori_kv = ori.as_ref().map(|o| cx.tensor(&o.0)).transpose()?;
        let ori_idx = ori.as_ref().map(|o| cx.tensor(&o.1)).transpose()?;
        let ori_tab = ori.as_ref().map(|o| cx.tensor(&o.2)).transpose()?;
        let cmp_kv = cmp.as_ref().map(|c| cx.tensor(&c.0)).transpose()?;
        let cmp_idx = cmp.as_ref().map(|c| cx.tensor(&c.1)).transpose()?;
        let cmp_tab = cmp.as_ref().map(|c| cx.tensor(&c.2)).transpose()?;
        let raw = |t: &Option<super::TensorDesc<'_>>| t.as_ref().map_or(ptr::null_mut(), |t| t.ptr());
        let (q_t, sink_t, out_t) = (cx.tensor(&q)?, cx.tensor(&View::new(ins[3], F, &[h]))?, cx.tensor(&out)?);
        let args = [raw(&ori_kv), raw(&cmp_kv), raw(&ori_idx), raw(&cmp_idx), raw(&ori_tab), raw(&cmp_tab)];
        let scale = op.softmax_scale as f64;
        let pair = cx.fused().SparseFlashMla;
        let n = ptr::null();
        // SAFETY: descriptors and layout strings outlive the launch; absent optional tensors
        // are NULL; `ws`/`ex` are launch()'s out-pointers.
        cx.launch("SparseFlashMla", pair, |g, ws, ex| unsafe {
            g(
                q_t.ptr(),
                args[0],
                args[1],
                args[2],
                args[3],
                args[4],
                args[5],
                cu_t.ptr(),
                n,
                n,
                n,
                n,
                n,
                n,
                n,
                n,
                sink_t.ptr(),
                meta_t.ptr(),
                scale,
                cmp_ratio,
                0,
                0,
                win_left,
                0,
                as_arg(&lq),
                as_arg(&lkv),
                0,
                false,
                out_t.ptr(),
                ptr::null_mut(),
                ws,
                ex,
            )
        })?;
    }
    drop(keep);
    cx.cast(&out, &o32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(parse_version("9.1.0"), Some((9, 1)));
        assert_eq!(parse_version("8.0.RC1"), Some((8, 0)));
        assert_eq!(parse_version(" 10.2 "), Some((10, 2)));
        assert_eq!(parse_version("9"), None);
        assert_eq!(parse_version("dev"), None);
        assert!((9, 0) < min_version("SparseFlashMla") && (9, 0) >= min_version("LightningIndexer"));
    }
}
