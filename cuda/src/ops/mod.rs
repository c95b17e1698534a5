//! The ops, one file per `hal::ops` family, each launching the kernels of `kernels/<family>.cu`.
//!
//! This module holds what they share: kernel arguments and launches, grid sizing, the device-side
//! argument checks (launched before an op's kernels) and the host formatting of the errors they
//! record, which reproduces cpu-ref's messages.

pub mod attention;
pub mod compressor;
pub mod embed;
pub mod hc;
pub mod indexer;
pub mod linear;
pub mod moe;
pub mod norm;
pub mod quant;
pub mod rope;
pub mod sample;

use std::sync::atomic::Ordering;

use cudarc::driver::sys::CUfunction_attribute_enum;
use hal::{Error, Op, Result};

use crate::device::{driver_err, DependentLaunch, Dev};
use crate::memo::Fact;

/// One kernel argument, as the C signature declares it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg {
    /// A device pointer (`T*`), 0 for null.
    P(u64),
    /// `int`.
    I(i32),
    /// `long long`.
    L(i64),
    /// `float`.
    F(f32),
}

/// Threads per block for grid-stride kernels.
pub(crate) const BLOCK: u32 = 256;

/// Rows (and weight rows) of the f64 dot tiles (`DOT_TILE`, `dot_tile_f64` in common.cuh) of the
/// gate and the mHC mixing sums; their kernels run BLOCK threads.
pub(crate) const DOT_ROWS: usize = 32;

/// Blocks for a grid-stride loop over `n` items (at least one; capped, the loop covers the rest).
pub(crate) fn grid_for(n: usize, block: u32) -> u32 {
    (n.div_ceil(block as usize)).clamp(1, 1 << 20) as u32
}

impl Arg {
    /// The argument's bytes at the start of a u64, as `cuLaunchKernelEx` reads a parameter of
    /// the kernel's declared size from the address it is given.
    fn word(self) -> u64 {
        let mut w = [0u8; 8];
        match self {
            Arg::P(p) => w = p.to_ne_bytes(),
            Arg::L(v) => w = v.to_ne_bytes(),
            Arg::I(v) => w[..4].copy_from_slice(&v.to_ne_bytes()),
            Arg::F(v) => w[..4].copy_from_slice(&v.to_ne_bytes()),
        }
        u64::from_ne_bytes(w)
    }
}

/// The kernels that do work before `grid_dep_wait()` (they begin with `grid_dep_trigger()`;
/// kernels.rs checks that this list and the sources agree): their weight loads run under the
/// predecessor's tail when they are launched early, the only early launches a recording keeps
/// by default ([`DependentLaunch`]).
pub(crate) const EARLY_WORK_KERNELS: &[&str] = &["linear_fp8_r1", "linear_fp8_r1_codes", "linear_fwd_r1_early"];

/// Launches `family::name` on the backend's stream. A grid with a zero dimension is a no-op.
/// Where `Dev::dependent_launch` says so, the kernel may be scheduled while its predecessor
/// still runs (programmatic stream serialization); every kernel waits for it before touching
/// anything but its weights (`grid_dep_begin` / `grid_dep_wait`, common.cuh).
pub(crate) fn launch(
    dev: &Dev,
    family: &'static str,
    name: &'static str,
    grid: (u32, u32, u32),
    block: u32,
    smem: u32,
    args: &[Arg],
) -> Result<()> {
    use cudarc::driver::sys;
    if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
        return Ok(());
    }
    let f = dev.function(family, name)?;
    if smem > 48 * 1024 {
        f.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
            .map_err(driver_err)?;
    }
    let mut words: Vec<u64> = args.iter().map(|a| a.word()).collect();
    let mut params: Vec<*mut std::ffi::c_void> = words.iter_mut().map(|w| (w as *mut u64).cast()).collect();
    // SAFETY: a zeroed attribute is valid plain data; the id and its union member are set below.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let cfg = sys::CUlaunchConfig {
        gridDimX: grid.0,
        gridDimY: grid.1,
        gridDimZ: grid.2,
        blockDimX: block,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: smem,
        hStream: dev.cu_stream(),
        attrs: &mut attr,
        numAttrs: match dev.dependent_launch {
            DependentLaunch::Off => 0,
            DependentLaunch::Auto if !dev.recording.load(Ordering::SeqCst) => 1,
            DependentLaunch::Auto | DependentLaunch::EarlyWork => EARLY_WORK_KERNELS.contains(&name) as u32,
            DependentLaunch::All => 1,
        },
    };
    dev.ctx.bind_to_thread().map_err(driver_err)?;
    // SAFETY: every kernel's argument list is built to match its C signature (ops/<family>.rs
    // next to kernels/<family>.cu), `params` points at one word per argument for the duration of
    // the call, and every pointer is a live allocation of this backend sized by the validated op
    // signature. The function belongs to this backend's context, bound above.
    unsafe { sys::cuLaunchKernelEx(&cfg, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) }
        .result()
        .map_err(driver_err)
}

/// The kernel of a template over the KV cache type for a cache of dtype `cache` (F32 or BF16, as
/// `Op::validate` checked): the f32 entry point `f32`, or its `_bf16` twin `bf16` (kernels/common.cuh,
/// "KV cache elements"). Pointers into the cache are typed in the kernels, so the host passes only
/// base addresses and element counts, never byte offsets into a cache.
pub(crate) fn cache_kernel(cache: hal::DType, f32: &'static str, bf16: &'static str) -> &'static str {
    match cache {
        hal::DType::BF16 => bf16,
        _ => f32,
    }
}

/// Usize → i64 kernel argument (sizes always fit: they count bytes of one allocation).
pub(crate) fn l(v: usize) -> Arg {
    Arg::L(v as i64)
}

/// Usize → int kernel argument, checked.
pub(crate) fn i(op: &str, what: &str, v: usize) -> Result<Arg> {
    i32::try_from(v)
        .map(Arg::I)
        .map_err(|_| Error::invalid(op, format!("{what} {v} exceeds the 32-bit range of the CUDA kernels")))
}

// ---- device-side argument checks ---------------------------------------------------------------

/// `check_rows` modes (kernels/common.cuh).
pub(crate) const CHECK_NONE: i32 = 0;
pub(crate) const CHECK_SEES: i32 = 1;
pub(crate) const CHECK_EMIT: i32 = 2;
pub(crate) const CHECK_INDICES: i32 = 3;

/// Error codes written by the kernels (kernels/common.cuh).
pub(crate) const E_SLOT: i64 = 1;
pub(crate) const E_POS_NEG: i64 = 2;
pub(crate) const E_NOT_CONTIG: i64 = 3;
pub(crate) const E_NOT_CONSEC: i64 = 4;
pub(crate) const E_TOKEN: i64 = 5;
pub(crate) const E_GATHER: i64 = 6;
pub(crate) const E_SEES: i64 = 7;
pub(crate) const E_EMIT_CAP: i64 = 8;
pub(crate) const E_CINDEX: i64 = 9;
pub(crate) const E_EXPERT_RANGE: i64 = 10;
pub(crate) const E_EXPERT_DUP: i64 = 11;
pub(crate) const E_TID2EID: i64 = 12;

/// Op ids recorded with a device-side error: index into this table of `Op::name()`s.
const OP_NAMES: &[&str] = &[
    "embed",
    "hc_expand",
    "add",
    "gather_rows",
    "hc_pre",
    "hc_post",
    "hc_head",
    "rms_norm",
    "linear",
    "grouped_linear",
    "rope",
    "quant_sim",
    "hadamard",
    "window_store",
    "compressor",
    "indexer_topk",
    "sparse_attention",
    "moe_gate",
    "moe_experts",
    "swiglu",
    "sample_tokens",
];

/// The id of an op name in the error word.
pub(crate) fn op_id(name: &str) -> i32 {
    OP_NAMES.iter().position(|n| *n == name).unwrap_or(OP_NAMES.len()) as i32
}

/// Threads of a one-block argument check over `n` items: a warp per 32 of them, at most 1024 (the
/// kernels loop). A decode step's checks cover one row; a 1024-thread block for it costs more to
/// launch and reduce over than the check itself.
pub(crate) fn check_threads(n: usize) -> u32 {
    (n.div_ceil(32) * 32).clamp(32, 1024) as u32
}

/// A `check_rows` (slot/position convention plus an op-specific row check) that must run: the
/// memo does not know both of its parts for the same, unchanged tensors (a decode step checks its
/// one slot and position tensor before every cache op). It runs as a kernel of its own
/// ([`RowCheck::launch`]) or as one more block of the kernel it guards ([`RowCheck::params`],
/// `ROWS_CHECK_BLOCK` in kernels/common.cuh).
pub(crate) struct RowCheck {
    slots: u64,
    positions: u64,
    num_slots: Arg,
    params: [Arg; 7],
    items: usize,
    facts: Vec<(Fact, [(u64, usize); 2])>,
}

/// `ROWS_CHECK_PARAMS` of a launch that runs no row check.
pub(crate) const NO_ROWS_CHECK: [Arg; 7] =
    [Arg::I(0), Arg::I(0), Arg::I(0), Arg::L(0), Arg::L(0), Arg::P(0), Arg::I(0)];

/// The row check of `op` over `rows` rows, unless there are none or the memo knows it passed.
#[allow(clippy::too_many_arguments)]
pub(crate) fn row_check(
    dev: &Dev,
    op: &str,
    slots: u64,
    positions: u64,
    rows: usize,
    num_slots: usize,
    mode: i32,
    a: i64,
    b: i64,
    idx: u64,
    idx_cols: usize,
) -> Result<Option<RowCheck>> {
    if rows == 0 {
        return Ok(None);
    }
    let row_bytes = (positions, rows * 4);
    let place =
        Fact { kernel: "check_rows/place", args: vec![slots as i64, positions as i64, rows as i64, num_slots as i64] };
    let place_reads = [(slots, rows * 4), row_bytes];
    let idx_bytes = if mode == CHECK_INDICES { rows * idx_cols * 4 } else { 0 };
    let extra = (mode != CHECK_NONE).then(|| Fact {
        kernel: "check_rows/extra",
        args: vec![positions as i64, rows as i64, mode as i64, a, b, idx as i64, idx_cols as i64],
    });
    if dev.memo.knows(&place) && extra.as_ref().is_none_or(|f| dev.memo.knows(f)) {
        return Ok(None);
    }
    let params = [
        i(op, "rows", rows)?,
        Arg::I(op_id(op)),
        Arg::I(mode),
        Arg::L(a),
        Arg::L(b),
        Arg::P(idx),
        i(op, "topk", idx_cols)?,
    ];
    let mut facts = vec![(place, place_reads)];
    facts.extend(extra.map(|f| (f, [row_bytes, (idx, idx_bytes)])));
    let items = if mode == CHECK_INDICES { rows * idx_cols } else { rows };
    Ok(Some(RowCheck { slots, positions, num_slots: i(op, "slots", num_slots)?, params, items, facts }))
}

impl RowCheck {
    /// `ROWS_CHECK_PARAMS` of the guarded kernel's launch, which then has one more x block.
    pub(crate) fn params(&self) -> [Arg; 7] {
        self.params
    }

    /// Launches the check as the kernel `check_rows` in `family`, then [`RowCheck::issued`].
    pub(crate) fn launch(self, dev: &Dev, family: &'static str) -> Result<()> {
        let [rows, op, mode, a, b, idx, cols] = self.params;
        let args = [
            Arg::P(self.slots),
            Arg::P(self.positions),
            rows,
            self.num_slots,
            op,
            mode,
            a,
            b,
            idx,
            cols,
            Arg::P(dev.err_ptr),
        ];
        launch(dev, family, "check_rows", (1, 1, 1), check_threads(self.items), 0, &args)?;
        self.issued(dev);
        Ok(())
    }

    /// Once the launch that runs the check is issued: the memo learns what it checks.
    pub(crate) fn issued(self, dev: &Dev) {
        for (fact, reads) in self.facts {
            dev.memo.learn(fact, &reads);
        }
    }
}

/// Launches `check_rows` in `family` unless the memo knows it passed ([`row_check`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_rows(
    dev: &Dev,
    family: &'static str,
    op: &str,
    slots: u64,
    positions: u64,
    rows: usize,
    num_slots: usize,
    mode: i32,
    a: i64,
    b: i64,
    idx: u64,
    idx_cols: usize,
) -> Result<()> {
    match row_check(dev, op, slots, positions, rows, num_slots, mode, a, b, idx, idx_cols)? {
        Some(check) => check.launch(dev, family),
        None => Ok(()),
    }
}

/// Launches `check_range`: the first `vals[i]` outside `[0, bound)` is reported as `code`.
/// Skipped when the same range check already passed on the same, unchanged tensor (`Dev::memo`).
pub(crate) fn check_range(
    dev: &Dev,
    family: &'static str,
    op: &str,
    vals: u64,
    n: usize,
    bound: i64,
    code: i64,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let fact = Fact { kernel: "check_range", args: vec![vals as i64, n as i64, bound] };
    if dev.memo.knows(&fact) {
        return Ok(());
    }
    let args = [Arg::P(vals), l(n), Arg::L(bound), Arg::I(op_id(op)), Arg::I(code as i32), Arg::P(dev.err_ptr)];
    launch(dev, family, "check_range", (1, 1, 1), check_threads(n), 0, &args)?;
    dev.memo.learn(fact, &[(vals, n * 4)]);
    Ok(())
}

/// The `hal::Error` for a recorded device-side error word (cpu-ref's context and message).
pub(crate) fn format_device_error(w: &[i64]) -> Error {
    let (code, row, v0, v1, v2) = (w[0], w[2], w[3], w[4], w[5]);
    let op = OP_NAMES.get(w[1] as usize).copied().unwrap_or("cuda kernel");
    let ctx = format!("{op} row {row}");
    let (ctx, msg) = match code {
        E_SLOT => (ctx, format!("slot {v0} outside [0, {v1})")),
        E_POS_NEG => (ctx, format!("position {v0} is negative")),
        E_NOT_CONTIG => (ctx, format!("rows of slot {v0} are not contiguous (previous one is row {v1})")),
        E_NOT_CONSEC => (ctx, format!("slot {v0}: position {v1} does not follow position {v2} of the previous row")),
        E_TOKEN => (ctx, format!("token id {v0} outside [0, {v1})")),
        E_GATHER => (format!("{op} index {row}"), format!("row {v0} outside [0, {v1})")),
        E_SEES if op == "sparse_attention" => {
            (ctx, format!("position {v0} sees {v1} compressed entries, capacity is {v2}"))
        }
        E_SEES => (ctx, format!("position {v0} sees {v1} entries, capacity is {v2}")),
        E_EMIT_CAP => (ctx, format!("position {v0} emits entry {v1} but the cache holds {v2}")),
        E_CINDEX => (ctx, format!("compressed index {v0} outside [0, {v1}) (or −1)")),
        E_EXPERT_RANGE => (ctx, format!("expert {v0} outside [0, {v1})")),
        E_EXPERT_DUP => (ctx, format!("expert {v0} is listed twice")),
        E_TID2EID => (ctx, format!("tid2eid[{v0}] holds expert {v1} outside [0, {v2})")),
        _ => (ctx, format!("device-side argument error {code} (values {v0}, {v1}, {v2})")),
    };
    Error::invalid(ctx, msg)
}

/// Runs a validated op: `ins` / `outs` are the device addresses of its tensors in signature order.
pub(crate) fn dispatch(dev: &Dev, op: &Op, ins: &[u64], outs: &[u64]) -> Result<()> {
    match op {
        Op::Embed(o) => embed::embed(dev, o, ins, outs),
        Op::HcExpand(o) => embed::hc_expand(dev, o, ins, outs),
        Op::Add(o) => embed::add(dev, o, ins, outs),
        Op::GatherRows(o) => embed::gather_rows(dev, o, ins, outs),
        Op::HcPre(o) => hc::hc_pre(dev, o, ins, outs),
        Op::HcPost(o) => hc::hc_post(dev, o, ins, outs),
        Op::HcHead(o) => hc::hc_head(dev, o, ins, outs),
        Op::RmsNorm(o) => norm::rms_norm(dev, o, ins, outs),
        Op::Linear(o) => linear::linear(dev, o, ins, outs),
        Op::GroupedLinear(o) => linear::grouped_linear(dev, o, ins, outs),
        Op::Rope(o) => rope::rope(dev, o, ins, outs),
        Op::QuantSim(o) => quant::quant_sim(dev, o, outs),
        Op::Hadamard(o) => quant::hadamard(dev, o, outs),
        Op::WindowStore(o) => attention::window_store(dev, o, ins, outs),
        Op::Compressor(o) => compressor::compressor(dev, o, ins, outs),
        Op::IndexerTopK(o) => indexer::indexer_topk(dev, o, ins, outs),
        Op::SparseAttention(o) => attention::sparse_attention(dev, o, ins, outs),
        Op::MoeGate(o) => moe::moe_gate(dev, o, ins, outs),
        Op::MoeExperts(o) => moe::moe_experts(dev, o, ins, outs),
        Op::SwiGlu(o) => moe::swiglu(dev, o, ins, outs),
        Op::SampleTokens(o) => sample::sample_tokens(dev, o, ins, outs),
    }
}

/// Why this backend cannot run `op` (sizes beyond the kernels' shared memory), if it cannot.
pub(crate) fn unsupported(dev: &Dev, op: &Op) -> Option<String> {
    match op {
        Op::Embed(e) if !matches!(e.table_dtype, hal::DType::F32 | hal::DType::BF16 | hal::DType::F16) => {
            Some(format!("embedding table dtype {} (use f32, bf16 or f16)", e.table_dtype))
        }
        Op::SparseAttention(a) if attention::smem_for(a.head_dim, 1) > dev.smem_optin => {
            Some(format!("head_dim {} needs more shared memory than the device has", a.head_dim))
        }
        Op::Compressor(c) if compressor::smem_for(c) > dev.smem_optin => {
            Some(format!("width {} needs more shared memory than the device has", c.width))
        }
        Op::IndexerTopK(x) if indexer::smem_for(x) + indexer::TOPK_STATIC_SMEM > dev.smem_optin => {
            Some(format!("topk {} needs more shared memory than the device has", x.topk))
        }
        Op::MoeExperts(m) if m.experts > 65_535 => Some(format!("{} experts (at most 65535)", m.experts)),
        Op::SampleTokens(t) if t.rows > 65_535 => Some(format!("{} rows (at most 65535)", t.rows)),
        _ => None,
    }
}

/// Dynamic shared memory for `bytes`, as a launch argument.
pub(crate) fn smem(bytes: usize) -> u32 {
    bytes as u32
}
