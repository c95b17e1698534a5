//! CANN's fused DeepSeek-V4 ops (ops-transformer), emulated from **`docs/ascend-fused.md`**:
//! that page is the contract (prototypes, argument tables, formulas, and the *(chosen)*
//! readings where CANN's docs are silent). Nothing here comes from cpu-ref or the HAL, so the
//! backend's mapping of HAL ops onto these ops is checked against an independent reading.
//!
//! | op | SoC | phase-1 checks (beyond [`crate::ops`]'s per-tensor ones) |
//! |---|---|---|
//! | `aclnnMhcPost` | 910B, 950 | x BF16/FP16 \[T,n,D\]; hRes f32 \[T,n,n\]; hOut = x \[T,D\]; hPost f32 \[T,n\]; out = x \[T,n,D\] |
//! | `aclnnMhcPre` | **950 only** | x \[T,n,D\]; phi f32 \[n²+2n, n·D\]; alpha f32 \[3\]; bias f32 \[n²+2n\]; optional gamma/invRms/hMix/hPre |
//! | `aclnnLightningIndexer` | 910B, 950 | layouts "TND"/"PA_BSND" only; sparseMode 3 only; K ≥ 1; block table \[B, maxBlocks\]; values required with returnValues |
//! | `aclnnSparseFlashMlaMetadata` | 910B, 950 | numHeadsKv 1, headDim 512, numHeadsQ ∈ \[1,128\]; mask modes 0; metaData INT32 \[1024\] |
//! | `aclnnSparseFlashMla` | 910B, 950 | the same limits from the shapes; ori/cmp (kv, indices, block table) given as whole triples |
//!
//! Every tensor must be contiguous *(emulator choice: the docs mark no argument as accepting
//! strided views)*. Optional tensors the doc gives no meaning for v4rt's use (`seqused*`,
//! `cmpResidualKv`, `*TopkLength`, the kv `cuSeqlens`) are refused when non-NULL rather than
//! silently ignored.
//!
//! Device data is checked when the kernel runs (a fault reported at synchronize, 507015, with
//! a message naming the op, batch and index): cumulative lengths, block ids and table reach of
//! paged keys, sparse indices, and `aclnnSparseFlashMla`'s metadata, which must hold the magic
//! word and the digest [`aclnnSparseFlashMlaMetadata`] wrote for exactly the same parameters.
//!
//! Layout strings are read as C strings; NULL is 161001 even for the `…Optional` ones (the
//! emulator implements no default layout). With `returnValues = false` the indexer's
//! `sparseValuesOut` may be NULL; when given it is validated but not written.
//!
//! Numerics: f64 accumulation, each output rounded to its dtype by [`Memory::store`] (the
//! shared codecs, which round BF16/FP16 through f32 like every emulated op).

#![allow(non_snake_case, clippy::missing_safety_doc, clippy::too_many_arguments)]

use std::ffi::{c_char, c_void, CStr};
use std::ops::Range;
use std::sync::Arc;

use crate::dtype::Dt;
use crate::memory::{Memory, TView};
use crate::ops::{finish, launch, need_contig, need_dtype, need_rank, need_shape, phase2, Check, P_INVALID, P_NULL};
use crate::state::Kernel;
use crate::{bail, guard, with_emu, Fail};

/// Data dtypes of every fused op (the docs list no FP32).
const HALF: &[Dt] = &[Dt::Bf16, Dt::F16];
/// Workspace every fused op asks for (non-zero, so the workspace path is exercised).
const WS_FUSED: u64 = 65536;
/// The only query layout implemented.
const LAYOUT_Q: &str = "TND";
/// The only key layout implemented.
const LAYOUT_KV: &str = "PA_BSND";
/// `aclnnSparseFlashMla`'s documented limits.
const MLA_HEAD_DIM: i64 = 512;
const MLA_MAX_HEADS_Q: i64 = 128;
/// `metaData` length (INT32 words) and its first word.
const META_WORDS: i64 = 1024;
const META_MAGIC: i32 = 0x5346_4D44; // "SFMD"

phase2!(aclnnMhcPost, aclnnMhcPre, aclnnLightningIndexer, aclnnSparseFlashMlaMetadata, aclnnSparseFlashMla);

// ---------------------------------------------------------------- phase-1 helpers

/// An optional tensor: NULL → `None`, otherwise checked like a required one.
fn optional(c: &mut Check, p: *const c_void, name: &str) -> Result<Option<TView>, Fail> {
    if p.is_null() {
        return Ok(None);
    }
    c.tensor(p, name).map(Some)
}

/// Dtype, exact shape and contiguity.
fn need(v: &TView, name: &str, dts: &[Dt], shape: &[i64]) -> Result<(), Fail> {
    need_dtype(v, name, dts)?;
    need_shape(v, name, shape)?;
    need_contig(v, name)
}

/// Same dtype as `like`, exact shape, contiguous.
fn need_like(v: &TView, name: &str, like: &TView, like_name: &str, shape: &[i64]) -> Result<(), Fail> {
    if v.dt != like.dt {
        bail!(P_INVALID, "{name}: dtype {:?} differs from {like_name}'s {:?}", v.dt, like.dt);
    }
    need_shape(v, name, shape)?;
    need_contig(v, name)
}

/// A 1-D or 2-D INT32 index/length tensor (contiguous); returns its dims.
fn need_ints(v: &TView, name: &str, rank: usize) -> Result<Vec<i64>, Fail> {
    need_dtype(v, name, &[Dt::I32])?;
    need_rank(v, name, rank, rank)?;
    need_contig(v, name)?;
    Ok(v.dims.clone())
}

/// A paged key tensor `[blocks, blockSize, 1, d]` (PA_BSND, one key head) of `like`'s dtype.
fn need_paged(v: &TView, name: &str, like: &TView, like_name: &str, d: i64) -> Result<(), Fail> {
    need_rank(v, name, 4, 4)?;
    need_like(v, name, like, like_name, &[v.dims[0], v.dims[1], 1, d])?;
    if v.dims[1] < 1 {
        bail!(P_INVALID, "{name}: blockSize (dim 1) must be ≥ 1");
    }
    Ok(())
}

/// A layout string: required here, and exactly `want`.
///
/// # Safety
/// `p` is NULL or a NUL-terminated C string.
unsafe fn need_layout(p: *const c_char, name: &str, want: &str) -> Result<(), Fail> {
    if p.is_null() {
        bail!(P_NULL, "{name} is nullptr (this emulator implements \"{want}\")");
    }
    // SAFETY: non-null and NUL-terminated per the caller's contract.
    let s = unsafe { CStr::from_ptr(p) };
    if s.to_bytes() != want.as_bytes() {
        bail!(
            P_INVALID,
            "{name} \"{}\" is not supported (this emulator implements \"{want}\" only)",
            s.to_string_lossy()
        );
    }
    Ok(())
}

/// Refuses an optional tensor whose meaning docs/ascend-fused.md does not define.
fn not_implemented(p: *const c_void, name: &str) -> Result<(), Fail> {
    if !p.is_null() {
        bail!(
            P_INVALID,
            "{name}: not implemented by this emulator (docs/ascend-fused.md defines no use for it); pass NULL"
        );
    }
    Ok(())
}

/// Mask modes: only 0 (no mask; sparse indices given explicitly) is defined.
fn need_mask_modes(ori: i64, cmp: i64) -> Result<(), Fail> {
    for (v, name) in [(ori, "oriMaskMode"), (cmp, "cmpMaskMode")] {
        if v != 0 {
            bail!(P_INVALID, "{name} {v} is not supported (this emulator implements mask mode 0 only)");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- kernel helpers

/// An INT32 tensor's values (device data: known only when the kernel runs).
fn ints(m: &Memory, v: &TView) -> Result<Vec<i64>, String> {
    Ok(m.load(v, None)?.into_iter().map(|x| x as i64).collect())
}

/// Token ranges of the batches from boundaries `[0, e1, …, total]`: a fault unless they start
/// at 0, never decrease and end at `total`.
fn batches(name: &str, bounds: &[i64], total: usize) -> Result<Vec<Range<usize>>, String> {
    let bad = bounds.first() != Some(&0)
        || bounds.windows(2).any(|w| w[1] < w[0])
        || bounds.last().is_some_and(|&l| l != total as i64);
    if bad {
        return Err(format!("{name} {bounds:?} are not cumulative token counts from 0 to T = {total}"));
    }
    Ok(bounds.windows(2).map(|w| w[0] as usize..w[1] as usize).collect())
}

/// A paged (PA_BSND) key tensor with its block table.
struct Paged {
    what: &'static str,
    kv: TView,
    table: Vec<i64>,
    max_blocks: i64,
}

impl Paged {
    fn load(m: &Memory, what: &'static str, kv: &TView, table: &TView) -> Result<Paged, String> {
        Ok(Paged { what, kv: kv.clone(), table: ints(m, table)?, max_blocks: table.dims[1] })
    }

    /// Key row of logical position `s` of batch `b`: block `table[b, s / blockSize]`, row
    /// `s % blockSize`; a position beyond the table or a block id outside the key tensor is a
    /// kernel fault.
    fn row(&self, m: &Memory, b: usize, s: i64) -> Result<Vec<f64>, String> {
        let (what, bs, blocks) = (self.what, self.kv.dims[1], self.kv.dims[0]);
        if s < 0 {
            return Err(format!("{what}: batch {b}, key index {s}: negative position"));
        }
        let slot = s / bs;
        if slot >= self.max_blocks {
            return Err(format!(
                "{what}: batch {b}, key index {s}: beyond the block table ({} blocks × blockSize {bs})",
                self.max_blocks
            ));
        }
        let block = self.table[b * self.max_blocks as usize + slot as usize];
        if block < 0 || block >= blocks {
            return Err(format!(
                "{what}: batch {b}, key index {s}: block id {block} (blockTable[{b}, {slot}]) outside the key tensor's blocks [0, {blocks})"
            ));
        }
        let kv = &self.kv;
        let row = TView {
            dims: vec![kv.dims[3]],
            strides: vec![kv.strides[3]],
            offset: kv.offset + block * kv.strides[0] + (s % bs) * kv.strides[1],
            ..kv.clone()
        };
        m.load(&row, None)
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

// ---------------------------------------------------------------- aclnnMhcPost

#[no_mangle]
pub unsafe extern "C" fn aclnnMhcPostGetWorkspaceSize(
    x: *const c_void,
    h_res: *const c_void,
    h_out: *const c_void,
    h_post: *const c_void,
    out: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    guard("aclnnMhcPostGetWorkspaceSize", || {
        with_emu(|e| {
            let mut c = Check::new(e)?;
            let xv = c.tensor(x, "x")?;
            let hr = c.tensor(h_res, "hRes")?;
            let ho = c.tensor(h_out, "hOut")?;
            let hp = c.tensor(h_post, "hPost")?;
            let o = c.tensor(out, "out")?;
            need_dtype(&xv, "x", HALF)?;
            need_rank(&xv, "x", 3, 3)?;
            need_contig(&xv, "x")?;
            let (t, n, d) = (xv.dims[0], xv.dims[1], xv.dims[2]);
            need(&hr, "hRes", &[Dt::F32], &[t, n, n])?;
            need_like(&ho, "hOut", &xv, "x", &[t, d])?;
            need(&hp, "hPost", &[Dt::F32], &[t, n])?;
            need_like(&o, "out", &xv, "x", &[t, n, d])?;
            let handles = std::mem::take(&mut c.handles);
            let (n, d) = (n as usize, d as usize);
            let kernel: Kernel = Arc::new(move |m: &mut Memory| {
                let (xs, res, hout, post) =
                    (m.load(&xv, None)?, m.load(&hr, None)?, m.load(&ho, None)?, m.load(&hp, None)?);
                let mut r = vec![0f64; xs.len()];
                for t in 0..xv.dims[0] as usize {
                    for k in 0..n {
                        for dd in 0..d {
                            let mixed: f64 = (0..n).map(|j| res[(t * n + j) * n + k] * xs[(t * n + j) * d + dd]).sum();
                            r[(t * n + k) * d + dd] = post[t * n + k] * hout[t * d + dd] + mixed;
                        }
                    }
                }
                m.store(&o, &r)
            });
            // SAFETY: out-pointers from the caller, checked for NULL in `finish`.
            unsafe { finish(e, "aclnnMhcPost", WS_FUSED, handles, kernel, ws, ex) }
        })
    })
}

// ---------------------------------------------------------------- aclnnMhcPre

#[no_mangle]
pub unsafe extern "C" fn aclnnMhcPreGetWorkspaceSize(
    x: *const c_void,
    phi: *const c_void,
    alpha: *const c_void,
    bias: *const c_void,
    gamma_optional: *const c_void,
    norm_eps: f64,
    hc_eps: f64,
    h_in: *mut c_void,
    h_post: *mut c_void,
    h_res: *mut c_void,
    inv_rms_optional: *mut c_void,
    h_mix_optional: *mut c_void,
    h_pre_optional: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    guard("aclnnMhcPreGetWorkspaceSize", || {
        with_emu(|e| {
            // The doc's product table lists the 950 only (`low_precision` is the 950-family test).
            if !e.config.low_precision() {
                bail!(P_INVALID, "aclnnMhcPre is not supported on {} (Ascend950 only)", e.config.soc_name());
            }
            let mut c = Check::new(e)?;
            let xv = c.tensor(x, "x")?;
            let ph = c.tensor(phi, "phi")?;
            let al = c.tensor(alpha, "alpha")?;
            let bi = c.tensor(bias, "bias")?;
            let ga = optional(&mut c, gamma_optional, "gammaOptional")?;
            let hi = c.tensor(h_in, "hIn")?;
            let hp = c.tensor(h_post, "hPost")?;
            let hr = c.tensor(h_res, "hRes")?;
            let ir = optional(&mut c, inv_rms_optional, "invRmsOptional")?;
            let hm = optional(&mut c, h_mix_optional, "hMixOptional")?;
            let hq = optional(&mut c, h_pre_optional, "hPreOptional")?;
            need_dtype(&xv, "x", HALF)?;
            need_rank(&xv, "x", 3, 3)?;
            need_contig(&xv, "x")?;
            let (t, n, d) = (xv.dims[0], xv.dims[1], xv.dims[2]);
            if n < 1 || d < 1 {
                bail!(P_INVALID, "x: shape {:?} needs n ≥ 1 and D ≥ 1", xv.dims);
            }
            let (Some(nd), Some(mix)) = (n.checked_mul(d), n.checked_add(2).and_then(|m| m.checked_mul(n))) else {
                bail!(P_INVALID, "x: shape {:?} is too large", xv.dims);
            };
            need(&ph, "phi", &[Dt::F32], &[mix, nd])?;
            need(&al, "alpha", &[Dt::F32], &[3])?;
            need(&bi, "bias", &[Dt::F32], &[mix])?;
            if let Some(g) = &ga {
                need(g, "gammaOptional", &[Dt::F32], &[nd])?;
            }
            need_like(&hi, "hIn", &xv, "x", &[t, d])?;
            need(&hp, "hPost", &[Dt::F32], &[t, n])?;
            need(&hr, "hRes", &[Dt::F32], &[t, n, n])?;
            for (v, name, shape) in [
                (&ir, "invRmsOptional", vec![t]),
                (&hm, "hMixOptional", vec![t, mix]),
                (&hq, "hPreOptional", vec![t, n]),
            ] {
                if let Some(v) = v {
                    need(v, name, &[Dt::F32], &shape)?;
                }
            }
            for (v, name) in [(norm_eps, "normEps"), (hc_eps, "hcEps")] {
                if !v.is_finite() || v < 0.0 {
                    bail!(P_INVALID, "{name} {v} must be finite and ≥ 0");
                }
            }
            let handles = std::mem::take(&mut c.handles);
            let (n, d, nd, mix) = (n as usize, d as usize, nd as usize, mix as usize);
            let kernel: Kernel = Arc::new(move |m: &mut Memory| {
                let (xs, phi, alpha, bias) =
                    (m.load(&xv, None)?, m.load(&ph, None)?, m.load(&al, None)?, m.load(&bi, None)?);
                let gamma = match &ga {
                    Some(g) => m.load(g, None)?,
                    None => vec![1.0; nd],
                };
                let rows = xv.dims[0] as usize;
                let (mut hin, mut post, mut res) =
                    (vec![0f64; rows * d], vec![0f64; rows * n], vec![0f64; rows * n * n]);
                let (mut inv_rms, mut mixes, mut pres) =
                    (vec![0f64; rows], vec![0f64; rows * mix], vec![0f64; rows * n]);
                for t in 0..rows {
                    let xr = &xs[t * nd..(t + 1) * nd];
                    let rho = 1.0 / (xr.iter().map(|v| v * v).sum::<f64>() / nd as f64 + norm_eps).sqrt();
                    let xg: Vec<f64> = xr.iter().zip(&gamma).map(|(x, g)| x * g).collect();
                    let mu: Vec<f64> = (0..mix).map(|r| dot(&phi[r * nd..(r + 1) * nd], &xg) * rho).collect();
                    let pre: Vec<f64> = (0..n).map(|i| sigmoid(alpha[0] * mu[i] + bias[i]) + hc_eps).collect();
                    for i in 0..n {
                        post[t * n + i] = 2.0 * sigmoid(alpha[1] * mu[n + i] + bias[n + i]);
                    }
                    for jk in 0..n * n {
                        res[t * n * n + jk] = alpha[2] * mu[2 * n + jk] + bias[2 * n + jk];
                    }
                    for dd in 0..d {
                        hin[t * d + dd] = (0..n).map(|i| pre[i] * xr[i * d + dd]).sum();
                    }
                    inv_rms[t] = rho;
                    mixes[t * mix..(t + 1) * mix].copy_from_slice(&mu);
                    pres[t * n..(t + 1) * n].copy_from_slice(&pre);
                }
                m.store(&hi, &hin)?;
                m.store(&hp, &post)?;
                m.store(&hr, &res)?;
                for (v, vals) in [(&ir, &inv_rms), (&hm, &mixes), (&hq, &pres)] {
                    if let Some(v) = v {
                        m.store(v, vals)?;
                    }
                }
                Ok(())
            });
            // SAFETY: out-pointers from the caller, checked for NULL in `finish`.
            unsafe { finish(e, "aclnnMhcPre", WS_FUSED, handles, kernel, ws, ex) }
        })
    })
}

// ---------------------------------------------------------------- aclnnLightningIndexer

#[no_mangle]
pub unsafe extern "C" fn aclnnLightningIndexerGetWorkspaceSize(
    query: *const c_void,
    key: *const c_void,
    weights: *const c_void,
    actual_seq_lengths_query_optional: *const c_void,
    actual_seq_lengths_key_optional: *const c_void,
    block_table_optional: *const c_void,
    layout_query_optional: *mut c_char,
    layout_key_optional: *mut c_char,
    sparse_count: i64,
    sparse_mode: i64,
    _pre_tokens: i64,
    _next_tokens: i64,
    return_values: bool,
    sparse_indices_out: *mut c_void,
    sparse_values_out: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    guard("aclnnLightningIndexerGetWorkspaceSize", || {
        with_emu(|e| {
            let mut c = Check::new(e)?;
            let q = c.tensor(query, "query")?;
            let k = c.tensor(key, "key")?;
            let w = c.tensor(weights, "weights")?;
            let asq = c.tensor(actual_seq_lengths_query_optional, "actualSeqLengthsQueryOptional")?;
            let ask = c.tensor(actual_seq_lengths_key_optional, "actualSeqLengthsKeyOptional")?;
            let bt = c.tensor(block_table_optional, "blockTableOptional")?;
            // SAFETY: C strings from the caller (NULL checked).
            unsafe {
                need_layout(layout_query_optional, "layoutQueryOptional", LAYOUT_Q)?;
                need_layout(layout_key_optional, "layoutKeyOptional", LAYOUT_KV)?;
            }
            if sparse_mode != 3 {
                bail!(P_INVALID, "sparseMode {sparse_mode} is not supported (this emulator implements mode 3, causal bottom-right, only)");
            }
            if sparse_count < 1 {
                bail!(P_INVALID, "sparseCount {sparse_count} must be ≥ 1");
            }
            let si = c.tensor(sparse_indices_out, "sparseIndicesOut")?;
            let sv = if return_values {
                if sparse_values_out.is_null() {
                    bail!(P_NULL, "sparseValuesOut is nullptr but returnValues is true");
                }
                Some(c.tensor(sparse_values_out, "sparseValuesOut")?)
            } else {
                optional(&mut c, sparse_values_out, "sparseValuesOut")?
            };
            need_dtype(&q, "query", HALF)?;
            need_rank(&q, "query", 3, 3)?;
            need_contig(&q, "query")?;
            let (t, heads, d) = (q.dims[0], q.dims[1], q.dims[2]);
            need_paged(&k, "key", &q, "query", d)?;
            need_like(&w, "weights", &q, "query", &[t, heads])?;
            let b = need_ints(&asq, "actualSeqLengthsQueryOptional", 1)?[0];
            need(&ask, "actualSeqLengthsKeyOptional", &[Dt::I32], &[b])?;
            let tb = need_ints(&bt, "blockTableOptional", 2)?;
            if tb[0] != b {
                bail!(P_INVALID, "blockTableOptional: shape {tb:?} has {} rows for {b} batches (actualSeqLengthsQueryOptional has {b} entries)", tb[0]);
            }
            let kk = sparse_count;
            need(&si, "sparseIndicesOut", &[Dt::I32], &[t, 1, kk])?;
            if let Some(v) = &sv {
                need(v, "sparseValuesOut", &[Dt::F32], &[t, 1, kk])?;
            }
            let handles = std::mem::take(&mut c.handles);
            let (heads, d, kk) = (heads as usize, d as usize, kk as usize);
            let kernel: Kernel = Arc::new(move |m: &mut Memory| {
                let (qs, wts) = (m.load(&q, None)?, m.load(&w, None)?);
                let rows = q.dims[0] as usize;
                let mut bounds = vec![0];
                bounds.extend(ints(m, &asq)?);
                let ranges = batches("actualSeqLengthsQuery", &bounds, rows)?;
                let key_lens = ints(m, &ask)?;
                let keys = Paged::load(m, "key", &k, &bt)?;
                let (mut idx, mut vals) = (vec![-1f64; rows * kk], vec![f64::NEG_INFINITY; rows * kk]);
                for (b, r) in ranges.into_iter().enumerate() {
                    let (s1, s2) = (r.len() as i64, key_lens[b]);
                    if s2 < 0 {
                        return Err(format!("actualSeqLengthsKey[{b}] = {s2} is negative"));
                    }
                    if s1 == 0 {
                        continue;
                    }
                    // The last query of the batch sees every key, so all S2 rows are read.
                    let rows_b: Vec<Vec<f64>> = (0..s2).map(|s| keys.row(m, b, s)).collect::<Result<_, _>>()?;
                    for (i, t) in r.enumerate() {
                        let visible = (s2 - s1 + i as i64 + 1).clamp(0, s2) as usize;
                        let score: Vec<f64> = rows_b[..visible]
                            .iter()
                            .map(|key| {
                                let sum: f64 = (0..heads)
                                    .map(|g| {
                                        wts[t * heads + g]
                                            * dot(&qs[(t * heads + g) * d..(t * heads + g + 1) * d], key).max(0.0)
                                    })
                                    .sum();
                                sum + 0.0 // −0 → +0, so equal scores compare equal below
                            })
                            .collect();
                        let mut order: Vec<usize> = (0..visible).collect();
                        // Stable: ties keep the lower position first.
                        order.sort_by(|&a, &b| score[b].total_cmp(&score[a]));
                        for (j, &s) in order.iter().take(kk).enumerate() {
                            idx[t * kk + j] = s as f64;
                            vals[t * kk + j] = score[s];
                        }
                    }
                }
                m.store(&si, &idx)?;
                match (&sv, return_values) {
                    (Some(v), true) => m.store(v, &vals),
                    _ => Ok(()),
                }
            });
            // SAFETY: out-pointers from the caller, checked for NULL in `finish`.
            unsafe { finish(e, "aclnnLightningIndexer", WS_FUSED, handles, kernel, ws, ex) }
        })
    })
}

// ---------------------------------------------------------------- SparseFlashMla(+Metadata)

/// The parameters metadata is generated for (the doc's digest list); the layouts are fixed
/// ("TND", "PA_BSND") because no other is accepted, and enter the digest as constants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MlaParams {
    num_heads_q: i64,
    num_heads_kv: i64,
    head_dim: i64,
    batch_size: i64,
    cmp_ratio: i64,
    ori_mask_mode: i64,
    cmp_mask_mode: i64,
    ori_win_left: i64,
    ori_win_right: i64,
    has_ori_kv: bool,
    has_cmp_kv: bool,
}

impl MlaParams {
    fn fields(&self) -> [(&'static str, i64); 11] {
        [
            ("numHeadsQ", self.num_heads_q),
            ("numHeadsKv", self.num_heads_kv),
            ("headDim", self.head_dim),
            ("batchSize", self.batch_size),
            ("cmpRatio", self.cmp_ratio),
            ("oriMaskMode", self.ori_mask_mode),
            ("cmpMaskMode", self.cmp_mask_mode),
            ("oriWinLeft", self.ori_win_left),
            ("oriWinRight", self.ori_win_right),
            ("hasOriKv", self.has_ori_kv as i64),
            ("hasCmpKv", self.has_cmp_kv as i64),
        ]
    }

    /// FNV-1a (64-bit) over the fields and the layout strings.
    fn digest(&self) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        let bytes = self.fields().iter().flat_map(|(_, v)| v.to_le_bytes()).collect::<Vec<u8>>();
        for &byte in bytes.iter().chain(LAYOUT_Q.as_bytes()).chain(LAYOUT_KV.as_bytes()) {
            h = (h ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
        }
        h
    }

    /// The metadata words: magic, digest (2 words), each field (2 words, for diagnostics), 0s.
    fn encode(&self) -> Vec<f64> {
        let split = |v: u64| [(v as u32) as i32 as f64, ((v >> 32) as u32) as i32 as f64];
        let mut w = vec![META_MAGIC as f64];
        w.extend(split(self.digest()));
        for (_, v) in self.fields() {
            w.extend(split(v as u64));
        }
        w.resize(META_WORDS as usize, 0.0);
        w
    }

    /// Checks metadata words against these parameters (a kernel fault on mismatch).
    fn check(&self, w: &[f64]) -> Result<(), String> {
        let join = |i: usize| (((w[i + 1] as i64 as u32 as u64) << 32) | (w[i] as i64 as u32 as u64)) as i64;
        if w.len() != META_WORDS as usize || w[0] as i64 != META_MAGIC as i64 {
            return Err(format!(
                "metadataOptional was not written by aclnnSparseFlashMlaMetadata (word 0 is {:#x}, not the magic {META_MAGIC:#x})",
                w.first().map_or(0, |&v| v as i64)
            ));
        }
        if join(1) as u64 == self.digest() {
            return Ok(());
        }
        let diffs: Vec<String> = self
            .fields()
            .iter()
            .enumerate()
            .filter(|&(i, &(_, v))| join(3 + 2 * i) != v)
            .map(|(i, &(name, v))| format!("{name} {} (metadata) vs {v} (this call)", join(3 + 2 * i)))
            .collect();
        Err(format!(
            "metadataOptional was generated for other parameters than this call's: {}",
            if diffs.is_empty() { "digest mismatch".to_string() } else { diffs.join(", ") }
        ))
    }
}

/// The length tensors of `SparseFlashMla` (and its metadata op) that the doc gives no meaning
/// for v4rt's layout, in prototype order: refused when given (docs/ascend-fused.md §4).
const UNUSED_LENGTH_TENSORS: [&str; 8] = [
    "cuSeqlensOriKvOptional",
    "cuSeqlensCmpKvOptional",
    "sequsedQOptional",
    "sequsedOriKvOptional",
    "sequsedCmpKvOptional",
    "cmpResidualKvOptional",
    "oriTopkLengthOptional",
    "cmpTopkLengthOptional",
];

fn refuse_length_tensors(ptrs: [*const c_void; 8]) -> Result<(), Fail> {
    ptrs.into_iter().zip(UNUSED_LENGTH_TENSORS).try_for_each(|(p, name)| not_implemented(p, name))
}

#[no_mangle]
pub unsafe extern "C" fn aclnnSparseFlashMlaMetadataGetWorkspaceSize(
    cu_seqlens_q_optional: *const c_void,
    cu_seqlens_ori_kv_optional: *const c_void,
    cu_seqlens_cmp_kv_optional: *const c_void,
    seqused_q_optional: *const c_void,
    seqused_ori_kv_optional: *const c_void,
    seqused_cmp_kv_optional: *const c_void,
    cmp_residual_kv_optional: *const c_void,
    ori_topk_length_optional: *const c_void,
    cmp_topk_length_optional: *const c_void,
    num_heads_q: i64,
    num_heads_kv: i64,
    head_dim: i64,
    batch_size: i64,
    max_seqlen_q: i64,
    max_seqlen_kv: i64,
    cmp_ratio: i64,
    ori_mask_mode: i64,
    cmp_mask_mode: i64,
    ori_win_left: i64,
    ori_win_right: i64,
    layout_q: *mut c_char,
    layout_kv: *mut c_char,
    has_ori_kv: bool,
    has_cmp_kv: bool,
    meta_data: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    guard("aclnnSparseFlashMlaMetadataGetWorkspaceSize", || {
        with_emu(|e| {
            let mut c = Check::new(e)?;
            let cuq = optional(&mut c, cu_seqlens_q_optional, "cuSeqlensQOptional")?;
            refuse_length_tensors([
                cu_seqlens_ori_kv_optional,
                cu_seqlens_cmp_kv_optional,
                seqused_q_optional,
                seqused_ori_kv_optional,
                seqused_cmp_kv_optional,
                cmp_residual_kv_optional,
                ori_topk_length_optional,
                cmp_topk_length_optional,
            ])?;
            let md = c.tensor(meta_data, "metaData")?;
            if !(1..=MLA_MAX_HEADS_Q).contains(&num_heads_q) {
                bail!(P_INVALID, "numHeadsQ {num_heads_q} outside [1, {MLA_MAX_HEADS_Q}]");
            }
            if num_heads_kv != 1 {
                bail!(P_INVALID, "numHeadsKv {num_heads_kv} is not supported (must be 1)");
            }
            if head_dim != MLA_HEAD_DIM {
                bail!(P_INVALID, "headDim {head_dim} is not supported (must be {MLA_HEAD_DIM})");
            }
            for (v, name) in [(batch_size, "batchSize"), (max_seqlen_q, "maxSeqlenQ"), (max_seqlen_kv, "maxSeqlenKv")] {
                if v < 0 {
                    bail!(P_INVALID, "{name} {v} must be ≥ 0");
                }
            }
            if !has_ori_kv && !has_cmp_kv {
                bail!(P_INVALID, "hasOriKv and hasCmpKv are both false (no keys)");
            }
            if has_cmp_kv && cmp_ratio < 1 {
                bail!(P_INVALID, "cmpRatio {cmp_ratio} must be ≥ 1 with hasCmpKv");
            }
            need_mask_modes(ori_mask_mode, cmp_mask_mode)?;
            // SAFETY: C strings from the caller (NULL checked).
            unsafe {
                need_layout(layout_q, "layoutQ", LAYOUT_Q)?;
                need_layout(layout_kv, "layoutKv", LAYOUT_KV)?;
            }
            if let Some(v) = &cuq {
                need(v, "cuSeqlensQOptional", &[Dt::I32], &[batch_size.saturating_add(1)])?;
            }
            need(&md, "metaData", &[Dt::I32], &[META_WORDS])?;
            let params = MlaParams {
                num_heads_q,
                num_heads_kv,
                head_dim,
                batch_size,
                cmp_ratio,
                ori_mask_mode,
                cmp_mask_mode,
                ori_win_left,
                ori_win_right,
                has_ori_kv,
                has_cmp_kv,
            };
            let handles = std::mem::take(&mut c.handles);
            let kernel: Kernel = Arc::new(move |m: &mut Memory| m.store(&md, &params.encode()));
            // SAFETY: out-pointers from the caller, checked for NULL in `finish`.
            unsafe { finish(e, "aclnnSparseFlashMlaMetadata", WS_FUSED, handles, kernel, ws, ex) }
        })
    })
}

/// One side (ori or cmp) of `aclnnSparseFlashMla`'s keys, as validated in phase 1.
struct Side {
    what: &'static str,
    kv: TView,
    indices: TView,
    table: TView,
}

/// Checks that a side's kv, sparse indices and block table are given together, and their
/// shapes against q (`t` tokens, `b` batches).
fn mla_side(
    c: &mut Check,
    what: &'static str,
    [kv, idx, table]: [*const c_void; 3],
    q: &TView,
    b: i64,
) -> Result<Option<Side>, Fail> {
    let names =
        [format!("{what}KvOptional"), format!("{what}SparseIndicesOptional"), format!("{what}BlockTableOptional")];
    let given = [kv, idx, table].map(|p| !p.is_null());
    if given.iter().any(|&g| g != given[0]) {
        let list = |want: bool| {
            names.iter().zip(given).filter(|&(_, g)| g == want).map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
        };
        bail!(
            P_INVALID,
            "{}, {} and {} must be given together or all be NULL (given: {}; NULL: {})",
            names[0],
            names[1],
            names[2],
            list(true),
            list(false)
        );
    }
    if !given[0] {
        return Ok(None);
    }
    let kv = c.tensor(kv, &names[0])?;
    let indices = c.tensor(idx, &names[1])?;
    let table = c.tensor(table, &names[2])?;
    need_paged(&kv, &names[0], q, "q", MLA_HEAD_DIM)?;
    let id = need_ints(&indices, &names[1], 3)?;
    need_shape(&indices, &names[1], &[q.dims[0], 1, id[2]])?;
    let tb = need_ints(&table, &names[2], 2)?;
    if tb[0] != b {
        bail!(
            P_INVALID,
            "{}: shape {tb:?} has {} rows for {b} batches (cuSeqlensQOptional has {} entries)",
            names[2],
            tb[0],
            b + 1
        );
    }
    Ok(Some(Side { what, kv, indices, table }))
}

#[no_mangle]
pub unsafe extern "C" fn aclnnSparseFlashMlaGetWorkspaceSize(
    q: *const c_void,
    ori_kv_optional: *const c_void,
    cmp_kv_optional: *const c_void,
    ori_sparse_indices_optional: *const c_void,
    cmp_sparse_indices_optional: *const c_void,
    ori_block_table_optional: *const c_void,
    cmp_block_table_optional: *const c_void,
    cu_seqlens_q_optional: *const c_void,
    cu_seqlens_ori_kv_optional: *const c_void,
    cu_seqlens_cmp_kv_optional: *const c_void,
    seqused_q_optional: *const c_void,
    seqused_ori_kv_optional: *const c_void,
    seqused_cmp_kv_optional: *const c_void,
    cmp_residual_kv_optional: *const c_void,
    ori_topk_length_optional: *const c_void,
    cmp_topk_length_optional: *const c_void,
    sinks_optional: *const c_void,
    metadata_optional: *const c_void,
    softmax_scale: f64,
    cmp_ratio: i64,
    ori_mask_mode: i64,
    cmp_mask_mode: i64,
    ori_win_left: i64,
    ori_win_right: i64,
    layout_q: *mut c_char,
    layout_kv: *mut c_char,
    topk_value_mode: i64,
    return_softmax_lse: bool,
    attn_out_out: *mut c_void,
    _softmax_lse_out_optional: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    guard("aclnnSparseFlashMlaGetWorkspaceSize", || {
        with_emu(|e| {
            let mut c = Check::new(e)?;
            let qv = c.tensor(q, "q")?;
            need_dtype(&qv, "q", HALF)?;
            need_rank(&qv, "q", 3, 3)?;
            need_contig(&qv, "q")?;
            let (t, heads) = (qv.dims[0], qv.dims[1]);
            if !(1..=MLA_MAX_HEADS_Q).contains(&heads) {
                bail!(P_INVALID, "q: numHeadsQ {heads} (dim 1) outside [1, {MLA_MAX_HEADS_Q}]");
            }
            if qv.dims[2] != MLA_HEAD_DIM {
                bail!(P_INVALID, "q: headDim {} (dim 2) is not supported (must be {MLA_HEAD_DIM})", qv.dims[2]);
            }
            let cuq = c.tensor(cu_seqlens_q_optional, "cuSeqlensQOptional")?;
            let b = need_ints(&cuq, "cuSeqlensQOptional", 1)?[0] - 1;
            if b < 0 {
                bail!(P_INVALID, "cuSeqlensQOptional: shape {:?} needs B + 1 ≥ 1 entries", cuq.dims);
            }
            let ori = mla_side(
                &mut c,
                "ori",
                [ori_kv_optional, ori_sparse_indices_optional, ori_block_table_optional],
                &qv,
                b,
            )?;
            let cmp = mla_side(
                &mut c,
                "cmp",
                [cmp_kv_optional, cmp_sparse_indices_optional, cmp_block_table_optional],
                &qv,
                b,
            )?;
            if ori.is_none() && cmp.is_none() {
                bail!(P_INVALID, "neither ori (oriKvOptional, …) nor cmp (cmpKvOptional, …) keys are given");
            }
            refuse_length_tensors([
                cu_seqlens_ori_kv_optional,
                cu_seqlens_cmp_kv_optional,
                seqused_q_optional,
                seqused_ori_kv_optional,
                seqused_cmp_kv_optional,
                cmp_residual_kv_optional,
                ori_topk_length_optional,
                cmp_topk_length_optional,
            ])?;
            let sinks = optional(&mut c, sinks_optional, "sinksOptional")?;
            if let Some(s) = &sinks {
                need(s, "sinksOptional", &[Dt::F32], &[heads])?;
            }
            // NULL is accepted here and faults when the kernel runs (the docs require it).
            let meta = optional(&mut c, metadata_optional, "metadataOptional")?;
            if let Some(md) = &meta {
                need(md, "metadataOptional", &[Dt::I32], &[META_WORDS])?;
            }
            if !softmax_scale.is_finite() {
                bail!(P_INVALID, "softmaxScale {softmax_scale} must be finite");
            }
            if cmp.is_some() && cmp_ratio < 1 {
                bail!(P_INVALID, "cmpRatio {cmp_ratio} must be ≥ 1 when cmp keys are given");
            }
            need_mask_modes(ori_mask_mode, cmp_mask_mode)?;
            // SAFETY: C strings from the caller (NULL checked).
            unsafe {
                need_layout(layout_q, "layoutQ", LAYOUT_Q)?;
                need_layout(layout_kv, "layoutKv", LAYOUT_KV)?;
            }
            if topk_value_mode != 0 {
                bail!(P_INVALID, "topkValueMode {topk_value_mode} is not supported (this emulator implements 0 only)");
            }
            if return_softmax_lse {
                bail!(P_INVALID, "returnSoftmaxLse = true is not implemented by this emulator (softmaxLseOut's shape is not in docs/ascend-fused.md)");
            }
            let o = c.tensor(attn_out_out, "attnOutOut")?;
            need_like(&o, "attnOutOut", &qv, "q", &qv.dims)?;
            let params = MlaParams {
                num_heads_q: heads,
                num_heads_kv: 1,
                head_dim: MLA_HEAD_DIM,
                batch_size: b,
                cmp_ratio,
                ori_mask_mode,
                cmp_mask_mode,
                ori_win_left,
                ori_win_right,
                has_ori_kv: ori.is_some(),
                has_cmp_kv: cmp.is_some(),
            };
            let handles = std::mem::take(&mut c.handles);
            let (rows, heads, d) = (t as usize, heads as usize, MLA_HEAD_DIM as usize);
            let sides: Vec<Side> = ori.into_iter().chain(cmp).collect();
            let kernel: Kernel = Arc::new(move |m: &mut Memory| {
                let Some(md) = &meta else {
                    return Err(
                        "metadataOptional is NULL (the docs require metadata from aclnnSparseFlashMlaMetadata)".into(),
                    );
                };
                params.check(&m.load(md, None)?)?;
                let qs = m.load(&qv, None)?;
                let ranges = batches("cuSeqlensQ", &ints(m, &cuq)?, rows)?;
                let sink = match &sinks {
                    Some(s) => m.load(s, None)?,
                    None => vec![f64::NEG_INFINITY; heads],
                };
                let mut paged = Vec::new();
                for s in &sides {
                    paged.push((
                        Paged::load(m, s.what, &s.kv, &s.table)?,
                        ints(m, &s.indices)?,
                        s.indices.dims[2] as usize,
                    ));
                }
                let mut out = vec![0f64; rows * heads * d];
                for (b, r) in ranges.into_iter().enumerate() {
                    for t in r {
                        // The key list: ori rows of every ori index ≠ −1, then the cmp ones.
                        let mut keys = Vec::new();
                        for (side, idx, k) in &paged {
                            for (j, &p) in idx[t * k..(t + 1) * k].iter().enumerate() {
                                if p == -1 {
                                    continue;
                                }
                                if p < 0 {
                                    return Err(format!("{}SparseIndices[{t}, 0, {j}] = {p} (batch {b}): negative, and only −1 means skip", side.what));
                                }
                                keys.push(side.row(m, b, p)?);
                            }
                        }
                        if keys.is_empty() {
                            continue;
                        }
                        for h in 0..heads {
                            let qh = &qs[(t * heads + h) * d..(t * heads + h + 1) * d];
                            let logits: Vec<f64> = keys.iter().map(|k| dot(qh, k) * softmax_scale).collect();
                            let mx = logits.iter().copied().fold(sink[h], f64::max);
                            let weights: Vec<f64> = logits.iter().map(|l| (l - mx).exp()).collect();
                            let denom = weights.iter().sum::<f64>() + (sink[h] - mx).exp();
                            let acc = &mut out[(t * heads + h) * d..(t * heads + h + 1) * d];
                            for (wj, k) in weights.iter().zip(&keys) {
                                for (a, kv) in acc.iter_mut().zip(k) {
                                    *a += wj * kv;
                                }
                            }
                            acc.iter_mut().for_each(|v| *v /= denom);
                        }
                    }
                }
                m.store(&o, &out)
            });
            // SAFETY: out-pointers from the caller, checked for NULL in `finish`.
            unsafe { finish(e, "aclnnSparseFlashMla", WS_FUSED, handles, kernel, ws, ex) }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> MlaParams {
        MlaParams {
            num_heads_q: 8,
            num_heads_kv: 1,
            head_dim: 512,
            batch_size: 3,
            cmp_ratio: 4,
            ori_mask_mode: 0,
            cmp_mask_mode: 0,
            ori_win_left: i64::MAX,
            ori_win_right: -1,
            has_ori_kv: true,
            has_cmp_kv: false,
        }
    }

    #[test]
    fn metadata_round_trip_and_mismatch() {
        let p = params();
        // Through the INT32 codec, as on the device.
        let words: Vec<f64> = p.encode().iter().map(|&v| v as i32 as f64).collect();
        assert_eq!(words.len(), 1024);
        p.check(&words).unwrap();
        let e = MlaParams { num_heads_q: 16, ..p }.check(&words).unwrap_err();
        assert!(e.contains("numHeadsQ 8 (metadata) vs 16 (this call)"), "{e}");
        let e = MlaParams { has_cmp_kv: true, ..p }.check(&words).unwrap_err();
        assert!(e.contains("hasCmpKv 0 (metadata) vs 1"), "{e}");
        let e = p.check(&vec![-1.0; 1024]).unwrap_err();
        assert!(e.contains("magic"), "{e}");
    }

    #[test]
    fn batch_ranges() {
        assert_eq!(batches("cu", &[0, 2, 2, 5], 5).unwrap(), vec![0..2, 2..2, 2..5]);
        assert!(batches("cu", &[0, 3, 2], 2).is_err());
        assert!(batches("cu", &[1, 2], 2).is_err());
        assert!(batches("cu", &[0, 2], 3).is_err());
        assert_eq!(batches("cu", &[0], 0).unwrap(), vec![]);
    }
}
