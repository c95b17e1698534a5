//! # v4rt-cuda — the NVIDIA backend
//!
//! Every `hal::ops` op as CUDA C++ kernels (`kernels/<family>.cu`), compiled at run time with
//! NVRTC for the device's architecture and launched through cudarc. The crate builds and loads
//! with no CUDA installed: cudarc opens libcuda and libnvrtc with `dlopen` at run time
//! (`dynamic-loading`), and [`probe`] reports why the backend is unavailable instead of panicking.
//!
//! * [`device`] — [`device::CudaStorage`] (one device allocation per tensor) and the backend's
//!   context, its stream (plus the side stream of `Backend::concurrently`), scratch buffers and
//!   error word.
//! * [`kernels`] — the embedded sources, NVRTC options, the on-disk PTX cache, and
//!   [`kernels::compile_all_for_check`] (NVRTC without a GPU, for CI).
//! * [`ops`] — one file per op family, launching that family's kernels.
//! * [`record`] — `Backend::record` as a CUDA graph captured from the stream, with the memory
//!   its ops allocate in an arena of its own.
//!
//! ## Numerics
//! The kernels mirror `cpu-ref` operation for operation: quantizers (act_quant, FP8/FP4
//! simulation, e4m3/e2m1 rounding, e8m0 scales read off the float bits) are bit-exact ports;
//! RoPE uses θ = fl32(f32(pos)·ω) with cos/sin in f64 rounded to f32; the Hadamard runs the same
//! f64 butterflies; top-k orders by `f32::total_cmp` descending, ties to the lower index. Sums
//! that cpu-ref takes in f64 are taken in f64 here too (norms, mHC, gate, compressor pooling,
//! attention's softmax den, weights and weighted sums in the warp-per-head kernel, the indexer's
//! head sum), in a different order — except where long contexts make f64 too dear: attention
//! logits (q·k) and the indexer's per-head dots are f32 sums (a conversion to f64 runs at 1/8
//! the f32 FMA rate; the HAL's math does not fix their precision, and the result stays within
//! ~1e-6 relative), and so are the weighted sums of the attention tiles (below), whose weights
//! are `expf`.
//! The large matrix products (Linear, GroupedLinear, MoE experts) accumulate in f32, like the
//! FP8 GEMMs of the official reference: with FMA on the CUDA cores (decode), or on bf16 tensor
//! cores (`mma.sync`, from 16 rows) with operands that bf16 holds exactly — FP8/FP4 weights times
//! their power-of-two scales, act_quant'ed inputs as one bf16 term, any other f32 input split
//! into three bf16 terms that sum to it — so the products are exact and only the summation
//! order differs. Kernels are compiled with `--fmad=false` so that no `a·b + c` is contracted
//! where cpu-ref rounds the product.
//!
//! ## Speed
//! Figures and what bounds them: `docs/performance.md`. Weight-streaming GEMV kernels for few
//! rows (one warp per output feature, 16-byte weight loads, several features per warp step);
//! tensor-core tiles (64 rows × 128 features, two shared-memory stages, `common.cuh` `tc_tile`;
//! act_quant'ed inputs arrive in bf16) for prefill; f64 dot tiles of 32 rows for the gate and the
//! mHC mixing sums of many rows. Attention over a bf16 cache (head_dim 128, 256, 512): bf16
//! `mma.sync` tiles, a block per (row, 16 heads) walking 64-key chunks, q and the softmax weights
//! as three exact bf16 terms (`V4RT_CUDA_ATTN_MMA=0` turns them off); otherwise a block per
//! (row, 8 heads), a warp a head. Both split the keys, with a combine step, so that decode fills
//! the device. Indexer: a thread per key with all heads; the top-k of long rows in
//! two stages (segments, then their candidates). `V4RT_CUDA_TENSOR_CORES=0` turns the tensor-core
//! tiles off (the CUDA-core kernels then take every size, for comparison).
//!
//! Weights stay in checkpoint format on the device (e4m3 + e8m0 128×128 block scales, packed e2m1
//! + e8m0 1×32 scales, bf16) and are dequantized inside the kernels.
//!
//! ## Stream and host round trips
//! All work is issued in order on one stream; `run` never copies device data to the host, so it
//! returns as soon as the kernels are queued. `upload`/`write` copy from pageable host memory
//! (the driver stages the bytes before the call returns); `download` and `synchronize` wait for
//! everything. On sm_90+ kernels are launched as programmatic dependents of their predecessor
//! (`ops::launch`): each may be scheduled early and waits at its first statement
//! (`grid_dep_begin`, common.cuh) until the predecessor has completed.
//!
//! ## Deferred argument errors
//! Shape and dtype errors, and every check that needs only the op descriptor, are returned by
//! `run` at once. Errors that depend on tensor *contents* (a slot out of range, a negative
//! position, rows of a slot not contiguous or positions not consecutive, a token id ≥ vocab, a
//! gather index out of range, a compressed index ≥ capacity, too many compressed entries for the
//! capacity, a repeated or out-of-range expert) are found on the device, since reading the
//! contents would cost a host round trip per op. For such an op:
//! * a check kernel runs first and records the first error (op, row, values) in a small device
//!   buffer — the lowest offending row, with cpu-ref's priority (row convention before the op's
//!   own check);
//! * while an error is recorded, the kernels of these ops (embed, gather_rows, rope,
//!   window_store, sparse_attention, compressor, indexer_topk, moe_gate, moe_experts) return at
//!   once, so the failing op — and every later such op until the error is reported — leaves its
//!   outputs and caches untouched; independently of that, no kernel reads or writes out of
//!   bounds on bad values (they are skipped or clamped);
//! * the next [`Backend::synchronize`] or [`Backend::download`] waits for the stream, reads the
//!   buffer and returns `hal::Error::InvalidArgument` with cpu-ref's context ("compressor row 3")
//!   and message, then clears it; work issued after the clear runs normally.
//!
//! So an `InvalidArgument` from `synchronize`/`download` may come from any op issued since the
//! previous one; outputs written by ops issued after the failing one are unspecified.

mod calibrate;
mod cublas;
pub mod device;
pub mod kernels;
mod memo;
pub mod ops;
pub mod record;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use cudarc::driver::CudaContext;
use hal::backend::{Backend, BackendInfo, Calibration, PendingDownload, Probe, Recording, Support};
use hal::{DType, Error, Op, Result, Tensor};

use device::{driver_err, CudaStorage, Dev, BACKEND_NAME, ERR_WORDS};

/// The CUDA backend: one device, one context, one stream.
pub struct CudaBackend {
    info: BackendInfo,
    dev: Arc<Dev>,
}

/// Probes device 0. Unavailable (never a panic) when libcuda, a device or libnvrtc is missing.
pub fn probe() -> Probe {
    match CudaBackend::new(0) {
        Ok(b) => Probe::Available(Box::new(b)),
        Err(reason) => Probe::Unavailable(reason),
    }
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

impl CudaBackend {
    /// The backend on device `ordinal`, or the reason it cannot run here.
    pub fn new(ordinal: usize) -> std::result::Result<Self, String> {
        // SAFETY: only tries to dlopen the candidate library names.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err("libcuda not found (looked for libcuda.so / libcuda.so.1 via the dynamic loader)".into());
        }
        let ctx = catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|p| format!("the CUDA driver panicked while creating a context: {}", panic_text(p)))?
            .map_err(|e| format!("no usable CUDA device {ordinal}: {e:?}"))?;
        type Described = (String, (i32, i32), i32, usize, usize);
        let describe = AssertUnwindSafe(|| -> std::result::Result<Described, String> {
            let name = ctx.name().map_err(|e| format!("{e:?}"))?;
            let cc = ctx.compute_capability().map_err(|e| format!("{e:?}"))?;
            let mut version = 0;
            // SAFETY: writes one int.
            unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) };
            let optin = ctx
                .attribute(
                    cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                )
                .map_err(|e| format!("{e:?}"))?;
            let sms = ctx
                .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .map_err(|e| format!("{e:?}"))?;
            Ok((name, cc, version, optin.max(48 * 1024) as usize, sms.max(1) as usize))
        });
        let (name, (major, minor), version, optin, sms) = catch_unwind(describe)
            .map_err(|p| format!("the CUDA driver panicked while querying the device: {}", panic_text(p)))?
            .map_err(|e| format!("querying CUDA device {ordinal} failed: {e}"))?;
        let arch = format!("sm_{major}{minor}");
        if !kernels::nvrtc_present() {
            return Err("libnvrtc not found: looked for libnvrtc.so / libnvrtc.so.12 via the dynamic loader \
                 (install the CUDA toolkit's NVRTC or add its lib folder to LD_LIBRARY_PATH)"
                .into());
        }
        kernels::compile_source("probe", "extern \"C\" __global__ void v4rt_probe(float* x) { x[0] = 1.0f; }", &arch)
            .map_err(|e| format!("NVRTC cannot compile for {arch}: {e}"))?;
        let dev = catch_unwind(AssertUnwindSafe(|| Dev::new(ctx.clone(), arch.clone(), optin, sms)))
            .map_err(|p| format!("the CUDA driver panicked while creating a stream: {}", panic_text(p)))?
            .map_err(|e| format!("creating a CUDA stream failed: {e:?}"))?;
        let device = format!("{name}, {arch}, driver {}.{}", version / 1000, (version % 1000) / 10);
        Ok(CudaBackend { info: BackendInfo { name: BACKEND_NAME, device }, dev: Arc::new(dev) })
    }

    /// The storage behind `t` if this backend made it.
    fn storage<'a>(&self, t: &'a Tensor, what: impl FnOnce() -> String) -> Result<&'a CudaStorage> {
        let owner = t.storage().backend();
        match t.storage().as_any().downcast_ref::<CudaStorage>() {
            Some(s) if s.owner == self.dev.id => Ok(s),
            Some(_) => Err(Error::invalid(what(), "tensor belongs to another cuda backend instance")),
            None => Err(Error::invalid(what(), format!("tensor belongs to backend '{owner}', not {BACKEND_NAME}"))),
        }
    }

    fn storage_mut<'a>(&self, t: &'a mut Tensor, what: impl FnOnce() -> String) -> Result<&'a mut CudaStorage> {
        let owner = t.storage().backend();
        let id = self.dev.id;
        match t.storage_mut().as_any_mut().downcast_mut::<CudaStorage>() {
            Some(s) if s.owner == id => Ok(s),
            Some(_) => Err(Error::invalid(what(), "tensor belongs to another cuda backend instance")),
            None => Err(Error::invalid(what(), format!("tensor belongs to backend '{owner}', not {BACKEND_NAME}"))),
        }
    }

    /// After the stream is idle: turns a recorded device-side argument error into an error (and
    /// clears it), and reports driver errors recorded by drops.
    fn take_device_error(&self) -> Result<()> {
        let _err = self.dev.err.lock().unwrap_or_else(|p| p.into_inner());
        let words = self.dev.copy_out(0, &mut [])?;
        self.settle_device_error(words)
    }

    /// Reports driver errors recorded by drops, then turns the error words read by
    /// [`Dev::copy_out`] (with `Dev::err` locked by the caller since) into an error, clearing them.
    fn settle_device_error(&self, words: [i64; ERR_WORDS]) -> Result<()> {
        let dev = &self.dev;
        dev.ctx.check_err().map_err(driver_err)?;
        if words[0] == 0 {
            return Ok(());
        }
        // Checks issued while the error was recorded did nothing: forget what they "established".
        dev.memo.clear();
        dev.zero(dev.err_ptr, device::ERR_BYTES)?;
        dev.stream.synchronize().map_err(driver_err)?;
        Err(ops::format_device_error(&words))
    }
}

/// A [`Backend::download_later`] of this backend.
struct PendingTensor<'b> {
    backend: &'b CudaBackend,
    copy: device::PendingCopy<'b>,
}

impl PendingDownload for PendingTensor<'_> {
    fn wait(self: Box<Self>) -> Result<Vec<u8>> {
        let (words, data) = self.copy.wait()?;
        // As `download` does: the words are settled with the error buffer locked.
        let _err = self.backend.dev.err.lock().unwrap_or_else(|p| p.into_inner());
        self.backend.settle_device_error(words)?;
        Ok(data)
    }
}

fn byte_len(shape: &[usize], dtype: DType) -> Result<usize> {
    shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::invalid("alloc", format!("{dtype} {shape:?} overflows the address space")))
}

impl Backend for CudaBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    /// Every op runs here, except: an embedding table that is not f32/bf16/f16; sizes whose
    /// kernels need more shared memory than the device offers (SparseAttention head_dim above
    /// about 19K, Compressor width above about 19K (rotated: 9K), IndexerTopK with
    /// min(topk, capacity) above 2^14 on a 227 KiB device); MoeExperts with more than 65535 experts.
    fn supports(&self, op: &Op) -> Support {
        match ops::unsupported(&self.dev, op) {
            Some(reason) => Support::No(reason),
            None => Support::Yes,
        }
    }

    /// Uninitialized, as the HAL contract allows: zero-filling every op output cost one memset
    /// launch per op. Every kernel writes all of its outputs (the conformance suite poisons them
    /// before each run to prove it).
    fn alloc(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let bytes = byte_len(shape, dtype)?;
        let buf = self.dev.tensor_buffer(bytes)?;
        Ok(Tensor::from_storage(Box::new(self.dev.storage(buf, bytes)), shape.to_vec(), dtype))
    }

    fn upload(&self, shape: &[usize], dtype: DType, bytes: &[u8]) -> Result<Tensor> {
        self.dev.not_recording("upload")?;
        let want = byte_len(shape, dtype)?;
        if bytes.len() != want {
            return Err(Error::invalid("upload", format!("{dtype} {shape:?} needs {want} bytes, got {}", bytes.len())));
        }
        let buf = self.dev.tensor_buffer(want)?;
        if want > 0 {
            self.dev.copy_in(buf.ptr(), bytes)?;
        }
        Ok(Tensor::from_storage(Box::new(self.dev.storage(buf, want)), shape.to_vec(), dtype))
    }

    fn write(&self, t: &mut Tensor, offset: usize, bytes: &[u8]) -> Result<()> {
        self.dev.not_recording("write")?;
        let (len, size) = (t.len_bytes(), t.dtype().size());
        let start = offset.checked_mul(size);
        let end = start.and_then(|s| s.checked_add(bytes.len())).filter(|&e| e <= len);
        let (Some(start), Some(end)) = (start, end) else {
            return Err(Error::invalid(
                "write",
                format!("{} bytes at element {offset} overrun the {len}-byte tensor {t:?}", bytes.len()),
            ));
        };
        let s = self.storage_mut(t, || "write".into())?;
        if end > start {
            self.dev.memo.written((s.buf.ptr() + start as u64, end - start));
            self.dev.copy_in(s.buf.ptr() + start as u64, bytes)?;
        }
        Ok(())
    }

    fn download(&self, t: &Tensor) -> Result<Vec<u8>> {
        self.dev.not_recording("download")?;
        let s = self.storage(t, || "download".into())?;
        let mut out = vec![0u8; s.len];
        let _err = self.dev.err.lock().unwrap_or_else(|p| p.into_inner());
        let words = self.dev.copy_out(s.buf.ptr(), &mut out)?;
        self.settle_device_error(words)?;
        Ok(out)
    }

    /// The tensor and the deferred-error words land in page-locked memory; `wait` waits on an
    /// event recorded after the copies, not on the stream.
    fn download_later(&self, t: &Tensor) -> Result<Box<dyn PendingDownload + '_>> {
        self.dev.not_recording("download_later")?;
        let s = self.storage(t, || "download_later".into())?;
        Ok(Box::new(PendingTensor { backend: self, copy: self.dev.copy_out_later(s.buf.ptr(), s.len)? }))
    }

    fn run(&self, op: &Op, inputs: &[&Tensor], outputs: &mut [&mut Tensor]) -> Result<()> {
        op.validate(inputs, outputs)?;
        if let Support::No(reason) = self.supports(op) {
            return Err(Error::Unsupported { backend: BACKEND_NAME.into(), op: op.name().into(), reason });
        }
        let sig = op.signature();
        let mut ins = Vec::with_capacity(inputs.len());
        for (t, spec) in inputs.iter().zip(&sig.inputs) {
            let s = self.storage(t, || format!("{} input '{}'", op.name(), spec.name))?;
            ins.push(s.buf.ptr());
        }
        let mut outs = Vec::with_capacity(outputs.len());
        let mut written = Vec::with_capacity(outputs.len());
        for (t, spec) in outputs.iter_mut().zip(&sig.outputs) {
            let s = self.storage_mut(t, || format!("{} output '{}'", op.name(), spec.name))?;
            let p = s.buf.ptr();
            outs.push(p);
            written.push((p, s.len));
        }
        // What the memo derived from the outputs' bytes goes before the op's kernels are issued.
        for w in written {
            self.dev.memo.written(w);
        }
        ops::dispatch(&self.dev, op, &ins, &outs)
    }

    fn synchronize(&self) -> Result<()> {
        self.dev.not_recording("synchronize")?;
        self.dev.stream.synchronize().map_err(driver_err)?;
        self.take_device_error()
    }

    /// Copy bandwidth (`cuMemcpyDtoDAsync`, 1 GiB) and the rate of our own f32 SIMT GEMM
    /// (4096³); see the `calibrate` module for the method.
    fn calibrate(&self) -> Result<Calibration> {
        self.dev.not_recording("calibrate")?;
        self.take_device_error()?;
        calibrate::calibrate(&self.dev)
    }

    /// `first` on a second stream that forks from the backend's stream and joins it again
    /// (captured as two branches of the graph inside a recording); see `Dev::concurrently`.
    fn concurrently(
        &self,
        first: &mut dyn FnMut() -> Result<()>,
        second: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        self.dev.concurrently(first, second)
    }

    /// A CUDA graph captured from the stream ([`record`]); the graph runs once before this
    /// returns.
    fn record(&self, ops: &mut dyn FnMut() -> Result<()>) -> Result<Option<Box<dyn Recording>>> {
        record::record(&self.dev, ops).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_without_libcuda_is_unavailable_and_does_not_panic() {
        // SAFETY: only dlopen attempts.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            eprintln!("SKIPPED: libcuda is present on this machine; the no-driver path cannot be tested here");
            return;
        }
        match probe() {
            Probe::Available(_) => panic!("probe claimed a CUDA device without libcuda"),
            Probe::Unavailable(reason) => assert!(reason.contains("libcuda"), "{reason}"),
        }
    }

    #[test]
    fn device_errors_use_cpu_ref_messages() {
        let e = ops::format_device_error(&[ops::E_NOT_CONTIG, ops::op_id("compressor") as i64, 3, 1, 0, 0, 0, 0]);
        assert_eq!(e.to_string(), "compressor row 3: rows of slot 1 are not contiguous (previous one is row 0)");
        let e = ops::format_device_error(&[ops::E_GATHER, ops::op_id("gather_rows") as i64, 2, 9, 4, 0, 0, 0]);
        assert_eq!(e.to_string(), "gather_rows index 2: row 9 outside [0, 4)");
        let e = ops::format_device_error(&[ops::E_SEES, ops::op_id("sparse_attention") as i64, 0, 7, 2, 1, 0, 0]);
        assert_eq!(e.to_string(), "sparse_attention row 0: position 7 sees 2 compressed entries, capacity is 1");
    }
}
