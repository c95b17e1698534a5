//! Device memory of the CUDA backend: [`CudaStorage`], the backend's context, its stream and the
//! side stream of `Backend::concurrently`, scratch buffers, the deferred-error word, and the
//! mapping of driver errors to `hal::Error`.

use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::result::DriverError;
use cudarc::driver::sys::CUresult;
use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice};
use hal::{Error, Result, Storage};

use crate::kernels::Loaded;
use crate::memo::Memo;
use crate::record::Arena;

/// Name every CUDA storage reports as its owner.
pub const BACKEND_NAME: &str = "cuda";

/// Words of the deferred-error buffer (see the crate docs): code, op, row, three values, spare.
pub(crate) const ERR_WORDS: usize = 8;
/// Bytes of the deferred-error buffer.
pub(crate) const ERR_BYTES: usize = ERR_WORDS * std::mem::size_of::<i64>();

/// Largest download that goes through pinned memory ([`Dev::copy_out`]; larger ones, such as a
/// saved cache, are copied into pageable memory directly rather than pinning that much).
const PINNED_MAX: usize = 16 << 20;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Device bytes of a tensor or of an op's scratch, at least one byte (so that empty tensors still
/// have a valid pointer): a stream-ordered allocation from the device's memory pool, freed in
/// stream order on drop, or, while a recording is captured, a block of its arena
/// (`record::Arena`), handed back to it on drop.
pub(crate) struct DevBuf {
    ptr: u64,
    home: Home,
    /// Where a buffer dropped while two op sequences may run side by side waits until they have
    /// both finished (see [`Dev::concurrently`]).
    defer: Option<Arc<Deferred>>,
}

enum Home {
    Pool(#[allow(dead_code)] CudaSlice<u8>), // held for its stream-ordered free on drop
    Arena(Arc<Arena>, usize),
    /// Moved to a deferred list.
    Moved,
}

/// Buffers dropped inside `Backend::concurrently`, freed when it returns (`None` outside).
pub(crate) type Deferred = Mutex<Option<Vec<DevBuf>>>;

impl DevBuf {
    /// Device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub(crate) fn in_arena(ptr: u64, arena: Arc<Arena>, block: usize) -> DevBuf {
        DevBuf { ptr, home: Home::Arena(arena, block), defer: None }
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        // Inside `concurrently` a freed block could be handed to an op of one sequence while
        // the other still reads it: it is held until both have finished.
        if let Some(defer) = self.defer.take() {
            let mut held = defer.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(list) = held.as_mut() {
                let home = std::mem::replace(&mut self.home, Home::Moved);
                list.push(DevBuf { ptr: self.ptr, home, defer: None });
                return;
            }
        }
        if let Home::Arena(arena, block) = &self.home {
            arena.give_back(self.ptr, *block);
        }
    }
}

/// A CUDA tensor's bytes: one device allocation, made and used on the owning backend's stream.
pub struct CudaStorage {
    pub(crate) buf: DevBuf,
    /// Logical size in bytes.
    pub(crate) len: usize,
    /// Id of the backend instance that made it.
    pub(crate) owner: u64,
}

impl Storage for CudaStorage {
    fn backend(&self) -> &'static str {
        BACKEND_NAME
    }
    fn len_bytes(&self) -> usize {
        self.len
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// Which kernels may be scheduled while their predecessor runs (programmatic dependent launch).
/// Every kernel waits for its predecessor before it touches activations (common.cuh). Measured
/// on an H100 (docs/performance.md): in a replayed graph an early start buys only the work a
/// kernel does before that wait (`ops::EARLY_WORK_KERNELS`) and costs the others 0.3–1 µs each
/// against a plain graph edge; issued by the host, an early start also hides the host's issue
/// time, and every kernel gains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DependentLaunch {
    /// `V4RT_CUDA_PDL=0`, and below sm_90: every kernel waits for its predecessor to finish.
    Off,
    /// The default on sm_90+: every kernel issued by the host, and in a recording (a CUDA graph)
    /// only the kernels of `ops::EARLY_WORK_KERNELS`.
    Auto,
    /// `V4RT_CUDA_PDL=early`: only the kernels of `ops::EARLY_WORK_KERNELS`, also when issued
    /// by the host (for A/B runs).
    EarlyWork,
    /// `V4RT_CUDA_PDL=all`: every kernel, also in a recording (for A/B runs).
    All,
}

/// One backend's device state.
pub(crate) struct Dev {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub id: u64,
    /// Largest dynamic shared memory a block may opt in to.
    pub smem_optin: usize,
    /// Streaming multiprocessors (sizes the grids of the weight-streaming kernels).
    pub sms: usize,
    /// Whether the bf16 `mma.sync` tensor-core GEMM tiles run here: sm_80 or newer, unless
    /// `V4RT_CUDA_TENSOR_CORES=0` (the CUDA-core kernels then take every size, for comparison).
    pub tensor_cores: bool,
    /// Whether one-row FP8 linears run on the e4m3 `mma.sync` GEMV (`linear_fp8_r1`): sm_89 or
    /// newer, unless `V4RT_CUDA_FP8_MMA=0` (the CUDA-core GEMV then takes them, for comparison).
    pub fp8_mma: bool,
    /// Whether the one-pair FP4 expert kernels run on f16 `mma.sync` tiles (`moe_up_fp4_r1`,
    /// `moe_down_fp4_r1`; their input staged as f16 from e4m3 codes): sm_89 or newer, unless
    /// `V4RT_CUDA_FP4_MMA=0` (the CUDA-core kernels then take them, for comparison).
    pub fp4_mma: bool,
    /// Whether sparse attention over a bf16 cache runs on bf16 `mma.sync` tiles where its
    /// head_dim and alignment allow (`sparse_attn_tc_*`): sm_80 or newer, unless
    /// `V4RT_CUDA_ATTN_MMA=0` (the warp-per-head kernel then takes every case, for comparison).
    pub attn_mma: bool,
    /// Whether the top-k of rows of at most 4096 entries ranks every entry (`topk_rank`) rather
    /// than selecting and sorting in one block (`topk_rows`): on, unless `V4RT_CUDA_TOPK_RANK=0`
    /// (for A/B runs of one binary).
    pub topk_rank: bool,
    /// Which kernels are launched with programmatic stream serialization (programmatic
    /// dependent launch, `ops::launch`); none below sm_90.
    pub dependent_launch: DependentLaunch,
    /// How `linear_fp8_r1` streams its weights: 2 (the default), an L2 prefetch of each warp's
    /// weight lines and its first weight loads issued before `griddepcontrol.wait` (common.cuh
    /// says why that is safe); 1, the same after the wait; 0, no prefetch. Set by
    /// `V4RT_CUDA_EARLY_WEIGHTS`, for A/B runs of one binary.
    pub early_weights: i32,
    /// Whether `linear_fp8_r1` act_quants its f32 row itself (the default) rather than reading
    /// the codes of a `quant_rows_e4m3` launched before it (`V4RT_CUDA_GEMV_ACT=separate`, for
    /// A/B runs of one binary).
    pub gemv_quantizes: bool,
    /// Visible keys from which `index_scores_t` gives each thread one key with all heads
    /// rather than eight threads a key (`ops::indexer`): a 256-key tile for half the SMs, or
    /// `V4RT_CUDA_INDEX_WIDE_FROM` (0: always), so that a test can run either form at any size.
    pub index_wide_from: usize,
    /// Fewest keys a `sparse_attn` split takes (`ops::attention`): 16, or
    /// `V4RT_CUDA_ATTN_SPLIT_KEYS` (for A/B runs of one binary).
    pub attn_split_keys: usize,
    /// Most weight bytes that a one-row kernel asks the L2 for before its wait (the `*_early`
    /// kernels, `ops::EARLY_WORK_KERNELS`): a third of the L2, or 0 with `V4RT_CUDA_EARLY_L2=0`
    /// (for A/B runs of one binary).
    pub early_l2_max: usize,
    /// Deferred argument errors, `ERR_WORDS` i64 (all zero: none). Locked while read and cleared.
    pub err: Mutex<CudaSlice<i64>>,
    pub err_ptr: u64,
    pub kernels: Loaded,
    /// Page-locked host memory that downloads land in (see [`Dev::copy_out`]), grown on
    /// demand and kept: a copy into it is one DMA, where a pageable destination is staged
    /// through the driver's own buffers.
    pub pinned: Mutex<Option<PinnedHostSlice<u8>>>,
    /// Page-locked buffers of finished `Dev::copy_out_later` copies, kept for the next ones
    /// (a decode loop has one or two in flight; allocating page-locked memory costs more than
    /// the copy).
    pub spare_pinned: Mutex<Vec<PinnedHostSlice<u8>>>,
    /// Whether `Backend::record` is capturing the stream now (see `record.rs`).
    pub recording: AtomicBool,
    /// Checks that passed and quantized inputs, on bytes unchanged since (see `memo.rs`).
    pub memo: Memo,
    /// Where scratch and tensors come from while a recording is captured (see `record.rs`).
    pub arena: Mutex<Option<Arc<Arena>>>,
    /// The second stream of [`Dev::concurrently`], and whether ops are issued to it now.
    pub side: Arc<CudaStream>,
    pub on_side: AtomicBool,
    /// Whether a [`Dev::concurrently`] call is under way, and the buffers dropped during it.
    pub concurrent: AtomicBool,
    pub deferred: Arc<Deferred>,
}

impl Dev {
    /// Context, streams and error word on device `ordinal`. Event tracking is turned off before
    /// any allocation: ops run on one stream, and `concurrently` orders its side stream itself,
    /// so cudarc's cross-stream events are waste.
    pub fn new(
        ctx: Arc<CudaContext>,
        arch: String,
        smem_optin: usize,
        sms: usize,
    ) -> std::result::Result<Self, DriverError> {
        // SAFETY: no slice exists yet; the side stream only runs inside `concurrently`, which
        // orders it against the main stream with events and holds back frees until its join.
        unsafe { ctx.disable_event_tracking() };
        if ctx.has_async_alloc() {
            keep_freed_memory(&ctx)?;
        }
        let stream = ctx.new_stream()?;
        let side = ctx.new_stream()?;
        let err = stream.alloc_zeros::<i64>(ERR_WORDS)?;
        let err_ptr = {
            let (p, _sync) = err.device_ptr(&stream);
            p
        };
        stream.synchronize()?;
        let cc: u32 = arch.trim_start_matches("sm_").parse().unwrap_or(0);
        let enabled = |var: &str| std::env::var(var).map_or(true, |v| v != "0");
        let tensor_cores = cc >= 80 && enabled("V4RT_CUDA_TENSOR_CORES");
        let fp8_mma = cc >= 89 && enabled("V4RT_CUDA_FP8_MMA");
        let fp4_mma = cc >= 89 && enabled("V4RT_CUDA_FP4_MMA");
        let attn_mma = cc >= 80 && enabled("V4RT_CUDA_ATTN_MMA");
        let topk_rank = enabled("V4RT_CUDA_TOPK_RANK");
        let dependent_launch = match std::env::var("V4RT_CUDA_PDL").as_deref() {
            _ if cc < 90 => DependentLaunch::Off,
            Ok("0") => DependentLaunch::Off,
            Ok("all") => DependentLaunch::All,
            Ok("early") => DependentLaunch::EarlyWork,
            _ => DependentLaunch::Auto,
        };
        let early_weights = match std::env::var("V4RT_CUDA_EARLY_WEIGHTS").as_deref() {
            Ok("0") => 0,
            Ok("1") => 1,
            _ => 2,
        };
        let gemv_quantizes = std::env::var("V4RT_CUDA_GEMV_ACT").map_or(true, |v| v != "separate");
        let index_wide_from = std::env::var("V4RT_CUDA_INDEX_WIDE_FROM")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(sms.max(1) * crate::ops::BLOCK as usize / 2);
        let attn_split_keys = std::env::var("V4RT_CUDA_ATTN_SPLIT_KEYS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&k: &usize| k > 0)
            .unwrap_or(crate::ops::attention::KEYS_PER_SPLIT);
        let l2 = ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?;
        let early_l2_max = if enabled("V4RT_CUDA_EARLY_L2") { l2.max(0) as usize / 3 } else { 0 };
        Ok(Dev {
            ctx,
            stream,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            smem_optin,
            sms: sms.max(1),
            tensor_cores,
            fp8_mma,
            fp4_mma,
            attn_mma,
            topk_rank,
            dependent_launch,
            early_weights,
            gemv_quantizes,
            index_wide_from,
            attn_split_keys,
            early_l2_max,
            err: Mutex::new(err),
            err_ptr,
            kernels: Loaded::new(arch),
            pinned: Mutex::new(None),
            spare_pinned: Mutex::new(Vec::new()),
            recording: AtomicBool::new(false),
            memo: Memo::default(),
            arena: Mutex::new(None),
            side,
            on_side: AtomicBool::new(false),
            concurrent: AtomicBool::new(false),
            deferred: Arc::new(Mutex::new(None)),
        })
    }

    /// Raw device address of a slice (for kernel arguments).
    pub fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        let (p, _sync) = s.device_ptr(&self.stream);
        p
    }

    /// A zero-filled device buffer of `bytes` (at least one byte is allocated).
    pub fn alloc_zeroed(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        self.stream.alloc_zeros::<u8>(bytes.max(1)).map_err(|e| alloc_err(e, bytes))
    }

    /// An uninitialized scratch buffer of `bytes`, from the device pool (stream-ordered) or,
    /// while recording, the recording's arena.
    pub fn scratch(&self, bytes: usize) -> Result<DevBuf> {
        if let Some(arena) = self.arena.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let mut buf = arena.take(bytes)?;
            buf.defer = Some(self.deferred.clone());
            return Ok(buf);
        }
        // Allocated on the main stream also inside `concurrently`: no buffer is freed there until
        // both sequences are done, so what the pool hands out was free before their fork.
        // SAFETY: scratch buffers are always written by a kernel before they are read.
        let slice = unsafe { self.stream.alloc::<u8>(bytes.max(1)) }.map_err(|e| alloc_err(e, bytes))?;
        Ok(DevBuf { ptr: self.ptr(&slice), home: Home::Pool(slice), defer: Some(self.deferred.clone()) })
    }

    /// An uninitialized buffer of `bytes` for a new tensor. Its address may be a freed tensor's,
    /// so the memo forgets what it derived from those bytes.
    pub fn tensor_buffer(&self, bytes: usize) -> Result<DevBuf> {
        let buf = self.scratch(bytes)?;
        self.memo.written((buf.ptr(), bytes.max(1)));
        Ok(buf)
    }

    /// Copies `bytes` to device address `dst` (stream-ordered; pageable host memory, so the
    /// call returns once the bytes are staged).
    pub fn copy_in(&self, dst: u64, bytes: &[u8]) -> Result<()> {
        self.ctx.bind_to_thread().map_err(driver_err)?;
        // SAFETY: the caller passes the address of a live allocation of at least `bytes.len()`.
        unsafe { cudarc::driver::result::memcpy_htod_async(dst, bytes, self.stream.cu_stream()) }.map_err(driver_err)
    }

    /// Copies `out.len()` bytes from device address `src` into `out` (none when `out` is empty)
    /// and returns the deferred-error words as they stand after all work issued before, waiting
    /// once for both. Both land in pinned memory first (`Dev::pinned`; data over `PINNED_MAX` goes
    /// straight into `out`), so a decode step's download is two DMA copies and one wait.
    pub fn copy_out(&self, src: u64, out: &mut [u8]) -> Result<[i64; ERR_WORDS]> {
        self.ctx.bind_to_thread().map_err(driver_err)?;
        let mut pinned = self.pinned.lock().unwrap_or_else(|p| p.into_inner());
        let staged = out.len() <= PINNED_MAX;
        let need = ERR_BYTES + if staged { out.len() } else { 0 };
        if !matches!(pinned.as_ref(), Some(p) if p.len() >= need) {
            *pinned = None;
            let len = need.next_power_of_two().max(1 << 16);
            *pinned = Some(self.page_locked(len)?);
        }
        let host = pinned.as_mut().expect("allocated above").as_mut_slice().map_err(driver_err)?;
        let (words, data) = host.split_at_mut(ERR_BYTES);
        let cu = self.stream.cu_stream();
        // SAFETY: `words` and `data` stay borrowed (and the lock held) until the synchronize
        // below has completed both copies; the caller passes the address of a live allocation of
        // at least `out.len()` bytes; `err_ptr` is ERR_WORDS i64.
        let issued = unsafe {
            cudarc::driver::result::memcpy_dtoh_async(&mut *words, self.err_ptr, cu).and_then(|()| {
                if out.is_empty() {
                    return Ok(());
                }
                let dst: &mut [u8] = if staged { &mut data[..out.len()] } else { &mut *out };
                cudarc::driver::result::memcpy_dtoh_async(dst, src, cu)
            })
        };
        // Waited for even when the second copy was refused: the first may be in flight into
        // memory that the lock is about to hand to someone else.
        let waited = self.stream.synchronize();
        issued.and(waited).map_err(driver_err)?;
        if staged && !out.is_empty() {
            out.copy_from_slice(&data[..out.len()]);
        }
        Ok(error_words(words))
    }

    /// Issues copies of the deferred-error words and of `len` bytes at device address `src`
    /// into page-locked memory, after all work issued before, and returns without waiting
    /// (`PendingCopy::wait` does).
    pub fn copy_out_later(&self, src: u64, len: usize) -> Result<PendingCopy<'_>> {
        self.ctx.bind_to_thread().map_err(driver_err)?;
        let need = ERR_BYTES + len;
        let spare = {
            let mut spares = self.spare_pinned.lock().unwrap_or_else(|p| p.into_inner());
            spares.iter().position(|p| p.len() >= need).map(|k| spares.swap_remove(k))
        };
        let mut host = match spare {
            Some(h) => h,
            None => self.page_locked(need.next_power_of_two().max(1 << 12))?,
        };
        let slice = host.as_mut_slice().map_err(driver_err)?;
        let (words, data) = slice.split_at_mut(ERR_BYTES);
        let cu = self.stream.cu_stream();
        // SAFETY: `host` moves into the returned `PendingCopy`, which waits for the copies'
        // event before it reads the bytes or lets the buffer go (`wait`, `Drop`); the caller
        // passes the address of a live allocation of at least `len` bytes.
        let issued = unsafe {
            cudarc::driver::result::memcpy_dtoh_async(&mut *words, self.err_ptr, cu).and_then(|()| {
                if len == 0 {
                    Ok(())
                } else {
                    cudarc::driver::result::memcpy_dtoh_async(&mut data[..len], src, cu)
                }
            })
        };
        let event = issued.and_then(|()| self.stream.record_event(None));
        match event {
            Ok(event) => Ok(PendingCopy { dev: self, host: Some(host), len, event }),
            Err(e) => {
                // A copy may be in flight into `host`: let it land before the buffer is freed.
                let _ = self.stream.synchronize();
                Err(driver_err(e))
            }
        }
    }

    /// `len` bytes of page-locked host memory that downloads land in.
    fn page_locked(&self, len: usize) -> Result<PinnedHostSlice<u8>> {
        // SAFETY: the bytes are only read after a copy has written them. Flags 0, not cudarc's
        // default write-combined memory, which the host reads slowly.
        unsafe { self.ctx.alloc_pinned_with_flags::<u8>(len, 0) }.map_err(|e| alloc_err(e, len))
    }

    /// Zeroes `bytes` at device address `dst` (stream-ordered).
    pub fn zero(&self, dst: u64, bytes: usize) -> Result<()> {
        self.ctx.bind_to_thread().map_err(driver_err)?;
        // SAFETY: the caller passes the address of a live allocation of at least `bytes`.
        unsafe { cudarc::driver::result::memset_d8_async(dst, 0, bytes, self.cu_stream()) }.map_err(driver_err)
    }

    /// The stream ops are issued to now: the main one, or the side stream inside the first
    /// sequence of [`Dev::concurrently`].
    pub fn cu_stream(&self) -> cudarc::driver::sys::CUstream {
        if self.on_side.load(Ordering::SeqCst) {
            self.side.cu_stream()
        } else {
            self.stream.cu_stream()
        }
    }

    /// `Backend::concurrently`: `first` on the side stream, which waits for what the main stream
    /// has issued, `second` on the main stream, which then waits for the side stream. The memo
    /// is frozen in between (a fact or copy issued on one stream is not ordered before the
    /// other's kernels; what it knew before holds for both, and what it learns is known after
    /// the join), and buffers dropped in between are freed after the join (`Deferred`). A call
    /// inside another runs its sequences in order.
    pub fn concurrently(
        &self,
        first: &mut dyn FnMut() -> Result<()>,
        second: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        if self.concurrent.swap(true, Ordering::SeqCst) {
            first()?;
            return second();
        }
        *self.deferred.lock().unwrap_or_else(|p| p.into_inner()) = Some(Vec::new());
        self.memo.freeze(true);
        let fork = self.side.join(&self.stream).map_err(driver_err);
        self.on_side.store(true, Ordering::SeqCst);
        let done_first = fork.and_then(|()| first());
        self.on_side.store(false, Ordering::SeqCst);
        let done_second = if done_first.is_ok() { second() } else { Ok(()) };
        // The join is issued whatever happened, so that the main stream (and a capture) goes on
        // after everything the side stream got.
        let joined = self.stream.join(&self.side).map_err(driver_err);
        self.memo.freeze(false);
        let held = self.deferred.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(held);
        self.concurrent.store(false, Ordering::SeqCst);
        done_first.and(done_second).and(joined)
    }

    pub fn storage(&self, buf: DevBuf, len: usize) -> CudaStorage {
        CudaStorage { buf, len, owner: self.id }
    }

    /// The loaded kernel `family::name`.
    pub fn function(&self, family: &'static str, name: &'static str) -> Result<CudaFunction> {
        self.kernels.function(&self.ctx, family, name).map_err(|m| Error::Device {
            backend: BACKEND_NAME.into(),
            code: -1,
            message: m,
        })
    }
}

/// The deferred-error words from their little-endian bytes.
fn error_words(bytes: &[u8]) -> [i64; ERR_WORDS] {
    let mut w = [0i64; ERR_WORDS];
    for (v, b) in w.iter_mut().zip(bytes.chunks_exact(8)) {
        *v = i64::from_le_bytes(b.try_into().expect("8 bytes"));
    }
    w
}

/// Copies issued by `Dev::copy_out_later`, landing in a page-locked buffer.
pub struct PendingCopy<'d> {
    dev: &'d Dev,
    host: Option<PinnedHostSlice<u8>>,
    len: usize,
    event: CudaEvent,
}

impl PendingCopy<'_> {
    /// Waits for the copies; returns the error words and the bytes.
    pub fn wait(mut self) -> Result<([i64; ERR_WORDS], Vec<u8>)> {
        self.event.synchronize().map_err(driver_err)?;
        let host = self.host.take().expect("taken only here and in drop");
        let bytes = host.as_slice().map_err(driver_err)?;
        let (words, data) = bytes.split_at(ERR_BYTES);
        let (w, data) = (error_words(words), data[..self.len].to_vec());
        self.dev.spare_pinned.lock().unwrap_or_else(|p| p.into_inner()).push(host);
        Ok((w, data))
    }
}

impl Drop for PendingCopy<'_> {
    fn drop(&mut self) {
        if let Some(host) = self.host.take() {
            // Not waited for: the copy must land before the buffer is reused or freed.
            if self.event.synchronize().is_ok() {
                self.dev.spare_pinned.lock().unwrap_or_else(|p| p.into_inner()).push(host);
            } else {
                std::mem::forget(host);
            }
        }
    }
}

/// An allocation failure of `bytes` as `hal::Error` (out of memory, or the driver's error).
pub(crate) fn alloc_err(e: DriverError, bytes: usize) -> Error {
    if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        Error::OutOfMemory { backend: BACKEND_NAME.into(), bytes }
    } else {
        driver_err(e)
    }
}

/// A driver error as `hal::Error::Device`.
pub(crate) fn driver_err(e: DriverError) -> Error {
    let message = match e.error_string() {
        Ok(s) => format!("{:?}: {}", e.0, s.to_string_lossy()),
        Err(_) => format!("{:?}", e.0),
    };
    Error::Device { backend: BACKEND_NAME.into(), code: e.0 as i64, message }
}

/// Lets the device's default memory pool (which `cuMemAllocAsync` draws from) keep the memory
/// freed into it instead of returning it to the driver at every synchronization. Its default
/// release threshold of 0 made each prefill chunk map its large scratch (some 800 MiB of MoE
/// pair buffers at 4096 tokens) anew. The pool then holds at most the peak the backend used.
fn keep_freed_memory(ctx: &CudaContext) -> std::result::Result<(), DriverError> {
    use cudarc::driver::sys;
    ctx.bind_to_thread()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: the device handle is the context's own; `pool` and `threshold` outlive the calls,
    // and the attribute takes a u64 value.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()).result()?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()
    }
}
