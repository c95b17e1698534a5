//! cuBLAS as a calibration yardstick only: one bf16 GEMM (`cublasGemmEx`, f32 accumulation) that
//! says what the chip reaches on a dense GEMM, beside our own `linear_tc` rate. No op runs on it.
//!
//! libcublas is opened with `libloading` at calibration time, by the names a CUDA 13 or 12
//! installation gives it (and `V4RT_CUBLAS`, a full path, first). When it is missing the
//! calibration says so and goes on: the runtime itself never needs it.

use std::ffi::c_void;

use libloading::{Library, Symbol};

type Handle = *mut c_void;
type Status = i32;

/// `cudaDataType` / `cublasComputeType_t` / `cublasOperation_t` / `cublasGemmAlgo_t` values
/// (cuBLAS's ABI, stable since CUDA 11).
const CUDA_R_32F: i32 = 0;
const CUDA_R_16BF: i32 = 14;
const CUBLAS_COMPUTE_32F: i32 = 68;
const CUBLAS_OP_N: i32 = 0;
const CUBLAS_OP_T: i32 = 1;
const CUBLAS_GEMM_DEFAULT: i32 = -1;

type CreateFn = unsafe extern "C" fn(*mut Handle) -> Status;
type DestroyFn = unsafe extern "C" fn(Handle) -> Status;
type SetStreamFn = unsafe extern "C" fn(Handle, *mut c_void) -> Status;
#[rustfmt::skip]
type GemmExFn = unsafe extern "C" fn(
    Handle, i32, i32,         // handle, transa, transb
    i32, i32, i32,            // m, n, k
    *const c_void,            // alpha
    *const c_void, i32, i32,  // A, Atype, lda
    *const c_void, i32, i32,  // B, Btype, ldb
    *const c_void,            // beta
    *mut c_void, i32, i32,    // C, Ctype, ldc
    i32, i32,                 // computeType, algo
) -> Status;

/// Library names tried in order after `V4RT_CUBLAS`.
const NAMES: &[&str] = &[
    "libcublas.so.13",
    "libcublas.so.12",
    "libcublas.so",
    "/usr/local/cuda/lib64/libcublas.so.13",
    "/usr/local/cuda/lib64/libcublas.so.12",
    "/usr/local/cuda/lib64/libcublas.so",
];

/// A cuBLAS handle bound to one stream, with the library it came from.
pub(crate) struct Cublas {
    lib: Library,
    handle: Handle,
    /// The file that was opened.
    pub name: String,
}

impl Cublas {
    /// Opens libcublas and creates a handle on `stream` (a `CUstream`; the current context must
    /// be the stream's). Errors say what was tried.
    pub fn open(stream: *mut c_void) -> Result<Self, String> {
        let mut tried = Vec::new();
        let env = std::env::var("V4RT_CUBLAS").ok().filter(|v| !v.is_empty());
        let names = env.iter().map(String::as_str).chain(NAMES.iter().copied());
        for name in names {
            // SAFETY: loading cuBLAS runs its (trusted) initializers only.
            match unsafe { Library::new(name) } {
                Ok(lib) => return Self::with_library(lib, name.to_string(), stream),
                Err(e) => tried.push(format!("{name}: {e}")),
            }
        }
        Err(format!("libcublas not found ({})", tried.join("; ")))
    }

    fn with_library(lib: Library, name: String, stream: *mut c_void) -> Result<Self, String> {
        let mut handle: Handle = std::ptr::null_mut();
        // SAFETY: the symbols have the cuBLAS v2 signatures above; `handle` outlives the call.
        unsafe {
            let create: Symbol<CreateFn> = lib.get(b"cublasCreate_v2\0").map_err(|e| format!("{name}: {e}"))?;
            status(create(&mut handle), "cublasCreate_v2")?;
            // From here on Drop destroys the handle, also when setting the stream fails.
            let me = Cublas { lib, handle, name };
            let set: Symbol<SetStreamFn> =
                me.lib.get(b"cublasSetStream_v2\0").map_err(|e| format!("{}: {e}", me.name))?;
            status(set(me.handle, stream), "cublasSetStream_v2")?;
            Ok(me)
        }
    }

    /// `C[m, n] = A[m, k] · B[n, k]ᵀ` (row-major, bf16 A and B, f32 C and accumulation): the
    /// product `linear_tc` computes, with B the weight matrix. Device pointers.
    pub fn gemm_bf16(&self, a: u64, b: u64, c: u64, m: usize, n: usize, k: usize) -> Result<(), String> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        let dim = |v: usize| i32::try_from(v).map_err(|_| format!("GEMM dimension {v} exceeds i32"));
        let (m, n, k) = (dim(m)?, dim(n)?, dim(k)?);
        // SAFETY: the symbol has cublasGemmEx's signature; the pointers are device buffers of the
        // sizes the caller allocated; alpha and beta outlive the call.
        unsafe {
            let gemm: Symbol<GemmExFn> = self.lib.get(b"cublasGemmEx\0").map_err(|e| format!("{}: {e}", self.name))?;
            // cuBLAS is column-major: it computes Cᵀ (n × m, ld n) = B (n × k) · Aᵀ (k × m), where
            // the stored B reads as a k × n matrix (op T) and the stored A as k × m (op N).
            status(
                gemm(
                    self.handle,
                    CUBLAS_OP_T,
                    CUBLAS_OP_N,
                    n,
                    m,
                    k,
                    (&alpha as *const f32).cast(),
                    b as *const c_void,
                    CUDA_R_16BF,
                    k,
                    a as *const c_void,
                    CUDA_R_16BF,
                    k,
                    (&beta as *const f32).cast(),
                    c as *mut c_void,
                    CUDA_R_32F,
                    n,
                    CUBLAS_COMPUTE_32F,
                    CUBLAS_GEMM_DEFAULT,
                ),
                "cublasGemmEx",
            )
        }
    }
}

impl Drop for Cublas {
    fn drop(&mut self) {
        // SAFETY: the handle was created by this library and is destroyed once.
        unsafe {
            if let Ok(destroy) = self.lib.get::<DestroyFn>(b"cublasDestroy_v2\0") {
                destroy(self.handle);
            }
        }
    }
}

fn status(s: Status, call: &str) -> Result<(), String> {
    if s == 0 {
        Ok(())
    } else {
        Err(format!("{call} returned cuBLAS status {s}"))
    }
}
