//! Embedding lookup, stream expansion, the broadcast add and the row gather.
//!
//! * `Embed`: `aclnnEmbedding` (fallback `aclnnIndexSelect` on dim 0) into a temporary of the
//!   table's dtype, then `aclnnCast` to f32 (for f32 tables the gather writes `out` directly).
//! * `HcExpand`: `aclnnInplaceCopy` of `x` viewed as `[R, 1, d]` into `out [R, m, d]`
//!   (broadcast over the stream axis).
//! * `Add`: `aclnnAdd` with `a`/`out` viewed as `[b_rows, rows/b_rows, w]` and `b` as
//!   `[b_rows, 1, w]`, i.e. the HAL's row-group broadcast as an ordinary broadcast.
//! * `GatherRows`: `aclnnIndexSelect` on dim 0.

use hal::backend::Support;
use hal::ops::{Add, Embed, GatherRows, HcExpand};
use hal::{DType, Error, Result};

use super::{Buf, Ctx, View};
use crate::sys::AclnnOps;

/// Embed needs a gather (Embedding or IndexSelect) and, for non-f32 tables, Cast.
pub fn supports_embed(e: &Embed, ops: &AclnnOps) -> Support {
    if !matches!(e.table_dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Support::No(format!("embedding table dtype {} (use f32, bf16 or f16)", e.table_dtype));
    }
    if ops.Embedding.is_none() && ops.IndexSelect.is_none() {
        return Support::No(
            "neither aclnnEmbedding nor aclnnIndexSelect is exported by the loaded CANN op library".into(),
        );
    }
    if e.table_dtype != DType::F32 && ops.Cast.is_none() {
        return Support::No("aclnnCast is not exported by the loaded CANN op library".into());
    }
    Support::Yes
}

/// Which gather an embedding uses: `Embedding` when exported, else `IndexSelect(dim 0)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gather {
    Embedding,
    IndexSelect,
}

/// The gather to use given which op pairs resolved.
pub fn choose_gather(has_embedding: bool, has_index_select: bool) -> Option<Gather> {
    if has_embedding {
        Some(Gather::Embedding)
    } else if has_index_select {
        Some(Gather::IndexSelect)
    } else {
        None
    }
}

/// Checks that every index is in `[0, limit)`; the error names the first bad one like cpu-ref.
pub fn check_indices(what: &str, unit: &str, idx: &[i32], limit: usize) -> Result<()> {
    match idx.iter().position(|&i| usize::try_from(i).map_or(true, |i| i >= limit)) {
        None => Ok(()),
        Some(r) => Err(Error::invalid(format!("{what} {r}"), format!("{unit} {} outside [0, {limit})", idx[r]))),
    }
}

fn gather(cx: &mut Ctx<'_>, table: &View, ids: &View, out: &View) -> Result<()> {
    let ops = cx.ops();
    let (t, i, o) = (cx.tensor(table)?, cx.tensor(ids)?, cx.tensor(out)?);
    match choose_gather(ops.Embedding.is_some(), ops.IndexSelect.is_some()) {
        // SAFETY (both arms): descriptors outlive the launch; `ws`/`ex` are launch()'s out-pointers.
        Some(Gather::Embedding) => {
            cx.launch("Embedding", ops.Embedding, |f, ws, ex| unsafe { f(t.ptr(), i.ptr(), o.ptr(), ws, ex) })
        }
        _ => cx.launch("IndexSelect", ops.IndexSelect, |f, ws, ex| unsafe { f(t.ptr(), 0, i.ptr(), o.ptr(), ws, ex) }),
    }
}

/// Op entry: [`Embed`].
pub fn run_embed(cx: &mut Ctx<'_>, op: &Embed, ins: &[Buf], outs: &[Buf]) -> Result<()> {
    let ids = cx.read_i32(ins[0], op.rows)?;
    check_indices("embed row", "token id", &ids, op.vocab)?;
    if op.rows == 0 || op.dim == 0 {
        return Ok(());
    }
    let ids = View::new(ins[0], DType::I32, &[op.rows]);
    let table = View::new(ins[1], op.table_dtype, &[op.vocab, op.dim]);
    let out = View::new(outs[0], DType::F32, &[op.rows, op.dim]);
    if op.table_dtype == DType::F32 {
        return gather(cx, &table, &ids, &out);
    }
    let tmp = cx.temp(&[op.rows, op.dim], op.table_dtype)?;
    let tv = View::of_temp(&tmp, op.table_dtype, &[op.rows, op.dim]);
    gather(cx, &table, &ids, &tv)?;
    cx.cast(&tv, &out)
}

/// Op entry: [`HcExpand`].
pub fn run_hc_expand(cx: &mut Ctx<'_>, op: &HcExpand, ins: &[Buf], outs: &[Buf]) -> Result<()> {
    if op.rows == 0 || op.mult == 0 || op.dim == 0 {
        return Ok(());
    }
    let x = View::new(ins[0], DType::F32, &[op.rows, 1, op.dim]);
    let out = View::new(outs[0], DType::F32, &[op.rows, op.mult, op.dim]);
    cx.copy(&out, &x)
}

/// Op entry: [`Add`] (`hal` has checked that `b_rows` divides `rows`).
pub fn run_add(cx: &mut Ctx<'_>, op: &Add, ins: &[Buf], outs: &[Buf]) -> Result<()> {
    if op.rows == 0 || op.width == 0 {
        return Ok(());
    }
    let per = op.rows / op.b_rows;
    let a = View::new(ins[0], DType::F32, &[op.b_rows, per, op.width]);
    let b = View::new(ins[1], DType::F32, &[op.b_rows, 1, op.width]);
    let out = View::new(outs[0], DType::F32, &[op.b_rows, per, op.width]);
    cx.add(&a, &b, &out, false)
}

/// Op entry: [`GatherRows`].
pub fn run_gather_rows(cx: &mut Ctx<'_>, op: &GatherRows, ins: &[Buf], outs: &[Buf]) -> Result<()> {
    let idx = cx.read_i32(ins[1], op.out_rows)?;
    if op.width == 0 {
        return Ok(());
    }
    check_indices("gather_rows index", "row", &idx, op.rows)?;
    if op.out_rows == 0 {
        return Ok(());
    }
    let x = View::new(ins[0], DType::F32, &[op.rows, op.width]);
    let i = View::new(ins[1], DType::I32, &[op.out_rows]);
    let out = View::new(outs[0], DType::F32, &[op.out_rows, op.width]);
    let ops = cx.ops();
    let (xt, it, ot) = (cx.tensor(&x)?, cx.tensor(&i)?, cx.tensor(&out)?);
    // SAFETY: descriptors outlive the launch; `ws`/`ex` are launch()'s out-pointers.
    cx.launch("IndexSelect", ops.IndexSelect, |f, ws, ex| unsafe { f(xt.ptr(), 0, it.ptr(), ot.ptr(), ws, ex) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_prefers_embedding_and_falls_back() {
        assert_eq!(choose_gather(true, true), Some(Gather::Embedding));
        assert_eq!(choose_gather(false, true), Some(Gather::IndexSelect));
        assert_eq!(choose_gather(false, false), None);
    }

    #[test]
    fn index_errors_name_the_row() {
        let e = check_indices("embed row", "token id", &[0, 5, 1], 3).unwrap_err().to_string();
        assert!(e.contains("embed row 1") && e.contains("token id 5"), "{e}");
        assert!(check_indices("x", "y", &[-1], 3).is_err());
        assert!(check_indices("x", "y", &[], 0).is_ok());
    }
}
