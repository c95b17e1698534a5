//! The emulator's C entry points called directly (in-process, through the rlib): deferred
//! streams, sticky faults, phase-1 validation codes, and executor single use.

use std::ffi::{c_void, CStr};
use std::ptr;

use v4rt_cann_emu::{acl, codes, nnop, ops};

fn recent() -> String {
    let p = acl::aclGetRecentErrMsg();
    if p.is_null() {
        return String::new();
    }
    // SAFETY: the emulator returns a NUL-terminated string valid until the next call.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn init() {
    let _ = acl::aclInit(ptr::null());
    assert_eq!(acl::aclrtSetDevice(0), 0);
}

unsafe fn malloc(n: usize) -> *mut c_void {
    let mut p = ptr::null_mut();
    // SAFETY: valid out-pointer.
    assert_eq!(unsafe { acl::aclrtMalloc(&mut p, n, 0) }, 0);
    p
}

unsafe fn tensor(p: *mut c_void, dt: i32, dims: &[i64]) -> *mut c_void {
    let strides: Vec<i64> = (0..dims.len()).map(|i| dims[i + 1..].iter().product()).collect();
    let storage = [dims.iter().product::<i64>()];
    // SAFETY: arrays valid for the call.
    unsafe {
        nnop::aclCreateTensor(dims.as_ptr(), dims.len() as u64, dt, strides.as_ptr(), 0, 2, storage.as_ptr(), 1, p)
    }
}

#[test]
fn work_without_a_bound_device_is_refused() {
    let _ = acl::aclInit(ptr::null());
    let t = std::thread::spawn(|| {
        let mut p = ptr::null_mut();
        // SAFETY: valid out-pointer.
        let code = unsafe { acl::aclrtMalloc(&mut p, 16, 0) };
        (code, recent())
    });
    let (code, msg) = t.join().unwrap();
    assert_eq!(code, codes::RT_CONTEXT_NULL);
    assert!(msg.contains("aclrtSetDevice"), "{msg}");
}

#[test]
fn phase1_validation_uses_the_documented_codes() {
    init();
    // SAFETY: test-local device buffers and descriptors.
    unsafe {
        let (a, b) = (malloc(64), malloc(64));
        let x = tensor(a, 0, &[4, 4]);
        let w = tensor(b, 0, &[3, 4]);
        let o = tensor(malloc(64), 0, &[4, 4]);
        let (mut ws, mut ex) = (0u64, ptr::null_mut());
        // Inner dimensions differ.
        assert_eq!(ops::aclnnMmGetWorkspaceSize(x, w, o, 0, &mut ws, &mut ex), codes::ACLNN_PARAM_INVALID);
        assert!(recent().contains("inner dimensions"));
        // NULL tensor.
        assert_eq!(ops::aclnnMmGetWorkspaceSize(ptr::null(), w, o, 0, &mut ws, &mut ex), codes::ACLNN_PARAM_NULLPTR);
        // A view larger than its storage is refused at creation.
        let storage = [4i64];
        let dims = [8i64];
        let strides = [1i64];
        assert!(nnop::aclCreateTensor(dims.as_ptr(), 1, 0, strides.as_ptr(), 0, 2, storage.as_ptr(), 1, a).is_null());
        assert!(recent().contains("storage has 4"));
        // A descriptor over a host pointer fails at phase 1, not in a kernel.
        let mut host = [0f32; 16];
        let h = tensor(host.as_mut_ptr().cast(), 0, &[4, 4]);
        assert_eq!(ops::aclnnMmGetWorkspaceSize(h, x, o, 0, &mut ws, &mut ex), codes::ACLNN_PARAM_INVALID);
        assert!(recent().contains("not in any live allocation"), "{}", recent());
    }
}

#[test]
fn streams_defer_and_faults_stick() {
    init();
    // SAFETY: test-local buffers; the pinned buffers outlive the synchronizes.
    unsafe {
        let mut s = ptr::null_mut();
        assert_eq!(acl::aclrtCreateStream(&mut s), 0);
        let dev = malloc(16);
        let mut host = ptr::null_mut();
        assert_eq!(acl::aclrtMallocHost(&mut host, 16), 0);
        std::slice::from_raw_parts_mut(host.cast::<u8>(), 16).fill(0);
        assert_eq!(acl::aclrtMemcpyAsync(host, 16, dev, 16, 2, s), 0);
        assert_eq!(std::slice::from_raw_parts(host.cast::<u8>(), 16), [0; 16], "nothing ran yet");
        assert_eq!(acl::aclrtSynchronizeStream(s), 0);
        assert_eq!(std::slice::from_raw_parts(host.cast::<u8>(), 16), [0xFF; 16], "fresh device memory is poisoned");
        // Free the device buffer under a queued copy: the copy faults at the sync, and the
        // stream stays faulted.
        assert_eq!(acl::aclrtMemcpyAsync(host, 16, dev, 16, 2, s), 0);
        assert_eq!(acl::aclrtFree(dev), 0);
        assert_eq!(acl::aclrtSynchronizeStream(s), codes::RT_AICORE_EXCEPTION);
        assert!(recent().contains("not in any live allocation"));
        assert_eq!(acl::aclrtSynchronizeStream(s), codes::RT_AICORE_EXCEPTION);
        assert_eq!(acl::aclrtFreeHost(host), 0);
        assert_eq!(acl::aclrtDestroyStream(s), 0);
    }
}

#[test]
fn new_ops_validate_their_documented_constraints() {
    init();
    // SAFETY: test-local device buffers and descriptors.
    unsafe {
        let (mut ws, mut ex) = (0u64, ptr::null_mut());
        let x = tensor(malloc(4 * 24), 0, &[2, 3, 4]);
        // Topk: indices must be int64.
        let (v, i32_idx) = (tensor(malloc(4 * 12), 0, &[2, 3, 2]), tensor(malloc(4 * 12), 3, &[2, 3, 2]));
        assert_eq!(
            ops::aclnnTopkGetWorkspaceSize(x, 2, -1, true, true, v, i32_idx, &mut ws, &mut ex),
            codes::ACLNN_PARAM_INVALID
        );
        assert!(recent().contains("indicesOut"), "{}", recent());
        // ReduceSum: a repeated dim is refused.
        let dims = [1i64, -2];
        let list = nnop::aclCreateIntArray(dims.as_ptr(), 2);
        let o = tensor(malloc(4 * 8), 0, &[2, 1, 4]);
        assert_eq!(
            ops::aclnnReduceSumGetWorkspaceSize(x, list, true, 0, o, &mut ws, &mut ex),
            codes::ACLNN_PARAM_INVALID
        );
        assert!(recent().contains("repeats"), "{}", recent());
        // BatchMatMul: batch sizes must agree (no broadcast).
        let w = tensor(malloc(4 * 12), 0, &[3, 4, 1]);
        let bo = tensor(malloc(4 * 6), 0, &[2, 3, 1]);
        assert_eq!(ops::aclnnBatchMatMulGetWorkspaceSize(x, w, bo, 0, &mut ws, &mut ex), codes::ACLNN_PARAM_INVALID);
        assert!(recent().contains("batch"), "{}", recent());
        // InplaceScatter: index, src and selfRef must have one rank.
        let idx = tensor(malloc(4 * 2), 3, &[2]);
        let src = tensor(malloc(4 * 8), 0, &[2, 4]);
        assert_eq!(
            ops::aclnnInplaceScatterGetWorkspaceSize(x, 0, idx, src, 0, &mut ws, &mut ex),
            codes::ACLNN_PARAM_INVALID
        );
        assert!(recent().contains("one rank"), "{}", recent());
        // Softplus: beta and threshold are required.
        let so = tensor(malloc(4 * 24), 0, &[2, 3, 4]);
        assert_eq!(
            ops::aclnnSoftplusGetWorkspaceSize(x, ptr::null(), ptr::null(), so, &mut ws, &mut ex),
            codes::ACLNN_PARAM_NULLPTR
        );
        nnop::aclDestroyIntArray(list);
    }
}

/// Runs a planned executor on a fresh stream and waits for it.
unsafe fn run(ws: u64, ex: *mut c_void, launch: extern "C" fn(*mut c_void, u64, *mut c_void, *mut c_void) -> i32) {
    let mut s = ptr::null_mut();
    // SAFETY: valid out-pointer; the workspace is a live device allocation.
    unsafe {
        assert_eq!(acl::aclrtCreateStream(&mut s), 0);
        let w = if ws > 0 { malloc(ws as usize) } else { ptr::null_mut() };
        assert_eq!(launch(w, ws, ex, s), 0, "{}", recent());
    }
    assert_eq!(acl::aclrtSynchronizeStream(s), 0, "{}", recent());
    assert_eq!(acl::aclrtDestroyStream(s), 0);
}

#[test]
fn bf16_caches_cast_to_nearest_even_and_keep_their_dtype() {
    init();
    const H2D: u32 = 1;
    const D2H: u32 = 2;
    const F32: i32 = 0;
    const BF16: i32 = 27;
    // SAFETY: test-local device buffers, descriptors and host arrays valid for each call.
    unsafe {
        let (mut ws, mut ex) = (0u64, ptr::null_mut());
        // Ties go to the even bf16 (1 + 2^-8 → 1, 1 + 3·2^-8 → 1 + 2^-6), others to nearest.
        let vals =
            [1.0f32, f32::from_bits(0x3F80_8000), f32::from_bits(0x3F81_8000), f32::from_bits(0x3F80_8001), -2.5, 0.0];
        let want: [u16; 6] = [0x3F80, 0x3F80, 0x3F82, 0x3F81, 0xC020, 0x0000];
        let src = malloc(4 * 6);
        assert_eq!(acl::aclrtMemcpy(src, 24, vals.as_ptr().cast(), 24, H2D), 0);
        let (x, b) = (tensor(src, F32, &[2, 3]), malloc(2 * 6));
        let o = tensor(b, BF16, &[2, 3]);
        assert_eq!(ops::aclnnCastGetWorkspaceSize(x, BF16, o, &mut ws, &mut ex), 0, "{}", recent());
        run(ws, ex, ops::aclnnCast);
        let mut got = [0u16; 6];
        assert_eq!(acl::aclrtMemcpy(got.as_mut_ptr().cast(), 12, b, 12, D2H), 0);
        assert_eq!(got, want);
        // Widening back is exact.
        let wide = malloc(4 * 6);
        let w = tensor(wide, F32, &[2, 3]);
        assert_eq!(ops::aclnnCastGetWorkspaceSize(o, F32, w, &mut ws, &mut ex), 0, "{}", recent());
        run(ws, ex, ops::aclnnCast);
        let mut back = [0f32; 6];
        assert_eq!(acl::aclrtMemcpy(back.as_mut_ptr().cast(), 24, wide, 24, D2H), 0);
        let exact: Vec<f32> = want.iter().map(|&h| f32::from_bits((h as u32) << 16)).collect();
        assert_eq!(back.to_vec(), exact);
        // A bf16 cache takes bf16 rows only: scattering f32 rows into it is refused.
        let idx = tensor(malloc(4 * 3), 3, &[1, 3]);
        let rows = tensor(malloc(4 * 3), F32, &[1, 3]);
        assert_eq!(
            ops::aclnnInplaceScatterGetWorkspaceSize(o, 0, idx, rows, 0, &mut ws, &mut ex),
            codes::ACLNN_PARAM_INVALID
        );
        assert!(recent().contains("one supported dtype"), "{}", recent());
        // IndexSelect keeps the dtype: a bf16 source needs a bf16 out.
        let sel = tensor(malloc(4), 3, &[1]);
        let f_out = tensor(malloc(4 * 3), F32, &[1, 3]);
        assert_eq!(
            ops::aclnnIndexSelectGetWorkspaceSize(o, 0, sel, f_out, &mut ws, &mut ex),
            codes::ACLNN_PARAM_INVALID
        );
        assert!(recent().contains("differs from self dtype"), "{}", recent());
    }
}
