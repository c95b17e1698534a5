//! The ACL runtime layer: process-wide init, per-thread device binding, streams, events,
//! device memory (through a caching pool), pinned host memory, async copies, and the one place
//! where a CANN status becomes a [`hal::Error`].
//!
//! Rules this module enforces (spec §2.2, §8.1):
//! * `aclInit` runs once per process ([`Runtime::global`]); `aclFinalize` only through
//!   [`shutdown`], after which the process cannot use ACL again.
//! * Every host thread binds its device before touching it. [`Runtime::bind`] caches the bound
//!   device per thread, so `aclrtSetDevice` runs only when the thread or the device changes.
//! * Every non-zero status is converted at once, with `aclGetRecentErrMsg()` attached
//!   ([`Runtime::check`]); kernel faults surface at synchronize time as 507xxx codes and are
//!   reported as such by [`Stream::synchronize`].
//! * Device memory is an opaque [`DevicePtr`]: a number on the host, never dereferenced.
//!   Freed buffers go back to a per-stream [`Pool`] and are reused only by work issued later on
//!   the same stream, which is what makes returning a buffer right after a launch safe.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::ffi::{c_void, CStr};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hal::{Error, Result};

use crate::loader::{self, Api, SearchConfig};
use crate::sys::{self, aclError, aclrtEvent, aclrtStream};

/// Name used in every error and storage of this backend.
pub const BACKEND: &str = "ascend";

/// Process-wide ACL state.
enum Slot {
    Empty,
    Live(Arc<Runtime>),
    Finalized,
}

static RUNTIME: Mutex<Slot> = Mutex::new(Slot::Empty);
static NEXT_RUNTIME_ID: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    /// (runtime id, device) this thread last bound with `aclrtSetDevice`.
    static BOUND: Cell<Option<(usize, i32)>> = const { Cell::new(None) };
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the data half-updated in a way
    // that matters more than losing the process, so poisoning is ignored.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Loaded and initialized CANN: the function tables plus process-wide state.
pub struct Runtime {
    api: Api,
    id: usize,
}

impl Runtime {
    /// The process's runtime: loads CANN and runs `aclInit` on first use, then hands out the
    /// same instance. Errors are human-readable reasons (for `Probe::Unavailable`); a failed
    /// attempt is not cached, so a later call can succeed.
    pub fn global(cfg: &SearchConfig) -> std::result::Result<Arc<Runtime>, String> {
        let mut slot = lock(&RUNTIME);
        match &*slot {
            Slot::Live(rt) => return Ok(rt.clone()),
            Slot::Finalized => {
                return Err("ACL was finalized in this process (aclInit may run only once per process)".into())
            }
            Slot::Empty => {}
        }
        let api = loader::load(cfg).map_err(|e| e.to_string())?;
        let rt = Runtime { api, id: NEXT_RUNTIME_ID.fetch_add(1, Ordering::Relaxed) };
        // SAFETY: aclInit accepts NULL for "no config file"; it is called once, under the lock.
        let code = unsafe { (rt.api.acl.aclInit)(ptr::null()) };
        // REPEAT_INITIALIZE: another component of this process initialized ACL already, which
        // is fine for us (we then never finalize it ourselves unless asked to).
        if code != sys::ACL_SUCCESS && code != sys::ACL_ERROR_REPEAT_INITIALIZE {
            return Err(format!("aclInit failed with code {code}: {}", rt.recent_error()));
        }
        if let Some(init) = rt.api.nnop_opt.aclnnInit {
            // SAFETY: as for aclInit.
            let code = unsafe { init(ptr::null()) };
            if code != sys::ACLNN_SUCCESS {
                return Err(format!("aclnnInit failed with code {code}: {}", rt.recent_error()));
            }
        }
        let rt = Arc::new(rt);
        *slot = Slot::Live(rt.clone());
        Ok(rt)
    }

    /// The resolved function tables.
    pub fn api(&self) -> &Api {
        &self.api
    }

    /// `aclGetRecentErrMsg()` of this thread, or a placeholder when there is none.
    pub fn recent_error(&self) -> String {
        // SAFETY: no arguments; the result is NULL or a NUL-terminated string owned by ACL that
        // stays valid until the next ACL call on this thread, and is copied out right here.
        let p = unsafe { (self.api.acl.aclGetRecentErrMsg)() };
        if p.is_null() {
            return "(no error message from aclGetRecentErrMsg)".into();
        }
        // SAFETY: non-null, NUL-terminated (see above).
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().trim().to_string();
        if s.is_empty() {
            "(empty error message from aclGetRecentErrMsg)".into()
        } else {
            s
        }
    }

    /// The error for status `code` returned by `what`.
    pub fn error(&self, code: aclError, what: &str) -> Error {
        Error::Device {
            backend: BACKEND.into(),
            code: code as i64,
            message: format!("{what}: {}", self.recent_error()),
        }
    }

    /// `Ok` for success, otherwise the converted error (see [`Runtime::error`]).
    pub fn check(&self, code: aclError, what: &str) -> Result<()> {
        if code == sys::ACL_SUCCESS {
            Ok(())
        } else {
            Err(self.error(code, what))
        }
    }

    /// Binds `device` to the calling thread (`aclrtSetDevice`), once per thread and device.
    pub fn bind(&self, device: i32) -> Result<()> {
        if BOUND.with(|b| b.get()) == Some((self.id, device)) {
            return Ok(());
        }
        // SAFETY: plain integer argument.
        let code = unsafe { (self.api.acl.aclrtSetDevice)(device) };
        self.check(code, &format!("aclrtSetDevice({device})"))?;
        BOUND.with(|b| b.set(Some((self.id, device))));
        Ok(())
    }

    /// Number of visible devices.
    pub fn device_count(&self) -> Result<u32> {
        let mut n = 0u32;
        // SAFETY: `n` is a valid out-pointer for the duration of the call.
        let code = unsafe { (self.api.acl.aclrtGetDeviceCount)(&mut n) };
        self.check(code, "aclrtGetDeviceCount")?;
        Ok(n)
    }

    /// `aclrtGetSocName()`, e.g. "Ascend910B3" (`None` when ACL does not know).
    pub fn soc_name(&self) -> Option<String> {
        // SAFETY: no arguments; returns NULL or a static NUL-terminated string.
        let p = unsafe { (self.api.acl.aclrtGetSocName)() };
        if p.is_null() {
            return None;
        }
        // SAFETY: non-null and NUL-terminated per the API.
        Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }

    /// The installed CANN version string, when `aclsysGetVersionStr` is exported and answers
    /// for one of the package names tried (`CANN`, `opp`, `runtime`; which names a given CANN
    /// accepts is not verified). `None` otherwise: callers then rely on symbols alone.
    pub fn cann_version(&self) -> Option<String> {
        let f = self.api.acl_opt.aclsysGetVersionStr?;
        for pkg in [c"CANN", c"opp", c"runtime"] {
            let mut buf = [0 as std::ffi::c_char; 128];
            // SAFETY: a NUL-terminated package name and a 128-byte buffer
            // (ACL_PKG_VERSION_MAX_SIZE), both valid for the call.
            let code = unsafe { f(pkg.as_ptr().cast_mut(), buf.as_mut_ptr()) };
            if code == 0 {
                // SAFETY: the buffer is NUL-terminated (zero-filled, and the API writes a C string).
                let v = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().trim().to_string();
                if !v.is_empty() {
                    return Some(v);
                }
            }
        }
        None
    }

    /// `(free, total)` HBM bytes of `device`.
    pub fn mem_info(&self, device: i32) -> Result<(usize, usize)> {
        self.bind(device)?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: valid out-pointers for the duration of the call.
        let code = unsafe { (self.api.acl.aclrtGetMemInfo)(sys::ACL_HBM_MEM, &mut free, &mut total) };
        self.check(code, "aclrtGetMemInfo(ACL_HBM_MEM)")?;
        Ok((free, total))
    }
}

/// Runs `aclFinalize` if this crate initialized ACL and nothing uses it any more.
///
/// Returns `Ok(false)` when there was nothing to finalize. Afterwards every `probe()` in this
/// process answers `Unavailable` (ACL cannot be re-initialized). Fails, finalizing nothing,
/// while backends or buffers still hold the runtime.
pub fn shutdown() -> Result<bool> {
    let mut slot = lock(&RUNTIME);
    let rt = match &*slot {
        Slot::Live(rt) => rt.clone(),
        _ => return Ok(false),
    };
    // Two references: the slot's and `rt` above.
    if Arc::strong_count(&rt) > 2 {
        return Err(Error::invalid("ascend shutdown", "backends or buffers are still alive; drop them first"));
    }
    if let Some(fin) = rt.api.nnop_opt.aclnnFinalize {
        // SAFETY: no arguments; aclnn was initialized by `Runtime::global`.
        let code = unsafe { fin() };
        rt.check(code, "aclnnFinalize")?;
    }
    // SAFETY: no arguments; ACL was initialized by `Runtime::global` and nothing uses it.
    let code = unsafe { (rt.api.acl.aclFinalize)() };
    *slot = Slot::Finalized;
    rt.check(code, "aclFinalize")?;
    Ok(true)
}

/// A device address. To the host it is an opaque number: this type has no way to read or
/// write through it, only to hand it to ACL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DevicePtr(usize);

impl DevicePtr {
    /// The null device address (used for zero-byte buffers, which ACL cannot allocate).
    pub const NULL: DevicePtr = DevicePtr(0);

    /// The address as a number (for diagnostics and address arithmetic only).
    pub fn addr(self) -> usize {
        self.0
    }
    /// This address plus `bytes`.
    pub fn offset(self, bytes: usize) -> DevicePtr {
        DevicePtr(self.0 + bytes)
    }
    /// The address in the form ACL takes it.
    pub fn as_raw(self) -> *mut c_void {
        self.0 as *mut c_void
    }
    /// Whether this is [`DevicePtr::NULL`].
    pub fn is_null(self) -> bool {
        self.0 == 0
    }
}

/// An opaque ACL handle moved between threads.
#[derive(Clone, Copy, Debug)]
struct Handle(*mut c_void);
// SAFETY: ACL stream and event handles are opaque tokens, valid from any thread that has bound
// the owning device; this crate binds before every use.
unsafe impl Send for Handle {}
// SAFETY: as above; the handle itself is never mutated after creation.
unsafe impl Sync for Handle {}

/// An ACL stream of one device. Work on it runs in issue order.
pub struct Stream {
    rt: Arc<Runtime>,
    device: i32,
    raw: Handle,
}

impl Stream {
    /// A new stream on `device`.
    pub fn new(rt: Arc<Runtime>, device: i32) -> Result<Arc<Stream>> {
        rt.bind(device)?;
        let mut raw: aclrtStream = ptr::null_mut();
        // SAFETY: valid out-pointer; the thread is bound to `device` (streams belong to the
        // current context, which is why the bind must come first).
        let code = unsafe { (rt.api.acl.aclrtCreateStream)(&mut raw) };
        rt.check(code, "aclrtCreateStream")?;
        Ok(Arc::new(Stream { rt, device, raw: Handle(raw) }))
    }

    /// The raw handle, for ACL calls.
    pub fn raw(&self) -> aclrtStream {
        self.raw.0
    }
    /// The runtime this stream belongs to.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.rt
    }
    /// The device this stream belongs to.
    pub fn device(&self) -> i32 {
        self.device
    }
    /// Binds the stream's device to the calling thread.
    pub fn bind(&self) -> Result<()> {
        self.rt.bind(self.device)
    }

    /// Waits for everything issued on this stream. A kernel that faulted earlier is reported
    /// here (507xxx codes), with the runtime's message.
    pub fn synchronize(&self) -> Result<()> {
        self.bind()?;
        // SAFETY: the handle is a live stream of the bound device.
        let code = unsafe { (self.rt.api.acl.aclrtSynchronizeStream)(self.raw()) };
        if (507000..508000).contains(&code) {
            return Err(self.rt.error(code, "aclrtSynchronizeStream: a kernel issued earlier faulted on the device"));
        }
        self.rt.check(code, "aclrtSynchronizeStream")
    }

    /// Enqueues a host→device copy of `len` bytes from `src` into `dst` (capacity `dst_cap`).
    ///
    /// # Safety
    /// `src` must point to `len` readable bytes of pinned host memory ([`PinnedBuffer`]) that
    /// stay alive and unmodified until this stream has been synchronized.
    pub unsafe fn copy_h2d_async(&self, dst: DevicePtr, dst_cap: usize, src: *const u8, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: forwarded to the caller (source lifetime); `dst` is a device address.
        let code = unsafe {
            (self.rt.api.acl.aclrtMemcpyAsync)(
                dst.as_raw(),
                dst_cap,
                src.cast(),
                len,
                sys::ACL_MEMCPY_HOST_TO_DEVICE,
                self.raw(),
            )
        };
        self.rt.check(code, "aclrtMemcpyAsync(host to device)")
    }

    /// Enqueues a device→host copy of `len` bytes from `src` into `dst`.
    ///
    /// # Safety
    /// `dst` must point to `len` writable bytes of pinned host memory that stay alive, and are
    /// neither read nor written by the host, until this stream has been synchronized.
    pub unsafe fn copy_d2h_async(&self, dst: *mut u8, dst_cap: usize, src: DevicePtr, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: forwarded to the caller (destination lifetime and exclusivity).
        let code = unsafe {
            (self.rt.api.acl.aclrtMemcpyAsync)(
                dst.cast(),
                dst_cap,
                src.as_raw(),
                len,
                sys::ACL_MEMCPY_DEVICE_TO_HOST,
                self.raw(),
            )
        };
        self.rt.check(code, "aclrtMemcpyAsync(device to host)")
    }

    /// Enqueues a fill of `len` bytes at `dst` (capacity `dst_cap`) with `value`.
    pub fn memset_async(&self, dst: DevicePtr, dst_cap: usize, value: u8, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: device address and sizes only; ACL validates the range.
        let code = unsafe { (self.rt.api.acl.aclrtMemsetAsync)(dst.as_raw(), dst_cap, value as i32, len, self.raw()) };
        self.rt.check(code, "aclrtMemsetAsync")
    }

    /// Records `event` at the current end of this stream.
    pub fn record(&self, event: &Event) -> Result<()> {
        self.bind()?;
        // SAFETY: both handles are live objects of this runtime.
        let code = unsafe { (self.rt.api.acl.aclrtRecordEvent)(event.raw.0, self.raw()) };
        self.rt.check(code, "aclrtRecordEvent")
    }

    /// Makes later work on this stream wait for `event`'s last record.
    pub fn wait(&self, event: &Event) -> Result<()> {
        self.bind()?;
        // SAFETY: both handles are live objects of this runtime.
        let code = unsafe { (self.rt.api.acl.aclrtStreamWaitEvent)(self.raw(), event.raw.0) };
        self.rt.check(code, "aclrtStreamWaitEvent")
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // Errors cannot be reported from a destructor; the stream is drained so nothing still
        // queued refers to memory its owners are about to free.
        if self.bind().is_ok() {
            // SAFETY: live stream of the bound device, destroyed exactly once.
            unsafe {
                (self.rt.api.acl.aclrtSynchronizeStream)(self.raw());
                (self.rt.api.acl.aclrtDestroyStream)(self.raw());
            }
        }
    }
}

/// An ACL event (cross-stream ordering and host waits).
pub struct Event {
    rt: Arc<Runtime>,
    device: i32,
    raw: Handle,
}

impl Event {
    /// A new event on `device` with `flags` (e.g. [`sys::ACL_EVENT_SYNC`]).
    pub fn new(rt: Arc<Runtime>, device: i32, flags: u32) -> Result<Event> {
        rt.bind(device)?;
        let mut raw: aclrtEvent = ptr::null_mut();
        // SAFETY: valid out-pointer; the thread is bound.
        let code = unsafe { (rt.api.acl.aclrtCreateEventWithFlag)(&mut raw, flags) };
        rt.check(code, "aclrtCreateEventWithFlag")?;
        Ok(Event { rt, device, raw: Handle(raw) })
    }

    /// Blocks the host until the event's last record has been reached.
    pub fn synchronize(&self) -> Result<()> {
        self.rt.bind(self.device)?;
        // SAFETY: live event handle.
        let code = unsafe { (self.rt.api.acl.aclrtSynchronizeEvent)(self.raw.0) };
        self.rt.check(code, "aclrtSynchronizeEvent")
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        if self.rt.bind(self.device).is_ok() {
            // SAFETY: live event, destroyed exactly once.
            unsafe { (self.rt.api.acl.aclrtDestroyEvent)(self.raw.0) };
        }
    }
}

/// Allocation granule of the pool: sizes are rounded up to this, so nearby sizes share blocks.
const GRANULE: usize = 512;
/// Above this, sizes are rounded to [`LARGE_GRANULE`] instead.
const LARGE: usize = 1 << 20;
const LARGE_GRANULE: usize = 1 << 20;

/// Free blocks of one stream's device memory, by capacity.
struct PoolState {
    free: BTreeMap<usize, Vec<DevicePtr>>,
    cached_bytes: usize,
}

/// A caching allocator of device memory for one stream.
///
/// Dropped buffers return here without a synchronize: the next user of a block is issued
/// later on the same stream, so it runs after every earlier reader (the ggml-cann argument,
/// spec §3.2). Allocation failures first drain the stream and release the cache, then retry
/// once, then report [`Error::OutOfMemory`].
pub struct Pool {
    stream: Arc<Stream>,
    state: Mutex<PoolState>,
}

impl Pool {
    /// An empty pool feeding work on `stream`.
    pub fn new(stream: Arc<Stream>) -> Arc<Pool> {
        Arc::new(Pool { stream, state: Mutex::new(PoolState { free: BTreeMap::new(), cached_bytes: 0 }) })
    }

    /// The stream whose order makes reuse safe.
    pub fn stream(&self) -> &Arc<Stream> {
        &self.stream
    }

    fn class(len: usize) -> usize {
        if len <= LARGE {
            len.div_ceil(GRANULE) * GRANULE
        } else {
            len.div_ceil(LARGE_GRANULE) * LARGE_GRANULE
        }
    }

    /// A buffer of at least `len` bytes; contents unspecified.
    pub fn alloc(self: &Arc<Self>, len: usize) -> Result<DeviceBuffer> {
        if len == 0 {
            return Ok(DeviceBuffer { ptr: DevicePtr::NULL, len: 0, cap: 0, pool: self.clone() });
        }
        let cap = Self::class(len);
        {
            let mut st = lock(&self.state);
            // Smallest cached block that fits without wasting more than half of it.
            let hit = st.free.range(cap..=cap.saturating_mul(2)).find(|(_, v)| !v.is_empty()).map(|(&c, _)| c);
            if let Some(c) = hit {
                let ptr = st.free.get_mut(&c).and_then(|v| v.pop()).unwrap_or(DevicePtr::NULL);
                if !ptr.is_null() {
                    st.cached_bytes -= c;
                    return Ok(DeviceBuffer { ptr, len, cap: c, pool: self.clone() });
                }
            }
        }
        let rt = self.stream.runtime();
        match self.malloc(cap) {
            Ok(ptr) => Ok(DeviceBuffer { ptr, len, cap, pool: self.clone() }),
            Err(code) if sys::OOM_CODES.contains(&code) => {
                if lock(&self.state).cached_bytes > 0 {
                    self.trim()?;
                    if let Ok(ptr) = self.malloc(cap) {
                        return Ok(DeviceBuffer { ptr, len, cap, pool: self.clone() });
                    }
                }
                // Keep the runtime's text from being reported against a later call.
                let _ = rt.recent_error();
                Err(Error::OutOfMemory { backend: BACKEND.into(), bytes: len })
            }
            Err(code) => Err(rt.error(code, &format!("aclrtMalloc({cap} bytes)"))),
        }
    }

    fn malloc(&self, cap: usize) -> std::result::Result<DevicePtr, aclError> {
        let rt = self.stream.runtime();
        self.stream.bind().map_err(|_| sys::ACL_ERROR_RT_CONTEXT_NULL)?;
        let mut p: *mut c_void = ptr::null_mut();
        // SAFETY: valid out-pointer; the thread is bound to the pool's device.
        let code = unsafe { (rt.api.acl.aclrtMalloc)(&mut p, cap, sys::ACL_MEM_MALLOC_HUGE_FIRST) };
        if code != sys::ACL_SUCCESS {
            return Err(code);
        }
        if p.is_null() {
            return Err(sys::ACL_ERROR_BAD_ALLOC);
        }
        Ok(DevicePtr(p as usize))
    }

    /// Drains the stream and frees every cached block.
    pub fn trim(&self) -> Result<()> {
        self.stream.synchronize()?;
        self.free_cached()
    }

    /// Frees every cached block (the caller has drained the stream, or it faulted: a faulted
    /// stream runs nothing more).
    fn free_cached(&self) -> Result<()> {
        let blocks: Vec<DevicePtr> = {
            let mut st = lock(&self.state);
            st.cached_bytes = 0;
            std::mem::take(&mut st.free).into_values().flatten().collect()
        };
        let rt = self.stream.runtime();
        self.stream.bind()?;
        let mut first_err = Ok(());
        for p in blocks {
            // SAFETY: `p` came from aclrtMalloc and is no longer referenced (the stream was
            // drained and the block was in the free list).
            let code = unsafe { (rt.api.acl.aclrtFree)(p.as_raw()) };
            if first_err.is_ok() {
                first_err = rt.check(code, "aclrtFree");
            }
        }
        first_err
    }

    /// Bytes held in the cache (free, not yet returned to ACL).
    pub fn cached_bytes(&self) -> usize {
        lock(&self.state).cached_bytes
    }

    fn release(&self, ptr: DevicePtr, cap: usize) {
        let mut st = lock(&self.state);
        st.free.entry(cap).or_default().push(ptr);
        st.cached_bytes += cap;
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Free the cache even when the stream reports an old fault: nothing runs on it any more.
        let _ = self.stream.synchronize();
        let _ = self.free_cached();
    }
}

/// Device memory from a [`Pool`]; returned to it on drop.
pub struct DeviceBuffer {
    ptr: DevicePtr,
    len: usize,
    cap: usize,
    pool: Arc<Pool>,
}

impl DeviceBuffer {
    /// The device address (NULL for a zero-byte buffer).
    pub fn ptr(&self) -> DevicePtr {
        self.ptr
    }
    /// Requested size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the buffer holds zero bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Allocated size in bytes (≥ `len`).
    pub fn capacity(&self) -> usize {
        self.cap
    }
    /// The pool this buffer returns to.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            self.pool.release(self.ptr, self.cap);
        }
    }
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({:#x}, {} bytes)", self.ptr.addr(), self.len)
    }
}

/// Page-locked host memory from `aclrtMallocHost`: the only memory async copies may use.
pub struct PinnedBuffer {
    ptr: NonNull<u8>,
    cap: usize,
    rt: Arc<Runtime>,
}

// SAFETY: the buffer is plain host memory owned exclusively by this value.
unsafe impl Send for PinnedBuffer {}
// SAFETY: shared access only reads (`as_slice`); writes need `&mut`.
unsafe impl Sync for PinnedBuffer {}

impl PinnedBuffer {
    /// `cap` bytes of pinned host memory (zero bytes allocate nothing).
    pub fn new(rt: Arc<Runtime>, cap: usize) -> Result<PinnedBuffer> {
        if cap == 0 {
            return Ok(PinnedBuffer { ptr: NonNull::dangling(), cap: 0, rt });
        }
        let mut p: *mut c_void = ptr::null_mut();
        // SAFETY: valid out-pointer.
        let code = unsafe { (rt.api.acl.aclrtMallocHost)(&mut p, cap) };
        if sys::OOM_CODES.contains(&code) {
            let _ = rt.recent_error();
            return Err(Error::OutOfMemory { backend: BACKEND.into(), bytes: cap });
        }
        rt.check(code, &format!("aclrtMallocHost({cap} bytes)"))?;
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| rt.error(sys::ACL_ERROR_BAD_ALLOC, "aclrtMallocHost returned NULL"))?;
        Ok(PinnedBuffer { ptr, cap, rt })
    }

    /// Size in bytes.
    pub fn capacity(&self) -> usize {
        self.cap
    }
    /// Start of the buffer (for async copies).
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
    /// Start of the buffer, writable (for async copies into it).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    /// The bytes. Meaningful only once copies into the buffer have completed.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `cap` bytes (or dangling with cap 0) for our lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.cap) }
    }
    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) }
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        if self.cap > 0 {
            // SAFETY: allocated by aclrtMallocHost, freed once. Owners keep pending buffers
            // alive until their stream is synchronized.
            unsafe { (self.rt.api.acl.aclrtFreeHost)(self.ptr.as_ptr().cast()) };
        }
    }
}
