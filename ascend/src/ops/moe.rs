//! The clamped SwiGLU, composed from primitives (the fused `aclnnSwiGlu` takes one
//! concatenated `[.., 2w]` input and has no clamp):
//! `gc = aclnnClamp(g, max = limit)`, `uc = aclnnClamp(u, −limit, limit)` (both skipped when
//! `limit = 0`), `s = aclnnSilu(gc)`, `h = aclnnMul(s, uc)`.
//!
//! [`MoeGate`], composed (CANN's `aclnnMoeGatingTopK` computes sigmoid/softmax scores, not
//! V4's `sqrt(softplus)`, so it does not fit):
//! 1. `z = aclnnMm(x, gate_wᵀ, KEEP_DTYPE)`, `s = aclnnSqrt(aclnnSoftplus(z, β = 1, θ = 20))`
//!    (torch softplus semantics are exactly the HAL's: `z` itself above 20).
//! 2. Scored: `aclnnTopk(aclnnAdd(s, bias), k, −1, largest, sorted)` → int64 indices →
//!    `aclnnCast` → `experts` (i32). Hashed: `ids` are checked on the host (one small D2H),
//!    `experts = aclnnIndexSelect(tid2eid, 0, ids)`, and the selected rows are read back to
//!    check every expert id (the HAL makes a bad table entry an error naming the row).
//! 3. `c = aclnnGather(s, 1, experts)`, `weights = aclnnMuls(aclnnDiv(c, aclnnReduceSum(c,
//!    [1])), route_scale)`.
//!
//! Tie order of `aclnnTopk` on equal biased scores is not documented (the HAL wants lower
//! expert first); the emulator is stable, real hardware is UNVERIFIED — the conformance
//! harness forgives near-tie swaps either way.
//!
//! [`MoeExperts`]: see [`run_moe_experts`] (FP8/FP4 weights through `super::lowp`).

use std::ptr;

use hal::backend::Support;
use hal::ops::{GateMode, MoeExperts, MoeGate, SwiGlu};
use hal::{DType, Error, Result};

use super::{need, Buf, Ctx, View};
use crate::sys::AclnnOps;

/// SwiGlu needs Silu and Mul, plus Clamp when the clamp is on.
pub fn supports_swiglu(s: &SwiGlu, ops: &AclnnOps) -> Support {
    need(&[("Silu", ops.Silu.is_some()), ("Mul", ops.Mul.is_some()), ("Clamp", s.limit == 0.0 || ops.Clamp.is_some())])
}

/// `out = clamp(x, lo, hi)`; `None` leaves that side open.
fn clamp(cx: &mut Ctx<'_>, x: &View, lo: Option<f32>, hi: Option<f32>, out: &View) -> Result<()> {
    let (xt, ot) = (cx.tensor(x)?, cx.tensor(out)?);
    let lo = lo.map(|v| cx.scalar_f32(v)).transpose()?;
    let hi = hi.map(|v| cx.scalar_f32(v)).transpose()?;
    let (lp, hp) = (
        lo.as_ref().map_or(ptr::null(), |s| s.raw.cast_const()),
        hi.as_ref().map_or(ptr::null(), |s| s.raw.cast_const()),
    );
    let pair = cx.ops().Clamp;
    // SAFETY: descriptors and scalars outlive the launch; NULL bounds are documented as open.
    cx.launch("Clamp", pair, |f, ws, ex| unsafe { f(xt.ptr(), lp, hp, ot.ptr(), ws, ex) })
}

/// Op entry: [`SwiGlu`].
pub fn run_swiglu(cx: &mut Ctx<'_>, op: &SwiGlu, ins: &[Buf], outs: &[Buf]) -> Result<()> {
    let n = op.rows * op.width;
    if n == 0 {
        return Ok(());
    }
    let shape = [op.rows, op.width];
    let g = View::new(ins[0], DType::F32, &shape);
    let u = View::new(ins[1], DType::F32, &shape);
    let h = View::new(outs[0], DType::F32, &shape);
    let (gc_buf, uc_buf);
    let (gc, uc) = if op.limit > 0.0 {
        gc_buf = cx.temp(&shape, DType::F32)?;
        uc_buf = cx.temp(&shape, DType::F32)?;
        let (gc, uc) = (View::of_temp(&gc_buf, DType::F32, &shape), View::of_temp(&uc_buf, DType::F32, &shape));
        clamp(cx, &g, None, Some(op.limit), &gc)?;
        clamp(cx, &u, Some(-op.limit), Some(op.limit), &uc)?;
        (gc, uc)
    } else {
        (g, u)
    };
    let s_buf = cx.temp(&shape, DType::F32)?;
    let s = View::of_temp(&s_buf, DType::F32, &shape);
    {
        let (gt, st) = (cx.tensor(&gc)?, cx.tensor(&s)?);
        let pair = cx.ops().Silu;
        // SAFETY: descriptors outlive the launch; `ws`/`ex` are launch()'s out-pointers.
        cx.launch("Silu", pair, |f, ws, ex| unsafe { f(gt.ptr(), st.ptr(), ws, ex) })?;
    }
    cx.mul(&s, &uc, &h)
}

/// MoeGate: the ops of the module docs.
pub fn supports_moe_gate(g: &MoeGate, ops: &AclnnOps) -> Support {
    let scored = matches!(g.mode, GateMode::Scored);
    need(&[
        ("Mm", ops.Mm.is_some() || ops.Matmul.is_some()),
        ("Softplus", ops.Softplus.is_some()),
        ("Sqrt", ops.Sqrt.is_some()),
        ("Gather", ops.Gather.is_some()),
        ("ReduceSum", ops.ReduceSum.is_some()),
        ("Div", ops.Div.is_some()),
        ("Muls", ops.Muls.is_some()),
        ("Add", !scored || ops.Add.is_some()),
        ("Topk", !scored || ops.Topk.is_some()),
        ("Cast", !scored || ops.Cast.is_some()),
        ("IndexSelect", scored || ops.IndexSelect.is_some()),
    ])
}

/// Op entry: [`MoeGate`].
pub fn run_moe_gate(cx: &mut Ctx<'_>, op: &MoeGate, ins: &[Buf], outs: &[Buf]) -> Result<()> {
    let name = "moe_gate";
    let (r, d, e, k) = (op.rows, op.dim, op.experts, op.topk);
    if r == 0 {
        return Ok(());
    }
    let experts = View::new(outs[0], DType::I32, &[r, k]);
    // Hashed: validate ids first (errors before any launch, like the reference).
    let hashed_ids = match op.mode {
        GateMode::Hashed { vocab } => {
            let ids = cx.read_i32(ins[3], r)?;
            if let Some(row) = ids.iter().position(|&i| i < 0 || i as usize >= vocab) {
                return Err(Error::invalid(
                    format!("{name} row {row}"),
                    format!("token id {} outside [0, {vocab})", ids[row]),
                ));
            }
            Some(vocab)
        }
        GateMode::Scored => None,
    };
    if let Some(vocab) = hashed_ids {
        if k > 0 {
            let table = View::new(ins[2], DType::I32, &[vocab, k]);
            let ids = View::new(ins[3], DType::I32, &[r]);
            let (tt, it, ot) = (cx.tensor(&table)?, cx.tensor(&ids)?, cx.tensor(&experts)?);
            let pair = cx.ops().IndexSelect;
            // SAFETY: descriptors outlive the launch; `ws`/`ex` are launch()'s out-pointers.
            cx.launch("IndexSelect", pair, |f, ws, ex| unsafe { f(tt.ptr(), 0, it.ptr(), ot.ptr(), ws, ex) })?;
            let chosen = cx.read_i32(outs[0], r * k)?;
            let ids = cx.read_i32(ins[3], r)?;
            if let Some(i) = chosen.iter().position(|&x| x < 0 || x as usize >= e) {
                let row = i / k;
                return Err(Error::invalid(
                    format!("{name} row {row}"),
                    format!("tid2eid[{}] holds expert {} outside [0, {e})", ids[row], chosen[i]),
                ));
            }
        }
    }
    if k == 0 || e == 0 {
        return Ok(());
    }
    // 1. scores
    let zb = cx.temp(&[r, e], DType::F32)?;
    let z = View::of_temp(&zb, DType::F32, &[r, e]);
    if d == 0 {
        cx.zero(Buf::of(&zb))?;
    } else {
        let wt = View::new(ins[1], DType::F32, &[e, d]).strided(&[d, e], &[1, d], 0);
        super::linear::matmul(cx, &View::new(ins[0], DType::F32, &[r, d]), &wt, &z, crate::sys::CUBE_KEEP_DTYPE)?;
    }
    let spb = cx.temp(&[r, e], DType::F32)?;
    let sp = View::of_temp(&spb, DType::F32, &[r, e]);
    {
        let (zt, st) = (cx.tensor(&z)?, cx.tensor(&sp)?);
        let (beta, thr) = (cx.scalar_f32(1.0)?, cx.scalar_f32(20.0)?);
        let pair = cx.ops().Softplus;
        // SAFETY: descriptors and scalars outlive the launch; `ws`/`ex` are launch()'s out-pointers.
        cx.launch("Softplus", pair, |f, ws, ex| unsafe { f(zt.ptr(), beta.raw, thr.raw, st.ptr(), ws, ex) })?;
    }
    let sb = cx.temp(&[r, e], DType::F32)?;
    let s = View::of_temp(&sb, DType::F32, &[r, e]);
    {
        let (it, ot) = (cx.tensor(&sp)?, cx.tensor(&s)?);
        let pair = cx.ops().Sqrt;
        // SAFETY: descriptors outlive the launch; `ws`/`ex` are launch()'s out-pointers.
        cx.launch("Sqrt", pair, |f, ws, ex| unsafe { f(it.ptr(), ot.ptr(), ws, ex) })?;
    }
    // 2. selection (scored)
    if hashed_ids.is_none() {
        let bb = cx.temp(&[r, e], DType::F32)?;
        let biased = View::of_temp(&bb, DType::F32, &[r, e]);
        cx.add(&s, &View::new(ins[2], DType::F32, &[e]), &biased, false)?;
        let vb = cx.temp(&[r, k], DType::F32)?;
        let ib = cx.temp(&[r, k], DType::I64)?;
        let (vals, idx) = (View::of_temp(&vb, DType::F32, &[r, k]), View::of_temp(&ib, DType::I64, &[r, k]));
        {
            let (xt, vt, it) = (cx.tensor(&biased)?, cx.tensor(&vals)?, cx.tensor(&idx)?);
            let kk = k as i64;
            let pair = cx.ops().Topk;
            // SAFETY: descriptors outlive the launch; `ws`/`ex` are launch()'s out-pointers.
            cx.launch("Topk", pair, |f, ws, ex| unsafe {
                f(xt.ptr(), kk, -1, true, true, vt.ptr(), it.ptr(), ws, ex)
            })?;
        }
        cx.cast(&idx, &experts)?;
    }
    // 3. weights
    let cb = cx.temp(&[r, k], DType::F32)?;
    let c = View::of_temp(&cb, DType::F32, &[r, k]);
    {
        let (st, it, ot) = (cx.tensor(&s)?, cx.tensor(&experts)?, cx.tensor(&c)?);
        let pair = cx.ops().Gather;
        // SAFETY: descriptors outlive the launch; `ws`/`ex` are launch()'s out-pointers.
        cx.launch("Gather", pair, |f, ws, ex| unsafe { f(st.ptr(), 1, it.ptr(), ot.ptr(), ws, ex) })?;
    }
    let sumb = cx.temp(&[r, 1], DType::F32)?;
    let sum = View::of_temp(&sumb, DType::F32, &[r, 1]);
    cx.reduce_sum(&c, &[1], &sum)?;
    let qb = cx.temp(&[r, k], DType::F32)?;
    let q = View::of_temp(&qb, DType::F32, &[r, k]);
    cx.div(&c, &sum, &q)?;
    cx.muls(&q, op.route_scale, &View::new(outs[1], DType::F32, &[r, k]))
}

/// MoeExperts: the FP8/FP4 linear path plus gathers and scatters.
pub fn supports_moe_experts(m: &MoeExperts, ops: &AclnnOps) -> Support {
    if !m.format.quantizes_input() {
        return Support::No(format!("moe_experts with {:?} weights is not defined by the HAL", m.format));
    }
    match super::lowp::supports_lowp(ops) {
        Support::Yes => {}
        no => return no,
    }
    need(&[
        ("InplaceScatter", ops.InplaceScatter.is_some()),
        ("Add", ops.Add.is_some()),
        ("Silu", ops.Silu.is_some()),
        ("Clamp", m.swiglu_limit == 0.0 || ops.Clamp.is_some()),
    ])
}

/// Op entry: [`MoeExperts`] — per used expert (ascending), on the rows routed to it:
/// `aclnnIndexSelect` the (host act_quant'ed) rows, two dequantized-weight `aclnnMm`s, the
/// SwiGLU composition above, `aclnnMul` by the gathered route weights, act_quant (host), the
/// `W2` matmul, and `y[rows] = aclnnAdd(aclnnIndexSelect(y, rows), ·)` written back with
/// `aclnnInplaceScatter` (rows). **Known slow path:** the routing table is read on the host (one
/// D2H, also needed to reject repeated experts as the HAL requires), and each expert's `h`
/// makes a host round trip for act_quant. Each used expert's three matrices are widened from
/// their load-time BF16 copies (`Backend::prepare`, 910B/910C) or else dequantized per call.
pub fn run_moe_experts(cx: &mut Ctx<'_>, op: &MoeExperts, ins: &[Buf], outs: &[Buf]) -> Result<()> {
    let name = "moe_experts";
    if op.swiglu_limit.is_nan() || op.swiglu_limit < 0.0 {
        return Err(Error::invalid(
            name,
            format!("swiglu limit {} must be ≥ 0 (0 disables the clamp)", op.swiglu_limit),
        ));
    }
    let (r, d, inter, e_n, k) = (op.rows, op.dim, op.inter, op.experts, op.topk);
    if r == 0 {
        return Ok(());
    }
    let ids = if k > 0 { cx.read_i32(ins[1], r * k)? } else { Vec::new() };
    // Per expert: (row, flat index into weights), rows ascending.
    let mut routes: Vec<Vec<(i32, i32)>> = vec![Vec::new(); e_n];
    for row in 0..r {
        let row_err = |m: String| Error::invalid(format!("{name} row {row}"), m);
        let mut seen: Vec<usize> = Vec::with_capacity(k);
        for t in 0..k {
            let e = ids[row * k + t];
            let e = usize::try_from(e)
                .ok()
                .filter(|&e| e < e_n)
                .ok_or_else(|| row_err(format!("expert {e} outside [0, {e_n})")))?;
            seen.push(e);
            routes[e].push((row as i32, (row * k + t) as i32));
        }
        seen.sort_unstable();
        if let Some(p) = seen.windows(2).find(|p| p[0] == p[1]) {
            return Err(row_err(format!("expert {} is listed twice", p[0])));
        }
    }
    if d == 0 {
        return Ok(());
    }
    cx.zero(outs[0])?;
    if inter == 0 {
        return Ok(());
    }
    let profile = cx.be.profile.clone();
    let fmt = op.format;
    // Bytes of one expert's values and scales for an [out, inp] matrix.
    let sizes = |out: usize, inp: usize| -> Vec<usize> {
        fmt.weight_specs(out, inp).iter().map(|s| s.shape.iter().product::<usize>() * s.dtype.size()).collect()
    };
    let (s13, s2) = (sizes(inter, d), sizes(d, inter));
    let part = |b: Buf, e: usize, bytes: usize| Buf { ptr: b.ptr.offset(e * bytes), len: bytes };
    // Load-time copies of w1, w3, w2 (`prepare`), when `run` attached them.
    let copies = [3, 5, 7].map(|i| super::lowp::current(cx, i));
    let xq_buf = super::lowp::act_quant(cx, ins[0], r, d)?;
    let xq = View::of_temp(&xq_buf, DType::F32, &[r, d]);
    let y = View::new(outs[0], DType::F32, &[r, d]);
    let wts = View::new(ins[2], DType::F32, &[r * k]);
    let ms = |cx: &mut Ctx<'_>, a: &View, w: &View, out: &View| {
        super::linear::matmul(cx, a, w, out, crate::sys::CUBE_KEEP_DTYPE)
    };
    for (e, route) in routes.iter().enumerate() {
        let n = route.len();
        if n == 0 {
            continue;
        }
        let rows: Vec<u8> = route.iter().flat_map(|&(row, _)| row.to_le_bytes()).collect();
        let widx: Vec<u8> = route.iter().flat_map(|&(_, w)| w.to_le_bytes()).collect();
        let rows_buf = super::attention::upload(cx, &rows)?;
        let widx_buf = super::attention::upload(cx, &widx)?;
        let rows_v = View::of_temp(&rows_buf, DType::I32, &[n]);
        let xe_b = cx.temp(&[n, d], DType::F32)?;
        let xe = View::of_temp(&xe_b, DType::F32, &[n, d]);
        super::attention::index_select_dim(cx, &xq, 0, &rows_v, &xe)?;
        let (gb, ub) = (cx.temp(&[n, inter], DType::F32)?, cx.temp(&[n, inter], DType::F32)?);
        for (wi, out) in [(3usize, &gb), (5, &ub)] {
            let copy = copies[(wi - 3) / 2].as_deref();
            let (_wb, wv) = super::lowp::weight_f32(
                cx,
                &profile,
                fmt,
                copy,
                e,
                part(ins[wi], e, s13[0]),
                part(ins[wi + 1], e, s13[1]),
                inter,
                d,
            )?;
            ms(cx, &xe, &wv.strided(&[d, inter], &[1, d], 0), &View::of_temp(out, DType::F32, &[n, inter]))?;
        }
        let hb = cx.temp(&[n, inter], DType::F32)?;
        run_swiglu(
            cx,
            &SwiGlu { rows: n, width: inter, limit: op.swiglu_limit },
            &[Buf::of(&gb), Buf::of(&ub)],
            &[Buf::of(&hb)],
        )?;
        let wtb = cx.temp(&[n], DType::F32)?;
        let wt = View::of_temp(&wtb, DType::F32, &[n]);
        super::attention::index_select_dim(cx, &wts, 0, &View::of_temp(&widx_buf, DType::I32, &[n]), &wt)?;
        let hwb = cx.temp(&[n, inter], DType::F32)?;
        cx.mul(
            &View::of_temp(&hb, DType::F32, &[n, inter]),
            &wt.reshape(&[n, 1]),
            &View::of_temp(&hwb, DType::F32, &[n, inter]),
        )?;
        let hq = super::lowp::act_quant(cx, Buf::of(&hwb), n, inter)?;
        let (_w2b, w2) = super::lowp::weight_f32(
            cx,
            &profile,
            fmt,
            copies[2].as_deref(),
            e,
            part(ins[7], e, s2[0]),
            part(ins[8], e, s2[1]),
            d,
            inter,
        )?;
        let yeb = cx.temp(&[n, d], DType::F32)?;
        let ye = View::of_temp(&yeb, DType::F32, &[n, d]);
        ms(cx, &View::of_temp(&hq, DType::F32, &[n, inter]), &w2.strided(&[inter, d], &[1, inter], 0), &ye)?;
        let yrb = cx.temp(&[n, d], DType::F32)?;
        let yr = View::of_temp(&yrb, DType::F32, &[n, d]);
        super::attention::index_select_dim(cx, &y, 0, &rows_v, &yr)?;
        let sb = cx.temp(&[n, d], DType::F32)?;
        let sum = View::of_temp(&sb, DType::F32, &[n, d]);
        cx.add(&yr, &ye, &sum, false)?;
        let dest: Vec<usize> = route.iter().map(|&(row, _)| row as usize).collect();
        super::attention::scatter_rows(cx, &y, &dest, &sum, d)?;
    }
    Ok(())
}
