//! Embedding lookup, stream expansion, the broadcast add and the row gather.

use hal::dtype::{decode_to_f32, DType};
use hal::ops::{Add, Embed, GatherRows, HcExpand};
use hal::{Error, Result};

use crate::device::CpuStorage;

/// Whether [`embed_rows`] can decode a table of this dtype (one value per element).
pub fn embed_table_supported(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}

/// `out[r, :] = f32(table[ids[r], :])` for a little-endian `table [vocab, dim]` of `dtype`.
/// An id outside `[0, vocab)` is an error naming the row; nothing is written then.
pub fn embed_rows(ids: &[i32], table: &[u8], dtype: DType, vocab: usize, dim: usize, out: &mut [f32]) -> Result<()> {
    if let Some(r) = ids.iter().position(|&id| usize::try_from(id).map_or(true, |id| id >= vocab)) {
        return Err(Error::invalid(format!("embed row {r}"), format!("token id {} outside [0, {vocab})", ids[r])));
    }
    let row_bytes = dim * dtype.size();
    for (r, &id) in ids.iter().enumerate() {
        let id = id as usize;
        let values = decode_to_f32(dtype, &table[id * row_bytes..(id + 1) * row_bytes]);
        out[r * dim..(r + 1) * dim].copy_from_slice(&values);
    }
    Ok(())
}

/// `out[r, s, :] = x[r, :]` for each of the `mult` streams.
pub fn hc_expand(x: &[f32], mult: usize, dim: usize, out: &mut [f32]) {
    for (r, o) in out.chunks_exact_mut((mult * dim).max(1)).enumerate() {
        for s in o.chunks_exact_mut(dim.max(1)) {
            s.copy_from_slice(&x[r * dim..(r + 1) * dim]);
        }
    }
}

/// `out[r, :] = a[r, :] + b[r / (rows / b_rows), :]` (`b` has `b.len() / width` rows).
pub fn add_broadcast(a: &[f32], b: &[f32], width: usize, out: &mut [f32]) {
    let (rows, b_rows) = (a.len() / width.max(1), b.len() / width.max(1));
    let per = rows / b_rows.max(1);
    for (r, o) in out.chunks_exact_mut(width.max(1)).enumerate() {
        let (ar, br) = (&a[r * width..][..width], &b[(r / per) * width..][..width]);
        for ((v, x), y) in o.iter_mut().zip(ar).zip(br) {
            *v = x + y;
        }
    }
}

/// Op entry: [`Embed`].
pub fn run_embed(op: &Embed, ins: &[&CpuStorage], outs: &mut [&mut CpuStorage]) -> Result<()> {
    embed_rows(ins[0].i32s(), ins[1].bytes(), op.table_dtype, op.vocab, op.dim, outs[0].f32s_mut())
}

/// Op entry: [`HcExpand`].
pub fn run_hc_expand(op: &HcExpand, ins: &[&CpuStorage], outs: &mut [&mut CpuStorage]) -> Result<()> {
    hc_expand(ins[0].f32s(), op.mult, op.dim, outs[0].f32s_mut());
    Ok(())
}

/// Op entry: [`Add`] (`hal` has checked that `b_rows` divides `rows`).
pub fn run_add(op: &Add, ins: &[&CpuStorage], outs: &mut [&mut CpuStorage]) -> Result<()> {
    if op.width > 0 && op.rows > 0 {
        add_broadcast(ins[0].f32s(), ins[1].f32s(), op.width, outs[0].f32s_mut());
    }
    Ok(())
}

/// `out[i, :] = x[idx[i], :]`; an index outside `[0, rows)` is an error naming it.
pub fn gather_rows(x: &[f32], idx: &[i32], width: usize, out: &mut [f32]) -> Result<()> {
    let rows = x.len().checked_div(width).unwrap_or(0);
    for (i, (&k, o)) in idx.iter().zip(out.chunks_exact_mut(width.max(1))).enumerate() {
        let k = usize::try_from(k).ok().filter(|&k| k < rows);
        let k = k.ok_or_else(|| {
            Error::invalid(format!("gather_rows index {i}"), format!("row {} outside [0, {rows})", idx[i]))
        })?;
        o.copy_from_slice(&x[k * width..(k + 1) * width]);
    }
    Ok(())
}

/// Op entry: [`GatherRows`].
pub fn run_gather_rows(op: &GatherRows, ins: &[&CpuStorage], outs: &mut [&mut CpuStorage]) -> Result<()> {
    if op.width == 0 {
        return Ok(());
    }
    gather_rows(ins[0].f32s(), ins[1].i32s(), op.width, outs[0].f32s_mut())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embed_rejects_bad_ids() {
        let table = hal::dtype::f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
        let mut out = [0.0; 2];
        embed_rows(&[1], &table, DType::F32, 2, 2, &mut out).unwrap();
        assert_eq!(out, [3.0, 4.0]);
        let e = embed_rows(&[0, 2], &table, DType::F32, 2, 2, &mut [0.0; 4]).unwrap_err().to_string();
        assert!(e.contains("row 1"), "{e}");
        assert!(embed_rows(&[-1], &table, DType::F32, 2, 2, &mut out).is_err());
    }

    #[test]
    fn add_broadcasts_token_rows_over_streams() {
        let mut out = [0.0; 4];
        add_broadcast(&[1.0, 2.0, 3.0, 4.0], &[10.0, 20.0], 1, &mut out);
        assert_eq!(out, [11.0, 12.0, 23.0, 24.0]);
    }
}
