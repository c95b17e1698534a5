//! HCCL exports: stubs that answer `HCCL_E_NOT_SUPPORT` (with a message), so the loader finds
//! the symbols and the backend's multi-device paths fail cleanly until collectives are
//! emulated (ranks as threads, spec §8.2 item 6).

#![allow(non_snake_case, clippy::missing_safety_doc)]

use std::ffi::{c_char, c_void};

use crate::codes::HCCL_E_NOT_SUPPORT;

fn unsupported(api: &str) -> u32 {
    crate::set_recent(&format!("{api}: HCCL is not emulated yet (v4rt-cann-emu)"));
    HCCL_E_NOT_SUPPORT
}

#[no_mangle]
pub extern "C" fn HcclGetRootInfo(_root_info: *mut c_void) -> u32 {
    unsupported("HcclGetRootInfo")
}
#[no_mangle]
pub extern "C" fn HcclCommInitRootInfo(_n: u32, _root: *const c_void, _rank: u32, _comm: *mut *mut c_void) -> u32 {
    unsupported("HcclCommInitRootInfo")
}
#[no_mangle]
pub extern "C" fn HcclCommInitAll(_ndev: u32, _devices: *mut i32, _comms: *mut *mut c_void) -> u32 {
    unsupported("HcclCommInitAll")
}
#[no_mangle]
pub extern "C" fn HcclCommDestroy(_comm: *mut c_void) -> u32 {
    unsupported("HcclCommDestroy")
}
#[no_mangle]
pub extern "C" fn HcclGetRankSize(_comm: *mut c_void, _size: *mut u32) -> u32 {
    unsupported("HcclGetRankSize")
}
#[no_mangle]
pub extern "C" fn HcclGetRankId(_comm: *mut c_void, _rank: *mut u32) -> u32 {
    unsupported("HcclGetRankId")
}
#[no_mangle]
pub extern "C" fn HcclGetCommName(_comm: *mut c_void, _name: *mut c_char) -> u32 {
    unsupported("HcclGetCommName")
}
#[no_mangle]
pub extern "C" fn HcclAllReduce(
    _send: *mut c_void,
    _recv: *mut c_void,
    _count: u64,
    _dt: u32,
    _op: u32,
    _comm: *mut c_void,
    _stream: *mut c_void,
) -> u32 {
    unsupported("HcclAllReduce")
}
#[no_mangle]
pub extern "C" fn HcclAllGather(_send: *mut c_void, _recv: *mut c_void, _count: u64, _dt: u32, _comm: *mut c_void, _stream: *mut c_void) -> u32 {
    unsupported("HcclAllGather")
}
#[no_mangle]
pub extern "C" fn HcclBroadcast(_buf: *mut c_void, _count: u64, _dt: u32, _root: u32, _comm: *mut c_void, _stream: *mut c_void) -> u32 {
    unsupported("HcclBroadcast")
}
#[no_mangle]
pub extern "C" fn HcclBarrier(_comm: *mut c_void, _stream: *mut c_void) -> u32 {
    unsupported("HcclBarrier")
}
#[no_mangle]
pub extern "C" fn HcclGetErrorString(code: u32) -> *const c_char {
    let s: &'static [u8] = match code {
        0 => b"success\0",
        1 => b"parameter error\0",
        5 => b"not supported\0",
        _ => b"HCCL error\0",
    };
    s.as_ptr().cast()
}
