//! What the GPU-only test files share: the backend and f32 uploads.

use hal::dtype::f32_bytes;
use hal::{Backend, DType, Probe, Tensor};

/// The CUDA backend on device 0; panics (the test fails) without one.
pub fn gpu() -> Box<dyn Backend> {
    match v4rt_cuda::probe() {
        Probe::Available(b) => b,
        Probe::Unavailable(r) => panic!("cuda backend unavailable: {r}"),
    }
}

pub fn up(b: &dyn Backend, shape: &[usize], v: &[f32]) -> Tensor {
    b.upload(shape, DType::F32, &f32_bytes(v)).unwrap()
}
