//! `libnnopbase` exports: tensor/scalar/array objects and executor management.
//!
//! `aclCreateTensor` checks what can be checked without an op: a known dtype, non-negative
//! dims and strides, at most 8 dims, and a view that fits inside the declared storage. Whether
//! the device address is live, and whether the op accepts the format, dtype or layout, is
//! checked by each op's phase 1. Destroying an object twice is an error, not a crash.

#![allow(non_snake_case, clippy::missing_safety_doc)]

use std::ffi::{c_char, c_void};

use crate::dtype::Dt;
use crate::memory::TView;
use crate::state::TensorObj;
use crate::{bail, codes, guard, guard_ptr, with_emu, Fail};

/// Reads `n` values from a C array (NULL with `n > 0` is an error).
///
/// # Safety
/// `p` is NULL or valid for `n` reads.
unsafe fn array<T: Copy>(p: *const T, n: u64, name: &str) -> Result<Vec<T>, Fail> {
    if n == 0 {
        return Ok(Vec::new());
    }
    if p.is_null() {
        bail!(codes::ACLNN_PARAM_NULLPTR, "{name} is nullptr but its length is {n}");
    }
    if n > 64 {
        bail!(codes::ACLNN_PARAM_INVALID, "{name} has {n} entries (at most 8 dims are supported)");
    }
    // SAFETY: non-null and valid for `n` reads per the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(p, n as usize) }.to_vec())
}

#[no_mangle]
pub unsafe extern "C" fn aclCreateTensor(
    view_dims: *const i64,
    view_dims_num: u64,
    data_type: i32,
    stride: *const i64,
    offset: i64,
    format: i32,
    storage_dims: *const i64,
    storage_dims_num: u64,
    tensor_data: *mut c_void,
) -> *mut c_void {
    guard_ptr("aclCreateTensor", || {
        // SAFETY: the caller passes arrays of the stated lengths.
        let dims = unsafe { array(view_dims, view_dims_num, "viewDims")? };
        let strides = if stride.is_null() && !dims.is_empty() {
            bail!(codes::ACLNN_PARAM_NULLPTR, "stride is nullptr");
        } else {
            // SAFETY: as above; same length as viewDims.
            unsafe { array(stride, view_dims_num, "stride")? }
        };
        // SAFETY: as above.
        let storage = unsafe { array(storage_dims, storage_dims_num, "storageDims")? };
        if dims.len() > 8 {
            bail!(codes::ACLNN_PARAM_INVALID, "{} dims; at most 8 are supported", dims.len());
        }
        let dt = Dt::from_acl(data_type)
            .ok_or_else(|| Fail::new(codes::ACLNN_PARAM_INVALID, format!("unknown aclDataType {data_type}")))?;
        if dims.iter().chain(&strides).chain(&storage).any(|&v| v < 0) || offset < 0 {
            bail!(
                codes::ACLNN_PARAM_INVALID,
                "negative dim, stride or offset (dims {dims:?}, strides {strides:?}, offset {offset})"
            );
        }
        let storage_elems: i64 = storage.iter().product();
        let view = TView { addr: tensor_data as usize, dt, dims, strides, offset };
        if let Some(max) = view.max_index() {
            if max >= storage_elems {
                bail!(codes::ACLNN_PARAM_INVALID,
                    "view (dims {:?}, strides {:?}, offset {offset}) reaches element {max}, storage has {storage_elems}",
                    view.dims, view.strides);
            }
            if tensor_data.is_null() {
                bail!(codes::ACLNN_PARAM_NULLPTR, "tensorData is nullptr for a non-empty tensor");
            }
        }
        with_emu(|e| {
            let h = e.handle();
            e.tensors.insert(h, TensorObj { view, format, storage_elems });
            Ok(h as *mut c_void)
        })
    })
}

#[no_mangle]
pub extern "C" fn aclDestroyTensor(tensor: *const c_void) -> i32 {
    guard("aclDestroyTensor", || {
        with_emu(|e| match e.tensors.remove(&(tensor as usize)) {
            Some(_) => Ok(()),
            None => bail!(codes::ACLNN_PARAM_INVALID, "{tensor:?} is not a live aclTensor (destroyed twice?)"),
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclCreateScalar(value: *mut c_void, data_type: i32) -> *mut c_void {
    guard_ptr("aclCreateScalar", || {
        if value.is_null() {
            bail!(codes::ACLNN_PARAM_NULLPTR, "value is nullptr");
        }
        let dt = Dt::from_acl(data_type).filter(|d| d.has_codec()).ok_or_else(|| {
            Fail::new(codes::ACLNN_PARAM_INVALID, format!("unsupported scalar aclDataType {data_type}"))
        })?;
        // SAFETY: the API reads exactly sizeof(dataType) bytes from `value`.
        let bytes = unsafe { std::slice::from_raw_parts(value as *const u8, dt.size()) };
        let v = dt.load(bytes);
        with_emu(|e| {
            let h = e.handle();
            e.scalars.insert(h, (dt, v));
            Ok(h as *mut c_void)
        })
    })
}

#[no_mangle]
pub extern "C" fn aclDestroyScalar(scalar: *const c_void) -> i32 {
    guard("aclDestroyScalar", || {
        with_emu(|e| match e.scalars.remove(&(scalar as usize)) {
            Some(_) => Ok(()),
            None => bail!(codes::ACLNN_PARAM_INVALID, "{scalar:?} is not a live aclScalar"),
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclCreateIntArray(value: *const i64, size: u64) -> *mut c_void {
    guard_ptr("aclCreateIntArray", || {
        if value.is_null() && size > 0 {
            bail!(codes::ACLNN_PARAM_NULLPTR, "value is nullptr");
        }
        let v = if size == 0 {
            Vec::new()
        } else {
            // SAFETY: non-null, `size` readable values per the API.
            unsafe { std::slice::from_raw_parts(value, size as usize) }.to_vec()
        };
        with_emu(|e| {
            let h = e.handle();
            e.int_arrays.insert(h, v);
            Ok(h as *mut c_void)
        })
    })
}

#[no_mangle]
pub extern "C" fn aclDestroyIntArray(array: *const c_void) -> i32 {
    guard("aclDestroyIntArray", || {
        with_emu(|e| match e.int_arrays.remove(&(array as usize)) {
            Some(_) => Ok(()),
            None => bail!(codes::ACLNN_PARAM_INVALID, "{array:?} is not a live aclIntArray"),
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclCreateTensorList(value: *const *const c_void, size: u64) -> *mut c_void {
    guard_ptr("aclCreateTensorList", || {
        if value.is_null() && size > 0 {
            bail!(codes::ACLNN_PARAM_NULLPTR, "value is nullptr");
        }
        let v: Vec<usize> = if size == 0 {
            Vec::new()
        } else {
            // SAFETY: non-null, `size` readable pointers per the API.
            unsafe { std::slice::from_raw_parts(value, size as usize) }.iter().map(|&p| p as usize).collect()
        };
        with_emu(|e| {
            if let Some(bad) = v.iter().find(|p| !e.tensors.contains_key(p)) {
                bail!(codes::ACLNN_PARAM_INVALID, "list entry {bad:#x} is not a live aclTensor");
            }
            let h = e.handle();
            e.tensor_lists.insert(h, v);
            Ok(h as *mut c_void)
        })
    })
}

#[no_mangle]
pub extern "C" fn aclDestroyTensorList(list: *const c_void) -> i32 {
    guard("aclDestroyTensorList", || {
        with_emu(|e| match e.tensor_lists.remove(&(list as usize)) {
            Some(_) => Ok(()),
            None => bail!(codes::ACLNN_PARAM_INVALID, "{list:?} is not a live aclTensorList"),
        })
    })
}

#[no_mangle]
pub extern "C" fn aclnnInit(_config_path: *const c_char) -> i32 {
    guard("aclnnInit", || with_emu(|e| e.need_init()))
}

#[no_mangle]
pub extern "C" fn aclnnFinalize() -> i32 {
    guard("aclnnFinalize", || with_emu(|e| e.need_init()))
}

#[no_mangle]
pub extern "C" fn aclSetAclOpExecutorRepeatable(executor: *mut c_void) -> i32 {
    guard("aclSetAclOpExecutorRepeatable", || {
        with_emu(|e| match e.executors.get_mut(&(executor as usize)) {
            Some(x) if !x.used => {
                x.repeatable = true;
                Ok(())
            }
            Some(_) => bail!(codes::ACLNN_PARAM_INVALID, "executor was already launched"),
            None => bail!(codes::ACLNN_PARAM_INVALID, "{executor:?} is not an executor"),
        })
    })
}

#[no_mangle]
pub extern "C" fn aclDestroyAclOpExecutor(executor: *mut c_void) -> i32 {
    guard("aclDestroyAclOpExecutor", || {
        with_emu(|e| match e.executors.get_mut(&(executor as usize)) {
            Some(x) if x.repeatable => {
                e.executors.remove(&(executor as usize));
                Ok(())
            }
            Some(_) => bail!(codes::ACLNN_PARAM_INVALID, "only repeatable executors are destroyed explicitly"),
            None => bail!(codes::ACLNN_PARAM_INVALID, "{executor:?} is not an executor"),
        })
    })
}
