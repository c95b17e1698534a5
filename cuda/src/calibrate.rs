//! [`hal::Backend::calibrate`] for CUDA: the device-to-device copy bandwidth and a dense GEMM
//! rate, measured on the backend's stream in the calling process.
//!
//! * Copy: `cuMemcpyDtoDAsync` of a 1 GiB buffer, 1 warm-up + 10 timed copies; bytes read +
//!   written (2 GiB per copy) over the wall time between two stream synchronizations.
//! * GEMM, M = N = K = 4096, 1 warm-up (which also compiles it) + 5 timed runs:
//!   - with tensor cores (sm_80+): `linear_tc`, the bf16 `mma.sync` tiles the prefill linears and
//!     experts run on, with random bf16 inputs and BF16 weights (the dense best case of the same
//!     kernel: no dequantization, no input split). It measures how well the real shapes use our
//!     tiles. Beside it, cuBLAS on the same buffers (`cublas.rs`, when libcublas loads) says how
//!     close the tiles are to what the chip reaches;
//!   - otherwise `kernels/calibrate.cu::calibrate_sgemm`, our own register-tiled f32 SIMT kernel
//!     (128×128 tiles, 8×8 per thread, explicit FMA), the yardstick for the CUDA-core kernels.

use std::time::Instant;

use hal::backend::Calibration;
use hal::Result;

use crate::cublas::Cublas;
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

    // Dense GEMM on random bf16 inputs (A: rows, B: weights; tensor-core power, and so the clock,
    // depends on the data, and zeros would flatter it).
    let n = GEMM_N;
    let mut a = dev.alloc_zeroed(n * n * 4)?;
    let mut b = dev.alloc_zeroed(n * n * 4)?;
    let c = dev.alloc_zeroed(n * n * 4)?;
    let (pa, pb, pc) = (dev.ptr(&a), dev.ptr(&b), dev.ptr(&c));
    if dev.tensor_cores {
        for (buf, seed) in [(&mut a, 1), (&mut b, 2)] {
            let mut view = buf.slice_mut(0..n * n * 2);
            dev.stream.memcpy_htod(&random_bf16(n * n, seed), &mut view).map_err(driver_err)?;
        }
        dev.stream.synchronize().map_err(driver_err)?;
        let run = || linear_fwd(dev, pa, n, (pb, 0), pc, n, n, n, n, n, WeightFormat::Bf16, true);
        return finish(dev, copy_s, &run, (pa, pb, pc));
    }
    let args = [Arg::P(pa), Arg::P(pb), Arg::P(pc), Arg::I(n as i32), Arg::I(n as i32), Arg::I(n as i32)];
    let run = || launch(dev, "calibrate", "calibrate_sgemm", ((n / 128) as u32, (n / 128) as u32, 1), 256, 0, &args);
    finish(dev, copy_s, &run, (pa, pb, pc))
}

/// Times `run` (the dense GEMM of GEMM_N³) and, with tensor cores, cuBLAS on the same bf16
/// buffers `abc`, and assembles the calibration.
fn finish(dev: &Dev, copy_s: f64, run: &dyn Fn() -> Result<()>, abc: (u64, u64, u64)) -> Result<Calibration> {
    let n = GEMM_N;
    let gemm_s = time_gemm(dev, run)?;
    let kernel = if dev.tensor_cores {
        "v4rt linear_tc: own bf16 mma.sync tiles (64×128×32, f32 accumulators, two shared-memory stages, ldmatrix), bf16 inputs, BF16 weights"
    } else {
        "v4rt calibrate_sgemm: own f32 SIMT tiled kernel (CUDA cores, no tensor cores)"
    };
    let (vendor_flops_per_s, vendor_method) = if dev.tensor_cores {
        match vendor_gemm(dev, abc) {
            Ok((s, name)) => (
                Some(flops(s)),
                format!("cuBLAS cublasGemmEx ({name}), bf16 × bf16 → f32, f32 compute, {n}×{n}×{n}, {GEMM_REPS} runs after 1 warm-up"),
            ),
            Err(why) => (None, format!("cuBLAS not measured: {why}")),
        }
    } else {
        (None, "cuBLAS not measured: no tensor cores (the yardstick is the f32 SIMT kernel)".into())
    };
    Ok(Calibration {
        copy_bytes_per_s: (2 * COPY_BYTES * COPY_REPS) as f64 / copy_s,
        dense_flops_per_s: flops(gemm_s),
        copy_method: format!("cuMemcpyDtoDAsync of 1 GiB, {COPY_REPS} copies after 1 warm-up, read + written bytes"),
        gemm_method: format!("{kernel}, {n}×{n}×{n}, {GEMM_REPS} runs after 1 warm-up"),
        vendor_flops_per_s,
        vendor_method,
    })
}

/// FLOP/s of GEMM_REPS GEMMs of GEMM_N³ in `s` seconds.
fn flops(s: f64) -> f64 {
    (2 * GEMM_N * GEMM_N * GEMM_N * GEMM_REPS) as f64 / s
}

/// Seconds for GEMM_REPS runs of `run` after one warm-up, between stream synchronizations.
fn time_gemm(dev: &Dev, run: &dyn Fn() -> Result<()>) -> Result<f64> {
    run()?;
    dev.stream.synchronize().map_err(driver_err)?;
    let t = Instant::now();
    for _ in 0..GEMM_REPS {
        run()?;
    }
    dev.stream.synchronize().map_err(driver_err)?;
    Ok(t.elapsed().as_secs_f64())
}

/// cuBLAS on the same buffers: seconds for GEMM_REPS runs, and the library file. Errors (no
/// library, a failed call) come back as text for the report.
fn vendor_gemm(dev: &Dev, (a, b, c): (u64, u64, u64)) -> std::result::Result<(f64, String), String> {
    dev.ctx.bind_to_thread().map_err(|e| e.to_string())?;
    let blas = Cublas::open(dev.stream.cu_stream().cast())?;
    let n = GEMM_N;
    let run = || {
        blas.gemm_bf16(a, b, c, n, n, n).map_err(|reason| hal::Error::Unavailable { backend: "cuBLAS".into(), reason })
    };
    time_gemm(dev, &run).map(|s| (s, blas.name.clone())).map_err(|e| e.to_string())
}

/// `count` bf16 values, uniform in [−1, 1), from a fixed 64-bit LCG stream `seed`: little-endian
/// bytes.
fn random_bf16(count: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(count * 2);
    for _ in 0..count {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        let unit = (state >> 40) as f32 / (1u64 << 24) as f32;
        let bits = ((unit * 2.0 - 1.0).to_bits() >> 16) as u16;
        out.extend_from_slice(&bits.to_le_bytes());
    }
    out
}
