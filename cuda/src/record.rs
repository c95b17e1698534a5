//! [`Backend::record`](hal::Backend::record) on CUDA: stream capture into a CUDA graph.
//!
//! Every op already issues only kernel launches and stream-ordered allocations on the one
//! stream, and reads per-call values (slots, positions, ids) from device tensors, never from
//! the host, so a captured op sequence is valid for any later contents of those tensors. Scratch
//! and outputs allocated inside the capture become the graph's own memory nodes (fixed
//! addresses, reused every replay); the contract makes the caller drop them inside the capture.
//!
//! Capture runs in relaxed mode so that a kernel used for the first time may still be compiled
//! and loaded while recording. Host transfers are refused while recording (`Dev::recording`).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaGraph;
use hal::backend::Recording;
use hal::{Error, Result};

use crate::device::{driver_err, Dev, BACKEND_NAME};

/// A captured op sequence; replays on the backend's stream.
pub struct CudaRecording {
    graph: CudaGraph,
    /// Node counts and kernels by name, taken once after capture.
    summary: String,
    /// Keeps the context and stream alive as long as the graph; its memo is cleared per replay.
    dev: Arc<Dev>,
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
    let captured = capture(dev, ops);
    dev.recording.store(false, Ordering::SeqCst);
    let graph = captured?;
    let summary = summarize(&graph);
    graph.launch().map_err(driver_err)?;
    Ok(Box::new(CudaRecording { graph, summary, dev: dev.clone() }))
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

/// The graph's nodes by type and its kernels by name (a report line; driver errors while
/// reading it give a shorter line, never a failure).
fn summarize(graph: &CudaGraph) -> String {
    use cudarc::driver::sys::{self, CUgraphNodeType};
    use std::collections::BTreeMap;
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
    let mut by_count: Vec<(String, usize)> = kernels.into_iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let kinds: Vec<String> = kinds.iter().map(|(k, c)| format!("{c} {k}")).collect();
    let names: Vec<String> = by_count.iter().map(|(k, c)| format!("{k} ×{c}")).collect();
    format!("CUDA graph: {} nodes ({}); kernels: {}", n, kinds.join(", "), names.join(", "))
}

impl Dev {
    /// `Err` naming `what` while a recording is being captured: host transfers and waits
    /// cannot be part of a graph.
    pub(crate) fn not_recording(&self, what: &str) -> Result<()> {
        if self.recording.load(Ordering::SeqCst) {
            return Err(Error::invalid(what, "not allowed while recording ops (Backend::record issues only alloc and run)"));
        }
        Ok(())
    }
}
