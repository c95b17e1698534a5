//! The HAL ops on Ascend, one file per `hal::ops` family, each built from aclnn two-phase
//! calls (`aclnnXxxGetWorkspaceSize` → workspace from the pool → `aclnnXxx` on the stream).
//!
//! This module holds what every family shares: tensor descriptors ([`View`] → `aclTensor`,
//! destroyed after the launch, never between the phases), scalars, int arrays, temporaries,
//! the launch helper, small elementwise wrappers, and the support table. Every HAL op has a
//! composition; `supports()` answers `No` only when the loaded op library lacks an aclnn op a
//! composition needs (naming it), or for a weight format the HAL does not define for the op.
//! Host-side steps (index reads, host-planned gathers) are labelled in each family's docs and
//! listed in `docs/ascend.md`.
//!
//! Index-like inputs (token ids, row indices, positions) are validated on the host before any
//! launch, because the HAL contract makes an out-of-range index an error naming the row, while
//! on the device it would be a kernel fault. [`Ctx::read_i32`] serves them from the host copy
//! the backend keeps of small host-written INT32 tensors (the model's row metadata), and only
//! device-produced indices cost a device→host copy and a stream drain.

pub mod attention;
pub mod compressor;
pub mod embed;
pub mod fused;
pub mod hc;
pub mod indexer;
pub mod linear;
pub mod lowp;
pub mod moe;
pub mod norm;
pub mod quant;
pub mod rope;

use std::ffi::c_void;
use std::ptr;

use hal::backend::Support;
use hal::{DType, Error, Op, Result};

use crate::runtime::{DeviceBuffer, DevicePtr, BACKEND};
use crate::sys::{self, aclDataType, aclOpExecutor, aclScalar, aclTensor, aclnnStatus, AclnnOps, FusedOps, OpPair};
use crate::{AscendBackend, IssueState, SocProfile};

/// A device buffer's address and size, taken from a validated tensor.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub ptr: DevicePtr,
    pub len: usize,
}

impl Buf {
    /// The address and size of `b`.
    pub fn of(b: &DeviceBuffer) -> Buf {
        Buf { ptr: b.ptr(), len: b.len() }
    }
}

/// The ACL dtype of a HAL dtype (`None`: no one-to-one ACL type, e.g. packed FP4 pairs).
pub fn acl_dtype(d: DType) -> Option<aclDataType> {
    Some(match d {
        DType::F32 => sys::ACL_FLOAT,
        DType::BF16 => sys::ACL_BF16,
        DType::F16 => sys::ACL_FLOAT16,
        DType::F8E4M3 => sys::ACL_FLOAT8_E4M3FN,
        DType::F8E8M0 => sys::ACL_FLOAT8_E8M0,
        DType::I8 => sys::ACL_INT8,
        DType::U8 => sys::ACL_UINT8,
        DType::I32 => sys::ACL_INT32,
        DType::I64 => sys::ACL_INT64,
        DType::F4E2M1x2 => return None,
    })
}

/// A strided view of a device buffer, described the way `aclCreateTensor` takes it
/// (row-major dims, element strides and offset, a 1-D storage of the whole buffer).
#[derive(Clone, Debug)]
pub struct View {
    ptr: DevicePtr,
    dtype: DType,
    storage_elems: i64,
    shape: Vec<i64>,
    strides: Vec<i64>,
    offset: i64,
}

fn contiguous_strides(shape: &[i64]) -> Vec<i64> {
    let mut s = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

impl View {
    /// `buf` as a contiguous `dtype` tensor of `shape`.
    pub fn new(buf: Buf, dtype: DType, shape: &[usize]) -> View {
        let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        View {
            ptr: buf.ptr,
            dtype,
            storage_elems: (buf.len / dtype.size()) as i64,
            strides: contiguous_strides(&shape),
            shape,
            offset: 0,
        }
    }

    /// A temporary's full extent as a contiguous view.
    pub fn of_temp(b: &DeviceBuffer, dtype: DType, shape: &[usize]) -> View {
        View::new(Buf::of(b), dtype, shape)
    }

    /// The same storage with another contiguous shape (element count unchanged by callers).
    pub fn reshape(&self, shape: &[usize]) -> View {
        let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        View { strides: contiguous_strides(&shape), shape, offset: 0, ..self.clone() }
    }

    /// The same storage with an explicit shape, element strides and element offset.
    pub fn strided(&self, shape: &[usize], strides: &[usize], offset: usize) -> View {
        View {
            shape: shape.iter().map(|&d| d as i64).collect(),
            strides: strides.iter().map(|&d| d as i64).collect(),
            offset: offset as i64,
            ..self.clone()
        }
    }

    /// The same bytes described as another dtype of the same size (f32 bits as INT32).
    pub fn with_dtype(&self, dtype: DType) -> View {
        debug_assert_eq!(dtype.size(), self.dtype.size(), "reinterpretation needs equal element sizes");
        View { dtype, ..self.clone() }
    }

    /// Number of elements in the view.
    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }
}

/// An `aclTensor` owned by us; destroyed on drop (after the launch that used it).
pub struct TensorDesc<'a> {
    raw: *mut aclTensor,
    api: &'a crate::loader::Api,
}

impl TensorDesc<'_> {
    fn ptr(&self) -> *mut aclTensor {
        self.raw
    }
}

impl Drop for TensorDesc<'_> {
    fn drop(&mut self) {
        // SAFETY: created by aclCreateTensor, destroyed once. Callers keep descriptors alive
        // until after phase 2 (the executor may refer to them until then).
        unsafe { (self.api.nnop.aclDestroyTensor)(self.raw) };
    }
}

/// An `aclScalar` owned by us.
pub struct ScalarDesc<'a> {
    raw: *mut aclScalar,
    api: &'a crate::loader::Api,
}

impl Drop for ScalarDesc<'_> {
    fn drop(&mut self) {
        // SAFETY: created by aclCreateScalar, destroyed once, after the launch.
        unsafe { (self.api.nnop.aclDestroyScalar)(self.raw) };
    }
}

/// An `aclIntArray` owned by us.
pub struct IntArrayDesc<'a> {
    raw: *mut crate::sys::aclIntArray,
    api: &'a crate::loader::Api,
}

impl Drop for IntArrayDesc<'_> {
    fn drop(&mut self) {
        // SAFETY: created by aclCreateIntArray, destroyed once, after the launch.
        unsafe { (self.api.nnop.aclDestroyIntArray)(self.raw) };
    }
}

/// Issue context of one `run`: the backend plus its locked issue state.
pub struct Ctx<'a> {
    pub(crate) be: &'a AscendBackend,
    pub(crate) st: &'a mut IssueState,
}

impl<'a> Ctx<'a> {
    fn api(&self) -> &'a crate::loader::Api {
        self.be.rt.api()
    }

    /// The aclnn op table.
    pub fn ops(&self) -> &'a AclnnOps {
        &self.be.rt.api().ops
    }

    /// CANN's fused DeepSeek-V4 op table.
    pub fn fused(&self) -> &'a FusedOps {
        &self.be.rt.api().fused
    }

    /// A temporary device buffer for `shape` × `dtype` (returned to the pool on drop; safe
    /// right after the launches that use it, by stream order).
    pub fn temp(&self, shape: &[usize], dtype: DType) -> Result<DeviceBuffer> {
        self.be.pool.alloc(shape.iter().product::<usize>() * dtype.size())
    }

    /// Describes `v` as an `aclTensor`.
    pub fn tensor(&self, v: &View) -> Result<TensorDesc<'a>> {
        let api = self.api();
        let dt = acl_dtype(v.dtype)
            .ok_or_else(|| Error::invalid("ascend tensor", format!("dtype {} has no ACL equivalent", v.dtype)))?;
        let storage = [v.storage_elems];
        // SAFETY: every array is valid for the given length during the call (ACL copies
        // them); the data pointer is a device address that ACL only records.
        let raw = unsafe {
            (api.nnop.aclCreateTensor)(
                v.shape.as_ptr(),
                v.shape.len() as u64,
                dt,
                v.strides.as_ptr(),
                v.offset,
                sys::ACL_FORMAT_ND,
                storage.as_ptr(),
                1,
                v.ptr.as_raw(),
            )
        };
        if raw.is_null() {
            return Err(self
                .be
                .rt
                .error(sys::ACLNN_ERR_PARAM_INVALID, &format!("aclCreateTensor({} {:?})", v.dtype, v.shape)));
        }
        Ok(TensorDesc { raw, api })
    }

    /// An fp32 `aclScalar`.
    pub fn scalar_f32(&self, value: f32) -> Result<ScalarDesc<'a>> {
        let api = self.api();
        let mut v = value;
        // SAFETY: ACL reads exactly sizeof(float) bytes from `v` during the call.
        let raw = unsafe { (api.nnop.aclCreateScalar)((&mut v as *mut f32).cast::<c_void>(), sys::ACL_FLOAT) };
        if raw.is_null() {
            return Err(self.be.rt.error(sys::ACLNN_ERR_PARAM_INVALID, "aclCreateScalar(float)"));
        }
        Ok(ScalarDesc { raw, api })
    }

    /// An int32 `aclScalar`.
    pub fn scalar_i32(&self, value: i32) -> Result<ScalarDesc<'a>> {
        let api = self.api();
        let mut v = value;
        // SAFETY: ACL reads exactly sizeof(int32_t) bytes from `v` during the call.
        let raw = unsafe { (api.nnop.aclCreateScalar)((&mut v as *mut i32).cast::<c_void>(), sys::ACL_INT32) };
        if raw.is_null() {
            return Err(self.be.rt.error(sys::ACLNN_ERR_PARAM_INVALID, "aclCreateScalar(int32)"));
        }
        Ok(ScalarDesc { raw, api })
    }

    /// Runs one aclnn op: phase 1 (`phase1` gets the op's GetWorkspaceSize pointer and the two
    /// out-pointers), workspace from the pool, phase 2 on the backend's stream. The workspace
    /// goes back to the pool right after the launch (stream order makes that safe).
    pub fn launch<F: Copy>(
        &mut self,
        name: &str,
        pair: Option<OpPair<F>>,
        phase1: impl FnOnce(F, *mut u64, *mut *mut aclOpExecutor) -> aclnnStatus,
    ) -> Result<()> {
        let rt = &self.be.rt;
        let pair = pair.ok_or_else(|| Error::Unsupported {
            backend: BACKEND.into(),
            op: format!("aclnn{name}"),
            reason: format!("not exported by the loaded op library ({})", rt.api().opapi),
        })?;
        let mut ws: u64 = 0;
        let mut exec: *mut aclOpExecutor = ptr::null_mut();
        let code = phase1(pair.get_workspace_size, &mut ws, &mut exec);
        rt.check(code, &format!("aclnn{name}GetWorkspaceSize"))?;
        if exec.is_null() {
            return Err(rt.error(sys::ACLNN_ERR_INNER, &format!("aclnn{name}GetWorkspaceSize returned no executor")));
        }
        let ws_len =
            usize::try_from(ws).map_err(|_| Error::OutOfMemory { backend: BACKEND.into(), bytes: usize::MAX })?;
        // If this allocation fails the executor is abandoned unlaunched: there is no documented
        // way to release a non-repeatable executor without running it.
        let workspace = self.be.pool.alloc(ws_len)?;
        let wptr = if ws_len == 0 { ptr::null_mut() } else { workspace.ptr().as_raw() };
        // SAFETY: phase 2 of the same op with the executor phase 1 just returned, a workspace
        // of the requested size, and our live stream. The caller keeps every descriptor alive
        // until this returns.
        let code = unsafe { (pair.launch)(wptr, ws, exec, self.be.stream.raw()) };
        rt.check(code, &format!("aclnn{name}"))
    }

    /// Reads the first `n` int32 values of the input at `b` on the host.
    /// From the input's host copy when it has one (row metadata uploaded by the model: no device
    /// traffic), else by a device→host copy that drains the stream.
    pub fn read_i32(&mut self, b: Buf, n: usize) -> Result<Vec<i32>> {
        let host = self.st.host_inputs.iter().find(|(p, h)| *p == b.ptr && h.len() >= n * 4).map(|(_, h)| h.clone());
        let bytes = match host {
            Some(h) => {
                self.st.index_reads.host += 1;
                h[..n * 4].to_vec()
            }
            None => {
                self.st.index_reads.device += 1;
                self.be.d2h_locked(self.st, b.ptr, n * 4)?
            }
        };
        Ok(bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    /// Enqueues a zero fill of `b`.
    pub fn zero(&mut self, b: Buf) -> Result<()> {
        self.be.stream.memset_async(b.ptr, b.len, 0, b.len)
    }

    /// `out = cast(src)`.
    pub fn cast(&mut self, src: &View, out: &View) -> Result<()> {
        let (s, o) = (self.tensor(src)?, self.tensor(out)?);
        let dt = acl_dtype(out.dtype).unwrap_or(sys::ACL_DT_UNDEFINED);
        // SAFETY: descriptors outlive the launch; `ws`/`ex` are launch()'s out-pointers.
        self.launch("Cast", self.ops().Cast, |f, ws, ex| unsafe { f(s.ptr(), dt, o.ptr(), ws, ex) })
    }

    /// `src` (f32, contiguous, `shape`) in the KV cache dtype `dtype` (`hal::ops` conventions):
    /// `src` itself for an f32 cache; for a bf16 one, a new temporary holding each value's
    /// nearest-even bf16 (`aclnnCast`). The buffer, when there is one, must outlive the
    /// launches that read the view.
    pub fn to_cache_dtype(
        &mut self,
        src: &View,
        dtype: DType,
        shape: &[usize],
    ) -> Result<(Option<DeviceBuffer>, View)> {
        if dtype == DType::F32 {
            return Ok((None, src.clone()));
        }
        let b = self.temp(shape, dtype)?;
        let v = View::of_temp(&b, dtype, shape);
        self.cast(src, &v)?;
        Ok((Some(b), v))
    }

    /// `out = a · b` (broadcasting).
    pub fn mul(&mut self, a: &View, b: &View, out: &View) -> Result<()> {
        let (x, y, o) = (self.tensor(a)?, self.tensor(b)?, self.tensor(out)?);
        // SAFETY: descriptors outlive the launch; `ws`/`ex` are launch()'s out-pointers.
        self.launch("Mul", self.ops().Mul, |f, ws, ex| unsafe { f(x.ptr(), y.ptr(), o.ptr(), ws, ex) })
    }

    /// `out = a + b` (`subtract`: `a − b`), broadcasting.
    pub fn add(&mut self, a: &View, b: &View, out: &View, subtract: bool) -> Result<()> {
        let (x, y, o) = (self.tensor(a)?, self.tensor(b)?, self.tensor(out)?);
        let alpha = self.scalar_f32(1.0)?;
        // SAFETY (both arms): descriptors and the scalar outlive the launch; `ws`/`ex` are
        // launch()'s out-pointers.
        if subtract {
            self.launch("Sub", self.ops().Sub, |f, ws, ex| unsafe { f(x.ptr(), y.ptr(), alpha.raw, o.ptr(), ws, ex) })
        } else {
            self.launch("Add", self.ops().Add, |f, ws, ex| unsafe { f(x.ptr(), y.ptr(), alpha.raw, o.ptr(), ws, ex) })
        }
    }

    /// An `aclIntArray` (dims lists).
    pub fn int_array(&self, values: &[i64]) -> Result<IntArrayDesc<'a>> {
        let api = self.api();
        // SAFETY: `values` is valid for its length during the call (ACL copies it).
        let raw = unsafe { (api.nnop.aclCreateIntArray)(values.as_ptr(), values.len() as u64) };
        if raw.is_null() {
            return Err(self.be.rt.error(sys::ACLNN_ERR_PARAM_INVALID, &format!("aclCreateIntArray({values:?})")));
        }
        Ok(IntArrayDesc { raw, api })
    }

    /// `out = a / b` (broadcasting).
    pub fn div(&mut self, a: &View, b: &View, out: &View) -> Result<()> {
        let (x, y, o) = (self.tensor(a)?, self.tensor(b)?, self.tensor(out)?);
        // SAFETY: descriptors outlive the launch; `ws`/`ex` are launch()'s out-pointers.
        self.launch("Div", self.ops().Div, |f, ws, ex| unsafe { f(x.ptr(), y.ptr(), o.ptr(), ws, ex) })
    }

    /// `out = a + c` for a scalar `c`.
    pub fn adds(&mut self, a: &View, c: f32, out: &View) -> Result<()> {
        let (x, o) = (self.tensor(a)?, self.tensor(out)?);
        let (cs, alpha) = (self.scalar_f32(c)?, self.scalar_f32(1.0)?);
        // SAFETY: descriptors and scalars outlive the launch; `ws`/`ex` are launch()'s out-pointers.
        self.launch("Adds", self.ops().Adds, |f, ws, ex| unsafe { f(x.ptr(), cs.raw, alpha.raw, o.ptr(), ws, ex) })
    }

    /// `out = a · c` for a scalar `c`.
    pub fn muls(&mut self, a: &View, c: f32, out: &View) -> Result<()> {
        let (x, o) = (self.tensor(a)?, self.tensor(out)?);
        let cs = self.scalar_f32(c)?;
        // SAFETY: descriptors and the scalar outlive the launch; `ws`/`ex` are launch()'s out-pointers.
        self.launch("Muls", self.ops().Muls, |f, ws, ex| unsafe { f(x.ptr(), cs.raw, o.ptr(), ws, ex) })
    }

    /// `out = sigmoid(a)`.
    pub fn sigmoid(&mut self, a: &View, out: &View) -> Result<()> {
        let (x, o) = (self.tensor(a)?, self.tensor(out)?);
        // SAFETY: descriptors outlive the launch; `ws`/`ex` are launch()'s out-pointers.
        self.launch("Sigmoid", self.ops().Sigmoid, |f, ws, ex| unsafe { f(x.ptr(), o.ptr(), ws, ex) })
    }

    /// `out = softmax(a)` along `dim`.
    pub fn softmax(&mut self, a: &View, dim: i64, out: &View) -> Result<()> {
        let (x, o) = (self.tensor(a)?, self.tensor(out)?);
        // SAFETY: descriptors outlive the launch; `ws`/`ex` are launch()'s out-pointers.
        self.launch("Softmax", self.ops().Softmax, |f, ws, ex| unsafe { f(x.ptr(), dim, o.ptr(), ws, ex) })
    }

    /// `out = Σ a` over `dims`, kept as size-1 dims, accumulated in f32.
    pub fn reduce_sum(&mut self, a: &View, dims: &[i64], out: &View) -> Result<()> {
        let (x, o) = (self.tensor(a)?, self.tensor(out)?);
        let d = self.int_array(dims)?;
        // SAFETY: descriptors and the int array outlive the launch; `ws`/`ex` are launch()'s out-pointers.
        self.launch("ReduceSum", self.ops().ReduceSum, |f, ws, ex| unsafe {
            f(x.ptr(), d.raw, true, sys::ACL_FLOAT, o.ptr(), ws, ex)
        })
    }

    /// `out[b] = a[b] @ b[b]` (3-D), fp32 kept as fp32 (`KEEP_DTYPE`).
    pub fn batch_matmul(&mut self, a: &View, b: &View, out: &View) -> Result<()> {
        let (x, y, o) = (self.tensor(a)?, self.tensor(b)?, self.tensor(out)?);
        let cube = sys::CUBE_KEEP_DTYPE;
        // SAFETY: descriptors outlive the launch; `ws`/`ex` are launch()'s out-pointers.
        self.launch("BatchMatMul", self.ops().BatchMatMul, |f, ws, ex| unsafe {
            f(x.ptr(), y.ptr(), o.ptr(), cube, ws, ex)
        })
    }

    /// `dst[...] = src` (src broadcast to dst's shape).
    pub fn copy(&mut self, dst: &View, src: &View) -> Result<()> {
        let (d, s) = (self.tensor(dst)?, self.tensor(src)?);
        // SAFETY: descriptors outlive the launch; `ws`/`ex` are launch()'s out-pointers.
        self.launch("InplaceCopy", self.ops().InplaceCopy, |f, ws, ex| unsafe { f(d.ptr(), s.ptr(), ws, ex) })
    }
}

/// `Yes` when every named aclnn op resolved, else `No` naming the first missing one.
fn need(ops: &[(&str, bool)]) -> Support {
    match ops.iter().find(|(_, present)| !present) {
        None => Support::Yes,
        Some((name, _)) => Support::No(format!("aclnn{name} is not exported by the loaded CANN op library")),
    }
}

/// The `need` entry of a composition around a KV cache of dtype `d`: a bf16 cache is rounded
/// into (stores) and widened out of (loads) by `aclnnCast`; an f32 cache needs nothing.
fn cache_cast(d: DType, ops: &AclnnOps) -> (&'static str, bool) {
    ("Cast", d == DType::F32 || ops.Cast.is_some())
}

/// Whether `op` runs on this device with these op libraries.
pub fn supports(op: &Op, ops: &AclnnOps, profile: &SocProfile) -> Support {
    if let Some(d) = op.cache_dtype() {
        if let Support::No(why) = need(&[cache_cast(d, ops)]) {
            return Support::No(why);
        }
    }
    match op {
        Op::Embed(e) => embed::supports_embed(e, ops),
        Op::HcExpand(_) => need(&[("InplaceCopy", ops.InplaceCopy.is_some())]),
        Op::Add(_) => need(&[("Add", ops.Add.is_some())]),
        Op::GatherRows(_) => need(&[("IndexSelect", ops.IndexSelect.is_some())]),
        Op::RmsNorm(o) => norm::supports_rms_norm(o, ops),
        Op::Linear(l) => linear::supports_linear(l, ops, profile),
        Op::SwiGlu(s) => moe::supports_swiglu(s, ops),
        Op::Rope(_) => rope::supports_rope(ops),
        Op::HcPre(o) => hc::supports_hc(true, o.after_post, ops),
        Op::HcHead(o) => hc::supports_hc(false, o.after_post, ops),
        Op::HcPost(_) => hc::supports_hc_post(ops),
        Op::GroupedLinear(g) => linear::supports_grouped_linear(g, ops),
        Op::Hadamard(_) => quant::supports_hadamard(ops),
        Op::QuantSim(_) => quant::supports_quant_sim(ops),
        Op::WindowStore(_) => attention::supports_window_store(ops),
        Op::SparseAttention(_) => attention::supports_sparse_attention(ops),
        Op::MoeGate(g) => moe::supports_moe_gate(g, ops),
        Op::IndexerTopK(_) => indexer::supports_indexer(ops),
        Op::MoeExperts(m) => moe::supports_moe_experts(m, ops),
        Op::Compressor(_) => compressor::supports_compressor(ops),
        // aclnnTopk (k = 1) could take the greedy rows, but its NaN order and ties on real
        // CANN are unverified and no aclnn op draws the sampler's counter-based numbers; the
        // model samples on the host from downloaded logits instead (same tokens).
        Op::SampleTokens(_) => {
            Support::No("token sampling is not composed from aclnn ops yet; the model samples on the host".into())
        }
    }
}

/// Issues a validated, supported op (`ins`/`outs` in signature order): through its fused CANN
/// kernel when `fused_path` (see [`fused::kernel_for`]), else through its composition.
pub fn dispatch(cx: &mut Ctx<'_>, op: &Op, ins: &[Buf], outs: &[Buf], fused_path: bool) -> Result<()> {
    if fused_path {
        return fused::dispatch(cx, op, ins, outs);
    }
    match op {
        Op::Embed(o) => embed::run_embed(cx, o, ins, outs),
        Op::HcExpand(o) => embed::run_hc_expand(cx, o, ins, outs),
        Op::Add(o) => embed::run_add(cx, o, ins, outs),
        Op::GatherRows(o) => embed::run_gather_rows(cx, o, ins, outs),
        Op::RmsNorm(o) => norm::run_rms_norm(cx, o, ins, outs),
        Op::Linear(o) => linear::run_linear(cx, o, ins, outs),
        Op::SwiGlu(o) => moe::run_swiglu(cx, o, ins, outs),
        Op::Rope(o) => rope::run_rope(cx, o, ins, outs),
        Op::HcPre(o) => hc::run_hc_pre(cx, o, ins, outs),
        Op::HcHead(o) => hc::run_hc_head(cx, o, ins, outs),
        Op::HcPost(o) => hc::run_hc_post(cx, o, ins, outs),
        Op::GroupedLinear(o) => linear::run_grouped_linear(cx, o, ins, outs),
        Op::Hadamard(o) => quant::run_hadamard(cx, o, outs),
        Op::QuantSim(o) => quant::run_quant_sim(cx, o, outs),
        Op::IndexerTopK(o) => indexer::run_indexer_topk(cx, o, ins, outs),
        Op::MoeGate(o) => moe::run_moe_gate(cx, o, ins, outs),
        Op::Compressor(o) => compressor::run_compressor(cx, o, ins, outs),
        Op::MoeExperts(o) => moe::run_moe_experts(cx, o, ins, outs),
        Op::WindowStore(o) => attention::run_window_store(cx, o, ins, outs),
        Op::SparseAttention(o) => attention::run_sparse_attention(cx, o, ins, outs),
        Op::SampleTokens(_) => Err(Error::Unsupported {
            backend: "ascend".into(),
            op: op.name().into(),
            reason: "token sampling is not composed from aclnn ops yet".into(),
        }),
    }
}
