//! [`hal::Backend::calibrate`] for CUDA: the device-to-device copy bandwidth and a dense GEMM
//! rate, measured on the backend's stream in the calling process.
//!
//! * Copy: `cuMemcpyDtoDAsync` of a 1 GiB buffer, 1 warm-up + 10 timed copies; bytes read +
//!   written (2 GiB per copy) over the wall time between two stream synchronizations.
//! * GEMM: `kernels/calibrate.cu::calibrate_sgemm`, our own register-tiled f32 SIMT kernel
//!   (128×128 tiles, 8×8 per thread, explicit FMA; no tensor cores, no cuBLAS), M = N = K = 4096,
//!   1 warm-up (which also compiles it) + 5 timed runs. It is the rate the CUDA cores reach on a
//!   plain f32 GEMM, i.e. the yardstick for this backend's f32-accumulating, CUDA-core prefill
//!   kernels — far below the H100's tensor-core rates (bf16/FP8), which the report says.

use std::time::Instant;

use hal::backend::Calibration;
use hal::Result;

use crate::device::{driver_err, Dev};
use crate::ops::{launch, Arg};

const COPY_BYTES: usize = 1 << 30;
const COPY_REPS: usize = 10;
const GEMM_N: usize = 4096;
const GEMM_REPS: usize = 5;

pub(crate) fn calibrate(dev: &Dev) -> Result<Calibration> {
    dev.stream.synchronize().map_err(driver_err)?;
    // Copy bandwidth.
    let src = dev.alloc_zeroed(COPY_BYTES)?;
    let mut dst = dev.alloc_zeroed(COPY_BYTES)?;
    dev.stream.memcpy_dtod(&src, &mut dst).map_err(driver_err)?;
    dev.stream.synchronize().map_err(driver_err)?;
    let t = Instant::now();
    for _ in 0..COPY_REPS {
        dev.stream.memcpy_dtod(&src, &mut dst).map_err(driver_err)?;
    }
    dev.stream.synchronize().map_err(driver_err)?;
    let copy_s = t.elapsed().as_secs_f64();
    drop((src, dst));

    // Dense GEMM.
    let n = GEMM_N;
    let bytes = n * n * 4;
    let a = dev.alloc_zeroed(bytes)?;
    let b = dev.alloc_zeroed(bytes)?;
    let c = dev.alloc_zeroed(bytes)?;
    let args = [Arg::P(dev.ptr(&a)), Arg::P(dev.ptr(&b)), Arg::P(dev.ptr(&c)), Arg::I(n as i32), Arg::I(n as i32), Arg::I(n as i32)];
    let grid = ((n / 128) as u32, (n / 128) as u32, 1);
    launch(dev, "calibrate", "calibrate_sgemm", grid, 256, 0, &args)?;
    dev.stream.synchronize().map_err(driver_err)?;
    let t = Instant::now();
    for _ in 0..GEMM_REPS {
        launch(dev, "calibrate", "calibrate_sgemm", grid, 256, 0, &args)?;
    }
    dev.stream.synchronize().map_err(driver_err)?;
    let gemm_s = t.elapsed().as_secs_f64();
    Ok(Calibration {
        copy_bytes_per_s: (2 * COPY_BYTES * COPY_REPS) as f64 / copy_s,
        dense_flops_per_s: (2 * n * n * n * GEMM_REPS) as f64 / gemm_s,
        copy_method: format!("cuMemcpyDtoDAsync of 1 GiB, {COPY_REPS} copies after 1 warm-up, read + written bytes"),
        gemm_method: format!(
            "v4rt calibrate_sgemm: own f32 SIMT tiled kernel (CUDA cores, no tensor cores), {n}×{n}×{n}, {GEMM_REPS} runs after 1 warm-up"
        ),
    })
}
