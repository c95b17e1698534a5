//! # v4rt-ascend — the Ascend (Huawei NPU) backend
//!
//! CANN is loaded at run time, never linked: a machine without it still builds and runs
//! everything else, and [`probe`] says why the backend is unavailable. Layout:
//!
//! * [`sys`] — the C surface we bind (types, enum values, status codes, function-pointer
//!   tables), checked against the real ACL/HCCL headers by `tests/abi_headers.rs`.
//! * [`loader`] — finds the toolkit and resolves every symbol once.
//! * [`runtime`] — ACL init, per-thread device binding, streams, events, the device memory
//!   pool, pinned staging memory, and status → [`hal::Error`] conversion.
//! * [`ops`] — the HAL ops, one file per `hal::ops` family, built from aclnn two-phase calls.
//! * [`AscendBackend`] (this file) — the [`hal::Backend`] implementation and the SoC profile.
//!
//! Without hardware, the crate is exercised through `v4rt-cann-emu`, a strict emulator of the
//! same C ABI, loaded through the unchanged production loader (see `README.md`).

pub mod hccl;
pub mod loader;
pub mod ops;
pub mod runtime;
pub mod sys;

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hal::backend::{Backend, BackendInfo, Numerics, Probe, Support};
use hal::{DType, Error, Op, Result, Storage, Tensor};

use loader::SearchConfig;
use runtime::{DeviceBuffer, DevicePtr, PinnedBuffer, Pool, Runtime, Stream, BACKEND};

/// Which Ascend generation the device is, as far as compute formats go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocFamily {
    /// Atlas A2 (910B): BF16/FP16/INT8 cube, no FP8/FP4.
    Ascend910B,
    /// Atlas A3 (910C, two dies each seen as a device): like the 910B for formats.
    Ascend910C,
    /// Ascend 950PR/950DT: adds FP8 (E4M3/E5M2), HiF8, MXFP8/MXFP4.
    Ascend950,
    /// Anything else: treated conservatively (no FP8/FP4).
    Other,
}

/// What the device can compute, derived from `aclrtGetSocName()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocProfile {
    /// The SoC name as ACL reports it.
    pub soc_name: String,
    pub family: SocFamily,
    /// FP8 matmul inputs (E4M3/E5M2) are supported by the cube unit.
    pub fp8_compute: bool,
    /// FP4 (E2M1, MX) matmul inputs are supported.
    pub fp4_compute: bool,
}

impl SocProfile {
    /// Maps an SoC name to its profile. The 910C ("A3") names are not verified; any other
    /// `Ascend910*` is treated like a 910B, and unknown names get no FP8/FP4.
    pub fn from_soc_name(name: &str) -> SocProfile {
        let family = if name.starts_with("Ascend950") {
            SocFamily::Ascend950
        } else if name.starts_with("Ascend910_93") || name.starts_with("Ascend910C") {
            SocFamily::Ascend910C
        } else if name.starts_with("Ascend910") {
            SocFamily::Ascend910B
        } else {
            SocFamily::Other
        };
        let low_precision = family == SocFamily::Ascend950;
        SocProfile { soc_name: name.to_string(), family, fp8_compute: low_precision, fp4_compute: low_precision }
    }
}

/// A tensor's device memory. Never dereferenced on the host: only its address is handed to
/// ACL, and its bytes reach the host only through [`Backend::download`].
pub struct AscendStorage {
    buf: DeviceBuffer,
    /// Process-unique id and write generation: a load-time weight copy records them of the
    /// scale tensor it was decoded with (`ops::lowp`), so that a later write to it is noticed.
    uid: u64,
    generation: AtomicU64,
    /// This weight's load-time FP8/FP4 → BF16 copy made by `prepare` (`ops::lowp`); dropped
    /// when the tensor's bytes are written.
    converted: Mutex<Option<Arc<ops::lowp::Converted>>>,
    /// For a small INT32 tensor whose bytes came from the host (`upload`, `write`): those
    /// bytes, so that ops reading row metadata (slots, positions, ids) need no device→host copy
    /// and stream drain. Dropped when a device op or collective writes the tensor.
    host: Mutex<Option<Arc<Vec<u8>>>>,
}

/// Largest INT32 tensor whose host bytes are kept ([`AscendStorage`]`::host`): row metadata is
/// a few values per row.
const HOST_COPY_MAX: usize = 64 << 10;

/// Next [`AscendStorage`] id (a device address would not do: the pool reuses them).
static NEXT_UID: AtomicU64 = AtomicU64::new(1);

impl AscendStorage {
    /// Storage for a fresh tensor: a new id, generation 0, nothing derived.
    fn new(buf: DeviceBuffer) -> AscendStorage {
        AscendStorage {
            buf,
            uid: NEXT_UID.fetch_add(1, Ordering::Relaxed),
            generation: AtomicU64::new(0),
            converted: Mutex::new(None),
            host: Mutex::new(None),
        }
    }

    /// The host bytes of a small INT32 tensor, if its contents came from the host.
    pub(crate) fn host_bytes(&self) -> Option<Arc<Vec<u8>>> {
        lock(&self.host).clone()
    }

    /// The bytes are about to change (`write`, or an op output): drop what `prepare` derived
    /// from them, and make copies of other tensors decoded with them (as a scale) stale.
    pub(crate) fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        lock(&self.converted).take();
        lock(&self.host).take();
    }

    /// The device address (an opaque number; reading it on the host faults).
    pub fn device_ptr(&self) -> DevicePtr {
        self.buf.ptr()
    }
}

impl Storage for AscendStorage {
    fn backend(&self) -> &'static str {
        BACKEND
    }
    fn len_bytes(&self) -> usize {
        self.buf.len()
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// Host-side state of the issue path, behind one lock so that work is issued in order.
pub(crate) struct IssueState {
    /// Staging buffers whose copies may still be queued (freed or reused after a sync).
    pending: Vec<PinnedBuffer>,
    pending_bytes: usize,
    /// Staging buffers known idle.
    idle: Vec<PinnedBuffer>,
    /// All-ones weights for weightless RMSNorm, by length.
    pub(crate) ones: std::collections::HashMap<usize, DeviceBuffer>,
    /// Normalized Hadamard matrices `H_n / sqrt(n)` (f32 `[n, n]`), by `n`.
    pub(crate) hadamard: std::collections::HashMap<usize, DeviceBuffer>,
    /// Decode tables for FP8/FP4/E8M0 codes (f32), by name.
    pub(crate) luts: std::collections::HashMap<&'static str, DeviceBuffer>,
    /// FP8/FP4 weights: the load-time copies of the op being issued, and counters.
    pub(crate) lowp: ops::lowp::LowpState,
    /// Host copies of the op being issued's small INT32 inputs, by device address.
    pub(crate) host_inputs: Vec<(DevicePtr, Arc<Vec<u8>>)>,
    /// Index reads answered from host copies / from the device (a D2H and a stream drain each).
    pub(crate) index_reads: IndexReads,
}

/// How the ops' reads of index inputs (slots, positions, ids, selections) were served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexReads {
    /// From the host copy of an uploaded/written tensor: no device traffic.
    pub host: u64,
    /// From the device: a device→host copy and a stream drain.
    pub device: u64,
}

/// Pending staging memory above which an upload first drains the stream (bounds host memory
/// while loading weights without synchronizing).
const STAGING_LIMIT: usize = 256 << 20;
/// Idle staging memory kept for reuse; the rest is freed.
const STAGING_KEEP: usize = 64 << 20;

/// The Ascend backend: one device, one stream, one memory pool.
pub struct AscendBackend {
    info: BackendInfo,
    rt: Arc<Runtime>,
    device: i32,
    stream: Arc<Stream>,
    pool: Arc<Pool>,
    profile: SocProfile,
    /// Use CANN's fused DeepSeek-V4 ops where they apply (`V4RT_ASCEND_OPS`, default on).
    fused_ops: bool,
    /// CANN `(major, minor)` when `aclsysGetVersionStr` reports one (fused-op gating).
    cann_version: Option<(u32, u32)>,
    issue: Mutex<IssueState>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Probes the backend on device `V4RT_ASCEND_DEVICE` (default 0) with the documented toolkit
/// search order. Never panics: every failure is an `Unavailable` reason naming what was
/// looked for where.
pub fn probe() -> Probe {
    let device = match std::env::var("V4RT_ASCEND_DEVICE") {
        Ok(v) => match v.trim().parse::<i32>() {
            Ok(d) if d >= 0 => d,
            _ => return Probe::Unavailable(format!("V4RT_ASCEND_DEVICE={v:?} is not a device index")),
        },
        Err(_) => 0,
    };
    match AscendBackend::open(&SearchConfig::from_env(), device) {
        Ok(b) => Probe::Available(Box::new(b)),
        Err(reason) => Probe::Unavailable(reason),
    }
}

impl AscendBackend {
    /// Loads CANN (once per process), initializes ACL, and opens `device` with a new stream.
    pub fn open(cfg: &SearchConfig, device: i32) -> std::result::Result<AscendBackend, String> {
        let fused_ops = ops::fused::policy_from_env()?;
        let rt = Runtime::global(cfg)?;
        let count = rt.device_count().map_err(|e| e.to_string())?;
        if count == 0 {
            return Err("CANN is installed but reports no NPU (aclrtGetDeviceCount = 0)".into());
        }
        if device < 0 || device as u32 >= count {
            return Err(format!("device {device} requested, {count} visible"));
        }
        let stream = Stream::new(rt.clone(), device).map_err(|e| e.to_string())?;
        let pool = Pool::new(stream.clone());
        let soc = rt.soc_name().unwrap_or_else(|| "unknown SoC".into());
        let profile = SocProfile::from_soc_name(&soc);
        let mem = rt
            .mem_info(device)
            .map(|(free, total)| {
                format!(
                    ", {:.1}/{:.1} GiB HBM free",
                    free as f64 / (1u64 << 30) as f64,
                    total as f64 / (1u64 << 30) as f64
                )
            })
            .unwrap_or_default();
        let api = rt.api();
        let hccl = if api.hccl.is_some() { ", HCCL" } else { "" };
        let version_str = rt.cann_version();
        let cann_version = version_str.as_deref().and_then(ops::fused::parse_version);
        let fused = sys::FusedOps::NAMES.len() - api.fused.missing().len();
        let path = if fused_ops {
            format!("fused ops: {fused}/{} exported", sys::FusedOps::NAMES.len())
        } else {
            "fused ops off".into()
        };
        let version = version_str.map(|v| format!("CANN {v}, ")).unwrap_or_default();
        let device_desc = format!("{soc} (device {device}{mem}, {version}{}{hccl}, {path})", api.opapi);
        // How FP8/FP4 checkpoint weights run here: converted once by `prepare` (ops::lowp).
        let device_desc = if profile.fp8_compute {
            device_desc
        } else {
            format!("{device_desc}, FP8/FP4 weights → BF16 at load (no FP8/FP4 compute)")
        };
        Ok(AscendBackend {
            info: BackendInfo { name: BACKEND, device: device_desc },
            rt,
            device,
            stream,
            pool,
            profile,
            fused_ops,
            cann_version,
            issue: Mutex::new(IssueState {
                pending: Vec::new(),
                pending_bytes: 0,
                idle: Vec::new(),
                ones: Default::default(),
                hadamard: Default::default(),
                luts: Default::default(),
                lowp: Default::default(),
                host_inputs: Vec::new(),
                index_reads: IndexReads::default(),
            }),
        })
    }

    /// The fused CANN kernel `op` runs through here, if any (`None`: its composition).
    pub fn fused_kernel(&self, op: &Op) -> Option<&'static str> {
        let api = self.rt.api();
        if !self.fused_ops {
            return None;
        }
        ops::fused::kernel_for(op, &api.fused, &api.ops, &self.profile, self.cann_version)
    }

    /// How index inputs read by ops were served so far (host copies vs device reads).
    pub fn index_reads(&self) -> IndexReads {
        lock(&self.issue).index_reads
    }

    /// The SoC profile (what formats the device computes natively).
    pub fn profile(&self) -> &SocProfile {
        &self.profile
    }
    /// The process runtime (function tables, status conversion).
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.rt
    }
    /// This backend's stream.
    pub fn stream(&self) -> &Arc<Stream> {
        &self.stream
    }
    /// This backend's device memory pool.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
    /// The device index.
    pub fn device(&self) -> i32 {
        self.device
    }

    /// The storage behind `t`, checked to be ours (this backend instance, not just any Ascend
    /// backend: another instance has another stream, and ordering across streams is not free).
    fn storage<'t>(&self, t: &'t Tensor, what: impl Fn() -> String) -> Result<&'t AscendStorage> {
        let owner = t.storage().backend();
        let s = t
            .storage()
            .as_any()
            .downcast_ref::<AscendStorage>()
            .ok_or_else(|| Error::invalid(what(), format!("tensor belongs to backend '{owner}', not {BACKEND}")))?;
        if !Arc::ptr_eq(s.buf.pool(), &self.pool) {
            return Err(Error::invalid(
                what(),
                "tensor belongs to another ascend backend instance (another stream); copy it through the host",
            ));
        }
        Ok(s)
    }

    /// A staging buffer of at least `len` bytes, reusing an idle one when possible.
    fn staging(&self, st: &mut IssueState, len: usize) -> Result<PinnedBuffer> {
        if let Some(i) = st.idle.iter().position(|b| b.capacity() >= len) {
            return Ok(st.idle.swap_remove(i));
        }
        PinnedBuffer::new(self.rt.clone(), len)
    }

    /// After a synchronize: every pending staging buffer is idle again.
    fn recycle(&self, st: &mut IssueState) {
        st.idle.append(&mut st.pending);
        st.pending_bytes = 0;
        st.idle.sort_by_key(|b| b.capacity());
        let mut kept = 0;
        st.idle.retain(|b| {
            kept += b.capacity();
            kept <= STAGING_KEEP
        });
    }

    fn sync_locked(&self, st: &mut IssueState) -> Result<()> {
        let r = self.stream.synchronize();
        // Even after a fault the queued copies are gone (executed or discarded).
        self.recycle(st);
        r
    }

    /// Enqueues `bytes` → device address `dst` (capacity `cap`) through a staging buffer.
    pub(crate) fn h2d_locked(&self, st: &mut IssueState, dst: DevicePtr, cap: usize, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        if st.pending_bytes + bytes.len() > STAGING_LIMIT && !st.pending.is_empty() {
            self.sync_locked(st)?;
        }
        let mut stage = self.staging(st, bytes.len())?;
        stage.as_mut_slice()[..bytes.len()].copy_from_slice(bytes);
        // SAFETY: `stage` is pinned memory that moves into `pending` below and is only
        // reused or freed after the stream has been synchronized.
        unsafe { self.stream.copy_h2d_async(dst, cap, stage.as_ptr(), bytes.len())? };
        st.pending_bytes += stage.capacity();
        st.pending.push(stage);
        Ok(())
    }

    /// Copies `len` bytes at device address `src` to the host, after all issued work.
    pub(crate) fn d2h_locked(&self, st: &mut IssueState, src: DevicePtr, len: usize) -> Result<Vec<u8>> {
        if len == 0 {
            self.sync_locked(st)?;
            return Ok(Vec::new());
        }
        let mut stage = self.staging(st, len)?;
        let cap = stage.capacity();
        // SAFETY: `stage` is pinned, stays alive in this frame, and is read only after the
        // synchronize below.
        let r = unsafe { self.stream.copy_d2h_async(stage.as_mut_ptr(), cap, src, len) };
        let r = r.and_then(|()| self.sync_locked(st));
        let out = r.map(|()| stage.as_slice()[..len].to_vec());
        st.idle.push(stage);
        out
    }

    fn lock_issue(&self) -> Result<MutexGuard<'_, IssueState>> {
        self.rt.bind(self.device)?;
        Ok(lock(&self.issue))
    }
}

impl Drop for AscendBackend {
    fn drop(&mut self) {
        // Staging buffers may still be read by queued copies; drain before they are freed.
        let _ = self.stream.synchronize();
    }
}

/// Bytes of a `shape` × `dtype` tensor, or an error on overflow.
fn byte_len(shape: &[usize], dtype: DType) -> Result<usize> {
    shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::invalid("alloc", format!("{dtype} {shape:?} overflows the address space")))
}

impl Backend for AscendBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn supports(&self, op: &Op) -> Support {
        if self.fused_kernel(op).is_some() {
            return Support::Yes;
        }
        ops::supports(op, &self.rt.api().ops, &self.profile)
    }

    fn numerics(&self, op: &Op) -> Numerics {
        ops::fused::numerics(self.fused_kernel(op))
    }

    fn alloc(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let bytes = byte_len(shape, dtype)?;
        self.rt.bind(self.device)?;
        let buf = self.pool.alloc(bytes)?;
        Ok(Tensor::from_storage(Box::new(AscendStorage::new(buf)), shape.to_vec(), dtype))
    }

    fn upload(&self, shape: &[usize], dtype: DType, bytes: &[u8]) -> Result<Tensor> {
        let want = byte_len(shape, dtype)?;
        if bytes.len() != want {
            return Err(Error::invalid("upload", format!("{dtype} {shape:?} needs {want} bytes, got {}", bytes.len())));
        }
        let mut st = self.lock_issue()?;
        let buf = self.pool.alloc(want)?;
        self.h2d_locked(&mut st, buf.ptr(), buf.capacity(), bytes)?;
        let storage = AscendStorage::new(buf);
        if dtype == DType::I32 && want <= HOST_COPY_MAX {
            *lock(&storage.host) = Some(Arc::new(bytes.to_vec()));
        }
        Ok(Tensor::from_storage(Box::new(storage), shape.to_vec(), dtype))
    }

    fn write(&self, t: &mut Tensor, offset: usize, bytes: &[u8]) -> Result<()> {
        let (len, size) = (t.len_bytes(), t.dtype().size());
        let start = offset.checked_mul(size);
        let end = start.and_then(|s| s.checked_add(bytes.len())).filter(|&e| e <= len);
        let (Some(start), Some(_)) = (start, end) else {
            return Err(Error::invalid(
                "write",
                format!("{} bytes at element {offset} overrun the {len}-byte tensor {t:?}", bytes.len()),
            ));
        };
        let s = self.storage(t, || "write".into())?;
        let host = s.host_bytes();
        s.invalidate();
        // Keep the host copy current (patched, or made when the whole tensor is written).
        let patched = match host {
            Some(h) => Some((*h).clone()),
            None if t.dtype() == DType::I32 && start == 0 && bytes.len() == len && len <= HOST_COPY_MAX => {
                Some(vec![0; len])
            }
            None => None,
        };
        if let Some(mut h) = patched {
            h[start..start + bytes.len()].copy_from_slice(bytes);
            *lock(&s.host) = Some(Arc::new(h));
        }
        let (dst, cap) = (s.buf.ptr().offset(start), s.buf.capacity() - start);
        let mut st = self.lock_issue()?;
        self.h2d_locked(&mut st, dst, cap, bytes)
    }

    fn download(&self, t: &Tensor) -> Result<Vec<u8>> {
        let s = self.storage(t, || "download".into())?;
        let mut st = self.lock_issue()?;
        self.d2h_locked(&mut st, s.buf.ptr(), s.buf.len())
    }

    fn run(&self, op: &Op, inputs: &[&Tensor], outputs: &mut [&mut Tensor]) -> Result<()> {
        op.validate(inputs, outputs)?;
        // The path is chosen once per call: the fused kernel when one applies, else the
        // composition (which `supports` then vouches for).
        let fused_path = self.fused_kernel(op).is_some();
        if !fused_path {
            if let Support::No(reason) = ops::supports(op, &self.rt.api().ops, &self.profile) {
                return Err(Error::Unsupported { backend: BACKEND.into(), op: op.name().into(), reason });
            }
        }
        let sig = op.signature();
        let in_st = inputs
            .iter()
            .zip(&sig.inputs)
            .map(|(t, spec)| self.storage(t, || format!("{} input '{}'", op.name(), spec.name)))
            .collect::<Result<Vec<_>>>()?;
        let ins: Vec<ops::Buf> = in_st.iter().map(|s| ops::Buf::of(&s.buf)).collect();
        let outs = outputs
            .iter()
            .zip(&sig.outputs)
            .map(|(t, spec)| {
                // The op writes it: whatever `prepare` derived from its bytes is stale.
                self.storage(t, || format!("{} output '{}'", op.name(), spec.name)).map(|s| {
                    s.invalidate();
                    ops::Buf::of(&s.buf)
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let copies = ops::lowp::attached(op, &in_st);
        let host_inputs = in_st.iter().filter_map(|s| s.host_bytes().map(|h| (s.device_ptr(), h))).collect();
        let mut st = self.lock_issue()?;
        st.host_inputs = host_inputs;
        // This op's load-time weight copies (ops::lowp); every run replaces them.
        st.lowp.current = copies;
        let mut cx = ops::Ctx { be: self, st: &mut st };
        ops::dispatch(&mut cx, op, &ins, &outs, fused_path)
    }

    fn prepare(&self, op: &Op, weights: &[Option<&Tensor>]) -> Result<hal::backend::Prepared> {
        // FP8/FP4 weights on a SoC without FP8/FP4 compute: one exact BF16 copy (ops::lowp).
        self.prepare_lowp(op, weights)
    }

    fn synchronize(&self) -> Result<()> {
        let mut st = self.lock_issue()?;
        self.sync_locked(&mut st)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soc_profiles() {
        let p = SocProfile::from_soc_name("Ascend910B3");
        assert_eq!((p.family, p.fp8_compute), (SocFamily::Ascend910B, false));
        assert_eq!(SocProfile::from_soc_name("Ascend910_9391").family, SocFamily::Ascend910C);
        let p = SocProfile::from_soc_name("Ascend950PR");
        assert_eq!((p.family, p.fp8_compute, p.fp4_compute), (SocFamily::Ascend950, true, true));
        assert!(!SocProfile::from_soc_name("Ascend310P3").fp8_compute);
    }
}
