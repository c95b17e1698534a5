//! # v4rt-cpu-ref — the CPU reference backend
//!
//! The executable spec of every `hal::ops` op: each op's documented math, implemented literally
//! in f32 with f64 accumulation (dot products and sums are rounded to f32 once), which is the
//! accuracy floor the official reference's float32 mode is compared against. Other backends
//! are tested against this one.
//!
//! * [`device`] — [`device::CpuStorage`]: aligned host buffers, plus a lazily decoded f32 copy
//!   of quantized/bf16 weights so they are decoded once, not on every call.
//! * [`ops`] — one file per op family; plain slice functions (used directly by the golden
//!   tests) and the op entries behind [`CpuBackend::run`].
//!
//! Work is synchronous: `run` has finished when it returns. Large calls are split over rayon's
//! thread pool; small ones (decode-sized) stay on the calling thread.

pub mod device;
pub mod ops;

use hal::backend::{Backend, BackendInfo, Calibration, Probe, Support};
use hal::{DType, Error, Op, Result, Tensor};

use device::{CpuStorage, BACKEND_NAME};

/// The CPU reference backend.
pub struct CpuBackend {
    info: BackendInfo,
}

impl CpuBackend {
    pub fn new() -> Self {
        let device = format!("CPU reference, {} threads", rayon::current_num_threads());
        CpuBackend { info: BackendInfo { name: BACKEND_NAME, device } }
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

/// The CPU backend is always available.
pub fn probe() -> Probe {
    Probe::Available(Box::new(CpuBackend::new()))
}

/// The cpu-ref storage behind `t`; `what` names the tensor for the error if it is foreign.
fn cpu(t: &Tensor, what: impl FnOnce() -> String) -> Result<&CpuStorage> {
    t.storage().as_any().downcast_ref::<CpuStorage>().ok_or_else(|| foreign(what(), t.storage().backend()))
}

/// [`cpu`], writable.
fn cpu_mut(t: &mut Tensor, what: impl FnOnce() -> String) -> Result<&mut CpuStorage> {
    let owner = t.storage().backend();
    t.storage_mut().as_any_mut().downcast_mut::<CpuStorage>().ok_or_else(|| foreign(what(), owner))
}

fn foreign(what: String, owner: &str) -> Error {
    Error::invalid(what, format!("tensor belongs to backend '{owner}', not {BACKEND_NAME}"))
}

impl Backend for CpuBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    /// Every op runs here; the one exception is an embedding table whose dtype is not one
    /// value per element (packed FP4) or not a float (`ops::embed::embed_table_supported`).
    fn supports(&self, op: &Op) -> Support {
        match op {
            Op::Embed(e) if !ops::embed::embed_table_supported(e.table_dtype) => {
                Support::No(format!("embedding table dtype {} (use f32, bf16 or f16)", e.table_dtype))
            }
            _ => Support::Yes,
        }
    }

    fn alloc(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let bytes = byte_len(shape, dtype)?;
        Ok(Tensor::from_storage(Box::new(CpuStorage::zeroed(bytes)), shape.to_vec(), dtype))
    }

    fn upload(&self, shape: &[usize], dtype: DType, bytes: &[u8]) -> Result<Tensor> {
        let want = byte_len(shape, dtype)?;
        if bytes.len() != want {
            return Err(Error::invalid("upload", format!("{dtype} {shape:?} needs {want} bytes, got {}", bytes.len())));
        }
        Ok(Tensor::from_storage(Box::new(CpuStorage::from_bytes(bytes)), shape.to_vec(), dtype))
    }

    fn write(&self, t: &mut Tensor, offset: usize, bytes: &[u8]) -> Result<()> {
        let (len, size) = (t.len_bytes(), t.dtype().size());
        let start = offset.checked_mul(size);
        let end = start.and_then(|s| s.checked_add(bytes.len())).filter(|&e| e <= len);
        let (Some(start), Some(end)) = (start, end) else {
            return Err(Error::invalid(
                "write",
                format!("{} bytes at element {offset} overrun the {len}-byte tensor {t:?}", bytes.len()),
            ));
        };
        cpu_mut(t, || "write".into())?.bytes_mut()[start..end].copy_from_slice(bytes);
        Ok(())
    }

    fn download(&self, t: &Tensor) -> Result<Vec<u8>> {
        Ok(cpu(t, || "download".into())?.bytes().to_vec())
    }

    fn run(&self, op: &Op, inputs: &[&Tensor], outputs: &mut [&mut Tensor]) -> Result<()> {
        op.validate(inputs, outputs)?;
        if let Support::No(reason) = self.supports(op) {
            return Err(Error::Unsupported { backend: BACKEND_NAME.into(), op: op.name().into(), reason });
        }
        let sig = op.signature();
        let ins = inputs
            .iter()
            .zip(&sig.inputs)
            .map(|(t, spec)| cpu(t, || format!("{} input '{}'", op.name(), spec.name)))
            .collect::<Result<Vec<_>>>()?;
        let mut outs = outputs
            .iter_mut()
            .zip(&sig.outputs)
            .map(|(t, spec)| cpu_mut(t, || format!("{} output '{}'", op.name(), spec.name)))
            .collect::<Result<Vec<_>>>()?;
        ops::dispatch(op, &ins, &mut outs)
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    /// Copy: 256 MiB host buffer copied over rayon's threads (one `copy_from_slice` per chunk),
    /// best of 5. GEMM: this backend's own f32 `linear` (f64 accumulation, rayon), 256 rows ×
    /// 2048 × 2048, best of 3.
    fn calibrate(&self) -> Result<Calibration> {
        use rayon::prelude::*;
        use std::time::Instant;
        const COPY: usize = 256 << 20;
        let src = vec![1u8; COPY];
        let mut dst = vec![0u8; COPY];
        let chunk = COPY / rayon::current_num_threads().max(1);
        let mut copy_s = f64::INFINITY;
        for _ in 0..5 {
            let t = Instant::now();
            dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
            copy_s = copy_s.min(t.elapsed().as_secs_f64());
        }
        std::hint::black_box(&dst);
        let (m, n, k) = (256usize, 2048usize, 2048usize);
        let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.01).collect();
        let mut y = vec![0f32; m * n];
        let mut gemm_s = f64::INFINITY;
        for _ in 0..3 {
            let t = Instant::now();
            ops::linear::linear(&x, &w, k, n, false, &mut y);
            gemm_s = gemm_s.min(t.elapsed().as_secs_f64());
        }
        std::hint::black_box(&y);
        Ok(Calibration {
            copy_bytes_per_s: 2.0 * COPY as f64 / copy_s,
            dense_flops_per_s: 2.0 * (m * n * k) as f64 / gemm_s,
            copy_method: format!("host memcpy of 256 MiB over {} threads, best of 5", rayon::current_num_threads()),
            gemm_method: format!("cpu-ref f32 linear (f64 accumulation), {m}×{n}×{k}, best of 3"),
            vendor_flops_per_s: None,
            vendor_method: "none (cpu-ref has no vendor GEMM)".into(),
        })
    }
}

fn byte_len(shape: &[usize], dtype: DType) -> Result<usize> {
    shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::invalid("alloc", format!("{dtype} {shape:?} overflows the address space")))
}
