//! FP8 / FP4 checkpoint weights (`Linear` with `Fp8Block128` / `Fp4Group32`), per SoC profile.
//!
//! The HAL defines `y = W · x̃` with `x̃ = act_quant(x)` (e4m3, blocks of 128, power-of-two
//! scales) and `W` the dequantized weight. Every value involved is exact in f32 (an e4m3 or
//! e2m1 code times a power of two; products of two such values have ≤ 8 significant bits),
//! so an f32 matmul over dequantized operands reproduces the FP8 tensor-core result up to
//! accumulation order.
//!
//! **Weights — dequantized on the device, per call.** The HAL's `upload` carries no weight
//! semantics (a tensor is bytes + dtype), so there is no load-time hook in this crate to
//! rewrite a checkpoint tensor; each call widens the weight into an f32 temporary:
//! * values, 910B/910C (and unknown SoCs): the chip has no FP8/FP4 dtype, so an
//!   `aclTensor` of `FLOAT8_E4M3FN` is rejected. The codes are described as `UINT8`, widened
//!   with `aclnnCast(u8 → i32)` and decoded exactly by `aclnnIndexSelect` from a 256-entry
//!   lookup table (`[256]` f32 for e4m3; `[256, 2]` for a packed e2m1 pair, low nibble first).
//! * values, 950: `aclnnCast(FLOAT8_E4M3FN → f32)` — the FP8 dtype is native there. FP4
//!   (`F4E2M1x2`, a packed pair) has no one-to-one ACL dtype, so FP4 uses the table on both.
//! * scales (e8m0, both profiles): table-decoded to f32 and expanded to `[out, in]` with two
//!   `aclnnIndexSelect`s over host-built block maps (`o/128`, `i/128` or `i/32`), then
//!   `aclnnMul`.
//!
//! **Activations — known slow path, host-side:** `act_quant(x)` goes through the host like
//! `QuantSim` (see `quant.rs`), then `aclnnMm(x̃, Wᵀ, KEEP_DTYPE)`.
//!
//! Planned (not done): on the 950, `aclnnQuantMatmulV5` with FP8 operands and G-B
//! `[1,128,128]` / MX `[1,1,32]` scales; on the 910B, a load-time conversion of the checkpoint
//! to BF16 — lossless for e4m3·e8m0 and e2m1·e8m0 values — needs a model-loader hook, because
//! a bf16 matmul's bf16 *output* (the only documented one) fails the 1e-7 bound.

use hal::backend::Support;
use hal::dtype::{e2m1_to_f32, e4m3_to_f32, e8m0_to_f32};
use hal::ops::{QuantFormat, WeightFormat};
use hal::{DType, Result};

use super::{need, Buf, Ctx, View};
use crate::runtime::DeviceBuffer;
use crate::sys::{self, AclnnOps};
use crate::SocProfile;

const F: DType = DType::F32;

/// What the FP8/FP4 linear needs from the op library.
pub fn supports_lowp(ops: &AclnnOps) -> Support {
    need(&[
        ("Mm", ops.Mm.is_some() || ops.Matmul.is_some()),
        ("Cast", ops.Cast.is_some()),
        ("IndexSelect", ops.IndexSelect.is_some()),
        ("Mul", ops.Mul.is_some()),
    ])
}

/// The device lookup table `name` (built on the host once, then cached by the backend).
fn lut(cx: &mut Ctx<'_>, name: &'static str) -> Result<Buf> {
    if let Some(b) = cx.st.luts.get(name) {
        return Ok(Buf::of(b));
    }
    let vals: Vec<f32> = match name {
        "e4m3" => (0..=255u8).map(e4m3_to_f32).collect(),
        "e8m0" => (0..=255u8).map(e8m0_to_f32).collect(),
        _ => (0..=255u8).flat_map(|b| [e2m1_to_f32(b & 0xF), e2m1_to_f32(b >> 4)]).collect(),
    };
    let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let buf = cx.be.pool.alloc(bytes.len())?;
    cx.be.h2d_locked(cx.st, buf.ptr(), buf.capacity(), &bytes)?;
    let b = Buf::of(&buf);
    cx.st.luts.insert(name, buf);
    Ok(b)
}

/// `out = table[codes]`: `codes` (u8, `n` of them) → i32 → IndexSelect rows of `table`.
fn decode(cx: &mut Ctx<'_>, codes: Buf, n: usize, table: &View, out: &View) -> Result<()> {
    let ib = cx.temp(&[n], DType::I32)?;
    let idx = View::of_temp(&ib, DType::I32, &[n]);
    cx.cast(&View::new(codes, DType::U8, &[n]), &idx)?;
    super::attention::index_select_dim(cx, table, 0, &idx, out)
}

/// An f32 `[n, k]` temporary holding the dequantized weight `w` (+ `scale`).
pub fn dequant(cx: &mut Ctx<'_>, profile: &SocProfile, format: WeightFormat, w: Buf, scale: Buf, n: usize, k: usize) -> Result<(DeviceBuffer, View)> {
    let vb = cx.temp(&[n, k], F)?;
    let vals = View::of_temp(&vb, F, &[n, k]);
    let (sn, sk, col_block, row_block) = match format {
        WeightFormat::Fp8Block128 => {
            if profile.fp8_compute {
                cx.cast(&View::new(w, DType::F8E4M3, &[n, k]), &vals)?;
            } else {
                let t = View::new(lut(cx, "e4m3")?, F, &[256]);
                decode(cx, w, n * k, &t, &vals.reshape(&[n * k]))?;
            }
            (n.div_ceil(128), k.div_ceil(128), 128, 128)
        }
        _ => {
            let t = View::new(lut(cx, "e2m1x2")?, F, &[256, 2]);
            decode(cx, w, n * k / 2, &t, &vals.reshape(&[n * k / 2, 2]))?;
            (n, k / 32, 32, 1)
        }
    };
    // Scales → f32 [sn, sk] → rows expanded → columns expanded.
    let sb = cx.temp(&[sn, sk], F)?;
    let s = View::of_temp(&sb, F, &[sn, sk]);
    let t = View::new(lut(cx, "e8m0")?, F, &[256]);
    decode(cx, scale, sn * sk, &t, &s.reshape(&[sn * sk]))?;
    let rows: Vec<i32> = (0..n).map(|o| (o / row_block) as i32).collect();
    let cols: Vec<i32> = (0..k).map(|i| (i / col_block) as i32).collect();
    let bytes = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let rb = super::attention::upload(cx, &bytes(&rows))?;
    let cb = super::attention::upload(cx, &bytes(&cols))?;
    let s1b = cx.temp(&[n, sk], F)?;
    let s1 = View::of_temp(&s1b, F, &[n, sk]);
    super::attention::index_select_dim(cx, &s, 0, &View::of_temp(&rb, DType::I32, &[n]), &s1)?;
    let s2b = cx.temp(&[n, k], F)?;
    let s2 = View::of_temp(&s2b, F, &[n, k]);
    super::attention::index_select_dim(cx, &s1, 1, &View::of_temp(&cb, DType::I32, &[k]), &s2)?;
    let wb = cx.temp(&[n, k], F)?;
    let wv = View::of_temp(&wb, F, &[n, k]);
    cx.mul(&vals, &s2, &wv)?;
    Ok((wb, wv))
}

/// `x̃ = act_quant(x)` for `r` rows of `k` into a new f32 temporary — host-side slow path.
pub fn act_quant(cx: &mut Ctx<'_>, x: Buf, r: usize, k: usize) -> Result<DeviceBuffer> {
    let bytes = cx.be.d2h_locked(cx.st, x.ptr, r * k * 4)?;
    let mut v: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    for row in v.chunks_exact_mut(k.max(1)) {
        row.chunks_mut(128).for_each(|b| super::quant::sim_block(b, QuantFormat::Fp8E4M3));
    }
    let out: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
    super::attention::upload(cx, &out)
}

/// `y [r, n] = act_quant(x) · Wᵀ` for an FP8/FP4 weight.
#[allow(clippy::too_many_arguments)]
pub fn linear_lowp(cx: &mut Ctx<'_>, profile: &SocProfile, format: WeightFormat, x: Buf, w: Buf, scale: Buf, y: Buf, r: usize, k: usize, n: usize) -> Result<()> {
    if r == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        return cx.zero(y);
    }
    let xq = act_quant(cx, x, r, k)?;
    let (_wb, wv) = dequant(cx, profile, format, w, scale, n, k)?;
    let wt = wv.strided(&[k, n], &[1, k], 0);
    super::linear::matmul(cx, &View::of_temp(&xq, DType::F32, &[r, k]), &wt, &View::new(y, DType::F32, &[r, n]), sys::CUBE_KEEP_DTYPE)
}
