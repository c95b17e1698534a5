//! The KV compressor: a per-slot state machine that pools every `ratio` tokens into one
//! compressed entry (overlapping for ratio 4), then normalizes, rotates and quantizes it.

use hal::ops::Compressor;
use hal::{Error, Result};

use super::norm::rms_norm_row;
use super::quant::{hadamard, quant_sim_fp4, quant_sim_fp8};
use super::rope::{rope_table, rotate};
use super::{arity, place_rows};
use crate::device::CpuStorage;

/// FP8 simulation block of compressed (and window) KV entries.
pub const KV_FP8_BLOCK: usize = 64;
/// FP4 simulation block of the indexer's keys and queries.
pub const INDEX_FP4_BLOCK: usize = 32;

/// Pools one entry from a slot's state (`state_kv`, `state_score`: `c·ratio` rows of `c·width`
/// channels, `c = 2` with overlap). Per channel ch, a softmax over the slots' scores weights their
/// values: with overlap, rows `0..ratio` through channel ch (the previous block, left out when
/// `first`, i.e. logit −∞) and rows `ratio..2·ratio` through channel `width + ch`; without,
/// rows `0..ratio` through channel ch. Max-subtracted, f64 sums, one rounding per output.
pub fn pool_entry(
    state_kv: &[f32],
    state_score: &[f32],
    ratio: usize,
    overlap: bool,
    width: usize,
    first: bool,
    out: &mut [f32],
) {
    let stride = if overlap { 2 * width } else { width };
    let mut slots: Vec<usize> = Vec::with_capacity(2 * ratio);
    for (ch, o) in out.iter_mut().enumerate() {
        slots.clear();
        if overlap {
            if !first {
                slots.extend((0..ratio).map(|t| t * stride + ch));
            }
            slots.extend((ratio..2 * ratio).map(|t| t * stride + width + ch));
        } else {
            slots.extend((0..ratio).map(|t| t * stride + ch));
        }
        let m = slots.iter().fold(f32::NEG_INFINITY, |a, &i| a.max(state_score[i]));
        let (mut num, mut den) = (0f64, 0f64);
        for &i in &slots {
            let p = ((state_score[i] - m) as f64).exp();
            num += p * state_kv[i] as f64;
            den += p;
        }
        *o = (num / den) as f32;
    }
}

/// Finishes a pooled entry in place: `RMSNorm(e) ⊙ norm_w`, forward RoPE of the last
/// `rope_dim` dims at `pos`, then either e4m3 simulation (block 64) of the other dims or
/// (`rotate`, indexer keys) a Hadamard of all dims followed by e2m1 simulation (block 32).
pub fn finish_entry(e: &mut [f32], norm_w: &[f32], norm_eps: f32, freqs: &[f32], pos: usize, rotate_fp4: bool) {
    let x = e.to_vec();
    rms_norm_row(&x, Some(norm_w), norm_eps, e);
    let nope = e.len() - 2 * freqs.len();
    rotate(&mut e[nope..], &rope_table(pos as f32, freqs), false);
    if rotate_fp4 {
        hadamard(e);
        quant_sim_fp4(e, INDEX_FP4_BLOCK);
    } else {
        quant_sim_fp8(&mut e[..nope], KV_FP8_BLOCK);
    }
}

/// Op entry: [`Compressor`]. Rows, slots, positions and cache indices are all checked before
/// any state is touched.
pub fn run_compressor(op: &Compressor, ins: &[&CpuStorage], outs: &mut [&mut CpuStorage]) -> Result<()> {
    let name = "compressor";
    let (ratio, d, rd, cap) = (op.ratio, op.width, op.rope_dim, op.capacity);
    let (cr, cd) = (op.coff() * ratio, op.coff() * d);
    if rd % 2 != 0 || rd > d {
        return Err(Error::invalid(name, format!("rope_dim {rd} must be even and ≤ width {d}")));
    }
    if op.rotate && d % INDEX_FP4_BLOCK != 0 {
        return Err(Error::invalid(name, format!("rotated width {d} must be a multiple of {INDEX_FP4_BLOCK}")));
    }
    if !op.rotate && (d - rd) % KV_FP8_BLOCK != 0 {
        return Err(Error::invalid(
            name,
            format!("width − rope_dim = {} must be a multiple of {KV_FP8_BLOCK}", d - rd),
        ));
    }
    let (kv, score, ape, norm_w, freqs) = (ins[0].f32s(), ins[1].f32s(), ins[2].f32s(), ins[3].f32s(), ins[4].f32s());
    let places = place_rows(name, ins[5].i32s(), ins[6].i32s(), op.slots)?;
    for (r, p) in places.iter().enumerate() {
        if (p.pos + 1) % ratio == 0 && p.pos / ratio >= cap {
            return Err(Error::invalid(
                format!("{name} row {r}"),
                format!("position {} emits entry {} but the cache holds {cap}", p.pos, p.pos / ratio),
            ));
        }
    }
    let [state_kv, state_score, cache] = outs else { return Err(arity(name)) };
    let (skv, ssc) = (state_kv.f32s_mut(), state_score.f32s_mut());
    let mut entry = vec![0.0f32; d];
    for (r, p) in places.iter().enumerate() {
        let i = p.pos % ratio;
        let slot_base = p.slot * cr * cd;
        let at = slot_base + (i + if op.overlap { ratio } else { 0 }) * cd;
        skv[at..at + cd].copy_from_slice(&kv[r * cd..(r + 1) * cd]);
        for ((s, &z), &a) in
            ssc[at..at + cd].iter_mut().zip(&score[r * cd..(r + 1) * cd]).zip(&ape[i * cd..(i + 1) * cd])
        {
            *s = z + a;
        }
        if (p.pos + 1) % ratio != 0 {
            continue;
        }
        let j = p.pos / ratio;
        let slot = slot_base..slot_base + cr * cd;
        pool_entry(&skv[slot.clone()], &ssc[slot], ratio, op.overlap, d, j == 0, &mut entry);
        if op.overlap {
            let this_block = slot_base + ratio * cd..slot_base + 2 * ratio * cd;
            skv.copy_within(this_block.clone(), slot_base);
            ssc.copy_within(this_block, slot_base);
        }
        finish_entry(&mut entry, norm_w, op.norm_eps, freqs, j * ratio, op.rotate);
        let at = (p.slot * cap + j) * d;
        cache.cache_store(op.cache_dtype, at, &entry);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_overlap_entry_is_softmax_weighted_mean() {
        // ratio 4, width 1: scores ln 1, ln 2, ln 3, ln 4 → weights 0.1, 0.2, 0.3, 0.4.
        let kv = [10.0f32, 20.0, 30.0, 40.0];
        let score: Vec<f32> = (1..=4).map(|v| (v as f32).ln()).collect();
        let mut e = [0.0];
        pool_entry(&kv, &score, 4, false, 1, false, &mut e);
        assert!((e[0] - 30.0).abs() < 1e-5, "{}", e[0]);
    }

    #[test]
    fn overlap_first_entry_ignores_previous_rows() {
        // ratio 1, width 1, overlap: row 0 = previous block (kv 100), row 1 = this block through
        // channel 1 (kv 5). Equal scores: j = 0 sees only 5, later entries the mean 52.5.
        let kv = [100.0f32, 0.0, 0.0, 5.0];
        let score = [0.0f32, 0.0, 0.0, 0.0];
        let mut e = [0.0];
        pool_entry(&kv, &score, 1, true, 1, true, &mut e);
        assert_eq!(e[0], 5.0);
        pool_entry(&kv, &score, 1, true, 1, false, &mut e);
        assert_eq!(e[0], 52.5);
    }
}
