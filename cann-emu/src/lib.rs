//! # v4rt-cann-emu — a strict CPU stand-in for CANN
//!
//! Built as a `cdylib` that exports the C symbols of the CANN subset the v4rt Ascend backend
//! binds (ACL runtime, nnopbase objects, the aclnn ops it calls, HCCL stubs). Tests lay it out
//! as a fake toolkit (`$T/lib64/libascendcl.so`, `libnnopbase.so`, `libopapi.so`, ... all the
//! same file) and point `ASCEND_TOOLKIT_HOME` at it, so the backend's production loader loads
//! it like the real thing. Written from the CANN research notes (§8.2), no CANN code.
//!
//! It is deliberately stricter than convenient, so that host-side mistakes show up here
//! instead of on hardware:
//!
//! * **Device memory is not host memory** ([`memory`]): `aclrtMalloc` hands out addresses in
//!   a reserved `PROT_NONE` range, so a host read of device memory is a SIGSEGV. The bytes live
//!   in host buffers looked up by address; fresh allocations are NaN-poisoned (0xFF bytes);
//!   addresses are not reused, so a use after free is caught.
//! * **Streams are queues** ([`state`]): work runs only at synchronize or when an event is
//!   waited on, so a missing synchronize shows stale data. Kernel errors become 507015 at sync
//!   time and stay on the stream.
//! * **aclnn phase 1 validates** ([`ops`]): dtypes, ranks, ND format, contiguity, broadcast
//!   shapes, device addresses, SoC dtype gating, with the real status codes and a message for
//!   `aclGetRecentErrMsg`. **Phase 2 checks** the workspace (size, non-NULL, a live device
//!   allocation), single use of the executor, and that its tensors are still alive.
//! * **Configuration** (read at `aclInit`): `V4RT_EMU_SOC=Ascend910B|Ascend950...` (910B-class
//!   SoCs reject FP8/FP4/HiF8 dtypes), `V4RT_EMU_FAIL_ALLOC=N` / `V4RT_EMU_FAIL_LAUNCH=N` (fail
//!   the Nth `aclrtMalloc` / aclnn launch; `N+` = the Nth and every later one),
//!   `V4RT_EMU_MEM_MB` (reported capacity, default 32768), `V4RT_EMU_DEVICES` (default 1),
//!   `V4RT_EMU_EAGER=1` (run work at enqueue, for debugging), `V4RT_EMU_CANN_VERSION` (what
//!   `aclsysGetVersionStr` reports, default 9.1.0).
//!
//! Kernels are plain generic loops over strided views in f64, rounded to the output dtype:
//! written for clarity, not speed, and independent of the v4rt reference backend.
//!
//! Every exported function catches panics (an unwinding panic must not cross the C ABI) and
//! turns them into `ACL_ERROR_INTERNAL_ERROR`.

pub mod acl;
pub mod dtype;
pub mod fused;
pub mod hccl;
pub mod memory;
pub mod nnop;
pub mod ops;
pub mod state;

use std::cell::{Cell, RefCell};
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, MutexGuard};

pub use state::Emu;

/// Status codes, as documented (§2.5).
pub mod codes {
    pub const SUCCESS: i32 = 0;
    pub const INVALID_PARAM: i32 = 100000;
    pub const UNINITIALIZE: i32 = 100001;
    pub const REPEAT_INITIALIZE: i32 = 100002;
    pub const REPEAT_FINALIZE: i32 = 100037;
    pub const API_NOT_SUPPORT: i32 = 200001;
    pub const INTERNAL_ERROR: i32 = 500000;
    pub const RT_PARAM_INVALID: i32 = 107000;
    pub const RT_INVALID_DEVICEID: i32 = 107001;
    pub const RT_CONTEXT_NULL: i32 = 107002;
    pub const RT_MEMORY_ALLOCATION: i32 = 207001;
    pub const RT_AICORE_EXCEPTION: i32 = 507015;
    pub const ACLNN_PARAM_NULLPTR: i32 = 161001;
    pub const ACLNN_PARAM_INVALID: i32 = 161002;
    pub const HCCL_E_PARA: u32 = 1;
    pub const HCCL_E_NOT_SUPPORT: u32 = 5;
}

/// A failed call: the status to return and the message for `aclGetRecentErrMsg`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fail {
    pub code: i32,
    pub msg: String,
}

impl Fail {
    pub fn new(code: i32, msg: impl Into<String>) -> Fail {
        Fail { code, msg: msg.into() }
    }
}

/// `return Err(Fail::new(code, format!(...)))`.
#[macro_export]
macro_rules! bail {
    ($code:expr, $($arg:tt)*) => {
        return Err($crate::Fail::new($code, format!($($arg)*)))
    };
}

thread_local! {
    /// The message `aclGetRecentErrMsg` returns next.
    static RECENT: RefCell<Option<CString>> = const { RefCell::new(None) };
    /// The string last returned by `aclGetRecentErrMsg` (kept alive until the next call).
    static RETURNED: RefCell<Option<CString>> = const { RefCell::new(None) };
    /// The device this thread bound with `aclrtSetDevice`.
    static DEVICE: Cell<Option<i32>> = const { Cell::new(None) };
}

/// Records `msg` as this thread's most recent error.
pub fn set_recent(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    RECENT.with(|r| *r.borrow_mut() = Some(c));
}

/// Takes this thread's recent error message (NULL when there is none); the pointer stays valid
/// until the next call on this thread.
pub fn take_recent() -> *const c_char {
    let msg = RECENT.with(|r| r.borrow_mut().take());
    RETURNED.with(|slot| {
        let mut slot = slot.borrow_mut();
        *slot = msg;
        slot.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())
    })
}

/// The device bound to the calling thread.
pub fn thread_device() -> Option<i32> {
    DEVICE.with(|d| d.get())
}

/// Binds (or unbinds) the calling thread's device.
pub fn set_thread_device(d: Option<i32>) {
    DEVICE.with(|c| c.set(d));
}

static EMU: Mutex<Option<Emu>> = Mutex::new(None);

/// Locks the global emulator state, creating it on first use.
pub fn lock_emu() -> Result<MutexGuard<'static, Option<Emu>>, Fail> {
    let mut g = EMU.lock().unwrap_or_else(|e| e.into_inner());
    if g.is_none() {
        *g = Some(Emu::new()?);
    }
    Ok(g)
}

/// Runs `f` on the emulator state.
pub fn with_emu<R>(f: impl FnOnce(&mut Emu) -> Result<R, Fail>) -> Result<R, Fail> {
    let mut g = lock_emu()?;
    match g.as_mut() {
        Some(e) => f(e),
        None => Err(Fail::new(codes::INTERNAL_ERROR, "emulator state missing")),
    }
}

fn panic_fail(api: &str) -> Fail {
    Fail::new(codes::INTERNAL_ERROR, format!("{api}: internal emulator panic"))
}

/// Runs an exported function body: success → 0, failure → its code with the message recorded.
pub fn guard(api: &str, f: impl FnOnce() -> Result<(), Fail>) -> i32 {
    let r = catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| Err(panic_fail(api)));
    match r {
        Ok(()) => codes::SUCCESS,
        Err(fail) => {
            set_recent(&format!("{api}: {}", fail.msg));
            fail.code
        }
    }
}

/// Like [`guard`] for functions that return a pointer (NULL on failure).
pub fn guard_ptr<T>(api: &str, f: impl FnOnce() -> Result<*mut T, Fail>) -> *mut T {
    let r = catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| Err(panic_fail(api)));
    r.unwrap_or_else(|fail| {
        set_recent(&format!("{api}: {}", fail.msg));
        std::ptr::null_mut()
    })
}

/// Writes `v` through an out-pointer, failing with `code` on NULL.
///
/// # Safety
/// `p` is NULL or valid for a write of `T`.
pub unsafe fn write_out<T>(p: *mut T, v: T, name: &str, code: i32) -> Result<(), Fail> {
    if p.is_null() {
        bail!(code, "{name} is NULL");
    }
    // SAFETY: non-null, and valid for writes per the caller's contract.
    unsafe { p.write(v) };
    Ok(())
}
