//! `libascendcl` exports: init, devices, streams, events, memory, copies.
//!
//! Rules beyond the documented ones, chosen for strictness:
//! * Device work needs a device bound to the calling thread (`aclrtSetDevice`), else 107002.
//! * Async copies need pinned host memory (`aclrtMallocHost`) on the host side, else 107000:
//!   a pageable buffer may be gone by the time a deferred copy runs.
//! * Synchronous `aclrtMemcpy` runs at once and does not wait for queued stream work (so
//!   reading results with it, without a synchronize, shows stale data).
//! * The synchronize calls take the emulator lock per step, not for the whole drain: a queued
//!   HCCL collective waits there for other ranks' threads ([`crate::state::sync_stream`]).

#![allow(non_snake_case, clippy::missing_safety_doc)]

use std::ffi::{c_char, c_void};

use crate::state::{sync_stream, Event, Task};
use crate::{bail, codes, guard, set_thread_device, with_emu, write_out, Emu, Fail};

const HOST_TO_HOST: u32 = 0;
const HOST_TO_DEVICE: u32 = 1;
const DEVICE_TO_HOST: u32 = 2;
const DEVICE_TO_DEVICE: u32 = 3;
const DEFAULT: u32 = 4;

#[no_mangle]
pub extern "C" fn aclInit(_config_path: *const c_char) -> i32 {
    guard("aclInit", || {
        with_emu(|e| {
            if e.initialized {
                bail!(codes::REPEAT_INITIALIZE, "ACL is already initialized in this process");
            }
            e.config = crate::state::Config::from_env();
            e.mem.capacity = e.config.capacity;
            e.initialized = true;
            Ok(())
        })
    })
}

#[no_mangle]
pub extern "C" fn aclFinalize() -> i32 {
    guard("aclFinalize", || {
        with_emu(|e| {
            if !e.initialized {
                bail!(codes::REPEAT_FINALIZE, "ACL is not initialized (finalized twice?)");
            }
            e.initialized = false;
            Ok(())
        })
    })
}

#[no_mangle]
pub extern "C" fn aclGetRecentErrMsg() -> *const c_char {
    crate::take_recent()
}

#[no_mangle]
pub unsafe extern "C" fn aclrtGetDeviceCount(count: *mut u32) -> i32 {
    guard("aclrtGetDeviceCount", || {
        let n = with_emu(|e| {
            e.need_init()?;
            Ok(e.config.devices)
        })?;
        // SAFETY: caller's out-pointer (checked for NULL).
        unsafe { write_out(count, n, "count", codes::INVALID_PARAM) }
    })
}

#[no_mangle]
pub extern "C" fn aclrtSetDevice(device_id: i32) -> i32 {
    guard("aclrtSetDevice", || {
        with_emu(|e| {
            e.need_init()?;
            if device_id < 0 || device_id as u32 >= e.config.devices {
                bail!(codes::RT_INVALID_DEVICEID, "device {device_id} does not exist ({} visible)", e.config.devices);
            }
            set_thread_device(Some(device_id));
            Ok(())
        })
    })
}

#[no_mangle]
pub extern "C" fn aclrtResetDevice(device_id: i32) -> i32 {
    guard("aclrtResetDevice", || {
        with_emu(|e| {
            e.need_init()?;
            if device_id < 0 || device_id as u32 >= e.config.devices {
                bail!(codes::RT_INVALID_DEVICEID, "device {device_id} does not exist");
            }
            Ok(())
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclrtGetDevice(device_id: *mut i32) -> i32 {
    guard("aclrtGetDevice", || {
        let d = with_emu(|e| e.need_device())?;
        // SAFETY: caller's out-pointer (checked for NULL).
        unsafe { write_out(device_id, d, "deviceId", codes::INVALID_PARAM) }
    })
}

#[no_mangle]
pub extern "C" fn aclrtGetSocName() -> *const c_char {
    std::panic::catch_unwind(|| with_emu(|e| Ok(e.config.soc.as_ptr())).unwrap_or(std::ptr::null()))
        .unwrap_or(std::ptr::null())
}

/// Package names `aclsysGetVersionStr` answers for (the CANN packages whose versions the docs
/// list; every one reports the configured version).
const VERSION_PACKAGES: &[&str] = &["CANN", "runtime", "opp", "toolkit", "compiler", "hccl"];
/// `ACL_PKG_VERSION_MAX_SIZE`: the caller's buffer for the version string.
const PKG_VERSION_MAX: usize = 128;

#[no_mangle]
pub unsafe extern "C" fn aclsysGetVersionStr(pkg_name: *mut c_char, version: *mut c_char) -> i32 {
    guard("aclsysGetVersionStr", || {
        if pkg_name.is_null() || version.is_null() {
            bail!(codes::INVALID_PARAM, "pkgName and versionStr must not be NULL");
        }
        // SAFETY: non-NULL, NUL-terminated per the API.
        let pkg = unsafe { std::ffi::CStr::from_ptr(pkg_name) }.to_string_lossy().into_owned();
        if !VERSION_PACKAGES.contains(&pkg.as_str()) {
            bail!(codes::INVALID_PARAM, "unknown package {pkg:?} (known: {VERSION_PACKAGES:?})");
        }
        let v = with_emu(|e| Ok(e.config.cann_version.clone()))?;
        let bytes = v.as_bytes();
        let n = bytes.len().min(PKG_VERSION_MAX - 1);
        // SAFETY: the caller provides ACL_PKG_VERSION_MAX_SIZE bytes; we write at most that many.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), version.cast::<u8>(), n);
            *version.add(n) = 0;
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclrtGetMemInfo(attr: u32, free: *mut usize, total: *mut usize) -> i32 {
    guard("aclrtGetMemInfo", || {
        let (f, t) = with_emu(|e| {
            e.need_device()?;
            if attr > 5 {
                bail!(codes::INVALID_PARAM, "unknown aclrtMemAttr {attr}");
            }
            Ok((e.mem.capacity.saturating_sub(e.mem.used()), e.mem.capacity))
        })?;
        // SAFETY: caller's out-pointers (checked for NULL).
        unsafe {
            write_out(free, f, "free", codes::INVALID_PARAM)?;
            write_out(total, t, "total", codes::INVALID_PARAM)
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclrtCreateStream(stream: *mut *mut c_void) -> i32 {
    guard("aclrtCreateStream", || {
        if stream.is_null() {
            bail!(codes::INVALID_PARAM, "stream is NULL");
        }
        let h = with_emu(|e| {
            let dev = e.need_device()?;
            Ok(e.new_stream(dev))
        })?;
        // SAFETY: non-null out-pointer from the caller.
        unsafe { stream.write(h as *mut c_void) };
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn aclrtDestroyStream(stream: *mut c_void) -> i32 {
    guard("aclrtDestroyStream", || {
        with_emu(|e| {
            if stream.is_null() {
                bail!(codes::INVALID_PARAM, "the default stream cannot be destroyed");
            }
            e.stream_id(stream as usize)
        })
        .and_then(|id| {
            // Queued work still runs (its faults are lost with the stream).
            let _ = sync_stream(id, None);
            with_emu(|e| {
                e.streams.remove(&id);
                Ok(())
            })
        })
    })
}

#[no_mangle]
pub extern "C" fn aclrtSynchronizeStream(stream: *mut c_void) -> i32 {
    guard("aclrtSynchronizeStream", || {
        let id = with_emu(|e| e.stream_id(stream as usize))?;
        sync_stream(id, None)
    })
}

#[no_mangle]
pub extern "C" fn aclrtSynchronizeDevice() -> i32 {
    guard("aclrtSynchronizeDevice", || {
        let ids = with_emu(|e| {
            let dev = e.need_device()?;
            Ok(e.streams.iter().filter(|(_, s)| s.device == dev).map(|(&k, _)| k).collect::<Vec<usize>>())
        })?;
        ids.into_iter().try_for_each(|id| sync_stream(id, None))
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclrtMalloc(dev_ptr: *mut *mut c_void, size: usize, policy: u32) -> i32 {
    guard("aclrtMalloc", || {
        if dev_ptr.is_null() {
            bail!(codes::INVALID_PARAM, "devPtr is NULL");
        }
        let addr = with_emu(|e| {
            let dev = e.need_device()?;
            if size == 0 {
                bail!(codes::INVALID_PARAM, "size must be > 0");
            }
            if policy & 0xFF > 7 {
                bail!(codes::INVALID_PARAM, "unknown aclrtMemMallocPolicy {policy:#x}");
            }
            e.malloc_count += 1;
            if e.config.fail_alloc.is_some_and(|t| t.fires(e.malloc_count)) {
                bail!(
                    codes::RT_MEMORY_ALLOCATION,
                    "injected allocation failure (V4RT_EMU_FAIL_ALLOC, call {}) for {size} bytes",
                    e.malloc_count
                );
            }
            e.mem.malloc(size, dev).ok_or_else(|| {
                Fail::new(
                    codes::RT_MEMORY_ALLOCATION,
                    format!(
                        "out of device memory: {size} bytes requested, {} of {} in use",
                        e.mem.used(),
                        e.mem.capacity
                    ),
                )
            })
        })?;
        // SAFETY: non-null out-pointer from the caller.
        unsafe { dev_ptr.write(addr as *mut c_void) };
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn aclrtFree(dev_ptr: *mut c_void) -> i32 {
    guard("aclrtFree", || {
        with_emu(|e| {
            e.need_device()?;
            e.mem.free(dev_ptr as usize).map_err(|m| Fail::new(codes::INVALID_PARAM, m))
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclrtMallocHost(host_ptr: *mut *mut c_void, size: usize) -> i32 {
    guard("aclrtMallocHost", || {
        if host_ptr.is_null() || size == 0 {
            bail!(codes::INVALID_PARAM, "hostPtr is NULL or size is 0");
        }
        let p = with_emu(|e| {
            e.need_init()?;
            e.mem.malloc_host(size).ok_or_else(|| Fail::new(codes::RT_MEMORY_ALLOCATION, "host allocation failed"))
        })?;
        // SAFETY: non-null out-pointer from the caller.
        unsafe { host_ptr.write(p as *mut c_void) };
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn aclrtFreeHost(host_ptr: *mut c_void) -> i32 {
    guard("aclrtFreeHost", || {
        with_emu(|e| {
            e.need_init()?;
            e.mem.free_host(host_ptr as usize).map_err(|m| Fail::new(codes::INVALID_PARAM, m))
        })
    })
}

/// Resolves `ACL_MEMCPY_DEFAULT` from the addresses and checks the kind against them.
fn copy_kind(e: &Emu, dst: usize, src: usize, kind: u32) -> Result<u32, Fail> {
    let (dd, sd) = (e.mem.is_device_addr(dst), e.mem.is_device_addr(src));
    let inferred = match (sd, dd) {
        (false, false) => HOST_TO_HOST,
        (false, true) => HOST_TO_DEVICE,
        (true, false) => DEVICE_TO_HOST,
        (true, true) => DEVICE_TO_DEVICE,
    };
    match kind {
        DEFAULT => Ok(inferred),
        HOST_TO_HOST | HOST_TO_DEVICE | DEVICE_TO_HOST | DEVICE_TO_DEVICE if kind == inferred => Ok(kind),
        HOST_TO_HOST | HOST_TO_DEVICE | DEVICE_TO_HOST | DEVICE_TO_DEVICE => {
            bail!(
                codes::RT_PARAM_INVALID,
                "memcpy kind {kind} does not match the addresses (source {}, destination {})",
                if sd { "device" } else { "host" },
                if dd { "device" } else { "host" }
            )
        }
        _ => bail!(codes::RT_PARAM_INVALID, "unknown aclrtMemcpyKind {kind}"),
    }
}

/// Validates the device side(s) of a copy now (they are re-checked when it runs).
fn check_device_side(e: &Emu, addr: usize, len: usize, what: &str) -> Result<(), Fail> {
    e.mem.find(addr, len).map(|_| ()).map_err(|m| Fail::new(codes::RT_PARAM_INVALID, format!("{what}: {m}")))
}

#[no_mangle]
pub unsafe extern "C" fn aclrtMemcpy(
    dst: *mut c_void,
    dest_max: usize,
    src: *const c_void,
    count: usize,
    kind: u32,
) -> i32 {
    guard("aclrtMemcpy", || {
        with_emu(|e| {
            e.need_device()?;
            if count > dest_max {
                bail!(codes::RT_PARAM_INVALID, "count {count} exceeds destMax {dest_max}");
            }
            if count == 0 {
                return Ok(());
            }
            if dst.is_null() || src.is_null() {
                bail!(codes::INVALID_PARAM, "dst or src is NULL");
            }
            let (d, s) = (dst as usize, src as usize);
            match copy_kind(e, d, s, kind)? {
                HOST_TO_DEVICE => {
                    check_device_side(e, d, count, "destination")?;
                    // SAFETY: the caller guarantees `src` is `count` readable host bytes (as
                    // for the real synchronous copy).
                    let host = unsafe { std::slice::from_raw_parts(src.cast::<u8>(), count) };
                    let dev = e.mem.bytes_mut(d, count).map_err(|m| Fail::new(codes::RT_PARAM_INVALID, m))?;
                    dev.copy_from_slice(host);
                }
                DEVICE_TO_HOST => {
                    let dev = e.mem.bytes(s, count).map_err(|m| Fail::new(codes::RT_PARAM_INVALID, m))?;
                    // SAFETY: the caller guarantees `dst` is `count` writable host bytes.
                    unsafe { std::ptr::copy_nonoverlapping(dev.as_ptr(), dst.cast::<u8>(), count) };
                }
                DEVICE_TO_DEVICE => {
                    let tmp = e.mem.bytes(s, count).map_err(|m| Fail::new(codes::RT_PARAM_INVALID, m))?.to_vec();
                    e.mem.bytes_mut(d, count).map_err(|m| Fail::new(codes::RT_PARAM_INVALID, m))?.copy_from_slice(&tmp);
                }
                _ => {
                    // SAFETY: host to host; the caller guarantees both ranges.
                    unsafe { std::ptr::copy(src.cast::<u8>(), dst.cast::<u8>(), count) };
                }
            }
            Ok(())
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclrtMemcpyAsync(
    dst: *mut c_void,
    dest_max: usize,
    src: *const c_void,
    count: usize,
    kind: u32,
    stream: *mut c_void,
) -> i32 {
    guard("aclrtMemcpyAsync", || {
        with_emu(|e| {
            let sid = e.stream_id(stream as usize)?;
            if count > dest_max {
                bail!(codes::RT_PARAM_INVALID, "count {count} exceeds destMax {dest_max}");
            }
            if count == 0 {
                return Ok(());
            }
            if dst.is_null() || src.is_null() {
                bail!(codes::INVALID_PARAM, "dst or src is NULL");
            }
            let (d, s) = (dst as usize, src as usize);
            let kind = copy_kind(e, d, s, kind)?;
            let pinned = |addr: usize, what: &str| -> Result<(), Fail> {
                if !e.mem.is_pinned(addr, count) {
                    bail!(codes::RT_PARAM_INVALID,
                        "{what} {addr:#x} ({count} bytes) is not memory from aclrtMallocHost; async copies need pinned host memory");
                }
                Ok(())
            };
            let run: crate::state::Work = match kind {
                HOST_TO_DEVICE => {
                    pinned(s, "source")?;
                    check_device_side(e, d, count, "destination")?;
                    Box::new(move |m| m.h2d(d, s, count))
                }
                DEVICE_TO_HOST => {
                    pinned(d, "destination")?;
                    check_device_side(e, s, count, "source")?;
                    Box::new(move |m| m.d2h(d, s, count))
                }
                DEVICE_TO_DEVICE => {
                    check_device_side(e, s, count, "source")?;
                    check_device_side(e, d, count, "destination")?;
                    Box::new(move |m| {
                        let tmp = m.bytes(s, count)?.to_vec();
                        m.bytes_mut(d, count)?.copy_from_slice(&tmp);
                        Ok(())
                    })
                }
                _ => bail!(codes::RT_PARAM_INVALID, "host-to-host copies are not stream work"),
            };
            e.enqueue_work(sid, "aclrtMemcpyAsync", run)?;
            Ok(())
        })
    })
}

#[no_mangle]
pub extern "C" fn aclrtMemsetAsync(
    dev_ptr: *mut c_void,
    max_count: usize,
    value: i32,
    count: usize,
    stream: *mut c_void,
) -> i32 {
    guard("aclrtMemsetAsync", || {
        with_emu(|e| {
            let sid = e.stream_id(stream as usize)?;
            if count > max_count {
                bail!(codes::RT_PARAM_INVALID, "count {count} exceeds maxCount {max_count}");
            }
            if count == 0 {
                return Ok(());
            }
            let d = dev_ptr as usize;
            check_device_side(e, d, count, "devPtr")?;
            e.enqueue_work(
                sid,
                "aclrtMemsetAsync",
                Box::new(move |m| {
                    m.bytes_mut(d, count)?.fill(value as u8);
                    Ok(())
                }),
            )?;
            Ok(())
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclrtCreateEventWithFlag(event: *mut *mut c_void, flag: u32) -> i32 {
    guard("aclrtCreateEventWithFlag", || {
        if event.is_null() {
            bail!(codes::INVALID_PARAM, "event is NULL");
        }
        if flag & !0x7F != 0 {
            bail!(codes::INVALID_PARAM, "unknown event flags {flag:#x}");
        }
        let h = with_emu(|e| {
            let device = e.need_device()?;
            let h = e.handle();
            e.events.insert(h, Event { device, last: None });
            Ok(h)
        })?;
        // SAFETY: non-null out-pointer from the caller.
        unsafe { event.write(h as *mut c_void) };
        Ok(())
    })
}

fn event_mut(e: &mut Emu, ev: *mut c_void) -> Result<&mut Event, Fail> {
    e.events
        .get_mut(&(ev as usize))
        .ok_or_else(|| Fail::new(codes::RT_PARAM_INVALID, format!("{ev:?} is not a live event")))
}

#[no_mangle]
pub extern "C" fn aclrtRecordEvent(event: *mut c_void, stream: *mut c_void) -> i32 {
    guard("aclrtRecordEvent", || {
        with_emu(|e| {
            let sid = e.stream_id(stream as usize)?;
            event_mut(e, event)?;
            let seq = e.enqueue(sid, Task::Marker)?;
            event_mut(e, event)?.last = Some((sid, seq));
            Ok(())
        })
    })
}

#[no_mangle]
pub extern "C" fn aclrtStreamWaitEvent(stream: *mut c_void, event: *mut c_void) -> i32 {
    guard("aclrtStreamWaitEvent", || {
        with_emu(|e| {
            let sid = e.stream_id(stream as usize)?;
            if let Some((other, seq)) = event_mut(e, event)?.last {
                e.enqueue(sid, Task::Wait { stream: other, seq })?;
            }
            Ok(())
        })
    })
}

#[no_mangle]
pub extern "C" fn aclrtSynchronizeEvent(event: *mut c_void) -> i32 {
    guard("aclrtSynchronizeEvent", || {
        let last = with_emu(|e| {
            e.need_device()?;
            Ok(event_mut(e, event)?.last)
        })?;
        match last {
            Some((sid, seq)) => sync_stream(sid, Some(seq)),
            None => Ok(()),
        }
    })
}

#[no_mangle]
pub extern "C" fn aclrtDestroyEvent(event: *mut c_void) -> i32 {
    guard("aclrtDestroyEvent", || {
        with_emu(|e| {
            e.need_init()?;
            e.events
                .remove(&(event as usize))
                .map(|_| ())
                .ok_or_else(|| Fail::new(codes::RT_PARAM_INVALID, "not a live event"))
        })
    })
}
