//! [`Backend::record`](hal::Backend::record) on CUDA: stream capture into a CUDA graph.
//!
//! Every op already issues only kernel launches and allocations on the one stream, and reads
//! per-call values (slots, positions, ids) from device tensors, never from the host, so a
//! captured op sequence is valid for any later contents of those tensors.
//!
//! Scratch and outputs allocated inside the capture come from the recording's `Arena` (fixed
//! addresses, reused every replay); the contract makes the caller drop them inside the capture,
//! and the capture fails if any is still held. The arena, not stream-ordered allocations, keeps
//! the graph free of memory nodes: an allocation node between two kernels would be a plain
//! dependency and cancel the programmatic (overlapped) launch of the second (`ops::launch`).
//!
//! Capture runs in relaxed mode so that a kernel used for the first time may still be compiled
//! and loaded while recording. Host transfers are refused while recording (`Dev::recording`).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaContext, CudaGraph, CudaStream};
use hal::backend::Recording;
use hal::{Error, Result};

use crate::device::{alloc_err, driver_err, Dev, DevBuf, BACKEND_NAME};

/// A captured op sequence; replays on the backend's stream.
pub struct CudaRecording {
    graph: CudaGraph,
    /// Node counts and kernels by name, taken once after capture.
    summary: String,
    /// Keeps the context and stream alive as long as the graph; its memo is cleared per replay.
    dev: Arc<Dev>,
    /// The memory the graph's kernels use for what the ops allocated; freed after the graph.
    _arena: Arc<Arena>,
}

impl Recording for CudaRecording {
    fn replay(&self) -> Result<()> {
        // The graph's ops write their outputs without passing through `run`.
        self.dev.memo.clear();
        self.graph.launch().map_err(driver_err)
    }

    /// "CUDA graph: K kernels, A allocations, F frees, …; kernels: name ×n, …" (most frequent first).
    fn describe(&self) -> String {
        self.summary.clone()
    }
}

/// Captures what `ops` issues, then launches the graph once (so `ops` "ran", as the HAL asks).
pub(crate) fn record(dev: &Arc<Dev>, ops: &mut dyn FnMut() -> Result<()>) -> Result<Box<dyn Recording>> {
    if dev.recording.swap(true, Ordering::SeqCst) {
        return Err(Error::invalid("record", "already recording on this backend (recordings do not nest)"));
    }
    let arena = Arena::new(dev.ctx.clone(), dev.stream.clone());
    *dev.arena.lock().unwrap_or_else(|p| p.into_inner()) = Some(arena.clone());
    let captured = capture(dev, ops);
    *dev.arena.lock().unwrap_or_else(|p| p.into_inner()) = None;
    dev.recording.store(false, Ordering::SeqCst);
    let graph = captured?;
    let held = arena.live();
    if held > 0 {
        return Err(Error::invalid(
            "record",
            format!("{held} tensor(s) allocated while recording were still held when it ended (drop them inside it)"),
        ));
    }
    let summary = format!("{}; arena {:.1} MiB", summarize(&graph), arena.reserved() as f64 / (1 << 20) as f64);
    graph.launch().map_err(driver_err)?;
    Ok(Box::new(CudaRecording { graph, summary, dev: dev.clone(), _arena: arena }))
}

fn capture(dev: &Dev, ops: &mut dyn FnMut() -> Result<()>) -> Result<CudaGraph> {
    // Facts of eager work need not hold when the graph replays; the graph learns its own. What it
    // keeps is freed inside the capture, as the graph's own memory must be.
    dev.memo.clear();
    dev.stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED).map_err(driver_err)?;
    let issued = ops();
    dev.memo.clear();
    // Capture always ends, also after an error, so that the stream works normally again.
    let ended = dev.stream.end_capture(CUgraphInstantiate_flags(0));
    issued?;
    ended.map_err(driver_err)?.ok_or_else(|| Error::Device {
        backend: BACKEND_NAME.into(),
        code: -1,
        message: "stream capture returned no graph".into(),
    })
}

/// The device memory of one recording: what its ops allocate while it is captured, in blocks
/// carved from chunks of plain device memory (`cuMemAlloc`, allowed in a relaxed capture).
/// A block handed back is reused by a later allocation of the same size: ops run in order on one
/// stream, so a later op's kernels touch it only after the earlier ones completed (with
/// programmatic launches too: no kernel writes before its `grid_dep_begin` wait). Inside
/// `Backend::concurrently` blocks come back only after its join (`device::Deferred`).
pub(crate) struct Arena {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    state: Mutex<ArenaState>,
}

#[derive(Default)]
struct ArenaState {
    /// Device allocations, freed with the arena.
    chunks: Vec<u64>,
    /// Bytes of all chunks.
    reserved: usize,
    /// Unused end of the newest chunk: address and bytes.
    tail: (u64, usize),
    /// Handed-back blocks by size.
    free: HashMap<usize, Vec<u64>>,
    /// Blocks handed out and not yet back.
    live: usize,
}

/// Chunk size; larger blocks get a chunk of their own.
const ARENA_CHUNK: usize = 64 << 20;
/// Block alignment and size granule (the pool's allocations are 256-byte aligned too).
const ARENA_ALIGN: usize = 256;

impl Arena {
    fn new(ctx: Arc<CudaContext>, stream: Arc<CudaStream>) -> Arc<Arena> {
        Arc::new(Arena { ctx, stream, state: Mutex::new(ArenaState::default()) })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ArenaState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An uninitialized block of at least `bytes` (and at least one byte).
    pub(crate) fn take(self: &Arc<Self>, bytes: usize) -> Result<DevBuf> {
        let block = bytes.max(1).div_ceil(ARENA_ALIGN) * ARENA_ALIGN;
        let mut s = self.state();
        let reused = s.free.get_mut(&block).and_then(Vec::pop);
        let ptr = match reused {
            Some(p) => p,
            None if block <= s.tail.1 => {
                let (p, left) = s.tail;
                s.tail = (p + block as u64, left - block);
                p
            }
            None => {
                let size = block.max(ARENA_CHUNK);
                self.ctx.bind_to_thread().map_err(driver_err)?;
                // SAFETY: a plain device allocation, freed once in `Drop`.
                let p = unsafe { cudarc::driver::result::malloc_sync(size) }.map_err(|e| alloc_err(e, size))?;
                s.chunks.push(p);
                s.reserved += size;
                if size > block {
                    s.tail = (p + block as u64, size - block);
                }
                p
            }
        };
        s.live += 1;
        Ok(DevBuf::in_arena(ptr, self.clone(), block))
    }

    /// Returns a block of `block` bytes at `ptr` (from `take`).
    pub(crate) fn give_back(&self, ptr: u64, block: usize) {
        let mut s = self.state();
        s.free.entry(block).or_default().push(ptr);
        s.live -= 1;
    }

    fn live(&self) -> usize {
        self.state().live
    }

    fn reserved(&self) -> usize {
        self.state().reserved
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // Best effort: a replay may still be running on the stream; failures only leak.
        let _ = self.stream.synchronize();
        if self.ctx.bind_to_thread().is_ok() {
            for &p in &self.state().chunks {
                // SAFETY: each chunk was allocated once by `take` and no block of it is used any more.
                let _ = unsafe { cudarc::driver::result::free_sync(p) };
            }
        }
    }
}

/// The graph's nodes by type and its kernels by name (a report line; driver errors while
/// reading it give a shorter line, never a failure).
fn summarize(graph: &CudaGraph) -> String {
    use cudarc::driver::sys::{self, CUgraphNodeType};
    use std::collections::BTreeMap;
    use std::ptr::null_mut;
    let g = graph.cu_graph();
    let mut n = 0usize;
    // SAFETY: a count query on a live graph (null node array).
    if unsafe { sys::cuGraphGetNodes(g, std::ptr::null_mut(), &mut n) }.result().is_err() {
        return "CUDA graph (nodes not readable)".into();
    }
    let mut nodes = vec![std::ptr::null_mut(); n];
    // SAFETY: `nodes` holds `n` entries, as the driver was told.
    if unsafe { sys::cuGraphGetNodes(g, nodes.as_mut_ptr(), &mut n) }.result().is_err() {
        return "CUDA graph (nodes not readable)".into();
    }
    let mut kinds: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut kernels: BTreeMap<String, usize> = BTreeMap::new();
    for &node in &nodes[..n] {
        let mut t = CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
        // SAFETY: `node` belongs to the live graph; writes one enum.
        if unsafe { sys::cuGraphNodeGetType(node, &mut t) }.result().is_err() {
            continue;
        }
        let kind = match t {
            CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL => "kernels",
            CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEM_ALLOC => "allocations",
            CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEM_FREE => "frees",
            CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEMSET => "memsets",
            CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEMCPY => "copies",
            _ => "other nodes",
        };
        *kinds.entry(kind).or_default() += 1;
        if kind == "kernels" {
            // SAFETY: a kernel node's parameters; the struct is plain data the driver fills.
            let mut p: sys::CUDA_KERNEL_NODE_PARAMS = unsafe { std::mem::zeroed() };
            let mut name: *const std::ffi::c_char = std::ptr::null();
            let named = unsafe { sys::cuGraphKernelNodeGetParams_v2(node, &mut p) }.result().is_ok()
                && unsafe { sys::cuFuncGetName(&mut name, p.func) }.result().is_ok()
                && !name.is_null();
            let label = if named {
                // SAFETY: the driver returns a NUL-terminated name that lives with the module.
                unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy().into_owned()
            } else {
                "?".into()
            };
            *kernels.entry(label).or_default() += 1;
        }
    }
    // Edges by type: programmatic ones let a kernel start while its predecessor runs.
    let mut e = 0usize;
    let programmatic = {
        // SAFETY: a count query (null arrays), then arrays of the size the driver reported.
        let counted =
            unsafe { sys::cuGraphGetEdges_v2(g, null_mut(), null_mut(), null_mut(), &mut e) }.result().is_ok();
        let mut from = vec![null_mut(); e];
        let mut to = vec![null_mut(); e];
        // SAFETY: zeroed edge data is valid plain data.
        let mut data: Vec<sys::CUgraphEdgeData> = vec![unsafe { std::mem::zeroed() }; e];
        let read = counted
            && unsafe { sys::cuGraphGetEdges_v2(g, from.as_mut_ptr(), to.as_mut_ptr(), data.as_mut_ptr(), &mut e) }
                .result()
                .is_ok();
        read.then(|| {
            data[..e]
                .iter()
                .filter(|d| d.type_ as u32 == sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u32)
                .count()
        })
    };
    let edges = match programmatic {
        Some(p) => format!("{e} edges, {p} programmatic"),
        None => "edges not readable".into(),
    };
    let mut by_count: Vec<(String, usize)> = kernels.into_iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let kinds: Vec<String> = kinds.iter().map(|(k, c)| format!("{c} {k}")).collect();
    let names: Vec<String> = by_count.iter().map(|(k, c)| format!("{k} ×{c}")).collect();
    format!("CUDA graph: {} nodes ({}), {edges}; kernels: {}", n, kinds.join(", "), names.join(", "))
}

impl Dev {
    /// `Err` naming `what` while a recording is being captured: host transfers and waits
    /// cannot be part of a graph.
    pub(crate) fn not_recording(&self, what: &str) -> Result<()> {
        if self.recording.load(Ordering::SeqCst) {
            return Err(Error::invalid(
                what,
                "not allowed while recording ops (Backend::record issues only alloc and run)",
            ));
        }
        if self.concurrent.load(Ordering::SeqCst) {
            return Err(Error::invalid(
                what,
                "not allowed inside Backend::concurrently (it issues only alloc and run)",
            ));
        }
        Ok(())
    }
}
