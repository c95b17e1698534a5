//! [`hal::Backend::calibrate`] for CUDA: the device-to-device copy bandwidth and a dense GEMM
//! rate, measured on the backend's stream in the calling process.
//!
//! * Copy: `cuMemcpyDtoDAsync` of a 1 GiB buffer, 1 warm-up + 10 timed copies; bytes read +
//!   written (2 GiB per copy) over the wall time between two stream synchronizations.
//! * GEMM, M = N = K = 4096, 1 warm-up (which also compiles it) + 5 timed runs:
//!   - with tensor cores (sm_80+): `linear_tc`, the bf16 `mma.sync` tiles the prefill linears and
//!     experts run on, with BF16 weights and one bf16 term per input (the dense best case of the
//!     same kernel: no dequantization, no input split). Our own kernel, not cuBLAS: it measures
//!     how well the real shapes use our tiles, not how close the tiles are to the chip's peak;
//!   - otherwise `kernels/calibrate.cu::calibrate_sgemm`, our own register-tiled f32 SIMT kernel
//!     (128×128 tiles, 8×8 per thread, explicit FMA), the yardstick for the CUDA-core kernels.

use std::time::Instant;

use hal::backend::Calibration;
use hal::Result;

use crate::device::{driver_err, Dev};
use crate::ops::linear::linear_fwd;
use crate::ops::{launch, Arg};
use hal::ops::WeightFormat;

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
    let (pa, pb, pc) = (dev.ptr(&a), dev.ptr(&b), dev.ptr(&c));
    let run = || -> Result<()> {
        if dev.tensor_cores {
            linear_fwd(dev, pa, n, (pb, 0), pc, n, n, n, n, n, WeightFormat::Bf16, true)
        } else {
            let args = [Arg::P(pa), Arg::P(pb), Arg::P(pc), Arg::I(n as i32), Arg::I(n as i32), Arg::I(n as i32)];
            launch(dev, "calibrate", "calibrate_sgemm", ((n / 128) as u32, (n / 128) as u32, 1), 256, 0, &args)
        }
    };
    run()?;
    dev.stream.synchronize().map_err(driver_err)?;
    let t = Instant::now();
    for _ in 0..GEMM_REPS {
        run()?;
    }
    dev.stream.synchronize().map_err(driver_err)?;
    let gemm_s = t.elapsed().as_secs_f64();
    let kernel = if dev.tensor_cores {
        "v4rt linear_tc: own bf16 mma.sync tiles (64×128×32, f32 accumulators, two shared-memory stages, ldmatrix), bf16 inputs, BF16 weights"
    } else {
        "v4rt calibrate_sgemm: own f32 SIMT tiled kernel (CUDA cores, no tensor cores)"
    };
    Ok(Calibration {
        copy_bytes_per_s: (2 * COPY_BYTES * COPY_REPS) as f64 / copy_s,
        dense_flops_per_s: (2 * n * n * n * GEMM_REPS) as f64 / gemm_s,
        copy_method: format!("cuMemcpyDtoDAsync of 1 GiB, {COPY_REPS} copies after 1 warm-up, read + written bytes"),
        gemm_method: format!("{kernel}, {n}×{n}×{n}, {GEMM_REPS} runs after 1 warm-up"),
    })
}
