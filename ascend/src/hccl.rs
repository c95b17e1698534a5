//! HCCL: one rank of a communicator per [`AscendBackend`], and the collectives v4rt needs.
//!
//! A [`Communicator`] owns one `HcclComm` handle for one backend (one device, one stream).
//! Setting one up follows HCCL's root-info pattern (spec §4): rank 0 calls
//! [`Communicator::root_info`], the 4108-byte blob reaches every rank out of band
//! ([`RootInfo::as_bytes`] / [`RootInfo::from_bytes`]), and every rank calls
//! [`Communicator::init`], which blocks until all ranks have joined. [`Communicator::init_all`]
//! makes every rank of a single-process communicator at once (`HcclCommInitAll`).
//!
//! Rules this module keeps:
//! * **Stream order.** Collectives are issued on the backend's stream under its issue lock, like
//!   any op, so they run after the work issued before them and before the work issued after
//!   them; their results are visible through the backend's `download`/`synchronize` as usual.
//!   Nothing waits on the host at issue time.
//! * **Host checks first.** Tensors must be storage of *this* backend instance (the one the
//!   communicator was created for), dtypes and shapes must agree, and the dtype must be one
//!   HCCL documents for the collective; a violation is [`Error::InvalidArgument`] naming the
//!   tensor, before any HCCL call.
//! * **Errors.** A status returned by a call is [`Error::Device`] with the `HcclResult` as the
//!   code and `HcclGetErrorString` plus `aclGetRecentErrMsg` in the message. A collective that
//!   fails while it runs (a peer that never arrives, ranks disagreeing) surfaces at the
//!   backend's next synchronize as a 507xxx device error, like a kernel fault, and
//!   [`Communicator::async_error`] then reports the HCCL code.
//! * No `libhccl` in the toolkit ([`crate::loader::Api::hccl`] is `None`) is
//!   [`Error::Unsupported`] naming the library.
//!
//! Not done: `HcclCommInitRootInfoConfig` (buffer size, deterministic mode), AlltoAll(V),
//! send/recv, sub-communicators, and any use of collectives by the model (tensor or expert
//! parallelism).

use std::ffi::{c_char, CStr};
use std::fmt;
use std::ptr;
use std::sync::Arc;

use hal::{DType, Error, Result, Tensor};

use crate::runtime::{DevicePtr, Runtime, Stream, BACKEND};
use crate::sys::{self, HcclComm, HcclDataType, HcclFns, HcclReduceOp, HcclResult, HcclRootInfo};
use crate::AscendBackend;

/// `COMM_NAME_MAX_LENGTH` (hccl_types.h): the buffer `HcclGetCommName` writes into. Kept
/// here rather than in `sys`: the header declares it as a C++ `const`, which the ABI check's
/// constant list does not cover.
const COMM_NAME_MAX_LENGTH: usize = 128;

/// The rendezvous blob of one communicator (`HcclRootInfo`): made by rank 0, passed unchanged
/// to every rank.
pub struct RootInfo(Box<HcclRootInfo>);

impl RootInfo {
    /// The blob's bytes, for sending to the other ranks.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: `internal` is a plain array of `c_char` (one byte each), fully initialized.
        unsafe { std::slice::from_raw_parts(self.0.internal.as_ptr().cast::<u8>(), sys::HCCL_ROOT_INFO_BYTES) }
    }

    /// A blob received from rank 0 (exactly [`sys::HCCL_ROOT_INFO_BYTES`] bytes).
    pub fn from_bytes(bytes: &[u8]) -> Result<RootInfo> {
        if bytes.len() != sys::HCCL_ROOT_INFO_BYTES {
            return Err(Error::invalid(
                "hccl root info",
                format!("{} bytes given, an HcclRootInfo has {}", bytes.len(), sys::HCCL_ROOT_INFO_BYTES),
            ));
        }
        let mut info = Box::new(HcclRootInfo { internal: [0; sys::HCCL_ROOT_INFO_BYTES] });
        for (d, &s) in info.internal.iter_mut().zip(bytes) {
            *d = s as c_char;
        }
        Ok(RootInfo(info))
    }
}

impl Clone for RootInfo {
    fn clone(&self) -> Self {
        RootInfo(Box::new(HcclRootInfo { internal: self.0.internal }))
    }
}

impl fmt::Debug for RootInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RootInfo({} bytes)", sys::HCCL_ROOT_INFO_BYTES)
    }
}

/// A reduction (`HcclReduceOp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Prod,
    Max,
    Min,
}

impl ReduceOp {
    fn raw(self) -> HcclReduceOp {
        match self {
            ReduceOp::Sum => sys::HCCL_REDUCE_SUM,
            ReduceOp::Prod => sys::HCCL_REDUCE_PROD,
            ReduceOp::Max => sys::HCCL_REDUCE_MAX,
            ReduceOp::Min => sys::HCCL_REDUCE_MIN,
        }
    }
}

/// The HCCL type a reduction of `dt` uses (`hccl.h` lists int8, int32, fp16, fp32 and bf16 for
/// both AllReduce and ReduceScatter).
fn reduce_dtype(dt: DType) -> Option<HcclDataType> {
    Some(match dt {
        DType::F32 => sys::HCCL_DATA_TYPE_FP32,
        DType::BF16 => sys::HCCL_DATA_TYPE_BFP16,
        DType::F16 => sys::HCCL_DATA_TYPE_FP16,
        DType::I32 => sys::HCCL_DATA_TYPE_INT32,
        DType::I8 => sys::HCCL_DATA_TYPE_INT8,
        _ => return None,
    })
}

/// The HCCL type a pure copy (AllGather, Broadcast) of `dt` uses. One-byte codes travel as
/// UINT8: a copy does not look at the values, and HCCL's own FP8 types are 950-only.
fn copy_dtype(dt: DType) -> HcclDataType {
    match dt {
        DType::I64 => sys::HCCL_DATA_TYPE_INT64,
        DType::U8 | DType::F8E4M3 | DType::F8E8M0 | DType::F4E2M1x2 => sys::HCCL_DATA_TYPE_UINT8,
        other => reduce_dtype(other).unwrap_or(sys::HCCL_DATA_TYPE_UINT8),
    }
}

/// The HCCL table, or `Unsupported` naming the missing library.
fn hccl_fns(be: &AscendBackend, what: &str) -> Result<HcclFns> {
    let api = be.runtime().api();
    api.hccl.ok_or_else(|| {
        let dir =
            api.lib_dir.as_ref().map_or_else(|| "the dynamic loader path".to_string(), |d| d.display().to_string());
        Error::Unsupported {
            backend: BACKEND.into(),
            op: what.into(),
            reason: format!("libhccl.so (or libhcomm.so) was not found in {dir}; HCCL collectives need it"),
        }
    })
}

/// A symbol the table resolved, or `Unsupported` naming it.
fn sym<F>(f: Option<F>, name: &str) -> Result<F> {
    f.ok_or_else(|| Error::Unsupported {
        backend: BACKEND.into(),
        op: name.into(),
        reason: format!("the loaded HCCL libraries do not export {name}"),
    })
}

/// `Ok` for `HCCL_SUCCESS`, otherwise the converted error (with this thread's recent message).
fn check(rt: &Runtime, fns: &HcclFns, code: HcclResult, what: &str) -> Result<()> {
    if code == sys::HCCL_SUCCESS {
        return Ok(());
    }
    Err(hccl_error(fns, code, what, &rt.recent_error()))
}

/// The error for status `code` of `what`, with `recent` (the `aclGetRecentErrMsg` text).
fn hccl_error(fns: &HcclFns, code: HcclResult, what: &str, recent: &str) -> Error {
    let text = match fns.HcclGetErrorString {
        Some(f) => {
            // SAFETY: takes a plain integer, returns NULL or a static NUL-terminated string.
            let p = unsafe { f(code) };
            if p.is_null() {
                "no description".to_string()
            } else {
                // SAFETY: non-null, NUL-terminated, static.
                unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
            }
        }
        None => "HcclGetErrorString not exported".to_string(),
    };
    Error::Device {
        backend: BACKEND.into(),
        code: code as i64,
        message: format!("{what}: HCCL error {code} ({text}): {recent}"),
    }
}

/// One rank of an HCCL communicator, bound to the [`AscendBackend`] it was created for.
///
/// `Send` but not `Sync`: collectives are matched across ranks by the order each rank issues
/// them, so issuing on one communicator from two threads at once would make that order (and
/// which tensors meet) a race.
pub struct Communicator {
    fns: HcclFns,
    rt: Arc<Runtime>,
    /// The owning backend's stream: identifies the backend, orders the collectives.
    stream: Arc<Stream>,
    comm: HcclComm,
    rank: u32,
    size: u32,
    name: String,
}

// SAFETY: the handle is an opaque token HCCL accepts from any thread that has bound the
// communicator's device; every call here binds first. Not `Sync` (see the type's docs).
unsafe impl Send for Communicator {}

impl Communicator {
    /// `HcclGetRootInfo` on `be`'s device (rank 0 calls this).
    pub fn root_info(be: &AscendBackend) -> Result<RootInfo> {
        let fns = hccl_fns(be, "hccl root info")?;
        let get = sym(fns.HcclGetRootInfo, "HcclGetRootInfo")?;
        be.runtime().bind(be.device())?;
        let mut info = Box::new(HcclRootInfo { internal: [0; sys::HCCL_ROOT_INFO_BYTES] });
        // SAFETY: a valid out-pointer to a whole `HcclRootInfo`.
        let code = unsafe { get(&mut *info) };
        check(be.runtime(), &fns, code, "HcclGetRootInfo")?;
        Ok(RootInfo(info))
    }

    /// Joins the communicator of `root` as `rank` of `n_ranks` (`HcclCommInitRootInfo`). Blocks
    /// until every rank has joined: call it on all ranks concurrently.
    pub fn init(be: &AscendBackend, n_ranks: u32, root: &RootInfo, rank: u32) -> Result<Communicator> {
        if n_ranks == 0 || rank >= n_ranks {
            return Err(Error::invalid("hccl init", format!("rank {rank} of {n_ranks} ranks is out of range")));
        }
        let fns = hccl_fns(be, "hccl init")?;
        let init = sym(fns.HcclCommInitRootInfo, "HcclCommInitRootInfo")?;
        // The rank's device must be current: HCCL takes it from the calling thread.
        be.runtime().bind(be.device())?;
        let mut comm: HcclComm = ptr::null_mut();
        // SAFETY: a live root info and a valid out-pointer.
        let code = unsafe { init(n_ranks, &*root.0, rank, &mut comm) };
        check(be.runtime(), &fns, code, &format!("HcclCommInitRootInfo(rank {rank} of {n_ranks})"))?;
        let c = Communicator::wrap(be, fns, comm)?;
        if (c.rank, c.size) != (rank, n_ranks) {
            return Err(Error::invalid(
                "hccl init",
                format!("HCCL reports rank {} of {}, {rank} of {n_ranks} was asked for", c.rank, c.size),
            ));
        }
        Ok(c)
    }

    /// Every rank of a one-process communicator at once (`HcclCommInitAll`): rank `i` is
    /// `backends[i]`, which must be on distinct devices of this process's runtime.
    pub fn init_all(backends: &[&AscendBackend]) -> Result<Vec<Communicator>> {
        let Some(first) = backends.first() else {
            return Err(Error::invalid("hccl init_all", "no backends given"));
        };
        let fns = hccl_fns(first, "hccl init_all")?;
        let init = sym(fns.HcclCommInitAll, "HcclCommInitAll")?;
        let devices: Vec<i32> = backends.iter().map(|b| b.device()).collect();
        for (i, b) in backends.iter().enumerate() {
            if let Some(j) = devices[..i].iter().position(|&d| d == b.device()) {
                return Err(Error::invalid(
                    "hccl init_all",
                    format!("backends {j} and {i} are both on device {}", b.device()),
                ));
            }
        }
        let n = devices.len();
        // HcclCommInitAll sets up every device itself and may leave the calling thread on
        // another one; running it on a scratch thread keeps this thread's binding (which the
        // runtime caches) true.
        let raw = std::thread::scope(|s| {
            s.spawn(|| {
                let mut devs = devices.clone();
                let mut comms: Vec<usize> = vec![0; n];
                // SAFETY: `devs` holds `n` device ids and `comms` room for `n` handles.
                let code = unsafe { init(n as u32, devs.as_mut_ptr(), comms.as_mut_ptr().cast::<HcclComm>()) };
                let msg = if code == sys::HCCL_SUCCESS { String::new() } else { first.runtime().recent_error() };
                (code, msg, comms)
            })
            .join()
        });
        let (code, recent, comms) = raw.map_err(|_| Error::invalid("hccl init_all", "HcclCommInitAll panicked"))?;
        if code != sys::HCCL_SUCCESS {
            // The recent-error message was the scratch thread's; it was read there.
            return Err(hccl_error(&fns, code, &format!("HcclCommInitAll(devices {devices:?})"), &recent));
        }
        let mut out = Vec::with_capacity(n);
        for (i, (b, h)) in backends.iter().zip(comms).enumerate() {
            let c = Communicator::wrap(b, fns, h as HcclComm)?;
            if c.rank as usize != i {
                return Err(Error::invalid("hccl init_all", format!("HCCL made backend {i} rank {}", c.rank)));
            }
            out.push(c);
        }
        Ok(out)
    }

    /// Takes ownership of `comm` (destroyed on drop, also if a query below fails).
    fn wrap(be: &AscendBackend, fns: HcclFns, comm: HcclComm) -> Result<Communicator> {
        let mut c = Communicator {
            fns,
            rt: be.runtime().clone(),
            stream: be.stream().clone(),
            comm,
            rank: 0,
            size: 0,
            name: String::new(),
        };
        let (get_rank, get_size, get_name) = (
            sym(fns.HcclGetRankId, "HcclGetRankId")?,
            sym(fns.HcclGetRankSize, "HcclGetRankSize")?,
            sym(fns.HcclGetCommName, "HcclGetCommName")?,
        );
        c.stream.bind()?;
        // SAFETY: a live communicator and valid out-pointers.
        let code = unsafe { get_rank(comm, &mut c.rank) };
        check(&c.rt, &fns, code, "HcclGetRankId")?;
        // SAFETY: as above.
        let code = unsafe { get_size(comm, &mut c.size) };
        check(&c.rt, &fns, code, "HcclGetRankSize")?;
        let mut name = [0 as c_char; COMM_NAME_MAX_LENGTH];
        // SAFETY: the buffer has the documented COMM_NAME_MAX_LENGTH bytes.
        let code = unsafe { get_name(comm, name.as_mut_ptr()) };
        check(&c.rt, &fns, code, "HcclGetCommName")?;
        // Never trust the terminator: stop at the first NUL or at the end of the buffer.
        let bytes: Vec<u8> = name.iter().map(|&b| b as u8).take_while(|&b| b != 0).collect();
        c.name = String::from_utf8_lossy(&bytes).into_owned();
        Ok(c)
    }

    /// This rank's index.
    pub fn rank(&self) -> u32 {
        self.rank
    }
    /// Number of ranks.
    pub fn size(&self) -> u32 {
        self.size
    }
    /// The communicator's name (`HcclGetCommName`), the same on every rank.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The raw handle, for HCCL calls this module does not wrap (it stays owned by `self`).
    pub fn raw(&self) -> HcclComm {
        self.comm
    }

    /// Fails unless `be` is the backend this communicator was created for.
    fn check_backend(&self, be: &AscendBackend, what: &str) -> Result<()> {
        if Arc::ptr_eq(be.stream(), &self.stream) {
            return Ok(());
        }
        Err(Error::invalid(
            what,
            format!(
                "communicator rank {} belongs to another backend instance (device {}); this backend is device {}",
                self.rank,
                self.stream.device(),
                be.device()
            ),
        ))
    }

    /// The device address of `t`, checked to be storage of `be`.
    fn ptr(be: &AscendBackend, t: &Tensor, what: &str) -> Result<DevicePtr> {
        Ok(be.storage(t, || what.to_string())?.device_ptr())
    }

    /// As [`Self::ptr`], for a tensor the collective writes: what the backend derived from its
    /// bytes (load-time weight copies, host copies of indices) is dropped first.
    fn out_ptr(be: &AscendBackend, t: &Tensor, what: &str) -> Result<DevicePtr> {
        let s = be.storage(t, || what.to_string())?;
        s.invalidate();
        Ok(s.device_ptr())
    }

    /// Issues `call` (which gets the stream) under `be`'s issue lock, and converts its status.
    fn issue(&self, be: &AscendBackend, what: &str, call: impl FnOnce(sys::aclrtStream) -> HcclResult) -> Result<()> {
        // The issue lock binds the device and orders this with every other issue on the stream.
        let _st = be.lock_issue()?;
        let code = call(self.stream.raw());
        check(&self.rt, &self.fns, code, what)
    }

    /// `recv = op(send of every rank)`, elementwise. `send` and `recv` have the same shape and
    /// dtype (F32, BF16, F16, I32 or I8).
    pub fn all_reduce(&self, be: &AscendBackend, send: &Tensor, recv: &mut Tensor, op: ReduceOp) -> Result<()> {
        const WHAT: &str = "hccl all_reduce";
        self.check_backend(be, WHAT)?;
        if send.dtype() != recv.dtype() || send.shape() != recv.shape() {
            return Err(Error::invalid(WHAT, format!("recv {recv:?} must have the shape and dtype of send {send:?}")));
        }
        let dt = reduce_dtype(send.dtype()).ok_or_else(|| {
            Error::invalid(WHAT, format!("send {send:?}: HCCL reduces int8, int32, fp16, fp32 and bf16 only"))
        })?;
        let s = Self::ptr(be, send, "hccl all_reduce send")?;
        let r = Self::out_ptr(be, recv, "hccl all_reduce recv")?;
        let f = sym(self.fns.HcclAllReduce, "HcclAllReduce")?;
        let count = send.numel() as u64;
        // SAFETY: device addresses of live tensors of `numel` elements, a live communicator, and
        // this backend's stream; the tensors outlive the collective because the backend's
        // pool reuses their memory only for work issued later on the same stream.
        self.issue(be, &format!("HcclAllReduce({count} × {}, {op:?})", send.dtype()), |st| unsafe {
            f(s.as_raw(), r.as_raw(), count, dt, op.raw(), self.comm, st)
        })
    }

    /// [`Communicator::all_reduce`] with `buf` as both input and output.
    pub fn all_reduce_in_place(&self, be: &AscendBackend, buf: &mut Tensor, op: ReduceOp) -> Result<()> {
        const WHAT: &str = "hccl all_reduce_in_place";
        self.check_backend(be, WHAT)?;
        let dt = reduce_dtype(buf.dtype()).ok_or_else(|| {
            Error::invalid(WHAT, format!("buf {buf:?}: HCCL reduces int8, int32, fp16, fp32 and bf16 only"))
        })?;
        let p = Self::out_ptr(be, buf, "hccl all_reduce_in_place buf")?;
        let f = sym(self.fns.HcclAllReduce, "HcclAllReduce")?;
        let count = buf.numel() as u64;
        // SAFETY: as for `all_reduce`; HCCL accepts sendBuf == recvBuf.
        self.issue(be, &format!("HcclAllReduce(in place, {count} × {}, {op:?})", buf.dtype()), |st| unsafe {
            f(p.as_raw(), p.as_raw(), count, dt, op.raw(), self.comm, st)
        })
    }

    /// `recv = concat(send of rank 0, send of rank 1, ...)`. `recv` has the dtype of `send` and
    /// shape `[size · d0, d1, ...]` or `[size, d0, d1, ...]` for a `send` of `[d0, d1, ...]`.
    pub fn all_gather(&self, be: &AscendBackend, send: &Tensor, recv: &mut Tensor) -> Result<()> {
        const WHAT: &str = "hccl all_gather";
        self.check_backend(be, WHAT)?;
        let n = self.size as usize;
        if send.dtype() != recv.dtype() || !stacked(send.shape(), recv.shape(), n) {
            return Err(Error::invalid(
                WHAT,
                format!("recv {recv:?} must be send {send:?} stacked {n} times (shape [{n}·d0, ...] or [{n}, ...], same dtype)"),
            ));
        }
        let s = Self::ptr(be, send, "hccl all_gather send")?;
        let r = Self::out_ptr(be, recv, "hccl all_gather recv")?;
        let f = sym(self.fns.HcclAllGather, "HcclAllGather")?;
        let count = send.numel() as u64;
        // SAFETY: as for `all_reduce`; `recv` holds `size × count` elements (checked above).
        self.issue(be, &format!("HcclAllGather({count} × {})", send.dtype()), |st| unsafe {
            f(s.as_raw(), r.as_raw(), count, copy_dtype(send.dtype()), self.comm, st)
        })
    }

    /// `recv = op(send of every rank)[rank's block]`: `send` is `size` blocks of `recv`'s shape
    /// (`[size · d0, d1, ...]` or `[size, d0, d1, ...]` for a `recv` of `[d0, d1, ...]`).
    pub fn reduce_scatter(&self, be: &AscendBackend, send: &Tensor, recv: &mut Tensor, op: ReduceOp) -> Result<()> {
        const WHAT: &str = "hccl reduce_scatter";
        self.check_backend(be, WHAT)?;
        let n = self.size as usize;
        if send.dtype() != recv.dtype() || !stacked(recv.shape(), send.shape(), n) {
            return Err(Error::invalid(
                WHAT,
                format!("send {send:?} must be recv {recv:?} stacked {n} times (shape [{n}·d0, ...] or [{n}, ...], same dtype)"),
            ));
        }
        let dt = reduce_dtype(send.dtype()).ok_or_else(|| {
            Error::invalid(WHAT, format!("send {send:?}: HCCL reduces int8, int32, fp16, fp32 and bf16 only"))
        })?;
        let s = Self::ptr(be, send, "hccl reduce_scatter send")?;
        let r = Self::out_ptr(be, recv, "hccl reduce_scatter recv")?;
        let f = sym(self.fns.HcclReduceScatter, "HcclReduceScatter")?;
        let count = recv.numel() as u64;
        // SAFETY: as for `all_reduce`; `send` holds `size × count` elements (checked above).
        self.issue(be, &format!("HcclReduceScatter({count} × {}, {op:?})", recv.dtype()), |st| unsafe {
            f(s.as_raw(), r.as_raw(), count, dt, op.raw(), self.comm, st)
        })
    }

    /// Every rank's `buf` becomes rank `root`'s `buf` (same shape and dtype on every rank).
    pub fn broadcast(&self, be: &AscendBackend, buf: &mut Tensor, root: u32) -> Result<()> {
        const WHAT: &str = "hccl broadcast";
        self.check_backend(be, WHAT)?;
        if root >= self.size {
            return Err(Error::invalid(WHAT, format!("root {root} is out of range for {} ranks", self.size)));
        }
        let p = Self::out_ptr(be, buf, "hccl broadcast buf")?;
        let f = sym(self.fns.HcclBroadcast, "HcclBroadcast")?;
        let count = buf.numel() as u64;
        // SAFETY: as for `all_reduce`.
        self.issue(be, &format!("HcclBroadcast({count} × {}, root {root})", buf.dtype()), |st| unsafe {
            f(p.as_raw(), count, copy_dtype(buf.dtype()), root, self.comm, st)
        })
    }

    /// A barrier on the stream: work issued after it runs once every rank has reached it.
    pub fn barrier(&self, be: &AscendBackend) -> Result<()> {
        self.check_backend(be, "hccl barrier")?;
        let f = sym(self.fns.HcclBarrier, "HcclBarrier")?;
        // SAFETY: a live communicator and this backend's stream.
        self.issue(be, "HcclBarrier", |st| unsafe { f(self.comm, st) })
    }

    /// `Err` with the HCCL code of a collective of this rank that failed while it ran
    /// (`HcclGetCommAsyncError`); such failures reach the backend as 507xxx errors at its
    /// synchronize, and this says which HCCL error it was.
    pub fn async_error(&self) -> Result<()> {
        let f = sym(self.fns.HcclGetCommAsyncError, "HcclGetCommAsyncError")?;
        self.stream.bind()?;
        let mut code: HcclResult = sys::HCCL_SUCCESS;
        // SAFETY: a live communicator and a valid out-pointer.
        let status = unsafe { f(self.comm, &mut code) };
        check(&self.rt, &self.fns, status, "HcclGetCommAsyncError")?;
        check(&self.rt, &self.fns, code, &format!("a collective of rank {} on communicator {}", self.rank, self.name))
    }
}

/// Whether `whole` is `part` stacked `n` times: `[n·d0, d1, ...]` or `[n, d0, d1, ...]`.
fn stacked(part: &[usize], whole: &[usize], n: usize) -> bool {
    let lead = whole.len() == part.len() + 1 && whole[0] == n && whole[1..] == *part;
    let merged = !part.is_empty() && whole.len() == part.len() && whole[0] == n * part[0] && whole[1..] == part[1..];
    let scalar = part.is_empty() && whole == [n];
    lead || merged || scalar
}

impl Drop for Communicator {
    fn drop(&mut self) {
        // Collectives still queued refer to the communicator: let them run (or fail) first.
        // Errors cannot be reported from here; the backend's next synchronize reports them.
        let _ = self.stream.synchronize();
        if let (Some(destroy), Ok(())) = (self.fns.HcclCommDestroy, self.stream.bind()) {
            // SAFETY: a live communicator, destroyed exactly once.
            unsafe { destroy(self.comm) };
        }
    }
}

impl fmt::Debug for Communicator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Communicator({}, rank {} of {}, device {})", self.name, self.rank, self.size, self.stream.device())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacking_rules() {
        assert!(stacked(&[3, 5], &[6, 5], 2));
        assert!(stacked(&[3, 5], &[2, 3, 5], 2));
        assert!(stacked(&[], &[4], 4));
        assert!(!stacked(&[3, 5], &[3, 10], 2));
        assert!(!stacked(&[3, 5], &[6, 5], 3));
    }

    #[test]
    fn root_info_round_trips() {
        let bytes: Vec<u8> = (0..sys::HCCL_ROOT_INFO_BYTES).map(|i| (i * 7) as u8).collect();
        let r = RootInfo::from_bytes(&bytes).unwrap();
        assert_eq!(r.as_bytes(), &bytes[..]);
        assert!(RootInfo::from_bytes(&bytes[1..]).is_err());
    }
}
