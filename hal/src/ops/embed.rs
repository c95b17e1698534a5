//! Embedding lookup and the small glue ops (stream expansion, add, row gather).

use super::{input, output, Signature};
use crate::dtype::DType;

/// Embedding lookup (spec §3.1).
///
/// `out[r, :] = f32(table[ids[r], :])`. Any id outside `[0, vocab)` is an error naming the row
/// (never a clamp, never garbage).
#[derive(Clone, Debug, PartialEq)]
pub struct Embed {
    pub rows: usize,
    pub vocab: usize,
    pub dim: usize,
    /// `BF16` (checkpoint) or `F32`.
    pub table_dtype: DType,
}

impl Embed {
    pub fn signature(&self) -> Signature {
        Signature {
            inputs: vec![
                input("ids", &[self.rows], DType::I32),
                input("table", &[self.vocab, self.dim], self.table_dtype),
            ],
            outputs: vec![output("out", &[self.rows, self.dim], DType::F32)],
        }
    }
}

/// Copies each row into `mult` identical residual streams (spec §3.1, §3.10):
/// `out[r, s, :] = x[r, :]` for s in 0..mult.
#[derive(Clone, Debug, PartialEq)]
pub struct HcExpand {
    pub rows: usize,
    pub mult: usize,
    pub dim: usize,
}

impl HcExpand {
    pub fn signature(&self) -> Signature {
        Signature {
            inputs: vec![input("x", &[self.rows, self.dim], DType::F32)],
            outputs: vec![output("out", &[self.rows, self.mult, self.dim], DType::F32)],
        }
    }
}

/// Elementwise sum with row broadcast: `out[r, j] = a[r, j] + b[r / (rows / b_rows), j]`.
///
/// `b_rows` divides `rows`; `b_rows == rows` is a plain add. The MoE combine (routed + shared)
/// uses the plain form; the MTP input (`e_proj(e)` broadcast over 4 streams `+ h_proj(h)`) uses
/// `a` = the stream rows `[R·4, d]` and `b` = the token rows `[R, d]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Add {
    pub rows: usize,
    pub b_rows: usize,
    pub width: usize,
}

impl Add {
    pub fn signature(&self) -> Signature {
        Signature {
            inputs: vec![
                input("a", &[self.rows, self.width], DType::F32),
                input("b", &[self.b_rows, self.width], DType::F32),
            ],
            outputs: vec![output("out", &[self.rows, self.width], DType::F32)],
        }
    }
}

/// Picks rows: `out[i, :] = x[idx[i], :]`. The LM head runs on the last row of each sequence
/// only, so a prefill of T tokens does not pay for T × vocab logits. An index outside
/// `[0, rows)` is an error.
#[derive(Clone, Debug, PartialEq)]
pub struct GatherRows {
    pub rows: usize,
    pub width: usize,
    pub out_rows: usize,
}

impl GatherRows {
    pub fn signature(&self) -> Signature {
        Signature {
            inputs: vec![input("x", &[self.rows, self.width], DType::F32), input("idx", &[self.out_rows], DType::I32)],
            outputs: vec![output("out", &[self.out_rows, self.width], DType::F32)],
        }
    }
}
