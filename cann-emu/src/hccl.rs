//! HCCL exports: communicators whose ranks are threads (or one thread) of this process, and
//! stream-ordered collectives between them (spec §4, §8.2 item 6).
//!
//! **Communicators.** `HcclGetRootInfo` fills the 4108-byte blob with a magic, this process's
//! id and a fresh rendezvous key; `HcclCommInitRootInfo(n, root, rank)` joins the rendezvous of
//! that key and blocks until all `n` ranks have joined (or fails with `HCCL_E_TIMEOUT` after
//! `V4RT_EMU_HCCL_TIMEOUT_MS`, default 10 s). Each rank must have bound a distinct device with
//! `aclrtSetDevice` (`V4RT_EMU_DEVICES=N` makes N devices visible). `HcclCommInitAll` makes all
//! ranks at once. Handles are opaque (from the emulator's `PROT_NONE` handle range) and looked
//! up in a registry, so a destroyed or made-up communicator is `HCCL_E_PARA`, not a crash.
//!
//! **Collectives** (`HcclAllReduce`, `HcclAllGather`, `HcclBroadcast`, `HcclReduceScatter`,
//! `HcclBarrier`) are checked on the host when called (live communicator, the thread bound to
//! the rank's device, a live stream of that device, device buffers of that device large enough
//! for count × dtype, a dtype the header documents for that collective, a known op, a root in
//! range) and then queued on the stream like any kernel: nothing moves until the stream is
//! synchronized. The k-th collective a rank queues on a communicator meets the k-th of every
//! other rank; when it reaches the front of its stream it records its arrival and waits (the
//! emulator lock released, see [`crate::state::sync_stream`]) until every rank has arrived.
//! The last rank to arrive checks that all ranks called the same collective with the same
//! count, dtype, op and root (a mismatch fails every rank with `HCCL_E_PARA` and a message
//! naming both sides), then reads every input before writing any output (so in-place calls
//! are exact) and writes every rank's output. Reductions run in f64 and round once to the
//! element type; integer results saturate (the emulator's cast rule; HCCL's overflow behaviour
//! is not documented).
//!
//! **Failures** surface where an asynchronous device failure would: at the synchronize of the
//! stream, which then stays faulted like after a kernel fault. A rank that never arrives is
//! `HCCL_E_TIMEOUT` on the others (stream status 507046, `ACL_ERROR_RT_STREAM_SYNC_TIMEOUT`);
//! a mismatch or a buffer freed before the collective ran is `HCCL_E_PARA` (stream status
//! 507000); a rank that destroyed its communicator without queuing the collective is
//! `HCCL_E_UNAVAIL` at once instead of after the timeout. Which ACL status real hardware
//! reports for a failed collective is not documented: these codes are this emulator's choice.
//! The HCCL code itself is in the message and in `HcclGetCommAsyncError`.
//!
//! **Progress.** On hardware each device runs its queued work on its own. Here work runs at a
//! synchronize, so a rank waiting in a collective also runs the queues of the ranks it waits
//! for, up to their matching collective ([`crate::state::advance_stream`]); this is what lets
//! one host thread drive all ranks of an `HcclCommInitAll` communicator.
//!
//! Not modelled: topology, links and bandwidth, `HCCL_BUFFSIZE` chunking, multi-process or
//! multi-node ranks, HCCL's own argument-consistency checks and their codes, `HcclCommConfig`.

#![allow(non_snake_case, clippy::missing_safety_doc)]

use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::dtype::Dt;
use crate::memory::Memory;
use crate::state::{advance_stream, Task};
use crate::{set_recent, with_emu, Fail};

// `HcclResult` values (hccl_types.h).
pub const HCCL_SUCCESS: u32 = 0;
pub const HCCL_E_PARA: u32 = 1;
pub const HCCL_E_PTR: u32 = 2;
pub const HCCL_E_INTERNAL: u32 = 4;
pub const HCCL_E_UNAVAIL: u32 = 7;
pub const HCCL_E_TIMEOUT: u32 = 9;
pub const HCCL_E_RUNTIME: u32 = 15;

/// Stream status of a collective that timed out (`ACL_ERROR_RT_STREAM_SYNC_TIMEOUT`).
pub const RT_STREAM_SYNC_TIMEOUT: i32 = 507046;
/// Stream status of a collective that failed otherwise (`ACL_ERROR_RT_INTERNAL_ERROR`).
pub const RT_INTERNAL_ERROR: i32 = 507000;

/// Size of `HcclRootInfo::internal`.
const ROOT_INFO_BYTES: usize = 4108;
/// What the emulator's root infos start with.
const MAGIC: &[u8; 16] = b"v4rt-emu-hccl\0\0\0";
/// `COMM_NAME_MAX_LENGTH`: `HcclGetCommName` writes at most this many bytes, NUL included.
const COMM_NAME_MAX: usize = 128;

/// An HCCL failure: the code to return and the message for `aclGetRecentErrMsg`.
#[derive(Clone, Debug)]
struct HErr {
    code: u32,
    msg: String,
}

impl HErr {
    fn new(code: u32, msg: impl Into<String>) -> HErr {
        HErr { code, msg: msg.into() }
    }
    /// An ACL-side failure (from the emulator's runtime checks) as an HCCL one.
    fn from_fail(code: u32, f: Fail) -> HErr {
        HErr::new(code, format!("{} (ACL status {})", f.msg, f.code))
    }
}

macro_rules! hbail {
    ($code:expr, $($arg:tt)*) => {
        return Err(HErr::new($code, format!($($arg)*)))
    };
}

/// The enum name of an `HcclResult`.
fn code_name(code: u32) -> &'static str {
    match code {
        0 => "HCCL_SUCCESS",
        1 => "HCCL_E_PARA",
        2 => "HCCL_E_PTR",
        3 => "HCCL_E_MEMORY",
        4 => "HCCL_E_INTERNAL",
        5 => "HCCL_E_NOT_SUPPORT",
        6 => "HCCL_E_NOT_FOUND",
        7 => "HCCL_E_UNAVAIL",
        8 => "HCCL_E_SYSCALL",
        9 => "HCCL_E_TIMEOUT",
        15 => "HCCL_E_RUNTIME",
        24 => "HCCL_E_OOM",
        _ => "HCCL_E_?",
    }
}

/// Runs an exported body: success → 0, failure → its code with the message recorded, panic →
/// `HCCL_E_INTERNAL` (an unwinding panic must not cross the C ABI).
fn hguard(api: &str, f: impl FnOnce() -> Result<(), HErr>) -> u32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => HCCL_SUCCESS,
        Ok(Err(e)) => {
            set_recent(&format!("{api}: {} ({})", e.msg, code_name(e.code)));
            e.code
        }
        Err(_) => {
            set_recent(&format!("{api}: internal emulator panic"));
            HCCL_E_INTERNAL
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes `v` through an out-pointer (`HCCL_E_PTR` when NULL).
///
/// # Safety
/// `p` is NULL or valid for a write of `T`.
unsafe fn out<T>(p: *mut T, v: T, name: &str) -> Result<(), HErr> {
    if p.is_null() {
        hbail!(HCCL_E_PTR, "{name} is NULL");
    }
    // SAFETY: non-null, valid for writes per the caller's contract.
    unsafe { p.write(v) };
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Data types and ops

/// `HcclDataType`: (name, element bytes, element codec when reductions can read it).
fn dtype_info(v: u32) -> Option<(&'static str, usize, Option<Dt>)> {
    Some(match v {
        0 => ("INT8", 1, Some(Dt::I8)),
        1 => ("INT16", 2, Some(Dt::I16)),
        2 => ("INT32", 4, Some(Dt::I32)),
        3 => ("FP16", 2, Some(Dt::F16)),
        4 => ("FP32", 4, Some(Dt::F32)),
        5 => ("INT64", 8, Some(Dt::I64)),
        6 => ("UINT64", 8, Some(Dt::U64)),
        7 => ("UINT8", 1, Some(Dt::U8)),
        8 => ("UINT16", 2, Some(Dt::U16)),
        9 => ("UINT32", 4, Some(Dt::U32)),
        10 => ("FP64", 8, Some(Dt::F64)),
        11 => ("BFP16", 2, Some(Dt::Bf16)),
        12 => ("INT128", 16, None),
        14 => ("HIF8", 1, None),
        15 => ("FP8E4M3", 1, Some(Dt::F8E4M3FN)),
        16 => ("FP8E5M2", 1, Some(Dt::F8E5M2)),
        17 => ("FP8E8M0", 1, Some(Dt::F8E8M0)),
        _ => return None,
    })
}

fn dtype_name(v: u32) -> String {
    dtype_info(v).map_or_else(|| format!("HcclDataType({v})"), |(n, _, _)| n.to_string())
}

fn op_name(v: u32) -> String {
    match v {
        0 => "SUM".into(),
        1 => "PROD".into(),
        2 => "MAX".into(),
        3 => "MIN".into(),
        _ => format!("HcclReduceOp({v})"),
    }
}

/// The collectives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    AllReduce,
    AllGather,
    Broadcast,
    ReduceScatter,
    Barrier,
}

impl Kind {
    fn api(self) -> &'static str {
        match self {
            Kind::AllReduce => "HcclAllReduce",
            Kind::AllGather => "HcclAllGather",
            Kind::Broadcast => "HcclBroadcast",
            Kind::ReduceScatter => "HcclReduceScatter",
            Kind::Barrier => "HcclBarrier",
        }
    }

    /// The dtypes `hccl.h` documents for this collective.
    fn dtypes(self) -> &'static [u32] {
        match self {
            // int8, int16, int32, float16, float32, bfloat16
            Kind::AllReduce => &[0, 1, 2, 3, 4, 11],
            // int8, int32, float16, float32, bfloat16
            Kind::ReduceScatter => &[0, 2, 3, 4, 11],
            // int8..int64, uint8..uint64, float16, float32, float64, bfloat16
            Kind::AllGather | Kind::Broadcast => &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
            Kind::Barrier => &[],
        }
    }
}

/// One rank's arguments of one collective. For a broadcast the buffer is `send`.
#[derive(Clone, Debug)]
struct Args {
    kind: Kind,
    count: u64,
    dtype: u32,
    op: Option<u32>,
    root: Option<u32>,
    send: usize,
    recv: usize,
}

impl Args {
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.kind != Kind::Barrier {
            parts.push(format!("count={}", self.count));
            parts.push(dtype_name(self.dtype));
        }
        if let Some(op) = self.op {
            parts.push(op_name(op));
        }
        if let Some(root) = self.root {
            parts.push(format!("root={root}"));
        }
        format!("{}({})", self.kind.api(), parts.join(", "))
    }

    /// Whether two ranks called the same collective (buffers may differ, of course).
    fn agrees(&self, o: &Args) -> bool {
        (self.kind, self.count, self.dtype, self.op, self.root) == (o.kind, o.count, o.dtype, o.op, o.root)
    }

    fn elem_size(&self) -> usize {
        dtype_info(self.dtype).map_or(1, |(_, s, _)| s)
    }

    /// Bytes of the send and receive buffers for a communicator of `n` ranks.
    fn spans(&self, n: u64) -> Option<(u64, u64)> {
        let e = self.elem_size() as u64;
        let c = self.count.checked_mul(e)?;
        let cn = c.checked_mul(n)?;
        Some(match self.kind {
            Kind::AllReduce | Kind::Broadcast => (c, c),
            Kind::AllGather => (c, cn),
            Kind::ReduceScatter => (cn, c),
            Kind::Barrier => (0, 0),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Communicators

/// State shared by all ranks of one communicator.
pub struct CommShared {
    name: String,
    /// Device of each rank.
    devices: Vec<i32>,
    timeout: Duration,
    state: Mutex<CommState>,
    cv: Condvar,
}

struct CommState {
    /// Per rank: the index its next collective gets.
    next: Vec<u64>,
    /// Collectives some rank has queued and not every rank has collected yet, by index.
    slots: BTreeMap<u64, Slot>,
    destroyed: Vec<bool>,
    /// Per rank: the code of its last failed collective (`HcclGetCommAsyncError`).
    async_error: Vec<u32>,
}

/// The rendezvous of the k-th collective.
struct Slot {
    arrived: Vec<Option<Args>>,
    /// The stream each rank queued it on (for [`advance_stream`]).
    queued: Vec<Option<usize>>,
    phase: Phase,
    collected: Vec<bool>,
}

enum Phase {
    /// Waiting for ranks to arrive.
    Waiting,
    /// All arrived; one thread is moving the data (outside this lock).
    Moving,
    Done(Result<(), HErr>),
}

impl CommShared {
    fn new(name: String, devices: Vec<i32>, timeout: Duration) -> Arc<CommShared> {
        let n = devices.len();
        Arc::new(CommShared {
            name,
            devices,
            timeout,
            state: Mutex::new(CommState {
                next: vec![0; n],
                slots: BTreeMap::new(),
                destroyed: vec![false; n],
                async_error: vec![HCCL_SUCCESS; n],
            }),
            cv: Condvar::new(),
        })
    }

    fn n(&self) -> usize {
        self.devices.len()
    }

    fn slot<'s>(&self, st: &'s mut CommState, k: u64) -> &'s mut Slot {
        let n = self.n();
        st.slots.entry(k).or_insert_with(|| Slot {
            arrived: vec![None; n],
            queued: vec![None; n],
            phase: Phase::Waiting,
            collected: vec![false; n],
        })
    }
}

/// One rank's view of a communicator (what a handle stands for).
#[derive(Clone)]
struct RankRef {
    comm: Arc<CommShared>,
    rank: u32,
}

impl RankRef {
    fn device(&self) -> i32 {
        self.comm.devices[self.rank as usize]
    }
}

/// Live communicator handles.
fn comms() -> &'static Mutex<HashMap<usize, RankRef>> {
    static COMMS: OnceLock<Mutex<HashMap<usize, RankRef>>> = OnceLock::new();
    COMMS.get_or_init(|| Mutex::new(HashMap::new()))
}

fn lookup(comm: *mut c_void) -> Result<RankRef, HErr> {
    if comm.is_null() {
        hbail!(HCCL_E_PTR, "comm is NULL");
    }
    lock(comms()).get(&(comm as usize)).cloned().ok_or_else(|| {
        HErr::new(HCCL_E_PARA, format!("{comm:?} is not a live communicator (destroyed, or never created)"))
    })
}

/// A fresh opaque handle, registered for `r`.
fn register(r: RankRef) -> Result<usize, HErr> {
    let h = with_emu(|e| {
        e.need_init()?;
        Ok(e.handle())
    })
    .map_err(|f| HErr::from_fail(HCCL_E_RUNTIME, f))?;
    lock(comms()).insert(h, r);
    Ok(h)
}

/// The device bound to the calling thread, and the rendezvous timeout.
fn bound_device() -> Result<(i32, Duration), HErr> {
    with_emu(|e| Ok((e.need_device()?, e.config.hccl_timeout))).map_err(|f| HErr::from_fail(HCCL_E_RUNTIME, f))
}

// ---------------------------------------------------------------------------------------------
// Root info rendezvous

/// Ranks joining one root info.
struct InitRendezvous {
    state: Mutex<InitState>,
    cv: Condvar,
}

#[derive(Default)]
struct InitState {
    /// nRanks, and the rank that said so first.
    n: Option<(u32, u32)>,
    /// rank → device.
    joined: BTreeMap<u32, i32>,
    comm: Option<Arc<CommShared>>,
    picked: u32,
}

fn roots() -> &'static Mutex<HashMap<u64, Arc<InitRendezvous>>> {
    static ROOTS: OnceLock<Mutex<HashMap<u64, Arc<InitRendezvous>>>> = OnceLock::new();
    ROOTS.get_or_init(|| Mutex::new(HashMap::new()))
}

static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

fn comm_name(key: u64) -> String {
    // Unique per process and key; well under COMM_NAME_MAX.
    format!("v4rt-emu-hccl-{}-{key}", std::process::id())
}

#[no_mangle]
pub unsafe extern "C" fn HcclGetRootInfo(root_info: *mut c_void) -> u32 {
    hguard("HcclGetRootInfo", || {
        if root_info.is_null() {
            hbail!(HCCL_E_PTR, "rootInfo is NULL");
        }
        // Documented to run after aclrtSetDevice.
        bound_device()?;
        let key = NEXT_KEY.fetch_add(1, Ordering::Relaxed);
        lock(roots())
            .insert(key, Arc::new(InitRendezvous { state: Mutex::new(InitState::default()), cv: Condvar::new() }));
        let mut blob = [0u8; ROOT_INFO_BYTES];
        blob[..16].copy_from_slice(MAGIC);
        blob[16..20].copy_from_slice(&std::process::id().to_le_bytes());
        blob[20..28].copy_from_slice(&key.to_le_bytes());
        // SAFETY: the caller passes an `HcclRootInfo` (4108 writable bytes).
        unsafe { std::ptr::copy_nonoverlapping(blob.as_ptr(), root_info.cast::<u8>(), ROOT_INFO_BYTES) };
        Ok(())
    })
}

/// The rendezvous key in a root info, checked.
///
/// # Safety
/// `root` points to 4108 readable bytes.
unsafe fn parse_root(root: *const c_void) -> Result<u64, HErr> {
    // SAFETY: per the caller.
    let b = unsafe { std::slice::from_raw_parts(root.cast::<u8>(), 28) };
    if &b[..16] != MAGIC {
        hbail!(
            HCCL_E_PARA,
            "rootInfo was not produced by HcclGetRootInfo (bad magic; pass the 4108-byte blob unchanged)"
        );
    }
    let pid = u32::from_le_bytes([b[16], b[17], b[18], b[19]]);
    if pid != std::process::id() {
        hbail!(
            HCCL_E_PARA,
            "rootInfo comes from process {pid}; the emulator connects ranks of one process only (this is {})",
            std::process::id()
        );
    }
    Ok(u64::from_le_bytes([b[20], b[21], b[22], b[23], b[24], b[25], b[26], b[27]]))
}

#[no_mangle]
pub unsafe extern "C" fn HcclCommInitRootInfo(n: u32, root: *const c_void, rank: u32, comm: *mut *mut c_void) -> u32 {
    hguard("HcclCommInitRootInfo", || {
        if root.is_null() || comm.is_null() {
            hbail!(HCCL_E_PTR, "rootInfo or comm is NULL");
        }
        if n == 0 {
            hbail!(HCCL_E_PARA, "nRanks must be at least 1");
        }
        if rank >= n {
            hbail!(HCCL_E_PARA, "rank {rank} is out of range for nRanks {n}");
        }
        // SAFETY: non-null `HcclRootInfo` from the caller.
        let key = unsafe { parse_root(root) }?;
        let (device, timeout) = bound_device()?;
        let rv = lock(roots()).get(&key).cloned().ok_or_else(|| {
            HErr::new(HCCL_E_PARA, format!("unknown root info {key} (every rank of its communicator has joined already, or it was never created)"))
        })?;
        let mut st = lock(&rv.state);
        if st.comm.is_some() {
            hbail!(HCCL_E_PARA, "rank {rank} joins root info {key}, whose communicator is complete already");
        }
        if let Some((m, by)) = st.n {
            if m != n {
                hbail!(
                    HCCL_E_PARA,
                    "rank {rank} passes nRanks {n}, but rank {by} passed nRanks {m} for the same root info"
                );
            }
        }
        if st.joined.contains_key(&rank) {
            hbail!(HCCL_E_PARA, "rank {rank} joined root info {key} twice");
        }
        if let Some((other, _)) = st.joined.iter().find(|(_, &d)| d == device) {
            hbail!(HCCL_E_PARA, "rank {rank} and rank {other} are both on device {device} (one rank per device)");
        }
        st.n.get_or_insert((n, rank));
        st.joined.insert(rank, device);
        if st.joined.len() == n as usize {
            let devices = st.joined.values().copied().collect();
            st.comm = Some(CommShared::new(comm_name(key), devices, timeout));
            rv.cv.notify_all();
        }
        let deadline = Instant::now() + timeout;
        while st.comm.is_none() {
            let now = Instant::now();
            if now >= deadline {
                // Leave the rendezvous as if this rank had never come, so the others can go on
                // waiting (and a retry can join again).
                st.joined.remove(&rank);
                if st.joined.is_empty() {
                    st.n = None;
                }
                let missing: Vec<u32> = (0..n).filter(|r| *r != rank && !st.joined.contains_key(r)).collect();
                hbail!(
                    HCCL_E_TIMEOUT,
                    "rank {rank}: ranks {missing:?} of {n} did not join within {} ms (V4RT_EMU_HCCL_TIMEOUT_MS)",
                    timeout.as_millis()
                );
            }
            st = rv.cv.wait_timeout(st, deadline - now).map(|(g, _)| g).unwrap_or_else(|e| e.into_inner().0);
        }
        let shared = st.comm.clone().ok_or_else(|| HErr::new(HCCL_E_INTERNAL, "communicator vanished"))?;
        st.picked += 1;
        if st.picked == n {
            lock(roots()).remove(&key);
        }
        drop(st);
        let h = register(RankRef { comm: shared, rank })?;
        // SAFETY: non-null out-pointer from the caller.
        unsafe { out(comm, h as *mut c_void, "comm") }
    })
}

#[no_mangle]
pub unsafe extern "C" fn HcclCommInitAll(ndev: u32, devices: *mut i32, comms_out: *mut *mut c_void) -> u32 {
    hguard("HcclCommInitAll", || {
        if devices.is_null() || comms_out.is_null() {
            hbail!(HCCL_E_PTR, "devices or comms is NULL");
        }
        if ndev == 0 {
            hbail!(HCCL_E_PARA, "ndev must be at least 1");
        }
        // SAFETY: the caller passes `ndev` device ids.
        let devs = unsafe { std::slice::from_raw_parts(devices, ndev as usize) }.to_vec();
        let (visible, timeout) = with_emu(|e| Ok((e.config.devices, e.config.hccl_timeout)))
            .map_err(|f| HErr::from_fail(HCCL_E_RUNTIME, f))?;
        for (i, &d) in devs.iter().enumerate() {
            if d < 0 || d as u32 >= visible {
                hbail!(HCCL_E_PARA, "devices[{i}] = {d} does not exist ({visible} visible; V4RT_EMU_DEVICES)");
            }
            if let Some(j) = devs[..i].iter().position(|&o| o == d) {
                hbail!(HCCL_E_PARA, "devices[{j}] and devices[{i}] are both device {d} (one rank per device)");
            }
        }
        let shared = CommShared::new(comm_name(NEXT_KEY.fetch_add(1, Ordering::Relaxed)), devs, timeout);
        let handles =
            (0..ndev).map(|rank| register(RankRef { comm: shared.clone(), rank })).collect::<Result<Vec<_>, _>>()?;
        for (i, h) in handles.into_iter().enumerate() {
            // SAFETY: the caller passes room for `ndev` handles.
            unsafe { comms_out.add(i).write(h as *mut c_void) };
        }
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn HcclCommDestroy(comm: *mut c_void) -> u32 {
    hguard("HcclCommDestroy", || {
        let r = lookup(comm)?;
        lock(comms()).remove(&(comm as usize));
        // Collectives already queued keep the shared state alive and still run; ranks waiting
        // for one this rank never queued learn that it cannot come.
        lock(&r.comm.state).destroyed[r.rank as usize] = true;
        r.comm.cv.notify_all();
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn HcclGetRankSize(comm: *mut c_void, size: *mut u32) -> u32 {
    hguard("HcclGetRankSize", || {
        let r = lookup(comm)?;
        // SAFETY: caller's out-pointer (checked for NULL).
        unsafe { out(size, r.comm.n() as u32, "rankSize") }
    })
}

#[no_mangle]
pub unsafe extern "C" fn HcclGetRankId(comm: *mut c_void, rank: *mut u32) -> u32 {
    hguard("HcclGetRankId", || {
        let r = lookup(comm)?;
        // SAFETY: caller's out-pointer (checked for NULL).
        unsafe { out(rank, r.rank, "rank") }
    })
}

#[no_mangle]
pub unsafe extern "C" fn HcclGetCommName(comm: *mut c_void, name: *mut c_char) -> u32 {
    hguard("HcclGetCommName", || {
        let r = lookup(comm)?;
        if name.is_null() {
            hbail!(HCCL_E_PTR, "commName is NULL");
        }
        let bytes = r.comm.name.as_bytes();
        let len = bytes.len().min(COMM_NAME_MAX - 1);
        // SAFETY: the caller passes a buffer of COMM_NAME_MAX (128) bytes, as documented.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), name.cast::<u8>(), len);
            name.add(len).write(0);
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn HcclGetCommAsyncError(comm: *mut c_void, async_error: *mut u32) -> u32 {
    hguard("HcclGetCommAsyncError", || {
        let r = lookup(comm)?;
        let code = lock(&r.comm.state).async_error[r.rank as usize];
        // SAFETY: caller's out-pointer (checked for NULL).
        unsafe { out(async_error, code, "asyncError") }
    })
}

#[no_mangle]
pub extern "C" fn HcclGetErrorString(code: u32) -> *const c_char {
    // The header comments' wording, prefixed with the enum name.
    let s: &'static [u8] = match code {
        0 => b"HCCL_SUCCESS: success\0",
        1 => b"HCCL_E_PARA: parameter error\0",
        2 => b"HCCL_E_PTR: empty pointer\0",
        3 => b"HCCL_E_MEMORY: memory error\0",
        4 => b"HCCL_E_INTERNAL: internal error\0",
        5 => b"HCCL_E_NOT_SUPPORT: not support feature\0",
        6 => b"HCCL_E_NOT_FOUND: not found specific resource\0",
        7 => b"HCCL_E_UNAVAIL: resource unavailable\0",
        8 => b"HCCL_E_SYSCALL: call system interface error\0",
        9 => b"HCCL_E_TIMEOUT: timeout\0",
        15 => b"HCCL_E_RUNTIME: call runtime api fail\0",
        16 => b"HCCL_E_DRV: call driver api fail\0",
        24 => b"HCCL_E_OOM: out of memory\0",
        _ => b"HCCL error\0",
    };
    s.as_ptr().cast()
}

// ---------------------------------------------------------------------------------------------
// Collectives: enqueue

/// One rank's queued collective (the payload of [`Task::Collective`]).
pub struct Call {
    comm: Arc<CommShared>,
    rank: u32,
    k: u64,
    args: Args,
    /// This rank's final result, set once under the communicator lock. Two threads may both
    /// find the call at the front of its stream (one synchronizing it, one advancing it from
    /// another rank's wait); the second one reads the result here instead of arriving again.
    outcome: OnceLock<Result<(), HErr>>,
}

/// Checks one rank's arguments on the host and queues the collective on its stream.
fn enqueue(comm: *mut c_void, stream: *mut c_void, args: Args) -> Result<(), HErr> {
    let api = args.kind.api();
    let r = lookup(comm)?;
    let n = r.comm.n() as u64;
    if args.kind != Kind::Barrier {
        if !args.kind.dtypes().contains(&args.dtype) {
            let allowed: Vec<String> = args.kind.dtypes().iter().map(|&d| dtype_name(d)).collect();
            hbail!(
                HCCL_E_PARA,
                "dataType {} is not supported by {api} (hccl.h lists {})",
                dtype_name(args.dtype),
                allowed.join(", ")
            );
        }
        if let Some(op) = args.op.filter(|&op| op > 3) {
            hbail!(HCCL_E_PARA, "unknown reduce op {}", op_name(op));
        }
        if let Some(root) = args.root.filter(|&root| root as u64 >= n) {
            hbail!(HCCL_E_PARA, "root {root} is out of range for a communicator of {n} ranks");
        }
    }
    let (send_len, recv_len) = args
        .spans(n)
        .ok_or_else(|| HErr::new(HCCL_E_PARA, format!("count {} overflows the address space", args.count)))?;
    if stream.is_null() {
        hbail!(HCCL_E_PTR, "stream is NULL (collectives need an explicit stream)");
    }
    let device = r.device();
    let rank = r.rank;
    with_emu(|e| {
        let bound = match e.need_device() {
            Ok(d) => d,
            Err(f) => return Ok(Err(HErr::from_fail(HCCL_E_RUNTIME, f))),
        };
        if bound != device {
            return Ok(Err(HErr::new(
                HCCL_E_PARA,
                format!("the calling thread is bound to device {bound}, but rank {rank} of this communicator is on device {device}"),
            )));
        }
        let sid = match e.stream_id(stream as usize) {
            Ok(s) => s,
            Err(f) => return Ok(Err(HErr::from_fail(HCCL_E_PARA, f))),
        };
        let buffers: &[(&str, usize, u64)] = match args.kind {
            Kind::Barrier => &[],
            Kind::Broadcast => &[("buf", args.send, send_len)],
            _ => &[("sendBuf", args.send, send_len), ("recvBuf", args.recv, recv_len)],
        };
        for &(what, addr, len) in buffers {
            if len == 0 {
                continue;
            }
            if addr == 0 {
                return Ok(Err(HErr::new(HCCL_E_PTR, format!("{what} is NULL"))));
            }
            if !e.mem.is_device_addr(addr) {
                return Ok(Err(HErr::new(HCCL_E_PARA, format!("{what} {addr:#x} is not device memory (collectives take device buffers)"))));
            }
            match e.mem.find(addr, len as usize) {
                Ok((_, a)) if a.device != device => {
                    return Ok(Err(HErr::new(
                        HCCL_E_PARA,
                        format!("{what} {addr:#x} was allocated on device {}, but rank {rank} is on device {device}", a.device),
                    )))
                }
                Ok(_) => {}
                Err(m) => {
                    return Ok(Err(HErr::new(
                        HCCL_E_PARA,
                        format!("{what} must hold {len} bytes ({} × {}): {m}", args.count, dtype_name(args.dtype)),
                    )))
                }
            }
        }
        let k = {
            let mut st = lock(&r.comm.state);
            let k = st.next[rank as usize];
            st.next[rank as usize] += 1;
            r.comm.slot(&mut st, k).queued[rank as usize] = Some(sid);
            k
        };
        let call = Call { comm: r.comm.clone(), rank, k, args: args.clone(), outcome: OnceLock::new() };
        e.enqueue(sid, Task::Collective(Arc::new(call)))?;
        Ok(Ok(()))
    })
    .map_err(|f| HErr::from_fail(HCCL_E_RUNTIME, f))?
}

#[no_mangle]
pub extern "C" fn HcclAllReduce(
    send: *mut c_void,
    recv: *mut c_void,
    count: u64,
    dt: u32,
    op: u32,
    comm: *mut c_void,
    stream: *mut c_void,
) -> u32 {
    hguard("HcclAllReduce", || {
        let args = Args {
            kind: Kind::AllReduce,
            count,
            dtype: dt,
            op: Some(op),
            root: None,
            send: send as usize,
            recv: recv as usize,
        };
        enqueue(comm, stream, args)
    })
}

#[no_mangle]
pub extern "C" fn HcclAllGather(
    send: *mut c_void,
    recv: *mut c_void,
    count: u64,
    dt: u32,
    comm: *mut c_void,
    stream: *mut c_void,
) -> u32 {
    hguard("HcclAllGather", || {
        let args = Args {
            kind: Kind::AllGather,
            count,
            dtype: dt,
            op: None,
            root: None,
            send: send as usize,
            recv: recv as usize,
        };
        enqueue(comm, stream, args)
    })
}

#[no_mangle]
pub extern "C" fn HcclBroadcast(
    buf: *mut c_void,
    count: u64,
    dt: u32,
    root: u32,
    comm: *mut c_void,
    stream: *mut c_void,
) -> u32 {
    hguard("HcclBroadcast", || {
        let args = Args {
            kind: Kind::Broadcast,
            count,
            dtype: dt,
            op: None,
            root: Some(root),
            send: buf as usize,
            recv: buf as usize,
        };
        enqueue(comm, stream, args)
    })
}

#[no_mangle]
pub extern "C" fn HcclReduceScatter(
    send: *mut c_void,
    recv: *mut c_void,
    recv_count: u64,
    dt: u32,
    op: u32,
    comm: *mut c_void,
    stream: *mut c_void,
) -> u32 {
    hguard("HcclReduceScatter", || {
        let args = Args {
            kind: Kind::ReduceScatter,
            count: recv_count,
            dtype: dt,
            op: Some(op),
            root: None,
            send: send as usize,
            recv: recv as usize,
        };
        enqueue(comm, stream, args)
    })
}

#[no_mangle]
pub extern "C" fn HcclBarrier(comm: *mut c_void, stream: *mut c_void) -> u32 {
    hguard("HcclBarrier", || {
        let args = Args { kind: Kind::Barrier, count: 0, dtype: 0, op: None, root: None, send: 0, recv: 0 };
        enqueue(comm, stream, args)
    })
}

// ---------------------------------------------------------------------------------------------
// Collectives: execution (at synchronize, outside the emulator lock)

/// What one arrival at a rendezvous leads to.
enum Arrival {
    /// The collective has a result.
    Finished(Result<(), HErr>),
    /// This arrival completed it: the caller moves the data for every rank.
    Move(Vec<Args>),
    /// Other ranks are still missing.
    Wait,
}

impl Call {
    /// Records this rank's arrival (idempotent) and says what happens next.
    fn arrive(&self, st: &mut CommState) -> Arrival {
        let slot = self.comm.slot(st, self.k);
        if let Phase::Done(r) = &slot.phase {
            return Arrival::Finished(r.clone());
        }
        let me = self.rank as usize;
        if slot.arrived[me].is_none() {
            slot.arrived[me] = Some(self.args.clone());
        }
        if !matches!(slot.phase, Phase::Waiting) || slot.arrived.iter().any(Option::is_none) {
            return Arrival::Wait;
        }
        let all: Vec<Args> = slot.arrived.iter().flatten().cloned().collect();
        if let Some((q, a)) = all.iter().enumerate().find(|(_, a)| !a.agrees(&all[0])) {
            let e = HErr::new(
                HCCL_E_PARA,
                format!(
                    "ranks disagree on collective #{}: rank 0 called {}, rank {q} called {}",
                    self.k,
                    all[0].describe(),
                    a.describe()
                ),
            );
            slot.phase = Phase::Done(Err(e.clone()));
            self.comm.cv.notify_all();
            return Arrival::Finished(Err(e));
        }
        slot.phase = Phase::Moving;
        Arrival::Move(all)
    }

    /// Moves the data (emulator lock taken here, communicator lock not held) and publishes
    /// the result.
    fn complete(&self, all: &[Args]) -> Result<(), HErr> {
        let result =
            with_emu(|e| Ok(move_data(&mut e.mem, all))).unwrap_or_else(|f| Err(HErr::from_fail(HCCL_E_RUNTIME, f)));
        let mut st = lock(&self.comm.state);
        self.comm.slot(&mut st, self.k).phase = Phase::Done(result.clone());
        self.comm.cv.notify_all();
        self.collect(&mut st, result)
    }

    /// Hands this rank its final result, once: records an async error, and forgets the slot
    /// once every rank has collected.
    fn collect(&self, st: &mut CommState, result: Result<(), HErr>) -> Result<(), HErr> {
        if self.outcome.set(result.clone()).is_ok() {
            let me = self.rank as usize;
            if let Err(e) = &result {
                st.async_error[me] = e.code;
            }
            let slot = self.comm.slot(st, self.k);
            slot.collected[me] = true;
            if slot.collected.iter().all(|&c| c) {
                st.slots.remove(&self.k);
            }
        }
        self.outcome.get().cloned().unwrap_or(result)
    }

    /// The stream-level failure for an HCCL one.
    fn stream_fail(&self, e: HErr) -> Fail {
        let status = if e.code == HCCL_E_TIMEOUT { RT_STREAM_SYNC_TIMEOUT } else { RT_INTERNAL_ERROR };
        Fail::new(
            status,
            format!(
                "{} (communicator {}, rank {}, collective #{}) failed with {} ({}): {}",
                self.args.kind.api(),
                self.comm.name,
                self.rank,
                self.k,
                code_name(e.code),
                e.code,
                e.msg
            ),
        )
    }

    /// Joins without waiting: `Some(result)` once the collective has one for this rank (this
    /// arrival may have completed it), `None` while other ranks are missing.
    pub(crate) fn arrive_only(&self) -> Option<Result<(), Fail>> {
        let mut st = lock(&self.comm.state);
        if let Some(r) = self.outcome.get() {
            return Some(r.clone().map_err(|e| self.stream_fail(e)));
        }
        let r = match self.arrive(&mut st) {
            Arrival::Finished(r) => self.collect(&mut st, r),
            Arrival::Move(all) => {
                drop(st);
                self.complete(&all)
            }
            Arrival::Wait => return None,
        };
        Some(r.map_err(|e| self.stream_fail(e)))
    }

    /// Joins and waits until every rank has arrived and the data has moved, or the timeout.
    /// While waiting it advances the streams of the ranks still missing (see the module docs).
    pub(crate) fn execute(&self) -> Result<(), Fail> {
        self.wait().map_err(|e| self.stream_fail(e))
    }

    fn wait(&self) -> Result<(), HErr> {
        let deadline = Instant::now() + self.comm.timeout;
        let mut st = lock(&self.comm.state);
        loop {
            if let Some(r) = self.outcome.get() {
                return r.clone();
            }
            match self.arrive(&mut st) {
                Arrival::Finished(r) => return self.collect(&mut st, r),
                Arrival::Move(all) => {
                    drop(st);
                    return self.complete(&all);
                }
                Arrival::Wait => {}
            }
            let slot = self.comm.slot(&mut st, self.k);
            let waiting = matches!(slot.phase, Phase::Waiting);
            let missing: Vec<usize> = (0..slot.arrived.len()).filter(|&q| slot.arrived[q].is_none()).collect();
            let queued: Vec<usize> = missing.iter().filter_map(|&q| slot.queued[q]).collect();
            let unqueued: Vec<usize> = missing.iter().copied().filter(|&q| slot.queued[q].is_none()).collect();
            let gone: Vec<usize> = unqueued.into_iter().filter(|&q| st.destroyed[q]).collect();
            let now = Instant::now();
            let failure = if waiting && !gone.is_empty() {
                Some(HErr::new(
                    HCCL_E_UNAVAIL,
                    format!(
                        "ranks {gone:?} destroyed their communicator without calling {} #{} (real HCCL would wait for HCCL_EXEC_TIMEOUT)",
                        self.args.kind.api(),
                        self.k
                    ),
                ))
            } else if waiting && now >= deadline {
                Some(HErr::new(
                    HCCL_E_TIMEOUT,
                    format!(
                        "ranks {missing:?} of {} did not reach collective #{} ({} on rank {}) within {} ms (V4RT_EMU_HCCL_TIMEOUT_MS)",
                        self.comm.n(),
                        self.k,
                        self.args.describe(),
                        self.rank,
                        self.comm.timeout.as_millis()
                    ),
                ))
            } else {
                None
            };
            if let Some(e) = failure {
                self.comm.slot(&mut st, self.k).phase = Phase::Done(Err(e.clone()));
                self.comm.cv.notify_all();
                return self.collect(&mut st, Err(e));
            }
            if !queued.is_empty() {
                // Let the missing ranks' devices run up to this collective (lock released: it
                // drains their streams and may complete the collective itself).
                drop(st);
                for s in queued {
                    advance_stream(s);
                }
                st = lock(&self.comm.state);
                if self.outcome.get().is_some() || !matches!(self.comm.slot(&mut st, self.k).phase, Phase::Waiting) {
                    continue;
                }
            }
            // Short slices: advancing other streams does not notify, and the deadline is
            // checked above.
            let slice = deadline
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(1), Duration::from_millis(20));
            st = self.comm.cv.wait_timeout(st, slice).map(|(g, _)| g).unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

/// Reads every rank's input, then writes every rank's output (so in-place calls are exact).
fn move_data(mem: &mut Memory, all: &[Args]) -> Result<(), HErr> {
    let a0 = &all[0];
    let n = all.len();
    let count = a0.count as usize;
    let size = a0.elem_size();
    let bytes = count * size;
    let read = |mem: &Memory, rank: usize, what: &str, addr: usize, len: usize| -> Result<Vec<u8>, HErr> {
        if len == 0 {
            return Ok(Vec::new());
        }
        mem.bytes(addr, len)
            .map(<[u8]>::to_vec)
            .map_err(|m| HErr::new(HCCL_E_PARA, format!("rank {rank} {what}: {m} (freed before the collective ran?)")))
    };
    let write = |mem: &mut Memory, rank: usize, what: &str, addr: usize, data: &[u8]| -> Result<(), HErr> {
        if data.is_empty() {
            return Ok(());
        }
        mem.bytes_mut(addr, data.len())
            .map(|d| d.copy_from_slice(data))
            .map_err(|m| HErr::new(HCCL_E_PARA, format!("rank {rank} {what}: {m} (freed before the collective ran?)")))
    };
    match a0.kind {
        Kind::Barrier => Ok(()),
        Kind::Broadcast => {
            let root = a0.root.unwrap_or(0) as usize;
            let data = read(mem, root, "buf", all[root].send, bytes)?;
            for (q, a) in all.iter().enumerate().filter(|(q, _)| *q != root) {
                write(mem, q, "buf", a.send, &data)?;
            }
            Ok(())
        }
        Kind::AllGather => {
            let mut cat = Vec::with_capacity(bytes * n);
            for (q, a) in all.iter().enumerate() {
                cat.extend(read(mem, q, "sendBuf", a.send, bytes)?);
            }
            for (q, a) in all.iter().enumerate() {
                write(mem, q, "recvBuf", a.recv, &cat)?;
            }
            Ok(())
        }
        Kind::AllReduce | Kind::ReduceScatter => {
            let Some((_, _, Some(dt))) = dtype_info(a0.dtype) else {
                hbail!(HCCL_E_PARA, "dataType {} cannot be reduced", dtype_name(a0.dtype));
            };
            let in_elems = if a0.kind == Kind::ReduceScatter { count * n } else { count };
            let inputs = all
                .iter()
                .enumerate()
                .map(|(q, a)| read(mem, q, "sendBuf", a.send, in_elems * size))
                .collect::<Result<Vec<_>, _>>()?;
            let op = a0.op.unwrap_or(0);
            let mut reduced = vec![0f64; in_elems];
            for (i, out) in reduced.iter_mut().enumerate() {
                let mut vals = inputs.iter().map(|b| dt.load(&b[i * size..(i + 1) * size]));
                let first = vals.next().unwrap_or(0.0);
                *out = vals.fold(first, |acc, v| match op {
                    0 => acc + v,
                    1 => acc * v,
                    // NaN-propagating, so a poisoned input cannot vanish in a max/min.
                    2 if acc.is_nan() || v.is_nan() => f64::NAN,
                    2 => acc.max(v),
                    _ if acc.is_nan() || v.is_nan() => f64::NAN,
                    _ => acc.min(v),
                });
            }
            let mut encoded = vec![0u8; in_elems * size];
            for (i, &v) in reduced.iter().enumerate() {
                dt.store(v, &mut encoded[i * size..(i + 1) * size]);
            }
            for (q, a) in all.iter().enumerate() {
                let part =
                    if a0.kind == Kind::ReduceScatter { &encoded[q * bytes..(q + 1) * bytes] } else { &encoded[..] };
                write(mem, q, "recvBuf", a.recv, part)?;
            }
            Ok(())
        }
    }
}
