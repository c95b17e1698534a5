//! aclnn op exports: phase 1 (`aclnnXxxGetWorkspaceSize`) validates and plans, phase 2
//! (`aclnnXxx`) checks the launch and queues the kernel on the stream.
//!
//! Phase-1 checks, per op, encode the documented constraints as we read them (§3.3): dtype
//! lists, ranks, ND format, shapes and broadcasting, and "non-contiguous ✓" only where the
//! docs mark it (the `noncontig` column below; the exact per-op lists are UNVERIFIED). For
//! every tensor it also checks that it is a live `aclTensor`, that its device address is a live
//! allocation of the calling thread's device large enough for the declared storage, and that
//! its dtype is computable on the configured SoC (FP8/FP4/HiF8: 950 only).
//!
//! | op | dtypes | noncontig inputs | notes |
//! |---|---|---|---|
//! | Add/Sub/Mul | f32 f16 bf16 f64 int bool | ✓ | broadcasting, type promotion, alpha scalar |
//! | Cast | any with a codec | ✓ | FP8 only on 950; floats round to nearest even (f32 → bf16 included), widening is exact |
//! | InplaceCopy | any with a codec | ✓ (both) | src broadcast to selfRef |
//! | Embedding | weight f32/f16/bf16, indices i32/i64 | ✗ | out = `indices.shape + [dim]` |
//! | IndexSelect | self any, index i32/i64 (≤1-D) | ✗ | |
//! | RmsNorm | f32 f16 bf16 (gamma same), rstd f32 | ✗ | |
//! | Mm / Matmul | f32 f16 bf16, all equal | ✓ | 2-D only (Matmul: emulator subset) |
//! | Clamp | float and int | ✓ | NULL bound = open, not both |
//! | Silu, Cos, Sin | f32 f16 bf16 (f64 for Cos/Sin) | ✓ | |
//! | Sigmoid | f32 f16 bf16 | ✓ | out dtype = self dtype |
//! | Div | like Add (float result) | ✓ | broadcasting |
//! | Muls / Adds | like Add, scalar other | ✓ | |
//! | BatchMatMul | f32 f16 bf16, all equal | ✓ | 3-D, batch dims equal (no broadcast) |
//! | Softmax | f32 f16 bf16, out = self dtype | ✓ | any dim (negative allowed) |
//! | InplaceIndexCopy | selfRef/source equal dtype (any with a codec), index i32/i64 1-D | ✗ | indices checked at run time (fault); **rejected on 950** (ops-nn support table: A2/A3 only) |
//! | InplaceScatter | selfRef/src equal dtype, index i32/i64, equal ranks | ✗ | reduce 0 (replace) / 1 (add) |
//! | Softplus / Sqrt / Relu | f32 f16 bf16, out = self dtype | ✓ | Softplus: beta, threshold scalars (torch semantics) |
//! | Topk | f32 f16 bf16; values = self dtype, indices i64 | ✗ | ties: lower index first (stable) — real-hardware tie order UNVERIFIED |
//! | Gather | self any, index i32/i64 same rank | ✗ | out shape = index shape |
//! | ReduceSum | f32 f16 bf16 (dtype arg = out dtype) | ✓ | dims as an aclIntArray, keepDims |
//! | Abs | like Add, out = self dtype | ✓ | |
//! | Amax | f32 f16 bf16, out = self dtype | ✓ | emulator subset: the last dim only, keepDim |
//! | BitwiseAndScalar / BitwiseOrTensor | integer and bool, one dtype (scalar: integer) | ✓ | Or broadcasts |
//!
//! Outputs must be contiguous everywhere except `InplaceCopy`'s `selfRef`.

#![allow(non_snake_case, clippy::missing_safety_doc, clippy::too_many_arguments)]

use std::ffi::c_void;
use std::sync::Arc;

use crate::dtype::Dt;
use crate::memory::{broadcast_strides, Memory, TView};
use crate::state::{Executor, Kernel};
use crate::{bail, codes, guard, with_emu, Emu, Fail};

pub(crate) const P_NULL: i32 = codes::ACLNN_PARAM_NULLPTR;
pub(crate) const P_INVALID: i32 = codes::ACLNN_PARAM_INVALID;
const FORMAT_ND: i32 = 2;

/// Deterministic, non-zero workspace sizes (so the workspace path is always exercised).
const WS_ELEMENTWISE: u64 = 512;
const WS_GATHER: u64 = 1024;
const WS_NORM: u64 = 4096;
const WS_MATMUL: u64 = 32768;

const FLOATS: &[Dt] = &[Dt::F32, Dt::F16, Dt::Bf16];
const ARITH: &[Dt] = &[Dt::F32, Dt::F16, Dt::Bf16, Dt::F64, Dt::I8, Dt::U8, Dt::I16, Dt::I32, Dt::I64, Dt::Bool];
const INDEX: &[Dt] = &[Dt::I32, Dt::I64];

/// Phase-1 argument checker: collects the tensor handles the executor must keep alive.
pub(crate) struct Check<'a> {
    pub(crate) e: &'a Emu,
    device: i32,
    pub(crate) handles: Vec<usize>,
}

impl<'a> Check<'a> {
    pub(crate) fn new(e: &'a Emu) -> Result<Check<'a>, Fail> {
        let device = e.need_device()?;
        Ok(Check { e, device, handles: Vec::new() })
    }

    /// A live, ND, SoC-computable tensor whose storage is a live allocation of this device.
    pub(crate) fn tensor(&mut self, p: *const c_void, name: &str) -> Result<TView, Fail> {
        let t = self.e.tensor(p as usize, name)?;
        if t.format != FORMAT_ND {
            bail!(P_INVALID, "{name}: format {} is not supported (ND only)", t.format);
        }
        let v = t.view;
        if v.dt.is_low_precision() && !self.e.config.low_precision() {
            bail!(
                P_INVALID,
                "{name}: dtype {:?} is not supported on {} (FP8/FP4/HiF8 need Ascend950)",
                v.dt,
                self.e.config.soc_name()
            );
        }
        if v.numel() > 0 {
            let bytes = (t.storage_elems as usize * v.dt.bits()).div_ceil(8);
            let (_, alloc) =
                self.e.mem.find(v.addr, bytes).map_err(|m| {
                    Fail::new(P_INVALID, format!("{name}: storage of {bytes} bytes at {:#x}: {m}", v.addr))
                })?;
            if alloc.device != self.device {
                bail!(P_INVALID, "{name}: memory of device {} used on device {}", alloc.device, self.device);
            }
        }
        self.handles.push(p as usize);
        Ok(v)
    }
}

/// `a [m, k] · b [k, n]` in f64, each output summed over `t = 0..k` in order (`b` is
/// transposed first so the inner loop reads both operands contiguously; same sums).
fn gemm(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut bt = vec![0f64; k * n];
    for t in 0..k {
        for j in 0..n {
            bt[j * k + t] = b[t * n + j];
        }
    }
    let mut r = vec![0f64; m * n];
    for i in 0..m {
        let row = &a[i * k..(i + 1) * k];
        for j in 0..n {
            r[i * n + j] = row.iter().zip(&bt[j * k..(j + 1) * k]).map(|(x, y)| x * y).sum();
        }
    }
    r
}

pub(crate) fn need_dtype(v: &TView, name: &str, allowed: &[Dt]) -> Result<(), Fail> {
    if !allowed.contains(&v.dt) {
        bail!(P_INVALID, "{name}: dtype {:?} is not supported (expected one of {allowed:?})", v.dt);
    }
    Ok(())
}

fn is_contiguous(v: &TView) -> bool {
    let mut expect = 1i64;
    for (&d, &s) in v.dims.iter().zip(&v.strides).rev() {
        if d != 1 && s != expect {
            return false;
        }
        expect *= d;
    }
    true
}

pub(crate) fn need_contig(v: &TView, name: &str) -> Result<(), Fail> {
    if !is_contiguous(v) {
        bail!(
            P_INVALID,
            "{name}: non-contiguous tensors are not supported here (dims {:?}, strides {:?})",
            v.dims,
            v.strides
        );
    }
    Ok(())
}

pub(crate) fn need_rank(v: &TView, name: &str, lo: usize, hi: usize) -> Result<(), Fail> {
    if v.dims.len() < lo || v.dims.len() > hi {
        bail!(P_INVALID, "{name}: rank {} outside [{lo}, {hi}]", v.dims.len());
    }
    Ok(())
}

pub(crate) fn need_shape(v: &TView, name: &str, want: &[i64]) -> Result<(), Fail> {
    if v.dims != want {
        bail!(P_INVALID, "{name}: shape {:?}, expected {want:?}", v.dims);
    }
    Ok(())
}

/// Numpy-style broadcast of two shapes.
fn broadcast(a: &[i64], b: &[i64]) -> Option<Vec<i64>> {
    let n = a.len().max(b.len());
    (0..n)
        .map(|i| {
            let x = if i + a.len() >= n { a[i + a.len() - n] } else { 1 };
            let y = if i + b.len() >= n { b[i + b.len() - n] } else { 1 };
            match (x, y) {
                _ if x == y => Some(x),
                (1, y) => Some(y),
                (x, 1) => Some(x),
                _ => None,
            }
        })
        .collect()
}

/// Result type of a binary op (torch-like promotion).
fn promote(a: Dt, b: Dt) -> Dt {
    use Dt::*;
    if a == b {
        return a;
    }
    let rank = |d: Dt| match d {
        F64 => 10,
        F32 => 9,
        F16 | Bf16 => 8,
        I64 => 4,
        I32 => 3,
        I16 => 2,
        I8 | U8 => 1,
        _ => 0,
    };
    match (a, b) {
        (F16, Bf16) | (Bf16, F16) => F32,
        (I8, U8) | (U8, I8) => I16,
        _ if rank(a) >= rank(b) => a,
        _ => b,
    }
}

/// Registers the executor and writes phase 1's out-parameters.
pub(crate) unsafe fn finish(
    e: &mut Emu,
    op: &'static str,
    workspace: u64,
    handles: Vec<usize>,
    kernel: Kernel,
    ws_out: *mut u64,
    ex_out: *mut *mut c_void,
) -> Result<(), Fail> {
    if ws_out.is_null() || ex_out.is_null() {
        bail!(P_NULL, "workspaceSize or executor out-pointer is nullptr");
    }
    let h = e.handle();
    e.executors.insert(h, Executor { op, workspace, used: false, repeatable: false, tensors: handles, kernel });
    // SAFETY: both out-pointers are non-null and point to caller-owned storage.
    unsafe {
        ws_out.write(workspace);
        ex_out.write(h as *mut c_void);
    }
    Ok(())
}

/// Phase 2 shared by every op.
pub(crate) fn launch(
    op: &'static str,
    workspace: *mut c_void,
    size: u64,
    executor: *mut c_void,
    stream: *mut c_void,
) -> i32 {
    guard(op, || {
        with_emu(|e| {
            let sid = e.stream_id(stream as usize)?;
            let h = executor as usize;
            if h == 0 {
                bail!(P_NULL, "executor is nullptr");
            }
            let Some(x) = e.executors.get(&h) else {
                if e.issued(h) {
                    bail!(P_INVALID, "executor was already launched (executors are single-use unless made repeatable)");
                }
                bail!(P_INVALID, "{executor:?} is not an executor returned by a GetWorkspaceSize call");
            };
            if x.op != op {
                bail!(P_INVALID, "executor was planned by {}GetWorkspaceSize, launched with {op}", x.op);
            }
            if x.used && !x.repeatable {
                bail!(P_INVALID, "executor was already launched (executors are single-use unless made repeatable)");
            }
            if size < x.workspace {
                bail!(
                    P_INVALID,
                    "workspaceSize {size} is smaller than the {} bytes GetWorkspaceSize asked for",
                    x.workspace
                );
            }
            let need = x.workspace as usize;
            let ws = workspace as usize;
            if need > 0 {
                if ws == 0 {
                    bail!(P_NULL, "workspace is nullptr but {need} bytes are required");
                }
                e.mem.find(ws, need).map_err(|m| Fail::new(P_INVALID, format!("workspace: {m}")))?;
            }
            if x.tensors.iter().any(|t| !e.tensors.contains_key(t)) {
                bail!(P_INVALID, "an aclTensor of this executor was destroyed before the launch");
            }
            let kernel = x.kernel.clone();
            e.launch_count += 1;
            let injected = e.config.fail_launch.is_some_and(|t| t.fires(e.launch_count));
            let n = e.launch_count;
            // A single-use executor is gone after its launch (the handle is never reissued).
            if e.executors.get(&h).is_some_and(|x| !x.repeatable) {
                e.executors.remove(&h);
            } else if let Some(x) = e.executors.get_mut(&h) {
                x.used = true;
            }
            let run: crate::state::Work = Box::new(move |m: &mut Memory| {
                if injected {
                    return Err(format!("injected device fault (V4RT_EMU_FAIL_LAUNCH, launch {n})"));
                }
                if need > 0 {
                    // The kernel owns its workspace while it runs: scribble over it, so memory
                    // that is also used elsewhere at the same time gets corrupted visibly.
                    m.bytes_mut(ws, need)?.fill(0xA5);
                }
                kernel(m)
            });
            e.enqueue_work(sid, op, run)?;
            Ok(())
        })
    })
}

macro_rules! phase2 {
    ($($fn_name:ident),* $(,)?) => {$(
        #[no_mangle]
        pub extern "C" fn $fn_name(workspace: *mut c_void, size: u64, executor: *mut c_void, stream: *mut c_void) -> i32 {
            launch(stringify!($fn_name), workspace, size, executor, stream)
        }
    )*};
}
/// Also used by `fused` for its phase-2 exports.
pub(crate) use phase2;

phase2!(
    aclnnAdd,
    aclnnSub,
    aclnnMul,
    aclnnCast,
    aclnnInplaceCopy,
    aclnnEmbedding,
    aclnnIndexSelect,
    aclnnRmsNorm,
    aclnnMm,
    aclnnMatmul,
    aclnnClamp,
    aclnnSilu,
    aclnnCos,
    aclnnSin,
    aclnnBatchMatMul,
    aclnnSoftmax,
    aclnnReduceSum,
    aclnnDiv,
    aclnnSigmoid,
    aclnnMuls,
    aclnnAdds,
    aclnnInplaceIndexCopy,
    aclnnSoftplus,
    aclnnSqrt,
    aclnnRelu,
    aclnnTopk,
    aclnnGather,
    aclnnInplaceScatter
);

// ---------------------------------------------------------------- elementwise binary

#[derive(Clone, Copy)]
enum Bin {
    Add,
    Sub,
    Mul,
}

unsafe fn binary(
    op: &'static str,
    kind: Bin,
    self_: *const c_void,
    other: *const c_void,
    alpha: *const c_void,
    out: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> Result<(), Fail> {
    with_emu(|e| {
        let mut c = Check::new(e)?;
        let a = c.tensor(self_, "self")?;
        let b = c.tensor(other, "other")?;
        let o = c.tensor(out, "out")?;
        let alpha = match kind {
            Bin::Mul => 1.0,
            _ => match c.e.scalar(alpha as usize, "alpha")? {
                Some((_, v)) => v,
                None => bail!(P_NULL, "alpha is nullptr"),
            },
        };
        need_dtype(&a, "self", ARITH)?;
        need_dtype(&b, "other", ARITH)?;
        need_dtype(&o, "out", ARITH)?;
        need_rank(&a, "self", 0, 8)?;
        need_rank(&b, "other", 0, 8)?;
        need_contig(&o, "out")?;
        let shape = broadcast(&a.dims, &b.dims).ok_or_else(|| {
            Fail::new(P_INVALID, format!("self {:?} and other {:?} do not broadcast", a.dims, b.dims))
        })?;
        need_shape(&o, "out", &shape)?;
        let result = promote(a.dt, b.dt);
        if result.is_float() && !o.dt.is_float() {
            bail!(P_INVALID, "result type {result:?} cannot be written to an out of dtype {:?}", o.dt);
        }
        let handles = std::mem::take(&mut c.handles);
        let kernel: Kernel = Arc::new(move |m: &mut Memory| {
            let x = m.load(&a, Some(&o.dims))?;
            let y = m.load(&b, Some(&o.dims))?;
            let r: Vec<f64> = x
                .iter()
                .zip(&y)
                .map(|(&x, &y)| match kind {
                    Bin::Add => x + alpha * y,
                    Bin::Sub => x - alpha * y,
                    Bin::Mul => x * y,
                })
                .collect();
            m.store(&o, &r)
        });
        // SAFETY: out-pointers from the caller, checked for NULL in `finish`.
        unsafe { finish(e, op, WS_ELEMENTWISE, handles, kernel, ws, ex) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclnnAddGetWorkspaceSize(
    self_: *const c_void,
    other: *const c_void,
    alpha: *const c_void,
    out: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    // SAFETY: forwarded C arguments.
    guard("aclnnAddGetWorkspaceSize", || unsafe { binary("aclnnAdd", Bin::Add, self_, other, alpha, out, ws, ex) })
}

#[no_mangle]
pub unsafe extern "C" fn aclnnSubGetWorkspaceSize(
    self_: *const c_void,
    other: *const c_void,
    alpha: *const c_void,
    out: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    // SAFETY: forwarded C arguments.
    guard("aclnnSubGetWorkspaceSize", || unsafe { binary("aclnnSub", Bin::Sub, self_, other, alpha, out, ws, ex) })
}

#[no_mangle]
pub unsafe extern "C" fn aclnnMulGetWorkspaceSize(
    self_: *const c_void,
    other: *const c_void,
    out: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    // SAFETY: forwarded C arguments.
    guard("aclnnMulGetWorkspaceSize", || unsafe {
        binary("aclnnMul", Bin::Mul, self_, other, std::ptr::null(), out, ws, ex)
    })
}

// ---------------------------------------------------------------- unary

#[derive(Clone, Copy)]
enum Un {
    Silu,
    Cos,
    Sin,
    Abs,
    Clamp(Option<f64>, Option<f64>),
}

unsafe fn unary(
    op: &'static str,
    kind: Un,
    self_: *const c_void,
    out: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> Result<(), Fail> {
    with_emu(|e| {
        let mut c = Check::new(e)?;
        let x = c.tensor(self_, "self")?;
        let o = c.tensor(out, "out")?;
        match kind {
            Un::Silu => {
                need_dtype(&x, "self", FLOATS)?;
                need_dtype(&o, "out", FLOATS)?;
                if o.dt != x.dt {
                    bail!(P_INVALID, "out dtype {:?} differs from self dtype {:?}", o.dt, x.dt);
                }
            }
            Un::Cos | Un::Sin => {
                need_dtype(&x, "self", &[Dt::F32, Dt::F16, Dt::Bf16, Dt::F64])?;
                need_dtype(&o, "out", &[Dt::F32, Dt::F16, Dt::Bf16, Dt::F64])?;
            }
            Un::Clamp(..) | Un::Abs => {
                need_dtype(&x, "self", ARITH)?;
                if o.dt != x.dt {
                    bail!(P_INVALID, "out dtype {:?} differs from self dtype {:?}", o.dt, x.dt);
                }
            }
        }
        need_rank(&x, "self", 0, 8)?;
        need_contig(&o, "out")?;
        need_shape(&o, "out", &x.dims)?;
        let handles = std::mem::take(&mut c.handles);
        let kernel: Kernel = Arc::new(move |m: &mut Memory| {
            let v = m.load(&x, None)?;
            let r: Vec<f64> = v
                .iter()
                .map(|&v| match kind {
                    Un::Silu => v / (1.0 + (-v).exp()),
                    Un::Cos => v.cos(),
                    Un::Sin => v.sin(),
                    Un::Abs => v.abs(),
                    Un::Clamp(lo, hi) => {
                        if v.is_nan() {
                            v
                        } else {
                            let v = lo.map_or(v, |l| v.max(l));
                            hi.map_or(v, |h| v.min(h))
                        }
                    }
                })
                .collect();
            m.store(&o, &r)
        });
        let ws_size = if matches!(kind, Un::Clamp(..)) { WS_ELEMENTWISE * 2 } else { WS_ELEMENTWISE };
        // SAFETY: out-pointers from the caller, checked for NULL in `finish`.
        unsafe { finish(e, op, ws_size, handles, kernel, ws, ex) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclnnSiluGetWorkspaceSize(
    self_: *const c_void,
    out: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    // SAFETY: forwarded C arguments.
    guard("aclnnSiluGetWorkspaceSize", || unsafe { unary("aclnnSilu", Un::Silu, self_, out, ws, ex) })
}

#[no_mangle]
pub unsafe extern "C" fn aclnnCosGetWorkspaceSize(
    self_: *const c_void,
    out: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    // SAFETY: forwarded C arguments.
    guard("aclnnCosGetWorkspaceSize", || unsafe { unary("aclnnCos", Un::Cos, self_, out, ws, ex) })
}

#[no_mangle]
pub unsafe extern "C" fn aclnnSinGetWorkspaceSize(
    self_: *const c_void,
    out: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    // SAFETY: forwarded C arguments.
    guard("aclnnSinGetWorkspaceSize", || unsafe { unary("aclnnSin", Un::Sin, self_, out, ws, ex) })
}

#[no_mangle]
pub unsafe extern "C" fn aclnnClampGetWorkspaceSize(
    self_: *const c_void,
    clip_min: *const c_void,
    clip_max: *const c_void,
    out: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    guard("aclnnClampGetWorkspaceSize", || {
        let (lo, hi) = with_emu(|e| {
            Ok((e.scalar(clip_min as usize, "clipValueMin")?, e.scalar(clip_max as usize, "clipValueMax")?))
        })?;
        if lo.is_none() && hi.is_none() {
            bail!(P_NULL, "clipValueMin and clipValueMax are both nullptr");
        }
        // SAFETY: forwarded C arguments.
        unsafe { unary("aclnnClamp", Un::Clamp(lo.map(|s| s.1), hi.map(|s| s.1)), self_, out, ws, ex) }
    })
}

// ---------------------------------------------------------------- copies and casts

#[no_mangle]
pub unsafe extern "C" fn aclnnCastGetWorkspaceSize(
    self_: *const c_void,
    dtype: i32,
    out: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    guard("aclnnCastGetWorkspaceSize", || {
        with_emu(|e| {
            let mut c = Check::new(e)?;
            let x = c.tensor(self_, "self")?;
            let o = c.tensor(out, "out")?;
            let want =
                Dt::from_acl(dtype).ok_or_else(|| Fail::new(P_INVALID, format!("unknown target dtype {dtype}")))?;
            if want != o.dt {
                bail!(P_INVALID, "dtype argument {want:?} differs from out dtype {:?}", o.dt);
            }
            for (v, n) in [(&x, "self"), (&o, "out")] {
                if !v.dt.has_codec() {
                    bail!(P_INVALID, "{n}: dtype {:?} is not supported by Cast", v.dt);
                }
            }
            need_rank(&x, "self", 0, 8)?;
            need_contig(&o, "out")?;
            need_shape(&o, "out", &x.dims)?;
            let handles = std::mem::take(&mut c.handles);
            let kernel: Kernel = Arc::new(move |m: &mut Memory| {
                let v = m.load(&x, None)?;
                m.store(&o, &v)
            });
            // SAFETY: out-pointers from the caller, checked for NULL in `finish`.
            unsafe { finish(e, "aclnnCast", WS_ELEMENTWISE, handles, kernel, ws, ex) }
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclnnInplaceCopyGetWorkspaceSize(
    self_ref: *mut c_void,
    src: *const c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    guard("aclnnInplaceCopyGetWorkspaceSize", || {
        with_emu(|e| {
            let mut c = Check::new(e)?;
            let d = c.tensor(self_ref, "selfRef")?;
            let s = c.tensor(src, "src")?;
            for (v, n) in [(&d, "selfRef"), (&s, "src")] {
                if !v.dt.has_codec() {
                    bail!(P_INVALID, "{n}: dtype {:?} is not supported by InplaceCopy", v.dt);
                }
                need_rank(v, n, 0, 8)?;
            }
            if broadcast_strides(&s, &d.dims).is_none() {
                bail!(P_INVALID, "src {:?} does not broadcast to selfRef {:?}", s.dims, d.dims);
            }
            let handles = std::mem::take(&mut c.handles);
            let kernel: Kernel = Arc::new(move |m: &mut Memory| {
                let v = m.load(&s, Some(&d.dims))?;
                m.store(&d, &v)
            });
            // SAFETY: out-pointers from the caller, checked for NULL in `finish`.
            unsafe { finish(e, "aclnnInplaceCopy", WS_ELEMENTWISE, handles, kernel, ws, ex) }
        })
    })
}

// ---------------------------------------------------------------- gathers

/// Reads index values and checks them against `limit` (a kernel fault when out of range).
fn indices(m: &Memory, v: &TView, limit: i64) -> Result<Vec<i64>, String> {
    let idx = m.load(v, None)?;
    idx.iter()
        .map(|&i| {
            let i = i as i64;
            if i < 0 || i >= limit {
                Err(format!("index {i} out of range [0, {limit})"))
            } else {
                Ok(i)
            }
        })
        .collect()
}

#[no_mangle]
pub unsafe extern "C" fn aclnnEmbeddingGetWorkspaceSize(
    weight: *const c_void,
    idx: *const c_void,
    out: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    guard("aclnnEmbeddingGetWorkspaceSize", || {
        with_emu(|e| {
            let mut c = Check::new(e)?;
            let w = c.tensor(weight, "weight")?;
            let i = c.tensor(idx, "indices")?;
            let o = c.tensor(out, "out")?;
            need_dtype(&w, "weight", FLOATS)?;
            need_dtype(&i, "indices", INDEX)?;
            need_rank(&w, "weight", 2, 2)?;
            need_rank(&i, "indices", 0, 7)?;
            for (v, n) in [(&w, "weight"), (&i, "indices"), (&o, "out")] {
                need_contig(v, n)?;
            }
            let mut shape = i.dims.clone();
            shape.push(w.dims[1]);
            need_shape(&o, "out", &shape)?;
            if o.dt != w.dt {
                bail!(P_INVALID, "out dtype {:?} differs from weight dtype {:?}", o.dt, w.dt);
            }
            let handles = std::mem::take(&mut c.handles);
            let kernel: Kernel = Arc::new(move |m: &mut Memory| {
                let (vocab, dim) = (w.dims[0], w.dims[1] as usize);
                let rows = indices(m, &i, vocab)?;
                let table = m.load(&w, None)?;
                let mut r = Vec::with_capacity(rows.len() * dim);
                for row in rows {
                    r.extend_from_slice(&table[row as usize * dim..(row as usize + 1) * dim]);
                }
                m.store(&o, &r)
            });
            // SAFETY: out-pointers from the caller, checked for NULL in `finish`.
            unsafe { finish(e, "aclnnEmbedding", WS_GATHER, handles, kernel, ws, ex) }
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclnnIndexSelectGetWorkspaceSize(
    self_: *const c_void,
    dim: i64,
    index: *const c_void,
    out: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    guard("aclnnIndexSelectGetWorkspaceSize", || {
        with_emu(|e| {
            let mut c = Check::new(e)?;
            let x = c.tensor(self_, "self")?;
            let i = c.tensor(index, "index")?;
            let o = c.tensor(out, "out")?;
            need_dtype(&x, "self", ARITH)?;
            need_dtype(&i, "index", INDEX)?;
            need_rank(&x, "self", 1, 8)?;
            need_rank(&i, "index", 0, 1)?;
            for (v, n) in [(&x, "self"), (&i, "index"), (&o, "out")] {
                need_contig(v, n)?;
            }
            let r = x.dims.len() as i64;
            if dim < -r || dim >= r {
                bail!(P_INVALID, "dim {dim} outside [{}, {r})", -r);
            }
            let d = if dim < 0 { dim + r } else { dim } as usize;
            let mut shape = x.dims.clone();
            shape[d] = i.numel() as i64;
            need_shape(&o, "out", &shape)?;
            if o.dt != x.dt {
                bail!(P_INVALID, "out dtype {:?} differs from self dtype {:?}", o.dt, x.dt);
            }
            let handles = std::mem::take(&mut c.handles);
            let kernel: Kernel = Arc::new(move |m: &mut Memory| {
                let sel = indices(m, &i, x.dims[d])?;
                let v = m.load(&x, None)?;
                let outer: i64 = x.dims[..d].iter().product();
                let inner: i64 = x.dims[d + 1..].iter().product();
                let (outer, inner, len) = (outer as usize, inner as usize, x.dims[d] as usize);
                let mut r = Vec::with_capacity(outer * sel.len() * inner);
                for a in 0..outer {
                    for &s in &sel {
                        let base = (a * len + s as usize) * inner;
                        r.extend_from_slice(&v[base..base + inner]);
                    }
                }
                m.store(&o, &r)
            });
            // SAFETY: out-pointers from the caller, checked for NULL in `finish`.
            unsafe { finish(e, "aclnnIndexSelect", WS_GATHER, handles, kernel, ws, ex) }
        })
    })
}

// ---------------------------------------------------------------- norms

#[no_mangle]
pub unsafe extern "C" fn aclnnRmsNormGetWorkspaceSize(
    x: *const c_void,
    gamma: *const c_void,
    epsilon: f64,
    y_out: *mut c_void,
    rstd_out: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    guard("aclnnRmsNormGetWorkspaceSize", || {
        with_emu(|e| {
            let mut c = Check::new(e)?;
            let xv = c.tensor(x, "x")?;
            let g = c.tensor(gamma, "gamma")?;
            let y = c.tensor(y_out, "yOut")?;
            let rs = c.tensor(rstd_out, "rstdOut")?;
            need_dtype(&xv, "x", FLOATS)?;
            need_rank(&xv, "x", 1, 8)?;
            if g.dt != xv.dt {
                bail!(P_INVALID, "gamma dtype {:?} differs from x dtype {:?}", g.dt, xv.dt);
            }
            if y.dt != xv.dt {
                bail!(P_INVALID, "yOut dtype {:?} differs from x dtype {:?}", y.dt, xv.dt);
            }
            need_dtype(&rs, "rstdOut", &[Dt::F32])?;
            for (v, n) in [(&xv, "x"), (&g, "gamma"), (&y, "yOut"), (&rs, "rstdOut")] {
                need_contig(v, n)?;
            }
            let (r, gr) = (xv.dims.len(), g.dims.len());
            if gr == 0 || gr > r || g.dims[..] != xv.dims[r - gr..] {
                bail!(P_INVALID, "gamma shape {:?} must equal the trailing dims of x {:?}", g.dims, xv.dims);
            }
            need_shape(&y, "yOut", &xv.dims)?;
            let mut rshape = xv.dims[..r - gr].to_vec();
            rshape.resize(r, 1);
            need_shape(&rs, "rstdOut", &rshape)?;
            if !epsilon.is_finite() || epsilon < 0.0 {
                bail!(P_INVALID, "epsilon {epsilon} must be finite and ≥ 0");
            }
            let handles = std::mem::take(&mut c.handles);
            let kernel: Kernel = Arc::new(move |m: &mut Memory| {
                let v = m.load(&xv, None)?;
                let w = m.load(&g, None)?;
                let n = w.len();
                let mut out = Vec::with_capacity(v.len());
                let mut rstd = Vec::with_capacity(v.len() / n.max(1));
                for row in v.chunks_exact(n) {
                    let ms = row.iter().map(|a| a * a).sum::<f64>() / n as f64;
                    let rinv = 1.0 / (ms + epsilon).sqrt();
                    rstd.push(rinv);
                    out.extend(row.iter().zip(&w).map(|(a, g)| a * rinv * g));
                }
                m.store(&y, &out)?;
                m.store(&rs, &rstd)
            });
            // SAFETY: out-pointers from the caller, checked for NULL in `finish`.
            unsafe { finish(e, "aclnnRmsNorm", WS_NORM, handles, kernel, ws, ex) }
        })
    })
}

// ---------------------------------------------------------------- matmul

unsafe fn matmul(
    op: &'static str,
    a: *const c_void,
    b: *const c_void,
    out: *mut c_void,
    cube: i8,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> Result<(), Fail> {
    with_emu(|e| {
        let mut c = Check::new(e)?;
        let x = c.tensor(a, "self")?;
        let w = c.tensor(b, "mat2")?;
        let o = c.tensor(out, "out")?;
        for (v, n) in [(&x, "self"), (&w, "mat2"), (&o, "out")] {
            need_dtype(v, n, FLOATS)?;
            if v.dims.len() != 2 {
                bail!(P_INVALID, "{n}: rank {} (this emulator implements 2-D {op} only)", v.dims.len());
            }
        }
        if x.dt != w.dt || x.dt != o.dt {
            bail!(P_INVALID, "self {:?}, mat2 {:?} and out {:?} must have one dtype", x.dt, w.dt, o.dt);
        }
        if x.dims[1] != w.dims[0] {
            bail!(P_INVALID, "self {:?} and mat2 {:?}: inner dimensions differ", x.dims, w.dims);
        }
        need_shape(&o, "out", &[x.dims[0], w.dims[1]])?;
        need_contig(&o, "out")?;
        if !(0..=4).contains(&cube) {
            bail!(P_INVALID, "cubeMathType {cube} outside [0, 4]");
        }
        let handles = std::mem::take(&mut c.handles);
        let kernel: Kernel = Arc::new(move |m: &mut Memory| {
            let (mm, k, n) = (x.dims[0] as usize, x.dims[1] as usize, w.dims[1] as usize);
            let xa = m.load(&x, None)?;
            let wa = m.load(&w, None)?;
            m.store(&o, &gemm(&xa, &wa, mm, k, n))
        });
        // SAFETY: out-pointers from the caller, checked for NULL in `finish`.
        unsafe { finish(e, op, WS_MATMUL, handles, kernel, ws, ex) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclnnMmGetWorkspaceSize(
    self_: *const c_void,
    mat2: *const c_void,
    out: *mut c_void,
    cube_math_type: i8,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    // SAFETY: forwarded C arguments.
    guard("aclnnMmGetWorkspaceSize", || unsafe { matmul("aclnnMm", self_, mat2, out, cube_math_type, ws, ex) })
}

#[no_mangle]
pub unsafe extern "C" fn aclnnMatmulGetWorkspaceSize(
    self_: *const c_void,
    other: *const c_void,
    out: *mut c_void,
    cube_math_type: i8,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    // SAFETY: forwarded C arguments.
    guard("aclnnMatmulGetWorkspaceSize", || unsafe { matmul("aclnnMatmul", self_, other, out, cube_math_type, ws, ex) })
}

// ---------------------------------------------------------------- phase-2 ops (hc, grouped linear)

/// `out = self / other` (broadcasting, float result).
#[no_mangle]
pub unsafe extern "C" fn aclnnDivGetWorkspaceSize(
    self_: *const c_void,
    other: *const c_void,
    out: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    guard("aclnnDivGetWorkspaceSize", || {
        with_emu(|e| {
            let mut c = Check::new(e)?;
            let a = c.tensor(self_, "self")?;
            let b = c.tensor(other, "other")?;
            let o = c.tensor(out, "out")?;
            need_dtype(&a, "self", ARITH)?;
            need_dtype(&b, "other", ARITH)?;
            need_dtype(&o, "out", FLOATS)?;
            need_rank(&a, "self", 0, 8)?;
            need_rank(&b, "other", 0, 8)?;
            need_contig(&o, "out")?;
            let shape = broadcast(&a.dims, &b.dims).ok_or_else(|| {
                Fail::new(P_INVALID, format!("self {:?} and other {:?} do not broadcast", a.dims, b.dims))
            })?;
            need_shape(&o, "out", &shape)?;
            let handles = std::mem::take(&mut c.handles);
            let kernel: Kernel = Arc::new(move |m: &mut Memory| {
                let x = m.load(&a, Some(&o.dims))?;
                let y = m.load(&b, Some(&o.dims))?;
                let r: Vec<f64> = x.iter().zip(&y).map(|(&x, &y)| x / y).collect();
                m.store(&o, &r)
            });
            // SAFETY: out-pointers from the caller, checked for NULL in `finish`.
            unsafe { finish(e, "aclnnDiv", WS_ELEMENTWISE, handles, kernel, ws, ex) }
        })
    })
}

/// Elementwise with a scalar operand: `Muls` (`self · other`) and `Adds` (`self + alpha·other`).
unsafe fn scalar_op(
    op: &'static str,
    add: bool,
    self_: *const c_void,
    other: *const c_void,
    alpha: *const c_void,
    out: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> Result<(), Fail> {
    with_emu(|e| {
        let mut c = Check::new(e)?;
        let a = c.tensor(self_, "self")?;
        let o = c.tensor(out, "out")?;
        let Some((_, v)) = c.e.scalar(other as usize, "other")? else { bail!(P_NULL, "other is nullptr") };
        let alpha = if add {
            match c.e.scalar(alpha as usize, "alpha")? {
                Some((_, v)) => v,
                None => bail!(P_NULL, "alpha is nullptr"),
            }
        } else {
            1.0
        };
        need_dtype(&a, "self", ARITH)?;
        need_dtype(&o, "out", ARITH)?;
        need_rank(&a, "self", 0, 8)?;
        need_contig(&o, "out")?;
        need_shape(&o, "out", &a.dims)?;
        let handles = std::mem::take(&mut c.handles);
        let kernel: Kernel = Arc::new(move |m: &mut Memory| {
            let x = m.load(&a, None)?;
            let r: Vec<f64> = x.iter().map(|&x| if add { x + alpha * v } else { x * v }).collect();
            m.store(&o, &r)
        });
        // SAFETY: out-pointers from the caller, checked for NULL in `finish`.
        unsafe { finish(e, op, WS_ELEMENTWISE, handles, kernel, ws, ex) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclnnMulsGetWorkspaceSize(
    self_: *const c_void,
    other: *const c_void,
    out: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    // SAFETY: forwarded C arguments.
    guard("aclnnMulsGetWorkspaceSize", || unsafe {
        scalar_op("aclnnMuls", false, self_, other, std::ptr::null(), out, ws, ex)
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclnnAddsGetWorkspaceSize(
    self_: *const c_void,
    other: *const c_void,
    alpha: *const c_void,
    out: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    // SAFETY: forwarded C arguments.
    guard("aclnnAddsGetWorkspaceSize", || unsafe { scalar_op("aclnnAdds", true, self_, other, alpha, out, ws, ex) })
}

#[no_mangle]
pub unsafe extern "C" fn aclnnSigmoidGetWorkspaceSize(
    self_: *const c_void,
    out: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    guard("aclnnSigmoidGetWorkspaceSize", || {
        with_emu(|e| {
            let mut c = Check::new(e)?;
            let x = c.tensor(self_, "self")?;
            let o = c.tensor(out, "out")?;
            need_dtype(&x, "self", FLOATS)?;
            if o.dt != x.dt {
                bail!(P_INVALID, "out dtype {:?} differs from self dtype {:?}", o.dt, x.dt);
            }
            need_rank(&x, "self", 0, 8)?;
            need_contig(&o, "out")?;
            need_shape(&o, "out", &x.dims)?;
            let handles = std::mem::take(&mut c.handles);
            let kernel: Kernel = Arc::new(move |m: &mut Memory| {
                let v = m.load(&x, None)?;
                let r: Vec<f64> = v.iter().map(|&v| 1.0 / (1.0 + (-v).exp())).collect();
                m.store(&o, &r)
            });
            // SAFETY: out-pointers from the caller, checked for NULL in `finish`.
            unsafe { finish(e, "aclnnSigmoid", WS_ELEMENTWISE, handles, kernel, ws, ex) }
        })
    })
}

/// Normalizes a dim argument against `rank` (negative counts from the end).
fn norm_dim(dim: i64, rank: usize, name: &str) -> Result<usize, Fail> {
    let r = rank as i64;
    if dim < -r || dim >= r {
        bail!(P_INVALID, "{name} {dim} outside [{}, {r})", -r);
    }
    Ok(if dim < 0 { dim + r } else { dim } as usize)
}

/// `(outer, len, inner)` of the lanes along dim `d` of a contiguous `dims`.
fn lanes(dims: &[i64], d: usize) -> (usize, usize, usize) {
    let outer: i64 = dims[..d].iter().product();
    let inner: i64 = dims[d + 1..].iter().product();
    (outer as usize, dims[d] as usize, inner as usize)
}

#[no_mangle]
pub unsafe extern "C" fn aclnnSoftmaxGetWorkspaceSize(
    self_: *const c_void,
    dim: i64,
    out: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    guard("aclnnSoftmaxGetWorkspaceSize", || {
        with_emu(|e| {
            let mut c = Check::new(e)?;
            let x = c.tensor(self_, "self")?;
            let o = c.tensor(out, "out")?;
            need_dtype(&x, "self", FLOATS)?;
            if o.dt != x.dt {
                bail!(P_INVALID, "out dtype {:?} differs from self dtype {:?}", o.dt, x.dt);
            }
            need_rank(&x, "self", 1, 8)?;
            need_contig(&o, "out")?;
            need_shape(&o, "out", &x.dims)?;
            let d = norm_dim(dim, x.dims.len(), "dim")?;
            let handles = std::mem::take(&mut c.handles);
            let kernel: Kernel = Arc::new(move |m: &mut Memory| {
                let v = m.load(&x, None)?;
                let (outer, len, inner) = lanes(&x.dims, d);
                let mut r = vec![0f64; v.len()];
                for a in 0..outer {
                    for b in 0..inner {
                        let at = |i: usize| (a * len + i) * inner + b;
                        let mx = (0..len).map(|i| v[at(i)]).fold(f64::NEG_INFINITY, f64::max);
                        let sum: f64 = (0..len).map(|i| (v[at(i)] - mx).exp()).sum();
                        (0..len).for_each(|i| r[at(i)] = (v[at(i)] - mx).exp() / sum);
                    }
                }
                m.store(&o, &r)
            });
            // SAFETY: out-pointers from the caller, checked for NULL in `finish`.
            unsafe { finish(e, "aclnnSoftmax", WS_NORM, handles, kernel, ws, ex) }
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclnnReduceSumGetWorkspaceSize(
    self_: *const c_void,
    dims: *const c_void,
    keep_dims: bool,
    dtype: i32,
    out: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    guard("aclnnReduceSumGetWorkspaceSize", || {
        with_emu(|e| {
            let mut c = Check::new(e)?;
            let x = c.tensor(self_, "self")?;
            let o = c.tensor(out, "out")?;
            if dims.is_null() {
                bail!(P_NULL, "dims is nullptr");
            }
            let Some(list) = c.e.int_arrays.get(&(dims as usize)).cloned() else {
                bail!(P_INVALID, "dims ({dims:?}) is not a live aclIntArray");
            };
            need_dtype(&x, "self", FLOATS)?;
            let want = Dt::from_acl(dtype).ok_or_else(|| Fail::new(P_INVALID, format!("unknown dtype {dtype}")))?;
            if want != o.dt {
                bail!(P_INVALID, "dtype argument {want:?} differs from out dtype {:?}", o.dt);
            }
            need_dtype(&o, "out", FLOATS)?;
            need_rank(&x, "self", 1, 8)?;
            need_contig(&o, "out")?;
            let mut reduce = vec![false; x.dims.len()];
            for &d in &list {
                let d = norm_dim(d, x.dims.len(), "dims entry")?;
                if reduce[d] {
                    bail!(P_INVALID, "dims {list:?} repeats dim {d}");
                }
                reduce[d] = true;
            }
            let shape: Vec<i64> = x
                .dims
                .iter()
                .zip(&reduce)
                .filter_map(|(&n, &r)| {
                    if !r {
                        Some(n)
                    } else if keep_dims {
                        Some(1)
                    } else {
                        None
                    }
                })
                .collect();
            need_shape(&o, "out", &shape)?;
            let handles = std::mem::take(&mut c.handles);
            let kernel: Kernel = Arc::new(move |m: &mut Memory| {
                let v = m.load(&x, None)?;
                let keep: Vec<i64> = x.dims.iter().zip(&reduce).map(|(&n, &r)| if r { 1 } else { n }).collect();
                let ostr = crate::memory::contiguous_strides(&keep);
                let mut r = vec![0f64; keep.iter().product::<i64>() as usize];
                let mut idx = vec![0i64; x.dims.len()];
                for &val in &v {
                    let at: i64 =
                        idx.iter().zip(&ostr).zip(&reduce).map(|((&i, &s), &red)| if red { 0 } else { i * s }).sum();
                    r[at as usize] += val;
                    for k in (0..idx.len()).rev() {
                        idx[k] += 1;
                        if idx[k] < x.dims[k] {
                            break;
                        }
                        idx[k] = 0;
                    }
                }
                m.store(&o, &r)
            });
            // SAFETY: out-pointers from the caller, checked for NULL in `finish`.
            unsafe { finish(e, "aclnnReduceSum", WS_NORM, handles, kernel, ws, ex) }
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclnnBatchMatMulGetWorkspaceSize(
    self_: *const c_void,
    mat2: *const c_void,
    out: *mut c_void,
    cube: i8,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    guard("aclnnBatchMatMulGetWorkspaceSize", || {
        with_emu(|e| {
            let mut c = Check::new(e)?;
            let x = c.tensor(self_, "self")?;
            let w = c.tensor(mat2, "mat2")?;
            let o = c.tensor(out, "out")?;
            for (v, n) in [(&x, "self"), (&w, "mat2"), (&o, "out")] {
                need_dtype(v, n, FLOATS)?;
                need_rank(v, n, 3, 3)?;
            }
            if x.dt != w.dt || x.dt != o.dt {
                bail!(P_INVALID, "self {:?}, mat2 {:?} and out {:?} must have one dtype", x.dt, w.dt, o.dt);
            }
            if x.dims[0] != w.dims[0] {
                bail!(P_INVALID, "self {:?} and mat2 {:?}: batch dimensions differ", x.dims, w.dims);
            }
            if x.dims[2] != w.dims[1] {
                bail!(P_INVALID, "self {:?} and mat2 {:?}: inner dimensions differ", x.dims, w.dims);
            }
            need_shape(&o, "out", &[x.dims[0], x.dims[1], w.dims[2]])?;
            need_contig(&o, "out")?;
            if !(0..=4).contains(&cube) {
                bail!(P_INVALID, "cubeMathType {cube} outside [0, 4]");
            }
            let handles = std::mem::take(&mut c.handles);
            let kernel: Kernel = Arc::new(move |m: &mut Memory| {
                let (b, mm, k, n) = (x.dims[0] as usize, x.dims[1] as usize, x.dims[2] as usize, w.dims[2] as usize);
                let xa = m.load(&x, None)?;
                let wa = m.load(&w, None)?;
                let mut r = Vec::with_capacity(b * mm * n);
                for g in 0..b {
                    r.extend(gemm(&xa[g * mm * k..(g + 1) * mm * k], &wa[g * k * n..(g + 1) * k * n], mm, k, n));
                }
                m.store(&o, &r)
            });
            // SAFETY: out-pointers from the caller, checked for NULL in `finish`.
            unsafe { finish(e, "aclnnBatchMatMul", WS_MATMUL, handles, kernel, ws, ex) }
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclnnInplaceIndexCopyGetWorkspaceSize(
    self_ref: *mut c_void,
    dim: i64,
    index: *const c_void,
    source: *const c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    guard("aclnnInplaceIndexCopyGetWorkspaceSize", || {
        with_emu(|e| {
            if e.config.low_precision() {
                bail!(
                    P_INVALID,
                    "aclnnInplaceIndexCopy is not supported on {} (Atlas A2/A3 only)",
                    e.config.soc_name()
                );
            }
            let mut c = Check::new(e)?;
            let x = c.tensor(self_ref, "selfRef")?;
            let i = c.tensor(index, "index")?;
            let s = c.tensor(source, "source")?;
            need_dtype(&i, "index", INDEX)?;
            need_rank(&i, "index", 0, 1)?;
            need_rank(&x, "selfRef", 1, 8)?;
            if !x.dt.has_codec() || s.dt != x.dt {
                bail!(P_INVALID, "selfRef {:?} and source {:?} must have one supported dtype", x.dt, s.dt);
            }
            for (v, n) in [(&x, "selfRef"), (&i, "index"), (&s, "source")] {
                need_contig(v, n)?;
            }
            let d = norm_dim(dim, x.dims.len(), "dim")?;
            let mut shape = x.dims.clone();
            shape[d] = i.numel() as i64;
            need_shape(&s, "source", &shape)?;
            let handles = std::mem::take(&mut c.handles);
            let kernel: Kernel = Arc::new(move |m: &mut Memory| {
                let sel = indices(m, &i, x.dims[d])?;
                let mut v = m.load(&x, None)?;
                let src = m.load(&s, None)?;
                let (outer, len, inner) = lanes(&x.dims, d);
                for a in 0..outer {
                    for (k, &t) in sel.iter().enumerate() {
                        let to = (a * len + t as usize) * inner;
                        let from = (a * sel.len() + k) * inner;
                        v[to..to + inner].copy_from_slice(&src[from..from + inner]);
                    }
                }
                m.store(&x, &v)
            });
            // SAFETY: out-pointers from the caller, checked for NULL in `finish`.
            unsafe { finish(e, "aclnnInplaceIndexCopy", WS_GATHER, handles, kernel, ws, ex) }
        })
    })
}

/// Elementwise float maps with out dtype = self dtype.
#[derive(Clone, Copy)]
enum Map {
    Softplus { beta: f64, threshold: f64 },
    Sqrt,
    Relu,
}

unsafe fn float_map(
    op: &'static str,
    kind: Map,
    self_: *const c_void,
    out: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> Result<(), Fail> {
    with_emu(|e| {
        let mut c = Check::new(e)?;
        let x = c.tensor(self_, "self")?;
        let o = c.tensor(out, "out")?;
        need_dtype(&x, "self", FLOATS)?;
        if o.dt != x.dt {
            bail!(P_INVALID, "out dtype {:?} differs from self dtype {:?}", o.dt, x.dt);
        }
        need_rank(&x, "self", 0, 8)?;
        need_contig(&o, "out")?;
        need_shape(&o, "out", &x.dims)?;
        let handles = std::mem::take(&mut c.handles);
        let kernel: Kernel = Arc::new(move |m: &mut Memory| {
            let v = m.load(&x, None)?;
            let r: Vec<f64> = v
                .iter()
                .map(|&v| match kind {
                    Map::Softplus { beta, threshold } => {
                        if v * beta > threshold {
                            v
                        } else {
                            (v * beta).exp().ln_1p() / beta
                        }
                    }
                    Map::Sqrt => v.sqrt(),
                    Map::Relu => v.max(0.0),
                })
                .collect();
            m.store(&o, &r)
        });
        // SAFETY: out-pointers from the caller, checked for NULL in `finish`.
        unsafe { finish(e, op, WS_ELEMENTWISE, handles, kernel, ws, ex) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclnnSoftplusGetWorkspaceSize(
    self_: *const c_void,
    beta: *const c_void,
    threshold: *const c_void,
    out: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    guard("aclnnSoftplusGetWorkspaceSize", || {
        let (b, t) = with_emu(|e| Ok((e.scalar(beta as usize, "beta")?, e.scalar(threshold as usize, "threshold")?)))?;
        let (Some((_, beta)), Some((_, threshold))) = (b, t) else { bail!(P_NULL, "beta or threshold is nullptr") };
        if beta == 0.0 {
            bail!(P_INVALID, "beta must be non-zero");
        }
        // SAFETY: forwarded C arguments.
        unsafe { float_map("aclnnSoftplus", Map::Softplus { beta, threshold }, self_, out, ws, ex) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclnnSqrtGetWorkspaceSize(
    self_: *const c_void,
    out: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    // SAFETY: forwarded C arguments.
    guard("aclnnSqrtGetWorkspaceSize", || unsafe { float_map("aclnnSqrt", Map::Sqrt, self_, out, ws, ex) })
}

#[no_mangle]
pub unsafe extern "C" fn aclnnReluGetWorkspaceSize(
    self_: *const c_void,
    out: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    // SAFETY: forwarded C arguments.
    guard("aclnnReluGetWorkspaceSize", || unsafe { float_map("aclnnRelu", Map::Relu, self_, out, ws, ex) })
}

#[no_mangle]
pub unsafe extern "C" fn aclnnTopkGetWorkspaceSize(
    self_: *const c_void,
    k: i64,
    dim: i64,
    largest: bool,
    sorted: bool,
    values_out: *mut c_void,
    indices_out: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    guard("aclnnTopkGetWorkspaceSize", || {
        with_emu(|e| {
            let mut c = Check::new(e)?;
            let x = c.tensor(self_, "self")?;
            let v = c.tensor(values_out, "valuesOut")?;
            let i = c.tensor(indices_out, "indicesOut")?;
            need_dtype(&x, "self", FLOATS)?;
            need_rank(&x, "self", 1, 8)?;
            if v.dt != x.dt {
                bail!(P_INVALID, "valuesOut dtype {:?} differs from self dtype {:?}", v.dt, x.dt);
            }
            need_dtype(&i, "indicesOut", &[Dt::I64])?;
            for (t, n) in [(&x, "self"), (&v, "valuesOut"), (&i, "indicesOut")] {
                need_contig(t, n)?;
            }
            let d = norm_dim(dim, x.dims.len(), "dim")?;
            if k < 0 || k > x.dims[d] {
                bail!(P_INVALID, "k {k} outside [0, {}]", x.dims[d]);
            }
            if !sorted {
                bail!(P_INVALID, "this emulator implements sorted = true only");
            }
            let mut shape = x.dims.clone();
            shape[d] = k;
            need_shape(&v, "valuesOut", &shape)?;
            need_shape(&i, "indicesOut", &shape)?;
            let handles = std::mem::take(&mut c.handles);
            let kernel: Kernel = Arc::new(move |m: &mut Memory| {
                let a = m.load(&x, None)?;
                let (outer, len, inner) = lanes(&x.dims, d);
                let k = k as usize;
                let (mut vals, mut idx) = (vec![0f64; outer * k * inner], vec![0f64; outer * k * inner]);
                for o in 0..outer {
                    for b in 0..inner {
                        let mut order: Vec<usize> = (0..len).collect();
                        let key = |j: usize| a[(o * len + j) * inner + b];
                        // Stable: equal values keep ascending index order. NaN sorts as largest.
                        order.sort_by(|&p, &q| {
                            let c = key(p).total_cmp(&key(q));
                            if largest {
                                c.reverse()
                            } else {
                                c
                            }
                        });
                        for (t, &j) in order.iter().take(k).enumerate() {
                            vals[(o * k + t) * inner + b] = key(j);
                            idx[(o * k + t) * inner + b] = j as f64;
                        }
                    }
                }
                m.store(&v, &vals)?;
                m.store(&i, &idx)
            });
            // SAFETY: out-pointers from the caller, checked for NULL in `finish`.
            unsafe { finish(e, "aclnnTopk", WS_NORM, handles, kernel, ws, ex) }
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclnnGatherGetWorkspaceSize(
    self_: *const c_void,
    dim: i64,
    index: *const c_void,
    out: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    guard("aclnnGatherGetWorkspaceSize", || {
        with_emu(|e| {
            let mut c = Check::new(e)?;
            let x = c.tensor(self_, "self")?;
            let i = c.tensor(index, "index")?;
            let o = c.tensor(out, "out")?;
            need_dtype(&x, "self", ARITH)?;
            need_dtype(&i, "index", INDEX)?;
            need_rank(&x, "self", 1, 8)?;
            if i.dims.len() != x.dims.len() {
                bail!(P_INVALID, "index rank {} differs from self rank {}", i.dims.len(), x.dims.len());
            }
            for (t, n) in [(&x, "self"), (&i, "index"), (&o, "out")] {
                need_contig(t, n)?;
            }
            let d = norm_dim(dim, x.dims.len(), "dim")?;
            if i.dims.iter().zip(&x.dims).enumerate().any(|(a, (&n, &m))| a != d && n > m) {
                bail!(P_INVALID, "index {:?} exceeds self {:?} outside dim {d}", i.dims, x.dims);
            }
            need_shape(&o, "out", &i.dims)?;
            if o.dt != x.dt {
                bail!(P_INVALID, "out dtype {:?} differs from self dtype {:?}", o.dt, x.dt);
            }
            let handles = std::mem::take(&mut c.handles);
            let kernel: Kernel = Arc::new(move |m: &mut Memory| {
                let sel = indices(m, &i, x.dims[d])?;
                let a = m.load(&x, None)?;
                let xs = crate::memory::contiguous_strides(&x.dims);
                let mut idx = vec![0i64; i.dims.len()];
                let mut r = Vec::with_capacity(sel.len());
                for &s in &sel {
                    let at: i64 = idx
                        .iter()
                        .zip(&xs)
                        .enumerate()
                        .map(|(a, (&t, &st))| if a == d { s * st } else { t * st })
                        .sum();
                    r.push(a[at as usize]);
                    for q in (0..idx.len()).rev() {
                        idx[q] += 1;
                        if idx[q] < i.dims[q] {
                            break;
                        }
                        idx[q] = 0;
                    }
                }
                m.store(&o, &r)
            });
            // SAFETY: out-pointers from the caller, checked for NULL in `finish`.
            unsafe { finish(e, "aclnnGather", WS_GATHER, handles, kernel, ws, ex) }
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclnnInplaceScatterGetWorkspaceSize(
    self_ref: *mut c_void,
    dim: i64,
    index: *const c_void,
    src: *const c_void,
    reduce: i64,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    guard("aclnnInplaceScatterGetWorkspaceSize", || {
        with_emu(|e| {
            let mut c = Check::new(e)?;
            let x = c.tensor(self_ref, "selfRef")?;
            let i = c.tensor(index, "index")?;
            let s = c.tensor(src, "src")?;
            need_dtype(&i, "index", INDEX)?;
            need_rank(&x, "selfRef", 1, 8)?;
            if !x.dt.has_codec() || s.dt != x.dt {
                bail!(P_INVALID, "selfRef {:?} and src {:?} must have one supported dtype", x.dt, s.dt);
            }
            if i.dims.len() != x.dims.len() || s.dims.len() != x.dims.len() {
                bail!(P_INVALID, "selfRef {:?}, index {:?} and src {:?} must have one rank", x.dims, i.dims, s.dims);
            }
            for (v, n) in [(&x, "selfRef"), (&i, "index"), (&s, "src")] {
                need_contig(v, n)?;
            }
            let d = norm_dim(dim, x.dims.len(), "dim")?;
            for a in 0..x.dims.len() {
                if i.dims[a] > s.dims[a] || (a != d && i.dims[a] > x.dims[a]) {
                    bail!(P_INVALID, "index {:?} exceeds src {:?} or selfRef {:?} in dim {a}", i.dims, s.dims, x.dims);
                }
            }
            if !(0..=1).contains(&reduce) {
                bail!(P_INVALID, "reduce {reduce}: this emulator implements 0 (replace) and 1 (add)");
            }
            let handles = std::mem::take(&mut c.handles);
            let kernel: Kernel = Arc::new(move |m: &mut Memory| {
                let sel = indices(m, &i, x.dims[d])?;
                let mut v = m.load(&x, None)?;
                let sv = m.load(&s, None)?;
                let (xs, ss) = (crate::memory::contiguous_strides(&x.dims), crate::memory::contiguous_strides(&s.dims));
                let mut idx = vec![0i64; i.dims.len()];
                for &t in &sel {
                    let to: i64 = idx
                        .iter()
                        .zip(&xs)
                        .enumerate()
                        .map(|(a, (&k, &st))| if a == d { t * st } else { k * st })
                        .sum();
                    let from: i64 = idx.iter().zip(&ss).map(|(&k, &st)| k * st).sum();
                    let val = sv[from as usize];
                    if reduce == 1 {
                        v[to as usize] += val;
                    } else {
                        v[to as usize] = val;
                    }
                    for q in (0..idx.len()).rev() {
                        idx[q] += 1;
                        if idx[q] < i.dims[q] {
                            break;
                        }
                        idx[q] = 0;
                    }
                }
                m.store(&x, &v)
            });
            // SAFETY: out-pointers from the caller, checked for NULL in `finish`.
            unsafe { finish(e, "aclnnInplaceScatter", WS_GATHER, handles, kernel, ws, ex) }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_and_promotion() {
        assert_eq!(broadcast(&[2, 1, 4], &[3, 1]), Some(vec![2, 3, 4]));
        assert_eq!(broadcast(&[2, 3], &[4, 3]), None);
        assert_eq!(promote(Dt::F16, Dt::Bf16), Dt::F32);
        assert_eq!(promote(Dt::I32, Dt::F16), Dt::F16);
        assert_eq!(promote(Dt::I8, Dt::U8), Dt::I16);
    }

    #[test]
    fn contiguity() {
        let v = TView { addr: 0, dt: Dt::F32, dims: vec![2, 3], strides: vec![3, 1], offset: 0 };
        assert!(is_contiguous(&v));
        assert!(!is_contiguous(&TView { dims: vec![3, 2], strides: vec![1, 3], ..v.clone() }));
        assert!(is_contiguous(&TView { dims: vec![1, 3], strides: vec![99, 1], ..v }));
    }
}

// ---------------------------------------------------------------------------------------------
// Exact quantization building blocks: |x|, row maxima and bit operations on INT32 views (the
// backend reinterprets f32 bits as INT32 to take exponents without any libm rounding).
// ---------------------------------------------------------------------------------------------

phase2!(aclnnAbs, aclnnAmax, aclnnBitwiseAndScalar, aclnnBitwiseOrTensor);

/// Integer dtypes the bitwise ops take.
const BITWISE: &[Dt] = &[Dt::I8, Dt::U8, Dt::I16, Dt::I32, Dt::I64, Dt::Bool];

#[no_mangle]
pub unsafe extern "C" fn aclnnAbsGetWorkspaceSize(
    self_: *const c_void,
    out: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    // SAFETY: forwarded C arguments.
    guard("aclnnAbsGetWorkspaceSize", || unsafe { unary("aclnnAbs", Un::Abs, self_, out, ws, ex) })
}

/// `out = max(self)` over `dim`. Emulator subset: `dim` must name the last dimension only.
#[no_mangle]
pub unsafe extern "C" fn aclnnAmaxGetWorkspaceSize(
    self_: *const c_void,
    dim: *const c_void,
    keep_dim: bool,
    out: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    guard("aclnnAmaxGetWorkspaceSize", || {
        with_emu(|e| {
            let mut c = Check::new(e)?;
            let x = c.tensor(self_, "self")?;
            let o = c.tensor(out, "out")?;
            if dim.is_null() {
                bail!(P_NULL, "dim is nullptr");
            }
            let Some(list) = c.e.int_arrays.get(&(dim as usize)).cloned() else {
                bail!(P_INVALID, "dim ({dim:?}) is not a live aclIntArray");
            };
            need_dtype(&x, "self", FLOATS)?;
            if o.dt != x.dt {
                bail!(P_INVALID, "out dtype {:?} differs from self dtype {:?}", o.dt, x.dt);
            }
            need_rank(&x, "self", 1, 8)?;
            let last = x.dims.len() - 1;
            if list.len() != 1 || norm_dim(list[0], x.dims.len(), "dim entry")? != last {
                bail!(P_INVALID, "dim {list:?}: the emulator reduces the last dimension only");
            }
            if x.dims[last] == 0 {
                bail!(P_INVALID, "self {:?}: cannot take the maximum of an empty dimension", x.dims);
            }
            need_contig(&o, "out")?;
            let mut shape = x.dims.clone();
            if keep_dim {
                shape[last] = 1;
            } else {
                shape.pop();
            }
            need_shape(&o, "out", &shape)?;
            let handles = std::mem::take(&mut c.handles);
            let kernel: Kernel = Arc::new(move |m: &mut Memory| {
                let v = m.load(&x, None)?;
                let n = x.dims[x.dims.len() - 1] as usize;
                let r: Vec<f64> = v.chunks(n).map(|l| l.iter().copied().fold(f64::NEG_INFINITY, f64::max)).collect();
                m.store(&o, &r)
            });
            // SAFETY: out-pointers from the caller, checked for NULL in `finish`.
            unsafe { finish(e, "aclnnAmax", WS_NORM, handles, kernel, ws, ex) }
        })
    })
}

/// The integer value of an element loaded as f64 (exact for every integer dtype we take).
fn as_int(v: f64) -> i64 {
    v as i64
}

#[no_mangle]
pub unsafe extern "C" fn aclnnBitwiseAndScalarGetWorkspaceSize(
    self_: *const c_void,
    other: *const c_void,
    out: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    guard("aclnnBitwiseAndScalarGetWorkspaceSize", || {
        with_emu(|e| {
            let mut c = Check::new(e)?;
            let x = c.tensor(self_, "self")?;
            let o = c.tensor(out, "out")?;
            let Some((sdt, s)) = c.e.scalar(other as usize, "other")? else { bail!(P_NULL, "other is nullptr") };
            need_dtype(&x, "self", BITWISE)?;
            if !BITWISE.contains(&sdt) {
                bail!(P_INVALID, "other: scalar dtype {sdt:?} is not an integer type");
            }
            if o.dt != x.dt {
                bail!(P_INVALID, "out dtype {:?} differs from self dtype {:?}", o.dt, x.dt);
            }
            need_rank(&x, "self", 0, 8)?;
            need_contig(&o, "out")?;
            need_shape(&o, "out", &x.dims)?;
            let mask = as_int(s);
            let handles = std::mem::take(&mut c.handles);
            let kernel: Kernel = Arc::new(move |m: &mut Memory| {
                let v = m.load(&x, None)?;
                m.store(&o, &v.iter().map(|&v| (as_int(v) & mask) as f64).collect::<Vec<f64>>())
            });
            // SAFETY: out-pointers from the caller, checked for NULL in `finish`.
            unsafe { finish(e, "aclnnBitwiseAndScalar", WS_ELEMENTWISE, handles, kernel, ws, ex) }
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclnnBitwiseOrTensorGetWorkspaceSize(
    self_: *const c_void,
    other: *const c_void,
    out: *mut c_void,
    ws: *mut u64,
    ex: *mut *mut c_void,
) -> i32 {
    guard("aclnnBitwiseOrTensorGetWorkspaceSize", || {
        with_emu(|e| {
            let mut c = Check::new(e)?;
            let x = c.tensor(self_, "self")?;
            let y = c.tensor(other, "other")?;
            let o = c.tensor(out, "out")?;
            need_dtype(&x, "self", BITWISE)?;
            if y.dt != x.dt || o.dt != x.dt {
                bail!(P_INVALID, "self {:?}, other {:?} and out {:?} must have one integer dtype", x.dt, y.dt, o.dt);
            }
            let shape = broadcast(&x.dims, &y.dims).ok_or_else(|| {
                Fail::new(P_INVALID, format!("self {:?} and other {:?} do not broadcast", x.dims, y.dims))
            })?;
            need_contig(&o, "out")?;
            need_shape(&o, "out", &shape)?;
            let handles = std::mem::take(&mut c.handles);
            let kernel: Kernel = Arc::new(move |m: &mut Memory| {
                let a = m.load(&x, Some(&shape))?;
                let b = m.load(&y, Some(&shape))?;
                m.store(&o, &a.iter().zip(&b).map(|(&a, &b)| (as_int(a) | as_int(b)) as f64).collect::<Vec<f64>>())
            });
            // SAFETY: out-pointers from the caller, checked for NULL in `finish`.
            unsafe { finish(e, "aclnnBitwiseOrTensor", WS_ELEMENTWISE, handles, kernel, ws, ex) }
        })
    })
}
