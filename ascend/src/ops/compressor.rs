//! The KV compressor ([`Compressor`]), composed from generic aclnn ops with a host-side plan.
//! CANN's fused `aclnnCompressor` is not used yet (not probed).
//!
//! The op is a per-slot state machine over the call's rows (write a state row, maybe emit an
//! entry, maybe shift the overlap window). **Host round trip (labelled):** `slots`/`positions`
//! are read on the host (the HAL's row validation needs them anyway) and the state machine is
//! run there *symbolically*: each state row is tracked as a reference to its source row —
//! an original state row or one of this call's rows — so the host never touches tensor data.
//! That yields, per emitted entry, the list of source rows it pools, and per touched state row
//! its final source. The device then does:
//! 1. sources `src_kv`, `src_sc` `[S·c·ratio + R, c·D]`: `aclnnInplaceCopy` of the state and of
//!    `kv` / `score + aclnnIndexSelect(ape, pos mod ratio)` (one `aclnnAdd`).
//! 2. per entry, `aclnnIndexSelect` of its pool rows → `[E, c·ratio, c·D]`; for overlap, the
//!    previous block's channels `[0, D)` and this block's `[D, 2D)` are `aclnnInplaceCopy`'d
//!    into `[E, 2·ratio, D]`, and a host mask (`aclnnAdd`, −∞) drops the previous block of
//!    entry 0.
//! 3. `e = aclnnReduceSum(aclnnMul(aclnnSoftmax(scores, 1), kv), [1])`.
//! 4. finish: `aclnnRmsNorm(e, norm_w)`, RoPE at `j·ratio` (the Rope composition of `rope.rs`),
//!    then `rotate`: Hadamard (`quant.rs`, a matmul) + e2m1 simulation of all dims, else e4m3
//!    simulation of the first `D − rope_dim` dims (`QuantSim` on the device, `quant.rs`).
//! 5. `aclnnInplaceScatter` (rows, see `attention::scatter_rows`) of the entries into
//!    `cache [S·capacity, D]` — a bf16 cache gets the entries' nearest-even bf16, one
//!    `aclnnCast` of the `[E, D]` finished entries — and of the final state rows
//!    (`aclnnIndexSelect` from the sources) into `state_kv` / `state_score` (f32 always).

use hal::backend::Support;
use hal::ops::{Compressor, Hadamard, QuantFormat, QuantSim, Rope};
use hal::{DType, Error, Result};

use super::attention::{index_select_dim, place_rows, scatter_rows, upload};
use super::{need, Buf, Ctx, View};
use crate::runtime::DeviceBuffer;
use crate::sys::AclnnOps;

const F: DType = DType::F32;

/// Compressor: the ops of the module docs (Rope's and Hadamard's included).
pub fn supports_compressor(ops: &AclnnOps) -> Support {
    need(&[
        ("InplaceCopy", ops.InplaceCopy.is_some()),
        ("IndexSelect", ops.IndexSelect.is_some()),
        ("InplaceScatter", ops.InplaceScatter.is_some()),
        ("Add", ops.Add.is_some()),
        ("Sub", ops.Sub.is_some()),
        ("Mul", ops.Mul.is_some()),
        ("Softmax", ops.Softmax.is_some()),
        ("ReduceSum", ops.ReduceSum.is_some()),
        ("RmsNorm", ops.RmsNorm.is_some()),
        ("Cast", ops.Cast.is_some()),
        ("Cos", ops.Cos.is_some()),
        ("Sin", ops.Sin.is_some()),
        ("Mm", ops.Mm.is_some() || ops.Matmul.is_some()),
    ])
}

fn i32_bytes(v: &[usize]) -> Vec<u8> {
    v.iter().flat_map(|&x| (x as i32).to_le_bytes()).collect()
}

/// A contiguous f32 temporary and its view.
fn scratch(cx: &Ctx<'_>, shape: &[usize]) -> Result<(DeviceBuffer, View)> {
    let b = cx.temp(shape, F)?;
    let v = View::of_temp(&b, F, shape);
    Ok((b, v))
}

/// Op entry: [`Compressor`].
pub fn run_compressor(cx: &mut Ctx<'_>, op: &Compressor, ins: &[Buf], outs: &[Buf]) -> Result<()> {
    let name = "compressor";
    let (r, s, ratio, d, rd, cap) = (op.rows, op.slots, op.ratio, op.width, op.rope_dim, op.capacity);
    let (cr, cd) = (op.coff() * ratio, op.coff() * d);
    if rd % 2 != 0 || rd > d {
        return Err(Error::invalid(name, format!("rope_dim {rd} must be even and ≤ width {d}")));
    }
    if op.rotate && d % 32 != 0 {
        return Err(Error::invalid(name, format!("rotated width {d} must be a multiple of 32")));
    }
    if !op.rotate && (d - rd) % 64 != 0 {
        return Err(Error::invalid(name, format!("width − rope_dim = {} must be a multiple of 64", d - rd)));
    }
    if r == 0 {
        return Ok(());
    }
    let slots = cx.read_i32(ins[5], r)?;
    let positions = cx.read_i32(ins[6], r)?;
    let places = place_rows(name, &slots, &positions, s)?;
    for (row, p) in places.iter().enumerate() {
        if (p.pos + 1) % ratio == 0 && p.pos / ratio >= cap {
            return Err(Error::invalid(
                format!("{name} row {row}"),
                format!("position {} emits entry {} but the cache holds {cap}", p.pos, p.pos / ratio),
            ));
        }
    }
    if cd == 0 {
        return Ok(());
    }
    // Symbolic run: refs[g] = source row of state row g (identity = the original state).
    let n_state = s * cr;
    let mut refs: Vec<usize> = (0..n_state).collect();
    let mut touched = vec![false; n_state];
    let (mut pools, mut firsts, mut dests, mut rope_pos) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (row, p) in places.iter().enumerate() {
        let base = p.slot * cr;
        let i = p.pos % ratio;
        let g = base + i + if op.overlap { ratio } else { 0 };
        refs[g] = n_state + row;
        touched[g] = true;
        if (p.pos + 1) % ratio != 0 {
            continue;
        }
        let j = p.pos / ratio;
        pools.extend_from_slice(&refs[base..base + cr]);
        firsts.push(j == 0);
        dests.push(p.slot * cap + j);
        rope_pos.push(j * ratio);
        if op.overlap {
            for t in 0..ratio {
                refs[base + t] = refs[base + ratio + t];
                touched[base + t] = true;
            }
        }
    }
    let e_n = dests.len();
    // 1. sources
    let n_src = n_state + r;
    let (_kvb, src_kv) = scratch(cx, &[n_src, cd])?;
    let (_scb, src_sc) = scratch(cx, &[n_src, cd])?;
    let head = |v: &View| v.strided(&[n_state, cd], &[cd, 1], 0);
    let tail = |v: &View| v.strided(&[r, cd], &[cd, 1], n_state * cd);
    if n_state > 0 {
        cx.copy(&head(&src_kv), &View::new(outs[0], F, &[n_state, cd]))?;
        cx.copy(&head(&src_sc), &View::new(outs[1], F, &[n_state, cd]))?;
    }
    cx.copy(&tail(&src_kv), &View::new(ins[0], F, &[r, cd]))?;
    let phase: Vec<usize> = places.iter().map(|p| p.pos % ratio).collect();
    let phase_buf = upload(cx, &i32_bytes(&phase))?;
    let (_apb, ape_rows) = scratch(cx, &[r, cd])?;
    index_select_dim(
        cx,
        &View::new(ins[2], F, &[ratio, cd]),
        0,
        &View::of_temp(&phase_buf, DType::I32, &[r]),
        &ape_rows,
    )?;
    let (_sab, sa) = scratch(cx, &[r, cd])?;
    cx.add(&View::new(ins[1], F, &[r, cd]), &ape_rows, &sa, false)?;
    cx.copy(&tail(&src_sc), &sa)?;
    // 2–5. entries
    if e_n > 0 {
        let pool_buf = upload(cx, &i32_bytes(&pools))?;
        let pool_idx = View::of_temp(&pool_buf, DType::I32, &[e_n * cr]);
        let (_gkb, gkv) = scratch(cx, &[e_n * cr, cd])?;
        let (_gsb, gsc) = scratch(cx, &[e_n * cr, cd])?;
        index_select_dim(cx, &src_kv, 0, &pool_idx, &gkv)?;
        index_select_dim(cx, &src_sc, 0, &pool_idx, &gsc)?;
        let (_vb, v) = scratch(cx, &[e_n, cr, d])?;
        let (_sb, sc) = scratch(cx, &[e_n, cr, d])?;
        if op.overlap {
            // Rows [0, ratio) through channels [0, D); rows [ratio, 2·ratio) through [D, 2D).
            for (src, dst) in [(&gkv, &v), (&gsc, &sc)] {
                let src3 = src.reshape(&[e_n, cr, cd]);
                cx.copy(
                    &dst.strided(&[e_n, ratio, d], &[cr * d, d, 1], 0),
                    &src3.strided(&[e_n, ratio, d], &[cr * cd, cd, 1], 0),
                )?;
                cx.copy(
                    &dst.strided(&[e_n, ratio, d], &[cr * d, d, 1], ratio * d),
                    &src3.strided(&[e_n, ratio, d], &[cr * cd, cd, 1], ratio * cd + d),
                )?;
            }
            let mask: Vec<u8> = firsts
                .iter()
                .flat_map(|&first| (0..cr).map(move |t| if first && t < ratio { f32::NEG_INFINITY } else { 0.0 }))
                .flat_map(f32::to_le_bytes)
                .collect();
            let mask_buf = upload(cx, &mask)?;
            let (_mb, masked) = scratch(cx, &[e_n, cr, d])?;
            cx.add(&sc, &View::of_temp(&mask_buf, F, &[e_n, cr, 1]), &masked, false)?;
            cx.copy(&sc, &masked)?;
        } else {
            cx.copy(&v, &gkv.reshape(&[e_n, cr, d]))?;
            cx.copy(&sc, &gsc.reshape(&[e_n, cr, d]))?;
        }
        let (_wb, w) = scratch(cx, &[e_n, cr, d])?;
        cx.softmax(&sc, 1, &w)?;
        let (_pb, prod) = scratch(cx, &[e_n, cr, d])?;
        cx.mul(&w, &v, &prod)?;
        let (_eb, ent) = scratch(cx, &[e_n, 1, d])?;
        cx.reduce_sum(&prod, &[1], &ent)?;
        // finish: RMSNorm → RoPE → (Hadamard +) quantization simulation
        let (nb, normed) = scratch(cx, &[e_n, d])?;
        {
            let x = ent.reshape(&[e_n, d]);
            let g = View::new(ins[3], F, &[d]);
            let (_rb, rstd) = scratch(cx, &[e_n, 1])?;
            let (xt, gt, yt, rt) = (cx.tensor(&x)?, cx.tensor(&g)?, cx.tensor(&normed)?, cx.tensor(&rstd)?);
            let eps = op.norm_eps as f64;
            let pair = cx.ops().RmsNorm;
            // SAFETY: descriptors outlive the launch; `ws`/`ex` are launch()'s out-pointers.
            cx.launch("RmsNorm", pair, |f, ws, ex| unsafe { f(xt.ptr(), gt.ptr(), eps, yt.ptr(), rt.ptr(), ws, ex) })?;
        }
        let nbuf = Buf::of(&nb);
        if rd > 0 {
            let pos_buf = upload(cx, &i32_bytes(&rope_pos))?;
            let rope = Rope { rows: e_n, heads: 1, head_dim: d, rope_dim: rd, inverse: false };
            super::rope::run_rope(cx, &rope, &[ins[4], Buf::of(&pos_buf)], &[nbuf])?;
        }
        let q = if op.rotate {
            super::quant::run_hadamard(cx, &Hadamard { rows: e_n, dim: d }, &[nbuf])?;
            QuantSim { rows: e_n, dim: d, quant_dims: d, block: 32, format: QuantFormat::Fp4E2M1 }
        } else {
            QuantSim { rows: e_n, dim: d, quant_dims: d - rd, block: 64, format: QuantFormat::Fp8E4M3 }
        };
        super::quant::run_quant_sim(cx, &q, &[nbuf])?;
        // A bf16 cache stores the entries' nearest-even bf16 (the E emitted rows only).
        let cd = op.cache_dtype;
        let (_eb, entries) = cx.to_cache_dtype(&normed, cd, &[e_n, d])?;
        scatter_rows(cx, &View::new(outs[2], cd, &[s * cap, d]), &dests, &entries, d)?;
    }
    // final state rows
    let (tdst, tsrc): (Vec<usize>, Vec<usize>) = (0..n_state).filter(|&g| touched[g]).map(|g| (g, refs[g])).unzip();
    let n_t = tdst.len();
    if n_t > 0 {
        let sb = upload(cx, &i32_bytes(&tsrc))?;
        let si = View::of_temp(&sb, DType::I32, &[n_t]);
        for (src, out) in [(&src_kv, outs[0]), (&src_sc, outs[1])] {
            let (_fb, fin) = scratch(cx, &[n_t, cd])?;
            index_select_dim(cx, src, 0, &si, &fin)?;
            scatter_rows(cx, &View::new(out, F, &[n_state, cd]), &tdst, &fin, cd)?;
        }
    }
    Ok(())
}
