//! FP8 / FP4 checkpoint weights (`Linear` with `Fp8Block128` / `Fp4Group32`), per SoC profile.
//!
//! The HAL defines `y = W · x̃` with `x̃ = act_quant(x)` (e4m3, blocks of 128, power-of-two
//! scales) and `W` the dequantized weight. Every value involved is exact in f32 (an e4m3 or
//! e2m1 code times a power of two; products of two such values have ≤ 8 significant bits),
//! so an f32 matmul over dequantized operands reproduces the FP8 tensor-core result up to
//! accumulation order.
//!
//! **Weights without `prepare` — dequantized on the device, per call** into an f32 temporary:
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
//! **Weights after `Backend::prepare` — converted once, at load, to BF16** on profiles without
//! FP8 (FP4) compute, i.e. the 910B/910C: the per-call decode above runs once per matrix and
//! its f32 result is cast to a BF16 copy kept with the weight tensor ([`Converted`], in
//! `AscendStorage`); each call then only widens it (`aclnnCast(bf16 → f32)`, like a BF16
//! linear) before the same `aclnnMm`. Why BF16:
//! * it is exact. An e4m3 value has ≤ 4 significant bits and lies in {0} ∪ [2⁻⁹, 448]; an
//!   e2m1 value has ≤ 2 and lies in {0} ∪ [0.5, 6]. Times an e8m0 scale 2^(s−127), every
//!   value is a *normal* bf16 (8 significant bits, exponents −126..127) for s in
//!   [`E8M0_BF16_EXACT_FP8`] = 10..=246 (FP8) and [`E8M0_BF16_EXACT_FP4`] = 2..=252 (FP4);
//!   checkpoint scales sit near 2⁻¹⁰…2⁻¹⁵ (s ≈ 112..124). So the f32 weight the call widens is
//!   bit-identical to the per-call decode, and so is the output (NaN codes aside: NaN stays
//!   NaN, its payload may not). `prepare` reads the scales on the host once to check the range;
//!   a tensor with any scale outside it (subnormal or overflowing products) keeps an F32 copy
//!   instead — the per-call result itself, 4 B/param — and says so in [`WeightStats`].
//! * W8A8 int8 (what the 910B's cube also computes) would need per-channel requantization of
//!   the weights and int8 activations: lossy (≈1e-4–1e-3 NMSE), outside the HAL's 1e-7 bound
//!   and parity with the reference. It is left as an opt-in for memory-bound deployments (not
//!   done).
//! * a BF16×BF16 matmul with bf16 output would be faster but fails the 1e-7 bound, hence the
//!   widening to f32 per call.
//!
//! Memory: the checkpoint bytes are kept (so `download` and `write` keep their meaning, and a
//! write can fall back to the per-call path), so a prepared weight costs 1 + 2 = 3 B/param
//! (FP8) or 0.5 + 2 = 2.5 B/param (FP4) plus scales, against 1 or 0.5 without `prepare`.
//! Freeing the originals would bring that to 2 B/param but needs a BF16 → FP8/FP4 re-encode
//! for `download`/`write`; not done. When the pool cannot hold a copy, `prepare` leaves that
//! tensor on the per-call path (`Prepared::kept`) instead of failing the load.
//!
//! Invalidation: a copy records the scale tensor it was decoded with (process-unique id and
//! write generation); `write` to the weight, or the weight used as an op output, drops the
//! copy, and a write to the scale changes its generation, so `run` falls back to the per-call
//! decode of the current bytes until `prepare` runs again.
//!
//! On the 950, `prepare` converts nothing: FP8 is cast natively per call (its planned path is
//! `aclnnQuantMatmulV5` on the FP8/MX operands, where a BF16 copy would be the wrong
//! investment), and FP4 stays on the per-call table path.
//!
//! **Activations — on the device:** `act_quant(x)` is `QuantSim` (e4m3, blocks of 128) on a
//! copy of `x`, built from generic ops with exponents taken from the f32 bits (see `quant.rs`),
//! then `aclnnMm(x̃, Wᵀ, KEEP_DTYPE)`.
//!
//! Planned (not done): on the 950, `aclnnQuantMatmulV5` with FP8 operands and G-B
//! `[1,128,128]` / MX `[1,1,32]` scales.

use std::ops::RangeInclusive;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use hal::backend::{Backend, Prepared, Support};
use hal::dtype::{e2m1_to_f32, e4m3_to_f32, e8m0_to_f32};
use hal::ops::{QuantFormat, WeightFormat};
use hal::{DType, Error, Op, Result, Tensor};

use super::{need, Buf, Ctx, View};
use crate::runtime::DeviceBuffer;
use crate::sys::{self, AclnnOps};
use crate::{lock, AscendBackend, AscendStorage, SocProfile};

const F: DType = DType::F32;

/// E8M0 scale bytes for which every e4m3 value times the scale is zero or a normal bf16
/// (module docs): 2⁻⁹·2^(s−127) ≥ 2⁻¹²⁶ and 448·2^(s−127) ≤ bf16's largest finite value.
pub const E8M0_BF16_EXACT_FP8: RangeInclusive<u8> = 10..=246;
/// Same for e2m1 values: 0.5·2^(s−127) ≥ 2⁻¹²⁶ and 6·2^(s−127) finite.
pub const E8M0_BF16_EXACT_FP4: RangeInclusive<u8> = 2..=252;

/// Whether every scale byte keeps the decoded weight exact (and normal) in bf16.
pub fn exact_in_bf16(format: WeightFormat, scales: &[u8]) -> bool {
    let range = match format {
        WeightFormat::Fp8Block128 => E8M0_BF16_EXACT_FP8,
        WeightFormat::Fp4Group32 => E8M0_BF16_EXACT_FP4,
        WeightFormat::F32 | WeightFormat::Bf16 => return false,
    };
    scales.iter().all(|s| range.contains(s))
}

/// A load-time copy of one FP8/FP4 weight tensor (all its matrices), made by
/// [`Backend::prepare`] and kept in the weight's `AscendStorage`.
pub struct Converted {
    buf: DeviceBuffer,
    /// BF16 (exact), or F32 when a scale lies outside [`exact_in_bf16`]'s range.
    dtype: DType,
    format: WeightFormat,
    /// `[matrices, out, in]` (1 matrix for a `Linear`, one per expert for `MoeExperts`).
    dims: [usize; 3],
    /// The scale tensor it was decoded with: its id and write generation at that time.
    scale: (u64, u64),
}

impl Converted {
    /// Whether this copy is what `slot` of an op needs, decoded with `scale` as it is now.
    fn fits(&self, slot: &Slot, scale: &AscendStorage) -> bool {
        self.format == slot.format
            && self.dims == slot.dims
            && self.scale == (scale.uid, scale.generation.load(Ordering::Acquire))
    }
}

impl AscendStorage {
    /// The load-time copy `prepare` made of this weight, if any.
    fn converted(&self) -> Option<Arc<Converted>> {
        lock(&self.converted).clone()
    }
}

/// Counters of the FP8/FP4 weight paths of one backend (since it was opened).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WeightStats {
    /// Weight matrices decoded inside a `run` (the per-call path; an expert's matrix counts once
    /// per call that uses it).
    pub call_decodes: u64,
    /// Weight tensors `prepare` converted, and the device bytes of those copies.
    pub converted: u64,
    pub converted_bytes: u64,
    /// Of the converted tensors, those kept in F32 (a scale outside the bf16-exact range).
    pub f32_copies: u64,
    /// Tensors `prepare` left on the per-call path for lack of device memory.
    pub kept: u64,
}

/// FP8/FP4 bookkeeping in the backend's issue state.
#[derive(Default)]
pub struct LowpState {
    /// Load-time copies for the op being issued, by input index (set by `run` around dispatch).
    pub(crate) current: Vec<Option<Arc<Converted>>>,
    stats: WeightStats,
}

/// One FP8/FP4 weight of an op: the input indices of its values and scales, and its dims.
struct Slot {
    values: usize,
    scale: usize,
    format: WeightFormat,
    dims: [usize; 3],
}

/// The FP8/FP4 weights of `op`, in input order (none for other ops and formats).
fn slots(op: &Op) -> Vec<Slot> {
    match op {
        Op::Linear(l) if l.format.quantizes_input() => {
            vec![Slot { values: 1, scale: 2, format: l.format, dims: [1, l.out_features, l.in_features] }]
        }
        Op::GroupedLinear(g) if g.format.quantizes_input() => {
            vec![Slot { values: 1, scale: 2, format: g.format, dims: [1, g.groups * g.out_per_group, g.in_per_group] }]
        }
        Op::MoeExperts(m) if m.format.quantizes_input() => {
            [(3, m.inter, m.dim), (5, m.inter, m.dim), (7, m.dim, m.inter)]
                .into_iter()
                .map(|(values, n, k)| Slot { values, scale: values + 1, format: m.format, dims: [m.experts, n, k] })
                .collect()
        }
        _ => Vec::new(),
    }
}

/// The load-time copies that fit `op`'s inputs as they are now (for `run`; empty when `op` has
/// no FP8/FP4 weight).
pub(crate) fn attached(op: &Op, inputs: &[&AscendStorage]) -> Vec<Option<Arc<Converted>>> {
    let slots = slots(op);
    if slots.is_empty() {
        return Vec::new();
    }
    let mut out = vec![None; inputs.len()];
    for s in &slots {
        if let (Some(w), Some(sc)) = (inputs.get(s.values), inputs.get(s.scale)) {
            out[s.values] = w.converted().filter(|c| c.fits(s, sc));
        }
    }
    out
}

/// Takes the load-time copy for input `index` of the op being issued, if `run` attached one
/// (taken, so that the issue state does not keep it alive after the op).
pub(crate) fn current(cx: &mut Ctx<'_>, index: usize) -> Option<Arc<Converted>> {
    cx.st.lowp.current.get_mut(index).and_then(Option::take)
}

impl AscendBackend {
    /// FP8/FP4 weight counters of this backend (per-call decodes, load-time conversions).
    pub fn weight_stats(&self) -> WeightStats {
        lock(&self.issue).lowp.stats
    }

    /// [`Backend::prepare`]: on a profile without FP8 (FP4) compute,
    /// every FP8 (FP4) weight of `op` given in `weights` gets a load-time copy (module docs).
    pub(crate) fn prepare_lowp(&self, op: &Op, weights: &[Option<&Tensor>]) -> Result<Prepared> {
        hal::backend::check_prepare(op, weights)?;
        let sig = op.signature();
        let mut done = Prepared::default();
        let (mut bf16, mut f32s) = (0usize, 0usize);
        for slot in slots(op) {
            let (Some(w), Some(sc)) = (weights[slot.values], weights[slot.scale]) else { continue };
            let what = |i: usize| {
                let name = sig.inputs[i].name;
                move || format!("{} prepare input '{name}'", op.name())
            };
            let ws = self.storage(w, what(slot.values))?;
            let ss = self.storage(sc, what(slot.scale))?;
            let native = match slot.format {
                WeightFormat::Fp8Block128 => self.profile.fp8_compute,
                _ => self.profile.fp4_compute,
            };
            let [m, n, k] = slot.dims;
            if native || m * n * k == 0 || ws.converted().is_some_and(|c| c.fits(&slot, ss)) {
                continue;
            }
            // One D2H of the scales (load time only): a copy is exact in bf16 only for scales in range.
            let dtype = if exact_in_bf16(slot.format, &self.download(sc)?) { DType::BF16 } else { F };
            match self.convert(&slot, dtype, ws, ss) {
                Ok(c) => {
                    let bytes = c.buf.len();
                    *lock(&ws.converted) = Some(Arc::new(c));
                    let mut st = lock(&self.issue);
                    st.lowp.stats.converted += 1;
                    st.lowp.stats.converted_bytes += bytes as u64;
                    st.lowp.stats.f32_copies += u64::from(dtype == F);
                    done.converted += 1;
                    done.bytes += bytes;
                    if dtype == F {
                        f32s += 1
                    } else {
                        bf16 += 1
                    }
                }
                // No room for the copy: this tensor keeps the per-call decode (slower, same
                // numbers) rather than failing the load.
                Err(Error::OutOfMemory { .. }) => {
                    lock(&self.issue).lowp.stats.kept += 1;
                    done.kept += 1;
                }
                Err(e) => return Err(e),
            }
        }
        if done.converted + done.kept > 0 {
            let mut note = format!(
                "FP8/FP4 weights converted to BF16 at load ({} has no FP8/FP4 compute; exact, decoded once instead of per call)",
                self.profile.soc_name
            );
            if f32s > 0 {
                note += &format!("; {f32s} of {} kept as F32 (a scale outside bf16's exact range)", bf16 + f32s);
            }
            if done.kept > 0 {
                note += &format!(
                    "; {} left in checkpoint format (no device memory for the copy; decoded per call)",
                    done.kept
                );
            }
            done.note = note;
        }
        Ok(done)
    }

    /// Decodes every matrix of `slot` into a new `dtype` buffer (F32, or BF16 through `Cast`).
    fn convert(&self, slot: &Slot, dtype: DType, w: &AscendStorage, scale: &AscendStorage) -> Result<Converted> {
        let [m, n, k] = slot.dims;
        let bytes =
            |i: usize, specs: &[hal::ops::TensorSpec]| specs[i].shape.iter().product::<usize>() * specs[i].dtype.size();
        let specs = slot.format.weight_specs(n, k);
        let (wb, sb, ob) = (bytes(0, &specs), bytes(1, &specs), n * k * dtype.size());
        let mut st = self.lock_issue()?;
        // The copy first: when it does not fit, nothing has been issued.
        let buf = self.pool.alloc(m * ob)?;
        let mut cx = Ctx { be: self, st: &mut st };
        for e in 0..m {
            let part = |b: &DeviceBuffer, len: usize| Buf { ptr: b.ptr().offset(e * len), len };
            let out = View::new(part(&buf, ob), dtype, &[n, k]);
            let (wp, sp) = (part(&w.buf, wb), part(&scale.buf, sb));
            if dtype == F {
                dequant_into(&mut cx, &self.profile, slot.format, wp, sp, n, k, &out)?;
            } else {
                let (_tmp, v) = dequant(&mut cx, &self.profile, slot.format, wp, sp, n, k)?;
                cx.cast(&v, &out)?;
            }
        }
        Ok(Converted {
            buf,
            dtype,
            format: slot.format,
            dims: slot.dims,
            scale: (scale.uid, scale.generation.load(Ordering::Acquire)),
        })
    }
}

/// What the FP8/FP4 linear needs from the op library.
pub fn supports_lowp(ops: &AclnnOps) -> Support {
    match need(&[
        ("Mm", ops.Mm.is_some() || ops.Matmul.is_some()),
        ("Cast", ops.Cast.is_some()),
        ("IndexSelect", ops.IndexSelect.is_some()),
        ("Mul", ops.Mul.is_some()),
    ]) {
        Support::Yes => super::quant::supports_quant_sim(ops),
        no => no,
    }
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
pub fn dequant(
    cx: &mut Ctx<'_>,
    profile: &SocProfile,
    format: WeightFormat,
    w: Buf,
    scale: Buf,
    n: usize,
    k: usize,
) -> Result<(DeviceBuffer, View)> {
    let wb = cx.temp(&[n, k], F)?;
    let wv = View::of_temp(&wb, F, &[n, k]);
    dequant_into(cx, profile, format, w, scale, n, k, &wv)?;
    Ok((wb, wv))
}

/// `out` (f32 `[n, k]`) = the dequantized weight `w` (+ `scale`).
#[allow(clippy::too_many_arguments)]
fn dequant_into(
    cx: &mut Ctx<'_>,
    profile: &SocProfile,
    format: WeightFormat,
    w: Buf,
    scale: Buf,
    n: usize,
    k: usize,
    out: &View,
) -> Result<()> {
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
    cx.mul(&vals, &s2, out)
}

/// The f32 `[n, k]` weight matrix `index` of an FP8/FP4 weight: widened from its load-time
/// copy when `run` attached one, else decoded now (the per-call path, counted). The buffer,
/// when there is one, must outlive the launches that read the view.
#[allow(clippy::too_many_arguments)]
pub fn weight_f32(
    cx: &mut Ctx<'_>,
    profile: &SocProfile,
    format: WeightFormat,
    copy: Option<&Converted>,
    index: usize,
    w: Buf,
    scale: Buf,
    n: usize,
    k: usize,
) -> Result<(Option<DeviceBuffer>, View)> {
    if let Some(c) = copy {
        let len = n * k * c.dtype.size();
        let v = View::new(Buf { ptr: c.buf.ptr().offset(index * len), len }, c.dtype, &[n, k]);
        if c.dtype == F {
            return Ok((None, v));
        }
        let tb = cx.temp(&[n, k], F)?;
        let t = View::of_temp(&tb, F, &[n, k]);
        cx.cast(&v, &t)?;
        return Ok((Some(tb), t));
    }
    cx.st.lowp.stats.call_decodes += 1;
    let (b, v) = dequant(cx, profile, format, w, scale, n, k)?;
    Ok((Some(b), v))
}

/// `x̃ = act_quant(x)` for `r` rows of `k` into a new f32 temporary: a device copy, then the
/// HAL's e4m3 simulation in blocks of 128 on the device (`quant::quant_sim_rows`).
pub fn act_quant(cx: &mut Ctx<'_>, x: Buf, r: usize, k: usize) -> Result<DeviceBuffer> {
    let out = cx.temp(&[r.max(1), k.max(1)], F)?;
    if r * k > 0 {
        cx.copy(&View::of_temp(&out, F, &[r, k]), &View::new(x, F, &[r, k]))?;
        super::quant::quant_sim_rows(cx, Buf::of(&out), r, k, k, 128, QuantFormat::Fp8E4M3)?;
    }
    Ok(out)
}

/// `y [r, n] = act_quant(x) · Wᵀ` for an FP8/FP4 weight (`copy`: its load-time copy, if any).
#[allow(clippy::too_many_arguments)]
pub fn linear_lowp(
    cx: &mut Ctx<'_>,
    profile: &SocProfile,
    format: WeightFormat,
    copy: Option<&Converted>,
    x: Buf,
    w: Buf,
    scale: Buf,
    y: Buf,
    r: usize,
    k: usize,
    n: usize,
) -> Result<()> {
    if r == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        return cx.zero(y);
    }
    let xq = act_quant(cx, x, r, k)?;
    let (_wb, wv) = weight_f32(cx, profile, format, copy, 0, w, scale, n, k)?;
    let wt = wv.strided(&[k, n], &[1, k], 0);
    super::linear::matmul(
        cx,
        &View::of_temp(&xq, DType::F32, &[r, k]),
        &wt,
        &View::new(y, DType::F32, &[r, n]),
        sys::CUBE_KEEP_DTYPE,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use hal::dtype::{bf16_to_f32, f32_to_bf16};

    /// Zero, or a normal bf16 value (exact, and no subnormal a chip might flush).
    fn normal_bf16(v: f32) -> bool {
        v == 0.0 || (v.is_normal() && bf16_to_f32(f32_to_bf16(v)) == v)
    }

    fn all_exact(format: WeightFormat, s: u8) -> bool {
        let scale = e8m0_to_f32(s);
        match format {
            // 0x7F / 0xFF are e4m3's NaN codes (NaN stays NaN either way).
            WeightFormat::Fp8Block128 => {
                (0..=255u8).filter(|c| c & 0x7F != 0x7F).all(|c| normal_bf16(e4m3_to_f32(c) * scale))
            }
            _ => (0..16u8).all(|c| normal_bf16(e2m1_to_f32(c) * scale)),
        }
    }

    /// The module docs' claim: every value a checkpoint weight can take is a normal bf16 for the
    /// scale bytes in the ranges, and the ranges are tight (one step out, some value is not).
    #[test]
    fn bf16_exact_scale_ranges() {
        for (format, range) in
            [(WeightFormat::Fp8Block128, E8M0_BF16_EXACT_FP8), (WeightFormat::Fp4Group32, E8M0_BF16_EXACT_FP4)]
        {
            for s in range.clone() {
                assert!(all_exact(format, s), "{format:?} scale byte {s}");
            }
            assert!(!all_exact(format, range.start() - 1), "{format:?} below the range");
            assert!(!all_exact(format, range.end() + 1), "{format:?} above the range");
            assert!(exact_in_bf16(format, &[*range.start(), 127, *range.end()]));
            assert!(!exact_in_bf16(format, &[127, 255]), "the NaN scale is not exact");
        }
        // Checkpoint-like scales (what the synthetic generator and the suite draw) are well inside.
        assert!(exact_in_bf16(WeightFormat::Fp8Block128, &[112, 117, 124]));
        assert!(!exact_in_bf16(WeightFormat::F32, &[127]));
    }
}
