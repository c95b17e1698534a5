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

use hal::backend::{Backend, BackendInfo, Probe, Support};
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
}

fn byte_len(shape: &[usize], dtype: DType) -> Result<usize> {
    shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::invalid("alloc", format!("{dtype} {shape:?} overflows the address space")))
}
