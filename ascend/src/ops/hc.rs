//! Manifold-constrained hyper-connections (HcPre / HcPost / HcHead), composed from generic
//! aclnn ops. Where CANN exports `aclnnMhcPre` (950) / `aclnnMhcPost`, `fused.rs` uses them
//! instead (bf16 numerics); this file is the composition, kept and tested on both profiles.
//!
//! Shared mixing step (`HcPre`, `HcHead`), per row `r` of `x̄ = x[r] as [m·d]`:
//! * `ρ`: `aclnnRmsNorm(x̄, ones, norm_eps)` — only its fp32 `rstd` output is used (it is exactly
//!   `1/sqrt(mean(x̄²) + eps)`); the normalized `y` goes to a scratch buffer.
//! * `mix = aclnnMm(x̄ [R, m·d], fnᵀ, KEEP_DTYPE)` with `fnᵀ` a transposed strided view.
//! * `μ = aclnnMul(mix, ρ [R, 1])`.
//! * a gate slice `z = aclnnAdd(aclnnMul(μ[:, lo..lo+w], scale[i]), base[lo..lo+w])` on strided
//!   views (the `scale` element is a 1-element view, broadcast).
//!
//! `HcPre`: `pre = aclnnAdds(aclnnSigmoid(z₀), hc_eps)`, `post = aclnnMuls(aclnnSigmoid(z₁), 2)`,
//! `C = aclnnAdds(aclnnSoftmax(z₂ as [R, m, m], −1), hc_eps)`, then the Sinkhorn normalizations
//! as `aclnnReduceSum(dims = [1] or [2], keepDims)` → `aclnnAdds(eps)` → `aclnnDiv` (the
//! iteration count is an op parameter, so the loop is host-side issue order, not a data-dependent
//! round trip), and `u = aclnnBatchMatMul(pre [R, 1, m], x [R, m, d])`.
//! `HcHead`: the `pre` gate and the `u` matmul only.
//! Both end with the sub-layer's input norm, `y = aclnnRmsNorm(u, norm, norm_eps)`, and with
//! `after_post` begin with `HcPost` (below) writing the streams they then read.
//! `HcPost`: `out = aclnnAdd(aclnnBatchMatMul(combᵀ [R, m, m], x [R, m, d]),
//! aclnnMul(post [R, m, 1], f [R, 1, d]))` — `combᵀ` is a strided view (stream j feeds k).
//!
//! All matmuls use `cubeMathType = KEEP_DTYPE`: the conformance bound for these ops (1e-9)
//! excludes HF32.

use hal::backend::Support;
use hal::ops::{hc_weights_at, HcHead, HcPost, HcPre};
use hal::{DType, Result};

use super::{need, Buf, Ctx, View};
use crate::runtime::DeviceBuffer;
use crate::sys::{self, AclnnOps};

const F: DType = DType::F32;

/// HcPre / HcHead need the mixing ops; HcPre adds Softmax, ReduceSum, Div and Muls; after an
/// HcPost also its ops ([`supports_hc_post`]).
pub fn supports_hc(pre: bool, after_post: bool, ops: &AclnnOps) -> Support {
    if after_post {
        if let no @ Support::No(_) = supports_hc_post(ops) {
            return no;
        }
    }
    let mut list = vec![
        ("RmsNorm", ops.RmsNorm.is_some()),
        ("Mm", ops.Mm.is_some() || ops.Matmul.is_some()),
        ("Mul", ops.Mul.is_some()),
        ("Add", ops.Add.is_some()),
        ("Adds", ops.Adds.is_some()),
        ("Sigmoid", ops.Sigmoid.is_some()),
        ("BatchMatMul", ops.BatchMatMul.is_some()),
    ];
    if pre {
        list.extend([
            ("Muls", ops.Muls.is_some()),
            ("Softmax", ops.Softmax.is_some()),
            ("ReduceSum", ops.ReduceSum.is_some()),
            ("Div", ops.Div.is_some()),
            ("InplaceCopy", ops.InplaceCopy.is_some()),
        ]);
    }
    need(&list)
}

/// HcPost: BatchMatMul, Mul, Add.
pub fn supports_hc_post(ops: &AclnnOps) -> Support {
    need(&[("BatchMatMul", ops.BatchMatMul.is_some()), ("Mul", ops.Mul.is_some()), ("Add", ops.Add.is_some())])
}

/// A scratch f32 tensor and its contiguous view.
fn scratch(cx: &Ctx<'_>, shape: &[usize]) -> Result<(DeviceBuffer, View)> {
    let b = cx.temp(shape, F)?;
    let v = View::of_temp(&b, F, shape);
    Ok((b, v))
}

/// `μ = (x̄ · fnᵀ) · ρ`, `[R, nm]`.
fn mixes(
    cx: &mut Ctx<'_>,
    x: Buf,
    fn_w: Buf,
    rows: usize,
    md: usize,
    nm: usize,
    norm_eps: f32,
) -> Result<(DeviceBuffer, View)> {
    let xv = View::new(x, F, &[rows, md]);
    let ones = super::norm::ones(cx, md)?;
    let (_yb, y) = scratch(cx, &[rows, md])?;
    let (_rb, rstd) = scratch(cx, &[rows, 1])?;
    {
        let g = View::new(ones, F, &[md]);
        let (xt, gt, yt, rt) = (cx.tensor(&xv)?, cx.tensor(&g)?, cx.tensor(&y)?, cx.tensor(&rstd)?);
        let eps = norm_eps as f64;
        let pair = cx.ops().RmsNorm;
        // SAFETY: descriptors outlive the launch; `ws`/`ex` are launch()'s out-pointers.
        cx.launch("RmsNorm", pair, |f, ws, ex| unsafe { f(xt.ptr(), gt.ptr(), eps, yt.ptr(), rt.ptr(), ws, ex) })?;
    }
    let fnt = View::new(fn_w, F, &[nm, md]).strided(&[md, nm], &[1, md], 0);
    let (_mb, mix) = scratch(cx, &[rows, nm])?;
    super::linear::matmul(cx, &xv, &fnt, &mix, sys::CUBE_KEEP_DTYPE)?;
    let (mub, mu) = scratch(cx, &[rows, nm])?;
    cx.mul(&mix, &rstd, &mu)?;
    Ok((mub, mu))
}

/// `z = μ[:, lo..lo+w] · scale[si] + base[lo..lo+w]`, `[R, w]`.
#[allow(clippy::too_many_arguments)]
fn gate(
    cx: &mut Ctx<'_>,
    mu: &View,
    rows: usize,
    nm: usize,
    lo: usize,
    w: usize,
    scale: Buf,
    si: usize,
    base: Buf,
) -> Result<(DeviceBuffer, View)> {
    let slice = mu.strided(&[rows, w], &[nm, 1], lo);
    let sc = View::new(scale, F, &[1]).strided(&[1], &[1], si);
    let bs = View::new(base, F, &[nm]).strided(&[w], &[1], lo);
    let (_tb, t) = scratch(cx, &[rows, w])?;
    cx.mul(&slice, &sc, &t)?;
    let (zb, z) = scratch(cx, &[rows, w])?;
    cx.add(&t, &bs, &z, false)?;
    Ok((zb, z))
}

/// `p = sigmoid(z) + eps`, `u[r] = Σ_i p[r, i] · x[r, i, :]`, then `y = norm ⊙ (u · rstd(u))`.
#[allow(clippy::too_many_arguments)]
fn merge_norm(
    cx: &mut Ctx<'_>,
    z: &View,
    x: Buf,
    norm: Buf,
    y: Buf,
    rows: usize,
    m: usize,
    d: usize,
    hc_eps: f32,
    norm_eps: f32,
) -> Result<()> {
    let (_sb, s) = scratch(cx, &[rows, m])?;
    cx.sigmoid(z, &s)?;
    let (_pb, p) = scratch(cx, &[rows, m])?;
    cx.adds(&s, hc_eps, &p)?;
    let x3 = View::new(x, F, &[rows, m, d]);
    let (ub, u) = scratch(cx, &[rows, 1, d])?;
    cx.batch_matmul(&p.reshape(&[rows, 1, m]), &x3, &u)?;
    super::norm::rms_norm_rows(cx, Buf::of(&ub), norm, y, rows, d, norm_eps)
}

/// An mHC op's streams (`HcPre` step 0): input `x`; or, `after_post`, HcPost of the first four
/// inputs (composed, [`run_hc_post`]) written to the output `x`. Returns the streams and the
/// op's remaining inputs (`fn`, `base`, `scale`, `norm`) and outputs.
pub(crate) fn streams<'a>(
    cx: &mut Ctx<'_>,
    after_post: bool,
    (rows, mult, dim): (usize, usize, usize),
    ins: &'a [Buf],
    outs: &'a [Buf],
) -> Result<(Buf, &'a [Buf], &'a [Buf])> {
    let rest = &ins[hc_weights_at(after_post)..];
    if !after_post {
        return Ok((ins[0], rest, outs));
    }
    run_hc_post(cx, &HcPost { rows, mult, dim }, ins, outs)?;
    Ok((outs[0], rest, &outs[1..]))
}

/// Op entry: [`HcHead`].
pub fn run_hc_head(cx: &mut Ctx<'_>, op: &HcHead, ins: &[Buf], outs: &[Buf]) -> Result<()> {
    let (r, m, d) = (op.rows, op.mult, op.dim);
    if r == 0 || m == 0 || d == 0 {
        return Ok(());
    }
    let (x, ins, outs) = streams(cx, op.after_post, (r, m, d), ins, outs)?;
    let (_mub, mu) = mixes(cx, x, ins[0], r, m * d, m, op.norm_eps)?;
    let (_zb, z) = gate(cx, &mu, r, m, 0, m, ins[2], 0, ins[1])?;
    merge_norm(cx, &z, x, ins[3], outs[0], r, m, d, op.hc_eps, op.norm_eps)
}

/// Op entry: [`HcPre`].
pub fn run_hc_pre(cx: &mut Ctx<'_>, op: &HcPre, ins: &[Buf], outs: &[Buf]) -> Result<()> {
    let (r, m, d, nm) = (op.rows, op.mult, op.dim, op.mix_width());
    if r == 0 || m == 0 || d == 0 {
        return Ok(());
    }
    let (x, ins, outs) = streams(cx, op.after_post, (r, m, d), ins, outs)?;
    let (fn_w, base, scale, norm) = (ins[0], ins[1], ins[2], ins[3]);
    let (_mub, mu) = mixes(cx, x, fn_w, r, m * d, nm, op.norm_eps)?;
    // pre → u → y
    let (_z0b, z0) = gate(cx, &mu, r, nm, 0, m, scale, 0, base)?;
    merge_norm(cx, &z0, x, norm, outs[0], r, m, d, op.hc_eps, op.norm_eps)?;
    // post = 2·sigmoid(z₁)
    let (_z1b, z1) = gate(cx, &mu, r, nm, m, m, scale, 1, base)?;
    let (_s1b, s1) = scratch(cx, &[r, m])?;
    cx.sigmoid(&z1, &s1)?;
    cx.muls(&s1, 2.0, &View::new(outs[1], F, &[r, m]))?;
    // comb: softmax over k, + eps, then Sinkhorn
    let (_z2b, z2) = gate(cx, &mu, r, nm, 2 * m, m * m, scale, 2, base)?;
    sinkhorn(cx, &z2.reshape(&[r, m, m]), outs[2], op)
}

/// `comb = Sinkhorn(logits)` for `logits [R, m, m]`: softmax over k, + eps, then column
/// normalization, then `sinkhorn_iters − 1` times rows and columns (the HAL's step 4). Shared
/// by the composed `HcPre` and the fused one (`aclnnMhcPre` returns the logits unnormalized).
pub(crate) fn sinkhorn(cx: &mut Ctx<'_>, logits: &View, comb: Buf, op: &HcPre) -> Result<()> {
    let (r, m) = (op.rows, op.mult);
    let shape = [r, m, m];
    let (_ab, a) = scratch(cx, &shape)?;
    let (_bb, b) = scratch(cx, &shape)?;
    cx.softmax(logits, -1, &b)?;
    cx.adds(&b, op.hc_eps, &a)?;
    let (_cs, col_sum) = scratch(cx, &[r, 1, m])?;
    let (_ce, col_eps) = scratch(cx, &[r, 1, m])?;
    let (_rs, row_sum) = scratch(cx, &[r, m, 1])?;
    let (_re, row_eps) = scratch(cx, &[r, m, 1])?;
    // Each normalization reads `src` and writes `dst`: a → b (columns), then b → a (rows),
    // a → b (columns) per further iteration, so the result always ends in `b`.
    let normalize = |cx: &mut Ctx<'_>, src: &View, dst: &View, dim: i64, sum: &View, eps: &View| -> Result<()> {
        cx.reduce_sum(src, &[dim], sum)?;
        cx.adds(sum, op.hc_eps, eps)?;
        cx.div(src, eps, dst)
    };
    normalize(cx, &a, &b, 1, &col_sum, &col_eps)?;
    for _ in 1..op.sinkhorn_iters {
        normalize(cx, &b, &a, 2, &row_sum, &row_eps)?;
        normalize(cx, &a, &b, 1, &col_sum, &col_eps)?;
    }
    cx.copy(&View::new(comb, F, &shape), &b)
}

/// Op entry: [`HcPost`].
pub fn run_hc_post(cx: &mut Ctx<'_>, op: &HcPost, ins: &[Buf], outs: &[Buf]) -> Result<()> {
    let (r, m, d) = (op.rows, op.mult, op.dim);
    if r == 0 || m == 0 || d == 0 {
        return Ok(());
    }
    let (f, x, post, comb) = (ins[0], ins[1], ins[2], ins[3]);
    let comb_t = View::new(comb, F, &[r, m, m]).strided(&[r, m, m], &[m * m, 1, m], 0);
    let (_tb, t) = scratch(cx, &[r, m, d])?;
    cx.batch_matmul(&comb_t, &View::new(x, F, &[r, m, d]), &t)?;
    let (_pb, pf) = scratch(cx, &[r, m, d])?;
    cx.mul(&View::new(post, F, &[r, m, 1]), &View::new(f, F, &[r, 1, d]), &pf)?;
    cx.add(&t, &pf, &View::new(outs[0], F, &[r, m, d]), false)
}
